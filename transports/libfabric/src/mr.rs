//! Memory registration: [`FabricReg`], and registrations kept open while
//! an abandoned operation may still touch their memory.

use std::time::{Duration, Instant};

use kvxfer_core::{Error, MemKind, Region};
use libfabric_sys as sys;

use crate::fabric::MemoryRegion;
use crate::xfer::OpKind;
use crate::{FabricTransport, BACKEND};

/// A registration of local memory with libfabric. Dropping it closes the
/// registration (on the transport's next call); the domain stays open
/// until then.
#[derive(Debug)]
pub struct FabricReg {
    pub(crate) mr: MemoryRegion,
    /// Whether peers address the region by virtual address
    /// (`FI_MR_VIRT_ADDR`) rather than by offset.
    pub(crate) virt_addr: bool,
    pub(crate) region: Region,
}

impl FabricReg {
    /// The memory key peers use for this region.
    pub fn key(&self) -> u64 {
        self.mr.key()
    }

    /// The registered region.
    pub fn region(&self) -> &Region {
        &self.region
    }
}

/// Whether an orphaned operation of `ops` may still touch
/// `[addr, addr+len)`.
fn orphans_touch(ops: &[OpKind], addr: u64, len: u64) -> bool {
    let end = addr.saturating_add(len);
    ops.iter().any(|k| match *k {
        OpKind::Orphan { local, len: l, .. } => {
            l > 0 && local < end && addr < local.saturating_add(l)
        }
        _ => false,
    })
}

impl FabricTransport {
    /// Whether an orphaned operation may still touch `[addr, addr+len)`.
    pub(crate) fn orphans_touch(&self, addr: u64, len: u64) -> bool {
        orphans_touch(&self.ops, addr, len)
    }

    /// Closes the deferred registrations no orphaned operation references
    /// any more.
    pub(crate) fn release_deferred(&mut self) {
        let ops = &self.ops;
        self.deferred.reap(|reg| {
            let r = reg.region;
            if orphans_touch(ops, r.addr, r.len) {
                return false;
            }
            log::info!(
                "LIBFABRIC: deferred deregistration of {:#x}+{} done",
                r.addr,
                r.len
            );
            true
        });
        self.fabric.close_dropped_regs();
    }

    /// [`Transport::register`](kvxfer_core::Transport::register).
    pub(crate) fn register_region(&mut self, region: &Region) -> Result<FabricReg, Error> {
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
        let mr = MemoryRegion::register(
            &self.fabric,
            self.mr_mode,
            self.key_size,
            region.addr,
            region.len,
            access,
            (region.kind == MemKind::Vram).then_some(region.dev),
        )?;
        Ok(FabricReg {
            mr,
            virt_addr: self.mr_mode & sys::FI_MR_VIRT_ADDR != 0,
            region: *region,
        })
    }

    /// [`Transport::in_use`](kvxfer_core::Transport::in_use).
    pub(crate) fn reg_in_use(&mut self, reg: &FabricReg) -> bool {
        let r = reg.region;
        if !self.orphans_touch(r.addr, r.len) {
            return false;
        }
        self.read_cq();
        self.orphans_touch(r.addr, r.len)
    }

    /// [`Transport::deregister`](kvxfer_core::Transport::deregister).
    pub(crate) fn deregister_region(&mut self, reg: FabricReg) {
        let r = reg.region;
        if !self.orphans_touch(r.addr, r.len) {
            drop(reg);
            self.fabric.close_dropped_regs();
            return;
        }
        // Operations of abandoned transfers may still touch this memory:
        // wait until the provider reports them (their peers were removed
        // from the address vector, which flushes them where the provider
        // can).
        let start = Instant::now();
        while self.orphans_touch(r.addr, r.len) {
            if start.elapsed() >= self.config.cancel_timeout || !self.fabric.is_open() {
                log::error!(
                    "LIBFABRIC: provider {}: operations of abandoned transfers on {:#x}+{} \
                     not reported within {:?}; the registration stays open and the provider \
                     may still touch that memory",
                    self.provider,
                    r.addr,
                    r.len,
                    self.config.cancel_timeout
                );
                self.deferred.bury(reg);
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
        self.fabric.close_dropped_regs();
    }
}
