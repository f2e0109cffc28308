//! CUDA-IPC bandwidth: VRAM→VRAM WRITE between two processes against a
//! single-process `cuMemcpyDtoD`, at 64 MiB and 256 MiB (or the sizes in MiB
//! given as arguments).
//!
//! ```text
//! cargo run --release -p kvxfer-cuda --example ipc_bench [-- 64 256 1024]
//! ```
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

fn target(len: usize) -> Result<(), Error> {
    let mut t = CudaIpcTransport::new()?;
    let mut buf = DeviceBuffer::new(0, len as u64)?;
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

fn bench(len: usize) -> Result<(f64, f64), Error> {
    // Single process: cuMemcpyDtoD + synchronise, back to back.
    let src = DeviceBuffer::from_host(0, &pattern(len))?;
    let mut dst = DeviceBuffer::new(0, len as u64)?;
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
    let region = Region::vram(r[0], r[1], 0);
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
    let ipc = gbps(len, ITERS, start.elapsed());
    t.release_key(rkey);
    t.deregister(reg);
    let mut stdin = child.0.stdin.take().expect("stdin");
    let _ = writeln!(stdin, "BYE");
    drop(stdin);
    let check = next("CHECK");
    drop(child);
    assert_eq!(check, "ok", "target data differs after the IPC writes");
    Ok((local, ipc))
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
    match kvxfer_cuda::device_info(0) {
        Ok(info) => println!("device 0: {} ({} MiB)", info.name, info.total_mem >> 20),
        Err(e) => {
            eprintln!("ipc_bench: {e}");
            std::process::exit(1);
        }
    }
    println!(
        "{:>9} {:>18} {:>22} {:>7}",
        "size", "cuMemcpyDtoD GB/s", "CUDA_IPC 2-proc GB/s", "ratio"
    );
    for mib in sizes {
        match bench(mib << 20) {
            Ok((local, ipc)) => println!(
                "{:>5} MiB {local:>18.1} {ipc:>22.1} {:>7.2}",
                mib,
                ipc / local
            ),
            Err(e) => {
                eprintln!("ipc_bench {mib} MiB: {e}");
                std::process::exit(1);
            }
        }
    }
}
