"""Two processes moving data through the Pythonic ``kvxfer`` API."""

import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import kvxfer
from peer import Peer, pattern

KIB, MIB = 1 << 10, 1 << 20


@pytest.fixture(scope="module")
def agent(kvxfer_peer):
    a = kvxfer.Agent("kv-init")
    yield a
    a.close()


def connect(agent, peer):
    """Loads the target's metadata over its side channel (after it
    registered more memory)."""
    name = agent.connect(peer.listen_addr)
    assert name == peer.name
    return name


def test_backend_comes_from_the_environment(agent):
    assert agent.backend == kvxfer.backend_from_env()


@pytest.mark.parametrize("nbytes", [100, 64 * MIB], ids=["100B", "64MiB"])
def test_write_then_read_whole_buffer(agent, kvxfer_peer, nbytes):
    peer = kvxfer_peer
    remote, _ = peer.alloc("w", nbytes)
    name = connect(agent, peer)
    src = pattern(11, nbytes)
    region = agent.register(src)
    req = agent.transfer("WRITE", [region.desc()], [(remote, nbytes)], name)
    assert req.wait(30.0)
    assert req.status() == "DONE"
    assert np.array_equal(peer.data("w"), src)

    # READ it back into a fresh buffer.
    dst = np.zeros(nbytes, np.uint8)
    back = agent.register(dst)
    with agent.transfer("READ", [back.desc()], [(remote, nbytes)], name) as rd:
        assert rd.wait(30.0)
    assert np.array_equal(dst, src)
    req.release()
    agent.deregister(region)
    agent.deregister(back)
    peer.call("free", "w")


@pytest.mark.parametrize("op", ["WRITE", "READ"])
def test_scattered_128_blocks_of_16k(agent, kvxfer_peer, op):
    """128 x 16 KiB blocks at scattered places on both sides."""
    peer = kvxfer_peer
    blocks, bs = 128, 16 * KIB
    size = blocks * 2 * bs
    remote, _ = peer.alloc("s", size, seed=3 if op == "READ" else None)
    name = connect(agent, peer)
    local = pattern(5, size) if op == "WRITE" else np.zeros(size, np.uint8)
    region = agent.register(local)
    rng = np.random.default_rng(7)
    lslots = rng.permutation(2 * blocks)[:blocks]
    rslots = rng.permutation(2 * blocks)[:blocks]
    ldescs = [(region.addr + int(s) * bs, bs) for s in lslots]
    rdescs = np.array([[remote + int(s) * bs, bs, 0] for s in rslots], dtype=np.uint64)
    req = agent.transfer(op, ldescs, rdescs, name)
    assert req.wait(30.0)
    theirs = peer.data("s")
    for ls, rs in zip(lslots, rslots):
        lo, ro = int(ls) * bs, int(rs) * bs
        assert np.array_equal(local[lo : lo + bs], theirs[ro : ro + bs])
    tel = req.telemetry()
    assert tel.bytes == blocks * bs and tel.descs == blocks
    assert tel.duration_ns is not None and tel.duration_ns >= 0
    req.release()
    agent.deregister(region)
    peer.call("free", "s")


def test_notification_arrives_after_the_data(agent, kvxfer_peer):
    peer = kvxfer_peer
    nbytes = 4 * MIB
    remote, _ = peer.alloc("n", nbytes)
    name = connect(agent, peer)
    src = pattern(21, nbytes)
    region = agent.register(src)
    req = agent.transfer("WRITE", [region.desc()], [(remote, nbytes)], name,
                         notification=b"layer-7 done")
    notes, snap = peer.call("notifs", 10.0, "n")
    assert notes == {"kv-init": [b"layer-7 done"]}
    assert snap == src.tobytes()
    assert req.wait(10.0)
    # A notification outside a transfer.
    agent.notify(name, "standalone")
    notes, _ = peer.call("notifs", 10.0, None)
    assert notes == {"kv-init": [b"standalone"]}
    req.release()
    agent.deregister(region)
    peer.call("free", "n")


