//! `kvxfer-core`: the `no_std`, allocation-free state machine of kvxfer.
//!
//! kvxfer moves registered memory (KV-cache blocks) between processes with
//! one-sided RMA READ and WRITE. This crate validates descriptors against
//! registrations, tracks transfers (`Prepared → InProgress → Done | Failed`),
//! peers and notifications, and encodes metadata; it drives any
//! [`Transport`] and names none.
//!
//! It is sans-IO, like `quinn-proto`: it owns no thread, socket or clock.
//! Pass time in as [`Instant`] and drive it with
//! [`Engine::poll`](engine::Engine::poll). The `kvxfer` crate wraps it,
//! with its transports, into a thread-safe agent.
#![no_std]
#![forbid(unsafe_code)]
#![deny(missing_docs)]
// `Error` carries bounded inline texts (no allocation is possible here), so
// it is larger than clippy's default threshold for `Result`'s error.
#![allow(clippy::result_large_err)]

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

pub use desc::{DescList, Strided};
pub use engine::{
    Ended, Engine, EngineConfig, Notification, PeerActivity, PreparedLocal, PreparedRemote,
    XferHandle, XferState, XferTelemetry,
};
pub use error::{DescError, Error, MetaError, Side};
pub use mem::{Desc, MemKind, Region};
pub use storage::{Capacities, Managed, Storage};
pub use time::Instant;
pub use transport::{
    Capabilities, Completion, PostStatus, Segment, Segments, Token, Transport, Wake, XferOp,
};
