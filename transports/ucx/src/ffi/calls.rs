//! Calls on requests and endpoints, and access to the state UCX's
//! callbacks write (operation slots, endpoint states, the notification
//! queue, the small-WRITE state).
//!
//! Callbacks run only inside UCX calls, and every UCX call that may run
//! one is made here by a method taking the transport mutably. The
//! accessors borrow the transport (`&self` or `&mut self`), so no
//! reference they give out can be held across such a call: that is what
//! makes them sound.

use std::cell::UnsafeCell;
use std::ffi::c_void;
use std::ptr;

use kvxfer_core::{MemKind, Segments, XferOp};
use kvxfer_transport_common::NoteQueue;
use ucx_sys as sys;

use super::inline::{self, Inline};
use super::{ep_failed, request_done, status_text, RKey, UCS_INPROGRESS, UCS_OK};
use crate::endpoint::EpState;
use crate::slot::{OpSlot, Phase};
use crate::transport::{UcxReg, UcxRemoteKey, UcxTransport};
use crate::NOTIFICATION_AM_ID;

impl UcxTransport {
    fn slot_ptr(&self, index: u32) -> *mut OpSlot {
        self.slots[index as usize].get()
    }

    fn ep_ptr(&self, index: u32) -> Option<*mut EpState> {
        self.eps.get(index).map(|b| b.get())
    }

    /// Slot `index`, to read.
    pub(crate) fn slot(&self, index: u32) -> &OpSlot {
        // SAFETY: slots live as long as the transport; callbacks write
        // them only inside calls that need `&mut self` (module docs).
        unsafe { &*self.slot_ptr(index) }
    }

    /// Slot `index`, to change.
    pub(crate) fn slot_mut(&mut self, index: u32) -> &mut OpSlot {
        // SAFETY: as in `slot`; `&mut self` excludes every other reference.
        unsafe { &mut *self.slot_ptr(index) }
    }

    /// The state of endpoint `index`, if it is in the table.
    pub(crate) fn ep(&self, index: u32) -> Option<&EpState> {
        // SAFETY: the box lives while it is in the table; its error
        // handler writes it only inside calls that need `&mut self`.
        self.ep_ptr(index).map(|p| unsafe { &*p })
    }

    /// The state of endpoint `index`, to change.
    pub(crate) fn ep_mut(&mut self, index: u32) -> Option<&mut EpState> {
        // SAFETY: as in `ep`; `&mut self` excludes every other reference.
        self.ep_ptr(index).map(|p| unsafe { &mut *p })
    }

    /// Requests of slot `index` UCX has not completed yet.
    pub(crate) fn outstanding(&self, index: u32) -> u32 {
        self.slot(index).outstanding
    }

    /// The state of small WRITEs, to read.
    pub(crate) fn inline_state(&self) -> &Inline {
        // SAFETY: its handlers run only inside progress, which needs
        // `&mut self`, excluded while the reference lives.
        unsafe { &*self.inline.get() }
    }

    /// The state of small WRITEs, to change.
    pub(crate) fn inline_mut(&mut self) -> &mut Inline {
        self.inline.get_mut()
    }

    /// The queue of received notifications, to read.
    pub(crate) fn notes(&self) -> &NoteQueue {
        // SAFETY: as in `inline_state`.
        unsafe { &*self.notes.get() }
    }

    /// The queue of received notifications, to change.
    pub(crate) fn notes_mut(&mut self) -> &mut NoteQueue {
        self.notes.get_mut()
    }

    /// Hands the completed requests of slot `index` back to UCX; returns
    /// whether none is left in flight.
    pub(crate) fn release_requests(&mut self, index: u32) -> bool {
        let reqs = &mut self.slot_mut(index).requests;
        reqs.retain(|&req| {
            // SAFETY: `req` was returned by a `*_nbx` call and not freed
            // yet (it is freed only here, once, when it left the list); no
            // callback runs in this call (it makes no progress).
            let done = unsafe { sys::ucp_request_check_status(req) } != sys::UCS_INPROGRESS;
            if done {
                // SAFETY: as above; the request is complete, so its
                // callback has run and will not run again.
                unsafe { sys::ucp_request_free(req) };
            }
            !done
        });
        reqs.is_empty()
    }

    /// Request parameters whose callback reports to slot `index`.
    fn request_param(&self, index: u32, flags: u32) -> sys::ucp_request_param_t {
        let mut p = sys::ucp_request_param_t {
            op_attr_mask: sys::UCP_OP_ATTR_FIELD_CALLBACK | sys::UCP_OP_ATTR_FIELD_USER_DATA,
            user_data: self.slot_ptr(index).cast::<c_void>(),
            ..Default::default()
        };
        p.cb.send = Some(request_done);
        if flags != 0 {
            p.op_attr_mask |= sys::UCP_OP_ATTR_FIELD_FLAGS;
            p.flags = flags;
        }
        p
    }

