//! A target spawned for the benchmark, and waiting for its replies.

use super::*;

/// A spawned `kvxfer target`, killed when dropped.
pub(super) struct TargetChild {
    child: Child,
    err: Arc<std::sync::Mutex<TargetStderr>>,
}

/// What a spawned target wrote to standard error.
#[derive(Default)]
struct TargetStderr {
    /// Whether it serves (its lines then go straight on).
    serving: bool,
    /// Lines held until it serves.
    held: Vec<String>,
    /// The last line.
    last: String,
}

impl TargetChild {
    pub(super) fn spawn(
        opts: &BenchOptions,
        size: u64,
    ) -> Result<(TargetChild, String), BenchError> {
        let exe = match &opts.target_exe {
            Some(p) => p.clone(),
            None => std::env::current_exe()
                .map_err(|e| BenchError::Options(format!("locating kvxfer to spawn: {e}")))?,
        };
        let mut cmd = Command::new(&exe);
        cmd.args([
            "target",
            "--listen",
            "127.0.0.1:0",
            "--size",
            &size.to_string(),
        ]);
        if let Some(b) = &opts.backend {
            cmd.args(["--backend", b]);
        }
        if let Some(p) = &opts.provider {
            cmd.args(["--provider", p]);
        }
        if opts.mem == MemKind::Vram {
            cmd.args(["--mem", "vram", "--device", &opts.device.to_string()]);
        }
        // Its metrics endpoint would take the bench's own address.
        cmd.env_remove(crate::metrics::ENV_METRICS_ADDR);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let spawn_step = || format!("spawning the target {}", exe.display());
        let child = cmd
            .spawn()
            .map_err(|e| bench_err(&e.to_string()))
            .step(spawn_step)?;
        let err = Arc::new(std::sync::Mutex::new(TargetStderr::default()));
        let mut guard = TargetChild {
            child,
            err: Arc::clone(&err),
        };
        let (stdout, stderr) = match (guard.child.stdout.take(), guard.child.stderr.take()) {
            (Some(o), Some(e)) => (o, e),
            _ => return Err(bench_err("no pipe to the target")).step(spawn_step),
        };
        // Its standard error goes on to ours; until it serves, its lines
        // are held: if it fails, its last line is its error, which the
        // verdict carries.
        let err_done = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut e = err.lock().unwrap_or_else(|e| e.into_inner());
                if e.serving {
                    eprintln!("{line}");
                } else {
                    e.held.push(line.clone());
                }
                e.last = line;
            }
        });
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let mut r = BufReader::new(stdout);
            let _ = tx.send(r.read_line(&mut line).map(|_| line));
            // Keep draining so the child never blocks on a full pipe.
            let _ = std::io::copy(&mut r, &mut std::io::sink());
        });
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .map_err(|_| bench_err("it did not report its address within 30 s"))
            .and_then(|r| r.map_err(|e| bench_err(&format!("reading its address: {e}"))))
            .step(|| "starting the target".to_string())?;
        let Some(addr) = line.trim().strip_prefix("listening ") else {
            // It ended its standard output without an address: it failed.
            let deadline = Instant::now() + Duration::from_secs(5);
            let status = loop {
                match guard.child.try_wait() {
                    Ok(Some(st)) => break st.to_string(),
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(10))
                    }
                    _ => break "still running".to_string(),
                }
            };
            if status != "still running" {
                let _ = err_done.join();
            }
            let mut e = guard.err.lock().unwrap_or_else(|e| e.into_inner());
            let last = e.held.pop();
            for l in e.held.drain(..) {
                eprintln!("{l}");
            }
            drop(e);
            let error = last.unwrap_or_else(|| format!("it said {:?}", line.trim()));
            let error = error
                .strip_prefix("kvxfer target: ")
                .unwrap_or(&error)
                .to_string();
            return Err(BenchError::TargetExited { status, error });
        };
        let addr = addr.to_string();
        let mut e = guard.err.lock().unwrap_or_else(|e| e.into_inner());
        e.serving = true;
        for l in e.held.drain(..) {
            eprintln!("{l}");
        }
        drop(e);
        Ok((guard, addr))
    }

    /// How the target exited and its last line on standard error, if it
    /// has exited.
    pub(super) fn exited(&mut self) -> Option<(String, String)> {
        let st = self.child.try_wait().ok().flatten()?;
        // Give its standard error a moment to drain.
        std::thread::sleep(Duration::from_millis(50));
        let e = self.err.lock().unwrap_or_else(|e| e.into_inner());
        let last = e.last.strip_prefix("kvxfer target: ").unwrap_or(&e.last);
        Some((st.to_string(), last.to_string()))
    }
}

impl Drop for TargetChild {
    fn drop(&mut self) {
        // Closing stdin asks it to stop; kill it if it has not.
        drop(self.child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(2);
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

/// Waits for one notification from `peer` that starts with `prefix`.
pub(super) fn await_reply(
    agent: &Agent,
    peer: &str,
    prefix: &str,
    timeout: Duration,
) -> Result<String, Error> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut all = agent.take_notifications()?;
        if let Some(msgs) = all.remove(peer) {
            for m in msgs {
                let s = String::from_utf8_lossy(&m).into_owned();
                if s.starts_with("bench:error") {
                    return Err(bench_err(&format!("target: {s}")));
                }
                if let Some(rest) = s.strip_prefix(prefix) {
                    return Ok(rest.trim().to_string());
                }
            }
        }
        if Instant::now() >= deadline {
            return Err(Error::TimedOut {
                after_ms: timeout.as_millis() as u64,
            });
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}
