//! The C functions and the plain types they take.

use std::ffi::{c_char, c_void, CStr};
use std::time::Duration;

use kvxfer::{
    Agent, AgentConfig, Desc, MemKind, PreparedLocal, PreparedRemote, WaitOutcome, XferOp,
    XferRequest, XferState,
};

use crate::status::{bad_arg, guard, kvxfer_status, Fail};

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

// ---- configuration and agents ----

/// Fills `cfg` with the defaults (see [`kvxfer_config`]).
///
/// # Safety
///
/// `cfg` is NULL (`KVXFER_ERR_NULL_POINTER`) or writable.
#[no_mangle]
pub unsafe extern "C" fn kvxfer_config_init(cfg: *mut kvxfer_config) -> kvxfer_status {
    guard("kvxfer_config_init", || {
        if cfg.is_null() {
            return Err(Fail::Null("cfg"));
        }
        // SAFETY: non-NULL and writable per the caller.
        unsafe {
            cfg.write(kvxfer_config {
                backend: std::ptr::null(),
                listen: std::ptr::null(),
                progress_thread: 1,
            })
        };
        Ok(())
    })
}

/// Creates the agent `name` and stores it in `*out`: chooses the backend,
/// opens the transport, starts the side channel and the progress thread.
///
/// Ownership: `name` and `cfg` (NULL: defaults) are borrowed for the call;
/// on success the caller owns `*out` and frees it with
/// [`kvxfer_agent_free`]. On failure `*out` is left unchanged.
///
/// # Safety
///
/// Pointers are NULL or valid: `name` and `cfg`'s strings NUL-terminated,
/// `out` writable.
#[no_mangle]
pub unsafe extern "C" fn kvxfer_agent_new(
    name: *const c_char,
    cfg: *const kvxfer_config,
    out: *mut *mut kvxfer_agent,
) -> kvxfer_status {
    guard("kvxfer_agent_new", || {
        // SAFETY: per this function's contract.
        let name = unsafe { text(name, "name") }?;
        if out.is_null() {
            return Err(Fail::Null("out"));
        }
        let mut config = AgentConfig::default();
        // SAFETY: per this function's contract.
        if let Some(c) = unsafe { cfg.as_ref() } {
            if !c.backend.is_null() {
                // SAFETY: non-NULL and NUL-terminated per the contract.
                config = config.with_backend(unsafe { text(c.backend, "cfg->backend") }?);
            }
            if !c.listen.is_null() {
                // SAFETY: non-NULL and NUL-terminated per the contract.
                let l = unsafe { text(c.listen, "cfg->listen") }?;
                config = config.with_listen((!l.is_empty()).then_some(l));
            }
            config = config.with_progress_thread(c.progress_thread != 0);
        }
        let agent = Agent::new(name, config)?;
        // SAFETY: `out` is non-NULL and writable per the contract.
        unsafe { *out = Box::into_raw(Box::new(kvxfer_agent { agent })) };
        Ok(())
    })
}

/// Shuts the agent down and frees it. Requests made by it stay valid
/// handles to free, but fail with `KVXFER_ERR_SHUT_DOWN`. NULL is allowed.
///
/// Ownership: takes `agent`; it must not be used again.
///
/// # Safety
///
/// `agent` is NULL or a live agent from [`kvxfer_agent_new`], not in use
/// by another thread.
#[no_mangle]
pub unsafe extern "C" fn kvxfer_agent_free(agent: *mut kvxfer_agent) -> kvxfer_status {
    guard("kvxfer_agent_free", || {
        if !agent.is_null() {
            // SAFETY: a live agent from `Box::into_raw`, handed back once.
            let a = unsafe { Box::from_raw(agent) };
            a.agent.shutdown();
        }
        Ok(())
    })
}

/// Shuts the agent down without freeing it: afterwards every call on it
/// fails with `KVXFER_ERR_SHUT_DOWN`. Idempotent.
///
/// # Safety
///
/// `agent` is NULL (`KVXFER_ERR_NULL_POINTER`) or a live agent.
#[no_mangle]
pub unsafe extern "C" fn kvxfer_agent_shutdown(agent: *const kvxfer_agent) -> kvxfer_status {
    guard("kvxfer_agent_shutdown", || {
        // SAFETY: per this function's contract.
        unsafe { deref(agent, "agent") }?.agent.shutdown();
        Ok(())
    })
}

