//! CUDA-IPC bandwidth: VRAM→VRAM WRITE and READ between two processes
//! against a single-process `cuMemcpyDtoD` between the same two GPUs, at
//! 64 MiB and 256 MiB (or the sizes in MiB given as arguments); and, as the
//! ceiling of the staging path, a `cuMemcpyDtoHAsync` into pinned memory.
//!
//! ```text
//! cargo run --release -p kvxfer-cuda --example ipc_bench [-- 64 256 1024]
//! ```
//!
//! `KVXFER_BENCH_SRC_DEV` (initiator, default 0) and `KVXFER_BENCH_DST_DEV`
//! (target, default 0) pick the GPUs; on a two-GPU host `0` and `1` measure
//! the peer path.
//!
//! With `--peer-dram` it measures the target's DRAM instead (cross-memory
//! attach): WRITE and READ between local DRAM and the peer's DRAM, and
//! between local VRAM and the peer's DRAM (through pinned bounce buffers),
//! with the longest time one `post` took:
//!
//! ```text
//! cargo run --release -p kvxfer-cuda --example ipc_bench -- --peer-dram 64 256
//! ```
//!
//! The example re-runs itself as the target process
//! (`KVXFER_CUDA_BENCH_ROLE=target:<bytes>[:dram]`).
#![allow(clippy::result_large_err)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kvxfer_core::{Error, Region, Segment, Token, Transport, XferOp};
use kvxfer_cuda::{CudaIpcTransport, DeviceBuffer};
use kvxfer_testkit::hex;

const ROLE: &str = "KVXFER_CUDA_BENCH_ROLE";
const ITERS: u32 = 20;
const WARMUP: u32 = 3;

fn unhex(s: &str) -> Vec<u8> {
    kvxfer_testkit::unhex(s).unwrap_or_default()
}

/// The bytes the bench moves and checks.
fn pattern(len: usize) -> Vec<u8> {
    kvxfer_testkit::pattern(1, len)
}

fn env_dev(name: &str) -> u32 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn src_dev() -> u32 {
    env_dev("KVXFER_BENCH_SRC_DEV")
}

fn dst_dev() -> u32 {
    env_dev("KVXFER_BENCH_DST_DEV")
}

/// The target's memory: VRAM of the target GPU, or DRAM.
enum TargetMem {
    Vram(DeviceBuffer),
    Dram(Vec<u8>),
}

fn target(len: usize, dram: bool) -> Result<(), Error> {
    let mut t = CudaIpcTransport::new()?;
    let buf = if dram {
        TargetMem::Dram(vec![0u8; len])
    } else {
        let mut b = DeviceBuffer::new(dst_dev(), len as u64)?;
        b.fill(0)?;
        TargetMem::Vram(b)
    };
    let region = match &buf {
        TargetMem::Vram(b) => b.region(),
        TargetMem::Dram(v) => Region::dram(v.as_ptr() as u64, len as u64),
    };
    let reg = t.register(&region)?;
    let mut b = [0u8; 256];
    let n = t.local_address(&mut b)?;
    println!("ADDR {}", hex(&b[..n]));
    println!("REGION {} {}", region.addr, len);
    let n = t.pack_key(&reg, &mut b)?;
    println!("KEY {}", hex(&b[..n]));
    std::io::stdout().flush().ok();
    // Wait for the initiator to finish (stdin closes or says BYE).
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    let ok = match &buf {
        TargetMem::Vram(b) => b.to_vec()? == pattern(len),
        TargetMem::Dram(v) => *v == pattern(len),
    };
    println!("CHECK {}", if ok { "ok" } else { "MISMATCH" });
    t.deregister(reg);
    Ok(())
}

fn wait(t: &mut CudaIpcTransport, token: Token) -> Result<(), Error> {
    let start = Instant::now();
    loop {
        if let Some(c) = t.poll() {
            assert_eq!(c.token, token, "completion for another transfer");
            return c.result;
        }
        if start.elapsed() > Duration::from_secs(30) {
            return Err(Error::TimedOut { after_ms: 30_000 });
        }
    }
}

/// The target process, killed if the bench stops early.
struct Target(std::process::Child);

