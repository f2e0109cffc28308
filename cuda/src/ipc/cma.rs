//! Cross-memory attach: peer-DRAM pieces, their grouping into parts for
//! the workers, and the `process_vm_*` copies.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use kvxfer_core::{Error, XferOp};

use super::pool::{CmaPool, WorkerGpu};
use super::{CudaIpcTransport, CMA_INLINE_MAX, CMA_MAX_CALL, CMA_PART};
use crate::driver::{Context, BACKEND};
use crate::os;

/// Progress of the parts of one transfer handed to the workers.
#[derive(Debug, Default)]
pub(super) struct CmaParts {
    /// Parts not finished (or skipped) yet.
    pub(super) left: AtomicUsize,
    /// Set at the first error: parts not started yet are skipped.
    pub(super) failed: AtomicBool,
    /// The first error.
    pub(super) error: Mutex<Option<Error>>,
}

impl CmaParts {
    pub(super) fn new(parts: usize) -> CmaParts {
        CmaParts {
            left: AtomicUsize::new(parts),
            ..CmaParts::default()
        }
    }

    /// Whether every part has finished: nothing touches the transfer's
    /// memory any more.
    pub(super) fn done(&self) -> bool {
        self.left.load(Ordering::Acquire) == 0
    }

    /// Records `e` unless an earlier error was recorded.
    pub(super) fn fail(&self, e: Error) {
        let mut first = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if first.is_none() {
            *first = Some(e);
        }
        self.failed.store(true, Ordering::Release);
    }

