//! The engine: registry, remote agents, the transfer table and its lifecycle.
//!
//! # Lifecycle
//!
//! [`Engine::prepare`] (or [`Engine::make_xfer`] from prepared lists)
//! validates and resolves a request into a slot of the transfer table and
//! hands out an [`XferHandle`] (slot index + generation). [`Engine::post`]
//! starts it: `Prepared → InProgress`, or straight to `Done` when the
//! transport completes inline. [`Engine::poll`] drains the transport's
//! completions: `InProgress → Done | Failed`; [`Engine::poll_with`] also
//! hands each transfer it ended to a visitor (an [`Ended`]), so that a
//! caller learns which ended without looking at the ones still in flight.
//! A `Done` or `Failed` transfer may be posted again; an `InProgress` one
//! may not. [`Engine::release`] frees the slot and bumps its generation,
//! so the old handle is stale and a late completion carrying the old
//! token is ignored. Each post of a
//! transfer gets a token of its own (slot, generation and post count), so a
//! late or duplicate completion of an earlier post never finishes a re-post
//! either; [`Engine::ignored_completions`] counts those dropped. Releasing an
//! in-progress transfer asks the transport to cancel it; if it cannot, the
//! release is refused with [`Error::InProgress`].
//!
//! # Deadlines
//!
//! With [`EngineConfig::deadline`] set, each post must finish within it.
//! [`Engine::poll`] gives up on every transfer in flight whose deadline
//! has come (`now >= posted + deadline`): it asks the transport to
//! [`abandon`](Transport::abandon) it and fails it with
//! [`Error::TimedOut`]. If the transport cannot abandon it yet, it stays in
//! flight (its memory stays reported by [`Transport::in_use`]) and is tried
//! again [`ABANDON_RETRY`] later. A completion arriving after that is
//! ignored. [`Engine::poll_timeout`] says when the next deadline comes, so
//! that a caller sleeping on the transport wakes in time.
//!
//! # Remote agents
//!
//! [`Engine::load_remote`] connects to a peer from its metadata and unpacks
//! its keys. Loading the same name again, or [`Engine::invalidate_remote`],
//! retires the old load: transfers and prepared lists made against it fail
//! with [`Error::StalePeer`] when posted or used, transfers already in
//! flight finish normally, and the old keys and connection are handed back
//! to the transport once the last transfer using them is released.
//!
//! # Notifications
//!
//! A notification travels as `[name_len: u8][sender name][payload]`; the
//! engine adds the frame when sending and strips it in
//! [`Engine::poll_notification`].

use core::fmt;
use core::time::Duration;

use crate::desc::{self, DescList, Resolved, SegRec};
use crate::error::{bounded, Error, MetaError, Name, Side, NAME_CAP};
use crate::mem::{Desc, Region};
use crate::registry::Registry;
use crate::storage::{
    Capacities, Managed, NoteSlot, PeerSlot, PeerState, PrepForm, PrepSlot, RemoteSlot, Storage,
    XferSlot, NIL,
};
use crate::time::Instant;
use crate::transport::{Capabilities, Chain, PostStatus, Segments, Token, Transport, XferOp};
use crate::wire::{Encoder, Metadata};

/// Engine settings.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct EngineConfig {
    /// Merge neighbouring descriptors that are contiguous on both sides and
    /// inside the same registrations (default on).
    pub coalesce: bool,
    /// Most segments of one transfer after coalescing (default: no limit
    /// but the segment table's).
    pub segments_per_xfer: u32,
    /// How long each post may take before [`Engine::poll`] gives up on it
    /// with [`Error::TimedOut`] (default `None`: no deadline).
    pub deadline: Option<Duration>,
}

/// How long after a refused [`Transport::abandon`] the engine asks again.
pub const ABANDON_RETRY: Duration = Duration::from_millis(1);

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            coalesce: true,
            segments_per_xfer: u32::MAX,
            deadline: None,
        }
    }
}

impl EngineConfig {
    /// Sets [`coalesce`](Self::coalesce).
    pub fn with_coalesce(mut self, on: bool) -> Self {
        self.coalesce = on;
        self
    }

