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
//! Needs root (network namespaces); without it the tests fail saying so
//! (`--skip link_cut` leaves them out, as `scripts/test.sh` does, saying
//! so, where `ip netns exec` cannot work).
#![allow(clippy::result_large_err)]

mod reliability_common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use kvxfer::{Agent, WaitOutcome, XferOp, XferRequest, XferState};
use reliability_common::{
    config, ip, is_root, pattern, read_all, run, Buf, Proc, Target, TargetSpec, ROLE, TAG,
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
    if !reliability_common::maybe_run_target() && std::env::var(ROLE).as_deref() == Ok("initiator")
    {
        initiator();
    }
}

/// Two namespaces joined by a veth pair; deleted on drop (which removes
/// the veth ends inside them).
struct Net {
    ns: [String; 2],
    dev: [String; 2],
}

static NEXT: AtomicU32 = AtomicU32::new(0);

impl Net {
    fn new() -> Result<Net, String> {
        let id = format!(
            "{}{}",
            std::process::id() % 1_000_000,
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let net = Net {
            ns: [format!("kvxr{id}a"), format!("kvxr{id}b")],
            dev: [format!("kvr{id}a"), format!("kvr{id}b")],
        };
        for ns in &net.ns {
            ip(&["netns", "add", ns])?;
        }
        let [na, nb] = &net.ns;
        let [da, db] = &net.dev;
        ip(&["link", "add", da, "type", "veth", "peer", "name", db]).inspect_err(|_| {
            let _ = ip(&["link", "del", da]);
        })?;
        ip(&["link", "set", da, "netns", na]).inspect_err(|_| {
            let _ = ip(&["link", "del", da]);
        })?;
        ip(&["link", "set", db, "netns", nb])?;
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
        for ns in &self.ns {
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

fn link_cut(backend: &str, provider: Option<&str>) {
    assert!(
        is_root(),
        "needs root to create network namespaces (run as root, or leave this test out with \
         --skip link_cut)"
    );
    let net = Net::new().unwrap_or_else(|e| panic!("cannot create network namespaces: {e}"));
    let mut env = transport_env(&net.dev[0]);
    env.push(("KVXFER_REL_LISTEN", format!("{IP_A}:0")));
    let target = Target::spawn(TargetSpec {
        entry: ENTRY,
        name: "cut-target",
        backend,
        provider,
        len: LEN,
        seed: 61,
        env,
        prefix: vec!["ip", "netns", "exec", &net.ns[0]],
    });
    let mut env = transport_env(&net.dev[1]);
    env.extend([
        (ROLE, "initiator".to_string()),
        ("KVXFER_REL_BACKEND", backend.to_string()),
        ("KVXFER_REL_TARGET", target.addr.clone()),
        ("KVXFER_REL_TARGET_BUF", target.buf.to_string()),
        ("KVXFER_REL_NS_A", net.ns[0].clone()),
        ("KVXFER_REL_DEV_A", net.dev[0].clone()),
    ]);
    if let Some(p) = provider {
        env.push(("KVXFER_REL_PROVIDER", p.to_string()));
    }
    let mut ini = Proc::spawn(ENTRY, &env, &["ip", "netns", "exec", &net.ns[1]]);
    let status = ini.wait_exit(Duration::from_secs(60));
    let mut result = None;
    while let Some(l) = ini.line(Duration::from_millis(100)) {
        result = Some(l);
    }
    assert!(
        status.is_some_and(|s| s.success()),
        "initiator in {}: {status:?} (killed after 60 s if None)",
        net.ns[1]
    );
    let result = result.expect("initiator reported nothing");
    println!(
        "RESULT link_cut {backend}{}: {result}",
        provider.map(|p| format!(" ({p})")).unwrap_or_default()
    );
    drop(target);
    drop(net);
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

#[test]
fn link_cut_ucx_tcp() {
    link_cut("UCX", None);
}

#[test]
fn link_cut_libfabric_tcp() {
    link_cut("LIBFABRIC", Some("tcp;ofi_rxm"));
}
