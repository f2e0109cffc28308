//! Transfers between two processes over UCX, through the `Transport` trait.
//!
//! Each test spawns this test binary again as the target process
//! (`target_process`, selected by an environment variable). The target
//! registers a buffer and prints its worker address, region and packed key
//! as hex on stdout; it then serves commands from stdin (fill, checksum,
//! hex dump) while progressing its worker, and prints every notification
//! it receives with the checksum of its buffer at that moment. Every test
//! runs once with the default transports and once with `UCX_TLS=tcp`.

#![allow(clippy::result_large_err)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use kvxfer_core::{DescError, Error, PostStatus, Region, Segment, Side, Token, Transport, XferOp};
use kvxfer_ucx::{UcxConfig, UcxPeer, UcxReg, UcxRemoteKey, UcxTransport};

const ROLE_ENV: &str = "KVXFER_UCX_TEST_ROLE";
const LEN_ENV: &str = "KVXFER_UCX_TEST_LEN";
const LINE_TIMEOUT: Duration = Duration::from_secs(15);
const XFER_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------- helpers

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    assert!(s.len() % 2 == 0, "odd hex length {}", s.len());
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex digit"))
        .collect()
}

/// A 64-bit checksum over whole words (fast enough unoptimized for 64 MiB).
fn checksum(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_le_bytes(c.try_into().expect("8 bytes"));
        h = (h ^ w).wrapping_mul(0x0000_0100_0000_01b3).rotate_left(5);
    }
    for &b in chunks.remainder() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^ bytes.len() as u64
}

/// Fills `buf` with pseudo-random bytes from `seed`.
fn fill(buf: &mut [u8], seed: u64) {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut chunks = buf.chunks_exact_mut(8);
    for c in &mut chunks {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes());
    }
    for b in chunks.into_remainder() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
}

/// `len` pseudo-random bytes from `seed` (see [`fill`]).
fn filled(len: usize, seed: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    fill(&mut buf, seed);
    buf
}

/// The transport settings for a transport list. UCX 1.13's shared-memory
/// transports cannot detect a dead peer, so a shared-memory-only list runs
/// without peer failure detection.
fn config(tls: Option<&str>) -> UcxConfig {
    let mut c = UcxConfig::default();
    c.tls = tls.map(str::to_owned);
    c.peer_failure_detection = !matches!(tls, Some(SHM_ONLY));
    c
}

/// The shared-memory-only transport list.
const SHM_ONLY: &str = "posix";

// ---------------------------------------------------------------- target role

/// Entry point of the target process; does nothing unless spawned by a test.
#[test]
#[ignore = "target role of the two-process tests; spawned by them"]
fn target_process() {
    if std::env::var_os(ROLE_ENV).is_none() {
        return;
    }
    let len: usize = std::env::var(LEN_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4096);
    let tls = std::env::var("UCX_TLS").ok();
    let mut t = UcxTransport::new(&config(tls.as_deref())).expect("target transport");
    let mut buf = vec![0u8; len];
    let reg = t
        .register(&Region::dram(buf.as_ptr() as u64, len as u64))
        .expect("register");
    let mut key = [0u8; 4096];
    let klen = t.pack_key(&reg, &mut key).expect("pack key");
    let mut reg = Some(reg);
    let mut addr = [0u8; 4096];
    let alen = t.local_address(&mut addr).expect("address");
    println!("@ADDR {}", hex(&addr[..alen]));
    println!("@REGION {} {}", buf.as_ptr() as u64, len);
    println!("@KEY {}", hex(&key[..klen]));
    println!("@READY");
    std::io::stdout().flush().expect("flush");

    let (tx, rx) = channel::<Option<String>>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            match line {
                Ok(l) => {
                    if tx.send(Some(l)).is_err() {
                        return;
                    }
                }
                Err(_) => break,
            }
        }
        let _ = tx.send(None);
    });

    let started = Instant::now();
    let mut note = vec![0u8; 8192];
    loop {
        let busy = t.progress();
        while let Some(r) = t.poll_notification(&mut note) {
            let n = r.expect("notification");
            // The checksum proves what the buffer held when the note arrived.
            // SAFETY of reading `buf`: only remote writes change it, and the
            // sender writes nothing more before it has seen our reply.
            println!("@NOTE {} {:016x}", hex(&note[..n]), checksum(&buf));
            std::io::stdout().flush().expect("flush");
        }
        match rx.try_recv() {
            Ok(Some(cmd)) => {
                let parts: Vec<&str> = cmd.split_whitespace().collect();
                match parts.as_slice() {
                    ["FILL", seed] => {
                        fill(&mut buf, seed.parse().expect("seed"));
                        println!("@OK");
                    }
                    ["SUM"] => println!("@SUM {:016x}", checksum(&buf)),
                    ["SMALL"] => {
                        let (served, refused) = t.small_writes_served();
                        println!("@SMALL {served} {refused}");
                    }
                    ["UNREG"] => {
                        if let Some(r) = reg.take() {
                            t.deregister(r);
                        }
                        println!("@OK");
                    }
                    ["HEX", off, n] => {
                        let off: usize = off.parse().expect("offset");
                        let n: usize = n.parse().expect("length");
                        println!("@HEX {}", hex(&buf[off..off + n]));
                    }
                    ["QUIT"] => break,
                    other => panic!("unknown command {other:?}"),
                }
                std::io::stdout().flush().expect("flush");
            }
            Ok(None) => break,
            Err(_) => {
                if !busy {
                    std::thread::sleep(Duration::from_micros(20));
                }
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "target ran too long"
        );
    }
    if let Some(reg) = reg {
        t.deregister(reg);
    }
    drop(t);
}

/// The target process as seen by the test: killed when dropped.
struct Target {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    addr: Vec<u8>,
    region: Region,
    key: Vec<u8>,
}

