//! Transfers: their slots, the libfabric operations of their segments,
//! and how they advance, are abandoned and finish.

use kvxfer_core::error::Name;
use kvxfer_core::{Completion, Error, PostStatus, Segments, Token, XferOp};
use libfabric_sys as sys;

use crate::fabric::{fi_error, MrDesc};
use crate::peers::FabricPeer;
use crate::transport::EAGAIN;
use crate::{FabricReg, FabricRemoteKey, FabricTransport, BACKEND};

/// What a libfabric operation context belongs to.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum OpKind {
    /// Not in use.
    Free,
    /// Segment `seg` of transfer slot `xfer`, generation `gen`.
    Rma { xfer: u32, gen: u32, seg: u32 },
    /// The notification of transfer `xfer`, in send buffer `buf`.
    XferNotif { xfer: u32, gen: u32, buf: u32 },
    /// A notification outside any transfer, in send buffer `buf`, to
    /// `peer`.
    Notif { buf: u32, peer: sys::fi_addr_t },
    /// A receive into notification buffer `buf`.
    Recv { buf: u32 },
    /// The operation of a transfer that already ended (abandoned); its
    /// completion is dropped, and the send buffer `buf` of an orphaned
    /// notification goes back to the pool with it. `local`/`len`: the
    /// application memory an orphaned RMA operation may still touch (`len`
    /// 0 for a notification). `peer`: the address it went to.
    Orphan {
        buf: Option<u32>,
        local: u64,
        len: u64,
        peer: sys::fi_addr_t,
    },
    /// The 0-byte READ to `peer` that showed its connection established
    /// before its removal from the address vector (`process_removals`);
    /// its completion is dropped.
    Probe { peer: sys::fi_addr_t },
}

/// One libfabric operation of a segment.
#[derive(Copy, Clone, Debug)]
pub(crate) struct SegOp {
    pub(crate) local: u64,
    pub(crate) len: u64,
    pub(crate) desc: MrDesc,
    pub(crate) remote: u64,
    pub(crate) key: u64,
}

/// A posted transfer.
#[derive(Debug)]
pub(crate) struct Xfer {
    pub(crate) gen: u32,
    pub(crate) live: bool,
    pub(crate) token: Token,
    pub(crate) op: XferOp,
    pub(crate) peer: sys::fi_addr_t,
    pub(crate) peer_id: u64,
    pub(crate) peer_label: Name,
    pub(crate) segs: Vec<SegOp>,
    pub(crate) next: usize,
    pub(crate) outstanding: u32,
    pub(crate) error: Option<Error>,
    pub(crate) notif: Vec<u8>,
    pub(crate) has_notif: bool,
    pub(crate) notif_sent: bool,
}

impl Xfer {
    pub(crate) fn empty() -> Xfer {
        Xfer {
            gen: 0,
            live: false,
            token: Token(0),
            op: XferOp::Write,
            peer: 0,
            peer_id: 0,
            peer_label: Name::new(),
            segs: Vec::new(),
            next: 0,
            outstanding: 0,
            error: None,
            notif: Vec::new(),
            has_notif: false,
            notif_sent: false,
        }
    }
}

impl FabricTransport {
    pub(crate) fn alloc_op(&mut self, kind: OpKind) -> Option<u32> {
        let op = self.free_ops.pop()?;
        self.ops[op as usize] = kind;
        Some(op)
    }

    pub(crate) fn free_op(&mut self, op: u32) {
        self.ops[op as usize] = OpKind::Free;
        self.free_ops.push(op);
        let peer = std::mem::take(&mut self.op_peer[op as usize]);
        if peer != 0 {
            if let Some(n) = self.in_provider.get_mut(&peer) {
                *n -= 1;
                if *n == 0 {
                    self.in_provider.remove(&peer);
                }
            }
        }
    }

    /// Whether peer `peer_id` has as many operations with the provider as
    /// it may (see [`PEER_WINDOW_SOCKETS`](crate::transport::PEER_WINDOW_SOCKETS)).
    pub(crate) fn window_full(&self, peer_id: u64) -> bool {
        self.peer_window
            .is_some_and(|w| self.in_provider.get(&peer_id).copied().unwrap_or(0) >= w)
    }

