//! Transfers: preparing, posting, polling (deadlines included) and
//! releasing them.

use super::*;

impl<'a, T: Transport> Engine<'a, T> {
    /// Gives up on in-flight transfer `i`: asks the transport to abandon
    /// it and, if it can, fails it with `error` at `now`. If it cannot,
    /// the transfer stays in flight and the transport's error is returned.
    pub(super) fn give_up(&mut self, i: usize, error: Error, now: Instant) -> Result<(), Error> {
        let s = &self.xfers[i];
        self.transport.abandon(token_of(i, s.generation, s.posts))?;
        let s = &mut self.xfers[i];
        s.state = XferState::Failed(error);
        s.telemetry.completed_at = Some(now);
        s.expires = None;
        self.in_flight -= 1;
        let peer = &mut self.peers[s.peer as usize];
        peer.in_flight = peer.in_flight.saturating_sub(1);
        Ok(())
    }

    /// Gives up on every transfer in flight whose deadline has come, handing
    /// each to `ended`; returns how many failed. One the transport cannot
    /// abandon yet is tried again [`ABANDON_RETRY`] later.
    pub(super) fn expire(&mut self, now: Instant, ended: &mut impl FnMut(Ended<'_>)) -> usize {
        if !self.next_expiry.is_some_and(|at| at <= now) {
            return 0;
        }
        let mut next: Option<Instant> = None;
        let mut failed = 0;
        for i in 0..self.xfers.len() {
            let s = &self.xfers[i];
            if !(s.live && s.state == XferState::InProgress) {
                continue;
            }
            let Some(at) = s.expires else {
                continue;
            };
            if now < at {
                next = Some(next.map_or(at, |n| n.min(at)));
                continue;
            }
            let posted = s.telemetry.posted_at.unwrap_or(now);
            let after_ms = now.saturating_nanos_since(posted) / 1_000_000;
            match self.give_up(i, Error::TimedOut { after_ms }, now) {
                Ok(()) => {
                    failed += 1;
                    ended(self.ended(i));
                }
                Err(e) => {
                    log::debug!(
                        "{}: transfer #{i} is past its deadline but cannot be abandoned yet ({e})",
                        self.name
                    );
                    let retry = now.saturating_add(ABANDON_RETRY);
                    self.xfers[i].expires = Some(retry);
                    next = Some(next.map_or(retry, |n| n.min(retry)));
                }
            }
        }
        self.next_expiry = next;
        failed
    }

    /// When [`poll`](Engine::poll) next has a deadline to enforce, if any
    /// transfer in flight has one: a caller that sleeps until new
    /// completions should wake by then. It may be earlier than needed
    /// (never later).
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.in_flight == 0 {
            None
        } else {
            self.next_expiry
        }
    }

    /// A free transfer slot exists (checked before segments are filled).
    pub(super) fn check_xfer_room(&self) -> Result<(), Error> {
        if self.free_xfer == NIL {
            return Err(Error::capacity(
                "transfers",
                self.limits.xfers as usize,
                "xfers",
            ));
        }
        Ok(())
    }

    pub(super) fn take_xfer(&mut self) -> Result<usize, Error> {
        self.check_xfer_room()?;
        let i = self.free_xfer;
        self.free_xfer = self.xfers[i as usize].next_free;
        Ok(i as usize)
    }

    pub(super) fn put_xfer(&mut self, i: usize) {
        self.xfers[i].next_free = self.free_xfer;
        self.free_xfer = i as u32;
    }

    /// Gives a chain of chunks back to the free list.
    pub(super) fn free_chain(&mut self, first: u32) {
        let mut c = first;
        while c != NIL {
            let next = self.links[c as usize];
            self.links[c as usize] = self.free_chunk;
            self.free_chunk = c;
            c = next;
        }
    }

