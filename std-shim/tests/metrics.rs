//! Metrics as an operator sees them: a real Prometheus server (Debian's
//! `prometheus`, started here on loopback) scrapes the endpoints of an
//! initiator (this process) and of a `kvxfer target` (another process)
//! while real transfers move over UCX and over libfabric (`tcp;ofi_rxm`),
//! and its HTTP API must report exactly the transfers made: bytes and
//! counts by direction and peer, latency histogram counts, notifications
//! each way, nothing in flight, no failure (the READs made from prepared
//! lists by index). Failures are counted exactly
//! by kind: an unknown peer, an unreachable address, a transfer to a
//! stopped target that times out.
#![cfg(all(feature = "ucx", feature = "libfabric", feature = "cli"))]
#![allow(clippy::result_large_err)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kvxfer::{Agent, AgentConfig, Desc, WaitOutcome, XferOp};

#[allow(dead_code)]
mod common;
use common::ChildGuard;

/// The libfabric provider both ends use.
const PROVIDER: &str = "tcp;ofi_rxm";
/// WRITEs made, each of [`WRITE_LEN`] bytes at its own offset.
const WRITES: u64 = 5;
const WRITE_LEN: u64 = 16 << 10;
/// READs made, each of [`READ_LEN`] bytes, reading back what was written.
const READS: u64 = 3;
const READ_LEN: u64 = 8 << 10;

/// A free TCP port on loopback.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `kvxfer target` over `backend`, its metrics served on `metrics`, with
/// `env` set; the address of its side channel.
fn spawn_target(
    name: &str,
    backend: &str,
    size: &str,
    metrics: &str,
    env: &[(&str, &str)],
) -> (ChildGuard, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvxfer"));
    cmd.args([
        "target",
        "--backend",
        backend,
        "--size",
        size,
        "--name",
        name,
    ])
    .args(["--metrics-addr", metrics])
    // Through the backend, not cross-memory attach.
    .env("KVXFER_SAME_HOST_CMA", "0")
    .env_remove("KVXFER_METRICS")
    .env_remove("KVXFER_RAILS")
    .envs(env.iter().copied())
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    if backend == "LIBFABRIC" {
        cmd.args(["--provider", PROVIDER]);
    }
    let mut child = ChildGuard(cmd.spawn().expect("spawn kvxfer target"));
    let mut lines = BufReader::new(child.0.stdout.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("target output").expect("line");
        if let Some(a) = line.strip_prefix("listening ") {
            break a.trim().to_string();
        }
    };
    (child, addr)
}

fn initiator_config(backend: &str) -> AgentConfig {
    let mut cfg = AgentConfig::default()
        .with_backend(backend)
        .with_listen(None)
        .with_same_host(false)
        .with_metrics(true);
    if backend == "LIBFABRIC" {
        cfg = cfg.with_provider(PROVIDER);
    }
    cfg
}

/// Sends `msg` to `peer` and waits for its reply starting with `prefix`.
fn ask(agent: &Agent, peer: &str, msg: &str, prefix: &str) -> String {
    agent.notify(peer, msg.as_bytes()).unwrap();
    let end = Instant::now() + Duration::from_secs(20);
    while Instant::now() < end {
        let mut all = agent.wait_notifications(Duration::from_secs(1)).unwrap();
        if let Some(m) = all.remove(peer).and_then(|v| v.into_iter().next()) {
            let m = String::from_utf8(m).unwrap();
            return match m.strip_prefix(prefix) {
                Some(rest) => rest.to_string(),
                None => panic!("unexpected reply {m:?} to {msg:?}"),
            };
        }
    }
    panic!("no reply to {msg:?}");
}

/// One plain HTTP/1.0 GET on loopback; the body of a 200 answer.
fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let (head, body) = resp.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200")
        .then(|| body.to_string())
        .or_else(|| head.starts_with("HTTP/1.0 200").then(|| body.to_string()))
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            b => format!("%{b:02X}"),
        })
        .collect()
}