/// Stores the agent's backend name ("UCX", "LIBFABRIC" or "CUDA_IPC") in
/// `*name`: a static string, never to be freed.
///
/// # Safety
///
/// `agent` is NULL or live; `name` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvxfer_agent_backend(
    agent: *const kvxfer_agent,
    name: *mut *const c_char,
) -> kvxfer_status {
    guard("kvxfer_agent_backend", || {
        // SAFETY: per this function's contract.
        let a = unsafe { deref(agent, "agent") }?;
        if name.is_null() {
            return Err(Fail::Null("name"));
        }
        let s: &'static CStr = a.agent.backend().descriptor().c_name;
        // SAFETY: non-NULL and writable per the contract.
        unsafe { *name = s.as_ptr() };
        Ok(())
    })
}

/// Writes where the agent's side channel listens ("ip:port", the port
/// chosen) to `buf` (`cap` bytes, NUL-terminated) and its length to
/// `*len` (if not NULL). `KVXFER_ERR_BUFFER_TOO_SMALL` if it does not fit
/// (`*len` is still set); `KVXFER_ERR_UNSUPPORTED` if it serves none.
///
/// # Safety
///
/// `agent` is NULL or live; `buf` is NULL or writable for `cap` bytes;
/// `len` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvxfer_agent_listen_addr(
    agent: *const kvxfer_agent,
    buf: *mut c_char,
    cap: usize,
    len: *mut usize,
) -> kvxfer_status {
    guard("kvxfer_agent_listen_addr", || {
        // SAFETY: per this function's contract.
        let a = unsafe { deref(agent, "agent") }?;
        let Some(addr) = a.agent.listen_addr() else {
            return Err(Fail::Arg(
                kvxfer_status::KVXFER_ERR_UNSUPPORTED,
                format!("agent {:?} serves no side channel", a.agent.name()),
            ));
        };
        let s = addr.to_string();
        // SAFETY: per this function's contract.
        unsafe { copy_out(s.as_bytes(), true, buf.cast(), cap, len) }
    })
}

// ---- memory ----

/// Registers `len` bytes at `addr` on device `dev` as memory of `kind` (a
/// [`kvxfer_mem_kind`]), for local use in transfers and for peers that
/// load this agent's metadata afterwards.
///
/// Ownership: the memory stays the caller's; it must stay allocated until
/// [`kvxfer_deregister`] returns `KVXFER_OK`, and transfers may change it
/// at any time meanwhile.
///
/// # Safety
///
/// `agent` is NULL or live; the memory is as described above.
#[no_mangle]
pub unsafe extern "C" fn kvxfer_register(
    agent: *const kvxfer_agent,
    addr: u64,
    len: u64,
    dev: u32,
    kind: u32,
) -> kvxfer_status {
    guard("kvxfer_register", || {
        // SAFETY: per this function's contract.
        let a = unsafe { deref(agent, "agent") }?;
        let kind = match kind {
            0 => MemKind::Dram,
            1 => MemKind::Vram,
            _ => {
                return Err(bad_arg(format!(
                    "memory kind {kind} is neither KVXFER_DRAM (0) nor KVXFER_VRAM (1)"
                )))
            }
        };
        // SAFETY: the caller keeps the memory allocated until it is
        // deregistered and accepts that transfers change it.
        unsafe { a.agent.register(addr, len, dev, kind) }?;
        Ok(())
    })
}

/// Deregisters the region that starts at `addr`. Refused with
/// `KVXFER_ERR_BUSY` while requests or prepared lists use it. Only
/// `KVXFER_OK` means the memory may be freed.
///
/// # Safety
///
/// `agent` is NULL or live.
#[no_mangle]
pub unsafe extern "C" fn kvxfer_deregister(agent: *const kvxfer_agent, addr: u64) -> kvxfer_status {
    guard("kvxfer_deregister", || {
        // SAFETY: per this function's contract.
        unsafe { deref(agent, "agent") }?.agent.deregister(addr)?;
        Ok(())
    })
}