    /// Appends `seg` to `w`, merging it into the last record when
    /// coalescing allows, taking a new chunk when the last one is full.
    pub(super) fn push_seg(&mut self, w: &mut SegWriter, seg: SegRec) -> Result<(), Error> {
        w.bytes = w.bytes.saturating_add(seg.len);
        if self.config.coalesce && w.count > 0 {
            let at = w.last as usize * self.chunk_len + w.used - 1;
            if self.segs[at].merge(&seg) {
                return Ok(());
            }
        }
        if w.count >= self.config.segments_per_xfer as usize {
            return Err(Error::capacity(
                "segments per transfer",
                self.config.segments_per_xfer as usize,
                "segments_per_xfer",
            ));
        }
        if w.first == NIL || w.used == self.chunk_len {
            let c = self.free_chunk;
            if c == NIL {
                return Err(Error::capacity(
                    "segments",
                    self.links.len() * self.chunk_len,
                    "segments",
                ));
            }
            self.free_chunk = self.links[c as usize];
            self.links[c as usize] = NIL;
            if w.first == NIL {
                w.first = c;
            } else {
                self.links[w.last as usize] = c;
            }
            w.last = c;
            w.used = 0;
        }
        self.segs[w.last as usize * self.chunk_len + w.used] = seg;
        w.used += 1;
        w.count += 1;
        Ok(())
    }

    /// Fills a new segment chain from `count` pairs made by `pair(self, k)`.
    pub(super) fn fill(
        &mut self,
        count: usize,
        pair: impl Fn(&Self, usize) -> Result<SegRec, Error>,
    ) -> Result<SegWriter, Error> {
        let mut w = SegWriter {
            first: NIL,
            last: NIL,
            used: 0,
            count: 0,
            bytes: 0,
        };
        for k in 0..count {
            let r = pair(self, k).and_then(|seg| self.push_seg(&mut w, seg));
            if let Err(e) = r {
                self.free_chain(w.first);
                return Err(e);
            }
        }
        Ok(w)
    }

    /// Calls `f` on each of slot `i`'s segment records.
    pub(super) fn for_each_seg(&self, i: usize, f: impl FnMut(&SegRec)) {
        let x = &self.xfers[i];
        let recs = chain_records(
            &self.segs,
            &self.links,
            self.chunk_len,
            x.first_chunk,
            x.segs,
        );
        recs.for_each(f);
    }

    /// Makes a live transfer of the filled chain `w` against peer slot
    /// `peer`. If the transfer exceeds the transport's limits or the
    /// notification does not fit, everything is given back.
    pub(super) fn commit_xfer(
        &mut self,
        op: XferOp,
        peer: usize,
        notification: Option<&[u8]>,
        descs: usize,
        w: SegWriter,
    ) -> Result<XferHandle, Error> {
        if self.caps.max_segments != 0 && w.count > self.caps.max_segments as usize {
            self.free_chain(w.first);
            return Err(Error::capacity(
                "segments",
                self.caps.max_segments as usize,
                "",
            ));
        }
        let note = match notification.map(|n| self.take_note(n)).transpose() {
            Ok(n) => n.unwrap_or(NIL),
            Err(e) => {
                self.free_chain(w.first);
                return Err(e);
            }
        };
        let i = match self.take_xfer() {
            Ok(i) => i,
            Err(e) => {
                self.free_chain(w.first);
                self.put_note(note);
                return Err(e);
            }
        };
        let peer_gen = self.peers[peer].generation;
        self.peers[peer].users += 1;
        let slot = &mut self.xfers[i];
        slot.first_chunk = w.first;
        slot.segs = w.count as u32;
        slot.note = note;
        slot.live = true;
        slot.state = XferState::Prepared;
        slot.op = op;
        slot.peer = peer as u16;
        slot.peer_gen = peer_gen;
        slot.telemetry = XferTelemetry {
            bytes: w.bytes,
            descs: descs as u32,
            segments: w.count as u32,
            ..XferTelemetry::default()
        };
        let generation = slot.generation;
        let recs = chain_records(
            &self.segs,
            &self.links,
            self.chunk_len,
            w.first,
            w.count as u32,
        );
        recs.for_each(|s| self.registry.acquire(s.local));
        Ok(XferHandle {
            index: i as u32,
            generation,
        })
    }