impl Target {
    fn spawn(tls: Option<&str>, len: usize) -> Target {
        let mut cmd = Command::new(std::env::current_exe().expect("current exe"));
        cmd.args([
            "--ignored",
            "--exact",
            "target_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ROLE_ENV, "target")
        .env(LEN_ENV, len.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
        // Without an explicit list both sides inherit UCX_TLS (if any).
        if let Some(tls) = tls {
            cmd.env("UCX_TLS", tls);
        }
        let mut child = cmd.spawn().expect("spawn target");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // libtest may print "test target_process ... " before our first line.
                let Some(at) = line.find('@') else { continue };
                if tx.send(line[at..].to_owned()).is_err() {
                    break;
                }
            }
        });
        let mut t = Target {
            child,
            stdin,
            lines: rx,
            addr: Vec::new(),
            region: Region::dram(0, 0),
            key: Vec::new(),
        };
        t.addr = unhex(&t.expect("@ADDR"));
        let region = t.expect("@REGION");
        let mut it = region.split(' ').map(|v| v.parse::<u64>().expect("number"));
        t.region = Region::dram(it.next().expect("addr"), it.next().expect("len"));
        t.key = unhex(&t.expect("@KEY"));
        t.expect("@READY");
        t
    }

    /// The rest of the next line starting with `tag`.
    fn expect(&mut self, tag: &str) -> String {
        match self.lines.recv_timeout(LINE_TIMEOUT) {
            Ok(line) => {
                let rest = line
                    .strip_prefix(tag)
                    .unwrap_or_else(|| panic!("expected {tag}, target said {line:?}"));
                rest.trim_start().to_owned()
            }
            Err(RecvTimeoutError::Timeout) => {
                panic!("target did not say {tag} in {LINE_TIMEOUT:?}")
            }
            Err(RecvTimeoutError::Disconnected) => panic!("target exited before saying {tag}"),
        }
    }

    fn cmd(&mut self, cmd: &str, tag: &str) -> String {
        writeln!(self.stdin, "{cmd}").expect("write to target");
        self.stdin.flush().expect("flush to target");
        self.expect(tag)
    }

    fn quit(mut self) {
        let _ = writeln!(self.stdin, "QUIT");
        let _ = self.stdin.flush();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    assert!(status.success(), "target exited with {status}");
                    return;
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                _ => panic!("target did not exit after QUIT"),
            }
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// This process's side: a transport connected to one target.
struct Initiator {
    t: UcxTransport,
    peer: Option<UcxPeer>,
    rkey: Option<UcxRemoteKey>,
    regs: Vec<UcxReg>,
}

impl Initiator {
    fn new(tls: Option<&str>, target: &Target) -> Initiator {
        Initiator::with_config(&config(tls), target)
    }

    fn with_config(cfg: &UcxConfig, target: &Target) -> Initiator {
        let t = UcxTransport::new(cfg).expect("initiator transport");
        let mut ini = Initiator {
            t,
            peer: None,
            rkey: None,
            regs: Vec::new(),
        };
        ini.reconnect(target);
        ini
    }

    /// Drops the current connection (if any) and connects to `target`
    /// again: a new endpoint and a new remote key.
    fn reconnect(&mut self, target: &Target) {
        if let Some(k) = self.rkey.take() {
            self.t.release_key(k);
        }
        if let Some(p) = self.peer.take() {
            self.t.disconnect(p);
        }
        let peer = self.t.connect(&target.addr).expect("connect");
        let rkey = self
            .t
            .unpack_key(&peer, &target.region, &target.key)
            .expect("unpack key");
        self.peer = Some(peer);
        self.rkey = Some(rkey);
    }

    /// Registers `buf`; returns the registration's index in `regs`.
    fn register(&mut self, buf: &[u8]) -> usize {
        let reg = self
            .t
            .register(&Region::dram(buf.as_ptr() as u64, buf.len() as u64))
            .expect("register");
        self.regs.push(reg);
        self.regs.len() - 1
    }

    /// Posts segments (local address, remote offset, length) of `regs[reg]`.
    fn post(
        &mut self,
        op: XferOp,
        reg: usize,
        target: &Target,
        parts: &[(u64, u64, u64)],
        note: Option<&[u8]>,
        token: Token,
    ) -> Result<PostStatus, Error> {
        let local = &self.regs[reg];
        let remote = self.rkey.as_ref().expect("key");
        let segs: Vec<Segment<'_, UcxReg, UcxRemoteKey>> = parts
            .iter()
            .map(|&(local_addr, remote_off, len)| Segment {
                local_addr,
                remote_addr: target.region.addr + remote_off,
                len,
                local,
                remote,
                remote_region_addr: target.region.addr,
            })
            .collect();
        self.t.post(
            op,
            self.peer.as_ref().expect("peer"),
            kvxfer_core::Segments::from(&segs[..]),
            note,
            token,
        )
    }

    /// Posts and waits for the transfer's end.
    fn run(
        &mut self,
        op: XferOp,
        reg: usize,
        target: &Target,
        parts: &[(u64, u64, u64)],
        note: Option<&[u8]>,
    ) -> Result<(), Error> {
        match self.post(op, reg, target, parts, note, Token(7))? {
            PostStatus::Done => Ok(()),
            PostStatus::InProgress => wait(&mut self.t, Token(7), XFER_TIMEOUT),
        }
    }

    fn close(mut self) {
        if let Some(k) = self.rkey.take() {
            self.t.release_key(k);
        }
        if let Some(p) = self.peer.take() {
            self.t.disconnect(p);
        }
        for r in self.regs.drain(..) {
            self.t.deregister(r);
        }
    }
}

/// Polls until the completion of `token`; panics on another token or on
/// timeout.
fn wait(t: &mut UcxTransport, token: Token, timeout: Duration) -> Result<(), Error> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(c) = t.poll() {
            assert_eq!(c.token, token, "completion for an unexpected token");
            return c.result;
        }
        assert!(
            Instant::now() < deadline,
            "transfer {token:?} did not complete in {timeout:?}"
        );
        std::thread::yield_now();
    }
}

