//! The benchmark's settings ([`BenchOptions`]) and what it measured ([`BenchReport`]).

use super::*;

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
pub(super) struct TelemetryAcc {
    last: XferTelemetry,
    post_ns: Vec<u64>,
    xfer_ns: Vec<u64>,
}

impl TelemetryAcc {
    pub(super) fn add(&mut self, t: XferTelemetry) {
        self.post_ns.push(t.post_nanos);
        if let (Some(p), Some(c)) = (t.posted_at, t.completed_at) {
            self.xfer_ns.push(c.saturating_nanos_since(p));
        }
        self.last = t;
    }

    pub(super) fn summary(mut self) -> TelemetrySummary {
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
