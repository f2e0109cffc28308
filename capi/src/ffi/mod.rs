//! The C functions, by area, and the plain types and argument helpers they share.

use std::ffi::{c_char, c_void, CStr};
use std::time::Duration;

use kvxfer::{
    Agent, AgentConfig, Desc, MemKind, PreparedLocal, PreparedRemote, WaitOutcome, XferOp,
    XferRequest, XferState,
};

use crate::status::{bad_arg, guard, kvxfer_status, Fail};

mod agents;
pub use agents::*;
mod transfers;
pub use transfers::*;
mod notifications;
pub use notifications::*;

/// An agent: one process's end of kvxfer (see `kvxfer::Agent`). Created
/// by [`kvxfer_agent_new`], freed by [`kvxfer_agent_free`]. Every call on
/// it is thread-safe.
pub struct kvxfer_agent {
    agent: Agent,
}

/// A transfer request. Made by [`kvxfer_prepare`] or [`kvxfer_make_xfer`],
/// released by [`kvxfer_xfer_release`] (the handle stays, for reuse) and
/// freed by [`kvxfer_xfer_free`]. Calls on one request must not run
/// concurrently with its release or free.
pub struct kvxfer_xfer {
    req: Option<XferRequest>,
}

/// One block of memory: `len` bytes from `addr` on device `dev` (0 for
/// host memory).
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct kvxfer_desc {
    /// First byte.
    pub addr: u64,
    /// Length in bytes; not zero.
    pub len: u64,
    /// Device id; must match the registration that holds the block.
    pub dev: u32,
}

/// A descriptor list resolved once against this agent's registrations by
/// [`kvxfer_prep_local`]. A value, copied freely; once released, using it
/// fails with `KVXFER_ERR_RELEASED`.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct kvxfer_local_list {
    /// Opaque to the caller.
    pub opaque: u64,
}

/// A descriptor list resolved once against a peer's regions by
/// [`kvxfer_prep_remote`]; like [`kvxfer_local_list`].
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct kvxfer_remote_list {
    /// Opaque to the caller.
    pub opaque: u64,
}

/// Direction of a transfer, seen from the agent that posts it; passed as
/// `uint32_t` `op` arguments.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum kvxfer_op {
    /// Copy remote memory into local memory.
    KVXFER_READ = 0,
    /// Copy local memory into remote memory.
    KVXFER_WRITE = 1,
}

/// Kind of registered memory; passed as `uint32_t` `kind` arguments.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum kvxfer_mem_kind {
    /// Host memory.
    KVXFER_DRAM = 0,
    /// GPU memory of device `dev` (builds with the `cuda` feature).
    KVXFER_VRAM = 1,
}

/// State of a transfer request.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum kvxfer_xfer_state {
    /// Made, never posted.
    KVXFER_XFER_PREPARED = 0,
    /// Posted; data may be moving.
    KVXFER_XFER_IN_PROGRESS = 1,
    /// All data is at its destination.
    KVXFER_XFER_DONE = 2,
    /// It failed; the call that reported it returned why.
    KVXFER_XFER_FAILED = 3,
}

/// Settings of a new agent. Fill it with [`kvxfer_config_init`] first,
/// then change fields; a NULL config means those defaults.
#[repr(C)]
#[derive(Copy, Clone, Debug)]
pub struct kvxfer_config {
    /// Backend name, "UCX" or "LIBFABRIC" (any case); NULL (default):
    /// `KVXFER_BACKEND`, else `TRTLLM_NIXL_KVCACHE_BACKEND`, else UCX.
    /// Borrowed for the call only.
    pub backend: *const c_char,
    /// Address the side channel listens on, "ip:port" (port 0 picks one);
    /// NULL (default): "127.0.0.1:0"; "" serves no side channel. Borrowed
    /// for the call only.
    pub listen: *const c_char,
    /// Nonzero (default): a progress thread completes transfers and
    /// collects notifications; zero: that happens inside status, wait and
    /// notification calls.
    pub progress_thread: i32,
}

/// Receives one notification: `peer` (`peer_len` bytes, not
/// NUL-terminated) sent `msg` (`msg_len` bytes). Both are borrowed for the
/// call only. It must not unwind (throw a C++ exception) into kvxfer.
pub type kvxfer_notification_fn = Option<
    unsafe extern "C" fn(
        ctx: *mut c_void,
        peer: *const c_char,
        peer_len: usize,
        msg: *const u8,
        msg_len: usize,
    ),
>;

// ---- argument helpers ----

/// `p` as a reference, or a NULL-pointer failure naming `what`.
///
/// # Safety
///
/// `p` is NULL or points to a live `T` for `'a`.
unsafe fn deref<'a, T>(p: *const T, what: &'static str) -> Result<&'a T, Fail> {
    // SAFETY: the caller guarantees `p` is NULL or valid for `'a`.
    unsafe { p.as_ref() }.ok_or(Fail::Null(what))
}

/// The NUL-terminated UTF-8 string at `p`.
///
/// # Safety
///
/// `p` is NULL or points to a NUL-terminated string live for `'a`.
unsafe fn text<'a>(p: *const c_char, what: &'static str) -> Result<&'a str, Fail> {
    if p.is_null() {
        return Err(Fail::Null(what));
    }
    // SAFETY: non-NULL, NUL-terminated and live per the caller.
    let c = unsafe { CStr::from_ptr(p) };
    c.to_str()
        .map_err(|_| bad_arg(format!("{what} {c:?} is not valid UTF-8")))
}

