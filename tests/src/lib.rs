//! Plumbing for kvxfer's multi-process integration tests.
//!
//! Every agent of a scenario runs in its own process: the
//! `kvxfer-test-peer` binary of this crate, driven over its stdin and
//! stdout by the test. The pieces:
//!
//! * [`Fabric`]: which backend and transport settings a peer uses (UCX with
//!   its default transports, UCX over TCP only, libfabric with a named
//!   provider). The settings travel in the child's environment, set
//!   explicitly per child, so tests running in parallel threads never touch
//!   the test process's own environment.
//! * [`Peer`]: a running peer process. It is killed when dropped; every
//!   command waits at most a timeout ([`STEP`] unless given), and a peer that
//!   does not answer in time is killed and the test fails with the tail of
//!   its standard error.
//! * [`fill_pattern`], [`check_pattern`] (from `kvxfer-testkit`):
//!   reproducible pseudo-random data from a seed, addressable at any offset,
//!   so both ends of a transfer agree on the expected bytes without moving
//!   them through the test; [`random_seed`] picks a fresh seed per run.
//! * [`AlignedBuf`]: zeroed, page-aligned memory for registration.
//!
//! # The peer protocol
//!
//! One command per line on the peer's stdin, one reply line on its stdout,
//! prefixed with [`REPLY_PREFIX`]. A reply is `ok [fields]`, `err <text>`
//! where the text is the `Debug` form of the [`kvxfer::Error`] the agent
//! returned (compare it with [`debug_of`]), or `bad <text>` for a failed
//! check (data mismatch, a timeout inside the peer, a malformed command).
//! Binary values travel as lower-case hex ([`hex`], [`unhex`]); `-` stands
//! for "none". Descriptor pairs are written `laddr:raddr:len`, spans of a
//! pattern `addr:offset:len` (see [`spans`] and [`pairs`]), lists comma
//! separated.
//!
//! | command | reply |
//! |---|---|
//! | `alloc <len>` | `ok <addr>`: zeroed page-aligned buffer, registered |
//! | `alloc_unreg <len>` | `ok <addr>`: zeroed buffer, not registered |
//! | `dereg <addr>` | `ok` |
//! | `fill <seed> <spans>` | `ok`: each span gets pattern `seed` from its offset (seed 0: zeros) |
//! | `verify <seed> <spans>` | `ok`, or `bad` naming the first differing byte |
//! | `read_hex <addr> <len>` | `ok <hex>` |
//! | `meta` | `ok <hex>`: the agent's metadata |
//! | `load <hex>` | `ok <peer name>` |
//! | `connect <host:port>` | `ok <peer name>` |
//! | `check_remote <peer> <pairs>` | `ok` if the remote sides are known |
//! | `xfer <READ\|WRITE> <peer> <note hex\|-> <timeout ms> <pairs>` | `ok <bytes>`: one transfer, waited for |
//! | `xfer_each <READ\|WRITE> <peer> <timeout ms> <pairs>` | `ok <n> <most in flight>`: one transfer per pair, all posted before any is waited for |
//! | `notify <peer> <hex>` | `ok` |
//! | `await_notif <peer> <timeout ms> [<seed> <spans>]` | `ok <hex>`: the next notification from `peer`; the spans are verified the moment it arrives |
//! | `notifs` | `ok [peer=hex,…]`: everything received and not yet awaited |
//! | `quit` | `ok`, then the agent shuts down and the process exits 0 |
//!
//! On start the peer prints `ready <backend> <side-channel address|->`, or
//! `err <Debug of the error>` and exits with status 2 if the agent cannot
//! be created.
#![deny(missing_docs)]

pub mod scenarios;

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use kvxfer_testkit::{check_pattern, fill_pattern, hex, splitmix64, unhex};

/// What every reply line of a peer starts with; other output is ignored.
pub const REPLY_PREFIX: &str = "@kvx ";

/// Default limit for one peer command (and for a peer to start).
pub const STEP: Duration = Duration::from_secs(30);

/// Environment variable overriding where the `kvxfer-test-peer` binary is.
pub const PEER_EXE_ENV: &str = "KVXFER_TEST_PEER";

