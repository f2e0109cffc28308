//! Cluster discovery through a real etcd server: three agents in separate
//! processes, without side channels, find each other only through etcd and
//! move data (verified byte for byte); one is killed and the others see its
//! entry expire with its lease, after which transfers to it fail with
//! `UnknownPeer`; it comes back as a new process with new metadata and is
//! used again; one stops cleanly and its entry goes at once.
//!
//! The etcd server (Debian package `etcd-server`, installed by
//! `scripts/setup.sh`) runs on 127.0.0.1 on free ports with a temporary
//! data directory. Without an `etcd` binary the tests fail, naming the package.
#![allow(clippy::result_large_err)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kvxfer::etcd::{EtcdConfig, EtcdDiscovery, ETCD};
use kvxfer::{Agent, AgentConfig, Desc, Error, MemKind, WaitOutcome, XferOp};
use kvxfer_core::wire::Metadata;

const ROLE: &str = "KVXFER_ETCD_ROLE";
/// Served buffer, read by peers.
const SRC: usize = 48 << 10;
/// Buffer peers write into (a different length, so that a peer's regions
/// can be told apart in its metadata).
const INBOX: usize = 80 << 10;
/// Local landing area of READs.
const SCRATCH: usize = 2 * SRC + 4096;
const LEASE: Duration = Duration::from_secs(2);

/// The bytes agent `name` serves in its `generation`-th life.
fn pattern(name: &str, generation: u64, len: usize) -> Vec<u8> {
    let seed = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    }) ^ generation.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    kvxfer_testkit::pattern(seed | 1, len)
}

/// A heap buffer registered with the agent; deregistered, then freed.
struct Registered {
    agent: Agent,
    ptr: *mut u8,
    len: usize,
}

impl Registered {
    fn new(agent: &Agent, content: Vec<u8>) -> Registered {
        let len = content.len();
        let ptr = Box::into_raw(content.into_boxed_slice()).cast::<u8>();
        // SAFETY: the block stays allocated until `Drop`, which deregisters
        // it first; it is read only after the transfers into it are done.
        unsafe { agent.register(ptr as u64, len as u64, 0, MemKind::Dram) }.unwrap();
        Registered {
            agent: agent.clone(),
            ptr,
            len,
        }
    }

    fn addr(&self) -> u64 {
        self.ptr as u64
    }

    fn bytes(&self, off: usize, len: usize) -> Vec<u8> {
        assert!(off + len <= self.len);
        // SAFETY: in bounds of the live block; no transfer into it runs.
        unsafe { std::slice::from_raw_parts(self.ptr.add(off), len).to_vec() }
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        match self.agent.deregister(self.addr()) {
            Ok(_) | Err(Error::ShutDown) => {
                // SAFETY: made by `Box::into_raw` of a slice of `len` bytes.
                drop(unsafe {
                    Box::from_raw(std::ptr::slice_from_raw_parts_mut(self.ptr, self.len))
                });
            }
            // Never free memory a peer could still write into.
            Err(e) => eprintln!("deregistering failed ({e}); leaking the buffer"),
        }
    }
}

fn run(agent: &Agent, op: XferOp, local: Desc, remote: Desc, peer: &str) -> Result<(), String> {
    let req = agent
        .submit(op, &[local], &[remote], peer, None)
        .map_err(|e| format!("{} to {peer}: {e}", op.name()))?;
    match req.wait(Duration::from_secs(10)) {
        WaitOutcome::Done => Ok(()),
        other => Err(format!("{} to {peer}: {other:?}", op.name())),
    }
}

