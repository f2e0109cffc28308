//! Descriptor validation and coalescing: with coalescing on and off, the
//! same request is accepted or refused with the same error, and an accepted
//! one moves the same bytes to the same places.
#![no_main]
// `Error` carries bounded inline texts (the core cannot allocate), so it is
// larger than clippy's default threshold for `Result`'s error.
#![allow(clippy::result_large_err)]

use kvxfer_core::desc::{self, SegRec};
use kvxfer_core::registry::Registry;
use kvxfer_core::storage::RegionSlot;
use kvxfer_core::{Desc, Error, Region};
use libfuzzer_sys::fuzz_target;

const SPACE: usize = 2048;

fn take(data: &mut &[u8]) -> u8 {
    let (first, rest) = data.split_first().unwrap_or((&0, &[]));
    *data = rest;
    *first
}

fn take16(data: &mut &[u8]) -> u64 {
    (take(data) as u64) | ((take(data) as u64) << 8)
}

fn resolve(
    registry: &Registry<'_, ()>,
    remote_regions: &[Region],
    local: &[Desc],
    remote: &[Desc],
    coalesce: bool,
) -> Result<Vec<SegRec>, Error> {
    // The same steps, in the same order, as `Engine::prepare`.
    desc::check_counts(local.len(), remote.len())?;
    let pairs = local.iter().zip(remote).enumerate().map(|(k, (l, r))| {
        let l = desc::resolve_local(registry, k, l)?;
        let r = desc::resolve_remote(remote_regions, k, r)?;
        desc::pair(k, &l, &r)
    });
    let mut segs = vec![SegRec::EMPTY; 64];
    let (n, bytes) = desc::fill_segments(&mut segs, pairs, coalesce)?;
    assert_eq!(bytes, local.iter().map(|d| d.len).sum::<u64>());
    segs.truncate(n);
    Ok(segs)
}

fn apply(segs: &[SegRec], src: &[u8], dst: &mut [u8]) {
    for s in segs {
        let (l, r, n) = (
            s.local_addr as usize,
            s.remote_addr as usize,
            s.len as usize,
        );
        dst[r..r + n].copy_from_slice(&src[l..l + n]);
    }
}

fuzz_target!(|data: &[u8]| {
    let mut data = data;
    // Up to 4 local regions (registered if they do not overlap) and up to 4
    // sorted, disjoint remote regions, all inside [0, SPACE).
    let mut slots: Vec<RegionSlot<()>> = (0..8).map(|_| RegionSlot::EMPTY).collect();
    let mut registry: Registry<'_, ()> = Registry::new(&mut slots[..]);
    for _ in 0..(take(&mut data) % 5) {
        let addr = take16(&mut data) % SPACE as u64;
        let len = (take16(&mut data) % 512).min(SPACE as u64 - addr);
        let _ = registry.insert(
            Region {
                dev: (take(&mut data) % 2) as u32,
                ..Region::dram(addr, len)
            },
            (),
        );
    }
    let mut remote_regions: heapless::Vec<Region, 4> = heapless::Vec::new();
    let mut next = 0u64;
    for _ in 0..(take(&mut data) % 5) {
        let addr = next + take16(&mut data) % 256;
        let len = 1 + take16(&mut data) % 512;
        if addr + len > SPACE as u64 {
            break;
        }
        let _ = remote_regions.push(Region::dram(addr, len));
        next = addr + len;
    }
    let mut local: heapless::Vec<Desc, 64> = heapless::Vec::new();
    let mut remote: heapless::Vec<Desc, 64> = heapless::Vec::new();
    let mut la = take16(&mut data);
    let mut ra = take16(&mut data);
    while data.len() >= 2 && !local.is_full() {
        let mode = take(&mut data);
        let len = (take(&mut data) % 64) as u64;
        if mode & 1 == 0 {
            // Jump elsewhere; otherwise continue contiguously.
            la = take16(&mut data);
            ra = take16(&mut data);
        }
        let rlen = if mode & 0x80 != 0 { len + 1 } else { len };
        let dev = ((mode >> 4) & 1) as u32;
        let _ = local.push(Desc::on_dev(la, len, dev));
        let _ = remote.push(Desc::new(ra, rlen));
        la = la.wrapping_add(len);
        ra = ra.wrapping_add(len);
    }
    if take(&mut data).is_multiple_of(8) {
        remote.pop();
    }
    let merged = resolve(&registry, &remote_regions, &local, &remote, true);
    let plain = resolve(&registry, &remote_regions, &local, &remote, false);
    match (merged, plain) {
        (Ok(merged), Ok(plain)) => {
            assert!(merged.len() <= plain.len());
            assert_eq!(plain.len(), local.len());
            let total: u64 = plain.iter().map(|s| s.len).sum();
            assert_eq!(total, merged.iter().map(|s| s.len).sum::<u64>());
            let src: Vec<u8> = (0..SPACE).map(|i| (i * 131 % 251) as u8).collect();
            let mut a = vec![0u8; SPACE];
            let mut b = vec![0u8; SPACE];
            apply(&plain, &src, &mut a);
            apply(&merged, &src, &mut b);
            assert_eq!(a, b);
            for s in &merged {
                let l = registry.get(s.local).unwrap().region;
                assert!(l.contains(s.local_addr, s.len));
                assert!(remote_regions[s.remote as usize].contains(s.remote_addr, s.len));
            }
        }
        (Err(a), Err(b)) => assert_eq!(a, b),
        (a, b) => panic!("coalescing changed the outcome: {a:?} vs {b:?}"),
    }
});
