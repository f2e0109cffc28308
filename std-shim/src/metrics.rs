//! Metrics of every agent in this process, in Prometheus' text format.
//!
//! Each [`Agent`](crate::Agent) keeps counters, gauges and histograms — per
//! agent, backend and peer — in fixed-size tables of atomics created when
//! the agent starts and when a peer is loaded: recording a transfer takes
//! no lock and allocates nothing (see `docs/metrics.md` for every metric,
//! its labels and units).
//!
//! * Recording is on by default; [`AgentConfig::metrics`] or
//!   `KVXFER_METRICS=0` turns it off.
//! * [`AgentConfig::metrics_addr`] (or `KVXFER_METRICS_ADDR`) serves the
//!   metrics of every agent of the process over HTTP (`GET /metrics`), see
//!   [`serve`].
//! * Applications read them with [`Agent::metrics`](crate::Agent::metrics)
//!   (a [`Snapshot`] of one agent) or encode them with [`encode`] (every
//!   agent) and [`AgentMetrics::encode`].
//!
//! ```no_run
//! use kvxfer::{Agent, AgentConfig};
//!
//! let agent = Agent::new("prefill-0", AgentConfig::default().with_metrics_addr(Some("0.0.0.0:9464")))?;
//! let snap = agent.metrics().snapshot();
//! for p in &snap.peers {
//!     println!("{}: {} bytes written", p.peer, p.bytes[1]);
//! }
//! print!("{}", kvxfer::metrics::encode());
//! # Ok::<(), kvxfer::Error>(())
//! ```

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use kvxfer_core::{Error, XferOp};

use crate::config::AgentConfig;

/// Environment variable: `0` (or `false`, `off`) turns recording off when
/// [`AgentConfig::metrics`] is `None`.
pub const ENV_METRICS: &str = "KVXFER_METRICS";
/// Environment variable: the address to serve metrics on when
/// [`AgentConfig::metrics_addr`] is `None`.
pub const ENV_METRICS_ADDR: &str = "KVXFER_METRICS_ADDR";

/// Number of error kinds ([`Error::KINDS`]).
pub const KINDS: usize = Error::KINDS.len();

/// Upper bounds of the histogram buckets, in nanoseconds (1 µs to 10 s;
/// a `+Inf` bucket follows).
pub const BUCKETS_NS: [u64; 22] = [
    1_000,
    2_000,
    5_000,
    10_000,
    20_000,
    50_000,
    100_000,
    200_000,
    500_000,
    1_000_000,
    2_000_000,
    5_000_000,
    10_000_000,
    20_000_000,
    50_000_000,
    100_000_000,
    200_000_000,
    500_000_000,
    1_000_000_000,
    2_000_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// Directions, as the `direction` label names them: index 0 is READ, 1
/// WRITE.
pub const DIRECTIONS: [&str; 2] = ["read", "write"];

/// The index of `op` in [`DIRECTIONS`].
pub fn direction(op: XferOp) -> usize {
    match op {
        XferOp::Read => 0,
        XferOp::Write => 1,
    }
}

/// Agent calls whose errors [`AgentMetrics`] counts, as the `op` label
/// names them.
pub const OPS: [&str; 5] = ["connect", "load", "prepare", "post", "notify"];

/// An agent call counted in `kvxfer_errors_total` (index into [`OPS`]).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// [`Agent::connect`](crate::Agent::connect).
    Connect = 0,
    /// Loading a peer's metadata (`load_remote`, or a peer pushing it).
    Load = 1,
    /// `prepare`, `prepare_lists`, `submit`'s preparation and `make_xfer`.
    Prepare = 2,
    /// [`XferRequest::post`](crate::XferRequest::post).
    Post = 3,
    /// [`Agent::notify`](crate::Agent::notify).
    Notify = 4,
}

