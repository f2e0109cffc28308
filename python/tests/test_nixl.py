"""Two processes moving data through ``kvxfer.nixl`` (NIXL's Python API)."""

import time

import numpy as np
import pytest

import kvxfer
from kvxfer.nixl import nixl_agent, nixl_agent_config
from peer import Peer, pattern

KIB, MIB = 1 << 10, 1 << 20


@pytest.fixture(scope="module")
def agent(nixl_peer):
    a = nixl_agent("nixl-init", nixl_agent_config(enable_listen_thread=True, listen_port=0))
    yield a


def reg(agent, buf):
    return agent.register_memory(np.array([[buf.ctypes.data, buf.nbytes, 0]], np.uint64), "DRAM")


def load(agent, md):
    return agent.add_remote_agent(md)


def wait(agent, handle, timeout=30.0):
    deadline = time.monotonic() + timeout
    state = agent.check_xfer_state(handle)
    while state == "PROC" and time.monotonic() < deadline:
        state = agent.check_xfer_state(handle)
    return state


def test_backend_comes_from_the_environment(agent):
    assert list(agent.backends) == [kvxfer.backend_from_env()]


def test_explicit_backend_list():
    a = nixl_agent("explicit", nixl_agent_config(backends=["GDS", "LIBFABRIC", "UCX"]))
    assert list(a.backends) == ["LIBFABRIC"]
    with pytest.raises(RuntimeError) as e:
        nixl_agent("none", nixl_agent_config(backends=["GDS"]))
    assert str(e.value) == (
        "nixl_agent: no supported backend in ['GDS']; kvxfer.nixl offers "
        + ", ".join(repr(b) for b in kvxfer.BUILT_IN_BACKENDS.split(", "))
    )
    assert kvxfer.BUILT_IN_BACKENDS.startswith("UCX, LIBFABRIC")


@pytest.mark.parametrize("nbytes", [100, 64 * MIB], ids=["100B", "64MiB"])
def test_write_and_read_with_initialize_xfer(agent, nixl_peer, nbytes):
    peer = nixl_peer
    remote, md = peer.alloc("w", nbytes)
    name = load(agent, md)
    assert name == peer.name.encode()  # bytes, as NIXL returns it
    src = pattern(12, nbytes)
    r1 = reg(agent, src)
    local = agent.get_xfer_descs([(src.ctypes.data, nbytes, 0)], "DRAM")
    rdescs = agent.get_xfer_descs(np.array([[remote, nbytes, 0]], np.uint64), "DRAM")
    h = agent.initialize_xfer("WRITE", local, rdescs, name)
    assert agent.transfer(h) in ("DONE", "PROC")
    assert wait(agent, h) == "DONE"
    assert np.array_equal(peer.data("w"), src)
    agent.release_xfer_handle(h)

    dst = np.zeros(nbytes, np.uint8)
    r2 = reg(agent, dst)
    h = agent.initialize_xfer("READ", agent.get_xfer_descs([(dst.ctypes.data, nbytes, 0)], "DRAM"),
                              rdescs, name)
    assert agent.transfer(h) in ("DONE", "PROC")
    assert wait(agent, h) == "DONE"
    assert np.array_equal(dst, src)
    assert agent.query_xfer_backend(h) == list(agent.backends)[0]
    tel = agent.get_xfer_telemetry(h)
    assert (tel.totalBytes, tel.descCount) == (nbytes, 1)
    h.release()
    agent.deregister_memory(r1)
    agent.deregister_memory(r2)
    peer.call("free", "w")


@pytest.mark.parametrize("op", ["WRITE", "READ"])
def test_scattered_prepped_128_blocks(agent, nixl_peer, op):
    peer = nixl_peer
    blocks, bs = 128, 16 * KIB
    size = 2 * blocks * bs
    remote, md = peer.alloc("s", size, seed=4 if op == "READ" else None)
    name = load(agent, md)
    local = pattern(6, size) if op == "WRITE" else np.zeros(size, np.uint8)
    r = reg(agent, local)
    # Both lists: every 16 KiB slot; the request picks 128 scattered pairs.
    ldl = agent.prep_xfer_dlist("NIXL_INIT_AGENT",
                                np.array([[local.ctypes.data, bs, 0, bs, 2 * blocks]], np.uint64),
                                "DRAM")
    rrows = np.array([[remote + i * bs, bs, 0] for i in range(2 * blocks)], np.uint64)
    rdl = agent.prep_xfer_dlist(name, rrows, "DRAM")
    rng = np.random.default_rng(8)
    li = rng.permutation(2 * blocks)[:blocks].astype(np.int32)
    ri = rng.permutation(2 * blocks)[:blocks].tolist()
    h = agent.make_prepped_xfer(op, ldl, li, rdl, ri)
    assert agent.transfer(h) in ("DONE", "PROC")
    assert wait(agent, h) == "DONE"
    theirs = peer.data("s").reshape(2 * blocks, bs)
    mine = local.reshape(2 * blocks, bs)
    for a, b in zip(li, ri):
        assert np.array_equal(mine[a], theirs[b])
    agent.release_xfer_handle(h)
    agent.release_dlist_handle(ldl)
    agent.release_dlist_handle(rdl)
    agent.deregister_memory(r)
    peer.call("free", "s")


