//! CUDA-IPC transport tests.
//!
//! Tests without `#[ignore]` run on any machine. The `#[ignore]`d ones need a
//! GPU; see `cuda/README.md` for the command. Two-process tests re-run this
//! test executable with `KVXFER_CUDA_TEST_ROLE` set, so the child executes
//! the target side of the same test; parent and child talk over the child's
//! stdin/stdout in lines starting with `KVX `.
#![allow(clippy::result_large_err)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use kvxfer_core::{Error, MemKind, PostStatus, Region, Segment, Token, Transport, XferOp};
use kvxfer_cuda::driver::{self, NO_DRIVER};
use kvxfer_cuda::wire::{DramKey, IpcAddress, IpcKey};
use kvxfer_cuda::{CudaIpcTransport, DeviceBuffer, PinnedBuffer};
use kvxfer_testkit::{first_diff as first_mismatch, hex, pattern};

const ROLE: &str = "KVXFER_CUDA_TEST_ROLE";
const TIMEOUT: Duration = Duration::from_secs(30);
const MIB: usize = 1 << 20;

// ---------------------------------------------------------------- helpers

fn unhex(s: &str) -> Vec<u8> {
    kvxfer_testkit::unhex(s).expect("hex")
}

/// Memory of either kind for the two-process tests, zeroed at creation.
enum Mem {
    Vram(DeviceBuffer),
    Dram(Vec<u8>),
}

impl Mem {
    fn new(kind: MemKind, len: usize) -> Mem {
        match kind {
            MemKind::Vram => {
                let mut b = DeviceBuffer::new(0, len as u64).unwrap();
                b.fill(0).unwrap();
                Mem::Vram(b)
            }
            MemKind::Dram => Mem::Dram(vec![0u8; len]),
        }
    }

    fn kind(&self) -> MemKind {
        match self {
            Mem::Vram(_) => MemKind::Vram,
            Mem::Dram(_) => MemKind::Dram,
        }
    }

    fn ptr(&self) -> u64 {
        match self {
            Mem::Vram(b) => b.ptr(),
            Mem::Dram(v) => v.as_ptr() as u64,
        }
    }

    /// `len` bytes at `off` as a region of this memory's kind.
    fn region(&self, off: usize, len: usize) -> Region {
        let addr = self.ptr() + off as u64;
        match self {
            Mem::Vram(b) => Region::vram(addr, len as u64, b.device()),
            Mem::Dram(_) => Region::dram(addr, len as u64),
        }
    }

    fn write(&mut self, off: usize, data: &[u8]) {
        match self {
            Mem::Vram(b) => b.copy_from_host(off as u64, data).unwrap(),
            Mem::Dram(v) => v[off..off + data.len()].copy_from_slice(data),
        }
    }

    /// A copy of the whole memory.
    fn to_vec(&self) -> Vec<u8> {
        match self {
            Mem::Vram(b) => b.to_vec().unwrap(),
            Mem::Dram(v) => v.clone(),
        }
    }
}

/// The packed CUDA_IPC key of host-memory `region` (a peer's DRAM).
fn dram_key(region: &Region) -> Vec<u8> {
    let mut buf = [0u8; IpcKey::MAX_LEN];
    let key = IpcKey::Dram(DramKey {
        addr: region.addr,
        len: region.len,
    });
    let n = key.encode(&mut buf).unwrap();
    buf[..n].to_vec()
}

fn kind_name(k: MemKind) -> &'static str {
    match k {
        MemKind::Vram => "vram",
        MemKind::Dram => "dram",
    }
}

fn parse_kind(s: &str) -> MemKind {
    match s {
        "vram" => MemKind::Vram,
        "dram" => MemKind::Dram,
        _ => panic!("unknown memory kind {s:?}"),
    }
}

/// Prints the bandwidth of one large transfer.
fn report(what: &str, len: usize, took: Duration) {
    if len >= MIB {
        println!(
            "RESULT {what}: {} MiB in {:.2} ms, {:.2} GB/s",
            len / MIB,
            took.as_secs_f64() * 1e3,
            len as f64 / took.as_secs_f64() / 1e9
        );
    }
}

/// Polls until `token` completes; every other completion is an error.
fn wait_done(t: &mut CudaIpcTransport, token: Token) -> Result<(), Error> {
    let start = Instant::now();
    loop {
        if let Some(c) = t.poll() {
            assert_eq!(c.token, token, "completion for an unknown token");
            return c.result;
        }
        if start.elapsed() > TIMEOUT {
            return Err(Error::TimedOut {
                after_ms: TIMEOUT.as_millis() as u64,
            });
        }
        std::thread::yield_now();
    }
}

fn wait_notification(t: &mut CudaIpcTransport) -> Result<Vec<u8>, String> {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(r) = t.poll_notification(&mut buf) {
            let n = r.map_err(|e| e.to_string())?;
            return Ok(buf[..n].to_vec());
        }
        if start.elapsed() > TIMEOUT {
            return Err("no notification within the timeout".into());
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// The child half of a two-process test, killed if the test fails.
struct Peer {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
}

impl Peer {
    fn spawn(test: &str, role: &str) -> Peer {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                test,
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(ROLE, role)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn child");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                // libtest may print "test name ... " before our output on one line.
                if let Some(at) = line.find("KVX ") {
                    if tx.send(line[at + 4..].to_string()).is_err() {
                        break;
                    }
                }
            }
        });
        Peer {
            child,
            stdin,
            lines,
        }
    }

    /// The next line starting with `tag`, without it.
    fn expect(&self, tag: &str) -> String {
        let line = self
            .lines
            .recv_timeout(TIMEOUT)
            .unwrap_or_else(|e| panic!("child sent no {tag} line: {e}"));
        match line.strip_prefix(tag) {
            Some(rest) => rest.trim().to_string(),
            None => panic!("expected {tag} from the child, got {line:?}"),
        }
    }

    fn send(&mut self, line: &str) {
        writeln!(self.stdin, "KVX {line}")
            .and_then(|()| self.stdin.flush())
            .expect("write to child");
    }

    fn finish(mut self) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "child failed: {status}");
                return;
            }
            assert!(start.elapsed() < TIMEOUT, "child did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Lines from the parent on stdin, read with a timeout.
fn parent_lines() -> Receiver<String> {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix("KVX ") {
                if tx.send(rest.to_string()).is_err() {
                    break;
                }
            }
        }
    });
    rx
}

fn say(line: &str) {
    println!("KVX {line}");
}

/// Publishes what the initiator needs: address, region, key.
fn publish(t: &CudaIpcTransport, reg: &kvxfer_cuda::IpcReg) {
    let mut buf = [0u8; 256];
    let n = t.local_address(&mut buf).unwrap();
    say(&format!("ADDR {}", hex(&buf[..n])));
    let r = reg.region();
    say(&format!(
        "REGION {} {} {} {}",
        r.addr,
        r.len,
        r.dev,
        kind_name(r.kind)
    ));
    let n = t.pack_key(reg, &mut buf).unwrap();
    say(&format!("KEY {}", hex(&buf[..n])));
}

