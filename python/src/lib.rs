//! `kvxfer._kvxfer`: the native module under the Python package `kvxfer`.
//!
//! It is a thin layer over [`kvxfer::Agent`]: descriptor lists arrive as
//! packed little-endian `u64` triples (address, length, device), index lists
//! as packed `u32`s, transfer states leave as small integers, and every
//! [`kvxfer::Error`] becomes an instance of one Python exception class per
//! error kind (all derived from `KvxferError`). The Python package
//! (`kvxfer`, `kvxfer.nixl`) builds the public API on top.
//!
//! Every call that takes the agent's lock or may wait runs with the GIL
//! released, so that other Python threads run meanwhile and an agent can be
//! used from several threads.
#![deny(missing_docs)]
// kvxfer's one error type is allocation-free (bounded strings), hence large.
#![allow(clippy::result_large_err)]
// Methods mirror Python signatures with keyword arguments.
#![allow(clippy::too_many_arguments)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;
use std::time::Duration;

use kvxfer::side_channel::Client;
use kvxfer::{
    Agent as RustAgent, AgentConfig, Desc, DescList, Error, MemKind, PreparedLocal, PreparedRemote,
    Strided, WaitOutcome, XferOp, XferRequest, XferState,
};
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};

create_exception!(
    kvxfer,
    KvxferError,
    PyException,
    "Base class of every error kvxfer reports."
);

/// Declares one exception class per error kind, derived from `KvxferError`,
/// and the function that adds them all to the module.
macro_rules! error_classes {
    ($($name:ident: $doc:literal,)*) => {
        $(create_exception!(kvxfer, $name, KvxferError, $doc);)*

        fn add_error_classes(m: &Bound<'_, PyModule>) -> PyResult<()> {
            let py = m.py();
            m.add("KvxferError", py.get_type::<KvxferError>())?;
            $(m.add(stringify!($name), py.get_type::<$name>())?;)*
            Ok(())
        }
    };
}

error_classes! {
    InvalidDescError: "A descriptor was rejected (zero length, not registered, outside its registration, wrong device).",
    NotRegisteredError: "No registration starts at (or contains) the memory named.",
    OverlappingRegistrationError: "A new registration overlaps an existing one.",
    InvalidRegionError: "A region given for registration is empty or overflows.",
    RegionBusyError: "Live transfers or prepared lists still use the region.",
    UnknownPeerError: "No remote agent of this name is loaded.",
    CountMismatchError: "Local and remote descriptor lists have different lengths.",
    LengthMismatchError: "A local descriptor and its remote partner differ in length.",
    StaleHandleError: "The transfer was released or never issued.",
    InProgressError: "The transfer is in progress: it cannot be re-posted or released yet.",
    CapacityExceededError: "A fixed-capacity table of the agent is full.",
    InvalidCapacityError: "A table was given a size the agent cannot index.",
    RegionInUseError: "The library may still touch the region (a cancelled or timed-out transfer); keep it allocated.",
    UnsupportedMemKindError: "The backend cannot move this kind of memory.",
    UnsupportedError: "The backend does not offer this operation.",
    BackendError: "The transport library (UCX, libfabric, CUDA) failed.",
    RemoteDisconnectedError: "The peer went away: its endpoint failed or it closed.",
    CancelledError: "The transfer was cancelled.",
    TimedOutError: "A deadline passed.",
    BadMetadataError: "A metadata blob was rejected.",
    BufferTooSmallError: "A buffer is too small.",
    NotificationTooLongError: "A notification is longer than the backend allows.",
    InvalidNameError: "An agent name is empty or too long.",
    ShutDownError: "The agent was shut down.",
    UnsupportedBackendError: "A backend name kvxfer does not know or was built without.",
    StalePeerError: "The peer's metadata was reloaded or invalidated since the list or transfer was prepared.",
    StalePreparedError: "A prepared list was released or never issued.",
    IndexOutOfRangeError: "An index into a prepared list is out of range.",
    MalformedNotificationError: "A received notification frame is malformed.",
    NotificationsLostError: "Notifications were lost on the receiving side (its queue was full).",
}