// ---- peers ----

/// Writes the agent's metadata (name, backend address, registered regions
/// and their keys) to `buf` (`cap` bytes) and its length to `*len`. With
/// `buf` NULL and `cap` 0 only the length is written; a buffer too small
/// is `KVXFER_ERR_BUFFER_TOO_SMALL` with `*len` set.
///
/// # Safety
///
/// `agent` is NULL or live; `buf` is NULL or writable for `cap` bytes;
/// `len` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvxfer_local_metadata(
    agent: *const kvxfer_agent,
    buf: *mut u8,
    cap: usize,
    len: *mut usize,
) -> kvxfer_status {
    guard("kvxfer_local_metadata", || {
        // SAFETY: per this function's contract.
        let a = unsafe { deref(agent, "agent") }?;
        let md = a.agent.local_metadata()?;
        // SAFETY: per this function's contract.
        unsafe { copy_out(&md, false, buf, cap, len) }
    })
}

/// Loads a peer's metadata (`blob_len` bytes at `blob`, from its
/// [`kvxfer_local_metadata`]), replacing an earlier load of the same name,
/// and writes the peer's name to `name` (`name_cap` bytes, NUL-terminated;
/// NULL with `name_cap` 0 skips it) and its length to `*name_len` (if not
/// NULL).
///
/// # Safety
///
/// `agent` is NULL or live; `blob` readable for `blob_len` bytes; `name`
/// NULL or writable for `name_cap` bytes; `name_len` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvxfer_load_remote(
    agent: *const kvxfer_agent,
    blob: *const u8,
    blob_len: usize,
    name: *mut c_char,
    name_cap: usize,
    name_len: *mut usize,
) -> kvxfer_status {
    guard("kvxfer_load_remote", || {
        // SAFETY: per this function's contract.
        let a = unsafe { deref(agent, "agent") }?;
        // SAFETY: per this function's contract.
        let blob = unsafe { slice(blob, blob_len, "blob") }?;
        let peer = a.agent.load_remote(blob)?;
        // SAFETY: per this function's contract.
        unsafe { copy_out(peer.as_bytes(), true, name.cast(), name_cap, name_len) }
    })
}

/// Connects to the agent whose side channel listens on `addr`
/// ("ip:port"): fetches and loads its metadata and pushes ours, so that it
/// can reach this agent too. Writes the peer's name as
/// [`kvxfer_load_remote`] does.
///
/// # Safety
///
/// `agent` is NULL or live; `addr` NULL or NUL-terminated; `name` NULL or
/// writable for `name_cap` bytes; `name_len` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvxfer_connect(
    agent: *const kvxfer_agent,
    addr: *const c_char,
    name: *mut c_char,
    name_cap: usize,
    name_len: *mut usize,
) -> kvxfer_status {
    guard("kvxfer_connect", || {
        // SAFETY: per this function's contract.
        let a = unsafe { deref(agent, "agent") }?;
        // SAFETY: per this function's contract.
        let addr = unsafe { text(addr, "addr") }?;
        let peer = a.agent.connect(addr)?;
        // SAFETY: per this function's contract.
        unsafe { copy_out(peer.as_bytes(), true, name.cast(), name_cap, name_len) }
    })
}

/// Checks that each of the `n` descriptors lies in a region `peer`
/// published: `KVXFER_OK`, or the first bad one named.
///
/// # Safety
///
/// `agent` is NULL or live; `peer` NULL or NUL-terminated; `descs` NULL
/// or readable for `n` descriptors.
#[no_mangle]
pub unsafe extern "C" fn kvxfer_check_remote(
    agent: *const kvxfer_agent,
    peer: *const c_char,
    descs: *const kvxfer_desc,
    n: usize,
) -> kvxfer_status {
    guard("kvxfer_check_remote", || {
        // SAFETY: per this function's contract.
        let a = unsafe { deref(agent, "agent") }?;
        // SAFETY: per this function's contract.
        let peer = unsafe { text(peer, "peer") }?;
        // SAFETY: per this function's contract.
        let d = to_descs(unsafe { slice(descs, n, "descs") }?);
        a.agent.check_remote(peer, &d)?;
        Ok(())
    })
}

