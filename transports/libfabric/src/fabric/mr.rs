//! Memory registrations: [`MemoryRegion`] (an `fid_mr` that keeps its
//! domain open) and [`MsgBufs`] (registered notification buffers).

use std::cell::UnsafeCell;
use std::ffi::c_void;
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use kvxfer_core::Error;
use libfabric_sys as sys;

use super::{fi_error, Domain, FabricObjects};
use crate::BACKEND;

const ENOKEY: i64 = -(sys::FI_ENOKEY as i64);

/// A raw `void *` that may cross threads (a memory descriptor from
/// `fi_mr_desc`, only ever passed back to libfabric).
#[derive(Copy, Clone, Debug)]
pub(crate) struct MrDesc(pub(super) *mut c_void);
// SAFETY: the descriptor is an opaque token that kvxfer never dereferences;
// libfabric reads it only in calls that the transport serialises.
unsafe impl Send for MrDesc {}
// SAFETY: as above.
unsafe impl Sync for MrDesc {}

/// Process-wide counter for requested memory keys.
static NEXT_KEY: AtomicU64 = AtomicU64::new(1);

/// A key that no registration of this process has used: the process id in
/// the upper half (when the provider takes 64-bit keys) and a counter in
/// the lower half, cut to the provider's key size.
fn fresh_key(key_size: usize) -> u64 {
    let n = NEXT_KEY.fetch_add(1, Ordering::Relaxed);
    if key_size >= 8 {
        (u64::from(std::process::id()) << 32) | (n & 0xffff_ffff)
    } else {
        let bits = (key_size.max(1) * 8) as u32;
        n & ((1u64 << bits) - 1)
    }
}

/// An open `fid_mr`. Dropping it hands the handle to its [`Domain`],
/// whose owner closes it (a registration may be dropped on any thread; the
/// domain takes no concurrent call); the `Arc` keeps the domain open until
/// then.
#[derive(Debug)]
pub(crate) struct MemoryRegion {
    mr: *mut sys::fid_mr,
    desc: MrDesc,
    key: u64,
    domain: Arc<Domain>,
}

// SAFETY: the handle is only read after creation; Drop (on whatever
// thread) only hands it to `domain`, under a lock, and the owner of the
// transport closes it there, serialised with its other calls. The domain
// stays alive through `domain`.
unsafe impl Send for MemoryRegion {}
// SAFETY: shared references only read plain fields.
unsafe impl Sync for MemoryRegion {}

impl MemoryRegion {
    /// Registers `[addr, addr+len)` with the domain of `objects` for
    /// `access`, honouring `mr_mode` (requested keys, `FI_MR_ENDPOINT`):
    /// host memory, or VRAM of CUDA device `dev` (`fi_mr_regattr` with
    /// `FI_HMEM_CUDA`, see [`crate::hmem`]).
    ///
    /// The caller keeps the memory allocated until the registration is
    /// closed (the transport's registrations: the application, through the
    /// core's contract; its own buffers: [`MsgBufs`]).
    pub(crate) fn register(
        objects: &FabricObjects,
        mr_mode: u32,
        key_size: usize,
        addr: u64,
        len: u64,
        access: u64,
        dev: Option<u32>,
    ) -> Result<MemoryRegion, Error> {
        let prov_key = mr_mode & sys::FI_MR_PROV_KEY != 0;
        let ulen = usize::try_from(len).map_err(|_| Error::InvalidRegion { addr, len })?;
        let mut attempts = 0;
        let mr = loop {
            let requested = if prov_key { 0 } else { fresh_key(key_size) };
            let mut mr: *mut sys::fid_mr = ptr::null_mut();
            let ret = match dev {
                // SAFETY: the domain is open (held by objects); [addr,
                // addr+len) is VRAM of device `dev` that the caller keeps
                // allocated while registered; the shim builds the
                // fi_mr_attr (one iovec, FI_HMEM_CUDA) on its stack.
                Some(dev) => unsafe {
                    sys::kvxfer_fi_mr_reg_cuda(
                        objects.domain().raw(),
                        addr as *const c_void,
                        ulen,
                        access,
                        requested,
                        i32::try_from(dev).unwrap_or(i32::MAX),
                        &mut mr,
                    )
                },
                // SAFETY: the domain is open (held by objects); [addr,
                // addr+len) is memory of this process that the caller
                // keeps alive while registered.
                None => unsafe {
                    sys::kvxfer_fi_mr_reg(
                        objects.domain().raw(),
                        addr as *const c_void,
                        ulen,
                        access,
                        0,
                        requested,
                        0,
                        &mut mr,
                        ptr::null_mut(),
                    )
                },
            } as i64;
            if ret == ENOKEY && !prov_key && attempts < 16 {
                attempts += 1;
                continue;
            }
            if ret != 0 {
                let call = match dev {
                    Some(d) => format!("fi_mr_regattr (FI_HMEM_CUDA, GPU {d})"),
                    None => "fi_mr_reg".to_string(),
                };
                return Err(fi_error(ret, &format!("{call} of {addr:#x}+{len}")));
            }
            break mr;
        };
        // From here on, an early return closes the registration (Drop).
        let mut reg = MemoryRegion {
            mr,
            desc: MrDesc(ptr::null_mut()),
            key: 0,
            domain: objects.domain().clone(),
        };
        if mr_mode & sys::FI_MR_ENDPOINT != 0 {
            // SAFETY: mr and the endpoint are open objects of the same domain.
            let ret = unsafe { sys::kvxfer_fi_mr_bind(mr, objects.ep_fid(), 0) };
            if ret != 0 {
                return Err(fi_error(ret as i64, "fi_mr_bind"));
            }
            // SAFETY: mr is bound.
            let ret = unsafe { sys::kvxfer_fi_mr_enable(mr) };
            if ret != 0 {
                return Err(fi_error(ret as i64, "fi_mr_enable"));
            }
        }
        // SAFETY: mr is an open, enabled registration.
        unsafe {
            reg.key = sys::kvxfer_fi_mr_key(mr);
            reg.desc = MrDesc(sys::kvxfer_fi_mr_desc(mr));
        }
        if reg.key == sys::FI_KEY_NOTAVAIL {
            return Err(Error::backend(
                BACKEND,
                -(sys::FI_ENOSYS as i64),
                "fi_mr_key: provider needs raw keys (FI_MR_RAW), not supported",
            ));
        }
        Ok(reg)
    }

