//! The copy pool: [`CMA_WORKERS`] threads moving parts of peer-DRAM
//! transfers, each with its own streams and bounce buffers per GPU.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use kvxfer_core::{Error, XferOp};

use super::cma::{cma_copy, Part};
use super::{BOUNCE_CHUNK, BOUNCE_SLOTS, CMA_WORKERS};
use crate::driver::{check_with, Context, BACKEND};
use crate::memory::PinnedBuffer;
use crate::stream::{Event, Stream};

/// What a worker holds for one GPU: a stream, one event per bounce slot
/// and a pinned bounce buffer of [`BOUNCE_SLOTS`] × [`BOUNCE_CHUNK`]
/// bytes. Used only on the worker's thread. Fields drop in order: the
/// stream drains first, so the bounce buffer is freed only after every
/// copy into or out of it ended.
pub(super) struct WorkerGpu {
    pub(super) stream: Stream,
    pub(super) events: Vec<Event>,
    pub(super) bounce: PinnedBuffer,
    pub(super) ctx: Arc<Context>,
}

impl WorkerGpu {
    fn new(ctx: &Arc<Context>) -> Result<WorkerGpu, Error> {
        let bounce = PinnedBuffer::new(ctx.ordinal(), BOUNCE_SLOTS * BOUNCE_CHUNK)?;
        let stream = Stream::new(ctx)?;
        let events = (0..BOUNCE_SLOTS)
            .map(|_| Event::new(ctx))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(WorkerGpu {
            stream,
            events,
            bounce,
            ctx: ctx.clone(),
        })
    }

    /// This worker's state for the GPU of `ctx`, made on first use.
    pub(super) fn get<'a>(
        gpus: &'a mut Vec<WorkerGpu>,
        ctx: &Arc<Context>,
    ) -> Result<&'a mut WorkerGpu, Error> {
        let at = match gpus.iter().position(|g| g.ctx.ordinal() == ctx.ordinal()) {
            Some(at) => at,
            None => {
                gpus.push(WorkerGpu::new(ctx)?);
                gpus.len() - 1
            }
        };
        Ok(&mut gpus[at])
    }

    /// Moves `len` bytes between VRAM at `vram` and `remote` in process
    /// `pid` through the bounce buffer; returns once every byte arrived.
    /// On error the stream is drained first, so no copy into or out of the
    /// bounce buffer or the VRAM outlives the call.
    pub(super) fn bounce(
        &mut self,
        op: XferOp,
        vram: u64,
        pid: u32,
        remote: u64,
        len: u64,
    ) -> Result<(), Error> {
        self.ctx.bind()?;
        let bounce = self.bounce.addr();
        let res = match op {
            XferOp::Write => {
                bounce_write(&self.stream, &self.events, bounce, vram, pid, remote, len)
            }
            XferOp::Read => bounce_read(&self.stream, &self.events, bounce, vram, pid, remote, len),
        };
        if res.is_err() {
            if let Err(e) = self.synchronize() {
                log::warn!(
                    "draining device {} after a failed bounce copy: {e}",
                    self.ctx.ordinal()
                );
            }
        }
        res
    }

    fn synchronize(&self) -> Result<(), Error> {
        self.stream.synchronize()
    }
}

/// The queue the workers take parts from.
/// The parts not taken yet, and whether the workers are to stop.
#[derive(Default)]
struct PoolQueue {
    parts: VecDeque<Part>,
    /// Set by `Drop`: workers finish their current part and exit.
    stop: bool,
}

/// The parts waiting for a worker, and the condition workers wait on.
#[derive(Default)]
pub(super) struct WorkQueue {
    queue: Mutex<PoolQueue>,
    ready: Condvar,
}

/// [`CMA_WORKERS`] threads moving parts of peer-DRAM transfers; joined in
/// `Drop` once their current part is finished.
pub(super) struct CmaPool {
    pub(super) work: Arc<WorkQueue>,
    pub(super) threads: Vec<JoinHandle<()>>,
}

impl CmaPool {
    pub(super) fn new() -> Result<CmaPool, Error> {
        let mut pool = CmaPool {
            work: Arc::new(WorkQueue::default()),
            threads: Vec::with_capacity(CMA_WORKERS),
        };
        for i in 0..CMA_WORKERS {
            let work = pool.work.clone();
            let t = std::thread::Builder::new()
                .name(format!("kvxfer-cma-{i}"))
                .spawn(move || worker(&work))
                .map_err(|e| {
                    Error::backend(
                        BACKEND,
                        e.raw_os_error().unwrap_or(0) as i64,
                        &format!("starting a cross-memory-attach worker: {e}"),
                    )
                })?; // on error `pool` drops and joins the ones started
            pool.threads.push(t);
        }
        Ok(pool)
    }

