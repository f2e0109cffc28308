//! Prepared descriptor lists and transfer requests.

use super::*;

pub(super) fn strided(addr: u64, len: u64, stride: u64, count: u32, dev: u32) -> Strided {
    Strided {
        addr,
        len,
        stride,
        count,
        dev,
    }
}

/// Which agent a prepared list belongs to.
#[derive(Clone, Copy)]
pub(super) enum Side {
    Local(PreparedLocal),
    Remote(PreparedRemote),
}

/// A descriptor list resolved once, for `Agent.make_xfer`.
#[pyclass(frozen, module = "kvxfer._kvxfer")]
pub(super) struct Prepared {
    pub(super) agent: RustAgent,
    pub(super) side: Side,
    pub(super) len: usize,
    pub(super) peer: String,
    pub(super) released: AtomicBool,
}

#[pymethods]
impl Prepared {
    /// Entries in the list.
    fn __len__(&self) -> usize {
        self.len
    }

    /// The peer the list was prepared for ("" for a local list).
    #[getter]
    fn peer(&self) -> &str {
        &self.peer
    }

    /// Whether the list holds this agent's memory.
    #[getter]
    fn is_local(&self) -> bool {
        matches!(self.side, Side::Local(_))
    }

    /// Releases the list; idempotent.
    fn release(&self, py: Python<'_>) -> PyResult<()> {
        if self.released.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        py.detach(|| match self.side {
            Side::Local(p) => self.agent.release_local(p),
            Side::Remote(p) => self.agent.release_remote(p),
        })
        .py_err()
    }
}

impl Drop for Prepared {
    fn drop(&mut self) {
        if !self.released.swap(true, Ordering::AcqRel) {
            // Released without the GIL (it takes the agent's lock); a
            // shut-down agent has released everything already.
            let (agent, side) = (&self.agent, self.side);
            Python::attach(|py| {
                py.detach(|| {
                    let _ = match side {
                        Side::Local(p) => agent.release_local(p),
                        Side::Remote(p) => agent.release_remote(p),
                    };
                })
            });
        }
    }
}

/// A transfer request: post, poll, wait, re-post, release.
#[pyclass(frozen, module = "kvxfer._kvxfer")]
pub(super) struct Request {
    /// `None` once released.
    inner: RwLock<Option<XferRequest>>,
    agent: RustAgent,
    handle: kvxfer::XferHandle,
    backend: &'static str,
    peer: String,
}

impl Request {
    pub(super) fn new(req: XferRequest, agent: RustAgent, peer: String) -> Request {
        Request {
            backend: agent.backend().name(),
            agent,
            handle: req.handle(),
            inner: RwLock::new(Some(req)),
            peer,
        }
    }

    fn with<T>(&self, f: impl FnOnce(&XferRequest) -> Result<T, Error>) -> Result<T, Error> {
        let g = self.inner.read().unwrap_or_else(|p| p.into_inner());
        match g.as_ref() {
            Some(r) => f(r),
            None => Err(Error::StaleHandle {
                handle: self.handle,
            }),
        }
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        // Dropping an unreleased request releases it, which may wait for a
        // transfer in flight: without the GIL.
        let taken = self
            .inner
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(req) = taken {
            Python::attach(|py| py.detach(move || drop(req)));
        }
    }
}

#[pymethods]
impl Request {
    /// Posts (or re-posts) the transfer; returns its state code right
    /// after (0 prepared, 1 in progress, 2 done, 3 failed).
    fn post(&self, py: Python<'_>) -> PyResult<u8> {
        let s = py.detach(|| self.with(|r| r.post())).py_err()?;
        Ok(state_code(&s))
    }

