//! Where each rail's NIC and each registered region sit: read from sysfs
//! (or a tree laid out like it, for tests), matched by
//! [`kvxfer_core::rails::choose`].
//!
//! A rail's interface `IF` is described by `ROOT/class/net/IF/device`: the
//! NUMA node from its `numa_node` (or the nearest PCI device's above it,
//! as for a virtio NIC; `-1` is unknown) and the PCI path from the
//! symlink's target, the components under `ROOT/devices/` from
//! `pci0000:xx` down to the last PCI device. An interface without a
//! `device` (lo, veth, bridges) is unknown on both. A GPU is found the same
//! way from its PCI bus id, under `ROOT/bus/pci/devices/`. `ROOT` is
//! `/sys` unless [`ENV_SYSFS_ROOT`] (or the agent's configuration) says
//! otherwise.

use std::fmt;
use std::path::{Path, PathBuf};

use kvxfer_core::rails::{choose, MapEntry, MapKey, Mem, Nic};
use kvxfer_core::{MemKind, Region};

/// Environment variable with the explicit map from memory to rails:
/// `numa0=eth0+eth1,gpu3=eth2` (host memory of NUMA node 0 goes over
/// `eth0` and `eth1`, VRAM of GPU 3 over `eth2`; see [`parse_rail_map`]).
pub const ENV_RAIL_MAP: &str = "KVXFER_RAIL_MAP";
/// Environment variable naming the sysfs root the rails' topology is read
/// from (default `/sys`).
pub const ENV_SYSFS_ROOT: &str = "KVXFER_SYSFS_ROOT";
/// The sysfs root by default.
pub const DEFAULT_SYSFS_ROOT: &str = "/sys";

/// Where a NIC (or a GPU) sits.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Place {
    /// NUMA node (`None`: unknown).
    pub numa: Option<u32>,
    /// PCI path from the root complex, bridges separated by `/`, e.g.
    /// `pci0000:00/0000:00:01.0/0000:01:00.0` (empty: unknown).
    pub pci: String,
}

impl fmt::Display for Place {
    /// `NUMA 0, PCI pci0000:00/0000:00:03.0`, with `unknown` for either.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.numa {
            Some(n) => write!(f, "NUMA {n}")?,
            None => f.write_str("NUMA unknown")?,
        }
        if self.pci.is_empty() {
            f.write_str(", PCI unknown")
        } else {
            write!(f, ", PCI {}", self.pci)
        }
    }
}

/// Whether `s` is a PCI address, `dddd:bb:dd.f` in hex.
fn is_pci_addr(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 12
        && b.iter().enumerate().all(|(i, &c)| match i {
            4 | 7 => c == b':',
            10 => c == b'.',
            _ => c.is_ascii_hexdigit(),
        })
}

/// The NUMA node in `dir/numa_node`: `None` if absent, unreadable or
/// negative.
fn read_numa(dir: &Path) -> Option<u32> {
    let v = std::fs::read_to_string(dir.join("numa_node")).ok()?;
    v.trim()
        .parse::<i64>()
        .ok()
        .and_then(|n| u32::try_from(n).ok())
}

/// The place of the device at `dev` (a path under `root`, through
/// symlinks): its PCI path under `root/devices/` and NUMA node.
fn device_place(root: &Path, dev: &Path) -> Place {
    let (Ok(dev), Ok(devices)) = (
        std::fs::canonicalize(dev),
        std::fs::canonicalize(root.join("devices")),
    ) else {
        return Place::default();
    };
    let Ok(rel) = dev.strip_prefix(&devices) else {
        return Place::default();
    };
    let mut pci = String::new();
    let mut last = devices.clone();
    for (i, c) in rel.components().enumerate() {
        let c = c.as_os_str().to_string_lossy();
        let ok = if i == 0 {
            c.starts_with("pci")
        } else {
            is_pci_addr(&c)
        };
        if !ok {
            break;
        }
        if !pci.is_empty() {
            pci.push('/');
        }
        pci.push_str(&c);
        last.push(&*c);
    }
    if !pci.contains('/') {
        // A root complex alone (or nothing) names no device.
        return Place {
            numa: read_numa(&dev),
            pci: String::new(),
        };
    }
    Place {
        numa: read_numa(&dev).or_else(|| read_numa(&last)),
        pci,
    }
}

