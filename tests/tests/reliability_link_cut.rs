//! Link cut: two network namespaces made by the test, joined by a veth
//! pair (10.213.0.1/30 and 10.213.0.2/30, the only addresses used besides
//! loopback). The target agent runs in one namespace, the initiator in the
//! other; over `UCX_TLS=tcp` and over libfabric's `tcp;ofi_rxm`, the link
//! is taken down during a stream of WRITEs and brought up again. With the
//! link down, the agent's keepalive finds the peer silent: every transfer
//! in flight or posted after the cut ends within the keepalive timeout
//! (2 s) plus slack, with `RemoteDisconnected` naming the peer, and a later
//! post is refused at once; nothing stays in flight and nothing hangs. With
//! the link up, the peer is reloaded and new transfers succeed, compared
//! byte for byte.
//!
//! `link_cut_late_bytes_*`: late bytes of an abandoned WRITE. Each
//! namespace is joined by a veth pair to a bridge in a third one, the
//! initiator's end shaped to 400 Mbit/s with `tc tbf`; the cut sets the
//! bridge down, so that both hosts keep their link and TCP backs off as
//! over a failed switch (with a host's own link set down, as above, the
//! queued bytes went out within 0.1 s of its return, before any reload).
//! A 64 MiB WRITE of pattern A is cut while being sent (asserted: it
//! fails with `RemoteDisconnected` and its connection still has bytes to
//! send); 4 s after the cut the bridge comes up, the peer is reloaded
//! and a 64 MiB WRITE of pattern B over the same bytes completes; once
//! the old connection has nothing left to send and the target's end
//! nothing left to read, the range read back must equal B byte for byte
//! (every differing range is reported with the pattern it equals). The
//! RESULT lines give the old connection's states and queues over time.
//!
//! Needs root (network namespaces); without it the tests fail saying so
//! (`--skip link_cut` leaves them out, as `scripts/test.sh` does, saying
//! so, where `ip netns exec` cannot work).
#![allow(clippy::result_large_err)]

mod reliability_common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use kvxfer::{Agent, WaitOutcome, XferOp, XferRequest, XferState};
use reliability_common::{
    cmd, config, ip, is_root, pattern, read_all, run, Buf, Proc, Target, TargetSpec, ROLE, TAG,
};

const ENTRY: &str = "child_entry";
const LEN: usize = 4 << 20;
const CHUNK: usize = 256 << 10;
const IP_A: &str = "10.213.0.1";
const IP_B: &str = "10.213.0.2";
/// How long a peer may stay silent before the agent's keepalive fails its
/// transfers (`AgentConfig::keepalive`'s default, which the test keeps).
const KEEPALIVE: Duration = Duration::from_secs(2);
/// How much later than the keepalive timeout after the cut a failure may
/// be reported (the last completion came just before the cut; checks run
/// every eighth of the timeout; a loaded machine).
const SLACK: Duration = Duration::from_millis(700);

#[test]
#[ignore = "child role of this file's tests; they spawn it"]
fn child_entry() {
    if reliability_common::maybe_run_target() {
        return;
    }
    match std::env::var(ROLE).as_deref() {
        Ok("initiator") => initiator(),
        Ok("late-initiator") => late_initiator(),
        _ => {}
    }
}

