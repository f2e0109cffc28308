//! libfabric transport for kvxfer: `FI_EP_RDM` endpoints with RMA.
//!
//! [`FabricTransport`] implements [`kvxfer_core::Transport`] over one
//! reliable-datagram endpoint. Every segment is one `fi_writemsg` /
//! `fi_readmsg`; WRITEs ask for `FI_DELIVERY_COMPLETE`, so a transfer is
//! reported done only once its bytes are at the target. Notifications are
//! messages (`fi_send`) sent after all of a transfer's data is delivered and
//! received into pre-posted buffers.
//!
//! # Provider
//!
//! [`FabricConfig::provider`] names the provider in libfabric's spelling
//! (`tcp;ofi_rxm`, `shm`, `verbs;ofi_rxm`, `efa`, `sockets`). When it is
//! `None`, the environment variable `KVXFER_LIBFABRIC_PROVIDER` is used, and
//! when that is unset too, the first usable provider of
//! [`provider_preference`]: `efa`, `verbs;ofi_rxm`, `tcp;ofi_rxm`, `shm`,
//! `sockets`; on libfabric 2.x the native `tcp` is listed last (see
//! [`PROVIDER_PREFERENCE_V2`]; on 1.x the name `tcp` selects `tcp;ofi_rxm`).
//!
//! # libfabric versions
//!
//! Built and tested against libfabric 1.17 to 2.1. `fi_getinfo` asks for
//! the newest API version both the headers and the library offer (falling
//! back to 1.9). On 2.x: the control progress model is ignored (the data
//! model, `progress`, is honoured), rxm grows its receive queue instead of
//! refusing buffers past its size, and `tcp` gives `FI_EP_RDM` itself; the
//! `mr_mode` bits and `FI_DELIVERY_COMPLETE` behave as on 1.x.
//!
//! # Memory registration
//!
//! Every `mr_mode` bit a provider may ask for is honoured except
//! `FI_MR_RAW`, `FI_MR_HMEM`, `FI_MR_MMU_NOTIFY` and `FI_MR_RMA_EVENT`
//! (providers requiring those are not selected): `FI_MR_LOCAL` (descriptors
//! are passed for every local buffer, notification buffers are registered),
//! `FI_MR_VIRT_ADDR` (remote addresses are virtual, otherwise offsets from
//! the start of the remote region), `FI_MR_PROV_KEY` (the provider's key is
//! used; otherwise a key unique in the process is requested),
//! `FI_MR_ALLOCATED` and `FI_MR_ENDPOINT` (registrations are bound to the
//! endpoint and enabled).
//!
//! # Progress
//!
//! Providers such as `tcp;ofi_rxm` use manual progress: incoming RMA is
//! served, and delivery acknowledged, only while the target process drives
//! the completion queue. [`Transport::poll`](kvxfer_core::Transport::poll)
//! does that; a target must call it regularly (the std shim runs a progress
//! thread for this).
//!
//! The `sockets` provider is asked for manual progress too (data and
//! control). Left to its own progress thread, it lost RMA WRITEs when the
//! machine's cores were busy: some never completed, and their transfers
//! ran into their deadline.
//!
//! The `sockets` provider is also given one operation per peer at a time
//! (RMA or notification; the others wait in the transport and are issued
//! from `poll`). With more, a peer kept off the CPU could be left with
//! part of a message header in its socket and a receive window that
//! never reopened, a stall that no progress ends. Transfers over
//! `sockets` therefore take a round trip per operation.
//!
//! # Failure
//!
//! A transfer whose operations fail completes with the provider's error
//! text; one towards a peer that died completes with
//! [`Error::RemoteDisconnected`](kvxfer_core::Error::RemoteDisconnected),
//! and the peer is given up on as after an abandon (below).
//!
//! The transport keeps no deadline: the engine does, and gives up on a
//! transfer past it with [`abandon`](kvxfer_core::Transport::abandon) (as
//! it does for a peer it found unreachable). An abandoned transfer's
//! operations are cancelled with `fi_cancel` where the provider allows, and
//! their completions are dropped.
//!
//! `fi_cancel` does not stop RMA on most providers (`tcp;ofi_rxm` cancels
//! receives only), so the operations of an abandoned transfer may still be
//! with the provider, which would read a WRITE's source or write a READ's
//! data when the peer resumes. Therefore:
//!
//! * The peer of an abandoned transfer is given up on at once: it is
//!   removed from the address vector (`fi_av_remove`; over `tcp;ofi_rxm`
//!   this closes the connection, and the provider reports every operation
//!   on it as failed, because kvxfer sets `FI_AV_REMOVE_CLEANUP=1` at
//!   process start, before `main` and any libfabric call, unless the
//!   environment sets it already; with `FI_AV_REMOVE_CLEANUP=0` the
//!   connection stays open, the deregistration wait below runs into its
//!   bound, and the first transport logs a warning). Over `ofi_rxm` the
//!   removal is made only on an established connection (libfabric 1.17 to
//!   2.x crash, SIGSEGV in `fi_av_remove`, removing a peer whose
//!   connection record has no endpoint, as after a lost simultaneous
//!   connect or a failed one): with the completion queue empty, one that
//!   still carries an operation of the transport or accepts a 0-byte
//!   READ. A peer without one has no operation on a connection and stays
//!   in the address vector until it is connected again or the endpoint
//!   closes. Its other transfers fail with
//!   [`Error::RemoteDisconnected`](kvxfer_core::Error::RemoteDisconnected),
//!   and so do later posts and notifications to it, at once, until the
//!   peer is disconnected and connected again.
//! * [`deregister`](kvxfer_core::Transport::deregister) of a region that an
//!   operation of an abandoned transfer still references progresses the
//!   completion queue until the provider has reported every such operation
//!   (errors included), for at most [`FabricConfig::cancel_timeout`]. When
//!   it returns within that bound, the provider no longer touches the
//!   region, and the memory may be reused or freed.
//! * If an operation is still outstanding after `cancel_timeout` (a
//!   provider that neither completes nor flushes it, such as `shm`, whose
//!   peer copies the data itself), an error naming the region is logged
//!   and the registration is kept open until those operations are reported
//!   or the transport is dropped (after its endpoint is closed). The memory
//!   must then be kept alive, and not reused, until one of those happens:
//!   the provider may still read or write it.