/// WRITEs 100 bytes of pattern `seed` to the start of the target's buffer
/// and compares them there byte for byte; returns the bytes, which stay
/// registered with `ini`.
fn write_100_checked(ini: &mut Initiator, target: &mut Target, seed: u64, what: &str) -> Vec<u8> {
    let data = filled(100, seed);
    let reg = ini.register(&data);
    ini.run(
        XferOp::Write,
        reg,
        target,
        &[(data.as_ptr() as u64, 0, 100)],
        None,
    )
    .unwrap_or_else(|e| panic!("{what}: {e:?}"));
    assert_eq!(target.cmd("HEX 0 100", "@HEX"), hex(&data), "{what}");
    data
}

// ---------------------------------------------------------------- scenarios

fn write_100(tls: Option<&str>) {
    let mut target = Target::spawn(tls, 4096);
    let mut ini = Initiator::new(tls, &target);
    write_100_checked(&mut ini, &mut target, 1, "WRITE");
    assert_eq!(
        target.cmd("HEX 100 8", "@HEX"),
        "00".repeat(8),
        "bytes after the WRITE changed"
    );
    ini.close();
    target.quit();
}

/// Over `tcp` a WRITE of one segment up to 8 KiB goes as one active
/// message the target copies and answers; larger or scattered WRITEs go as
/// puts. Data is compared byte for byte either way, and the target counts
/// what it served. A small WRITE into memory the target no longer has
/// registered is refused there and fails here, leaving the bytes alone.
#[test]
fn small_writes_go_in_one_message_over_tcp() {
    let mut target = Target::spawn(Some("tcp"), 64 << 10);
    let mut ini = Initiator::new(Some("tcp"), &target);
    assert_eq!(ini.t.inline_write_max(), 8192);
    let data = filled(16 << 10, 5);
    let reg = ini.register(&data);
    let base = data.as_ptr() as u64;
    for (i, &(off, len)) in [(0u64, 100u64), (4096, 4096), (8192, 8192)]
        .iter()
        .enumerate()
    {
        ini.run(XferOp::Write, reg, &target, &[(base + off, off, len)], None)
            .expect("small WRITE");
        let got = target.cmd(&format!("HEX {off} {len}"), "@HEX");
        assert_eq!(got, hex(&data[off as usize..(off + len) as usize]));
        assert_eq!(target.cmd("SMALL", "@SMALL"), format!("{} 0", i + 1));
    }
    // Larger than 8 KiB, or two segments: puts, not counted.
    ini.run(XferOp::Write, reg, &target, &[(base, 16384, 8193)], None)
        .expect("WRITE of 8193 bytes");
    ini.run(
        XferOp::Write,
        reg,
        &target,
        &[(base, 32768, 64), (base + 128, 32768 + 128, 64)],
        None,
    )
    .expect("WRITE of two segments");
    assert_eq!(
        target.cmd("HEX 16384 8193", "@HEX"),
        hex(&data[..8193]),
        "large WRITE"
    );
    assert_eq!(target.cmd("SMALL", "@SMALL"), "3 0");
    // A notification still follows the data.
    ini.run(
        XferOp::Write,
        reg,
        &target,
        &[(base, 0, 64)],
        Some(b"after"),
    )
    .expect("small WRITE with a notification");
    let note = target.expect("@NOTE");
    assert!(note.starts_with(&hex(b"after")), "{note}");
    // Refused where the target deregistered its memory.
    target.cmd("FILL 9", "@OK");
    target.cmd("UNREG", "@OK");
    let err = ini
        .run(XferOp::Write, reg, &target, &[(base, 0, 64)], None)
        .expect_err("a small WRITE into deregistered memory");
    assert!(
        err.to_string().starts_with(
            "UCX error -7: WRITE refused by the peer: not inside memory it has registered: "
        ),
        "{err}"
    );
    assert_eq!(target.cmd("SMALL", "@SMALL"), "4 1");
    assert_eq!(
        target.cmd("HEX 0 64", "@HEX"),
        hex(&filled(64 << 10, 9)[..64])
    );
    ini.close();
    target.quit();
}

fn read_100(tls: Option<&str>) {
    let mut target = Target::spawn(tls, 4096);
    target.cmd("FILL 42", "@OK");
    let expected = filled(4096, 42);
    let mut ini = Initiator::new(tls, &target);
    let data = vec![0u8; 100];
    let reg = ini.register(&data);
    ini.run(
        XferOp::Read,
        reg,
        &target,
        &[(data.as_ptr() as u64, 300, 100)],
        None,
    )
    .expect("READ");
    assert_eq!(data, expected[300..400]);
    ini.close();
    target.quit();
}

/// 128 blocks of 16 KiB, scattered on both sides, random data; checked by
/// the target's checksum and by reading back with another scatter.
fn kv_scattered(tls: Option<&str>) {
    const BLOCK: usize = 16 * 1024;
    const BLOCKS: usize = 128;
    let remote_len = 2 * BLOCKS * BLOCK;
    let mut target = Target::spawn(tls, remote_len);
    let mut ini = Initiator::new(tls, &target);
    let src = filled(3 * BLOCKS * BLOCK, 7);
    let back = vec![0u8; 3 * BLOCKS * BLOCK];
    let src_reg = ini.register(&src);
    let back_reg = ini.register(&back);
    // Block i: local slot (i * 37) % 384, remote slot (i * 91) % 256, read back to slot (i * 53) % 384.
    let local_slot = |i: usize| (i * 37) % (3 * BLOCKS);
    let remote_slot = |i: usize| (i * 91) % (2 * BLOCKS);
    let back_slot = |i: usize| (i * 53) % (3 * BLOCKS);
    let parts: Vec<_> = (0..BLOCKS)
        .map(|i| {
            (
                (src.as_ptr() as usize + local_slot(i) * BLOCK) as u64,
                (remote_slot(i) * BLOCK) as u64,
                BLOCK as u64,
            )
        })
        .collect();
    ini.run(XferOp::Write, src_reg, &target, &parts, None)
        .expect("scattered WRITE");
    let mut image = vec![0u8; remote_len];
    for i in 0..BLOCKS {
        let (l, r) = (local_slot(i) * BLOCK, remote_slot(i) * BLOCK);
        image[r..r + BLOCK].copy_from_slice(&src[l..l + BLOCK]);
    }
    assert_eq!(
        target.cmd("SUM", "@SUM"),
        format!("{:016x}", checksum(&image))
    );
    let parts: Vec<_> = (0..BLOCKS)
        .map(|i| {
            (
                (back.as_ptr() as usize + back_slot(i) * BLOCK) as u64,
                (remote_slot(i) * BLOCK) as u64,
                BLOCK as u64,
            )
        })
        .collect();
    ini.run(XferOp::Read, back_reg, &target, &parts, None)
        .expect("scattered READ");
    for i in 0..BLOCKS {
        let (l, b) = (local_slot(i) * BLOCK, back_slot(i) * BLOCK);
        assert!(
            src[l..l + BLOCK] == back[b..b + BLOCK],
            "block {i} differs after the round trip"
        );
    }
    ini.close();
    target.quit();
}

