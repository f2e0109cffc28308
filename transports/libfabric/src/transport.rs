//! [`FabricTransport`]: the [`Transport`] implementation.

use std::cell::UnsafeCell;
use std::collections::VecDeque;
use std::ffi::{c_void, CStr};
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvxfer_core::error::{bounded, Name};
use kvxfer_core::wire::copy_into;
use kvxfer_core::{
    Capabilities, Completion, Error, MemKind, PostStatus, Region, Segments, Token, Transport,
    XferOp,
};
use libfabric_sys as sys;

use crate::fabric::{fi_error, strerror, Desc, Shared};
use crate::{provider_preference, FabricConfig, BACKEND, PROVIDER_ENV};

const EAGAIN: i64 = -(sys::FI_EAGAIN as i64);
const EAVAIL: i64 = -(sys::FI_EAVAIL as i64);
const ENOKEY: i64 = -(sys::FI_ENOKEY as i64);

/// Length of a packed remote key: the 64-bit key and a flags byte.
const PACKED_KEY_LEN: usize = 9;
/// Flag in a packed key: the region is addressed by virtual address.
const KEY_FLAG_VIRT_ADDR: u8 = 1;
/// Version byte leading a transport address: `[version][provider length]
/// [provider][longest notification accepted, u32 LE][endpoint name]`.
const ADDRESS_VERSION: u8 = 2;
/// Completion-queue entries read per `fi_cq_read`.
const CQ_BATCH: usize = 64;
/// How long `FabricTransport::new` keeps trying to post the notification
/// receive buffers while the provider asks to retry.
const RECV_SETUP_TIMEOUT: Duration = Duration::from_secs(5);

/// Fails unless `FI_AV_REMOVE_CLEANUP` is on. Without it `tcp;ofi_rxm`
/// keeps the connection to a removed peer, and with it every operation
/// still queued there: a timed-out or abandoned transfer's memory could be
/// written after it was deregistered. kvxfer sets the variable before
/// `main`; it is missing only where the environment turned it off or
/// kvxfer was loaded into a running, threaded process.
fn require_av_remove_cleanup() -> Result<(), Error> {
    let name = crate::fabric::AV_REMOVE_CLEANUP_ENV.to_string_lossy();
    let v = std::env::var(&*name).unwrap_or_default();
    if matches!(
        v.to_ascii_lowercase().as_str(),
        "1" | "yes" | "true" | "on" | "y"
    ) {
        return Ok(());
    }
    Err(Error::backend(
        BACKEND,
        -(sys::FI_EINVAL as i64),
        &format!("{name}={v:?}; set {name}=1 before the process starts"),
    ))
}

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

/// A registration of local memory with libfabric.
#[derive(Debug)]
pub struct FabricReg {
    mr: *mut sys::fid_mr,
    desc: Desc,
    key: u64,
    virt_addr: bool,
    region: Region,
    /// Keeps the domain open until this registration is closed.
    _shared: Arc<Shared>,
}

// SAFETY: the MR handle is only read after creation; Drop (on whatever
// thread) only hands it to `shared`, under a lock, and the owner of the
// transport closes it there, serialised with its other calls. The domain
// stays alive through `shared`.
unsafe impl Send for FabricReg {}
// SAFETY: shared references only read plain fields.
unsafe impl Sync for FabricReg {}

impl FabricReg {
    /// The memory key peers use for this region.
    pub fn key(&self) -> u64 {
        self.key
    }

    /// The registered region.
    pub fn region(&self) -> &Region {
        &self.region
    }
}

impl Drop for FabricReg {
    /// Hands the registration to the transport, which closes it on its
    /// next call (at once in [`deregister`](Transport::deregister)): a
    /// registration may be dropped on any thread, while the domain takes
    /// no concurrent call.
    fn drop(&mut self) {
        self._shared.drop_reg(self.mr);
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("provider", &self.info.provider())
            .finish()
    }
}

/// A peer inserted into the address vector.
#[derive(Debug)]
pub struct FabricPeer {
    addr: sys::fi_addr_t,
    label: Name,
    /// Unique in this transport: an address-vector slot may be reused by
    /// a later `connect` once this peer was removed from it.
    id: u64,
    /// The longest notification the peer accepts.
    max_note: usize,
}

impl FabricPeer {
    /// The peer's address as libfabric prints it.
    pub fn label(&self) -> &str {
        &self.label
    }
}

/// A peer's key for one of its regions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FabricRemoteKey {
    key: u64,
    virt_addr: bool,
    /// The kind of the peer's region (VRAM only with `FI_HMEM`).
    kind: MemKind,
}

/// What a libfabric operation context belongs to.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum OpKind {
    /// Not in use.
    Free,
    /// Segment `seg` of transfer slot `xfer`, generation `gen`.
    Rma { xfer: u32, gen: u32, seg: u32 },
    /// The notification of transfer `xfer`, in send buffer `buf`.
    XferNotif { xfer: u32, gen: u32, buf: u32 },
    /// A notification outside any transfer, in send buffer `buf`.
    Notif { buf: u32 },
    /// A receive into notification buffer `buf`.
    Recv { buf: u32 },
    /// The operation of a transfer that already ended (timed out); its
    /// completion is dropped, and the send buffer `buf` of an orphaned
    /// notification goes back to the pool with it. `local`/`len`: the
    /// application memory an orphaned RMA operation may still touch (`len`
    /// 0 for a notification).
    Orphan {
        buf: Option<u32>,
        local: u64,
        len: u64,
    },
}

/// One libfabric operation of a segment.
#[derive(Copy, Clone, Debug)]
struct SegOp {
    local: u64,
    len: u64,
    desc: Desc,
    remote: u64,
    key: u64,
}

/// A posted transfer.
#[derive(Debug)]
struct Xfer {
    gen: u32,
    live: bool,
    token: Token,
    op: XferOp,
    peer: sys::fi_addr_t,
    peer_id: u64,
    peer_label: Name,
    segs: Vec<SegOp>,
    next: usize,
    outstanding: u32,
    error: Option<Error>,
    notif: Vec<u8>,
    has_notif: bool,
    notif_sent: bool,
    started: Instant,
}

impl Xfer {
    fn empty() -> Xfer {
        Xfer {
            gen: 0,
            live: false,
            token: Token(0),
            op: XferOp::Write,
            peer: 0,
            peer_id: 0,
            peer_label: Name::new(),
            segs: Vec::new(),
            next: 0,
            outstanding: 0,
            error: None,
            notif: Vec::new(),
            has_notif: false,
            notif_sent: false,
            started: Instant::now(),
        }
    }
}

/// A notification waiting for a send slot in the provider. Notifications
/// leave in the order they were issued: one issued while any other to the
/// same peer waits here is queued behind it.
#[derive(Debug)]
struct PendingSend {
    peer: sys::fi_addr_t,
    peer_id: u64,
    buf: u32,
    len: usize,
    /// The transfer (slot, generation) this is the notification of, which
    /// counts it among its outstanding operations; `None` for a standalone
    /// notification.
    xfer: Option<(u32, u32)>,
}

impl PendingSend {
    /// The operation that sends it.
    fn op_kind(&self) -> OpKind {
        match self.xfer {
            Some((xfer, gen)) => OpKind::XferNotif {
                xfer,
                gen,
                buf: self.buf,
            },
            None => OpKind::Notif { buf: self.buf },
        }
    }
}

/// A buffer area registered for messages; written by libfabric, so only
/// accessed through raw pointers.
struct MsgBufs {
    /// Declared before `mem` so that the registration is closed before the
    /// memory it covers is freed.
    reg: FabricReg,
    mem: Box<[UnsafeCell<u8>]>,
    slot: usize,
}

impl MsgBufs {
    fn ptr(&self, i: u32) -> *mut u8 {
        // SAFETY: i < count (checked by callers' construction of indices),
        // so the offset stays inside `mem`.
        unsafe { UnsafeCell::raw_get(self.mem.as_ptr()).add(i as usize * self.slot) }
    }
}

