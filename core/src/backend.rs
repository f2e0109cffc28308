//! Backend selection: which transport an agent uses.

use core::fmt;

use crate::error::{bounded, Error};

/// A transport backend users can select.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// UCX (`libucp`): the default.
    Ucx,
    /// libfabric (OFI).
    Libfabric,
    /// CUDA IPC, GPU to GPU on one host.
    CudaIpc,
}

impl BackendKind {
    /// Every backend, in the order they are listed to users.
    pub const ALL: [BackendKind; 3] = [
        BackendKind::Ucx,
        BackendKind::Libfabric,
        BackendKind::CudaIpc,
    ];

    /// The accepted names, as listed in errors.
    pub const SUPPORTED: &'static str = "UCX, LIBFABRIC, CUDA_IPC";

    /// The backend's name: "UCX", "LIBFABRIC" or "CUDA_IPC"; the same as
    /// its transport's [`Transport::name`](crate::transport::Transport::name).
    pub const fn name(self) -> &'static str {
        match self {
            BackendKind::Ucx => "UCX",
            BackendKind::Libfabric => "LIBFABRIC",
            BackendKind::CudaIpc => "CUDA_IPC",
        }
    }

    /// Parses a backend name, ignoring ASCII case and surrounding white
    /// space. Anything else, the empty string included, is
    /// [`Error::UnsupportedBackend`].
    pub fn parse(value: &str) -> Result<BackendKind, Error> {
        let v = value.trim();
        BackendKind::ALL
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(v))
            .ok_or_else(|| Error::UnsupportedBackend {
                value: bounded(value),
                supported: BackendKind::SUPPORTED,
            })
    }

    /// Picks the backend from, in order of precedence, the application's
    /// configuration, `KVXFER_BACKEND` and `TRTLLM_NIXL_KVCACHE_BACKEND`:
    /// the first that is set and not blank decides; when none is, UCX.
    pub fn select(
        config: Option<&str>,
        kvxfer_env: Option<&str>,
        trtllm_env: Option<&str>,
    ) -> Result<BackendKind, Error> {
        match [config, kvxfer_env, trtllm_env]
            .into_iter()
            .flatten()
            .find(|v| !v.trim().is_empty())
        {
            Some(v) => BackendKind::parse(v),
            None => Ok(BackendKind::Ucx),
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl core::str::FromStr for BackendKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        BackendKind::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_or_empty_means_ucx() {
        assert_eq!(BackendKind::select(None, None, None), Ok(BackendKind::Ucx));
        assert_eq!(
            BackendKind::select(Some(""), Some("  "), None),
            Ok(BackendKind::Ucx)
        );
    }

    #[test]
    fn names_are_case_insensitive_and_first_set_wins() {
        assert_eq!(
            BackendKind::select(None, Some("libfabric"), Some("UCX")),
            Ok(BackendKind::Libfabric)
        );
        assert_eq!(
            BackendKind::select(Some("Ucx"), Some("LIBFABRIC"), None),
            Ok(BackendKind::Ucx)
        );
        assert_eq!(
            BackendKind::select(Some(""), None, Some("cuda_ipc")),
            Ok(BackendKind::CudaIpc)
        );
        assert_eq!(
            "LibFabric".parse::<BackendKind>(),
            Ok(BackendKind::Libfabric)
        );
    }

    #[test]
    fn unknown_names_are_refused_with_the_list() {
        let e = BackendKind::select(None, Some("verbs"), Some("UCX")).unwrap_err();
        assert_eq!(
            e,
            Error::UnsupportedBackend {
                value: bounded("verbs"),
                supported: "UCX, LIBFABRIC, CUDA_IPC"
            }
        );
        let mut s: heapless::String<128> = heapless::String::new();
        core::fmt::write(&mut s, format_args!("{e}")).unwrap();
        assert_eq!(
            s.as_str(),
            "unsupported backend \"verbs\"; supported: UCX, LIBFABRIC, CUDA_IPC"
        );
    }
}
