//! Cluster discovery through etcd (feature `etcd`).
//!
//! When a deployment outgrows hand-passed `host:port` strings, agents find
//! each other through an etcd cluster, as NIXL deployments do:
//!
//! * each agent **publishes** its metadata (the same blob the side channel
//!   serves) under `<prefix><agent name>`, attached to a lease that a
//!   background task keeps alive. An agent that dies stops renewing it, and
//!   etcd deletes its entry once the lease's time to live has passed; an
//!   agent that stops cleanly revokes it, and its entry goes at once;
//! * when the agent's own registrations change, its entry is re-published
//!   (the metadata is compared every [`EtcdConfig::republish_interval`], and
//!   [`EtcdDiscovery::publish`] does it at once);
//! * peers are **fetched by name** ([`EtcdDiscovery::fetch`]) and loaded into
//!   the agent's engine with [`Agent::load_remote`];
//! * the prefix is **watched**: a peer that restarts with new metadata is
//!   loaded again, and a peer whose entry disappears is invalidated, so
//!   that further transfers to it fail with [`Error::UnknownPeer`] instead
//!   of reaching a dead process.
//!
//! The agent API stays blocking: the etcd client runs on a current-thread
//! tokio runtime owned by one background thread (`kvxfer-etcd`), and the
//! calls here wait on it with timeouts.
//!
//! ```no_run
//! use std::time::Duration;
//! use kvxfer::etcd::{EtcdConfig, EtcdDiscovery};
//! use kvxfer::{Agent, AgentConfig};
//!
//! let agent = Agent::new("decode-3", AgentConfig::default().with_listen(None))?;
//! let cfg = EtcdConfig::new("http://10.0.0.1:2379").with_prefix("/kvxfer/prod/");
//! let discovery = EtcdDiscovery::start(&agent, cfg)?;
//! let peer = discovery.fetch("prefill-0", Duration::from_secs(10))?;
//! assert!(agent.has_remote(&peer)?);
//! # Ok::<(), kvxfer::Error>(())
//! ```
//!
//! Errors of etcd itself are [`Error::Backend`] with backend name
//! [`ETCD`], the gRPC status code where there is one, and a text that
//! names the endpoints and the key.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use etcd_client::{
    Client, ConnectOptions, EventType, GetOptions, LeaseKeepAliveStream, LeaseKeeper, PutOptions,
    WatchOptions, WatchStream,
};
use kvxfer_core::wire::Metadata;
use kvxfer_core::Error;
use tokio::sync::{mpsc, oneshot};

use crate::Agent;

/// Backend name of errors that etcd reports.
pub const ETCD: &str = "ETCD";
/// Default namespace prefix of agent entries.
pub const DEFAULT_PREFIX: &str = "/kvxfer/";
/// Default time to live of an agent's lease.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(5);
/// Default connect and request timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default interval at which the agent's metadata is compared with what
/// was last published.
pub const DEFAULT_REPUBLISH_INTERVAL: Duration = Duration::from_millis(250);

/// Pause before the background task reconnects after losing etcd.
const RETRY_PAUSE: Duration = Duration::from_millis(500);

fn etcd_err(code: i64, text: &str) -> Error {
    Error::backend(ETCD, code, text)
}

/// Start of a signed entry: the magic, then an HMAC-SHA256 tag, then the
/// metadata.
const SIGNED: &[u8; 4] = b"KVXS";
const TAG_LEN: usize = 32;

fn metadata_mac(key: &[u8], name: &str, meta: &[u8]) -> hmac::Hmac<sha2::Sha256> {
    use hmac::Mac;
    let mut m = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(key)
        .expect("HMAC takes keys of any length");
    m.update(b"kvxfer etcd metadata v1\0");
    m.update(name.as_bytes());
    m.update(b"\0");
    m.update(meta);
    m
}

/// The entry to publish for `name`'s metadata: signed when there is a key.
fn seal(key: Option<&[u8]>, name: &str, meta: &[u8]) -> Vec<u8> {
    use hmac::Mac;
    match key {
        None => meta.to_vec(),
        Some(key) => {
            let tag = metadata_mac(key, name, meta).finalize().into_bytes();
            let mut v = Vec::with_capacity(SIGNED.len() + TAG_LEN + meta.len());
            v.extend_from_slice(SIGNED);
            v.extend_from_slice(&tag);
            v.extend_from_slice(meta);
            v
        }
    }
}

