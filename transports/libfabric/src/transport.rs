//! [`FabricTransport`]: its state, construction, and the [`Transport`]
//! implementation, which hands each call to the module of its sub-machine.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use kvxfer_core::error::Name;
use kvxfer_core::wire::copy_into;
use kvxfer_core::{
    Capabilities, Completion, Error, MemKind, PostStatus, Region, Segments, Token, Transport,
    XferOp,
};
use kvxfer_transport_common::Graveyard;
use libfabric_sys as sys;

use crate::fabric::{strerror, CqBatch, FabricObjects, MsgBufs, OpContexts};
use crate::notify::PendingSend;
use crate::peers::{encode_address, FabricPeer, FabricRemoteKey};
use crate::xfer::{OpKind, Xfer};
use crate::{provider_preference, FabricConfig, FabricReg, BACKEND, PROVIDER_ENV};

pub(crate) const EAGAIN: i64 = -(sys::FI_EAGAIN as i64);
pub(crate) const EAVAIL: i64 = -(sys::FI_EAVAIL as i64);

/// Operations the `sockets` provider is given per peer at once: one, so
/// that a message is sent only once the peer has read the previous one.
///
/// libfabric 1.17's `sockets` provider reads a message header only once
/// all of its 24 bytes are in the socket (`MSG_PEEK`). With many
/// operations in flight to a peer kept off the CPU, the peer's receive
/// window closed with part of a header (8 or 16 bytes) in its socket,
/// and did not reopen when the peer had read everything before it: Linux
/// still charged 99-310 KiB of a 134-311 KiB receive buffer for those
/// bytes, less than one loopback segment (48 KiB) stayed free, and the
/// sender, holding the rest, backed off its window probes; the operations
/// never completed. With one operation per peer every header enters an
/// empty receive queue.
pub(crate) const PEER_WINDOW_SOCKETS: u32 = 1;

/// Completion-queue entries read per `fi_cq_read`.
pub(crate) const CQ_BATCH: usize = 64;
/// How long `FabricTransport::new` keeps trying to post the notification
/// receive buffers while the provider asks to retry.
pub(crate) const RECV_SETUP_TIMEOUT: Duration = Duration::from_secs(5);

/// Fails unless `FI_AV_REMOVE_CLEANUP` is on. Without it `tcp;ofi_rxm`
/// keeps the connection to a removed peer, and with it every operation
/// still queued there: an abandoned transfer's memory could be
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

