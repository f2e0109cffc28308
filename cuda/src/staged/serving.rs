//! Serving: moving data for peers' requests into and out of the VRAM
//! registered here, and the connections and keys of those peers.

use super::*;

/// A requester's bounce pool: its address, the pool's packed key, address
/// and length.
pub(super) type PoolId = (Vec<u8>, Vec<u8>, u64, u64);

/// Connections and keys of peers whose requests this side serves, by
/// their address and by their bounce pool.
pub(super) struct Requesters<P, K> {
    pub(super) peers: HashMap<Vec<u8>, Arc<P>>,
    pub(super) keys: HashMap<PoolId, Arc<K>>,
    /// Taken out of the tables while transfers still held them: released
    /// with the inner transport once those are done.
    pub(super) retired_peers: Vec<Arc<P>>,
    pub(super) retired_keys: Vec<Arc<K>>,
}

/// Most requester connections and unpacked keys kept; past these, ones no
/// transfer uses are released, and a request that needs a new one while
/// all are in use is refused.
pub(super) const MAX_REQUESTERS: usize = 64;
pub(super) const MAX_REQUESTER_KEYS: usize = 256;

impl<T: Transport> Staged<T> {
    /// The connection back to a requester at `addr` (made once).
    pub(super) fn requester(&mut self, addr: &[u8]) -> Result<Arc<T::Peer>, Error> {
        if let Some(p) = self.requesters.peers.get(addr) {
            return Ok(Arc::clone(p));
        }
        if self.requesters.peers.len() >= MAX_REQUESTERS {
            self.trim_requesters();
        }
        if self.requesters.peers.len() >= MAX_REQUESTERS {
            return Err(self.bad(&format!(
                "{MAX_REQUESTERS} peers' requests are being served; refusing a new peer"
            )));
        }
        let p = Arc::new(self.inner.connect(addr)?);
        self.requesters.peers.insert(addr.to_vec(), Arc::clone(&p));
        Ok(p)
    }

    /// Starts serving a peer's request: checks it names VRAM registered
    /// here, then moves it with an internal transfer whose completion is
    /// answered to the peer.
    pub(super) fn serve(&mut self, r: &Request<'_>, peer: Arc<T::Peer>) -> Result<(), Error> {
        // Compared in full whatever the first difference, so that the time
        // taken tells nothing of the secret.
        let differ = r
            .secret
            .iter()
            .zip(self.secret.iter())
            .fold(0u8, |d, (a, b)| d | (a ^ b));
        if differ != 0 {
            return Err(
                self.bad("a staging request without this agent's secret: load its metadata first")
            );
        }
        if r.ranges.is_empty() {
            return Err(self.bad("a staging request without ranges"));
        }
        let mut segs = Vec::with_capacity(r.ranges.len());
        for g in &r.ranges {
            let end = g.vram.checked_add(g.len);
            let region = self
                .vram
                .iter()
                .find(|v| g.vram >= v.addr && end.is_some_and(|e| Some(e) <= v.end()))
                .copied();
            let Some(region) = region.filter(|_| g.len > 0) else {
                return Err(self.bad(&format!(
                    "VRAM {:#x} (+{} bytes) is not inside a VRAM region registered here",
                    g.vram, g.len
                )));
            };
            let host_fits = g.host >= r.pool
                && g.host
                    .checked_add(g.len)
                    .is_some_and(|e| Some(e) <= r.pool.checked_add(r.pool_len));
            if !host_fits {
                return Err(self.bad(&format!(
                    "host range {:#x} (+{} bytes) leaves the requester's buffer {:#x} (+{} bytes)",
                    g.host, g.len, r.pool, r.pool_len
                )));
            }
            segs.push((region.dev, *g));
        }
        let ident = (r.addr.to_vec(), r.key.to_vec(), r.pool, r.pool_len);
        let key = match self.requesters.keys.get(&ident) {
            Some(k) => Arc::clone(k),
            None => {
                if self.requesters.keys.len() >= MAX_REQUESTER_KEYS {
                    self.trim_requesters();
                }
                if self.requesters.keys.len() >= MAX_REQUESTER_KEYS {
                    return Err(self.bad(&format!(
                        "{MAX_REQUESTER_KEYS} requesters' buffers are in use; refusing another"
                    )));
                }
                let pool = Region::dram(r.pool, r.pool_len);
                let k = Arc::new(self.inner.unpack_key(&peer, &pool, r.key)?);
                self.requesters.keys.insert(ident, Arc::clone(&k));
                k
            }
        };
        // Serving has pools of its own: a peer's requests must never wait
        // for buffers this side's transfers hold while they wait for that
        // same peer's answers.
        for &(dev, _) in &segs {
            self.pool_at(pool_index(dev, true))?;
        }
        let segs = segs
            .into_iter()
            .map(|(dev, g)| Work {
                local: LocalSide::Vram(dev),
                local_addr: g.vram,
                remote_addr: g.host,
                len: g.len,
                remote: RemoteSide::Host(Arc::clone(&key)),
                remote_region_addr: r.pool,
            })
            .collect();
        self.ops.push(Op {
            token: Token(0),
            op: match r.dir {
                Direction::Pull => XferOp::Read,
                Direction::Push => XferOp::Write,
            },
            peer,
            notification: None,
            segs,
            next_seg: 0,
            next_off: 0,
            chunks: Vec::new(),
            error: None,
            serves: Some(r.id),
            serving_since: Some(Instant::now()),
            abandoned: false,
        });
        let oi = self.ops.len() - 1;
        self.start_chunks(oi);
        Ok(())
    }

