//! The side channel: a small TCP service each agent runs so that peers can
//! fetch its metadata and push theirs.
//!
//! # Wire protocol
//!
//! Every message is a *frame*: a 4-byte little-endian payload length, then
//! the payload. Frames longer than [`MAX_FRAME`] are refused and the
//! connection closed.
//!
//! 1. On accept the server sends `HELLO = "KX" VERSION auth [nonce_s; 32]`
//!    (`auth` is 1 when a key is configured, and only then is the nonce
//!    present).
//! 2. With authentication on, the client answers
//!    `AUTH HMAC(key, "kvxfer-client" ‖ nonce_s) [nonce_c; 32]` and the
//!    server answers `OK HMAC(key, "kvxfer-server" ‖ nonce_c)`, or `ERR text`
//!    and closes. Both sides prove they hold the key (HMAC-SHA256); a client
//!    holding a key refuses a server that does not ask for it.
//! 3. Requests, any number, one at a time:
//!    `GET` → `OK metadata`; `PUSH metadata` → `OK peer-name` or `ERR text`.
//!    After an authenticated handshake every frame, both ways, ends with
//!    `HMAC(session, direction ‖ sequence ‖ payload)`, where
//!    `session = HMAC(key, "kvxfer-session" ‖ nonce_s ‖ nonce_c)`, the
//!    direction is `C` (client to server) or `S`, and the sequence counts
//!    that direction's frames from 0 (64-bit little-endian). A frame whose
//!    tag does not verify (injected, altered, replayed or reordered) is
//!    answered with `ERR` and the connection closed.
//!
//! Every socket has read and write timeouts; a whole frame must arrive
//! within the I/O timeout (a peer trickling bytes cannot stretch it); a
//! connection that sends no request for the idle timeout is closed. At most [`MAX_CONNECTIONS`]
//! connections are served at once; more are closed on accept.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use kvxfer_core::Error;
use sha2::Sha256;

mod server;
pub use server::*;
mod client;
pub use client::*;

/// The name side-channel errors carry in [`Error::Backend::backend`].
pub const SIDE_CHANNEL: &str = "SIDE_CHANNEL";
/// Largest frame payload accepted, in bytes (4 MiB).
pub const MAX_FRAME: usize = 4 << 20;
/// Most connections served at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Protocol version sent in the hello (2: every frame after an
/// authenticated handshake carries a tag).
pub const VERSION: u8 = 2;

const NONCE_LEN: usize = 32;
const MAC_LEN: usize = 32;
const OP_AUTH: u8 = 0x01;
const OP_GET: u8 = 0x02;
const OP_PUSH: u8 = 0x03;
const OP_INVALIDATE: u8 = 0x04;
const STATUS_OK: u8 = 0x00;
const STATUS_ERR: u8 = 0x01;

type HmacSha256 = Hmac<Sha256>;

/// What the server asks of the agent it serves.
pub trait Handler: Send + Sync + 'static {
    /// This agent's metadata.
    fn metadata(&self) -> Result<Vec<u8>, Error>;
    /// Loads a peer's metadata; returns the peer's name.
    fn load(&self, blob: &[u8]) -> Result<String, Error>;
    /// Forgets the peer `name` at its own request; refused unless
    /// implemented.
    fn invalidate(&self, name: &str) -> Result<(), Error> {
        let _ = name;
        Err(Error::Unsupported {
            backend: "SIDE_CHANNEL",
            what: "invalidation",
        })
    }
}

/// Socket timeouts and the authentication key.
#[derive(Clone)]
pub struct Options {
    /// Read, write and connect timeout.
    pub io_timeout: Duration,
    /// Longest wait for the next request before the server closes.
    pub idle_timeout: Duration,
    /// Shared key; `None` turns authentication off.
    pub key: Option<Vec<u8>>,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Turns an I/O failure into kvxfer's error: timeouts become
/// [`Error::TimedOut`], anything else a side-channel backend error naming
/// the peer and what was being done.
fn io_error(e: &io::Error, peer: &str, what: &str, timeout: Duration) -> Error {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Error::TimedOut {
            after_ms: ms(timeout),
        },
        _ => Error::backend(
            SIDE_CHANNEL,
            i64::from(e.raw_os_error().unwrap_or(-1)),
            &format!("{what} {peer}: {e}"),
        ),
    }
}

fn protocol_error(peer: &str, text: &str) -> Error {
    Error::backend(SIDE_CHANNEL, -1, &format!("{peer}: {text}"))
}

/// Writes one frame.
pub fn write_frame(w: &mut impl Write, payload: &[u8]) -> io::Result<()> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|&l| l as usize <= MAX_FRAME)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("frame of {} bytes exceeds {MAX_FRAME}", payload.len()),
            )
        })?;
    let mut buf = Vec::with_capacity(4 + payload.len());
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(payload);
    w.write_all(&buf)?;
    w.flush()
}

/// Why a frame could not be read.
#[derive(Debug)]
pub enum FrameError {
    /// The stream failed, timed out or ended.
    Io(io::Error),
    /// The announced length exceeds the limit.
    TooLarge {
        /// Announced length.
        len: u64,
        /// The limit.
        max: u64,
    },
}

