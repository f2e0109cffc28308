//! Transfers between two processes over real libfabric providers.
//!
//! The test binary re-spawns itself with `KVXFER_FI_TEST_ROLE=target`; the
//! child opens a transport, registers a buffer and prints its address,
//! region and key as hex on stdout, then loops calling `poll` (so it serves
//! incoming RMA) while it answers commands read from stdin:
//!
//! * `SUM <offset> <len>`: checksum of its buffer, computed at once, with no
//!   progress in between — so a WRITE reported done must already be there;
//! * `FILL <seed>`: fill its buffer with a seeded pattern;
//! * `WORDS <byte>`: how many aligned 8-byte words of its buffer hold
//!   nothing but `<byte>` (hex);
//! * `EXIT`.
//!
//! Notifications it receives are printed as `NOTIF <hex> <checksum of the
//! whole buffer>`, the checksum taken the moment the notification is seen.

// kvxfer_core::Error is a large inline value by design (no_std, no alloc).
#![allow(clippy::result_large_err)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use kvxfer_core::{Completion, Error, Region, Segment, Token, Transport, XferOp};
use kvxfer_libfabric::{
    FabricConfig, FabricPeer, FabricReg, FabricRemoteKey, FabricTransport, BACKEND,
};

const ROLE_ENV: &str = "KVXFER_FI_TEST_ROLE";
const PROV_ENV: &str = "KVXFER_FI_TEST_PROVIDER";
const SIZE_ENV: &str = "KVXFER_FI_TEST_SIZE";
/// How long the tests wait for a completion: past the transfers' 60 s
/// deadline (see `config`), by which the transport must report every
/// transfer, done or failed.
const STEP: Duration = Duration::from_secs(70);

// ---------------------------------------------------------------- helpers

