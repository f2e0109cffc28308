//! Every table of the engine at its edge: exactly at capacity works, one
//! more is `CapacityExceeded` naming the table, its size and the setting
//! that raises it; and strided descriptor lists.

use kvxfer_core::desc::DescList;
use kvxfer_core::error::DescError;
use kvxfer_core::transport::loopback::{Loopback, LoopbackMemory};
use kvxfer_core::{
    Capacities, Desc, Engine, EngineConfig, Error, Instant, Region, Side, Storage, Strided,
    XferHandle, XferOp, XferState,
};

const BASE: u64 = 0x10_0000;
const SIZE: usize = 1 << 16;
/// The initiator's region.
const A: u64 = BASE;
/// The target's region.
const B: u64 = BASE + 0x8000;
const LEN: u64 = 0x4000;

type Eng<'m> = Engine<'static, Loopback<'m, SIZE>>;

const CAPS: Capacities = Capacities {
    regions: 4,
    peers: 2,
    remote_regions: 6,
    xfers: 4,
    segments: 64,
    segments_per_chunk: 8,
    prepared_lists: 3,
    prepared_entries: 40,
    notifications: 2,
    notification_len: 32,
};

fn engine<'m>(mem: &'m LoopbackMemory<SIZE>, name: &str, id: u32, caps: &Capacities) -> Eng<'m> {
    Engine::new(
        name,
        Loopback::new(mem, id),
        EngineConfig::default(),
        Storage::owned(caps),
    )
    .unwrap()
}

fn full(what: &'static str, capacity: u32, setting: &'static str) -> Error {
    Error::CapacityExceeded {
        what,
        capacity,
        setting,
    }
}

/// An initiator and a target ("t") with one region each, loaded.
fn pair(mem: &LoopbackMemory<SIZE>) -> (Eng<'_>, Eng<'_>) {
    let mut a = engine(mem, "a", 1, &CAPS);
    let mut t = engine(mem, "t", 2, &CAPS);
    a.register(Region::dram(A, LEN)).unwrap();
    t.register(Region::dram(B, LEN)).unwrap();
    load(&mut a, &t);
    (a, t)
}

fn load(into: &mut Eng<'_>, from: &Eng<'_>) {
    let mut md = [0u8; 1024];
    let n = from.local_metadata(&mut md).unwrap();
    into.load_remote(&md[..n]).unwrap();
}

/// `n` single-byte descriptors two bytes apart (no coalescing).
fn spaced(base: u64, n: usize) -> Vec<Desc> {
    (0..n as u64).map(|k| Desc::new(base + 2 * k, 1)).collect()
}

fn run(a: &mut Eng<'_>, h: XferHandle) {
    assert_eq!(a.post(h, Instant::ZERO), Ok(XferState::InProgress));
    while a.poll(Instant::ZERO) == 0 {}
    assert_eq!(a.state(h), Ok(XferState::Done));
}

fn fill(mem: &LoopbackMemory<SIZE>, addr: u64, len: usize, seed: u8) -> Vec<u8> {
    let bytes: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed))
        .collect();
    mem.write(addr, &bytes).unwrap();
    bytes
}

fn read(mem: &LoopbackMemory<SIZE>, addr: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    mem.read(addr, &mut out).unwrap();
    out
}

#[test]
fn regions_and_peers_fill_exactly() {
    let mem = LoopbackMemory::<SIZE>::new(BASE);
    let mut a = engine(&mem, "a", 1, &CAPS);
    for k in 0..4 {
        a.register(Region::dram(A + k * 0x100, 0x100)).unwrap();
    }
    assert_eq!(
        a.register(Region::dram(A + 0x400, 0x100)),
        Err(full("registrations", 4, "regions"))
    );
    a.deregister(A).unwrap();
    a.register(Region::dram(A + 0x400, 0x100)).unwrap();

    let peers: Vec<Eng<'_>> = (0..3)
        .map(|k| {
            let mut t = engine(&mem, &format!("t{k}"), 10 + k, &CAPS);
            t.register(Region::dram(B + k as u64 * 0x100, 0x100))
                .unwrap();
            t
        })
        .collect();
    load(&mut a, &peers[0]);
    load(&mut a, &peers[1]);
    let mut md = [0u8; 1024];
    let n = peers[2].local_metadata(&mut md).unwrap();
    assert_eq!(a.load_remote(&md[..n]), Err(full("peers", 2, "peers")));
    a.invalidate_remote("t0").unwrap();
    assert_eq!(a.load_remote(&md[..n]).unwrap().as_str(), "t2");
}

