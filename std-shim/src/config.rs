//! Agent settings and backend selection.
//!
//! The backend an [`Agent`](crate::Agent) uses comes from, in order:
//!
//! 1. [`AgentConfig::backend`];
//! 2. the `KVXFER_BACKEND` environment variable;
//! 3. the `TRTLLM_NIXL_KVCACHE_BACKEND` environment variable (TensorRT-LLM's
//!    own, so its users can switch to kvxfer without changing anything);
//! 4. UCX.
//!
//! Values are matched without regard to case; an empty variable counts as
//! unset. A value that names no backend built into this kvxfer is
//! [`Error::UnsupportedBackend`], naming the value and the backends built in.
//!
//! # Transport settings
//!
//! The transport of the chosen backend is built from, field by field:
//!
//! 1. the backend-neutral settings of [`AgentConfig`] that are set
//!    ([`provider`](AgentConfig::provider) for libfabric);
//! 2. the backend's own configuration when one is given
//!    (`AgentConfig::with_ucx_config`, `AgentConfig::with_fabric_config`),
//!    taken as it is: the
//!    environment is then not consulted for its fields;
//! 3. otherwise the backend's defaults with its environment variables
//!    applied: for UCX `UcxConfig::from_env`, for libfabric
//!    `FabricConfig::default()` (the provider then comes from
//!    `KVXFER_LIBFABRIC_PROVIDER`).
//!
//! Explicit configuration therefore beats the environment, and an
//! application that sets nothing keeps the environment's behaviour. See
//! `AgentConfig::effective_ucx_config` and
//! `AgentConfig::effective_fabric_config` for the result.
//!
//! The per-transfer deadline is the engine's, for every backend:
//! [`AgentConfig::transfer_timeout`], else [`ENV_TRANSFER_TIMEOUT_MS`], else
//! [`DEFAULT_TRANSFER_TIMEOUT`] ([`AgentConfig::effective_transfer_timeout`]).

use std::fmt;
use std::time::Duration;

pub use kvxfer_core::Capacities;
use kvxfer_core::Error;

/// The first environment variable consulted for the backend.
pub const ENV_BACKEND: &str = "KVXFER_BACKEND";
/// TensorRT-LLM's variable, consulted when [`ENV_BACKEND`] is unset.
pub const ENV_TRTLLM_BACKEND: &str = "TRTLLM_NIXL_KVCACHE_BACKEND";
/// The environment variable holding the side channel's shared key.
pub const ENV_AUTH_KEY: &str = "KVXFER_AUTH_KEY";
/// Environment variable setting [`AgentConfig::keepalive`] in milliseconds
/// (`0` turns it off) when the field is `None`.
pub const ENV_KEEPALIVE_MS: &str = "KVXFER_KEEPALIVE_MS";
/// Keepalive timeout by default ([`AgentConfig::keepalive`]).
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(2);
/// Environment variable setting the per-transfer deadline in milliseconds
/// (`0`: none) when [`AgentConfig::transfer_timeout`] is `None`.
pub const ENV_TRANSFER_TIMEOUT_MS: &str = "KVXFER_TRANSFER_TIMEOUT_MS";
/// Per-transfer deadline by default ([`AgentConfig::transfer_timeout`]).
pub const DEFAULT_TRANSFER_TIMEOUT: Duration = Duration::from_secs(5);

#[allow(unused_imports)] // empty without ucx and libfabric
pub use crate::backends::settings::*;
pub use crate::backends::{BackendKind, BUILT_IN};

/// Where the chosen backend's name came from; names the source in errors.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum BackendSource {
    /// [`AgentConfig::backend`].
    Config,
    /// The `KVXFER_BACKEND` variable.
    EnvKvxfer,
    /// The `TRTLLM_NIXL_KVCACHE_BACKEND` variable.
    EnvTrtllm,
    /// Nothing was set: [`BackendKind::DEFAULT`], UCX.
    Default,
}

impl BackendSource {
    /// How the source is named in errors and logs.
    pub const fn name(self) -> &'static str {
        match self {
            BackendSource::Config => "AgentConfig.backend",
            BackendSource::EnvKvxfer => ENV_BACKEND,
            BackendSource::EnvTrtllm => ENV_TRTLLM_BACKEND,
            BackendSource::Default => "default",
        }
    }
}

