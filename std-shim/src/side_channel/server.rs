//! The serving side: [`Server`], its accept loop and one thread per connection.

use super::*;

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

pub(super) fn send(
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
        session = Some(FrameAuth::new(key, &nonce_s, &msg[1 + MAC_LEN..], b'S'));
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
