"""kvxfer: move KV-cache blocks between inference-engine processes.

One-sided READ and WRITE of registered memory between agents, over UCX or
libfabric (host memory of peers on one host moves by cross-memory attach).

    import numpy as np
    import kvxfer

    agent = kvxfer.Agent("prefill-0")
    kv = np.zeros(128 * 16384, dtype=np.uint8)
    region = agent.register(kv)
    peer = agent.connect("10.0.0.2:7700")        # the peer's agent.listen_addr
    req = agent.transfer("WRITE", [region.desc()], [(remote_addr, kv.nbytes)],
                         peer, notification=b"layer 0")
    req.wait(5.0)                                # raises if the transfer failed

``kvxfer.nixl`` offers the same agent with NIXL's Python API.

Every call that may block (waits, metadata exchange, and any call that
takes the agent's lock) releases the GIL; an agent may be used from several
threads. Failures raise :class:`KvxferError` subclasses, one per kind.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

# libfabric must end the queued operations of a peer it drops, or their
# memory could be written after it was deregistered; the native module sets
# this itself only when it is loaded into a process without threads (which
# numpy's or torch's thread pools rule out), so it is set here, through
# Python's own environment, before libfabric can read it.
os.environ.setdefault("FI_AV_REMOVE_CLEANUP", "1")

from . import _kvxfer  # noqa: E402  (after the environment is set)
from ._kvxfer import (  # noqa: F401  (re-exported)
    BackendError,
    BadMetadataError,
    BufferTooSmallError,
    CancelledError,
    CapacityExceededError,
    CountMismatchError,
    IndexOutOfRangeError,
    InProgressError,
    InvalidCapacityError,
    InvalidDescError,
    InvalidNameError,
    InvalidRegionError,
    KvxferError,
    LengthMismatchError,
    MalformedNotificationError,
    NotificationsLostError,
    NotificationTooLongError,
    NotRegisteredError,
    OverlappingRegistrationError,
    RegionBusyError,
    RegionInUseError,
    RemoteDisconnectedError,
    ShutDownError,
    StaleHandleError,
    StalePeerError,
    StalePreparedError,
    TimedOutError,
    UnknownPeerError,
    UnsupportedBackendError,
    UnsupportedError,
    UnsupportedMemKindError,
)
from ._mem import Memory, as_bytes, memory_of, pack_indices, pack_rows, strided_rows

__all__ = [
    "Agent",
    "Config",
    "Region",
    "Strided",
    "PreparedList",
    "Request",
    "Telemetry",
    "KvxferError",
    "BUILT_IN_BACKENDS",
    "backend_from_env",
]

#: Backends this build of kvxfer offers, comma separated ("UCX, LIBFABRIC").
BUILT_IN_BACKENDS: str = _kvxfer.BUILT_IN_BACKENDS

_STATE_NAMES = ("PREPARED", "IN_PROGRESS", "DONE", "FAILED")


def backend_from_env() -> str:
    """The backend an agent without one configured uses: ``KVXFER_BACKEND``,
    else ``TRTLLM_NIXL_KVCACHE_BACKEND``, else ``"UCX"`` (upper-cased)."""
    for var in ("KVXFER_BACKEND", "TRTLLM_NIXL_KVCACHE_BACKEND"):
        value = os.environ.get(var, "").strip()
        if value:
            return value.upper()
    return "UCX"


@dataclass
class Config:
    """Settings of an :class:`Agent`.

    Attributes:
        backend: ``"UCX"`` or ``"LIBFABRIC"``; None lets ``KVXFER_BACKEND``,
            then ``TRTLLM_NIXL_KVCACHE_BACKEND`` choose, else UCX.
        listen: ``"ip:port"`` the metadata side channel listens on (port 0
            picks one); None serves none.
        progress_thread: run a thread that completes transfers and collects
            notifications without the application calling in.
        same_host: move host memory of peers on this host by cross-memory
            attach.
        transfer_timeout: seconds a posted transfer may take before it
            fails with :class:`TimedOutError`; 0 means no deadline, None the
            backend's default (5 s).
        auth_key: shared key of the side channel (HMAC); None reads
            ``KVXFER_AUTH_KEY``.
        metrics_addr: ``"ip:port"`` to serve the process's metrics on in
            Prometheus' text format (``GET /metrics``; port 0 picks one);
            None reads ``KVXFER_METRICS_ADDR``, ``""`` serves none.
            ``KVXFER_METRICS=0`` turns recording off.
    """

    backend: Optional[str] = None
    listen: Optional[str] = "127.0.0.1:0"
    progress_thread: bool = True
    same_host: bool = True
    transfer_timeout: Optional[float] = None
    auth_key: Optional[bytes] = None
    metrics_addr: Optional[str] = None


class Strided(NamedTuple):
    """``count`` blocks of ``length`` bytes, ``stride`` bytes apart from
    ``addr``, as one descriptor list entry per block."""

    addr: int
    length: int
    stride: int
    count: int
    device: int = 0


class Region:
    """Memory registered with an :class:`Agent`; keeps its owner alive until
    deregistered."""

    __slots__ = ("addr", "length", "device", "kind", "_owner", "_agent")

    def __init__(self, agent: "Agent", mem: Memory, owner: Any):
        self.addr = mem.addr
        self.length = mem.length
        self.device = mem.device
        self.kind = mem.kind
        self._owner = owner
        self._agent = agent

    def desc(self, offset: int = 0, length: Optional[int] = None) -> Tuple[int, int, int]:
        """The descriptor ``(address, length, device)`` of ``length`` bytes
        at ``offset`` (default: to the end of the region)."""
        if length is None:
            length = self.length - offset
        if offset < 0 or length < 0 or offset + length > self.length:
            raise ValueError(
                f"offset {offset} and length {length} leave the region of {self.length} bytes"
            )
        return (self.addr + offset, length, self.device)

    def __repr__(self) -> str:
        return (
            f"Region(addr={self.addr:#x}, length={self.length}, device={self.device}, "
            f"kind={self.kind!r})"
        )


DescsLike = Union[Sequence[Sequence[int]], np.ndarray, Strided, Region]


def _rows(descs: DescsLike, what: str) -> Tuple[bytes, int]:
    if isinstance(descs, Region):
        return pack_rows([descs.desc()], what)
    if isinstance(descs, Strided):
        return pack_rows(strided_rows(np.array([[descs.addr, descs.length, descs.device,
                                                  descs.stride, descs.count]])), what)
    if isinstance(descs, np.ndarray):
        return pack_rows(descs, what)
    rows = [d.desc() if isinstance(d, Region) else tuple(d) for d in descs]
    if not rows:
        return b"", 0
    return pack_rows(rows, what)


class Telemetry(NamedTuple):
    """What a transfer moved and when (nanoseconds on the agent's monotonic
    clock; None when not reached yet)."""

    bytes: int
    descs: int
    segments: int
    posted_ns: Optional[int]
    post_ns: int
    completed_ns: Optional[int]

    @property
    def duration_ns(self) -> Optional[int]:
        """From the last post to its completion."""
        if self.posted_ns is None or self.completed_ns is None:
            return None
        return self.completed_ns - self.posted_ns


class PreparedList:
    """A descriptor list resolved once (:meth:`Agent.prep_local`,
    :meth:`Agent.prep_remote`), for :meth:`Agent.make_transfer` by index."""

    __slots__ = ("_native",)

    def __init__(self, native: Any):
        self._native = native

    def __len__(self) -> int:
        return len(self._native)

    @property
    def peer(self) -> str:
        """The peer the list describes ("" for this agent's memory)."""
        return self._native.peer

    def release(self) -> None:
        """Releases the list (idempotent)."""
        self._native.release()

    def __enter__(self) -> "PreparedList":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Request:
    """A transfer: :meth:`post`, :meth:`status`, :meth:`wait`, :meth:`repost`,
    :meth:`release`. States: ``"PREPARED"``, ``"IN_PROGRESS"``, ``"DONE"``,
    ``"FAILED"``."""

    __slots__ = ("_native",)

    def __init__(self, native: Any):
        self._native = native

    def post(self) -> str:
        """Posts the transfer; returns the state right after."""
        return _STATE_NAMES[self._native.post()]

    def repost(self) -> str:
        """Posts the finished transfer again (same descriptors)."""
        return _STATE_NAMES[self._native.post()]

    def status(self) -> str:
        """The transfer's state."""
        return _STATE_NAMES[self._native.status()]

    @property
    def done(self) -> bool:
        """Whether all data is at its destination."""
        return self._native.status() == _kvxfer.STATE_DONE

    def failure(self) -> Optional[KvxferError]:
        """Why the transfer failed; None unless it did."""
        return self._native.failure()

    def wait(self, timeout: float) -> bool:
        """Waits up to ``timeout`` seconds (GIL released): True when done,
        False when still moving; raises the failure if it failed."""
        code = self._native.wait(float(timeout))
        if code == _kvxfer.STATE_ERR:
            err = self._native.failure()
            if err is not None:
                raise err
            raise KvxferError("transfer failed")
        return code == _kvxfer.STATE_DONE

    def telemetry(self) -> Telemetry:
        """Bytes, descriptors, segments and times of the last post."""
        return Telemetry(*self._native.telemetry())

    @property
    def backend(self) -> str:
        """The backend moving the transfer."""
        return self._native.backend

    @property
    def peer(self) -> str:
        """The peer of the transfer."""
        return self._native.peer

    def release(self) -> None:
        """Releases the transfer (cancelled, or waited for, if in flight)."""
        self._native.release()

    def __enter__(self) -> "Request":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Agent:
    """A kvxfer agent: registers memory, exchanges metadata with peers and
    moves bytes to and from their registered memory.

    Args:
        name: the agent's name, unique among its peers.
        config: settings (default :class:`Config`).
    """

    def __init__(self, name: str, config: Optional[Config] = None):
        cfg = config or Config()
        self._native = _kvxfer.Agent(
            name,
            backend=cfg.backend,
            listen=cfg.listen,
            progress_thread=cfg.progress_thread,
            same_host=cfg.same_host,
            transfer_timeout=cfg.transfer_timeout,
            auth_key=cfg.auth_key,
            metrics_addr=cfg.metrics_addr,
        )
        self._auth_key = cfg.auth_key
        self._regions: Dict[int, Region] = {}

    # ------------------------------------------------------------ identity

    @property
    def name(self) -> str:
        """The agent's name."""
        return self._native.name

    @property
    def backend(self) -> str:
        """The backend in use (``"UCX"``, ``"LIBFABRIC"``)."""
        return self._native.backend

    @property
    def listen_addr(self) -> Optional[str]:
        """``"ip:port"`` of the side channel, or None."""
        return self._native.listen_addr

    @property
    def metrics_addr(self) -> Optional[str]:
        """``"ip:port"`` of the metrics endpoint, or None."""
        return self._native.metrics_addr

    def metrics_text(self) -> str:
        """This agent's metrics in Prometheus' text format (the endpoint
        serves those of every agent of the process)."""
        return self._native.metrics_text()

    # -------------------------------------------------------------- memory

    def register(
        self,
        memory: Any,
        length: Optional[int] = None,
        *,
        device: Optional[int] = None,
        kind: Optional[str] = None,
    ) -> Region:
        """Registers memory for transfers.

        ``memory`` is a numpy array, a torch tensor (DRAM or VRAM, with its
        device id), a writable buffer, or an address with ``length`` (and
        ``device`` / ``kind``). The returned :class:`Region` keeps the
        object alive until :meth:`deregister`.
        """
        if isinstance(memory, int):
            if length is None:
                raise TypeError("register(address): give the length too")
            mem = Memory(memory, int(length), device or 0, kind or "DRAM")
            owner = None
        else:
            if length is not None:
                raise TypeError("register(object): length applies only to an address")
            mem = memory_of(memory)
            owner = memory
            if device is not None or kind is not None:
                mem = Memory(mem.addr, mem.length,
                             mem.device if device is None else device,
                             mem.kind if kind is None else kind)
        self._native.register(mem.addr, mem.length, mem.device, mem.kind)
        region = Region(self, mem, owner)
        self._regions[mem.addr] = region
        return region

    def deregister(self, region: Union[Region, Any]) -> None:
        """Deregisters a :class:`Region` (or the object registered)."""
        addr = region.addr if isinstance(region, Region) else memory_of(region).addr
        self._native.deregister(addr)
        self._regions.pop(addr, None)

    # ------------------------------------------------------------ metadata

    def metadata(self) -> bytes:
        """This agent's metadata: address, registered regions and keys."""
        return self._native.local_metadata()

    def load(self, metadata: bytes) -> str:
        """Loads a peer's metadata; returns the peer's name."""
        return self._native.load_remote(metadata)

    def connect(self, addr: str) -> str:
        """Fetches and loads the metadata of the agent listening on
        ``addr`` (``"ip:port"``) and pushes ours; returns its name."""
        return self._native.connect(addr)

    def fetch_metadata(self, addr: str, timeout: float = 5.0) -> str:
        """Fetches and loads the metadata of the agent at ``addr``."""
        return self._native.fetch_metadata(addr, self._auth_key, timeout)

    def send_metadata(self, addr: str, timeout: float = 5.0) -> str:
        """Pushes our metadata to the agent at ``addr``; returns the name it
        knows us by."""
        return self._native.send_metadata(addr, self._auth_key, timeout)

    def invalidate_metadata(self, addr: str, timeout: float = 5.0) -> None:
        """Asks the agent at ``addr`` to forget our metadata (it can no
        longer reach us until it loads it again)."""
        self._native.invalidate_metadata(addr, self._auth_key, timeout)

    def has_peer(self, peer: str) -> bool:
        """Whether ``peer``'s metadata is loaded."""
        return self._native.has_remote(peer)

    def check_peer(self, peer: str, descs: DescsLike) -> None:
        """Raises unless every descriptor lies in memory ``peer`` registered."""
        self._native.check_remote(peer, _rows(descs, "check_peer")[0])

    def forget(self, peer: str) -> None:
        """Forgets a peer (its connection and keys)."""
        self._native.invalidate_remote(peer)

    def peer_path(self, peer: str) -> str:
        """How data to ``peer`` moves (``"cross-memory attach"`` or the
        backend's name)."""
        return self._native.peer_path(peer)

    # ----------------------------------------------------------- transfers

    def prepare(
        self,
        op: str,
        local: DescsLike,
        remote: DescsLike,
        peer: str,
        notification: Optional[bytes] = None,
    ) -> Request:
        """Validates a transfer without starting it (``op``: ``"WRITE"`` or
        ``"READ"``); descriptors pair by position. ``notification`` reaches
        the peer after the data."""
        return Request(
            self._native.prepare(
                op,
                _rows(local, "local descriptors")[0],
                _rows(remote, "remote descriptors")[0],
                peer,
                as_bytes(notification, "notification"),
            )
        )

    def transfer(
        self,
        op: str,
        local: DescsLike,
        remote: DescsLike,
        peer: str,
        notification: Optional[bytes] = None,
    ) -> Request:
        """Prepares and posts a transfer (see :meth:`prepare`)."""
        req = self.prepare(op, local, remote, peer, notification)
        req.post()
        return req

    def prep_local(self, descs: DescsLike) -> PreparedList:
        """Resolves this agent's descriptors once, for :meth:`make_transfer`
        (a :class:`Strided` list takes no memory per entry)."""
        if isinstance(descs, Strided):
            return PreparedList(self._native.prep_local_strided(
                descs.addr, descs.length, descs.stride, descs.count, descs.device))
        return PreparedList(self._native.prep_local(_rows(descs, "prep_local")[0]))

    def prep_remote(self, peer: str, descs: DescsLike) -> PreparedList:
        """Resolves ``peer``'s descriptors once, for :meth:`make_transfer`."""
        if isinstance(descs, Strided):
            return PreparedList(self._native.prep_remote_strided(
                peer, descs.addr, descs.length, descs.stride, descs.count, descs.device))
        return PreparedList(self._native.prep_remote(peer, _rows(descs, "prep_remote")[0]))

    def make_transfer(
        self,
        op: str,
        local: PreparedList,
        local_indices: Sequence[int],
        remote: PreparedList,
        remote_indices: Sequence[int],
        notification: Optional[bytes] = None,
    ) -> Request:
        """Makes a transfer (not posted) from prepared lists: pair k moves
        ``local[local_indices[k]]`` and ``remote[remote_indices[k]]``."""
        return Request(
            self._native.make_xfer(
                op,
                local._native,
                pack_indices(local_indices, "local_indices"),
                remote._native,
                pack_indices(remote_indices, "remote_indices"),
                as_bytes(notification, "notification"),
            )
        )

    # ------------------------------------------------------- notifications

    def notify(self, peer: str, message: bytes) -> None:
        """Sends ``message`` to ``peer`` outside any transfer."""
        msg = as_bytes(message, "message")
        self._native.notify(peer, msg or b"")

    def notifications(self) -> Dict[str, List[bytes]]:
        """Takes the notifications received so far, by sender, oldest first."""
        return self._native.take_notifications()

    def wait_notifications(self, timeout: float) -> Dict[str, List[bytes]]:
        """Like :meth:`notifications`, waiting up to ``timeout`` seconds for
        at least one (GIL released)."""
        return self._native.wait_notifications(float(timeout))

    # ------------------------------------------------------------ shutdown

    def close(self) -> None:
        """Shuts the agent down; afterwards calls raise :class:`ShutDownError`."""
        self._native.shutdown()
        self._regions.clear()

    def __enter__(self) -> "Agent":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Agent(name={self.name!r}, backend={self.backend!r}, listen_addr={self.listen_addr!r})"
