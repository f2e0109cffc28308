//! Renewal among several agents, over in-memory rails whose inner
//! transport renews as UCX's does: a renewal gives the rail a new address
//! and ends every connection made to the old one (a post on it fails at
//! once), and a link can be made silent between two rails (posts on it
//! never complete, notifications are lost) until it is healed.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kvxfer_core::transport::loopback::{Loopback, LoopbackMemory, LoopbackPeer};
use kvxfer_core::{
    Capabilities, Completion, Error, PostStatus, Region, Segment, Segments, Token, Transport,
    XferOp,
};

use crate::{Rails, RailsConfig, RailsKey, RailsPeer, RailsReg};

const LEN: usize = 64 << 10;
const BASE: u64 = 0x40_0000;
/// The agents' buffers: two initiators' sources, three targets'.
static MEM: LoopbackMemory<{ 5 * LEN }> = LoopbackMemory::new(BASE);
/// The current epoch of each rail id (bumped by a renewal).
static EPOCH: Mutex<[u32; 64]> = Mutex::new([0; 64]);
/// Silent links, (from rail id, to rail id).
static SILENT: Mutex<Option<HashSet<(u32, u32)>>> = Mutex::new(None);

fn epoch(id: u32) -> u32 {
    EPOCH.lock().unwrap()[id as usize]
}

fn silent(from: u32, to: u32) -> bool {
    SILENT
        .lock()
        .unwrap()
        .as_ref()
        .is_some_and(|s| s.contains(&(from, to)))
}

fn set_silent(from: u32, to: u32, on: bool) {
    let mut s = SILENT.lock().unwrap();
    let s = s.get_or_insert_with(HashSet::new);
    if on {
        s.insert((from, to));
    } else {
        s.remove(&(from, to));
    }
}

/// A connection: the peer's rail and the epoch its address named.
struct Conn {
    lb: LoopbackPeer,
    epoch: u32,
}

/// A loopback rail that renews (see the module docs).
struct Renewing {
    lb: Loopback<'static, { 5 * LEN }>,
    id: u32,
    /// Posts on a silent link: never completed, until abandoned.
    held: Vec<Token>,
    /// Abandoned posts, reported on the next poll.
    ended: Vec<Token>,
}

impl Renewing {
    fn new(id: u32) -> Renewing {
        Renewing {
            lb: Loopback::new(&MEM, id),
            id,
            held: Vec::new(),
            ended: Vec::new(),
        }
    }

    fn reset_error() -> Error {
        Error::backend(
            "LOOPBACK",
            -104,
            "connection reset: the peer renewed its rail",
        )
    }
}

impl Transport for Renewing {
    type LocalReg = Region;
    type Peer = Conn;
    type RemoteKey = Region;

    fn name(&self) -> &'static str {
        "LOOPBACK"
    }

    fn capabilities(&self) -> Capabilities {
        self.lb.capabilities()
    }

    fn register(&mut self, region: &Region) -> Result<Region, Error> {
        self.lb.register(region)
    }

    fn deregister(&mut self, reg: Region) {
        self.lb.deregister(reg)
    }

    fn pack_key(&self, reg: &Region, out: &mut [u8]) -> Result<usize, Error> {
        self.lb.pack_key(reg, out)
    }

    /// The rail id and its epoch.
    fn local_address(&self, out: &mut [u8]) -> Result<usize, Error> {
        out[..4].copy_from_slice(&self.id.to_le_bytes());
        out[4..8].copy_from_slice(&epoch(self.id).to_le_bytes());
        Ok(8)
    }

    fn connect(&mut self, address: &[u8]) -> Result<Conn, Error> {
        let lb = self.lb.connect(&address[..4])?;
        let epoch = u32::from_le_bytes(address[4..8].try_into().unwrap());
        Ok(Conn { lb, epoch })
    }

    fn disconnect(&mut self, _peer: Conn) {}

    fn unpack_key(&mut self, peer: &Conn, region: &Region, key: &[u8]) -> Result<Region, Error> {
        self.lb.unpack_key(&peer.lb, region, key)
    }

    fn release_key(&mut self, _key: Region) {}

    fn post(
        &mut self,
        op: XferOp,
        peer: &Conn,
        segments: Segments<'_, Region, Region>,
        notification: Option<&[u8]>,
        token: Token,
    ) -> Result<PostStatus, Error> {
        if epoch(peer.lb.id) != peer.epoch {
            return Err(Renewing::reset_error());
        }
        if silent(self.id, peer.lb.id) {
            self.held.push(token);
            return Ok(PostStatus::InProgress);
        }
        self.lb.post(op, &peer.lb, segments, notification, token)
    }

    fn poll(&mut self) -> Option<Completion> {
        if let Some(token) = self.ended.pop() {
            return Some(Completion {
                token,
                result: Err(Error::disconnected("")),
            });
        }
        self.lb.poll()
    }

    fn cancel(&mut self, token: Token) -> Result<(), Error> {
        self.held.retain(|&t| t != token);
        let _ = self.lb.cancel(token);
        Ok(())
    }

    /// Reported at once, as a failure, on the next poll.
    fn abandon(&mut self, token: Token) -> Result<(), Error> {
        self.cancel(token)?;
        self.ended.push(token);
        Ok(())
    }

    fn needs_renew(&self) -> bool {
        true
    }

    fn renew(&mut self) -> Result<(), Error> {
        EPOCH.lock().unwrap()[self.id as usize] += 1;
        Ok(())
    }

    fn send_notification(&mut self, peer: &Conn, msg: &[u8]) -> Result<(), Error> {
        if epoch(peer.lb.id) != peer.epoch {
            return Err(Renewing::reset_error());
        }
        if silent(self.id, peer.lb.id) {
            return Ok(());
        }
        self.lb.send_notification(&peer.lb, msg)
    }

    fn poll_notification(&mut self, buf: &mut [u8]) -> Option<Result<usize, Error>> {
        self.lb.poll_notification(buf)
    }
}