fn large_64mib(tls: Option<&str>) {
    const LEN: usize = 64 << 20;
    let mut target = Target::spawn(tls, LEN);
    let mut ini = Initiator::new(tls, &target);
    let src = filled(LEN, 64);
    let back = vec![0u8; LEN];
    let src_reg = ini.register(&src);
    let back_reg = ini.register(&back);
    let started = Instant::now();
    ini.run(
        XferOp::Write,
        src_reg,
        &target,
        &[(src.as_ptr() as u64, 0, LEN as u64)],
        None,
    )
    .expect("WRITE 64 MiB");
    let wrote = started.elapsed();
    assert_eq!(
        target.cmd("SUM", "@SUM"),
        format!("{:016x}", checksum(&src))
    );
    ini.run(
        XferOp::Read,
        back_reg,
        &target,
        &[(back.as_ptr() as u64, 0, LEN as u64)],
        None,
    )
    .expect("READ 64 MiB");
    assert!(src == back, "64 MiB differ after the round trip");
    eprintln!(
        "64 MiB WRITE over {:?}: {wrote:?}",
        tls.unwrap_or("default transports")
    );
    ini.close();
    target.quit();
}

/// A notification attached to a WRITE arrives after the data; binary
/// payloads (zero bytes included) arrive intact; stand-alone notifications
/// work; an oversized one is refused with its length.
fn notification(tls: Option<&str>) {
    const LEN: usize = 1 << 20;
    let mut target = Target::spawn(tls, LEN);
    let mut ini = Initiator::new(tls, &target);
    let src = filled(LEN, 99);
    let reg = ini.register(&src);
    let note = b"block\0ready\xff\x00\x01";
    ini.run(
        XferOp::Write,
        reg,
        &target,
        &[(src.as_ptr() as u64, 0, LEN as u64)],
        Some(note),
    )
    .expect("WRITE with note");
    let line = target.expect("@NOTE");
    assert_eq!(
        line,
        format!("{} {:016x}", hex(note), checksum(&src)),
        "notification before the data"
    );

    let peer = ini.peer.take().expect("peer");
    let mut msg = filled(4096, 5);
    msg[17] = 0;
    ini.t
        .send_notification(&peer, &msg)
        .expect("send notification");
    let line = target.expect("@NOTE");
    assert_eq!(line.split(' ').next(), Some(hex(&msg).as_str()));
    let too_long = vec![1u8; 4097];
    assert_eq!(
        ini.t.send_notification(&peer, &too_long),
        Err(Error::NotificationTooLong {
            len: 4097,
            max: 4096
        })
    );
    // Let the stand-alone notification's request finish before closing.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        assert!(
            ini.t.poll().is_none(),
            "a stand-alone notification reported a completion"
        );
        if !ini.t.progress() {
            break;
        }
    }
    ini.peer = Some(peer);
    ini.close();
    target.quit();
}

/// 64 WRITEs in flight at once, each to its own slice of the target, each
/// completed exactly once; the target's buffer then matches byte for byte
/// (by checksum) and a READ of every slice returns the data.
fn many_in_flight(tls: Option<&str>) {
    const XFERS: usize = 64;
    const SLICE: usize = 64 * 1024;
    let mut target = Target::spawn(tls, XFERS * SLICE);
    let mut ini = Initiator::new(tls, &target);
    let src = filled(XFERS * SLICE, 64);
    let back = vec![0u8; XFERS * SLICE];
    let src_reg = ini.register(&src);
    let back_reg = ini.register(&back);
    for (op, reg, base) in [
        (XferOp::Write, src_reg, src.as_ptr() as u64),
        (XferOp::Read, back_reg, back.as_ptr() as u64),
    ] {
        let mut pending = std::collections::BTreeSet::new();
        for i in 0..XFERS {
            let off = (i * SLICE) as u64;
            let parts = [(base + off, off, SLICE as u64)];
            let token = Token(1000 + i as u64);
            match ini
                .post(op, reg, &target, &parts, None, token)
                .expect("post")
            {
                PostStatus::Done => {}
                PostStatus::InProgress => {
                    pending.insert(token);
                }
            }
        }
        let deadline = Instant::now() + XFER_TIMEOUT;
        while !pending.is_empty() {
            assert!(
                Instant::now() < deadline,
                "{} transfers never completed",
                pending.len()
            );
            if let Some(c) = ini.t.poll() {
                assert!(
                    pending.remove(&c.token),
                    "unexpected or repeated {:?}",
                    c.token
                );
                c.result.expect("transfer");
            }
        }
        if op == XferOp::Write {
            assert_eq!(
                target.cmd("SUM", "@SUM"),
                format!("{:016x}", checksum(&src))
            );
        }
    }
    assert!(src == back, "data differ after 64 WRITEs and 64 READs");
    ini.close();
    target.quit();
}

