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
        /// Backend (UCX, LIBFABRIC); default from KVXFER_BACKEND.
        #[arg(long)]
        backend: Option<String>,
        /// libfabric provider, e.g. "tcp;ofi_rxm" or "shm".
        #[arg(long)]
        provider: Option<String>,
        /// Size of the served buffer (units B, KiB, MiB, GiB).
        #[arg(long, default_value = "64MiB", value_parser = bench::parse_size)]
        size: u64,
        /// Agent name.
        #[arg(long, default_value = "kvxfer-target")]
        name: String,
        /// Publish the target in etcd under its name (URL[,URL...]).
        #[arg(long, value_name = "URL")]
        etcd: Option<String>,
        /// etcd namespace prefix.
        #[arg(long, default_value = "/kvxfer/", requires = "etcd")]
        etcd_prefix: Option<String>,
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
        /// Backend (UCX, LIBFABRIC); default from KVXFER_BACKEND.
        #[arg(long)]
        backend: Option<String>,
        /// libfabric provider, e.g. "tcp;ofi_rxm" or "shm".
        #[arg(long)]
        provider: Option<String>,
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
        /// Print one JSON object instead of the table.
        #[arg(long)]
        json: bool,
    },
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
        Err(e) => println!("selected backend: error: {e}"),
    }
    for kind in BackendKind::ALL {
        if !kvxfer::config::is_built_in(kind) {
            println!("{kind}: not built in");
            continue;
        }
        match kind {
            BackendKind::Libfabric => {
                #[cfg(feature = "libfabric")]
                {
                    let usable = kvxfer_libfabric::usable_providers();
                    println!(
                        "{kind}: built in; usable providers: {}",
                        if usable.is_empty() {
                            "none".to_string()
                        } else {
                            usable.join(", ")
                        }
                    );
                    for p in usable {
                        let cfg = kvxfer::AgentConfig::default()
                            .with_backend(kind.name())
                            .with_provider(p.clone())
                            .with_listen(None);
                        match kvxfer::Agent::new("kvxfer-info", cfg) {
                            Ok(a) => {
                                println!("  {p}: transport opens");
                                a.shutdown();
                            }
                            Err(e) => println!("  {p}: transport fails: {e}"),
                        }
                    }
                }
            }
            _ => {
                let cfg = kvxfer::AgentConfig::default()
                    .with_backend(kind.name())
                    .with_listen(None);
                match kvxfer::Agent::new("kvxfer-info", cfg) {
                    Ok(a) => {
                        println!("{kind}: built in; transport opens");
                        a.shutdown();
                    }
                    Err(e) => println!("{kind}: built in; transport fails: {e}"),
                }
            }
        }
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
            size,
            name,
            etcd,
            etcd_prefix,
        } => {
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
            };
            let r = bench::run_target(&opts, &stop, |addr| {
                println!("listening {addr}");
                let _ = std::io::stdout().flush();
            });
            match r {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("kvxfer target: {e}");
                    ExitCode::FAILURE
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
            op,
            block_size,
            blocks,
            inflight,
            iters,
            duration,
            warmup,
            json,
        } => {
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
                ..BenchOptions::default()
            };
            match bench::run_bench(&opts) {
                Ok(r) => {
                    println!("{}", if json { r.json() } else { r.table() });
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("kvxfer bench: FAILED: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
