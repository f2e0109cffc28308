//! The one error type of kvxfer.
//!
//! Every variant carries what a user needs to act on it: the index of the
//! bad descriptor, the address that is not registered, the backend and the
//! library's own code and text. Nothing here allocates; names and texts are
//! bounded [`heapless::String`]s and are truncated (on a character boundary)
//! when longer.

use core::fmt;

use crate::engine::XferHandle;
use crate::mem::MemKind;

/// Longest agent name kept in errors and tables, in bytes.
pub const NAME_CAP: usize = 64;
/// Longest library error text kept in [`Error::Backend`], in bytes.
pub const TEXT_CAP: usize = 96;

/// A bounded agent name.
pub type Name = heapless::String<NAME_CAP>;
/// A bounded error text from a library.
pub type Text = heapless::String<TEXT_CAP>;

/// Copies `s` into a bounded string, cutting it at a character boundary if
/// it does not fit.
pub fn bounded<const N: usize>(s: &str) -> heapless::String<N> {
    let mut out = heapless::String::new();
    for ch in s.chars() {
        if out.push(ch).is_err() {
            break;
        }
    }
    out
}

/// Which side of a transfer a descriptor belongs to.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    /// Memory of this agent.
    Local,
    /// Memory of the peer agent.
    Remote,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Local => "local",
            Side::Remote => "remote",
        })
    }
}

/// Why a descriptor was rejected.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum DescError {
    /// `len` is zero.
    ZeroLength,
    /// `addr + len` does not fit in 64 bits.
    AddressOverflow,
    /// No registration contains the descriptor's first byte.
    NotRegistered,
    /// The descriptor starts inside the registration `[region_addr,
    /// region_addr + region_len)` but leaves it.
    OutsideRegistration {
        /// First byte of the registration holding the descriptor's start.
        region_addr: u64,
        /// Length of that registration.
        region_len: u64,
    },
    /// The descriptor's device is not the registration's.
    DeviceMismatch {
        /// The device the registration is on.
        region_dev: u32,
    },
}

/// Why a metadata blob was rejected.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum MetaError {
    /// The blob ended early.
    Truncated {
        /// Bytes needed to go on.
        needed: u64,
        /// Bytes there were.
        available: u64,
    },
    /// The first bytes are not kvxfer's magic.
    BadMagic,
    /// A format version this build does not read.
    UnsupportedVersion {
        /// Version found in the blob.
        found: u16,
        /// Highest version this build reads.
        supported: u16,
    },
    /// The checksum does not match the content.
    ChecksumMismatch {
        /// Checksum stored in the blob.
        stored: u32,
        /// Checksum computed over the content.
        computed: u32,
    },
    /// The blob was made by another backend.
    BackendMismatch {
        /// This agent's backend.
        expected: &'static str,
        /// The blob's backend, as written there.
        found: Name,
    },
    /// A count or length exceeds what this build (or the format) allows.
    TooLarge {
        /// Which field.
        field: &'static str,
        /// The value found.
        value: u64,
        /// The largest value accepted.
        max: u64,
    },
    /// A text field is not UTF-8.
    BadUtf8 {
        /// Which field.
        field: &'static str,
    },
    /// An unknown memory kind code.
    BadMemKind {
        /// The code found.
        code: u8,
    },
    /// A remote region is empty, overflows, or overlaps another.
    BadRegion {
        /// Index of the region in the blob.
        index: u32,
    },
    /// Bytes follow the declared end of the blob.
    TrailingBytes {
        /// How many.
        count: u64,
    },
    /// The blob names this agent itself.
    SelfReference,
}

impl fmt::Display for MetaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetaError::Truncated { needed, available } => {
                write!(f, "truncated: needed {needed} bytes, {available} available")
            }
            MetaError::BadMagic => f.write_str("not kvxfer metadata (bad magic)"),
            MetaError::UnsupportedVersion { found, supported } => {
                write!(
                    f,
                    "format version {found} is newer than supported version {supported}"
                )
            }
            MetaError::ChecksumMismatch { stored, computed } => {
                write!(
                    f,
                    "checksum mismatch: stored {stored:#010x}, computed {computed:#010x}"
                )
            }
            MetaError::BackendMismatch { expected, found } => {
                write!(f, "made by backend {found:?}, this agent uses {expected}")
            }
            MetaError::TooLarge { field, value, max } => {
                write!(f, "{field} is {value}, at most {max} allowed")
            }
            MetaError::BadUtf8 { field } => write!(f, "{field} is not UTF-8"),
            MetaError::BadMemKind { code } => write!(f, "unknown memory kind code {code}"),
            MetaError::BadRegion { index } => {
                write!(f, "region {index} is empty, overflows or overlaps another")
            }
            MetaError::TrailingBytes { count } => write!(f, "{count} trailing bytes"),
            MetaError::SelfReference => f.write_str("metadata names this agent itself"),
        }
    }
}

