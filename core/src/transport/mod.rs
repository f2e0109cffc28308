//! The [`Transport`] trait and the transports that live in the core.
//!
//! Transports come in three kinds, as smoltcp sorts its devices:
//!
//! * a **loopback** ([`loopback::Loopback`]): an in-memory transport whose
//!   "remote" memory is a pair of caller-owned byte arenas, for tests and for
//!   measuring the core's own overhead without any library;
//! * **middleware** ([`fault::FaultInjector`]) that wraps any transport and
//!   fails, delays or reorders its completions by a seeded plan;
//! * **adapters** to real libraries, in their own crates: `kvxfer-ucx`,
//!   `kvxfer-libfabric` and `kvxfer-cuda` (CUDA IPC).
//!
//! # Contract
//!
//! The core calls the transport; the transport never calls back. A transport
//! reports **one** [`Completion`] per posted transfer (not per segment), and
//! only once the data is visible at the target: for a WRITE, after the
//! remote side has the bytes (a flush or delivery-complete), not when the
//! local buffer may be reused. A notification passed to [`Transport::post`]
//! is delivered to the target after the transfer's data.

pub mod fault;
pub mod loopback;

use crate::desc::SegRec;
use crate::error::Error;
use crate::mem::{MemKind, MemKinds, Region};
use crate::storage::{RegionSlot, RemoteSlot};

/// Identifies a posted transfer to its transport; handed back in the
/// [`Completion`]. The core builds it from the transfer's slot, generation
/// and post count, so each post of a transfer has its own token, unique
/// among live transfers.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Token(pub u64);

/// Direction of a transfer, seen from the initiator.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum XferOp {
    /// Copy remote memory into local memory.
    Read,
    /// Copy local memory into remote memory.
    Write,
}

impl XferOp {
    /// "READ" or "WRITE".
    pub const fn name(self) -> &'static str {
        match self {
            XferOp::Read => "READ",
            XferOp::Write => "WRITE",
        }
    }
}

/// One contiguous piece of a transfer, resolved against both registries.
#[derive(Debug)]
pub struct Segment<'a, L, K> {
    /// Local address.
    pub local_addr: u64,
    /// Remote address.
    pub remote_addr: u64,
    /// Bytes to move.
    pub len: u64,
    /// The transport's registration of the local region holding the segment.
    pub local: &'a L,
    /// The transport's unpacked key of the remote region holding the segment.
    pub remote: &'a K,
    /// Start address of the remote region (for transports whose keys are
    /// offset-based rather than virtual-address based).
    pub remote_region_addr: u64,
}

impl<L, K> Clone for Segment<'_, L, K> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<L, K> Copy for Segment<'_, L, K> {}

/// The segments of one [`Transport::post`], in order: a slice, or the
/// engine's own segment table read in place.
pub struct Segments<'a, L, K> {
    src: Source<'a, L, K>,
    len: usize,
}

enum Source<'a, L, K> {
    Slice(&'a [Segment<'a, L, K>]),
    Chain(Chain<'a, L, K>),
}

/// A transfer's records in the engine's chunked segment table.
pub(crate) struct Chain<'a, L, K> {
    /// The segment table.
    pub segs: &'a [SegRec],
    /// Chunk links.
    pub links: &'a [u32],
    /// Entries per chunk.
    pub chunk_len: usize,
    /// The transfer's first chunk.
    pub first: u32,
    /// Local registrations, by slot.
    pub regions: &'a [RegionSlot<L>],
    /// The peer's regions and keys.
    pub remote: &'a [RemoteSlot<K>],
}

impl<L, K> Clone for Chain<'_, L, K> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<L, K> Copy for Chain<'_, L, K> {}

impl<L, K> Clone for Source<'_, L, K> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<L, K> Copy for Source<'_, L, K> {}

impl<L, K> Clone for Segments<'_, L, K> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<L, K> Copy for Segments<'_, L, K> {}

