//! VRAM and pinned host buffers, freed in `Drop`.

use std::sync::Arc;

use cudarc::driver::sys;
use kvxfer_core::{Error, Region};

use crate::driver::{check, Context, BACKEND, INVALID_VALUE};

fn bad_range(what: &str, offset: u64, len: u64, size: u64) -> Error {
    Error::backend(
        BACKEND,
        INVALID_VALUE,
        &format!("{what}: range [{offset}, +{len}) is outside the buffer of {size} bytes"),
    )
}

fn check_range(what: &str, offset: u64, len: u64, size: u64) -> Result<(), Error> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(bad_range(what, offset, len, size)),
    }
}

/// Device memory (VRAM) on one GPU, allocated with `cuMemAlloc` and freed
/// with `cuMemFree` in `Drop`. Keeps its device's primary context alive.
#[derive(Debug)]
pub struct DeviceBuffer {
    ctx: Arc<Context>,
    ptr: sys::CUdeviceptr,
    len: u64,
}

// SAFETY: the buffer is plain device memory; every method binds its context
// on the calling thread before touching it.
unsafe impl Send for DeviceBuffer {}
// SAFETY: `&self` methods only read device memory or query the pointer.
unsafe impl Sync for DeviceBuffer {}

impl DeviceBuffer {
    /// Allocates `len` bytes (not zeroed) on GPU `dev`.
    pub fn new(dev: u32, len: u64) -> Result<DeviceBuffer, Error> {
        crate::driver::init()?;
        if len == 0 {
            return Err(Error::InvalidRegion { addr: 0, len });
        }
        let ctx = Context::new(dev)?;
        ctx.bind()?;
        let mut ptr = 0;
        // SAFETY: the device's context is current; `ptr` is a valid out-parameter.
        check(
            unsafe { sys::cuMemAlloc_v2(&mut ptr, len as usize) },
            &format!("cuMemAlloc({len} bytes on device {dev})"),
        )?;
        Ok(DeviceBuffer { ctx, ptr, len })
    }

    /// Allocates a buffer on GPU `dev` holding a copy of `data`.
    pub fn from_host(dev: u32, data: &[u8]) -> Result<DeviceBuffer, Error> {
        let mut b = DeviceBuffer::new(dev, data.len() as u64)?;
        b.copy_from_host(0, data)?;
        Ok(b)
    }

    /// The device pointer.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always `false`: buffers are never empty.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The GPU ordinal.
    pub fn device(&self) -> u32 {
        self.ctx.ordinal()
    }

    /// The whole buffer as a VRAM region, ready to register.
    pub fn region(&self) -> Region {
        Region::vram(self.ptr, self.len, self.device())
    }

    /// Copies `data` to `offset` (synchronous).
    pub fn copy_from_host(&mut self, offset: u64, data: &[u8]) -> Result<(), Error> {
        check_range("copy_from_host", offset, data.len() as u64, self.len)?;
        self.ctx.bind()?;
        // SAFETY: the range lies inside the allocation (checked above) and
        // `data` is readable for `data.len()` bytes.
        check(
            unsafe { sys::cuMemcpyHtoD_v2(self.ptr + offset, data.as_ptr().cast(), data.len()) },
            "cuMemcpyHtoD",
        )?;
        // From pageable memory, cuMemcpyHtoD may return once the bytes are in
        // the driver's staging buffer, before the DMA into VRAM finished. A
        // peer process reading this memory over IPC (directly over NVLink
        // with peer access) could then see the old contents: wait for it.
        // SAFETY: the context is current; waits for the copy.
        check(unsafe { sys::cuCtxSynchronize() }, "cuCtxSynchronize")
    }

    /// Copies the bytes at `offset` into `out` (synchronous).
    pub fn copy_to_host(&self, offset: u64, out: &mut [u8]) -> Result<(), Error> {
        check_range("copy_to_host", offset, out.len() as u64, self.len)?;
        self.ctx.bind()?;
        // SAFETY: the range lies inside the allocation and `out` is writable
        // for `out.len()` bytes.
        check(
            unsafe { sys::cuMemcpyDtoH_v2(out.as_mut_ptr().cast(), self.ptr + offset, out.len()) },
            "cuMemcpyDtoH",
        )
    }

