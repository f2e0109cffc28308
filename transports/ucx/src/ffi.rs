//! The FFI boundary: UCS status constants, the UCP configuration, and the
//! callbacks UCX calls (request completion, endpoint failure,
//! notifications).

use std::ffi::{c_void, CString};

use kvxfer_core::Error;
use ucx_sys as sys;

use crate::endpoint::EpState;
use crate::slot::OpSlot;
use crate::status::{status_text, ucs_error};
use crate::BACKEND;
use kvxfer_transport_common::NoteQueue;

pub(crate) const UCS_OK: sys::ucs_status_t = sys::UCS_OK as sys::ucs_status_t;
pub(crate) const UCS_INPROGRESS: sys::ucs_status_t = sys::UCS_INPROGRESS as sys::ucs_status_t;

/// An active-message handler.
pub(crate) type AmHandler = unsafe extern "C" fn(
    *mut c_void,
    *const c_void,
    usize,
    *mut c_void,
    usize,
    *const sys::ucp_am_recv_param_t,
) -> sys::ucs_status_t;

/// Releases a `ucp_config_t` read by `ucp_config_read`.
pub(crate) struct ConfigGuard(pub(crate) *mut sys::ucp_config_t);

impl Drop for ConfigGuard {
    fn drop(&mut self) {
        // SAFETY: the pointer came from a successful ucp_config_read and is
        // released exactly once, here.
        unsafe { sys::ucp_config_release(self.0) }
    }
}

pub(crate) fn config_modify(config: &ConfigGuard, name: &str, value: &str) -> Result<(), Error> {
    let (Ok(n), Ok(v)) = (CString::new(name), CString::new(value)) else {
        return Err(Error::backend(
            BACKEND,
            i64::from(sys::UCS_ERR_INVALID_PARAM as sys::ucs_status_t),
            "configuration value contains a NUL byte",
        ));
    };
    // SAFETY: the config is live (owned by the guard); both strings are
    // NUL-terminated and outlive the call, which copies them.
    let st = unsafe { sys::ucp_config_modify(config.0, n.as_ptr(), v.as_ptr()) };
    if st != UCS_OK {
        let what = format!("setting UCX_{name}={value:?}");
        return Err(ucs_error(&what, st));
    }
    Ok(())
}

/// Sets an option of UCX's `tcp` transport through the UCP configuration.
/// UCX 1.13 matches the bare name (`TX_SEG_SIZE`) against every transport
/// and warns at start about the prefixed one; UCX 1.18 warns about the bare
/// name and 1.22 refuses it, both taking `TCP_TX_SEG_SIZE`.
pub(crate) fn set_tcp_option(config: &ConfigGuard, name: &str, value: &str) -> Result<(), Error> {
    if crate::version_number() < (1, 14) {
        config_modify(config, name, value)
    } else {
        config_modify(config, &format!("TCP_{name}"), value)
    }
}

/// Whether a `UCX_TLS` value (`None`: unset, meaning `all`) lets UCX use its
/// `tcp` transport, so that options of that transport apply.
pub(crate) fn tls_include_tcp(tls: Option<&str>) -> bool {
    let Some(tls) = tls.map(str::trim).filter(|t| !t.is_empty()) else {
        return true;
    };
    let (negated, list) = match tls.strip_prefix('^') {
        Some(rest) => (true, rest),
        None => (false, tls),
    };
    let named = list
        .split(',')
        .map(|t| t.trim().trim_end_matches(":aux"))
        .any(|t| t.eq_ignore_ascii_case("tcp") || t.eq_ignore_ascii_case("all"));
    named != negated
}

/// Completion callback of every request (put, get, flush, active message).
/// `user_data` is the request's `OpSlot`. The request stays in the slot's
/// list until the slot is freed (`release_requests`), so the callback costs
/// O(1) however many requests a transfer has.
pub(crate) unsafe extern "C" fn request_done(
    _request: *mut c_void,
    status: sys::ucs_status_t,
    user_data: *mut c_void,
) {
    let slot = user_data.cast::<OpSlot>();
    // SAFETY: `user_data` is the address of a boxed OpSlot owned by the
    // transport, which outlives every request (slots are freed only once
    // their outstanding count is zero, and the boxes outlive the worker).
    // UCX runs this callback inside a call the transport makes under
    // `&mut self`, when no reference to the slot is held.
    unsafe {
        (*slot).outstanding = (*slot).outstanding.saturating_sub(1);
        if status != UCS_OK && (*slot).status == UCS_OK {
            (*slot).status = status;
        }
    }
}

/// Error handler of every endpoint; `arg` is its `EpState`.
pub(crate) unsafe extern "C" fn ep_failed(
    arg: *mut c_void,
    _ep: sys::ucp_ep_h,
    status: sys::ucs_status_t,
) {
    // A peer that exits or restarts ends here too: routine for a target,
    // and every transfer it fails reports the error itself.
    log::info!("UCX: endpoint to a peer failed: {}", status_text(status));
    let state = arg.cast::<EpState>();
    // SAFETY: `arg` is a boxed EpState kept alive until its endpoint is
    // closed (or, if the close did not finish, until the worker is
    // destroyed); the handler runs inside progress under `&mut self`.
    unsafe {
        if (*state).failed == UCS_OK {
            (*state).failed = status;
        }
    }
}

/// Active-message handler for notifications; `arg` is the `NoteQueue`.
pub(crate) unsafe extern "C" fn notification_received(
    arg: *mut c_void,
    _header: *const c_void,
    _header_length: usize,
    data: *mut c_void,
    length: usize,
    param: *const sys::ucp_am_recv_param_t,
) -> sys::ucs_status_t {
    let queue = arg.cast::<NoteQueue>();
    // SAFETY: UCX passes a valid parameter block for the duration of the
    // call.
    let attr = unsafe { (*param).recv_attr };
    if attr & u64::from(sys::UCP_AM_RECV_ATTR_FLAG_RNDV) != 0 {
        // Notifications are sent eagerly; a rendezvous one is not ours.
        log::warn!("UCX: dropped a rendezvous active message of {length} bytes");
        // SAFETY: as above; the queue box outlives the worker's handlers.
        unsafe { (*queue).drop_one(&[]) };
        return UCS_OK;
    }
    let bytes = if length == 0 || data.is_null() {
        &[][..]
    } else {
        // SAFETY: for an eager message UCX hands `length` readable bytes at
        // `data`, valid until this handler returns.
        unsafe { std::slice::from_raw_parts(data.cast::<u8>(), length) }
    };
    // SAFETY: `arg` is the transport's boxed NoteQueue, alive as long as
    // the worker; the handler runs inside progress under `&mut self`.
    unsafe { (*queue).push(bytes) };
    UCS_OK
}