/// Two namespaces joined by a veth pair, or (`bridged`) each joined by
/// a veth pair to a bridge in a third namespace, the link between them
/// that switch; deleted on drop (which removes the devices inside them).
struct Net {
    ns: [String; 2],
    dev: [String; 2],
    /// The bridge's namespace and name, when bridged.
    mid: Option<(String, String)>,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

impl Net {
    fn new(bridged: bool) -> Result<Net, String> {
        let id = format!(
            "{}{}",
            std::process::id() % 1_000_000,
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut net = Net {
            ns: [format!("kvxr{id}a"), format!("kvxr{id}b")],
            dev: [format!("kvr{id}a"), format!("kvr{id}b")],
            mid: None,
        };
        for ns in &net.ns {
            ip(&["netns", "add", ns])?;
        }
        let [na, nb] = &net.ns;
        let [da, db] = &net.dev;
        if bridged {
            let (nm, br) = (format!("kvxr{id}m"), format!("kvr{id}br"));
            ip(&["netns", "add", &nm])?;
            net.mid = Some((nm.clone(), br.clone()));
            ip(&["-n", &nm, "link", "add", &br, "type", "bridge"])?;
            for (ns, dev, port) in [
                (na, da, format!("kvr{id}ma")),
                (nb, db, format!("kvr{id}mb")),
            ] {
                ip(&[
                    "link", "add", dev, "netns", ns, "type", "veth", "peer", "name", &port,
                    "netns", &nm,
                ])?;
                ip(&["-n", &nm, "link", "set", &port, "master", &br])?;
                ip(&["-n", &nm, "link", "set", &port, "up"])?;
            }
            ip(&["-n", &nm, "link", "set", &br, "up"])?;
        } else {
            ip(&["link", "add", da, "type", "veth", "peer", "name", db]).inspect_err(|_| {
                let _ = ip(&["link", "del", da]);
            })?;
            ip(&["link", "set", da, "netns", na]).inspect_err(|_| {
                let _ = ip(&["link", "del", da]);
            })?;
            ip(&["link", "set", db, "netns", nb])?;
        }
        for (ns, dev, addr) in [(na, da, IP_A), (nb, db, IP_B)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/30"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(net)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in self.ns.iter().chain(self.mid.as_ref().map(|m| &m.0)) {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

/// The network path only: the two namespaces share the host, whose
/// cross-memory attach a cut link would not stop.
fn transport_env(dev: &str) -> Vec<(&'static str, String)> {
    vec![
        ("KVXFER_SAME_HOST_CMA", "0".to_string()),
        ("UCX_TLS", "tcp".to_string()),
        ("UCX_NET_DEVICES", dev.to_string()),
        ("FI_TCP_IFACE", dev.to_string()),
    ]
}

/// What a test runs: the target's buffer and the initiator's role.
struct Case {
    /// The initiator's role (`KVXFER_REL_ROLE`).
    role: &'static str,
    /// Name of the target agent.
    target: &'static str,
    /// Length of the target's buffer.
    len: usize,
    /// Seed of its initial contents.
    seed: u64,
    /// Whether the link goes through a bridge (see [`Net`]).
    bridged: bool,
    /// `tc tbf` rate of the initiator's end of the link (`None`: unshaped).
    rate: Option<&'static str>,
    /// Test name in the RESULT line.
    what: &'static str,
}

/// Runs `case` over `backend`: the target in the first namespace, the
/// initiator in the second; the initiator's exit status must be success.
fn run_case(case: Case, backend: &str, provider: Option<&str>) {
    assert!(
        is_root(),
        "needs root to create network namespaces (run as root, or leave this test out with \
         --skip link_cut)"
    );
    let net =
        Net::new(case.bridged).unwrap_or_else(|e| panic!("cannot create network namespaces: {e}"));
    if let Some(rate) = case.rate {
        cmd(
            "tc",
            &[
                "-n",
                &net.ns[1],
                "qdisc",
                "add",
                "dev",
                &net.dev[1],
                "root",
                "tbf",
                "rate",
                rate,
                "burst",
                "256kb",
                "latency",
                "50ms",
            ],
        )
        .unwrap_or_else(|e| panic!("cannot shape the link: {e}"));
    }
    let mut env = transport_env(&net.dev[0]);
    env.push(("KVXFER_REL_LISTEN", format!("{IP_A}:0")));
    let target = Target::spawn(TargetSpec {
        entry: ENTRY,
        name: case.target,
        backend,
        provider,
        len: case.len,
        seed: case.seed,
        env,
        prefix: vec!["ip", "netns", "exec", &net.ns[0]],
    });
    let mut env = transport_env(&net.dev[1]);
    env.extend([
        (ROLE, case.role.to_string()),
        ("KVXFER_REL_BACKEND", backend.to_string()),
        ("KVXFER_REL_TARGET", target.addr.clone()),
        ("KVXFER_REL_TARGET_BUF", target.buf.to_string()),
        ("KVXFER_REL_NS_A", net.ns[0].clone()),
        ("KVXFER_REL_DEV_A", net.dev[0].clone()),
    ]);
    if let Some((ns, br)) = &net.mid {
        env.extend([
            ("KVXFER_REL_CUT_NS", ns.clone()),
            ("KVXFER_REL_CUT_DEV", br.clone()),
        ]);
    }
    if let Some(p) = provider {
        env.push(("KVXFER_REL_PROVIDER", p.to_string()));
    }
    let mut ini = Proc::spawn(ENTRY, &env, &["ip", "netns", "exec", &net.ns[1]]);
    let status = ini.wait_exit(Duration::from_secs(90));
    let mut lines = Vec::new();
    while let Some(l) = ini.line(Duration::from_millis(100)) {
        lines.push(l);
    }
    for l in &lines {
        println!(
            "RESULT {} {backend}{}: {l}",
            case.what,
            provider.map(|p| format!(" ({p})")).unwrap_or_default(),
        );
    }
    assert!(
        status.is_some_and(|s| s.success()),
        "initiator in {}: {status:?} (killed after 90 s if None; its panic is above)",
        net.ns[1]
    );
    assert!(!lines.is_empty(), "initiator reported nothing");
    drop(target);
    drop(net);
}

fn link_cut(backend: &str, provider: Option<&str>) {
    let case = Case {
        role: "initiator",
        target: "cut-target",
        len: LEN,
        seed: 61,
        bridged: false,
        rate: None,
        what: "link_cut",
    };
    run_case(case, backend, provider);
}

/// The initiator role, in the second namespace.
fn initiator() {
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} unset"));
    let backend = var("KVXFER_REL_BACKEND");
    let provider = std::env::var("KVXFER_REL_PROVIDER").ok();
    let target = Target {
        proc: Proc::spawn("none-such-test", &[], &["true"]),
        addr: var("KVXFER_REL_TARGET"),
        buf: var("KVXFER_REL_TARGET_BUF").parse().unwrap(),
        len: LEN,
        seed: 61,
    };
    let (ns_a, dev_a) = (var("KVXFER_REL_NS_A"), var("KVXFER_REL_DEV_A"));
    let deadline = KEEPALIVE;
    let bound = deadline + SLACK;
    let agent = Agent::new("cut-ini", config(&backend, provider.as_deref())).expect("agent");
    let src = Buf::from_vec(pattern(62, LEN));
    let dst = Buf::zeroed(LEN);
    src.register(&agent);
    dst.register(&agent);
    assert_eq!(agent.connect(&target.addr).unwrap(), "cut-target");
    assert!(read_all(&agent, &dst, &target, "cut-target") == pattern(61, LEN));

    let post = |n: usize| -> Result<XferRequest, kvxfer::Error> {
        let off = (n % (LEN / CHUNK)) * CHUNK;
        agent.submit(
            XferOp::Write,
            &[src.desc(off, CHUNK)],
            &[target.desc(off, CHUNK)],
            "cut-target",
            None,
        )
    };
    // Stream until 32 WRITEs are done, 4 in flight.
    let mut flights: Vec<XferRequest> = Vec::new();
    let (mut n, mut done) = (0usize, 0usize);
    let t0 = Instant::now();
    while done < 32 {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "stream before the cut stalled"
        );
        while flights.len() < 4 {
            flights.push(post(n).expect("post before the cut"));
            n += 1;
        }
        flights.retain(|r| match r.status().unwrap() {
            XferState::Done => {
                done += 1;
                false
            }
            XferState::Failed(e) => panic!("failure before the cut: {e}"),
            _ => true,
        });
    }
    // Cut the link with transfers in flight, then post four more.
    while flights.len() < 4 {
        flights.push(post(n).expect("post before the cut"));
        n += 1;
    }
    ip(&["-n", &ns_a, "link", "set", "dev", &dev_a, "down"]).expect("link down");
    let cut = Instant::now();
    let in_flight_at_cut = flights.len();
    let mut refused = Vec::new();
    for _ in 0..4 {
        match post(n) {
            Ok(r) => flights.push(r),
            Err(e) => refused.push(e.to_string()),
        }
        n += 1;
    }
    // Every transfer ends within the keepalive timeout (+ slack) after the
    // cut: done if it was delivered before, else failed with
    // RemoteDisconnected naming the peer (the per-transfer deadline, 5 s,
    // comes later); no call blocks past the bound.
    let (mut failed, mut ok) = (Vec::new(), 0);
    let mut unfinished = 0;
    let mut last_end = Duration::ZERO;
    for r in flights.drain(..) {
        let left = bound.saturating_sub(cut.elapsed());
        match r.wait(left) {
            WaitOutcome::Done => ok += 1,
            WaitOutcome::Failed(e) => {
                last_end = last_end.max(cut.elapsed());
                assert_eq!(
                    e,
                    kvxfer::Error::RemoteDisconnected {
                        peer: "cut-target".try_into().unwrap()
                    },
                    "{backend}: unexpected failure after the cut"
                );
                failed.push(format!("{e}"));
            }
            WaitOutcome::InProgress => unfinished += 1,
        }
    }
    let waited = cut.elapsed();
    assert!(
        waited < bound + Duration::from_secs(1),
        "waiting took {waited:?}"
    );
    assert_eq!(
        unfinished, 0,
        "{backend}: {unfinished} transfers unfinished {bound:?} after the cut \
         (deadline {deadline:?}); failed so far: {failed:?}"
    );
    let n_failed = failed.len();
    assert!(
        n_failed + refused.len() > 0,
        "no transfer failed with the link down"
    );
    assert!(
        last_end <= bound,
        "last failure {last_end:?} after the cut, deadline {deadline:?}"
    );
    // A post now is refused at once: the peer is given up on until it is
    // loaded again.
    let at = Instant::now();
    match post(n) {
        Err(e) => {
            assert!(
                matches!(e, kvxfer::Error::RemoteDisconnected { .. }),
                "{backend}: a post after the keepalive failed the peer: {e:?}"
            );
            refused.push(e.to_string())
        }
        Ok(_) => panic!("{backend}: accepted a post to a peer the keepalive failed"),
    }
    let late_post = at.elapsed();
    assert!(
        late_post <= Duration::from_millis(50),
        "post with the link down: {late_post:?}"
    );
    // Bring the link up, reload the peer, and transfer again.
    ip(&["-n", &ns_a, "link", "set", "dev", &dev_a, "up"]).expect("link up");
    let up = Instant::now();
    let recovered = loop {
        assert!(
            up.elapsed() < Duration::from_secs(20),
            "no recovery within 20 s"
        );
        if agent.connect(&target.addr).is_err() {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        match run(
            &agent,
            XferOp::Write,
            &[src.desc(0, LEN)],
            &[target.desc(0, LEN)],
            "cut-target",
            Duration::from_secs(5),
        ) {
            Ok(_) => break up.elapsed(),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    dst.fill(&vec![0; LEN]);
    assert!(read_all(&agent, &dst, &target, "cut-target") == pattern(62, LEN));
    failed.sort();
    failed.dedup();
    println!(
        "{TAG}keepalive {deadline:?}: {in_flight_at_cut} in flight at the cut + 4 posted after: \
         {ok} done, {n_failed} failed (last {last_end:?} after the cut: {failed:?}), {} refused \
         at post {refused:?}; a post {:?} after the cut ended in {late_post:?}; \
         recovered {recovered:?} after link up",
        refused.len(),
        at.duration_since(cut),
    );
    agent.shutdown();
}

/// Length of the late-bytes tests' WRITEs, each over the whole target
/// buffer.
const LATE_LEN: usize = 64 << 20;
/// Seeds of the late-bytes target's initial contents, of the WRITE cut
/// (A) and of the WRITE after the reload (B).
const SEED_INIT: u64 = 71;
const SEED_A: u64 = 72;
const SEED_B: u64 = 73;
/// Rate of the initiator's end of the link in the late-bytes tests: the
/// 64 MiB WRITE takes 1.3 s, so most of it is still to send at the cut.
const LATE_RATE: &str = "400mbit";
/// How long after posting WRITE A the link is cut.
const LATE_CUT_AFTER: Duration = Duration::from_millis(250);
/// How long the link stays down: past the keepalive's failure, and long
/// enough that TCP's retransmission back-off outlasts the reload and
/// WRITE B (measured over UCX: the old connection's bytes went out
/// 6.4–6.9 s after the cut, WRITE B was done 6.4–6.6 s after it; with 8 s
/// down, at 13.1–16.6 s and 10.4–10.6 s).
const LATE_DOWN: Duration = Duration::from_secs(4);
/// Longest wait after link up for the old connections to be drained.
const LATE_DRAIN: Duration = Duration::from_secs(60);

/// One TCP connection as `ss -tn` lists it.
#[derive(Clone, Debug)]
struct Conn {
    state: String,
    recv_q: u64,
    send_q: u64,
    local: String,
    peer: String,
}

/// The TCP connections of this network namespace, or of namespace `ns`.
fn tcp_conns(ns: Option<&str>) -> Vec<Conn> {
    let mut c = match ns {
        Some(ns) => {
            let mut c = std::process::Command::new("ip");
            c.args(["netns", "exec", ns, "ss"]);
            c
        }
        None => std::process::Command::new("ss"),
    };
    let out = c.args(["-tnH"]).output().expect("run ss");
    assert!(out.status.success(), "ss: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 5).then(|| Conn {
                state: f[0].to_string(),
                recv_q: f[1].parse().expect("Recv-Q"),
                send_q: f[2].parse().expect("Send-Q"),
                local: f[3].to_string(),
                peer: f[4].to_string(),
            })
        })
        .collect()
}

/// TCP resets sent and received so far in this network namespace, or in
/// namespace `ns` (`nstat`'s `TcpOutRsts`, `TcpEstabResets`).
fn resets(ns: Option<&str>) -> String {
    let mut c = match ns {
        Some(ns) => {
            let mut c = std::process::Command::new("ip");
            c.args(["netns", "exec", ns, "nstat"]);
            c
        }
        None => std::process::Command::new("nstat"),
    };
    let out = c
        .args(["-asz", "TcpOutRsts", "TcpEstabResets"])
        .output()
        .expect("run nstat");
    assert!(out.status.success(), "nstat: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let count = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .unwrap_or("?")
            .to_string()
    };
    format!(
        "{} resets sent, {} established connections reset",
        count("TcpOutRsts "),
        count("TcpEstabResets ")
    )
}

/// The maximal ranges `(offset, length, name)` where `got` differs from
/// `want`, each named after the pattern of `others` that it equals over
/// the whole range (a range matching none is named "none").
fn diff_ranges(
    got: &[u8],
    want: &[u8],
    others: &[(&'static str, &[u8])],
) -> Vec<(usize, usize, &'static str)> {
    const BLOCK: usize = 4096;
    let n = got.len();
    assert_eq!(want.len(), n);
    let mut out: Vec<(usize, usize, &'static str)> = Vec::new();
    let mut i = 0;
    while i < n {
        if got[i] == want[i] {
            // Whole equal blocks are skipped with one comparison.
            let end = ((i / BLOCK + 1) * BLOCK).min(n);
            i = if got[i..end] == want[i..end] {
                end
            } else {
                i + 1
            };
            continue;
        }
        let floor = out.last().map_or(0, |r| r.0 + r.1);
        match others.iter().find(|(_, p)| p[i] == got[i]) {
            Some(&(name, p)) => {
                // Bytes where the pattern equals `want` by chance belong
                // to the range too.
                let mut s = i;
                while s > floor && got[s - 1] == p[s - 1] {
                    s -= 1;
                }
                let mut e = i;
                while e < n && got[e] == p[e] {
                    e += 1;
                }
                out.push((s, e - s, name));
                i = e;
            }
            None => {
                let mut e = i;
                while e < n && got[e] != want[e] && others.iter().all(|(_, p)| p[e] != got[e]) {
                    e += 1;
                }
                out.push((i, e - i, "none"));
                i = e;
            }
        }
    }
    out
}

/// The late-bytes initiator, in the second namespace: a 64 MiB WRITE of
/// pattern A is cut on the wire (the link shaped so that most of it is
/// still queued), fails by the keepalive, and its connections keep
/// unsent bytes in the kernel (asserted: more than zero). After link up
/// the peer is reloaded and a WRITE of pattern B over the same bytes
/// completes; once the old connections have nothing left to send and the
/// target's ends nothing left to read, the whole range is read back and
/// must equal B byte for byte (every differing range is reported, named
/// after the pattern it equals).
fn late_initiator() {
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} unset"));
    let backend = var("KVXFER_REL_BACKEND");
    let provider = std::env::var("KVXFER_REL_PROVIDER").ok();
    let peer = "late-target";
    let target = Target {
        proc: Proc::spawn("none-such-test", &[], &["true"]),
        addr: var("KVXFER_REL_TARGET"),
        buf: var("KVXFER_REL_TARGET_BUF").parse().unwrap(),
        len: LATE_LEN,
        seed: SEED_INIT,
    };
    let ns_a = var("KVXFER_REL_NS_A");
    let (ns_cut, dev_cut) = (var("KVXFER_REL_CUT_NS"), var("KVXFER_REL_CUT_DEV"));
    let agent = Agent::new("late-ini", config(&backend, provider.as_deref())).expect("agent");
    let (a, b) = (pattern(SEED_A, LATE_LEN), pattern(SEED_B, LATE_LEN));
    let src_a = Buf::from_vec(a.clone());
    let src_b = Buf::from_vec(b.clone());
    let dst = Buf::zeroed(LATE_LEN);
    for buf in [&src_a, &src_b, &dst] {
        buf.register(&agent);
    }
    assert_eq!(agent.connect(&target.addr).unwrap(), peer);
    let whole = [target.desc(0, LATE_LEN)];

    // WRITE A, and the link cut while it is being sent.
    let wa = agent
        .submit(
            XferOp::Write,
            &[src_a.desc(0, LATE_LEN)],
            &whole,
            peer,
            None,
        )
        .expect("post WRITE A");
    std::thread::sleep(LATE_CUT_AFTER);
    ip(&["-n", &ns_cut, "link", "set", "dev", &dev_cut, "down"]).expect("link down");
    let cut = Instant::now();
    match wa.wait(KEEPALIVE + SLACK) {
        WaitOutcome::Failed(e) => assert_eq!(
            e,
            kvxfer::Error::RemoteDisconnected {
                peer: peer.try_into().unwrap()
            },
            "{backend}: WRITE A"
        ),
        other => panic!(
            "{backend}: WRITE A {other:?} {:?} after the cut (the link's rate lets it finish \
             before the cut, or the keepalive did not fail it)",
            cut.elapsed()
        ),
    }
    let failed_after = cut.elapsed();
    drop(wa);
    // The connections to the target and what they still have to send.
    let old: Vec<Conn> = tcp_conns(None)
        .into_iter()
        .filter(|c| c.peer.starts_with(&format!("{IP_A}:")))
        .collect();
    let queued: u64 = old.iter().map(|c| c.send_q).sum();
    assert!(
        queued > 0,
        "{backend}: nothing queued to the target after WRITE A failed: {old:?}"
    );

    let is_old = |c: &Conn| old.iter().any(|o| o.local == c.local && o.peer == c.peer);
    let is_old_at_target = |c: &Conn| old.iter().any(|o| o.local == c.peer && o.peer == c.local);
    // What the old connections hold, on both sides, whenever it changes.
    let view = || {
        let ini: Vec<String> = tcp_conns(None)
            .iter()
            .filter(|c| is_old(c))
            .map(|c| format!("{} send {}", c.state, c.send_q))
            .collect();
        let tgt: Vec<String> = tcp_conns(Some(&ns_a))
            .iter()
            .filter(|c| is_old_at_target(c))
            .map(|c| format!("{} recv {}", c.state, c.recv_q))
            .collect();
        format!(
            "initiator {ini:?} ({}), target {tgt:?} ({})",
            resets(None),
            resets(Some(&ns_a))
        )
    };
    let mut timeline: Vec<String> = Vec::new();
    let mut last = String::new();
    let mut note = |base: Instant, tag: &str, timeline: &mut Vec<String>| {
        let v = view();
        if v != last {
            timeline.push(format!("{tag}{:.2?}: {v}", base.elapsed()));
            last = v;
        }
    };
    // Link up after LATE_DOWN; reload the peer and WRITE B over the range.
    while cut.elapsed() < LATE_DOWN {
        note(cut, "cut+", &mut timeline);
        std::thread::sleep(Duration::from_millis(50));
    }
    ip(&["-n", &ns_cut, "link", "set", "dev", &dev_cut, "up"]).expect("link up");
    let up = Instant::now();
    let mut attempts = 0;
    let b_done = loop {
        note(up, "up+", &mut timeline);
        assert!(
            up.elapsed() < Duration::from_secs(30),
            "{backend}: WRITE B not done within 30 s of link up ({attempts} attempts)"
        );
        if agent.connect(&target.addr).is_err() {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        attempts += 1;
        let Ok(wb) = agent.submit(
            XferOp::Write,
            &[src_b.desc(0, LATE_LEN)],
            &whole,
            peer,
            None,
        ) else {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        // Polled, so that the old connections are watched meanwhile.
        let done = loop {
            note(up, "up+", &mut timeline);
            match wb.wait(Duration::from_millis(20)) {
                WaitOutcome::Done => break true,
                WaitOutcome::Failed(_) => break false,
                WaitOutcome::InProgress => {}
            }
        };
        if done {
            break up.elapsed();
        }
        std::thread::sleep(Duration::from_millis(100));
    };

    // Wait until the old connections have nothing left to send (delivered
    // or gone) and the target's ends of them nothing left to read.
    let mut drained = None;
    let (mut to_send, mut to_read);
    loop {
        to_send = tcp_conns(None)
            .iter()
            .filter(|c| is_old(c))
            .map(|c| c.send_q)
            .sum::<u64>();
        to_read = tcp_conns(Some(&ns_a))
            .iter()
            .filter(|c| is_old_at_target(c))
            .map(|c| c.recv_q)
            .sum::<u64>();
        note(up, "up+", &mut timeline);
        if to_send == 0 && to_read == 0 {
            drained = Some(up.elapsed());
            break;
        }
        if up.elapsed() > LATE_DRAIN {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let drained = drained.unwrap_or_else(|| {
        panic!(
            "{backend}: {LATE_DRAIN:?} after link up the old connections still have {to_send} \
             bytes to send, the target {to_read} to read"
        )
    });
    let ends: Vec<String> = old
        .iter()
        .map(|o| {
            let now = tcp_conns(None)
                .into_iter()
                .find(|c| c.local == o.local && c.peer == o.peer);
            format!(
                "{}->{} {} queued at the cut, now {}",
                o.local,
                o.peer,
                o.send_q,
                now.map_or("gone".to_string(), |c| format!("{} {}", c.state, c.send_q))
            )
        })
        .collect();

    dst.fill(&vec![0; LATE_LEN]);
    let got = read_all(&agent, &dst, &target, peer);
    let init = pattern(SEED_INIT, LATE_LEN);
    let diff = diff_ranges(&got, &b, &[("A", &a), ("initial", &init)]);
    let stale: usize = diff.iter().map(|r| r.1).sum();
    let shown: Vec<String> = diff
        .iter()
        .take(16)
        .map(|(o, l, p)| format!("[{o}, +{l}) {p}"))
        .collect();
    println!(
        "{TAG}WRITE A failed {failed_after:.2?} after the cut; {queued} bytes queued on {} \
         connections to the target ({ends:?}); link up {LATE_DOWN:?} after the cut; WRITE B done \
         {b_done:.2?} after link up ({attempts} attempts); old connections drained {drained:.2?} after \
         link up; {} ranges, {stale} bytes differ from B{}{shown:?}",
        old.len(),
        diff.len(),
        if diff.len() > shown.len() { " (first 16) " } else { " " },
    );
    println!("{TAG}timeline {timeline:?}");
    assert!(
        diff.is_empty(),
        "{backend}: {stale} bytes in {} ranges differ from WRITE B, which completed before: {shown:?}",
        diff.len()
    );
    agent.shutdown();
}

fn late_bytes(backend: &str, provider: Option<&str>) {
    let case = Case {
        role: "late-initiator",
        target: "late-target",
        len: LATE_LEN,
        seed: SEED_INIT,
        bridged: true,
        rate: Some(LATE_RATE),
        what: "link_cut_late_bytes",
    };
    run_case(case, backend, provider);
}

#[test]
fn link_cut_ucx_tcp() {
    link_cut("UCX", None);
}

#[test]
fn link_cut_libfabric_tcp() {
    link_cut("LIBFABRIC", Some("tcp;ofi_rxm"));
}

#[test]
#[ignore = "UCX's tcp delivers an abandoned WRITE's bytes after the link returns: stale in 25 of 25 runs (UCX 1.13.1)"]
fn link_cut_late_bytes_ucx_tcp() {
    late_bytes("UCX", None);
}

#[test]
fn link_cut_late_bytes_libfabric_tcp() {
    late_bytes("LIBFABRIC", Some("tcp;ofi_rxm"));
}
