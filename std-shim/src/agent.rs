//! The thread-safe [`Agent`] and its transfer requests.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant as StdInstant};

use kvxfer_core::engine::{PreparedLocal, PreparedRemote, XferHandle};
use kvxfer_core::{
    Capacities, Desc, DescList, Engine, EngineConfig, Error, MemKind, Region, Storage, XferOp,
    XferState, XferTelemetry,
};

use crate::clock::now;
use crate::config::{select_backend_from_env, AgentConfig, BackendKind, BUILT_IN};
use crate::note_auth::NoteKey;
use crate::side_channel::{self, Client, Server};

/// The engine over transport `T`, in tables the agent owns (sized from
/// [`AgentConfig::capacities`]).
pub type AgentEngine<T> = Engine<'static, T>;

/// The UCX transport as the agent uses it: with the `cuda` feature, VRAM
/// is staged through pinned host memory ([`kvxfer_cuda::Staged`]).
#[cfg(all(feature = "ucx", feature = "cuda"))]
type UcxT = kvxfer_cuda::Staged<Local<kvxfer_ucx::UcxTransport>>;
#[cfg(all(feature = "ucx", not(feature = "cuda")))]
type UcxT = Local<kvxfer_ucx::UcxTransport>;
/// The libfabric transport as the agent uses it (see [`UcxT`]).
#[cfg(all(feature = "libfabric", feature = "cuda"))]
type FabricT = kvxfer_cuda::Staged<Local<FabricRails>>;
#[cfg(all(feature = "libfabric", not(feature = "cuda")))]
type FabricT = Local<FabricRails>;
/// libfabric over one endpoint, or one per network rail
/// ([`AgentConfig::rails`]).
#[cfg(feature = "libfabric")]
type FabricRails = kvxfer_rails::Rails<kvxfer_libfabric::FabricTransport>;

/// Same-host peers of a host-memory transport over cross-memory attach
/// ([`AgentConfig::same_host`]).
type Local<T> = kvxfer_local::Local<T>;

/// The same-host layer under VRAM staging (with the `cuda` feature).
#[cfg(feature = "cuda")]
#[allow(dead_code)]
fn local_of<T: kvxfer_core::Transport>(t: &kvxfer_cuda::Staged<Local<T>>) -> &Local<T> {
    t.inner()
}
#[cfg(not(feature = "cuda"))]
#[allow(dead_code)]
fn local_of<T: kvxfer_core::Transport>(t: &Local<T>) -> &Local<T> {
    t
}

/// Requests the staging layer served for peers (with the `cuda` feature).
#[cfg(feature = "cuda")]
#[allow(dead_code)]
fn staging_events<T: kvxfer_core::Transport>(t: &kvxfer_cuda::Staged<T>) -> u64 {
    t.staging_events()
}
#[cfg(not(feature = "cuda"))]
#[allow(dead_code)]
fn staging_events<T>(_t: &T) -> u64 {
    0
}

#[allow(dead_code)]
fn local<T: kvxfer_core::Transport>(t: T, cfg: &AgentConfig) -> Local<T> {
    let mut lc = kvxfer_local::LocalConfig::from_env();
    lc.enabled &= cfg.same_host;
    kvxfer_local::Local::new(t, lc)
}

/// Wraps a host-memory transport for VRAM staging (with the `cuda`
/// feature). A peer's answer to a staging request gets the transport's
/// per-transfer deadline (`None`: no deadline).
#[cfg(feature = "cuda")]
#[allow(dead_code)]
fn staged<T: kvxfer_core::Transport>(t: T, deadline: Option<Duration>) -> kvxfer_cuda::Staged<T> {
    let cfg = kvxfer_cuda::StagingConfig {
        reply_timeout: deadline.unwrap_or(Duration::MAX),
        ..kvxfer_cuda::StagingConfig::default()
    };
    kvxfer_cuda::Staged::with_config(t, cfg)
}
#[cfg(not(feature = "cuda"))]
#[allow(dead_code)]
fn staged<T>(t: T, _deadline: Option<Duration>) -> T {
    t
}

/// One engine per backend built into this kvxfer.
enum Backend {
    #[cfg(feature = "ucx")]
    Ucx(Box<AgentEngine<UcxT>>),
    #[cfg(feature = "libfabric")]
    Fabric(Box<AgentEngine<FabricT>>),
    #[cfg(feature = "cuda")]
    CudaIpc(Box<AgentEngine<kvxfer_cuda::CudaIpcTransport>>),
}

/// Runs `$body` with `$e` bound to the backend's engine (`&mut`).
macro_rules! on_engine {
    ($backend:expr, $e:ident => $body:expr) => {
        match *$backend {
            #[cfg(feature = "ucx")]
            Backend::Ucx(ref mut $e) => $body,
            #[cfg(feature = "libfabric")]
            Backend::Fabric(ref mut $e) => $body,
            #[cfg(feature = "cuda")]
            Backend::CudaIpc(ref mut $e) => $body,
        }
    };
}

/// Runs `$body` with `$e` bound to the backend's engine (`&`).
macro_rules! on_engine_ref {
    ($backend:expr, $e:ident => $body:expr) => {
        match *$backend {
            #[cfg(feature = "ucx")]
            Backend::Ucx(ref $e) => $body,
            #[cfg(feature = "libfabric")]
            Backend::Fabric(ref $e) => $body,
            #[cfg(feature = "cuda")]
            Backend::CudaIpc(ref $e) => $body,
        }
    };
}

/// A new engine over `transport`, with tables sized from `cfg` and
/// per-transfer deadline `deadline`.
fn boxed_engine<T: kvxfer_core::Transport>(
    name: &str,
    transport: T,
    cfg: &AgentConfig,
    deadline: Option<Duration>,
) -> Result<Box<AgentEngine<T>>, Error> {
    let config = EngineConfig::default()
        .with_segments_per_xfer(cfg.segments_per_xfer)
        .with_deadline(deadline);
    let storage = Storage::owned(&cfg.capacities);
    Ok(Box::new(Engine::new(name, transport, config, storage)?))
}

