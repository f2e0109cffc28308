//! Operations in flight: one slot per posted transfer (or stand-alone
//! notification), moved through its phases (data, WRITE flush,
//! notification) as UCX completes its requests.

use std::cell::UnsafeCell;
use std::ffi::c_void;
use std::ptr;

use kvxfer_core::{Error, PostStatus, Token, XferOp};
use ucx_sys as sys;

use crate::ffi::{request_done, UCS_OK};
use crate::inline::{self, Inline};
use crate::status::xfer_error;
use crate::transport::UcxTransport;
use crate::NOTIFICATION_AM_ID;

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Puts or gets in flight.
    Data,
    /// The WRITE's endpoint flush in flight (a no-op step for READ).
    Flush,
    /// The notification's active message in flight.
    Notify,
}

/// One posted transfer (or a stand-alone notification). Boxed so that
/// request callbacks can reach it through `user_data`.
pub(crate) struct OpSlot {
    pub(crate) token: Token,
    pub(crate) op: XferOp,
    pub(crate) ep: u32,
    pub(crate) phase: Phase,
    /// Requests in flight (their callbacks have not run yet).
    pub(crate) outstanding: u32,
    /// First failure, or `UCS_OK`.
    pub(crate) status: sys::ucs_status_t,
    /// The request handles UCX returned, in flight or completed; freed
    /// together when the slot is freed.
    pub(crate) requests: Vec<*mut c_void>,
    /// The notification to send after the data (or the stand-alone one).
    pub(crate) note: Vec<u8>,
    pub(crate) has_note: bool,
    /// A stand-alone notification: no completion is reported.
    pub(crate) internal: bool,
    /// Registrations (table indices) its segments read or write, one entry
    /// per run of segments in the same registration.
    pub(crate) regs: Vec<u32>,
    /// A small WRITE sent as one active message waits for its
    /// acknowledgement (see [`crate::inline`]); no library call touches
    /// its memory meanwhile.
    pub(crate) awaiting_ack: bool,
    /// That message's header, kept until its send completes.
    pub(crate) inline_hdr: [u8; inline::WRITE_HDR],
}

impl UcxTransport {
    /// Requests of slot `index` UCX has not completed yet.
    pub(crate) fn outstanding(&self, index: u32) -> u32 {
        // SAFETY: slots are live for the transport's life; only the
        // counter is read, and no callback runs while `&self` is held.
        unsafe { (*self.slot_ptr(index)).outstanding }
    }

    /// The state of small WRITEs, to read.
    pub(crate) fn inline_state(&self) -> &Inline {
        // SAFETY: its handlers run only inside progress, which needs
        // `&mut self`, excluded while the reference lives.
        unsafe { &*self.inline.get() }
    }

    pub(crate) fn alloc_slot(
        &mut self,
        token: Token,
        op: XferOp,
        ep: u32,
        note: Option<&[u8]>,
    ) -> u32 {
        let index = match self.free_slots.pop() {
            Some(i) => i,
            None => {
                self.slots.push(Box::new(UnsafeCell::new(OpSlot {
                    token,
                    op,
                    ep,
                    phase: Phase::Data,
                    outstanding: 0,
                    status: UCS_OK,
                    requests: Vec::with_capacity(16),
                    note: Vec::new(),
                    has_note: false,
                    internal: false,
                    regs: Vec::new(),
                    awaiting_ack: false,
                    inline_hdr: [0; inline::WRITE_HDR],
                })));
                (self.slots.len() - 1) as u32
            }
        };
        // SAFETY: a free slot has no request in flight, so no callback can
        // touch it; no other reference to it exists.
        let slot = unsafe { &mut *self.slot_ptr(index) };
        slot.token = token;
        slot.op = op;
        slot.ep = ep;
        slot.phase = Phase::Data;
        slot.outstanding = 0;
        slot.status = UCS_OK;
        slot.requests.clear();
        slot.note.clear();
        slot.has_note = note.is_some();
        slot.internal = false;
        slot.regs.clear();
        slot.awaiting_ack = false;
        if let Some(n) = note {
            slot.note.extend_from_slice(n);
        }
        index
    }

    pub(crate) fn free_slot(&mut self, index: u32) {
        Self::release_requests(self.slot_ptr(index));
        self.free_slots.push(index);
    }