/// Every failure kvxfer reports.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// A descriptor was rejected.
    InvalidDesc {
        /// Local or remote list.
        side: Side,
        /// Index in the list as given by the caller.
        index: u32,
        /// The descriptor's address.
        addr: u64,
        /// The descriptor's length.
        len: u64,
        /// Why.
        reason: DescError,
    },
    /// No registration starts at `addr` (deregistration) or contains
    /// `[addr, addr+len)`.
    NotRegistered {
        /// Address asked for.
        addr: u64,
        /// Length asked for.
        len: u64,
    },
    /// A new registration overlaps an existing one.
    OverlappingRegistration {
        /// The new region's address.
        addr: u64,
        /// The new region's length.
        len: u64,
        /// The existing region's address.
        existing_addr: u64,
        /// The existing region's length.
        existing_len: u64,
    },
    /// A region given for registration is empty or overflows.
    InvalidRegion {
        /// Its address.
        addr: u64,
        /// Its length.
        len: u64,
    },
    /// Live transfers still reference the region.
    RegionBusy {
        /// The region's address.
        addr: u64,
        /// How many transfer segments reference it.
        users: u32,
    },
    /// No remote agent of this name is loaded.
    UnknownPeer {
        /// The name asked for.
        peer: Name,
    },
    /// Local and remote lists have different lengths.
    CountMismatch {
        /// Local descriptors.
        local: u32,
        /// Remote descriptors.
        remote: u32,
    },
    /// A local descriptor and its remote partner differ in length.
    LengthMismatch {
        /// Index of the pair.
        index: u32,
        /// Local length.
        local: u64,
        /// Remote length.
        remote: u64,
    },
    /// The handle names a released transfer or was never issued.
    StaleHandle {
        /// The handle given.
        handle: XferHandle,
    },
    /// The transfer is in progress: it cannot be re-posted (or released
    /// without a transport that cancels).
    InProgress {
        /// The handle given.
        handle: XferHandle,
    },
    /// A fixed-capacity table is full.
    CapacityExceeded {
        /// Which table: "transfers", "registrations", "peers",
        /// "segments", "remote regions", "notifications".
        what: &'static str,
        /// Its capacity.
        capacity: u32,
        /// The setting that raises it (a [`Capacities`](crate::storage::Capacities)
        /// field, as the std shim's `AgentConfig` names it too); empty when
        /// no setting does.
        setting: &'static str,
    },
    /// A table was given a size the engine cannot index.
    InvalidCapacity {
        /// The [`Capacities`](crate::storage::Capacities) field.
        setting: &'static str,
        /// The size given.
        value: u64,
        /// The largest size allowed.
        max: u64,
    },
    /// The library may still touch a region's memory, for an operation of a
    /// transfer that was cancelled or timed out: it is not deregistered,
    /// and must stay allocated. Poll and try again.
    RegionInUse {
        /// The region's start.
        addr: u64,
    },
    /// The backend cannot move this kind of memory.
    UnsupportedMemKind {
        /// Backend name.
        backend: &'static str,
        /// The kind.
        kind: MemKind,
    },
    /// The operation is not offered by this backend (e.g. cancel).
    Unsupported {
        /// Backend name.
        backend: &'static str,
        /// What was asked.
        what: &'static str,
    },
    /// The transport library failed.
    Backend {
        /// Backend name: its transport's [`Transport::name`](crate::Transport::name).
        backend: &'static str,
        /// The library's own status code.
        code: i64,
        /// The library's text for it, and what was being done.
        text: Text,
    },
    /// The peer went away: its endpoint failed or it closed.
    RemoteDisconnected {
        /// The peer's name.
        peer: Name,
    },
    /// Every network rail to the peer failed (a transport striping over
    /// several rails); no rail is left to carry the transfer.
    RailsFailed {
        /// The peer's name.
        peer: Name,
        /// Each rail tried and why it failed, comma separated (bounded to
        /// [`TEXT_CAP`] bytes).
        rails: Text,
    },
    /// The transfer was cancelled.
    Cancelled,
    /// A deadline passed.
    TimedOut {
        /// How long was waited, in milliseconds.
        after_ms: u64,
    },
    /// A metadata blob was rejected.
    BadMetadata(MetaError),
    /// A caller-supplied buffer is too small.
    BufferTooSmall {
        /// Bytes needed.
        needed: u64,
        /// Bytes given.
        available: u64,
    },
    /// A notification is longer than the backend or the format allows.
    NotificationTooLong {
        /// Its length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// An agent name is empty or too long.
    InvalidName {
        /// Its length in bytes.
        len: u64,
    },
    /// The agent was shut down.
    ShutDown,
    /// A backend name that kvxfer does not know.
    UnsupportedBackend {
        /// The value given (bounded).
        value: heapless::String<32>,
        /// The names accepted, comma separated.
        supported: &'static str,
    },
    /// The peer's metadata was reloaded or invalidated after the transfer
    /// or prepared list was made against it; prepare it again.
    StalePeer {
        /// The peer's name.
        peer: Name,
    },
    /// A prepared descriptor list handle names a released list or was never
    /// issued.
    StalePrepared {
        /// Slot of the handle given.
        index: u32,
        /// Generation of the handle given.
        generation: u32,
    },
    /// An index into a prepared descriptor list is out of range.
    IndexOutOfRange {
        /// Local or remote list.
        side: Side,
        /// Position of the bad index in the caller's index list.
        index: u32,
        /// The index given.
        value: u32,
        /// Length of the prepared list.
        len: u32,
    },
    /// A received notification frame is malformed (bad sender name).
    MalformedNotification {
        /// Length of the frame.
        len: u64,
    },
    /// From a transport's `poll_notification`: `count` received
    /// notifications were dropped (the receive queue was full); the first
    /// `len` bytes of one of them are at the start of the caller's buffer,
    /// so that the engine can name its sender.
    NotificationDropped {
        /// Bytes of the dropped message in the buffer (0: none kept).
        len: u64,
        /// Messages dropped.
        count: u64,
    },
    /// `count` notifications from `peer` were lost on the receiving side
    /// (its queue was full); `peer` is empty when the sender is unknown.
    NotificationsLost {
        /// The sending agent.
        peer: Name,
        /// Messages lost.
        count: u64,
    },
    /// `count` notifications claiming to come from `peer` were refused:
    /// this agent has an authentication key and they were not sealed with
    /// it (sent by a process without the key, or altered on the way).
    NotificationsRefused {
        /// The name the messages claimed.
        peer: Name,
        /// Messages refused.
        count: u64,
    },
}

