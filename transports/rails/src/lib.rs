//! Several network rails to one peer: [`Rails`] holds one inner transport
//! per rail (a libfabric domain and endpoint pinned to one interface, say)
//! and spreads each transfer over them.
//!
//! # Striping
//!
//! A segment of at least [`RailsConfig::stripe_min`] bytes (1 MiB) is cut
//! into parts aligned to 4 KiB, at most [`RailsConfig::part_max`] (4 MiB)
//! each and at least one per rail; smaller segments are batched (up to
//! 1 MiB per batch) and spread over the rails. Each part goes to the
//! working rail with the fewest bytes in flight, while that rail has less
//! than [`RailsConfig::window`] bytes in flight (64 MiB); the rest wait in
//! the transport and are issued from [`poll`](Transport::poll). A transfer
//! completes when all its parts have; its notification is sent after that,
//! on one working rail, so it still follows all the data.
//!
//! # Failover
//!
//! A busy rail without a completion for [`RailsConfig::rail_timeout`]
//! (500 ms) while another rail completed something, or for three times as
//! long when none did (every link down, or a stall of either process), or
//! whose part fails, is marked down: its parts in flight are abandoned in
//! the inner transport and issued again on the other rails. A down rail is
//! tried again after a back-off (200 ms, doubling up to 5 s): once the
//! inner transport has reported every abandoned part, the rail is
//! connected to each peer anew and carries one part as a probe; when that
//! completes, the rail is used as before. Only when every rail to a peer
//! is down does a transfer fail, with [`Error::RailsFailed`] naming the
//! peer and each rail's failure. The agent's keepalive should be longer
//! than three rail timeouts, or it gives the peer up first.
//!
//! # Stale WRITEs
//!
//! A part issued again is safe for a READ: the same remote bytes land in
//! the same local place, and an abandoned READ's reply cannot land once
//! the inner transport closed that connection. A WRITE is the hazard:
//! bytes of the abandoned attempt may still sit in the kernel's send
//! buffer of the closed TCP connection, and Linux delivers them when the
//! link comes back, after the transfer completed and maybe after a newer
//! WRITE to the same remote bytes (the failover test saw exactly that
//! before this was handled). Therefore, when a rail fails, the peer is
//! sent a *fence* over a working rail: it closes its end of that rail's
//! connection (bytes that arrive there afterwards are refused with a TCP
//! reset, never written) and acknowledges. A transfer to the peer
//! completes, and its notification is sent, only once every part is done,
//! the inner transport has reported every abandoned attempt, **and** every
//! fence to that peer is acknowledged; the failed rail carries data again
//! only after its fence. Before that acknowledgement, the late bytes can
//! only be the same bytes the transfer writes anyway (its source must not
//! change while it is in flight), and no newer write of kvxfer to them
//! exists. A transfer that fails because every rail failed leaves the
//! remote bytes undefined, as any failed WRITE.
//!
//! With one rail, [`Rails`] only forwards: one inner post per transfer,
//! no striping, no rail deadline, the inner transport's errors unchanged.
//!
//! Rails of two agents are paired by position: rail *i* of one connects
//! to rail *i* of the other (give both the same order, e.g. one subnet per
//! position). Remote keys are kept across a rail's reconnection, which
//! suits transports whose keys do not depend on the connection
//! (libfabric).
#![deny(missing_docs)]
#![forbid(unsafe_code)]
#![allow(clippy::result_large_err)]

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvxfer_core::{
    Capabilities, Completion, Error, MemKind, PostStatus, Region, Segment, Segments, Token,
    Transport, Wake, XferOp,
};

/// Environment variable listing the rails' interfaces, comma separated.
pub const ENV_RAILS: &str = "KVXFER_RAILS";
/// Environment variable setting [`RailsConfig::stripe_min`] in bytes
/// (suffixes KiB, MiB accepted).
pub const ENV_STRIPE: &str = "KVXFER_RAIL_STRIPE";
/// Environment variable setting [`RailsConfig::rail_timeout`] in
/// milliseconds.
pub const ENV_TIMEOUT_MS: &str = "KVXFER_RAIL_TIMEOUT_MS";
/// Environment variable setting [`RailsConfig::window`] in bytes.
pub const ENV_WINDOW: &str = "KVXFER_RAIL_WINDOW";

