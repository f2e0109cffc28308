//! `kvxfer-local`: peers on the same host over cross-memory attach, the
//! others through an inner transport.
//!
//! [`Local<T>`] wraps a host-memory transport (UCX, libfabric). Its address
//! carries this host's boot id, pid namespace and process id before the
//! inner transport's address. A peer with the same boot id and pid
//! namespace, whose memory this process may read (checked at connect by
//! reading a marker from it), is moved to and from with
//! `process_vm_writev` / `process_vm_readv`: up to 1,024 blocks per call,
//! parts spread over worker threads. Its process is watched through a
//! pidfd: a post to a peer that exited fails at once with
//! `RemoteDisconnected`, and a part that meets a vanished process (`ESRCH`)
//! fails its transfer the same way. Notifications, and everything to other
//! peers, go through the inner transport; a notification attached to a
//! transfer is sent once all its bytes have moved.
//!
//! Cross-memory attach moves host memory only. Where the inner transport
//! registers GPU memory itself (UCX built with CUDA), a transfer with VRAM
//! on either side goes to the inner transport, same host or not.
//!
//! Cross-memory attach needs ptrace permission over the peer (same user;
//! Yama `ptrace_scope` 0, or 1 with the peer a descendant). Where it is
//! refused, the peer is served by the inner transport. The remote side
//! does not check the addresses: they come from the peer's metadata, so
//! only metadata from trusted peers may be loaded (see the README's
//! security section).
#![deny(unsafe_code)]
#![deny(missing_docs)]
#![allow(clippy::result_large_err)]

mod ffi;
mod pool;

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use kvxfer_core::{
    Capabilities, Completion, Error, MemKind, PostStatus, Region, Segments, Token, Transport,
    XferOp,
};

use pool::{Part, Pool, Progress};

/// Environment variable: `0` serves same-host peers through the inner
/// transport too.
pub const ENV: &str = "KVXFER_SAME_HOST_CMA";

/// Settings of [`Local`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct LocalConfig {
    /// Use cross-memory attach for same-host peers (default on; `ENV=0`
    /// turns it off).
    pub enabled: bool,
    /// Worker threads (default: one less than the CPUs, 1 to 4); the
    /// thread that polls moves parts too while it waits.
    pub workers: usize,
    /// A transfer of at most this many bytes is moved inside `post`
    /// (default 1 MiB: one `process_vm_writev` in the caller's thread, as
    /// fast as handing it to a worker and without the thread hops).
    pub inline_max: u64,
    /// Most bytes of one part (default 4 MiB); a part is also at most
    /// 1,024 blocks.
    pub part_bytes: u64,
}

impl Default for LocalConfig {
    fn default() -> Self {
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        LocalConfig {
            enabled: true,
            workers: cpus.saturating_sub(1).clamp(1, 4),
            inline_max: 1 << 20,
            part_bytes: 4 << 20,
        }
    }
}

impl LocalConfig {
    /// The defaults, with `enabled` off when [`ENV`] is `0`.
    pub fn from_env() -> Self {
        let enabled = std::env::var(ENV).map_or(true, |v| v.trim() != "0");
        LocalConfig {
            enabled,
            ..LocalConfig::default()
        }
    }
}

/// Start of an address written by [`Local`].
const MAGIC: &[u8; 4] = b"KVXL";
/// Bytes before the inner address: magic, boot id (36), pid namespace (8),
/// pid (4), marker address (8), marker value (8).
const HEADER: usize = 4 + 36 + 8 + 4 + 8 + 8;

/// This process: host, pid namespace, pid, and a marker a peer reads to
/// prove it can reach this process's memory.
struct Me {
    boot_id: [u8; 36],
    pid_ns: u64,
    pid: u32,
}

fn me() -> &'static Option<Me> {
    static ME: OnceLock<Option<Me>> = OnceLock::new();
    ME.get_or_init(|| {
        let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
        let boot_id: [u8; 36] = boot.trim().as_bytes().try_into().ok()?;
        let pid_ns = std::fs::metadata("/proc/self/ns/pid").ok()?.ino();
        Some(Me {
            boot_id,
            pid_ns,
            pid: std::process::id(),
        })
    })
}

