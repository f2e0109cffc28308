//! Staging: VRAM over transports that cannot touch GPU memory (UCX and
//! libfabric built without CUDA support), through pinned host buffers.
//!
//! [`Staged`] wraps any [`Transport`] and adds [`MemKind::Vram`] to what it
//! can register. DRAM-only transfers pass straight through. A transfer
//! whose **local** side is VRAM is cut into chunks that move through a pool
//! of pinned bounce buffers per GPU, registered once with the inner
//! transport:
//!
//! * **WRITE from local VRAM**: `cuMemcpyDtoHAsync` of a chunk into a bounce
//!   buffer, then, once its CUDA event completed, an RMA WRITE from the
//!   bounce buffer to the remote address;
//! * **READ into local VRAM**: an RMA READ into a bounce buffer, then
//!   `cuMemcpyHtoDAsync` into VRAM.
//!
//! Up to [`StagingConfig::chunks`] chunks per GPU are in flight at once, so
//! the next chunk is copied while the previous one is on the wire. The
//! transfer completes once every chunk's data is at its destination; a
//! notification attached to it is sent after that, so it still reaches the
//! target after the data.
//!
//! **Remote VRAM is not supported**: a peer's VRAM region (one it registered
//! through its own `Staged` transport) can be loaded from its metadata, but
//! a transfer that names it fails at post with
//! [`Error::UnsupportedMemKind`] naming the inner backend, because the peer
//! would have to copy between its bounce buffers and its VRAM on request.
//! Use CUDA_IPC for VRAM→VRAM on one host.

use std::collections::VecDeque;
use std::sync::Arc;

use cudarc::driver::sys;
use kvxfer_core::mem::MemKinds;
use kvxfer_core::{
    Capabilities, Completion, Error, MemKind, PostStatus, Region, Segment, Token, Transport, XferOp,
};

use crate::driver::{self, check, Context, INVALID_VALUE};
use crate::memory::PinnedBuffer;

/// Low 32 bits of every token [`Staged`] gives its inner transport for a
/// chunk. The core's tokens carry a transfer slot index there (below
/// 2^16), so the two never collide.
const CHUNK_MARK: u64 = 0xffff_ffff;

/// Most segments a DRAM-only transfer may have to pass through without
/// allocating.
const DIRECT_INLINE: usize = 64;

/// Size and number of the bounce buffers of each GPU.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct StagingConfig {
    /// Bytes per chunk (bounce buffer).
    pub chunk: usize,
    /// Bounce buffers per GPU: chunks in flight at once.
    pub chunks: usize,
}

impl Default for StagingConfig {
    /// 4 chunks of 4 MiB per GPU.
    fn default() -> Self {
        StagingConfig {
            chunk: 4 << 20,
            chunks: 4,
        }
    }
}

/// A registration of [`Staged`]: host memory registered with the inner
/// transport, or a VRAM region staged through bounce buffers.
#[derive(Debug)]
pub enum StagedReg<L> {
    /// Host memory, registered with the inner transport.
    Host(Arc<L>),
    /// VRAM of GPU `dev`; not registered with the inner transport.
    Vram(Region),
}

/// A segment as the core hands it to [`Staged`].
type StagedSegment<'a, T> =
    Segment<'a, StagedReg<<T as Transport>::LocalReg>, StagedKey<<T as Transport>::RemoteKey>>;

/// A peer's key as seen through [`Staged`].
#[derive(Debug)]
pub enum StagedKey<K> {
    /// A host region of the peer: the inner transport's key.
    Host(Arc<K>),
    /// A VRAM region of the peer: loaded, but not a valid transfer target.
    Vram(Region),
}

/// Per-GPU staging state: context, stream, events and the bounce pool.
struct Pool<L> {
    ctx: Arc<Context>,
    stream: sys::CUstream,
    free_events: Vec<sys::CUevent>,
    /// The pinned bounce buffers, `chunk` bytes each, back to back.
    buf: PinnedBuffer,
    /// Its registration with the inner transport; taken back in
    /// [`Staged`]'s `Drop` before the buffer is freed.
    reg: Option<L>,
    free_slots: Vec<usize>,
    chunk: usize,
}