/// Cancelling an in-flight transfer returns Ok, no completion follows, and
/// the transport stays usable.
fn cancel(tls: Option<&str>) {
    const LEN: usize = 32 << 20;
    let mut target = Target::spawn(tls, LEN);
    let mut ini = Initiator::new(tls, &target);
    let src = filled(LEN, 3);
    let reg = ini.register(&src);
    let chunk = 512 * 1024;
    let parts: Vec<_> = (0..LEN / chunk)
        .map(|i| {
            (
                src.as_ptr() as u64 + (i * chunk) as u64,
                (i * chunk) as u64,
                chunk as u64,
            )
        })
        .collect();
    let st = ini
        .post(
            XferOp::Write,
            reg,
            &target,
            &parts,
            Some(b"never"),
            Token(11),
        )
        .expect("post");
    let started = Instant::now();
    if st == PostStatus::InProgress {
        ini.t.cancel(Token(11)).expect("cancel");
    }
    eprintln!(
        "cancel over {:?}: post gave {st:?}, cancel took {:?}",
        tls,
        started.elapsed()
    );
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "cancel took {:?}",
        started.elapsed()
    );
    // Unknown tokens are fine to cancel.
    ini.t
        .cancel(Token(999))
        .expect("cancel of an unknown token");
    let quiet = Instant::now() + Duration::from_millis(300);
    while Instant::now() < quiet {
        assert_eq!(ini.t.poll(), None, "completion after cancel");
    }
    // Still usable: a fresh WRITE goes through and is correct.
    ini.run(
        XferOp::Write,
        reg,
        &target,
        &[(src.as_ptr() as u64, 0, 100)],
        None,
    )
    .expect("WRITE after cancel");
    assert_eq!(target.cmd("HEX 0 100", "@HEX"), hex(&src[..100]));
    ini.close();
    target.quit();
}

/// Killing the target mid-stream fails every in-flight transfer within a
/// few seconds; later posts fail at once.
fn peer_death(tls: Option<&str>) {
    const LEN: usize = 8 << 20;
    let mut target = Target::spawn(tls, LEN);
    let mut ini = Initiator::new(tls, &target);
    let src = filled(LEN, 8);
    let reg = ini.register(&src);
    let parts = [(src.as_ptr() as u64, 0, LEN as u64)];
    let mut in_flight: Vec<u64> = Vec::new();
    let mut next = 100u64;
    let mut completed = 0;
    let mut killed_at: Option<Instant> = None;
    let mut failures = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline, "stream did not end");
        while killed_at.is_none() && in_flight.len() < 4 {
            match ini
                .post(XferOp::Write, reg, &target, &parts, None, Token(next))
                .expect("post before kill")
            {
                PostStatus::Done => completed += 1,
                PostStatus::InProgress => in_flight.push(next),
            }
            next += 1;
        }
        if killed_at.is_none() && completed >= 3 {
            target.child.kill().expect("kill target");
            killed_at = Some(Instant::now());
        }
        if let Some(c) = ini.t.poll() {
            let pos = in_flight
                .iter()
                .position(|&t| t == c.token.0)
                .expect("known token");
            in_flight.swap_remove(pos);
            match c.result {
                Ok(()) => completed += 1,
                Err(e) => {
                    assert!(killed_at.is_some(), "failure before the kill: {e}");
                    assert!(
                        matches!(
                            e,
                            Error::RemoteDisconnected { .. }
                                | Error::Backend { backend: "UCX", .. }
                        ),
                        "unexpected error {e:?}"
                    );
                    failures += 1;
                }
            }
        }
        if let Some(at) = killed_at {
            if in_flight.is_empty() {
                eprintln!(
                    "in-flight transfers ended {:?} after the kill ({failures} failed)",
                    at.elapsed()
                );
                break;
            }
            assert!(
                at.elapsed() < Duration::from_secs(8),
                "{} transfers still in flight 8 s after the kill",
                in_flight.len()
            );
        }
    }
    // The peer is dead: a new post fails now or its completion does.
    let failed_at = Instant::now();
    let err = loop {
        match ini.post(XferOp::Write, reg, &target, &parts, None, Token(1)) {
            Err(e) => break e,
            Ok(PostStatus::InProgress) => {
                if let Err(e) = wait(&mut ini.t, Token(1), Duration::from_secs(10)) {
                    break e;
                }
            }
            Ok(PostStatus::Done) => {}
        }
        assert!(
            failed_at.elapsed() < Duration::from_secs(8),
            "posts to a dead peer keep succeeding"
        );
    };
    assert!(
        matches!(
            err,
            Error::RemoteDisconnected { .. } | Error::Backend { backend: "UCX", .. }
        ),
        "{err:?}"
    );
    ini.close();
    drop(target);
}

/// Sends `sig` (`-STOP`, `-CONT`) to process `pid`.
fn signal(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(st.success(), "kill {sig} {pid}: {st}");
}

/// Resumes a stopped process when dropped (also when the test fails).
struct Resume(u32);

impl Drop for Resume {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.0.to_string()])
            .status();
    }
}

