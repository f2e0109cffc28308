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

mod buffer;
use buffer::*;
mod target;
pub use target::*;
mod report;
pub use report::*;
mod child;
use child::*;
mod run;
pub use run::*;
mod progress;
pub use progress::*;
mod discovery;
use discovery::*;

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
                k.feature(),
                config::BUILT_IN
            ),
            Err(_) => format!(
                "{source}={value}: no such backend; built in: {}",
                config::BUILT_IN
            ),
        })
    })?;
    kind.preflight(provider).map_err(BenchError::Options)?;
    check_mem(mem)?;
    Ok(kind)
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
#[cfg(test)]
mod tests;
