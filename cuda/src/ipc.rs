//! The CUDA-IPC transport: VRAM and DRAM between processes on one host.
//!
//! * **Register** accepts VRAM and DRAM.
//!   - VRAM: checks that the region is VRAM of the named GPU (pointer
//!     attributes), finds the allocation holding it (`cuMemGetAddressRange`)
//!     and takes the allocation's IPC handle (`cuIpcGetMemHandle`). The
//!     packed key is an [`IpcKey::Vram`]: the handle plus the region's offset
//!     in the allocation, the allocation size and the GPU UUID (ordinals
//!     differ between processes; UUIDs do not).
//!   - DRAM: checks that CUDA does not report the region as VRAM and
//!     page-locks it with `cuMemHostRegister` (portable), so copies to and
//!     from VRAM are true asynchronous DMA; where that fails (e.g. a page
//!     already registered through another region) the region stays pageable
//!     and copies from it are staged by the driver. Deregistering unlocks
//!     only what was locked here. The packed key is an [`IpcKey::Dram`]:
//!     address and length in the owner's address space.
//! * **Address** is an [`IpcAddress`]: host id, pid and instance. A peer on
//!   another host is refused at [`connect`](Transport::connect).
//! * **Direct peer access** (NVLink or PCIe peer-to-peer) between two GPUs
//!   is enabled when a key on another GPU than a local registration is
//!   unpacked, so the first transfer does not pay for it; without it the
//!   driver moves cross-GPU copies through the host (about a tenth of the
//!   bandwidth on NVLink-connected H100s). [`PEER_ACCESS_ENV`]`=0` turns it
//!   off.
//! * **Unpack** of a VRAM key opens each peer allocation once per process
//!   (`cuIpcOpenMemHandle`), reference-counted across keys and transports,
//!   and closes it (`cuIpcCloseMemHandle`) when the last key is released or
//!   the transport is dropped. A peer in the same process needs no handle.
//!   A DRAM key needs nothing opened: the region must lie inside the range
//!   the key names.
//! * **Post** moves each segment by the kinds of its two sides:
//!   - VRAM ↔ peer VRAM: one asynchronous copy on the stream of the local
//!     GPU — `cuMemcpyDtoDAsync` when both sides are on one GPU,
//!     `cuMemcpyPeerAsync` with both contexts otherwise;
//!   - DRAM ↔ peer VRAM: `cuMemcpyHtoDAsync` / `cuMemcpyDtoHAsync` on the
//!     stream of the peer's GPU;
//!   - DRAM ↔ peer DRAM: cross-memory attach (`process_vm_writev` /
//!     `process_vm_readv`) into the peer's address space;
//!   - VRAM ↔ peer DRAM: through a pinned bounce buffer
//!     ([`BOUNCE_SLOTS`] × [`BOUNCE_CHUNK`]), pipelined: device-to-host
//!     copy then `process_vm_writev` (WRITE), or `process_vm_readv` then
//!     host-to-device copy (READ).
//!
//!   The cross-memory-attach work does not run in `post`: it is cut into
//!   parts of at most [`CMA_PART`] bytes (small segments share one part)
//!   that [`CMA_WORKERS`] threads owned by the transport move in parallel;
//!   each worker has, per GPU it touches, its own stream, events and
//!   bounce buffer, with that GPU's context bound. `post` only queues the
//!   parts and returns. A transfer whose peer-DRAM bytes total at most
//!   [`CMA_INLINE_MAX`], all from local DRAM, is moved inside `post`
//!   instead (a hand-off to a worker would cost more than the copy). A
//!   peer process already gone fails the `post` at once.
//!
//!   A short count from `process_vm_*` is continued from where it stopped;
//!   an error names the call, the pid and the address. The first error of
//!   a transfer's parts is its result; parts not started yet are skipped
//!   after it. Asynchronous copies record an event on every stream they
//!   used; **poll** reports the transfer only when all its events are
//!   complete (`cuEventQuery`) and all its parts have finished, so no byte
//!   of its memory is touched after it is reported, whether done or failed.
//! * **Notifications** travel over a [`NotifyChannel`]. The one attached to
//!   a transfer is sent only after the transfer's copies completed, and the
//!   transfer completes only once it is sent, so the target always sees the
//!   data before the message.
//! * **Cancel** is unsupported. **Drop** stops the workers once their
//!   current part is finished (queued parts are dropped) and joins them
//!   before anything else is released.
//!
//! Cross-memory attach needs the kernel's ptrace permission over the peer
//! (same user and a dumpable process, or `CAP_SYS_PTRACE`; with Yama
//! `ptrace_scope` 1 only over descendants or processes that allowed it with
//! `prctl(PR_SET_PTRACER)`), and a seccomp profile that lets the calls
//! through. Where it is refused the transfer fails with `EPERM` naming the
//! pid.

use std::collections::{HashMap, VecDeque};
use std::os::unix::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use cudarc::driver::sys;
use kvxfer_core::mem::MemKinds;
use kvxfer_core::{
    Capabilities, Completion, Error, MemKind, PostStatus, Region, Segment, Segments, Token,
    Transport, XferOp,
};

use crate::driver::{self, check, Context, BACKEND, INVALID_VALUE};
use crate::memory::PinnedBuffer;
use crate::notify::{channel_addr, NotifyChannel};
use crate::wire::{host_id, DramKey, IpcAddress, IpcKey, VramKey};

/// Longest notification, in bytes.
pub const MAX_NOTIFICATION: usize = 4096;

/// Bytes of one chunk of the pinned bounce buffer that moves VRAM to and
/// from a peer's DRAM.
pub const BOUNCE_CHUNK: usize = 4 << 20;

/// Chunks of the bounce buffer of each worker and GPU: one is copied over
/// cross-memory attach while the GPU fills or drains the other.
pub const BOUNCE_SLOTS: usize = 2;

/// Threads of a transport that move data to and from peers' DRAM, started
/// at the first such transfer.
pub const CMA_WORKERS: usize = 4;

/// Most bytes of one part of a peer-DRAM transfer, the unit handed to a
/// worker: longer segments are split, shorter ones share a part.
pub const CMA_PART: u64 = 8 << 20;

/// Largest peer-DRAM transfer, in bytes, all from local DRAM, that `post`
/// moves itself instead of handing it to the workers.
pub const CMA_INLINE_MAX: u64 = 64 << 10;

/// Most bytes moved by one `process_vm_*` call (the kernel moves at most
/// about 2 GiB per call anyway; longer ranges take several calls).
const CMA_MAX_CALL: u64 = 1 << 30;

static NEXT_INSTANCE: AtomicU32 = AtomicU32::new(0);

/// Peer allocations opened in this process, keyed by (peer pid, handle).
type OpenKey = (u32, [u8; 64]);

struct Opened {
    ptr: u64,
    ctx: Arc<Context>,
    refs: u32,
}

// SAFETY: `Opened` holds a device address and an `Arc<Context>` (Send + Sync).
unsafe impl Send for Opened {}

fn opened_table() -> &'static Mutex<HashMap<OpenKey, Opened>> {
    static TABLE: std::sync::OnceLock<Mutex<HashMap<OpenKey, Opened>>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Drops one reference to an opened allocation; closes it at zero.
fn unref_opened(key: &OpenKey, count: u32) {
    let mut table = opened_table().lock().unwrap_or_else(|p| p.into_inner());
    let Some(entry) = table.get_mut(key) else {
        return;
    };
    entry.refs = entry.refs.saturating_sub(count);
    if entry.refs == 0 {
        if let Some(o) = table.remove(key) {
            let res = o.ctx.bind().and_then(|()| {
                // SAFETY: `o.ptr` was returned by cuIpcOpenMemHandle in this
                // context and no key refers to it any more.
                check(
                    unsafe { sys::cuIpcCloseMemHandle(o.ptr) },
                    "cuIpcCloseMemHandle",
                )
            });
            if let Err(e) = res {
                log::warn!("closing IPC mapping at {:#x} of pid {}: {e}", o.ptr, key.0);
            }
        }
    }
}

/// Per-GPU state: the retained context, one non-blocking stream and a pool
/// of events. Destroyed in `Drop` after the stream drained.
struct DeviceState {
    uuid: [u8; 16],
    stream: sys::CUstream,
    free_events: Vec<sys::CUevent>,
    ctx: Arc<Context>,
}

impl DeviceState {
    fn new(ordinal: u32) -> Result<DeviceState, Error> {
        let ctx = Context::new(ordinal)?;
        let stream = driver::create_stream(&ctx)?;
        let mut state = DeviceState {
            uuid: [0; 16],
            stream,
            free_events: Vec::new(),
            ctx,
        };
        state.uuid = driver::device_uuid(ordinal)?;
        Ok(state)
    }

    fn event(&mut self) -> Result<sys::CUevent, Error> {
        match self.free_events.pop() {
            Some(e) => Ok(e),
            None => driver::create_event(&self.ctx),
        }
    }

