//! Progress: staging messages taken out of the inner transport's
//! notifications, answers, timed-out requests, and the poll loop that
//! moves every chunk on.

use super::*;

impl<T: Transport> Staged<T> {
    /// Acts on a staging message received as a notification.
    pub(super) fn on_staging_message(&mut self, m: &[u8]) {
        self.events = self.events.wrapping_add(1);
        match msg::decode(m) {
            Err(e) => log::warn!("{}: dropping a staging message: {e}", self.inner.name()),
            Ok(Message::Request(r)) => {
                let peer = match self.requester(r.addr) {
                    Ok(p) => p,
                    Err(e) => {
                        log::warn!(
                            "{}: cannot connect back to a staging requester: {e}",
                            self.inner.name()
                        );
                        return;
                    }
                };
                if let Err(e) = self.serve(&r, Arc::clone(&peer)) {
                    log::debug!(
                        "{}: staging request {:#x} refused: {e}",
                        self.inner.name(),
                        r.id
                    );
                    self.answer(&peer, r.id, Err(&e));
                }
            }
            Ok(Message::Done { id, result }) => self.on_answer(id, result),
        }
    }

    /// The peer answered request `id` (a chunk awaiting it, or a
    /// lost bounce buffer whose request was abandoned).
    pub(super) fn on_answer(&mut self, id: u64, result: Result<(), &str>) {
        let id = id ^ self.salt;
        let found = self
            .find_chunk(id)
            .filter(|&(oi, c)| matches!(self.ops[oi].chunks[c].stage, Stage::Await { .. }));
        let Some((oi, c)) = found else {
            if let Some(i) = self.lost.iter().position(|l| l.id == id) {
                let l = self.lost.swap_remove(i);
                self.drop_slot(l.slot);
            } else {
                log::debug!("{}: answer to unknown request {id:#x}", self.inner.name());
            }
            return;
        };
        match result {
            Ok(()) => {
                let then_copy = matches!(
                    self.ops[oi].chunks[c].stage,
                    Stage::Await {
                        then_copy: true,
                        ..
                    }
                );
                if then_copy && self.ops[oi].error.is_none() {
                    self.copy_out(oi, c);
                } else {
                    self.retire(oi, c);
                }
            }
            Err(text) => {
                let what = self.ops[oi].op.name();
                let e = self.bad(&format!("the peer could not serve a staged {what}: {text}"));
                self.ops[oi].fail(e);
                self.retire(oi, c);
            }
        }
    }

    /// Receives notifications of the inner transport until none is left:
    /// staging messages are acted on, user ones kept for
    /// [`poll_notification`](Transport::poll_notification).
    pub(super) fn pump_notifications(&mut self) {
        loop {
            match self.receive() {
                None => return,
                Some(Err(e)) => {
                    log::warn!(
                        "{}: receiving a notification failed: {e}",
                        self.inner.name()
                    );
                    return;
                }
                Some(Ok(n)) => self.user_notes.push_back(self.note_buf[..n].to_vec()),
            }
        }
    }

    /// The next user notification of the inner transport, in `note_buf`;
    /// staging messages met on the way are acted on.
    pub(super) fn receive(&mut self) -> Option<Result<usize, Error>> {
        if self.note_buf.is_empty() {
            let max = self.inner.capabilities().max_notification as usize;
            self.note_buf = vec![0; max.max(4096)];
        }
        loop {
            let mut buf = std::mem::take(&mut self.note_buf);
            let got = self.inner.poll_notification(&mut buf);
            match got {
                Some(Ok(n)) if msg::is_staging(&buf[..n]) => {
                    self.on_staging_message(&buf[..n]);
                    self.note_buf = buf;
                }
                Some(Err(Error::BufferTooSmall { needed, .. }))
                    if needed as usize > buf.len() && needed <= MAX_NOTE_BUF =>
                {
                    buf.resize(needed as usize, 0);
                    self.note_buf = buf;
                }
                other => {
                    self.note_buf = buf;
                    return other;
                }
            }
        }
    }

    /// Gives up on serving peers' requests that took longer than
    /// [`StagingConfig::reply_timeout`]: their chunks on the inner
    /// transport are abandoned, and the request is answered with
    /// [`Error::TimedOut`] once its copies ended.
    ///
    /// This side's own transfers have no deadline here (the engine keeps
    /// it and calls [`abandon`](Transport::abandon)), but a transfer
    /// serving a peer's request belongs to no engine: without this bound
    /// one to a requester that died unnoticed (over `shm`, say) would keep
    /// its bounce buffer, and the memory of the VRAM it serves, forever.
    pub(super) fn expire_served(&mut self) {
        let limit = self.cfg.reply_timeout;
        for oi in 0..self.ops.len() {
            let op = &self.ops[oi];
            let Some(since) = op.serving_since else {
                continue;
            };
            let waited = since.elapsed();
            if op.error.is_some() || waited < limit {
                continue;
            }
            log::warn!(
                "{}: staging request {:#x} of a peer not served within {waited:?}",
                self.inner.name(),
                op.serves.unwrap_or(0)
            );
            self.ops[oi].fail(Error::TimedOut {
                after_ms: waited.as_millis() as u64,
            });
            self.abandon_wire(oi);
        }
    }