    /// Drops the connection back to a requester, and the keys unpacked
    /// through it, from the requester tables; released with the inner
    /// transport where nothing else holds them.
    pub(super) fn forget_requester(&mut self, peer: &Arc<T::Peer>) {
        let Some(addr) = self
            .requesters
            .peers
            .iter()
            .find(|(_, p)| Arc::ptr_eq(p, peer))
            .map(|(a, _)| a.clone())
        else {
            return;
        };
        let ids: Vec<PoolId> = self
            .requesters
            .keys
            .keys()
            .filter(|id| id.0 == addr)
            .cloned()
            .collect();
        for id in ids {
            if let Some(k) = self.requesters.keys.remove(&id) {
                self.requesters.retired_keys.push(k);
            }
        }
        if let Some(p) = self.requesters.peers.remove(&addr) {
            self.requesters.retired_peers.push(p);
        }
        self.release_retired();
    }

    /// Releases retired keys and connections no transfer holds any more.
    pub(super) fn release_retired(&mut self) {
        for k in std::mem::take(&mut self.requesters.retired_keys) {
            match Arc::try_unwrap(k) {
                Ok(k) => self.inner.release_key(k),
                Err(k) => self.requesters.retired_keys.push(k),
            }
        }
        for p in std::mem::take(&mut self.requesters.retired_peers) {
            match Arc::try_unwrap(p) {
                Ok(p) => self.inner.disconnect(p),
                Err(p) => self.requesters.retired_peers.push(p),
            }
        }
    }

    /// Retires the requester keys and connections no transfer uses now
    /// (keys first: a connection is kept while a key of its peer is).
    pub(super) fn trim_requesters(&mut self) {
        let idle: Vec<PoolId> = self
            .requesters
            .keys
            .iter()
            .filter(|(_, k)| Arc::strong_count(k) == 1)
            .map(|(id, _)| id.clone())
            .collect();
        for id in idle {
            if let Some(k) = self.requesters.keys.remove(&id) {
                self.requesters.retired_keys.push(k);
            }
        }
        let keys = &self.requesters.keys;
        let idle: Vec<Vec<u8>> = self
            .requesters
            .peers
            .iter()
            .filter(|(a, p)| Arc::strong_count(p) == 1 && !keys.keys().any(|id| &id.0 == *a))
            .map(|(a, _)| a.clone())
            .collect();
        for a in idle {
            if let Some(p) = self.requesters.peers.remove(&a) {
                self.requesters.retired_peers.push(p);
            }
        }
        self.release_retired();
    }

    /// Sends the answer to request `id` over `peer`.
    pub(super) fn answer(&mut self, peer: &T::Peer, id: u64, result: Result<(), &Error>) {
        let text = result.map_err(|e| e.to_string());
        msg::encode_done(
            id,
            text.as_ref().map(|_| ()).map_err(String::as_str),
            &mut self.out,
        );
        if let Err(e) = self.inner.send_notification(peer, &self.out) {
            log::warn!(
                "{}: answering staging request {id:#x} failed: {e}",
                self.inner.name()
            );
        }
    }
}
