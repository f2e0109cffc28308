//! `kvxfer-test-peer`: one kvxfer agent in its own process, driven line by
//! line over stdin/stdout. The protocol is described in the `kvxfer_tests`
//! crate docs.
//!
//! Arguments: `--name <name>` (required), `--backend <name>` (in the
//! agent's config; else the environment decides), `--no-progress-thread`,
//! `--no-listen`.
#![allow(clippy::result_large_err)]

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, Write};
use std::time::{Duration, Instant};

use kvxfer::{Agent, AgentConfig, Desc, WaitOutcome, XferOp};
use kvxfer_tests::{
    check_pattern, fill_pattern, hex, parse_triples, unhex, AlignedBuf, REPLY_PREFIX,
};

/// A command's outcome: `ok <fields>`, `err <Debug of the agent's error>`,
/// or `bad <text>` for a failed check.
enum Reply {
    Ok(String),
    Err(kvxfer::Error),
    Bad(String),
}

impl From<kvxfer::Error> for Reply {
    fn from(e: kvxfer::Error) -> Self {
        Reply::Err(e)
    }
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    // A closed stdout means the test is gone; exiting is then right.
    if writeln!(out, "{REPLY_PREFIX}{line}")
        .and_then(|()| out.flush())
        .is_err()
    {
        std::process::exit(3);
    }
}

struct Peer {
    agent: Agent,
    /// Buffers by address; registered ones are deregistered before exit.
    bufs: HashMap<u64, (AlignedBuf, bool)>,
    /// Notifications received and not yet awaited, by sender.
    inbox: HashMap<String, VecDeque<Vec<u8>>>,
}

fn num(s: Option<&str>, what: &str) -> Result<u64, Reply> {
    s.and_then(|x| x.parse().ok())
        .ok_or_else(|| Reply::Bad(format!("missing or bad {what}")))
}

fn triples(s: Option<&str>) -> Result<Vec<(u64, u64, u64)>, Reply> {
    s.and_then(parse_triples)
        .ok_or_else(|| Reply::Bad("missing or bad list of a:b:c".into()))
}

fn op_of(s: Option<&str>) -> Result<XferOp, Reply> {
    match s {
        Some("READ") => Ok(XferOp::Read),
        Some("WRITE") => Ok(XferOp::Write),
        other => Err(Reply::Bad(format!("bad op {other:?}"))),
    }
}

fn hex_arg(s: Option<&str>) -> Result<Vec<u8>, Reply> {
    s.and_then(unhex)
        .ok_or_else(|| Reply::Bad("missing or bad hex".into()))
}

impl Peer {
    /// The bytes `[addr, addr+len)` of one of our buffers.
    fn span(&self, addr: u64, len: u64) -> Result<&[u8], Reply> {
        for (base, (buf, _)) in &self.bufs {
            if addr >= *base && addr.saturating_add(len) <= base + buf.len() as u64 {
                let at = (addr - base) as usize;
                // Transfers into this memory have completed when a command
                // looks at it; the fence keeps the reads after that point.
                std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
                return Ok(&buf.as_slice()[at..at + len as usize]);
            }
        }
        Err(Reply::Bad(format!(
            "[{addr:#x}, +{len}) is in no buffer of this peer"
        )))
    }

    fn span_mut(&mut self, addr: u64, len: u64) -> Result<&mut [u8], Reply> {
        for (base, (buf, _)) in self.bufs.iter_mut() {
            if addr >= *base && addr.saturating_add(len) <= *base + buf.len() as u64 {
                let at = (addr - *base) as usize;
                return Ok(&mut buf.as_mut_slice()[at..at + len as usize]);
            }
        }
        Err(Reply::Bad(format!(
            "[{addr:#x}, +{len}) is in no buffer of this peer"
        )))
    }

    fn verify(&self, seed: u64, spans: &[(u64, u64, u64)]) -> Result<(), Reply> {
        for (k, &(addr, off, len)) in spans.iter().enumerate() {
            if let Err((i, got, want)) = check_pattern(self.span(addr, len)?, seed, off) {
                return Err(Reply::Bad(format!(
                    "span {k} (addr {addr:#x}, len {len}): byte {i} is {got:#04x}, expected {want:#04x} (seed {seed}, offset {})",
                    off + i as u64
                )));
            }
        }
        Ok(())
    }

    fn collect(&mut self) -> Result<(), Reply> {
        for (peer, msgs) in self.agent.take_notifications()? {
            self.inbox.entry(peer).or_default().extend(msgs);
        }
        Ok(())
    }

