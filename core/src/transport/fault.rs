//! A middleware that wraps any [`Transport`] and fails, delays or reorders
//! its completions by a seeded, deterministic plan, in the manner of
//! smoltcp's `FaultInjector`.
//!
//! Faults come from two sources: a random plan ([`FaultPlan`]: per-mille
//! rates drawn from an xorshift generator, so a seed replays exactly) and
//! one-shot scripted faults ([`FaultInjector::fail_next_post`] and friends)
//! for tests that need one precise failure.

use crate::error::Error;
use crate::mem::Region;
use crate::transport::{Capabilities, Completion, PostStatus, Segments, Token, Transport, XferOp};

/// Completions the injector can hold back at once.
pub const HELD_CAP: usize = 64;

/// The random part of the plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FaultPlan {
    /// Seed of the generator; the same seed gives the same faults.
    pub seed: u64,
    /// Posts that fail, per thousand.
    pub fail_post_per_mille: u16,
    /// Completions turned into failures, per thousand.
    pub fail_completion_per_mille: u16,
    /// The error given to failed posts and completions.
    pub error: Error,
    /// Each completion is held back for 0 to this many empty polls.
    pub max_delay_polls: u32,
    /// Hand back ready completions in random order rather than oldest first.
    pub reorder: bool,
    /// After this many posts, the peer "disconnects": see
    /// [`FaultInjector::disconnect`].
    pub disconnect_after_posts: Option<u64>,
}

impl Default for FaultPlan {
    fn default() -> Self {
        FaultPlan {
            seed: 1,
            fail_post_per_mille: 0,
            fail_completion_per_mille: 0,
            error: Error::backend("FAULT", -1, "injected fault"),
            max_delay_polls: 0,
            reorder: false,
            disconnect_after_posts: None,
        }
    }
}

/// What the injector has done so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FaultStats {
    /// Posts failed.
    pub posts_failed: u64,
    /// Completions turned into failures.
    pub completions_failed: u64,
    /// Completions held back at least one poll.
    pub completions_delayed: u64,
    /// Completions handed back out of arrival order.
    pub completions_reordered: u64,
}

#[derive(Debug)]
struct Held {
    completion: Completion,
    polls_left: u32,
}

/// A [`Transport`] wrapper that injects faults.
#[derive(Debug)]
pub struct FaultInjector<T> {
    inner: T,
    plan: FaultPlan,
    rng: u64,
    held: heapless::Vec<Held, HELD_CAP>,
    next_post_error: Option<Error>,
    next_completion_error: Option<Error>,
    next_delay: Option<u32>,
    cancel_unsupported: bool,
    disconnected: bool,
    posts: u64,
    stats: FaultStats,
}

impl<T: Transport> FaultInjector<T> {
    /// Wraps `inner` with `plan`.
    pub fn new(inner: T, plan: FaultPlan) -> Self {
        let rng = if plan.seed == 0 {
            0x9E37_79B9_7F4A_7C15
        } else {
            plan.seed
        };
        FaultInjector {
            inner,
            plan,
            rng,
            held: heapless::Vec::new(),
            next_post_error: None,
            next_completion_error: None,
            next_delay: None,
            cancel_unsupported: false,
            disconnected: false,
            posts: 0,
            stats: FaultStats::default(),
        }
    }

    /// The wrapped transport.
    pub fn inner(&self) -> &T {
        &self.inner
    }

    /// The wrapped transport, mutably.
    pub fn inner_mut(&mut self) -> &mut T {
        &mut self.inner
    }

    /// What has been injected so far.
    pub fn stats(&self) -> &FaultStats {
        &self.stats
    }

    /// Completions held back now.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// The next post fails with `error` without reaching the transport.
    pub fn fail_next_post(&mut self, error: Error) {
        self.next_post_error = Some(error);
    }

    /// The next completion to arrive reports `error` instead.
    pub fn fail_next_completion(&mut self, error: Error) {
        self.next_completion_error = Some(error);
    }

    /// The next completion to arrive is held back for `polls` empty polls.
    pub fn delay_next_completion(&mut self, polls: u32) {
        self.next_delay = Some(polls);
    }

    /// Makes [`Transport::cancel`] answer [`Error::Unsupported`] (or work
    /// again), whatever the wrapped transport can do.
    pub fn set_cancel_unsupported(&mut self, unsupported: bool) {
        self.cancel_unsupported = unsupported;
    }

    /// Drops the link: every later post fails, and every completion held or
    /// still to come reports, [`Error::RemoteDisconnected`] with an empty
    /// peer name (the engine fills it in).
    pub fn disconnect(&mut self) {
        self.disconnected = true;
    }

    /// Queues a completion the wrapped transport never produced, as a
    /// misbehaving library might (e.g. a late one for a cancelled
    /// transfer). It is handed out by the next [`Transport::poll`].
    pub fn inject_completion(&mut self, completion: Completion) -> Result<(), Error> {
        self.held
            .push(Held {
                completion,
                polls_left: 0,
            })
            .map_err(|_| Error::CapacityExceeded {
                what: "held completions",
                capacity: HELD_CAP as u32,
                setting: "",
            })
    }

    fn next_random(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }

    fn chance(&mut self, per_mille: u16) -> bool {
        per_mille > 0 && self.next_random() % 1000 < per_mille as u64
    }

    fn disconnected_error() -> Error {
        Error::disconnected("")
    }