impl Drop for Target {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

fn gbps(bytes: usize, iters: u32, d: Duration) -> f64 {
    bytes as f64 * iters as f64 / d.as_secs_f64() / 1e9
}

/// Pinned device-to-host copy of `len` bytes from GPU `dev`, GB/s.
fn pinned_d2h(dev: u32, len: usize) -> Result<f64, Error> {
    let src = DeviceBuffer::from_host(dev, &pattern(len))?;
    let mut host = kvxfer_cuda::PinnedBuffer::new(dev, len)?;
    let mut run = || src.copy_to_host(0, host.as_mut_slice());
    for _ in 0..WARMUP {
        run()?;
    }
    let start = Instant::now();
    for _ in 0..ITERS {
        run()?;
    }
    let d = start.elapsed();
    if host.as_slice() != pattern(len).as_slice() {
        return Err(Error::backend("CUDA_IPC", 1, "pinned copy differs"));
    }
    Ok(gbps(len, ITERS, d))
}

struct Numbers {
    local: f64,
    write: f64,
    read: f64,
}

/// The target process with its published address, region and key.
struct Spawned {
    child: Target,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
    addr: Vec<u8>,
    region_addr: u64,
    key: Vec<u8>,
}

impl Spawned {
    fn new(len: usize, dram: bool) -> Spawned {
        let role = if dram {
            format!("target:{len}:dram")
        } else {
            format!("target:{len}")
        };
        let mut child = Target(
            Command::new(std::env::current_exe().expect("current_exe"))
                .env(ROLE, role)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .expect("spawn target"),
        );
        let mut lines = BufReader::new(child.0.stdout.take().expect("stdout")).lines();
        let mut next = |tag: &str| -> String {
            let l = lines.next().and_then(Result::ok).unwrap_or_default();
            l.strip_prefix(tag)
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|| panic!("expected {tag}, got {l:?}"))
        };
        let addr = unhex(&next("ADDR"));
        let r: Vec<u64> = next("REGION")
            .split(' ')
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        let key = unhex(&next("KEY"));
        Spawned {
            child,
            lines,
            addr,
            region_addr: r[0],
            key,
        }
    }

    /// Says BYE and returns the target's CHECK answer.
    fn finish(mut self) -> String {
        let mut stdin = self.child.0.stdin.take().expect("stdin");
        let _ = writeln!(stdin, "BYE");
        drop(stdin);
        let l = self.lines.next().and_then(Result::ok).unwrap_or_default();
        l.strip_prefix("CHECK")
            .map(|s| s.trim().to_string())
            .unwrap_or(l)
    }
}

/// `WARMUP` then `ITERS` transfers of `seg`, each posted and polled to
/// completion: GB/s over the timed ones and the longest single `post`.
fn timed(
    t: &mut CudaIpcTransport,
    op: XferOp,
    peer: &kvxfer_cuda::IpcPeer,
    seg: Segment<'_, kvxfer_cuda::IpcReg, kvxfer_cuda::IpcRemoteKey>,
    len: usize,
) -> Result<(f64, Duration), Error> {
    for i in 0..WARMUP {
        t.post(
            op,
            peer,
            kvxfer_core::Segments::from(&[seg][..]),
            None,
            Token(i as u64),
        )?;
        wait(t, Token(i as u64))?;
    }
    let mut post_max = Duration::ZERO;
    let start = Instant::now();
    for i in 0..ITERS {
        let p = Instant::now();
        t.post(
            op,
            peer,
            kvxfer_core::Segments::from(&[seg][..]),
            None,
            Token(i as u64),
        )?;
        post_max = post_max.max(p.elapsed());
        wait(t, Token(i as u64))?;
    }
    Ok((gbps(len, ITERS, start.elapsed()), post_max))
}

struct DramNumbers {
    dram_write: f64,
    dram_read: f64,
    vram_write: f64,
    vram_read: f64,
    post_max: Duration,
}

