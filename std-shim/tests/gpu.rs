//! GPU tests of the Agent: VRAM over CUDA_IPC, VRAM staged through pinned
//! host memory over UCX and libfabric, and VRAM that UCX registers and
//! moves itself (`ucx_native_*`: they need a UCX with CUDA support, such
//! as the `libucx-cu12` wheel's, and fail without one). Two processes
//! each: this test binary re-runs itself as the target
//! (`KVXFER_GPU_ROLE=target`).
//!
//! Ignored by default; on a GPU machine:
//!
//! ```text
//! cargo test -p kvxfer --features cuda --test gpu -- --ignored --test-threads=1
//! ```
//!
//! `KVXFER_GPU_INIT_DEV` and `KVXFER_GPU_TARGET_DEV` (default 0) pick the
//! GPU of the initiator and of the target: on a two-GPU host, `0` and `1`
//! move data between the GPUs. Both processes see every GPU.
//!
//! Without a GPU, the non-ignored tests check the errors.
#![cfg(feature = "cuda")]
#![allow(clippy::result_large_err)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use kvxfer::{Agent, AgentConfig, Desc, Error, MemKind, WaitOutcome, XferOp};
use kvxfer_cuda::DeviceBuffer;
use kvxfer_testkit::{first_diff, pattern};

const ROLE: &str = "KVXFER_GPU_ROLE";
const TIMEOUT: Duration = Duration::from_secs(60);

/// The target's contents after the initiator WROTE `pattern(22)`'s blocks
/// `[i * step, +block)` over `pattern(11)`.
fn mixed(len: usize, block: usize, step: usize) -> Vec<u8> {
    let mut want = pattern(11, len);
    let src = pattern(22, len);
    for i in 0..len / step {
        let o = i * step;
        want[o..o + block].copy_from_slice(&src[o..o + block]);
    }
    want
}

fn env_u32(name: &str) -> u32 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn init_dev() -> u32 {
    env_u32("KVXFER_GPU_INIT_DEV")
}

fn target_dev() -> u32 {
    env_u32("KVXFER_GPU_TARGET_DEV")
}

/// Memory of one side: VRAM on a GPU, or host memory.
enum Mem {
    Vram(DeviceBuffer),
    Dram(Vec<u8>),
}

impl Mem {
    fn new(kind: MemKind, dev: u32, data: &[u8]) -> Result<Mem, Error> {
        Ok(match kind {
            MemKind::Vram => Mem::Vram(DeviceBuffer::from_host(dev, data)?),
            MemKind::Dram => Mem::Dram(data.to_vec()),
        })
    }

    fn addr(&self) -> u64 {
        match self {
            Mem::Vram(b) => b.ptr(),
            Mem::Dram(v) => v.as_ptr() as u64,
        }
    }

    fn len(&self) -> u64 {
        match self {
            Mem::Vram(b) => b.len(),
            Mem::Dram(v) => v.len() as u64,
        }
    }

    fn dev(&self) -> u32 {
        match self {
            Mem::Vram(b) => b.device(),
            Mem::Dram(_) => 0,
        }
    }

    fn kind(&self) -> MemKind {
        match self {
            Mem::Vram(_) => MemKind::Vram,
            Mem::Dram(_) => MemKind::Dram,
        }
    }

    /// A copy of the bytes (VRAM copied back to the host).
    fn read(&self) -> Result<Vec<u8>, Error> {
        match self {
            Mem::Vram(b) => b.to_vec(),
            // No transfer touches the buffer while it is read: the
            // initiator finished (and said so) before asking.
            Mem::Dram(v) => Ok(v.clone()),
        }
    }

    fn register(&self, agent: &Agent) -> Result<(), Error> {
        // SAFETY: the memory lives until the agent is shut down (both are
        // dropped at the end of the role, the agent first).
        unsafe { agent.register(self.addr(), self.len(), self.dev(), self.kind()) }
    }
}

/// Suffix of a backend name in these tests: UCX (or libfabric, through
/// `FI_HMEM`) registering VRAM itself. `"UCX"` or `"LIBFABRIC"` alone
/// stages VRAM, whatever the library supports.
const NATIVE: &str = " native";

/// The backend's name and whether its VRAM is native (see [`NATIVE`]).
fn split_backend(backend: &str) -> (&str, bool) {
    match backend.strip_suffix(NATIVE) {
        Some(b) => (b, true),
        None => (backend, false),
    }
}

/// How VRAM must move for `backend` ([`Agent::vram_path`]).
fn expected_vram_path(backend: &str) -> &'static str {
    match split_backend(backend) {
        ("CUDA_IPC", _) => "cuda-ipc",
        (_, true) => "native",
        (_, false) => "staged",
    }
}

fn config(backend: &str, provider: Option<&str>) -> AgentConfig {
    let (name, native) = split_backend(backend);
    let mut c = AgentConfig::default();
    c.backend = Some(name.to_string());
    c.provider = provider.map(str::to_string);
    if name == "UCX" {
        let mut u = kvxfer::config::UcxConfig::from_env().expect("UCX settings");
        u.native_vram = native;
        c = c.with_ucx_config(u);
    }
    if name == "LIBFABRIC" {
        let mut f = kvxfer::config::FabricConfig::default();
        f.native_vram = native;
        c = c.with_fabric_config(f);
    }
    c
}

