//! The agent's keepalive, on the network path between two processes of this
//! host (cross-memory attach off): a target stopped with SIGSTOP answers
//! nothing, and every transfer in flight to it fails with
//! `RemoteDisconnected` naming it within the keepalive timeout (2 s by
//! default) plus slack, after which posts are refused at once. The READs'
//! destination can then be deregistered (the library let go of it), and
//! once it is, nothing writes into it even when the target resumes: a
//! canary pattern there stays as it is. With the keepalive off, the same
//! transfers stay in flight past it and end at the per-transfer deadline
//! instead.
#![allow(clippy::result_large_err)]

mod reliability_common;

use std::time::{Duration, Instant};

use kvxfer::{Agent, Error, WaitOutcome, XferOp, XferRequest};
use reliability_common::{config, pattern, read_all, Buf, Target, TargetSpec};

const ENTRY: &str = "child_entry";
const LEN: usize = 4 << 20;
const CHUNK: usize = 256 << 10;
const NAME: &str = "ka-target";
/// `AgentConfig::keepalive`'s default.
const KEEPALIVE: Duration = Duration::from_secs(2);
/// Checks run every eighth of the timeout; a loaded machine adds more.
const SLACK: Duration = Duration::from_millis(700);

#[test]
#[ignore = "child role of this file's tests; they spawn it"]
fn child_entry() {
    reliability_common::maybe_run_target();
}

fn network_env() -> Vec<(&'static str, String)> {
    vec![
        ("KVXFER_SAME_HOST_CMA", "0".to_string()),
        ("UCX_TLS", "tcp".to_string()),
    ]
}

/// A stopped target, an agent connected to it, and eight transfers posted
/// after the stop (four WRITEs, four READs). Returns the target (kill it
/// when done), the agent, its buffers and the transfers.
fn stopped_target(
    backend: &str,
    provider: Option<&str>,
    keepalive: Option<Duration>,
) -> (Target, Agent, Buf, Buf, Vec<XferRequest>, Instant) {
    let target = Target::spawn(TargetSpec {
        entry: ENTRY,
        name: NAME,
        backend,
        provider,
        len: LEN,
        seed: 71,
        env: network_env(),
        prefix: vec![],
    });
    let mut cfg = config(backend, provider)
        .with_same_host(false)
        .with_transfer_timeout(Some(Duration::from_secs(5)));
    if let Some(k) = keepalive {
        cfg = cfg.with_keepalive(k);
    }
    let agent = Agent::new("ka-ini", cfg).expect("agent");
    let (src, dst) = (Buf::from_vec(pattern(72, LEN)), Buf::zeroed(LEN));
    src.register(&agent);
    dst.register(&agent);
    assert_eq!(agent.connect(&target.addr).unwrap(), NAME);
    assert_eq!(agent.peer_path(NAME).unwrap(), backend);
    assert!(read_all(&agent, &dst, &target, NAME) == pattern(71, LEN));
    let pid = target.proc.child.id().to_string();
    let stop = std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status();
    assert!(
        stop.as_ref().is_ok_and(|s| s.success()),
        "kill -STOP {pid}: {stop:?}"
    );
    std::thread::sleep(Duration::from_millis(50));
    let stopped = Instant::now();
    let mut xfers = Vec::new();
    for i in 0..8 {
        let off = i * CHUNK;
        let op = if i % 2 == 0 {
            XferOp::Write
        } else {
            XferOp::Read
        };
        let (local, remote) = (
            if op == XferOp::Write {
                src.desc(off, CHUNK)
            } else {
                dst.desc(off, CHUNK)
            },
            target.desc(off, CHUNK),
        );
        xfers.push(
            agent
                .submit(op, &[local], &[remote], NAME, None)
                .expect("post to a stopped peer"),
        );
    }
    (target, agent, src, dst, xfers, stopped)
}

