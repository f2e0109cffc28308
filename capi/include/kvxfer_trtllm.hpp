// kvxfer as a TensorRT-LLM KV-cache transfer agent (C++17, header-only,
// over the C ABI in kvxfer.h).
//
// It declares TensorRT-LLM's agent interface (BaseTransferAgent and the
// types it takes, in namespace tensorrt_llm::executor::kv_cache, with the
// same members in the same order so that the layouts and the virtual
// tables agree) and implements it as kvxfer::TrtllmAgent. Define
// KVXFER_TRTLLM_UPSTREAM_HEADER before including this file to use
// TensorRT-LLM's own "tensorrt_llm/executor/transferAgent.h" instead of
// these declarations.
//
// capi/cpp/nixl_wrapper.cpp adds the factory TensorRT-LLM looks up,
// createNixlTransferAgent, for a build of libtensorrt_llm_nixl_wrapper.so.
//
// Errors are thrown as kvxfer::Error (a std::runtime_error) carrying the
// library's message. Backend: TRTLLM_NIXL_KVCACHE_BACKEND (UCX by default,
// or LIBFABRIC), unless KVXFER_BACKEND is set or backendParams["backend"]
// names one. The side channel (getLocalConnectionInfo) listens on
// backendParams["listen"], else KVXFER_LISTEN, else 127.0.0.1:0: set an
// address peers on other hosts can reach, e.g. KVXFER_LISTEN=10.0.0.5:0.
#pragma once

#include "kvxfer.h"

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#ifdef KVXFER_TRTLLM_UPSTREAM_HEADER
#include "tensorrt_llm/executor/transferAgent.h"
#else

namespace tensorrt_llm::executor::kv_cache
{

/// Where a registered or transferred block lives.
enum class MemoryType : uint8_t
{
    kDRAM,
    kVRAM,
    kBLK,
    kOBJ,
    kFILE
};

/// One block: address, length, device.
class MemoryDesc
{
public:
    MemoryDesc(std::vector<char> const& vec, uint32_t deviceId = 0)
        : mAddr{reinterpret_cast<uintptr_t>(vec.data())}
        , mLen{vec.size()}
        , mDeviceId{deviceId}
    {
    }

    MemoryDesc(void* addr, size_t len, uint32_t deviceId)
        : mAddr{reinterpret_cast<uintptr_t>(addr)}
        , mLen{len}
        , mDeviceId{deviceId}
    {
    }

    MemoryDesc(uintptr_t addr, size_t len, uint32_t deviceId)
        : mAddr{addr}
        , mLen{len}
        , mDeviceId{deviceId}
    {
    }

    [[nodiscard]] uintptr_t getAddr() const noexcept { return mAddr; }
    [[nodiscard]] size_t getLen() const noexcept { return mLen; }
    [[nodiscard]] uint32_t getDeviceId() const noexcept { return mDeviceId; }

private:
    uintptr_t mAddr;
    size_t mLen;
    uint32_t mDeviceId;
};

/// Blocks of one memory type.
class MemoryDescs
{
public:
    MemoryDescs(MemoryType type, std::vector<MemoryDesc> descs)
        : mType{type}
        , mDescs{std::move(descs)}
    {
    }

    [[nodiscard]] MemoryType getType() const noexcept { return mType; }
    [[nodiscard]] std::vector<MemoryDesc> const& getDescs() const noexcept { return mDescs; }

private:
    MemoryType mType;
    std::vector<MemoryDesc> mDescs;
};

using TransferDescs = MemoryDescs;
using RegisterDescs = MemoryDescs;
using SyncMessage = std::string;
using ConnectionInfoType = std::string;

/// A VRAM region's chunking, as agents exchange it (unused by kvxfer).
struct VramRegionMeta
{
    uintptr_t baseAddr;
    size_t totalLen;
    size_t chunkSize;
};

/// What a peer needs to reach an agent: kvxfer's metadata blob.
class AgentDesc final
{
public:
    AgentDesc(std::string backendAgentDesc)
        : mBackendAgentDesc{std::move(backendAgentDesc)}
    {
    }