/// An agent for `backend` whose VRAM moves as the backend's name says.
fn agent(name: &str, backend: &str, provider: Option<&str>) -> Agent {
    let a = Agent::new(name, config(backend, provider)).expect("agent");
    assert_eq!(
        a.vram_path().expect("VRAM path"),
        expected_vram_path(backend),
        "{backend}: VRAM path (a native test needs a UCX with CUDA support)"
    );
    a
}

fn parse_kind(s: &str) -> MemKind {
    if s.eq_ignore_ascii_case("vram") {
        MemKind::Vram
    } else {
        MemKind::Dram
    }
}

/// The target process: serves one buffer and answers commands on stdin.
fn target_role() -> Result<(), Error> {
    let get = |k: &str| std::env::var(k).unwrap_or_default();
    let backend = get("KVXFER_GPU_BACKEND");
    let provider = std::env::var("KVXFER_GPU_PROVIDER").ok();
    let kind = parse_kind(&get("KVXFER_GPU_MEM"));
    let len: usize = get("KVXFER_GPU_LEN").parse().unwrap_or(0);
    let seed: u64 = get("KVXFER_GPU_SEED").parse().unwrap_or(0);
    let mem = Mem::new(kind, target_dev(), &pattern(seed, len))?;
    let agent = Agent::new("gpu-target", config(&backend, provider.as_deref()))?;
    mem.register(&agent)?;
    let addr = agent.listen_addr().expect("target listens");
    println!("LISTEN {addr}");
    println!("REGION {} {} {}", mem.addr(), mem.len(), mem.dev());
    println!("VRAMPATH {}", agent.vram_path()?);
    std::io::stdout().flush().ok();
    for line in std::io::stdin().lock().lines() {
        let line = line.unwrap_or_default();
        let mut w = line.split_whitespace();
        match (w.next(), w.next()) {
            (Some("WAITNOTE"), Some(msg)) => {
                let start = Instant::now();
                let mut got = false;
                while !got && start.elapsed() < TIMEOUT {
                    let notes = agent.take_notifications()?;
                    got = notes.values().flatten().any(|m| m == msg.as_bytes());
                    if !got {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
                println!("NOTE {}", if got { "ok" } else { "timeout" });
            }
            (Some("CHECKMIX"), Some(block)) => {
                let block: usize = block.parse().unwrap_or(len);
                let step = w.next().and_then(|s| s.parse().ok()).unwrap_or(len);
                let want = mixed(len, block, step);
                match first_diff(&mem.read()?, &want) {
                    None => println!("CHECK ok"),
                    Some(i) => println!("CHECK mismatch at {i}"),
                }
            }
            (Some("CHECK"), Some(seed)) => {
                let want = pattern(seed.parse().unwrap_or(0), len);
                match first_diff(&mem.read()?, &want) {
                    None => println!("CHECK ok"),
                    Some(i) => println!("CHECK mismatch at {i}"),
                }
            }
            (Some("QUIT"), _) => break,
            _ => println!("ERR unknown command {line:?}"),
        }
        std::io::stdout().flush().ok();
    }
    agent.shutdown();
    drop(mem);
    Ok(())
}

/// A running target, killed on drop.
struct Target {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    listen: String,
    region: (u64, u64, u32),
}

impl Target {
    fn spawn(backend: &str, provider: Option<&str>, kind: &str, len: usize, seed: u64) -> Target {
        let mut cmd = Command::new(std::env::current_exe().expect("current_exe"));
        cmd.args([
            "--exact",
            "target_entry",
            "--nocapture",
            "--include-ignored",
        ])
        .env(ROLE, "target")
        .env("KVXFER_GPU_BACKEND", backend)
        .env("KVXFER_GPU_MEM", kind)
        .env("KVXFER_GPU_LEN", len.to_string())
        .env("KVXFER_GPU_SEED", seed.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
        if let Some(p) = provider {
            cmd.env("KVXFER_GPU_PROVIDER", p);
        }
        let mut child = cmd.spawn().expect("spawn target");
        let stdout = child.stdout.take().expect("stdout");
        let stdin = child.stdin.take().expect("stdin");
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                // Only protocol lines; the test harness prints its own.
                if l.chars().next().is_some_and(|c| c.is_ascii_uppercase()) {
                    let _ = tx.send(l);
                }
            }
        });
        let mut t = Target {
            child,
            stdin,
            lines: rx,
            listen: String::new(),
            region: (0, 0, 0),
        };
        t.listen = t.expect("LISTEN");
        let r: Vec<u64> = t
            .expect("REGION")
            .split(' ')
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        t.region = (r[0], r[1], r[2] as u32);
        assert_eq!(
            t.expect("VRAMPATH"),
            expected_vram_path(backend),
            "target's VRAM path"
        );
        t
    }

    /// The next line starting with `tag`, without it; panics (killing the
    /// child through Drop) after the timeout.
    fn expect(&mut self, tag: &str) -> String {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let l = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("target: no {tag} line within {TIMEOUT:?}"));
            if let Some(rest) = l.strip_prefix(tag) {
                return rest.trim().to_string();
            }
            if l.starts_with("ERR") {
                panic!("target: {l}");
            }
        }
    }

    fn ask(&mut self, cmd: &str, tag: &str) -> String {
        writeln!(self.stdin, "{cmd}").expect("write to target");
        self.stdin.flush().expect("flush to target");
        self.expect(tag)
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "QUIT");
        let _ = self.stdin.flush();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Entry point of the re-spawned target; does nothing in a normal run.