/// Settings of [`Rails`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RailsConfig {
    /// Segments at least this long are striped over the rails. 1 MiB.
    pub stripe_min: u64,
    /// Longest part of a striped segment. 4 MiB.
    pub part_max: u64,
    /// Parts start at multiples of this many bytes from the segment's
    /// start. 4 KiB.
    pub align: u64,
    /// Most bytes in flight on one rail before more wait. 64 MiB.
    pub window: u64,
    /// A part not complete within this is taken as its rail's failure.
    /// 500 ms.
    pub rail_timeout: Duration,
    /// First wait before a down rail is tried again. 200 ms.
    pub backoff_min: Duration,
    /// Longest wait before a down rail is tried again. 5 s.
    pub backoff_max: Duration,
}

impl Default for RailsConfig {
    fn default() -> Self {
        RailsConfig {
            stripe_min: 1 << 20,
            part_max: 4 << 20,
            align: 4096,
            window: 64 << 20,
            rail_timeout: Duration::from_millis(500),
            backoff_min: Duration::from_millis(200),
            backoff_max: Duration::from_secs(5),
        }
    }
}

/// Parses `64MiB`, `4KiB`, `1GiB` or a plain byte count.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mul) = if let Some(n) = s.strip_suffix("GiB") {
        (n, 1u64 << 30)
    } else if let Some(n) = s.strip_suffix("MiB") {
        (n, 1 << 20)
    } else if let Some(n) = s.strip_suffix("KiB") {
        (n, 1 << 10)
    } else {
        (s.strip_suffix('B').unwrap_or(s), 1)
    };
    num.trim().parse::<u64>().ok()?.checked_mul(mul)
}

impl RailsConfig {
    /// The defaults, changed by [`ENV_STRIPE`], [`ENV_TIMEOUT_MS`] and
    /// [`ENV_WINDOW`] where set (a value that does not parse is logged and
    /// ignored).
    pub fn from_env() -> RailsConfig {
        let mut c = RailsConfig::default();
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        if let Some(v) = var(ENV_STRIPE) {
            match parse_size(&v) {
                Some(n) if n > 0 => c.stripe_min = n,
                _ => log::warn!("{ENV_STRIPE}={v:?} is not a size; using {}", c.stripe_min),
            }
        }
        if let Some(v) = var(ENV_WINDOW) {
            match parse_size(&v) {
                Some(n) if n > 0 => c.window = n,
                _ => log::warn!("{ENV_WINDOW}={v:?} is not a size; using {}", c.window),
            }
        }
        if let Some(v) = var(ENV_TIMEOUT_MS) {
            match v.trim().parse::<u64>() {
                Ok(n) if n > 0 => c.rail_timeout = Duration::from_millis(n),
                _ => log::warn!("{ENV_TIMEOUT_MS}={v:?} is not a positive number of ms"),
            }
        }
        c
    }
}

/// The interfaces named by [`ENV_RAILS`], if set and not empty.
pub fn rails_from_env() -> Option<Vec<String>> {
    let v = std::env::var(ENV_RAILS).ok()?;
    let list: Vec<String> = v
        .split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect();
    (!list.is_empty()).then_some(list)
}

/// Whether a rail carries transfers.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum RailState {
    /// Working.
    Up,
    /// Failed; tried again after its back-off.
    Down,
    /// Reconnected after a failure; one part in flight decides.
    Probing,
}

impl RailState {
    /// "up", "down" or "probing".
    pub fn name(self) -> &'static str {
        match self {
            RailState::Up => "up",
            RailState::Down => "down",
            RailState::Probing => "probing",
        }
    }
}

/// Counters of one rail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RailStats {
    /// The rail's name (its interface).
    pub name: String,
    /// Its state now.
    pub state: RailState,
    /// Bytes of parts it completed.
    pub bytes: u64,
    /// Times it was marked down.
    pub failures: u64,
    /// Why it last failed ("" if never).
    pub last_error: String,
}

/// A registration on every rail, by rail.
pub type RailsReg<T> = Arc<Vec<<T as Transport>::LocalReg>>;
/// A peer's key unpacked on every rail connected to it, by rail.
pub type RailsKey<T> = Arc<Vec<Option<<T as Transport>::RemoteKey>>>;

