//! Operations in flight: one slot per posted transfer (or stand-alone
//! notification), moved through its phases (data, WRITE flush,
//! notification) as UCX completes its requests.

use std::cell::UnsafeCell;
use std::ffi::c_void;

use kvxfer_core::{Error, PostStatus, Token, XferOp};
use ucx_sys as sys;

use crate::ffi::inline;
use crate::ffi::UCS_OK;
use crate::status::xfer_error;
use crate::transport::UcxTransport;

/// Free slots made with the transport (see `UcxTransport::reserve_slots`).
pub(crate) const SPARE_SLOTS: usize = 4;
/// Requests a new slot has room for.
pub(crate) const SLOT_REQUESTS: usize = 16;
/// Registrations a new slot has room for.
pub(crate) const SLOT_REGS: usize = 4;

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
    /// acknowledgement (see `ffi::inline`); no library call touches
    /// its memory meanwhile.
    pub(crate) awaiting_ack: bool,
    /// That message's header, kept until its send completes.
    pub(crate) inline_hdr: [u8; inline::WRITE_HDR],
    /// Abandoned: reported as failed once UCX has released its requests.
    pub(crate) report: bool,
}

impl UcxTransport {
    /// Adds `n` free slots, each with room for [`SLOT_REQUESTS`] requests
    /// and [`SLOT_REGS`] registrations. Made when the transport is built,
    /// so that the first time a transfer runs beside another (a keepalive
    /// probe or a notification next to a transfer) takes a ready slot
    /// instead of allocating one.
    pub(crate) fn reserve_slots(&mut self, n: usize) {
        self.slots.reserve(n);
        self.free_slots.reserve(n);
        for _ in 0..n {
            let index = self.new_slot();
            self.free_slots.push(index);
        }
    }

    /// Appends an empty slot to the table; returns its index.
    fn new_slot(&mut self) -> u32 {
        self.slots.push(Box::new(UnsafeCell::new(OpSlot {
            token: Token(0),
            op: XferOp::Read,
            ep: u32::MAX,
            phase: Phase::Data,
            outstanding: 0,
            status: UCS_OK,
            requests: Vec::with_capacity(SLOT_REQUESTS),
            note: Vec::new(),
            has_note: false,
            internal: false,
            regs: Vec::with_capacity(SLOT_REGS),
            awaiting_ack: false,
            inline_hdr: [0; inline::WRITE_HDR],
            report: false,
        })));
        (self.slots.len() - 1) as u32
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
            None => self.new_slot(),
        };
        // A free slot has no request in flight, so no callback touches it.
        let slot = self.slot_mut(index);
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
        slot.report = false;
        if let Some(n) = note {
            slot.note.extend_from_slice(n);
        }
        index
    }

    /// Frees slot `index`. A slot whose lists hold less than those of the
    /// slot freed last goes beneath it, so that the next post takes the
    /// slot a transfer of its size already grew (a short transfer that ran
    /// beside a long one does not hand the long one's next post a slot
    /// whose lists must grow).
    pub(crate) fn free_slot(&mut self, index: u32) {
        self.release_requests(index);
        self.free_slots.push(index);
        let n = self.free_slots.len();
        if n >= 2 {
            let room = |s: &OpSlot| (s.requests.capacity(), s.regs.capacity());
            let (top, below) = (self.free_slots[n - 1], self.free_slots[n - 2]);
            if room(self.slot(top)) < room(self.slot(below)) {
                self.free_slots.swap(n - 1, n - 2);
            }
        }
    }

    /// Moves slot `index` through its phases as far as it can go without
    /// waiting; returns its result once it has ended.
    pub(crate) fn advance(&mut self, index: u32) -> Option<Result<(), Error>> {
        loop {
            let s = self.slot(index);
            let (outstanding, status, phase, op, ep_index, has_note, awaiting) = (
                s.outstanding,
                s.status,
                s.phase,
                s.op,
                s.ep,
                s.has_note,
                s.awaiting_ack,
            );
            if outstanding > 0 {
                return None;
            }
            let ep = self.ep(ep_index).map(|e| (e.ep, e.failed));
            if awaiting {
                let failed = ep.map_or(
                    sys::UCS_ERR_ENDPOINT_TIMEOUT as sys::ucs_status_t,
                    |(_, failed)| failed,
                );
                if failed == UCS_OK && status == UCS_OK {
                    return None;
                }
                // The peer is gone (or the send failed): no answer comes.
                let s = self.slot_mut(index);
                s.awaiting_ack = false;
                if s.status == UCS_OK {
                    s.status = failed;
                }
                continue;
            }
            if status != UCS_OK {
                let failed = ep.is_some_and(|(_, failed)| failed != UCS_OK);
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
            let Some((ep_handle, _)) = ep else {
                return Some(Err(Error::disconnected("")));
            };
            if ep_handle.is_null() {
                // Force-closed by an abandon: nothing more can be issued.
                return Some(Err(Error::disconnected("")));
            }
            match phase {
                Phase::Data => {
                    self.slot_mut(index).phase = Phase::Flush;
                    if op == XferOp::Write {
                        self.issue_flush(index);
                    }
                }
                Phase::Flush => {
                    if !has_note {
                        return Some(Ok(()));
                    }
                    self.slot_mut(index).phase = Phase::Notify;
                    self.issue_note(index);
                }
                Phase::Notify => return Some(Ok(())),
            }
        }
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

    /// Turns slot `index` (already out of `active`) into a zombie if UCX
    /// still holds requests of it, else frees it (see
    /// [`free_retired`](Self::free_retired)).
    pub(crate) fn retire_slot(&mut self, index: u32) {
        if self.outstanding(index) == 0 {
            self.free_retired(index);
        } else {
            self.zombies.push(index);
        }
    }

    /// Frees slot `index`, cancelled or abandoned, whose requests UCX has
    /// all released; an abandoned transfer is reported now, failed with
    /// [`Error::RemoteDisconnected`]: UCX no longer touches its memory.
    pub(crate) fn free_retired(&mut self, index: u32) {
        let s = self.slot(index);
        if s.report {
            let token = s.token;
            self.completions.push_back(kvxfer_core::Completion {
                token,
                result: Err(Error::disconnected("")),
            });
        }
        self.free_slot(index);
    }

    /// Whether a zombie slot still uses endpoint `ep_index`.
    pub(crate) fn zombies_on(&self, ep_index: u32) -> bool {
        self.zombies.iter().any(|&z| {
            let s = self.slot(z);
            s.ep == ep_index && s.outstanding > 0
        })
    }
}
