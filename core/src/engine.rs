//! The engine: registry, remote agents, the transfer table and its lifecycle.
//!
//! # Lifecycle
//!
//! [`Engine::prepare`] (or [`Engine::make_xfer`] from prepared lists)
//! validates and resolves a request into a slot of the transfer table and
//! hands out an [`XferHandle`] (slot index + generation). [`Engine::post`]
//! starts it: `Prepared → InProgress`, or straight to `Done` when the
//! transport completes inline. [`Engine::poll`] drains the transport's
//! completions: `InProgress → Done | Failed`. A `Done` or `Failed` transfer
//! may be posted again; an `InProgress` one may not. [`Engine::release`]
//! frees the slot and bumps its generation, so the old handle is stale and
//! a late completion carrying the old token is ignored. Each post of a
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

    fn find_peer(&self, peer: &str) -> Option<usize> {
        self.peers[..self.limits.peers as usize]
            .iter()
            .position(|p| p.state == PeerState::Live && p.name.as_str() == peer)
    }

    fn peer_index(&self, peer: &str) -> Result<usize, Error> {
        self.find_peer(peer)
            .ok_or_else(|| Error::unknown_peer(peer))
    }

    /// The remote-region entries of peer slot `p`.
    fn peer_remote(&self, p: usize) -> &[RemoteSlot<T::RemoteKey>] {
        let slot = &self.peers[p];
        let (start, end) = (slot.start as usize, (slot.start + slot.count) as usize);
        self.remote.get(start..end).unwrap_or(&[])
    }

    /// Hands peer slot `p`'s keys and connection back to the transport
    /// and frees the slot.
    fn free_peer(&mut self, p: usize) {
        let slot = &mut self.peers[p];
        let (start, count) = (slot.start as usize, slot.count as usize);
        let peer = slot.peer.take();
        slot.state = PeerState::Free;
        slot.generation = slot.generation.wrapping_add(1);
        slot.users = 0;
        slot.count = 0;
        for r in self.remote.iter_mut().skip(start).take(count) {
            if let Some(k) = r.key.take() {
                self.transport.release_key(k);
            }
        }
        if let Some(p) = peer {
            self.transport.disconnect(p);
        }
    }

    /// Frees peer slot `p` now, or once its last transfer is released.
    fn retire_peer(&mut self, p: usize) {
        if self.peers[p].users == 0 {
            self.free_peer(p);
        } else {
            self.peers[p].state = PeerState::Retired;
        }
    }

    /// Finds `n` free entries at the end of the remote-region table,
    /// compacting it first if needed.
    fn alloc_remote(&mut self, n: u32) -> Result<u32, Error> {
        let cap = self.remote.len() as u64;
        if self.remote_top as u64 + n as u64 > cap {
            let Engine { peers, remote, .. } = self;
            self.remote_top = compact(
                peers,
                |p| (p.state != PeerState::Free).then_some((p.start, p.count)),
                |p, start| p.start = start,
                |from, to, len| {
                    for k in 0..len as usize {
                        let (f, t) = (from as usize + k, to as usize + k);
                        remote[t].region = remote[f].region;
                        remote[t].key = remote[f].key.take();
                    }
                },
            );
        }
        if self.remote_top as u64 + n as u64 > cap {
            return Err(Error::capacity(
                "remote regions",
                cap as usize,
                "remote_regions",
            ));
        }
        let start = self.remote_top;
        self.remote_top += n;
        Ok(start)
    }

    /// Loads a peer's metadata, replacing an earlier load of the same name
    /// (which is retired even if this load then fails); returns its name.
    pub fn load_remote(&mut self, blob: &[u8]) -> Result<Name, Error> {
        let meta = Metadata::decode(blob)?;
        if meta.backend != self.transport.name() {
            return Err(MetaError::BackendMismatch {
                expected: self.transport.name(),
                found: bounded(meta.backend),
            }
            .into());
        }
        if meta.name == self.name.as_str() {
            return Err(MetaError::SelfReference.into());
        }
        let name: Name = bounded(meta.name);
        let old = self.find_peer(meta.name);
        // Room for the regions once the old load, if unused, is gone;
        // checked before anything changes.
        let in_use: u64 = (self.peers.iter().enumerate())
            .filter(|(i, p)| p.state != PeerState::Free && !(Some(*i) == old && p.users == 0))
            .map(|(_, p)| p.count as u64)
            .sum();
        if in_use + meta.region_count as u64 > self.remote.len() as u64 {
            return Err(Error::capacity(
                "remote regions",
                self.remote.len(),
                "remote_regions",
            ));
        }
        if let Some(old) = old {
            self.retire_peer(old);
        }
        let i = self.peers[..self.limits.peers as usize]
            .iter()
            .position(|p| p.state == PeerState::Free)
            .ok_or(Error::capacity(
                "peers",
                self.limits.peers as usize,
                "peers",
            ))?;
        let start = self.alloc_remote(meta.region_count as u32)?;
        let peer = match self.transport.connect(meta.address) {
            Ok(p) => p,
            Err(e) => {
                self.remote_top = start;
                return Err(with_peer(e, &name));
            }
        };
        let slot = &mut self.peers[i];
        slot.peer = Some(peer);
        slot.start = start;
        slot.count = 0;
        // Claimed now, so that a failed unpack frees what was unpacked.
        slot.state = PeerState::Retired;
        for rec in meta.regions() {
            let slot = &self.peers[i];
            let unpacked = match slot.peer.as_ref() {
                Some(p) => self.transport.unpack_key(p, &rec.region, rec.key),
                None => Err(Error::unknown_peer(&name)),
            };
            match unpacked {
                Ok(key) => {
                    let at = (start + slot.count) as usize;
                    // Room: `alloc_remote` reserved `region_count` entries.
                    if let Some(r) = self.remote.get_mut(at) {
                        r.region = rec.region;
                        r.key = Some(key);
                    }
                    self.peers[i].count += 1;
                }
                Err(e) => {
                    self.free_peer(i);
                    return Err(with_peer(e, &name));
                }
            }
        }
        let slot = &mut self.peers[i];
        slot.state = PeerState::Live;
        slot.name = name.clone();
        slot.users = 0;
        slot.in_flight = 0;
        slot.heard_at = None;
        slot.failed = false;
        log::debug!(
            "{}: loaded remote agent {:?} ({} regions)",
            self.name,
            name,
            slot.count
        );
        Ok(name)
    }

    /// Forgets a peer. Transfers in flight to it finish; others made
    /// against it fail with [`Error::StalePeer`].
    pub fn invalidate_remote(&mut self, peer: &str) -> Result<(), Error> {
        let i = self.peer_index(peer)?;
        self.retire_peer(i);
        Ok(())
    }

    /// Declares a loaded peer unreachable: every transfer in flight to it
    /// is cancelled through the transport and fails with
    /// [`Error::RemoteDisconnected`] naming it, and later posts to it are
    /// refused with that error until it is loaded again. A transfer the
    /// transport cannot cancel stays in flight and ends as the transport
    /// reports it (its memory is never reported free before). Returns how
    /// many transfers failed.
    pub fn fail_peer(&mut self, peer: &str, now: Instant) -> Result<usize, Error> {
        let p = self.peer_index(peer)?;
        self.peers[p].failed = true;
        let mut failed = 0;
        for i in 0..self.xfers.len() {
            let s = &self.xfers[i];
            if !(s.live && s.peer as usize == p && s.state == XferState::InProgress) {
                continue;
            }
            let error = Error::RemoteDisconnected {
                peer: self.peers[p].name.clone(),
            };
            match self.give_up(i, error, now) {
                Ok(()) => failed += 1,
                Err(e) => log::warn!("{}: {peer:?} is unreachable, but a transfer to it cannot be cancelled ({e}); it stays in flight", self.name),
            }
        }
        Ok(failed)
    }

    /// Gives up on in-flight transfer `i`: asks the transport to abandon
    /// it and, if it can, fails it with `error` at `now`. If it cannot,
    /// the transfer stays in flight and the transport's error is returned.
    fn give_up(&mut self, i: usize, error: Error, now: Instant) -> Result<(), Error> {
        let s = &self.xfers[i];
        self.transport.abandon(token_of(i, s.generation, s.posts))?;
        let s = &mut self.xfers[i];
        s.state = XferState::Failed(error);
        s.telemetry.completed_at = Some(now);
        s.expires = None;
        self.in_flight -= 1;
        let peer = &mut self.peers[s.peer as usize];
        peer.in_flight = peer.in_flight.saturating_sub(1);
        Ok(())
    }

    /// Gives up on every transfer in flight whose deadline has come; returns
    /// how many failed. One the transport cannot abandon yet is tried again
    /// [`ABANDON_RETRY`] later.
    fn expire(&mut self, now: Instant) -> usize {
        if !self.next_expiry.is_some_and(|at| at <= now) {
            return 0;
        }
        let mut next: Option<Instant> = None;
        let mut failed = 0;
        for i in 0..self.xfers.len() {
            let s = &self.xfers[i];
            if !(s.live && s.state == XferState::InProgress) {
                continue;
            }
            let Some(at) = s.expires else {
                continue;
            };
            if now < at {
                next = Some(next.map_or(at, |n| n.min(at)));
                continue;
            }
            let posted = s.telemetry.posted_at.unwrap_or(now);
            let after_ms = now.saturating_nanos_since(posted) / 1_000_000;
            match self.give_up(i, Error::TimedOut { after_ms }, now) {
                Ok(()) => failed += 1,
                Err(e) => {
                    log::debug!(
                        "{}: transfer #{i} is past its deadline but cannot be abandoned yet ({e})",
                        self.name
                    );
                    let retry = now.saturating_add(ABANDON_RETRY);
                    self.xfers[i].expires = Some(retry);
                    next = Some(next.map_or(retry, |n| n.min(retry)));
                }
            }
        }
        self.next_expiry = next;
        failed
    }

    /// When [`poll`](Engine::poll) next has a deadline to enforce, if any
    /// transfer in flight has one: a caller that sleeps until new
    /// completions should wake by then. It may be earlier than needed
    /// (never later).
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.in_flight == 0 {
            None
        } else {
            self.next_expiry
        }
    }

    /// What is known of a loaded peer's liveness: transfers in flight to
    /// it, when one last completed (or was posted while none was in
    /// flight), and whether [`fail_peer`](Engine::fail_peer) declared it
    /// unreachable.
    pub fn peer_activity(&self, peer: &str) -> Result<PeerActivity, Error> {
        let p = &self.peers[self.peer_index(peer)?];
        Ok(PeerActivity {
            in_flight: p.in_flight,
            heard_at: p.heard_at,
            failed: p.failed,
        })
    }

    /// The names of loaded peers with transfers in flight.
    pub fn busy_peers(&self) -> impl Iterator<Item = &str> + '_ {
        self.peers[..self.limits.peers as usize]
            .iter()
            .filter(|p| p.state == PeerState::Live && p.in_flight > 0)
            .map(|p| p.name.as_str())
    }

    /// The transport's connection to a loaded peer.
    pub fn remote_peer(&self, peer: &str) -> Result<&T::Peer, Error> {
        let p = self.peer_index(peer)?;
        self.peers[p]
            .peer
            .as_ref()
            .ok_or_else(|| Error::unknown_peer(peer))
    }

    /// Whether a peer is loaded.
    pub fn has_remote(&self, peer: &str) -> bool {
        self.find_peer(peer).is_some()
    }

    /// The regions a loaded peer published, in address order.
    pub fn remote_regions(&self, peer: &str) -> Result<impl Iterator<Item = Region> + '_, Error> {
        let p = self.peer_index(peer)?;
        Ok(self.peer_remote(p).iter().map(|r| r.region))
    }

    /// Resolves `desc` (number `index`) against peer slot `p`'s regions.
    fn resolve_remote(&self, p: usize, index: usize, desc: &Desc) -> Result<Resolved, Error> {
        let regions = self.peer_remote(p);
        let pos = desc::resolve_sorted(Side::Remote, index, desc, regions.len(), |i| {
            regions[i].region
        })?;
        Ok(Resolved {
            region: pos as u16,
            addr: desc.addr,
            len: desc.len,
        })
    }

    /// Checks that `descs` all lie in the peer's regions.
    pub fn check_remote(&self, peer: &str, descs: &[Desc]) -> Result<(), Error> {
        let p = self.peer_index(peer)?;
        for (i, d) in descs.iter().enumerate() {
            self.resolve_remote(p, i, d)?;
        }
        Ok(())
    }

    /// Frames `payload` with this agent's name into note slot `n`. The
    /// frame must fit both the slot and the transport's notification limit;
    /// when not even the frame around an empty payload fits, the error
    /// gives the framed length and the limit.
    fn frame(&mut self, n: u32, payload: &[u8]) -> Result<(), Error> {
        let limit = self.note_len.min(self.caps.max_notification as usize);
        let overhead = 1 + self.name.len();
        if overhead > limit {
            return Err(Error::NotificationTooLong {
                len: (overhead + payload.len()) as u64,
                max: limit as u64,
            });
        }
        let max = limit - overhead;
        if payload.len() > max {
            return Err(Error::NotificationTooLong {
                len: payload.len() as u64,
                max: max as u64,
            });
        }
        let at = n as usize * self.note_len;
        let out = &mut self.notes[at..at + overhead + payload.len()];
        out[0] = self.name.len() as u8;
        out[1..overhead].copy_from_slice(self.name.as_bytes());
        out[overhead..].copy_from_slice(payload);
        self.note_slots[n as usize].len = (overhead + payload.len()) as u32;
        Ok(())
    }

    /// Takes a notification slot and frames `payload` into it.
    fn take_note(&mut self, payload: &[u8]) -> Result<u32, Error> {
        let n = self.free_note;
        if n == NIL {
            return Err(Error::capacity(
                "notifications",
                self.note_slots.len(),
                "notifications",
            ));
        }
        self.free_note = self.note_slots[n as usize].next_free;
        if let Err(e) = self.frame(n, payload) {
            self.put_note(n);
            return Err(e);
        }
        Ok(n)
    }

    fn put_note(&mut self, n: u32) {
        if let Some(s) = self.note_slots.get_mut(n as usize) {
            s.next_free = self.free_note;
            self.free_note = n;
        }
    }

    /// A free transfer slot exists (checked before segments are filled).
    fn check_xfer_room(&self) -> Result<(), Error> {
        if self.free_xfer == NIL {
            return Err(Error::capacity(
                "transfers",
                self.limits.xfers as usize,
                "xfers",
            ));
        }
        Ok(())
    }

    fn take_xfer(&mut self) -> Result<usize, Error> {
        self.check_xfer_room()?;
        let i = self.free_xfer;
        self.free_xfer = self.xfers[i as usize].next_free;
        Ok(i as usize)
    }

    fn put_xfer(&mut self, i: usize) {
        self.xfers[i].next_free = self.free_xfer;
        self.free_xfer = i as u32;
    }

    /// Gives a chain of chunks back to the free list.
    fn free_chain(&mut self, first: u32) {
        let mut c = first;
        while c != NIL {
            let next = self.links[c as usize];
            self.links[c as usize] = self.free_chunk;
            self.free_chunk = c;
            c = next;
        }
    }

    /// Appends `seg` to `w`, merging it into the last record when
    /// coalescing allows, taking a new chunk when the last one is full.
    fn push_seg(&mut self, w: &mut SegWriter, seg: SegRec) -> Result<(), Error> {
        w.bytes = w.bytes.saturating_add(seg.len);
        if self.config.coalesce && w.count > 0 {
            let at = w.last as usize * self.chunk_len + w.used - 1;
            if self.segs[at].merge(&seg) {
                return Ok(());
            }
        }
        if w.count >= self.config.segments_per_xfer as usize {
            return Err(Error::capacity(
                "segments per transfer",
                self.config.segments_per_xfer as usize,
                "segments_per_xfer",
            ));
        }
        if w.first == NIL || w.used == self.chunk_len {
            let c = self.free_chunk;
            if c == NIL {
                return Err(Error::capacity(
                    "segments",
                    self.links.len() * self.chunk_len,
                    "segments",
                ));
            }
            self.free_chunk = self.links[c as usize];
            self.links[c as usize] = NIL;
            if w.first == NIL {
                w.first = c;
            } else {
                self.links[w.last as usize] = c;
            }
            w.last = c;
            w.used = 0;
        }
        self.segs[w.last as usize * self.chunk_len + w.used] = seg;
        w.used += 1;
        w.count += 1;
        Ok(())
    }

    /// Fills a new segment chain from `count` pairs made by `pair(self, k)`.
    fn fill(
        &mut self,
        count: usize,
        pair: impl Fn(&Self, usize) -> Result<SegRec, Error>,
    ) -> Result<SegWriter, Error> {
        let mut w = SegWriter {
            first: NIL,
            last: NIL,
            used: 0,
            count: 0,
            bytes: 0,
        };
        for k in 0..count {
            let r = pair(self, k).and_then(|seg| self.push_seg(&mut w, seg));
            if let Err(e) = r {
                self.free_chain(w.first);
                return Err(e);
            }
        }
        Ok(w)
    }

    /// Calls `f` on each of slot `i`'s segment records.
    fn for_each_seg(&self, i: usize, f: impl FnMut(&SegRec)) {
        let x = &self.xfers[i];
        let recs = chain_records(
            &self.segs,
            &self.links,
            self.chunk_len,
            x.first_chunk,
            x.segs,
        );
        recs.for_each(f);
    }

    /// Makes a live transfer of the filled chain `w` against peer slot
    /// `peer`. If the transfer exceeds the transport's limits or the
    /// notification does not fit, everything is given back.
    fn commit_xfer(
        &mut self,
        op: XferOp,
        peer: usize,
        notification: Option<&[u8]>,
        descs: usize,
        w: SegWriter,
    ) -> Result<XferHandle, Error> {
        if self.caps.max_segments != 0 && w.count > self.caps.max_segments as usize {
            self.free_chain(w.first);
            return Err(Error::capacity(
                "segments",
                self.caps.max_segments as usize,
                "",
            ));
        }
        let note = match notification.map(|n| self.take_note(n)).transpose() {
            Ok(n) => n.unwrap_or(NIL),
            Err(e) => {
                self.free_chain(w.first);
                return Err(e);
            }
        };
        let i = match self.take_xfer() {
            Ok(i) => i,
            Err(e) => {
                self.free_chain(w.first);
                self.put_note(note);
                return Err(e);
            }
        };
        let peer_gen = self.peers[peer].generation;
        self.peers[peer].users += 1;
        let slot = &mut self.xfers[i];
        slot.first_chunk = w.first;
        slot.segs = w.count as u32;
        slot.note = note;
        slot.live = true;
        slot.state = XferState::Prepared;
        slot.op = op;
        slot.peer = peer as u16;
        slot.peer_gen = peer_gen;
        slot.telemetry = XferTelemetry {
            bytes: w.bytes,
            descs: descs as u32,
            segments: w.count as u32,
            ..XferTelemetry::default()
        };
        let generation = slot.generation;
        let recs = chain_records(
            &self.segs,
            &self.links,
            self.chunk_len,
            w.first,
            w.count as u32,
        );
        recs.for_each(|s| self.registry.acquire(s.local));
        Ok(XferHandle {
            index: i as u32,
            generation,
        })
    }

    /// Validates, resolves and coalesces a request into a prepared transfer.
    pub fn prepare(
        &mut self,
        op: XferOp,
        local: &[Desc],
        remote: &[Desc],
        peer: &str,
        notification: Option<&[u8]>,
    ) -> Result<XferHandle, Error> {
        self.prepare_lists(op, local.into(), remote.into(), peer, notification)
    }

    /// [`prepare`](Engine::prepare) for explicit or strided lists.
    pub fn prepare_lists(
        &mut self,
        op: XferOp,
        local: DescList<'_>,
        remote: DescList<'_>,
        peer: &str,
        notification: Option<&[u8]>,
    ) -> Result<XferHandle, Error> {
        let p = self.peer_index(peer)?;
        desc::check_counts(local.len(), remote.len())?;
        self.check_xfer_room()?;
        let missing = |k: usize| Error::IndexOutOfRange {
            side: Side::Local,
            index: k as u32,
            value: k as u32,
            len: 0,
        };
        let w = self.fill(local.len(), |e, k| {
            let (l, r) = (local.get(k), remote.get(k));
            let (Some(l), Some(r)) = (l, r) else {
                return Err(missing(k));
            };
            let l = desc::resolve_local(&e.registry, k, &l)?;
            let r = e.resolve_remote(p, k, &r)?;
            desc::pair(k, &l, &r)
        })?;
        self.commit_xfer(op, p, notification, local.len(), w)
    }

    /// Finds `n` free explicit entries at the end of the prepared-entry
    /// table, compacting it first if needed.
    fn alloc_entries(&mut self, n: usize) -> Result<u32, Error> {
        let cap = self.entries.len();
        if self.entries_top as usize + n > cap {
            let Engine { preps, entries, .. } = self;
            self.entries_top = compact(
                preps,
                |p| match p.form {
                    PrepForm::Explicit { start, len } if p.live => Some((start, len)),
                    _ => None,
                },
                |p, start| {
                    if let PrepForm::Explicit { len, .. } = p.form {
                        p.form = PrepForm::Explicit { start, len };
                    }
                },
                |from, to, len| {
                    let (from, to) = (from as usize, to as usize);
                    entries.copy_within(from..from + len as usize, to);
                },
            );
        }
        if self.entries_top as usize + n > cap {
            return Err(Error::capacity(
                "prepared list entries",
                cap,
                "prepared_entries",
            ));
        }
        Ok(self.entries_top)
    }

    /// Resolves `list` with `resolve` into prepared-list slot `i`: compact
    /// when it is strided and lies in one region, else entry by entry.
    fn fill_prep(
        &mut self,
        list: DescList<'_>,
        resolve: impl Fn(&Self, usize, &Desc) -> Result<Resolved, Error>,
    ) -> Result<PrepForm, Error> {
        if let DescList::Strided(s) = list {
            if s.count > 0 {
                let first = resolve(self, 0, &s.get(0))?;
                let whole = s.span().map(|span| Desc::on_dev(s.addr, span, s.dev));
                if let Some(whole) = whole {
                    if let Ok(r) = resolve(self, 0, &whole) {
                        if r.region == first.region {
                            return Ok(PrepForm::Strided {
                                region: first.region,
                                addr: s.addr,
                                len: s.len,
                                stride: s.stride,
                                count: s.count,
                            });
                        }
                    }
                }
            }
        }
        let n = list.len();
        let start = self.alloc_entries(n)?;
        for k in 0..n {
            let d = list.get(k).unwrap_or(Desc::new(0, 0));
            let r = resolve(self, k, &d)?;
            self.entries[start as usize + k] = r;
        }
        self.entries_top = start + n as u32;
        Ok(PrepForm::Explicit {
            start,
            len: n as u32,
        })
    }

    fn take_prep(&mut self) -> Result<usize, Error> {
        let i = self.free_prep;
        if i == NIL {
            return Err(Error::capacity(
                "prepared lists",
                self.preps.len(),
                "prepared_lists",
            ));
        }
        Ok(i as usize)
    }

    /// Makes prepared-list slot `i` (the free list's head) live.
    fn commit_prep(&mut self, i: usize, side: Side, peer: usize, form: PrepForm) -> u32 {
        let peer_gen = self.peers.get(peer).map_or(0, |p| p.generation);
        self.free_prep = self.preps[i].next_free;
        let slot = &mut self.preps[i];
        slot.live = true;
        slot.side = side;
        slot.peer = peer as u16;
        slot.peer_gen = peer_gen;
        slot.form = form;
        slot.generation
    }

    /// Adds (or with `release`, removes) prepared list `i`'s users of its
    /// local regions.
    fn prep_users(&mut self, i: usize, release: bool) {
        let count = |reg: &mut Registry<'a, T::LocalReg>, region: u16, n: u32| {
            if release {
                reg.release_n(region, n)
            } else {
                reg.acquire_n(region, n)
            }
        };
        match self.preps[i].form {
            PrepForm::Strided { region, .. } => count(&mut self.registry, region, 1),
            PrepForm::Explicit { start, len } => {
                let (start, len) = (start as usize, len as usize);
                for k in start..start + len {
                    let region = self.entries[k].region;
                    count(&mut self.registry, region, 1);
                }
            }
        }
    }

    /// Resolves `descs` against the local registry once, for
    /// [`make_xfer`](Engine::make_xfer). The list counts as a user of its
    /// regions until [`release_local`](Engine::release_local).
    pub fn prep_local(&mut self, descs: &[Desc]) -> Result<PreparedLocal, Error> {
        self.prep_local_list(descs.into())
    }

    /// [`prep_local`](Engine::prep_local) for an explicit or strided list.
    /// A strided list that lies in one region takes no per-entry memory.
    pub fn prep_local_list(&mut self, list: DescList<'_>) -> Result<PreparedLocal, Error> {
        let i = self.take_prep()?;
        let form = self.fill_prep(list, |e, k, d| desc::resolve_local(&e.registry, k, d))?;
        let generation = self.commit_prep(i, Side::Local, 0, form);
        self.prep_users(i, false);
        Ok(PreparedLocal {
            index: i as u32,
            generation,
        })
    }

    /// Resolves `descs` against the regions of `peer` once, for
    /// [`make_xfer`](Engine::make_xfer). It goes stale when the peer is
    /// reloaded or invalidated.
    pub fn prep_remote(&mut self, peer: &str, descs: &[Desc]) -> Result<PreparedRemote, Error> {
        self.prep_remote_list(peer, descs.into())
    }

    /// [`prep_remote`](Engine::prep_remote) for an explicit or strided list.
    pub fn prep_remote_list(
        &mut self,
        peer: &str,
        list: DescList<'_>,
    ) -> Result<PreparedRemote, Error> {
        let p = self.peer_index(peer)?;
        let i = self.take_prep()?;
        let form = self.fill_prep(list, |e, k, d| e.resolve_remote(p, k, d))?;
        let generation = self.commit_prep(i, Side::Remote, p, form);
        Ok(PreparedRemote {
            index: i as u32,
            generation,
        })
    }

    fn prep_slot(&self, index: u32, generation: u32, side: Side) -> Result<usize, Error> {
        match self.preps.get(index as usize) {
            Some(s) if s.live && s.generation == generation && s.side == side => Ok(index as usize),
            _ => Err(Error::StalePrepared { index, generation }),
        }
    }

    /// Entries of prepared list `i`.
    fn prep_len(&self, i: usize) -> u32 {
        match self.preps[i].form {
            PrepForm::Explicit { len, .. } => len,
            PrepForm::Strided { count, .. } => count,
        }
    }

    /// Entry `k` of prepared list `i`.
    fn prep_entry(&self, i: usize, k: u32) -> Option<Resolved> {
        match self.preps[i].form {
            PrepForm::Explicit { start, len } => {
                (k < len).then(|| self.entries[(start + k) as usize])
            }
            PrepForm::Strided {
                region,
                addr,
                len,
                stride,
                count,
            } => (k < count).then(|| Resolved {
                region,
                addr: addr + stride * k as u64,
                len,
            }),
        }
    }

    fn free_prep(&mut self, i: usize) {
        if self.preps[i].side == Side::Local {
            self.prep_users(i, true);
        }
        let slot = &mut self.preps[i];
        if let PrepForm::Explicit { start, len } = slot.form {
            if start + len == self.entries_top {
                self.entries_top = start;
            }
        }
        slot.form = PrepForm::Explicit { start: 0, len: 0 };
        slot.live = false;
        slot.generation = slot.generation.wrapping_add(1);
        slot.next_free = self.free_prep;
        self.free_prep = i as u32;
    }

    /// Releases a local prepared list.
    pub fn release_local(&mut self, list: PreparedLocal) -> Result<(), Error> {
        let i = self.prep_slot(list.index, list.generation, Side::Local)?;
        self.free_prep(i);
        Ok(())
    }

    /// Releases a remote prepared list.
    pub fn release_remote(&mut self, list: PreparedRemote) -> Result<(), Error> {
        let i = self.prep_slot(list.index, list.generation, Side::Remote)?;
        self.free_prep(i);
        Ok(())
    }

    /// The name of the peer a prepared remote list belongs to.
    pub fn prepared_peer(&self, list: PreparedRemote) -> Result<&str, Error> {
        let ri = self.prep_slot(list.index, list.generation, Side::Remote)?;
        Ok(self.peers[self.preps[ri].peer as usize].name.as_str())
    }

    /// Makes a transfer from entries of prepared lists: pair `k` moves
    /// `local[local_idx[k]]` and `remote[remote_idx[k]]`. Only counts,
    /// indices and lengths are checked; the descriptors were validated
    /// when the lists were prepared. O(n) in the pairs.
    pub fn make_xfer(
        &mut self,
        op: XferOp,
        local: PreparedLocal,
        local_idx: &[u32],
        remote: PreparedRemote,
        remote_idx: &[u32],
        notification: Option<&[u8]>,
    ) -> Result<XferHandle, Error> {
        let li = self.prep_slot(local.index, local.generation, Side::Local)?;
        let ri = self.prep_slot(remote.index, remote.generation, Side::Remote)?;
        let p = self.preps[ri].peer as usize;
        let peer = &self.peers[p];
        if peer.state != PeerState::Live || peer.generation != self.preps[ri].peer_gen {
            return Err(Error::StalePeer {
                peer: peer.name.clone(),
            });
        }
        desc::check_counts(local_idx.len(), remote_idx.len())?;
        self.check_xfer_room()?;
        let w = self.fill(local_idx.len(), |e, k| {
            let (lx, rx) = (local_idx[k], remote_idx[k]);
            let range = |side, value: u32, len: u32| Error::IndexOutOfRange {
                side,
                index: k as u32,
                value,
                len,
            };
            let l = e
                .prep_entry(li, lx)
                .ok_or_else(|| range(Side::Local, lx, e.prep_len(li)))?;
            let r = e
                .prep_entry(ri, rx)
                .ok_or_else(|| range(Side::Remote, rx, e.prep_len(ri)))?;
            desc::pair(k, &l, &r)
        })?;
        self.commit_xfer(op, p, notification, local_idx.len(), w)
    }

    fn slot_index(&self, handle: XferHandle) -> Result<usize, Error> {
        match self.xfers.get(handle.index as usize) {
            Some(s) if s.live && s.generation == handle.generation => Ok(handle.index as usize),
            _ => Err(Error::StaleHandle { handle }),
        }
    }

    /// Posts (or re-posts) a transfer. Returns its state after the post:
    /// `InProgress`, or `Done` if the transport finished inline. A
    /// transport error is returned and also left as the `Failed` state.
    pub fn post(&mut self, handle: XferHandle, now: Instant) -> Result<XferState, Error> {
        let i = self.slot_index(handle)?;
        let slot = &self.xfers[i];
        if slot.state == XferState::InProgress {
            return Err(Error::InProgress { handle });
        }
        let p = slot.peer as usize;
        let peer = &self.peers[p];
        let stale = || Error::StalePeer {
            peer: peer.name.clone(),
        };
        if peer.state != PeerState::Live || peer.generation != slot.peer_gen {
            return Err(stale());
        }
        let Some(endpoint) = peer.peer.as_ref() else {
            return Err(stale());
        };
        if peer.failed {
            return Err(Error::RemoteDisconnected {
                peer: peer.name.clone(),
            });
        }
        let (start, count) = (peer.start as usize, peer.count as usize);
        let remote = self.remote.get(start..start + count).unwrap_or(&[]);
        // Every record must name a live registration and key before the
        // transport reads them in place.
        let mut missing = None;
        self.for_each_seg(i, |s| {
            if missing.is_none() {
                if self.registry.get(s.local).is_none() {
                    missing = Some(Error::NotRegistered {
                        addr: s.local_addr,
                        len: s.len,
                    });
                } else if remote
                    .get(s.remote as usize)
                    .and_then(|r| r.key.as_ref())
                    .is_none()
                {
                    missing = Some(stale());
                }
            }
        });
        if let Some(e) = missing {
            return Err(e);
        }
        let segments = Segments::chain(
            Chain {
                segs: &self.segs,
                links: &self.links,
                chunk_len: self.chunk_len,
                first: slot.first_chunk,
                regions: self.registry.slots(),
                remote,
            },
            slot.segs as usize,
        );
        let notification = (slot.note != NIL).then(|| {
            let at = slot.note as usize * self.note_len;
            let len = self
                .note_slots
                .get(slot.note as usize)
                .map_or(0, |n| n.len as usize);
            self.notes.get(at..at + len).unwrap_or(&[])
        });
        let posts = slot.posts.wrapping_add(1);
        let token = token_of(i, slot.generation, posts);
        let result = self
            .transport
            .post(slot.op, endpoint, segments, notification, token);
        let result = result.map_err(|e| with_peer(e, &self.peers[p].name));
        let slot = &mut self.xfers[i];
        slot.posts = posts;
        slot.telemetry.posted_at = Some(now);
        slot.telemetry.completed_at = None;
        slot.telemetry.post_nanos = 0;
        match result {
            Ok(PostStatus::Done) => {
                slot.state = XferState::Done;
                slot.telemetry.completed_at = Some(now);
                Ok(XferState::Done)
            }
            Ok(PostStatus::InProgress) => {
                slot.state = XferState::InProgress;
                slot.expires = self.config.deadline.map(|d| now.saturating_add(d));
                if let Some(at) = slot.expires {
                    self.next_expiry = Some(self.next_expiry.map_or(at, |n| n.min(at)));
                }
                self.in_flight += 1;
                let peer = &mut self.peers[p];
                if peer.in_flight == 0 {
                    peer.heard_at = Some(now);
                }
                peer.in_flight += 1;
                Ok(XferState::InProgress)
            }
            Err(e) => {
                slot.state = XferState::Failed(e.clone());
                Err(e)
            }
        }
    }

    /// Records when the caller's `post` call returned, for telemetry.
    /// Ignored for a stale handle.
    pub fn post_finished(&mut self, handle: XferHandle, now: Instant) {
        if let Ok(i) = self.slot_index(handle) {
            let t = &mut self.xfers[i].telemetry;
            if let Some(at) = t.posted_at {
                t.post_nanos = now.saturating_nanos_since(at);
            }
        }
    }

    /// The transfer's state.
    pub fn state(&self, handle: XferHandle) -> Result<XferState, Error> {
        Ok(self.xfers[self.slot_index(handle)?].state.clone())
    }

    /// The transfer's telemetry.
    pub fn telemetry(&self, handle: XferHandle) -> Result<XferTelemetry, Error> {
        Ok(self.xfers[self.slot_index(handle)?].telemetry.clone())
    }

    /// Transfers posted and not yet finished.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Completions ignored so far by [`poll`](Engine::poll): for released
    /// or reused slots, for an earlier post of a re-posted transfer, for a
    /// transfer not in progress, or with a token the engine never issued.
    pub fn ignored_completions(&self) -> u64 {
        self.ignored_completions
    }

    /// Drains the transport's completions, then gives up on transfers past
    /// their [deadline](EngineConfig::deadline); returns how many transfers
    /// finished (timed-out ones included). Completions for released or
    /// reused slots, for an earlier post of the same transfer, or for a
    /// transfer already failed, are ignored (and counted in
    /// [`ignored_completions`](Engine::ignored_completions)).
    pub fn poll(&mut self, now: Instant) -> usize {
        let mut finished = 0;
        while let Some(c) = self.transport.poll() {
            let (index, generation, post) = token_parts(c.token);
            match self.xfers.get_mut(index) {
                Some(s)
                    if s.live
                        && s.generation == generation
                        && s.posts == post
                        && s.state == XferState::InProgress =>
                {
                    s.state = match c.result {
                        Ok(()) => XferState::Done,
                        Err(e) => {
                            XferState::Failed(with_peer(e, &self.peers[s.peer as usize].name))
                        }
                    };
                    s.telemetry.completed_at = Some(now);
                    self.in_flight -= 1;
                    let peer = &mut self.peers[s.peer as usize];
                    peer.in_flight = peer.in_flight.saturating_sub(1);
                    peer.heard_at = Some(now);
                    s.expires = None;
                    finished += 1;
                }
                _ => {
                    self.ignored_completions += 1;
                    log::debug!(
                        "{}: ignoring completion for stale token {:#x}",
                        self.name,
                        c.token.0
                    );
                }
            }
        }
        finished + self.expire(now)
    }

    /// Frees slot `i`: its regions and peer lose a user, its generation
    /// moves on.
    fn free_xfer(&mut self, i: usize) {
        if self.xfers[i].state == XferState::InProgress {
            self.in_flight -= 1;
            let peer = &mut self.peers[self.xfers[i].peer as usize];
            peer.in_flight = peer.in_flight.saturating_sub(1);
        }
        let (first, count) = (self.xfers[i].first_chunk, self.xfers[i].segs);
        let recs = chain_records(&self.segs, &self.links, self.chunk_len, first, count);
        recs.for_each(|s| self.registry.release(s.local));
        self.free_chain(first);
        let note = self.xfers[i].note;
        self.put_note(note);
        let slot = &mut self.xfers[i];
        slot.first_chunk = NIL;
        slot.segs = 0;
        slot.note = NIL;
        slot.live = false;
        slot.state = XferState::Prepared;
        slot.generation = slot.generation.wrapping_add(1);
        let p = slot.peer as usize;
        let peer = &mut self.peers[p];
        peer.users = peer.users.saturating_sub(1);
        if peer.state == PeerState::Retired && peer.users == 0 {
            self.free_peer(p);
        }
        self.put_xfer(i);
    }

    /// Releases a transfer. An in-progress one is cancelled through the
    /// transport; if the transport cannot cancel, the release is refused
    /// with [`Error::InProgress`] and the transfer goes on.
    pub fn release(&mut self, handle: XferHandle) -> Result<(), Error> {
        let i = self.slot_index(handle)?;
        if self.xfers[i].state == XferState::InProgress {
            let token = token_of(i, handle.generation, self.xfers[i].posts);
            match self.transport.cancel(token) {
                Ok(()) => {}
                Err(Error::Unsupported { .. }) => return Err(Error::InProgress { handle }),
                Err(e) => return Err(e),
            }
        }
        self.free_xfer(i);
        Ok(())
    }

    /// Sends a notification to a peer. Its frame is built in a free
    /// notification slot, given back at once.
    pub fn notify(&mut self, peer: &str, msg: &[u8]) -> Result<(), Error> {
        let p = self.peer_index(peer)?;
        let n = self.take_note(msg)?;
        let slot = &self.peers[p];
        let result = match slot.peer.as_ref() {
            Some(endpoint) => {
                let at = n as usize * self.note_len;
                let len = self.note_slots[n as usize].len as usize;
                self.transport
                    .send_notification(endpoint, &self.notes[at..at + len])
                    .map_err(|e| with_peer(e, &slot.name))
            }
            None => Err(Error::unknown_peer(peer)),
        };
        self.put_note(n);
        result
    }

    /// Takes one received notification; its payload goes to the start of
    /// `buf`. `buf` must also hold the frame around it while it is read (1
    /// byte plus the sender's name): a buffer of payload + 65 bytes always
    /// does. A message that does not fit yields [`Error::BufferTooSmall`]
    /// and stays queued.
    pub fn poll_notification(&mut self, buf: &mut [u8]) -> Option<Result<Notification, Error>> {
        let n = match self.transport.poll_notification(buf)? {
            Ok(n) => n,
            Err(Error::NotificationDropped { len, count }) => {
                let head = buf.get(..len as usize).unwrap_or(&[]);
                let peer = sender(head).map(bounded).unwrap_or_default();
                return Some(Err(Error::NotificationsLost { peer, count }));
            }
            Err(e) => return Some(Err(e)),
        };
        let malformed = Error::MalformedNotification { len: n as u64 };
        let Some(frame) = buf.get(..n) else {
            return Some(Err(malformed));
        };
        let Some(name) = sender(frame) else {
            return Some(Err(malformed));
        };
        let name_len = name.len();
        let peer: Name = bounded(name);
        buf.copy_within(1 + name_len..n, 0);
        Some(Ok(Notification {
            peer,
            len: n - 1 - name_len,
        }))
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

#[cfg(test)]
#[path = "engine_tests.rs"]
mod tests;
