//! The LIBFABRIC backend, every agent in its own process: the seed's
//! LibfabricBackendBasic, and the transfer scenarios on providers
//! `tcp;ofi_rxm` and `shm`.
#![allow(clippy::result_large_err)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kvxfer::{Agent, AgentConfig, BackendKind, Desc, WaitOutcome, XferOp};
use kvxfer_tests::{
    fill_pattern, random_seed, scenario_suite, scenarios, AlignedBuf, Fabric, Peer,
};

/// The shared scenarios plus LibfabricBackendBasic and three agents.
macro_rules! suite {
    ($modname:ident, $provider:expr) => {
        scenario_suite!($modname, Fabric::libfabric($provider), {
            #[test]
            fn libfabric_backend_basic() {
                super::libfabric_backend_basic($provider);
            }

            #[test]
            fn connect_three_agents() {
                run(scenarios::connect_three);
            }
        });
    };
}

suite!(tcp_rxm, "tcp;ofi_rxm");
suite!(shm, "shm");

/// Selects the child role of this test binary.
const ROLE: &str = "KVXFER_SCEN_ROLE";
/// The provider the child role uses.
const ROLE_PROVIDER: &str = "KVXFER_SCEN_PROVIDER";

/// The seed's LibfabricBackendBasic, run in a child copy of this test
/// binary (which runs that test alone), so that setting the backend
/// variable cannot race other tests: the child saves `KVXFER_BACKEND`, sets
/// it to LIBFABRIC, creates its agent (the variable decides the backend) and
/// a second agent in a peer process, registers memory, exchanges metadata,
/// WRITEs, checks the bytes and restores the variable.
fn libfabric_backend_basic(provider: &str) {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "--ignored",
        "backend_basic_child",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(ROLE, "backend-basic")
    .env(ROLE_PROVIDER, provider)
    .env("KVXFER_BACKEND", "saved-value")
    .env_remove("TRTLLM_NIXL_KVCACHE_BACKEND")
    .env("KVXFER_LIBFABRIC_PROVIDER", provider)
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("LibfabricBackendBasic ({provider}) did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        status.success() && text.contains("BACKEND-BASIC PASSED"),
        "LibfabricBackendBasic ({provider}) failed ({status}):\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
#[ignore = "child role of this file's tests; they spawn it"]
fn backend_basic_child() {
    if std::env::var(ROLE).as_deref() != Ok("backend-basic") {
        return;
    }
    const LEN: usize = 4096;
    let provider = std::env::var(ROLE_PROVIDER).unwrap();
    let saved = std::env::var_os("KVXFER_BACKEND");
    std::env::set_var("KVXFER_BACKEND", "LIBFABRIC");

    let agent = Agent::new("backend-basic-0", AgentConfig::default()).unwrap();
    assert_eq!(agent.backend(), BackendKind::Libfabric);
    let mut peer = Peer::spawn("backend-basic-1", &Fabric::libfabric(&provider));
    assert_eq!(peer.backend, "LIBFABRIC");

    let seed = random_seed();
    let mut src = AlignedBuf::new(LEN);
    fill_pattern(src.as_mut_slice(), seed, 0);
    // SAFETY: `src` outlives its registration (deregistered below) and is
    // only read by the WRITE.
    unsafe { agent.register_slice(src.as_mut_slice()).unwrap() };
    let dst = peer.alloc(LEN as u64);

    // Metadata exchange without the side channel, both ways.
    let theirs = peer.metadata();
    assert_eq!(agent.load_remote(&theirs).unwrap(), "backend-basic-1");
    let ours = agent.local_metadata().unwrap();
    assert_eq!(peer.load(&ours).as_deref(), Ok("backend-basic-0"));

    let local = [Desc::new(src.addr(), LEN as u64)];
    let remote = [Desc::new(dst, LEN as u64)];
    agent.check_remote("backend-basic-1", &remote).unwrap();
    let req = agent
        .submit(
            XferOp::Write,
            &local,
            &remote,
            "backend-basic-1",
            Some(b"done"),
        )
        .unwrap();
    assert_eq!(req.wait(Duration::from_secs(20)), WaitOutcome::Done);
    req.release().unwrap();
    assert_eq!(peer.await_notif("backend-basic-0"), b"done");
    assert_eq!(peer.read_bytes(dst, LEN as u64), src.as_slice());

    peer.quit();
    agent.deregister(src.addr()).unwrap();
    agent.shutdown();
    match &saved {
        Some(v) => std::env::set_var("KVXFER_BACKEND", v),
        None => std::env::remove_var("KVXFER_BACKEND"),
    }
    assert_eq!(std::env::var_os("KVXFER_BACKEND"), saved);
    assert_eq!(saved.as_deref(), Some("saved-value".as_ref()));
    println!("BACKEND-BASIC PASSED");
}