    fn synchronize(&self) -> Result<(), Error> {
        // SAFETY: the stream was made in `self.ctx` and is destroyed only
        // in `Drop`, after this.
        unsafe { driver::synchronize_stream(&self.ctx, self.stream) }
    }
}

impl Drop for DeviceState {
    fn drop(&mut self) {
        if let Err(e) = self.synchronize() {
            log::warn!("draining stream of device {}: {e}", self.ctx.ordinal());
        }
        for ev in self.free_events.drain(..) {
            // SAFETY: pooled events are not recorded on any pending work.
            unsafe { sys::cuEventDestroy_v2(ev) };
        }
        // SAFETY: the stream has drained and is destroyed once; the context
        // (`self.ctx`) is released after this, when the field drops.
        unsafe { sys::cuStreamDestroy_v2(self.stream) };
    }
}

/// Progress of the parts of one transfer handed to the workers.
#[derive(Debug, Default)]
struct CmaParts {
    /// Parts not finished (or skipped) yet.
    left: AtomicUsize,
    /// Set at the first error: parts not started yet are skipped.
    failed: AtomicBool,
    /// The first error.
    error: Mutex<Option<Error>>,
}

impl CmaParts {
    fn new(parts: usize) -> CmaParts {
        CmaParts {
            left: AtomicUsize::new(parts),
            ..CmaParts::default()
        }
    }

    /// Whether every part has finished: nothing touches the transfer's
    /// memory any more.
    fn done(&self) -> bool {
        self.left.load(Ordering::Acquire) == 0
    }

    /// Records `e` unless an earlier error was recorded.
    fn fail(&self, e: Error) {
        let mut first = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if first.is_none() {
            *first = Some(e);
        }
        self.failed.store(true, Ordering::Release);
    }

    /// The first error, once [`done`](Self::done).
    fn take_error(&self) -> Option<Error> {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// One contiguous range between local memory and a peer's DRAM.
#[derive(Debug)]
struct Piece {
    /// The peer's process id.
    pid: u32,
    local: u64,
    remote: u64,
    len: u64,
    /// The context of the local GPU when the local side is VRAM (moved
    /// through a bounce buffer); `None` for local DRAM.
    vram: Option<Arc<Context>>,
}

/// The unit of work of a worker: pieces of one transfer, at most
/// [`CMA_PART`] bytes in all.
#[derive(Debug)]
struct Part {
    op: XferOp,
    pieces: Vec<Piece>,
    parts: Arc<CmaParts>,
}

impl Part {
    /// Moves the pieces in order, stopping at the first error, unless the
    /// transfer already failed; then counts the part as finished.
    fn run(self, gpus: &mut Vec<WorkerGpu>) {
        if !self.parts.failed.load(Ordering::Acquire) {
            for p in &self.pieces {
                let res = match &p.vram {
                    None => cma_copy(self.op, p.pid, p.local, p.remote, p.len),
                    Some(ctx) => WorkerGpu::get(gpus, ctx)
                        .and_then(|g| g.bounce(self.op, p.local, p.pid, p.remote, p.len)),
                };
                if let Err(e) = res {
                    self.parts.fail(e);
                    break;
                }
            }
        }
        self.parts.left.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Appends `len` bytes between `local` and `remote` to `out` as pieces of
/// at most [`CMA_PART`] bytes, so that several workers share a long range.
fn split_into(
    out: &mut Vec<Piece>,
    pid: u32,
    local: u64,
    remote: u64,
    len: u64,
    vram: Option<Arc<Context>>,
) {
    let mut at = 0;
    while at < len {
        let n = (len - at).min(CMA_PART);
        out.push(Piece {
            pid,
            local: local + at,
            remote: remote + at,
            len: n,
            vram: vram.clone(),
        });
        at += n;
    }
}

/// Groups `pieces` in order into parts of at most [`CMA_PART`] bytes (a
/// piece is never split here), all counted by the returned [`CmaParts`].
fn into_parts(op: XferOp, pieces: Vec<Piece>) -> (Arc<CmaParts>, Vec<Part>) {
    let mut groups: Vec<Vec<Piece>> = Vec::new();
    let mut bytes = 0;
    for p in pieces {
        match groups.last_mut() {
            Some(g) if bytes + p.len <= CMA_PART => {
                bytes += p.len;
                g.push(p);
            }
            _ => {
                bytes = p.len;
                groups.push(vec![p]);
            }
        }
    }
    let parts = Arc::new(CmaParts::new(groups.len()));
    let work = groups
        .into_iter()
        .map(|pieces| Part {
            op,
            pieces,
            parts: parts.clone(),
        })
        .collect();
    (parts, work)
}

/// What a worker holds for one GPU: a stream, one event per bounce slot
/// and a pinned bounce buffer of [`BOUNCE_SLOTS`] × [`BOUNCE_CHUNK`]
/// bytes. Used only on the worker's thread; released in `Drop` after the
/// stream drained.
struct WorkerGpu {
    ctx: Arc<Context>,
    stream: sys::CUstream,
    events: [sys::CUevent; BOUNCE_SLOTS],
    /// Dropped after `Drop::drop` destroyed the stream and events.
    bounce: PinnedBuffer,
}

impl WorkerGpu {
    fn new(ctx: &Arc<Context>) -> Result<WorkerGpu, Error> {
        let bounce = PinnedBuffer::new(ctx.ordinal(), BOUNCE_SLOTS * BOUNCE_CHUNK)?;
        let stream = driver::create_stream(ctx)?;
        let mut g = WorkerGpu {
            ctx: ctx.clone(),
            stream,
            events: [std::ptr::null_mut(); BOUNCE_SLOTS],
            bounce,
        };
        // On an error `g` drops, destroying the stream and the events made.
        for i in 0..BOUNCE_SLOTS {
            g.events[i] = driver::create_event(ctx)?;
        }
        Ok(g)
    }

    /// This worker's state for the GPU of `ctx`, made on first use.
    fn get<'a>(
        gpus: &'a mut Vec<WorkerGpu>,
        ctx: &Arc<Context>,
    ) -> Result<&'a mut WorkerGpu, Error> {
        let at = match gpus.iter().position(|g| g.ctx.ordinal() == ctx.ordinal()) {
            Some(at) => at,
            None => {
                gpus.push(WorkerGpu::new(ctx)?);
                gpus.len() - 1
            }
        };
        Ok(&mut gpus[at])
    }

    /// Moves `len` bytes between VRAM at `vram` and `remote` in process
    /// `pid` through the bounce buffer; returns once every byte arrived.
    /// On error the stream is drained first, so no copy into or out of the
    /// bounce buffer or the VRAM outlives the call.
    fn bounce(
        &mut self,
        op: XferOp,
        vram: u64,
        pid: u32,
        remote: u64,
        len: u64,
    ) -> Result<(), Error> {
        self.ctx.bind()?;
        let bounce = self.bounce.addr();
        let res = match op {
            XferOp::Write => {
                bounce_write(self.stream, &self.events, bounce, vram, pid, remote, len)
            }
            XferOp::Read => bounce_read(self.stream, &self.events, bounce, vram, pid, remote, len),
        };
        if res.is_err() {
            if let Err(e) = self.synchronize() {
                log::warn!(
                    "draining device {} after a failed bounce copy: {e}",
                    self.ctx.ordinal()
                );
            }
        }
        res
    }

    fn synchronize(&self) -> Result<(), Error> {
        // SAFETY: the stream was made in `self.ctx` and is destroyed only
        // in `Drop`, after this.
        unsafe { driver::synchronize_stream(&self.ctx, self.stream) }
    }
}

impl Drop for WorkerGpu {
    fn drop(&mut self) {
        if let Err(e) = self.synchronize() {
            log::warn!(
                "draining a CMA worker's stream of device {}: {e}",
                self.ctx.ordinal()
            );
        }
        for ev in self.events {
            if !ev.is_null() {
                // SAFETY: the stream drained, so no pending work records
                // the event; each is destroyed once.
                unsafe { sys::cuEventDestroy_v2(ev) };
            }
        }
        // SAFETY: the stream drained and is destroyed once; the bounce
        // buffer and the context are released after this, with the fields.
        unsafe { sys::cuStreamDestroy_v2(self.stream) };
    }
}

/// The queue the workers take parts from.
#[derive(Default)]
struct PoolQueue {
    parts: VecDeque<Part>,
    /// Set by `Drop`: workers finish their current part and exit.
    stop: bool,
}

#[derive(Default)]
struct PoolShared {
    queue: Mutex<PoolQueue>,
    ready: Condvar,
}

/// [`CMA_WORKERS`] threads moving parts of peer-DRAM transfers; joined in
/// `Drop` once their current part is finished.
struct CmaPool {
    shared: Arc<PoolShared>,
    threads: Vec<JoinHandle<()>>,
}

impl CmaPool {
    fn new() -> Result<CmaPool, Error> {
        let mut pool = CmaPool {
            shared: Arc::new(PoolShared::default()),
            threads: Vec::with_capacity(CMA_WORKERS),
        };
        for i in 0..CMA_WORKERS {
            let shared = pool.shared.clone();
            let t = std::thread::Builder::new()
                .name(format!("kvxfer-cma-{i}"))
                .spawn(move || worker(&shared))
                .map_err(|e| {
                    Error::backend(
                        BACKEND,
                        e.raw_os_error().unwrap_or(0) as i64,
                        &format!("starting a cross-memory-attach worker: {e}"),
                    )
                })?; // on error `pool` drops and joins the ones started
            pool.threads.push(t);
        }
        Ok(pool)
    }

    fn submit(&self, parts: Vec<Part>) {
        let mut q = self.shared.queue.lock().unwrap_or_else(|p| p.into_inner());
        let n = parts.len();
        q.parts.extend(parts);
        drop(q);
        if n == 1 {
            self.shared.ready.notify_one();
        } else {
            self.shared.ready.notify_all();
        }
    }
}

impl Drop for CmaPool {
    fn drop(&mut self) {
        {
            let mut q = self.shared.queue.lock().unwrap_or_else(|p| p.into_inner());
            q.stop = true;
            // Their transfers are never reported: the transport is going.
            q.parts.clear();
        }
        self.shared.ready.notify_all();
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                log::warn!("a cross-memory-attach worker panicked");
            }
        }
    }
}