    AgentDesc(std::string backendAgentDesc, std::vector<VramRegionMeta> vramRegions, std::string bounceHandshake = {})
        : mBackendAgentDesc{std::move(backendAgentDesc)}
        , mVramRegions{std::move(vramRegions)}
        , mBounceHandshake{std::move(bounceHandshake)}
    {
    }

    [[nodiscard]] std::string const& getBackendAgentDesc() const noexcept { return mBackendAgentDesc; }
    [[nodiscard]] std::vector<VramRegionMeta> const& getVramRegions() const noexcept { return mVramRegions; }
    [[nodiscard]] std::string const& getBounceHandshake() const noexcept { return mBounceHandshake; }

private:
    std::string mBackendAgentDesc;
    std::vector<VramRegionMeta> mVramRegions;
    std::string mBounceHandshake;
};

/// Direction, seen from the agent that submits.
enum class TransferOp : uint8_t
{
    kREAD,
    kWRITE,
};

/// A transfer: local blocks (src) paired with the remote agent's (dst),
/// and an optional message the remote agent gets after the data.
class TransferRequest
{
public:
    TransferRequest(TransferOp op, TransferDescs srcDescs, TransferDescs dstDescs, std::string const& remoteName,
        std::optional<SyncMessage> syncMessage = std::nullopt)
        : mOp{op}
        , mSrcDescs{std::move(srcDescs)}
        , mDstDescs{std::move(dstDescs)}
        , mRemoteName{remoteName}
        , mSyncMessage{std::move(syncMessage)}
    {
    }

    [[nodiscard]] TransferOp getOp() const noexcept { return mOp; }
    [[nodiscard]] TransferDescs const& getSrcDescs() const noexcept { return mSrcDescs; }
    [[nodiscard]] TransferDescs const& getDstDescs() const noexcept { return mDstDescs; }
    [[nodiscard]] std::string const& getRemoteName() const noexcept { return mRemoteName; }
    [[nodiscard]] std::optional<SyncMessage> getSyncMessage() const noexcept { return mSyncMessage; }

private:
    TransferOp mOp;
    TransferDescs mSrcDescs;
    TransferDescs mDstDescs;
    std::string mRemoteName;
    std::optional<SyncMessage> mSyncMessage;
};

enum class TransferState : uint8_t
{
    kIN_PROGRESS,
    kSUCCESS,
    kFAILURE,
};

/// A submitted transfer.
class TransferStatus
{
public:
    virtual ~TransferStatus() = default;
    [[nodiscard]] virtual bool isCompleted() const = 0;
    /// Waits up to timeout_ms (negative: without limit).
    virtual TransferState wait(int64_t timeout_ms = -1) const = 0;

    [[nodiscard]] virtual bool release() { return false; }

    [[nodiscard]] virtual std::string getLastStatusStr() const { return {}; }
};

struct BaseAgentConfig
{
    std::string mName;
    bool useProgThread;
    bool multiThread;
    bool useListenThread;
    bool enableTelemetry;
    std::unordered_map<std::string, std::string> backendParams;
    std::optional<int> rank;
    std::optional<int> worldSize;
    size_t agentBufferSizeMb{0};
    std::unordered_map<std::string, std::string> bounceParams;
};

class BaseTransferAgent
{
public:
    virtual ~BaseTransferAgent() = default;
    virtual void registerMemory(RegisterDescs const& descs) = 0;
    virtual void deregisterMemory(RegisterDescs const& descs) = 0;
    virtual void loadRemoteAgent(std::string const& name, AgentDesc const& agentDesc) = 0;
    virtual void loadRemoteAgent(std::string const& name, ConnectionInfoType const& connectionInfo) = 0;
    virtual void invalidateRemoteAgent(std::string const& name) = 0;
    virtual AgentDesc getLocalAgentDesc() = 0;
    virtual ConnectionInfoType getLocalConnectionInfo() = 0;
    [[nodiscard]] virtual std::unique_ptr<TransferStatus> submitTransferRequests(TransferRequest const& request) = 0;
    virtual void notifySyncMessage(std::string const& name, SyncMessage const& syncMessage) = 0;
    virtual std::unordered_map<std::string, std::vector<SyncMessage>> getNotifiedSyncMessages() = 0;
    virtual bool checkRemoteDescs(std::string const& name, MemoryDescs const& memoryDescs) = 0;
};

} // namespace tensorrt_llm::executor::kv_cache