/// A target that stops answering (SIGSTOP; its kernel still accepts the
/// connection's bytes): transfers in flight fail within the deadline plus
/// slack, one with `TimedOut`, none earlier than the deadline; later posts
/// and notifications to the peer fail at once with `RemoteDisconnected`;
/// a cancel on a new endpoint returns at once and deregistering its
/// memory is bounded; after SIGCONT a new endpoint moves data correctly.
fn deadline(tls: Option<&str>) {
    const LEN: usize = 4 << 20;
    const DEADLINE: Duration = Duration::from_millis(1000);
    const SLACK: Duration = Duration::from_millis(1500);
    let mut target = Target::spawn(tls, LEN);
    let mut cfg = config(tls);
    cfg.op_timeout = Some(DEADLINE);
    cfg.cancel_timeout_ms = 300;
    let mut ini = Initiator::with_config(&cfg, &target);
    let src = filled(LEN, 21);
    let mut dst = vec![0u8; LEN];
    let reg = ini.register(&src);
    let dreg = ini.register(&dst);
    let whole = [(src.as_ptr() as u64, 0, LEN as u64)];
    ini.run(XferOp::Write, reg, &target, &whole, None)
        .expect("WRITE while the target runs");
    assert_eq!(
        target.cmd("SUM", "@SUM"),
        format!("{:016x}", checksum(&src))
    );

    let pid = target.child.id();
    let resume = Resume(pid);
    signal(pid, "-STOP");
    std::thread::sleep(Duration::from_millis(50));
    let t0 = Instant::now();
    let st = ini
        .post(
            XferOp::Write,
            reg,
            &target,
            &whole,
            Some(b"late"),
            Token(31),
        )
        .expect("post WRITE");
    assert_eq!(
        st,
        PostStatus::InProgress,
        "WRITE done with the target stopped"
    );
    let read = [(dst.as_ptr() as u64, 0, 4096)];
    let st = ini
        .post(XferOp::Read, dreg, &target, &read, None, Token(32))
        .expect("post READ");
    assert_eq!(
        st,
        PostStatus::InProgress,
        "READ done with the target stopped"
    );
    let mut results = Vec::new();
    while results.len() < 2 {
        if let Some(c) = ini.t.poll() {
            assert!(
                c.token == Token(31) || c.token == Token(32),
                "unexpected token {:?}",
                c.token
            );
            results.push((c.token, c.result, t0.elapsed()));
        }
        assert!(
            t0.elapsed() < DEADLINE + SLACK,
            "transfers unfinished {:?} after the stop: {results:?}",
            t0.elapsed()
        );
    }
    eprintln!("deadline over {tls:?}: {results:?}");
    assert!(results[0].0 != results[1].0, "{results:?}");
    let mut timed_out = 0;
    for (token, result, at) in &results {
        assert!(
            *at >= DEADLINE,
            "{token:?} ended after {at:?}, before the deadline"
        );
        match result {
            Err(Error::TimedOut { after_ms }) => {
                assert!(
                    (1000..1000 + SLACK.as_millis() as u64).contains(after_ms),
                    "{token:?}: after_ms {after_ms}"
                );
                timed_out += 1;
            }
            // The peer's other transfer, ended by the forced close.
            Err(Error::RemoteDisconnected { .. }) => {}
            other => panic!("{token:?} ended with {other:?}"),
        }
    }
    assert!(timed_out >= 1, "{results:?}");
    // The tokens never complete again.
    let quiet = Instant::now() + Duration::from_millis(300);
    while Instant::now() < quiet {
        assert_eq!(ini.t.poll(), None, "completion after the timeout");
    }
    // The endpoint is treated as failed: refused at once.
    let at = Instant::now();
    assert!(matches!(
        ini.post(XferOp::Write, reg, &target, &whole, None, Token(33)),
        Err(Error::RemoteDisconnected { .. })
    ));
    assert!(matches!(
        ini.t
            .send_notification(ini.peer.as_ref().expect("peer"), b"x"),
        Err(Error::RemoteDisconnected { .. })
    ));
    assert!(
        at.elapsed() < Duration::from_millis(100),
        "{:?}",
        at.elapsed()
    );

    // A cancel does not wait for the stopped target.
    let at = Instant::now();
    ini.reconnect(&target);
    assert!(
        at.elapsed() < Duration::from_secs(2),
        "reconnect took {:?}",
        at.elapsed()
    );
    let st = ini
        .post(XferOp::Read, dreg, &target, &read, None, Token(34))
        .expect("post READ on the new endpoint");
    assert_eq!(
        st,
        PostStatus::InProgress,
        "READ done with the target stopped"
    );
    let at = Instant::now();
    ini.t.cancel(Token(34)).expect("cancel");
    let took = at.elapsed();
    assert!(took < Duration::from_millis(200), "cancel took {took:?}");
    let quiet = Instant::now() + Duration::from_millis(200);
    while Instant::now() < quiet {
        assert_eq!(ini.t.poll(), None, "completion after cancel");
    }
    // Its memory goes once the request is ended (the endpoint is closed
    // after the cancel timeout), not never.
    let at = Instant::now();
    ini.t.deregister(ini.regs.remove(dreg));
    let took = at.elapsed();
    assert!(took < Duration::from_secs(3), "deregister took {took:?}");
    assert!(matches!(
        ini.post(XferOp::Write, reg, &target, &read, None, Token(35)),
        Err(Error::RemoteDisconnected { .. })
    ));

    // Resumed and reconnected: data moves again, byte for byte, and the
    // timed-out WRITE's notification was never sent.
    signal(pid, "-CONT");
    drop(resume);
    // The resumed target catches up first; on a loaded machine that can
    // take longer than the short deadline used above, so the same
    // transport goes back to the default deadline before reconnecting.
    ini.t.set_op_timeout(UcxConfig::default().op_timeout);
    ini.reconnect(&target);
    let fresh = write_100_checked(&mut ini, &mut target, 22, "WRITE after reconnect");
    dst.fill(0);
    let back = ini.register(&dst);
    ini.run(
        XferOp::Read,
        back,
        &target,
        &[(dst.as_ptr() as u64, 0, 100)],
        None,
    )
    .expect("READ after reconnect");
    assert_eq!(dst[..100], fresh[..]);
    ini.close();
    target.quit();
}