/// Connects to the child's published agent and unpacks its key.
fn attach(
    t: &mut CudaIpcTransport,
    peer: &Peer,
) -> (kvxfer_cuda::IpcPeer, Region, kvxfer_cuda::IpcRemoteKey) {
    let addr = unhex(&peer.expect("ADDR"));
    let line = peer.expect("REGION");
    let f: Vec<&str> = line.split(' ').collect();
    let r: Vec<u64> = f[..3].iter().map(|x| x.parse().unwrap()).collect();
    let region = Region {
        addr: r[0],
        len: r[1],
        dev: r[2] as u32,
        kind: parse_kind(f[3]),
    };
    let key = unhex(&peer.expect("KEY"));
    let p = t.connect(&addr).expect("connect");
    let k = t.unpack_key(&p, &region, &key).expect("unpack_key");
    (p, region, k)
}

fn role() -> Option<String> {
    std::env::var(ROLE).ok()
}

/// Target side: a region of `len` bytes of the role's memory kind at
/// offset 4096 of a larger allocation (so the key's allocation offset
/// matters), zeroed (WRITE) or holding the pattern (READ). Waits for the
/// notification, then checks its memory at once: the data must already be
/// there.
fn target(role: &str) {
    let parts: Vec<&str> = role.split(':').collect();
    let (op, len, seed, kind): (&str, usize, u64, MemKind) = (
        parts[0],
        parts[1].parse().unwrap(),
        parts[2].parse().unwrap(),
        parse_kind(parts[3]),
    );
    let mut t = CudaIpcTransport::new().unwrap();
    let mut buf = Mem::new(kind, len + 8192);
    if op == "read" {
        buf.write(4096, &pattern(seed, len));
    }
    let reg = t.register(&buf.region(4096, len)).unwrap();
    publish(&t, &reg);
    let note = match wait_notification(&mut t) {
        Ok(n) => n,
        Err(e) => {
            say(&format!("ERR {e}"));
            std::process::exit(2);
        }
    };
    // The notification came: the data must already be here.
    let all = buf.to_vec();
    let got = &all[4096..4096 + len];
    say(&format!("NOTE {}", hex(&note)));
    if len <= 4096 {
        say(&format!("DATA {}", hex(got)));
    }
    let expected = pattern(seed, len);
    let guard_clean = all[..4096]
        .iter()
        .chain(&all[4096 + len..])
        .all(|&b| b == 0);
    match (first_mismatch(got, &expected), guard_clean) {
        (None, true) => say("VERIFY ok"),
        (Some(i), _) => say(&format!("VERIFY mismatch at byte {i}")),
        (None, false) => say("VERIFY bytes outside the region were written"),
    }
    t.deregister(reg);
    let lines = parent_lines();
    let _ = lines.recv_timeout(TIMEOUT); // "BYE"
}

/// Initiator side of a WRITE of `len` bytes from local memory of kind
/// `local` into the child's memory of kind `remote`.
fn write_test(test: &str, local: MemKind, remote: MemKind, len: usize, seed: u64) {
    let mut peer = Peer::spawn(test, &format!("write:{len}:{seed}:{}", kind_name(remote)));
    let mut t = CudaIpcTransport::new().unwrap();
    let data = pattern(seed, len);
    // The source also sits at an offset inside its allocation.
    let mut src = Mem::new(local, len + 512);
    src.write(512, &data);
    let reg = t.register(&src.region(512, len)).unwrap();
    let (p, region, key) = attach(&mut t, &peer);
    assert_eq!(key.kind(), remote);
    let seg = Segment {
        local_addr: src.ptr() + 512,
        remote_addr: region.addr,
        len: len as u64,
        local: &reg,
        remote: &key,
        remote_region_addr: region.addr,
    };
    let start = Instant::now();
    let status = t
        .post(
            XferOp::Write,
            &p,
            kvxfer_core::Segments::from(&[seg][..]),
            Some(b"written"),
            Token(7),
        )
        .unwrap();
    assert_eq!(status, PostStatus::InProgress);
    wait_done(&mut t, Token(7)).unwrap();
    report(
        &format!(
            "WRITE {} -> remote {} (local pinned: {})",
            kind_name(local),
            kind_name(remote),
            reg.pinned()
        ),
        len,
        start.elapsed(),
    );
    assert_eq!(t.in_flight(), 0);
    let back = src.to_vec()[512..].to_vec();
    assert!(back == data, "source changed");
    assert_eq!(unhex(&peer.expect("NOTE")), b"written");
    if len <= 4096 {
        let remote = unhex(&peer.expect("DATA"));
        assert_eq!(remote.len(), len);
        assert_eq!(
            remote, back,
            "target memory differs from the source after WRITE"
        );
    }
    assert_eq!(peer.expect("VERIFY"), "ok");
    t.release_key(key);
    t.disconnect(p);
    t.deregister(reg);
    peer.send("BYE");
    peer.finish();
}

/// Initiator side of a READ of `len` bytes from the child's memory of kind
/// `remote` into local memory of kind `local`.
fn read_test(test: &str, local: MemKind, remote: MemKind, len: usize, seed: u64) {
    let mut peer = Peer::spawn(test, &format!("read:{len}:{seed}:{}", kind_name(remote)));
    let mut t = CudaIpcTransport::new().unwrap();
    let mut dst = Mem::new(local, len);
    dst.write(0, &vec![0xEE; len]);
    assert_eq!(dst.kind(), local);
    let reg = t.register(&dst.region(0, len)).unwrap();
    let (p, region, key) = attach(&mut t, &peer);
    assert_eq!(key.kind(), remote);
    // Two segments, second half first, to exercise per-segment offsets.
    let half = (len / 2) as u64;
    let seg = |off: u64, n: u64| Segment {
        local_addr: dst.ptr() + off,
        remote_addr: region.addr + off,
        len: n,
        local: &reg,
        remote: &key,
        remote_region_addr: region.addr,
    };
    let segs = [seg(half, len as u64 - half), seg(0, half)];
    let start = Instant::now();
    t.post(
        XferOp::Read,
        &p,
        kvxfer_core::Segments::from(&segs[..]),
        Some(b"read done"),
        Token(9),
    )
    .unwrap();
    wait_done(&mut t, Token(9)).unwrap();
    report(
        &format!(
            "READ remote {} -> {} (local pinned: {})",
            kind_name(remote),
            kind_name(local),
            reg.pinned()
        ),
        len,
        start.elapsed(),
    );
    let got = dst.to_vec();
    assert_eq!(
        first_mismatch(&got, &pattern(seed, len)),
        None,
        "READ data differs"
    );
    assert_eq!(unhex(&peer.expect("NOTE")), b"read done");
    if len <= 4096 {
        // Both sides copied back: the initiator's memory equals the target's.
        assert_eq!(
            unhex(&peer.expect("DATA")),
            got,
            "READ result differs from the target's memory"
        );
    }
    // The target's own copy is untouched by a READ.
    assert_eq!(peer.expect("VERIFY"), "ok");
    t.release_key(key);
    t.deregister(reg);
    peer.send("BYE");
    peer.finish();
}