/// A peer of [`Rails`]: an index into the transport's peer table.
#[derive(Debug)]
pub struct RailsPeer {
    id: u64,
}

struct Rail<T: Transport> {
    name: String,
    t: T,
    state: RailState,
    bytes: u64,
    failures: u64,
    last_error: String,
    in_flight: u64,
    posts: usize,
    /// Abandoned posts not yet reported by the inner transport.
    ghosts: usize,
    backoff: Duration,
    retry_at: Instant,
    /// Last completion, or when the rail last became busy.
    progress: Instant,
    /// Last completion.
    done_at: Option<Instant>,
}

struct PeerRec<T: Transport> {
    name: String,
    addrs: Vec<Vec<u8>>,
    conns: Vec<Option<T::Peer>>,
    /// By rail: the fence asked of this peer after the rail failed, not
    /// yet acknowledged (sequence number, when last sent).
    fence: Vec<Option<(u64, Option<Instant>)>>,
    /// By rail: the newest fence this peer asked of us and we served.
    served: Vec<u64>,
}

/// Prefix of a fence request: "close your connection on rail R".
const FENCE: &[u8; 4] = b"KVRF";
/// Prefix of a fence acknowledgement.
const FENCE_ACK: &[u8; 4] = b"KVRA";

fn control(kind: &[u8; 4], rail: usize, seq: u64, agent: &str) -> Vec<u8> {
    let mut m = kind.to_vec();
    m.extend_from_slice(&(rail as u32).to_le_bytes());
    m.extend_from_slice(&seq.to_le_bytes());
    m.extend_from_slice(agent.as_bytes());
    m
}

fn parse_control(m: &[u8]) -> Option<(&[u8], usize, u64, &str)> {
    if m.len() < 16 || (&m[..4] != FENCE && &m[..4] != FENCE_ACK) {
        return None;
    }
    let rail = u32::from_le_bytes(m[4..8].try_into().ok()?) as usize;
    let seq = u64::from_le_bytes(m[8..16].try_into().ok()?);
    Some((&m[..4], rail, seq, std::str::from_utf8(&m[16..]).ok()?))
}

struct Part<T: Transport> {
    local_addr: u64,
    remote_addr: u64,
    len: u64,
    remote_region_addr: u64,
    local: RailsReg<T>,
    remote: RailsKey<T>,
}

struct Req<T: Transport> {
    peer: u64,
    op: XferOp,
    parts: Vec<Part<T>>,
    left: usize,
    ghosts: usize,
    note: Option<Vec<u8>>,
}

struct Flight {
    req: Token,
    parts: Vec<u32>,
    bytes: u64,
    ghost: bool,
}

/// One peer over several rails, each an inner transport `T` (see the
/// [crate documentation](crate)).
pub struct Rails<T: Transport> {
    agent: String,
    cfg: RailsConfig,
    rails: Vec<Rail<T>>,
    peers: HashMap<u64, PeerRec<T>>,
    next_peer: u64,
    reqs: HashMap<Token, Req<T>>,
    /// In-flight inner posts by (rail, inner token).
    flights: HashMap<(usize, u64), Flight>,
    /// Parts waiting for a rail.
    queue: VecDeque<(Token, u32)>,
    next_tok: u64,
    rr: usize,
    done: VecDeque<Completion>,
    deferred: Vec<RailsReg<T>>,
    next_fence: u64,
}

const MAGIC: &[u8; 4] = b"KVR1";

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

impl<T: Transport> Rails<T> {
    /// Rails named `names` (their interfaces), one inner transport each, for
    /// the agent `agent` (whose name the address carries, so that peers
    /// can name it in errors).
    pub fn new(agent: &str, rails: Vec<(String, T)>, cfg: RailsConfig) -> Rails<T> {
        let now = Instant::now();
        Rails {
            agent: agent.to_owned(),
            rails: rails
                .into_iter()
                .map(|(name, t)| Rail {
                    name,
                    t,
                    state: RailState::Up,
                    bytes: 0,
                    failures: 0,
                    last_error: String::new(),
                    in_flight: 0,
                    posts: 0,
                    ghosts: 0,
                    backoff: cfg.backoff_min,
                    retry_at: now,
                    progress: now,
                    done_at: None,
                })
                .collect(),
            cfg,
            peers: HashMap::new(),
            next_peer: 0,
            reqs: HashMap::new(),
            flights: HashMap::new(),
            queue: VecDeque::new(),
            next_tok: 1,
            rr: 0,
            done: VecDeque::new(),
            deferred: Vec::new(),
            next_fence: 1,
        }
    }

