"""NIXL's Python API over kvxfer.

A program written against NIXL's ``nixl._api`` runs on kvxfer with one
change, its import::

    from kvxfer.nixl import nixl_agent, nixl_agent_config

Argument names, defaults, return values and state strings are NIXL's.
Calls whose NIXL behaviour kvxfer does not offer raise
``NotImplementedError`` naming the call; kvxfer's own failures raise
``kvxfer.KvxferError`` subclasses.

Differences worth knowing:

* An agent runs one backend, ``"UCX"`` or ``"LIBFABRIC"`` (or
  ``"CUDA_IPC"``, GPU to GPU on one host). With the default
  ``nixl_agent_config().backends`` the backend comes from ``KVXFER_BACKEND``,
  then ``TRTLLM_NIXL_KVCACHE_BACKEND``, else UCX; a list given explicitly
  picks its first supported entry.
* Metadata moves peer to peer over kvxfer's side channel (``ip_addr``
  given); there is no central metadata server.
* Malformed descriptor input raises ``TypeError`` / ``ValueError`` instead
  of NIXL's logged error and ``None``.
* Telemetry is always captured; its times are microseconds on a
  monotonic clock.
"""

from __future__ import annotations

import logging
import pickle
from enum import Enum
from typing import Any, Dict, List, Optional, Union

import numpy as np

from .. import _kvxfer
from .._mem import as_bytes, is_tensor, pack_indices, pack_rows, strided_rows, tensor_memory

logger = logging.getLogger(__name__)

#: Port of the metadata listener when none is given (NIXL's default).
DEFAULT_COMM_PORT = 8888

# Backends built into this kvxfer: UCX, LIBFABRIC (and CUDA_IPC, GPU to GPU
# on one host, with the cuda feature).
_SUPPORTED = tuple(b.strip() for b in _kvxfer.BUILT_IN_BACKENDS.split(","))
_DEFAULT_BACKENDS = ["UCX"]
_MEM_TYPES = {"DRAM": "DRAM", "VRAM": "VRAM", "cpu": "DRAM", "cuda": "VRAM"}
_OPS = ("WRITE", "READ")
# Native state codes (prepared, in progress, done, failed) as NIXL's strings.
_STATES = (None, "PROC", "DONE", "ERR")


def _unsupported(call: str, why: str) -> NotImplementedError:
    return NotImplementedError(f"kvxfer.nixl: {call} is not supported: {why}")


def _name(agent: Union[str, bytes]) -> str:
    """An agent name given as str or as bytes (what add_remote_agent returns)."""
    return agent.decode() if isinstance(agent, (bytes, bytearray)) else agent


def _mem_type(mem_type: str, call: str) -> str:
    try:
        return _MEM_TYPES[mem_type]
    except KeyError:
        raise ValueError(
            f"{call}: unknown mem_type {mem_type!r}; kvxfer moves 'DRAM' and 'VRAM'"
        ) from None


class nixl_thread_sync_t(Enum):
    """Thread synchronization modes (accepted for compatibility: a kvxfer
    agent is always safe to use from several threads)."""

    NIXL_THREAD_SYNC_NONE = 0
    NIXL_THREAD_SYNC_STRICT = 1
    NIXL_THREAD_SYNC_RW = 2
    NIXL_THREAD_SYNC_DEFAULT = 3


#: Backend handles are plain ints, as in NIXL.
nixl_backend_handle = int