/// A worker: takes parts until told to stop, then releases its streams,
/// events and bounce buffers.
fn worker(shared: &PoolShared) {
    let mut gpus: Vec<WorkerGpu> = Vec::new();
    loop {
        let part = {
            let mut q = shared.queue.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if q.stop {
                    return;
                }
                if let Some(p) = q.parts.pop_front() {
                    break p;
                }
                q = shared.ready.wait(q).unwrap_or_else(|p| p.into_inner());
            }
        };
        part.run(&mut gpus);
    }
}

/// A registered VRAM or DRAM region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpcReg {
    region: Region,
    key: IpcKey,
    /// Whether registration page-locked this DRAM region itself
    /// (`cuMemHostRegister`); deregistration then unlocks it.
    pinned: bool,
}

impl IpcReg {
    /// The registered region.
    pub fn region(&self) -> &Region {
        &self.region
    }

    /// The key a peer needs to reach it.
    pub fn key(&self) -> &IpcKey {
        &self.key
    }

    /// Whether this DRAM region was page-locked by its registration
    /// (`cuMemHostRegister`). `false` for VRAM, and for DRAM the driver
    /// would not lock (already registered, e.g. a page shared with another
    /// registered region): such memory is copied as pageable memory.
    pub fn pinned(&self) -> bool {
        self.pinned
    }
}

/// A connected peer: its address and notification socket.
#[derive(Clone, Debug)]
pub struct IpcPeer {
    addr: IpcAddress,
    sock: SocketAddr,
}

impl IpcPeer {
    /// The peer's address.
    pub fn address(&self) -> &IpcAddress {
        &self.addr
    }
}

/// A peer region, usable from this process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpcRemoteKey {
    kind: MemKind,
    /// VRAM: the region's first byte as a device pointer in this process.
    /// DRAM: its first byte in the peer's address space.
    ptr: u64,
    len: u64,
    /// Local ordinal of the GPU holding it (VRAM); 0 for DRAM.
    dev: u32,
    /// The peer's process id.
    pid: u32,
    open: Option<OpenKey>,
}

impl IpcRemoteKey {
    /// The kind of the peer's region.
    pub fn kind(&self) -> MemKind {
        self.kind
    }

    /// Local ordinal of the GPU that holds the peer's VRAM region (0 for DRAM).
    pub fn device(&self) -> u32 {
        self.dev
    }

    /// The region's first byte: for VRAM a device pointer valid in this
    /// process, for DRAM an address in the peer's address space.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// The process id of the peer that owns the region.
    pub fn pid(&self) -> u32 {
        self.pid
    }
}

struct Outgoing {
    to: SocketAddr,
    pid: u32,
    msg: Vec<u8>,
}

struct InFlight {
    token: Token,
    /// Events still to complete, with their device ordinal.
    events: Vec<(u32, sys::CUevent)>,
    /// Parts moved by the workers (or inside `post`), if any.
    cma: Option<Arc<CmaParts>>,
    /// Notification to send once the events completed.
    notify: Option<Outgoing>,
}

/// GPU-to-GPU transfers between processes on one host over CUDA IPC.
pub struct CudaIpcTransport {
    addr: IpcAddress,
    chan: NotifyChannel,
    devices: Vec<Option<DeviceState>>,
    /// References this transport holds in the process-wide table of opened
    /// peer allocations, released in `Drop`.
    my_opens: HashMap<OpenKey, u32>,
    inflight: Vec<InFlight>,
    outbox: VecDeque<Outgoing>,
    /// Queued standalone notifications that could not be sent, by peer
    /// pid, with the last reason; reported by the next send to that peer.
    undelivered: Vec<(u32, u64, String)>,
    /// Device pairs whose peer access was set up (their states, and so
    /// their contexts, live as long as the transport).
    peer_pairs: Vec<(u32, u32)>,
    /// Whether cross-GPU copies enable direct peer access first.
    peer_access: bool,
    /// DRAM regions this transport page-locked (address → length), unlocked
    /// at deregistration or in `Drop`.
    host_pinned: HashMap<u64, u64>,
    /// Workers moving data to and from peers' DRAM, started at the first
    /// such transfer; joined first in `Drop`.
    pool: Option<CmaPool>,
}

/// Environment variable that turns off direct peer access (NVLink/PCIe)
/// for cross-GPU CUDA_IPC copies when set to `0`. On by default: without
/// it the driver stages cross-GPU copies through the host (correct, about
/// a tenth of NVLink bandwidth on H100s).
pub const PEER_ACCESS_ENV: &str = "KVXFER_CUDA_PEER_ACCESS";

// SAFETY: the raw CUDA handles (streams, events) may be used from any thread
// once their context is bound, which every method does; the transport is
// used through `&mut self` from one thread at a time.
unsafe impl Send for CudaIpcTransport {}

impl std::fmt::Debug for CudaIpcTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaIpcTransport")
            .field("addr", &self.addr)
            .field("inflight", &self.inflight.len())
            .finish_non_exhaustive()
    }
}