#endif // KVXFER_TRTLLM_UPSTREAM_HEADER

namespace kvxfer
{

namespace tk = tensorrt_llm::executor::kv_cache;

/// A failed kvxfer call: what() is kvxfer_last_error() of that call.
class Error : public std::runtime_error
{
public:
    Error(kvxfer_status status, std::string const& what)
        : std::runtime_error(what)
        , mStatus(status)
    {
    }

    [[nodiscard]] kvxfer_status status() const noexcept { return mStatus; }

private:
    kvxfer_status mStatus;
};

namespace detail
{

/// Throws kvxfer::Error for a status other than KVXFER_OK.
inline void check(kvxfer_status s)
{
    if (s != KVXFER_OK)
    {
        throw Error(s, kvxfer_last_error());
    }
}

inline std::vector<kvxfer_desc> toDescs(tk::MemoryDescs const& descs)
{
    std::vector<kvxfer_desc> out;
    out.reserve(descs.getDescs().size());
    for (auto const& d : descs.getDescs())
    {
        out.push_back(kvxfer_desc{static_cast<uint64_t>(d.getAddr()), static_cast<uint64_t>(d.getLen()),
            d.getDeviceId()});
    }
    return out;
}

inline uint32_t toKind(tk::MemoryType t)
{
    switch (t)
    {
    case tk::MemoryType::kDRAM: return KVXFER_DRAM;
    case tk::MemoryType::kVRAM: return KVXFER_VRAM;
    default:
        throw Error(KVXFER_ERR_UNSUPPORTED,
            "registerMemory: memory type " + std::to_string(static_cast<int>(t))
                + " is not supported; kvxfer moves kDRAM and kVRAM");
    }
}

} // namespace detail

/// A submitted transfer: owns its kvxfer_xfer handle.
class TrtllmStatus final : public tk::TransferStatus
{
public:
    explicit TrtllmStatus(kvxfer_xfer* xfer) noexcept
        : mXfer(xfer)
    {
    }

    ~TrtllmStatus() override { kvxfer_xfer_free(mXfer); }

    TrtllmStatus(TrtllmStatus const&) = delete;
    TrtllmStatus& operator=(TrtllmStatus const&) = delete;

    /// Done or failed.
    [[nodiscard]] bool isCompleted() const override
    {
        std::lock_guard<std::mutex> lock(mMutex);
        kvxfer_xfer_state st = KVXFER_XFER_IN_PROGRESS;
        kvxfer_status s = kvxfer_xfer_status(mXfer, &st);
        if (s != KVXFER_OK)
        {
            mLast = kvxfer_last_error();
            return true;
        }
        return st == KVXFER_XFER_DONE;
    }

    /// kSUCCESS, kFAILURE (getLastStatusStr() says why) or, when
    /// timeout_ms (>= 0) passed first, kIN_PROGRESS.
    tk::TransferState wait(int64_t timeout_ms = -1) const override
    {
        std::lock_guard<std::mutex> lock(mMutex);
        kvxfer_xfer_state st = KVXFER_XFER_IN_PROGRESS;
        kvxfer_status s = kvxfer_xfer_wait(mXfer, timeout_ms, &st);
        if (s != KVXFER_OK)
        {
            mLast = kvxfer_last_error();
            return tk::TransferState::kFAILURE;
        }
        if (st == KVXFER_XFER_DONE)
        {
            mLast = "done";
            return tk::TransferState::kSUCCESS;
        }
        return tk::TransferState::kIN_PROGRESS;
    }

    /// Releases the transfer now (cancelled where it still runs).
    [[nodiscard]] bool release() override
    {
        std::lock_guard<std::mutex> lock(mMutex);
        if (kvxfer_xfer_release(mXfer) != KVXFER_OK)
        {
            mLast = kvxfer_last_error();
            return false;
        }
        return true;
    }

