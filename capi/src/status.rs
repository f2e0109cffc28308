//! Status codes, the per-thread last error, and the boundary guard.

use std::cell::RefCell;
use std::ffi::c_char;
use std::fmt::{self, Write as _};
use std::panic::{catch_unwind, AssertUnwindSafe};

use kvxfer::Error;

/// What a call did. `KVXFER_OK` is success; for anything else
/// `kvxfer_last_error()` says what went wrong.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum kvxfer_status {
    /// Success.
    KVXFER_OK = 0,
    /// A required pointer argument was NULL.
    KVXFER_ERR_NULL_POINTER = 1,
    /// An argument is out of range or malformed (not UTF-8, unknown
    /// operation or memory kind, lists of different lengths, bad name, …).
    KVXFER_ERR_INVALID_ARGUMENT = 2,
    /// A descriptor is empty, overflows, or lies outside registered memory.
    KVXFER_ERR_INVALID_DESC = 3,
    /// No remote agent of that name is loaded.
    KVXFER_ERR_UNKNOWN_PEER = 4,
    /// The handle or prepared list was released, or its peer reloaded.
    KVXFER_ERR_RELEASED = 5,
    /// Memory or a transfer is still in use (deregistering memory that
    /// transfers use, re-posting a transfer in flight).
    KVXFER_ERR_BUSY = 6,
    /// A fixed-size table of the agent is full.
    KVXFER_ERR_CAPACITY = 7,
    /// A metadata blob was rejected.
    KVXFER_ERR_BAD_METADATA = 8,
    /// The backend, memory kind or operation is not supported here.
    KVXFER_ERR_UNSUPPORTED = 9,
    /// An output buffer is too small; the length it needs was written.
    KVXFER_ERR_BUFFER_TOO_SMALL = 10,
    /// The peer went away.
    KVXFER_ERR_REMOTE_DISCONNECTED = 11,
    /// A deadline passed.
    KVXFER_ERR_TIMED_OUT = 12,
    /// The transfer was cancelled.
    KVXFER_ERR_CANCELLED = 13,
    /// Notifications from a peer were lost (the receive queue was full).
    KVXFER_ERR_NOTIFICATIONS_LOST = 14,
    /// The agent was shut down.
    KVXFER_ERR_SHUT_DOWN = 15,
    /// The transport library or the side channel failed.
    KVXFER_ERR_BACKEND = 16,
    /// kvxfer panicked inside the call (a bug); the message says where.
    KVXFER_ERR_PANIC = 17,
}

use kvxfer_status::*;

/// The status code of a kvxfer error.
pub(crate) fn code_of(e: &Error) -> kvxfer_status {
    match e {
        Error::InvalidDesc { .. } | Error::NotRegistered { .. } => KVXFER_ERR_INVALID_DESC,
        Error::UnknownPeer { .. } => KVXFER_ERR_UNKNOWN_PEER,
        Error::StaleHandle { .. } | Error::StalePrepared { .. } | Error::StalePeer { .. } => {
            KVXFER_ERR_RELEASED
        }
        Error::RegionBusy { .. } | Error::RegionInUse { .. } | Error::InProgress { .. } => {
            KVXFER_ERR_BUSY
        }
        Error::CapacityExceeded { .. } => KVXFER_ERR_CAPACITY,
        Error::BadMetadata(_) => KVXFER_ERR_BAD_METADATA,
        Error::UnsupportedBackend { .. }
        | Error::UnsupportedMemKind { .. }
        | Error::Unsupported { .. } => KVXFER_ERR_UNSUPPORTED,
        Error::BufferTooSmall { .. } => KVXFER_ERR_BUFFER_TOO_SMALL,
        Error::RemoteDisconnected { .. } => KVXFER_ERR_REMOTE_DISCONNECTED,
        Error::TimedOut { .. } => KVXFER_ERR_TIMED_OUT,
        Error::Cancelled => KVXFER_ERR_CANCELLED,
        Error::NotificationsLost { .. } | Error::NotificationsRefused { .. } => {
            KVXFER_ERR_NOTIFICATIONS_LOST
        }
        Error::ShutDown => KVXFER_ERR_SHUT_DOWN,
        Error::CountMismatch { .. }
        | Error::LengthMismatch { .. }
        | Error::OverlappingRegistration { .. }
        | Error::InvalidRegion { .. }
        | Error::InvalidCapacity { .. }
        | Error::NotificationTooLong { .. }
        | Error::InvalidName { .. }
        | Error::IndexOutOfRange { .. } => KVXFER_ERR_INVALID_ARGUMENT,
        _ => KVXFER_ERR_BACKEND,
    }
}