impl<'a, L, K> Segments<'a, L, K> {
    /// Segments read from the engine's table; the engine has checked that
    /// every record's registration and key exist.
    pub(crate) fn chain(chain: Chain<'a, L, K>, len: usize) -> Self {
        Segments {
            src: Source::Chain(chain),
            len,
        }
    }

    /// How many segments.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The only segment, when there is exactly one.
    pub fn single(&self) -> Option<Segment<'a, L, K>> {
        if self.len == 1 {
            self.iter().next()
        } else {
            None
        }
    }

    /// The segments, in order.
    pub fn iter(&self) -> SegmentsIter<'a, L, K> {
        SegmentsIter {
            src: self.src,
            pos: 0,
            chunk: match self.src {
                Source::Chain(c) => c.first,
                Source::Slice(_) => 0,
            },
            left: self.len,
        }
    }
}

impl<'a, L, K> From<&'a [Segment<'a, L, K>]> for Segments<'a, L, K> {
    fn from(s: &'a [Segment<'a, L, K>]) -> Self {
        Segments {
            src: Source::Slice(s),
            len: s.len(),
        }
    }
}

impl<'a, L, K> IntoIterator for Segments<'a, L, K> {
    type Item = Segment<'a, L, K>;
    type IntoIter = SegmentsIter<'a, L, K>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl<'a, L, K> IntoIterator for &Segments<'a, L, K> {
    type Item = Segment<'a, L, K>;
    type IntoIter = SegmentsIter<'a, L, K>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

/// Iterator over [`Segments`].
pub struct SegmentsIter<'a, L, K> {
    src: Source<'a, L, K>,
    /// Index in the slice, or in the current chunk.
    pos: usize,
    chunk: u32,
    left: usize,
}

impl<'a, L, K> Iterator for SegmentsIter<'a, L, K> {
    type Item = Segment<'a, L, K>;

    fn next(&mut self) -> Option<Segment<'a, L, K>> {
        if self.left == 0 {
            return None;
        }
        let seg = match self.src {
            Source::Slice(s) => s.get(self.pos).copied(),
            Source::Chain(c) => {
                if self.pos == c.chunk_len {
                    self.chunk = *c.links.get(self.chunk as usize)?;
                    self.pos = 0;
                }
                let rec = c.segs.get(self.chunk as usize * c.chunk_len + self.pos)?;
                let local = c.regions.get(rec.local as usize)?.entry.as_ref()?;
                let remote = c.remote.get(rec.remote as usize)?;
                Some(Segment {
                    local_addr: rec.local_addr,
                    remote_addr: rec.remote_addr,
                    len: rec.len,
                    local: &local.handle,
                    remote: remote.key.as_ref()?,
                    remote_region_addr: remote.region.addr,
                })
            }
        };
        if seg.is_none() {
            // Unreachable for checked chains; end rather than mislead.
            self.left = 0;
            return None;
        }
        self.pos += 1;
        self.left -= 1;
        seg
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl<L, K> ExactSizeIterator for SegmentsIter<'_, L, K> {}

/// What [`Transport::arm`] found.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Wake {
    /// The transport has no descriptor to sleep on.
    Unsupported,
    /// Work is pending: poll again rather than sleep.
    Busy,
    /// Nothing is pending; this file descriptor becomes readable when the
    /// transport has work. The caller may block on it, then must poll.
    Armed(i32),
}

/// What a transport can do; filled in by each transport.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// Memory kinds it can register and move.
    pub mem_kinds: MemKinds,
    /// Most segments in one [`Transport::post`]; 0 means no limit.
    pub max_segments: u32,
    /// Longest notification in bytes.
    pub max_notification: u32,
    /// Whether [`Transport::cancel`] works.
    pub can_cancel: bool,
    /// Whether [`Transport::post`] may return [`PostStatus::Done`].
    pub may_complete_inline: bool,
}

