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

mod signing;
use signing::*;
mod config;
pub use config::*;
mod state;
pub use state::*;
mod session;
use session::*;

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

/// An etcd client error as a kvxfer error; `what` says what was being done.
fn client_err(what: &str, e: &etcd_client::Error) -> Error {
    let code = match e {
        etcd_client::Error::GRpcStatus(s) => s.code() as i64,
        _ => -1,
    };
    etcd_err(code, &format!("{what}: {e}"))
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
    inner: Arc<DiscoveryInner>,
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
        let inner = Arc::new(DiscoveryInner {
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

#[cfg(test)]
mod tests;
