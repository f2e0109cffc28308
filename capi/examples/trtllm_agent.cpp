#include <iostream>
#include <vector>
#include "kvxfer_trtllm.hpp"

using namespace tensorrt_llm::executor::kv_cache;

int main() {
    BaseAgentConfig config0{}, config1{};
    config0.mName = "agent0";
    config1.mName = "agent1";
    config0.useProgThread = config1.useProgThread = true;
    auto agent0 = kvxfer::makeTrtllmAgent(config0);
    auto agent1 = kvxfer::makeTrtllmAgent(config1);

    std::vector<char> memory0(100, 10), memory1(100, 1);
    MemoryDescs descs0{MemoryType::kDRAM, {MemoryDesc{memory0}}};
    MemoryDescs descs1{MemoryType::kDRAM, {MemoryDesc{memory1}}};
    agent0->registerMemory(descs0);
    agent1->registerMemory(descs1);

    agent0->loadRemoteAgent("agent1", agent1->getLocalConnectionInfo());
    {
        auto status = agent0->submitTransferRequests(
            TransferRequest{TransferOp::kWRITE, descs0, descs1, "agent1"});
        bool ok = status->wait() == TransferState::kSUCCESS && memory0 == memory1;
        std::cout << (ok ? "written" : "failed") << std::endl;
    }

    agent0->invalidateRemoteAgent("agent1");
    agent0->deregisterMemory(descs0);
    agent1->deregisterMemory(descs1);
    return 0;
}