fn agent(name: &str, ids: [u32; 2]) -> Rails<Renewing> {
    let cfg = RailsConfig {
        rail_timeout: Duration::from_millis(150),
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(100),
        ..RailsConfig::default()
    };
    let list = ids
        .iter()
        .map(|&id| (String::new(), Renewing::new(id)))
        .collect();
    Rails::new(name, list, cfg)
}

fn address(t: &Rails<Renewing>) -> Vec<u8> {
    let mut buf = vec![0u8; 4096];
    let n = t.local_address(&mut buf).unwrap();
    buf.truncate(n);
    buf
}

/// One initiator's stream to one target: WRITEs of its source buffer
/// into the target's, a few in flight.
struct Stream {
    peer: RailsPeer,
    local: RailsReg<Renewing>,
    remote: RailsKey<Renewing>,
    src: u64,
    dst: u64,
    posted: u64,
    done: u64,
}

fn stream(ini: &mut Rails<Renewing>, tgt: &mut Rails<Renewing>, src: u64, dst: u64) -> Stream {
    let peer = ini.connect(&address(tgt)).unwrap();
    tgt.connect(&address(ini)).unwrap();
    let local = ini.register(&Region::dram(src, LEN as u64)).unwrap();
    let reg = tgt.register(&Region::dram(dst, LEN as u64)).unwrap();
    let mut key = vec![0u8; 4096];
    let n = tgt.pack_key(&reg, &mut key).unwrap();
    let remote = ini
        .unpack_key(&peer, &Region::dram(dst, LEN as u64), &key[..n])
        .unwrap();
    std::mem::forget(reg);
    Stream {
        peer,
        local,
        remote,
        src,
        dst,
        posted: 0,
        done: 0,
    }
}

impl Stream {
    /// Posts WRITEs (token base + n) until 4 are in flight, `limit` in all.
    fn feed(&mut self, t: &mut Rails<Renewing>, base: u64, limit: u64) {
        while self.posted < limit && self.posted - self.done < 4 {
            // 16 KiB at a time, cycling over the buffer: parts spread over
            // both rails.
            let off = (self.posted % 4) * (16 << 10);
            let seg = [Segment {
                local_addr: self.src + off,
                remote_addr: self.dst + off,
                len: 16 << 10,
                local: &self.local,
                remote: &self.remote,
                remote_region_addr: self.dst,
            }];
            t.post(
                XferOp::Write,
                &self.peer,
                Segments::from(&seg[..]),
                None,
                Token(base + self.posted),
            )
            .unwrap();
            self.posted += 1;
        }
    }
}

