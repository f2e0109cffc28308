//! The CUDA driver, loaded at run time: presence check, initialisation,
//! error texts, primary contexts, device queries and pointer attributes.
//!
//! Every function here first checks that `libcuda` can be loaded and returns
//! [`Error::Backend`] with code [`NO_DRIVER`] and the text "no CUDA driver
//! found" when it cannot: nothing in this crate panics on a machine without a
//! GPU.

use std::ffi::CStr;
use std::sync::{Arc, OnceLock};

use cudarc::driver::sys;
use kvxfer_core::{Error, MemKind};

/// Backend name used in every error of this crate.
pub const BACKEND: &str = "CUDA_IPC";

/// Error code reported when `libcuda` cannot be loaded (CUDA's own codes are
/// all non-negative).
pub const NO_DRIVER: i64 = -1;

/// Error code reported when an argument is refused before reaching CUDA
/// (`CUDA_ERROR_INVALID_VALUE`).
pub const INVALID_VALUE: i64 = 1;

/// Text of the error returned when `libcuda` cannot be loaded.
pub const NO_DRIVER_TEXT: &str = "no CUDA driver found (libcuda could not be loaded)";

/// Whether the CUDA driver library can be loaded in this process.
pub fn driver_present() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: `is_culib_present` only tries `dlopen` on the candidate names
    // and drops what it opened; it has no other effect.
    *PRESENT.get_or_init(|| unsafe { sys::is_culib_present() })
}

/// The error for a missing driver.
pub fn no_driver() -> Error {
    Error::backend(BACKEND, NO_DRIVER, NO_DRIVER_TEXT)
}

/// Loads and initialises the driver once per process.
pub fn init() -> Result<(), Error> {
    static INIT: OnceLock<Result<(), Error>> = OnceLock::new();
    INIT.get_or_init(|| {
        if !driver_present() {
            return Err(no_driver());
        }
        // SAFETY: the library is present (checked above); cuInit takes flags
        // that must be 0 and is safe to call from any thread, any number of times.
        let res = unsafe { sys::cuInit(0) };
        check(res, "cuInit")
    })
    .clone()
}

/// The driver's name and description of `res`.
fn error_text(res: sys::CUresult) -> String {
    let mut name: *const std::ffi::c_char = std::ptr::null();
    let mut desc: *const std::ffi::c_char = std::ptr::null();
    // SAFETY: both calls write a pointer to a static, NUL-terminated string
    // owned by the driver, or leave the out-parameter untouched on failure;
    // the driver is loaded because every caller got `res` from it.
    unsafe {
        sys::cuGetErrorName(res, &mut name);
        sys::cuGetErrorString(res, &mut desc);
    }
    let read = |p: *const std::ffi::c_char| {
        if p.is_null() {
            String::new()
        } else {
            // SAFETY: non-null pointers come from the driver and point to
            // static NUL-terminated strings.
            unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
        }
    };
    format!("{} ({})", read(name), read(desc))
}

/// Turns a driver status into a result; `what` names the call and its
/// arguments for the error text.
pub fn check(res: sys::CUresult, what: &str) -> Result<(), Error> {
    check_with(res, || what)
}

/// [`check`] for a hot path: `what` builds the error text's context only
/// when the call failed, so a success formats nothing.
pub fn check_with<S: core::fmt::Display>(
    res: sys::CUresult,
    what: impl FnOnce() -> S,
) -> Result<(), Error> {
    if res == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(Error::backend(
            BACKEND,
            res as i64,
            &format!("{}: {}", what(), error_text(res)),
        ))
    }
}

/// The driver's CUDA version as `(major, minor)`, e.g. `(13, 0)`.
pub fn driver_version() -> Result<(u32, u32), Error> {
    init()?;
    let mut v = 0;
    // SAFETY: the driver is initialised; `v` is a valid out-parameter.
    check(
        unsafe { sys::cuDriverGetVersion(&mut v) },
        "cuDriverGetVersion",
    )?;
    Ok(((v / 1000) as u32, ((v % 1000) / 10) as u32))
}

/// How many CUDA devices this process sees.
pub fn device_count() -> Result<u32, Error> {
    init()?;
    let mut n = 0;
    // SAFETY: the driver is initialised; `n` is a valid out-parameter.
    check(unsafe { sys::cuDeviceGetCount(&mut n) }, "cuDeviceGetCount")?;
    Ok(n.max(0) as u32)
}

