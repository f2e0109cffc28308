//! Process plumbing shared by the reliability and soak tests: target agent
//! processes (this test binary re-run in a child role), buffers that
//! transfers may write behind Rust's back, deterministic data patterns, and
//! resource sampling from `/proc`.
#![allow(dead_code, clippy::result_large_err)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kvxfer::{Agent, AgentConfig, Desc, MemKind, WaitOutcome, XferOp};

/// Environment variable selecting the child role.
pub const ROLE: &str = "KVXFER_REL_ROLE";
/// Prefix of every line a child reports to its parent.
pub const TAG: &str = "RELTAG ";
/// Longest a child process lives, whatever happens to its parent.
pub const CHILD_LIFETIME: Duration = Duration::from_secs(180);

/// Deterministic bytes: the first `len` bytes of pattern `seed` (see
/// [`kvxfer_testkit::pattern`]). Seed 0, all zeros there, is refused:
/// the buffers compared against a pattern start zeroed.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    assert_ne!(seed, 0, "pattern seed 0 is all zeros");
    kvxfer_testkit::pattern(seed, len)
}

/// A heap buffer addressed only through its raw pointer, so that a
/// transfer changing it never races a Rust reference.
pub struct Buf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the buffer is plain heap memory owned by this value; every
// access goes through `&self`/`&mut self` methods that copy bytes.
unsafe impl Send for Buf {}

impl Buf {
    /// A buffer holding `bytes`.
    pub fn from_vec(bytes: Vec<u8>) -> Buf {
        let b: Box<[u8]> = bytes.into_boxed_slice();
        let len = b.len();
        Buf {
            ptr: Box::into_raw(b).cast::<u8>(),
            len,
        }
    }

    /// A zeroed buffer of `len` bytes.
    pub fn zeroed(len: usize) -> Buf {
        Buf::from_vec(vec![0; len])
    }

