//! The engine: registry, remote agents, the transfer table and its lifecycle.
//!
//! API SKELETON — bodies are filled in by the core implementation.

use core::fmt;

use crate::error::{Error, Name};
use crate::mem::{Desc, Region};
use crate::time::Instant;
use crate::transport::{Transport, XferOp};

/// Engine settings.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct EngineConfig {
    /// Merge neighbouring descriptors that are contiguous on both sides and
    /// inside the same registrations (default on).
    pub coalesce: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig { coalesce: true }
    }
}

/// Names one transfer: slot index and generation. A handle whose transfer
/// was released is stale; it never names another transfer.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct XferHandle {
    /// Slot in the transfer table.
    pub index: u32,
    /// Generation of the slot when the handle was issued.
    pub generation: u32,
}

impl fmt::Display for XferHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}.{}", self.index, self.generation)
    }
}

/// Where a transfer is in its lifecycle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum XferState {
    /// Prepared, never posted.
    Prepared,
    /// Posted; data may be moving.
    InProgress,
    /// All data is at its destination.
    Done,
    /// It failed, and why.
    Failed(Error),
}

/// What a transfer did, for applications' telemetry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct XferTelemetry {
    /// Bytes moved per post.
    pub bytes: u64,
    /// Descriptors as given.
    pub descs: u32,
    /// Segments after coalescing.
    pub segments: u32,
    /// When the last post started.
    pub posted_at: Option<Instant>,
    /// How long the last `post` call took (from `now` at post to `now` at
    /// the end of post, as measured by the caller) — set by [`Engine::post_finished`].
    pub post_nanos: u64,
    /// When the last post completed (as seen by `poll`).
    pub completed_at: Option<Instant>,
}

/// A received notification's origin and length (its bytes are in the
/// caller's buffer).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notification {
    /// The sending agent.
    pub peer: Name,
    /// Payload length in the caller's buffer.
    pub len: usize,
}

/// The sans-IO transfer engine over transport `T`.
///
/// Capacities: `REGIONS` local registrations (and remote regions per
/// peer), `PEERS` remote agents, `XFERS` live transfers, `SEGS` segments
/// per transfer.
pub struct Engine<
    T: Transport,
    const REGIONS: usize = 64,
    const PEERS: usize = 16,
    const XFERS: usize = 64,
    const SEGS: usize = 256,
> {
    transport: T,
}

#[allow(unused_variables)]
impl<T: Transport, const REGIONS: usize, const PEERS: usize, const XFERS: usize, const SEGS: usize>
    Engine<T, REGIONS, PEERS, XFERS, SEGS>
{
    /// A new engine for agent `name` over `transport`.
    pub fn new(name: &str, transport: T, config: EngineConfig) -> Result<Self, Error> {
        todo!()
    }
    /// This agent's name.
    pub fn name(&self) -> &str {
        todo!()
    }
    /// The transport's backend name.
    pub fn backend(&self) -> &'static str {
        self.transport.name()
    }
    /// The transport.
    pub fn transport(&self) -> &T {
        &self.transport
    }
    /// The transport, mutably.
    pub fn transport_mut(&mut self) -> &mut T {
        &mut self.transport
    }
    /// Registers a local region.
    pub fn register(&mut self, region: Region) -> Result<(), Error> {
        todo!()
    }
    /// Deregisters the region starting at `addr`; refused while live transfers use it.
    pub fn deregister(&mut self, addr: u64) -> Result<Region, Error> {
        todo!()
    }
    /// Writes this agent's metadata (name, backend, address, regions + keys) into `out`.
    pub fn local_metadata(&self, out: &mut [u8]) -> Result<usize, Error> {
        todo!()
    }
    /// Loads a peer's metadata, replacing an earlier load of the same name; returns its name.
    pub fn load_remote(&mut self, blob: &[u8]) -> Result<Name, Error> {
        todo!()
    }
    /// Forgets a peer.
    pub fn invalidate_remote(&mut self, peer: &str) -> Result<(), Error> {
        todo!()
    }
    /// Whether a peer is loaded.
    pub fn has_remote(&self, peer: &str) -> bool {
        todo!()
    }
    /// Checks that `descs` all lie in the peer's regions.
    pub fn check_remote(&self, peer: &str, descs: &[Desc]) -> Result<(), Error> {
        todo!()
    }
    /// Validates, resolves and coalesces a request into a prepared transfer.
    pub fn prepare(
        &mut self,
        op: XferOp,
        local: &[Desc],
        remote: &[Desc],
        peer: &str,
        notification: Option<&[u8]>,
    ) -> Result<XferHandle, Error> {
        todo!()
    }
    /// Posts (or re-posts) a transfer.
    pub fn post(&mut self, handle: XferHandle, now: Instant) -> Result<XferState, Error> {
        todo!()
    }
    /// Records when the caller's `post` call returned, for telemetry.
    pub fn post_finished(&mut self, handle: XferHandle, now: Instant) {
        todo!()
    }
    /// The transfer's state.
    pub fn state(&self, handle: XferHandle) -> Result<XferState, Error> {
        todo!()
    }
    /// The transfer's telemetry.
    pub fn telemetry(&self, handle: XferHandle) -> Result<XferTelemetry, Error> {
        todo!()
    }
    /// Drains the transport's completions; returns how many transfers finished.
    pub fn poll(&mut self, now: Instant) -> usize {
        todo!()
    }
    /// Releases a transfer (cancelling it if in progress and the transport can).
    pub fn release(&mut self, handle: XferHandle) -> Result<(), Error> {
        todo!()
    }
    /// Sends a notification to a peer.
    pub fn notify(&mut self, peer: &str, msg: &[u8]) -> Result<(), Error> {
        todo!()
    }
    /// Takes one received notification; its payload goes into `buf`.
    pub fn poll_notification(&mut self, buf: &mut [u8]) -> Option<Result<Notification, Error>> {
        todo!()
    }
}
