//! Prepared descriptor lists and their entries.

use super::*;

impl<'a, T: Transport> Engine<'a, T> {
    /// Finds `n` free explicit entries at the end of the prepared-entry
    /// table, compacting it first if needed.
    pub(super) fn alloc_entries(&mut self, n: usize) -> Result<u32, Error> {
        let cap = self.entries.len();
        if self.entries_top as usize + n > cap {
            let Engine { preps, entries, .. } = self;
            self.entries_top = compact(
                preps,
                |p| match p.form {
                    PrepForm::Explicit { start, len } if p.live => Some((start, len)),
                    _ => None,
                },
                |p, start| {
                    if let PrepForm::Explicit { len, .. } = p.form {
                        p.form = PrepForm::Explicit { start, len };
                    }
                },
                |from, to, len| {
                    let (from, to) = (from as usize, to as usize);
                    entries.copy_within(from..from + len as usize, to);
                },
            );
        }
        if self.entries_top as usize + n > cap {
            return Err(Error::capacity(
                "prepared list entries",
                cap,
                "prepared_entries",
            ));
        }
        Ok(self.entries_top)
    }

    /// Resolves `list` with `resolve` into prepared-list slot `i`: compact
    /// when it is strided and lies in one region, else entry by entry.
    pub(super) fn fill_prep(
        &mut self,
        list: DescList<'_>,
        resolve: impl Fn(&Self, usize, &Desc) -> Result<Resolved, Error>,
    ) -> Result<PrepForm, Error> {
        if let DescList::Strided(s) = list {
            if s.count > 0 {
                let first = resolve(self, 0, &s.get(0))?;
                let whole = s.span().map(|span| Desc::on_dev(s.addr, span, s.dev));
                if let Some(whole) = whole {
                    if let Ok(r) = resolve(self, 0, &whole) {
                        if r.region == first.region {
                            return Ok(PrepForm::Strided {
                                region: first.region,
                                addr: s.addr,
                                len: s.len,
                                stride: s.stride,
                                count: s.count,
                            });
                        }
                    }
                }
            }
        }
        let n = list.len();
        let start = self.alloc_entries(n)?;
        for k in 0..n {
            let d = list.get(k).unwrap_or(Desc::new(0, 0));
            let r = resolve(self, k, &d)?;
            self.entries[start as usize + k] = r;
        }
        self.entries_top = start + n as u32;
        Ok(PrepForm::Explicit {
            start,
            len: n as u32,
        })
    }

    pub(super) fn take_prep(&mut self) -> Result<usize, Error> {
        let i = self.free_prep;
        if i == NIL {
            return Err(Error::capacity(
                "prepared lists",
                self.preps.len(),
                "prepared_lists",
            ));
        }
        Ok(i as usize)
    }

    /// Makes prepared-list slot `i` (the free list's head) live.
    pub(super) fn commit_prep(&mut self, i: usize, side: Side, peer: usize, form: PrepForm) -> u32 {
        let peer_gen = self.peers.get(peer).map_or(0, |p| p.generation);
        self.free_prep = self.preps[i].next_free;
        let slot = &mut self.preps[i];
        slot.live = true;
        slot.side = side;
        slot.peer = peer as u16;
        slot.peer_gen = peer_gen;
        slot.form = form;
        slot.generation
    }