#[test]
fn remote_regions_are_shared_and_compacted() {
    let mem = LoopbackMemory::<SIZE>::new(BASE);
    let mut a = engine(&mem, "a", 1, &CAPS);
    let mut t0 = engine(&mem, "t0", 2, &CAPS);
    let mut t1 = engine(&mem, "t1", 3, &CAPS);
    for k in 0..2 {
        t0.register(Region::dram(B + k * 0x100, 0x100)).unwrap();
    }
    for k in 0..4 {
        t1.register(Region::dram(B + 0x1000 + k * 0x100, 0x100))
            .unwrap();
    }
    // 2 + 4 = 6 entries: exactly the table.
    load(&mut a, &t0);
    load(&mut a, &t1);
    // t0 grows to 3 regions: 3 + 4 > 6, refused before anything changes.
    t0.register(Region::dram(B + 0x200, 0x100)).unwrap();
    let mut md = [0u8; 1024];
    let n = t0.local_metadata(&mut md).unwrap();
    assert_eq!(
        a.load_remote(&md[..n]),
        Err(full("remote regions", 6, "remote_regions"))
    );
    assert_eq!(a.remote_regions("t0").unwrap().count(), 2);
    // Without t1, t0's new load fits: its entries move to the front.
    a.invalidate_remote("t1").unwrap();
    a.load_remote(&md[..n]).unwrap();
    let regions: Vec<u64> = a.remote_regions("t0").unwrap().map(|r| r.addr).collect();
    assert_eq!(regions, [B, B + 0x100, B + 0x200]);
    t1.deregister(B + 0x1300).unwrap();
    load(&mut a, &t1);
    assert_eq!(a.remote_regions("t1").unwrap().count(), 3);
    // Transfers resolve against the moved entries.
    a.register(Region::dram(A, LEN)).unwrap();
    let want = fill(&mem, A, 64, 5);
    let h = a
        .prepare(
            XferOp::Write,
            &[Desc::new(A, 64)],
            &[Desc::new(B + 0x200, 64)],
            "t0",
            None,
        )
        .unwrap();
    run(&mut a, h);
    assert_eq!(read(&mem, B + 0x200, 64), want);
}

#[test]
fn transfers_and_segments_fill_exactly() {
    let mem = LoopbackMemory::<SIZE>::new(BASE);
    let (mut a, _t) = pair(&mem);
    // The segment table holds 64 records: one transfer of 64 works.
    let want = fill(&mem, A, 128, 1);
    let h = a
        .prepare(XferOp::Write, &spaced(A, 64), &spaced(B, 64), "t", None)
        .unwrap();
    assert_eq!(a.telemetry(h).unwrap().segments, 64);
    run(&mut a, h);
    let got = read(&mem, B, 128);
    for k in 0..64 {
        assert_eq!(got[2 * k], want[2 * k], "byte {k}");
    }
    // ... and no second one, not even of one segment.
    assert_eq!(
        a.prepare(XferOp::Write, &spaced(A, 1), &spaced(B, 1), "t", None),
        Err(full("segments", 64, "segments"))
    );
    a.release(h).unwrap();
    // 65 never fit.
    assert_eq!(
        a.prepare(XferOp::Write, &spaced(A, 65), &spaced(B, 65), "t", None),
        Err(full("segments", 64, "segments"))
    );
    // Four transfers fill the transfer table; a fifth is refused.
    let hs: Vec<XferHandle> = (0..4)
        .map(|k| {
            let l = spaced(A + 200 * k, 16);
            let r = spaced(B + 200 * k, 16);
            a.prepare(XferOp::Write, &l, &r, "t", None).unwrap()
        })
        .collect();
    assert_eq!(
        a.prepare(XferOp::Write, &spaced(A, 1), &spaced(B, 1), "t", None),
        Err(full("transfers", 4, "xfers"))
    );
    for h in hs {
        a.release(h).unwrap();
    }
    // Every failure gave everything back: the region has no users.
    assert_eq!(a.deregister(A).map(|r| r.len), Ok(LEN));
}