/// Chooses the backend from the configured value and the two environment
/// variables' values (pass `None` for unset). Pure: reads no environment.
///
/// The first value set and not blank decides, even when it is invalid. A
/// value that names no backend, or one not built in, is
/// [`Error::UnsupportedBackend`] naming the value and [`BUILT_IN`].
pub fn select_backend(
    config: Option<&str>,
    env_kvxfer: Option<&str>,
    env_trtllm: Option<&str>,
) -> Result<(BackendKind, BackendSource), Error> {
    let sources = [
        (config, BackendSource::Config),
        (env_kvxfer, BackendSource::EnvKvxfer),
        (env_trtllm, BackendSource::EnvTrtllm),
    ];
    let (value, source) = sources
        .into_iter()
        .find_map(|(v, s)| v.filter(|v| !v.trim().is_empty()).map(|v| (v, s)))
        .unwrap_or((BackendKind::DEFAULT.name(), BackendSource::Default));
    match BackendKind::parse(value) {
        Ok(kind) if kind.is_built_in() => Ok((kind, source)),
        _ => Err(crate::backends::unsupported(value)),
    }
}

/// Chooses the backend from `config` and the process environment.
pub fn select_backend_from_env(
    config: Option<&str>,
) -> Result<(BackendKind, BackendSource), Error> {
    let kv = std::env::var(ENV_BACKEND).ok();
    let trt = std::env::var(ENV_TRTLLM_BACKEND).ok();
    select_backend(config, kv.as_deref(), trt.as_deref())
}

/// Default for [`AgentConfig::listen`].
pub const DEFAULT_LISTEN: &str = "127.0.0.1:0";
/// Default for [`AgentConfig::io_timeout`]: 5 s.
pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Default for [`AgentConfig::idle_timeout`]: 30 s.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default for [`AgentConfig::release_timeout`]: 5 s.
pub const DEFAULT_RELEASE_TIMEOUT: Duration = Duration::from_secs(5);
/// Default for [`AgentConfig::progress_idle_sleep`]: 100 µs.
pub const DEFAULT_PROGRESS_IDLE_SLEEP: Duration = Duration::from_micros(100);

