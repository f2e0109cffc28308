//! The pipeline of a staged transfer: its segments cut into chunks, each
//! moved by CUDA copies, the inner transport or a request to the peer.

use super::*;

/// The local side of one segment of a staged transfer.
pub(super) enum LocalSide<L> {
    Host(Arc<L>),
    Vram(u32),
}

/// The remote side of one segment of a staged transfer.
pub(super) enum RemoteSide<K> {
    /// Host memory of the peer, reached by the inner transport.
    Host(Arc<K>),
    /// VRAM of the peer, reached through requests carrying its secret.
    Vram([u8; msg::SECRET_LEN]),
}

/// One segment of a staged transfer.
pub(super) struct Work<L, K> {
    pub(super) local: LocalSide<L>,
    pub(super) local_addr: u64,
    pub(super) remote_addr: u64,
    pub(super) len: u64,
    pub(super) remote: RemoteSide<K>,
    pub(super) remote_region_addr: u64,
}

/// What follows a CUDA copy.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(super) enum Next {
    /// The inner transport moves the bounce buffer (WRITE to host memory).
    Wire,
    /// The peer is asked to pull the bounce buffer (WRITE to its VRAM).
    Request,
    /// Nothing: the chunk is done.
    Retire,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(super) enum Stage {
    /// A CUDA copy runs.
    Copy { ev: usize, next: Next },
    /// The inner transport moves it; `then_copy` for READ into a bounce slot.
    Wire { then_copy: bool },
    /// A request is with the peer; `then_copy` for READ.
    Await { then_copy: bool },
}

/// Part of a segment that a chunk moves.
#[derive(Copy, Clone, Debug)]
pub(super) struct Piece {
    pub(super) seg: usize,
    /// Where the part starts in local and remote memory.
    pub(super) local_addr: u64,
    pub(super) remote_addr: u64,
    pub(super) len: u64,
    /// Its offset in the chunk's bounce buffer.
    pub(super) slot_off: u64,
}

/// One unit in flight: a bounce buffer filled with the pieces of one or
/// more segments (many small blocks share one), or a whole host segment.
pub(super) struct Chunk {
    pub(super) token: u64,
    /// `(pool index, slot)` for chunks through a bounce buffer.
    pub(super) slot: Option<(u32, usize)>,
    pub(super) pieces: Vec<Piece>,
    pub(super) stage: Stage,
}

pub(super) struct Op<T: Transport> {
    pub(super) token: Token,
    pub(super) op: XferOp,
    pub(super) peer: Arc<T::Peer>,
    pub(super) notification: Option<Vec<u8>>,
    pub(super) segs: Vec<Work<T::LocalReg, T::RemoteKey>>,
    pub(super) next_seg: usize,
    pub(super) next_off: u64,
    pub(super) chunks: Vec<Chunk>,
    pub(super) error: Option<Error>,
    /// For a transfer serving a peer's request: the request's id, answered
    /// over `peer` instead of reporting a completion.
    pub(super) serves: Option<u64>,
    /// For a transfer serving a peer's request: when serving began (see
    /// [`StagingConfig::reply_timeout`]).
    pub(super) serving_since: Option<Instant>,
    /// Abandoned by the engine: finishes without a completion.
    pub(super) abandoned: bool,
}

impl<T: Transport> Op<T> {
    pub(super) fn fail(&mut self, e: Error) {
        if self.error.is_none() {
            self.error = Some(e);
        }
    }

    pub(super) fn finished(&self) -> bool {
        self.chunks.is_empty() && (self.error.is_some() || self.next_seg >= self.segs.len())
    }
}