    /// Counts operation `op`, just handed to the provider, against peer
    /// `peer_id` until [`free_op`](Self::free_op).
    pub(crate) fn window_take(&mut self, op: u32, peer_id: u64) {
        if self.peer_window.is_some() {
            self.op_peer[op as usize] = peer_id;
            *self.in_provider.entry(peer_id).or_insert(0) += 1;
        }
    }

    /// Issues the not yet issued segments of transfer `slot` until the
    /// provider or the operation pool pushes back. Returns the error of a
    /// failed issue.
    pub(crate) fn issue(&mut self, slot: u32) -> Result<(), Error> {
        loop {
            let x = &self.xfers[slot as usize];
            if x.next >= x.segs.len() || x.error.is_some() {
                return Ok(());
            }
            if self.given_up.contains(&x.peer_id) {
                // Its address may already belong to another peer.
                let x = &mut self.xfers[slot as usize];
                x.error = Some(Error::disconnected(""));
                x.next = x.segs.len();
                return Ok(());
            }
            let seg = x.segs[x.next];
            let (peer, peer_id, op_kind, gen) = (x.peer, x.peer_id, x.op, x.gen);
            if self.window_full(peer_id) {
                return Ok(());
            }
            let Some(op) = self.alloc_op(OpKind::Rma {
                xfer: slot,
                gen,
                seg: x.next as u32,
            }) else {
                return Ok(());
            };
            let ret = self.fabric.rma(
                op_kind,
                seg.local,
                seg.len,
                seg.desc,
                peer,
                seg.remote,
                seg.key,
                self.ctxs.ptr(op),
            );
            if ret == EAGAIN {
                self.free_op(op);
                return Ok(());
            }
            if ret != 0 {
                self.free_op(op);
                let x = &mut self.xfers[slot as usize];
                let what = if op_kind == XferOp::Write {
                    "fi_writemsg"
                } else {
                    "fi_readmsg"
                };
                let e = fi_error(
                    ret,
                    &format!("{what} of segment at {:#x}+{}", seg.local, seg.len),
                );
                x.error = Some(e.clone());
                x.next = x.segs.len();
                return Err(e);
            }
            self.window_take(op, peer_id);
            let x = &mut self.xfers[slot as usize];
            x.outstanding += 1;
            x.next += 1;
        }
    }

    /// Finishes what can be finished among the active transfers.
    pub(crate) fn advance(&mut self) {
        let mut i = 0;
        while i < self.active.len() {
            let slot = self.active[i];
            if self.xfers[slot as usize].error.is_none() {
                if let Err(e) = self.issue(slot) {
                    log::debug!(
                        "LIBFABRIC: transfer {:?} failed: {e}",
                        self.xfers[slot as usize].token
                    );
                }
            }
            let x = &self.xfers[slot as usize];
            let data_done = x.outstanding == 0 && (x.next >= x.segs.len() || x.error.is_some());
            if !data_done {
                i += 1;
                continue;
            }
            if x.error.is_none() && x.has_notif && !x.notif_sent {
                self.send_xfer_notification(slot);
                i += 1;
                continue;
            }
            self.finish(slot, i);
        }
    }

    /// Gives up on transfer `slot`: its operations become orphans (their
    /// memory stays in use until the provider reports them), its peer is
    /// given up on, and it finishes with `error`.
    pub(crate) fn abandon_slot(&mut self, slot: u32, error: Error, why: &str) {
        let (gen, peer) = {
            let x = &self.xfers[slot as usize];
            (x.gen, x.peer)
        };
        for op in 0..self.ops.len() as u32 {
            // A notification's send buffer stays with the orphaned
            // operation; it is reused only after the completion, which
            // frees the op and gives the buffer back. An RMA operation
            // keeps the range of application memory it may still touch.
            let orphan = match self.ops[op as usize] {
                OpKind::XferNotif { xfer, gen: g, buf } if xfer == slot && g == gen => {
                    OpKind::Orphan {
                        buf: Some(buf),
                        local: 0,
                        len: 0,
                        peer,
                    }
                }
                OpKind::Rma { xfer, gen: g, seg } if xfer == slot && g == gen => {
                    let s = self.xfers[slot as usize].segs[seg as usize];
                    OpKind::Orphan {
                        buf: None,
                        local: s.local,
                        len: s.len,
                        peer,
                    }
                }
                _ => continue,
            };
            self.ops[op as usize] = orphan;
            self.fabric.cancel(self.ctxs.ptr(op));
        }
        // A notification still queued is never sent; its buffer goes back.
        let mut i = 0;
        while i < self.pending_sends.len() {
            if self.pending_sends[i].xfer == Some((slot, gen)) {
                if let Some(p) = self.pending_sends.remove(i) {
                    self.free_sends.push(p.buf);
                }
            } else {
                i += 1;
            }
        }
        let x = &self.xfers[slot as usize];
        log::warn!(
            "LIBFABRIC: {} to {} {why}; the peer is given up on until it is connected again",
            x.op.name(),
            x.peer_label
        );
        let (peer_id, label) = (x.peer_id, x.peer_label.clone());
        self.give_up(peer, peer_id, &label);
        let x = &mut self.xfers[slot as usize];
        x.outstanding = 0;
        x.next = x.segs.len();
        x.error = Some(error);
        let idx = self
            .active
            .iter()
            .position(|&s| s == slot)
            .expect("an abandoned transfer is active");
        self.finish(slot, idx);
    }