    /// Sets [`segments_per_xfer`](Self::segments_per_xfer).
    pub fn with_segments_per_xfer(mut self, n: u32) -> Self {
        self.segments_per_xfer = n;
        self
    }

    /// Sets [`deadline`](Self::deadline).
    pub fn with_deadline(mut self, deadline: Option<Duration>) -> Self {
        self.deadline = deadline;
        self
    }
}

/// Names one transfer: slot index and generation. A handle whose transfer
/// was released is stale; it never names another transfer.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct XferHandle {
    /// Slot in the transfer table.
    pub index: u32,
    /// Generation of the slot when the handle was issued.
    pub generation: u32,
}

impl fmt::Display for XferHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}.{}", self.index, self.generation)
    }
}

/// Where a transfer is in its lifecycle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum XferState {
    /// Prepared, never posted.
    Prepared,
    /// Posted; data may be moving.
    InProgress,
    /// All data is at its destination.
    Done,
    /// It failed, and why.
    Failed(Error),
}

/// What a transfer did, for applications' telemetry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct XferTelemetry {
    /// Bytes moved per post.
    pub bytes: u64,
    /// Descriptors as given.
    pub descs: u32,
    /// Segments after coalescing.
    pub segments: u32,
    /// When the last post started.
    pub posted_at: Option<Instant>,
    /// How long the last `post` call took (from `now` at post to `now` at
    /// the end of post, as measured by the caller) — set by [`Engine::post_finished`].
    pub post_nanos: u64,
    /// When the last post completed (as seen by `poll`).
    pub completed_at: Option<Instant>,
}

impl XferTelemetry {
    /// Nothing yet.
    pub const EMPTY: XferTelemetry = XferTelemetry {
        bytes: 0,
        descs: 0,
        segments: 0,
        posted_at: None,
        post_nanos: 0,
        completed_at: None,
    };
}

/// A transfer that ended, as [`Engine::poll_with`] and
/// [`Engine::fail_peer_with`] hand it on.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Ended<'e> {
    /// The transfer.
    pub handle: XferHandle,
    /// How it ended: [`XferState::Done`] or [`XferState::Failed`].
    pub state: &'e XferState,
    /// Its telemetry, `completed_at` set to when it ended.
    pub telemetry: &'e XferTelemetry,
}

/// A received notification's origin and length (its bytes are in the
/// caller's buffer).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notification {
    /// The sending agent.
    pub peer: Name,
    /// Payload length in the caller's buffer.
    pub len: usize,
}

/// What [`Engine::peer_activity`] knows of a peer's liveness.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct PeerActivity {
    /// Transfers in flight to the peer.
    pub in_flight: u32,
    /// When a transfer to it last completed, or was posted while none was
    /// in flight; `None` before its first post.
    pub heard_at: Option<Instant>,
    /// Whether [`Engine::fail_peer`] declared it unreachable.
    pub failed: bool,
}

/// A descriptor list resolved once against the local registry
/// ([`Engine::prep_local`]). Entries are used by index in
/// [`Engine::make_xfer`].
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct PreparedLocal {
    /// Slot in the prepared-list table.
    pub index: u32,
    /// Generation of the slot when the handle was issued.
    pub generation: u32,
}

/// A descriptor list resolved once against a remote agent's regions
/// ([`Engine::prep_remote`]).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct PreparedRemote {
    /// Slot in the prepared-list table.
    pub index: u32,
    /// Generation of the slot when the handle was issued.
    pub generation: u32,
}

/// Polls of the transport made while dropping an engine whose transfers
/// cannot be cancelled, before giving up on them.
const DROP_DRAIN_POLLS: usize = 100_000;

/// A post's token: `[generation: 32][post count: 16][slot index: 16]`.
/// Slot indices stay below `u16::MAX` (capacities fit in 16 bits), so the
/// low 32 bits are never all ones, a value wrappers such as the staging
/// transport keep for their own tokens.
fn token_of(index: usize, generation: u32, post: u16) -> Token {
    Token(((generation as u64) << 32) | ((post as u64) << 16) | (index as u64 & 0xffff))
}