/// The marker: a value unlikely anywhere else, at a fixed address.
static MARKER: AtomicU64 = AtomicU64::new(0);

fn marker() -> (u64, u64) {
    let mut v = MARKER.load(Ordering::Relaxed);
    if v == 0 {
        let mut seed = [0u8; 8];
        let random = std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut seed));
        let seed = match random {
            Ok(()) => u64::from_le_bytes(seed),
            Err(_) => {
                let t = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64);
                (std::process::id() as u64) << 32 ^ t
            }
        };
        let _ = MARKER.compare_exchange(0, seed | 1, Ordering::Relaxed, Ordering::Relaxed);
        v = MARKER.load(Ordering::Relaxed);
    }
    (MARKER.as_ptr() as usize as u64, v)
}

/// Moves `pieces` with cross-memory attach, continuing short counts.
fn copy(op: XferOp, pid: u32, pieces: &[(u64, u64, u64)]) -> Result<(), Error> {
    let write = op == XferOp::Write;
    let mut rest: Vec<(u64, u64, u64)>;
    let mut todo: &[(u64, u64, u64)] = pieces;
    while !todo.is_empty() {
        let batch = &todo[..todo.len().min(ffi::IOV_MAX)];
        let asked: u64 = batch.iter().map(|p| p.2).sum();
        let moved = match ffi::cma(write, pid, batch) {
            Ok(n) => n as u64,
            Err(libc::EINTR) => continue,
            Err(errno) => return Err(cma_error(op, pid, errno, batch[0])),
        };
        if moved == asked {
            todo = &todo[batch.len()..];
            continue;
        }
        if moved == 0 {
            return Err(backend(
                libc::EFAULT,
                &format!(
                    "{} pid {pid}: nothing moved at remote {:#x}",
                    call(op),
                    batch[0].1
                ),
            ));
        }
        // Short count: start again where it stopped.
        let mut skip = moved;
        let mut k = 0;
        while k < batch.len() && skip >= batch[k].2 {
            skip -= batch[k].2;
            k += 1;
        }
        let (l, r, len) = batch[k];
        let mut next = vec![(l + skip, r + skip, len - skip)];
        next.extend_from_slice(&todo[k + 1..]);
        rest = next;
        todo = &rest;
    }
    Ok(())
}

fn call(op: XferOp) -> &'static str {
    match op {
        XferOp::Write => "process_vm_writev",
        XferOp::Read => "process_vm_readv",
    }
}

fn backend(code: i32, text: &str) -> Error {
    Error::backend("LOCAL", code as i64, text)
}

fn cma_error(op: XferOp, pid: u32, errno: i32, at: (u64, u64, u64)) -> Error {
    match errno {
        libc::ESRCH => Error::disconnected(""),
        libc::EFAULT => backend(
            errno,
            &format!(
                "{} pid {pid}: EFAULT at local {:#x} / remote {:#x} ({} bytes)",
                call(op),
                at.0,
                at.1,
                at.2
            ),
        ),
        _ => backend(
            errno,
            &format!(
                "{} pid {pid}: {}",
                call(op),
                std::io::Error::from_raw_os_error(errno)
            ),
        ),
    }
}

/// A peer on this host that cross-memory attach reaches.
struct Near {
    pid: u32,
    pidfd: OwnedFd,
}

/// A connected peer.
struct PeerEntry<P> {
    inner: P,
    near: Option<Near>,
}

/// A peer as the core holds it.
#[derive(Debug)]
pub struct LocalPeer {
    id: u64,
}

/// A transfer moving by cross-memory attach.
struct CmaXfer {
    token: Token,
    peer: u64,
    progress: Arc<Progress>,
    note: Option<Vec<u8>>,
}

