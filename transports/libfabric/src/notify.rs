//! Notifications: the receive buffers kept posted, the send buffers and
//! the queue of sends waiting for the provider, in issue order.

use kvxfer_core::Error;
use libfabric_sys as sys;

use crate::fabric::fi_error;
use crate::peers::FabricPeer;
use crate::transport::EAGAIN;
use crate::xfer::OpKind;
use crate::FabricTransport;

/// A notification waiting for a send slot in the provider. Notifications
/// leave in the order they were issued: one issued while any other to the
/// same peer waits here is queued behind it.
#[derive(Debug)]
pub(crate) struct PendingSend {
    pub(crate) peer: sys::fi_addr_t,
    pub(crate) peer_id: u64,
    pub(crate) buf: u32,
    pub(crate) len: usize,
    /// The transfer (slot, generation) this is the notification of, which
    /// counts it among its outstanding operations; `None` for a standalone
    /// notification.
    pub(crate) xfer: Option<(u32, u32)>,
}

impl PendingSend {
    /// The operation that sends it.
    pub(crate) fn op_kind(&self) -> OpKind {
        match self.xfer {
            Some((xfer, gen)) => OpKind::XferNotif {
                xfer,
                gen,
                buf: self.buf,
            },
            None => OpKind::Notif {
                buf: self.buf,
                peer: self.peer,
            },
        }
    }
}

impl FabricTransport {
    /// Posts the receive buffers listed in `repost`.
    pub(crate) fn post_receives(&mut self) -> Result<(), Error> {
        while let Some(&b) = self.repost.last() {
            let op = self.recv_ops[b as usize];
            let ret = self.fabric.recv(&self.recv, b, self.ctxs.ptr(op));
            if ret == EAGAIN {
                return Ok(());
            }
            if ret != 0 {
                return Err(fi_error(ret, "fi_recv (notification buffer)"));
            }
            self.repost.pop();
        }
        Ok(())
    }

    /// Sends `len` bytes of send buffer `buf` to `peer` (id `peer_id`) with
    /// operation kind `kind`. Returns `Ok(false)` when the provider asks to
    /// retry or the peer's window is full.
    pub(crate) fn try_send(
        &mut self,
        peer: sys::fi_addr_t,
        peer_id: u64,
        buf: u32,
        len: usize,
        kind: OpKind,
    ) -> Result<bool, Error> {
        if self.window_full(peer_id) {
            return Ok(false);
        }
        let Some(op) = self.alloc_op(kind) else {
            return Ok(false);
        };
        let ret = self
            .fabric
            .send(&self.send, buf, len, peer, self.ctxs.ptr(op));
        if ret == EAGAIN {
            self.free_op(op);
            return Ok(false);
        }
        if ret != 0 {
            self.free_op(op);
            return Err(fi_error(ret, "fi_send (notification)"));
        }
        self.window_take(op, peer_id);
        Ok(true)
    }

    /// Whether a notification to peer `peer_id` waits in `pending_sends`.
    pub(crate) fn queued_for(&self, peer_id: u64) -> bool {
        self.pending_sends.iter().any(|p| p.peer_id == peer_id)
    }

    /// A queued notification that will not be sent: its buffer goes back,
    /// and a transfer it belongs to stops waiting for it, failing with
    /// `error`.
    pub(crate) fn drop_pending(&mut self, p: PendingSend, error: Error) {
        self.free_sends.push(p.buf);
        if let Some((xfer, gen)) = p.xfer {
            let x = &mut self.xfers[xfer as usize];
            if x.live && x.gen == gen {
                x.outstanding = x.outstanding.saturating_sub(1);
                if x.error.is_none() {
                    x.error = Some(error);
                }
            }
        }
    }

