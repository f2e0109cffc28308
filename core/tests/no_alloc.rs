//! The hot path allocates nothing: prepare → post → poll → release, over
//! the loopback transport, counted by a global allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use kvxfer_core::transport::loopback::{Loopback, LoopbackMemory};
use kvxfer_core::{Desc, Engine, EngineConfig, Instant, Region, XferOp, XferState};

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
const SIZE: usize = 1 << 16;
const BLOCK: u64 = 64;
const BLOCKS: usize = 128;
static MEM: LoopbackMemory<SIZE> = LoopbackMemory::new(BASE);

type Eng = Engine<Loopback<'static, SIZE>, 8, 4, 8, 256, 256, 4>;

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
    let remote_base = BASE + (SIZE as u64) / 2;
    let mut a = Eng::new("initiator", Loopback::new(&MEM, 1), EngineConfig::default()).unwrap();
    let mut b = Eng::new("target", Loopback::new(&MEM, 2), EngineConfig::default()).unwrap();
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
