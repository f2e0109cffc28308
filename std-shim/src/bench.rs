//! `kvxfer bench` and `kvxfer target`: a transfer benchmark between two
//! agents, by default two processes on loopback.
//!
//! The *target* registers one buffer and answers a small protocol carried
//! by notifications:
//!
//! * `bench:region` → `bench:region <addr> <len>`: where its buffer is;
//! * `bench:sum <len> [<block> <stride>]` → `bench:sum <hex>`: the
//!   checksum (64-bit FNV-1a) of the blocks of `block` bytes every `stride`
//!   bytes in the first `len` bytes (default: all of them) of its buffer;
//! * `bench:fill <seed>` → `bench:fill ok`: new random bytes in its buffer.
//!
//! The *initiator* connects through the target's side channel, asks for the
//! region, moves `blocks` blocks of `block_size` bytes per request with
//! `inflight` requests outstanding, and finally compares the checksum of
//! its buffer with the target's: a WRITE must have left the initiator's
//! (random) bytes at the target, a READ the target's (random) bytes at the
//! initiator. Then each of the `inflight` prepared requests is posted once
//! more with fresh random bytes at the source, and the checksums compared
//! again, so that a request that silently moved nothing is caught. A
//! mismatch fails the run.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvxfer_core::{Desc, Error, MemKind, Strided, XferOp, XferState, XferTelemetry};

use crate::{Agent, AgentConfig, WaitOutcome, XferRequest};

/// Errors of the benchmark's own protocol carry this backend name.
pub const BENCH: &str = "BENCH";

/// Why `kvxfer bench` or `kvxfer target` failed, worded for the last line a
/// user reads: the cause and the value that caused it.
#[derive(Debug)]
pub enum BenchError {
    /// An option cannot work here; found before any process or transport
    /// started (`kvxfer` exits with status 2).
    Options(String),
    /// The spawned target exited before it served: its exit status and the
    /// last line it wrote to standard error.
    TargetExited {
        /// How it exited ("exit status: 1", "signal: 9 (SIGKILL)").
        status: String,
        /// Its last line on standard error, without its `kvxfer target: `.
        error: String,
    },
    /// A step of the run failed.
    Run {
        /// The step ("connecting to the target at 127.0.0.1:1").
        step: String,
        /// The error of that step.
        error: Error,
    },
}

impl std::fmt::Display for BenchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BenchError::Options(what) => f.write_str(what),
            BenchError::TargetExited { status, error } if error.is_empty() => write!(
                f,
                "the target exited ({status}) before serving, saying nothing on standard error"
            ),
            BenchError::TargetExited { status, error } => {
                write!(f, "the target exited ({status}) before serving: {error}")
            }
            BenchError::Run { step, error } => write!(f, "{step}: {error}"),
        }
    }
}

impl std::error::Error for BenchError {}

impl From<Error> for BenchError {
    fn from(error: Error) -> Self {
        BenchError::Run {
            step: "running".to_string(),
            error,
        }
    }
}

impl BenchError {
    /// The exit status `kvxfer` ends with: 2 for options that cannot work,
    /// 1 for a failed run.
    pub fn exit_code(&self) -> u8 {
        match self {
            BenchError::Options(_) => 2,
            _ => 1,
        }
    }
}

/// Attaches the step that failed to an error.
trait Step<T> {
    fn step(self, step: impl FnOnce() -> String) -> Result<T, BenchError>;
}

impl<T> Step<T> for Result<T, Error> {
    fn step(self, step: impl FnOnce() -> String) -> Result<T, BenchError> {
        self.map_err(|error| BenchError::Run {
            step: step(),
            error,
        })
    }
}

/// Checks what can be checked before anything starts: the backend (from
/// `backend`, else the environment), the libfabric provider (from
/// `provider`, else `KVXFER_LIBFABRIC_PROVIDER`) and the memory kind.
/// Returns the backend that will be used.
pub fn check_setup(
    backend: Option<&str>,
    provider: Option<&str>,
    mem: MemKind,
) -> Result<crate::BackendKind, BenchError> {
    use crate::config::{self, BackendSource};
    let (kind, _) = config::select_backend_from_env(backend).map_err(|_| {
        let (value, source) = match backend {
            Some(b) => (b.to_string(), "--backend".to_string()),
            None => [
                (config::ENV_BACKEND, BackendSource::EnvKvxfer),
                (config::ENV_TRTLLM_BACKEND, BackendSource::EnvTrtllm),
            ]
            .into_iter()
            .find_map(|(var, s)| {
                std::env::var(var)
                    .ok()
                    .filter(|v| !v.trim().is_empty())
                    .map(|v| (v, s.name().to_string()))
            })
            .unwrap_or_default(),
        };
        BenchError::Options(match crate::BackendKind::parse(&value) {
            Ok(k) => format!(
                "{source}={value}: backend {k} is not built into this kvxfer \
                 (cargo build --release -p kvxfer --features {}); built in: {}",
                feature_of(k),
                config::BUILT_IN
            ),
            Err(_) => format!(
                "{source}={value}: no such backend; built in: {}",
                config::BUILT_IN
            ),
        })
    })?;
    #[cfg(feature = "cuda")]
    if kind == crate::BackendKind::CudaIpc && !kvxfer_cuda::driver_present() {
        return Err(BenchError::Options(
            "backend CUDA_IPC: no CUDA driver found (libcuda.so.1); it needs an NVIDIA GPU and \
             its driver"
                .to_string(),
        ));
    }
    check_provider(kind, provider)?;
    check_mem(mem)?;
    Ok(kind)
}

/// The cargo feature that builds `kind` in.
fn feature_of(kind: crate::BackendKind) -> &'static str {
    match kind {
        crate::BackendKind::Ucx => "ucx",
        crate::BackendKind::Libfabric => "libfabric",
        crate::BackendKind::CudaIpc => "cuda",
    }
}

/// A libfabric provider that libfabric does not offer here is refused,
/// naming those it offers.
#[cfg(feature = "libfabric")]
fn check_provider(kind: crate::BackendKind, provider: Option<&str>) -> Result<(), BenchError> {
    if kind != crate::BackendKind::Libfabric {
        return Ok(());
    }
    let (value, source) = match provider {
        Some(p) => (p.to_string(), "--provider"),
        None => match std::env::var(kvxfer_libfabric::PROVIDER_ENV) {
            Ok(p) if !p.trim().is_empty() => (p, kvxfer_libfabric::PROVIDER_ENV),
            _ => return Ok(()),
        },
    };
    if kvxfer_libfabric::provider_usable(&value) {
        return Ok(());
    }
    let usable = kvxfer_libfabric::usable_providers();
    Err(BenchError::Options(format!(
        "{source}={value}: libfabric {}.{} does not offer this provider with RDM and RMA here; \
         offered: {}",
        kvxfer_libfabric::version().0,
        kvxfer_libfabric::version().1,
        if usable.is_empty() {
            "none".to_string()
        } else {
            usable.join(", ")
        }
    )))
}