    /// Counters and state of every rail, in order.
    pub fn stats(&self) -> Vec<RailStats> {
        self.rails
            .iter()
            .map(|r| RailStats {
                name: r.name.clone(),
                state: r.state,
                bytes: r.bytes,
                failures: r.failures,
                last_error: r.last_error.clone(),
            })
            .collect()
    }

    /// The inner transport of rail `i`.
    pub fn rail(&self, i: usize) -> Option<&T> {
        self.rails.get(i).map(|r| &r.t)
    }

    /// How many rails.
    pub fn len(&self) -> usize {
        self.rails.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.rails.is_empty()
    }

    fn single(&self) -> bool {
        self.rails.len() == 1
    }

    /// Whether rail `r` may carry parts to peer `p` with key `key` now.
    fn usable(&self, r: usize, p: &PeerRec<T>) -> bool {
        self.rails[r].state != RailState::Down
            && p.conns.get(r).is_some_and(|c| c.is_some())
            && p.fence.get(r).is_some_and(|f| f.is_none())
    }

    /// "name: reason, ..." of the rails to peer `p`.
    fn reasons(&self, p: &PeerRec<T>) -> String {
        let mut s = String::new();
        for (i, r) in self.rails.iter().enumerate() {
            if i >= p.conns.len() {
                break;
            }
            if !s.is_empty() {
                s.push_str(", ");
            }
            let why = if p.conns[i].is_none() {
                "not connected"
            } else if r.last_error.is_empty() {
                r.state.name()
            } else {
                &r.last_error
            };
            let _ = write!(s, "{}: {why}", r.name);
        }
        s
    }

    /// Marks rail `r` down for `reason`: its posts in flight are abandoned
    /// and their parts queued again.
    fn mark_down(&mut self, r: usize, reason: &str) {
        let now = Instant::now();
        let rail = &mut self.rails[r];
        if rail.state != RailState::Down {
            rail.failures += 1;
            log::warn!(
                "rails: rail {} down ({reason}); retried in {:?}",
                rail.name,
                rail.backoff
            );
        }
        rail.state = RailState::Down;
        rail.last_error = reason.to_owned();
        for p in self.peers.values_mut() {
            if p.conns.get(r).is_some_and(|c| c.is_some()) && p.fence[r].is_none() {
                p.fence[r] = Some((self.next_fence, None));
                self.next_fence += 1;
            }
        }
        rail.retry_at = now + rail.backoff;
        rail.backoff = (rail.backoff * 2).min(self.cfg.backoff_max);
        let mine: Vec<u64> = self
            .flights
            .iter()
            .filter(|(k, f)| k.0 == r && !f.ghost)
            .map(|(k, _)| k.1)
            .collect();
        for tok in mine {
            let Some(f) = self.flights.get_mut(&(r, tok)) else {
                continue;
            };
            f.ghost = true;
            let (req, parts) = (f.req, f.parts.clone());
            let rail = &mut self.rails[r];
            rail.posts -= 1;
            rail.ghosts += 1;
            if let Err(e) = rail.t.abandon(Token(tok)) {
                log::debug!("rails: abandon on {}: {e}", rail.name);
            }
            if let Some(q) = self.reqs.get_mut(&req) {
                q.ghosts += 1;
                for p in parts.into_iter().rev() {
                    self.queue.push_front((req, p));
                }
            }
        }
    }

    /// Ends request `tok` if every part is done and no abandoned attempt
    /// is outstanding: sends its notification, then reports it.
    fn maybe_finish(&mut self, tok: Token) {
        let Some(q) = self.reqs.get(&tok) else {
            return;
        };
        if q.left > 0 || q.ghosts > 0 {
            return;
        }
        // Bytes of abandoned WRITEs may still reach the peer over a
        // connection it has not closed yet: wait for its fences.
        if self
            .peers
            .get(&q.peer)
            .is_some_and(|p| p.fence.iter().any(Option::is_some))
        {
            return;
        }
        let q = self.reqs.remove(&tok).expect("present");
        let mut result = Ok(());
        if let Some(msg) = q.note.as_deref() {
            result = self.notify_peer(q.peer, msg);
        }
        self.done.push_back(Completion { token: tok, result });
    }

