//! CUDA streams and events that own their handles, the asynchronous copies
//! queued on a stream, and the other raw driver calls of the transports
//! (IPC handles, page-locking). With `driver`, `memory` and `os` the only
//! modules with `unsafe`.
//!
//! The asynchronous copies take device and host addresses. Their safety
//! rests on a rule that [`crate::ipc`] and [`crate::staged`] keep and
//! state where they queue a copy: both ranges lie in live memory (a
//! registration, an opened IPC mapping or a pinned buffer) that stays
//! allocated until an event recorded after the copy has completed or the
//! stream was synchronised.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::sys;
use kvxfer_core::Error;

use crate::driver::{check, Context};

/// A non-blocking stream of one context. Dropping it waits for the work
/// queued on it, then destroys it; the context is released after.
pub(crate) struct Stream {
    raw: sys::CUstream,
    ctx: Arc<Context>,
}

// SAFETY: a stream may be used from any thread once its context is bound,
// which every method here does first; the owner serialises its use.
unsafe impl Send for Stream {}

impl Stream {
    /// A new non-blocking stream in `ctx` (left current).
    pub(crate) fn new(ctx: &Arc<Context>) -> Result<Stream, Error> {
        ctx.bind()?;
        let mut raw = std::ptr::null_mut();
        // SAFETY: the context is current; `raw` is a valid out-parameter.
        check(
            unsafe {
                sys::cuStreamCreate(&mut raw, sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32)
            },
            "cuStreamCreate",
        )?;
        Ok(Stream {
            raw,
            ctx: ctx.clone(),
        })
    }

    /// Waits until all work queued on the stream ends.
    pub(crate) fn synchronize(&self) -> Result<(), Error> {
        self.ctx.bind()?;
        // SAFETY: the stream is live (destroyed only in Drop) and its
        // context is current.
        check(
            unsafe { sys::cuStreamSynchronize(self.raw) },
            "cuStreamSynchronize",
        )
    }

    /// Queues a copy of `len` bytes from `src` to `dst`, addresses of any
    /// kind under unified addressing (`cuMemcpyAsync`). The context must be
    /// current; see the [module documentation](self) for the ranges.
    pub(crate) fn copy(&self, dst: u64, src: u64, len: usize) -> sys::CUresult {
        // SAFETY: the stream is live in the current context; the ranges
        // are live until the copy completed (module documentation).
        unsafe { sys::cuMemcpyAsync(dst, src, len, self.raw) }
    }

    /// Queues a device-to-device copy on one GPU (`cuMemcpyDtoDAsync`).
    pub(crate) fn copy_dtod(&self, dst: u64, src: u64, len: usize) -> sys::CUresult {
        // SAFETY: as in `copy`.
        unsafe { sys::cuMemcpyDtoDAsync_v2(dst, src, len, self.raw) }
    }

    /// Queues a copy between GPUs, each pointer with the context of the GPU
    /// that holds it (`cuMemcpyPeerAsync`).
    pub(crate) fn copy_peer(
        &self,
        dst: u64,
        dst_ctx: &Context,
        src: u64,
        src_ctx: &Context,
        len: usize,
    ) -> sys::CUresult {
        // SAFETY: as in `copy`; both contexts are alive (borrowed).
        unsafe { sys::cuMemcpyPeerAsync(dst, dst_ctx.raw(), src, src_ctx.raw(), len, self.raw) }
    }

    /// Queues a host-to-device copy (`cuMemcpyHtoDAsync`).
    pub(crate) fn copy_htod(&self, dst: u64, host: u64, len: usize) -> sys::CUresult {
        // SAFETY: as in `copy`; the driver only reads the host range.
        unsafe { sys::cuMemcpyHtoDAsync_v2(dst, host as *const c_void, len, self.raw) }
    }

    /// Queues a device-to-host copy (`cuMemcpyDtoHAsync`).
    pub(crate) fn copy_dtoh(&self, host: u64, src: u64, len: usize) -> sys::CUresult {
        // SAFETY: as in `copy`; the driver writes only the `len` bytes at
        // `host`, which no Rust reference reads meanwhile.
        unsafe { sys::cuMemcpyDtoHAsync_v2(host as *mut c_void, src, len, self.raw) }
    }

    /// Records `ev` after the work queued so far. The context must be
    /// current and `ev` of the same context.
    pub(crate) fn record(&self, ev: &Event) -> Result<(), Error> {
        // SAFETY: both handles are live (owned) in the current context.
        check(
            unsafe { sys::cuEventRecord(ev.raw, self.raw) },
            "cuEventRecord",
        )
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if let Err(e) = self.synchronize() {
            log::warn!("draining a stream of device {}: {e}", self.ctx.ordinal());
        }
        // SAFETY: the stream drained (or the context is broken) and is
        // destroyed once; the context is released after, with the field.
        unsafe { sys::cuStreamDestroy_v2(self.raw) };
    }
}