#[test]
#[ignore = "child role of this file's tests; they spawn it"]
fn target_entry() {
    if std::env::var(ROLE).as_deref() == Ok("target") {
        if let Err(e) = target_role() {
            println!("ERR {e}");
            std::process::exit(1);
        }
    }
}

fn wait_done(req: &kvxfer::XferRequest, what: &str) {
    match req.wait(TIMEOUT) {
        WaitOutcome::Done => {}
        other => panic!("{what}: {other:?}"),
    }
}

fn gbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

/// One scenario: the target serves `tkind` memory of `len` bytes holding
/// `pattern(11)`; the initiator, with `ikind` memory, WRITEs `pattern(22)`
/// into the `blocks` x `block` layout (every other block of both sides)
/// and checks it there, then READs the target's blocks back into a zeroed
/// buffer and compares byte for byte.
fn scenario(
    backend: &str,
    provider: Option<&str>,
    ikind: MemKind,
    tkind: MemKind,
    len: usize,
    block: usize,
) {
    let tk = if tkind == MemKind::Vram {
        "vram"
    } else {
        "dram"
    };
    let mut target = Target::spawn(backend, provider, tk, len, 11);
    let agent = agent("gpu-init", backend, provider);
    let src = pattern(22, len);
    let mem = Mem::new(ikind, init_dev(), &src).expect("initiator memory");
    mem.register(&agent).expect("register initiator memory");
    let peer = agent.connect(&target.listen).expect("connect");
    let (raddr, rlen, rdev) = target.region;
    assert_eq!(rlen, len as u64);
    // Every other block when the transfer is split, else the whole buffer.
    let step = if block < len { 2 * block } else { len };
    let descs = |base: u64, dev: u32| -> Vec<Desc> {
        (0..len / step)
            .map(|i| Desc::on_dev(base + (i * step) as u64, block as u64, dev))
            .collect()
    };
    let local = descs(mem.addr(), mem.dev());
    let remote = descs(raddr, rdev);
    let moved = (local.len() * block) as u64;

    // WRITE, with a notification that must arrive after the data.
    let t0 = Instant::now();
    let req = agent
        .submit(XferOp::Write, &local, &remote, &peer, Some(b"written"))
        .expect("post WRITE");
    wait_done(&req, "WRITE");
    let w = t0.elapsed();
    drop(req);
    assert_eq!(target.ask("WAITNOTE written", "NOTE"), "ok");
    // Both sides copied back: the target holds the written blocks over
    // its own pattern, byte for byte.
    assert_eq!(
        target.ask(&format!("CHECKMIX {block} {step}"), "CHECK"),
        "ok",
        "target after WRITE"
    );
    // The initiator's own memory is unchanged by a WRITE.
    assert_eq!(first_diff(&mem.read().expect("read back"), &src), None);

    // READ the target's blocks into a zeroed buffer.
    let dst = Mem::new(ikind, init_dev(), &vec![0; len]).expect("READ buffer");
    dst.register(&agent).expect("register READ buffer");
    let local2 = descs(dst.addr(), dst.dev());
    let t1 = Instant::now();
    let req = agent
        .submit(XferOp::Read, &local2, &remote, &peer, None)
        .expect("post READ");
    wait_done(&req, "READ");
    let r = t1.elapsed();
    drop(req);
    let got = dst.read().expect("read back READ buffer");
    // Blocks that were read hold what was written (pattern 22); the rest
    // stays zero.
    let mut want = vec![0u8; len];
    for i in 0..len / step {
        let o = i * step;
        want[o..o + block].copy_from_slice(&src[o..o + block]);
    }
    // A whole-buffer READ matches the target's mixed contents.
    if step != len {
        let all = Mem::new(ikind, init_dev(), &vec![0; len]).expect("READ buffer");
        all.register(&agent).expect("register READ buffer");
        let req = agent
            .submit(
                XferOp::Read,
                &[Desc::on_dev(all.addr(), len as u64, all.dev())],
                &[Desc::on_dev(raddr, len as u64, rdev)],
                &peer,
                None,
            )
            .expect("post whole READ");
        wait_done(&req, "whole READ");
        drop(req);
        let got = all.read().expect("read back");
        assert_eq!(
            first_diff(&got, &mixed(len, block, step)),
            None,
            "whole READ"
        );
        agent.deregister(all.addr()).expect("deregister");
    }
    assert_eq!(first_diff(&got, &want), None, "READ data differs");
    eprintln!(
        "{backend}{}: {ikind}(dev {}) <-> {tkind}(dev {}), {} x {} bytes: WRITE {:.2} GB/s, READ {:.2} GB/s",
        provider.map(|p| format!(" ({p})")).unwrap_or_default(),
        mem.dev(),
        rdev,
        local.len(),
        block,
        gbps(moved, w),
        gbps(moved, r)
    );
    agent.deregister(dst.addr()).expect("deregister");
    agent.deregister(mem.addr()).expect("deregister");
    agent.shutdown();
}

const MIB: usize = 1 << 20;
/// 256 blocks of 16 KiB: every other one moves, 128 x 16 KiB.
const KV_LEN: usize = 256 * (16 << 10);

