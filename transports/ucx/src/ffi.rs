//! The FFI boundary: UCS status constants, the UCP configuration, and the
//! callbacks UCX calls (request completion, endpoint failure,
//! notifications).

use std::ffi::{c_void, CString};
use std::ptr;
use std::rc::Rc;

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
            crate::inline::WRITE_AM_ID,
            crate::inline::write_received as AmHandler,
            inline_arg,
        ),
        (
            crate::inline::ACK_AM_ID,
            crate::inline::ack_received as AmHandler,
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

/// A UCP context (`ucp_context_h`), released with `ucp_cleanup` when the
/// last handle owning it (worker, memory handles) is gone.
pub(crate) struct Context {
    raw: sys::ucp_context_h,
}

impl Context {
    /// A context with RMA, active messages and wake-up, configured from
    /// `config`.
    pub(crate) fn new(config: &ConfigGuard) -> Result<Rc<Context>, Error> {
        let params = sys::ucp_params_t {
            field_mask: u64::from(sys::UCP_PARAM_FIELD_FEATURES),
            features: u64::from(
                sys::UCP_FEATURE_RMA | sys::UCP_FEATURE_AM | sys::UCP_FEATURE_WAKEUP,
            ),
            ..Default::default()
        };
        let mut raw: sys::ucp_context_h = ptr::null_mut();
        // SAFETY: params and config are valid for the call; the out pointer
        // is valid. ucp_init (a static inline) is exactly this call.
        let st = unsafe {
            sys::ucp_init_version(
                sys::UCP_API_MAJOR,
                sys::UCP_API_MINOR,
                &params,
                config.0,
                &mut raw,
            )
        };
        if st != UCS_OK {
            return Err(ucs_error("creating the UCP context", st));
        }
        Ok(Rc::new(Context { raw }))
    }

    /// Whether the context can use CUDA memory: UCX was built with CUDA
    /// and its `cuda` module loaded (it needs the CUDA driver).
    pub(crate) fn supports_cuda(&self) -> bool {
        let mut attr = sys::ucp_context_attr_t {
            field_mask: u64::from(sys::UCP_ATTR_FIELD_MEMORY_TYPES),
            ..Default::default()
        };
        // SAFETY: the context is live; attr is valid for the call.
        let st = unsafe { sys::ucp_context_query(self.raw, &mut attr) };
        if st != UCS_OK {
            log::debug!("UCX: ucp_context_query failed ({st}); host memory only");
            return false;
        }
        attr.memory_types & (1u64 << sys::UCS_MEMORY_TYPE_CUDA) != 0
    }

    /// What `ucp_context_print_info` prints about the context.
    pub(crate) fn info(&self) -> String {
        extern "C" {
            fn open_memstream(ptr: *mut *mut std::ffi::c_char, size: *mut usize) -> *mut sys::FILE;
            fn fclose(stream: *mut sys::FILE) -> std::ffi::c_int;
            fn free(p: *mut c_void);
        }
        let mut buf: *mut std::ffi::c_char = ptr::null_mut();
        let mut size: usize = 0;
        // SAFETY: both out pointers are valid; the stream is closed below.
        let stream = unsafe { open_memstream(&mut buf, &mut size) };
        if stream.is_null() {
            return String::new();
        }
        // SAFETY: the context is live and the stream open.
        unsafe { sys::ucp_context_print_info(self.raw, stream) };
        // SAFETY: the stream is open and closed once; after fclose `buf`
        // holds `size` bytes (NUL-terminated) owned by us, freed once.
        unsafe {
            fclose(stream);
            if buf.is_null() {
                String::new()
            } else {
                let t = String::from_utf8_lossy(std::slice::from_raw_parts(buf.cast::<u8>(), size))
                    .into_owned();
                free(buf.cast::<c_void>());
                t
            }
        }
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: the last owner is gone (workers and memory handles hold
        // an `Rc` of it), so nothing of the context is in use; released
        // once.
        unsafe { sys::ucp_cleanup(self.raw) };
    }
}

/// A serialized UCP worker (`ucp_worker_h`), owning its context;
/// destroyed with `ucp_worker_destroy` in Drop, after the transport has
/// closed its endpoints.
pub(crate) struct Worker {
    raw: sys::ucp_worker_h,
    ctx: Rc<Context>,
    /// Left to the process ([`leak`](Worker::leak)): never destroyed.
    leaked: bool,
}

impl Worker {
    /// A worker of `ctx` in `UCS_THREAD_MODE_SERIALIZED`.
    pub(crate) fn new(ctx: &Rc<Context>) -> Result<Worker, Error> {
        let wparams = sys::ucp_worker_params_t {
            field_mask: u64::from(sys::UCP_WORKER_PARAM_FIELD_THREAD_MODE),
            thread_mode: sys::UCS_THREAD_MODE_SERIALIZED,
            ..Default::default()
        };
        let mut raw: sys::ucp_worker_h = ptr::null_mut();
        // SAFETY: the context is live; params and out pointer are valid.
        let st = unsafe { sys::ucp_worker_create(ctx.raw, &wparams, &mut raw) };
        if st != UCS_OK {
            return Err(ucs_error("creating the UCP worker", st));
        }
        Ok(Worker {
            raw,
            ctx: Rc::clone(ctx),
            leaked: false,
        })
    }

    /// Leaves the worker and its context to the process: neither is ever
    /// destroyed (for requests UCX cannot end, which may still use them).
    pub(crate) fn leak(&mut self) {
        if !self.leaked {
            self.leaked = true;
            std::mem::forget(Rc::clone(&self.ctx));
        }
    }

    /// The raw handle, for calls on it.
    pub(crate) fn raw(&self) -> sys::ucp_worker_h {
        self.raw
    }

    /// Runs `ucp_worker_progress` once; returns whether anything happened.
    /// Callbacks run inside it.
    pub(crate) fn progress(&mut self) -> bool {
        // SAFETY: the worker is live and `&mut self` serializes calls.
        unsafe { sys::ucp_worker_progress(self.raw) != 0 }
    }

    /// Sets the handler of active messages `id` to `cb` with `arg`.
    ///
    /// # Safety
    ///
    /// `arg` is what `cb` expects and stays valid as long as the worker.
    pub(crate) unsafe fn set_am_handler(
        &mut self,
        id: u32,
        cb: AmHandler,
        arg: *mut c_void,
    ) -> Result<(), Error> {
        let am = sys::ucp_am_handler_param_t {
            field_mask: u64::from(
                sys::UCP_AM_HANDLER_PARAM_FIELD_ID
                    | sys::UCP_AM_HANDLER_PARAM_FIELD_CB
                    | sys::UCP_AM_HANDLER_PARAM_FIELD_ARG
                    | sys::UCP_AM_HANDLER_PARAM_FIELD_FLAGS,
            ),
            id,
            flags: sys::UCP_AM_FLAG_WHOLE_MSG,
            cb: Some(cb),
            arg,
        };
        // SAFETY: the worker is live; `arg` outlives it (the caller's
        // contract).
        let st = unsafe { sys::ucp_worker_set_am_recv_handler(self.raw, &am) };
        if st != UCS_OK {
            return Err(ucs_error("setting the active-message handlers", st));
        }
        Ok(())
    }

    /// Arms the worker's wake-up descriptor: `Some(fd)` to sleep on, or
    /// `None` when there is work (or no descriptor).
    pub(crate) fn arm(&mut self) -> Result<std::ffi::c_int, bool> {
        let mut fd: std::ffi::c_int = -1;
        // SAFETY: the worker is live; the out pointer is valid. The worker
        // was created with UCP_FEATURE_WAKEUP.
        if unsafe { sys::ucp_worker_get_efd(self.raw, &mut fd) } != UCS_OK || fd < 0 {
            return Err(false);
        }
        // SAFETY: the worker is live and `&mut self` serializes calls.
        match unsafe { sys::ucp_worker_arm(self.raw) } {
            UCS_OK => Ok(fd),
            _ => Err(true),
        }
    }

    /// The context the worker belongs to.
    pub(crate) fn context(&self) -> &Rc<Context> {
        &self.ctx
    }

    /// The worker's packed address, as peers connect to it.
    pub(crate) fn address(&self) -> Result<Vec<u8>, Error> {
        let mut addr: *mut sys::ucp_address_t = ptr::null_mut();
        let mut addr_len: usize = 0;
        // SAFETY: the worker is live; out pointers are valid.
        let st = unsafe { sys::ucp_worker_get_address(self.raw, &mut addr, &mut addr_len) };
        if st != UCS_OK {
            return Err(ucs_error("getting the worker address", st));
        }
        // SAFETY: UCX returned `addr_len` readable bytes at `addr`, which we
        // copy and then release exactly once.
        unsafe {
            let v = std::slice::from_raw_parts(addr.cast::<u8>(), addr_len).to_vec();
            sys::ucp_worker_release_address(self.raw, addr);
            Ok(v)
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if self.leaked {
            return;
        }
        // SAFETY: the transport closed every endpoint before dropping the
        // worker; destroyed once. The context outlives it (`ctx`).
        unsafe { sys::ucp_worker_destroy(self.raw) };
    }
}

/// A memory registration (`ucp_mem_h`), owning its context; unmapped with
/// `ucp_mem_unmap` in Drop. Dropped only when no request uses the memory
/// (the transport keeps it in a graveyard until then).
pub(crate) struct MemHandle {
    raw: sys::ucp_mem_h,
    ctx: Rc<Context>,
}

impl MemHandle {
    /// Registers what `params` describe with `ctx`; returns the handle
    /// and its packed remote key.
    pub(crate) fn map(
        ctx: &Rc<Context>,
        params: &sys::ucp_mem_map_params_t,
        what: &str,
    ) -> Result<(MemHandle, Vec<u8>), Error> {
        let mut raw: sys::ucp_mem_h = ptr::null_mut();
        // SAFETY: the context is live; UCX only registers (pins/records) the
        // given range, which the caller owns for the registration's life.
        let st = unsafe { sys::ucp_mem_map(ctx.raw, params, &mut raw) };
        if st != UCS_OK {
            return Err(ucs_error(what, st));
        }
        let handle = MemHandle {
            raw,
            ctx: Rc::clone(ctx),
        };
        let mut buf: *mut c_void = ptr::null_mut();
        let mut size: usize = 0;
        // SAFETY: context and memory handle are live; out pointers valid.
        let st = unsafe { sys::ucp_rkey_pack(ctx.raw, raw, &mut buf, &mut size) };
        if st != UCS_OK {
            return Err(ucs_error("packing the remote key", st));
        }
        // SAFETY: UCX returned `size` readable bytes at `buf`, copied and
        // then released exactly once.
        let packed = unsafe {
            let v = std::slice::from_raw_parts(buf.cast::<u8>(), size).to_vec();
            sys::ucp_rkey_buffer_release(buf);
            v
        };
        Ok((handle, packed))
    }
}

impl Drop for MemHandle {
    fn drop(&mut self) {
        // SAFETY: mapped by this context (alive through `ctx`), unmapped
        // once; the transport drops the handle only when no request uses
        // the memory.
        let st = unsafe { sys::ucp_mem_unmap(self.ctx.raw, self.raw) };
        if st != UCS_OK {
            log::warn!("UCX: unmapping memory: {}", status_text(st));
        }
    }
}

/// An unpacked remote key (`ucp_rkey_h`); destroyed with
/// `ucp_rkey_destroy` in Drop, which the transport does before closing
/// the key's endpoint and only when no request uses it.
pub(crate) struct RKey {
    raw: sys::ucp_rkey_h,
}

impl RKey {
    /// Unpacks `key` for endpoint `ep`.
    ///
    /// # Safety
    ///
    /// `ep` is a live endpoint of a live worker.
    pub(crate) unsafe fn unpack(ep: sys::ucp_ep_h, key: &[u8]) -> Result<RKey, sys::ucs_status_t> {
        let mut raw: sys::ucp_rkey_h = ptr::null_mut();
        // SAFETY: the endpoint is live (the caller's contract); the key
        // bytes are valid for the call (UCX copies what it needs); the out
        // pointer is valid.
        let st = unsafe { sys::ucp_ep_rkey_unpack(ep, key.as_ptr().cast::<c_void>(), &mut raw) };
        if st != UCS_OK {
            return Err(st);
        }
        Ok(RKey { raw })
    }

    /// The raw handle, for requests using it.
    pub(crate) fn raw(&self) -> sys::ucp_rkey_h {
        self.raw
    }
}

impl Drop for RKey {
    fn drop(&mut self) {
        // SAFETY: the key is live and destroyed once; no request uses it
        // and its endpoint is not closed yet (see the type's docs).
        unsafe { sys::ucp_rkey_destroy(self.raw) };
    }
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
