//! `kvxfer-core`: the `no_std`, allocation-free heart of kvxfer.
//!
//! kvxfer moves KV-cache blocks (and any other registered memory) between
//! inference-engine processes with one-sided RMA READ and WRITE. This crate
//! holds everything that does not need an operating system:
//!
//! * [`mem`]: memory kinds, regions, descriptors;
//! * [`registry`]: the sorted, non-overlapping table of local registrations;
//! * [`storage`]: the tables' storage, which the caller provides;
//! * [`desc`]: descriptor validation, resolution and coalescing;
//! * [`engine`]: the transfer table and its lifecycle
//!   (`Prepared → InProgress → Done | Failed`), remote agents, notifications;
//! * [`wire`]: the versioned, checksummed metadata format;
//! * [`transport`]: the [`Transport`] trait that the
//!   UCX, libfabric and CUDA-IPC crates implement, an in-memory loopback
//!   transport for tests and a fault-injecting middleware.
//!
//! The core is sans-IO, in the manner of `quinn-proto` and `smoltcp`: it owns
//! no thread, socket or clock. The caller passes time in as
//! [`Instant`] and drives progress with
//! [`Engine::poll`](engine::Engine::poll).
#![no_std]
#![forbid(unsafe_code)]
#![deny(missing_docs)]
// `Error` carries bounded inline texts (no allocation is possible here), so
// it is larger than clippy's default threshold for `Result`'s error.
#![allow(clippy::result_large_err)]

pub mod backend;
pub mod desc;
pub mod engine;
pub mod error;
pub mod mem;
pub mod rails;
pub mod registry;
pub mod storage;
pub mod time;
pub mod transport;
pub mod wire;

pub use backend::BackendKind;
pub use desc::{DescList, Strided};
pub use engine::{
    Engine, EngineConfig, Notification, PeerActivity, PreparedLocal, PreparedRemote, XferHandle,
    XferState, XferTelemetry,
};
pub use error::{DescError, Error, MetaError, Side};
pub use mem::{Desc, MemKind, Region};
pub use storage::{Capacities, Managed, Storage};
pub use time::Instant;
pub use transport::{
    Capabilities, Completion, PostStatus, Segment, Segments, Token, Transport, Wake, XferOp,
};
