//! UCX (`libucp`), the default backend: [`kvxfer_ucx`] under same-host
//! cross-memory attach and, with the `cuda` feature, VRAM staging.

use super::Descriptor;

/// UCX as users see it.
pub(super) const DESCRIPTOR: Descriptor = Descriptor {
    name: "UCX",
    c_name: c"UCX",
    aliases: &[],
    needs: Some("libucx-dev"),
    settings: &[
        "AgentConfig::with_ucx_config",
        "KVXFER_UCX_NATIVE_VRAM",
        "AgentConfig::with_rails",
        "KVXFER_RAILS",
        "UCX_TLS and UCX's other variables",
    ],
};

#[cfg(feature = "ucx")]
pub(super) use imp::*;

#[cfg(feature = "ucx")]
mod imp {
    use std::time::Duration;

    use kvxfer_core::Error;
    use kvxfer_ucx::{UcxConfig, UcxTransport};

    use crate::backends::{
        host_memory, local_of, staging_events, AgentTransport, HostMemory,
    };
    use crate::config::AgentConfig;

    /// The transport the agent drives.
    pub(crate) type Transport = HostMemory<UcxTransport>;
    /// UCX's own settings in an [`AgentConfig`].
    pub(crate) type Config = UcxConfig;

    /// Re-exported as `kvxfer::config::UcxConfig`.
    pub(crate) mod settings {
        pub use kvxfer_ucx::UcxConfig;
    }

    /// The transport of an agent named `name` with `cfg`
    /// ([`AgentConfig::effective_ucx_config`]); `deadline` bounds the wait
    /// for a peer's answer to a staging request.
    pub(crate) fn build(
        name: &str,
        cfg: &AgentConfig,
        deadline: Option<Duration>,
    ) -> Result<Transport, Error> {
        let mut uc = cfg.effective_ucx_config()?;
        // One rail: UCX kept to its interface, without the rails layer.
        if let [one] = crate::rails::checked(kvxfer_ucx::BACKEND, cfg)?.as_slice() {
            uc = uc.with_net_devices(one);
        }
        log::debug!("{name}: UCX transport with {uc:?}");
        Ok(host_memory(UcxTransport::new(&uc)?, cfg, deadline))
    }

    /// UCX over several network rails: one [`UcxTransport`] per rail.
    pub(crate) type RailsTransport = HostMemory<kvxfer_rails::Rails<UcxTransport>>;

    /// The transport of an agent named `name` whose `cfg` names more than
    /// one rail ([`AgentConfig::rails`]): one UCP context and worker per
    /// rail, each restricted to its interface, under [`kvxfer_rails::Rails`].
    pub(crate) fn build_rails(
        name: &str,
        cfg: &AgentConfig,
        deadline: Option<Duration>,
    ) -> Result<RailsTransport, Error> {
        let uc = cfg.effective_ucx_config()?;
        log::debug!("{name}: UCX rails with {uc:?}");
        let t = crate::rails::ucx_rails(name, &uc, cfg)?;
        Ok(host_memory(t, cfg, deadline))
    }

    /// Rails (`KVXFER_RAILS`) that are not here are refused, named.
    pub(crate) fn preflight(_provider: Option<&str>) -> Result<(), String> {
        crate::rails::preflight()
    }

    /// libucp's version, the UCX transports usable here and how VRAM moves.
    pub(crate) fn report() -> String {
        let mut out = format!("UCX: built in; libucp {}\n", kvxfer_ucx::version());
        let t = UcxConfig::from_env().and_then(|c| UcxTransport::new(&c).map(|t| (c, t)));
        match t {
            Ok((cfg, t)) => {
                let r = t.resources();
                if r.is_empty() {
                    out += "  no UCX transport usable (check UCX_TLS; Debian: apt-get install libucx0)\n";
                } else {
                    out += &format!("  transports (after UCX_TLS): {}\n", r.join(", "));
                }
                out +=
                    &format!(
                    "  peer failure detection: {} (UCX 1.13 then emulates RMA between processes \
                     with tcp active messages; peers on this host move by cross-memory attach)\n",
                    if cfg.peer_failure_detection { "on" } else { "off" },
                );
                out += &format!("  VRAM: {}\n", vram_path(&cfg, &t));
            }
            Err(e) => {
                out += &format!(
                    "  transport fails: {e}\n  (Debian: apt-get install libucx0 ucx-utils; \
                     `ucx_info -d` lists devices)\n"
                );
            }
        }
        // KVXFER_RAILS: one UCP context per interface, each opened here.
        out += &crate::rails::report(kvxfer_ucx::BACKEND);
        out
    }