fn dispatch() -> bool {
    match role() {
        Some(r) => {
            target(&r);
            true
        }
        None => false,
    }
}

// ------------------------------------------------------- tests without GPU

#[test]
fn without_a_driver_every_entry_point_fails_cleanly() {
    if driver::driver_present() {
        // A driver is here: the same calls must work instead.
        assert!(driver::device_count().is_ok());
        return;
    }
    let is_no_driver = |e: Error| match e {
        Error::Backend {
            backend: "CUDA_IPC",
            code: NO_DRIVER,
            text,
        } => text.contains("no CUDA driver found"),
        _ => false,
    };
    assert!(is_no_driver(driver::init().unwrap_err()));
    assert!(is_no_driver(driver::device_count().unwrap_err()));
    assert!(is_no_driver(driver::devices().unwrap_err()));
    assert!(is_no_driver(driver::driver_version().unwrap_err()));
    assert!(is_no_driver(driver::pointer_info(0x1000).unwrap_err()));
    assert!(is_no_driver(DeviceBuffer::new(0, 100).unwrap_err()));
    assert!(is_no_driver(PinnedBuffer::new(0, 100).unwrap_err()));
    assert!(is_no_driver(CudaIpcTransport::new().unwrap_err()));
    assert_eq!(
        driver::no_driver().to_string(),
        "CUDA_IPC error -1: no CUDA driver found (libcuda could not be loaded)"
    );
}

// ------------------------------------------------------------- GPU tests

#[test]
#[ignore = "needs a GPU"]
fn gpu_device_info_and_pointer_kinds() {
    let n = driver::device_count().unwrap();
    assert!(n >= 1);
    let (major, _) = driver::driver_version().unwrap();
    assert!(major >= 11);
    let info = driver::device_info(0).unwrap();
    assert!(
        !info.name.is_empty() && info.total_mem > (1 << 30),
        "{info:?}"
    );
    assert!(info.uuid_string().starts_with("GPU-") && info.uuid_string().len() == 40);
    assert!(matches!(
        driver::device_info(n),
        Err(Error::Backend {
            backend: "CUDA_IPC",
            ..
        })
    ));

    let vram = DeviceBuffer::new(0, 4096).unwrap();
    let p = driver::pointer_info(vram.ptr() + 100).unwrap();
    assert_eq!((p.kind, p.dev, p.cuda_known), (MemKind::Vram, 0, true));
    let pinned = PinnedBuffer::new(0, 4096).unwrap();
    let p = driver::pointer_info(pinned.addr()).unwrap();
    assert_eq!((p.kind, p.cuda_known), (MemKind::Dram, true));
    let heap = vec![0u8; 4096];
    let p = driver::pointer_info(heap.as_ptr() as u64).unwrap();
    assert_eq!((p.kind, p.cuda_known), (MemKind::Dram, false));
    assert_eq!(
        driver::address_range(vram.ptr() + 10).unwrap(),
        (vram.ptr(), 4096)
    );
    assert!(DeviceBuffer::new(0, 0).is_err());
    assert!(matches!(
        vram.copy_to_host(4000, &mut [0u8; 100]),
        Err(Error::Backend { .. })
    ));
}

/// Page-aligned host memory from the global allocator, freed in `Drop`.
struct PageBuf {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl PageBuf {
    fn new(len: usize) -> PageBuf {
        let layout = std::alloc::Layout::from_size_align(len, 4096).unwrap();
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        PageBuf { ptr, layout }
    }

