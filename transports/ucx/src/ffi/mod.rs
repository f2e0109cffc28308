//! The FFI boundary, the only place of `unsafe`: UCS status constants,
//! the UCP configuration, the callbacks UCX calls (request completion,
//! endpoint failure, notifications, small WRITEs), RAII handles
//! ([`handles`]) and the calls on requests and endpoints, with access to
//! the state callbacks write ([`calls`]).

mod calls;
mod handles;
pub(crate) mod inline;

pub(crate) use handles::{Context, MemHandle, RKey, Worker};

use std::ffi::{c_void, CString};
use std::ptr;

use kvxfer_core::Error;
use ucx_sys as sys;

use crate::endpoint::EpState;
use crate::slot::OpSlot;
use crate::status::ucs_error;
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

impl ConfigGuard {
    /// UCX's configuration from its `UCX_*` environment variables.
    pub(crate) fn read() -> Result<ConfigGuard, Error> {
        let mut raw: *mut sys::ucp_config_t = ptr::null_mut();
        // SAFETY: null prefix and file name select the defaults ("UCX_"
        // environment variables, no file); the out pointer is valid.
        let st = unsafe { sys::ucp_config_read(ptr::null(), ptr::null(), &mut raw) };
        if st != UCS_OK {
            return Err(ucs_error("reading the UCX configuration", st));
        }
        Ok(ConfigGuard(raw))
    }
}

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

// SAFETY: the worker is in serialized mode and every UCX call and callback
// happens under the transport's `&mut self` (or touches no UCX state), so
// moving the transport to another thread is sound. The raw pointers inside
// are owned by the transport alone (see its documentation, "Threads").
unsafe impl Send for crate::transport::UcxTransport {}

/// Sets the transport's active-message handlers: notifications into its
/// queue, small WRITEs and their acknowledgements into its `Inline` state.
pub(crate) fn install_handlers(t: &mut crate::transport::UcxTransport) -> Result<(), Error> {
    let notes_arg = t.notes.get().cast::<c_void>();
    let inline_arg = t.inline.get().cast::<c_void>();
    for (id, cb, arg) in [
        (
            crate::NOTIFICATION_AM_ID,
            notification_received as AmHandler,
            notes_arg,
        ),
        (
            inline::WRITE_AM_ID,
            inline::write_received as AmHandler,
            inline_arg,
        ),
        (
            inline::ACK_AM_ID,
            inline::ack_received as AmHandler,
            inline_arg,
        ),
    ] {
        // SAFETY: each arg is a box the transport owns (the notification
        // queue, the Inline state) of the type its handler expects; the
        // transport drops its worker before those boxes (field order), and
        // leaks both when it leaks the worker.
        unsafe { t.worker.set_am_handler(id, cb, arg)? };
    }
    Ok(())
}

/// UCX's own text for `status` (`ucs_status_string`).
pub(crate) fn status_text(status: sys::ucs_status_t) -> &'static str {
    // SAFETY: ucs_status_string accepts any status value and returns a
    // pointer to a static, NUL-terminated string (or "Unknown error").
    let ptr = unsafe { sys::ucs_status_string(status) };
    if ptr.is_null() {
        return "unknown UCS status";
    }
    // SAFETY: non-null, NUL-terminated, static storage (see above).
    let s = unsafe { std::ffi::CStr::from_ptr(ptr) };
    s.to_str().unwrap_or("non-UTF-8 UCS status text")
}

/// The version of the UCX library loaded, as UCX spells it.
pub(crate) fn version_string() -> String {
    // SAFETY: ucp_get_version_string takes no argument and returns a
    // pointer to a static NUL-terminated string (or null, checked).
    let p = unsafe { sys::ucp_get_version_string() };
    if p.is_null() {
        return String::from("unknown");
    }
    // SAFETY: non-null, NUL-terminated and static (see above).
    unsafe { std::ffi::CStr::from_ptr(p) }
        .to_string_lossy()
        .into_owned()
}

/// The version of the UCX library loaded, `(major, minor, release)`.
pub(crate) fn version_numbers() -> (u32, u32, u32) {
    let (mut major, mut minor, mut release) = (0, 0, 0);
    // SAFETY: ucp_get_version only writes the three numbers through the
    // pointers, which point at live locals.
    unsafe { sys::ucp_get_version(&mut major, &mut minor, &mut release) };
    (major, minor, release)
}