/// Forgets `peer`: its connection and keys are released; requests and
/// lists made against it fail with `KVXFER_ERR_RELEASED`.
///
/// # Safety
///
/// `agent` is NULL or live; `peer` NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn kvxfer_invalidate_remote(
    agent: *const kvxfer_agent,
    peer: *const c_char,
) -> kvxfer_status {
    guard("kvxfer_invalidate_remote", || {
        // SAFETY: per this function's contract.
        let a = unsafe { deref(agent, "agent") }?;
        // SAFETY: per this function's contract.
        let peer = unsafe { text(peer, "peer") }?;
        a.agent.invalidate_remote(peer)?;
        Ok(())
    })
}

// ---- transfers ----

/// Validates a transfer of `op` (a [`kvxfer_op`]) between `local[i]` and
/// `remote[i]` (at `peer`) without starting it; start it with
/// [`kvxfer_xfer_post`], as often as needed. `notification`
/// (`notification_len` bytes; NULL: none) reaches the peer after the data.
///
/// Ownership: the lists, `peer` and `notification` are borrowed for the
/// call. If `*xfer` is NULL a new handle is stored there, which the caller
/// frees with [`kvxfer_xfer_free`]; if it holds a handle, that handle's
/// request is released first and the handle reused. On failure a reused
/// handle is left released.
///
/// # Safety
///
/// `agent` is NULL or live; the lists NULL or readable for their counts;
/// `peer` NULL or NUL-terminated; `notification` NULL or readable for
/// `notification_len` bytes; `xfer` NULL or writable, `*xfer` NULL or a
/// live handle not used by another thread.
#[no_mangle]
pub unsafe extern "C" fn kvxfer_prepare(
    agent: *const kvxfer_agent,
    op: u32,
    local: *const kvxfer_desc,
    local_len: usize,
    remote: *const kvxfer_desc,
    remote_len: usize,
    peer: *const c_char,
    notification: *const u8,
    notification_len: usize,
    xfer: *mut *mut kvxfer_xfer,
) -> kvxfer_status {
    guard("kvxfer_prepare", || {
        // SAFETY: per this function's contract (each helper checks NULL).
        let (a, op, local, remote, peer, note) = unsafe {
            (
                deref(agent, "agent")?,
                op_of(op)?,
                to_descs(slice(local, local_len, "local")?),
                to_descs(slice(remote, remote_len, "remote")?),
                text(peer, "peer")?,
                opt_bytes(notification, notification_len)?,
            )
        };
        // SAFETY: `xfer` as in this function's contract.
        unsafe { release_old(xfer) }?;
        let req = a.agent.prepare(op, &local, &remote, peer, note)?;
        // SAFETY: `xfer` is non-NULL (checked by `release_old`) and valid.
        unsafe { store(xfer, req) };
        Ok(())
    })
}

/// Resolves `n` descriptors against this agent's registrations once, for
/// [`kvxfer_make_xfer`], and stores the list in `*out`. The list keeps its
/// regions registered until [`kvxfer_release_local`].
///
/// # Safety
///
/// `agent` is NULL or live; `descs` NULL or readable for `n`; `out` NULL or
/// writable.
#[no_mangle]
pub unsafe extern "C" fn kvxfer_prep_local(
    agent: *const kvxfer_agent,
    descs: *const kvxfer_desc,
    n: usize,
    out: *mut kvxfer_local_list,
) -> kvxfer_status {
    guard("kvxfer_prep_local", || {
        // SAFETY: per this function's contract.
        let a = unsafe { deref(agent, "agent") }?;
        // SAFETY: per this function's contract.
        let d = to_descs(unsafe { slice(descs, n, "descs") }?);
        if out.is_null() {
            return Err(Fail::Null("out"));
        }
        let l = a.agent.prep_local(&d)?;
        // SAFETY: non-NULL and writable per the contract.
        unsafe {
            *out = kvxfer_local_list {
                opaque: pack(l.index, l.generation),
            }
        };
        Ok(())
    })
}