#[test]
fn segments_per_transfer_is_a_setting() {
    let mem = LoopbackMemory::<SIZE>::new(BASE);
    let mut a = Engine::new(
        "a",
        Loopback::new(&mem, 1),
        EngineConfig::default().with_segments_per_xfer(10),
        Storage::owned(&CAPS),
    )
    .unwrap();
    let t = {
        let mut t = engine(&mem, "t", 2, &CAPS);
        t.register(Region::dram(B, LEN)).unwrap();
        t
    };
    a.register(Region::dram(A, LEN)).unwrap();
    load(&mut a, &t);
    let h = a
        .prepare(XferOp::Write, &spaced(A, 10), &spaced(B, 10), "t", None)
        .unwrap();
    a.release(h).unwrap();
    assert_eq!(
        a.prepare(XferOp::Write, &spaced(A, 11), &spaced(B, 11), "t", None),
        Err(full("segments per transfer", 10, "segments_per_xfer"))
    );
    // Coalesced neighbours count once: 100 contiguous bytes are 1 segment.
    let l: Vec<Desc> = (0..100).map(|k| Desc::new(A + k, 1)).collect();
    let r: Vec<Desc> = (0..100).map(|k| Desc::new(B + k, 1)).collect();
    let h = a.prepare(XferOp::Write, &l, &r, "t", None).unwrap();
    assert_eq!(a.telemetry(h).unwrap().segments, 1);
}

#[test]
fn prepared_entries_fill_exactly_and_are_compacted() {
    let mem = LoopbackMemory::<SIZE>::new(BASE);
    let (mut a, _t) = pair(&mem);
    let first = a.prep_local(&spaced(A, 10)).unwrap();
    let middle = a.prep_local(&spaced(A, 20)).unwrap();
    let last = a.prep_remote("t", &spaced(B, 10)).unwrap();
    // 40 entries in use: the table is full, and so is the list table.
    assert_eq!(
        a.prep_local(&spaced(A, 1)),
        Err(full("prepared lists", 3, "prepared_lists"))
    );
    a.release_local(first).unwrap();
    assert_eq!(
        a.prep_local(&spaced(A, 11)),
        Err(full("prepared list entries", 40, "prepared_entries"))
    );
    // 10 fit only where `first` was: compaction moves the others down.
    a.release_local(middle).unwrap();
    let moved = a.prep_local(&spaced(A + 1, 30)).unwrap();
    // The entries after the move still name the right bytes.
    let want = fill(&mem, A, 64, 9);
    let idx: Vec<u32> = (0..10).collect();
    let h = a
        .make_xfer(XferOp::Write, moved, &idx, last, &idx, None)
        .unwrap();
    run(&mut a, h);
    let got = read(&mem, B, 20);
    for k in 0..10 {
        assert_eq!(got[2 * k], want[1 + 2 * k], "entry {k}");
    }
}

#[test]
fn notifications_fill_exactly() {
    let mem = LoopbackMemory::<SIZE>::new(BASE);
    let (mut a, mut t) = pair(&mem);
    let one = [Desc::new(A, 8)];
    let rone = [Desc::new(B, 8)];
    let h1 = a
        .prepare(XferOp::Write, &one, &rone, "t", Some(b"first"))
        .unwrap();
    let h2 = a
        .prepare(XferOp::Write, &one, &rone, "t", Some(b"second"))
        .unwrap();
    assert_eq!(
        a.prepare(XferOp::Write, &one, &rone, "t", Some(b"third")),
        Err(full("notifications", 2, "notifications"))
    );
    // A request without one still fits.
    let plain = a.prepare(XferOp::Write, &one, &rone, "t", None).unwrap();
    // The slot size bounds the frame: 1 + "a" + 30 bytes = 32.
    a.release(h2).unwrap();
    assert_eq!(
        a.prepare(XferOp::Write, &one, &rone, "t", Some(&[7u8; 31]))
            .map(|_| ()),
        Err(Error::NotificationTooLong { len: 31, max: 30 })
    );
    let h2 = a
        .prepare(XferOp::Write, &one, &rone, "t", Some(&[7u8; 30]))
        .unwrap();
    for h in [h1, h2, plain] {
        run(&mut a, h);
    }
    let mut buf = [0u8; 64];
    let mut got = Vec::new();
    while let Some(n) = t.poll_notification(&mut buf) {
        let n = n.unwrap();
        got.push(buf[..n.len].to_vec());
    }
    assert_eq!(got, [b"first".to_vec(), vec![7u8; 30]]);
}

