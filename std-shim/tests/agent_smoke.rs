//! End-to-end check of the Agent: two processes (this test binary, re-run
//! as a child in the target role), metadata exchanged over the side
//! channel, a 100-byte WRITE over UCX, compared byte for byte.
#![cfg(feature = "ucx")]
#![allow(clippy::result_large_err)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kvxfer::{Agent, AgentConfig, Desc, Error, WaitOutcome, XferOp};

mod common;
use common::{hex, unhex, ChildGuard};

const ROLE: &str = "KVXFER_SMOKE_ROLE";
const LEN: usize = 100;
const DONE_NOTE: &[u8] = b"written\0with a zero byte";

/// The target role: serve a zeroed buffer, wait for the notification that
/// follows the data, print what the buffer holds.
fn run_target() {
    let agent = Agent::new("smoke-target", AgentConfig::default().with_backend("UCX")).unwrap();
    let mut buf = vec![0u8; LEN];
    // SAFETY: `buf` outlives its registration (deregistered below) and is
    // read only after the notification that follows the WRITE's data.
    unsafe { agent.register_slice(&mut buf).unwrap() };
    println!(
        "SMOKE ready {} {}",
        agent.listen_addr().unwrap(),
        buf.as_ptr() as u64
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let notes = agent.take_notifications().unwrap();
        if let Some(msgs) = notes.get("smoke-initiator") {
            assert_eq!(msgs.as_slice(), &[DONE_NOTE.to_vec()]);
            break;
        }
        assert!(Instant::now() < deadline, "no notification within 20 s");
        std::thread::sleep(Duration::from_millis(1));
    }
    // SAFETY: the WRITE is complete (its notification arrived after it).
    let data = unsafe { std::ptr::read_volatile(buf.as_ptr().cast::<[u8; LEN]>()) };
    println!("SMOKE data {}", hex(&data));
    agent.deregister(buf.as_ptr() as u64).unwrap();
    agent.shutdown();
}

#[test]
#[ignore = "child role of this file's tests; they spawn it"]
fn smoke_child() {
    if std::env::var(ROLE).as_deref() == Ok("target") {
        run_target();
    }
}

/// Sends what follows "SMOKE " on the child's stdout lines into a channel.
fn lines(child: &mut Child) -> mpsc::Receiver<String> {
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            // The harness may print "test smoke_child ... " before it.
            if let Some(at) = line.find("SMOKE ") {
                if tx.send(line[at + 6..].to_string()).is_err() {
                    break;
                }
            }
        }
    });
    rx
}

#[test]
fn write_100_bytes_between_processes_over_ucx() {
    let child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "--ignored", "smoke_child", "--nocapture"])
        .arg("--test-threads=1")
        .env(ROLE, "target")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut child = ChildGuard(child);
    let rx = lines(&mut child.0);
    let ready = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("target did not start");
    let mut parts = ready.strip_prefix("ready ").unwrap().split(' ');
    let addr = parts.next().unwrap().to_string();
    let remote_buf: u64 = parts.next().unwrap().parse().unwrap();

    // The target runs a progress thread; the initiator does without, so
    // `wait` drives progress itself.
    let cfg = AgentConfig::default()
        .with_backend("UCX")
        .with_progress_thread(false);
    let agent = Agent::new("smoke-initiator", cfg).unwrap();
    let mut src: Vec<u8> = (0..LEN)
        .map(|i| (i as u8).wrapping_mul(37).wrapping_add(11))
        .collect();
    // SAFETY: `src` outlives its registration and is only read by the WRITE.
    unsafe { agent.register_slice(&mut src).unwrap() };
    let peer = agent.connect(&addr).unwrap();
    assert_eq!(peer, "smoke-target");

    let local = [Desc::new(src.as_ptr() as u64, LEN as u64)];
    let remote = [Desc::new(remote_buf, LEN as u64)];
    agent.check_remote(&peer, &remote).unwrap();
    // One byte past the target's registration is refused up front.
    match agent.check_remote(&peer, &[Desc::new(remote_buf, LEN as u64 + 1)]) {
        Err(Error::InvalidDesc { index: 0, .. }) => {}
        other => panic!("expected InvalidDesc for descriptor 0, got {other:?}"),
    }
    let req = agent
        .submit(XferOp::Write, &local, &remote, &peer, Some(DONE_NOTE))
        .unwrap();
    assert_eq!(req.wait(Duration::from_secs(10)), WaitOutcome::Done);
    assert!(req.is_completed());
    assert_eq!(req.telemetry().unwrap().bytes, LEN as u64);
    drop(req);

    let data = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("target did not report its data");
    let got = unhex(data.strip_prefix("data ").unwrap());
    assert_eq!(got, src, "target's buffer differs from what was written");

    let status = child.0.wait().unwrap();
    assert!(status.success(), "target exited with {status}");
    agent.deregister(src.as_ptr() as u64).unwrap();
    agent.shutdown();
}

