//! Failover: rails marked down, and tried again after their back-off.

use std::time::Instant;

use kvxfer_core::{Error, Token, Transport};

use crate::{Fence, Flight, RailState, Rails};

impl<T: Transport> Rails<T> {
    /// Marks rail `r` down for `reason`: its posts in flight are abandoned
    /// and their parts queued again; every peer connected on it is asked
    /// for a fence, naming the connection where posts to it were
    /// abandoned (see the crate's "Stale WRITEs").
    pub(crate) fn mark_down(&mut self, r: usize, reason: &str) {
        self.mark_down_for(r, reason, None);
    }

    /// As [`mark_down`](Self::mark_down), for the failure of a part to
    /// peer `failed` (already out of the flights): its fence names the
    /// connection too.
    fn mark_down_for(&mut self, r: usize, reason: &str, failed: Option<u64>) {
        let now = Instant::now();
        let rail = &mut self.rails[r];
        if rail.state != RailState::Down {
            rail.failures += 1;
            rail.fresh = false;
            log::warn!(
                "rails: rail {} down ({reason}); retried in {:?}",
                rail.name,
                rail.backoff
            );
        }
        rail.state = RailState::Down;
        rail.last_error = reason.to_owned();
        rail.retry_at = now + rail.backoff;
        rail.backoff = (rail.backoff * 2).min(self.cfg.backoff_max);
        let ids: Vec<u64> = self.peers.keys().copied().collect();
        for id in ids {
            self.ask_fence(id, r, now, failed == Some(id));
        }
        self.abandon_where(r, |_| true);
    }

    /// Asks peer `id` for a fence of rail `r` if connected on it and none
    /// is pending; it names the connection when posts to the peer are in
    /// flight on it (about to be abandoned) or `failed` (one just failed
    /// on it), else nothing (0).
    fn ask_fence(&mut self, id: u64, r: usize, now: Instant, failed: bool) {
        let busy = failed
            || self
                .flights
                .iter()
                .any(|(k, f)| k.0 == r && !f.ghost && f.peer == id);
        let Some(p) = self.peers.get_mut(&id) else {
            return;
        };
        if p.conns.get(r).is_some_and(|c| c.is_some()) && p.fence[r].is_none() {
            p.fence[r] = Some(Fence {
                seq: self.next_fence,
                asked: now,
                sent: None,
                named: if busy { p.conn_to[r] } else { 0 },
            });
            self.next_fence += 1;
        }
    }

