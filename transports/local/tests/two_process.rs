//! `Local<T>` over UCX and over libfabric `tcp;ofi_rxm`, between two processes of this host: data moved by
//! cross-memory attach, compared byte for byte; notifications after the
//! data; the network path when cross-memory attach is off; a peer killed
//! mid-transfer.
//!
//! The test binary re-spawns itself (`child_role`, with `ROLE_ENV` set):
//! the child builds an engine over `Local<UcxTransport>`, registers a buffer
//! and prints `META <hex>` and `REGION <addr> <len>`, then polls while it
//! answers commands from stdin: `SUM <off> <block> <stride> <count>` (a
//! checksum of those blocks) and `FILL <seed>`. A notification `SUM …` is
//! answered the same way at the moment it is seen, as `NOTE <checksum>`.

#![allow(clippy::result_large_err)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use kvxfer_core::{
    Capacities, Desc, Engine, EngineConfig, Error, Instant as CoreInstant, Region, Storage,
    Strided, Transport, XferHandle, XferOp, XferState,
};
use kvxfer_libfabric::{FabricConfig, FabricTransport};
use kvxfer_local::{Local, LocalConfig};
use kvxfer_testkit::{checksum, fill, hex, unhex};
use kvxfer_ucx::{UcxConfig, UcxTransport};

const ROLE_ENV: &str = "KVXFER_LOCAL_TEST_ROLE";
const SIZE: usize = 64 << 20;
const CAPS: Capacities = Capacities {
    regions: 8,
    peers: 4,
    remote_regions: 16,
    xfers: 64,
    segments: 1 << 16,
    segments_per_chunk: 256,
    prepared_lists: 4,
    prepared_entries: 64,
    notifications: 64,
    notification_len: 256,
};

type Eng<T> = Engine<'static, Local<T>>;

/// A transport whose handles the `'static` engine storage can hold.
trait Inner: Transport<LocalReg: 'static, RemoteKey: 'static> + 'static {}
impl<T: Transport<LocalReg: 'static, RemoteKey: 'static> + 'static> Inner for T {}

/// The inner transports: UCX, and libfabric over `tcp;ofi_rxm`.
fn ucx() -> UcxTransport {
    UcxTransport::new(&UcxConfig::default()).unwrap()
}

fn fabric() -> FabricTransport {
    FabricTransport::new(&FabricConfig::default().with_provider("tcp;ofi_rxm")).unwrap()
}

fn engine<T: Inner>(name: &str, inner: T, cma: bool) -> Eng<T> {
    let mut config = LocalConfig::default();
    config.enabled = cma;
    let t = Local::new(inner, config);
    Engine::new(name, t, EngineConfig::default(), Storage::owned(&CAPS)).unwrap()
}

fn now() -> CoreInstant {
    CoreInstant::from_nanos(0)
}

/// The checksum of `count` blocks of `block` bytes, `stride` apart from
/// `off`.
fn blocks_sum(buf: &[u8], off: usize, block: usize, stride: usize, count: usize) -> u64 {
    let mut blocks = Vec::with_capacity(block * count);
    for k in 0..count {
        let at = off + k * stride;
        blocks.extend_from_slice(&buf[at..at + block]);
    }
    checksum(&blocks)
}

/// A buffer that lives until the process ends, as registered memory must.
fn buffer(len: usize) -> &'static mut [u8] {
    Box::leak(vec![0u8; len].into_boxed_slice())
}