    fn descs(p: &[(u64, u64, u64)]) -> (Vec<Desc>, Vec<Desc>) {
        p.iter()
            .map(|&(l, r, n)| (Desc::new(l, n), Desc::new(r, n)))
            .unzip()
    }

    fn run(&mut self, line: &str) -> Result<Reply, Reply> {
        let mut it = line.split(' ');
        let cmd = it.next().unwrap_or_default();
        Ok(match cmd {
            "alloc" | "alloc_unreg" => {
                let len = num(it.next(), "length")?;
                let buf = AlignedBuf::new(len as usize);
                let addr = buf.addr();
                let reg = cmd == "alloc";
                if reg {
                    // SAFETY: the buffer lives in `bufs` until it is
                    // deregistered (`dereg`, or at exit before the agent
                    // shuts down), and it is only read through `span` once
                    // the transfers touching it are complete.
                    unsafe { self.agent.register(addr, len, 0, kvxfer::MemKind::Dram)? };
                }
                self.bufs.insert(addr, (buf, reg));
                Reply::Ok(addr.to_string())
            }
            "dereg" => {
                let addr = num(it.next(), "address")?;
                self.agent.deregister(addr)?;
                if let Some(b) = self.bufs.get_mut(&addr) {
                    b.1 = false;
                }
                Reply::Ok(String::new())
            }
            "fill" => {
                let seed = num(it.next(), "seed")?;
                for (addr, off, len) in triples(it.next())? {
                    fill_pattern(self.span_mut(addr, len)?, seed, off);
                }
                Reply::Ok(String::new())
            }
            "verify" => {
                let seed = num(it.next(), "seed")?;
                self.verify(seed, &triples(it.next())?)?;
                Reply::Ok(String::new())
            }
            "read_hex" => {
                let addr = num(it.next(), "address")?;
                let len = num(it.next(), "length")?;
                Reply::Ok(hex(self.span(addr, len)?))
            }
            "meta" => Reply::Ok(hex(&self.agent.local_metadata()?)),
            "load" => Reply::Ok(self.agent.load_remote(&hex_arg(it.next())?)?),
            "connect" => Reply::Ok(self.agent.connect(it.next().unwrap_or_default())?),
            "check_remote" => {
                let peer = it.next().unwrap_or_default();
                let (_, remote) = Self::descs(&triples(it.next())?);
                self.agent.check_remote(peer, &remote)?;
                Reply::Ok(String::new())
            }
            "xfer" => {
                let op = op_of(it.next())?;
                let peer = it.next().unwrap_or_default().to_string();
                let note = match it.next() {
                    Some("-") => None,
                    other => Some(hex_arg(other)?),
                };
                let timeout = Duration::from_millis(num(it.next(), "timeout")?);
                let (local, remote) = Self::descs(&triples(it.next())?);
                let req = self
                    .agent
                    .submit(op, &local, &remote, &peer, note.as_deref())?;
                match req.wait(timeout) {
                    WaitOutcome::Done => {}
                    WaitOutcome::Failed(e) => return Err(e.into()),
                    WaitOutcome::InProgress => {
                        return Err(Reply::Bad(format!(
                            "transfer not done within {} ms",
                            timeout.as_millis()
                        )))
                    }
                }
                let bytes = req.telemetry()?.bytes;
                req.release()?;
                Reply::Ok(bytes.to_string())
            }
            "xfer_each" => {
                let op = op_of(it.next())?;
                let peer = it.next().unwrap_or_default().to_string();
                let timeout = Duration::from_millis(num(it.next(), "timeout")?);
                let (local, remote) = Self::descs(&triples(it.next())?);
                let mut reqs = Vec::with_capacity(local.len());
                for (l, r) in local.iter().zip(&remote) {
                    reqs.push(self.agent.submit(
                        op,
                        std::slice::from_ref(l),
                        std::slice::from_ref(r),
                        &peer,
                        None,
                    )?);
                }
                let in_flight = reqs.iter().filter(|r| !r.is_completed()).count();
                let deadline = Instant::now() + timeout;
                for (k, req) in reqs.iter().enumerate() {
                    let left = deadline.saturating_duration_since(Instant::now());
                    match req.wait(left) {
                        WaitOutcome::Done => {}
                        WaitOutcome::Failed(e) => return Err(e.into()),
                        WaitOutcome::InProgress => {
                            return Err(Reply::Bad(format!(
                                "transfer {k} of {} not done within {} ms",
                                reqs.len(),
                                timeout.as_millis()
                            )))
                        }
                    }
                }
                let n = reqs.len();
                for r in reqs {
                    r.release()?;
                }
                Reply::Ok(format!("{n} {in_flight}"))
            }
            "notify" => {
                let peer = it.next().unwrap_or_default().to_string();
                // An empty payload is empty hex: no argument at all.
                let msg = match it.next() {
                    None => Vec::new(),
                    some => hex_arg(some)?,
                };
                self.agent.notify(&peer, &msg)?;
                Reply::Ok(String::new())
            }
            "await_notif" => {
                let peer = it.next().unwrap_or_default().to_string();
                let timeout = Duration::from_millis(num(it.next(), "timeout")?);
                let check = match it.next() {
                    Some(seed) => Some((num(Some(seed), "seed")?, triples(it.next())?)),
                    None => None,
                };
                let deadline = Instant::now() + timeout;
                loop {
                    self.collect()?;
                    if let Some(msg) = self.inbox.get_mut(&peer).and_then(VecDeque::pop_front) {
                        // Look at the data the moment the notification is
                        // seen: it must already be there.
                        if let Some((seed, spans)) = &check {
                            // The ends of the spans first, last span
                            // first: bytes still missing are most likely
                            // there, and checking them first leaves them
                            // the least time to arrive late unnoticed.
                            let tails: Vec<(u64, u64, u64)> = spans
                                .iter()
                                .rev()
                                .map(|&(a, o, l)| {
                                    let t = l.min(4096);
                                    (a + l - t, o + l - t, t)
                                })
                                .collect();
                            let checked = self
                                .verify(*seed, &tails)
                                .and_then(|()| self.verify(*seed, spans));
                            if let Err(Reply::Bad(why)) = checked {
                                return Err(Reply::Bad(format!(
                                    "notification {} arrived before its data: {why}",
                                    hex(&msg)
                                )));
                            }
                        }
                        break Reply::Ok(hex(&msg));
                    }
                    if Instant::now() >= deadline {
                        return Err(Reply::Bad(format!(
                            "no notification from {peer:?} within {} ms",
                            timeout.as_millis()
                        )));
                    }
                    std::thread::sleep(Duration::from_micros(50));
                }
            }
            "notifs" => {
                self.collect()?;
                let mut all: Vec<String> = Vec::new();
                for (peer, msgs) in self.inbox.drain() {
                    all.extend(msgs.iter().map(|m| format!("{peer}={}", hex(m))));
                }
                all.sort();
                Reply::Ok(all.join(","))
            }
            other => Reply::Bad(format!("unknown command {other:?}")),
        })
    }