/// A latency histogram with the fixed buckets [`BUCKETS_NS`].
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS_NS.len()],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl Histogram {
    /// Records one observation of `ns` nanoseconds.
    pub fn observe(&self, ns: u64) {
        if let Some(i) = BUCKETS_NS.iter().position(|&b| ns <= b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// The counts so far.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut buckets = [0; BUCKETS_NS.len()];
        for (b, a) in buckets.iter_mut().zip(&self.buckets) {
            *b = a.load(Ordering::Relaxed);
        }
        HistogramSnapshot {
            buckets,
            count: self.count.load(Ordering::Relaxed),
            sum_ns: self.sum_ns.load(Ordering::Relaxed),
        }
    }
}

/// A histogram's counts at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HistogramSnapshot {
    /// Observations per bucket (not cumulative), bounds [`BUCKETS_NS`];
    /// those above the last bound are `count` minus their sum.
    pub buckets: [u64; BUCKETS_NS.len()],
    /// Observations.
    pub count: u64,
    /// Sum of the observations, in nanoseconds.
    pub sum_ns: u64,
}

fn counter_array<const N: usize>() -> [AtomicU64; N] {
    std::array::from_fn(|_| AtomicU64::new(0))
}

fn load<const N: usize>(a: &[AtomicU64; N]) -> [u64; N] {
    std::array::from_fn(|i| a[i].load(Ordering::Relaxed))
}

/// The series of one peer of one agent (label `peer`; the empty name
/// holds what no loaded peer can be named for, such as notifications from
/// an unknown sender).
#[derive(Debug)]
pub struct PeerMetrics {
    peer: String,
    pub(crate) bytes: [AtomicU64; 2],
    pub(crate) transfers: [AtomicU64; 2],
    pub(crate) failures: [AtomicU64; KINDS],
    pub(crate) timeouts: AtomicU64,
    pub(crate) latency: [Histogram; 2],
    pub(crate) post_time: [Histogram; 2],
    pub(crate) notes_sent: AtomicU64,
    pub(crate) notes_received: AtomicU64,
    pub(crate) notes_refused: AtomicU64,
    pub(crate) notes_lost: AtomicU64,
    pub(crate) in_flight: AtomicI64,
}

impl PeerMetrics {
    fn new(peer: &str) -> PeerMetrics {
        PeerMetrics {
            peer: peer.to_string(),
            bytes: counter_array(),
            transfers: counter_array(),
            failures: counter_array(),
            timeouts: AtomicU64::new(0),
            latency: Default::default(),
            post_time: Default::default(),
            notes_sent: AtomicU64::new(0),
            notes_received: AtomicU64::new(0),
            notes_refused: AtomicU64::new(0),
            notes_lost: AtomicU64::new(0),
            in_flight: AtomicI64::new(0),
        }
    }

    /// The peer's name ("" for the series of unknown senders).
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Records a transfer of `bytes` in direction `dir` that completed
    /// `latency_ns` after its post.
    pub(crate) fn completed(&self, dir: usize, bytes: u64, latency_ns: u64) {
        self.bytes[dir].fetch_add(bytes, Ordering::Relaxed);
        self.transfers[dir].fetch_add(1, Ordering::Relaxed);
        self.latency[dir].observe(latency_ns);
    }

