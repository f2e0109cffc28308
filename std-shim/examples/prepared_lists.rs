//! Prepared descriptor lists: both sides' block tables are resolved once
//! (`prep_local`, `prep_remote`), then each request picks blocks by index
//! (`make_xfer`), as an engine's KV-cache connector does, and a request
//! made once is posted again without allocating (`repost`).
//!
//! ```sh
//! cargo run -p kvxfer --example prepared_lists
//! ```
//!
//! Both agents live in this process to keep the example short; across
//! processes only `connect` differs (see the `write_notify` example).
#![allow(clippy::result_large_err)]

use std::time::Duration;

use kvxfer::{Agent, AgentConfig, Desc, Error, WaitOutcome, XferOp, XferRequest};

const BLOCK: u64 = 16 * 1024;
const BLOCKS: u64 = 64;

fn wait(req: &XferRequest) -> Result<(), Error> {
    match req.wait(Duration::from_secs(10)) {
        WaitOutcome::Done => Ok(()),
        WaitOutcome::Failed(e) => Err(e),
        WaitOutcome::InProgress => Err(Error::TimedOut { after_ms: 10_000 }),
    }
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("prepared_lists: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Error> {
    // The cache that receives blocks, and the engine that sends them.
    let store = Agent::new("kv-store", AgentConfig::default())?;
    let engine = Agent::new("engine", AgentConfig::default())?;
    let mut far = vec![0u8; (BLOCK * BLOCKS) as usize];
    let mut near: Vec<u8> = (0..BLOCK * BLOCKS).map(|i| (i / BLOCK) as u8).collect();
    // SAFETY: both buffers outlive their registrations (deregistered
    // below) and are read only after the transfers that write them ended.
    unsafe {
        store.register_slice(&mut far)?;
        engine.register_slice(&mut near)?;
    }
    let peer = engine.connect(&store.listen_addr().expect("side channel").to_string())?;

    // Each side's block table, resolved once.
    let table = |base: u64| -> Vec<Desc> {
        (0..BLOCKS)
            .map(|b| Desc::new(base + b * BLOCK, BLOCK))
            .collect()
    };
    let local = engine.prep_local(&table(near.as_ptr() as u64))?;
    let remote = engine.prep_remote(&peer, &table(far.as_ptr() as u64))?;

    // Blocks 3, 7 and 8 of the engine into slots 0, 1 and 2 of the store.
    let req = engine.make_xfer(XferOp::Write, local, &[3, 7, 8], remote, &[0, 1, 2], None)?;
    req.post()?;
    wait(&req)?;
    // The same request again, without building anything.
    req.repost()?;
    wait(&req)?;
    let t = req.telemetry()?;
    println!(
        "moved blocks [3, 7, 8] into slots [0, 1, 2]: {} bytes, {} segments, post {} ns",
        t.bytes, t.segments, t.post_nanos
    );
    drop(req);

    // Each block's bytes hold its number; slot 3 was not written.
    for (slot, block) in [(0u64, Some(3u8)), (1, Some(7)), (2, Some(8)), (3, None)] {
        let at = (slot * BLOCK) as usize;
        // SAFETY: the transfers into `far` are complete.
        let first = unsafe { std::ptr::read_volatile(far.as_ptr().add(at)) };
        match block {
            Some(_) => println!("store slot {slot}: block {first}"),
            None => println!("store slot {slot}: untouched ({first})"),
        }
        assert_eq!(first, block.unwrap_or(0), "slot {slot}");
    }

    engine.release_local(local)?;
    engine.release_remote(remote)?;
    engine.deregister(near.as_ptr() as u64)?;
    store.deregister(far.as_ptr() as u64)?;
    engine.shutdown();
    store.shutdown();
    Ok(())
}