/// Resolves `n` descriptors against the regions `peer` published, once,
/// and stores the list in `*out`. It goes stale (`KVXFER_ERR_RELEASED`)
/// when the peer is reloaded or invalidated.
///
/// # Safety
///
/// `agent` is NULL or live; `peer` NULL or NUL-terminated; `descs` NULL or
/// readable for `n`; `out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvxfer_prep_remote(
    agent: *const kvxfer_agent,
    peer: *const c_char,
    descs: *const kvxfer_desc,
    n: usize,
    out: *mut kvxfer_remote_list,
) -> kvxfer_status {
    guard("kvxfer_prep_remote", || {
        // SAFETY: per this function's contract.
        let a = unsafe { deref(agent, "agent") }?;
        // SAFETY: per this function's contract.
        let peer = unsafe { text(peer, "peer") }?;
        // SAFETY: per this function's contract.
        let d = to_descs(unsafe { slice(descs, n, "descs") }?);
        if out.is_null() {
            return Err(Fail::Null("out"));
        }
        let l = a.agent.prep_remote(peer, &d)?;
        // SAFETY: non-NULL and writable per the contract.
        unsafe {
            *out = kvxfer_remote_list {
                opaque: pack(l.index, l.generation),
            }
        };
        Ok(())
    })
}

/// Releases a local list; using it afterwards is `KVXFER_ERR_RELEASED`.
///
/// # Safety
///
/// `agent` is NULL or live.
#[no_mangle]
pub unsafe extern "C" fn kvxfer_release_local(
    agent: *const kvxfer_agent,
    list: kvxfer_local_list,
) -> kvxfer_status {
    guard("kvxfer_release_local", || {
        // SAFETY: per this function's contract.
        let a = unsafe { deref(agent, "agent") }?;
        a.agent.release_local(local_list(list))?;
        Ok(())
    })
}

/// Releases a remote list; using it afterwards is `KVXFER_ERR_RELEASED`.
///
/// # Safety
///
/// `agent` is NULL or live.
#[no_mangle]
pub unsafe extern "C" fn kvxfer_release_remote(
    agent: *const kvxfer_agent,
    list: kvxfer_remote_list,
) -> kvxfer_status {
    guard("kvxfer_release_remote", || {
        // SAFETY: per this function's contract.
        let a = unsafe { deref(agent, "agent") }?;
        a.agent.release_remote(remote_list(list))?;
        Ok(())
    })
}

/// Makes a transfer (not yet posted) from prepared lists: pair `k` moves
/// `local[local_idx[k]]` and `remote[remote_idx[k]]`. Allocates nothing
/// when `*xfer` holds a handle to reuse. Ownership of `*xfer` as for
/// [`kvxfer_prepare`].
///
/// # Safety
///
/// `agent` is NULL or live; the index arrays NULL or readable for their
/// counts; `notification` NULL or readable for `notification_len` bytes;
/// `xfer` NULL or writable, `*xfer` NULL or a live handle not used by
/// another thread.
#[no_mangle]
pub unsafe extern "C" fn kvxfer_make_xfer(
    agent: *const kvxfer_agent,
    op: u32,
    local: kvxfer_local_list,
    local_idx: *const u32,
    local_idx_len: usize,
    remote: kvxfer_remote_list,
    remote_idx: *const u32,
    remote_idx_len: usize,
    notification: *const u8,
    notification_len: usize,
    xfer: *mut *mut kvxfer_xfer,
) -> kvxfer_status {
    guard("kvxfer_make_xfer", || {
        // SAFETY: per this function's contract (each helper checks NULL).
        let (a, op, li, ri, note) = unsafe {
            (
                deref(agent, "agent")?,
                op_of(op)?,
                slice(local_idx, local_idx_len, "local_idx")?,
                slice(remote_idx, remote_idx_len, "remote_idx")?,
                opt_bytes(notification, notification_len)?,
            )
        };
        // SAFETY: `xfer` as in this function's contract.
        unsafe { release_old(xfer) }?;
        let req = a
            .agent
            .make_xfer(op, local_list(local), li, remote_list(remote), ri, note)?;
        // SAFETY: `xfer` is non-NULL (checked by `release_old`) and valid.
        unsafe { store(xfer, req) };
        Ok(())
    })
}