/// Builds the transport and engine for `kind`.
fn build_backend(kind: BackendKind, name: &str, cfg: &AgentConfig) -> Result<Backend, Error> {
    cfg.capacities.check()?;
    let deadline = cfg.effective_transfer_timeout()?;
    match kind {
        #[cfg(feature = "ucx")]
        BackendKind::Ucx => {
            let uc = cfg.effective_ucx_config()?;
            log::debug!("{name}: UCX transport with {uc:?}");
            let t = local(kvxfer_ucx::UcxTransport::new(&uc)?, cfg);
            let t = staged(t, deadline);
            Ok(Backend::Ucx(boxed_engine(name, t, cfg, deadline)?))
        }
        #[cfg(feature = "libfabric")]
        BackendKind::Libfabric => {
            let fabric_cfg = cfg.effective_fabric_config();
            log::debug!("{name}: libfabric transport with {fabric_cfg:?}");
            let t = local(crate::rails::fabric_rails(name, &fabric_cfg, cfg)?, cfg);
            Ok(Backend::Fabric(boxed_engine(
                name,
                staged(t, deadline),
                cfg,
                deadline,
            )?))
        }
        #[cfg(feature = "cuda")]
        BackendKind::CudaIpc => {
            let t = kvxfer_cuda::CudaIpcTransport::new()?;
            Ok(Backend::CudaIpc(boxed_engine(name, t, cfg, deadline)?))
        }
        #[allow(unreachable_patterns)]
        other => Err(Error::UnsupportedBackend {
            value: kvxfer_core::error::bounded(other.name()),
            supported: BUILT_IN,
        }),
    }
}

/// Everything behind the agent's one lock.
struct State {
    /// `None` once shut down.
    backend: Option<Backend>,
    /// Received notifications, by sending peer, oldest first.
    notifs: HashMap<String, Vec<Vec<u8>>>,
    /// Buffer notifications are received into; grows on demand.
    notif_buf: Vec<u8>,
    /// Notifications lost on the way in, by sender ("" when unknown), not
    /// yet reported to the application.
    lost: HashMap<String, u64>,
    /// Requests dropped or released while their transport could not cancel
    /// them; each is released (its slot and memory freed) once it ends.
    orphans: Vec<XferHandle>,
    /// Probes of peers served by the backend; `None` when turned off.
    keepalive: Option<crate::keepalive::Keepalive>,
    /// Seals and checks notifications when an authentication key is set.
    note_key: Option<NoteKey>,
    /// Reused for sealing outgoing notifications.
    seal_buf: Vec<u8>,
    /// Received notifications refused (not sealed with the key), by the
    /// sender they claimed, not yet reported to the application.
    refused: HashMap<String, u64>,
    /// Records the agent's metrics ([`crate::meter`]).
    meter: crate::meter::Meter,
}

/// Longest notification buffer the agent grows to (16 MiB).
const MAX_NOTIF_BUF: usize = 16 << 20;

impl State {
    /// A count that moves whenever the transport did work while polled
    /// (UCX: `ucp_worker_progress` calls that did something); constant
    /// for transports that do not report it. Staged VRAM adds the requests it serves for peers, which the
    /// engine does not see as transfers of its own.
    fn activity(&self) -> u64 {
        match self.backend.as_ref() {
            #[cfg(feature = "ucx")]
            Some(Backend::Ucx(e)) => {
                let l = local_of(e.transport());
                (l.inner().progress_events())
                    .wrapping_add(l.cma_transfers())
                    .wrapping_add(staging_events(e.transport()))
            }
            #[cfg(feature = "libfabric")]
            Some(Backend::Fabric(e)) => {
                let t = e.transport();
                local_of(t).cma_transfers().wrapping_add(staging_events(t))
            }
            #[allow(unreachable_patterns)]
            _ => 0,
        }
    }

    /// Peers whose transfers may need this agent to make progress for them
    /// (served in software by UCX or libfabric, not by cross-memory attach).
    fn far_peers(&self) -> usize {
        match self.backend.as_ref() {
            #[cfg(feature = "ucx")]
            Some(Backend::Ucx(e)) => local_of(e.transport()).far_peers(),
            #[cfg(feature = "libfabric")]
            Some(Backend::Fabric(e)) => local_of(e.transport()).far_peers(),
            #[allow(unreachable_patterns)]
            _ => 0,
        }
    }

    /// How long the progress thread may sleep before the engine has a
    /// deadline to enforce ([`Engine::poll_timeout`]); `None`: no limit.
    fn poll_timeout(&self) -> Option<Duration> {
        let at = on_engine_ref!(self.backend.as_ref()?, e => e.poll_timeout())?;
        Some(Duration::from_nanos(at.saturating_nanos_since(now())))
    }

    /// Asks the transport whether the progress thread may sleep on its
    /// descriptor (see [`kvxfer_core::Wake`]).
    fn arm(&mut self) -> kvxfer_core::Wake {
        match self.backend.as_mut() {
            Some(b) => on_engine!(b, e => kvxfer_core::Transport::arm(e.transport_mut())),
            None => kvxfer_core::Wake::Unsupported,
        }
    }

    fn backend(&mut self) -> Result<&mut Backend, Error> {
        self.backend.as_mut().ok_or(Error::ShutDown)
    }

    /// Records a transfer made from prepared lists ([`crate::meter`]).
    fn metered(
        &mut self,
        made: Result<XferHandle, Error>,
        op: XferOp,
        remote: PreparedRemote,
        note: bool,
    ) -> Result<XferHandle, Error> {
        let State { backend, meter, .. } = self;
        match backend.as_mut() {
            Some(b) => on_engine!(b, e => {
                let peer = e.prepared_peer(remote).unwrap_or("");
                meter.prepared(made, op, peer, note)
            }),
            None => made,
        }
    }