/// xorshift64* pattern: deterministic "random" bytes from a seed.
fn fill(buf: &mut [u8], seed: u64) {
    let mut x = seed | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

/// A word-wise FNV-style checksum (fast enough in debug builds).
fn checksum(buf: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ buf.len() as u64;
    let mut words = buf.chunks_exact(8);
    for w in &mut words {
        h = (h ^ u64::from_le_bytes(w.try_into().unwrap())).wrapping_mul(0x100_0000_01b3);
    }
    for &b in words.remainder() {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    h
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// The tests' transport configuration: a 60 s deadline instead of the
/// default 5 s, which a loaded 2-core machine passed with the `sockets`
/// provider (a 128 × 16 KiB WRITE and 300 WRITEs in flight timed out while
/// another build ran). The tests about deadlines set their own.
fn config(provider: &str) -> FabricConfig {
    FabricConfig::default()
        .with_provider(provider)
        .with_op_timeout(Duration::from_secs(60))
}

// ----------------------------------------------------------------- target

fn target_main() {
    let provider = std::env::var(PROV_ENV).expect("provider");
    let size: usize = std::env::var(SIZE_ENV)
        .expect("size")
        .parse()
        .expect("size");
    let mut t = FabricTransport::new(&config(provider.as_str())).expect("target transport");
    let mut buf = vec![0u8; size];
    let region = Region::dram(buf.as_mut_ptr() as u64, size as u64);
    let reg = t.register(&region).expect("register");
    let mut addr = [0u8; 512];
    let n = t.local_address(&mut addr).unwrap();
    let mut key = [0u8; 64];
    let k = t.pack_key(&reg, &mut key).unwrap();
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "ADDR {} {:x} {}",
        hex(&addr[..n]),
        region.addr,
        hex(&key[..k])
    )
    .unwrap();
    out.flush().unwrap();

    let (tx, rx) = channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut nbuf = [0u8; 4096];
    while Instant::now() < deadline {
        while t.poll().is_some() {}
        while let Some(r) = t.poll_notification(&mut nbuf) {
            let len = r.expect("notification");
            // The initiator wrote this buffer by RMA; its transfer is
            // complete once its notification is here.
            let sum = checksum(&buf);
            writeln!(out, "NOTIF {} {sum:x}", hex(&nbuf[..len])).unwrap();
            out.flush().unwrap();
        }
        match rx.try_recv() {
            Ok(cmd) => {
                let parts: Vec<&str> = cmd.split_whitespace().collect();
                match parts.as_slice() {
                    ["SUM", off, len] => {
                        let (off, len): (usize, usize) =
                            (off.parse().unwrap(), len.parse().unwrap());
                        writeln!(out, "SUM {:x}", checksum(&buf[off..off + len])).unwrap();
                    }
                    ["FILL", seed] => {
                        fill(&mut buf, seed.parse().unwrap());
                        writeln!(out, "OK").unwrap();
                    }
                    ["WORDS", b] => {
                        let b = u8::from_str_radix(b, 16).unwrap();
                        let n = buf
                            .chunks_exact(8)
                            .filter(|w| w.iter().all(|&x| x == b))
                            .count();
                        writeln!(out, "WORDS {n}").unwrap();
                    }
                    ["EXIT"] => break,
                    _ => panic!("unknown command {cmd:?}"),
                }
                out.flush().unwrap();
            }
            Err(std::sync::mpsc::TryRecvError::Empty) => std::thread::yield_now(),
            Err(std::sync::mpsc::TryRecvError::Disconnected) => break,
        }
    }
    t.deregister(reg);
    drop(t);
    drop(buf);
}

// -------------------------------------------------------------- initiator

/// A target child process; killed when dropped.
struct Target {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    addr: Vec<u8>,
    region: u64,
    key: Vec<u8>,
}

impl Target {
    fn spawn(provider: &str, size: usize) -> Target {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "--ignored", "target_role", "--nocapture"])
            .arg("--test-threads=1")
            .env(ROLE_ENV, "target")
            .env(PROV_ENV, provider)
            .env(SIZE_ENV, size.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn target");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut t = Target {
            child,
            stdin,
            lines,
            addr: vec![],
            region: 0,
            key: vec![],
        };
        let line = t.expect("ADDR");
        let p: Vec<&str> = line.split_whitespace().collect();
        t.addr = unhex(p[1]);
        t.region = u64::from_str_radix(p[2], 16).unwrap();
        t.key = unhex(p[3]);
        t
    }

    /// The next line starting with `prefix` (other lines, e.g. the test
    /// harness's own output, are skipped).
    fn expect(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + STEP;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                // The harness may print "test target_role ... " before our
                // first line, on the same line.
                Ok(l) if l.contains(prefix) => return l[l.find(prefix).unwrap()..].to_owned(),
                Ok(_) => continue,
                Err(e) => panic!("target gave no {prefix} line: {e}"),
            }
        }
    }

    fn send(&mut self, cmd: &str) {
        writeln!(self.stdin, "{cmd}").unwrap();
        self.stdin.flush().unwrap();
    }

    fn sum(&mut self, off: usize, len: usize) -> u64 {
        self.send(&format!("SUM {off} {len}"));
        let l = self.expect("SUM ");
        u64::from_str_radix(l.split_whitespace().nth(1).unwrap(), 16).unwrap()
    }

    fn fill(&mut self, seed: u64) {
        self.send(&format!("FILL {seed}"));
        self.expect("OK");
    }

    /// Aligned 8-byte words of the target's buffer made only of `byte`.
    fn words(&mut self, byte: u8) -> usize {
        self.send(&format!("WORDS {byte:x}"));
        let l = self.expect("WORDS ");
        l.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// Sends `sig` to the target process.
    fn signal(&self, sig: i32) {
        // SAFETY: kill has no memory effects; the pid is our own child,
        // not yet reaped.
        let ret = unsafe { libc::kill(self.child.id() as i32, sig) };
        assert_eq!(ret, 0, "kill({}, {sig})", self.child.id());
        if sig == libc::SIGSTOP {
            // kill returns before the process has stopped.
            let status = format!("/proc/{}/stat", self.child.id());
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let stat = std::fs::read_to_string(&status).unwrap_or_default();
                // The state follows the parenthesised command name.
                let state = stat.rsplit(')').next().unwrap_or("").trim_start();
                if state.starts_with('T') {
                    return;
                }
                assert!(Instant::now() < deadline, "target did not stop: {stat}");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        // A target left stopped by a failed test must not outlive it.
        // SAFETY: as in `signal`.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGCONT) };
        let _ = writeln!(self.stdin, "EXIT");
        let _ = self.stdin.flush();
        let deadline = Instant::now() + Duration::from_secs(3);
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

/// The initiator's side: a transport connected to a target.
struct Initiator {
    t: FabricTransport,
    peer: Option<FabricPeer>,
    rkey: Option<FabricRemoteKey>,
    region: Region,
}

impl Initiator {
    fn new(provider: &str, target: &Target, remote_len: usize) -> Initiator {
        Self::with_config(config(provider), target, remote_len)
    }

    fn with_config(cfg: FabricConfig, target: &Target, remote_len: usize) -> Initiator {
        let mut t = FabricTransport::new(&cfg).expect("initiator transport");
        let peer = t.connect(&target.addr).expect("connect");
        let region = Region::dram(target.region, remote_len as u64);
        let rkey = t
            .unpack_key(&peer, &region, &target.key)
            .expect("unpack key");
        Initiator {
            t,
            peer: Some(peer),
            rkey: Some(rkey),
            region,
        }
    }

    /// Posts a transfer of `(local offset, remote offset, len)` triples.
    fn post(
        &mut self,
        op: XferOp,
        reg: &FabricReg,
        local: &[u8],
        pairs: &[(usize, usize, usize)],
        notification: Option<&[u8]>,
        token: u64,
    ) -> Result<kvxfer_core::PostStatus, Error> {
        let rkey = self.rkey.as_ref().unwrap();
        let segs: Vec<Segment<'_, FabricReg, FabricRemoteKey>> = pairs
            .iter()
            .map(|&(lo, ro, len)| Segment {
                local_addr: local.as_ptr() as u64 + lo as u64,
                remote_addr: self.region.addr + ro as u64,
                len: len as u64,
                local: reg,
                remote: rkey,
                remote_region_addr: self.region.addr,
            })
            .collect();
        self.t.post(
            op,
            self.peer.as_ref().unwrap(),
            kvxfer_core::Segments::from(&segs[..]),
            notification,
            Token(token),
        )
    }

    fn notify(&mut self, msg: &[u8]) -> Result<(), Error> {
        self.t.send_notification(self.peer.as_ref().unwrap(), msg)
    }

    /// Polls until `n` completions arrived; panics after `timeout`.
    fn wait(&mut self, n: usize, timeout: Duration) -> Vec<Completion> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        while got.len() < n {
            assert!(
                Instant::now() < deadline,
                "only {} of {n} completions after {timeout:?}",
                got.len()
            );
            match self.t.poll() {
                Some(c) => got.push(c),
                None => std::thread::yield_now(),
            }
        }
        got
    }

    fn run(
        &mut self,
        op: XferOp,
        reg: &FabricReg,
        local: &[u8],
        pairs: &[(usize, usize, usize)],
        token: u64,
    ) {
        let st = self.post(op, reg, local, pairs, None, token).expect("post");
        assert_eq!(st, kvxfer_core::PostStatus::InProgress);
        let c = self.wait(1, STEP);
        assert_eq!(
            c[0],
            Completion {
                token: Token(token),
                result: Ok(())
            }
        );
    }
}

impl Drop for Initiator {
    fn drop(&mut self) {
        if let Some(k) = self.rkey.take() {
            self.t.release_key(k);
        }
        if let Some(p) = self.peer.take() {
            self.t.disconnect(p);
        }
    }
}

fn local_buf(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    fill(&mut v, seed);
    v
}

// ------------------------------------------------------------- scenarios

fn write_and_read_small(provider: &str) {
    let mut target = Target::spawn(provider, 4096);
    let mut ini = Initiator::new(provider, &target, 4096);
    let mut src = local_buf(100, 7);
    let reg = ini
        .t
        .register(&Region::dram(src.as_mut_ptr() as u64, 100))
        .unwrap();
    // A non-zero remote offset checks offset- vs. address-based keys.
    ini.run(XferOp::Write, &reg, &src, &[(0, 17, 100)], 1);
    assert_eq!(
        target.sum(17, 100),
        checksum(&src),
        "WRITE of 100 bytes at the target"
    );
    assert_eq!(
        target.sum(0, 17),
        checksum(&[0u8; 17]),
        "bytes before the WRITE untouched"
    );

    target.fill(99);
    let mut expect = vec![0u8; 4096];
    fill(&mut expect, 99);
    ini.run(XferOp::Read, &reg, &src, &[(0, 33, 100)], 2);
    assert_eq!(src, expect[33..133], "READ of 100 bytes");
    ini.t.deregister(reg);
}

fn scattered_batch(provider: &str) {
    const BLOCK: usize = 16 * 1024;
    const N: usize = 128;
    let mut target = Target::spawn(provider, N * BLOCK);
    let mut ini = Initiator::new(provider, &target, N * BLOCK);
    let mut src = local_buf(N * BLOCK, 0x5eed);
    let reg = ini
        .t
        .register(&Region::dram(src.as_mut_ptr() as u64, src.len() as u64))
        .unwrap();
    // Remote block of local block i: a permutation, so nothing coalesces.
    let perm: Vec<usize> = (0..N).map(|i| (i * 37 + 11) % N).collect();
    let pairs: Vec<_> = (0..N)
        .map(|i| (i * BLOCK, perm[i] * BLOCK, BLOCK))
        .collect();
    ini.run(XferOp::Write, &reg, &src, &pairs, 3);
    let mut expect = vec![0u8; N * BLOCK];
    for i in 0..N {
        expect[perm[i] * BLOCK..][..BLOCK].copy_from_slice(&src[i * BLOCK..][..BLOCK]);
    }
    assert_eq!(
        target.sum(0, N * BLOCK),
        checksum(&expect),
        "scattered WRITE"
    );

    // Read the blocks back in the inverse order into a cleared buffer.
    let mut back = vec![0u8; N * BLOCK];
    let reg2 = ini
        .t
        .register(&Region::dram(back.as_mut_ptr() as u64, back.len() as u64))
        .unwrap();
    ini.run(XferOp::Read, &reg2, &back, &pairs, 4);
    assert!(back == src, "scattered READ gives back what was written");
    ini.t.deregister(reg2);
    ini.t.deregister(reg);
}

fn large(provider: &str) {
    const LEN: usize = 64 << 20;
    let mut target = Target::spawn(provider, LEN);
    let mut ini = Initiator::new(provider, &target, LEN);
    let mut src = local_buf(LEN, 0xb16);
    let reg = ini
        .t
        .register(&Region::dram(src.as_mut_ptr() as u64, LEN as u64))
        .unwrap();
    ini.run(XferOp::Write, &reg, &src, &[(0, 0, LEN)], 5);
    // Asked with no progress at the target in between: done means there.
    assert_eq!(target.sum(0, LEN), checksum(&src), "64 MiB WRITE");
    target.fill(4242);
    ini.run(XferOp::Read, &reg, &src, &[(0, 0, LEN)], 6);
    let mut expect = vec![0u8; LEN];
    fill(&mut expect, 4242);
    assert!(src == expect, "64 MiB READ");
    ini.t.deregister(reg);
}

fn notification_after_data(provider: &str) {
    const LEN: usize = 1 << 20;
    let mut target = Target::spawn(provider, LEN);
    let mut ini = Initiator::new(provider, &target, LEN);
    let mut src = local_buf(LEN, 31337);
    let reg = ini
        .t
        .register(&Region::dram(src.as_mut_ptr() as u64, LEN as u64))
        .unwrap();
    let pairs: Vec<_> = (0..16)
        .map(|i| (i * LEN / 16, i * LEN / 16, LEN / 16))
        .collect();
    let st = ini
        .post(XferOp::Write, &reg, &src, &pairs, Some(b"kv-ready:7"), 8)
        .unwrap();
    assert_eq!(st, kvxfer_core::PostStatus::InProgress);
    assert_eq!(ini.wait(1, STEP)[0].result, Ok(()));
    let line = target.expect("NOTIF ");
    let p: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(unhex(p[1]), b"kv-ready:7");
    assert_eq!(
        u64::from_str_radix(p[2], 16).unwrap(),
        checksum(&src),
        "data was at the target before the notification"
    );

    // A notification outside any transfer; several, in order.
    for i in 0..5 {
        ini.notify(format!("msg-{i}").as_bytes()).unwrap();
    }
    for i in 0..5 {
        let deadline = Instant::now() + STEP;
        let line = loop {
            // Keep the initiator progressing its sends meanwhile.
            while ini.t.poll().is_some() {}
            if let Ok(l) = target.lines.recv_timeout(Duration::from_millis(5)) {
                if let Some(i) = l.find("NOTIF ") {
                    break l[i..].to_owned();
                }
            }
            assert!(Instant::now() < deadline, "notification {i} did not arrive");
        };
        assert_eq!(
            unhex(line.split_whitespace().nth(1).unwrap()),
            format!("msg-{i}").as_bytes()
        );
    }
    let long = vec![0u8; 4097];
    assert_eq!(
        ini.notify(&long),
        Err(Error::NotificationTooLong {
            len: 4097,
            max: 4096
        })
    );
    ini.t.deregister(reg);
}

fn many_in_flight(provider: &str) {
    const N: usize = 300;
    const LEN: usize = 32 * 1024;
    let mut target = Target::spawn(provider, N * LEN);
    let mut ini = Initiator::new(provider, &target, N * LEN);
    let mut src = local_buf(N * LEN, 77);
    let reg = ini
        .t
        .register(&Region::dram(src.as_mut_ptr() as u64, src.len() as u64))
        .unwrap();
    for i in 0..N {
        let st = ini.post(
            XferOp::Write,
            &reg,
            &src,
            &[(i * LEN, i * LEN, LEN)],
            None,
            1000 + i as u64,
        );
        assert_eq!(st, Ok(kvxfer_core::PostStatus::InProgress));
    }
    assert_eq!(ini.t.in_flight(), N);
    let mut got: Vec<u64> = ini
        .wait(N, STEP)
        .into_iter()
        .map(|c| {
            assert_eq!(c.result, Ok(()));
            c.token.0
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        (1000..1000 + N as u64).collect::<Vec<_>>(),
        "one completion per transfer"
    );
    assert_eq!(ini.t.poll(), None, "no completion beyond one per transfer");
    assert_eq!(target.sum(0, N * LEN), checksum(&src));
    ini.t.deregister(reg);
}

fn peer_death(provider: &str) {
    let mut target = Target::spawn(provider, 1 << 20);
    let cfg = config(provider).with_op_timeout(Duration::from_secs(2));
    let mut ini = Initiator::with_config(cfg, &target, 1 << 20);
    let mut src = local_buf(1 << 20, 1);
    let reg = ini
        .t
        .register(&Region::dram(src.as_mut_ptr() as u64, src.len() as u64))
        .unwrap();
    ini.run(XferOp::Write, &reg, &src, &[(0, 0, 1 << 20)], 1);
    target.child.kill().unwrap();
    target.child.wait().unwrap();
    let posted = ini.post(XferOp::Write, &reg, &src, &[(0, 0, 1 << 20)], None, 2);
    match posted {
        // Refused at once is fine too, if it says why.
        Err(e) => assert!(
            matches!(
                e,
                Error::Backend {
                    backend: BACKEND,
                    ..
                } | Error::RemoteDisconnected { .. }
            ),
            "{e}"
        ),
        Ok(_) => {
            let start = Instant::now();
            let c = ini.wait(1, Duration::from_secs(10));
            assert_eq!(c[0].token, Token(2));
            eprintln!(
                "{provider}: WRITE to a dead peer: {:?} after {:?}",
                c[0].result,
                start.elapsed()
            );
            match (provider, &c[0].result) {
                // tcp reports the broken connection at once.
                ("tcp;ofi_rxm", Err(Error::RemoteDisconnected { .. })) => {}
                ("tcp;ofi_rxm", other) => panic!("tcp: a WRITE to a dead peer gave {other:?}"),
                // shm never completes it: the deadline fails it.
                ("shm", Err(Error::TimedOut { after_ms })) => assert!(*after_ms >= 2000),
                ("shm", other) => panic!("shm: a WRITE to a dead peer gave {other:?}"),
                _ => {}
            }
            match &c[0].result {
                Err(Error::RemoteDisconnected { .. })
                | Err(Error::TimedOut { .. })
                | Err(Error::Backend {
                    backend: BACKEND, ..
                }) => {}
                other => panic!("a WRITE to a dead peer gave {other:?}"),
            }
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "failure took {:?}",
                start.elapsed()
            );
        }
    }
    ini.t.deregister(reg);
}

fn bad_inputs(provider: &str) {
    let mut target = Target::spawn(provider, 4096);
    let mut ini = Initiator::new(provider, &target, 4096);
    let peer = ini.peer.take().unwrap();
    let region = Region::dram(target.region, 4096);
    // Packed keys have a fixed length.
    match ini.t.unpack_key(&peer, &region, &target.key[..5]) {
        Err(Error::Backend {
            backend: BACKEND,
            text,
            ..
        }) => assert!(text.contains("5 bytes"), "{text}"),
        other => panic!("truncated key gave {other:?}"),
    }
    // Addresses of another provider are refused by name.
    let mut wrong = target.addr.clone();
    let plen = wrong[1] as usize;
    wrong.splice(2..2 + plen, b"xyz".iter().copied());
    wrong[1] = 3;
    match ini.t.connect(&wrong) {
        Err(Error::Backend {
            backend: BACKEND,
            text,
            ..
        }) => assert!(text.contains("xyz"), "{text}"),
        other => panic!("foreign address gave {other:?}"),
    }
    match ini.t.connect(&[9, 9, 9]) {
        Err(Error::Backend {
            backend: BACKEND, ..
        }) => {}
        other => panic!("garbage address gave {other:?}"),
    }
    let mut small = [0u8; 4];
    let mut buf = vec![0u8; 64];
    let reg = ini
        .t
        .register(&Region::dram(buf.as_mut_ptr() as u64, 64))
        .unwrap();
    assert_eq!(
        ini.t.pack_key(&reg, &mut small),
        Err(Error::BufferTooSmall {
            needed: 9,
            available: 4
        })
    );
    let mut address = [0u8; 512];
    let n = ini.t.local_address(&mut address).expect("local address");
    assert_eq!(address[0], 2, "address version");
    assert_eq!(
        ini.t.local_address(&mut address[..n - 1]),
        Err(Error::BufferTooSmall {
            needed: n as u64,
            available: n as u64 - 1
        })
    );
    assert_eq!(
        ini.t.register(&Region::vram(0x1000, 64, 0)).unwrap_err(),
        Error::UnsupportedMemKind {
            backend: BACKEND,
            kind: kvxfer_core::MemKind::Vram
        }
    );
    assert_eq!(
        ini.t.register(&Region::dram(0x1000, 0)).unwrap_err(),
        Error::InvalidRegion {
            addr: 0x1000,
            len: 0
        }
    );
    assert_eq!(
        ini.t.cancel(Token(1)),
        Err(Error::Unsupported {
            backend: BACKEND,
            what: "cancel"
        })
    );
    ini.t.deregister(reg);
    ini.peer = Some(peer);
    target.send("SUM 0 1");
    target.expect("SUM ");
}

/// The byte a timed-out transfer's local buffer is filled with after its
/// registration is gone.
const SENTINEL: u8 = 0xab;

/// A transfer to a stopped target times out; its local region is then
/// deregistered and overwritten with `SENTINEL`; the target resumes. No
/// late READ data may land in the buffer, no late WRITE may carry the
/// sentinel to the target, and later posts to that peer fail at once
/// until it is connected again.
fn no_memory_touched_after_timeout(provider: &str, op: XferOp) {
    // A WRITE larger than the socket buffers keeps data in local memory
    // that the provider would still have to read.
    let len: usize = if op == XferOp::Write {
        32 << 20
    } else {
        1 << 20
    };
    let mut target = Target::spawn(provider, len);
    target.fill(5);
    // Also the deadline of the WRITEs before the stop and after the
    // reconnect, which must succeed on a loaded machine too (500 ms was
    // seen to expire there, and 1000 ms for the WRITE after the reconnect
    // with two busy loops on the two cores).
    const TIMEOUT_MS: u64 = 3000;
    let cfg = config(provider).with_op_timeout(Duration::from_millis(TIMEOUT_MS));
    let mut ini = Initiator::with_config(cfg, &target, len);
    let mut local = local_buf(len, 6);
    let reg = ini
        .t
        .register(&Region::dram(local.as_mut_ptr() as u64, len as u64))
        .unwrap();
    // Connected and in use before the target stops.
    ini.run(XferOp::Write, &reg, &local, &[(0, 0, 64)], 9);
    target.signal(libc::SIGSTOP);
    let st = ini.post(op, &reg, &local, &[(0, 0, len)], None, 1);
    assert_eq!(st, Ok(kvxfer_core::PostStatus::InProgress));
    let c = ini.wait(1, Duration::from_millis(TIMEOUT_MS + 5000));
    assert!(
        matches!(c[0].result, Err(Error::TimedOut { after_ms }) if after_ms >= TIMEOUT_MS),
        "{:?}",
        c[0]
    );
    // The engine deregisters only once the provider has let go of the
    // timed-out operations: wait for that, bounded, as it does.
    let start = Instant::now();
    while ini.t.in_use(&reg) {
        assert!(
            start.elapsed() < Duration::from_secs(4),
            "{provider}: the provider never gave back the timed-out operations"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let start = Instant::now();
    ini.t.deregister(reg);
    let dereg = start.elapsed();
    assert!(
        dereg < Duration::from_millis(500),
        "deregister took {dereg:?} although nothing used the memory"
    );
    local.fill(SENTINEL);
    target.signal(libc::SIGCONT);
    // The target serves what it had queued; keep progressing here too.
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        while ini.t.poll().is_some() {}
        std::thread::sleep(Duration::from_millis(1));
    }
    let changed = local.iter().filter(|&&b| b != SENTINEL).count();
    assert_eq!(
        changed, 0,
        "{provider}: {changed} bytes of the deregistered buffer changed after a timed-out {op:?}"
    );
    if op == XferOp::Write {
        assert_eq!(
            target.words(SENTINEL),
            0,
            "{provider}: a late WRITE read the deregistered buffer"
        );
    }
    // The peer whose transfer timed out is given up on: a post fails at
    // once until it is connected again.
    let mut other = local_buf(64, 8);
    let reg = ini
        .t
        .register(&Region::dram(other.as_mut_ptr() as u64, 64))
        .unwrap();
    assert_eq!(
        ini.post(XferOp::Write, &reg, &other, &[(0, 0, 64)], None, 2),
        Err(Error::disconnected(""))
    );
    let old = ini.peer.take().unwrap();
    ini.t.disconnect(old);
    ini.peer = Some(ini.t.connect(&target.addr).expect("reconnect"));
    ini.run(XferOp::Write, &reg, &other, &[(0, 0, 64)], 3);
    assert_eq!(target.sum(0, 64), checksum(&other), "WRITE after reconnect");
    ini.t.deregister(reg);
}

// ------------------------------------------------------------------ tests

/// The target side, run only in a re-spawned child.
#[test]
#[ignore = "child role of this file's tests; they spawn it"]
fn target_role() {
    if std::env::var(ROLE_ENV).as_deref() == Ok("target") {
        target_main();
    }
}

macro_rules! per_provider {
    ($($name:ident => $prov:expr),* $(,)?) => {$(
        mod $name {
            use super::*;
            #[test] fn write_read_100_bytes() { write_and_read_small($prov) }
            #[test] fn scattered_128_x_16k() { scattered_batch($prov) }
            #[test] fn large_64_mib() { large($prov) }
            #[test] fn notification_after_data_and_standalone() { notification_after_data($prov) }
            #[test] fn many_in_flight() { super::many_in_flight($prov) }
            #[test] fn peer_death_fails_within_deadline() { peer_death($prov) }
            #[test] fn bad_inputs_exact_errors() { bad_inputs($prov) }
        }
    )*};
}

per_provider! {
    tcp_rxm => "tcp;ofi_rxm",
    shm => "shm",
    sockets => "sockets",
}

// libfabric 2.x's tcp provider gives FI_EP_RDM itself (1.x layers rxm
// under the same name, tested above).
#[cfg(libfabric_v2)]
per_provider! {
    tcp => "tcp",
}

#[test]
fn tcp_rxm_no_late_read_data_after_timeout_and_deregister() {
    no_memory_touched_after_timeout("tcp;ofi_rxm", XferOp::Read);
}

#[test]
fn tcp_rxm_no_late_write_from_deregistered_memory() {
    no_memory_touched_after_timeout("tcp;ofi_rxm", XferOp::Write);
}

// libfabric 2.1's native tcp fails both (1,044,418 bytes of a 1 MiB
// buffer changed after a timed-out READ; a late WRITE read the buffer), so
// kvxfer does not pick it by default; see the README.
#[cfg(libfabric_v2)]
#[test]
#[ignore = "libfabric 2.1's native tcp touches memory after a timeout: known limitation"]
fn tcp_no_late_read_data_after_timeout_and_deregister() {
    no_memory_touched_after_timeout("tcp", XferOp::Read);
}

#[cfg(libfabric_v2)]
#[test]
#[ignore = "libfabric 2.1's native tcp touches memory after a timeout: known limitation"]
fn tcp_no_late_write_from_deregistered_memory() {
    no_memory_touched_after_timeout("tcp", XferOp::Write);
}

#[test]
fn unknown_provider_is_named_in_the_error() {
    match FabricTransport::new(&config("no-such-provider")) {
        Err(Error::Backend {
            backend: BACKEND,
            text,
            ..
        }) => {
            assert!(text.contains("no-such-provider"), "{text}");
        }
        other => panic!(
            "unknown provider gave {:?}",
            other.map(|t| t.provider_name().to_owned())
        ),
    }
}

#[test]
fn usable_providers_lists_tcp_and_shm() {
    let list = kvxfer_libfabric::usable_providers();
    assert!(list.iter().any(|p| p == "tcp;ofi_rxm"), "{list:?}");
    assert!(list.iter().any(|p| p == "shm"), "{list:?}");
    // On 2.x the native tcp is listed, last.
    let native = list.iter().position(|p| p == "tcp");
    assert_eq!(native.is_some(), cfg!(libfabric_v2), "{list:?}");
    if let Some(native) = native {
        assert_eq!(native, list.len() - 1, "{list:?}");
    }
}

#[test]
fn default_provider_is_the_first_usable() {
    let cfg = FabricConfig::default().with_op_timeout(Duration::from_secs(5));
    let t = FabricTransport::new(&cfg).expect("default provider");
    let want = match std::env::var(kvxfer_libfabric::PROVIDER_ENV) {
        Ok(named) => named,
        Err(_) => kvxfer_libfabric::usable_providers().remove(0),
    };
    assert_eq!(t.provider_name(), want);
}