/// Runs the child: serves its buffer until stdin closes.
fn serve<T: Inner>(inner: T) {
    let buf = buffer(SIZE);
    let base = buf.as_ptr() as u64;
    let mut e = engine("child", inner, true);
    e.register(Region::dram(base, SIZE as u64)).unwrap();
    let mut md = vec![0u8; 64 << 10];
    let n = e.local_metadata(&mut md).unwrap();
    println!("META {}", hex(&md[..n]));
    println!("REGION {base} {SIZE}");
    let (tx, rx) = channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            if tx.send(line.unwrap_or_default()).is_err() {
                break;
            }
        }
    });
    let sum = |buf: &[u8], args: &[&str]| -> u64 {
        let v: Vec<usize> = args.iter().map(|a| a.parse().unwrap()).collect();
        blocks_sum(buf, v[0], v[1], v[2], v[3])
    };
    let mut note = [0u8; 512];
    loop {
        e.poll(now());
        while let Some(Ok(n)) = e.poll_notification(&mut note) {
            let msg = String::from_utf8_lossy(&note[..n.len]).into_owned();
            let args: Vec<&str> = msg.split_whitespace().skip(1).collect();
            println!("NOTE {:016x}", sum(buf, &args));
        }
        match rx.try_recv() {
            Ok(cmd) => {
                let parts: Vec<&str> = cmd.split_whitespace().collect();
                match parts.first().copied() {
                    Some("SUM") => println!("SUM {:016x}", sum(buf, &parts[1..])),
                    Some("FILL") => {
                        fill(buf, parts[1].parse().unwrap());
                        println!("FILLED");
                    }
                    _ => {}
                }
            }
            Err(std::sync::mpsc::TryRecvError::Empty) => std::thread::yield_now(),
            Err(std::sync::mpsc::TryRecvError::Disconnected) => return,
        }
    }
}

#[test]
#[ignore = "child process of the tests in this file"]
fn child_role() {
    match std::env::var(ROLE_ENV).as_deref() {
        Ok("UCX") => serve(ucx()),
        Ok("LIBFABRIC") => serve(fabric()),
        _ => {}
    }
}

struct Peer {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    meta: Vec<u8>,
    base: u64,
}

impl Peer {
    fn spawn(backend: &str) -> Peer {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "child_role",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(ROLE_ENV, backend)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in out.lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut p = Peer {
            child,
            stdin,
            lines,
            meta: Vec::new(),
            base: 0,
        };
        p.meta = unhex(&p.expect("META ")).expect("metadata hex");
        p.base = p
            .expect("REGION ")
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        p
    }

    /// The rest of the next line starting with `prefix`.
    fn expect(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no {prefix:?} line from the child"));
            // The harness may print "test child_role ... " before it.
            if let Some(at) = line.find(prefix) {
                return line[at + prefix.len()..].to_string();
            }
        }
    }

    fn send(&mut self, cmd: &str) {
        writeln!(self.stdin, "{cmd}").unwrap();
    }

    fn sum(&mut self, off: usize, block: usize, stride: usize, count: usize) -> u64 {
        self.send(&format!("SUM {off} {block} {stride} {count}"));
        u64::from_str_radix(&self.expect("SUM "), 16).unwrap()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls until `h` is no longer in progress.
fn wait<T: Inner>(e: &mut Eng<T>, h: XferHandle) -> XferState {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        e.poll(now());
        let s = e.state(h).unwrap();
        if s != XferState::InProgress || Instant::now() > deadline {
            return s;
        }
        std::thread::yield_now();
    }
}

