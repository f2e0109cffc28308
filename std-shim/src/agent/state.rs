//! What sits behind the agent's one lock, and one round of progress: poll the engine, run the keepalive, collect notifications.

use super::*;

/// Everything behind the agent's one lock.
pub(super) struct State {
    /// `None` once shut down.
    pub(super) backend: Option<Engines>,
    /// Received notifications, by sending peer, oldest first.
    pub(super) notifs: HashMap<String, Vec<Vec<u8>>>,
    /// Buffer notifications are received into; grows on demand.
    pub(super) notif_buf: Vec<u8>,
    /// Notifications lost on the way in, by sender ("" when unknown), not
    /// yet reported to the application.
    pub(super) lost: HashMap<String, u64>,
    /// Requests dropped or released while their transport could not cancel
    /// them; each is released (its slot and memory freed) once it ends.
    pub(super) orphans: Vec<XferHandle>,
    /// Probes of peers served by the backend; `None` when turned off.
    pub(super) keepalive: Option<crate::keepalive::Keepalive>,
    /// Seals and checks notifications when an authentication key is set.
    pub(super) note_key: Option<NoteKey>,
    /// Reused for sealing outgoing notifications.
    pub(super) seal_buf: Vec<u8>,
    /// Received notifications refused (not sealed with the key), by the
    /// sender they claimed, not yet reported to the application.
    pub(super) refused: HashMap<String, u64>,
    /// Records the agent's metrics ([`crate::meter`]).
    pub(super) meter: crate::meter::Meter,
}

/// Longest notification buffer the agent grows to (16 MiB).
const MAX_NOTIF_BUF: usize = 16 << 20;

impl State {
    /// A count that moves whenever the transport did work while polled
    /// (UCX: `ucp_worker_progress` calls that did something); constant
    /// for transports that do not report it. Staged VRAM adds the requests it serves for peers, which the
    /// engine does not see as transfers of its own.
    pub(super) fn activity(&mut self) -> u64 {
        match self.backend.as_mut() {
            Some(b) => on_engine!(b, e => AgentTransport::activity(e.transport())),
            None => 0,
        }
    }

    /// Peers whose transfers may need this agent to make progress for them
    /// (served in software by UCX or libfabric, not by cross-memory attach).
    pub(super) fn far_peers(&mut self) -> usize {
        match self.backend.as_mut() {
            Some(b) => on_engine!(b, e => AgentTransport::far_peers(e.transport())),
            None => 0,
        }
    }

    /// How long the progress thread may sleep before the engine has a
    /// deadline to enforce ([`Engine::poll_timeout`]); `None`: no limit.
    pub(super) fn poll_timeout(&mut self) -> Option<Duration> {
        let b = self.backend.as_mut()?;
        let at: Option<kvxfer_core::Instant> = on_engine!(b, e => e.poll_timeout());
        let at = at?;
        Some(Duration::from_nanos(at.saturating_nanos_since(now())))
    }

    /// Asks the transport whether the progress thread may sleep on its
    /// descriptor (see [`kvxfer_core::Wake`]).
    pub(super) fn arm(&mut self) -> kvxfer_core::Wake {
        match self.backend.as_mut() {
            Some(b) => on_engine!(b, e => kvxfer_core::Transport::arm(e.transport_mut())),
            None => kvxfer_core::Wake::Unsupported,
        }
    }

    pub(super) fn backend(&mut self) -> Result<&mut Engines, Error> {
        self.backend.as_mut().ok_or(Error::ShutDown)
    }

    /// Records a transfer made from prepared lists ([`crate::meter`]).
    pub(super) fn metered(
        &mut self,
        made: Result<XferHandle, Error>,
        op: XferOp,
        remote: PreparedRemote,
        note: bool,
    ) -> Result<XferHandle, Error> {
        let State { backend, meter, .. } = self;
        match backend.as_mut() {
            Some(b) => on_engine!(b, e => {
                let peer = e.prepared_peer(remote).unwrap_or("");
                meter.prepared(made, op, peer, note)
            }),
            None => made,
        }
    }

