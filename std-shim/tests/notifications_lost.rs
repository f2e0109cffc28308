//! Notifications a full receive queue drops are never lost in silence: the
//! receiving application's `take_notifications` fails with
//! `NotificationsLost` naming the sender and the count, and every message
//! sent is either delivered or counted lost.
//!
//! The test binary re-runs itself as the sender (`ROLE=sender`): it
//! connects to the address in `ADDR`, sends [`SENT`] notifications and
//! prints `SENDER done`, then waits for its stdin to close.
#![cfg(feature = "ucx")]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kvxfer::config::UcxConfig;
use kvxfer::{Agent, AgentConfig, Error};

#[allow(dead_code)]
mod common;
use common::ChildGuard;

const ROLE: &str = "KVXFER_LOST_TEST_ROLE";
const ADDR: &str = "KVXFER_LOST_TEST_ADDR";
/// Notifications the sender sends.
const SENT: usize = 200;
/// The receiver's UCX notification queue.
const QUEUE: u32 = 4;

fn run_sender() {
    let addr = std::env::var(ADDR).unwrap();
    let agent = Agent::new("noisy-sender", AgentConfig::default().with_backend("UCX")).unwrap();
    let peer = agent.connect(&addr).unwrap();
    for i in 0..SENT {
        agent.notify(&peer, format!("n{i}").as_bytes()).unwrap();
    }
    // Let the messages leave before saying so.
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(500) {
        agent.make_progress().unwrap();
    }
    println!("SENDER done");
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    agent.shutdown();
}

#[test]
#[ignore = "child role of this file's tests; they spawn it"]
fn sender_entry() {
    if std::env::var(ROLE).as_deref() == Ok("sender") {
        run_sender();
    }
}

#[test]
fn a_full_queue_reports_lost_notifications_with_their_sender() {
    let mut ucx = UcxConfig::default();
    ucx.notification_queue = QUEUE;
    // No progress thread: nothing drains the queue until we ask.
    let cfg = AgentConfig::default()
        .with_backend("UCX")
        .with_progress_thread(false)
        .with_ucx_config(ucx)
        .with_metrics(true);
    let agent = Agent::new("quiet-target", cfg).unwrap();
    let addr = agent.listen_addr().unwrap().to_string();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "sender_entry", "--ignored", "--nocapture"])
        .env(ROLE, "sender")
        .env(ADDR, &addr)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = BufReader::new(child.stdout.take().unwrap());
    let _guard = ChildGuard(child);
    for line in out.lines() {
        if line.unwrap().contains("SENDER done") {
            break;
        }
    }
    let (mut got, mut lost) = (Vec::new(), 0u64);
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.len() as u64 + lost < SENT as u64 && Instant::now() < deadline {
        match agent.take_notifications() {
            Ok(mut by_peer) => {
                got.extend(by_peer.remove("noisy-sender").unwrap_or_default());
                assert!(by_peer.is_empty(), "other senders: {by_peer:?}");
            }
            Err(Error::NotificationsLost { peer, count }) => {
                assert_eq!(peer.as_str(), "noisy-sender", "lost from whom");
                lost += count;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(
        got.len() as u64 + lost,
        SENT as u64,
        "every notification is delivered or reported lost ({} delivered, {lost} lost)",
        got.len()
    );
    assert!(lost > 0, "the queue of {QUEUE} never overflowed");
    // What was delivered is in the order sent.
    let seq: Vec<usize> = got
        .iter()
        .map(|m| String::from_utf8_lossy(&m[1..]).parse().unwrap())
        .collect();
    assert!(seq.windows(2).all(|w| w[0] < w[1]), "out of order: {seq:?}");
    // The metrics count the same, under the sender's name.
    let snap = agent.metrics().snapshot();
    let p = snap.peer("noisy-sender").expect("sender's series");
    assert_eq!(p.notifications_received, got.len() as u64);
    assert_eq!(p.notifications_lost, lost);
    agent.shutdown();
}