    /// Hands the completed requests of slot `slot` back to UCX; returns
    /// whether none is left in flight.
    pub(crate) fn release_requests(slot: *mut OpSlot) -> bool {
        // SAFETY: the slot is live and no reference to it is held; no
        // callback runs during this call (it makes no progress).
        let reqs = unsafe { &mut (*slot).requests };
        reqs.retain(|&req| {
            // SAFETY: `req` was returned by a `*_nbx` call and not freed
            // yet (it is freed only here, once, when it left the list).
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

    /// Request parameters whose callback reports to slot `slot`.
    pub(crate) fn request_param(slot: *mut OpSlot, flags: u32) -> sys::ucp_request_param_t {
        let mut p = sys::ucp_request_param_t {
            op_attr_mask: sys::UCP_OP_ATTR_FIELD_CALLBACK | sys::UCP_OP_ATTR_FIELD_USER_DATA,
            user_data: slot.cast::<c_void>(),
            ..Default::default()
        };
        p.cb.send = Some(request_done);
        if flags != 0 {
            p.op_attr_mask |= sys::UCP_OP_ATTR_FIELD_FLAGS;
            p.flags = flags;
        }
        p
    }

    /// Records what a `*_nbx` call returned for slot `slot`; false if it
    /// failed at once.
    pub(crate) fn track(slot: *mut OpSlot, ret: sys::ucs_status_ptr_t) -> bool {
        if sys::ucs_ptr_is_ptr(ret) {
            // SAFETY: the slot is live and no reference to it is held; the
            // request's callback cannot have run yet (UCX calls it only from
            // progress, after this call returned it).
            unsafe {
                (*slot).outstanding += 1;
                (*slot).requests.push(ret);
            }
            true
        } else if sys::ucs_ptr_is_err(ret) {
            // SAFETY: as above.
            unsafe {
                if (*slot).status == UCS_OK {
                    (*slot).status = sys::ucs_ptr_status(ret);
                }
            }
            false
        } else {
            true
        }
    }

    /// Issues the endpoint flush of a WRITE.
    pub(crate) fn issue_flush(&mut self, slot: *mut OpSlot, ep: sys::ucp_ep_h) {
        let param = Self::request_param(slot, 0);
        // SAFETY: the endpoint is live (the core disconnects a peer only
        // after its transfers ended); param is valid for the call and its
        // user_data slot outlives the request.
        let ret = unsafe { sys::ucp_ep_flush_nbx(ep, &param) };
        Self::track(slot, ret);
    }

    /// Sends the slot's notification as an eager active message.
    pub(crate) fn issue_note(&mut self, slot: *mut OpSlot, ep: sys::ucp_ep_h) {
        let param = Self::request_param(slot, sys::UCP_AM_SEND_FLAG_EAGER);
        // SAFETY: the slot is live; we only read the note's address and
        // length, and the buffer is not touched until the request completes
        // (the slot is not reused before its outstanding count is zero).
        let (buf, len) = unsafe { ((*slot).note.as_ptr(), (*slot).note.len()) };
        // SAFETY: the endpoint is live; header is empty; the buffer stays
        // valid until completion (see above); param is valid for the call.
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
        Self::track(slot, ret);
    }

    /// Moves slot `index` through its phases as far as it can go without
    /// waiting; returns its result once it has ended.
    pub(crate) fn advance(&mut self, index: u32) -> Option<Result<(), Error>> {
        let slot = self.slot_ptr(index);
        loop {
            // SAFETY: the slot is live and no reference to it is held while
            // UCX runs (the issue_* calls below re-read through the pointer).
            let (outstanding, status, phase, op, ep_index, has_note, awaiting) = unsafe {
                let s = &*slot;
                (
                    s.outstanding,
                    s.status,
                    s.phase,
                    s.op,
                    s.ep,
                    s.has_note,
                    s.awaiting_ack,
                )
            };
            if outstanding > 0 {
                return None;
            }
            let ep = self.ep_state(ep_index);
            if awaiting {
                // SAFETY: the state box is live while it is in the table.
                let failed = ep.map_or(
                    sys::UCS_ERR_ENDPOINT_TIMEOUT as sys::ucs_status_t,
                    |e| unsafe { (*e).failed },
                );
                if failed == UCS_OK && status == UCS_OK {
                    return None;
                }
                // The peer is gone (or the send failed): no answer comes.
                // SAFETY: no other reference to the slot exists.
                unsafe {
                    (*slot).awaiting_ack = false;
                    if (*slot).status == UCS_OK {
                        (*slot).status = failed;
                    }
                }
                continue;
            }
            if status != UCS_OK {
                // SAFETY: the state box is live while it is in the table.
                let failed = ep.is_some_and(|e| unsafe { (*e).failed } != UCS_OK);
                let refused = status == sys::UCS_ERR_INVALID_ADDR as sys::ucs_status_t;
                let what = match phase {
                    Phase::Data => op.name(),
                    // Only a small WRITE's acknowledgement says this.
                    Phase::Flush if refused => {
                        "WRITE refused by the peer: not inside memory it has registered"
                    }
                    Phase::Flush => "flushing the endpoint after WRITE",
                    Phase::Notify => "sending the notification",
                };
                return Some(Err(xfer_error(what, status, failed)));
            }
            let Some(ep) = ep else {
                return Some(Err(Error::disconnected("")));
            };
            // SAFETY: the state box is live while it is in the table.
            let ep_handle = unsafe { (*ep).ep };
            if ep_handle.is_null() {
                // Force-closed by an abandon: nothing more can be issued.
                return Some(Err(Error::disconnected("")));
            }
            match phase {
                Phase::Data => {
                    // SAFETY: no other reference to the slot exists.
                    unsafe { (*slot).phase = Phase::Flush };
                    if op == XferOp::Write {
                        self.issue_flush(slot, ep_handle);
                    }
                }
                Phase::Flush => {
                    if !has_note {
                        return Some(Ok(()));
                    }
                    // SAFETY: no other reference to the slot exists.
                    unsafe { (*slot).phase = Phase::Notify };
                    self.issue_note(slot, ep_handle);
                }
                Phase::Notify => return Some(Ok(())),
            }
        }
    }

    /// Sends a small WRITE of `[local, +len)` to `remote` as one active
    /// message the target copies and answers (see [`crate::inline`]).
    pub(crate) fn issue_inline(
        &mut self,
        slot: *mut OpSlot,
        index: u32,
        ep: sys::ucp_ep_h,
        local: u64,
        len: u64,
        remote: u64,
    ) {
        // SAFETY: the slot was just allocated; no request refers to it.
        let hdr = unsafe {
            let s = &mut *slot;
            s.inline_hdr = inline::write_header(index, s.token.0, remote);
            s.phase = Phase::Flush;
            s.awaiting_ack = true;
            s.inline_hdr.as_ptr()
        };
        let param = Self::request_param(
            slot,
            sys::UCP_AM_SEND_FLAG_EAGER | sys::UCP_AM_SEND_FLAG_REPLY,
        );
        // SAFETY: the endpoint is live; the header lives in the boxed slot
        // and the data in a registration the core keeps, both until the
        // request completes (the slot is not freed before); param's
        // user_data slot outlives the request.
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
        Self::track(slot, ret);
    }

    /// Reports a posted slot done (and frees it) or in progress.
    pub(crate) fn finish_post(&mut self, index: u32) -> Result<PostStatus, Error> {
        match self.advance(index) {
            Some(result) => {
                self.free_slot(index);
                result.map(|()| PostStatus::Done)
            }
            None => {
                self.active.push(index);
                Ok(PostStatus::InProgress)
            }
        }
    }

    /// Matches received acknowledgements of small WRITEs to their slots,
    /// and frees the buffers of acknowledgements sent.
    pub(crate) fn take_acks(&mut self) {
        // SAFETY: handlers run only inside progress, which is not running;
        // no other reference to the state is held.
        let st = unsafe { &mut *self.inline.get() };
        if !st.pending() {
            return;
        }
        st.reap();
        for (index, token, written) in st.acks.drain(..) {
            let Some(cell) = self.slots.get(index as usize) else {
                continue;
            };
            // SAFETY: slots are live for the transport's life; no callback
            // runs meanwhile and no other reference to this one is held.
            let s = unsafe { &mut *cell.get() };
            if s.token.0 == token && s.awaiting_ack {
                s.awaiting_ack = false;
                if !written && s.status == UCS_OK {
                    s.status = sys::UCS_ERR_INVALID_ADDR as sys::ucs_status_t;
                }
            }
        }
    }

    /// Asks UCX to cancel the requests of slot `slot` (for RMA and active
    /// messages UCX 1.13 may let them run on; they end at the latest when
    /// their endpoint is closed).
    pub(crate) fn cancel_requests(&mut self, slot: *mut OpSlot) {
        self.scratch.clear();
        // SAFETY: the slot is live; no callback runs while the list is
        // copied.
        self.scratch.extend_from_slice(unsafe { &(*slot).requests });
        for &req in &self.scratch {
            // SAFETY: the request is in the slot's list, so not freed yet;
            // the worker is live. Completed ones are skipped.
            unsafe {
                if sys::ucp_request_check_status(req) == sys::UCS_INPROGRESS {
                    sys::ucp_request_cancel(self.worker.raw(), req);
                }
            }
        }
    }

    /// Turns slot `index` (already out of `active`) into a zombie if UCX
    /// still holds requests of it, else frees it.
    pub(crate) fn retire_slot(&mut self, index: u32) {
        // SAFETY: the slot is live; only its counter is read.
        if unsafe { (*self.slot_ptr(index)).outstanding } == 0 {
            self.free_slot(index);
        } else {
            self.zombies.push(index);
        }
    }

    /// Whether a zombie slot still uses endpoint `ep_index`.
    pub(crate) fn zombies_on(&self, ep_index: u32) -> bool {
        self.zombies.iter().any(|&z| {
            // SAFETY: zombie slots are live; only plain fields are read.
            let s = unsafe { &*self.slot_ptr(z) };
            s.ep == ep_index && s.outstanding > 0
        })
    }
}