impl<T: Transport> Staged<T> {
    /// Posts chunk `c` of op `oi` to the inner transport, one segment per
    /// piece. `Ok(true)` when it completed inline.
    pub(super) fn post_wire(&mut self, oi: usize, c: usize) -> Result<bool, Error> {
        let op = &self.ops[oi];
        let ch = &op.chunks[c];
        let slot = ch.slot.map(|(index, slot)| {
            let pool = self.pools[index as usize]
                .as_ref()
                .expect("a slot is only taken from an existing pool");
            let sl = pool.slot(slot);
            let reg = sl
                .reg
                .as_ref()
                .expect("slots are registered while in a pool");
            (sl.buf.addr(), reg)
        });
        let mut segs = Vec::with_capacity(ch.pieces.len());
        for p in &ch.pieces {
            let w = &op.segs[p.seg];
            let RemoteSide::Host(remote) = &w.remote else {
                unreachable!("only chunks to remote host memory go on the wire")
            };
            let (local_addr, local): (u64, &T::LocalReg) = match (&w.local, slot) {
                (_, Some((base, reg))) => (base + p.slot_off, reg),
                (LocalSide::Host(reg), None) => (p.local_addr, &**reg),
                (LocalSide::Vram(_), None) => unreachable!("VRAM chunks always hold a slot"),
            };
            segs.push(Segment {
                local_addr,
                remote_addr: p.remote_addr,
                len: p.len,
                local,
                remote: &**remote,
                remote_region_addr: w.remote_region_addr,
            });
        }
        let st = self.inner.post(
            op.op,
            &op.peer,
            segs.as_slice().into(),
            None,
            Token(ch.token),
        )?;
        Ok(st == PostStatus::Done)
    }

    /// This side's inner transport address (fetched once).
    pub(super) fn my_addr(&mut self) -> Result<Vec<u8>, Error> {
        if let Some(a) = &self.my_addr {
            return Ok(a.clone());
        }
        let mut buf = vec![0u8; 4096];
        let n = loop {
            match self.inner.local_address(&mut buf) {
                Err(Error::BufferTooSmall { needed, .. }) if needed as usize > buf.len() => {
                    buf.resize(needed as usize, 0);
                }
                other => break other?,
            }
        };
        buf.truncate(n);
        self.my_addr = Some(buf.clone());
        Ok(buf)
    }

    /// Asks the peer to pull (WRITE) or push (READ) chunk `c` of op `oi`
    /// through the chunk's bounce slot; the chunk then awaits the answer.
    pub(super) fn send_request(&mut self, oi: usize, c: usize) -> Result<(), Error> {
        let addr = self.my_addr()?;
        let op = &self.ops[oi];
        let ch = &op.chunks[c];
        let (index, slot) = ch.slot.expect("requests go through a bounce slot");
        let pool = self.pools[index as usize]
            .as_ref()
            .expect("a slot is only taken from an existing pool");
        let (dir, then_copy) = match op.op {
            XferOp::Write => (Direction::Pull, false),
            XferOp::Read => (Direction::Push, true),
        };
        let base = pool.slot_addr(slot);
        let secret = ch
            .pieces
            .first()
            .and_then(|p| match op.segs.get(p.seg).map(|w| &w.remote) {
                Some(RemoteSide::Vram(secret)) => Some(*secret),
                _ => None,
            })
            .unwrap_or_default();
        let req = Request {
            dir,
            id: ch.token ^ self.salt,
            ranges: ch
                .pieces
                .iter()
                .map(|p| Range {
                    vram: p.remote_addr,
                    len: p.len,
                    host: base + p.slot_off,
                })
                .collect(),
            pool: base,
            pool_len: pool.chunk as u64,
            addr: &addr,
            key: &pool.slot(slot).key,
            secret,
        };
        msg::encode_request(&req, &mut self.out)?;
        self.inner.send_notification(&op.peer, &self.out)?;
        self.ops[oi].chunks[c].stage = Stage::Await { then_copy };
        Ok(())
    }

    /// Starts the copies of chunk `c` of op `oi` out of its bounce slot into
    /// the local destination (READ's last step).
    pub(super) fn copy_out(&mut self, oi: usize, c: usize) {
        let ch = &self.ops[oi].chunks[c];
        let (index, slot) = ch.slot.expect("READ through a bounce slot");
        let res = match Self::pool_mut(&mut self.pools, index) {
            Some(p) => p.copies(false, slot, &ch.pieces),
            None => Err(driver::no_driver()),
        };
        match res {
            Ok(ev) => {
                self.ops[oi].chunks[c].stage = Stage::Copy {
                    ev,
                    next: Next::Retire,
                }
            }
            Err(e) => {
                self.ops[oi].fail(e);
                self.retire(oi, c);
            }
        }
    }

    /// Chunk `c` of op `oi` left the wire (successfully).
    pub(super) fn wire_done(&mut self, oi: usize, c: usize) {
        let then_copy = matches!(
            self.ops[oi].chunks[c].stage,
            Stage::Wire { then_copy: true }
        );
        // A failed transfer copies nothing more (its VRAM may be gone).
        if then_copy && self.ops[oi].error.is_none() {
            self.copy_out(oi, c);
        } else {
            self.retire(oi, c);
        }
    }

