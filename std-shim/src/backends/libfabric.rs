//! libfabric (OFI): [`kvxfer_libfabric`] over one endpoint or one per
//! network rail ([`kvxfer_rails`]), under same-host cross-memory attach
//! and, with the `cuda` feature, VRAM staging where the provider does not
//! register CUDA memory itself (`FI_HMEM`).

use super::Descriptor;

/// libfabric as users see it.
pub(super) const DESCRIPTOR: Descriptor = Descriptor {
    name: "LIBFABRIC",
    c_name: c"LIBFABRIC",
    aliases: &[],
    needs: Some("libfabric-dev"),
    settings: &[
        "AgentConfig::with_provider",
        "AgentConfig::with_fabric_config",
        "KVXFER_LIBFABRIC_PROVIDER",
        "KVXFER_LIBFABRIC_NATIVE_VRAM",
        "AgentConfig::with_rails",
        "KVXFER_RAILS",
        "FI_* (libfabric's own)",
    ],
};

#[cfg(feature = "libfabric")]
pub(super) use imp::*;

#[cfg(feature = "libfabric")]
mod imp {
    use std::time::Duration;

    use kvxfer_core::Error;
    use kvxfer_libfabric::{FabricConfig, FabricTransport};

    use crate::backends::{
        host_memory, local_of, staging_events, AgentTransport, HostMemory,
    };
    use crate::config::AgentConfig;

    /// libfabric over one endpoint, or one per network rail
    /// ([`AgentConfig::rails`]).
    pub(crate) type FabricRails = kvxfer_rails::Rails<FabricTransport>;

    /// The transport the agent drives.
    pub(crate) type Transport = HostMemory<FabricRails>;
    /// libfabric's own settings in an [`AgentConfig`].
    pub(crate) type Config = FabricConfig;

    /// Re-exported as `kvxfer::config::FabricConfig`.
    pub(crate) mod settings {
        pub use kvxfer_libfabric::FabricConfig;
    }

    /// The transport of an agent named `name` with `cfg`
    /// ([`AgentConfig::effective_fabric_config`]); `deadline` bounds the
    /// wait for a peer's answer to a staging request.
    pub(crate) fn build(
        name: &str,
        cfg: &AgentConfig,
        deadline: Option<Duration>,
    ) -> Result<Transport, Error> {
        let fc = cfg.effective_fabric_config();
        log::debug!("{name}: libfabric transport with {fc:?}");
        let t = crate::rails::fabric_rails(name, &fc, cfg)?;
        Ok(host_memory(t, cfg, deadline))
    }

    /// Rails (`KVXFER_RAILS`) that are not here are refused, named; a
    /// provider (`provider`, else `KVXFER_LIBFABRIC_PROVIDER`) that
    /// libfabric does not offer here, naming those it offers.
    pub(crate) fn preflight(provider: Option<&str>) -> Result<(), String> {
        crate::rails::preflight()?;
        let (value, source) = match provider {
            Some(p) => (p.to_string(), "--provider"),
            None => match std::env::var(kvxfer_libfabric::PROVIDER_ENV) {
                Ok(p) if !p.trim().is_empty() => (p, kvxfer_libfabric::PROVIDER_ENV),
                _ => return Ok(()),
            },
        };
        if kvxfer_libfabric::provider_usable(&value) {
            return Ok(());
        }
        let usable = kvxfer_libfabric::usable_providers();
        let (major, minor) = kvxfer_libfabric::version();
        Err(format!(
            "{source}={value}: libfabric {major}.{minor} does not offer this provider with RDM \
             and RMA here; offered: {}",
            if usable.is_empty() {
                "none".to_string()
            } else {
                usable.join(", ")
            }
        ))
    }