#[cfg(not(feature = "libfabric"))]
fn check_provider(_kind: crate::BackendKind, _provider: Option<&str>) -> Result<(), BenchError> {
    Ok(())
}

/// VRAM needs the `cuda` feature and a CUDA driver.
fn check_mem(mem: MemKind) -> Result<(), BenchError> {
    if mem != MemKind::Vram {
        return Ok(());
    }
    #[cfg(feature = "cuda")]
    if !kvxfer_cuda::driver_present() {
        return Err(BenchError::Options(
            "--mem vram: no CUDA driver found (libcuda.so.1); VRAM needs an NVIDIA GPU and its driver"
                .to_string(),
        ));
    }
    #[cfg(not(feature = "cuda"))]
    return Err(BenchError::Options(format!(
        "--mem vram: {VRAM_NEEDS_CUDA}"
    )));
    #[cfg(feature = "cuda")]
    Ok(())
}

fn bench_err(text: &str) -> Error {
    Error::backend(BENCH, -1, text)
}

/// Parses a byte size: a number with an optional unit, `B`, `K`/`KiB`
/// (1024), `KB` (1000), `M`/`MiB`, `MB`, `G`/`GiB`, `GB`, any case.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("size {s:?}: expected a number with an optional unit"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "kb" => 1000,
        "m" | "mib" => 1 << 20,
        "mb" => 1_000_000,
        "g" | "gib" => 1 << 30,
        "gb" => 1_000_000_000,
        u => {
            return Err(format!(
                "size {s:?}: unknown unit {u:?} (B, KiB, MiB, GiB, KB, MB, GB)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} overflows 64 bits"))
}