    /// Sends `msg` to peer `id` on the first rail that takes it.
    fn notify_peer(&mut self, id: u64, msg: &[u8]) -> Result<(), Error> {
        let Some(p) = self.peers.get(&id) else {
            return Err(Error::disconnected(""));
        };
        let mut order: Vec<usize> = (0..self.rails.len())
            .filter(|&r| self.usable(r, p))
            .collect();
        // Up rails first.
        order.sort_by_key(|&r| self.rails[r].state != RailState::Up);
        let mut last = None;
        for r in order {
            let conn = p.conns[r].as_ref().expect("usable");
            match self.rails[r].t.send_notification(conn, msg) {
                Ok(()) => return Ok(()),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| Error::rails_failed(&p.name, &self.reasons(p))))
    }

    /// Fails every request to peers with no usable rail.
    fn fail_stranded(&mut self) {
        let mut stranded: Vec<Token> = Vec::new();
        for &(tok, _) in &self.queue {
            if stranded.contains(&tok) {
                continue;
            }
            let Some(q) = self.reqs.get(&tok) else {
                continue;
            };
            let Some(p) = self.peers.get(&q.peer) else {
                stranded.push(tok);
                continue;
            };
            if !(0..self.rails.len()).any(|r| self.usable(r, p)) {
                stranded.push(tok);
            }
        }
        for tok in stranded {
            self.queue.retain(|&(t, _)| t != tok);
            if let Some(q) = self.reqs.remove(&tok) {
                let err = match self.peers.get(&q.peer) {
                    Some(p) => Error::rails_failed(&p.name, &self.reasons(p)),
                    None => Error::disconnected(""),
                };
                // Parts still in flight on working rails are left to end;
                // their completions find no request.
                self.done.push_back(Completion {
                    token: tok,
                    result: Err(err),
                });
            }
        }
    }

    /// Issues queued parts on rails with room.
    fn pump(&mut self) {
        while let Some(&(tok, first)) = self.queue.front() {
            let Some(q) = self.reqs.get(&tok) else {
                self.queue.pop_front();
                continue;
            };
            let Some(p) = self.peers.get(&q.peer) else {
                self.fail_stranded();
                continue;
            };
            // The usable rail with room and the fewest bytes in flight.
            let n = self.rails.len();
            let mut best: Option<usize> = None;
            let mut any = false;
            for k in 0..n {
                let r = (self.rr + k) % n;
                if !self.usable(r, p) || q.parts[first as usize].remote[r].is_none() {
                    continue;
                }
                any = true;
                let rail = &self.rails[r];
                let room = match rail.state {
                    RailState::Probing => rail.posts == 0,
                    _ => rail.posts == 0 || rail.in_flight < self.cfg.window,
                };
                if room && best.map_or(true, |b| rail.in_flight < self.rails[b].in_flight) {
                    best = Some(r);
                }
            }
            if !any {
                self.fail_stranded();
                continue;
            }
            let Some(r) = best else {
                break;
            };
            self.rr = (r + 1) % n;
            // Take this part; small parts of the same request that follow
            // go with it, up to 1 MiB and 64 segments.
            let mut idx = vec![first];
            self.queue.pop_front();
            let mut bytes = q.parts[first as usize].len;
            if bytes < self.cfg.stripe_min && self.rails[r].state == RailState::Up {
                while let Some(&(t, i)) = self.queue.front() {
                    if t != tok {
                        break;
                    }
                    let len = q.parts[i as usize].len;
                    if idx.len() >= 64 || bytes + len > self.cfg.stripe_min {
                        break;
                    }
                    idx.push(i);
                    bytes += len;
                    self.queue.pop_front();
                }
            }
            self.issue(r, tok, idx, bytes);
        }
    }

