//! The Agent's hot path allocates nothing: with pre-registered memory and
//! a reused request, post → wait → complete makes no heap allocation on
//! the thread that drives it, 1000 times in a row.
//!
//! Two agents in this process, connected through the side channel, over
//! UCX: the initiator has no progress thread, so every poll of the
//! transport and every completion happens on the measuring thread, which
//! a counting global allocator watches. (UCX's own memory comes from its
//! pools and C `malloc`; what is counted is every Rust heap allocation of
//! the Agent, the core and the transport.)
//!
//! Metrics are recorded on that path (on by default, and asked for
//! explicitly here) and served over HTTP while another thread scrapes the
//! endpoint as fast as it answers: the counts must then equal the
//! transfers made, still without an allocation on the measuring thread.
#![cfg(feature = "ucx")]
#![allow(clippy::result_large_err)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use kvxfer::{Agent, AgentConfig, Desc, WaitOutcome, XferOp, XferRequest};

/// Counts allocations made by threads that switched counting on.
struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
}

fn note_alloc() {
    if COUNTING.with(Cell::get) {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded unchanged to the system allocator; the
// counter has no effect on the memory handed out.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_alloc();
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_alloc();
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_alloc();
        // SAFETY: forwarded; `ptr` came from this allocator with `layout`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded; `ptr` came from this allocator with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Heap allocations made by `f` on this thread.
fn allocations_in(f: impl FnOnce()) -> u64 {
    let before = ALLOCS.load(Ordering::Relaxed);
    COUNTING.with(|c| c.set(true));
    f();
    COUNTING.with(|c| c.set(false));
    ALLOCS.load(Ordering::Relaxed) - before
}

const BLOCK: u64 = 4096;
const BLOCKS: u64 = 128;
/// Every other block, so that 128 descriptors stay 128 segments.
const SPAN: usize = (2 * BLOCK * BLOCKS) as usize;

fn run_once(req: &XferRequest) {
    req.post().expect("post");
    match req.wait(Duration::from_secs(10)) {
        WaitOutcome::Done => {}
        other => panic!("transfer did not complete: {other:?}"),
    }
}

fn hot_path_allocates_nothing(op: XferOp) {
    let target = Agent::new("noalloc-target", AgentConfig::default().with_backend("UCX")).unwrap();
    let initiator = Agent::new(
        "noalloc-initiator",
        AgentConfig::default()
            .with_backend("UCX")
            .with_listen(None)
            .with_progress_thread(false)
            .with_metrics(true)
            .with_metrics_addr(Some("127.0.0.1:0")),
    )
    .unwrap();
    // The source holds a pattern, the destination zeros.
    let pattern: Vec<u8> = (0..SPAN).map(|i| (i % 251) as u8 + 1).collect();
    let (mut local_buf, mut remote_buf) = match op {
        XferOp::Write => (pattern, vec![0u8; SPAN]),
        XferOp::Read => (vec![0u8; SPAN], pattern),
    };
    // SAFETY: both buffers outlive their registrations (the agents are shut
    // down before the buffers drop, below) and are read only after the
    // transfers into them completed.
    unsafe {
        target.register_slice(&mut remote_buf).unwrap();
        initiator.register_slice(&mut local_buf).unwrap();
    }
    let peer = initiator
        .connect(&target.listen_addr().unwrap().to_string())
        .unwrap();
    let local: Vec<Desc> = (0..BLOCKS)
        .map(|i| Desc::new(local_buf.as_ptr() as u64 + 2 * i * BLOCK, BLOCK))
        .collect();
    let remote: Vec<Desc> = (0..BLOCKS)
        .map(|i| Desc::new(remote_buf.as_ptr() as u64 + 2 * i * BLOCK, BLOCK))
        .collect();
    let req = initiator.prepare(op, &local, &remote, &peer, None).unwrap();

    // Warm-up: transport pools, slot vectors and queues reach their size.
    for _ in 0..50 {
        run_once(&req);
    }
    let scraper = Scraper::start(initiator.metrics_addr().expect("metrics endpoint"));
    let n = allocations_in(|| {
        for _ in 0..1000 {
            run_once(&req);
        }
    });
    let scrapes = scraper.stop();
    assert!(scrapes > 0, "the endpoint was never scraped");
    let snap = initiator.metrics().snapshot();
    let p = snap.peer(&peer).expect("peer series");
    let d = kvxfer::metrics::direction(op);
    assert_eq!(p.transfers[d], 1050, "{p:?}");
    assert_eq!(p.bytes[d], 1050 * BLOCK * BLOCKS);
    assert_eq!(p.transfers[1 - d], 0);
    assert_eq!(p.latency[d].count, 1050);
    assert_eq!(p.post_time[d].count, 1050);
    assert_eq!(p.in_flight, 0);
    assert!(p.failures.is_empty(), "{:?}", p.failures);
    let t = req.telemetry().unwrap();
    assert_eq!(t.descs, BLOCKS as u32);
    assert_eq!(
        t.segments, BLOCKS as u32,
        "alternate blocks cannot coalesce"
    );
    assert_eq!(t.bytes, BLOCK * BLOCKS);
    assert_eq!(n, 0, "{n} heap allocations in 1000 {} requests", op.name());

    // The transfers were real: the spans moved match byte for byte.
    drop(req);
    initiator.shutdown();
    target.shutdown();
    for i in 0..BLOCKS as usize {
        let r = 2 * i * BLOCK as usize..(2 * i + 1) * BLOCK as usize;
        assert_eq!(
            remote_buf[r.clone()],
            local_buf[r.clone()],
            "block {i} differs"
        );
        assert_ne!(local_buf[r.start], 0, "block {i} was not moved");
    }
}

/// Scrapes a metrics endpoint in a loop from its own thread (whose
/// allocations are not counted) until stopped.
struct Scraper {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl Scraper {
    fn start(addr: std::net::SocketAddr) -> Scraper {
        use std::io::{Read, Write};
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = std::sync::Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut scrapes = 0;
            while !flag.load(Ordering::Relaxed) {
                let mut s = std::net::TcpStream::connect(addr).expect("connect to metrics");
                s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
                let mut body = String::new();
                s.read_to_string(&mut body).unwrap();
                assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
                assert!(body.contains("kvxfer_transfers_total{agent=\"noalloc-initiator\""));
                scrapes += 1;
            }
            scrapes
        });
        Scraper { stop, thread }
    }

    /// Stops it; how many scrapes it made.
    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("scraper")
    }
}