#[test]
#[ignore = "needs a GPU"]
fn cuda_ipc_trtllm_device_memory_100_bytes() {
    scenario("CUDA_IPC", None, MemKind::Vram, MemKind::Vram, 100, 100);
}

/// CUDA_IPC cannot cancel: a request dropped while it runs, with a release
/// timeout too short to wait for it, is orphaned, then released as soon as
/// it ends, so its slot and memory are free again (the memory can be
/// deregistered) instead of taken for ever.
#[test]
#[ignore = "needs a GPU"]
fn cuda_ipc_request_dropped_while_running_is_released_when_it_ends() {
    let len = 256 * MIB;
    let mut target = Target::spawn("CUDA_IPC", None, "dram", len, 11);
    let cfg = config("CUDA_IPC", None).with_release_timeout(Duration::from_micros(1));
    let agent = Agent::new("gpu-orphan", cfg).expect("initiator agent");
    let src = pattern(5, len);
    let mem = Mem::new(MemKind::Dram, init_dev(), &src).expect("initiator memory");
    mem.register(&agent).expect("register");
    let peer = agent.connect(&target.listen).expect("connect");
    let (raddr, _, rdev) = target.region;
    let local = [Desc::on_dev(mem.addr(), len as u64, mem.dev())];
    let remote = [Desc::on_dev(raddr, len as u64, rdev)];
    let req = agent
        .submit(XferOp::Write, &local, &remote, &peer, None)
        .expect("post WRITE");
    drop(req);
    assert_eq!(agent.orphaned_transfers(), 1, "dropped while running");
    assert!(
        matches!(agent.deregister(mem.addr()), Err(Error::RegionBusy { .. })),
        "its memory is still used"
    );
    let deadline = Instant::now() + TIMEOUT;
    while agent.orphaned_transfers() > 0 {
        assert!(Instant::now() < deadline, "never released");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(agent.deregister(mem.addr()).map(|r| r.len), Ok(len as u64));
    // The WRITE ran to its end.
    assert_eq!(target.ask("CHECK 5", "CHECK"), "ok");
}

#[test]
#[ignore = "needs a GPU"]
fn cuda_ipc_256_mib() {
    scenario(
        "CUDA_IPC",
        None,
        MemKind::Vram,
        MemKind::Vram,
        256 * MIB,
        256 * MIB,
    );
}

#[test]
#[ignore = "needs a GPU"]
fn cuda_ipc_kv_shaped_128_x_16_kib() {
    scenario(
        "CUDA_IPC",
        None,
        MemKind::Vram,
        MemKind::Vram,
        KV_LEN,
        16 << 10,
    );
}

// CUDA_IPC with host memory on one side (peer DRAM through cross-memory
// attach).

#[test]
#[ignore = "needs a GPU"]
fn cuda_ipc_vram_to_dram_64_mib() {
    let n = 64 * MIB;
    scenario("CUDA_IPC", None, MemKind::Vram, MemKind::Dram, n, n);
}

#[test]
#[ignore = "needs a GPU"]
fn cuda_ipc_dram_to_vram_64_mib() {
    let n = 64 * MIB;
    scenario("CUDA_IPC", None, MemKind::Dram, MemKind::Vram, n, n);
}

#[test]
#[ignore = "needs a GPU"]
fn cuda_ipc_dram_to_vram_kv_shaped_128_x_16_kib() {
    scenario(
        "CUDA_IPC",
        None,
        MemKind::Dram,
        MemKind::Vram,
        KV_LEN,
        16 << 10,
    );
}

#[test]
#[ignore = "needs a GPU"]
fn ucx_staged_vram_to_dram_64_mib() {
    scenario(
        "UCX",
        None,
        MemKind::Vram,
        MemKind::Dram,
        64 * MIB,
        64 * MIB,
    );
}

#[test]
#[ignore = "needs a GPU"]
fn ucx_staged_kv_shaped_128_x_16_kib() {
    scenario("UCX", None, MemKind::Vram, MemKind::Dram, KV_LEN, 16 << 10);
}

#[test]
#[ignore = "needs a GPU"]
fn libfabric_staged_vram_to_dram_64_mib() {
    scenario(
        "LIBFABRIC",
        Some("tcp;ofi_rxm"),
        MemKind::Vram,
        MemKind::Dram,
        64 * MIB,
        64 * MIB,
    );
}

#[test]
#[ignore = "needs a GPU"]
fn libfabric_staged_kv_shaped_128_x_16_kib() {
    scenario(
        "LIBFABRIC",
        Some("tcp;ofi_rxm"),
        MemKind::Vram,
        MemKind::Dram,
        KV_LEN,
        16 << 10,
    );
}

const TCP_RXM: Option<&str> = Some("tcp;ofi_rxm");

// Remote VRAM through staging: the target's staging serves each chunk.

#[test]
#[ignore = "needs a GPU"]
fn ucx_staged_trtllm_device_memory_100_bytes() {
    scenario("UCX", None, MemKind::Vram, MemKind::Vram, 100, 100);
}

#[test]
#[ignore = "needs a GPU"]
fn ucx_staged_vram_to_vram_256_mib() {
    let n = 256 * MIB;
    scenario("UCX", None, MemKind::Vram, MemKind::Vram, n, n);
}

#[test]
#[ignore = "needs a GPU"]
fn ucx_staged_vram_to_vram_kv_shaped_128_x_16_kib() {
    scenario("UCX", None, MemKind::Vram, MemKind::Vram, KV_LEN, 16 << 10);
}

#[test]
#[ignore = "needs a GPU"]
fn ucx_staged_dram_to_vram_64_mib() {
    let n = 64 * MIB;
    scenario("UCX", None, MemKind::Dram, MemKind::Vram, n, n);
}

#[test]
#[ignore = "needs a GPU"]
fn libfabric_staged_trtllm_device_memory_100_bytes() {
    scenario("LIBFABRIC", TCP_RXM, MemKind::Vram, MemKind::Vram, 100, 100);
}

#[test]
#[ignore = "needs a GPU"]
fn libfabric_staged_vram_to_vram_256_mib() {
    let n = 256 * MIB;
    scenario("LIBFABRIC", TCP_RXM, MemKind::Vram, MemKind::Vram, n, n);
}

#[test]
#[ignore = "needs a GPU"]
fn libfabric_staged_vram_to_vram_kv_shaped_128_x_16_kib() {
    let block = 16 << 10;
    scenario(
        "LIBFABRIC",
        TCP_RXM,
        MemKind::Vram,
        MemKind::Vram,
        KV_LEN,
        block,
    );
}

#[test]
#[ignore = "needs a GPU"]
fn libfabric_staged_dram_to_vram_64_mib() {
    let n = 64 * MIB;
    scenario("LIBFABRIC", TCP_RXM, MemKind::Dram, MemKind::Vram, n, n);
}

// VRAM that UCX registers itself (UCX with CUDA support): `cuda_ipc` and
// `cuda_copy` between the processes, no staging and no CPU of the target.

const UCX_NATIVE: &str = "UCX native";

#[test]
#[ignore = "needs a GPU and a UCX with CUDA support"]
fn ucx_native_trtllm_device_memory_100_bytes() {
    scenario(UCX_NATIVE, None, MemKind::Vram, MemKind::Vram, 100, 100);
}

#[test]
#[ignore = "needs a GPU and a UCX with CUDA support"]
fn ucx_native_vram_to_vram_256_mib() {
    let n = 256 * MIB;
    scenario(UCX_NATIVE, None, MemKind::Vram, MemKind::Vram, n, n);
}

#[test]
#[ignore = "needs a GPU and a UCX with CUDA support"]
fn ucx_native_vram_to_vram_kv_shaped_128_x_16_kib() {
    let block = 16 << 10;
    scenario(
        UCX_NATIVE,
        None,
        MemKind::Vram,
        MemKind::Vram,
        KV_LEN,
        block,
    );
}

#[test]
#[ignore = "needs a GPU and a UCX with CUDA support"]
fn ucx_native_vram_to_dram_64_mib() {
    let n = 64 * MIB;
    scenario(UCX_NATIVE, None, MemKind::Vram, MemKind::Dram, n, n);
}

#[test]
#[ignore = "needs a GPU and a UCX with CUDA support"]
fn ucx_native_dram_to_vram_64_mib() {
    let n = 64 * MIB;
    scenario(UCX_NATIVE, None, MemKind::Dram, MemKind::Vram, n, n);
}

#[test]
#[ignore = "needs a GPU and a UCX with CUDA support"]
fn ucx_native_dram_to_vram_kv_shaped_128_x_16_kib() {
    let block = 16 << 10;
    scenario(
        UCX_NATIVE,
        None,
        MemKind::Dram,
        MemKind::Vram,
        KV_LEN,
        block,
    );
}

#[test]
#[ignore = "needs a GPU and a UCX with CUDA support"]
fn ucx_native_crossing_writes() {
    staged_crossing_writes(UCX_NATIVE, None);
}

/// A stopped (SIGSTOP) target with natively registered VRAM: the data
/// part of a WRITE into its VRAM needs none of its CPU (`cuda_ipc`: the
/// initiator's GPU copies into the target's memory), but the WRITE's
/// endpoint flush and notification go through the target's UCX worker.
/// The WRITE either completes or fails with `TimedOut` at the deadline —
/// it never hangs — and once the target resumes a WRITE lands whole, with
/// its notification after the data.
#[test]
#[ignore = "needs a GPU and a UCX with CUDA support"]
fn ucx_native_stopped_target_never_hangs_then_recovers() {
    let n = 64 * MIB;
    let mut target = Target::spawn(UCX_NATIVE, None, "vram", n, 11);
    let deadline = Duration::from_secs(2);
    let cfg = config(UCX_NATIVE, None).with_transfer_timeout(Some(deadline));
    let agent = Agent::new("gpu-init", cfg).expect("initiator agent");
    assert_eq!(agent.vram_path().expect("VRAM path"), "native");
    let src = Mem::new(MemKind::Vram, init_dev(), &pattern(22, n)).expect("VRAM");
    src.register(&agent).expect("register");
    let src2 = Mem::new(MemKind::Vram, init_dev(), &pattern(33, n)).expect("VRAM");
    src2.register(&agent).expect("register");
    let peer = agent.connect(&target.listen).expect("connect");
    let (raddr, _, rdev) = target.region;
    let remote = [Desc::on_dev(raddr, n as u64, rdev)];
    let whole = |m: &Mem| [Desc::on_dev(m.addr(), n as u64, m.dev())];
    // A first WRITE sets up the connection's CUDA IPC mapping.
    let req = agent
        .submit(XferOp::Write, &whole(&src), &remote, &peer, Some(b"first"))
        .expect("post WRITE");
    wait_done(&req, "first WRITE");
    drop(req);
    assert_eq!(target.ask("WAITNOTE first", "NOTE"), "ok");
    assert_eq!(target.ask("CHECK 22", "CHECK"), "ok");

    signal(&target, "STOP");
    let t0 = Instant::now();
    let req = agent
        .submit(
            XferOp::Write,
            &whole(&src2),
            &remote,
            &peer,
            Some(b"stopped"),
        )
        .expect("post WRITE");
    let outcome = req.wait(Duration::from_secs(30));
    let took = t0.elapsed();
    signal(&target, "CONT");
    drop(req);
    eprintln!("UCX native: WRITE into a stopped target's VRAM: {outcome:?} after {took:?}");
    assert!(
        took < deadline + Duration::from_secs(3),
        "ended only after {took:?}"
    );
    let peer = match outcome {
        WaitOutcome::Done => {
            assert_eq!(target.ask("WAITNOTE stopped", "NOTE"), "ok");
            peer
        }
        WaitOutcome::Failed(Error::TimedOut { after_ms }) => {
            assert!(after_ms >= 2000, "timed out after {after_ms} ms");
            std::thread::sleep(Duration::from_secs(1));
            // UCX closes the connection of a timed-out transfer.
            let peer = agent.connect(&target.listen).expect("reconnect");
            let req = agent
                .submit(XferOp::Write, &whole(&src2), &remote, &peer, Some(b"again"))
                .expect("post WRITE");
            wait_done(&req, "WRITE after the target resumed");
            drop(req);
            assert_eq!(target.ask("WAITNOTE again", "NOTE"), "ok");
            peer
        }
        other => panic!("WRITE to a stopped target: {other:?}"),
    };
    assert_eq!(target.ask("CHECK 33", "CHECK"), "ok");
    drop(peer);
    agent.shutdown();
}

/// Sends `sig` (`STOP`, `CONT`) to the target process.
fn signal(target: &Target, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &target.child.id().to_string()])
        .status()
        .expect("run kill")
        .success();
    assert!(ok, "kill -{sig}");
}