    /// Posts parts `idx` of request `tok` on rail `r`.
    fn issue(&mut self, r: usize, tok: Token, idx: Vec<u32>, bytes: u64) {
        let itok = self.next_tok;
        self.next_tok += 1;
        let result = {
            let Rails {
                rails, reqs, peers, ..
            } = self;
            let q = &reqs[&tok];
            let conn = peers[&q.peer].conns[r].as_ref().expect("usable rail");
            let segs: Vec<Segment<'_, T::LocalReg, T::RemoteKey>> = idx
                .iter()
                .map(|&i| {
                    let p = &q.parts[i as usize];
                    Segment {
                        local_addr: p.local_addr,
                        remote_addr: p.remote_addr,
                        len: p.len,
                        local: &p.local[r],
                        remote: p.remote[r].as_ref().expect("checked key"),
                        remote_region_addr: p.remote_region_addr,
                    }
                })
                .collect();
            rails[r]
                .t
                .post(q.op, conn, Segments::from(&segs[..]), None, Token(itok))
        };
        match result {
            Ok(PostStatus::Done) => {
                self.rails[r].bytes += bytes;
                self.part_done(tok, idx.len());
            }
            Ok(PostStatus::InProgress) => {
                let rail = &mut self.rails[r];
                if rail.posts == 0 {
                    rail.progress = Instant::now();
                }
                rail.in_flight += bytes;
                rail.posts += 1;
                self.flights.insert(
                    (r, itok),
                    Flight {
                        req: tok,
                        parts: idx,
                        bytes,
                        ghost: false,
                    },
                );
            }
            Err(e) => {
                for i in idx.into_iter().rev() {
                    self.queue.push_front((tok, i));
                }
                self.mark_down(r, &e.to_string());
            }
        }
    }

    fn part_done(&mut self, tok: Token, n: usize) {
        if let Some(q) = self.reqs.get_mut(&tok) {
            q.left = q.left.saturating_sub(n);
        }
        self.maybe_finish(tok);
    }

    /// Handles the inner completion `c` of rail `r`.
    fn on_inner(&mut self, r: usize, c: Completion) {
        let Some(f) = self.flights.remove(&(r, c.token.0)) else {
            return;
        };
        let rail = &mut self.rails[r];
        rail.in_flight -= f.bytes;
        if f.ghost {
            rail.ghosts -= 1;
            if let Some(q) = self.reqs.get_mut(&f.req) {
                q.ghosts -= 1;
            }
            self.maybe_finish(f.req);
            return;
        }
        rail.posts -= 1;
        match c.result {
            Ok(()) => {
                let now = Instant::now();
                rail.progress = now;
                rail.done_at = Some(now);
                rail.bytes += f.bytes;
                if rail.state == RailState::Probing {
                    log::info!("rails: rail {} is up again", rail.name);
                    rail.state = RailState::Up;
                    rail.backoff = self.cfg.backoff_min;
                }
                self.part_done(f.req, f.parts.len());
            }
            Err(e) => {
                if self.reqs.contains_key(&f.req) {
                    for i in f.parts.into_iter().rev() {
                        self.queue.push_front((f.req, i));
                    }
                }
                self.mark_down(r, &e.to_string());
            }
        }
    }

    /// Marks down rails whose oldest part is overdue, and reconnects down
    /// rails whose back-off has passed.
    fn check_rails(&mut self) {
        let now = Instant::now();
        let timeout = self.cfg.rail_timeout;
        // A busy rail without a completion for `timeout` fails when another
        // rail completed something meanwhile (the peer and this process
        // are alive); when none did, after three times as long (every link
        // down, or a stall of the peer or of this process).
        let fresh = self
            .rails
            .iter()
            .any(|r| r.done_at.is_some_and(|t| now.duration_since(t) <= timeout));
        let limit = if fresh { timeout } else { timeout * 3 };
        let late: Vec<usize> = (0..self.rails.len())
            .filter(|&r| {
                let rail = &self.rails[r];
                rail.posts > 0 && now.duration_since(rail.progress) > limit
            })
            .collect();
        for r in late {
            let reason = format!("silent for {} ms", limit.as_millis());
            self.mark_down(r, &reason);
        }
        for r in 0..self.rails.len() {
            let rail = &self.rails[r];
            if rail.state != RailState::Down || rail.ghosts > 0 || now < rail.retry_at {
                continue;
            }
            // Reconnect every peer on this rail; the old connections have no
            // operation left in the inner transport.
            let mut ok = true;
            for p in self.peers.values_mut() {
                let Some(addr) = p.addrs.get(r) else {
                    continue;
                };
                if let Some(old) = p.conns.get_mut(r).and_then(Option::take) {
                    self.rails[r].t.disconnect(old);
                }
                match self.rails[r].t.connect(addr) {
                    Ok(c) => p.conns[r] = Some(c),
                    Err(e) => {
                        ok = false;
                        self.rails[r].last_error = format!("reconnect: {e}");
                    }
                }
            }
            let rail = &mut self.rails[r];
            if ok {
                log::info!("rails: probing rail {}", rail.name);
                rail.state = RailState::Probing;
            } else {
                rail.retry_at = now + rail.backoff;
                rail.backoff = (rail.backoff * 2).min(self.cfg.backoff_max);
            }
        }
    }
}

