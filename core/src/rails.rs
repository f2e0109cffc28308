//! Rail choice by topology: which network rails (NICs) are closest to a
//! region's memory.
//!
//! The caller describes each rail ([`Nic`]: NUMA node and PCI path, as
//! read from `/sys/class/net/IF/device/numa_node` and the device's
//! resolved sysfs path) and the memory ([`Mem`]: host memory on a NUMA
//! node, or a GPU by its PCI path); [`choose`] writes the indices of the
//! preferred rails. The rules, first match wins:
//!
//! 1. an explicit map ([`MapEntry`]) naming the memory's NUMA node or GPU;
//! 2. host memory: the rails on its NUMA node;
//! 3. GPU memory: the rails sharing the most PCI bridges with the GPU
//!    (the same PCIe switch beats the same root port, which beats the same
//!    root complex), if they share at least one below the root complex;
//!    else the rails on the GPU's NUMA node;
//! 4. every rail.
//!
//! Pure logic: no allocation, no I/O.

/// One rail as the topology sees it.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Nic<'a> {
    /// NUMA node of the NIC (`None`: unknown, `numa_node` = -1).
    pub numa: Option<u32>,
    /// PCI path from the root complex, bridges separated by `/`, e.g.
    /// `pci0000:00/0000:00:01.0/0000:01:00.0/0000:02:00.0` (empty:
    /// unknown).
    pub pci: &'a str,
}

/// The memory a rail is chosen for.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Mem<'a> {
    /// Host memory on a NUMA node (`None`: unknown).
    Host {
        /// The node.
        numa: Option<u32>,
    },
    /// GPU memory.
    Gpu {
        /// The GPU's ordinal (for the explicit map).
        index: u32,
        /// The GPU's PCI path, as [`Nic::pci`].
        pci: &'a str,
        /// The GPU's NUMA node (`None`: unknown).
        numa: Option<u32>,
    },
}

/// What an explicit map entry matches.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum MapKey {
    /// Host memory on this NUMA node.
    Numa(u32),
    /// Memory of this GPU.
    Gpu(u32),
}

/// One explicit choice: memory `key` uses rail `rail`.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct MapEntry {
    /// The memory.
    pub key: MapKey,
    /// The rail's index.
    pub rail: u16,
}

/// Number of PCI path components `a` and `b` share, from the root.
pub fn shared_bridges(a: &str, b: &str) -> usize {
    if a.is_empty() || b.is_empty() {
        return 0;
    }
    a.split('/')
        .zip(b.split('/'))
        .take_while(|(x, y)| x == y)
        .count()
}

