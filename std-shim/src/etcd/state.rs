//! What the handle and the background task share: the peers known under the prefix.

use super::*;

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

pub(super) struct PeerEntry {
    /// etcd revision of the last event applied.
    revision: i64,
    /// The metadata loaded, while loaded.
    pub(super) blob: Option<Vec<u8>>,
    pub(super) state: PeerState,
}

#[derive(Default)]
pub(super) struct Known {
    pub(super) peers: HashMap<String, PeerEntry>,
    /// Names asked for with `fetch` (followed even without `load_all`).
    pub(super) wanted: HashSet<String>,
    /// Set when the background task ended on its own, and why.
    pub(super) stopped: Option<Error>,
    /// Times this agent's entry was written.
    pub(super) publications: u64,
}

/// State shared by the handle and the background task.
pub(super) struct DiscoveryInner {
    pub(super) agent: Agent,
    /// The agent's side-channel key: metadata is published signed with it
    /// and only metadata signed with it is loaded.
    pub(super) auth: Option<Vec<u8>>,
    pub(super) name: String,
    pub(super) key: String,
    pub(super) prefix: String,
    pub(super) endpoints: String,
    pub(super) load_all: bool,
    pub(super) known: Mutex<Known>,
    pub(super) changed: Condvar,
}

impl DiscoveryInner {
    pub(super) fn lock(&self) -> MutexGuard<'_, Known> {
        self.known.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The peer name of `key`, if it lies under the prefix and is not ours.
    pub(super) fn peer_of<'k>(&self, key: &'k [u8]) -> Option<&'k str> {
        let name = std::str::from_utf8(key).ok()?.strip_prefix(&self.prefix)?;
        (!name.is_empty() && name != self.name).then_some(name)
    }

    fn follows(&self, known: &Known, name: &str) -> bool {
        self.load_all || known.wanted.contains(name) || known.peers.contains_key(name)
    }

    /// Applies a put of `blob` under `name` at `revision`: loads it unless
    /// an equal or later event was applied, or it is already loaded.
    pub(super) fn apply_put(&self, name: &str, value: &[u8], revision: i64) {
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
    pub(super) fn apply_delete(&self, name: &str, revision: i64) {
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
    pub(super) fn apply_listing(&self, kvs: &[etcd_client::KeyValue], revision: i64) {
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