/// Local DRAM and local VRAM to and from the peer's DRAM.
fn bench_peer_dram(len: usize) -> Result<DramNumbers, Error> {
    let data = pattern(len);
    let src_host = data.clone();
    let back_host = vec![0u8; len];
    let src_vram = DeviceBuffer::from_host(src_dev(), &data)?;
    let mut back_vram = DeviceBuffer::new(src_dev(), len as u64)?;
    back_vram.fill(0)?;
    let spawned = Spawned::new(len, true);
    let mut t = CudaIpcTransport::new()?;
    let host_region = |v: &Vec<u8>| Region::dram(v.as_ptr() as u64, len as u64);
    let r_src_host = t.register(&host_region(&src_host))?;
    let r_back_host = t.register(&host_region(&back_host))?;
    let r_src_vram = t.register(&src_vram.region())?;
    let r_back_vram = t.register(&back_vram.region())?;
    let peer = t.connect(&spawned.addr)?;
    let region = Region::dram(spawned.region_addr, len as u64);
    let rkey = t.unpack_key(&peer, &region, &spawned.key)?;
    fn seg<'a>(
        local: &'a kvxfer_cuda::IpcReg,
        remote: &'a kvxfer_cuda::IpcRemoteKey,
        region: &Region,
    ) -> Segment<'a, kvxfer_cuda::IpcReg, kvxfer_cuda::IpcRemoteKey> {
        Segment {
            local_addr: local.region().addr,
            remote_addr: region.addr,
            len: region.len,
            local,
            remote,
            remote_region_addr: region.addr,
        }
    }
    let (dram_write, p1) = timed(
        &mut t,
        XferOp::Write,
        &peer,
        seg(&r_src_host, &rkey, &region),
        len,
    )?;
    let (dram_read, p2) = timed(
        &mut t,
        XferOp::Read,
        &peer,
        seg(&r_back_host, &rkey, &region),
        len,
    )?;
    let (vram_write, p3) = timed(
        &mut t,
        XferOp::Write,
        &peer,
        seg(&r_src_vram, &rkey, &region),
        len,
    )?;
    let (vram_read, p4) = timed(
        &mut t,
        XferOp::Read,
        &peer,
        seg(&r_back_vram, &rkey, &region),
        len,
    )?;
    if back_host != data {
        return Err(Error::backend("CUDA_IPC", 1, "READ into DRAM differs"));
    }
    if back_vram.to_vec()? != data {
        return Err(Error::backend("CUDA_IPC", 1, "READ into VRAM differs"));
    }
    t.release_key(rkey);
    for r in [r_src_host, r_back_host, r_src_vram, r_back_vram] {
        t.deregister(r);
    }
    drop(t);
    let check = spawned.finish();
    assert_eq!(check, "ok", "target DRAM differs after the writes");
    Ok(DramNumbers {
        dram_write,
        dram_read,
        vram_write,
        vram_read,
        post_max: p1.max(p2).max(p3).max(p4),
    })
}

fn bench(len: usize) -> Result<Numbers, Error> {
    // Single process: cuMemcpyDtoD (a peer copy across GPUs) + synchronise.
    let src = DeviceBuffer::from_host(src_dev(), &pattern(len))?;
    let mut dst = DeviceBuffer::new(dst_dev(), len as u64)?;
    for _ in 0..WARMUP {
        dst.copy_from_device(&src)?;
    }
    let start = Instant::now();
    for _ in 0..ITERS {
        dst.copy_from_device(&src)?;
    }
    let local = gbps(len, ITERS, start.elapsed());
    drop(dst);

    // Two processes: CUDA_IPC WRITE, post + poll to completion, back to back.
    let spawned = Spawned::new(len, false);
    let (addr, key) = (spawned.addr.clone(), spawned.key.clone());
    let r = [spawned.region_addr, len as u64];
    let mut t = CudaIpcTransport::new()?;
    let reg = t.register(&src.region())?;
    let peer = t.connect(&addr)?;
    let region = Region::vram(r[0], r[1], dst_dev());
    let rkey = t.unpack_key(&peer, &region, &key)?;
    let seg = Segment {
        local_addr: src.ptr(),
        remote_addr: region.addr,
        len: len as u64,
        local: &reg,
        remote: &rkey,
        remote_region_addr: region.addr,
    };
    for i in 0..WARMUP {
        t.post(
            XferOp::Write,
            &peer,
            kvxfer_core::Segments::from(&[seg][..]),
            None,
            Token(i as u64),
        )?;
        wait(&mut t, Token(i as u64))?;
    }
    let start = Instant::now();
    for i in 0..ITERS {
        t.post(
            XferOp::Write,
            &peer,
            kvxfer_core::Segments::from(&[seg][..]),
            None,
            Token(i as u64),
        )?;
        wait(&mut t, Token(i as u64))?;
    }
    let write = gbps(len, ITERS, start.elapsed());
    // READ the target's buffer back into a second local buffer.
    let back = DeviceBuffer::new(src_dev(), len as u64)?;
    let back_reg = t.register(&back.region())?;
    let rseg = Segment {
        local_addr: back.ptr(),
        local: &back_reg,
        ..seg
    };
    for i in 0..WARMUP {
        t.post(
            XferOp::Read,
            &peer,
            kvxfer_core::Segments::from(&[rseg][..]),
            None,
            Token(i as u64),
        )?;
        wait(&mut t, Token(i as u64))?;
    }
    let start = Instant::now();
    for i in 0..ITERS {
        t.post(
            XferOp::Read,
            &peer,
            kvxfer_core::Segments::from(&[rseg][..]),
            None,
            Token(i as u64),
        )?;
        wait(&mut t, Token(i as u64))?;
    }
    let read = gbps(len, ITERS, start.elapsed());
    if back.to_vec()? != pattern(len) {
        return Err(Error::backend("CUDA_IPC", 1, "READ data differs"));
    }
    t.release_key(rkey);
    t.deregister(back_reg);
    t.deregister(reg);
    let check = spawned.finish();
    assert_eq!(check, "ok", "target data differs after the IPC writes");
    Ok(Numbers { local, write, read })
}