    pub(super) fn submit(&self, parts: Vec<Part>) {
        let mut q = self.work.queue.lock().unwrap_or_else(|p| p.into_inner());
        let n = parts.len();
        q.parts.extend(parts);
        drop(q);
        if n == 1 {
            self.work.ready.notify_one();
        } else {
            self.work.ready.notify_all();
        }
    }
}

impl Drop for CmaPool {
    fn drop(&mut self) {
        {
            let mut q = self.work.queue.lock().unwrap_or_else(|p| p.into_inner());
            q.stop = true;
            // Their transfers are never reported: the transport is going.
            q.parts.clear();
        }
        self.work.ready.notify_all();
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                log::warn!("a cross-memory-attach worker panicked");
            }
        }
    }
}

/// A worker: takes parts until told to stop, then releases its streams,
/// events and bounce buffers.
fn worker(work: &WorkQueue) {
    let mut gpus: Vec<WorkerGpu> = Vec::new();
    loop {
        let part = {
            let mut q = work.queue.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if q.stop {
                    return;
                }
                if let Some(p) = q.parts.pop_front() {
                    break p;
                }
                q = work.ready.wait(q).unwrap_or_else(|p| p.into_inner());
            }
        };
        part.run(&mut gpus);
    }
}

/// WRITE from VRAM at `vram` to `len` bytes at `remote` in process `pid`:
/// chunk `c` goes device-to-host into slot `c % BOUNCE_SLOTS`, and is
/// written to the peer once its event completed, while later chunks are
/// already copying. The context of the stream's GPU is current.
fn bounce_write(
    stream: &Stream,
    events: &[Event],
    bounce: u64,
    vram: u64,
    pid: u32,
    remote: u64,
    len: u64,
) -> Result<(), Error> {
    let chunk = BOUNCE_CHUNK as u64;
    let mut pending: VecDeque<(usize, u64, u64)> = VecDeque::with_capacity(BOUNCE_SLOTS);
    let (mut off, mut c) = (0u64, 0usize);
    while off < len || !pending.is_empty() {
        if off < len && pending.len() < BOUNCE_SLOTS {
            let slot = c % BOUNCE_SLOTS;
            let n = chunk.min(len - off);
            let host = bounce + slot as u64 * chunk;
            // The slot holds `chunk` >= `n` bytes of pinned memory that no
            // other copy uses (its previous chunk was written out before it
            // left `pending`); the device range lies inside the local
            // registration.
            check_with(stream.copy_dtoh(host, vram + off, n as usize), || {
                format!("WRITE bounce: device {:#x} -> host, {n} bytes", vram + off)
            })?;
            stream.record(&events[slot])?;
            pending.push_back((slot, off, n));
            off += n;
            c += 1;
        } else if let Some((slot, at, n)) = pending.pop_front() {
            events[slot].synchronize()?;
            cma_copy(
                XferOp::Write,
                pid,
                bounce + slot as u64 * chunk,
                remote + at,
                n,
            )?;
        }
    }
    Ok(())
}

/// READ of `len` bytes at `remote` in process `pid` into VRAM at `vram`:
/// chunk `c` is read into slot `c % BOUNCE_SLOTS` (once the slot's previous
/// host-to-device copy completed) and copied to the GPU while the next
/// chunk is read. Returns after the last copy completed.
fn bounce_read(
    stream: &Stream,
    events: &[Event],
    bounce: u64,
    vram: u64,
    pid: u32,
    remote: u64,
    len: u64,
) -> Result<(), Error> {
    let chunk = BOUNCE_CHUNK as u64;
    let mut busy = [false; BOUNCE_SLOTS];
    let (mut off, mut c) = (0u64, 0usize);
    while off < len {
        let slot = c % BOUNCE_SLOTS;
        let n = chunk.min(len - off);
        let host = bounce + slot as u64 * chunk;
        if busy[slot] {
            events[slot].synchronize()?;
        }
        cma_copy(XferOp::Read, pid, host, remote + off, n)?;
        // The slot holds `n` bytes just read and is not reused before this
        // copy's event completed; the device range lies inside the local
        // registration.
        check_with(stream.copy_htod(vram + off, host, n as usize), || {
            format!("READ bounce: host -> device {:#x}, {n} bytes", vram + off)
        })?;
        stream.record(&events[slot])?;
        busy[slot] = true;
        off += n;
        c += 1;
    }
    for (slot, b) in busy.iter().enumerate() {
        if *b {
            events[slot].synchronize()?;
        }
    }
    Ok(())
}