/// Parses a duration: a number with `us`, `ms`, `s` (default) or `m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("duration {s:?}: expected a number with ms, s or m"))?;
    let secs = match unit.trim() {
        "us" | "µs" => n / 1e6,
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" | "min" => n * 60.0,
        u => return Err(format!("duration {s:?}: unknown unit {u:?} (us, ms, s, m)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("duration {s:?}: {e}"))
}

/// Formats a byte count with a binary unit ("16 KiB").
pub fn format_size(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = n;
    let mut i = 0;
    while i + 1 < UNITS.len() && v >= 1024 && v % 1024 == 0 {
        v /= 1024;
        i += 1;
    }
    format!("{v} {}", UNITS[i])
}

/// 64-bit FNV-1a.
pub fn checksum(data: &[u8]) -> u64 {
    fnv_update(0xcbf2_9ce4_8422_2325, data)
}

/// Continues a 64-bit FNV-1a hash `h` over `data`.
fn fnv_update(mut h: u64, data: &[u8]) -> u64 {
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Fills `buf` with xorshift64* bytes from `seed`.
pub fn fill_random(buf: &mut [u8], seed: u64) {
    let mut x = seed | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (t.as_nanos() as u64) ^ u64::from(std::process::id()).rotate_left(32)
}

/// The error for `--mem vram` in a kvxfer built without CUDA.
pub const VRAM_NEEDS_CUDA: &str = "VRAM needs kvxfer built with the cuda feature (--features cuda)";

/// Where a bench buffer lives.
enum Storage {
    Host(Vec<u8>),
    #[cfg(feature = "cuda")]
    Device(kvxfer_cuda::DeviceBuffer),
}

/// A registered buffer (host memory, or VRAM with the `cuda` feature),
/// deregistered before it is freed.
struct Buffer {
    agent: Agent,
    storage: Storage,
    addr: u64,
    len: usize,
}

impl Buffer {
    fn new(
        agent: &Agent,
        len: usize,
        seed: Option<u64>,
        mem: MemKind,
        dev: u32,
    ) -> Result<Buffer, Error> {
        let mut host = vec![0u8; len];
        if let Some(s) = seed {
            fill_random(&mut host, s);
        }
        let storage = match mem {
            MemKind::Dram => Storage::Host(host),
            #[cfg(feature = "cuda")]
            MemKind::Vram => Storage::Device(kvxfer_cuda::DeviceBuffer::from_host(dev, &host)?),
            #[cfg(not(feature = "cuda"))]
            MemKind::Vram => return Err(bench_err(VRAM_NEEDS_CUDA)),
        };
        let addr = match &storage {
            Storage::Host(v) => v.as_ptr() as u64,
            #[cfg(feature = "cuda")]
            Storage::Device(d) => d.ptr(),
        };
        // SAFETY: the memory lives in this struct and is deregistered in
        // `Drop` before it is freed; it never moves (a heap block or a
        // device allocation). Its bytes are read only through `checksum`,
        // after the transfers that write it are done.
        unsafe { agent.register(addr, len as u64, dev, mem)? };
        Ok(Buffer {
            agent: agent.clone(),
            storage,
            addr,
            len,
        })
    }

    fn addr(&self) -> u64 {
        self.addr
    }

    /// Fills the whole buffer with new bytes from `seed` (see
    /// [`fill_random`]). Only called while no transfer uses it.
    fn refill(&mut self, seed: u64) -> Result<(), Error> {
        match &mut self.storage {
            Storage::Host(v) => fill_random(v, seed),
            #[cfg(feature = "cuda")]
            Storage::Device(d) => {
                let mut host = vec![0u8; self.len];
                fill_random(&mut host, seed);
                d.copy_from_host(0, &host)?;
            }
        }
        Ok(())
    }

    /// Checksum of the blocks of `block` bytes every `stride` bytes in
    /// the first `n` bytes, hashed as one byte string (`None` if the
    /// buffer is shorter or the layout is not one).
    fn checksum(&self, n: usize, block: usize, stride: usize) -> Result<Option<u64>, Error> {
        if n > self.len || block == 0 || stride < block {
            return Ok(None);
        }
        let sum = |data: &[u8]| {
            let mut h = checksum(b"");
            let mut at = 0;
            while at < n {
                h = fnv_update(h, &data[at..(at + block).min(n)]);
                at += stride;
            }
            h
        };
        match &self.storage {
            Storage::Host(v) => Ok(Some(sum(&v[..n]))),
            #[cfg(feature = "cuda")]
            Storage::Device(d) => {
                let mut host = vec![0u8; n];
                d.copy_to_host(0, &mut host)?;
                Ok(Some(sum(&host)))
            }
        }
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        match self.agent.deregister(self.addr) {
            Ok(_) | Err(Error::ShutDown) => {}
            // Never free memory a peer could still write into.
            Err(e) => {
                log::error!("deregistering the bench buffer failed ({e}); leaking it");
                let storage = std::mem::replace(&mut self.storage, Storage::Host(Vec::new()));
                std::mem::forget(storage);
            }
        }
    }
}

/// `cfg` with the backend and provider given on the command line, if any.
fn agent_config(
    mut cfg: AgentConfig,
    backend: &Option<String>,
    provider: &Option<String>,
) -> AgentConfig {
    if let Some(b) = backend {
        cfg = cfg.with_backend(b.as_str());
    }
    if let Some(p) = provider {
        cfg = cfg.with_provider(p.as_str());
    }
    cfg
}

/// `cfg` with tables large enough for the requests of `opts`: every
/// request in flight may keep one segment per block, and each list one
/// entry per block.
fn sized_for(cfg: AgentConfig, opts: &BenchOptions) -> AgentConfig {
    let blocks = u32::try_from(opts.blocks).unwrap_or(u32::MAX);
    let in_flight = u32::try_from(opts.inflight).unwrap_or(u32::MAX);
    let caps = cfg.capacities;
    let caps = crate::Capacities {
        segments: caps.segments.max(blocks.saturating_mul(in_flight)),
        prepared_entries: caps.prepared_entries.max(blocks.saturating_mul(2)),
        xfers: caps.xfers.max(in_flight.min(u16::MAX as u32)),
        ..caps
    };
    let per_xfer = cfg.segments_per_xfer.max(blocks);
    cfg.with_capacities(caps).with_segments_per_xfer(per_xfer)
}

/// Settings of `kvxfer target`.
#[derive(Clone, Debug)]
pub struct TargetOptions {
    /// Side-channel address.
    pub listen: String,
    /// Backend name, else from the environment.
    pub backend: Option<String>,
    /// libfabric provider.
    pub provider: Option<String>,
    /// Buffer size in bytes.
    pub size: u64,
    /// Agent name.
    pub name: String,
    /// Longest sleep of the target's progress thread while idle (see
    /// [`AgentConfig::progress_idle_sleep`]). The bench's own target uses
    /// zero: over UCX `tcp` and libfabric `tcp;ofi_rxm` a WRITE's data and
    /// acknowledgements move only while the target polls, and a target
    /// has no transfer of its own that would keep its poller awake.
    pub idle_sleep: Duration,
    /// Memory kind of the served buffer.
    pub mem: MemKind,
    /// Device of the served buffer (GPU ordinal for VRAM).
    pub device: u32,
    /// etcd endpoints (comma separated) to publish the target in, by its
    /// name (feature `etcd`).
    pub etcd: Option<String>,
    /// etcd namespace prefix; default `/kvxfer/`.
    pub etcd_prefix: Option<String>,
    /// Serve the target's metrics over HTTP on this address
    /// ([`AgentConfig::metrics_addr`]); `None`: as the environment says.
    pub metrics_addr: Option<String>,
}

/// Runs a target until `stop` is set: registers a buffer of random bytes,
/// announces `listening <addr>` through `ready` and answers the bench
/// protocol.
pub fn run_target(
    opts: &TargetOptions,
    stop: &AtomicBool,
    ready: impl FnOnce(&str),
) -> Result<(), BenchError> {
    check_setup(opts.backend.as_deref(), opts.provider.as_deref(), opts.mem)?;
    let len = usize::try_from(opts.size)
        .map_err(|_| BenchError::Options(format!("--size {}: too large", opts.size)))?;
    let mut cfg = agent_config(
        AgentConfig::default()
            .with_listen(Some(&opts.listen))
            .with_progress_idle_sleep(opts.idle_sleep),
        &opts.backend,
        &opts.provider,
    );
    if let Some(m) = &opts.metrics_addr {
        cfg = cfg.with_metrics_addr(Some(m));
    }
    let agent = Agent::new(&opts.name, cfg).step(|| "opening the transport".to_string())?;
    if let Some(m) = agent.metrics_addr() {
        log::info!("{}: metrics on http://{m}/metrics", opts.name);
    }
    let mut buf = Buffer::new(&agent, len, Some(seed()), opts.mem, opts.device)
        .step(|| format!("registering {len} bytes"))?;
    let discovery = join_etcd(&agent, &opts.etcd, &opts.etcd_prefix)
        .step(|| "publishing the target in etcd".to_string())?;
    let addr = agent
        .listen_addr()
        .ok_or_else(|| BenchError::Options(format!("--listen {}: no side channel", opts.listen)))?;
    ready(&addr.to_string());
    while !stop.load(Ordering::Acquire) {
        let notes = match agent.wait_notifications(Duration::from_millis(100)) {
            Ok(n) => n,
            Err(e @ (Error::NotificationsLost { .. } | Error::NotificationsRefused { .. })) => {
                log::warn!("target: {e}");
                continue;
            }
            Err(e) => return Err(e).step(|| "waiting for requests".to_string()),
        };
        for (peer, msgs) in notes {
            for m in msgs {
                let reply = if m == b"bench:region" {
                    format!("bench:region {} {}", buf.addr(), buf.len)
                } else if let Some(args) = m.strip_prefix(b"bench:sum ") {
                    let nums: Vec<usize> = String::from_utf8_lossy(args)
                        .split_whitespace()
                        .map(|x| x.parse().unwrap_or(usize::MAX))
                        .collect();
                    let n = nums.first().copied().unwrap_or(usize::MAX);
                    let (block, stride) = match nums.get(1..3) {
                        Some(&[b, s]) => (b, s),
                        _ => (n.max(1), n.max(1)),
                    };
                    match buf.checksum(n, block, stride) {
                        Ok(Some(c)) => format!("bench:sum {c:016x}"),
                        Ok(None) => {
                            format!(
                                "bench:error sum of {n} bytes ({block} every {stride}) asked, buffer has {}",
                                buf.len
                            )
                        }
                        Err(e) => format!("bench:error reading the buffer: {e}"),
                    }
                } else if let Some(arg) = m.strip_prefix(b"bench:fill ") {
                    let arg = String::from_utf8_lossy(arg);
                    match arg.trim().parse::<u64>() {
                        Ok(s) => match buf.refill(s) {
                            Ok(()) => "bench:fill ok".to_string(),
                            Err(e) => format!("bench:error filling the buffer: {e}"),
                        },
                        Err(_) => format!("bench:error fill seed {:?} is not a number", arg.trim()),
                    }
                } else {
                    log::debug!(
                        "target: ignoring notification of {} bytes from {peer}",
                        m.len()
                    );
                    continue;
                };
                if let Err(e) = reply_to(&agent, discovery.as_ref(), &peer, reply.as_bytes()) {
                    log::warn!("target: answering {peer}: {e}");
                }
            }
        }
    }
    drop(discovery);
    drop(buf);
    agent.shutdown();
    Ok(())
}

/// Settings of `kvxfer bench`.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Target's side channel; `None` spawns `kvxfer target` on loopback.
    pub peer: Option<String>,
    /// Backend name, else from the environment.
    pub backend: Option<String>,
    /// libfabric provider.
    pub provider: Option<String>,
    /// READ or WRITE.
    pub op: XferOp,
    /// Bytes per block.
    pub block_size: u64,
    /// Blocks per request.
    pub blocks: u64,
    /// Requests in flight.
    pub inflight: usize,
    /// Measured requests; with `duration` unset and this unset, 1000.
    pub iters: Option<u64>,
    /// Measure for this long instead of a request count.
    pub duration: Option<Duration>,
    /// Requests completed before measuring.
    pub warmup: u64,
    /// Longest wait for one request.
    pub request_timeout: Duration,
    /// The executable spawned as target (default: this one).
    pub target_exe: Option<std::path::PathBuf>,
    /// Distance from one block's start to the next; `None` (or the block
    /// size) packs blocks back to back, which coalesces a request into one
    /// segment. Twice the block size keeps every block its own segment,
    /// like scattered KV-cache blocks.
    pub stride: Option<u64>,
    /// Describe each side as one strided list (address, block size,
    /// stride, count) instead of a descriptor per block.
    pub strided: bool,
    /// Also measure raw TCP on loopback with the same request size
    /// ([`crate::tcp_baseline`]) and report the ratios.
    pub tcp_baseline: bool,
    /// Memory kind of both buffers (the spawned target's too).
    pub mem: MemKind,
    /// Device of the buffers (GPU ordinal for VRAM).
    pub device: u32,
    /// Run the initiator's agent with a progress thread. Off (the
    /// default), the measuring thread drives progress itself while it
    /// polls its requests, as `ucx_perftest` does.
    pub progress_thread: bool,
    /// Show a progress bar on standard error once a run takes longer
    /// than two seconds, if standard error is a terminal (needs the `cli`
    /// feature).
    pub progress_bar: bool,
    /// etcd endpoints (comma separated): find the target there by
    /// `target_name` instead of `peer` (feature `etcd`).
    pub etcd: Option<String>,
    /// etcd namespace prefix; default `/kvxfer/`.
    pub etcd_prefix: Option<String>,
    /// Name of the target to find in etcd.
    pub target_name: String,
    /// Serve the initiator's metrics over HTTP on this address
    /// ([`AgentConfig::metrics_addr`]); `None`: as the environment says
    /// (a spawned target never inherits `KVXFER_METRICS_ADDR`).
    pub metrics_addr: Option<String>,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            peer: None,
            backend: None,
            provider: None,
            op: XferOp::Write,
            block_size: 16 << 10,
            blocks: 128,
            inflight: 4,
            iters: None,
            duration: None,
            warmup: 16,
            request_timeout: Duration::from_secs(10),
            target_exe: None,
            stride: None,
            strided: false,
            tcp_baseline: false,
            mem: MemKind::Dram,
            device: 0,
            progress_thread: false,
            progress_bar: false,
            etcd: None,
            etcd_prefix: None,
            target_name: "kvxfer-target".to_string(),
            metrics_addr: None,
        }
    }
}

