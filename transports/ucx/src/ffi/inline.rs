//! Small WRITEs in one round trip.
//!
//! Over transports whose RMA UCX emulates with active messages (`tcp`), a
//! WRITE to completion is a put and an endpoint flush: two sends, each
//! answered by the target. A WRITE of one segment up to
//! [`UcxConfig::inline_write_max`](crate::UcxConfig::inline_write_max)
//! bytes goes instead as one eager active message on [`WRITE_AM_ID`]
//! carrying the data and where it goes; the target copies it into place,
//! if that range lies inside host memory it registered, and answers on
//! [`ACK_AM_ID`] with the transfer's slot, token and verdict.

use std::cell::UnsafeCell;
use std::ffi::c_void;
use std::ptr;

use ucx_sys as sys;

/// Active-message id of a small WRITE.
pub const WRITE_AM_ID: u32 = 0x6b77;
/// Active-message id of its acknowledgement.
pub const ACK_AM_ID: u32 = 0x6b78;

/// Header of a small WRITE: slot (u32), pad (u32), token (u64), remote
/// address (u64), little endian.
pub(crate) const WRITE_HDR: usize = 24;
/// An acknowledgement: slot (u32), verdict (u32, 1 = written), token (u64).
const ACK_LEN: usize = 16;
/// Acknowledgement buffers; one is reused once its send has completed.
const ACK_BUFS: usize = 256;

const UCS_OK: sys::ucs_status_t = sys::UCS_OK as sys::ucs_status_t;

/// What the handlers share with the transport. Boxed: the handlers hold
/// its address for the worker's life.
pub(crate) struct Inline {
    /// Host memory registered here, `(addr, len)`: where a peer's small
    /// WRITE may land.
    pub(crate) regions: Vec<(u64, u64)>,
    /// Acknowledgements received: `(slot, token, written)`.
    pub(crate) acks: Vec<(u32, u64, bool)>,
    /// Acknowledgements being sent, with their buffers.
    bufs: Box<[[u8; ACK_LEN]; ACK_BUFS]>,
    busy: [bool; ACK_BUFS],
    sending: Vec<(*mut c_void, usize)>,
    /// Small WRITEs served and refused (outside registered memory).
    pub(crate) served: u64,
    pub(crate) refused: u64,
}

impl Inline {
    pub(crate) fn new() -> Box<UnsafeCell<Inline>> {
        Box::new(UnsafeCell::new(Inline {
            regions: Vec::new(),
            acks: Vec::with_capacity(1024),
            bufs: Box::new([[0; ACK_LEN]; ACK_BUFS]),
            busy: [false; ACK_BUFS],
            sending: Vec::with_capacity(ACK_BUFS),
            served: 0,
            refused: 0,
        }))
    }

    /// Whether `[addr, addr + len)` lies inside memory registered here.
    fn covers(&self, addr: u64, len: u64) -> bool {
        let end = addr.checked_add(len);
        self.regions.iter().any(|&(a, l)| {
            addr >= a && end.is_some_and(|e| a.checked_add(l).is_some_and(|re| e <= re))
        })
    }

    /// Frees the buffers of acknowledgements whose sends completed.
    pub(crate) fn reap(&mut self) {
        let busy = &mut self.busy;
        self.sending.retain(|&(req, i)| {
            // SAFETY: `req` came from ucp_am_send_nbx and is freed only
            // here, once, after it completed.
            let done = unsafe { sys::ucp_request_check_status(req) } != sys::UCS_INPROGRESS;
            if done {
                // SAFETY: as above.
                unsafe { sys::ucp_request_free(req) };
                busy[i] = false;
            }
            !done
        });
    }

    /// Small WRITEs from peers copied into place and refused.
    pub(crate) fn served(&self) -> (u64, u64) {
        (self.served, self.refused)
    }

    /// Whether acknowledgements are being sent.
    pub(crate) fn sending(&self) -> bool {
        !self.sending.is_empty()
    }

    /// Whether acknowledgements wait to be taken or to finish sending.
    pub(crate) fn pending(&self) -> bool {
        !self.acks.is_empty() || !self.sending.is_empty()
    }

    /// Sends an acknowledgement on `ep`.
    fn send_ack(&mut self, ep: sys::ucp_ep_h, slot: u32, token: u64, written: bool) {
        let Some(i) = self.busy.iter().position(|b| !b) else {
            // Every buffer is still on the wire: the initiator's deadline
            // ends its transfer.
            log::warn!("UCX: {ACK_BUFS} acknowledgements of small WRITEs in flight; one dropped");
            return;
        };
        let buf = &mut self.bufs[i];
        buf[..4].copy_from_slice(&slot.to_le_bytes());
        buf[4..8].copy_from_slice(&u32::from(written).to_le_bytes());
        buf[8..].copy_from_slice(&token.to_le_bytes());
        let param = sys::ucp_request_param_t {
            op_attr_mask: sys::UCP_OP_ATTR_FIELD_FLAGS,
            flags: sys::UCP_AM_SEND_FLAG_EAGER,
            ..Default::default()
        };
        // SAFETY: `ep` is the reply endpoint UCX handed the handler, live
        // during it; the buffer stays untouched until the send completes
        // (marked busy until `reap` sees it done); param is valid.
        let ret = unsafe {
            sys::ucp_am_send_nbx(
                ep,
                ACK_AM_ID,
                ptr::null(),
                0,
                buf.as_ptr().cast::<c_void>(),
                ACK_LEN,
                &param,
            )
        };
        if sys::ucs_ptr_is_ptr(ret) {
            self.busy[i] = true;
            self.sending.push((ret, i));
        } else if sys::ucs_ptr_is_err(ret) {
            log::debug!(
                "UCX: acknowledging a small WRITE failed: {}",
                crate::status::status_text(sys::ucs_ptr_status(ret))
            );
        }
    }
}

