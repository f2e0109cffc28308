//! Which rail of a peer each local rail connects to: the one on the same
//! subnet (see the crate's "Pairing"), and the networks of an interface.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// One IP network of a rail's interface: an address and its prefix
/// length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RailNet {
    /// An address of the interface (for IPv4 from the routing table: the
    /// network's first address).
    pub addr: IpAddr,
    /// Prefix length in bits.
    pub prefix: u8,
}

impl RailNet {
    /// The network `addr`/`prefix`.
    pub fn new(addr: IpAddr, prefix: u8) -> RailNet {
        RailNet { addr, prefix }
    }

    /// The address with the bits past the prefix cleared.
    fn network(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(a) => {
                let p = u32::from(self.prefix.min(32));
                let mask = u32::MAX.checked_shl(32 - p).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) => {
                let p = u32::from(self.prefix.min(128));
                let mask = u128::MAX.checked_shl(128 - p).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
            }
        }
    }

    /// Whether `self` and `other` are the same network (same family, same
    /// prefix, same network address).
    pub fn same_subnet(&self, other: &RailNet) -> bool {
        self.prefix == other.prefix && self.network() == other.network()
    }
}

impl fmt::Display for RailNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network(), self.prefix)
    }
}

/// A rail as an address names it: its interface and its networks.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct RailInfo {
    /// The interface name (as in `KVXFER_RAILS`).
    pub name: String,
    /// Its networks; empty where none is known (`lo`, an interface
    /// without a connected route, an address of an older version).
    pub nets: Vec<RailNet>,
}

impl RailInfo {
    /// Rail `name` with networks `nets`.
    pub fn new(name: &str, nets: Vec<RailNet>) -> RailInfo {
        RailInfo {
            name: name.to_owned(),
            nets,
        }
    }

    fn shares(&self, other: &RailInfo) -> bool {
        self.nets
            .iter()
            .any(|a| other.nets.iter().any(|b| a.same_subnet(b)))
    }
}

/// "name net net, name, ..." of `rails`.
pub(crate) fn describe(rails: &[RailInfo]) -> String {
    let mut s = String::new();
    for (i, r) in rails.iter().enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        s.push_str(&r.name);
        for n in &r.nets {
            s.push(' ');
            s.push_str(&n.to_string());
        }
    }
    s
}

/// Pairs each local rail with at most one peer rail and each peer rail
/// with at most one local rail: by rail `l` of `local`, the index of its
/// partner in `peer`, or `None` where it has none (it is not used for
/// that peer).
///
/// Rails with networks pair with the first free peer rail sharing one
/// of them (the order of either list does not matter); rails without
/// networks pair with the peer's rails without networks by position
/// among those. When one side knows no network at all (an address of an
/// older version, rails on `lo` only), all pair by position. Fails,
/// naming both sides' rails, when no rail pairs at all.
pub fn pair_rails(local: &[RailInfo], peer: &[RailInfo]) -> Result<Vec<Option<usize>>, String> {
    let mut out = vec![None; local.len()];
    let known = |rails: &[RailInfo]| rails.iter().any(|r| !r.nets.is_empty());
    if !known(local) || !known(peer) {
        // Nothing to match on one side (an older peer, or only `lo`).
        for (l, o) in out.iter_mut().enumerate().take(peer.len()) {
            *o = Some(l);
        }
        return Ok(out);
    }
    let mut taken = vec![false; peer.len()];
    for (l, lr) in local.iter().enumerate() {
        if lr.nets.is_empty() {
            continue;
        }
        if let Some(p) = (0..peer.len()).find(|&p| !taken[p] && lr.shares(&peer[p])) {
            taken[p] = true;
            out[l] = Some(p);
        }
    }
    let bare_local = (0..local.len()).filter(|&l| local[l].nets.is_empty());
    let bare_peer = (0..peer.len()).filter(|&p| peer[p].nets.is_empty());
    for (l, p) in bare_local.zip(bare_peer) {
        out[l] = Some(p);
    }
    if out.iter().all(Option::is_none) {
        return Err(format!(
            "no shared subnet (ours: {}; theirs: {})",
            describe(local),
            describe(peer)
        ));
    }
    Ok(out)
}