    /// The first error, once [`done`](Self::done).
    pub(super) fn take_error(&self) -> Option<Error> {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// One contiguous range between local memory and a peer's DRAM.
#[derive(Debug)]
pub(super) struct Piece {
    /// The peer's process id.
    pub(super) pid: u32,
    pub(super) local: u64,
    pub(super) remote: u64,
    pub(super) len: u64,
    /// The context of the local GPU when the local side is VRAM (moved
    /// through a bounce buffer); `None` for local DRAM.
    pub(super) vram: Option<Arc<Context>>,
}

/// The unit of work of a worker: pieces of one transfer, at most
/// [`CMA_PART`] bytes in all.
#[derive(Debug)]
pub(super) struct Part {
    pub(super) op: XferOp,
    pub(super) pieces: Vec<Piece>,
    pub(super) parts: Arc<CmaParts>,
}

impl Part {
    /// Moves the pieces in order, stopping at the first error, unless the
    /// transfer already failed; then counts the part as finished.
    pub(super) fn run(self, gpus: &mut Vec<WorkerGpu>) {
        if !self.parts.failed.load(Ordering::Acquire) {
            for p in &self.pieces {
                let res = match &p.vram {
                    None => cma_copy(self.op, p.pid, p.local, p.remote, p.len),
                    Some(ctx) => WorkerGpu::get(gpus, ctx)
                        .and_then(|g| g.bounce(self.op, p.local, p.pid, p.remote, p.len)),
                };
                if let Err(e) = res {
                    self.parts.fail(e);
                    break;
                }
            }
        }
        self.parts.left.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Appends `len` bytes between `local` and `remote` to `out` as pieces of
/// at most [`CMA_PART`] bytes, so that several workers share a long range.
pub(super) fn split_into(
    out: &mut Vec<Piece>,
    pid: u32,
    local: u64,
    remote: u64,
    len: u64,
    vram: Option<Arc<Context>>,
) {
    let mut at = 0;
    while at < len {
        let n = (len - at).min(CMA_PART);
        out.push(Piece {
            pid,
            local: local + at,
            remote: remote + at,
            len: n,
            vram: vram.clone(),
        });
        at += n;
    }
}

/// Groups `pieces` in order into parts of at most [`CMA_PART`] bytes (a
/// piece is never split here), all counted by the returned [`CmaParts`].
pub(super) fn into_parts(op: XferOp, pieces: Vec<Piece>) -> (Arc<CmaParts>, Vec<Part>) {
    let mut groups: Vec<Vec<Piece>> = Vec::new();
    let mut bytes = 0;
    for p in pieces {
        match groups.last_mut() {
            Some(g) if bytes + p.len <= CMA_PART => {
                bytes += p.len;
                g.push(p);
            }
            _ => {
                bytes = p.len;
                groups.push(vec![p]);
            }
        }
    }
    let parts = Arc::new(CmaParts::new(groups.len()));
    let work = groups
        .into_iter()
        .map(|pieces| Part {
            op,
            pieces,
            parts: parts.clone(),
        })
        .collect();
    (parts, work)
}

/// Fails with `RemoteDisconnected` when process `pid` no longer exists
/// (`kill(pid, 0)` gives `ESRCH`), so a transfer to a peer that is gone is
/// refused at `post`. A peer that exits later fails the transfer in `poll`.
pub(super) fn check_alive(pid: u32) -> Result<(), Error> {
    if os::process_gone(pid) {
        return Err(Error::disconnected(&format!(
            "CUDA_IPC peer pid {pid} is gone"
        )));
    }
    Ok(())
}

/// Name of the cross-memory-attach call that moves data for `op`.
pub(super) fn cma_call(op: XferOp) -> &'static str {
    match op {
        XferOp::Write => "process_vm_writev",
        XferOp::Read => "process_vm_readv",
    }
}

/// The error for `errno` from a cross-memory-attach call on process `pid`
/// that failed at `local` / `remote` after `moved` of `len` bytes.
pub(super) fn cma_error(
    op: XferOp,
    pid: u32,
    errno: i32,
    local: u64,
    remote: u64,
    moved: u64,
    len: u64,
) -> Error {
    let call = cma_call(op);
    match errno {
        libc::EPERM => {
            log::warn!(
                "{call} on pid {pid} refused (EPERM): cross-memory attach needs ptrace \
                 permission over the peer (same user and a dumpable process, or \
                 CAP_SYS_PTRACE); Yama ptrace_scope >= 1 or a container's seccomp \
                 profile can refuse it"
            );
            Error::backend(
                BACKEND,
                errno as i64,
                &format!("{call}: cross-memory attach to pid {pid} refused (ptrace/Yama/seccomp)"),
            )
        }
        libc::ESRCH => Error::disconnected(&format!("CUDA_IPC peer pid {pid} is gone")),
        libc::EFAULT => Error::backend(
            BACKEND,
            errno as i64,
            &format!("{call} pid {pid}: EFAULT at remote {remote:#x}, local {local:#x}"),
        ),
        _ => {
            let e = std::io::Error::from_raw_os_error(errno);
            Error::backend(
                BACKEND,
                errno as i64,
                &format!("{call} pid {pid}, {moved} of {len} bytes moved: {e}"),
            )
        }
    }
}

/// Moves `len` bytes between `local` in this process and `remote` in
/// process `pid` with cross-memory attach: WRITE copies local to remote,
/// READ remote to local. A short count is continued from where it stopped;
/// a call that moves nothing or fails gives an error naming the pid and the
/// address it stopped at.
pub(super) fn cma_copy(
    op: XferOp,
    pid: u32,
    local: u64,
    remote: u64,
    len: u64,
) -> Result<(), Error> {
    let mut moved = 0u64;
    while moved < len {
        let n = (len - moved).min(CMA_MAX_CALL) as usize;
        let (l, r) = (local + moved, remote + moved);
        // `l..l+n` lies in a registration of the transfer in flight (or a
        // worker's bounce buffer) that outlives the call.
        let res = match os::process_vm(op, pid, l, r, n) {
            Ok(res) => res,
            Err(libc::EINTR) => continue,
            Err(errno) => return Err(cma_error(op, pid, errno, l, r, moved, len)),
        };
        if res == 0 {
            return Err(Error::backend(
                BACKEND,
                0,
                &format!(
                    "{} pid {pid}: stopped at remote {r:#x}, {moved} of {len} bytes moved",
                    cma_call(op)
                ),
            ));
        }
        moved += res as u64;
    }
    Ok(())
}

impl CudaIpcTransport {
    /// Moves `pieces` (of a transfer to or from a peer's DRAM):
    /// inside this call where they are few bytes of local DRAM, otherwise
    /// grouped into parts of at most [`CMA_PART`] bytes for the workers.
    pub(super) fn start_cma(
        &mut self,
        op: XferOp,
        pieces: Vec<Piece>,
    ) -> Result<Arc<CmaParts>, Error> {
        let total: u64 = pieces.iter().map(|p| p.len).sum();
        if total <= CMA_INLINE_MAX && pieces.iter().all(|p| p.vram.is_none()) {
            let parts = CmaParts::new(0);
            for p in &pieces {
                if let Err(e) = cma_copy(op, p.pid, p.local, p.remote, p.len) {
                    parts.fail(e);
                    break;
                }
            }
            return Ok(Arc::new(parts));
        }
        let (parts, work) = into_parts(op, pieces);
        if self.pool.is_none() {
            self.pool = Some(CmaPool::new()?);
        }
        if let Some(pool) = &self.pool {
            pool.submit(work);
        }
        Ok(parts)
    }
}
