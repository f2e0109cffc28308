//! The UCX transport: its UCP context and worker, its tables, and its
//! release in `Drop`.

use std::cell::{Cell, UnsafeCell};
use std::collections::VecDeque;
use std::ffi::c_void;
use std::fmt;
use std::marker::PhantomData;
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kvxfer_core::{Completion, Error};
use kvxfer_transport_common::{NoteQueue, Slab};
use ucx_sys as sys;

use crate::endpoint::{EpState, KeyEntry, RegEntry};
use crate::ffi::{
    config_modify, notification_received, set_tcp_option, tls_include_tcp, AmHandler, ConfigGuard,
    UCS_OK,
};
use crate::inline::{self, Inline};
use crate::slot::OpSlot;
use crate::status::ucs_error;
use crate::{UcxConfig, BACKEND, NOTIFICATION_AM_ID};

/// Distinguishes transports, so that a handle given out by one is refused
/// by another.
static NEXT_OWNER: AtomicU64 = AtomicU64::new(1);

/// A registered local region (a `ucp_mem_h` and its packed remote key,
/// kept in the transport's table). Hand it back with
/// [`Transport::deregister`].
#[derive(Debug)]
pub struct UcxReg {
    pub(crate) owner: u64,
    pub(crate) index: u32,
}

/// A connection to a peer (a `ucp_ep_h`, kept in the transport's table).
/// Hand it back with [`Transport::disconnect`].
#[derive(Debug)]
pub struct UcxPeer {
    pub(crate) owner: u64,
    pub(crate) index: u32,
}

/// A peer's unpacked remote key (a `ucp_rkey_h`, kept in the transport's
/// table). Hand it back with [`Transport::release_key`].
#[derive(Debug)]
pub struct UcxRemoteKey {
    pub(crate) owner: u64,
    pub(crate) index: u32,
}

/// The UCX transport: one UCP context and one worker, with tables of
/// registrations, endpoints and remote keys.
///
/// # Threads
///
/// `UcxTransport` is [`Send`]: the worker runs in
/// `UCS_THREAD_MODE_SERIALIZED`, which allows any thread to use it as long
/// as calls never overlap, and every call into UCX (and every callback UCX
/// makes, which only runs inside `ucp_worker_progress` and the other calls
/// made here) happens through `&mut self` or, for the read-only
/// `pack_key`/`local_address`, without touching UCX at all. It is not
/// [`Sync`]: sharing it between threads needs a lock around it (the std
/// shim's `Agent` keeps it in a `Mutex`), because two overlapping calls on
/// a serialized worker are undefined behaviour in UCX.
///
/// # Handles
///
/// [`UcxReg`], [`UcxPeer`] and [`UcxRemoteKey`] are index newtypes into
/// this transport's tables, stamped with the transport's identity. They
/// cannot be copied, so a handle is live until it is handed back; a handle
/// of another transport is refused. Everything still in the tables is
/// released in `Drop`, in the order UCX needs: in-flight requests, remote
/// keys, endpoints, memory handles, worker, context.
pub struct UcxTransport {
    pub(crate) owner: u64,
    pub(crate) config: UcxConfig,
    pub(crate) context: sys::ucp_context_h,
    pub(crate) worker: sys::ucp_worker_h,
    pub(crate) address: Vec<u8>,
    pub(crate) regs: Slab<RegEntry>,
    pub(crate) eps: Slab<Box<UnsafeCell<EpState>>>,
    pub(crate) keys: Slab<KeyEntry>,
    /// Boxed so that each slot keeps its address while the vector grows:
    /// request callbacks hold it as `user_data`.
    #[allow(clippy::vec_box)]
    pub(crate) slots: Vec<Box<UnsafeCell<OpSlot>>>,
    pub(crate) free_slots: Vec<u32>,
    pub(crate) active: Vec<u32>,
    pub(crate) completions: VecDeque<Completion>,
    pub(crate) notes: Box<UnsafeCell<NoteQueue>>,
    /// Endpoint states whose close did not finish in time: UCX may still
    /// call their error handler, so they live until the worker is gone.
    #[allow(clippy::vec_box)]
    pub(crate) graveyard: Vec<Box<UnsafeCell<EpState>>>,
    /// Slots of cancelled or abandoned transfers whose requests UCX still
    /// holds: reported (or dropped) already, freed once their outstanding
    /// count is zero. While any exist, the unmapping of memory and the
    /// destruction of remote keys wait in the two lists below.
    pub(crate) zombies: Vec<u32>,
    pub(crate) deferred_unmaps: Vec<sys::ucp_mem_h>,
    pub(crate) deferred_rkeys: Vec<sys::ucp_rkey_h>,
    /// Disconnected endpoints whose force close has not finished yet.
    #[allow(clippy::vec_box)]
    pub(crate) closing: Vec<Box<UnsafeCell<EpState>>>,
    /// Force closes in flight (in the endpoint table or in `closing`).
    pub(crate) open_closes: usize,
    pub(crate) scratch: Vec<*mut c_void>,
    /// Calls of `ucp_worker_progress` that did something.
    pub(crate) progress_events: u64,
    /// State of small WRITEs in one round trip, shared with their handlers.
    pub(crate) inline: Box<UnsafeCell<Inline>>,
    /// Largest small WRITE sent that way (0: none).
    pub(crate) inline_max: u64,
    /// VRAM is registered with UCX itself (see [`UcxConfig::native_vram`]).
    pub(crate) cuda: bool,
    pub(crate) _not_sync: PhantomData<Cell<()>>,
}