/// What a benchmark measured.
#[derive(Clone, Debug, PartialEq)]
pub struct BenchReport {
    /// Backend used.
    pub backend: String,
    /// READ or WRITE.
    pub op: &'static str,
    /// Bytes per block.
    pub block_size: u64,
    /// Blocks per request.
    pub blocks: u64,
    /// Requests in flight.
    pub inflight: usize,
    /// Measured requests.
    pub requests: u64,
    /// Measured bytes.
    pub bytes: u64,
    /// Measured seconds.
    pub seconds: f64,
    /// Gigabytes (10^9 bytes) per second.
    pub gb_per_s: f64,
    /// Requests per second.
    pub requests_per_s: f64,
    /// Median request latency, microseconds.
    pub p50_us: f64,
    /// 99th percentile latency, microseconds.
    pub p99_us: f64,
    /// Largest latency, microseconds.
    pub max_us: f64,
    /// The checksum both sides agreed on.
    pub checksum: u64,
    /// Memory kind of the buffers.
    pub mem: MemKind,
    /// How the data moved: "cross-memory attach" or the backend's name
    /// ([`Agent::peer_path`]).
    pub path: String,
    /// Whether the lists were strided.
    pub strided: bool,
    /// Time to prepare the local and the remote list, milliseconds.
    pub prep_ms: f64,
    /// Time to make one request from the prepared lists, milliseconds
    /// (mean over the requests in flight).
    pub make_ms: f64,
    /// Per-transfer telemetry of the measured requests.
    pub telemetry: TelemetrySummary,
    /// Raw TCP on loopback with the same request size, when asked for.
    pub tcp: Option<crate::tcp_baseline::TcpBaseline>,
}

/// What the core's per-transfer telemetry ([`XferTelemetry`]) said about
/// the measured requests.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TelemetrySummary {
    /// Bytes one request moves.
    pub bytes: u64,
    /// Descriptors per request as given.
    pub descs: u32,
    /// Segments per request after coalescing.
    pub segments: u32,
    /// Mean time spent in `post`, microseconds.
    pub post_us_mean: f64,
    /// Largest time spent in `post`, microseconds.
    pub post_us_max: f64,
    /// Median transfer duration (post to completion seen by the
    /// engine), microseconds.
    pub xfer_us_p50: f64,
    /// 99th percentile transfer duration, microseconds.
    pub xfer_us_p99: f64,
}

/// Collects telemetry of completed requests.
#[derive(Default)]
struct TelemetryAcc {
    last: XferTelemetry,
    post_ns: Vec<u64>,
    xfer_ns: Vec<u64>,
}

impl TelemetryAcc {
    fn add(&mut self, t: XferTelemetry) {
        self.post_ns.push(t.post_nanos);
        if let (Some(p), Some(c)) = (t.posted_at, t.completed_at) {
            self.xfer_ns.push(c.saturating_nanos_since(p));
        }
        self.last = t;
    }

    fn summary(mut self) -> TelemetrySummary {
        self.xfer_ns.sort_unstable();
        let n = self.post_ns.len().max(1) as f64;
        TelemetrySummary {
            bytes: self.last.bytes,
            descs: self.last.descs,
            segments: self.last.segments,
            post_us_mean: self.post_ns.iter().sum::<u64>() as f64 / n / 1000.0,
            post_us_max: self.post_ns.iter().max().copied().unwrap_or(0) as f64 / 1000.0,
            xfer_us_p50: percentile(&self.xfer_ns, 0.50),
            xfer_us_p99: percentile(&self.xfer_ns, 0.99),
        }
    }
}

impl BenchReport {
    /// The report as a table with a header line, the telemetry line and
    /// the verification line.
    pub fn table(&self) -> String {
        let t = &self.telemetry;
        format!(
            "{:<10} {:<6} {:<5} {:>8} {:>10} {:>8} {:>9} {:>8} {:>10} {:>9} {:>9} {:>9}\n\
             {:<10} {:<6} {:<5} {:>8} {:>10} {:>8} {:>9} {:>8.3} {:>10.0} {:>9.1} {:>9.1} {:>9.1}\n\
             telemetry: {} bytes/request, {} descriptors -> {} segments after coalescing, \
             post {:.2} us mean ({:.2} max), transfer {:.1} us p50 ({:.1} p99)\n\
             lists: {} {}, prepared (both sides) in {:.3} ms, a request made in {:.3} ms; \
             data moved by {}\n\
             data verified: checksum {:016x} matches the target, also after each \
             prepared request moved fresh data",
            "backend",
            "op",
            "mem",
            "block",
            "blocks/req",
            "inflight",
            "requests",
            "GB/s",
            "req/s",
            "p50 us",
            "p99 us",
            "max us",
            self.backend,
            self.op,
            mem_name(self.mem),
            format_size(self.block_size),
            self.blocks,
            self.inflight,
            self.requests,
            self.gb_per_s,
            self.requests_per_s,
            self.p50_us,
            self.p99_us,
            self.max_us,
            t.bytes,
            t.descs,
            t.segments,
            t.post_us_mean,
            t.post_us_max,
            t.xfer_us_p50,
            t.xfer_us_p99,
            self.blocks,
            if self.strided { "strided" } else { "explicit" },
            self.prep_ms,
            self.make_ms,
            self.path,
            self.checksum,
        ) + &self.tcp_line()
    }

