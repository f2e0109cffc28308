//! The core's own cost on the hot path, over the loopback transport, for a
//! request of 128 descriptors (64-byte blocks; every other block, so that
//! coalescing cannot shortcut the work, unless named "contiguous").

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use kvxfer_core::desc::{self, SegRec};
use kvxfer_core::registry::Registry;
use kvxfer_core::transport::loopback::{Loopback, LoopbackMemory};
use kvxfer_core::{Desc, Engine, EngineConfig, Instant, Region, XferOp};

const BASE: u64 = 0x100_0000;
const SIZE: usize = 1 << 16;
const BLOCK: u64 = 64;
const N: usize = 128;
static MEM: LoopbackMemory<SIZE> = LoopbackMemory::new(BASE);

type Eng = Engine<Loopback<'static, SIZE>, 8, 4, 8, 256, 256, 4>;

fn bench(c: &mut Criterion) {
    let lb = BASE;
    let rb = BASE + SIZE as u64 / 2;
    let mut a =
        Box::new(Eng::new("initiator", Loopback::new(&MEM, 1), EngineConfig::default()).unwrap());
    let mut b =
        Box::new(Eng::new("target", Loopback::new(&MEM, 2), EngineConfig::default()).unwrap());
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

    let mut registry: Registry<(), 8> = Registry::new();
    registry
        .insert(Region::dram(lb, 2 * N as u64 * BLOCK), ())
        .unwrap();
    let remote_regions = [Region::dram(rb, 2 * N as u64 * BLOCK)];
    c.bench_function("resolve+coalesce 128 descs", |bench| {
        bench.iter(|| {
            let mut segs: heapless::Vec<SegRec, 256> = heapless::Vec::new();
            for (k, (l, r)) in local.iter().zip(&remote).enumerate() {
                let l = desc::resolve_local(&registry, k, l).unwrap();
                let r = desc::resolve_remote(&remote_regions, k, r).unwrap();
                desc::push_segment(&mut segs, desc::pair(k, &l, &r).unwrap(), true).unwrap();
            }
            black_box(segs.len())
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

criterion_group!(benches, bench);
criterion_main!(benches);
