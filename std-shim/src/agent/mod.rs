//! The thread-safe [`Agent`] and its transfer requests.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant as StdInstant};

use kvxfer_core::engine::{PreparedLocal, PreparedRemote, XferHandle};
use kvxfer_core::{
    Capacities, Desc, DescList, Engine, Error, MemKind, Region, XferOp, XferState, XferTelemetry,
};

use crate::backends::{self, on_engine, on_engine_arms, AgentTransport, BackendKind, Engines};
use crate::clock::now;
use crate::config::{select_backend_from_env, AgentConfig};
use crate::note_auth::NoteKey;
use crate::side_channel::{self, Client, Server};

mod state;
use state::*;
mod inner;
use inner::*;
mod progress;
use progress::*;
mod request;
pub use request::*;

/// The engine over transport `T`, in tables the agent owns (sized from
/// [`AgentConfig::capacities`]).
pub type AgentEngine<T> = Engine<'static, T>;

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
            .field("name", &self.owner.inner.name)
            .field("backend", &self.owner.inner.kind)
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
        let backend = backends::build(kind, name, &cfg)?;
        let notif_buf = vec![0u8; cfg.capacities.notification_len as usize];
        let (meter, endpoint) = crate::meter::Meter::for_agent(name, kind.name(), &cfg)?;
        let metrics = (Arc::clone(meter.metrics()), endpoint);
        let rails = Arc::clone(&metrics.0);
        let inner = Arc::new(AgentInner {
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
        // The rails' counters, read at each scrape (not on the hot path);
        // an agent without rails is not locked by scrapes.
        if !inner.rail_stats().is_empty() {
            let weak = Arc::downgrade(&inner);
            rails.read_rails_from(move || weak.upgrade().map_or_else(Vec::new, |i| i.rail_stats()));
        }
        let server = match &inner.cfg.listen {
            Some(listen) => {
                let opts = side_channel::Options {
                    io_timeout: inner.cfg.io_timeout,
                    idle_timeout: inner.cfg.idle_timeout,
                    key: inner.cfg.effective_auth_key(),
                };
                let handler: Arc<dyn side_channel::Handler> = inner.clone();
                Some(Server::start(listen, handler, opts)?)
            }
            None => None,
        };
        let listen_addr = server.as_ref().map(Server::local_addr);
        if let Some(a) = listen_addr {
            log::info!("agent {name}: side channel on {a}");
        }
        let progress = if inner.progress_thread {
            let s = Arc::clone(&inner);
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
                inner,
                server: Mutex::new(server),
                listen_addr,
                progress: Mutex::new(progress),
                metrics,
            }),
        })
    }

    fn inner(&self) -> &Arc<AgentInner> {
        &self.owner.inner
    }

    /// This agent's name.
    pub fn name(&self) -> &str {
        &self.inner().name
    }

    /// The backend in use.
    pub fn backend(&self) -> BackendKind {
        self.inner().kind
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
        let mut st = self.inner().lock();
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
        let deadline = StdInstant::now() + self.inner().cfg.release_timeout;
        loop {
            let r = {
                let mut st = self.inner().lock();
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
        self.inner().metadata()
    }

    /// Loads a peer's metadata (replacing an earlier load under the same
    /// name) and returns the peer's name.
    pub fn load_remote(&self, blob: &[u8]) -> Result<String, Error> {
        let r = self.inner().load(blob);
        self.inner().nudge();
        r
    }

    /// Connects to the agent whose side channel listens on `addr`
    /// (`host:port`): fetches and loads its metadata, then pushes ours so
    /// that it can reach us too. Returns the peer's name.
    ///
    /// Fetch again (call `connect` again) after the peer registers more
    /// memory.
    pub fn connect(&self, addr: &str) -> Result<String, Error> {
        if self.inner().closed.load(Ordering::Acquire) {
            return Err(Error::ShutDown);
        }
        let r = self.connect_inner(addr);
        if let Err(e) = &r {
            self.owner.metrics.0.error(crate::metrics::Op::Connect, e);
        }
        r
    }

    fn connect_inner(&self, addr: &str) -> Result<String, Error> {
        let cfg = &self.inner().cfg;
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
        let mut st = self.inner().lock();
        let b = st.backend()?;
        on_engine!(b, e => e.check_remote(peer, descs))
    }

    /// Whether a peer of this name is loaded.
    pub fn has_remote(&self, peer: &str) -> Result<bool, Error> {
        let mut st = self.inner().lock();
        let b = st.backend()?;
        Ok(on_engine!(b, e => e.has_remote(peer)))
    }

    /// Forgets a peer: its connection and keys are released.
    pub fn invalidate_remote(&self, peer: &str) -> Result<(), Error> {
        let mut st = self.inner().lock();
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
        let mut st = self.inner().lock();
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
        let mut st = self.inner().lock();
        let b = st.backend()?;
        on_engine!(b, e => e.prep_local_list(list))
    }

    /// [`prep_remote`](Agent::prep_remote) for an explicit or strided list.
    pub fn prep_remote_list(
        &self,
        peer: &str,
        list: DescList<'_>,
    ) -> Result<PreparedRemote, Error> {
        let mut st = self.inner().lock();
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
        let mut st = self.inner().lock();
        let b = st.backend()?;
        on_engine!(b, e => e.release_local(list))
    }

    /// Releases a list made by [`prep_remote`](Agent::prep_remote); using
    /// it afterwards is [`Error::StalePrepared`].
    pub fn release_remote(&self, list: PreparedRemote) -> Result<(), Error> {
        let mut st = self.inner().lock();
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
        let mut st = self.inner().lock();
        // Sealing names the receiver: the list's peer, looked up only then.
        let peer = if notification.is_some() && st.note_key.is_some() {
            let b = st.backend()?;
            let r: Result<String, Error> =
                on_engine!(b, e => e.prepared_peer(remote).map(str::to_string));
            r?
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
        let mut st = self.inner().lock();
        let b = st.backend()?;
        let near = on_engine!(b, e => {
            let p = e.remote_peer(peer)?;
            AgentTransport::is_near(e.transport(), p)
        });
        Ok(if near { CMA } else { self.backend().name() })
    }

    /// How this agent's backend moves VRAM: `"native"` (UCX with CUDA
    /// support registers and moves it itself: `cuda_ipc` and `cuda_copy` on
    /// one host, the network transports across hosts), `"staged"`
    /// (through pinned host buffers, the target's CPU serving each chunk),
    /// `"cuda-ipc"` (the CUDA_IPC backend) or `"none"` (built without the
    /// `cuda` feature).
    pub fn vram_path(&self) -> Result<&'static str, Error> {
        let mut st = self.inner().lock();
        let b = st.backend()?;
        Ok(on_engine!(b, e => AgentTransport::vram_path(e.transport())))
    }

    /// Why VRAM takes the path [`vram_path`](Self::vram_path) names: for
    /// UCX and libfabric, whether the library registers CUDA memory itself
    /// (libfabric: whether the provider offers `FI_HMEM` and accepted a
    /// probe registration), or what keeps VRAM on the staged path (no
    /// CUDA driver, `KVXFER_UCX_NATIVE_VRAM=0`,
    /// `KVXFER_LIBFABRIC_NATIVE_VRAM=0`, ...).
    pub fn vram_reason(&self) -> Result<String, Error> {
        let mut st = self.inner().lock();
        let b = st.backend()?;
        Ok(on_engine!(b, e => AgentTransport::vram_reason(e.transport())))
    }

    /// Bytes, failures and state of each network rail; empty unless the
    /// UCX or libfabric backend runs over several rails
    /// ([`AgentConfig::rails`]). Also in the metrics
    /// ([`Snapshot::rails`](crate::metrics::Snapshot::rails)).
    pub fn rail_stats(&self) -> Vec<kvxfer_rails::RailStats> {
        self.inner().rail_stats()
    }

    /// What each rail of [`rail_stats`](Self::rail_stats) runs on: UCX's
    /// network transports (`tcp/eth1`), libfabric's provider.
    #[cfg(any(feature = "libfabric", feature = "ucx"))]
    pub(crate) fn rail_devices(&self) -> Vec<String> {
        let mut st = self.inner().lock();
        match st.backend() {
            Ok(b) => on_engine!(b, e => AgentTransport::rail_devices(e.transport())),
            Err(_) => Vec::new(),
        }
    }

    /// The side-channel key in force ([`AgentConfig::effective_auth_key`]).
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    pub(crate) fn auth_key(&self) -> Option<Vec<u8>> {
        self.inner().cfg.effective_auth_key()
    }

    /// Requests released (or dropped) while their transport could not
    /// cancel them and still running: each is released, its slot and
    /// memory freed, as soon as it ends.
    pub fn orphaned_transfers(&self) -> usize {
        self.inner().lock().orphans.len()
    }

    /// The sizes of this agent's tables, as configured.
    pub fn capacities(&self) -> Capacities {
        self.inner().cfg.capacities
    }

    /// The request that owns `handle`, a transfer of this agent's engine.
    fn request(&self, handle: XferHandle) -> XferRequest {
        XferRequest {
            inner: Arc::clone(self.inner()),
            handle,
            released: false,
        }
    }

    /// Sends `msg` to `peer` outside any transfer.
    pub fn notify(&self, peer: &str, msg: &[u8]) -> Result<(), Error> {
        let mut st = self.inner().lock();
        let (b, note) = st.sealed(peer, Some(msg))?;
        let r = on_engine!(b, e => e.notify(peer, note.unwrap_or(msg)));
        let r = st.meter.notified(peer, r);
        self.inner().nudge();
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
        let mut st = self.inner().lock();
        st.backend()?;
        if !self.inner().progress_thread {
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
                let mut st = self.inner().lock();
                st.backend()?;
                if !self.inner().progress_thread {
                    st.progress();
                }
                if st.notifs.is_empty() && st.lost.is_empty() && st.refused.is_empty() {
                    let left = deadline.saturating_duration_since(StdInstant::now());
                    if left.is_zero() {
                        return Ok(HashMap::new());
                    }
                    if self.inner().progress_thread {
                        let wait = left.min(Duration::from_millis(100));
                        drop(self.inner().done.wait_timeout(st, wait));
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
        let mut st = self.inner().lock();
        st.backend()?;
        let n = st.progress();
        drop(st);
        if n > 0 {
            self.inner().done.notify_all();
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
#[cfg(test)]
mod tests;
