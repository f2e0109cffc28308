//! The state and counters of each rail.

use kvxfer_core::Transport;

use crate::{Place, Rails};

/// Whether a rail carries transfers.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub enum RailState {
    /// Working.
    #[default]
    Up,
    /// Failed; tried again after its back-off.
    Down,
    /// Reconnected after a failure; one part in flight decides.
    Probing,
}

impl RailState {
    /// "up", "down" or "probing".
    pub fn name(self) -> &'static str {
        match self {
            RailState::Up => "up",
            RailState::Down => "down",
            RailState::Probing => "probing",
        }
    }
}

/// Counters of one rail.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RailStats {
    /// The rail's name (its interface).
    pub name: String,
    /// Its state now.
    pub state: RailState,
    /// Bytes of parts it completed.
    pub bytes: u64,
    /// Times it was marked down, or one of its connections failed alone
    /// (a part failed with an error while the rail worked).
    pub failures: u64,
    /// Why it last failed ("" if never).
    pub last_error: String,
    /// Times its inner transport was renewed, for a peer's fence or before
    /// reconnecting after it was marked down (UCX; see the crate's "Stale
    /// WRITEs").
    pub renewals: u64,
    /// Where its NIC sits (NUMA node, PCI path; unknown without a
    /// topology or for a virtual interface).
    pub place: Place,
}
/// One line: `NAME STATE N MiB N failures` (as `kvxfer bench` reports
/// the rails).
impl std::fmt::Display for RailStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} {} MiB {} failures",
            self.name,
            self.state.name(),
            self.bytes >> 20,
            self.failures
        )
    }
}

impl<T: Transport> Rails<T> {
    /// Counters and state of every rail, in order.
    pub fn stats(&self) -> Vec<RailStats> {
        self.rails
            .iter()
            .zip(self.places())
            .map(|(r, place)| RailStats {
                name: r.name.clone(),
                state: r.state,
                bytes: r.bytes,
                failures: r.failures,
                last_error: r.last_error.clone(),
                renewals: r.renewals,
                place,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::{RailState, RailStats};

    #[test]
    fn a_rail_in_one_line() {
        let r = RailStats {
            name: "eth1".into(),
            state: RailState::Probing,
            bytes: 3 << 20 | 5,
            failures: 2,
            ..RailStats::default()
        };
        assert_eq!(r.to_string(), "eth1 probing 3 MiB 2 failures");
    }
}
