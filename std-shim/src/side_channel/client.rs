//! The asking side: [`Client`].

use super::*;

/// A connection to a peer's side channel.
pub struct Client {
    pub(super) stream: TcpStream,
    peer: String,
    timeout: Duration,
    pub(super) session: Option<FrameAuth>,
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

    pub(super) fn recv(&mut self, what: &str) -> Result<Vec<u8>, Error> {
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
                        self.session = Some(FrameAuth::new(key, &hello[4..], &nonce_c, b'C'));
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