    /// The raw-TCP comparison line of [`table`](Self::table) (empty without
    /// a baseline).
    fn tcp_line(&self) -> String {
        let Some(b) = &self.tcp else {
            return String::new();
        };
        format!(
            "\nraw TCP on loopback, {} per request: request + 1-byte reply p50 {:.1} us \
             (kvxfer p50 / TCP = {:.2}), stream {:.2} GB/s (kvxfer GB/s / TCP = {:.2})",
            format_size(b.request_bytes),
            b.p50_us,
            self.p50_us / b.p50_us,
            b.stream_gb_per_s,
            self.gb_per_s / b.stream_gb_per_s,
        )
    }

    /// The report as one JSON object.
    pub fn json(&self) -> String {
        let t = &self.telemetry;
        format!(
            "{{\"backend\":\"{}\",\"op\":\"{}\",\"mem\":\"{}\",\"block_size\":{},\"blocks\":{},\"inflight\":{},\"requests\":{},\"bytes\":{},\"seconds\":{:.6},\"gb_per_s\":{:.6},\"requests_per_s\":{:.3},\"latency_us\":{{\"p50\":{:.3},\"p99\":{:.3},\"max\":{:.3}}},\"telemetry\":{{\"bytes\":{},\"descs\":{},\"segments\":{},\"post_us_mean\":{:.3},\"post_us_max\":{:.3},\"xfer_us_p50\":{:.3},\"xfer_us_p99\":{:.3}}},\"lists\":{{\"strided\":{},\"prep_ms\":{:.3},\"make_ms\":{:.3}}},\"path\":\"{}\",\"checksum\":\"{:016x}\",\"verified\":true,\"tcp_baseline\":{}}}",
            self.backend, self.op, mem_name(self.mem), self.block_size, self.blocks, self.inflight,
            self.requests, self.bytes, self.seconds, self.gb_per_s, self.requests_per_s,
            self.p50_us, self.p99_us, self.max_us, t.bytes, t.descs, t.segments, t.post_us_mean,
            t.post_us_max, t.xfer_us_p50, t.xfer_us_p99, self.strided, self.prep_ms,
            self.make_ms, self.path, self.checksum,
            self.tcp.as_ref().map_or("null".to_string(), |b| format!(
                "{{\"request_bytes\":{},\"requests\":{},\"p50_us\":{:.3},\"stream_gb_per_s\":{:.6}}}",
                b.request_bytes, b.requests, b.p50_us, b.stream_gb_per_s
            ))
        )
    }
}

/// "DRAM" or "VRAM" (the bench's spelling of a memory kind).
pub fn mem_name(kind: MemKind) -> &'static str {
    match kind {
        MemKind::Vram => "VRAM",
        _ => "DRAM",
    }
}

/// A spawned `kvxfer target`, killed when dropped.
struct TargetChild {
    child: Child,
    err: Arc<std::sync::Mutex<TargetStderr>>,
}

/// What a spawned target wrote to standard error.
#[derive(Default)]
struct TargetStderr {
    /// Whether it serves (its lines then go straight on).
    serving: bool,
    /// Lines held until it serves.
    held: Vec<String>,
    /// The last line.
    last: String,
}

impl TargetChild {
    fn spawn(opts: &BenchOptions, size: u64) -> Result<(TargetChild, String), BenchError> {
        let exe = match &opts.target_exe {
            Some(p) => p.clone(),
            None => std::env::current_exe()
                .map_err(|e| BenchError::Options(format!("locating kvxfer to spawn: {e}")))?,
        };
        let mut cmd = Command::new(&exe);
        cmd.args([
            "target",
            "--listen",
            "127.0.0.1:0",
            "--size",
            &size.to_string(),
        ]);
        if let Some(b) = &opts.backend {
            cmd.args(["--backend", b]);
        }
        if let Some(p) = &opts.provider {
            cmd.args(["--provider", p]);
        }
        if opts.mem == MemKind::Vram {
            cmd.args(["--mem", "vram", "--device", &opts.device.to_string()]);
        }
        // Its metrics endpoint would take the bench's own address.
        cmd.env_remove(crate::metrics::ENV_METRICS_ADDR);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let spawn_step = || format!("spawning the target {}", exe.display());
        let child = cmd
            .spawn()
            .map_err(|e| bench_err(&e.to_string()))
            .step(spawn_step)?;
        let err = Arc::new(std::sync::Mutex::new(TargetStderr::default()));
        let mut guard = TargetChild {
            child,
            err: Arc::clone(&err),
        };
        let (stdout, stderr) = match (guard.child.stdout.take(), guard.child.stderr.take()) {
            (Some(o), Some(e)) => (o, e),
            _ => return Err(bench_err("no pipe to the target")).step(spawn_step),
        };
        // Its standard error goes on to ours; until it serves, its lines
        // are held: if it fails, its last line is its error, which the
        // verdict carries.
        let err_done = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut e = err.lock().unwrap_or_else(|e| e.into_inner());
                if e.serving {
                    eprintln!("{line}");
                } else {
                    e.held.push(line.clone());
                }
                e.last = line;
            }
        });
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let mut r = BufReader::new(stdout);
            let _ = tx.send(r.read_line(&mut line).map(|_| line));
            // Keep draining so the child never blocks on a full pipe.
            let _ = std::io::copy(&mut r, &mut std::io::sink());
        });
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .map_err(|_| bench_err("it did not report its address within 30 s"))
            .and_then(|r| r.map_err(|e| bench_err(&format!("reading its address: {e}"))))
            .step(|| "starting the target".to_string())?;
        let Some(addr) = line.trim().strip_prefix("listening ") else {
            // It ended its standard output without an address: it failed.
            let deadline = Instant::now() + Duration::from_secs(5);
            let status = loop {
                match guard.child.try_wait() {
                    Ok(Some(st)) => break st.to_string(),
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(10))
                    }
                    _ => break "still running".to_string(),
                }
            };
            if status != "still running" {
                let _ = err_done.join();
            }
            let mut e = guard.err.lock().unwrap_or_else(|e| e.into_inner());
            let last = e.held.pop();
            for l in e.held.drain(..) {
                eprintln!("{l}");
            }
            drop(e);
            let error = last.unwrap_or_else(|| format!("it said {:?}", line.trim()));
            let error = error
                .strip_prefix("kvxfer target: ")
                .unwrap_or(&error)
                .to_string();
            return Err(BenchError::TargetExited { status, error });
        };
        let addr = addr.to_string();
        let mut e = guard.err.lock().unwrap_or_else(|e| e.into_inner());
        e.serving = true;
        for l in e.held.drain(..) {
            eprintln!("{l}");
        }
        drop(e);
        Ok((guard, addr))
    }

    /// How the target exited and its last line on standard error, if it
    /// has exited.
    fn exited(&mut self) -> Option<(String, String)> {
        let st = self.child.try_wait().ok().flatten()?;
        // Give its standard error a moment to drain.
        std::thread::sleep(Duration::from_millis(50));
        let e = self.err.lock().unwrap_or_else(|e| e.into_inner());
        let last = e.last.strip_prefix("kvxfer target: ").unwrap_or(&e.last);
        Some((st.to_string(), last.to_string()))
    }
}