/// The libfabric transport. See the [crate documentation](crate).
pub struct FabricTransport {
    pub(crate) shared: Arc<Shared>,
    provider: String,
    pub(crate) mr_mode: u32,
    prov_errno_is_errno: bool,
    pub(crate) key_size: usize,
    /// Where VRAM goes ([`crate::hmem`]).
    pub(crate) hmem: crate::hmem::Hmem,
    max_msg: u64,
    address: Vec<u8>,
    config: FabricConfig,
    /// Operation contexts handed to libfabric (`struct fi_context2`, which
    /// also satisfies `FI_CONTEXT`); never read by Rust.
    ctxs: Box<[UnsafeCell<sys::fi_context2>]>,
    ops: Vec<OpKind>,
    free_ops: Vec<u32>,
    xfers: Vec<Xfer>,
    free_xfers: Vec<u32>,
    active: Vec<u32>,
    done: VecDeque<Completion>,
    recv: MsgBufs,
    recv_ops: Vec<u32>,
    ready: VecDeque<(u32, usize)>,
    /// Notifications whose receive failed, not yet reported.
    lost_notes: u64,
    repost: Vec<u32>,
    send: MsgBufs,
    free_sends: Vec<u32>,
    pending_sends: VecDeque<PendingSend>,
    cq_entries: Vec<sys::fi_cq_data_entry>,
    /// Id of the next peer `connect` makes.
    next_peer_id: u64,
    /// Peers given up on after a timeout: removed from the address
    /// vector, until `disconnect`.
    given_up: Vec<u64>,
    /// Registrations whose deregistration timed out waiting for orphaned
    /// operations; closed once those are reported, or after the endpoint
    /// in `Drop`.
    deferred: Vec<FabricReg>,
}

// SAFETY: all libfabric objects are opened with FI_THREAD_DOMAIN and used
// only through `&mut self`, so calls are serialised; the raw pointers in
// the operation contexts and buffers are owned by this value. The
// transport is not `Sync`.
unsafe impl Send for FabricTransport {}

impl std::fmt::Debug for FabricTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FabricTransport")
            .field("provider", &self.provider)
            .field("mr_mode", &self.mr_mode)
            .field("active", &self.active.len())
            .finish()
    }
}

/// The provider names `config` asks for, in the order to try them.
fn candidates(config: &FabricConfig) -> Vec<String> {
    if let Some(p) = &config.provider {
        return vec![p.clone()];
    }
    match std::env::var(PROVIDER_ENV) {
        Ok(p) if !p.trim().is_empty() => vec![p.trim().to_owned()],
        _ => provider_preference()
            .iter()
            .map(|p| (*p).to_owned())
            .collect(),
    }
}

impl FabricTransport {
    /// Opens an `FI_EP_RDM` endpoint on the provider `config` selects (see
    /// the [crate documentation](crate)), registers and posts the
    /// notification buffers.
    ///
    /// Fails with [`Error::Backend`] naming LIBFABRIC, the provider(s) tried
    /// and libfabric's reason when no provider is usable, or naming the
    /// provider when it keeps refusing (`FI_EAGAIN`) the notification
    /// receive buffers for 5 s, whatever [`FabricConfig::op_timeout`] is.
    pub fn new(config: &FabricConfig) -> Result<FabricTransport, Error> {
        if config.max_transfers == 0 || config.max_ops == 0 || config.max_notification == 0 {
            return Err(Error::backend(
                BACKEND,
                -(sys::FI_EINVAL as i64),
                &format!(
                    "max_transfers {}, max_ops {} and max_notification {} must be positive",
                    config.max_transfers, config.max_ops, config.max_notification
                ),
            ));
        }
        require_av_remove_cleanup()?;
        let tried = candidates(config);
        let mut last = 0i64;
        let mut info = None;
        let mut hmem = crate::hmem::Hmem::new(config)?;
        for p in &tried {
            match hmem.get_info(p) {
                Ok(i) => {
                    info = Some(i);
                    break;
                }
                Err(code) => {
                    log::debug!("LIBFABRIC: provider {p} not usable: {}", strerror(code));
                    last = code;
                }
            }
        }
        let Some(info) = info else {
            return Err(Error::backend(
                BACKEND,
                last,
                &format!(
                    "no usable provider (tried {}): {}",
                    tried.join(", "),
                    strerror(last)
                ),
            ));
        };
        let provider = info.provider();
        let fi = info.first();
        // SAFETY: fi is the valid first entry of `info`; its attribute
        // structs are filled in by fi_getinfo.
        let (mr_mode, key_size, max_msg, tx_size) = unsafe {
            let d = &*(*fi).domain_attr;
            let e = &*(*fi).ep_attr;
            let t = &*(*fi).tx_attr;
            (
                d.mr_mode as u32,
                d.mr_key_size,
                e.max_msg_size as u64,
                t.size,
            )
        };
        if mr_mode & sys::FI_MR_RAW != 0 {
            return Err(Error::backend(
                BACKEND,
                -(sys::FI_ENOSYS as i64),
                &format!(
                    "provider {provider} requires FI_MR_RAW keys, which kvxfer does not support"
                ),
            ));
        }
        let cq_size = (config.max_ops + config.notification_buffers + 64).max(tx_size);
        let shared = Shared::open(info, cq_size)?;

        let mut name = [0u8; 256];
        let mut len = name.len();
        // SAFETY: the endpoint is open; name/len describe a writable buffer.
        let ret =
            unsafe { sys::kvxfer_fi_getname(shared.ep_fid(), name.as_mut_ptr().cast(), &mut len) };
        if ret != 0 {
            return Err(fi_error(ret as i64, "fi_getname"));
        }
        let mut address = Vec::with_capacity(2 + provider.len() + len);
        address.push(ADDRESS_VERSION);
        address.push(provider.len().min(255) as u8);
        address.extend_from_slice(&provider.as_bytes()[..provider.len().min(255)]);
        let max_note = u32::try_from(config.max_notification).unwrap_or(u32::MAX);
        address.extend_from_slice(&max_note.to_le_bytes());
        address.extend_from_slice(&name[..len.min(name.len())]);

        let slot = config.max_notification;
        let nrecv = config.notification_buffers.max(1);
        let nsend = 64usize;
        let recv_mem: Box<[UnsafeCell<u8>]> =
            (0..slot * nrecv).map(|_| UnsafeCell::new(0)).collect();
        let send_mem: Box<[UnsafeCell<u8>]> =
            (0..slot * nsend).map(|_| UnsafeCell::new(0)).collect();
        let msg_access = (sys::FI_SEND | sys::FI_RECV) as u64;
        let recv_reg = register_raw(
            &shared,
            mr_mode,
            key_size,
            Region::dram(recv_mem.as_ptr() as u64, (slot * nrecv) as u64),
            msg_access,
        )?;
        let send_reg = register_raw(
            &shared,
            mr_mode,
            key_size,
            Region::dram(send_mem.as_ptr() as u64, (slot * nsend) as u64),
            msg_access,
        )?;

        let nops = config.max_ops + nrecv + nsend;
        let ctxs: Box<[UnsafeCell<sys::fi_context2>]> = (0..nops)
            .map(|_| UnsafeCell::new(sys::fi_context2::default()))
            .collect();
        let prov_errno_is_errno = provider.contains("tcp") || provider.contains("sockets");
        let mut t = FabricTransport {
            shared,
            provider,
            mr_mode,
            prov_errno_is_errno,
            key_size,
            hmem,
            max_msg: max_msg.max(1),
            address,
            config: config.clone(),
            ctxs,
            ops: vec![OpKind::Free; nops],
            free_ops: (0..nops as u32).rev().collect(),
            xfers: (0..config.max_transfers).map(|_| Xfer::empty()).collect(),
            free_xfers: (0..config.max_transfers as u32).rev().collect(),
            active: Vec::with_capacity(config.max_transfers),
            done: VecDeque::with_capacity(config.max_transfers),
            recv: MsgBufs {
                mem: recv_mem,
                slot,
                reg: recv_reg,
            },
            recv_ops: Vec::with_capacity(nrecv),
            ready: VecDeque::with_capacity(nrecv),
            lost_notes: 0,
            repost: Vec::with_capacity(nrecv),
            send: MsgBufs {
                mem: send_mem,
                slot,
                reg: send_reg,
            },
            free_sends: (0..nsend as u32).rev().collect(),
            pending_sends: VecDeque::with_capacity(nsend),
            cq_entries: vec![sys::fi_cq_data_entry::default(); CQ_BATCH],
            next_peer_id: 1,
            given_up: Vec::new(),
            deferred: Vec::new(),
        };
        for b in 0..nrecv as u32 {
            let op = t
                .alloc_op(OpKind::Recv { buf: b })
                .expect("the pool holds an op per receive buffer");
            t.recv_ops.push(op);
            t.repost.push(b);
        }
        // Post the receives, progressing the queue if the provider pushes
        // back; bounded on its own (op_timeout may be unbounded).
        let start = Instant::now();
        while !t.repost.is_empty() {
            t.post_receives()?;
            if t.repost.is_empty() {
                break;
            }
            if start.elapsed() > RECV_SETUP_TIMEOUT {
                return Err(Error::backend(
                    BACKEND,
                    EAGAIN,
                    &format!(
                        "provider {}: fi_recv refused {} of {nrecv} notification buffers for {}s",
                        t.provider,
                        t.repost.len(),
                        RECV_SETUP_TIMEOUT.as_secs()
                    ),
                ));
            }
            t.read_cq();
            std::thread::yield_now();
        }
        log::debug!(
            "LIBFABRIC: provider {} (mr_mode {:#x}, key size {})",
            t.provider,
            t.mr_mode,
            t.key_size
        );
        Ok(t)
    }