/// `n` elements from `p`; NULL is allowed when `n` is 0.
///
/// # Safety
///
/// `p` is NULL or points to `n` initialised `T`s live for `'a`.
unsafe fn slice<'a, T>(p: *const T, n: usize, what: &'static str) -> Result<&'a [T], Fail> {
    if n == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(Fail::Null(what));
    }
    // SAFETY: non-NULL and valid for `n` elements per the caller.
    Ok(unsafe { std::slice::from_raw_parts(p, n) })
}

/// An optional notification: NULL means none.
///
/// # Safety
///
/// As for [`slice`].
unsafe fn opt_bytes<'a>(p: *const u8, n: usize) -> Result<Option<&'a [u8]>, Fail> {
    if p.is_null() {
        if n != 0 {
            return Err(Fail::Null("notification (with notification_len > 0)"));
        }
        return Ok(None);
    }
    // SAFETY: the caller guarantees `n` readable bytes at `p`.
    Ok(Some(unsafe { std::slice::from_raw_parts(p, n) }))
}

fn to_descs(d: &[kvxfer_desc]) -> Vec<Desc> {
    d.iter()
        .map(|d| Desc {
            addr: d.addr,
            len: d.len,
            dev: d.dev,
        })
        .collect()
}

fn op_of(op: u32) -> Result<XferOp, Fail> {
    match op {
        0 => Ok(XferOp::Read),
        1 => Ok(XferOp::Write),
        _ => Err(bad_arg(format!(
            "op {op} is neither KVXFER_READ (0) nor KVXFER_WRITE (1)"
        ))),
    }
}

fn state_of(s: &XferState) -> kvxfer_xfer_state {
    match s {
        XferState::Prepared => kvxfer_xfer_state::KVXFER_XFER_PREPARED,
        XferState::InProgress => kvxfer_xfer_state::KVXFER_XFER_IN_PROGRESS,
        XferState::Done => kvxfer_xfer_state::KVXFER_XFER_DONE,
        XferState::Failed(_) => kvxfer_xfer_state::KVXFER_XFER_FAILED,
    }
}

/// Copies `bytes` to `buf` (`cap` bytes), NUL-terminated if `nul`, and
/// the length without the NUL to `len_out` (if not NULL). A NULL `buf`
/// with `cap` 0 only reports the length.
///
/// # Safety
///
/// `buf` is NULL or writable for `cap` bytes; `len_out` is NULL or
/// writable.
unsafe fn copy_out(
    bytes: &[u8],
    nul: bool,
    buf: *mut u8,
    cap: usize,
    len_out: *mut usize,
) -> Result<(), Fail> {
    if !len_out.is_null() {
        // SAFETY: writable per the caller.
        unsafe { *len_out = bytes.len() };
    }
    if buf.is_null() {
        if cap == 0 {
            return Ok(());
        }
        return Err(Fail::Null("buf (with cap > 0)"));
    }
    let need = bytes.len() + usize::from(nul);
    if cap < need {
        return Err(Fail::Arg(
            kvxfer_status::KVXFER_ERR_BUFFER_TOO_SMALL,
            format!("buffer of {cap} bytes is too small; {need} needed"),
        ));
    }
    // SAFETY: `buf` is writable for `cap >= need` bytes and cannot overlap
    // `bytes`, which the library owns.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf, bytes.len());
        if nul {
            *buf.add(bytes.len()) = 0;
        }
    }
    Ok(())
}

fn pack(index: u32, generation: u32) -> u64 {
    (u64::from(generation) << 32) | u64::from(index)
}

fn local_list(l: kvxfer_local_list) -> PreparedLocal {
    PreparedLocal {
        index: l.opaque as u32,
        generation: (l.opaque >> 32) as u32,
    }
}

fn remote_list(l: kvxfer_remote_list) -> PreparedRemote {
    PreparedRemote {
        index: l.opaque as u32,
        generation: (l.opaque >> 32) as u32,
    }
}

/// Stores `req` in `*xfer`: into the handle already there (released
/// first, no allocation), or a new one.
///
/// # Safety
///
/// `xfer` is writable and `*xfer` is NULL or a live handle of this
/// library not used by another thread.
unsafe fn store(xfer: *mut *mut kvxfer_xfer, req: XferRequest) {
    // SAFETY: per the caller.
    let slot = unsafe { &mut *xfer };
    // SAFETY: per the caller, a non-NULL `*xfer` is a live, unshared handle.
    match unsafe { slot.as_mut() } {
        Some(h) => h.req = Some(req),
        None => *slot = Box::into_raw(Box::new(kvxfer_xfer { req: Some(req) })),
    }
}

/// Releases the request in `*xfer`, if any, before a new one replaces it.
///
/// # Safety
///
/// As for [`store`], and `xfer` may be NULL.
unsafe fn release_old(xfer: *mut *mut kvxfer_xfer) -> Result<(), Fail> {
    if xfer.is_null() {
        return Err(Fail::Null("xfer"));
    }
    // SAFETY: `xfer` is readable, and `*xfer` NULL or live, per the caller.
    if let Some(h) = unsafe { (*xfer).as_mut() } {
        if let Some(old) = h.req.take() {
            old.release()?;
        }
    }
    Ok(())
}
