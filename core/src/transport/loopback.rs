//! An in-memory transport for the core's own tests and benches.
//!
//! Several [`Loopback`] agents share one [`LoopbackMemory`]: a byte arena
//! standing for the address space `[base, base + N)` plus a mailbox for
//! notifications. Each agent registers regions inside the arena; a transfer
//! copies bytes between the agents' regions in the arena, so data really
//! moves and tests compare it. The copy happens at post time; the
//! completion (and the transfer's notification, after the data) comes on a
//! later [`poll`](Transport::poll), so the in-progress path is exercised,
//! unless the capabilities ask for inline completion. It is a test double,
//! not a backend users can select: its name is "LOOPBACK".

use crate::error::Error;
use crate::mem::{MemKinds, Region};
use crate::transport::{Capabilities, Completion, PostStatus, Segments, Token, Transport, XferOp};

/// Longest message the mailbox carries.
pub const MAIL_CAP: usize = 256;
/// Messages the mailbox holds.
pub const MAILBOX_CAP: usize = 32;
/// Transfers one loopback agent keeps in flight.
pub const PENDING_CAP: usize = 64;
/// Bytes of a packed loopback key.
pub const KEY_LEN: usize = 20;

const NAME: &str = "LOOPBACK";

fn fail(code: i64, text: &str) -> Error {
    Error::backend(NAME, code, text)
}

#[derive(Debug)]
struct Mail {
    to: u32,
    data: heapless::Vec<u8, MAIL_CAP>,
}

impl Mail {
    /// A copy of `msg` for agent `to`, if it fits [`MAIL_CAP`].
    fn new(to: u32, msg: &[u8]) -> Result<Mail, Error> {
        let data = heapless::Vec::from_slice(msg).map_err(|_| Error::NotificationTooLong {
            len: msg.len() as u64,
            max: MAIL_CAP as u64,
        })?;
        Ok(Mail { to, data })
    }
}

/// The address space `[base, base + N)` shared by loopback agents, and
/// their mailbox.
#[derive(Debug)]
pub struct LoopbackMemory<const N: usize> {
    base: u64,
    bytes: spin::Mutex<[u8; N]>,
    mailbox: spin::Mutex<heapless::Vec<Mail, MAILBOX_CAP>>,
}

impl<const N: usize> LoopbackMemory<N> {
    /// A zeroed arena standing for addresses `[base, base + N)`.
    pub const fn new(base: u64) -> Self {
        LoopbackMemory {
            base,
            bytes: spin::Mutex::new([0; N]),
            mailbox: spin::Mutex::new(heapless::Vec::new()),
        }
    }

    /// First address of the arena.
    pub const fn base(&self) -> u64 {
        self.base
    }

    /// The arena offsets of `[addr, addr + len)`, if it lies in the arena.
    fn span(&self, addr: u64, len: u64) -> Option<core::ops::Range<usize>> {
        let off = addr.checked_sub(self.base)?;
        let end = off.checked_add(len)?;
        if end > N as u64 {
            return None;
        }
        Some(usize::try_from(off).ok()?..usize::try_from(end).ok()?)
    }

    /// Copies `data` into the arena at `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), Error> {
        let span = self
            .span(addr, data.len() as u64)
            .ok_or(Error::NotRegistered {
                addr,
                len: data.len() as u64,
            })?;
        self.bytes.lock()[span].copy_from_slice(data);
        Ok(())
    }

    /// Copies the arena's bytes at `addr` into `out`.
    pub fn read(&self, addr: u64, out: &mut [u8]) -> Result<(), Error> {
        let span = self
            .span(addr, out.len() as u64)
            .ok_or(Error::NotRegistered {
                addr,
                len: out.len() as u64,
            })?;
        out.copy_from_slice(&self.bytes.lock()[span]);
        Ok(())
    }

    /// Puts `mail` in the mailbox.
    fn deliver(&self, mail: Mail) -> Result<(), Error> {
        self.mailbox
            .lock()
            .push(mail)
            .map_err(|_| Error::CapacityExceeded {
                what: "notifications",
                capacity: MAILBOX_CAP as u32,
                setting: "",
            })
    }
}

