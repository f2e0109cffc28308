//! The hot path allocates nothing: prepare → post → poll → release, over
//! the loopback transport, counted by a global allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use kvxfer_core::transport::loopback::{Loopback, LoopbackMemory};
use kvxfer_core::{
    Capacities, Desc, Engine, EngineConfig, Instant, Region, Storage, Strided, XferOp, XferState,
};

struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static COUNT: Cell<u64> = const { Cell::new(0) };
}

fn note() {
    // `try_with`: the allocator may run while thread locals are torn down.
    let _ = COUNTING.try_with(|on| {
        if on.get() {
            let _ = COUNT.try_with(|c| c.set(c.get() + 1));
        }
    });
}

// SAFETY: forwards every call unchanged to the system allocator; the
// bookkeeping touches only const-initialised thread locals, which never
// allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note();
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note();
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const BASE: u64 = 0x100_0000;
const SIZE: usize = 1 << 23;
const BLOCK: u64 = 64;
const BLOCKS: usize = 128;
static MEM: LoopbackMemory<SIZE> = LoopbackMemory::new(BASE);

type Lb = Loopback<'static, SIZE>;
type Eng = Engine<'static, Lb>;

const CAPS: Capacities = Capacities {
    regions: 8,
    peers: 4,
    remote_regions: 16,
    xfers: 8,
    segments: 1 << 16,
    segments_per_chunk: 256,
    prepared_lists: 8,
    prepared_entries: 1 << 16,
    notifications: 8,
    notification_len: 256,
};

fn engine(name: &str, id: u32) -> Eng {
    Engine::new(
        name,
        Loopback::new(&MEM, id),
        EngineConfig::default(),
        Storage::owned(&CAPS),
    )
    .unwrap()
}

fn counted<R>(f: impl FnOnce() -> R) -> (R, u64) {
    COUNT.with(|c| c.set(0));
    COUNTING.with(|on| on.set(true));
    let r = f();
    COUNTING.with(|on| on.set(false));
    (r, COUNT.with(|c| c.get()))
}

#[test]
fn hot_path_allocates_nothing() {
    let local_base = BASE;
    let remote_base = BASE + 0x10000;
    let mut a = engine("initiator", 1);
    let mut b = engine("target", 2);
    a.register(Region::dram(local_base, BLOCK * BLOCKS as u64))
        .unwrap();
    b.register(Region::dram(remote_base, BLOCK * BLOCKS as u64))
        .unwrap();
    let mut md = [0u8; 512];
    let n = b.local_metadata(&mut md).unwrap();
    a.load_remote(&md[..n]).unwrap();

    // Every other block, so that coalescing cannot merge them.
    let local: Vec<Desc> = (0..BLOCKS / 2)
        .map(|k| Desc::new(local_base + 2 * k as u64 * BLOCK, BLOCK))
        .collect();
    let remote: Vec<Desc> = (0..BLOCKS / 2)
        .map(|k| Desc::new(remote_base + 2 * k as u64 * BLOCK, BLOCK))
        .collect();
    let all_local: Vec<Desc> = (0..BLOCKS)
        .map(|k| Desc::new(local_base + k as u64 * BLOCK, BLOCK))
        .collect();
    let all_remote: Vec<Desc> = (0..BLOCKS)
        .map(|k| Desc::new(remote_base + k as u64 * BLOCK, BLOCK))
        .collect();
    let idx: Vec<u32> = (0..BLOCKS as u32).rev().collect();
    let bytes: Vec<u8> = (0..BLOCK as usize * BLOCKS)
        .map(|i| (i % 251) as u8)
        .collect();
    MEM.write(local_base, &bytes).unwrap();
    let mut note_buf = [0u8; 128];

    let (_, allocs) = counted(|| {
        let pl = a.prep_local(&all_local).unwrap();
        let pr = a.prep_remote("target", &all_remote).unwrap();
        for i in 0..1000u64 {
            let h = a
                .prepare(
                    XferOp::Write,
                    &local,
                    &remote,
                    "target",
                    Some(b"blocks ready"),
                )
                .unwrap();
            assert_eq!(a.post(h, Instant::from_nanos(i)), Ok(XferState::InProgress));
            while a.poll(Instant::from_nanos(i + 1)) == 0 {}
            assert_eq!(a.state(h), Ok(XferState::Done));
            a.release(h).unwrap();
            let n = b.poll_notification(&mut note_buf).unwrap().unwrap();
            assert_eq!(n.len, 12);

            let h = a
                .make_xfer(XferOp::Write, pl, &idx, pr, &idx, None)
                .unwrap();
            a.post(h, Instant::from_nanos(i)).unwrap();
            while a.poll(Instant::from_nanos(i + 1)) == 0 {}
            assert_eq!(a.state(h), Ok(XferState::Done));
            a.release(h).unwrap();
        }
        a.release_local(pl).unwrap();
        a.release_remote(pr).unwrap();
    });
    assert_eq!(allocs, 0, "the hot path allocated {allocs} times");
    let mut out = vec![0u8; bytes.len()];
    MEM.read(remote_base, &mut out).unwrap();
    assert_eq!(out, bytes);

    // The counter works: an allocation in a counted section is seen.
    let (v, allocs) = counted(|| vec![1u8; 10]);
    assert_eq!((v.len(), allocs), (10, 1));
}