/// Agents I and J stream WRITEs, I to T, J to T and to U, all over two
/// rails. The link of I's second rail to T's goes silent for 700 ms: I
/// marks that rail down (again after each failed probe) and fences T,
/// which renews its second rail each time; J's connection
/// to it then fails, and J fails over that connection alone: its second
/// rail stays up and keeps carrying to U, U is not asked to renew, and J
/// reconnects to T's new address; T's end of the renewed rail is connected
/// to both again. Every WRITE completes, and the bytes are in place.
#[test]
fn a_renewal_fails_over_only_the_connections_to_it() {
    let mut t = agent("t", [10, 11]);
    let mut u = agent("u", [30, 31]);
    let mut i = agent("i", [20, 21]);
    let mut j = agent("j", [40, 41]);
    let buf = |k: u64| BASE + k * LEN as u64;
    for k in 0..2 {
        let data: Vec<u8> = (0..LEN).map(|x| (x as u64 * 13 + k * 101) as u8).collect();
        MEM.write(buf(k), &data).unwrap();
    }
    // I's source is buffer 0, J's buffer 1; T takes I's WRITEs into
    // buffer 2 and J's into 3, U J's into 4.
    let mut it = stream(&mut i, &mut t, buf(0), buf(2));
    let mut jt = stream(&mut j, &mut t, buf(1), buf(3));
    let mut ju = stream(&mut j, &mut u, buf(1), buf(4));
    // Posting stops after 1.2 s; every WRITE posted must complete.
    const N: u64 = u64::MAX;
    let start = Instant::now();
    let mut cut = false;
    let mut healed = false;
    let mut u_bytes_at_cut = 0;
    let mut j_down = false;
    loop {
        let now = start.elapsed();
        if !cut && now > Duration::from_millis(100) {
            set_silent(21, 11, true);
            cut = true;
            u_bytes_at_cut = j.stats()[1].bytes;
        }
        if cut && !healed && now > Duration::from_millis(800) {
            set_silent(21, 11, false);
            healed = true;
        }
        let limit = if now < Duration::from_millis(1200) {
            N
        } else {
            0
        };
        it.feed(&mut i, 0, limit);
        jt.feed(&mut j, 1 << 40, limit);
        ju.feed(&mut j, 2 << 40, limit);
        while let Some(c) = i.poll() {
            c.result
                .unwrap_or_else(|e| panic!("I's WRITE {:?}: {e}", c.token));
            it.done += 1;
        }
        while let Some(c) = j.poll() {
            c.result
                .unwrap_or_else(|e| panic!("J's WRITE {:?}: {e}", c.token));
            if c.token.0 >= 2 << 40 {
                ju.done += 1;
            } else {
                jt.done += 1;
            }
        }
        for x in [&mut t, &mut u] {
            while x.poll().is_some() {}
        }
        j_down |= j.stats().iter().any(|r| r.state != crate::RailState::Up);
        let all = |s: &Stream| s.done == s.posted;
        if now > Duration::from_millis(1200) && all(&it) && all(&jt) && all(&ju) {
            break;
        }
        assert!(
            now < Duration::from_secs(20),
            "stuck: I {}/{}, J to T {}/{}, J to U {}/{}; i {:?}; j {:?}",
            it.done,
            it.posted,
            jt.done,
            jt.posted,
            ju.done,
            ju.posted,
            i.stats(),
            j.stats()
        );
        std::thread::sleep(Duration::from_micros(200));
    }
    let (ts, us, is, js) = (t.stats(), u.stats(), i.stats(), j.stats());
    let what = format!("t {ts:?}\nu {us:?}\ni {is:?}\nj {js:?}");
    // Once per failure of I's rail: each probe on the silent link that
    // failed had a part in flight, which could still land.
    assert!(ts[1].renewals >= 1, "{what}");
    assert_eq!(ts[1].renewals, is[1].failures, "{what}");
    assert_eq!(ts[0].renewals, 0, "{what}");
    assert!(
        us.iter().all(|r| r.renewals == 0),
        "U never renewed\n{what}"
    );
    assert!(
        js.iter().all(|r| r.renewals == 0),
        "J never renewed\n{what}"
    );
    assert!(is[1].renewals >= 1, "I renewed its failed rail\n{what}");
    assert!(js[1].failures >= 1, "J's connection to T failed\n{what}");
    assert!(
        js[1].bytes > u_bytes_at_cut,
        "J's second rail kept carrying\n{what}"
    );
    assert!(!j_down, "J's rails were never marked down\n{what}");
    // T's end of its renewed rail is connected to both again (to J at
    // once, to I once I's probe got through and I said so over it), so
    // that it carries from T too.
    for (name, p) in [("I", &t.peers[&0]), ("J", &t.peers[&1])] {
        assert!(p.conns[1].is_some(), "T's rail 2 to {name}\n{what}");
    }
    for (src, dst) in [(buf(0), buf(2)), (buf(1), buf(3)), (buf(1), buf(4))] {
        let (mut a, mut b) = (vec![0u8; LEN], vec![0u8; LEN]);
        MEM.read(src, &mut a).unwrap();
        MEM.read(dst, &mut b).unwrap();
        assert!(a == b, "the bytes at {dst:#x}");
    }
}