/// Settings of an [`Agent`](crate::Agent).
///
/// Build one from [`AgentConfig::default`] and the `with_*` methods:
///
/// ```
/// use std::time::Duration;
/// let cfg = kvxfer::AgentConfig::default()
///     .with_backend("UCX")
///     .with_listen(Some("127.0.0.1:0"))
///     .with_io_timeout(Duration::from_secs(2));
/// assert_eq!(cfg.backend.as_deref(), Some("UCX"));
/// ```
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct AgentConfig {
    /// Sizes of the agent's tables, fixed at [`Agent::new`](crate::Agent::new)
    /// (default [`DEFAULT_CAPACITIES`]). A full table is
    /// [`Error::CapacityExceeded`] naming the field that raises it.
    pub capacities: Capacities,
    /// Most segments of one transfer after coalescing (default
    /// [`DEFAULT_SEGMENTS_PER_XFER`]); the segment table
    /// ([`Capacities::segments`]) is shared by all live transfers.
    pub segments_per_xfer: u32,
    /// Move data to and from peers on this host by cross-memory attach
    /// (`process_vm_writev`), watching their processes through pidfds;
    /// other peers, and notifications, go through the backend. Default on;
    /// `KVXFER_SAME_HOST_CMA=0` turns it off too.
    pub same_host: bool,
    /// Backend name ("UCX", "LIBFABRIC"); `None` consults the environment
    /// (see the [module docs](self)). Default `None`.
    pub backend: Option<String>,
    /// libfabric provider ("tcp;ofi_rxm", "shm", "verbs;ofi_rxm", …); `None`
    /// lets libfabric choose. Ignored by other backends. Default `None`.
    pub provider: Option<String>,
    /// Address the side channel listens on; port 0 picks a free port.
    /// `None` serves no side channel (metadata is then exchanged by the
    /// application with [`local_metadata`](crate::Agent::local_metadata)
    /// and [`load_remote`](crate::Agent::load_remote)).
    /// Default `Some("127.0.0.1:0")`.
    pub listen: Option<String>,
    /// Run a progress thread (default `true`). It polls the transport,
    /// completes transfers and collects notifications without the
    /// application calling in. Keep it on for an agent that is the
    /// *target* of transfers over libfabric's `tcp;ofi_rxm`, whose RMA is
    /// emulated in software and served only while the target makes
    /// progress. Off, progress happens inside `status`, `wait` and
    /// `take_notifications` calls.
    pub progress_thread: bool,
    /// Longest the progress thread sleeps between polls while no transfer
    /// is in flight (default 100 µs). In flight, it only yields. Zero
    /// polls without sleeping while a peer outside cross-memory attach is
    /// loaded, and otherwise backs off up to the default.
    pub progress_idle_sleep: Duration,
    /// Read and write timeout of side-channel sockets, and connect timeout
    /// (default 5 s).
    pub io_timeout: Duration,
    /// A side-channel connection without a request for this long is closed
    /// by the server (default 30 s).
    pub idle_timeout: Duration,
    /// How long dropping an in-progress request waits for it when the
    /// transport cannot cancel (default 5 s).
    pub release_timeout: Duration,
    /// Shared key for side-channel authentication (HMAC-SHA256
    /// challenge-response in both directions). `None` reads
    /// `KVXFER_AUTH_KEY`; an empty key turns authentication off.
    pub auth_key: Option<Vec<u8>>,
    /// Per-transfer deadline, from post to completion, kept by the engine
    /// for every backend: a transfer still in flight after it fails with
    /// [`Error::TimedOut`] and the transport abandons it. `Some(Some(d))`:
    /// deadline `d`; `Some(None)`: no deadline (a transfer to a peer that
    /// stopped may then never end; a zero duration means the same); `None`
    /// (the default): [`ENV_TRANSFER_TIMEOUT_MS`], else
    /// [`DEFAULT_TRANSFER_TIMEOUT`] (5 s).
    pub transfer_timeout: Option<Option<Duration>>,
    /// How long a peer served by the backend (not by cross-memory attach)
    /// may stay silent while transfers to it are in flight. Meanwhile the
    /// agent probes it (a one-byte READ of its first host-memory region,
    /// four times per timeout, only while nothing else completes); past
    /// the timeout the peer is declared unreachable: its transfers fail
    /// with [`Error::RemoteDisconnected`] naming it and later posts are
    /// refused with that error until it is loaded again. A link slower
    /// than the timeout at draining what is queued to one peer looks dead:
    /// raise it there. `Some(Duration::ZERO)` turns it off; `None` (the
    /// default) reads [`ENV_KEEPALIVE_MS`], else [`DEFAULT_KEEPALIVE`]
    /// (2 s).
    pub keepalive: Option<Duration>,
    /// Each backend's own configuration, set with its `with_*_config`
    /// method (`with_ucx_config`, `with_fabric_config`). When given, the
    /// environment is not consulted for its fields;
    /// [`provider`](Self::provider), when set, replaces libfabric's.
    /// Deadlines are the engine's:
    /// [`transfer_timeout`](Self::transfer_timeout).
    pub(crate) backends: crate::backends::BackendConfigs,
    /// Record metrics ([`crate::metrics`]). `None` (the default): on,
    /// unless `KVXFER_METRICS=0`.
    pub metrics: Option<bool>,
    /// Serve the process's metrics over HTTP in Prometheus' text format on
    /// this address (`host:port`). `Some(None)`: no endpoint; `None` (the
    /// default): `KVXFER_METRICS_ADDR` if set, else no endpoint.
    pub metrics_addr: Option<Option<String>>,
    /// Network interfaces to reach peers over, one rail each (libfabric:
    /// one domain and endpoint per interface; UCX: one UCP context kept to
    /// it; see `kvxfer_rails`). Each must be a network interface or RDMA
    /// device of this host, else [`Agent::new`](crate::Agent::new) fails
    /// naming it. `None` (the default): `KVXFER_RAILS` (comma separated),
    /// else one endpoint as the provider chooses.
    pub rails: Option<Vec<String>>,
    /// Explicit choice of rails by memory, `numa0=eth0+eth1,gpu3=eth2`
    /// (see [`with_rail_map`](Self::with_rail_map)). `None` (the default):
    /// `KVXFER_RAIL_MAP`, else the topology alone decides.
    pub rail_map: Option<String>,
    /// Where the rails' topology is read from instead of `/sys` (a tree
    /// laid out as sysfs). `None` (the default): `KVXFER_SYSFS_ROOT`, else
    /// `/sys`.
    pub sysfs_root: Option<std::path::PathBuf>,
}