/// The target is stopped (SIGSTOP) when a staged WRITE into its VRAM is
/// posted: the WRITE fails with `TimedOut` at the transfer deadline instead
/// of hanging. Once the target resumes and its late work drains, a new
/// WRITE into the same VRAM lands whole: the bounce buffers of the
/// timed-out chunks were held back until their late answers, not reused.
fn staged_stopped_target(backend: &str, provider: Option<&str>) {
    let n = 64 * MIB;
    let mut target = Target::spawn(backend, provider, "vram", n, 11);
    let deadline = Duration::from_secs(2);
    let cfg = config(backend, provider).with_transfer_timeout(Some(deadline));
    let agent = Agent::new("gpu-init", cfg).expect("initiator agent");
    assert_eq!(agent.vram_path().expect("VRAM path"), "staged");
    let first = Mem::new(MemKind::Vram, init_dev(), &pattern(22, n)).expect("VRAM");
    first.register(&agent).expect("register");
    let second = Mem::new(MemKind::Vram, init_dev(), &pattern(33, n)).expect("VRAM");
    second.register(&agent).expect("register");
    let peer = agent.connect(&target.listen).expect("connect");
    let (raddr, _, rdev) = target.region;
    let remote = [Desc::on_dev(raddr, n as u64, rdev)];
    let whole = |m: &Mem| [Desc::on_dev(m.addr(), n as u64, m.dev())];

    signal(&target, "STOP");
    let t0 = Instant::now();
    let req = agent
        .submit(XferOp::Write, &whole(&first), &remote, &peer, None)
        .expect("post WRITE");
    let outcome = req.wait(Duration::from_secs(30));
    let took = t0.elapsed();
    signal(&target, "CONT");
    match outcome {
        WaitOutcome::Failed(Error::TimedOut { after_ms }) => {
            assert!(after_ms >= 2000, "timed out after {after_ms} ms")
        }
        other => panic!("WRITE to a stopped target: {other:?}"),
    }
    assert!(
        took < deadline + Duration::from_secs(3),
        "failed only after {took:?}"
    );
    drop(req);

    // Let the target finish what it had been asked before it stopped.
    std::thread::sleep(Duration::from_secs(1));
    let write = |peer: &str| {
        let req = agent.submit(
            XferOp::Write,
            &whole(&second),
            &remote,
            peer,
            Some(b"second"),
        )?;
        match req.wait(TIMEOUT) {
            WaitOutcome::Done => Ok(()),
            WaitOutcome::Failed(e) => Err(e),
            WaitOutcome::InProgress => panic!("WRITE after the target resumed hangs"),
        }
    };
    match write(&peer) {
        Ok(()) => eprintln!("{backend}: the connection survived the timeout"),
        // A transport that closes the connection of a timed-out transfer
        // (UCX) refuses the peer until it is loaded again.
        Err(Error::RemoteDisconnected { .. }) => {
            eprintln!("{backend}: the connection was closed by the timeout; reconnecting");
            let peer = agent.connect(&target.listen).expect("reconnect");
            write(&peer).expect("WRITE after reconnecting");
        }
        Err(e) => panic!("WRITE after the target resumed: {e:?}"),
    }
    assert_eq!(target.ask("WAITNOTE second", "NOTE"), "ok");
    assert_eq!(target.ask("CHECK 33", "CHECK"), "ok");
    eprintln!("{backend}: stopped target: WRITE failed with TimedOut after {took:?}; after resume a 64 MiB WRITE landed whole");
    agent.shutdown();
}