    /// Abandons the chunks of op `oi` on the inner transport; each then
    /// completes there (or already did), which retires it.
    pub(super) fn abandon_wire(&mut self, oi: usize) {
        for c in 0..self.ops[oi].chunks.len() {
            let ch = &self.ops[oi].chunks[c];
            if !matches!(ch.stage, Stage::Wire { .. }) {
                continue;
            }
            if let Err(e) = self.inner.abandon(Token(ch.token)) {
                log::debug!(
                    "{}: staged chunk {:#x} not abandoned: {e}",
                    self.inner.name(),
                    ch.token
                );
            }
        }
    }

    /// [`Transport::abandon`] of this side's staged transfer `oi`, at the
    /// engine's deadline or when its peer is unreachable. The transfer
    /// starts nothing more and ends without a completion (the engine has
    /// failed it). Requests awaiting the peer's answer are given up: their
    /// bounce buffers wait in `lost` for the late answer, so that a late
    /// pull or push cannot mix into a later transfer. Chunks on the inner
    /// transport are abandoned there, and the inner transport reports
    /// their memory through `in_use` while it may touch it. CUDA copies
    /// already queued cannot be stopped: they are waited for here (local
    /// copies, they end on their own), so that no copy touches the
    /// transfer's memory once this returns.
    pub(super) fn abandon_staged(&mut self, oi: usize) -> Result<(), Error> {
        // Chunks on the wire first: a refusal leaves the transfer as it is
        // (in flight; the engine asks again).
        for ch in &self.ops[oi].chunks {
            if matches!(ch.stage, Stage::Wire { .. }) {
                self.inner.abandon(Token(ch.token))?;
            }
        }
        let op = &mut self.ops[oi];
        op.abandoned = true;
        op.fail(Error::disconnected(""));
        let mut c = 0;
        while c < self.ops[oi].chunks.len() {
            let ch = &self.ops[oi].chunks[c];
            match (ch.stage, ch.slot) {
                (Stage::Await { .. }, slot) => {
                    let ch = self.ops[oi].chunks.swap_remove(c);
                    log::warn!(
                        "{}: staging request {:#x} abandoned before its answer",
                        self.inner.name(),
                        ch.token
                    );
                    if let Some((index, slot)) = slot {
                        self.lose_slot(ch.token, index, slot);
                    }
                }
                (Stage::Copy { ev, .. }, Some((index, _))) => {
                    if let Some(p) = Self::pool_mut(&mut self.pools, index) {
                        if let Err(e) = p.synchronize() {
                            log::warn!("{}: {e}", self.inner.name());
                        }
                        p.free_events.push(ev);
                    }
                    self.retire(oi, c);
                }
                _ => c += 1,
            }
        }
        Ok(())
    }

