//! Several network rails for the libfabric and UCX backends: one
//! `FabricTransport` or `UcxTransport` per interface of
//! [`AgentConfig::rails`], under [`kvxfer_rails::Rails`].

#[cfg(any(feature = "libfabric", feature = "ucx"))]
use kvxfer_core::Error;

#[cfg(any(feature = "libfabric", feature = "ucx"))]
use crate::config::AgentConfig;

/// libfabric over the rails of `cfg` (one endpoint per interface), or one
/// endpoint as the provider chooses when none is named.
#[cfg(feature = "libfabric")]
pub(crate) fn fabric_rails(
    name: &str,
    fabric: &kvxfer_libfabric::FabricConfig,
    cfg: &AgentConfig,
) -> Result<kvxfer_rails::Rails<kvxfer_libfabric::FabricTransport>, Error> {
    use kvxfer_libfabric::FabricTransport;
    let names = cfg.effective_rails();
    let mut rails = Vec::new();
    let open = |c: &kvxfer_libfabric::FabricConfig| -> Result<FabricTransport, Error> {
        #[allow(unused_mut)]
        let mut t = FabricTransport::new(c)?;
        #[cfg(feature = "cuda")]
        crate::vram::probe_fabric(&mut t);
        Ok(t)
    };
    if names.is_empty() {
        rails.push((String::new(), open(fabric)?));
    }
    for iface in &names {
        let c = fabric.clone().with_interface(iface);
        rails.push((iface.clone(), open(&c)?));
    }
    if rails.len() > 1 {
        log::info!(
            "{name}: libfabric over {} rails: {}",
            rails.len(),
            names.join(", ")
        );
    }
    Ok(kvxfer_rails::Rails::new(
        name,
        rails,
        kvxfer_rails::RailsConfig::from_env(),
    ))
}

/// UCX over the rails of `cfg`: one transport (its own UCP context and
/// worker) per interface, each restricted to it (`UCX_NET_DEVICES` of its
/// context, [`kvxfer_ucx::UcxConfig::net_devices`]).
#[cfg(feature = "ucx")]
pub(crate) fn ucx_rails(
    name: &str,
    ucx: &kvxfer_ucx::UcxConfig,
    cfg: &AgentConfig,
) -> Result<kvxfer_rails::Rails<kvxfer_ucx::UcxTransport>, Error> {
    let names = cfg.effective_rails();
    let mut rails = Vec::new();
    for iface in &names {
        let mut c = ucx.clone().with_net_devices(iface);
        // The rails notice a dead rail themselves (no completion for the
        // rail timeout). UCX's keepalive would only probe the connections
        // they closed after a failover, from the peer, when the link comes
        // back; UCX 1.13's tcp answers with endpoints of its own
        // ("ep_check reply") and crashed in that flurry in the failover
        // test (uct_tcp_iface_progress).
        c.keepalive_interval = Some(std::time::Duration::ZERO);
        rails.push((iface.clone(), kvxfer_ucx::UcxTransport::new(&c)?));
    }
    log::info!(
        "{name}: UCX over {} rails: {}",
        rails.len(),
        names.join(", ")
    );
    Ok(kvxfer_rails::Rails::new(
        name,
        rails,
        kvxfer_rails::RailsConfig::from_env(),
    ))
}

/// The rails' counters; none for a single endpoint.
#[cfg(any(feature = "libfabric", feature = "ucx"))]
pub(crate) fn stats<T: kvxfer_core::Transport>(
    r: &kvxfer_rails::Rails<T>,
) -> Vec<kvxfer_rails::RailStats> {
    if r.len() > 1 {
        r.stats()
    } else {
        Vec::new()
    }
}