/// A target stalled with WRITEs queued in its socket, whose initiator
/// times them out and then goes away (closes its transport, as one that
/// exits after the failure), must survive its resumption and go on
/// serving. UCX 1.13 over `tcp` aborts it instead (`ucp_put_handler`:
/// "unexpected error: Endpoint timeout"; README, "Known limitation"),
/// hence ignored; run it with `--ignored` to check a fix or another UCX
/// version. (With the initiator alive after the timeout, the same target
/// survived: the timeout's forced close alone did not set it off.)
#[test]
#[ignore = "UCX 1.13 over tcp aborts the resumed target (README: Known limitation)"]
fn stalled_target_survives_its_initiator_going_away() {
    const LEN: usize = 64 << 20;
    const PIECE: usize = LEN / 4;
    let tls = Some("tcp");
    let mut target = Target::spawn(tls, LEN);
    let mut cfg = config(tls);
    cfg.op_timeout = Some(Duration::from_millis(300));
    let mut ini = Initiator::with_config(&cfg, &target);
    let src = filled(LEN, 41);
    let reg = ini.register(&src);
    let pid = target.child.id();
    let resume = Resume(pid);
    for i in 0..4u64 {
        let part = [(
            src.as_ptr() as u64 + i * PIECE as u64,
            i * PIECE as u64,
            PIECE as u64,
        )];
        ini.post(XferOp::Write, reg, &target, &part, None, Token(50 + i))
            .expect("post WRITE");
    }
    // Stopped while the WRITEs stream in, as a target descheduled mid-burst.
    let streaming = Instant::now() + Duration::from_millis(20);
    while Instant::now() < streaming {
        assert_eq!(ini.t.poll(), None, "a 16 MiB WRITE done within 20 ms");
    }
    signal(pid, "-STOP");
    // Each fails at its deadline, or with the endpoint that the first
    // timeout closed.
    let (mut ended, mut timed_out) = (0, 0);
    let until = Instant::now() + Duration::from_secs(5);
    while ended < 4 {
        assert!(Instant::now() < until, "{ended} of 4 WRITEs ended");
        if let Some(c) = ini.t.poll() {
            match c.result {
                Err(Error::TimedOut { after_ms }) if after_ms >= 300 => timed_out += 1,
                Err(Error::RemoteDisconnected { .. }) => {}
                _ => panic!("{c:?} with the target stopped"),
            }
            ended += 1;
        }
    }
    assert!(timed_out >= 1, "none of the 4 WRITEs timed out");
    // The initiator gives up altogether (as one whose transfer failed
    // and that exits), while the target is still stopped.
    ini.close();
    std::thread::sleep(Duration::from_millis(100));
    signal(pid, "-CONT");
    drop(resume);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        target.child.try_wait().expect("try_wait"),
        None,
        "the target died after it resumed"
    );
    // Still serving: a new initiator moves data, byte for byte.
    let mut ini = Initiator::new(tls, &target);
    write_100_checked(&mut ini, &mut target, 42, "WRITE after the resumption");
    ini.close();
    target.quit();
}

/// A READ cancelled while its target is stopped keeps running inside UCX:
/// its memory is reported in use (so the engine refuses to deregister it)
/// until UCX lets go; once it is not, nothing writes it any more.
#[test]
fn cancelled_read_keeps_its_memory_in_use_until_ucx_lets_go() {
    const LEN: usize = 1 << 20;
    let target = Target::spawn(Some("tcp"), LEN);
    let mut ini = Initiator::new(Some("tcp"), &target);
    let mut dst = vec![0u8; LEN];
    let dreg = ini.register(&dst);
    let pid = target.child.id();
    let resume = Resume(pid);
    signal(pid, "-STOP");
    std::thread::sleep(Duration::from_millis(50));
    let read = [(dst.as_ptr() as u64, 0, LEN as u64)];
    let st = ini
        .post(XferOp::Read, dreg, &target, &read, None, Token(61))
        .expect("post READ");
    assert_eq!(st, PostStatus::InProgress);
    ini.t.cancel(Token(61)).expect("cancel");
    assert!(
        ini.t.in_use(&ini.regs[dreg]),
        "a cancelled READ still running in UCX left its memory reported free"
    );
    drop(resume);
    let deadline = Instant::now() + Duration::from_secs(20);
    while ini.t.in_use(&ini.regs[dreg]) {
        assert!(Instant::now() < deadline, "UCX never let go of the READ");
        ini.t.poll();
        std::thread::sleep(Duration::from_millis(1));
    }
    // Free from here on: a canary in the buffer stays.
    dst.fill(0x5c);
    let quiet = Instant::now() + Duration::from_millis(300);
    while Instant::now() < quiet {
        ini.t.poll();
    }
    assert!(
        dst.iter().all(|&b| b == 0x5c),
        "memory written after it was free"
    );
    ini.close();
    target.quit();
}

/// Without peer failure detection UCX cannot end a request to a stopped
/// peer (a forced close is undefined behaviour in that mode), so dropping
/// the transport must leave its UCX state, and the memory the request
/// writes, alone rather than free it under the request.
#[test]
fn drop_without_peer_failure_detection_leaves_running_requests_alone() {
    const LEN: usize = 1 << 20;
    let target = Target::spawn(Some("tcp"), LEN);
    let mut cfg = config(Some("tcp"));
    cfg.peer_failure_detection = false;
    cfg.close_timeout_ms = 100;
    let mut ini = Initiator::with_config(&cfg, &target);
    let dst = vec![0xa5u8; LEN];
    let dreg = ini.register(&dst);
    let pid = target.child.id();
    let _resume = Resume(pid);
    signal(pid, "-STOP");
    std::thread::sleep(Duration::from_millis(50));
    let read = [(dst.as_ptr() as u64, 0, LEN as u64)];
    let st = ini
        .post(XferOp::Read, dreg, &target, &read, None, Token(5))
        .expect("post READ");
    assert_eq!(
        st,
        PostStatus::InProgress,
        "READ done with the target stopped"
    );
    let before = kvxfer_ucx::abandoned_transports();
    drop(ini);
    assert_eq!(
        kvxfer_ucx::abandoned_transports(),
        before + 1,
        "the transport freed UCX state a running request uses"
    );
    signal(pid, "-CONT");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        dst.iter().all(|&b| b == 0xa5),
        "memory written after the drop"
    );
    // It stays registered with the abandoned worker: keep it allocated.
    std::mem::forget(dst);
}

