#!/usr/bin/env python3
"""NIXL Python API WRITE benchmark between two processes on one host.

The parent process is the initiator; it spawns a target process and talks to it
over a multiprocessing pipe (agent metadata, buffer addresses, verification).
For each case both sides allocate a DRAM buffer of blocks*stride bytes and
register it with a NIXL agent on the UCX backend. The initiator then times

  prep_ms   prep_xfer_dlist for the local and the remote descriptor lists, from
            Nx3 numpy arrays (one row per block; --strided: one Nx5 row),
  make_ms   make_prepped_xfer("WRITE", ...) for one request covering all blocks
            (no notification message),

and posts that one prepared handle over and over, one request in flight
(transfer(), then check_xfer_state() until "DONE", from Python): a few warmup
posts, then posts for --seconds (at least --min-iters, at most --max-iters, or
exactly --iters). It reports bandwidth (request bytes * posts / elapsed, in
1e9 bytes/s) and p50/p99 post-to-DONE latency. Warmup posts carry one random
pattern and the measured posts another; afterwards the target re-derives the
second pattern from its seed and checks every block, and that the gaps between
blocks were not written.

With UCX_TLS unset, UCX 1.23 (bundled with the wheel) writes host memory on one
host with cma (process_vm_writev); UCX_TLS=tcp pins the transport to tcp.

Run (creates the virtual environment on first use):

  scripts/nixl-bench.sh                      # all five cases
  scripts/nixl-bench.sh --case 1x4KiB        # one named case
  scripts/nixl-bench.sh --blocks 128 --block-size 16KiB --stride 32KiB

or directly: ~/.cache/kvxfer/nixl-venv/bin/python scripts/nixl-bench.py ...
One line per case is printed, e.g.

  nixl case=1x1MiB bytes=1048576 blocks=1 prep_ms=... make_ms=... iters=...
       GBps=... p50_us=... p99_us=... verified

A failed transfer or verification exits non-zero.
"""

import argparse
import ctypes
import importlib.metadata
import multiprocessing as mp
import os
import re
import signal
import sys
import time
import traceback

# NIXL logs at INFO to stdout by default; keep stdout for results.
os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")

import numpy as np  # noqa: E402

GAP_FILL = 0xA5  # initiator bytes between blocks; must never reach the target

# name -> (blocks, block size, stride), all in bytes
CASES = {
    "16384x4KiB@8KiB": (16384, 4096, 8192),
    "128x16KiB@32KiB": (128, 16384, 32768),
    "1x1MiB": (1, 1 << 20, 1 << 20),
    "1x16MiB": (1, 16 << 20, 16 << 20),
    "1x4KiB": (1, 4096, 4096),
}

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MIB": 1 << 20,
          "G": 1 << 30, "GIB": 1 << 30, "KB": 1000, "MB": 1000**2, "GB": 1000**3}


def parse_size(text):
    """Parse '4096', '4KiB', '16MiB', '1M' into bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"bad size: {text!r}")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def fmt_size(n):
    for unit, div in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n % div == 0:
            return f"{n // div}{unit}"
    return f"{n}B"


def case_name(blocks, block_size, stride):
    name = f"{blocks}x{fmt_size(block_size)}"
    return name if stride == block_size else f"{name}@{fmt_size(stride)}"


API = "nixl"  # or "kvxfer": kvxfer.nixl, the same API over kvxfer (--api)


def nixl_api():
    """Import the NIXL Python API (nixl-cu12 or nixl-cu13 wheel, or 'nixl'),
    or kvxfer's (--api kvxfer)."""
    if API == "kvxfer":
        return importlib.import_module("kvxfer.nixl")
    for module in ("nixl_cu12", "nixl_cu13", "nixl._api"):
        try:
            return importlib.import_module(module)
        except ImportError:
            pass
    raise ImportError("no NIXL Python package found (pip install nixl-cu12)")


def nixl_version():
    for dist in (("kvxfer",) if API == "kvxfer" else ("nixl-cu12", "nixl-cu13", "nixl")):
        try:
            return dist, importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return "nixl", "unknown"


