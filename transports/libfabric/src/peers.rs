//! Peers: transport addresses, the address vector, packed keys, and
//! peers given up on.

use std::collections::VecDeque;

use kvxfer_core::error::{bounded, Name};
use kvxfer_core::wire::copy_into;
use kvxfer_core::{Error, MemKind, Region};
use libfabric_sys as sys;

use crate::fabric::{fi_error, strerror};
use crate::xfer::OpKind;
use crate::{FabricReg, FabricTransport, BACKEND};

/// Length of a packed remote key: the 64-bit key and a flags byte.
pub(crate) const PACKED_KEY_LEN: usize = 9;
/// Flag in a packed key: the region is addressed by virtual address.
const KEY_FLAG_VIRT_ADDR: u8 = 1;
/// Version byte leading a transport address: `[version][provider length]
/// [provider][longest notification accepted, u32 LE][endpoint name]`.
pub(crate) const ADDRESS_VERSION: u8 = 2;

/// A peer inserted into the address vector.
#[derive(Debug)]
pub struct FabricPeer {
    pub(crate) addr: sys::fi_addr_t,
    pub(crate) label: Name,
    /// Unique in this transport: an address-vector slot may be reused by
    /// a later `connect` once this peer was removed from it.
    pub(crate) id: u64,
    /// The longest notification the peer accepts.
    pub(crate) max_note: usize,
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
    pub(crate) key: u64,
    pub(crate) virt_addr: bool,
    /// The kind of the peer's region (VRAM only with `FI_HMEM`).
    pub(crate) kind: MemKind,
}

/// The transport address of an endpoint named `name` on `provider` that
/// accepts notifications of up to `max_note` bytes.
pub(crate) fn encode_address(provider: &str, max_note: usize, name: &[u8]) -> Vec<u8> {
    let mut address = Vec::with_capacity(2 + provider.len() + 4 + name.len());
    address.push(ADDRESS_VERSION);
    address.push(provider.len().min(255) as u8);
    address.extend_from_slice(&provider.as_bytes()[..provider.len().min(255)]);
    let max_note = u32::try_from(max_note).unwrap_or(u32::MAX);
    address.extend_from_slice(&max_note.to_le_bytes());
    address.extend_from_slice(name);
    address
}

/// Packs `reg`'s key for a peer.
pub(crate) fn pack_key(reg: &FabricReg, out: &mut [u8]) -> Result<usize, Error> {
    let mut packed = [0u8; PACKED_KEY_LEN];
    packed[..8].copy_from_slice(&reg.key().to_le_bytes());
    packed[8] = if reg.virt_addr { KEY_FLAG_VIRT_ADDR } else { 0 };
    copy_into(out, &packed)
}