    /// The memory key peers use.
    pub(crate) fn key(&self) -> u64 {
        self.key
    }

    /// The local descriptor passed with operations on this memory.
    pub(crate) fn desc(&self) -> MrDesc {
        self.desc
    }
}

impl Drop for MemoryRegion {
    fn drop(&mut self) {
        self.domain.drop_reg(self.mr);
    }
}

/// A registered area of `count` message buffers of `slot` bytes, written
/// by libfabric and so only accessed through raw pointers.
pub(crate) struct MsgBufs {
    /// Declared before `mem` so that the registration is closed before the
    /// memory it covers is freed.
    reg: MemoryRegion,
    mem: Box<[UnsafeCell<u8>]>,
    slot: usize,
    count: usize,
}

impl MsgBufs {
    /// Allocates and registers `count` buffers of `slot` bytes for sends
    /// and receives.
    pub(crate) fn new(
        objects: &FabricObjects,
        mr_mode: u32,
        key_size: usize,
        slot: usize,
        count: usize,
    ) -> Result<MsgBufs, Error> {
        let mem: Box<[UnsafeCell<u8>]> = (0..slot * count).map(|_| UnsafeCell::new(0)).collect();
        let access = (sys::FI_SEND | sys::FI_RECV) as u64;
        let reg = MemoryRegion::register(
            objects,
            mr_mode,
            key_size,
            mem.as_ptr() as u64,
            (slot * count) as u64,
            access,
            None,
        )?;
        Ok(MsgBufs {
            reg,
            mem,
            slot,
            count,
        })
    }

    /// Bytes per buffer.
    pub(crate) fn slot(&self) -> usize {
        self.slot
    }

    /// Number of buffers.
    pub(crate) fn count(&self) -> usize {
        self.count
    }

    /// The registration's descriptor.
    pub(super) fn desc(&self) -> MrDesc {
        self.reg.desc()
    }

    /// Buffer `i`. Panics unless `i < count`.
    pub(super) fn ptr(&self, i: u32) -> *mut u8 {
        assert!((i as usize) < self.count, "buffer {i} of {}", self.count);
        // SAFETY: i < count, so the offset stays inside `mem`.
        unsafe { UnsafeCell::raw_get(self.mem.as_ptr()).add(i as usize * self.slot) }
    }

    /// Copies `msg` into buffer `i`. The caller owns buffer `i`: it is not
    /// posted to libfabric. Panics unless `msg` fits.
    pub(crate) fn write(&self, i: u32, msg: &[u8]) {
        assert!(msg.len() <= self.slot, "{} > {}", msg.len(), self.slot);
        // SAFETY: buffer i (bounds checked by ptr) holds slot >= msg.len()
        // bytes, is not posted (the caller owns it), and is written only
        // through its UnsafeCells.
        unsafe { ptr::copy_nonoverlapping(msg.as_ptr(), self.ptr(i), msg.len()) };
    }

    /// Copies the first `out.len()` bytes of buffer `i` into `out`. The
    /// caller owns buffer `i`: its receive completed and it is not posted
    /// again. Panics unless `out.len() <= slot`.
    pub(crate) fn read(&self, i: u32, out: &mut [u8]) {
        assert!(out.len() <= self.slot, "{} > {}", out.len(), self.slot);
        // SAFETY: as in write; libfabric no longer writes the buffer.
        unsafe { ptr::copy_nonoverlapping(self.ptr(i), out.as_mut_ptr(), out.len()) };
    }
}