    /// Reports transfer `slot` (at `active[idx]`) and frees its slot.
    pub(crate) fn finish(&mut self, slot: u32, idx: usize) {
        self.active.swap_remove(idx);
        let x = &mut self.xfers[slot as usize];
        let result = match x.error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        };
        x.live = false;
        x.segs.clear();
        x.notif.clear();
        self.done.push_back(Completion {
            token: x.token,
            result,
        });
        self.free_xfers.push(slot);
    }

    /// [`Transport::post`](kvxfer_core::Transport::post).
    pub(crate) fn post_xfer(
        &mut self,
        op: XferOp,
        peer: &FabricPeer,
        segments: Segments<'_, FabricReg, FabricRemoteKey>,
        notification: Option<&[u8]>,
        token: Token,
    ) -> Result<PostStatus, Error> {
        self.check_send(peer, notification.map_or(0, <[u8]>::len))?;
        for (i, s) in segments.iter().enumerate() {
            let ok_local = s.local.region.contains(s.local_addr, s.len);
            let ok_remote = s.remote_addr >= s.remote_region_addr;
            if s.len == 0 || !ok_local || !ok_remote || usize::try_from(s.len).is_err() {
                return Err(Error::backend(
                    BACKEND,
                    -(sys::FI_EINVAL as i64),
                    &format!(
                        "segment {i}: local {:#x}+{} remote {:#x} is outside its registrations",
                        s.local_addr, s.len, s.remote_addr
                    ),
                ));
            }
        }
        let Some(slot) = self.free_xfers.pop() else {
            return Err(Error::CapacityExceeded {
                what: "transfers",
                capacity: self.config.max_transfers as u32,
                setting: "",
            });
        };
        let max_msg = self.max_msg;
        let x = &mut self.xfers[slot as usize];
        x.gen = x.gen.wrapping_add(1);
        x.live = true;
        x.token = token;
        x.op = op;
        x.peer = peer.addr;
        x.peer_id = peer.id;
        x.peer_label = peer.label.clone();
        x.segs.clear();
        x.next = 0;
        x.outstanding = 0;
        x.error = None;
        x.notif.clear();
        x.has_notif = notification.is_some();
        x.notif_sent = false;
        if let Some(n) = notification {
            x.notif.extend_from_slice(n);
        }
        for s in segments {
            let base = if s.remote.virt_addr {
                s.remote_addr
            } else {
                s.remote_addr - s.remote_region_addr
            };
            let mut off = 0u64;
            while off < s.len {
                let len = (s.len - off).min(max_msg);
                x.segs.push(SegOp {
                    local: s.local_addr + off,
                    len,
                    desc: s.local.mr.desc(),
                    remote: base + off,
                    key: s.remote.key,
                });
                off += len;
            }
        }
        self.active.push(slot);
        if let Err(e) = self.issue(slot) {
            if self.xfers[slot as usize].outstanding == 0 {
                // Nothing reached the provider: refuse the post outright.
                let idx = self
                    .active
                    .iter()
                    .position(|&s| s == slot)
                    .expect("just pushed");
                self.active.swap_remove(idx);
                let x = &mut self.xfers[slot as usize];
                x.live = false;
                x.error = None;
                x.segs.clear();
                self.free_xfers.push(slot);
                return Err(e);
            }
        }
        Ok(PostStatus::InProgress)
    }
}