impl CudaIpcTransport {
    /// Loads the driver and binds the notification socket. Fails with
    /// "no CUDA driver found" where there is no driver, or with CUDA's own
    /// error (e.g. `CUDA_ERROR_NO_DEVICE`) where there is no GPU.
    pub fn new() -> Result<CudaIpcTransport, Error> {
        driver::init()?;
        let count = driver::device_count()?;
        let addr = IpcAddress {
            host: host_id(),
            pid: std::process::id(),
            instance: NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed),
        };
        let chan = NotifyChannel::bind(&addr.socket_name(), MAX_NOTIFICATION)?;
        Ok(CudaIpcTransport {
            addr,
            chan,
            devices: (0..count).map(|_| None).collect(),
            my_opens: HashMap::new(),
            inflight: Vec::new(),
            outbox: VecDeque::new(),
            undelivered: Vec::new(),
            peer_pairs: Vec::new(),
            peer_access: !std::env::var(PEER_ACCESS_ENV).is_ok_and(|v| v.trim() == "0"),
            host_pinned: HashMap::new(),
            pool: None,
        })
    }

    /// This transport's address.
    pub fn address(&self) -> &IpcAddress {
        &self.addr
    }

    /// Transfers posted and not yet reported by `poll`.
    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    fn device(&mut self, ordinal: u32) -> Result<&mut DeviceState, Error> {
        let count = self.devices.len();
        let slot = self.devices.get_mut(ordinal as usize).ok_or_else(|| {
            Error::backend(
                BACKEND,
                INVALID_VALUE,
                &format!("device {ordinal} does not exist ({count} device(s) visible)"),
            )
        })?;
        if slot.is_none() {
            *slot = Some(DeviceState::new(ordinal)?);
        }
        Ok(slot.as_mut().expect("slot was filled above"))
    }

    /// Enables direct peer access between the GPUs of `a` and `b` once per
    /// pair (unless [`PEER_ACCESS_ENV`] is `0`); the device states keep both
    /// contexts, and so the access, alive as long as the transport.
    fn peer_pair(&mut self, a: &Context, b: &Context) -> Result<(), Error> {
        let (x, y) = (a.ordinal(), b.ordinal());
        let pair = (x.min(y), x.max(y));
        if x == y || !self.peer_access || self.peer_pairs.contains(&pair) {
            return Ok(());
        }
        let direct = driver::enable_peer_access(a, b)?;
        log::debug!("devices {x} and {y}: direct peer access {direct}");
        self.peer_pairs.push(pair);
        Ok(())
    }

    fn disconnected(pid: u32, e: &std::io::Error) -> Error {
        log::warn!("notification to pid {pid} failed: {e}");
        Error::disconnected(&format!("CUDA_IPC peer pid {pid}"))
    }

    /// Sends queued standalone notifications, in order, until one would block.
    fn flush_outbox(&mut self) {
        while let Some(o) = self.outbox.front() {
            match self.chan.send(&o.to, &o.msg) {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => {
                    log::warn!("dropping notification to pid {}: {e}", o.pid);
                    let pid = o.pid;
                    match self.undelivered.iter_mut().find(|u| u.0 == pid) {
                        Some(u) => {
                            u.1 += 1;
                            u.2 = e.to_string();
                        }
                        None => self.undelivered.push((pid, 1, e.to_string())),
                    }
                }
            }
            self.outbox.pop_front();
        }
    }

    /// Queries the events of in-flight transfer `i`; `Ok(true)` when all completed.
    fn events_done(&mut self, i: usize) -> Result<bool, Error> {
        while let Some(&(dev, ev)) = self.inflight[i].events.last() {
            let state = self.device(dev)?;
            state.ctx.bind()?;
            // SAFETY: `ev` is a live event recorded in this context.
            let res = unsafe { sys::cuEventQuery(ev) };
            if res == sys::CUresult::CUDA_ERROR_NOT_READY {
                return Ok(false);
            }
            state.free_events.push(ev);
            self.inflight[i].events.pop();
            check(res, "cuEventQuery")?;
        }
        Ok(true)
    }

    /// Enqueues the asynchronous copies of `segments` (adding the devices
    /// whose streams they used to `used`) and returns the pieces that
    /// involve a peer's DRAM, for the workers. Every segment is checked
    /// against both registrations, and a peer process already gone is
    /// refused, before any memory is touched.
    fn enqueue(
        &mut self,
        op: XferOp,
        segments: Segments<'_, IpcReg, IpcRemoteKey>,
        used: &mut Vec<u32>,
    ) -> Result<Vec<Piece>, Error> {
        let mut checked_pid = None;
        for (i, s) in segments.iter().enumerate() {
            let off = s.remote_addr.checked_sub(s.remote_region_addr);
            let fits = off
                .and_then(|o| o.checked_add(s.len))
                .is_some_and(|end| end <= s.remote.len);
            let local_end = s.local_addr.checked_add(s.len);
            let local_fits = s.local_addr >= s.local.region.addr
                && local_end.is_some_and(|e| Some(e) <= s.local.region.end());
            if !fits || !local_fits || s.len == 0 {
                return Err(Error::backend(
                    BACKEND,
                    INVALID_VALUE,
                    &format!(
                        "segment {i} (local {:#x}, remote {:#x}, len {}) leaves its registration",
                        s.local_addr, s.remote_addr, s.len
                    ),
                ));
            }
            if s.remote.kind == MemKind::Dram && checked_pid != Some(s.remote.pid) {
                check_alive(s.remote.pid)?;
                checked_pid = Some(s.remote.pid);
            }
        }
        let mut pieces = Vec::new();
        for (i, s) in segments.iter().enumerate() {
            let off = s.remote_addr - s.remote_region_addr;
            let remote = s.remote.ptr + off;
            match (s.local.region.kind, s.remote.kind) {
                (MemKind::Vram, MemKind::Vram) => {
                    self.copy_device_device(op, i, &s, remote, used)?
                }
                (MemKind::Dram, MemKind::Vram) => self.copy_host_device(op, i, &s, remote, used)?,
                (local_kind, MemKind::Dram) => {
                    let vram = match local_kind {
                        MemKind::Vram => Some(self.device(s.local.region.dev)?.ctx.clone()),
                        MemKind::Dram => None,
                    };
                    split_into(&mut pieces, s.remote.pid, s.local_addr, remote, s.len, vram);
                }
            }
        }
        Ok(pieces)
    }

    /// Moves `pieces` (of a transfer to or from a peer's DRAM):
    /// inside this call where they are few bytes of local DRAM, otherwise
    /// grouped into parts of at most [`CMA_PART`] bytes for the workers.
    fn start_cma(&mut self, op: XferOp, pieces: Vec<Piece>) -> Result<Arc<CmaParts>, Error> {
        let total: u64 = pieces.iter().map(|p| p.len).sum();
        if total <= CMA_INLINE_MAX && pieces.iter().all(|p| p.vram.is_none()) {
            let parts = CmaParts::new(0);
            for p in &pieces {
                if let Err(e) = cma_copy(op, p.pid, p.local, p.remote, p.len) {
                    parts.fail(e);
                    break;
                }
            }
            return Ok(Arc::new(parts));
        }
        let (parts, work) = into_parts(op, pieces);
        if self.pool.is_none() {
            self.pool = Some(CmaPool::new()?);
        }
        if let Some(pool) = &self.pool {
            pool.submit(work);
        }
        Ok(parts)
    }

    /// VRAM ↔ peer VRAM: one copy on the local GPU's stream.
    fn copy_device_device(
        &mut self,
        op: XferOp,
        i: usize,
        s: &Segment<'_, IpcReg, IpcRemoteKey>,
        remote_ptr: u64,
        used: &mut Vec<u32>,
    ) -> Result<(), Error> {
        let (ldev, rdev) = (s.local.region.dev, s.remote.dev);
        let (dst, dst_dev, src) = match op {
            XferOp::Write => (remote_ptr, rdev, s.local_addr),
            XferOp::Read => (s.local_addr, ldev, remote_ptr),
        };
        let other_ctx = if ldev != rdev {
            let other = self.device(rdev)?.ctx.clone();
            let local = self.device(ldev)?.ctx.clone();
            // Direct NVLink/PCIe peer copies where the GPUs allow it;
            // once per pair, as the device states keep both contexts.
            self.peer_pair(&local, &other)?;
            Some(other)
        } else {
            None
        };
        let local = self.device(ldev)?;
        local.ctx.bind()?;
        let stream = local.stream;
        let what = || {
            format!(
                "{} segment {i}: {:#x} -> {:#x}, {} bytes",
                op.name(),
                src,
                dst,
                s.len
            )
        };
        match other_ctx {
            None => {
                // SAFETY: both ranges lie inside live allocations of this
                // GPU (registration / opened IPC mapping, bounds checked
                // by `enqueue`) that the core keeps until the transfer
                // completes.
                check(
                    unsafe { sys::cuMemcpyDtoDAsync_v2(dst, src, s.len as usize, stream) },
                    &what(),
                )?;
            }
            Some(other) => {
                let (dst_ctx, src_ctx) = if dst_dev == ldev {
                    (local.ctx.raw(), other.raw())
                } else {
                    (other.raw(), local.ctx.raw())
                };
                // SAFETY: as above, each pointer paired with the context
                // of the GPU that holds it.
                check(
                    unsafe {
                        sys::cuMemcpyPeerAsync(dst, dst_ctx, src, src_ctx, s.len as usize, stream)
                    },
                    &what(),
                )?;
            }
        }
        if !used.contains(&ldev) {
            used.push(ldev);
        }
        Ok(())
    }

    /// Local DRAM ↔ peer VRAM: one asynchronous host/device copy on the
    /// stream of the GPU holding the peer's region (where its IPC mapping
    /// was opened). Pageable host memory is staged by the driver; the event
    /// recorded after it still completes only once the data has arrived.
    fn copy_host_device(
        &mut self,
        op: XferOp,
        i: usize,
        s: &Segment<'_, IpcReg, IpcRemoteKey>,
        remote_ptr: u64,
        used: &mut Vec<u32>,
    ) -> Result<(), Error> {
        let rdev = s.remote.dev;
        let state = self.device(rdev)?;
        state.ctx.bind()?;
        let stream = state.stream;
        let host = s.local_addr as *mut std::ffi::c_void;
        let len = s.len as usize;
        let res = match op {
            // SAFETY: the host range lies inside the local registration and
            // the device range inside the peer's opened mapping (both checked
            // by `enqueue`); the core keeps both until the transfer completes.
            XferOp::Write => unsafe { sys::cuMemcpyHtoDAsync_v2(remote_ptr, host, len, stream) },
            // SAFETY: as above; the driver writes only the `len` bytes of the
            // local registration at `host`.
            XferOp::Read => unsafe { sys::cuMemcpyDtoHAsync_v2(host, remote_ptr, len, stream) },
        };
        check(
            res,
            &format!(
                "{} segment {i}: host {:#x}, device {remote_ptr:#x}, {} bytes",
                op.name(),
                s.local_addr,
                s.len
            ),
        )?;
        if !used.contains(&rdev) {
            used.push(rdev);
        }
        Ok(())
    }

    /// Page-locks a DRAM region where the driver allows it; see [`IpcReg::pinned`].
    fn register_dram(&mut self, region: &Region) -> Result<IpcReg, Error> {
        let last = region.addr + (region.len - 1);
        for at in [region.addr, last] {
            let info = driver::pointer_info(at)?;
            if info.kind != MemKind::Dram {
                return Err(Error::backend(
                    BACKEND,
                    INVALID_VALUE,
                    &format!(
                        "{:#x} (+{}) is not DRAM: CUDA reports {} on device {}",
                        region.addr, region.len, info.kind, info.dev
                    ),
                ));
            }
        }
        // Any context will do: the portable flag locks the memory for all.
        self.device(0)?.ctx.bind()?;
        // SAFETY: the caller registers `len` bytes of its own memory at
        // `addr`; page-locking changes no byte of it and is undone by
        // cuMemHostUnregister at deregistration.
        let res = unsafe {
            sys::cuMemHostRegister_v2(
                region.addr as *mut std::ffi::c_void,
                region.len as usize,
                sys::CU_MEMHOSTREGISTER_PORTABLE,
            )
        };
        let pinned = match check(
            res,
            &format!("cuMemHostRegister({:#x}, {})", region.addr, region.len),
        ) {
            Ok(()) => {
                self.host_pinned.insert(region.addr, region.len);
                true
            }
            Err(e) => {
                log::debug!("DRAM region stays pageable: {e}");
                false
            }
        };
        Ok(IpcReg {
            region: *region,
            key: IpcKey::Dram(DramKey {
                addr: region.addr,
                len: region.len,
            }),
            pinned,
        })
    }

    /// Unlocks a DRAM region this transport page-locked.
    fn unpin(&mut self, addr: u64) {
        if self.host_pinned.remove(&addr).is_none() {
            return;
        }
        let res = self.device(0).and_then(|s| s.ctx.bind()).and_then(|()| {
            // SAFETY: `addr` was page-locked by cuMemHostRegister in this
            // transport and is unlocked once (removed from `host_pinned`).
            check(
                unsafe { sys::cuMemHostUnregister(addr as *mut std::ffi::c_void) },
                &format!("cuMemHostUnregister({addr:#x})"),
            )
        });
        if let Err(e) = res {
            log::warn!("unlocking DRAM at {addr:#x}: {e}");
        }
    }
}