// The core's `Error` is deliberately a large inline value (no_std, no
// allocation), so every fallible function here returns a large `Err`.
#![allow(clippy::result_large_err)]
#![deny(missing_docs)]
#![deny(unsafe_code)]

#[allow(unsafe_code)]
mod fabric;
mod hmem;
mod mr;
mod notify;
mod peers;
mod progress;
#[cfg(test)]
mod tests;
mod transport;
mod xfer;

use std::time::Duration;

pub use mr::FabricReg;
pub use peers::{FabricPeer, FabricRemoteKey};
pub use transport::FabricTransport;

/// The backend name: "LIBFABRIC".
pub const BACKEND: &str = "LIBFABRIC";

/// Environment variable naming the provider when
/// [`FabricConfig::provider`] is `None`.
pub const PROVIDER_ENV: &str = "KVXFER_LIBFABRIC_PROVIDER";

/// Environment variable: `0` keeps VRAM off the provider even where it
/// offers `FI_HMEM` with CUDA (VRAM is then staged above the transport).
pub const NATIVE_VRAM_ENV: &str = "KVXFER_LIBFABRIC_NATIVE_VRAM";

/// Providers tried, in this order, when none is named.
pub const PROVIDER_PREFERENCE: [&str; 5] =
    ["efa", "verbs;ofi_rxm", "tcp;ofi_rxm", "shm", "sockets"];

/// Providers tried, in this order, when none is named and the library is
/// libfabric 2.x, whose `tcp` provider gives `FI_EP_RDM` itself (protocol
/// XNET, without `ofi_rxm`). That `tcp` comes last: after a transfer timed
/// out and its peer was removed, it still wrote late READ data into
/// deregistered memory and sent late WRITEs from it (libfabric 2.1), which
/// `tcp;ofi_rxm` does not.
pub const PROVIDER_PREFERENCE_V2: [&str; 6] = [
    "efa",
    "verbs;ofi_rxm",
    "tcp;ofi_rxm",
    "shm",
    "sockets",
    "tcp",
];

