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
//! whose probe fails, is marked down: its parts in flight are abandoned in
//! the inner transport and issued again on the other rails. A down rail is
//! tried again after a back-off (200 ms, doubling up to 5 s): once the
//! inner transport has reported every abandoned part, the rail is
//! connected to each peer anew (from a renewed inner transport where a
//! reset leaves connections open, see "Stale WRITEs") and carries one
//! part as a probe; when that completes, the rail is used as before. A
//! part that fails with an error on a rail that works fails over only
//! its connection (that peer's parts on that rail, with a fence, and the
//! connection made again after a back-off of its own): a peer that
//! renewed its rail, or went away, does not take the rail from the
//! others. Only when every rail to a peer is down does a transfer fail,
//! with [`Error::RailsFailed`] naming the peer and each rail's failure.
//! The agent's keepalive should be longer than three rail timeouts, or it
//! gives the peer up first.
//!
//! [`Error::RailsFailed`]: kvxfer_core::Error::RailsFailed
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
//! reset, never written) and acknowledges, first over the rail the fence
//! came by; it connects that rail again once it hears from the peer over
//! it (a fence, an acknowledgement, or the *hello* a side sends over a
//! rail that works again: an acknowledgement of no fence, with its
//! address), not at once, which would race the peer's own reconnection
//! (over libfabric also after the shortest back-off; a side that renewed
//! connects its other peers at once and says hello). Our own parts to
//! that peer on the closed connection are fenced and issued again, as
//! after a failure. A transfer to the peer
//! completes, and its notification is sent, only once every part is done,
//! the inner transport has reported every abandoned attempt, **and** every
//! fence to that peer is acknowledged; the failed rail carries data again
//! only after its fence. Before that acknowledgement, the late bytes can
//! only be the same bytes the transfer writes anyway (its source must not
//! change while it is in flight), and no newer write of kvxfer to them
//! exists. A fence fails when no rail can carry it to the peer (every
//! rail to it down) or when it is not acknowledged within three rail
//! timeouts (a dead or stalled peer); the transfers waiting for it then
//! fail with [`Error::RailsFailed`], the rails with an unacknowledged
//! fence marked so. [`poll`](Transport::poll) handles fence requests and
//! acknowledgements as they arrive (keeping other notifications for
//! [`poll_notification`](Transport::poll_notification)), so a fence does
//! not wait for the caller to take notifications. A transfer that fails
//! because every rail failed, or a fence did, leaves the remote bytes
//! undefined, as any failed WRITE.
//!
//! A fence names the failed connection only where parts to that peer
//! were abandoned on it (only their bytes can be late); for the other
//! peers on a failed rail it asks for the reset alone.
//!
//! Closing one connection is not enough where the inner transport's
//! [`reset`](Transport::reset) leaves its socket open
//! ([`Transport::needs_renew`]: UCX's `tcp` keeps receiving on it until
//! the peer's end closes). A fence therefore names (by a hash) the
//! peer's address the failed connection was made to. When that is the
//! rail's current address, the peer stops using the rail (its parts in
//! flight are abandoned and issued again elsewhere), waits until the
//! inner transport let go of them, [renews](Transport::renew) it (for
//! UCX a new worker, ready beforehand since none can be opened on a
//! device without link, in place of the old, whose destruction closes
//! every socket it had) and only then acknowledges, with the rail's new
//! address, which the asking side connects to from then on. A fence
//! naming an older address is acknowledged at once: that connection was
//! closed by the renewal. Every fence and acknowledgement carries its
//! sender's address of the rail, so each side learns where the other's
//! renewed rail is. A renewal closes the rail's connections to every
//! peer; those peers see the rail fail, fail over, and reconnect to the
//! new address (in flight on the rail, a notification can be lost then,
//! as over any connection that fails).
//!
//! # Rail choice by topology
//!
//! Given a [`Topology`] ([`Rails::set_topology`]: where each rail's NIC
//! sits, read from sysfs by [`Topology::read`], an explicit map parsed by
//! [`parse_rail_map`], and a locator for a region's memory), [`Rails`]
//! decides at [`register`](Transport::register) which rails a region
//! prefers ([`kvxfer_core::rails::choose`]: the map, else the NUMA node of
//! host memory, else the NICs sharing a GPU's PCIe switch, else all) and
//! keeps that set in the registration ([`Registration::preferred`]). A
//! part goes to the preferred rails that are usable (up or probing,
//! connected, fence acknowledged), striped over them; only while none of
//! them is does it go to the other rails; the transfer's notification
//! goes on a preferred rail too, where one is up. A part whose preferred rails
//! are all busy waits for them rather than spilling over. At most the
//! first 64 rails can be preferred; with one rail the topology is unused.
//!
//! With one rail, [`Rails`] only forwards: one inner post per transfer,
//! no striping, no rail deadline, the inner transport's errors unchanged.
//!
//! # Pairing
//!
//! The rails address publishes, per rail, its interface name and its
//! networks (IPv4 from the interface's directly connected routes in
//! `/proc/net/route`, global IPv6 addresses from `/proc/net/if_inet6`,
//! each as address and prefix length; see [`interface_nets`]). When
//! connecting, each local rail is paired with the first free rail of the
//! peer on the same subnet, one to one ([`pair_rails`]); a rail without a
//! partner is not used for that peer (its reasons and counters leave it
//! out). So the two sides may list their rails in any order and have
//! different counts: 2 rails against 4 use the 2 shared. Rails without
//! known networks (`lo`) pair by position among themselves; when one side
//! knows no network at all (only `lo`), all rails pair by position. The
//! addresses of older versions (`KVR1`, `KVR2`, whose fences differ) are
//! refused, named. No shared
//! rail at all fails the connection, naming both sides' rails and
//! networks (the whole list in the log); rails that reach each other
//! only through a router (a subnet per host and rail) therefore do not
//! pair. A fence names the asking side's rail; the peer resets its end
//! of the rail paired with it, and names the asking side's rail back in
//! the acknowledgement.
//!
//! Rails are used only between agents that both have them (several
//! rails each): a multi-rail agent refuses a peer that publishes a single
//! endpoint, and a single endpoint refuses a rails address (a one-rail
//! [`Rails`], and the UCX transport, which is used without [`Rails`]
//! when there are no rails), each with an error saying where to set
//! `KVXFER_RAILS` ("rails on one side only: …"). Using one rail as a
//! plain forward to such a peer is not done: the peer loads this agent's
//! metadata too, and its transport cannot read a rails address or rails
//! keys (UCX 1.13 aborts the process on an address it does not know,
//! hence its check); and a forward could not fence a failed rail (see
//! "Stale WRITEs"), so it would lose what makes failover safe.
//!
//! # Inner transports
//!
//! What the rails need of the transport on each rail:
//!
//! * [`abandon`](Transport::abandon) reports the abandoned post (any
//!   result) once the library no longer touches its memory: the rails
//!   count such *ghosts*, and a transfer completes, and a failed rail is
//!   reconnected, only once its ghosts are reported. libfabric reports at
//!   once (its orphaned operations keep the memory reported in use); UCX
//!   when its forced close has ended the requests.
//! * [`reset`](Transport::reset) drops a connection without delivering
//!   what is still queued on it: the rails reset a failed rail's
//!   connection before connecting it anew, and the peer resets its end
//!   when it serves a fence (a flushing close would wait for a dead link).
//! * [`connect`](Transport::connect) must not block long: a failed rail is
//!   reconnected from [`poll`](Transport::poll) while the others carry the
//!   transfers (UCX refuses at once over a device without link, and its
//!   rails connect `tcp` without blocking, `UcxConfig::tcp_conn_nb`, for
//!   a link cut further away).
//!
//! # Remote keys
//!
//! A key is unpacked on every rail connected to its peer, and keeps the
//! bytes the peer packed (a rail's those of the peer's rail paired with
//! it; a rail not paired has none, and carries nothing to that peer):
//! after a rail is connected anew (a failover, or a
//! fence served), the key is unpacked again on the new connection when
//! that rail next carries a part to it, since a transport's key may belong
//! to the connection it was unpacked on (UCX's do, and go with it). The
//! key of the old connection is released then, or with the key; the inner
//! transport keeps what an abandoned attempt may still use until it let
//! go of it.
#![deny(missing_docs)]
#![forbid(unsafe_code)]
#![allow(clippy::result_large_err)]