/// Where the NIC of interface `iface` sits, read under the sysfs root
/// `root`; unknown for a virtual interface.
pub fn nic_place(root: &Path, iface: &str) -> Place {
    if iface.is_empty() || iface.contains('/') {
        return Place::default();
    }
    device_place(root, &root.join("class/net").join(iface).join("device"))
}

/// Where the PCI device `bus_id` (`0000:19:00.0`, as CUDA's
/// `cuDeviceGetPCIBusId` writes it, or with nvidia-smi's 8-digit domain
/// `00000000:19:00.0`; any case) sits, read under `root`.
pub fn pci_place(root: &Path, bus_id: &str) -> Place {
    let mut id = bus_id.trim().to_ascii_lowercase();
    if id.len() == 16 && id.starts_with("0000") {
        id.drain(..4);
    }
    if !is_pci_addr(&id) {
        return Place::default();
    }
    device_place(root, &root.join("bus/pci/devices").join(id))
}

/// The sysfs root in effect: `configured`, else [`ENV_SYSFS_ROOT`], else
/// `/sys`.
pub fn sysfs_root(configured: Option<&Path>) -> PathBuf {
    if let Some(p) = configured {
        return p.to_path_buf();
    }
    match std::env::var_os(ENV_SYSFS_ROOT) {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => PathBuf::from(DEFAULT_SYSFS_ROOT),
    }
}

/// Where a registered region's memory sits, as a [`Topology`]'s locator
/// finds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemPlace {
    /// Host memory on a NUMA node (`None`: unknown).
    Host {
        /// The node.
        numa: Option<u32>,
    },
    /// VRAM of a GPU.
    Gpu {
        /// The GPU's ordinal.
        index: u32,
        /// Its PCI bus id (`None`: unknown).
        bus_id: Option<String>,
    },
}

/// Finds where a region's memory sits; called at registration only.
pub type Locate = fn(&Region) -> MemPlace;

/// A locator knowing nothing: host memory on an unknown node, VRAM of the
/// region's device with no PCI bus id.
pub fn locate_unknown(region: &Region) -> MemPlace {
    match region.kind {
        MemKind::Dram => MemPlace::Host { numa: None },
        MemKind::Vram => MemPlace::Gpu {
            index: region.dev,
            bus_id: None,
        },
    }
}

/// The rails' topology: where each rail's NIC sits, the explicit map and
/// how to find a region's memory. [`Rails`](crate::Rails) given one
/// (`Rails::set_topology`) prefers, for each registration, the rails
/// [`choose`] picks.
#[derive(Clone, Debug)]
pub struct Topology {
    /// By rail.
    pub nics: Vec<Place>,
    /// Explicit choices, first (see [`parse_rail_map`]).
    pub map: Vec<MapEntry>,
    /// The sysfs root GPUs are looked up under.
    pub sysfs: PathBuf,
    /// Finds a region's memory.
    pub locate: Locate,
}

impl Topology {
    /// The topology of rails on the interfaces `ifaces`, read under the
    /// sysfs root `sysfs`.
    pub fn read(sysfs: &Path, ifaces: &[String], map: Vec<MapEntry>, locate: Locate) -> Topology {
        Topology {
            nics: ifaces.iter().map(|i| nic_place(sysfs, i)).collect(),
            map,
            sysfs: sysfs.to_path_buf(),
            locate,
        }
    }

    /// The rails preferred for memory `mem`, as a mask (bit *i*: rail
    /// *i*; rails past 64 are never preferred).
    pub fn prefer_mem(&self, mem: &MemPlace) -> u64 {
        let gpu;
        let mem = match mem {
            MemPlace::Host { numa } => Mem::Host { numa: *numa },
            MemPlace::Gpu { index, bus_id } => {
                gpu = bus_id
                    .as_deref()
                    .map(|b| pci_place(&self.sysfs, b))
                    .unwrap_or_default();
                Mem::Gpu {
                    index: *index,
                    pci: &gpu.pci,
                    numa: gpu.numa,
                }
            }
        };
        let nics: Vec<Nic<'_>> = self
            .nics
            .iter()
            .take(64)
            .map(|p| Nic {
                numa: p.numa,
                pci: &p.pci,
            })
            .collect();
        let mut out = vec![0u16; nics.len()];
        let n = choose(&nics, mem, &self.map, &mut out);
        out[..n].iter().fold(0u64, |m, &r| m | 1 << r)
    }

