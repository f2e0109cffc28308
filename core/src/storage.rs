//! Storage the caller hands to the engine.
//!
//! The core never allocates and never picks a capacity: every table of the
//! [`Engine`](crate::Engine) lives in a [`Managed`] slice the caller
//! provides, as smoltcp's `ManagedSlice`. A `no_std` caller lends arrays
//! (`Managed::Borrowed`); with the `alloc` feature, [`Storage::owned`]
//! sizes owned vectors from [`Capacities`]. The capacities are the slices'
//! lengths.
//!
//! ```
//! use kvxfer_core::storage::{
//!     Managed, NoteSlot, PeerSlot, PrepSlot, RegionSlot, RemoteSlot, Storage, XferSlot,
//! };
//! use kvxfer_core::desc::{Resolved, SegRec};
//! use kvxfer_core::transport::loopback::{Loopback, LoopbackMemory};
//! use kvxfer_core::{Engine, EngineConfig, Region};
//!
//! type L = Loopback<'static, 4096>;
//! static MEM: LoopbackMemory<4096> = LoopbackMemory::new(0x1000);
//! let mut regions = [RegionSlot::EMPTY; 4];
//! let mut peers = [PeerSlot::EMPTY; 2];
//! let mut remote = [RemoteSlot::EMPTY; 8];
//! let mut xfers = [XferSlot::EMPTY; 4];
//! let mut segments = [SegRec::EMPTY; 64];
//! let mut chunks = [0u32; 4];
//! let mut preps = [PrepSlot::EMPTY; 2];
//! let mut entries = [Resolved::EMPTY; 32];
//! let mut notes = [0u8; 256];
//! let mut note_slots = [NoteSlot::EMPTY; 2];
//! let storage: Storage<'_, L> = Storage {
//!     regions: Managed::Borrowed(&mut regions),
//!     peers: Managed::Borrowed(&mut peers),
//!     remote: Managed::Borrowed(&mut remote),
//!     xfers: Managed::Borrowed(&mut xfers),
//!     segments: Managed::Borrowed(&mut segments),
//!     chunks: Managed::Borrowed(&mut chunks),
//!     preps: Managed::Borrowed(&mut preps),
//!     entries: Managed::Borrowed(&mut entries),
//!     notes: Managed::Borrowed(&mut notes),
//!     note_slots: Managed::Borrowed(&mut note_slots),
//! };
//! let mut e = Engine::new("a", Loopback::new(&MEM, 1), EngineConfig::default(), storage)
//!     .unwrap();
//! e.register(Region::dram(0x1000, 512)).unwrap();
//! assert_eq!(e.capacities().segments_per_chunk, 16);
//! ```

use core::ops::{Deref, DerefMut};

use crate::desc::{Resolved, SegRec};
use crate::engine::XferState;
use crate::error::Name;
use crate::mem::Region;
use crate::registry::Entry;
use crate::transport::{Transport, XferOp};

#[cfg(feature = "alloc")]
extern crate alloc;

/// A slice the caller lends, or (with the `alloc` feature) a vector it
/// gives away.
#[derive(Debug)]
pub enum Managed<'a, T> {
    /// Borrowed for the engine's lifetime.
    Borrowed(&'a mut [T]),
    /// Owned by the engine.
    #[cfg(feature = "alloc")]
    Owned(alloc::vec::Vec<T>),
}

impl<T> Deref for Managed<'_, T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match self {
            Managed::Borrowed(s) => s,
            #[cfg(feature = "alloc")]
            Managed::Owned(v) => v,
        }
    }
}

impl<T> DerefMut for Managed<'_, T> {
    fn deref_mut(&mut self) -> &mut [T] {
        match self {
            Managed::Borrowed(s) => s,
            #[cfg(feature = "alloc")]
            Managed::Owned(v) => v,
        }
    }
}

impl<'a, T> From<&'a mut [T]> for Managed<'a, T> {
    fn from(s: &'a mut [T]) -> Self {
        Managed::Borrowed(s)
    }
}

