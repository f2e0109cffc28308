//! `kvxfer bench` and `kvxfer target` as a user runs them: the bench's data
//! check covers each prepared request with fresh data, and the target's
//! `bench:fill` really replaces its bytes.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kvxfer::bench::{checksum, fill_random};
use kvxfer::{Agent, AgentConfig};

const KVXFER: &str = env!("CARGO_BIN_EXE_kvxfer");

/// The last line `kvxfer bench ARGS` printed, after checking it succeeded.
fn bench_last_line(args: &[&str]) -> String {
    bench_on("UCX", args)
}

/// The last line of `kvxfer bench ARGS` over `backend`, which succeeded.
fn bench_on(backend: &str, args: &[&str]) -> String {
    let out = Command::new(KVXFER)
        .arg("bench")
        .args(args)
        .env("KVXFER_BACKEND", backend)
        .output()
        .expect("run kvxfer bench");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "kvxfer bench {args:?}: {}\n{text}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines().last().unwrap_or_default().to_string()
}

#[test]
fn bench_checks_each_request_with_fresh_data() {
    for op in ["write", "read"] {
        let last = bench_last_line(&[
            "--op",
            op,
            "--block-size",
            "4KiB",
            "--blocks",
            "8",
            "--stride",
            "8KiB",
            "--inflight",
            "3",
            "--iters",
            "30",
        ]);
        assert!(
            last.starts_with("data verified: checksum ")
                && last.ends_with("also after each prepared request moved fresh data"),
            "{op}: {last}"
        );
    }
}

#[test]
fn tcp_baseline_is_measured_in_the_same_run() {
    let args = [
        "--block-size",
        "4KiB",
        "--blocks",
        "1",
        "--inflight",
        "1",
        "--iters",
        "200",
        "--tcp-baseline",
    ];
    let last = bench_last_line(&args);
    assert!(
        last.starts_with("raw TCP on loopback, 4 KiB per request: request + 1-byte reply p50 ")
            && last.contains("(kvxfer p50 / TCP = ")
            && last.contains("(kvxfer GB/s / TCP = "),
        "{last}"
    );
    let json = bench_last_line(&[&args[..], &["--json"]].concat());
    let at = json.find("\"tcp_baseline\":{\"request_bytes\":4096,\"requests\":200,");
    assert!(at.is_some(), "{json}");
    assert!(json_number(&json, "p50_us") > 0, "{json}");
}