/// Unpacks a peer's key for its `region`.
pub(crate) fn unpack_key(region: &Region, key: &[u8]) -> Result<FabricRemoteKey, Error> {
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

impl FabricTransport {
    /// Gives up on peer `id` at `addr` after a transfer to it was
    /// abandoned or once it is found gone: it is removed from the address
    /// vector ([`remove_addr`](Self::remove_addr)), so that the provider
    /// drops its connection and reports the operations on it. Transfers
    /// and notifications to it fail until it is connected again.
    pub(crate) fn give_up(&mut self, addr: sys::fi_addr_t, id: u64, label: &str) {
        if self.given_up.contains(&id) {
            return;
        }
        self.given_up.push(id);
        // addr came from fi_av_insert and was not removed yet (peer ids
        // are removed at most once, here or in disconnect).
        self.remove_addr(addr, label);
    }

    /// Removes `addr` from the address vector (`fi_av_remove`), which
    /// closes its connection. The caller removes each address it inserted
    /// at most once.
    ///
    /// Over `ofi_rxm` the removal waits for the completion queue to be
    /// empty: at once, or (called while the queue is read) once it is (see
    /// [`process_removals`](Self::process_removals)).
    pub(crate) fn remove_addr(&mut self, addr: sys::fi_addr_t, label: &str) {
        if !self.rxm {
            self.av_remove(addr, label);
            return;
        }
        self.removals.push((addr, bounded(label)));
        self.read_cq();
    }

    fn av_remove(&mut self, addr: sys::fi_addr_t, label: &str) {
        let ret = self.fabric.av_remove(addr);
        if ret != 0 {
            log::warn!("LIBFABRIC: fi_av_remove({label}): {}", strerror(ret as i64));
        }
    }

    /// Makes the removals [`remove_addr`](Self::remove_addr) asked for,
    /// right after the completion queue was found empty.
    ///
    /// `ofi_rxm` (libfabric 1.17 to 2.x) closes the connection of a
    /// removed address (`FI_AV_REMOVE_CLEANUP`) without checking that it
    /// has an endpoint: when rxm keeps a connection record without one
    /// (after its connection request lost a simultaneous connect to the
    /// peer's, until the peer's request arrives, or after opening the
    /// connection failed, e.g. out of file descriptors), `fi_av_remove`
    /// closes a NULL endpoint and the process dies with SIGSEGV. So an
    /// address is removed only on an established connection, which shows
    /// by:
    ///
    /// * an operation of this transport to it not yet reported: rxm posts
    ///   only on established connections, and closing one reports its
    ///   operations at once, so with the queue empty the connection of an
    ///   unreported operation is still open;
    /// * else a 0-byte READ to it that rxm accepts, which it does only on
    ///   an established connection (nothing reaches the provider between
    ///   that and the removal: `FI_THREAD_DOMAIN`, manual progress).
    ///
    /// Otherwise no operation of this transport is on a connection to it
    /// (the READ has started one), and the address stays in the address
    /// vector: libfabric hands its entry out again when it is connected
    /// again, and the endpoint's close releases it. Where rxm refuses the
    /// READ on an established connection (its queues full of its own
    /// messages), that connection stays open.
    pub(crate) fn process_removals(&mut self) {
        for (addr, label) in std::mem::take(&mut self.removals) {
            if self.ops_to(addr) {
                self.av_remove(addr, &label);
                continue;
            }
            let Some(op) = self.alloc_op(OpKind::Probe { peer: addr }) else {
                log::debug!("LIBFABRIC: no operation left to probe {label}; left connected");
                continue;
            };
            let ret = self.fabric.probe(&self.send, addr, self.ctxs.ptr(op));
            if ret != 0 {
                self.free_op(op);
                log::debug!(
                    "LIBFABRIC: {label} not connected ({}); left in the address vector",
                    strerror(ret)
                );
                continue;
            }
            // The probe stays with the provider until the removal reports
            // it (its op is freed then).
            self.av_remove(addr, &label);
        }
    }

    /// Whether an operation of this transport to `addr` is not yet
    /// reported.
    fn ops_to(&self, addr: sys::fi_addr_t) -> bool {
        self.ops.iter().any(|k| match *k {
            OpKind::Orphan { peer, .. } | OpKind::Probe { peer } | OpKind::Notif { peer, .. } => {
                peer == addr
            }
            OpKind::Rma { xfer, .. } | OpKind::XferNotif { xfer, .. } => {
                self.xfers[xfer as usize].peer == addr
            }
            OpKind::Free | OpKind::Recv { .. } => false,
        })
    }

    /// Whether a post or notification with a notification of
    /// `notification_len` bytes may go to `peer`: the notification fits,
    /// the transport is open and the peer was not given up on.
    pub(crate) fn check_send(
        &self,
        peer: &FabricPeer,
        notification_len: usize,
    ) -> Result<(), Error> {
        // Longer than the peer's receive buffers, a message would be cut
        // there and lost (with the provider's connection state after it).
        let max = self.config.max_notification.min(peer.max_note);
        if notification_len > max {
            return Err(Error::NotificationTooLong {
                len: notification_len as u64,
                max: max as u64,
            });
        }
        if !self.fabric.is_open() {
            return Err(Error::ShutDown);
        }
        if self.given_up.contains(&peer.id) {
            return Err(Error::disconnected(""));
        }
        Ok(())
    }

    /// [`Transport::connect`](kvxfer_core::Transport::connect).
    pub(crate) fn connect_peer(&mut self, address: &[u8]) -> Result<FabricPeer, Error> {
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
        // The name is an endpoint name of this provider (checked above).
        let (fi_addr, label) = self
            .fabric
            .av_insert(name)
            .map_err(|code| fi_error(code, "fi_av_insert of the peer address"))?;
        let label = label.unwrap_or_else(|| format!("fi_addr {fi_addr}"));
        // An address still in the address vector (its removal waits) is
        // handed out again, with its connection: removing it now would
        // close that connection under the new peer. The orphaned
        // operations on it are reported when it closes (or with the
        // endpoint); until then their memory stays in use.
        self.removals.retain(|&(a, _)| a != fi_addr);
        let id = self.next_peer_id;
        self.next_peer_id += 1;
        Ok(FabricPeer {
            addr: fi_addr,
            label: bounded(&label),
            id,
            max_note,
        })
    }

    /// [`Transport::disconnect`](kvxfer_core::Transport::disconnect).
    pub(crate) fn disconnect_peer(&mut self, peer: FabricPeer) {
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
        // peer.addr came from fi_av_insert; the peer was not given up on
        // (checked above), so it is removed here for the first time.
        self.remove_addr(peer.addr, &peer.label);
    }
}
