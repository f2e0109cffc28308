//! One GPU's work queue: its retained context, one non-blocking stream and a
//! pool of events (timing off) that mark where copies on the stream end.
//!
//! Used by the CUDA-IPC transport (one per local GPU) and by staging (one per
//! bounce pool). Destroyed in `Drop` after the stream drained: the events,
//! then the stream, then (when the field drops) the context.

use std::sync::Arc;

use cudarc::driver::sys;
use kvxfer_core::Error;

use crate::driver::{check, Context};

/// A context, its non-blocking stream and a pool of reusable events.
pub(crate) struct GpuStream {
    stream: sys::CUstream,
    free_events: Vec<sys::CUevent>,
    /// Released after the stream and events are destroyed in `Drop`.
    ctx: Arc<Context>,
}

impl GpuStream {
    /// Retains the primary context of device `ordinal` and creates a
    /// non-blocking stream in it.
    pub(crate) fn new(ordinal: u32) -> Result<GpuStream, Error> {
        let ctx = Context::new(ordinal)?;
        ctx.bind()?;
        let mut stream = std::ptr::null_mut();
        // SAFETY: the context is current; `stream` is a valid out-parameter.
        check(
            unsafe {
                sys::cuStreamCreate(
                    &mut stream,
                    sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32,
                )
            },
            "cuStreamCreate",
        )?;
        Ok(GpuStream {
            stream,
            free_events: Vec::new(),
            ctx,
        })
    }

    /// The device's context.
    pub(crate) fn ctx(&self) -> &Arc<Context> {
        &self.ctx
    }

    /// The raw stream, live in [`ctx`](GpuStream::ctx) for as long as `self`.
    pub(crate) fn raw(&self) -> sys::CUstream {
        self.stream
    }

    /// An event from the pool, or a new one.
    pub(crate) fn event(&mut self) -> Result<sys::CUevent, Error> {
        if let Some(e) = self.free_events.pop() {
            return Ok(e);
        }
        self.ctx.bind()?;
        let mut ev = std::ptr::null_mut();
        // SAFETY: the context is current; `ev` is a valid out-parameter.
        check(
            unsafe {
                sys::cuEventCreate(&mut ev, sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32)
            },
            "cuEventCreate",
        )?;
        Ok(ev)
    }

    /// Gives `ev`, taken from [`event`](GpuStream::event) and no longer
    /// waited on, back to the pool.
    pub(crate) fn recycle(&mut self, ev: sys::CUevent) {
        self.free_events.push(ev);
    }

    /// Once `enqueued` (the outcome of putting work on the stream, with the
    /// context bound) is `Ok`, records `ev` after that work and returns it.
    /// On any failure `ev` goes back to the pool.
    pub(crate) fn record_after(
        &mut self,
        ev: sys::CUevent,
        enqueued: Result<(), Error>,
    ) -> Result<sys::CUevent, Error> {
        let recorded = enqueued.and_then(|()| {
            // SAFETY: `ev` and the stream are live in the bound context.
            check(
                unsafe { sys::cuEventRecord(ev, self.stream) },
                "cuEventRecord",
            )
        });
        match recorded {
            Ok(()) => Ok(ev),
            Err(e) => {
                self.recycle(ev);
                Err(e)
            }
        }
    }

    /// With the context bound: `Ok(false)` while the work before `ev` runs;
    /// otherwise `ev` goes back to the pool and the outcome is returned.
    pub(crate) fn query_bound(&mut self, ev: sys::CUevent) -> Result<bool, Error> {
        // SAFETY: `ev` is a live event recorded in this context, which the
        // caller bound.
        let res = unsafe { sys::cuEventQuery(ev) };
        if res == sys::CUresult::CUDA_ERROR_NOT_READY {
            return Ok(false);
        }
        self.recycle(ev);
        check(res, "cuEventQuery").map(|()| true)
    }

    /// Waits for everything enqueued on the stream.
    pub(crate) fn synchronize(&self) -> Result<(), Error> {
        self.ctx.bind()?;
        // SAFETY: `stream` is live in this context.
        check(
            unsafe { sys::cuStreamSynchronize(self.stream) },
            "cuStreamSynchronize",
        )
    }
}

impl Drop for GpuStream {
    fn drop(&mut self) {
        if let Err(e) = self.synchronize() {
            log::warn!("draining stream of device {}: {e}", self.ctx.ordinal());
        }
        for ev in self.free_events.drain(..) {
            // SAFETY: pooled events have no pending work (the stream drained).
            unsafe { sys::cuEventDestroy_v2(ev) };
        }
        // SAFETY: the stream drained and is destroyed once; the context is
        // released after this, when the `ctx` field drops.
        unsafe { sys::cuStreamDestroy_v2(self.stream) };
    }
}
