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

mod cma;
mod copies;
mod handles;
mod pool;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::os::unix::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use kvxfer_core::mem::MemKinds;
use kvxfer_core::{
    Capabilities, Completion, Error, MemKind, PostStatus, Region, Segments, Token, Transport,
    XferOp,
};

use crate::driver::{self, Context, BACKEND, INVALID_VALUE};
use crate::notify::channel_addr;
use crate::notify::NotifyChannel;
use crate::stream::Event;
use crate::wire::{host_id, IpcAddress, IpcKey};

use cma::CmaParts;
use handles::{unref_opened, DeviceState, OpenKey};
use pool::CmaPool;

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
    events: Vec<(u32, Event)>,
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
        while let Some(&(dev, _)) = self.inflight[i].events.last() {
            self.device(dev)?;
            let state = self.devices[dev as usize]
                .as_mut()
                .expect("made by device() above");
            state.ctx.bind()?;
            let events = &mut self.inflight[i].events;
            let res = events.last().expect("non-empty").1.query();
            if res == Ok(false) {
                return Ok(false);
            }
            let (_, ev) = events.pop().expect("non-empty");
            state.free_events.push(ev);
            res?;
        }
        Ok(true)
    }
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
        self.register_region(region)
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
        self.unpack(peer, region, key)
    }

    fn release_key(&mut self, key: IpcRemoteKey) {
        self.release(key);
    }

    fn post(
        &mut self,
        op: XferOp,
        peer: &IpcPeer,
        segments: Segments<'_, IpcReg, IpcRemoteKey>,
        notification: Option<&[u8]>,
        token: Token,
    ) -> Result<PostStatus, Error> {
        self.post_xfer(op, peer, segments, notification, token)
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