#[cfg(feature = "alloc")]
impl<T> From<alloc::vec::Vec<T>> for Managed<'_, T> {
    fn from(v: alloc::vec::Vec<T>) -> Self {
        Managed::Owned(v)
    }
}

/// One local registration and its place in the address order.
#[derive(Debug)]
pub struct RegionSlot<R> {
    pub(crate) entry: Option<Entry<R>>,
    /// Element `i` of the registry's address order (a slot index).
    pub(crate) order: u16,
}

impl<R> RegionSlot<R> {
    /// An empty slot.
    pub const EMPTY: Self = RegionSlot {
        entry: None,
        order: 0,
    };
}

/// Whether a peer slot is in use.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum PeerState {
    Free,
    Live,
    Retired,
}

/// One remote agent: its connection and where its regions lie in the
/// remote-region table.
#[derive(Debug)]
pub struct PeerSlot<P> {
    pub(crate) state: PeerState,
    pub(crate) generation: u32,
    pub(crate) name: Name,
    pub(crate) peer: Option<P>,
    /// First entry of this peer's regions in [`Storage::remote`].
    pub(crate) start: u32,
    /// How many regions it published.
    pub(crate) count: u32,
    /// Live transfers made against this load.
    pub(crate) users: u32,
    /// Of those, how many are in flight.
    pub(crate) in_flight: u32,
    /// When a transfer to it last completed, or when one was posted while
    /// none was in flight.
    pub(crate) heard_at: Option<crate::time::Instant>,
    /// Declared unreachable by [`Engine::fail_peer`](crate::Engine::fail_peer):
    /// posts are refused until it is loaded again.
    pub(crate) failed: bool,
}

impl<P> PeerSlot<P> {
    /// An empty slot.
    pub const EMPTY: Self = PeerSlot {
        state: PeerState::Free,
        generation: 0,
        name: Name::new(),
        peer: None,
        start: 0,
        count: 0,
        users: 0,
        in_flight: 0,
        heard_at: None,
        failed: false,
    };
}

/// One region a peer published and the transport's key for it.
#[derive(Debug)]
pub struct RemoteSlot<K> {
    pub(crate) region: Region,
    pub(crate) key: Option<K>,
}

impl<K> RemoteSlot<K> {
    /// An empty slot.
    pub const EMPTY: Self = RemoteSlot {
        region: Region::dram(0, 0),
        key: None,
    };
}

/// Marks the end of a chain (chunks, free lists).
pub(crate) const NIL: u32 = u32::MAX;

/// One transfer of the transfer table.
#[derive(Debug)]
pub struct XferSlot {
    pub(crate) generation: u32,
    pub(crate) live: bool,
    pub(crate) state: XferState,
    pub(crate) op: XferOp,
    pub(crate) peer: u16,
    pub(crate) peer_gen: u32,
    /// First segment chunk, or [`NIL`].
    pub(crate) first_chunk: u32,
    /// Segments after coalescing.
    pub(crate) segs: u32,
    /// Notification slot, or [`NIL`].
    pub(crate) note: u32,
    pub(crate) telemetry: crate::engine::XferTelemetry,
    /// Posts of this slot so far (wrapping); the current post's token
    /// carries it.
    pub(crate) posts: u16,
    /// When the engine next gives up on the post in flight, if it has a
    /// deadline.
    pub(crate) expires: Option<crate::time::Instant>,
    /// Next free slot while this one is free.
    pub(crate) next_free: u32,
}

impl XferSlot {
    /// An empty slot.
    pub const EMPTY: Self = XferSlot {
        generation: 0,
        live: false,
        state: XferState::Prepared,
        op: XferOp::Read,
        peer: 0,
        peer_gen: 0,
        first_chunk: NIL,
        segs: 0,
        note: NIL,
        telemetry: crate::engine::XferTelemetry::EMPTY,
        posts: 0,
        expires: None,
        next_free: NIL,
    };
}

