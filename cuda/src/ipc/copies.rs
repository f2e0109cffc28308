//! Posting: checking a transfer's segments, queueing its asynchronous
//! copies and events, and handing its peer-DRAM pieces to the workers.

use kvxfer_core::{Error, MemKind, PostStatus, Segment, Segments, Token, XferOp};

use super::cma::{check_alive, split_into, Piece};
use super::pool::CmaPool;
use super::{
    CudaIpcTransport, InFlight, IpcPeer, IpcReg, IpcRemoteKey, Outgoing, MAX_NOTIFICATION,
};
use crate::driver::{check_with, BACKEND, INVALID_VALUE};

impl CudaIpcTransport {
    /// Enqueues the asynchronous copies of `segments` (adding the devices
    /// whose streams they used to `used`) and returns the pieces that
    /// involve a peer's DRAM, for the workers. Every segment is checked
    /// against both registrations, and a peer process already gone is
    /// refused, before any memory is touched.
    pub(super) fn enqueue(
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
            // VRAM too: an IPC mapping keeps a dead peer's memory alive,
            // so copies into it would go on succeeding unseen.
            if checked_pid != Some(s.remote.pid) {
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

    /// VRAM ↔ peer VRAM: one copy on the local GPU's stream.
    pub(super) fn copy_device_device(
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
        let what = || {
            format!(
                "{} segment {i}: {:#x} -> {:#x}, {} bytes",
                op.name(),
                src,
                dst,
                s.len
            )
        };
        // Both ranges lie inside live allocations (registration / opened
        // IPC mapping, bounds checked by `enqueue`) that the core keeps
        // until the transfer completes.
        let res = match other_ctx {
            None => local.stream.copy_dtod(dst, src, s.len as usize),
            Some(other) => {
                // Each pointer paired with the context of the GPU holding it.
                let (dst_ctx, src_ctx) = if dst_dev == ldev {
                    (&*local.ctx, &*other)
                } else {
                    (&*other, &*local.ctx)
                };
                local
                    .stream
                    .copy_peer(dst, dst_ctx, src, src_ctx, s.len as usize)
            }
        };
        check_with(res, what)?;
        if !used.contains(&ldev) {
            used.push(ldev);
        }
        Ok(())
    }

    /// Local DRAM ↔ peer VRAM: one asynchronous host/device copy on the
    /// stream of the GPU holding the peer's region (where its IPC mapping
    /// was opened). Pageable host memory is staged by the driver; the event
    /// recorded after it still completes only once the data has arrived.
    pub(super) fn copy_host_device(
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
        let (host, len) = (s.local_addr, s.len as usize);
        // The host range lies inside the local registration and the device
        // range inside the peer's opened mapping (both checked by
        // `enqueue`); the core keeps both until the transfer completes.
        let res = match op {
            XferOp::Write => state.stream.copy_htod(remote_ptr, host, len),
            XferOp::Read => state.stream.copy_dtoh(host, remote_ptr, len),
        };
        check_with(res, || {
            format!(
                "{} segment {i}: host {:#x}, device {remote_ptr:#x}, {} bytes",
                op.name(),
                s.local_addr,
                s.len
            )
        })?;
        if !used.contains(&rdev) {
            used.push(rdev);
        }
        Ok(())
    }

    /// [`Transport::post`](kvxfer_core::Transport::post).
    pub(super) fn post_xfer(
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
        // The peer whose VRAM the copies touch, checked again at
        // completion (its death fails no copy).
        let vram_peer = segments
            .iter()
            .find(|s| s.remote.kind == MemKind::Vram && s.remote.pid != self.addr.pid)
            .map(|s| s.remote.pid);
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
                if let Err(e) = state.stream.record(&ev) {
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
                    vram_peer,
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
}