    fn addr(&self) -> u64 {
        self.ptr as u64
    }
}

impl Drop for PageBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

fn backend_text(r: Result<impl std::fmt::Debug, Error>) -> String {
    match r {
        Err(Error::Backend {
            backend: "CUDA_IPC",
            text,
            ..
        }) => text.to_string(),
        r => panic!("expected a CUDA_IPC backend error, got {r:?}"),
    }
}

#[test]
#[ignore = "needs a GPU"]
fn gpu_register_checks_kind_device_and_bounds() {
    let mut t = CudaIpcTransport::new().unwrap();
    assert_eq!(t.name(), "CUDA_IPC");
    assert!(t.capabilities().mem_kinds.contains(MemKind::Vram));
    assert!(t.capabilities().mem_kinds.contains(MemKind::Dram));

    // DRAM is accepted and page-locked; its key is its address and length.
    let host = PageBuf::new(3 * 4096);
    let a = t.register(&Region::dram(host.addr(), 4096)).unwrap();
    assert!(a.pinned(), "a page-aligned region was not page-locked");
    assert!(driver::pointer_info(host.addr()).unwrap().cuda_known);
    assert_eq!(
        *a.key(),
        IpcKey::Dram(DramKey {
            addr: host.addr(),
            len: 4096
        })
    );
    let mut buf = [0u8; IpcKey::MAX_LEN];
    assert_eq!(t.pack_key(&a, &mut buf), Ok(IpcKey::DRAM_LEN));
    assert_eq!(IpcKey::decode(&buf[..IpcKey::DRAM_LEN]), Ok(*a.key()));
    // A region not starting on a page boundary is locked too.
    let odd = t
        .register(&Region::dram(host.addr() + 4096 + 16, 100))
        .unwrap();
    assert!(odd.pinned(), "an unaligned region was not page-locked");
    // A page already locked cannot be locked again: the region is still
    // accepted, as pageable memory, and deregistering it unlocks nothing.
    let shared = t.register(&Region::dram(host.addr() + 100, 50)).unwrap();
    assert!(!shared.pinned());
    t.deregister(shared);
    assert!(driver::pointer_info(host.addr()).unwrap().cuda_known);
    t.deregister(a);
    assert!(!driver::pointer_info(host.addr()).unwrap().cuda_known);
    t.deregister(odd);
    assert!(
        !driver::pointer_info(host.addr() + 4096 + 16)
            .unwrap()
            .cuda_known
    );

    // VRAM registered as DRAM, and DRAM as VRAM, are refused.
    let vram = DeviceBuffer::new(0, 4096).unwrap();
    assert_eq!(
        backend_text(t.register(&Region::dram(vram.ptr(), 4096))),
        format!(
            "{:#x} (+4096) is not DRAM: CUDA reports VRAM on device 0",
            vram.ptr()
        )
    );
    assert_eq!(
        backend_text(t.register(&Region::vram(host.addr(), 4096, 0))),
        format!(
            "{:#x} is not VRAM of device 0: CUDA reports DRAM on device 0",
            host.addr()
        )
    );
    // VRAM with a device id that does not hold it, or that does not exist.
    let count = driver::device_count().unwrap();
    if count >= 2 {
        assert_eq!(
            backend_text(t.register(&Region::vram(vram.ptr(), 4096, 1))),
            format!(
                "{:#x} is not VRAM of device 1: CUDA reports VRAM on device 0",
                vram.ptr()
            )
        );
    }
    assert_eq!(
        backend_text(t.register(&Region::vram(vram.ptr(), 4096, 7))),
        format!("device 7 does not exist ({count} device(s) visible)")
    );
    // A region leaving its allocation.
    assert_eq!(
        backend_text(t.register(&Region::vram(vram.ptr() + 4000, 200, 0))),
        format!(
            "region [{:#x}, +200) leaves its allocation [{:#x}, +4096)",
            vram.ptr() + 4000,
            vram.ptr()
        )
    );
    for r in [Region::vram(vram.ptr(), 0, 0), Region::dram(host.addr(), 0)] {
        assert_eq!(
            t.register(&r),
            Err(Error::InvalidRegion {
                addr: r.addr,
                len: 0
            })
        );
    }
    assert_eq!(
        t.register(&Region::dram(u64::MAX - 10, 100)),
        Err(Error::InvalidRegion {
            addr: u64::MAX - 10,
            len: 100
        })
    );
    let reg = t
        .register(&Region::vram(vram.ptr() + 1024, 1024, 0))
        .unwrap();
    let k = reg.key().vram().expect("a VRAM key");
    assert_eq!((k.offset, k.alloc_len), (1024, 4096));
    assert!(!reg.pinned());
    let mut small = [0u8; 10];
    assert_eq!(
        t.pack_key(&reg, &mut small),
        Err(Error::BufferTooSmall {
            needed: IpcKey::VRAM_LEN as u64,
            available: 10
        })
    );
    assert_eq!(
        t.cancel(Token(1)),
        Err(Error::Unsupported {
            backend: "CUDA_IPC",
            what: "cancel"
        })
    );
    t.deregister(reg);
}

/// `n` bytes from `local_addr` to `off` bytes into the remote region at `region_addr`.
fn segment<'a>(
    local: &'a kvxfer_cuda::IpcReg,
    local_addr: u64,
    remote: &'a kvxfer_cuda::IpcRemoteKey,
    region_addr: u64,
    off: u64,
    n: u64,
) -> Segment<'a, kvxfer_cuda::IpcReg, kvxfer_cuda::IpcRemoteKey> {
    Segment {
        local_addr,
        remote_addr: region_addr + off,
        len: n,
        local,
        remote,
        remote_region_addr: region_addr,
    }
}

/// DRAM on both sides and VRAM to a peer's DRAM, within one process (the
/// peer's pid is this one), with the bounds of the peer's DRAM enforced.
#[test]
#[ignore = "needs a GPU"]
fn gpu_same_process_dram_paths_and_bounds() {
    let mut a = CudaIpcTransport::new().unwrap();
    let mut b = CudaIpcTransport::new().unwrap();
    let len = (20 << 20) + 3; // three bounce chunks, the last one short
    let data = pattern(21, len);
    let src_host = data.clone();
    let src_vram = DeviceBuffer::from_host(0, &data).unwrap();
    let target = vec![0u8; len + 8192];
    let ra = a
        .register(&Region::dram(src_host.as_ptr() as u64, len as u64))
        .unwrap();
    let rv = a.register(&src_vram.region()).unwrap();
    let region = Region::dram(target.as_ptr() as u64 + 4096, len as u64);
    let rb = b.register(&region).unwrap();
    let mut buf = [0u8; 128];
    let n = b.local_address(&mut buf).unwrap();
    let pb = a.connect(&buf[..n]).unwrap();
    let n = b.pack_key(&rb, &mut buf).unwrap();
    let key = buf[..n].to_vec();
    let kb = a.unpack_key(&pb, &region, &key).unwrap();
    assert_eq!((kb.kind(), kb.pid()), (MemKind::Dram, std::process::id()));
    let seg = |local, local_addr, off, n| segment(local, local_addr, &kb, region.addr, off, n);

    // DRAM -> peer DRAM, 1000 bytes at offset 20.
    a.post(
        XferOp::Write,
        &pb,
        kvxfer_core::Segments::from(&[seg(&ra, src_host.as_ptr() as u64 + 10, 20, 1000)][..]),
        Some(b"dram"),
        Token(1),
    )
    .unwrap();
    wait_done(&mut a, Token(1)).unwrap();
    assert_eq!(wait_notification(&mut b).unwrap(), b"dram");
    assert_eq!(&target[4096 + 20..4096 + 1020], &data[10..1010]);
    assert!(target[..4096 + 20].iter().all(|&x| x == 0));
    assert!(target[4096 + 1020..].iter().all(|&x| x == 0));

    // VRAM -> peer DRAM through the bounce buffer, the whole region.
    a.post(
        XferOp::Write,
        &pb,
        kvxfer_core::Segments::from(&[seg(&rv, src_vram.ptr(), 0, len as u64)][..]),
        Some(b"vram"),
        Token(2),
    )
    .unwrap();
    wait_done(&mut a, Token(2)).unwrap();
    assert_eq!(wait_notification(&mut b).unwrap(), b"vram");
    assert_eq!(first_mismatch(&target[4096..4096 + len], &data), None);
    assert!(target[..4096]
        .iter()
        .chain(&target[4096 + len..])
        .all(|&x| x == 0));

    // Peer DRAM -> VRAM through the bounce buffer, into a zeroed buffer.
    let mut dst = DeviceBuffer::new(0, len as u64).unwrap();
    dst.fill(0).unwrap();
    let rd = a.register(&dst.region()).unwrap();
    a.post(
        XferOp::Read,
        &pb,
        kvxfer_core::Segments::from(&[seg(&rd, dst.ptr(), 0, len as u64)][..]),
        None,
        Token(3),
    )
    .unwrap();
    wait_done(&mut a, Token(3)).unwrap();
    assert_eq!(first_mismatch(&dst.to_vec().unwrap(), &data), None);

    // A segment leaving the peer's region by one byte is refused before
    // any byte moves.
    let bad = seg(&ra, src_host.as_ptr() as u64, 1, len as u64);
    assert_eq!(
        backend_text(a.post(
            XferOp::Write,
            &pb,
            kvxfer_core::Segments::from(&[bad][..]),
            None,
            Token(4)
        )),
        format!(
            "segment 0 (local {:#x}, remote {:#x}, len {len}) leaves its registration",
            src_host.as_ptr() as u64,
            region.addr + 1
        )
    );
    assert!(a.poll().is_none());
    // A region wider than its key, and a kind that is not the key's.
    let wider = Region::dram(region.addr, region.len + 1);
    assert_eq!(
        backend_text(a.unpack_key(&pb, &wider, &key)),
        format!(
            "DRAM region [{:#x}, +{}) is not inside its key's [{:#x}, +{len})",
            region.addr,
            len + 1,
            region.addr
        )
    );
    let as_vram = Region::vram(region.addr, region.len, 0);
    assert_eq!(
        backend_text(a.unpack_key(&pb, &as_vram, &key)),
        format!(
            "key of pid {} is for DRAM, its region {:#x} says VRAM",
            std::process::id(),
            region.addr
        )
    );
    assert_eq!(
        a.unpack_key(&pb, &region, &[9u8; 17]),
        Err(Error::BadMetadata(kvxfer_core::MetaError::BadMemKind {
            code: 9
        }))
    );
    a.release_key(kb);
    a.deregister(ra);
    a.deregister(rv);
    a.deregister(rd);
    b.deregister(rb);
}