    [[nodiscard]] std::string getLastStatusStr() const override
    {
        std::lock_guard<std::mutex> lock(mMutex);
        return mLast;
    }

private:
    kvxfer_xfer* mXfer;
    mutable std::mutex mMutex;
    mutable std::string mLast;
};

/// TensorRT-LLM's BaseTransferAgent over a kvxfer agent.
class TrtllmAgent final : public tk::BaseTransferAgent
{
public:
    /// Creates the agent config.mName; see the top of this file for the
    /// backend and the listen address. useProgThread runs kvxfer's
    /// progress thread.
    explicit TrtllmAgent(tk::BaseAgentConfig const& config)
        : mName(config.mName)
    {
        kvxfer_config cfg;
        detail::check(kvxfer_config_init(&cfg));
        auto backend = config.backendParams.find("backend");
        if (backend != config.backendParams.end())
        {
            cfg.backend = backend->second.c_str();
        }
        auto listen = config.backendParams.find("listen");
        if (listen != config.backendParams.end())
        {
            cfg.listen = listen->second.c_str();
        }
        else if (char const* env = std::getenv("KVXFER_LISTEN"))
        {
            cfg.listen = env;
        }
        cfg.progress_thread = config.useProgThread ? 1 : 0;
        detail::check(kvxfer_agent_new(mName.c_str(), &cfg, &mAgent));
    }

    ~TrtllmAgent() override { kvxfer_agent_free(mAgent); }

    TrtllmAgent(TrtllmAgent const&) = delete;
    TrtllmAgent& operator=(TrtllmAgent const&) = delete;

    /// The backend in use: "UCX" or "LIBFABRIC".
    [[nodiscard]] std::string backend() const
    {
        char const* name = nullptr;
        detail::check(kvxfer_agent_backend(mAgent, &name));
        return name;
    }

    /// The C handle, for calls this interface does not offer (prepared
    /// lists and kvxfer_make_xfer). Owned by this object.
    [[nodiscard]] kvxfer_agent* handle() const noexcept { return mAgent; }

    /// Registers every block; on failure none of them stays registered.
    void registerMemory(tk::RegisterDescs const& descs) override
    {
        uint32_t kind = detail::toKind(descs.getType());
        auto const& ds = descs.getDescs();
        for (size_t i = 0; i < ds.size(); ++i)
        {
            kvxfer_status s = kvxfer_register(mAgent, ds[i].getAddr(), ds[i].getLen(), ds[i].getDeviceId(), kind);
            if (s != KVXFER_OK)
            {
                Error e(s, kvxfer_last_error());
                for (size_t j = 0; j < i; ++j)
                {
                    kvxfer_deregister(mAgent, ds[j].getAddr());
                }
                throw e;
            }
        }
    }

    /// Deregisters every block (each by its start address); throws the
    /// first error after trying all.
    void deregisterMemory(tk::RegisterDescs const& descs) override
    {
        std::optional<Error> first;
        for (auto const& d : descs.getDescs())
        {
            kvxfer_status s = kvxfer_deregister(mAgent, d.getAddr());
            if (s != KVXFER_OK && !first)
            {
                first.emplace(s, kvxfer_last_error());
            }
        }
        if (first)
        {
            throw *first;
        }
    }

    /// Loads the metadata in agentDesc, which must be agent `name`'s (if it
    /// is another agent's, that agent stays loaded and this throws).
    void loadRemoteAgent(std::string const& name, tk::AgentDesc const& agentDesc) override
    {
        auto const& blob = agentDesc.getBackendAgentDesc();
        char peer[256];
        size_t len = 0;
        detail::check(kvxfer_load_remote(mAgent, reinterpret_cast<uint8_t const*>(blob.data()), blob.size(), peer,
            sizeof peer, &len));
        expectPeer("loadRemoteAgent", name, std::string(peer, len));
    }

    /// Connects to the agent listening on connectionInfo ("ip:port"),
    /// which must be agent `name`: loads its metadata and gives it ours.
    void loadRemoteAgent(std::string const& name, tk::ConnectionInfoType const& connectionInfo) override
    {
        char peer[256];
        size_t len = 0;
        detail::check(kvxfer_connect(mAgent, connectionInfo.c_str(), peer, sizeof peer, &len));
        expectPeer("loadRemoteAgent", name, std::string(peer, len));
    }

    void invalidateRemoteAgent(std::string const& name) override
    {
        detail::check(kvxfer_invalidate_remote(mAgent, name.c_str()));
    }