    /// The provider in use, in libfabric's spelling (e.g. `tcp;ofi_rxm`).
    pub fn provider_name(&self) -> &str {
        &self.provider
    }

    /// The `mr_mode` bits the provider asked for.
    pub fn mr_mode(&self) -> u32 {
        self.mr_mode
    }

    /// Transfers posted and not yet reported.
    pub fn in_flight(&self) -> usize {
        self.active.len()
    }

    /// Registrations whose deregistration is still deferred: operations of
    /// timed-out transfers referencing them were not reported within
    /// [`FabricConfig::cancel_timeout`], so their memory must stay
    /// allocated (see the [crate documentation](crate#failure)).
    pub fn deferred_deregistrations(&self) -> usize {
        self.deferred.len()
    }

    /// Whether an orphaned operation may still touch `[addr, addr+len)`.
    fn orphans_touch(&self, addr: u64, len: u64) -> bool {
        let end = addr.saturating_add(len);
        self.ops.iter().any(|k| match *k {
            OpKind::Orphan { local, len: l, .. } => {
                l > 0 && local < end && addr < local.saturating_add(l)
            }
            _ => false,
        })
    }

    /// Closes the deferred registrations no orphaned operation references
    /// any more.
    fn release_deferred(&mut self) {
        let mut i = 0;
        while i < self.deferred.len() {
            let r = self.deferred[i].region;
            if self.orphans_touch(r.addr, r.len) {
                i += 1;
            } else {
                log::info!(
                    "LIBFABRIC: deferred deregistration of {:#x}+{} done",
                    r.addr,
                    r.len
                );
                drop(self.deferred.swap_remove(i));
            }
        }
        self.shared.close_dropped_regs();
    }

    /// Removes peer `id` at `addr` from the address vector after a
    /// timeout or once it is found gone: the provider then drops its connection and reports the
    /// operations on it. Transfers and notifications to it fail until it
    /// is connected again.
    fn give_up(&mut self, addr: sys::fi_addr_t, id: u64, label: &str) {
        if self.given_up.contains(&id) {
            return;
        }
        self.given_up.push(id);
        let av = self.shared.av();
        if av.is_null() {
            return;
        }
        let mut a = addr;
        // SAFETY: av is open; addr came from fi_av_insert on it and was not
        // removed yet (peer ids are removed at most once, here or in
        // disconnect).
        let ret = unsafe { sys::kvxfer_fi_av_remove(av, &mut a, 1, 0) };
        if ret != 0 {
            log::warn!(
                "LIBFABRIC: fi_av_remove({label}) of a peer given up on: {}",
                strerror(ret as i64)
            );
        }
    }

    /// Whether a post or notification with a notification of
    /// `notification_len` bytes may go to `peer`: the notification fits,
    /// the transport is open and the peer was not given up on.
    fn check_send(&self, peer: &FabricPeer, notification_len: usize) -> Result<(), Error> {
        // Longer than the peer's receive buffers, a message would be cut
        // there and lost (with the provider's connection state after it).
        let max = self.config.max_notification.min(peer.max_note);
        if notification_len > max {
            return Err(Error::NotificationTooLong {
                len: notification_len as u64,
                max: max as u64,
            });
        }
        if self.shared.ep().is_null() {
            return Err(Error::ShutDown);
        }
        if self.given_up.contains(&peer.id) {
            return Err(Error::disconnected(""));
        }
        Ok(())
    }

    fn ctx_ptr(&self, op: u32) -> *mut c_void {
        self.ctxs[op as usize].get().cast()
    }

    /// The operation index of a context pointer libfabric handed back.
    fn op_of(&self, ctx: *mut c_void) -> Option<u32> {
        let base = self.ctxs.as_ptr() as usize;
        let size = std::mem::size_of::<UnsafeCell<sys::fi_context2>>();
        let p = ctx as usize;
        if p < base || (p - base) % size != 0 || (p - base) / size >= self.ctxs.len() {
            return None;
        }
        Some(((p - base) / size) as u32)
    }

    fn alloc_op(&mut self, kind: OpKind) -> Option<u32> {
        let op = self.free_ops.pop()?;
        self.ops[op as usize] = kind;
        Some(op)
    }

    fn free_op(&mut self, op: u32) {
        self.ops[op as usize] = OpKind::Free;
        self.free_ops.push(op);
    }

    /// Posts the receive buffers listed in `repost`.
    fn post_receives(&mut self) -> Result<(), Error> {
        while let Some(&b) = self.repost.last() {
            let op = self.recv_ops[b as usize];
            // SAFETY: the endpoint is open; the buffer lies in the registered
            // receive area and stays allocated and untouched by Rust until
            // its completion; the context is this buffer's stable slot.
            let ret = unsafe {
                sys::kvxfer_fi_recv(
                    self.shared.ep(),
                    self.recv.ptr(b).cast(),
                    self.recv.slot,
                    self.recv.reg.desc.0,
                    libfabric_sys::FI_ADDR_UNSPEC,
                    self.ctx_ptr(op),
                )
            } as i64;
            if ret == EAGAIN {
                return Ok(());
            }
            if ret != 0 {
                return Err(fi_error(ret, "fi_recv (notification buffer)"));
            }
            self.repost.pop();
        }
        Ok(())
    }

    /// Reads the completion queue until it is empty (bounded).
    fn read_cq(&mut self) {
        let cq = self.shared.cq();
        if cq.is_null() {
            return;
        }
        for _ in 0..64 {
            // SAFETY: cq is open and was opened with FI_CQ_FORMAT_DATA;
            // cq_entries holds CQ_BATCH such entries.
            let n = unsafe {
                sys::kvxfer_fi_cq_read(cq, self.cq_entries.as_mut_ptr().cast(), CQ_BATCH)
            } as i64;
            if n > 0 {
                for i in 0..n as usize {
                    let e = self.cq_entries[i];
                    self.on_completion(e.op_context, e.len, None);
                }
                if (n as usize) < CQ_BATCH {
                    return;
                }
            } else if n == EAVAIL {
                let mut err = sys::fi_cq_err_entry::default();
                // SAFETY: cq is open; err is a zeroed entry (err_data_size
                // 0 asks libfabric to use its own buffer for err_data).
                let r = unsafe { sys::kvxfer_fi_cq_readerr(cq, &mut err, 0) };
                if r != 1 {
                    return;
                }
                let text = self.cq_error_text(&err);
                self.on_completion(
                    err.op_context,
                    err.len,
                    Some((err.err, err.prov_errno, text)),
                );
            } else {
                if n != EAGAIN {
                    log::warn!("LIBFABRIC: fi_cq_read failed: {}", strerror(n));
                }
                return;
            }
        }
    }