/// The metadata in `name`'s entry. With a key, only an entry signed with
/// it is accepted; without one, a signed entry's metadata is taken as is.
fn open<'v>(key: Option<&[u8]>, name: &str, value: &'v [u8]) -> Result<&'v [u8], Error> {
    use hmac::Mac;
    let signed = value.starts_with(SIGNED) && value.len() >= SIGNED.len() + TAG_LEN;
    let (tag, meta) = if signed {
        value[SIGNED.len()..].split_at(TAG_LEN)
    } else {
        (&[][..], value)
    };
    match key {
        None => Ok(meta),
        Some(_) if !signed => Err(etcd_err(
            -1,
            &format!("entry of {name:?} is not signed, and this agent has an auth key"),
        )),
        Some(key) => match metadata_mac(key, name, meta).verify_slice(tag) {
            Ok(()) => Ok(meta),
            Err(_) => Err(etcd_err(
                -1,
                &format!("entry of {name:?} is signed with another key (or was altered)"),
            )),
        },
    }
}

/// An etcd client error as a kvxfer error; `what` says what was being done.
fn client_err(what: &str, e: &etcd_client::Error) -> Error {
    let code = match e {
        etcd_client::Error::GRpcStatus(s) => s.code() as i64,
        _ => -1,
    };
    etcd_err(code, &format!("{what}: {e}"))
}

/// Settings of [`EtcdDiscovery`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct EtcdConfig {
    /// etcd client URLs (`http://host:2379`; the scheme may be left out).
    pub endpoints: Vec<String>,
    /// Namespace prefix of agent entries; an agent's key is the prefix
    /// followed by its name. Default [`DEFAULT_PREFIX`]. A prefix that
    /// does not end with `/` gets one.
    pub prefix: String,
    /// Time to live of the agent's lease, in whole seconds (at least 1 s;
    /// fractions round up). A dead agent's entry disappears this long
    /// after its last renewal. Renewals go out every third of it. Default
    /// [`DEFAULT_LEASE_TTL`].
    pub lease_ttl: Duration,
    /// Connect timeout, and limit of each etcd request. Default
    /// [`DEFAULT_TIMEOUT`].
    pub timeout: Duration,
    /// How often the agent's metadata is compared with what was
    /// published, to re-publish it after registrations change. Default
    /// [`DEFAULT_REPUBLISH_INTERVAL`].
    pub republish_interval: Duration,
    /// Load every agent that appears under the prefix (default `true`).
    /// Off, only peers asked for with [`EtcdDiscovery::fetch`] are loaded
    /// and followed. Either way, a peer that an agent transfers with must
    /// have loaded that agent's metadata too for notifications to reach
    /// it.
    pub load_all: bool,
}

impl EtcdConfig {
    /// Settings for the etcd cluster at `endpoints`: one URL or several
    /// separated by commas (`http://10.0.0.1:2379,http://10.0.0.2:2379`).
    pub fn new(endpoints: &str) -> EtcdConfig {
        EtcdConfig {
            endpoints: endpoints
                .split(',')
                .map(str::trim)
                .filter(|e| !e.is_empty())
                .map(str::to_string)
                .collect(),
            prefix: DEFAULT_PREFIX.to_string(),
            lease_ttl: DEFAULT_LEASE_TTL,
            timeout: DEFAULT_TIMEOUT,
            republish_interval: DEFAULT_REPUBLISH_INTERVAL,
            load_all: true,
        }
    }

    /// Sets [`prefix`](Self::prefix).
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Sets [`lease_ttl`](Self::lease_ttl).
    pub fn with_lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl;
        self
    }

    /// Sets [`timeout`](Self::timeout).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets [`republish_interval`](Self::republish_interval).
    pub fn with_republish_interval(mut self, interval: Duration) -> Self {
        self.republish_interval = interval;
        self
    }

    /// Sets [`load_all`](Self::load_all).
    pub fn with_load_all(mut self, on: bool) -> Self {
        self.load_all = on;
        self
    }

    /// Checks the settings; returns the normalised prefix and the lease
    /// time to live in seconds.
    fn validate(&self) -> Result<(String, i64), Error> {
        if self.endpoints.is_empty() {
            return Err(etcd_err(-1, "no etcd endpoint given"));
        }
        if let Some(bad) = self
            .endpoints
            .iter()
            .find(|e| e.contains(char::is_whitespace))
        {
            return Err(etcd_err(
                -1,
                &format!("etcd endpoint {bad:?} contains white space"),
            ));
        }
        if self.prefix.is_empty() {
            return Err(etcd_err(-1, "etcd prefix is empty"));
        }
        let mut prefix = self.prefix.clone();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        if self.lease_ttl < Duration::from_secs(1) {
            return Err(etcd_err(
                -1,
                &format!(
                    "etcd lease TTL {} ms is below the minimum of 1 s",
                    self.lease_ttl.as_millis()
                ),
            ));
        }
        let secs = self.lease_ttl.as_secs() + u64::from(self.lease_ttl.subsec_nanos() > 0);
        let ttl = i64::try_from(secs)
            .map_err(|_| etcd_err(-1, &format!("etcd lease TTL {secs} s is too large")))?;
        if self.timeout.is_zero() {
            return Err(etcd_err(-1, "etcd timeout is zero"));
        }
        if self.republish_interval.is_zero() {
            return Err(etcd_err(-1, "etcd republish interval is zero"));
        }
        Ok((prefix, ttl))
    }
}