impl Default for Capabilities {
    fn default() -> Self {
        Capabilities {
            mem_kinds: MemKinds::DRAM,
            max_segments: 0,
            max_notification: 4096,
            can_cancel: false,
            may_complete_inline: false,
        }
    }
}

/// Outcome of a successful [`Transport::post`].
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum PostStatus {
    /// All data is already visible at the target (and the notification, if
    /// any, sent). No [`Completion`] will follow.
    Done,
    /// A [`Completion`] with the same token will come from
    /// [`Transport::poll`].
    InProgress,
}

/// The end of one posted transfer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The token given to [`Transport::post`].
    pub token: Token,
    /// Success, or why it failed.
    pub result: Result<(), Error>,
}

/// A way to move bytes between agents: UCX, libfabric, CUDA IPC, or an
/// in-memory loopback.
///
/// Handles are owned values: the core keeps each [`Transport::LocalReg`],
/// [`Transport::Peer`] and [`Transport::RemoteKey`] until it hands it back
/// through [`deregister`](Transport::deregister),
/// [`disconnect`](Transport::disconnect) or
/// [`release_key`](Transport::release_key). The core never hands back a
/// registration or key while a posted transfer still uses it.
pub trait Transport {
    /// A local registration (memory handle).
    type LocalReg;
    /// A connection to a peer (endpoint, address-vector entry…).
    type Peer;
    /// A peer's unpacked remote key for one of its regions.
    type RemoteKey;

    /// The backend name, upper case: "UCX", "LIBFABRIC", "CUDA_IPC",
    /// "LOOPBACK". Metadata made by another backend is refused.
    fn name(&self) -> &'static str;

    /// What this transport can do.
    fn capabilities(&self) -> Capabilities;

    /// Registers `region` with the library.
    fn register(&mut self, region: &Region) -> Result<Self::LocalReg, Error>;

    /// Releases a registration. The core calls it only when
    /// [`in_use`](Transport::in_use) says the library has let go of it.
    fn deregister(&mut self, reg: Self::LocalReg);

    /// Whether the library may still touch the memory of `reg` for an
    /// operation the core no longer tracks (one of a transfer cancelled or
    /// timed out while the library still ran it). May make progress.
    /// Default: never.
    fn in_use(&mut self, reg: &Self::LocalReg) -> bool {
        let _ = reg;
        false
    }

    /// Writes the packed remote key of `reg` into `out`; returns its length.
    /// Fails with [`Error::BufferTooSmall`] if `out` is too short.
    fn pack_key(&self, reg: &Self::LocalReg, out: &mut [u8]) -> Result<usize, Error>;

    /// Writes this transport's address (worker address, endpoint name, …)
    /// into `out`; returns its length.
    fn local_address(&self, out: &mut [u8]) -> Result<usize, Error>;

    /// Connects to the peer whose address is `address` (as its
    /// [`local_address`](Transport::local_address) wrote it).
    fn connect(&mut self, address: &[u8]) -> Result<Self::Peer, Error>;

    /// Drops a connection. Transfers on it have completed or been cancelled.
    fn disconnect(&mut self, peer: Self::Peer);

    /// Drops a connection at once, as [`disconnect`](Transport::disconnect)
    /// but without first delivering what is still queued on it (a
    /// connection whose link may be dead): what arrives on it afterwards is
    /// refused, never written. Transfers on it have completed or been
    /// abandoned. Default: [`disconnect`](Transport::disconnect).
    fn reset(&mut self, peer: Self::Peer) {
        self.disconnect(peer);
    }

    /// Unpacks a key the peer packed for its region `region`.
    fn unpack_key(
        &mut self,
        peer: &Self::Peer,
        region: &Region,
        key: &[u8],
    ) -> Result<Self::RemoteKey, Error>;

    /// Releases an unpacked key.
    fn release_key(&mut self, key: Self::RemoteKey);

