//! Soak: transfers in a loop over UCX between two processes, on the
//! network path (cross-memory attach off, so that both processes' UCX
//! workers handle every transfer); resident
//! memory (`VmRSS`) and open file descriptors of both processes must stay
//! flat between the end of a warm-up and the end of the run: VmRSS may grow
//! by at most 8 bytes per transfer after the warm-up, and the run makes at
//! least [`MIN_TRANSFERS`] of them, so a leak of 16 bytes per transfer (or
//! more) fails it.
//!
//! The short run (30 s, longer until it has made [`MIN_TRANSFERS`]
//! transfers after its warm-up) is part of the test suite; the long one runs
//! 10⁶ transfers or 10 minutes, whichever comes first:
//! `cargo test -p kvxfer-tests --test soak -- --ignored soak_long`.
#![allow(clippy::result_large_err)]

mod reliability_common;

use std::time::{Duration, Instant};

use kvxfer::{Agent, WaitOutcome, XferOp};
use reliability_common::{
    config, open_fds, open_fds_of, pattern, rss_kib, rss_kib_of, Buf, Target, TargetSpec,
};

const ENTRY: &str = "child_entry";
const LEN: usize = 1 << 20;
const BLOCK: usize = 64 << 10;
/// Fewest transfers measured after the warm-up: 8 bytes of each make the
/// 512 KiB, above what page-granular VmRSS readings move by on their own.
const MIN_TRANSFERS: u64 = 64 * 1024;
/// Most VmRSS growth allowed per measured transfer, in bytes.
const BYTES_PER_TRANSFER: u64 = 8;
/// Hard bound on a run that has not made `MIN_TRANSFERS` yet.
const HARD_LIMIT: Duration = Duration::from_secs(180);

#[test]
#[ignore = "child role of this file's tests; they spawn it"]
fn child_entry() {
    reliability_common::maybe_run_target();
}

fn soak(run_for: Duration, max_transfers: u64, warmup: Duration) {
    let target = Target::spawn(TargetSpec {
        entry: ENTRY,
        name: "soak-target",
        backend: "UCX",
        provider: None,
        len: LEN,
        seed: 51,
        env: Vec::new(),
        prefix: Vec::new(),
    });
    let cfg = config("UCX", None).with_same_host(false);
    let agent = Agent::new("soak-ini", cfg).expect("agent");
    let src = Buf::from_vec(pattern(52, LEN));
    let dst = Buf::zeroed(LEN);
    src.register(&agent);
    dst.register(&agent);
    agent.connect(&target.addr).unwrap();
    assert_eq!(agent.peer_path("soak-target").unwrap(), "UCX");
    let target_pid = target.proc.child.id().to_string();
    let start = Instant::now();
    let mut base: Option<(u64, usize, u64, u64, usize)> = None;
    let (mut n, mut verified) = (0u64, 0u64);
    let blocks = LEN / BLOCK;
    let measured =
        |n: u64, base: &Option<(u64, usize, u64, u64, usize)>| base.as_ref().map_or(0, |b| n - b.2);
    while (start.elapsed() < run_for || measured(n, &base) < MIN_TRANSFERS)
        && n < max_transfers
        && start.elapsed() < HARD_LIMIT
    {
        // WRITE one block, READ it back elsewhere, compare now and then.
        let i = (n as usize / 2) % blocks;
        let (op, local, remote) = if n % 2 == 0 {
            (
                XferOp::Write,
                src.desc(i * BLOCK, BLOCK),
                target.desc(i * BLOCK, BLOCK),
            )
        } else {
            (
                XferOp::Read,
                dst.desc(i * BLOCK, BLOCK),
                target.desc(i * BLOCK, BLOCK),
            )
        };
        // A fresh request each time (prepare, post, wait, release), plus a
        // notification every 64th, exercising every table.
        let note = (n % 64 == 0).then_some(&b"soak"[..]);
        let req = agent
            .submit(op, &[local], &[remote], "soak-target", note)
            .unwrap_or_else(|e| panic!("transfer {n}: {e}"));
        match req.wait(Duration::from_secs(10)) {
            WaitOutcome::Done => {}
            other => panic!("transfer {n}: {other:?}"),
        }
        drop(req);
        if n % 2 == 1 && n % 512 == 1 {
            let got = dst.snapshot();
            assert!(
                got[i * BLOCK..(i + 1) * BLOCK] == pattern(52, LEN)[i * BLOCK..(i + 1) * BLOCK],
                "block {i} read back differs after {n} transfers"
            );
            verified += 1;
        }
        n += 1;
        if base.is_none() && start.elapsed() >= warmup {
            base = Some((
                rss_kib(),
                open_fds(),
                n,
                rss_kib_of(&target_pid),
                open_fds_of(&target_pid),
            ));
        }
    }
    let elapsed = start.elapsed();
    let (rss0, fds0, n0, trss0, tfds0) = base.expect("run shorter than its warm-up");
    let (rss1, fds1) = (rss_kib(), open_fds());
    let (trss1, tfds1) = (rss_kib_of(&target_pid), open_fds_of(&target_pid));
    let transfers = n - n0;
    println!(
        "RESULT soak: {n} transfers of {BLOCK} B in {elapsed:?} ({:.0}/s), {verified} blocks verified; \
         after warm-up ({n0} transfers) VmRSS {rss0} KiB, fds {fds0} (target {trss0} KiB, {tfds0}); \
         at the end VmRSS {rss1} KiB, fds {fds1} (target {trss1} KiB, {tfds1})",
        n as f64 / elapsed.as_secs_f64()
    );
    if max_transfers == u64::MAX {
        assert!(
            transfers >= MIN_TRANSFERS,
            "only {transfers} transfers after the warm-up in {elapsed:?}"
        );
    }
    let limit_kib = BYTES_PER_TRANSFER * transfers / 1024;
    for (who, before, after) in [("initiator", rss0, rss1), ("target", trss0, trss1)] {
        let growth = after.saturating_sub(before);
        assert!(
            growth <= limit_kib,
            "{who}: VmRSS grew by {growth} KiB over {transfers} transfers (limit {limit_kib} KiB)"
        );
    }
    assert!(fds1 <= fds0 + 2, "open fds grew from {fds0} to {fds1}");
    assert!(
        tfds1 <= tfds0 + 2,
        "target: open fds grew from {tfds0} to {tfds1}"
    );
    // The target ends cleanly.
    let mut t = target;
    t.proc.send("quit");
    let status = t.proc.wait_exit(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "target exit: {status:?}"
    );
    agent.shutdown();
}

#[test]
fn soak_short() {
    soak(Duration::from_secs(30), u64::MAX, Duration::from_secs(5));
}

#[test]
#[ignore = "long soak: 10^6 transfers or 10 minutes"]
fn soak_long() {
    soak(Duration::from_secs(600), 1_000_000, Duration::from_secs(30));
}
