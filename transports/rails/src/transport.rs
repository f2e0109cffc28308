//! The [`Transport`] implementation of [`Rails`]: one rail forwards,
//! several stripe.

use std::sync::Arc;

use kvxfer_core::{
    Capabilities, Completion, Error, MemKind, PostStatus, Region, Segment, Segments, Token,
    Transport, Wake, XferOp,
};

use crate::pair::{pair_rails, put_nets, take_nets, RailInfo};
use crate::{Part, PeerRec, Rails, RailsKey, RailsKeys, RailsPeer, RailsReg, Registration, Req};

/// Prefix of a rails address: the agent's name, then per rail its
/// interface, its networks and its inner address.
const MAGIC: &[u8; 4] = b"KVR3";
/// Prefixes of the rails addresses of older versions, refused: their
/// fences differ (`KVR1`: no networks; `KVR2`: fences that name no
/// connection and carry no address).
const OLDER: [&[u8; 4]; 2] = [b"KVR1", b"KVR2"];

/// A rail of a peer's rails address.
struct PeerRail<'a> {
    info: RailInfo,
    addr: &'a [u8],
}

/// A peer's rails address: its agent name and rails.
struct PeerAddr<'a> {
    name: String,
    rails: Vec<PeerRail<'a>>,
}

/// Reads a rails address; `Ok(None)` if `address` is not one (a single
/// endpoint's inner address), `Err` (what is wrong) if it is broken.
fn parse_address(address: &[u8]) -> Result<Option<PeerAddr<'_>>, &'static str> {
    if OLDER.iter().any(|m| address.starts_with(&m[..])) {
        return Err("is of an older kvxfer (other fences): upgrade it");
    }
    let Some(mut b) = address.strip_prefix(&MAGIC[..]) else {
        return Ok(None);
    };
    const CUT: &str = "is truncated";
    let name = take_bytes(&mut b).ok_or(CUT)?;
    let name = String::from_utf8_lossy(name).into_owned();
    if b.len() < 4 {
        return Err(CUT);
    }
    let n = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
    b = &b[4..];
    let mut rails = Vec::new();
    for _ in 0..n {
        let iface = take_bytes(&mut b).ok_or(CUT)?;
        let nets = take_nets(&mut b).ok_or(CUT)?;
        let addr = take_bytes(&mut b).ok_or(CUT)?;
        rails.push(PeerRail {
            info: RailInfo::new(&String::from_utf8_lossy(iface), nets),
            addr,
        });
    }
    if rails.is_empty() {
        return Err("has no rail");
    }
    Ok(Some(PeerAddr { name, rails }))
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

fn take_bytes<'a>(b: &mut &'a [u8]) -> Option<&'a [u8]> {
    if b.len() < 4 {
        return None;
    }
    let n = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
    let rest = &b[4..];
    if rest.len() < n {
        return None;
    }
    let (v, r) = rest.split_at(n);
    *b = r;
    Some(v)
}

fn copy_into(out: &mut [u8], v: &[u8]) -> Result<usize, Error> {
    if out.len() < v.len() {
        return Err(Error::BufferTooSmall {
            needed: v.len() as u64,
            available: out.len() as u64,
        });
    }
    out[..v.len()].copy_from_slice(v);
    Ok(v.len())
}
impl<T: Transport> Transport for Rails<T> {
    type LocalReg = RailsReg<T>;
    type Peer = RailsPeer;
    type RemoteKey = RailsKey<T>;

