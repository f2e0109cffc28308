//! Staging: VRAM over transports that cannot touch GPU memory (UCX and
//! libfabric built without CUDA support), through pinned host buffers.
//!
//! [`Staged`] wraps any [`Transport`] and adds [`MemKind::Vram`] to what it
//! can register. DRAM-only transfers pass straight through. A transfer
//! with VRAM on either side is cut into chunks of at most
//! [`StagingConfig::chunk`] bytes that move through a pool of pinned
//! bounce buffers per GPU, registered once with the inner transport. Up to
//! [`StagingConfig::chunks`] chunks per GPU are in flight at once, so the
//! next chunk is copied while the previous one is on the wire.
//!
//! **Local VRAM, remote DRAM**:
//!
//! * WRITE: `cuMemcpyAsync` of a chunk into a bounce buffer, then, once its
//!   CUDA event completed, an RMA WRITE from the bounce buffer;
//! * READ: an RMA READ into a bounce buffer, then `cuMemcpyAsync` into VRAM.
//!
//! **Remote VRAM** (a region the peer registered through its own
//! `Staged`): only the peer can copy between its bounce buffers and its
//! VRAM, so the peer does the wire part. For each chunk the initiator sends
//! a request (a notification of the inner transport, see
//! [`staging_wire`](crate::staging_wire)) naming the VRAM range and one of
//! the initiator's own bounce buffers:
//!
//! * WRITE: the initiator copies the chunk (from VRAM or DRAM) into its
//!   bounce buffer and asks the peer to **pull** it: the peer READs it into
//!   one of its bounce buffers and copies that into its VRAM;
//! * READ: the initiator asks the peer to **push** the range: the peer
//!   copies it from VRAM into one of its bounce buffers and WRITEs it into
//!   the initiator's bounce buffer, from which the initiator copies it to
//!   its destination.
//!
//! The peer answers each request once the data is at its destination; a
//! chunk is done with that answer. The peer serves requests while its
//! transport is polled (an `Agent` with its progress thread, the default,
//! always is) and only for VRAM it registered; it connects back to the
//! requester's address to move the data and to answer, giving up on a
//! request it could not serve within [`StagingConfig::reply_timeout`].
//!
//! Staging keeps no deadline for this side's transfers: the engine does,
//! and [`abandon`](Transport::abandon)s a transfer past it. A request
//! still without an answer then is given up; its bounce buffer is not
//! reused until the late answer arrives, so a late pull or push cannot
//! mix into a later transfer.
//!
//! The transfer completes once every chunk's data is at its destination; a
//! notification attached to it is sent after that, so it still reaches the
//! target after the data.
//!
//! When the inner transport registers VRAM itself (UCX built with CUDA,
//! see [`Staged::native_vram`]), VRAM registrations and keys go to it and
//! every transfer passes straight through: no staging.
//!
//! Staging needs a CUDA driver on both sides when either side is VRAM: a
//! DRAM-only initiator moving to a peer's VRAM uses a bounce pool on GPU 0.

mod pipeline;
mod pool;
mod progress;
mod serving;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvxfer_core::mem::MemKinds;
use kvxfer_core::{
    Capabilities, Completion, Error, MemKind, PostStatus, Region, Segment, Segments, Token,
    Transport, XferOp,
};

use crate::driver::{self, check, Context, INVALID_VALUE};
use crate::memory::PinnedBuffer;
use crate::staging_wire::{self as msg, Direction, Message, Range, Request};
use crate::stream::{Event, Stream};

use pipeline::*;
use pool::*;
use serving::*;

/// Low 32 bits of every token [`Staged`] gives its inner transport for a
/// chunk. The core's tokens carry a transfer slot index there (below
/// 2^16), so the two never collide.
const CHUNK_MARK: u64 = 0xffff_ffff;

/// Largest notification staging receives (as the Agent does): 16 MiB.
const MAX_NOTE_BUF: u64 = 16 << 20;

/// Most segments a DRAM-only transfer passes through in a buffer on the
/// stack; longer ones use [`Staged`]'s `direct` buffer, which keeps its
/// allocation between posts.
const DIRECT_INLINE: usize = 64;