class _DList:
    """A descriptor list: a memory type and Nx3 rows (address, length,
    device). Picklable (``get_serialized_descs``)."""

    __slots__ = ("mem_type", "rows")

    def __init__(self, mem_type: str, rows: np.ndarray):
        self.mem_type = mem_type
        self.rows = rows

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def descCount(self) -> int:  # noqa: N802 (NIXL's name)
        """Number of descriptors."""
        return len(self)

    def isEmpty(self) -> bool:  # noqa: N802
        """Whether the list has no descriptors."""
        return len(self) == 0

    def getType(self) -> str:  # noqa: N802
        """The memory type: ``"DRAM"`` or ``"VRAM"``."""
        return self.mem_type

    def __getitem__(self, i: int) -> tuple:
        a, n, d = self.rows[i].tolist()
        return (a, n, d)

    def __iter__(self):
        return (tuple(r) for r in self.rows.tolist())

    def __eq__(self, other: object) -> bool:
        return (
            type(other) is type(self)
            and self.mem_type == other.mem_type  # type: ignore[attr-defined]
            and np.array_equal(self.rows, other.rows)  # type: ignore[attr-defined]
        )

    def __getstate__(self):
        return (self.mem_type, self.rows)

    def __setstate__(self, state):
        self.mem_type, self.rows = state

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.mem_type}, {len(self)} descriptors)"


class nixlRegDList(_DList):
    """Registration descriptor list (``get_reg_descs``, ``register_memory``)."""

    __slots__ = ()


class nixlXferDList(_DList):
    """Transfer descriptor list (``get_xfer_descs``)."""

    __slots__ = ()


class nixlXferTelemetry:
    """Telemetry of a transfer: ``startTime``, ``postDuration`` and
    ``xferDuration`` in microseconds, ``totalBytes`` and ``descCount``."""

    __slots__ = ("startTime", "postDuration", "xferDuration", "totalBytes", "descCount")

    def __init__(self, startTime, postDuration, xferDuration, totalBytes, descCount):  # noqa: N803
        self.startTime = startTime
        self.postDuration = postDuration
        self.xferDuration = xferDuration
        self.totalBytes = totalBytes
        self.descCount = descCount

    def __repr__(self) -> str:
        return (
            f"nixlXferTelemetry(startTime={self.startTime}, postDuration={self.postDuration}, "
            f"xferDuration={self.xferDuration}, totalBytes={self.totalBytes}, "
            f"descCount={self.descCount})"
        )


class nixl_prepped_dlist_handle:
    """Handle of a prepared descriptor list (``prep_xfer_dlist``).
    ``release()`` frees it; dropping it does too."""

    __slots__ = ("_prepared", "_released")

    def __init__(self, prepared: Any):
        self._prepared = prepared
        self._released = False

    def __repr__(self) -> str:
        return f"nixl_prepped_dlist_handle({len(self._prepared)} descriptors, released={self._released})"

    def release(self) -> None:
        """Releases the list (idempotent)."""
        if not self._released:
            self._prepared.release()
            self._released = True


class nixl_xfer_handle:
    """Handle of a transfer request (``make_prepped_xfer``,
    ``initialize_xfer``). ``release()`` frees it; one in flight is cancelled
    where the backend can, else waited for."""

    __slots__ = ("_req", "_notif", "_released")

    def __init__(self, req: Any, notif: Optional[bytes]):
        self._req = req
        self._notif = notif
        self._released = False

    def __repr__(self) -> str:
        return f"nixl_xfer_handle(peer={self._req.peer!r}, released={self._released})"

    def release(self) -> None:
        """Releases the request (idempotent)."""
        if not self._released:
            self._req.release()
            self._released = True


class nixl_agent_config:
    """Configuration of a :class:`nixl_agent` (NIXL's arguments).

    Args:
        enable_prog_thread: run a progress thread.
        enable_listen_thread: serve metadata on ``listen_port`` (all
            interfaces) for ``fetch_remote_metadata`` / ``send_local_metadata``.
        listen_port: the metadata port.
        capture_telemetry: accepted; telemetry is always captured.
        num_threads: accepted; kvxfer sizes its own workers.
        backends: ``["UCX"]`` or ``["LIBFABRIC"]``; the default list lets
            ``KVXFER_BACKEND`` / ``TRTLLM_NIXL_KVCACHE_BACKEND`` choose.
        sync_mode: accepted; agents are always thread-safe.
    """

    def __init__(
        self,
        enable_prog_thread: bool = True,
        enable_listen_thread: bool = False,
        listen_port: int = DEFAULT_COMM_PORT,
        capture_telemetry: bool = False,
        num_threads: int = 0,
        backends: list[str] = _DEFAULT_BACKENDS,
        sync_mode: Optional[nixl_thread_sync_t] = None,
    ):
        self.backends = backends
        self.enable_pthread = enable_prog_thread
        self.enable_listen = enable_listen_thread
        self.port = listen_port
        self.capture_telemetry = capture_telemetry
        self.num_threads = num_threads
        if sync_mode is not None and not isinstance(sync_mode, nixl_thread_sync_t):
            raise TypeError(
                f"sync_mode must be a nixl_thread_sync_t (got {type(sync_mode).__name__!r})"
            )
        self.sync_mode = sync_mode


