//! The backends built into kvxfer, one file each, listed once in
//! `with_backends!` below.
//!
//! A backend's file holds its [`Descriptor`] (compiled in every build, so
//! that a build without it can say how to get it) and, under its cargo
//! feature, the transport the agent drives (`Transport`), how to build it
//! from an [`AgentConfig`] and the engine's per-transfer deadline (`build`), its own configuration (`Config`,
//! `settings`), what `kvxfer bench` checks before starting (`preflight`)
//! and what `kvxfer info` shows (`report`). The enum [`BackendKind`], the
//! agent's dispatch and the list of backends in errors are generated from
//! the list.

use kvxfer_core::{EngineConfig, Error, Storage, Transport};

use crate::agent::AgentEngine;
use crate::config::AgentConfig;

/// Calls `$m! { { args } Variant module "feature", … }` with every
/// backend kvxfer knows, in the order users see them, the default first:
/// `module` is the
/// backend's file in this folder. A new backend is a line here, its file,
/// its cargo feature and its crate.
macro_rules! with_backends {
    ($m:ident! { $($args:tt)* }) => {
        $m! { { $($args)* }
            Ucx ucx "ucx",
            Libfabric libfabric "libfabric",
            CudaIpc cuda_ipc "cuda"
        }
    };
}

/// Runs `$body` with `$e` bound to the engine (`&mut AgentEngine<_>`) of
/// `$engines` (an [`Engines`] place), whichever backend it is.
macro_rules! on_engine {
    ($engines:expr, $e:ident => $body:expr) => {
        $crate::backends::with_backends!(on_engine_arms! { $engines, $e, $body })
    };
}

/// The arms of [`on_engine!`], one per backend built in.
macro_rules! on_engine_arms {
    ({ $engines:expr, $e:ident, $body:expr } $($v:ident $m:ident $f:literal),*) => {
        match *$engines {
            $(
                #[cfg(feature = $f)]
                $crate::backends::Engines::$v(ref mut $e) => $body,
            )*
            #[cfg(feature = "ucx")]
            $crate::backends::Engines::UcxRails(ref mut $e) => $body,
        }
    };
}

pub(crate) use {on_engine, on_engine_arms, with_backends};

/// What a backend is, as users see it: the same in every build.
#[derive(Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Descriptor {
    /// The name it is selected by and named by in errors; the same as its
    /// transport's [`Transport::name`].
    pub name: &'static str,
    /// [`name`](Self::name) as a C string, for the C API.
    pub c_name: &'static core::ffi::CStr,
    /// Other names it is selected by.
    pub aliases: &'static [&'static str],
    /// What building it in needs besides its cargo feature, if anything.
    pub needs: Option<&'static str>,
    /// Its settings: configuration methods and environment variables.
    pub settings: &'static [&'static str],
}

