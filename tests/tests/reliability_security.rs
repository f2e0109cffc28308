//! The side channel end to end: bounded frames, idle and slow connections
//! closed, and the pre-shared key (config or `KVXFER_AUTH_KEY`) required in
//! both directions — a peer without it, or with a wrong one, can neither
//! fetch our metadata nor push its own.
#![allow(clippy::result_large_err)]

mod reliability_common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use kvxfer::side_channel::{read_frame, write_frame, Client, MAX_FRAME};
use kvxfer::{Agent, AgentConfig, Error, XferOp};
use reliability_common::{pattern, read_all, Buf, Target, TargetSpec};

const ENTRY: &str = "child_entry";

#[test]
#[ignore = "child role of this file's tests; they spawn it"]
fn child_entry() {
    reliability_common::maybe_run_target();
}

fn agent(name: &str, key: Option<&str>) -> Agent {
    let mut c = AgentConfig::default()
        .with_backend("UCX")
        .with_io_timeout(Duration::from_millis(500))
        .with_idle_timeout(Duration::from_millis(500));
    // An explicit empty key turns authentication off whatever the
    // environment says.
    c = c.with_auth_key(key.unwrap_or(""));
    Agent::new(name, c).expect("agent")
}

/// Reads until the server closes; returns how long that took, or `None`
/// if it was still open after `limit`.
fn closed_within(s: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let t = Instant::now();
    s.set_read_timeout(Some(limit)).unwrap();
    let mut b = [0u8; 256];
    loop {
        match s.read(&mut b) {
            Ok(0) => return Some(t.elapsed()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return None
            }
            Err(_) => return Some(t.elapsed()),
        }
        if t.elapsed() > limit {
            return None;
        }
    }
}

fn raw(agent: &Agent) -> TcpStream {
    let mut s = TcpStream::connect(agent.listen_addr().unwrap()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let hello = read_frame(&mut s, 64).expect("hello");
    assert_eq!(&hello[..2], b"KX");
    s
}

#[test]
fn bounded_frames_idle_and_slow_connections() {
    let a = agent("sec-srv", None);
    let limit = Duration::from_secs(3);
    // An oversized length prefix: refused with an error frame, then closed,
    // without the server allocating or waiting for the announced bytes.
    let mut s = raw(&a);
    s.write_all(&u32::MAX.to_le_bytes()).unwrap();
    let reply = read_frame(&mut s, 4096).expect("error reply");
    assert_eq!(reply[0], 1, "status ERR");
    let text = String::from_utf8_lossy(&reply[1..]).to_string();
    assert!(
        text.contains(&format!("{}", u32::MAX)) && text.contains(&MAX_FRAME.to_string()),
        "{text}"
    );
    let oversized = closed_within(&mut s, limit).expect("closed after an oversized frame");
    // Idle: no request at all.
    let mut s = raw(&a);
    let idle = closed_within(&mut s, limit).expect("idle connection closed");
    assert!(
        idle >= Duration::from_millis(400),
        "closed too early: {idle:?}"
    );
    // Slowloris: half a header, then silence.
    let mut s = raw(&a);
    s.write_all(&[8]).unwrap();
    let half = closed_within(&mut s, limit).expect("half-header connection closed");
    // Slowloris: a frame's bytes trickled one every 200 ms, each within
    // the I/O timeout; the frame as a whole must not take forever.
    let mut s = raw(&a);
    s.write_all(&64u32.to_le_bytes()).unwrap();
    let t = Instant::now();
    let mut trickle_closed = None;
    for _ in 0..64 {
        std::thread::sleep(Duration::from_millis(200));
        if s.write_all(&[2]).is_err() {
            trickle_closed = Some(t.elapsed());
            break;
        }
        if let Some(_d) = closed_within_nonblocking(&mut s) {
            trickle_closed = Some(t.elapsed());
            break;
        }
        if t.elapsed() > Duration::from_secs(5) {
            break;
        }
    }
    let trickle = trickle_closed.expect("a trickling client is still served after 5 s");
    assert!(
        trickle < Duration::from_secs(2),
        "trickling client served for {trickle:?}"
    );
    // The server still serves well-behaved clients.
    let md = Client::connect(&a.listen_addr().unwrap().to_string(), None, limit)
        .unwrap()
        .get_metadata()
        .unwrap();
    assert!(!md.is_empty());
    println!(
        "RESULT side channel: oversized prefix closed in {oversized:?}, idle closed after {idle:?}, \
         half header closed after {half:?}, trickle closed after {trickle:?}"
    );
    a.shutdown();
}

/// Whether the peer has closed, without blocking long.
fn closed_within_nonblocking(s: &mut TcpStream) -> Option<()> {
    s.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
    let mut b = [0u8; 64];
    match s.read(&mut b) {
        Ok(0) => Some(()),
        Ok(_) => Some(()),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            None
        }
        Err(_) => Some(()),
    }
}