/// Writes into `out` the indices of the rails of `nics` preferred for
/// `mem` (in rail order) and returns how many; at most `out.len()`.
pub fn choose(nics: &[Nic<'_>], mem: Mem<'_>, map: &[MapEntry], out: &mut [u16]) -> usize {
    let mut n = 0;
    let mut push = |i: usize, n: &mut usize| {
        if let (Some(slot), Ok(i)) = (out.get_mut(*n), u16::try_from(i)) {
            *slot = i;
            *n += 1;
        }
    };
    // 1. Explicit map.
    let key = match mem {
        Mem::Host { numa } => numa.map(MapKey::Numa),
        Mem::Gpu { index, .. } => Some(MapKey::Gpu(index)),
    };
    if let Some(key) = key {
        for (i, _) in nics.iter().enumerate() {
            if map.iter().any(|e| e.key == key && usize::from(e.rail) == i) {
                push(i, &mut n);
            }
        }
        if n > 0 {
            return n;
        }
    }
    let numa = match mem {
        Mem::Host { numa } => numa,
        Mem::Gpu { pci, numa, .. } => {
            // 3. PCI proximity: more than the root complex in common.
            let best = nics
                .iter()
                .map(|nic| shared_bridges(nic.pci, pci))
                .max()
                .unwrap_or(0);
            if best > 1 {
                for (i, nic) in nics.iter().enumerate() {
                    if shared_bridges(nic.pci, pci) == best {
                        push(i, &mut n);
                    }
                }
                return n;
            }
            numa
        }
    };
    // 2. NUMA node.
    if let Some(node) = numa {
        for (i, nic) in nics.iter().enumerate() {
            if nic.numa == Some(node) {
                push(i, &mut n);
            }
        }
        if n > 0 {
            return n;
        }
    }
    // 4. Every rail.
    for i in 0..nics.len() {
        push(i, &mut n);
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pick(nics: &[Nic<'_>], mem: Mem<'_>, map: &[MapEntry]) -> heapless::Vec<u16, 16> {
        let mut out = [0u16; 16];
        let n = choose(nics, mem, map, &mut out);
        heapless::Vec::from_slice(&out[..n]).unwrap()
    }

    /// Two sockets, two NICs each; no PCI detail.
    const TWO_NUMA: [Nic<'static>; 4] = [
        Nic {
            numa: Some(0),
            pci: "",
        },
        Nic {
            numa: Some(0),
            pci: "",
        },
        Nic {
            numa: Some(1),
            pci: "",
        },
        Nic {
            numa: Some(1),
            pci: "",
        },
    ];

    #[test]
    fn host_memory_uses_the_nics_of_its_numa_node() {
        assert_eq!(pick(&TWO_NUMA, Mem::Host { numa: Some(0) }, &[]), [0, 1]);
        assert_eq!(pick(&TWO_NUMA, Mem::Host { numa: Some(1) }, &[]), [2, 3]);
    }

    #[test]
    fn unknown_or_nicless_numa_node_uses_every_rail() {
        assert_eq!(pick(&TWO_NUMA, Mem::Host { numa: None }, &[]), [0, 1, 2, 3]);
        assert_eq!(
            pick(&TWO_NUMA, Mem::Host { numa: Some(2) }, &[]),
            [0, 1, 2, 3]
        );
    }

    #[test]
    fn explicit_map_wins_over_numa() {
        let map = [
            MapEntry {
                key: MapKey::Numa(0),
                rail: 3,
            },
            MapEntry {
                key: MapKey::Numa(0),
                rail: 1,
            },
        ];
        assert_eq!(pick(&TWO_NUMA, Mem::Host { numa: Some(0) }, &map), [1, 3]);
        // Other nodes keep the topology's choice.
        assert_eq!(pick(&TWO_NUMA, Mem::Host { numa: Some(1) }, &map), [2, 3]);
    }

    /// 8 GPUs and 4 NICs as on an HGX board: two sockets, two PCIe
    /// switches per socket, each switch holding two GPUs and one NIC.
    const SW: [&str; 4] = [
        "pci0000:00/0000:00:01.0/0000:01:00.0",
        "pci0000:00/0000:00:03.0/0000:11:00.0",
        "pci0000:80/0000:80:01.0/0000:81:00.0",
        "pci0000:80/0000:80:03.0/0000:91:00.0",
    ];

    fn hgx_nic(i: usize) -> &'static str {
        [
            "pci0000:00/0000:00:01.0/0000:01:00.0/0000:02:10.0/0000:05:00.0",
            "pci0000:00/0000:00:03.0/0000:11:00.0/0000:12:10.0/0000:15:00.0",
            "pci0000:80/0000:80:01.0/0000:81:00.0/0000:82:10.0/0000:85:00.0",
            "pci0000:80/0000:80:03.0/0000:91:00.0/0000:92:10.0/0000:95:00.0",
        ][i]
    }

    fn hgx_gpu(g: usize) -> [u8; 96] {
        // SW[g / 2] + "/0000:x2:0y.0/0000:x3:00.0"
        let mut b = [0u8; 96];
        let base = SW[g / 2].as_bytes();
        b[..base.len()].copy_from_slice(base);
        let bus = b"0123456789abcdef";
        let hi = [b'0', b'1', b'8', b'9'][g / 2];
        let tail = [
            b'/',
            b'0',
            b'0',
            b'0',
            b'0',
            b':',
            hi,
            b'2',
            b':',
            b'0',
            bus[g % 2],
            b'.',
            b'0',
            b'/',
            b'0',
            b'0',
            b'0',
            b'0',
            b':',
            hi,
            b'3',
            bus[g % 2],
            b':',
            b'0',
            b'0',
            b'.',
            b'0',
        ];
        b[base.len()..base.len() + tail.len()].copy_from_slice(&tail);
        b
    }

    fn as_str(b: &[u8; 96]) -> &str {
        let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
        core::str::from_utf8(&b[..end]).unwrap()
    }

    fn hgx() -> [Nic<'static>; 4] {
        [0, 1, 2, 3].map(|i| Nic {
            numa: Some((i / 2) as u32),
            pci: hgx_nic(i),
        })
    }

    #[test]
    fn each_gpu_uses_the_nic_on_its_pcie_switch() {
        let nics = hgx();
        for g in 0..8 {
            let path = hgx_gpu(g);
            let mem = Mem::Gpu {
                index: g as u32,
                pci: as_str(&path),
                numa: Some((g / 4) as u32),
            };
            assert_eq!(
                pick(&nics, mem, &[]),
                [(g / 2) as u16],
                "GPU {g}: {}",
                as_str(&path)
            );
        }
    }

    #[test]
    fn gpu_sharing_only_the_root_complex_falls_back_to_numa() {
        let nics = hgx();
        // Behind its own root port on socket 1: no switch shared.
        let mem = Mem::Gpu {
            index: 9,
            pci: "pci0000:80/0000:80:05.0/0000:a1:00.0",
            numa: Some(1),
        };
        assert_eq!(pick(&nics, mem, &[]), [2, 3]);
        // Unknown path and node: every rail.
        let mem = Mem::Gpu {
            index: 9,
            pci: "",
            numa: None,
        };
        assert_eq!(pick(&nics, mem, &[]), [0, 1, 2, 3]);
    }

    #[test]
    fn explicit_map_wins_over_pci() {
        let nics = hgx();
        let path = hgx_gpu(0);
        let map = [MapEntry {
            key: MapKey::Gpu(0),
            rail: 3,
        }];
        let mem = Mem::Gpu {
            index: 0,
            pci: as_str(&path),
            numa: Some(0),
        };
        assert_eq!(pick(&nics, mem, &map), [3]);
        // A rail index past the NICs is ignored.
        let map = [MapEntry {
            key: MapKey::Gpu(0),
            rail: 7,
        }];
        assert_eq!(pick(&nics, mem, &map), [0]);
    }

    #[test]
    fn output_is_bounded_by_the_buffer() {
        let mut out = [0u16; 1];
        assert_eq!(
            choose(&TWO_NUMA, Mem::Host { numa: None }, &[], &mut out),
            1
        );
        assert_eq!(out, [0]);
    }

    #[test]
    fn shared_bridges_counts_common_components() {
        assert_eq!(shared_bridges(SW[0], hgx_nic(0)), 3);
        assert_eq!(shared_bridges(SW[0], hgx_nic(1)), 1);
        assert_eq!(shared_bridges(SW[0], hgx_nic(2)), 0);
        assert_eq!(shared_bridges("", hgx_nic(2)), 0);
    }
}