/// Splits a token into slot index, generation and post count.
fn token_parts(token: Token) -> (usize, u32, u16) {
    (
        (token.0 & 0xffff) as usize,
        (token.0 >> 32) as u32,
        ((token.0 >> 16) & 0xffff) as u16,
    )
}

fn name_error(name: &str) -> Error {
    Error::InvalidName {
        len: name.len() as u64,
    }
}

/// The sender's name at the start of a notification frame
/// (`[name_len][name]…`), if the frame is well formed that far.
fn sender(frame: &[u8]) -> Option<&str> {
    let (&name_len, rest) = frame.split_first()?;
    let name_len = name_len as usize;
    if name_len == 0 || name_len > NAME_CAP {
        // No agent has such a name; cutting it would name another.
        return None;
    }
    core::str::from_utf8(rest.get(..name_len)?).ok()
}

/// Fills in the peer's name in a disconnection reported without one.
fn with_peer(e: Error, peer: &Name) -> Error {
    match e {
        Error::RemoteDisconnected { peer: p } if p.is_empty() => {
            Error::RemoteDisconnected { peer: peer.clone() }
        }
        e => e,
    }
}

/// Links `n` slots `0..n` into a free list through `next`; returns its head.
fn link_free<S>(slots: &mut [S], n: usize, next: impl Fn(&mut S) -> &mut u32) -> u32 {
    for (i, s) in slots.iter_mut().take(n).enumerate() {
        *next(s) = if i + 1 < n { (i + 1) as u32 } else { NIL };
    }
    if n == 0 {
        NIL
    } else {
        0
    }
}

/// Moves the live ranges handed out of a bump-allocated pool to its front,
/// in address order, and returns the new top. `range` reads a slot's range
/// (`None` when it has none), `set` moves it and `mv(from, to, len)` moves
/// the entries. Quadratic in the slots; runs only when the pool's end is
/// reached.
fn compact<S>(
    slots: &mut [S],
    range: impl Fn(&S) -> Option<(u32, u32)>,
    set: impl Fn(&mut S, u32),
    mut mv: impl FnMut(u32, u32, u32),
) -> u32 {
    let mut top = 0u32;
    loop {
        let next = slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| range(s).map(|(start, len)| (i, start, len)))
            .filter(|&(_, start, len)| start >= top && len > 0)
            .min_by_key(|&(_, start, _)| start);
        let Some((i, start, len)) = next else {
            return top;
        };
        if start != top {
            mv(start, top, len);
            set(&mut slots[i], top);
        }
        top += len;
    }
}

/// The `count` records of the chunk chain starting at `first`.
fn chain_records<'s>(
    segs: &'s [SegRec],
    links: &'s [u32],
    chunk_len: usize,
    first: u32,
    count: u32,
) -> impl Iterator<Item = &'s SegRec> + 's {
    let mut chunk = first;
    let mut left = count as usize;
    core::iter::from_fn(move || {
        if chunk == NIL || left == 0 {
            return None;
        }
        let at = chunk as usize * chunk_len;
        let n = left.min(chunk_len);
        left -= n;
        chunk = links.get(chunk as usize).copied().unwrap_or(NIL);
        segs.get(at..at + n)
    })
    .flatten()
}

/// Where a transfer's segments are being written: a chain of chunks.
struct SegWriter {
    first: u32,
    last: u32,
    /// Records in the last chunk.
    used: usize,
    /// Records in all.
    count: usize,
    bytes: u64,
}

