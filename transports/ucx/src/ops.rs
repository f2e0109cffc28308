//! [`Transport`] for [`UcxTransport`]: registration, connection, keys,
//! posting, progress, cancel and notifications.

use std::ffi::c_void;

use kvxfer_core::mem::MemKinds;
use kvxfer_core::{
    Capabilities, Completion, DescError, Error, MemKind, PostStatus, Region, Segments, Side, Token,
    Transport, XferOp,
};
use ucx_sys as sys;

use crate::endpoint::{KeyEntry, RegEntry};
use crate::ffi::MemHandle;
use crate::slot::Phase;
use crate::status::ucs_error;
use crate::transport::{UcxPeer, UcxReg, UcxRemoteKey, UcxTransport};
use crate::BACKEND;

impl Transport for UcxTransport {
    type LocalReg = UcxReg;
    type Peer = UcxPeer;
    type RemoteKey = UcxRemoteKey;

    fn name(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> Capabilities {
        let mut caps = Capabilities::default();
        caps.mem_kinds = if self.cuda {
            MemKinds::DRAM_VRAM
        } else {
            MemKinds::DRAM
        };
        caps.max_segments = 0;
        caps.max_notification = self.config.max_notification;
        caps.can_cancel = true;
        caps.may_complete_inline = true;
        caps
    }

    fn register(&mut self, region: &Region) -> Result<UcxReg, Error> {
        if region.kind == MemKind::Vram && !self.cuda {
            return Err(Error::UnsupportedMemKind {
                backend: BACKEND,
                kind: region.kind,
            });
        }
        let len = usize::try_from(region.len).ok();
        if region.len == 0 || region.end().is_none() || len.is_none() || region.addr == 0 {
            return Err(Error::InvalidRegion {
                addr: region.addr,
                len: region.len,
            });
        }
        let mut params = sys::ucp_mem_map_params_t {
            field_mask: u64::from(
                sys::UCP_MEM_MAP_PARAM_FIELD_ADDRESS | sys::UCP_MEM_MAP_PARAM_FIELD_LENGTH,
            ),
            address: region.addr as usize as *mut c_void,
            length: len.unwrap_or(0),
            ..Default::default()
        };
        if region.kind == MemKind::Vram {
            // UCX finds the device from the pointer's attributes.
            params.field_mask |= u64::from(sys::UCP_MEM_MAP_PARAM_FIELD_MEMORY_TYPE);
            params.memory_type = sys::UCS_MEMORY_TYPE_CUDA;
        }
        let what = format!("registering [{:#x}, +{})", region.addr, region.len);
        let (memh, packed) = MemHandle::map(self.worker.context(), &params, &what)?;
        let index = self.regs.insert(RegEntry {
            memh,
            region: *region,
            packed,
        });
        if region.kind == MemKind::Dram {
            self.inline_mut().regions.push((region.addr, region.len));
        }
        Ok(UcxReg {
            owner: self.owner,
            index,
        })
    }

    fn in_use(&mut self, reg: &UcxReg) -> bool {
        let uses = |t: &Self| {
            t.zombies.iter().any(|&z| {
                let s = t.slot(z);
                s.outstanding > 0 && s.regs.contains(&reg.index)
            })
        };
        if !uses(self) {
            return false;
        }
        self.progress();
        self.reap();
        uses(self)
    }

    fn deregister(&mut self, reg: UcxReg) {
        if reg.owner != self.owner {
            log::error!("UCX: deregister: registration belongs to another transport; ignored");
            return;
        }
        if let Some(entry) = self.regs.remove(reg.index) {
            // No small WRITE from a peer lands here from now on.
            let regions = &mut self.inline_mut().regions;
            let r = (entry.region.addr, entry.region.len);
            if let Some(i) = regions.iter().position(|&x| x == r) {
                regions.swap_remove(i);
            }
            // Requests of cancelled or abandoned transfers may still use the
            // memory: wait for them (bounded), else unmap it once they end.
            if !self.zombies.is_empty() {
                self.drain_zombies();
            }
            if !self.zombies.is_empty() {
                log::warn!(
                    "UCX: [{:#x}, +{}) stays mapped until UCX releases {} cancelled transfers",
                    entry.region.addr,
                    entry.region.len,
                    self.zombies.len()
                );
                self.deferred_unmaps.bury(entry.memh);
                return;
            }
            // Unmapped here: the core hands a registration back only when no
            // transfer uses it, and no cancelled transfer's request is left
            // (above).
            drop(entry.memh);
        }
    }

    fn pack_key(&self, reg: &UcxReg, out: &mut [u8]) -> Result<usize, Error> {
        if reg.owner != self.owner {
            return Err(self.foreign("registration belongs to another UCX transport"));
        }
        let Some(entry) = self.regs.get(reg.index) else {
            return Err(self.foreign("registration was released"));
        };
        let n = entry.packed.len();
        if out.len() < n {
            return Err(Error::BufferTooSmall {
                needed: n as u64,
                available: out.len() as u64,
            });
        }
        out[..n].copy_from_slice(&entry.packed);
        Ok(n)
    }

    fn local_address(&self, out: &mut [u8]) -> Result<usize, Error> {
        let n = self.address.len();
        if out.len() < n {
            return Err(Error::BufferTooSmall {
                needed: n as u64,
                available: out.len() as u64,
            });
        }
        out[..n].copy_from_slice(&self.address);
        Ok(n)
    }

    fn connect(&mut self, address: &[u8]) -> Result<UcxPeer, Error> {
        if address.is_empty() {
            return Err(self.foreign("empty worker address"));
        }
        // A rails address (kvxfer-rails, `KVR` and a version): UCX would
        // take its first byte for an address version it does not know and
        // abort the process.
        if address.starts_with(b"KVR") {
            return Err(
                self.foreign("rails on one side only: set KVXFER_RAILS of 2+ interfaces here too")
            );
        }
        if let Some(dev) = self.devices_without_link() {
            // UCX 1.13's tcp connects blocking, inside ucp_ep_create: over
            // an interface without link it would hold the caller until
            // neighbour resolution gives up (about 3 s).
            return Err(Error::backend(
                BACKEND,
                i64::from(sys::UCS_ERR_UNREACHABLE as sys::ucs_status_t),
                &format!("network device {dev} has no link"),
            ));
        }
        self.make_spare();
        let index = match self.create_ep(address) {
            Ok(index) => index,
            Err(st) => {
                if self.config.peer_failure_detection {
                    log::warn!(
                        "UCX: no transport reaches the peer with peer failure detection; \
                         UCX 1.13's sysv/posix cannot detect a dead peer, so UCX_TLS needs \
                         tcp or cma too (or turn peer_failure_detection off)"
                    );
                }
                return Err(ucs_error(
                    "creating an endpoint from the peer's worker address",
                    st,
                ));
            }
        };
        Ok(UcxPeer {
            owner: self.owner,
            index,
        })
    }

    fn disconnect(&mut self, peer: UcxPeer) {
        self.drop_ep(peer, false);
    }

    /// Closes the endpoint with a forced close, which neither flushes nor
    /// waits for the peer: UCX ends what is queued on it and closes its
    /// connections, so that bytes still on their way over them are
    /// refused (the fence of `kvxfer-rails` after a link was cut; a flush
    /// there would wait the whole close timeout for a dead link).
    fn reset(&mut self, peer: UcxPeer) {
        self.drop_ep(peer, true);
    }

    fn unpack_key(
        &mut self,
        peer: &UcxPeer,
        region: &Region,
        key: &[u8],
    ) -> Result<UcxRemoteKey, Error> {
        if peer.owner != self.owner {
            return Err(self.foreign("peer handle belongs to another UCX transport"));
        }
        if self.ep(peer.index).is_none() {
            return Err(self.foreign("peer handle was disconnected"));
        }
        if key.is_empty() {
            return Err(self.foreign("empty remote key"));
        }
        let Some(unpacked) = self.unpack_rkey(peer.index, key) else {
            return Err(Error::disconnected(""));
        };
        let rkey = unpacked.map_err(|st| {
            let what = format!(
                "unpacking the remote key of [{:#x}, +{})",
                region.addr, region.len
            );
            ucs_error(&what, st)
        })?;
        let index = self.keys.insert(KeyEntry {
            rkey: Some(rkey),
            ep: peer.index,
            region: *region,
        });
        Ok(UcxRemoteKey {
            owner: self.owner,
            index,
        })
    }

    fn local_kind(&self, reg: &UcxReg) -> MemKind {
        match self.regs.get(reg.index) {
            Some(r) if reg.owner == self.owner => r.region.kind,
            _ => MemKind::Dram,
        }
    }

    fn remote_kind(&self, key: &UcxRemoteKey) -> MemKind {
        match self.keys.get(key.index) {
            Some(k) if key.owner == self.owner => k.region.kind,
            _ => MemKind::Dram,
        }
    }

    fn release_key(&mut self, key: UcxRemoteKey) {
        if key.owner != self.owner {
            log::error!("UCX: release_key: key belongs to another transport; ignored");
            return;
        }
        if let Some(KeyEntry {
            rkey: Some(rkey),
            ep,
            ..
        }) = self.keys.remove(key.index)
        {
            if self.zombies_on(ep) {
                // A cancelled or abandoned transfer's request may use it.
                self.deferred_rkeys.bury(rkey);
            }
            // Else destroyed here: the core hands a key back only when no
            // transfer uses it, and no cancelled transfer's request on its
            // endpoint is left.
        }
    }

    fn post(
        &mut self,
        op: XferOp,
        peer: &UcxPeer,
        segments: Segments<'_, UcxReg, UcxRemoteKey>,
        notification: Option<&[u8]>,
        token: Token,
    ) -> Result<PostStatus, Error> {
        let ep_index = self.live_ep(peer)?;
        if let Some(n) = notification {
            self.check_note_len(n)?;
        }
        // Check every segment before anything is issued: UCX writes where
        // the segments say, so they must lie inside what was registered.
        let mut host_only = true;
        for (i, seg) in segments.iter().enumerate() {
            let index = i as u32;
            let bad = |side, addr, reason| Error::InvalidDesc {
                side,
                index,
                addr,
                len: seg.len,
                reason,
            };
            if seg.len == 0 || usize::try_from(seg.len).is_err() {
                return Err(bad(Side::Local, seg.local_addr, DescError::ZeroLength));
            }
            let local = match self.regs.get(seg.local.index) {
                Some(r) if seg.local.owner == self.owner => r.region,
                _ => {
                    return Err(self.foreign("segment's local registration is not this transport's"))
                }
            };
            if !local.contains(seg.local_addr, seg.len) {
                let reason = DescError::OutsideRegistration {
                    region_addr: local.addr,
                    region_len: local.len,
                };
                return Err(bad(Side::Local, seg.local_addr, reason));
            }
            let remote = match self.keys.get(seg.remote.index) {
                Some(k)
                    if seg.remote.owner == self.owner && k.ep == ep_index && k.rkey.is_some() =>
                {
                    k.region
                }
                _ => {
                    return Err(self.foreign("segment's remote key was not unpacked for this peer"))
                }
            };
            if !remote.contains(seg.remote_addr, seg.len) {
                let reason = DescError::OutsideRegistration {
                    region_addr: remote.addr,
                    region_len: remote.len,
                };
                return Err(bad(Side::Remote, seg.remote_addr, reason));
            }
            host_only &= local.kind == MemKind::Dram && remote.kind == MemKind::Dram;
        }

        let index = self.alloc_slot(token, op, ep_index, notification);
        // Neighbouring segments mostly share a registration: keep one entry
        // per run, O(1) per segment.
        let regs = &mut self.slot_mut(index).regs;
        for seg in segments.iter() {
            if regs.last() != Some(&seg.local.index) {
                regs.push(seg.local.index);
            }
        }
        // The target copies a small WRITE into place with the CPU: host
        // memory only.
        if op == XferOp::Write && self.inline_max > 0 && host_only {
            if let Some(seg) = segments.single().filter(|g| g.len <= self.inline_max) {
                self.issue_inline(index, seg.local, seg.local_addr, seg.len, seg.remote_addr);
                return self.finish_post(index);
            }
        }
        self.issue_segments(index, op, segments);
        self.finish_post(index)
    }

    fn poll(&mut self) -> Option<Completion> {
        self.progress();
        self.take_acks();
        let mut i = 0;
        while i < self.active.len() {
            let index = self.active[i];
            match self.advance(index) {
                Some(result) => {
                    self.active.swap_remove(i);
                    let (token, internal) = (self.slot(index).token, self.slot(index).internal);
                    self.free_slot(index);
                    if internal {
                        if let Err(e) = result {
                            log::warn!("UCX: notification failed: {e}");
                        }
                    } else {
                        self.completions.push_back(Completion { token, result });
                    }
                }
                None => i += 1,
            }
        }
        if !self.zombies.is_empty()
            || self.open_closes > 0
            || !self.deferred_unmaps.is_empty()
            || !self.deferred_rkeys.is_empty()
        {
            self.reap();
        }
        self.completions.pop_front()
    }

    fn cancel(&mut self, token: Token) -> Result<(), Error> {
        if let Some(pos) = self.completions.iter().position(|c| c.token == token) {
            self.completions.remove(pos);
            return Ok(());
        }
        let found = self.active.iter().position(|&i| {
            let s = self.slot(i);
            s.token == token && !s.internal
        });
        let Some(pos) = found else {
            return Ok(());
        };
        // Never waits: the slot leaves the active list (so it completes
        // no more and issues nothing further) and stays a zombie until UCX
        // has released its requests; the memory and keys they use stay
        // until then (see deregister, release_key and disconnect).
        let index = self.active.swap_remove(pos);
        self.cancel_requests(index);
        self.progress();
        self.retire_slot(index);
        Ok(())
    }

    /// Cancels the transfer and force-closes its endpoint, which ends
    /// every request UCX still holds on it (a peer that stopped answering
    /// may otherwise keep them, and their memory, for ever). Later posts
    /// to the peer fail until it is connected again. Unlike a cancel, the
    /// transfer is still reported, failed with
    /// [`Error::RemoteDisconnected`], once UCX has released all its
    /// requests (promptly: the forced close ends them), so that a caller
    /// that must know when UCX let go of it (the rails of `kvxfer-rails`,
    /// which complete a transfer only then) learns it; a completion
    /// already queued is reported as it is.
    fn abandon(&mut self, token: Token) -> Result<(), Error> {
        if self.completions.iter().any(|c| c.token == token) {
            return Ok(());
        }
        let found = self.active.iter().position(|&i| {
            let s = self.slot(i);
            s.token == token && !s.internal
        });
        let Some(pos) = found else {
            return Ok(());
        };
        let index = self.active.swap_remove(pos);
        let ep = self.slot(index).ep;
        self.slot_mut(index).report = true;
        self.cancel_requests(index);
        self.progress();
        self.retire_slot(index);
        self.force_close(ep, sys::UCS_ERR_ENDPOINT_TIMEOUT as sys::ucs_status_t);
        self.progress();
        self.reap();
        Ok(())
    }

    /// True: a reset endpoint's `tcp` connection stays open until the
    /// peer closes its end (see [`renew`](kvxfer_core::Transport::renew)).
    fn needs_renew(&self) -> bool {
        true
    }

    /// Replaces the worker with a new one (new address) and destroys the
    /// old, which closes every connection it had; registrations stay.
    fn renew(&mut self) -> Result<(), Error> {
        self.renew_worker()
    }

    fn send_notification(&mut self, peer: &UcxPeer, msg: &[u8]) -> Result<(), Error> {
        let ep_index = self.live_ep(peer)?;
        self.check_note_len(msg)?;
        let index = self.alloc_slot(Token(u64::MAX), XferOp::Write, ep_index, Some(msg));
        let slot = self.slot_mut(index);
        slot.internal = true;
        slot.phase = Phase::Notify;
        self.issue_note(index);
        match self.advance(index) {
            Some(result) => {
                self.free_slot(index);
                result
            }
            None => {
                self.active.push(index);
                Ok(())
            }
        }
    }

    fn arm(&mut self) -> kvxfer_core::Wake {
        use kvxfer_core::Wake;
        let queued = !self.notes().is_empty();
        let acks = self.inline_state().pending();
        if !self.completions.is_empty() || queued || acks {
            return Wake::Busy;
        }
        match self.worker.arm() {
            Ok(fd) => Wake::Armed(fd),
            Err(true) => Wake::Busy,
            Err(false) => Wake::Unsupported,
        }
    }

    fn poll_notification(&mut self, buf: &mut [u8]) -> Option<Result<usize, Error>> {
        if self.notes().is_empty() {
            self.progress();
        }
        self.notes_mut().pop_into(buf)
    }
}
