//! UCS status codes turned into kvxfer errors.

use kvxfer_core::Error;
use ucx_sys as sys;

pub(crate) use crate::ffi::status_text;
use crate::BACKEND;

/// Whether `status` says the connection to the peer is gone.
pub(crate) fn is_peer_failure(status: sys::ucs_status_t) -> bool {
    let s = status as i32;
    s == sys::UCS_ERR_CONNECTION_RESET as i32
        || s == sys::UCS_ERR_ENDPOINT_TIMEOUT as i32
        || s == sys::UCS_ERR_UNREACHABLE as i32
        || s == sys::UCS_ERR_NOT_CONNECTED as i32
        || (sys::UCS_ERR_LAST_ENDPOINT_FAILURE as i32..=sys::UCS_ERR_FIRST_LINK_FAILURE as i32)
            .contains(&s)
}

/// A [`Error::Backend`] for `status`, saying what was being done.
pub(crate) fn ucs_error(what: &str, status: sys::ucs_status_t) -> Error {
    Error::backend(
        BACKEND,
        i64::from(status),
        &format!("{what}: {}", status_text(status)),
    )
}

/// The error reported for a transfer that ended with `status`: a dead peer
/// gives [`Error::RemoteDisconnected`] (the engine knows the peer's name),
/// a cancelled request [`Error::Cancelled`], anything else a backend error
/// with UCX's text.
pub(crate) fn xfer_error(what: &str, status: sys::ucs_status_t, peer_failed: bool) -> Error {
    if peer_failed || is_peer_failure(status) {
        log::warn!(
            "UCX: {what} failed, peer unreachable: {}",
            status_text(status)
        );
        Error::disconnected("")
    } else if status as i32 == sys::UCS_ERR_CANCELED as i32 {
        Error::Cancelled
    } else {
        ucs_error(what, status)
    }
}