/// The number after `"key":` in a JSON report.
fn json_number(json: &str, key: &str) -> u64 {
    let at = json.find(&format!("\"{key}\":")).expect(key) + key.len() + 3;
    let digits: String = json[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().expect(key)
}

/// KV-cache-sized requests (one layer of a 32k-token context: 2,048 blocks
/// of 16 KiB; 16,384 blocks of 4 KiB, explicit and strided) over both
/// backends: each moves every block as its own segment and its data is
/// verified by the bench (after the run and after each request once more
/// with fresh data).
#[test]
fn kv_cache_sized_requests_move_and_verify() {
    let cases: [(&str, &str, &str, bool); 3] = [
        ("16KiB", "2048", "32KiB", false),
        ("4KiB", "16384", "8KiB", false),
        ("4KiB", "16384", "8KiB", true),
    ];
    for backend in ["UCX", "LIBFABRIC"] {
        for (block, blocks, stride, strided) in cases {
            let mut args = vec![
                "--block-size",
                block,
                "--blocks",
                blocks,
                "--stride",
                stride,
                "--inflight",
                "1",
                "--iters",
                "3",
                "--warmup",
                "1",
                "--json",
            ];
            if strided {
                args.push("--strided");
            }
            let json = bench_on(backend, &args);
            let what = format!("{backend} {args:?}: {json}");
            let n: u64 = blocks.parse().unwrap();
            assert!(json.contains("\"verified\":true"), "{what}");
            assert!(json.contains(&format!("\"strided\":{strided}")), "{what}");
            assert_eq!(json_number(&json, "blocks"), n, "{what}");
            assert_eq!(json_number(&json, "descs"), n, "{what}");
            assert_eq!(json_number(&json, "segments"), n, "{what}");
            let size = kvxfer::bench::parse_size(block).unwrap();
            assert_eq!(json_number(&json, "bytes") / 3, n * size, "{what}");
        }
    }
}

/// Waits for the reply to a bench request that starts with `prefix`.
fn reply(agent: &Agent, peer: &str, prefix: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let mut all = agent.take_notifications().expect("notifications");
        for m in all.remove(peer).unwrap_or_default() {
            let s = String::from_utf8_lossy(&m).into_owned();
            if let Some(rest) = s.strip_prefix(prefix) {
                return rest.trim().to_string();
            }
            assert!(!s.starts_with("bench:error"), "{s}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    panic!("no {prefix:?} reply within 10 s");
}

#[test]
fn target_fill_replaces_its_bytes() {
    const LEN: usize = 64 << 10;
    let mut target = Command::new(KVXFER)
        .args(["target", "--size", "64KiB", "--name", "fill-target"])
        .env("KVXFER_BACKEND", "UCX")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn kvxfer target");
    let mut lines = BufReader::new(target.stdout.take().expect("stdout")).lines();
    let addr = loop {
        let line = lines.next().expect("target output").expect("line");
        if let Some(a) = line.strip_prefix("listening ") {
            break a.trim().to_string();
        }
    };
    let agent =
        Agent::new("fill-initiator", AgentConfig::default().with_backend("UCX")).expect("agent");
    let peer = agent.connect(&addr).expect("connect");
    let sum = |agent: &Agent| {
        agent
            .notify(&peer, format!("bench:sum {LEN}").as_bytes())
            .expect("notify");
        u64::from_str_radix(&reply(agent, &peer, "bench:sum "), 16).expect("hex checksum")
    };
    let before = sum(&agent);
    for seed in [7u64, 8] {
        agent
            .notify(&peer, format!("bench:fill {seed}").as_bytes())
            .expect("notify");
        assert_eq!(reply(&agent, &peer, "bench:fill "), "ok");
        let mut want = vec![0u8; LEN];
        fill_random(&mut want, seed);
        let after = sum(&agent);
        assert_eq!(after, checksum(&want), "seed {seed}");
        assert_ne!(after, before, "seed {seed}");
    }
    agent.notify(&peer, b"bench:fill seven").expect("notify");
    let deadline = Instant::now() + Duration::from_secs(10);
    let err = loop {
        let mut all = agent.take_notifications().expect("notifications");
        if let Some(m) = all.remove(&peer).and_then(|v| v.into_iter().next()) {
            break String::from_utf8_lossy(&m).into_owned();
        }
        assert!(Instant::now() < deadline, "no answer to a bad fill");
        std::thread::sleep(Duration::from_millis(1));
    };
    assert_eq!(err, "bench:error fill seed \"seven\" is not a number");
    agent.shutdown();
    drop(target.stdin.take());
    let _ = target.kill();
    let _ = target.wait();
}

/// CPU time (user + system, in clock ticks of 10 ms) of `pid`'s threads
/// whose name starts with `thread` (all threads for "").
fn cpu_ticks(pid: u32, thread: &str) -> u64 {
    let mut sum = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks") {
        let dir = task.expect("task").path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if !comm.trim().starts_with(thread) {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("stat")).unwrap_or_default();
        // Fields after the command name, which is in parentheses.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<u64> = rest
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        // utime and stime are fields 14 and 15 of stat: 12 and 13 here.
        sum += f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    }
    sum
}

/// Ticks `pid`'s threads named `thread` use over `secs` seconds.
fn idle_ticks(pid: u32, thread: &str, secs: u64) -> u64 {
    let before = cpu_ticks(pid, thread);
    std::thread::sleep(Duration::from_secs(secs));
    cpu_ticks(pid, thread) - before
}

/// An idle `kvxfer target` and an idle agent's progress thread sleep on
/// the backend's wake-up descriptor (UCX's event fd, libfabric's CQ wait
/// fd): under 1% of a core (3 ticks in 3 s), also with a peer loaded, on
/// the same-host and on the network path.
#[test]
fn idle_agents_use_almost_no_cpu() {
    for (backend, cma) in [
        ("UCX", "1"),
        ("UCX", "0"),
        ("LIBFABRIC", "1"),
        ("LIBFABRIC", "0"),
    ] {
        let mut target = Command::new(KVXFER)
            .args(["target", "--size", "1MiB", "--name", "idle-target"])
            .env("KVXFER_BACKEND", backend)
            .env("KVXFER_LIBFABRIC_PROVIDER", "tcp;ofi_rxm")
            .env("KVXFER_SAME_HOST_CMA", cma)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn kvxfer target");
        let mut lines = BufReader::new(target.stdout.take().expect("stdout")).lines();
        let addr = loop {
            let line = lines.next().expect("target output").expect("line");
            if let Some(a) = line.strip_prefix("listening ") {
                break a.trim().to_string();
            }
        };
        let pid = target.id();
        std::thread::sleep(Duration::from_millis(500));
        let alone = idle_ticks(pid, "", 3);
        let cfg = AgentConfig::default()
            .with_backend(backend)
            .with_provider("tcp;ofi_rxm")
            .with_same_host(cma == "1");
        let agent = Agent::new("idle-initiator", cfg).expect("agent");
        let peer = agent.connect(&addr).expect("connect");
        let path = agent.peer_path(&peer).expect("path");
        std::thread::sleep(Duration::from_millis(500));
        let me = std::process::id();
        let (with_peer, ours) = {
            let t0 = (cpu_ticks(pid, ""), cpu_ticks(me, "kvxfer-progress"));
            std::thread::sleep(Duration::from_secs(3));
            (
                cpu_ticks(pid, "") - t0.0,
                cpu_ticks(me, "kvxfer-progress") - t0.1,
            )
        };
        eprintln!(
            "RESULT idle {backend} ({path}): target {alone} ticks alone, {with_peer} with a peer; \
             initiator progress thread {ours} ticks, in 3 s"
        );
        assert!(alone <= 3, "idle {backend} target: {alone} ticks in 3 s");
        assert!(
            with_peer <= 3,
            "idle target with a peer ({path}): {with_peer} ticks"
        );
        assert!(
            ours <= 3,
            "idle agent's progress thread ({path}): {ours} ticks"
        );
        agent.shutdown();
        drop(target.stdin.take());
        let _ = target.kill();
        let _ = target.wait();
    }
}
