//! Machinery kvxfer's transports share, one name for each:
//!
//! * [`Slab`]: a table of items with a free list; an index stays valid
//!   until its item is removed (registrations, endpoints, keys, operations);
//! * [`NoteQueue`]: a bounded queue of received notifications that reports
//!   the ones it had to drop, with their senders, never losing them in
//!   silence;
//! * [`Graveyard`]: resources kept until the library lets go of them
//!   (memory a cancelled operation may still touch, a handle whose close has
//!   not finished), released when a check says so.
#![forbid(unsafe_code)]
#![deny(missing_docs)]
// `kvxfer_core::Error` is bounded and allocation-free by design, so it is
// returned by value.
#![allow(clippy::result_large_err)]

mod graveyard;
mod note_queue;
mod slab;

pub use graveyard::Graveyard;
pub use note_queue::{NoteQueue, LOST_HEAD, LOST_KEPT};
pub use slab::Slab;