impl Drop for TargetChild {
    fn drop(&mut self) {
        // Closing stdin asks it to stop; kill it if it has not.
        drop(self.child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits for one notification from `peer` that starts with `prefix`.
fn await_reply(
    agent: &Agent,
    peer: &str,
    prefix: &str,
    timeout: Duration,
) -> Result<String, Error> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut all = agent.take_notifications()?;
        if let Some(msgs) = all.remove(peer) {
            for m in msgs {
                let s = String::from_utf8_lossy(&m).into_owned();
                if s.starts_with("bench:error") {
                    return Err(bench_err(&format!("target: {s}")));
                }
                if let Some(rest) = s.strip_prefix(prefix) {
                    return Ok(rest.trim().to_string());
                }
            }
        }
        if Instant::now() >= deadline {
            return Err(Error::TimedOut {
                after_ms: timeout.as_millis() as u64,
            });
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)] as f64 / 1000.0
}

/// Runs the benchmark and verifies the data. Options that cannot work
/// here (backend, provider, memory kind, sizes) are refused before
/// anything starts.
pub fn run_bench(opts: &BenchOptions) -> Result<BenchReport, BenchError> {
    check_setup(opts.backend.as_deref(), opts.provider.as_deref(), opts.mem)?;
    if opts.block_size == 0 || opts.blocks == 0 || opts.inflight == 0 {
        return Err(BenchError::Options(format!(
            "--block-size {}, --blocks {}, --inflight {}: each must be positive",
            opts.block_size, opts.blocks, opts.inflight
        )));
    }
    let total = opts
        .block_size
        .checked_mul(opts.blocks)
        .filter(|&t| usize::try_from(t).is_ok())
        .ok_or_else(|| {
            BenchError::Options(format!(
                "--blocks {} of --block-size {}: do not fit in memory",
                opts.blocks, opts.block_size
            ))
        })?;
    let stride = opts.stride.unwrap_or(opts.block_size);
    // Bytes the blocks span in each buffer.
    let span = stride
        .checked_mul(opts.blocks - 1)
        .and_then(|x| x.checked_add(opts.block_size))
        .filter(|&t| stride >= opts.block_size && usize::try_from(t).is_ok())
        .ok_or_else(|| {
            BenchError::Options(format!(
                "--stride {stride}: must be at least the block size {} and fit in memory",
                opts.block_size
            ))
        })?;
    let (mut child, addr) = match (&opts.peer, &opts.etcd) {
        (_, Some(_)) => (None, String::new()),
        (Some(p), None) => (None, p.clone()),
        (None, None) => {
            let (c, a) = TargetChild::spawn(opts, span)?;
            (Some(c), a)
        }
    };
    let r = measure(opts, &addr, total, stride, span);
    match (r, child.as_mut().and_then(TargetChild::exited)) {
        // A target that died explains the failure better than what the
        // initiator saw of it.
        (Err(BenchError::Run { step, error }), Some((status, last))) => Err(BenchError::Run {
            step: match last.is_empty() {
                true => format!("{step} (the target exited, {status})"),
                false => format!("{step} (the target exited, {status}: {last})"),
            },
            error,
        }),
        (r, _) => r,
    }
}

/// The run against the target at `addr` (or found through etcd).
fn measure(
    opts: &BenchOptions,
    addr: &str,
    total: u64,
    stride: u64,
    span: u64,
) -> Result<BenchReport, BenchError> {
    let cfg = agent_config(
        AgentConfig::default().with_progress_thread(opts.progress_thread),
        &opts.backend,
        &opts.provider,
    );
    let mut cfg = sized_for(cfg, opts);
    if let Some(m) = &opts.metrics_addr {
        cfg = cfg.with_metrics_addr(Some(m));
    }
    let name = match opts.etcd {
        // Unique, so that benchmarks sharing an etcd never replace each other.
        Some(_) => format!("kvxfer-bench-{:08x}", seed() as u32),
        None => "kvxfer-bench".to_string(),
    };
    let agent = Agent::new(&name, cfg).step(|| "opening the transport".to_string())?;
    let mut buf = Buffer::new(
        &agent,
        span as usize,
        (opts.op == XferOp::Write).then(seed),
        opts.mem,
        opts.device,
    )
    .step(|| format!("registering {span} bytes"))?;
    let t = Duration::from_secs(10);
    let discovery =
        join_etcd(&agent, &opts.etcd, &opts.etcd_prefix).step(|| "joining etcd".to_string())?;
    let peer = match &discovery {
        Some(d) => etcd_fetch(d, &opts.target_name, t)
            .step(|| format!("finding the target {:?} in etcd", opts.target_name))?,
        None => agent
            .connect(addr)
            .step(|| format!("connecting to the target at {addr}"))?,
    };
    let region = agent
        .notify(&peer, b"bench:region")
        .and_then(|()| await_reply(&agent, &peer, "bench:region ", t))
        .step(|| format!("asking the target {peer} for its buffer"))?;
    let mut it = region.split_whitespace().map(str::parse::<u64>);
    let (raddr, rlen) = match (it.next(), it.next()) {
        (Some(Ok(a)), Some(Ok(l))) => (a, l),
        _ => {
            return Err(bench_err(&format!(
                "target's region reply {region:?} is malformed"
            )))
            .step(|| format!("asking the target {peer} for its buffer"))
        }
    };
    if rlen < span {
        return Err(BenchError::Options(format!(
            "the target's buffer is {rlen} bytes, {span} needed (kvxfer target --size)"
        )));
    }
    let count = u32::try_from(opts.blocks).map_err(|_| {
        BenchError::Options(format!(
            "--blocks {}: at most {} per request",
            opts.blocks,
            u32::MAX
        ))
    })?;
    // Both lists prepared once, each request made from them by index, as
    // an engine's connector does.
    let prep_step = || format!("preparing the lists of {count} blocks for {peer}");
    let prep_started = Instant::now();
    let (pl, pr) = if opts.strided {
        let l = Strided::new(buf.addr(), opts.block_size, stride, count);
        let r = Strided::new(raddr, opts.block_size, stride, count);
        (
            agent.prep_local_list(l.into()).step(prep_step)?,
            agent.prep_remote_list(&peer, r.into()).step(prep_step)?,
        )
    } else {
        let local: Vec<Desc> = (0..opts.blocks)
            .map(|i| Desc::new(buf.addr() + i * stride, opts.block_size))
            .collect();
        let remote: Vec<Desc> = (0..opts.blocks)
            .map(|i| Desc::new(raddr + i * stride, opts.block_size))
            .collect();
        (
            agent.prep_local(&local).step(prep_step)?,
            agent.prep_remote(&peer, &remote).step(prep_step)?,
        )
    };
    let prep_ms = prep_started.elapsed().as_secs_f64() * 1e3;
    let path = match (opts.mem, agent.vram_path().step(prep_step)?) {
        (MemKind::Vram, "native") => format!(
            "{} with VRAM registered natively ({})",
            agent.backend().name(),
            agent.vram_reason().step(prep_step)?
        ),
        (MemKind::Vram, "staged") => format!(
            "{}, VRAM staged through pinned host memory ({})",
            agent.peer_path(&peer).step(prep_step)?,
            agent.vram_reason().step(prep_step)?
        ),
        _ => agent.peer_path(&peer).step(prep_step)?.to_string(),
    };
    let verify_step = || format!("verifying the data with {peer}");
    let xfer_step = || format!("{} of a request to {peer}", opts.op.name());
    let idx: Vec<u32> = (0..count).collect();
    let make_started = Instant::now();
    let reqs: Vec<XferRequest> = (0..opts.inflight)
        .map(|_| agent.make_xfer(opts.op, pl, &idx, pr, &idx, None))
        .collect::<Result<_, _>>()
        .step(|| format!("making {} requests from the prepared lists", opts.inflight))?;
    let make_ms = make_started.elapsed().as_secs_f64() * 1e3 / opts.inflight as f64;
    let mut started: Vec<Instant> = Vec::with_capacity(reqs.len());
    for r in &reqs {
        started.push(Instant::now());
        r.post().step(xfer_step)?;
    }
    let iters = match (opts.iters, opts.duration) {
        (Some(n), _) => n,
        (None, Some(_)) => u64::MAX,
        (None, None) => 1000,
    };
    let mut lat: Vec<u64> = Vec::with_capacity(iters.min(1 << 20) as usize);
    let mut completed: u64 = 0;
    let mut measured: u64 = 0;
    let mut posted = reqs.len() as u64;
    let mut t0 = Instant::now();
    let mut end: Option<Instant> = None;
    let mut outstanding = reqs.len();
    let mut live = vec![true; reqs.len()];
    let wanted = opts.warmup.saturating_add(iters);
    let mut telemetry = TelemetryAcc::default();
    let mut bar = ProgressBar::new(opts, iters);
    while outstanding > 0 {
        let mut progressed = false;
        for (i, r) in reqs.iter().enumerate() {
            if !live[i] {
                continue;
            }
            match r.status().step(xfer_step)? {
                XferState::Done => {}
                XferState::Failed(e) => return Err(e).step(xfer_step),
                XferState::InProgress | XferState::Prepared => {
                    if started[i].elapsed() > opts.request_timeout {
                        return Err(Error::TimedOut {
                            after_ms: opts.request_timeout.as_millis() as u64,
                        })
                        .step(xfer_step);
                    }
                    continue;
                }
            }
            progressed = true;
            let now = Instant::now();
            completed += 1;
            if completed == opts.warmup {
                t0 = now;
            }
            if completed > opts.warmup {
                measured += 1;
                lat.push(now.duration_since(started[i]).as_nanos() as u64);
                telemetry.add(r.telemetry().step(xfer_step)?);
                bar.tick(measured, t0);
            }
            let time_up = opts
                .duration
                .is_some_and(|d| completed > opts.warmup && t0.elapsed() >= d);
            if posted < wanted && !time_up {
                started[i] = Instant::now();
                r.post().step(xfer_step)?;
                posted += 1;
            } else {
                live[i] = false;
                outstanding -= 1;
                if outstanding == 0 {
                    end = Some(now);
                }
            }
        }
        if !progressed {
            std::thread::yield_now();
        }
    }
    let secs = end
        .unwrap_or_else(Instant::now)
        .duration_since(t0)
        .as_secs_f64()
        .max(1e-9);
    bar.finish();

    // Verify: both buffers must now hold the same bytes.
    let sums_agree = |buf: &Buffer, when: &str| -> Result<u64, Error> {
        let sum_req = format!("bench:sum {span} {} {stride}", opts.block_size);
        agent.notify(&peer, sum_req.as_bytes())?;
        let theirs = await_reply(&agent, &peer, "bench:sum ", t)?;
        let theirs = u64::from_str_radix(&theirs, 16)
            .map_err(|_| bench_err(&format!("target's checksum {theirs:?} is malformed")))?;
        let ours = buf
            .checksum(span as usize, opts.block_size as usize, stride as usize)?
            .ok_or_else(|| bench_err("local buffer shorter than the data moved"))?;
        if theirs != ours {
            return Err(bench_err(&format!(
                "DATA MISMATCH {when}: local checksum {ours:016x}, target {theirs:016x}"
            )));
        }
        Ok(ours)
    };
    let mut ours = sums_agree(&buf, &format!("after {}", opts.op.name())).step(verify_step)?;
    // Each prepared request once more, with fresh bytes at the source.
    for (i, r) in reqs.iter().enumerate() {
        let fresh = seed() ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        if opts.op == XferOp::Write {
            buf.refill(fresh).step(verify_step)?;
        } else {
            agent
                .notify(&peer, format!("bench:fill {fresh}").as_bytes())
                .and_then(|()| await_reply(&agent, &peer, "bench:fill ok", t))
                .step(verify_step)?;
        }
        r.post().step(xfer_step)?;
        match r.wait(opts.request_timeout) {
            WaitOutcome::Done => {}
            WaitOutcome::Failed(e) => return Err(e).step(xfer_step),
            WaitOutcome::InProgress => {
                return Err(Error::TimedOut {
                    after_ms: opts.request_timeout.as_millis() as u64,
                })
                .step(xfer_step)
            }
        }
        ours =
            sums_agree(&buf, &format!("after request {i} moved fresh data")).step(verify_step)?;
    }
    drop(reqs);
    agent
        .release_local(pl)
        .and_then(|()| agent.release_remote(pr))
        .step(|| "releasing the prepared lists".to_string())?;
    drop(discovery);
    drop(buf);
    let backend = agent.backend().name().to_string();
    let rails = agent.rail_stats();
    agent.shutdown();

    lat.sort_unstable();
    let bytes = measured * total;
    let path = if rails.is_empty() {
        path
    } else {
        let each: Vec<String> = rails
            .iter()
            .map(|r| {
                format!(
                    "{} {} {} MiB {} failures",
                    r.name,
                    r.state.name(),
                    r.bytes >> 20,
                    r.failures
                )
            })
            .collect();
        format!("{path} over {} rails ({})", rails.len(), each.join(", "))
    };
    Ok(BenchReport {
        backend,
        op: opts.op.name(),
        block_size: opts.block_size,
        blocks: opts.blocks,
        inflight: opts.inflight,
        requests: measured,
        bytes,
        seconds: secs,
        gb_per_s: bytes as f64 / secs / 1e9,
        requests_per_s: measured as f64 / secs,
        p50_us: percentile(&lat, 0.50),
        p99_us: percentile(&lat, 0.99),
        max_us: lat.last().map_or(0.0, |&m| m as f64 / 1000.0),
        checksum: ours,
        mem: opts.mem,
        path,
        strided: opts.strided,
        prep_ms,
        make_ms,
        telemetry: telemetry.summary(),
        tcp: match opts.tcp_baseline {
            true => Some(
                crate::tcp_baseline::measure(opts.block_size * opts.blocks, measured)
                    .step(|| "measuring raw TCP on loopback".to_string())?,
            ),
            false => None,
        },
    })
}

/// The progress bar of a run: shown on standard error once the run has
/// taken two seconds, only if standard error is a terminal and
/// [`BenchOptions::progress_bar`] is set; otherwise nothing is printed.
#[cfg_attr(not(feature = "cli"), allow(dead_code))]
struct ProgressBar {
    enabled: bool,
    /// Measured requests wanted, or the duration wanted in milliseconds.
    total: u64,
    by_time: Option<Duration>,
    started: Instant,
    #[cfg(feature = "cli")]
    bar: Option<indicatif::ProgressBar>,
}

impl ProgressBar {
    fn new(opts: &BenchOptions, iters: u64) -> ProgressBar {
        use std::io::IsTerminal;
        ProgressBar {
            enabled: cfg!(feature = "cli") && opts.progress_bar && std::io::stderr().is_terminal(),
            total: match opts.duration {
                Some(d) => d.as_millis() as u64,
                None => iters,
            },
            by_time: opts.duration,
            started: Instant::now(),
            #[cfg(feature = "cli")]
            bar: None,
        }
    }

