//! A peer removed from the address vector while `ofi_rxm` holds a
//! connection record without an endpoint, between two processes.
//!
//! libfabric 1.17 to 2.x close the connection of a removed address
//! (`FI_AV_REMOVE_CLEANUP=1`) without checking that it has an endpoint:
//! after opening one failed (here: out of file descriptors), or after a
//! simultaneous connect was lost to the peer's, `fi_av_remove` closed a
//! NULL endpoint and the process died with SIGSEGV. The transport now
//! removes an address only on an established connection.

use std::fs::File;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kvxfer_core::{Error, Transport};
use kvxfer_libfabric::{FabricConfig, FabricTransport, BACKEND};

const ADDRESS_ENV: &str = "KVXFER_REMOVE_UNCONNECTED_PEER";
/// `EMFILE`, as libfabric returns it.
const EMFILE: i64 = -24;

fn config() -> FabricConfig {
    FabricConfig::default()
        .with_provider("tcp;ofi_rxm")
        .with_interface("lo")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

/// Child: a notification to the parent fails for want of file
/// descriptors (rxm keeps the connection record, without endpoint), the
/// peer is disconnected (removed from the address vector), then connected
/// again and sent `after`.
#[test]
#[ignore = "child role of this file's test; it spawns it"]
fn child_disconnects_a_peer_whose_connection_failed() {
    let Some(address) = std::env::var_os(ADDRESS_ENV) else {
        return;
    };
    let address = unhex(address.to_str().expect("hex address"));
    let mut t = FabricTransport::new(&config()).expect("tcp;ofi_rxm on lo");
    let peer = t.connect(&address).expect("connect");
    // Use up the file descriptors (the parent set a low limit).
    let mut held = Vec::new();
    loop {
        match File::open("/dev/null") {
            Ok(f) => held.push(f),
            Err(e) if e.raw_os_error() == Some(24) => break,
            Err(e) => panic!("open /dev/null: {e}"),
        }
    }
    let sent = t.send_notification(&peer, b"lost");
    drop(held);
    assert_eq!(
        sent,
        Err(Error::backend(
            BACKEND,
            EMFILE,
            "fi_send (notification): Too many open files"
        ))
    );
    println!("@SEND failed");
    t.disconnect(peer);
    println!("@DISCONNECT done");
    // The transport still works: the same address again.
    let peer = t.connect(&address).expect("connect again");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match t.send_notification(&peer, b"after") {
            Ok(()) => break,
            Err(e) => assert!(Instant::now() < deadline, "send after: {e}"),
        }
        let _ = t.poll();
    }
    // Progress until the parent saw it (it closes our stdin then).
    let mut line = String::new();
    let reader = std::thread::spawn(move || std::io::stdin().read_line(&mut line));
    while !reader.is_finished() {
        let _ = t.poll();
        std::thread::sleep(Duration::from_millis(1));
    }
    t.disconnect(peer);
    println!("@DONE");
}

#[test]
fn disconnecting_a_peer_whose_connection_failed_does_not_crash() {
    let mut rx = FabricTransport::new(&config()).expect("tcp;ofi_rxm on lo");
    let mut address = vec![0u8; 512];
    let n = rx.local_address(&mut address).expect("address");
    address.truncate(n);
    let exe = std::env::current_exe().expect("current exe");
    // A low limit, so that the child runs out of descriptors quickly.
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(
            "ulimit -n 256 && exec \"$0\" --ignored --exact \
              child_disconnects_a_peer_whose_connection_failed --nocapture",
        )
        .arg(exe)
        .env(ADDRESS_ENV, hex(&address))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn child");
    let mut buf = [0u8; 64];
    let deadline = Instant::now() + Duration::from_secs(60);
    let got = loop {
        let _ = rx.poll();
        if let Some(r) = rx.poll_notification(&mut buf) {
            break buf[..r.expect("notification")].to_vec();
        }
        if let Some(status) = child.try_wait().expect("wait") {
            panic!("child ended before its notification arrived: {status}");
        }
        assert!(Instant::now() < deadline, "no notification from the child");
        std::thread::sleep(Duration::from_millis(1));
    };
    assert_eq!(got, b"after");
    drop(child.stdin.take());
    let out = child.wait_with_output().expect("child output");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "child: {} {text}", out.status);
    for tag in ["@SEND failed", "@DISCONNECT done", "@DONE"] {
        assert!(text.contains(tag), "no {tag} in: {text}");
    }
}