    /// Validates, resolves and coalesces a request into a prepared transfer.
    pub fn prepare(
        &mut self,
        op: XferOp,
        local: &[Desc],
        remote: &[Desc],
        peer: &str,
        notification: Option<&[u8]>,
    ) -> Result<XferHandle, Error> {
        self.prepare_lists(op, local.into(), remote.into(), peer, notification)
    }

    /// [`prepare`](Engine::prepare) for explicit or strided lists.
    pub fn prepare_lists(
        &mut self,
        op: XferOp,
        local: DescList<'_>,
        remote: DescList<'_>,
        peer: &str,
        notification: Option<&[u8]>,
    ) -> Result<XferHandle, Error> {
        let p = self.peer_index(peer)?;
        desc::check_counts(local.len(), remote.len())?;
        self.check_xfer_room()?;
        let missing = |k: usize| Error::IndexOutOfRange {
            side: Side::Local,
            index: k as u32,
            value: k as u32,
            len: 0,
        };
        let w = self.fill(local.len(), |e, k| {
            let (l, r) = (local.get(k), remote.get(k));
            let (Some(l), Some(r)) = (l, r) else {
                return Err(missing(k));
            };
            let l = desc::resolve_local(&e.registry, k, &l)?;
            let r = e.resolve_remote(p, k, &r)?;
            desc::pair(k, &l, &r)
        })?;
        self.commit_xfer(op, p, notification, local.len(), w)
    }

    /// Makes a transfer from entries of prepared lists: pair `k` moves
    /// `local[local_idx[k]]` and `remote[remote_idx[k]]`. Only counts,
    /// indices and lengths are checked; the descriptors were validated
    /// when the lists were prepared. O(n) in the pairs.
    pub fn make_xfer(
        &mut self,
        op: XferOp,
        local: PreparedLocal,
        local_idx: &[u32],
        remote: PreparedRemote,
        remote_idx: &[u32],
        notification: Option<&[u8]>,
    ) -> Result<XferHandle, Error> {
        let li = self.prep_slot(local.index, local.generation, Side::Local)?;
        let ri = self.prep_slot(remote.index, remote.generation, Side::Remote)?;
        let p = self.preps[ri].peer as usize;
        let peer = &self.peers[p];
        if peer.state != PeerState::Live || peer.generation != self.preps[ri].peer_gen {
            return Err(Error::StalePeer {
                peer: peer.name.clone(),
            });
        }
        desc::check_counts(local_idx.len(), remote_idx.len())?;
        self.check_xfer_room()?;
        let w = self.fill(local_idx.len(), |e, k| {
            let (lx, rx) = (local_idx[k], remote_idx[k]);
            let range = |side, value: u32, len: u32| Error::IndexOutOfRange {
                side,
                index: k as u32,
                value,
                len,
            };
            let l = e
                .prep_entry(li, lx)
                .ok_or_else(|| range(Side::Local, lx, e.prep_len(li)))?;
            let r = e
                .prep_entry(ri, rx)
                .ok_or_else(|| range(Side::Remote, rx, e.prep_len(ri)))?;
            desc::pair(k, &l, &r)
        })?;
        self.commit_xfer(op, p, notification, local_idx.len(), w)
    }

    pub(super) fn slot_index(&self, handle: XferHandle) -> Result<usize, Error> {
        match self.xfers.get(handle.index as usize) {
            Some(s) if s.live && s.generation == handle.generation => Ok(handle.index as usize),
            _ => Err(Error::StaleHandle { handle }),
        }
    }

