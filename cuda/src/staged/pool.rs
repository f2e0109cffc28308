//! The bounce pools: per GPU, pinned buffers registered with the inner
//! transport, a stream and events for the copies into and out of them.

use super::*;

/// One pinned bounce buffer, registered on its own with the inner
/// transport so that it can be retired alone (see [`Lost`]).
pub(super) struct Slot<L> {
    pub(super) buf: PinnedBuffer,
    /// Its registration; taken back in [`Staged`]'s `Drop` (or when a lost
    /// slot is finally answered) before the buffer is freed.
    pub(super) reg: Option<L>,
    /// The registration's packed key, sent in requests to peers.
    pub(super) key: Vec<u8>,
}

/// Per-GPU staging state: context, stream, events and the bounce buffers.
/// Fields drop in order: the stream drains first, so no copy outlives the
/// events and bounce buffers it uses.
pub(super) struct Pool<L> {
    pub(super) stream: Stream,
    /// Events by index (a chunk's copy names its event by index).
    pub(super) events: Vec<Event>,
    pub(super) free_events: Vec<usize>,
    /// `chunks` bounce buffers of `chunk` bytes; `None` while a lost slot
    /// could not be replaced.
    pub(super) slots: Vec<Option<Slot<L>>>,
    pub(super) free_slots: Vec<usize>,
    pub(super) chunk: usize,
    pub(super) ctx: Arc<Context>,
}

impl<L> Pool<L> {
    pub(super) fn slot(&self, slot: usize) -> &Slot<L> {
        self.slots[slot]
            .as_ref()
            .expect("only slots that exist are handed out")
    }

    pub(super) fn slot_addr(&self, slot: usize) -> u64 {
        self.slot(slot).buf.addr()
    }

    /// A free event's index, made if none is free.
    pub(super) fn event(&mut self) -> Result<usize, Error> {
        if let Some(e) = self.free_events.pop() {
            return Ok(e);
        }
        self.events.push(Event::new(&self.ctx)?);
        Ok(self.events.len() - 1)
    }

    /// Enqueues copies between bounce slot `slot` and the pieces' local
    /// memory (VRAM, or host memory through unified addressing) — into the
    /// slot when `to_slot` — and records one event after them; returns the
    /// event's index.
    pub(super) fn copies(
        &mut self,
        to_slot: bool,
        slot: usize,
        pieces: &[Piece],
    ) -> Result<usize, Error> {
        let base = self.slot_addr(slot);
        let ev = self.event()?;
        self.ctx.bind()?;
        let mut res = Ok(());
        for p in pieces {
            let host = base + p.slot_off;
            let (dst, src) = if to_slot {
                (host, p.local_addr)
            } else {
                (p.local_addr, host)
            };
            let len = p.len as usize;
            // The piece lies inside the slot (`slot_off + len <= chunk`
            // bytes of the live pinned buffer); `local_addr..+len` lies in
            // a registered region (VRAM, or host memory) that stays
            // registered until the transfer completes.
            res = check(
                self.stream.copy(dst, src, len),
                &format!("cuMemcpyAsync({len} bytes, {src:#x} -> {dst:#x})"),
            );
            if res.is_err() {
                break;
            }
        }
        match res.and_then(|()| self.stream.record(&self.events[ev])) {
            Ok(()) => Ok(ev),
            Err(e) => {
                // The copies queued before the failure must be over before
                // the slot is handed out again.
                if let Err(s) = self.synchronize() {
                    log::warn!("after a failed copy: {s}");
                }
                self.free_events.push(ev);
                Err(e)
            }
        }
    }

    /// `Ok(true)` once event `ev` completed (it then goes back to the pool).
    pub(super) fn query(&mut self, ev: usize) -> Result<bool, Error> {
        self.ctx.bind()?;
        let res = self.events[ev].query();
        if res != Ok(false) {
            self.free_events.push(ev);
        }
        res
    }

    /// Waits until every copy queued on the pool's stream finished.
    pub(super) fn synchronize(&self) -> Result<(), Error> {
        self.stream.synchronize()
    }
}

/// A bounce buffer whose request timed out: the peer may still pull from
/// or push into it, so it is never reused. A fresh buffer takes its place
/// in the pool; this one is freed when the late answer arrives (or with
/// the transport).
pub(super) struct Lost<L> {
    pub(super) id: u64,
    pub(super) slot: Slot<L>,
}

/// Most bounce buffers kept for late answers; past this, a timed-out
/// buffer is not replaced and its pool shrinks.
pub(super) const MAX_LOST: usize = 64;

/// Index in [`Staged`]'s pools of GPU `dev`'s pool for this side's own
/// transfers (`serving` false) or for serving peers' requests.
pub(super) fn pool_index(dev: u32, serving: bool) -> u32 {
    dev * 2 + u32::from(serving)
}