mod config;
mod failover;
mod fence;
mod pair;
#[cfg(test)]
mod renew_tests;
mod stats;
mod stripe;
mod topology;
mod transport;

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvxfer_core::{Completion, Error, Token, Transport, XferOp};

pub use config::{
    parse_size, rails_from_env, RailsConfig, ENV_RAILS, ENV_STRIPE, ENV_TIMEOUT_MS, ENV_WINDOW,
};
pub use pair::{interface_nets, pair_rails, RailInfo, RailNet};
pub use stats::{RailState, RailStats};
pub use topology::{
    locate_unknown, nic_place, parse_rail_map, pci_place, sysfs_root, Locate, MemPlace, Place,
    Topology, DEFAULT_SYSFS_ROOT, ENV_RAIL_MAP, ENV_SYSFS_ROOT,
};

/// A registration on every rail, by rail, with the rails preferred for
/// its memory.
pub type RailsReg<T> = Arc<Registration<T>>;

/// A region registered on every rail (see [`RailsReg`]).
pub struct Registration<T: Transport> {
    regs: Vec<T::LocalReg>,
    /// Bit *i*: rail *i* is preferred; 0: no preference.
    prefer: u64,
}

impl<T: Transport> Registration<T> {
    /// The rails preferred for this region's memory, as a mask (bit *i*:
    /// rail *i*); 0 when every rail serves it alike.
    pub fn preferred(&self) -> u64 {
        self.prefer
    }
}