/// The libfabric transport. See the [crate documentation](crate).
///
/// Its state is split by sub-machine: transfers and their operations
/// (`xfer`), notifications (`notify`), peers (`peers`), registrations
/// (`mr`) and completion-queue progress (`progress`).
pub struct FabricTransport {
    pub(crate) fabric: FabricObjects,
    pub(crate) provider: String,
    pub(crate) mr_mode: u32,
    pub(crate) prov_errno_is_errno: bool,
    pub(crate) key_size: usize,
    /// Where VRAM goes ([`crate::hmem`]).
    pub(crate) hmem: crate::hmem::Hmem,
    pub(crate) max_msg: u64,
    pub(crate) address: Vec<u8>,
    pub(crate) config: FabricConfig,
    /// Operation contexts handed to libfabric, by operation index.
    pub(crate) ctxs: OpContexts,
    /// What each operation context belongs to.
    pub(crate) ops: Vec<OpKind>,
    pub(crate) free_ops: Vec<u32>,
    pub(crate) xfers: Vec<Xfer>,
    pub(crate) free_xfers: Vec<u32>,
    /// Slots of the transfers posted and not yet finished.
    pub(crate) active: Vec<u32>,
    /// Finished transfers, not yet reported by `poll`.
    pub(crate) done: VecDeque<Completion>,
    pub(crate) recv: MsgBufs,
    /// The operation of each receive buffer.
    pub(crate) recv_ops: Vec<u32>,
    /// Received notifications (buffer, length), in arrival order.
    pub(crate) ready: VecDeque<(u32, usize)>,
    /// Notifications whose receive failed, not yet reported.
    pub(crate) lost_notes: u64,
    /// Receive buffers to post again.
    pub(crate) repost: Vec<u32>,
    pub(crate) send: MsgBufs,
    pub(crate) free_sends: Vec<u32>,
    pub(crate) pending_sends: VecDeque<PendingSend>,
    pub(crate) cq_entries: CqBatch,
    /// Id of the next peer `connect` makes.
    pub(crate) next_peer_id: u64,
    /// Peers given up on (after an abandon, or found gone): removed from the address
    /// vector, until `disconnect`.
    pub(crate) given_up: Vec<u64>,
    /// Addresses to remove from the address vector once the completion
    /// queue is empty ([`remove_addr`](Self::remove_addr)), with labels.
    pub(crate) removals: Vec<(sys::fi_addr_t, Name)>,
    /// Whether the completion queue is being read (`read_cq`).
    pub(crate) in_read_cq: bool,
    /// Whether the provider is `ofi_rxm` over a core provider.
    pub(crate) rxm: bool,
    /// Registrations whose deregistration timed out waiting for orphaned
    /// operations; closed once those are reported, or after the endpoint
    /// in `Drop`.
    pub(crate) deferred: Graveyard<FabricReg>,
    /// Most operations (RMA and sends) with the provider per peer, where
    /// the provider needs a bound ([`PEER_WINDOW_SOCKETS`]).
    pub(crate) peer_window: Option<u32>,
    /// The peer id each operation counts against in `in_provider` (0: none).
    pub(crate) op_peer: Vec<u64>,
    /// Operations with the provider, by peer id, while `peer_window` is set.
    pub(crate) in_provider: HashMap<u64, u32>,
}

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
    /// receive buffers for 5 s.
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
            match hmem.get_info(p, config.interface.as_deref()) {
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
                    "no usable provider (tried {}{}): {}",
                    tried.join(", "),
                    config
                        .interface
                        .as_deref()
                        .map(|i| format!(" on interface {i}"))
                        .unwrap_or_default(),
                    strerror(last)
                ),
            ));
        };
        let provider = info.provider();
        let attrs = info.attrs();
        let (mr_mode, key_size) = (attrs.mr_mode, attrs.key_size);
        if mr_mode & sys::FI_MR_RAW != 0 {
            return Err(Error::backend(
                BACKEND,
                -(sys::FI_ENOSYS as i64),
                &format!(
                    "provider {provider} requires FI_MR_RAW keys, which kvxfer does not support"
                ),
            ));
        }
        let cq_size = (config.max_ops + config.notification_queue + 64).max(attrs.tx_size);
        let fabric = FabricObjects::open(info, cq_size)?;
        let name = fabric
            .name()
            .map_err(|code| crate::fabric::fi_error(code, "fi_getname"))?;
        let address = encode_address(&provider, config.max_notification, &name);

        let slot = config.max_notification;
        let nrecv = config.notification_queue.max(1);
        let nsend = 64usize;
        let recv = MsgBufs::new(&fabric, mr_mode, key_size, slot, nrecv)?;
        let send = MsgBufs::new(&fabric, mr_mode, key_size, slot, nsend)?;
        let nops = config.max_ops + nrecv + nsend;
        let prov_errno_is_errno = provider.contains("tcp") || provider.contains("sockets");
        let rxm = provider.contains("ofi_rxm");
        let mut t = FabricTransport {
            fabric,
            provider,
            mr_mode,
            prov_errno_is_errno,
            key_size,
            hmem,
            max_msg: attrs.max_msg.max(1),
            address,
            config: config.clone(),
            ctxs: OpContexts::new(nops),
            ops: vec![OpKind::Free; nops],
            free_ops: (0..nops as u32).rev().collect(),
            xfers: (0..config.max_transfers).map(|_| Xfer::empty()).collect(),
            free_xfers: (0..config.max_transfers as u32).rev().collect(),
            active: Vec::with_capacity(config.max_transfers),
            done: VecDeque::with_capacity(config.max_transfers),
            recv,
            recv_ops: Vec::with_capacity(nrecv),
            ready: VecDeque::with_capacity(nrecv),
            lost_notes: 0,
            repost: Vec::with_capacity(nrecv),
            send,
            free_sends: (0..nsend as u32).rev().collect(),
            pending_sends: VecDeque::with_capacity(nsend),
            cq_entries: CqBatch::new(CQ_BATCH),
            next_peer_id: 1,
            given_up: Vec::new(),
            removals: Vec::new(),
            in_read_cq: false,
            rxm,
            deferred: Graveyard::new(),
            peer_window: None,
            op_peer: vec![0; nops],
            in_provider: HashMap::new(),
        };
        if t.provider == "sockets" {
            t.peer_window = Some(PEER_WINDOW_SOCKETS);
        }
        for b in 0..nrecv as u32 {
            let op = t
                .alloc_op(OpKind::Recv { buf: b })
                .expect("the pool holds an op per receive buffer");
            t.recv_ops.push(op);
            t.repost.push(b);
        }
        // Post the receives, progressing the queue if the provider pushes
        // back, for at most RECV_SETUP_TIMEOUT.
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
    /// abandoned transfers referencing them were not reported within
    /// [`FabricConfig::cancel_timeout`], so their memory must stay
    /// allocated (see the [crate documentation](crate#failure)).
    pub fn deferred_deregistrations(&self) -> usize {
        self.deferred.len()
    }
}