/// The networks of interface `name`, read from `/proc/net/route` (IPv4:
/// its directly connected routes) and `/proc/net/if_inet6` (IPv6, link
/// local addresses left out); empty where neither names it (or off
/// Linux).
pub fn interface_nets(name: &str) -> Vec<RailNet> {
    let route = std::fs::read_to_string("/proc/net/route").unwrap_or_default();
    let inet6 = std::fs::read_to_string("/proc/net/if_inet6").unwrap_or_default();
    nets_from_proc(name, &route, &inet6)
}

/// [`interface_nets`] from the two files' text.
fn nets_from_proc(name: &str, route: &str, inet6: &str) -> Vec<RailNet> {
    let mut out: Vec<RailNet> = Vec::new();
    // Iface Destination Gateway Flags RefCnt Use Metric Mask ...; the
    // addresses are hex of the bytes in network order, read as a
    // little-endian number.
    for line in route.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 || f[0] != name {
            continue;
        }
        let hex = |s: &str| u32::from_str_radix(s, 16).ok();
        let (Some(dest), Some(gw), Some(flags), Some(mask)) =
            (hex(f[1]), hex(f[2]), hex(f[3]), hex(f[7]))
        else {
            continue;
        };
        // Up (1), no gateway (2): a network on the link.
        if flags & 3 != 1 || gw != 0 || mask == 0 {
            continue;
        }
        let mask = u32::from_be_bytes(mask.to_le_bytes());
        if mask.leading_ones() + mask.trailing_zeros() != 32 {
            continue;
        }
        let net = RailNet::new(
            IpAddr::V4(Ipv4Addr::from(dest.to_le_bytes())),
            mask.leading_ones() as u8,
        );
        if !out.iter().any(|n| n.same_subnet(&net)) {
            out.push(net);
        }
    }
    // Address (32 hex digits) index prefix scope flags name.
    for line in inet6.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 6 || f[5] != name {
            continue;
        }
        let (Ok(a), Ok(prefix), Ok(scope)) = (
            u128::from_str_radix(f[0], 16),
            u8::from_str_radix(f[2], 16),
            u8::from_str_radix(f[3], 16),
        ) else {
            continue;
        };
        // Global scope only: link-local and loopback addresses say
        // nothing about which link a peer is on.
        if scope != 0 {
            continue;
        }
        let net = RailNet::new(IpAddr::V6(Ipv6Addr::from(a)), prefix);
        if !out.iter().any(|n| n.same_subnet(&net)) {
            out.push(net);
        }
    }
    out
}

/// Appends `nets` to `out`: a count byte, then per network its family
/// (4 or 6), its address bytes and its prefix length.
pub(crate) fn put_nets(out: &mut Vec<u8>, nets: &[RailNet]) {
    let nets = &nets[..nets.len().min(255)];
    out.push(nets.len() as u8);
    for n in nets {
        match n.addr {
            IpAddr::V4(a) => {
                out.push(4);
                out.extend_from_slice(&a.octets());
            }
            IpAddr::V6(a) => {
                out.push(6);
                out.extend_from_slice(&a.octets());
            }
        }
        out.push(n.prefix);
    }
}

