//! The agent's own keepalive for peers served by the backend (not by
//! cross-memory attach): while transfers to such a peer are in flight and
//! nothing from it has completed for a while, a one-byte READ of its first
//! host-memory region probes it. A peer that answers neither the probe nor
//! any transfer within the keepalive timeout is declared unreachable
//! ([`Engine::fail_peer`](kvxfer_core::Engine::fail_peer)): its transfers
//! fail with `RemoteDisconnected` naming it, and later posts are refused
//! until it is loaded again.

use std::collections::HashMap;
use std::time::Duration;

use kvxfer_core::engine::XferHandle;
use kvxfer_core::error::Name;
use kvxfer_core::{Desc, Ended, Instant, MemKind, Region, Transport, XferOp, XferState};

use crate::agent::AgentEngine;

/// Bytes of the buffer probes read into.
const PROBE_BUF: usize = 64;

/// One peer's probe: a prepared READ, re-posted.
struct Probe {
    handle: XferHandle,
    /// When it was last posted (`None`: prepared, never posted).
    sent_at: Option<Instant>,
    in_flight: bool,
}

/// Keepalive state of one agent.
pub(crate) struct Keepalive {
    timeout_ns: u64,
    interval_ns: u64,
    next_check: Instant,
    /// Address of the probe buffer, made on first use. It is never freed:
    /// a probe abandoned in a library may still write into it.
    buf: Option<u64>,
    registered: bool,
    probes: HashMap<Name, Probe>,
    /// Reused list of peers to visit, so that a check allocates nothing
    /// once the agent has seen its peers.
    busy: Vec<Name>,
}