impl Error {
    /// A backend error with `text` bounded to [`TEXT_CAP`] bytes.
    pub fn backend(backend: &'static str, code: i64, text: &str) -> Error {
        Error::Backend {
            backend,
            code,
            text: bounded(text),
        }
    }

    /// An unknown-peer error for `peer`.
    pub fn unknown_peer(peer: &str) -> Error {
        Error::UnknownPeer {
            peer: bounded(peer),
        }
    }

    /// A full table `what` of `capacity` entries, raised by `setting`.
    pub fn capacity(what: &'static str, capacity: usize, setting: &'static str) -> Error {
        Error::CapacityExceeded {
            what,
            capacity: u32::try_from(capacity).unwrap_or(u32::MAX),
            setting,
        }
    }

    /// Every rail to `peer` failed; `rails` lists them with their reasons
    /// (bounded to [`TEXT_CAP`] bytes).
    pub fn rails_failed(peer: &str, rails: &str) -> Error {
        Error::RailsFailed {
            peer: bounded(peer),
            rails: bounded(rails),
        }
    }

    /// A remote-disconnected error for `peer`.
    pub fn disconnected(peer: &str) -> Error {
        Error::RemoteDisconnected {
            peer: bounded(peer),
        }
    }
}

impl From<MetaError> for Error {
    fn from(e: MetaError) -> Self {
        Error::BadMetadata(e)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidDesc { side, index, addr, len, reason } => {
                write!(f, "{side} descriptor {index} (addr {addr:#x}, len {len}): ")?;
                match reason {
                    DescError::ZeroLength => f.write_str("zero length"),
                    DescError::AddressOverflow => f.write_str("address + length overflows 64 bits"),
                    DescError::NotRegistered => f.write_str("memory is not registered"),
                    DescError::OutsideRegistration { region_addr, region_len } => write!(
                        f,
                        "leaves its registration [{region_addr:#x}, +{region_len})"
                    ),
                    DescError::DeviceMismatch { region_dev } => {
                        write!(f, "device mismatch: registration is on device {region_dev}")
                    }
                }
            }
            Error::NotRegistered { addr, len } => {
                write!(f, "memory [{addr:#x}, +{len}) is not registered")
            }
            Error::OverlappingRegistration { addr, len, existing_addr, existing_len } => write!(
                f,
                "region [{addr:#x}, +{len}) overlaps registered region [{existing_addr:#x}, +{existing_len})"
            ),
            Error::InvalidRegion { addr, len } => {
                write!(f, "region [{addr:#x}, +{len}) is empty or overflows")
            }
            Error::RegionBusy { addr, users } => write!(
                f,
                "region at {addr:#x} is used by {users} segment(s) of live transfers; release them first"
            ),
            Error::UnknownPeer { peer } => write!(f, "unknown remote agent {peer:?}; load its metadata first"),
            Error::CountMismatch { local, remote } => write!(
                f,
                "descriptor count mismatch: {local} local, {remote} remote"
            ),
            Error::LengthMismatch { index, local, remote } => write!(
                f,
                "descriptor {index}: local length {local} differs from remote length {remote}"
            ),
            Error::StaleHandle { handle } => write!(f, "transfer handle {handle} is stale or released"),
            Error::InProgress { handle } => write!(f, "transfer {handle} is still in progress"),
            Error::CapacityExceeded {
                what,
                capacity,
                setting,
            } => {
                write!(f, "{what} table is full (capacity {capacity})")?;
                if !setting.is_empty() {
                    write!(f, "; raise it with the `{setting}` capacity")?;
                }
                Ok(())
            }
            Error::InvalidCapacity {
                setting,
                value,
                max,
            } => write!(f, "capacity `{setting}` of {value} is above its maximum of {max}"),
            Error::RegionInUse { addr } => write!(
                f,
                "region {addr:#x} is still in use by the library (an operation of a cancelled \
                 or timed-out transfer); keep it allocated, poll and deregister again"
            ),
            Error::UnsupportedMemKind { backend, kind } => {
                write!(f, "backend {backend} cannot move {kind} memory")
            }
            Error::Unsupported { backend, what } => write!(f, "backend {backend} does not support {what}"),
            Error::Backend { backend, code, text } => write!(f, "{backend} error {code}: {text}"),
            Error::RemoteDisconnected { peer } => write!(f, "remote agent {peer:?} disconnected"),
            Error::RailsFailed { peer, rails } => {
                write!(f, "peer {peer}: every rail failed ({rails})")
            }
            Error::Cancelled => f.write_str("transfer cancelled"),
            Error::TimedOut { after_ms } => write!(f, "timed out after {after_ms} ms"),
            Error::BadMetadata(e) => write!(f, "bad metadata: {e}"),
            Error::BufferTooSmall { needed, available } => {
                write!(f, "buffer too small: {needed} bytes needed, {available} given")
            }
            Error::NotificationTooLong { len, max } => {
                write!(f, "notification of {len} bytes exceeds the limit of {max}")
            }
            Error::InvalidName { len } => {
                write!(f, "agent name of {len} bytes: must be 1 to {NAME_CAP} bytes")
            }
            Error::ShutDown => f.write_str("agent is shut down"),
            Error::UnsupportedBackend { value, supported } => {
                write!(f, "unsupported backend {value:?}; supported: {supported}")
            }
            Error::StalePeer { peer } => write!(
                f,
                "metadata of remote agent {peer:?} was reloaded or invalidated since this request was prepared; prepare it again"
            ),
            Error::StalePrepared { index, generation } => {
                write!(f, "prepared list handle #{index}.{generation} is stale or released")
            }
            Error::IndexOutOfRange { side, index, value, len } => write!(
                f,
                "{side} index {index}: {value} is out of range for a prepared list of {len}"
            ),
            Error::MalformedNotification { len } => {
                write!(f, "malformed notification frame of {len} bytes")
            }
            Error::NotificationDropped { len, count } => write!(
                f,
                "{count} received notifications dropped by a full queue ({len} bytes of one kept)"
            ),
            Error::NotificationsLost { peer, count } if peer.is_empty() => write!(
                f,
                "{count} notifications from an unknown sender were lost: the receive queue was \
                 full (raise the transport's notification queue, or take notifications sooner)"
            ),
            Error::NotificationsLost { peer, count } => write!(
                f,
                "{count} notifications from {peer:?} were lost: the receive queue was full \
                 (raise the transport's notification queue, or take notifications sooner)"
            ),
            Error::NotificationsRefused { peer, count } => write!(
                f,
                "{count} notifications claiming to come from {peer:?} were refused: not \
                 sealed with this agent's authentication key (a sender without the key, or \
                 an altered message)"
            ),
        }
    }
}