/// The Python exception for `e`: its kind's class, with kvxfer's message.
fn to_py(e: Error) -> PyErr {
    let msg = e.to_string();
    match e {
        Error::InvalidDesc { .. } => InvalidDescError::new_err(msg),
        Error::NotRegistered { .. } => NotRegisteredError::new_err(msg),
        Error::OverlappingRegistration { .. } => OverlappingRegistrationError::new_err(msg),
        Error::InvalidRegion { .. } => InvalidRegionError::new_err(msg),
        Error::RegionBusy { .. } => RegionBusyError::new_err(msg),
        Error::UnknownPeer { .. } => UnknownPeerError::new_err(msg),
        Error::CountMismatch { .. } => CountMismatchError::new_err(msg),
        Error::LengthMismatch { .. } => LengthMismatchError::new_err(msg),
        Error::StaleHandle { .. } => StaleHandleError::new_err(msg),
        Error::InProgress { .. } => InProgressError::new_err(msg),
        Error::CapacityExceeded { .. } => CapacityExceededError::new_err(msg),
        Error::InvalidCapacity { .. } => InvalidCapacityError::new_err(msg),
        Error::RegionInUse { .. } => RegionInUseError::new_err(msg),
        Error::UnsupportedMemKind { .. } => UnsupportedMemKindError::new_err(msg),
        Error::Unsupported { .. } => UnsupportedError::new_err(msg),
        Error::Backend { .. } => BackendError::new_err(msg),
        Error::RemoteDisconnected { .. } => RemoteDisconnectedError::new_err(msg),
        Error::Cancelled => CancelledError::new_err(msg),
        Error::TimedOut { .. } => TimedOutError::new_err(msg),
        Error::BadMetadata(_) => BadMetadataError::new_err(msg),
        Error::BufferTooSmall { .. } => BufferTooSmallError::new_err(msg),
        Error::NotificationTooLong { .. } => NotificationTooLongError::new_err(msg),
        Error::InvalidName { .. } => InvalidNameError::new_err(msg),
        Error::ShutDown => ShutDownError::new_err(msg),
        Error::UnsupportedBackend { .. } => UnsupportedBackendError::new_err(msg),
        Error::StalePeer { .. } => StalePeerError::new_err(msg),
        Error::StalePrepared { .. } => StalePreparedError::new_err(msg),
        Error::IndexOutOfRange { .. } => IndexOutOfRangeError::new_err(msg),
        Error::MalformedNotification { .. } => MalformedNotificationError::new_err(msg),
        Error::NotificationsLost { .. } | Error::NotificationDropped { .. } => {
            NotificationsLostError::new_err(msg)
        }
        _ => KvxferError::new_err(msg),
    }
}

/// `Result<T, Error>` into a Python result.
trait IntoPy<T> {
    fn py_err(self) -> PyResult<T>;
}

impl<T> IntoPy<T> for Result<T, Error> {
    fn py_err(self) -> PyResult<T> {
        self.map_err(to_py)
    }
}

/// Transfer states as the native module reports them.
const STATE_PREPARED: u8 = 0;
/// Posted; data may be moving.
const STATE_PROC: u8 = 1;
/// All data is at its destination.
const STATE_DONE: u8 = 2;
/// Failed; `Request.failure()` says why.
const STATE_ERR: u8 = 3;

fn state_code(s: &XferState) -> u8 {
    match s {
        XferState::Prepared => STATE_PREPARED,
        XferState::InProgress => STATE_PROC,
        XferState::Done => STATE_DONE,
        XferState::Failed(_) => STATE_ERR,
    }
}

fn parse_op(op: &str) -> PyResult<XferOp> {
    match op {
        "WRITE" => Ok(XferOp::Write),
        "READ" => Ok(XferOp::Read),
        other => Err(PyValueError::new_err(format!(
            "unknown operation {other:?}: expected \"WRITE\" or \"READ\""
        ))),
    }
}

