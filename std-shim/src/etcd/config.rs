//! [`EtcdConfig`]: endpoints, prefix, lease and timeouts.

use super::*;

/// Settings of [`EtcdDiscovery`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct EtcdConfig {
    /// etcd client URLs (`http://host:2379`; the scheme may be left out).
    pub endpoints: Vec<String>,
    /// Namespace prefix of agent entries; an agent's key is the prefix
    /// followed by its name. Default [`DEFAULT_PREFIX`]. A prefix that
    /// does not end with `/` gets one.
    pub prefix: String,
    /// Time to live of the agent's lease, in whole seconds (at least 1 s;
    /// fractions round up). A dead agent's entry disappears this long
    /// after its last renewal. Renewals go out every third of it. Default
    /// [`DEFAULT_LEASE_TTL`].
    pub lease_ttl: Duration,
    /// Connect timeout, and limit of each etcd request. Default
    /// [`DEFAULT_TIMEOUT`].
    pub timeout: Duration,
    /// How often the agent's metadata is compared with what was
    /// published, to re-publish it after registrations change. Default
    /// [`DEFAULT_REPUBLISH_INTERVAL`].
    pub republish_interval: Duration,
    /// Load every agent that appears under the prefix (default `true`).
    /// Off, only peers asked for with [`EtcdDiscovery::fetch`] are loaded
    /// and followed. Either way, a peer that an agent transfers with must
    /// have loaded that agent's metadata too for notifications to reach
    /// it.
    pub load_all: bool,
}

impl EtcdConfig {
    /// Settings for the etcd cluster at `endpoints`: one URL or several
    /// separated by commas (`http://10.0.0.1:2379,http://10.0.0.2:2379`).
    pub fn new(endpoints: &str) -> EtcdConfig {
        EtcdConfig {
            endpoints: endpoints
                .split(',')
                .map(str::trim)
                .filter(|e| !e.is_empty())
                .map(str::to_string)
                .collect(),
            prefix: DEFAULT_PREFIX.to_string(),
            lease_ttl: DEFAULT_LEASE_TTL,
            timeout: DEFAULT_TIMEOUT,
            republish_interval: DEFAULT_REPUBLISH_INTERVAL,
            load_all: true,
        }
    }

    /// Sets [`prefix`](Self::prefix).
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Sets [`lease_ttl`](Self::lease_ttl).
    pub fn with_lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl;
        self
    }

    /// Sets [`timeout`](Self::timeout).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets [`republish_interval`](Self::republish_interval).
    pub fn with_republish_interval(mut self, interval: Duration) -> Self {
        self.republish_interval = interval;
        self
    }

    /// Sets [`load_all`](Self::load_all).
    pub fn with_load_all(mut self, on: bool) -> Self {
        self.load_all = on;
        self
    }

    /// Checks the settings; returns the normalised prefix and the lease
    /// time to live in seconds.
    pub(super) fn validate(&self) -> Result<(String, i64), Error> {
        if self.endpoints.is_empty() {
            return Err(etcd_err(-1, "no etcd endpoint given"));
        }
        if let Some(bad) = self
            .endpoints
            .iter()
            .find(|e| e.contains(char::is_whitespace))
        {
            return Err(etcd_err(
                -1,
                &format!("etcd endpoint {bad:?} contains white space"),
            ));
        }
        if self.prefix.is_empty() {
            return Err(etcd_err(-1, "etcd prefix is empty"));
        }
        let mut prefix = self.prefix.clone();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        if self.lease_ttl < Duration::from_secs(1) {
            return Err(etcd_err(
                -1,
                &format!(
                    "etcd lease TTL {} ms is below the minimum of 1 s",
                    self.lease_ttl.as_millis()
                ),
            ));
        }
        let secs = self.lease_ttl.as_secs() + u64::from(self.lease_ttl.subsec_nanos() > 0);
        let ttl = i64::try_from(secs)
            .map_err(|_| etcd_err(-1, &format!("etcd lease TTL {secs} s is too large")))?;
        if self.timeout.is_zero() {
            return Err(etcd_err(-1, "etcd timeout is zero"));
        }
        if self.republish_interval.is_zero() {
            return Err(etcd_err(-1, "etcd republish interval is zero"));
        }
        Ok((prefix, ttl))
    }
}
