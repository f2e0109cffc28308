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
    with_topology(
        kvxfer_rails::Rails::new(name, rails, kvxfer_rails::RailsConfig::from_env()),
        &names,
        cfg,
    )
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
    with_topology(
        kvxfer_rails::Rails::new(name, rails, kvxfer_rails::RailsConfig::from_env()),
        &names,
        cfg,
    )
}

/// `rails` over the interfaces `names`, preferring for each region the
/// rails closest to its memory (sysfs under [`AgentConfig::sysfs_root`],
/// the map of [`AgentConfig::rail_map`]); unchanged with one rail.
#[cfg(any(feature = "libfabric", feature = "ucx"))]
fn with_topology<T: kvxfer_core::Transport>(
    mut rails: kvxfer_rails::Rails<T>,
    names: &[String],
    cfg: &AgentConfig,
) -> Result<kvxfer_rails::Rails<T>, Error> {
    if names.len() < 2 {
        return Ok(rails);
    }
    let map = cfg.effective_rail_map(names)?;
    let root = kvxfer_rails::sysfs_root(cfg.sysfs_root.as_deref());
    let topo = kvxfer_rails::Topology::read(&root, names, map, locate);
    for (n, p) in names.iter().zip(&topo.nics) {
        log::debug!("rail {n}: {p}");
    }
    rails.set_topology(topo);
    Ok(rails)
}

/// Where a region's memory sits: host memory's NUMA node from the kernel,
/// a GPU's PCI bus id from the driver.
#[cfg(any(feature = "libfabric", feature = "ucx"))]
fn locate(region: &kvxfer_core::Region) -> kvxfer_rails::MemPlace {
    use kvxfer_rails::MemPlace;
    match region.kind {
        kvxfer_core::MemKind::Dram => MemPlace::Host {
            numa: crate::numa::node_of(region.addr),
        },
        kvxfer_core::MemKind::Vram => MemPlace::Gpu {
            index: region.dev,
            bus_id: gpu_bus_id(region.dev),
        },
    }
}

/// The PCI bus id of GPU `dev`, when the driver says.
#[cfg(any(feature = "libfabric", feature = "ucx"))]
fn gpu_bus_id(dev: u32) -> Option<String> {
    #[cfg(feature = "cuda")]
    {
        kvxfer_cuda::device_info(dev).ok().map(|d| d.pci_bus_id)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = dev;
        None
    }
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