/// Size and number of the bounce buffers of each GPU.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct StagingConfig {
    /// Bytes per chunk (bounce buffer).
    pub chunk: usize,
    /// Bounce buffers per GPU: chunks in flight at once.
    pub chunks: usize,
    /// How long serving a peer's request (a chunk into or out of VRAM
    /// registered here) may take before it is given up and answered with
    /// [`Error::TimedOut`]. This side's own transfers, and their requests
    /// to peers, have the engine's deadline instead.
    pub reply_timeout: Duration,
}

impl Default for StagingConfig {
    /// 4 chunks of 4 MiB per GPU; 5 s for a peer's answer.
    fn default() -> Self {
        StagingConfig {
            chunk: 4 << 20,
            chunks: 4,
            reply_timeout: Duration::from_secs(5),
        }
    }
}

/// A registration of [`Staged`]: memory registered with the inner
/// transport, or a VRAM region staged through bounce buffers.
#[derive(Debug)]
pub enum StagedReg<L> {
    /// Memory registered with the inner transport: host memory, or VRAM
    /// when the inner transport registers it itself
    /// ([`Staged::native_vram`]).
    Host(Arc<L>),
    /// VRAM of GPU `dev`; not registered with the inner transport.
    Vram(Region),
}

/// A peer's key as seen through [`Staged`].
#[derive(Debug)]
pub enum StagedKey<K> {
    /// A region of the peer the inner transport reaches itself (host
    /// memory, or VRAM when the inner transport registers it): the inner
    /// transport's key.
    Host(Arc<K>),
    /// A VRAM region of the peer, moved through requests its `Staged`
    /// serves (see the [module docs](self)), with the secret those
    /// requests carry.
    Vram(Region, [u8; msg::SECRET_LEN]),
}

/// A transport with VRAM staged through pinned host memory; see the
/// [module docs](self).
pub struct Staged<T: Transport> {
    cfg: StagingConfig,
    /// Bounce pools by [`pool_index`]: per GPU, one for own transfers
    /// (made at the first VRAM registration there) and one for serving
    /// peers (made at the first request).
    pools: Vec<Option<Pool<T::LocalReg>>>,
    /// VRAM regions registered here: the only ones peers' requests may name.
    vram: Vec<Region>,
    ops: Vec<Op<T>>,
    done: VecDeque<Completion>,
    next_chunk: u32,
    /// This side's inner transport address, sent in requests.
    my_addr: Option<Vec<u8>>,
    requesters: Requesters<T::Peer, T::RemoteKey>,
    lost: Vec<Lost<T::LocalReg>>,
    /// Notifications of the inner transport are received here first, so
    /// that staging messages can be taken out.
    note_buf: Vec<u8>,
    /// User notifications received while waiting for answers.
    user_notes: VecDeque<Vec<u8>>,
    /// Scratch buffer for outgoing staging messages.
    out: Vec<u8>,
    /// Moves whenever staging did work on a peer's behalf.
    events: u64,
    /// Random; a request's id is its chunk's token XOR this, so that a
    /// peer cannot guess the id of another peer's request and answer it.
    salt: u64,
    /// Random; the VRAM key this side publishes carries it, and a peer's
    /// request is served only if it repeats it: only peers that loaded this
    /// side's metadata may ask.
    secret: [u8; msg::SECRET_LEN],
    /// The room of the segment list of DRAM-only posts longer than
    /// [`DIRECT_INLINE`], kept between posts so that they do not allocate
    /// once it has grown; see [`recycle`](progress::recycle).
    direct: Vec<Segment<'static, (), ()>>,
    inner: T,
}

impl<T: Transport> std::fmt::Debug for Staged<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Staged")
            .field("backend", &self.inner.name())
            .field("cfg", &self.cfg)
            .field("staged_in_flight", &self.ops.len())
            .finish_non_exhaustive()
    }
}

impl<T: Transport> Staged<T> {
    /// Wraps `inner` with the default [`StagingConfig`]. Touches no GPU:
    /// the driver is loaded on the first VRAM registration.
    pub fn new(inner: T) -> Staged<T> {
        Staged::with_config(inner, StagingConfig::default())
    }