/// A peer whose process is gone: cross-memory attach fails with the pid
/// named, from DRAM and from VRAM (bounce path), and nothing stays in flight.
#[test]
#[ignore = "needs a GPU"]
fn gpu_dram_peer_gone_is_reported() {
    let mut t = CudaIpcTransport::new().unwrap();
    let mut child = Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    let gone = IpcAddress {
        pid,
        instance: 0,
        ..*t.address()
    };
    let mut buf = [0u8; IpcAddress::LEN];
    gone.encode(&mut buf).unwrap();
    let p = t.connect(&buf).unwrap();
    let region = Region::dram(0x7f00_0000_0000, 4096);
    let kbuf = dram_key(&region);
    let k = t.unpack_key(&p, &region, &kbuf).unwrap();
    let host = vec![1u8; 4096];
    let vram = DeviceBuffer::from_host(0, &host).unwrap();
    let rh = t
        .register(&Region::dram(host.as_ptr() as u64, 4096))
        .unwrap();
    let rv = t.register(&vram.region()).unwrap();
    for (reg, addr) in [(&rh, host.as_ptr() as u64), (&rv, vram.ptr())] {
        for op in [XferOp::Write, XferOp::Read] {
            let seg = Segment {
                local_addr: addr,
                remote_addr: region.addr,
                len: 4096,
                local: reg,
                remote: &k,
                remote_region_addr: region.addr,
            };
            assert_eq!(
                t.post(
                    op,
                    &p,
                    kvxfer_core::Segments::from(&[seg][..]),
                    Some(b"never"),
                    Token(5)
                ),
                Err(Error::disconnected(&format!(
                    "CUDA_IPC peer pid {pid} is gone"
                )))
            );
            assert_eq!(t.in_flight(), 0);
        }
    }
    assert!(t.poll().is_none());
    t.release_key(k);
    t.deregister(rh);
    t.deregister(rv);
}

#[test]
#[ignore = "needs a GPU"]
fn gpu_peer_on_another_host_is_refused() {
    let mut t = CudaIpcTransport::new().unwrap();
    let mut other = *t.address();
    other.host[0] ^= 0xff;
    let mut buf = [0u8; IpcAddress::LEN];
    other.encode(&mut buf).unwrap();
    match t.connect(&buf) {
        Err(Error::Backend {
            backend: "CUDA_IPC",
            text,
            ..
        }) => assert!(text.contains("one host"), "{text}"),
        r => panic!("foreign host accepted: {r:?}"),
    }
}

#[test]
#[ignore = "needs a GPU"]
fn gpu_same_process_write_read_and_notifications() {
    let mut a = CudaIpcTransport::new().unwrap();
    let mut b = CudaIpcTransport::new().unwrap();
    let data = pattern(3, 1 << 16);
    let src = DeviceBuffer::from_host(0, &data).unwrap();
    let mut dst = DeviceBuffer::new(0, 1 << 17).unwrap();
    dst.fill(0).unwrap();
    let ra = a.register(&src.region()).unwrap();
    let rb = b
        .register(&Region::vram(dst.ptr() + 4096, 1 << 16, 0))
        .unwrap();
    let mut buf = [0u8; 128];
    let n = b.local_address(&mut buf).unwrap();
    let pb = a.connect(&buf[..n]).unwrap();
    let n = b.pack_key(&rb, &mut buf).unwrap();
    let kb = a.unpack_key(&pb, rb.region(), &buf[..n]).unwrap();
    // WRITE 1000 bytes from src+10 to dst region+20.
    let seg = Segment {
        local_addr: src.ptr() + 10,
        remote_addr: rb.region().addr + 20,
        len: 1000,
        local: &ra,
        remote: &kb,
        remote_region_addr: rb.region().addr,
    };
    a.send_notification(&pb, b"before").unwrap();
    a.post(
        XferOp::Write,
        &pb,
        kvxfer_core::Segments::from(&[seg][..]),
        Some(b"after"),
        Token(1),
    )
    .unwrap();
    wait_done(&mut a, Token(1)).unwrap();
    let got = dst.to_vec().unwrap();
    assert_eq!(&got[4096 + 20..4096 + 1020], &data[10..1010]);
    assert!(got[..4096 + 20].iter().all(|&x| x == 0) && got[4096 + 1020..].iter().all(|&x| x == 0));
    assert_eq!(wait_notification(&mut b).unwrap(), b"before");
    assert_eq!(wait_notification(&mut b).unwrap(), b"after");
    let mut none = [0u8; 8];
    assert!(b.poll_notification(&mut none).is_none());
    // A segment leaving the remote region is refused before any copy.
    let bad = Segment {
        len: (1 << 16) - 19,
        ..seg
    };
    assert!(matches!(
        a.post(
            XferOp::Write,
            &pb,
            kvxfer_core::Segments::from(&[bad][..]),
            None,
            Token(2)
        ),
        Err(Error::Backend { .. })
    ));
    assert_eq!(
        a.post(
            XferOp::Write,
            &pb,
            kvxfer_core::Segments::from(&[seg][..]),
            Some(&[0u8; 5000]),
            Token(3)
        ),
        Err(Error::NotificationTooLong {
            len: 5000,
            max: 4096
        })
    );
    assert!(a.poll().is_none());
    a.release_key(kb);
    a.deregister(ra);
    b.deregister(rb);
}

#[test]
#[ignore = "needs a GPU"]
fn gpu_two_process_write_100_bytes() {
    if dispatch() {
        return;
    }
    write_test(
        "gpu_two_process_write_100_bytes",
        MemKind::Vram,
        MemKind::Vram,
        100,
        11,
    );
}

