//! libfabric's objects and calls: the crate's only module with `unsafe`.
//!
//! Each handle closes in `Drop` and owns what it belongs to: [`Info`] an
//! `fi_info` list; [`Fabric`] its info; [`Domain`] its fabric; the
//! completion queue, address vector and every [`MemoryRegion`] their
//! domain (an [`Arc`]); the endpoint the queue and address vector bound to
//! it. [`FabricObjects`] holds a transport's endpoint and domain.
//!
//! Close order, whatever order the owner drops things in: endpoint →
//! address vector → completion queue → (memory registrations, through the
//! `Arc`) → domain → fabric → info.
//!
//! The rest of the crate calls libfabric only through the crate-private
//! methods here. Their safety rests on two rules that the transport's
//! state logic keeps, stated again where they matter: memory handed to an
//! operation stays allocated and registered until its completion is read
//! or the endpoint is closed, and every call on the domain is serialised
//! (`FI_THREAD_DOMAIN`).

use std::ffi::{CStr, CString};
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kvxfer_core::Error;
use libfabric_sys as sys;

use crate::BACKEND;

mod mr;
mod ops;

pub(crate) use mr::{MemoryRegion, MrDesc, MsgBufs};
pub(crate) use ops::{CqBatch, OpContexts};

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

/// The version of the libfabric library loaded, `(major, minor)`.
pub(crate) fn library_version() -> (u32, u32) {
    // SAFETY: fi_version takes no argument, has no precondition and only
    // returns the library's version number.
    let v = unsafe { sys::fi_version() };
    (v >> 16, v & 0xffff)
}

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

/// What kvxfer reads of a provider's attributes.
#[derive(Copy, Clone, Debug)]
pub(crate) struct ProviderAttrs {
    /// The `mr_mode` bits the provider asks for.
    pub(crate) mr_mode: u32,
    /// Bytes of a memory key.
    pub(crate) key_size: usize,
    /// Longest message (and RMA operation).
    pub(crate) max_msg: u64,
    /// Transmit queue size.
    pub(crate) tx_size: usize,
}

/// An owned `fi_info` list (freed with `fi_freeinfo`).
pub(crate) struct Info(*mut sys::fi_info);

impl Info {
    /// Asks libfabric for an `FI_EP_RDM` endpoint with RMA and messaging on
    /// provider `prov` (libfabric's spelling, e.g. `tcp;ofi_rxm`). On
    /// failure returns libfabric's negative code.
    pub(crate) fn get(prov: &str) -> Result<Info, i64> {
        Info::get_with(prov, None, 0, 0)
    }