impl<T: Transport> std::ops::Deref for Registration<T> {
    type Target = [T::LocalReg];

    /// The inner registrations, by rail.
    fn deref(&self) -> &[T::LocalReg] {
        &self.regs
    }
}
/// A peer's key on every rail connected to it (see [`RailsKeys`]).
pub type RailsKey<T> = Arc<RailsKeys<<T as Transport>::RemoteKey>>;

/// A peer's remote key, as each rail's inner transport unpacked it
/// (`K`), with the packed bytes to unpack it again on a rail's new
/// connection (see the crate's "Remote keys").
pub struct RailsKeys<K> {
    id: u64,
    /// The peer's region the key covers.
    region: kvxfer_core::Region,
    /// By local rail: the key the peer's inner transport packed on the
    /// peer's rail paired with it (`PeerRec::remote`); `None` for a rail
    /// not paired with one of the peer's.
    packed: Vec<Option<Vec<u8>>>,
    /// By rail: the key unpacked on the connection of that generation
    /// (see `PeerRec::gen`), if the rail was connected.
    keys: Vec<Option<(u64, K)>>,
}

impl<K> RailsKeys<K> {
    /// Whether rail `r` has a key for the peer (paired with one of the
    /// peer's rails, whose key the peer packed).
    fn has(&self, r: usize) -> bool {
        self.packed.get(r).is_some_and(Option::is_some)
    }

    /// The key of rail `r` as first unpacked, if that rail was connected.
    fn first(&self, r: usize) -> Option<&K> {
        self.keys.get(r)?.as_ref().map(|(_, k)| k)
    }
}

