//! The UCP context, worker, endpoints, registrations and the `Transport`
//! implementation.

use std::cell::{Cell, UnsafeCell};
use std::collections::VecDeque;
use std::ffi::{c_void, CString};
use std::fmt;
use std::marker::PhantomData;
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kvxfer_core::mem::MemKinds;

use crate::inline::{self, Inline};
use kvxfer_core::{
    Capabilities, Completion, DescError, Error, MemKind, PostStatus, Region, Segments, Side, Token,
    Transport, XferOp,
};
use ucx_sys as sys;

use crate::status::{status_text, ucs_error, xfer_error};
use crate::{UcxConfig, BACKEND, NOTIFICATION_AM_ID};

const UCS_OK: sys::ucs_status_t = sys::UCS_OK as sys::ucs_status_t;
const UCS_INPROGRESS: sys::ucs_status_t = sys::UCS_INPROGRESS as sys::ucs_status_t;

/// Distinguishes transports, so that a handle given out by one is refused
/// by another.
static NEXT_OWNER: AtomicU64 = AtomicU64::new(1);

/// A registered local region (a `ucp_mem_h` and its packed remote key,
/// kept in the transport's table). Hand it back with
/// [`Transport::deregister`].
#[derive(Debug)]
pub struct UcxReg {
    owner: u64,
    index: u32,
}

/// A connection to a peer (a `ucp_ep_h`, kept in the transport's table).
/// Hand it back with [`Transport::disconnect`].
#[derive(Debug)]
pub struct UcxPeer {
    owner: u64,
    index: u32,
}

/// A peer's unpacked remote key (a `ucp_rkey_h`, kept in the transport's
/// table). Hand it back with [`Transport::release_key`].
#[derive(Debug)]
pub struct UcxRemoteKey {
    owner: u64,
    index: u32,
}

/// A slot table with a free list; indices stay valid until removed.
struct Table<T> {
    items: Vec<Option<T>>,
    free: Vec<u32>,
}

impl<T> Table<T> {
    fn new() -> Self {
        Table {
            items: Vec::new(),
            free: Vec::new(),
        }
    }

    fn insert(&mut self, item: T) -> u32 {
        if let Some(i) = self.free.pop() {
            self.items[i as usize] = Some(item);
            i
        } else {
            self.items.push(Some(item));
            (self.items.len() - 1) as u32
        }
    }

    fn get(&self, i: u32) -> Option<&T> {
        self.items.get(i as usize).and_then(Option::as_ref)
    }

    fn remove(&mut self, i: u32) -> Option<T> {
        let item = self.items.get_mut(i as usize)?.take();
        if item.is_some() {
            self.free.push(i);
        }
        item
    }

    fn drain(&mut self) -> impl Iterator<Item = T> + '_ {
        self.free.clear();
        self.items.drain(..).flatten()
    }
}

struct RegEntry {
    memh: sys::ucp_mem_h,
    region: Region,
    packed: Vec<u8>,
}

/// An endpoint and what its error handler learnt. Boxed so that the error
/// handler's `arg` stays valid while the box lives.
struct EpState {
    /// Null once the endpoint was force-closed by an abandon.
    ep: sys::ucp_ep_h,
    /// `UCS_OK`, or the status the error handler reported (or
    /// `UCS_ERR_ENDPOINT_TIMEOUT` after a transfer on it was abandoned).
    failed: sys::ucs_status_t,
    /// The force close started by an abandon, until UCX finished it.
    closing: *mut c_void,
}

struct KeyEntry {
    /// Null once the key's endpoint was disconnected (the key was destroyed
    /// then, before the endpoint).
    rkey: sys::ucp_rkey_h,
    ep: u32,
    /// The peer's region the key covers.
    region: Region,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Phase {
    /// Puts or gets in flight.
    Data,
    /// The WRITE's endpoint flush in flight (a no-op step for READ).
    Flush,
    /// The notification's active message in flight.
    Notify,
}

/// One posted transfer (or a stand-alone notification). Boxed so that
/// request callbacks can reach it through `user_data`.
struct XferSlot {
    token: Token,
    op: XferOp,
    ep: u32,
    phase: Phase,
    /// Requests in flight (their callbacks have not run yet).
    outstanding: u32,
    /// First failure, or `UCS_OK`.
    status: sys::ucs_status_t,
    /// The request handles UCX returned, in flight or completed; freed
    /// together when the slot is freed.
    requests: Vec<*mut c_void>,
    /// The notification to send after the data (or the stand-alone one).
    note: Vec<u8>,
    has_note: bool,
    /// A stand-alone notification: no completion is reported.
    internal: bool,
    /// Registrations (table indices) its segments read or write, one entry
    /// per run of segments in the same registration.
    regs: Vec<u32>,
    /// A small WRITE sent as one active message waits for its
    /// acknowledgement (see [`crate::inline`]); no library call touches
    /// its memory meanwhile.
    awaiting_ack: bool,
    /// That message's header, kept until its send completes.
    inline_hdr: [u8; inline::WRITE_HDR],
}

/// An active-message handler.
type AmHandler = unsafe extern "C" fn(
    *mut c_void,
    *const c_void,
    usize,
    *mut c_void,
    usize,
    *const sys::ucp_am_recv_param_t,
) -> sys::ucs_status_t;

/// Received notifications, filled by the active-message handler.
struct NoteQueue {
    bufs: Vec<Vec<u8>>,
    head: usize,
    len: usize,
    max_len: usize,
    /// Messages dropped because the queue was full, each kept as its first
    /// [`LOST_HEAD`] bytes (the sender's name); at most [`LOST_KEPT`].
    lost: VecDeque<Vec<u8>>,
    /// Dropped messages beyond those kept, or whose bytes never arrived
    /// (rendezvous), reported without a sender.
    lost_unknown: u64,
}

/// Bytes kept of a dropped notification: the frame's name length and the
/// longest name.
const LOST_HEAD: usize = 1 + kvxfer_core::error::NAME_CAP;
/// Dropped notifications whose senders are kept before they are counted
/// without one.
const LOST_KEPT: usize = 256;

impl NoteQueue {
    /// A queue that holds nothing.
    fn empty() -> NoteQueue {
        NoteQueue {
            bufs: Vec::new(),
            head: 0,
            len: 0,
            max_len: 0,
            lost: VecDeque::new(),
            lost_unknown: 0,
        }
    }

    fn push(&mut self, data: &[u8]) {
        if self.len == self.bufs.len() || data.len() > self.max_len {
            self.drop_one(data);
            return;
        }
        let i = (self.head + self.len) % self.bufs.len();
        let buf = &mut self.bufs[i];
        buf.clear();
        buf.extend_from_slice(data);
        self.len += 1;
    }