    /// The whole buffer copied to host memory.
    pub fn to_vec(&self) -> Result<Vec<u8>, Error> {
        let mut v = vec![0; self.len as usize];
        self.copy_to_host(0, &mut v)?;
        Ok(v)
    }

    /// Sets every byte to `value` (synchronous).
    pub fn fill(&mut self, value: u8) -> Result<(), Error> {
        self.ctx.bind()?;
        // SAFETY: the whole allocation is written, nothing beyond it.
        check(
            unsafe { sys::cuMemsetD8_v2(self.ptr, value, self.len as usize) },
            "cuMemsetD8",
        )?;
        // SAFETY: the context is current; waits for the memset.
        check(unsafe { sys::cuCtxSynchronize() }, "cuCtxSynchronize")
    }

    /// Copies all of `src` (same length) into this buffer with one
    /// `cuMemcpyDtoD` and waits for it: the single-process baseline. Across
    /// GPUs, peer access is enabled first where the devices support it.
    pub fn copy_from_device(&mut self, src: &DeviceBuffer) -> Result<(), Error> {
        if src.len != self.len {
            return Err(Error::LengthMismatch {
                index: 0,
                local: self.len,
                remote: src.len,
            });
        }
        // Across GPUs: a direct peer copy where the devices allow it.
        crate::driver::enable_peer_access(&self.ctx, &src.ctx)?;
        self.ctx.bind()?;
        // SAFETY: both allocations are live and `len` bytes long.
        check(
            unsafe { sys::cuMemcpyDtoD_v2(self.ptr, src.ptr, self.len as usize) },
            "cuMemcpyDtoD",
        )?;
        // SAFETY: the context is current; waits for the copy.
        check(unsafe { sys::cuCtxSynchronize() }, "cuCtxSynchronize")
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        let res = self.ctx.bind().and_then(|()| {
            // SAFETY: `ptr` came from cuMemAlloc in this context and is freed
            // once; the context outlives this call (it is dropped after).
            check(unsafe { sys::cuMemFree_v2(self.ptr) }, "cuMemFree")
        });
        if let Err(e) = res {
            log::warn!("freeing VRAM at {:#x}: {e}", self.ptr);
        }
    }
}

/// Page-locked host memory from `cuMemAllocHost`, freed with
/// `cuMemFreeHost` in `Drop`: the staging area for copies to and from VRAM.
#[derive(Debug)]
pub struct PinnedBuffer {
    ctx: Arc<Context>,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the buffer is owned host memory; access goes through `&`/`&mut`.
unsafe impl Send for PinnedBuffer {}
// SAFETY: shared access only reads.
unsafe impl Sync for PinnedBuffer {}

impl PinnedBuffer {
    /// Allocates `len` zeroed bytes of pinned memory, in the context of GPU `dev`.
    pub fn new(dev: u32, len: usize) -> Result<PinnedBuffer, Error> {
        crate::driver::init()?;
        if len == 0 {
            return Err(Error::InvalidRegion { addr: 0, len: 0 });
        }
        let ctx = Context::new(dev)?;
        ctx.bind()?;
        let mut p = std::ptr::null_mut();
        // SAFETY: a context is current; `p` is a valid out-parameter.
        check(
            unsafe { sys::cuMemAllocHost_v2(&mut p, len) },
            &format!("cuMemAllocHost({len} bytes)"),
        )?;
        // SAFETY: the driver returned `len` writable bytes at `p`.
        unsafe { std::ptr::write_bytes(p.cast::<u8>(), 0, len) };
        Ok(PinnedBuffer {
            ctx,
            ptr: p.cast(),
            len,
        })
    }

    /// The host address.
    pub fn addr(&self) -> u64 {
        self.ptr as u64
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always `false`: buffers are never empty.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The buffer as a DRAM region.
    pub fn region(&self) -> Region {
        Region::dram(self.addr(), self.len as u64)
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for `len` initialised bytes for the life of `self`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` makes the access unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        let res = self.ctx.bind().and_then(|()| {
            // SAFETY: `ptr` came from cuMemAllocHost and is freed once.
            check(
                unsafe { sys::cuMemFreeHost(self.ptr.cast()) },
                "cuMemFreeHost",
            )
        });
        if let Err(e) = res {
            log::warn!("freeing pinned memory at {:p}: {e}", self.ptr);
        }
    }
}