impl core::error::Error for Error {}

impl Error {
    /// Every value [`Error::kind`] returns, indexed by
    /// [`Error::kind_index`]: a table of counters with one per kind (as the
    /// metrics of the std shim keep) is an array of `KINDS.len()`.
    pub const KINDS: [&'static str; 33] = [
        "invalid_desc",
        "not_registered",
        "overlapping_registration",
        "invalid_region",
        "region_busy",
        "unknown_peer",
        "count_mismatch",
        "length_mismatch",
        "stale_handle",
        "in_progress",
        "capacity_exceeded",
        "invalid_capacity",
        "region_in_use",
        "unsupported_mem_kind",
        "unsupported",
        "backend",
        "remote_disconnected",
        "cancelled",
        "timed_out",
        "bad_metadata",
        "buffer_too_small",
        "notification_too_long",
        "invalid_name",
        "shut_down",
        "unsupported_backend",
        "stale_peer",
        "stale_prepared",
        "index_out_of_range",
        "malformed_notification",
        "notification_dropped",
        "notifications_lost",
        "notifications_refused",
        "rails_failed",
    ];

    /// The kind of error, as a short `snake_case` name fit for a metric
    /// label: `"timed_out"`, `"unknown_peer"`, … (one per variant, see
    /// [`Error::KINDS`]).
    pub fn kind(&self) -> &'static str {
        match Self::KINDS.get(self.kind_index()) {
            Some(k) => k,
            None => "unknown",
        }
    }

    /// Position of [`kind`](Error::kind) in [`Error::KINDS`] (always in
    /// range).
    pub const fn kind_index(&self) -> usize {
        match self {
            Error::InvalidDesc { .. } => 0,
            Error::NotRegistered { .. } => 1,
            Error::OverlappingRegistration { .. } => 2,
            Error::InvalidRegion { .. } => 3,
            Error::RegionBusy { .. } => 4,
            Error::UnknownPeer { .. } => 5,
            Error::CountMismatch { .. } => 6,
            Error::LengthMismatch { .. } => 7,
            Error::StaleHandle { .. } => 8,
            Error::InProgress { .. } => 9,
            Error::CapacityExceeded { .. } => 10,
            Error::InvalidCapacity { .. } => 11,
            Error::RegionInUse { .. } => 12,
            Error::UnsupportedMemKind { .. } => 13,
            Error::Unsupported { .. } => 14,
            Error::Backend { .. } => 15,
            Error::RemoteDisconnected { .. } => 16,
            Error::Cancelled => 17,
            Error::TimedOut { .. } => 18,
            Error::BadMetadata(_) => 19,
            Error::BufferTooSmall { .. } => 20,
            Error::NotificationTooLong { .. } => 21,
            Error::InvalidName { .. } => 22,
            Error::ShutDown => 23,
            Error::UnsupportedBackend { .. } => 24,
            Error::StalePeer { .. } => 25,
            Error::StalePrepared { .. } => 26,
            Error::IndexOutOfRange { .. } => 27,
            Error::MalformedNotification { .. } => 28,
            Error::NotificationDropped { .. } => 29,
            Error::NotificationsLost { .. } => 30,
            Error::NotificationsRefused { .. } => 31,
            Error::RailsFailed { .. } => 32,
        }
    }
}