/// The provider preference for the libfabric loaded:
/// [`PROVIDER_PREFERENCE_V2`] on 2.x, else [`PROVIDER_PREFERENCE`].
pub fn provider_preference() -> &'static [&'static str] {
    if version().0 >= 2 {
        &PROVIDER_PREFERENCE_V2
    } else {
        &PROVIDER_PREFERENCE
    }
}

/// Settings of a [`FabricTransport`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct FabricConfig {
    /// Provider in libfabric's spelling (`tcp;ofi_rxm`, `shm`, …); `None`:
    /// `KVXFER_LIBFABRIC_PROVIDER`, else the first usable one of
    /// [`provider_preference`].
    pub provider: Option<String>,
    /// Most transfers in flight at once. Default 1024.
    pub max_transfers: usize,
    /// Most libfabric operations in flight at once; further segments wait
    /// in the transport and are issued from `poll`. Default 4096.
    pub max_ops: usize,
    /// Receive buffers kept posted for notifications: how many may arrive
    /// before the engine takes them. Default 64.
    pub notification_queue: usize,
    /// Longest notification in bytes. Default 4096.
    pub max_notification: usize,
    /// How long [`deregister`](kvxfer_core::Transport::deregister) of a
    /// region waits for the provider to give back the operations of
    /// abandoned transfers that still reference it. Default 3 s. See the
    /// [crate documentation](crate#failure).
    pub cancel_timeout: Duration,
    /// The network interface (libfabric domain) to open the endpoint on,
    /// e.g. `eth1`; `None`: the provider's first. With `tcp;ofi_rxm` the
    /// endpoint then takes that interface's IPv4 address, so its traffic
    /// uses that interface's subnet (one rail of
    /// [`kvxfer-rails`](https://docs.rs/kvxfer-rails)).
    pub interface: Option<String>,
    /// Ask the provider for `FI_HMEM` and register VRAM with it
    /// (`FI_HMEM_CUDA`) once [`FabricTransport::probe_native_vram`]
    /// succeeded; [`NATIVE_VRAM_ENV`]`=0` overrides it. Default `false`
    /// (host memory only); the agent sets it where a CUDA driver is.
    pub native_vram: bool,
}

impl Default for FabricConfig {
    fn default() -> Self {
        FabricConfig {
            provider: None,
            max_transfers: 1024,
            max_ops: 4096,
            notification_queue: 64,
            max_notification: 4096,
            cancel_timeout: Duration::from_secs(3),
            interface: None,
            native_vram: false,
        }
    }
}

impl FabricConfig {
    /// This configuration with provider `name`.
    pub fn with_provider(mut self, name: &str) -> Self {
        self.provider = Some(name.to_owned());
        self
    }

    /// This configuration on network interface `name` (see
    /// [`FabricConfig::interface`]).
    pub fn with_interface(mut self, name: &str) -> Self {
        self.interface = Some(name.to_owned());
        self
    }

    /// This configuration with deregistration wait `timeout` (see
    /// [`FabricConfig::cancel_timeout`]).
    pub fn with_cancel_timeout(mut self, timeout: Duration) -> Self {
        self.cancel_timeout = timeout;
        self
    }
}

/// The providers of [`provider_preference`] that libfabric offers on this
/// machine with the capabilities kvxfer needs (an `FI_EP_RDM` endpoint
/// with RMA and messaging), in preference order.
pub fn usable_providers() -> Vec<String> {
    provider_preference()
        .iter()
        .filter(|p| provider_usable(p))
        .map(|p| (*p).to_owned())
        .collect()
}

/// The version of the libfabric library loaded, `(major, minor)`, from
/// `fi_version()`.
pub fn version() -> (u32, u32) {
    fabric::library_version()
}

/// Whether libfabric offers provider `name` with the capabilities kvxfer
/// needs.
pub fn provider_usable(name: &str) -> bool {
    fabric::Info::get(name).is_ok()
}

#[cfg(test)]
mod version_tests {
    #[test]
    fn version_is_the_installed_one() {
        let (major, minor) = super::version();
        // Debian 12 ships 1.17, Debian 13 2.1; the docker image builds 1.21.
        assert!((major, minor) >= (1, 17), "libfabric {major}.{minor}");
        // The library loaded has the major version of the headers built with.
        assert_eq!(
            major,
            libfabric_sys::FI_MAJOR_VERSION,
            "libfabric {major}.{minor}"
        );
    }
}