    /// libfabric's text for an error entry, with the provider's own text.
    fn cq_error_text(&self, err: &sys::fi_cq_err_entry) -> String {
        let generic = strerror(err.err as i64);
        let mut buf = [0 as std::ffi::c_char; 128];
        // SAFETY: the cq is open; err_data/prov_errno come from the entry
        // just read; buf is writable for its length.
        let p = unsafe {
            sys::kvxfer_fi_cq_strerror(
                self.shared.cq(),
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

    /// The error of a failed operation of `xfer`. `prov_errno_is_errno`:
    /// the provider reports socket errors as its `prov_errno` (tcp,
    /// sockets), so a cancelled operation with `ENOTCONN` there means the
    /// peer is gone. So does any operation of a live transfer that comes
    /// back `FI_ECANCELED`: kvxfer cancels only operations of timed-out
    /// transfers, so the provider cancelled it itself, tearing down the
    /// connection (`tcp;ofi_rxm` does so to a killed peer's operations,
    /// with `prov_errno` ENOENT).
    fn xfer_error(
        xfer: &Xfer,
        errno: i32,
        prov_errno: i32,
        prov_errno_is_errno: bool,
        text: &str,
    ) -> Error {
        let gone = |e: u32| {
            [
                sys::FI_ECONNRESET,
                sys::FI_ECONNREFUSED,
                sys::FI_ECONNABORTED,
                sys::FI_ENOTCONN,
                sys::FI_EHOSTUNREACH,
                libc::EPIPE as u32,
            ]
            .contains(&e)
        };
        if gone(errno.unsigned_abs())
            || errno.unsigned_abs() == sys::FI_ECANCELED
            || (prov_errno_is_errno && gone(prov_errno.unsigned_abs()))
        {
            // Left empty: the engine fills in the peer's agent name, as
            // for every transport; the address is in the debug log.
            log::debug!(
                "LIBFABRIC: {} to {} failed: peer gone",
                xfer.op.name(),
                xfer.peer_label
            );
            return Error::disconnected("");
        }
        Error::backend(
            BACKEND,
            -(errno.unsigned_abs() as i64),
            &format!("{} {text}", xfer.op.name()),
        )
    }

    fn on_completion(&mut self, ctx: *mut c_void, len: usize, error: Option<(i32, i32, String)>) {
        let Some(op) = self.op_of(ctx) else {
            log::warn!("LIBFABRIC: completion with unknown context {ctx:p}");
            return;
        };
        let kind = self.ops[op as usize];
        match kind {
            OpKind::Free => log::warn!("LIBFABRIC: completion for an unused context"),
            OpKind::Orphan { buf, .. } => {
                self.free_op(op);
                if let Some(buf) = buf {
                    self.free_sends.push(buf);
                }
            }
            OpKind::Rma { xfer, gen, .. } | OpKind::XferNotif { xfer, gen, .. } => {
                self.free_op(op);
                if let OpKind::XferNotif { buf, .. } = kind {
                    self.free_sends.push(buf);
                }
                let x = &mut self.xfers[xfer as usize];
                if !x.live || x.gen != gen {
                    return;
                }
                x.outstanding -= 1;
                if let Some((errno, prov_errno, text)) = error {
                    let mut gone = None;
                    if x.error.is_none() {
                        let e = if self.given_up.contains(&x.peer_id) {
                            // Flushed by the removal of its peer.
                            Error::disconnected("")
                        } else {
                            Self::xfer_error(x, errno, prov_errno, self.prov_errno_is_errno, &text)
                        };
                        if matches!(e, Error::RemoteDisconnected { .. }) {
                            gone = Some((x.peer, x.peer_id, x.peer_label.clone()));
                        }
                        x.error = Some(e);
                    }
                    // Stop issuing further segments.
                    x.next = x.segs.len();
                    // A dead peer is given up on as after a timeout: later
                    // posts to it fail at once, not at their deadline.
                    if let Some((addr, id, label)) = gone {
                        self.give_up(addr, id, &label);
                    }
                }
            }
            OpKind::Notif { buf } => {
                self.free_op(op);
                self.free_sends.push(buf);
                if let Some((_, _, text)) = error {
                    log::warn!("LIBFABRIC: a notification could not be sent: {text}");
                }
            }
            OpKind::Recv { buf } => match error {
                None => self.ready.push_back((buf, len.min(self.recv.slot))),
                Some((errno, _, text)) => {
                    if errno.unsigned_abs() != sys::FI_ECANCELED {
                        // A notification that did not arrive (longer than
                        // this side accepts, or broken on the way): the
                        // application learns it from poll_notification.
                        log::warn!("LIBFABRIC: notification receive failed: {text}");
                        self.lost_notes += 1;
                        self.repost.push(buf);
                    }
                }
            },
        }
    }

    /// Issues the not yet issued segments of transfer `slot` until the
    /// provider or the operation pool pushes back. Returns the error of a
    /// failed issue.
    fn issue(&mut self, slot: u32) -> Result<(), Error> {
        let ep = self.shared.ep();
        loop {
            let x = &self.xfers[slot as usize];
            if x.next >= x.segs.len() || x.error.is_some() {
                return Ok(());
            }
            if self.given_up.contains(&x.peer_id) {
                // Its address may already belong to another peer.
                let x = &mut self.xfers[slot as usize];
                x.error = Some(Error::disconnected(""));
                x.next = x.segs.len();
                return Ok(());
            }
            let seg = x.segs[x.next];
            let (peer, op_kind, gen) = (x.peer, x.op, x.gen);
            let Some(op) = self.alloc_op(OpKind::Rma {
                xfer: slot,
                gen,
                seg: x.next as u32,
            }) else {
                return Ok(());
            };
            let iov = libc::iovec {
                iov_base: seg.local as *mut c_void,
                iov_len: seg.len as usize,
            };
            let rma = sys::fi_rma_iov {
                addr: seg.remote,
                len: seg.len as usize,
                key: seg.key,
            };
            let mut desc = seg.desc.0;
            let msg = sys::fi_msg_rma {
                msg_iov: ptr::addr_of!(iov).cast(),
                desc: &mut desc,
                iov_count: 1,
                addr: peer,
                rma_iov: &rma,
                rma_iov_count: 1,
                context: self.ctx_ptr(op),
                data: 0,
            };
            // SAFETY: the endpoint is open; the local buffer lies in a
            // registration the core keeps alive until the transfer ends;
            // msg and the arrays it points to live across the call (the
            // provider copies them); the context is a stable pool slot.
            let ret = unsafe {
                match op_kind {
                    XferOp::Write => sys::kvxfer_fi_writemsg(
                        ep,
                        &msg,
                        (sys::FI_COMPLETION | sys::FI_DELIVERY_COMPLETE) as u64,
                    ),
                    XferOp::Read => sys::kvxfer_fi_readmsg(ep, &msg, sys::FI_COMPLETION as u64),
                }
            } as i64;
            if ret == EAGAIN {
                self.free_op(op);
                return Ok(());
            }
            if ret != 0 {
                self.free_op(op);
                let x = &mut self.xfers[slot as usize];
                let what = if op_kind == XferOp::Write {
                    "fi_writemsg"
                } else {
                    "fi_readmsg"
                };
                let e = fi_error(
                    ret,
                    &format!("{what} of segment at {:#x}+{}", seg.local, seg.len),
                );
                x.error = Some(e.clone());
                x.next = x.segs.len();
                return Err(e);
            }
            let x = &mut self.xfers[slot as usize];
            x.outstanding += 1;
            x.next += 1;
        }
    }

    /// Sends `len` bytes of send buffer `buf` to `peer` with operation kind
    /// `kind`. Returns `Ok(false)` when the provider asks to retry.
    fn try_send(
        &mut self,
        peer: sys::fi_addr_t,
        buf: u32,
        len: usize,
        kind: OpKind,
    ) -> Result<bool, Error> {
        let Some(op) = self.alloc_op(kind) else {
            return Ok(false);
        };
        // SAFETY: the endpoint is open; the buffer lies in the registered
        // send area and is not written by Rust until its completion; the
        // context is a stable pool slot.
        let ret = unsafe {
            sys::kvxfer_fi_send(
                self.shared.ep(),
                self.send.ptr(buf).cast(),
                len,
                self.send.reg.desc.0,
                peer,
                self.ctx_ptr(op),
            )
        } as i64;
        if ret == EAGAIN {
            self.free_op(op);
            return Ok(false);
        }
        if ret != 0 {
            self.free_op(op);
            return Err(fi_error(ret, "fi_send (notification)"));
        }
        Ok(true)
    }

    fn copy_to_send_buf(&self, buf: u32, msg: &[u8]) {
        // SAFETY: buf is a free send buffer (not posted to libfabric) of
        // `slot` bytes and msg.len() <= slot (checked by callers); it lies
        // in `send.mem`, written only through its UnsafeCells.
        unsafe { ptr::copy_nonoverlapping(msg.as_ptr(), self.send.ptr(buf), msg.len()) };
    }

    /// Whether a notification to peer `peer_id` waits in `pending_sends`.
    fn queued_for(&self, peer_id: u64) -> bool {
        self.pending_sends.iter().any(|p| p.peer_id == peer_id)
    }

    /// A queued notification that will not be sent: its buffer goes back,
    /// and a transfer it belongs to stops waiting for it, failing with
    /// `error`.
    fn drop_pending(&mut self, p: PendingSend, error: Error) {
        self.free_sends.push(p.buf);
        if let Some((xfer, gen)) = p.xfer {
            let x = &mut self.xfers[xfer as usize];
            if x.live && x.gen == gen {
                x.outstanding = x.outstanding.saturating_sub(1);
                if x.error.is_none() {
                    x.error = Some(error);
                }
            }
        }
    }

    fn flush_pending_sends(&mut self) {
        while let Some(p) = self.pending_sends.front() {
            let (peer, buf, len, kind) = (p.peer, p.buf, p.len, p.op_kind());
            if self.given_up.contains(&p.peer_id) {
                log::warn!("LIBFABRIC: a queued notification is dropped: its peer timed out");
                if let Some(p) = self.pending_sends.pop_front() {
                    self.drop_pending(p, Error::disconnected(""));
                }
                continue;
            }
            match self.try_send(peer, buf, len, kind) {
                Ok(true) => {
                    self.pending_sends.pop_front();
                }
                Ok(false) => return,
                Err(e) => {
                    log::warn!("LIBFABRIC: a queued notification could not be sent: {e}");
                    if let Some(p) = self.pending_sends.pop_front() {
                        self.drop_pending(p, e);
                    }
                }
            }
        }
    }

    /// Finishes what can be finished among the active transfers.
    fn advance(&mut self) {
        let now = Instant::now();
        let mut i = 0;
        while i < self.active.len() {
            let slot = self.active[i];
            if self.xfers[slot as usize].error.is_none() {
                if let Err(e) = self.issue(slot) {
                    log::debug!(
                        "LIBFABRIC: transfer {:?} failed: {e}",
                        self.xfers[slot as usize].token
                    );
                }
            }
            let x = &self.xfers[slot as usize];
            let elapsed = now.saturating_duration_since(x.started);
            if x.error.is_none() && elapsed > self.config.op_timeout {
                self.time_out(slot, elapsed.as_millis() as u64);
                continue;
            }
            let x = &self.xfers[slot as usize];
            let data_done = x.outstanding == 0 && (x.next >= x.segs.len() || x.error.is_some());
            if !data_done {
                i += 1;
                continue;
            }
            if x.error.is_none() && x.has_notif && !x.notif_sent {
                self.send_xfer_notification(slot);
                i += 1;
                continue;
            }
            self.finish(slot, i);
        }
    }

    /// Issues the notification of transfer `slot`, whose data has been
    /// delivered: sent now, or queued in `pending_sends` behind the
    /// notifications to the same peer issued before it (or when the
    /// provider pushes back), so that none issued later overtakes it.
    /// Either way it counts among the transfer's outstanding operations
    /// until its send completes.
    fn send_xfer_notification(&mut self, slot: u32) {
        let Some(buf) = self.free_sends.pop() else {
            return;
        };
        let x = &self.xfers[slot as usize];
        let (peer, peer_id, gen, len) = (x.peer, x.peer_id, x.gen, x.notif.len());
        self.copy_to_send_buf(buf, &x.notif);
        let pending = PendingSend {
            peer,
            peer_id,
            buf,
            len,
            xfer: Some((slot, gen)),
        };
        let sent = if self.queued_for(peer_id) {
            Ok(false)
        } else {
            self.try_send(peer, buf, len, pending.op_kind())
        };
        match sent {
            Ok(sent) => {
                if !sent {
                    self.pending_sends.push_back(pending);
                }
                let x = &mut self.xfers[slot as usize];
                x.notif_sent = true;
                x.outstanding += 1;
            }
            Err(e) => {
                self.free_sends.push(buf);
                self.xfers[slot as usize].error = Some(e);
            }
        }
    }

    /// Fails transfer `slot` with a timeout; its operations still in flight
    /// are cancelled where possible and their completions dropped.
    fn time_out(&mut self, slot: u32, after_ms: u64) {
        self.abandon_slot(slot, Error::TimedOut { after_ms }, "timed out");
    }

    /// Gives up on transfer `slot`: its operations become orphans (their
    /// memory stays in use until the provider reports them), its peer is
    /// given up on, and it finishes with `error`.
    fn abandon_slot(&mut self, slot: u32, error: Error, why: &str) {
        let gen = self.xfers[slot as usize].gen;
        let ep_fid = self.shared.ep_fid();
        for op in 0..self.ops.len() as u32 {
            // A notification's send buffer stays with the orphaned
            // operation; it is reused only after the completion, which
            // frees the op and gives the buffer back. An RMA operation
            // keeps the range of application memory it may still touch.
            let orphan = match self.ops[op as usize] {
                OpKind::XferNotif { xfer, gen: g, buf } if xfer == slot && g == gen => {
                    OpKind::Orphan {
                        buf: Some(buf),
                        local: 0,
                        len: 0,
                    }
                }
                OpKind::Rma { xfer, gen: g, seg } if xfer == slot && g == gen => {
                    let s = self.xfers[slot as usize].segs[seg as usize];
                    OpKind::Orphan {
                        buf: None,
                        local: s.local,
                        len: s.len,
                    }
                }
                _ => continue,
            };
            self.ops[op as usize] = orphan;
            if !ep_fid.is_null() {
                // SAFETY: the endpoint is open; the context was handed to
                // one of its operations.
                let ret = unsafe { sys::kvxfer_fi_cancel(ep_fid, self.ctx_ptr(op)) };
                if ret != 0 && ret as i64 != -(sys::FI_ENOENT as i64) {
                    log::debug!("LIBFABRIC: fi_cancel: {}", strerror(ret as i64));
                }
            }
        }
        // A notification still queued is never sent; its buffer goes back.
        let mut i = 0;
        while i < self.pending_sends.len() {
            if self.pending_sends[i].xfer == Some((slot, gen)) {
                if let Some(p) = self.pending_sends.remove(i) {
                    self.free_sends.push(p.buf);
                }
            } else {
                i += 1;
            }
        }
        let x = &self.xfers[slot as usize];
        log::warn!(
            "LIBFABRIC: {} to {} {why}; the peer is given up on until it is connected again",
            x.op.name(),
            x.peer_label
        );
        let (peer, peer_id, label) = (x.peer, x.peer_id, x.peer_label.clone());
        self.give_up(peer, peer_id, &label);
        let x = &mut self.xfers[slot as usize];
        x.outstanding = 0;
        x.next = x.segs.len();
        x.error = Some(error);
        let idx = self
            .active
            .iter()
            .position(|&s| s == slot)
            .expect("a timed-out transfer is active");
        self.finish(slot, idx);
    }

    /// Reports transfer `slot` (at `active[idx]`) and frees its slot.
    fn finish(&mut self, slot: u32, idx: usize) {
        self.active.swap_remove(idx);
        let x = &mut self.xfers[slot as usize];
        let result = match x.error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        };
        x.live = false;
        x.segs.clear();
        x.notif.clear();
        self.done.push_back(Completion {
            token: x.token,
            result,
        });
        self.free_xfers.push(slot);
    }
}

/// Registers `region` with `shared`'s domain, honouring `mr_mode`.
pub(crate) fn register_raw(
    shared: &Arc<Shared>,
    mr_mode: u32,
    key_size: usize,
    region: Region,
    access: u64,
) -> Result<FabricReg, Error> {
    let prov_key = mr_mode & sys::FI_MR_PROV_KEY != 0;
    let len = usize::try_from(region.len).map_err(|_| Error::InvalidRegion {
        addr: region.addr,
        len: region.len,
    })?;
    let mut attempts = 0;
    let mr = loop {
        let requested = if prov_key { 0 } else { fresh_key(key_size) };
        let mut mr: *mut sys::fid_mr = ptr::null_mut();
        // SAFETY: the domain is open; [addr, addr+len) is memory of this
        // process (VRAM for a VRAM region) that the caller keeps alive
        // while registered.
        let ret =
            unsafe { crate::hmem::mr_reg(shared.domain, &region, len, access, requested, &mut mr) };
        if ret == ENOKEY && !prov_key && attempts < 16 {
            attempts += 1;
            continue;
        }
        if ret != 0 {
            return Err(fi_error(
                ret,
                &format!(
                    "{} of {:#x}+{}",
                    crate::hmem::reg_call(&region),
                    region.addr,
                    region.len
                ),
            ));
        }
        break mr;
    };
    let mut reg = FabricReg {
        mr,
        desc: Desc(ptr::null_mut()),
        key: 0,
        virt_addr: mr_mode & sys::FI_MR_VIRT_ADDR != 0,
        region,
        _shared: shared.clone(),
    };
    if mr_mode & sys::FI_MR_ENDPOINT != 0 {
        // SAFETY: mr and the endpoint are open objects of the same domain.
        let ret = unsafe { sys::kvxfer_fi_mr_bind(mr, shared.ep_fid(), 0) };
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
        reg.desc = Desc(sys::kvxfer_fi_mr_desc(mr));
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

impl Drop for FabricTransport {
    fn drop(&mut self) {
        // Close the endpoint first: libfabric then touches none of the
        // contexts and buffers freed with this value. Registrations still
        // held elsewhere keep the domain open.
        self.shared.close_endpoint();
        // Deferred registrations: no operation is left to use them.
        self.deferred.clear();
        self.shared.close_dropped_regs();
    }
}

impl Transport for FabricTransport {
    type LocalReg = FabricReg;
    type Peer = FabricPeer;
    type RemoteKey = FabricRemoteKey;

    fn name(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> Capabilities {
        let mut c = Capabilities::default();
        c.mem_kinds = self.hmem.mem_kinds();
        c.max_segments = 0;
        c.max_notification = self.config.max_notification.min(u32::MAX as usize) as u32;
        c.can_cancel = false;
        c.may_complete_inline = false;
        c
    }

    fn register(&mut self, region: &Region) -> Result<FabricReg, Error> {
        if region.kind != MemKind::Dram && !self.hmem.native() {
            return Err(Error::UnsupportedMemKind {
                backend: BACKEND,
                kind: region.kind,
            });
        }
        if region.len == 0 || region.end().is_none() || region.addr == 0 {
            return Err(Error::InvalidRegion {
                addr: region.addr,
                len: region.len,
            });
        }
        let access =
            (sys::FI_READ | sys::FI_WRITE | sys::FI_REMOTE_READ | sys::FI_REMOTE_WRITE) as u64;
        register_raw(&self.shared, self.mr_mode, self.key_size, *region, access)
    }

    fn in_use(&mut self, reg: &FabricReg) -> bool {
        let r = reg.region;
        if !self.orphans_touch(r.addr, r.len) {
            return false;
        }
        self.read_cq();
        self.orphans_touch(r.addr, r.len)
    }

    fn deregister(&mut self, reg: FabricReg) {
        let r = reg.region;
        if !self.orphans_touch(r.addr, r.len) {
            drop(reg);
            self.shared.close_dropped_regs();
            return;
        }
        // Operations of timed-out transfers may still touch this memory:
        // wait until the provider reports them (their peers were removed
        // from the address vector, which flushes them where the provider
        // can).
        let start = Instant::now();
        while self.orphans_touch(r.addr, r.len) {
            if start.elapsed() >= self.config.cancel_timeout || self.shared.cq().is_null() {
                log::error!(
                    "LIBFABRIC: provider {}: operations of timed-out transfers on {:#x}+{} \
                     not reported within {:?}; the registration stays open and the provider \
                     may still touch that memory",
                    self.provider,
                    r.addr,
                    r.len,
                    self.config.cancel_timeout
                );
                self.deferred.push(reg);
                return;
            }
            self.read_cq();
            if self.orphans_touch(r.addr, r.len) {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        log::debug!(
            "LIBFABRIC: orphaned operations on {:#x}+{} reported after {:?}",
            r.addr,
            r.len,
            start.elapsed()
        );
        drop(reg);
        self.shared.close_dropped_regs();
    }

    fn pack_key(&self, reg: &FabricReg, out: &mut [u8]) -> Result<usize, Error> {
        let mut packed = [0u8; PACKED_KEY_LEN];
        packed[..8].copy_from_slice(&reg.key.to_le_bytes());
        packed[8] = if reg.virt_addr { KEY_FLAG_VIRT_ADDR } else { 0 };
        copy_into(out, &packed)
    }

    fn local_address(&self, out: &mut [u8]) -> Result<usize, Error> {
        copy_into(out, &self.address)
    }

    fn connect(&mut self, address: &[u8]) -> Result<FabricPeer, Error> {
        let einval = -(sys::FI_EINVAL as i64);
        if address.len() < 2 || address[0] != ADDRESS_VERSION {
            return Err(Error::backend(
                BACKEND,
                einval,
                &format!(
                    "peer address of {} bytes is not a kvxfer libfabric address",
                    address.len()
                ),
            ));
        }
        let plen = address[1] as usize;
        if address.len() <= 2 + plen + 4 {
            return Err(Error::backend(
                BACKEND,
                einval,
                &format!("peer address of {} bytes is truncated", address.len()),
            ));
        }
        let prov = String::from_utf8_lossy(&address[2..2 + plen]);
        if prov != self.provider {
            return Err(Error::backend(
                BACKEND,
                einval,
                &format!("peer uses provider {prov}, this agent {}", self.provider),
            ));
        }
        let mut max_note = [0u8; 4];
        max_note.copy_from_slice(&address[2 + plen..2 + plen + 4]);
        let max_note = u32::from_le_bytes(max_note) as usize;
        let name = &address[2 + plen + 4..];
        let av = self.shared.av();
        let mut fi_addr: sys::fi_addr_t = sys::FI_ADDR_NOTAVAIL;
        // SAFETY: av is open; name is an endpoint name of this provider
        // (checked above) and readable for its length; one address is
        // written into fi_addr.
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
            let code = if ret < 0 { ret as i64 } else { einval };
            return Err(fi_error(code, "fi_av_insert of the peer address"));
        }
        let mut text = [0 as std::ffi::c_char; 128];
        let mut tlen = text.len();
        // SAFETY: av is open; text/tlen describe a writable buffer.
        let p = unsafe {
            sys::kvxfer_fi_av_straddr(av, name.as_ptr().cast(), text.as_mut_ptr(), &mut tlen)
        };
        let label = if p.is_null() {
            format!("fi_addr {fi_addr}")
        } else {
            // SAFETY: fi_av_straddr wrote a NUL-terminated string into text
            // (truncated to its size).
            unsafe { CStr::from_ptr(text.as_ptr()) }
                .to_string_lossy()
                .into_owned()
        };
        let id = self.next_peer_id;
        self.next_peer_id += 1;
        Ok(FabricPeer {
            addr: fi_addr,
            label: bounded(&label),
            id,
            max_note,
        })
    }

    fn disconnect(&mut self, peer: FabricPeer) {
        if let Some(i) = self.given_up.iter().position(|&id| id == peer.id) {
            // Removed from the address vector already. Nothing may refer
            // to the peer once its id is forgotten.
            self.given_up.swap_remove(i);
            for &slot in &self.active {
                let x = &mut self.xfers[slot as usize];
                if x.peer_id == peer.id && x.error.is_none() {
                    x.error = Some(Error::disconnected(""));
                    x.next = x.segs.len();
                }
            }
            let mut kept = VecDeque::with_capacity(self.pending_sends.capacity());
            for p in std::mem::take(&mut self.pending_sends) {
                if p.peer_id == peer.id {
                    self.drop_pending(p, Error::disconnected(""));
                } else {
                    kept.push_back(p);
                }
            }
            self.pending_sends = kept;
            return;
        }
        let av = self.shared.av();
        if av.is_null() {
            return;
        }
        let mut addr = peer.addr;
        // SAFETY: av is open; addr came from fi_av_insert on it.
        let ret = unsafe { sys::kvxfer_fi_av_remove(av, &mut addr, 1, 0) };
        if ret != 0 {
            log::debug!(
                "LIBFABRIC: fi_av_remove({}): {}",
                peer.label,
                strerror(ret as i64)
            );
        }
    }

    fn unpack_key(
        &mut self,
        _peer: &FabricPeer,
        region: &Region,
        key: &[u8],
    ) -> Result<FabricRemoteKey, Error> {
        if key.len() != PACKED_KEY_LEN || key[8] & !KEY_FLAG_VIRT_ADDR != 0 {
            return Err(Error::backend(
                BACKEND,
                -(sys::FI_EINVAL as i64),
                &format!(
                    "packed key of {} bytes for region {:#x}+{}: expected {PACKED_KEY_LEN}",
                    key.len(),
                    region.addr,
                    region.len
                ),
            ));
        }
        let mut k = [0u8; 8];
        k.copy_from_slice(&key[..8]);
        Ok(FabricRemoteKey {
            key: u64::from_le_bytes(k),
            virt_addr: key[8] & KEY_FLAG_VIRT_ADDR != 0,
            kind: region.kind,
        })
    }

    fn local_kind(&self, reg: &FabricReg) -> MemKind {
        reg.region.kind
    }

    fn remote_kind(&self, key: &FabricRemoteKey) -> MemKind {
        key.kind
    }

    fn release_key(&mut self, _key: FabricRemoteKey) {}

    fn post(
        &mut self,
        op: XferOp,
        peer: &FabricPeer,
        segments: Segments<'_, FabricReg, FabricRemoteKey>,
        notification: Option<&[u8]>,
        token: Token,
    ) -> Result<PostStatus, Error> {
        self.check_send(peer, notification.map_or(0, <[u8]>::len))?;
        for (i, s) in segments.iter().enumerate() {
            let ok_local = s.local.region.contains(s.local_addr, s.len);
            let ok_remote = s.remote_addr >= s.remote_region_addr;
            if s.len == 0 || !ok_local || !ok_remote || usize::try_from(s.len).is_err() {
                return Err(Error::backend(
                    BACKEND,
                    -(sys::FI_EINVAL as i64),
                    &format!(
                        "segment {i}: local {:#x}+{} remote {:#x} is outside its registrations",
                        s.local_addr, s.len, s.remote_addr
                    ),
                ));
            }
        }
        let Some(slot) = self.free_xfers.pop() else {
            return Err(Error::CapacityExceeded {
                what: "transfers",
                capacity: self.config.max_transfers as u32,
                setting: "",
            });
        };
        let max_msg = self.max_msg;
        let x = &mut self.xfers[slot as usize];
        x.gen = x.gen.wrapping_add(1);
        x.live = true;
        x.token = token;
        x.op = op;
        x.peer = peer.addr;
        x.peer_id = peer.id;
        x.peer_label = peer.label.clone();
        x.segs.clear();
        x.next = 0;
        x.outstanding = 0;
        x.error = None;
        x.notif.clear();
        x.has_notif = notification.is_some();
        x.notif_sent = false;
        if let Some(n) = notification {
            x.notif.extend_from_slice(n);
        }
        x.started = Instant::now();
        for s in segments {
            let base = if s.remote.virt_addr {
                s.remote_addr
            } else {
                s.remote_addr - s.remote_region_addr
            };
            let mut off = 0u64;
            while off < s.len {
                let len = (s.len - off).min(max_msg);
                x.segs.push(SegOp {
                    local: s.local_addr + off,
                    len,
                    desc: s.local.desc,
                    remote: base + off,
                    key: s.remote.key,
                });
                off += len;
            }
        }
        self.active.push(slot);
        if let Err(e) = self.issue(slot) {
            if self.xfers[slot as usize].outstanding == 0 {
                // Nothing reached the provider: refuse the post outright.
                let idx = self
                    .active
                    .iter()
                    .position(|&s| s == slot)
                    .expect("just pushed");
                self.active.swap_remove(idx);
                let x = &mut self.xfers[slot as usize];
                x.live = false;
                x.error = None;
                x.segs.clear();
                self.free_xfers.push(slot);
                return Err(e);
            }
        }
        Ok(PostStatus::InProgress)
    }

    fn poll(&mut self) -> Option<Completion> {
        if let Some(c) = self.done.pop_front() {
            return Some(c);
        }
        self.shared.close_dropped_regs();
        self.read_cq();
        if let Err(e) = self.post_receives() {
            log::warn!("LIBFABRIC: re-posting notification buffers failed: {e}");
        }
        self.flush_pending_sends();
        self.advance();
        if !self.deferred.is_empty() {
            self.release_deferred();
        }
        self.done.pop_front()
    }

    /// Sleeps on the completion queue's wait descriptor when nothing is in
    /// flight or queued and `fi_trywait` allows it.
    fn arm(&mut self) -> kvxfer_core::Wake {
        use kvxfer_core::Wake;
        if self.shared.wait_fd < 0 {
            return Wake::Unsupported;
        }
        if !self.done.is_empty()
            || !self.active.is_empty()
            || !self.pending_sends.is_empty()
            || !self.ready.is_empty()
        {
            return Wake::Busy;
        }
        if self.shared.try_wait() {
            Wake::Armed(self.shared.wait_fd)
        } else {
            Wake::Busy
        }
    }

    fn cancel(&mut self, _token: Token) -> Result<(), Error> {
        Err(Error::Unsupported {
            backend: BACKEND,
            what: "cancel",
        })
    }

    /// Orphans the transfer's operations and gives its peer up (libfabric
    /// cannot stop an RMA operation otherwise); the completion it then
    /// reports carries `RemoteDisconnected`.
    fn abandon(&mut self, token: Token) -> Result<(), Error> {
        let Some(&slot) = self
            .active
            .iter()
            .find(|&&s| self.xfers[s as usize].token == token)
        else {
            return Err(Error::Unsupported {
                backend: BACKEND,
                what: "abandoning a transfer that is not in flight",
            });
        };
        let peer = self.xfers[slot as usize].peer_label.clone();
        self.abandon_slot(
            slot,
            Error::disconnected(&peer),
            "was abandoned (peer unreachable)",
        );
        Ok(())
    }

    fn send_notification(&mut self, peer: &FabricPeer, msg: &[u8]) -> Result<(), Error> {
        self.check_send(peer, msg.len())?;
        if self.free_sends.is_empty() {
            self.read_cq();
        }
        let Some(buf) = self.free_sends.pop() else {
            return Err(Error::CapacityExceeded {
                what: "notifications",
                capacity: self.send.mem.len() as u32 / self.send.slot as u32,
                setting: "",
            });
        };
        self.copy_to_send_buf(buf, msg);
        let pending = PendingSend {
            peer: peer.addr,
            peer_id: peer.id,
            buf,
            len: msg.len(),
            xfer: None,
        };
        // Keep the order of notifications to the same peer: behind any
        // queued one.
        let queued = !self.pending_sends.is_empty();
        let sent = if queued {
            Ok(false)
        } else {
            self.try_send(peer.addr, buf, msg.len(), pending.op_kind())
        };
        match sent {
            Ok(true) => Ok(()),
            Ok(false) => {
                self.pending_sends.push_back(pending);
                if queued {
                    self.flush_pending_sends();
                }
                Ok(())
            }
            Err(e) => {
                self.free_sends.push(buf);
                Err(e)
            }
        }
    }

    fn poll_notification(&mut self, buf: &mut [u8]) -> Option<Result<usize, Error>> {
        if self.ready.is_empty() {
            self.read_cq();
        }
        if self.lost_notes > 0 {
            let count = std::mem::take(&mut self.lost_notes);
            return Some(Err(Error::NotificationDropped { len: 0, count }));
        }
        let &(b, len) = self.ready.front()?;
        if len > buf.len() {
            return Some(Err(Error::BufferTooSmall {
                needed: len as u64,
                available: buf.len() as u64,
            }));
        }
        // SAFETY: buffer b has completed its receive and is not posted;
        // len <= slot size.
        unsafe { ptr::copy_nonoverlapping(self.recv.ptr(b), buf.as_mut_ptr(), len) };
        self.ready.pop_front();
        self.repost.push(b);
        if let Err(e) = self.post_receives() {
            log::warn!("LIBFABRIC: re-posting a notification buffer failed: {e}");
        }
        Some(Ok(len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A notification longer than the receiver accepts is refused by the
    /// sender (the receiver's limit travels in its address), so it is
    /// never cut and lost there.
    #[test]
    fn a_notification_longer_than_the_receiver_takes_is_refused_when_sent() {
        let cfg = FabricConfig::default().with_provider("tcp;ofi_rxm");
        let small = FabricConfig {
            max_notification: 256,
            ..cfg.clone()
        };
        let mut rx = FabricTransport::new(&small).expect("receiver");
        let mut tx = FabricTransport::new(&cfg).expect("sender");
        let address = rx.address.clone();
        let peer = tx.connect(&address).expect("connect");
        assert_eq!(
            tx.send_notification(&peer, &[7u8; 257]),
            Err(Error::NotificationTooLong { len: 257, max: 256 })
        );
        tx.send_notification(&peer, &[7u8; 256]).expect("256 bytes");
        let mut buf = [0u8; 4096];
        let deadline = Instant::now() + Duration::from_secs(10);
        let got = loop {
            let _ = tx.poll();
            match rx.poll_notification(&mut buf) {
                Some(r) => break r,
                None => assert!(Instant::now() < deadline, "nothing arrived"),
            }
        };
        assert_eq!(got, Ok(256));
        assert_eq!(rx.lost_notes, 0);
    }

    /// A transfer whose notification send is still with the provider when
    /// it times out: the send buffer must come back when that send
    /// completes, or the pool drains one buffer per such timeout.
    #[test]
    fn a_timed_out_notification_send_gives_its_buffer_back() {
        let cfg = FabricConfig::default().with_provider("tcp;ofi_rxm");
        let mut t = FabricTransport::new(&cfg).expect("tcp;ofi_rxm transport");
        let sends = t.free_sends.len();
        // A real peer (this endpoint itself): the timeout removes it from
        // the address vector.
        let address = t.address.clone();
        let peer = t.connect(&address).expect("connect to itself");
        let slot = t.free_xfers.pop().unwrap();
        let gen = {
            let x = &mut t.xfers[slot as usize];
            x.peer = peer.addr;
            x.peer_id = peer.id;
            x.gen = x.gen.wrapping_add(1);
            x.live = true;
            x.token = Token(7);
            x.has_notif = true;
            x.notif_sent = true;
            x.outstanding = 1;
            x.gen
        };
        t.active.push(slot);
        let buf = t.free_sends.pop().unwrap();
        let op = t
            .alloc_op(OpKind::XferNotif {
                xfer: slot,
                gen,
                buf,
            })
            .unwrap();
        t.time_out(slot, 1);
        assert_eq!(
            t.poll().map(|c| (c.token, c.result)),
            Some((Token(7), Err(Error::TimedOut { after_ms: 1 })))
        );
        assert_eq!(t.free_sends.len(), sends - 1, "still with the provider");
        // The provider reports the orphaned send at last.
        let ctx = t.ctx_ptr(op);
        t.on_completion(ctx, 0, None);
        assert_eq!(t.ops[op as usize], OpKind::Free);
        assert_eq!(t.free_sends.len(), sends, "the send buffer is back");
        t.disconnect(peer);
    }

    /// A transport connected to itself, over tcp;ofi_rxm, with the
    /// connection set up by a first notification.
    fn self_connected() -> (FabricTransport, FabricPeer) {
        let cfg = FabricConfig::default().with_provider("tcp;ofi_rxm");
        let mut t = FabricTransport::new(&cfg).expect("tcp;ofi_rxm transport");
        let address = t.address.clone();
        let peer = t.connect(&address).expect("connect to itself");
        t.send_notification(&peer, b"hello").unwrap();
        assert_eq!(collect(&mut t, 1, 0).0, [b"hello"]);
        (t, peer)
    }

    /// Makes a transfer to `peer` whose data has been delivered and whose
    /// notification `notif` is still to be issued (by the next `poll`).
    fn data_delivered(t: &mut FabricTransport, peer: &FabricPeer, token: Token, notif: &[u8]) {
        let slot = t.free_xfers.pop().unwrap();
        let x = &mut t.xfers[slot as usize];
        x.peer = peer.addr;
        x.peer_id = peer.id;
        x.gen = x.gen.wrapping_add(1);
        x.live = true;
        x.token = token;
        x.started = Instant::now();
        x.notif = notif.to_vec();
        x.has_notif = true;
        x.notif_sent = false;
        t.active.push(slot);
    }

    /// Polls until `notifs` notifications and `completions` completions
    /// arrived (5 s at most); returns them in arrival order.
    fn collect(
        t: &mut FabricTransport,
        notifs: usize,
        completions: usize,
    ) -> (Vec<Vec<u8>>, Vec<Completion>) {
        let deadline = Instant::now() + Duration::from_secs(5);
        let (mut got, mut done) = (Vec::new(), Vec::new());
        let mut buf = [0u8; 64];
        while got.len() < notifs || done.len() < completions {
            assert!(
                Instant::now() < deadline,
                "timed out with notifications {got:?} and completions {done:?}"
            );
            if let Some(c) = t.poll() {
                done.push(c);
            }
            while let Some(n) = t.poll_notification(&mut buf) {
                got.push(buf[..n.expect("notification")].to_vec());
            }
        }
        (got, done)
    }

    /// A standalone notification the provider refused (the operation pool
    /// was empty, as under FI_EAGAIN) is still queued when a transfer's
    /// data is delivered: the transfer's notification is queued behind it,
    /// and one issued after goes after both.
    #[test]
    fn a_transfer_notification_does_not_overtake_a_queued_one() {
        let (mut t, peer) = self_connected();
        let sends = t.free_sends.len();
        let ops = std::mem::take(&mut t.free_ops);
        t.send_notification(&peer, b"first").unwrap();
        assert_eq!(t.pending_sends.len(), 1);
        // The provider could take a send again, but "first" is still
        // queued when the transfer's data is found delivered.
        t.free_ops = ops;
        data_delivered(&mut t, &peer, Token(7), b"transfer");
        t.advance();
        assert_eq!(t.pending_sends.len(), 2, "queued behind the first");
        t.send_notification(&peer, b"last").unwrap();
        let (got, done) = collect(&mut t, 3, 1);
        assert_eq!(got, [&b"first"[..], b"transfer", b"last"]);
        assert_eq!(
            done.into_iter()
                .map(|c| (c.token, c.result))
                .collect::<Vec<_>>(),
            [(Token(7), Ok(()))]
        );
        assert!(t.pending_sends.is_empty());
        assert_eq!(t.free_sends.len(), sends);
        t.disconnect(peer);
    }

    /// A transfer's notification refused by the provider is queued, so a
    /// standalone notification issued after it cannot overtake it; the
    /// transfer completes only once it is sent.
    #[test]
    fn a_refused_transfer_notification_keeps_its_place() {
        let (mut t, peer) = self_connected();
        let ops = std::mem::take(&mut t.free_ops);
        data_delivered(&mut t, &peer, Token(9), b"transfer");
        assert!(t.poll().is_none());
        assert_eq!(t.pending_sends.len(), 1, "queued on pushback");
        t.send_notification(&peer, b"after").unwrap();
        for _ in 0..10 {
            assert!(t.poll().is_none(), "complete before its notification left");
        }
        t.free_ops = ops;
        let (got, done) = collect(&mut t, 2, 1);
        assert_eq!(got, [&b"transfer"[..], b"after"]);
        assert_eq!(done[0].token, Token(9));
        assert_eq!(done[0].result, Ok(()));
        t.disconnect(peer);
    }

    /// A transfer timing out with its notification still queued: the
    /// notification is never sent and its buffer comes back.
    #[test]
    fn a_timed_out_transfer_drops_its_queued_notification() {
        let (mut t, peer) = self_connected();
        let sends = t.free_sends.len();
        let ops = std::mem::take(&mut t.free_ops);
        data_delivered(&mut t, &peer, Token(11), b"transfer");
        assert!(t.poll().is_none());
        assert_eq!(t.pending_sends.len(), 1);
        assert_eq!(t.free_sends.len(), sends - 1);
        let slot = t.active[0];
        t.time_out(slot, 1);
        assert!(t.pending_sends.is_empty());
        assert_eq!(t.free_sends.len(), sends);
        t.free_ops = ops;
        assert_eq!(
            t.poll().map(|c| (c.token, c.result)),
            Some((Token(11), Err(Error::TimedOut { after_ms: 1 })))
        );
        let mut buf = [0u8; 64];
        let deadline = Instant::now() + Duration::from_millis(200);
        while Instant::now() < deadline {
            t.poll();
            assert!(t.poll_notification(&mut buf).is_none(), "it was sent");
        }
        t.disconnect(peer);
    }
}

#[cfg(test)]
mod setup_tests {
    use super::*;

    #[test]
    fn operations_the_provider_cancelled_mean_the_peer_is_gone() {
        let x = Xfer::empty();
        let ecanceled = -(sys::FI_ECANCELED as i32);
        for (errno, prov_errno) in [
            (ecanceled, libc::ENOENT),
            (ecanceled, 0),
            (-(sys::FI_ENOTCONN as i32), 0),
            (-(sys::FI_EIO as i32), libc::ECONNRESET),
        ] {
            assert_eq!(
                FabricTransport::xfer_error(&x, errno, prov_errno, true, "t"),
                Error::disconnected(""),
                "{errno} {prov_errno}"
            );
        }
        assert_eq!(
            FabricTransport::xfer_error(&x, -(sys::FI_EIO as i32), libc::ECONNRESET, false, "t"),
            Error::backend(BACKEND, -(sys::FI_EIO as i64), "WRITE t")
        );
    }

    /// A registration dropped on another thread is not closed there (the
    /// domain takes no call concurrent with the transport's): the
    /// transport closes it on its next call.
    #[test]
    fn a_registration_dropped_elsewhere_is_closed_by_the_transport() {
        let cfg = FabricConfig::default().with_provider("tcp;ofi_rxm");
        let mut t = FabricTransport::new(&cfg).expect("transport");
        let buf = vec![0u8; 4096];
        let reg = t
            .register(&Region::dram(buf.as_ptr() as u64, 4096))
            .expect("register");
        std::thread::spawn(move || drop(reg)).join().unwrap();
        assert_eq!(t.shared.dropped_regs(), 1);
        assert!(t.poll().is_none());
        assert_eq!(t.shared.dropped_regs(), 0);
        // Deregistration closes at once.
        let reg = t
            .register(&Region::dram(buf.as_ptr() as u64, 4096))
            .expect("register");
        t.deregister(reg);
        assert_eq!(t.shared.dropped_regs(), 0);
    }

    /// More receive buffers than the provider's receive queue holds, and no
    /// transfer deadline: on libfabric 1.x, rxm answers FI_EAGAIN past its
    /// 2048 entries and `new` gives up after its own bound. libfabric 2.x's
    /// rxm grows its queue (as do its shm, sockets and tcp): all are
    /// posted.
    #[test]
    fn more_receive_buffers_than_the_queue_holds() {
        let mut cfg = FabricConfig::default()
            .with_provider("tcp;ofi_rxm")
            .with_op_timeout(Duration::MAX);
        cfg.notification_buffers = 100_000;
        cfg.max_notification = 16;
        let start = Instant::now();
        let r = FabricTransport::new(&cfg);
        let took = start.elapsed();
        if cfg!(libfabric_v2) {
            let t = r.expect("libfabric 2.x takes 100000 receive buffers");
            assert_eq!(t.provider_name(), "tcp;ofi_rxm");
            return;
        }
        match r {
            Err(Error::Backend {
                backend,
                code,
                text,
            }) => {
                assert_eq!(backend, BACKEND);
                assert_eq!(code, EAGAIN);
                assert!(text.contains("provider tcp;ofi_rxm: fi_recv"), "{text}");
                assert!(text.contains("of 100000 notification buffers"), "{text}");
            }
            other => panic!("gave {:?}", other.map(|t| t.provider_name().to_owned())),
        }
        assert!(
            took >= RECV_SETUP_TIMEOUT && took < RECV_SETUP_TIMEOUT * 2,
            "{took:?}"
        );
    }
}
