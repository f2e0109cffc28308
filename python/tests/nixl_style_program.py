#!/usr/bin/env python3
"""A two-process program written against NIXL's Python API.

It runs on NIXL (``--api nixl``) or on kvxfer (``--api kvxfer``); the
import is the only difference. It prints one JSON object with what it
observed: final transfer states, digests of the memory each transfer
wrote, notifications received and telemetry byte counts.
"""

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import sys
import time

import numpy as np


def import_api(api):
    if api == "kvxfer":
        from kvxfer.nixl import nixl_agent, nixl_agent_config
    else:
        try:
            from nixl._api import nixl_agent, nixl_agent_config
        except ImportError:
            from nixl_cu12._api import nixl_agent, nixl_agent_config
    return nixl_agent, nixl_agent_config


MIB = 1 << 20
BLOCK = 4096
BLOCKS = 16


def pattern(seed, n):
    return np.frombuffer(np.random.default_rng(seed).bytes(n), dtype=np.uint8).copy()


def digest(buf):
    return hashlib.sha256(buf.tobytes()).hexdigest()[:16]


def wait_done(agent, handle):
    deadline = time.monotonic() + 30
    state = agent.check_xfer_state(handle)
    while state == "PROC" and time.monotonic() < deadline:
        state = agent.check_xfer_state(handle)
    return state


def target(api, conn):
    nixl_agent, nixl_agent_config = import_api(api)
    agent = nixl_agent("target", nixl_agent_config(backends=["UCX"]))
    sink = np.zeros(MIB, np.uint8)
    source = pattern(2, BLOCKS * BLOCK)
    descs = agent.register_memory(
        np.array([[sink.ctypes.data, sink.nbytes, 0], [source.ctypes.data, source.nbytes, 0]],
                 dtype=np.uint64), "DRAM")
    conn.send((agent.get_agent_metadata(), sink.ctypes.data, source.ctypes.data))
    agent.add_remote_agent(conn.recv())
    conn.send("ready")
    # Wait for the initiator's four notifications.
    got = []
    deadline = time.monotonic() + 30
    while len(got) < 4 and time.monotonic() < deadline:
        for peer, msgs in agent.get_new_notifs().items():
            got += [(type(peer).__name__, str(peer), type(m).__name__, m.decode()) for m in msgs]
    conn.send({"notifs": got, "sink": digest(sink)})
    conn.recv()
    agent.deregister_memory(descs)
    conn.send("bye")
    sys.stdout.flush()
    os._exit(0)


def initiator(api, conn):
    nixl_agent, nixl_agent_config = import_api(api)
    agent = nixl_agent("initiator", nixl_agent_config(backends=["UCX"], capture_telemetry=True))
    out = {}
    md, sink_addr, source_addr = conn.recv()
    remote = agent.add_remote_agent(md)
    out["remote"] = [type(remote).__name__, remote.decode() if isinstance(remote, bytes) else remote]
    conn.send(agent.get_agent_metadata())
    assert conn.recv() == "ready"

    data = pattern(1, MIB)
    back = np.zeros(BLOCKS * BLOCK, np.uint8)
    regs = agent.register_memory([(data.ctypes.data, data.nbytes, 0, ""),
                                  (back.ctypes.data, back.nbytes, 0, "")], "DRAM")

    # 1. WRITE 1 MiB with initialize_xfer and a notification.
    h = agent.initialize_xfer(
        "WRITE",
        agent.get_xfer_descs([(data.ctypes.data, MIB, 0)], "DRAM"),
        agent.get_xfer_descs(np.array([[sink_addr, MIB, 0]], dtype=np.uint64), "DRAM"),
        remote, b"write-1")
    agent.transfer(h)
    out["write"] = wait_done(agent, h)
    tel = agent.get_xfer_telemetry(h)
    out["write_telemetry"] = [tel.totalBytes, tel.descCount]
    agent.release_xfer_handle(h)

    # 2. READ 16 blocks in reverse order from prepared lists (Nx5 strided
    # local side, Nx3 remote side).
    local = agent.prep_xfer_dlist(
        "NIXL_INIT_AGENT",
        np.array([[back.ctypes.data, BLOCK, 0, BLOCK, BLOCKS]], dtype=np.uint64), "DRAM")
    rrows = np.array([[source_addr + i * BLOCK, BLOCK, 0] for i in range(BLOCKS)],
                     dtype=np.uint64)
    rdl = agent.prep_xfer_dlist(remote, rrows, "DRAM")
    idx = list(range(BLOCKS))
    h = agent.make_prepped_xfer("READ", local, idx, rdl, idx[::-1], b"read-1")
    agent.transfer(h)
    out["read"] = wait_done(agent, h)
    out["read_digest"] = digest(back)
    out["expected_read_digest"] = digest(
        pattern(2, BLOCKS * BLOCK).reshape(BLOCKS, BLOCK)[::-1])

    # 3. Re-post it after scribbling over the destination.
    back[:] = 0
    agent.transfer(h)
    out["repost"] = wait_done(agent, h)
    out["repost_digest"] = digest(back)
    agent.release_xfer_handle(h)
    agent.release_dlist_handle(local)
    agent.release_dlist_handle(rdl)

    # 4. A standalone notification; the target checks what arrived.
    agent.send_notif(remote, b"bye")
    result = conn.recv()
    out["target_notifs"] = sorted(result["notifs"])
    out["target_sink_digest"] = result["sink"]
    out["expected_sink_digest"] = digest(data)
    out["descs_roundtrip"] = agent.deserialize_descs(agent.get_serialized_descs(
        agent.get_xfer_descs([(data.ctypes.data, 8, 0), (data.ctypes.data + 8, 8, 0)], "DRAM"))).descCount()
    conn.send("done")
    assert conn.recv() == "bye"
    agent.deregister_memory(regs)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--api", choices=["kvxfer", "nixl"], required=True)
    args = p.parse_args()
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe()
    proc = ctx.Process(target=target, args=(args.api, b), daemon=True)
    proc.start()
    out = initiator(args.api, a)
    proc.join(10)
    out["target_exit"] = proc.exitcode
    print(json.dumps(out, sort_keys=True), flush=True)
    # NIXL's bundled libnl-route crashes in its destructor at exit.
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
