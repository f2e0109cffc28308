//! Worker threads that run cross-memory-attach parts, and the progress of
//! each transfer they serve.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;

use kvxfer_core::{Error, XferOp};

use crate::copy;

/// How far one transfer's parts have got.
#[derive(Default)]
pub struct Progress {
    /// Parts not finished yet.
    left: AtomicUsize,
    /// Set by `cancel`: parts not started are skipped.
    cancelled: AtomicBool,
    /// The first error of a part.
    error: Mutex<Option<Error>>,
}

impl Progress {
    /// Progress of a transfer whose parts are still being submitted: it
    /// is not finished before [`sealed`](Progress::seal).
    pub fn open() -> Arc<Progress> {
        Arc::new(Progress {
            left: AtomicUsize::new(1),
            ..Progress::default()
        })
    }

    /// No more parts will be submitted.
    pub fn seal(&self) {
        self.left.fetch_sub(1, Ordering::AcqRel);
    }

    /// Whether every part has finished (or been skipped).
    pub fn finished(&self) -> bool {
        self.left.load(Ordering::Acquire) == 0
    }

    /// Makes a finished progress ready for another transfer; `false` if a
    /// worker still holds it (it is then dropped instead).
    pub fn recycle(this: &mut Arc<Progress>) -> bool {
        // The worker that finished the last part lets go of its clone right
        // after counting it: wait a moment for that.
        for _ in 0..1000 {
            if let Some(p) = Arc::get_mut(this) {
                *p.left.get_mut() = 1;
                *p.cancelled.get_mut() = false;
                *p.error.get_mut().unwrap_or_else(PoisonError::into_inner) = None;
                return true;
            }
            std::hint::spin_loop();
        }
        false
    }

    /// Stops parts not started yet.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release);
    }

    /// The first error, once finished.
    pub fn take_error(&self) -> Option<Error> {
        self.error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    fn fail(&self, e: Error) {
        let mut first = self.error.lock().unwrap_or_else(PoisonError::into_inner);
        if first.is_none() {
            *first = Some(e);
        }
    }

    fn failed(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
            || self
                .error
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_some()
    }
}

/// Pieces `(local, remote, len)` of one transfer moved by one call or a few.
pub struct Part {
    /// The transfer's progress.
    pub progress: Arc<Progress>,
    /// READ or WRITE.
    pub op: XferOp,
    /// The peer process.
    pub pid: u32,
    /// The pieces.
    pub pieces: Vec<(u64, u64, u64)>,
}

struct Queue {
    parts: VecDeque<Part>,
    stop: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
    /// Emptied piece lists, reused for the next parts (no allocation per
    /// part once warm).
    stash: Mutex<Vec<Vec<(u64, u64, u64)>>>,
}

/// A fixed set of worker threads.
pub struct Pool {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Pool {
    /// Starts `workers` threads.
    pub fn new(workers: usize) -> Result<Pool, std::io::Error> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                parts: VecDeque::new(),
                stop: false,
            }),
            ready: Condvar::new(),
            stash: Mutex::new(Vec::new()),
        });
        let mut pool = Pool {
            shared,
            threads: Vec::new(),
        };
        for i in 0..workers.max(1) {
            let shared = Arc::clone(&pool.shared);
            let t = std::thread::Builder::new()
                .name(format!("kvxfer-cma-{i}"))
                .spawn(move || work(&shared))?;
            pool.threads.push(t);
        }
        Ok(pool)
    }

    /// An empty piece list, reused if one is spare.
    pub fn pieces(&self) -> Vec<(u64, u64, u64)> {
        let spare = self
            .shared
            .stash
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        spare.unwrap_or_else(|| Vec::with_capacity(crate::ffi::IOV_MAX))
    }

    /// Returns an unused piece list to the stash.
    pub fn put_back(&self, mut pieces: Vec<(u64, u64, u64)>) {
        pieces.clear();
        self.shared
            .stash
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(pieces);
    }

    /// Queues `part`.
    pub fn submit(&self, part: Part) {
        part.progress.left.fetch_add(1, Ordering::AcqRel);
        self.lock().parts.push_back(part);
        self.shared.ready.notify_one();
    }

    /// Runs one queued part on the calling thread, if any is queued;
    /// returns whether it did.
    pub fn help(&self) -> bool {
        let part = self.lock().parts.pop_front();
        match part {
            Some(p) => {
                run(p, &self.shared);
                true
            }
            None => false,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.shared
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

fn work(shared: &Shared) {
    loop {
        let part = {
            let mut q = shared.queue.lock().unwrap_or_else(PoisonError::into_inner);
            loop {
                if q.stop {
                    return;
                }
                if let Some(p) = q.parts.pop_front() {
                    break p;
                }
                q = shared.ready.wait(q).unwrap_or_else(PoisonError::into_inner);
            }
        };
        run(part, shared);
    }
}

/// Moves one part (unless its transfer already failed or was cancelled)
/// and counts it finished.
fn run(part: Part, shared: &Shared) {
    let Part {
        progress,
        op,
        pid,
        mut pieces,
    } = part;
    if !progress.failed() {
        if let Err(e) = copy(op, pid, &pieces) {
            progress.fail(e);
        }
    }
    pieces.clear();
    shared
        .stash
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(pieces);
    progress.left.fetch_sub(1, Ordering::AcqRel);
}

impl Drop for Pool {
    /// Lets each worker finish its current part, drops the queued ones
    /// (their transfers were cancelled or the transport is going away) and
    /// joins the workers.
    fn drop(&mut self) {
        {
            let mut q = self.lock();
            q.stop = true;
            for p in q.parts.drain(..) {
                p.progress.left.fetch_sub(1, Ordering::AcqRel);
            }
        }
        self.shared.ready.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
