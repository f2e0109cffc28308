//! RAII handles of UCX objects, each owning its parent (as rust-ibverbs'
//! `CompletionQueueInner { _ctx: Arc<ContextInner> }`): context → worker,
//! memory handles; remote keys are destroyed before their endpoints close.

use std::ffi::c_void;
use std::ptr;
use std::rc::Rc;

use kvxfer_core::Error;
use ucx_sys as sys;

use super::{status_text, AmHandler, ConfigGuard, UCS_OK};
use crate::status::ucs_error;

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

    /// Removes the handler of active messages `id`: UCX drops such
    /// messages from then on (with a warning).
    pub(crate) fn clear_am_handler(&mut self, id: u32) {
        let am = sys::ucp_am_handler_param_t {
            field_mask: u64::from(
                sys::UCP_AM_HANDLER_PARAM_FIELD_ID | sys::UCP_AM_HANDLER_PARAM_FIELD_CB,
            ),
            id,
            cb: None,
            ..Default::default()
        };
        // SAFETY: the worker is live; no handler means no argument to keep.
        let st = unsafe { sys::ucp_worker_set_am_recv_handler(self.raw, &am) };
        if st != UCS_OK {
            log::debug!("UCX: clearing active-message handler {id}: status {st}");
        }
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