    /// The kind of memory `reg` registered. A wrapper that moves host
    /// memory by other means (same-host cross-memory attach) leaves
    /// segments in GPU memory to the transport. Default: host memory, for
    /// transports whose capabilities hold DRAM only.
    fn local_kind(&self, reg: &Self::LocalReg) -> MemKind {
        let _ = reg;
        MemKind::Dram
    }

    /// The kind of the peer's memory behind `key` (see
    /// [`local_kind`](Self::local_kind)). Default: host memory.
    fn remote_kind(&self, key: &Self::RemoteKey) -> MemKind {
        let _ = key;
        MemKind::Dram
    }

    /// Starts moving `segments` to or from `peer`. `notification`, when
    /// given, must reach the peer after the data. Must not block.
    fn post(
        &mut self,
        op: XferOp,
        peer: &Self::Peer,
        segments: Segments<'_, Self::LocalReg, Self::RemoteKey>,
        notification: Option<&[u8]>,
        token: Token,
    ) -> Result<PostStatus, Error>;

    /// Makes progress and returns one finished transfer, if any. Must not
    /// block.
    fn poll(&mut self) -> Option<Completion>;

    /// Stops the transfer `token`. On `Ok`, the transport no longer touches
    /// the transfer's memory and will never report a completion for it.
    /// Transports that cannot cancel return [`Error::Unsupported`].
    fn cancel(&mut self, token: Token) -> Result<(), Error>;

    /// Gives up on the transfer `token` because its peer is unreachable
    /// (the engine's [`fail_peer`](crate::Engine::fail_peer)) or its
    /// [deadline](crate::EngineConfig::deadline) passed. As
    /// [`cancel`](Transport::cancel), with one difference: a transport that
    /// can stop the transfer only by dropping its connection to the peer
    /// may do so (later posts to that peer then fail until it is connected
    /// again), and may still report a completion for it, which the engine
    /// ignores. Memory the transfer used stays reported by
    /// [`in_use`](Transport::in_use) until the library has let go of it.
    /// An error leaves the transfer in flight; the engine asks again later.
    /// Transports keep no deadlines of their own: the engine owns them.
    /// By default, [`cancel`](Transport::cancel).
    fn abandon(&mut self, token: Token) -> Result<(), Error> {
        self.cancel(token)
    }

    /// Whether a connection dropped by [`reset`](Transport::reset) may
    /// still deliver bytes queued on it (UCX's `tcp` keeps such a socket
    /// open until the peer closes its end): then only
    /// [`renew`](Transport::renew) stops them. Default: false.
    fn needs_renew(&self) -> bool {
        false
    }

    /// Closes every connection of this transport, including those peers
    /// opened to it, and starts again under a new
    /// [`local_address`](Transport::local_address): nothing still queued
    /// on the old connections, either way, is delivered afterwards.
    /// Registrations and packed keys stay valid; every peer must have been
    /// handed back before (and its keys with it), and peers must connect
    /// to the new address. Default: [`Error::Unsupported`].
    fn renew(&mut self) -> Result<(), Error> {
        Err(Error::Unsupported {
            backend: self.name(),
            what: "renew",
        })
    }

    /// Sends a notification to `peer`, outside any transfer.
    fn send_notification(&mut self, peer: &Self::Peer, msg: &[u8]) -> Result<(), Error>;

    /// Prepares the caller to sleep until the transport has work (see
    /// [`Wake`]). Default: [`Wake::Unsupported`].
    fn arm(&mut self) -> Wake {
        Wake::Unsupported
    }

    /// Copies one received notification into `buf` and returns its length,
    /// if one has arrived. A message longer than `buf` yields
    /// [`Error::BufferTooSmall`] and stays queued. Messages the transport
    /// had to drop are reported, never lost in silence, as
    /// [`Error::NotificationDropped`] with the start of one of them in
    /// `buf` (so that the engine can name the sender).
    fn poll_notification(&mut self, buf: &mut [u8]) -> Option<Result<usize, Error>>;
}