/// Reads what [`put_nets`] wrote; `None` if truncated or malformed.
pub(crate) fn take_nets(b: &mut &[u8]) -> Option<Vec<RailNet>> {
    let (&count, mut rest) = b.split_first()?;
    let mut nets = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let (&fam, r) = rest.split_first()?;
        let (addr, r) = match fam {
            4 if r.len() >= 4 => {
                let a: [u8; 4] = r[..4].try_into().ok()?;
                (IpAddr::V4(Ipv4Addr::from(a)), &r[4..])
            }
            6 if r.len() >= 16 => {
                let a: [u8; 16] = r[..16].try_into().ok()?;
                (IpAddr::V6(Ipv6Addr::from(a)), &r[16..])
            }
            _ => return None,
        };
        let (&prefix, r) = r.split_first()?;
        let max = if fam == 4 { 32 } else { 128 };
        if prefix > max {
            return None;
        }
        nets.push(RailNet::new(addr, prefix));
        rest = r;
    }
    *b = rest;
    Some(nets)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> RailNet {
        let (a, p) = s.split_once('/').unwrap();
        RailNet::new(a.parse().unwrap(), p.parse().unwrap())
    }

    fn rail(name: &str, nets: &[&str]) -> RailInfo {
        RailInfo::new(name, nets.iter().map(|s| net(s)).collect())
    }

    /// `n` rails `{side}1..` on 10.216.i.0/24, host `host`.
    fn side(prefix: &str, order: &[u8], host: u8) -> Vec<RailInfo> {
        order
            .iter()
            .map(|i| rail(&format!("{prefix}{i}"), &[&format!("10.216.{i}.{host}/24")]))
            .collect()
    }

    #[test]
    fn same_subnet_in_the_same_order() {
        let a = side("a", &[1, 2], 1);
        let b = side("b", &[1, 2], 2);
        assert_eq!(pair_rails(&a, &b).unwrap(), vec![Some(0), Some(1)]);
    }

    #[test]
    fn order_does_not_matter() {
        let a = side("a", &[1, 2, 3], 1);
        let b = side("b", &[3, 1, 2], 2);
        assert_eq!(pair_rails(&a, &b).unwrap(), vec![Some(1), Some(2), Some(0)]);
        assert_eq!(pair_rails(&b, &a).unwrap(), vec![Some(2), Some(0), Some(1)]);
    }

    #[test]
    fn two_against_four_uses_the_two_shared() {
        let four = side("a", &[1, 2, 3, 4], 1);
        let two = side("b", &[2, 1], 2);
        assert_eq!(pair_rails(&two, &four).unwrap(), vec![Some(1), Some(0)]);
        assert_eq!(
            pair_rails(&four, &two).unwrap(),
            vec![Some(1), Some(0), None, None]
        );
    }

    #[test]
    fn one_to_one_when_two_rails_share_one_subnet() {
        // Two local rails on the same network, one peer rail there: only
        // the first local rail gets it.
        let a = vec![rail("a1", &["10.1.0.1/16"]), rail("a2", &["10.1.0.2/16"])];
        let b = vec![rail("b1", &["10.1.9.9/16"])];
        assert_eq!(pair_rails(&a, &b).unwrap(), vec![Some(0), None]);
    }

    #[test]
    fn prefix_and_family_must_match() {
        let a = vec![
            rail("a1", &["10.216.1.1/24"]),
            rail("a2", &["fd00:1::1/64"]),
        ];
        let b = vec![
            rail("b1", &["10.216.1.2/16"]),
            rail("b2", &["fd00:1::2/64"]),
        ];
        assert_eq!(pair_rails(&a, &b).unwrap(), vec![None, Some(1)]);
    }

    #[test]
    fn without_networks_by_position() {
        let a = vec![rail("lo", &[]), rail("lo", &[])];
        let b = vec![rail("lo", &[]), rail("lo", &[]), rail("lo", &[])];
        assert_eq!(pair_rails(&a, &b).unwrap(), vec![Some(0), Some(1)]);
        // Mixed: the networked rails by subnet, the rest by position.
        let a = vec![rail("lo", &[]), rail("a1", &["10.216.1.1/24"])];
        let b = vec![rail("b1", &["10.216.1.2/24"]), rail("lo", &[])];
        assert_eq!(pair_rails(&a, &b).unwrap(), vec![Some(1), Some(0)]);
        // No network known on one side: all by position.
        let a = side("a", &[1, 2, 3], 1);
        let b = vec![rail("x", &[]), rail("y", &[])];
        assert_eq!(pair_rails(&a, &b).unwrap(), vec![Some(0), Some(1), None]);
        assert_eq!(pair_rails(&b, &a).unwrap(), vec![Some(0), Some(1)]);
    }

    #[test]
    fn nothing_shared_names_both_sides() {
        let a = side("a", &[1, 2], 1);
        let b = vec![
            rail("b3", &["10.216.3.2/24", "fd00:3::2/64"]),
            rail("b4", &["10.216.4.2/24"]),
        ];
        assert_eq!(
            pair_rails(&a, &b).unwrap_err(),
            "no shared subnet (ours: a1 10.216.1.0/24, a2 10.216.2.0/24; theirs: b3 \
             10.216.3.0/24 fd00:3::/64, b4 10.216.4.0/24)"
        );
    }

    #[test]
    fn nets_round_trip_and_truncation() {
        let nets = vec![net("10.216.1.1/24"), net("fd00:3::2/64")];
        let mut v = Vec::new();
        put_nets(&mut v, &nets);
        v.push(0xee);
        let mut b = &v[..];
        assert_eq!(take_nets(&mut b).unwrap(), nets);
        assert_eq!(b, &[0xee]);
        for cut in 0..v.len() - 1 {
            assert_eq!(take_nets(&mut &v[..cut]), None, "cut at {cut}");
        }
        // A prefix longer than the family's address is refused.
        assert_eq!(take_nets(&mut &[1u8, 4, 10, 0, 0, 1, 33][..]), None);
    }

    #[test]
    fn proc_files() {
        let route =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
            eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
            eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
            eth1\t0001D80A\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n";
        let inet6 = "fd000000000000000000000000000002 04 40 00 82     eth0\n\
            fe8000000000000000fc00fffe000001 04 40 20 80     eth0\n\
            00000000000000000000000000000001 01 80 10 80       lo\n";
        assert_eq!(
            nets_from_proc("eth0", route, inet6),
            vec![net("192.0.2.0/24"), net("fd00::2/64")]
        );
        assert_eq!(
            nets_from_proc("eth1", route, inet6),
            vec![net("10.216.1.0/16")]
        );
        assert_eq!(nets_from_proc("lo", route, inet6), vec![]);
    }
}

