/* Error paths of the C ABI: every bad input gets its status code and the
 * exact message of kvxfer_last_error(); a good transfer still works after
 * all of them. Prints one line per check; exits 1 at the first mismatch. */
#define _POSIX_C_SOURCE 200809L
#include "kvxfer.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* The backends built in (the cuda feature adds CUDA_IPC). */
#ifndef BUILT_IN
#define BUILT_IN "UCX, LIBFABRIC"
#endif

static int checks;

static void expect(int line, kvxfer_status got, kvxfer_status want, const char *text)
{
    const char *msg = kvxfer_last_error();
    if (got != want || (want != KVXFER_OK && strcmp(msg, text) != 0)) {
        fprintf(stderr, "FAIL line %d: status %d (want %d), message\n  got:  %s\n  want: %s\n", line,
                (int)got, (int)want, msg, text);
        exit(1);
    }
    checks++;
    printf("ok %d %s\n", (int)got, want == KVXFER_OK ? "(success)" : msg);
}

#define EXPECT(call, status, text) expect(__LINE__, (call), (status), (text))
#define OK(call) expect(__LINE__, (call), KVXFER_OK, "")

static char name_buf[64];

/* A message with addresses filled in. */
static const char *fmt(const char *f, ...)
{
    static char buf[512];
    va_list ap;
    va_start(ap, f);
    vsnprintf(buf, sizeof buf, f, ap);
    va_end(ap);
    return buf;
}

static void collect(void *ctx, const char *peer, size_t peer_len, const uint8_t *msg, size_t len)
{
    (void)peer;
    (void)peer_len;
    (void)msg;
    *(size_t *)ctx += len;
}