/// The generated part: [`BackendKind`], [`Engines`], [`build`] and the
/// per-backend hooks' dispatch.
macro_rules! declare {
    ({} $($v:ident $m:ident $f:literal),*) => {
        $(mod $m;)*

        /// A backend kvxfer knows, built in or not: see
        /// [`is_built_in`](BackendKind::is_built_in) and
        /// [`descriptor`](BackendKind::descriptor).
        #[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
        pub enum BackendKind {
            $(
                #[doc = concat!("Cargo feature `", $f, "`.")]
                $v,
            )*
        }

        impl BackendKind {
            /// Every backend, in the order they are listed to users.
            pub const ALL: &'static [BackendKind] = &[$(BackendKind::$v),*];

            /// The backend used when nothing names one: the first listed.
            pub const DEFAULT: BackendKind = BackendKind::ALL[0];

            /// What the backend is: name, aliases, settings.
            pub const fn descriptor(self) -> &'static Descriptor {
                match self {
                    $(BackendKind::$v => &$m::DESCRIPTOR,)*
                }
            }

            /// The cargo feature that builds it in.
            pub const fn feature(self) -> &'static str {
                match self {
                    $(BackendKind::$v => $f,)*
                }
            }

            /// Whether this build of kvxfer contains it.
            pub const fn is_built_in(self) -> bool {
                match self {
                    $(BackendKind::$v => cfg!(feature = $f),)*
                }
            }

            /// Checks, before an agent is made, what can be checked of
            /// the backend on this machine (the libfabric `provider`
            /// offered, a CUDA driver present); the error says what is
            /// missing.
            pub fn preflight(self, provider: Option<&str>) -> Result<(), String> {
                match self {
                    $(
                        #[cfg(feature = $f)]
                        BackendKind::$v => $m::preflight(provider),
                    )*
                    #[allow(unreachable_patterns)]
                    _ => {
                        let _ = provider;
                        Ok(())
                    }
                }
            }

            /// What `kvxfer info` shows of a backend built in: its
            /// library's version and what works on this machine, one line
            /// each; `None` when it is not built in.
            pub fn report(self) -> Option<String> {
                match self {
                    $(
                        #[cfg(feature = $f)]
                        BackendKind::$v => Some($m::report()),
                    )*
                    #[allow(unreachable_patterns)]
                    _ => None,
                }
            }
        }

        /// One engine per backend built in.
        pub(crate) enum Engines {
            $(
                #[cfg(feature = $f)]
                $v(Box<AgentEngine<$m::Transport>>),
            )*
            /// UCX over several network rails ([`AgentConfig::rails`]
            /// naming more than one): one UCP context per rail.
            #[cfg(feature = "ucx")]
            UcxRails(Box<AgentEngine<ucx::RailsTransport>>),
        }

        /// Builds the transport and engine of `kind` from `cfg`.
        pub(crate) fn build(
            kind: BackendKind,
            name: &str,
            cfg: &AgentConfig,
        ) -> Result<Engines, Error> {
            cfg.capacities.check()?;
            let deadline = cfg.effective_transfer_timeout()?;
            // UCX over several rails; one rail or none keeps the plain
            // transport (no rails layer on its path).
            #[cfg(feature = "ucx")]
            if kind == BackendKind::Ucx && cfg.effective_rails().len() > 1 {
                let t = ucx::build_rails(name, cfg, deadline)?;
                return Ok(Engines::UcxRails(boxed_engine(name, t, cfg, deadline)?));
            }
            match kind {
                $(
                    #[cfg(feature = $f)]
                    BackendKind::$v => {
                        let t = $m::build(name, cfg, deadline)?;
                        Ok(Engines::$v(boxed_engine(name, t, cfg, deadline)?))
                    }
                )*
                #[allow(unreachable_patterns)]
                other => Err(unsupported(other.name())),
            }
        }

        /// Each backend's own configuration in an
        /// [`AgentConfig`](crate::AgentConfig), `None` until set.
        #[derive(Clone, Debug, Default, PartialEq, Eq)]
        #[allow(dead_code)]
        pub(crate) struct BackendConfigs {
            $(
                #[cfg(feature = $f)]
                pub(crate) $m: Option<$m::Config>,
            )*
        }

        /// The configuration types of the backends built in.
        pub mod settings {
            $(
                #[cfg(feature = $f)]
                #[allow(unused_imports)]
                pub use super::$m::settings::*;
            )*
        }

        /// Bytes the tables of an engine over each built-in backend's
        /// transport take with `caps`.
        #[cfg(test)]
        pub(crate) fn table_bytes(caps: &kvxfer_core::Capacities) -> Vec<u64> {
            vec![$(
                #[cfg(feature = $f)]
                caps.bytes::<$m::Transport>(),
            )*]
        }
    };
}

with_backends!(declare! {});

/// The backends built into this kvxfer, comma separated, as named in
/// [`Error::UnsupportedBackend`] ("none" when there is none).
pub const BUILT_IN: &str = match core::str::from_utf8(&BUILT_IN_BYTES) {
    Ok(s) => s,
    Err(_) => panic!("backend names are UTF-8"),
};

/// The bytes of [`BUILT_IN`], joined at compile time.
const BUILT_IN_BYTES: [u8; built_in_len()] = built_in_bytes();

const fn built_in_len() -> usize {
    let mut n = 0;
    let mut i = 0;
    while i < BackendKind::ALL.len() {
        let k = BackendKind::ALL[i];
        if k.is_built_in() {
            if n > 0 {
                n += 2;
            }
            n += k.descriptor().name.len();
        }
        i += 1;
    }
    if n == 0 {
        "none".len()
    } else {
        n
    }
}

const fn built_in_bytes() -> [u8; built_in_len()] {
    let mut out = [0u8; built_in_len()];
    let mut n = 0;
    let mut i = 0;
    while i < BackendKind::ALL.len() {
        let k = BackendKind::ALL[i];
        if k.is_built_in() {
            if n > 0 {
                out[n] = b',';
                out[n + 1] = b' ';
                n += 2;
            }
            let name = k.descriptor().name.as_bytes();
            let mut j = 0;
            while j < name.len() {
                out[n] = name[j];
                n += 1;
                j += 1;
            }
        }
        i += 1;
    }
    if n == 0 {
        let none = b"none";
        let mut j = 0;
        while j < none.len() {
            out[j] = none[j];
            j += 1;
        }
    }
    out
}