    /// Abandons the posts in flight on rail `r` that `which` selects and
    /// queues their parts again.
    pub(crate) fn abandon_where(&mut self, r: usize, which: impl Fn(&Flight) -> bool) {
        let mine: Vec<u64> = self
            .flights
            .iter()
            .filter(|(k, f)| k.0 == r && !f.ghost && which(f))
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

    /// The connection of rail `r` to peer `id` failed with an error
    /// (`reason`), the rail itself working: a peer that renewed its
    /// rail, say. Only that connection fails over: its posts are
    /// abandoned and issued again, the peer is asked for a fence, and it
    /// is made again after its own back-off. A rail that is probing is
    /// marked down instead.
    pub(crate) fn conn_failed(&mut self, id: u64, r: usize, reason: &str) {
        if self.rails[r].state == RailState::Probing {
            self.mark_down_for(r, reason, Some(id));
            return;
        }
        let Some(p) = self.peers.get(&id) else {
            self.abandon_where(r, |f| f.peer == id);
            return;
        };
        if self.rails[r].state == RailState::Down || p.retry[r].is_some() {
            self.abandon_where(r, |f| f.peer == id);
            return;
        }
        let (name, wait) = (p.name.clone(), p.backoff[r]);
        self.fail_conn(id, r, wait);
        let p = self.peers.get_mut(&id).expect("present");
        p.backoff[r] = (wait * 2).min(self.cfg.backoff_max);
        let rail = &mut self.rails[r];
        rail.failures += 1;
        rail.last_error = format!("to {name}: {reason}");
        log::warn!(
            "rails: rail {} to {name} failed ({reason}); reconnected in {wait:?}",
            rail.name
        );
    }

    /// Fails over rail `r`'s connection to peer `id` alone: a fence naming
    /// it is asked (any part of it may still land), its parts in flight
    /// are abandoned and queued again, and it is made again after `wait`
    /// (see [`retry_conns`](Self::retry_conns)).
    pub(crate) fn fail_conn(&mut self, id: u64, r: usize, wait: std::time::Duration) {
        let now = Instant::now();
        self.ask_fence(id, r, now, true);
        if let Some(p) = self.peers.get_mut(&id) {
            p.retry[r] = Some(now + wait);
        }
        self.abandon_where(r, |f| f.peer == id);
    }

    /// Reconnects the connections that failed on their own
    /// ([`conn_failed`](Self::conn_failed)) once their back-off passed
    /// and the inner transport reported every abandoned post on them.
    fn retry_conns(&mut self, now: Instant) {
        let due: Vec<(u64, usize)> = self
            .peers
            .iter()
            .flat_map(|(&id, p)| {
                p.retry
                    .iter()
                    .enumerate()
                    .filter(move |(_, t)| t.is_some_and(|t| now >= t))
                    .map(move |(r, _)| (id, r))
            })
            .collect();
        for (id, r) in due {
            let rail = &self.rails[r];
            let ghosts = self
                .flights
                .iter()
                .any(|(k, f)| k.0 == r && f.ghost && f.peer == id);
            if rail.state == RailState::Down || rail.renew || ghosts {
                continue;
            }
            let result = self.reconnect(id, r);
            let p = self.peers.get_mut(&id).expect("present");
            match result {
                Ok(()) => self.hello(id, r),
                Err(e) => {
                    let wait = p.backoff[r];
                    p.retry[r] = Some(now + wait);
                    p.backoff[r] = (wait * 2).min(self.cfg.backoff_max);
                    self.rails[r].last_error = format!("reconnect: {e}");
                }
            }
        }
    }

    /// Renews rail `r`'s inner transport: every connection on it is reset
    /// first (see [`Transport::renew`]).
    pub(crate) fn renew_rail(&mut self, r: usize) -> Result<(), Error> {
        let ids: Vec<u64> = self.peers.keys().copied().collect();
        for id in ids {
            self.drop_conn(id, r);
        }
        let rail = &mut self.rails[r];
        rail.t.renew()?;
        rail.renewals += 1;
        rail.fresh = true;
        log::info!("rails: rail {} renewed", rail.name);
        Ok(())
    }

    /// Marks down rails whose oldest part is overdue, and reconnects down
    /// rails whose back-off has passed.
    pub(crate) fn check_rails(&mut self) {
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
        self.retry_conns(now);
        for r in 0..self.rails.len() {
            let rail = &self.rails[r];
            if rail.state != RailState::Down || rail.ghosts > 0 || rail.renew || now < rail.retry_at
            {
                continue;
            }
            // Reconnect every peer on this rail; the old connections have no
            // operation left in the inner transport. Where a reset leaves
            // them open, from a renewed one, once per failure: the new
            // connections are then never matched against the half-closed
            // old ones (UCX 1.13's tcp crashed on that), and what the old
            // ones still receive is refused.
            if self.rails[r].t.needs_renew() && !self.rails[r].fresh {
                if let Err(e) = self.renew_rail(r) {
                    let rail = &mut self.rails[r];
                    rail.last_error = format!("renew: {e}");
                    rail.retry_at = now + rail.backoff;
                    rail.backoff = (rail.backoff * 2).min(self.cfg.backoff_max);
                    continue;
                }
            }
            let mut ok = true;
            let ids: Vec<u64> = self.peers.keys().copied().collect();
            for id in ids {
                if let Err(e) = self.reconnect(id, r) {
                    ok = false;
                    self.rails[r].last_error = format!("reconnect: {e}");
                }
            }
            let rail = &mut self.rails[r];
            if ok {
                log::info!("rails: probing rail {}", rail.name);
                rail.state = RailState::Probing;
                for p in self.peers.values_mut() {
                    p.retry[r] = None;
                }
            } else {
                rail.retry_at = now + rail.backoff;
                rail.backoff = (rail.backoff * 2).min(self.cfg.backoff_max);
            }
        }
    }

    /// Connects rail `r` to peer `id` anew (to the address of the peer's
    /// rail paired with it), after resetting its old connection (nothing
    /// queued on it is delivered any more); keys unpacked on the old one
    /// are unpacked again when next used. Nothing for a rail not paired
    /// with one of the peer's.
    pub(crate) fn reconnect(&mut self, id: u64, r: usize) -> Result<(), Error> {
        if !self.drop_conn(id, r) {
            return Ok(());
        }
        let p = self.peers.get_mut(&id).expect("present");
        let addr = p.addrs[r].as_ref().expect("paired");
        p.conns[r] = Some(self.rails[r].t.connect(addr)?);
        p.conn_to[r] = crate::addr_hash(addr);
        p.retry[r] = None;
        Ok(())
    }

    /// Resets rail `r`'s connection to peer `id`, if any (nothing queued
    /// on it is delivered any more); false when the peer has no such rail
    /// or it is not paired with one of the peer's.
    pub(crate) fn drop_conn(&mut self, id: u64, r: usize) -> bool {
        let Some(p) = self.peers.get_mut(&id) else {
            return false;
        };
        if r >= p.conns.len() || p.addrs.get(r).map_or(true, Option::is_none) {
            return false;
        }
        if let Some(old) = p.conns[r].take() {
            self.rails[r].t.reset(old);
        }
        p.gen[r] += 1;
        true
    }
}
