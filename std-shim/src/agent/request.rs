//! [`XferRequest`]: posting, waiting for and releasing one transfer.

use super::*;

/// The outcome of [`XferRequest::wait`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WaitOutcome {
    /// All data is at its destination.
    Done,
    /// The transfer failed (or the request is no longer valid), and why.
    Failed(Error),
    /// The timeout passed first (or the request was never posted).
    InProgress,
}

/// A transfer of an [`Agent`]. Dropping it releases the transfer: one in
/// progress is cancelled where the transport can cancel, and otherwise
/// waited for up to [`AgentConfig::release_timeout`].
#[derive(Debug)]
pub struct XferRequest {
    pub(super) inner: Arc<AgentInner>,
    pub(super) handle: XferHandle,
    pub(super) released: bool,
}
impl XferRequest {
    /// The core's handle of this transfer.
    pub fn handle(&self) -> XferHandle {
        self.handle
    }

    /// Posts (or re-posts) the transfer; returns its state right after
    /// (`Done` when the transport completed it inline). Refused with
    /// [`Error::InProgress`] while a previous post runs.
    pub fn post(&self) -> Result<XferState, Error> {
        let mut st = self.inner.lock();
        let State { backend, meter, .. } = &mut *st;
        let b = backend.as_mut().ok_or(Error::ShutDown)?;
        let state: Result<XferState, Error> = on_engine!(b, e => {
            meter.posting(e, self.handle);
            let r = e.post(self.handle, now());
            if r.is_ok() {
                e.post_finished(self.handle, now());
            }
            meter.posted(e, self.handle, &r);
            r
        });
        let state = state?;
        // The progress thread may sleep on the transport: it has work now,
        // unless the transport finished the transfer (and its
        // notification) inside the post.
        if state != XferState::Done {
            self.inner.nudge();
        }
        Ok(state)
    }

    /// Re-posts the transfer (same as [`post`](XferRequest::post)).
    pub fn repost(&self) -> Result<XferState, Error> {
        self.post()
    }

    /// The transfer's state. Without a progress thread, polls first.
    pub fn status(&self) -> Result<XferState, Error> {
        let mut st = self.inner.lock();
        st.backend()?;
        if !self.inner.progress_thread {
            st.progress();
        }
        let b = st.backend()?;
        on_engine!(b, e => e.state(self.handle))
    }

    /// Whether the transfer has finished, successfully or not.
    pub fn is_completed(&self) -> bool {
        matches!(self.status(), Ok(XferState::Done | XferState::Failed(_)))
    }

    /// The transfer's telemetry (bytes, segments, post and completion
    /// times).
    pub fn telemetry(&self) -> Result<XferTelemetry, Error> {
        let mut st = self.inner.lock();
        let b = st.backend()?;
        on_engine!(b, e => e.telemetry(self.handle))
    }

    /// Waits up to `timeout` for the transfer to finish.
    pub fn wait(&self, timeout: Duration) -> WaitOutcome {
        let deadline = StdInstant::now() + timeout;
        let mut st = self.inner.lock();
        let mut spins: u32 = 0;
        loop {
            if !self.inner.progress_thread {
                st.progress();
            }
            let state = match st.backend() {
                Ok(b) => on_engine!(b, e => e.state(self.handle)),
                Err(e) => Err(e),
            };
            match state {
                Ok(XferState::Done) => return WaitOutcome::Done,
                Ok(XferState::Failed(e)) | Err(e) => return WaitOutcome::Failed(e),
                Ok(XferState::Prepared) => return WaitOutcome::InProgress,
                Ok(XferState::InProgress) => {}
            }
            let left = deadline.saturating_duration_since(StdInstant::now());
            if left.is_zero() {
                return WaitOutcome::InProgress;
            }
            if self.inner.progress_thread {
                // Woken by the progress thread when transfers finish; the
                // cap guards against a wake-up lost to a shutdown race.
                let (g, _) = self
                    .inner
                    .done
                    .wait_timeout(st, left.min(Duration::from_millis(1)))
                    .unwrap_or_else(PoisonError::into_inner);
                st = g;
            } else {
                drop(st);
                spins = spins.saturating_add(1);
                if spins < 1000 {
                    std::thread::yield_now();
                } else {
                    std::thread::sleep(Duration::from_micros(20).min(left));
                }
                st = self.inner.lock();
            }
        }
    }

    /// Releases the transfer now, reporting what dropping it would only
    /// log. See the type's docs.
    pub fn release(mut self) -> Result<(), Error> {
        self.release_inner()
    }

    fn release_inner(&mut self) -> Result<(), Error> {
        if self.released {
            return Ok(());
        }
        self.released = true;
        let mut st = self.inner.lock();
        let Ok(b) = st.backend() else { return Ok(()) };
        let first: Result<(), Error> = on_engine!(b, e => e.release(self.handle));
        st.meter.released(self.handle, &first);
        match first {
            Ok(()) => Ok(()),
            Err(Error::InProgress { .. }) => {
                // The transport cannot cancel: wait for the end, bounded.
                drop(st);
                let limit = self.inner.cfg.release_timeout;
                let outcome = self.wait(limit);
                let mut st = self.inner.lock();
                let Ok(b) = st.backend() else { return Ok(()) };
                let r: Result<(), Error> = on_engine!(b, e => e.release(self.handle));
                st.meter.released(self.handle, &r);
                if let Err(Error::InProgress { .. }) = r {
                    log::warn!(
                        "transfer {} still in progress {} ms after release ({outcome:?}); it is \
                         released when it ends",
                        self.handle,
                        limit.as_millis()
                    );
                    st.orphans.push(self.handle);
                }
                r
            }
            Err(e) => Err(e),
        }
    }
}

impl Drop for XferRequest {
    fn drop(&mut self) {
        if let Err(e) = self.release_inner() {
            log::warn!("releasing transfer {}: {e}", self.handle);
        }
    }
}