impl<L> Pool<L> {
    fn slot_addr(&self, slot: usize) -> u64 {
        self.buf.addr() + (slot * self.chunk) as u64
    }

    fn event(&mut self) -> Result<sys::CUevent, Error> {
        if let Some(e) = self.free_events.pop() {
            return Ok(e);
        }
        self.ctx.bind()?;
        let mut ev = std::ptr::null_mut();
        // SAFETY: the context is current; `ev` is a valid out-parameter.
        check(
            unsafe {
                sys::cuEventCreate(&mut ev, sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32)
            },
            "cuEventCreate",
        )?;
        Ok(ev)
    }

    /// Enqueues a copy of `len` bytes between VRAM `dev_addr` and bounce
    /// slot `slot` (to the host when `to_host`), and records an event after it.
    fn copy(
        &mut self,
        to_host: bool,
        dev_addr: u64,
        slot: usize,
        len: usize,
    ) -> Result<sys::CUevent, Error> {
        let host = self.slot_addr(slot);
        let ev = self.event()?;
        self.ctx.bind()?;
        let res = if to_host {
            // SAFETY: the slot holds `chunk >= len` bytes of the live pinned
            // buffer; `dev_addr..+len` lies in a registered VRAM region that
            // the core keeps until the transfer completes.
            unsafe { sys::cuMemcpyDtoHAsync_v2(host as *mut _, dev_addr, len, self.stream) }
        } else {
            // SAFETY: as above, in the other direction.
            unsafe { sys::cuMemcpyHtoDAsync_v2(dev_addr, host as *const _, len, self.stream) }
        };
        let what = if to_host {
            "cuMemcpyDtoHAsync"
        } else {
            "cuMemcpyHtoDAsync"
        };
        let recorded = check(
            res,
            &format!("{what}({len} bytes, VRAM {dev_addr:#x}, bounce {host:#x})"),
        )
        .and_then(|()| {
            // SAFETY: `ev` and the stream are live in the bound context.
            check(
                unsafe { sys::cuEventRecord(ev, self.stream) },
                "cuEventRecord",
            )
        });
        match recorded {
            Ok(()) => Ok(ev),
            Err(e) => {
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

impl<L> Drop for Pool<L> {
    fn drop(&mut self) {
        let res = self.ctx.bind().and_then(|()| {
            // SAFETY: the stream is live in this context.
            check(
                unsafe { sys::cuStreamSynchronize(self.stream) },
                "cuStreamSynchronize",
            )
        });
        if let Err(e) = res {
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

/// One segment of a staged transfer.
struct Work<L, K> {
    local: LocalSide<L>,
    local_addr: u64,
    remote_addr: u64,
    len: u64,
    remote: Arc<K>,
    remote_region_addr: u64,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Stage {
    /// A CUDA copy runs; `then_wire` for WRITE (D2H first), else READ's last step.
    Copy { ev: sys::CUevent, then_wire: bool },
    /// The inner transport moves it; `then_copy` for READ into VRAM.
    Wire { then_copy: bool },
}

/// One piece in flight: a bounce slot (VRAM segments) or a whole host segment.
struct Chunk {
    token: u64,
    /// `(device, slot)` for VRAM pieces.
    slot: Option<(u32, usize)>,
    seg: usize,
    off: u64,
    len: u64,
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

/// A transport with VRAM staged through pinned host memory; see the
/// [module docs](self).
pub struct Staged<T: Transport> {
    cfg: StagingConfig,
    /// Per GPU ordinal, created on the first VRAM registration there.
    pools: Vec<Option<Pool<T::LocalReg>>>,
    ops: Vec<Op<T>>,
    done: VecDeque<Completion>,
    next_chunk: u32,
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
            },
            pools: Vec::new(),
            ops: Vec::new(),
            done: VecDeque::new(),
            next_chunk: 0,
            inner,
        }
    }

    /// The wrapped transport.
    pub fn inner(&self) -> &T {
        &self.inner
    }

    /// The wrapped transport, mutably.
    pub fn inner_mut(&mut self) -> &mut T {
        &mut self.inner
    }

    /// Staged transfers posted and not yet reported.
    pub fn staged_in_flight(&self) -> usize {
        self.ops.len()
    }

    fn bad(&self, text: &str) -> Error {
        Error::backend(self.inner.name(), INVALID_VALUE, text)
    }

    /// Makes sure GPU `dev` has a bounce pool.
    fn pool(&mut self, dev: u32) -> Result<(), Error> {
        let i = dev as usize;
        if self.pools.len() <= i {
            self.pools.resize_with(i + 1, || None);
        }
        if self.pools[i].is_some() {
            return Ok(());
        }
        let ctx = Context::new(dev)?;
        let len = self.cfg.chunk.saturating_mul(self.cfg.chunks);
        let buf = PinnedBuffer::new(dev, len)?;
        ctx.bind()?;
        let mut stream = std::ptr::null_mut();
        // SAFETY: the context is current; `stream` is a valid out-parameter.
        check(
            unsafe {
                sys::cuStreamCreate(
                    &mut stream,
                    sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32,
                )
            },
            "cuStreamCreate",
        )?;
        let mut pool = Pool {
            ctx,
            stream,
            free_events: Vec::new(),
            buf,
            reg: None,
            free_slots: (0..self.cfg.chunks).rev().collect(),
            chunk: self.cfg.chunk,
        };
        pool.reg = Some(self.inner.register(&pool.buf.region())?);
        log::debug!(
            "{}: staging pool on device {dev}: {} x {} bytes at {:#x}",
            self.inner.name(),
            self.cfg.chunks,
            self.cfg.chunk,
            pool.buf.addr()
        );
        self.pools[i] = Some(pool);
        Ok(())
    }

    fn pool_mut(
        pools: &mut [Option<Pool<T::LocalReg>>],
        dev: u32,
    ) -> Option<&mut Pool<T::LocalReg>> {
        pools.get_mut(dev as usize).and_then(Option::as_mut)
    }

    /// Posts chunk `c` of op `oi` to the inner transport. `Ok(true)` when it
    /// completed inline.
    fn post_wire(&mut self, oi: usize, c: usize) -> Result<bool, Error> {
        let op = &self.ops[oi];
        let ch = &op.chunks[c];
        let w = &op.segs[ch.seg];
        let (local_addr, local): (u64, &T::LocalReg) = match (&w.local, ch.slot) {
            (LocalSide::Host(reg), _) => (w.local_addr + ch.off, reg),
            (LocalSide::Vram(_), Some((dev, slot))) => {
                let pool = self.pools[dev as usize]
                    .as_ref()
                    .expect("a slot is only taken from an existing pool");
                let reg = pool.reg.as_ref().expect("pool registered at creation");
                (pool.slot_addr(slot), reg)
            }
            (LocalSide::Vram(_), None) => unreachable!("VRAM chunks always hold a slot"),
        };
        let seg = Segment {
            local_addr,
            remote_addr: w.remote_addr + ch.off,
            len: ch.len,
            local,
            remote: &*w.remote,
            remote_region_addr: w.remote_region_addr,
        };
        let st = self
            .inner
            .post(op.op, &op.peer, &[seg], None, Token(ch.token))?;
        Ok(st == PostStatus::Done)
    }

    /// Chunk `c` of op `oi` left the wire (successfully).
    fn wire_done(&mut self, oi: usize, c: usize) {
        let ch = &self.ops[oi].chunks[c];
        let then_copy = matches!(ch.stage, Stage::Wire { then_copy: true });
        if !then_copy {
            self.retire(oi, c);
            return;
        }
        let (dev, slot) = ch.slot.expect("READ into VRAM holds a slot");
        let w = &self.ops[oi].segs[ch.seg];
        let dev_addr = w.local_addr + ch.off;
        let len = ch.len as usize;
        let res = match Self::pool_mut(&mut self.pools, dev) {
            Some(p) => p.copy(false, dev_addr, slot, len),
            None => Err(driver::no_driver()),
        };
        match res {
            Ok(ev) => {
                self.ops[oi].chunks[c].stage = Stage::Copy {
                    ev,
                    then_wire: false,
                }
            }
            Err(e) => {
                self.ops[oi].fail(e);
                self.retire(oi, c);
            }
        }
    }

    /// Removes chunk `c` of op `oi` and frees its slot.
    fn retire(&mut self, oi: usize, c: usize) {
        let ch = self.ops[oi].chunks.swap_remove(c);
        if let Some((dev, slot)) = ch.slot {
            if let Some(p) = Self::pool_mut(&mut self.pools, dev) {
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

    /// Starts as many new pieces of op `oi` as bounce slots allow.
    fn start_chunks(&mut self, oi: usize) {
        loop {
            let op = &self.ops[oi];
            if op.error.is_some() || op.next_seg >= op.segs.len() {
                return;
            }
            let (seg, off) = (op.next_seg, op.next_off);
            let w = &op.segs[seg];
            let (len, slot) = match w.local {
                LocalSide::Host(_) => (w.len - off, None),
                LocalSide::Vram(dev) => {
                    let Some(p) = Self::pool_mut(&mut self.pools, dev) else {
                        self.ops[oi].fail(driver::no_driver());
                        return;
                    };
                    let Some(slot) = p.free_slots.pop() else {
                        return;
                    };
                    ((w.len - off).min(p.chunk as u64), Some((dev, slot)))
                }
            };
            let op_kind = op.op;
            let dev_addr = w.local_addr + off;
            let token = self.chunk_token();
            let op = &mut self.ops[oi];
            if off + len >= op.segs[seg].len {
                op.next_seg += 1;
                op.next_off = 0;
            } else {
                op.next_off = off + len;
            }
            let mut chunk = Chunk {
                token,
                slot,
                seg,
                off,
                len,
                stage: Stage::Wire { then_copy: false },
            };
            match (slot, op_kind) {
                (Some((dev, s)), XferOp::Write) => {
                    let pool = Self::pool_mut(&mut self.pools, dev).expect("checked above");
                    match pool.copy(true, dev_addr, s, len as usize) {
                        Ok(ev) => {
                            chunk.stage = Stage::Copy {
                                ev,
                                then_wire: true,
                            };
                            self.ops[oi].chunks.push(chunk);
                        }
                        Err(e) => {
                            pool.free_slots.push(s);
                            self.ops[oi].fail(e);
                        }
                    }
                }
                (slot, kind) => {
                    chunk.stage = Stage::Wire {
                        then_copy: slot.is_some() && kind == XferOp::Read,
                    };
                    self.ops[oi].chunks.push(chunk);
                    let c = self.ops[oi].chunks.len() - 1;
                    match self.post_wire(oi, c) {
                        Ok(true) => self.wire_done(oi, c),
                        Ok(false) => {}
                        Err(e) => {
                            self.ops[oi].fail(e);
                            self.retire(oi, c);
                        }
                    }
                }
            }
        }
    }

    /// Moves every staged transfer forward; finished ones go to `done`.
    fn drive(&mut self) {
        // 1. Completions of the inner transport.
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
        // 2. CUDA copies, then new chunks, then finished transfers.
        let mut oi = 0;
        while oi < self.ops.len() {
            let mut ci = 0;
            while ci < self.ops[oi].chunks.len() {
                let ch = &self.ops[oi].chunks[ci];
                let Stage::Copy { ev, then_wire } = ch.stage else {
                    ci += 1;
                    continue;
                };
                let (dev, _) = ch.slot.expect("copies use a slot");
                let q = match Self::pool_mut(&mut self.pools, dev) {
                    Some(p) => p.query(ev),
                    None => Err(driver::no_driver()),
                };
                match q {
                    Ok(false) => ci += 1,
                    Ok(true) if then_wire => {
                        self.ops[oi].chunks[ci].stage = Stage::Wire { then_copy: false };
                        match self.post_wire(oi, ci) {
                            Ok(true) => self.retire(oi, ci),
                            Ok(false) => ci += 1,
                            Err(e) => {
                                self.ops[oi].fail(e);
                                self.retire(oi, ci);
                            }
                        }
                    }
                    Ok(true) => self.retire(oi, ci),
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
                self.done.push_back(Completion {
                    token: op.token,
                    result,
                });
            } else {
                oi += 1;
            }
        }
    }

    /// Posts a transfer with no VRAM on either side straight to the inner
    /// transport; up to [`DIRECT_INLINE`] segments without allocating.
    fn post_direct(
        &mut self,
        op: XferOp,
        peer: &Arc<T::Peer>,
        segments: &[StagedSegment<'_, T>],
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
                let seg = unwrap(s).ok_or_else(bad)?;
                if v.push(seg).is_err() {
                    break;
                }
            }
            self.inner.post(op, peer, &v, notification, token)
        } else {
            let v: Vec<_> = segments
                .iter()
                .map(|s| unwrap(s).ok_or_else(bad))
                .collect::<Result<_, _>>()?;
            self.inner.post(op, peer, &v, notification, token)
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
        // Copies finish (Pool's Drop synchronises too, but the bounce
        // registrations go first), then registrations, then pools, then
        // the inner transport (field order).
        for p in self.pools.iter_mut().flatten() {
            if let Some(reg) = p.reg.take() {
                self.inner.deregister(reg);
            }
        }
        self.ops.clear();
        self.pools.clear();
    }
}

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
        self.pool(region.dev)?;
        Ok(StagedReg::Vram(*region))
    }

    fn deregister(&mut self, reg: Self::LocalReg) {
        if let StagedReg::Host(r) = reg {
            if let Some(r) = unwrap_arc(r, "registration") {
                self.inner.deregister(r);
            }
        }
    }

    fn pack_key(&self, reg: &Self::LocalReg, out: &mut [u8]) -> Result<usize, Error> {
        match reg {
            StagedReg::Host(r) => self.inner.pack_key(r, out),
            StagedReg::Vram(_) => Ok(0),
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
            MemKind::Vram => Ok(StagedKey::Vram(*region)),
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
        segments: &[Segment<'_, Self::LocalReg, Self::RemoteKey>],
        notification: Option<&[u8]>,
        token: Token,
    ) -> Result<PostStatus, Error> {
        let mut staged = false;
        for s in segments {
            match s.remote {
                StagedKey::Vram(_) => {
                    return Err(Error::UnsupportedMemKind {
                        backend: self.inner.name(),
                        kind: MemKind::Vram,
                    })
                }
                StagedKey::Host(_) => {}
            }
            staged |= matches!(s.local, StagedReg::Vram(_));
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
        let mut segs = Vec::with_capacity(segments.len());
        for s in segments {
            let StagedKey::Host(r) = s.remote else {
                unreachable!("checked above")
            };
            let local = match s.local {
                StagedReg::Host(l) => LocalSide::Host(Arc::clone(l)),
                StagedReg::Vram(region) => LocalSide::Vram(region.dev),
            };
            segs.push(Work {
                local,
                local_addr: s.local_addr,
                remote_addr: s.remote_addr,
                len: s.len,
                remote: Arc::clone(r),
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
        });
        let oi = self.ops.len() - 1;
        self.start_chunks(oi);
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
        if self.ops.iter().any(|o| o.token == token) {
            return Err(Error::Unsupported {
                backend: self.inner.name(),
                what: "cancel of a staged VRAM transfer",
            });
        }
        self.inner.cancel(token)
    }

    fn send_notification(&mut self, peer: &Self::Peer, msg: &[u8]) -> Result<(), Error> {
        self.inner.send_notification(peer, msg)
    }

    fn poll_notification(&mut self, buf: &mut [u8]) -> Option<Result<usize, Error>> {
        self.inner.poll_notification(buf)
    }
}