/// A KV-cache-sized request: 16,384 blocks of 64 bytes at a 128-byte
/// stride, made from explicit and from strided prepared lists and as a
/// one-shot strided request, posted and completed without allocating.
#[test]
fn a_16384_entry_request_allocates_nothing() {
    const N: u32 = 16_384;
    const STRIDE: u64 = 2 * BLOCK;
    let local_base = BASE + 0x100000;
    let remote_base = local_base + N as u64 * STRIDE;
    let mut a = engine("big-initiator", 3);
    let mut b = engine("big-target", 4);
    a.register(Region::dram(local_base, N as u64 * STRIDE))
        .unwrap();
    b.register(Region::dram(remote_base, N as u64 * STRIDE))
        .unwrap();
    let mut md = [0u8; 512];
    let n = b.local_metadata(&mut md).unwrap();
    a.load_remote(&md[..n]).unwrap();

    let explicit: Vec<Desc> = (0..N as u64)
        .map(|k| Desc::new(local_base + k * STRIDE, BLOCK))
        .collect();
    let local_strided = Strided::new(local_base, BLOCK, STRIDE, N);
    let remote_strided = Strided::new(remote_base, BLOCK, STRIDE, N);
    let idx: Vec<u32> = (0..N).collect();
    let rev: Vec<u32> = (0..N).rev().collect();
    let fill = |seed: u8| {
        let bytes: Vec<u8> = (0..N as usize * STRIDE as usize)
            .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed))
            .collect();
        MEM.write(local_base, &bytes).unwrap();
        bytes
    };
    let check = |bytes: &[u8], rounds: &str| {
        let mut out = vec![0u8; bytes.len()];
        MEM.read(remote_base, &mut out).unwrap();
        for k in 0..N as usize {
            let at = k * STRIDE as usize;
            let block = at..at + BLOCK as usize;
            assert_eq!(out[block.clone()], bytes[block], "{rounds}: block {k}");
        }
    };

    let pl_explicit = a.prep_local(&explicit).unwrap();
    let pl = a.prep_local_list(local_strided.into()).unwrap();
    let pr = a
        .prep_remote_list("big-target", remote_strided.into())
        .unwrap();
    for (round, (local, local_idx)) in [(pl_explicit, &idx), (pl, &idx), (pl, &rev)]
        .into_iter()
        .enumerate()
    {
        let remote_idx = if local_idx[0] == 0 { &idx } else { &rev };
        let bytes = fill(round as u8);
        let (_, allocs) = counted(|| {
            let h = a
                .make_xfer(
                    XferOp::Write,
                    local,
                    local_idx,
                    pr,
                    remote_idx,
                    Some(b"layer 0"),
                )
                .unwrap();
            assert_eq!(a.telemetry(h).unwrap().segments, N);
            a.post(h, Instant::from_nanos(1)).unwrap();
            while a.poll(Instant::from_nanos(2)) == 0 {}
            assert_eq!(a.state(h), Ok(XferState::Done));
            a.release(h).unwrap();
        });
        assert_eq!(allocs, 0, "round {round} allocated {allocs} times");
        check(&bytes, "prepared");
    }

    let bytes = fill(7);
    let (_, allocs) = counted(|| {
        let h = a
            .prepare_lists(
                XferOp::Write,
                local_strided.into(),
                remote_strided.into(),
                "big-target",
                None,
            )
            .unwrap();
        a.post(h, Instant::from_nanos(3)).unwrap();
        while a.poll(Instant::from_nanos(4)) == 0 {}
        assert_eq!(a.state(h), Ok(XferState::Done));
        a.release(h).unwrap();
    });
    assert_eq!(
        allocs, 0,
        "the one-shot strided request allocated {allocs} times"
    );
    check(&bytes, "one-shot");
}