    /// Deregisters every buffer still registered, then shuts down.
    fn finish(&mut self) {
        for (addr, (_, reg)) in &self.bufs {
            if *reg {
                if let Err(e) = self.agent.deregister(*addr) {
                    eprintln!("deregistering {addr:#x}: {e}");
                }
            }
        }
        self.agent.shutdown();
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut name = None;
    let mut cfg = AgentConfig::default();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--name" => name = args.next(),
            "--backend" => cfg = cfg.with_backend(args.next().unwrap_or_default()),
            "--no-progress-thread" => cfg = cfg.with_progress_thread(false),
            "--no-listen" => cfg = cfg.with_listen(None),
            other => {
                say(&format!("bad unknown argument {other:?}"));
                std::process::exit(2);
            }
        }
    }
    let name = name.unwrap_or_else(|| "peer".into());
    let agent = match Agent::new(&name, cfg) {
        Ok(a) => a,
        Err(e) => {
            say(&format!("err {e:?}"));
            std::process::exit(2);
        }
    };
    let listen = agent
        .listen_addr()
        .map_or_else(|| "-".to_string(), |a| a.to_string());
    say(&format!("ready {} {listen}", agent.backend().name()));
    let mut peer = Peer {
        agent,
        bufs: HashMap::new(),
        inbox: HashMap::new(),
    };
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if line == "quit" {
            peer.finish();
            say("ok");
            return;
        }
        match peer.run(line).unwrap_or_else(|e| e) {
            Reply::Ok(s) if s.is_empty() => say("ok"),
            Reply::Ok(s) => say(&format!("ok {s}")),
            Reply::Err(e) => say(&format!("err {e:?}")),
            Reply::Bad(s) => say(&format!("bad {s}")),
        }
    }
    // stdin closed: the test is gone.
    peer.finish();
}