    /// Removes chunk `c` of op `oi` and frees its slot.
    pub(super) fn retire(&mut self, oi: usize, c: usize) {
        let ch = self.ops[oi].chunks.swap_remove(c);
        if let Some((index, slot)) = ch.slot {
            if let Some(p) = Self::pool_mut(&mut self.pools, index) {
                p.free_slots.push(slot);
            }
        }
    }

    pub(super) fn find_chunk(&self, token: u64) -> Option<(usize, usize)> {
        self.ops.iter().enumerate().find_map(|(oi, op)| {
            op.chunks
                .iter()
                .position(|c| c.token == token)
                .map(|c| (oi, c))
        })
    }

    pub(super) fn chunk_token(&mut self) -> u64 {
        self.next_chunk = self.next_chunk.wrapping_add(1);
        (u64::from(self.next_chunk) << 32) | CHUNK_MARK
    }

    /// Where segment `seg` of op `oi` goes through a bounce buffer: the GPU
    /// of that buffer (`None`: host to host, no buffer), and whether the
    /// remote side is VRAM.
    pub(super) fn route(&self, oi: usize, seg: usize) -> (Option<u32>, bool) {
        let w = &self.ops[oi].segs[seg];
        let remote_vram = matches!(w.remote, RemoteSide::Vram(_));
        let dev = match (&w.local, remote_vram) {
            (LocalSide::Vram(dev), _) => Some(*dev),
            (LocalSide::Host(_), true) => Some(self.first_own_pool().unwrap_or(0)),
            (LocalSide::Host(_), false) => None,
        };
        (dev, remote_vram)
    }

    /// Most pieces one request may carry so that it fits a notification.
    pub(super) fn max_request_pieces(&mut self, index: u32, slot: usize) -> usize {
        let addr = self.my_addr().map(|a| a.len()).unwrap_or(0);
        let key = Self::pool_mut(&mut self.pools, index).map_or(0, |p| p.slot(slot).key.len());
        let max = self.inner.capabilities().max_notification as usize;
        let fixed = msg::request_len(addr, key, 0);
        (max.saturating_sub(fixed) / msg::RANGE_LEN).clamp(1, usize::from(u16::MAX))
    }

    /// Takes the next pieces of op `oi` for a chunk: the rest of one host
    /// segment (no bounce buffer), or as many consecutive pieces as fit
    /// bounce buffer `slot` of GPU `dev` (same route, at most `max`).
    pub(super) fn take_pieces(
        &mut self,
        oi: usize,
        slot: Option<(u32, usize)>,
        max: usize,
    ) -> Vec<Piece> {
        let (dev, remote_vram) = self.route(oi, self.ops[oi].next_seg);
        let cap = self.cfg.chunk as u64;
        let mut pieces = Vec::new();
        let mut used = 0;
        loop {
            let op = &self.ops[oi];
            if op.next_seg >= op.segs.len() || pieces.len() >= max {
                break;
            }
            if self.route(oi, op.next_seg) != (dev, remote_vram) {
                break;
            }
            let w = &op.segs[op.next_seg];
            let (off, seg_len) = (op.next_off, w.len);
            let len = match slot {
                None => w.len - off,
                Some(_) => (w.len - off).min(cap - used),
            };
            pieces.push(Piece {
                seg: op.next_seg,
                local_addr: w.local_addr + off,
                remote_addr: w.remote_addr + off,
                len,
                slot_off: used,
            });
            used += len;
            let op = &mut self.ops[oi];
            if off + len >= seg_len {
                op.next_seg += 1;
                op.next_off = 0;
            } else {
                op.next_off = off + len;
            }
            if slot.is_none() || used >= cap {
                break;
            }
        }
        pieces
    }

