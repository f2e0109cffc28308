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

use crate::desc::{self, Resolved, SegRec};
use crate::error::{bounded, Error, MetaError, Name, Side, NAME_CAP};
use crate::mem::{Desc, Region};
use crate::registry::Registry;
use crate::time::Instant;
use crate::transport::{Capabilities, PostStatus, Segment, Token, Transport, XferOp};
use crate::wire::{Encoder, Metadata};

/// Engine settings.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct EngineConfig {
    /// Merge neighbouring descriptors that are contiguous on both sides and
    /// inside the same registrations (default on).
    pub coalesce: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig { coalesce: true }
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

/// A received notification's origin and length (its bytes are in the
/// caller's buffer).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notification {
    /// The sending agent.
    pub peer: Name,
    /// Payload length in the caller's buffer.
    pub len: usize,
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

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum PeerState {
    Free,
    Live,
    Retired,
}

struct PeerSlot<T: Transport, const R: usize> {
    state: PeerState,
    generation: u32,
    name: Name,
    peer: Option<T::Peer>,
    regions: heapless::Vec<Region, R>,
    keys: heapless::Vec<T::RemoteKey, R>,
    /// Live transfers made against this load.
    users: u32,
}

impl<T: Transport, const R: usize> PeerSlot<T, R> {
    fn free(&mut self, transport: &mut T) {
        while let Some(k) = self.keys.pop() {
            transport.release_key(k);
        }
        self.regions.clear();
        if let Some(p) = self.peer.take() {
            transport.disconnect(p);
        }
        self.state = PeerState::Free;
        self.generation = self.generation.wrapping_add(1);
        self.users = 0;
    }

    /// Frees the slot now, or once its last transfer is released.
    fn retire(&mut self, transport: &mut T) {
        if self.users == 0 {
            self.free(transport);
        } else {
            self.state = PeerState::Retired;
        }
    }
}

struct XferSlot<const S: usize, const NOTIF: usize> {
    generation: u32,
    live: bool,
    state: XferState,
    op: XferOp,
    peer: u16,
    peer_gen: u32,
    segs: heapless::Vec<SegRec, S>,
    has_notification: bool,
    notification: heapless::Vec<u8, NOTIF>,
    telemetry: XferTelemetry,
    /// Posts of this slot so far (wrapping); the current post's token
    /// carries it.
    posts: u16,
}

