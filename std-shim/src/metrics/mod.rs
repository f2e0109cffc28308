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
use kvxfer_rails::{RailState, RailStats};

use crate::config::AgentConfig;

mod endpoint;
pub(crate) use endpoint::{addr_of, enabled};
pub use endpoint::{serve, Endpoint};

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

/// Reads the counters of an agent's network rails (its transport's own,
/// under the agent's lock) when a snapshot is taken.
type RailSource = Arc<dyn Fn() -> Vec<RailStats> + Send + Sync>;

/// The metrics of one agent: its errors by call and kind, a
/// [`PeerMetrics`] per peer it loaded and, read when a snapshot is taken,
/// its network rails' counters.
pub struct AgentMetrics {
    agent: String,
    backend: &'static str,
    enabled: bool,
    errors: [[AtomicU64; KINDS]; OPS.len()],
    /// Every peer's series, index 0 the unknown peer's; grown (under this
    /// lock) only when a peer is loaded the first time.
    peers: Mutex<Vec<Arc<PeerMetrics>>>,
    rails: Mutex<Option<RailSource>>,
}

impl std::fmt::Debug for AgentMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentMetrics")
            .field("agent", &self.agent)
            .field("backend", &self.backend)
            .field("enabled", &self.enabled)
            .finish_non_exhaustive()
    }
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
            rails: Mutex::new(None),
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

    /// Reads the rails' counters with `source` at every snapshot (and
    /// scrape) from now on: nothing is recorded as transfers run. `source`
    /// must not need a lock held by whoever takes a snapshot.
    pub(crate) fn read_rails_from(
        &self,
        source: impl Fn() -> Vec<RailStats> + Send + Sync + 'static,
    ) {
        *self.rails.lock().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(source));
    }

    fn rails(&self) -> Vec<RailStats> {
        // Called without this lock held: it may wait for the agent's.
        let source = self
            .rails
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        source.map_or_else(Vec::new, |read| read())
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
            rails: self.rails(),
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
    /// The agent's network rails, in order, as
    /// [`Agent::rail_stats`](crate::Agent::rail_stats) reports them;
    /// empty without rails.
    pub rails: Vec<RailStats>,
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
    encode_rails(agents, out);
}

/// The states of a rail, as the `state` label of `kvxfer_rail_state`
/// names them.
pub const RAIL_STATES: [RailState; 3] = [RailState::Up, RailState::Down, RailState::Probing];

/// Per-rail values: name, type, help, value.
type RailField = (
    &'static str,
    &'static str,
    &'static str,
    fn(&RailStats) -> u64,
);

const RAIL_FIELDS: [RailField; 4] = [
    (
        "kvxfer_rail_bytes_total",
        "counter",
        "Bytes of the transfer parts the rail completed.",
        |r| r.bytes,
    ),
    (
        "kvxfer_rail_failures_total",
        "counter",
        "Times the rail was marked down, or one of its connections failed alone.",
        |r| r.failures,
    ),
    (
        "kvxfer_rail_renewals_total",
        "counter",
        "Times every connection of the rail was closed and its address renewed (UCX).",
        |r| r.renewals,
    ),
    (
        "kvxfer_rail_up",
        "gauge",
        "1 while the rail carries transfers (state up), else 0.",
        |r| u64::from(r.state == RailState::Up),
    ),
];

/// `name{agent="..",backend="..",rail="..",index=".."` of rail `i` — the
/// caller closes it. `index` tells apart rails on one interface.
fn rail_series(out: &mut String, name: &str, a: &Snapshot, i: usize, r: &RailStats) {
    series(out, name, a, None);
    out.push_str(",rail=\"");
    label(out, &r.name);
    let _ = write!(out, "\",index=\"{i}\"");
}

fn encode_rails(agents: &[Snapshot], out: &mut String) {
    for (name, kind, help, get) in RAIL_FIELDS {
        head(out, name, kind, help);
        for a in agents {
            for (i, r) in a.rails.iter().enumerate() {
                rail_series(out, name, a, i, r);
                let _ = writeln!(out, "}} {}", get(r));
            }
        }
    }
    head(
        out,
        "kvxfer_rail_state",
        "gauge",
        "1 for the rail's state (up, down or probing), 0 for the others.",
    );
    for a in agents {
        for (i, r) in a.rails.iter().enumerate() {
            for s in RAIL_STATES {
                rail_series(out, "kvxfer_rail_state", a, i, r);
                let _ = writeln!(out, ",state=\"{}\"}} {}", s.name(), u8::from(r.state == s));
            }
        }
    }
}

#[cfg(test)]
mod tests;