impl<T: Transport> Staged<T> {
    /// A new bounce buffer on GPU `dev`, registered with the inner
    /// transport.
    pub(super) fn new_slot(&mut self, dev: u32) -> Result<Slot<T::LocalReg>, Error> {
        let buf = PinnedBuffer::new(dev, self.cfg.chunk)?;
        let reg = self.inner.register(&buf.region())?;
        let mut key = vec![0u8; 4096];
        let packed = loop {
            match self.inner.pack_key(&reg, &mut key) {
                Err(Error::BufferTooSmall { needed, .. }) if needed as usize > key.len() => {
                    key.resize(needed as usize, 0);
                }
                other => break other,
            }
        };
        match packed {
            Ok(n) => key.truncate(n),
            Err(e) => {
                self.inner.deregister(reg);
                return Err(e);
            }
        }
        Ok(Slot {
            buf,
            reg: Some(reg),
            key,
        })
    }

    /// Deregisters a bounce buffer; it is freed when dropped after this.
    pub(super) fn drop_slot(&mut self, mut slot: Slot<T::LocalReg>) {
        if let Some(reg) = slot.reg.take() {
            self.inner.deregister(reg);
        }
    }

    /// Makes sure GPU `dev` has the bounce pool for this side's own
    /// transfers.
    pub(super) fn pool(&mut self, dev: u32) -> Result<(), Error> {
        self.pool_at(pool_index(dev, false))
    }

    /// Makes sure pool `index` (see [`pool_index`]) exists.
    pub(super) fn pool_at(&mut self, index: u32) -> Result<(), Error> {
        let i = index as usize;
        let dev = index / 2;
        if self.pools.len() <= i {
            self.pools.resize_with(i + 1, || None);
        }
        if self.pools[i].is_some() {
            return Ok(());
        }
        let ctx = Context::new(dev)?;
        let mut slots = Vec::with_capacity(self.cfg.chunks);
        for _ in 0..self.cfg.chunks {
            match self.new_slot(dev) {
                Ok(slot) => slots.push(Some(slot)),
                Err(e) => {
                    for slot in slots.into_iter().flatten() {
                        self.drop_slot(slot);
                    }
                    return Err(e);
                }
            }
        }
        let stream = match Stream::new(&ctx) {
            Ok(stream) => stream,
            Err(e) => {
                for slot in slots.into_iter().flatten() {
                    self.drop_slot(slot);
                }
                return Err(e);
            }
        };
        log::debug!(
            "{}: staging pool {index} on device {dev}: {} x {} bytes",
            self.inner.name(),
            self.cfg.chunks,
            self.cfg.chunk,
        );
        self.pools[i] = Some(Pool {
            stream,
            events: Vec::new(),
            free_events: Vec::new(),
            slots,
            free_slots: (0..self.cfg.chunks).rev().collect(),
            chunk: self.cfg.chunk,
            ctx,
        });
        Ok(())
    }

    pub(super) fn pool_mut(
        pools: &mut [Option<Pool<T::LocalReg>>],
        index: u32,
    ) -> Option<&mut Pool<T::LocalReg>> {
        pools.get_mut(index as usize).and_then(Option::as_mut)
    }

    /// The GPU whose bounce pool moves segments with host memory on this
    /// side and VRAM on the peer's: the first pool there is, else GPU 0's.
    pub(super) fn host_pool_dev(&mut self) -> Result<u32, Error> {
        if let Some(d) = self.first_own_pool() {
            return Ok(d);
        }
        self.pool(0)?;
        Ok(0)
    }

    /// The GPU of the first pool for own transfers, if any.
    pub(super) fn first_own_pool(&self) -> Option<u32> {
        (0..self.pools.len())
            .step_by(2)
            .find(|&i| self.pools[i].is_some())
            .map(|i| i as u32 / 2)
    }

    /// Takes bounce buffer `slot` of GPU `dev` out of use for good (its
    /// request `id` timed out) and puts a fresh one in its place.
    pub(super) fn lose_slot(&mut self, id: u64, index: u32, slot: usize) {
        let dev = index / 2;
        let Some(pool) = Self::pool_mut(&mut self.pools, index) else {
            return;
        };
        let Some(old) = pool.slots[slot].take() else {
            return;
        };
        self.lost.push(Lost { id, slot: old });
        if self.lost.len() > MAX_LOST {
            log::warn!(
                "{}: {} bounce buffers wait for late answers; device {dev} is down one",
                self.inner.name(),
                self.lost.len()
            );
            return;
        }
        match self.new_slot(dev) {
            Ok(fresh) => {
                if let Some(pool) = Self::pool_mut(&mut self.pools, index) {
                    pool.slots[slot] = Some(fresh);
                    pool.free_slots.push(slot);
                }
            }
            Err(e) => log::warn!(
                "{}: replacing a bounce buffer of device {dev} failed: {e}",
                self.inner.name()
            ),
        }
    }
}