fn side_err(r: Result<String, Error>) -> String {
    match r {
        Err(Error::Backend {
            backend: "SIDE_CHANNEL",
            text,
            ..
        }) => text.as_str().to_string(),
        other => panic!("expected a side-channel error, got {other:?}"),
    }
}

#[test]
fn auth_key_required_both_ways() {
    let srv = agent("sec-keyed", Some("s3cret"));
    let addr = srv.listen_addr().unwrap().to_string();
    // No key: refused, nothing fetched, nothing pushed.
    let none = agent("sec-nokey", None);
    assert!(side_err(none.connect(&addr)).contains("requires KVXFER_AUTH_KEY"));
    assert!(!none.has_remote("sec-keyed").unwrap());
    assert!(!srv.has_remote("sec-nokey").unwrap());
    // Wrong key: refused both ways.
    let wrong = agent("sec-wrong", Some("guess"));
    assert!(side_err(wrong.connect(&addr)).contains("authentication failed"));
    assert!(!wrong.has_remote("sec-keyed").unwrap());
    assert!(!srv.has_remote("sec-wrong").unwrap());
    // A raw client that skips the challenge gets neither GET nor PUSH.
    let mut s = raw(&srv);
    write_frame(&mut s, &[0x02]).unwrap();
    let reply = read_frame(&mut s, 4096).unwrap();
    assert_eq!(reply[0], 1, "GET without auth must be refused");
    let mut s = raw(&srv);
    let mut push = vec![0x03];
    push.extend_from_slice(&wrong.local_metadata().unwrap());
    write_frame(&mut s, &push).unwrap();
    let reply = read_frame(&mut s, 4096).unwrap();
    assert_eq!(reply[0], 1, "PUSH without auth must be refused");
    assert!(!srv.has_remote("sec-wrong").unwrap());
    // The keyed agent refuses a server that does not ask for the key.
    let open = agent("sec-open", None);
    assert!(
        side_err(srv.connect(&open.listen_addr().unwrap().to_string()))
            .contains("does not authenticate")
    );
    assert!(!srv.has_remote("sec-open").unwrap());
    assert!(!open.has_remote("sec-keyed").unwrap());
    // The right key: both sides load each other.
    let good = agent("sec-good", Some("s3cret"));
    assert_eq!(good.connect(&addr).unwrap(), "sec-keyed");
    assert!(srv.has_remote("sec-good").unwrap());
    for a in [srv, none, wrong, open, good] {
        a.shutdown();
    }
}

#[test]
fn auth_key_from_environment_between_processes() {
    // The target reads KVXFER_AUTH_KEY from its environment.
    let t = Target::spawn(TargetSpec {
        entry: ENTRY,
        name: "sec-env-target",
        backend: "UCX",
        provider: None,
        len: 4096,
        seed: 41,
        env: vec![("KVXFER_AUTH_KEY", "env-key".to_string())],
        prefix: Vec::new(),
    });
    let wrong = agent("sec-env-wrong", Some("other-key"));
    assert!(side_err(wrong.connect(&t.addr)).contains("authentication failed"));
    let none = agent("sec-env-none", None);
    assert!(side_err(none.connect(&t.addr)).contains("requires KVXFER_AUTH_KEY"));
    let good = agent("sec-env-good", Some("env-key"));
    assert_eq!(good.connect(&t.addr).unwrap(), "sec-env-target");
    let dst = Buf::zeroed(4096);
    dst.register(&good);
    assert_eq!(
        read_all(&good, &dst, &t, "sec-env-target"),
        pattern(41, 4096)
    );
    let _ = XferOp::Read;
    for a in [wrong, none, good] {
        a.shutdown();
    }
}
