//! Two processes: an initiator WRITEs 16 blocks of 4 KiB into a target's
//! buffer and sends a notification that arrives after the data; the target
//! waits for it and checks every byte.
//!
//! ```sh
//! cargo run -p kvxfer --example write_notify            # both roles, this one spawns the target
//! KVXFER_BACKEND=LIBFABRIC cargo run -p kvxfer --example write_notify
//! ```
//!
//! Run as `write_notify target`, the process is the target: it prints
//! `ready ADDR BUFFER` (its side channel and its buffer's address) and
//! exits 0 once the data it was told about is in its buffer.
#![allow(clippy::result_large_err)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kvxfer::{Agent, AgentConfig, Desc, Error, WaitOutcome, XferOp};

const BLOCK: usize = 4096;
const BLOCKS: usize = 16;
const NOTE: &[u8] = b"layer 0 ready";

/// Byte `i` of block `b` as the initiator writes it.
fn pattern(b: usize, i: usize) -> u8 {
    (b * 31 + i * 7) as u8
}

fn target() -> Result<(), Error> {
    let agent = Agent::new("example-target", AgentConfig::default())?;
    let mut buf = vec![0u8; BLOCK * BLOCKS];
    // SAFETY: `buf` outlives its registration (deregistered below) and is
    // read only after the notification, which arrives after the data.
    unsafe { agent.register_slice(&mut buf)? };
    let addr = agent.listen_addr().expect("a side channel");
    println!("ready {addr} {}", buf.as_ptr() as u64);
    let deadline = Instant::now() + Duration::from_secs(20);
    let from = loop {
        let notes = agent.wait_notifications(Duration::from_millis(100))?;
        if let Some((peer, _)) = notes.iter().find(|(_, m)| m.iter().any(|m| m == NOTE)) {
            break peer.clone();
        }
        if Instant::now() > deadline {
            return Err(Error::TimedOut { after_ms: 20_000 });
        }
    };
    // SAFETY: the WRITE is complete: its notification arrived after it.
    let data = unsafe { std::slice::from_raw_parts(buf.as_ptr(), buf.len()).to_vec() };
    let wrong = (0..BLOCKS * BLOCK)
        .filter(|&i| data[i] != pattern(i / BLOCK, i % BLOCK))
        .count();
    agent.deregister(buf.as_ptr() as u64)?;
    agent.shutdown();
    if wrong > 0 {
        eprintln!("target: {wrong} bytes differ from what {from} wrote");
        std::process::exit(1);
    }
    println!(
        "target: {:?} from {from}; all {} bytes arrived",
        String::from_utf8_lossy(NOTE),
        data.len()
    );
    Ok(())
}

fn initiator() -> Result<(), Box<dyn std::error::Error>> {
    let mut child = Command::new(std::env::current_exe()?)
        .arg("target")
        .stdout(Stdio::piped())
        .spawn()?;
    let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
    let ready = lines
        .next()
        .ok_or("the target exited before it was ready")??;
    let mut words = ready.split_whitespace().skip(1);
    let (addr, remote) = match (words.next(), words.next().map(str::parse::<u64>)) {
        (Some(a), Some(Ok(r))) => (a.to_string(), r),
        _ => return Err(format!("the target said {ready:?}").into()),
    };

    let agent = Agent::new("example-initiator", AgentConfig::default())?;
    let mut buf: Vec<u8> = (0..BLOCKS * BLOCK)
        .map(|i| pattern(i / BLOCK, i % BLOCK))
        .collect();
    // SAFETY: `buf` outlives its registration and is not touched while the
    // WRITE runs.
    unsafe { agent.register_slice(&mut buf)? };
    let peer = agent.connect(&addr)?;
    let base = buf.as_ptr() as u64;
    let local: Vec<Desc> = (0..BLOCKS as u64)
        .map(|b| Desc::new(base + b * BLOCK as u64, BLOCK as u64))
        .collect();
    let far: Vec<Desc> = (0..BLOCKS as u64)
        .map(|b| Desc::new(remote + b * BLOCK as u64, BLOCK as u64))
        .collect();
    let req = agent.submit(XferOp::Write, &local, &far, &peer, Some(NOTE))?;
    match req.wait(Duration::from_secs(10)) {
        WaitOutcome::Done => println!(
            "initiator: wrote {BLOCKS} blocks of {BLOCK} bytes to {peer} via {} (post {} ns)",
            agent.peer_path(&peer)?,
            req.telemetry()?.post_nanos
        ),
        WaitOutcome::Failed(e) => return Err(e.into()),
        WaitOutcome::InProgress => return Err("the WRITE took longer than 10 s".into()),
    }
    drop(req);
    for line in lines.map_while(Result::ok) {
        println!("{line}");
    }
    let status = child.wait()?;
    agent.deregister(base)?;
    agent.shutdown();
    if !status.success() {
        return Err(format!("the target failed: {status}").into());
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let (role, r) = match std::env::args().nth(1).as_deref() {
        Some("target") => ("target", target().map_err(Into::into)),
        None => ("initiator", initiator()),
        Some(other) => (
            "write_notify",
            Err(format!("unknown role {other:?}; run with no argument").into()),
        ),
    };
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{role}: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