/// Table sizes of an agent by default, fit for an engine with a KV cache of
/// many layers and blocks: about 65 MiB of tables (70 MiB for CUDA_IPC,
/// whose remote keys are larger), written once at
/// [`Agent::new`](crate::Agent::new) (`Capacities::bytes` computes it for
/// any sizes).
///
/// | field | default | bytes each |
/// |---|---|---|
/// | `regions` | 4,096 | 56–64 |
/// | `peers` | 1,024 | 104–112 |
/// | `remote_regions` (all peers) | 65,536 | 48 |
/// | `xfers` (live requests) | 4,096 | 224 |
/// | `segments` (all live requests) | 1,048,576 | 32, + 4 per chunk of 256 |
/// | `prepared_lists` | 4,096 | 48 |
/// | `prepared_entries` (explicit, all lists) | 1,048,576 | 24 |
/// | `notifications` (requests holding one) | 1,024 | 4,096 + 8 |
///
/// A strided prepared list that lies in one region takes no entries.
pub const DEFAULT_CAPACITIES: Capacities = Capacities {
    regions: 4096,
    peers: 1024,
    remote_regions: 65_536,
    xfers: 4096,
    segments: 1 << 20,
    segments_per_chunk: 256,
    prepared_lists: 4096,
    prepared_entries: 1 << 20,
    notifications: 1024,
    notification_len: 4096,
};

/// Most segments of one transfer by default.
pub const DEFAULT_SEGMENTS_PER_XFER: u32 = 65_536;

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            capacities: DEFAULT_CAPACITIES,
            segments_per_xfer: DEFAULT_SEGMENTS_PER_XFER,
            same_host: true,
            backend: None,
            provider: None,
            listen: Some(DEFAULT_LISTEN.to_string()),
            progress_thread: true,
            progress_idle_sleep: DEFAULT_PROGRESS_IDLE_SLEEP,
            io_timeout: DEFAULT_IO_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            release_timeout: DEFAULT_RELEASE_TIMEOUT,
            auth_key: None,
            transfer_timeout: None,
            keepalive: None,
            backends: crate::backends::BackendConfigs::default(),
            metrics: None,
            metrics_addr: None,
            rails: None,
            rail_map: None,
            sysfs_root: None,
        }
    }
}

impl fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("AgentConfig");
        d.field("capacities", &self.capacities)
            .field("segments_per_xfer", &self.segments_per_xfer)
            .field("same_host", &self.same_host)
            .field("backend", &self.backend)
            .field("provider", &self.provider)
            .field("listen", &self.listen)
            .field("progress_thread", &self.progress_thread)
            .field("progress_idle_sleep", &self.progress_idle_sleep)
            .field("io_timeout", &self.io_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("release_timeout", &self.release_timeout)
            .field("auth_key", &self.auth_key.as_ref().map(|_| "<set>"))
            .field("transfer_timeout", &self.transfer_timeout)
            .field("keepalive", &self.keepalive)
            .field("rails", &self.rails)
            .field("rail_map", &self.rail_map)
            .field("sysfs_root", &self.sysfs_root)
            .field("backends", &self.backends)
            .field("metrics", &self.metrics)
            .field("metrics_addr", &self.metrics_addr);
        d.finish()
    }
}

impl AgentConfig {
    /// Sets [`capacities`](Self::capacities); change a few with struct
    /// update syntax: `Capacities { xfers: 16_384, ..DEFAULT_CAPACITIES }`.
    pub fn with_capacities(mut self, capacities: Capacities) -> Self {
        self.capacities = capacities;
        self
    }

