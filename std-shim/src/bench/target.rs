//! `kvxfer target`: serve a buffer and answer the benchmark's requests.

use super::*;

/// `cfg` with the backend and provider given on the command line, if any.
pub(super) fn agent_config(
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
pub(super) fn sized_for(cfg: AgentConfig, opts: &BenchOptions) -> AgentConfig {
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