/// The live request of a handle, or why there is none.
///
/// # Safety
///
/// `xfer` is NULL or a live handle.
unsafe fn request<'a>(xfer: *const kvxfer_xfer) -> Result<&'a XferRequest, Fail> {
    // SAFETY: per the caller.
    let h = unsafe { deref(xfer, "xfer") }?;
    h.req.as_ref().ok_or_else(|| {
        Fail::Arg(
            kvxfer_status::KVXFER_ERR_RELEASED,
            String::from("the transfer was released"),
        )
    })
}

/// Writes `s` to `out` if not NULL; a failed state becomes its error.
///
/// # Safety
///
/// `out` is NULL or writable.
unsafe fn report(
    s: Result<XferState, kvxfer::Error>,
    out: *mut kvxfer_xfer_state,
) -> Result<(), Fail> {
    let st = match &s {
        Ok(s) => state_of(s),
        Err(_) => kvxfer_xfer_state::KVXFER_XFER_FAILED,
    };
    if !out.is_null() {
        // SAFETY: writable per the caller.
        unsafe { *out = st };
    }
    match s {
        Ok(XferState::Failed(e)) | Err(e) => Err(Fail::Kvx(e)),
        Ok(_) => Ok(()),
    }
}

/// Posts (or re-posts) the transfer and writes its state right after to
/// `*state` (if not NULL): `KVXFER_XFER_DONE` when it completed inline.
/// Allocates nothing. Refused with `KVXFER_ERR_BUSY` while a previous post
/// runs.
///
/// # Safety
///
/// `xfer` is NULL or a live handle; `state` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvxfer_xfer_post(
    xfer: *const kvxfer_xfer,
    state: *mut kvxfer_xfer_state,
) -> kvxfer_status {
    guard("kvxfer_xfer_post", || {
        // SAFETY: per this function's contract.
        let r = unsafe { request(xfer) }?;
        // SAFETY: per this function's contract.
        unsafe { report(r.post(), state) }
    })
}

/// Writes the transfer's state to `*state`. A failed transfer writes
/// `KVXFER_XFER_FAILED` and returns its error. Allocates nothing unless it
/// fails.
///
/// # Safety
///
/// `xfer` is NULL or a live handle; `state` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvxfer_xfer_status(
    xfer: *const kvxfer_xfer,
    state: *mut kvxfer_xfer_state,
) -> kvxfer_status {
    guard("kvxfer_xfer_status", || {
        // SAFETY: per this function's contract.
        let r = unsafe { request(xfer) }?;
        if state.is_null() {
            return Err(Fail::Null("state"));
        }
        // SAFETY: per this function's contract.
        unsafe { report(r.status(), state) }
    })
}

/// Waits up to `timeout_ms` milliseconds (negative: without limit) for the
/// transfer to finish and writes its state to `*state` (if not NULL):
/// `KVXFER_XFER_DONE`, `KVXFER_XFER_FAILED` with its error returned, or
/// `KVXFER_XFER_IN_PROGRESS` when the time ran out (`KVXFER_XFER_PREPARED`
/// if it was never posted) with `KVXFER_OK`.
///
/// # Safety
///
/// `xfer` is NULL or a live handle; `state` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvxfer_xfer_wait(
    xfer: *const kvxfer_xfer,
    timeout_ms: i64,
    state: *mut kvxfer_xfer_state,
) -> kvxfer_status {
    guard("kvxfer_xfer_wait", || {
        // SAFETY: per this function's contract.
        let r = unsafe { request(xfer) }?;
        let outcome = if timeout_ms < 0 {
            loop {
                match r.wait(Duration::from_secs(3600)) {
                    WaitOutcome::InProgress
                        if r.status().is_ok_and(|s| s != XferState::Prepared) => {}
                    o => break o,
                }
            }
        } else {
            r.wait(Duration::from_millis(timeout_ms as u64))
        };
        let s = match outcome {
            WaitOutcome::Done => Ok(XferState::Done),
            WaitOutcome::Failed(e) => Err(e),
            // Never posted (Prepared), or still running.
            WaitOutcome::InProgress => match r.status() {
                Ok(XferState::Prepared) => Ok(XferState::Prepared),
                _ => Ok(XferState::InProgress),
            },
        };
        // SAFETY: per this function's contract.
        unsafe { report(s, state) }
    })
}

