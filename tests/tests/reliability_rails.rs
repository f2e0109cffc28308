//! Rail failover: two network namespaces made by the test, joined by 2 or
//! 4 veth pairs (pair *i*: 10.216.*i*.1/24 and 10.216.*i*.2/24, the only
//! addresses used besides loopback), each shaped to 1 Gbit/s with `tc
//! tbf`. The target agent runs in one namespace, the initiator in the
//! other, both over libfabric `tcp;ofi_rxm` (or UCX `tcp`, the tests
//! named `_ucx_`) with one rail per pair (`KVXFER_RAILS`). The initiator streams rounds of a 64 MiB WRITE, a
//! WRITE of 128 × 16 KiB, a 64 MiB READ and a READ of 128 × 16 KiB,
//! alternating two data patterns, and compares every READ byte for byte.
//!
//! * `link_cut_rails_failover_{2,4}`, `link_cut_rails_ucx_failover_{2,4}`:
//!   the second pair's link is set down after a warm-up round and three
//!   measured ones, and up again three rounds later. Every transfer
//!   completes and compares; the cut rail carries nothing while down and
//!   is marked down (again after each failed probe) and carries its
//!   share of the bytes once back; the 64 MiB rounds slow down towards
//!   the survivors' rate (asserted loosely: below (N-1)/N + 0.25 of the
//!   rate before, since a loaded machine can be CPU-bound rather than
//!   link-bound) and speed up again once the rail is back up, the mean
//!   rate with the rail down against the fastest round before and after
//!   (a loaded machine holds single rounds back). Those two are asserted
//!   only where the fastest round before exceeded 95 % of what the
//!   surviving links carry (else the rounds were CPU-bound and a rail
//!   more or less changes nothing); the RESULT line says which.
//!   Over UCX the cut rail is marked down once (its reconnection is
//!   refused while its interface has no link), and the rail deadline is
//!   1 s (see `rails_test`).
//! * `link_cut_rails_all_down`, `link_cut_rails_ucx_all_down`: both links of two rails are set down in
//!   the middle of the stream: the transfers in flight fail with
//!   `peer rails-target: every rail failed (…)` naming each rail and
//!   its deadline, within 3 s.
//!
//! Needs root (network namespaces), like the link-cut test; `--skip
//! link_cut` leaves these out with it.
#![allow(clippy::result_large_err)]

mod reliability_common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kvxfer::{Agent, Desc, RailState, WaitOutcome, XferOp};
use reliability_common::{
    cmd, config, ip, is_root, pattern, Buf, Proc, Target, TargetSpec, ROLE, TAG,
};

const ENTRY: &str = "child_entry";
const LEN: usize = 64 << 20;
const SMALL: usize = 16 << 10;
const BLOCKS: usize = 128;
/// Distance between the small blocks in the target buffer.
const SPREAD: usize = LEN / BLOCKS;
const RATE: &str = "1gbit";
/// [`RATE`] in GB/s.
const LINK_GBPS: f64 = 0.125;

/// One test at a time: their bandwidth is compared.
static SERIAL: Mutex<()> = Mutex::new(());

#[test]
#[ignore = "child role of this file's tests; they spawn it"]
fn child_entry() {
    if !reliability_common::maybe_run_target() && std::env::var(ROLE).as_deref() == Ok("initiator")
    {
        initiator();
    }
}

/// Two namespaces joined by `n` shaped veth pairs; deleted on drop.
struct Net {
    ns: [String; 2],
    /// Interfaces by side, pair by pair.
    dev: [Vec<String>; 2],
}

static NEXT: AtomicU32 = AtomicU32::new(0);