/// A Prometheus server on loopback scraping `targets` every second, in
/// a scratch directory; killed when dropped.
struct Prometheus {
    _child: ChildGuard,
    port: u16,
    dir: std::path::PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Prometheus {
    fn start(name: &str, targets: &[String]) -> Prometheus {
        let exe = "/usr/bin/prometheus";
        assert!(
            std::path::Path::new(exe).exists(),
            "{exe} is missing: install Debian's prometheus package (scripts/setup.sh --test)"
        );
        let dir = std::env::temp_dir().join(format!("kvxfer-prom-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let list: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
             scrape_configs:\n  - job_name: kvxfer\n    static_configs:\n      - targets: [{}]\n",
            list.join(", ")
        );
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let port = free_port();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new(exe)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        Prometheus {
            _child: ChildGuard(child),
            port,
            dir,
        }
    }

    /// The value of the instant query `q` when it yields one sample.
    fn query(&self, q: &str) -> Option<f64> {
        let body = http_get(self.port, &format!("/api/v1/query?query={}", url_encode(q)))?;
        if !body.contains("\"status\":\"success\"") {
            return None;
        }
        // {"resultType":"vector","result":[{"metric":{...},"value":[T,"V"]}]}
        let results = body.matches("\"value\":[").count();
        if results != 1 {
            return None;
        }
        let at = body.find("\"value\":[")? + "\"value\":[".len();
        let rest = &body[at..];
        let v = rest.split_once(",\"")?.1.split_once('"')?.0;
        v.parse().ok()
    }

    /// Waits (up to 60 s) until every query yields its value; on time out
    /// fails naming each query with the value last seen.
    fn expect(&self, checks: &[(String, f64)]) {
        self.expect_with(|| checks.to_vec());
    }

    /// As [`expect`](Self::expect), with the checks made anew by `make`
    /// each round (values that may still change, read as they are now).
    fn expect_with(&self, make: impl Fn() -> Vec<(String, f64)>) {
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            let checks = &make();
            let seen: Vec<Option<f64>> = checks.iter().map(|(q, _)| self.query(q)).collect();
            let ok = seen
                .iter()
                .zip(checks)
                .all(|(s, (_, want))| *s == Some(*want));
            if ok {
                return;
            }
            if Instant::now() > end {
                let log =
                    std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(10).collect();
                let mut msg = String::new();
                for (s, (q, want)) in seen.iter().zip(checks) {
                    if *s != Some(*want) {
                        msg += &format!("\n  {q} = {s:?}, want {want}");
                    }
                }
                panic!(
                    "Prometheus did not report the transfers made:{msg}\nits log ends:\n{}",
                    tail.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

/// Real transfers between this process and a `kvxfer target` over
/// `backend`, scraped by a real Prometheus from both processes' endpoints.
fn prometheus_sees_the_transfers(backend: &str) {
    let lower = backend.to_ascii_lowercase();
    let init_name = format!("prom-init-{lower}");
    let target_name = format!("prom-target-{lower}");
    let target_metrics = format!("127.0.0.1:{}", free_port());
    let (_target, addr) = spawn_target(&target_name, backend, "1MiB", &target_metrics, &[]);
    let agent = Agent::new(
        &init_name,
        initiator_config(backend).with_metrics_addr(Some("127.0.0.1:0")),
    )
    .unwrap();
    let init_metrics = agent.metrics_addr().expect("metrics endpoint").to_string();
    let peer = agent.connect(&addr).unwrap();
    assert_eq!(peer, target_name);
    assert_eq!(
        agent.peer_path(&peer).unwrap(),
        backend,
        "not through the backend"
    );
    let region = ask(&agent, &peer, "bench:region", "bench:region ");
    let raddr: u64 = region.split(' ').next().unwrap().parse().unwrap();

    // WRITE a pattern (each with a notification), READ it back.
    let span = (WRITES * WRITE_LEN) as usize;
    let mut buf = kvxfer_testkit::pattern(23, span);
    let want = buf.clone();
    let mut back = vec![0u8; (READS * READ_LEN) as usize];
    // SAFETY: both buffers outlive their registrations (the agent is shut
    // down before they drop) and are read only after the transfers ended.
    unsafe {
        agent.register_slice(&mut buf).unwrap();
        agent.register_slice(&mut back).unwrap();
    }
    for i in 0..WRITES {
        let l = [Desc::new(buf.as_ptr() as u64 + i * WRITE_LEN, WRITE_LEN)];
        let r = [Desc::new(raddr + i * WRITE_LEN, WRITE_LEN)];
        let note = format!("block {i}");
        let req = agent
            .submit(XferOp::Write, &l, &r, &peer, Some(note.as_bytes()))
            .unwrap();
        assert_eq!(req.wait(Duration::from_secs(20)), WaitOutcome::Done);
    }
    // The READs from prepared lists, by index (`make_xfer`).
    let l: Vec<Desc> = (0..READS)
        .map(|i| Desc::new(back.as_ptr() as u64 + i * READ_LEN, READ_LEN))
        .collect();
    let r: Vec<Desc> = (0..READS)
        .map(|i| Desc::new(raddr + i * WRITE_LEN, READ_LEN))
        .collect();
    let (lp, rp) = (
        agent.prep_local(&l).unwrap(),
        agent.prep_remote(&peer, &r).unwrap(),
    );
    for i in 0..READS as u32 {
        let req = agent
            .make_xfer(XferOp::Read, lp, &[i], rp, &[i], None)
            .unwrap();
        req.post().unwrap();
        assert_eq!(req.wait(Duration::from_secs(20)), WaitOutcome::Done);
    }
    // The bytes moved: the target's checksum of what was written, and
    // each READ the start of its WRITE.
    let sum = ask(&agent, &peer, &format!("bench:sum {span}"), "bench:sum ");
    assert_eq!(sum, format!("{:016x}", kvxfer::bench::checksum(&want)));
    for i in 0..READS as usize {
        let (r, w) = (i * READ_LEN as usize, i * WRITE_LEN as usize);
        kvxfer_testkit::assert_same(
            &back[r..r + READ_LEN as usize],
            &want[w..w + READ_LEN as usize],
            "READ back",
        );
    }

    // The application's view first: exactly what was done.
    let snap = agent.metrics().snapshot();
    let p = snap.peer(&peer).expect("peer series");
    assert_eq!(p.bytes, [READS * READ_LEN, WRITES * WRITE_LEN]);
    assert_eq!(p.transfers, [READS, WRITES]);
    assert_eq!(p.latency[1].count, WRITES);
    assert_eq!(p.post_time[0].count, READS);
    assert_eq!(p.notifications_sent, WRITES + 2, "{p:?}");
    assert_eq!(p.notifications_received, 2, "{p:?}");
    assert_eq!(p.in_flight, 0);
    assert!(p.failures.is_empty(), "{:?}", p.failures);

    // Then Prometheus', from both processes.
    let prom = Prometheus::start(&lower, &[init_metrics.clone(), target_metrics.clone()]);
    let i = format!("agent=\"{init_name}\",backend=\"{backend}\",peer=\"{target_name}\"");
    let t = format!("agent=\"{target_name}\",backend=\"{backend}\",peer=\"{init_name}\"");
    let checks: Vec<(String, f64)> = vec![
        (format!("up{{instance=\"{init_metrics}\"}}"), 1.0),
        (format!("up{{instance=\"{target_metrics}\"}}"), 1.0),
        (
            format!("kvxfer_transferred_bytes_total{{{i},direction=\"write\"}}"),
            (WRITES * WRITE_LEN) as f64,
        ),
        (
            format!("kvxfer_transferred_bytes_total{{{i},direction=\"read\"}}"),
            (READS * READ_LEN) as f64,
        ),
        (
            format!("kvxfer_transfers_total{{{i},direction=\"write\"}}"),
            WRITES as f64,
        ),
        (
            format!("kvxfer_transfers_total{{{i},direction=\"read\"}}"),
            READS as f64,
        ),
        (
            format!("kvxfer_transfer_latency_seconds_count{{{i},direction=\"write\"}}"),
            WRITES as f64,
        ),
        (
            format!("kvxfer_transfer_latency_seconds_bucket{{{i},direction=\"read\",le=\"+Inf\"}}"),
            READS as f64,
        ),
        (
            format!("kvxfer_post_seconds_count{{{i},direction=\"write\"}}"),
            WRITES as f64,
        ),
        (format!("kvxfer_transfers_in_flight{{{i}}}"), 0.0),
        (
            format!("sum(kvxfer_transfer_failures_total{{agent=\"{init_name}\"}}) or vector(0)"),
            0.0,
        ),
        // Region and checksum questions, and a notification per WRITE.
        (
            format!("kvxfer_notifications_sent_total{{{i}}}"),
            (WRITES + 2) as f64,
        ),
        (format!("kvxfer_notifications_received_total{{{i}}}"), 2.0),
        // The target's side: it received them all and answered two.
        (
            format!("kvxfer_notifications_received_total{{{t}}}"),
            (WRITES + 2) as f64,
        ),
        (format!("kvxfer_notifications_sent_total{{{t}}}"), 2.0),
        // A target moves nothing itself: one-sided READ and WRITE.
        (format!("sum(kvxfer_transfers_total{{{t}}})"), 0.0),
        (format!("kvxfer_peers{{agent=\"{init_name}\"}}"), 1.0),
    ];
    prom.expect(&checks);
    agent.shutdown();
}

#[test]
fn prometheus_scrapes_ucx_transfers() {
    prometheus_sees_the_transfers("UCX");
}

#[test]
fn prometheus_scrapes_libfabric_transfers() {
    prometheus_sees_the_transfers("LIBFABRIC");
}

/// Bytes moved each way by [`prometheus_sees_the_rails`].
const RAIL_LEN: u64 = 8 << 20;

/// Real transfers over two rails on `lo` (both ends: this process through
/// [`AgentConfig::with_rails`], the `kvxfer target` through
/// `KVXFER_RAILS=lo,lo`), checked byte for byte; then Prometheus must
/// report for each rail exactly the bytes, failures and state
/// [`Agent::rail_stats`] reports, bytes that add up to at least what was
/// moved.
fn prometheus_sees_the_rails(backend: &str) {
    let lower = backend.to_ascii_lowercase();
    let init_name = format!("rails-init-{lower}");
    let target_name = format!("rails-target-{lower}");
    let target_metrics = format!("127.0.0.1:{}", free_port());
    let (_target, addr) = spawn_target(
        &target_name,
        backend,
        "8MiB",
        &target_metrics,
        &[("KVXFER_RAILS", "lo,lo")],
    );
    let agent = Agent::new(
        &init_name,
        initiator_config(backend)
            .with_rails(&["lo", "lo"])
            .with_metrics_addr(Some("127.0.0.1:0")),
    )
    .unwrap();
    let init_metrics = agent.metrics_addr().expect("metrics endpoint").to_string();
    let peer = agent.connect(&addr).unwrap();
    assert_eq!(agent.peer_path(&peer).unwrap(), backend);
    let region = ask(&agent, &peer, "bench:region", "bench:region ");
    let raddr: u64 = region.split(' ').next().unwrap().parse().unwrap();

    // One WRITE and one READ of 8 MiB: striped over both rails.
    let mut buf = kvxfer_testkit::pattern(31, RAIL_LEN as usize);
    let want = buf.clone();
    let mut back = vec![0u8; RAIL_LEN as usize];
    // SAFETY: both buffers outlive their registrations (the agent is shut
    // down before they drop) and are read only after the transfers ended.
    unsafe {
        agent.register_slice(&mut buf).unwrap();
        agent.register_slice(&mut back).unwrap();
    }
    for (op, local) in [(XferOp::Write, &buf), (XferOp::Read, &back)] {
        let l = [Desc::new(local.as_ptr() as u64, RAIL_LEN)];
        let r = [Desc::new(raddr, RAIL_LEN)];
        let req = agent.submit(op, &l, &r, &peer, None).unwrap();
        assert_eq!(req.wait(Duration::from_secs(30)), WaitOutcome::Done);
    }
    let sum = ask(
        &agent,
        &peer,
        &format!("bench:sum {RAIL_LEN}"),
        "bench:sum ",
    );
    assert_eq!(sum, format!("{:016x}", kvxfer::bench::checksum(&want)));
    kvxfer_testkit::assert_same(&back, &want, "READ back over two rails");

    // Under heavy load a rail may be marked down (no completion within
    // KVXFER_RAIL_TIMEOUT_MS) and its parts moved on the other: what is
    // checked is that the metrics say what the rails say, whatever it is.
    let rails = agent.rail_stats();
    assert_eq!(rails.len(), 2, "{rails:?}");
    assert!(rails.iter().all(|r| r.name == "lo"), "{rails:?}");
    let total: u64 = rails.iter().map(|r| r.bytes).sum();
    assert!(
        total >= 2 * RAIL_LEN,
        "{total} < {}: {rails:?}",
        2 * RAIL_LEN
    );
    let snap = agent.metrics().snapshot().rails;
    assert_eq!(snap.iter().map(|r| r.bytes).sum::<u64>(), total);

    let prom = Prometheus::start(
        &format!("rails-{lower}"),
        &[init_metrics.clone(), target_metrics.clone()],
    );
    let a = format!("agent=\"{init_name}\",backend=\"{backend}\"");
    let t = format!("agent=\"{target_name}\",backend=\"{backend}\"");
    prom.expect_with(|| {
        let rails = agent.rail_stats();
        let mut checks: Vec<(String, f64)> = vec![
            (format!("up{{instance=\"{init_metrics}\"}}"), 1.0),
            (format!("up{{instance=\"{target_metrics}\"}}"), 1.0),
            (format!("sum(kvxfer_rail_bytes_total{{{a}}})"), total as f64),
            (format!("count(kvxfer_rail_up{{{a}}})"), 2.0),
            // The target's two rails (it posts nothing: they stay up).
            (format!("sum(kvxfer_rail_up{{{t},rail=\"lo\"}})"), 2.0),
            (
                format!("count(kvxfer_rail_state{{{t},state=\"up\"}} == 1)"),
                2.0,
            ),
        ];
        for (i, r) in rails.iter().enumerate() {
            let s = format!("{a},rail=\"lo\",index=\"{i}\"");
            let is = |state: &str| f64::from(u8::from(r.state.name() == state));
            checks.push((format!("kvxfer_rail_bytes_total{{{s}}}"), r.bytes as f64));
            checks.push((
                format!("kvxfer_rail_failures_total{{{s}}}"),
                r.failures as f64,
            ));
            checks.push((format!("kvxfer_rail_up{{{s}}}"), is("up")));
            for state in ["up", "down", "probing"] {
                checks.push((
                    format!("kvxfer_rail_state{{{s},state=\"{state}\"}}"),
                    is(state),
                ));
            }
        }
        checks
    });
    agent.shutdown();
}

#[test]
fn prometheus_scrapes_ucx_rails() {
    prometheus_sees_the_rails("UCX");
}

#[test]
fn prometheus_scrapes_libfabric_rails() {
    prometheus_sees_the_rails("LIBFABRIC");
}

/// The endpoint answers `GET /metrics` in the text format and 404
/// elsewhere; with recording off, the agent is not in it.
#[test]
fn endpoint_serves_text_format_and_recording_can_be_off() {
    let on = Agent::new(
        "endpoint-on",
        initiator_config("UCX").with_metrics_addr(Some("127.0.0.1:0")),
    )
    .unwrap();
    let off = Agent::new("endpoint-off", initiator_config("UCX").with_metrics(false)).unwrap();
    let port = on.metrics_addr().unwrap().port();
    let body = http_get(port, "/metrics").expect("200 from /metrics");
    assert!(
        body.contains("# TYPE kvxfer_transferred_bytes_total counter\n"),
        "{body}"
    );
    assert!(
        body.contains("kvxfer_peers{agent=\"endpoint-on\",backend=\"UCX\"} 0\n"),
        "{body}"
    );
    assert!(!body.contains("endpoint-off"), "{body}");
    assert_eq!(http_get(port, "/nothing"), None);
    assert!(!off.metrics().enabled());
    // Off records nothing, even errors.
    assert!(off
        .prepare(XferOp::Write, &[], &[], "nobody", None)
        .is_err());
    assert!(off.metrics().snapshot().errors.is_empty());
    // The same address again is shared, not a second bind.
    let addr = on.metrics_addr().unwrap().to_string();
    let again = kvxfer::metrics::serve(&addr).expect("shared endpoint");
    assert_eq!(again.local_addr(), on.metrics_addr().unwrap());
}

/// Failures are counted by kind, exactly: preparing for and notifying an
/// unknown peer, connecting to an address nobody serves, and a WRITE to
/// a stopped target that times out.
#[test]
fn failures_are_counted_by_kind() {
    let (target, addr) = spawn_target(
        "fail-target",
        "UCX",
        "4MiB",
        &format!("127.0.0.1:{}", free_port()),
        &[],
    );
    let agent = Agent::new(
        "fail-init",
        initiator_config("UCX").with_transfer_timeout(Some(Duration::from_millis(300))),
    )
    .unwrap();
    let mut src = kvxfer_testkit::pattern(5, 4 << 20);
    // SAFETY: `src` outlives its registration and is only read by WRITEs.
    unsafe { agent.register_slice(&mut src).unwrap() };
    let d = [Desc::new(src.as_ptr() as u64, 4096)];

    // Bad peer: twice to prepare, once to notify.
    for _ in 0..2 {
        let e = agent
            .prepare(XferOp::Write, &d, &d, "nobody", None)
            .unwrap_err();
        assert_eq!(e.kind(), "unknown_peer");
    }
    assert_eq!(
        agent.notify("nobody", b"x").unwrap_err().kind(),
        "unknown_peer"
    );
    // Nobody listens there.
    let dead = format!("127.0.0.1:{}", free_port());
    let connect_err = agent.connect(&dead).unwrap_err();

    // A timeout: the target stopped, a WRITE of 4 MiB cannot finish.
    let peer = agent.connect(&addr).unwrap();
    let region = ask(&agent, &peer, "bench:region", "bench:region ");
    let raddr: u64 = region.split(' ').next().unwrap().parse().unwrap();
    let pid = target.0.id().to_string();
    let kill = |sig: &str| {
        assert!(Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success());
    };
    kill("-STOP");
    let l = [Desc::new(src.as_ptr() as u64, 4 << 20)];
    let r = [Desc::new(raddr, 4 << 20)];
    let req = agent.submit(XferOp::Write, &l, &r, &peer, None).unwrap();
    let outcome = req.wait(Duration::from_secs(20));
    kill("-CONT");
    match &outcome {
        WaitOutcome::Failed(e) => assert_eq!(e.kind(), "timed_out", "{e}"),
        other => panic!("expected a timeout, got {other:?}"),
    }
    drop(req);

    let snap = agent.metrics().snapshot();
    assert_eq!(
        snap.errors_of("prepare", "unknown_peer"),
        2,
        "{:?}",
        snap.errors
    );
    assert_eq!(
        snap.errors_of("notify", "unknown_peer"),
        1,
        "{:?}",
        snap.errors
    );
    assert_eq!(
        snap.errors_of("connect", connect_err.kind()),
        1,
        "{:?}",
        snap.errors
    );
    let total: u64 = snap.errors.iter().map(|(_, _, n)| n).sum();
    assert_eq!(total, 4, "no other error counted: {:?}", snap.errors);
    let p = snap.peer(&peer).unwrap();
    assert_eq!(p.failures, vec![("timed_out", 1)]);
    assert_eq!(p.timeouts, 1);
    assert_eq!(p.transfers, [0, 0]);
    assert_eq!(p.bytes, [0, 0]);
    assert_eq!(p.in_flight, 0);
    // The same in the text format.
    let text = agent.metrics().encode();
    let series = "agent=\"fail-init\",backend=\"UCX\",peer=\"fail-target\"";
    for want in [
        format!("kvxfer_transfer_failures_total{{{series},kind=\"timed_out\"}} 1"),
        format!("kvxfer_transfer_timeouts_total{{{series}}} 1"),
        "kvxfer_errors_total{agent=\"fail-init\",backend=\"UCX\",op=\"prepare\",kind=\"unknown_peer\"} 2"
            .to_string(),
    ] {
        assert!(text.lines().any(|l| l == want), "missing {want:?} in\n{text}");
    }
    agent.shutdown();
}