/// Reads one frame of at most `max` payload bytes. The payload buffer is
/// only allocated once the length is known to be acceptable.
pub fn read_frame(r: &mut impl Read, max: usize) -> Result<Vec<u8>, FrameError> {
    let mut hdr = [0u8; 4];
    r.read_exact(&mut hdr).map_err(FrameError::Io)?;
    let len = u32::from_le_bytes(hdr) as usize;
    if len > max {
        return Err(FrameError::TooLarge {
            len: len as u64,
            max: max as u64,
        });
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).map_err(FrameError::Io)?;
    Ok(buf)
}

/// Reads from a stream under one deadline for the whole read: each read
/// waits only for what is left of it, so a peer that trickles bytes cannot
/// hold a read (and its connection) open past the deadline.
struct DeadlineReader<'a> {
    stream: &'a TcpStream,
    deadline: Instant,
}

impl<'a> DeadlineReader<'a> {
    fn new(stream: &'a TcpStream, timeout: Duration) -> Self {
        DeadlineReader {
            stream,
            deadline: Instant::now() + timeout,
        }
    }
}

impl Read for DeadlineReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "deadline for the frame passed",
            ));
        }
        self.stream.set_read_timeout(Some(left))?;
        let mut s = self.stream;
        s.read(buf)
    }
}

fn frame_error(e: FrameError, peer: &str, what: &str, timeout: Duration) -> Error {
    match e {
        FrameError::Io(e) => io_error(&e, peer, what, timeout),
        FrameError::TooLarge { len, max } => Error::backend(
            SIDE_CHANNEL,
            i64::try_from(len).unwrap_or(i64::MAX),
            &format!("{peer}: frame of {len} bytes exceeds the limit of {max}"),
        ),
    }
}

fn nonce() -> Result<[u8; NONCE_LEN], Error> {
    let mut n = [0u8; NONCE_LEN];
    getrandom::getrandom(&mut n).map_err(|e| {
        Error::backend(
            SIDE_CHANNEL,
            i64::from(e.code().get()),
            &format!("random nonce: {e}"),
        )
    })?;
    Ok(n)
}

fn mac(key: &[u8], label: &[u8], nonce: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length.
    let mut m = <HmacSha256 as Mac>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    m.update(label);
    m.update(nonce);
    m
}

/// The per-frame authentication of one connection after an authenticated
/// handshake.
struct FrameAuth {
    key: [u8; MAC_LEN],
    send_label: u8,
    recv_label: u8,
    send_seq: u64,
    recv_seq: u64,
}

impl FrameAuth {
    /// The session of the side whose frames carry `send_label` (`b'C'` for
    /// the client, `b'S'` for the server).
    fn new(key: &[u8], nonce_s: &[u8], nonce_c: &[u8], send_label: u8) -> FrameAuth {
        let mut m = mac(key, b"kvxfer-session", nonce_s);
        m.update(nonce_c);
        FrameAuth {
            key: m.finalize().into_bytes().into(),
            send_label,
            recv_label: if send_label == b'C' { b'S' } else { b'C' },
            send_seq: 0,
            recv_seq: 0,
        }
    }

    fn tag(&self, label: u8, seq: u64, payload: &[u8]) -> HmacSha256 {
        let mut m = mac(&self.key, &[label], &seq.to_le_bytes());
        m.update(payload);
        m
    }

    /// `payload` with its tag appended; counts the frame.
    fn seal(&mut self, payload: &[u8]) -> Vec<u8> {
        let tag = self.tag(self.send_label, self.send_seq, payload).finalize();
        self.send_seq += 1;
        let mut out = Vec::with_capacity(payload.len() + MAC_LEN);
        out.extend_from_slice(payload);
        out.extend_from_slice(&tag.into_bytes());
        out
    }

    /// The payload of a received frame whose tag verifies; counts it.
    fn open(&mut self, mut frame: Vec<u8>) -> Option<Vec<u8>> {
        let at = frame.len().checked_sub(MAC_LEN)?;
        self.tag(self.recv_label, self.recv_seq, &frame[..at])
            .verify_slice(&frame[at..])
            .ok()?;
        self.recv_seq += 1;
        frame.truncate(at);
        Some(frame)
    }
}

/// Sends `payload`, sealed when the connection has a session.
fn send_on(
    stream: &mut TcpStream,
    session: &mut Option<FrameAuth>,
    payload: &[u8],
    peer: &str,
    timeout: Duration,
) -> Result<(), Error> {
    match session {
        Some(s) => send(stream, &s.seal(payload), peer, timeout),
        None => send(stream, payload, peer, timeout),
    }
}

/// Sends `ERR text`, sealed when the connection has a session.
fn send_err_on(
    stream: &mut TcpStream,
    session: &mut Option<FrameAuth>,
    text: &str,
    peer: &str,
    timeout: Duration,
) -> Result<(), Error> {
    let mut p = vec![STATUS_ERR];
    p.extend_from_slice(text.as_bytes());
    send_on(stream, session, &p, peer, timeout)
}

#[cfg(test)]
mod tests;
