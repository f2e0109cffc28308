//! `kvxfer` (folder `std-shim/`): move KV-cache blocks between processes
//! with one-sided RMA READ and WRITE.
//!
//! An [`Agent`] registers memory, exchanges metadata with peers through a
//! small TCP [side channel](side_channel) and moves bytes with
//! [`XferRequest`]s, over the backend chosen by [`AgentConfig`] or the
//! environment (see [`config`]; the built-in backends are listed in
//! [`backends`]). It wraps the `no_std` core (`kvxfer-core`), adding threads,
//! sockets and the clock. Logging goes through the `log` facade.
//!
//! Metrics per agent, backend and peer (see [`metrics`](mod@metrics)) are
//! readable by the application and served in Prometheus' text format over
//! HTTP (`KVXFER_METRICS_ADDR`).
//!
//! Cargo features: `ucx`, `libfabric`, `cli` (the `kvxfer` tool, see
//! [`bench`](mod@bench)) and `cuda` (the CUDA_IPC backend, VRAM registered
//! by UCX or libfabric or staged through pinned host memory; the driver is
//! loaded at run time) by default; `etcd` (discovery, `etcd` module) when
//! asked for.
#![deny(missing_docs)]
// kvxfer's one error type is allocation-free (bounded strings), hence large.
#![allow(clippy::result_large_err)]
// Without any backend the agent's dispatch has no variant and its code is
// unreachable; such a build still offers configuration and the side channel.
#![cfg_attr(
    not(any(feature = "ucx", feature = "libfabric", feature = "cuda")),
    allow(unreachable_code, unused, clippy::never_loop, clippy::drop_non_drop)
)]

mod agent;
pub mod backends;
pub mod bench;
pub mod clock;
pub mod config;
pub use kvxfer_rails::{RailState, RailStats};
#[cfg(feature = "etcd")]
pub mod etcd;
mod keepalive;
mod meter;
pub mod metrics;
mod note_auth;
mod numa;
mod rails;
pub mod side_channel;
pub mod sweep;
pub mod tcp_baseline;
mod vram;
mod wake;

pub use agent::{Agent, AgentEngine, WaitOutcome, XferRequest};
pub use config::{
    AgentConfig, BackendKind, BackendSource, Capacities, DEFAULT_CAPACITIES,
    DEFAULT_SEGMENTS_PER_XFER,
};
pub use kvxfer_core::engine::{PreparedLocal, PreparedRemote};
pub use kvxfer_core::{
    Desc, DescList, Error, MemKind, Region, Strided, XferHandle, XferOp, XferState, XferTelemetry,
};
