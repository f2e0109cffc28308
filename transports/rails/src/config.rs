//! Settings of [`Rails`](crate::Rails) and the environment variables that
//! change them.

use std::time::Duration;

/// Environment variable listing the rails' interfaces, comma separated.
pub const ENV_RAILS: &str = "KVXFER_RAILS";
/// Environment variable setting [`RailsConfig::stripe_min`] in bytes
/// (suffixes KiB, MiB accepted).
pub const ENV_STRIPE: &str = "KVXFER_RAIL_STRIPE";
/// Environment variable setting [`RailsConfig::rail_timeout`] in
/// milliseconds.
pub const ENV_TIMEOUT_MS: &str = "KVXFER_RAIL_TIMEOUT_MS";
/// Environment variable setting [`RailsConfig::window`] in bytes.
pub const ENV_WINDOW: &str = "KVXFER_RAIL_WINDOW";

/// Settings of [`Rails`](crate::Rails).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RailsConfig {
    /// Segments at least this long are striped over the rails. 1 MiB.
    pub stripe_min: u64,
    /// Longest part of a striped segment. 4 MiB.
    pub part_max: u64,
    /// Parts start at multiples of this many bytes from the segment's
    /// start. 4 KiB.
    pub align: u64,
    /// Most bytes in flight on one rail before more wait. 64 MiB.
    pub window: u64,
    /// A part not complete within this is taken as its rail's failure.
    /// 500 ms.
    pub rail_timeout: Duration,
    /// First wait before a down rail is tried again. 200 ms.
    pub backoff_min: Duration,
    /// Longest wait before a down rail is tried again. 5 s.
    pub backoff_max: Duration,
}

impl Default for RailsConfig {
    fn default() -> Self {
        RailsConfig {
            stripe_min: 1 << 20,
            part_max: 4 << 20,
            align: 4096,
            window: 64 << 20,
            rail_timeout: Duration::from_millis(500),
            backoff_min: Duration::from_millis(200),
            backoff_max: Duration::from_secs(5),
        }
    }
}

/// Parses `64MiB`, `4KiB`, `1GiB` or a plain byte count.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mul) = if let Some(n) = s.strip_suffix("GiB") {
        (n, 1u64 << 30)
    } else if let Some(n) = s.strip_suffix("MiB") {
        (n, 1 << 20)
    } else if let Some(n) = s.strip_suffix("KiB") {
        (n, 1 << 10)
    } else {
        (s.strip_suffix('B').unwrap_or(s), 1)
    };
    num.trim().parse::<u64>().ok()?.checked_mul(mul)
}

impl RailsConfig {
    /// The defaults, changed by [`ENV_STRIPE`], [`ENV_TIMEOUT_MS`] and
    /// [`ENV_WINDOW`] where set (a value that does not parse is logged and
    /// ignored).
    pub fn from_env() -> RailsConfig {
        let mut c = RailsConfig::default();
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        if let Some(v) = var(ENV_STRIPE) {
            match parse_size(&v) {
                Some(n) if n > 0 => c.stripe_min = n,
                _ => log::warn!("{ENV_STRIPE}={v:?} is not a size; using {}", c.stripe_min),
            }
        }
        if let Some(v) = var(ENV_WINDOW) {
            match parse_size(&v) {
                Some(n) if n > 0 => c.window = n,
                _ => log::warn!("{ENV_WINDOW}={v:?} is not a size; using {}", c.window),
            }
        }
        if let Some(v) = var(ENV_TIMEOUT_MS) {
            match v.trim().parse::<u64>() {
                Ok(n) if n > 0 => c.rail_timeout = Duration::from_millis(n),
                _ => log::warn!("{ENV_TIMEOUT_MS}={v:?} is not a positive number of ms"),
            }
        }
        c
    }
}

/// The interfaces named by [`ENV_RAILS`], if set and not empty.
pub fn rails_from_env() -> Option<Vec<String>> {
    let v = std::env::var(ENV_RAILS).ok()?;
    let list: Vec<String> = v
        .split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect();
    (!list.is_empty()).then_some(list)
}