    /// The transfer's state code (see `post`). While the transfer is in
    /// progress, the call polls the transport once itself (as NIXL's
    /// status check progresses its backend), so that a caller polling in a
    /// loop sees the completion without waiting for the progress thread to
    /// be scheduled, and then yields its CPU once, so that the threads
    /// moving the data run.
    fn status(&self, py: Python<'_>) -> PyResult<u8> {
        let s = py
            .detach(|| {
                let mut s = self.with(|r| r.status());
                if matches!(s, Ok(XferState::InProgress)) {
                    let _ = self.agent.make_progress();
                    s = self.with(|r| r.status());
                    if matches!(s, Ok(XferState::InProgress)) {
                        std::thread::yield_now();
                    }
                }
                s
            })
            .py_err()?;
        Ok(state_code(&s))
    }

    /// Waits up to `timeout` seconds; returns the state code reached.
    fn wait(&self, py: Python<'_>, timeout: f64) -> PyResult<u8> {
        let t = secs(timeout, "timeout")?;
        let outcome = py.detach(|| self.with(|r| Ok(r.wait(t)))).py_err()?;
        Ok(match outcome {
            WaitOutcome::Done => STATE_DONE,
            WaitOutcome::Failed(_) => STATE_ERR,
            WaitOutcome::InProgress => STATE_PROC,
        })
    }

    /// Why the transfer failed, as an exception instance; None unless it
    /// failed.
    fn failure(&self, py: Python<'_>) -> PyResult<Option<PyErr>> {
        let s = py.detach(|| self.with(|r| r.status()));
        Ok(match s {
            Ok(XferState::Failed(e)) | Err(e) => Some(to_py(e)),
            Ok(_) => None,
        })
    }

    /// Telemetry: (bytes, descriptors, segments, posted_ns, post_ns,
    /// completed_ns); times are nanoseconds on the agent's monotonic clock,
    /// None when not reached.
    #[allow(clippy::type_complexity)]
    fn telemetry(
        &self,
        py: Python<'_>,
    ) -> PyResult<(u64, u32, u32, Option<u64>, u64, Option<u64>)> {
        let t = py.detach(|| self.with(|r| r.telemetry())).py_err()?;
        Ok((
            t.bytes,
            t.descs,
            t.segments,
            t.posted_at.map(|i| i.nanos),
            t.post_nanos,
            t.completed_at.map(|i| i.nanos),
        ))
    }

    /// Measures the Rust side of a post: `n` times, posts the transfer
    /// and polls its status until it ends, all in Rust (the GIL released
    /// once around the loop); returns each round's nanoseconds (for the
    /// benchmark of the Python layer's overhead).
    fn bench_post_poll(&self, py: Python<'_>, n: usize) -> PyResult<Vec<u64>> {
        let mut out = Vec::with_capacity(n);
        py.detach(|| {
            self.with(|r| {
                for _ in 0..n {
                    let t0 = std::time::Instant::now();
                    let mut s = r.post()?;
                    while matches!(s, XferState::InProgress) {
                        s = r.status()?;
                    }
                    if let XferState::Failed(e) = s {
                        return Err(e);
                    }
                    out.push(u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX));
                }
                Ok(())
            })
        })
        .py_err()?;
        Ok(out)
    }

    /// Measures `n` status calls in Rust (the GIL released once around
    /// the loop); returns their total nanoseconds.
    fn bench_status(&self, py: Python<'_>, n: usize) -> PyResult<u64> {
        let t0 = std::time::Instant::now();
        py.detach(|| {
            self.with(|r| {
                for _ in 0..n {
                    r.status()?;
                }
                Ok(())
            })
        })
        .py_err()?;
        Ok(u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX))
    }

    /// The backend moving this transfer.
    #[getter]
    fn backend(&self) -> &'static str {
        self.backend
    }

    /// The peer of this transfer.
    #[getter]
    fn peer(&self) -> &str {
        &self.peer
    }

    /// Whether the request was released.
    #[getter]
    fn released(&self) -> bool {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_none()
    }

    /// Releases the transfer (one in progress is cancelled where the
    /// backend can, else waited for); idempotent.
    fn release(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| {
            let taken = self.inner.write().unwrap_or_else(|p| p.into_inner()).take();
            match taken {
                Some(r) => r.release(),
                None => Ok(()),
            }
        })
        .py_err()
    }
}
