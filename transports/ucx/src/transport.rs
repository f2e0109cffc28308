//! The UCX transport: its UCP context and worker, its tables, and its
//! release in `Drop`.

use std::cell::{Cell, UnsafeCell};
use std::collections::VecDeque;
use std::ffi::c_void;
use std::fmt;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kvxfer_core::{Completion, Error};
use kvxfer_transport_common::{Graveyard, NoteQueue, Slab};
use ucx_sys as sys;

use crate::endpoint::{EpState, KeyEntry, RegEntry};
use crate::ffi::inline::Inline;
use crate::ffi::{
    config_modify, install_handlers, set_tcp_option, tls_include_tcp, ConfigGuard, Context,
    MemHandle, RKey, Worker,
};
use crate::slot::OpSlot;
use crate::{UcxConfig, BACKEND};

/// Distinguishes transports, so that a handle given out by one is refused
/// by another.
static NEXT_OWNER: AtomicU64 = AtomicU64::new(1);

/// A registered local region (a `ucp_mem_h` and its packed remote key,
/// kept in the transport's table). Hand it back with
/// [`Transport::deregister`](kvxfer_core::Transport::deregister).
#[derive(Debug)]
pub struct UcxReg {
    pub(crate) owner: u64,
    pub(crate) index: u32,
}

/// A connection to a peer (a `ucp_ep_h`, kept in the transport's table).
/// Hand it back with [`Transport::disconnect`](kvxfer_core::Transport::disconnect).
#[derive(Debug)]
pub struct UcxPeer {
    pub(crate) owner: u64,
    pub(crate) index: u32,
}

/// A peer's unpacked remote key (a `ucp_rkey_h`, kept in the transport's
/// table). Hand it back with [`Transport::release_key`](kvxfer_core::Transport::release_key).
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
    /// Owns the context; destroyed after `Drop` has closed every
    /// endpoint and released every registration and key.
    pub(crate) worker: Worker,
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
    pub(crate) graveyard: Graveyard<Box<UnsafeCell<EpState>>>,
    /// Slots of cancelled or abandoned transfers whose requests UCX still
    /// holds: reported (or dropped) already, freed once their outstanding
    /// count is zero. While any exist, the unmapping of memory and the
    /// destruction of remote keys wait in the two lists below.
    pub(crate) zombies: Vec<u32>,
    pub(crate) deferred_unmaps: Graveyard<MemHandle>,
    pub(crate) deferred_rkeys: Graveyard<RKey>,
    /// Disconnected endpoints whose force close has not finished yet.
    pub(crate) closing: Graveyard<Box<UnsafeCell<EpState>>>,
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
    /// Times the worker was renewed.
    pub(crate) renewals: u64,
    /// The worker a renewal puts in place (see [`UcxConfig::spare_worker`]).
    pub(crate) spare: Option<Worker>,
    pub(crate) _not_sync: PhantomData<Cell<()>>,
}

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
        let ucp_config = ConfigGuard::read()?;
        if let Some(tls) = &config.tls {
            config_modify(&ucp_config, "TLS", tls)?;
        }
        if let Some(devices) = &config.net_devices {
            config_modify(&ucp_config, "NET_DEVICES", devices)?;
        }
        let tls = config.tls.clone().or_else(|| std::env::var("UCX_TLS").ok());
        let tcp = tls_include_tcp(tls.as_deref());
        if let Some(seg) = config.tcp_seg_size {
            if std::env::var_os("UCX_TCP_TX_SEG_SIZE").is_none()
                && std::env::var_os("UCX_TCP_RX_SEG_SIZE").is_none()
                && tcp
            {
                set_tcp_option(&ucp_config, "TX_SEG_SIZE", &seg.to_string())?;
                set_tcp_option(&ucp_config, "RX_SEG_SIZE", &seg.to_string())?;
            }
        }
        if let Some(nb) = config.tcp_conn_nb {
            if std::env::var_os("UCX_TCP_CONN_NB").is_none() && tcp {
                set_tcp_option(&ucp_config, "CONN_NB", if nb { "y" } else { "n" })?;
            }
        }
        if let Some(interval) = config.keepalive_interval {
            if std::env::var_os("UCX_KEEPALIVE_INTERVAL").is_none() {
                let value = match interval.as_millis() {
                    0 => "inf".to_string(),
                    ms => format!("{ms}ms"),
                };
                config_modify(&ucp_config, "KEEPALIVE_INTERVAL", &value)?;
            }
        }

        let context = Context::new(&ucp_config)?;
        drop(ucp_config);
        let cuda = config.native_vram && context.supports_cuda();
        let worker = Worker::new(&context)?;
        let address = worker.address()?;
        let queue_len = config.notification_queue.max(1) as usize;
        let mut transport = UcxTransport {
            owner: NEXT_OWNER.fetch_add(1, Ordering::Relaxed),
            config: config.clone(),
            worker,
            address,
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
            graveyard: Graveyard::new(),
            zombies: Vec::new(),
            deferred_unmaps: Graveyard::new(),
            deferred_rkeys: Graveyard::new(),
            closing: Graveyard::new(),
            open_closes: 0,
            scratch: Vec::new(),
            progress_events: 0,
            inline: Inline::new(),
            inline_max: 0,
            cuda,
            renewals: 0,
            spare: None,
            _not_sync: PhantomData,
        };

        transport.reserve_slots(crate::slot::SPARE_SLOTS);
        transport.make_spare();
        install_handlers(&mut transport)?;
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
    /// [`Transport::local_address`](kvxfer_core::Transport::local_address) writes).
    pub fn worker_address(&self) -> &[u8] {
        &self.address
    }

    /// Runs `ucp_worker_progress` once; returns whether anything happened.
    pub fn progress(&mut self) -> bool {
        let busy = self.worker.progress();
        if busy {
            self.progress_events = self.progress_events.wrapping_add(1);
        }
        busy
    }

    /// How many calls of `ucp_worker_progress` (from [`progress`],
    /// [`Transport::poll`](kvxfer_core::Transport::poll) and the other calls that progress) did
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
        self.inline_state().served()
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
        let text = self.worker.context().info();
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
pub(crate) const WORKER_DRAIN: Duration = Duration::from_millis(50);