/// A 64-bit FNV-1a hash of an inner address: what a fence names of the
/// connection that failed (0 for none).
fn addr_hash(addr: &[u8]) -> u64 {
    if addr.is_empty() {
        return 0;
    }
    addr.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// A peer of [`Rails`]: an index into the transport's peer table.
#[derive(Debug)]
pub struct RailsPeer {
    id: u64,
}

struct Rail<T: Transport> {
    name: String,
    /// The interface's networks, published in the address for pairing.
    nets: Vec<RailNet>,
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
    /// The inner transport is to be renewed (a peer's fence named its
    /// current address; see "Stale WRITEs"): it carries nothing until then.
    renew: bool,
    /// When a failed renewal is tried again.
    renew_at: Instant,
    /// Times the inner transport was renewed.
    renewals: u64,
    /// Renewed since it was last marked down (see `check_rails`).
    fresh: bool,
}

struct PeerRec<T: Transport> {
    name: String,
    /// By local rail: the address of the peer's rail paired with it.
    addrs: Vec<Option<Vec<u8>>>,
    /// By local rail: the index of the peer's rail paired with it (in
    /// the peer's address, its keys and its fences), if any.
    remote: Vec<Option<usize>>,
    conns: Vec<Option<T::Peer>>,
    /// By rail: the fence asked of this peer after the rail failed, not
    /// yet acknowledged.
    fence: Vec<Option<Fence>>,
    /// By rail: the newest fence this peer asked of us and we served.
    served: Vec<u64>,
    /// By rail: the generation of the connection, counting its
    /// reconnections; keys unpacked on an older one are unpacked again.
    gen: Vec<u64>,
    /// By rail: a hash of the address the connection was made to (what
    /// a fence names; see [`addr_hash`]).
    conn_to: Vec<u64>,
    /// By rail: the connection failed on its own (an error, the rail
    /// itself working): when it is made again.
    retry: Vec<Option<Instant>>,
    /// By rail: the back-off of such a connection.
    backoff: Vec<Duration>,
    /// By rail: how often the peer had renewed its rail paired with it
    /// when it sent the address in `addrs` (0: the address it published).
    addr_renewals: Vec<u64>,
}

/// A fence asked of a peer and not yet acknowledged.
#[derive(Clone, Copy)]
struct Fence {
    seq: u64,
    /// When the rail failed and the fence was asked.
    asked: Instant,
    /// When it was last sent.
    sent: Option<Instant>,
    /// The hash of the peer's address the failed connection was made to.
    named: u64,
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
    /// The peer it goes to.
    peer: u64,
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
    /// Notifications [`poll`](Transport::poll) took from the rails (to
    /// see fence requests and acknowledgements without waiting for the
    /// caller), not yet taken by the caller: the result and the bytes.
    notes: VecDeque<(Result<usize, Error>, Vec<u8>)>,
    /// Notifications dropped because `notes` was full, not yet reported.
    notes_dropped: u64,
    /// The buffer notifications are taken into.
    note_buf: Vec<u8>,
    /// Where the rails and the memory sit; `None`: every rail alike.
    topo: Option<Topology>,
    /// Keys unpacked again after a rail reconnected, by (key id, rail):
    /// the connection's generation and the key.
    rekeys: HashMap<(u64, usize), (u64, T::RemoteKey)>,
    next_key: u64,
    /// Fences waiting for a rail's renewal before they are acknowledged:
    /// (our rail, peer, the peer's rail, sequence).
    renew_acks: Vec<(usize, u64, usize, u64)>,
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
                    nets: if name.is_empty() {
                        Vec::new()
                    } else {
                        interface_nets(&name)
                    },
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
                    renew: false,
                    renew_at: now,
                    renewals: 0,
                    fresh: true,
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
            notes: VecDeque::new(),
            notes_dropped: 0,
            note_buf: Vec::new(),
            topo: None,
            rekeys: HashMap::new(),
            next_key: 1,
            renew_acks: Vec::new(),
        }
    }
    /// Sets the networks rail `i` publishes for pairing (found from its
    /// interface by [`new`](Self::new)); before the address is taken.
    pub fn set_nets(&mut self, i: usize, nets: Vec<RailNet>) {
        if let Some(r) = self.rails.get_mut(i) {
            r.nets = nets;
        }
    }

    /// Prefers, for each region registered from now on, the rails closest
    /// to its memory (see [`Topology`] and the crate documentation).
    /// Ignored with one rail.
    pub fn set_topology(&mut self, topo: Topology) {
        self.topo = Some(topo);
    }

    /// Where each rail's NIC sits, by rail (unknown without a topology).
    pub fn places(&self) -> Vec<Place> {
        (0..self.rails.len())
            .map(|r| {
                self.topo
                    .as_ref()
                    .and_then(|t| t.nics.get(r).cloned())
                    .unwrap_or_default()
            })
            .collect()
    }

    /// The preferred rails (mask `prefer`, 0: none) that may carry a part
    /// to peer `p` with its key `key` now; `None` when none may (or none
    /// is preferred): then every usable rail may.
    fn preferred_usable(&self, prefer: u64, p: &PeerRec<T>, key: &RailsKey<T>) -> Option<u64> {
        let mut m = 0u64;
        for r in 0..self.rails.len().min(64) {
            if prefer & (1 << r) != 0 && self.usable(r, p) && key.has(r) {
                m |= 1 << r;
            }
        }
        (m != 0).then_some(m)
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
            && !self.rails[r].renew
            && p.retry.get(r).is_some_and(Option::is_none)
            && p.conns.get(r).is_some_and(|c| c.is_some())
            && p.fence.get(r).is_some_and(|f| f.is_none())
    }

    /// "name: reason, ..." of the rails to peer `p`.
    fn reasons(&self, p: &PeerRec<T>) -> String {
        self.reasons_with(p, false)
    }

    /// As [`reasons`](Self::reasons); with `fences`, a rail whose fence
    /// the peer has not acknowledged says so.
    fn reasons_with(&self, p: &PeerRec<T>, fences: bool) -> String {
        let mut s = String::new();
        for (i, r) in self.rails.iter().enumerate() {
            if i >= p.conns.len() {
                break;
            }
            if !matches!(p.remote.get(i), Some(Some(_))) {
                // Not paired with a rail of this peer.
                continue;
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
            if fences && p.fence.get(i).is_some_and(Option::is_some) {
                s.push_str(" (no fence ack)");
            }
        }
        s
    }
}