#[test]
#[ignore = "needs a GPU"]
fn ucx_staged_stopped_target_times_out_then_recovers() {
    staged_stopped_target("UCX", None);
}

#[test]
#[ignore = "needs a GPU"]
fn libfabric_staged_stopped_target_times_out_then_recovers() {
    staged_stopped_target("LIBFABRIC", TCP_RXM);
}

/// Two agents WRITE into each other's VRAM at the same time, each with
/// more chunks than it has bounce buffers: every buffer of each side waits
/// for the other's answers, so serving those requests must not need the
/// same buffers. Both WRITEs complete and land whole.
fn staged_crossing_writes(backend: &str, provider: Option<&str>) {
    let n = 64 * MIB;
    let a = agent("cross-a", backend, provider);
    let b = agent("cross-b", backend, provider);
    let a_src = Mem::new(MemKind::Vram, init_dev(), &pattern(1, n)).expect("VRAM");
    let a_dst = Mem::new(MemKind::Vram, init_dev(), &vec![0; n]).expect("VRAM");
    let b_src = Mem::new(MemKind::Vram, target_dev(), &pattern(2, n)).expect("VRAM");
    let b_dst = Mem::new(MemKind::Vram, target_dev(), &vec![0; n]).expect("VRAM");
    for (m, agent) in [(&a_src, &a), (&a_dst, &a), (&b_src, &b), (&b_dst, &b)] {
        m.register(agent).expect("register");
    }
    let b_from_a = a
        .connect(&b.listen_addr().expect("b listens").to_string())
        .expect("a connects to b");
    let a_from_b = b
        .connect(&a.listen_addr().expect("a listens").to_string())
        .expect("b connects to a");
    let whole = |m: &Mem| [Desc::on_dev(m.addr(), n as u64, m.dev())];
    let t0 = Instant::now();
    let ab = a
        .submit(
            XferOp::Write,
            &whole(&a_src),
            &whole(&b_dst),
            &b_from_a,
            None,
        )
        .expect("post a -> b");
    let ba = b
        .submit(
            XferOp::Write,
            &whole(&b_src),
            &whole(&a_dst),
            &a_from_b,
            None,
        )
        .expect("post b -> a");
    wait_done(&ab, "WRITE a -> b");
    wait_done(&ba, "WRITE b -> a");
    let took = t0.elapsed();
    drop((ab, ba));
    assert_eq!(
        first_diff(&b_dst.read().expect("read"), &pattern(1, n)),
        None
    );
    assert_eq!(
        first_diff(&a_dst.read().expect("read"), &pattern(2, n)),
        None
    );
    eprintln!("{backend}: crossing 64 MiB VRAM WRITEs both landed in {took:?}");
    a.shutdown();
    b.shutdown();
}