/// The bytes of an eager message, or `None` for a rendezvous one.
///
/// # Safety
/// `param` is the block UCX passed the handler; `data` and `length` are
/// what it passed with it.
unsafe fn eager_bytes<'a>(
    data: *mut c_void,
    length: usize,
    param: *const sys::ucp_am_recv_param_t,
) -> Option<&'a [u8]> {
    // SAFETY: the caller passes UCX's parameter block, valid for the call.
    let attr = unsafe { (*param).recv_attr };
    if attr & u64::from(sys::UCP_AM_RECV_ATTR_FLAG_RNDV) != 0 {
        return None;
    }
    if length == 0 || data.is_null() {
        return Some(&[]);
    }
    // SAFETY: for an eager message UCX hands `length` readable bytes at
    // `data`, valid until the handler returns.
    Some(unsafe { std::slice::from_raw_parts(data.cast::<u8>(), length) })
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b.try_into().unwrap_or([0; 4]))
}

fn le_u64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b.try_into().unwrap_or([0; 8]))
}

/// Handler of [`WRITE_AM_ID`] (target side); `arg` is the transport's
/// boxed [`Inline`].
pub(crate) unsafe extern "C" fn write_received(
    arg: *mut c_void,
    header: *const c_void,
    header_length: usize,
    data: *mut c_void,
    length: usize,
    param: *const sys::ucp_am_recv_param_t,
) -> sys::ucs_status_t {
    // SAFETY: `arg` is the transport's boxed Inline, alive as long as the
    // worker; handlers run inside progress under `&mut self`, when no
    // other reference to it is held.
    let st = unsafe { &mut *arg.cast::<UnsafeCell<Inline>>().cast::<Inline>() };
    // SAFETY: UCX passes a valid parameter block for the call.
    let (attr, reply_ep) = unsafe { ((*param).recv_attr, (*param).reply_ep) };
    // SAFETY: as documented on eager_bytes.
    let bytes = unsafe { eager_bytes(data, length, param) };
    let has_reply = attr & u64::from(sys::UCP_AM_RECV_ATTR_FIELD_REPLY_EP) != 0;
    let (Some(bytes), true, WRITE_HDR) = (bytes, has_reply, header_length) else {
        log::warn!("UCX: dropped a malformed small WRITE ({length} bytes)");
        return UCS_OK;
    };
    // SAFETY: UCX hands `header_length` readable bytes at `header`.
    let h = unsafe { std::slice::from_raw_parts(header.cast::<u8>(), WRITE_HDR) };
    let (slot, token, addr) = (le_u32(&h[..4]), le_u64(&h[8..16]), le_u64(&h[16..24]));
    let written = !bytes.is_empty() && st.covers(addr, bytes.len() as u64);
    if written {
        // SAFETY: the range lies inside memory the application registered
        // here for peers to write (checked above against the registrations
        // live now; deregistration removes a range before it returns, and
        // handlers run only inside this transport's calls).
        unsafe { ptr::copy_nonoverlapping(bytes.as_ptr(), addr as usize as *mut u8, bytes.len()) };
        st.served += 1;
    } else {
        st.refused += 1;
        log::warn!(
            "UCX: refused a small WRITE of {} bytes to {addr:#x}: not inside memory registered here",
            bytes.len()
        );
    }
    st.send_ack(reply_ep, slot, token, written);
    UCS_OK
}

/// Handler of [`ACK_AM_ID`] (initiator side); `arg` is the transport's
/// boxed [`Inline`].
pub(crate) unsafe extern "C" fn ack_received(
    arg: *mut c_void,
    _header: *const c_void,
    _header_length: usize,
    data: *mut c_void,
    length: usize,
    param: *const sys::ucp_am_recv_param_t,
) -> sys::ucs_status_t {
    // SAFETY: as in write_received.
    let st = unsafe { &mut *arg.cast::<UnsafeCell<Inline>>().cast::<Inline>() };
    // SAFETY: as documented on eager_bytes.
    match unsafe { eager_bytes(data, length, param) } {
        Some(b) if b.len() == ACK_LEN => {
            st.acks
                .push((le_u32(&b[..4]), le_u64(&b[8..16]), le_u32(&b[4..8]) == 1));
        }
        _ => log::warn!("UCX: dropped a malformed acknowledgement ({length} bytes)"),
    }
    UCS_OK
}

/// A small WRITE's header.
pub(crate) fn write_header(slot: u32, token: u64, remote_addr: u64) -> [u8; WRITE_HDR] {
    let mut h = [0u8; WRITE_HDR];
    h[..4].copy_from_slice(&slot.to_le_bytes());
    h[8..16].copy_from_slice(&token.to_le_bytes());
    h[16..].copy_from_slice(&remote_addr.to_le_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn covers_only_registered_ranges() {
        let cell = Inline::new();
        // SAFETY: no handler runs in this test.
        let st = unsafe { &mut *cell.get() };
        st.regions.push((0x1000, 0x100));
        assert!(st.covers(0x1000, 0x100));
        assert!(st.covers(0x10ff, 1));
        assert!(!st.covers(0x10ff, 2));
        assert!(!st.covers(0xfff, 1));
        assert!(!st.covers(u64::MAX, 2));
    }

    #[test]
    fn header_round_trip() {
        let h = write_header(7, 0xdead_beef_0000_0001, 0x7f00_0000_1000);
        assert_eq!(
            (le_u32(&h[..4]), le_u64(&h[8..16]), le_u64(&h[16..24])),
            (7, 0xdead_beef_0000_0001, 0x7f00_0000_1000)
        );
    }
}