/// The child: an agent published in etcd, driven by lines on stdin.
fn agent_role() {
    let env = |k: &str| std::env::var(k).unwrap();
    let name = env("KVXFER_ETCD_NAME");
    let generation: u64 = env("KVXFER_ETCD_GEN").parse().unwrap();
    let cfg = AgentConfig::default().with_backend("UCX").with_listen(None);
    let agent = Agent::new(&name, cfg).unwrap();
    let src = Registered::new(&agent, pattern(&name, generation, SRC));
    let inbox = Registered::new(&agent, vec![0; INBOX]);
    let scratch = Registered::new(&agent, vec![0; SCRATCH]);
    let ecfg = EtcdConfig::new(&env("KVXFER_ETCD_URL"))
        .with_prefix(env("KVXFER_ETCD_PREFIX"))
        .with_lease_ttl(LEASE)
        .with_timeout(Duration::from_secs(3));
    let discovery = EtcdDiscovery::start(&agent, ecfg).unwrap();
    println!("ETCD ready {}", discovery.key());

    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    while let Ok(line) = rx.recv() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let result = match words.as_slice() {
            ["xfer", peer, peer_gen] => xfer(
                &agent,
                &discovery,
                (&src, &scratch),
                peer,
                peer_gen.parse().unwrap(),
            ),
            [] => continue,
            ["gone", peer, ms] => gone(&agent, &discovery, &scratch, peer, ms.parse().unwrap()),
            _ => Err(format!("unknown command {line:?}")),
        };
        match result {
            Ok(what) => println!("ETCD ok {what}"),
            Err(e) => println!("ETCD err {e}"),
        }
    }
    // Standard input closed: leave etcd (the lease is revoked), then stop.
    drop(discovery);
    drop((src, inbox, scratch));
    agent.shutdown();
    println!("ETCD bye");
}

/// Finds `peer` through etcd, READs its served buffer and checks it,
/// WRITEs ours into its inbox and READs that back.
fn xfer(
    agent: &Agent,
    discovery: &EtcdDiscovery,
    (src, scratch): (&Registered, &Registered),
    peer: &str,
    peer_gen: u64,
) -> Result<String, String> {
    discovery
        .fetch(peer, Duration::from_secs(10))
        .map_err(|e| format!("fetch {peer}: {e}"))?;
    let blob = discovery
        .peer_metadata(peer)
        .ok_or_else(|| format!("{peer}: no metadata after fetch"))?;
    let meta = Metadata::decode(&blob).map_err(|e| format!("{peer}: {e}"))?;
    let find = |len: usize| {
        meta.regions()
            .find(|r| r.region.len == len as u64)
            .map(|r| r.region.addr)
            .ok_or_else(|| format!("{peer} has no region of {len} bytes"))
    };
    let (their_src, their_inbox) = (find(SRC)?, find(INBOX)?);
    let len = SRC as u64;
    run(
        agent,
        XferOp::Read,
        Desc::new(scratch.addr(), len),
        Desc::new(their_src, len),
        peer,
    )?;
    if scratch.bytes(0, SRC) != pattern(peer, peer_gen, SRC) {
        return Err(format!(
            "READ from {peer}: bytes differ from its generation {peer_gen}"
        ));
    }
    run(
        agent,
        XferOp::Write,
        Desc::new(src.addr(), len),
        Desc::new(their_inbox, len),
        peer,
    )?;
    run(
        agent,
        XferOp::Read,
        Desc::new(scratch.addr() + len, len),
        Desc::new(their_inbox, len),
        peer,
    )?;
    if scratch.bytes(SRC, SRC) != src.bytes(0, SRC) {
        return Err(format!(
            "WRITE to {peer}: its inbox does not hold our bytes"
        ));
    }
    Ok(format!("xfer {peer}"))
}

/// Waits for `peer`'s entry to go, then checks that a transfer to it
/// fails with `UnknownPeer` naming it.
fn gone(
    agent: &Agent,
    discovery: &EtcdDiscovery,
    scratch: &Registered,
    peer: &str,
    ms: u64,
) -> Result<String, String> {
    let t0 = Instant::now();
    if !discovery.wait_gone(peer, Duration::from_millis(ms)) {
        return Err(format!("{peer} still in etcd after {ms} ms"));
    }
    let waited = t0.elapsed().as_millis();
    if agent.has_remote(peer) != Ok(false) {
        return Err(format!("{peer} left etcd but is still loaded"));
    }
    if discovery.peers().iter().any(|p| p == peer) {
        return Err(format!("{peer} left etcd but is still listed"));
    }
    let local = Desc::new(scratch.addr(), 64);
    let remote = Desc::new(0x1000, 64);
    match agent.submit(XferOp::Read, &[local], &[remote], peer, None) {
        Err(Error::UnknownPeer { peer: p }) if p.as_str() == peer => {
            Ok(format!("gone {peer} after {waited} ms"))
        }
        Err(e) => Err(format!("transfer to vanished {peer}: {e:?}")),
        Ok(_) => Err(format!("transfer to vanished {peer} was accepted")),
    }
}