#[test]
#[ignore = "needs a GPU"]
fn ucx_staged_crossing_writes_do_not_deadlock() {
    staged_crossing_writes("UCX", None);
}

#[test]
#[ignore = "needs a GPU"]
fn libfabric_staged_crossing_writes_do_not_deadlock() {
    staged_crossing_writes("LIBFABRIC", TCP_RXM);
}

/// A host pointer registered as VRAM is refused by pointer attributes, as
/// is VRAM registered with the wrong device id; VRAM with its own is taken.
fn registration_checks_pointer_attributes(backend: &str) {
    let agent = agent("gpu-reg", backend, None);
    let host = vec![0u8; 4096];
    // SAFETY: the buffer outlives the agent; registration is refused.
    let r = unsafe { agent.register(host.as_ptr() as u64, 4096, 0, MemKind::Vram) };
    assert!(
        matches!(r, Err(Error::Backend { .. })),
        "{backend}: host memory as VRAM gave {r:?}"
    );
    // Wrong device id for real VRAM.
    let count = kvxfer_cuda::device_count().expect("device count");
    let buf = DeviceBuffer::new(0, 4096).expect("VRAM");
    // SAFETY: as above.
    let r = unsafe { agent.register(buf.ptr(), 4096, count, MemKind::Vram) };
    assert!(r.is_err(), "{backend}: VRAM on device {count} accepted");
    // SAFETY: `buf` lives until after the agent's shutdown below.
    unsafe { agent.register(buf.ptr(), 4096, 0, MemKind::Vram) }
        .unwrap_or_else(|e| panic!("{backend}: registering VRAM: {e}"));
    agent.shutdown();
}

#[test]
#[ignore = "needs a GPU"]
fn vram_registration_checks_pointer_attributes() {
    registration_checks_pointer_attributes("CUDA_IPC");
    registration_checks_pointer_attributes("UCX");
}

