//! Recording an agent's metrics ([`crate::metrics`]) as its calls run.
//!
//! The [`Meter`] lives in the agent's state, under the lock its calls take
//! anyway. What it needs on the hot path (post, poll, completion,
//! notifications) is made beforehand: a peer's series when the peer is
//! loaded, a transfer's tag (direction, peer, notification) when it is
//! prepared, in a table as large as the engine's transfer table.
//! Recording then only reads the engine's telemetry and adds to atomics:
//! no allocation, no other lock.
//!
//! The engine hands on each transfer that ended in a poll
//! ([`Engine::poll_with`](kvxfer_core::Engine::poll_with)) or when the
//! keepalive failed its peer
//! ([`Engine::fail_peer_with`](kvxfer_core::Engine::fail_peer_with)), with
//! its state and telemetry: the meter records it there, under the same
//! lock, before anything can re-post or release it, at a cost per ended
//! transfer and none per transfer still in flight. A re-post of a
//! transfer whose end was not seen records that end first.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use kvxfer_core::{Ended, Error, Transport, XferHandle, XferOp, XferState, XferTelemetry};

use crate::agent::AgentEngine;
use crate::metrics::{direction, AgentMetrics, Op, PeerMetrics};

/// What the meter knows of one slot of the transfer table.
#[derive(Clone, Default)]
struct Slot {
    generation: u32,
    dir: usize,
    note: bool,
    pending: bool,
    peer: Option<Arc<PeerMetrics>>,
}

/// One agent's recorder; see the module docs.
pub(crate) struct Meter {
    m: Arc<AgentMetrics>,
    on: bool,
    unknown: Arc<PeerMetrics>,
    by_name: HashMap<String, Arc<PeerMetrics>>,
    slots: Vec<Slot>,
}

impl Meter {
    /// A meter of agent `name` over `backend` with room for `xfers`
    /// transfers; it records only when `on`.
    pub(crate) fn new(name: &str, backend: &'static str, xfers: u32, on: bool) -> Meter {
        let m = AgentMetrics::new(name, backend, on);
        let unknown = m.peer_series("");
        let n = if on { xfers as usize } else { 0 };
        Meter {
            m,
            on,
            unknown,
            by_name: HashMap::new(),
            slots: vec![Slot::default(); n],
        }
    }

    /// The agent's metrics.
    pub(crate) fn metrics(&self) -> &Arc<AgentMetrics> {
        &self.m
    }

    /// Peer `name` was loaded: its series exists from now on.
    pub(crate) fn loaded(&mut self, name: &str) {
        if self.on && !self.by_name.contains_key(name) {
            self.by_name
                .insert(name.to_string(), self.m.peer_series(name));
        }
    }

    fn series(&self, peer: &str) -> &Arc<PeerMetrics> {
        self.by_name.get(peer).unwrap_or(&self.unknown)
    }

    /// Counts `r`'s error, if any, as returned by `op`; passes `r` on.
    pub(crate) fn check<V>(&self, op: Op, r: Result<V, Error>) -> Result<V, Error> {
        if let Err(e) = &r {
            self.m.error(op, e);
        }
        r
    }

    /// Transfer `h` was prepared (or made from prepared lists) to `peer`,
    /// moving data as `op`, with a notification if `note`; `r` is what
    /// preparing returned.
    pub(crate) fn prepared(
        &mut self,
        r: Result<XferHandle, Error>,
        op: XferOp,
        peer: &str,
        note: bool,
    ) -> Result<XferHandle, Error> {
        let h = self.check(Op::Prepare, r)?;
        if !self.on {
            return Ok(h);
        }
        let series = Arc::clone(self.series(peer));
        if let Some(s) = self.slots.get_mut(h.index as usize) {
            *s = Slot {
                generation: h.generation,
                dir: direction(op),
                note,
                pending: false,
                peer: Some(series),
            };
        }
        Ok(h)
    }

    /// Transfer `h` was posted and the post returned `r`.
    pub(crate) fn posted<T: Transport>(
        &mut self,
        e: &AgentEngine<T>,
        h: XferHandle,
        r: &Result<XferState, Error>,
    ) {
        if !self.on {
            return;
        }
        if let Err(err) = r {
            self.m.error(Op::Post, err);
        }
        let Some(s) = self.slots.get_mut(h.index as usize) else {
            return;
        };
        let Some(peer) = s.peer.as_ref().filter(|_| s.generation == h.generation) else {
            return;
        };
        let tel = e.telemetry(h).unwrap_or(XferTelemetry::EMPTY);
        match r {
            Ok(XferState::Done) => {
                peer.post_time[s.dir].observe(tel.post_nanos);
                record_end(peer, s, &tel, &XferState::Done);
            }
            Ok(XferState::InProgress) => {
                peer.post_time[s.dir].observe(tel.post_nanos);
                peer.in_flight.fetch_add(1, Ordering::Relaxed);
                s.pending = true;
            }
            Ok(_) => {}
            // A re-post while the transfer runs moves nothing and fails
            // nothing: counted only as the call's error.
            Err(Error::InProgress { .. } | Error::StaleHandle { .. }) => {}
            Err(err) => peer.failed(err),
        }
    }