/// What this agent knows of one peer under the prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerState {
    /// Its metadata is loaded into the agent.
    Loaded,
    /// Its entry was deleted (its lease expired or was revoked); it was
    /// invalidated.
    Gone,
    /// Its metadata was rejected when loading, and why.
    Rejected(Error),
}

struct PeerEntry {
    /// etcd revision of the last event applied.
    revision: i64,
    /// The metadata loaded, while loaded.
    blob: Option<Vec<u8>>,
    state: PeerState,
}

#[derive(Default)]
struct Known {
    peers: HashMap<String, PeerEntry>,
    /// Names asked for with `fetch` (followed even without `load_all`).
    wanted: HashSet<String>,
    /// Set when the background task ended on its own, and why.
    stopped: Option<Error>,
    /// Times this agent's entry was written.
    publications: u64,
}

/// State shared by the handle and the background task.
struct Inner {
    agent: Agent,
    /// The agent's side-channel key: metadata is published signed with it
    /// and only metadata signed with it is loaded.
    auth: Option<Vec<u8>>,
    name: String,
    key: String,
    prefix: String,
    endpoints: String,
    load_all: bool,
    known: Mutex<Known>,
    changed: Condvar,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Known> {
        self.known.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The peer name of `key`, if it lies under the prefix and is not ours.
    fn peer_of<'k>(&self, key: &'k [u8]) -> Option<&'k str> {
        let name = std::str::from_utf8(key).ok()?.strip_prefix(&self.prefix)?;
        (!name.is_empty() && name != self.name).then_some(name)
    }

    fn follows(&self, known: &Known, name: &str) -> bool {
        self.load_all || known.wanted.contains(name) || known.peers.contains_key(name)
    }

    /// Applies a put of `blob` under `name` at `revision`: loads it unless
    /// an equal or later event was applied, or it is already loaded.
    fn apply_put(&self, name: &str, value: &[u8], revision: i64) {
        let blob = match open(self.auth.as_deref(), name, value) {
            Ok(b) => b,
            Err(e) => {
                if self.follows(&self.lock(), name) {
                    log::warn!(
                        "agent {}: entry of {name:?} in etcd rejected: {e}",
                        self.name
                    );
                    self.record(name, revision, None, PeerState::Rejected(e));
                }
                return;
            }
        };
        {
            let known = self.lock();
            if !self.follows(&known, name) {
                return;
            }
            if let Some(p) = known.peers.get(name) {
                if p.revision >= revision {
                    return;
                }
                if p.state == PeerState::Loaded && p.blob.as_deref() == Some(blob) {
                    drop(known);
                    self.record(name, revision, Some(blob), PeerState::Loaded);
                    return;
                }
            }
        }
        // Only the background task applies events, so nothing changes the
        // entry between the check above and the record below.
        let state = match Metadata::decode(blob) {
            Err(e) => PeerState::Rejected(e.into()),
            Ok(m) if m.name != name => PeerState::Rejected(etcd_err(
                -1,
                &format!(
                    "entry {}{name} holds the metadata of agent {:?}",
                    self.prefix, m.name
                ),
            )),
            Ok(_) => match self.agent.load_remote(blob) {
                Ok(_) => PeerState::Loaded,
                Err(e) => PeerState::Rejected(e),
            },
        };
        match &state {
            PeerState::Loaded => log::info!(
                "agent {}: loaded {name:?} from etcd (revision {revision})",
                self.name
            ),
            PeerState::Rejected(e) => log::warn!(
                "agent {}: metadata of {name:?} in etcd rejected: {e}",
                self.name
            ),
            PeerState::Gone => {}
        }
        let blob = (state == PeerState::Loaded).then_some(blob);
        self.record(name, revision, blob, state);
    }

    /// Applies the deletion of `name`'s entry at `revision`: invalidates
    /// the peer.
    fn apply_delete(&self, name: &str, revision: i64) {
        {
            let known = self.lock();
            match known.peers.get(name) {
                Some(p) if p.revision < revision => {}
                _ => return,
            }
        }
        match self.agent.invalidate_remote(name) {
            Ok(()) | Err(Error::UnknownPeer { .. }) | Err(Error::ShutDown) => {}
            Err(e) => log::warn!("agent {}: invalidating {name:?}: {e}", self.name),
        }
        log::info!(
            "agent {}: {name:?} left etcd (revision {revision}); invalidated",
            self.name
        );
        self.record(name, revision, None, PeerState::Gone);
    }

    fn record(&self, name: &str, revision: i64, blob: Option<&[u8]>, state: PeerState) {
        let mut known = self.lock();
        known.peers.insert(
            name.to_string(),
            PeerEntry {
                revision,
                blob: blob.map(<[u8]>::to_vec),
                state,
            },
        );
        drop(known);
        self.changed.notify_all();
    }

    /// Applies a full listing of the prefix at `revision`: puts for every
    /// entry, deletions for loaded peers that are no longer listed.
    fn apply_listing(&self, kvs: &[etcd_client::KeyValue], revision: i64) {
        let mut listed = HashSet::new();
        for kv in kvs {
            if let Some(name) = self.peer_of(kv.key()) {
                listed.insert(name.to_string());
                self.apply_put(name, kv.value(), kv.mod_revision());
            }
        }
        let vanished: Vec<String> = self
            .lock()
            .peers
            .iter()
            .filter(|(n, p)| p.state != PeerState::Gone && !listed.contains(*n))
            .map(|(n, _)| n.clone())
            .collect();
        for name in vanished {
            self.apply_delete(&name, revision);
        }
    }
}