fn near_peer_moves_blocks_and_notifies_after_the_data<T: Inner>(inner: T, backend: &str) {
    let mut peer = Peer::spawn(backend);
    let mut a = engine("parent", inner, true);
    let src = buffer(SIZE);
    let dst = buffer(SIZE);
    fill(src, 11);
    a.register(Region::dram(src.as_ptr() as u64, SIZE as u64))
        .unwrap();
    a.register(Region::dram(dst.as_ptr() as u64, SIZE as u64))
        .unwrap();
    a.load_remote(&peer.meta).unwrap();
    assert_eq!(a.transport().far_peers(), 0, "the child is on this host");

    // 8,192 blocks of 4 KiB at an 8 KiB stride (the whole buffer), with a
    // notification that makes the child checksum the blocks the moment it
    // sees it.
    let (block, stride, count) = (4096usize, 8192usize, SIZE / 8192);
    let local = Strided::new(
        src.as_ptr() as u64,
        block as u64,
        stride as u64,
        count as u32,
    );
    let remote = Strided::new(peer.base, block as u64, stride as u64, count as u32);
    let note = format!("SUM 0 {block} {stride} {count}");
    for round in 0..3u64 {
        fill(src, 100 + round);
        let h = a
            .prepare_lists(
                XferOp::Write,
                local.into(),
                remote.into(),
                "child",
                Some(note.as_bytes()),
            )
            .unwrap();
        a.post(h, now()).unwrap();
        assert_eq!(wait(&mut a, h), XferState::Done, "round {round}");
        let want = blocks_sum(src, 0, block, stride, count);
        let seen = u64::from_str_radix(&peer.expect("NOTE "), 16).unwrap();
        assert_eq!(
            seen, want,
            "round {round}: the notification came before the data"
        );
        a.release(h).unwrap();
    }

    // READ the child's whole buffer back, and a few bytes inline.
    peer.send("FILL 77");
    peer.expect("FILLED");
    let whole = [Desc::new(dst.as_ptr() as u64, SIZE as u64)];
    let theirs = [Desc::new(peer.base, SIZE as u64)];
    let h = a
        .prepare(XferOp::Read, &whole, &theirs, "child", None)
        .unwrap();
    assert_eq!(a.post(h, now()), Ok(XferState::InProgress));
    assert_eq!(wait(&mut a, h), XferState::Done);
    let mut want = vec![0u8; SIZE];
    fill(&mut want, 77);
    assert!(dst[..] == want[..], "READ of 64 MiB differs");
    a.release(h).unwrap();
    let small = [Desc::new(src.as_ptr() as u64 + 8, 100)];
    let rsmall = [Desc::new(peer.base + 3, 100)];
    let h = a
        .prepare(XferOp::Write, &small, &rsmall, "child", None)
        .unwrap();
    assert_eq!(a.post(h, now()), Ok(XferState::Done), "moved inline");
    assert_eq!(
        peer.sum(3, 100, 100, 1),
        blocks_sum(&src[8..], 0, 100, 100, 1)
    );
    a.release(h).unwrap();
    // Inline with a notification: done once the message is out, and the
    // message sees the data.
    fill(src, 3);
    let h = a
        .prepare(
            XferOp::Write,
            &small,
            &rsmall,
            "child",
            Some(b"SUM 3 100 100 1"),
        )
        .unwrap();
    a.post(h, now()).unwrap();
    assert_eq!(wait(&mut a, h), XferState::Done);
    let seen = u64::from_str_radix(&peer.expect("NOTE "), 16).unwrap();
    assert_eq!(seen, blocks_sum(&src[8..], 0, 100, 100, 1));
}

fn without_cross_memory_attach_the_network_path_moves_the_data<T: Inner>(inner: T, backend: &str) {
    let mut peer = Peer::spawn(backend);
    let mut a = engine("parent", inner, false);
    let src = buffer(1 << 20);
    fill(src, 5);
    a.register(Region::dram(src.as_ptr() as u64, 1 << 20))
        .unwrap();
    a.load_remote(&peer.meta).unwrap();
    assert_eq!(a.transport().far_peers(), 1);
    let l = [Desc::new(src.as_ptr() as u64, 1 << 20)];
    let r = [Desc::new(peer.base, 1 << 20)];
    let h = a.prepare(XferOp::Write, &l, &r, "child", None).unwrap();
    a.post(h, now()).unwrap();
    assert_eq!(wait(&mut a, h), XferState::Done);
    assert_eq!(a.transport().cma_transfers(), 0);
    assert_eq!(
        peer.sum(0, 1 << 20, 1 << 20, 1),
        blocks_sum(src, 0, 1 << 20, 1 << 20, 1)
    );
}

