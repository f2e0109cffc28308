//! RAII wrappers over libfabric's objects.
//!
//! [`Info`] owns an `fi_info` list. [`Shared`] owns the fabric, domain,
//! completion queue, address vector and endpoint of one transport; memory
//! registrations ([`crate::FabricReg`]) keep it alive through an [`Arc`], so
//! a registration is always closed before the domain it belongs to, whatever
//! order the owner drops things in.
//!
//! Close order: endpoint → address vector → completion queue → (memory
//! registrations, through the `Arc`) → domain → fabric → info.

use std::ffi::{c_void, CStr, CString};
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};
use std::sync::{Arc, Mutex};

use kvxfer_core::Error;
use libfabric_sys as sys;

use crate::BACKEND;

/// libfabric's setting that makes `fi_av_remove` close the connection to
/// the removed peer (`tcp;ofi_rxm` keeps it open otherwise, and with it
/// every operation still queued on it).
pub(crate) const AV_REMOVE_CLEANUP_ENV: &CStr = c"FI_AV_REMOVE_CLEANUP";

/// Sets `FI_AV_REMOVE_CLEANUP=1` unless the environment sets it already.
///
/// libfabric reads the variable once, in `fi_ini`, on the process's first
/// libfabric call, so it must be in place before any; and changing the
/// environment is sound only while no other thread reads it. Both hold in
/// a constructor of the executable, which the loader runs before `main`
/// with the process's one thread. A library loaded later (`dlopen` of the
/// C ABI or the Python module) may run it in a process that has threads
/// already: then it changes nothing, and [`FabricTransport::new`] fails
/// asking for the variable instead.
///
/// [`FabricTransport::new`]: crate::FabricTransport::new
extern "C" fn set_av_remove_cleanup() {
    if !single_threaded() {
        return;
    }
    // SAFETY: both strings are NUL-terminated literals; setenv copies them.
    // This process has one thread (checked above), so no other thread
    // reads the environment meanwhile.
    unsafe { libc::setenv(AV_REMOVE_CLEANUP_ENV.as_ptr(), c"1".as_ptr(), 0) };
}

/// Whether this process has exactly one thread (`Threads:` in
/// `/proc/self/status`); false when that cannot be read.
fn single_threaded() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Threads:"))
            .is_some_and(|n| n.trim() == "1")
    })
}

/// Runs [`set_av_remove_cleanup`] before `main`.
#[cfg(target_os = "linux")]
#[used]
#[link_section = ".init_array"]
static SET_AV_REMOVE_CLEANUP: extern "C" fn() = set_av_remove_cleanup;

