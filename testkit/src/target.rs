//! The target process: this test binary run again, serving one buffer.
//!
//! A test spawns its own executable with the module's `target_process`
//! test selected and [`ROLE_ENV`] set. The target builds the backend's
//! transport, registers a buffer of [`LEN_ENV`] bytes and prints, one line
//! each, `@ADDR <hex>`, `@REGION <addr> <len> <device> <dram|vram>`,
//! `@KEY <hex>` and `@READY`. It then polls its transport while it answers
//! commands from stdin, at once and with no progress in between (so a
//! WRITE reported done must already be there):
//!
//! * `FILL <seed>`: fills the buffer with the seed's pattern; `@OK`;
//! * `SUM [<off> <len>]`: `@SUM <checksum>` of the buffer (or a part);
//! * `HEX <off> <len>`: `@HEX <hex>` of a part;
//! * `WORDS <byte>`: `@WORDS <n>`, the aligned 8-byte words holding only
//!   `<byte>` (hex);
//! * `UNREG`: deregisters the buffer; `@OK`;
//! * `QUIT`: exits;
//! * anything else: `@` and the backend's [`command`](crate::Backend::command)
//!   answer.
//!
//! Each notification is printed when seen as `@NOTE <hex> <checksum of the
//! whole buffer at that moment>`.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant};

use kvxfer_core::{MemKind, Region, Transport};

use crate::{checksum, hex, unhex, Backend};

/// Environment variable that makes `target_process` serve.
pub const ROLE_ENV: &str = "KVXFER_TESTKIT_ROLE";
/// Environment variable: the target's buffer length.
pub const LEN_ENV: &str = "KVXFER_TESTKIT_LEN";
/// How long the test waits for one line of the target.
pub const LINE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a target serves at most.
const TARGET_LIFETIME: Duration = Duration::from_secs(300);

fn kind_name(kind: MemKind) -> &'static str {
    match kind {
        MemKind::Dram => "dram",
        MemKind::Vram => "vram",
    }
}

/// Runs the target when this process was spawned as one; returns at once
/// otherwise.
pub fn serve_if_spawned<B: Backend>(backend: &B) {
    if std::env::var(ROLE_ENV).as_deref() == Ok("target") {
        serve(backend);
    }
}