    /// Wraps `inner`; chunk size and count are raised to at least 4 KiB and 1.
    pub fn with_config(inner: T, cfg: StagingConfig) -> Staged<T> {
        Staged {
            cfg: StagingConfig {
                chunk: cfg.chunk.max(4096),
                chunks: cfg.chunks.max(1),
                reply_timeout: cfg.reply_timeout,
            },
            pools: Vec::new(),
            vram: Vec::new(),
            ops: Vec::new(),
            done: VecDeque::new(),
            next_chunk: 0,
            my_addr: None,
            requesters: Requesters {
                peers: HashMap::new(),
                keys: HashMap::new(),
                retired_peers: Vec::new(),
                retired_keys: Vec::new(),
            },
            lost: Vec::new(),
            note_buf: Vec::new(),
            user_notes: VecDeque::new(),
            out: Vec::new(),
            events: 0,
            salt: {
                use std::hash::{BuildHasher, Hasher};
                std::collections::hash_map::RandomState::new()
                    .build_hasher()
                    .finish()
            },
            secret: random_secret(),
            direct: Vec::new(),
            inner,
        }
    }

    /// A count that moves whenever staging served a peer's request (or has
    /// one in progress): a progress loop that sees it move keeps polling.
    pub fn staging_events(&self) -> u64 {
        self.events
    }

    /// Whether VRAM goes to the inner transport, which registers and
    /// moves it itself (its [`Capabilities::mem_kinds`] holds VRAM: UCX
    /// with CUDA support), rather than through bounce buffers. Both sides
    /// of a VRAM transfer must agree: a peer's VRAM key is either the
    /// inner transport's or a staging key.
    pub fn native_vram(&self) -> bool {
        self.inner.capabilities().mem_kinds.contains(MemKind::Vram)
    }

    /// The wrapped transport.
    pub fn inner(&self) -> &T {
        &self.inner
    }

    /// The wrapped transport, mutably.
    pub fn inner_mut(&mut self) -> &mut T {
        &mut self.inner
    }

    /// Staged transfers posted and not yet reported (not counting the ones
    /// serving peers' requests).
    pub fn staged_in_flight(&self) -> usize {
        self.ops.iter().filter(|o| o.serves.is_none()).count()
    }

    fn bad(&self, text: &str) -> Error {
        Error::backend(self.inner.name(), INVALID_VALUE, text)
    }
}

impl<T: Transport> Drop for Staged<T> {
    fn drop(&mut self) {
        if !self.ops.is_empty() {
            log::warn!(
                "{}: staging dropped with {} transfers in flight",
                self.inner.name(),
                self.ops.len()
            );
        }
        // Queued copies end first, and the events of the copies in flight
        // go back to their pools; then the transfers (they share keys and
        // connections with the requester tables), the keys and connections
        // of requesters, the bounce registrations and buffers, the pools,
        // and the inner transport (field order).
        for p in self.pools.iter().flatten() {
            if let Err(e) = p.synchronize() {
                log::warn!("{}: {e}", self.inner.name());
            }
        }
        for op in std::mem::take(&mut self.ops) {
            for ch in op.chunks {
                match (ch.stage, ch.slot) {
                    (Stage::Copy { ev, .. }, Some((index, _))) => {
                        if let Some(p) = Self::pool_mut(&mut self.pools, index) {
                            p.free_events.push(ev);
                        }
                    }
                    // On the wire: the inner transport lets go of the
                    // bounce buffer, or says it still uses it (`in_use`,
                    // checked before the buffer is freed below).
                    (Stage::Wire { .. }, _) => {
                        if let Err(e) = self.inner.abandon(Token(ch.token)) {
                            log::warn!(
                                "{}: a staged chunk cannot be ended: {e}",
                                self.inner.name()
                            );
                        }
                    }
                    _ => {}
                }
            }
        }
        let r = &mut self.requesters;
        let mut keys: Vec<Arc<T::RemoteKey>> = r.keys.drain().map(|(_, k)| k).collect();
        keys.append(&mut r.retired_keys);
        let mut peers: Vec<Arc<T::Peer>> = r.peers.drain().map(|(_, p)| p).collect();
        peers.append(&mut r.retired_peers);
        for k in keys {
            if let Some(k) = unwrap_arc(k, "requester key") {
                self.inner.release_key(k);
            }
        }
        for p in peers {
            if let Some(p) = unwrap_arc(p, "requester connection") {
                self.inner.disconnect(p);
            }
        }
        let mut slots: Vec<Slot<T::LocalReg>> = std::mem::take(&mut self.lost)
            .into_iter()
            .map(|l| l.slot)
            .collect();
        for p in self.pools.iter_mut().flatten() {
            slots.extend(p.slots.iter_mut().filter_map(Option::take));
        }
        // A buffer the inner transport still uses (a request to a stopped
        // peer) is given a bounded time, then left allocated rather than
        // freed under the library.
        let deadline = Instant::now() + DROP_WAIT;
        for mut slot in slots {
            let Some(reg) = slot.reg.take() else { continue };
            while self.inner.in_use(&reg) && Instant::now() < deadline {
                let _ = self.inner.poll();
                std::thread::yield_now();
            }
            if self.inner.in_use(&reg) {
                log::error!(
                    "{}: a bounce buffer the library may still write is left allocated",
                    self.inner.name()
                );
                std::mem::forget(reg);
                std::mem::forget(slot);
                continue;
            }
            self.inner.deregister(reg);
        }
        self.pools.clear();
    }
}