impl Net {
    fn new(n: usize) -> Result<Net, String> {
        let id = format!(
            "{}{}",
            std::process::id() % 100_000,
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut net = Net {
            ns: [format!("kvxq{id}a"), format!("kvxq{id}b")],
            dev: [Vec::new(), Vec::new()],
        };
        for ns in &net.ns {
            ip(&["netns", "add", ns])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        for i in 1..=n {
            let (da, db) = (format!("kvq{id}a{i}"), format!("kvq{id}b{i}"));
            ip(&["link", "add", &da, "type", "veth", "peer", "name", &db])?;
            for (side, dev, host) in [(0, &da, 1), (1, &db, 2)] {
                let ns = &net.ns[side];
                ip(&["link", "set", dev, "netns", ns])?;
                ip(&[
                    "-n",
                    ns,
                    "addr",
                    "add",
                    &format!("10.216.{i}.{host}/24"),
                    "dev",
                    dev,
                ])?;
                ip(&["-n", ns, "link", "set", dev, "up"])?;
                cmd(
                    "tc",
                    &[
                        "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", RATE, "burst",
                        "256kb", "latency", "50ms",
                    ],
                )?;
            }
            net.dev[0].push(da);
            net.dev[1].push(db);
        }
        Ok(net)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in &self.ns {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

fn env(devs: &[String], backend: &str) -> Vec<(&'static str, String)> {
    vec![
        ("KVXFER_SAME_HOST_CMA", "0".to_string()),
        ("KVXFER_RAILS", devs.join(",")),
        ("KVXFER_REL_BACKEND", backend.to_string()),
        ("UCX_TLS", "tcp".to_string()),
    ]
}

/// The libfabric provider the rails use with `backend`, if any.
fn provider(backend: &str) -> Option<&'static str> {
    (backend == "LIBFABRIC").then_some("tcp;ofi_rxm")
}

fn rails_test(n: usize, mode: &str, backend: &str) {
    assert!(
        is_root(),
        "needs root to create network namespaces (run as root, or leave this test out with \
         --skip link_cut)"
    );
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let net = Net::new(n).unwrap_or_else(|e| panic!("cannot create network namespaces: {e}"));
    let mut tenv = env(&net.dev[0], backend);
    tenv.push(("KVXFER_REL_LISTEN", "10.216.1.1:0".to_string()));
    let target = Target::spawn(TargetSpec {
        entry: ENTRY,
        name: "rails-target",
        backend,
        provider: provider(backend),
        len: LEN,
        seed: 81,
        env: tenv,
        prefix: vec!["ip", "netns", "exec", &net.ns[0]],
    });
    let mut ienv = env(&net.dev[1], backend);
    ienv.extend([
        (ROLE, "initiator".to_string()),
        ("KVXFER_REL_TARGET", target.addr.clone()),
        ("KVXFER_REL_TARGET_BUF", target.buf.to_string()),
        ("KVXFER_REL_NS_A", net.ns[0].clone()),
        ("KVXFER_REL_DEVS_A", net.dev[0].join(",")),
        ("KVXFER_REL_MODE", mode.to_string()),
    ]);
    if mode == "all_down" {
        // The rails give up after up to 1.5 s without a completion; the
        // agent's keepalive (2 s by default) would otherwise race them
        // and fail the transfer as RemoteDisconnected first.
        ienv.push(("KVXFER_KEEPALIVE_MS", "5000".to_string()));
    }
    if mode == "failover" && backend == "UCX" {
        // UCX over tcp emulates RMA with messages the target must serve
        // from its progress thread: on a loaded machine a descheduled
        // target silences every rail at once for hundreds of ms, and the
        // default 500 ms rail deadline failed rails that were fine, and
        // the bandwidth comparisons measured those failovers instead of
        // the cut. The keepalive stays above three rail deadlines.
        ienv.push(("KVXFER_RAIL_TIMEOUT_MS", "1000".to_string()));
        ienv.push(("KVXFER_KEEPALIVE_MS", "4000".to_string()));
    }
    let mut ini = Proc::spawn(ENTRY, &ienv, &["ip", "netns", "exec", &net.ns[1]]);
    let status = ini.wait_exit(Duration::from_secs(150));
    let mut result = None;
    while let Some(l) = ini.line(Duration::from_millis(100)) {
        result = Some(l);
    }
    assert!(
        status.is_some_and(|s| s.success()),
        "initiator in {}: {status:?} (killed after 150 s if None)",
        net.ns[1]
    );
    let result = result.expect("initiator reported nothing");
    println!("RESULT link_cut_rails {backend} {mode} {n} rails: {result}");
    drop(target);
    drop(net);
}

/// The initiator's buffers and the target's.
struct Stream<'a> {
    agent: &'a Agent,
    src: [Buf; 2],
    small: [Buf; 2],
    dst: Buf,
    dst_small: Buf,
    target_buf: u64,
    round: usize,
}

impl Stream<'_> {
    fn remote(&self, off: usize, len: usize) -> Desc {
        Desc::new(self.target_buf + off as u64, len as u64)
    }

    fn small_remote(&self) -> Vec<Desc> {
        (0..BLOCKS)
            .map(|i| self.remote(i * SPREAD, SMALL))
            .collect()
    }

    fn small_local(b: &Buf) -> Vec<Desc> {
        (0..BLOCKS).map(|i| b.desc(i * SMALL, SMALL)).collect()
    }

    fn run(&self, op: XferOp, local: &[Desc], remote: &[Desc]) -> Result<(), kvxfer::Error> {
        let req = self.agent.submit(op, local, remote, "rails-target", None)?;
        match req.wait(Duration::from_secs(30)) {
            WaitOutcome::Done => Ok(()),
            WaitOutcome::Failed(e) => Err(e),
            WaitOutcome::InProgress => {
                panic!("round {}: {} unfinished after 30 s", self.round, op.name())
            }
        }
    }

    /// One round; returns the seconds the two 64 MiB transfers took.
    fn round(&mut self) -> Result<f64, kvxfer::Error> {
        let k = self.round % 2;
        let (src, small) = (&self.src[k], &self.small[k]);
        let mut big = Duration::ZERO;
        let t = Instant::now();
        self.run(XferOp::Write, &[src.desc(0, LEN)], &[self.remote(0, LEN)])?;
        big += t.elapsed();
        self.run(
            XferOp::Write,
            &Self::small_local(small),
            &self.small_remote(),
        )?;
        self.dst.fill(&vec![0; LEN]);
        let t = Instant::now();
        self.run(
            XferOp::Read,
            &[self.dst.desc(0, LEN)],
            &[self.remote(0, LEN)],
        )?;
        big += t.elapsed();
        self.dst_small.fill(&vec![0; BLOCKS * SMALL]);
        self.run(
            XferOp::Read,
            &Self::small_local(&self.dst_small),
            &self.small_remote(),
        )?;
        // Byte for byte: the big READ holds the big WRITE with the small
        // blocks written over it; the small READ holds the small blocks.
        let got = self.dst.snapshot();
        let (want, want_small) = (src.snapshot(), small.snapshot());
        for i in 0..BLOCKS {
            let at = i * SPREAD;
            assert!(
                got[at..at + SMALL] == want_small[i * SMALL..(i + 1) * SMALL],
                "round {}: block {i} of the 64 MiB READ differs",
                self.round
            );
            let end = ((i + 1) * SPREAD).min(LEN);
            assert!(
                got[at + SMALL..end] == want[at + SMALL..end],
                "round {}: bytes {}..{end} of the 64 MiB READ differ",
                self.round,
                at + SMALL
            );
        }
        assert!(
            self.dst_small.snapshot() == want_small,
            "round {}: the 128 x 16 KiB READ differs",
            self.round
        );
        self.round += 1;
        Ok(big.as_secs_f64())
    }
}

fn gbps(secs: &[f64]) -> f64 {
    (2 * LEN * secs.len()) as f64 / secs.iter().sum::<f64>() / 1e9
}

/// The rate of the fastest round: what the rails carried where nothing
/// else on the machine held the rounds back.
fn best_gbps(secs: &[f64]) -> f64 {
    (2 * LEN) as f64 / secs.iter().copied().fold(f64::INFINITY, f64::min) / 1e9
}

fn rail_line(agent: &Agent) -> String {
    agent
        .rail_stats()
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
        .collect::<Vec<_>>()
        .join(", ")
}

/// The initiator role, in the second namespace.
fn initiator() {
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} unset"));
    let mode = var("KVXFER_REL_MODE");
    let ns_a = var("KVXFER_REL_NS_A");
    let devs_a: Vec<String> = var("KVXFER_REL_DEVS_A")
        .split(',')
        .map(str::to_owned)
        .collect();
    let backend = var("KVXFER_REL_BACKEND");
    let agent = Agent::new("rails-ini", config(&backend, provider(&backend))).expect("agent");
    let n = agent.rail_stats().len();
    assert_eq!(n, devs_a.len(), "rails of the initiator");
    let mut s = Stream {
        agent: &agent,
        src: [
            Buf::from_vec(pattern(82, LEN)),
            Buf::from_vec(pattern(83, LEN)),
        ],
        small: [
            Buf::from_vec(pattern(84, BLOCKS * SMALL)),
            Buf::from_vec(pattern(85, BLOCKS * SMALL)),
        ],
        dst: Buf::zeroed(LEN),
        dst_small: Buf::zeroed(BLOCKS * SMALL),
        target_buf: var("KVXFER_REL_TARGET_BUF").parse().unwrap(),
        round: 0,
    };
    for b in s.src.iter().chain(&s.small).chain([&s.dst, &s.dst_small]) {
        b.register(&agent);
    }
    assert_eq!(
        agent.connect(&var("KVXFER_REL_TARGET")).unwrap(),
        "rails-target"
    );
    let link = |dev: &str, state: &str| {
        ip(&["-n", &ns_a, "link", "set", "dev", dev, state]).expect("ip link set");
    };
    if mode == "failover" {
        // Not measured: the first round also opens the rails' connections
        // (UCX wires each up on first use) and touches the pages first.
        s.round().expect("warm-up round");
    }
    let before: Vec<f64> = (0..3)
        .map(|_| s.round().expect("round before the cut"))
        .collect();
    if mode == "all_down" {
        // Cut every link while a 64 MiB WRITE is in flight.
        let req = agent
            .submit(
                XferOp::Write,
                &[s.src[0].desc(0, LEN)],
                &[s.remote(0, LEN)],
                "rails-target",
                None,
            )
            .expect("post before the cut");
        for d in &devs_a {
            link(d, "down");
        }
        let cut = Instant::now();
        let e = match req.wait(Duration::from_secs(10)) {
            WaitOutcome::Failed(e) => e,
            other => panic!("WRITE with every link down: {other:?}"),
        };
        let failed_after = cut.elapsed();
        // Each rail fails after 500 ms without a completion while the
        // other still completed something, else after 1500 ms (before the
        // agent's keepalive, 2 s, gives the peer up).
        let devs_b = var("KVXFER_RAILS");
        let devs_b: Vec<&str> = devs_b.split(',').collect();
        let text = e.to_string();
        let want = |ms: [u32; 2]| {
            format!(
                "peer rails-target: every rail failed ({}: silent for {} ms, {}: silent for {} \
                 ms)",
                devs_b[0], ms[0], devs_b[1], ms[1]
            )
        };
        let choices = [[500, 1500], [1500, 500], [1500, 1500], [500, 500]];
        assert!(
            choices.iter().any(|&c| text == want(c)),
            "{text:?} is not one of {:?}",
            choices.map(want)
        );
        assert!(
            failed_after < Duration::from_secs(3),
            "failed {failed_after:?} after the cut"
        );
        let want = text.clone();
        // A post now is refused with the same error while no rail works.
        let refused = agent
            .submit(
                XferOp::Read,
                &[s.dst.desc(0, SMALL)],
                &[s.remote(0, SMALL)],
                "rails-target",
                None,
            )
            .map(|_| ())
            .expect_err("post with every rail down");
        assert_eq!(refused.to_string(), want);
        for d in &devs_a {
            link(d, "up");
        }
        println!(
            "{TAG}before {:.3} GB/s; every link down: failed after {failed_after:?} with \
             {e:?}; rails: {}",
            gbps(&before),
            rail_line(&agent)
        );
        agent.shutdown();
        return;
    }
    // Cut the second pair with the stream running.
    let cut_rail = 1;
    let bytes_at_cut = agent.rail_stats()[cut_rail].bytes;
    link(&devs_a[cut_rail], "down");
    let first = s.round().expect("round across the cut");
    let during: Vec<f64> = (0..3)
        .map(|_| s.round().expect("round, link down"))
        .collect();
    let stats = agent.rail_stats();
    let moved_while_down = stats[cut_rail].bytes - bytes_at_cut;
    // Down, and each probe after a back-off failed again.
    assert!(stats[cut_rail].failures >= 1, "{}", rail_line(&agent));
    assert_ne!(
        stats[cut_rail].state,
        RailState::Up,
        "{}",
        rail_line(&agent)
    );
    let probes_failed = stats[cut_rail].failures;
    link(&devs_a[cut_rail], "up");
    let up = Instant::now();
    let mut between = 0;
    while agent.rail_stats()[cut_rail].state != RailState::Up {
        assert!(
            up.elapsed() < Duration::from_secs(20),
            "rail not back within 20 s: {}",
            rail_line(&agent)
        );
        s.round().expect("round, link up again");
        between += 1;
    }
    let recovered = up.elapsed();
    let bytes_back = agent.rail_stats()[cut_rail].bytes;
    let after: Vec<f64> = (0..3)
        .map(|_| s.round().expect("round after recovery"))
        .collect();
    let stats = agent.rail_stats();
    assert!(
        stats.iter().all(|r| r.state == RailState::Up),
        "{}",
        rail_line(&agent)
    );
    let share =
        (stats[cut_rail].bytes - bytes_back) as f64 / (3 * 2 * (LEN + BLOCKS * SMALL)) as f64;
    let (b, d, a) = (gbps(&before), gbps(&during), gbps(&after));
    // Against the mean rate with the rail down, the fastest round before
    // the cut and after the rail came back: a loaded machine holds single
    // rounds back (at load 15-20 a four-rail round now and then ran at
    // half the links' rate). A rail's loss shows in the rate only where
    // the rounds before needed more than the surviving links carry; below
    // that they were bound by the CPU (seen with UCX's emulated RMA over
    // four rails, 0.30 GB/s of 0.50), and a rail more or less changes
    // nothing.
    let (b_best, a_best) = (best_gbps(&before), best_gbps(&after));
    let survivors = (n - 1) as f64 * LINK_GBPS;
    let link_bound = b_best > 0.95 * survivors;
    println!(
        "{TAG}64 MiB WRITE+READ: {b:.3} GB/s before, {d:.3} with rail {} down \
         (round across the cut {first:.2} s), {a:.3} after (fastest round {b_best:.3} before, \
         {a_best:.3} after); marked down {probes_failed} times (back-off probes included); rail back {recovered:?} \
         after link up ({between} rounds); cut rail moved {} bytes while down, {:.0}% of the last rounds' \
         bytes after; {}; rails: {}",
        devs_a[cut_rail],
        moved_while_down,
        share * 100.0,
        if link_bound {
            "link-bound: drop and recovery asserted".to_string()
        } else {
            format!(
                "CPU-bound (before not above the {survivors:.3} GB/s the surviving links \
                 carry): drop and recovery not asserted"
            )
        },
        rail_line(&agent)
    );
    // While a 4 KiB-aligned part may have completed just as the link went
    // down, nothing more moves on the cut rail until it is back.
    assert!(
        moved_while_down <= 16 << 20,
        "cut rail moved {moved_while_down} bytes while down"
    );
    if link_bound {
        assert!(
            d < b_best * ((n - 1) as f64 / n as f64 + 0.25),
            "bandwidth with one of {n} rails down {d:.3} GB/s, before {b:.3} (fastest round \
             {b_best:.3})"
        );
        assert!(
            a_best > d * 1.05,
            "bandwidth after the rail came back {a:.3} GB/s (fastest round {a_best:.3}), while \
             down {d:.3}"
        );
    }
    assert!(
        share > 0.5 / n as f64,
        "the recovered rail carried {:.0}% of the bytes after recovery",
        share * 100.0
    );
    agent.shutdown();
}

#[test]
fn link_cut_rails_failover_2() {
    rails_test(2, "failover", "LIBFABRIC");
}

#[test]
fn link_cut_rails_failover_4() {
    rails_test(4, "failover", "LIBFABRIC");
}

#[test]
fn link_cut_rails_all_down() {
    rails_test(2, "all_down", "LIBFABRIC");
}

#[test]
fn link_cut_rails_ucx_all_down() {
    rails_test(2, "all_down", "UCX");
}

#[test]
fn link_cut_rails_ucx_failover_2() {
    rails_test(2, "failover", "UCX");
}

#[test]
fn link_cut_rails_ucx_failover_4() {
    rails_test(4, "failover", "UCX");
}
