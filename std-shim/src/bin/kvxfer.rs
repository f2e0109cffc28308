//! The `kvxfer` command-line tool: `info`, `target` and `bench`.
#![allow(clippy::result_large_err)]

use std::io::Write;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use kvxfer::bench::{self, BenchOptions, TargetOptions};
use kvxfer::{BackendKind, XferOp};

/// Move KV-cache blocks between processes over UCX or libfabric.
#[derive(Parser, Debug)]
#[command(name = "kvxfer", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Show the backends built in and whether they work on this machine.
    Info,
    /// Serve a registered buffer until killed or standard input closes.
    Target {
        /// Side-channel address to listen on.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
        /// Backend name (`kvxfer info` lists them); default from KVXFER_BACKEND.
        #[arg(long)]
        backend: Option<String>,
        /// libfabric provider, e.g. "tcp;ofi_rxm" or "shm".
        #[arg(long)]
        provider: Option<String>,
        /// Network interfaces to use as rails, comma separated (UCX or
        /// libfabric; sets KVXFER_RAILS).
        #[arg(long, value_name = "IF,IF,...")]
        rails: Option<String>,
        /// Size of the served buffer (units B, KiB, MiB, GiB).
        #[arg(long, default_value = "64MiB", value_parser = bench::parse_size)]
        size: u64,
        /// Agent name.
        #[arg(long, default_value = "kvxfer-target")]
        name: String,
        /// Longest idle sleep of the progress thread (0: poll without
        /// sleeping, as benchmarks do; applications default to 100us).
        #[arg(long, default_value = "0", value_parser = bench::parse_duration)]
        idle_sleep: Duration,
        /// Memory of the served buffer (vram needs the cuda feature).
        #[arg(long, value_enum, default_value = "dram")]
        mem: Mem,
        /// Device of the served buffer (GPU ordinal for vram).
        #[arg(long, default_value_t = 0)]
        device: u32,
        /// Publish the target in etcd under its name (URL[,URL...]).
        #[arg(long, value_name = "URL")]
        etcd: Option<String>,
        /// etcd namespace prefix.
        #[arg(long, default_value = "/kvxfer/", requires = "etcd")]
        etcd_prefix: Option<String>,
        /// Serve metrics in Prometheus' text format at
        /// http://ADDR/metrics (default from KVXFER_METRICS_ADDR).
        #[arg(long, value_name = "ADDR")]
        metrics_addr: Option<String>,
    },
    /// Measure transfers against a target (spawned on loopback by default).
    Bench {
        /// A running target's side channel (host:port); default: spawn one.
        #[arg(long, conflicts_with = "etcd")]
        peer: Option<String>,
        /// Find the target in etcd by --target-name (URL[,URL...]).
        #[arg(long, value_name = "URL")]
        etcd: Option<String>,
        /// etcd namespace prefix.
        #[arg(long, default_value = "/kvxfer/", requires = "etcd")]
        etcd_prefix: Option<String>,
        /// Name of the target to find in etcd.
        #[arg(long, default_value = "kvxfer-target", requires = "etcd")]
        target_name: String,
        /// Backend name (`kvxfer info` lists them); default from KVXFER_BACKEND.
        #[arg(long)]
        backend: Option<String>,
        /// libfabric provider, e.g. "tcp;ofi_rxm" or "shm".
        #[arg(long)]
        provider: Option<String>,
        /// Network interfaces to use as rails, comma separated (UCX or
        /// libfabric; sets KVXFER_RAILS).
        #[arg(long, value_name = "IF,IF,...")]
        rails: Option<String>,
        /// Direction.
        #[arg(long, value_enum, default_value = "write")]
        op: Op,
        /// Bytes per block (units B, KiB, MiB, GiB).
        #[arg(long, default_value = "16KiB", value_parser = bench::parse_size)]
        block_size: u64,
        /// Blocks per request.
        #[arg(long, default_value_t = 128)]
        blocks: u64,
        /// Requests in flight.
        #[arg(long, default_value_t = 4)]
        inflight: usize,
        /// Measured requests (default 1000 unless --duration is given).
        #[arg(long)]
        iters: Option<u64>,
        /// Measure for this long instead (e.g. 5s, 500ms).
        #[arg(long, value_parser = bench::parse_duration, conflicts_with = "iters")]
        duration: Option<Duration>,
        /// Requests before measuring.
        #[arg(long, default_value_t = 16)]
        warmup: u64,
        /// Distance between block starts (default: the block size, blocks
        /// back to back); twice the block size keeps 128 blocks 128
        /// segments, like scattered KV-cache blocks.
        #[arg(long, value_parser = bench::parse_size)]
        stride: Option<u64>,
        /// Describe each side as one strided list (address, block size,
        /// stride, count) instead of one descriptor per block.
        #[arg(long)]
        strided: bool,
        /// Also measure raw TCP on loopback with the same request size (a
        /// request and a one-byte reply; a stream) and print the ratios.
        #[arg(long)]
        tcp_baseline: bool,
        /// Memory of both buffers (vram needs the cuda feature).
        #[arg(long, value_enum, default_value = "dram")]
        mem: Mem,
        /// Device of the buffers (GPU ordinal for vram).
        #[arg(long, default_value_t = 0)]
        device: u32,
        /// Give the initiator a progress thread instead of polling from
        /// the measuring thread.
        #[arg(long)]
        progress_thread: bool,
        /// Print one JSON object instead of the table.
        #[arg(long)]
        json: bool,
        /// Serve the initiator's metrics in Prometheus' text format at
        /// http://ADDR/metrics (default from KVXFER_METRICS_ADDR).
        #[arg(long, value_name = "ADDR")]
        metrics_addr: Option<String>,
        /// Measure each request size from LOW to HIGH, doubling (one block
        /// per request, 1 s each unless --iters or --duration), over each
        /// backend of --backend, which may then be a list
        /// (UCX,LIBFABRIC:shm); prints a table and writes OUT.json and
        /// OUT.svg (bandwidth and p50 latency against size).
        #[arg(long, value_name = "LOW..HIGH", conflicts_with_all = ["peer", "etcd", "tcp_baseline"])]
        sweep: Option<String>,
        /// Path of the sweep's files without extension.
        #[arg(
            long,
            value_name = "OUT",
            default_value = "kvxfer-sweep",
            requires = "sweep"
        )]
        out: std::path::PathBuf,
    },
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum Mem {
    /// Host memory.
    Dram,
    /// GPU memory (the cuda feature, on by default, and a CUDA driver).
    Vram,
}

