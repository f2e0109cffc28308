//! The agent's shared part ([`AgentInner`]), the side channel's view of it, and the owner that shuts it down.

use super::*;

/// The agent itself, shared by its clones, threads and requests.
pub(super) struct AgentInner {
    pub(super) name: String,
    pub(super) kind: BackendKind,
    pub(super) cfg: AgentConfig,
    pub(super) progress_thread: bool,
    pub(super) state: Mutex<State>,
    /// Signalled when transfers finish (by the progress thread) and on
    /// shutdown.
    pub(super) done: Condvar,
    pub(super) closed: AtomicBool,
    /// Wakes the progress thread from its idle sleep.
    pub(super) waker: crate::wake::Waker,
    /// Set (under the state lock) while the progress thread may block on
    /// the transport's descriptor: only then do posts need to wake it.
    pub(super) sleeping: AtomicBool,
}

impl AgentInner {
    /// Wakes the progress thread if it may be blocked on the transport.
    pub(super) fn nudge(&self) {
        if self.sleeping.load(Ordering::SeqCst) {
            self.waker.wake();
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent across a panic elsewhere: the core
        // returns errors instead of panicking midway.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// See [`Agent::rail_stats`].
    pub(super) fn rail_stats(&self) -> Vec<kvxfer_rails::RailStats> {
        let mut st = self.lock();
        match st.backend() {
            Ok(b) => on_engine!(b, e => AgentTransport::rail_stats(e.transport())),
            Err(_) => Vec::new(),
        }
    }

    pub(super) fn metadata(&self) -> Result<Vec<u8>, Error> {
        let mut st = self.lock();
        let b = st.backend()?;
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let r = on_engine!(b, e => e.local_metadata(&mut buf));
            match r {
                Ok(n) => {
                    buf.truncate(n);
                    return Ok(buf);
                }
                Err(Error::BufferTooSmall { needed, .. }) if needed as usize > buf.len() => {
                    buf.resize(needed as usize, 0);
                }
                Err(e) => return Err(e),
            }
        }
    }

    pub(super) fn load(&self, blob: &[u8]) -> Result<String, Error> {
        let mut st = self.lock();
        let b = st.backend()?;
        let loaded: Result<kvxfer_core::error::Name, Error> =
            on_engine!(b, e => e.load_remote(blob));
        let name = st.meter.check(crate::metrics::Op::Load, loaded)?;
        st.meter.loaded(&name);
        log::debug!("agent {}: loaded metadata of {name:?}", self.name);
        Ok(name.as_str().to_string())
    }
}

impl side_channel::Handler for AgentInner {
    fn metadata(&self) -> Result<Vec<u8>, Error> {
        AgentInner::metadata(self)
    }
    fn load(&self, blob: &[u8]) -> Result<String, Error> {
        AgentInner::load(self, blob)
    }
    fn invalidate(&self, name: &str) -> Result<(), Error> {
        let mut st = self.lock();
        let b = st.backend()?;
        let r: Result<(), Error> = on_engine!(b, e => e.invalidate_remote(name));
        r?;
        log::debug!(
            "agent {}: peer {name:?} invalidated its metadata",
            self.name
        );
        Ok(())
    }
}

/// Owns the threads; shuts the agent down when the last [`Agent`] clone
/// goes.
pub(super) struct Owner {
    pub(super) inner: Arc<AgentInner>,
    pub(super) server: Mutex<Option<Server>>,
    pub(super) listen_addr: Option<SocketAddr>,
    pub(super) progress: Mutex<Option<JoinHandle<()>>>,
    /// The agent's metrics, and the endpoint serving them if asked for.
    pub(super) metrics: (
        Arc<crate::metrics::AgentMetrics>,
        Option<crate::metrics::Endpoint>,
    ),
}

impl Owner {
    pub(super) fn shutdown(&self) {
        if self.inner.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        log::info!("agent {}: shutting down", self.inner.name);
        // No new metadata from outside, then no progress, then the engine.
        if let Some(mut s) = self
            .server
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            s.stop();
        }
        self.inner.waker.wake();
        if let Some(t) = self
            .progress
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            let _ = t.join();
        }
        let backend = self.inner.lock().backend.take();
        drop(backend);
        self.inner.done.notify_all();
    }
}

impl Drop for Owner {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl std::fmt::Debug for AgentInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent").field("name", &self.name).finish()
    }
}
