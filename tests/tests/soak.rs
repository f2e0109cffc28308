//! Soak: transfers in a loop over UCX between two processes; resident
//! memory (`VmRSS`) and open file descriptors of this process must stay
//! flat between the end of a warm-up and the end of the run.
//!
//! The short run (about 30 s) is part of the test suite; the long one runs
//! 10⁶ transfers or 10 minutes, whichever comes first:
//! `cargo test -p kvxfer-tests --test soak -- --ignored soak_long`.
#![allow(clippy::result_large_err)]

mod reliability_common;

use std::time::{Duration, Instant};

use kvxfer::{Agent, WaitOutcome, XferOp};
use reliability_common::{config, open_fds, pattern, rss_kib, Buf, Target, TargetSpec};

const ENTRY: &str = "child_entry";
const LEN: usize = 1 << 20;
const BLOCK: usize = 64 << 10;

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
    let agent = Agent::new("soak-ini", config("UCX", None)).expect("agent");
    let src = Buf::from_vec(pattern(52, LEN));
    let dst = Buf::zeroed(LEN);
    src.register(&agent);
    dst.register(&agent);
    agent.connect(&target.addr).unwrap();
    let start = Instant::now();
    let mut base: Option<(u64, usize, u64)> = None;
    let (mut n, mut verified) = (0u64, 0u64);
    let blocks = LEN / BLOCK;
    while start.elapsed() < run_for && n < max_transfers {
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
            base = Some((rss_kib(), open_fds(), n));
        }
    }
    let elapsed = start.elapsed();
    let (rss0, fds0, n0) = base.expect("run shorter than its warm-up");
    let (rss1, fds1) = (rss_kib(), open_fds());
    println!(
        "RESULT soak: {n} transfers of {BLOCK} B in {elapsed:?} ({:.0}/s), {verified} blocks verified; \
         after warm-up ({n0} transfers) VmRSS {rss0} KiB, fds {fds0}; at the end VmRSS {rss1} KiB, fds {fds1}",
        n as f64 / elapsed.as_secs_f64()
    );
    // Flat: a leak of even 16 bytes per transfer would exceed this over
    // hundreds of thousands of transfers; allocator noise stays below it.
    let growth = rss1.saturating_sub(rss0);
    assert!(
        growth <= 8 * 1024,
        "VmRSS grew by {growth} KiB over {} transfers",
        n - n0
    );
    assert!(fds1 <= fds0 + 2, "open fds grew from {fds0} to {fds1}");
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
