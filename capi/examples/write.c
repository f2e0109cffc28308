#include <stdio.h>
#include <string.h>
#include "kvxfer.h"

#define TRY(call)                                                  \
    if ((call) != KVXFER_OK) {                                     \
        fprintf(stderr, "%s\n", kvxfer_last_error());              \
        return 1;                                                  \
    }

int main(void) {
    /* Two agents in one process here; normally one per engine process. */
    kvxfer_agent *prefill = NULL, *decode = NULL;
    TRY(kvxfer_agent_new("prefill", NULL, &prefill));
    TRY(kvxfer_agent_new("decode", NULL, &decode));

    static char kv[4096], cache[4096];
    memset(kv, 7, sizeof kv);
    TRY(kvxfer_register(prefill, (uintptr_t)kv, sizeof kv, 0, KVXFER_DRAM));
    TRY(kvxfer_register(decode, (uintptr_t)cache, sizeof cache, 0, KVXFER_DRAM));

    /* prefill learns about decode from its metadata (or kvxfer_connect). */
    static uint8_t md[65536];
    size_t md_len = 0;
    TRY(kvxfer_local_metadata(decode, md, sizeof md, &md_len));
    TRY(kvxfer_load_remote(prefill, md, md_len, NULL, 0, NULL));

    kvxfer_desc local = {(uintptr_t)kv, sizeof kv, 0};
    kvxfer_desc remote = {(uintptr_t)cache, sizeof cache, 0};
    kvxfer_xfer *xfer = NULL;
    kvxfer_xfer_state state;
    TRY(kvxfer_prepare(prefill, KVXFER_WRITE, &local, 1, &remote, 1, "decode",
                       (const uint8_t *)"layer 0", 7, &xfer));
    TRY(kvxfer_xfer_post(xfer, &state));
    TRY(kvxfer_xfer_wait(xfer, 5000, &state));
    printf("%s\n", state == KVXFER_XFER_DONE && memcmp(kv, cache, sizeof kv) == 0
                       ? "written" : "not yet");

    kvxfer_xfer_free(xfer);
    kvxfer_agent_free(prefill);
    kvxfer_agent_free(decode);
    return 0;
}