def test_notifications_after_data_and_repost(agent, nixl_peer):
    peer = nixl_peer
    nbytes = 2 * MIB
    remote, md = peer.alloc("n", nbytes)
    name = load(agent, md)
    src = pattern(22, nbytes)
    r = reg(agent, src)
    ldl = agent.prep_xfer_dlist("", [(src.ctypes.data, nbytes, 0)], "DRAM")
    rdl = agent.prep_xfer_dlist(name, [(remote, nbytes, 0)], "DRAM")
    h = agent.make_prepped_xfer("WRITE", ldl, [0], rdl, [0], notif_msg=b"req-1:done")
    for round_ in range(3):
        src[:] = pattern(100 + round_, nbytes)
        assert agent.transfer(h) in ("DONE", "PROC")
        notes, snap = peer.call("notifs", 10.0, "n")
        assert notes == {"nixl-init": [b"req-1:done"]}
        assert snap == src.tobytes()
        assert wait(agent, h) == "DONE"
    # transfer() with the request's own message is a re-post; another one
    # cannot be given per post.
    assert agent.transfer(h, b"req-1:done") in ("DONE", "PROC")
    assert wait(agent, h) == "DONE"
    peer.call("notifs", 10.0, None)
    with pytest.raises(NotImplementedError) as e:
        agent.transfer(h, b"other")
    assert str(e.value) == (
        "kvxfer.nixl: transfer is not supported: a notif_msg other than the request's; "
        "give it when making the request"
    )
    h.release()
    ldl.release()
    rdl.release()
    agent.deregister_memory(r)
    peer.call("free", "n")


def test_notifications_and_side_channel_metadata(agent, nixl_peer):
    peer = nixl_peer
    port = int(peer.listen_addr.rsplit(":", 1)[1])
    agent.remove_remote_agent(peer.name)
    assert not agent.check_remote_metadata(peer.name)
    agent.fetch_remote_metadata(peer.name, "127.0.0.1", port)
    assert agent.check_remote_metadata(peer.name)
    assert not peer.call("knows", "nixl-init")
    agent.send_local_metadata("127.0.0.1", port)
    assert peer.call("knows", "nixl-init")
    agent.invalidate_local_metadata("127.0.0.1", port)
    assert not peer.call("knows", "nixl-init")
    agent.send_local_metadata("127.0.0.1", port)
    assert peer.call("knows", "nixl-init")
    agent.send_notif(peer.name, b"hello from init")
    agent.send_notif(peer.name, "tag:7 payload")
    notes, _ = peer.call("notifs", 10.0, None)
    got = notes["nixl-init"]
    while len(got) < 2:
        more, _ = peer.call("notifs", 10.0, None)
        got += more.get("nixl-init", [])
    assert got == [b"hello from init", b"tag:7 payload"]


def test_check_remote_xfer_done_and_update_notifs():
    a = nixl_agent("notif-a")
    b = nixl_agent("notif-b")
    a.add_remote_agent(b.get_agent_metadata())
    b.add_remote_agent(a.get_agent_metadata())
    a.send_notif("notif-b", b"xfer-42 ok")
    a.send_notif("notif-b", b"other")
    deadline = time.monotonic() + 10
    while len(b.update_notifs().get("notif-a", [])) < 2:
        assert time.monotonic() < deadline
    assert b.notifs == {"notif-a": [b"xfer-42 ok", b"other"]}
    assert b.check_remote_xfer_done("notif-a", b"xfer-42")
    assert b.notifs == {"notif-a": [b"other"]}
    assert not b.check_remote_xfer_done("notif-a", b"xfer-42")
    assert not b.check_remote_xfer_done("notif-a", b"the")
    assert b.check_remote_xfer_done("notif-a", b"the", tag_is_prefix=False)
    assert b.notifs == {"notif-a": []}
    a.send_notif("notif-b", b"direct")
    got = {}
    while not got:
        got = b.get_new_notifs()
        assert time.monotonic() < deadline
    assert got == {"notif-a": [b"direct"]}


def test_descriptor_lists_and_serialization(agent):
    buf = np.zeros(64, np.uint8)
    d = agent.get_xfer_descs([(buf.ctypes.data, 64, 0), (buf.ctypes.data + 64, 32, 1)], "DRAM")
    assert len(d) == 2 and d.descCount() == 2 and d[1] == (buf.ctypes.data + 64, 32, 1)
    back = agent.deserialize_descs(agent.get_serialized_descs(d))
    assert back == d and back.getType() == "DRAM"
    r = agent.get_reg_descs([(buf.ctypes.data, 64, 0, "")], "DRAM")
    assert list(r) == [(buf.ctypes.data, 64, 0)]
    with pytest.raises(ValueError) as e:
        agent.get_xfer_descs([(1, 2)], "DRAM")
    assert str(e.value) == (
        "get_xfer_descs: descriptor 0 is (1, 2); expected a 3-tuple (address, length, device ID)"
    )
    with pytest.raises(ValueError) as e:
        agent.get_reg_descs(np.zeros((2, 3), np.uint64), "HBM")
    assert str(e.value) == "get_reg_descs: unknown mem_type 'HBM'; kvxfer moves 'DRAM' and 'VRAM'"
    with pytest.raises(ValueError) as e:
        agent.prep_xfer_dlist("", np.zeros((1, 5), np.uint64))
    assert str(e.value) == "Please specify a mem type for strided descriptors"