    /// The backend, and `msg` as it goes to `peer`: sealed with the key
    /// when one is set ([`crate::note_auth`]), else as it is.
    fn sealed<'a>(
        &'a mut self,
        peer: &str,
        msg: Option<&'a [u8]>,
    ) -> Result<(&'a mut Backend, Option<&'a [u8]>), Error> {
        let State {
            backend,
            note_key,
            seal_buf,
            ..
        } = self;
        let b = backend.as_mut().ok_or(Error::ShutDown)?;
        let (Some(k), Some(m)) = (note_key.as_ref(), msg) else {
            return Ok((b, msg));
        };
        k.seal(peer, m, seal_buf);
        Ok((b, Some(seal_buf.as_slice())))
    }

    /// Polls the engine once and collects notifications; returns how many
    /// transfers finished.
    fn progress(&mut self) -> usize {
        self.progress_counting().0
    }

    /// [`progress`](State::progress), also returning how many transfers
    /// are still in flight.
    fn progress_counting(&mut self) -> (usize, usize) {
        let State {
            backend,
            notifs,
            notif_buf,
            lost,
            orphans,
            keepalive,
            note_key,
            refused,
            meter,
            ..
        } = self;
        let Some(backend) = backend.as_mut() else {
            return (0, 0);
        };
        let at = now();
        let mut failed = 0;
        if let Some(k) = keepalive.as_mut() {
            failed = match *backend {
                #[cfg(feature = "ucx")]
                Backend::Ucx(ref mut e) => k.check(e, at, |e, p| {
                    e.remote_peer(p)
                        .is_ok_and(|p| local_of(e.transport()).is_near(p))
                }),
                #[cfg(feature = "libfabric")]
                Backend::Fabric(ref mut e) => k.check(e, at, |e, p| {
                    e.remote_peer(p)
                        .is_ok_and(|p| local_of(e.transport()).is_near(p))
                }),
                // CUDA IPC peers are on this host; their copies do not wait
                // on them.
                #[allow(unreachable_patterns)]
                _ => 0,
            };
        }
        on_engine!(backend, e => {
            let n = e.poll(at) + failed;
            meter.settle(e, n > 0);
            if n > 0 && !orphans.is_empty() {
                // Released requests the transport could not cancel: free
                // their slots once they have ended.
                orphans.retain(|&h| match e.state(h) {
                    Ok(XferState::InProgress) => true,
                    _ => e.release(h).is_err_and(|err| matches!(err, Error::InProgress { .. })),
                });
            }
            loop {
                match e.poll_notification(notif_buf) {
                    None => break,
                    Some(Ok(note)) => {
                        let raw = notif_buf.get(..note.len).unwrap_or(&[]);
                        let from = note.peer.as_str();
                        let msg = match note_key {
                            None => Some(raw),
                            Some(k) => k.open(from, raw),
                        };
                        match msg {
                            Some(m) => {
                                meter.note_received(from);
                                notifs.entry(from.to_string()).or_default().push(m.to_vec())
                            }
                            None => {
                                meter.note_refused(from);
                                log::warn!("refused a notification claiming to come from {from:?}: not sealed with this agent's key");
                                *refused.entry(from.to_string()).or_default() += 1;
                            }
                        }
                    }
                    Some(Err(Error::BufferTooSmall { needed, .. }))
                        if (needed as usize) > notif_buf.len() && (needed as usize) <= MAX_NOTIF_BUF =>
                    {
                        notif_buf.resize(needed as usize, 0);
                    }
                    Some(Err(Error::NotificationsLost { peer, count })) => {
                        meter.notes_lost(&peer, count);
                        *lost.entry(peer.as_str().to_string()).or_default() += count;
                    }
                    Some(Err(err)) => {
                        // A message that did not arrive whole (too long,
                        // broken): reported, sender unknown, never only
                        // logged.
                        log::warn!("receiving a notification failed: {err}");
                        meter.notes_lost("", 1);
                        *lost.entry(String::new()).or_default() += 1;
                        break;
                    }
                }
            }
            (n, e.in_flight())
        })
    }
}

/// What the agent's threads and requests share.
struct Shared {
    name: String,
    kind: BackendKind,
    cfg: AgentConfig,
    progress_thread: bool,
    state: Mutex<State>,
    /// Signalled when transfers finish (by the progress thread) and on
    /// shutdown.
    done: Condvar,
    closed: AtomicBool,
    /// Wakes the progress thread from its idle sleep.
    waker: crate::wake::Waker,
    /// Set (under the state lock) while the progress thread may block on
    /// the transport's descriptor: only then do posts need to wake it.
    sleeping: AtomicBool,
}