#[test]
fn write_hot_path_allocates_nothing() {
    hot_path_allocates_nothing(XferOp::Write);
}

#[test]
fn read_hot_path_allocates_nothing() {
    hot_path_allocates_nothing(XferOp::Read);
}

/// The same with the target in another process of this host, so that the
/// data moves by cross-memory attach: 128 strided blocks (parts handed to
/// workers and to the polling thread) and 4 KiB (moved inline), WRITE and
/// READ, 1000 times each without a heap allocation on the polling thread.
/// The target is `kvxfer target`; its data is checked with its own
/// checksum at the end.
#[test]
fn same_host_hot_path_allocates_nothing() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_kvxfer"))
        .args(["target", "--size", "1MiB", "--name", "noalloc-far"])
        .env("KVXFER_BACKEND", "UCX")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn kvxfer target");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let addr = loop {
        let line = lines.next().expect("target output").expect("line");
        if let Some(a) = line.strip_prefix("listening ") {
            break a.trim().to_string();
        }
    };
    let initiator = Agent::new(
        "noalloc-near",
        AgentConfig::default()
            .with_backend("UCX")
            .with_listen(None)
            .with_progress_thread(false),
    )
    .unwrap();
    let peer = initiator.connect(&addr).unwrap();
    assert_eq!(initiator.peer_path(&peer), Ok("cross-memory attach"));
    initiator.notify(&peer, b"bench:region").unwrap();
    let region = loop {
        let mut all = initiator
            .wait_notifications(Duration::from_secs(10))
            .unwrap();
        if let Some(m) = all.remove(&peer).and_then(|v| v.into_iter().next()) {
            break String::from_utf8(m).unwrap();
        }
    };
    let mut it = region
        .strip_prefix("bench:region ")
        .expect("region reply")
        .split(' ')
        .map(|x| x.parse::<u64>().unwrap());
    let raddr = it.next().unwrap();
    let mut buf: Vec<u8> = (0..SPAN).map(|i| (i % 249) as u8 + 3).collect();
    // SAFETY: `buf` outlives its registration (the agent is shut down
    // first) and is read only after the transfers into it completed.
    unsafe { initiator.register_slice(&mut buf).unwrap() };
    let strided = |base: u64| -> Vec<Desc> {
        (0..BLOCKS)
            .map(|i| Desc::new(base + 2 * i * BLOCK, BLOCK))
            .collect()
    };
    let local = strided(buf.as_ptr() as u64);
    let remote = strided(raddr);
    let small_l = [Desc::new(buf.as_ptr() as u64, BLOCK)];
    let small_r = [Desc::new(raddr, BLOCK)];
    for op in [XferOp::Write, XferOp::Read] {
        for (l, r) in [(&local[..], &remote[..]), (&small_l[..], &small_r[..])] {
            let req = initiator.prepare(op, l, r, &peer, None).unwrap();
            for _ in 0..50 {
                run_once(&req);
            }
            let n = allocations_in(|| {
                for _ in 0..1000 {
                    run_once(&req);
                }
            });
            assert_eq!(
                n,
                0,
                "{n} heap allocations in 1000 same-host {} requests of {} blocks",
                op.name(),
                l.len()
            );
        }
    }
    // The READs brought back what the WRITEs put there.
    let want: Vec<u8> = (0..SPAN).map(|i| (i % 249) as u8 + 3).collect();
    initiator.shutdown();
    for i in 0..BLOCKS as usize {
        let r = 2 * i * BLOCK as usize..(2 * i + 1) * BLOCK as usize;
        assert_eq!(
            buf[r.clone()],
            want[r],
            "block {i} differs after the round trip"
        );
    }
    drop(child.stdin.take());
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn counting_allocator_counts() {
    let n = allocations_in(|| {
        let v: Vec<u8> = Vec::with_capacity(std::hint::black_box(64));
        std::hint::black_box(&v);
    });
    assert_eq!(n, 1);
}