#[test]
#[ignore = "child role of this file's tests; they spawn it"]
fn etcd_child() {
    if std::env::var(ROLE).as_deref() == Ok("agent") {
        agent_role();
    }
}

/// An etcd server on free loopback ports, killed and its data removed on
/// drop.
struct EtcdServer {
    child: Child,
    dir: PathBuf,
    url: String,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl EtcdServer {
    /// `None` when no `etcd` binary is installed.
    fn start() -> Option<EtcdServer> {
        let installed = Command::new("etcd")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !installed {
            return None;
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let dir =
            std::env::temp_dir().join(format!("kvxfer-etcd-test-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (client, peer) = (free_port(), free_port());
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = std::fs::File::create(dir.join("etcd.log")).unwrap();
        let child = Command::new("etcd")
            .args(["--name", "kvxfer-test", "--data-dir"])
            .arg(dir.join("data"))
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("kvxfer-test={peer_url}")])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let server = EtcdServer { child, dir, url };
        let deadline = Instant::now() + Duration::from_secs(15);
        while !server.healthy(client) {
            assert!(
                Instant::now() < deadline,
                "etcd not healthy within 15 s; log:\n{}",
                server.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(server)
    }

    fn healthy(&self, port: u16) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        let req = "GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
        let mut out = String::new();
        s.write_all(req.as_bytes()).is_ok()
            && s.read_to_string(&mut out).is_ok()
            && out.contains("\"health\":\"true\"")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default()
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One agent process; killed on drop unless it has exited.
struct AgentProc {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl AgentProc {
    fn spawn(name: &str, generation: u64, url: &str, prefix: &str) -> AgentProc {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "--ignored", "etcd_child", "--nocapture"])
            .arg("--test-threads=1")
            .env(ROLE, "agent")
            .env("KVXFER_ETCD_NAME", name)
            .env("KVXFER_ETCD_GEN", generation.to_string())
            .env("KVXFER_ETCD_URL", url)
            .env("KVXFER_ETCD_PREFIX", prefix)
            .env("UCX_TLS", std::env::var("UCX_TLS").unwrap_or("tcp".into()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                // The first line follows libtest's "test etcd_child ... ".
                if let Some(i) = line.find("ETCD ") {
                    if tx.send(line[i + 5..].to_string()).is_err() {
                        break;
                    }
                }
            }
        });
        let mut p = AgentProc {
            name: name.to_string(),
            stdin: child.stdin.take(),
            child,
            lines,
        };
        let first = p.next(Duration::from_secs(20));
        assert_eq!(first, format!("ready {prefix}{name}"), "{name} start");
        p
    }

    fn next(&mut self, timeout: Duration) -> String {
        match self.lines.recv_timeout(timeout) {
            Ok(l) => l,
            Err(e) => panic!("{}: no answer within {timeout:?} ({e})", self.name),
        }
    }

    /// Sends a command and returns what follows `ok`; panics on `err`.
    fn ok(&mut self, cmd: &str) -> String {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{cmd}").unwrap();
        stdin.flush().unwrap();
        let answer = self.next(Duration::from_secs(25));
        match answer.strip_prefix("ok ") {
            Some(rest) => rest.to_string(),
            None => panic!("{}: {cmd:?} failed: {answer}", self.name),
        }
    }

    /// Closes standard input: the agent leaves etcd and exits.
    fn quit(&mut self) {
        drop(self.stdin.take());
        assert_eq!(
            self.next(Duration::from_secs(10)),
            "bye",
            "{} quit",
            self.name
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "{} exited with {status}", self.name);
                return;
            }
            assert!(Instant::now() < deadline, "{} did not exit", self.name);
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

#[test]
fn three_agents_discover_each_other_through_etcd() {
    if std::env::var(ROLE).is_ok() {
        return;
    }
    let Some(etcd) = EtcdServer::start() else {
        panic!("no etcd binary on PATH: install Debian's etcd-server (scripts/setup.sh --test)");
    };
    let t0 = Instant::now();
    let prefix = format!("/kvxfer-test-{}/", std::process::id());
    let url = etcd.url.clone();
    let mut a = AgentProc::spawn("agent-a", 1, &url, &prefix);
    let mut b = AgentProc::spawn("agent-b", 1, &url, &prefix);
    let mut c = AgentProc::spawn("agent-c", 1, &url, &prefix);

    // Everyone finds everyone through etcd alone and moves data.
    assert_eq!(a.ok("xfer agent-b 1"), "xfer agent-b");
    assert_eq!(b.ok("xfer agent-c 1"), "xfer agent-c");
    assert_eq!(c.ok("xfer agent-a 1"), "xfer agent-a");
    assert_eq!(a.ok("xfer agent-c 1"), "xfer agent-c");

    // C dies without a word: its lease expires, its entry goes, and the
    // others invalidate it (a transfer to it is refused as UnknownPeer).
    c.child.kill().unwrap();
    c.child.wait().unwrap();
    let killed = Instant::now();
    let limit = (LEASE + Duration::from_secs(4)).as_millis();
    for p in [&mut a, &mut b] {
        let seen = p.ok(&format!("gone agent-c {limit}"));
        assert!(seen.starts_with("gone agent-c"), "{seen}");
        println!("{}: {seen}", p.name);
    }
    let expiry = killed.elapsed();
    println!("agent-c's entry expired {expiry:?} after the kill");
    assert!(
        expiry >= Duration::from_millis(500),
        "agent-c's entry went {expiry:?} after the kill: before its lease could expire"
    );
    drop(c);

    // C comes back: a new process, new buffers, new metadata.
    let mut c = AgentProc::spawn("agent-c", 2, &url, &prefix);
    assert_eq!(a.ok("xfer agent-c 2"), "xfer agent-c");
    assert_eq!(b.ok("xfer agent-c 2"), "xfer agent-c");
    assert_eq!(c.ok("xfer agent-b 1"), "xfer agent-b");

    // B stops cleanly: it revokes its lease, so its entry goes before the
    // lease could have expired.
    b.quit();
    let left = a.ok("gone agent-b 1000");
    assert!(left.starts_with("gone agent-b"), "{left}");
    println!("agent-a after agent-b quit: {left}");
    assert!(c.ok("gone agent-b 1000").starts_with("gone agent-b"));

    a.quit();
    c.quit();
    println!("etcd discovery test took {:?}", t0.elapsed());
}

#[test]
fn unreachable_etcd_is_an_etcd_backend_error() {
    if std::env::var(ROLE).is_ok() {
        return;
    }
    let port = free_port(); // closed again: nothing listens there
    let agent = Agent::new(
        "etcd-unreachable",
        AgentConfig::default().with_backend("UCX").with_listen(None),
    )
    .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let cfg = EtcdConfig::new(&url).with_timeout(Duration::from_millis(500));
    let t0 = Instant::now();
    match EtcdDiscovery::start(&agent, cfg) {
        Err(Error::Backend { backend, text, .. }) => {
            assert_eq!(backend, ETCD);
            assert!(text.contains(&url), "error does not name {url}: {text}");
        }
        other => panic!("expected an ETCD backend error, got {other:?}"),
    }
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t0.elapsed()
    );
    let bad = EtcdConfig::new(&url).with_lease_ttl(Duration::from_millis(10));
    match EtcdDiscovery::start(&agent, bad) {
        Err(Error::Backend { backend, text, .. }) => {
            assert_eq!(backend, ETCD);
            assert!(text.contains("lease TTL 10 ms"), "{text}");
        }
        other => panic!("expected an ETCD backend error, got {other:?}"),
    }
    agent.shutdown();
}

#[test]
fn registrations_are_republished_and_followed() {
    if std::env::var(ROLE).is_ok() {
        return;
    }
    let Some(etcd) = EtcdServer::start() else {
        panic!("no etcd binary on PATH: install Debian's etcd-server (scripts/setup.sh --test)");
    };
    let prefix = format!("/kvxfer-republish-{}/", std::process::id());
    let cfg = || AgentConfig::default().with_backend("UCX").with_listen(None);
    let ecfg = || {
        EtcdConfig::new(&etcd.url)
            .with_prefix(prefix.as_str())
            .with_republish_interval(Duration::from_millis(50))
    };
    let x = Agent::new("republish-x", cfg()).unwrap();
    let y = Agent::new("republish-y", cfg()).unwrap();
    let first = Registered::new(&x, vec![1; SRC]);
    let dx = EtcdDiscovery::start(&x, ecfg()).unwrap();
    let dy = EtcdDiscovery::start(&y, ecfg()).unwrap();
    assert_eq!(
        dy.fetch("republish-x", Duration::from_secs(5)),
        Ok("republish-x".into())
    );
    let regions = |d: &EtcdDiscovery| -> Vec<u64> {
        let blob = d.peer_metadata("republish-x").unwrap_or_default();
        Metadata::decode(&blob)
            .map(|m| m.regions().map(|r| r.region.len).collect())
            .unwrap_or_default()
    };
    assert_eq!(regions(&dy), vec![SRC as u64]);
    // Nothing changed: nothing is written again.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(dx.publications(), 1);

    // A new registration reaches the peer through etcd by itself...
    let second = Registered::new(&x, vec![2; INBOX]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while regions(&dy).len() != 2 {
        assert!(
            Instant::now() < deadline,
            "new region not seen: {:?}",
            regions(&dy)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(dx.publications(), 2);
    // ...and so does a deregistration, pushed at once with `publish`.
    drop(first);
    dx.publish().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while regions(&dy) != vec![INBOX as u64] {
        assert!(
            Instant::now() < deadline,
            "removal not seen: {:?}",
            regions(&dy)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(y
        .check_remote("republish-x", &[Desc::new(second.addr(), INBOX as u64)])
        .is_ok());

    // Shutting the agent down withdraws its entry.
    drop(second);
    x.shutdown();
    assert!(dy.wait_gone("republish-x", Duration::from_secs(2)));
    assert_eq!(y.has_remote("republish-x"), Ok(false));
    drop(dx);
    drop(dy);
    y.shutdown();
}

/// With a key, metadata goes to etcd signed with it, and only entries
/// signed with the same key are loaded: an unsigned entry and one signed
/// with another key are rejected with the reason (an altered one: the unit
/// tests of `kvxfer::etcd`). An agent without a key still reads signed
/// entries.
#[test]
fn with_a_key_only_metadata_signed_with_it_is_loaded() {
    if std::env::var(ROLE).is_ok() {
        return;
    }
    let Some(etcd) = EtcdServer::start() else {
        panic!("no etcd binary on PATH: install Debian's etcd-server (scripts/setup.sh --test)");
    };
    let prefix = format!("/kvxfer-signed-{}/", std::process::id());
    let agent = |name: &str, key: Option<&[u8]>| {
        let mut cfg = AgentConfig::default().with_backend("UCX").with_listen(None);
        cfg = cfg.with_auth_key(key.unwrap_or(b""));
        Agent::new(name, cfg).unwrap()
    };
    let ecfg = || EtcdConfig::new(&etcd.url).with_prefix(prefix.as_str());
    let good = agent("signed-good", Some(b"shared secret"));
    let other = agent("signed-other", Some(b"another secret"));
    let plain = agent("signed-plain", None);
    let reader = agent("signed-reader", Some(b"shared secret"));
    let keyless = agent("signed-keyless", None);
    let _rx = Registered::new(&good, vec![1; SRC]);
    let ds: Vec<EtcdDiscovery> = [&good, &other, &plain, &reader, &keyless]
        .into_iter()
        .map(|a| EtcdDiscovery::start(a, ecfg()).unwrap())
        .collect();
    let (dreader, dkeyless) = (&ds[3], &ds[4]);
    let t = Duration::from_secs(5);
    assert_eq!(dreader.fetch("signed-good", t), Ok("signed-good".into()));
    let rejected = |r: Result<String, Error>, why: &str| match r {
        Err(Error::Backend {
            backend: "ETCD",
            text,
            ..
        }) if text.contains(why) => {}
        other => panic!("expected a rejection saying {why:?}, got {other:?}"),
    };
    rejected(dreader.fetch("signed-other", t), "signed with another key");
    rejected(dreader.fetch("signed-plain", t), "is not signed");
    assert_eq!(reader.has_remote("signed-other"), Ok(false));
    assert_eq!(reader.has_remote("signed-plain"), Ok(false));
    // An agent without a key reads signed and unsigned entries.
    assert_eq!(dkeyless.fetch("signed-good", t), Ok("signed-good".into()));
    assert_eq!(dkeyless.fetch("signed-plain", t), Ok("signed-plain".into()));
    drop(ds);
    for a in [good, other, plain, reader, keyless] {
        a.shutdown();
    }
}