struct PrepSlot<const S: usize> {
    generation: u32,
    live: bool,
    side: Side,
    peer: u16,
    peer_gen: u32,
    entries: heapless::Vec<Resolved, S>,
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

/// Takes a free slot from `free`, a list of `N` slots of `what`.
fn take_slot<const N: usize>(
    free: &mut heapless::Vec<u16, N>,
    what: &'static str,
) -> Result<usize, Error> {
    free.pop().map(usize::from).ok_or(Error::CapacityExceeded {
        what,
        capacity: N as u32,
    })
}

fn name_error(name: &str) -> Error {
    Error::InvalidName {
        len: name.len() as u64,
    }
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

/// The sans-IO transfer engine over transport `T`.
///
/// Capacities: `REGIONS` local registrations (and remote regions per
/// peer), `PEERS` remote agents, `XFERS` live transfers, `SEGS` segments
/// per transfer (and entries per prepared list), `NOTIF` bytes of a framed
/// notification (1 + sender name + payload), `PREPS` prepared lists.
///
/// The engine holds every table inline; with the default capacities it is
/// about 700 KiB, so applications keep it in a `static` or on the heap.
pub struct Engine<
    T: Transport,
    const REGIONS: usize = 64,
    const PEERS: usize = 16,
    const XFERS: usize = 64,
    const SEGS: usize = 256,
    const NOTIF: usize = 512,
    const PREPS: usize = 16,
> {
    transport: T,
    name: Name,
    config: EngineConfig,
    caps: Capabilities,
    registry: Registry<T::LocalReg, REGIONS>,
    peers: heapless::Vec<PeerSlot<T, REGIONS>, PEERS>,
    xfers: heapless::Vec<XferSlot<SEGS, NOTIF>, XFERS>,
    free_xfers: heapless::Vec<u16, XFERS>,
    preps: heapless::Vec<PrepSlot<SEGS>, PREPS>,
    free_preps: heapless::Vec<u16, PREPS>,
    ignored_completions: u64,
}

impl<
        T: Transport,
        const REGIONS: usize,
        const PEERS: usize,
        const XFERS: usize,
        const SEGS: usize,
        const NOTIF: usize,
        const PREPS: usize,
    > Engine<T, REGIONS, PEERS, XFERS, SEGS, NOTIF, PREPS>
{
    const CAPACITIES_FIT: () = assert!(
        REGIONS <= u16::MAX as usize
            && PEERS <= u16::MAX as usize
            && XFERS <= u16::MAX as usize
            && PREPS <= u16::MAX as usize,
        "table capacities must fit in 16 bits"
    );

    /// A new engine for agent `name` (1 to [`NAME_CAP`] bytes) over
    /// `transport`.
    pub fn new(name: &str, transport: T, config: EngineConfig) -> Result<Self, Error> {
        #[allow(clippy::let_unit_value)]
        let () = Self::CAPACITIES_FIT;
        if name.is_empty() || name.len() > NAME_CAP {
            return Err(name_error(name));
        }
        let caps = transport.capabilities();
        let mut engine = Engine {
            transport,
            name: bounded(name),
            config,
            caps,
            registry: Registry::new(),
            peers: heapless::Vec::new(),
            xfers: heapless::Vec::new(),
            free_xfers: heapless::Vec::new(),
            preps: heapless::Vec::new(),
            free_preps: heapless::Vec::new(),
            ignored_completions: 0,
        };
        for _ in 0..PEERS {
            let _ = engine.peers.push(PeerSlot {
                state: PeerState::Free,
                generation: 0,
                name: Name::new(),
                peer: None,
                regions: heapless::Vec::new(),
                keys: heapless::Vec::new(),
                users: 0,
            });
        }
        for i in (0..XFERS).rev() {
            let _ = engine.xfers.push(XferSlot {
                generation: 0,
                live: false,
                state: XferState::Prepared,
                op: XferOp::Read,
                peer: 0,
                peer_gen: 0,
                segs: heapless::Vec::new(),
                has_notification: false,
                notification: heapless::Vec::new(),
                telemetry: XferTelemetry::default(),
                posts: 0,
            });
            let _ = engine.free_xfers.push(i as u16);
        }
        for i in (0..PREPS).rev() {
            let _ = engine.preps.push(PrepSlot {
                generation: 0,
                live: false,
                side: Side::Local,
                peer: 0,
                peer_gen: 0,
                entries: heapless::Vec::new(),
            });
            let _ = engine.free_preps.push(i as u16);
        }
        Ok(engine)
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
    /// [`Error::RegionBusy`] while live transfers or prepared lists use it.
    pub fn deregister(&mut self, addr: u64) -> Result<Region, Error> {
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
        self.peers
            .iter()
            .position(|p| p.state == PeerState::Live && p.name.as_str() == peer)
    }

    fn peer_index(&self, peer: &str) -> Result<usize, Error> {
        self.find_peer(peer)
            .ok_or_else(|| Error::unknown_peer(peer))
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
        if meta.region_count as usize > REGIONS {
            return Err(MetaError::TooLarge {
                field: "region count",
                value: meta.region_count as u64,
                max: REGIONS as u64,
            }
            .into());
        }
        let name: Name = bounded(meta.name);
        if let Some(old) = self.find_peer(meta.name) {
            self.peers[old].retire(&mut self.transport);
        }
        let i = self
            .peers
            .iter()
            .position(|p| p.state == PeerState::Free)
            .ok_or(Error::CapacityExceeded {
                what: "peers",
                capacity: PEERS as u32,
            })?;
        let peer = self
            .transport
            .connect(meta.address)
            .map_err(|e| with_peer(e, &name))?;
        let slot = &mut self.peers[i];
        slot.peer = Some(peer);
        for rec in meta.regions() {
            let unpacked = match slot.peer.as_ref() {
                Some(p) => self.transport.unpack_key(p, &rec.region, rec.key),
                None => Err(Error::unknown_peer(&name)),
            };
            match unpacked {
                Ok(key) => {
                    // Room: region_count <= REGIONS was checked.
                    let _ = slot.regions.push(rec.region);
                    let _ = slot.keys.push(key);
                }
                Err(e) => {
                    slot.free(&mut self.transport);
                    return Err(with_peer(e, &name));
                }
            }
        }
        slot.state = PeerState::Live;
        slot.name = name.clone();
        slot.users = 0;
        log::debug!(
            "{}: loaded remote agent {:?} ({} regions)",
            self.name,
            name,
            slot.regions.len()
        );
        Ok(name)
    }

    /// Forgets a peer. Transfers in flight to it finish; others made
    /// against it fail with [`Error::StalePeer`].
    pub fn invalidate_remote(&mut self, peer: &str) -> Result<(), Error> {
        let i = self.peer_index(peer)?;
        self.peers[i].retire(&mut self.transport);
        Ok(())
    }

    /// Whether a peer is loaded.
    pub fn has_remote(&self, peer: &str) -> bool {
        self.find_peer(peer).is_some()
    }

    /// The regions a loaded peer published, in address order.
    pub fn remote_regions(&self, peer: &str) -> Result<&[Region], Error> {
        Ok(&self.peers[self.peer_index(peer)?].regions)
    }

    /// Checks that `descs` all lie in the peer's regions.
    pub fn check_remote(&self, peer: &str, descs: &[Desc]) -> Result<(), Error> {
        let regions = &self.peers[self.peer_index(peer)?].regions;
        for (i, d) in descs.iter().enumerate() {
            desc::resolve_remote(regions, i, d)?;
        }
        Ok(())
    }

    /// Frames `payload` with this agent's name into `out`. The frame must
    /// fit both `M` and the transport's notification limit; when not even
    /// the frame around an empty payload fits, the error gives the framed
    /// length and the limit.
    fn frame<const M: usize>(
        name: &Name,
        caps: &Capabilities,
        payload: &[u8],
        out: &mut heapless::Vec<u8, M>,
    ) -> Result<(), Error> {
        let limit = M.min(caps.max_notification as usize);
        let overhead = 1 + name.len();
        if overhead > limit {
            // Not even the frame around an empty payload fits: report the
            // framed length against the limit.
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
        out.clear();
        // Room was checked above.
        let _ = out.push(name.len() as u8);
        let _ = out.extend_from_slice(name.as_bytes());
        let _ = out.extend_from_slice(payload);
        Ok(())
    }

    /// Gives back slot `i`, taken but never committed.
    fn untake_xfer(&mut self, i: usize) {
        self.xfers[i].segs.clear();
        let _ = self.free_xfers.push(i as u16);
    }

    /// Readies slot `i`, whose segments were filled in with `bytes` in all,
    /// for posting. If filling failed, or the transfer exceeds the
    /// transport's limits, the slot is given back and the error returned.
    fn commit_xfer(
        &mut self,
        i: usize,
        op: XferOp,
        peer: usize,
        notification: Option<&[u8]>,
        descs: usize,
        bytes: Result<u64, Error>,
    ) -> Result<XferHandle, Error> {
        let bytes = match bytes {
            Ok(b) => b,
            Err(e) => {
                self.untake_xfer(i);
                return Err(e);
            }
        };
        let slot = &mut self.xfers[i];
        let check =
            if self.caps.max_segments != 0 && slot.segs.len() > self.caps.max_segments as usize {
                Err(Error::CapacityExceeded {
                    what: "segments",
                    capacity: self.caps.max_segments,
                })
            } else {
                match notification {
                    Some(n) => Self::frame(&self.name, &self.caps, n, &mut slot.notification),
                    None => Ok(()),
                }
            };
        if let Err(e) = check {
            self.untake_xfer(i);
            return Err(e);
        }
        slot.has_notification = notification.is_some();
        for s in slot.segs.iter() {
            self.registry.acquire(s.local);
        }
        let p = &mut self.peers[peer];
        p.users += 1;
        slot.live = true;
        slot.state = XferState::Prepared;
        slot.op = op;
        slot.peer = peer as u16;
        slot.peer_gen = p.generation;
        slot.telemetry = XferTelemetry {
            bytes,
            descs: descs as u32,
            segments: slot.segs.len() as u32,
            ..XferTelemetry::default()
        };
        Ok(XferHandle {
            index: i as u32,
            generation: slot.generation,
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
        let p = self.peer_index(peer)?;
        desc::check_counts(local.len(), remote.len())?;
        let i = take_slot(&mut self.free_xfers, "transfers")?;
        let (registry, regions) = (&self.registry, &self.peers[p].regions);
        let pairs = local.iter().zip(remote).enumerate().map(|(k, (l, r))| {
            let l = desc::resolve_local(registry, k, l)?;
            let r = desc::resolve_remote(regions, k, r)?;
            desc::pair(k, &l, &r)
        });
        let bytes = desc::fill_segments(&mut self.xfers[i].segs, pairs, self.config.coalesce);
        self.commit_xfer(i, op, p, notification, local.len(), bytes)
    }

    /// Gives back prepared-list slot `i`, taken but never made live.
    fn untake_prep(&mut self, i: usize) {
        self.preps[i].entries.clear();
        let _ = self.free_preps.push(i as u16);
    }

    fn fill_prep(
        &mut self,
        i: usize,
        descs: &[Desc],
        resolve: impl Fn(&Self, usize, &Desc) -> Result<Resolved, Error>,
    ) -> Result<(), Error> {
        for (k, d) in descs.iter().enumerate() {
            let r = match resolve(self, k, d) {
                Ok(r) => r,
                Err(e) => {
                    self.untake_prep(i);
                    return Err(e);
                }
            };
            if self.preps[i].entries.push(r).is_err() {
                self.untake_prep(i);
                return Err(Error::CapacityExceeded {
                    what: "prepared list entries",
                    capacity: SEGS as u32,
                });
            }
        }
        Ok(())
    }

    /// Resolves `descs` against the local registry once, for
    /// [`make_xfer`](Engine::make_xfer). The list counts as a user of its
    /// regions until [`release_local`](Engine::release_local).
    pub fn prep_local(&mut self, descs: &[Desc]) -> Result<PreparedLocal, Error> {
        let i = take_slot(&mut self.free_preps, "prepared lists")?;
        self.preps[i].entries.clear();
        self.fill_prep(i, descs, |e, k, d| desc::resolve_local(&e.registry, k, d))?;
        let slot = &mut self.preps[i];
        for r in slot.entries.iter() {
            self.registry.acquire(r.region);
        }
        slot.live = true;
        slot.side = Side::Local;
        Ok(PreparedLocal {
            index: i as u32,
            generation: slot.generation,
        })
    }

    /// Resolves `descs` against the regions of `peer` once, for
    /// [`make_xfer`](Engine::make_xfer). It goes stale when the peer is
    /// reloaded or invalidated.
    pub fn prep_remote(&mut self, peer: &str, descs: &[Desc]) -> Result<PreparedRemote, Error> {
        let p = self.peer_index(peer)?;
        let i = take_slot(&mut self.free_preps, "prepared lists")?;
        self.preps[i].entries.clear();
        self.fill_prep(i, descs, |e, k, d| {
            desc::resolve_remote(&e.peers[p].regions, k, d)
        })?;
        let peer_gen = self.peers[p].generation;
        let slot = &mut self.preps[i];
        slot.live = true;
        slot.side = Side::Remote;
        slot.peer = p as u16;
        slot.peer_gen = peer_gen;
        Ok(PreparedRemote {
            index: i as u32,
            generation: slot.generation,
        })
    }

    fn prep_slot(&self, index: u32, generation: u32, side: Side) -> Result<usize, Error> {
        match self.preps.get(index as usize) {
            Some(s) if s.live && s.generation == generation && s.side == side => Ok(index as usize),
            _ => Err(Error::StalePrepared { index, generation }),
        }
    }

    fn free_prep(&mut self, i: usize) {
        let slot = &mut self.preps[i];
        if slot.side == Side::Local {
            for r in slot.entries.iter() {
                self.registry.release(r.region);
            }
        }
        slot.entries.clear();
        slot.live = false;
        slot.generation = slot.generation.wrapping_add(1);
        let _ = self.free_preps.push(i as u16);
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

    /// Makes a transfer from entries of prepared lists: pair `k` moves
    /// `local[local_idx[k]]` and `remote[remote_idx[k]]`. Only counts,
    /// indices and lengths are checked; the descriptors were validated
    /// when the lists were prepared.
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
        let i = take_slot(&mut self.free_xfers, "transfers")?;
        let (l_entries, r_entries) = (&self.preps[li].entries, &self.preps[ri].entries);
        let pairs = local_idx
            .iter()
            .zip(remote_idx)
            .enumerate()
            .map(|(k, (&lx, &rx))| {
                let range = |side, value: u32, len: usize| Error::IndexOutOfRange {
                    side,
                    index: k as u32,
                    value,
                    len: len as u32,
                };
                let l = l_entries
                    .get(lx as usize)
                    .ok_or_else(|| range(Side::Local, lx, l_entries.len()))?;
                let r = r_entries
                    .get(rx as usize)
                    .ok_or_else(|| range(Side::Remote, rx, r_entries.len()))?;
                desc::pair(k, l, r)
            });
        let bytes = desc::fill_segments(&mut self.xfers[i].segs, pairs, self.config.coalesce);
        self.commit_xfer(i, op, p, notification, local_idx.len(), bytes)
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
        let slot = &mut self.xfers[i];
        if slot.state == XferState::InProgress {
            return Err(Error::InProgress { handle });
        }
        let peer = &self.peers[slot.peer as usize];
        if peer.state != PeerState::Live || peer.generation != slot.peer_gen {
            return Err(Error::StalePeer {
                peer: peer.name.clone(),
            });
        }
        let Some(endpoint) = peer.peer.as_ref() else {
            return Err(Error::StalePeer {
                peer: peer.name.clone(),
            });
        };
        let mut segments: heapless::Vec<Segment<'_, T::LocalReg, T::RemoteKey>, SEGS> =
            heapless::Vec::new();
        for s in slot.segs.iter() {
            let local = self.registry.get(s.local).ok_or(Error::NotRegistered {
                addr: s.local_addr,
                len: s.len,
            })?;
            let (Some(remote), Some(region)) = (
                peer.keys.get(s.remote as usize),
                peer.regions.get(s.remote as usize),
            ) else {
                return Err(Error::StalePeer {
                    peer: peer.name.clone(),
                });
            };
            // Room: `segments` has the capacity of `slot.segs`.
            let _ = segments.push(Segment {
                local_addr: s.local_addr,
                remote_addr: s.remote_addr,
                len: s.len,
                local: &local.handle,
                remote,
                remote_region_addr: region.addr,
            });
        }
        let notification = slot
            .has_notification
            .then_some(slot.notification.as_slice());
        slot.posts = slot.posts.wrapping_add(1);
        let token = token_of(i, slot.generation, slot.posts);
        let result = self
            .transport
            .post(slot.op, endpoint, &segments, notification, token);
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
                Ok(XferState::InProgress)
            }
            Err(e) => {
                let e = with_peer(e, &peer.name);
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
        self.xfers
            .iter()
            .filter(|s| s.live && s.state == XferState::InProgress)
            .count()
    }

    /// Completions ignored so far by [`poll`](Engine::poll): for released
    /// or reused slots, for an earlier post of a re-posted transfer, for a
    /// transfer not in progress, or with a token the engine never issued.
    pub fn ignored_completions(&self) -> u64 {
        self.ignored_completions
    }

    /// Drains the transport's completions; returns how many transfers
    /// finished. Completions for released or reused slots, or for an
    /// earlier post of the same transfer, are ignored (and counted in
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
        finished
    }

    /// Frees slot `i`: its regions and peer lose a user, its generation
    /// moves on.
    fn free_xfer(&mut self, i: usize) {
        let slot = &mut self.xfers[i];
        for s in slot.segs.iter() {
            self.registry.release(s.local);
        }
        slot.segs.clear();
        slot.live = false;
        slot.has_notification = false;
        slot.generation = slot.generation.wrapping_add(1);
        let peer = &mut self.peers[slot.peer as usize];
        peer.users = peer.users.saturating_sub(1);
        if peer.state == PeerState::Retired && peer.users == 0 {
            peer.free(&mut self.transport);
        }
        let _ = self.free_xfers.push(i as u16);
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

    /// Sends a notification to a peer.
    pub fn notify(&mut self, peer: &str, msg: &[u8]) -> Result<(), Error> {
        let p = self.peer_index(peer)?;
        let mut framed: heapless::Vec<u8, NOTIF> = heapless::Vec::new();
        Self::frame(&self.name, &self.caps, msg, &mut framed)?;
        let slot = &self.peers[p];
        let endpoint = slot
            .peer
            .as_ref()
            .ok_or_else(|| Error::unknown_peer(peer))?;
        self.transport
            .send_notification(endpoint, &framed)
            .map_err(|e| with_peer(e, &slot.name))
    }

    /// Takes one received notification; its payload goes to the start of
    /// `buf`. `buf` must also hold the frame around it while it is read (1
    /// byte plus the sender's name): a buffer of payload + 65 bytes always
    /// does. A message that does not fit yields [`Error::BufferTooSmall`]
    /// and stays queued.
    pub fn poll_notification(&mut self, buf: &mut [u8]) -> Option<Result<Notification, Error>> {
        let n = match self.transport.poll_notification(buf)? {
            Ok(n) => n,
            Err(e) => return Some(Err(e)),
        };
        let malformed = Error::MalformedNotification { len: n as u64 };
        let Some(frame) = buf.get(..n) else {
            return Some(Err(malformed));
        };
        let Some((&name_len, rest)) = frame.split_first() else {
            return Some(Err(malformed));
        };
        let name_len = name_len as usize;
        if name_len > NAME_CAP {
            // No agent has such a name; cutting it would name another.
            return Some(Err(malformed));
        }
        let Some(name) = rest
            .get(..name_len)
            .and_then(|b| core::str::from_utf8(b).ok())
        else {
            return Some(Err(malformed));
        };
        if name.is_empty() {
            return Some(Err(malformed));
        }
        let peer: Name = bounded(name);
        buf.copy_within(1 + name_len..n, 0);
        Some(Ok(Notification {
            peer,
            len: n - 1 - name_len,
        }))
    }
}

impl<
        T: Transport,
        const REGIONS: usize,
        const PEERS: usize,
        const XFERS: usize,
        const SEGS: usize,
        const NOTIF: usize,
        const PREPS: usize,
    > Drop for Engine<T, REGIONS, PEERS, XFERS, SEGS, NOTIF, PREPS>
{
    /// Cancels what is in flight (or, for transports that cannot cancel,
    /// polls until it finishes, a bounded number of times), then hands
    /// back keys, connections and registrations, in that order.
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
            }
        }
        let mut polls = 0;
        while self.in_flight() > 0 && polls < DROP_DRAIN_POLLS {
            self.poll(Instant::ZERO);
            polls += 1;
        }
        if self.in_flight() > 0 {
            log::warn!(
                "{}: dropped with {} transfers still in flight",
                self.name,
                self.in_flight()
            );
        }
        for i in 0..self.xfers.len() {
            if self.xfers[i].live {
                self.free_xfer(i);
            }
        }
        for i in 0..self.preps.len() {
            if self.preps[i].live {
                self.free_prep(i);
            }
        }
        for p in self.peers.iter_mut() {
            if p.state != PeerState::Free {
                p.free(&mut self.transport);
            }
        }
        let transport = &mut self.transport;
        self.registry
            .drain(|_, handle| transport.deregister(handle));
    }
}

#[cfg(test)]
#[path = "engine_tests.rs"]
mod tests;