impl Keepalive {
    /// A keepalive declaring a peer unreachable after `timeout` without an
    /// answer; `None` when `timeout` is zero (off).
    pub(crate) fn new(timeout: Duration) -> Option<Keepalive> {
        let timeout_ns = u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX);
        (timeout_ns > 0).then(|| Keepalive {
            timeout_ns,
            // Probe four times per timeout, so that one lost to a busy link
            // still leaves room for the next.
            interval_ns: (timeout_ns / 4).max(1_000_000),
            next_check: Instant::from_nanos(0),
            buf: None,
            registered: false,
            probes: HashMap::new(),
            busy: Vec::new(),
        })
    }

    /// Checks the peers with transfers in flight: collects finished
    /// probes, posts new ones, and fails peers silent for the timeout.
    /// `near` tells peers served by cross-memory attach (watched by their
    /// pidfds instead). Each transfer failed is handed to `ended`
    /// ([`Engine::fail_peer_with`](kvxfer_core::Engine::fail_peer_with)).
    /// Returns how many transfers failed.
    pub(crate) fn check<T: Transport>(
        &mut self,
        e: &mut AgentEngine<T>,
        now: Instant,
        near: impl Fn(&AgentEngine<T>, &str) -> bool,
        mut ended: impl FnMut(Ended<'_>),
    ) -> usize {
        if now < self.next_check {
            return 0;
        }
        self.next_check = Instant::from_nanos(now.nanos.saturating_add(self.interval_ns / 4));
        self.busy.clear();
        self.busy.extend(
            e.busy_peers()
                .filter(|p| !near(e, p))
                .map(|p| Name::try_from(p).unwrap_or_default()),
        );
        // Probes of peers no longer busy: collect the finished ones.
        self.probes.retain(|_, probe| {
            if probe.in_flight {
                match e.state(probe.handle) {
                    Ok(XferState::InProgress) => return true,
                    Ok(_) => probe.in_flight = false,
                    Err(_) => return false,
                }
            }
            true
        });
        let mut failed = 0;
        let busy = std::mem::take(&mut self.busy);
        for peer in &busy {
            failed += self.check_peer(e, peer, now, &mut ended);
        }
        self.busy = busy;
        failed
    }

    fn check_peer<T: Transport>(
        &mut self,
        e: &mut AgentEngine<T>,
        peer: &Name,
        now: Instant,
        ended: &mut impl FnMut(Ended<'_>),
    ) -> usize {
        let Ok(activity) = e.peer_activity(peer) else {
            return 0;
        };
        if activity.failed {
            return 0;
        }
        // Prepared (buffer registered, READ built) the first time the peer
        // is busy, so that the first probe, sent when the peer has been
        // silent a while (a slow transfer, a loaded host), only posts and
        // allocates nothing on the thread polling the transfers.
        if !self.probes.contains_key(peer) {
            self.prepare(e, peer);
        }
        let silent_for = activity
            .heard_at
            .map_or(0, |t| now.saturating_nanos_since(t));
        match self.probes.get(peer) {
            Some(p) if p.in_flight => {
                // Silent for the timeout, with a probe out long enough to
                // have had its answer.
                if silent_for >= self.timeout_ns
                    && p.sent_at.map_or(0, |t| now.saturating_nanos_since(t)) >= self.interval_ns
                {
                    log::warn!(
                        "{}: peer {peer:?} answered neither a keepalive probe nor a transfer for {} ms; failing its transfers",
                        e.name(),
                        silent_for / 1_000_000
                    );
                    return e.fail_peer_with(peer, now, ended).unwrap_or(0);
                }
                0
            }
            Some(Probe {
                sent_at: Some(t), ..
            }) if now.saturating_nanos_since(*t) < self.interval_ns => 0,
            _ if silent_for < self.interval_ns => 0,
            _ => {
                self.probe(e, peer, now);
                0
            }
        }
    }

    /// Posts `peer`'s probe, preparing it first if needed.
    fn probe<T: Transport>(&mut self, e: &mut AgentEngine<T>, peer: &Name, now: Instant) {
        for _ in 0..2 {
            if !self.probes.contains_key(peer) && !self.prepare(e, peer) {
                return;
            }
            let Some(p) = self.probes.get_mut(peer) else {
                return;
            };
            match e.post(p.handle, now) {
                Ok(state) => {
                    p.in_flight = state == XferState::InProgress;
                    p.sent_at = Some(now);
                    return;
                }
                // Reloaded or released: prepare it again (once).
                Err(_) => {
                    let _ = e.release(p.handle);
                    self.probes.remove(peer);
                }
            }
        }
    }

    /// Prepares `peer`'s probe (not posted); whether it could.
    fn prepare<T: Transport>(&mut self, e: &mut AgentEngine<T>, peer: &Name) -> bool {
        let Some(target) = e
            .remote_regions(peer)
            .ok()
            .and_then(|mut r| r.find(|r| r.kind == MemKind::Dram))
        else {
            // Nothing to read: no transfer of ours can reach it either.
            return false;
        };
        let Some(buf) = self.buffer(e) else {
            return false;
        };
        let prepared = e.prepare(
            XferOp::Read,
            &[Desc::new(buf, 1)],
            &[Desc::new(target.addr, 1)],
            peer,
            None,
        );
        match prepared {
            Ok(handle) => {
                self.probes.insert(
                    peer.clone(),
                    Probe {
                        handle,
                        sent_at: None,
                        in_flight: false,
                    },
                );
                true
            }
            Err(err) => {
                log::debug!("{}: keepalive probe of {peer:?}: {err}", e.name());
                false
            }
        }
    }

    /// The probe buffer's address, registering it on first use.
    fn buffer<T: Transport>(&mut self, e: &mut AgentEngine<T>) -> Option<u64> {
        let addr = *self.buf.get_or_insert_with(|| {
            let buf: &'static mut [u8; PROBE_BUF] = Box::leak(Box::new([0u8; PROBE_BUF]));
            buf.as_mut_ptr() as u64
        });
        if !self.registered {
            match e.register(Region::dram(addr, PROBE_BUF as u64)) {
                Ok(()) => self.registered = true,
                Err(err) => log::warn!("{}: keepalive probe buffer: {err}", e.name()),
            }
        }
        self.registered.then_some(addr)
    }
}
