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
    let names = checked(kvxfer_libfabric::BACKEND, cfg)?;
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
    let names = checked(kvxfer_ucx::BACKEND, cfg)?;
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
        // A fence renews the rail's worker, link or no link (kvxfer-rails,
        // "Stale WRITEs").
        c.spare_worker = true;
        // A failed rail is reconnected from the agent's polls: a connect
        // blocking until the SYN times out (a link cut beyond this host's
        // interface) would stall every rail.
        c.tcp_conn_nb = Some(true);
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

/// What each rail runs on, as `of` describes its transport; none for a
/// single endpoint (as [`stats`]).
#[cfg(any(feature = "libfabric", feature = "ucx"))]
pub(crate) fn devices<T: kvxfer_core::Transport>(
    r: &kvxfer_rails::Rails<T>,
    of: impl Fn(&T) -> String,
) -> Vec<String> {
    if r.len() > 1 {
        (0..r.len()).filter_map(|i| r.rail(i).map(&of)).collect()
    } else {
        Vec::new()
    }
}

/// The rails in effect for `cfg` ([`AgentConfig::effective_rails`]), or
/// a `backend` error naming the first that is not here ([`missing`]).
#[cfg(any(feature = "libfabric", feature = "ucx"))]
pub(crate) fn checked(backend: &'static str, cfg: &AgentConfig) -> Result<Vec<String>, Error> {
    let names = cfg.effective_rails();
    missing(&names).map_err(|why| Error::backend(backend, -1, &why))?;
    Ok(names)
}

/// Before anything starts (`kvxfer bench`, `kvxfer target`): the rails
/// `KVXFER_RAILS` names that are not here, as [`missing`] names them.
#[cfg(any(feature = "libfabric", feature = "ucx"))]
pub(crate) fn preflight() -> Result<(), String> {
    let names = kvxfer_rails::rails_from_env().unwrap_or_default();
    missing(&names).map_err(|why| format!("{}={}: {why}", kvxfer_rails::ENV_RAILS, names.join(",")))
}

/// Refuses, naming it, the first of `names` that is neither a network
/// interface of this network namespace (`/proc/net/dev`) nor an RDMA
/// device (`/sys/class/infiniband`): `mlx5_0`, or as UCX and libfabric
/// name it, `mlx5_0:1` and `rdmap0s6-rdm`. Where the interfaces cannot be
/// read, every name passes.
#[cfg(any(feature = "libfabric", feature = "ucx"))]
pub(crate) fn missing(names: &[String]) -> Result<(), String> {
    let Ok(dev) = std::fs::read_to_string("/proc/net/dev") else {
        return Ok(());
    };
    let ifaces: Vec<&str> = dev
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(name, _)| name.trim())
        .collect();
    let rdma: Vec<String> = std::fs::read_dir("/sys/class/infiniband")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    match names.iter().find(|n| !known(n, &ifaces, &rdma)) {
        Some(n) => Err(format!(
            "rail {n}: no such network interface or RDMA device here"
        )),
        None => Ok(()),
    }
}

/// Whether `n` is one of the interfaces `ifaces`, or one of the RDMA
/// devices `rdma` alone or with a port (`:1`) or endpoint type (`-rdm`).
#[cfg(any(feature = "libfabric", feature = "ucx"))]
fn known(n: &str, ifaces: &[&str], rdma: &[String]) -> bool {
    ifaces.contains(&n)
        || rdma.iter().any(|d| {
            n.strip_prefix(d.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with([':', '-']))
        })
}

/// One rail as `kvxfer info` lists it:
/// `  rail NAME: STATE, N bytes, N failures, PLACE[, via DEVICES]`.
#[cfg(any(feature = "libfabric", feature = "ucx"))]
pub(crate) fn rail_line(r: &kvxfer_rails::RailStats, devices: Option<&str>) -> String {
    let mut line = format!(
        "  rail {}: {}, {} bytes, {} failures, {}",
        r.name,
        r.state.name(),
        r.bytes,
        r.failures,
        r.place
    );
    if r.renewals > 0 {
        line += &format!(", renewed {} times", r.renewals);
    }
    if let Some(d) = devices {
        line += ", via ";
        line += d;
    }
    line.push('\n');
    line
}

/// `kvxfer info`'s lines on the rails `KVXFER_RAILS` names, over
/// `backend`: each rail of an agent opened with them ([`rail_line`]), or
/// why they do not open; nothing when none is named.
#[cfg(any(feature = "libfabric", feature = "ucx"))]
pub(crate) fn report(backend: &'static str) -> String {
    let names = AgentConfig::default().effective_rails();
    if names.is_empty() {
        return String::new();
    }
    let list = names.join(",");
    if let Err(why) = missing(&names) {
        return format!("  {why}\n");
    }
    let cfg = AgentConfig::default()
        .with_backend(backend)
        .with_listen(None);
    let a = match crate::Agent::new("kvxfer-info", cfg) {
        Ok(a) => a,
        Err(e) => return format!("  rails {list}: {e}\n"),
    };
    let stats = a.rail_stats();
    let devices = a.rail_devices();
    let mut out = String::new();
    if stats.is_empty() {
        out += &format!("  rail {list}: the only rail (no striping or failover)\n");
    }
    for (i, r) in stats.iter().enumerate() {
        out += &rail_line(r, devices.get(i).map(String::as_str));
    }
    a.shutdown();
    out
}

#[cfg(all(test, any(feature = "libfabric", feature = "ucx")))]
mod tests {
    use kvxfer_rails::{RailState, RailStats};

    #[test]
    fn a_missing_interface_is_named() {
        let names = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(super::missing(&names(&["lo", "lo"])), Ok(()));
        assert_eq!(
            super::missing(&names(&["lo", "nosuch0", "nosuch1"])),
            Err("rail nosuch0: no such network interface or RDMA device here".to_string())
        );
        assert!(super::missing(&names(&["../lo"])).is_err());
    }

    #[test]
    fn rdma_devices_pass_as_ucx_and_libfabric_name_them() {
        let rdma = ["mlx5_0".to_string(), "rdmap0s6".to_string()];
        let ifaces = ["lo", "eth0"];
        for n in [
            "eth0",
            "mlx5_0",
            "mlx5_0:1",
            "rdmap0s6-rdm",
            "rdmap0s6-dgrm",
        ] {
            assert!(super::known(n, &ifaces, &rdma), "{n}");
        }
        for n in ["eth1", "mlx5_01", "mlx5", "rdmap0s", ""] {
            assert!(!super::known(n, &ifaces, &rdma), "{n}");
        }
    }

    #[test]
    fn rail_line_lists_state_counters_and_devices() {
        let r = RailStats {
            name: "eth1".to_string(),
            state: RailState::Down,
            bytes: 4096,
            failures: 3,
            ..RailStats::default()
        };
        assert_eq!(
            super::rail_line(&r, Some("tcp/eth1")),
            "  rail eth1: down, 4096 bytes, 3 failures, NUMA unknown, PCI unknown, via tcp/eth1\n"
        );
        assert_eq!(
            super::rail_line(&r, None),
            "  rail eth1: down, 4096 bytes, 3 failures, NUMA unknown, PCI unknown\n"
        );
        let renewed = RailStats { renewals: 2, ..r };
        assert_eq!(
            super::rail_line(&renewed, None),
            "  rail eth1: down, 4096 bytes, 3 failures, NUMA unknown, PCI unknown, renewed 2 times\n"
        );
    }
}