/// Every transfer in flight to a killed child ends within 100 ms of its
/// death (on this thread's share of a CPU: see [`OnCpu`]), with
/// `RemoteDisconnected` naming it or done; none touches our memory later,
/// and a later post fails within 10 ms.
fn a_killed_peer_fails_its_transfers_within_100_ms<T: Inner>(inner: T, backend: &str) {
    let mut peer = Peer::spawn(backend);
    let mut a = engine("parent", inner, true);
    let src = buffer(SIZE);
    let dst = buffer(SIZE);
    a.register(Region::dram(src.as_ptr() as u64, SIZE as u64))
        .unwrap();
    a.register(Region::dram(dst.as_ptr() as u64, SIZE as u64))
        .unwrap();
    a.load_remote(&peer.meta).unwrap();
    let l = [Desc::new(src.as_ptr() as u64, SIZE as u64)];
    let d = [Desc::new(dst.as_ptr() as u64, SIZE as u64)];
    let r = [Desc::new(peer.base, SIZE as u64)];
    // Keep WRITEs and READs of 64 MiB in flight, then kill the child.
    let mut hs: Vec<XferHandle> = Vec::new();
    for k in 0..8 {
        let (op, local) = if k % 2 == 0 {
            (XferOp::Write, &l)
        } else {
            (XferOp::Read, &d)
        };
        let h = a.prepare(op, local, &r, "child", None).unwrap();
        a.post(h, now()).unwrap();
        hs.push(h);
    }
    peer.child.kill().unwrap();
    let killed = Instant::now();
    // The bound is the transport's: it starts once the child is dead (how
    // long the kernel takes to tear down a killed process of 64 MiB is
    // not), and counts only the time this thread was not kept waiting for
    // a CPU by other processes.
    let _ = peer.child.wait();
    let dead = OnCpu::start();
    let mut left: Vec<XferHandle> = hs.clone();
    while !left.is_empty() && killed.elapsed() < Duration::from_secs(5) {
        a.poll(now());
        left.retain(|&h| a.state(h).unwrap() == XferState::InProgress);
        std::thread::yield_now();
    }
    assert!(
        left.is_empty(),
        "transfers still in flight {:?} after the kill",
        killed.elapsed()
    );
    let (took, waited) = dead.elapsed();
    assert!(
        took < Duration::from_millis(100),
        "took {took:?} after the child's death, not counting {waited:?} waiting for a CPU"
    );
    let mut failed = 0;
    for &h in &hs {
        match a.state(h).unwrap() {
            XferState::Done => {}
            XferState::Failed(Error::RemoteDisconnected { peer }) => {
                assert_eq!(peer.as_str(), "child");
                failed += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(failed > 0, "no transfer was in flight at the kill");
    // Nothing touches our memory after the transfers ended: a canary in
    // the READ buffer stays.
    dst.fill(0xa5);
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        dst.iter().all(|&b| b == 0xa5),
        "memory written after the end"
    );
    // A post after the death fails at once.
    let h = hs[0];
    let t = OnCpu::start();
    assert!(matches!(
        a.post(h, now()),
        Err(Error::RemoteDisconnected { .. })
    ));
    let (took, waited) = t.elapsed();
    assert!(
        took < Duration::from_millis(10),
        "post took {took:?}, not counting {waited:?} waiting for a CPU"
    );
}

/// A stopwatch for bounds on this thread's own work: wall time less the
/// time the thread spent runnable but waiting for a CPU (the second field
/// of `/proc/thread-self/schedstat`), which on a loaded machine is the
/// other processes' doing. On an idle machine it reads as wall time, so a
/// bound keeps its meaning; time spent blocked or sleeping still counts,
/// so a transport that waits for a timer or a deadline still fails it.
/// Where the kernel has no schedstat, it is wall time.
struct OnCpu {
    start: Instant,
    waited: Duration,
}

impl OnCpu {
    fn start() -> OnCpu {
        OnCpu {
            waited: Self::waited(),
            start: Instant::now(),
        }
    }

    /// Time this thread has waited for a CPU since it started.
    fn waited() -> Duration {
        std::fs::read_to_string("/proc/thread-self/schedstat")
            .ok()
            .and_then(|s| s.split_whitespace().nth(1)?.parse().ok())
            .map_or(Duration::ZERO, Duration::from_nanos)
    }

    /// (wall time less the wait for a CPU, that wait) since `start`.
    fn elapsed(&self) -> (Duration, Duration) {
        let wall = self.start.elapsed();
        let waited = Self::waited().saturating_sub(self.waited);
        (wall.saturating_sub(waited), waited)
    }
}

/// The scenarios over one inner transport.
macro_rules! over {
    ($module:ident, $inner:expr, $backend:expr) => {
        mod $module {
            use super::*;

            #[test]
            fn near_peer_moves_blocks_and_notifies_after_the_data() {
                super::near_peer_moves_blocks_and_notifies_after_the_data($inner, $backend);
            }

            #[test]
            fn without_cross_memory_attach_the_network_path_moves_the_data() {
                super::without_cross_memory_attach_the_network_path_moves_the_data(
                    $inner, $backend,
                );
            }

            #[test]
            fn a_killed_peer_fails_its_transfers_within_100_ms() {
                super::a_killed_peer_fails_its_transfers_within_100_ms($inner, $backend);
            }
        }
    };
}

over!(over_ucx, ucx(), "UCX");
over!(over_libfabric, fabric(), "LIBFABRIC");