fn serve<B: Backend>(backend: &B) {
    let len: usize = std::env::var(LEN_ENV)
        .expect("target length")
        .parse()
        .expect("target length");
    let mut t = backend.transport();
    let mut mem = backend.memory(len);
    let region = mem.region();
    let mut reg = Some(t.register(&region).expect("target register"));
    let mut buf = [0u8; 4096];
    let n = t.local_address(&mut buf).expect("target address");
    let mut out = std::io::stdout().lock();
    writeln!(out, "@ADDR {}", hex(&buf[..n])).unwrap();
    writeln!(
        out,
        "@REGION {} {} {} {}",
        region.addr,
        region.len,
        region.dev,
        kind_name(region.kind)
    )
    .unwrap();
    let n = t
        .pack_key(reg.as_ref().expect("registered"), &mut buf)
        .expect("target key");
    writeln!(out, "@KEY {}", hex(&buf[..n])).unwrap();
    writeln!(out, "@READY").unwrap();
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
    let started = Instant::now();
    let mut idle_since = Instant::now();
    let mut note = vec![0u8; 1 << 16];
    loop {
        assert!(
            started.elapsed() < TARGET_LIFETIME,
            "target ran longer than {TARGET_LIFETIME:?}"
        );
        if let Some(c) = t.poll() {
            panic!("the target, which posts nothing, got a completion: {c:?}");
        }
        let mut busy = false;
        while let Some(r) = t.poll_notification(&mut note) {
            let n = r.expect("notification");
            // What the buffer holds the moment the notification is seen.
            let sum = checksum(&mem.to_vec());
            writeln!(out, "@NOTE {} {sum:016x}", hex(&note[..n])).unwrap();
            out.flush().unwrap();
            busy = true;
        }
        match rx.try_recv() {
            Ok(cmd) => {
                let args: Vec<&str> = cmd.split_whitespace().collect();
                let num = |i: usize| -> usize { args[i].parse().expect("number") };
                match args.as_slice() {
                    ["FILL", seed] => {
                        mem.fill(seed.parse().expect("seed"));
                        writeln!(out, "@OK").unwrap();
                    }
                    ["SUM"] => writeln!(out, "@SUM {:016x}", checksum(&mem.to_vec())).unwrap(),
                    ["SUM", _, _] => {
                        let part = mem.read(num(1), num(2));
                        writeln!(out, "@SUM {:016x}", checksum(&part)).unwrap();
                    }
                    ["HEX", _, _] => {
                        writeln!(out, "@HEX {}", hex(&mem.read(num(1), num(2)))).unwrap()
                    }
                    ["WORDS", b] => {
                        let b = u8::from_str_radix(b, 16).expect("hex byte");
                        let n = mem
                            .to_vec()
                            .chunks_exact(8)
                            .filter(|w| w.iter().all(|&x| x == b))
                            .count();
                        writeln!(out, "@WORDS {n}").unwrap();
                    }
                    ["UNREG"] => {
                        if let Some(r) = reg.take() {
                            t.deregister(r);
                        }
                        writeln!(out, "@OK").unwrap();
                    }
                    ["QUIT"] => break,
                    _ => match backend.command(&mut t, &args) {
                        Some(answer) => writeln!(out, "@{answer}").unwrap(),
                        None => panic!("unknown command {cmd:?}"),
                    },
                }
                out.flush().unwrap();
                busy = true;
            }
            Err(TryRecvError::Disconnected) => break,
            Err(TryRecvError::Empty) => {}
        }
        if busy {
            idle_since = Instant::now();
        } else if idle_since.elapsed() > Duration::from_millis(1) {
            std::thread::sleep(Duration::from_micros(20));
        } else {
            std::thread::yield_now();
        }
    }
    if let Some(r) = reg {
        t.deregister(r);
    }
    drop(t);
    drop(mem);
}

/// The target process as the test sees it; killed when dropped.
pub struct Target {
    /// The process.
    pub child: Child,
    stdin: ChildStdin,
    /// Its protocol lines (from `@` on), in order.
    pub lines: Receiver<String>,
    /// Its transport's address.
    pub addr: Vec<u8>,
    /// Its buffer.
    pub region: Region,
    /// The packed key of its buffer.
    pub key: Vec<u8>,
}