/// Same-host peers over cross-memory attach, others through `T`.
pub struct Local<T: Transport> {
    inner: T,
    config: LocalConfig,
    peers: HashMap<u64, PeerEntry<T::Peer>>,
    /// Peers served by the inner transport.
    far: usize,
    next_peer: u64,
    xfers: Vec<CmaXfer>,
    pool: Option<Pool>,
    done: u64,
    /// Reused between requests, so that the hot path does not allocate:
    /// pieces of an inline transfer, finished progress records and
    /// notification buffers.
    scratch: Vec<(u64, u64, u64)>,
    spare_progress: Vec<Arc<Progress>>,
    spare_notes: Vec<Vec<u8>>,
}

impl<T: Transport> Local<T> {
    /// Wraps `inner`. The worker threads start with the first transfer
    /// that needs them.
    pub fn new(inner: T, config: LocalConfig) -> Self {
        Local {
            inner,
            config,
            peers: HashMap::new(),
            far: 0,
            next_peer: 1,
            xfers: Vec::new(),
            pool: None,
            done: 0,
            scratch: Vec::new(),
            spare_progress: Vec::new(),
            spare_notes: Vec::new(),
        }
    }

    /// The inner transport.
    pub fn inner(&self) -> &T {
        &self.inner
    }

    /// Transfers finished by cross-memory attach so far.
    pub fn cma_transfers(&self) -> u64 {
        self.done
    }

    /// Connected peers served by the inner transport (not on this host, or
    /// not reachable by cross-memory attach).
    pub fn far_peers(&self) -> usize {
        self.far
    }

    /// Whether `peer` is served by cross-memory attach.
    pub fn is_near(&self, peer: &LocalPeer) -> bool {
        self.peers.get(&peer.id).is_some_and(|p| p.near.is_some())
    }

    fn entry(&self, peer: &LocalPeer) -> Result<&PeerEntry<T::Peer>, Error> {
        self.peers
            .get(&peer.id)
            .ok_or_else(|| backend(libc::EINVAL, "peer handle of another transport"))
    }

    /// Checks whether the peer described by `header` is on this host and
    /// reachable by cross-memory attach.
    fn reach(&self, header: &[u8]) -> Option<Near> {
        let me = me().as_ref()?;
        let boot_id = &header[4..40];
        let pid_ns = u64::from_le_bytes(header[40..48].try_into().ok()?);
        let pid = u32::from_le_bytes(header[48..52].try_into().ok()?);
        let addr = u64::from_le_bytes(header[52..60].try_into().ok()?);
        let value = u64::from_le_bytes(header[60..68].try_into().ok()?);
        if !self.config.enabled || boot_id != me.boot_id || pid_ns != me.pid_ns || pid == me.pid {
            return None;
        }
        let pidfd = match ffi::pidfd_open(pid) {
            Ok(fd) => fd,
            Err(errno) => {
                log::debug!("same-host peer pid {pid}: pidfd_open failed (errno {errno})");
                return None;
            }
        };
        let mut seen = 0u64;
        let probe = [(std::ptr::addr_of_mut!(seen) as usize as u64, addr, 8)];
        match ffi::cma(false, pid, &probe) {
            Ok(8) if std::hint::black_box(seen) == value => Some(Near { pid, pidfd }),
            Ok(_) => {
                log::debug!("same-host peer pid {pid}: marker mismatch; using the network path");
                None
            }
            Err(errno) => {
                log::info!(
                    "same-host peer pid {pid}: cross-memory attach refused ({}); using the \
                     network path",
                    std::io::Error::from_raw_os_error(errno)
                );
                None
            }
        }
    }

