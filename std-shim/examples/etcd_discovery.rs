//! Discovery through etcd: two agents without a side channel publish their
//! metadata in etcd, find each other by name, and one WRITEs a block into
//! the other with a notification.
//!
//! Needs the `etcd` feature (which needs `protoc` to build; Debian:
//! protobuf-compiler) and an etcd server, by default on
//! `http://127.0.0.1:2379` (`KVXFER_EXAMPLE_ETCD` names others, comma
//! separated). `scripts/setup.sh --test` installs both; then:
//!
//! ```sh
//! etcd --data-dir /tmp/kvxfer-example-etcd &
//! cargo run -p kvxfer --features etcd --example etcd_discovery
//! ```
#![allow(clippy::result_large_err)]

use std::time::{Duration, Instant};

use kvxfer::etcd::{EtcdConfig, EtcdDiscovery};
use kvxfer::{Agent, AgentConfig, Desc, Error, WaitOutcome, XferOp};

const LEN: usize = 64 * 1024;

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("etcd_discovery: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Error> {
    let endpoints = std::env::var("KVXFER_EXAMPLE_ETCD")
        .unwrap_or_else(|_| "http://127.0.0.1:2379".to_string());
    // A namespace of its own, so that runs never see each other's agents.
    let prefix = format!("/kvxfer-example/{}/", std::process::id());
    let cfg = || EtcdConfig::new(&endpoints).with_prefix(prefix.as_str());

    let store = Agent::new("kv-store", AgentConfig::default().with_listen(None))?;
    let engine = Agent::new("engine", AgentConfig::default().with_listen(None))?;
    let mut far = vec![0u8; LEN];
    let mut near = vec![0x5au8; LEN];
    // SAFETY: both buffers outlive their registrations (deregistered
    // below); `far` is read only after the notification that follows the
    // data.
    unsafe {
        store.register_slice(&mut far)?;
        engine.register_slice(&mut near)?;
    }
    let start = |agent: &Agent| {
        EtcdDiscovery::start(agent, cfg()).inspect_err(|_| {
            eprintln!(
                "etcd_discovery: needs an etcd at {endpoints}: start one with \
                 `etcd --data-dir /tmp/kvxfer-example-etcd` or set KVXFER_EXAMPLE_ETCD"
            )
        })
    };
    let store_etcd = start(&store)?;
    let engine_etcd = start(&engine)?;

    // Each finds the other by name; their metadata comes from etcd.
    let peer = engine_etcd.fetch("kv-store", Duration::from_secs(10))?;
    store_etcd.fetch("engine", Duration::from_secs(10))?;
    println!("engine found {peer:?} in etcd under {prefix}");

    let req = engine.submit(
        XferOp::Write,
        &[Desc::new(near.as_ptr() as u64, LEN as u64)],
        &[Desc::new(far.as_ptr() as u64, LEN as u64)],
        &peer,
        Some(b"block 0 ready"),
    )?;
    match req.wait(Duration::from_secs(10)) {
        WaitOutcome::Done => {}
        WaitOutcome::Failed(e) => return Err(e),
        WaitOutcome::InProgress => return Err(Error::TimedOut { after_ms: 10_000 }),
    }
    drop(req);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let notes = store.wait_notifications(Duration::from_millis(100))?;
        if let Some(m) = notes.get("engine") {
            println!("kv-store got {:?}", String::from_utf8_lossy(&m[0]));
            break;
        }
        if Instant::now() > deadline {
            return Err(Error::TimedOut { after_ms: 10_000 });
        }
    }
    // SAFETY: the WRITE is complete: its notification arrived after it.
    let arrived = unsafe { std::slice::from_raw_parts(far.as_ptr(), LEN) };
    assert!(arrived.iter().all(|&b| b == 0x5a));
    println!("all {LEN} bytes arrived");

    // Leaving revokes each agent's lease: its entry goes at once.
    drop(engine_etcd);
    drop(store_etcd);
    engine.deregister(near.as_ptr() as u64)?;
    store.deregister(far.as_ptr() as u64)?;
    engine.shutdown();
    store.shutdown();
    Ok(())
}
