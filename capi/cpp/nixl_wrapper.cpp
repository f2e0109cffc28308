/* The factory TensorRT-LLM looks up in libtensorrt_llm_nixl_wrapper.so
 * (makeTransferAgent("nixl", &config)), returning a kvxfer agent. Build:
 *
 *   g++ -std=c++17 -shared -fPIC -I capi/include capi/cpp/nixl_wrapper.cpp \
 *       -L target/release -lkvxfer_capi -Wl,-rpath,$PWD/target/release \
 *       -o libtensorrt_llm_nixl_wrapper.so
 *
 * and put it where TensorRT-LLM's dlopen finds it (LD_LIBRARY_PATH).
 *
 * Inside a TensorRT-LLM build, add -DKVXFER_TRTLLM_UPSTREAM_HEADER and its
 * include path so that the agent implements TensorRT-LLM's own declarations.
 */
#include "kvxfer_trtllm.hpp"

#if defined(__clang__)
#pragma clang diagnostic ignored "-Wreturn-type-c-linkage"
#endif

extern "C" __attribute__((visibility("default")))
std::unique_ptr<tensorrt_llm::executor::kv_cache::BaseTransferAgent>
createNixlTransferAgent(tensorrt_llm::executor::kv_cache::BaseAgentConfig const* config)
{
    if (config == nullptr)
    {
        throw kvxfer::Error(KVXFER_ERR_NULL_POINTER, "createNixlTransferAgent: config is NULL");
    }
    return kvxfer::makeTrtllmAgent(*config);
}