    /// As [`Info::get`], on the domain named `domain` only when given (for
    /// the `tcp` and `verbs` providers, the network interface or device),
    /// asking also for the capabilities `caps` (such as `FI_HMEM`) and
    /// accepting the `mr_mode` bits `mr_mode`.
    pub(crate) fn get_with(
        prov: &str,
        domain: Option<&str>,
        caps: u64,
        mr_mode: u32,
    ) -> Result<Info, i64> {
        let prov_c = CString::new(prov).map_err(|_| -(sys::FI_EINVAL as i64))?;
        let domain_c = domain
            .map(CString::new)
            .transpose()
            .map_err(|_| -(sys::FI_EINVAL as i64))?;
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
                // manual progress none was lost in 300 such runs, but the
                // same stall came back at about one run in 80 (a receive
                // window left shut: see PEER_WINDOW_SOCKETS, which ends it).
                set_progress(dom, sys::FI_PROGRESS_MANUAL, sys::FI_PROGRESS_MANUAL);
            }
            (*(*hints).fabric_attr).prov_name = libc::strdup(prov_c.as_ptr());
            if domain_c.is_some() {
                // An IPv4 address keeps the endpoint on its interface's
                // subnet (the entry is picked by domain name below: rxm
                // does not filter on a domain name in the hints).
                (*hints).addr_format = sys::FI_SOCKADDR_IN;
            }
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
        let Some(want) = domain_c else {
            return Ok(Info(info));
        };
        // The tcp provider names its domains after interfaces: keep the
        // first entry on `want`, alone.
        let mut e = info;
        let mut picked: *mut sys::fi_info = ptr::null_mut();
        while !e.is_null() {
            // SAFETY: e is an entry of the list fi_getinfo returned, which
            // we own until fi_freeinfo below; domain_attr and its name are
            // filled in by libfabric (null checked).
            unsafe {
                let d = (*e).domain_attr;
                if !d.is_null()
                    && !(*d).name.is_null()
                    && CStr::from_ptr((*d).name) == want.as_c_str()
                {
                    picked = sys::fi_dupinfo(e);
                    break;
                }
                e = (*e).next;
            }
        }
        // SAFETY: info came from fi_getinfo and is freed once; `picked` is
        // an independent copy (fi_dupinfo copies one entry, `next` null).
        unsafe { sys::fi_freeinfo(info) };
        if picked.is_null() {
            return Err(-(sys::FI_ENODATA as i64));
        }
        Ok(Info(picked))
    }

    /// The first entry of the list.
    pub(crate) fn first(&self) -> *mut sys::fi_info {
        self.0
    }

    /// The attributes of the first entry kvxfer reads.
    pub(crate) fn attrs(&self) -> ProviderAttrs {
        // SAFETY: self.0 is the valid first entry of the list from
        // fi_getinfo; its attribute structs are filled in by libfabric.
        unsafe {
            let d = &*(*self.0).domain_attr;
            let e = &*(*self.0).ep_attr;
            let t = &*(*self.0).tx_attr;
            ProviderAttrs {
                mr_mode: d.mr_mode as u32,
                key_size: d.mr_key_size,
                max_msg: e.max_msg_size as u64,
                tx_size: t.size,
            }
        }
    }

    /// Gives the `shm` endpoint of the first entry a name of its own,
    /// `kvxfer-<pid>-<ns>-<n>`, as its source address.
    ///
    /// shm names an endpoint (and the file of its region in `/dev/shm`)
    /// after the process id, `<pid>:<uid>:<index>`, by default. A process
    /// that died without removing its regions (SIGKILL, abort) left that
    /// file behind, and a later process given the same id could not
    /// create its region: `fi_enable` failed with `Device or resource
    /// busy`. The time in the name keeps a reused process id apart.
    fn set_shm_name(&mut self) -> Result<(), Error> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        remove_dead_shm_regions();
        let ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let name = format!(
            "fi_shm://kvxfer-{}-{ns}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let name =
            CString::new(name).map_err(|_| fi_error(-(sys::FI_EINVAL as i64), "shm name"))?;
        // SAFETY: self.0 is the valid first entry of the list we own; its
        // src_addr was malloc'ed by libfabric (or is null) and is freed by
        // fi_freeinfo, so the replacement is malloc'ed too (strdup).
        unsafe {
            let addr = libc::strdup(name.as_ptr());
            if addr.is_null() {
                return Err(fi_error(-(sys::FI_ENOMEM as i64), "shm name"));
            }
            libc::free((*self.0).src_addr);
            (*self.0).src_addr = addr.cast();
            (*self.0).src_addrlen = name.as_bytes_with_nul().len();
        }
        Ok(())
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

/// Removes the regions in `/dev/shm` that transports of processes no
/// longer alive named (`kvxfer-<pid>-...`, see [`Info::set_shm_name`]):
/// shm cannot reuse them, their names being unique. A process killed
/// without cleanup leaves its regions; a region whose process id was
/// reused since is left (it is only space).
fn remove_dead_shm_regions() {
    let Ok(dir) = std::fs::read_dir("/dev/shm") else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("kvxfer-"))
            .and_then(|n| n.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists()
            && std::fs::remove_file(entry.path()).is_ok()
        {
            log::debug!("LIBFABRIC: removed {name:?} (shm region of a dead process)");
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

/// An open fabric (`fi_fabric`), with the `fi_info` list it was opened
/// from, which it outlives no longer than needed: the list is freed after
/// the fabric is closed (field order).
pub(crate) struct Fabric {
    raw: *mut sys::fid_fabric,
    info: Info,
}

/// An open domain (`fi_domain`) of its [`Fabric`], kept open by every
/// object of it (completion queue, address vector, endpoint, memory
/// registrations) through an [`Arc`]: whatever order the owner drops them
/// in, the domain is closed last, and the fabric after it.
pub(crate) struct Domain {
    raw: *mut sys::fid_domain,
    /// Registrations dropped (on any thread), to be closed by the owner of
    /// the transport ([`close_dropped_regs`](Self::close_dropped_regs)): a
    /// domain opened with `FI_THREAD_DOMAIN` takes no call concurrent with
    /// the transport's own.
    dropped_regs: Mutex<Vec<MrPtr>>,
    /// Whether `dropped_regs` may hold anything, so that the transport's
    /// every poll need not take the lock.
    any_dropped: AtomicBool,
    fabric: Arc<Fabric>,
}

/// A completion queue (`fi_cq_open`) of its [`Domain`].
struct CompletionQueue {
    raw: *mut sys::fid_cq,
    /// Its wait descriptor (`FI_WAIT_FD`), or -1 where the provider offers
    /// none.
    wait_fd: std::ffi::c_int,
    domain: Arc<Domain>,
}

/// An address vector (`fi_av_open`) of its [`Domain`].
struct AddressVector {
    raw: *mut sys::fid_av,
    /// Keeps the domain open until the address vector is closed.
    _domain: Arc<Domain>,
}

/// An enabled endpoint (`fi_endpoint`) and the completion queue and address
/// vector bound to it, which it owns: the endpoint is closed first, then
/// they are (field order), then, with the last reference, their domain.
struct Endpoint {
    raw: *mut sys::fid_ep,
    av: AddressVector,
    cq: CompletionQueue,
}

/// A memory registration handle that may cross threads on its way to
/// [`Domain::close_dropped_regs`].
struct MrPtr(*mut sys::fid_mr);
// SAFETY: the pointer is only handed over, never used, until the owner of
// the transport closes it.
unsafe impl Send for MrPtr {}

// SAFETY (for the five impls below): the handles are plain pointers to
// libfabric objects opened with FI_THREAD_DOMAIN. kvxfer serialises every
// call on them: the transport is used through `&mut self` (the std shim
// holds it in a Mutex), and registrations are created, used and dropped by
// the owner of the transport (a registration dropped elsewhere is only
// queued, under a lock). Each is closed once, in Drop, when no other
// reference exists; shared references only read the pointers.
unsafe impl Send for Fabric {}
// SAFETY: see above.
unsafe impl Sync for Fabric {}
// SAFETY: see above.
unsafe impl Send for Domain {}
// SAFETY: see above.
unsafe impl Sync for Domain {}
// SAFETY: see above; the endpoint, its queue and its address vector are
// owned by one transport.
unsafe impl Send for Endpoint {}

impl Drop for Fabric {
    fn drop(&mut self) {
        // SAFETY: every domain holds an Arc<Fabric>, so all are closed.
        unsafe { close_fid(&mut (*self.raw).fid, "fabric") };
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        // Nobody else holds this value: every object of the domain is gone,
        // and the registrations dropped are queued here.
        self.close_dropped_regs();
        // SAFETY: every object of the domain holds an Arc<Domain>, so all
        // are closed; the fabric is closed after this (field).
        unsafe { close_fid(&mut (*self.raw).fid, "domain") };
    }
}

impl Drop for CompletionQueue {
    fn drop(&mut self) {
        // SAFETY: the endpoint bound to it is closed (Endpoint's Drop runs
        // before its fields drop).
        unsafe { close_fid(&mut (*self.raw).fid, "completion queue") };
    }
}

impl Drop for AddressVector {
    fn drop(&mut self) {
        // SAFETY: as for the completion queue.
        unsafe { close_fid(&mut (*self.raw).fid, "address vector") };
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        // SAFETY: the endpoint is open and closed once; outstanding
        // operations are discarded, and libfabric touches no posted buffer
        // afterwards.
        unsafe { close_fid(&mut (*self.raw).fid, "endpoint") };
    }
}

impl Domain {
    /// Hands a registration over to be closed by the owner of the
    /// transport (see `dropped_regs`).
    pub(crate) fn drop_reg(&self, mr: *mut sys::fid_mr) {
        self.dropped_regs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(MrPtr(mr));
        self.any_dropped.store(true, Ordering::Release);
    }

    /// Closes the registrations dropped so far. Called by the owner of the
    /// transport, so never concurrently with its other calls.
    fn close_dropped_regs(&self) {
        if !self.any_dropped.swap(false, Ordering::AcqRel) {
            return;
        }
        let regs =
            std::mem::take(&mut *self.dropped_regs.lock().unwrap_or_else(|e| e.into_inner()));
        for MrPtr(mr) in regs {
            // SAFETY: mr is an open registration of this domain, handed
            // over once by its MemoryRegion's Drop and closed only here.
            unsafe { close_fid(&mut (*mr).fid, "memory registration") };
        }
    }

    /// The raw domain, for registering memory.
    pub(super) fn raw(&self) -> *mut sys::fid_domain {
        self.raw
    }
}

/// The libfabric objects of one transport: its endpoint (with the
/// completion queue and address vector bound to it) and its domain. The
/// endpoint may be closed early ([`close_endpoint`](Self::close_endpoint));
/// the domain lives until the last registration of it is gone.
pub(crate) struct FabricObjects {
    endpoint: Option<Endpoint>,
    domain: Arc<Domain>,
}

impl std::fmt::Debug for FabricObjects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FabricObjects")
            .field("provider", &self.domain.fabric.info.provider())
            .field("open", &self.endpoint.is_some())
            .finish()
    }
}

impl std::fmt::Debug for Domain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Domain")
            .field("provider", &self.fabric.info.provider())
            .finish()
    }
}