    /// Moves `segments` to or from near peer `pid`: inline when they are
    /// at most `inline_max` bytes, else by parts handed to the workers as
    /// soon as each is cut.
    fn post_cma(
        &mut self,
        op: XferOp,
        peer_id: u64,
        pid: u32,
        segments: Segments<'_, T::LocalReg, T::RemoteKey>,
        notification: Option<&[u8]>,
        token: Token,
    ) -> Result<PostStatus, Error> {
        let total: u64 = segments.iter().map(|s| s.len).sum();
        if total <= self.config.inline_max {
            self.scratch.clear();
            self.scratch.extend(
                segments
                    .iter()
                    .map(|s| (s.local_addr, s.remote_addr, s.len)),
            );
            copy(op, pid, &self.scratch)?;
            self.done += 1;
            return match notification {
                Some(n) => self.post_note(peer_id, n, token),
                None => Ok(PostStatus::Done),
            };
        }
        if self.pool.is_none() {
            let pool = Pool::new(self.config.workers).map_err(|e| {
                backend(
                    e.raw_os_error().unwrap_or(0),
                    &format!("start workers: {e}"),
                )
            })?;
            self.pool = Some(pool);
        }
        let Some(pool) = &self.pool else {
            return Err(backend(libc::EINVAL, "no workers"));
        };
        let progress = self.spare_progress.pop().unwrap_or_else(Progress::open);
        let part_bytes = self.config.part_bytes.max(1);
        let part = |pieces| Part {
            progress: Arc::clone(&progress),
            op,
            pid,
            pieces,
        };
        let mut cur = pool.pieces();
        let mut cur_bytes = 0u64;
        for s in segments.iter() {
            let mut off = 0;
            while off < s.len {
                let n = (s.len - off).min(part_bytes - cur_bytes);
                cur.push((s.local_addr + off, s.remote_addr + off, n));
                cur_bytes += n;
                off += n;
                if cur_bytes == part_bytes || cur.len() == ffi::IOV_MAX {
                    let full = std::mem::replace(&mut cur, pool.pieces());
                    pool.submit(part(full));
                    cur_bytes = 0;
                }
            }
        }
        if cur.is_empty() {
            pool.put_back(cur);
        } else {
            pool.submit(part(cur));
        }
        progress.seal();
        let note = notification.map(|n| {
            let mut v = self.spare_notes.pop().unwrap_or_default();
            v.clear();
            v.extend_from_slice(n);
            v
        });
        self.xfers.push(CmaXfer {
            token,
            peer: peer_id,
            progress,
            note,
        });
        Ok(PostStatus::InProgress)
    }

    /// Whether a segment lies in GPU memory on either side (only where the
    /// inner transport registers GPU memory at all).
    fn touches_vram(&self, segments: Segments<'_, T::LocalReg, T::RemoteKey>) -> bool {
        let vram = MemKind::Vram;
        self.inner.capabilities().mem_kinds.contains(vram)
            && segments.iter().any(|s| {
                self.inner.local_kind(s.local) == vram || self.inner.remote_kind(s.remote) == vram
            })
    }

    /// Hands the notification of a transfer whose data has moved to the
    /// inner transport, as a transfer without segments under the same
    /// token: its completion (once the message is out) completes the
    /// transfer.
    fn post_note(&mut self, peer_id: u64, note: &[u8], token: Token) -> Result<PostStatus, Error> {
        let entry = self
            .peers
            .get(&peer_id)
            .ok_or_else(|| Error::disconnected(""))?;
        let none: &[kvxfer_core::Segment<'_, T::LocalReg, T::RemoteKey>] = &[];
        self.inner
            .post(XferOp::Write, &entry.inner, none.into(), Some(note), token)
    }

    /// One finished cross-memory-attach transfer, if any. One with a
    /// notification is handed on to the inner transport, which reports it.
    fn poll_cma(&mut self) -> Option<Completion> {
        loop {
            if self.xfers.is_empty() {
                return None;
            }
            let pos = match self.xfers.iter().position(|x| x.progress.finished()) {
                Some(p) => p,
                None => {
                    // The caller is waiting: move a part rather than spin.
                    if let Some(pool) = &self.pool {
                        pool.help();
                    }
                    self.xfers.iter().position(|x| x.progress.finished())?
                }
            };
            let CmaXfer {
                token,
                peer,
                mut progress,
                note,
            } = self.xfers.swap_remove(pos);
            self.done += 1;
            let error = progress.take_error();
            if Progress::recycle(&mut progress) {
                self.spare_progress.push(progress);
            }
            let result = match (error, &note) {
                (Some(e), _) => Err(e),
                (None, None) => Ok(()),
                (None, Some(n)) => match self.post_note(peer, n, token) {
                    Ok(PostStatus::InProgress) => {
                        self.spare_notes.extend(note);
                        continue;
                    }
                    Ok(PostStatus::Done) => Ok(()),
                    Err(e) => Err(e),
                },
            };
            self.spare_notes.extend(note);
            return Some(Completion { token, result });
        }
    }
}

impl<T: Transport> Transport for Local<T> {
    type LocalReg = T::LocalReg;
    type Peer = LocalPeer;
    type RemoteKey = T::RemoteKey;

    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn capabilities(&self) -> Capabilities {
        let mut c = self.inner.capabilities();
        c.may_complete_inline = true;
        c
    }