impl Shared {
    /// Wakes the progress thread if it may be blocked on the transport.
    fn nudge(&self) {
        if self.sleeping.load(Ordering::SeqCst) {
            self.waker.wake();
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent across a panic elsewhere: the core
        // returns errors instead of panicking midway.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn metadata(&self) -> Result<Vec<u8>, Error> {
        let mut st = self.lock();
        let b = st.backend()?;
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let r = on_engine!(b, e => e.local_metadata(&mut buf));
            match r {
                Ok(n) => {
                    buf.truncate(n);
                    return Ok(buf);
                }
                Err(Error::BufferTooSmall { needed, .. }) if needed as usize > buf.len() => {
                    buf.resize(needed as usize, 0);
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn load(&self, blob: &[u8]) -> Result<String, Error> {
        let mut st = self.lock();
        let b = st.backend()?;
        let loaded: Result<kvxfer_core::error::Name, Error> =
            on_engine!(b, e => e.load_remote(blob));
        let name = st.meter.check(crate::metrics::Op::Load, loaded)?;
        st.meter.loaded(&name);
        log::debug!("agent {}: loaded metadata of {name:?}", self.name);
        Ok(name.as_str().to_string())
    }
}

impl side_channel::Handler for Shared {
    fn metadata(&self) -> Result<Vec<u8>, Error> {
        Shared::metadata(self)
    }
    fn load(&self, blob: &[u8]) -> Result<String, Error> {
        Shared::load(self, blob)
    }
    fn invalidate(&self, name: &str) -> Result<(), Error> {
        let mut st = self.lock();
        let b = st.backend()?;
        on_engine!(b, e => e.invalidate_remote(name))?;
        log::debug!(
            "agent {}: peer {name:?} invalidated its metadata",
            self.name
        );
        Ok(())
    }
}

/// Owns the threads; shuts the agent down when the last [`Agent`] clone
/// goes.
struct Owner {
    shared: Arc<Shared>,
    server: Mutex<Option<Server>>,
    listen_addr: Option<SocketAddr>,
    progress: Mutex<Option<JoinHandle<()>>>,
    /// The agent's metrics, and the endpoint serving them if asked for.
    metrics: (
        Arc<crate::metrics::AgentMetrics>,
        Option<crate::metrics::Endpoint>,
    ),
}

impl Owner {
    fn shutdown(&self) {
        if self.shared.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        log::info!("agent {}: shutting down", self.shared.name);
        // No new metadata from outside, then no progress, then the engine.
        if let Some(mut s) = self
            .server
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            s.stop();
        }
        self.shared.waker.wake();
        if let Some(t) = self
            .progress
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            let _ = t.join();
        }
        let backend = self.shared.lock().backend.take();
        drop(backend);
        self.shared.done.notify_all();
    }
}

impl Drop for Owner {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Longest the idle progress thread sleeps on a transport's wake-up
/// descriptor before polling anyway.
const IDLE_WAIT: Duration = Duration::from_millis(100);
/// How long the progress thread polls without sleeping after something
/// woke it.
const HOT_AFTER_WAKE: Duration = Duration::from_millis(1);

fn progress_loop(shared: Arc<Shared>) {
    // Spin while transfers are in flight (yielding the lock and the CPU
    // between polls); back off to `progress_idle_sleep` when idle.
    // A target serving a peer's RMA in software (UCX over tcp) has no
    // transfer of its own in flight: the transport's activity count keeps
    // it polling while that traffic lasts.
    let max_sleep = shared.cfg.progress_idle_sleep;
    let mut idle_rounds: u32 = 0;
    let mut last_activity: u64 = 0;
    // After a wake-up, poll without sleeping for a while: a peer's next
    // request (RMA served in software raises no completion here) is
    // likely to follow within microseconds.
    let mut hot_until = StdInstant::now();
    while !shared.closed.load(Ordering::Acquire) {
        let (finished, inflight, activity, far, notes) = {
            let mut st = shared.lock();
            let (f, i) = st.progress_counting();
            let notes = !st.notifs.is_empty() || !st.lost.is_empty() || !st.refused.is_empty();
            (f, i, st.activity(), st.far_peers(), notes)
        };
        // With no idle sleep configured, poll without sleeping only while
        // a peer may need this agent's progress; peers on this host moved
        // by cross-memory attach never do.
        let max_sleep = if max_sleep.is_zero() && far == 0 {
            crate::config::DEFAULT_PROGRESS_IDLE_SLEEP
        } else {
            max_sleep
        };
        let active = activity != last_activity;
        last_activity = activity;
        if finished > 0 || notes {
            shared.done.notify_all();
        }
        if finished > 0 || inflight > 0 || active {
            idle_rounds = 0;
            std::thread::yield_now();
        } else {
            idle_rounds = idle_rounds.saturating_add(1);
            if idle_rounds < 64 || StdInstant::now() < hot_until {
                std::thread::yield_now();
                continue;
            }
            // Idle: sleep on the transport's wake-up descriptor where it has
            // one (and on the agent's own wake-ups), else back off.
            // Marked before the transport is armed, under the lock posts
            // take: a post after it sees the mark and wakes the thread; one
            // before it left work that keeps the transport from arming.
            let (wake, limit) = {
                let mut st = shared.lock();
                shared.sleeping.store(true, Ordering::SeqCst);
                (st.arm(), st.poll_timeout())
            };
            if !matches!(wake, kvxfer_core::Wake::Armed(_)) {
                shared.sleeping.store(false, Ordering::SeqCst);
            }
            match wake {
                kvxfer_core::Wake::Armed(fd) => {
                    // Awake by the engine's next deadline, at the latest.
                    let wait = limit.map_or(IDLE_WAIT, |l| l.min(IDLE_WAIT));
                    let woken = shared.waker.wait(fd, wait);
                    shared.sleeping.store(false, Ordering::SeqCst);
                    if woken {
                        hot_until = StdInstant::now() + HOT_AFTER_WAKE;
                    }
                }
                kvxfer_core::Wake::Busy => std::thread::yield_now(),
                kvxfer_core::Wake::Unsupported => {
                    let step = Duration::from_micros(u64::from(idle_rounds - 63).min(1000) * 10);
                    let step = limit.map_or(step, |l| l.min(step));
                    std::thread::sleep(step.min(max_sleep));
                }
            }
        }
    }
}

/// An agent: registers memory, exchanges metadata with peers and moves
/// bytes to and from their registered memory with one-sided READ and
/// WRITE.
///
/// `Agent` is `Send + Sync`; clones share one agent. The agent shuts down
/// when [`shutdown`](Agent::shutdown) is called or the last clone is
/// dropped; afterwards every call returns [`Error::ShutDown`].
///
/// ```no_run
/// use std::time::Duration;
/// use kvxfer::{Agent, AgentConfig, Desc, WaitOutcome, XferOp};
///
/// let agent = Agent::new("prefill-0", AgentConfig::default())?;
/// let mut buf = vec![7u8; 4096];
/// // SAFETY: `buf` outlives its registration (deregistered below) and no
/// // Rust reference reads it while a transfer runs.
/// unsafe { agent.register_slice(&mut buf)? };
/// let peer = agent.connect("10.0.0.2:5555")?;
/// let local = [Desc::new(buf.as_ptr() as u64, 4096)];
/// let remote = [Desc::new(0x7f00_0000_0000, 4096)];
/// let req = agent.submit(XferOp::Write, &local, &remote, &peer, Some(b"block 0"))?;
/// match req.wait(Duration::from_secs(5)) {
///     WaitOutcome::Done => {}
///     WaitOutcome::Failed(e) => return Err(e),
///     WaitOutcome::InProgress => eprintln!("still moving"),
/// }
/// drop(req);
/// agent.deregister(buf.as_ptr() as u64)?;
/// # Ok::<(), kvxfer::Error>(())
/// ```
#[derive(Clone)]
pub struct Agent {
    owner: Arc<Owner>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("name", &self.owner.shared.name)
            .field("backend", &self.owner.shared.kind)
            .field("listen_addr", &self.owner.listen_addr)
            .finish()
    }
}

impl Agent {
    /// Creates the agent `name`: chooses the backend (see
    /// [`config`](crate::config)), opens the transport, starts the side
    /// channel on [`AgentConfig::listen`] and, if configured, the progress
    /// thread.
    pub fn new(name: &str, cfg: AgentConfig) -> Result<Agent, Error> {
        let (kind, source) = select_backend_from_env(cfg.backend.as_deref())?;
        log::info!("agent {name}: backend {kind} (from {})", source.name());
        let keepalive = cfg.effective_keepalive()?;
        let note_key = cfg.effective_auth_key().map(|k| NoteKey::new(&k, name));
        let backend = build_backend(kind, name, &cfg)?;
        let notif_buf = vec![0u8; cfg.capacities.notification_len as usize];
        let (meter, endpoint) = crate::meter::Meter::for_agent(name, kind.name(), &cfg)?;
        let metrics = (Arc::clone(meter.metrics()), endpoint);
        let shared = Arc::new(Shared {
            name: name.to_string(),
            kind,
            progress_thread: cfg.progress_thread,
            cfg,
            state: Mutex::new(State {
                backend: Some(backend),
                notifs: HashMap::new(),
                notif_buf,
                lost: HashMap::new(),
                orphans: Vec::new(),
                keepalive: crate::keepalive::Keepalive::new(keepalive),
                note_key,
                seal_buf: Vec::new(),
                refused: HashMap::new(),
                meter,
            }),
            done: Condvar::new(),
            closed: AtomicBool::new(false),
            sleeping: AtomicBool::new(false),
            waker: crate::wake::Waker::new().map_err(|e| {
                Error::backend(
                    kind.name(),
                    i64::from(e.raw_os_error().unwrap_or(0)),
                    &format!("wake-up channel: {e}"),
                )
            })?,
        });
        let server = match &shared.cfg.listen {
            Some(listen) => {
                let opts = side_channel::Options {
                    io_timeout: shared.cfg.io_timeout,
                    idle_timeout: shared.cfg.idle_timeout,
                    key: shared.cfg.effective_auth_key(),
                };
                let handler: Arc<dyn side_channel::Handler> = shared.clone();
                Some(Server::start(listen, handler, opts)?)
            }
            None => None,
        };
        let listen_addr = server.as_ref().map(Server::local_addr);
        if let Some(a) = listen_addr {
            log::info!("agent {name}: side channel on {a}");
        }
        let progress = if shared.progress_thread {
            let s = Arc::clone(&shared);
            let t = std::thread::Builder::new()
                .name("kvxfer-progress".into())
                .spawn(move || progress_loop(s))
                .map_err(|e| {
                    Error::backend(
                        kind.name(),
                        i64::from(e.raw_os_error().unwrap_or(-1)),
                        &format!("spawn progress thread: {e}"),
                    )
                })?;
            Some(t)
        } else {
            None
        };
        Ok(Agent {
            owner: Arc::new(Owner {
                shared,
                server: Mutex::new(server),
                listen_addr,
                progress: Mutex::new(progress),
                metrics,
            }),
        })
    }

    fn shared(&self) -> &Arc<Shared> {
        &self.owner.shared
    }

    /// This agent's name.
    pub fn name(&self) -> &str {
        &self.shared().name
    }

    /// The backend in use.
    pub fn backend(&self) -> BackendKind {
        self.shared().kind
    }

    /// Where the side channel listens (with the port chosen), if it runs.
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.owner.listen_addr
    }

    /// This agent's metrics (see [`crate::metrics`]): take a
    /// [`snapshot`](crate::metrics::AgentMetrics::snapshot) or
    /// [`encode`](crate::metrics::AgentMetrics::encode) them.
    pub fn metrics(&self) -> Arc<crate::metrics::AgentMetrics> {
        Arc::clone(&self.owner.metrics.0)
    }

    /// Where this agent's metrics endpoint listens (with the port chosen),
    /// if [`AgentConfig::metrics_addr`] asked for one.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.owner.metrics.1.as_ref().map(|e| e.local_addr())
    }