def test_errors_for_bad_descriptors_and_unknown_peers(agent, nixl_peer):
    peer = nixl_peer
    remote, md = peer.alloc("e", 4096)
    name = load(agent, md)
    buf = np.zeros(4096, np.uint8)
    r = reg(agent, buf)
    with pytest.raises(kvxfer.InvalidDescError) as e:
        agent.prep_xfer_dlist("NIXL_INIT_AGENT", [(buf.ctypes.data + 1, 4096, 0)], "DRAM")
    assert str(e.value) == (
        f"local descriptor 0 (addr {buf.ctypes.data + 1:#x}, len 4096): leaves its registration "
        f"[{buf.ctypes.data:#x}, +4096)"
    )
    with pytest.raises(kvxfer.InvalidDescError) as e:
        agent.prep_xfer_dlist(name, [(remote - 4096, 16, 0)], "DRAM")
    assert str(e.value) == (
        f"remote descriptor 0 (addr {remote - 4096:#x}, len 16): memory is not registered"
    )
    with pytest.raises(kvxfer.UnknownPeerError) as e:
        agent.prep_xfer_dlist("ghost", [(remote, 16, 0)], "DRAM")
    assert str(e.value) == 'unknown remote agent "ghost"; load its metadata first'
    with pytest.raises(kvxfer.UnknownPeerError):
        agent.initialize_xfer("WRITE", agent.get_xfer_descs([(buf.ctypes.data, 16, 0)], "DRAM"),
                              agent.get_xfer_descs([(remote, 16, 0)], "DRAM"), "ghost")
    with pytest.raises(KeyError):
        agent.nixl_ops["COPY"]
    with pytest.raises(ValueError) as e:
        agent.initialize_xfer("COPY", agent.get_xfer_descs([(buf.ctypes.data, 16, 0)], "DRAM"),
                              agent.get_xfer_descs([(remote, 16, 0)], "DRAM"), name)
    assert str(e.value) == 'unknown operation "COPY": expected "WRITE" or "READ"'
    with pytest.raises(NotImplementedError) as e:
        agent.prep_xfer_dlist("nixl-init", [(buf.ctypes.data, 16, 0)], "DRAM")
    assert str(e.value) == (
        "kvxfer.nixl: prep_xfer_dlist is not supported: loopback lists (agent_name is this agent)"
    )
    with pytest.raises(NotImplementedError) as e:
        agent.send_local_metadata()
    assert "send_local_metadata" in str(e.value)
    agent.deregister_memory(r)
    peer.call("free", "e")


def test_peer_death_turns_transfers_to_err():
    peer = Peer("nixl", name="nixl-doomed")
    try:
        a = nixl_agent("nixl-survivor")
        remote, md = peer.alloc("d", MIB)
        name = a.add_remote_agent(md)
        src = pattern(52, MIB)
        r = reg(a, src)
        h = a.initialize_xfer("WRITE", a.get_xfer_descs([(src.ctypes.data, MIB, 0)], "DRAM"),
                              a.get_xfer_descs([(remote, MIB, 0)], "DRAM"), name)
        a.transfer(h)
        assert wait(a, h) == "DONE"
        peer.die()
        outcome = None
        deadline = time.monotonic() + 15
        while outcome is None and time.monotonic() < deadline:
            try:
                a.transfer(h)
                if wait(a, h, 10.0) == "ERR":
                    outcome = "ERR"
            except kvxfer.RemoteDisconnectedError as e:
                outcome = str(e)
        assert outcome in ("ERR", 'remote agent "nixl-doomed" disconnected')
        h.release()
        a.deregister_memory(r)
    finally:
        peer.close()


def test_torch_tensors_as_nixl_descriptors(agent, nixl_peer):
    torch = pytest.importorskip("torch")
    peer = nixl_peer
    remote, md = peer.alloc("torch", 4 * 256)
    name = load(agent, md)
    tensors = [torch.full((256,), i + 1, dtype=torch.uint8) for i in range(4)]
    reg = agent.register_memory(tensors)
    assert list(reg) == [(t.data_ptr(), 256, 0) for t in tensors] and reg.getType() == "DRAM"
    remote_descs = agent.get_xfer_descs([(remote + i * 256, 256, 0) for i in range(4)], "DRAM")
    h = agent.initialize_xfer("WRITE", agent.get_xfer_descs(tensors), remote_descs, name)
    agent.transfer(h)
    assert wait(agent, h) == "DONE"
    assert peer.data("torch").tobytes() == b"".join(t.numpy().tobytes() for t in tensors)
    h.release()
    agent.deregister_memory(reg)
    peer.call("free", "torch")
