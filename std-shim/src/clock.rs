//! The clock the shim hands to the core: nanoseconds since a process-wide
//! start, read from the monotonic clock.

use std::sync::OnceLock;

use kvxfer_core::Instant;

static START: OnceLock<std::time::Instant> = OnceLock::new();

/// Now, as the core's [`Instant`]: nanoseconds since the first call in this
/// process. Monotonic; saturates after 584 years.
pub fn now() -> Instant {
    let start = *START.get_or_init(std::time::Instant::now);
    Instant::from_nanos(u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic() {
        let a = now();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = now();
        assert!(b.saturating_nanos_since(a) >= 2_000_000);
    }
}