    /// Registers `[addr, addr + len)` on device `dev` as memory of `kind`,
    /// so that transfers may use it locally and peers remotely (once they
    /// have loaded metadata fetched after this call).
    ///
    /// # Safety
    ///
    /// The memory must stay allocated until it is
    /// [deregistered](Agent::deregister) (or the agent shut down), and the
    /// caller must accept that transfers — READs this agent posts, WRITEs
    /// peers post — change it at any time: no Rust reference may read it
    /// while such a transfer can run.
    pub unsafe fn register(
        &self,
        addr: u64,
        len: u64,
        dev: u32,
        kind: MemKind,
    ) -> Result<(), Error> {
        let mut st = self.shared().lock();
        let b = st.backend()?;
        on_engine!(b, e => e.register(Region { addr, len, dev, kind }))
    }

    /// Registers the host memory of `buf` (device 0). It is borrowed
    /// mutably because transfers write into it.
    ///
    /// # Safety
    ///
    /// As for [`register`](Agent::register): `buf`'s memory must outlive
    /// the registration, and no Rust reference may read it while a
    /// transfer that writes it can run (the borrow ends with this call;
    /// the registration does not).
    ///
    /// Memory borrowed immutably cannot be registered:
    ///
    /// ```compile_fail
    /// # use kvxfer::{Agent, AgentConfig};
    /// # let agent = Agent::new("a", AgentConfig::default().with_listen(None)).unwrap();
    /// let buf = vec![0u8; 64];
    /// unsafe { agent.register_slice(&buf) }.unwrap();
    /// ```
    pub unsafe fn register_slice(&self, buf: &mut [u8]) -> Result<(), Error> {
        // SAFETY: the caller upholds `register`'s contract for `buf`.
        unsafe { self.register(buf.as_mut_ptr() as u64, buf.len() as u64, 0, MemKind::Dram) }
    }

    /// Deregisters the region starting at `addr`; refused with
    /// [`Error::RegionBusy`] while live transfers or prepared lists use it.
    /// While the library still runs an operation of a released (cancelled)
    /// or timed-out transfer on it, waits for it, making progress, up to
    /// [`AgentConfig::release_timeout`], and then fails with
    /// [`Error::RegionInUse`]: the memory must then stay allocated (call
    /// again later). Only `Ok` means the memory may be freed.
    pub fn deregister(&self, addr: u64) -> Result<Region, Error> {
        let deadline = StdInstant::now() + self.shared().cfg.release_timeout;
        loop {
            let r = {
                let mut st = self.shared().lock();
                let b = st.backend()?;
                let r = on_engine!(b, e => e.deregister(addr));
                if matches!(r, Err(Error::RegionInUse { .. })) {
                    st.progress();
                }
                r
            };
            match r {
                Err(Error::RegionInUse { .. }) if StdInstant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                r => return r,
            }
        }
    }

    /// This agent's metadata: name, backend, transport address, registered
    /// regions and their keys.
    pub fn local_metadata(&self) -> Result<Vec<u8>, Error> {
        self.shared().metadata()
    }

    /// Loads a peer's metadata (replacing an earlier load under the same
    /// name) and returns the peer's name.
    pub fn load_remote(&self, blob: &[u8]) -> Result<String, Error> {
        let r = self.shared().load(blob);
        self.shared().nudge();
        r
    }

    /// Connects to the agent whose side channel listens on `addr`
    /// (`host:port`): fetches and loads its metadata, then pushes ours so
    /// that it can reach us too. Returns the peer's name.
    ///
    /// Fetch again (call `connect` again) after the peer registers more
    /// memory.
    pub fn connect(&self, addr: &str) -> Result<String, Error> {
        if self.shared().closed.load(Ordering::Acquire) {
            return Err(Error::ShutDown);
        }
        let r = self.connect_inner(addr);
        if let Err(e) = &r {
            self.owner.metrics.0.error(crate::metrics::Op::Connect, e);
        }
        r
    }

    fn connect_inner(&self, addr: &str) -> Result<String, Error> {
        let cfg = &self.shared().cfg;
        let key = cfg.effective_auth_key();
        let mut client = Client::connect(addr, key.as_deref(), cfg.io_timeout)?;
        let theirs = client.get_metadata()?;
        let peer = self.load_remote(&theirs)?;
        let ours = self.local_metadata()?;
        let as_seen = client.push_metadata(&ours)?;
        log::info!(
            "agent {}: connected to {peer:?} at {addr} (it knows us as {as_seen:?})",
            self.name()
        );
        Ok(peer)
    }

    /// Checks that every descriptor lies in a region the peer registered.
    pub fn check_remote(&self, peer: &str, descs: &[Desc]) -> Result<(), Error> {
        let mut st = self.shared().lock();
        let b = st.backend()?;
        on_engine!(b, e => e.check_remote(peer, descs))
    }

    /// Whether a peer of this name is loaded.
    pub fn has_remote(&self, peer: &str) -> Result<bool, Error> {
        let mut st = self.shared().lock();
        let b = st.backend()?;
        Ok(on_engine!(b, e => e.has_remote(peer)))
    }

    /// Forgets a peer: its connection and keys are released.
    pub fn invalidate_remote(&self, peer: &str) -> Result<(), Error> {
        let mut st = self.shared().lock();
        let b = st.backend()?;
        on_engine!(b, e => e.invalidate_remote(peer))
    }

