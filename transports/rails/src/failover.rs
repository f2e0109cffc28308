//! Failover: rails marked down, and tried again after their back-off.

use std::time::Instant;

use kvxfer_core::{Error, Token, Transport};

use crate::{Fence, RailState, Rails};

impl<T: Transport> Rails<T> {
    /// Marks rail `r` down for `reason`: its posts in flight are abandoned
    /// and their parts queued again.
    pub(crate) fn mark_down(&mut self, r: usize, reason: &str) {
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
                p.fence[r] = Some(Fence {
                    seq: self.next_fence,
                    asked: now,
                    sent: None,
                    named: p.conn_to[r],
                });
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
        for r in 0..self.rails.len() {
            let rail = &self.rails[r];
            if rail.state != RailState::Down || rail.ghosts > 0 || rail.renew || now < rail.retry_at
            {
                continue;
            }
            // Reconnect every peer on this rail; the old connections have no
            // operation left in the inner transport.
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
