//! Renewal: a new worker in place of the old, whose destruction closes
//! every connection of the old one.
//!
//! UCX's `tcp` does not close a connection when its endpoint is closed,
//! a forced close included: `uct_tcp_ep_destroy` keeps the socket
//! receiving until the peer's end closes too, and keeps the endpoint for
//! matching the peer's next connection. Bytes of an abandoned WRITE that
//! the peer's kernel still held can then arrive, and be written, after
//! the endpoint was reset. Destroying the worker closes its interfaces
//! and with them every socket; the context, and with it every memory
//! registration and packed key, stays.

use std::time::Instant;

use kvxfer_core::Error;
use ucx_sys as sys;

use crate::ffi::inline::WRITE_AM_ID;
use crate::ffi::{install_handlers, Worker};
use crate::transport::{UcxTransport, WORKER_DRAIN};
use crate::BACKEND;

impl UcxTransport {
    /// Whether nothing of this transport is still held by UCX: no
    /// transfer or notification in flight, no cancelled or abandoned
    /// request, no close running, no acknowledgement being sent.
    fn quiet(&self) -> bool {
        self.active.is_empty()
            && self.zombies.is_empty()
            && self.open_closes == 0
            && self.closing.is_empty()
            && !self.inline_state().sending()
    }

    /// See [`Transport::renew`](kvxfer_core::Transport::renew): every
    /// endpoint must have been handed back; what UCX still holds of them
    /// (forced closes, stand-alone notifications, cancelled requests) is
    /// waited for up to the close timeout. Transfers found in flight end,
    /// failed with [`Error::RemoteDisconnected`]; their completions stay
    /// queued for [`poll`](kvxfer_core::Transport::poll).
    pub(crate) fn renew_worker(&mut self) -> Result<(), Error> {
        if !self.eps.is_empty() {
            return Err(Error::backend(
                BACKEND,
                i64::from(sys::UCS_ERR_BUSY as sys::ucs_status_t),
                &format!(
                    "renew: {} connection(s) still open; hand them back first",
                    self.eps.len()
                ),
            ));
        }
        let timeout = self.config.close_timeout;
        let deadline = Instant::now() + timeout;
        let mut ended = Vec::new();
        loop {
            if let Some(c) = kvxfer_core::Transport::poll(self) {
                ended.push(c);
                continue;
            }
            if self.quiet() || Instant::now() >= deadline {
                break;
            }
            std::thread::yield_now();
        }
        self.completions.extend(ended);
        if !self.quiet() {
            return Err(Error::backend(
                BACKEND,
                i64::from(sys::UCS_ERR_BUSY as sys::ucs_status_t),
                &format!("renew: requests still running after {timeout:?}"),
            ));
        }
        // Keys of the old endpoints go before the worker.
        self.deferred_rkeys.release_all();
        self.deferred_unmaps.release_all();
        let fresh = match self.spare.take() {
            Some(w) => w,
            None => Worker::new(self.worker.context())?,
        };
        let address = match fresh.address() {
            Ok(a) => a,
            Err(e) => {
                self.spare = Some(fresh);
                return Err(e);
            }
        };
        let mut old = std::mem::replace(&mut self.worker, fresh);
        // No small WRITE is answered from the old worker any more (an
        // answer would be a request of it); notifications still arrive
        // into the queue. Then progress it a short, fixed time, as at
        // drop, so that wire-up replies queued on it go out before it is
        // destroyed (UCX 1.13 asserts otherwise).
        old.clear_am_handler(WRITE_AM_ID);
        let drain = Instant::now() + WORKER_DRAIN;
        while Instant::now() < drain {
            if !old.progress() {
                std::thread::yield_now();
            }
        }
        drop(old);
        // Their error handlers went with the old worker.
        self.graveyard.release_all();
        self.address = address;
        install_handlers(self)?;
        self.renewals += 1;
        self.make_spare();
        log::debug!(
            "UCX: worker renewed, address of {} bytes",
            self.address.len()
        );
        Ok(())
    }

    /// Makes the spare worker if [`UcxConfig::spare_worker`](crate::UcxConfig::spare_worker)
    /// asks for one and there is none (it cannot be made while the
    /// network device is down: tried again later).
    pub(crate) fn make_spare(&mut self) {
        if !self.config.spare_worker || self.spare.is_some() {
            return;
        }
        match Worker::new(self.worker.context()) {
            Ok(w) => self.spare = Some(w),
            Err(e) => log::debug!("UCX: no spare worker now: {e}"),
        }
    }

    /// How many times this transport was renewed.
    pub fn renewals(&self) -> u64 {
        self.renewals
    }
}