/// Waits for `ev` (recorded in the current context).
fn event_sync(ev: sys::CUevent) -> Result<(), Error> {
    // SAFETY: `ev` is a live event of the current context.
    check(unsafe { sys::cuEventSynchronize(ev) }, "cuEventSynchronize")
}

/// WRITE from VRAM at `vram` to `len` bytes at `remote` in process `pid`:
/// chunk `c` goes device-to-host into slot `c % BOUNCE_SLOTS`, and is
/// written to the peer once its event completed, while later chunks are
/// already copying. The context of the stream's GPU is current.
fn bounce_write(
    stream: sys::CUstream,
    events: &[sys::CUevent; BOUNCE_SLOTS],
    bounce: u64,
    vram: u64,
    pid: u32,
    remote: u64,
    len: u64,
) -> Result<(), Error> {
    let chunk = BOUNCE_CHUNK as u64;
    let mut pending: VecDeque<(usize, u64, u64)> = VecDeque::with_capacity(BOUNCE_SLOTS);
    let (mut off, mut c) = (0u64, 0usize);
    while off < len || !pending.is_empty() {
        if off < len && pending.len() < BOUNCE_SLOTS {
            let slot = c % BOUNCE_SLOTS;
            let n = chunk.min(len - off);
            let host = bounce + slot as u64 * chunk;
            // SAFETY: the slot holds `chunk` >= `n` bytes of pinned memory
            // that no other copy uses (its previous chunk was written out
            // before it left `pending`); the device range lies inside the
            // local registration.
            check(
                unsafe {
                    sys::cuMemcpyDtoHAsync_v2(
                        host as *mut std::ffi::c_void,
                        vram + off,
                        n as usize,
                        stream,
                    )
                },
                &format!("WRITE bounce: device {:#x} -> host, {n} bytes", vram + off),
            )?;
            // SAFETY: event and stream are live in the current context.
            check(
                unsafe { sys::cuEventRecord(events[slot], stream) },
                "cuEventRecord",
            )?;
            pending.push_back((slot, off, n));
            off += n;
            c += 1;
        } else if let Some((slot, at, n)) = pending.pop_front() {
            event_sync(events[slot])?;
            cma_copy(
                XferOp::Write,
                pid,
                bounce + slot as u64 * chunk,
                remote + at,
                n,
            )?;
        }
    }
    Ok(())
}

/// READ of `len` bytes at `remote` in process `pid` into VRAM at `vram`:
/// chunk `c` is read into slot `c % BOUNCE_SLOTS` (once the slot's previous
/// host-to-device copy completed) and copied to the GPU while the next
/// chunk is read. Returns after the last copy completed.
fn bounce_read(
    stream: sys::CUstream,
    events: &[sys::CUevent; BOUNCE_SLOTS],
    bounce: u64,
    vram: u64,
    pid: u32,
    remote: u64,
    len: u64,
) -> Result<(), Error> {
    let chunk = BOUNCE_CHUNK as u64;
    let mut busy = [false; BOUNCE_SLOTS];
    let (mut off, mut c) = (0u64, 0usize);
    while off < len {
        let slot = c % BOUNCE_SLOTS;
        let n = chunk.min(len - off);
        let host = bounce + slot as u64 * chunk;
        if busy[slot] {
            event_sync(events[slot])?;
        }
        cma_copy(XferOp::Read, pid, host, remote + off, n)?;
        // SAFETY: the slot holds `n` bytes just read and is not reused before
        // this copy's event completed; the device range lies inside the local
        // registration.
        check(
            unsafe {
                sys::cuMemcpyHtoDAsync_v2(
                    vram + off,
                    host as *const std::ffi::c_void,
                    n as usize,
                    stream,
                )
            },
            &format!("READ bounce: host -> device {:#x}, {n} bytes", vram + off),
        )?;
        // SAFETY: event and stream are live in the current context.
        check(
            unsafe { sys::cuEventRecord(events[slot], stream) },
            "cuEventRecord",
        )?;
        busy[slot] = true;
        off += n;
        c += 1;
    }
    for (slot, b) in busy.iter().enumerate() {
        if *b {
            event_sync(events[slot])?;
        }
    }
    Ok(())
}

/// Fails with `RemoteDisconnected` when process `pid` no longer exists
/// (`kill(pid, 0)` gives `ESRCH`), so a transfer to a peer that is gone is
/// refused at `post`. A peer that exits later fails the transfer in `poll`.
fn check_alive(pid: u32) -> Result<(), Error> {
    // SAFETY: signal 0 sends nothing; it only checks that the process exists.
    let res = unsafe { libc::kill(pid as libc::pid_t, 0) };
    if res != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
        return Err(Error::disconnected(&format!(
            "CUDA_IPC peer pid {pid} is gone"
        )));
    }
    Ok(())
}

/// Name of the cross-memory-attach call that moves data for `op`.
fn cma_call(op: XferOp) -> &'static str {
    match op {
        XferOp::Write => "process_vm_writev",
        XferOp::Read => "process_vm_readv",
    }
}

/// The error for `errno` from a cross-memory-attach call on process `pid`
/// that failed at `local` / `remote` after `moved` of `len` bytes.
fn cma_error(
    op: XferOp,
    pid: u32,
    errno: i32,
    local: u64,
    remote: u64,
    moved: u64,
    len: u64,
) -> Error {
    let call = cma_call(op);
    match errno {
        libc::EPERM => {
            log::warn!(
                "{call} on pid {pid} refused (EPERM): cross-memory attach needs ptrace \
                 permission over the peer (same user and a dumpable process, or \
                 CAP_SYS_PTRACE); Yama ptrace_scope >= 1 or a container's seccomp \
                 profile can refuse it"
            );
            Error::backend(
                BACKEND,
                errno as i64,
                &format!("{call}: cross-memory attach to pid {pid} refused (ptrace/Yama/seccomp)"),
            )
        }
        libc::ESRCH => Error::disconnected(&format!("CUDA_IPC peer pid {pid} is gone")),
        libc::EFAULT => Error::backend(
            BACKEND,
            errno as i64,
            &format!("{call} pid {pid}: EFAULT at remote {remote:#x}, local {local:#x}"),
        ),
        _ => {
            let e = std::io::Error::from_raw_os_error(errno);
            Error::backend(
                BACKEND,
                errno as i64,
                &format!("{call} pid {pid}, {moved} of {len} bytes moved: {e}"),
            )
        }
    }
}