impl<T: Transport> Rails<T> {
    /// Sends `msg` to peer `id` on a working rail other than `avoid`, else
    /// on `avoid` itself when it is reconnected.
    fn send_control(&mut self, id: u64, avoid: usize, msg: &[u8]) -> bool {
        let Some(p) = self.peers.get(&id) else {
            return false;
        };
        let mut order: Vec<usize> = (0..self.rails.len())
            .filter(|&r| r != avoid && self.usable(r, p))
            .collect();
        if self.rails[avoid].state != RailState::Down
            && p.conns.get(avoid).is_some_and(|c| c.is_some())
        {
            order.push(avoid);
        }
        for r in order {
            let conn = p.conns[r].as_ref().expect("connected");
            if self.rails[r].t.send_notification(conn, msg).is_ok() {
                return true;
            }
        }
        false
    }

    /// Sends the fences not yet sent, or not acknowledged within a second.
    fn send_fences(&mut self) {
        let now = Instant::now();
        let mut todo = Vec::new();
        for (&id, p) in &self.peers {
            for (r, f) in p.fence.iter().enumerate() {
                if let Some((seq, sent)) = *f {
                    if sent.is_none_or_late(now) {
                        todo.push((id, r, seq));
                    }
                }
            }
        }
        for (id, r, seq) in todo {
            let msg = control(FENCE, r, seq, &self.agent);
            if self.send_control(id, r, &msg) {
                if let Some(p) = self.peers.get_mut(&id) {
                    p.fence[r] = Some((seq, Some(now)));
                }
            }
        }
    }

    /// Handles a fence request or acknowledgement; false if `m` is neither.
    fn on_control(&mut self, m: &[u8]) -> bool {
        let Some((kind, r, seq, from)) = parse_control(m) else {
            return false;
        };
        let Some((&id, _)) = self.peers.iter().find(|(_, p)| p.name == from) else {
            return true;
        };
        if kind == FENCE {
            // Close our connection on rail r (bytes still on their way over
            // it are then refused), open a fresh one, acknowledge.
            let p = self.peers.get_mut(&id).expect("found");
            if r < p.conns.len() && p.served[r] < seq {
                p.served[r] = seq;
                if let Some(old) = p.conns[r].take() {
                    self.rails[r].t.disconnect(old);
                }
                match self.rails[r].t.connect(&p.addrs[r]) {
                    Ok(c) => p.conns[r] = Some(c),
                    Err(e) => log::warn!("rails: reconnect rail {r} to {from}: {e}"),
                }
            }
            let ack = control(FENCE_ACK, r, seq, &self.agent);
            if !self.send_control(id, r, &ack) {
                log::warn!("rails: no rail to acknowledge a fence of {from}");
            }
        } else {
            let p = self.peers.get_mut(&id).expect("found");
            if p.fence
                .get(r)
                .is_some_and(|f| f.is_some_and(|(s, _)| s == seq))
            {
                p.fence[r] = None;
                let waiting: Vec<Token> = self
                    .reqs
                    .iter()
                    .filter(|(_, q)| q.peer == id)
                    .map(|(&t, _)| t)
                    .collect();
                for t in waiting {
                    self.maybe_finish(t);
                }
            }
        }
        true
    }
}

trait Late {
    fn is_none_or_late(&self, now: Instant) -> bool;
}

