//! The test's side: a transport connected to one [`Target`].

use std::time::{Duration, Instant};

use kvxfer_core::{
    Completion, Error, PostStatus, Region, Segment, Segments, Token, Transport, XferOp,
};

use crate::Target;

/// How long [`Initiator::run_parts`] waits for a transfer.
pub const XFER_TIMEOUT: Duration = Duration::from_secs(70);

/// A transport connected to a target, with the target's key unpacked and
/// local registrations by index.
pub struct Initiator<T: Transport> {
    /// The transport.
    pub t: T,
    /// The connection to the target.
    pub peer: Option<T::Peer>,
    /// The target's key.
    pub rkey: Option<T::RemoteKey>,
    /// Local registrations, in the order made.
    pub regs: Vec<T::LocalReg>,
    /// The target's buffer.
    pub remote: Region,
}

impl<T: Transport> Initiator<T> {
    /// Connects `t` to `target` and unpacks its key.
    pub fn connect(t: T, target: &Target) -> Self {
        let mut ini = Initiator {
            t,
            peer: None,
            rkey: None,
            regs: Vec::new(),
            remote: target.region,
        };
        ini.reconnect(target);
        ini
    }

    /// Releases the key and the connection (if any) and connects to
    /// `target` again: a new connection and a new key.
    pub fn reconnect(&mut self, target: &Target) {
        self.release();
        let peer = self.t.connect(&target.addr).expect("connect");
        let rkey = self
            .t
            .unpack_key(&peer, &target.region, &target.key)
            .expect("unpack key");
        self.peer = Some(peer);
        self.rkey = Some(rkey);
        self.remote = target.region;
    }

    fn release(&mut self) {
        if let Some(k) = self.rkey.take() {
            self.t.release_key(k);
        }
        if let Some(p) = self.peer.take() {
            self.t.disconnect(p);
        }
    }

    /// The connection to the target.
    pub fn peer(&self) -> &T::Peer {
        self.peer.as_ref().expect("connected")
    }

    /// Registers `region`; returns its index in `regs`.
    pub fn register_region(&mut self, region: &Region) -> usize {
        let reg = self.t.register(region).expect("register");
        self.regs.push(reg);
        self.regs.len() - 1
    }

    /// Posts `parts` (local address, offset in the target's buffer, length)
    /// of registration `reg`.
    pub fn post_parts(
        &mut self,
        op: XferOp,
        reg: usize,
        parts: &[(u64, u64, u64)],
        note: Option<&[u8]>,
        token: Token,
    ) -> Result<PostStatus, Error> {
        let local = &self.regs[reg];
        let remote = self.rkey.as_ref().expect("key");
        let segs: Vec<Segment<'_, T::LocalReg, T::RemoteKey>> = parts
            .iter()
            .map(|&(local_addr, remote_off, len)| Segment {
                local_addr,
                remote_addr: self.remote.addr + remote_off,
                len,
                local,
                remote,
                remote_region_addr: self.remote.addr,
            })
            .collect();
        let peer = self.peer.as_ref().expect("peer");
        let st = self
            .t
            .post(op, peer, Segments::from(&segs[..]), note, token);
        if st == Ok(PostStatus::Done) {
            assert!(
                self.t.capabilities().may_complete_inline,
                "{token:?} completed inline although the capabilities say it may not"
            );
        }
        st
    }

    /// Posts, then waits for the transfer's end.
    pub fn run_parts(
        &mut self,
        op: XferOp,
        reg: usize,
        parts: &[(u64, u64, u64)],
        note: Option<&[u8]>,
    ) -> Result<(), Error> {
        match self.post_parts(op, reg, parts, note, Token(7))? {
            PostStatus::Done => Ok(()),
            PostStatus::InProgress => self.wait_for(Token(7), XFER_TIMEOUT),
        }
    }

    /// Polls until the completion of `token`; panics on another token or
    /// after `timeout`.
    pub fn wait_for(&mut self, token: Token, timeout: Duration) -> Result<(), Error> {
        let c = self.wait_n(1, timeout).remove(0);
        assert_eq!(c.token, token, "completion for an unexpected token");
        c.result
    }

    /// Polls until `n` completions have come; panics after `timeout`.
    pub fn wait_n(&mut self, n: usize, timeout: Duration) -> Vec<Completion> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        while got.len() < n {
            assert!(
                Instant::now() < deadline,
                "only {} of {n} completions after {timeout:?}",
                got.len()
            );
            match self.t.poll() {
                Some(c) => got.push(c),
                None => std::thread::yield_now(),
            }
        }
        got
    }

    /// Polls for `quiet`, panicking on any completion.
    pub fn assert_quiet(&mut self, quiet: Duration, what: &str) {
        let until = Instant::now() + quiet;
        while Instant::now() < until {
            if let Some(c) = self.t.poll() {
                panic!("{what}: {c:?}");
            }
            std::thread::yield_now();
        }
    }

    /// Releases the key, the connection and every registration.
    pub fn close(mut self) {
        self.release();
        for r in self.regs.drain(..) {
            self.t.deregister(r);
        }
    }
}