    /// Sets [`segments_per_xfer`](Self::segments_per_xfer).
    pub fn with_segments_per_xfer(mut self, n: u32) -> Self {
        self.segments_per_xfer = n;
        self
    }

    /// Sets [`same_host`](Self::same_host).
    pub fn with_same_host(mut self, on: bool) -> Self {
        self.same_host = on;
        self
    }

    /// Sets [`backend`](Self::backend).
    pub fn with_backend(mut self, backend: impl Into<String>) -> Self {
        self.backend = Some(backend.into());
        self
    }

    /// Sets [`provider`](Self::provider).
    pub fn with_provider(mut self, provider: impl Into<String>) -> Self {
        self.provider = Some(provider.into());
        self
    }

    /// Sets [`listen`](Self::listen).
    pub fn with_listen(mut self, listen: Option<&str>) -> Self {
        self.listen = listen.map(str::to_string);
        self
    }

    /// Sets [`progress_thread`](Self::progress_thread).
    pub fn with_progress_thread(mut self, on: bool) -> Self {
        self.progress_thread = on;
        self
    }

    /// Sets [`progress_idle_sleep`](Self::progress_idle_sleep).
    pub fn with_progress_idle_sleep(mut self, d: Duration) -> Self {
        self.progress_idle_sleep = d;
        self
    }

    /// Sets [`io_timeout`](Self::io_timeout).
    pub fn with_io_timeout(mut self, d: Duration) -> Self {
        self.io_timeout = d;
        self
    }

    /// Sets [`idle_timeout`](Self::idle_timeout).
    pub fn with_idle_timeout(mut self, d: Duration) -> Self {
        self.idle_timeout = d;
        self
    }

    /// Sets [`release_timeout`](Self::release_timeout).
    pub fn with_release_timeout(mut self, d: Duration) -> Self {
        self.release_timeout = d;
        self
    }

    /// Sets [`auth_key`](Self::auth_key).
    pub fn with_auth_key(mut self, key: impl Into<Vec<u8>>) -> Self {
        self.auth_key = Some(key.into());
        self
    }