fn main() {
    if let Ok(role) = std::env::var(ROLE) {
        let spec = role.strip_prefix("target:").expect("role target:<bytes>");
        let (len, dram) = match spec.strip_suffix(":dram") {
            Some(l) => (l, true),
            None => (spec, false),
        };
        let len = len.parse().expect("role target:<bytes>");
        if let Err(e) = target(len, dram) {
            eprintln!("target: {e}");
            std::process::exit(1);
        }
        return;
    }
    let peer_dram = std::env::args().any(|a| a == "--peer-dram");
    let sizes: Vec<usize> = {
        let a: Vec<usize> = std::env::args()
            .skip(1)
            .filter_map(|s| s.parse().ok())
            .collect();
        if a.is_empty() {
            vec![64, 256]
        } else {
            a
        }
    };
    for dev in [src_dev(), dst_dev()] {
        match kvxfer_cuda::device_info(dev) {
            Ok(info) => println!(
                "device {dev}: {} ({} MiB, PCI {})",
                info.name,
                info.total_mem >> 20,
                info.pci_bus_id
            ),
            Err(e) => {
                eprintln!("ipc_bench: {e}");
                std::process::exit(1);
            }
        }
    }
    println!(
        "initiator on device {}, target on device {}",
        src_dev(),
        dst_dev()
    );
    if peer_dram {
        println!(
            "peer DRAM: {:>9} {:>16} {:>15} {:>16} {:>15} {:>13}",
            "size",
            "DRAM WRITE GB/s",
            "DRAM READ GB/s",
            "VRAM WRITE GB/s",
            "VRAM READ GB/s",
            "post max us"
        );
        for mib in sizes {
            match bench_peer_dram(mib << 20) {
                Ok(n) => println!(
                    "peer DRAM: {:>5} MiB {:>16.2} {:>15.2} {:>16.2} {:>15.2} {:>13.0}",
                    mib,
                    n.dram_write,
                    n.dram_read,
                    n.vram_write,
                    n.vram_read,
                    n.post_max.as_secs_f64() * 1e6
                ),
                Err(e) => {
                    eprintln!("ipc_bench --peer-dram {mib} MiB: {e}");
                    std::process::exit(1);
                }
            }
        }
        return;
    }
    println!(
        "{:>9} {:>12} {:>11} {:>7} {:>10} {:>7} {:>13}",
        "size", "DtoD GB/s", "WRITE GB/s", "ratio", "READ GB/s", "ratio", "pinned D2H"
    );
    for mib in sizes {
        let d2h = pinned_d2h(src_dev(), mib << 20);
        match (bench(mib << 20), d2h) {
            (Ok(n), Ok(d2h)) => println!(
                "{:>5} MiB {:>12.1} {:>11.1} {:>7.2} {:>10.1} {:>7.2} {:>13.1}",
                mib,
                n.local,
                n.write,
                n.write / n.local,
                n.read,
                n.read / n.local,
                d2h
            ),
            (Err(e), _) | (_, Err(e)) => {
                eprintln!("ipc_bench {mib} MiB: {e}");
                std::process::exit(1);
            }
        }
    }
}
