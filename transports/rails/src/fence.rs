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
            let msg = control(FENCE, r, seq, &self.agent);
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

    /// Handles a fence request or acknowledgement that arrived on rail
    /// `via`; false if `m` is neither.
    pub(crate) fn on_control(&mut self, m: &[u8], via: usize) -> bool {
        let Some((kind, r, seq, from)) = parse_control(m) else {
            return false;
        };
        let Some((&id, _)) = self.peers.iter().find(|(_, p)| p.name == from) else {
            return true;
        };
        // A fence names the asking side's rail r: ours is the one paired
        // with it (an acknowledgement names our own rail).
        let mine = if kind == FENCE {
            self.peers[&id].remote.iter().position(|&j| j == Some(r))
        } else {
            None
        };
        if kind == FENCE {
            // Reset our connection on the rail paired with the peer's rail
            // r (bytes still on their way over it are then refused) and
            // acknowledge (naming the peer's rail r). A new one is opened
            // once the peer is heard from over that rail (below): opened
            // now, it would race the peer's own reconnection of the rail,
            // which UCX 1.13's tcp did not survive (a crash in
            // uct_tcp_iface_progress).
            let p = self.peers.get_mut(&id).expect("found");
            if let Some(l) = mine.filter(|&l| p.served[l] < seq) {
                p.served[l] = seq;
                self.drop_conn(id, l);
            }
        }
        // Heard from over rail `via`: the peer's connection on it works, so
        // ours, closed by a fence (or never made), is opened again; not the
        // rail this fence closes, which the peer is reconnecting: ours
        // opens when the peer is next heard from over it.
        let lost = self.peers[&id].conns.get(via).is_some_and(Option::is_none);
        if lost && !(kind == FENCE && mine == Some(via)) {
            if let Err(e) = self.reconnect(id, via) {
                log::debug!("rails: reconnect rail {via} to {from}: {e}");
            }
        }
        if kind == FENCE {
            // First on the rail the request came by: it works from the
            // peer to us, while another rail that looks up here may be the
            // one whose link is cut (its failure not noticed yet, as the
            // peer did). An acknowledgement lost anyway is asked again.
            let ack = control(FENCE_ACK, r, seq, &self.agent);
            let p = self.peers.get(&id).expect("found");
            let sent = mine != Some(via) && self.usable(via, p) && {
                let conn = p.conns[via].as_ref().expect("usable");
                self.rails[via].t.send_notification(conn, &ack).is_ok()
            };
            if !sent && !self.send_control(id, mine.unwrap_or(0), &ack) {
                log::warn!("rails: no rail to acknowledge a fence of {from}");
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
}

trait Late {
    fn is_none_or_late(&self, now: Instant) -> bool;
}

impl Late for Option<Instant> {
    fn is_none_or_late(&self, now: Instant) -> bool {
        self.map_or(true, |t| now.duration_since(t) > Duration::from_secs(1))
    }
}
