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

/// A sorted table of at most `N` non-overlapping local regions.
#[derive(Debug)]
pub struct Registry<R, const N: usize> {
    slots: heapless::Vec<Option<Entry<R>>, N>,
    /// Slot indices, sorted by region address.
    order: heapless::Vec<u16, N>,
}

impl<R, const N: usize> Default for Registry<R, N> {
    fn default() -> Self {
        Self::new()
    }
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

impl<R, const N: usize> Registry<R, N> {
    const SLOT_INDEX_FITS: () = assert!(N <= u16::MAX as usize, "at most 65535 regions");

    /// An empty registry.
    pub const fn new() -> Self {
        #[allow(clippy::let_unit_value)]
        let () = Self::SLOT_INDEX_FITS;
        Registry {
            slots: heapless::Vec::new(),
            order: heapless::Vec::new(),
        }
    }

    /// Number of registered regions.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether no region is registered.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Most regions this registry holds.
    pub const fn capacity(&self) -> usize {
        N
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
        let pos = bisect(self.order.len(), region.addr, |i| self.region_at(i).addr);
        let prev = pos.map(|p| self.region_at(p));
        let next_pos = pos.map_or(0, |p| p + 1);
        let next = (next_pos < self.order.len()).then(|| self.region_at(next_pos));
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
        if self.order.is_full() {
            return Err(Error::CapacityExceeded {
                what: "registrations",
                capacity: N as u32,
            });
        }
        Ok(())
    }

    /// Inserts `region` with its transport handle; returns its slot. On
    /// error the handle is given back with the error.
    pub fn insert(&mut self, region: Region, handle: R) -> Result<u16, (Error, R)> {
        if let Err(e) = self.check(&region) {
            return Err((e, handle));
        }
        let entry = Entry {
            region,
            handle,
            users: 0,
        };
        let slot = match self.slots.iter().position(Option::is_none) {
            Some(free) => {
                self.slots[free] = Some(entry);
                free
            }
            None => {
                let at = self.slots.len();
                if let Err(Some(entry)) = self.slots.push(Some(entry)) {
                    // Unreachable: `check` found room in `order`, and
                    // `slots` never holds more entries than `order`.
                    return Err((
                        Error::CapacityExceeded {
                            what: "registrations",
                            capacity: N as u32,
                        },
                        entry.handle,
                    ));
                }
                at
            }
        };
        let pos =
            bisect(self.order.len(), region.addr, |i| self.region_at(i).addr).map_or(0, |p| p + 1);
        // Cannot fail: `check` saw room.
        let _ = self.order.insert(pos, slot as u16);
        Ok(slot as u16)
    }

    /// Removes the region starting exactly at `addr`; returns it and its
    /// handle. Refused with [`Error::RegionBusy`] while it has users.
    pub fn remove(&mut self, addr: u64) -> Result<(Region, R), Error> {
        let pos = bisect(self.order.len(), addr, |i| self.region_at(i).addr)
            .filter(|&p| self.region_at(p).addr == addr)
            .ok_or(Error::NotRegistered { addr, len: 0 })?;
        let slot = self.order[pos] as usize;
        let users = self.slots[slot].as_ref().map_or(0, |e| e.users);
        if users > 0 {
            return Err(Error::RegionBusy { addr, users });
        }
        self.order.remove(pos);
        let entry = self.slots[slot]
            .take()
            .ok_or(Error::NotRegistered { addr, len: 0 })?;
        while matches!(self.slots.last(), Some(None)) {
            self.slots.pop();
        }
        Ok((entry.region, entry.handle))
    }

    /// The region at position `i` of the address order. `i` must be in range.
    fn region_at(&self, i: usize) -> Region {
        self.order
            .get(i)
            .and_then(|&s| self.slots.get(s as usize))
            .and_then(Option::as_ref)
            .map_or(Region::dram(u64::MAX, 0), |e| e.region)
    }

    /// The slot of the region holding byte `addr`, if any.
    pub fn find_addr(&self, addr: u64) -> Option<u16> {
        let pos = bisect(self.order.len(), addr, |i| self.region_at(i).addr)?;
        let r = self.region_at(pos);
        (addr - r.addr < r.len).then(|| self.order[pos])
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
        self.slots.get(slot as usize).and_then(Option::as_ref)
    }

    /// Adds a user to the region in `slot`.
    pub fn acquire(&mut self, slot: u16) {
        if let Some(Some(e)) = self.slots.get_mut(slot as usize) {
            e.users = e.users.saturating_add(1);
        }
    }

    /// Removes a user from the region in `slot`.
    pub fn release(&mut self, slot: u16) {
        if let Some(Some(e)) = self.slots.get_mut(slot as usize) {
            e.users = e.users.saturating_sub(1);
        }
    }

    /// The entries in address order, with their slots.
    pub fn iter(&self) -> impl Iterator<Item = (u16, &Entry<R>)> + '_ {
        self.order.iter().filter_map(move |&s| {
            self.slots
                .get(s as usize)
                .and_then(Option::as_ref)
                .map(|e| (s, e))
        })
    }

    /// Removes every region, users or not, handing each handle to `f`.
    pub fn drain(&mut self, mut f: impl FnMut(Region, R)) {
        self.order.clear();
        while let Some(slot) = self.slots.pop() {
            if let Some(e) = slot {
                f(e.region, e.handle);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(entries: &[(u64, u64)]) -> Registry<u32, 8> {
        let mut r = Registry::new();
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
        let mut full: Registry<u32, 2> = Registry::new();
        full.insert(Region::dram(0, 1), 0).unwrap();
        full.insert(Region::dram(1, 1), 0).unwrap();
        assert_eq!(
            full.insert(Region::dram(2, 1), 0).unwrap_err().0,
            Error::CapacityExceeded {
                what: "registrations",
                capacity: 2
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
