//! Endpoints, and what waits for UCX to let go: closes, forced closes,
//! cancelled operations ("zombies") and the memory and keys they use.

use std::cell::UnsafeCell;
use std::ffi::c_void;
use std::ptr;
use std::time::{Duration, Instant};

use kvxfer_core::Error;
use ucx_sys as sys;

use kvxfer_core::Region;

use crate::ffi::{MemHandle, RKey, UCS_INPROGRESS, UCS_OK};
use crate::status::status_text;
use crate::transport::{UcxPeer, UcxTransport};

pub(crate) struct RegEntry {
    pub(crate) memh: MemHandle,
    pub(crate) region: Region,
    pub(crate) packed: Vec<u8>,
}

/// An endpoint and what its error handler learnt. Boxed so that the error
/// handler's `arg` stays valid while the box lives.
pub(crate) struct EpState {
    /// Null once the endpoint was force-closed by an abandon.
    pub(crate) ep: sys::ucp_ep_h,
    /// `UCS_OK`, or the status the error handler reported (or
    /// `UCS_ERR_ENDPOINT_TIMEOUT` after a transfer on it was abandoned).
    pub(crate) failed: sys::ucs_status_t,
    /// The force close started by an abandon, until UCX finished it.
    pub(crate) closing: *mut c_void,
}

pub(crate) struct KeyEntry {
    /// `None` once the key's endpoint was disconnected (the key was
    /// destroyed then, before the endpoint).
    pub(crate) rkey: Option<RKey>,
    pub(crate) ep: u32,
    /// The peer's region the key covers.
    pub(crate) region: Region,
}

impl UcxTransport {
    /// Refuses a notification longer than the configured maximum.
    pub(crate) fn check_note_len(&self, note: &[u8]) -> Result<(), Error> {
        let max = self.config.max_notification;
        if note.len() > max as usize {
            return Err(Error::NotificationTooLong {
                len: note.len() as u64,
                max: u64::from(max),
            });
        }
        Ok(())
    }

    /// Looks up the endpoint of `peer`, refusing a failed one.
    pub(crate) fn live_ep(&self, peer: &UcxPeer) -> Result<(u32, sys::ucp_ep_h), Error> {
        if peer.owner != self.owner {
            return Err(self.foreign("peer handle belongs to another UCX transport"));
        }
        let Some(state) = self.ep_state(peer.index) else {
            return Err(self.foreign("peer handle was disconnected"));
        };
        // SAFETY: the state box is live while it is in the table.
        let (ep, failed) = unsafe { ((*state).ep, (*state).failed) };
        if failed != UCS_OK {
            return Err(Error::disconnected(""));
        }
        Ok((peer.index, ep))
    }

