//! `Agent`: the native half of `kvxfer.Agent` and `kvxfer.nixl.nixl_agent`.

use super::*;

/// An agent (the native half of `kvxfer.Agent` and `kvxfer.nixl.nixl_agent`).
#[pyclass(frozen, module = "kvxfer._kvxfer")]
pub(super) struct Agent {
    inner: RustAgent,
}

#[pymethods]
impl Agent {
    /// Creates the agent `name`. `backend` None lets `KVXFER_BACKEND`,
    /// then `TRTLLM_NIXL_KVCACHE_BACKEND`, choose (else UCX); `listen`
    /// None serves no side channel; `transfer_timeout` None leaves the
    /// backend's default, 0 means no deadline; `metrics_addr` None lets
    /// `KVXFER_METRICS_ADDR` decide where metrics are served, "" serves
    /// none.
    #[new]
    #[pyo3(signature = (name, backend=None, listen=Some("127.0.0.1:0".to_string()),
        progress_thread=true, same_host=true, transfer_timeout=None, auth_key=None,
        metrics_addr=None))]
    fn new(
        py: Python<'_>,
        name: &str,
        backend: Option<String>,
        listen: Option<String>,
        progress_thread: bool,
        same_host: bool,
        transfer_timeout: Option<f64>,
        auth_key: Option<Vec<u8>>,
        metrics_addr: Option<String>,
    ) -> PyResult<Self> {
        let mut cfg = AgentConfig::default()
            .with_listen(listen.as_deref())
            .with_progress_thread(progress_thread)
            .with_same_host(same_host);
        if let Some(b) = backend {
            cfg = cfg.with_backend(b);
        }
        if let Some(t) = transfer_timeout {
            let d = secs(t, "transfer_timeout")?;
            cfg = cfg.with_transfer_timeout((!d.is_zero()).then_some(d));
        }
        if let Some(k) = auth_key {
            cfg = cfg.with_auth_key(k);
        }
        if let Some(m) = metrics_addr {
            cfg = cfg.with_metrics_addr(Some(m.as_str()).filter(|m| !m.is_empty()));
        }
        let inner = py.detach(|| RustAgent::new(name, cfg)).py_err()?;
        Ok(Agent { inner })
    }

    /// The agent's name.
    #[getter]
    fn name(&self) -> &str {
        self.inner.name()
    }

    /// The backend in use: "UCX", "LIBFABRIC" or "CUDA_IPC".
    #[getter]
    fn backend(&self) -> &'static str {
        self.inner.backend().name()
    }

    /// Where the side channel listens ("ip:port"), or None.
    #[getter]
    fn listen_addr(&self) -> Option<String> {
        self.inner.listen_addr().map(|a| a.to_string())
    }

    /// Where the metrics endpoint listens ("ip:port"), or None.
    #[getter]
    fn metrics_addr(&self) -> Option<String> {
        self.inner.metrics_addr().map(|a| a.to_string())
    }

    /// This agent's metrics in Prometheus' text format.
    fn metrics_text(&self) -> String {
        self.inner.metrics().encode()
    }

    /// Registers `[addr, addr + length)` on device `dev` as `kind`
    /// ("DRAM" or "VRAM"). The Python caller keeps the memory alive until
    /// it is deregistered.
    #[pyo3(signature = (addr, length, dev=0, kind="DRAM"))]
    fn register(
        &self,
        py: Python<'_>,
        addr: u64,
        length: u64,
        dev: u32,
        kind: &str,
    ) -> PyResult<()> {
        let kind = parse_kind(kind)?;
        // SAFETY: the Python layer registers only memory it keeps alive
        // (it holds a reference to the owning object, or the caller of
        // the NIXL-style API owns the memory, as with NIXL) until
        // `deregister` succeeds, and no Rust reference reads or writes it.
        py.detach(|| unsafe { self.inner.register(addr, length, dev, kind) })
            .py_err()
    }

    /// Deregisters the region starting at `addr`; returns its length.
    fn deregister(&self, py: Python<'_>, addr: u64) -> PyResult<u64> {
        py.detach(|| self.inner.deregister(addr))
            .py_err()
            .map(|r| r.len)
    }

    /// This agent's metadata blob.
    fn local_metadata<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let md = py.detach(|| self.inner.local_metadata()).py_err()?;
        Ok(PyBytes::new(py, &md))
    }

    /// Loads a peer's metadata; returns the peer's name.
    fn load_remote(&self, py: Python<'_>, blob: &[u8]) -> PyResult<String> {
        py.detach(|| self.inner.load_remote(blob)).py_err()
    }

    /// Fetches and loads the metadata of the agent whose side channel
    /// listens on `addr`, then pushes ours; returns the peer's name.
    fn connect(&self, py: Python<'_>, addr: &str) -> PyResult<String> {
        py.detach(|| self.inner.connect(addr)).py_err()
    }

    /// Fetches and loads the metadata of the agent at `addr` (no push).
    #[pyo3(signature = (addr, auth_key=None, timeout=5.0))]
    fn fetch_metadata(
        &self,
        py: Python<'_>,
        addr: &str,
        auth_key: Option<Vec<u8>>,
        timeout: f64,
    ) -> PyResult<String> {
        over_side_channel(py, addr, auth_key, timeout, |c| {
            self.inner.load_remote(&c.get_metadata()?)
        })
    }

    /// Pushes this agent's metadata to the agent at `addr`; returns the
    /// name it loaded us under.
    #[pyo3(signature = (addr, auth_key=None, timeout=5.0))]
    fn send_metadata(
        &self,
        py: Python<'_>,
        addr: &str,
        auth_key: Option<Vec<u8>>,
        timeout: f64,
    ) -> PyResult<String> {
        over_side_channel(py, addr, auth_key, timeout, |c| {
            c.push_metadata(&self.inner.local_metadata()?)
        })
    }

    /// Asks the agent at `addr` to forget this agent's metadata.
    #[pyo3(signature = (addr, auth_key=None, timeout=5.0))]
    fn invalidate_metadata(
        &self,
        py: Python<'_>,
        addr: &str,
        auth_key: Option<Vec<u8>>,
        timeout: f64,
    ) -> PyResult<()> {
        over_side_channel(py, addr, auth_key, timeout, |c| {
            c.invalidate(self.inner.name())
        })
    }

    /// Whether a peer of this name is loaded.
    fn has_remote(&self, py: Python<'_>, peer: &str) -> PyResult<bool> {
        py.detach(|| self.inner.has_remote(peer)).py_err()
    }

    /// Checks that every descriptor (packed triples) lies in memory `peer`
    /// registered.
    fn check_remote(&self, py: Python<'_>, peer: &str, descs: &[u8]) -> PyResult<()> {
        let descs = parse_descs(descs)?;
        py.detach(|| self.inner.check_remote(peer, &descs)).py_err()
    }

    /// Forgets a peer: its connection and keys are released.
    fn invalidate_remote(&self, py: Python<'_>, peer: &str) -> PyResult<()> {
        py.detach(|| self.inner.invalidate_remote(peer)).py_err()
    }

    /// Prepares a local list (packed triples) for `make_xfer`.
    fn prep_local(&self, py: Python<'_>, descs: &[u8]) -> PyResult<Prepared> {
        let descs = parse_descs(descs)?;
        let p = py.detach(|| self.inner.prep_local(&descs)).py_err()?;
        Ok(self.prepared(Side::Local(p), descs.len(), String::new()))
    }

    /// Prepares a local list of `count` blocks of `length` bytes spaced
    /// `stride` bytes apart from `addr`.
    #[pyo3(signature = (addr, length, stride, count, dev=0))]
    fn prep_local_strided(
        &self,
        py: Python<'_>,
        addr: u64,
        length: u64,
        stride: u64,
        count: u32,
        dev: u32,
    ) -> PyResult<Prepared> {
        let list = DescList::Strided(strided(addr, length, stride, count, dev));
        let p = py.detach(|| self.inner.prep_local_list(list)).py_err()?;
        Ok(self.prepared(Side::Local(p), count as usize, String::new()))
    }

    /// Prepares a list of `peer`'s memory (packed triples).
    fn prep_remote(&self, py: Python<'_>, peer: &str, descs: &[u8]) -> PyResult<Prepared> {
        let descs = parse_descs(descs)?;
        let p = py
            .detach(|| self.inner.prep_remote(peer, &descs))
            .py_err()?;
        Ok(self.prepared(Side::Remote(p), descs.len(), peer.to_string()))
    }

    /// [`prep_local_strided`] for `peer`'s memory.
    #[pyo3(signature = (peer, addr, length, stride, count, dev=0))]
    fn prep_remote_strided(
        &self,
        py: Python<'_>,
        peer: &str,
        addr: u64,
        length: u64,
        stride: u64,
        count: u32,
        dev: u32,
    ) -> PyResult<Prepared> {
        let list = DescList::Strided(strided(addr, length, stride, count, dev));
        let p = py
            .detach(|| self.inner.prep_remote_list(peer, list))
            .py_err()?;
        Ok(self.prepared(Side::Remote(p), count as usize, peer.to_string()))
    }

    /// Makes a transfer (not posted) from prepared lists by index (packed
    /// `u32`s): pair k moves `local[local_idx[k]]` and
    /// `remote[remote_idx[k]]`.
    #[pyo3(signature = (op, local, local_idx, remote, remote_idx, notif=None))]
    fn make_xfer(
        &self,
        py: Python<'_>,
        op: &str,
        local: &Prepared,
        local_idx: &[u8],
        remote: &Prepared,
        remote_idx: &[u8],
        notif: Option<&[u8]>,
    ) -> PyResult<Request> {
        let op = parse_op(op)?;
        let Side::Local(l) = local.side else {
            return Err(PyValueError::new_err(
                "the local side is a remote prepared list (prepared for a peer)",
            ));
        };
        let Side::Remote(r) = remote.side else {
            return Err(PyValueError::new_err(
                "the remote side is a local prepared list (prepared for this agent)",
            ));
        };
        let li = parse_indices(local_idx)?;
        let ri = parse_indices(remote_idx)?;
        let req = py
            .detach(|| self.inner.make_xfer(op, l, &li, r, &ri, notif))
            .py_err()?;
        Ok(Request::new(req, self.inner.clone(), remote.peer.clone()))
    }

    /// Prepares a transfer (not posted) between local and `peer`'s
    /// descriptors (packed triples), paired by position.
    #[pyo3(signature = (op, local, remote, peer, notif=None))]
    fn prepare(
        &self,
        py: Python<'_>,
        op: &str,
        local: &[u8],
        remote: &[u8],
        peer: &str,
        notif: Option<&[u8]>,
    ) -> PyResult<Request> {
        let op = parse_op(op)?;
        let l = parse_descs(local)?;
        let r = parse_descs(remote)?;
        let req = py
            .detach(|| self.inner.prepare(op, &l, &r, peer, notif))
            .py_err()?;
        Ok(Request::new(req, self.inner.clone(), peer.to_string()))
    }

    /// Sends `msg` to `peer` outside any transfer.
    fn notify(&self, py: Python<'_>, peer: &str, msg: &[u8]) -> PyResult<()> {
        py.detach(|| self.inner.notify(peer, msg)).py_err()
    }

    /// Takes the notifications received so far: {peer: [bytes, ...]}.
    fn take_notifications(&self, py: Python<'_>) -> PyResult<Py<PyDict>> {
        let n = py.detach(|| self.inner.take_notifications()).py_err()?;
        notifications_to_py(py, n)
    }

    /// Like `take_notifications`, waiting up to `timeout` seconds for one.
    fn wait_notifications(&self, py: Python<'_>, timeout: f64) -> PyResult<Py<PyDict>> {
        let t = secs(timeout, "timeout")?;
        let n = py.detach(|| self.inner.wait_notifications(t)).py_err()?;
        notifications_to_py(py, n)
    }

    /// How data to and from `peer` moves ("cross-memory attach" or the
    /// backend's name).
    fn peer_path(&self, py: Python<'_>, peer: &str) -> PyResult<&'static str> {
        py.detach(|| self.inner.peer_path(peer)).py_err()
    }

    /// Polls the transport once; returns how many transfers finished.
    fn make_progress(&self, py: Python<'_>) -> PyResult<usize> {
        py.detach(|| self.inner.make_progress()).py_err()
    }

    /// Shuts the agent down; afterwards every call raises `ShutDownError`.
    fn shutdown(&self, py: Python<'_>) {
        py.detach(|| self.inner.shutdown());
    }
}

impl Agent {
    fn prepared(&self, side: Side, len: usize, peer: String) -> Prepared {
        Prepared {
            agent: self.inner.clone(),
            side,
            len,
            peer,
            released: AtomicBool::new(false),
        }
    }
}

/// Connects to the side channel of the agent at `addr` and runs `f` over
/// it, without the GIL: authenticated with `auth_key`, else with the
/// key the environment sets ([`AgentConfig::effective_auth_key`]);
/// `timeout` (seconds) bounds connecting and each exchange.
fn over_side_channel<R: Send>(
    py: Python<'_>,
    addr: &str,
    auth_key: Option<Vec<u8>>,
    timeout: f64,
    f: impl FnOnce(&mut Client) -> Result<R, Error> + Send,
) -> PyResult<R> {
    let timeout = secs(timeout, "timeout")?;
    py.detach(|| {
        let key = auth_key.or_else(|| AgentConfig::default().effective_auth_key());
        let mut c = Client::connect(addr, key.as_deref(), timeout)?;
        f(&mut c)
    })
    .py_err()
}