// SAFETY: see the type's documentation: the worker is in serialized mode
// and every UCX call and callback happens under `&mut self` (or touches no
// UCX state), so moving the transport to another thread is sound. The raw
// pointers inside are owned by this value alone.
unsafe impl Send for UcxTransport {}

impl fmt::Debug for UcxTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UcxTransport")
            .field("owner", &self.owner)
            .field("address_len", &self.address.len())
            .field("in_flight", &self.active.len())
            .finish_non_exhaustive()
    }
}

impl UcxTransport {
    /// Creates a UCP context (RMA and active messages, configured from the
    /// `UCX_*` environment variables and `config`) and a serialized worker.
    pub fn new(config: &UcxConfig) -> Result<UcxTransport, Error> {
        let mut raw_config: *mut sys::ucp_config_t = ptr::null_mut();
        // SAFETY: null prefix and file name select the defaults ("UCX_"
        // environment variables, no file); the out pointer is valid.
        let st = unsafe { sys::ucp_config_read(ptr::null(), ptr::null(), &mut raw_config) };
        if st != UCS_OK {
            return Err(ucs_error("reading the UCX configuration", st));
        }
        let ucp_config = ConfigGuard(raw_config);
        if let Some(tls) = &config.tls {
            config_modify(&ucp_config, "TLS", tls)?;
        }
        if let Some(seg) = config.tcp_seg_size {
            let tls = config.tls.clone().or_else(|| std::env::var("UCX_TLS").ok());
            if std::env::var_os("UCX_TCP_TX_SEG_SIZE").is_none()
                && std::env::var_os("UCX_TCP_RX_SEG_SIZE").is_none()
                && tls_include_tcp(tls.as_deref())
            {
                set_tcp_option(&ucp_config, "TX_SEG_SIZE", &seg.to_string())?;
                set_tcp_option(&ucp_config, "RX_SEG_SIZE", &seg.to_string())?;
            }
        }
        if let Some(interval) = config.keepalive_interval {
            if std::env::var_os("UCX_KEEPALIVE_INTERVAL").is_none() {
                let ms = interval.as_millis().max(1);
                config_modify(&ucp_config, "KEEPALIVE_INTERVAL", &format!("{ms}ms"))?;
            }
        }

        let queue_len = config.notification_queue.max(1) as usize;
        let mut transport = UcxTransport {
            owner: NEXT_OWNER.fetch_add(1, Ordering::Relaxed),
            config: config.clone(),
            context: ptr::null_mut(),
            worker: ptr::null_mut(),
            address: Vec::new(),
            regs: Slab::new(),
            eps: Slab::new(),
            keys: Slab::new(),
            slots: Vec::new(),
            free_slots: Vec::new(),
            active: Vec::new(),
            completions: VecDeque::with_capacity(64),
            notes: Box::new(UnsafeCell::new(NoteQueue::new(
                queue_len,
                config.max_notification as usize,
            ))),
            graveyard: Vec::new(),
            zombies: Vec::new(),
            deferred_unmaps: Vec::new(),
            deferred_rkeys: Vec::new(),
            closing: Vec::new(),
            open_closes: 0,
            scratch: Vec::new(),
            progress_events: 0,
            inline: Inline::new(),
            inline_max: 0,
            cuda: false,
            _not_sync: PhantomData,
        };

        let params = sys::ucp_params_t {
            field_mask: u64::from(sys::UCP_PARAM_FIELD_FEATURES),
            features: u64::from(
                sys::UCP_FEATURE_RMA | sys::UCP_FEATURE_AM | sys::UCP_FEATURE_WAKEUP,
            ),
            ..Default::default()
        };
        // SAFETY: params and config are valid for the call; the out pointer
        // is valid. ucp_init (a static inline) is exactly this call.
        let st = unsafe {
            sys::ucp_init_version(
                sys::UCP_API_MAJOR,
                sys::UCP_API_MINOR,
                &params,
                ucp_config.0,
                &mut transport.context,
            )
        };
        if st != UCS_OK {
            transport.context = ptr::null_mut();
            return Err(ucs_error("creating the UCP context", st));
        }
        drop(ucp_config);
        transport.cuda = config.native_vram && transport.supports_cuda();

        let wparams = sys::ucp_worker_params_t {
            field_mask: u64::from(sys::UCP_WORKER_PARAM_FIELD_THREAD_MODE),
            thread_mode: sys::UCS_THREAD_MODE_SERIALIZED,
            ..Default::default()
        };
        // SAFETY: the context is live; params and out pointer are valid.
        let st =
            unsafe { sys::ucp_worker_create(transport.context, &wparams, &mut transport.worker) };
        if st != UCS_OK {
            transport.worker = ptr::null_mut();
            return Err(ucs_error("creating the UCP worker", st));
        }

        let mut addr: *mut sys::ucp_address_t = ptr::null_mut();
        let mut addr_len: usize = 0;
        // SAFETY: the worker is live; out pointers are valid.
        let st = unsafe { sys::ucp_worker_get_address(transport.worker, &mut addr, &mut addr_len) };
        if st != UCS_OK {
            return Err(ucs_error("getting the worker address", st));
        }
        // SAFETY: UCX returned `addr_len` readable bytes at `addr`, which we
        // copy and then release exactly once.
        unsafe {
            transport.address = std::slice::from_raw_parts(addr.cast::<u8>(), addr_len).to_vec();
            sys::ucp_worker_release_address(transport.worker, addr);
        }

        // Notifications, and small WRITEs with their acknowledgements.
        let notes_arg = transport.notes.get().cast::<c_void>();
        let inline_arg = transport.inline.get().cast::<c_void>();
        for (id, cb, arg) in [
            (
                NOTIFICATION_AM_ID,
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
            // SAFETY: the worker is live; each handler's arg is a box the
            // transport owns (the notification queue, the Inline state),
            // which lives as long as the transport and so the worker.
            let st = unsafe { sys::ucp_worker_set_am_recv_handler(transport.worker, &am) };
            if st != UCS_OK {
                return Err(ucs_error("setting the active-message handlers", st));
            }
        }
        // Hardware RMA (InfiniBand, RoCE) needs no help for small WRITEs.
        let rdma = transport
            .resources()
            .iter()
            .any(|r| r.starts_with("rc") || r.starts_with("dc") || r.starts_with("ud"));
        if !rdma {
            transport.inline_max = u64::from(config.inline_write_max);
        }
        log::debug!(
            "UCX: transport ready, worker address of {} bytes",
            transport.address.len()
        );
        Ok(transport)
    }

    /// Whether the UCP context can use CUDA memory: UCX was built with
    /// CUDA and its `cuda` module loaded (it needs the CUDA driver).
    pub(crate) fn supports_cuda(&self) -> bool {
        let mut attr = sys::ucp_context_attr_t {
            field_mask: u64::from(sys::UCP_ATTR_FIELD_MEMORY_TYPES),
            ..Default::default()
        };
        // SAFETY: the context is live; attr is valid for the call.
        let st = unsafe { sys::ucp_context_query(self.context, &mut attr) };
        if st != UCS_OK {
            log::debug!("UCX: ucp_context_query failed ({st}); host memory only");
            return false;
        }
        attr.memory_types & (1u64 << sys::UCS_MEMORY_TYPE_CUDA) != 0
    }

    /// Whether this transport registers VRAM with UCX itself (UCX with
    /// CUDA support and [`UcxConfig::native_vram`]); otherwise it takes
    /// host memory only.
    pub fn native_vram(&self) -> bool {
        self.cuda
    }

    /// The settings this transport was created with.
    pub fn config(&self) -> &UcxConfig {
        &self.config
    }

    /// This transport's packed worker address (what
    /// [`Transport::local_address`] writes).
    pub fn worker_address(&self) -> &[u8] {
        &self.address
    }

    /// Runs `ucp_worker_progress` once; returns whether anything happened.
    pub fn progress(&mut self) -> bool {
        // SAFETY: the worker is live (new() fails otherwise) and `&mut self`
        // serializes calls.
        let busy = unsafe { sys::ucp_worker_progress(self.worker) != 0 };
        if busy {
            self.progress_events = self.progress_events.wrapping_add(1);
        }
        busy
    }

    /// How many calls of `ucp_worker_progress` (from [`progress`],
    /// [`Transport::poll`] and the other calls that progress) did
    /// something so far. A target serving a peer's RMA in software (UCX
    /// emulates RMA over active messages on `tcp`) completes no transfer
    /// of its own, so a progress loop watches this count to know that it
    /// is busy and must keep polling.
    ///
    /// [`progress`]: UcxTransport::progress
    pub fn progress_events(&self) -> u64 {
        self.progress_events
    }

    /// Small WRITEs from peers this transport copied into place and
    /// refused (outside memory registered here), as one active message
    /// each (see [`UcxConfig::inline_write_max`]).
    pub fn small_writes_served(&self) -> (u64, u64) {
        // SAFETY: handlers run only inside progress, which `&self` excludes.
        let st = unsafe { &*self.inline.get() };
        (st.served, st.refused)
    }

    /// The largest WRITE this transport sends as one active message (0
    /// when it does not: turned off, or hardware RMA is available).
    pub fn inline_write_max(&self) -> u64 {
        self.inline_max
    }

    /// The transports and devices this transport's UCP context may use
    /// (`"tcp/lo"`, `"posix/memory"`, …), as UCX lists its resources after
    /// applying `UCX_TLS`.
    pub fn resources(&self) -> Vec<String> {
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
            return Vec::new();
        }
        // SAFETY: the context is live and the stream open.
        unsafe { sys::ucp_context_print_info(self.context, stream) };
        // SAFETY: the stream is open and closed once; after fclose `buf`
        // holds `size` bytes (NUL-terminated) owned by us.
        let text = unsafe {
            fclose(stream);
            if buf.is_null() {
                String::new()
            } else {
                let t = String::from_utf8_lossy(std::slice::from_raw_parts(buf.cast::<u8>(), size))
                    .into_owned();
                free(buf.cast::<c_void>());
                t
            }
        };
        parse_resources(&text)
    }