/// Requests from the handle to the background task.
enum Command {
    /// Get one peer's entry and apply it.
    Fetch(String),
    /// Publish now if the metadata changed; answer when done.
    Publish(oneshot::Sender<Result<(), Error>>),
}

/// An agent's presence in etcd: its published entry, the peers it follows
/// and the background thread that keeps both current. Dropping it stops
/// the thread and revokes the lease, so the agent's entry disappears at
/// once.
///
/// The discovery holds a clone of the [`Agent`]; the agent shuts down only
/// once the discovery is dropped too. After [`Agent::shutdown`] the
/// discovery withdraws the agent's entry by itself.
pub struct EtcdDiscovery {
    inner: Arc<Inner>,
    commands: mpsc::UnboundedSender<Command>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    timeout: Duration,
}

impl std::fmt::Debug for EtcdDiscovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdDiscovery")
            .field("key", &self.inner.key)
            .field("endpoints", &self.inner.endpoints)
            .finish()
    }
}

impl EtcdDiscovery {
    /// Connects to etcd, publishes `agent`'s metadata under
    /// `<prefix><name>` with a lease of [`EtcdConfig::lease_ttl`], loads the
    /// peers already there (all of them with [`EtcdConfig::load_all`]) and
    /// starts following the prefix.
    ///
    /// Fails with [`Error::Backend`] (backend [`ETCD`]) on bad settings or
    /// when etcd cannot be reached within [`EtcdConfig::timeout`].
    pub fn start(agent: &Agent, cfg: EtcdConfig) -> Result<EtcdDiscovery, Error> {
        let (prefix, ttl) = cfg.validate()?;
        let inner = Arc::new(Inner {
            agent: agent.clone(),
            auth: agent.auth_key(),
            name: agent.name().to_string(),
            key: format!("{prefix}{}", agent.name()),
            prefix,
            endpoints: cfg.endpoints.join(","),
            load_all: cfg.load_all,
            known: Mutex::new(Known::default()),
            changed: Condvar::new(),
        });
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (stop_tx, stop_rx) = oneshot::channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let task_inner = Arc::clone(&inner);
        let settings = Settings {
            endpoints: cfg.endpoints.clone(),
            ttl,
            timeout: cfg.timeout,
            republish: cfg.republish_interval,
        };
        let thread = std::thread::Builder::new()
            .name("kvxfer-etcd".into())
            .spawn(move || background(task_inner, settings, cmd_rx, stop_rx, ready_tx))
            .map_err(|e| {
                etcd_err(
                    i64::from(e.raw_os_error().unwrap_or(-1)),
                    &format!("spawn etcd thread: {e}"),
                )
            })?;
        let mut discovery = EtcdDiscovery {
            inner,
            commands: cmd_tx,
            stop: Some(stop_tx),
            thread: Some(thread),
            timeout: cfg.timeout,
        };
        // Connecting, granting, publishing, listing: four requests at most.
        let limit = cfg.timeout.saturating_mul(5);
        let started = match ready_rx.recv_timeout(limit) {
            Ok(r) => r,
            Err(_) => Err(etcd_err(
                -1,
                &format!(
                    "etcd at {} did not answer within {} ms",
                    discovery.inner.endpoints,
                    limit.as_millis()
                ),
            )),
        };
        match started {
            Ok(()) => {
                log::info!(
                    "agent {}: published in etcd at {} as {}",
                    discovery.inner.name,
                    discovery.inner.endpoints,
                    discovery.inner.key
                );
                Ok(discovery)
            }
            Err(e) => {
                discovery.stop_thread();
                Err(e)
            }
        }
    }

    /// The key this agent is published under.
    pub fn key(&self) -> &str {
        &self.inner.key
    }

    /// The agent this discovery publishes.
    pub fn agent(&self) -> &Agent {
        &self.inner.agent
    }

