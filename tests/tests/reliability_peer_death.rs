//! Peer death through the Agent, over UCX and over libfabric's
//! `tcp;ofi_rxm`, on the network path (cross-memory attach off) and on the
//! same-host path: three processes (this one as initiator, two targets).
//! One target is killed with SIGKILL during a stream of WRITEs to both;
//! every transfer to it fails with `RemoteDisconnected` naming it, within
//! 1 s of the kill over UCX and on the same-host path, within 3 s over
//! libfabric (whose provider does not fail every operation to a dead peer:
//! the agent's keepalive, 2 s, fails the rest); the stream to the other
//! target goes on, and once the killed target is restarted under the same
//! name and its new metadata loaded, transfers to it succeed again. Data is
//! compared byte for byte after real transfers.
#![allow(clippy::result_large_err)]

mod reliability_common;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use kvxfer::{Agent, Error, WaitOutcome, XferOp, XferRequest, XferState};
use reliability_common::{config, pattern, read_all, run, Buf, Target, TargetSpec};

const ENTRY: &str = "child_entry";
const LEN: usize = 4 << 20;
const CHUNK: usize = 1 << 20;
const CHUNKS: usize = LEN / CHUNK;
/// Bound on how long a transfer to a dead peer may stay unfinished over
/// libfabric's network path: the keepalive timeout (2 s) after the last
/// completion, plus 1 s for scheduling on a loaded machine.
const FAIL_BOUND: Duration = Duration::from_secs(3);
/// Bound on every transfer to the dead peer over UCX and on the same-host
/// path, from the kill (measured: microseconds to a few milliseconds).
const DISCONNECT_BOUND: Duration = Duration::from_secs(1);

#[test]
#[ignore = "child role of this file's tests; they spawn it"]
fn child_entry() {
    reliability_common::maybe_run_target();
}

fn spawn(name: &str, backend: &str, provider: Option<&str>, seed: u64) -> Target {
    Target::spawn(TargetSpec {
        entry: ENTRY,
        name,
        backend,
        provider,
        len: LEN,
        seed,
        env: Vec::new(),
        prefix: Vec::new(),
    })
}

/// A transfer of the stream.
struct Flight {
    req: XferRequest,
    to_a: bool,
    posted: Instant,
}

/// Checks a failed transfer to the killed peer: `RemoteDisconnected`
/// naming it, within `bound` of the kill.
fn check_peer_failure(e: &Error, bound: Duration, after_kill: Duration) {
    assert_eq!(
        e,
        &Error::disconnected("pd-a"),
        "{after_kill:?} after the kill"
    );
    assert!(after_kill < bound, "{e:?} {after_kill:?} after the kill");
}