/// Environment variables a peer's transport settings may come from; a
/// [`Fabric`] sets or removes each of them in every child it configures.
pub const FABRIC_VARS: [&str; 4] = [
    "KVXFER_BACKEND",
    "TRTLLM_NIXL_KVCACHE_BACKEND",
    "UCX_TLS",
    "KVXFER_LIBFABRIC_PROVIDER",
];

/// A backend with its transport settings, given to peers through their
/// environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fabric {
    /// Short label for messages ("ucx", "ucx-tcp", "libfabric-shm", …).
    pub label: String,
    /// The backend's name as kvxfer spells it ("UCX", "LIBFABRIC").
    pub backend: &'static str,
    /// Values for [`FABRIC_VARS`] (`None`: removed from the child's
    /// environment), in that order.
    pub vars: [Option<String>; 4],
}

impl Fabric {
    /// UCX with its default transports (`UCX_TLS` removed).
    pub fn ucx() -> Fabric {
        Fabric {
            label: "ucx".into(),
            backend: "UCX",
            vars: [Some("UCX".into()), None, None, None],
        }
    }

    /// UCX restricted to TCP (`UCX_TLS=tcp`), so that bytes cross the
    /// network stack instead of shared memory.
    pub fn ucx_tcp() -> Fabric {
        Fabric {
            label: "ucx-tcp".into(),
            backend: "UCX",
            vars: [Some("UCX".into()), None, Some("tcp".into()), None],
        }
    }

    /// libfabric with `provider` (`"tcp;ofi_rxm"`, `"shm"`, …), selected
    /// through `KVXFER_BACKEND=LIBFABRIC` and `KVXFER_LIBFABRIC_PROVIDER`.
    pub fn libfabric(provider: &str) -> Fabric {
        Fabric {
            label: format!("libfabric-{provider}"),
            backend: "LIBFABRIC",
            vars: [
                Some("LIBFABRIC".into()),
                None,
                None,
                Some(provider.to_string()),
            ],
        }
    }

    /// Applies these settings to `cmd`'s environment.
    pub fn apply(&self, cmd: &mut Command) {
        for (k, v) in FABRIC_VARS.iter().zip(&self.vars) {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
    }
}

/// Where the `kvxfer-test-peer` binary is: [`PEER_EXE_ENV`] if set, else
/// beside the running test binary's folder (`target/<profile>/`), where
/// cargo builds it for this crate's integration tests.
pub fn peer_exe() -> PathBuf {
    if let Some(p) = std::env::var_os(PEER_EXE_ENV) {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("path of the running test binary");
    let mut dir = exe.parent().map(PathBuf::from).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join(format!("kvxfer-test-peer{}", std::env::consts::EXE_SUFFIX))
}

/// Options for starting a [`Peer`].
#[derive(Clone, Debug)]
pub struct PeerBuilder {
    name: String,
    fabric: Fabric,
    env: Vec<(String, Option<String>)>,
    args: Vec<String>,
    timeout: Duration,
}

impl PeerBuilder {
    /// Sets (`Some`) or removes (`None`) an environment variable of the
    /// child, after the fabric's settings.
    pub fn env(mut self, key: &str, value: Option<&str>) -> Self {
        self.env.push((key.to_string(), value.map(str::to_string)));
        self
    }

    /// Starts the agent without a progress thread (progress then happens
    /// inside its calls only).
    pub fn no_progress_thread(mut self) -> Self {
        self.args.push("--no-progress-thread".into());
        self
    }

    /// Starts the agent without a side channel.
    pub fn no_listen(mut self) -> Self {
        self.args.push("--no-listen".into());
        self
    }

    /// Names the backend in the agent's config (which wins over the
    /// environment).
    pub fn config_backend(mut self, backend: &str) -> Self {
        self.args.push("--backend".into());
        self.args.push(backend.into());
        self
    }

    /// How long the peer may take to start (default [`STEP`]).
    pub fn start_timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// Starts the peer and waits for its agent. `Err` carries the text
    /// after `err` when the agent could not be created (the `Debug` form of
    /// the error). Panics if the process cannot be run or does not answer.
    pub fn try_spawn(self) -> Result<Peer, String> {
        let exe = peer_exe();
        let mut cmd = Command::new(&exe);
        cmd.arg("--name").arg(&self.name).args(&self.args);
        self.fabric.apply(&mut cmd);
        for (k, v) in &self.env {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run peer {}: {e}", exe.display()));
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(at) = line.find(REPLY_PREFIX) {
                    if tx
                        .send(line[at + REPLY_PREFIX.len()..].to_string())
                        .is_err()
                    {
                        break;
                    }
                }
            }
        });
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let t2 = Arc::clone(&tail);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut t = t2.lock().unwrap_or_else(|e| e.into_inner());
                if t.len() == 40 {
                    t.pop_front();
                }
                t.push_back(line);
            }
        });
        let mut peer = Peer {
            name: self.name,
            label: self.fabric.label.clone(),
            child: Some(child),
            stdin: Some(stdin),
            rx,
            stderr: tail,
            backend: String::new(),
            listen: None,
        };
        let first = peer.recv(self.timeout);
        match first.split_once(' ') {
            Some(("ready", rest)) => {
                let mut it = rest.split(' ');
                peer.backend = it.next().unwrap_or_default().to_string();
                peer.listen = it.next().filter(|a| *a != "-").map(str::to_string);
                Ok(peer)
            }
            Some(("err", text)) => Err(text.to_string()),
            _ => peer.fail(&format!("unexpected first line {first:?}")),
        }
    }

    /// [`try_spawn`](Self::try_spawn), panicking if the agent cannot be
    /// created.
    pub fn spawn(self) -> Peer {
        let name = self.name.clone();
        self.try_spawn()
            .unwrap_or_else(|e| panic!("peer {name}: agent creation failed: {e}"))
    }
}

