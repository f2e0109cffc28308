//! The core's own cost on the hot path, over the loopback transport, for a
//! request of 128 descriptors (64-byte blocks; every other block, so that
//! coalescing cannot shortcut the work, unless named "contiguous").

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use kvxfer_core::desc::{self, SegRec};
use kvxfer_core::registry::Registry;
use kvxfer_core::storage::RegionSlot;
use kvxfer_core::transport::loopback::{Loopback, LoopbackMemory};
use kvxfer_core::{Capacities, Desc, Engine, EngineConfig, Instant, Region, Storage, XferOp};

const BASE: u64 = 0x100_0000;
const SIZE: usize = 1 << 23;
const BLOCK: u64 = 64;
const N: usize = 128;
static MEM: LoopbackMemory<SIZE> = LoopbackMemory::new(BASE);

type Eng = Engine<'static, Loopback<'static, SIZE>>;

const CAPS: Capacities = Capacities {
    regions: 8,
    peers: 4,
    remote_regions: 16,
    xfers: 8,
    segments: 1 << 14,
    segments_per_chunk: 256,
    prepared_lists: 4,
    prepared_entries: 1 << 14,
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

fn bench(c: &mut Criterion) {
    let lb = BASE;
    let rb = BASE + 0x10000;
    let mut a = engine("initiator", 1);
    let mut b = engine("target", 2);
    a.register(Region::dram(lb, 2 * N as u64 * BLOCK)).unwrap();
    b.register(Region::dram(rb, 2 * N as u64 * BLOCK)).unwrap();
    let mut md = [0u8; 512];
    let n = b.local_metadata(&mut md).unwrap();
    a.load_remote(&md[..n]).unwrap();
    let local: Vec<Desc> = (0..N)
        .map(|k| Desc::new(lb + 2 * k as u64 * BLOCK, BLOCK))
        .collect();
    let remote: Vec<Desc> = (0..N)
        .map(|k| Desc::new(rb + 2 * k as u64 * BLOCK, BLOCK))
        .collect();
    let contiguous_l: Vec<Desc> = (0..N)
        .map(|k| Desc::new(lb + k as u64 * BLOCK, BLOCK))
        .collect();
    let contiguous_r: Vec<Desc> = (0..N)
        .map(|k| Desc::new(rb + k as u64 * BLOCK, BLOCK))
        .collect();

    let mut slots: Vec<RegionSlot<()>> = (0..8).map(|_| RegionSlot::EMPTY).collect();
    let mut registry: Registry<'_, ()> = Registry::new(&mut slots[..]);
    registry
        .insert(Region::dram(lb, 2 * N as u64 * BLOCK), ())
        .unwrap();
    let remote_regions = [Region::dram(rb, 2 * N as u64 * BLOCK)];
    let mut segs = vec![SegRec::EMPTY; 256];
    c.bench_function("resolve+coalesce 128 descs", |bench| {
        bench.iter(|| {
            let mut n = 0;
            for (k, (l, r)) in local.iter().zip(&remote).enumerate() {
                let l = desc::resolve_local(&registry, k, l).unwrap();
                let r = desc::resolve_remote(&remote_regions, k, r).unwrap();
                let seg = desc::pair(k, &l, &r).unwrap();
                desc::push_segment(&mut segs, &mut n, seg, true).unwrap();
            }
            black_box(n)
        })
    });

    c.bench_function("prepare+release 128 descs", |bench| {
        bench.iter(|| {
            let h = a
                .prepare(XferOp::Write, &local, &remote, "target", None)
                .unwrap();
            a.release(black_box(h)).unwrap();
        })
    });

    let pl = a.prep_local(&local).unwrap();
    let pr = a.prep_remote("target", &remote).unwrap();
    let idx: Vec<u32> = (0..N as u32).collect();
    c.bench_function("make_xfer+release 128 prepared descs", |bench| {
        bench.iter(|| {
            let h = a
                .make_xfer(XferOp::Write, pl, &idx, pr, &idx, None)
                .unwrap();
            a.release(black_box(h)).unwrap();
        })
    });

    let h = a
        .prepare(XferOp::Write, &local, &remote, "target", None)
        .unwrap();
    let mut t = 0u64;
    c.bench_function("post+poll 128 segments (8 KiB moved)", |bench| {
        bench.iter(|| {
            t += 1;
            a.post(h, Instant::from_nanos(t)).unwrap();
            while a.poll(Instant::from_nanos(t)) == 0 {}
        })
    });
    a.release(h).unwrap();

    c.bench_function(
        "full request: make_xfer+post+poll+release 128 descs",
        |bench| {
            bench.iter(|| {
                t += 1;
                let h = a
                    .make_xfer(XferOp::Write, pl, &idx, pr, &idx, None)
                    .unwrap();
                a.post(h, Instant::from_nanos(t)).unwrap();
                while a.poll(Instant::from_nanos(t)) == 0 {}
                a.release(h).unwrap();
            })
        },
    );

    c.bench_function(
        "full request, contiguous: prepare+post+poll+release 128 descs",
        |bench| {
            bench.iter(|| {
                t += 1;
                let h = a
                    .prepare(XferOp::Write, &contiguous_l, &contiguous_r, "target", None)
                    .unwrap();
                a.post(h, Instant::from_nanos(t)).unwrap();
                while a.poll(Instant::from_nanos(t)) == 0 {}
                a.release(h).unwrap();
            })
        },
    );
}

/// Entries of a large prepared list: 4 Mi.
const HUGE: usize = 1 << 22;

/// KV-cache-sized lists: 16,384-entry requests made from prepared lists,
/// and a prepared list of 4 Mi entries.
fn bench_scale(c: &mut Criterion) {
    const BIG: usize = 16_384;
    const STRIDE: u64 = 2 * BLOCK;
    let caps = Capacities {
        segments: 1 << 16,
        prepared_entries: (HUGE + 2 * BIG) as u32,
        ..CAPS
    };
    let make = |name: &str, id| {
        let storage = Storage::owned(&caps);
        Engine::new(
            name,
            Loopback::new(&MEM, id),
            EngineConfig::default(),
            storage,
        )
        .unwrap()
    };
    let (lb, rb) = (BASE, BASE + SIZE as u64 / 2);
    let mut a: Eng = make("big-initiator", 3);
    let mut b: Eng = make("big-target", 4);
    a.register(Region::dram(lb, SIZE as u64 / 2)).unwrap();
    b.register(Region::dram(rb, SIZE as u64 / 2)).unwrap();
    let mut md = [0u8; 512];
    let n = b.local_metadata(&mut md).unwrap();
    a.load_remote(&md[..n]).unwrap();
    let local: Vec<Desc> = (0..BIG as u64)
        .map(|k| Desc::new(lb + k * STRIDE, BLOCK))
        .collect();
    let remote: Vec<Desc> = (0..BIG as u64)
        .map(|k| Desc::new(rb + k * STRIDE, BLOCK))
        .collect();
    c.bench_function("prep_local+release 16384 descs", |bench| {
        bench.iter(|| {
            let pl = a.prep_local(&local).unwrap();
            a.release_local(black_box(pl)).unwrap();
        })
    });
    let pl = a.prep_local(&local).unwrap();
    let pr = a.prep_remote("big-target", &remote).unwrap();
    let idx: Vec<u32> = (0..BIG as u32).collect();
    c.bench_function("make_xfer+release 16384 prepared descs", |bench| {
        bench.iter(|| {
            let h = a
                .make_xfer(XferOp::Write, pl, &idx, pr, &idx, None)
                .unwrap();
            a.release(black_box(h)).unwrap();
        })
    });
    let huge: Vec<Desc> = (0..HUGE as u64).map(|k| Desc::new(lb + k, 1)).collect();
    let mut group = c.benchmark_group("huge");
    group.sample_size(10);
    group.bench_function("prep_local+release 4 Mi descs", |bench| {
        bench.iter(|| {
            let pl = a.prep_local(&huge).unwrap();
            a.release_local(black_box(pl)).unwrap();
        })
    });
    group.finish();
}

criterion_group!(benches, bench, bench_scale);
criterion_main!(benches);