/// An event without timing, destroyed in `Drop`.
pub(crate) struct Event {
    raw: sys::CUevent,
}

// SAFETY: as for `Stream`: callers bind the event's context first.
unsafe impl Send for Event {}

impl Event {
    /// A new event in `ctx` (left current).
    pub(crate) fn new(ctx: &Context) -> Result<Event, Error> {
        ctx.bind()?;
        let mut raw = std::ptr::null_mut();
        // SAFETY: the context is current; `raw` is a valid out-parameter.
        check(
            unsafe {
                sys::cuEventCreate(&mut raw, sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32)
            },
            "cuEventCreate",
        )?;
        Ok(Event { raw })
    }

    /// `Ok(true)` once the work before the last record completed
    /// (`cuEventQuery`). The event's context must be current.
    pub(crate) fn query(&self) -> Result<bool, Error> {
        // SAFETY: the event is live (owned).
        let res = unsafe { sys::cuEventQuery(self.raw) };
        if res == sys::CUresult::CUDA_ERROR_NOT_READY {
            return Ok(false);
        }
        check(res, "cuEventQuery").map(|()| true)
    }

    /// Waits for the work before the last record. The event's context
    /// must be current.
    pub(crate) fn synchronize(&self) -> Result<(), Error> {
        // SAFETY: the event is live (owned).
        check(
            unsafe { sys::cuEventSynchronize(self.raw) },
            "cuEventSynchronize",
        )
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: the event is destroyed once; the driver releases it
        // after any work recorded on it.
        unsafe { sys::cuEventDestroy_v2(self.raw) };
    }
}

/// The IPC handle of the allocation starting at `base` (`cuIpcGetMemHandle`),
/// in the current context.
pub(crate) fn ipc_mem_handle(base: u64) -> Result<[u8; 64], Error> {
    let mut h = sys::CUipcMemHandle { reserved: [0; 64] };
    // SAFETY: `h` is a valid out-parameter; an address that does not start
    // an allocation of the current context gives an error code.
    check(
        unsafe { sys::cuIpcGetMemHandle(&mut h, base) },
        &format!("cuIpcGetMemHandle({base:#x})"),
    )?;
    Ok(h.reserved.map(|b| b as u8))
}

/// A peer's allocation opened with `cuIpcOpenMemHandle`, closed in `Drop`.
pub(crate) struct IpcMapping {
    ptr: u64,
    ctx: Arc<Context>,
}

impl IpcMapping {
    /// Opens the allocation `handle` exports, in `ctx`; `what` names it in
    /// the error.
    pub(crate) fn open(ctx: Arc<Context>, handle: &[u8; 64], what: &str) -> Result<Self, Error> {
        ctx.bind()?;
        let mut ptr = 0;
        let h = sys::CUipcMemHandle {
            reserved: handle.map(|b| b as std::ffi::c_char),
        };
        // SAFETY: `ptr` is a valid out-parameter; a handle that is not a
        // live export gives an error code.
        check(
            unsafe {
                sys::cuIpcOpenMemHandle_v2(
                    &mut ptr,
                    h,
                    sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32,
                )
            },
            what,
        )?;
        Ok(IpcMapping { ptr, ctx })
    }

    /// The mapping's device address in this process.
    pub(crate) fn ptr(&self) -> u64 {
        self.ptr
    }
}

impl Drop for IpcMapping {
    fn drop(&mut self) {
        let res = self.ctx.bind().and_then(|()| {
            // SAFETY: `ptr` was returned by cuIpcOpenMemHandle in this
            // context and is closed once; its owner keeps it until no
            // key or copy refers to it.
            check(
                unsafe { sys::cuIpcCloseMemHandle(self.ptr) },
                "cuIpcCloseMemHandle",
            )
        });
        if let Err(e) = res {
            log::warn!("closing IPC mapping at {:#x}: {e}", self.ptr);
        }
    }
}

/// Page-locks `len` bytes of this process at `addr` for every context
/// (`cuMemHostRegister`, portable). Changes no byte; undone by
/// [`host_unregister`].
pub(crate) fn host_register(addr: u64, len: u64) -> Result<(), Error> {
    // SAFETY: page-locking reads and writes no byte of the range; the
    // driver checks that it is mapped memory of this process.
    let res = unsafe {
        sys::cuMemHostRegister_v2(
            addr as *mut c_void,
            len as usize,
            sys::CU_MEMHOSTREGISTER_PORTABLE,
        )
    };
    check(res, &format!("cuMemHostRegister({addr:#x}, {len})"))
}

/// Unlocks memory page-locked by [`host_register`] at `addr`.
pub(crate) fn host_unregister(addr: u64) -> Result<(), Error> {
    // SAFETY: an address not registered gives an error code; unlocking
    // changes no byte.
    check(
        unsafe { sys::cuMemHostUnregister(addr as *mut c_void) },
        &format!("cuMemHostUnregister({addr:#x})"),
    )
}