/// How a prepared list's entries are kept.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum PrepForm {
    /// `len` entries from `start` in [`Storage::entries`].
    Explicit { start: u32, len: u32 },
    /// `count` blocks of `len` bytes, `stride` apart from `addr`, all in
    /// one region: no per-entry memory.
    Strided {
        region: u16,
        addr: u64,
        len: u64,
        stride: u64,
        count: u32,
    },
}

/// One prepared descriptor list.
#[derive(Debug)]
pub struct PrepSlot {
    pub(crate) generation: u32,
    pub(crate) live: bool,
    pub(crate) side: crate::error::Side,
    pub(crate) peer: u16,
    pub(crate) peer_gen: u32,
    pub(crate) form: PrepForm,
    pub(crate) next_free: u32,
}

impl PrepSlot {
    /// An empty slot.
    pub const EMPTY: Self = PrepSlot {
        generation: 0,
        live: false,
        side: crate::error::Side::Local,
        peer: 0,
        peer_gen: 0,
        form: PrepForm::Explicit { start: 0, len: 0 },
        next_free: NIL,
    };
}

/// The length of one notification slot's message, and the free list.
#[derive(Copy, Clone, Debug, Default)]
pub struct NoteSlot {
    pub(crate) len: u32,
    pub(crate) next_free: u32,
}

impl NoteSlot {
    /// An empty slot.
    pub const EMPTY: Self = NoteSlot {
        len: 0,
        next_free: NIL,
    };
}

/// Every table of an engine over transport `T`.
///
/// Sizes: `regions` local registrations (at most 65,535); `peers` remote
/// agents (at most 65,535); `remote` regions of all loaded peers together;
/// `xfers` live transfers (at most 65,535); `segments` segments of all live
/// transfers together, handed out in `segments.len() / chunks.len()`-entry
/// chunks; `preps` prepared lists; `entries` explicit entries of all
/// prepared lists together (strided lists take none); `note_slots`
/// transfers holding a notification at once, each of
/// `notes.len() / note_slots.len()` framed bytes (1 + sender name +
/// payload).
#[derive(Debug)]
pub struct Storage<'a, T: Transport> {
    /// Local registrations.
    pub regions: Managed<'a, RegionSlot<T::LocalReg>>,
    /// Remote agents.
    pub peers: Managed<'a, PeerSlot<T::Peer>>,
    /// Remote regions and keys of all peers.
    pub remote: Managed<'a, RemoteSlot<T::RemoteKey>>,
    /// Live transfers.
    pub xfers: Managed<'a, XferSlot>,
    /// Segment records of all live transfers.
    pub segments: Managed<'a, SegRec>,
    /// One link per segment chunk.
    pub chunks: Managed<'a, u32>,
    /// Prepared lists.
    pub preps: Managed<'a, PrepSlot>,
    /// Explicit entries of all prepared lists.
    pub entries: Managed<'a, Resolved>,
    /// Notification bytes of all slots.
    pub notes: Managed<'a, u8>,
    /// Notification slots.
    pub note_slots: Managed<'a, NoteSlot>,
}

/// Sizes of an engine's tables; see [`Storage`].
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Capacities {
    /// Local registrations.
    pub regions: u32,
    /// Remote agents loaded at once.
    pub peers: u32,
    /// Remote regions of all peers together.
    pub remote_regions: u32,
    /// Live transfers.
    pub xfers: u32,
    /// Segments of all live transfers together.
    pub segments: u32,
    /// Entries per segment chunk.
    pub segments_per_chunk: u32,
    /// Prepared lists.
    pub prepared_lists: u32,
    /// Explicit prepared entries of all lists together.
    pub prepared_entries: u32,
    /// Transfers holding a notification at once.
    pub notifications: u32,
    /// Longest framed notification (1 + sender name + payload).
    pub notification_len: u32,
}