    /// Address of the first byte.
    pub fn addr(&self) -> u64 {
        self.ptr as u64
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// A copy of the current contents (read after the transfers that
    /// write it have completed).
    pub fn snapshot(&self) -> Vec<u8> {
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let mut out = vec![0u8; self.len];
        // SAFETY: `ptr` is valid for `len` bytes for the life of `self`;
        // `out` is a distinct allocation.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr, out.as_mut_ptr(), self.len) };
        out
    }

    /// Overwrites the contents with `bytes` (same length).
    pub fn fill(&self, bytes: &[u8]) {
        assert_eq!(bytes.len(), self.len);
        // SAFETY: as in `snapshot`; no transfer uses the buffer meanwhile
        // (callers fill between transfers).
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr, self.len) };
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    }

    /// Registers the buffer with `agent`.
    pub fn register(&self, agent: &Agent) {
        // SAFETY: the buffer outlives the agent's use of it: every test
        // deregisters or shuts the agent down before dropping it.
        unsafe {
            agent
                .register(self.addr(), self.len as u64, 0, MemKind::Dram)
                .expect("register buffer")
        };
    }

    /// A descriptor of `[off, off + len)`.
    pub fn desc(&self, off: usize, len: usize) -> Desc {
        Desc::new(self.addr() + off as u64, len as u64)
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` came from `Box::into_raw` of a boxed slice.
        unsafe {
            drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                self.ptr, self.len,
            )))
        };
    }
}

/// The agent settings for `backend` ("UCX" or "LIBFABRIC") and an optional
/// libfabric provider.
pub fn config(backend: &str, provider: Option<&str>) -> AgentConfig {
    let mut c = AgentConfig::default().with_backend(backend);
    if let Some(p) = provider {
        c = c.with_provider(p);
    }
    c
}

/// Runs the target role when this process was started as a child: an
/// agent named `KVXFER_REL_NAME` serving a buffer of `KVXFER_REL_LEN` bytes
/// filled with `pattern(KVXFER_REL_SEED)`, until its stdin closes, it reads
/// `quit`, or [`CHILD_LIFETIME`] passes. Returns whether it ran.
pub fn maybe_run_target() -> bool {
    if std::env::var(ROLE).as_deref() != Ok("target") {
        return false;
    }
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    let backend = var("KVXFER_REL_BACKEND");
    let provider = std::env::var("KVXFER_REL_PROVIDER").ok();
    let len: usize = var("KVXFER_REL_LEN").parse().expect("KVXFER_REL_LEN");
    let seed: u64 = var("KVXFER_REL_SEED").parse().expect("KVXFER_REL_SEED");
    let mut cfg = config(&backend, provider.as_deref());
    if let Ok(l) = std::env::var("KVXFER_REL_LISTEN") {
        cfg = cfg.with_listen(Some(&l));
    }
    let agent = Agent::new(&var("KVXFER_REL_NAME"), cfg).expect("target agent");
    let buf = Buf::from_vec(pattern(seed, len));
    buf.register(&agent);
    println!(
        "{TAG}ready {} {}",
        agent.listen_addr().expect("side channel"),
        buf.addr()
    );
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(l) = line else { break };
            if l.trim() == "quit" || tx.send(l).is_err() {
                break;
            }
        }
    });
    // Ends on `quit`, on EOF (parent gone) or after the lifetime; `rails`
    // prints `rails NAME RENEWALS FAILURES…` of each rail.
    let end = std::time::Instant::now() + CHILD_LIFETIME;
    while let Ok(l) = rx.recv_timeout(end.saturating_duration_since(std::time::Instant::now())) {
        if l.trim() == "rails" {
            let stats: Vec<String> = agent
                .rail_stats()
                .iter()
                .map(|r| format!("{} {} {}", r.name, r.renewals, r.failures))
                .collect();
            println!("{TAG}rails {}", stats.join(" "));
        }
    }
    agent.shutdown();
    drop(buf);
    true
}

/// A child process of this test binary; killed (and reaped) when dropped.
pub struct Proc {
    /// The child.
    pub child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl Proc {
    /// Starts this test binary running only test `entry`, with `env`,
    /// optionally behind a command prefix (e.g. `ip netns exec ns1`).
    pub fn spawn(entry: &str, env: &[(&str, String)], prefix: &[&str]) -> Proc {
        let exe = std::env::current_exe().expect("current_exe");
        let mut cmd = match prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(exe);
                c
            }
            None => Command::new(exe),
        };
        cmd.args([
            "--exact",
            "--ignored",
            entry,
            "--nocapture",
            "--test-threads=1",
        ]);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn child");
        let out = child.stdout.take().expect("child stdout");
        let stdin = child.stdin.take();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                // The harness may print "test x ... " before the tag.
                if let Some(at) = line.find(TAG) {
                    if tx.send(line[at + TAG.len()..].to_string()).is_err() {
                        break;
                    }
                }
            }
        });
        Proc {
            child,
            stdin,
            lines: rx,
        }
    }

    /// The next tagged line, waiting at most `timeout`.
    pub fn line(&self, timeout: Duration) -> Option<String> {
        self.lines.recv_timeout(timeout).ok()
    }

    /// Sends a line to the child's stdin.
    pub fn send(&mut self, line: &str) {
        if let Some(s) = self.stdin.as_mut() {
            let _ = writeln!(s, "{line}");
            let _ = s.flush();
        }
    }

    /// Kills the child with SIGKILL and reaps it; returns when it is gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits up to `timeout` for the child to exit; kills it if it does
    /// not. Returns its exit status, `None` when it had to be killed.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        self.stdin.take();
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(s)) => return Some(s),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    self.kill();
                    return None;
                }
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// A target agent process, ready to serve.
pub struct Target {
    /// The process.
    pub proc: Proc,
    /// Its side channel address.
    pub addr: String,
    /// Address of its registered buffer.
    pub buf: u64,
    /// Length of that buffer.
    pub len: usize,
    /// Seed of the buffer's initial contents.
    pub seed: u64,
}

/// Settings of a target process.
pub struct TargetSpec<'a> {
    /// Test entry that runs [`maybe_run_target`].
    pub entry: &'a str,
    /// Agent name.
    pub name: &'a str,
    /// Backend name.
    pub backend: &'a str,
    /// libfabric provider.
    pub provider: Option<&'a str>,
    /// Buffer length.
    pub len: usize,
    /// Pattern seed.
    pub seed: u64,
    /// Extra environment.
    pub env: Vec<(&'a str, String)>,
    /// Command prefix (network namespace).
    pub prefix: Vec<&'a str>,
}

impl Target {
    /// Starts a target and waits (up to 30 s) until it serves.
    pub fn spawn(spec: TargetSpec<'_>) -> Target {
        let mut env = vec![
            (ROLE, "target".to_string()),
            ("KVXFER_REL_NAME", spec.name.to_string()),
            ("KVXFER_REL_BACKEND", spec.backend.to_string()),
            ("KVXFER_REL_LEN", spec.len.to_string()),
            ("KVXFER_REL_SEED", spec.seed.to_string()),
        ];
        if let Some(p) = spec.provider {
            env.push(("KVXFER_REL_PROVIDER", p.to_string()));
        }
        env.extend(spec.env);
        let proc = Proc::spawn(spec.entry, &env, &spec.prefix);
        let ready = proc
            .line(Duration::from_secs(30))
            .unwrap_or_else(|| panic!("target {} did not start within 30 s", spec.name));
        let mut parts = ready
            .strip_prefix("ready ")
            .unwrap_or_else(|| panic!("unexpected line from target: {ready:?}"))
            .split(' ');
        let addr = parts.next().expect("address").to_string();
        let buf = parts
            .next()
            .expect("buffer")
            .parse()
            .expect("buffer address");
        Target {
            proc,
            addr,
            buf,
            len: spec.len,
            seed: spec.seed,
        }
    }

    /// A descriptor of `[off, off + len)` of the target's buffer.
    pub fn desc(&self, off: usize, len: usize) -> Desc {
        Desc::new(self.buf + off as u64, len as u64)
    }
}

/// Runs one transfer to completion; returns how long it took, or the
/// outcome that was not `Done`.
pub fn run(
    agent: &Agent,
    op: XferOp,
    local: &[Desc],
    remote: &[Desc],
    peer: &str,
    timeout: Duration,
) -> Result<Duration, WaitOutcome> {
    let t = Instant::now();
    let req = agent
        .submit(op, local, remote, peer, None)
        .map_err(WaitOutcome::Failed)?;
    match req.wait(timeout) {
        WaitOutcome::Done => Ok(t.elapsed()),
        other => Err(other),
    }
}

/// Reads the whole target buffer into `dst` (at least as long) and returns
/// the bytes read.
pub fn read_all(agent: &Agent, dst: &Buf, target: &Target, peer: &str) -> Vec<u8> {
    run(
        agent,
        XferOp::Read,
        &[dst.desc(0, target.len)],
        &[target.desc(0, target.len)],
        peer,
        Duration::from_secs(10),
    )
    .unwrap_or_else(|o| panic!("READ of {peer}'s buffer: {o:?}"));
    dst.snapshot()[..target.len].to_vec()
}

/// Resident memory of this process in KiB (`VmRSS`).
pub fn rss_kib() -> u64 {
    rss_kib_of("self")
}

/// Resident memory (`VmRSS`) of process `pid` (a number or `self`) in KiB.
pub fn rss_kib_of(pid: &str) -> u64 {
    let path = format!("/proc/{pid}/status");
    let s = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// Open file descriptors of this process.
pub fn open_fds() -> usize {
    open_fds_of("self")
}

/// Open file descriptors of process `pid` (a number or `self`).
pub fn open_fds_of(pid: &str) -> usize {
    let path = format!("/proc/{pid}/fd");
    std::fs::read_dir(&path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .count()
}

/// Runs `prog args…` (`ip`, `tc`) and fails with its stderr.
pub fn cmd(prog: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(prog)
        .args(args)
        .output()
        .map_err(|e| format!("{prog} {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{prog} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// `ip args…` (see [`cmd`]).
pub fn ip(args: &[&str]) -> Result<(), String> {
    cmd("ip", args)
}

/// Whether this process runs as root (uid 0).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}