impl<T: Transport> Staged<T> {
    /// Refuses `what` for a staged VRAM transfer of this side (its copies
    /// and requests cannot be stopped); other tokens are the inner
    /// transport's.
    fn refuse_staged(&self, token: Token, what: &'static str) -> Result<(), Error> {
        if self
            .ops
            .iter()
            .any(|o| o.token == token && o.serves.is_none())
        {
            return Err(Error::Unsupported {
                backend: self.inner.name(),
                what,
            });
        }
        Ok(())
    }
}

/// A random secret from the kernel (`/dev/urandom`), or, where that cannot
/// be read, from the process's hasher seeds.
fn random_secret() -> [u8; msg::SECRET_LEN] {
    let mut s = [0u8; msg::SECRET_LEN];
    let read = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut s));
    if read.is_err() {
        use std::hash::{BuildHasher, Hasher};
        for half in s.chunks_mut(8) {
            let v = std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish();
            half.copy_from_slice(&v.to_le_bytes());
        }
    }
    s
}

/// How long dropping [`Staged`] waits for the inner transport to let go of
/// bounce buffers before it leaves them allocated.
const DROP_WAIT: Duration = Duration::from_secs(1);

/// The inner transport's view of a segment with host memory on both sides.
fn direct_segment<'a, L, K>(
    s: &Segment<'a, StagedReg<L>, StagedKey<K>>,
) -> Option<Segment<'a, L, K>> {
    let (StagedReg::Host(l), StagedKey::Host(r)) = (s.local, s.remote) else {
        return None;
    };
    Some(Segment {
        local_addr: s.local_addr,
        remote_addr: s.remote_addr,
        len: s.len,
        local: &**l,
        remote: &**r,
        remote_region_addr: s.remote_region_addr,
    })
}

fn unwrap_arc<X>(a: Arc<X>, what: &str) -> Option<X> {
    match Arc::try_unwrap(a) {
        Ok(x) => Some(x),
        Err(_) => {
            log::warn!("staging: {what} still used by a transfer; not released");
            None
        }
    }
}

impl<T: Transport> Transport for Staged<T> {
    type LocalReg = StagedReg<T::LocalReg>;
    type Peer = Arc<T::Peer>;
    type RemoteKey = StagedKey<T::RemoteKey>;

    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn capabilities(&self) -> Capabilities {
        let mut c = self.inner.capabilities();
        c.mem_kinds = MemKinds::DRAM_VRAM;
        c
    }