    /// Records what a `*_nbx` call returned for slot `index`; false if it
    /// failed at once.
    fn track(&mut self, index: u32, ret: sys::ucs_status_ptr_t) -> bool {
        // The request's callback cannot have run yet: UCX calls it only
        // from progress, after this call returned it.
        let slot = self.slot_mut(index);
        if sys::ucs_ptr_is_ptr(ret) {
            slot.outstanding += 1;
            slot.requests.push(ret);
            true
        } else if sys::ucs_ptr_is_err(ret) {
            if slot.status == UCS_OK {
                slot.status = sys::ucs_ptr_status(ret);
            }
            false
        } else {
            true
        }
    }

    /// The live (not closed) handle of endpoint `index`.
    fn live_handle(&self, index: u32) -> Option<sys::ucp_ep_h> {
        self.ep(index).map(|e| e.ep).filter(|ep| !ep.is_null())
    }

    /// Marks slot `index` failed: its endpoint is gone.
    fn fail_slot(&mut self, index: u32) {
        let slot = self.slot_mut(index);
        if slot.status == UCS_OK {
            slot.status = sys::UCS_ERR_ENDPOINT_TIMEOUT as sys::ucs_status_t;
        }
    }

    /// Issues the endpoint flush of a WRITE of slot `index`.
    pub(crate) fn issue_flush(&mut self, index: u32) {
        let Some(ep) = self.live_handle(self.slot(index).ep) else {
            return self.fail_slot(index);
        };
        let param = self.request_param(index, 0);
        // SAFETY: the endpoint is live (in the table, not closed); param is
        // valid for the call and its user_data slot outlives the request.
        let ret = unsafe { sys::ucp_ep_flush_nbx(ep, &param) };
        self.track(index, ret);
    }

    /// Sends the notification of slot `index` as an eager active message.
    pub(crate) fn issue_note(&mut self, index: u32) {
        let Some(ep) = self.live_handle(self.slot(index).ep) else {
            return self.fail_slot(index);
        };
        let param = self.request_param(index, sys::UCP_AM_SEND_FLAG_EAGER);
        let (buf, len) = {
            let s = self.slot(index);
            (s.note.as_ptr(), s.note.len())
        };
        // SAFETY: the endpoint is live; header is empty; the buffer lives in
        // the slot, which is not reused before its outstanding count is
        // zero, so it stays valid until completion; param is valid.
        let ret = unsafe {
            sys::ucp_am_send_nbx(
                ep,
                NOTIFICATION_AM_ID,
                ptr::null(),
                0,
                buf.cast::<c_void>(),
                len,
                &param,
            )
        };
        self.track(index, ret);
    }

    /// Whether `[addr, +len)` lies in registration `reg` of this transport.
    fn registered(&self, reg: &UcxReg, addr: u64, len: u64) -> bool {
        reg.owner == self.owner
            && (self.regs.get(reg.index)).is_some_and(|r| r.region.contains(addr, len))
    }

    /// Sends a small WRITE of `[local, +len)` (inside registration `reg`)
    /// to `remote` as one active message the target copies and answers
    /// (see [`inline`]).
    pub(crate) fn issue_inline(
        &mut self,
        index: u32,
        reg: &UcxReg,
        local: u64,
        len: u64,
        remote: u64,
    ) {
        let live = self.live_handle(self.slot(index).ep);
        let (Some(ep), true) = (live, self.registered(reg, local, len)) else {
            return self.fail_slot(index);
        };
        let hdr = {
            let s = self.slot_mut(index);
            s.inline_hdr = inline::write_header(index, s.token.0, remote);
            s.phase = Phase::Flush;
            s.awaiting_ack = true;
            s.inline_hdr.as_ptr()
        };
        let param = self.request_param(
            index,
            sys::UCP_AM_SEND_FLAG_EAGER | sys::UCP_AM_SEND_FLAG_REPLY,
        );
        // SAFETY: the endpoint is live; the header lives in the boxed slot
        // and the data in a registration (checked above) the core keeps,
        // both until the request completes (the slot is not freed before);
        // param's user_data slot outlives the request.
        let ret = unsafe {
            sys::ucp_am_send_nbx(
                ep,
                inline::WRITE_AM_ID,
                hdr.cast::<c_void>(),
                inline::WRITE_HDR,
                local as usize as *const c_void,
                len as usize,
                &param,
            )
        };
        self.track(index, ret);
    }