def ucx_version():
    """Version of the libucp that NIXL loaded (best effort, after an agent exists)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libucp" in line}
        for path in paths:
            lib = ctypes.CDLL(path)
            lib.ucp_get_version_string.restype = ctypes.c_char_p
            return lib.ucp_get_version_string().decode()
    except (OSError, AttributeError):
        pass
    return "unknown"


def hard_exit(code):
    """Exit without running shared-library destructors.

    The libnl-route copy bundled with nixl-cu12 (pulled in by UCX's ib module)
    segfaults in its destructor at process exit, turning every exit code into
    139; flushing and calling os._exit skips it.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def make_agent(name):
    api = nixl_api()
    agent = api.nixl_agent(name, api.nixl_agent_config(backends=["UCX"]))
    if "UCX" not in agent.backends:
        raise RuntimeError("NIXL UCX backend could not be created")
    return agent


def alloc(nbytes, fill):
    buf = np.empty(nbytes, dtype=np.uint8)
    buf.fill(fill)  # touch every page before registration
    return buf


def reg_array(buf):
    return np.array([[buf.ctypes.data, buf.nbytes, 0]], dtype=np.uint64)


def block_view(buf, blocks, block_size, stride):
    return buf.reshape(blocks, stride)[:, :block_size]


def pattern(seed, nbytes):
    return np.frombuffer(np.random.default_rng(seed).bytes(nbytes), dtype=np.uint8)


def xfer_descs(addr, blocks, block_size, stride, strided):
    """Descriptors for the blocks: Nx3 (addr, len, dev) or one Nx5 strided row.

    NIXL indexes the blocks of a strided row like separate rows, 0..count-1.
    """
    if strided:
        return np.array([[addr, block_size, 0, stride, blocks]], dtype=np.uint64)
    descs = np.empty((blocks, 3), dtype=np.uint64)
    descs[:, 0] = addr + np.arange(blocks, dtype=np.uint64) * stride
    descs[:, 1] = block_size
    descs[:, 2] = 0
    return descs


# ---------------------------------------------------------------- target side

def target_main(conn, api):
    """Target process: expose buffers, then check what the initiator wrote."""
    global API
    API = api
    code = 0
    try:
        serve(conn)
    except EOFError:  # the initiator went away; it reports why
        pass
    except BaseException:  # noqa: BLE001 - report anything, then exit non-zero
        traceback.print_exc()
        code = 1
    hard_exit(code)


def serve(conn):
    agent = make_agent("target")
    conn.send(("hello", agent.get_agent_metadata()))
    while True:
        msg = conn.recv()
        if msg[0] == "quit":
            return
        if msg[0] == "peer":
            agent.add_remote_agent(msg[1])
            continue
        _, blocks, block_size, stride = msg
        buf = alloc(blocks * stride, 0)
        reg = agent.register_memory(reg_array(buf), "DRAM")
        conn.send(("ready", buf.ctypes.data, agent.get_agent_metadata()))
        msg = conn.recv()
        if msg[0] == "verify":
            conn.send(("result", verify(buf, blocks, block_size, stride, msg[1])))
        agent.deregister_memory(reg)


def verify(buf, blocks, block_size, stride, seed):
    """Return None when every block holds the seed's pattern and gaps are untouched."""
    got = block_view(buf, blocks, block_size, stride)
    want = pattern(seed, blocks * block_size).reshape(blocks, block_size)
    bad = np.flatnonzero((got != want).any(axis=1))
    if bad.size:
        return f"{bad.size} of {blocks} blocks differ (first: block {bad[0]})"
    if stride > block_size:
        gaps = buf.reshape(blocks, stride)[:, block_size:]
        dirty = np.flatnonzero(gaps.any(axis=1))
        if dirty.size:
            return f"{dirty.size} gaps after blocks were written (first: {dirty[0]})"
    return None


# ------------------------------------------------------------- initiator side

def post(agent, handle):
    """Post the handle once and poll it to completion; return nanoseconds."""
    t0 = time.perf_counter_ns()
    state = agent.transfer(handle)
    while state == "PROC":
        state = agent.check_xfer_state(handle)
    t1 = time.perf_counter_ns()
    if state != "DONE":
        raise RuntimeError(f"transfer ended in state {state}")
    return t1 - t0


def run_case(agent, conn, name, blocks, block_size, stride, seed, args):
    conn.send(("case", blocks, block_size, stride))
    msg = conn.recv()
    if msg[0] != "ready":
        raise RuntimeError(f"target: {msg}")
    _, remote_addr, remote_md = msg
    remote_name = agent.add_remote_agent(remote_md)

    buf = alloc(blocks * stride, GAP_FILL)
    reg = agent.register_memory(reg_array(buf), "DRAM")
    view = block_view(buf, blocks, block_size, stride)
    nbytes = blocks * block_size
    view[:] = pattern(seed, nbytes).reshape(blocks, block_size)

    local_descs = xfer_descs(buf.ctypes.data, blocks, block_size, stride, args.strided)
    remote_descs = xfer_descs(remote_addr, blocks, block_size, stride, args.strided)
    indices = np.arange(blocks, dtype=np.int32)  # a strided row still holds N descriptors

    t0 = time.perf_counter_ns()
    local = agent.prep_xfer_dlist("NIXL_INIT_AGENT", local_descs, "DRAM")
    remote = agent.prep_xfer_dlist(remote_name, remote_descs, "DRAM")
    t1 = time.perf_counter_ns()
    handle = agent.make_prepped_xfer("WRITE", local, indices, remote, indices)
    t2 = time.perf_counter_ns()
    prep_ms, make_ms = (t1 - t0) / 1e6, (t2 - t1) / 1e6

    for _ in range(args.warmup):
        post(agent, handle)

    seed += 1  # the measured posts carry a different pattern than the warmup
    view[:] = pattern(seed, nbytes).reshape(blocks, block_size)

    lat = np.empty(args.iters or args.max_iters, dtype=np.int64)
    iters = 0
    t_start = time.perf_counter_ns()
    deadline = t_start + int(args.seconds * 1e9)
    while iters < lat.size:
        lat[iters] = post(agent, handle)
        iters += 1
        if (not args.iters and iters >= args.min_iters and iters % 16 == 0
                and time.perf_counter_ns() >= deadline):
            break
    elapsed = time.perf_counter_ns() - t_start
    lat = lat[:iters]

    if args.overhead:
        measure_overhead(agent, handle, name)
    agent.release_xfer_handle(handle)
    agent.release_dlist_handle(local)
    agent.release_dlist_handle(remote)
    agent.deregister_memory(reg)

    conn.send(("verify", seed))
    msg = conn.recv()
    if msg[0] != "result":
        raise RuntimeError(f"target: {msg}")

    p50, p99 = np.percentile(lat, [50, 99]) / 1e3
    line = (f"{API} case={name} bytes={nbytes} blocks={blocks} prep_ms={prep_ms:.3f} "
            f"make_ms={make_ms:.3f} iters={iters} "
            f"GBps={nbytes * iters / elapsed:.3f} p50_us={p50:.1f} p99_us={p99:.1f}")
    print(f"{line} {'verified' if msg[1] is None else 'MISMATCH: ' + msg[1]}",
          flush=True)
    return msg[1] is None


def measure_overhead(agent, handle, name, rounds=5, posts=2000, polls=200000):
    """kvxfer only: what the Python layer (kvxfer.nixl and the native
    binding) adds over the Rust calls it makes.

    Rounds alternate between the Python loop (transfer(), then
    check_xfer_state() until "DONE") and the same loop run in Rust
    (XferRequest::post, then status until done); the difference of the
    median round trips is the cost of one transfer() plus the
    check_xfer_state() calls of a round. Then check_xfer_state() on a
    finished request against the Rust status call, per call.
    """
    req = handle._req
    py_lat, rust_lat = [], []
    for _ in range(rounds):
        for _ in range(posts):
            py_lat.append(post(agent, handle))
        rust_lat.extend(req.bench_post_poll(posts))
    polls_per_post = []
    for _ in range(200):  # how many check_xfer_state calls a round makes
        n, state = 0, agent.transfer(handle)
        while state == "PROC":
            state, n = agent.check_xfer_state(handle), n + 1
        polls_per_post.append(n)
    t0 = time.perf_counter_ns()
    for _ in range(polls):
        agent.check_xfer_state(handle)
    py_check = (time.perf_counter_ns() - t0) / polls
    rust_check = req.bench_status(polls) / polls
    py50, rust50 = np.median(py_lat) / 1e3, np.median(rust_lat) / 1e3
    print(f"{API} overhead case={name} python_p50_us={py50:.2f} rust_p50_us={rust50:.2f} "
          f"per_post_us={py50 - rust50:.2f} polls_per_post_p50={np.median(polls_per_post):.0f} "
          f"check_python_us={py_check / 1e3:.3f} check_rust_us={rust_check / 1e3:.3f} "
          f"check_added_us={(py_check - rust_check) / 1e3:.3f}", flush=True)


def selected_cases(args):
    if args.blocks or args.block_size or args.stride:
        blocks = args.blocks or 1
        block_size = args.block_size or 4096
        stride = args.stride or block_size
        if stride < block_size:
            sys.exit("--stride must be at least --block-size")
        return [(case_name(blocks, block_size, stride), blocks, block_size, stride)]
    names = args.case or list(CASES)
    for name in names:
        if name not in CASES:
            sys.exit(f"unknown case {name!r}; known: {', '.join(CASES)}")
    return [(name, *CASES[name]) for name in names]


def parse_args():
    p = argparse.ArgumentParser(
        description="NIXL (UCX backend) DRAM-to-DRAM WRITE between two processes.",
        epilog="Cases: " + ", ".join(CASES))
    p.add_argument("--case", action="append", metavar="NAME",
                   help="run this named case (repeatable; default: all)")
    p.add_argument("--blocks", type=int, help="custom case: number of blocks")
    p.add_argument("--block-size", type=parse_size, help="custom case: bytes per block")
    p.add_argument("--stride", type=parse_size,
                   help="custom case: distance between block starts (default: block size)")
    p.add_argument("--strided", action="store_true",
                   help="describe the blocks as one Nx5 strided row (NIXL >= 1.5) "
                        "instead of one Nx3 row per block")
    p.add_argument("--warmup", type=int, default=10, help="warmup posts (default 10)")
    p.add_argument("--seconds", type=float, default=2.0,
                   help="measure posts for this long per case (default 2)")
    p.add_argument("--min-iters", type=int, default=20)
    p.add_argument("--max-iters", type=int, default=1000000)
    p.add_argument("--iters", type=int, help="measured posts (overrides --seconds)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--api", choices=["nixl", "kvxfer"], default="nixl",
                   help="run on NIXL (default) or on kvxfer.nixl, the same API over kvxfer")
    p.add_argument("--overhead", action="store_true",
                   help="kvxfer: also measure what the Python layer adds per transfer + "
                        "check_xfer_state over the Rust calls")
    p.add_argument("--timeout", type=int, default=300,
                   help="give up on a case after this many seconds (default 300)")
    return p.parse_args()


def main():
    global API
    args = parse_args()
    API = args.api
    if args.overhead and API != "kvxfer":
        sys.exit("--overhead measures kvxfer's Python layer; use it with --api kvxfer")
    cases = selected_cases(args)
    dist, version = nixl_version()

    ctx = mp.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    target = ctx.Process(target=target_main, args=(child_conn, API), daemon=True)
    target.start()
    child_conn.close()

    def on_alarm(signum, frame):
        raise TimeoutError(f"case took longer than {args.timeout} s")

    signal.signal(signal.SIGALRM, on_alarm)
    ok = True
    try:
        agent = make_agent("initiator")
        msg = conn.recv()
        if msg[0] != "hello":
            raise RuntimeError(f"target: {msg}")
        conn.send(("peer", agent.get_agent_metadata()))
        print(f"{API} version={version} dist={dist} ucx={ucx_version()} backend=UCX "
              f"UCX_TLS={os.environ.get('UCX_TLS', '(unset)')} "
              f"descs={'strided' if args.strided else 'list'} "
              f"python={sys.version.split()[0]}", flush=True)
        for i, (name, blocks, block_size, stride) in enumerate(cases):
            signal.alarm(args.timeout)
            seed = args.seed + 2 * i
            ok &= run_case(agent, conn, name, blocks, block_size, stride, seed, args)
            signal.alarm(0)
        conn.send(("quit",))
    except (EOFError, ConnectionError):
        print(f"{API} error: target process went away", file=sys.stderr)
        ok = False
    except (RuntimeError, TimeoutError) as e:
        print(f"{API} error: {e}", file=sys.stderr)
        ok = False
    except Exception:  # noqa: BLE001 - NIXL raises its own exception types
        traceback.print_exc()
        ok = False
    finally:
        signal.alarm(0)
        conn.close()
        target.join(timeout=10)
        if target.is_alive():
            target.kill()
    if target.exitcode not in (0, None) and ok:
        print(f"{API} error: target exited with {target.exitcode}", file=sys.stderr)
        ok = False
    hard_exit(0 if ok else 1)


if __name__ == "__main__":
    main()