    fn register(&mut self, region: &Region) -> Result<T::LocalReg, Error> {
        self.inner.register(region)
    }

    fn deregister(&mut self, reg: T::LocalReg) {
        self.inner.deregister(reg)
    }

    fn arm(&mut self) -> kvxfer_core::Wake {
        if self.xfers.is_empty() {
            self.inner.arm()
        } else {
            kvxfer_core::Wake::Busy
        }
    }

    fn in_use(&mut self, reg: &T::LocalReg) -> bool {
        // Cross-memory-attach parts end before `cancel` returns.
        self.inner.in_use(reg)
    }

    fn pack_key(&self, reg: &T::LocalReg, out: &mut [u8]) -> Result<usize, Error> {
        self.inner.pack_key(reg, out)
    }

    fn local_address(&self, out: &mut [u8]) -> Result<usize, Error> {
        let Some(me) = me().as_ref() else {
            return self.inner.local_address(out);
        };
        if out.len() < HEADER {
            // The whole length, as for any other buffer too small.
            let inner = match self.inner.local_address(&mut []) {
                Ok(n) => n as u64,
                Err(Error::BufferTooSmall { needed, .. }) => needed,
                Err(e) => return Err(e),
            };
            return Err(Error::BufferTooSmall {
                needed: HEADER as u64 + inner,
                available: out.len() as u64,
            });
        }
        let (addr, value) = marker();
        let (head, rest) = out.split_at_mut(HEADER);
        head[..4].copy_from_slice(MAGIC);
        head[4..40].copy_from_slice(&me.boot_id);
        head[40..48].copy_from_slice(&me.pid_ns.to_le_bytes());
        head[48..52].copy_from_slice(&me.pid.to_le_bytes());
        head[52..60].copy_from_slice(&addr.to_le_bytes());
        head[60..68].copy_from_slice(&value.to_le_bytes());
        match self.inner.local_address(rest) {
            Ok(n) => Ok(HEADER + n),
            Err(Error::BufferTooSmall { needed, .. }) => Err(Error::BufferTooSmall {
                needed: needed + HEADER as u64,
                available: out.len() as u64,
            }),
            Err(e) => Err(e),
        }
    }

    fn connect(&mut self, address: &[u8]) -> Result<LocalPeer, Error> {
        let (near, inner_addr) = match address.get(..HEADER) {
            Some(head) if head.starts_with(MAGIC) => (self.reach(head), &address[HEADER..]),
            _ => (None, address),
        };
        let inner = self.inner.connect(inner_addr)?;
        let id = self.next_peer;
        self.next_peer += 1;
        match &near {
            Some(n) => log::debug!("peer pid {} is on this host: cross-memory attach", n.pid),
            None => self.far += 1,
        }
        self.peers.insert(id, PeerEntry { inner, near });
        Ok(LocalPeer { id })
    }