int main(void)
{
    setvbuf(stdout, NULL, _IONBF, 0);
    kvxfer_agent *a = NULL, *b = NULL;
    kvxfer_config cfg;

    /* NULL pointers. */
    EXPECT(kvxfer_config_init(NULL), KVXFER_ERR_NULL_POINTER, "kvxfer_config_init: cfg is NULL");
    EXPECT(kvxfer_agent_new(NULL, NULL, &a), KVXFER_ERR_NULL_POINTER, "kvxfer_agent_new: name is NULL");
    EXPECT(kvxfer_agent_new("a", NULL, NULL), KVXFER_ERR_NULL_POINTER, "kvxfer_agent_new: out is NULL");
    EXPECT(kvxfer_register(NULL, 0x1000, 64, 0, KVXFER_DRAM), KVXFER_ERR_NULL_POINTER,
           "kvxfer_register: agent is NULL");
    EXPECT(kvxfer_xfer_post(NULL, NULL), KVXFER_ERR_NULL_POINTER, "kvxfer_xfer_post: xfer is NULL");
    EXPECT(kvxfer_xfer_status(NULL, NULL), KVXFER_ERR_NULL_POINTER, "kvxfer_xfer_status: xfer is NULL");
    OK(kvxfer_agent_free(NULL));
    OK(kvxfer_xfer_free(NULL));

    /* Configuration. */
    OK(kvxfer_config_init(&cfg));
    cfg.backend = "NOSUCH";
    EXPECT(kvxfer_agent_new("a", &cfg, &a), KVXFER_ERR_UNSUPPORTED,
           "kvxfer_agent_new: unsupported backend \"NOSUCH\"; supported: " BUILT_IN);
    cfg.backend = "UCX";
    cfg.listen = "not an address";
    EXPECT(kvxfer_agent_new("a", &cfg, &a), KVXFER_ERR_BACKEND,
           "kvxfer_agent_new: SIDE_CHANNEL error -1: listen on not an address: invalid socket address");
    cfg.listen = NULL;
    EXPECT(kvxfer_agent_new("", &cfg, &a), KVXFER_ERR_INVALID_ARGUMENT,
           "kvxfer_agent_new: agent name of 0 bytes: must be 1 to 64 bytes");
    EXPECT(kvxfer_agent_new("\xff", &cfg, &a), KVXFER_ERR_INVALID_ARGUMENT,
           "kvxfer_agent_new: name \"\\xff\" is not valid UTF-8");
    OK(kvxfer_agent_new("errors-a", &cfg, &a));
    OK(kvxfer_agent_new("errors-b", &cfg, &b));

    static uint8_t mem_a[4096], mem_b[4096];
    for (int i = 0; i < 4096; i++) {
        mem_a[i] = (uint8_t)(i * 7 + 1);
        mem_b[i] = 0;
    }
    uint64_t pa = (uint64_t)(uintptr_t)mem_a, pb = (uint64_t)(uintptr_t)mem_b;

    /* Registration. */
    EXPECT(kvxfer_register(a, pa, 4096, 0, 5), KVXFER_ERR_INVALID_ARGUMENT,
           "kvxfer_register: memory kind 5 is neither KVXFER_DRAM (0) nor KVXFER_VRAM (1)");
    EXPECT(kvxfer_register(a, pa, 0, 0, KVXFER_DRAM), KVXFER_ERR_INVALID_ARGUMENT,
           fmt("kvxfer_register: region [0x%" PRIx64 ", +0) is empty or overflows", pa));
    OK(kvxfer_register(a, pa, 4096, 0, KVXFER_DRAM));
    OK(kvxfer_register(b, pb, 4096, 0, KVXFER_DRAM));
    EXPECT(kvxfer_deregister(a, pa + 8), KVXFER_ERR_INVALID_DESC, fmt("kvxfer_deregister: memory [0x%" PRIx64 ", +0) is not registered", pa + 8));

    /* Output buffers. */
    size_t len = 0;
    char small[4];
    EXPECT(kvxfer_agent_listen_addr(a, small, sizeof small, &len), KVXFER_ERR_BUFFER_TOO_SMALL,
           "kvxfer_agent_listen_addr: buffer of 4 bytes is too small; 16 needed");
    EXPECT(kvxfer_agent_listen_addr(a, NULL, 8, &len), KVXFER_ERR_NULL_POINTER,
           "kvxfer_agent_listen_addr: buf (with cap > 0) is NULL");

    /* Metadata. */
    static uint8_t md[1 << 16];
    size_t md_len = 0;
    EXPECT(kvxfer_load_remote(a, (const uint8_t *)"garbage!", 8, NULL, 0, NULL), KVXFER_ERR_BAD_METADATA,
           "kvxfer_load_remote: bad metadata: not kvxfer metadata (bad magic)");
    OK(kvxfer_local_metadata(b, md, sizeof md, &md_len));
    EXPECT(kvxfer_load_remote(a, md, 3, NULL, 0, NULL), KVXFER_ERR_BAD_METADATA,
           "kvxfer_load_remote: bad metadata: truncated: needed 4 bytes, 3 available");
    OK(kvxfer_load_remote(a, md, md_len, name_buf, sizeof name_buf, &len));
    if (strcmp(name_buf, "errors-b") != 0 || len != 8) {
        fprintf(stderr, "FAIL: loaded peer is \"%s\"\n", name_buf);
        return 1;
    }

    /* Descriptors. */
    kvxfer_desc local = {pa, 4096, 0}, remote = {pb, 4096, 0};
    kvxfer_desc past = {pb + 4000, 200, 0}, empty = {pa, 0, 0}, stray = {0x10, 16, 0};
    kvxfer_desc wrap = {UINT64_MAX - 8, 16, 0}, half = {pb, 2048, 0};
    kvxfer_xfer *x = NULL;
    EXPECT(kvxfer_prepare(a, KVXFER_WRITE, &local, 1, &past, 1, "errors-b", NULL, 0, &x),
           KVXFER_ERR_INVALID_DESC,
           fmt("kvxfer_prepare: remote descriptor 0 (addr 0x%" PRIx64 ", len 200): leaves its registration [0x%" PRIx64 ", +4096)", pb + 4000, pb));
    EXPECT(kvxfer_prepare(a, KVXFER_WRITE, &empty, 1, &remote, 1, "errors-b", NULL, 0, &x),
           KVXFER_ERR_INVALID_DESC, fmt("kvxfer_prepare: local descriptor 0 (addr 0x%" PRIx64 ", len 0): zero length", pa));
    EXPECT(kvxfer_prepare(a, KVXFER_WRITE, &stray, 1, &stray, 1, "errors-b", NULL, 0, &x),
           KVXFER_ERR_INVALID_DESC,
           "kvxfer_prepare: local descriptor 0 (addr 0x10, len 16): memory is not registered");
    EXPECT(kvxfer_prepare(a, KVXFER_WRITE, &wrap, 1, &wrap, 1, "errors-b", NULL, 0, &x),
           KVXFER_ERR_INVALID_DESC,
           "kvxfer_prepare: local descriptor 0 (addr 0xfffffffffffffff7, len 16): address + length overflows 64 bits");
    EXPECT(kvxfer_prepare(a, KVXFER_WRITE, &local, 1, &half, 1, "errors-b", NULL, 0, &x),
           KVXFER_ERR_INVALID_ARGUMENT, "kvxfer_prepare: descriptor 0: local length 4096 differs from remote length 2048");
    EXPECT(kvxfer_prepare(a, KVXFER_WRITE, &local, 1, &remote, 0, "errors-b", NULL, 0, &x),
           KVXFER_ERR_INVALID_ARGUMENT, "kvxfer_prepare: descriptor count mismatch: 1 local, 0 remote");
    EXPECT(kvxfer_prepare(a, 7, &local, 1, &remote, 1, "errors-b", NULL, 0, &x), KVXFER_ERR_INVALID_ARGUMENT,
           "kvxfer_prepare: op 7 is neither KVXFER_READ (0) nor KVXFER_WRITE (1)");
    EXPECT(kvxfer_prepare(a, KVXFER_WRITE, NULL, 1, &remote, 1, "errors-b", NULL, 0, &x),
           KVXFER_ERR_NULL_POINTER, "kvxfer_prepare: local is NULL");
    EXPECT(kvxfer_prepare(a, KVXFER_WRITE, &local, 1, &remote, 1, "errors-b", NULL, 0, NULL),
           KVXFER_ERR_NULL_POINTER, "kvxfer_prepare: xfer is NULL");
    EXPECT(kvxfer_check_remote(a, "errors-b", &past, 1), KVXFER_ERR_INVALID_DESC,
           fmt("kvxfer_check_remote: remote descriptor 0 (addr 0x%" PRIx64 ", len 200): leaves its registration [0x%" PRIx64 ", +4096)", pb + 4000, pb));

    /* Unknown peer. */
    EXPECT(kvxfer_prepare(a, KVXFER_WRITE, &local, 1, &remote, 1, "nobody", NULL, 0, &x),
           KVXFER_ERR_UNKNOWN_PEER, "kvxfer_prepare: unknown remote agent \"nobody\"; load its metadata first");
    EXPECT(kvxfer_notify(a, "nobody", (const uint8_t *)"hi", 2), KVXFER_ERR_UNKNOWN_PEER,
           "kvxfer_notify: unknown remote agent \"nobody\"; load its metadata first");
    EXPECT(kvxfer_check_remote(a, "nobody", &remote, 1), KVXFER_ERR_UNKNOWN_PEER,
           "kvxfer_check_remote: unknown remote agent \"nobody\"; load its metadata first");
    EXPECT(kvxfer_connect(a, "127.0.0.1:1", NULL, 0, NULL), KVXFER_ERR_BACKEND,
           "kvxfer_connect: SIDE_CHANNEL error 111: connect to 127.0.0.1:1: Connection refused (os error 111)");

    /* A good transfer, then use after release. */
    OK(kvxfer_prepare(a, KVXFER_WRITE, &local, 1, &remote, 1, "errors-b", (const uint8_t *)"done", 4, &x));
    kvxfer_xfer_state st = KVXFER_XFER_PREPARED;
    OK(kvxfer_xfer_post(x, &st));
    OK(kvxfer_xfer_wait(x, 5000, &st));
    if (st != KVXFER_XFER_DONE || memcmp(mem_a, mem_b, 4096) != 0) {
        fprintf(stderr, "FAIL: the WRITE did not deliver the data (state %d)\n", (int)st);
        return 1;
    }
    EXPECT(kvxfer_deregister(a, pa), KVXFER_ERR_BUSY,
           fmt("kvxfer_deregister: region at 0x%" PRIx64 " is used by 1 segment(s) of live transfers; release them first", pa));
    OK(kvxfer_xfer_release(x));
    OK(kvxfer_xfer_release(x));
    EXPECT(kvxfer_xfer_post(x, &st), KVXFER_ERR_RELEASED, "kvxfer_xfer_post: the transfer was released");
    EXPECT(kvxfer_xfer_status(x, &st), KVXFER_ERR_RELEASED, "kvxfer_xfer_status: the transfer was released");
    EXPECT(kvxfer_xfer_wait(x, 0, &st), KVXFER_ERR_RELEASED, "kvxfer_xfer_wait: the transfer was released");
    OK(kvxfer_xfer_free(x));
    x = NULL;

    kvxfer_local_list ll;
    kvxfer_remote_list rl;
    uint32_t idx = 0;
    OK(kvxfer_prep_local(a, &local, 1, &ll));
    OK(kvxfer_prep_remote(a, "errors-b", &remote, 1, &rl));
    x = NULL;
    OK(kvxfer_make_xfer(a, KVXFER_READ, ll, &idx, 1, rl, &idx, 1, NULL, 0, &x));
    /* Waiting on a request never posted returns at once, without limit too. */
    OK(kvxfer_xfer_wait(x, 0, &st));
    OK(kvxfer_xfer_wait(x, -1, &st));
    if (st != KVXFER_XFER_PREPARED) {
        fprintf(stderr, "FAIL: a request never posted is in state %d\n", (int)st);
        return 1;
    }
    uint32_t bad = 3;
    EXPECT(kvxfer_make_xfer(a, KVXFER_READ, ll, &bad, 1, rl, &idx, 1, NULL, 0, &x), KVXFER_ERR_INVALID_ARGUMENT,
           "kvxfer_make_xfer: local index 0: 3 is out of range for a prepared list of 1");
    EXPECT(kvxfer_xfer_post(x, &st), KVXFER_ERR_RELEASED, "kvxfer_xfer_post: the transfer was released");
    OK(kvxfer_release_local(a, ll));
    EXPECT(kvxfer_make_xfer(a, KVXFER_READ, ll, &idx, 1, rl, &idx, 1, NULL, 0, &x), KVXFER_ERR_RELEASED,
           "kvxfer_make_xfer: prepared list handle #0.0 is stale or released");
    EXPECT(kvxfer_release_local(a, ll), KVXFER_ERR_RELEASED,
           "kvxfer_release_local: prepared list handle #0.0 is stale or released");
    OK(kvxfer_xfer_free(x));
    x = NULL;

    /* A request made before its peer was invalidated. */
    x = NULL;
    OK(kvxfer_prepare(a, KVXFER_WRITE, &local, 1, &remote, 1, "errors-b", NULL, 0, &x));
    OK(kvxfer_invalidate_remote(a, "errors-b"));
    EXPECT(kvxfer_xfer_post(x, &st), KVXFER_ERR_RELEASED,
           "kvxfer_xfer_post: metadata of remote agent \"errors-b\" was reloaded or invalidated since this "
           "request was prepared; prepare it again");
    EXPECT(kvxfer_invalidate_remote(a, "errors-b"), KVXFER_ERR_UNKNOWN_PEER,
           "kvxfer_invalidate_remote: unknown remote agent \"errors-b\"; load its metadata first");
    OK(kvxfer_xfer_free(x));
    x = NULL;

    /* The message arrived at b once. */
    size_t got = 0;
    for (int i = 0; i < 5000 && got == 0; i++) {
        if (kvxfer_take_notifications(b, collect, &got) != KVXFER_OK) {
            fprintf(stderr, "FAIL: kvxfer_take_notifications: %s\n", kvxfer_last_error());
            return 1;
        }
        nanosleep(&(struct timespec){0, 1000000}, NULL);
    }
    EXPECT(kvxfer_take_notifications(b, NULL, NULL), KVXFER_ERR_NULL_POINTER,
           "kvxfer_take_notifications: cb is NULL");
    if (got != 4) {
        fprintf(stderr, "FAIL: %zu notification bytes arrived, want 4\n", got);
        return 1;
    }

    /* Use after shutdown. */
    OK(kvxfer_agent_shutdown(a));
    EXPECT(kvxfer_register(a, pa, 4096, 0, KVXFER_DRAM), KVXFER_ERR_SHUT_DOWN,
           "kvxfer_register: agent is shut down");
    EXPECT(kvxfer_prepare(a, KVXFER_WRITE, &local, 1, &remote, 1, "errors-b", NULL, 0, &x),
           KVXFER_ERR_SHUT_DOWN, "kvxfer_prepare: agent is shut down");
    OK(kvxfer_agent_free(a));
    OK(kvxfer_agent_free(b));
    printf("PASS error paths: %d checks\n", checks);
    return 0;
}