    /// Validates and resolves a transfer without starting it; start it
    /// with [`XferRequest::post`], as often as needed (a request reused
    /// this way allocates nothing per post).
    ///
    /// `local[i]` and `remote[i]` are paired and must have equal lengths.
    /// `notification`, if given, reaches the peer after the data.
    pub fn prepare(
        &self,
        op: XferOp,
        local: &[Desc],
        remote: &[Desc],
        peer: &str,
        notification: Option<&[u8]>,
    ) -> Result<XferRequest, Error> {
        self.prepare_lists(op, local.into(), remote.into(), peer, notification)
    }

    /// [`prepare`](Agent::prepare) for explicit or strided lists: a
    /// [`Strided`](kvxfer_core::Strided) list names `count` blocks of one
    /// length at a fixed stride without a descriptor per block.
    pub fn prepare_lists(
        &self,
        op: XferOp,
        local: DescList<'_>,
        remote: DescList<'_>,
        peer: &str,
        notification: Option<&[u8]>,
    ) -> Result<XferRequest, Error> {
        let mut st = self.shared().lock();
        let (b, note) = st.sealed(peer, notification)?;
        let prepared: Result<XferHandle, Error> =
            on_engine!(b, e => e.prepare_lists(op, local, remote, peer, note));
        let prepared = st
            .meter
            .prepared(prepared, op, peer, notification.is_some());
        Ok(self.request(prepared?))
    }

    /// Prepares and posts a transfer (see [`prepare`](Agent::prepare)).
    pub fn submit(
        &self,
        op: XferOp,
        local: &[Desc],
        remote: &[Desc],
        peer: &str,
        notification: Option<&[u8]>,
    ) -> Result<XferRequest, Error> {
        let req = self.prepare(op, local, remote, peer, notification)?;
        req.post()?;
        Ok(req)
    }

    /// Resolves `descs` against this agent's registrations once, for
    /// [`make_xfer`](Agent::make_xfer): the low-latency path, where a
    /// transfer is later built from list entries by index without
    /// validating descriptors again. The list holds its regions (they
    /// cannot be deregistered) until [`release_local`](Agent::release_local).
    pub fn prep_local(&self, descs: &[Desc]) -> Result<PreparedLocal, Error> {
        self.prep_local_list(descs.into())
    }

    /// [`prep_local`](Agent::prep_local) for an explicit or strided list; a
    /// strided list inside one registration takes no per-entry memory.
    pub fn prep_local_list(&self, list: DescList<'_>) -> Result<PreparedLocal, Error> {
        let mut st = self.shared().lock();
        let b = st.backend()?;
        on_engine!(b, e => e.prep_local_list(list))
    }

    /// [`prep_remote`](Agent::prep_remote) for an explicit or strided list.
    pub fn prep_remote_list(
        &self,
        peer: &str,
        list: DescList<'_>,
    ) -> Result<PreparedRemote, Error> {
        let mut st = self.shared().lock();
        let b = st.backend()?;
        on_engine!(b, e => e.prep_remote_list(peer, list))
    }

    /// Resolves `descs` against the regions `peer` published, once, for
    /// [`make_xfer`](Agent::make_xfer). The list goes stale when the peer
    /// is reloaded or invalidated.
    pub fn prep_remote(&self, peer: &str, descs: &[Desc]) -> Result<PreparedRemote, Error> {
        self.prep_remote_list(peer, descs.into())
    }

    /// Releases a list made by [`prep_local`](Agent::prep_local); using it
    /// afterwards is [`Error::StalePrepared`].
    pub fn release_local(&self, list: PreparedLocal) -> Result<(), Error> {
        let mut st = self.shared().lock();
        let b = st.backend()?;
        on_engine!(b, e => e.release_local(list))
    }

    /// Releases a list made by [`prep_remote`](Agent::prep_remote); using
    /// it afterwards is [`Error::StalePrepared`].
    pub fn release_remote(&self, list: PreparedRemote) -> Result<(), Error> {
        let mut st = self.shared().lock();
        let b = st.backend()?;
        on_engine!(b, e => e.release_remote(list))
    }

    /// Makes a transfer (not yet posted) from prepared lists: pair `k`
    /// moves `local[local_idx[k]]` and `remote[remote_idx[k]]`, whose
    /// lengths must agree. Start it with [`XferRequest::post`].
    pub fn make_xfer(
        &self,
        op: XferOp,
        local: PreparedLocal,
        local_idx: &[u32],
        remote: PreparedRemote,
        remote_idx: &[u32],
        notification: Option<&[u8]>,
    ) -> Result<XferRequest, Error> {
        let mut st = self.shared().lock();
        // Sealing names the receiver: the list's peer, looked up only then.
        let peer = if notification.is_some() && st.note_key.is_some() {
            let b = st.backend()?;
            on_engine!(b, e => e.prepared_peer(remote).map(str::to_string))?
        } else {
            String::new()
        };
        let (b, note) = st.sealed(&peer, notification)?;
        let made: Result<XferHandle, Error> = on_engine!(b, e => {
            e.make_xfer(op, local, local_idx, remote, remote_idx, note)
        });
        let made = st.metered(made, op, remote, notification.is_some());
        Ok(self.request(made?))
    }