/// [`Rails`](crate::Rails) connecting over in-memory loopback rails (each
/// rail's identity is its loopback id, which its keys carry too).
#[cfg(test)]
mod connect_tests {
    use kvxfer_core::transport::loopback::{Loopback, LoopbackMemory, LoopbackPeer};
    use kvxfer_core::{Region, Segment, Segments, Token, Transport, XferOp};

    use super::RailNet;
    use crate::{Rails, RailsConfig};

    const LEN: usize = 2 << 20;
    const BASE: u64 = 0x10_0000;
    static MEM: LoopbackMemory<{ 2 * LEN }> = LoopbackMemory::new(BASE);

    type Lb = Loopback<'static, { 2 * LEN }>;

    /// Rails `name`: per rail its interface, loopback id and network.
    fn rails(name: &str, rails: &[(&str, u32, Option<&str>)]) -> Rails<Lb> {
        let list = rails
            .iter()
            .map(|&(iface, id, _)| (iface.to_string(), Loopback::new(&MEM, id)))
            .collect();
        let mut r = Rails::new(name, list, RailsConfig::default());
        for (i, &(_, _, net)) in rails.iter().enumerate() {
            let nets = net
                .map(|n| {
                    let (a, p) = n.split_once('/').unwrap();
                    vec![RailNet::new(a.parse().unwrap(), p.parse().unwrap())]
                })
                .unwrap_or_default();
            r.set_nets(i, nets);
        }
        r
    }

    fn address<T: Transport>(t: &T) -> Vec<u8> {
        let mut buf = vec![0u8; 4096];
        let n = t.local_address(&mut buf).unwrap();
        buf.truncate(n);
        buf
    }

    /// The loopback peer of each local rail's connection to `peer`.
    fn conns(r: &Rails<Lb>, peer: &crate::RailsPeer) -> Vec<Option<u32>> {
        r.peers[&peer.id]
            .conns
            .iter()
            .map(|c| c.as_ref().map(|c: &LoopbackPeer| c.id))
            .collect()
    }

    fn four() -> Rails<Lb> {
        rails(
            "t",
            &[
                ("a1", 10, Some("10.216.1.1/24")),
                ("a2", 11, Some("10.216.2.1/24")),
                ("a3", 12, Some("10.216.3.1/24")),
                ("a4", 13, Some("10.216.4.1/24")),
            ],
        )
    }

