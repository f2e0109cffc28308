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
//! requester's address to move the data and to answer. A request without
//! an answer within [`StagingConfig::reply_timeout`] fails the transfer
//! with [`Error::TimedOut`]; its bounce buffer is not reused until the
//! late answer arrives, so a late pull or push cannot mix into a later
//! transfer.
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

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::sys;
use kvxfer_core::mem::MemKinds;
use kvxfer_core::{
    Capabilities, Completion, Error, MemKind, PostStatus, Region, Segment, Segments, Token,
    Transport, XferOp,
};

use crate::driver::{self, check, Context, INVALID_VALUE};
use crate::memory::PinnedBuffer;
use crate::staging_wire::{self as msg, Direction, Message, Range, Request};

/// Low 32 bits of every token [`Staged`] gives its inner transport for a
/// chunk. The core's tokens carry a transfer slot index there (below
/// 2^16), so the two never collide.
const CHUNK_MARK: u64 = 0xffff_ffff;

/// Largest notification staging receives (as the Agent does): 16 MiB.
const MAX_NOTE_BUF: u64 = 16 << 20;

/// Most segments a DRAM-only transfer may have to pass through without
/// allocating (on the stack: 48 bytes each). With CUDA support in the
/// default build every UCX and libfabric transfer passes here, so this
/// covers KV-shaped requests (128 blocks and more); a longer one costs one
/// allocation of exactly its length.
const DIRECT_INLINE: usize = 256;

/// Size and number of the bounce buffers of each GPU.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct StagingConfig {
    /// Bytes per chunk (bounce buffer).
    pub chunk: usize,
    /// Bounce buffers per GPU: chunks in flight at once.
    pub chunks: usize,
    /// How long a request to a peer (a chunk into or out of the peer's
    /// VRAM) may wait for its answer.
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

/// One pinned bounce buffer, registered on its own with the inner
/// transport so that it can be retired alone (see [`Lost`]).
struct Slot<L> {
    buf: PinnedBuffer,
    /// Its registration; taken back in [`Staged`]'s `Drop` (or when a lost
    /// slot is finally answered) before the buffer is freed.
    reg: Option<L>,
    /// The registration's packed key, sent in requests to peers.
    key: Vec<u8>,
}

/// Per-GPU staging state: context, stream, events and the bounce buffers.
struct Pool<L> {
    ctx: Arc<Context>,
    stream: sys::CUstream,
    free_events: Vec<sys::CUevent>,
    /// `chunks` bounce buffers of `chunk` bytes; `None` while a lost slot
    /// could not be replaced.
    slots: Vec<Option<Slot<L>>>,
    free_slots: Vec<usize>,
    chunk: usize,
}

impl<L> Pool<L> {
    fn slot(&self, slot: usize) -> &Slot<L> {
        self.slots[slot]
            .as_ref()
            .expect("only slots that exist are handed out")
    }

    fn slot_addr(&self, slot: usize) -> u64 {
        self.slot(slot).buf.addr()
    }

    fn event(&mut self) -> Result<sys::CUevent, Error> {
        match self.free_events.pop() {
            Some(e) => Ok(e),
            None => driver::create_event(&self.ctx),
        }
    }

    /// Enqueues copies between bounce slot `slot` and the pieces' local
    /// memory (VRAM, or host memory through unified addressing) — into the
    /// slot when `to_slot` — and records one event after them.
    fn copies(
        &mut self,
        to_slot: bool,
        slot: usize,
        pieces: &[Piece],
    ) -> Result<sys::CUevent, Error> {
        let base = self.slot_addr(slot);
        let ev = self.event()?;
        self.ctx.bind()?;
        let mut res = Ok(());
        for p in pieces {
            let host = base + p.slot_off;
            let (dst, src) = if to_slot {
                (host, p.local_addr)
            } else {
                (p.local_addr, host)
            };
            let len = p.len as usize;
            // SAFETY: the piece lies inside the slot (`slot_off + len <=
            // chunk` bytes of the live pinned buffer); `local_addr..+len`
            // lies in a registered region (VRAM, or host memory) that stays
            // registered until the transfer completes.
            res = check(
                unsafe { sys::cuMemcpyAsync(dst, src, len, self.stream) },
                &format!("cuMemcpyAsync({len} bytes, {src:#x} -> {dst:#x})"),
            );
            if res.is_err() {
                break;
            }
        }
        let recorded = res.and_then(|()| {
            // SAFETY: `ev` and the stream are live in the bound context.
            check(
                unsafe { sys::cuEventRecord(ev, self.stream) },
                "cuEventRecord",
            )
        });
        match recorded {
            Ok(()) => Ok(ev),
            Err(e) => {
                // The copies queued before the failure must be over before
                // the slot is handed out again.
                if let Err(s) = self.synchronize() {
                    log::warn!("after a failed copy: {s}");
                }
                self.free_events.push(ev);
                Err(e)
            }
        }
    }

    /// `Ok(true)` once `ev` completed (the event then goes back to the pool).
    fn query(&mut self, ev: sys::CUevent) -> Result<bool, Error> {
        self.ctx.bind()?;
        // SAFETY: `ev` is a live event recorded in this context.
        let res = unsafe { sys::cuEventQuery(ev) };
        if res == sys::CUresult::CUDA_ERROR_NOT_READY {
            return Ok(false);
        }
        self.free_events.push(ev);
        check(res, "cuEventQuery").map(|()| true)
    }
}

impl<L> Pool<L> {
    /// Waits until every copy queued on the pool's stream finished.
    fn synchronize(&self) -> Result<(), Error> {
        // SAFETY: the stream was made in `self.ctx` and is destroyed only
        // in `Drop`, after this.
        unsafe { driver::synchronize_stream(&self.ctx, self.stream) }
    }
}

impl<L> Drop for Pool<L> {
    fn drop(&mut self) {
        if let Err(e) = self.synchronize() {
            log::warn!(
                "draining staging stream of device {}: {e}",
                self.ctx.ordinal()
            );
        }
        for ev in self.free_events.drain(..) {
            // SAFETY: pooled events have no pending work (the stream drained).
            unsafe { sys::cuEventDestroy_v2(ev) };
        }
        // SAFETY: the stream drained and is destroyed once; the pinned buffer
        // and the context are freed after this, when the fields drop.
        unsafe { sys::cuStreamDestroy_v2(self.stream) };
    }
}

/// The local side of one segment of a staged transfer.
enum LocalSide<L> {
    Host(Arc<L>),
    Vram(u32),
}

/// The remote side of one segment of a staged transfer.
enum RemoteSide<K> {
    /// Host memory of the peer, reached by the inner transport.
    Host(Arc<K>),
    /// VRAM of the peer, reached through requests carrying its secret.
    Vram([u8; msg::SECRET_LEN]),
}

/// One segment of a staged transfer.
struct Work<L, K> {
    local: LocalSide<L>,
    local_addr: u64,
    remote_addr: u64,
    len: u64,
    remote: RemoteSide<K>,
    remote_region_addr: u64,
}

