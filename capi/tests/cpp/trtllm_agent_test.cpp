// TensorRT-LLM's transfer-agent scenarios against kvxfer, each agent in its
// own process. The agents come from createNixlTransferAgent in the wrapper
// library named by argv[2], opened with dlopen as TensorRT-LLM opens
// libtensorrt_llm_nixl_wrapper.so.
//
//   trtllm_agent_test SCENARIO WRAPPER.so      runs a scenario (agent0 here,
//                                              the others in child processes)
//   trtllm_agent_test child WRAPPER.so         an agent driven by commands on
//                                              stdin, answering on stdout
//
// Scenarios: Basic, Basic2, Connect, AgentDesc, SyncMessage,
// LibfabricBackendBasic, UnknownBackend, DeviceMemory. Prints
// "PASS <scenario>" and exits 0, or names the failed check and exits 1.
#include "kvxfer_trtllm.hpp"

#include <cctype>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <dlfcn.h>
#include <iostream>
#include <poll.h>
#include <sstream>
#include <sys/wait.h>
#include <unistd.h>

using namespace tensorrt_llm::executor::kv_cache;

namespace
{

char const* gRole = "agent0";

[[noreturn]] void fail(char const* file, int line, std::string const& what)
{
    std::fprintf(stderr, "[%s] FAIL %s:%d: %s\n", gRole, file, line, what.c_str());
    std::exit(1);
}

#define CHECK(cond)                                                                                                    \
    do                                                                                                                 \
    {                                                                                                                  \
        if (!(cond))                                                                                                   \
            fail(__FILE__, __LINE__, #cond);                                                                           \
    } while (0)

#define CHECK_EQ(a, b)                                                                                                 \
    do                                                                                                                 \
    {                                                                                                                  \
        auto const va_ = (a); /* copies: (a) may refer into a temporary */                                             \
        auto const vb_ = (b);                                                                                          \
        if (!(va_ == vb_))                                                                                             \
        {                                                                                                              \
            std::ostringstream os_;                                                                                    \
            os_ << #a << " == " << #b << " (" << va_ << " vs " << vb_ << ")";                                          \
            fail(__FILE__, __LINE__, os_.str());                                                                       \
        }                                                                                                              \
    } while (0)

// ---- the factory, as TensorRT-LLM finds it ----

// TensorRT-LLM's tests write BaseAgentConfig{name, true}.
BaseAgentConfig configFor(std::string const& name, bool useProgThread)
{
    BaseAgentConfig c{};
    c.mName = name;
    c.useProgThread = useProgThread;
    return c;
}

using Factory = std::unique_ptr<BaseTransferAgent> (*)(BaseAgentConfig const*);
std::string gWrapper;

std::unique_ptr<BaseTransferAgent> makeTransferAgent(BaseAgentConfig const& config)
{
    static Factory factory = [] {
        void* lib = dlopen(gWrapper.c_str(), RTLD_NOW | RTLD_LOCAL);
        if (lib == nullptr)
            fail(__FILE__, __LINE__, std::string("dlopen: ") + dlerror());
        auto* f = reinterpret_cast<Factory>(dlsym(lib, "createNixlTransferAgent"));
        if (f == nullptr)
            fail(__FILE__, __LINE__, "createNixlTransferAgent not found");
        return f;
    }();
    return factory(&config);
}

// The backend TRTLLM_NIXL_KVCACHE_BACKEND asks for (UCX when unset).
std::string expectedBackend()
{
    char const* v = std::getenv("TRTLLM_NIXL_KVCACHE_BACKEND");
    std::string s = v ? v : "UCX";
    for (auto& c : s)
        c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
    return s;
}

std::string backendOf(BaseTransferAgent& agent)
{
    auto* k = dynamic_cast<kvxfer::TrtllmAgent*>(&agent);
    CHECK(k != nullptr);
    return k->backend();
}

// ---- memory with a pattern per seed ----

std::vector<char> pattern(int seed, size_t len)
{
    std::vector<char> v(len);
    for (size_t i = 0; i < len; ++i)
        v[i] = static_cast<char>((seed * 37 + i * 13 + (i >> 8)) & 0xff);
    return v;
}

// Byte-for-byte comparison; names the first difference.
std::string compare(std::vector<char> const& got, std::vector<char> const& want)
{
    if (got.size() != want.size())
        return "size " + std::to_string(got.size()) + " != " + std::to_string(want.size());
    for (size_t i = 0; i < got.size(); ++i)
        if (got[i] != want[i])
            return "byte " + std::to_string(i) + ": " + std::to_string(static_cast<unsigned char>(got[i]))
                + " != " + std::to_string(static_cast<unsigned char>(want[i]));
    return "equal";
}

std::string hex(std::string const& s)
{
    static char const* d = "0123456789abcdef";
    std::string out;
    for (unsigned char c : s)
    {
        out += d[c >> 4];
        out += d[c & 15];
    }
    return out.empty() ? "-" : out;
}

std::string unhex(std::string const& h)
{
    if (h == "-")
        return {};
    std::string out;
    for (size_t i = 0; i + 1 < h.size(); i += 2)
        out += static_cast<char>(std::stoi(h.substr(i, 2), nullptr, 16));
    return out;
}

// Retries checkRemoteDescs for up to 10 s, as the original loops on it.
bool waitRemoteDescs(BaseTransferAgent& a, std::string const& peer, MemoryDescs const& descs)
{
    for (int i = 0; i < 10000; ++i)
    {
        if (a.checkRemoteDescs(peer, descs))
            return true;
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    return false;
}

// Polls getNotifiedSyncMessages for up to 10 s until it returns something.
std::unordered_map<std::string, std::vector<SyncMessage>> waitNotifs(BaseTransferAgent& a)
{
    for (int i = 0; i < 10000; ++i)
    {
        auto n = a.getNotifiedSyncMessages();
        if (!n.empty())
            return n;
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    return {};
}

// ---- GPU memory through the CUDA driver, loaded at run time ----

struct Cuda
{
    using Init = int (*)(unsigned);
    using DeviceGet = int (*)(int*, int);
    using Retain = int (*)(void**, int);
    using SetCurrent = int (*)(void*);
    using Alloc = int (*)(unsigned long long*, size_t);
    using Free = int (*)(unsigned long long);
    using HtoD = int (*)(unsigned long long, void const*, size_t);
    using DtoH = int (*)(void*, unsigned long long, size_t);
    Alloc alloc{};
    Free free{};
    HtoD htod{};
    DtoH dtoh{};

    Cuda()
    {
        void* lib = dlopen("libcuda.so.1", RTLD_NOW);
        if (lib == nullptr)
            fail(__FILE__, __LINE__, "DeviceMemory needs a CUDA driver (libcuda.so.1)");
        auto sym = [&](char const* n) {
            void* p = dlsym(lib, n);
            if (p == nullptr)
                fail(__FILE__, __LINE__, std::string("missing ") + n);
            return p;
        };
        int dev = 0;
        void* ctx = nullptr;
        CHECK(reinterpret_cast<Init>(sym("cuInit"))(0) == 0);
        CHECK(reinterpret_cast<DeviceGet>(sym("cuDeviceGet"))(&dev, 0) == 0);
        CHECK(reinterpret_cast<Retain>(sym("cuDevicePrimaryCtxRetain"))(&ctx, dev) == 0);
        CHECK(reinterpret_cast<SetCurrent>(sym("cuCtxSetCurrent"))(ctx) == 0);
        alloc = reinterpret_cast<Alloc>(sym("cuMemAlloc_v2"));
        free = reinterpret_cast<Free>(sym("cuMemFree_v2"));
        htod = reinterpret_cast<HtoD>(sym("cuMemcpyHtoD_v2"));
        dtoh = reinterpret_cast<DtoH>(sym("cuMemcpyDtoH_v2"));
    }
};

// ---- a child process hosting one agent ----

class Child
{
public:
    explicit Child(std::string const& argv0)
    {
        int in[2], out[2];
        CHECK(pipe(in) == 0 && pipe(out) == 0);
        mPid = fork();
        CHECK(mPid >= 0);
        if (mPid == 0)
        {
            dup2(in[0], 0);
            dup2(out[1], 1);
            close(in[0]);
            close(in[1]);
            close(out[0]);
            close(out[1]);
            execl(argv0.c_str(), argv0.c_str(), "child", gWrapper.c_str(), static_cast<char*>(nullptr));
            _exit(127);
        }
        close(in[0]);
        close(out[1]);
        mTo = in[1];
        mFrom = out[0];
    }

    // Sends a command and returns the answer's words; an answer of "err
    // ..." fails the test.
    std::vector<std::string> ask(std::string const& cmd)
    {
        std::string line = cmd + "\n";
        CHECK(write(mTo, line.data(), line.size()) == static_cast<ssize_t>(line.size()));
        std::string reply = readLine();
        std::istringstream is(reply);
        std::vector<std::string> words;
        for (std::string w; is >> w;)
            words.push_back(w);
        if (words.empty() || words[0] != "ok")
            fail(__FILE__, __LINE__, "child answered \"" + reply + "\" to \"" + cmd + "\"");
        return words;
    }

    // Ends the child and checks that it exited with 0.
    void finish()
    {
        ask("quit");
        close(mTo);
        int status = 0;
        CHECK(waitpid(mPid, &status, 0) == mPid);
        CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
        mPid = -1;
    }

    ~Child()
    {
        if (mPid > 0)
        {
            kill(mPid, SIGKILL);
            waitpid(mPid, nullptr, 0);
        }
    }

private:
    std::string readLine()
    {
        std::string line;
        while (true)
        {
            pollfd p{mFrom, POLLIN, 0};
            int r = poll(&p, 1, 30000);
            if (r <= 0)
                fail(__FILE__, __LINE__, "no answer from the child within 30 s");
            char c;
            ssize_t n = read(mFrom, &c, 1);
            if (n <= 0)
                fail(__FILE__, __LINE__, "the child closed its output (it failed, see above)");
            if (c == '\n')
                return line;
            line += c;
        }
    }

    pid_t mPid{-1};
    int mTo{-1};
    int mFrom{-1};
};

// Commands (words, messages in hex):
//   new NAME PROGTHREAD            -> ok BACKEND
//   reg SEED LEN dram|vram         -> ok ADDR        (buffer index = order)
//   conn                           -> ok IP:PORT
//   desc                           -> ok AGENTDESCHEX
//   load NAME IP:PORT              -> ok
//   check NAME ADDR LEN            -> ok             (waits until true)
//   xfer read|write BUF NAME ADDR LEN MSGHEX|-       -> ok
//   expect BUF SEED                -> ok             (byte-for-byte)
//   notify NAME MSGHEX             -> ok
//   notifs                         -> ok SENDER MSGHEX...  (exactly one sender)
//   invalidate NAME | dereg BUF | quit               -> ok
int childMain()
{
    gRole = "child";
    std::unique_ptr<BaseTransferAgent> agent;
    std::unique_ptr<Cuda> cuda;
    struct Buf
    {
        std::vector<char> host;
        unsigned long long dev = 0;
        bool vram = false;

        uintptr_t addr() const { return vram ? dev : reinterpret_cast<uintptr_t>(host.data()); }
    };
    std::vector<Buf> bufs;
    auto descOf = [&](size_t i) {
        auto& b = bufs.at(i);
        return MemoryDescs{b.vram ? MemoryType::kVRAM : MemoryType::kDRAM, {MemoryDesc{b.addr(), b.host.size(), 0}}};
    };
    std::string line;
    while (std::getline(std::cin, line))
    {
        std::istringstream is(line);
        std::string cmd;
        is >> cmd;
        std::ostringstream out;
        out << "ok";
        try
        {
            if (cmd == "new")
            {
                std::string name;
                int prog = 1;
                is >> name >> prog;
                gRole = strdup(name.c_str());
                BaseAgentConfig cfg = configFor(name, prog != 0);
                agent = makeTransferAgent(cfg);
                out << " " << backendOf(*agent);
            }
            else if (cmd == "reg")
            {
                int seed = 0;
                size_t len = 0;
                std::string kind;
                is >> seed >> len >> kind;
                Buf b;
                b.host = pattern(seed, len);
                if (kind == "vram")
                {
                    if (!cuda)
                        cuda = std::make_unique<Cuda>();
                    CHECK(cuda->alloc(&b.dev, len) == 0);
                    CHECK(cuda->htod(b.dev, b.host.data(), len) == 0);
                    b.vram = true;
                }
                bufs.push_back(std::move(b));
                agent->registerMemory(descOf(bufs.size() - 1));
                out << " " << bufs.back().addr();
            }
            else if (cmd == "conn")
            {
                out << " " << agent->getLocalConnectionInfo();
            }
            else if (cmd == "desc")
            {
                out << " " << hex(agent->getLocalAgentDesc().getBackendAgentDesc());
            }
            else if (cmd == "load")
            {
                std::string name, info;
                is >> name >> info;
                agent->loadRemoteAgent(name, info);
            }
            else if (cmd == "check")
            {
                std::string name;
                uintptr_t addr = 0;
                size_t len = 0;
                is >> name >> addr >> len;
                CHECK(waitRemoteDescs(*agent, name, MemoryDescs{MemoryType::kDRAM, {MemoryDesc{addr, len, 0}}}));
            }
            else if (cmd == "xfer")
            {
                std::string op, name, msg;
                size_t buf = 0, len = 0;
                uintptr_t addr = 0;
                is >> op >> buf >> name >> addr >> len >> msg;
                std::optional<SyncMessage> note;
                if (msg != "-")
                    note = unhex(msg);
                TransferRequest req{op == "read" ? TransferOp::kREAD : TransferOp::kWRITE, descOf(buf),
                    MemoryDescs{bufs.at(buf).vram ? MemoryType::kVRAM : MemoryType::kDRAM,
                        {MemoryDesc{addr, len, 0}}},
                    name, note};
                auto status = agent->submitTransferRequests(req);
                CHECK_EQ(static_cast<int>(status->wait()), static_cast<int>(TransferState::kSUCCESS));
                CHECK(status->isCompleted());
            }
            else if (cmd == "expect")
            {
                size_t buf = 0;
                int seed = 0;
                is >> buf >> seed;
                auto& b = bufs.at(buf);
                std::vector<char> got = b.host;
                if (b.vram)
                    CHECK(cuda->dtoh(got.data(), b.dev, got.size()) == 0);
                std::string c = compare(got, pattern(seed, got.size()));
                if (c != "equal")
                    fail(__FILE__, __LINE__, "buffer " + std::to_string(buf) + " vs pattern " + std::to_string(seed) + ": " + c);
                out << " " << got.size();
            }
            else if (cmd == "notify")
            {
                std::string name, msg;
                is >> name >> msg;
                agent->notifySyncMessage(name, unhex(msg));
            }
            else if (cmd == "notifs")
            {
                auto n = waitNotifs(*agent);
                CHECK_EQ(n.size(), size_t{1});
                out << " " << n.begin()->first;
                for (auto const& m : n.begin()->second)
                    out << " " << hex(m);
            }
            else if (cmd == "invalidate")
            {
                std::string name;
                is >> name;
                agent->invalidateRemoteAgent(name);
            }
            else if (cmd == "dereg")
            {
                size_t buf = 0;
                is >> buf;
                agent->deregisterMemory(descOf(buf));
            }
            else if (cmd == "quit")
            {
                agent.reset(); // before the memory it may still have registered
                for (auto& b : bufs)
                    if (b.vram)
                        cuda->free(b.dev);
                std::cout << "ok" << std::endl;
                return 0;
            }
            else
            {
                out.str("err unknown command " + cmd);
            }
        }
        catch (std::exception const& e)
        {
            out.str(std::string("err ") + e.what());
        }
        std::cout << out.str() << std::endl;
    }
    return 1;
}

// ---- scenarios; agent0 lives in this process ----

struct Local
{
    std::unique_ptr<BaseTransferAgent> agent;
    std::vector<std::vector<char>> bufs;

    MemoryDescs desc(size_t i) const
    {
        return MemoryDescs{MemoryType::kDRAM, {MemoryDesc{bufs.at(i)}}};
    }

    size_t reg(int seed, size_t len)
    {
        bufs.push_back(pattern(seed, len));
        agent->registerMemory(desc(bufs.size() - 1));
        return bufs.size() - 1;
    }
};

MemoryDescs remoteDesc(std::string const& addr, size_t len)
{
    return MemoryDescs{MemoryType::kDRAM, {MemoryDesc{static_cast<uintptr_t>(std::stoull(addr)), len, 0}}};
}

constexpr size_t kLen = 100;

// Basic (kWRITE) or Basic2 (kREAD): agent0 moves 100 bytes to or from agent1.
void basic(std::string const& argv0, TransferOp op, std::string const& wantBackend)
{
    Child c1(argv0);
    CHECK_EQ(c1.ask("new agent1 1").at(1), wantBackend);
    std::string addr1 = c1.ask("reg 1 " + std::to_string(kLen) + " dram").at(1);
    std::string info = c1.ask("conn").at(1);
    // The side channel listens where KVXFER_LISTEN says, if set.
    if (char const* listen = std::getenv("KVXFER_LISTEN"))
    {
        std::string host(listen);
        host = host.substr(0, host.rfind(':') + 1);
        CHECK_EQ(info.substr(0, host.size()), host);
    }

    Local a0{makeTransferAgent(configFor("agent0", true)), {}};
    CHECK_EQ(backendOf(*a0.agent), wantBackend);
    size_t m0 = a0.reg(10, kLen);
    a0.agent->loadRemoteAgent("agent1", info);
    auto remote = remoteDesc(addr1, kLen);
    CHECK(waitRemoteDescs(*a0.agent, "agent1", remote));

    TransferRequest req{op, a0.desc(m0), remote, "agent1"};
    auto status = a0.agent->submitTransferRequests(req);
    CHECK_EQ(static_cast<int>(status->wait()), static_cast<int>(TransferState::kSUCCESS));
    CHECK(status->isCompleted());
    if (op == TransferOp::kWRITE)
    {
        c1.ask("expect 0 10"); // agent1's memory now holds agent0's bytes
        CHECK_EQ(compare(a0.bufs[m0], pattern(10, kLen)), std::string("equal"));
    }
    else
    {
        CHECK_EQ(compare(a0.bufs[m0], pattern(1, kLen)), std::string("equal"));
        c1.ask("expect 0 1"); // and agent1's is unchanged
    }
    status.reset(); // a live request keeps its memory registered
    a0.agent->invalidateRemoteAgent("agent1");
    CHECK(!a0.agent->checkRemoteDescs("agent1", remote));
    a0.agent->deregisterMemory(a0.desc(m0));
    c1.ask("dereg 0");
    c1.finish();
}

// Connect: agent0 and agent2 both reach agent1 through its "ip:port".
void connect(std::string const& argv0)
{
    Child c1(argv0), c2(argv0);
    c1.ask("new agent1 1");
    c2.ask("new agent2 1");
    std::string addr1 = c1.ask("reg 1 " + std::to_string(kLen) + " dram").at(1);
    c2.ask("reg 20 " + std::to_string(kLen) + " dram");
    std::string info = c1.ask("conn").at(1);

    Local a0{makeTransferAgent(configFor("agent0", true)), {}};
    size_t m0 = a0.reg(10, kLen);
    a0.agent->loadRemoteAgent("agent1", info);
    auto remote = remoteDesc(addr1, kLen);
    CHECK(waitRemoteDescs(*a0.agent, "agent1", remote));
    auto status = a0.agent->submitTransferRequests(TransferRequest{TransferOp::kWRITE, a0.desc(m0), remote, "agent1"});
    CHECK_EQ(static_cast<int>(status->wait()), static_cast<int>(TransferState::kSUCCESS));
    c1.ask("expect 0 10");

    c2.ask("load agent1 " + info);
    c2.ask("check agent1 " + addr1 + " " + std::to_string(kLen));
    c2.ask("xfer write 0 agent1 " + addr1 + " " + std::to_string(kLen) + " -");
    c1.ask("expect 0 20");

    // Loading by "ip:port" checks the name of the agent found there.
    try
    {
        a0.agent->loadRemoteAgent("agent9", info);
        fail(__FILE__, __LINE__, "loading agent1's address as agent9 succeeded");
    }
    catch (kvxfer::Error const& e)
    {
        CHECK_EQ(std::string(e.what()), std::string("loadRemoteAgent: the agent there is \"agent1\", not \"agent9\""));
    }

    status.reset();
    a0.agent->invalidateRemoteAgent("agent1");
    c2.ask("invalidate agent1");
    a0.agent->deregisterMemory(a0.desc(m0));
    c1.ask("dereg 0");
    c2.ask("dereg 0");
    c1.finish();
    c2.finish();
}

// AgentDesc: agent0 loads agent1 from its AgentDesc (no side channel),
// which names the agent it describes.
void agentDesc(std::string const& argv0)
{
    Child c1(argv0);
    c1.ask("new agent1 1");
    std::string addr1 = c1.ask("reg 1 " + std::to_string(kLen) + " dram").at(1);
    AgentDesc desc{unhex(c1.ask("desc").at(1))};

    Local a0{makeTransferAgent(configFor("agent0", true)), {}};
    size_t m0 = a0.reg(10, kLen);
    try
    {
        a0.agent->loadRemoteAgent("agent7", desc);
        fail(__FILE__, __LINE__, "agent1's AgentDesc was loaded as agent7");
    }
    catch (kvxfer::Error const& e)
    {
        CHECK_EQ(std::string(e.what()), std::string("loadRemoteAgent: the agent there is \"agent1\", not \"agent7\""));
    }
    a0.agent->loadRemoteAgent("agent1", desc);
    auto remote = remoteDesc(addr1, kLen);
    CHECK(a0.agent->checkRemoteDescs("agent1", remote));
    auto status = a0.agent->submitTransferRequests(
        TransferRequest{TransferOp::kWRITE, a0.desc(m0), remote, "agent1", std::string("kv ready")});
    CHECK_EQ(static_cast<int>(status->wait(10000)), static_cast<int>(TransferState::kSUCCESS));
    CHECK_EQ(status->getLastStatusStr(), std::string("done"));
    c1.ask("expect 0 10");
    auto n = c1.ask("notifs");
    CHECK_EQ(n.size(), size_t{3});
    CHECK_EQ(n[1], std::string("agent0"));
    CHECK_EQ(unhex(n[2]), std::string("kv ready"));

    // A corrupted AgentDesc is refused with the reason.
    std::string bad = desc.getBackendAgentDesc();
    bad[bad.size() / 2] = static_cast<char>(bad[bad.size() / 2] ^ 0x55);
    try
    {
        a0.agent->loadRemoteAgent("agent1", AgentDesc{bad});
        fail(__FILE__, __LINE__, "a corrupted AgentDesc was loaded");
    }
    catch (kvxfer::Error const& e)
    {
        CHECK_EQ(static_cast<int>(e.status()), static_cast<int>(KVXFER_ERR_BAD_METADATA));
        std::cout << "corrupted AgentDesc: " << e.what() << std::endl;
    }

    status.reset();
    a0.agent->invalidateRemoteAgent("agent1");
    a0.agent->deregisterMemory(a0.desc(m0));
    c1.finish();
}

// SyncMessage: messages both ways, alone and around transfers.
void syncMessage(std::string const& argv0)
{
    Child c1(argv0);
    c1.ask("new agent1 1");
    c1.ask("reg 20 " + std::to_string(kLen) + " dram");                         // buffer 0 (memory0 there)
    std::string addr3 = c1.ask("reg 2 " + std::to_string(kLen) + " dram").at(1); // buffer 1 (memory1 there)
    std::string info1 = c1.ask("conn").at(1);

    Local a0{makeTransferAgent(configFor("agent0", true)), {}};
    size_t m0 = a0.reg(10, kLen);
    size_t m1 = a0.reg(1, kLen);
    a0.agent->loadRemoteAgent("agent1", info1);
    CHECK(waitRemoteDescs(*a0.agent, "agent1", remoteDesc(addr3, kLen)));

    std::string msg1 = "agent_sync_message";
    a0.agent->notifySyncMessage("agent1", msg1);
    auto status = a0.agent->submitTransferRequests(
        TransferRequest{TransferOp::kWRITE, a0.desc(m0), remoteDesc(addr3, kLen), "agent1"});
    CHECK_EQ(static_cast<int>(status->wait()), static_cast<int>(TransferState::kSUCCESS));
    auto n1 = c1.ask("notifs");
    CHECK_EQ(n1.size(), size_t{3});
    CHECK_EQ(n1[1], std::string("agent0"));
    CHECK_EQ(n1[2], hex(msg1));
    c1.ask("expect 1 10");

    std::string msg2 = "two_agent_sync_message";
    a0.agent->notifySyncMessage("agent1", msg2);
    auto n2 = c1.ask("notifs");
    CHECK_EQ(n2.size(), size_t{3});
    CHECK_EQ(n2[1], std::string("agent0"));
    CHECK_EQ(n2[2], hex(msg2));

    // agent1 loads agent0 by its connection info and answers.
    c1.ask("load agent0 " + a0.agent->getLocalConnectionInfo());
    std::string msg3 = "three_agent_sync_message";
    c1.ask("notify agent0 " + hex(msg3));
    auto n3 = waitNotifs(*a0.agent);
    CHECK_EQ(n3.size(), size_t{1});
    CHECK_EQ(n3["agent1"].size(), size_t{1});
    CHECK_EQ(n3["agent1"][0], msg3);

    // agent1 writes its memory0 into agent0's memory1, after a message.
    auto addr1 = std::to_string(reinterpret_cast<uintptr_t>(a0.bufs[m1].data()));
    c1.ask("check agent0 " + addr1 + " " + std::to_string(kLen));
    std::string msg4 = "four_agent_sync_message";
    c1.ask("notify agent0 " + hex(msg4));
    c1.ask("xfer write 0 agent0 " + addr1 + " " + std::to_string(kLen) + " -");
    auto n4 = waitNotifs(*a0.agent);
    CHECK_EQ(n4.size(), size_t{1});
    CHECK_EQ(n4["agent1"].size(), size_t{1});
    CHECK_EQ(n4["agent1"][0], msg4);
    CHECK_EQ(compare(a0.bufs[m1], pattern(20, kLen)), std::string("equal"));

    // A binary message (a serialized state: NUL bytes, high bytes) arrives
    // as sent; so does one bound to a transfer.
    std::string state("\x01\x00\x00\x00\xd2\x04\x00\x00" "127.0.0.1\x00\xff", 20);
    a0.agent->notifySyncMessage("agent1", state);
    auto n5 = c1.ask("notifs");
    CHECK_EQ(n5.size(), size_t{3});
    CHECK_EQ(unhex(n5[2]), state);
    auto status6 = a0.agent->submitTransferRequests(
        TransferRequest{TransferOp::kWRITE, a0.desc(m1), remoteDesc(addr3, kLen), "agent1", std::string("layer-7")});
    CHECK_EQ(static_cast<int>(status6->wait()), static_cast<int>(TransferState::kSUCCESS));
    auto n6 = c1.ask("notifs");
    CHECK_EQ(n6.size(), size_t{3});
    CHECK_EQ(unhex(n6[2]), std::string("layer-7"));
    c1.ask("expect 1 20");

    status.reset();
    status6.reset();
    a0.agent->invalidateRemoteAgent("agent1");
    c1.ask("invalidate agent0");
    a0.agent->deregisterMemory(a0.desc(m0));
    a0.agent->deregisterMemory(a0.desc(m1));
    c1.finish();
}

// LibfabricBackendBasic: TRTLLM_NIXL_KVCACHE_BACKEND=LIBFABRIC selects
// libfabric for both agents; the variable is restored afterwards.
void libfabricBackendBasic(std::string const& argv0)
{
    char const* old = std::getenv("TRTLLM_NIXL_KVCACHE_BACKEND");
    std::optional<std::string> saved = old ? std::optional<std::string>(old) : std::nullopt;
    CHECK(setenv("TRTLLM_NIXL_KVCACHE_BACKEND", "LIBFABRIC", 1) == 0);
    basic(argv0, TransferOp::kWRITE, "LIBFABRIC");
    basic(argv0, TransferOp::kREAD, "LIBFABRIC");
    if (saved)
        setenv("TRTLLM_NIXL_KVCACHE_BACKEND", saved->c_str(), 1);
    else
        unsetenv("TRTLLM_NIXL_KVCACHE_BACKEND");
    char const* now = std::getenv("TRTLLM_NIXL_KVCACHE_BACKEND");
    CHECK((now == nullptr) == !saved.has_value());
    if (saved)
        CHECK_EQ(std::string(now), *saved);
}

// An unknown backend name fails agent creation, naming the value.
void unknownBackend()
{
    CHECK(setenv("TRTLLM_NIXL_KVCACHE_BACKEND", "NOSUCH", 1) == 0);
    try
    {
        auto a = makeTransferAgent(configFor("agent0", true));
        fail(__FILE__, __LINE__, "an agent was made with backend NOSUCH");
    }
    catch (kvxfer::Error const& e)
    {
        std::cout << "error: " << e.what() << std::endl;
        CHECK_EQ(static_cast<int>(e.status()), static_cast<int>(KVXFER_ERR_UNSUPPORTED));
        // A build with the cuda feature lists CUDA_IPC after these.
        std::string want = "kvxfer_agent_new: unsupported backend \"NOSUCH\"; supported: UCX, LIBFABRIC";
        CHECK_EQ(std::string(e.what()).substr(0, want.size()), want);
    }
}

// DeviceMemory: 100 bytes of VRAM written from agent0's GPU buffer to
// agent1's.
void deviceMemory(std::string const& argv0)
{
    Child c1(argv0);
    c1.ask("new agent1 1");
    std::string addr1 = c1.ask("reg 1 " + std::to_string(kLen) + " vram").at(1);
    std::string info = c1.ask("conn").at(1);

    Cuda cuda;
    unsigned long long dev0 = 0;
    auto host0 = pattern(10, kLen);
    CHECK(cuda.alloc(&dev0, kLen) == 0);
    CHECK(cuda.htod(dev0, host0.data(), kLen) == 0);
    auto a0 = makeTransferAgent(configFor("agent0", true));
    MemoryDescs mem0{MemoryType::kVRAM, {MemoryDesc{static_cast<uintptr_t>(dev0), kLen, 0}}};
    a0->registerMemory(mem0);
    a0->loadRemoteAgent("agent1", info);
    MemoryDescs remote{MemoryType::kVRAM, {MemoryDesc{static_cast<uintptr_t>(std::stoull(addr1)), kLen, 0}}};
    CHECK(waitRemoteDescs(*a0, "agent1", remote));
    auto status = a0->submitTransferRequests(TransferRequest{TransferOp::kWRITE, mem0, remote, "agent1"});
    CHECK_EQ(static_cast<int>(status->wait()), static_cast<int>(TransferState::kSUCCESS));
    c1.ask("expect 0 10");
    status.reset();
    a0->invalidateRemoteAgent("agent1");
    a0->deregisterMemory(mem0);
    CHECK(cuda.free(dev0) == 0);
    c1.ask("dereg 0");
    c1.finish();
}

} // namespace

int main(int argc, char** argv)
{
    if (argc != 3)
    {
        std::fprintf(stderr, "usage: %s SCENARIO|child WRAPPER.so\n", argv[0]);
        return 2;
    }
    std::string scenario = argv[1];
    gWrapper = argv[2];
    std::string self = argv[0];
    try
    {
        if (scenario == "child")
            return childMain();
        if (scenario == "Basic")
            basic(self, TransferOp::kWRITE, expectedBackend());
        else if (scenario == "Basic2")
            basic(self, TransferOp::kREAD, expectedBackend());
        else if (scenario == "Connect")
            connect(self);
        else if (scenario == "AgentDesc")
            agentDesc(self);
        else if (scenario == "SyncMessage")
            syncMessage(self);
        else if (scenario == "LibfabricBackendBasic")
            libfabricBackendBasic(self);
        else if (scenario == "UnknownBackend")
            unknownBackend();
        else if (scenario == "DeviceMemory")
            deviceMemory(self);
        else
        {
            std::fprintf(stderr, "unknown scenario %s\n", scenario.c_str());
            return 2;
        }
    }
    catch (std::exception const& e)
    {
        fail(__FILE__, __LINE__, std::string("exception: ") + e.what());
    }
    std::printf("PASS %s\n", scenario.c_str());
    return 0;
}