    fn register(&mut self, region: &Region) -> Result<Self::LocalReg, Error> {
        if region.kind == MemKind::Dram {
            return Ok(StagedReg::Host(Arc::new(self.inner.register(region)?)));
        }
        let info = driver::pointer_info(region.addr)?;
        if info.kind != MemKind::Vram || info.dev != region.dev {
            return Err(self.bad(&format!(
                "region {:#x} (+{} bytes) registered as VRAM of device {}, but CUDA reports {} of device {}",
                region.addr, region.len, region.dev, info.kind, info.dev
            )));
        }
        let (base, size) = driver::address_range(region.addr)?;
        if region.end().map_or(true, |e| e > base.saturating_add(size)) {
            return Err(self.bad(&format!(
                "VRAM region {:#x} (+{} bytes) leaves its allocation {base:#x} (+{size} bytes)",
                region.addr, region.len
            )));
        }
        if self.native_vram() {
            return Ok(StagedReg::Host(Arc::new(self.inner.register(region)?)));
        }
        self.pool(region.dev)?;
        self.vram.push(*region);
        Ok(StagedReg::Vram(*region))
    }

    fn arm(&mut self) -> kvxfer_core::Wake {
        if self.ops.is_empty() && self.done.is_empty() && self.user_notes.is_empty() {
            self.inner.arm()
        } else {
            kvxfer_core::Wake::Busy
        }
    }

    fn in_use(&mut self, reg: &Self::LocalReg) -> bool {
        match reg {
            StagedReg::Host(r) => self.inner.in_use(r),
            // Queued copies on VRAM end inside `deregister`.
            StagedReg::Vram(_) => false,
        }
    }

    fn deregister(&mut self, reg: Self::LocalReg) {
        match reg {
            StagedReg::Host(r) => {
                if let Some(r) = unwrap_arc(r, "registration") {
                    self.inner.deregister(r);
                }
            }
            StagedReg::Vram(region) => {
                if let Some(i) = self.vram.iter().position(|g| *g == region) {
                    self.vram.swap_remove(i);
                }
                // Peers' requests being served on the region fail: they
                // start no further copy into or out of it...
                let gone = self.bad(&format!(
                    "VRAM {:#x} (+{} bytes) was deregistered while a request on it was served",
                    region.addr, region.len
                ));
                let mut touched = false;
                for op in self.ops.iter_mut().filter(|o| o.serves.is_some()) {
                    let on_region = op
                        .segs
                        .iter()
                        .any(|w| w.local_addr >= region.addr && Some(w.local_addr) < region.end());
                    if on_region {
                        op.fail(gone.clone());
                        touched = true;
                    }
                }
                // ...and the copies already queued end before the memory
                // goes back to its owner.
                if touched {
                    for serving in [false, true] {
                        let index = pool_index(region.dev, serving);
                        if let Some(p) = Self::pool_mut(&mut self.pools, index) {
                            if let Err(e) = p.synchronize() {
                                log::warn!("{}: {e}", self.inner.name());
                            }
                        }
                    }
                }
            }
        }
    }

    fn pack_key(&self, reg: &Self::LocalReg, out: &mut [u8]) -> Result<usize, Error> {
        match reg {
            StagedReg::Host(r) => self.inner.pack_key(r, out),
            StagedReg::Vram(_) => kvxfer_core::wire::copy_into(out, &msg::vram_key(&self.secret)),
        }
    }

    fn local_address(&self, out: &mut [u8]) -> Result<usize, Error> {
        self.inner.local_address(out)
    }

    fn connect(&mut self, address: &[u8]) -> Result<Self::Peer, Error> {
        Ok(Arc::new(self.inner.connect(address)?))
    }

    fn disconnect(&mut self, peer: Self::Peer) {
        if let Some(p) = unwrap_arc(peer, "connection") {
            self.inner.disconnect(p);
        }
    }

    fn unpack_key(
        &mut self,
        peer: &Self::Peer,
        region: &Region,
        key: &[u8],
    ) -> Result<Self::RemoteKey, Error> {
        match region.kind {
            MemKind::Dram => Ok(StagedKey::Host(Arc::new(
                self.inner.unpack_key(peer, region, key)?,
            ))),
            MemKind::Vram if msg::vram_secret(key).is_some() => {
                // Transfers to the peer's VRAM go through a local bounce
                // pool: make it now rather than in the first transfer.
                if let Err(e) = self.host_pool_dev() {
                    log::debug!("{}: no bounce pool yet: {e}", self.inner.name());
                }
                let secret = msg::vram_secret(key).unwrap_or_default();
                Ok(StagedKey::Vram(*region, secret))
            }
            MemKind::Vram if self.native_vram() => Ok(StagedKey::Host(Arc::new(
                self.inner.unpack_key(peer, region, key)?,
            ))),
            MemKind::Vram => Err(self.bad(&format!(
                "VRAM {:#x}: the peer's key ({} bytes, starting {}) is not of staging version {}",
                region.addr,
                key.len(),
                crate::wire::hex(&key[..key.len().min(msg::VRAM_KEY.len())]),
                msg::VERSION
            ))),
        }
    }