fn parse_kind(kind: &str) -> PyResult<MemKind> {
    match kind {
        "DRAM" | "cpu" => Ok(MemKind::Dram),
        "VRAM" | "cuda" => Ok(MemKind::Vram),
        other => Err(PyValueError::new_err(format!(
            "unknown memory type {other:?}: expected \"DRAM\" or \"VRAM\""
        ))),
    }
}

/// Descriptors from packed little-endian `u64` triples (address, length,
/// device).
fn parse_descs(packed: &[u8]) -> PyResult<Vec<Desc>> {
    if packed.len() % 24 != 0 {
        return Err(PyValueError::new_err(format!(
            "descriptor buffer of {} bytes is not a whole number of (address, length, device) \
             rows of 24 bytes",
            packed.len()
        )));
    }
    packed
        .chunks_exact(24)
        .enumerate()
        .map(|(i, row)| {
            let word = |k: usize| {
                let mut b = [0u8; 8];
                b.copy_from_slice(&row[k * 8..k * 8 + 8]);
                u64::from_le_bytes(b)
            };
            let dev = u32::try_from(word(2)).map_err(|_| {
                PyValueError::new_err(format!(
                    "descriptor {i}: device id {} does not fit in 32 bits",
                    word(2)
                ))
            })?;
            Ok(Desc {
                addr: word(0),
                len: word(1),
                dev,
            })
        })
        .collect()
}