    pub(crate) fn foreign(&self, what: &'static str) -> Error {
        let _ = self;
        Error::backend(
            BACKEND,
            i64::from(sys::UCS_ERR_INVALID_PARAM as sys::ucs_status_t),
            what,
        )
    }

    pub(crate) fn ep_state(&self, index: u32) -> Option<*mut EpState> {
        self.eps.get(index).map(|b| b.get())
    }

    pub(crate) fn slot_ptr(&self, index: u32) -> *mut OpSlot {
        self.slots[index as usize].get()
    }
}

/// The `tl/dev` names of the resource lines of `ucp_context_print_info`
/// (`#      resource 1  :  md 1  dev 1  flags -- tcp/lo`).
fn parse_resources(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for line in text.lines() {
        if !line.contains("resource") {
            continue;
        }
        if let Some((_, r)) = line.rsplit_once("-- ") {
            let r = r.trim().to_string();
            if !r.is_empty() && !out.contains(&r) {
                out.push(r);
            }
        }
    }
    out
}

/// Transports dropped with requests UCX could not end, whose UCX state was
/// left in place ([`abandoned_transports`]).
static ABANDONED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many transports were dropped, in this process, with requests that
/// UCX could not end (peer failure detection off, and requests still
/// running after the close timeout): their worker, endpoints, keys and
/// registrations were left in place instead of freed under them.
pub fn abandoned_transports() -> usize {
    ABANDONED.load(std::sync::atomic::Ordering::Relaxed)
}