    /// Waits up to `timeout` for `peer` to be published and loads its
    /// metadata into the agent; returns the peer's name. Afterwards the
    /// peer is followed: reloaded when it re-publishes, invalidated when it
    /// leaves.
    ///
    /// Fails with [`Error::UnknownPeer`] if no entry for `peer` appears in
    /// time, with the loading error if its metadata is rejected, and with
    /// [`Error::Backend`] if the background task has stopped.
    pub fn fetch(&self, peer: &str, timeout: Duration) -> Result<String, Error> {
        if peer.is_empty() || peer == self.inner.name {
            return Err(etcd_err(
                -1,
                &format!(
                    "agent {:?} cannot fetch peer {peer:?} (empty or itself)",
                    self.inner.name
                ),
            ));
        }
        let deadline = Instant::now() + timeout;
        {
            let mut known = self.inner.lock();
            known.wanted.insert(peer.to_string());
            if let Some(PeerEntry {
                state: PeerState::Loaded,
                ..
            }) = known.peers.get(peer)
            {
                return Ok(peer.to_string());
            }
        }
        // Ask etcd directly: the peer may be there before the watch says so.
        let _ = self.commands.send(Command::Fetch(peer.to_string()));
        let mut known = self.inner.lock();
        loop {
            if let Some(e) = &known.stopped {
                return Err(e.clone());
            }
            match known.peers.get(peer).map(|p| &p.state) {
                Some(PeerState::Loaded) => return Ok(peer.to_string()),
                Some(PeerState::Rejected(e)) => return Err(e.clone()),
                Some(PeerState::Gone) | None => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::unknown_peer(peer));
            }
            known = self
                .inner
                .changed
                .wait_timeout(known, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Waits up to `timeout` until `peer` has no entry (it left, or never
    /// was there); returns whether it is gone. A peer that left has been
    /// invalidated by then.
    pub fn wait_gone(&self, peer: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut known = self.inner.lock();
        loop {
            match known.peers.get(peer).map(|p| &p.state) {
                Some(PeerState::Loaded) | Some(PeerState::Rejected(_)) => {}
                Some(PeerState::Gone) | None => return true,
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            known = self
                .inner
                .changed
                .wait_timeout(known, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// What is known of `peer`, if anything.
    pub fn peer_state(&self, peer: &str) -> Option<PeerState> {
        self.inner.lock().peers.get(peer).map(|p| p.state.clone())
    }

    /// The metadata of `peer` as loaded from etcd, while it is loaded
    /// (decode it with [`kvxfer_core::wire::Metadata::decode`] to read its
    /// regions).
    pub fn peer_metadata(&self, peer: &str) -> Option<Vec<u8>> {
        self.inner
            .lock()
            .peers
            .get(peer)
            .and_then(|p| p.blob.clone())
    }

    /// The names of the peers loaded from etcd, sorted.
    pub fn peers(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .inner
            .lock()
            .peers
            .iter()
            .filter(|(_, p)| p.state == PeerState::Loaded)
            .map(|(n, _)| n.clone())
            .collect();
        v.sort();
        v
    }

    /// How many times this agent's entry has been written (once at start,
    /// then once per change of its metadata or lease).
    pub fn publications(&self) -> u64 {
        self.inner.lock().publications
    }

    /// Re-publishes the agent's metadata now if it changed since it was
    /// last published (e.g. right after registering memory), instead of
    /// within [`EtcdConfig::republish_interval`].
    pub fn publish(&self) -> Result<(), Error> {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Publish(tx)).is_err() {
            return Err(self.stopped_error());
        }
        let deadline = Instant::now() + self.timeout.saturating_mul(2);
        let mut rx = rx;
        loop {
            match rx.try_recv() {
                Ok(r) => return r,
                Err(oneshot::error::TryRecvError::Closed) => return Err(self.stopped_error()),
                Err(oneshot::error::TryRecvError::Empty) => {}
            }
            if Instant::now() >= deadline {
                return Err(Error::TimedOut {
                    after_ms: self.timeout.saturating_mul(2).as_millis() as u64,
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn stopped_error(&self) -> Error {
        self.inner
            .lock()
            .stopped
            .clone()
            .unwrap_or_else(|| etcd_err(-1, "etcd discovery has stopped"))
    }

    /// Stops following etcd and withdraws the agent's entry (revokes its
    /// lease). Dropping the discovery does the same.
    pub fn shutdown(mut self) {
        self.stop_thread();
    }

    fn stop_thread(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for EtcdDiscovery {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

/// What the background task needs besides the shared state.
struct Settings {
    endpoints: Vec<String>,
    ttl: i64,
    timeout: Duration,
    republish: Duration,
}

/// The background thread: a current-thread runtime running [`Session`].
fn background(
    inner: Arc<Inner>,
    settings: Settings,
    commands: mpsc::UnboundedReceiver<Command>,
    stop: oneshot::Receiver<()>,
    ready: std::sync::mpsc::SyncSender<Result<(), Error>>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(etcd_err(
                i64::from(e.raw_os_error().unwrap_or(-1)),
                &format!("tokio runtime for etcd: {e}"),
            )));
            return;
        }
    };
    rt.block_on(async move {
        let mut session = match Session::open(Arc::clone(&inner), settings).await {
            Ok(s) => s,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let _ = ready.send(Ok(()));
        let end = session.run(commands, stop).await;
        if let Some(e) = end {
            log::warn!("agent {}: etcd discovery stopped: {e}", inner.name);
            inner.lock().stopped = Some(e);
        } else {
            inner.lock().stopped = Some(etcd_err(-1, "etcd discovery was shut down"));
        }
        inner.changed.notify_all();
    });
}

/// The connection to etcd and what hangs on it.
struct Session {
    inner: Arc<Inner>,
    settings: Settings,
    client: Client,
    lease: i64,
    keeper: LeaseKeeper,
    keepalive: LeaseKeepAliveStream,
    watch: WatchStream,
    /// The metadata last written.
    published: Vec<u8>,
}

impl Session {
    async fn timed<T>(
        &self,
        what: &str,
        f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, Error> {
        timed(&self.settings, &self.inner, what, f).await
    }

    /// Connects, publishes and starts following the prefix.
    async fn open(inner: Arc<Inner>, settings: Settings) -> Result<Session, Error> {
        let opts = ConnectOptions::new()
            .with_connect_timeout(settings.timeout)
            .with_timeout(settings.timeout);
        let mut client = timed(
            &settings,
            &inner,
            "connect",
            Client::connect(settings.endpoints.clone(), Some(opts)),
        )
        .await?;
        let (lease, keeper, keepalive) = grant(&settings, &inner, &mut client).await?;
        let published = inner.agent.local_metadata()?;
        let mut c = client.clone();
        timed(
            &settings,
            &inner,
            &format!("put {}", inner.key),
            c.put(
                inner.key.clone(),
                seal(inner.auth.as_deref(), &inner.name, &published),
                Some(PutOptions::new().with_lease(lease)),
            ),
        )
        .await?;
        inner.lock().publications += 1;
        let watch = follow(&settings, &inner, &mut client).await?;
        Ok(Session {
            inner,
            settings,
            client,
            lease,
            keeper,
            keepalive,
            watch,
            published,
        })
    }

    /// Serves until stopped; returns why it ended on its own, if it did.
    async fn run(
        &mut self,
        mut commands: mpsc::UnboundedReceiver<Command>,
        mut stop: oneshot::Receiver<()>,
    ) -> Option<Error> {
        let renew_every = Duration::from_millis(
            (u64::try_from(self.settings.ttl).unwrap_or(1) * 1000 / 3).max(100),
        );
        let mut renew = tokio::time::interval(renew_every);
        let mut republish = tokio::time::interval(self.settings.republish);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        republish.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut commands_open = true;
        loop {
            let healthy = tokio::select! {
                _ = &mut stop => {
                    self.withdraw().await;
                    return None;
                }
                _ = renew.tick() => {
                    self.keeper.keep_alive().await.map_err(|e| client_err("lease keep-alive", &e))
                }
                m = self.keepalive.message() => match m {
                    Ok(Some(r)) if r.ttl() > 0 => Ok(()),
                    Ok(Some(_)) => Err(etcd_err(-1, &format!("lease {:x} expired", self.lease))),
                    Ok(None) => Err(etcd_err(-1, "lease keep-alive stream closed")),
                    Err(e) => Err(client_err("lease keep-alive", &e)),
                },
                m = self.watch.message() => match m {
                    Ok(Some(r)) => self.on_watch(&r).await,
                    Ok(None) => Err(etcd_err(-1, &format!("watch of {} closed", self.inner.prefix))),
                    Err(e) => Err(client_err(&format!("watch of {}", self.inner.prefix), &e)),
                },
                _ = republish.tick() => self.republish(false).await,
                c = commands.recv(), if commands_open => match c {
                    Some(Command::Fetch(name)) => self.fetch(&name).await,
                    Some(Command::Publish(reply)) => {
                        let r = self.republish(false).await;
                        let _ = reply.send(r.clone());
                        r
                    }
                    None => {
                        commands_open = false;
                        Ok(())
                    }
                },
            };
            match healthy {
                Ok(()) => {}
                Err(Error::ShutDown) => {
                    // The agent is gone: so is its entry.
                    self.withdraw().await;
                    return Some(Error::ShutDown);
                }
                Err(e) => {
                    log::warn!(
                        "agent {}: etcd at {}: {e}; reconnecting",
                        self.inner.name,
                        self.inner.endpoints
                    );
                    if let Some(end) = self.recover(&mut stop).await {
                        return end;
                    }
                }
            }
        }
    }

    /// Applies one watch response.
    async fn on_watch(&mut self, r: &etcd_client::WatchResponse) -> Result<(), Error> {
        if r.canceled() {
            return Err(etcd_err(
                -1,
                &format!(
                    "watch of {} cancelled: {} (compacted at {})",
                    self.inner.prefix,
                    r.cancel_reason(),
                    r.compact_revision()
                ),
            ));
        }
        let mut ours_deleted = false;
        for ev in r.events() {
            let Some(kv) = ev.kv() else { continue };
            if kv.key() == self.inner.key.as_bytes() {
                ours_deleted |= ev.event_type() == EventType::Delete;
                continue;
            }
            let Some(name) = self.inner.peer_of(kv.key()) else {
                continue;
            };
            match ev.event_type() {
                EventType::Put => self.inner.apply_put(name, kv.value(), kv.mod_revision()),
                EventType::Delete => self.inner.apply_delete(name, kv.mod_revision()),
            }
        }
        if ours_deleted {
            log::warn!(
                "agent {}: its entry {} was deleted; publishing again",
                self.inner.name,
                self.inner.key
            );
            self.republish(true).await?;
        }
        Ok(())
    }

    /// Writes the agent's metadata if it changed (or if `force`).
    async fn republish(&mut self, force: bool) -> Result<(), Error> {
        let now = self.inner.agent.local_metadata()?;
        if !force && now == self.published {
            return Ok(());
        }
        let mut c = self.client.clone();
        self.timed(
            &format!("put {}", self.inner.key),
            c.put(
                self.inner.key.clone(),
                seal(self.inner.auth.as_deref(), &self.inner.name, &now),
                Some(PutOptions::new().with_lease(self.lease)),
            ),
        )
        .await?;
        log::info!(
            "agent {}: re-published its metadata ({} bytes)",
            self.inner.name,
            now.len()
        );
        self.published = now;
        self.inner.lock().publications += 1;
        Ok(())
    }

    /// Gets `name`'s entry and applies it.
    async fn fetch(&mut self, name: &str) -> Result<(), Error> {
        let key = format!("{}{name}", self.inner.prefix);
        let mut c = self.client.clone();
        let r = self.timed(&format!("get {key}"), c.get(key, None)).await?;
        if let Some(kv) = r.kvs().first() {
            self.inner.apply_put(name, kv.value(), kv.mod_revision());
        }
        Ok(())
    }

    /// Reconnects after a failure: a new lease, the entry written again, a
    /// fresh listing and watch. Retries until it works or `stop` fires;
    /// returns `Some` when the session must end.
    async fn recover(&mut self, stop: &mut oneshot::Receiver<()>) -> Option<Option<Error>> {
        loop {
            tokio::select! {
                _ = &mut *stop => {
                    self.withdraw().await;
                    return Some(None);
                }
                _ = tokio::time::sleep(RETRY_PAUSE) => {}
            }
            match self.reopen().await {
                Ok(()) => {
                    log::info!(
                        "agent {}: back in etcd at {}",
                        self.inner.name,
                        self.inner.endpoints
                    );
                    return None;
                }
                Err(Error::ShutDown) => return Some(Some(Error::ShutDown)),
                Err(e) => log::warn!("agent {}: etcd still failing: {e}", self.inner.name),
            }
        }
    }

    async fn reopen(&mut self) -> Result<(), Error> {
        let old = self.lease;
        let (lease, keeper, keepalive) =
            grant(&self.settings, &self.inner, &mut self.client).await?;
        self.lease = lease;
        self.keeper = keeper;
        self.keepalive = keepalive;
        self.republish(true).await?;
        let mut c = self.client.clone();
        // The old lease may still live (a broken stream, not a dead etcd).
        let _ = self.timed("revoke old lease", c.lease_revoke(old)).await;
        self.watch = follow(&self.settings, &self.inner, &mut self.client).await?;
        Ok(())
    }

    /// Revokes the lease, so the entry disappears now.
    async fn withdraw(&mut self) {
        let mut c = self.client.clone();
        match self
            .timed(
                &format!("revoke lease of {}", self.inner.key),
                c.lease_revoke(self.lease),
            )
            .await
        {
            Ok(_) => log::info!(
                "agent {}: withdrawn from etcd ({})",
                self.inner.name,
                self.inner.key
            ),
            Err(e) => log::warn!(
                "agent {}: withdrawing from etcd: {e}; the entry expires with its lease",
                self.inner.name
            ),
        }
    }
}

/// Runs `f` with the request timeout; errors name the endpoints and `what`.
async fn timed<T>(
    settings: &Settings,
    inner: &Inner,
    what: &str,
    f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, Error> {
    match tokio::time::timeout(settings.timeout, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(client_err(
            &format!("etcd at {}: {what}", inner.endpoints),
            &e,
        )),
        Err(_) => Err(etcd_err(
            -1,
            &format!(
                "etcd at {}: {what}: no answer within {} ms",
                inner.endpoints,
                settings.timeout.as_millis()
            ),
        )),
    }
}

/// Grants a lease and opens its keep-alive stream.
async fn grant(
    settings: &Settings,
    inner: &Inner,
    client: &mut Client,
) -> Result<(i64, LeaseKeeper, LeaseKeepAliveStream), Error> {
    let mut c = client.clone();
    let what = format!("grant a lease of {} s", settings.ttl);
    let lease = timed(settings, inner, &what, c.lease_grant(settings.ttl, None))
        .await?
        .id();
    let mut c = client.clone();
    let (keeper, stream) = timed(
        settings,
        inner,
        "lease keep-alive",
        c.lease_keep_alive(lease),
    )
    .await?;
    Ok((lease, keeper, stream))
}

/// Lists the prefix, applies the listing and watches from the revision
/// after it.
async fn follow(
    settings: &Settings,
    inner: &Inner,
    client: &mut Client,
) -> Result<WatchStream, Error> {
    let mut c = client.clone();
    let what = format!("list {}", inner.prefix);
    let listing = timed(
        settings,
        inner,
        &what,
        c.get(inner.prefix.clone(), Some(GetOptions::new().with_prefix())),
    )
    .await?;
    let revision = listing.header().map_or(0, |h| h.revision());
    inner.apply_listing(listing.kvs(), revision);
    let mut c = client.clone();
    let what = format!("watch {}", inner.prefix);
    let opts = WatchOptions::new()
        .with_prefix()
        .with_start_revision(revision + 1);
    timed(
        settings,
        inner,
        &what,
        c.watch(inner.prefix.clone(), Some(opts)),
    )
    .await
}

#[cfg(test)]
mod signing_tests {
    use super::*;

    #[test]
    fn entries_are_sealed_and_opened_with_the_key() {
        let meta = b"some metadata bytes".as_slice();
        let sealed = seal(Some(b"k1"), "peer", meta);
        assert!(sealed.starts_with(SIGNED));
        assert_eq!(open(Some(b"k1"), "peer", &sealed), Ok(meta));
        assert_eq!(
            open(None, "peer", &sealed),
            Ok(meta),
            "keyless readers take it"
        );
        let why = |r: Result<&[u8], Error>| match r {
            Err(Error::Backend { text, .. }) => text.to_string(),
            other => panic!("{other:?}"),
        };
        assert!(why(open(Some(b"k2"), "peer", &sealed)).contains("signed with another key"));
        // Under another name, or altered by one bit anywhere: refused.
        assert!(why(open(Some(b"k1"), "other", &sealed)).contains("or was altered"));
        for at in [4, 20, sealed.len() - 1] {
            let mut bad = sealed.clone();
            bad[at] ^= 1;
            assert!(
                why(open(Some(b"k1"), "peer", &bad)).contains("or was altered"),
                "{at}"
            );
        }
        assert!(why(open(Some(b"k1"), "peer", meta)).contains("is not signed"));
        assert_eq!(seal(None, "peer", meta), meta);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(e: Error) -> String {
        match e {
            Error::Backend { backend, text, .. } => {
                assert_eq!(backend, ETCD);
                text.as_str().to_string()
            }
            other => panic!("expected an ETCD backend error, got {other:?}"),
        }
    }

    #[test]
    fn config_parses_endpoints_and_normalises_prefix() {
        let c = EtcdConfig::new(" http://a:2379, b:2379 ,,").with_prefix("/ns");
        assert_eq!(c.endpoints, vec!["http://a:2379", "b:2379"]);
        assert_eq!(c.validate().unwrap(), ("/ns/".to_string(), 5));
        let c = c.with_lease_ttl(Duration::from_millis(1500));
        assert_eq!(c.validate().unwrap().1, 2);
    }

    #[test]
    fn config_rejects_bad_values_by_name() {
        assert!(text(EtcdConfig::new(" , ").validate().unwrap_err()).contains("no etcd endpoint"));
        let bad_ttl = EtcdConfig::new("a:1").with_lease_ttl(Duration::from_millis(999));
        assert!(text(bad_ttl.validate().unwrap_err()).contains("lease TTL 999 ms"));
        let no_prefix = EtcdConfig::new("a:1").with_prefix("");
        assert!(text(no_prefix.validate().unwrap_err()).contains("prefix is empty"));
        let zero = EtcdConfig::new("a:1").with_timeout(Duration::ZERO);
        assert!(text(zero.validate().unwrap_err()).contains("timeout is zero"));
        let zero = EtcdConfig::new("a:1").with_republish_interval(Duration::ZERO);
        assert!(text(zero.validate().unwrap_err()).contains("republish interval is zero"));
        let mut spaced = EtcdConfig::new("a:1");
        spaced.endpoints.push("b :2".into());
        assert!(text(spaced.validate().unwrap_err()).contains("\"b :2\""));
    }
}