    fn name(&self) -> &'static str {
        self.rails.first().map_or("RAILS", |r| r.t.name())
    }

    fn capabilities(&self) -> Capabilities {
        let mut c = self
            .rails
            .first()
            .map(|r| r.t.capabilities())
            .unwrap_or_default();
        if !self.single() {
            c.can_cancel = false;
            c.may_complete_inline = false;
        }
        c
    }

    fn register(&mut self, region: &Region) -> Result<Self::LocalReg, Error> {
        let prefer = match &self.topo {
            Some(t) if !self.single() => {
                let m = t.prefer(region);
                let all = if self.rails.len() >= 64 {
                    u64::MAX
                } else {
                    (1u64 << self.rails.len()) - 1
                };
                if m == all {
                    0
                } else {
                    m
                }
            }
            _ => 0,
        };
        let mut regs = Vec::with_capacity(self.rails.len());
        for r in 0..self.rails.len() {
            match self.rails[r].t.register(region) {
                Ok(x) => regs.push(x),
                Err(e) => {
                    for (k, x) in regs.into_iter().enumerate() {
                        self.rails[k].t.deregister(x);
                    }
                    return Err(e);
                }
            }
        }
        Ok(Arc::new(Registration { regs, prefer }))
    }

    fn deregister(&mut self, reg: Self::LocalReg) {
        match Arc::try_unwrap(reg) {
            Ok(regs) => {
                for (r, x) in regs.regs.into_iter().enumerate() {
                    self.rails[r].t.deregister(x);
                }
            }
            Err(reg) => self.deferred.push(reg),
        }
    }

    fn in_use(&mut self, reg: &Self::LocalReg) -> bool {
        let mut busy = false;
        for (r, x) in reg.iter().enumerate() {
            busy |= self.rails[r].t.in_use(x);
        }
        busy
    }

    fn pack_key(&self, reg: &Self::LocalReg, out: &mut [u8]) -> Result<usize, Error> {
        let mut v = Vec::new();
        let mut buf = vec![0u8; 4096];
        for (r, x) in reg.iter().enumerate() {
            let n = self.rails[r].t.pack_key(x, &mut buf)?;
            put_bytes(&mut v, &buf[..n]);
        }
        copy_into(out, &v)
    }

    fn local_address(&self, out: &mut [u8]) -> Result<usize, Error> {
        if self.single() {
            return self.rails[0].t.local_address(out);
        }
        let mut v = MAGIC.to_vec();
        put_bytes(&mut v, self.agent.as_bytes());
        v.extend_from_slice(&(self.rails.len() as u32).to_le_bytes());
        let mut buf = vec![0u8; 4096];
        for r in &self.rails {
            put_bytes(&mut v, r.name.as_bytes());
            put_nets(&mut v, &r.nets);
            let n = r.t.local_address(&mut buf)?;
            put_bytes(&mut v, &buf[..n]);
        }
        copy_into(out, &v)
    }

    fn connect(&mut self, address: &[u8]) -> Result<Self::Peer, Error> {
        let backend = self.name();
        let bad = |what: &str| {
            Error::backend(
                backend,
                -22,
                &format!("rails: peer address of {} bytes {what}", address.len()),
            )
        };
        let peer = parse_address(address).map_err(bad)?;
        let mut theirs = Vec::new();
        let (name, addrs, remote) = match peer {
            None if self.single() => (String::new(), vec![Some(address.to_vec())], vec![Some(0)]),
            None => {
                let ours: Vec<&str> = self.rails.iter().map(|r| r.name.as_str()).collect();
                return Err(Error::backend(
                    backend,
                    -22,
                    &format!(
                        "rails on one side only: the peer needs KVXFER_RAILS of 2+ interfaces (ours: {})",
                        ours.join(",")
                    ),
                ));
            }
            Some(p) if self.single() => {
                let theirs: Vec<&str> = p.rails.iter().map(|r| r.info.name.as_str()).collect();
                return Err(Error::backend(
                    backend,
                    -22,
                    &format!(
                        "rails on one side only: set KVXFER_RAILS of 2+ interfaces here too ({}: {})",
                        p.name,
                        theirs.join(",")
                    ),
                ));
            }
            Some(p) => {
                let ours: Vec<RailInfo> = self
                    .rails
                    .iter()
                    .map(|r| RailInfo::new(&r.name, r.nets.clone()))
                    .collect();
                let infos: Vec<RailInfo> = p.rails.iter().map(|r| r.info.clone()).collect();
                theirs = infos.iter().map(|r| r.name.clone()).collect();
                let remote = pair_rails(&ours, &infos).map_err(|e| {
                    log::warn!("rails: {} to {}: {e}", self.agent, p.name);
                    Error::backend(backend, -22, &format!("rails to {}: {e}", p.name))
                })?;
                let addrs = remote
                    .iter()
                    .map(|j| j.map(|j| p.rails[j].addr.to_vec()))
                    .collect();
                (p.name, addrs, remote)
            }
        };
        let mut conns = Vec::new();
        let mut first_err = None;
        for (r, a) in addrs.iter().enumerate() {
            let Some(a) = a else {
                conns.push(None);
                continue;
            };
            match self.rails[r].t.connect(a) {
                Ok(c) => conns.push(Some(c)),
                Err(e) => {
                    log::warn!(
                        "rails: rail {} cannot reach {name}: {e}",
                        self.rails[r].name
                    );
                    first_err.get_or_insert(e);
                    conns.push(None);
                }
            }
        }
        if !conns.iter().any(Option::is_some) {
            return Err(first_err.unwrap_or_else(|| bad("has no rail")));
        }
        if !self.single() {
            let used: Vec<String> = remote
                .iter()
                .enumerate()
                .filter_map(|(l, j)| j.map(|j| format!("{}->{}", self.rails[l].name, theirs[j])))
                .collect();
            log::info!("rails: {} to {name} over {}", self.agent, used.join(", "));
        }
        let id = self.next_peer;
        self.next_peer += 1;
        let n = conns.len();
        let conn_to = addrs
            .iter()
            .map(|a| a.as_deref().map_or(0, crate::addr_hash))
            .collect();
        self.peers.insert(
            id,
            PeerRec {
                name,
                addrs,
                remote,
                conns,
                fence: vec![None; n],
                served: vec![0; n],
                gen: vec![0; n],
                conn_to,
                retry: vec![None; n],
                addr_renewals: vec![0; n],
                backoff: vec![self.cfg.backoff_min; n],
            },
        );
        Ok(RailsPeer { id })
    }

    fn disconnect(&mut self, peer: Self::Peer) {
        if let Some(p) = self.peers.remove(&peer.id) {
            for (r, c) in p.conns.into_iter().enumerate() {
                if let Some(c) = c {
                    self.rails[r].t.disconnect(c);
                }
            }
        }
    }

    fn reset(&mut self, peer: Self::Peer) {
        if let Some(p) = self.peers.remove(&peer.id) {
            for (r, c) in p.conns.into_iter().enumerate() {
                if let Some(c) = c {
                    self.rails[r].t.reset(c);
                }
            }
        }
    }

    fn unpack_key(
        &mut self,
        peer: &Self::Peer,
        region: &Region,
        key: &[u8],
    ) -> Result<Self::RemoteKey, Error> {
        let Some(p) = self.peers.get(&peer.id) else {
            return Err(Error::disconnected(""));
        };
        // The peer's keys, by its rails.
        let mut b = key;
        let mut theirs = Vec::new();
        while let Some(k) = take_bytes(&mut b) {
            theirs.push(k);
        }
        // By local rail: the key of the peer's rail paired with it,
        // unpacked now where the rail is connected.
        let mut packed = Vec::with_capacity(self.rails.len());
        let mut keys = Vec::with_capacity(self.rails.len());
        let mut failed = None;
        for r in 0..self.rails.len() {
            let Some(j) = p.remote.get(r).copied().flatten() else {
                packed.push(None);
                keys.push(None);
                continue;
            };
            let Some(k) = theirs.get(j) else {
                failed = Some(Error::backend(
                    self.name(),
                    -22,
                    &format!("rails: key of {} bytes has no key for rail {j}", key.len()),
                ));
                break;
            };
            packed.push(Some(k.to_vec()));
            let Some(conn) = p.conns.get(r).and_then(Option::as_ref) else {
                keys.push(None);
                continue;
            };
            match self.rails[r].t.unpack_key(conn, region, k) {
                Ok(x) => keys.push(Some((p.gen[r], x))),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = failed {
            for (i, k) in keys.into_iter().enumerate() {
                if let Some((_, k)) = k {
                    self.rails[i].t.release_key(k);
                }
            }
            return Err(e);
        }
        let id = self.next_key;
        self.next_key += 1;
        Ok(Arc::new(RailsKeys {
            id,
            region: *region,
            packed,
            keys,
        }))
    }

    fn release_key(&mut self, key: Self::RemoteKey) {
        // Parts hold clones only while their transfer lives; the core
        // releases a key after its transfers ended.
        if let Ok(keys) = Arc::try_unwrap(key) {
            for (r, k) in keys.keys.into_iter().enumerate() {
                if let Some((_, k)) = k {
                    self.rails[r].t.release_key(k);
                }
            }
            let again: Vec<(u64, usize)> = self
                .rekeys
                .keys()
                .filter(|k| k.0 == keys.id)
                .copied()
                .collect();
            for k in again {
                if let Some((_, x)) = self.rekeys.remove(&k) {
                    self.rails[k.1].t.release_key(x);
                }
            }
        }
    }

    fn local_kind(&self, reg: &Self::LocalReg) -> MemKind {
        self.rails[0].t.local_kind(&reg[0])
    }

    fn remote_kind(&self, key: &Self::RemoteKey) -> MemKind {
        for r in 0..self.rails.len() {
            if let Some(k) = key.first(r) {
                return self.rails[r].t.remote_kind(k);
            }
        }
        MemKind::Dram
    }

    fn post(
        &mut self,
        op: XferOp,
        peer: &Self::Peer,
        segments: Segments<'_, Self::LocalReg, Self::RemoteKey>,
        notification: Option<&[u8]>,
        token: Token,
    ) -> Result<PostStatus, Error> {
        let Some(p) = self.peers.get(&peer.id) else {
            return Err(Error::disconnected(""));
        };
        if self.single() {
            let conn = p.conns[0].as_ref().expect("one rail, connected");
            let segs: Vec<Segment<'_, T::LocalReg, T::RemoteKey>> = segments
                .iter()
                .map(|s| Segment {
                    local_addr: s.local_addr,
                    remote_addr: s.remote_addr,
                    len: s.len,
                    local: &s.local[0],
                    remote: s.remote.first(0).expect("one rail, key unpacked"),
                    remote_region_addr: s.remote_region_addr,
                })
                .collect();
            return self.rails[0]
                .t
                .post(op, conn, Segments::from(&segs[..]), notification, token);
        }
        let up = (0..self.rails.len()).filter(|&r| self.usable(r, p)).count() as u64;
        if up == 0 {
            return Err(Error::rails_failed(&p.name, &self.reasons(p)));
        }
        let cfg = &self.cfg;
        let mut parts = Vec::new();
        for s in segments.iter() {
            // Cut for the rails the segment's region will go over.
            let up = self
                .preferred_usable(s.local.preferred(), p, s.remote)
                .map_or(up, |m| u64::from(m.count_ones()));
            let mut cut = |off: u64, len: u64| {
                parts.push(Part {
                    local_addr: s.local_addr + off,
                    remote_addr: s.remote_addr + off,
                    len,
                    remote_region_addr: s.remote_region_addr,
                    local: Arc::clone(s.local),
                    remote: Arc::clone(s.remote),
                })
            };
            if s.len < cfg.stripe_min {
                cut(0, s.len);
                continue;
            }
            let n = up.max(s.len.div_ceil(cfg.part_max));
            let size = s.len.div_ceil(n).next_multiple_of(cfg.align).max(cfg.align);
            let mut off = 0;
            while off < s.len {
                let len = size.min(s.len - off);
                cut(off, len);
                off += len;
            }
        }
        let n = parts.len();
        self.reqs.insert(
            token,
            Req {
                peer: peer.id,
                op,
                parts,
                left: n,
                ghosts: 0,
                note: notification.map(<[u8]>::to_vec),
            },
        );
        for i in 0..n as u32 {
            self.queue.push_back((token, i));
        }
        self.pump();
        Ok(PostStatus::InProgress)
    }

    fn poll(&mut self) -> Option<Completion> {
        if self.single() {
            return self.rails[0].t.poll();
        }
        if let Some(c) = self.done.pop_front() {
            return Some(c);
        }
        if !self.deferred.is_empty() {
            for reg in std::mem::take(&mut self.deferred) {
                self.deregister(reg);
            }
        }
        for r in 0..self.rails.len() {
            for _ in 0..256 {
                let Some(c) = self.rails[r].t.poll() else {
                    break;
                };
                self.on_inner(r, c);
            }
        }
        self.take_notes();
        self.check_renewals();
        self.check_rails();
        self.send_fences();
        self.check_fences();
        self.pump();
        self.done.pop_front()
    }

    fn cancel(&mut self, token: Token) -> Result<(), Error> {
        if self.single() {
            return self.rails[0].t.cancel(token);
        }
        Err(Error::Unsupported {
            backend: self.name(),
            what: "cancel",
        })
    }

    fn abandon(&mut self, token: Token) -> Result<(), Error> {
        if self.single() {
            return self.rails[0].t.abandon(token);
        }
        let Some(q) = self.reqs.remove(&token) else {
            return Ok(());
        };
        drop(q);
        self.queue.retain(|&(t, _)| t != token);
        let mine: Vec<(usize, u64)> = self
            .flights
            .iter()
            .filter(|(_, f)| f.req == token && !f.ghost)
            .map(|(k, _)| *k)
            .collect();
        for (r, itok) in mine {
            if let Some(f) = self.flights.get_mut(&(r, itok)) {
                f.ghost = true;
                let rail = &mut self.rails[r];
                rail.posts -= 1;
                rail.ghosts += 1;
                let _ = rail.t.abandon(Token(itok));
            }
        }
        Ok(())
    }

    fn send_notification(&mut self, peer: &Self::Peer, msg: &[u8]) -> Result<(), Error> {
        if self.single() {
            let Some(p) = self.peers.get(&peer.id) else {
                return Err(Error::disconnected(""));
            };
            let conn = p.conns[0].as_ref().expect("one rail, connected");
            return self.rails[0].t.send_notification(conn, msg);
        }
        self.notify_peer(peer.id, msg, 0)
    }

    fn arm(&mut self) -> Wake {
        if self.single() {
            return self.rails[0].t.arm();
        }
        if !self.done.is_empty()
            || !self.queue.is_empty()
            || !self.flights.is_empty()
            || !self.notes.is_empty()
        {
            return Wake::Busy;
        }
        // Several descriptors cannot be slept on at once through this
        // interface: the caller sleeps its own way and polls.
        Wake::Unsupported
    }

    fn poll_notification(&mut self, buf: &mut [u8]) -> Option<Result<usize, Error>> {
        if let Some(x) = self.next_note(buf) {
            return Some(x);
        }
        let n = self.rails.len();
        for k in 0..n {
            let r = (self.rr + k) % n;
            while let Some(x) = self.rails[r].t.poll_notification(buf) {
                if n > 1 {
                    if let Ok(len) = x {
                        let m = buf[..len].to_vec();
                        if self.on_control(&m, r) {
                            continue;
                        }
                    }
                }
                return Some(x);
            }
        }
        None
    }
}
