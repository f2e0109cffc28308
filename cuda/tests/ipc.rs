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
use kvxfer_cuda::wire::{IpcAddress, IpcKey};
use kvxfer_cuda::{CudaIpcTransport, DeviceBuffer, PinnedBuffer};

const ROLE: &str = "KVXFER_CUDA_TEST_ROLE";
const TIMEOUT: Duration = Duration::from_secs(30);
const MIB: usize = 1 << 20;

// ---------------------------------------------------------------- helpers

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = vec![0u8; len];
    for chunk in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    out
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex"))
        .collect()
}

fn first_mismatch(a: &[u8], b: &[u8]) -> Option<usize> {
    if a == b {
        return None;
    }
    Some(
        a.iter()
            .zip(b)
            .position(|(x, y)| x != y)
            .unwrap_or(a.len().min(b.len())),
    )
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
    say(&format!("REGION {} {} {}", r.addr, r.len, r.dev));
    let n = t.pack_key(reg, &mut buf).unwrap();
    say(&format!("KEY {}", hex(&buf[..n])));
}

/// Connects to the child's published agent and unpacks its key.
fn attach(
    t: &mut CudaIpcTransport,
    peer: &Peer,
) -> (kvxfer_cuda::IpcPeer, Region, kvxfer_cuda::IpcRemoteKey) {
    let addr = unhex(&peer.expect("ADDR"));
    let r: Vec<u64> = peer
        .expect("REGION")
        .split(' ')
        .map(|x| x.parse().unwrap())
        .collect();
    let region = Region::vram(r[0], r[1], r[2] as u32);
    let key = unhex(&peer.expect("KEY"));
    let p = t.connect(&addr).expect("connect");
    let k = t.unpack_key(&p, &region, &key).expect("unpack_key");
    (p, region, k)
}

fn role() -> Option<String> {
    std::env::var(ROLE).ok()
}