impl Capacities {
    /// Bytes of storage these capacities take for transport `T`.
    pub fn bytes<T: Transport>(&self) -> u64 {
        use core::mem::size_of;
        let n = |count: u32, size: usize| count as u64 * size as u64;
        let chunks = self.segments / self.segments_per_chunk.max(1);
        n(self.regions, size_of::<RegionSlot<T::LocalReg>>())
            + n(self.peers, size_of::<PeerSlot<T::Peer>>())
            + n(self.remote_regions, size_of::<RemoteSlot<T::RemoteKey>>())
            + n(self.xfers, size_of::<XferSlot>())
            + n(self.segments, size_of::<SegRec>())
            + n(chunks, size_of::<u32>())
            + n(self.prepared_lists, size_of::<PrepSlot>())
            + n(self.prepared_entries, size_of::<Resolved>())
            + n(self.notifications, self.notification_len as usize)
            + n(self.notifications, size_of::<NoteSlot>())
    }
}

impl Capacities {
    /// Checks the sizes the engine can index: regions, peers and transfers
    /// at most 65,535 each; otherwise [`Error::InvalidCapacity`](crate::Error::InvalidCapacity).
    pub fn check(&self) -> Result<(), crate::Error> {
        let max = u16::MAX as u32;
        for (setting, value) in [
            ("regions", self.regions),
            ("peers", self.peers),
            ("xfers", self.xfers),
        ] {
            if value > max {
                return Err(crate::Error::InvalidCapacity {
                    setting,
                    value: value as u64,
                    max: max as u64,
                });
            }
        }
        Ok(())
    }
}

fn len32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl<T: Transport> Storage<'_, T> {
    /// The capacities these tables give.
    pub fn capacities(&self) -> Capacities {
        let ratio = |a: usize, b: usize| a.checked_div(b).map_or(0, len32);
        Capacities {
            regions: len32(self.regions.len()),
            peers: len32(self.peers.len()),
            remote_regions: len32(self.remote.len()),
            xfers: len32(self.xfers.len()),
            segments: len32(self.segments.len()),
            segments_per_chunk: ratio(self.segments.len(), self.chunks.len()),
            prepared_lists: len32(self.preps.len()),
            prepared_entries: len32(self.entries.len()),
            notifications: len32(self.note_slots.len()),
            notification_len: ratio(self.notes.len(), self.note_slots.len()),
        }
    }
}

#[cfg(feature = "alloc")]
impl<T: Transport> Storage<'static, T> {
    /// Owned tables of the given capacities (`segments` is rounded down to
    /// whole chunks).
    pub fn owned(caps: &Capacities) -> Self {
        use alloc::vec::Vec;
        fn table<S>(n: u32, empty: impl Fn() -> S) -> Vec<S> {
            (0..n).map(|_| empty()).collect()
        }
        let per_chunk = caps.segments_per_chunk.max(1);
        let chunks = caps.segments / per_chunk;
        Storage {
            regions: Managed::Owned(table(caps.regions, || RegionSlot::EMPTY)),
            peers: Managed::Owned(table(caps.peers, || PeerSlot::EMPTY)),
            remote: Managed::Owned(table(caps.remote_regions, || RemoteSlot::EMPTY)),
            xfers: Managed::Owned(table(caps.xfers, || XferSlot::EMPTY)),
            segments: Managed::Owned(alloc::vec![SegRec::EMPTY; (chunks * per_chunk) as usize]),
            chunks: Managed::Owned(alloc::vec![0u32; chunks as usize]),
            preps: Managed::Owned(table(caps.prepared_lists, || PrepSlot::EMPTY)),
            entries: Managed::Owned(alloc::vec![Resolved::EMPTY; caps.prepared_entries as usize]),
            notes: Managed::Owned(alloc::vec![
                0u8;
                caps.notifications as usize * caps.notification_len as usize
            ]),
            note_slots: Managed::Owned(alloc::vec![NoteSlot::EMPTY; caps.notifications as usize]),
        }
    }
}
