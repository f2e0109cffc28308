//! Transfers: prepare, prepared lists, post, status, wait, release.

use super::*;

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