/// Why a call failed, before it is written to the last error.
pub(crate) enum Fail {
    /// A kvxfer error.
    Kvx(Error),
    /// A NULL pointer for the named argument.
    Null(&'static str),
    /// Any other bad argument, with its status and message.
    Arg(kvxfer_status, String),
}

impl From<Error> for Fail {
    fn from(e: Error) -> Fail {
        Fail::Kvx(e)
    }
}

impl Fail {
    fn code(&self) -> kvxfer_status {
        match self {
            Fail::Kvx(e) => code_of(e),
            Fail::Null(_) => KVXFER_ERR_NULL_POINTER,
            Fail::Arg(c, _) => *c,
        }
    }
}

impl fmt::Display for Fail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fail::Kvx(e) => write!(f, "{e}"),
            Fail::Null(what) => write!(f, "{what} is NULL"),
            Fail::Arg(_, msg) => f.write_str(msg),
        }
    }
}

/// An invalid-argument failure.
pub(crate) fn bad_arg(msg: String) -> Fail {
    Fail::Arg(KVXFER_ERR_INVALID_ARGUMENT, msg)
}

thread_local! {
    /// The last error of this thread, NUL-terminated; its capacity is kept
    /// between errors.
    static LAST_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
}

/// Writes `"{func}: {msg}"` as this thread's last error.
pub(crate) fn set_last_error(func: &str, msg: &dyn fmt::Display) {
    LAST_ERROR.with(|e| {
        let mut e = e.borrow_mut();
        e.clear();
        let _ = write!(e, "{func}: {msg}");
        // A NUL inside the message would cut it short in C: show it.
        if e.contains('\0') {
            let s = e.replace('\0', "\\0");
            *e = s;
        }
        e.push('\0');
    });
}

/// Runs `body` for the C function `func`: its error becomes the last
/// error and the returned status; a panic is caught and reported the same
/// way.
pub(crate) fn guard(func: &'static str, body: impl FnOnce() -> Result<(), Fail>) -> kvxfer_status {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => KVXFER_OK,
        Ok(Err(fail)) => {
            set_last_error(func, &fail);
            fail.code()
        }
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .copied()
                .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
                .unwrap_or("(no message)");
            set_last_error(func, &format_args!("panic: {what}"));
            KVXFER_ERR_PANIC
        }
    }
}

/// The message of the last call on this thread that did not return
/// `KVXFER_OK`, as `"<function>: <what went wrong>"`, e.g.
/// `kvxfer_prepare: unknown remote agent "decode-3"; load its metadata
/// first`; an empty string if no call failed yet.
///
/// Ownership: the string belongs to the library and stays valid until the
/// next kvxfer call on this thread that fails; copy it to keep it. Never
/// NULL, never to be freed.
#[no_mangle]
pub extern "C" fn kvxfer_last_error() -> *const c_char {
    static EMPTY: &[u8] = b"\0";
    let p = catch_unwind(|| {
        LAST_ERROR.with(|e| {
            let e = e.borrow();
            if e.is_empty() {
                EMPTY.as_ptr().cast::<c_char>()
            } else {
                // The buffer lives in this thread's storage and is only
                // changed by the next failing call on this thread.
                e.as_ptr().cast::<c_char>()
            }
        })
    });
    p.unwrap_or(EMPTY.as_ptr().cast::<c_char>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;

    fn last() -> String {
        // SAFETY: kvxfer_last_error returns a NUL-terminated string valid
        // until the next failing call on this thread.
        unsafe { CStr::from_ptr(kvxfer_last_error()) }
            .to_string_lossy()
            .into_owned()
    }

    #[test]
    fn a_panic_becomes_a_status_and_a_message() {
        let s = guard("kvxfer_test", || panic!("bad state {}", 7));
        assert_eq!(s, KVXFER_ERR_PANIC);
        assert_eq!(last(), "kvxfer_test: panic: bad state 7");
        let s = guard("kvxfer_test", || panic!("plain"));
        assert_eq!(s, KVXFER_ERR_PANIC);
        assert_eq!(last(), "kvxfer_test: panic: plain");
    }

    #[test]
    fn the_last_error_is_per_thread_and_kept_on_success() {
        assert_eq!(
            guard("f", || Err(Fail::Null("agent"))),
            KVXFER_ERR_NULL_POINTER
        );
        assert_eq!(last(), "f: agent is NULL");
        assert_eq!(guard("g", || Ok(())), KVXFER_OK);
        assert_eq!(last(), "f: agent is NULL");
        let other = std::thread::spawn(last).join().unwrap();
        assert_eq!(other, "");
        // A NUL inside a message is shown, not left to cut it short.
        let s = guard("h", || Err(bad_arg(String::from("a\0b"))));
        assert_eq!(s, KVXFER_ERR_INVALID_ARGUMENT);
        assert_eq!(last(), "h: a\\0b");
    }
}