    pub(crate) fn flush_pending_sends(&mut self) {
        while let Some(p) = self.pending_sends.front() {
            let (peer, peer_id, buf, len, kind) = (p.peer, p.peer_id, p.buf, p.len, p.op_kind());
            if self.given_up.contains(&p.peer_id) {
                log::warn!("LIBFABRIC: a queued notification is dropped: its peer was given up on");
                if let Some(p) = self.pending_sends.pop_front() {
                    self.drop_pending(p, Error::disconnected(""));
                }
                continue;
            }
            match self.try_send(peer, peer_id, buf, len, kind) {
                Ok(true) => {
                    self.pending_sends.pop_front();
                }
                Ok(false) => return,
                Err(e) => {
                    log::warn!("LIBFABRIC: a queued notification could not be sent: {e}");
                    if let Some(p) = self.pending_sends.pop_front() {
                        self.drop_pending(p, e);
                    }
                }
            }
        }
    }

    /// Issues the notification of transfer `slot`, whose data has been
    /// delivered: sent now, or queued in `pending_sends` behind the
    /// notifications to the same peer issued before it (or when the
    /// provider pushes back), so that none issued later overtakes it.
    /// Either way it counts among the transfer's outstanding operations
    /// until its send completes.
    pub(crate) fn send_xfer_notification(&mut self, slot: u32) {
        let Some(buf) = self.free_sends.pop() else {
            return;
        };
        let x = &self.xfers[slot as usize];
        let (peer, peer_id, gen, len) = (x.peer, x.peer_id, x.gen, x.notif.len());
        self.send.write(buf, &x.notif);
        let pending = PendingSend {
            peer,
            peer_id,
            buf,
            len,
            xfer: Some((slot, gen)),
        };
        let sent = if self.queued_for(peer_id) {
            Ok(false)
        } else {
            self.try_send(peer, peer_id, buf, len, pending.op_kind())
        };
        match sent {
            Ok(sent) => {
                if !sent {
                    self.pending_sends.push_back(pending);
                }
                let x = &mut self.xfers[slot as usize];
                x.notif_sent = true;
                x.outstanding += 1;
            }
            Err(e) => {
                self.free_sends.push(buf);
                self.xfers[slot as usize].error = Some(e);
            }
        }
    }

    /// [`Transport::send_notification`](kvxfer_core::Transport::send_notification).
    pub(crate) fn send_note(&mut self, peer: &FabricPeer, msg: &[u8]) -> Result<(), Error> {
        self.check_send(peer, msg.len())?;
        if self.free_sends.is_empty() {
            self.read_cq();
        }
        let Some(buf) = self.free_sends.pop() else {
            return Err(Error::CapacityExceeded {
                what: "notifications",
                capacity: self.send.count() as u32,
                setting: "",
            });
        };
        self.send.write(buf, msg);
        let pending = PendingSend {
            peer: peer.addr,
            peer_id: peer.id,
            buf,
            len: msg.len(),
            xfer: None,
        };
        // Keep the order of notifications to the same peer: behind any
        // queued one.
        let queued = !self.pending_sends.is_empty();
        let sent = if queued {
            Ok(false)
        } else {
            self.try_send(peer.addr, peer.id, buf, msg.len(), pending.op_kind())
        };
        match sent {
            Ok(true) => Ok(()),
            Ok(false) => {
                self.pending_sends.push_back(pending);
                if queued {
                    self.flush_pending_sends();
                }
                Ok(())
            }
            Err(e) => {
                self.free_sends.push(buf);
                Err(e)
            }
        }
    }

    /// [`Transport::poll_notification`](kvxfer_core::Transport::poll_notification).
    pub(crate) fn poll_note(&mut self, buf: &mut [u8]) -> Option<Result<usize, Error>> {
        if self.ready.is_empty() {
            self.read_cq();
        }
        if self.lost_notes > 0 {
            let count = std::mem::take(&mut self.lost_notes);
            return Some(Err(Error::NotificationDropped { len: 0, count }));
        }
        let &(b, len) = self.ready.front()?;
        if len > buf.len() {
            return Some(Err(Error::BufferTooSmall {
                needed: len as u64,
                available: buf.len() as u64,
            }));
        }
        // Buffer b has completed its receive and is not posted.
        self.recv.read(b, &mut buf[..len]);
        self.ready.pop_front();
        self.repost.push(b);
        if let Err(e) = self.post_receives() {
            log::warn!("LIBFABRIC: re-posting a notification buffer failed: {e}");
        }
        Some(Ok(len))
    }
}
