//! Configuration, agents, memory registration and peers.

use super::*;

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