#[test]
#[ignore = "needs a GPU"]
fn gpu_two_process_write_256_mib() {
    if dispatch() {
        return;
    }
    write_test(
        "gpu_two_process_write_256_mib",
        MemKind::Vram,
        MemKind::Vram,
        256 * MIB,
        12,
    );
}

#[test]
#[ignore = "needs a GPU"]
fn gpu_two_process_read_100_bytes() {
    if dispatch() {
        return;
    }
    read_test(
        "gpu_two_process_read_100_bytes",
        MemKind::Vram,
        MemKind::Vram,
        100,
        13,
    );
}

#[test]
#[ignore = "needs a GPU"]
fn gpu_two_process_read_256_mib() {
    if dispatch() {
        return;
    }
    read_test(
        "gpu_two_process_read_256_mib",
        MemKind::Vram,
        MemKind::Vram,
        256 * MIB,
        14,
    );
}

#[test]
#[ignore = "needs a GPU"]
fn gpu_two_process_dram_vram_write_100_bytes() {
    if dispatch() {
        return;
    }
    write_test(
        "gpu_two_process_dram_vram_write_100_bytes",
        MemKind::Dram,
        MemKind::Vram,
        100,
        21,
    );
}

#[test]
#[ignore = "needs a GPU"]
fn gpu_two_process_dram_vram_write_256_mib() {
    if dispatch() {
        return;
    }
    write_test(
        "gpu_two_process_dram_vram_write_256_mib",
        MemKind::Dram,
        MemKind::Vram,
        256 * MIB,
        22,
    );
}

#[test]
#[ignore = "needs a GPU"]
fn gpu_two_process_dram_vram_read_100_bytes() {
    if dispatch() {
        return;
    }
    read_test(
        "gpu_two_process_dram_vram_read_100_bytes",
        MemKind::Dram,
        MemKind::Vram,
        100,
        23,
    );
}

#[test]
#[ignore = "needs a GPU"]
fn gpu_two_process_dram_vram_read_256_mib() {
    if dispatch() {
        return;
    }
    read_test(
        "gpu_two_process_dram_vram_read_256_mib",
        MemKind::Dram,
        MemKind::Vram,
        256 * MIB,
        24,
    );
}

#[test]
#[ignore = "needs a GPU"]
fn gpu_two_process_vram_dram_write_100_bytes() {
    if dispatch() {
        return;
    }
    write_test(
        "gpu_two_process_vram_dram_write_100_bytes",
        MemKind::Vram,
        MemKind::Dram,
        100,
        31,
    );
}

#[test]
#[ignore = "needs a GPU"]
fn gpu_two_process_vram_dram_write_256_mib() {
    if dispatch() {
        return;
    }
    write_test(
        "gpu_two_process_vram_dram_write_256_mib",
        MemKind::Vram,
        MemKind::Dram,
        256 * MIB,
        32,
    );
}

#[test]
#[ignore = "needs a GPU"]
fn gpu_two_process_vram_dram_read_100_bytes() {
    if dispatch() {
        return;
    }
    read_test(
        "gpu_two_process_vram_dram_read_100_bytes",
        MemKind::Vram,
        MemKind::Dram,
        100,
        33,
    );
}

#[test]
#[ignore = "needs a GPU"]
fn gpu_two_process_vram_dram_read_256_mib() {
    if dispatch() {
        return;
    }
    read_test(
        "gpu_two_process_vram_dram_read_256_mib",
        MemKind::Vram,
        MemKind::Dram,
        256 * MIB,
        34,
    );
}

#[test]
#[ignore = "needs a GPU"]
fn gpu_two_process_dram_dram_write_100_bytes() {
    if dispatch() {
        return;
    }
    write_test(
        "gpu_two_process_dram_dram_write_100_bytes",
        MemKind::Dram,
        MemKind::Dram,
        100,
        41,
    );
}

#[test]
#[ignore = "needs a GPU"]
fn gpu_two_process_dram_dram_write_256_mib() {
    if dispatch() {
        return;
    }
    write_test(
        "gpu_two_process_dram_dram_write_256_mib",
        MemKind::Dram,
        MemKind::Dram,
        256 * MIB,
        42,
    );
}

#[test]
#[ignore = "needs a GPU"]
fn gpu_two_process_dram_dram_read_100_bytes() {
    if dispatch() {
        return;
    }
    read_test(
        "gpu_two_process_dram_dram_read_100_bytes",
        MemKind::Dram,
        MemKind::Dram,
        100,
        43,
    );
}

#[test]
#[ignore = "needs a GPU"]
fn gpu_two_process_dram_dram_read_256_mib() {
    if dispatch() {
        return;
    }
    read_test(
        "gpu_two_process_dram_dram_read_256_mib",
        MemKind::Dram,
        MemKind::Dram,
        256 * MIB,
        44,
    );
}

/// A 256 MiB WRITE from DRAM into a peer process's DRAM: `post` only hands
/// the copy to the transport's workers, so it returns long before the
/// transfer completes (a `post` doing the copy itself would take as long as
/// the transfer). Up to three tries, so one descheduled `post` on a loaded
/// machine does not fail it; then the target checks every byte.
#[test]
#[ignore = "needs a GPU"]
fn gpu_two_process_dram_dram_write_256_mib_post_does_not_block() {
    if dispatch() {
        return;
    }
    let len = 256 * MIB;
    let seed = 45;
    let mut peer = Peer::spawn(
        "gpu_two_process_dram_dram_write_256_mib_post_does_not_block",
        &format!("write:{len}:{seed}:dram"),
    );
    let mut t = CudaIpcTransport::new().unwrap();
    let data = pattern(seed, len);
    let reg = t
        .register(&Region::dram(data.as_ptr() as u64, len as u64))
        .unwrap();
    let (p, region, key) = attach(&mut t, &peer);
    assert_eq!(key.kind(), MemKind::Dram);
    let seg = segment(&reg, data.as_ptr() as u64, &key, region.addr, 0, len as u64);
    let mut tries = Vec::new();
    for i in 0..3u64 {
        let start = Instant::now();
        let status = t
            .post(
                XferOp::Write,
                &p,
                kvxfer_core::Segments::from(&[seg][..]),
                None,
                Token(100 + i),
            )
            .unwrap();
        let post = start.elapsed();
        assert_eq!(status, PostStatus::InProgress);
        let early = t.poll();
        match &early {
            Some(c) => {
                assert_eq!(c.token, Token(100 + i));
                c.result.clone().unwrap();
            }
            None => wait_done(&mut t, Token(100 + i)).unwrap(),
        }
        let total = start.elapsed();
        println!(
            "RESULT WRITE dram -> remote dram, try {i}: post {:.1} us, transfer {:.2} ms \
             ({:.2} GB/s), first poll {}",
            post.as_secs_f64() * 1e6,
            total.as_secs_f64() * 1e3,
            len as f64 / total.as_secs_f64() / 1e9,
            if early.is_none() { "empty" } else { "done" }
        );
        tries.push((post, total, early.is_none()));
        if post < Duration::from_millis(10) && post * 4 < total && early.is_none() {
            break;
        }
    }
    assert!(
        tries
            .iter()
            .any(|&(post, total, empty)| post < Duration::from_millis(10)
                && post * 4 < total
                && empty),
        "post blocked for the copy: {tries:?}"
    );
    assert_eq!(t.in_flight(), 0);
    t.send_notification(&p, b"written").unwrap();
    assert_eq!(unhex(&peer.expect("NOTE")), b"written");
    assert_eq!(peer.expect("VERIFY"), "ok");
    t.release_key(key);
    t.deregister(reg);
    peer.send("BYE");
    peer.finish();
}