class nixl_agent:
    """A NIXL-style agent over kvxfer.

    Args:
        agent_name: the agent's name, unique among its peers.
        nixl_conf: configuration (default :class:`nixl_agent_config`).
        instantiate_all: accepted; an agent runs one backend.
    """

    def __init__(
        self,
        agent_name: str,
        nixl_conf: Optional[nixl_agent_config] = None,
        instantiate_all: bool = False,
    ):
        conf = nixl_conf or nixl_agent_config()
        backend = self._choose_backend(conf.backends)
        listen = f"0.0.0.0:{int(conf.port)}" if conf.enable_listen else None
        self.agent = _kvxfer.Agent(
            agent_name, backend=backend, listen=listen, progress_thread=bool(conf.enable_pthread)
        )
        self.name = agent_name
        self.notifs: Dict[str, List[bytes]] = {}
        self.plugin_list = list(_SUPPORTED)
        self.backends: Dict[str, nixl_backend_handle] = {self.agent.backend: 1}
        mems = ["DRAM", "VRAM"] if _kvxfer.CUDA else ["DRAM"]
        self.backend_mems: Dict[str, List[str]] = {self.agent.backend: mems}
        self.backend_options: Dict[str, Dict[str, str]] = {self.agent.backend: {}}
        self.nixl_mems = {"DRAM": "DRAM", "VRAM": "VRAM", "cpu": "DRAM", "cuda": "VRAM"}
        self.nixl_ops = {"WRITE": "WRITE", "READ": "READ"}
        self._regs: Dict[int, int] = {}
        logger.info("Initialized kvxfer.nixl agent %s on %s", agent_name, self.agent.backend)

    @staticmethod
    def _choose_backend(backends: List[str]) -> Optional[str]:
        if backends is _DEFAULT_BACKENDS:
            return None  # KVXFER_BACKEND, TRTLLM_NIXL_KVCACHE_BACKEND, else UCX
        chosen = None
        for b in backends:
            if b not in _SUPPORTED:
                logger.warning("Skipping backend %s: kvxfer.nixl offers %s", b,
                               ", ".join(_SUPPORTED))
            elif chosen is None:
                chosen = b
            elif b != chosen:
                logger.warning("Skipping backend %s: a kvxfer agent runs one backend (%s)",
                               b, chosen)
        if chosen is None:
            raise RuntimeError(
                f"nixl_agent: no supported backend in {list(backends)!r}; "
                f"kvxfer.nixl offers {', '.join(map(repr, _SUPPORTED))}"
            )
        return chosen

    # ------------------------------------------------------------ backends

    def get_plugin_list(self) -> list[str]:
        """Backends this kvxfer was built with."""
        return list(self.plugin_list)

    def get_plugin_mem_types(self, backend: str) -> list[str]:
        """Memory types a backend moves."""
        if backend not in self.plugin_list:
            logger.warning("Plugin %s is not available to get its supported mem types.", backend)
            return []
        return ["DRAM", "VRAM"] if _kvxfer.CUDA else ["DRAM"]

    def get_plugin_params(self, backend: str) -> dict[str, str]:
        """Initialization parameters of a backend (none are taken)."""
        return {}

    def get_backend_mem_types(self, backend: str) -> list[str]:
        """Memory types of the agent's backend."""
        if backend not in self.backend_mems:
            logger.warning("Backend %s not instantiated to get its mem types.", backend)
            return []
        return list(self.backend_mems[backend])

    def get_backend_params(self, backend: str) -> dict[str, str]:
        """Parameters of the agent's backend (none are taken)."""
        return dict(self.backend_options.get(backend, {}))

    def create_backend(self, backend: str, initParams: dict[str, str] = {}) -> None:  # noqa: B006,N803
        """The agent's backend exists already; another cannot be added."""
        if backend in self.backends:
            return
        raise _unsupported(
            "create_backend",
            f"a kvxfer agent runs one backend ({self.agent.backend}); cannot add {backend!r}",
        )

    # ---------------------------------------------------------- descriptors

    @staticmethod
    def _tensor_rows(tensors: list, call: str) -> tuple[str, np.ndarray]:
        device = tensors[0].device
        rows = np.zeros((len(tensors), 3), dtype=np.uint64)
        kind = "DRAM"
        for i, t in enumerate(tensors):
            if t.device != device:
                raise ValueError(f"{call}: tensor {i} is on {t.device}, tensor 0 on {device}")
            mem = tensor_memory(t)
            rows[i] = (mem.addr, mem.length, mem.device)
            kind = mem.kind
        return kind, rows

    def _dlist(self, cls: type, descs: Any, mem_type: Optional[str], width: int, call: str):
        if isinstance(descs, cls):
            return descs
        if isinstance(descs, _DList):
            raise TypeError(f"{call}: got a {type(descs).__name__}, expected a {cls.__name__}")
        if is_tensor(descs):
            kind, rows = self._tensor_rows([descs], call)
            return cls(kind, rows)
        if isinstance(descs, np.ndarray):
            if mem_type is None:
                raise ValueError(f"{call}: give a mem_type with a numpy array")
            if descs.ndim != 2 or descs.shape[1] != 3:
                raise ValueError(f"{call}: numpy descriptors must be Nx3, got shape {descs.shape}")
            return cls(_mem_type(mem_type, call), descs.astype(np.uint64))
        if isinstance(descs, (list, tuple)) and descs and is_tensor(descs[0]):
            kind, rows = self._tensor_rows(list(descs), call)
            return cls(kind, rows)
        if isinstance(descs, (list, tuple)):
            if mem_type is None:
                raise ValueError(f"{call}: give a mem_type with a list of tuples")
            rows = np.zeros((len(descs), 3), dtype=np.uint64)
            for i, d in enumerate(descs):
                if not isinstance(d, tuple) or len(d) != width:
                    raise ValueError(
                        f"{call}: descriptor {i} is {d!r}; expected a {width}-tuple "
                        + ("(address, length, device ID, meta info)" if width == 4
                           else "(address, length, device ID)")
                    )
                rows[i] = d[:3]
            return cls(_mem_type(mem_type, call), rows)
        raise TypeError(f"{call}: unsupported descriptor input of type {type(descs).__name__}")

    def get_xfer_descs(self, descs, mem_type: Optional[str] = None) -> nixlXferDList:
        """A transfer descriptor list from 3-tuples (address, length, device
        ID) with a mem_type, an Nx3 numpy array with a mem_type, a tensor, a
        list of tensors, or an nixlXferDList."""
        return self._dlist(nixlXferDList, descs, mem_type, 3, "get_xfer_descs")

    def get_reg_descs(self, descs, mem_type: Optional[str] = None) -> nixlRegDList:
        """A registration descriptor list from 4-tuples (address, length,
        device ID, meta info) with a mem_type, an Nx3 numpy array with a
        mem_type, a tensor, a list of tensors, or an nixlRegDList."""
        return self._dlist(nixlRegDList, descs, mem_type, 4, "get_reg_descs")

    def get_remote_descs(self, descs, mem_type: Optional[str] = None):
        """Not offered: remote lists are prepared with prep_xfer_dlist."""
        raise _unsupported("get_remote_descs", "prepare remote lists with prep_xfer_dlist")

    def get_serialized_descs(self, descs) -> bytes:
        """Serializes a descriptor list (pickle)."""
        return pickle.dumps(descs)

    def deserialize_descs(self, serialized_descs: bytes):
        """Deserializes a list from get_serialized_descs."""
        return pickle.loads(serialized_descs)

    # --------------------------------------------------------------- memory

    def register_memory(
        self, reg_list, mem_type: Optional[str] = None, backends: list[str] = []  # noqa: B006
    ) -> nixlRegDList:
        """Registers memory (see get_reg_descs for the inputs); returns the
        list for deregister_memory. The caller keeps the memory allocated
        until then."""
        descs = self.get_reg_descs(reg_list, mem_type)
        done = []
        try:
            for addr, length, dev in descs.rows.tolist():
                self.agent.register(addr, length, dev, descs.mem_type)
                done.append(addr)
        except BaseException:
            for addr in done:
                self.agent.deregister(addr)
            raise
        return descs

    def deregister_memory(self, dereg_list: nixlRegDList, backends: list[str] = []) -> None:  # noqa: B006
        """Deregisters the memory of a list from register_memory."""
        first_err = None
        for addr, _length, _dev in dereg_list.rows.tolist():
            try:
                self.agent.deregister(addr)
            except Exception as e:  # noqa: BLE001 - deregister the others, then raise
                first_err = first_err or e
        if first_err is not None:
            raise first_err

    def query_memory(self, reg_list, backend: str, mem_type: Optional[str] = None):
        """Not offered (storage backends)."""
        raise _unsupported("query_memory", "kvxfer has no storage backends")

    # ------------------------------------------------------------- metadata

    def get_agent_metadata(self) -> bytes:
        """This agent's metadata."""
        return self.agent.local_metadata()

    def get_partial_agent_metadata(self, descs, inc_conn_info: bool = False,
                                   backends: list[str] = []) -> bytes:  # noqa: B006
        """Not offered: kvxfer metadata always holds every registration."""
        raise _unsupported("get_partial_agent_metadata",
                           "metadata always describes every registration; use get_agent_metadata")

    def add_remote_agent(self, metadata: bytes) -> bytes:
        """Loads a peer's metadata; returns its name (as bytes, like NIXL;
        every call taking an agent name accepts bytes or str)."""
        return self.agent.load_remote(metadata).encode()

    def remove_remote_agent(self, agent: str) -> None:
        """Forgets a peer (disconnects)."""
        self.agent.invalidate_remote(_name(agent))

    def make_connection(self, remote_agent: str, backends: list[str] = []) -> None:  # noqa: B006
        """Checks that the peer is known (kvxfer connects on load)."""
        self.agent.peer_path(_name(remote_agent))

    @staticmethod
    def _peer_addr(ip_addr: str, port: int, call: str) -> str:
        if not ip_addr:
            raise _unsupported(
                call, "without ip_addr NIXL uses a central metadata server; give ip_addr and port"
            )
        host = f"[{ip_addr}]" if ":" in ip_addr else ip_addr
        return f"{host}:{int(port)}"

    def send_local_metadata(self, ip_addr: str = "", port: int = DEFAULT_COMM_PORT) -> None:
        """Sends our metadata to the peer listening on ip_addr:port."""
        self.agent.send_metadata(self._peer_addr(ip_addr, port, "send_local_metadata"))

    def send_partial_agent_metadata(self, descs, inc_conn_info: bool = False,
                                    backends: list[str] = [], ip_addr: str = "",  # noqa: B006
                                    port: int = DEFAULT_COMM_PORT, label: str = "") -> None:
        """Not offered: use send_local_metadata."""
        raise _unsupported("send_partial_agent_metadata", "use send_local_metadata")

    def fetch_remote_metadata(self, remote_agent: str, ip_addr: str = "",
                              port: int = DEFAULT_COMM_PORT, label: str = "") -> None:
        """Fetches and loads the metadata of the peer on ip_addr:port
        (synchronously: check_remote_metadata is true on return)."""
        got = self.agent.fetch_metadata(self._peer_addr(ip_addr, port, "fetch_remote_metadata"))
        if got != _name(remote_agent):
            logger.warning("fetch_remote_metadata: %s:%s serves agent %r, not %r",
                           ip_addr, port, got, remote_agent)

    def invalidate_local_metadata(self, ip_addr: str = "", port: int = DEFAULT_COMM_PORT) -> None:
        """Asks the peer listening on ip_addr:port to forget our metadata."""
        self.agent.invalidate_metadata(
            self._peer_addr(ip_addr, port, "invalidate_local_metadata"))

    def check_remote_metadata(self, agent: str, descs: Optional[nixlXferDList] = None) -> bool:
        """Whether the peer's metadata is loaded (and covers descs)."""
        agent = _name(agent)
        if not self.agent.has_remote(agent):
            return False
        if descs is None or len(descs) == 0:
            return True
        try:
            self.agent.check_remote(agent, pack_rows(descs.rows, "check_remote_metadata")[0])
        except _kvxfer.KvxferError:
            return False
        return True

    # ------------------------------------------------------------ transfers

    def prep_xfer_dlist(
        self,
        agent_name: str,
        xfer_list,
        mem_type: Optional[str] = None,
        backends: list[str] = [],  # noqa: B006
    ) -> nixl_prepped_dlist_handle:
        """Prepares a descriptor list for make_prepped_xfer: local with
        "NIXL_INIT_AGENT" (or ""), else of the named peer. Takes what
        get_xfer_descs takes, or an Nx5 array of strided rows (address,
        length, device ID, stride, count) with a mem_type."""
        agent_name = _name(agent_name)
        local = agent_name in ("NIXL_INIT_AGENT", "")
        if not local and agent_name == self.name:
            raise _unsupported("prep_xfer_dlist", "loopback lists (agent_name is this agent)")
        if isinstance(xfer_list, np.ndarray) and xfer_list.ndim == 2 and xfer_list.shape[1] == 5:
            if mem_type is None:
                raise ValueError("Please specify a mem type for strided descriptors")
            _mem_type(mem_type, "prep_xfer_dlist")
            if xfer_list.shape[0] == 1:
                a, n, d, s, c = (int(v) for v in xfer_list[0])
                p = (self.agent.prep_local_strided(a, n, s, c, d) if local
                     else self.agent.prep_remote_strided(agent_name, a, n, s, c, d))
                return nixl_prepped_dlist_handle(p)
            rows = strided_rows(xfer_list)
        else:
            rows = self.get_xfer_descs(xfer_list, mem_type).rows
        packed = pack_rows(rows, "prep_xfer_dlist")[0]
        p = self.agent.prep_local(packed) if local else self.agent.prep_remote(agent_name, packed)
        return nixl_prepped_dlist_handle(p)

    def make_prepped_xfer(
        self,
        operation: str,
        local_xfer_side: nixl_prepped_dlist_handle,
        local_indices: Union[list[int], np.ndarray],
        remote_xfer_side: nixl_prepped_dlist_handle,
        remote_indices: Union[list[int], np.ndarray],
        notif_msg: bytes = b"",
        backends: list[str] = [],  # noqa: B006
        skip_desc_merge: bool = False,
    ) -> nixl_xfer_handle:
        """A transfer from prepared lists by index ("WRITE" or "READ");
        notif_msg, if not empty, reaches the peer after the data."""
        notif = as_bytes(notif_msg, "notif_msg")
        req = self.agent.make_xfer(
            operation,
            local_xfer_side._prepared,
            pack_indices(local_indices, "local_indices"),
            remote_xfer_side._prepared,
            pack_indices(remote_indices, "remote_indices"),
            notif,
        )
        return nixl_xfer_handle(req, notif)

    def initialize_xfer(
        self,
        operation: str,
        local_descs: nixlXferDList,
        remote_descs: nixlXferDList,
        remote_agent: str,
        notif_msg: bytes = b"",
        backends: list[str] = [],  # noqa: B006
    ) -> nixl_xfer_handle:
        """A transfer between two descriptor lists (get_xfer_descs), paired
        by position."""
        local = self.get_xfer_descs(local_descs)
        remote = self.get_xfer_descs(remote_descs)
        notif = as_bytes(notif_msg, "notif_msg")
        req = self.agent.prepare(
            operation,
            pack_rows(local.rows, "local_descs")[0],
            pack_rows(remote.rows, "remote_descs")[0],
            _name(remote_agent),
            notif,
        )
        return nixl_xfer_handle(req, notif)

    def estimate_xfer_cost(self, req_handle: nixl_xfer_handle):
        """Not offered."""
        raise _unsupported("estimate_xfer_cost", "kvxfer has no cost model")

    def transfer(self, handle: nixl_xfer_handle, notif_msg: bytes = b"") -> str:
        """Posts (or re-posts) the transfer: "DONE", "PROC" or "ERR"."""
        if notif_msg and as_bytes(notif_msg, "notif_msg") != handle._notif:
            raise _unsupported(
                "transfer", "a notif_msg other than the request's; give it when making the request"
            )
        return _STATES[handle._req.post()]

    def check_xfer_state(self, handle: nixl_xfer_handle) -> str:
        """The transfer's state: "DONE", "PROC" or "ERR"."""
        state = _STATES[handle._req.status()]
        if state is None:
            raise _kvxfer.KvxferError("check_xfer_state: the transfer was never posted")
        if state == "ERR":
            logger.warning("transfer to %s failed: %s", handle._req.peer, handle._req.failure())
        return state

    def get_xfer_telemetry(self, handle: nixl_xfer_handle) -> nixlXferTelemetry:
        """Telemetry of the transfer's last post."""
        nbytes, descs, _segs, posted, post_ns, completed = handle._req.telemetry()
        start = (posted or 0) // 1000
        xfer = (completed - posted) // 1000 if posted is not None and completed is not None else 0
        return nixlXferTelemetry(start, post_ns // 1000, xfer, nbytes, descs)

    def query_xfer_backend(self, handle: nixl_xfer_handle) -> str:
        """The backend moving the transfer."""
        return handle._req.backend

    def release_xfer_handle(self, handle: nixl_xfer_handle) -> None:
        """Releases a transfer handle."""
        handle.release()

    def release_dlist_handle(self, handle: nixl_prepped_dlist_handle) -> None:
        """Releases a prepared list handle."""
        handle.release()

    def prep_mem_view(self, dlist, *, backends: Optional[list[str]] = None) -> int:
        """Not offered (GPU-initiated transfers)."""
        raise _unsupported("prep_mem_view", "kvxfer has no GPU device API")

    def release_mem_view(self, mvh: int) -> None:
        """Not offered (GPU-initiated transfers)."""
        raise _unsupported("release_mem_view", "kvxfer has no GPU device API")

    # -------------------------------------------------------- notifications

    def get_new_notifs(self, backends: list[str] = []) -> dict[str, list[bytes]]:  # noqa: B006
        """Notifications received since the last call: {agent: [bytes]}."""
        return self.agent.take_notifications()

    def update_notifs(self, backends: list[str] = []) -> dict[str, list[bytes]]:  # noqa: B006
        """Adds new notifications to self.notifs and returns it."""
        for peer, msgs in self.agent.take_notifications().items():
            self.notifs.setdefault(peer, []).extend(msgs)
        return self.notifs

    def check_remote_xfer_done(
        self,
        remote_agent_name: str,
        lookup_tag: bytes,
        backends: list[str] = [],  # noqa: B006
        tag_is_prefix=True,
    ) -> bool:
        """Whether a notification from the peer starts with (or, with
        tag_is_prefix False, contains) lookup_tag; removes the one found."""
        self.update_notifs()
        msgs = self.notifs.get(_name(remote_agent_name), [])
        for i, msg in enumerate(msgs):
            if (tag_is_prefix and msg.startswith(lookup_tag)) or (
                not tag_is_prefix and lookup_tag in msg
            ):
                del msgs[i]
                return True
        return False

    def send_notif(self, remote_agent_name: str, notif_msg: bytes,
                   backend: Optional[str] = None) -> None:
        """Sends a notification outside any transfer."""
        self.agent.notify(_name(remote_agent_name), as_bytes(notif_msg, "notif_msg") or b"")
