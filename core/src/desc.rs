//! Descriptor validation, resolution and coalescing.
//!
//! A descriptor is resolved against a sorted table of regions (the local
//! [`Registry`] or a remote agent's regions) by
//! bisection. Resolved pairs become [`SegRec`]s: compact records naming the
//! local region by registry slot and the remote region by index, which the
//! engine turns into the transport's [`Segment`](crate::transport::Segment)s
//! at post time. Neighbours contiguous on both sides and inside the same
//! pair of regions are merged into one record when coalescing is on.

use crate::error::{DescError, Error, Side};
use crate::mem::{Desc, Region};
use crate::registry::{bisect, Registry};

/// One resolved piece of a transfer (32 bytes).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct SegRec {
    /// Registry slot of the local region.
    pub local: u16,
    /// Index of the remote region in the peer's region list.
    pub remote: u16,
    /// Local address.
    pub local_addr: u64,
    /// Remote address.
    pub remote_addr: u64,
    /// Bytes.
    pub len: u64,
}

impl SegRec {
    /// An empty record, for storage.
    pub const EMPTY: SegRec = SegRec {
        local: 0,
        remote: 0,
        local_addr: 0,
        remote_addr: 0,
        len: 0,
    };

    /// Merges `next` into `self` when the two are contiguous on both sides
    /// inside the same regions; returns whether it did.
    pub fn merge(&mut self, next: &SegRec) -> bool {
        if self.local == next.local
            && self.remote == next.remote
            && self.local_addr.checked_add(self.len) == Some(next.local_addr)
            && self.remote_addr.checked_add(self.len) == Some(next.remote_addr)
        {
            if let Some(len) = self.len.checked_add(next.len) {
                self.len = len;
                return true;
            }
        }
        false
    }
}

/// One descriptor resolved against one side's regions (24 bytes: the
/// memory of one explicit prepared entry).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Resolved {
    /// Registry slot (local) or region index (remote).
    pub region: u16,
    /// First byte.
    pub addr: u64,
    /// Length.
    pub len: u64,
}

impl Resolved {
    /// An empty entry, for storage.
    pub const EMPTY: Resolved = Resolved {
        region: 0,
        addr: 0,
        len: 0,
    };
}

/// `count` blocks of `len` bytes, `stride` bytes apart from `addr`, on
/// device `dev`: one layer's blocks of a KV cache, without a descriptor
/// per block.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Strided {
    /// First byte of block 0.
    pub addr: u64,
    /// Bytes per block.
    pub len: u64,
    /// Distance between the starts of neighbouring blocks.
    pub stride: u64,
    /// Blocks.
    pub count: u32,
    /// Device (0 for host memory).
    pub dev: u32,
}

impl Strided {
    /// Blocks in host memory.
    pub const fn new(addr: u64, len: u64, stride: u64, count: u32) -> Strided {
        Strided {
            addr,
            len,
            stride,
            count,
            dev: 0,
        }
    }

    /// Block `i` (its address saturates instead of overflowing, so that
    /// validation reports it).
    pub fn get(&self, i: u32) -> Desc {
        let addr = self
            .stride
            .checked_mul(i as u64)
            .and_then(|o| self.addr.checked_add(o))
            .unwrap_or(u64::MAX);
        Desc::on_dev(addr, self.len, self.dev)
    }

    /// Bytes from the first block's start to the last block's end, if
    /// that does not overflow; `None` for no blocks.
    pub fn span(&self) -> Option<u64> {
        let last = self.count.checked_sub(1)? as u64;
        self.stride.checked_mul(last)?.checked_add(self.len)
    }
}

/// A descriptor list: explicit, or strided.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum DescList<'a> {
    /// One descriptor per entry.
    Explicit(&'a [Desc]),
    /// Evenly spaced blocks.
    Strided(Strided),
}

impl DescList<'_> {
    /// Entries in the list.
    pub fn len(&self) -> usize {
        match self {
            DescList::Explicit(d) => d.len(),
            DescList::Strided(s) => s.count as usize,
        }
    }

    /// Whether the list has no entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Entry `i`, if in range.
    pub fn get(&self, i: usize) -> Option<Desc> {
        match self {
            DescList::Explicit(d) => d.get(i).copied(),
            DescList::Strided(s) => (i < s.count as usize).then(|| s.get(i as u32)),
        }
    }
}

impl<'a> From<&'a [Desc]> for DescList<'a> {
    fn from(d: &'a [Desc]) -> Self {
        DescList::Explicit(d)
    }
}

impl<'a, const N: usize> From<&'a [Desc; N]> for DescList<'a> {
    fn from(d: &'a [Desc; N]) -> Self {
        DescList::Explicit(d)
    }
}