    /// libfabric's version and, for each provider kvxfer knows, whether it
    /// is offered here and its transport opens.
    pub(crate) fn report() -> String {
        let (major, minor) = kvxfer_libfabric::version();
        let usable = kvxfer_libfabric::usable_providers();
        let mut out = format!("LIBFABRIC: built in; libfabric {major}.{minor}\n");
        if usable.is_empty() {
            out += "  no provider offers FI_EP_RDM with FI_RMA here (Debian: apt-get install \
                    libfabric1; verbs/efa need their drivers; `fi_info -l` lists providers)\n";
        }
        for &p in kvxfer_libfabric::provider_preference() {
            if !usable.iter().any(|u| u == p) {
                out += &format!("  {p}: not offered here\n");
                continue;
            }
            let cfg = AgentConfig::default()
                .with_backend("LIBFABRIC")
                .with_provider(p)
                .with_listen(None);
            match crate::Agent::new("kvxfer-info", cfg) {
                Ok(a) => {
                    out += &format!("  {p}: usable (RDM + RMA), transport opens\n");
                    if cfg!(feature = "cuda") {
                        let path = match a.vram_path() {
                            Ok("native") => "native (FI_HMEM_CUDA)",
                            _ => "staged through pinned host memory",
                        };
                        let why = a.vram_reason().unwrap_or_else(|e| e.to_string());
                        out += &format!("    VRAM: {path}: {why}\n");
                    }
                    a.shutdown();
                }
                Err(e) => out += &format!("  {p}: offered, but the transport fails: {e}\n"),
            }
        }
        // KVXFER_RAILS: one endpoint per interface, each opened here.
        out += &crate::rails::report(kvxfer_libfabric::BACKEND);
        out
    }

    impl AgentTransport for Transport {
        /// Transfers by cross-memory attach and staging requests served.
        fn activity(&self) -> u64 {
            local_of(self)
                .cma_transfers()
                .wrapping_add(staging_events(self))
        }

        crate::backends::host_memory_methods!();

        #[cfg(feature = "cuda")]
        fn vram_reason(&self) -> String {
            match local_of(self).inner().rail(0) {
                // Every rail is opened and probed alike: the first speaks for all.
                Some(t) => crate::vram::fabric_reason(t),
                None => "libfabric has no rail open".to_string(),
            }
        }

        fn rail_stats(&self) -> Vec<kvxfer_rails::RailStats> {
            crate::rails::stats(local_of(self).inner())
        }

        /// The provider of each rail.
        fn rail_devices(&self) -> Vec<String> {
            crate::rails::devices(local_of(self).inner(), |t| t.provider_name().to_string())
        }
    }

    impl AgentConfig {
        /// Sets libfabric's own configuration: the libfabric transport is
        /// built from `config` instead of `FabricConfig::default()`.
        pub fn with_fabric_config(mut self, config: FabricConfig) -> Self {
            self.backends.libfabric = Some(config);
            self
        }

        /// libfabric's own configuration, if set
        /// ([`with_fabric_config`](Self::with_fabric_config)).
        pub fn fabric_config(&self) -> Option<&FabricConfig> {
            self.backends.libfabric.as_ref()
        }

        /// The configuration the libfabric transport of an agent with these
        /// settings is built with: [`fabric_config`](Self::fabric_config),
        /// else the defaults, with [`provider`](Self::provider) applied
        /// when set. A provider left unset here is chosen by the transport
        /// (`KVXFER_LIBFABRIC_PROVIDER`, else the first usable one).
        /// Without a configuration of its own
        /// ([`fabric_config`](Self::fabric_config)), native VRAM
        /// (`FI_HMEM`, [`FabricConfig::native_vram`]) is asked for where a
        /// CUDA driver is.
        pub fn effective_fabric_config(&self) -> FabricConfig {
            let mut c = self.backends.libfabric.clone().unwrap_or_default();
            if let Some(p) = &self.provider {
                c.provider = Some(p.clone());
            }
            // VRAM through the provider (FI_HMEM) where a CUDA driver is.
            #[cfg(feature = "cuda")]
            if self.backends.libfabric.is_none() {
                c.native_vram = kvxfer_cuda::driver_present();
            }
            c
        }
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn descriptor_names_the_crates_settings() {
            let d = super::super::DESCRIPTOR;
            assert!(d.settings.contains(&kvxfer_libfabric::PROVIDER_ENV));
            assert!(d.settings.contains(&kvxfer_libfabric::NATIVE_VRAM_ENV));
            assert!(d.settings.contains(&kvxfer_rails::ENV_RAILS));
        }
    }
}