impl Late for Option<Instant> {
    fn is_none_or_late(&self, now: Instant) -> bool {
        self.map_or(true, |t| now.duration_since(t) > Duration::from_secs(1))
    }
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
        Ok(Arc::new(regs))
    }

    fn deregister(&mut self, reg: Self::LocalReg) {
        match Arc::try_unwrap(reg) {
            Ok(regs) => {
                for (r, x) in regs.into_iter().enumerate() {
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
        let (name, addrs) = if self.single() {
            (String::new(), vec![address.to_vec()])
        } else {
            let Some(mut b) = address.strip_prefix(&MAGIC[..]) else {
                return Err(bad("is not a rails address (one rail on the peer?)"));
            };
            let name = take_bytes(&mut b).ok_or_else(|| bad("is truncated"))?;
            let name = String::from_utf8_lossy(name).into_owned();
            if b.len() < 4 {
                return Err(bad("is truncated"));
            }
            let n = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
            b = &b[4..];
            let mut addrs = Vec::new();
            for _ in 0..n {
                let _iface = take_bytes(&mut b).ok_or_else(|| bad("is truncated"))?;
                let a = take_bytes(&mut b).ok_or_else(|| bad("is truncated"))?;
                addrs.push(a.to_vec());
            }
            (name, addrs)
        };
        let mut conns = Vec::new();
        let mut first_err = None;
        for (r, a) in addrs.iter().enumerate().take(self.rails.len()) {
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
        let id = self.next_peer;
        self.next_peer += 1;
        let n = conns.len();
        self.peers.insert(
            id,
            PeerRec {
                name,
                addrs,
                conns,
                fence: vec![None; n],
                served: vec![0; n],
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

    fn unpack_key(
        &mut self,
        peer: &Self::Peer,
        region: &Region,
        key: &[u8],
    ) -> Result<Self::RemoteKey, Error> {
        let Some(p) = self.peers.get(&peer.id) else {
            return Err(Error::disconnected(""));
        };
        let mut b = key;
        let mut keys = Vec::with_capacity(self.rails.len());
        for r in 0..self.rails.len() {
            let Some(packed) = take_bytes(&mut b) else {
                for (i, k) in keys.into_iter().enumerate() {
                    if let Some(k) = k {
                        self.rails[i].t.release_key(k);
                    }
                }
                return Err(Error::backend(
                    self.name(),
                    -22,
                    &format!("rails: key of {} bytes has no key for rail {r}", key.len()),
                ));
            };
            let k = match (Some(packed), p.conns.get(r).and_then(Option::as_ref)) {
                (Some(k), Some(conn)) => match self.rails[r].t.unpack_key(conn, region, k) {
                    Ok(k) => Some(k),
                    Err(e) => {
                        for (i, k) in keys.into_iter().enumerate() {
                            if let Some(k) = k {
                                self.rails[i].t.release_key(k);
                            }
                        }
                        return Err(e);
                    }
                },
                _ => None,
            };
            keys.push(k);
        }
        Ok(Arc::new(keys))
    }

    fn release_key(&mut self, key: Self::RemoteKey) {
        // Parts hold clones only while their transfer lives; the core
        // releases a key after its transfers ended.
        if let Ok(keys) = Arc::try_unwrap(key) {
            for (r, k) in keys.into_iter().enumerate() {
                if let Some(k) = k {
                    self.rails[r].t.release_key(k);
                }
            }
        }
    }

    fn local_kind(&self, reg: &Self::LocalReg) -> MemKind {
        self.rails[0].t.local_kind(&reg[0])
    }

    fn remote_kind(&self, key: &Self::RemoteKey) -> MemKind {
        for (r, k) in key.iter().enumerate() {
            if let Some(k) = k {
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
                    remote: s.remote[0].as_ref().expect("one rail, key unpacked"),
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
        self.check_rails();
        self.send_fences();
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
        self.notify_peer(peer.id, msg)
    }

    fn arm(&mut self) -> Wake {
        if self.single() {
            return self.rails[0].t.arm();
        }
        if !self.done.is_empty() || !self.queue.is_empty() || !self.flights.is_empty() {
            return Wake::Busy;
        }
        // Several descriptors cannot be slept on at once through this
        // interface: the caller sleeps its own way and polls.
        Wake::Unsupported
    }

    fn poll_notification(&mut self, buf: &mut [u8]) -> Option<Result<usize, Error>> {
        let n = self.rails.len();
        for k in 0..n {
            let r = (self.rr + k) % n;
            while let Some(x) = self.rails[r].t.poll_notification(buf) {
                if n > 1 {
                    if let Ok(len) = x {
                        let m = buf[..len].to_vec();
                        if self.on_control(&m) {
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
