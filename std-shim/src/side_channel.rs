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
struct Session {
    key: [u8; MAC_LEN],
    send_label: u8,
    recv_label: u8,
    send_seq: u64,
    recv_seq: u64,
}

impl Session {
    /// The session of the side whose frames carry `send_label` (`b'C'` for
    /// the client, `b'S'` for the server).
    fn new(key: &[u8], nonce_s: &[u8], nonce_c: &[u8], send_label: u8) -> Session {
        let mut m = mac(key, b"kvxfer-session", nonce_s);
        m.update(nonce_c);
        Session {
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
    session: &mut Option<Session>,
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
    session: &mut Option<Session>,
    text: &str,
    peer: &str,
    timeout: Duration,
) -> Result<(), Error> {
    let mut p = vec![STATUS_ERR];
    p.extend_from_slice(text.as_bytes());
    send_on(stream, session, &p, peer, timeout)
}

/// A running side-channel server. Stops (and closes its connections) on
/// [`stop`](Server::stop) or drop.
pub struct Server {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<HashMap<u64, TcpStream>>>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Binds `listen` and starts serving `handler` on a thread.
    pub fn start(listen: &str, handler: Arc<dyn Handler>, opts: Options) -> Result<Server, Error> {
        let listener = TcpListener::bind(listen)
            .map_err(|e| io_error(&e, listen, "listen on", opts.io_timeout))?;
        let addr = listener
            .local_addr()
            .map_err(|e| io_error(&e, listen, "local address of", opts.io_timeout))?;
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<HashMap<u64, TcpStream>>> = Arc::default();
        let thread = {
            let stop = Arc::clone(&stop);
            let conns = Arc::clone(&conns);
            std::thread::Builder::new()
                .name("kvxfer-side".into())
                .spawn(move || accept_loop(listener, handler, opts, stop, conns))
                .map_err(|e| io_error(&e, listen, "spawn server thread for", Duration::ZERO))?
        };
        log::debug!("side channel listening on {addr}");
        Ok(Server {
            addr,
            stop,
            conns,
            thread: Some(thread),
        })
    }

    /// The address the server listens on (with the chosen port).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, closes open connections and joins the accept
    /// thread. Idempotent.
    pub fn stop(&mut self) {
        if self.stop.swap(true, Ordering::SeqCst) {
            return;
        }
        // Wake the blocking accept with a connection of our own.
        let mut wake = self.addr;
        if wake.ip().is_unspecified() {
            wake.set_ip(match wake {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        let _ = TcpStream::connect_timeout(&wake, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Ok(conns) = self.conns.lock() {
            for s in conns.values() {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(
    listener: TcpListener,
    handler: Arc<dyn Handler>,
    opts: Options,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<HashMap<u64, TcpStream>>>,
) {
    let next_id = AtomicU64::new(0);
    for stream in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                log::warn!("side channel accept failed: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let peer = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "?".into());
        let id = next_id.fetch_add(1, Ordering::Relaxed);
        {
            let Ok(mut c) = conns.lock() else { break };
            if c.len() >= MAX_CONNECTIONS {
                log::warn!("side channel: {MAX_CONNECTIONS} connections open, closing {peer}");
                continue;
            }
            match stream.try_clone() {
                Ok(s) => {
                    c.insert(id, s);
                }
                Err(e) => {
                    log::warn!("side channel: cannot track {peer}: {e}");
                    continue;
                }
            }
        }
        let handler = Arc::clone(&handler);
        let opts = opts.clone();
        let conns2 = Arc::clone(&conns);
        let spawned = std::thread::Builder::new()
            .name("kvxfer-side-conn".into())
            .spawn(move || {
                if let Err(e) = serve(stream, &peer, &*handler, &opts) {
                    log::debug!("side channel connection from {peer} ended: {e}");
                }
                if let Ok(mut c) = conns2.lock() {
                    c.remove(&id);
                }
            });
        if let Err(e) = spawned {
            log::warn!("side channel: cannot spawn a connection thread: {e}");
            if let Ok(mut c) = conns.lock() {
                c.remove(&id);
            }
        }
    }
}

fn send(
    stream: &mut TcpStream,
    payload: &[u8],
    peer: &str,
    timeout: Duration,
) -> Result<(), Error> {
    write_frame(stream, payload).map_err(|e| io_error(&e, peer, "send to", timeout))
}

/// Serves one connection until it closes, idles out or misbehaves.
fn serve(
    mut stream: TcpStream,
    peer: &str,
    handler: &dyn Handler,
    opts: &Options,
) -> Result<(), Error> {
    let io_t = opts.io_timeout;
    let setup = |s: &TcpStream, read: Duration| {
        s.set_read_timeout(Some(read))
            .and_then(|_| s.set_write_timeout(Some(io_t)))
            .map_err(|e| io_error(&e, peer, "set timeouts on", io_t))
    };
    setup(&stream, io_t)?;
    let _ = stream.set_nodelay(true);

    // Hello, and the challenge when a key is set.
    let mut hello = vec![b'K', b'X', VERSION, u8::from(opts.key.is_some())];
    let server_nonce = match &opts.key {
        Some(_) => {
            let n = nonce()?;
            hello.extend_from_slice(&n);
            Some(n)
        }
        None => None,
    };
    send(&mut stream, &hello, peer, io_t)?;
    let mut session = None;
    if let (Some(key), Some(nonce_s)) = (&opts.key, server_nonce) {
        let msg = read_frame(&mut DeadlineReader::new(&stream, io_t), MAX_FRAME)
            .map_err(|e| frame_error(e, peer, "read auth from", io_t))?;
        if msg.len() != 1 + MAC_LEN + NONCE_LEN || msg[0] != OP_AUTH {
            let _ = send_err_on(
                &mut stream,
                &mut session,
                "authentication required",
                peer,
                io_t,
            );
            return Err(protocol_error(peer, "client did not authenticate"));
        }
        if mac(key, b"kvxfer-client", &nonce_s)
            .verify_slice(&msg[1..1 + MAC_LEN])
            .is_err()
        {
            let _ = send_err_on(
                &mut stream,
                &mut session,
                "authentication failed",
                peer,
                io_t,
            );
            return Err(protocol_error(peer, "client authentication failed"));
        }
        let mut ok = vec![STATUS_OK];
        ok.extend_from_slice(
            &mac(key, b"kvxfer-server", &msg[1 + MAC_LEN..])
                .finalize()
                .into_bytes(),
        );
        send(&mut stream, &ok, peer, io_t)?;
        session = Some(Session::new(key, &nonce_s, &msg[1 + MAC_LEN..], b'S'));
    }

    loop {
        // Wait for the next request for the idle timeout, then read its
        // body under the I/O timeout.
        setup(&stream, opts.idle_timeout)?;
        let mut hdr = [0u8; 4];
        match stream.read(&mut hdr[..1]) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) => {
                return Err(io_error(
                    &e,
                    peer,
                    "wait for a request from",
                    opts.idle_timeout,
                ))
            }
        }
        setup(&stream, io_t)?;
        let mut chained = (&hdr[..1]).chain(DeadlineReader::new(&stream, io_t));
        let req = read_frame(&mut chained, MAX_FRAME);
        let req = match req {
            Ok(r) => r,
            Err(FrameError::TooLarge { len, max }) => {
                let _ = send_err_on(
                    &mut stream,
                    &mut session,
                    &format!("frame of {len} bytes exceeds the limit of {max}"),
                    peer,
                    io_t,
                );
                return Err(frame_error(
                    FrameError::TooLarge { len, max },
                    peer,
                    "",
                    io_t,
                ));
            }
            Err(e) => return Err(frame_error(e, peer, "read a request from", io_t)),
        };
        let req = match &mut session {
            Some(s) => match s.open(req) {
                Some(r) => r,
                None => {
                    let text = "frame authentication failed";
                    let _ = send_err_on(&mut stream, &mut session, text, peer, io_t);
                    return Err(protocol_error(peer, text));
                }
            },
            None => req,
        };
        match req.first() {
            Some(&OP_GET) if req.len() == 1 => match handler.metadata() {
                Ok(md) => {
                    let mut p = Vec::with_capacity(1 + md.len());
                    p.push(STATUS_OK);
                    p.extend_from_slice(&md);
                    send_on(&mut stream, &mut session, &p, peer, io_t)?;
                }
                Err(e) => send_err_on(&mut stream, &mut session, &e.to_string(), peer, io_t)?,
            },
            Some(&OP_PUSH) => match handler.load(&req[1..]) {
                Ok(name) => {
                    log::info!("side channel: loaded metadata of {name:?} from {peer}");
                    let mut p = vec![STATUS_OK];
                    p.extend_from_slice(name.as_bytes());
                    send_on(&mut stream, &mut session, &p, peer, io_t)?;
                }
                Err(e) => send_err_on(&mut stream, &mut session, &e.to_string(), peer, io_t)?,
            },
            Some(&OP_INVALIDATE) => {
                let r = std::str::from_utf8(&req[1..])
                    .map_err(|_| Error::InvalidName {
                        len: (req.len() - 1) as u64,
                    })
                    .and_then(|name| handler.invalidate(name).map(|()| name));
                match r {
                    Ok(name) => {
                        log::info!("side channel: {peer} invalidated the metadata of {name:?}");
                        send_on(&mut stream, &mut session, &[STATUS_OK], peer, io_t)?;
                    }
                    Err(e) => send_err_on(&mut stream, &mut session, &e.to_string(), peer, io_t)?,
                }
            }
            other => {
                let text = format!("unknown request {:#04x}", other.copied().unwrap_or(0));
                let _ = send_err_on(&mut stream, &mut session, &text, peer, io_t);
                return Err(protocol_error(peer, &text));
            }
        }
    }
}

/// A connection to a peer's side channel.
pub struct Client {
    stream: TcpStream,
    peer: String,
    timeout: Duration,
    session: Option<Session>,
}

impl Client {
    /// Connects to `addr` (`host:port`) and authenticates when the server
    /// asks for it (or refuses the server if `key` is set and it does not).
    pub fn connect(addr: &str, key: Option<&[u8]>, timeout: Duration) -> Result<Client, Error> {
        let addrs: Vec<SocketAddr> = addr
            .to_socket_addrs()
            .map_err(|e| {
                Error::backend(SIDE_CHANNEL, -1, &format!("cannot resolve {addr:?}: {e}"))
            })?
            .collect();
        let mut last = Error::backend(
            SIDE_CHANNEL,
            -1,
            &format!("{addr:?} resolves to no address"),
        );
        let mut stream = None;
        for a in &addrs {
            match TcpStream::connect_timeout(a, timeout) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = io_error(&e, addr, "connect to", timeout),
            }
        }
        let stream = stream.ok_or(last)?;
        stream
            .set_read_timeout(Some(timeout))
            .and_then(|_| stream.set_write_timeout(Some(timeout)))
            .map_err(|e| io_error(&e, addr, "set timeouts on", timeout))?;
        let _ = stream.set_nodelay(true);
        let mut c = Client {
            stream,
            peer: addr.to_string(),
            timeout,
            session: None,
        };
        c.handshake(key)?;
        Ok(c)
    }

    fn recv(&mut self, what: &str) -> Result<Vec<u8>, Error> {
        read_frame(
            &mut DeadlineReader::new(&self.stream, self.timeout),
            MAX_FRAME,
        )
        .map_err(|e| frame_error(e, &self.peer, what, self.timeout))
    }

    fn handshake(&mut self, key: Option<&[u8]>) -> Result<(), Error> {
        let hello = self.recv("read hello from")?;
        if hello.len() < 4 || hello[..2] != *b"KX" {
            return Err(protocol_error(&self.peer, "not a kvxfer side channel"));
        }
        if hello[2] != VERSION {
            return Err(protocol_error(
                &self.peer,
                &format!(
                    "side channel version {} (this build speaks {VERSION})",
                    hello[2]
                ),
            ));
        }
        let wants_auth = hello[3] != 0;
        match (wants_auth, key) {
            (false, None) => Ok(()),
            (false, Some(_)) => Err(protocol_error(
                &self.peer,
                "server does not authenticate but a key is set",
            )),
            (true, None) => Err(protocol_error(
                &self.peer,
                "server requires KVXFER_AUTH_KEY",
            )),
            (true, Some(key)) => {
                if hello.len() != 4 + NONCE_LEN {
                    return Err(protocol_error(&self.peer, "malformed hello"));
                }
                let nonce_c = nonce()?;
                let mut msg = vec![OP_AUTH];
                msg.extend_from_slice(
                    &mac(key, b"kvxfer-client", &hello[4..])
                        .finalize()
                        .into_bytes(),
                );
                msg.extend_from_slice(&nonce_c);
                send(&mut self.stream, &msg, &self.peer, self.timeout)?;
                let reply = self.recv("read auth reply from")?;
                match reply.first() {
                    Some(&STATUS_OK) if reply.len() == 1 + MAC_LEN => {
                        mac(key, b"kvxfer-server", &nonce_c)
                            .verify_slice(&reply[1..])
                            .map_err(|_| {
                                protocol_error(&self.peer, "server authentication failed")
                            })?;
                        self.session = Some(Session::new(key, &hello[4..], &nonce_c, b'C'));
                        Ok(())
                    }
                    Some(&STATUS_ERR) => Err(protocol_error(
                        &self.peer,
                        &format!("refused: {}", String::from_utf8_lossy(&reply[1..])),
                    )),
                    _ => Err(protocol_error(&self.peer, "malformed auth reply")),
                }
            }
        }
    }

    fn request(&mut self, payload: &[u8], what: &str) -> Result<Vec<u8>, Error> {
        send_on(
            &mut self.stream,
            &mut self.session,
            payload,
            &self.peer,
            self.timeout,
        )?;
        let reply = self.recv(what)?;
        let mut reply = match &mut self.session {
            Some(s) => s.open(reply).ok_or_else(|| {
                protocol_error(&self.peer, &format!("{what}: reply authentication failed"))
            })?,
            None => reply,
        };
        match reply.first() {
            Some(&STATUS_OK) => {
                reply.remove(0);
                Ok(reply)
            }
            Some(&STATUS_ERR) => Err(protocol_error(
                &self.peer,
                &format!("{what}: {}", String::from_utf8_lossy(&reply[1..])),
            )),
            _ => Err(protocol_error(
                &self.peer,
                &format!("{what}: malformed reply"),
            )),
        }
    }

    /// Fetches the peer's metadata.
    pub fn get_metadata(&mut self) -> Result<Vec<u8>, Error> {
        self.request(&[OP_GET], "get metadata")
    }

    /// Pushes our metadata; returns the name under which the peer loaded
    /// it (ours).
    pub fn push_metadata(&mut self, blob: &[u8]) -> Result<String, Error> {
        let mut p = Vec::with_capacity(1 + blob.len());
        p.push(OP_PUSH);
        p.extend_from_slice(blob);
        let name = self.request(&p, "push metadata")?;
        String::from_utf8(name).map_err(|_| protocol_error(&self.peer, "peer name is not UTF-8"))
    }

    /// Asks the peer to forget the metadata it holds under `name` (ours,
    /// as pushed or fetched before).
    pub fn invalidate(&mut self, name: &str) -> Result<(), Error> {
        let mut p = Vec::with_capacity(1 + name.len());
        p.push(OP_INVALIDATE);
        p.extend_from_slice(name.as_bytes());
        self.request(&p, "invalidate metadata").map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    struct Fixed {
        md: Vec<u8>,
        loaded: Mutex<Vec<Vec<u8>>>,
    }

    impl Handler for Fixed {
        fn metadata(&self) -> Result<Vec<u8>, Error> {
            Ok(self.md.clone())
        }
        fn load(&self, blob: &[u8]) -> Result<String, Error> {
            if blob.is_empty() {
                return Err(Error::BadMetadata(kvxfer_core::MetaError::BadMagic));
            }
            self.loaded.lock().unwrap().push(blob.to_vec());
            Ok(format!("peer-{}", blob.len()))
        }
    }

    fn opts(key: Option<&[u8]>) -> Options {
        Options {
            io_timeout: Duration::from_millis(500),
            idle_timeout: Duration::from_millis(300),
            key: key.map(<[u8]>::to_vec),
        }
    }

    fn server(key: Option<&[u8]>) -> (Server, Arc<Fixed>) {
        let h = Arc::new(Fixed {
            md: b"metadata\0with zero".to_vec(),
            loaded: Mutex::default(),
        });
        let s = Server::start("127.0.0.1:0", h.clone(), opts(key)).unwrap();
        (s, h)
    }

    #[test]
    fn frame_round_trip() {
        let mut buf = Vec::new();
        write_frame(&mut buf, b"hello").unwrap();
        write_frame(&mut buf, b"").unwrap();
        assert_eq!(&buf[..4], &5u32.to_le_bytes());
        let mut r = &buf[..];
        assert_eq!(read_frame(&mut r, 16).unwrap(), b"hello");
        assert_eq!(read_frame(&mut r, 16).unwrap(), b"");
        assert!(
            matches!(read_frame(&mut r, 16), Err(FrameError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof)
        );
    }

    #[test]
    fn oversized_frame_rejected_before_allocation() {
        let mut r = &u32::MAX.to_le_bytes()[..];
        match read_frame(&mut r, MAX_FRAME) {
            Err(FrameError::TooLarge { len, max }) => {
                assert_eq!(len, u64::from(u32::MAX));
                assert_eq!(max, MAX_FRAME as u64);
            }
            other => panic!("{other:?}"),
        }
        assert!(write_frame(&mut Vec::new(), &vec![0u8; MAX_FRAME + 1]).is_err());
    }

    #[test]
    fn get_and_push() {
        let (s, h) = server(None);
        let mut c =
            Client::connect(&s.local_addr().to_string(), None, Duration::from_secs(2)).unwrap();
        assert_eq!(c.get_metadata().unwrap(), b"metadata\0with zero");
        assert_eq!(c.push_metadata(b"abc").unwrap(), "peer-3");
        assert_eq!(c.get_metadata().unwrap(), b"metadata\0with zero");
        assert_eq!(h.loaded.lock().unwrap().as_slice(), &[b"abc".to_vec()]);
        // The handler's error travels back as text.
        match c.push_metadata(b"") {
            Err(Error::Backend {
                backend: SIDE_CHANNEL,
                text,
                ..
            }) => {
                assert!(text.contains("bad magic"), "{text}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn invalidation_is_refused_unless_the_handler_offers_it() {
        let (s, _) = server(None);
        let addr = s.local_addr().to_string();
        let mut c = Client::connect(&addr, None, Duration::from_secs(2)).unwrap();
        match c.invalidate("peer-3") {
            Err(Error::Backend { text, .. }) => assert_eq!(
                text.as_str(),
                format!(
                    "{addr}: invalidate metadata: backend SIDE_CHANNEL does not support \
                     invalidation"
                )
            ),
            other => panic!("{other:?}"),
        }
        // The connection stays usable.
        assert_eq!(c.get_metadata().unwrap(), b"metadata\0with zero");
    }

    #[test]
    fn server_rejects_oversized_request() {
        let (s, _) = server(None);
        let mut raw = TcpStream::connect(s.local_addr()).unwrap();
        raw.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let _hello = read_frame(&mut raw, 64).unwrap();
        raw.write_all(&((MAX_FRAME + 1) as u32).to_le_bytes())
            .unwrap();
        let reply = read_frame(&mut raw, 1024).unwrap();
        assert_eq!(reply[0], STATUS_ERR);
        assert!(String::from_utf8_lossy(&reply[1..]).contains("exceeds the limit"));
        // And then closes.
        let mut b = [0u8; 1];
        assert_eq!(raw.read(&mut b).unwrap_or(0), 0);
    }

    #[test]
    fn idle_connection_closed() {
        let (s, _) = server(None);
        let mut raw = TcpStream::connect(s.local_addr()).unwrap();
        raw.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let _hello = read_frame(&mut raw, 64).unwrap();
        let t = Instant::now();
        let mut b = [0u8; 1];
        assert_eq!(raw.read(&mut b).unwrap_or(0), 0);
        let waited = t.elapsed();
        assert!(
            waited >= Duration::from_millis(250) && waited < Duration::from_secs(2),
            "{waited:?}"
        );
    }

    #[test]
    fn truncated_request_times_out() {
        let (s, _) = server(None);
        let mut raw = TcpStream::connect(s.local_addr()).unwrap();
        raw.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let _hello = read_frame(&mut raw, 64).unwrap();
        // Announce 10 bytes, send 2: the server gives up after its I/O timeout.
        raw.write_all(&10u32.to_le_bytes()).unwrap();
        raw.write_all(&[OP_PUSH, 1]).unwrap();
        let t = Instant::now();
        let mut b = [0u8; 1];
        assert_eq!(raw.read(&mut b).unwrap_or(0), 0);
        assert!(t.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn client_times_out_on_silent_server() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let t = Instant::now();
        let r = Client::connect(&addr, None, Duration::from_millis(200));
        assert_eq!(r.err(), Some(Error::TimedOut { after_ms: 200 }));
        assert!(t.elapsed() < Duration::from_secs(2));
        drop(l);
    }

    #[test]
    fn connect_refused_names_address() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        drop(l);
        match Client::connect(&addr, None, Duration::from_millis(500)) {
            Err(Error::Backend {
                backend: SIDE_CHANNEL,
                text,
                ..
            }) => assert!(text.contains(&addr), "{text}"),
            other => panic!("{:?}", other.err()),
        }
    }

    #[test]
    fn authentication() {
        let (s, _) = server(Some(b"secret"));
        let addr = s.local_addr().to_string();
        let t = Duration::from_secs(2);
        let mut c = Client::connect(&addr, Some(b"secret"), t).unwrap();
        assert_eq!(c.get_metadata().unwrap(), b"metadata\0with zero");
        let err = |r: Result<Client, Error>| match r {
            Err(Error::Backend {
                backend: SIDE_CHANNEL,
                text,
                ..
            }) => text.as_str().to_string(),
            Err(e) => panic!("{e:?}"),
            Ok(_) => panic!("connected"),
        };
        assert!(err(Client::connect(&addr, Some(b"wrong"), t))
            .contains("refused: authentication failed"));
        assert!(err(Client::connect(&addr, None, t)).contains("requires KVXFER_AUTH_KEY"));
        let (open, _) = server(None);
        assert!(err(Client::connect(
            &open.local_addr().to_string(),
            Some(b"secret"),
            t
        ))
        .contains("does not authenticate"));
        // A client that skips authentication gets nothing.
        let mut raw = TcpStream::connect(s.local_addr()).unwrap();
        raw.set_read_timeout(Some(t)).unwrap();
        let _hello = read_frame(&mut raw, 64).unwrap();
        write_frame(&mut raw, &[OP_GET]).unwrap();
        let reply = read_frame(&mut raw, 64).unwrap();
        assert_eq!(reply[0], STATUS_ERR);
    }

    /// After an authenticated handshake, a frame without a valid tag (as
    /// an on-path party would inject) is refused and the connection closed;
    /// so is a valid frame sent again (replayed). Nothing is loaded.
    #[test]
    fn frames_after_the_handshake_are_authenticated() {
        let (s, fixed) = server(Some(b"secret"));
        let addr = s.local_addr().to_string();
        let t = Duration::from_secs(2);
        let refused = |c: &mut Client| {
            let reply = c.recv("read reply").expect("an answer before closing");
            let reply = c.session.as_mut().unwrap().open(reply).expect("sealed ERR");
            assert_eq!(reply, b"\x01frame authentication failed");
            assert!(c.recv("read after close").is_err(), "connection left open");
        };

        // An injected PUSH, untagged and with a forged tag.
        for forged in [false, true] {
            let mut c = Client::connect(&addr, Some(b"secret"), t).unwrap();
            let mut push = vec![OP_PUSH];
            push.extend_from_slice(b"injected metadata");
            if forged {
                push.extend_from_slice(&[0x5a; MAC_LEN]);
            }
            write_frame(&mut c.stream, &push).unwrap();
            refused(&mut c);
        }

        // A replayed GET: the first copy is answered, the second refused.
        let mut c = Client::connect(&addr, Some(b"secret"), t).unwrap();
        let sealed = c.session.as_mut().unwrap().seal(&[OP_GET]);
        write_frame(&mut c.stream, &sealed).unwrap();
        let reply = c.recv("read reply").unwrap();
        let reply = c.session.as_mut().unwrap().open(reply).unwrap();
        assert_eq!(reply[0], STATUS_OK);
        write_frame(&mut c.stream, &sealed).unwrap();
        refused(&mut c);

        // A reply altered on the way fails the client's check.
        let mut c = Client::connect(&addr, Some(b"secret"), t).unwrap();
        c.session.as_mut().unwrap().recv_seq += 1;
        match c.get_metadata() {
            Err(Error::Backend { text, .. }) => {
                assert!(text.contains("reply authentication failed"), "{text}")
            }
            other => panic!("{other:?}"),
        }

        // Honest requests still work, several on one connection.
        let mut c = Client::connect(&addr, Some(b"secret"), t).unwrap();
        assert_eq!(c.get_metadata().unwrap(), b"metadata\0with zero");
        assert_eq!(c.push_metadata(b"ours").unwrap(), "peer-4");
        assert_eq!(c.get_metadata().unwrap(), b"metadata\0with zero");
        assert_eq!(*fixed.loaded.lock().unwrap(), vec![b"ours".to_vec()]);
    }

    #[test]
    fn stop_closes_connections_and_is_idempotent() {
        let (mut s, _) = server(None);
        let mut raw = TcpStream::connect(s.local_addr()).unwrap();
        raw.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let _hello = read_frame(&mut raw, 64).unwrap();
        let t = Instant::now();
        s.stop();
        s.stop();
        let mut b = [0u8; 1];
        assert_eq!(raw.read(&mut b).unwrap_or(0), 0);
        assert!(t.elapsed() < Duration::from_secs(1));
        assert!(TcpStream::connect(s.local_addr()).is_err());
    }
}