/// Indices from packed little-endian `u32`s.
fn parse_indices(packed: &[u8]) -> PyResult<Vec<u32>> {
    if packed.len() % 4 != 0 {
        return Err(PyValueError::new_err(format!(
            "index buffer of {} bytes is not a whole number of 4-byte indices",
            packed.len()
        )));
    }
    Ok(packed
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

fn secs(timeout: f64, what: &str) -> PyResult<Duration> {
    Duration::try_from_secs_f64(timeout).map_err(|_| {
        PyValueError::new_err(format!("{what} of {timeout} s is not a valid duration"))
    })
}

fn notifications_to_py(
    py: Python<'_>,
    notes: HashMap<String, Vec<Vec<u8>>>,
) -> PyResult<Py<PyDict>> {
    let d = PyDict::new(py);
    for (peer, msgs) in notes {
        let list = PyList::empty(py);
        for m in msgs {
            list.append(PyBytes::new(py, &m))?;
        }
        d.set_item(peer, list)?;
    }
    Ok(d.unbind())
}

/// An agent (the native half of `kvxfer.Agent` and `kvxfer.nixl.nixl_agent`).
#[pyclass(frozen, module = "kvxfer._kvxfer")]
struct Agent {
    inner: RustAgent,
}

#[pymethods]
impl Agent {
    /// Creates the agent `name`. `backend` None lets `KVXFER_BACKEND`,
    /// then `TRTLLM_NIXL_KVCACHE_BACKEND`, choose (else UCX); `listen`
    /// None serves no side channel; `transfer_timeout` None leaves the
    /// backend's default, 0 means no deadline; `metrics_addr` None lets
    /// `KVXFER_METRICS_ADDR` decide where metrics are served, "" serves
    /// none.
    #[new]
    #[pyo3(signature = (name, backend=None, listen=Some("127.0.0.1:0".to_string()),
        progress_thread=true, same_host=true, transfer_timeout=None, auth_key=None,
        metrics_addr=None))]
    fn new(
        py: Python<'_>,
        name: &str,
        backend: Option<String>,
        listen: Option<String>,
        progress_thread: bool,
        same_host: bool,
        transfer_timeout: Option<f64>,
        auth_key: Option<Vec<u8>>,
        metrics_addr: Option<String>,
    ) -> PyResult<Self> {
        let mut cfg = AgentConfig::default()
            .with_listen(listen.as_deref())
            .with_progress_thread(progress_thread)
            .with_same_host(same_host);
        if let Some(b) = backend {
            cfg = cfg.with_backend(b);
        }
        if let Some(t) = transfer_timeout {
            let d = secs(t, "transfer_timeout")?;
            cfg = cfg.with_transfer_timeout((!d.is_zero()).then_some(d));
        }
        if let Some(k) = auth_key {
            cfg = cfg.with_auth_key(k);
        }
        if let Some(m) = metrics_addr {
            cfg = cfg.with_metrics_addr(Some(m.as_str()).filter(|m| !m.is_empty()));
        }
        let inner = py.detach(|| RustAgent::new(name, cfg)).py_err()?;
        Ok(Agent { inner })
    }

    /// The agent's name.
    #[getter]
    fn name(&self) -> &str {
        self.inner.name()
    }

    /// The backend in use: "UCX", "LIBFABRIC" or "CUDA_IPC".
    #[getter]
    fn backend(&self) -> &'static str {
        self.inner.backend().name()
    }

    /// Where the side channel listens ("ip:port"), or None.
    #[getter]
    fn listen_addr(&self) -> Option<String> {
        self.inner.listen_addr().map(|a| a.to_string())
    }

    /// Where the metrics endpoint listens ("ip:port"), or None.
    #[getter]
    fn metrics_addr(&self) -> Option<String> {
        self.inner.metrics_addr().map(|a| a.to_string())
    }

    /// This agent's metrics in Prometheus' text format.
    fn metrics_text(&self) -> String {
        self.inner.metrics().encode()
    }

    /// Registers `[addr, addr + length)` on device `dev` as `kind`
    /// ("DRAM" or "VRAM"). The Python caller keeps the memory alive until
    /// it is deregistered.
    #[pyo3(signature = (addr, length, dev=0, kind="DRAM"))]
    fn register(
        &self,
        py: Python<'_>,
        addr: u64,
        length: u64,
        dev: u32,
        kind: &str,
    ) -> PyResult<()> {
        let kind = parse_kind(kind)?;
        // SAFETY: the Python layer registers only memory it keeps alive
        // (it holds a reference to the owning object, or the caller of
        // the NIXL-style API owns the memory, as with NIXL) until
        // `deregister` succeeds, and no Rust reference reads or writes it.
        py.detach(|| unsafe { self.inner.register(addr, length, dev, kind) })
            .py_err()
    }

    /// Deregisters the region starting at `addr`; returns its length.
    fn deregister(&self, py: Python<'_>, addr: u64) -> PyResult<u64> {
        py.detach(|| self.inner.deregister(addr))
            .py_err()
            .map(|r| r.len)
    }

    /// This agent's metadata blob.
    fn local_metadata<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let md = py.detach(|| self.inner.local_metadata()).py_err()?;
        Ok(PyBytes::new(py, &md))
    }

    /// Loads a peer's metadata; returns the peer's name.
    fn load_remote(&self, py: Python<'_>, blob: &[u8]) -> PyResult<String> {
        py.detach(|| self.inner.load_remote(blob)).py_err()
    }

    /// Fetches and loads the metadata of the agent whose side channel
    /// listens on `addr`, then pushes ours; returns the peer's name.
    fn connect(&self, py: Python<'_>, addr: &str) -> PyResult<String> {
        py.detach(|| self.inner.connect(addr)).py_err()
    }

    /// Fetches and loads the metadata of the agent at `addr` (no push).
    #[pyo3(signature = (addr, auth_key=None, timeout=5.0))]
    fn fetch_metadata(
        &self,
        py: Python<'_>,
        addr: &str,
        auth_key: Option<Vec<u8>>,
        timeout: f64,
    ) -> PyResult<String> {
        let timeout = secs(timeout, "timeout")?;
        py.detach(|| {
            let key = auth_key.or_else(|| AgentConfig::default().effective_auth_key());
            let mut c = Client::connect(addr, key.as_deref(), timeout)?;
            let blob = c.get_metadata()?;
            self.inner.load_remote(&blob)
        })
        .py_err()
    }

    /// Pushes this agent's metadata to the agent at `addr`; returns the
    /// name it loaded us under.
    #[pyo3(signature = (addr, auth_key=None, timeout=5.0))]
    fn send_metadata(
        &self,
        py: Python<'_>,
        addr: &str,
        auth_key: Option<Vec<u8>>,
        timeout: f64,
    ) -> PyResult<String> {
        let timeout = secs(timeout, "timeout")?;
        py.detach(|| {
            let key = auth_key.or_else(|| AgentConfig::default().effective_auth_key());
            let ours = self.inner.local_metadata()?;
            let mut c = Client::connect(addr, key.as_deref(), timeout)?;
            c.push_metadata(&ours)
        })
        .py_err()
    }

    /// Asks the agent at `addr` to forget this agent's metadata.
    #[pyo3(signature = (addr, auth_key=None, timeout=5.0))]
    fn invalidate_metadata(
        &self,
        py: Python<'_>,
        addr: &str,
        auth_key: Option<Vec<u8>>,
        timeout: f64,
    ) -> PyResult<()> {
        let timeout = secs(timeout, "timeout")?;
        py.detach(|| {
            let key = auth_key.or_else(|| AgentConfig::default().effective_auth_key());
            let mut c = Client::connect(addr, key.as_deref(), timeout)?;
            c.invalidate(self.inner.name())
        })
        .py_err()
    }

    /// Whether a peer of this name is loaded.
    fn has_remote(&self, py: Python<'_>, peer: &str) -> PyResult<bool> {
        py.detach(|| self.inner.has_remote(peer)).py_err()
    }

    /// Checks that every descriptor (packed triples) lies in memory `peer`
    /// registered.
    fn check_remote(&self, py: Python<'_>, peer: &str, descs: &[u8]) -> PyResult<()> {
        let descs = parse_descs(descs)?;
        py.detach(|| self.inner.check_remote(peer, &descs)).py_err()
    }

    /// Forgets a peer: its connection and keys are released.
    fn invalidate_remote(&self, py: Python<'_>, peer: &str) -> PyResult<()> {
        py.detach(|| self.inner.invalidate_remote(peer)).py_err()
    }

    /// Prepares a local list (packed triples) for `make_xfer`.
    fn prep_local(&self, py: Python<'_>, descs: &[u8]) -> PyResult<Prepared> {
        let descs = parse_descs(descs)?;
        let p = py.detach(|| self.inner.prep_local(&descs)).py_err()?;
        Ok(self.prepared(Side::Local(p), descs.len(), String::new()))
    }

    /// Prepares a local list of `count` blocks of `length` bytes spaced
    /// `stride` bytes apart from `addr`.
    #[pyo3(signature = (addr, length, stride, count, dev=0))]
    fn prep_local_strided(
        &self,
        py: Python<'_>,
        addr: u64,
        length: u64,
        stride: u64,
        count: u32,
        dev: u32,
    ) -> PyResult<Prepared> {
        let list = DescList::Strided(strided(addr, length, stride, count, dev));
        let p = py.detach(|| self.inner.prep_local_list(list)).py_err()?;
        Ok(self.prepared(Side::Local(p), count as usize, String::new()))
    }

    /// Prepares a list of `peer`'s memory (packed triples).
    fn prep_remote(&self, py: Python<'_>, peer: &str, descs: &[u8]) -> PyResult<Prepared> {
        let descs = parse_descs(descs)?;
        let p = py
            .detach(|| self.inner.prep_remote(peer, &descs))
            .py_err()?;
        Ok(self.prepared(Side::Remote(p), descs.len(), peer.to_string()))
    }

    /// [`prep_local_strided`] for `peer`'s memory.
    #[pyo3(signature = (peer, addr, length, stride, count, dev=0))]
    fn prep_remote_strided(
        &self,
        py: Python<'_>,
        peer: &str,
        addr: u64,
        length: u64,
        stride: u64,
        count: u32,
        dev: u32,
    ) -> PyResult<Prepared> {
        let list = DescList::Strided(strided(addr, length, stride, count, dev));
        let p = py
            .detach(|| self.inner.prep_remote_list(peer, list))
            .py_err()?;
        Ok(self.prepared(Side::Remote(p), count as usize, peer.to_string()))
    }

    /// Makes a transfer (not posted) from prepared lists by index (packed
    /// `u32`s): pair k moves `local[local_idx[k]]` and
    /// `remote[remote_idx[k]]`.
    #[pyo3(signature = (op, local, local_idx, remote, remote_idx, notif=None))]
    fn make_xfer(
        &self,
        py: Python<'_>,
        op: &str,
        local: &Prepared,
        local_idx: &[u8],
        remote: &Prepared,
        remote_idx: &[u8],
        notif: Option<&[u8]>,
    ) -> PyResult<Request> {
        let op = parse_op(op)?;
        let Side::Local(l) = local.side else {
            return Err(PyValueError::new_err(
                "the local side is a remote prepared list (prepared for a peer)",
            ));
        };
        let Side::Remote(r) = remote.side else {
            return Err(PyValueError::new_err(
                "the remote side is a local prepared list (prepared for this agent)",
            ));
        };
        let li = parse_indices(local_idx)?;
        let ri = parse_indices(remote_idx)?;
        let req = py
            .detach(|| self.inner.make_xfer(op, l, &li, r, &ri, notif))
            .py_err()?;
        Ok(Request::new(req, self.inner.clone(), remote.peer.clone()))
    }

    /// Prepares a transfer (not posted) between local and `peer`'s
    /// descriptors (packed triples), paired by position.
    #[pyo3(signature = (op, local, remote, peer, notif=None))]
    fn prepare(
        &self,
        py: Python<'_>,
        op: &str,
        local: &[u8],
        remote: &[u8],
        peer: &str,
        notif: Option<&[u8]>,
    ) -> PyResult<Request> {
        let op = parse_op(op)?;
        let l = parse_descs(local)?;
        let r = parse_descs(remote)?;
        let req = py
            .detach(|| self.inner.prepare(op, &l, &r, peer, notif))
            .py_err()?;
        Ok(Request::new(req, self.inner.clone(), peer.to_string()))
    }

    /// Sends `msg` to `peer` outside any transfer.
    fn notify(&self, py: Python<'_>, peer: &str, msg: &[u8]) -> PyResult<()> {
        py.detach(|| self.inner.notify(peer, msg)).py_err()
    }

    /// Takes the notifications received so far: {peer: [bytes, ...]}.
    fn take_notifications(&self, py: Python<'_>) -> PyResult<Py<PyDict>> {
        let n = py.detach(|| self.inner.take_notifications()).py_err()?;
        notifications_to_py(py, n)
    }

    /// Like `take_notifications`, waiting up to `timeout` seconds for one.
    fn wait_notifications(&self, py: Python<'_>, timeout: f64) -> PyResult<Py<PyDict>> {
        let t = secs(timeout, "timeout")?;
        let n = py.detach(|| self.inner.wait_notifications(t)).py_err()?;
        notifications_to_py(py, n)
    }

    /// How data to and from `peer` moves ("cross-memory attach" or the
    /// backend's name).
    fn peer_path(&self, py: Python<'_>, peer: &str) -> PyResult<&'static str> {
        py.detach(|| self.inner.peer_path(peer)).py_err()
    }

    /// Polls the transport once; returns how many transfers finished.
    fn make_progress(&self, py: Python<'_>) -> PyResult<usize> {
        py.detach(|| self.inner.make_progress()).py_err()
    }

    /// Shuts the agent down; afterwards every call raises `ShutDownError`.
    fn shutdown(&self, py: Python<'_>) {
        py.detach(|| self.inner.shutdown());
    }
}

