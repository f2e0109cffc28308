//! UCX transport for kvxfer: one-sided RMA READ/WRITE over libucp.
//!
//! [`UcxTransport`] implements the core's
//! [`Transport`](kvxfer_core::Transport) trait on one UCP context and one
//! worker:
//!
//! * memory is registered per region with `ucp_mem_map`; its remote key is
//!   packed once at registration and copied out by `pack_key`;
//! * peers are endpoints created from the peer's packed worker address
//!   (`ucp_worker_get_address`), with peer error handling so that a dead
//!   peer fails its in-flight transfers instead of hanging them;
//! * a transfer is one `ucp_put_nbx`/`ucp_get_nbx` per segment; a WRITE is
//!   reported done only after an endpoint flush, so its data is visible at
//!   the target before the completion and before its notification;
//! * notifications are eager active messages on [`NOTIFICATION_AM_ID`],
//!   copied on arrival into a bounded queue;
//! * progress happens in [`Transport::poll`](kvxfer_core::Transport::poll)
//!   through `ucp_worker_progress`;
//! * deadlines are the engine's (`EngineConfig::deadline`); the transport
//!   reads no clock for them. [`abandon`](kvxfer_core::Transport::abandon)
//!   cancels the transfer's requests and force-closes its endpoint without
//!   waiting: UCX 1.13 does not notice a cut link over `tcp` (the kernel
//!   keeps the data queued and keepalive does not fire), so only the close
//!   ends such requests. Later posts to the peer then fail at once with
//!   [`Error::RemoteDisconnected`](kvxfer_core::Error::RemoteDisconnected)
//!   until it is connected again; memory registrations and remote keys the
//!   requests use are released only once UCX has let go of them, and the
//!   abandoned transfer is reported then, failed with
//!   `RemoteDisconnected` (a cancelled one never is);
//! * [`reset`](kvxfer_core::Transport::reset) force-closes an endpoint
//!   (no flush, no wait for a dead link), where
//!   [`disconnect`](kvxfer_core::Transport::disconnect) flushes it first;
//!   neither closes UCX's `tcp` socket, which keeps receiving until the
//!   peer closes its end, so [`renew`](kvxfer_core::Transport::renew)
//!   replaces the worker (same context: registrations and packed keys
//!   stay) and destroys the old one, which closes every socket it had
//!   ([`UcxConfig::spare_worker`] keeps the new one ready);
//! * UCX 1.13 connects `tcp` blocking, inside `ucp_ep_create`: over an
//!   interface without link that takes until neighbour resolution gives up
//!   (about 3 s), so [`connect`](kvxfer_core::Transport::connect) refuses
//!   at once, naming the device, when every device of
//!   [`UcxConfig::net_devices`] is a network interface whose link is down.
//!   A link cut further away (a switch) would still block the connect,
//!   up to the SYN timeout: [`UcxConfig::tcp_conn_nb`] connects without
//!   blocking instead (set for the rails of several interfaces, whose
//!   reconnections run while the other rails carry the transfers).
//!
//! UCX reads its usual `UCX_*` environment variables (for example
//! `UCX_TLS=tcp`) when the transport is created; [`UcxConfig`] can override
//! the transport list and the keepalive interval that bounds how long a dead
//! peer goes unnoticed.
//!
//! All `unsafe` is in one private module, `ffi` (RAII handles, callbacks,
//! the calls on requests and endpoints); the state logic above it has none.
//!
//! A known limitation of UCX 1.13 over `tcp` (a stalled target aborted when
//! its initiator goes away) is described in the workspace README, "Known
//! limitation"; the ignored test `stalled_target_survives_its_initiator_going_away`
//! shows it.
#![deny(missing_docs)]
// `unsafe` only where UCX is called or calls back; every block says why
// it is sound (`// SAFETY:`).
#![deny(unsafe_code)]
// `kvxfer_core::Error` is the project's one error type: bounded and
// allocation-free by design, so it is returned by value.
#![allow(clippy::result_large_err)]

