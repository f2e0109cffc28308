//! The transfer scenarios, each run with every agent in its own
//! [`Peer`] process over 127.0.0.1, parameterised by the [`Fabric`].
//!
//! Every scenario moves seeded pseudo-random data and compares it byte for
//! byte at the destination; a failure names the fabric, the seed and the
//! first differing byte.

use crate::{fill_pattern, Fabric, Peer};

/// Bytes per KV block in [`kv_shaped`].
pub const KV_BLOCK: u64 = 16 << 10;
/// Blocks in [`kv_shaped`].
pub const KV_BLOCKS: u64 = 128;
/// Size of the [`large`] transfer.
pub const LARGE: u64 = 64 << 20;
/// Transfers in flight at once in [`many_in_flight`].
pub const IN_FLIGHT: u64 = 64;
/// Bytes per transfer in [`many_in_flight`].
pub const IN_FLIGHT_LEN: u64 = 64 << 10;

/// Defines module `$modname` with one test per scenario that every fabric
/// runs (Basic2 READ, SyncMessage, KV-shaped, 64 MiB, many in flight), over
/// the [`Fabric`] that `$fabric` makes, plus the `$extra` items given. In
/// the module, `run(scenario)` runs any scenario over that fabric with a
/// fresh seed, printed first so that a failure can be replayed.
#[macro_export]
macro_rules! scenario_suite {
    ($modname:ident, $fabric:expr, { $($extra:item)* }) => {
        mod $modname {
            #[allow(unused_imports)]
            use super::*;

            fn run(f: fn(&$crate::Fabric, u64)) {
                let fabric: $crate::Fabric = $fabric;
                let seed = $crate::random_seed();
                eprintln!("fabric {:?}, seed {seed}", fabric.label);
                f(&fabric, seed);
            }

            #[test]
            fn basic2_read() {
                run($crate::scenarios::basic_read);
            }

            #[test]
            fn sync_message() {
                run($crate::scenarios::sync_message);
            }

            #[test]
            fn kv_shaped_128_scattered_blocks() {
                run($crate::scenarios::kv_shaped);
            }

            #[test]
            fn large_64_mib() {
                run($crate::scenarios::large);
            }

            #[test]
            fn many_in_flight() {
                run($crate::scenarios::many_in_flight);
            }

            $($extra)*
        }
    };
}

fn names(f: &Fabric, roles: &[&str]) -> Vec<String> {
    roles
        .iter()
        .map(|r| format!("{}-{r}", f.label.replace(';', "_")))
        .collect()
}

/// A permutation of `0..n` from `seed` (Fisher-Yates over SplitMix64).
pub fn permutation(n: u64, seed: u64) -> Vec<u64> {
    let mut v: Vec<u64> = (0..n).collect();
    let mut s = seed;
    for i in (1..v.len()).rev() {
        s = crate::splitmix64(s);
        v.swap(i, (s % (i as u64 + 1)) as usize);
    }
    v
}

/// Starts two peers on `f`: (target, initiator).
fn pair(f: &Fabric) -> (Peer, Peer) {
    let n = names(f, &["target", "initiator"]);
    (Peer::spawn(&n[0], f), Peer::spawn(&n[1], f))
}

/// Connects `init` to `target` (after the target registered its memory);
/// returns the target's name.
fn link(init: &mut Peer, target: &Peer) -> String {
    let peer = init
        .connect(target.addr())
        .unwrap_or_else(|e| panic!("{} cannot connect to {}: {e}", init.name, target.name));
    assert_eq!(peer, target.name);
    peer
}

/// Basic: a 100-byte WRITE; the target's buffer equals the source.
pub fn basic_write(f: &Fabric, seed: u64) {
    let (mut target, mut init) = pair(f);
    let dst = target.alloc(100);
    let src = init.alloc(100);
    let peer = link(&mut init, &target);
    init.fill(seed, &[(src, 0, 100)]);
    let moved = init
        .xfer("WRITE", &peer, None, &[(src, dst, 100)])
        .unwrap_or_else(|e| panic!("{}: WRITE failed: {e}", f.label));
    assert_eq!(moved, 100);
    let mut want = vec![0u8; 100];
    fill_pattern(&mut want, seed, 0);
    assert_eq!(
        target.read_bytes(dst, 100),
        want,
        "{}: target's bytes differ (seed {seed})",
        f.label
    );
    init.quit();
    target.quit();
}