    /// Progresses until `done()` or `timeout`; returns whether `done()`.
    pub(crate) fn progress_until(
        &mut self,
        timeout: Duration,
        mut done: impl FnMut(&Self) -> bool,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if done(self) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            if !self.progress() {
                std::thread::yield_now();
            }
        }
    }

    /// Closes an endpoint and waits for the close up to the close timeout:
    /// a flush, or, with peer failure detection, a forced close (which
    /// ends every outstanding request with `UCS_ERR_CANCELED`) when `force`
    /// or when the endpoint failed. An endpoint force-closed earlier
    /// (by an abandon) only has that close waited for.
    pub(crate) fn close_ep(&mut self, state: Box<UnsafeCell<EpState>>, force: bool) {
        let s = state.get();
        // SAFETY: the box is live; nobody else holds a reference.
        let (ep, failed, closing) = unsafe { ((*s).ep, (*s).failed, (*s).closing) };
        let req = if !ep.is_null() {
            let force = self.config.peer_failure_detection && (force || failed != UCS_OK);
            let param = sys::ucp_request_param_t {
                op_attr_mask: sys::UCP_OP_ATTR_FIELD_FLAGS,
                flags: if force {
                    sys::UCP_EP_CLOSE_FLAG_FORCE
                } else {
                    0
                },
                ..Default::default()
            };
            // SAFETY: the endpoint is live and closed exactly once, here
            // (the pointer is nulled right after); callbacks it runs touch
            // only slots and this state through raw pointers.
            let req = unsafe { sys::ucp_ep_close_nbx(ep, &param) };
            // SAFETY: as above.
            unsafe { (*s).ep = ptr::null_mut() };
            if !sys::ucs_ptr_is_ptr(req) {
                if sys::ucs_ptr_is_err(req) {
                    log::debug!(
                        "UCX: closing endpoint: {}",
                        status_text(sys::ucs_ptr_status(req))
                    );
                }
                return;
            }
            req
        } else if !closing.is_null() {
            // SAFETY: as above; the close request is handed over here.
            unsafe { (*s).closing = ptr::null_mut() };
            self.open_closes = self.open_closes.saturating_sub(1);
            closing
        } else {
            return;
        };
        let timeout = self.config.close_timeout;
        // SAFETY (closure): the request is live until freed below.
        let done = self.progress_until(timeout, |_| unsafe {
            sys::ucp_request_check_status(req) != UCS_INPROGRESS
        });
        // SAFETY: the request came from ucp_ep_close_nbx and is freed once;
        // if it is still running UCX releases it when it completes.
        unsafe { sys::ucp_request_free(req) };
        if !done {
            log::warn!("UCX: endpoint close did not finish in {timeout:?}");
            self.graveyard.bury(state);
        }
    }

    /// Marks endpoint `ep_index` failed with `status` (unless it failed
    /// already) and, with peer failure detection, starts its forced close
    /// without waiting: UCX ends its outstanding requests with
    /// `UCS_ERR_CANCELED`, and their transfers fail on a later poll.
    pub(crate) fn force_close(&mut self, ep_index: u32, status: sys::ucs_status_t) {
        let Some(state) = self.ep_state(ep_index) else {
            return;
        };
        // SAFETY: the state box is live while it is in the table; no
        // reference to it is held.
        let ep = unsafe {
            if (*state).failed == UCS_OK {
                (*state).failed = status;
            }
            (*state).ep
        };
        if ep.is_null() || !self.config.peer_failure_detection {
            return;
        }
        let param = sys::ucp_request_param_t {
            op_attr_mask: sys::UCP_OP_ATTR_FIELD_FLAGS,
            flags: sys::UCP_EP_CLOSE_FLAG_FORCE,
            ..Default::default()
        };
        // SAFETY: the endpoint is live and closed once (nulled below, so
        // neither this nor close_ep closes it again); it was created with
        // peer error handling, as a forced close requires. Callbacks run
        // by the call reach slots and states through raw pointers only.
        let req = unsafe { sys::ucp_ep_close_nbx(ep, &param) };
        // SAFETY: the box is live; no reference to it is held.
        unsafe { (*state).ep = ptr::null_mut() };
        if sys::ucs_ptr_is_ptr(req) {
            // SAFETY: as above.
            unsafe { (*state).closing = req };
            self.open_closes += 1;
        } else if sys::ucs_ptr_is_err(req) {
            log::debug!(
                "UCX: force-closing endpoint: {}",
                status_text(sys::ucs_ptr_status(req))
            );
        }
    }

    /// Frees zombie slots UCX has let go of, then (once none is left) the
    /// memory handles and remote keys that waited for them, and finishes
    /// forced closes. Never waits.
    pub(crate) fn reap(&mut self) {
        let mut i = 0;
        while i < self.zombies.len() {
            let index = self.zombies[i];
            // SAFETY: zombie slots are live; only the counter is read.
            if unsafe { (*self.slot_ptr(index)).outstanding } == 0 {
                self.zombies.swap_remove(i);
                self.free_slot(index);
            } else {
                i += 1;
            }
        }
        if self.zombies.is_empty() {
            // No request uses them any more.
            self.deferred_rkeys.release_all();
            self.deferred_unmaps.release_all();
        }
        if self.open_closes == 0 {
            return;
        }
        let done = |req: *mut c_void| {
            // SAFETY: a close request is live until freed, right after
            // this check says it finished.
            !req.is_null() && unsafe { sys::ucp_request_check_status(req) } != UCS_INPROGRESS
        };
        for state in self.eps.iter().map(|(_, s)| s) {
            let s = state.get();
            // SAFETY: the box is live in the table; no reference is held.
            let req = unsafe { (*s).closing };
            if done(req) {
                // SAFETY: finished close request, freed once (nulled).
                unsafe {
                    sys::ucp_request_free(req);
                    (*s).closing = ptr::null_mut();
                }
                self.open_closes = self.open_closes.saturating_sub(1);
            }
        }
        let finished = self.closing.reap(|state| {
            // SAFETY: as above.
            let req = unsafe { (*state.get()).closing };
            if done(req) {
                // SAFETY: finished close request, freed once; the state's
                // error handler can no longer be called, so it may go.
                unsafe { sys::ucp_request_free(req) };
            }
            done(req)
        });
        self.open_closes = self.open_closes.saturating_sub(finished);
    }

    /// Waits (up to the cancel timeout) for the zombies' requests to end;
    /// force-closes the endpoints of those that do not, and waits up to the
    /// close timeout for that.
    pub(crate) fn drain_zombies(&mut self) {
        let all_done = |t: &Self| {
            t.zombies.iter().all(|&z| {
                // SAFETY: zombie slots are live; only the counter is read.
                unsafe { (*t.slot_ptr(z)).outstanding == 0 }
            })
        };
        let timeout = self.config.cancel_timeout;
        if !self.progress_until(timeout, all_done) {
            let mut eps: Vec<u32> = Vec::new();
            for &z in &self.zombies {
                // SAFETY: as above; plain fields only.
                let s = unsafe { &*self.slot_ptr(z) };
                if s.outstanding > 0 && !eps.contains(&s.ep) {
                    eps.push(s.ep);
                }
            }
            for ep in eps {
                log::warn!("UCX: cancelled requests still running after {timeout:?}; closing their endpoint");
                self.force_close(ep, sys::UCS_ERR_CANCELED as sys::ucs_status_t);
            }
            let timeout = self.config.close_timeout;
            self.progress_until(timeout, all_done);
        }
        self.reap();
    }
}