    /// How data to and from `peer` moves: `"cross-memory attach"` for a peer
    /// on this host that this process may reach (see
    /// [`AgentConfig::same_host`]), else the backend's name.
    pub fn peer_path(&self, peer: &str) -> Result<&'static str, Error> {
        const CMA: &str = "cross-memory attach";
        let mut st = self.shared().lock();
        let b = st.backend()?;
        let near = match *b {
            #[cfg(feature = "ucx")]
            Backend::Ucx(ref e) => local_of(e.transport()).is_near(e.remote_peer(peer)?),
            #[cfg(feature = "libfabric")]
            Backend::Fabric(ref e) => local_of(e.transport()).is_near(e.remote_peer(peer)?),
            #[cfg(feature = "cuda")]
            Backend::CudaIpc(ref e) => {
                e.remote_peer(peer)?;
                false
            }
        };
        Ok(if near { CMA } else { self.backend().name() })
    }

    /// Bytes, failures and state of each network rail; empty unless the
    /// libfabric backend runs over several rails ([`AgentConfig::rails`]).
    pub fn rail_stats(&self) -> Vec<kvxfer_rails::RailStats> {
        let st = self.shared().lock();
        match st.backend.as_ref() {
            #[cfg(feature = "libfabric")]
            Some(Backend::Fabric(e)) => crate::rails::stats(local_of(e.transport()).inner()),
            _ => Vec::new(),
        }
    }

    /// How this agent's backend moves VRAM: `"native"` (UCX with CUDA
    /// support registers and moves it itself: `cuda_ipc` and `cuda_copy` on
    /// one host, the network transports across hosts), `"staged"`
    /// (through pinned host buffers, the target's CPU serving each chunk),
    /// `"cuda-ipc"` (the CUDA_IPC backend) or `"none"` (built without the
    /// `cuda` feature).
    pub fn vram_path(&self) -> Result<&'static str, Error> {
        let mut st = self.shared().lock();
        let b = st.backend()?;
        #[cfg(feature = "cuda")]
        let native = |n: bool| if n { "native" } else { "staged" };
        Ok(match *b {
            #[cfg(all(feature = "ucx", feature = "cuda"))]
            Backend::Ucx(ref e) => native(e.transport().native_vram()),
            #[cfg(all(feature = "libfabric", feature = "cuda"))]
            Backend::Fabric(ref e) => native(e.transport().native_vram()),
            #[cfg(feature = "cuda")]
            Backend::CudaIpc(_) => "cuda-ipc",
            #[allow(unreachable_patterns)]
            _ => "none",
        })
    }

    /// Why VRAM takes the path [`vram_path`](Self::vram_path) names: for
    /// UCX and libfabric, whether the library registers CUDA memory itself
    /// (libfabric: whether the provider offers `FI_HMEM` and accepted a
    /// probe registration), or what keeps VRAM on the staged path (no
    /// CUDA driver, `KVXFER_UCX_NATIVE_VRAM=0`,
    /// `KVXFER_LIBFABRIC_NATIVE_VRAM=0`, ...).
    pub fn vram_reason(&self) -> Result<String, Error> {
        let mut st = self.shared().lock();
        let b = st.backend()?;
        Ok(match *b {
            #[cfg(all(feature = "ucx", feature = "cuda"))]
            Backend::Ucx(ref e) => crate::vram::ucx_reason(local_of(e.transport()).inner()),
            #[cfg(all(feature = "libfabric", feature = "cuda"))]
            Backend::Fabric(ref e) => match local_of(e.transport()).inner().rail(0) {
                // Every rail is opened and probed alike: the first speaks for all.
                Some(t) => crate::vram::fabric_reason(t),
                None => "libfabric has no rail open".to_string(),
            },
            #[cfg(feature = "cuda")]
            Backend::CudaIpc(_) => {
                "CUDA_IPC maps the peer's VRAM with CUDA IPC handles".to_string()
            }
            #[allow(unreachable_patterns)]
            _ => "this kvxfer is built without the cuda feature".to_string(),
        })
    }

    /// The side-channel key in force ([`AgentConfig::effective_auth_key`]).
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    pub(crate) fn auth_key(&self) -> Option<Vec<u8>> {
        self.shared().cfg.effective_auth_key()
    }

    /// Requests released (or dropped) while their transport could not
    /// cancel them and still running: each is released, its slot and
    /// memory freed, as soon as it ends.
    pub fn orphaned_transfers(&self) -> usize {
        self.shared().lock().orphans.len()
    }

    /// The sizes of this agent's tables, as configured.
    pub fn capacities(&self) -> Capacities {
        self.shared().cfg.capacities
    }

    /// The request that owns `handle`, a transfer of this agent's engine.
    fn request(&self, handle: XferHandle) -> XferRequest {
        XferRequest {
            shared: Arc::clone(self.shared()),
            handle,
            released: false,
        }
    }

    /// Sends `msg` to `peer` outside any transfer.
    pub fn notify(&self, peer: &str, msg: &[u8]) -> Result<(), Error> {
        let mut st = self.shared().lock();
        let (b, note) = st.sealed(peer, Some(msg))?;
        let r = on_engine!(b, e => e.notify(peer, note.unwrap_or(msg)));
        let r = st.meter.notified(peer, r);
        self.shared().nudge();
        r
    }

    /// Takes every notification received so far, grouped by sending peer,
    /// oldest first.
    ///
    /// If notifications were lost on the way in (the transport's receive
    /// queue was full), it fails instead with [`Error::NotificationsLost`]
    /// naming the sender and the count, once per sender; the messages
    /// received meanwhile stay for the next call.
    pub fn take_notifications(&self) -> Result<HashMap<String, Vec<Vec<u8>>>, Error> {
        let mut st = self.shared().lock();
        st.backend()?;
        if !self.shared().progress_thread {
            st.progress();
        }
        let first = st.lost.keys().next().cloned();
        if let Some(peer) = first {
            let count = st.lost.remove(&peer).unwrap_or(0);
            return Err(Error::NotificationsLost {
                peer: kvxfer_core::error::bounded(&peer),
                count,
            });
        }
        let first = st.refused.keys().next().cloned();
        if let Some(peer) = first {
            let count = st.refused.remove(&peer).unwrap_or(0);
            return Err(Error::NotificationsRefused {
                peer: kvxfer_core::error::bounded(&peer),
                count,
            });
        }
        Ok(std::mem::take(&mut st.notifs))
    }

    /// [`take_notifications`](Agent::take_notifications), waiting up to
    /// `timeout` for at least one notification (or a loss to report)
    /// instead of returning an empty map at once. With a progress thread
    /// the caller sleeps until it collects one; without, this polls.
    pub fn wait_notifications(
        &self,
        timeout: Duration,
    ) -> Result<HashMap<String, Vec<Vec<u8>>>, Error> {
        let deadline = StdInstant::now() + timeout;
        loop {
            {
                let mut st = self.shared().lock();
                st.backend()?;
                if !self.shared().progress_thread {
                    st.progress();
                }
                if st.notifs.is_empty() && st.lost.is_empty() && st.refused.is_empty() {
                    let left = deadline.saturating_duration_since(StdInstant::now());
                    if left.is_zero() {
                        return Ok(HashMap::new());
                    }
                    if self.shared().progress_thread {
                        let wait = left.min(Duration::from_millis(100));
                        drop(self.shared().done.wait_timeout(st, wait));
                    } else {
                        drop(st);
                        std::thread::sleep(left.min(Duration::from_millis(1)));
                    }
                    continue;
                }
            }
            return self.take_notifications();
        }
    }

    /// Polls the transport once (completions and notifications). Needed
    /// only without a progress thread, by an agent that is the target of
    /// transfers over a backend that serves RMA in software.
    pub fn make_progress(&self) -> Result<usize, Error> {
        let mut st = self.shared().lock();
        st.backend()?;
        let n = st.progress();
        drop(st);
        if n > 0 {
            self.shared().done.notify_all();
        }
        Ok(n)
    }

    /// Shuts the agent down: stops the side channel and the progress
    /// thread, then closes the transport. Idempotent; afterwards every
    /// other call returns [`Error::ShutDown`].
    pub fn shutdown(&self) {
        self.owner.shutdown();
    }
}

/// The outcome of [`XferRequest::wait`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WaitOutcome {
    /// All data is at its destination.
    Done,
    /// The transfer failed (or the request is no longer valid), and why.
    Failed(Error),
    /// The timeout passed first (or the request was never posted).
    InProgress,
}

/// A transfer of an [`Agent`]. Dropping it releases the transfer: one in
/// progress is cancelled where the transport can cancel, and otherwise
/// waited for up to [`AgentConfig::release_timeout`].
#[derive(Debug)]
pub struct XferRequest {
    shared: Arc<Shared>,
    handle: XferHandle,
    released: bool,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent").field("name", &self.name).finish()
    }
}