    /// Transfer `h` is about to be posted: if an earlier post of it
    /// ended unrecorded, it is recorded now, before the new post replaces
    /// its telemetry.
    pub(crate) fn posting<T: Transport>(&mut self, e: &AgentEngine<T>, h: XferHandle) {
        let Some(s) = self.slots.get_mut(h.index as usize) else {
            return;
        };
        if !self.on || !s.pending || s.generation != h.generation {
            return;
        }
        let state = e.state(h);
        if matches!(state, Ok(XferState::InProgress)) {
            return;
        }
        if let Some(peer) = s.peer.as_ref() {
            peer.in_flight.fetch_sub(1, Ordering::Relaxed);
            if let Ok(state) = &state {
                let tel = e.telemetry(h).unwrap_or(XferTelemetry::EMPTY);
                record_end(peer, s, &tel, state);
            }
        }
        s.pending = false;
    }

    /// The engine ended a transfer ([`Engine::poll_with`](kvxfer_core::Engine::poll_with),
    /// [`Engine::fail_peer_with`](kvxfer_core::Engine::fail_peer_with)): one
    /// the meter saw posted is recorded, once.
    pub(crate) fn ended(&mut self, end: Ended<'_>) {
        let Some(s) = self.slots.get_mut(end.handle.index as usize) else {
            return;
        };
        if !s.pending || s.generation != end.handle.generation {
            return;
        }
        s.pending = false;
        if let Some(peer) = s.peer.as_ref() {
            peer.in_flight.fetch_sub(1, Ordering::Relaxed);
            record_end(peer, s, end.telemetry, end.state);
        }
    }

    /// Transfer `h` was released and releasing returned `r`: one released
    /// while in flight was cancelled.
    pub(crate) fn released(&mut self, h: XferHandle, r: &Result<(), Error>) {
        if !self.on || r.is_err() {
            return;
        }
        let Some(s) = self.slots.get_mut(h.index as usize) else {
            return;
        };
        if s.generation != h.generation {
            return;
        }
        if s.pending {
            if let Some(peer) = s.peer.as_ref() {
                peer.in_flight.fetch_sub(1, Ordering::Relaxed);
                peer.failed(&Error::Cancelled);
            }
        }
        *s = Slot::default();
    }

    /// A notification was sent to `peer` outside a transfer, or sending
    /// failed with `r`'s error.
    pub(crate) fn notified(&self, peer: &str, r: Result<(), Error>) -> Result<(), Error> {
        let r = self.check(Op::Notify, r);
        if self.on && r.is_ok() {
            self.series(peer).notes_sent.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// A notification from `peer` was received.
    pub(crate) fn note_received(&self, peer: &str) {
        if self.on {
            let s = self.series(peer);
            s.notes_received.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A notification claiming to come from `peer` was refused.
    pub(crate) fn note_refused(&self, peer: &str) {
        if self.on {
            let s = self.series(peer);
            s.notes_refused.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// `count` notifications from `peer` ("" unknown) were lost.
    pub(crate) fn notes_lost(&self, peer: &str, count: u64) {
        if self.on {
            let s = self.series(peer);
            s.notes_lost.fetch_add(count, Ordering::Relaxed);
        }
    }
}

/// Records a transfer that ended in `state`.
fn record_end(peer: &PeerMetrics, s: &Slot, tel: &XferTelemetry, state: &XferState) {
    match state {
        XferState::Done => {
            let latency = match (tel.posted_at, tel.completed_at) {
                (Some(p), Some(c)) => c.saturating_nanos_since(p),
                _ => 0,
            };
            peer.completed(s.dir, tel.bytes, latency);
            if s.note {
                peer.notes_sent.fetch_add(1, Ordering::Relaxed);
            }
        }
        XferState::Failed(err) => peer.failed(err),
        _ => {}
    }
}

impl Meter {
    /// The meter of agent `name` over `backend` made with `cfg`
    /// ([`crate::metrics::enabled`]), and the endpoint its
    /// [`metrics_addr`](crate::AgentConfig::metrics_addr) asks for.
    pub(crate) fn for_agent(
        name: &str,
        backend: &'static str,
        cfg: &crate::AgentConfig,
    ) -> Result<(Meter, Option<crate::metrics::Endpoint>), Error> {
        let on = crate::metrics::enabled(cfg);
        let meter = Meter::new(name, backend, cfg.capacities.xfers, on);
        let endpoint = match crate::metrics::addr_of(cfg) {
            None => None,
            Some(addr) => Some(crate::metrics::serve(&addr).map_err(|e| {
                Error::backend(
                    backend,
                    i64::from(e.raw_os_error().unwrap_or(-1)),
                    &format!("metrics endpoint on {addr}: {e}"),
                )
            })?),
        };
        Ok((meter, endpoint))
    }
}