/// Basic2: a 100-byte READ of the target's buffer.
pub fn basic_read(f: &Fabric, seed: u64) {
    let (mut target, mut init) = pair(f);
    let remote = target.alloc(100);
    target.fill(seed, &[(remote, 0, 100)]);
    let local = init.alloc(100);
    let peer = link(&mut init, &target);
    assert_eq!(
        init.xfer("READ", &peer, None, &[(local, remote, 100)]),
        Ok(100)
    );
    let mut want = vec![0u8; 100];
    fill_pattern(&mut want, seed, 0);
    assert_eq!(
        init.read_bytes(local, 100),
        want,
        "{}: bytes read differ (seed {seed})",
        f.label
    );
    init.quit();
    target.quit();
}

/// Connect: agents 0 and 2 both connect to agent 1 and WRITE into halves
/// of one of its buffers at the same time; agent 1, which learnt both
/// through their pushed metadata, then notifies each of them.
pub fn connect_three(f: &Fabric, seed: u64) {
    const HALF: u64 = 1 << 20;
    let n = names(f, &["agent0", "agent1", "agent2"]);
    let mut a1 = Peer::spawn(&n[1], f);
    let mut a0 = Peer::spawn(&n[0], f);
    let mut a2 = Peer::spawn(&n[2], f);
    let dst = a1.alloc(2 * HALF);
    let s0 = a0.alloc(HALF);
    let s2 = a2.alloc(HALF);
    a0.fill(seed, &[(s0, 0, HALF)]);
    a2.fill(seed ^ 1, &[(s2, 0, HALF)]);
    assert_eq!(a0.connect(a1.addr()).as_deref(), Ok(n[1].as_str()));
    assert_eq!(a2.connect(a1.addr()).as_deref(), Ok(n[1].as_str()));
    let t = crate::STEP;
    a0.send(&crate::xfer_line(
        "WRITE",
        &n[1],
        None,
        t,
        &[(s0, dst, HALF)],
    ));
    a2.send(&crate::xfer_line(
        "WRITE",
        &n[1],
        None,
        t,
        &[(s2, dst + HALF, HALF)],
    ));
    assert_eq!(a0.reply(t), Ok(HALF.to_string()));
    assert_eq!(a2.reply(t), Ok(HALF.to_string()));
    a1.verify(seed, &[(dst, 0, HALF)]);
    a1.verify(seed ^ 1, &[(dst + HALF, 0, HALF)]);
    a1.notify(&n[0], b"to 0").unwrap();
    a1.notify(&n[2], b"to 2").unwrap();
    assert_eq!(a0.await_notif(&n[1]), b"to 0");
    assert_eq!(a2.await_notif(&n[1]), b"to 2");
    a0.quit();
    a2.quit();
    a1.quit();
}

/// A block header as an engine might send it in a notification: most of
/// its bytes are zero.
pub fn block_header(block: u32, offset: u64, len: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(24);
    v.extend_from_slice(&block.to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes()); // padding
    v.extend_from_slice(&offset.to_le_bytes());
    v.extend_from_slice(&len.to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes()); // flags
    v
}

/// SyncMessage: notifications in both directions with binary payloads
/// (every byte value, a serialized structure full of zero bytes, an empty
/// one), in order; then WRITEs carrying a notification, where the target
/// checks its whole buffer the moment each notification arrives.
pub fn sync_message(f: &Fabric, seed: u64) {
    const LEN: u64 = 4 << 20;
    let (mut target, mut init) = pair(f);
    let peer = link(&mut init, &target);
    let back = init.name.clone();
    let all_bytes: Vec<u8> = (0..=255u8).collect();
    let header = block_header(0, 0, 16 << 10);
    assert!(header.iter().filter(|&&b| b == 0).count() > 12);
    let msgs: [&[u8]; 4] = [&all_bytes, &header, b"\0", b""];
    for m in msgs {
        init.notify(&peer, m).unwrap();
    }
    for m in msgs {
        assert_eq!(
            target.await_notif(&back),
            m,
            "{}: initiator to target",
            f.label
        );
    }
    for m in msgs {
        target.notify(&back, m).unwrap();
    }
    for m in msgs {
        assert_eq!(
            init.await_notif(&peer),
            m,
            "{}: target to initiator",
            f.label
        );
    }

    let dst = target.alloc(LEN);
    let src = init.alloc(LEN);
    // The initiator's view of the target's regions must include `dst`.
    link(&mut init, &target);
    for round in 0..4u64 {
        let s = seed.wrapping_add(round) | 1;
        init.fill(s, &[(src, 0, LEN)]);
        let note = block_header(round as u32, round * LEN, LEN as u32);
        target.send(&format!(
            "await_notif {back} {} {s} {}",
            crate::STEP.as_millis(),
            crate::spans(&[(dst, 0, LEN)])
        ));
        assert_eq!(
            init.xfer("WRITE", &peer, Some(&note), &[(src, dst, LEN)]),
            Ok(LEN)
        );
        let got = target.reply(crate::STEP).expect("await_notif");
        assert_eq!(
            crate::unhex(&got).unwrap(),
            note,
            "{}: round {round}",
            f.label
        );
    }
    init.quit();
    target.quit();
}