fn peer_death(backend: &'static str, provider: Option<&str>, same_host: bool) {
    let ini = format!("pd-ini-{}", backend.to_lowercase());
    let bound = if backend == "UCX" || same_host {
        DISCONNECT_BOUND
    } else {
        FAIL_BOUND
    };
    let mut a = spawn("pd-a", backend, provider, 11);
    let b = spawn("pd-b", backend, provider, 12);
    let cfg = config(backend, provider).with_same_host(same_host);
    let agent = Agent::new(&ini, cfg).expect("initiator agent");
    let src = Buf::from_vec(pattern(13, LEN));
    let dst = Buf::zeroed(LEN);
    src.register(&agent);
    dst.register(&agent);
    assert_eq!(agent.connect(&a.addr).unwrap(), "pd-a");
    assert_eq!(agent.connect(&b.addr).unwrap(), "pd-b");
    let path = agent.peer_path("pd-a").unwrap();
    assert_eq!(
        path,
        if same_host {
            "cross-memory attach"
        } else {
            backend
        }
    );
    assert_eq!(read_all(&agent, &dst, &a, "pd-a"), pattern(11, LEN));

    // The stream: up to 4 WRITEs in flight to each target, chunk by chunk.
    let mut flights: VecDeque<Flight> = VecDeque::new();
    let mut next = [0usize; 2];
    let (mut a_done, mut b_done, mut b_done_after_kill) = (0u32, 0u32, 0u32);
    let mut killed_at: Option<Instant> = None;
    let mut a_in_flight_at_kill = 0usize;
    let (mut a_failed, mut a_done_after_kill) = (0u32, 0u32);
    let mut post_errors: Vec<Error> = Vec::new();
    let mut last_a_end = Duration::ZERO;
    let mut first_fail: Option<Duration> = None;
    let mut posted_after_kill = 0;
    let mut seen_errors: Vec<String> = Vec::new();
    let start = Instant::now();
    loop {
        assert!(
            start.elapsed() < Duration::from_secs(40),
            "stream did not end"
        );
        for to_a in [true, false] {
            let in_flight = flights.iter().filter(|f| f.to_a == to_a).count();
            let posting_a = to_a && (killed_at.is_none() || posted_after_kill < 4);
            if in_flight >= 4 || (to_a && !posting_a) {
                continue;
            }
            let n = &mut next[usize::from(!to_a)];
            let off = (*n % CHUNKS) * CHUNK;
            *n += 1;
            let (peer, target) = if to_a { ("pd-a", &a) } else { ("pd-b", &b) };
            if to_a && killed_at.is_some() {
                posted_after_kill += 1;
            }
            let local = [src.desc(off, CHUNK)];
            let remote = [target.desc(off, CHUNK)];
            match agent.submit(XferOp::Write, &local, &remote, peer, None) {
                Ok(req) => flights.push_back(Flight {
                    req,
                    to_a,
                    posted: Instant::now(),
                }),
                Err(e) => {
                    assert!(
                        to_a && killed_at.is_some(),
                        "post to {peer} failed before any kill: {e}"
                    );
                    let k = killed_at.expect("killed");
                    check_peer_failure(&e, bound, k.elapsed());
                    post_errors.push(e);
                }
            }
        }
        // Kill right after posting, so that transfers are in flight.
        if killed_at.is_none() && a_done >= 6 && b_done >= CHUNKS as u32 {
            a_in_flight_at_kill = flights
                .iter()
                .filter(|f| f.to_a && matches!(f.req.status(), Ok(XferState::InProgress)))
                .count();
            a.proc.kill();
            killed_at = Some(Instant::now());
        }
        // Collect finished transfers.
        let mut i = 0;
        while i < flights.len() {
            let state = flights[i].req.status().expect("status");
            let f = &flights[i];
            match state {
                XferState::InProgress | XferState::Prepared => {
                    if let Some(k) = killed_at {
                        assert!(
                            !f.to_a || k.elapsed() < bound,
                            "a transfer to the dead peer is unfinished {:?} after the kill",
                            k.elapsed()
                        );
                    }
                    assert!(
                        f.posted.elapsed() < Duration::from_secs(10),
                        "a transfer to {} is unfinished after 10 s",
                        if f.to_a { "pd-a" } else { "pd-b" }
                    );
                    i += 1;
                    continue;
                }
                XferState::Done if f.to_a => {
                    a_done += 1;
                    if let Some(k) = killed_at {
                        // Possible only for data delivered before the
                        // process died.
                        assert!(
                            f.posted < k,
                            "a WRITE posted after the target was reaped succeeded"
                        );
                        a_done_after_kill += 1;
                        last_a_end = last_a_end.max(k.elapsed());
                    }
                }
                XferState::Done => {
                    b_done += 1;
                    if killed_at.is_some() {
                        b_done_after_kill += 1;
                    }
                }
                XferState::Failed(e) => {
                    assert!(f.to_a, "a transfer to the live peer failed: {e}");
                    let k = killed_at.unwrap_or_else(|| panic!("failure before the kill: {e}"));
                    let at = k.elapsed();
                    check_peer_failure(&e, bound, at);
                    a_failed += 1;
                    first_fail = Some(first_fail.map_or(at, |f| f.min(at)));
                    last_a_end = last_a_end.max(at);
                    let text = format!("{e:?}");
                    let kind = text.split([' ', '{', '(']).next().unwrap_or("").to_string();
                    if !seen_errors.contains(&kind) {
                        seen_errors.push(kind);
                    }
                }
            }
            flights.remove(i);
        }
        match killed_at {
            Some(k)
                if posted_after_kill >= 4
                    && !flights.iter().any(|f| f.to_a)
                    && k.elapsed() > Duration::from_millis(1500) =>
            {
                break
            }
            _ => {}
        }
    }
    // Wait for the last transfers to B.
    for f in flights.drain(..) {
        assert_eq!(f.req.wait(Duration::from_secs(10)), WaitOutcome::Done);
    }
    let failed_after = a_failed as usize + post_errors.len();
    assert!(
        failed_after >= 4,
        "only {failed_after} transfers to the dead peer failed"
    );
    assert!(
        b_done_after_kill > 0,
        "no transfer to the live peer finished after the kill"
    );
    for e in &post_errors {
        let text = format!("{e:?}");
        let kind = text.split([' ', '{', '(']).next().unwrap_or("").to_string();
        if !seen_errors.contains(&kind) {
            seen_errors.push(kind);
        }
    }

    // The live peer got every chunk, byte for byte.
    assert!(
        read_all(&agent, &dst, &b, "pd-b") == src.snapshot(),
        "pd-b's data differs"
    );

    // Restart the dead peer under the same name; load its new metadata.
    let t = Instant::now();
    let a2 = spawn("pd-a", backend, provider, 21);
    let restart = t.elapsed();
    let t = Instant::now();
    assert_eq!(agent.connect(&a2.addr).unwrap(), "pd-a");
    let reconnect = t.elapsed();
    assert_eq!(read_all(&agent, &dst, &a2, "pd-a"), pattern(21, LEN));
    run(
        &agent,
        XferOp::Write,
        &[src.desc(0, LEN)],
        &[a2.desc(0, LEN)],
        "pd-a",
        Duration::from_secs(10),
    )
    .expect("WRITE to the restarted peer");
    dst.fill(&vec![0; LEN]);
    assert!(
        read_all(&agent, &dst, &a2, "pd-a") == src.snapshot(),
        "restarted pd-a's data differs"
    );
    println!(
        "RESULT peer_death {backend}{} ({path}): {a_in_flight_at_kill} in flight at the kill \
         ({a_done_after_kill} completed, rest failed); {a_failed} failed completions, {} posts refused; \
         first failure {:?}, last transfer to the dead peer ended {:?} after the kill; errors {seen_errors:?}; \
         {b_done_after_kill} WRITEs to the live peer done meanwhile; restart {restart:?}, reconnect {reconnect:?}",
        provider.map(|p| format!(" ({p})")).unwrap_or_default(),
        post_errors.len(),
        first_fail,
        last_a_end,
    );
    agent.shutdown();
    drop(a2);
}

#[test]
fn peer_death_ucx() {
    peer_death("UCX", None, false);
}

#[test]
fn peer_death_libfabric_tcp() {
    peer_death("LIBFABRIC", Some("tcp;ofi_rxm"), false);
}

#[test]
fn peer_death_same_host_ucx() {
    peer_death("UCX", None, true);
}

#[test]
fn peer_death_same_host_libfabric() {
    peer_death("LIBFABRIC", Some("tcp;ofi_rxm"), true);
}
