//! Memory kinds, regions and descriptors.
//!
//! Addresses and lengths are `u64` everywhere, whatever the pointer width of
//! the target: a 32-bit initiator can still name a 64-bit peer's memory.

use core::fmt;

/// Where a piece of memory lives.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MemKind {
    /// Host memory (DRAM), pageable or pinned.
    Dram = 0,
    /// GPU memory (VRAM) of device `dev`.
    Vram = 1,
}

impl MemKind {
    /// Every kind, in wire order.
    pub const ALL: [MemKind; 2] = [MemKind::Dram, MemKind::Vram];

    /// The wire code of this kind.
    pub const fn code(self) -> u8 {
        self as u8
    }

    /// The kind with wire code `code`, if there is one.
    pub const fn from_code(code: u8) -> Option<MemKind> {
        match code {
            0 => Some(MemKind::Dram),
            1 => Some(MemKind::Vram),
            _ => None,
        }
    }

    /// Upper-case name as used in logs and on the command line.
    pub const fn name(self) -> &'static str {
        match self {
            MemKind::Dram => "DRAM",
            MemKind::Vram => "VRAM",
        }
    }
}

impl fmt::Display for MemKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A set of [`MemKind`]s, as a bit set indexed by [`MemKind::code`].
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct MemKinds(pub u8);

impl MemKinds {
    /// Host memory only.
    pub const DRAM: MemKinds = MemKinds(1 << MemKind::Dram as u8);
    /// Host and GPU memory.
    pub const DRAM_VRAM: MemKinds =
        MemKinds((1 << MemKind::Dram as u8) | (1 << MemKind::Vram as u8));

    /// Whether `kind` is in the set.
    pub const fn contains(self, kind: MemKind) -> bool {
        self.0 & (1 << kind as u8) != 0
    }

    /// The set with `kind` added.
    pub const fn with(self, kind: MemKind) -> MemKinds {
        MemKinds(self.0 | (1 << kind as u8))
    }
}

/// A contiguous piece of memory that is, or is to be, registered.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Region {
    /// First byte, as a virtual address in the owning process (for VRAM, the
    /// device pointer).
    pub addr: u64,
    /// Length in bytes; never zero once registered.
    pub len: u64,
    /// Device id: the GPU ordinal for VRAM, 0 for DRAM (or a NUMA node, by
    /// the application's convention).
    pub dev: u32,
    /// Where the memory lives.
    pub kind: MemKind,
}

impl Region {
    /// A DRAM region on device 0.
    pub const fn dram(addr: u64, len: u64) -> Region {
        Region {
            addr,
            len,
            dev: 0,
            kind: MemKind::Dram,
        }
    }

    /// A VRAM region on GPU `dev`.
    pub const fn vram(addr: u64, len: u64, dev: u32) -> Region {
        Region {
            addr,
            len,
            dev,
            kind: MemKind::Vram,
        }
    }

    /// One past the last byte, or `None` if that overflows `u64`.
    pub const fn end(&self) -> Option<u64> {
        self.addr.checked_add(self.len)
    }

    /// Whether `[addr, addr + len)` lies inside this region.
    pub const fn contains(&self, addr: u64, len: u64) -> bool {
        match (addr.checked_add(len), self.end()) {
            (Some(e), Some(re)) => addr >= self.addr && e <= re,
            _ => false,
        }
    }
}

/// One block of memory named in a transfer request: local or remote.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Desc {
    /// First byte.
    pub addr: u64,
    /// Length in bytes; must not be zero.
    pub len: u64,
    /// Device id; must match the registration that holds the descriptor.
    pub dev: u32,
}

impl Desc {
    /// A descriptor on device 0.
    pub const fn new(addr: u64, len: u64) -> Desc {
        Desc { addr, len, dev: 0 }
    }

    /// A descriptor on device `dev`.
    pub const fn on_dev(addr: u64, len: u64, dev: u32) -> Desc {
        Desc { addr, len, dev }
    }
}