    fn disconnect(&mut self, peer: LocalPeer) {
        if let Some(p) = self.peers.remove(&peer.id) {
            if p.near.is_none() {
                self.far -= 1;
            }
            self.inner.disconnect(p.inner);
        }
    }

    fn unpack_key(
        &mut self,
        peer: &LocalPeer,
        region: &Region,
        key: &[u8],
    ) -> Result<T::RemoteKey, Error> {
        let entry = self
            .peers
            .get(&peer.id)
            .ok_or_else(|| backend(libc::EINVAL, "peer handle of another transport"))?;
        self.inner.unpack_key(&entry.inner, region, key)
    }

    fn release_key(&mut self, key: T::RemoteKey) {
        self.inner.release_key(key)
    }

    fn local_kind(&self, reg: &T::LocalReg) -> MemKind {
        self.inner.local_kind(reg)
    }

    fn remote_kind(&self, key: &T::RemoteKey) -> MemKind {
        self.inner.remote_kind(key)
    }

    fn post(
        &mut self,
        op: XferOp,
        peer: &LocalPeer,
        segments: Segments<'_, T::LocalReg, T::RemoteKey>,
        notification: Option<&[u8]>,
        token: Token,
    ) -> Result<PostStatus, Error> {
        let near = self
            .entry(peer)?
            .near
            .as_ref()
            .map(|n| (n.pid, n.pidfd.as_raw_fd()));
        match near {
            // GPU memory is the inner transport's to move.
            Some((pid, pidfd)) if !self.touches_vram(segments) => {
                if ffi::exited(pidfd) {
                    return Err(Error::disconnected(""));
                }
                self.post_cma(op, peer.id, pid, segments, notification, token)
            }
            _ => match self.peers.get(&peer.id) {
                Some(e) => self.inner.post(op, &e.inner, segments, notification, token),
                None => Err(Error::disconnected("")),
            },
        }
    }

    fn poll(&mut self) -> Option<Completion> {
        // Copies first: a finished one is returned without a trip through
        // the inner transport's progress (a system call for UCX over tcp);
        // the inner transport is polled whenever no copy has finished, so
        // at least once per round of polls that drains completions.
        if let Some(c) = self.poll_cma() {
            return Some(c);
        }
        self.inner.poll()
    }

    fn abandon(&mut self, token: Token) -> Result<(), Error> {
        if self.xfers.iter().any(|x| x.token == token) {
            return self.cancel(token);
        }
        self.inner.abandon(token)
    }

    fn cancel(&mut self, token: Token) -> Result<(), Error> {
        let Some(pos) = self.xfers.iter().position(|x| x.token == token) else {
            return self.inner.cancel(token);
        };
        let x = self.xfers.swap_remove(pos);
        x.progress.cancel();
        // Parts already running finish (each is at most `part_bytes`);
        // none touches the memory after this returns.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !x.progress.finished() && Instant::now() < deadline {
            std::thread::yield_now();
        }
        if x.progress.finished() {
            Ok(())
        } else {
            // A copy stuck in the kernel for 10 s: keep it tracked.
            self.xfers.push(x);
            Err(Error::Unsupported {
                backend: "LOCAL",
                what: "cancelling a copy that does not finish",
            })
        }
    }

    fn send_notification(&mut self, peer: &LocalPeer, msg: &[u8]) -> Result<(), Error> {
        match self.peers.get(&peer.id) {
            Some(e) => self.inner.send_notification(&e.inner, msg),
            None => Err(Error::disconnected("")),
        }
    }

    fn poll_notification(&mut self, buf: &mut [u8]) -> Option<Result<usize, Error>> {
        self.inner.poll_notification(buf)
    }
}

impl<T: Transport> Drop for Local<T> {
    /// Stops the workers (each finishes its current part) before the inner
    /// transport and the peers go.
    fn drop(&mut self) {
        for x in &self.xfers {
            x.progress.cancel();
        }
        self.pool = None;
        for (_, p) in self.peers.drain() {
            self.inner.disconnect(p.inner);
        }
    }
}