    fn local_kind(&self, reg: &Self::LocalReg) -> MemKind {
        match reg {
            StagedReg::Host(r) => self.inner.local_kind(r),
            StagedReg::Vram(_) => MemKind::Vram,
        }
    }

    fn remote_kind(&self, key: &Self::RemoteKey) -> MemKind {
        match key {
            StagedKey::Host(k) => self.inner.remote_kind(k),
            StagedKey::Vram(..) => MemKind::Vram,
        }
    }

    fn release_key(&mut self, key: Self::RemoteKey) {
        if let StagedKey::Host(k) = key {
            if let Some(k) = unwrap_arc(k, "remote key") {
                self.inner.release_key(k);
            }
        }
    }

    fn post(
        &mut self,
        op: XferOp,
        peer: &Self::Peer,
        segments: Segments<'_, Self::LocalReg, Self::RemoteKey>,
        notification: Option<&[u8]>,
        token: Token,
    ) -> Result<PostStatus, Error> {
        let mut staged = false;
        let mut host_to_vram = false;
        for s in segments {
            let local_vram = matches!(s.local, StagedReg::Vram(_));
            let remote_vram = matches!(s.remote, StagedKey::Vram(..));
            staged |= local_vram || remote_vram;
            host_to_vram |= remote_vram && !local_vram;
        }
        if !staged {
            return self.post_direct(op, peer, segments, notification, token);
        }
        self.post_staged(op, peer, segments, notification, token, host_to_vram)
    }

    fn poll(&mut self) -> Option<Completion> {
        if let Some(c) = self.done.pop_front() {
            return Some(c);
        }
        self.drive();
        self.done.pop_front()
    }

    fn cancel(&mut self, token: Token) -> Result<(), Error> {
        self.refuse_staged(token, "cancel of a staged VRAM transfer")?;
        self.inner.cancel(token)
    }

    fn abandon(&mut self, token: Token) -> Result<(), Error> {
        match self
            .ops
            .iter()
            .position(|o| o.token == token && o.serves.is_none())
        {
            Some(oi) => self.abandon_staged(oi),
            None => self.inner.abandon(token),
        }
    }

    fn send_notification(&mut self, peer: &Self::Peer, msg: &[u8]) -> Result<(), Error> {
        self.inner.send_notification(peer, msg)
    }

    fn poll_notification(&mut self, buf: &mut [u8]) -> Option<Result<usize, Error>> {
        let too_small = |n: usize, buf: &[u8]| Error::BufferTooSmall {
            needed: n as u64,
            available: buf.len() as u64,
        };
        if let Some(m) = self.user_notes.front() {
            if m.len() > buf.len() {
                return Some(Err(too_small(m.len(), buf)));
            }
            let n = m.len();
            buf[..n].copy_from_slice(m);
            self.user_notes.pop_front();
            return Some(Ok(n));
        }
        match self.receive()? {
            Ok(n) if n > buf.len() => {
                // Kept until a large enough buffer comes.
                self.user_notes.push_front(self.note_buf[..n].to_vec());
                Some(Err(too_small(n, buf)))
            }
            Ok(n) => {
                buf[..n].copy_from_slice(&self.note_buf[..n]);
                Some(Ok(n))
            }
            // The inner transport left the start of the dropped message
            // (it names the sender) in the buffer: hand it on.
            Err(e @ Error::NotificationDropped { len, .. }) => {
                let n = usize::try_from(len)
                    .unwrap_or(usize::MAX)
                    .min(buf.len())
                    .min(self.note_buf.len());
                buf[..n].copy_from_slice(&self.note_buf[..n]);
                Some(Err(e))
            }
            Err(e) => Some(Err(e)),
        }
    }
}