/// One module of tests, each calling the scenario of the same name with
/// the given `UCX_TLS` (`None`: UCX's default).
macro_rules! suite {
    ($module:ident, $tls:expr, [$($name:ident),* $(,)?]) => {
        mod $module {
            $(#[test] fn $name() { super::$name($tls) })*
        }
    };
}

suite!(
    default_tls,
    None,
    [
        write_100,
        read_100,
        kv_scattered,
        large_64mib,
        notification,
        many_in_flight,
        cancel,
        peer_death,
        deadline
    ]
);
suite!(
    tcp,
    Some("tcp"),
    [
        write_100,
        read_100,
        kv_scattered,
        large_64mib,
        notification,
        many_in_flight,
        cancel,
        peer_death,
        deadline
    ]
);
// Shared memory only, without peer failure detection (no peer-death or
// deadline test: a dead or stopped peer is not detected there).
suite!(
    shm,
    Some(super::SHM_ONLY),
    [
        write_100,
        read_100,
        kv_scattered,
        large_64mib,
        notification,
        many_in_flight,
        cancel
    ]
);

// ---------------------------------------------------------------- one process

#[test]
fn invalid_inputs_are_refused() {
    let mut t = UcxTransport::new(&UcxConfig::default()).expect("transport");
    let mut other = UcxTransport::new(&UcxConfig::default()).expect("second transport");
    assert_eq!(t.name(), "UCX");
    assert!(t.capabilities().can_cancel);

    let buf = vec![0u8; 4096];
    let addr = buf.as_ptr() as u64;
    assert_eq!(
        t.register(&Region::vram(addr, 4096, 0)).err(),
        Some(Error::UnsupportedMemKind {
            backend: "UCX",
            kind: kvxfer_core::MemKind::Vram
        })
    );
    assert_eq!(
        t.register(&Region::dram(addr, 0)).err(),
        Some(Error::InvalidRegion { addr, len: 0 })
    );
    assert_eq!(
        t.register(&Region::dram(u64::MAX - 1, 16)).err(),
        Some(Error::InvalidRegion {
            addr: u64::MAX - 1,
            len: 16
        })
    );

    let reg = t.register(&Region::dram(addr, 4096)).expect("register");
    let mut tiny = [0u8; 1];
    assert!(matches!(
        t.pack_key(&reg, &mut tiny),
        Err(Error::BufferTooSmall { available: 1, .. })
    ));
    assert!(matches!(
        t.local_address(&mut tiny),
        Err(Error::BufferTooSmall { available: 1, .. })
    ));
    let mut key = [0u8; 4096];
    let klen = t.pack_key(&reg, &mut key).expect("pack");
    assert!(klen > 0);
    assert_eq!(
        t.pack_key(&reg, &mut key[..klen - 1]),
        Err(Error::BufferTooSmall {
            needed: klen as u64,
            available: klen as u64 - 1
        })
    );
    let mut own = [0u8; 4096];
    let alen = t.local_address(&mut own).expect("address");
    assert_eq!(&own[..alen], t.worker_address());
    assert_eq!(
        t.local_address(&mut own[..alen - 1]),
        Err(Error::BufferTooSmall {
            needed: alen as u64,
            available: alen as u64 - 1
        })
    );
    assert!(matches!(
        other.pack_key(&reg, &mut key),
        Err(Error::Backend { backend: "UCX", .. })
    ));

    assert!(matches!(
        t.connect(&[]),
        Err(Error::Backend { backend: "UCX", .. })
    ));
    let mut oaddr = [0u8; 4096];
    let olen = other.local_address(&mut oaddr).expect("address");
    let peer = t
        .connect(&oaddr[..olen])
        .expect("connect to the second transport");
    assert!(matches!(
        t.unpack_key(&peer, &Region::dram(addr, 4096), &[]),
        Err(Error::Backend { .. })
    ));
    assert!(matches!(
        other.unpack_key(&peer, &Region::dram(addr, 4096), &key[..klen]),
        Err(Error::Backend { backend: "UCX", .. })
    ));
    assert_eq!(
        t.send_notification(&peer, &[0u8; 5000]),
        Err(Error::NotificationTooLong {
            len: 5000,
            max: 4096
        })
    );

    // Segments must lie inside the local registration and the remote key's
    // region; the error names the side, index, address and registration.
    let obuf = vec![0u8; 4096];
    let oaddr_mem = obuf.as_ptr() as u64;
    let oreg = other
        .register(&Region::dram(oaddr_mem, 4096))
        .expect("register");
    let mut okey = [0u8; 4096];
    let oklen = other.pack_key(&oreg, &mut okey).expect("pack");
    let rkey = t
        .unpack_key(&peer, &Region::dram(oaddr_mem, 4096), &okey[..oklen])
        .expect("unpack");
    let seg = |local_addr: u64, remote_addr: u64, len: u64| Segment {
        local_addr,
        remote_addr,
        len,
        local: &reg,
        remote: &rkey,
        remote_region_addr: oaddr_mem,
    };
    let outside = |region_addr, region_len| DescError::OutsideRegistration {
        region_addr,
        region_len,
    };
    assert_eq!(
        t.post(
            XferOp::Write,
            &peer,
            kvxfer_core::Segments::from(&[seg(addr + 4000, oaddr_mem, 200)][..]),
            None,
            Token(1)
        ),
        Err(Error::InvalidDesc {
            side: Side::Local,
            index: 0,
            addr: addr + 4000,
            len: 200,
            reason: outside(addr, 4096)
        })
    );
    assert_eq!(
        t.post(
            XferOp::Read,
            &peer,
            kvxfer_core::Segments::from(
                &[seg(addr, oaddr_mem, 8), seg(addr + 8, oaddr_mem + 4090, 8)][..]
            ),
            None,
            Token(2)
        ),
        Err(Error::InvalidDesc {
            side: Side::Remote,
            index: 1,
            addr: oaddr_mem + 4090,
            len: 8,
            reason: outside(oaddr_mem, 4096)
        })
    );
    assert_eq!(
        t.post(
            XferOp::Write,
            &peer,
            kvxfer_core::Segments::from(&[seg(addr, oaddr_mem, 0)][..]),
            None,
            Token(3)
        ),
        Err(Error::InvalidDesc {
            side: Side::Local,
            index: 0,
            addr,
            len: 0,
            reason: DescError::ZeroLength
        })
    );
    // A key unpacked for one peer is refused on another.
    let peer2 = t.connect(&oaddr[..olen]).expect("second endpoint");
    assert!(matches!(
        t.post(
            XferOp::Write,
            &peer2,
            kvxfer_core::Segments::from(&[seg(addr, oaddr_mem, 8)][..]),
            None,
            Token(4)
        ),
        Err(Error::Backend { backend: "UCX", .. })
    ));
    t.release_key(rkey);
    t.disconnect(peer2);
    t.disconnect(peer);
    t.deregister(reg);
    other.deregister(oreg);
}
