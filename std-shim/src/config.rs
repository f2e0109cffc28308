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

use std::fmt;
use std::time::Duration;

use kvxfer_core::Error;

/// The first environment variable consulted for the backend.
pub const ENV_BACKEND: &str = "KVXFER_BACKEND";
/// TensorRT-LLM's variable, consulted when [`ENV_BACKEND`] is unset.
pub const ENV_TRTLLM_BACKEND: &str = "TRTLLM_NIXL_KVCACHE_BACKEND";
/// The environment variable holding the side channel's shared key.
pub const ENV_AUTH_KEY: &str = "KVXFER_AUTH_KEY";

pub use kvxfer_core::BackendKind;

/// The backends built into this kvxfer (cargo features `ucx`, `libfabric`,
/// `cuda`), comma separated, as named in [`Error::UnsupportedBackend`].
pub const BUILT_IN: &str = match (
    cfg!(feature = "ucx"),
    cfg!(feature = "libfabric"),
    cfg!(feature = "cuda"),
) {
    (true, true, true) => "UCX, LIBFABRIC, CUDA_IPC",
    (true, true, false) => "UCX, LIBFABRIC",
    (true, false, true) => "UCX, CUDA_IPC",
    (true, false, false) => "UCX",
    (false, true, true) => "LIBFABRIC, CUDA_IPC",
    (false, true, false) => "LIBFABRIC",
    (false, false, true) => "CUDA_IPC",
    (false, false, false) => "none",
};

/// Whether this build of kvxfer contains `kind`.
pub const fn is_built_in(kind: BackendKind) -> bool {
    match kind {
        BackendKind::Ucx => cfg!(feature = "ucx"),
        BackendKind::Libfabric => cfg!(feature = "libfabric"),
        BackendKind::CudaIpc => cfg!(feature = "cuda"),
    }
}

/// Where the chosen backend's name came from; names the source in errors.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum BackendSource {
    /// [`AgentConfig::backend`].
    Config,
    /// The `KVXFER_BACKEND` variable.
    EnvKvxfer,
    /// The `TRTLLM_NIXL_KVCACHE_BACKEND` variable.
    EnvTrtllm,
    /// Nothing was set: the default, UCX.
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
        .unwrap_or(("UCX", BackendSource::Default));
    let unsupported = || Error::UnsupportedBackend {
        value: kvxfer_core::error::bounded(value),
        supported: BUILT_IN,
    };
    match BackendKind::parse(value) {
        Ok(kind) if is_built_in(kind) => Ok((kind, source)),
        _ => Err(unsupported()),
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
    /// is in flight (default 100 µs). In flight, it only yields.
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
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            backend: None,
            provider: None,
            listen: Some(DEFAULT_LISTEN.to_string()),
            progress_thread: true,
            progress_idle_sleep: DEFAULT_PROGRESS_IDLE_SLEEP,
            io_timeout: DEFAULT_IO_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            release_timeout: DEFAULT_RELEASE_TIMEOUT,
            auth_key: None,
        }
    }
}

impl fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentConfig")
            .field("backend", &self.backend)
            .field("provider", &self.provider)
            .field("listen", &self.listen)
            .field("progress_thread", &self.progress_thread)
            .field("progress_idle_sleep", &self.progress_idle_sleep)
            .field("io_timeout", &self.io_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("release_timeout", &self.release_timeout)
            .field("auth_key", &self.auth_key.as_ref().map(|_| "<set>"))
            .finish()
    }
}

impl AgentConfig {
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

#[cfg(all(test, feature = "ucx", feature = "libfabric"))]
mod tests {
    use super::*;

    fn unsupported(value: &str) -> Error {
        Error::UnsupportedBackend {
            value: kvxfer_core::error::bounded(value),
            supported: "UCX, LIBFABRIC",
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
}
