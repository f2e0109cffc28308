//! Time as the caller gives it. The core never reads a clock.

use core::time::Duration;

/// A point in time, in nanoseconds since an arbitrary epoch chosen by the caller
/// (the std shim uses a process-wide monotonic start).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Instant {
    /// Nanoseconds since the caller's epoch.
    pub nanos: u64,
}

impl Instant {
    /// The epoch itself.
    pub const ZERO: Instant = Instant { nanos: 0 };

    /// An instant `nanos` nanoseconds after the epoch.
    pub const fn from_nanos(nanos: u64) -> Self {
        Instant { nanos }
    }

    /// Nanoseconds from `earlier` to `self`, zero if `earlier` is later.
    pub const fn saturating_nanos_since(self, earlier: Instant) -> u64 {
        self.nanos.saturating_sub(earlier.nanos)
    }

    /// `self` plus `d`, saturating at the largest instant.
    pub fn saturating_add(self, d: Duration) -> Self {
        let d = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        Instant {
            nanos: self.nanos.saturating_add(d),
        }
    }
}