/// The driver handle of device `ordinal`, checked against the device count.
fn device(ordinal: u32) -> Result<sys::CUdevice, Error> {
    let count = device_count()?;
    if ordinal >= count {
        return Err(Error::backend(
            BACKEND,
            INVALID_VALUE,
            &format!("device {ordinal} does not exist ({count} device(s) visible)"),
        ));
    }
    let mut dev = 0;
    // SAFETY: the driver is initialised and `ordinal` is below the count.
    check(
        unsafe { sys::cuDeviceGet(&mut dev, ordinal as i32) },
        &format!("cuDeviceGet({ordinal})"),
    )?;
    Ok(dev)
}

/// What `kvxfer info` shows about one GPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Device ordinal in this process.
    pub ordinal: u32,
    /// Product name, e.g. "NVIDIA H100 80GB HBM3".
    pub name: String,
    /// Device UUID: the same physical GPU has the same UUID in every process.
    pub uuid: [u8; 16],
    /// PCI bus id, e.g. "0000:19:00.0".
    pub pci_bus_id: String,
    /// Total memory in bytes.
    pub total_mem: u64,
    /// Compute capability `(major, minor)`.
    pub compute_capability: (u32, u32),
    /// Number of streaming multiprocessors.
    pub multiprocessors: u32,
}

impl DeviceInfo {
    /// The UUID in the usual `GPU-xxxxxxxx-xxxx-…` form.
    pub fn uuid_string(&self) -> String {
        let h: Vec<String> = self.uuid.iter().map(|b| format!("{b:02x}")).collect();
        format!(
            "GPU-{}-{}-{}-{}-{}",
            h[0..4].concat(),
            h[4..6].concat(),
            h[6..8].concat(),
            h[8..10].concat(),
            h[10..16].concat()
        )
    }
}

/// The UUID of device `ordinal`.
pub fn device_uuid(ordinal: u32) -> Result<[u8; 16], Error> {
    let dev = device(ordinal)?;
    let mut uuid = sys::CUuuid { bytes: [0; 16] };
    // SAFETY: `dev` is a valid device and `uuid` a valid out-parameter.
    check(
        unsafe { sys::cuDeviceGetUuid_v2(&mut uuid, dev) },
        "cuDeviceGetUuid_v2",
    )?;
    Ok(uuid.bytes.map(|b| b as u8))
}

/// The local ordinal of the device with `uuid`, if this process sees it.
pub fn ordinal_of_uuid(uuid: &[u8; 16]) -> Result<Option<u32>, Error> {
    for i in 0..device_count()? {
        if &device_uuid(i)? == uuid {
            return Ok(Some(i));
        }
    }
    Ok(None)
}

