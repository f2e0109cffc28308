//! kvxfer: move KV-cache blocks between inference-engine processes over UCX,
//! libfabric or CUDA IPC.
//!
//! This crate is what applications depend on. It wraps the `no_std` core
//! (`kvxfer-core`) and a transport into a thread-safe [`Agent`]:
//!
//! * backend selection from [`AgentConfig`] or the environment
//!   (`KVXFER_BACKEND`, then TensorRT-LLM's `TRTLLM_NIXL_KVCACHE_BACKEND`,
//!   then UCX), see [`config`];
//! * metadata exchange through a small TCP [side channel](side_channel)
//!   each agent serves, optionally authenticated with `KVXFER_AUTH_KEY`;
//! * an optional progress thread, and blocking [`XferRequest::wait`] with a
//!   timeout;
//! * [metrics](mod@metrics) per agent, backend and peer, readable by the
//!   application and served in Prometheus' text format over HTTP
//!   (`KVXFER_METRICS_ADDR`);
//! * the `kvxfer` command-line tool (`info`, `target`, `bench`), see
//!   [`bench`](mod@bench), and its size sweeps with a chart, see
//!   [`sweep`].
//!
//! Logging goes through the `log` facade: nothing is printed unless the
//! application installs a logger.
//!
//! Cargo features: `ucx` and `libfabric` (default) build those backends in;
//! `cuda` (off by default) adds the CUDA_IPC backend and VRAM staged through
//! pinned host memory for UCX and libfabric (see `kvxfer_cuda::Staged`);
//! `cli` (default) builds the command-line tool; `etcd` (off by default)
//! adds cluster discovery through etcd, see `etcd` (module).
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
