//! Operations on an open endpoint: operation contexts, posting sends,
//! receives and RMA, cancelling, reading the completion queue, and the
//! address vector.
//!
//! Methods return libfabric's code (0, a count, or a negative error);
//! where the object they need is closed already they return
//! `-FI_ESHUTDOWN` or do nothing, as noted.

use std::cell::UnsafeCell;
use std::ffi::{c_void, CStr};
use std::ptr;

use kvxfer_core::XferOp;
use libfabric_sys as sys;

use super::{strerror, FabricObjects, MrDesc, MsgBufs};

/// Operation contexts handed to libfabric (`struct fi_context2`, which
/// also satisfies `FI_CONTEXT`); never read by Rust. An operation is named
/// by its index.
pub(crate) struct OpContexts(Box<[UnsafeCell<sys::fi_context2>]>);

// SAFETY: the contexts are memory libfabric writes during operations that
// the transport serialises (`&mut self`); Rust never reads them.
unsafe impl Send for OpContexts {}

impl OpContexts {
    /// `n` contexts.
    pub(crate) fn new(n: usize) -> OpContexts {
        OpContexts(
            (0..n)
                .map(|_| UnsafeCell::new(sys::fi_context2::default()))
                .collect(),
        )
    }

    /// The context of operation `op`, as handed to libfabric.
    pub(crate) fn ptr(&self, op: u32) -> *mut c_void {
        self.0[op as usize].get().cast()
    }

    /// The operation index of a context pointer libfabric handed back.
    pub(crate) fn index_of(&self, ctx: *mut c_void) -> Option<u32> {
        let base = self.0.as_ptr() as usize;
        let size = std::mem::size_of::<UnsafeCell<sys::fi_context2>>();
        let p = ctx as usize;
        if p < base || (p - base) % size != 0 || (p - base) / size >= self.0.len() {
            return None;
        }
        Some(((p - base) / size) as u32)
    }
}

/// A buffer of completion-queue entries.
pub(crate) struct CqBatch(Vec<sys::fi_cq_data_entry>);

// SAFETY: the entries are plain data; their context pointers are only
// compared with `OpContexts`, never dereferenced.
unsafe impl Send for CqBatch {}

impl CqBatch {
    /// Room for `n` entries.
    pub(crate) fn new(n: usize) -> CqBatch {
        CqBatch(vec![sys::fi_cq_data_entry::default(); n])
    }

    /// The context and length of entry `i`.
    pub(crate) fn entry(&self, i: usize) -> (*mut c_void, usize) {
        let e = &self.0[i];
        (e.op_context, e.len)
    }

    /// Its capacity.
    pub(crate) fn capacity(&self) -> usize {
        self.0.len()
    }
}

/// A failed operation read with `fi_cq_readerr`.
#[derive(Debug)]
pub(crate) struct CqError {
    /// The operation's context.
    pub(crate) ctx: *mut c_void,
    /// Bytes transferred.
    pub(crate) len: usize,
    /// libfabric's (positive) error number.
    pub(crate) err: i32,
    /// The provider's error number.
    pub(crate) prov_errno: i32,
    /// libfabric's text, with the provider's.
    pub(crate) text: String,
}

impl FabricObjects {
    /// The endpoint's name (`fi_getname`).
    pub(crate) fn name(&self) -> Result<Vec<u8>, i64> {
        let mut name = [0u8; 256];
        let mut len = name.len();
        let fid = self.ep_fid();
        if fid.is_null() {
            return Err(-(sys::FI_ESHUTDOWN as i64));
        }
        // SAFETY: the endpoint is open (checked); name/len describe a
        // writable buffer.
        let ret = unsafe { sys::kvxfer_fi_getname(fid, name.as_mut_ptr().cast(), &mut len) };
        if ret != 0 {
            return Err(ret as i64);
        }
        Ok(name[..len.min(name.len())].to_vec())
    }