    /// The rails preferred for `region` (see [`prefer_mem`](Self::prefer_mem)).
    pub fn prefer(&self, region: &Region) -> u64 {
        self.prefer_mem(&(self.locate)(region))
    }
}

/// Parses an explicit rail map, `KEY=IF+IF,...` with `KEY` one of `numaN`
/// (host memory of NUMA node N) or `gpuN` (VRAM of the GPU of CUDA
/// ordinal N in this process, a region's `dev`) and each `IF`
/// one of `rails` (the rails' interfaces, in order). Spaces around items
/// are ignored; an empty map is no map. The error names the bad item.
pub fn parse_rail_map(s: &str, rails: &[String]) -> Result<Vec<MapEntry>, String> {
    let mut out = Vec::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let Some((key, ifaces)) = item.split_once('=') else {
            return Err(format!("{item:?} is not KEY=IF+IF"));
        };
        let key = key.trim();
        let num = |p: &str| {
            key.strip_prefix(p)
                .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|n| n.parse::<u32>().ok())
        };
        let key = match (num("numa"), num("gpu")) {
            (Some(n), _) => MapKey::Numa(n),
            (_, Some(n)) => MapKey::Gpu(n),
            _ => return Err(format!("bad key {key:?} (numaN or gpuN)")),
        };
        for iface in ifaces.split('+').map(str::trim) {
            let Some(r) = rails.iter().position(|x| x == iface) else {
                return Err(format!(
                    "unknown rail {iface:?} (rails: {})",
                    rails.join(", ")
                ));
            };
            let rail = u16::try_from(r).map_err(|_| format!("rail {iface:?} is past 65535"))?;
            out.push(MapEntry { key, rail });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A fake sysfs tree in a temporary folder, removed on drop.
    struct FakeSys(PathBuf);

    static NEXT: AtomicU32 = AtomicU32::new(0);

    impl FakeSys {
        fn new() -> FakeSys {
            let p = std::env::temp_dir().join(format!(
                "kvxfer-sysfs-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(p.join("class/net")).unwrap();
            std::fs::create_dir_all(p.join("bus/pci/devices")).unwrap();
            std::fs::create_dir_all(p.join("devices/virtual/net")).unwrap();
            FakeSys(p)
        }

        /// A PCI device at `path` (under `devices/`) with `numa_node`.
        fn pci(&self, path: &str, numa: i32) {
            let d = self.0.join("devices").join(path);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("numa_node"), format!("{numa}\n")).unwrap();
            let id = path.rsplit('/').next().unwrap();
            let link = self.0.join("bus/pci/devices").join(id);
            let up = "../../..";
            let _ = symlink(format!("{up}/devices/{path}"), link);
        }

        /// Interface `iface` of the device at `dev` (under `devices/`),
        /// linked as Linux does: `class/net/IF -> ../../devices/DEV/net/IF`
        /// and `DEV/net/IF/device -> ../../../LAST`.
        fn nic(&self, iface: &str, dev: &str) {
            let d = self.0.join("devices").join(dev).join("net").join(iface);
            std::fs::create_dir_all(&d).unwrap();
            let last = dev.rsplit('/').next().unwrap();
            symlink(format!("../../../{last}"), d.join("device")).unwrap();
            symlink(
                format!("../../devices/{dev}/net/{iface}"),
                self.0.join("class/net").join(iface),
            )
            .unwrap();
        }

        /// A virtual interface: no `device`.
        fn virt(&self, iface: &str) {
            std::fs::create_dir_all(self.0.join("devices/virtual/net").join(iface)).unwrap();
            symlink(
                format!("../../devices/virtual/net/{iface}"),
                self.0.join("class/net").join(iface),
            )
            .unwrap();
        }
    }

    impl Drop for FakeSys {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn place(numa: Option<u32>, pci: &str) -> Place {
        Place {
            numa,
            pci: pci.to_string(),
        }
    }

    /// Two sockets with two NICs each, plus lo and a veth.
    fn two_numa() -> FakeSys {
        let s = FakeSys::new();
        s.pci("pci0000:00/0000:00:01.0", 0);
        s.pci("pci0000:00/0000:00:01.0/0000:01:00.0", 0);
        s.pci("pci0000:00/0000:00:01.0/0000:01:00.1", 0);
        s.pci("pci0000:80/0000:80:01.0", 1);
        s.pci("pci0000:80/0000:80:01.0/0000:81:00.0", 1);
        s.pci("pci0000:80/0000:80:01.0/0000:81:00.1", 1);
        s.nic("eth0", "pci0000:00/0000:00:01.0/0000:01:00.0");
        s.nic("eth1", "pci0000:00/0000:00:01.0/0000:01:00.1");
        s.nic("eth2", "pci0000:80/0000:80:01.0/0000:81:00.0");
        s.nic("eth3", "pci0000:80/0000:80:01.0/0000:81:00.1");
        s.virt("lo");
        s.virt("veth0");
        s
    }

    #[test]
    fn nics_of_two_numa_nodes_are_read_from_sysfs() {
        let s = two_numa();
        assert_eq!(
            nic_place(&s.0, "eth0"),
            place(Some(0), "pci0000:00/0000:00:01.0/0000:01:00.0")
        );
        assert_eq!(
            nic_place(&s.0, "eth3"),
            place(Some(1), "pci0000:80/0000:80:01.0/0000:81:00.1")
        );
        for v in ["lo", "veth0", "nosuch", "", "../eth0"] {
            assert_eq!(nic_place(&s.0, v), Place::default(), "{v:?}");
        }
        assert_eq!(
            nic_place(&s.0, "eth2").to_string(),
            "NUMA 1, PCI pci0000:80/0000:80:01.0/0000:81:00.0"
        );
        assert_eq!(
            nic_place(&s.0, "lo").to_string(),
            "NUMA unknown, PCI unknown"
        );
    }

    #[test]
    fn host_memory_prefers_the_nics_of_its_node() {
        let s = two_numa();
        let t = Topology::read(
            &s.0,
            &names(&["eth0", "eth1", "eth2", "eth3", "lo"]),
            vec![],
            locate_unknown,
        );
        assert_eq!(t.prefer_mem(&MemPlace::Host { numa: Some(0) }), 0b00011);
        assert_eq!(t.prefer_mem(&MemPlace::Host { numa: Some(1) }), 0b01100);
        assert_eq!(t.prefer_mem(&MemPlace::Host { numa: None }), 0b11111);
        let map = parse_rail_map(
            "numa0=eth3+lo",
            &names(&["eth0", "eth1", "eth2", "eth3", "lo"]),
        )
        .unwrap();
        let t = Topology { map, ..t };
        assert_eq!(t.prefer_mem(&MemPlace::Host { numa: Some(0) }), 0b11000);
        assert_eq!(t.prefer_mem(&MemPlace::Host { numa: Some(1) }), 0b01100);
    }

    #[test]
    fn numa_node_minus_one_is_unknown_and_virtio_takes_its_pci_parent() {
        let s = FakeSys::new();
        // As a VM's virtio NIC: the net device hangs off virtioN, which
        // has no numa_node; its PCI parent says -1.
        s.pci("pci0000:00/0000:00:03.0", -1);
        std::fs::create_dir_all(s.0.join("devices/pci0000:00/0000:00:03.0/virtio2")).unwrap();
        s.nic("eth0", "pci0000:00/0000:00:03.0/virtio2");
        assert_eq!(
            nic_place(&s.0, "eth0"),
            place(None, "pci0000:00/0000:00:03.0")
        );
        std::fs::write(s.0.join("devices/pci0000:00/0000:00:03.0/numa_node"), "2\n").unwrap();
        assert_eq!(
            nic_place(&s.0, "eth0"),
            place(Some(2), "pci0000:00/0000:00:03.0")
        );
    }

    /// One socket, two PCIe switches under one root port each; switch A
    /// holds GPU 0 and NIC eth0, switch B GPU 1 and NIC eth1.
    fn switches() -> FakeSys {
        let s = FakeSys::new();
        for (port, up, down_gpu, down_nic, gpu, nic) in [
            (
                "00:01.0", "01:00.0", "02:08.0", "02:10.0", "05:00.0", "06:00.0",
            ),
            (
                "00:03.0", "11:00.0", "12:08.0", "12:10.0", "15:00.0", "16:00.0",
            ),
        ] {
            let sw = format!("pci0000:00/0000:{port}/0000:{up}");
            s.pci(&format!("pci0000:00/0000:{port}"), 0);
            s.pci(&sw, 0);
            s.pci(&format!("{sw}/0000:{down_gpu}"), 0);
            s.pci(&format!("{sw}/0000:{down_gpu}/0000:{gpu}"), 0);
            s.pci(&format!("{sw}/0000:{down_nic}"), 0);
            s.pci(&format!("{sw}/0000:{down_nic}/0000:{nic}"), 0);
        }
        s.nic(
            "eth0",
            "pci0000:00/0000:00:01.0/0000:01:00.0/0000:02:10.0/0000:06:00.0",
        );
        s.nic(
            "eth1",
            "pci0000:00/0000:00:03.0/0000:11:00.0/0000:12:10.0/0000:16:00.0",
        );
        s
    }

    #[test]
    fn gpu_prefers_the_nic_under_its_pcie_switch() {
        let s = switches();
        assert_eq!(
            pci_place(&s.0, "0000:15:00.0"),
            place(
                Some(0),
                "pci0000:00/0000:00:03.0/0000:11:00.0/0000:12:08.0/0000:15:00.0"
            )
        );
        // CUDA writes the bus id in upper case.
        assert_eq!(
            pci_place(&s.0, "0000:15:00.0"),
            pci_place(&s.0, "0000:15:00.0".to_uppercase().as_str())
        );
        // nvidia-smi's 8-digit domain.
        assert_eq!(
            pci_place(&s.0, "00000000:15:00.0"),
            pci_place(&s.0, "0000:15:00.0")
        );
        assert_eq!(pci_place(&s.0, "0000:99:00.0"), Place::default());
        assert_eq!(pci_place(&s.0, "not-a-bus-id"), Place::default());
        let rails = names(&["eth0", "eth1"]);
        let t = Topology::read(&s.0, &rails, vec![], locate_unknown);
        let gpu = |index, bus: &str| MemPlace::Gpu {
            index,
            bus_id: Some(bus.to_string()),
        };
        assert_eq!(t.prefer_mem(&gpu(0, "0000:05:00.0")), 0b01);
        assert_eq!(t.prefer_mem(&gpu(1, "0000:15:00.0")), 0b10);
        // Unknown bus id: every rail; host memory of node 0: both NICs.
        let unknown = MemPlace::Gpu {
            index: 1,
            bus_id: None,
        };
        assert_eq!(t.prefer_mem(&unknown), 0b11);
        assert_eq!(t.prefer_mem(&MemPlace::Host { numa: Some(0) }), 0b11);
        // The map wins over PCI.
        let map = parse_rail_map("gpu1=eth0", &rails).unwrap();
        let t = Topology { map, ..t };
        assert_eq!(t.prefer_mem(&gpu(1, "0000:15:00.0")), 0b01);
        assert_eq!(t.prefer_mem(&gpu(0, "0000:05:00.0")), 0b01);
    }

    #[test]
    fn rail_map_parses() {
        let rails = names(&["eth0", "eth1", "eth2"]);
        let e = |key, rail| MapEntry { key, rail };
        assert_eq!(
            parse_rail_map(" numa0 = eth0+eth1 , gpu3=eth2,", &rails).unwrap(),
            [
                e(MapKey::Numa(0), 0),
                e(MapKey::Numa(0), 1),
                e(MapKey::Gpu(3), 2)
            ]
        );
        assert_eq!(parse_rail_map("", &rails).unwrap(), []);
    }

    #[test]
    fn rail_map_errors_name_the_bad_value() {
        let rails = names(&["eth0", "eth1"]);
        let err = |s: &str| parse_rail_map(s, &rails).unwrap_err();
        assert_eq!(
            err("numa0=eth0+eth9"),
            "unknown rail \"eth9\" (rails: eth0, eth1)"
        );
        assert_eq!(
            err("numa0=eth0,cpu1=eth1"),
            "bad key \"cpu1\" (numaN or gpuN)"
        );
        assert_eq!(err("gpu=eth1"), "bad key \"gpu\" (numaN or gpuN)");
        assert_eq!(err("numa-1=eth1"), "bad key \"numa-1\" (numaN or gpuN)");
        assert_eq!(err("numa0"), "\"numa0\" is not KEY=IF+IF");
        assert_eq!(err("numa0="), "unknown rail \"\" (rails: eth0, eth1)");
        assert_eq!(err("numa0=eth0+"), "unknown rail \"\" (rails: eth0, eth1)");
    }
}