impl XferRequest {
    /// The core's handle of this transfer.
    pub fn handle(&self) -> XferHandle {
        self.handle
    }

    /// Posts (or re-posts) the transfer; returns its state right after
    /// (`Done` when the transport completed it inline). Refused with
    /// [`Error::InProgress`] while a previous post runs.
    pub fn post(&self) -> Result<XferState, Error> {
        let mut st = self.shared.lock();
        let State { backend, meter, .. } = &mut *st;
        let b = backend.as_mut().ok_or(Error::ShutDown)?;
        let state = on_engine!(b, e => {
            meter.posting(e, self.handle);
            let r = e.post(self.handle, now());
            if r.is_ok() {
                e.post_finished(self.handle, now());
            }
            meter.posted(e, self.handle, &r);
            r
        })?;
        // The progress thread may sleep on the transport: it has work now,
        // unless the transport finished the transfer (and its
        // notification) inside the post.
        if state != XferState::Done {
            self.shared.nudge();
        }
        Ok(state)
    }

    /// Re-posts the transfer (same as [`post`](XferRequest::post)).
    pub fn repost(&self) -> Result<XferState, Error> {
        self.post()
    }

    /// The transfer's state. Without a progress thread, polls first.
    pub fn status(&self) -> Result<XferState, Error> {
        let mut st = self.shared.lock();
        st.backend()?;
        if !self.shared.progress_thread {
            st.progress();
        }
        let b = st.backend()?;
        on_engine!(b, e => e.state(self.handle))
    }

    /// Whether the transfer has finished, successfully or not.
    pub fn is_completed(&self) -> bool {
        matches!(self.status(), Ok(XferState::Done | XferState::Failed(_)))
    }

    /// The transfer's telemetry (bytes, segments, post and completion
    /// times).
    pub fn telemetry(&self) -> Result<XferTelemetry, Error> {
        let mut st = self.shared.lock();
        let b = st.backend()?;
        on_engine!(b, e => e.telemetry(self.handle))
    }

    /// Waits up to `timeout` for the transfer to finish.
    pub fn wait(&self, timeout: Duration) -> WaitOutcome {
        let deadline = StdInstant::now() + timeout;
        let mut st = self.shared.lock();
        let mut spins: u32 = 0;
        loop {
            if !self.shared.progress_thread {
                st.progress();
            }
            let state = match st.backend() {
                Ok(b) => on_engine!(b, e => e.state(self.handle)),
                Err(e) => Err(e),
            };
            match state {
                Ok(XferState::Done) => return WaitOutcome::Done,
                Ok(XferState::Failed(e)) | Err(e) => return WaitOutcome::Failed(e),
                Ok(XferState::Prepared) => return WaitOutcome::InProgress,
                Ok(XferState::InProgress) => {}
            }
            let left = deadline.saturating_duration_since(StdInstant::now());
            if left.is_zero() {
                return WaitOutcome::InProgress;
            }
            if self.shared.progress_thread {
                // Woken by the progress thread when transfers finish; the
                // cap guards against a wake-up lost to a shutdown race.
                let (g, _) = self
                    .shared
                    .done
                    .wait_timeout(st, left.min(Duration::from_millis(1)))
                    .unwrap_or_else(PoisonError::into_inner);
                st = g;
            } else {
                drop(st);
                spins = spins.saturating_add(1);
                if spins < 1000 {
                    std::thread::yield_now();
                } else {
                    std::thread::sleep(Duration::from_micros(20).min(left));
                }
                st = self.shared.lock();
            }
        }
    }

    /// Releases the transfer now, reporting what dropping it would only
    /// log. See the type's docs.
    pub fn release(mut self) -> Result<(), Error> {
        self.release_inner()
    }

    fn release_inner(&mut self) -> Result<(), Error> {
        if self.released {
            return Ok(());
        }
        self.released = true;
        let mut st = self.shared.lock();
        let Ok(b) = st.backend() else { return Ok(()) };
        let first: Result<(), Error> = on_engine!(b, e => e.release(self.handle));
        st.meter.released(self.handle, &first);
        match first {
            Ok(()) => Ok(()),
            Err(Error::InProgress { .. }) => {
                // The transport cannot cancel: wait for the end, bounded.
                drop(st);
                let limit = self.shared.cfg.release_timeout;
                let outcome = self.wait(limit);
                let mut st = self.shared.lock();
                let Ok(b) = st.backend() else { return Ok(()) };
                let r: Result<(), Error> = on_engine!(b, e => e.release(self.handle));
                st.meter.released(self.handle, &r);
                if let Err(Error::InProgress { .. }) = r {
                    log::warn!(
                        "transfer {} still in progress {} ms after release ({outcome:?}); it is \
                         released when it ends",
                        self.handle,
                        limit.as_millis()
                    );
                    st.orphans.push(self.handle);
                }
                r
            }
            Err(e) => Err(e),
        }
    }
}

impl Drop for XferRequest {
    fn drop(&mut self) {
        if let Err(e) = self.release_inner() {
            log::warn!("releasing transfer {}: {e}", self.handle);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_is_send_sync() {
        fn check<T: Send + Sync>() {}
        check::<Agent>();
        check::<XferRequest>();
    }

    #[test]
    fn engine_tables_are_sized_from_the_config() {
        use kvxfer_core::Capacities;
        let caps = Capacities {
            xfers: 3,
            prepared_entries: 5,
            ..crate::config::DEFAULT_CAPACITIES
        };
        let cfg = AgentConfig::default().with_capacities(caps);
        let t = kvxfer_core::transport::loopback::Loopback::new(&MEM, 1);
        let e = boxed_engine("sized", t, &cfg, None).unwrap();
        assert_eq!(*e.capacities(), caps);
    }

    /// The default tables take what `DEFAULT_CAPACITIES` documents: about
    /// 65 MiB for UCX and libfabric, 70 MiB for CUDA_IPC.
    #[test]
    fn default_tables_take_about_65_mib() {
        let caps = crate::config::DEFAULT_CAPACITIES;
        let sizes = [
            #[cfg(feature = "ucx")]
            caps.bytes::<UcxT>(),
            #[cfg(feature = "libfabric")]
            caps.bytes::<FabricT>(),
            #[cfg(feature = "cuda")]
            caps.bytes::<kvxfer_cuda::CudaIpcTransport>(),
        ];
        let mib = sizes.map(|b| b as f64 / f64::from(1 << 20));
        for m in mib {
            assert!((60.0..=71.0).contains(&m), "{mib:.2?} MiB");
        }
    }

    static MEM: kvxfer_core::transport::loopback::LoopbackMemory<64> =
        kvxfer_core::transport::loopback::LoopbackMemory::new(0x1000);
}