    /// Inserts endpoint name `name` into the address vector; returns its
    /// address and libfabric's label for it.
    pub(crate) fn av_insert(&self, name: &[u8]) -> Result<(sys::fi_addr_t, Option<String>), i64> {
        let av = self.av();
        if av.is_null() {
            return Err(-(sys::FI_ESHUTDOWN as i64));
        }
        let mut fi_addr: sys::fi_addr_t = sys::FI_ADDR_NOTAVAIL;
        // SAFETY: av is open; name is readable for its length (libfabric
        // reads the provider's address length from it: the caller checked
        // it names an endpoint of this provider); one address is written
        // into fi_addr.
        let ret = unsafe {
            sys::kvxfer_fi_av_insert(
                av,
                name.as_ptr().cast(),
                1,
                &mut fi_addr,
                0,
                ptr::null_mut(),
            )
        };
        if ret != 1 || fi_addr == sys::FI_ADDR_NOTAVAIL {
            let code = if ret < 0 {
                ret as i64
            } else {
                -(sys::FI_EINVAL as i64)
            };
            return Err(code);
        }
        let mut text = [0 as std::ffi::c_char; 128];
        let mut tlen = text.len();
        // SAFETY: av is open; text/tlen describe a writable buffer.
        let p = unsafe {
            sys::kvxfer_fi_av_straddr(av, name.as_ptr().cast(), text.as_mut_ptr(), &mut tlen)
        };
        let label = if p.is_null() {
            None
        } else {
            // SAFETY: fi_av_straddr wrote a NUL-terminated string into text
            // (truncated to its size).
            Some(
                unsafe { CStr::from_ptr(text.as_ptr()) }
                    .to_string_lossy()
                    .into_owned(),
            )
        };
        Ok((fi_addr, label))
    }

    /// Removes `addr` from the address vector (`fi_av_remove`); 0 where the
    /// address vector is closed already. The caller removes each address
    /// it inserted at most once.
    pub(crate) fn av_remove(&self, addr: sys::fi_addr_t) -> i32 {
        let av = self.av();
        if av.is_null() {
            return 0;
        }
        let mut a = addr;
        // SAFETY: av is open; one address is read from `a`.
        unsafe { sys::kvxfer_fi_av_remove(av, &mut a, 1, 0) }
    }

    /// Posts a receive into buffer `buf` of `bufs` with context `ctx`.
    ///
    /// The caller hands buffer `buf` to libfabric until the completion
    /// with `ctx` is read; `bufs` outlives the endpoint (the transport
    /// closes the endpoint before freeing them).
    pub(crate) fn recv(&self, bufs: &MsgBufs, buf: u32, ctx: *mut c_void) -> i64 {
        let ep = self.ep();
        if ep.is_null() {
            return -(sys::FI_ESHUTDOWN as i64);
        }
        // SAFETY: the endpoint is open (checked); the buffer lies in the
        // registered area, which stays allocated and is not touched by
        // Rust until its completion; the context is a stable pool slot.
        (unsafe {
            sys::kvxfer_fi_recv(
                ep,
                bufs.ptr(buf).cast(),
                bufs.slot(),
                bufs.desc().0,
                sys::FI_ADDR_UNSPEC,
                ctx,
            )
        }) as i64
    }

    /// Sends `len` bytes of buffer `buf` of `bufs` to `peer`; as for
    /// [`recv`](Self::recv), the buffer is libfabric's until the completion.
    pub(crate) fn send(
        &self,
        bufs: &MsgBufs,
        buf: u32,
        len: usize,
        peer: sys::fi_addr_t,
        ctx: *mut c_void,
    ) -> i64 {
        let ep = self.ep();
        if ep.is_null() {
            return -(sys::FI_ESHUTDOWN as i64);
        }
        let len = len.min(bufs.slot());
        // SAFETY: the endpoint is open; the buffer lies in the registered
        // send area (len <= slot) and is not written by Rust until its
        // completion; the context is a stable pool slot.
        (unsafe { sys::kvxfer_fi_send(ep, bufs.ptr(buf).cast(), len, bufs.desc().0, peer, ctx) })
            as i64
    }

    /// Posts a READ of 0 bytes from `peer` (remote address 0, key 0) into
    /// buffer 0 of `bufs`, with context `ctx`: over `ofi_rxm`, the call
    /// returns 0 only while its connection to `peer` is established (it
    /// starts connecting and returns `-FI_EAGAIN` otherwise). No byte is
    /// read or written; the peer's provider may answer it or close the
    /// connection over the unknown key.
    pub(crate) fn probe(&self, bufs: &MsgBufs, peer: sys::fi_addr_t, ctx: *mut c_void) -> i64 {
        self.rma(
            XferOp::Read,
            bufs.ptr(0) as u64,
            0,
            bufs.desc(),
            peer,
            0,
            0,
            ctx,
        )
    }