impl Agent {
    fn prepared(&self, side: Side, len: usize, peer: String) -> Prepared {
        Prepared {
            agent: self.inner.clone(),
            side,
            len,
            peer,
            released: AtomicBool::new(false),
        }
    }
}

fn strided(addr: u64, len: u64, stride: u64, count: u32, dev: u32) -> Strided {
    Strided {
        addr,
        len,
        stride,
        count,
        dev,
    }
}

/// Which agent a prepared list belongs to.
#[derive(Clone, Copy)]
enum Side {
    Local(PreparedLocal),
    Remote(PreparedRemote),
}

/// A descriptor list resolved once, for `Agent.make_xfer`.
#[pyclass(frozen, module = "kvxfer._kvxfer")]
struct Prepared {
    agent: RustAgent,
    side: Side,
    len: usize,
    peer: String,
    released: AtomicBool,
}

#[pymethods]
impl Prepared {
    /// Entries in the list.
    fn __len__(&self) -> usize {
        self.len
    }

    /// The peer the list was prepared for ("" for a local list).
    #[getter]
    fn peer(&self) -> &str {
        &self.peer
    }

    /// Whether the list holds this agent's memory.
    #[getter]
    fn is_local(&self) -> bool {
        matches!(self.side, Side::Local(_))
    }