def test_prepared_lists_by_index_and_repost(agent, kvxfer_peer):
    peer = kvxfer_peer
    blocks, bs = 32, 4 * KIB
    remote, _ = peer.alloc("p", blocks * bs)
    name = connect(agent, peer)
    local = pattern(31, blocks * bs)
    region = agent.register(local)
    lp = agent.prep_local(kvxfer.Strided(region.addr, bs, bs, blocks))
    rp = agent.prep_remote(name, [(remote + i * bs, bs) for i in range(blocks)])
    assert len(lp) == blocks and len(rp) == blocks and rp.peer == name
    # Local block i goes to remote block blocks-1-i, even blocks only.
    li = list(range(0, blocks, 2))
    ri = [blocks - 1 - i for i in li]
    req = agent.make_transfer("WRITE", lp, li, rp, np.array(ri, dtype=np.int64))
    assert req.status() == "PREPARED"
    assert req.post() in ("IN_PROGRESS", "DONE")
    assert req.wait(10.0)
    theirs = peer.data("p").reshape(blocks, bs)
    mine = local.reshape(blocks, bs)
    for i, r in zip(li, ri):
        assert np.array_equal(theirs[r], mine[i])
    untouched = sorted(set(range(blocks)) - set(ri))
    assert not theirs[untouched].any()

    # Re-post the same request with new local contents.
    local[:] = pattern(32, blocks * bs)
    assert req.repost() in ("IN_PROGRESS", "DONE")
    assert req.wait(10.0)
    theirs = peer.data("p").reshape(blocks, bs)
    for i, r in zip(li, ri):
        assert np.array_equal(theirs[r], mine[i])

    # Index out of range, by name.
    with pytest.raises(kvxfer.IndexOutOfRangeError) as e:
        agent.make_transfer("WRITE", lp, [blocks], rp, [0])
    assert str(e.value) == (
        f"local index 0: {blocks} is out of range for a prepared list of {blocks}"
    )
    req.release()
    with pytest.raises(kvxfer.StaleHandleError):
        req.post()
    lp.release()
    rp.release()
    agent.deregister(region)
    peer.call("free", "p")


def test_errors_name_the_bad_value(agent, kvxfer_peer):
    peer = kvxfer_peer
    remote, _ = peer.alloc("e", 4096)
    name = connect(agent, peer)
    buf = np.zeros(4096, np.uint8)
    region = agent.register(buf)

    with pytest.raises(kvxfer.InvalidDescError) as e:
        agent.transfer("WRITE", [(region.addr + 4096, 16)], [(remote, 16)], name)
    assert str(e.value) == (
        f"local descriptor 0 (addr {region.addr + 4096:#x}, len 16): memory is not registered"
    )
    assert isinstance(e.value, kvxfer.KvxferError)

    with pytest.raises(kvxfer.InvalidDescError) as e:
        agent.transfer("READ", [region.desc(0, 16), region.desc(16, 16)],
                       [(remote, 16), (remote + 4090, 16)], name)
    assert str(e.value) == (
        f"remote descriptor 1 (addr {remote + 4090:#x}, len 16): leaves its registration "
        f"[{remote:#x}, +4096)"
    )

    with pytest.raises(kvxfer.UnknownPeerError) as e:
        agent.transfer("WRITE", [region.desc()], [(remote, 4096)], "no-such-agent")
    assert str(e.value) == 'unknown remote agent "no-such-agent"; load its metadata first'

    with pytest.raises(kvxfer.LengthMismatchError) as e:
        agent.transfer("WRITE", [region.desc(0, 100)], [(remote, 200)], name)
    assert str(e.value) == "descriptor 0: local length 100 differs from remote length 200"

    with pytest.raises(ValueError) as e:
        agent.transfer("COPY", [region.desc()], [(remote, 4096)], name)
    assert str(e.value) == 'unknown operation "COPY": expected "WRITE" or "READ"'

    with pytest.raises(kvxfer.OverlappingRegistrationError):
        agent.register(buf[100:200])

    with pytest.raises(ValueError) as e:
        agent.register(b"read-only bytes")
    assert str(e.value) == (
        "bytes memory is read-only; transfers write into registered memory, "
        "so pass a writable buffer"
    )
    with pytest.raises(kvxfer.NotRegisteredError):
        agent.deregister(np.zeros(8, np.uint8))
    agent.deregister(region)
    peer.call("free", "e")


