//! Remote agents: loading, retiring and failing peers, and resolving
//! descriptors against their regions.

use super::*;

impl<'a, T: Transport> Engine<'a, T> {
    pub(super) fn find_peer(&self, peer: &str) -> Option<usize> {
        self.peers[..self.limits.peers as usize]
            .iter()
            .position(|p| p.state == PeerState::Live && p.name.as_str() == peer)
    }

    pub(super) fn peer_index(&self, peer: &str) -> Result<usize, Error> {
        self.find_peer(peer)
            .ok_or_else(|| Error::unknown_peer(peer))
    }

    /// The remote-region entries of peer slot `p`.
    pub(super) fn peer_remote(&self, p: usize) -> &[RemoteSlot<T::RemoteKey>] {
        let slot = &self.peers[p];
        let (start, end) = (slot.start as usize, (slot.start + slot.count) as usize);
        self.remote.get(start..end).unwrap_or(&[])
    }

    /// Hands peer slot `p`'s keys and connection back to the transport
    /// and frees the slot.
    pub(super) fn free_peer(&mut self, p: usize) {
        let slot = &mut self.peers[p];
        let (start, count) = (slot.start as usize, slot.count as usize);
        let peer = slot.peer.take();
        slot.state = PeerState::Free;
        slot.generation = slot.generation.wrapping_add(1);
        slot.users = 0;
        slot.count = 0;
        for r in self.remote.iter_mut().skip(start).take(count) {
            if let Some(k) = r.key.take() {
                self.transport.release_key(k);
            }
        }
        if let Some(p) = peer {
            self.transport.disconnect(p);
        }
    }

    /// Frees peer slot `p` now, or once its last transfer is released.
    pub(super) fn retire_peer(&mut self, p: usize) {
        if self.peers[p].users == 0 {
            self.free_peer(p);
        } else {
            self.peers[p].state = PeerState::Retired;
        }
    }

    /// Finds `n` free entries at the end of the remote-region table,
    /// compacting it first if needed.
    pub(super) fn alloc_remote(&mut self, n: u32) -> Result<u32, Error> {
        let cap = self.remote.len() as u64;
        if self.remote_top as u64 + n as u64 > cap {
            let Engine { peers, remote, .. } = self;
            self.remote_top = compact(
                peers,
                |p| (p.state != PeerState::Free).then_some((p.start, p.count)),
                |p, start| p.start = start,
                |from, to, len| {
                    for k in 0..len as usize {
                        let (f, t) = (from as usize + k, to as usize + k);
                        remote[t].region = remote[f].region;
                        remote[t].key = remote[f].key.take();
                    }
                },
            );
        }
        if self.remote_top as u64 + n as u64 > cap {
            return Err(Error::capacity(
                "remote regions",
                cap as usize,
                "remote_regions",
            ));
        }
        let start = self.remote_top;
        self.remote_top += n;
        Ok(start)
    }

    /// Loads a peer's metadata, replacing an earlier load of the same name
    /// (which is retired even if this load then fails); returns its name.
    pub fn load_remote(&mut self, blob: &[u8]) -> Result<Name, Error> {
        let meta = Metadata::decode(blob)?;
        if meta.backend != self.transport.name() {
            return Err(MetaError::BackendMismatch {
                expected: self.transport.name(),
                found: bounded(meta.backend),
            }
            .into());
        }
        if meta.name == self.name.as_str() {
            return Err(MetaError::SelfReference.into());
        }
        let name: Name = bounded(meta.name);
        let old = self.find_peer(meta.name);
        // Room for the regions once the old load, if unused, is gone;
        // checked before anything changes.
        let in_use: u64 = (self.peers.iter().enumerate())
            .filter(|(i, p)| p.state != PeerState::Free && !(Some(*i) == old && p.users == 0))
            .map(|(_, p)| p.count as u64)
            .sum();
        if in_use + meta.region_count as u64 > self.remote.len() as u64 {
            return Err(Error::capacity(
                "remote regions",
                self.remote.len(),
                "remote_regions",
            ));
        }
        if let Some(old) = old {
            self.retire_peer(old);
        }
        let i = self.peers[..self.limits.peers as usize]
            .iter()
            .position(|p| p.state == PeerState::Free)
            .ok_or(Error::capacity(
                "peers",
                self.limits.peers as usize,
                "peers",
            ))?;
        let start = self.alloc_remote(meta.region_count as u32)?;
        let peer = match self.transport.connect(meta.address) {
            Ok(p) => p,
            Err(e) => {
                self.remote_top = start;
                return Err(with_peer(e, &name));
            }
        };
        let slot = &mut self.peers[i];
        slot.peer = Some(peer);
        slot.start = start;
        slot.count = 0;
        // Claimed now, so that a failed unpack frees what was unpacked.
        slot.state = PeerState::Retired;
        for rec in meta.regions() {
            let slot = &self.peers[i];
            let unpacked = match slot.peer.as_ref() {
                Some(p) => self.transport.unpack_key(p, &rec.region, rec.key),
                None => Err(Error::unknown_peer(&name)),
            };
            match unpacked {
                Ok(key) => {
                    let at = (start + slot.count) as usize;
                    // Room: `alloc_remote` reserved `region_count` entries.
                    if let Some(r) = self.remote.get_mut(at) {
                        r.region = rec.region;
                        r.key = Some(key);
                    }
                    self.peers[i].count += 1;
                }
                Err(e) => {
                    self.free_peer(i);
                    return Err(with_peer(e, &name));
                }
            }
        }
        let slot = &mut self.peers[i];
        slot.state = PeerState::Live;
        slot.name = name.clone();
        slot.users = 0;
        slot.in_flight = 0;
        slot.heard_at = None;
        slot.failed = false;
        log::debug!(
            "{}: loaded remote agent {:?} ({} regions)",
            self.name,
            name,
            slot.count
        );
        Ok(name)
    }