    /// Releases the list; idempotent.
    fn release(&self, py: Python<'_>) -> PyResult<()> {
        if self.released.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        py.detach(|| match self.side {
            Side::Local(p) => self.agent.release_local(p),
            Side::Remote(p) => self.agent.release_remote(p),
        })
        .py_err()
    }
}

impl Drop for Prepared {
    fn drop(&mut self) {
        if !self.released.swap(true, Ordering::AcqRel) {
            // Released without the GIL (it takes the agent's lock); a
            // shut-down agent has released everything already.
            let (agent, side) = (&self.agent, self.side);
            Python::attach(|py| {
                py.detach(|| {
                    let _ = match side {
                        Side::Local(p) => agent.release_local(p),
                        Side::Remote(p) => agent.release_remote(p),
                    };
                })
            });
        }
    }
}

/// A transfer request: post, poll, wait, re-post, release.
#[pyclass(frozen, module = "kvxfer._kvxfer")]
struct Request {
    /// `None` once released.
    inner: RwLock<Option<XferRequest>>,
    agent: RustAgent,
    handle: kvxfer::XferHandle,
    backend: &'static str,
    peer: String,
}

impl Request {
    fn new(req: XferRequest, agent: RustAgent, peer: String) -> Request {
        Request {
            backend: agent.backend().name(),
            agent,
            handle: req.handle(),
            inner: RwLock::new(Some(req)),
            peer,
        }
    }