#[test]
#[ignore = "needs a GPU and a UCX with CUDA support"]
fn ucx_native_vram_registration_checks_pointer_attributes() {
    registration_checks_pointer_attributes(UCX_NATIVE);
}

// VRAM that libfabric's provider registers itself (`FI_HMEM_CUDA`): they
// need a libfabric whose provider offers FI_HMEM with CUDA (built with
// CUDA; Debian's is not) and fail without one. `KVXFER_GPU_FABRIC_PROVIDER`
// picks the provider (default `shm`).

const FABRIC_NATIVE: &str = "LIBFABRIC native";

fn hmem_provider() -> Option<String> {
    Some(std::env::var("KVXFER_GPU_FABRIC_PROVIDER").unwrap_or_else(|_| "shm".to_string()))
}

#[test]
#[ignore = "needs a GPU and a libfabric provider with FI_HMEM CUDA"]
fn libfabric_native_trtllm_device_memory_100_bytes() {
    let p = hmem_provider();
    scenario(
        FABRIC_NATIVE,
        p.as_deref(),
        MemKind::Vram,
        MemKind::Vram,
        100,
        100,
    );
}

#[test]
#[ignore = "needs a GPU and a libfabric provider with FI_HMEM CUDA"]
fn libfabric_native_vram_to_vram_256_mib() {
    let (p, n) = (hmem_provider(), 256 * MIB);
    scenario(
        FABRIC_NATIVE,
        p.as_deref(),
        MemKind::Vram,
        MemKind::Vram,
        n,
        n,
    );
}

#[test]
#[ignore = "needs a GPU and a libfabric provider with FI_HMEM CUDA"]
fn libfabric_native_vram_to_vram_kv_shaped_128_x_16_kib() {
    let p = hmem_provider();
    let block = 16 << 10;
    scenario(
        FABRIC_NATIVE,
        p.as_deref(),
        MemKind::Vram,
        MemKind::Vram,
        KV_LEN,
        block,
    );
}

#[test]
#[ignore = "needs a GPU and a libfabric provider with FI_HMEM CUDA"]
fn libfabric_native_vram_to_dram_64_mib() {
    let (p, n) = (hmem_provider(), 64 * MIB);
    scenario(
        FABRIC_NATIVE,
        p.as_deref(),
        MemKind::Vram,
        MemKind::Dram,
        n,
        n,
    );
}

/// With a GPU but a libfabric whose provider has no CUDA support, native
/// VRAM is asked for, refused, and VRAM is staged, with the reason given.
#[test]
#[ignore = "needs a GPU"]
fn libfabric_without_hmem_stages_and_says_why() {
    let a = Agent::new("gpu-hmem", config(FABRIC_NATIVE, TCP_RXM)).expect("agent");
    let (path, why) = (a.vram_path().expect("path"), a.vram_reason().expect("why"));
    if path == "native" {
        assert!(
            why.contains("registered 4096 bytes of GPU 0 with FI_HMEM_CUDA"),
            "{why}"
        );
    } else {
        assert_eq!(path, "staged");
        assert!(
            why.contains("does not offer FI_HMEM") || why.contains("refused VRAM (FI_HMEM_CUDA)"),
            "{why}"
        );
    }
    a.shutdown();
    std::env::set_var("KVXFER_LIBFABRIC_NATIVE_VRAM", "0");
    let a = Agent::new("gpu-hmem-off", config(FABRIC_NATIVE, TCP_RXM)).expect("agent");
    std::env::remove_var("KVXFER_LIBFABRIC_NATIVE_VRAM");
    assert_eq!(a.vram_path().expect("path"), "staged");
    assert_eq!(
        a.vram_reason().expect("why"),
        "KVXFER_LIBFABRIC_NATIVE_VRAM=0"
    );
    a.shutdown();
}

/// Without a CUDA driver, CUDA_IPC and VRAM registration fail with a clear
/// error; host memory still works over staged UCX.
#[test]
fn without_a_driver_errors_are_clear() {
    if kvxfer_cuda::driver_present() {
        // With a driver, the same call must not claim that there is none,
        // and with a GPU it must work.
        let r = Agent::new("has-gpu", config("CUDA_IPC", None));
        match (kvxfer_cuda::driver::device_count(), r) {
            (Ok(n), Ok(agent)) if n > 0 => agent.shutdown(),
            (Ok(n), Err(e)) if n > 0 => panic!("CUDA_IPC with {n} GPUs: {e}"),
            (_, Err(e)) => assert_ne!(e, kvxfer_cuda::driver::no_driver()),
            (_, Ok(agent)) => agent.shutdown(),
        }
        return;
    }
    let e = Agent::new("no-gpu", config("CUDA_IPC", None)).unwrap_err();
    assert_eq!(e, kvxfer_cuda::driver::no_driver());
    let agent = Agent::new("no-gpu", config("UCX", None)).expect("UCX agent");
    let mut host = vec![0u8; 4096];
    // SAFETY: the buffer outlives the agent; registration is refused.
    let r = unsafe { agent.register(host.as_ptr() as u64, 4096, 0, MemKind::Vram) };
    assert_eq!(r, Err(kvxfer_cuda::driver::no_driver()));
    // SAFETY: as above; DRAM passes through to UCX.
    unsafe { agent.register_slice(&mut host) }.expect("DRAM over staged UCX");
    agent.deregister(host.as_ptr() as u64).expect("deregister");
}