def test_threads_share_an_agent_and_waits_release_the_gil(agent, kvxfer_peer):
    peer = kvxfer_peer
    threads_n, nbytes = 4, 256 * KIB
    remote, _ = peer.alloc("t", threads_n * nbytes)
    name = connect(agent, peer)
    src = pattern(41, threads_n * nbytes)
    region = agent.register(src)
    errors = []

    def worker(i):
        try:
            for _ in range(20):
                off = i * nbytes
                r = agent.transfer("WRITE", [region.desc(off, nbytes)],
                                   [(remote + off, nbytes)], name)
                assert r.wait(10.0)
                r.release()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads_n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not errors, errors
    assert np.array_equal(peer.data("t"), src)

    # While one thread waits 0.5 s for a notification inside kvxfer, another
    # Python thread keeps running.
    ticks = [0]
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            ticks[0] += 1

    t = threading.Thread(target=spin)
    t.start()
    before = ticks[0]
    t0 = time.monotonic()
    assert agent.wait_notifications(0.5) == {}
    waited = time.monotonic() - t0
    during = ticks[0] - before
    stop.set()
    t.join()
    assert waited >= 0.45
    assert during > 1000, f"the other thread advanced only {during} times"
    agent.deregister(region)
    peer.call("free", "t")


def test_peer_death_fails_transfers():
    peer = Peer("kvxfer", name="doomed")
    try:
        with kvxfer.Agent("survivor", kvxfer.Config(transfer_timeout=2.0)) as a:
            remote, md = peer.alloc("d", MIB)
            name = a.load(md)
            src = pattern(51, MIB)
            region = a.register(src)
            req = a.prepare("WRITE", [region.desc()], [(remote, MIB)], name)
            req.post()
            assert req.wait(10.0)
            peer.die()
            t0 = time.monotonic()
            failed = None
            while time.monotonic() - t0 < 15:
                try:
                    req.repost()
                    req.wait(5.0)
                except kvxfer.KvxferError as e:
                    failed = e
                    break
            assert failed is not None, "transfers to a dead peer kept succeeding"
            assert isinstance(failed, (kvxfer.RemoteDisconnectedError, kvxfer.TimedOutError,
                                       kvxfer.BackendError)), repr(failed)
            if isinstance(failed, kvxfer.RemoteDisconnectedError):
                assert str(failed) == 'remote agent "doomed" disconnected'
            req.release()
            a.deregister(region)
    finally:
        peer.close()


def test_import_does_not_import_torch():
    code = "import sys, kvxfer, kvxfer.nixl; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_torch_tensors_register_and_move(agent, kvxfer_peer):
    torch = pytest.importorskip("torch")
    peer = kvxfer_peer
    remote, _ = peer.alloc("torch", 4096)
    name = connect(agent, peer)
    t = torch.arange(1024, dtype=torch.int32)
    region = agent.register(t)
    assert (region.length, region.kind, region.device) == (4096, "DRAM", 0)
    assert agent.transfer("WRITE", [region.desc()], [(remote, 4096)], name).wait(10.0)
    assert peer.data("torch").tobytes() == t.numpy().tobytes()
    agent.deregister(region)
    peer.call("free", "torch")