/// A connection to another loopback agent.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct LoopbackPeer {
    /// The peer's id.
    pub id: u32,
}

#[derive(Debug)]
struct Pending {
    token: Token,
    notify: Option<Mail>,
}

/// One agent's in-memory transport over a shared [`LoopbackMemory`].
#[derive(Debug)]
pub struct Loopback<'m, const N: usize> {
    mem: &'m LoopbackMemory<N>,
    id: u32,
    caps: Capabilities,
    pending: heapless::Vec<Pending, PENDING_CAP>,
    posts: u64,
}

impl<'m, const N: usize> Loopback<'m, N> {
    /// Agent `id` over `mem`. It moves DRAM and VRAM (both are arena
    /// bytes), can cancel, and completes on a later poll.
    pub fn new(mem: &'m LoopbackMemory<N>, id: u32) -> Self {
        let caps = Capabilities {
            mem_kinds: MemKinds::DRAM_VRAM,
            max_notification: MAIL_CAP as u32,
            can_cancel: true,
            may_complete_inline: false,
            ..Capabilities::default()
        };
        Loopback {
            mem,
            id,
            caps,
            pending: heapless::Vec::new(),
            posts: 0,
        }
    }

    /// Replaces the capabilities: memory kinds accepted, cancel support,
    /// inline completion (`may_complete_inline` makes every post `Done`),
    /// segment and notification limits.
    pub fn set_capabilities(&mut self, caps: Capabilities) {
        self.caps = caps;
    }

    /// The shared memory.
    pub fn memory(&self) -> &'m LoopbackMemory<N> {
        self.mem
    }

    /// Transfers posted and not yet reported.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// Posts accepted so far.
    pub fn posts(&self) -> u64 {
        self.posts
    }
}

