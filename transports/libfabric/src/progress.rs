//! Progress: reading the completion queue and applying each completion
//! to the transfer, notification or receive it belongs to.

use std::ffi::c_void;

use kvxfer_core::Error;
use libfabric_sys as sys;

use crate::fabric::strerror;
use crate::transport::{EAGAIN, EAVAIL};
use crate::xfer::{OpKind, Xfer};
use crate::{FabricTransport, BACKEND};

/// Batches read at most to empty the completion queue before removals.
const REMOVAL_DRAIN_ROUNDS: usize = 4096;

impl FabricTransport {
    /// Reads the completion queue until it is empty (bounded), then makes
    /// the removals from the address vector asked meanwhile
    /// ([`process_removals`](Self::process_removals)).
    pub(crate) fn read_cq(&mut self) {
        if !self.fabric.is_open() || self.in_read_cq {
            return;
        }
        self.in_read_cq = true;
        // Removals need the queue empty: then every operation closed with
        // its connection has been reported (see process_removals).
        let mut drained = false;
        let mut rounds = 0;
        while rounds < 64 || (!self.removals.is_empty() && rounds < REMOVAL_DRAIN_ROUNDS) {
            rounds += 1;
            let n = self.fabric.cq_read(&mut self.cq_entries);
            if n > 0 {
                for i in 0..n as usize {
                    let (ctx, len) = self.cq_entries.entry(i);
                    self.on_completion(ctx, len, None);
                }
                if (n as usize) < self.cq_entries.capacity() && self.removals.is_empty() {
                    break;
                }
            } else if n == EAVAIL {
                let Some(err) = self.fabric.cq_readerr() else {
                    break;
                };
                self.on_completion(err.ctx, err.len, Some((err.err, err.prov_errno, err.text)));
            } else {
                if n == EAGAIN {
                    drained = true;
                } else {
                    log::warn!("LIBFABRIC: fi_cq_read failed: {}", strerror(n));
                }
                break;
            }
        }
        self.in_read_cq = false;
        if drained && !self.removals.is_empty() {
            self.process_removals();
        }
    }

    /// The error of a failed operation of `xfer`. `prov_errno_is_errno`:
    /// the provider reports socket errors as its `prov_errno` (tcp,
    /// sockets), so a cancelled operation with `ENOTCONN` there means the
    /// peer is gone. So does any operation of a live transfer that comes
    /// back `FI_ECANCELED`: kvxfer cancels only operations of abandoned
    /// transfers, so the provider cancelled it itself, tearing down the
    /// connection (`tcp;ofi_rxm` does so to a killed peer's operations,
    /// with `prov_errno` ENOENT).
    pub(crate) fn xfer_error(
        xfer: &Xfer,
        errno: i32,
        prov_errno: i32,
        prov_errno_is_errno: bool,
        text: &str,
    ) -> Error {
        let gone = |e: u32| {
            [
                sys::FI_ECONNRESET,
                sys::FI_ECONNREFUSED,
                sys::FI_ECONNABORTED,
                sys::FI_ENOTCONN,
                sys::FI_EHOSTUNREACH,
                libc::EPIPE as u32,
            ]
            .contains(&e)
        };
        if gone(errno.unsigned_abs())
            || errno.unsigned_abs() == sys::FI_ECANCELED
            || (prov_errno_is_errno && gone(prov_errno.unsigned_abs()))
        {
            // Left empty: the engine fills in the peer's agent name, as
            // for every transport; the address is in the debug log.
            log::debug!(
                "LIBFABRIC: {} to {} failed: peer gone",
                xfer.op.name(),
                xfer.peer_label
            );
            return Error::disconnected("");
        }
        Error::backend(
            BACKEND,
            -(errno.unsigned_abs() as i64),
            &format!("{} {text}", xfer.op.name()),
        )
    }

    pub(crate) fn on_completion(
        &mut self,
        ctx: *mut c_void,
        len: usize,
        error: Option<(i32, i32, String)>,
    ) {
        let Some(op) = self.ctxs.index_of(ctx) else {
            log::warn!("LIBFABRIC: completion with unknown context {ctx:p}");
            return;
        };
        let kind = self.ops[op as usize];
        match kind {
            OpKind::Free => log::warn!("LIBFABRIC: completion for an unused context"),
            OpKind::Probe { .. } => self.free_op(op),
            OpKind::Orphan { buf, .. } => {
                self.free_op(op);
                if let Some(buf) = buf {
                    self.free_sends.push(buf);
                }
            }
            OpKind::Rma { xfer, gen, .. } | OpKind::XferNotif { xfer, gen, .. } => {
                self.free_op(op);
                if let OpKind::XferNotif { buf, .. } = kind {
                    self.free_sends.push(buf);
                }
                let x = &mut self.xfers[xfer as usize];
                if !x.live || x.gen != gen {
                    return;
                }
                x.outstanding -= 1;
                if let Some((errno, prov_errno, text)) = error {
                    let mut gone = None;
                    if x.error.is_none() {
                        let e = if self.given_up.contains(&x.peer_id) {
                            // Flushed by the removal of its peer.
                            Error::disconnected("")
                        } else {
                            Self::xfer_error(x, errno, prov_errno, self.prov_errno_is_errno, &text)
                        };
                        if matches!(e, Error::RemoteDisconnected { .. }) {
                            gone = Some((x.peer, x.peer_id, x.peer_label.clone()));
                        }
                        x.error = Some(e);
                    }
                    // Stop issuing further segments.
                    x.next = x.segs.len();
                    // A dead peer is given up on as after an abandon: later
                    // posts to it fail at once, not at their deadline.
                    if let Some((addr, id, label)) = gone {
                        self.give_up(addr, id, &label);
                    }
                }
            }
            OpKind::Notif { buf, .. } => {
                self.free_op(op);
                self.free_sends.push(buf);
                if let Some((_, _, text)) = error {
                    log::warn!("LIBFABRIC: a notification could not be sent: {text}");
                }
            }
            OpKind::Recv { buf } => match error {
                None => self.ready.push_back((buf, len.min(self.recv.slot()))),
                Some((errno, _, text)) => {
                    if errno.unsigned_abs() != sys::FI_ECANCELED {
                        // A notification that did not arrive (longer than
                        // this side accepts, or broken on the way): the
                        // application learns it from poll_notification.
                        log::warn!("LIBFABRIC: notification receive failed: {text}");
                        self.lost_notes += 1;
                        self.repost.push(buf);
                    }
                }
            },
        }
    }
}
