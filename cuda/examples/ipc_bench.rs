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
//! The example re-runs itself as the target process
//! (`KVXFER_CUDA_BENCH_ROLE=target:<bytes>`).
#![allow(clippy::result_large_err)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kvxfer_core::{Error, Region, Segment, Token, Transport, XferOp};
use kvxfer_cuda::{CudaIpcTransport, DeviceBuffer};

const ROLE: &str = "KVXFER_CUDA_BENCH_ROLE";
const ITERS: u32 = 20;
const WARMUP: u32 = 3;

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap_or(0))
        .collect()
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i.wrapping_mul(31) >> 3) as u8).collect()
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

fn target(len: usize) -> Result<(), Error> {
    let mut t = CudaIpcTransport::new()?;
    let mut buf = DeviceBuffer::new(dst_dev(), len as u64)?;
    buf.fill(0)?;
    let reg = t.register(&buf.region())?;
    let mut b = [0u8; 256];
    let n = t.local_address(&mut b)?;
    println!("ADDR {}", hex(&b[..n]));
    println!("REGION {} {}", buf.ptr(), len);
    let n = t.pack_key(&reg, &mut b)?;
    println!("KEY {}", hex(&b[..n]));
    std::io::stdout().flush().ok();
    // Wait for the initiator to finish (stdin closes or says BYE).
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    let ok = buf.to_vec()? == pattern(len);
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
    let mut child = Target(
        Command::new(std::env::current_exe().expect("current_exe"))
            .env(ROLE, format!("target:{len}"))
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
        t.post(XferOp::Write, &peer, &[seg], None, Token(i as u64))?;
        wait(&mut t, Token(i as u64))?;
    }
    let start = Instant::now();
    for i in 0..ITERS {
        t.post(XferOp::Write, &peer, &[seg], None, Token(i as u64))?;
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
        t.post(XferOp::Read, &peer, &[rseg], None, Token(i as u64))?;
        wait(&mut t, Token(i as u64))?;
    }
    let start = Instant::now();
    for i in 0..ITERS {
        t.post(XferOp::Read, &peer, &[rseg], None, Token(i as u64))?;
        wait(&mut t, Token(i as u64))?;
    }
    let read = gbps(len, ITERS, start.elapsed());
    if back.to_vec()? != pattern(len) {
        return Err(Error::backend("CUDA_IPC", 1, "READ data differs"));
    }
    t.release_key(rkey);
    t.deregister(back_reg);
    t.deregister(reg);
    let mut stdin = child.0.stdin.take().expect("stdin");
    let _ = writeln!(stdin, "BYE");
    drop(stdin);
    let check = next("CHECK");
    drop(child);
    assert_eq!(check, "ok", "target data differs after the IPC writes");
    Ok(Numbers { local, write, read })
}

fn main() {
    if let Ok(role) = std::env::var(ROLE) {
        let len = role
            .strip_prefix("target:")
            .and_then(|s| s.parse().ok())
            .expect("role target:<bytes>");
        if let Err(e) = target(len) {
            eprintln!("target: {e}");
            std::process::exit(1);
        }
        return;
    }
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