impl Drop for UcxTransport {
    fn drop(&mut self) {
        // 1. In-flight requests (and those of cancelled or abandoned
        //    transfers): cancel, and let them be released.
        let slots: Vec<u32> = self.active.drain(..).collect();
        for index in slots {
            self.cancel_requests(index);
            self.retire_slot(index);
        }
        for i in 0..self.zombies.len() {
            self.cancel_requests(self.zombies[i]);
        }
        let timeout = self.config.close_timeout;
        let released = self.progress_until(timeout, |t| {
            t.zombies.iter().all(|&i| t.outstanding(i) == 0)
        });
        // Requests still running end with their endpoints' forced close,
        // before the keys and memory they use go.
        let force = !released;
        if force && !self.config.peer_failure_detection {
            // Without peer error handling a forced close is undefined
            // behaviour in UCX, so these requests cannot be ended: leave
            // everything they may use (worker, context, endpoints, keys,
            // memory handles, and the slots and queue UCX calls back into)
            // to the process rather than free it under them.
            log::error!(
                "UCX: dropped with requests still running and peer failure detection \
                 off; the worker, its endpoints, keys and registrations are left in \
                 place (the registered memory must stay allocated)"
            );
            ABANDONED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            std::mem::forget(std::mem::take(&mut self.slots));
            std::mem::forget(std::mem::take(&mut self.eps));
            std::mem::forget(std::mem::take(&mut self.keys));
            std::mem::forget(std::mem::take(&mut self.regs));
            std::mem::forget(std::mem::take(&mut self.deferred_rkeys));
            std::mem::forget(std::mem::take(&mut self.deferred_unmaps));
            std::mem::forget(std::mem::take(&mut self.closing));
            std::mem::forget(std::mem::take(&mut self.graveyard));
            let notes = std::mem::replace(
                &mut self.notes,
                Box::new(UnsafeCell::new(NoteQueue::new(0, 0))),
            );
            std::mem::forget(notes);
            std::mem::forget(std::mem::replace(&mut self.inline, Inline::new()));
            self.worker.leak();
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
            drop(key.rkey);
        }
        self.deferred_rkeys.release_all();
        // 3. Endpoints, and the forced closes still running.
        let eps: Vec<_> = self.eps.drain().collect();
        for state in eps {
            self.close_ep(state, force);
        }
        let closing: Vec<_> = self.closing.drain().collect();
        for state in closing {
            self.close_ep(state, true);
        }
        // 4. Memory handles.
        for reg in self.regs.drain() {
            drop(reg.memh);
        }
        self.deferred_unmaps.release_all();
        // 5. The worker, then the context, go with the fields. UCX keeps
        //    internal endpoints for connections peers opened to us; a
        //    wire-up reply still queued on one (its TCP connection not yet
        //    established) trips an assertion inside ucp_worker_destroy in
        //    UCX 1.13, seen when an agent is dropped right after a peer
        //    connected. Progress a short, fixed time first so such replies
        //    go out.
        let deadline = Instant::now() + WORKER_DRAIN;
        while Instant::now() < deadline {
            if !self.progress() {
                std::thread::yield_now();
            }
        }
        self.inline.get_mut().reap();
        for i in 0..self.slots.len() {
            if !self.release_requests(i as u32) {
                log::warn!("UCX: a request of slot {i} is still running at close");
            }
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