    /// Forgets a peer. Transfers in flight to it finish; others made
    /// against it fail with [`Error::StalePeer`].
    pub fn invalidate_remote(&mut self, peer: &str) -> Result<(), Error> {
        let i = self.peer_index(peer)?;
        self.retire_peer(i);
        Ok(())
    }

    /// Declares a loaded peer unreachable: every transfer in flight to it
    /// is cancelled through the transport and fails with
    /// [`Error::RemoteDisconnected`] naming it, and later posts to it are
    /// refused with that error until it is loaded again. A transfer the
    /// transport cannot cancel stays in flight and ends as the transport
    /// reports it (its memory is never reported free before). Returns how
    /// many transfers failed.
    ///
    /// [`fail_peer_with`](Engine::fail_peer_with) also says which.
    pub fn fail_peer(&mut self, peer: &str, now: Instant) -> Result<usize, Error> {
        self.fail_peer_with(peer, now, |_| {})
    }

    /// [`fail_peer`](Engine::fail_peer), handing each transfer it fails to
    /// `ended` once, as [`poll_with`](Engine::poll_with) does.
    pub fn fail_peer_with(
        &mut self,
        peer: &str,
        now: Instant,
        mut ended: impl FnMut(Ended<'_>),
    ) -> Result<usize, Error> {
        let p = self.peer_index(peer)?;
        self.peers[p].failed = true;
        let mut failed = 0;
        for i in 0..self.xfers.len() {
            let s = &self.xfers[i];
            if !(s.live && s.peer as usize == p && s.state == XferState::InProgress) {
                continue;
            }
            let error = Error::RemoteDisconnected {
                peer: self.peers[p].name.clone(),
            };
            match self.give_up(i, error, now) {
                Ok(()) => {
                    failed += 1;
                    ended(self.ended(i));
                }
                Err(e) => log::warn!("{}: {peer:?} is unreachable, but a transfer to it cannot be cancelled ({e}); it stays in flight", self.name),
            }
        }
        Ok(failed)
    }

    /// What is known of a loaded peer's liveness: transfers in flight to
    /// it, when one last completed (or was posted while none was in
    /// flight), and whether [`fail_peer`](Engine::fail_peer) declared it
    /// unreachable.
    pub fn peer_activity(&self, peer: &str) -> Result<PeerActivity, Error> {
        let p = &self.peers[self.peer_index(peer)?];
        Ok(PeerActivity {
            in_flight: p.in_flight,
            heard_at: p.heard_at,
            failed: p.failed,
        })
    }

    /// The names of loaded peers with transfers in flight.
    pub fn busy_peers(&self) -> impl Iterator<Item = &str> + '_ {
        self.peers[..self.limits.peers as usize]
            .iter()
            .filter(|p| p.state == PeerState::Live && p.in_flight > 0)
            .map(|p| p.name.as_str())
    }

    /// The transport's connection to a loaded peer.
    pub fn remote_peer(&self, peer: &str) -> Result<&T::Peer, Error> {
        let p = self.peer_index(peer)?;
        self.peers[p]
            .peer
            .as_ref()
            .ok_or_else(|| Error::unknown_peer(peer))
    }

    /// Whether a peer is loaded.
    pub fn has_remote(&self, peer: &str) -> bool {
        self.find_peer(peer).is_some()
    }

    /// The regions a loaded peer published, in address order.
    pub fn remote_regions(&self, peer: &str) -> Result<impl Iterator<Item = Region> + '_, Error> {
        let p = self.peer_index(peer)?;
        Ok(self.peer_remote(p).iter().map(|r| r.region))
    }

    /// Resolves `desc` (number `index`) against peer slot `p`'s regions.
    pub(super) fn resolve_remote(
        &self,
        p: usize,
        index: usize,
        desc: &Desc,
    ) -> Result<Resolved, Error> {
        let regions = self.peer_remote(p);
        let pos = desc::resolve_sorted(Side::Remote, index, desc, regions.len(), |i| {
            regions[i].region
        })?;
        Ok(Resolved {
            region: pos as u16,
            addr: desc.addr,
            len: desc.len,
        })
    }

    /// Checks that `descs` all lie in the peer's regions.
    pub fn check_remote(&self, peer: &str, descs: &[Desc]) -> Result<(), Error> {
        let p = self.peer_index(peer)?;
        for (i, d) in descs.iter().enumerate() {
            self.resolve_remote(p, i, d)?;
        }
        Ok(())
    }
}