    /// Sets [`transfer_timeout`](Self::transfer_timeout) to
    /// `Some(timeout)`: `Some(d)` is a deadline of `d` for every transfer,
    /// `None` no deadline. Either wins over the environment.
    pub fn with_transfer_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.transfer_timeout = Some(timeout);
        self
    }

    /// Sets [`keepalive`](Self::keepalive) to `Some(timeout)` (zero: off).
    pub fn with_keepalive(mut self, timeout: Duration) -> Self {
        self.keepalive = Some(timeout);
        self
    }

    /// The keepalive timeout in force: [`keepalive`](Self::keepalive),
    /// else [`ENV_KEEPALIVE_MS`], else [`DEFAULT_KEEPALIVE`]; zero is off.
    /// A malformed variable is an error naming it.
    pub fn effective_keepalive(&self) -> Result<Duration, Error> {
        if let Some(d) = self.keepalive {
            return Ok(d);
        }
        match std::env::var(ENV_KEEPALIVE_MS) {
            Err(_) => Ok(DEFAULT_KEEPALIVE),
            Ok(v) => v
                .trim()
                .parse::<u64>()
                .map(Duration::from_millis)
                .map_err(|_| {
                    Error::backend(
                        "kvxfer",
                        -1,
                        &format!("{ENV_KEEPALIVE_MS}={v:?}: expected milliseconds (0: off)"),
                    )
                }),
        }
    }

    /// The per-transfer deadline in effect: [`transfer_timeout`](Self::transfer_timeout)
    /// when set, else [`ENV_TRANSFER_TIMEOUT_MS`], else
    /// [`DEFAULT_TRANSFER_TIMEOUT`]; `None` (or zero) is no deadline. A
    /// malformed variable is an error naming it and its value.
    pub fn effective_transfer_timeout(&self) -> Result<Option<Duration>, Error> {
        let t = match self.transfer_timeout {
            Some(t) => t,
            None => match std::env::var(ENV_TRANSFER_TIMEOUT_MS) {
                Err(_) => Some(DEFAULT_TRANSFER_TIMEOUT),
                Ok(v) => parse_transfer_timeout(&v)?,
            },
        };
        Ok(t.filter(|d| !d.is_zero()))
    }

    /// The rails in effect: [`rails`](Self::rails), else `KVXFER_RAILS`;
    /// empty for one endpoint as the provider chooses.
    pub fn effective_rails(&self) -> Vec<String> {
        match &self.rails {
            Some(r) => r.clone(),
            None => kvxfer_rails::rails_from_env().unwrap_or_default(),
        }
    }

    /// This configuration over the network interfaces `names`, one rail
    /// each (see [`rails`](Self::rails)).
    pub fn with_rails(mut self, names: &[&str]) -> Self {
        self.rails = Some(names.iter().map(|s| (*s).to_owned()).collect());
        self
    }

    /// Sets [`rail_map`](Self::rail_map): with two or more rails, host
    /// memory of NUMA node N (`numaN=IF+IF`) or VRAM of GPU N
    /// (`gpuN=IF`) goes over the interfaces named, while one of them
    /// works, whatever the topology says; other memory keeps the
    /// topology's choice. Checked when the agent is made: an unknown
    /// interface or key fails [`Agent::new`](crate::Agent::new) naming it.
    pub fn with_rail_map(mut self, map: &str) -> Self {
        self.rail_map = Some(map.to_owned());
        self
    }

    /// Sets [`sysfs_root`](Self::sysfs_root).
    pub fn with_sysfs_root(mut self, root: impl Into<std::path::PathBuf>) -> Self {
        self.sysfs_root = Some(root.into());
        self
    }

    /// The explicit rail map in effect over the rails `rails`:
    /// [`rail_map`](Self::rail_map), else `KVXFER_RAIL_MAP`, else none.
    /// An error names the source and the bad item, e.g.
    /// `KVXFER_RAIL_MAP: unknown rail "eth9" (rails: eth0, eth1)`.
    pub fn effective_rail_map(
        &self,
        rails: &[String],
    ) -> Result<Vec<kvxfer_core::rails::MapEntry>, Error> {
        let (src, v) = match &self.rail_map {
            Some(m) => ("rail map", m.clone()),
            None => match std::env::var(kvxfer_rails::ENV_RAIL_MAP) {
                Ok(v) => (kvxfer_rails::ENV_RAIL_MAP, v),
                Err(_) => return Ok(Vec::new()),
            },
        };
        kvxfer_rails::parse_rail_map(&v, rails)
            .map_err(|e| Error::backend("kvxfer", -1, &format!("{src}: {e}")))
    }

    /// The side-channel key in effect: the configured one, else
    /// `KVXFER_AUTH_KEY`; `None` when neither is set or it is empty.
    pub fn effective_auth_key(&self) -> Option<Vec<u8>> {
        let key = match &self.auth_key {
            Some(k) => k.clone(),
            None => std::env::var_os(ENV_AUTH_KEY)
                .map(|v| v.into_encoded_bytes())
                .unwrap_or_default(),
        };
        (!key.is_empty()).then_some(key)
    }
}

/// The deadline [`ENV_TRANSFER_TIMEOUT_MS`] asks for: milliseconds, `0`
/// for none.
fn parse_transfer_timeout(v: &str) -> Result<Option<Duration>, Error> {
    match v.trim().parse::<u64>() {
        Ok(0) => Ok(None),
        Ok(ms) => Ok(Some(Duration::from_millis(ms))),
        Err(_) => Err(Error::backend(
            "kvxfer",
            -1,
            &format!("{ENV_TRANSFER_TIMEOUT_MS}={v:?}: expected milliseconds (0 for no deadline)"),
        )),
    }
}

#[cfg(all(test, feature = "ucx", feature = "libfabric"))]
mod tests {
    use super::*;

    fn unsupported(value: &str) -> Error {
        Error::UnsupportedBackend {
            value: kvxfer_core::error::bounded(value),
            supported: BUILT_IN,
        }
    }