/// KV-shaped: 128 blocks of 16 KiB at non-contiguous, shuffled addresses
/// on both sides, one WRITE of all of them; the target checks every block
/// and that the gaps between blocks stayed zero. Then one READ brings the
/// blocks back into another shuffled layout, checked at the initiator.
pub fn kv_shaped(f: &Fabric, seed: u64) {
    let (b, n) = (KV_BLOCK, KV_BLOCKS);
    let pool = 2 * n * b; // every other slot is a gap
    let (mut target, mut init) = pair(f);
    let src = init.alloc(pool);
    let back = init.alloc(pool);
    let dst = target.alloc(pool);
    let peer = link(&mut init, &target);
    let (ps, pd, pb) = (
        permutation(n, seed),
        permutation(n, seed ^ 0x55),
        permutation(n, seed ^ 0xaa),
    );
    // Block i: pattern offset i*b; at source slot 2*ps[i], target slot
    // 2*pd[i]+1, read-back slot 2*pb[i].
    let src_at = |i: u64| src + 2 * ps[i as usize] * b;
    let dst_at = |i: u64| dst + (2 * pd[i as usize] + 1) * b;
    let back_at = |i: u64| back + 2 * pb[i as usize] * b;
    let blocks: Vec<(u64, u64, u64)> = (0..n).map(|i| (src_at(i), i * b, b)).collect();
    init.fill(seed, &blocks);
    let write: Vec<_> = (0..n).map(|i| (src_at(i), dst_at(i), b)).collect();
    assert_eq!(init.xfer("WRITE", &peer, None, &write), Ok(n * b));
    let at_dst: Vec<_> = (0..n).map(|i| (dst_at(i), i * b, b)).collect();
    target.verify(seed, &at_dst);
    let gaps: Vec<_> = (0..n).map(|k| (dst + 2 * k * b, 0, b)).collect();
    target.verify(0, &gaps);
    let read: Vec<_> = (0..n).map(|i| (back_at(i), dst_at(i), b)).collect();
    assert_eq!(init.xfer("READ", &peer, None, &read), Ok(n * b));
    let at_back: Vec<_> = (0..n).map(|i| (back_at(i), i * b, b)).collect();
    init.verify(seed, &at_back);
    let back_gaps: Vec<_> = (0..n).map(|k| (back + (2 * k + 1) * b, 0, b)).collect();
    init.verify(0, &back_gaps);
    init.quit();
    target.quit();
}

/// Large: one 64 MiB WRITE, checked byte for byte at the target.
pub fn large(f: &Fabric, seed: u64) {
    let (mut target, mut init) = pair(f);
    let dst = target.alloc(LARGE);
    let src = init.alloc(LARGE);
    let peer = link(&mut init, &target);
    init.fill(seed, &[(src, 0, LARGE)]);
    assert_eq!(
        init.xfer("WRITE", &peer, None, &[(src, dst, LARGE)]),
        Ok(LARGE)
    );
    target.verify(seed, &[(dst, 0, LARGE)]);
    init.quit();
    target.quit();
}

/// Many in flight: 64 WRITEs of 64 KiB posted before any is waited for,
/// each checked at the target; then 64 READs back into a second buffer,
/// each checked at the initiator.
pub fn many_in_flight(f: &Fabric, seed: u64) {
    let (k, len) = (IN_FLIGHT, IN_FLIGHT_LEN);
    let (mut target, mut init) = pair(f);
    let src = init.alloc(k * len);
    let back = init.alloc(k * len);
    let dst = target.alloc(k * len);
    let peer = link(&mut init, &target);
    init.fill(seed, &[(src, 0, k * len)]);
    // Transfer j moves source block j to target block k-1-j.
    let writes: Vec<_> = (0..k)
        .map(|j| (src + j * len, dst + (k - 1 - j) * len, len))
        .collect();
    assert_eq!(init.xfer_each("WRITE", &peer, &writes).0, k as usize);
    let at_dst: Vec<_> = (0..k)
        .map(|j| (dst + (k - 1 - j) * len, j * len, len))
        .collect();
    target.verify(seed, &at_dst);
    let reads: Vec<_> = (0..k)
        .map(|j| (back + j * len, dst + (k - 1 - j) * len, len))
        .collect();
    assert_eq!(init.xfer_each("READ", &peer, &reads).0, k as usize);
    init.verify(seed, &[(back, 0, k * len)]);
    init.quit();
    target.quit();
}