/// Releases the transfer: one in flight is cancelled where the transport
/// can, else waited for (bounded). The handle stays valid: reuse it in
/// [`kvxfer_prepare`] / [`kvxfer_make_xfer`], or free it; any other call on
/// it fails with `KVXFER_ERR_RELEASED`. Releasing twice is `KVXFER_OK`.
///
/// # Safety
///
/// `xfer` is NULL or a live handle not used by another thread.
#[no_mangle]
pub unsafe extern "C" fn kvxfer_xfer_release(xfer: *mut kvxfer_xfer) -> kvxfer_status {
    guard("kvxfer_xfer_release", || {
        // SAFETY: per this function's contract.
        let h = unsafe { xfer.as_mut() }.ok_or(Fail::Null("xfer"))?;
        if let Some(req) = h.req.take() {
            req.release()?;
        }
        Ok(())
    })
}

/// Releases the transfer (as [`kvxfer_xfer_release`]) and frees the
/// handle, even if releasing reports an error (returned). NULL is allowed.
///
/// Ownership: takes `xfer`; it must not be used again.
///
/// # Safety
///
/// `xfer` is NULL or a live handle not used by another thread.
#[no_mangle]
pub unsafe extern "C" fn kvxfer_xfer_free(xfer: *mut kvxfer_xfer) -> kvxfer_status {
    guard("kvxfer_xfer_free", || {
        if xfer.is_null() {
            return Ok(());
        }
        // SAFETY: a live handle from `Box::into_raw`, handed back once.
        let h = unsafe { Box::from_raw(xfer) };
        match h.req {
            Some(req) => Ok(req.release()?),
            None => Ok(()),
        }
    })
}

// ---- notifications ----

/// Sends `msg` (`msg_len` bytes) to `peer`, outside any transfer.
///
/// # Safety
///
/// `agent` is NULL or live; `peer` NULL or NUL-terminated; `msg` NULL
/// (only with `msg_len` 0) or readable for `msg_len` bytes.
#[no_mangle]
pub unsafe extern "C" fn kvxfer_notify(
    agent: *const kvxfer_agent,
    peer: *const c_char,
    msg: *const u8,
    msg_len: usize,
) -> kvxfer_status {
    guard("kvxfer_notify", || {
        // SAFETY: per this function's contract.
        let a = unsafe { deref(agent, "agent") }?;
        // SAFETY: per this function's contract.
        let peer = unsafe { text(peer, "peer") }?;
        // SAFETY: per this function's contract.
        let msg = unsafe { slice(msg, msg_len, "msg") }?;
        a.agent.notify(peer, msg)?;
        Ok(())
    })
}

/// Takes every notification received so far and hands each to `cb`, by
/// sender, oldest first. Lost notifications fail with
/// `KVXFER_ERR_NOTIFICATIONS_LOST` naming the sender (messages then stay
/// for the next call).
///
/// # Safety
///
/// `agent` is NULL or live; `cb` is a function as described at
/// [`kvxfer_notification_fn`]; `ctx` is passed to it unchanged.
#[no_mangle]
pub unsafe extern "C" fn kvxfer_take_notifications(
    agent: *const kvxfer_agent,
    cb: kvxfer_notification_fn,
    ctx: *mut c_void,
) -> kvxfer_status {
    guard("kvxfer_take_notifications", || {
        // SAFETY: per this function's contract.
        let a = unsafe { deref(agent, "agent") }?;
        let cb = cb.ok_or(Fail::Null("cb"))?;
        for (peer, msgs) in a.agent.take_notifications()? {
            for m in msgs {
                // SAFETY: `cb` is a valid function per the contract; the
                // pointers are valid for the lengths given during the call.
                unsafe { cb(ctx, peer.as_ptr().cast(), peer.len(), m.as_ptr(), m.len()) };
            }
        }
        Ok(())
    })
}