    /// This agent's metadata (registered memory included).
    tk::AgentDesc getLocalAgentDesc() override
    {
        size_t len = 0;
        detail::check(kvxfer_local_metadata(mAgent, nullptr, 0, &len));
        std::string blob(len, '\0');
        detail::check(kvxfer_local_metadata(mAgent, reinterpret_cast<uint8_t*>(blob.data()), blob.size(), &len));
        blob.resize(len);
        return tk::AgentDesc{std::move(blob)};
    }

    /// "ip:port" of this agent's side channel.
    tk::ConnectionInfoType getLocalConnectionInfo() override
    {
        char buf[128];
        size_t len = 0;
        detail::check(kvxfer_agent_listen_addr(mAgent, buf, sizeof buf, &len));
        return std::string(buf, len);
    }

    /// Posts the transfer: src blocks are this agent's, dst blocks the
    /// remote agent's, for kREAD as for kWRITE.
    [[nodiscard]] std::unique_ptr<tk::TransferStatus> submitTransferRequests(tk::TransferRequest const& request) override
    {
        auto local = detail::toDescs(request.getSrcDescs());
        auto remote = detail::toDescs(request.getDstDescs());
        uint32_t op = request.getOp() == tk::TransferOp::kREAD ? KVXFER_READ : KVXFER_WRITE;
        auto msg = request.getSyncMessage();
        kvxfer_xfer* xfer = nullptr;
        detail::check(kvxfer_prepare(mAgent, op, local.data(), local.size(), remote.data(), remote.size(),
            request.getRemoteName().c_str(), msg ? reinterpret_cast<uint8_t const*>(msg->data()) : nullptr,
            msg ? msg->size() : 0, &xfer));
        auto status = std::make_unique<TrtllmStatus>(xfer);
        detail::check(kvxfer_xfer_post(xfer, nullptr));
        return status;
    }

    void notifySyncMessage(std::string const& name, tk::SyncMessage const& syncMessage) override
    {
        detail::check(kvxfer_notify(
            mAgent, name.c_str(), reinterpret_cast<uint8_t const*>(syncMessage.data()), syncMessage.size()));
    }

    /// Messages received since the last call, by sender, oldest first.
    std::unordered_map<std::string, std::vector<tk::SyncMessage>> getNotifiedSyncMessages() override
    {
        Collected c;
        kvxfer_status s = kvxfer_take_notifications(mAgent, &collect, &c);
        if (c.failed)
        {
            throw std::bad_alloc();
        }
        detail::check(s);
        return std::move(c.messages);
    }

    /// Whether every block lies in memory agent `name` registered (false
    /// also when `name` is not loaded).
    bool checkRemoteDescs(std::string const& name, tk::MemoryDescs const& memoryDescs) override
    {
        auto descs = detail::toDescs(memoryDescs);
        return kvxfer_check_remote(mAgent, name.c_str(), descs.data(), descs.size()) == KVXFER_OK;
    }

private:
    struct Collected
    {
        std::unordered_map<std::string, std::vector<tk::SyncMessage>> messages;
        bool failed = false;
    };

    static void collect(void* ctx, char const* peer, size_t peerLen, uint8_t const* msg, size_t msgLen) noexcept
    {
        auto* c = static_cast<Collected*>(ctx);
        try
        {
            c->messages[std::string(peer, peerLen)].emplace_back(reinterpret_cast<char const*>(msg), msgLen);
        }
        catch (...)
        {
            c->failed = true;
        }
    }

    void expectPeer(char const* func, std::string const& expected, std::string const& got)
    {
        if (got != expected)
        {
            throw Error(KVXFER_ERR_INVALID_ARGUMENT,
                std::string(func) + ": the agent there is \"" + got + "\", not \"" + expected + "\"");
        }
    }

    std::string mName;
    kvxfer_agent* mAgent = nullptr;
};

/// A new kvxfer agent behind TensorRT-LLM's interface.
inline std::unique_ptr<tk::BaseTransferAgent> makeTrtllmAgent(tk::BaseAgentConfig const& config)
{
    return std::make_unique<TrtllmAgent>(config);
}

} // namespace kvxfer
