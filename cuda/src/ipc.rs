//! The CUDA-IPC transport: VRAM to VRAM between processes on one host.
//!
//! * **Register** checks that the region is VRAM of the named GPU
//!   (pointer attributes), finds the allocation holding it
//!   (`cuMemGetAddressRange`) and takes the allocation's IPC handle
//!   (`cuIpcGetMemHandle`). The packed key is an [`IpcKey`]: the handle plus
//!   the region's offset in the allocation, the allocation size and the GPU
//!   UUID (ordinals differ between processes; UUIDs do not).
//! * **Address** is an [`IpcAddress`]: host id, pid and instance. A peer on
//!   another host is refused at [`connect`](Transport::connect).
//! * **Direct peer access** (NVLink or PCIe peer-to-peer) between two GPUs
//!   is enabled when a key on another GPU than a local registration is
//!   unpacked, so the first transfer does not pay for it; without it the
//!   driver moves cross-GPU copies through the host (about a tenth of the
//!   bandwidth on NVLink-connected H100s). [`PEER_ACCESS_ENV`]`=0` turns it
//!   off.
//! * **Unpack** opens each peer allocation once per process
//!   (`cuIpcOpenMemHandle`), reference-counted across keys and transports,
//!   and closes it (`cuIpcCloseMemHandle`) when the last key is released or
//!   the transport is dropped. A peer in the same process needs no handle.
//! * **Post** enqueues one asynchronous copy per segment on the stream of
//!   the local GPU — `cuMemcpyDtoDAsync` when both sides are on one GPU,
//!   `cuMemcpyPeerAsync` with both contexts otherwise — and records an event
//!   on every stream it used. **Poll** reports the transfer only when all its
//!   events are complete (`cuEventQuery`).
//! * **Notifications** travel over a [`NotifyChannel`]. The one attached to
//!   a transfer is sent only after the transfer's events completed, and the
//!   transfer completes only once it is sent, so the target always sees the
//!   data before the message.

use std::collections::{HashMap, VecDeque};
use std::os::unix::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::sys;
use kvxfer_core::mem::MemKinds;
use kvxfer_core::{
    Capabilities, Completion, Error, MemKind, PostStatus, Region, Segment, Token, Transport, XferOp,
};

use crate::driver::{self, check, Context, BACKEND, INVALID_VALUE};
use crate::notify::{channel_addr, NotifyChannel};
use crate::wire::{host_id, IpcAddress, IpcKey};

/// Longest notification, in bytes.
pub const MAX_NOTIFICATION: usize = 4096;

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

    fn synchronize(&self) -> Result<(), Error> {
        self.ctx.bind()?;
        // SAFETY: `stream` is live in this context.
        check(
            unsafe { sys::cuStreamSynchronize(self.stream) },
            "cuStreamSynchronize",
        )
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

/// A registered VRAM region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpcReg {
    region: Region,
    key: IpcKey,
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
    /// Pointer to the region's first byte in this process.
    ptr: u64,
    len: u64,
    /// Local ordinal of the GPU holding it.
    dev: u32,
    open: Option<OpenKey>,
}

impl IpcRemoteKey {
    /// Local ordinal of the GPU that holds the peer's region.
    pub fn device(&self) -> u32 {
        self.dev
    }

    /// The region's first byte as a device pointer valid in this process.
    pub fn ptr(&self) -> u64 {
        self.ptr
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
    /// Device pairs whose peer access was set up (their states, and so
    /// their contexts, live as long as the transport).
    peer_pairs: Vec<(u32, u32)>,
    /// Whether cross-GPU copies enable direct peer access first.
    peer_access: bool,
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
            peer_pairs: Vec::new(),
            peer_access: !std::env::var(PEER_ACCESS_ENV).is_ok_and(|v| v.trim() == "0"),
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
                Err(e) => log::warn!("dropping notification to pid {}: {e}", o.pid),
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

    /// Enqueues the copies of `segments`; returns the devices whose streams
    /// were used (as a bit set over ordinals < 64, plus a list).
    fn enqueue(
        &mut self,
        op: XferOp,
        segments: &[Segment<'_, IpcReg, IpcRemoteKey>],
        used: &mut Vec<u32>,
    ) -> Result<(), Error> {
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
            let remote_ptr = s.remote.ptr + off.unwrap_or(0);
            let (ldev, rdev) = (s.local.region.dev, s.remote.dev);
            let (dst, dst_dev, src, _src_dev) = match op {
                XferOp::Write => (remote_ptr, rdev, s.local_addr, ldev),
                XferOp::Read => (s.local_addr, ldev, remote_ptr, rdev),
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
                    // above) that the core keeps until the transfer completes.
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
                            sys::cuMemcpyPeerAsync(
                                dst,
                                dst_ctx,
                                src,
                                src_ctx,
                                s.len as usize,
                                stream,
                            )
                        },
                        &what(),
                    )?;
                }
            }
            if !used.contains(&ldev) {
                used.push(ldev);
            }
        }
        Ok(())
    }
}

impl Drop for CudaIpcTransport {
    fn drop(&mut self) {
        // 1. Let every copy finish: nothing may touch peer memory after this.
        for state in self.devices.iter().flatten() {
            if let Err(e) = state.synchronize() {
                log::warn!("draining device {}: {e}", state.ctx.ordinal());
            }
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
        // 4. Events, streams, then contexts (DeviceState's Drop).
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
        c.mem_kinds = MemKinds::default().with(MemKind::Vram);
        c.max_segments = 0;
        c.max_notification = MAX_NOTIFICATION as u32;
        c.can_cancel = false;
        c.may_complete_inline = false;
        c
    }

    fn register(&mut self, region: &Region) -> Result<IpcReg, Error> {
        if region.kind != MemKind::Vram {
            return Err(Error::UnsupportedMemKind {
                backend: BACKEND,
                kind: region.kind,
            });
        }
        if region.len == 0 || region.end().is_none() {
            return Err(Error::InvalidRegion {
                addr: region.addr,
                len: region.len,
            });
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
            key: IpcKey {
                handle,
                offset,
                alloc_len,
                gpu_uuid: uuid,
            },
        })
    }

    fn deregister(&mut self, _reg: IpcReg) {
        // An exported handle needs no release; peers close their mappings.
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
        if region.kind != MemKind::Vram {
            return Err(Error::UnsupportedMemKind {
                backend: BACKEND,
                kind: region.kind,
            });
        }
        let key = IpcKey::decode(key)?;
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
                ptr: region.addr,
                len: region.len,
                dev,
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
            ptr: base + key.offset,
            len: region.len,
            dev,
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
        segments: &[Segment<'_, IpcReg, IpcRemoteKey>],
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
        let mut used = Vec::with_capacity(2);
        let result = self.enqueue(op, segments, &mut used).and_then(|()| {
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
        match result {
            Ok(events) => {
                let notify = notification.map(|m| Outgoing {
                    to: peer.sock.clone(),
                    pid: peer.addr.pid,
                    msg: m.to_vec(),
                });
                self.inflight.push(InFlight {
                    token,
                    events,
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
            match self.events_done(i) {
                Ok(false) => continue,
                Err(e) => {
                    let f = self.inflight.remove(i);
                    return Some(Completion {
                        token: f.token,
                        result: Err(e),
                    });
                }
                Ok(true) => {}
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