/// How long a dropped transport keeps progressing its worker before
/// destroying it, so wire-up replies queued on UCX's internal endpoints are
/// sent (see `Drop`).
const WORKER_DRAIN: Duration = Duration::from_millis(50);

impl Drop for UcxTransport {
    fn drop(&mut self) {
        if !self.worker.is_null() {
            // 1. In-flight requests (and those of cancelled or abandoned
            //    transfers): cancel, and let them be released.
            let slots: Vec<u32> = self.active.drain(..).collect();
            for index in slots {
                self.cancel_requests(self.slot_ptr(index));
                self.retire_slot(index);
            }
            for i in 0..self.zombies.len() {
                self.cancel_requests(self.slot_ptr(self.zombies[i]));
            }
            let timeout = self.config.close_timeout;
            let released = self.progress_until(timeout, |t| {
                t.zombies.iter().all(|&i| {
                    // SAFETY: zombie slots are live; only the counter is read.
                    unsafe { (*t.slot_ptr(i)).outstanding == 0 }
                })
            });
            // Requests still running end with their endpoints' forced close,
            // before the keys and memory they use go.
            let force = !released;
            if force && !self.config.peer_failure_detection {
                // Without peer error handling a forced close is undefined
                // behaviour in UCX, so these requests cannot be ended:
                // leave everything they may use (worker, endpoints, keys,
                // memory handles, and the slots and queue UCX calls back
                // into) to the process rather than free it under them.
                log::error!(
                    "UCX: dropped with requests still running and peer failure detection \
                     off; the worker, its endpoints, keys and registrations are left in \
                     place (the registered memory must stay allocated)"
                );
                ABANDONED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                std::mem::forget(std::mem::take(&mut self.slots));
                std::mem::forget(std::mem::replace(&mut self.eps, Slab::new()));
                let notes = std::mem::replace(
                    &mut self.notes,
                    Box::new(UnsafeCell::new(NoteQueue::new(0, 0))),
                );
                std::mem::forget(notes);
                std::mem::forget(std::mem::replace(&mut self.inline, Inline::new()));
                self.worker = ptr::null_mut();
                self.context = ptr::null_mut();
                return;
            }
            // 2. Remote keys (with peer failure detection the forced close
            //    comes first when requests are still running).
            if force && self.config.peer_failure_detection {
                let eps: Vec<_> = self.eps.drain().collect();
                for state in eps {
                    self.close_ep(state, true);
                }
            }
            for key in self.keys.drain() {
                if !key.rkey.is_null() {
                    self.deferred_rkeys.push(key.rkey);
                }
            }
            for rkey in self.deferred_rkeys.drain(..) {
                // SAFETY: live rkey, destroyed once (it left the list).
                unsafe { sys::ucp_rkey_destroy(rkey) };
            }
            // 3. Endpoints, and the forced closes still running.
            let eps: Vec<_> = self.eps.drain().collect();
            for state in eps {
                self.close_ep(state, force);
            }
            let closing: Vec<_> = self.closing.drain(..).collect();
            for state in closing {
                self.close_ep(state, true);
            }
            // 4. Memory handles.
            for reg in self.regs.drain() {
                self.deferred_unmaps.push(reg.memh);
            }
            for memh in self.deferred_unmaps.drain(..) {
                // SAFETY: memh mapped by this context, unmapped once (it
                // left the list).
                unsafe { sys::ucp_mem_unmap(self.context, memh) };
            }
            // 5. The worker. UCX keeps internal endpoints for connections
            //    peers opened to us; a wire-up reply still queued on one
            //    (its TCP connection not yet established) trips an
            //    assertion inside ucp_worker_destroy in UCX 1.13, seen when
            //    an agent is dropped right after a peer connected. Progress
            //    a short, fixed time first so such replies go out.
            let deadline = Instant::now() + WORKER_DRAIN;
            while Instant::now() < deadline {
                if !self.progress() {
                    std::thread::yield_now();
                }
            }
            self.inline.get_mut().reap();
            for i in 0..self.slots.len() {
                if !Self::release_requests(self.slot_ptr(i as u32)) {
                    log::warn!("UCX: a request of slot {i} is still running at close");
                }
            }
            // SAFETY: every endpoint is closed; destroyed once.
            unsafe { sys::ucp_worker_destroy(self.worker) };
            self.worker = ptr::null_mut();
        }
        // 6. The context.
        if !self.context.is_null() {
            // SAFETY: the worker is gone; the context is released once.
            unsafe { sys::ucp_cleanup(self.context) };
            self.context = ptr::null_mut();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_parsed_from_context_info() {
        let text = "#\n# UCP context\n#\n#            md 0  :  self\n#      resource 0  :  md 0  dev 0  flags -- self/memory\n#      resource 1  :  md 1  dev 1  flags -- tcp/lo\n#      resource 2  :  md 1  dev 1  flags -- tcp/lo\n";
        assert_eq!(parse_resources(text), vec!["self/memory", "tcp/lo"]);
        assert!(parse_resources("").is_empty());
    }

    #[test]
    fn tcp_options_apply_when_ucx_tls_allows_tcp() {
        for tls in [
            None,
            Some(""),
            Some("all"),
            Some("tcp"),
            Some("posix,tcp"),
            Some("^posix"),
        ] {
            assert!(tls_include_tcp(tls), "{tls:?}");
        }
        for tls in ["posix", "sm,self", "^tcp", "^posix,tcp", "^all", "tcp_x"] {
            assert!(!tls_include_tcp(Some(tls)), "{tls}");
        }
        assert!(tls_include_tcp(Some("TCP,posix")));
        assert!(tls_include_tcp(Some("tcp:aux")));
    }

    #[test]
    fn live_context_lists_the_transports_of_ucx_tls() {
        let cfg = UcxConfig {
            tls: Some("tcp".into()),
            ..UcxConfig::default()
        };
        let t = UcxTransport::new(&cfg).unwrap();
        let r = t.resources();
        assert!(r.iter().any(|x| x.starts_with("tcp/")), "{r:?}");
        assert!(r.iter().all(|x| x.starts_with("tcp/")), "{r:?}");
        assert_eq!(t.progress_events(), 0);
        assert!(crate::version().starts_with("1."), "{}", crate::version());
        let (major, minor) = crate::version_number();
        assert!(
            crate::version().starts_with(&format!("{major}.{minor}.")),
            "{} vs {major}.{minor}",
            crate::version()
        );
    }
}
