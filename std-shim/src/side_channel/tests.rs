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
    let mut c = Client::connect(&s.local_addr().to_string(), None, Duration::from_secs(2)).unwrap();
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
    assert!(
        err(Client::connect(&addr, Some(b"wrong"), t)).contains("refused: authentication failed")
    );
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