impl Drop for FabricTransport {
    fn drop(&mut self) {
        // Close the endpoint first: libfabric then touches none of the
        // contexts and buffers freed with this value. Registrations still
        // held elsewhere keep the domain open.
        self.fabric.close_endpoint();
        // Deferred registrations: no operation is left to use them.
        self.deferred.release_all();
        self.fabric.close_dropped_regs();
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
        self.register_region(region)
    }

    fn in_use(&mut self, reg: &FabricReg) -> bool {
        self.reg_in_use(reg)
    }

    fn deregister(&mut self, reg: FabricReg) {
        self.deregister_region(reg);
    }

    fn pack_key(&self, reg: &FabricReg, out: &mut [u8]) -> Result<usize, Error> {
        crate::peers::pack_key(reg, out)
    }

    fn local_address(&self, out: &mut [u8]) -> Result<usize, Error> {
        copy_into(out, &self.address)
    }

    fn connect(&mut self, address: &[u8]) -> Result<FabricPeer, Error> {
        self.connect_peer(address)
    }

    fn disconnect(&mut self, peer: FabricPeer) {
        self.disconnect_peer(peer);
    }

    fn unpack_key(
        &mut self,
        _peer: &FabricPeer,
        region: &Region,
        key: &[u8],
    ) -> Result<FabricRemoteKey, Error> {
        crate::peers::unpack_key(region, key)
    }

    fn release_key(&mut self, _key: FabricRemoteKey) {}

    fn local_kind(&self, reg: &FabricReg) -> MemKind {
        reg.region.kind
    }

    fn remote_kind(&self, key: &FabricRemoteKey) -> MemKind {
        key.kind
    }

    fn post(
        &mut self,
        op: XferOp,
        peer: &FabricPeer,
        segments: Segments<'_, FabricReg, FabricRemoteKey>,
        notification: Option<&[u8]>,
        token: Token,
    ) -> Result<PostStatus, Error> {
        self.post_xfer(op, peer, segments, notification, token)
    }

    fn poll(&mut self) -> Option<Completion> {
        if let Some(c) = self.done.pop_front() {
            return Some(c);
        }
        self.fabric.close_dropped_regs();
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
        if self.fabric.wait_fd() < 0 {
            return Wake::Unsupported;
        }
        if !self.done.is_empty()
            || !self.active.is_empty()
            || !self.pending_sends.is_empty()
            || !self.ready.is_empty()
        {
            return Wake::Busy;
        }
        if self.fabric.try_wait() {
            Wake::Armed(self.fabric.wait_fd())
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

    /// Called by the engine at the transfer's deadline or when its peer is
    /// unreachable. Orphans the transfer's operations (their memory stays
    /// reported by `in_use` until the provider reports them) and gives its
    /// peer up, since libfabric cannot stop an RMA operation otherwise; the
    /// completion it then reports, which the engine ignores, carries
    /// `RemoteDisconnected`.
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
        self.abandon_slot(slot, Error::disconnected(&peer), "was abandoned");
        Ok(())
    }

    fn send_notification(&mut self, peer: &FabricPeer, msg: &[u8]) -> Result<(), Error> {
        self.send_note(peer, msg)
    }

    fn poll_notification(&mut self, buf: &mut [u8]) -> Option<Result<usize, Error>> {
        self.poll_note(buf)
    }
}
