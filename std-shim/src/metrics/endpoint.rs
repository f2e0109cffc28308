//! The HTTP endpoint serving the metrics, and what an [`AgentConfig`] asks of them.

use super::*;

/// Whether an agent made with `cfg` records metrics:
/// [`AgentConfig::metrics`], else [`ENV_METRICS`] (anything but `0`,
/// `false`, `off`, `no` is on), else on.
pub(crate) fn enabled(cfg: &AgentConfig) -> bool {
    cfg.metrics.unwrap_or_else(|| {
        std::env::var(ENV_METRICS).map_or(true, |v| {
            !matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "0" | "false" | "off" | "no"
            )
        })
    })
}

/// The address to serve metrics on for an agent made with `cfg`:
/// [`AgentConfig::metrics_addr`], else [`ENV_METRICS_ADDR`] (empty: none).
pub(crate) fn addr_of(cfg: &AgentConfig) -> Option<String> {
    match &cfg.metrics_addr {
        Some(a) => a.clone(),
        None => std::env::var(ENV_METRICS_ADDR)
            .ok()
            .filter(|a| !a.trim().is_empty()),
    }
}

impl AgentConfig {
    /// Sets [`metrics`](AgentConfig::metrics): whether the agent records
    /// metrics at all.
    pub fn with_metrics(mut self, on: bool) -> Self {
        self.metrics = Some(on);
        self
    }

    /// Sets [`metrics_addr`](AgentConfig::metrics_addr): `Some("host:port")`
    /// serves the process's metrics there over HTTP (port 0 picks one; see
    /// [`Agent::metrics_addr`](crate::Agent::metrics_addr)), `None` serves
    /// none (the environment is then not consulted).
    pub fn with_metrics_addr(mut self, addr: Option<&str>) -> Self {
        self.metrics_addr = Some(addr.map(str::to_string));
        self
    }
}

/// An HTTP server answering `GET /metrics` (and `GET /`) with [`encode`],
/// from one thread. Stops when the last clone of it is dropped.
#[derive(Clone, Debug)]
pub struct Endpoint {
    inner: Arc<EndpointInner>,
}

#[derive(Debug)]
struct EndpointInner {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for EndpointInner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the blocking accept.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            let _ = t.join();
        }
    }
}

impl Endpoint {
    /// The address it listens on (with the port chosen).
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.addr
    }
}

/// Endpoints of this process by the address asked for, so that agents
/// given the same address (`KVXFER_METRICS_ADDR` for several agents of one
/// process) share one server.
fn endpoints() -> std::sync::MutexGuard<'static, Vec<(String, Weak<EndpointInner>)>> {
    static ENDPOINTS: Mutex<Vec<(String, Weak<EndpointInner>)>> = Mutex::new(Vec::new());
    ENDPOINTS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Serves the metrics of every agent of this process on `addr`
/// (`host:port`, port 0 picks a free one): `GET /metrics` answers with
/// [`encode`] as `text/plain; version=0.0.4`. Asked again for an address
/// it already serves (as asked for with a port other than 0, or as
/// [`Endpoint::local_addr`] gave it), it returns that server.
pub fn serve(addr: &str) -> std::io::Result<Endpoint> {
    let mut all = endpoints();
    all.retain(|(_, w)| w.strong_count() > 0);
    if let Some(inner) = all
        .iter()
        .filter(|(a, _)| a == addr)
        .find_map(|(_, w)| w.upgrade())
    {
        return Ok(Endpoint { inner });
    }
    let listener = TcpListener::bind(addr)?;
    let local = listener.local_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    let thread = std::thread::Builder::new()
        .name("kvxfer-metrics".into())
        .spawn(move || {
            for conn in listener.incoming() {
                if flag.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(s) = conn {
                    if let Err(e) = answer(s) {
                        log::debug!("metrics endpoint: {e}");
                    }
                }
            }
        })?;
    let inner = Arc::new(EndpointInner {
        addr: local,
        stop,
        thread: Mutex::new(Some(thread)),
    });
    // Found again by the address asked for (unless it left the port to
    // the system) and by the address it got.
    if !addr.ends_with(":0") {
        all.push((addr.to_string(), Arc::downgrade(&inner)));
    }
    all.push((local.to_string(), Arc::downgrade(&inner)));
    log::info!("metrics served on http://{local}/metrics");
    Ok(Endpoint { inner })
}

/// Answers one HTTP/1.x request and closes the connection.
fn answer(mut s: TcpStream) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut req = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 16 << 10 {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        req.extend_from_slice(&buf[..n]);
    }
    let line = req.split(|&b| b == b'\r').next().unwrap_or(&[]);
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, ctype, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics" | "/") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            encode(),
        ),
        ("GET" | "HEAD", _) => (
            "404 Not Found",
            "text/plain",
            "not found: metrics are at /metrics\n".to_string(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET\n".to_string(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    if method != "HEAD" {
        s.write_all(body.as_bytes())?;
    }
    s.flush()
}