/// Describes device `ordinal`.
pub fn device_info(ordinal: u32) -> Result<DeviceInfo, Error> {
    let dev = device(ordinal)?;
    let mut name = [0 as std::ffi::c_char; 256];
    // SAFETY: `name` holds 256 bytes, the length passed; the driver writes a
    // NUL-terminated string into it.
    check(
        unsafe { sys::cuDeviceGetName(name.as_mut_ptr(), name.len() as i32, dev) },
        "cuDeviceGetName",
    )?;
    let mut bus = [0 as std::ffi::c_char; 64];
    // SAFETY: as above, with 64 bytes.
    check(
        unsafe { sys::cuDeviceGetPCIBusId(bus.as_mut_ptr(), bus.len() as i32, dev) },
        "cuDeviceGetPCIBusId",
    )?;
    let mut total = 0usize;
    // SAFETY: `dev` is valid; `total` is a valid out-parameter.
    check(
        unsafe { sys::cuDeviceTotalMem_v2(&mut total, dev) },
        "cuDeviceTotalMem_v2",
    )?;
    let attr = |a: sys::CUdevice_attribute| -> Result<u32, Error> {
        let mut v = 0;
        // SAFETY: `dev` is valid; `v` is a valid out-parameter.
        check(
            unsafe { sys::cuDeviceGetAttribute(&mut v, a, dev) },
            "cuDeviceGetAttribute",
        )?;
        Ok(v.max(0) as u32)
    };
    use sys::CUdevice_attribute::*;
    let cstr = |b: &[std::ffi::c_char]| {
        let bytes: Vec<u8> = b
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    };
    Ok(DeviceInfo {
        ordinal,
        name: cstr(&name),
        uuid: device_uuid(ordinal)?,
        pci_bus_id: cstr(&bus),
        total_mem: total as u64,
        compute_capability: (
            attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
            attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
        ),
        multiprocessors: attr(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?,
    })
}

/// Every visible device.
pub fn devices() -> Result<Vec<DeviceInfo>, Error> {
    (0..device_count()?).map(device_info).collect()
}

/// Whether device `a` can access memory of device `b` directly.
pub fn can_access_peer(a: u32, b: u32) -> Result<bool, Error> {
    let (da, db) = (device(a)?, device(b)?);
    let mut v = 0;
    // SAFETY: both devices are valid; `v` is a valid out-parameter.
    check(
        unsafe { sys::cuDeviceCanAccessPeer(&mut v, da, db) },
        "cuDeviceCanAccessPeer",
    )?;
    Ok(v != 0)
}

/// Enables direct peer access (NVLink or PCIe peer-to-peer) between the
/// primary contexts of `a` and `b`, in both directions. Returns `false`,
/// changing nothing, where the devices cannot reach each other directly:
/// copies between them then go through the host. Peer access lasts as long
/// as both contexts do (callers that keep both alive may remember the
/// answer). Leaves the context of `a` current.
pub fn enable_peer_access(a: &Context, b: &Context) -> Result<bool, Error> {
    let (x, y) = (a.ordinal(), b.ordinal());
    if x == y {
        a.bind()?;
        return Ok(true);
    }
    if !can_access_peer(x, y)? || !can_access_peer(y, x)? {
        a.bind()?;
        return Ok(false);
    }
    for (from, to) in [(b, a), (a, b)] {
        from.bind()?;
        // SAFETY: `from` is current and `to` is a live primary context of
        // another device; flags must be 0.
        let res = unsafe { sys::cuCtxEnablePeerAccess(to.raw(), 0) };
        if res != sys::CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED {
            check(
                res,
                &format!(
                    "cuCtxEnablePeerAccess(device {} -> device {})",
                    from.ordinal(),
                    to.ordinal()
                ),
            )?;
        }
    }
    Ok(true)
}

/// A retained primary context of one device; released in `Drop`.
///
/// Shared through [`Arc`]: buffers and transports keep the context of their
/// device alive for as long as they hold memory in it.
#[derive(Debug)]
pub struct Context {
    ordinal: u32,
    dev: sys::CUdevice,
    ctx: sys::CUcontext,
}

// SAFETY: a CUDA context may be made current on any thread; `Context` only
// stores the handle and binds it before each use.
unsafe impl Send for Context {}
// SAFETY: binding a context (`cuCtxSetCurrent`) is thread-safe and affects
// only the calling thread.
unsafe impl Sync for Context {}

impl Context {
    /// Retains the primary context of device `ordinal`.
    pub fn new(ordinal: u32) -> Result<Arc<Context>, Error> {
        let dev = device(ordinal)?;
        let mut ctx = std::ptr::null_mut();
        // SAFETY: `dev` is valid; `ctx` is a valid out-parameter. Balanced by
        // cuDevicePrimaryCtxRelease_v2 in Drop.
        check(
            unsafe { sys::cuDevicePrimaryCtxRetain(&mut ctx, dev) },
            &format!("cuDevicePrimaryCtxRetain(device {ordinal})"),
        )?;
        Ok(Arc::new(Context { ordinal, dev, ctx }))
    }

    /// The device ordinal.
    pub fn ordinal(&self) -> u32 {
        self.ordinal
    }

    /// The raw context handle.
    pub fn raw(&self) -> sys::CUcontext {
        self.ctx
    }

    /// Makes this context current on the calling thread.
    pub fn bind(&self) -> Result<(), Error> {
        // SAFETY: `self.ctx` is a retained, live primary context.
        check(unsafe { sys::cuCtxSetCurrent(self.ctx) }, "cuCtxSetCurrent")
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: balances the retain in `new`; nothing uses `ctx` afterwards.
        let res = unsafe { sys::cuDevicePrimaryCtxRelease_v2(self.dev) };
        if let Err(e) = check(res, "cuDevicePrimaryCtxRelease") {
            log::warn!("releasing context of device {}: {e}", self.ordinal);
            return;
        }
        // After the last release the primary context is gone, but it stays
        // bound on this thread if it was current: the next library to use
        // the thread's current context (UCX's CUDA module, when a UCP
        // context is created) then crashes in the driver. Unbind it.
        let (mut flags, mut active) = (0u32, 0i32);
        // SAFETY: `dev` is valid; both out-parameters are valid.
        let st = unsafe { sys::cuDevicePrimaryCtxGetState(self.dev, &mut flags, &mut active) };
        if st != sys::CUresult::CUDA_SUCCESS || active != 0 {
            return;
        }
        let mut cur: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: `cur` is a valid out-parameter.
        let got = unsafe { sys::cuCtxGetCurrent(&mut cur) };
        if got == sys::CUresult::CUDA_SUCCESS && cur == self.ctx {
            // SAFETY: unbinding (a null context) is always valid.
            let res = unsafe { sys::cuCtxSetCurrent(std::ptr::null_mut()) };
            if let Err(e) = check(res, "cuCtxSetCurrent(null)") {
                log::warn!("unbinding context of device {}: {e}", self.ordinal);
            }
        }
    }
}

/// Where a pointer points, as CUDA sees it.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct PointerInfo {
    /// [`MemKind::Vram`] for device (and managed) memory, [`MemKind::Dram`]
    /// for host memory, pinned or not.
    pub kind: MemKind,
    /// GPU ordinal for VRAM; 0 for DRAM.
    pub dev: u32,
    /// Whether CUDA knows the memory (device, pinned or managed); `false`
    /// for ordinary pageable host memory.
    pub cuda_known: bool,
}