fn stopped_peer_fails_within_keepalive(backend: &str, provider: Option<&str>) {
    let (mut target, agent, src, dst, xfers, stopped) = stopped_target(backend, provider, None);
    let bound = KEEPALIVE + SLACK;
    let mut last = Duration::ZERO;
    for r in &xfers {
        match r.wait(bound.saturating_sub(stopped.elapsed())) {
            WaitOutcome::Failed(e) => {
                assert_eq!(e, Error::disconnected(NAME), "{backend}");
                last = last.max(stopped.elapsed());
            }
            other => panic!(
                "{backend}: a transfer to a stopped peer gave {other:?} {:?} after the stop",
                stopped.elapsed()
            ),
        }
    }
    assert!(last <= bound, "{backend}: failed {last:?} after the stop");
    // The metrics counted each of them failed once, none left in flight.
    let snap = agent.metrics().snapshot();
    let p = snap.peer(NAME).expect("the peer's series");
    assert_eq!(p.failures, vec![("remote_disconnected", 8)], "{backend}");
    assert_eq!(p.in_flight, 0, "{backend}");
    assert!(
        last >= KEEPALIVE - Duration::from_millis(200),
        "{backend}: failed after {last:?}, before the keepalive timeout"
    );
    let at = Instant::now();
    let refused = agent.submit(
        XferOp::Write,
        &[src.desc(0, CHUNK)],
        &[target.desc(0, CHUNK)],
        NAME,
        None,
    );
    assert_eq!(refused.map(|_| ()), Err(Error::disconnected(NAME)));
    assert!(
        at.elapsed() < Duration::from_millis(50),
        "{:?}",
        at.elapsed()
    );
    let refused_in = at.elapsed();
    // The READs' destination: deregistered once the library has let go
    // (its requests were ended with the connection), and from then on
    // never written, even when the target resumes and answers them.
    drop(xfers);
    let at = Instant::now();
    let dereg = agent.deregister(dst.addr());
    let dereg_took = at.elapsed();
    assert_eq!(dereg.map(|r| r.addr), Ok(dst.addr()), "{backend}");
    assert!(
        dereg_took < Duration::from_secs(3),
        "{backend}: deregister took {dereg_took:?}"
    );
    let canary = vec![0xc5u8; LEN];
    dst.fill(&canary);
    let pid = target.proc.child.id().to_string();
    let cont = std::process::Command::new("kill")
        .args(["-CONT", &pid])
        .status();
    assert!(
        cont.as_ref().is_ok_and(|s| s.success()),
        "kill -CONT {pid}: {cont:?}"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        dst.snapshot() == canary,
        "{backend}: memory written after deregister"
    );
    println!(
        "RESULT keepalive {backend}: 8 transfers to a stopped peer failed {last:?} after the stop; \
         a later post was refused in {refused_in:?}; the READs' buffer was deregistered in \
         {dereg_took:?} and stayed untouched 300 ms after the target resumed"
    );
    target.proc.kill();
    agent.shutdown();
}

#[test]
fn stopped_peer_fails_within_keepalive_ucx_tcp() {
    stopped_peer_fails_within_keepalive("UCX", None);
}

#[test]
fn stopped_peer_fails_within_keepalive_libfabric_tcp() {
    stopped_peer_fails_within_keepalive("LIBFABRIC", Some("tcp;ofi_rxm"));
}

#[test]
fn without_keepalive_a_stopped_peer_waits_for_the_deadline() {
    let (mut target, agent, _src, _dst, xfers, stopped) =
        stopped_target("UCX", None, Some(Duration::ZERO));
    let r = &xfers[0];
    assert_eq!(
        r.wait((KEEPALIVE + SLACK).saturating_sub(stopped.elapsed())),
        WaitOutcome::InProgress,
        "ended before the deadline with the keepalive off"
    );
    match r.wait(Duration::from_secs(5)) {
        // The time the transfer had run when the deadline was checked.
        WaitOutcome::Failed(Error::TimedOut { after_ms }) => {
            assert!((5000..5700).contains(&after_ms), "{after_ms}")
        }
        other => panic!("{other:?}"),
    }
    drop(xfers);
    target.proc.kill();
    agent.shutdown();
}