impl Mem {
    fn kind(self) -> kvxfer::MemKind {
        match self {
            Mem::Dram => kvxfer::MemKind::Dram,
            Mem::Vram => kvxfer::MemKind::Vram,
        }
    }
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum Op {
    Read,
    Write,
}

fn info() -> ExitCode {
    println!("kvxfer {}", env!("CARGO_PKG_VERSION"));
    match kvxfer::config::select_backend_from_env(None) {
        Ok((b, src)) => println!("selected backend: {b} (from {})", src.name()),
        Err(e) => match bench::check_setup(None, None, kvxfer::MemKind::Dram) {
            Err(why) => println!("selected backend: {why}"),
            Ok(_) => println!("selected backend: error: {e}"),
        },
    }
    for &kind in BackendKind::ALL {
        match kind.report() {
            Some(report) => print!("{report}"),
            None => {
                let needs = kind.descriptor().needs;
                println!(
                    "{kind}: not built in (build with --features {}{})",
                    kind.feature(),
                    needs.map_or(String::new(), |n| format!(" (needs {n})"))
                );
            }
        }
    }
    info_same_host();
    match kvxfer::AgentConfig::default().effective_keepalive() {
        Ok(d) if d.is_zero() => println!(
            "keepalive of other peers: off ({}=0); a silent peer's transfers end at their deadline",
            kvxfer::config::ENV_KEEPALIVE_MS
        ),
        Ok(d) => println!(
            "keepalive of other peers: a peer silent for {} ms while transfers to it are in \
             flight is failed ({} sets it, 0 turns it off)",
            d.as_millis(),
            kvxfer::config::ENV_KEEPALIVE_MS
        ),
        Err(e) => println!("keepalive: {e}"),
    }
    info_cuda();
    ExitCode::SUCCESS
}

/// Whether peers on this host can be reached by cross-memory attach.
fn info_same_host() {
    let on = std::env::var(kvxfer_local::ENV).map_or(true, |v| v.trim() != "0");
    let yama = std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope")
        .map_or("no Yama".to_string(), |v| {
            format!("Yama ptrace_scope {}", v.trim())
        });
    println!(
        "same-host peers: {} ({}=0 turns it off); cross-memory attach needs ptrace permission \
         over the peer ({yama})",
        if on {
            "cross-memory attach"
        } else {
            "through the backend"
        },
        kvxfer_local::ENV
    );
}

fn info_cuda() {
    if !kvxfer_cuda::driver_present() {
        println!(
            "CUDA: no driver (libcuda.so.1 not found): VRAM and CUDA_IPC need an NVIDIA GPU and \
             its driver (Debian: apt-get install nvidia-driver)"
        );
        return;
    }
    match kvxfer_cuda::driver_version() {
        Ok((major, minor)) => println!("CUDA: driver API {major}.{minor}"),
        Err(e) => println!("CUDA: driver present, version unknown: {e}"),
    }
    match kvxfer_cuda::devices() {
        Ok(devs) if devs.is_empty() => println!("  no CUDA device visible (CUDA_VISIBLE_DEVICES?)"),
        Ok(devs) => {
            for d in devs {
                println!(
                    "  GPU {}: {} ({} MiB, sm_{}{}, {} SMs, PCI {}, {})",
                    d.ordinal,
                    d.name,
                    d.total_mem >> 20,
                    d.compute_capability.0,
                    d.compute_capability.1,
                    d.multiprocessors,
                    d.pci_bus_id,
                    d.uuid_string()
                );
            }
        }
        Err(e) => println!("  listing devices failed: {e}"),
    }
    if !cfg!(feature = "cuda") {
        println!(
            "  this kvxfer is built without the cuda feature: no VRAM transfers (--features cuda)"
        );
    }
}

/// `kvxfer bench --sweep RANGE`: every size over every backend of
/// `base.backend`, then the table (or JSON) and the files.
fn run_sweep(base: &BenchOptions, range: &str, out: &std::path::Path, json: bool) -> ExitCode {
    use kvxfer::sweep::{self, SweepBackend, SweepPoint};
    let usage = |e: String| {
        eprintln!("kvxfer bench: {e}");
        ExitCode::from(2)
    };
    let sizes = match sweep::parse_range(range) {
        Ok(s) => s,
        Err(e) => return usage(format!("--sweep {range}: {e}")),
    };
    let backends = match &base.backend {
        Some(list) => match sweep::parse_backends(list) {
            Ok(b) => b,
            Err(e) => return usage(format!("--backend {list}: {e}")),
        },
        None => match kvxfer::config::select_backend_from_env(None) {
            Ok((kind, _)) => vec![SweepBackend {
                backend: kind.name().to_string(),
                provider: base.provider.clone(),
            }],
            // Named by the check below, with its source.
            Err(_) => vec![],
        },
    };
    let mut base = base.clone();
    if base.iters.is_none() && base.duration.is_none() {
        base.duration = Some(Duration::from_secs(1));
    }
    base.progress_bar = false;
    // Every backend is checked before the first is measured.
    let checks: Vec<_> = if backends.is_empty() {
        vec![bench::check_setup(None, base.provider.as_deref(), base.mem).map(|_| ())]
    } else {
        backends
            .iter()
            .map(|b| {
                let provider = b.provider.as_deref().or(base.provider.as_deref());
                bench::check_setup(Some(&b.backend), provider, base.mem).map(|_| ())
            })
            .collect()
    };
    if let Some(Err(e)) = checks.into_iter().find(Result::is_err) {
        return usage(e.to_string());
    }
    let mut points = Vec::new();
    for b in &backends {
        for &size in &sizes {
            let opts = sweep::point_options(&base, b, size);
            match bench::run_bench(&opts) {
                Ok(report) => {
                    eprintln!(
                        "sweep: {} {}: {:.3} GB/s, p50 {:.1} us",
                        b.label(),
                        bench::format_size(size),
                        report.gb_per_s,
                        report.p50_us
                    );
                    points.push(SweepPoint {
                        label: b.label(),
                        report,
                    });
                }
                Err(e) => {
                    eprintln!(
                        "kvxfer bench: FAILED: sweep {} at {}: {e}",
                        b.label(),
                        bench::format_size(size)
                    );
                    return ExitCode::from(e.exit_code());
                }
            }
        }
    }
    let json_path = out.with_extension("json");
    let svg_path = out.with_extension("svg");
    let json_text = sweep::json(&points);
    if let Err(e) = std::fs::write(&json_path, &json_text) {
        eprintln!("kvxfer bench: writing {}: {e}", json_path.display());
        return ExitCode::FAILURE;
    }
    if let Err(e) = sweep::svg(&points, &svg_path) {
        eprintln!("kvxfer bench: {e}");
        return ExitCode::FAILURE;
    }
    if json {
        println!("{json_text}");
    } else {
        println!("{}", sweep::table(&points));
        println!(
            "sweep written to {} and {}",
            json_path.display(),
            svg_path.display()
        );
    }
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    match cli.command {
        Cmd::Info => info(),
        Cmd::Target {
            listen,
            backend,
            provider,
            rails,
            size,
            name,
            etcd,
            etcd_prefix,
            idle_sleep,
            mem,
            device,
            metrics_addr,
        } => {
            set_rails(rails.as_deref());
            let stop = Arc::new(AtomicBool::new(false));
            bench::stop_on_stdin_eof(Arc::clone(&stop));
            let opts = TargetOptions {
                listen,
                backend,
                provider,
                size,
                name,
                etcd,
                etcd_prefix,
                idle_sleep,
                mem: mem.kind(),
                device,
                metrics_addr,
            };
            let r = bench::run_target(&opts, &stop, |addr| {
                println!("listening {addr}");
                let _ = std::io::stdout().flush();
            });
            match r {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("kvxfer target: {e}");
                    ExitCode::from(e.exit_code())
                }
            }
        }
        Cmd::Bench {
            peer,
            etcd,
            etcd_prefix,
            target_name,
            backend,
            provider,
            rails,
            op,
            block_size,
            blocks,
            inflight,
            iters,
            duration,
            warmup,
            stride,
            strided,
            tcp_baseline,
            mem,
            device,
            progress_thread,
            json,
            sweep,
            out,
            metrics_addr,
        } => {
            set_rails(rails.as_deref());
            let opts = BenchOptions {
                peer,
                etcd,
                etcd_prefix,
                target_name,
                backend,
                provider,
                op: match op {
                    Op::Read => XferOp::Read,
                    Op::Write => XferOp::Write,
                },
                block_size,
                blocks,
                inflight,
                iters,
                duration,
                warmup,
                stride,
                strided,
                tcp_baseline,
                mem: mem.kind(),
                device,
                progress_thread,
                progress_bar: !json,
                metrics_addr,
                ..BenchOptions::default()
            };
            if let Some(range) = sweep {
                return run_sweep(&opts, &range, &out, json);
            }
            match bench::run_bench(&opts) {
                Ok(r) => {
                    println!("{}", if json { r.json() } else { r.table() });
                    ExitCode::SUCCESS
                }
                Err(e @ bench::BenchError::Options(_)) => {
                    eprintln!("kvxfer bench: {e}");
                    ExitCode::from(e.exit_code())
                }
                Err(e) => {
                    eprintln!("kvxfer bench: FAILED: {e}");
                    ExitCode::from(e.exit_code())
                }
            }
        }
    }
}

/// `--rails`: the interfaces for this process and a target it spawns.
fn set_rails(rails: Option<&str>) {
    if let Some(r) = rails {
        // Set before any agent or thread of this process starts.
        std::env::set_var(kvxfer_rails_env(), r);
    }
}

/// The variable `--rails` sets.
fn kvxfer_rails_env() -> &'static str {
    "KVXFER_RAILS"
}