/// A running `kvxfer-test-peer` process hosting one agent. Killed (if still
/// running) when dropped.
#[derive(Debug)]
pub struct Peer {
    /// The agent's name.
    pub name: String,
    /// The fabric's label.
    pub label: String,
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    rx: Receiver<String>,
    stderr: Arc<Mutex<VecDeque<String>>>,
    /// The backend the agent reported ("UCX", "LIBFABRIC").
    pub backend: String,
    /// The agent's side-channel address, if it serves one.
    pub listen: Option<String>,
}

impl Peer {
    /// Options for a peer named `name` on `fabric`.
    pub fn builder(name: &str, fabric: &Fabric) -> PeerBuilder {
        PeerBuilder {
            name: name.to_string(),
            fabric: fabric.clone(),
            env: Vec::new(),
            args: Vec::new(),
            timeout: STEP,
        }
    }

    /// Starts a peer named `name` on `fabric` with default options.
    pub fn spawn(name: &str, fabric: &Fabric) -> Peer {
        Peer::builder(name, fabric).spawn()
    }

    /// The side-channel address; panics if the agent serves none.
    pub fn addr(&self) -> &str {
        self.listen.as_deref().expect("peer serves a side channel")
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Kills the peer and panics with `what` and the tail of its stderr.
    pub fn fail(&mut self, what: &str) -> ! {
        self.kill();
        let tail = self.stderr_tail();
        panic!(
            "peer {} ({}): {what}\n--- its stderr (last lines) ---\n{tail}",
            self.name, self.label
        );
    }

    /// The last lines the peer wrote to stderr.
    pub fn stderr_tail(&self) -> String {
        let t = self.stderr.lock().unwrap_or_else(|e| e.into_inner());
        t.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// Writes one command line without waiting for its reply (take it with
    /// [`recv`](Self::recv)).
    pub fn send(&mut self, line: &str) {
        let r = match self.stdin.as_mut() {
            Some(s) => writeln!(s, "{line}").and_then(|()| s.flush()),
            None => Err(std::io::Error::other("stdin closed")),
        };
        if let Err(e) = r {
            self.fail(&format!("cannot send {:?}: {e}", short(line)));
        }
    }

    /// The next reply line, waiting at most `timeout`; the peer is killed
    /// and the test fails if none comes.
    pub fn recv(&mut self, timeout: Duration) -> String {
        match self.rx.recv_timeout(timeout) {
            Ok(l) => l,
            Err(RecvTimeoutError::Timeout) => {
                self.fail(&format!("no reply within {} ms", timeout.as_millis()))
            }
            Err(RecvTimeoutError::Disconnected) => {
                let status = self.child.as_mut().and_then(|c| c.wait().ok());
                self.fail(&format!("exited without replying ({status:?})"))
            }
        }
    }

    /// Takes the reply of an earlier [`send`](Self::send): `Ok(fields)`
    /// for `ok`, `Err(text)` for `err`; a `bad` reply fails the test.
    pub fn reply(&mut self, timeout: Duration) -> Result<String, String> {
        let line = self.recv(timeout);
        let (kind, rest) = line.split_once(' ').unwrap_or((line.as_str(), ""));
        match kind {
            "ok" => Ok(rest.to_string()),
            "err" => Err(rest.to_string()),
            _ => self.fail(&format!("check failed: {line}")),
        }
    }

    /// Sends a command and waits up to `timeout` for its reply (see
    /// [`reply`](Self::reply)).
    pub fn cmd_timeout(&mut self, line: &str, timeout: Duration) -> Result<String, String> {
        self.send(line);
        self.reply(timeout)
    }

    /// Sends a command and waits up to [`STEP`] for its reply.
    pub fn cmd(&mut self, line: &str) -> Result<String, String> {
        self.cmd_timeout(line, STEP)
    }

    /// Sends a command that must succeed; returns the reply's fields.
    pub fn ok(&mut self, line: &str) -> String {
        match self.cmd(line) {
            Ok(r) => r,
            Err(e) => self.fail(&format!("{:?} failed: {e}", short(line))),
        }
    }

    /// Allocates and registers `len` zeroed bytes; returns their address.
    pub fn alloc(&mut self, len: u64) -> u64 {
        let r = self.ok(&format!("alloc {len}"));
        r.parse()
            .unwrap_or_else(|_| self.fail(&format!("bad address {r:?}")))
    }

    /// Writes pattern `seed` into `spans` (`(addr, pattern offset, len)`).
    pub fn fill(&mut self, seed: u64, sp: &[(u64, u64, u64)]) {
        self.ok(&format!("fill {seed} {}", spans(sp)));
    }

    /// Checks, byte for byte, that `spans` hold pattern `seed`; fails the
    /// test naming the first differing byte otherwise.
    pub fn verify(&mut self, seed: u64, sp: &[(u64, u64, u64)]) {
        self.ok(&format!("verify {seed} {}", spans(sp)));
    }

    /// The bytes at `[addr, addr + len)` of the peer's memory.
    pub fn read_bytes(&mut self, addr: u64, len: u64) -> Vec<u8> {
        let r = self.ok(&format!("read_hex {addr} {len}"));
        unhex(&r).unwrap_or_else(|| self.fail("bad hex"))
    }

    /// Connects to the agent listening on `addr`; returns its name.
    pub fn connect(&mut self, addr: &str) -> Result<String, String> {
        self.cmd(&format!("connect {addr}"))
    }

    /// The agent's metadata.
    pub fn metadata(&mut self) -> Vec<u8> {
        let r = self.ok("meta");
        unhex(&r).unwrap_or_else(|| self.fail("bad hex"))
    }

    /// Loads a peer's metadata; returns its name.
    pub fn load(&mut self, blob: &[u8]) -> Result<String, String> {
        self.cmd(&format!("load {}", hex(blob)))
    }

    /// Runs one transfer of `pairs` (`(local, remote, len)`) to `peer` and
    /// waits for it; returns the bytes moved.
    pub fn xfer(
        &mut self,
        op: &str,
        peer: &str,
        note: Option<&[u8]>,
        p: &[(u64, u64, u64)],
    ) -> Result<u64, String> {
        let line = xfer_line(op, peer, note, STEP, p);
        self.cmd(&line)
            .map(|r| r.parse().unwrap_or_else(|_| self.fail("bad byte count")))
    }

    /// Posts one transfer per pair, all before waiting for any, then waits
    /// for all; returns (transfers, most seen in flight at once).
    pub fn xfer_each(&mut self, op: &str, peer: &str, p: &[(u64, u64, u64)]) -> (usize, usize) {
        let r = self.ok(&format!(
            "xfer_each {op} {peer} {} {}",
            STEP.as_millis(),
            pairs(p)
        ));
        let mut it = r.split(' ').map(|x| x.parse::<usize>().unwrap_or(0));
        (it.next().unwrap_or(0), it.next().unwrap_or(0))
    }

    /// Sends a notification to `peer`.
    pub fn notify(&mut self, peer: &str, msg: &[u8]) -> Result<(), String> {
        self.cmd(&format!("notify {peer} {}", hex(msg))).map(|_| ())
    }

    /// Waits for the next notification from `peer`.
    pub fn await_notif(&mut self, peer: &str) -> Vec<u8> {
        let r = self.ok(&format!("await_notif {peer} {}", STEP.as_millis()));
        unhex(&r).unwrap_or_else(|| self.fail("bad hex"))
    }

    /// Shuts the agent down and waits for the process to exit successfully.
    pub fn quit(mut self) {
        self.ok("quit");
        self.stdin = None;
        let deadline = Instant::now() + STEP;
        loop {
            let st = self.child.as_mut().map(Child::try_wait);
            match st {
                Some(Ok(Some(s))) if s.success() => {
                    self.child = None;
                    return;
                }
                Some(Ok(Some(s))) => self.fail(&format!("exited with {s}")),
                Some(Ok(None)) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                _ => self.fail("did not exit after quit"),
            }
        }
    }

    /// Kills the process (SIGKILL) and reaps it. Idempotent.
    pub fn kill(&mut self) {
        self.stdin = None;
        if let Some(mut c) = self.child.take() {
            if let Ok(None) = c.try_wait() {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn short(line: &str) -> &str {
    let mut end = line.len().min(120);
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    &line[..end]
}

/// The `xfer` command line for these arguments.
pub fn xfer_line(
    op: &str,
    peer: &str,
    note: Option<&[u8]>,
    timeout: Duration,
    p: &[(u64, u64, u64)],
) -> String {
    format!(
        "xfer {op} {peer} {} {} {}",
        note.map_or_else(|| "-".to_string(), hex),
        timeout.as_millis(),
        pairs(p)
    )
}

/// `(addr, pattern offset, len)` spans in the protocol's form.
pub fn spans(sp: &[(u64, u64, u64)]) -> String {
    list(sp)
}

/// `(local, remote, len)` descriptor pairs in the protocol's form.
pub fn pairs(p: &[(u64, u64, u64)]) -> String {
    list(p)
}

fn list(v: &[(u64, u64, u64)]) -> String {
    v.iter()
        .map(|(a, b, c)| format!("{a}:{b}:{c}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Parses a comma-separated list of `a:b:c` triples.
pub fn parse_triples(s: &str) -> Option<Vec<(u64, u64, u64)>> {
    s.split(',')
        .map(|t| {
            let mut it = t.split(':').map(|x| x.parse::<u64>().ok());
            match (it.next()??, it.next()??, it.next()??, it.next()) {
                (a, b, c, None) => Some((a, b, c)),
                _ => None,
            }
        })
        .collect()
}

/// The `Debug` form of `e`, as peers report errors.
pub fn debug_of(e: &kvxfer::Error) -> String {
    format!("{e:?}")
}

/// A fresh non-zero seed (time and process id), different per call.
pub fn random_seed() -> u64 {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    splitmix64(t ^ (u64::from(std::process::id()) << 32) ^ n.wrapping_mul(0x9e37)) | 1
}

/// Zeroed, page-aligned heap memory, freed on drop.
#[derive(Debug)]
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    layout: std::alloc::Layout,
}

// SAFETY: `AlignedBuf` owns its allocation exclusively, like a `Box<[u8]>`.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// `len` zeroed bytes (at least 1 is allocated) aligned to 4096.
    pub fn new(len: usize) -> AlignedBuf {
        let layout =
            std::alloc::Layout::from_size_align(len.max(1), 4096).expect("buffer size fits");
        // SAFETY: `layout` has a non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr =
            std::ptr::NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, layout }
    }

    /// The first byte's address.
    pub fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.layout.size()
    }

    /// Whether the buffer is empty (never: at least one byte is allocated).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The bytes. Only call while no transfer can write into them.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the allocation is `len` initialised (zeroed) bytes owned
        // by `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len()) }
    }

    /// The bytes, mutably. Only call while no transfer uses them.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes this the only
        // reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_and_lists_round_trip() {
        let b = [0u8, 1, 0xab, 0xff];
        assert_eq!(hex(&b), "0001abff");
        assert_eq!(unhex("0001abff").unwrap(), b);
        assert_eq!(unhex("0g"), None);
        assert_eq!(unhex("abc"), None);
        let p = [(1, 2, 3), (40, 50, 60)];
        assert_eq!(parse_triples(&pairs(&p)).unwrap(), p);
        assert_eq!(parse_triples("1:2"), None);
        assert_eq!(parse_triples("1:2:3:4"), None);
    }
}