mod endpoint;
// The FFI boundary: RAII handles, callbacks, calls on requests and
// endpoints, and access to what callbacks write. The only `unsafe`.
#[allow(unsafe_code)]
mod ffi;
mod ops;
mod renew;
mod slot;
mod status;
mod transport;

use std::time::Duration;

pub use ffi::inline::{ACK_AM_ID, WRITE_AM_ID};
pub use transport::{abandoned_transports, UcxPeer, UcxReg, UcxRemoteKey, UcxTransport};

/// Environment variable that sets [`UcxConfig::native_vram`] in
/// [`UcxConfig::from_env`]: `0` keeps VRAM off UCX even where it has CUDA
/// support (a wrapper such as `kvxfer_cuda::Staged` then stages it).
pub const NATIVE_VRAM_ENV: &str = "KVXFER_UCX_NATIVE_VRAM";

/// The version of the UCX library loaded, as UCX spells it (`"1.13.1"`).
pub fn version() -> String {
    ffi::version_string()
}

/// The version of the UCX library loaded, `(major, minor)`.
pub fn version_number() -> (u32, u32) {
    let (major, minor, _) = ffi::version_numbers();
    (major, minor)
}

/// The backend name this transport reports and puts in its errors.
pub const BACKEND: &str = "UCX";

/// The active-message id notifications travel on.
pub const NOTIFICATION_AM_ID: u32 = 0x6b76;

/// Settings of a [`UcxTransport`].
///
/// Build it with [`UcxConfig::default`] and change the fields you need.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct UcxConfig {
    /// UCX transport list (as `UCX_TLS`, e.g. `"tcp"` or `"shm,cma"`).
    /// `None` (the default) keeps `UCX_TLS` from the environment, else
    /// UCX's default (`all`).
    pub tls: Option<String>,
    /// Network devices this transport may use (as `UCX_NET_DEVICES`, e.g.
    /// `"eth1"` for `tcp` or `"mlx5_0:1"`), set on this transport's own UCP
    /// context so that several transports in one process can each use
    /// their own device (one per network rail). `None` (the default) keeps
    /// `UCX_NET_DEVICES` from the environment, else every device.
    pub net_devices: Option<String>,
    /// Interval of UCX's endpoint keepalive, which bounds how long a dead
    /// peer goes unnoticed (UCX's own default is 20 s); zero turns it off.
    /// Applied only when `UCX_KEEPALIVE_INTERVAL` is not set in the
    /// environment; `None` keeps UCX's setting. Default: 1 s.
    pub keepalive_interval: Option<Duration>,
    /// Longest notification sent or accepted, in bytes (sent eagerly, so
    /// keep it small). Default: 4096.
    pub max_notification: u32,
    /// Received notifications kept until the engine takes them; further
    /// ones are dropped and each reported, with its sender, as
    /// [`Error::NotificationDropped`](kvxfer_core::Error::NotificationDropped)
    /// (the agent's `take_notifications` then fails with
    /// `NotificationsLost` naming the sender). Default: 1024.
    pub notification_queue: u32,
    /// How long closing an endpoint may wait for its flush. Default: 1 s.
    pub close_timeout: Duration,
    /// Create endpoints with UCX's peer error handling (the default), so
    /// that a dead peer fails its in-flight transfers within about the
    /// keepalive interval instead of hanging them. UCX then uses only
    /// transports that can detect a dead peer: in UCX 1.13 shared memory
    /// (`sysv`, `posix`) cannot, and `cma` offers only zero-copy RMA, which
    /// UCP does not pick for RMA lanes, so between processes UCX emulates
    /// RMA with active messages over `tcp` (`ucx_info`'s `rma_am(tcp/lo)`),
    /// which needs the target to progress. Off allows every transport, at
    /// the price of transfers to a dead peer that may never end and of
    /// endpoints that cannot be closed safely; the kvxfer agent refuses it
    /// (its peers on this host move by cross-memory attach instead).
    pub peer_failure_detection: bool,
    /// How long [`deregister`](kvxfer_core::Transport::deregister) waits
    /// for the requests of cancelled or abandoned transfers to be released
    /// by UCX before it force-closes their endpoints.
    /// ([`cancel`](kvxfer_core::Transport::cancel) itself never waits: the
    /// cancelled requests are left to end in the background, and memory
    /// they use stays registered until they have.) Default: 5 s.
    pub cancel_timeout: Duration,
    /// Segment size of UCX's `tcp` transport in bytes, set as both
    /// `UCX_TCP_TX_SEG_SIZE` and `UCX_TCP_RX_SEG_SIZE` unless either is in
    /// the environment; `None` keeps UCX's (8 KiB send, 64 KiB receive).
    /// Over `tcp` UCX emulates RMA with active messages of at most one
    /// segment, each acknowledged by the target, so an 8 KiB segment caps
    /// a large WRITE at a few hundred MB/s. Default: 64 KiB.
    pub tcp_seg_size: Option<u32>,
    /// Largest WRITE of one segment sent as one active message that the
    /// target copies into place and answers (one round trip instead of a
    /// put and an endpoint flush), in bytes; 0 turns it off. Used only
    /// when UCX's transports emulate RMA (no `rc`, `dc` or `ud` among
    /// them). Default: 8192.
    pub inline_write_max: u32,
    /// Register GPU memory (VRAM) with UCX itself when the UCX library
    /// loaded supports CUDA memory (built with CUDA, its `cuda` module
    /// found): UCX then moves it with `cuda_ipc` and `cuda_copy` on one
    /// host and over the network transports (GPUDirect RDMA where the NIC
    /// supports it) across hosts. Without that support, or with `false`,
    /// the transport registers host memory only. Also set through
    /// [`NATIVE_VRAM_ENV`] with [`UcxConfig::from_env`]. Default: `true`.
    pub native_vram: bool,
    /// Keep a second worker ready for [`renew`](kvxfer_core::Transport::renew),
    /// made with the transport (and again after each renewal, once that
    /// succeeds), so that a renewal succeeds while the network device is
    /// down: UCX cannot open a worker on it then. Set for each rail of
    /// several interfaces. Default: `false`.
    pub spare_worker: bool,
    /// Connect UCX's `tcp` without blocking (`UCX_TCP_CONN_NB`, applied
    /// only when that is not in the environment): `ucp_ep_create` then
    /// returns before the connection is made, instead of holding the
    /// caller until it is, or until the SYN times out where a link is cut
    /// beyond this host's interface. `None` keeps UCX's setting (`n`).
    /// Set for each rail of several interfaces. Default: `None`.
    pub tcp_conn_nb: Option<bool>,
}