    /// Posts (or re-posts) a transfer. Returns its state after the post:
    /// `InProgress`, or `Done` if the transport finished inline. A
    /// transport error is returned and also left as the `Failed` state.
    pub fn post(&mut self, handle: XferHandle, now: Instant) -> Result<XferState, Error> {
        let i = self.slot_index(handle)?;
        let slot = &self.xfers[i];
        if slot.state == XferState::InProgress {
            return Err(Error::InProgress { handle });
        }
        let p = slot.peer as usize;
        let peer = &self.peers[p];
        let stale = || Error::StalePeer {
            peer: peer.name.clone(),
        };
        if peer.state != PeerState::Live || peer.generation != slot.peer_gen {
            return Err(stale());
        }
        let Some(endpoint) = peer.peer.as_ref() else {
            return Err(stale());
        };
        if peer.failed {
            return Err(Error::RemoteDisconnected {
                peer: peer.name.clone(),
            });
        }
        let (start, count) = (peer.start as usize, peer.count as usize);
        let remote = self.remote.get(start..start + count).unwrap_or(&[]);
        // Every record must name a live registration and key before the
        // transport reads them in place.
        let mut missing = None;
        self.for_each_seg(i, |s| {
            if missing.is_none() {
                if self.registry.get(s.local).is_none() {
                    missing = Some(Error::NotRegistered {
                        addr: s.local_addr,
                        len: s.len,
                    });
                } else if remote
                    .get(s.remote as usize)
                    .and_then(|r| r.key.as_ref())
                    .is_none()
                {
                    missing = Some(stale());
                }
            }
        });
        if let Some(e) = missing {
            return Err(e);
        }
        let segments = Segments::chain(
            Chain {
                segs: &self.segs,
                links: &self.links,
                chunk_len: self.chunk_len,
                first: slot.first_chunk,
                regions: self.registry.slots(),
                remote,
            },
            slot.segs as usize,
        );
        let notification = (slot.note != NIL).then(|| {
            let at = slot.note as usize * self.note_len;
            let len = self
                .note_slots
                .get(slot.note as usize)
                .map_or(0, |n| n.len as usize);
            self.notes.get(at..at + len).unwrap_or(&[])
        });
        let posts = slot.posts.wrapping_add(1);
        let token = token_of(i, slot.generation, posts);
        let result = self
            .transport
            .post(slot.op, endpoint, segments, notification, token);
        let result = result.map_err(|e| with_peer(e, &self.peers[p].name));
        let slot = &mut self.xfers[i];
        slot.posts = posts;
        slot.telemetry.posted_at = Some(now);
        slot.telemetry.completed_at = None;
        slot.telemetry.post_nanos = 0;
        match result {
            Ok(PostStatus::Done) => {
                slot.state = XferState::Done;
                slot.telemetry.completed_at = Some(now);
                Ok(XferState::Done)
            }
            Ok(PostStatus::InProgress) => {
                slot.state = XferState::InProgress;
                slot.expires = self.config.deadline.map(|d| now.saturating_add(d));
                if let Some(at) = slot.expires {
                    self.next_expiry = Some(self.next_expiry.map_or(at, |n| n.min(at)));
                }
                self.in_flight += 1;
                let peer = &mut self.peers[p];
                if peer.in_flight == 0 {
                    peer.heard_at = Some(now);
                }
                peer.in_flight += 1;
                Ok(XferState::InProgress)
            }
            Err(e) => {
                slot.state = XferState::Failed(e.clone());
                Err(e)
            }
        }
    }

    /// Records when the caller's `post` call returned, for telemetry.
    /// Ignored for a stale handle.
    pub fn post_finished(&mut self, handle: XferHandle, now: Instant) {
        if let Ok(i) = self.slot_index(handle) {
            let t = &mut self.xfers[i].telemetry;
            if let Some(at) = t.posted_at {
                t.post_nanos = now.saturating_nanos_since(at);
            }
        }
    }

    /// The transfer's state.
    pub fn state(&self, handle: XferHandle) -> Result<XferState, Error> {
        Ok(self.xfers[self.slot_index(handle)?].state.clone())
    }

    /// The transfer's telemetry.
    pub fn telemetry(&self, handle: XferHandle) -> Result<XferTelemetry, Error> {
        Ok(self.xfers[self.slot_index(handle)?].telemetry.clone())
    }

    /// Transfers posted and not yet finished.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Completions ignored so far by [`poll`](Engine::poll): for released
    /// or reused slots, for an earlier post of a re-posted transfer, for a
    /// transfer not in progress, or with a token the engine never issued.
    pub fn ignored_completions(&self) -> u64 {
        self.ignored_completions
    }

