//! Handles: the per-GPU state, the process-wide table of peer
//! allocations opened over CUDA IPC, and the registration and key
//! unpacking that fill them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kvxfer_core::{Error, MemKind, Region};

use super::{CudaIpcTransport, IpcPeer, IpcReg, IpcRemoteKey};
use crate::driver::{self, Context, BACKEND, INVALID_VALUE};
use crate::stream::{self, Event, IpcMapping, Stream};
use crate::wire::{DramKey, IpcKey, VramKey};

/// Peer allocations opened in this process, keyed by (peer pid, handle).
pub(super) type OpenKey = (u32, [u8; 64]);

/// An opened peer allocation and the keys (of all transports) using it.
struct Opened {
    mapping: IpcMapping,
    refs: u32,
}

fn opened_table() -> &'static Mutex<HashMap<OpenKey, Opened>> {
    static TABLE: std::sync::OnceLock<Mutex<HashMap<OpenKey, Opened>>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Drops `count` references to an opened allocation; closes it at zero.
pub(super) fn unref_opened(key: &OpenKey, count: u32) {
    let mut table = opened_table().lock().unwrap_or_else(|p| p.into_inner());
    let Some(entry) = table.get_mut(key) else {
        return;
    };
    entry.refs = entry.refs.saturating_sub(count);
    if entry.refs == 0 {
        if let Some(o) = table.remove(key) {
            log::debug!(
                "closing the IPC mapping at {:#x} of pid {}",
                o.mapping.ptr(),
                key.0
            );
            // No key refers to it any more: closed in IpcMapping's Drop.
            drop(o);
        }
    }
}

/// Per-GPU state: the retained context, one non-blocking stream and a pool
/// of events. The stream drains before anything is released (`Stream`'s
/// `Drop`), then the events go, then the context.
pub(super) struct DeviceState {
    pub(super) uuid: [u8; 16],
    pub(super) stream: Stream,
    pub(super) free_events: Vec<Event>,
    pub(super) ctx: Arc<Context>,
}

impl DeviceState {
    pub(super) fn new(ordinal: u32) -> Result<DeviceState, Error> {
        let ctx = Context::new(ordinal)?;
        let stream = Stream::new(&ctx)?;
        Ok(DeviceState {
            uuid: driver::device_uuid(ordinal)?,
            stream,
            free_events: Vec::new(),
            ctx,
        })
    }

    /// An event of this GPU, from the pool or new.
    pub(super) fn event(&mut self) -> Result<Event, Error> {
        match self.free_events.pop() {
            Some(e) => Ok(e),
            None => Event::new(&self.ctx),
        }
    }

    /// Waits for every copy queued on the stream.
    pub(super) fn synchronize(&self) -> Result<(), Error> {
        self.stream.synchronize()
    }
}

impl CudaIpcTransport {
    /// [`Transport::register`](kvxfer_core::Transport::register).
    pub(super) fn register_region(&mut self, region: &Region) -> Result<IpcReg, Error> {
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
        let handle = stream::ipc_mem_handle(base)?;
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

    /// Page-locks a DRAM region where the driver allows it; see [`IpcReg::pinned`].
    pub(super) fn register_dram(&mut self, region: &Region) -> Result<IpcReg, Error> {
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
        // Page-locking changes no byte of the caller's memory and is
        // undone by `unpin` at deregistration.
        let pinned = match stream::host_register(region.addr, region.len) {
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
    pub(super) fn unpin(&mut self, addr: u64) {
        if self.host_pinned.remove(&addr).is_none() {
            return;
        }
        // `addr` was page-locked by this transport and is unlocked once
        // (removed from `host_pinned`).
        let res = self
            .device(0)
            .and_then(|s| s.ctx.bind())
            .and_then(|()| stream::host_unregister(addr));
        if let Err(e) = res {
            log::warn!("unlocking DRAM at {addr:#x}: {e}");
        }
    }

    /// [`Transport::unpack_key`](kvxfer_core::Transport::unpack_key).
    pub(super) fn unpack(
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
                    o.mapping.ptr()
                }
                None => {
                    let what = format!("cuIpcOpenMemHandle (pid {}, device {dev})", peer.addr.pid);
                    let mapping = IpcMapping::open(ctx, &key.handle, &what)?;
                    let ptr = mapping.ptr();
                    table.insert(open_key, Opened { mapping, refs: 1 });
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

    /// [`Transport::release_key`](kvxfer_core::Transport::release_key).
    pub(super) fn release(&mut self, key: IpcRemoteKey) {
        let Some(open_key) = key.open else { return };
        if let Some(n) = self.my_opens.get_mut(&open_key) {
            *n -= 1;
            if *n == 0 {
                self.my_opens.remove(&open_key);
            }
            unref_opened(&open_key, 1);
        }
    }
}