    /// The network transports `t` uses (`tcp/eth1`, `rc_mlx5/mlx5_0:1`):
    /// its resources less shared memory and loopback, which every rail has.
    fn network_resources(t: &UcxTransport) -> String {
        let net: Vec<String> = t
            .resources()
            .into_iter()
            .filter(|r| r.split_once('/').map_or(true, |(_, d)| !d.starts_with("memory")))
            .collect();
        if net.is_empty() {
            "no network transport".to_string()
        } else {
            net.join(" ")
        }
    }

    /// Which path VRAM takes over UCX, and why.
    fn vram_path(cfg: &UcxConfig, t: &UcxTransport) -> String {
        if !cfg!(feature = "cuda") {
            return "none (this kvxfer is built without the cuda feature)".to_string();
        }
        if t.native_vram() {
            return "native: this UCX supports CUDA memory and registers VRAM itself \
                    (cuda_ipc/cuda_copy on this host, GPUDirect RDMA across hosts where the NIC \
                    supports it)"
                .to_string();
        }
        let why = if cfg.native_vram {
            "this UCX has no CUDA support: built without CUDA, or its cuda module or the CUDA \
             driver is missing; the README says how to get a CUDA-enabled UCX"
                .to_string()
        } else {
            format!("{}=0", kvxfer_ucx::NATIVE_VRAM_ENV)
        };
        format!("staged through pinned host memory ({why})")
    }

    impl AgentTransport for Transport {
        /// `ucp_worker_progress` calls that did something, transfers by
        /// cross-memory attach and staging requests served.
        fn activity(&self) -> u64 {
            let l = local_of(self);
            l.inner()
                .progress_events()
                .wrapping_add(l.cma_transfers())
                .wrapping_add(staging_events(self))
        }

        crate::backends::host_memory_methods!();

        #[cfg(feature = "cuda")]
        fn vram_reason(&self) -> String {
            crate::vram::ucx_reason(local_of(self).inner())
        }
    }

    impl AgentTransport for RailsTransport {
        /// `ucp_worker_progress` calls that did something on every rail,
        /// transfers by cross-memory attach and staging requests served.
        fn activity(&self) -> u64 {
            let l = local_of(self);
            let r = l.inner();
            let mut n = l.cma_transfers().wrapping_add(staging_events(self));
            for i in 0..r.len() {
                if let Some(t) = r.rail(i) {
                    n = n.wrapping_add(t.progress_events());
                }
            }
            n
        }

        crate::backends::host_memory_methods!();

        #[cfg(feature = "cuda")]
        fn vram_reason(&self) -> String {
            match local_of(self).inner().rail(0) {
                // Every rail is opened alike: the first speaks for all.
                Some(t) => crate::vram::ucx_reason(t),
                None => "UCX has no rail open".to_string(),
            }
        }

        fn rail_stats(&self) -> Vec<kvxfer_rails::RailStats> {
            crate::rails::stats(local_of(self).inner())
        }

        /// The network transports of each rail (UCX's `tl/dev`).
        fn rail_devices(&self) -> Vec<String> {
            crate::rails::devices(local_of(self).inner(), network_resources)
        }
    }

    impl AgentConfig {
        /// Sets UCX's own configuration: the UCX transport is built from
        /// `config` instead of [`UcxConfig::from_env`].
        pub fn with_ucx_config(mut self, config: UcxConfig) -> Self {
            self.backends.ucx = Some(config);
            self
        }

        /// UCX's own configuration, if set
        /// ([`with_ucx_config`](Self::with_ucx_config)).
        pub fn ucx_config(&self) -> Option<&UcxConfig> {
            self.backends.ucx.as_ref()
        }

        /// The configuration the UCX transport of an agent with these
        /// settings is built with: [`ucx_config`](Self::ucx_config), else
        /// [`UcxConfig::from_env`] (whose error, naming a malformed
        /// variable, is returned). A configuration with
        /// `peer_failure_detection` off is an error naming it.
        pub fn effective_ucx_config(&self) -> Result<UcxConfig, Error> {
            let c = match &self.backends.ucx {
                Some(c) => c.clone(),
                None => UcxConfig::from_env()?,
            };
            if !c.peer_failure_detection {
                return Err(Error::backend(
                    "UCX",
                    -1,
                    "UcxConfig::peer_failure_detection = false: transfers to a dead peer could \
                     then never end and its endpoint could not be closed safely; the agent \
                     needs it on (peers on this host move by cross-memory attach anyway)",
                ));
            }
            Ok(c)
        }
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn descriptor_names_the_crates_settings() {
            let d = super::super::DESCRIPTOR;
            assert_eq!(d.name, kvxfer_ucx::BACKEND);
            assert!(d.settings.contains(&kvxfer_ucx::NATIVE_VRAM_ENV));
            assert!(d.settings.contains(&kvxfer_rails::ENV_RAILS));
        }
    }
}