/// An anonymous mapping of `len` bytes whose last page is unmapped again:
/// a peer DRAM range that faults at `addr + len - 4096`. Unmapped in `Drop`.
struct Holed {
    addr: u64,
    len: usize,
}

impl Holed {
    fn new(len: usize) -> Holed {
        // SAFETY: a fresh private anonymous mapping; nothing else uses it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        // SAFETY: unmaps the mapping's last page, never touched again.
        assert_eq!(
            unsafe { libc::munmap(p.cast::<u8>().add(len - 4096).cast(), 4096) },
            0
        );
        Holed {
            addr: p as u64,
            len,
        }
    }

    /// The mapped bytes.
    fn mapped(&self) -> &[u8] {
        // SAFETY: all but the last page stay mapped until `Drop`.
        unsafe { std::slice::from_raw_parts(self.addr as *const u8, self.len - 4096) }
    }
}

impl Drop for Holed {
    fn drop(&mut self) {
        // SAFETY: unmaps what `new` left mapped.
        unsafe { libc::munmap(self.addr as *mut std::ffi::c_void, self.len - 4096) };
    }
}

/// A peer DRAM range whose last page faults: the transfer's parts run on
/// the workers, the failure is reported by `poll` (not `post`) only once
/// every part finished, with the call, the pid and the address, and the
/// attached notification is never sent. From DRAM and from VRAM (bounce
/// path), WRITE and READ.
#[test]
#[ignore = "needs a GPU"]
fn gpu_peer_dram_fault_is_reported_by_poll_after_all_parts() {
    let mut a = CudaIpcTransport::new().unwrap();
    let mut b = CudaIpcTransport::new().unwrap();
    let len = 24 * MIB + 4096; // three full parts and one faulting page
    let data = pattern(51, len);
    let src_vram = DeviceBuffer::from_host(0, &data).unwrap();
    let back = vec![0u8; len];
    let rh = a
        .register(&Region::dram(data.as_ptr() as u64, len as u64))
        .unwrap();
    let rback = a
        .register(&Region::dram(back.as_ptr() as u64, len as u64))
        .unwrap();
    let rv = a.register(&src_vram.region()).unwrap();
    let mut buf = [0u8; 128];
    let n = b.local_address(&mut buf).unwrap();
    let pb = a.connect(&buf[..n]).unwrap();
    let me = std::process::id();
    for (i, from_vram) in [false, true].into_iter().enumerate() {
        let holed = Holed::new(len);
        let region = Region::dram(holed.addr, len as u64);
        let kbuf = dram_key(&region);
        let k = a.unpack_key(&pb, &region, &kbuf).unwrap();
        let (reg, local) = if from_vram {
            (&rv, src_vram.ptr())
        } else {
            (&rh, data.as_ptr() as u64)
        };
        let token = Token(60 + i as u64);
        let seg = segment(reg, local, &k, region.addr, 0, len as u64);
        assert_eq!(
            a.post(
                XferOp::Write,
                &pb,
                kvxfer_core::Segments::from(&[seg][..]),
                Some(b"never"),
                token
            ),
            Ok(PostStatus::InProgress)
        );
        let hole = holed.addr + (len - 4096) as u64;
        match wait_done(&mut a, token) {
            Err(Error::Backend {
                backend: "CUDA_IPC",
                code,
                text,
            }) => {
                assert_eq!(code, libc::EFAULT as i64);
                let head =
                    format!("process_vm_writev pid {me}: EFAULT at remote {hole:#x}, local ");
                assert!(text.starts_with(&head), "{text}");
                if !from_vram {
                    // From DRAM the local address is the source's own.
                    assert_eq!(
                        text.as_str(),
                        format!("{head}{:#x}", local + (len - 4096) as u64)
                    );
                }
            }
            r => panic!("expected EFAULT, got {r:?}"),
        }
        // Reported only after every part finished: the mapped bytes are all there.
        assert_eq!(
            first_mismatch(holed.mapped(), &data[..len - 4096]),
            None,
            "WRITE from {} incomplete when its failure was reported",
            if from_vram { "VRAM" } else { "DRAM" }
        );
        assert_eq!(a.in_flight(), 0);
        if !from_vram {
            // READ of the same range into DRAM: the same fault, by READ.
            let seg = segment(&rback, back.as_ptr() as u64, &k, region.addr, 0, len as u64);
            a.post(
                XferOp::Read,
                &pb,
                kvxfer_core::Segments::from(&[seg][..]),
                None,
                Token(70),
            )
            .unwrap();
            assert_eq!(
                wait_done(&mut a, Token(70)),
                Err(Error::backend(
                    "CUDA_IPC",
                    libc::EFAULT as i64,
                    &format!(
                        "process_vm_readv pid {me}: EFAULT at remote {hole:#x}, local {:#x}",
                        back.as_ptr() as u64 + (len - 4096) as u64
                    )
                ))
            );
            assert_eq!(
                first_mismatch(&back[..len - 4096], &data[..len - 4096]),
                None
            );
        }
        a.release_key(k);
    }
    std::thread::sleep(Duration::from_millis(50));
    let mut none = [0u8; 16];
    assert!(
        b.poll_notification(&mut none).is_none(),
        "notification of a failed transfer was sent"
    );
    a.deregister(rh);
    a.deregister(rback);
    a.deregister(rv);
}

