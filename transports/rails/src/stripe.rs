//! Striping: parts queued, issued on the rail with the fewest bytes in
//! flight, completed, and requests ended.

use std::time::Instant;

use kvxfer_core::{Completion, Error, PostStatus, Segment, Segments, Token, Transport};

use crate::{Flight, RailState, Rails};

impl<T: Transport> Rails<T> {
    /// Ends request `tok` if every part is done and no abandoned attempt
    /// is outstanding: sends its notification, then reports it. While a
    /// fence to its peer is not acknowledged it waits, or fails when the
    /// fence has failed (see [`fence_failed`](Self::fence_failed)).
    pub(crate) fn maybe_finish(&mut self, tok: Token) {
        let Some(q) = self.reqs.get(&tok) else {
            return;
        };
        if q.left > 0 || q.ghosts > 0 {
            return;
        }
        // Bytes of abandoned WRITEs may still reach the peer over a
        // connection it has not closed yet: wait for its fences.
        if let Some(p) = self.peers.get(&q.peer) {
            if p.fence.iter().any(Option::is_some) {
                if !self.fence_failed(p, Instant::now()) {
                    return;
                }
                // Nothing of this request is in flight any more; the
                // remote bytes are undefined, as after any failed WRITE.
                let err = Error::rails_failed(&p.name, &self.reasons_with(p, true));
                self.reqs.remove(&tok);
                self.done.push_back(Completion {
                    token: tok,
                    result: Err(err),
                });
                return;
            }
        }
        let q = self.reqs.remove(&tok).expect("present");
        let mut result = Ok(());
        if let Some(msg) = q.note.as_deref() {
            // On a rail the data took, where the region prefers some.
            let prefer = q.parts.first().map_or(0, |p| p.local.preferred());
            result = self.notify_peer(q.peer, msg, prefer);
        }
        self.done.push_back(Completion { token: tok, result });
    }

    /// Sends `msg` to peer `id` on the first rail that takes it: up rails
    /// first, of them those in the mask `prefer` first.
    pub(crate) fn notify_peer(&mut self, id: u64, msg: &[u8], prefer: u64) -> Result<(), Error> {
        let Some(p) = self.peers.get(&id) else {
            return Err(Error::disconnected(""));
        };
        let mut order: Vec<usize> = (0..self.rails.len())
            .filter(|&r| self.usable(r, p))
            .collect();
        let preferred = |r: usize| r < 64 && prefer & (1 << r) != 0;
        order.sort_by_key(|&r| (self.rails[r].state != RailState::Up, !preferred(r)));
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
    pub(crate) fn pump(&mut self) {
        while let Some(&(tok, first)) = self.queue.front() {
            let Some(q) = self.reqs.get(&tok) else {
                self.queue.pop_front();
                continue;
            };
            let Some(p) = self.peers.get(&q.peer) else {
                self.fail_stranded();
                continue;
            };
            // The usable rail with room and the fewest bytes in flight,
            // among the preferred rails of the part's region if one of
            // them is usable.
            let n = self.rails.len();
            let part = &q.parts[first as usize];
            let only = self.preferred_usable(part.local.preferred(), p, &part.remote);
            let mut best: Option<usize> = None;
            let mut any = false;
            for k in 0..n {
                let r = (self.rr + k) % n;
                // A usable rail is paired with one of the peer's rails; its
                // key is unpacked on the connection when the part is issued.
                if !self.usable(r, p) || !part.remote.has(r) {
                    continue;
                }
                if only.is_some_and(|m| r >= 64 || m & (1 << r) == 0) {
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

    /// Unpacks again, on rail `r`'s current connection, the keys of parts
    /// `idx` of request `tok` that were unpacked on an older one (or not at
    /// all, the rail not connected then).
    fn fresh_keys(&mut self, r: usize, tok: Token, idx: &[u32]) -> Result<(), Error> {
        let Rails {
            rails,
            reqs,
            peers,
            rekeys,
            ..
        } = self;
        let q = &reqs[&tok];
        let p = &peers[&q.peer];
        let gen = p.gen[r];
        let conn = p.conns[r].as_ref().expect("usable rail");
        for &i in idx {
            let key = &q.parts[i as usize].remote;
            let current = |g: &u64| *g == gen;
            if key.keys[r].as_ref().is_some_and(|(g, _)| current(g))
                || rekeys.get(&(key.id, r)).is_some_and(|(g, _)| current(g))
            {
                continue;
            }
            let Some(packed) = key.packed[r].as_deref() else {
                return Err(Error::backend(
                    rails[r].t.name(),
                    -22,
                    "rails: no key for a rail not paired with the peer's",
                ));
            };
            let k = rails[r].t.unpack_key(conn, &key.region, packed)?;
            // The key of the old connection: the inner transport keeps what
            // an abandoned attempt may still use until it let go of it.
            if let Some((_, old)) = rekeys.insert((key.id, r), (gen, k)) {
                rails[r].t.release_key(old);
            }
        }
        Ok(())
    }

    /// Posts parts `idx` of request `tok` on rail `r`.
    fn issue(&mut self, r: usize, tok: Token, idx: Vec<u32>, bytes: u64) {
        if let Err(e) = self.fresh_keys(r, tok, &idx) {
            for i in idx.into_iter().rev() {
                self.queue.push_front((tok, i));
            }
            let peer = self.reqs[&tok].peer;
            self.conn_failed(peer, r, &format!("unpacking a remote key: {e}"));
            return;
        }
        let itok = self.next_tok;
        self.next_tok += 1;
        let result = {
            let Rails {
                rails,
                reqs,
                peers,
                rekeys,
                ..
            } = self;
            let q = &reqs[&tok];
            let p = &peers[&q.peer];
            let gen = p.gen[r];
            let conn = p.conns[r].as_ref().expect("usable rail");
            let segs: Vec<Segment<'_, T::LocalReg, T::RemoteKey>> = idx
                .iter()
                .map(|&i| {
                    let p = &q.parts[i as usize];
                    let remote = match &p.remote.keys[r] {
                        Some((g, k)) if *g == gen => k,
                        _ => &rekeys[&(p.remote.id, r)].1,
                    };
                    Segment {
                        local_addr: p.local_addr,
                        remote_addr: p.remote_addr,
                        len: p.len,
                        local: &p.local[r],
                        remote,
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
                let peer = self.reqs[&tok].peer;
                self.flights.insert(
                    (r, itok),
                    Flight {
                        req: tok,
                        peer,
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
                let peer = self.reqs[&tok].peer;
                self.conn_failed(peer, r, &e.to_string());
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
    pub(crate) fn on_inner(&mut self, r: usize, c: Completion) {
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
                    let ids: Vec<u64> = self.peers.keys().copied().collect();
                    for id in ids {
                        self.hello(id, r);
                    }
                }
                if let Some(p) = self.peers.get_mut(&f.peer) {
                    p.backoff[r] = self.cfg.backoff_min;
                }
                self.part_done(f.req, f.parts.len());
            }
            Err(e) => {
                if self.reqs.contains_key(&f.req) {
                    for i in f.parts.into_iter().rev() {
                        self.queue.push_front((f.req, i));
                    }
                }
                self.conn_failed(f.peer, r, &e.to_string());
            }
        }
    }
}