impl From<Strided> for DescList<'_> {
    fn from(s: Strided) -> Self {
        DescList::Strided(s)
    }
}

/// Checks what `desc` (number `index` of the `side` list) must be before
/// any lookup: not empty, not past the end of the address space.
fn check_span(side: Side, index: usize, desc: &Desc) -> Result<(), Error> {
    if desc.len == 0 {
        return Err(invalid(side, index, desc, DescError::ZeroLength));
    }
    if desc.addr.checked_add(desc.len).is_none() {
        return Err(invalid(side, index, desc, DescError::AddressOverflow));
    }
    Ok(())
}

/// Checks that `region`, found for `desc`'s first byte, holds the whole of
/// `desc` on `desc`'s device.
fn check_fits(side: Side, index: usize, desc: &Desc, region: Region) -> Result<(), Error> {
    if !region.contains(desc.addr, desc.len) {
        return Err(invalid(
            side,
            index,
            desc,
            DescError::OutsideRegistration {
                region_addr: region.addr,
                region_len: region.len,
            },
        ));
    }
    if region.dev != desc.dev {
        return Err(invalid(
            side,
            index,
            desc,
            DescError::DeviceMismatch {
                region_dev: region.dev,
            },
        ));
    }
    Ok(())
}

/// The error for `desc`, number `index` of the `side` list, and its `reason`.
fn invalid(side: Side, index: usize, desc: &Desc, reason: DescError) -> Error {
    Error::InvalidDesc {
        side,
        index: index as u32,
        addr: desc.addr,
        len: desc.len,
        reason,
    }
}

/// Checks `desc` (number `index` of the `side` list) and finds the region
/// that holds it among `count` regions sorted by address, given by `at`.
/// Returns the region's position in that order.
pub fn resolve_sorted(
    side: Side,
    index: usize,
    desc: &Desc,
    count: usize,
    at: impl Fn(usize) -> Region,
) -> Result<usize, Error> {
    check_span(side, index, desc)?;
    let unregistered = || invalid(side, index, desc, DescError::NotRegistered);
    let pos = bisect(count, desc.addr, |i| at(i).addr).ok_or_else(unregistered)?;
    let region = at(pos);
    if desc.addr - region.addr >= region.len {
        return Err(unregistered());
    }
    check_fits(side, index, desc, region)?;
    Ok(pos)
}

/// Resolves a local descriptor against `registry`; returns the region's slot.
pub fn resolve_local<R>(
    registry: &Registry<'_, R>,
    index: usize,
    desc: &Desc,
) -> Result<Resolved, Error> {
    // Same rules as `resolve_sorted`, through the registry's own lookup.
    check_span(Side::Local, index, desc)?;
    let unregistered = || invalid(Side::Local, index, desc, DescError::NotRegistered);
    let slot = registry.find_addr(desc.addr).ok_or_else(unregistered)?;
    let region = registry
        .get(slot)
        .map(|e| e.region)
        .ok_or_else(unregistered)?;
    check_fits(Side::Local, index, desc, region)?;
    Ok(Resolved {
        region: slot,
        addr: desc.addr,
        len: desc.len,
    })
}

/// Resolves a remote descriptor against a peer's sorted `regions`.
pub fn resolve_remote(regions: &[Region], index: usize, desc: &Desc) -> Result<Resolved, Error> {
    let pos = resolve_sorted(Side::Remote, index, desc, regions.len(), |i| regions[i])?;
    Ok(Resolved {
        region: pos as u16,
        addr: desc.addr,
        len: desc.len,
    })
}

/// Checks that the lists have the same length.
pub fn check_counts(local: usize, remote: usize) -> Result<(), Error> {
    if local != remote {
        return Err(Error::CountMismatch {
            local: local as u32,
            remote: remote as u32,
        });
    }
    Ok(())
}

/// Pairs a resolved local and remote descriptor (number `index`) into a
/// segment; their lengths must agree.
pub fn pair(index: usize, local: &Resolved, remote: &Resolved) -> Result<SegRec, Error> {
    if local.len != remote.len {
        return Err(Error::LengthMismatch {
            index: index as u32,
            local: local.len,
            remote: remote.len,
        });
    }
    Ok(SegRec {
        local: local.region,
        remote: remote.region,
        local_addr: local.addr,
        remote_addr: remote.addr,
        len: local.len,
    })
}

