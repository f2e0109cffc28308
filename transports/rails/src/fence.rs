//! Fences: after a rail fails, the peer closes its end of that rail's
//! connection before a transfer to it completes (see the crate's "Stale
//! WRITEs").

use std::time::{Duration, Instant};

use kvxfer_core::{Error, Token, Transport};

use crate::{PeerRec, RailState, Rails};

/// Notifications kept for the caller at most; more are dropped and
/// reported as [`Error::NotificationDropped`].
const NOTES_MAX: usize = 4096;

/// Prefix of a fence request: "close your connection on rail R".
const FENCE: &[u8; 4] = b"KVF2";
/// Prefix of a fence acknowledgement.
const FENCE_ACK: &[u8; 4] = b"KVA2";

/// A fence request or acknowledgement: its kind, the asking side's rail,
/// its sequence number, the hash of the address the failed connection
/// was made to (a request's; 0 in an acknowledgement), the sender's
/// current address of its rail (the asking side's rail in a request,
/// the rail paired with it in an acknowledgement; inner transports that
/// renew change it) with how often that rail was renewed (a late message
/// with an older address is told apart), and the sender's agent name.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Control<'a> {
    pub(crate) kind: [u8; 4],
    pub(crate) rail: usize,
    pub(crate) seq: u64,
    pub(crate) named: u64,
    pub(crate) renewals: u64,
    pub(crate) addr: &'a [u8],
    pub(crate) agent: &'a str,
}