    #[test]
    fn default_is_ucx() {
        assert_eq!(
            select_backend(None, None, None).unwrap(),
            (BackendKind::Ucx, BackendSource::Default)
        );
        assert_eq!(
            select_backend(Some(""), Some("  "), None).unwrap(),
            (BackendKind::Ucx, BackendSource::Default)
        );
    }

    #[test]
    fn order_is_config_then_kvxfer_then_trtllm() {
        assert_eq!(
            select_backend(Some("libfabric"), Some("UCX"), Some("UCX")).unwrap(),
            (BackendKind::Libfabric, BackendSource::Config)
        );
        assert_eq!(
            select_backend(None, Some("LibFabric"), Some("UCX")).unwrap(),
            (BackendKind::Libfabric, BackendSource::EnvKvxfer)
        );
        assert_eq!(
            select_backend(None, None, Some(" LIBFABRIC ")).unwrap(),
            (BackendKind::Libfabric, BackendSource::EnvTrtllm)
        );
        assert_eq!(
            select_backend(None, Some("ucx"), None).unwrap(),
            (BackendKind::Ucx, BackendSource::EnvKvxfer)
        );
    }

    #[test]
    fn unknown_value_is_an_error_naming_it() {
        assert_eq!(
            select_backend(None, Some("NCCL"), None),
            Err(unsupported("NCCL"))
        );
        assert_eq!(
            select_backend(None, None, Some("mooncake")),
            Err(unsupported("mooncake"))
        );
        assert_eq!(select_backend(Some("x"), None, None), Err(unsupported("x")));
        // A bad higher-priority value is an error, not a fall-through.
        assert_eq!(
            select_backend(None, Some("bogus"), Some("UCX")),
            Err(unsupported("bogus"))
        );
        let text = select_backend(None, Some("NCCL"), None)
            .unwrap_err()
            .to_string();
        assert_eq!(
            text,
            format!("unsupported backend \"NCCL\"; supported: {BUILT_IN}")
        );
    }

    #[test]
    #[cfg(not(feature = "cuda"))]
    fn known_but_not_built_in() {
        assert_eq!(
            select_backend(None, Some("cuda_ipc"), None),
            Err(unsupported("cuda_ipc"))
        );
    }

    #[test]
    fn config_builder_and_defaults() {
        let c = AgentConfig::default();
        assert_eq!(c.listen.as_deref(), Some("127.0.0.1:0"));
        assert!(c.progress_thread);
        assert_eq!(c.io_timeout, Duration::from_secs(5));
        let c = c
            .with_listen(None)
            .with_progress_thread(false)
            .with_provider("shm")
            .with_auth_key("k");
        assert_eq!(c.listen, None);
        assert!(!c.progress_thread);
        assert_eq!(c.provider.as_deref(), Some("shm"));
        assert_eq!(c.effective_auth_key().as_deref(), Some(&b"k"[..]));
        assert_eq!(
            AgentConfig::default()
                .with_auth_key("")
                .effective_auth_key(),
            None
        );
        assert!(!format!("{c:?}").contains("\"k\""));
    }

    #[test]
    fn transport_settings_builder() {
        let c = AgentConfig::default();
        assert_eq!(c.transfer_timeout, None);
        assert_eq!(c.ucx_config(), None);
        assert_eq!(c.fabric_config(), None);
        // Nothing set: libfabric's defaults, provider left to the transport.
        assert_eq!(c.effective_fabric_config(), FabricConfig::default());

        let ms300 = Duration::from_millis(300);
        let c = AgentConfig::default().with_transfer_timeout(Some(ms300));
        assert_eq!(c.transfer_timeout, Some(Some(ms300)));
        assert_eq!(c.effective_transfer_timeout(), Ok(Some(ms300)));
        // The deadline does not touch the transport's configuration.
        assert_eq!(c.effective_fabric_config(), FabricConfig::default());
        assert_eq!(
            AgentConfig::default()
                .with_transfer_timeout(None)
                .transfer_timeout,
            Some(None)
        );
        for none in [None, Some(Duration::ZERO)] {
            let c = AgentConfig::default().with_transfer_timeout(none);
            assert_eq!(c.effective_transfer_timeout(), Ok(None));
        }

        // An explicit UCX configuration is used as given ...
        let mut uc = UcxConfig::default();
        uc.cancel_timeout = Duration::from_millis(123);
        uc.close_timeout = Duration::from_millis(45);
        uc.keepalive_interval = Some(Duration::from_millis(250));
        let c = AgentConfig::default().with_ucx_config(uc.clone());
        assert_eq!(c.ucx_config(), Some(&uc));
        assert_eq!(c.effective_ucx_config().unwrap(), uc);
        // The deadline does not touch it.
        let c = c.with_transfer_timeout(Some(ms300));
        assert_eq!(c.effective_ucx_config().unwrap(), uc);
        // Peer-failure detection off is refused, naming the setting.
        let mut off = uc.clone();
        off.peer_failure_detection = false;
        let err = AgentConfig::default()
            .with_ucx_config(off)
            .effective_ucx_config()
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("UCX error -1: UcxConfig::peer_failure_detection = false:"),
            "{err}"
        );