    /// The backend, and `msg` as it goes to `peer`: sealed with the key
    /// when one is set ([`crate::note_auth`]), else as it is.
    pub(super) fn sealed<'a>(
        &'a mut self,
        peer: &str,
        msg: Option<&'a [u8]>,
    ) -> Result<(&'a mut Engines, Option<&'a [u8]>), Error> {
        let State {
            backend,
            note_key,
            seal_buf,
            ..
        } = self;
        let b = backend.as_mut().ok_or(Error::ShutDown)?;
        let (Some(k), Some(m)) = (note_key.as_ref(), msg) else {
            return Ok((b, msg));
        };
        k.seal(peer, m, seal_buf);
        Ok((b, Some(seal_buf.as_slice())))
    }

    /// Polls the engine once and collects notifications; returns how many
    /// transfers finished.
    pub(super) fn progress(&mut self) -> usize {
        self.progress_counting().0
    }

    /// [`progress`](State::progress), also returning how many transfers
    /// are still in flight.
    pub(super) fn progress_counting(&mut self) -> (usize, usize) {
        let State {
            backend,
            notifs,
            notif_buf,
            lost,
            orphans,
            keepalive,
            note_key,
            refused,
            meter,
            ..
        } = self;
        let Some(backend) = backend.as_mut() else {
            return (0, 0);
        };
        let at = now();
        let mut failed = 0;
        if let Some(k) = keepalive.as_mut() {
            failed = on_engine!(backend, e => {
                if AgentTransport::keepalive(e.transport()) {
                    k.check(
                        e,
                        at,
                        |e, p| e.remote_peer(p).is_ok_and(|p| AgentTransport::is_near(e.transport(), p)),
                        |end| meter.ended(end),
                    )
                } else {
                    0
                }
            });
        }
        on_engine!(backend, e => {
            let n = e.poll_with(at, |end| meter.ended(end)) + failed;
            if n > 0 && !orphans.is_empty() {
                // Released requests the transport could not cancel: free
                // their slots once they have ended.
                orphans.retain(|&h| match e.state(h) {
                    Ok(XferState::InProgress) => true,
                    _ => e.release(h).is_err_and(|err| matches!(err, Error::InProgress { .. })),
                });
            }
            loop {
                match e.poll_notification(notif_buf) {
                    None => break,
                    Some(Ok(note)) => {
                        let raw = notif_buf.get(..note.len).unwrap_or(&[]);
                        let from = note.peer.as_str();
                        let msg = match note_key {
                            None => Some(raw),
                            Some(k) => k.open(from, raw),
                        };
                        match msg {
                            Some(m) => {
                                meter.note_received(from);
                                notifs.entry(from.to_string()).or_default().push(m.to_vec())
                            }
                            None => {
                                meter.note_refused(from);
                                log::warn!("refused a notification claiming to come from {from:?}: not sealed with this agent's key");
                                *refused.entry(from.to_string()).or_default() += 1;
                            }
                        }
                    }
                    Some(Err(Error::BufferTooSmall { needed, .. }))
                        if (needed as usize) > notif_buf.len() && (needed as usize) <= MAX_NOTIF_BUF =>
                    {
                        notif_buf.resize(needed as usize, 0);
                    }
                    Some(Err(Error::NotificationsLost { peer, count })) => {
                        meter.notes_lost(&peer, count);
                        *lost.entry(peer.as_str().to_string()).or_default() += count;
                    }
                    Some(Err(err)) => {
                        // A message that did not arrive whole (too long,
                        // broken): reported, sender unknown, never only
                        // logged.
                        log::warn!("receiving a notification failed: {err}");
                        meter.notes_lost("", 1);
                        *lost.entry(String::new()).or_default() += 1;
                        break;
                    }
                }
            }
            (n, e.in_flight())
        })
    }
}