impl BackendKind {
    /// The backend's name ("UCX", "LIBFABRIC", …); the same as its
    /// transport's [`Transport::name`].
    pub const fn name(self) -> &'static str {
        self.descriptor().name
    }

    /// Parses a backend name or alias, ignoring ASCII case and surrounding
    /// white space, whether built in or not. Anything else, the empty
    /// string included, is [`Error::UnsupportedBackend`] naming
    /// [`BUILT_IN`].
    pub fn parse(value: &str) -> Result<BackendKind, Error> {
        let v = value.trim();
        BackendKind::ALL
            .iter()
            .copied()
            .find(|k| {
                let d = k.descriptor();
                d.name.eq_ignore_ascii_case(v)
                    || d.aliases.iter().any(|a| a.eq_ignore_ascii_case(v))
            })
            .ok_or_else(|| unsupported(value))
    }
}

impl core::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

impl core::str::FromStr for BackendKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        BackendKind::parse(s)
    }
}

/// [`Error::UnsupportedBackend`] for `value`, naming [`BUILT_IN`].
pub(crate) fn unsupported(value: &str) -> Error {
    Error::UnsupportedBackend {
        value: kvxfer_core::error::bounded(value),
        supported: BUILT_IN,
    }
}

/// What the agent asks of a backend's transport beyond [`Transport`].
pub(crate) trait AgentTransport: Transport {
    /// A count that moves whenever the transport did work while polled
    /// (requests served for peers included); constant when not reported.
    fn activity(&self) -> u64 {
        0
    }

    /// Peers whose transfers may need this agent to make progress for them
    /// (served in software, not by cross-memory attach).
    fn far_peers(&self) -> usize {
        0
    }

    /// Whether `peer` is reached by cross-memory attach, watched by its
    /// pidfd instead of the agent's keepalive.
    fn is_near(&self, peer: &Self::Peer) -> bool {
        let _ = peer;
        false
    }

    /// Whether the agent's keepalive probes this transport's peers.
    fn keepalive(&self) -> bool {
        true
    }

    /// How VRAM moves: see [`Agent::vram_path`](crate::Agent::vram_path).
    fn vram_path(&self) -> &'static str;

    /// Why VRAM moves as [`vram_path`](Self::vram_path) says: see
    /// [`Agent::vram_reason`](crate::Agent::vram_reason).
    fn vram_reason(&self) -> String {
        "this kvxfer is built without the cuda feature".to_string()
    }

    /// Bytes, failures and state of each network rail: see
    /// [`Agent::rail_stats`](crate::Agent::rail_stats).
    fn rail_stats(&self) -> Vec<kvxfer_rails::RailStats> {
        Vec::new()
    }

    /// What each network rail runs on (UCX's network transports,
    /// libfabric's provider), in the order of
    /// [`rail_stats`](Self::rail_stats); none without rails.
    #[cfg(any(feature = "libfabric", feature = "ucx"))]
    fn rail_devices(&self) -> Vec<String> {
        Vec::new()
    }
}

/// A new engine over `transport`, with tables sized from `cfg` and
/// per-transfer deadline `deadline`.
pub(crate) fn boxed_engine<T: Transport>(
    name: &str,
    transport: T,
    cfg: &AgentConfig,
    deadline: Option<core::time::Duration>,
) -> Result<Box<AgentEngine<T>>, Error> {
    let config = EngineConfig::default()
        .with_segments_per_xfer(cfg.segments_per_xfer)
        .with_deadline(deadline);
    let storage = Storage::owned(&cfg.capacities);
    Ok(Box::new(kvxfer_core::Engine::new(
        name, transport, config, storage,
    )?))
}

/// Same-host peers of a host-memory transport over cross-memory attach
/// ([`AgentConfig::same_host`]).
#[allow(dead_code)]
pub(crate) type Local<T> = kvxfer_local::Local<T>;

/// A host-memory transport as the agent uses it: same-host peers by
/// cross-memory attach and, with the `cuda` feature, VRAM staged through
/// pinned host memory ([`kvxfer_cuda::Staged`]).
#[cfg(feature = "cuda")]
#[allow(dead_code)]
pub(crate) type HostMemory<T> = kvxfer_cuda::Staged<Local<T>>;
/// A host-memory transport as the agent uses it: same-host peers by
/// cross-memory attach.
#[cfg(not(feature = "cuda"))]
#[allow(dead_code)]
pub(crate) type HostMemory<T> = Local<T>;

