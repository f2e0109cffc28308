//! VRAM registered with the provider itself: `FI_HMEM` with CUDA.
//!
//! Where [`FabricConfig::native_vram`] is on (the agent turns it on when a
//! CUDA driver is present) and [`NATIVE_VRAM_ENV`] is not `0`, the
//! transport first asks the provider for `FI_HMEM` (accepting
//! `FI_MR_HMEM`), and takes the plain endpoint when it is not offered.
//! With `FI_HMEM` granted, [`FabricTransport::probe_native_vram`] registers
//! a few KiB of VRAM (`fi_mr_regattr` with `iface = FI_HMEM_CUDA` and the
//! device id); only when the provider accepts it does the transport report
//! VRAM among its memory kinds and register VRAM itself. Otherwise VRAM
//! stays with the staging layer above it, and
//! [`FabricTransport::vram_reason`] says why.

use kvxfer_core::mem::MemKinds;
use kvxfer_core::Error;
use libfabric_sys as sys;

use crate::fabric::{Info, MemoryRegion};
use crate::{FabricConfig, FabricTransport, BACKEND, NATIVE_VRAM_ENV};

/// Where VRAM of one transport goes, and why.
#[derive(Debug)]
pub(crate) struct Hmem {
    /// `FI_HMEM` was asked for (native VRAM wanted).
    wanted: bool,
    /// The provider granted `FI_HMEM`.
    granted: bool,
    /// A VRAM registration succeeded: VRAM is registered natively.
    native: bool,
    /// Why VRAM takes the path it takes.
    reason: String,
}

impl Hmem {
    /// The choice `config` and [`NATIVE_VRAM_ENV`] make; fails on a value
    /// of the variable other than `0` or `1`.
    pub(crate) fn new(config: &FabricConfig) -> Result<Hmem, Error> {
        let env = std::env::var(NATIVE_VRAM_ENV).ok();
        let off_by_env = match env.as_deref().map(str::trim) {
            None | Some("") | Some("1") => false,
            Some("0") => true,
            Some(other) => {
                return Err(Error::backend(
                    BACKEND,
                    -(sys::FI_EINVAL as i64),
                    &format!("{NATIVE_VRAM_ENV}={other:?}: expected 0 or 1"),
                ))
            }
        };
        let reason = if off_by_env {
            format!("{NATIVE_VRAM_ENV}=0")
        } else if !config.native_vram {
            "no CUDA driver, or native VRAM not asked for (FabricConfig::native_vram)".to_string()
        } else {
            "not probed yet".to_string()
        };
        Ok(Hmem {
            wanted: config.native_vram && !off_by_env,
            granted: false,
            native: false,
            reason,
        })
    }

    /// `fi_getinfo` for provider `prov`: with `FI_HMEM` where wanted and
    /// offered, else without it.
    pub(crate) fn get_info(&mut self, prov: &str, domain: Option<&str>) -> Result<Info, i64> {
        if self.wanted {
            match Info::get_with(prov, domain, sys::FI_HMEM, sys::FI_MR_HMEM) {
                Ok(info) => {
                    self.granted = true;
                    return Ok(info);
                }
                Err(code) => {
                    log::debug!("LIBFABRIC: {prov} does not offer FI_HMEM (code {code})");
                    self.granted = false;
                    self.reason = format!("provider {prov} does not offer FI_HMEM here");
                }
            }
        }
        Info::get_with(prov, domain, 0, 0)
    }

    /// The memory kinds the transport registers.
    pub(crate) fn mem_kinds(&self) -> MemKinds {
        if self.native {
            MemKinds::DRAM_VRAM
        } else {
            MemKinds::DRAM
        }
    }

    /// Whether VRAM is registered natively.
    pub(crate) fn native(&self) -> bool {
        self.native
    }
}

impl FabricTransport {
    /// Whether this transport registers VRAM with the provider itself
    /// (`FI_HMEM_CUDA`, after a successful
    /// [`probe_native_vram`](Self::probe_native_vram)); otherwise it takes
    /// host memory only and VRAM is staged above it.
    pub fn native_vram(&self) -> bool {
        self.hmem.native()
    }

    /// Whether the provider granted `FI_HMEM` (native VRAM was wanted and
    /// is offered): [`probe_native_vram`](Self::probe_native_vram) decides.
    pub fn offers_hmem(&self) -> bool {
        self.hmem.wanted && self.hmem.granted
    }

    /// Why VRAM takes the path it takes ([`native_vram`](Self::native_vram)):
    /// the provider accepted a CUDA registration, does not offer `FI_HMEM`,
    /// refused the probe (with libfabric's reason), or native VRAM was not
    /// asked for.
    pub fn vram_reason(&self) -> &str {
        &self.hmem.reason
    }

    /// Decides whether VRAM is registered natively: where `FI_HMEM` was
    /// granted, registers `[addr, +len)`, VRAM of CUDA device `dev` (the
    /// caller allocated it, a few KiB on GPU 0, and keeps it allocated for
    /// the call, as for [`Transport::register`](kvxfer_core::Transport::register)),
    /// and closes the registration again. VRAM is native from then on only
    /// if the provider accepted it. Returns
    /// [`native_vram`](Self::native_vram).
    pub fn probe_native_vram(&mut self, addr: u64, len: u64, dev: u32) -> bool {
        if !self.offers_hmem() {
            return false;
        }
        self.hmem.native = false;
        let access =
            (sys::FI_READ | sys::FI_WRITE | sys::FI_REMOTE_READ | sys::FI_REMOTE_WRITE) as u64;
        let probe = MemoryRegion::register(
            &self.fabric,
            self.mr_mode,
            self.key_size,
            addr,
            len,
            access,
            Some(dev),
        );
        match probe {
            Ok(reg) => {
                // Closed here: nothing used it.
                drop(reg);
                self.hmem.native = true;
                self.hmem.reason = format!(
                    "provider {} offers FI_HMEM and registered {len} bytes of GPU {dev} with \
                     FI_HMEM_CUDA",
                    self.provider_name()
                );
            }
            Err(e) => {
                self.hmem.reason = format!(
                    "provider {} offers FI_HMEM but refused VRAM (FI_HMEM_CUDA): {e}",
                    self.provider_name()
                );
            }
        }
        log::debug!(
            "LIBFABRIC: VRAM {}: {}",
            if self.hmem.native { "native" } else { "staged" },
            self.hmem.reason
        );
        self.hmem.native
    }
}