/// Target side: a region of `len` bytes at offset 4096 of a larger
/// allocation (so the key's allocation offset matters), zeroed (WRITE) or
/// holding the pattern (READ). Waits for the notification, then reports.
fn target(role: &str) {
    let parts: Vec<&str> = role.split(':').collect();
    let (op, len, seed): (&str, usize, u64) = (
        parts[0],
        parts[1].parse().unwrap(),
        parts[2].parse().unwrap(),
    );
    let mut t = CudaIpcTransport::new().unwrap();
    let mut buf = DeviceBuffer::new(0, (len + 8192) as u64).unwrap();
    buf.fill(0).unwrap();
    if op == "read" {
        buf.copy_from_host(4096, &pattern(seed, len)).unwrap();
    }
    let reg = t
        .register(&Region::vram(buf.ptr() + 4096, len as u64, 0))
        .unwrap();
    publish(&t, &reg);
    let note = match wait_notification(&mut t) {
        Ok(n) => n,
        Err(e) => {
            say(&format!("ERR {e}"));
            std::process::exit(2);
        }
    };
    // The notification came: the data must already be here.
    let all = buf.to_vec().unwrap();
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

/// Initiator side of a WRITE of `len` bytes into the child's VRAM.
fn write_test(test: &str, len: usize, seed: u64) {
    let mut peer = Peer::spawn(test, &format!("write:{len}:{seed}"));
    let mut t = CudaIpcTransport::new().unwrap();
    let data = pattern(seed, len);
    // The source also sits at an offset inside its allocation.
    let mut src = DeviceBuffer::new(0, (len + 512) as u64).unwrap();
    src.copy_from_host(512, &data).unwrap();
    let reg = t
        .register(&Region::vram(src.ptr() + 512, len as u64, 0))
        .unwrap();
    let (p, region, key) = attach(&mut t, &peer);
    let seg = Segment {
        local_addr: src.ptr() + 512,
        remote_addr: region.addr,
        len: len as u64,
        local: &reg,
        remote: &key,
        remote_region_addr: region.addr,
    };
    let status = t
        .post(XferOp::Write, &p, &[seg], Some(b"written"), Token(7))
        .unwrap();
    assert_eq!(status, PostStatus::InProgress);
    wait_done(&mut t, Token(7)).unwrap();
    assert_eq!(t.in_flight(), 0);
    let mut back = vec![0u8; len];
    src.copy_to_host(512, &mut back).unwrap();
    assert!(back == data, "source changed");
    assert_eq!(unhex(&peer.expect("NOTE")), b"written");
    if len <= 4096 {
        let remote = unhex(&peer.expect("DATA"));
        assert_eq!(remote.len(), len);
        assert_eq!(
            remote, back,
            "target VRAM differs from the source after WRITE"
        );
    }
    assert_eq!(peer.expect("VERIFY"), "ok");
    t.release_key(key);
    t.disconnect(p);
    t.deregister(reg);
    peer.send("BYE");
    peer.finish();
}

/// Initiator side of a READ of `len` bytes from the child's VRAM.
fn read_test(test: &str, len: usize, seed: u64) {
    let mut peer = Peer::spawn(test, &format!("read:{len}:{seed}"));
    let mut t = CudaIpcTransport::new().unwrap();
    let mut dst = DeviceBuffer::new(0, len as u64).unwrap();
    dst.fill(0xEE).unwrap();
    let reg = t.register(&dst.region()).unwrap();
    let (p, region, key) = attach(&mut t, &peer);
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
    t.post(XferOp::Read, &p, &segs, Some(b"read done"), Token(9))
        .unwrap();
    wait_done(&mut t, Token(9)).unwrap();
    let got = dst.to_vec().unwrap();
    assert_eq!(
        first_mismatch(&got, &pattern(seed, len)),
        None,
        "READ data differs"
    );
    assert_eq!(unhex(&peer.expect("NOTE")), b"read done");
    if len <= 4096 {
        // Both sides copied back: the initiator's VRAM equals the target's.
        assert_eq!(
            unhex(&peer.expect("DATA")),
            got,
            "READ result differs from the target's VRAM"
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

#[test]
#[ignore = "needs a GPU"]
fn gpu_register_refuses_what_is_not_vram() {
    let mut t = CudaIpcTransport::new().unwrap();
    assert_eq!(t.name(), "CUDA_IPC");
    assert!(t.capabilities().mem_kinds.contains(MemKind::Vram));
    assert!(!t.capabilities().mem_kinds.contains(MemKind::Dram));
    let heap = vec![0u8; 4096];
    assert_eq!(
        t.register(&Region::dram(heap.as_ptr() as u64, 4096)),
        Err(Error::UnsupportedMemKind {
            backend: "CUDA_IPC",
            kind: MemKind::Dram
        })
    );
    match t.register(&Region::vram(heap.as_ptr() as u64, 4096, 0)) {
        Err(Error::Backend {
            backend: "CUDA_IPC",
            text,
            ..
        }) => assert!(text.contains("is not VRAM"), "{text}"),
        r => panic!("host memory registered as VRAM: {r:?}"),
    }
    let vram = DeviceBuffer::new(0, 4096).unwrap();
    assert!(matches!(
        t.register(&Region::vram(vram.ptr(), 4096, 7)),
        Err(Error::Backend { .. })
    ));
    match t.register(&Region::vram(vram.ptr() + 4000, 200, 0)) {
        Err(Error::Backend { text, .. }) => {
            assert!(text.contains("leaves its allocation"), "{text}")
        }
        r => panic!("region beyond its allocation registered: {r:?}"),
    }
    assert_eq!(
        t.register(&Region::vram(vram.ptr(), 0, 0)),
        Err(Error::InvalidRegion {
            addr: vram.ptr(),
            len: 0
        })
    );
    let reg = t
        .register(&Region::vram(vram.ptr() + 1024, 1024, 0))
        .unwrap();
    assert_eq!(reg.key().offset, 1024);
    assert_eq!(reg.key().alloc_len, 4096);
    let mut small = [0u8; 10];
    assert_eq!(
        t.pack_key(&reg, &mut small),
        Err(Error::BufferTooSmall {
            needed: IpcKey::LEN as u64,
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
    a.post(XferOp::Write, &pb, &[seg], Some(b"after"), Token(1))
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
        a.post(XferOp::Write, &pb, &[bad], None, Token(2)),
        Err(Error::Backend { .. })
    ));
    assert_eq!(
        a.post(XferOp::Write, &pb, &[seg], Some(&[0u8; 5000]), Token(3)),
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
    write_test("gpu_two_process_write_100_bytes", 100, 11);
}

#[test]
#[ignore = "needs a GPU"]
fn gpu_two_process_write_256_mib() {
    if dispatch() {
        return;
    }
    write_test("gpu_two_process_write_256_mib", 256 * MIB, 12);
}

#[test]
#[ignore = "needs a GPU"]
fn gpu_two_process_read_100_bytes() {
    if dispatch() {
        return;
    }
    read_test("gpu_two_process_read_100_bytes", 100, 13);
}

#[test]
#[ignore = "needs a GPU"]
fn gpu_two_process_read_256_mib() {
    if dispatch() {
        return;
    }
    read_test("gpu_two_process_read_256_mib", 256 * MIB, 14);
}