/// Finds the memory kind and device of `addr` (`cuPointerGetAttribute` with
/// `CU_POINTER_ATTRIBUTE_MEMORY_TYPE` and `CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL`).
pub fn pointer_info(addr: u64) -> Result<PointerInfo, Error> {
    init()?;
    use sys::CUpointer_attribute::*;
    let mut mem_type: u32 = 0;
    // SAFETY: for MEMORY_TYPE the driver writes one `unsigned int`, and
    // `mem_type` is one. A pointer CUDA does not know gives an error code, no
    // access to the memory.
    let res = unsafe {
        sys::cuPointerGetAttribute(
            (&mut mem_type as *mut u32).cast(),
            CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
            addr,
        )
    };
    if res == sys::CUresult::CUDA_ERROR_INVALID_VALUE {
        return Ok(PointerInfo {
            kind: MemKind::Dram,
            dev: 0,
            cuda_known: false,
        });
    }
    check(
        res,
        &format!("cuPointerGetAttribute(MEMORY_TYPE, {addr:#x})"),
    )?;
    let mut ordinal: i32 = 0;
    // SAFETY: for DEVICE_ORDINAL the driver writes one `int`.
    let res = unsafe {
        sys::cuPointerGetAttribute(
            (&mut ordinal as *mut i32).cast(),
            CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
            addr,
        )
    };
    check(
        res,
        &format!("cuPointerGetAttribute(DEVICE_ORDINAL, {addr:#x})"),
    )?;
    let kind = if mem_type == sys::CUmemorytype::CU_MEMORYTYPE_HOST as u32 {
        MemKind::Dram
    } else {
        MemKind::Vram
    };
    let dev = if kind == MemKind::Vram {
        ordinal.max(0) as u32
    } else {
        0
    };
    Ok(PointerInfo {
        kind,
        dev,
        cuda_known: true,
    })
}

/// The allocation holding `addr`: `(base, size)` from `cuMemGetAddressRange`.
pub fn address_range(addr: u64) -> Result<(u64, u64), Error> {
    init()?;
    // cuMemGetAddressRange only finds allocations of the current context
    // (CUDA_ERROR_NOT_FOUND otherwise): bind the one of the GPU holding
    // `addr`, which in a process using several GPUs may not be current.
    let info = pointer_info(addr)?;
    let _ctx = if info.kind == MemKind::Vram {
        let ctx = Context::new(info.dev)?;
        ctx.bind()?;
        Some(ctx)
    } else {
        None
    };
    let (mut base, mut size) = (0u64, 0usize);
    // SAFETY: both out-parameters are valid; an unknown address gives an
    // error code.
    check(
        unsafe { sys::cuMemGetAddressRange_v2(&mut base, &mut size, addr) },
        &format!("cuMemGetAddressRange({addr:#x})"),
    )?;
    Ok((base, size as u64))
}

/// Free and total bytes of GPU memory of device `ordinal`, as
/// `cuMemGetInfo` reports them (free counts every process's allocations).
pub fn memory_info(ordinal: u32) -> Result<(u64, u64), Error> {
    init()?;
    let ctx = Context::new(ordinal)?;
    ctx.bind()?;
    let (mut free, mut total) = (0usize, 0usize);
    // SAFETY: a context of the device is current; both out-parameters are
    // valid.
    check(
        unsafe { sys::cuMemGetInfo_v2(&mut free, &mut total) },
        "cuMemGetInfo",
    )?;
    Ok((free as u64, total as u64))
}