/// The sans-IO transfer engine over transport `T`, in storage the caller
/// provides ([`Storage`]).
///
/// The capacities are the storage's sizes ([`Engine::capacities`]); a full
/// table is [`Error::CapacityExceeded`] naming it, its capacity and the
/// [`Capacities`] field that raises it.
pub struct Engine<'a, T: Transport> {
    transport: T,
    name: Name,
    config: EngineConfig,
    caps: Capabilities,
    limits: Capacities,
    registry: Registry<'a, T::LocalReg>,
    peers: Managed<'a, PeerSlot<T::Peer>>,
    remote: Managed<'a, RemoteSlot<T::RemoteKey>>,
    /// First unused entry of `remote`.
    remote_top: u32,
    xfers: Managed<'a, XferSlot>,
    free_xfer: u32,
    segs: Managed<'a, SegRec>,
    links: Managed<'a, u32>,
    chunk_len: usize,
    free_chunk: u32,
    preps: Managed<'a, PrepSlot>,
    free_prep: u32,
    entries: Managed<'a, Resolved>,
    /// First unused entry of `entries`.
    entries_top: u32,
    notes: Managed<'a, u8>,
    note_slots: Managed<'a, NoteSlot>,
    note_len: usize,
    free_note: u32,
    in_flight: usize,
    ignored_completions: u64,
    /// No transfer in flight expires before this (it may be earlier than
    /// the true next deadline, never later).
    next_expiry: Option<Instant>,
}

impl<'a, T: Transport> Engine<'a, T> {
    /// A new engine for agent `name` (1 to [`NAME_CAP`] bytes) over
    /// `transport`, keeping its tables in `storage`. Regions, peers and
    /// transfers are limited to 65,535 each: more is
    /// [`Error::InvalidCapacity`].
    pub fn new(
        name: &str,
        transport: T,
        config: EngineConfig,
        storage: Storage<'a, T>,
    ) -> Result<Self, Error> {
        if name.is_empty() || name.len() > NAME_CAP {
            return Err(name_error(name));
        }
        let limits = storage.capacities();
        limits.check()?;
        let Storage {
            regions,
            mut peers,
            mut remote,
            mut xfers,
            segments,
            mut chunks,
            mut preps,
            entries,
            notes,
            mut note_slots,
        } = storage;
        for p in peers.iter_mut() {
            *p = PeerSlot::EMPTY;
        }
        for r in remote.iter_mut() {
            *r = RemoteSlot::EMPTY;
        }
        for x in xfers.iter_mut() {
            *x = XferSlot::EMPTY;
        }
        for p in preps.iter_mut() {
            *p = PrepSlot::EMPTY;
        }
        let free_xfer = link_free(&mut xfers, limits.xfers as usize, |x| &mut x.next_free);
        let free_prep = link_free(&mut preps, limits.prepared_lists as usize, |p| {
            &mut p.next_free
        });
        let n_notes = note_slots.len();
        let free_note = link_free(&mut note_slots, n_notes, |n| &mut n.next_free);
        let chunk_len = limits.segments_per_chunk as usize;
        let n_chunks = if chunk_len == 0 { 0 } else { chunks.len() };
        let free_chunk = link_free(&mut chunks, n_chunks, |c| c);
        let caps = transport.capabilities();
        Ok(Engine {
            transport,
            name: bounded(name),
            config,
            caps,
            limits,
            registry: Registry::new(regions),
            peers,
            remote,
            remote_top: 0,
            xfers,
            free_xfer,
            segs: segments,
            links: chunks,
            chunk_len,
            free_chunk,
            preps,
            free_prep,
            entries,
            entries_top: 0,
            note_len: limits.notification_len as usize,
            notes,
            note_slots,
            free_note,
            in_flight: 0,
            ignored_completions: 0,
            next_expiry: None,
        })
    }