/// What follows a CUDA copy.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Next {
    /// The inner transport moves the bounce buffer (WRITE to host memory).
    Wire,
    /// The peer is asked to pull the bounce buffer (WRITE to its VRAM).
    Request,
    /// Nothing: the chunk is done.
    Retire,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Stage {
    /// A CUDA copy runs.
    Copy { ev: sys::CUevent, next: Next },
    /// The inner transport moves it; `then_copy` for READ into a bounce slot.
    Wire { then_copy: bool },
    /// A request is with the peer since `since`; `then_copy` for READ.
    Await { since: Instant, then_copy: bool },
}

/// Part of a segment that a chunk moves.
#[derive(Copy, Clone, Debug)]
struct Piece {
    seg: usize,
    /// Where the part starts in local and remote memory.
    local_addr: u64,
    remote_addr: u64,
    len: u64,
    /// Its offset in the chunk's bounce buffer.
    slot_off: u64,
}

/// One unit in flight: a bounce buffer filled with the pieces of one or
/// more segments (many small blocks share one), or a whole host segment.
struct Chunk {
    token: u64,
    /// `(pool index, slot)` for chunks through a bounce buffer.
    slot: Option<(u32, usize)>,
    pieces: Vec<Piece>,
    stage: Stage,
}

struct Op<T: Transport> {
    token: Token,
    op: XferOp,
    peer: Arc<T::Peer>,
    notification: Option<Vec<u8>>,
    segs: Vec<Work<T::LocalReg, T::RemoteKey>>,
    next_seg: usize,
    next_off: u64,
    chunks: Vec<Chunk>,
    error: Option<Error>,
    /// For a transfer serving a peer's request: the request's id, answered
    /// over `peer` instead of reporting a completion.
    serves: Option<u64>,
}

impl<T: Transport> Op<T> {
    fn fail(&mut self, e: Error) {
        if self.error.is_none() {
            self.error = Some(e);
        }
    }

    fn finished(&self) -> bool {
        self.chunks.is_empty() && (self.error.is_some() || self.next_seg >= self.segs.len())
    }
}

/// A bounce buffer whose request timed out: the peer may still pull from
/// or push into it, so it is never reused. A fresh buffer takes its place
/// in the pool; this one is freed when the late answer arrives (or with
/// the transport).
struct Lost<L> {
    id: u64,
    slot: Slot<L>,
}

/// Most bounce buffers kept for late answers; past this, a timed-out
/// buffer is not replaced and its pool shrinks.
const MAX_LOST: usize = 64;

/// Index in [`Staged`]'s pools of GPU `dev`'s pool for this side's own
/// transfers (`serving` false) or for serving peers' requests.
fn pool_index(dev: u32, serving: bool) -> u32 {
    dev * 2 + u32::from(serving)
}

/// A requester's bounce pool: its address, the pool's packed key, address
/// and length.
type PoolId = (Vec<u8>, Vec<u8>, u64, u64);

/// Connections and keys of peers whose requests this side serves, by
/// their address and by their bounce pool.
struct Requesters<P, K> {
    peers: HashMap<Vec<u8>, Arc<P>>,
    keys: HashMap<PoolId, Arc<K>>,
    /// Taken out of the tables while transfers still held them: released
    /// with the inner transport once those are done.
    retired_peers: Vec<Arc<P>>,
    retired_keys: Vec<Arc<K>>,
}

/// Most requester connections and unpacked keys kept; past these, ones no
/// transfer uses are released, and a request that needs a new one while
/// all are in use is refused.
const MAX_REQUESTERS: usize = 64;
const MAX_REQUESTER_KEYS: usize = 256;

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
    inner: T,
}