    /// Adds (or with `release`, removes) prepared list `i`'s users of its
    /// local regions.
    pub(super) fn prep_users(&mut self, i: usize, release: bool) {
        let count = |reg: &mut Registry<'a, T::LocalReg>, region: u16, n: u32| {
            if release {
                reg.release_n(region, n)
            } else {
                reg.acquire_n(region, n)
            }
        };
        match self.preps[i].form {
            PrepForm::Strided { region, .. } => count(&mut self.registry, region, 1),
            PrepForm::Explicit { start, len } => {
                let (start, len) = (start as usize, len as usize);
                for k in start..start + len {
                    let region = self.entries[k].region;
                    count(&mut self.registry, region, 1);
                }
            }
        }
    }

    /// Resolves `descs` against the local registry once, for
    /// [`make_xfer`](Engine::make_xfer). The list counts as a user of its
    /// regions until [`release_local`](Engine::release_local).
    pub fn prep_local(&mut self, descs: &[Desc]) -> Result<PreparedLocal, Error> {
        self.prep_local_list(descs.into())
    }

    /// [`prep_local`](Engine::prep_local) for an explicit or strided list.
    /// A strided list that lies in one region takes no per-entry memory.
    pub fn prep_local_list(&mut self, list: DescList<'_>) -> Result<PreparedLocal, Error> {
        let i = self.take_prep()?;
        let form = self.fill_prep(list, |e, k, d| desc::resolve_local(&e.registry, k, d))?;
        let generation = self.commit_prep(i, Side::Local, 0, form);
        self.prep_users(i, false);
        Ok(PreparedLocal {
            index: i as u32,
            generation,
        })
    }

    /// Resolves `descs` against the regions of `peer` once, for
    /// [`make_xfer`](Engine::make_xfer). It goes stale when the peer is
    /// reloaded or invalidated.
    pub fn prep_remote(&mut self, peer: &str, descs: &[Desc]) -> Result<PreparedRemote, Error> {
        self.prep_remote_list(peer, descs.into())
    }

    /// [`prep_remote`](Engine::prep_remote) for an explicit or strided list.
    pub fn prep_remote_list(
        &mut self,
        peer: &str,
        list: DescList<'_>,
    ) -> Result<PreparedRemote, Error> {
        let p = self.peer_index(peer)?;
        let i = self.take_prep()?;
        let form = self.fill_prep(list, |e, k, d| e.resolve_remote(p, k, d))?;
        let generation = self.commit_prep(i, Side::Remote, p, form);
        Ok(PreparedRemote {
            index: i as u32,
            generation,
        })
    }

    pub(super) fn prep_slot(
        &self,
        index: u32,
        generation: u32,
        side: Side,
    ) -> Result<usize, Error> {
        match self.preps.get(index as usize) {
            Some(s) if s.live && s.generation == generation && s.side == side => Ok(index as usize),
            _ => Err(Error::StalePrepared { index, generation }),
        }
    }

    /// Entries of prepared list `i`.
    pub(super) fn prep_len(&self, i: usize) -> u32 {
        match self.preps[i].form {
            PrepForm::Explicit { len, .. } => len,
            PrepForm::Strided { count, .. } => count,
        }
    }

    /// Entry `k` of prepared list `i`.
    pub(super) fn prep_entry(&self, i: usize, k: u32) -> Option<Resolved> {
        match self.preps[i].form {
            PrepForm::Explicit { start, len } => {
                (k < len).then(|| self.entries[(start + k) as usize])
            }
            PrepForm::Strided {
                region,
                addr,
                len,
                stride,
                count,
            } => (k < count).then(|| Resolved {
                region,
                addr: addr + stride * k as u64,
                len,
            }),
        }
    }

    pub(super) fn free_prep(&mut self, i: usize) {
        if self.preps[i].side == Side::Local {
            self.prep_users(i, true);
        }
        let slot = &mut self.preps[i];
        if let PrepForm::Explicit { start, len } = slot.form {
            if start + len == self.entries_top {
                self.entries_top = start;
            }
        }
        slot.form = PrepForm::Explicit { start: 0, len: 0 };
        slot.live = false;
        slot.generation = slot.generation.wrapping_add(1);
        slot.next_free = self.free_prep;
        self.free_prep = i as u32;
    }

    /// Releases a local prepared list.
    pub fn release_local(&mut self, list: PreparedLocal) -> Result<(), Error> {
        let i = self.prep_slot(list.index, list.generation, Side::Local)?;
        self.free_prep(i);
        Ok(())
    }

    /// Releases a remote prepared list.
    pub fn release_remote(&mut self, list: PreparedRemote) -> Result<(), Error> {
        let i = self.prep_slot(list.index, list.generation, Side::Remote)?;
        self.free_prep(i);
        Ok(())
    }

    /// The name of the peer a prepared remote list belongs to.
    pub fn prepared_peer(&self, list: PreparedRemote) -> Result<&str, Error> {
        let ri = self.prep_slot(list.index, list.generation, Side::Remote)?;
        Ok(self.peers[self.preps[ri].peer as usize].name.as_str())
    }
}