    /// This agent's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The transport's backend name.
    pub fn backend(&self) -> &'static str {
        self.transport.name()
    }

    /// The transport.
    pub fn transport(&self) -> &T {
        &self.transport
    }

    /// The transport, mutably.
    pub fn transport_mut(&mut self) -> &mut T {
        &mut self.transport
    }

    /// The settings.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// The transport's capabilities, as read when the engine was made.
    pub fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    /// The table sizes this engine was given.
    pub fn capacities(&self) -> &Capacities {
        &self.limits
    }

    /// Registers a local region.
    pub fn register(&mut self, region: Region) -> Result<(), Error> {
        if !self.caps.mem_kinds.contains(region.kind) {
            return Err(Error::UnsupportedMemKind {
                backend: self.transport.name(),
                kind: region.kind,
            });
        }
        self.registry.check(&region)?;
        let handle = self.transport.register(&region)?;
        self.registry
            .insert(region, handle)
            .map(|_| ())
            .map_err(|(e, handle)| {
                self.transport.deregister(handle);
                e
            })
    }

    /// Deregisters the region starting at `addr`; refused with
    /// [`Error::RegionBusy`] while live transfers or prepared lists use it,
    /// and with [`Error::RegionInUse`] while the library may still touch
    /// its memory for a transfer that was cancelled or timed out (poll and
    /// try again). Only `Ok` means the memory may be freed.
    pub fn deregister(&mut self, addr: u64) -> Result<Region, Error> {
        if let Some(slot) = self.registry.find_addr(addr) {
            if let Some(e) = self.registry.get(slot) {
                if e.region.addr == addr && e.users() == 0 && self.transport.in_use(&e.handle) {
                    return Err(Error::RegionInUse { addr });
                }
            }
        }
        let (region, handle) = self.registry.remove(addr)?;
        self.transport.deregister(handle);
        Ok(region)
    }

    /// The registered regions, in address order.
    pub fn regions(&self) -> impl Iterator<Item = Region> + '_ {
        self.registry.iter().map(|(_, e)| e.region)
    }

    /// Writes this agent's metadata (name, backend, address, regions +
    /// keys) into `out`; returns its length.
    pub fn local_metadata(&self, out: &mut [u8]) -> Result<usize, Error> {
        let transport = &self.transport;
        let mut enc = Encoder::new(out, &self.name, transport.name(), |b| {
            transport.local_address(b)
        })?;
        for (_, e) in self.registry.iter() {
            enc.region(&e.region, |b| transport.pack_key(&e.handle, b))?;
        }
        enc.finish()
    }
}

impl<T: Transport> Drop for Engine<'_, T> {
    /// Cancels what is in flight (or, for transports that cannot cancel,
    /// polls until it finishes, a bounded number of times), then hands
    /// back keys, connections and registrations, in that order. What a
    /// transfer that never ended still uses — its registrations, its
    /// peer's connection and keys — is not handed back (the handles are
    /// forgotten, the memory stays registered), so the library never
    /// touches memory it was told is free.
    fn drop(&mut self) {
        for i in 0..self.xfers.len() {
            let s = &self.xfers[i];
            if s.live
                && s.state == XferState::InProgress
                && self
                    .transport
                    .cancel(token_of(i, s.generation, s.posts))
                    .is_ok()
            {
                self.xfers[i].state = XferState::Failed(Error::Cancelled);
                self.in_flight -= 1;
            }
        }
        let mut polls = 0;
        while self.in_flight > 0 && polls < DROP_DRAIN_POLLS {
            self.poll(Instant::ZERO);
            polls += 1;
        }
        if self.in_flight > 0 {
            log::error!(
                "{}: dropped with {} transfers the transport never ended; their memory \
                 stays registered and their peers connected",
                self.name,
                self.in_flight
            );
        }
        for i in 0..self.xfers.len() {
            if self.xfers[i].live && self.xfers[i].state != XferState::InProgress {
                self.free_xfer(i);
            }
        }
        for i in 0..self.preps.len() {
            if self.preps[i].live {
                self.free_prep(i);
            }
        }
        for p in 0..self.peers.len() {
            let slot = &mut self.peers[p];
            if slot.state == PeerState::Free {
                continue;
            }
            if slot.users == 0 {
                self.free_peer(p);
            } else {
                // A stuck transfer uses it: keep the library's handles.
                core::mem::forget(slot.peer.take());
                let (start, count) = (slot.start as usize, slot.count as usize);
                for r in self.remote.iter_mut().skip(start).take(count) {
                    core::mem::forget(r.key.take());
                }
            }
        }
        let transport = &mut self.transport;
        self.registry.drain(|region, users, handle| {
            if users == 0 {
                transport.deregister(handle);
            } else {
                log::error!(
                    "region {:#x} (+{}) left registered: a transfer still uses it",
                    region.addr,
                    region.len
                );
                core::mem::forget(handle);
            }
        });
    }
}

mod notify;
mod peers;
mod prep;
mod xfer;

#[cfg(test)]
mod tests;