    fn with<T>(&self, f: impl FnOnce(&XferRequest) -> Result<T, Error>) -> Result<T, Error> {
        let g = self.inner.read().unwrap_or_else(|p| p.into_inner());
        match g.as_ref() {
            Some(r) => f(r),
            None => Err(Error::StaleHandle {
                handle: self.handle,
            }),
        }
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        // Dropping an unreleased request releases it, which may wait for a
        // transfer in flight: without the GIL.
        let taken = self
            .inner
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(req) = taken {
            Python::attach(|py| py.detach(move || drop(req)));
        }
    }
}

#[pymethods]
impl Request {
    /// Posts (or re-posts) the transfer; returns its state code right
    /// after (0 prepared, 1 in progress, 2 done, 3 failed).
    fn post(&self, py: Python<'_>) -> PyResult<u8> {
        let s = py.detach(|| self.with(|r| r.post())).py_err()?;
        Ok(state_code(&s))
    }

    /// The transfer's state code (see `post`). While the transfer is in
    /// progress, the call polls the transport once itself (as NIXL's
    /// status check progresses its backend), so that a caller polling in a
    /// loop sees the completion without waiting for the progress thread to
    /// be scheduled, and then yields its CPU once, so that the threads
    /// moving the data run.
    fn status(&self, py: Python<'_>) -> PyResult<u8> {
        let s = py
            .detach(|| {
                let mut s = self.with(|r| r.status());
                if matches!(s, Ok(XferState::InProgress)) {
                    let _ = self.agent.make_progress();
                    s = self.with(|r| r.status());
                    if matches!(s, Ok(XferState::InProgress)) {
                        std::thread::yield_now();
                    }
                }
                s
            })
            .py_err()?;
        Ok(state_code(&s))
    }