/// Moves `len` bytes between `local` in this process and `remote` in
/// process `pid` with cross-memory attach: WRITE copies local to remote,
/// READ remote to local. A short count is continued from where it stopped;
/// a call that moves nothing or fails gives an error naming the pid and the
/// address it stopped at.
fn cma_copy(op: XferOp, pid: u32, local: u64, remote: u64, len: u64) -> Result<(), Error> {
    let mut moved = 0u64;
    while moved < len {
        let n = (len - moved).min(CMA_MAX_CALL) as usize;
        let (l, r) = (local + moved, remote + moved);
        let liov = libc::iovec {
            iov_base: l as *mut std::ffi::c_void,
            iov_len: n,
        };
        let riov = libc::iovec {
            iov_base: r as *mut std::ffi::c_void,
            iov_len: n,
        };
        let res = match op {
            // SAFETY: one iovec on each side, valid for the call. The kernel
            // reads `n` bytes of this process at `l` (inside a registration
            // that outlives the transfer) and checks the peer's range itself,
            // failing with EFAULT rather than touching unmapped memory.
            XferOp::Write => unsafe {
                libc::process_vm_writev(pid as libc::pid_t, &liov, 1, &riov, 1, 0)
            },
            // SAFETY: as above; the kernel writes only the `n` bytes at `l`,
            // memory of a registration no Rust reference reads meanwhile.
            XferOp::Read => unsafe {
                libc::process_vm_readv(pid as libc::pid_t, &liov, 1, &riov, 1, 0)
            },
        };
        if res < 0 {
            let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
            if errno == libc::EINTR {
                continue;
            }
            return Err(cma_error(op, pid, errno, l, r, moved, len));
        }
        if res == 0 {
            return Err(Error::backend(
                BACKEND,
                0,
                &format!(
                    "{} pid {pid}: stopped at remote {r:#x}, {moved} of {len} bytes moved",
                    cma_call(op)
                ),
            ));
        }
        moved += res as u64;
    }
    Ok(())
}

impl Drop for CudaIpcTransport {
    fn drop(&mut self) {
        // 1. Let every copy finish: nothing may touch peer memory after
        //    this. The workers finish their current part and are joined
        //    (releasing their streams and bounce buffers); then the streams.
        self.pool = None;
        let mut drained = true;
        for state in self.devices.iter().flatten() {
            if let Err(e) = state.synchronize() {
                log::warn!("draining device {}: {e}", state.ctx.ordinal());
                drained = false;
            }
        }
        if !drained {
            // A copy may still be queued: leave the peer allocations open,
            // the host memory pinned and the streams alive rather than
            // release them under it.
            log::error!(
                "CUDA_IPC: dropped with copies that could not be drained; peer memory \
                 handles, pinned host memory and streams are left in place"
            );
            std::mem::forget(std::mem::take(&mut self.my_opens));
            std::mem::forget(std::mem::take(&mut self.host_pinned));
            std::mem::forget(std::mem::take(&mut self.devices));
            std::mem::forget(std::mem::take(&mut self.inflight));
            return;
        }
        // 2. Return in-flight events to their pools.
        for f in std::mem::take(&mut self.inflight) {
            for (dev, ev) in f.events {
                if let Some(Some(state)) = self.devices.get_mut(dev as usize) {
                    state.free_events.push(ev);
                }
            }
        }
        // 3. Close the peer allocations this transport still holds.
        for (key, count) in std::mem::take(&mut self.my_opens) {
            unref_opened(&key, count);
        }
        // 4. Unlock the DRAM still registered.
        let pinned: Vec<u64> = self.host_pinned.keys().copied().collect();
        for addr in pinned {
            self.unpin(addr);
        }
        // 5. Bounce buffers, events, streams, then contexts (DeviceState's Drop).
        self.devices.clear();
    }
}

impl Transport for CudaIpcTransport {
    type LocalReg = IpcReg;
    type Peer = IpcPeer;
    type RemoteKey = IpcRemoteKey;