/// Maps libfabric's return code of `what` to a result.
fn ok(ret: std::ffi::c_int, what: &str) -> Result<(), Error> {
    if ret != 0 {
        return Err(fi_error(ret as i64, what));
    }
    Ok(())
}

impl FabricObjects {
    /// Opens fabric, domain, completion queue, address vector and endpoint
    /// for the first entry of `info`, binds and enables the endpoint. On
    /// an error what was opened so far is closed, in order (Drop).
    pub(crate) fn open(mut info: Info, cq_size: usize) -> Result<FabricObjects, Error> {
        if info.provider() == "shm" {
            info.set_shm_name()?;
        }
        let fi = info.first();
        let mut raw: *mut sys::fid_fabric = ptr::null_mut();
        // SAFETY: fi is the valid first entry of the list `info` owns;
        // fabric_attr is set by fi_getinfo.
        ok(
            unsafe { sys::kvxfer_fi_fabric((*fi).fabric_attr, &mut raw, ptr::null_mut()) },
            "fi_fabric",
        )?;
        let fabric = Arc::new(Fabric { raw, info });

        let mut raw: *mut sys::fid_domain = ptr::null_mut();
        // SAFETY: the fabric is open; fi is valid (owned by `fabric`).
        ok(
            unsafe { sys::kvxfer_fi_domain(fabric.raw, fi, &mut raw, ptr::null_mut()) },
            "fi_domain",
        )?;
        let domain = Arc::new(Domain {
            raw,
            dropped_regs: Mutex::new(Vec::new()),
            any_dropped: AtomicBool::new(false),
            fabric,
        });

        // A wait descriptor lets an idle agent sleep until the provider
        // has something; providers without one get a CQ without it.
        let mut cq = None;
        let mut ret = 0;
        for wait_obj in [sys::FI_WAIT_FD, sys::FI_WAIT_NONE] {
            let mut cq_attr = sys::fi_cq_attr {
                size: cq_size,
                format: sys::FI_CQ_FORMAT_DATA,
                wait_obj,
                ..Default::default()
            };
            let mut raw: *mut sys::fid_cq = ptr::null_mut();
            // SAFETY: the domain is open; cq_attr is a valid attribute struct.
            ret = unsafe {
                sys::kvxfer_fi_cq_open(domain.raw, &mut cq_attr, &mut raw, ptr::null_mut())
            };
            if ret == 0 {
                let mut wait_fd: std::ffi::c_int = -1;
                // SAFETY: raw was just opened with FI_WAIT_FD; wait_fd is a
                // valid out pointer.
                if wait_obj != sys::FI_WAIT_FD
                    || unsafe { sys::kvxfer_fi_cq_wait_fd(raw, &mut wait_fd) } != 0
                {
                    wait_fd = -1;
                }
                cq = Some(CompletionQueue {
                    raw,
                    wait_fd,
                    domain: domain.clone(),
                });
                break;
            }
        }
        let Some(cq) = cq else {
            return Err(fi_error(ret as i64, "fi_cq_open"));
        };

        let fi = domain.fabric.info.first();
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
        let mut raw: *mut sys::fid_av = ptr::null_mut();
        // SAFETY: the domain is open; av_attr is valid.
        ok(
            unsafe { sys::kvxfer_fi_av_open(domain.raw, &mut av_attr, &mut raw, ptr::null_mut()) },
            "fi_av_open",
        )?;
        let av = AddressVector {
            raw,
            _domain: domain.clone(),
        };

        let mut raw: *mut sys::fid_ep = ptr::null_mut();
        // SAFETY: the domain is open; fi is valid.
        ok(
            unsafe { sys::kvxfer_fi_endpoint(domain.raw, fi, &mut raw, ptr::null_mut()) },
            "fi_endpoint",
        )?;
        let ep = Endpoint { raw, cq, av };
        // SAFETY: ep, cq and av are open objects of the same domain; a
        // fid_cq / fid_av starts with its `struct fid`.
        ok(
            unsafe {
                sys::kvxfer_fi_ep_bind(
                    ep.raw,
                    &mut (*ep.cq.raw).fid,
                    (sys::FI_TRANSMIT | sys::FI_RECV) as u64,
                )
            },
            "fi_ep_bind(cq)",
        )?;
        // SAFETY: as above.
        ok(
            unsafe { sys::kvxfer_fi_ep_bind(ep.raw, &mut (*ep.av.raw).fid, 0) },
            "fi_ep_bind(av)",
        )?;
        // SAFETY: ep is open and bound.
        ok(unsafe { sys::kvxfer_fi_enable(ep.raw) }, "fi_enable")?;
        Ok(FabricObjects {
            endpoint: Some(ep),
            domain,
        })
    }