/// Wraps a host-memory transport into [`HostMemory`]. A peer's answer to a
/// staging request gets `deadline`, the transport's per-transfer deadline
/// (`None`: none).
#[allow(dead_code)]
pub(crate) fn host_memory<T: Transport>(
    t: T,
    cfg: &AgentConfig,
    deadline: Option<core::time::Duration>,
) -> HostMemory<T> {
    let mut lc = kvxfer_local::LocalConfig::from_env();
    lc.enabled &= cfg.same_host;
    let t = kvxfer_local::Local::new(t, lc);
    #[cfg(feature = "cuda")]
    let t = kvxfer_cuda::Staged::with_config(
        t,
        kvxfer_cuda::StagingConfig {
            reply_timeout: deadline.unwrap_or(core::time::Duration::MAX),
            ..kvxfer_cuda::StagingConfig::default()
        },
    );
    #[cfg(not(feature = "cuda"))]
    let _ = deadline;
    t
}

/// The [`AgentTransport`] methods that every [`HostMemory`] transport
/// answers from its same-host layer: `far_peers`, `is_near`, `vram_path`.
macro_rules! host_memory_methods {
    () => {
        fn far_peers(&self) -> usize {
            $crate::backends::local_of(self).far_peers()
        }

        fn is_near(&self, peer: &Self::Peer) -> bool {
            $crate::backends::local_of(self).is_near(peer)
        }

        fn vram_path(&self) -> &'static str {
            $crate::backends::host_memory_vram_path(self)
        }
    };
}
#[allow(unused_imports)]
pub(crate) use host_memory_methods;

/// The same-host layer of a [`HostMemory`] transport.
#[allow(dead_code)]
pub(crate) fn local_of<T: Transport>(t: &HostMemory<T>) -> &Local<T> {
    #[cfg(feature = "cuda")]
    return t.inner();
    #[cfg(not(feature = "cuda"))]
    return t;
}

/// Requests the staging layer of a [`HostMemory`] transport served for
/// peers (0 without the `cuda` feature).
#[allow(dead_code)]
pub(crate) fn staging_events<T: Transport>(t: &HostMemory<T>) -> u64 {
    #[cfg(feature = "cuda")]
    return t.staging_events();
    #[cfg(not(feature = "cuda"))]
    return {
        let _ = t;
        0
    };
}

/// How VRAM moves over a [`HostMemory`] transport: "native", "staged", or
/// "none" without the `cuda` feature.
#[allow(dead_code)]
pub(crate) fn host_memory_vram_path<T: Transport>(t: &HostMemory<T>) -> &'static str {
    #[cfg(feature = "cuda")]
    return if t.native_vram() { "native" } else { "staged" };
    #[cfg(not(feature = "cuda"))]
    return {
        let _ = t;
        "none"
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_case_insensitive_and_blank_is_refused() {
        assert_eq!(BackendKind::parse(" ucx "), Ok(BackendKind::Ucx));
        assert_eq!("LibFabric".parse(), Ok(BackendKind::Libfabric));
        assert_eq!(BackendKind::parse("cuda_ipc"), Ok(BackendKind::CudaIpc));
        assert_eq!(BackendKind::parse(""), Err(unsupported("")));
        let e = BackendKind::parse("verbs").unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("unsupported backend \"verbs\"; supported: {BUILT_IN}")
        );
    }

    #[test]
    fn descriptors_agree_with_the_list() {
        let names: Vec<&str> = BackendKind::ALL.iter().map(|k| k.name()).collect();
        assert_eq!(names, ["UCX", "LIBFABRIC", "CUDA_IPC"]);
        assert_eq!(BackendKind::DEFAULT, BackendKind::Ucx);
        for &k in BackendKind::ALL {
            let d = k.descriptor();
            assert_eq!(d.c_name.to_str(), Ok(d.name));
            assert_eq!(k.to_string(), d.name);
            for a in d.aliases {
                assert_eq!(BackendKind::parse(a), Ok(k));
            }
        }
        assert_eq!(
            [
                BackendKind::Ucx,
                BackendKind::Libfabric,
                BackendKind::CudaIpc
            ]
            .map(|k| k.feature()),
            ["ucx", "libfabric", "cuda"]
        );
    }

    #[test]
    fn built_in_lists_the_features_built() {
        let want: Vec<&str> = [
            (cfg!(feature = "ucx"), "UCX"),
            (cfg!(feature = "libfabric"), "LIBFABRIC"),
            (cfg!(feature = "cuda"), "CUDA_IPC"),
        ]
        .into_iter()
        .filter_map(|(on, n)| on.then_some(n))
        .collect();
        let want = if want.is_empty() {
            "none".to_string()
        } else {
            want.join(", ")
        };
        assert_eq!(BUILT_IN, want);
        for &k in BackendKind::ALL {
            assert_eq!(k.is_built_in(), BUILT_IN.split(", ").any(|n| n == k.name()));
            assert_eq!(k.report().is_some(), k.is_built_in());
        }
    }
}