    /// Issues one put (WRITE) or get (READ) per segment for slot `index`,
    /// stopping at the first that fails at once. A segment outside its
    /// local registration or its key's region (the caller checked them
    /// all) fails the slot instead.
    pub(crate) fn issue_segments(
        &mut self,
        index: u32,
        op: XferOp,
        segments: Segments<'_, UcxReg, UcxRemoteKey>,
    ) {
        let ep_index = self.slot(index).ep;
        let Some(ep) = self.live_handle(ep_index) else {
            return self.fail_slot(index);
        };
        let mut param = self.request_param(index, 0);
        for seg in segments {
            let key = (self.keys.get(seg.remote.index)).filter(|k| {
                seg.remote.owner == self.owner
                    && k.ep == ep_index
                    && k.region.contains(seg.remote_addr, seg.len)
            });
            let rkey = key.and_then(|k| k.rkey.as_ref()).map(RKey::raw);
            let (Some(rkey), true) = (rkey, self.registered(seg.local, seg.local_addr, seg.len))
            else {
                return self.fail_slot(index);
            };
            if self.cuda {
                // The local memory's type, so that UCX need not detect it.
                let vram = (self.regs.get(seg.local.index))
                    .is_some_and(|r| r.region.kind == MemKind::Vram);
                param.op_attr_mask |= sys::UCP_OP_ATTR_FIELD_MEMORY_TYPE;
                param.memory_type = if vram {
                    sys::UCS_MEMORY_TYPE_CUDA
                } else {
                    sys::UCS_MEMORY_TYPE_HOST
                };
            }
            let len = seg.len as usize;
            // SAFETY: the endpoint and rkey are live (looked up above); the
            // local range lies in a registration (checked above) the core
            // keeps until the transfer ends, and the remote range in the
            // peer's region the rkey covers; param's user_data slot
            // outlives the request.
            let ret = unsafe {
                match op {
                    XferOp::Write => sys::ucp_put_nbx(
                        ep,
                        seg.local_addr as usize as *const c_void,
                        len,
                        seg.remote_addr,
                        rkey,
                        &param,
                    ),
                    XferOp::Read => sys::ucp_get_nbx(
                        ep,
                        seg.local_addr as usize as *mut c_void,
                        len,
                        seg.remote_addr,
                        rkey,
                        &param,
                    ),
                }
            };
            if !self.track(index, ret) {
                break;
            }
        }
    }

    /// Matches received acknowledgements of small WRITEs to their slots,
    /// and frees the buffers of acknowledgements sent.
    pub(crate) fn take_acks(&mut self) {
        if !self.inline_state().pending() {
            return;
        }
        let st = self.inline.get_mut();
        st.reap();
        // Taken out (and put back, keeping its capacity) so that slots can
        // be changed meanwhile; no handler runs in this call.
        let mut acks = std::mem::take(&mut st.acks);
        for (index, token, written) in acks.drain(..) {
            if index as usize >= self.slots.len() {
                continue;
            }
            let s = self.slot_mut(index);
            if s.token.0 == token && s.awaiting_ack {
                s.awaiting_ack = false;
                if !written && s.status == UCS_OK {
                    s.status = sys::UCS_ERR_INVALID_ADDR as sys::ucs_status_t;
                }
            }
        }
        self.inline.get_mut().acks = acks;
    }

    /// Asks UCX to cancel the requests of slot `index` (for RMA and active
    /// messages UCX 1.13 may let them run on; they end at the latest when
    /// their endpoint is closed).
    pub(crate) fn cancel_requests(&mut self, index: u32) {
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        scratch.extend_from_slice(&self.slot(index).requests);
        for &req in &scratch {
            // SAFETY: the request is in the slot's list, so not freed yet;
            // the worker is live. Completed ones are skipped; a callback the
            // cancel runs writes the slot, to which no reference is held.
            unsafe {
                if sys::ucp_request_check_status(req) == sys::UCS_INPROGRESS {
                    sys::ucp_request_cancel(self.worker.raw(), req);
                }
            }
        }
        self.scratch = scratch;
    }

