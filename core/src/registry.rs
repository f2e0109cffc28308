//! The registry of local regions.
//!
//! Regions are kept in stable slots (a slot index never changes while the
//! region is registered, so transfers can name regions by slot) and in an
//! order array sorted by address, which lookups search by bisection.
//! Regions never overlap. Each region counts its users: the segments of live
//! transfers and the entries of prepared lists that lie in it. A region with
//! users cannot be deregistered.

use crate::error::Error;
use crate::mem::Region;
use crate::storage::{Managed, RegionSlot};

/// One registered region and the transport's handle for it.
#[derive(Debug)]
pub struct Entry<R> {
    /// The region.
    pub region: Region,
    /// The transport's registration.
    pub handle: R,
    users: u32,
}

impl<R> Entry<R> {
    /// How many transfer segments and prepared entries use the region.
    pub fn users(&self) -> u32 {
        self.users
    }
}

/// A sorted table of non-overlapping local regions, in storage the caller
/// provides (its length is the capacity, at most 65,535).
#[derive(Debug)]
pub struct Registry<'a, R> {
    slots: Managed<'a, RegionSlot<R>>,
    /// Regions registered (the length of the address order).
    len: usize,
}

/// Index of the last of `count` sorted regions whose start is `<= addr`.
pub(crate) fn bisect(count: usize, addr: u64, start_of: impl Fn(usize) -> u64) -> Option<usize> {
    let (mut lo, mut hi) = (0usize, count);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if start_of(mid) <= addr {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo.checked_sub(1)
}

impl<'a, R> Registry<'a, R> {
    /// An empty registry over `slots`; capacity `min(slots.len(), 65535)`.
    pub fn new(slots: impl Into<Managed<'a, RegionSlot<R>>>) -> Self {
        let mut slots = slots.into();
        for s in slots.iter_mut() {
            s.entry = None;
        }
        Registry { slots, len: 0 }
    }

    /// Number of registered regions.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no region is registered.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Most regions this registry holds.
    pub fn capacity(&self) -> usize {
        self.slots.len().min(u16::MAX as usize)
    }

    fn order(&self, i: usize) -> u16 {
        self.slots.get(i).map_or(0, |s| s.order)
    }

    /// Checks that `region` could be inserted: it is not empty, does not
    /// overflow, overlaps no registered region, and there is room.
    pub fn check(&self, region: &Region) -> Result<(), Error> {
        let end = match region.end() {
            Some(e) if region.len > 0 => e,
            _ => {
                return Err(Error::InvalidRegion {
                    addr: region.addr,
                    len: region.len,
                })
            }
        };
        // The only candidates for overlap: the last region starting at or
        // before `region.addr`, and the first one starting after it.
        let pos = bisect(self.len, region.addr, |i| self.region_at(i).addr);
        let prev = pos.map(|p| self.region_at(p));
        let next_pos = pos.map_or(0, |p| p + 1);
        let next = (next_pos < self.len).then(|| self.region_at(next_pos));
        for other in [prev, next].into_iter().flatten() {
            let other_end = other.end().unwrap_or(u64::MAX);
            if region.addr < other_end && other.addr < end {
                return Err(Error::OverlappingRegistration {
                    addr: region.addr,
                    len: region.len,
                    existing_addr: other.addr,
                    existing_len: other.len,
                });
            }
        }
        if self.len >= self.capacity() {
            return Err(Error::capacity("registrations", self.capacity(), "regions"));
        }
        Ok(())
    }

    /// Inserts `region` with its transport handle; returns its slot. On
    /// error the handle is given back with the error.
    pub fn insert(&mut self, region: Region, handle: R) -> Result<u16, (Error, R)> {
        if let Err(e) = self.check(&region) {
            return Err((e, handle));
        }
        let cap = self.capacity();
        let Some(slot) = self.slots[..cap].iter().position(|s| s.entry.is_none()) else {
            // Unreachable: `check` saw fewer than `cap` regions.
            return Err((Error::capacity("registrations", cap, "regions"), handle));
        };
        self.slots[slot].entry = Some(Entry {
            region,
            handle,
            users: 0,
        });
        let pos = bisect(self.len, region.addr, |i| self.region_at(i).addr).map_or(0, |p| p + 1);
        // Shift the order up by one from `pos` (room: len < cap).
        let mut i = self.len;
        while i > pos {
            self.slots[i].order = self.slots[i - 1].order;
            i -= 1;
        }
        self.slots[pos].order = slot as u16;
        self.len += 1;
        Ok(slot as u16)
    }

    /// Removes the region starting exactly at `addr`; returns it and its
    /// handle. Refused with [`Error::RegionBusy`] while it has users.
    pub fn remove(&mut self, addr: u64) -> Result<(Region, R), Error> {
        let pos = bisect(self.len, addr, |i| self.region_at(i).addr)
            .filter(|&p| self.region_at(p).addr == addr)
            .ok_or(Error::NotRegistered { addr, len: 0 })?;
        let slot = self.order(pos) as usize;
        let users = self.slots[slot].entry.as_ref().map_or(0, |e| e.users);
        if users > 0 {
            return Err(Error::RegionBusy { addr, users });
        }
        let entry = self.slots[slot]
            .entry
            .take()
            .ok_or(Error::NotRegistered { addr, len: 0 })?;
        for i in pos..self.len - 1 {
            self.slots[i].order = self.slots[i + 1].order;
        }
        self.len -= 1;
        Ok((entry.region, entry.handle))
    }

    /// The region at position `i` of the address order. `i` must be in range.
    fn region_at(&self, i: usize) -> Region {
        self.slots
            .get(self.order(i) as usize)
            .and_then(|s| s.entry.as_ref())
            .map_or(Region::dram(u64::MAX, 0), |e| e.region)
    }

    /// The slot of the region holding byte `addr`, if any.
    pub fn find_addr(&self, addr: u64) -> Option<u16> {
        let pos = bisect(self.len, addr, |i| self.region_at(i).addr)?;
        let r = self.region_at(pos);
        (addr - r.addr < r.len).then(|| self.order(pos))
    }

    /// The slot of the region holding all of `[addr, addr + len)`, if any.
    pub fn find(&self, addr: u64, len: u64) -> Option<u16> {
        let slot = self.find_addr(addr)?;
        self.get(slot)
            .filter(|e| e.region.contains(addr, len))
            .map(|_| slot)
    }

    /// The entry in `slot`.
    pub fn get(&self, slot: u16) -> Option<&Entry<R>> {
        self.slots.get(slot as usize).and_then(|s| s.entry.as_ref())
    }

    /// The slots themselves, for read-only lookups by slot.
    pub(crate) fn slots(&self) -> &[RegionSlot<R>] {
        &self.slots
    }

    /// Adds `n` users to the region in `slot`.
    pub fn acquire_n(&mut self, slot: u16, n: u32) {
        if let Some(Some(e)) = self.slots.get_mut(slot as usize).map(|s| s.entry.as_mut()) {
            e.users = e.users.saturating_add(n);
        }
    }

    /// Removes `n` users from the region in `slot`.
    pub fn release_n(&mut self, slot: u16, n: u32) {
        if let Some(Some(e)) = self.slots.get_mut(slot as usize).map(|s| s.entry.as_mut()) {
            e.users = e.users.saturating_sub(n);
        }
    }

    /// Adds a user to the region in `slot`.
    pub fn acquire(&mut self, slot: u16) {
        self.acquire_n(slot, 1);
    }

    /// Removes a user from the region in `slot`.
    pub fn release(&mut self, slot: u16) {
        self.release_n(slot, 1);
    }

    /// The entries in address order, with their slots.
    pub fn iter(&self) -> impl Iterator<Item = (u16, &Entry<R>)> + '_ {
        (0..self.len).filter_map(move |i| {
            let s = self.order(i);
            self.get(s).map(|e| (s, e))
        })
    }

    /// Removes every region, users or not, handing each to `f` with its
    /// count of users and its handle.
    pub fn drain(&mut self, mut f: impl FnMut(Region, u32, R)) {
        self.len = 0;
        for s in self.slots.iter_mut() {
            if let Some(e) = s.entry.take() {
                f(e.region, e.users, e.handle);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    extern crate std;
    use std::boxed::Box;
    use std::vec::Vec;

    fn slots<R>(n: usize) -> &'static mut [RegionSlot<R>] {
        Box::leak(
            (0..n)
                .map(|_| RegionSlot::EMPTY)
                .collect::<Vec<_>>()
                .into_boxed_slice(),
        )
    }

    fn reg(entries: &[(u64, u64)]) -> Registry<'static, u32> {
        let mut r = Registry::new(slots(8));
        for (i, &(a, l)) in entries.iter().enumerate() {
            r.insert(Region::dram(a, l), i as u32).unwrap();
        }
        r
    }

    #[test]
    fn lookup_finds_containing_region() {
        let r = reg(&[(300, 100), (100, 50), (200, 10)]);
        let addrs: heapless::Vec<u64, 8> = r.iter().map(|(_, e)| e.region.addr).collect();
        assert_eq!(addrs.as_slice(), &[100, 200, 300]);
        assert_eq!(r.get(r.find(100, 50).unwrap()).unwrap().handle, 1);
        assert_eq!(r.get(r.find(399, 1).unwrap()).unwrap().handle, 0);
        assert_eq!(r.find(149, 2), None);
        assert_eq!(r.find(150, 1), None);
        assert_eq!(r.find(99, 1), None);
        assert_eq!(r.find(u64::MAX, 1), None);
        assert_eq!(r.find_addr(205).map(|s| r.get(s).unwrap().handle), Some(2));
    }

    #[test]
    fn overlap_empty_overflow_and_capacity_are_refused() {
        let mut r = reg(&[(100, 50)]);
        let e = r.insert(Region::dram(149, 10), 9).unwrap_err().0;
        assert_eq!(
            e,
            Error::OverlappingRegistration {
                addr: 149,
                len: 10,
                existing_addr: 100,
                existing_len: 50
            }
        );
        let e = r.insert(Region::dram(90, 11), 9).unwrap_err().0;
        assert!(matches!(
            e,
            Error::OverlappingRegistration {
                existing_addr: 100,
                ..
            }
        ));
        let e = r.insert(Region::dram(0, 1000), 9).unwrap_err().0;
        assert!(matches!(
            e,
            Error::OverlappingRegistration {
                existing_addr: 100,
                ..
            }
        ));
        assert_eq!(
            r.insert(Region::dram(5, 0), 9).unwrap_err().0,
            Error::InvalidRegion { addr: 5, len: 0 }
        );
        assert_eq!(
            r.insert(Region::dram(u64::MAX, 2), 9).unwrap_err().0,
            Error::InvalidRegion {
                addr: u64::MAX,
                len: 2
            }
        );
        // Touching neighbours are fine.
        r.insert(Region::dram(150, 10), 1).unwrap();
        r.insert(Region::dram(90, 10), 2).unwrap();
        let mut full: Registry<u32> = Registry::new(slots(2));
        full.insert(Region::dram(0, 1), 0).unwrap();
        full.insert(Region::dram(1, 1), 0).unwrap();
        assert_eq!(
            full.insert(Region::dram(2, 1), 0).unwrap_err().0,
            Error::CapacityExceeded {
                what: "registrations",
                capacity: 2,
                setting: "regions"
            }
        );
    }

    #[test]
    fn busy_region_cannot_be_removed_and_slots_are_stable() {
        let mut r = reg(&[(100, 50), (200, 50), (300, 50)]);
        let s300 = r.find(300, 1).unwrap();
        r.acquire(s300);
        r.acquire(s300);
        assert_eq!(
            r.remove(300).unwrap_err(),
            Error::RegionBusy {
                addr: 300,
                users: 2
            }
        );
        assert_eq!(
            r.remove(301).unwrap_err(),
            Error::NotRegistered { addr: 301, len: 0 }
        );
        assert_eq!(r.remove(100).unwrap(), (Region::dram(100, 50), 0));
        assert_eq!(r.find(300, 1), Some(s300));
        r.release(s300);
        r.release(s300);
        assert_eq!(r.get(s300).unwrap().users(), 0);
        assert_eq!(r.remove(300).unwrap().1, 2);
        assert_eq!(r.len(), 1);
    }
}