    /// Moves the wrapped transport's completions into `held`, applying the
    /// plan to each.
    fn drain_inner(&mut self) {
        while !self.held.is_full() {
            let Some(mut c) = self.inner.poll() else {
                break;
            };
            if self.disconnected {
                c.result = Err(Self::disconnected_error());
            } else if c.result.is_ok() {
                if let Some(e) = self.next_completion_error.take() {
                    c.result = Err(e);
                    self.stats.completions_failed += 1;
                } else if self.chance(self.plan.fail_completion_per_mille) {
                    c.result = Err(self.plan.error.clone());
                    self.stats.completions_failed += 1;
                }
            }
            let delay = match self.next_delay.take() {
                Some(d) => d,
                None if self.plan.max_delay_polls > 0 => {
                    (self.next_random() % (self.plan.max_delay_polls as u64 + 1)) as u32
                }
                None => 0,
            };
            if delay > 0 {
                self.stats.completions_delayed += 1;
            }
            // Room was checked by the loop condition.
            let _ = self.held.push(Held {
                completion: c,
                polls_left: delay,
            });
        }
    }
}

impl<T: Transport> Transport for FaultInjector<T> {
    type LocalReg = T::LocalReg;
    type Peer = T::Peer;
    type RemoteKey = T::RemoteKey;

    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn capabilities(&self) -> Capabilities {
        let mut caps = self.inner.capabilities();
        // Completions go through `poll` so that they can be failed or delayed.
        caps.may_complete_inline = caps.may_complete_inline && self.plan.max_delay_polls == 0;
        if self.cancel_unsupported {
            caps.can_cancel = false;
        }
        caps
    }

    fn register(&mut self, region: &Region) -> Result<T::LocalReg, Error> {
        self.inner.register(region)
    }

    fn deregister(&mut self, reg: T::LocalReg) {
        self.inner.deregister(reg)
    }

    fn pack_key(&self, reg: &T::LocalReg, out: &mut [u8]) -> Result<usize, Error> {
        self.inner.pack_key(reg, out)
    }

    fn local_address(&self, out: &mut [u8]) -> Result<usize, Error> {
        self.inner.local_address(out)
    }

    fn connect(&mut self, address: &[u8]) -> Result<T::Peer, Error> {
        self.inner.connect(address)
    }

    fn disconnect(&mut self, peer: T::Peer) {
        self.inner.disconnect(peer)
    }

    fn unpack_key(
        &mut self,
        peer: &T::Peer,
        region: &Region,
        key: &[u8],
    ) -> Result<T::RemoteKey, Error> {
        self.inner.unpack_key(peer, region, key)
    }

    fn release_key(&mut self, key: T::RemoteKey) {
        self.inner.release_key(key)
    }

    fn in_use(&mut self, reg: &T::LocalReg) -> bool {
        self.inner.in_use(reg)
    }

    fn arm(&mut self) -> crate::transport::Wake {
        if self.held.is_empty() {
            self.inner.arm()
        } else {
            crate::transport::Wake::Busy
        }
    }

    fn post(
        &mut self,
        op: XferOp,
        peer: &T::Peer,
        segments: Segments<'_, T::LocalReg, T::RemoteKey>,
        notification: Option<&[u8]>,
        token: Token,
    ) -> Result<PostStatus, Error> {
        self.posts += 1;
        if self
            .plan
            .disconnect_after_posts
            .is_some_and(|n| self.posts > n)
        {
            self.disconnected = true;
        }
        if self.disconnected {
            self.stats.posts_failed += 1;
            return Err(Self::disconnected_error());
        }
        if let Some(e) = self.next_post_error.take() {
            self.stats.posts_failed += 1;
            return Err(e);
        }
        if self.chance(self.plan.fail_post_per_mille) {
            self.stats.posts_failed += 1;
            return Err(self.plan.error.clone());
        }
        self.inner.post(op, peer, segments, notification, token)
    }

    fn poll(&mut self) -> Option<Completion> {
        self.drain_inner();
        if self.disconnected {
            for h in self.held.iter_mut() {
                h.completion.result = Err(Self::disconnected_error());
                h.polls_left = 0;
            }
        }
        let ready = self.held.iter().filter(|h| h.polls_left == 0).count();
        if ready == 0 {
            for h in self.held.iter_mut() {
                h.polls_left -= 1;
            }
            return None;
        }
        let pick = if self.plan.reorder {
            (self.next_random() % ready as u64) as usize
        } else {
            0
        };
        let (i, _) = self
            .held
            .iter()
            .enumerate()
            .filter(|(_, h)| h.polls_left == 0)
            .nth(pick)?;
        if i != 0 {
            self.stats.completions_reordered += 1;
        }
        Some(self.held.remove(i).completion)
    }

    fn cancel(&mut self, token: Token) -> Result<(), Error> {
        if self.cancel_unsupported {
            return Err(Error::Unsupported {
                backend: self.inner.name(),
                what: "cancel",
            });
        }
        if let Some(i) = self.held.iter().position(|h| h.completion.token == token) {
            // The wrapped transport has finished with it already.
            self.held.remove(i);
            return Ok(());
        }
        self.inner.cancel(token)
    }

    fn send_notification(&mut self, peer: &T::Peer, msg: &[u8]) -> Result<(), Error> {
        if self.disconnected {
            return Err(Self::disconnected_error());
        }
        self.inner.send_notification(peer, msg)
    }

    fn poll_notification(&mut self, buf: &mut [u8]) -> Option<Result<usize, Error>> {
        self.inner.poll_notification(buf)
    }
}