impl UcxConfig {
    /// The defaults, with [`native_vram`](Self::native_vram) from
    /// [`NATIVE_VRAM_ENV`] when it is set. A value other than `0` or `1` is
    /// an error naming it.
    pub fn from_env() -> Result<UcxConfig, kvxfer_core::Error> {
        let mut cfg = UcxConfig::default();
        if let Some(v) = std::env::var_os(NATIVE_VRAM_ENV) {
            cfg.native_vram = match v.to_string_lossy().trim() {
                "0" => false,
                "1" => true,
                other => {
                    return Err(kvxfer_core::Error::backend(
                        BACKEND,
                        -1,
                        &format!("{NATIVE_VRAM_ENV}={other:?}: expected 0 or 1"),
                    ))
                }
            };
        }
        Ok(cfg)
    }
}

impl UcxConfig {
    /// This configuration restricted to the network devices `devices`
    /// (see [`net_devices`](Self::net_devices)).
    pub fn with_net_devices(mut self, devices: &str) -> UcxConfig {
        self.net_devices = Some(devices.to_string());
        self
    }
}

impl Default for UcxConfig {
    fn default() -> Self {
        UcxConfig {
            tls: None,
            net_devices: None,
            keepalive_interval: Some(Duration::from_secs(1)),
            max_notification: 4096,
            notification_queue: 1024,
            close_timeout: Duration::from_secs(1),
            cancel_timeout: Duration::from_secs(5),
            peer_failure_detection: true,
            tcp_seg_size: Some(64 << 10),
            inline_write_max: 8192,
            native_vram: true,
            spare_worker: false,
            tcp_conn_nb: None,
        }
    }
}