    /// Drains the transport's completions, then gives up on transfers past
    /// their [deadline](EngineConfig::deadline); returns how many transfers
    /// finished (timed-out ones included). Completions for released or
    /// reused slots, for an earlier post of the same transfer, or for a
    /// transfer already failed, are ignored (and counted in
    /// [`ignored_completions`](Engine::ignored_completions)).
    ///
    /// [`poll_with`](Engine::poll_with) also says which transfers finished.
    pub fn poll(&mut self, now: Instant) -> usize {
        self.poll_with(now, |_| {})
    }

    /// [`poll`](Engine::poll), handing each transfer that finished in this
    /// poll to `ended` once, as it finishes ([`Ended`]: its handle, its
    /// final state, its telemetry). Costs O(1) per finished transfer on
    /// top of the poll, and allocates nothing; `ended` must not block.
    pub fn poll_with(&mut self, now: Instant, mut ended: impl FnMut(Ended<'_>)) -> usize {
        let mut finished = 0;
        while let Some(c) = self.transport.poll() {
            let (index, generation, post) = token_parts(c.token);
            match self.xfers.get_mut(index) {
                Some(s)
                    if s.live
                        && s.generation == generation
                        && s.posts == post
                        && s.state == XferState::InProgress =>
                {
                    s.state = match c.result {
                        Ok(()) => XferState::Done,
                        Err(e) => {
                            XferState::Failed(with_peer(e, &self.peers[s.peer as usize].name))
                        }
                    };
                    s.telemetry.completed_at = Some(now);
                    self.in_flight -= 1;
                    let peer = &mut self.peers[s.peer as usize];
                    peer.in_flight = peer.in_flight.saturating_sub(1);
                    peer.heard_at = Some(now);
                    s.expires = None;
                    finished += 1;
                    ended(self.ended(index));
                }
                _ => {
                    self.ignored_completions += 1;
                    log::debug!(
                        "{}: ignoring completion for stale token {:#x}",
                        self.name,
                        c.token.0
                    );
                }
            }
        }
        finished + self.expire(now, &mut ended)
    }

    /// What [`poll_with`](Engine::poll_with) hands on of ended slot `i`.
    pub(super) fn ended(&self, i: usize) -> Ended<'_> {
        let s = &self.xfers[i];
        Ended {
            handle: XferHandle {
                index: i as u32,
                generation: s.generation,
            },
            state: &s.state,
            telemetry: &s.telemetry,
        }
    }

    /// Frees slot `i`: its regions and peer lose a user, its generation
    /// moves on.
    pub(super) fn free_xfer(&mut self, i: usize) {
        if self.xfers[i].state == XferState::InProgress {
            self.in_flight -= 1;
            let peer = &mut self.peers[self.xfers[i].peer as usize];
            peer.in_flight = peer.in_flight.saturating_sub(1);
        }
        let (first, count) = (self.xfers[i].first_chunk, self.xfers[i].segs);
        let recs = chain_records(&self.segs, &self.links, self.chunk_len, first, count);
        recs.for_each(|s| self.registry.release(s.local));
        self.free_chain(first);
        let note = self.xfers[i].note;
        self.put_note(note);
        let slot = &mut self.xfers[i];
        slot.first_chunk = NIL;
        slot.segs = 0;
        slot.note = NIL;
        slot.live = false;
        slot.state = XferState::Prepared;
        slot.generation = slot.generation.wrapping_add(1);
        let p = slot.peer as usize;
        let peer = &mut self.peers[p];
        peer.users = peer.users.saturating_sub(1);
        if peer.state == PeerState::Retired && peer.users == 0 {
            self.free_peer(p);
        }
        self.put_xfer(i);
    }

    /// Releases a transfer. An in-progress one is cancelled through the
    /// transport; if the transport cannot cancel, the release is refused
    /// with [`Error::InProgress`] and the transfer goes on.
    pub fn release(&mut self, handle: XferHandle) -> Result<(), Error> {
        let i = self.slot_index(handle)?;
        if self.xfers[i].state == XferState::InProgress {
            let token = token_of(i, handle.generation, self.xfers[i].posts);
            match self.transport.cancel(token) {
                Ok(()) => {}
                Err(Error::Unsupported { .. }) => return Err(Error::InProgress { handle }),
                Err(e) => return Err(e),
            }
        }
        self.free_xfer(i);
        Ok(())
    }
}