impl Control<'_> {
    /// Its bytes: kind, rail (u32), sequence (u64), named (u64),
    /// renewals (u64), address length (u32), address, agent name; little
    /// endian.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut m = self.kind.to_vec();
        m.extend_from_slice(&(self.rail as u32).to_le_bytes());
        m.extend_from_slice(&self.seq.to_le_bytes());
        m.extend_from_slice(&self.named.to_le_bytes());
        m.extend_from_slice(&self.renewals.to_le_bytes());
        m.extend_from_slice(&(self.addr.len() as u32).to_le_bytes());
        m.extend_from_slice(self.addr);
        m.extend_from_slice(self.agent.as_bytes());
        m
    }

    /// Reads one; `None` if `m` is not a fence request or acknowledgement.
    pub(crate) fn parse(m: &[u8]) -> Option<Control<'_>> {
        if m.len() < 36 || (&m[..4] != FENCE && &m[..4] != FENCE_ACK) {
            return None;
        }
        let u32_at = |i: usize| m[i..i + 4].try_into().ok().map(u32::from_le_bytes);
        let u64_at = |i: usize| m[i..i + 8].try_into().ok().map(u64::from_le_bytes);
        let len = u32_at(32)? as usize;
        let addr = m.get(36..36usize.checked_add(len)?)?;
        Some(Control {
            kind: m[..4].try_into().ok()?,
            rail: u32_at(4)? as usize,
            seq: u64_at(8)?,
            named: u64_at(16)?,
            renewals: u64_at(24)?,
            addr,
            agent: std::str::from_utf8(&m[36 + len..]).ok()?,
        })
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
    pub(crate) fn send_fences(&mut self) {
        let now = Instant::now();
        let mut todo = Vec::new();
        for (&id, p) in &self.peers {
            for (r, f) in p.fence.iter().enumerate() {
                if let Some(f) = f {
                    if f.sent.is_none_or_late(now) {
                        todo.push((id, r, f.seq));
                    }
                }
            }
        }
        for (id, r, seq) in todo {
            let named = self
                .peers
                .get(&id)
                .and_then(|p| p.fence[r])
                .map_or(0, |f| f.named);
            let addr = self.inner_address(r);
            let msg = Control {
                kind: *FENCE,
                rail: r,
                seq,
                named,
                renewals: self.rails[r].renewals,
                addr: &addr,
                agent: &self.agent,
            }
            .encode();
            if self.send_control(id, r, &msg) {
                if let Some(f) = self.peers.get_mut(&id).and_then(|p| p.fence[r].as_mut()) {
                    f.sent = Some(now);
                }
            }
        }
    }

    /// Whether the fences asked of peer `p` have failed: no rail can carry
    /// them to it (every rail to it down), or one is unacknowledged three
    /// rail timeouts after it was asked (a dead or stalled peer; a live
    /// one answers at once). Requests waiting for them then fail.
    pub(crate) fn fence_failed(&self, p: &PeerRec<T>, now: Instant) -> bool {
        let reachable = (0..self.rails.len()).any(|r| {
            self.rails[r].state != RailState::Down && p.conns.get(r).is_some_and(|c| c.is_some())
        });
        let limit = self.cfg.rail_timeout * 3;
        !reachable
            || p.fence
                .iter()
                .flatten()
                .any(|f| now.duration_since(f.asked) > limit)
    }

    /// Fails the requests waiting for fences that have failed.
    pub(crate) fn check_fences(&mut self) {
        if !self
            .peers
            .values()
            .any(|p| p.fence.iter().any(Option::is_some))
        {
            return;
        }
        let waiting: Vec<Token> = self
            .reqs
            .iter()
            .filter(|(_, q)| q.left == 0 && q.ghosts == 0)
            .map(|(&t, _)| t)
            .collect();
        for t in waiting {
            self.maybe_finish(t);
        }
    }

    /// Takes the notifications the rails received: fence requests and
    /// acknowledgements are handled at once (a transfer waiting for an
    /// acknowledgement must not depend on the caller taking
    /// notifications), the others are kept for
    /// [`poll_notification`](Transport::poll_notification).
    pub(crate) fn take_notes(&mut self) {
        if self.note_buf.is_empty() {
            let cap = self
                .rails
                .iter()
                .map(|r| r.t.capabilities().max_notification as usize)
                .max()
                .unwrap_or(0);
            self.note_buf = vec![0u8; cap.max(4096)];
        }
        let mut buf = std::mem::take(&mut self.note_buf);
        for r in 0..self.rails.len() {
            while let Some(x) = self.rails[r].t.poll_notification(&mut buf) {
                let keep = match &x {
                    Ok(len) => *len,
                    // Left queued in the rail: the caller's buffer decides.
                    Err(Error::BufferTooSmall { .. }) => break,
                    Err(Error::NotificationDropped { len, .. }) => *len as usize,
                    Err(_) => 0,
                };
                let m = buf[..keep.min(buf.len())].to_vec();
                if x.is_ok() && self.on_control(&m, r) {
                    continue;
                }
                if self.notes.len() >= NOTES_MAX {
                    self.notes_dropped += 1;
                    continue;
                }
                self.notes.push_back((x, m));
            }
        }
        self.note_buf = buf;
    }

    /// The next notification [`take_notes`](Self::take_notes) kept, copied
    /// into `buf`.
    pub(crate) fn next_note(&mut self, buf: &mut [u8]) -> Option<Result<usize, Error>> {
        let Some((x, m)) = self.notes.front() else {
            if self.notes_dropped > 0 {
                let count = std::mem::take(&mut self.notes_dropped);
                return Some(Err(Error::NotificationDropped { len: 0, count }));
            }
            return None;
        };
        if x.is_ok() && m.len() > buf.len() {
            return Some(Err(Error::BufferTooSmall {
                needed: m.len() as u64,
                available: buf.len() as u64,
            }));
        }
        let (x, m) = self.notes.pop_front().expect("present");
        let n = m.len().min(buf.len());
        buf[..n].copy_from_slice(&m[..n]);
        Some(match x {
            Ok(_) => Ok(n),
            Err(Error::NotificationDropped { count, .. }) => Err(Error::NotificationDropped {
                len: n as u64,
                count,
            }),
            Err(e) => Err(e),
        })
    }

    /// Rail `r`'s inner address now (empty if it cannot be read).
    pub(crate) fn inner_address(&self, r: usize) -> Vec<u8> {
        let mut buf = vec![0u8; 4096];
        match self.rails.get(r).map(|x| x.t.local_address(&mut buf)) {
            Some(Ok(n)) => {
                buf.truncate(n);
                buf
            }
            _ => Vec::new(),
        }
    }

    /// Takes `addr` as peer `id`'s address of the rail paired with our
    /// rail `l` after it renewed that rail `renewals` times: connections
    /// made from now on go there. An empty one, or one older than the
    /// address known, is ignored.
    fn learn_address(&mut self, id: u64, l: usize, addr: &[u8], renewals: u64) {
        let Some(p) = self.peers.get_mut(&id) else {
            return;
        };
        let Some(&known) = p.addr_renewals.get(l) else {
            return;
        };
        if renewals < known || addr.is_empty() {
            return;
        }
        // The highest count seen, also with an address already known: a
        // late message with an older one is then told apart.
        p.addr_renewals[l] = renewals;
        let Some(Some(old)) = p.addrs.get_mut(l) else {
            return;
        };
        if old.as_slice() == addr {
            return;
        }
        let newer = renewals > known;
        log::info!(
            "rails: the peer's rail paired with {} has a new address",
            self.rails[l].name
        );
        *old = addr.to_vec();
        // A connection to another address is made again to this one, at
        // once; what is in flight on it is abandoned. Where the peer
        // renewed the rail since (a higher count), the old address's
        // worker is gone and nothing of it can land; else with a fence
        // naming it (the address may be the older one).
        let p = self.peers.get_mut(&id).expect("present");
        let rail = &self.rails[l];
        if p.conns[l].is_some()
            && p.conn_to[l] != crate::addr_hash(addr)
            && rail.state != RailState::Down
            && !rail.renew
        {
            if newer {
                p.retry[l] = Some(Instant::now());
                self.abandon_where(l, |f| f.peer == id);
            } else {
                self.fail_conn(id, l, Duration::ZERO);
            }
        }
    }

    /// Handles a fence request or acknowledgement that arrived on rail
    /// `via`; false if `m` is neither.
    pub(crate) fn on_control(&mut self, m: &[u8], via: usize) -> bool {
        let Some(c) = Control::parse(m) else {
            return false;
        };
        let Some((&id, _)) = self.peers.iter().find(|(_, p)| p.name == c.agent) else {
            return true;
        };
        let (r, seq, fence) = (c.rail, c.seq, &c.kind == FENCE);
        // A fence names the asking side's rail r: ours is the one paired
        // with it (an acknowledgement names our own rail).
        let mine = if fence {
            self.peers[&id].remote.iter().position(|&j| j == Some(r))
        } else {
            Some(r).filter(|&r| r < self.rails.len())
        };
        if let Some(l) = mine {
            self.learn_address(id, l, c.addr, c.renewals);
        }
        // Acknowledged once our rail is renewed (see check_renewals).
        let mut later = false;
        if fence {
            if let Some(l) = mine {
                later = self.fence_renews(id, l, &c);
                // Reset our connection on the rail paired with the peer's
                // rail r (bytes still on their way over it are then
                // refused) and acknowledge (naming the peer's rail r). A
                // new one is opened once the peer is heard from over that
                // rail (below): opened now, it would race the peer's own
                // reconnection of the rail, which UCX 1.13's tcp did not
                // survive (a crash in uct_tcp_iface_progress).
                let p = self.peers.get_mut(&id).expect("found");
                if !later && p.served[l] < seq {
                    p.served[l] = seq;
                    // Our own parts to the peer on that connection go
                    // with it: fenced and issued again, as after a failure.
                    let busy = self
                        .flights
                        .iter()
                        .any(|(k, f)| k.0 == l && !f.ghost && f.peer == id);
                    if busy {
                        self.fail_conn(id, l, self.cfg.backoff_min);
                    }
                    self.drop_conn(id, l);
                    // Over UCX, not before the peer is heard from over
                    // it (see above): this end of it was not renewed.
                    if !self.rails[l].t.needs_renew() {
                        self.retry_later(id, l);
                    }
                }
            }
        }
        // Heard from over rail `via`: the peer's connection on it works, so
        // ours, closed by a fence (or never made), is opened again; not the
        // rail this fence closes, which the peer is reconnecting: ours
        // opens when the peer is next heard from over it.
        let lost = self.peers[&id].conns.get(via).is_some_and(Option::is_none);
        if lost && !self.rails[via].renew && !(fence && mine == Some(via)) {
            if let Err(e) = self.reconnect(id, via) {
                log::debug!("rails: reconnect rail {via} to {}: {e}", c.agent);
            }
        }
        if fence {
            if !later {
                self.ack_fence(id, r, seq, mine, Some(via));
            }
        } else {
            let p = self.peers.get_mut(&id).expect("found");
            if p.fence
                .get(r)
                .is_some_and(|f| f.is_some_and(|f| f.seq == seq))
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

    /// Whether the fence `c` of peer `id`, for our rail `l`, waits for
    /// that rail's renewal: its inner transport's reset leaves bytes
    /// deliverable ([`Transport::needs_renew`]) and the fence names the
    /// address the rail has now (a connection made to an address renewed
    /// since is closed already). The rail then carries nothing more, its
    /// parts in flight are abandoned (and issued again elsewhere), and
    /// it is renewed once the inner transport has let go of them.
    fn fence_renews(&mut self, id: u64, l: usize, c: &Control<'_>) -> bool {
        if !self.rails[l].t.needs_renew() || c.named != crate::addr_hash(&self.inner_address(l)) {
            return false;
        }
        let entry = (l, id, c.rail, c.seq);
        if !self.renew_acks.contains(&entry) {
            self.renew_acks.push(entry);
        }
        if !self.rails[l].renew {
            self.rails[l].renew = true;
            self.rails[l].renew_at = Instant::now();
            if self.rails[l].posts > 0 {
                self.mark_down(l, &format!("renewed for a fence of {}", c.agent));
            }
        }
        true
    }

    /// Tells peer `id`, over rail `r` itself, that the rail works from us
    /// to it, with our current address of it: an acknowledgement of no
    /// fence (sequence 0). The peer then opens its end of the rail again
    /// if a fence had closed it, and takes the address.
    pub(crate) fn hello(&mut self, id: u64, r: usize) {
        let Some(p) = self.peers.get(&id) else {
            return;
        };
        let (Some(Some(conn)), Some(Some(j))) = (p.conns.get(r), p.remote.get(r)) else {
            return;
        };
        let addr = self.inner_address(r);
        let m = Control {
            kind: *FENCE_ACK,
            rail: *j,
            seq: 0,
            named: 0,
            renewals: self.rails[r].renewals,
            addr: &addr,
            agent: &self.agent,
        }
        .encode();
        if let Err(e) = self.rails[r].t.send_notification(conn, &m) {
            log::debug!("rails: hello over {}: {e}", self.rails[r].name);
        }
    }

    /// Makes rail `l`'s connection to peer `id`, closed for its fence, again
    /// after the shortest back-off unless the peer is heard from over that
    /// rail first (see [`on_control`](Self::on_control)), so that the rail
    /// carries from us to it again even if it never sends over it.
    fn retry_later(&mut self, id: u64, l: usize) {
        let at = Instant::now() + self.cfg.backoff_min;
        if let Some(p) = self.peers.get_mut(&id) {
            if p.conns.get(l).is_some_and(Option::is_none) && p.retry[l].is_none() {
                p.retry[l] = Some(at);
            }
        }
    }

    /// Acknowledges fence `seq` of peer `id` for its rail `r` (ours:
    /// `mine`), with our current address of that rail: first over `via`,
    /// the rail the request came by (it works from the peer to us, while
    /// another rail that looks up here may be the one whose link is cut,
    /// its failure not noticed yet, as the peer did); else over any
    /// working rail. An acknowledgement lost anyway is asked again.
    fn ack_fence(&mut self, id: u64, r: usize, seq: u64, mine: Option<usize>, via: Option<usize>) {
        let addr = mine.map(|l| self.inner_address(l)).unwrap_or_default();
        let ack = Control {
            kind: *FENCE_ACK,
            rail: r,
            seq,
            named: 0,
            renewals: mine.map_or(0, |l| self.rails[l].renewals),
            addr: &addr,
            agent: &self.agent,
        }
        .encode();
        let Some(p) = self.peers.get(&id) else {
            return;
        };
        let mut sent = false;
        if let Some(via) = via.filter(|&v| mine != Some(v) && self.usable(v, p)) {
            let conn = p.conns[via].as_ref().expect("usable");
            sent = self.rails[via].t.send_notification(conn, &ack).is_ok();
        }
        if !sent && !self.send_control(id, mine.unwrap_or(0), &ack) {
            log::warn!(
                "rails: no rail to acknowledge a fence of {}",
                self.peers[&id].name
            );
        }
    }

    /// Renews the rails whose renewal a fence asked for, once they carry
    /// nothing (no part in flight, every abandoned one reported): every
    /// connection on the rail is reset, the inner transport renewed, and
    /// the fences acknowledged with the rail's new address. The other
    /// peers are connected again at once (their addresses have not
    /// changed) unless the rail is down, when its back-off does that; the
    /// peers that asked, when they are next heard from over the rail.
    pub(crate) fn check_renewals(&mut self) {
        let now = Instant::now();
        for l in 0..self.rails.len() {
            let rail = &self.rails[l];
            if !rail.renew || rail.posts > 0 || rail.ghosts > 0 || now < rail.renew_at {
                continue;
            }
            let ids: Vec<u64> = self.peers.keys().copied().collect();
            if let Err(e) = self.renew_rail(l) {
                let rail = &mut self.rails[l];
                log::warn!("rails: renewing rail {}: {e}", rail.name);
                rail.last_error = format!("renew: {e}");
                rail.renew_at = now + Duration::from_secs(1);
                continue;
            }
            self.rails[l].renew = false;
            let (acks, rest): (Vec<_>, Vec<_>) = self.renew_acks.drain(..).partition(|a| a.0 == l);
            self.renew_acks = rest;
            for &(l, id, r, seq) in &acks {
                if let Some(p) = self.peers.get_mut(&id) {
                    p.served[l] = p.served[l].max(seq);
                }
                self.ack_fence(id, r, seq, Some(l), None);
                self.retry_later(id, l);
            }
            if self.rails[l].state == RailState::Down {
                continue;
            }
            for id in ids {
                if acks.iter().any(|a| a.1 == id) {
                    continue;
                }
                match self.reconnect(id, l) {
                    // Tells the peer the new address over the rail itself.
                    Ok(()) => self.hello(id, l),
                    Err(e) => log::debug!(
                        "rails: reconnect rail {} after renewal: {e}",
                        self.rails[l].name
                    ),
                }
            }
        }
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

#[cfg(test)]
mod tests {
    use super::{Control, FENCE, FENCE_ACK};

    #[test]
    fn control_messages_round_trip() {
        let c = Control {
            kind: *FENCE,
            rail: 3,
            seq: 42,
            named: 0xdead_beef_0123,
            renewals: 2,
            addr: b"worker-address",
            agent: "prefill-0",
        };
        let m = c.encode();
        assert_eq!(Control::parse(&m), Some(c));
        let ack = Control {
            kind: *FENCE_ACK,
            rail: 0,
            seq: 1,
            named: 0,
            renewals: 0,
            addr: b"",
            agent: "d",
        };
        assert_eq!(Control::parse(&ack.encode()), Some(ack));
        // Truncated, an address running past the end, another prefix.
        assert_eq!(Control::parse(&m[..35]), None);
        let mut long = m.clone();
        long[32..36].copy_from_slice(&1000u32.to_le_bytes());
        assert_eq!(Control::parse(&long), None);
        let mut other = m.clone();
        other[..4].copy_from_slice(b"KVRF");
        assert_eq!(Control::parse(&other), None);
        assert_eq!(Control::parse(b"hello, a user notification"), None);
    }
}