    /// Records a transfer that failed with `e`.
    pub(crate) fn failed(&self, e: &Error) {
        self.failures[e.kind_index()].fetch_add(1, Ordering::Relaxed);
        if matches!(e, Error::TimedOut { .. }) {
            self.timeouts.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The counts so far.
    pub fn snapshot(&self) -> PeerSnapshot {
        PeerSnapshot {
            peer: self.peer.clone(),
            bytes: load(&self.bytes),
            transfers: load(&self.transfers),
            failures: Error::KINDS
                .iter()
                .zip(load(&self.failures))
                .filter(|(_, n)| *n > 0)
                .map(|(k, n)| (*k, n))
                .collect(),
            timeouts: self.timeouts.load(Ordering::Relaxed),
            latency: [self.latency[0].snapshot(), self.latency[1].snapshot()],
            post_time: [self.post_time[0].snapshot(), self.post_time[1].snapshot()],
            notifications_sent: self.notes_sent.load(Ordering::Relaxed),
            notifications_received: self.notes_received.load(Ordering::Relaxed),
            notifications_refused: self.notes_refused.load(Ordering::Relaxed),
            notifications_lost: self.notes_lost.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
        }
    }
}

/// One peer's metrics at one moment. Arrays by direction are indexed as
/// [`DIRECTIONS`]: `[read, write]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerSnapshot {
    /// The peer's name ("" for what no loaded peer can be named for).
    pub peer: String,
    /// Bytes moved by completed transfers, `[read, write]`.
    pub bytes: [u64; 2],
    /// Completed transfers (each post counts once), `[read, write]`.
    pub transfers: [u64; 2],
    /// Failed transfers (refused posts and failed completions) by
    /// [`Error::kind`], only kinds that occurred.
    pub failures: Vec<(&'static str, u64)>,
    /// Transfers that failed with [`Error::TimedOut`].
    pub timeouts: u64,
    /// Post-to-completion latency of completed transfers.
    pub latency: [HistogramSnapshot; 2],
    /// Time spent in `post` by transfers that were posted.
    pub post_time: [HistogramSnapshot; 2],
    /// Notifications sent to the peer (alone or after a transfer's data).
    pub notifications_sent: u64,
    /// Notifications received from the peer.
    pub notifications_received: u64,
    /// Notifications claiming to come from the peer, refused because not
    /// sealed with this agent's key.
    pub notifications_refused: u64,
    /// Notifications from the peer lost by a full receive queue.
    pub notifications_lost: u64,
    /// Transfers to the peer in flight.
    pub in_flight: i64,
}

impl PeerSnapshot {
    /// Failures of kind `kind` ([`Error::kind`]).
    pub fn failures_of(&self, kind: &str) -> u64 {
        self.failures
            .iter()
            .find(|(k, _)| *k == kind)
            .map_or(0, |(_, n)| *n)
    }
}

/// The metrics of one agent: its errors by call and kind, and a
/// [`PeerMetrics`] per peer it loaded.
#[derive(Debug)]
pub struct AgentMetrics {
    agent: String,
    backend: &'static str,
    enabled: bool,
    errors: [[AtomicU64; KINDS]; OPS.len()],
    /// Every peer's series, index 0 the unknown peer's; grown (under this
    /// lock) only when a peer is loaded the first time.
    peers: Mutex<Vec<Arc<PeerMetrics>>>,
}

impl AgentMetrics {
    /// New, empty metrics of agent `agent` over `backend`, registered for
    /// [`encode`] while they live.
    pub(crate) fn new(agent: &str, backend: &'static str, enabled: bool) -> Arc<AgentMetrics> {
        let m = Arc::new(AgentMetrics {
            agent: agent.to_string(),
            backend,
            enabled,
            errors: std::array::from_fn(|_| counter_array()),
            peers: Mutex::new(vec![Arc::new(PeerMetrics::new(""))]),
        });
        if enabled {
            let mut all = registry();
            all.retain(|w| w.strong_count() > 0);
            all.push(Arc::downgrade(&m));
        }
        m
    }

    /// The agent's name.
    pub fn agent(&self) -> &str {
        &self.agent
    }

    /// The agent's backend.
    pub fn backend(&self) -> &'static str {
        self.backend
    }

    /// Whether this agent records (see [`AgentConfig::metrics`]).
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Counts an error `e` returned by `op`.
    pub(crate) fn error(&self, op: Op, e: &Error) {
        if self.enabled {
            self.errors[op as usize][e.kind_index()].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The series of `peer`, created on first use (not on the hot path:
    /// when a peer is loaded).
    pub(crate) fn peer_series(&self, peer: &str) -> Arc<PeerMetrics> {
        let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(p) = peers.iter().find(|p| p.peer == peer) {
            return Arc::clone(p);
        }
        let p = Arc::new(PeerMetrics::new(peer));
        peers.push(Arc::clone(&p));
        p
    }

    fn peers(&self) -> Vec<Arc<PeerMetrics>> {
        self.peers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The agent's metrics now.
    pub fn snapshot(&self) -> Snapshot {
        let mut errors = Vec::new();
        for (op, row) in OPS.iter().zip(&self.errors) {
            for (kind, n) in Error::KINDS.iter().zip(load(row)) {
                if n > 0 {
                    errors.push((*op, *kind, n));
                }
            }
        }
        Snapshot {
            agent: self.agent.clone(),
            backend: self.backend,
            errors,
            peers: self.peers().iter().map(|p| p.snapshot()).collect(),
        }
    }

    /// The agent's metrics in Prometheus' text format, with `# HELP` and
    /// `# TYPE` lines.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode_agents(&[self.snapshot()], &mut out);
        out
    }
}

/// One agent's metrics at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// The agent's name.
    pub agent: String,
    /// Its backend ("UCX", "LIBFABRIC", "CUDA_IPC").
    pub backend: &'static str,
    /// Errors returned by agent calls: (op as in [`OPS`], [`Error::kind`],
    /// count), only those that occurred.
    pub errors: Vec<(&'static str, &'static str, u64)>,
    /// Per peer, the unknown peer ("") first.
    pub peers: Vec<PeerSnapshot>,
}

impl Snapshot {
    /// The series of `peer`, if it was ever loaded.
    pub fn peer(&self, peer: &str) -> Option<&PeerSnapshot> {
        self.peers.iter().find(|p| p.peer == peer)
    }

    /// Errors of kind `kind` returned by `op`.
    pub fn errors_of(&self, op: &str, kind: &str) -> u64 {
        self.errors
            .iter()
            .find(|(o, k, _)| *o == op && *k == kind)
            .map_or(0, |(_, _, n)| *n)
    }

    /// Transfers in flight, all peers.
    pub fn in_flight(&self) -> i64 {
        self.peers.iter().map(|p| p.in_flight).sum()
    }
}

fn registry() -> std::sync::MutexGuard<'static, Vec<Weak<AgentMetrics>>> {
    static AGENTS: Mutex<Vec<Weak<AgentMetrics>>> = Mutex::new(Vec::new());
    AGENTS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Snapshots of every live agent of this process that records metrics.
pub fn gather() -> Vec<Snapshot> {
    let agents: Vec<Arc<AgentMetrics>> = registry().iter().filter_map(Weak::upgrade).collect();
    agents.iter().map(|a| a.snapshot()).collect()
}

/// The metrics of every live agent of this process in Prometheus' text
/// exposition format (version 0.0.4): what the endpoint serves.
pub fn encode() -> String {
    let mut out = String::new();
    encode_agents(&gather(), &mut out);
    out
}

/// Writes `v` as a label value: backslash, double quote and newline
/// escaped.
fn label(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

fn head(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// `name{agent="..",backend="..",peer=".."` — the caller closes it.
fn series(out: &mut String, name: &str, a: &Snapshot, peer: Option<&str>) {
    out.push_str(name);
    out.push_str("{agent=\"");
    label(out, &a.agent);
    out.push_str("\",backend=\"");
    label(out, a.backend);
    out.push('"');
    if let Some(p) = peer {
        out.push_str(",peer=\"");
        label(out, p);
        out.push('"');
    }
}

fn seconds(ns: u64) -> String {
    format!("{}", ns as f64 / 1e9)
}

/// Per-peer counters: name, help, value.
type PeerField = (&'static str, &'static str, fn(&PeerSnapshot) -> u64);

/// Per-peer histograms by direction: name, help, value.
type PeerHistograms = (
    &'static str,
    &'static str,
    fn(&PeerSnapshot) -> &[HistogramSnapshot; 2],
);

const PEER_COUNTERS: [PeerField; 5] = [
    (
        "kvxfer_transfer_timeouts_total",
        "Transfers to the peer that failed with timed_out (their deadline passed).",
        |p| p.timeouts,
    ),
    (
        "kvxfer_notifications_sent_total",
        "Notifications sent to the peer, alone or after a transfer's data.",
        |p| p.notifications_sent,
    ),
    (
        "kvxfer_notifications_received_total",
        "Notifications received from the peer (peer=\"\": from an unloaded sender).",
        |p| p.notifications_received,
    ),
    (
        "kvxfer_notifications_refused_total",
        "Notifications claiming to come from the peer, refused: not sealed with this agent's key.",
        |p| p.notifications_refused,
    ),
    (
        "kvxfer_notifications_lost_total",
        "Notifications from the peer lost by a full receive queue.",
        |p| p.notifications_lost,
    ),
];

fn encode_agents(agents: &[Snapshot], out: &mut String) {
    head(
        out,
        "kvxfer_transferred_bytes_total",
        "counter",
        "Bytes moved by completed transfers, by peer and direction.",
    );
    for a in agents {
        for p in &a.peers {
            for (d, dir) in DIRECTIONS.iter().enumerate() {
                series(out, "kvxfer_transferred_bytes_total", a, Some(&p.peer));
                let _ = writeln!(out, ",direction=\"{dir}\"}} {}", p.bytes[d]);
            }
        }
    }
    head(
        out,
        "kvxfer_transfers_total",
        "counter",
        "Completed transfers (each post counts once), by peer and direction.",
    );
    for a in agents {
        for p in &a.peers {
            for (d, dir) in DIRECTIONS.iter().enumerate() {
                series(out, "kvxfer_transfers_total", a, Some(&p.peer));
                let _ = writeln!(out, ",direction=\"{dir}\"}} {}", p.transfers[d]);
            }
        }
    }
    head(
        out,
        "kvxfer_transfer_failures_total",
        "counter",
        "Transfers that failed (refused posts and failed completions), by peer and error kind.",
    );
    for a in agents {
        for p in &a.peers {
            for (kind, n) in &p.failures {
                series(out, "kvxfer_transfer_failures_total", a, Some(&p.peer));
                let _ = writeln!(out, ",kind=\"{kind}\"}} {n}");
            }
        }
    }
    for (name, help, get) in PEER_COUNTERS {
        head(out, name, "counter", help);
        for a in agents {
            for p in &a.peers {
                series(out, name, a, Some(&p.peer));
                let _ = writeln!(out, "}} {}", get(p));
            }
        }
    }
    head(
        out,
        "kvxfer_transfers_in_flight",
        "gauge",
        "Transfers posted and not yet ended, by peer.",
    );
    for a in agents {
        for p in &a.peers {
            series(out, "kvxfer_transfers_in_flight", a, Some(&p.peer));
            let _ = writeln!(out, "}} {}", p.in_flight);
        }
    }
    let hists: [PeerHistograms; 2] = [
        (
            "kvxfer_transfer_latency_seconds",
            "Time from post to completion of completed transfers, by peer and direction.",
            |p| &p.latency,
        ),
        (
            "kvxfer_post_seconds",
            "Time spent in post (handing the transfer to the library), by peer and direction.",
            |p| &p.post_time,
        ),
    ];
    for (name, help, get) in hists {
        head(out, name, "histogram", help);
        for a in agents {
            for p in &a.peers {
                for (d, dir) in DIRECTIONS.iter().enumerate() {
                    let h = &get(p)[d];
                    let mut cum = 0;
                    for (b, n) in BUCKETS_NS.iter().zip(&h.buckets) {
                        cum += n;
                        series(out, &format!("{name}_bucket"), a, Some(&p.peer));
                        let _ =
                            writeln!(out, ",direction=\"{dir}\",le=\"{}\"}} {cum}", seconds(*b));
                    }
                    series(out, &format!("{name}_bucket"), a, Some(&p.peer));
                    let _ = writeln!(out, ",direction=\"{dir}\",le=\"+Inf\"}} {}", h.count);
                    series(out, &format!("{name}_sum"), a, Some(&p.peer));
                    let _ = writeln!(out, ",direction=\"{dir}\"}} {}", seconds(h.sum_ns));
                    series(out, &format!("{name}_count"), a, Some(&p.peer));
                    let _ = writeln!(out, ",direction=\"{dir}\"}} {}", h.count);
                }
            }
        }
    }
    head(
        out,
        "kvxfer_errors_total",
        "counter",
        "Errors returned by agent calls, by call (op) and error kind.",
    );
    for a in agents {
        for (op, kind, n) in &a.errors {
            series(out, "kvxfer_errors_total", a, None);
            let _ = writeln!(out, ",op=\"{op}\",kind=\"{kind}\"}} {n}");
        }
    }
    head(
        out,
        "kvxfer_peers",
        "gauge",
        "Peers this agent has loaded since it started.",
    );
    for a in agents {
        series(out, "kvxfer_peers", a, None);
        let _ = writeln!(out, "}} {}", a.peers.len().saturating_sub(1));
    }
}

/// Whether an agent made with `cfg` records metrics:
/// [`AgentConfig::metrics`], else [`ENV_METRICS`] (anything but `0`,
/// `false`, `off`, `no` is on), else on.
pub(crate) fn enabled(cfg: &AgentConfig) -> bool {
    cfg.metrics.unwrap_or_else(|| {
        std::env::var(ENV_METRICS).map_or(true, |v| {
            !matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "0" | "false" | "off" | "no"
            )
        })
    })
}

/// The address to serve metrics on for an agent made with `cfg`:
/// [`AgentConfig::metrics_addr`], else [`ENV_METRICS_ADDR`] (empty: none).
pub(crate) fn addr_of(cfg: &AgentConfig) -> Option<String> {
    match &cfg.metrics_addr {
        Some(a) => a.clone(),
        None => std::env::var(ENV_METRICS_ADDR)
            .ok()
            .filter(|a| !a.trim().is_empty()),
    }
}

impl AgentConfig {
    /// Sets [`metrics`](AgentConfig::metrics): whether the agent records
    /// metrics at all.
    pub fn with_metrics(mut self, on: bool) -> Self {
        self.metrics = Some(on);
        self
    }

    /// Sets [`metrics_addr`](AgentConfig::metrics_addr): `Some("host:port")`
    /// serves the process's metrics there over HTTP (port 0 picks one; see
    /// [`Agent::metrics_addr`](crate::Agent::metrics_addr)), `None` serves
    /// none (the environment is then not consulted).
    pub fn with_metrics_addr(mut self, addr: Option<&str>) -> Self {
        self.metrics_addr = Some(addr.map(str::to_string));
        self
    }
}

/// An HTTP server answering `GET /metrics` (and `GET /`) with [`encode`],
/// from one thread. Stops when the last clone of it is dropped.
#[derive(Clone, Debug)]
pub struct Endpoint {
    inner: Arc<EndpointInner>,
}

#[derive(Debug)]
struct EndpointInner {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for EndpointInner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the blocking accept.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            let _ = t.join();
        }
    }
}

impl Endpoint {
    /// The address it listens on (with the port chosen).
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.addr
    }
}

/// Endpoints of this process by the address asked for, so that agents
/// given the same address (`KVXFER_METRICS_ADDR` for several agents of one
/// process) share one server.
fn endpoints() -> std::sync::MutexGuard<'static, Vec<(String, Weak<EndpointInner>)>> {
    static ENDPOINTS: Mutex<Vec<(String, Weak<EndpointInner>)>> = Mutex::new(Vec::new());
    ENDPOINTS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Serves the metrics of every agent of this process on `addr`
/// (`host:port`, port 0 picks a free one): `GET /metrics` answers with
/// [`encode`] as `text/plain; version=0.0.4`. Asked again for an address
/// it already serves (as asked for with a port other than 0, or as
/// [`Endpoint::local_addr`] gave it), it returns that server.
pub fn serve(addr: &str) -> std::io::Result<Endpoint> {
    let mut all = endpoints();
    all.retain(|(_, w)| w.strong_count() > 0);
    if let Some(inner) = all
        .iter()
        .filter(|(a, _)| a == addr)
        .find_map(|(_, w)| w.upgrade())
    {
        return Ok(Endpoint { inner });
    }
    let listener = TcpListener::bind(addr)?;
    let local = listener.local_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    let thread = std::thread::Builder::new()
        .name("kvxfer-metrics".into())
        .spawn(move || {
            for conn in listener.incoming() {
                if flag.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(s) = conn {
                    if let Err(e) = answer(s) {
                        log::debug!("metrics endpoint: {e}");
                    }
                }
            }
        })?;
    let inner = Arc::new(EndpointInner {
        addr: local,
        stop,
        thread: Mutex::new(Some(thread)),
    });
    // Found again by the address asked for (unless it left the port to
    // the system) and by the address it got.
    if !addr.ends_with(":0") {
        all.push((addr.to_string(), Arc::downgrade(&inner)));
    }
    all.push((local.to_string(), Arc::downgrade(&inner)));
    log::info!("metrics served on http://{local}/metrics");
    Ok(Endpoint { inner })
}

/// Answers one HTTP/1.x request and closes the connection.
fn answer(mut s: TcpStream) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut req = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 16 << 10 {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        req.extend_from_slice(&buf[..n]);
    }
    let line = req.split(|&b| b == b'\r').next().unwrap_or(&[]);
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, ctype, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics" | "/") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            encode(),
        ),
        ("GET" | "HEAD", _) => (
            "404 Not Found",
            "text/plain",
            "not found: metrics are at /metrics\n".to_string(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET\n".to_string(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    if method != "HEAD" {
        s.write_all(body.as_bytes())?;
    }
    s.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_and_sum() {
        let h = Histogram::default();
        h.observe(500);
        h.observe(1_000);
        h.observe(1_001);
        h.observe(20_000_000_000);
        let s = h.snapshot();
        assert_eq!(s.count, 4);
        assert_eq!(s.sum_ns, 500 + 1_000 + 1_001 + 20_000_000_000);
        assert_eq!(s.buckets[0], 2);
        assert_eq!(s.buckets[1], 1);
        assert_eq!(s.buckets.iter().sum::<u64>(), 3, "one above the last bound");
    }

    #[test]
    fn encoding_escapes_labels_and_counts_cumulative_buckets() {
        let m = AgentMetrics::new("a\"b", "UCX", true);
        let p = m.peer_series("p\\q\n");
        p.completed(1, 4096, 1_500);
        p.completed(1, 4096, 3_000_000);
        p.failed(&Error::TimedOut { after_ms: 5 });
        m.error(Op::Prepare, &Error::unknown_peer("x"));
        let text = m.encode();
        let base = r#"agent="a\"b",backend="UCX",peer="p\\q\n""#;
        for want in [
            format!("kvxfer_transferred_bytes_total{{{base},direction=\"write\"}} 8192"),
            format!("kvxfer_transfers_total{{{base},direction=\"write\"}} 2"),
            format!("kvxfer_transfers_total{{{base},direction=\"read\"}} 0"),
            format!("kvxfer_transfer_failures_total{{{base},kind=\"timed_out\"}} 1"),
            format!("kvxfer_transfer_timeouts_total{{{base}}} 1"),
            format!(
                "kvxfer_transfer_latency_seconds_bucket{{{base},direction=\"write\",le=\"0.000002\"}} 1"
            ),
            format!(
                "kvxfer_transfer_latency_seconds_bucket{{{base},direction=\"write\",le=\"0.005\"}} 2"
            ),
            format!("kvxfer_transfer_latency_seconds_sum{{{base},direction=\"write\"}} 0.0030015"),
            format!("kvxfer_transfer_latency_seconds_count{{{base},direction=\"write\"}} 2"),
            r#"kvxfer_errors_total{agent="a\"b",backend="UCX",op="prepare",kind="unknown_peer"} 1"#
                .to_string(),
            r#"kvxfer_peers{agent="a\"b",backend="UCX"} 1"#.to_string(),
        ] {
            assert!(text.lines().any(|l| l == want), "missing {want:?} in\n{text}");
        }
    }
}