    /// Records `measured` requests done, measuring since `t0`.
    #[cfg_attr(not(feature = "cli"), allow(unused_variables))]
    fn tick(&mut self, measured: u64, t0: Instant) {
        #[cfg(feature = "cli")]
        if self.enabled && measured % 16 == 0 {
            if self.bar.is_none() {
                if self.started.elapsed() < Duration::from_secs(2) {
                    return;
                }
                let style = indicatif::ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
                let bar = indicatif::ProgressBar::new(self.total).with_style(style);
                bar.set_message(if self.by_time.is_some() {
                    "ms"
                } else {
                    "requests"
                });
                self.bar = Some(bar);
            }
            if let Some(b) = &self.bar {
                let pos = match self.by_time {
                    Some(_) => t0.elapsed().as_millis() as u64,
                    None => measured,
                };
                b.set_position(pos.min(self.total));
            }
        }
    }

    fn finish(&mut self) {
        #[cfg(feature = "cli")]
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

/// Sets `flag` when standard input reaches its end (the parent closed it
/// or went away).
pub fn stop_on_stdin_eof(flag: Arc<AtomicBool>) {
    std::thread::spawn(move || {
        let mut sink = [0u8; 256];
        let mut stdin = std::io::stdin();
        loop {
            match stdin.read(&mut sink) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        flag.store(true, Ordering::Release);
    });
}

/// The etcd presence of a bench agent (feature `etcd`).
#[cfg(feature = "etcd")]
type Discovery = crate::etcd::EtcdDiscovery;
/// Without the `etcd` feature there is none.
#[cfg(not(feature = "etcd"))]
enum Discovery {}

/// Withdrawing from etcd is what dropping a discovery means; keep the
/// `drop` calls that order it meaningful in builds without etcd too.
#[cfg(not(feature = "etcd"))]
impl Drop for Discovery {
    fn drop(&mut self) {
        match *self {}
    }
}

/// Publishes `agent` in the etcd at `endpoints`, if given.
#[cfg(feature = "etcd")]
fn join_etcd(
    agent: &Agent,
    endpoints: &Option<String>,
    prefix: &Option<String>,
) -> Result<Option<Discovery>, Error> {
    let Some(endpoints) = endpoints else {
        return Ok(None);
    };
    let mut cfg = crate::etcd::EtcdConfig::new(endpoints);
    if let Some(p) = prefix {
        cfg = cfg.with_prefix(p.as_str());
    }
    crate::etcd::EtcdDiscovery::start(agent, cfg).map(Some)
}

/// Without the `etcd` feature, asking for etcd is an error.
#[cfg(not(feature = "etcd"))]
fn join_etcd(
    _agent: &Agent,
    endpoints: &Option<String>,
    _prefix: &Option<String>,
) -> Result<Option<Discovery>, Error> {
    match endpoints {
        None => Ok(None),
        Some(e) => Err(Error::backend(
            "ETCD",
            -1,
            &format!("etcd {e:?} asked, but kvxfer was built without the `etcd` feature"),
        )),
    }
}

/// Finds and loads the target `name` through etcd.
#[cfg(feature = "etcd")]
fn etcd_fetch(d: &Discovery, name: &str, timeout: Duration) -> Result<String, Error> {
    d.fetch(name, timeout)
}

#[cfg(not(feature = "etcd"))]
fn etcd_fetch(d: &Discovery, _name: &str, _timeout: Duration) -> Result<String, Error> {
    match *d {}
}

/// Notifies `peer`; a peer found through etcd whose metadata has not
/// arrived yet is fetched first.
fn reply_to(
    agent: &Agent,
    discovery: Option<&Discovery>,
    peer: &str,
    msg: &[u8],
) -> Result<(), Error> {
    match (agent.notify(peer, msg), discovery) {
        #[cfg(feature = "etcd")]
        (Err(Error::UnknownPeer { .. }), Some(d)) => {
            d.fetch(peer, Duration::from_secs(5))?;
            agent.notify(peer, msg)
        }
        (r, _) => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("16KiB"), Ok(16384));
        assert_eq!(parse_size("16k"), Ok(16384));
        assert_eq!(parse_size("16KB"), Ok(16000));
        assert_eq!(parse_size("64 MiB"), Ok(64 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert!(parse_size("16XB")
            .unwrap_err()
            .contains("unknown unit \"xb\""));
        assert!(parse_size("KiB").is_err());
        assert!(parse_size("99999999999999G")
            .unwrap_err()
            .contains("overflows"));
        assert_eq!(format_size(16384), "16 KiB");
        assert_eq!(format_size(1000), "1000 B");
        assert_eq!(format_size(64 << 20), "64 MiB");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("100us"), Ok(Duration::from_micros(100)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_duration("5h").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn checksum_and_fill() {
        assert_eq!(checksum(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(checksum(b"a"), 0xaf63_dc4c_8601_ec8c);
        let mut a = vec![0u8; 1001];
        let mut b = vec![0u8; 1001];
        fill_random(&mut a, 7);
        fill_random(&mut b, 7);
        assert_eq!(a, b);
        fill_random(&mut b, 8);
        assert_ne!(checksum(&a), checksum(&b));
        assert!(a.iter().any(|&x| x != 0));
    }

    #[test]
    fn percentiles() {
        let v: Vec<u64> = (1..=100).map(|x| x * 1000).collect();
        assert_eq!(percentile(&v, 0.5), 51.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }
}