    /// Two rails in reversed order against four: the two shared subnets
    /// pair (both ways), keys unpack on the paired rails (a loopback key
    /// only unpacks on a connection to the rail that packed it), and a
    /// striped WRITE moves byte-exact over both.
    #[test]
    fn two_reversed_against_four() {
        let mut t = four();
        let mut i = rails(
            "i",
            &[
                ("b2", 21, Some("10.216.2.2/24")),
                ("b1", 20, Some("10.216.1.2/24")),
            ],
        );
        let tp = t.connect(&address(&i)).unwrap();
        assert_eq!(conns(&t, &tp), vec![Some(20), Some(21), None, None]);
        let ip = i.connect(&address(&t)).unwrap();
        assert_eq!(conns(&i, &ip), vec![Some(11), Some(10)]);

        let (src, dst) = (BASE, BASE + LEN as u64);
        let data: Vec<u8> = (0..LEN).map(|k| (k * 7 + k / 4096) as u8).collect();
        MEM.write(src, &data).unwrap();
        let local = i.register(&Region::dram(src, LEN as u64)).unwrap();
        let remote_reg = t.register(&Region::dram(dst, LEN as u64)).unwrap();
        let mut key = vec![0u8; 4096];
        let n = t.pack_key(&remote_reg, &mut key).unwrap();
        let remote = i
            .unpack_key(&ip, &Region::dram(dst, LEN as u64), &key[..n])
            .unwrap();
        let seg = [Segment {
            local_addr: src,
            remote_addr: dst,
            len: LEN as u64,
            local: &local,
            remote: &remote,
            remote_region_addr: dst,
        }];
        i.post(XferOp::Write, &ip, Segments::from(&seg[..]), None, Token(7))
            .unwrap();
        let done = loop {
            if let Some(c) = i.poll() {
                break c;
            }
        };
        assert_eq!(done.token, Token(7));
        done.result.unwrap();
        let mut got = vec![0u8; LEN];
        MEM.read(dst, &mut got).unwrap();
        assert!(got == data, "the WRITE's bytes differ");
        let stats = i.stats();
        assert!(stats.iter().all(|r| r.bytes > 0), "{stats:?}");
        assert_eq!(stats.iter().map(|r| r.bytes).sum::<u64>(), LEN as u64);
    }

    #[test]
    fn nothing_shared_names_the_peer_and_both_sides() {
        let mut t = rails("t", &[("a1", 30, Some("10.0.1.1/24")), ("a2", 31, None)]);
        let i = rails(
            "i",
            &[
                ("b3", 40, Some("10.0.3.2/24")),
                ("b4", 41, Some("10.0.4.2/24")),
            ],
        );
        let e = t.connect(&address(&i)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "LOOPBACK error -22: rails to i: no shared subnet (ours: a1 10.0.1.0/24, a2; \
             theirs: b3 10.0.3.0/24, b4 10.0.4.0/24)"
        );
    }

    #[test]
    fn rails_and_a_single_endpoint_refuse_each_other() {
        let mut t = four();
        let mut one = rails("one", &[("", 50, None)]);
        let e = t.connect(&address(&one)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "LOOPBACK error -22: rails on one side only: the peer needs KVXFER_RAILS of 2+ interfaces (ours: \
             a1,a2,a3,a4)"
        );
        let e = one.connect(&address(&t)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "LOOPBACK error -22: rails on one side only: set KVXFER_RAILS of 2+ interfaces here too (t: \
             a1,a2,a3,a4)"
        );
    }

    /// Addresses of older versions (`KVR1`: no networks; `KVR2`: other
    /// fences) are refused, named.
    #[test]
    fn older_addresses_are_refused() {
        let mut t = four();
        for magic in [b"KVR1", b"KVR2"] {
            let mut v = magic.to_vec();
            v.extend_from_slice(&3u32.to_le_bytes());
            v.extend_from_slice(b"old");
            let e = t.connect(&v).unwrap_err();
            assert_eq!(
                e.to_string(),
                format!(
                    "LOOPBACK error -22: rails: peer address of {} bytes is of an older kvxfer \
                     (other fences): upgrade it",
                    v.len()
                )
            );
        }
        let mut v = address(&four());
        v.truncate(v.len() - 2);
        let e = t.connect(&v).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "LOOPBACK error -22: rails: peer address of {} bytes is truncated",
                v.len()
            )
        );
    }
}