#[test]
fn unsupported_backend_is_refused() {
    let err = Agent::new("x", AgentConfig::default().with_backend("NCCL")).unwrap_err();
    assert_eq!(
        err,
        Error::UnsupportedBackend {
            value: kvxfer_core::error::bounded("NCCL"),
            supported: kvxfer::config::BUILT_IN
        }
    );
}

/// Each built-in host-memory backend reports its name, its VRAM path and
/// refuses a peer it does not know.
#[test]
#[cfg(feature = "libfabric")]
fn backend_name_and_paths() {
    for (asked, name) in [("ucx", "UCX"), ("LibFabric", "LIBFABRIC")] {
        let cfg = AgentConfig::default()
            .with_backend(asked)
            .with_listen(None)
            .with_provider("tcp;ofi_rxm");
        let a = Agent::new("paths", cfg).unwrap();
        assert_eq!(a.backend().name(), name);
        assert_eq!(a.backend(), kvxfer::BackendKind::parse(name).unwrap());
        let vram = a.vram_path().unwrap();
        if cfg!(feature = "cuda") {
            assert!(vram == "native" || vram == "staged", "{vram}");
        } else {
            assert_eq!(vram, "none");
        }
        assert_eq!(
            a.peer_path("nobody"),
            Err(Error::UnknownPeer {
                peer: kvxfer_core::error::bounded("nobody")
            })
        );
        a.shutdown();
        assert_eq!(a.vram_path(), Err(Error::ShutDown));
    }
}

#[test]
fn calls_after_shutdown_fail_with_shut_down() {
    let agent = Agent::new("shut", AgentConfig::default().with_backend("UCX")).unwrap();
    let addr = agent.listen_addr().unwrap();
    let mut buf = vec![0u8; 64];
    // SAFETY: `buf` outlives the agent's use of it (the agent is shut down
    // before `buf` is dropped).
    unsafe { agent.register_slice(&mut buf).unwrap() };
    let req_err = agent.submit(
        XferOp::Write,
        &[Desc::new(buf.as_ptr() as u64, 8)],
        &[Desc::new(0, 8)],
        "nobody",
        None,
    );
    assert_eq!(req_err.unwrap_err(), Error::unknown_peer("nobody"));
    agent.shutdown();
    agent.shutdown();
    assert_eq!(agent.local_metadata(), Err(Error::ShutDown));
    assert_eq!(agent.deregister(buf.as_ptr() as u64), Err(Error::ShutDown));
    assert_eq!(agent.notify("nobody", b"x"), Err(Error::ShutDown));
    assert_eq!(agent.take_notifications(), Err(Error::ShutDown));
    assert_eq!(agent.connect("127.0.0.1:1"), Err(Error::ShutDown));
    // The side channel is gone.
    assert!(std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err());
}

/// A rail that is no interface of this host fails `Agent::new` naming it,
/// over several rails or one, UCX and libfabric alike.
#[test]
fn missing_rail_is_named() {
    let mut backends = vec!["UCX"];
    if cfg!(feature = "libfabric") {
        backends.push("LIBFABRIC");
    }
    for backend in backends {
        for rails in [&["lo", "nosuch0"][..], &["nosuch0"]] {
            let cfg = AgentConfig::default()
                .with_backend(backend)
                .with_listen(None)
                .with_rails(rails);
            let e = Agent::new("missing-rail", cfg).unwrap_err();
            assert_eq!(
                e.to_string(),
                format!("{backend} error -1: rail nosuch0: no such network interface or RDMA device here"),
                "{rails:?}"
            );
        }
    }
}