    fn name(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> Capabilities {
        let mut c = Capabilities::default();
        c.mem_kinds = MemKinds::DRAM_VRAM;
        c.max_segments = 0;
        c.max_notification = MAX_NOTIFICATION as u32;
        c.can_cancel = false;
        c.may_complete_inline = false;
        c
    }

    fn register(&mut self, region: &Region) -> Result<IpcReg, Error> {
        if region.len == 0 || region.end().is_none() {
            return Err(Error::InvalidRegion {
                addr: region.addr,
                len: region.len,
            });
        }
        if region.kind == MemKind::Dram {
            return self.register_dram(region);
        }
        let state = self.device(region.dev)?;
        state.ctx.bind()?;
        let uuid = state.uuid;
        let info = driver::pointer_info(region.addr)?;
        if info.kind != MemKind::Vram || info.dev != region.dev {
            return Err(Error::backend(
                BACKEND,
                INVALID_VALUE,
                &format!(
                    "{:#x} is not VRAM of device {}: CUDA reports {} on device {}",
                    region.addr, region.dev, info.kind, info.dev
                ),
            ));
        }
        let (base, alloc_len) = driver::address_range(region.addr)?;
        let offset = region.addr - base;
        if offset
            .checked_add(region.len)
            .map_or(true, |e| e > alloc_len)
        {
            return Err(Error::backend(
                BACKEND,
                INVALID_VALUE,
                &format!(
                    "region [{:#x}, +{}) leaves its allocation [{base:#x}, +{alloc_len})",
                    region.addr, region.len
                ),
            ));
        }
        let mut h = sys::CUipcMemHandle { reserved: [0; 64] };
        // SAFETY: `base` is the start of a live cuMemAlloc allocation of the
        // current context; `h` is a valid out-parameter.
        check(
            unsafe { sys::cuIpcGetMemHandle(&mut h, base) },
            &format!("cuIpcGetMemHandle({base:#x})"),
        )?;
        let handle = h.reserved.map(|b| b as u8);
        Ok(IpcReg {
            region: *region,
            key: IpcKey::Vram(VramKey {
                handle,
                offset,
                alloc_len,
                gpu_uuid: uuid,
            }),
            pinned: false,
        })
    }

    fn deregister(&mut self, reg: IpcReg) {
        // An exported VRAM handle needs no release; peers close their
        // mappings. DRAM locked at registration is unlocked.
        if reg.pinned {
            self.unpin(reg.region.addr);
        }
    }

    fn pack_key(&self, reg: &IpcReg, out: &mut [u8]) -> Result<usize, Error> {
        reg.key.encode(out)
    }

    fn local_address(&self, out: &mut [u8]) -> Result<usize, Error> {
        self.addr.encode(out)
    }

    fn connect(&mut self, address: &[u8]) -> Result<IpcPeer, Error> {
        let addr = IpcAddress::decode(address)?;
        addr.check_same_host(&self.addr)?;
        Ok(IpcPeer {
            addr,
            sock: channel_addr(&addr.socket_name())?,
        })
    }

    fn disconnect(&mut self, _peer: IpcPeer) {}

    fn unpack_key(
        &mut self,
        peer: &IpcPeer,
        region: &Region,
        key: &[u8],
    ) -> Result<IpcRemoteKey, Error> {
        let key = match IpcKey::decode(key)? {
            k if k.kind() != region.kind => {
                return Err(Error::backend(
                    BACKEND,
                    INVALID_VALUE,
                    &format!(
                        "key of pid {} is for {}, its region {:#x} says {}",
                        peer.addr.pid,
                        k.kind(),
                        region.addr,
                        region.kind
                    ),
                ))
            }
            IpcKey::Dram(k) => {
                // Only the range the peer registered may be touched.
                k.check_covers(region.addr, region.len)?;
                return Ok(IpcRemoteKey {
                    kind: MemKind::Dram,
                    ptr: region.addr,
                    len: region.len,
                    dev: 0,
                    pid: peer.addr.pid,
                    open: None,
                });
            }
            IpcKey::Vram(k) => k,
        };
        key.check_fits(region.len)?;
        let dev = driver::ordinal_of_uuid(&key.gpu_uuid)?.ok_or_else(|| {
            Error::backend(
                BACKEND,
                INVALID_VALUE,
                &format!(
                    "GPU {} of peer pid {} is not visible in this process",
                    crate::wire::hex(&key.gpu_uuid),
                    peer.addr.pid
                ),
            )
        })?;
        if peer.addr.pid == self.addr.pid {
            // Same address space: the peer's pointer is valid here as is.
            return Ok(IpcRemoteKey {
                kind: MemKind::Vram,
                ptr: region.addr,
                len: region.len,
                dev,
                pid: peer.addr.pid,
                open: None,
            });
        }
        let ctx = self.device(dev)?.ctx.clone();
        // Peer access now rather than in the first transfer's post.
        let locals: Vec<Arc<Context>> = self
            .devices
            .iter()
            .flatten()
            .map(|d| d.ctx.clone())
            .collect();
        for local in &locals {
            self.peer_pair(local, &ctx)?;
        }
        let open_key: OpenKey = (peer.addr.pid, key.handle);
        let base = {
            let mut table = opened_table().lock().unwrap_or_else(|p| p.into_inner());
            match table.get_mut(&open_key) {
                Some(o) => {
                    o.refs += 1;
                    o.ptr
                }
                None => {
                    ctx.bind()?;
                    let mut ptr = 0;
                    let h = sys::CUipcMemHandle {
                        reserved: key.handle.map(|b| b as std::ffi::c_char),
                    };
                    // SAFETY: `ptr` is a valid out-parameter; a handle that is
                    // not a live export gives an error code.
                    check(
                        unsafe {
                            sys::cuIpcOpenMemHandle_v2(
                                &mut ptr,
                                h,
                                sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32,
                            )
                        },
                        &format!("cuIpcOpenMemHandle (pid {}, device {dev})", peer.addr.pid),
                    )?;
                    table.insert(open_key, Opened { ptr, ctx, refs: 1 });
                    ptr
                }
            }
        };
        *self.my_opens.entry(open_key).or_insert(0) += 1;
        Ok(IpcRemoteKey {
            kind: MemKind::Vram,
            ptr: base + key.offset,
            len: region.len,
            dev,
            pid: peer.addr.pid,
            open: Some(open_key),
        })
    }

    fn release_key(&mut self, key: IpcRemoteKey) {
        let Some(open_key) = key.open else { return };
        if let Some(n) = self.my_opens.get_mut(&open_key) {
            *n -= 1;
            if *n == 0 {
                self.my_opens.remove(&open_key);
            }
            unref_opened(&open_key, 1);
        }
    }

    fn post(
        &mut self,
        op: XferOp,
        peer: &IpcPeer,
        segments: Segments<'_, IpcReg, IpcRemoteKey>,
        notification: Option<&[u8]>,
        token: Token,
    ) -> Result<PostStatus, Error> {
        if let Some(m) = notification {
            if m.len() > MAX_NOTIFICATION {
                return Err(Error::NotificationTooLong {
                    len: m.len() as u64,
                    max: MAX_NOTIFICATION as u64,
                });
            }
        }
        let needs_pool = segments.iter().any(|s| s.remote.kind == MemKind::Dram);
        if needs_pool && self.pool.is_none() {
            self.pool = Some(CmaPool::new()?);
        }
        let mut used = Vec::with_capacity(2);
        let mut pieces = Vec::new();
        let result = self.enqueue(op, segments, &mut used).and_then(|p| {
            pieces = p;
            let mut events = Vec::with_capacity(used.len());
            for &dev in &used {
                let state = self.device(dev)?;
                let ev = state.event()?;
                state.ctx.bind()?;
                // SAFETY: `ev` and `stream` are live in the bound context.
                let res = unsafe { sys::cuEventRecord(ev, state.stream) };
                if let Err(e) = check(res, "cuEventRecord") {
                    state.free_events.push(ev);
                    for (d, ev) in events {
                        if let Ok(s) = self.device(d) {
                            s.free_events.push(ev);
                        }
                    }
                    return Err(e);
                }
                events.push((dev, ev));
            }
            Ok(events)
        });
        // Nothing can fail after the parts are handed to the workers.
        let result = result.and_then(|events| {
            if pieces.is_empty() {
                return Ok((events, None));
            }
            match self.start_cma(op, std::mem::take(&mut pieces)) {
                Ok(parts) => Ok((events, Some(parts))),
                Err(e) => {
                    for (d, ev) in events {
                        if let Ok(s) = self.device(d) {
                            s.free_events.push(ev);
                        }
                    }
                    Err(e)
                }
            }
        });
        match result {
            Ok((events, cma)) => {
                let notify = notification.map(|m| Outgoing {
                    to: peer.sock.clone(),
                    pid: peer.addr.pid,
                    msg: m.to_vec(),
                });
                self.inflight.push(InFlight {
                    token,
                    events,
                    cma,
                    notify,
                });
                Ok(PostStatus::InProgress)
            }
            Err(e) => {
                // Copies already enqueued must not outlive the failed post.
                for dev in used {
                    if let Ok(s) = self.device(dev) {
                        let _ = s.synchronize();
                    }
                }
                Err(e)
            }
        }
    }

    fn poll(&mut self) -> Option<Completion> {
        self.flush_outbox();
        for i in 0..self.inflight.len() {
            // Until every part has finished, the workers may still touch
            // the transfer's memory: not reported before, even if failed.
            if self.inflight[i].cma.as_ref().is_some_and(|c| !c.done()) {
                continue;
            }
            let events = self.events_done(i);
            let failed = match events {
                Ok(false) => continue,
                Ok(true) => self.inflight[i].cma.as_ref().and_then(|c| c.take_error()),
                Err(e) => Some(e),
            };
            if let Some(e) = failed {
                let f = self.inflight.remove(i);
                return Some(Completion {
                    token: f.token,
                    result: Err(e),
                });
            }
            let result = match &self.inflight[i].notify {
                None => Ok(()),
                // Standalone notifications sent earlier go first.
                Some(_) if !self.outbox.is_empty() => continue,
                Some(o) => match self.chan.send(&o.to, &o.msg) {
                    Ok(true) => Ok(()),
                    Ok(false) => continue,
                    Err(e) => Err(Self::disconnected(o.pid, &e)),
                },
            };
            let f = self.inflight.remove(i);
            return Some(Completion {
                token: f.token,
                result,
            });
        }
        None
    }

    fn cancel(&mut self, _token: Token) -> Result<(), Error> {
        Err(Error::Unsupported {
            backend: BACKEND,
            what: "cancel",
        })
    }

    fn send_notification(&mut self, peer: &IpcPeer, msg: &[u8]) -> Result<(), Error> {
        if msg.len() > MAX_NOTIFICATION {
            return Err(Error::NotificationTooLong {
                len: msg.len() as u64,
                max: MAX_NOTIFICATION as u64,
            });
        }
        self.flush_outbox();
        let pid = peer.addr.pid;
        if let Some(i) = self.undelivered.iter().position(|u| u.0 == pid) {
            // Earlier notifications to this peer, accepted and queued, were
            // lost: said here rather than only logged.
            let (_, n, why) = self.undelivered.swap_remove(i);
            return Err(Error::backend(
                BACKEND,
                -1,
                &format!("{n} queued notifications to pid {pid} were not sent ({why})"),
            ));
        }
        if self.outbox.is_empty() {
            match self.chan.send(&peer.sock, msg) {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => return Err(Self::disconnected(peer.addr.pid, &e)),
            }
        }
        self.outbox.push_back(Outgoing {
            to: peer.sock.clone(),
            pid: peer.addr.pid,
            msg: msg.to_vec(),
        });
        Ok(())
    }

    fn poll_notification(&mut self, buf: &mut [u8]) -> Option<Result<usize, Error>> {
        self.chan.recv(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> u32 {
        std::process::id()
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// Two anonymous pages, the second unmapped again: a range that runs
    /// off mapped memory after 4096 bytes. Unmapped in `Drop`.
    struct HalfMapped(u64);

    impl HalfMapped {
        fn new(fill: u8) -> HalfMapped {
            // SAFETY: a fresh private anonymous mapping; nothing else uses it.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    8192,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED);
            // SAFETY: the first page is ours; the second is unmapped and
            // never touched again.
            unsafe {
                std::ptr::write_bytes(p.cast::<u8>(), fill, 4096);
                assert_eq!(libc::munmap(p.cast::<u8>().add(4096).cast(), 4096), 0);
            }
            HalfMapped(p as u64)
        }

        fn first_page(&self) -> &[u8] {
            // SAFETY: the first page stays mapped until `Drop`.
            unsafe { std::slice::from_raw_parts(self.0 as *const u8, 4096) }
        }
    }

    impl Drop for HalfMapped {
        fn drop(&mut self) {
            // SAFETY: unmaps the page mapped in `new`.
            unsafe { libc::munmap(self.0 as *mut std::ffi::c_void, 4096) };
        }
    }

    #[test]
    fn cma_moves_bytes_both_ways() {
        let src = pattern((1 << 20) + 13, 5);
        let mut dst = vec![0u8; src.len()];
        let (s, d) = (src.as_ptr() as u64, dst.as_mut_ptr() as u64);
        cma_copy(XferOp::Write, me(), s, d, src.len() as u64).unwrap();
        assert!(dst == src, "WRITE over cross-memory attach differs");
        let mut back = vec![0u8; 1000];
        cma_copy(XferOp::Read, me(), back.as_mut_ptr() as u64, s + 77, 1000).unwrap();
        assert_eq!(&back[..], &src[77..1077]);
    }

    #[test]
    fn cma_short_count_is_continued_then_reported_at_the_address() {
        // READ: the remote range ends after one page. The first call moves
        // 4096 bytes, the continuation fails at the unmapped page.
        let remote = HalfMapped::new(0x5A);
        let mut local = vec![0u8; 8192];
        let l = local.as_mut_ptr() as u64;
        let e = cma_copy(XferOp::Read, me(), l, remote.0, 8192).unwrap_err();
        assert_eq!(
            e,
            Error::backend(
                BACKEND,
                libc::EFAULT as i64,
                &format!(
                    "process_vm_readv pid {}: EFAULT at remote {:#x}, local {:#x}",
                    me(),
                    remote.0 + 4096,
                    l + 4096
                )
            )
        );
        assert!(
            local[..4096].iter().all(|&b| b == 0x5A),
            "first page not moved"
        );
        assert!(
            local[4096..].iter().all(|&b| b == 0),
            "bytes past the fault"
        );
        // WRITE into the same range: the first page is written, then EFAULT.
        let src = pattern(8192, 9);
        let e = cma_copy(XferOp::Write, me(), src.as_ptr() as u64, remote.0, 8192).unwrap_err();
        assert_eq!(
            e,
            Error::backend(
                BACKEND,
                libc::EFAULT as i64,
                &format!(
                    "process_vm_writev pid {}: EFAULT at remote {:#x}, local {:#x}",
                    me(),
                    remote.0 + 4096,
                    src.as_ptr() as u64 + 4096
                )
            )
        );
        assert_eq!(remote.first_page(), &src[..4096]);
    }

    #[test]
    fn cma_to_a_gone_process_names_its_pid() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let buf = [1u8; 64];
        for op in [XferOp::Write, XferOp::Read] {
            let p = buf.as_ptr() as u64;
            assert_eq!(
                cma_copy(op, pid, p, p, 64),
                Err(Error::disconnected(&format!(
                    "CUDA_IPC peer pid {pid} is gone"
                )))
            );
        }
    }

    #[test]
    fn cma_errors_name_the_call_the_pid_and_the_cause() {
        let e = cma_error(XferOp::Write, 4194304, libc::EPERM, 0x10, 0x20, 0, 100);
        assert_eq!(
            e,
            Error::backend(
                BACKEND,
                1,
                "process_vm_writev: cross-memory attach to pid 4194304 refused (ptrace/Yama/seccomp)"
            )
        );
        // The whole text fits the bounded error text.
        match &e {
            Error::Backend { text, .. } => assert!(text.ends_with("(ptrace/Yama/seccomp)")),
            _ => unreachable!(),
        }
        assert_eq!(
            cma_error(XferOp::Read, 77, libc::EPERM, 0, 0, 0, 1),
            Error::backend(
                BACKEND,
                1,
                "process_vm_readv: cross-memory attach to pid 77 refused (ptrace/Yama/seccomp)"
            )
        );
        assert_eq!(
            cma_error(XferOp::Read, 77, libc::ESRCH, 0, 0, 0, 1),
            Error::disconnected("CUDA_IPC peer pid 77 is gone")
        );
        assert_eq!(
            cma_error(XferOp::Read, 77, libc::ENOMEM, 0, 0, 4096, 8192),
            Error::backend(
                BACKEND,
                libc::ENOMEM as i64,
                &format!(
                    "process_vm_readv pid 77, 4096 of 8192 bytes moved: {}",
                    std::io::Error::from_raw_os_error(libc::ENOMEM)
                )
            )
        );
    }

    /// Polls `parts` until every part finished, at most 30 s.
    fn wait_parts(parts: &CmaParts) {
        let start = std::time::Instant::now();
        while !parts.done() {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(30),
                "parts did not finish"
            );
            std::thread::sleep(std::time::Duration::from_micros(100));
        }
    }

    #[test]
    fn cma_workers_move_split_and_grouped_pieces() {
        let long = (5 * CMA_PART + 13) as usize;
        let src = pattern(long + 3000, 3);
        let mut dst = vec![0u8; long + 3000 + 3 * 7];
        let (s, d) = (src.as_ptr() as u64, dst.as_mut_ptr() as u64);
        let mut pieces = Vec::new();
        // One long range (split in pieces of CMA_PART), then three short
        // ones, each 7 bytes further on in the target.
        split_into(&mut pieces, me(), s, d, long as u64, None);
        for k in 0..3u64 {
            let at = long as u64 + k * 1000;
            split_into(&mut pieces, me(), s + at, d + at + 7 * (k + 1), 1000, None);
        }
        assert_eq!(pieces.len(), 9);
        let (parts, work) = into_parts(XferOp::Write, pieces);
        // Five full parts; the 13-byte tail shares the sixth with the short ones.
        let sizes: Vec<(usize, u64)> = work
            .iter()
            .map(|p| (p.pieces.len(), p.pieces.iter().map(|x| x.len).sum()))
            .collect();
        assert_eq!(
            sizes,
            [
                (1, CMA_PART),
                (1, CMA_PART),
                (1, CMA_PART),
                (1, CMA_PART),
                (1, CMA_PART),
                (4, 3013)
            ]
        );
        assert!(!parts.done());
        let pool = CmaPool::new().unwrap();
        assert_eq!(pool.threads.len(), CMA_WORKERS);
        pool.submit(work);
        wait_parts(&parts);
        assert_eq!(parts.take_error(), None);
        let mut expected = src[..long].to_vec();
        for k in 0..3 {
            expected.extend_from_slice(&[0u8; 7]);
            expected.extend_from_slice(&src[long + k * 1000..long + (k + 1) * 1000]);
        }
        assert!(dst == expected, "target differs after the workers' WRITE");
        // READ back through the same pool into a fresh buffer.
        let mut back = vec![0u8; long];
        let mut pieces = Vec::new();
        split_into(
            &mut pieces,
            me(),
            back.as_mut_ptr() as u64,
            d,
            long as u64,
            None,
        );
        let (parts, work) = into_parts(XferOp::Read, pieces);
        pool.submit(work);
        wait_parts(&parts);
        assert_eq!(parts.take_error(), None);
        assert!(back[..] == src[..long], "READ through the workers differs");
    }

    #[test]
    fn cma_workers_report_the_error_only_after_every_part_finished() {
        let remote = HalfMapped::new(0);
        let src = pattern(4 * CMA_PART as usize, 7);
        let mut good = vec![0u8; 3 * CMA_PART as usize];
        let mut after_fault = vec![0u8; 1000];
        let s = src.as_ptr() as u64;
        let mut pieces = Vec::new();
        // Three parts of good target memory, queued first ...
        split_into(
            &mut pieces,
            me(),
            s,
            good.as_mut_ptr() as u64,
            good.len() as u64,
            None,
        );
        // ... then one part whose first piece runs off the mapped page and
        // whose second piece must then not be moved.
        let faulty = s + good.len() as u64;
        split_into(&mut pieces, me(), faulty, remote.0, 8192, None);
        split_into(
            &mut pieces,
            me(),
            faulty + 8192,
            after_fault.as_mut_ptr() as u64,
            1000,
            None,
        );
        let (parts, work) = into_parts(XferOp::Write, pieces);
        assert_eq!(work.len(), 4);
        let pool = CmaPool::new().unwrap();
        pool.submit(work);
        wait_parts(&parts);
        assert_eq!(
            parts.take_error(),
            Some(Error::backend(
                BACKEND,
                libc::EFAULT as i64,
                &format!(
                    "process_vm_writev pid {}: EFAULT at remote {:#x}, local {:#x}",
                    me(),
                    remote.0 + 4096,
                    faulty + 4096
                )
            ))
        );
        // Every part queued before the failing one had started, so all of
        // them landed before the failure could be reported.
        assert!(good[..] == src[..good.len()], "earlier parts incomplete");
        assert_eq!(remote.first_page(), &src[good.len()..good.len() + 4096]);
        assert!(
            after_fault.iter().all(|&b| b == 0),
            "piece after the fault moved"
        );
        // A transfer that already failed skips the parts it has not started.
        let failed = Arc::new(CmaParts::new(1));
        failed.fail(Error::disconnected("first"));
        failed.fail(Error::disconnected("second"));
        pool.submit(vec![Part {
            op: XferOp::Write,
            pieces: vec![Piece {
                pid: me(),
                local: s,
                remote: after_fault.as_mut_ptr() as u64,
                len: 1000,
                vram: None,
            }],
            parts: failed.clone(),
        }]);
        wait_parts(&failed);
        assert_eq!(failed.take_error(), Some(Error::disconnected("first")));
        assert!(after_fault.iter().all(|&b| b == 0), "skipped part moved");
    }

    #[test]
    fn cma_workers_are_joined_on_drop_and_touch_nothing_afterwards() {
        let len = 16 * CMA_PART as usize;
        let src = pattern(len, 11);
        let mut dst = vec![0u8; len];
        let mut pieces = Vec::new();
        split_into(
            &mut pieces,
            me(),
            src.as_ptr() as u64,
            dst.as_mut_ptr() as u64,
            len as u64,
            None,
        );
        let (parts, work) = into_parts(XferOp::Write, pieces);
        let pool = CmaPool::new().unwrap();
        pool.submit(work);
        drop(pool);
        // The workers are gone: the target no longer changes.
        let snapshot = dst.clone();
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(dst == snapshot, "target written after the pool was dropped");
        // Whatever part finished moved all of its bytes.
        let whole = |k: usize| {
            let r = k * CMA_PART as usize..(k + 1) * CMA_PART as usize;
            dst[r.clone()] == src[r]
        };
        let finished = (0..16).filter(|&k| whole(k)).count();
        let left = parts.left.load(Ordering::Acquire);
        assert_eq!(finished + left, 16, "{finished} parts landed, {left} left");
    }
}