def test_type_stubs_match_the_native_module():
    import ast
    import os

    from kvxfer import _kvxfer

    stub = os.path.join(os.path.dirname(kvxfer.__file__), "_kvxfer.pyi")
    tree = ast.parse(open(stub).read())
    declared = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            declared[node.name] = {
                n.name for n in node.body if isinstance(n, ast.FunctionDef)
            } - {"__init__", "__len__"}
        elif isinstance(node, ast.AnnAssign):
            declared[node.target.id] = None
    public = {n for n in dir(_kvxfer) if not n.startswith("_")}
    assert set(declared) == public
    for name, methods in declared.items():
        if methods:
            obj = getattr(_kvxfer, name)
            missing = {m for m in methods if not hasattr(obj, m)}
            assert not missing, f"{name}: {missing}"
            real = {m for m in dir(obj) if not m.startswith("_")}
            assert real == methods, f"{name}: not in the stub: {real - methods}"


def test_readme_python_example_runs_as_written(tmp_path):
    import os

    readme = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")
    text = open(readme).read()
    start = text.index("```python\n", text.index("<!-- python-example -->")) + len("```python\n")
    code = text[start : text.index("```\n", start)]
    script = tmp_path / "example.py"
    script.write_text(code)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "decode-0 has all 128 blocks\n"


@pytest.mark.parametrize(
    "env,want",
    [
        ({"TRTLLM_NIXL_KVCACHE_BACKEND": "LIBFABRIC"}, "LIBFABRIC"),
        ({"KVXFER_BACKEND": "UCX", "TRTLLM_NIXL_KVCACHE_BACKEND": "LIBFABRIC"}, "UCX"),
        ({}, "UCX"),
    ],
)
def test_backend_selection_order(env, want):
    import os

    code = (
        "import kvxfer; from kvxfer.nixl import nixl_agent; "
        "print(kvxfer.Agent('sel', kvxfer.Config(listen=None)).backend, "
        "list(nixl_agent('sel2').backends))"
    )
    base = {k: v for k, v in os.environ.items()
            if k not in ("KVXFER_BACKEND", "TRTLLM_NIXL_KVCACHE_BACKEND")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**base, **env}, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [want, f"['{want}']"]


def test_unknown_backend_is_named():
    with pytest.raises(kvxfer.UnsupportedBackendError) as e:
        kvxfer.Agent("bad", kvxfer.Config(backend="GDS", listen=None))
    assert str(e.value).startswith('unsupported backend "GDS"; supported: UCX, LIBFABRIC')


def test_metrics_endpoint_counts_the_transfers(kvxfer_peer):
    import urllib.request

    peer = kvxfer_peer
    a = kvxfer.Agent("kv-metrics", kvxfer.Config(metrics_addr="127.0.0.1:0"))
    try:
        assert a.metrics_addr is not None
        remote, _ = peer.alloc("m", 4096)
        name = connect(a, peer)
        src = pattern(5, 4096)
        region = a.register(src)
        for _ in range(3):
            with a.transfer("WRITE", [region.desc()], [(remote, 4096)], name) as req:
                assert req.wait(30.0)
        assert np.array_equal(peer.data("m"), src)
        labels = f'agent="kv-metrics",backend="{a.backend}",peer="{name}"'
        want = [
            f'kvxfer_transferred_bytes_total{{{labels},direction="write"}} 12288',
            f'kvxfer_transfers_total{{{labels},direction="write"}} 3',
            f'kvxfer_transfers_total{{{labels},direction="read"}} 0',
        ]
        text = a.metrics_text()
        with urllib.request.urlopen(f"http://{a.metrics_addr}/metrics", timeout=10) as r:
            assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            served = r.read().decode()
        for line in want:
            assert line in text.splitlines(), text
            assert line in served.splitlines(), served
        a.deregister(region)
        peer.call("free", "m")
    finally:
        a.close()
    # Without an address (and no KVXFER_METRICS_ADDR), nothing is served.
    b = kvxfer.Agent("kv-no-metrics", kvxfer.Config(listen=None, metrics_addr=""))
    try:
        assert b.metrics_addr is None
    finally:
        b.close()