    /// Starts as many new chunks of op `oi` as bounce buffers allow.
    pub(super) fn start_chunks(&mut self, oi: usize) {
        loop {
            let op = &self.ops[oi];
            if op.error.is_some() || op.next_seg >= op.segs.len() {
                return;
            }
            let (slot_dev, remote_vram) = self.route(oi, op.next_seg);
            let serving = op.serves.is_some();
            let slot = match slot_dev {
                None => None,
                Some(dev) => {
                    let index = pool_index(dev, serving);
                    let Some(p) = Self::pool_mut(&mut self.pools, index) else {
                        self.ops[oi].fail(driver::no_driver());
                        return;
                    };
                    let Some(slot) = p.free_slots.pop() else {
                        if p.slots.iter().all(Option::is_none) {
                            let e = self.bad(&format!(
                                "every bounce buffer of device {dev} was lost to requests that timed out \
                                 ({} kept for late answers; no more are replaced)",
                                self.lost.len()
                            ));
                            self.ops[oi].fail(e);
                        }
                        return;
                    };
                    Some((index, slot))
                }
            };
            let max = match slot {
                Some((index, s)) if remote_vram => self.max_request_pieces(index, s),
                _ => self.inner.capabilities().max_segments as usize,
            };
            let max = if max == 0 { usize::MAX } else { max };
            let pieces = self.take_pieces(oi, slot, max);
            let op_kind = self.ops[oi].op;
            let token = self.chunk_token();
            self.ops[oi].chunks.push(Chunk {
                token,
                slot,
                pieces,
                stage: Stage::Wire { then_copy: false },
            });
            let c = self.ops[oi].chunks.len() - 1;
            let started = match (slot, op_kind) {
                (Some((index, s)), XferOp::Write) => {
                    let pool = Self::pool_mut(&mut self.pools, index).expect("checked above");
                    pool.copies(true, s, &self.ops[oi].chunks[c].pieces)
                        .map(|ev| {
                            let next = if remote_vram {
                                Next::Request
                            } else {
                                Next::Wire
                            };
                            self.ops[oi].chunks[c].stage = Stage::Copy { ev, next };
                        })
                }
                (Some(_), XferOp::Read) if remote_vram => self.send_request(oi, c),
                (slot, kind) => {
                    self.ops[oi].chunks[c].stage = Stage::Wire {
                        then_copy: slot.is_some() && kind == XferOp::Read,
                    };
                    match self.post_wire(oi, c) {
                        Ok(true) => {
                            self.wire_done(oi, c);
                            Ok(())
                        }
                        Ok(false) => Ok(()),
                        Err(e) => Err(e),
                    }
                }
            };
            if let Err(e) = started {
                self.ops[oi].fail(e);
                self.retire(oi, c);
            }
        }
    }

    /// [`Transport::post`] of a transfer with VRAM on either side;
    /// `host_to_vram` when a segment moves host memory to the peer's VRAM.
    pub(super) fn post_staged(
        &mut self,
        op: XferOp,
        peer: &Arc<T::Peer>,
        segments: Segments<'_, StagedReg<T::LocalReg>, StagedKey<T::RemoteKey>>,
        notification: Option<&[u8]>,
        token: Token,
        host_to_vram: bool,
    ) -> Result<PostStatus, Error> {
        if let Some(m) = notification {
            let max = self.inner.capabilities().max_notification;
            if m.len() as u64 > u64::from(max) {
                return Err(Error::NotificationTooLong {
                    len: m.len() as u64,
                    max: u64::from(max),
                });
            }
        }
        if host_to_vram {
            self.host_pool_dev()?;
        }
        let mut segs = Vec::with_capacity(segments.len());
        for s in segments {
            let local = match s.local {
                StagedReg::Host(l) => LocalSide::Host(Arc::clone(l)),
                StagedReg::Vram(region) => LocalSide::Vram(region.dev),
            };
            let remote = match s.remote {
                StagedKey::Host(r) => RemoteSide::Host(Arc::clone(r)),
                StagedKey::Vram(_, secret) => RemoteSide::Vram(*secret),
            };
            segs.push(Work {
                local,
                local_addr: s.local_addr,
                remote_addr: s.remote_addr,
                len: s.len,
                remote,
                remote_region_addr: s.remote_region_addr,
            });
        }
        self.ops.push(Op {
            token,
            op,
            peer: Arc::clone(peer),
            notification: notification.map(<[u8]>::to_vec),
            segs,
            next_seg: 0,
            next_off: 0,
            chunks: Vec::new(),
            error: None,
            serves: None,
            serving_since: None,
            abandoned: false,
        });
        // The copies into bounce buffers (one per block: many for
        // KV-shaped transfers) start at the next poll, so that posting
        // stays cheap for the caller.
        Ok(PostStatus::InProgress)
    }
}
