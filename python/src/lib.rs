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

mod agent;
use agent::*;
mod request;
use request::*;

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
