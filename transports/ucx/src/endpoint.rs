//! Endpoints, and what waits for UCX to let go: closes, forced closes,
//! cancelled operations ("zombies") and the memory and keys they use.

use std::ffi::c_void;
use std::time::{Duration, Instant};

use kvxfer_core::Error;
use ucx_sys as sys;

use kvxfer_core::Region;

use crate::ffi::{MemHandle, RKey, UCS_OK};
use crate::transport::{UcxPeer, UcxTransport};

pub(crate) struct RegEntry {
    pub(crate) memh: MemHandle,
    pub(crate) region: Region,
    pub(crate) packed: Vec<u8>,
}

/// An endpoint and what its error handler learnt. Boxed so that the error
/// handler's `arg` stays valid while the box lives.
pub(crate) struct EpState {
    /// Null once the endpoint was force-closed by an abandon.
    pub(crate) ep: sys::ucp_ep_h,
    /// `UCS_OK`, or the status the error handler reported (or
    /// `UCS_ERR_ENDPOINT_TIMEOUT` after a transfer on it was abandoned).
    pub(crate) failed: sys::ucs_status_t,
    /// The force close started by an abandon, until UCX finished it.
    pub(crate) closing: *mut c_void,
}

pub(crate) struct KeyEntry {
    /// `None` once the key's endpoint was disconnected (the key was
    /// destroyed then, before the endpoint).
    pub(crate) rkey: Option<RKey>,
    pub(crate) ep: u32,
    /// The peer's region the key covers.
    pub(crate) region: Region,
}

impl UcxTransport {
    /// Refuses a notification longer than the configured maximum.
    pub(crate) fn check_note_len(&self, note: &[u8]) -> Result<(), Error> {
        let max = self.config.max_notification;
        if note.len() > max as usize {
            return Err(Error::NotificationTooLong {
                len: note.len() as u64,
                max: u64::from(max),
            });
        }
        Ok(())
    }

    /// The devices of [`UcxConfig::net_devices`](crate::UcxConfig::net_devices)
    /// when every one is a network interface whose link is down (its
    /// `operstate` in `/sys/class/net` says `down` or `lowerlayerdown`);
    /// `None` when one may work, or one is not an interface (an
    /// InfiniBand port, say).
    pub(crate) fn devices_without_link(&self) -> Option<String> {
        let devices = self.config.net_devices.as_deref()?;
        let mut names = Vec::new();
        for dev in devices.split(',').map(str::trim).filter(|d| !d.is_empty()) {
            let path = format!("/sys/class/net/{dev}/operstate");
            let state = std::fs::read_to_string(path).ok()?;
            if !matches!(state.trim(), "down" | "lowerlayerdown") {
                return None;
            }
            names.push(dev);
        }
        (!names.is_empty()).then(|| names.join(","))
    }

    /// Looks up the endpoint of `peer`, refusing a failed one.
    pub(crate) fn live_ep(&self, peer: &UcxPeer) -> Result<u32, Error> {
        if peer.owner != self.owner {
            return Err(self.foreign("peer handle belongs to another UCX transport"));
        }
        let Some(state) = self.ep(peer.index) else {
            return Err(self.foreign("peer handle was disconnected"));
        };
        if state.failed != UCS_OK {
            return Err(Error::disconnected(""));
        }
        Ok(peer.index)
    }

    /// Progresses until `done()` or `timeout`; returns whether `done()`.
    pub(crate) fn progress_until(
        &mut self,
        timeout: Duration,
        mut done: impl FnMut(&Self) -> bool,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if done(self) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            if !self.progress() {
                std::thread::yield_now();
            }
        }
    }

    /// Frees zombie slots UCX has let go of, then (once none is left) the
    /// memory handles and remote keys that waited for them, and finishes
    /// forced closes. Never waits.
    pub(crate) fn reap(&mut self) {
        let mut i = 0;
        while i < self.zombies.len() {
            let index = self.zombies[i];
            if self.outstanding(index) == 0 {
                self.zombies.swap_remove(i);
                self.free_retired(index);
            } else {
                i += 1;
            }
        }
        if self.zombies.is_empty() {
            // No request uses them any more.
            self.deferred_rkeys.release_all();
            self.deferred_unmaps.release_all();
        }
        if self.open_closes == 0 {
            return;
        }
        self.reap_closes();
    }

    /// Waits (up to the cancel timeout) for the zombies' requests to end;
    /// force-closes the endpoints of those that do not, and waits up to the
    /// close timeout for that.
    pub(crate) fn drain_zombies(&mut self) {
        let all_done = |t: &Self| t.zombies.iter().all(|&z| t.outstanding(z) == 0);
        let timeout = self.config.cancel_timeout;
        if !self.progress_until(timeout, all_done) {
            let mut eps: Vec<u32> = Vec::new();
            for &z in &self.zombies {
                let s = self.slot(z);
                if s.outstanding > 0 && !eps.contains(&s.ep) {
                    eps.push(s.ep);
                }
            }
            for ep in eps {
                log::warn!("UCX: cancelled requests still running after {timeout:?}; closing their endpoint");
                self.force_close(ep, sys::UCS_ERR_CANCELED as sys::ucs_status_t);
            }
            let timeout = self.config.close_timeout;
            self.progress_until(timeout, all_done);
        }
        self.reap();
    }

    /// Drops the endpoint of `peer`: its remote keys, then the endpoint,
    /// closed with a flush, or with a forced close when `force` (see
    /// `close_ep`).
    pub(crate) fn drop_ep(&mut self, peer: UcxPeer, force: bool) {
        if peer.owner != self.owner {
            log::error!("UCX: disconnect: peer belongs to another transport; ignored");
            return;
        }
        let Some(state) = self.eps.remove(peer.index) else {
            return;
        };
        // Requests of cancelled or abandoned transfers still on this
        // endpoint use its remote keys: a forced close ends them first.
        let zombies = self.zombies_on(peer.index);
        let state = if zombies {
            self.close_ep(state, true);
            self.reap();
            None
        } else {
            Some(state)
        };
        let defer = zombies && self.zombies_on(peer.index);
        // Remote keys unpacked on this endpoint go before the endpoint.
        for key in self.keys.iter_mut().map(|(_, k)| k) {
            if key.ep != peer.index {
                continue;
            }
            if let Some(rkey) = key.rkey.take() {
                if defer {
                    self.deferred_rkeys.bury(rkey);
                }
                // Else destroyed here: no request uses it.
            }
        }
        if defer {
            // The index may go to a new endpoint: detach the zombies that
            // outlived the close (they end with the worker at the latest).
            for z in self.zombies.clone() {
                let s = self.slot_mut(z);
                if s.ep == peer.index {
                    s.ep = u32::MAX;
                }
            }
        }
        if let Some(mut state) = state {
            let s = state.get_mut();
            let pending = s.ep.is_null() && !s.closing.is_null();
            if pending {
                // Force-closed by an abandon: finished from later polls.
                self.closing.bury(state);
            } else {
                self.close_ep(state, force);
            }
        }
    }
}