    /// Records a message that could not be kept.
    fn drop_one(&mut self, data: &[u8]) {
        if self.lost.len() < LOST_KEPT && !data.is_empty() {
            self.lost
                .push_back(data[..data.len().min(LOST_HEAD)].to_vec());
        } else {
            self.lost_unknown += 1;
        }
    }
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
    owner: u64,
    config: UcxConfig,
    context: sys::ucp_context_h,
    worker: sys::ucp_worker_h,
    address: Vec<u8>,
    regs: Table<RegEntry>,
    eps: Table<Box<UnsafeCell<EpState>>>,
    keys: Table<KeyEntry>,
    /// Boxed so that each slot keeps its address while the vector grows:
    /// request callbacks hold it as `user_data`.
    #[allow(clippy::vec_box)]
    slots: Vec<Box<UnsafeCell<XferSlot>>>,
    free_slots: Vec<u32>,
    active: Vec<u32>,
    completions: VecDeque<Completion>,
    notes: Box<UnsafeCell<NoteQueue>>,
    /// Endpoint states whose close did not finish in time: UCX may still
    /// call their error handler, so they live until the worker is gone.
    #[allow(clippy::vec_box)]
    graveyard: Vec<Box<UnsafeCell<EpState>>>,
    /// Slots of cancelled or abandoned transfers whose requests UCX still
    /// holds: reported (or dropped) already, freed once their outstanding
    /// count is zero. While any exist, the unmapping of memory and the
    /// destruction of remote keys wait in the two lists below.
    zombies: Vec<u32>,
    deferred_unmaps: Vec<sys::ucp_mem_h>,
    deferred_rkeys: Vec<sys::ucp_rkey_h>,
    /// Disconnected endpoints whose force close has not finished yet.
    #[allow(clippy::vec_box)]
    closing: Vec<Box<UnsafeCell<EpState>>>,
    /// Force closes in flight (in the endpoint table or in `closing`).
    open_closes: usize,
    scratch: Vec<*mut c_void>,
    /// Calls of `ucp_worker_progress` that did something.
    progress_events: u64,
    /// State of small WRITEs in one round trip, shared with their handlers.
    inline: Box<UnsafeCell<Inline>>,
    /// Largest small WRITE sent that way (0: none).
    inline_max: u64,
    /// VRAM is registered with UCX itself (see [`UcxConfig::native_vram`]).
    cuda: bool,
    _not_sync: PhantomData<Cell<()>>,
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

/// Releases a `ucp_config_t` read by `ucp_config_read`.
struct ConfigGuard(*mut sys::ucp_config_t);

impl Drop for ConfigGuard {
    fn drop(&mut self) {
        // SAFETY: the pointer came from a successful ucp_config_read and is
        // released exactly once, here.
        unsafe { sys::ucp_config_release(self.0) }
    }
}

fn config_modify(config: &ConfigGuard, name: &str, value: &str) -> Result<(), Error> {
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
fn set_tcp_option(config: &ConfigGuard, name: &str, value: &str) -> Result<(), Error> {
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
/// `user_data` is the request's `XferSlot`. The request stays in the slot's
/// list until the slot is freed (`release_requests`), so the callback costs
/// O(1) however many requests a transfer has.
unsafe extern "C" fn request_done(
    _request: *mut c_void,
    status: sys::ucs_status_t,
    user_data: *mut c_void,
) {
    let slot = user_data.cast::<XferSlot>();
    // SAFETY: `user_data` is the address of a boxed XferSlot owned by the
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
unsafe extern "C" fn ep_failed(arg: *mut c_void, _ep: sys::ucp_ep_h, status: sys::ucs_status_t) {
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
unsafe extern "C" fn notification_received(
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
            regs: Table::new(),
            eps: Table::new(),
            keys: Table::new(),
            slots: Vec::new(),
            free_slots: Vec::new(),
            active: Vec::new(),
            completions: VecDeque::with_capacity(64),
            notes: Box::new(UnsafeCell::new(NoteQueue {
                bufs: vec![Vec::new(); queue_len],
                head: 0,
                len: 0,
                max_len: config.max_notification as usize,
                lost: VecDeque::new(),
                lost_unknown: 0,
            })),
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
    fn supports_cuda(&self) -> bool {
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

    fn foreign(&self, what: &'static str) -> Error {
        let _ = self;
        Error::backend(
            BACKEND,
            i64::from(sys::UCS_ERR_INVALID_PARAM as sys::ucs_status_t),
            what,
        )
    }

    fn ep_state(&self, index: u32) -> Option<*mut EpState> {
        self.eps.get(index).map(|b| b.get())
    }

    fn slot_ptr(&self, index: u32) -> *mut XferSlot {
        self.slots[index as usize].get()
    }

    fn alloc_slot(&mut self, token: Token, op: XferOp, ep: u32, note: Option<&[u8]>) -> u32 {
        let index = match self.free_slots.pop() {
            Some(i) => i,
            None => {
                self.slots.push(Box::new(UnsafeCell::new(XferSlot {
                    token,
                    op,
                    ep,
                    phase: Phase::Data,
                    outstanding: 0,
                    status: UCS_OK,
                    requests: Vec::with_capacity(16),
                    note: Vec::new(),
                    has_note: false,
                    internal: false,
                    regs: Vec::new(),
                    awaiting_ack: false,
                    inline_hdr: [0; inline::WRITE_HDR],
                })));
                (self.slots.len() - 1) as u32
            }
        };
        // SAFETY: a free slot has no request in flight, so no callback can
        // touch it; no other reference to it exists.
        let slot = unsafe { &mut *self.slot_ptr(index) };
        slot.token = token;
        slot.op = op;
        slot.ep = ep;
        slot.phase = Phase::Data;
        slot.outstanding = 0;
        slot.status = UCS_OK;
        slot.requests.clear();
        slot.note.clear();
        slot.has_note = note.is_some();
        slot.internal = false;
        slot.regs.clear();
        slot.awaiting_ack = false;
        if let Some(n) = note {
            slot.note.extend_from_slice(n);
        }
        index
    }

    fn free_slot(&mut self, index: u32) {
        Self::release_requests(self.slot_ptr(index));
        self.free_slots.push(index);
    }

    /// Hands the completed requests of slot `slot` back to UCX; returns
    /// whether none is left in flight.
    fn release_requests(slot: *mut XferSlot) -> bool {
        // SAFETY: the slot is live and no reference to it is held; no
        // callback runs during this call (it makes no progress).
        let reqs = unsafe { &mut (*slot).requests };
        reqs.retain(|&req| {
            // SAFETY: `req` was returned by a `*_nbx` call and not freed
            // yet (it is freed only here, once, when it left the list).
            let done = unsafe { sys::ucp_request_check_status(req) } != sys::UCS_INPROGRESS;
            if done {
                // SAFETY: as above; the request is complete, so its
                // callback has run and will not run again.
                unsafe { sys::ucp_request_free(req) };
            }
            !done
        });
        reqs.is_empty()
    }

    /// Request parameters whose callback reports to slot `slot`.
    fn request_param(slot: *mut XferSlot, flags: u32) -> sys::ucp_request_param_t {
        let mut p = sys::ucp_request_param_t {
            op_attr_mask: sys::UCP_OP_ATTR_FIELD_CALLBACK | sys::UCP_OP_ATTR_FIELD_USER_DATA,
            user_data: slot.cast::<c_void>(),
            ..Default::default()
        };
        p.cb.send = Some(request_done);
        if flags != 0 {
            p.op_attr_mask |= sys::UCP_OP_ATTR_FIELD_FLAGS;
            p.flags = flags;
        }
        p
    }

    /// Records what a `*_nbx` call returned for slot `slot`; false if it
    /// failed at once.
    fn track(slot: *mut XferSlot, ret: sys::ucs_status_ptr_t) -> bool {
        if sys::ucs_ptr_is_ptr(ret) {
            // SAFETY: the slot is live and no reference to it is held; the
            // request's callback cannot have run yet (UCX calls it only from
            // progress, after this call returned it).
            unsafe {
                (*slot).outstanding += 1;
                (*slot).requests.push(ret);
            }
            true
        } else if sys::ucs_ptr_is_err(ret) {
            // SAFETY: as above.
            unsafe {
                if (*slot).status == UCS_OK {
                    (*slot).status = sys::ucs_ptr_status(ret);
                }
            }
            false
        } else {
            true
        }
    }

    /// Issues the endpoint flush of a WRITE.
    fn issue_flush(&mut self, slot: *mut XferSlot, ep: sys::ucp_ep_h) {
        let param = Self::request_param(slot, 0);
        // SAFETY: the endpoint is live (the core disconnects a peer only
        // after its transfers ended); param is valid for the call and its
        // user_data slot outlives the request.
        let ret = unsafe { sys::ucp_ep_flush_nbx(ep, &param) };
        Self::track(slot, ret);
    }

    /// Sends the slot's notification as an eager active message.
    fn issue_note(&mut self, slot: *mut XferSlot, ep: sys::ucp_ep_h) {
        let param = Self::request_param(slot, sys::UCP_AM_SEND_FLAG_EAGER);
        // SAFETY: the slot is live; we only read the note's address and
        // length, and the buffer is not touched until the request completes
        // (the slot is not reused before its outstanding count is zero).
        let (buf, len) = unsafe { ((*slot).note.as_ptr(), (*slot).note.len()) };
        // SAFETY: the endpoint is live; header is empty; the buffer stays
        // valid until completion (see above); param is valid for the call.
        let ret = unsafe {
            sys::ucp_am_send_nbx(
                ep,
                NOTIFICATION_AM_ID,
                ptr::null(),
                0,
                buf.cast::<c_void>(),
                len,
                &param,
            )
        };
        Self::track(slot, ret);
    }

    /// Moves slot `index` through its phases as far as it can go without
    /// waiting; returns its result once it has ended.
    fn advance(&mut self, index: u32) -> Option<Result<(), Error>> {
        let slot = self.slot_ptr(index);
        loop {
            // SAFETY: the slot is live and no reference to it is held while
            // UCX runs (the issue_* calls below re-read through the pointer).
            let (outstanding, status, phase, op, ep_index, has_note, awaiting) = unsafe {
                let s = &*slot;
                (
                    s.outstanding,
                    s.status,
                    s.phase,
                    s.op,
                    s.ep,
                    s.has_note,
                    s.awaiting_ack,
                )
            };
            if outstanding > 0 {
                return None;
            }
            let ep = self.ep_state(ep_index);
            if awaiting {
                // SAFETY: the state box is live while it is in the table.
                let failed = ep.map_or(
                    sys::UCS_ERR_ENDPOINT_TIMEOUT as sys::ucs_status_t,
                    |e| unsafe { (*e).failed },
                );
                if failed == UCS_OK && status == UCS_OK {
                    return None;
                }
                // The peer is gone (or the send failed): no answer comes.
                // SAFETY: no other reference to the slot exists.
                unsafe {
                    (*slot).awaiting_ack = false;
                    if (*slot).status == UCS_OK {
                        (*slot).status = failed;
                    }
                }
                continue;
            }
            if status != UCS_OK {
                // SAFETY: the state box is live while it is in the table.
                let failed = ep.is_some_and(|e| unsafe { (*e).failed } != UCS_OK);
                let refused = status == sys::UCS_ERR_INVALID_ADDR as sys::ucs_status_t;
                let what = match phase {
                    Phase::Data => op.name(),
                    // Only a small WRITE's acknowledgement says this.
                    Phase::Flush if refused => {
                        "WRITE refused by the peer: not inside memory it has registered"
                    }
                    Phase::Flush => "flushing the endpoint after WRITE",
                    Phase::Notify => "sending the notification",
                };
                return Some(Err(xfer_error(what, status, failed)));
            }
            let Some(ep) = ep else {
                return Some(Err(Error::disconnected("")));
            };
            // SAFETY: the state box is live while it is in the table.
            let ep_handle = unsafe { (*ep).ep };
            if ep_handle.is_null() {
                // Force-closed by an abandon: nothing more can be issued.
                return Some(Err(Error::disconnected("")));
            }
            match phase {
                Phase::Data => {
                    // SAFETY: no other reference to the slot exists.
                    unsafe { (*slot).phase = Phase::Flush };
                    if op == XferOp::Write {
                        self.issue_flush(slot, ep_handle);
                    }
                }
                Phase::Flush => {
                    if !has_note {
                        return Some(Ok(()));
                    }
                    // SAFETY: no other reference to the slot exists.
                    unsafe { (*slot).phase = Phase::Notify };
                    self.issue_note(slot, ep_handle);
                }
                Phase::Notify => return Some(Ok(())),
            }
        }
    }

    /// Sends a small WRITE of `[local, +len)` to `remote` as one active
    /// message the target copies and answers (see [`crate::inline`]).
    fn issue_inline(
        &mut self,
        slot: *mut XferSlot,
        index: u32,
        ep: sys::ucp_ep_h,
        local: u64,
        len: u64,
        remote: u64,
    ) {
        // SAFETY: the slot was just allocated; no request refers to it.
        let hdr = unsafe {
            let s = &mut *slot;
            s.inline_hdr = inline::write_header(index, s.token.0, remote);
            s.phase = Phase::Flush;
            s.awaiting_ack = true;
            s.inline_hdr.as_ptr()
        };
        let param = Self::request_param(
            slot,
            sys::UCP_AM_SEND_FLAG_EAGER | sys::UCP_AM_SEND_FLAG_REPLY,
        );
        // SAFETY: the endpoint is live; the header lives in the boxed slot
        // and the data in a registration the core keeps, both until the
        // request completes (the slot is not freed before); param's
        // user_data slot outlives the request.
        let ret = unsafe {
            sys::ucp_am_send_nbx(
                ep,
                inline::WRITE_AM_ID,
                hdr.cast::<c_void>(),
                inline::WRITE_HDR,
                local as usize as *const c_void,
                len as usize,
                &param,
            )
        };
        Self::track(slot, ret);
    }

    /// Reports a posted slot done (and frees it) or in progress.
    fn finish_post(&mut self, index: u32) -> Result<PostStatus, Error> {
        match self.advance(index) {
            Some(result) => {
                self.free_slot(index);
                result.map(|()| PostStatus::Done)
            }
            None => {
                self.active.push(index);
                Ok(PostStatus::InProgress)
            }
        }
    }

    /// Matches received acknowledgements of small WRITEs to their slots,
    /// and frees the buffers of acknowledgements sent.
    fn take_acks(&mut self) {
        // SAFETY: handlers run only inside progress, which is not running;
        // no other reference to the state is held.
        let st = unsafe { &mut *self.inline.get() };
        if !st.pending() {
            return;
        }
        st.reap();
        for (index, token, written) in st.acks.drain(..) {
            let Some(cell) = self.slots.get(index as usize) else {
                continue;
            };
            // SAFETY: slots are live for the transport's life; no callback
            // runs meanwhile and no other reference to this one is held.
            let s = unsafe { &mut *cell.get() };
            if s.token.0 == token && s.awaiting_ack {
                s.awaiting_ack = false;
                if !written && s.status == UCS_OK {
                    s.status = sys::UCS_ERR_INVALID_ADDR as sys::ucs_status_t;
                }
            }
        }
    }

    /// Refuses a notification longer than the configured maximum.
    fn check_note_len(&self, note: &[u8]) -> Result<(), Error> {
        let max = self.config.max_notification;
        if note.len() > max as usize {
            return Err(Error::NotificationTooLong {
                len: note.len() as u64,
                max: u64::from(max),
            });
        }
        Ok(())
    }

    /// Looks up the endpoint of `peer`, refusing a failed one.
    fn live_ep(&self, peer: &UcxPeer) -> Result<(u32, sys::ucp_ep_h), Error> {
        if peer.owner != self.owner {
            return Err(self.foreign("peer handle belongs to another UCX transport"));
        }
        let Some(state) = self.ep_state(peer.index) else {
            return Err(self.foreign("peer handle was disconnected"));
        };
        // SAFETY: the state box is live while it is in the table.
        let (ep, failed) = unsafe { ((*state).ep, (*state).failed) };
        if failed != UCS_OK {
            return Err(Error::disconnected(""));
        }
        Ok((peer.index, ep))
    }

    /// Progresses until `done()` or `timeout`; returns whether `done()`.
    fn progress_until(&mut self, timeout: Duration, mut done: impl FnMut(&Self) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if done(self) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            if !self.progress() {
                std::thread::yield_now();
            }
        }
    }

    /// Closes an endpoint and waits for the close up to the close timeout:
    /// a flush, or, with peer failure detection, a forced close (which
    /// ends every outstanding request with `UCS_ERR_CANCELED`) when `force`
    /// or when the endpoint failed. An endpoint force-closed earlier
    /// (by an abandon) only has that close waited for.
    fn close_ep(&mut self, state: Box<UnsafeCell<EpState>>, force: bool) {
        let s = state.get();
        // SAFETY: the box is live; nobody else holds a reference.
        let (ep, failed, closing) = unsafe { ((*s).ep, (*s).failed, (*s).closing) };
        let req = if !ep.is_null() {
            let force = self.config.peer_failure_detection && (force || failed != UCS_OK);
            let param = sys::ucp_request_param_t {
                op_attr_mask: sys::UCP_OP_ATTR_FIELD_FLAGS,
                flags: if force {
                    sys::UCP_EP_CLOSE_FLAG_FORCE
                } else {
                    0
                },
                ..Default::default()
            };
            // SAFETY: the endpoint is live and closed exactly once, here
            // (the pointer is nulled right after); callbacks it runs touch
            // only slots and this state through raw pointers.
            let req = unsafe { sys::ucp_ep_close_nbx(ep, &param) };
            // SAFETY: as above.
            unsafe { (*s).ep = ptr::null_mut() };
            if !sys::ucs_ptr_is_ptr(req) {
                if sys::ucs_ptr_is_err(req) {
                    log::debug!(
                        "UCX: closing endpoint: {}",
                        status_text(sys::ucs_ptr_status(req))
                    );
                }
                return;
            }
            req
        } else if !closing.is_null() {
            // SAFETY: as above; the close request is handed over here.
            unsafe { (*s).closing = ptr::null_mut() };
            self.open_closes = self.open_closes.saturating_sub(1);
            closing
        } else {
            return;
        };
        let timeout = self.config.close_timeout;
        // SAFETY (closure): the request is live until freed below.
        let done = self.progress_until(timeout, |_| unsafe {
            sys::ucp_request_check_status(req) != UCS_INPROGRESS
        });
        // SAFETY: the request came from ucp_ep_close_nbx and is freed once;
        // if it is still running UCX releases it when it completes.
        unsafe { sys::ucp_request_free(req) };
        if !done {
            log::warn!("UCX: endpoint close did not finish in {timeout:?}");
            self.graveyard.push(state);
        }
    }

    /// Marks endpoint `ep_index` failed with `status` (unless it failed
    /// already) and, with peer failure detection, starts its forced close
    /// without waiting: UCX ends its outstanding requests with
    /// `UCS_ERR_CANCELED`, and their transfers fail on a later poll.
    fn force_close(&mut self, ep_index: u32, status: sys::ucs_status_t) {
        let Some(state) = self.ep_state(ep_index) else {
            return;
        };
        // SAFETY: the state box is live while it is in the table; no
        // reference to it is held.
        let ep = unsafe {
            if (*state).failed == UCS_OK {
                (*state).failed = status;
            }
            (*state).ep
        };
        if ep.is_null() || !self.config.peer_failure_detection {
            return;
        }
        let param = sys::ucp_request_param_t {
            op_attr_mask: sys::UCP_OP_ATTR_FIELD_FLAGS,
            flags: sys::UCP_EP_CLOSE_FLAG_FORCE,
            ..Default::default()
        };
        // SAFETY: the endpoint is live and closed once (nulled below, so
        // neither this nor close_ep closes it again); it was created with
        // peer error handling, as a forced close requires. Callbacks run
        // by the call reach slots and states through raw pointers only.
        let req = unsafe { sys::ucp_ep_close_nbx(ep, &param) };
        // SAFETY: the box is live; no reference to it is held.
        unsafe { (*state).ep = ptr::null_mut() };
        if sys::ucs_ptr_is_ptr(req) {
            // SAFETY: as above.
            unsafe { (*state).closing = req };
            self.open_closes += 1;
        } else if sys::ucs_ptr_is_err(req) {
            log::debug!(
                "UCX: force-closing endpoint: {}",
                status_text(sys::ucs_ptr_status(req))
            );
        }
    }

    /// Asks UCX to cancel the requests of slot `slot` (for RMA and active
    /// messages UCX 1.13 may let them run on; they end at the latest when
    /// their endpoint is closed).
    fn cancel_requests(&mut self, slot: *mut XferSlot) {
        self.scratch.clear();
        // SAFETY: the slot is live; no callback runs while the list is
        // copied.
        self.scratch.extend_from_slice(unsafe { &(*slot).requests });
        for &req in &self.scratch {
            // SAFETY: the request is in the slot's list, so not freed yet;
            // the worker is live. Completed ones are skipped.
            unsafe {
                if sys::ucp_request_check_status(req) == sys::UCS_INPROGRESS {
                    sys::ucp_request_cancel(self.worker, req);
                }
            }
        }
    }

    /// Turns slot `index` (already out of `active`) into a zombie if UCX
    /// still holds requests of it, else frees it.
    fn retire_slot(&mut self, index: u32) {
        // SAFETY: the slot is live; only its counter is read.
        if unsafe { (*self.slot_ptr(index)).outstanding } == 0 {
            self.free_slot(index);
        } else {
            self.zombies.push(index);
        }
    }

    /// Whether a zombie slot still uses endpoint `ep_index`.
    fn zombies_on(&self, ep_index: u32) -> bool {
        self.zombies.iter().any(|&z| {
            // SAFETY: zombie slots are live; only plain fields are read.
            let s = unsafe { &*self.slot_ptr(z) };
            s.ep == ep_index && s.outstanding > 0
        })
    }

    /// Frees zombie slots UCX has let go of, then (once none is left) the
    /// memory handles and remote keys that waited for them, and finishes
    /// forced closes. Never waits.
    fn reap(&mut self) {
        let mut i = 0;
        while i < self.zombies.len() {
            let index = self.zombies[i];
            // SAFETY: zombie slots are live; only the counter is read.
            if unsafe { (*self.slot_ptr(index)).outstanding } == 0 {
                self.zombies.swap_remove(i);
                self.free_slot(index);
            } else {
                i += 1;
            }
        }
        if self.zombies.is_empty() {
            for rkey in self.deferred_rkeys.drain(..) {
                // SAFETY: the rkey is live, no request uses it any more,
                // and it is destroyed once (it left the list).
                unsafe { sys::ucp_rkey_destroy(rkey) };
            }
            for memh in self.deferred_unmaps.drain(..) {
                // SAFETY: mapped by this context, no request uses it any
                // more; unmapped once (it left the list).
                let st = unsafe { sys::ucp_mem_unmap(self.context, memh) };
                if st != UCS_OK {
                    log::warn!("UCX: unmapping memory: {}", status_text(st));
                }
            }
        }
        if self.open_closes == 0 {
            return;
        }
        let done = |req: *mut c_void| {
            // SAFETY: a close request is live until freed, right after
            // this check says it finished.
            !req.is_null() && unsafe { sys::ucp_request_check_status(req) } != UCS_INPROGRESS
        };
        for state in self.eps.items.iter().flatten() {
            let s = state.get();
            // SAFETY: the box is live in the table; no reference is held.
            let req = unsafe { (*s).closing };
            if done(req) {
                // SAFETY: finished close request, freed once (nulled).
                unsafe {
                    sys::ucp_request_free(req);
                    (*s).closing = ptr::null_mut();
                }
                self.open_closes = self.open_closes.saturating_sub(1);
            }
        }
        let mut i = 0;
        while i < self.closing.len() {
            let s = self.closing[i].get();
            // SAFETY: as above.
            let req = unsafe { (*s).closing };
            if done(req) {
                // SAFETY: finished close request, freed once; the state's
                // error handler can no longer be called, so it may go.
                unsafe { sys::ucp_request_free(req) };
                self.closing.swap_remove(i);
                self.open_closes = self.open_closes.saturating_sub(1);
            } else {
                i += 1;
            }
        }
    }

    /// Waits (up to the cancel timeout) for the zombies' requests to end;
    /// force-closes the endpoints of those that do not, and waits up to the
    /// close timeout for that.
    fn drain_zombies(&mut self) {
        let all_done = |t: &Self| {
            t.zombies.iter().all(|&z| {
                // SAFETY: zombie slots are live; only the counter is read.
                unsafe { (*t.slot_ptr(z)).outstanding == 0 }
            })
        };
        let timeout = self.config.cancel_timeout;
        if !self.progress_until(timeout, all_done) {
            let mut eps: Vec<u32> = Vec::new();
            for &z in &self.zombies {
                // SAFETY: as above; plain fields only.
                let s = unsafe { &*self.slot_ptr(z) };
                if s.outstanding > 0 && !eps.contains(&s.ep) {
                    eps.push(s.ep);
                }
            }
            for ep in eps {
                log::warn!("UCX: cancelled requests still running after {timeout:?}; closing their endpoint");
                self.force_close(ep, sys::UCS_ERR_CANCELED as sys::ucs_status_t);
            }
            let timeout = self.config.close_timeout;
            self.progress_until(timeout, all_done);
        }
        self.reap();
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

impl Transport for UcxTransport {
    type LocalReg = UcxReg;
    type Peer = UcxPeer;
    type RemoteKey = UcxRemoteKey;

    fn name(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> Capabilities {
        let mut caps = Capabilities::default();
        caps.mem_kinds = if self.cuda {
            MemKinds::DRAM_VRAM
        } else {
            MemKinds::DRAM
        };
        caps.max_segments = 0;
        caps.max_notification = self.config.max_notification;
        caps.can_cancel = true;
        caps.may_complete_inline = true;
        caps
    }

    fn register(&mut self, region: &Region) -> Result<UcxReg, Error> {
        if region.kind == MemKind::Vram && !self.cuda {
            return Err(Error::UnsupportedMemKind {
                backend: BACKEND,
                kind: region.kind,
            });
        }
        let len = usize::try_from(region.len).ok();
        if region.len == 0 || region.end().is_none() || len.is_none() || region.addr == 0 {
            return Err(Error::InvalidRegion {
                addr: region.addr,
                len: region.len,
            });
        }
        let mut params = sys::ucp_mem_map_params_t {
            field_mask: u64::from(
                sys::UCP_MEM_MAP_PARAM_FIELD_ADDRESS | sys::UCP_MEM_MAP_PARAM_FIELD_LENGTH,
            ),
            address: region.addr as usize as *mut c_void,
            length: len.unwrap_or(0),
            ..Default::default()
        };
        if region.kind == MemKind::Vram {
            // UCX finds the device from the pointer's attributes.
            params.field_mask |= u64::from(sys::UCP_MEM_MAP_PARAM_FIELD_MEMORY_TYPE);
            params.memory_type = sys::UCS_MEMORY_TYPE_CUDA;
        }
        let mut memh: sys::ucp_mem_h = ptr::null_mut();
        // SAFETY: the context is live; UCX only registers (pins/records) the
        // given range, which the caller owns for the registration's life.
        let st = unsafe { sys::ucp_mem_map(self.context, &params, &mut memh) };
        if st != UCS_OK {
            let what = format!("registering [{:#x}, +{})", region.addr, region.len);
            return Err(ucs_error(&what, st));
        }
        let mut buf: *mut c_void = ptr::null_mut();
        let mut size: usize = 0;
        // SAFETY: context and memh are live; out pointers are valid.
        let st = unsafe { sys::ucp_rkey_pack(self.context, memh, &mut buf, &mut size) };
        if st != UCS_OK {
            // SAFETY: memh was mapped above and is unmapped once.
            unsafe { sys::ucp_mem_unmap(self.context, memh) };
            return Err(ucs_error("packing the remote key", st));
        }
        // SAFETY: UCX returned `size` readable bytes at `buf`, copied and
        // then released exactly once.
        let packed = unsafe {
            let v = std::slice::from_raw_parts(buf.cast::<u8>(), size).to_vec();
            sys::ucp_rkey_buffer_release(buf);
            v
        };
        let index = self.regs.insert(RegEntry {
            memh,
            region: *region,
            packed,
        });
        if region.kind == MemKind::Dram {
            // SAFETY: handlers run only inside progress, which is not
            // running.
            unsafe { (*self.inline.get()).regions.push((region.addr, region.len)) };
        }
        Ok(UcxReg {
            owner: self.owner,
            index,
        })
    }

    fn in_use(&mut self, reg: &UcxReg) -> bool {
        let uses = |t: &Self| {
            t.zombies.iter().any(|&z| {
                // SAFETY: zombie slots are live; only plain fields are read.
                let s = unsafe { &*t.slot_ptr(z) };
                s.outstanding > 0 && s.regs.contains(&reg.index)
            })
        };
        if !uses(self) {
            return false;
        }
        self.progress();
        self.reap();
        uses(self)
    }

    fn deregister(&mut self, reg: UcxReg) {
        if reg.owner != self.owner {
            log::error!("UCX: deregister: registration belongs to another transport; ignored");
            return;
        }
        if let Some(entry) = self.regs.remove(reg.index) {
            // No small WRITE from a peer lands here from now on.
            // SAFETY: handlers run only inside progress, which is not
            // running.
            let regions = unsafe { &mut (*self.inline.get()).regions };
            let r = (entry.region.addr, entry.region.len);
            if let Some(i) = regions.iter().position(|&x| x == r) {
                regions.swap_remove(i);
            }
            // Requests of cancelled or abandoned transfers may still use the
            // memory: wait for them (bounded), else unmap it once they end.
            if !self.zombies.is_empty() {
                self.drain_zombies();
            }
            if !self.zombies.is_empty() {
                log::warn!(
                    "UCX: [{:#x}, +{}) stays mapped until UCX releases {} cancelled transfers",
                    entry.region.addr,
                    entry.region.len,
                    self.zombies.len()
                );
                self.deferred_unmaps.push(entry.memh);
                return;
            }
            // SAFETY: memh was mapped by this context and is unmapped once;
            // the core hands a registration back only when no transfer uses
            // it, and no cancelled transfer's request is left (above).
            let st = unsafe { sys::ucp_mem_unmap(self.context, entry.memh) };
            if st != UCS_OK {
                log::warn!("UCX: unmapping memory: {}", status_text(st));
            }
        }
    }

    fn pack_key(&self, reg: &UcxReg, out: &mut [u8]) -> Result<usize, Error> {
        if reg.owner != self.owner {
            return Err(self.foreign("registration belongs to another UCX transport"));
        }
        let Some(entry) = self.regs.get(reg.index) else {
            return Err(self.foreign("registration was released"));
        };
        let n = entry.packed.len();
        if out.len() < n {
            return Err(Error::BufferTooSmall {
                needed: n as u64,
                available: out.len() as u64,
            });
        }
        out[..n].copy_from_slice(&entry.packed);
        Ok(n)
    }

    fn local_address(&self, out: &mut [u8]) -> Result<usize, Error> {
        let n = self.address.len();
        if out.len() < n {
            return Err(Error::BufferTooSmall {
                needed: n as u64,
                available: out.len() as u64,
            });
        }
        out[..n].copy_from_slice(&self.address);
        Ok(n)
    }

    fn connect(&mut self, address: &[u8]) -> Result<UcxPeer, Error> {
        if address.is_empty() {
            return Err(self.foreign("empty worker address"));
        }
        let state = Box::new(UnsafeCell::new(EpState {
            ep: ptr::null_mut(),
            failed: UCS_OK,
            closing: ptr::null_mut(),
        }));
        let params = sys::ucp_ep_params_t {
            field_mask: u64::from(
                sys::UCP_EP_PARAM_FIELD_REMOTE_ADDRESS
                    | sys::UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE
                    | sys::UCP_EP_PARAM_FIELD_ERR_HANDLER,
            ),
            address: address.as_ptr().cast::<sys::ucp_address_t>(),
            err_mode: if self.config.peer_failure_detection {
                sys::UCP_ERR_HANDLING_MODE_PEER
            } else {
                sys::UCP_ERR_HANDLING_MODE_NONE
            },
            err_handler: sys::ucp_err_handler_t {
                cb: Some(ep_failed),
                arg: state.get().cast::<c_void>(),
            },
            ..Default::default()
        };
        let mut ep: sys::ucp_ep_h = ptr::null_mut();
        // SAFETY: the worker is live; the address bytes are valid for the
        // call (UCX copies what it needs); the error handler's arg is the
        // boxed state, kept alive until the endpoint is closed.
        let st = unsafe { sys::ucp_ep_create(self.worker, &params, &mut ep) };
        if st != UCS_OK {
            if self.config.peer_failure_detection {
                log::warn!(
                    "UCX: no transport reaches the peer with peer failure detection; \
                     UCX 1.13's sysv/posix cannot detect a dead peer, so UCX_TLS needs \
                     tcp or cma too (or turn peer_failure_detection off)"
                );
            }
            return Err(ucs_error(
                "creating an endpoint from the peer's worker address",
                st,
            ));
        }
        // SAFETY: no other reference to the new state exists.
        unsafe { (*state.get()).ep = ep };
        let index = self.eps.insert(state);
        Ok(UcxPeer {
            owner: self.owner,
            index,
        })
    }

    fn disconnect(&mut self, peer: UcxPeer) {
        if peer.owner != self.owner {
            log::error!("UCX: disconnect: peer belongs to another transport; ignored");
            return;
        }
        let Some(state) = self.eps.remove(peer.index) else {
            return;
        };
        // Requests of cancelled or abandoned transfers still on this
        // endpoint use its remote keys: a forced close ends them first.
        let zombies = self.zombies_on(peer.index);
        let state = if zombies {
            self.close_ep(state, true);
            self.reap();
            None
        } else {
            Some(state)
        };
        let defer = zombies && self.zombies_on(peer.index);
        // Remote keys unpacked on this endpoint go before the endpoint.
        for key in self.keys.items.iter_mut().flatten() {
            if key.ep == peer.index && !key.rkey.is_null() {
                if defer {
                    self.deferred_rkeys.push(key.rkey);
                } else {
                    // SAFETY: the rkey is live, no request uses it, and it
                    // is destroyed once; it is nulled so release_key does
                    // not destroy it again.
                    unsafe { sys::ucp_rkey_destroy(key.rkey) };
                }
                key.rkey = ptr::null_mut();
            }
        }
        if defer {
            // The index may go to a new endpoint: detach the zombies that
            // outlived the close (they end with the worker at the latest).
            for &z in &self.zombies {
                // SAFETY: zombie slots are live; no reference is held and no
                // callback runs meanwhile.
                unsafe {
                    if (*self.slot_ptr(z)).ep == peer.index {
                        (*self.slot_ptr(z)).ep = u32::MAX;
                    }
                }
            }
        }
        if let Some(state) = state {
            // SAFETY: the box is live; nobody else holds a reference.
            let pending =
                unsafe { (*state.get()).ep.is_null() && !(*state.get()).closing.is_null() };
            if pending {
                // Force-closed by an abandon: finished from later polls.
                self.closing.push(state);
            } else {
                self.close_ep(state, false);
            }
        }
    }

    fn unpack_key(
        &mut self,
        peer: &UcxPeer,
        region: &Region,
        key: &[u8],
    ) -> Result<UcxRemoteKey, Error> {
        if peer.owner != self.owner {
            return Err(self.foreign("peer handle belongs to another UCX transport"));
        }
        let Some(state) = self.ep_state(peer.index) else {
            return Err(self.foreign("peer handle was disconnected"));
        };
        if key.is_empty() {
            return Err(self.foreign("empty remote key"));
        }
        // SAFETY: the state box is live while in the table.
        let ep = unsafe { (*state).ep };
        if ep.is_null() {
            return Err(Error::disconnected(""));
        }
        let mut rkey: sys::ucp_rkey_h = ptr::null_mut();
        // SAFETY: the endpoint is live; the key bytes are valid for the call
        // (UCX copies what it needs); the out pointer is valid.
        let st = unsafe { sys::ucp_ep_rkey_unpack(ep, key.as_ptr().cast::<c_void>(), &mut rkey) };
        if st != UCS_OK {
            let what = format!(
                "unpacking the remote key of [{:#x}, +{})",
                region.addr, region.len
            );
            return Err(ucs_error(&what, st));
        }
        let index = self.keys.insert(KeyEntry {
            rkey,
            ep: peer.index,
            region: *region,
        });
        Ok(UcxRemoteKey {
            owner: self.owner,
            index,
        })
    }

    fn local_kind(&self, reg: &UcxReg) -> MemKind {
        match self.regs.get(reg.index) {
            Some(r) if reg.owner == self.owner => r.region.kind,
            _ => MemKind::Dram,
        }
    }

    fn remote_kind(&self, key: &UcxRemoteKey) -> MemKind {
        match self.keys.get(key.index) {
            Some(k) if key.owner == self.owner => k.region.kind,
            _ => MemKind::Dram,
        }
    }

    fn release_key(&mut self, key: UcxRemoteKey) {
        if key.owner != self.owner {
            log::error!("UCX: release_key: key belongs to another transport; ignored");
            return;
        }
        if let Some(entry) = self.keys.remove(key.index) {
            if entry.rkey.is_null() {
                return;
            }
            if self.zombies_on(entry.ep) {
                // A cancelled or abandoned transfer's request may use it.
                self.deferred_rkeys.push(entry.rkey);
            } else {
                // SAFETY: the rkey is live and destroyed once; the core hands
                // a key back only when no transfer uses it, and no cancelled
                // transfer's request on its endpoint is left.
                unsafe { sys::ucp_rkey_destroy(entry.rkey) };
            }
        }
    }

    fn post(
        &mut self,
        op: XferOp,
        peer: &UcxPeer,
        segments: Segments<'_, UcxReg, UcxRemoteKey>,
        notification: Option<&[u8]>,
        token: Token,
    ) -> Result<PostStatus, Error> {
        let (ep_index, ep) = self.live_ep(peer)?;
        if let Some(n) = notification {
            self.check_note_len(n)?;
        }
        // Check every segment before anything is issued: UCX writes where
        // the segments say, so they must lie inside what was registered.
        let mut host_only = true;
        for (i, seg) in segments.iter().enumerate() {
            let index = i as u32;
            let bad = |side, addr, reason| Error::InvalidDesc {
                side,
                index,
                addr,
                len: seg.len,
                reason,
            };
            if seg.len == 0 || usize::try_from(seg.len).is_err() {
                return Err(bad(Side::Local, seg.local_addr, DescError::ZeroLength));
            }
            let local = match self.regs.get(seg.local.index) {
                Some(r) if seg.local.owner == self.owner => r.region,
                _ => {
                    return Err(self.foreign("segment's local registration is not this transport's"))
                }
            };
            if !local.contains(seg.local_addr, seg.len) {
                let reason = DescError::OutsideRegistration {
                    region_addr: local.addr,
                    region_len: local.len,
                };
                return Err(bad(Side::Local, seg.local_addr, reason));
            }
            let remote = match self.keys.get(seg.remote.index) {
                Some(k)
                    if seg.remote.owner == self.owner && k.ep == ep_index && !k.rkey.is_null() =>
                {
                    k.region
                }
                _ => {
                    return Err(self.foreign("segment's remote key was not unpacked for this peer"))
                }
            };
            if !remote.contains(seg.remote_addr, seg.len) {
                let reason = DescError::OutsideRegistration {
                    region_addr: remote.addr,
                    region_len: remote.len,
                };
                return Err(bad(Side::Remote, seg.remote_addr, reason));
            }
            host_only &= local.kind == MemKind::Dram && remote.kind == MemKind::Dram;
        }

        let index = self.alloc_slot(token, op, ep_index, notification);
        let slot = self.slot_ptr(index);
        {
            // SAFETY: the slot was just allocated; no request of it is in
            // flight, so no callback touches it.
            // Neighbouring segments mostly share a registration: keep one
            // entry per run, O(1) per segment.
            let regs = unsafe { &mut (*slot).regs };
            for seg in segments.iter() {
                if regs.last() != Some(&seg.local.index) {
                    regs.push(seg.local.index);
                }
            }
        }
        // The target copies a small WRITE into place with the CPU: host
        // memory only.
        if op == XferOp::Write && self.inline_max > 0 && host_only {
            if let Some(seg) = segments.single().filter(|g| g.len <= self.inline_max) {
                self.issue_inline(slot, index, ep, seg.local_addr, seg.len, seg.remote_addr);
                return self.finish_post(index);
            }
        }
        let mut param = Self::request_param(slot, 0);
        for seg in segments {
            if self.cuda {
                // The local memory's type, so that UCX need not detect it.
                let vram = self
                    .regs
                    .get(seg.local.index)
                    .is_some_and(|r| r.region.kind == MemKind::Vram);
                param.op_attr_mask |= sys::UCP_OP_ATTR_FIELD_MEMORY_TYPE;
                param.memory_type = if vram {
                    sys::UCS_MEMORY_TYPE_CUDA
                } else {
                    sys::UCS_MEMORY_TYPE_HOST
                };
            }
            let rkey = self
                .keys
                .get(seg.remote.index)
                .map_or(ptr::null_mut(), |k| k.rkey);
            let len = seg.len as usize;
            // SAFETY: the endpoint and rkey are live (checked above); the
            // local range lies in a registration the core keeps until the
            // transfer ends, and the remote range in the peer's region the
            // rkey covers; param's user_data slot outlives the request.
            let ret = unsafe {
                match op {
                    XferOp::Write => sys::ucp_put_nbx(
                        ep,
                        seg.local_addr as usize as *const c_void,
                        len,
                        seg.remote_addr,
                        rkey,
                        &param,
                    ),
                    XferOp::Read => sys::ucp_get_nbx(
                        ep,
                        seg.local_addr as usize as *mut c_void,
                        len,
                        seg.remote_addr,
                        rkey,
                        &param,
                    ),
                }
            };
            if !Self::track(slot, ret) {
                break;
            }
        }
        self.finish_post(index)
    }

    fn poll(&mut self) -> Option<Completion> {
        self.progress();
        self.take_acks();
        let mut i = 0;
        while i < self.active.len() {
            let index = self.active[i];
            match self.advance(index) {
                Some(result) => {
                    self.active.swap_remove(i);
                    // SAFETY: the slot has ended; no request refers to it.
                    let (token, internal) = unsafe {
                        let s = &*self.slot_ptr(index);
                        (s.token, s.internal)
                    };
                    self.free_slot(index);
                    if internal {
                        if let Err(e) = result {
                            log::warn!("UCX: notification failed: {e}");
                        }
                    } else {
                        self.completions.push_back(Completion { token, result });
                    }
                }
                None => i += 1,
            }
        }
        if !self.zombies.is_empty()
            || self.open_closes > 0
            || !self.deferred_unmaps.is_empty()
            || !self.deferred_rkeys.is_empty()
        {
            self.reap();
        }
        self.completions.pop_front()
    }

    fn cancel(&mut self, token: Token) -> Result<(), Error> {
        if let Some(pos) = self.completions.iter().position(|c| c.token == token) {
            self.completions.remove(pos);
            return Ok(());
        }
        let found = self.active.iter().position(|&i| {
            // SAFETY: active slots are live; only plain fields are read.
            let s = unsafe { &*self.slot_ptr(i) };
            s.token == token && !s.internal
        });
        let Some(pos) = found else {
            return Ok(());
        };
        // Never waits: the slot leaves the active list (so it completes
        // no more and issues nothing further) and stays a zombie until UCX
        // has released its requests; the memory and keys they use stay
        // until then (see deregister, release_key and disconnect).
        let index = self.active.swap_remove(pos);
        let slot = self.slot_ptr(index);
        self.cancel_requests(slot);
        self.progress();
        self.retire_slot(index);
        Ok(())
    }

    /// Cancels the transfer and force-closes its endpoint, which ends
    /// every request UCX still holds on it (a peer that stopped answering
    /// may otherwise keep them, and their memory, for ever). Later posts
    /// to the peer fail until it is connected again.
    fn abandon(&mut self, token: Token) -> Result<(), Error> {
        let ep = self.active.iter().find_map(|&i| {
            // SAFETY: active slots are live; only plain fields are read.
            let s = unsafe { &*self.slot_ptr(i) };
            (s.token == token && !s.internal).then_some(s.ep)
        });
        self.cancel(token)?;
        if let Some(ep) = ep {
            self.force_close(ep, sys::UCS_ERR_ENDPOINT_TIMEOUT as sys::ucs_status_t);
            self.progress();
            self.reap();
        }
        Ok(())
    }

    fn send_notification(&mut self, peer: &UcxPeer, msg: &[u8]) -> Result<(), Error> {
        let (ep_index, ep) = self.live_ep(peer)?;
        self.check_note_len(msg)?;
        let index = self.alloc_slot(Token(u64::MAX), XferOp::Write, ep_index, Some(msg));
        let slot = self.slot_ptr(index);
        // SAFETY: the slot was just allocated; no request refers to it.
        unsafe {
            (*slot).internal = true;
            (*slot).phase = Phase::Notify;
        }
        self.issue_note(slot, ep);
        match self.advance(index) {
            Some(result) => {
                self.free_slot(index);
                result
            }
            None => {
                self.active.push(index);
                Ok(())
            }
        }
    }

    fn arm(&mut self) -> kvxfer_core::Wake {
        use kvxfer_core::Wake;
        // SAFETY: as in `poll_notification`: no progress runs meanwhile.
        let queued = unsafe { (*self.notes.get()).len > 0 };
        // SAFETY: as above.
        let acks = unsafe { (*self.inline.get()).pending() };
        if !self.completions.is_empty() || queued || acks || self.worker.is_null() {
            return Wake::Busy;
        }
        let mut fd: std::ffi::c_int = -1;
        // SAFETY: the worker is live; the out pointer is valid. The worker
        // was created with UCP_FEATURE_WAKEUP.
        if unsafe { sys::ucp_worker_get_efd(self.worker, &mut fd) } != UCS_OK || fd < 0 {
            return Wake::Unsupported;
        }
        // SAFETY: the worker is live and no other call on it overlaps
        // (`&mut self`).
        match unsafe { sys::ucp_worker_arm(self.worker) } {
            UCS_OK => Wake::Armed(fd),
            _ => Wake::Busy,
        }
    }

    fn poll_notification(&mut self, buf: &mut [u8]) -> Option<Result<usize, Error>> {
        // SAFETY: the queue is only touched by the handler, which runs inside
        // progress; no progress runs while this reference lives.
        let empty = unsafe { (*self.notes.get()).len == 0 };
        if empty {
            self.progress();
        }
        // SAFETY: as above.
        let q = unsafe { &mut *self.notes.get() };
        if let Some(head) = q.lost.pop_front() {
            let n = head.len().min(buf.len());
            buf[..n].copy_from_slice(&head[..n]);
            return Some(Err(Error::NotificationDropped {
                len: n as u64,
                count: 1,
            }));
        }
        if q.lost_unknown > 0 {
            let count = std::mem::take(&mut q.lost_unknown);
            return Some(Err(Error::NotificationDropped { len: 0, count }));
        }
        if q.len == 0 {
            return None;
        }
        let msg = &q.bufs[q.head];
        if buf.len() < msg.len() {
            return Some(Err(Error::BufferTooSmall {
                needed: msg.len() as u64,
                available: buf.len() as u64,
            }));
        }
        let n = msg.len();
        buf[..n].copy_from_slice(msg);
        q.head = (q.head + 1) % q.bufs.len();
        q.len -= 1;
        Some(Ok(n))
    }
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
                std::mem::forget(std::mem::replace(&mut self.eps, Table::new()));
                let notes = std::mem::replace(
                    &mut self.notes,
                    Box::new(UnsafeCell::new(NoteQueue::empty())),
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