    /// Creates an endpoint to the worker at `address`; returns its index.
    pub(crate) fn create_ep(&mut self, address: &[u8]) -> Result<u32, sys::ucs_status_t> {
        let mut state = Box::new(UnsafeCell::new(EpState {
            ep: ptr::null_mut(),
            failed: UCS_OK,
            closing: ptr::null_mut(),
        }));
        let params = sys::ucp_ep_params_t {
            field_mask: u64::from(
                sys::UCP_EP_PARAM_FIELD_REMOTE_ADDRESS
                    | sys::UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE
                    | sys::UCP_EP_PARAM_FIELD_ERR_HANDLER,
            ),
            address: address.as_ptr().cast::<sys::ucp_address_t>(),
            err_mode: if self.config.peer_failure_detection {
                sys::UCP_ERR_HANDLING_MODE_PEER
            } else {
                sys::UCP_ERR_HANDLING_MODE_NONE
            },
            err_handler: sys::ucp_err_handler_t {
                cb: Some(ep_failed),
                arg: state.get().cast::<c_void>(),
            },
            ..Default::default()
        };
        let mut ep: sys::ucp_ep_h = ptr::null_mut();
        // SAFETY: the worker is live; the address bytes are valid for the
        // call (UCX copies what it needs; a malformed address is refused);
        // the error handler's arg is the boxed state, kept alive until the
        // endpoint is closed (or, if the close never finishes, until the
        // worker is gone).
        let st = unsafe { sys::ucp_ep_create(self.worker.raw(), &params, &mut ep) };
        if st != UCS_OK {
            return Err(st);
        }
        // The box has not moved: the handler's arg stays valid.
        state.get_mut().ep = ep;
        Ok(self.eps.insert(state))
    }

    /// Unpacks a peer's packed remote key for endpoint `index`; `None`
    /// when the endpoint is not live (disconnected or closed).
    pub(crate) fn unpack_rkey(
        &mut self,
        index: u32,
        key: &[u8],
    ) -> Option<Result<RKey, sys::ucs_status_t>> {
        let ep = self.live_handle(index)?;
        // SAFETY: the endpoint is live (in the table, not closed).
        Some(unsafe { RKey::unpack(ep, key) })
    }

    /// Closes an endpoint and waits for the close up to the close timeout:
    /// a flush, or, with peer failure detection, a forced close (which
    /// ends every outstanding request with `UCS_ERR_CANCELED`) when `force`
    /// or when the endpoint failed. An endpoint force-closed earlier
    /// (by an abandon) only has that close waited for.
    pub(crate) fn close_ep(&mut self, mut state: Box<UnsafeCell<EpState>>, force: bool) {
        let s = state.get_mut();
        let (ep, failed, closing) = (s.ep, s.failed, s.closing);
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
            // (the pointer is nulled right after); callbacks it runs reach
            // slots and this state through raw pointers, and no reference
            // to either is held across the call.
            let req = unsafe { sys::ucp_ep_close_nbx(ep, &param) };
            state.get_mut().ep = ptr::null_mut();
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
            // The close request is handed over here.
            s.closing = ptr::null_mut();
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
        let detection = self.config.peer_failure_detection;
        let Some(state) = self.ep_mut(ep_index) else {
            return;
        };
        if state.failed == UCS_OK {
            state.failed = status;
        }
        let ep = state.ep;
        if ep.is_null() || !detection {
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
        // by the call reach slots and states through raw pointers only; no
        // reference to them is held across it.
        let req = unsafe { sys::ucp_ep_close_nbx(ep, &param) };
        let Some(state) = self.ep_mut(ep_index) else {
            return;
        };
        state.ep = ptr::null_mut();
        if sys::ucs_ptr_is_ptr(req) {
            state.closing = req;
            self.open_closes += 1;
        } else if sys::ucs_ptr_is_err(req) {
            log::debug!(
                "UCX: force-closing endpoint: {}",
                status_text(sys::ucs_ptr_status(req))
            );
        }
    }

    /// Finishes forced closes UCX has completed, in the endpoint table and
    /// among disconnected endpoints. Never waits.
    pub(crate) fn reap_closes(&mut self) {
        let done = |req: *mut c_void| {
            // SAFETY: a close request is live until freed, right after
            // this check says it finished.
            !req.is_null() && unsafe { sys::ucp_request_check_status(req) } != UCS_INPROGRESS
        };
        let mut finished = 0;
        for (_, state) in self.eps.iter_mut() {
            let s = state.get_mut();
            if done(s.closing) {
                // SAFETY: finished close request, freed once (nulled).
                unsafe { sys::ucp_request_free(s.closing) };
                s.closing = ptr::null_mut();
                finished += 1;
            }
        }
        finished += self.closing.reap(|state| {
            let req = state.get_mut().closing;
            if done(req) {
                // SAFETY: finished close request, freed once; the state's
                // error handler can no longer be called, so it may go.
                unsafe { sys::ucp_request_free(req) };
            }
            done(req)
        });
        self.open_closes = self.open_closes.saturating_sub(finished);
    }
}