        // The same for libfabric, with the neutral provider on top.
        let fc = FabricConfig::default()
            .with_provider("shm")
            .with_cancel_timeout(Duration::from_secs(2));
        let c = AgentConfig::default().with_fabric_config(fc.clone());
        assert_eq!(c.fabric_config(), Some(&fc));
        assert_eq!(c.effective_fabric_config(), fc);
        let eff = c
            .with_provider("tcp;ofi_rxm")
            .with_transfer_timeout(Some(ms300))
            .effective_fabric_config();
        assert_eq!(eff.provider.as_deref(), Some("tcp;ofi_rxm"));
        assert_eq!(eff.cancel_timeout, Duration::from_secs(2));
        assert_eq!(eff.max_transfers, fc.max_transfers);

        let text = format!(
            "{:?}",
            AgentConfig::default()
                .with_transfer_timeout(Some(ms300))
                .with_ucx_config(uc)
        );
        assert!(
            text.contains("transfer_timeout: Some(Some(300ms))"),
            "{text}"
        );
        assert!(text.contains("cancel_timeout: 123ms"), "{text}");
    }

    #[test]
    fn transfer_timeout_spellings() {
        assert_eq!(parse_transfer_timeout("0"), Ok(None));
        assert_eq!(
            parse_transfer_timeout(" 1500 "),
            Ok(Some(Duration::from_millis(1500)))
        );
        for bad in ["", "-1", "5s", "1.5"] {
            let text = parse_transfer_timeout(bad).unwrap_err().to_string();
            assert_eq!(
                text,
                format!(
                    "kvxfer error -1: {ENV_TRANSFER_TIMEOUT_MS}={bad:?}: expected milliseconds \
                     (0 for no deadline)"
                )
            );
        }
    }
}

#[cfg(test)]
mod rail_map_tests {
    use super::*;
    use kvxfer_core::rails::{MapEntry, MapKey};

    fn rails() -> Vec<String> {
        ["eth0", "eth1", "eth2"].map(String::from).to_vec()
    }

    #[test]
    fn rail_map_is_resolved_to_rail_indices() {
        let c = AgentConfig::default().with_rail_map("numa0=eth2+eth1,gpu3=eth0");
        let e = |key, rail| MapEntry { key, rail };
        assert_eq!(
            c.effective_rail_map(&rails()).unwrap(),
            [
                e(MapKey::Numa(0), 2),
                e(MapKey::Numa(0), 1),
                e(MapKey::Gpu(3), 0)
            ]
        );
    }

    #[test]
    fn bad_rail_maps_are_named_exactly() {
        let err = |m: &str| {
            AgentConfig::default()
                .with_rail_map(m)
                .effective_rail_map(&rails())
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            err("numa0=eth0+eth9"),
            "kvxfer error -1: rail map: unknown rail \"eth9\" (rails: eth0, eth1, eth2)"
        );
        assert_eq!(
            err("socket1=eth0"),
            "kvxfer error -1: rail map: bad key \"socket1\" (numaN or gpuN)"
        );
        assert_eq!(
            err("gpu0:eth0"),
            "kvxfer error -1: rail map: \"gpu0:eth0\" is not KEY=IF+IF"
        );
    }
}