impl<const N: usize> Transport for Loopback<'_, N> {
    type LocalReg = Region;
    type Peer = LoopbackPeer;
    type RemoteKey = Region;

    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        self.caps.clone()
    }

    fn register(&mut self, region: &Region) -> Result<Region, Error> {
        if !self.caps.mem_kinds.contains(region.kind) {
            return Err(Error::UnsupportedMemKind {
                backend: NAME,
                kind: region.kind,
            });
        }
        self.mem
            .span(region.addr, region.len)
            .ok_or_else(|| fail(-1, "region lies outside the loopback arena"))?;
        Ok(*region)
    }

    fn deregister(&mut self, _reg: Region) {}

    fn pack_key(&self, reg: &Region, out: &mut [u8]) -> Result<usize, Error> {
        let available = out.len() as u64;
        let out = out.get_mut(..KEY_LEN).ok_or(Error::BufferTooSmall {
            needed: KEY_LEN as u64,
            available,
        })?;
        out[..4].copy_from_slice(&self.id.to_le_bytes());
        out[4..12].copy_from_slice(&reg.addr.to_le_bytes());
        out[12..20].copy_from_slice(&reg.len.to_le_bytes());
        Ok(KEY_LEN)
    }

    fn local_address(&self, out: &mut [u8]) -> Result<usize, Error> {
        crate::wire::copy_into(out, &self.id.to_le_bytes())
    }

    fn connect(&mut self, address: &[u8]) -> Result<LoopbackPeer, Error> {
        let id: [u8; 4] = address
            .try_into()
            .map_err(|_| fail(-2, "loopback address must be 4 bytes"))?;
        Ok(LoopbackPeer {
            id: u32::from_le_bytes(id),
        })
    }

    fn disconnect(&mut self, _peer: LoopbackPeer) {}

    fn unpack_key(
        &mut self,
        peer: &LoopbackPeer,
        region: &Region,
        key: &[u8],
    ) -> Result<Region, Error> {
        let ok = key.len() == KEY_LEN
            && key[..4] == peer.id.to_le_bytes()
            && key[4..12] == region.addr.to_le_bytes()
            && key[12..20] == region.len.to_le_bytes();
        if !ok {
            return Err(fail(-3, "remote key does not match the peer's region"));
        }
        Ok(*region)
    }

    fn release_key(&mut self, _key: Region) {}

    fn post(
        &mut self,
        op: XferOp,
        peer: &LoopbackPeer,
        segments: Segments<'_, Region, Region>,
        notification: Option<&[u8]>,
        token: Token,
    ) -> Result<PostStatus, Error> {
        if self.caps.max_segments != 0 && segments.len() > self.caps.max_segments as usize {
            return Err(Error::CapacityExceeded {
                what: "segments",
                capacity: self.caps.max_segments,
                setting: "",
            });
        }
        let notify = notification.map(|n| Mail::new(peer.id, n)).transpose()?;
        let inline = self.caps.may_complete_inline;
        if !inline && self.pending.is_full() {
            return Err(Error::CapacityExceeded {
                what: "loopback transfers",
                capacity: PENDING_CAP as u32,
                setting: "",
            });
        }
        // Check every segment before moving a byte.
        for s in segments {
            if !s.local.contains(s.local_addr, s.len) {
                return Err(fail(-4, "segment leaves its local registration"));
            }
            if !s.remote.contains(s.remote_addr, s.len) {
                return Err(fail(-5, "segment leaves its remote region"));
            }
            self.mem
                .span(s.local_addr, s.len)
                .ok_or_else(|| fail(-6, "local segment outside the arena"))?;
            self.mem
                .span(s.remote_addr, s.len)
                .ok_or_else(|| fail(-6, "remote segment outside the arena"))?;
        }
        {
            let mut bytes = self.mem.bytes.lock();
            for s in segments {
                let (src, dst) = match op {
                    XferOp::Write => (s.local_addr, s.remote_addr),
                    XferOp::Read => (s.remote_addr, s.local_addr),
                };
                if let (Some(from), Some(to)) =
                    (self.mem.span(src, s.len), self.mem.span(dst, s.len))
                {
                    bytes.copy_within(from, to.start);
                }
            }
        }
        self.posts += 1;
        if inline {
            if let Some(m) = notify {
                self.mem.deliver(m)?;
            }
            return Ok(PostStatus::Done);
        }
        // Room was checked above.
        let _ = self.pending.push(Pending { token, notify });
        Ok(PostStatus::InProgress)
    }

    fn poll(&mut self) -> Option<Completion> {
        if self.pending.is_empty() {
            return None;
        }
        let p = self.pending.remove(0);
        let result = match p.notify {
            Some(m) => self.mem.deliver(m),
            None => Ok(()),
        };
        Some(Completion {
            token: p.token,
            result,
        })
    }

    fn cancel(&mut self, token: Token) -> Result<(), Error> {
        if !self.caps.can_cancel {
            return Err(Error::Unsupported {
                backend: NAME,
                what: "cancel",
            });
        }
        let i = self
            .pending
            .iter()
            .position(|p| p.token == token)
            .ok_or_else(|| fail(-7, "no transfer with this token is in flight"))?;
        self.pending.remove(i);
        Ok(())
    }

    fn send_notification(&mut self, peer: &LoopbackPeer, msg: &[u8]) -> Result<(), Error> {
        self.mem.deliver(Mail::new(peer.id, msg)?)
    }

    fn poll_notification(&mut self, buf: &mut [u8]) -> Option<Result<usize, Error>> {
        let mut mailbox = self.mem.mailbox.lock();
        let i = mailbox.iter().position(|m| m.to == self.id)?;
        let len = mailbox[i].data.len();
        let Some(dst) = buf.get_mut(..len) else {
            return Some(Err(Error::BufferTooSmall {
                needed: len as u64,
                available: buf.len() as u64,
            }));
        };
        dst.copy_from_slice(&mailbox[i].data);
        mailbox.remove(i);
        Some(Ok(len))
    }
}