    /// The domain.
    pub(crate) fn domain(&self) -> &Arc<Domain> {
        &self.domain
    }

    /// Whether the endpoint is open.
    pub(crate) fn is_open(&self) -> bool {
        self.endpoint.is_some()
    }

    /// Registrations dropped but not closed yet.
    #[cfg(test)]
    pub(crate) fn dropped_regs(&self) -> usize {
        self.domain
            .dropped_regs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Closes the registrations dropped so far.
    pub(crate) fn close_dropped_regs(&self) {
        self.domain.close_dropped_regs();
    }

    /// The endpoint (null once closed).
    fn ep(&self) -> *mut sys::fid_ep {
        self.endpoint.as_ref().map_or(ptr::null_mut(), |e| e.raw)
    }

    /// The completion queue (null once closed).
    fn cq(&self) -> *mut sys::fid_cq {
        self.endpoint.as_ref().map_or(ptr::null_mut(), |e| e.cq.raw)
    }

    /// The address vector (null once closed).
    fn av(&self) -> *mut sys::fid_av {
        self.endpoint.as_ref().map_or(ptr::null_mut(), |e| e.av.raw)
    }

    /// The completion queue's wait descriptor, or -1 where there is none
    /// (or the endpoint is closed).
    pub(crate) fn wait_fd(&self) -> std::ffi::c_int {
        self.endpoint.as_ref().map_or(-1, |e| e.cq.wait_fd)
    }

    /// Whether the caller may block on [`wait_fd`](Self::wait_fd) now
    /// (`fi_trywait`): false while the provider has work to be polled.
    pub(crate) fn try_wait(&self) -> bool {
        let Some(ep) = &self.endpoint else {
            return false;
        };
        if ep.cq.wait_fd < 0 {
            return false;
        }
        // SAFETY: fabric and cq are open (the cq holds the domain, which
        // holds the fabric); the caller owns the transport, so no other
        // call on the domain runs meanwhile.
        unsafe { sys::kvxfer_fi_trywait_cq(ep.cq.domain.fabric.raw, ep.cq.raw) == 0 }
    }

    /// Closes the endpoint, then its address vector and completion queue.
    /// Outstanding operations are discarded; libfabric touches no posted
    /// buffer afterwards. Idempotent.
    pub(crate) fn close_endpoint(&mut self) {
        self.endpoint = None;
    }

    /// The endpoint as a `struct fid` pointer (for fi_getname, fi_cancel,
    /// fi_mr_bind); null once closed.
    fn ep_fid(&self) -> *mut sys::fid {
        let ep = self.ep();
        if ep.is_null() {
            return ptr::null_mut();
        }
        // SAFETY: ep is open; taking the address of its first member does
        // not read it.
        unsafe { ptr::addr_of_mut!((*ep).fid) }
    }
}

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