// SAFETY: the raw CUDA handles in the pools (streams, events) may be used
// from any thread once their context is bound, which every method does; the
// rest is `Send` when `T`'s handles are.
unsafe impl<T> Send for Staged<T>
where
    T: Transport + Send,
    T::LocalReg: Send + Sync,
    T::RemoteKey: Send + Sync,
    T::Peer: Send + Sync,
{
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
            // Sized up front: completions queue here on the hot path.
            done: VecDeque::with_capacity(1024),
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

    /// A new bounce buffer on GPU `dev`, registered with the inner
    /// transport.
    fn new_slot(&mut self, dev: u32) -> Result<Slot<T::LocalReg>, Error> {
        let buf = PinnedBuffer::new(dev, self.cfg.chunk)?;
        let reg = self.inner.register(&buf.region())?;
        let mut key = vec![0u8; 4096];
        let packed = loop {
            match self.inner.pack_key(&reg, &mut key) {
                Err(Error::BufferTooSmall { needed, .. }) if needed as usize > key.len() => {
                    key.resize(needed as usize, 0);
                }
                other => break other,
            }
        };
        match packed {
            Ok(n) => key.truncate(n),
            Err(e) => {
                self.inner.deregister(reg);
                return Err(e);
            }
        }
        Ok(Slot {
            buf,
            reg: Some(reg),
            key,
        })
    }

    /// Deregisters a bounce buffer; it is freed when dropped after this.
    fn drop_slot(&mut self, mut slot: Slot<T::LocalReg>) {
        if let Some(reg) = slot.reg.take() {
            self.inner.deregister(reg);
        }
    }

    /// Makes sure GPU `dev` has the bounce pool for this side's own
    /// transfers.
    fn pool(&mut self, dev: u32) -> Result<(), Error> {
        self.pool_at(pool_index(dev, false))
    }

    /// Makes sure pool `index` (see [`pool_index`]) exists.
    fn pool_at(&mut self, index: u32) -> Result<(), Error> {
        let i = index as usize;
        let dev = index / 2;
        if self.pools.len() <= i {
            self.pools.resize_with(i + 1, || None);
        }
        if self.pools[i].is_some() {
            return Ok(());
        }
        let ctx = Context::new(dev)?;
        let mut slots = Vec::with_capacity(self.cfg.chunks);
        for _ in 0..self.cfg.chunks {
            match self.new_slot(dev) {
                Ok(slot) => slots.push(Some(slot)),
                Err(e) => {
                    for slot in slots.into_iter().flatten() {
                        self.drop_slot(slot);
                    }
                    return Err(e);
                }
            }
        }
        let stream = match driver::create_stream(&ctx) {
            Ok(stream) => stream,
            Err(e) => {
                for slot in slots.into_iter().flatten() {
                    self.drop_slot(slot);
                }
                return Err(e);
            }
        };
        log::debug!(
            "{}: staging pool {index} on device {dev}: {} x {} bytes",
            self.inner.name(),
            self.cfg.chunks,
            self.cfg.chunk,
        );
        self.pools[i] = Some(Pool {
            ctx,
            stream,
            free_events: Vec::new(),
            slots,
            free_slots: (0..self.cfg.chunks).rev().collect(),
            chunk: self.cfg.chunk,
        });
        Ok(())
    }

    fn pool_mut(
        pools: &mut [Option<Pool<T::LocalReg>>],
        index: u32,
    ) -> Option<&mut Pool<T::LocalReg>> {
        pools.get_mut(index as usize).and_then(Option::as_mut)
    }

    /// Posts chunk `c` of op `oi` to the inner transport, one segment per
    /// piece. `Ok(true)` when it completed inline.
    fn post_wire(&mut self, oi: usize, c: usize) -> Result<bool, Error> {
        let op = &self.ops[oi];
        let ch = &op.chunks[c];
        let slot = ch.slot.map(|(index, slot)| {
            let pool = self.pools[index as usize]
                .as_ref()
                .expect("a slot is only taken from an existing pool");
            let sl = pool.slot(slot);
            let reg = sl
                .reg
                .as_ref()
                .expect("slots are registered while in a pool");
            (sl.buf.addr(), reg)
        });
        let mut segs = Vec::with_capacity(ch.pieces.len());
        for p in &ch.pieces {
            let w = &op.segs[p.seg];
            let RemoteSide::Host(remote) = &w.remote else {
                unreachable!("only chunks to remote host memory go on the wire")
            };
            let (local_addr, local): (u64, &T::LocalReg) = match (&w.local, slot) {
                (_, Some((base, reg))) => (base + p.slot_off, reg),
                (LocalSide::Host(reg), None) => (p.local_addr, &**reg),
                (LocalSide::Vram(_), None) => unreachable!("VRAM chunks always hold a slot"),
            };
            segs.push(Segment {
                local_addr,
                remote_addr: p.remote_addr,
                len: p.len,
                local,
                remote: &**remote,
                remote_region_addr: w.remote_region_addr,
            });
        }
        let st = self.inner.post(
            op.op,
            &op.peer,
            segs.as_slice().into(),
            None,
            Token(ch.token),
        )?;
        Ok(st == PostStatus::Done)
    }

    /// This side's inner transport address (fetched once).
    fn my_addr(&mut self) -> Result<Vec<u8>, Error> {
        if let Some(a) = &self.my_addr {
            return Ok(a.clone());
        }
        let mut buf = vec![0u8; 4096];
        let n = loop {
            match self.inner.local_address(&mut buf) {
                Err(Error::BufferTooSmall { needed, .. }) if needed as usize > buf.len() => {
                    buf.resize(needed as usize, 0);
                }
                other => break other?,
            }
        };
        buf.truncate(n);
        self.my_addr = Some(buf.clone());
        Ok(buf)
    }

    /// Asks the peer to pull (WRITE) or push (READ) chunk `c` of op `oi`
    /// through the chunk's bounce slot; the chunk then awaits the answer.
    fn send_request(&mut self, oi: usize, c: usize) -> Result<(), Error> {
        let addr = self.my_addr()?;
        let op = &self.ops[oi];
        let ch = &op.chunks[c];
        let (index, slot) = ch.slot.expect("requests go through a bounce slot");
        let pool = self.pools[index as usize]
            .as_ref()
            .expect("a slot is only taken from an existing pool");
        let (dir, then_copy) = match op.op {
            XferOp::Write => (Direction::Pull, false),
            XferOp::Read => (Direction::Push, true),
        };
        let base = pool.slot_addr(slot);
        let secret = ch
            .pieces
            .first()
            .and_then(|p| match op.segs.get(p.seg).map(|w| &w.remote) {
                Some(RemoteSide::Vram(secret)) => Some(*secret),
                _ => None,
            })
            .unwrap_or_default();
        let req = Request {
            dir,
            id: ch.token ^ self.salt,
            ranges: ch
                .pieces
                .iter()
                .map(|p| Range {
                    vram: p.remote_addr,
                    len: p.len,
                    host: base + p.slot_off,
                })
                .collect(),
            pool: base,
            pool_len: pool.chunk as u64,
            addr: &addr,
            key: &pool.slot(slot).key,
            secret,
        };
        msg::encode_request(&req, &mut self.out)?;
        self.inner.send_notification(&op.peer, &self.out)?;
        self.ops[oi].chunks[c].stage = Stage::Await {
            since: Instant::now(),
            then_copy,
        };
        Ok(())
    }

    /// Starts the copies of chunk `c` of op `oi` out of its bounce slot into
    /// the local destination (READ's last step).
    fn copy_out(&mut self, oi: usize, c: usize) {
        let ch = &self.ops[oi].chunks[c];
        let (index, slot) = ch.slot.expect("READ through a bounce slot");
        let res = match Self::pool_mut(&mut self.pools, index) {
            Some(p) => p.copies(false, slot, &ch.pieces),
            None => Err(driver::no_driver()),
        };
        match res {
            Ok(ev) => {
                self.ops[oi].chunks[c].stage = Stage::Copy {
                    ev,
                    next: Next::Retire,
                }
            }
            Err(e) => {
                self.ops[oi].fail(e);
                self.retire(oi, c);
            }
        }
    }

    /// Chunk `c` of op `oi` left the wire (successfully).
    fn wire_done(&mut self, oi: usize, c: usize) {
        let then_copy = matches!(
            self.ops[oi].chunks[c].stage,
            Stage::Wire { then_copy: true }
        );
        // A failed transfer copies nothing more (its VRAM may be gone).
        if then_copy && self.ops[oi].error.is_none() {
            self.copy_out(oi, c);
        } else {
            self.retire(oi, c);
        }
    }

    /// Removes chunk `c` of op `oi` and frees its slot.
    fn retire(&mut self, oi: usize, c: usize) {
        let ch = self.ops[oi].chunks.swap_remove(c);
        if let Some((index, slot)) = ch.slot {
            if let Some(p) = Self::pool_mut(&mut self.pools, index) {
                p.free_slots.push(slot);
            }
        }
    }

    fn find_chunk(&self, token: u64) -> Option<(usize, usize)> {
        self.ops.iter().enumerate().find_map(|(oi, op)| {
            op.chunks
                .iter()
                .position(|c| c.token == token)
                .map(|c| (oi, c))
        })
    }

    fn chunk_token(&mut self) -> u64 {
        self.next_chunk = self.next_chunk.wrapping_add(1);
        (u64::from(self.next_chunk) << 32) | CHUNK_MARK
    }

    /// The GPU whose bounce pool moves segments with host memory on this
    /// side and VRAM on the peer's: the first pool there is, else GPU 0's.
    fn host_pool_dev(&mut self) -> Result<u32, Error> {
        if let Some(d) = self.first_own_pool() {
            return Ok(d);
        }
        self.pool(0)?;
        Ok(0)
    }

    /// The GPU of the first pool for own transfers, if any.
    fn first_own_pool(&self) -> Option<u32> {
        (0..self.pools.len())
            .step_by(2)
            .find(|&i| self.pools[i].is_some())
            .map(|i| i as u32 / 2)
    }

    /// Where segment `seg` of op `oi` goes through a bounce buffer: the GPU
    /// of that buffer (`None`: host to host, no buffer), and whether the
    /// remote side is VRAM.
    fn route(&self, oi: usize, seg: usize) -> (Option<u32>, bool) {
        let w = &self.ops[oi].segs[seg];
        let remote_vram = matches!(w.remote, RemoteSide::Vram(_));
        let dev = match (&w.local, remote_vram) {
            (LocalSide::Vram(dev), _) => Some(*dev),
            (LocalSide::Host(_), true) => Some(self.first_own_pool().unwrap_or(0)),
            (LocalSide::Host(_), false) => None,
        };
        (dev, remote_vram)
    }

    /// Most pieces one request may carry so that it fits a notification.
    fn max_request_pieces(&mut self, index: u32, slot: usize) -> usize {
        let addr = self.my_addr().map(|a| a.len()).unwrap_or(0);
        let key = Self::pool_mut(&mut self.pools, index).map_or(0, |p| p.slot(slot).key.len());
        let max = self.inner.capabilities().max_notification as usize;
        let fixed = msg::request_len(addr, key, 0);
        (max.saturating_sub(fixed) / msg::RANGE_LEN).clamp(1, usize::from(u16::MAX))
    }

    /// Takes the next pieces of op `oi` for a chunk: the rest of one host
    /// segment (no bounce buffer), or as many consecutive pieces as fit
    /// bounce buffer `slot` of GPU `dev` (same route, at most `max`).
    fn take_pieces(&mut self, oi: usize, slot: Option<(u32, usize)>, max: usize) -> Vec<Piece> {
        let (dev, remote_vram) = self.route(oi, self.ops[oi].next_seg);
        let cap = self.cfg.chunk as u64;
        let mut pieces = Vec::new();
        let mut used = 0;
        loop {
            let op = &self.ops[oi];
            if op.next_seg >= op.segs.len() || pieces.len() >= max {
                break;
            }
            if self.route(oi, op.next_seg) != (dev, remote_vram) {
                break;
            }
            let w = &op.segs[op.next_seg];
            let (off, seg_len) = (op.next_off, w.len);
            let len = match slot {
                None => w.len - off,
                Some(_) => (w.len - off).min(cap - used),
            };
            pieces.push(Piece {
                seg: op.next_seg,
                local_addr: w.local_addr + off,
                remote_addr: w.remote_addr + off,
                len,
                slot_off: used,
            });
            used += len;
            let op = &mut self.ops[oi];
            if off + len >= seg_len {
                op.next_seg += 1;
                op.next_off = 0;
            } else {
                op.next_off = off + len;
            }
            if slot.is_none() || used >= cap {
                break;
            }
        }
        pieces
    }

    /// Starts as many new chunks of op `oi` as bounce buffers allow.
    fn start_chunks(&mut self, oi: usize) {
        loop {
            let op = &self.ops[oi];
            if op.error.is_some() || op.next_seg >= op.segs.len() {
                return;
            }
            let (slot_dev, remote_vram) = self.route(oi, op.next_seg);
            let serving = op.serves.is_some();
            let slot = match slot_dev {
                None => None,
                Some(dev) => {
                    let index = pool_index(dev, serving);
                    let Some(p) = Self::pool_mut(&mut self.pools, index) else {
                        self.ops[oi].fail(driver::no_driver());
                        return;
                    };
                    let Some(slot) = p.free_slots.pop() else {
                        if p.slots.iter().all(Option::is_none) {
                            let e = self.bad(&format!(
                                "every bounce buffer of device {dev} was lost to requests that timed out \
                                 ({} kept for late answers; no more are replaced)",
                                self.lost.len()
                            ));
                            self.ops[oi].fail(e);
                        }
                        return;
                    };
                    Some((index, slot))
                }
            };
            let max = match slot {
                Some((index, s)) if remote_vram => self.max_request_pieces(index, s),
                _ => self.inner.capabilities().max_segments as usize,
            };
            let max = if max == 0 { usize::MAX } else { max };
            let pieces = self.take_pieces(oi, slot, max);
            let op_kind = self.ops[oi].op;
            let token = self.chunk_token();
            self.ops[oi].chunks.push(Chunk {
                token,
                slot,
                pieces,
                stage: Stage::Wire { then_copy: false },
            });
            let c = self.ops[oi].chunks.len() - 1;
            let started = match (slot, op_kind) {
                (Some((index, s)), XferOp::Write) => {
                    let pool = Self::pool_mut(&mut self.pools, index).expect("checked above");
                    pool.copies(true, s, &self.ops[oi].chunks[c].pieces)
                        .map(|ev| {
                            let next = if remote_vram {
                                Next::Request
                            } else {
                                Next::Wire
                            };
                            self.ops[oi].chunks[c].stage = Stage::Copy { ev, next };
                        })
                }
                (Some(_), XferOp::Read) if remote_vram => self.send_request(oi, c),
                (slot, kind) => {
                    self.ops[oi].chunks[c].stage = Stage::Wire {
                        then_copy: slot.is_some() && kind == XferOp::Read,
                    };
                    match self.post_wire(oi, c) {
                        Ok(true) => {
                            self.wire_done(oi, c);
                            Ok(())
                        }
                        Ok(false) => Ok(()),
                        Err(e) => Err(e),
                    }
                }
            };
            if let Err(e) = started {
                self.ops[oi].fail(e);
                self.retire(oi, c);
            }
        }
    }

    /// The connection back to a requester at `addr` (made once).
    fn requester(&mut self, addr: &[u8]) -> Result<Arc<T::Peer>, Error> {
        if let Some(p) = self.requesters.peers.get(addr) {
            return Ok(Arc::clone(p));
        }
        if self.requesters.peers.len() >= MAX_REQUESTERS {
            self.trim_requesters();
        }
        if self.requesters.peers.len() >= MAX_REQUESTERS {
            return Err(self.bad(&format!(
                "{MAX_REQUESTERS} peers' requests are being served; refusing a new peer"
            )));
        }
        let p = Arc::new(self.inner.connect(addr)?);
        self.requesters.peers.insert(addr.to_vec(), Arc::clone(&p));
        Ok(p)
    }

    /// Starts serving a peer's request: checks it names VRAM registered
    /// here, then moves it with an internal transfer whose completion is
    /// answered to the peer.
    fn serve(&mut self, r: &Request<'_>, peer: Arc<T::Peer>) -> Result<(), Error> {
        // Compared in full whatever the first difference, so that the time
        // taken tells nothing of the secret.
        let differ = r
            .secret
            .iter()
            .zip(self.secret.iter())
            .fold(0u8, |d, (a, b)| d | (a ^ b));
        if differ != 0 {
            return Err(
                self.bad("a staging request without this agent's secret: load its metadata first")
            );
        }
        if r.ranges.is_empty() {
            return Err(self.bad("a staging request without ranges"));
        }
        let mut segs = Vec::with_capacity(r.ranges.len());
        for g in &r.ranges {
            let end = g.vram.checked_add(g.len);
            let region = self
                .vram
                .iter()
                .find(|v| g.vram >= v.addr && end.is_some_and(|e| Some(e) <= v.end()))
                .copied();
            let Some(region) = region.filter(|_| g.len > 0) else {
                return Err(self.bad(&format!(
                    "VRAM {:#x} (+{} bytes) is not inside a VRAM region registered here",
                    g.vram, g.len
                )));
            };
            let host_fits = g.host >= r.pool
                && g.host
                    .checked_add(g.len)
                    .is_some_and(|e| Some(e) <= r.pool.checked_add(r.pool_len));
            if !host_fits {
                return Err(self.bad(&format!(
                    "host range {:#x} (+{} bytes) leaves the requester's buffer {:#x} (+{} bytes)",
                    g.host, g.len, r.pool, r.pool_len
                )));
            }
            segs.push((region.dev, *g));
        }
        let ident = (r.addr.to_vec(), r.key.to_vec(), r.pool, r.pool_len);
        let key = match self.requesters.keys.get(&ident) {
            Some(k) => Arc::clone(k),
            None => {
                if self.requesters.keys.len() >= MAX_REQUESTER_KEYS {
                    self.trim_requesters();
                }
                if self.requesters.keys.len() >= MAX_REQUESTER_KEYS {
                    return Err(self.bad(&format!(
                        "{MAX_REQUESTER_KEYS} requesters' buffers are in use; refusing another"
                    )));
                }
                let pool = Region::dram(r.pool, r.pool_len);
                let k = Arc::new(self.inner.unpack_key(&peer, &pool, r.key)?);
                self.requesters.keys.insert(ident, Arc::clone(&k));
                k
            }
        };
        // Serving has pools of its own: a peer's requests must never wait
        // for buffers this side's transfers hold while they wait for that
        // same peer's answers.
        for &(dev, _) in &segs {
            self.pool_at(pool_index(dev, true))?;
        }
        let segs = segs
            .into_iter()
            .map(|(dev, g)| Work {
                local: LocalSide::Vram(dev),
                local_addr: g.vram,
                remote_addr: g.host,
                len: g.len,
                remote: RemoteSide::Host(Arc::clone(&key)),
                remote_region_addr: r.pool,
            })
            .collect();
        self.ops.push(Op {
            token: Token(0),
            op: match r.dir {
                Direction::Pull => XferOp::Read,
                Direction::Push => XferOp::Write,
            },
            peer,
            notification: None,
            segs,
            next_seg: 0,
            next_off: 0,
            chunks: Vec::new(),
            error: None,
            serves: Some(r.id),
        });
        let oi = self.ops.len() - 1;
        self.start_chunks(oi);
        Ok(())
    }

    /// Drops the connection back to a requester, and the keys unpacked
    /// through it, from the requester tables; released with the inner
    /// transport where nothing else holds them.
    fn forget_requester(&mut self, peer: &Arc<T::Peer>) {
        let Some(addr) = self
            .requesters
            .peers
            .iter()
            .find(|(_, p)| Arc::ptr_eq(p, peer))
            .map(|(a, _)| a.clone())
        else {
            return;
        };
        let ids: Vec<PoolId> = self
            .requesters
            .keys
            .keys()
            .filter(|id| id.0 == addr)
            .cloned()
            .collect();
        for id in ids {
            if let Some(k) = self.requesters.keys.remove(&id) {
                self.requesters.retired_keys.push(k);
            }
        }
        if let Some(p) = self.requesters.peers.remove(&addr) {
            self.requesters.retired_peers.push(p);
        }
        self.release_retired();
    }

    /// Releases retired keys and connections no transfer holds any more.
    fn release_retired(&mut self) {
        for k in std::mem::take(&mut self.requesters.retired_keys) {
            match Arc::try_unwrap(k) {
                Ok(k) => self.inner.release_key(k),
                Err(k) => self.requesters.retired_keys.push(k),
            }
        }
        for p in std::mem::take(&mut self.requesters.retired_peers) {
            match Arc::try_unwrap(p) {
                Ok(p) => self.inner.disconnect(p),
                Err(p) => self.requesters.retired_peers.push(p),
            }
        }
    }

    /// Retires the requester keys and connections no transfer uses now
    /// (keys first: a connection is kept while a key of its peer is).
    fn trim_requesters(&mut self) {
        let idle: Vec<PoolId> = self
            .requesters
            .keys
            .iter()
            .filter(|(_, k)| Arc::strong_count(k) == 1)
            .map(|(id, _)| id.clone())
            .collect();
        for id in idle {
            if let Some(k) = self.requesters.keys.remove(&id) {
                self.requesters.retired_keys.push(k);
            }
        }
        let keys = &self.requesters.keys;
        let idle: Vec<Vec<u8>> = self
            .requesters
            .peers
            .iter()
            .filter(|(a, p)| Arc::strong_count(p) == 1 && !keys.keys().any(|id| &id.0 == *a))
            .map(|(a, _)| a.clone())
            .collect();
        for a in idle {
            if let Some(p) = self.requesters.peers.remove(&a) {
                self.requesters.retired_peers.push(p);
            }
        }
        self.release_retired();
    }

    /// Sends the answer to request `id` over `peer`.
    fn answer(&mut self, peer: &T::Peer, id: u64, result: Result<(), &Error>) {
        let text = result.map_err(|e| e.to_string());
        msg::encode_done(
            id,
            text.as_ref().map(|_| ()).map_err(String::as_str),
            &mut self.out,
        );
        if let Err(e) = self.inner.send_notification(peer, &self.out) {
            log::warn!(
                "{}: answering staging request {id:#x} failed: {e}",
                self.inner.name()
            );
        }
    }

    /// Acts on a staging message received as a notification.
    fn on_staging_message(&mut self, m: &[u8]) {
        self.events = self.events.wrapping_add(1);
        match msg::decode(m) {
            Err(e) => log::warn!("{}: dropping a staging message: {e}", self.inner.name()),
            Ok(Message::Request(r)) => {
                let peer = match self.requester(r.addr) {
                    Ok(p) => p,
                    Err(e) => {
                        log::warn!(
                            "{}: cannot connect back to a staging requester: {e}",
                            self.inner.name()
                        );
                        return;
                    }
                };
                if let Err(e) = self.serve(&r, Arc::clone(&peer)) {
                    log::debug!(
                        "{}: staging request {:#x} refused: {e}",
                        self.inner.name(),
                        r.id
                    );
                    self.answer(&peer, r.id, Err(&e));
                }
            }
            Ok(Message::Done { id, result }) => self.on_answer(id, result),
        }
    }

    /// The peer answered request `id` (a chunk awaiting it, or a
    /// lost bounce buffer whose request timed out).
    fn on_answer(&mut self, id: u64, result: Result<(), &str>) {
        let id = id ^ self.salt;
        let found = self
            .find_chunk(id)
            .filter(|&(oi, c)| matches!(self.ops[oi].chunks[c].stage, Stage::Await { .. }));
        let Some((oi, c)) = found else {
            if let Some(i) = self.lost.iter().position(|l| l.id == id) {
                let l = self.lost.swap_remove(i);
                self.drop_slot(l.slot);
            } else {
                log::debug!("{}: answer to unknown request {id:#x}", self.inner.name());
            }
            return;
        };
        match result {
            Ok(()) => {
                let then_copy = matches!(
                    self.ops[oi].chunks[c].stage,
                    Stage::Await {
                        then_copy: true,
                        ..
                    }
                );
                if then_copy && self.ops[oi].error.is_none() {
                    self.copy_out(oi, c);
                } else {
                    self.retire(oi, c);
                }
            }
            Err(text) => {
                let what = self.ops[oi].op.name();
                let e = self.bad(&format!("the peer could not serve a staged {what}: {text}"));
                self.ops[oi].fail(e);
                self.retire(oi, c);
            }
        }
    }

    /// Receives notifications of the inner transport until none is left:
    /// staging messages are acted on, user ones kept for
    /// [`poll_notification`](Transport::poll_notification).
    fn pump_notifications(&mut self) {
        loop {
            match self.receive() {
                None => return,
                Some(Err(e)) => {
                    log::warn!(
                        "{}: receiving a notification failed: {e}",
                        self.inner.name()
                    );
                    return;
                }
                Some(Ok(n)) => self.user_notes.push_back(self.note_buf[..n].to_vec()),
            }
        }
    }

    /// The next user notification of the inner transport, in `note_buf`;
    /// staging messages met on the way are acted on.
    fn receive(&mut self) -> Option<Result<usize, Error>> {
        if self.note_buf.is_empty() {
            let max = self.inner.capabilities().max_notification as usize;
            self.note_buf = vec![0; max.max(4096)];
        }
        loop {
            let mut buf = std::mem::take(&mut self.note_buf);
            let got = self.inner.poll_notification(&mut buf);
            match got {
                Some(Ok(n)) if msg::is_staging(&buf[..n]) => {
                    self.on_staging_message(&buf[..n]);
                    self.note_buf = buf;
                }
                Some(Err(Error::BufferTooSmall { needed, .. }))
                    if needed as usize > buf.len() && needed <= MAX_NOTE_BUF =>
                {
                    buf.resize(needed as usize, 0);
                    self.note_buf = buf;
                }
                other => {
                    self.note_buf = buf;
                    return other;
                }
            }
        }
    }

    /// Fails chunks whose request waited longer than the reply timeout;
    /// their bounce buffers wait for the late answer in `lost`, and fresh
    /// ones take their places (up to [`MAX_LOST`]).
    fn expire_requests(&mut self) {
        let limit = self.cfg.reply_timeout;
        for oi in 0..self.ops.len() {
            let mut c = 0;
            while c < self.ops[oi].chunks.len() {
                let ch = &self.ops[oi].chunks[c];
                let Stage::Await { since, .. } = ch.stage else {
                    c += 1;
                    continue;
                };
                let waited = since.elapsed();
                if waited < limit {
                    c += 1;
                    continue;
                }
                let ch = self.ops[oi].chunks.swap_remove(c);
                if let Some((index, slot)) = ch.slot {
                    self.lose_slot(ch.token, index, slot);
                }
                log::warn!(
                    "{}: no answer to staging request {:#x} within {waited:?}",
                    self.inner.name(),
                    ch.token
                );
                self.ops[oi].fail(Error::TimedOut {
                    after_ms: waited.as_millis() as u64,
                });
            }
        }
    }

    /// Takes bounce buffer `slot` of GPU `dev` out of use for good (its
    /// request `id` timed out) and puts a fresh one in its place.
    fn lose_slot(&mut self, id: u64, index: u32, slot: usize) {
        let dev = index / 2;
        let Some(pool) = Self::pool_mut(&mut self.pools, index) else {
            return;
        };
        let Some(old) = pool.slots[slot].take() else {
            return;
        };
        self.lost.push(Lost { id, slot: old });
        if self.lost.len() > MAX_LOST {
            log::warn!(
                "{}: {} bounce buffers wait for late answers; device {dev} is down one",
                self.inner.name(),
                self.lost.len()
            );
            return;
        }
        match self.new_slot(dev) {
            Ok(fresh) => {
                if let Some(pool) = Self::pool_mut(&mut self.pools, index) {
                    pool.slots[slot] = Some(fresh);
                    pool.free_slots.push(slot);
                }
            }
            Err(e) => log::warn!(
                "{}: replacing a bounce buffer of device {dev} failed: {e}",
                self.inner.name()
            ),
        }
    }

    /// Moves every staged transfer forward; finished ones go to `done`.
    fn drive(&mut self) {
        // 1. Answers to requests (only looked for while some are awaited,
        //    so that plain notifications stay with the caller otherwise).
        let awaiting = self.ops.iter().any(|o| {
            o.chunks
                .iter()
                .any(|c| matches!(c.stage, Stage::Await { .. }))
        });
        // Once notifications are kept here, newer ones must queue behind
        // them (and peers' requests still get served).
        if awaiting || !self.lost.is_empty() || !self.user_notes.is_empty() {
            self.pump_notifications();
            self.expire_requests();
        }
        if self.ops.iter().any(|o| o.serves.is_some()) {
            self.events = self.events.wrapping_add(1);
        }
        // 2. Completions of the inner transport.
        while let Some(c) = self.inner.poll() {
            if c.token.0 & 0xffff_ffff != CHUNK_MARK {
                self.done.push_back(c);
                continue;
            }
            let Some((oi, ci)) = self.find_chunk(c.token.0) else {
                log::debug!("staging: completion for unknown chunk {:#x}", c.token.0);
                continue;
            };
            match c.result {
                Ok(()) => self.wire_done(oi, ci),
                Err(e) => {
                    self.ops[oi].fail(e);
                    self.retire(oi, ci);
                }
            }
        }
        // 3. CUDA copies, then new chunks, then finished transfers.
        let mut oi = 0;
        while oi < self.ops.len() {
            let mut ci = 0;
            while ci < self.ops[oi].chunks.len() {
                let ch = &self.ops[oi].chunks[ci];
                let Stage::Copy { ev, next } = ch.stage else {
                    ci += 1;
                    continue;
                };
                let (index, _) = ch.slot.expect("copies use a slot");
                let q = match Self::pool_mut(&mut self.pools, index) {
                    Some(p) => p.query(ev),
                    None => Err(driver::no_driver()),
                };
                let step = match q {
                    Ok(false) => {
                        ci += 1;
                        continue;
                    }
                    // A failed transfer sends nothing more.
                    Ok(true) if self.ops[oi].error.is_some() => Ok(true),
                    Ok(true) => match next {
                        Next::Wire => {
                            self.ops[oi].chunks[ci].stage = Stage::Wire { then_copy: false };
                            self.post_wire(oi, ci)
                        }
                        Next::Request => self.send_request(oi, ci).map(|()| false),
                        Next::Retire => Ok(true),
                    },
                    Err(e) => Err(e),
                };
                match step {
                    Ok(true) => self.retire(oi, ci),
                    Ok(false) => ci += 1,
                    Err(e) => {
                        self.ops[oi].fail(e);
                        self.retire(oi, ci);
                    }
                }
            }
            self.start_chunks(oi);
            if self.ops[oi].finished() {
                let mut op = self.ops.swap_remove(oi);
                let result = match op.error.take() {
                    Some(e) => Err(e),
                    None => match &op.notification {
                        Some(m) => self.inner.send_notification(&op.peer, m),
                        None => Ok(()),
                    },
                };
                match op.serves {
                    Some(id) => {
                        self.answer(&op.peer, id, result.as_ref().map(|_| ()));
                        if result.is_err() {
                            // The connection back may be dead (the
                            // requester restarted or reset it): the next
                            // request connects afresh.
                            let peer = Arc::clone(&op.peer);
                            drop(op);
                            self.forget_requester(&peer);
                        }
                    }
                    None => self.done.push_back(Completion {
                        token: op.token,
                        result,
                    }),
                }
            } else {
                oi += 1;
            }
        }
        if !self.requesters.retired_keys.is_empty() || !self.requesters.retired_peers.is_empty() {
            self.release_retired();
        }
    }

    /// Posts a transfer with no VRAM on either side straight to the inner
    /// transport; up to [`DIRECT_INLINE`] segments without allocating.
    fn post_direct(
        &mut self,
        op: XferOp,
        peer: &Arc<T::Peer>,
        segments: Segments<'_, StagedReg<T::LocalReg>, StagedKey<T::RemoteKey>>,
        notification: Option<&[u8]>,
        token: Token,
    ) -> Result<PostStatus, Error> {
        let unwrap = direct_segment::<T::LocalReg, T::RemoteKey>;
        let bad = || Error::UnsupportedMemKind {
            backend: self.inner.name(),
            kind: MemKind::Vram,
        };
        if segments.len() <= DIRECT_INLINE {
            let mut v: heapless::Vec<Segment<'_, T::LocalReg, T::RemoteKey>, DIRECT_INLINE> =
                heapless::Vec::new();
            for s in segments {
                let seg = unwrap(&s).ok_or_else(bad)?;
                if v.push(seg).is_err() {
                    break;
                }
            }
            self.inner
                .post(op, peer, v.as_slice().into(), notification, token)
        } else {
            let mut v = Vec::with_capacity(segments.len());
            for s in segments {
                v.push(unwrap(&s).ok_or_else(bad)?);
            }
            self.inner
                .post(op, peer, v.as_slice().into(), notification, token)
        }
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
        if let Some(m) = notification {
            let max = self.inner.capabilities().max_notification;
            if m.len() as u64 > u64::from(max) {
                return Err(Error::NotificationTooLong {
                    len: m.len() as u64,
                    max: u64::from(max),
                });
            }
        }
        if host_to_vram {
            self.host_pool_dev()?;
        }
        let mut segs = Vec::with_capacity(segments.len());
        for s in segments {
            let local = match s.local {
                StagedReg::Host(l) => LocalSide::Host(Arc::clone(l)),
                StagedReg::Vram(region) => LocalSide::Vram(region.dev),
            };
            let remote = match s.remote {
                StagedKey::Host(r) => RemoteSide::Host(Arc::clone(r)),
                StagedKey::Vram(_, secret) => RemoteSide::Vram(*secret),
            };
            segs.push(Work {
                local,
                local_addr: s.local_addr,
                remote_addr: s.remote_addr,
                len: s.len,
                remote,
                remote_region_addr: s.remote_region_addr,
            });
        }
        self.ops.push(Op {
            token,
            op,
            peer: Arc::clone(peer),
            notification: notification.map(<[u8]>::to_vec),
            segs,
            next_seg: 0,
            next_off: 0,
            chunks: Vec::new(),
            error: None,
            serves: None,
        });
        // The copies into bounce buffers (one per block: many for
        // KV-shaped transfers) start at the next poll, so that posting
        // stays cheap for the caller.
        Ok(PostStatus::InProgress)
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
        self.refuse_staged(token, "abandoning a staged VRAM transfer")?;
        self.inner.abandon(token)
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

#[cfg(test)]
mod tests {
    //! The staging protocol's receiving side over the core's in-memory
    //! transport; the data paths need a GPU (`std-shim/tests/gpu.rs`).
    use super::*;
    use kvxfer_core::transport::loopback::{Loopback, LoopbackMemory};

    const BASE: u64 = 0x1000;
    type Mem = LoopbackMemory<4096>;

    /// A loopback agent that registers host memory only, as UCX without
    /// CUDA support and libfabric do: VRAM is staged over it.
    fn host_only(mem: &Mem, id: u32) -> Loopback<'_, 4096> {
        let mut t = Loopback::new(mem, id);
        let mut caps = t.capabilities();
        caps.mem_kinds = MemKinds::DRAM;
        t.set_capabilities(caps);
        t
    }

    #[test]
    fn vram_passes_through_to_an_inner_transport_that_registers_it() {
        let mem = Box::new(Mem::new(BASE));
        assert!(!Staged::new(host_only(&mem, 1)).native_vram());
        // The loopback transport takes VRAM itself.
        let mut a = Staged::new(Loopback::new(&mem, 1));
        assert!(a.native_vram());
        let region = Region {
            addr: 0x1100,
            len: 256,
            dev: 0,
            kind: MemKind::Vram,
        };
        // The peer's VRAM key is the inner transport's: no staging.
        let peer = a.connect(&2u32.to_le_bytes()).unwrap();
        let b = Loopback::new(&mem, 2);
        let mut key = [0u8; 64];
        let n = b.pack_key(&region, &mut key).unwrap();
        assert!(matches!(
            a.unpack_key(&peer, &region, &key[..n]),
            Ok(StagedKey::Host(k)) if *k == region
        ));
        // A staging key still names staged VRAM.
        let staged = msg::vram_key(b"sixteen byte key");
        assert!(matches!(
            a.unpack_key(&peer, &region, &staged),
            Ok(StagedKey::Vram(r, _)) if r == region
        ));
    }

    fn recv<T: Transport>(t: &mut T) -> Option<Vec<u8>> {
        let mut b = vec![0; 4096];
        t.poll_notification(&mut b).map(|r| {
            let n = r.expect("notification");
            b.truncate(n);
            b
        })
    }

    /// Sends `req` from plain loopback agent 2 to staged agent 1, lets
    /// agent 1 poll its notifications (which must yield no user message),
    /// and returns the answer agent 2 received.
    fn ask(
        a: &mut Staged<Loopback<'_, 4096>>,
        b: &mut Loopback<'_, 4096>,
        req: &Request<'_>,
    ) -> String {
        let to_a = b.connect(&1u32.to_le_bytes()).unwrap();
        let mut out = Vec::new();
        msg::encode_request(req, &mut out).unwrap();
        b.send_notification(&to_a, &out).unwrap();
        assert_eq!(recv(a), None, "a request is not a user notification");
        let answer = recv(b).expect("an answer");
        match msg::decode(&answer).unwrap() {
            Message::Done { id, result } => {
                assert_eq!(id, req.id);
                match result {
                    Ok(()) => "ok".to_string(),
                    Err(t) => t.to_string(),
                }
            }
            other => panic!("not an answer: {other:?}"),
        }
    }

    #[test]
    fn user_notifications_pass_and_staging_messages_are_taken_out() {
        let mem = Box::new(Mem::new(BASE));
        let mut a = Staged::new(host_only(&mem, 1));
        let mut b = Loopback::new(&mem, 2);
        let to_a = b.connect(&1u32.to_le_bytes()).unwrap();
        let mut done = Vec::new();
        msg::encode_done(42, Ok(()), &mut done);
        b.send_notification(&to_a, b"\x05alicehello").unwrap();
        // Malformed, and an answer to nothing asked: both dropped.
        b.send_notification(&to_a, &msg::PREFIX).unwrap();
        b.send_notification(&to_a, &done).unwrap();
        b.send_notification(&to_a, b"\x03bobbye").unwrap();
        assert_eq!(recv(&mut a).unwrap(), b"\x05alicehello");
        assert_eq!(recv(&mut a).unwrap(), b"\x03bobbye");
        assert_eq!(recv(&mut a), None);
        assert_eq!(a.staging_events(), 2);
    }

    #[test]
    fn a_notification_larger_than_the_buffer_waits_for_one_that_fits() {
        let mem = Box::new(Mem::new(BASE));
        let mut a = Staged::new(host_only(&mem, 1));
        let mut b = Loopback::new(&mem, 2);
        let to_a = b.connect(&1u32.to_le_bytes()).unwrap();
        let long = [7u8; 100];
        b.send_notification(&to_a, &long).unwrap();
        b.send_notification(&to_a, b"\x01xnext").unwrap();
        let mut small = [0u8; 10];
        for _ in 0..2 {
            assert_eq!(
                a.poll_notification(&mut small),
                Some(Err(Error::BufferTooSmall {
                    needed: 100,
                    available: 10
                }))
            );
        }
        assert_eq!(recv(&mut a).unwrap(), long);
        assert_eq!(recv(&mut a).unwrap(), b"\x01xnext");
    }

    #[test]
    fn requests_outside_registered_vram_or_the_pool_are_answered_with_the_reason() {
        let mem = Box::new(Mem::new(BASE));
        let mut a = Staged::new(host_only(&mem, 1));
        let mut b = Loopback::new(&mem, 2);
        let pool = Region::dram(0x1800, 512);
        let reg = b.register(&pool).unwrap();
        let mut key = [0u8; 64];
        let n = b.pack_key(&reg, &mut key).unwrap();
        let addr = 2u32.to_le_bytes();
        let range = |vram, len, host| Range { vram, len, host };
        let req = Request {
            dir: Direction::Pull,
            id: 7,
            ranges: vec![range(0x1100, 128, 0x1800), range(0x1180, 128, 0x1880)],
            pool: 0x1800,
            pool_len: 512,
            addr: &addr,
            key: &key[..n],
            secret: a.secret,
        };
        // Without the server's secret (from its VRAM key), nothing is
        // looked at.
        let guess = Request {
            secret: [0; msg::SECRET_LEN],
            ..req.clone()
        };
        assert_eq!(
            ask(&mut a, &mut b, &guess),
            "LOOPBACK error 1: a staging request without this agent's secret: load its metadata first"
        );
        assert_eq!(
            ask(&mut a, &mut b, &req),
            "LOOPBACK error 1: VRAM 0x1100 (+128 bytes) is not inside a VRAM region registered here"
        );
        // As if VRAM 0x1100 (+256) were registered (that needs a GPU).
        a.vram.push(Region {
            addr: 0x1100,
            len: 256,
            dev: 0,
            kind: MemKind::Vram,
        });
        let with = |id, ranges: Vec<Range>| Request {
            id,
            ranges,
            ..req.clone()
        };
        // The second range runs past the region's end.
        let past_end = with(
            8,
            vec![range(0x1100, 128, 0x1800), range(0x1180, 129, 0x1880)],
        );
        assert_eq!(
            ask(&mut a, &mut b, &past_end),
            "LOOPBACK error 1: VRAM 0x1180 (+129 bytes) is not inside a VRAM region registered here"
        );
        let empty = with(9, vec![range(0x1100, 0, 0x1800)]);
        assert_eq!(
            ask(&mut a, &mut b, &empty),
            "LOOPBACK error 1: VRAM 0x1100 (+0 bytes) is not inside a VRAM region registered here"
        );
        assert_eq!(
            ask(&mut a, &mut b, &with(10, Vec::new())),
            "LOOPBACK error 1: a staging request without ranges"
        );
        let outside_pool = Request {
            dir: Direction::Push,
            ..with(11, vec![range(0x1100, 256, 0x1901)])
        };
        assert_eq!(
            ask(&mut a, &mut b, &outside_pool),
            "LOOPBACK error 1: host range 0x1901 (+256 bytes) leaves the requester's buffer 0x1800 (+512 bytes)"
        );
        let bad_key = Request {
            key: b"not the key",
            ..with(12, req.ranges.clone())
        };
        assert_eq!(
            ask(&mut a, &mut b, &bad_key),
            "LOOPBACK error -3: remote key does not match the peer's region"
        );
        if !driver::driver_present() {
            // A valid request reaches the copy, which needs the driver.
            let answer = ask(&mut a, &mut b, &with(13, req.ranges.clone()));
            assert_eq!(answer, driver::no_driver().to_string());
        }
        assert_eq!(a.staged_in_flight(), 0);
    }

    #[test]
    fn vram_keys_of_another_protocol_version_are_refused() {
        let mem = Box::new(Mem::new(BASE));
        let mut a = Staged::new(host_only(&mem, 1));
        let peer = a.connect(&2u32.to_le_bytes()).unwrap();
        let region = Region {
            addr: 0x1100,
            len: 256,
            dev: 1,
            kind: MemKind::Vram,
        };
        let key = msg::vram_key(b"sixteen byte key");
        assert!(matches!(
            a.unpack_key(&peer, &region, &key),
            Ok(StagedKey::Vram(r, s)) if r == region && &s == b"sixteen byte key"
        ));
        // Each side publishes its own random secret.
        let vram = StagedReg::Vram(region);
        let mut packed = [0u8; 64];
        let n = a.pack_key(&vram, &mut packed).unwrap();
        let other = Staged::new(host_only(&mem, 3));
        let mut packed2 = [0u8; 64];
        let n2 = other.pack_key(&vram, &mut packed2).unwrap();
        assert_eq!((n, n2), (22, 22));
        assert_eq!(msg::vram_secret(&packed[..n]), Some(a.secret));
        assert_ne!(packed[..n], packed2[..n2]);
        let mut v1 = key;
        v1[5] = 1;
        assert_eq!(
            a.unpack_key(&peer, &region, &v1).unwrap_err().to_string(),
            "LOOPBACK error 1: VRAM 0x1100: the peer's key (22 bytes, starting 004b58534701) is not \
             of staging version 2"
        );
        assert_eq!(
            a.unpack_key(&peer, &region, &msg::VRAM_KEY).unwrap_err().to_string(),
            "LOOPBACK error 1: VRAM 0x1100: the peer's key (6 bytes, starting 004b58534702) is not \
             of staging version 2"
        );
    }
}