    /// Moves every staged transfer forward; finished ones go to `done`.
    pub(super) fn drive(&mut self) {
        // 1. Answers to requests (only looked for while some are awaited,
        //    so that plain notifications stay with the caller otherwise).
        let awaiting = self.ops.iter().any(|o| {
            o.chunks
                .iter()
                .any(|c| matches!(c.stage, Stage::Await { .. }))
        });
        // Once notifications are kept here, newer ones must queue behind
        // them (and peers' requests still get served).
        if awaiting || !self.lost.is_empty() || !self.user_notes.is_empty() {
            self.pump_notifications();
        }
        if self.ops.iter().any(|o| o.serves.is_some()) {
            self.events = self.events.wrapping_add(1);
            self.expire_served();
        }
        // 2. Completions of the inner transport.
        while let Some(c) = self.inner.poll() {
            if c.token.0 & 0xffff_ffff != CHUNK_MARK {
                self.done.push_back(c);
                continue;
            }
            let Some((oi, ci)) = self.find_chunk(c.token.0) else {
                log::debug!("staging: completion for unknown chunk {:#x}", c.token.0);
                continue;
            };
            match c.result {
                Ok(()) => self.wire_done(oi, ci),
                Err(e) => {
                    self.ops[oi].fail(e);
                    self.retire(oi, ci);
                }
            }
        }
        // 3. CUDA copies, then new chunks, then finished transfers.
        let mut oi = 0;
        while oi < self.ops.len() {
            let mut ci = 0;
            while ci < self.ops[oi].chunks.len() {
                let ch = &self.ops[oi].chunks[ci];
                let Stage::Copy { ev, next } = ch.stage else {
                    ci += 1;
                    continue;
                };
                let (index, _) = ch.slot.expect("copies use a slot");
                let q = match Self::pool_mut(&mut self.pools, index) {
                    Some(p) => p.query(ev),
                    None => Err(driver::no_driver()),
                };
                let step = match q {
                    Ok(false) => {
                        ci += 1;
                        continue;
                    }
                    // A failed transfer sends nothing more.
                    Ok(true) if self.ops[oi].error.is_some() => Ok(true),
                    Ok(true) => match next {
                        Next::Wire => {
                            self.ops[oi].chunks[ci].stage = Stage::Wire { then_copy: false };
                            self.post_wire(oi, ci)
                        }
                        Next::Request => self.send_request(oi, ci).map(|()| false),
                        Next::Retire => Ok(true),
                    },
                    Err(e) => Err(e),
                };
                match step {
                    Ok(true) => self.retire(oi, ci),
                    Ok(false) => ci += 1,
                    Err(e) => {
                        self.ops[oi].fail(e);
                        self.retire(oi, ci);
                    }
                }
            }
            self.start_chunks(oi);
            if self.ops[oi].finished() {
                let mut op = self.ops.swap_remove(oi);
                let result = match op.error.take() {
                    Some(e) => Err(e),
                    None => match &op.notification {
                        Some(m) => self.inner.send_notification(&op.peer, m),
                        None => Ok(()),
                    },
                };
                match op.serves {
                    Some(id) => {
                        self.answer(&op.peer, id, result.as_ref().map(|_| ()));
                        if result.is_err() {
                            // The connection back may be dead (the
                            // requester restarted or reset it): the next
                            // request connects afresh.
                            let peer = Arc::clone(&op.peer);
                            drop(op);
                            self.forget_requester(&peer);
                        }
                    }
                    // The engine failed it already.
                    None if op.abandoned => {}
                    None => self.done.push_back(Completion {
                        token: op.token,
                        result,
                    }),
                }
            } else {
                oi += 1;
            }
        }
        if !self.requesters.retired_keys.is_empty() || !self.requesters.retired_peers.is_empty() {
            self.release_retired();
        }
    }

    /// Posts a transfer with no VRAM on either side straight to the inner
    /// transport, without allocating (once `direct` has grown).
    pub(super) fn post_direct(
        &mut self,
        op: XferOp,
        peer: &Arc<T::Peer>,
        segments: Segments<'_, StagedReg<T::LocalReg>, StagedKey<T::RemoteKey>>,
        notification: Option<&[u8]>,
        token: Token,
    ) -> Result<PostStatus, Error> {
        let unwrap = direct_segment::<T::LocalReg, T::RemoteKey>;
        let backend = self.inner.name();
        let bad = || Error::UnsupportedMemKind {
            backend,
            kind: MemKind::Vram,
        };
        if segments.len() <= DIRECT_INLINE {
            let mut v: heapless::Vec<Segment<'_, T::LocalReg, T::RemoteKey>, DIRECT_INLINE> =
                heapless::Vec::new();
            for s in segments {
                let seg = unwrap(&s).ok_or_else(bad)?;
                if v.push(seg).is_err() {
                    break;
                }
            }
            return self
                .inner
                .post(op, peer, v.as_slice().into(), notification, token);
        }
        let mut v: Vec<Segment<'_, T::LocalReg, T::RemoteKey>> =
            recycle(std::mem::take(&mut self.direct));
        for s in segments {
            match unwrap(&s) {
                Some(seg) => v.push(seg),
                None => {
                    self.direct = recycle(v);
                    return Err(bad());
                }
            }
        }
        let posted = self
            .inner
            .post(op, peer, v.as_slice().into(), notification, token);
        self.direct = recycle(v);
        posted
    }
}

/// `v`, emptied, as a vector of `B` with the same allocation: a buffer
/// whose elements borrow for one call at a time can be kept between calls
/// as a vector of a lifetime-free type of the same layout. Collecting an
/// emptied `vec::IntoIter` in place reuses its allocation where `A` and
/// `B` have the same size and alignment, as every `Segment` has.
pub(super) fn recycle<A, B>(mut v: Vec<A>) -> Vec<B> {
    v.clear();
    v.into_iter().filter_map(|_| None).collect()
}