/// Dropping a transport while 256 MiB move to a peer's DRAM (from DRAM and
/// from VRAM), once the first part has started writing: the drop waits for
/// the parts in progress (the first one is whole when it returns), and
/// nothing writes the peer's memory afterwards.
#[test]
#[ignore = "needs a GPU"]
fn gpu_drop_with_peer_dram_transfers_in_flight() {
    let len = 256 * MIB;
    let data = pattern(61, len);
    assert_ne!(
        data[0], 0,
        "the first byte must show the first part's arrival"
    );
    let src_vram = DeviceBuffer::from_host(0, &data).unwrap();
    for from_vram in [false, true] {
        let mut a = CudaIpcTransport::new().unwrap();
        let mut b = CudaIpcTransport::new().unwrap();
        let target = vec![0u8; len];
        let region = Region::dram(target.as_ptr() as u64, len as u64);
        let rb = b.register(&region).unwrap();
        let reg = if from_vram {
            a.register(&src_vram.region()).unwrap()
        } else {
            a.register(&Region::dram(data.as_ptr() as u64, len as u64))
                .unwrap()
        };
        let mut buf = [0u8; 128];
        let n = b.local_address(&mut buf).unwrap();
        let pb = a.connect(&buf[..n]).unwrap();
        let n = b.pack_key(&rb, &mut buf).unwrap();
        let k = a.unpack_key(&pb, &region, &buf[..n]).unwrap();
        let seg = segment(&reg, reg.region().addr, &k, region.addr, 0, len as u64);
        a.post(
            XferOp::Write,
            &pb,
            kvxfer_core::Segments::from(&[seg][..]),
            None,
            Token(80),
        )
        .unwrap();
        // The first part is being written once its first byte arrived.
        let first = target.as_ptr();
        let wait = Instant::now();
        // SAFETY: reads one byte of `target`, which the transfer writes
        // from another thread; a volatile read sees it change.
        while unsafe { std::ptr::read_volatile(first) } != data[0] {
            assert!(wait.elapsed() < TIMEOUT, "the first part never started");
            std::hint::spin_loop();
        }
        let start = Instant::now();
        drop(a);
        let took = start.elapsed();
        assert_eq!(
            first_mismatch(&target[..8 * MIB], &data[..8 * MIB]),
            None,
            "the part in progress at the drop is incomplete"
        );
        let snapshot = target.clone();
        std::thread::sleep(Duration::from_millis(200));
        assert!(target == snapshot, "peer memory written after the drop");
        let landed = (0..len / (8 * MIB))
            .filter(|&c| {
                let r = c * 8 * MIB..(c + 1) * 8 * MIB;
                target[r.clone()] == data[r]
            })
            .count();
        println!(
            "RESULT drop with a 256 MiB WRITE from {} in flight: {:.2} ms, {landed} of 32 parts landed",
            if from_vram { "VRAM" } else { "DRAM" },
            took.as_secs_f64() * 1e3
        );
        b.deregister(rb);
    }
}

/// Standalone notifications queued for a peer that then goes away are not
/// lost in silence: the next notification to it fails, saying how many
/// were not sent.
#[test]
#[ignore = "needs a GPU"]
fn gpu_queued_notifications_to_a_peer_that_went_away_are_reported() {
    let mut a = CudaIpcTransport::new().unwrap();
    let b = CudaIpcTransport::new().unwrap();
    let mut buf = [0u8; 128];
    let n = b.local_address(&mut buf).unwrap();
    let pb = a.connect(&buf[..n]).unwrap();
    // b never reads: its socket fills and the rest waits in a's queue.
    let msg = [7u8; 4096];
    for _ in 0..2000 {
        a.send_notification(&pb, &msg).unwrap();
    }
    drop(b);
    let err = a.send_notification(&pb, b"after").unwrap_err().to_string();
    let prefix = "CUDA_IPC error -1: ";
    assert!(err.starts_with(prefix), "{err}");
    let count: u64 = err[prefix.len()..]
        .split(' ')
        .next()
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("{err}"));
    assert!(count > 0 && count <= 2000, "{err}");
    assert!(
        err.contains(&format!(
            " queued notifications to pid {} were not sent (",
            std::process::id()
        )),
        "{err}"
    );
    println!("RESULT {err}");
}

/// A peer killed while its VRAM is mapped here: a WRITE into it is refused
/// with `RemoteDisconnected` naming its pid, nothing stays in flight, and
/// releasing the key closes the mapping, so the dead peer's GPU memory is
/// free again.
#[test]
#[ignore = "needs a GPU"]
fn gpu_vram_of_a_dead_peer_is_refused_and_released() {
    const TEST: &str = "gpu_vram_of_a_dead_peer_is_refused_and_released";
    const HELD: u64 = 4 << 30;
    const SLACK: u64 = 256 << 20;
    if role().is_some() {
        // The peer: HELD bytes of VRAM, published, kept until killed.
        let mut t = CudaIpcTransport::new().unwrap();
        let buf = DeviceBuffer::new(0, HELD).unwrap();
        let reg = t.register(&buf.region()).unwrap();
        publish(&t, &reg);
        let _ = parent_lines().recv_timeout(TIMEOUT);
        std::process::exit(3);
    }
    let mut t = CudaIpcTransport::new().unwrap();
    let src = DeviceBuffer::from_host(0, &pattern(5, 4096)).unwrap();
    let reg = t.register(&src.region()).unwrap();
    let (baseline, _) = driver::memory_info(0).unwrap();
    let mut peer = Peer::spawn(TEST, "hold");
    let (p, region, key) = attach(&mut t, &peer);
    let pid = peer.child.id();
    let seg = Segment {
        local_addr: src.ptr(),
        remote_addr: region.addr,
        len: 4096,
        local: &reg,
        remote: &key,
        remote_region_addr: region.addr,
    };
    let write = |t: &mut CudaIpcTransport| {
        t.post(
            XferOp::Write,
            &p,
            kvxfer_core::Segments::from(&[seg][..]),
            None,
            Token(9),
        )
    };
    assert_eq!(write(&mut t), Ok(PostStatus::InProgress));
    wait_done(&mut t, Token(9)).expect("WRITE to the live peer");
    peer.child.kill().unwrap();
    peer.child.wait().unwrap();
    assert_eq!(
        write(&mut t),
        Err(Error::disconnected(&format!(
            "CUDA_IPC peer pid {pid} is gone"
        )))
    );
    assert_eq!(t.in_flight(), 0);
    assert!(t.poll().is_none());
    let (mapped, _) = driver::memory_info(0).unwrap();
    t.release_key(key);
    t.disconnect(p);
    let start = Instant::now();
    let released = loop {
        let (free, _) = driver::memory_info(0).unwrap();
        if free + SLACK >= baseline || start.elapsed() > TIMEOUT {
            break free;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    println!(
        "RESULT free GPU memory: {} MiB before the peer, {} MiB with its dead \
         memory mapped, {} MiB after release ({:?})",
        baseline >> 20,
        mapped >> 20,
        released >> 20,
        start.elapsed()
    );
    assert!(
        released + SLACK >= baseline,
        "the dead peer's {HELD} bytes were not freed: {released} bytes free, {baseline} before"
    );
    t.deregister(reg);
}
