"""A target process for the two-process tests.

``Peer(api)`` spawns a process running an agent through ``kvxfer``
(``api="kvxfer"``) or ``kvxfer.nixl`` (``api="nixl"``) and serves commands
over a pipe: allocate and register buffers, fill them, send their bytes
back, wait for notifications (snapshotting a buffer when one arrives), and
die on request.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import traceback

import numpy as np


def pattern(seed: int, nbytes: int) -> np.ndarray:
    """Reproducible random bytes."""
    return np.frombuffer(np.random.default_rng(seed).bytes(nbytes), dtype=np.uint8).copy()


class _KvxferSide:
    def __init__(self, name: str, listen: bool):
        import kvxfer

        self.kvxfer = kvxfer
        self.agent = kvxfer.Agent(name)
        self.regs = {}

    def register(self, buf):
        self.regs[buf.ctypes.data] = self.agent.register(buf)

    def deregister(self, buf):
        self.agent.deregister(self.regs.pop(buf.ctypes.data))

    def metadata(self):
        return self.agent.metadata()

    def load(self, md):
        return self.agent.load(md)

    def listen_addr(self):
        return self.agent.listen_addr

    def notifs(self, timeout):
        return self.agent.wait_notifications(timeout)

    def knows(self, name):
        return self.agent.has_peer(name)


class _NixlSide:
    def __init__(self, name: str, listen: bool):
        from kvxfer.nixl import nixl_agent, nixl_agent_config

        conf = nixl_agent_config(enable_listen_thread=listen, listen_port=0) if listen else None
        self.agent = nixl_agent(name, conf)
        self.regs = {}

    def register(self, buf):
        rows = np.array([[buf.ctypes.data, buf.nbytes, 0]], dtype=np.uint64)
        self.regs[buf.ctypes.data] = self.agent.register_memory(rows, "DRAM")

    def deregister(self, buf):
        self.agent.deregister_memory(self.regs.pop(buf.ctypes.data))

    def metadata(self):
        return self.agent.get_agent_metadata()

    def load(self, md):
        return self.agent.add_remote_agent(md)

    def listen_addr(self):
        return self.agent.agent.listen_addr

    def knows(self, name):
        return self.agent.check_remote_metadata(name)

    def notifs(self, timeout):
        import time

        deadline = time.monotonic() + timeout
        while True:
            got = self.agent.get_new_notifs()
            if got or time.monotonic() >= deadline:
                return got
            time.sleep(0.0005)


def _serve(conn, api: str, name: str, listen: bool) -> None:
    side = (_KvxferSide if api == "kvxfer" else _NixlSide)(name, listen)
    bufs = {}
    conn.send(("hello", side.metadata(), side.listen_addr()))
    while True:
        cmd, *args = conn.recv()
        if cmd == "quit":
            return
        if cmd == "die":
            os._exit(0)
        if cmd == "load":
            conn.send(side.load(args[0]))
        elif cmd == "alloc":
            key, nbytes, seed = args
            buf = pattern(seed, nbytes) if seed is not None else np.zeros(nbytes, np.uint8)
            side.register(buf)
            bufs[key] = buf
            conn.send((buf.ctypes.data, side.metadata()))
        elif cmd == "knows":
            conn.send(side.knows(args[0]))
        elif cmd == "bytes":
            conn.send(bufs[args[0]].tobytes())
        elif cmd == "fill":
            key, seed = args
            bufs[key][:] = pattern(seed, bufs[key].nbytes)
            conn.send(None)
        elif cmd == "free":
            side.deregister(bufs.pop(args[0]))
            conn.send(None)
        elif cmd == "notifs":
            # Snapshot the buffer the moment a notification arrives: data
            # sent before the notification must be there already.
            timeout, key = args
            got = side.notifs(timeout)
            snap = bufs[key].tobytes() if key is not None and got else None
            conn.send((got, snap))
        else:
            conn.send(("error", f"unknown command {cmd!r}"))


def _main(conn, api: str, name: str, listen: bool) -> None:
    code = 0
    try:
        _serve(conn, api, name, listen)
    except EOFError:
        pass
    except BaseException:  # noqa: BLE001 - report, then exit non-zero
        traceback.print_exc()
        code = 1
    os._exit(code)


class Peer:
    """The target process and its pipe."""

    def __init__(self, api: str, name: str = "target", listen: bool = False):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_main, args=(child, api, name, listen), daemon=True)
        self.proc.start()
        child.close()
        self.name = name
        hello, self.metadata, self.listen_addr = self.call_recv(60)
        assert hello == "hello"

    def call_recv(self, timeout: float = 60):
        if not self.conn.poll(timeout):
            raise TimeoutError("the target process did not answer")
        return self.conn.recv()

    def call(self, *msg, timeout: float = 60):
        self.conn.send(msg)
        return self.call_recv(timeout)

    def alloc(self, key, nbytes, seed=None):
        """Allocates and registers a buffer; returns (address, metadata)."""
        return self.call("alloc", key, nbytes, seed)

    def data(self, key) -> np.ndarray:
        return np.frombuffer(self.call("bytes", key), dtype=np.uint8)

    def die(self) -> None:
        self.conn.send(("die",))
        self.proc.join(10)
        assert self.proc.exitcode == 0

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send(("quit",))
            except (BrokenPipeError, OSError):
                pass
            self.proc.join(10)
            if self.proc.is_alive():
                self.proc.kill()
        self.conn.close()
        assert self.proc.exitcode == 0, f"target exited with {self.proc.exitcode}"
