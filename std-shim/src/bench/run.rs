//! The initiator's run: connect, measure, verify.

use super::*;

pub(super) fn percentile(sorted: &[u64], p: f64) -> f64 {
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
        let each: Vec<String> = rails.iter().map(ToString::to_string).collect();
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