    /// Posts an RMA WRITE (with `FI_DELIVERY_COMPLETE`) or READ of `len`
    /// bytes between local `local` (registered, descriptor `desc`) and the
    /// peer's `remote` under `key`.
    ///
    /// `[local, local+len)` must lie in a registration that stays open,
    /// and memory that stays allocated, until the completion with `ctx` is
    /// read or the endpoint is closed: the transport checks it against the
    /// registration at post time, the core keeps registrations of posted
    /// transfers alive, and the transport defers deregistration while an
    /// abandoned operation may still touch them.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn rma(
        &self,
        op: XferOp,
        local: u64,
        len: u64,
        desc: MrDesc,
        peer: sys::fi_addr_t,
        remote: u64,
        key: u64,
        ctx: *mut c_void,
    ) -> i64 {
        let ep = self.ep();
        if ep.is_null() {
            return -(sys::FI_ESHUTDOWN as i64);
        }
        let iov = libc::iovec {
            iov_base: local as *mut c_void,
            iov_len: len as usize,
        };
        let rma = sys::fi_rma_iov {
            addr: remote,
            len: len as usize,
            key,
        };
        let mut desc = desc.0;
        let msg = sys::fi_msg_rma {
            msg_iov: ptr::addr_of!(iov).cast(),
            desc: &mut desc,
            iov_count: 1,
            addr: peer,
            rma_iov: &rma,
            rma_iov_count: 1,
            context: ctx,
            data: 0,
        };
        // SAFETY: the endpoint is open; the local memory is registered and
        // kept alive as documented above; msg and the arrays it points to
        // live across the call (the provider copies them); the context is
        // a stable pool slot.
        (unsafe {
            match op {
                XferOp::Write => sys::kvxfer_fi_writemsg(
                    ep,
                    &msg,
                    (sys::FI_COMPLETION | sys::FI_DELIVERY_COMPLETE) as u64,
                ),
                XferOp::Read => sys::kvxfer_fi_readmsg(ep, &msg, sys::FI_COMPLETION as u64),
            }
        }) as i64
    }

    /// Asks the provider to cancel the operation with context `ctx`
    /// (`fi_cancel`); logs failures other than "not found".
    pub(crate) fn cancel(&self, ctx: *mut c_void) {
        let ep_fid = self.ep_fid();
        if ep_fid.is_null() {
            return;
        }
        // SAFETY: the endpoint is open; libfabric only compares the
        // context with those of its queued operations.
        let ret = unsafe { sys::kvxfer_fi_cancel(ep_fid, ctx) };
        if ret != 0 && ret as i64 != -(sys::FI_ENOENT as i64) {
            log::debug!("LIBFABRIC: fi_cancel: {}", strerror(ret as i64));
        }
    }

    /// Reads completions into `batch` (`fi_cq_read`): their number, or
    /// libfabric's negative code (`-FI_EAGAIN` when none, `-FI_EAVAIL` when
    /// an error entry waits, `-FI_EAGAIN` too once the queue is closed).
    pub(crate) fn cq_read(&self, batch: &mut CqBatch) -> i64 {
        let cq = self.cq();
        if cq.is_null() {
            return -(sys::FI_EAGAIN as i64);
        }
        // SAFETY: cq is open and was opened with FI_CQ_FORMAT_DATA; batch
        // holds capacity() such entries.
        (unsafe { sys::kvxfer_fi_cq_read(cq, batch.0.as_mut_ptr().cast(), batch.0.len()) }) as i64
    }

    /// Reads one error entry (`fi_cq_readerr`).
    pub(crate) fn cq_readerr(&self) -> Option<CqError> {
        let cq = self.cq();
        if cq.is_null() {
            return None;
        }
        let mut err = sys::fi_cq_err_entry::default();
        // SAFETY: cq is open; err is a zeroed entry (err_data_size 0 asks
        // libfabric to use its own buffer for err_data).
        let r = unsafe { sys::kvxfer_fi_cq_readerr(cq, &mut err, 0) };
        if r != 1 {
            return None;
        }
        let text = self.cq_error_text(cq, &err);
        Some(CqError {
            ctx: err.op_context,
            len: err.len,
            err: err.err,
            prov_errno: err.prov_errno,
            text,
        })
    }

    /// libfabric's text for an error entry, with the provider's own text.
    fn cq_error_text(&self, cq: *mut sys::fid_cq, err: &sys::fi_cq_err_entry) -> String {
        let generic = strerror(err.err as i64);
        let mut buf = [0 as std::ffi::c_char; 128];
        // SAFETY: the cq is open; err_data/prov_errno come from the entry
        // just read from it; buf is writable for its length.
        let p = unsafe {
            sys::kvxfer_fi_cq_strerror(
                cq,
                err.prov_errno,
                err.err_data,
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        if p.is_null() {
            return generic;
        }
        // SAFETY: fi_cq_strerror returns a NUL-terminated string (buf or a
        // static one).
        let prov = unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
        if prov.is_empty() || prov == generic {
            generic
        } else {
            format!(
                "{generic} (provider: {prov}, prov_errno {})",
                err.prov_errno
            )
        }
    }
}