/// libfabric's text for a (positive or negative) error code.
pub(crate) fn strerror(code: i64) -> String {
    let errnum = code.unsigned_abs().min(i32::MAX as u64) as i32;
    // SAFETY: fi_strerror accepts any error number and returns a pointer to a
    // static NUL-terminated string (or null, which is checked).
    let p = unsafe { sys::fi_strerror(errnum) };
    if p.is_null() {
        return format!("error {code}");
    }
    // SAFETY: p is a non-null, NUL-terminated static string from libfabric.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// A [`Error::Backend`] for the failed libfabric call `what`, carrying the
/// negative return code and libfabric's text for it.
pub(crate) fn fi_error(code: i64, what: &str) -> Error {
    let code = if code > 0 { -code } else { code };
    Error::backend(BACKEND, code, &format!("{what}: {}", strerror(code)))
}

/// The mode, capabilities and memory-registration modes kvxfer asks for.
pub(crate) const CAPS: u64 = sys::FI_MSG as u64
    | sys::FI_RMA as u64
    | sys::FI_READ as u64
    | sys::FI_WRITE as u64
    | sys::FI_REMOTE_READ as u64
    | sys::FI_REMOTE_WRITE as u64
    | sys::FI_SEND as u64
    | sys::FI_RECV as u64;

/// Every `mr_mode` bit kvxfer honours. `FI_MR_RAW` (keys wider than 64
/// bits), `FI_MR_HMEM`, `FI_MR_MMU_NOTIFY` and `FI_MR_RMA_EVENT` are not
/// offered, so providers that require them are not selected.
pub(crate) const MR_MODE_SUPPORTED: u32 = sys::FI_MR_LOCAL
    | sys::FI_MR_VIRT_ADDR
    | sys::FI_MR_ALLOCATED
    | sys::FI_MR_PROV_KEY
    | sys::FI_MR_ENDPOINT;

/// The API version kvxfer asks for when the newest one fails: the oldest
/// whose semantics kvxfer relies on.
pub(crate) const FALLBACK_API_VERSION: u32 = sys::FI_VERSION(1, 9);

/// The API version requested from `fi_getinfo`: the newest that both the
/// headers kvxfer was built with and the library loaded offer.
pub(crate) fn api_version() -> u32 {
    let header = sys::FI_VERSION(sys::FI_MAJOR_VERSION, sys::FI_MINOR_VERSION);
    // SAFETY: fi_version takes no argument and has no precondition.
    let library = unsafe { sys::fi_version() };
    header.min(library).max(FALLBACK_API_VERSION)
}

/// Sets the data and control progress models asked for. libfabric 2.0 put
/// `data_progress` in a union with its new name, `progress`.
fn set_progress(dom: &mut sys::fi_domain_attr, data: sys::fi_progress, control: sys::fi_progress) {
    #[cfg(libfabric_v2)]
    {
        dom.__bindgen_anon_1.data_progress = data;
    }
    #[cfg(not(libfabric_v2))]
    {
        dom.data_progress = data;
    }
    dom.control_progress = control;
}

/// The (data, control) progress models of a domain's attributes.
#[cfg(test)]
pub(crate) fn progress(dom: &sys::fi_domain_attr) -> (sys::fi_progress, sys::fi_progress) {
    #[cfg(libfabric_v2)]
    // SAFETY: both members of the union are the same enum type, so
    // reading either is reading the value libfabric wrote.
    let data = unsafe { dom.__bindgen_anon_1.data_progress };
    #[cfg(not(libfabric_v2))]
    let data = dom.data_progress;
    (data, dom.control_progress)
}

/// An owned `fi_info` list (freed with `fi_freeinfo`).
pub(crate) struct Info(*mut sys::fi_info);

impl Info {
    /// Asks libfabric for an `FI_EP_RDM` endpoint with RMA and messaging on
    /// provider `prov` (libfabric's spelling, e.g. `tcp;ofi_rxm`). On
    /// failure returns libfabric's negative code.
    pub(crate) fn get(prov: &str) -> Result<Info, i64> {
        Info::get_with(prov, 0, 0)
    }

    /// [`Info::get`] asking also for the capabilities `caps` (such as
    /// `FI_HMEM`) and accepting the `mr_mode` bits `mr_mode`.
    pub(crate) fn get_with(prov: &str, caps: u64, mr_mode: u32) -> Result<Info, i64> {
        let prov_c = CString::new(prov).map_err(|_| -(sys::FI_EINVAL as i64))?;
        // SAFETY: fi_allocinfo returns a zeroed fi_info with all attribute
        // structs allocated, or null (checked).
        let hints = unsafe { sys::kvxfer_fi_allocinfo() };
        if hints.is_null() {
            return Err(-(sys::FI_ENOMEM as i64));
        }
        // SAFETY: hints and its attribute pointers were allocated by
        // fi_allocinfo above and are exclusively ours until fi_freeinfo. The
        // provider name is strdup'ed so that fi_freeinfo can free() it.
        unsafe {
            (*hints).caps = CAPS | caps;
            (*hints).mode = sys::FI_CONTEXT | sys::FI_CONTEXT2;
            (*(*hints).ep_attr).type_ = sys::FI_EP_RDM;
            let dom = &mut *(*hints).domain_attr;
            dom.mr_mode = (MR_MODE_SUPPORTED | mr_mode) as i32;
            dom.threading = sys::FI_THREAD_DOMAIN;
            if prov == "sockets" {
                // kvxfer drives progress itself (every poll reads the
                // completion queue). With the sockets provider's own
                // progress thread (its default, FI_PROGRESS_AUTO), RMA
                // WRITEs were lost under CPU contention: of 300 WRITEs in
                // flight, 19 to 178 never completed within 60 s in about
                // one run in 40 when five runs shared two cores. With
                // manual progress none was lost in 300 such runs.
                set_progress(dom, sys::FI_PROGRESS_MANUAL, sys::FI_PROGRESS_MANUAL);
            }
            (*(*hints).fabric_attr).prov_name = libc::strdup(prov_c.as_ptr());
        }
        let mut info: *mut sys::fi_info = ptr::null_mut();
        let mut ret = -(sys::FI_ENODATA as i32);
        for version in [api_version(), FALLBACK_API_VERSION] {
            // SAFETY: hints is a valid fi_info; info receives a new list
            // that we own on success.
            ret =
                unsafe { sys::fi_getinfo(version, ptr::null(), ptr::null(), 0, hints, &mut info) };
            if ret != -(sys::FI_ENODATA as i32) || version == FALLBACK_API_VERSION {
                break;
            }
            log::debug!(
                "LIBFABRIC: {prov} offers nothing at API {}.{}; asking for {}.{}",
                version >> 16,
                version & 0xffff,
                FALLBACK_API_VERSION >> 16,
                FALLBACK_API_VERSION & 0xffff
            );
        }
        // SAFETY: hints came from fi_allocinfo and is not used afterwards.
        unsafe { sys::fi_freeinfo(hints) };
        if ret != 0 {
            return Err(ret as i64);
        }
        if info.is_null() {
            return Err(-(sys::FI_ENODATA as i64));
        }
        Ok(Info(info))
    }

    /// The first entry of the list.
    pub(crate) fn first(&self) -> *mut sys::fi_info {
        self.0
    }

    /// The provider name of the first entry.
    pub(crate) fn provider(&self) -> String {
        // SAFETY: self.0 is a valid fi_info from fi_getinfo; fabric_attr and
        // prov_name are filled in by libfabric (null checked).
        unsafe {
            let fa = (*self.0).fabric_attr;
            if fa.is_null() || (*fa).prov_name.is_null() {
                return String::new();
            }
            CStr::from_ptr((*fa).prov_name)
                .to_string_lossy()
                .into_owned()
        }
    }
}

impl Drop for Info {
    fn drop(&mut self) {
        // SAFETY: self.0 came from fi_getinfo and is freed exactly once.
        unsafe { sys::fi_freeinfo(self.0) };
    }
}

/// Closes a libfabric object, logging (not panicking) on failure.
///
/// # Safety
/// `fid` must be a live libfabric object that nobody uses afterwards.
unsafe fn close_fid(fid: *mut sys::fid, what: &str) {
    if fid.is_null() {
        return;
    }
    // SAFETY: guaranteed by the caller.
    let ret = unsafe { sys::kvxfer_fi_close(fid) };
    if ret != 0 {
        log::warn!(
            "LIBFABRIC: fi_close({what}) failed: {}",
            strerror(ret as i64)
        );
    }
}

/// The libfabric objects of one transport.
///
/// The endpoint, address vector and completion queue may be closed early
/// (when the transport is dropped while registrations are still alive);
/// the domain and fabric live until the last registration is gone.
pub(crate) struct Shared {
    pub(crate) ep: AtomicPtr<sys::fid_ep>,
    pub(crate) av: AtomicPtr<sys::fid_av>,
    pub(crate) cq: AtomicPtr<sys::fid_cq>,
    /// The completion queue's wait descriptor (`FI_WAIT_FD`), or -1 where
    /// the provider offers none.
    pub(crate) wait_fd: std::ffi::c_int,
    pub(crate) domain: *mut sys::fid_domain,
    fabric: *mut sys::fid_fabric,
    pub(crate) info: Info,
    /// Registrations dropped (on any thread), to be closed by the owner of
    /// the transport ([`close_dropped_regs`](Self::close_dropped_regs)): a
    /// domain opened with `FI_THREAD_DOMAIN` takes no call concurrent with
    /// the transport's own.
    dropped_regs: Mutex<Vec<MrPtr>>,
    /// Whether `dropped_regs` may hold anything, so that the transport's
    /// every poll need not take the lock.
    any_dropped: AtomicBool,
}

/// A memory registration handle that may cross threads on its way to
/// [`Shared::close_dropped_regs`].
struct MrPtr(*mut sys::fid_mr);
// SAFETY: the pointer is only handed over, never used, until the owner of
// the transport closes it.
unsafe impl Send for MrPtr {}

// SAFETY: the handles are plain pointers to libfabric objects opened with
// FI_THREAD_DOMAIN. kvxfer serialises every call on them: the transport is
// used through `&mut self` (the std shim holds it in a Mutex), and
// registrations are created, used and dropped by the owner of the
// transport. Closing happens once, in Drop, when no other reference exists.
unsafe impl Send for Shared {}
// SAFETY: see `Send`; shared references only read the pointers.
unsafe impl Sync for Shared {}

impl Shared {
    /// Opens fabric, domain, completion queue, address vector and endpoint
    /// for the first entry of `info`, binds and enables the endpoint.
    pub(crate) fn open(info: Info, cq_size: usize) -> Result<Arc<Shared>, Error> {
        let fi = info.first();
        let mut shared = Shared {
            ep: AtomicPtr::new(ptr::null_mut()),
            av: AtomicPtr::new(ptr::null_mut()),
            cq: AtomicPtr::new(ptr::null_mut()),
            wait_fd: -1,
            domain: ptr::null_mut(),
            fabric: ptr::null_mut(),
            info,
            dropped_regs: Mutex::new(Vec::new()),
            any_dropped: AtomicBool::new(false),
        };
        // From here on, an early return drops `shared`, which closes what
        // was opened so far, in order.
        // SAFETY: fi is the valid first entry of the list owned by
        // shared.info; fabric_attr is set by fi_getinfo.
        let ret = unsafe {
            sys::kvxfer_fi_fabric((*fi).fabric_attr, &mut shared.fabric, ptr::null_mut())
        };
        if ret != 0 {
            return Err(fi_error(ret as i64, "fi_fabric"));
        }
        // SAFETY: fabric is open; fi is valid.
        let ret = unsafe {
            sys::kvxfer_fi_domain(shared.fabric, fi, &mut shared.domain, ptr::null_mut())
        };
        if ret != 0 {
            return Err(fi_error(ret as i64, "fi_domain"));
        }

        // A wait descriptor lets an idle agent sleep until the provider
        // has something; providers without one get a CQ without it.
        let mut cq: *mut sys::fid_cq = ptr::null_mut();
        let mut ret = 0;
        for wait_obj in [sys::FI_WAIT_FD, sys::FI_WAIT_NONE] {
            let mut cq_attr = sys::fi_cq_attr {
                size: cq_size,
                format: sys::FI_CQ_FORMAT_DATA,
                wait_obj,
                ..Default::default()
            };
            // SAFETY: domain is open; cq_attr is a valid attribute struct.
            ret = unsafe {
                sys::kvxfer_fi_cq_open(shared.domain, &mut cq_attr, &mut cq, ptr::null_mut())
            };
            if ret == 0 {
                if wait_obj == sys::FI_WAIT_FD {
                    let mut fd: std::ffi::c_int = -1;
                    // SAFETY: cq was just opened with FI_WAIT_FD; fd is a
                    // valid out pointer.
                    if unsafe { sys::kvxfer_fi_cq_wait_fd(cq, &mut fd) } == 0 {
                        shared.wait_fd = fd;
                    }
                }
                break;
            }
        }
        if ret != 0 {
            return Err(fi_error(ret as i64, "fi_cq_open"));
        }
        shared.cq.store(cq, Ordering::Relaxed);

        // SAFETY: domain_attr is set by fi_getinfo.
        let preferred = unsafe { (*(*fi).domain_attr).av_type };
        let mut av_attr = sys::fi_av_attr {
            type_: if preferred == sys::FI_AV_UNSPEC {
                sys::FI_AV_MAP
            } else {
                preferred
            },
            ..Default::default()
        };
        let mut av: *mut sys::fid_av = ptr::null_mut();
        // SAFETY: domain is open; av_attr is valid.
        let ret = unsafe {
            sys::kvxfer_fi_av_open(shared.domain, &mut av_attr, &mut av, ptr::null_mut())
        };
        if ret != 0 {
            return Err(fi_error(ret as i64, "fi_av_open"));
        }
        shared.av.store(av, Ordering::Relaxed);

        let mut ep: *mut sys::fid_ep = ptr::null_mut();
        // SAFETY: domain is open; fi is valid.
        let ret = unsafe { sys::kvxfer_fi_endpoint(shared.domain, fi, &mut ep, ptr::null_mut()) };
        if ret != 0 {
            return Err(fi_error(ret as i64, "fi_endpoint"));
        }
        shared.ep.store(ep, Ordering::Relaxed);
        // SAFETY: ep, cq and av are open objects of the same domain; a
        // fid_cq / fid_av starts with its `struct fid`.
        let ret = unsafe {
            sys::kvxfer_fi_ep_bind(ep, &mut (*cq).fid, (sys::FI_TRANSMIT | sys::FI_RECV) as u64)
        };
        if ret != 0 {
            return Err(fi_error(ret as i64, "fi_ep_bind(cq)"));
        }
        // SAFETY: as above.
        let ret = unsafe { sys::kvxfer_fi_ep_bind(ep, &mut (*av).fid, 0) };
        if ret != 0 {
            return Err(fi_error(ret as i64, "fi_ep_bind(av)"));
        }
        // SAFETY: ep is open and bound.
        let ret = unsafe { sys::kvxfer_fi_enable(ep) };
        if ret != 0 {
            return Err(fi_error(ret as i64, "fi_enable"));
        }
        Ok(Arc::new(shared))
    }

    /// Hands a registration over to be closed by the owner of the
    /// transport (see `dropped_regs`).
    pub(crate) fn drop_reg(&self, mr: *mut sys::fid_mr) {
        self.dropped_regs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(MrPtr(mr));
        self.any_dropped.store(true, Ordering::Release);
    }

    /// Registrations dropped but not closed yet.
    #[cfg(test)]
    pub(crate) fn dropped_regs(&self) -> usize {
        self.dropped_regs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Closes the registrations dropped so far. Called by the owner of the
    /// transport, so never concurrently with its other calls.
    pub(crate) fn close_dropped_regs(&self) {
        if !self.any_dropped.swap(false, Ordering::AcqRel) {
            return;
        }
        let regs =
            std::mem::take(&mut *self.dropped_regs.lock().unwrap_or_else(|e| e.into_inner()));
        for MrPtr(mr) in regs {
            // SAFETY: mr is an open registration of this domain, handed
            // over once by its FabricReg's Drop and closed only here.
            unsafe { close_fid(&mut (*mr).fid, "memory registration") };
        }
    }

    /// The endpoint (null once closed).
    pub(crate) fn ep(&self) -> *mut sys::fid_ep {
        self.ep.load(Ordering::Relaxed)
    }

    /// The completion queue (null once closed).
    pub(crate) fn cq(&self) -> *mut sys::fid_cq {
        self.cq.load(Ordering::Relaxed)
    }

    /// Whether the caller may block on [`wait_fd`](Self::wait_fd) now
    /// (`fi_trywait`): false while the provider has work to be polled.
    pub(crate) fn try_wait(&self) -> bool {
        let cq = self.cq();
        if self.wait_fd < 0 || cq.is_null() {
            return false;
        }
        // SAFETY: fabric and cq are open (cq checked above; the fabric
        // outlives it); the caller owns the transport, so no other call
        // on the domain runs meanwhile.
        unsafe { sys::kvxfer_fi_trywait_cq(self.fabric, cq) == 0 }
    }

    /// The address vector (null once closed).
    pub(crate) fn av(&self) -> *mut sys::fid_av {
        self.av.load(Ordering::Relaxed)
    }

    /// Closes the endpoint, then the address vector and completion queue.
    /// Outstanding operations are discarded; libfabric touches no posted
    /// buffer afterwards. Idempotent.
    pub(crate) fn close_endpoint(&self) {
        let ep = self.ep.swap(ptr::null_mut(), Ordering::AcqRel);
        if !ep.is_null() {
            // SAFETY: ep was open and is no longer reachable through self.
            unsafe { close_fid(&mut (*ep).fid, "endpoint") };
        }
        let av = self.av.swap(ptr::null_mut(), Ordering::AcqRel);
        if !av.is_null() {
            // SAFETY: av was open; the endpoint bound to it is closed.
            unsafe { close_fid(&mut (*av).fid, "address vector") };
        }
        let cq = self.cq.swap(ptr::null_mut(), Ordering::AcqRel);
        if !cq.is_null() {
            // SAFETY: cq was open; the endpoint bound to it is closed.
            unsafe { close_fid(&mut (*cq).fid, "completion queue") };
        }
    }

    /// The endpoint as a `struct fid` pointer (for fi_getname, fi_cancel,
    /// fi_mr_bind).
    pub(crate) fn ep_fid(&self) -> *mut sys::fid {
        let ep = self.ep();
        if ep.is_null() {
            return ptr::null_mut();
        }
        // SAFETY: ep is open; taking the address of its first member does
        // not read it.
        unsafe { ptr::addr_of_mut!((*ep).fid) }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.close_endpoint();
        // Nobody else holds this value: the transport and every
        // registration are gone.
        self.close_dropped_regs();
        if !self.domain.is_null() {
            // SAFETY: every registration holds an Arc<Shared>, so none is
            // left; the endpoint, AV and CQ are closed.
            unsafe { close_fid(&mut (*self.domain).fid, "domain") };
        }
        if !self.fabric.is_null() {
            // SAFETY: the domain is closed.
            unsafe { close_fid(&mut (*self.fabric).fid, "fabric") };
        }
    }
}

/// A raw `void *` that may cross threads (a memory descriptor from
/// `fi_mr_desc`, only ever passed back to libfabric).
#[derive(Copy, Clone, Debug)]
pub(crate) struct Desc(pub(crate) *mut c_void);
// SAFETY: the descriptor is an opaque token that kvxfer never dereferences;
// libfabric reads it only in calls that the transport serialises.
unsafe impl Send for Desc {}
// SAFETY: as above.
unsafe impl Sync for Desc {}

#[cfg(test)]
mod tests {
    use super::*;

    /// The (data, control) progress models of the first entry `prov` gives.
    fn progress(prov: &str) -> (u32, u32) {
        let info = Info::get(prov).expect("provider available");
        // SAFETY: first() is the valid first entry of the list `info` owns,
        // whose domain_attr fi_getinfo filled in.
        super::progress(unsafe { &*(*info.first()).domain_attr })
    }

    #[test]
    fn api_version_is_the_newest_both_sides_offer() {
        let v = api_version();
        // SAFETY: fi_version has no precondition.
        let library = unsafe { sys::fi_version() };
        assert!(v <= library, "{v:#x} > library {library:#x}");
        assert!(v >= FALLBACK_API_VERSION);
        assert_eq!(v >> 16, sys::FI_MAJOR_VERSION, "{v:#x}");
    }

    #[test]
    fn sockets_runs_with_manual_progress() {
        let manual = sys::FI_PROGRESS_MANUAL;
        let (data, control) = progress("sockets");
        assert_eq!(data, manual);
        // libfabric 2.x deprecated the control progress model: it keeps
        // its own.
        if !cfg!(libfabric_v2) {
            assert_eq!(control, manual);
        }
    }

    #[test]
    fn other_providers_keep_their_own_progress_model() {
        // tcp;ofi_rxm moves data when polled but accepts connections on
        // its own thread; asking nothing keeps that.
        assert_eq!(
            progress("tcp;ofi_rxm"),
            (sys::FI_PROGRESS_MANUAL, sys::FI_PROGRESS_AUTO)
        );
    }
}