impl Target {
    /// Spawns the target of the suite module `module` (its
    /// `module_path!()`) with a buffer of `len` bytes and reads what it
    /// publishes.
    pub fn start(module: &str, len: usize) -> Target {
        // Test names leave out the crate's name.
        let path = module.split_once("::").map_or("", |(_, rest)| rest);
        let name = if path.is_empty() {
            "target_process".to_owned()
        } else {
            format!("{path}::target_process")
        };
        let mut child = Command::new(std::env::current_exe().expect("current exe"))
            .args(["--exact", &name, "--ignored", "--nocapture"])
            .arg("--test-threads=1")
            .env(ROLE_ENV, "target")
            .env(LEN_ENV, len.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the target");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // libtest may print "test …::target_process ... " first.
                let Some(at) = line.find('@') else { continue };
                if tx.send(line[at..].to_owned()).is_err() {
                    break;
                }
            }
        });
        let mut t = Target {
            child,
            stdin,
            lines,
            addr: Vec::new(),
            region: Region::dram(0, 0),
            key: Vec::new(),
        };
        t.addr = unhex(&t.expect("@ADDR")).expect("address hex");
        let r = t.expect("@REGION");
        let f: Vec<&str> = r.split(' ').collect();
        assert_eq!(f.len(), 4, "region line {r:?}");
        t.region = Region {
            addr: f[0].parse().expect("region address"),
            len: f[1].parse().expect("region length"),
            dev: f[2].parse().expect("region device"),
            kind: match f[3] {
                "vram" => MemKind::Vram,
                _ => MemKind::Dram,
            },
        };
        t.key = unhex(&t.expect("@KEY")).expect("key hex");
        t.expect("@READY");
        t
    }

    /// The rest of the next line, which must start with `tag`.
    pub fn expect(&mut self, tag: &str) -> String {
        self.expect_while(tag, || {})
    }

    /// As [`expect`](Self::expect), calling `meanwhile` (say, to progress
    /// the initiator) until the line comes.
    pub fn expect_while(&mut self, tag: &str, mut meanwhile: impl FnMut()) -> String {
        let deadline = Instant::now() + LINE_TIMEOUT;
        loop {
            match self.lines.recv_timeout(Duration::from_millis(1)) {
                Ok(line) => {
                    let rest = line
                        .strip_prefix(tag)
                        .unwrap_or_else(|| panic!("expected {tag}, the target said {line:?}"));
                    return rest.trim_start().to_owned();
                }
                Err(RecvTimeoutError::Timeout) => {
                    assert!(
                        Instant::now() < deadline,
                        "the target did not say {tag} in {LINE_TIMEOUT:?}"
                    );
                    meanwhile();
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("the target exited before saying {tag}")
                }
            }
        }
    }

    /// Sends a command line.
    pub fn send(&mut self, cmd: &str) {
        writeln!(self.stdin, "{cmd}").expect("write to the target");
        self.stdin.flush().expect("flush to the target");
    }

    /// Sends `cmd` and returns the rest of the answer starting with `tag`.
    pub fn cmd(&mut self, cmd: &str, tag: &str) -> String {
        self.send(cmd);
        self.expect(tag)
    }

    /// The checksum of `len` bytes at `off` of the target's buffer.
    pub fn sum(&mut self, off: usize, len: usize) -> u64 {
        let s = self.cmd(&format!("SUM {off} {len}"), "@SUM");
        u64::from_str_radix(&s, 16).expect("checksum")
    }

    /// `len` bytes at `off` of the target's buffer.
    pub fn bytes(&mut self, off: usize, len: usize) -> Vec<u8> {
        unhex(&self.cmd(&format!("HEX {off} {len}"), "@HEX")).expect("hex")
    }

    /// Fills the target's buffer with the pattern of `seed`.
    pub fn fill(&mut self, seed: u64) {
        self.cmd(&format!("FILL {seed}"), "@OK");
    }

    /// Aligned 8-byte words of the target's buffer made only of `byte`.
    pub fn words(&mut self, byte: u8) -> usize {
        self.cmd(&format!("WORDS {byte:x}"), "@WORDS")
            .parse()
            .expect("count")
    }

    /// The next notification and the checksum of the target's whole
    /// buffer when it arrived.
    pub fn note(&mut self) -> (Vec<u8>, u64) {
        self.note_while(|| {})
    }

    /// As [`note`](Self::note), calling `meanwhile` until it comes.
    pub fn note_while(&mut self, meanwhile: impl FnMut()) -> (Vec<u8>, u64) {
        let line = self.expect_while("@NOTE", meanwhile);
        let (msg, sum) = line.split_once(' ').expect("note and checksum");
        (
            unhex(msg).expect("note hex"),
            u64::from_str_radix(sum, 16).expect("checksum"),
        )
    }

    /// Sends signal `sig` to the target; after `SIGSTOP`, returns once it
    /// has stopped.
    pub fn signal(&self, sig: i32) {
        let pid = self.child.id() as i32;
        // SAFETY: kill has no memory effects; the pid is our own child,
        // not yet reaped.
        let ret = unsafe { libc::kill(pid, sig) };
        assert_eq!(ret, 0, "kill({pid}, {sig})");
        if sig == libc::SIGSTOP {
            let status = format!("/proc/{pid}/stat");
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

    /// Kills the target and reaps it.
    pub fn kill(&mut self) {
        self.child.kill().expect("kill the target");
        self.child.wait().expect("reap the target");
    }

    /// Asks the target to exit; panics unless it exits cleanly.
    pub fn quit(mut self) {
        self.send("QUIT");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    assert!(status.success(), "the target exited with {status}");
                    return;
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                _ => panic!("the target did not exit after QUIT"),
            }
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // A target left stopped by a failed test must not outlive it.
            // SAFETY: as in `signal`.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGCONT) };
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}