/// Appends `seg` to the first `*len` records of `segs`, merging it into
/// the last one when `coalesce` is on and [`SegRec::merge`] allows.
pub fn push_segment(
    segs: &mut [SegRec],
    len: &mut usize,
    seg: SegRec,
    coalesce: bool,
) -> Result<(), Error> {
    if coalesce {
        if let Some(last) = len.checked_sub(1).and_then(|i| segs.get_mut(i)) {
            if last.merge(&seg) {
                return Ok(());
            }
        }
    }
    let cap = segs.len();
    let slot = segs
        .get_mut(*len)
        .ok_or(Error::capacity("segments", cap, "segments"))?;
    *slot = seg;
    *len += 1;
    Ok(())
}

/// Fills `segs` from `pairs` through [`push_segment`]; returns the records
/// written and the bytes in all, or the first error.
pub fn fill_segments(
    segs: &mut [SegRec],
    pairs: impl Iterator<Item = Result<SegRec, Error>>,
    coalesce: bool,
) -> Result<(usize, u64), Error> {
    let (mut len, mut bytes) = (0usize, 0u64);
    for seg in pairs {
        let seg = seg?;
        bytes = bytes.saturating_add(seg.len);
        push_segment(segs, &mut len, seg, coalesce)?;
    }
    Ok((len, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    extern crate std;
    use std::vec::Vec;

    fn registry() -> Registry<'static, ()> {
        let slots = (0..4)
            .map(|_| crate::storage::RegionSlot::EMPTY)
            .collect::<Vec<_>>();
        let mut r = Registry::new(std::boxed::Box::leak(slots.into_boxed_slice()));
        r.insert(Region::dram(0x1000, 0x100), ()).unwrap();
        r.insert(Region::vram(0x2000, 0x100, 3), ()).unwrap();
        r
    }

    #[test]
    fn every_desc_error_names_side_index_and_reason() {
        let r = registry();
        let err = |index, addr, len, reason| Error::InvalidDesc {
            side: Side::Local,
            index,
            addr,
            len,
            reason,
        };
        assert_eq!(
            resolve_local(&r, 4, &Desc::new(0x1000, 0)),
            Err(err(4, 0x1000, 0, DescError::ZeroLength))
        );
        assert_eq!(
            resolve_local(&r, 1, &Desc::new(u64::MAX, 2)),
            Err(err(1, u64::MAX, 2, DescError::AddressOverflow))
        );
        assert_eq!(
            resolve_local(&r, 2, &Desc::new(0x10, 1)),
            Err(err(2, 0x10, 1, DescError::NotRegistered))
        );
        assert_eq!(
            resolve_local(&r, 2, &Desc::new(0x1100, 1)),
            Err(err(2, 0x1100, 1, DescError::NotRegistered))
        );
        assert_eq!(
            resolve_local(&r, 3, &Desc::new(0x10f0, 0x20)),
            Err(err(
                3,
                0x10f0,
                0x20,
                DescError::OutsideRegistration {
                    region_addr: 0x1000,
                    region_len: 0x100
                }
            ))
        );
        assert_eq!(
            resolve_local(&r, 0, &Desc::on_dev(0x2000, 8, 1)),
            Err(err(
                0,
                0x2000,
                8,
                DescError::DeviceMismatch { region_dev: 3 }
            ))
        );
        assert!(resolve_local(&r, 0, &Desc::on_dev(0x2000, 0x100, 3)).is_ok());

        let regions = [Region::dram(0x1000, 0x100), Region::dram(0x3000, 0x10)];
        assert_eq!(
            resolve_remote(&regions, 7, &Desc::new(0x3008, 0x10)),
            Err(Error::InvalidDesc {
                side: Side::Remote,
                index: 7,
                addr: 0x3008,
                len: 0x10,
                reason: DescError::OutsideRegistration {
                    region_addr: 0x3000,
                    region_len: 0x10
                },
            })
        );
        assert_eq!(
            resolve_remote(&regions, 0, &Desc::new(0x3000, 0x10))
                .unwrap()
                .region,
            1
        );
    }

    #[test]
    fn counts_and_lengths_must_match() {
        assert_eq!(
            check_counts(2, 3),
            Err(Error::CountMismatch {
                local: 2,
                remote: 3
            })
        );
        let l = Resolved {
            region: 0,
            addr: 0,
            len: 8,
        };
        let r = Resolved {
            region: 0,
            addr: 0,
            len: 9,
        };
        assert_eq!(
            pair(5, &l, &r),
            Err(Error::LengthMismatch {
                index: 5,
                local: 8,
                remote: 9
            })
        );
    }

    #[test]
    fn coalescing_merges_only_neighbours_in_the_same_regions() {
        let s = |local, remote, la, ra, len| SegRec {
            local,
            remote,
            local_addr: la,
            remote_addr: ra,
            len,
        };
        let mut v = [SegRec::EMPTY; 8];
        let mut n = 0;
        push_segment(&mut v, &mut n, s(0, 0, 0, 100, 10), true).unwrap();
        push_segment(&mut v, &mut n, s(0, 0, 10, 110, 10), true).unwrap(); // merged
        push_segment(&mut v, &mut n, s(0, 0, 20, 130, 10), true).unwrap(); // remote gap
        push_segment(&mut v, &mut n, s(1, 0, 30, 140, 10), true).unwrap(); // other local region
        push_segment(&mut v, &mut n, s(1, 1, 40, 150, 10), true).unwrap(); // other remote region
        assert_eq!(
            &v[..n],
            &[
                s(0, 0, 0, 100, 20),
                s(0, 0, 20, 130, 10),
                s(1, 0, 30, 140, 10),
                s(1, 1, 40, 150, 10)
            ]
        );
        let mut off = [SegRec::EMPTY; 2];
        let mut n = 0;
        push_segment(&mut off, &mut n, s(0, 0, 0, 100, 10), false).unwrap();
        push_segment(&mut off, &mut n, s(0, 0, 10, 110, 10), false).unwrap();
        assert_eq!(
            push_segment(&mut off, &mut n, s(0, 0, 20, 120, 10), false),
            Err(Error::CapacityExceeded {
                what: "segments",
                capacity: 2,
                setting: "segments"
            })
        );
    }

    fn apply(segs: &[SegRec], src: &[u8], dst: &mut [u8]) {
        for s in segs {
            for k in 0..s.len as usize {
                dst[s.remote_addr as usize + k] = src[s.local_addr as usize + k];
            }
        }
    }

    proptest! {
        #[test]
        fn coalesced_list_moves_the_same_bytes(
            pieces in proptest::collection::vec((0u64..3, 0u64..3, 1u64..16, any::<bool>()), 1..40),
        ) {
            // Local region k is [k*256, +256); remote region k likewise. Each
            // piece either continues the previous one on both sides or jumps.
            let mut segs = Vec::new();
            let (mut la, mut ra) = (0u64, 0u64);
            for (lr, rr, len, cont) in pieces {
                if !cont || segs.is_empty() {
                    la = lr * 256 + (len * 7) % 64;
                    ra = rr * 256 + (len * 5) % 64;
                }
                if la + len > (la / 256) * 256 + 256 || ra + len > (ra / 256) * 256 + 256 {
                    continue;
                }
                segs.push(SegRec { local: (la / 256) as u16, remote: (ra / 256) as u16, local_addr: la, remote_addr: ra, len });
                la += len;
                ra += len;
            }
            let mut buf = [SegRec::EMPTY; 64];
            let mut n = 0;
            for s in &segs {
                push_segment(&mut buf, &mut n, *s, true).unwrap();
            }
            let merged = &buf[..n];
            prop_assert!(merged.len() <= segs.len());
            let src: Vec<u8> = (0..768u32).map(|i| (i * 31 % 251) as u8).collect();
            let mut a = std::vec![0u8; 768];
            let mut b = std::vec![0u8; 768];
            apply(&segs, &src, &mut a);
            apply(merged, &src, &mut b);
            prop_assert_eq!(a, b);
            let total: u64 = segs.iter().map(|s| s.len).sum();
            prop_assert_eq!(total, merged.iter().map(|s| s.len).sum::<u64>());
        }

        #[test]
        fn registry_lookup_equals_linear_scan(
            regions in proptest::collection::vec((0u64..2000, 1u64..100), 0..16),
            probes in proptest::collection::vec((0u64..2200, 1u64..120), 1..40),
        ) {
            let slots = (0..16).map(|_| crate::storage::RegionSlot::EMPTY).collect::<Vec<_>>();
            let mut reg: Registry<usize> = Registry::new(std::boxed::Box::leak(slots.into_boxed_slice()));
            let mut kept: Vec<Region> = Vec::new();
            for (i, (a, l)) in regions.into_iter().enumerate() {
                let r = Region::dram(a, l);
                let overlaps = kept.iter().any(|k| a < k.addr + k.len && k.addr < a + l);
                let res = reg.insert(r, i);
                prop_assert_eq!(res.is_ok(), !overlaps);
                if !overlaps { kept.push(r); }
            }
            for (a, l) in probes {
                let linear = kept.iter().find(|k| k.contains(a, l)).copied();
                let found = reg.find(a, l).map(|s| reg.get(s).unwrap().region);
                prop_assert_eq!(linear, found);
            }
        }
    }
}