    /// Waits up to `timeout` seconds; returns the state code reached.
    fn wait(&self, py: Python<'_>, timeout: f64) -> PyResult<u8> {
        let t = secs(timeout, "timeout")?;
        let outcome = py.detach(|| self.with(|r| Ok(r.wait(t)))).py_err()?;
        Ok(match outcome {
            WaitOutcome::Done => STATE_DONE,
            WaitOutcome::Failed(_) => STATE_ERR,
            WaitOutcome::InProgress => STATE_PROC,
        })
    }

    /// Why the transfer failed, as an exception instance; None unless it
    /// failed.
    fn failure(&self, py: Python<'_>) -> PyResult<Option<PyErr>> {
        let s = py.detach(|| self.with(|r| r.status()));
        Ok(match s {
            Ok(XferState::Failed(e)) | Err(e) => Some(to_py(e)),
            Ok(_) => None,
        })
    }

    /// Telemetry: (bytes, descriptors, segments, posted_ns, post_ns,
    /// completed_ns); times are nanoseconds on the agent's monotonic clock,
    /// None when not reached.
    #[allow(clippy::type_complexity)]
    fn telemetry(
        &self,
        py: Python<'_>,
    ) -> PyResult<(u64, u32, u32, Option<u64>, u64, Option<u64>)> {
        let t = py.detach(|| self.with(|r| r.telemetry())).py_err()?;
        Ok((
            t.bytes,
            t.descs,
            t.segments,
            t.posted_at.map(|i| i.nanos),
            t.post_nanos,
            t.completed_at.map(|i| i.nanos),
        ))
    }

    /// Measures the Rust side of a post: `n` times, posts the transfer
    /// and polls its status until it ends, all in Rust (the GIL released
    /// once around the loop); returns each round's nanoseconds (for the
    /// benchmark of the Python layer's overhead).
    fn bench_post_poll(&self, py: Python<'_>, n: usize) -> PyResult<Vec<u64>> {
        let mut out = Vec::with_capacity(n);
        py.detach(|| {
            self.with(|r| {
                for _ in 0..n {
                    let t0 = std::time::Instant::now();
                    let mut s = r.post()?;
                    while matches!(s, XferState::InProgress) {
                        s = r.status()?;
                    }
                    if let XferState::Failed(e) = s {
                        return Err(e);
                    }
                    out.push(u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX));
                }
                Ok(())
            })
        })
        .py_err()?;
        Ok(out)
    }

    /// Measures `n` status calls in Rust (the GIL released once around
    /// the loop); returns their total nanoseconds.
    fn bench_status(&self, py: Python<'_>, n: usize) -> PyResult<u64> {
        let t0 = std::time::Instant::now();
        py.detach(|| {
            self.with(|r| {
                for _ in 0..n {
                    r.status()?;
                }
                Ok(())
            })
        })
        .py_err()?;
        Ok(u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX))
    }

    /// The backend moving this transfer.
    #[getter]
    fn backend(&self) -> &'static str {
        self.backend
    }

    /// The peer of this transfer.
    #[getter]
    fn peer(&self) -> &str {
        &self.peer
    }

    /// Whether the request was released.
    #[getter]
    fn released(&self) -> bool {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_none()
    }

    /// Releases the transfer (one in progress is cancelled where the
    /// backend can, else waited for); idempotent.
    fn release(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| {
            let taken = self.inner.write().unwrap_or_else(|p| p.into_inner()).take();
            match taken {
                Some(r) => r.release(),
                None => Ok(()),
            }
        })
        .py_err()
    }
}

/// The native module.
#[pymodule]
fn _kvxfer(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Agent>()?;
    m.add_class::<Prepared>()?;
    m.add_class::<Request>()?;
    add_error_classes(m)?;
    m.add("STATE_PREPARED", STATE_PREPARED)?;
    m.add("STATE_PROC", STATE_PROC)?;
    m.add("STATE_DONE", STATE_DONE)?;
    m.add("STATE_ERR", STATE_ERR)?;
    m.add("BUILT_IN_BACKENDS", kvxfer::config::BUILT_IN)?;
    m.add("CUDA", cfg!(feature = "cuda"))?;
    Ok(())
}