#[test]
fn strided_lists_move_the_right_blocks() {
    let mem = LoopbackMemory::<SIZE>::new(BASE);
    let (mut a, _t) = pair(&mem);
    // 60 blocks of 24 bytes, 40 apart, on both sides: no per-entry
    // memory, so more entries than the 40-entry table.
    let ls = Strided::new(A, 24, 40, 60);
    let rs = Strided::new(B, 24, 40, 60);
    let pl = a.prep_local_list(ls.into()).unwrap();
    let pr = a.prep_remote_list("t", rs.into()).unwrap();
    let want = fill(&mem, A, 2400, 3);
    // Blocks in reverse on the remote side.
    let idx: Vec<u32> = (0..60).collect();
    let rev: Vec<u32> = (0..60).rev().collect();
    let h = a
        .make_xfer(XferOp::Write, pl, &idx, pr, &rev, None)
        .unwrap();
    run(&mut a, h);
    let got = read(&mem, B, 2400);
    for k in 0..60usize {
        let (l, r) = (k * 40, (59 - k) * 40);
        assert_eq!(got[r..r + 24], want[l..l + 24], "block {k}");
    }
    a.release(h).unwrap();
    // An index past the strided list names side, pair and length.
    assert_eq!(
        a.make_xfer(XferOp::Write, pl, &[3, 60], pr, &[0, 1], None),
        Err(Error::IndexOutOfRange {
            side: Side::Local,
            index: 1,
            value: 60,
            len: 60
        })
    );
    // A one-shot strided READ back into the other half of A.
    let back = Strided::new(A + 0x2000, 24, 40, 60);
    let h = a
        .prepare_lists(XferOp::Read, back.into(), rs.into(), "t", None)
        .unwrap();
    run(&mut a, h);
    let again = read(&mem, A + 0x2000, 2400);
    for k in 0..60usize {
        let at = k * 40;
        assert_eq!(again[at..at + 24], got[at..at + 24], "read block {k}");
    }
}

#[test]
fn strided_lists_are_validated_block_by_block() {
    let mem = LoopbackMemory::<SIZE>::new(BASE);
    let (mut a, _t) = pair(&mem);
    // Block 5 of 0x1000-byte stride leaves the 0x4000-byte region.
    let s = Strided::new(A, 16, 0x1000, 6);
    assert_eq!(
        a.prep_local_list(s.into()),
        Err(Error::InvalidDesc {
            side: Side::Local,
            index: 4,
            addr: A + 0x4000,
            len: 16,
            reason: DescError::NotRegistered
        })
    );
    // A stride that overflows the address space at block 2.
    let s = Strided::new(B, 16, u64::MAX / 2, 3);
    assert!(matches!(
        a.prep_remote_list("t", s.into()),
        Err(Error::InvalidDesc {
            side: Side::Remote,
            index: 1,
            ..
        })
    ));
    // A strided list across two regions is kept entry by entry (and so
    // needs room in the entry table).
    a.register(Region::dram(A + LEN, LEN)).unwrap();
    let across = Strided::new(A + LEN - 64, 16, 32, 4);
    let pl = a.prep_local_list(across.into()).unwrap();
    let wide = Strided::new(A, 1, 2, 41);
    assert_eq!(
        a.prep_local_list(DescList::Explicit(&spaced(A, 41)))
            .map(|_| ()),
        Err(full("prepared list entries", 40, "prepared_entries"))
    );
    // The same 41 blocks as a strided list in one region fit.
    let pl2 = a.prep_local_list(wide.into()).unwrap();
    a.release_local(pl).unwrap();
    a.release_local(pl2).unwrap();
    // Counts must match, as for explicit lists.
    assert_eq!(
        a.prepare_lists(
            XferOp::Write,
            Strided::new(A, 8, 8, 3).into(),
            Strided::new(B, 8, 8, 2).into(),
            "t",
            None
        ),
        Err(Error::CountMismatch {
            local: 3,
            remote: 2
        })
    );
}
