//! The staging protocol's receiving side over the core's in-memory
//! transport; the data paths need a GPU (`std-shim/tests/gpu.rs`).
use super::*;
use kvxfer_core::transport::loopback::{Loopback, LoopbackMemory};

const BASE: u64 = 0x1000;
type Mem = LoopbackMemory<4096>;

/// A loopback agent that registers host memory only, as UCX without
/// CUDA support and libfabric do: VRAM is staged over it.
fn host_only(mem: &Mem, id: u32) -> Loopback<'_, 4096> {
    let mut t = Loopback::new(mem, id);
    let mut caps = t.capabilities();
    caps.mem_kinds = MemKinds::DRAM;
    t.set_capabilities(caps);
    t
}

#[test]
fn vram_passes_through_to_an_inner_transport_that_registers_it() {
    let mem = Box::new(Mem::new(BASE));
    assert!(!Staged::new(host_only(&mem, 1)).native_vram());
    // The loopback transport takes VRAM itself.
    let mut a = Staged::new(Loopback::new(&mem, 1));
    assert!(a.native_vram());
    let region = Region {
        addr: 0x1100,
        len: 256,
        dev: 0,
        kind: MemKind::Vram,
    };
    // The peer's VRAM key is the inner transport's: no staging.
    let peer = a.connect(&2u32.to_le_bytes()).unwrap();
    let b = Loopback::new(&mem, 2);
    let mut key = [0u8; 64];
    let n = b.pack_key(&region, &mut key).unwrap();
    assert!(matches!(
        a.unpack_key(&peer, &region, &key[..n]),
        Ok(StagedKey::Host(k)) if *k == region
    ));
    // A staging key still names staged VRAM.
    let staged = msg::vram_key(b"sixteen byte key");
    assert!(matches!(
        a.unpack_key(&peer, &region, &staged),
        Ok(StagedKey::Vram(r, _)) if r == region
    ));
}

fn recv<T: Transport>(t: &mut T) -> Option<Vec<u8>> {
    let mut b = vec![0; 4096];
    t.poll_notification(&mut b).map(|r| {
        let n = r.expect("notification");
        b.truncate(n);
        b
    })
}

/// Sends `req` from plain loopback agent 2 to staged agent 1, lets
/// agent 1 poll its notifications (which must yield no user message),
/// and returns the answer agent 2 received.
fn ask(
    a: &mut Staged<Loopback<'_, 4096>>,
    b: &mut Loopback<'_, 4096>,
    req: &Request<'_>,
) -> String {
    let to_a = b.connect(&1u32.to_le_bytes()).unwrap();
    let mut out = Vec::new();
    msg::encode_request(req, &mut out).unwrap();
    b.send_notification(&to_a, &out).unwrap();
    assert_eq!(recv(a), None, "a request is not a user notification");
    let answer = recv(b).expect("an answer");
    match msg::decode(&answer).unwrap() {
        Message::Done { id, result } => {
            assert_eq!(id, req.id);
            match result {
                Ok(()) => "ok".to_string(),
                Err(t) => t.to_string(),
            }
        }
        other => panic!("not an answer: {other:?}"),
    }
}

#[test]
fn user_notifications_pass_and_staging_messages_are_taken_out() {
    let mem = Box::new(Mem::new(BASE));
    let mut a = Staged::new(host_only(&mem, 1));
    let mut b = Loopback::new(&mem, 2);
    let to_a = b.connect(&1u32.to_le_bytes()).unwrap();
    let mut done = Vec::new();
    msg::encode_done(42, Ok(()), &mut done);
    b.send_notification(&to_a, b"\x05alicehello").unwrap();
    // Malformed, and an answer to nothing asked: both dropped.
    b.send_notification(&to_a, &msg::PREFIX).unwrap();
    b.send_notification(&to_a, &done).unwrap();
    b.send_notification(&to_a, b"\x03bobbye").unwrap();
    assert_eq!(recv(&mut a).unwrap(), b"\x05alicehello");
    assert_eq!(recv(&mut a).unwrap(), b"\x03bobbye");
    assert_eq!(recv(&mut a), None);
    assert_eq!(a.staging_events(), 2);
}

#[test]
fn a_notification_larger_than_the_buffer_waits_for_one_that_fits() {
    let mem = Box::new(Mem::new(BASE));
    let mut a = Staged::new(host_only(&mem, 1));
    let mut b = Loopback::new(&mem, 2);
    let to_a = b.connect(&1u32.to_le_bytes()).unwrap();
    let long = [7u8; 100];
    b.send_notification(&to_a, &long).unwrap();
    b.send_notification(&to_a, b"\x01xnext").unwrap();
    let mut small = [0u8; 10];
    for _ in 0..2 {
        assert_eq!(
            a.poll_notification(&mut small),
            Some(Err(Error::BufferTooSmall {
                needed: 100,
                available: 10
            }))
        );
    }
    assert_eq!(recv(&mut a).unwrap(), long);
    assert_eq!(recv(&mut a).unwrap(), b"\x01xnext");
}

#[test]
fn requests_outside_registered_vram_or_the_pool_are_answered_with_the_reason() {
    let mem = Box::new(Mem::new(BASE));
    let mut a = Staged::new(host_only(&mem, 1));
    let mut b = Loopback::new(&mem, 2);
    let pool = Region::dram(0x1800, 512);
    let reg = b.register(&pool).unwrap();
    let mut key = [0u8; 64];
    let n = b.pack_key(&reg, &mut key).unwrap();
    let addr = 2u32.to_le_bytes();
    let range = |vram, len, host| Range { vram, len, host };
    let req = Request {
        dir: Direction::Pull,
        id: 7,
        ranges: vec![range(0x1100, 128, 0x1800), range(0x1180, 128, 0x1880)],
        pool: 0x1800,
        pool_len: 512,
        addr: &addr,
        key: &key[..n],
        secret: a.secret,
    };
    // Without the server's secret (from its VRAM key), nothing is
    // looked at.
    let guess = Request {
        secret: [0; msg::SECRET_LEN],
        ..req.clone()
    };
    assert_eq!(
        ask(&mut a, &mut b, &guess),
        "LOOPBACK error 1: a staging request without this agent's secret: load its metadata first"
    );
    assert_eq!(
        ask(&mut a, &mut b, &req),
        "LOOPBACK error 1: VRAM 0x1100 (+128 bytes) is not inside a VRAM region registered here"
    );
    // As if VRAM 0x1100 (+256) were registered (that needs a GPU).
    a.vram.push(Region {
        addr: 0x1100,
        len: 256,
        dev: 0,
        kind: MemKind::Vram,
    });
    let with = |id, ranges: Vec<Range>| Request {
        id,
        ranges,
        ..req.clone()
    };
    // The second range runs past the region's end.
    let past_end = with(
        8,
        vec![range(0x1100, 128, 0x1800), range(0x1180, 129, 0x1880)],
    );
    assert_eq!(
        ask(&mut a, &mut b, &past_end),
        "LOOPBACK error 1: VRAM 0x1180 (+129 bytes) is not inside a VRAM region registered here"
    );
    let empty = with(9, vec![range(0x1100, 0, 0x1800)]);
    assert_eq!(
        ask(&mut a, &mut b, &empty),
        "LOOPBACK error 1: VRAM 0x1100 (+0 bytes) is not inside a VRAM region registered here"
    );
    assert_eq!(
        ask(&mut a, &mut b, &with(10, Vec::new())),
        "LOOPBACK error 1: a staging request without ranges"
    );
    let outside_pool = Request {
        dir: Direction::Push,
        ..with(11, vec![range(0x1100, 256, 0x1901)])
    };
    assert_eq!(
            ask(&mut a, &mut b, &outside_pool),
            "LOOPBACK error 1: host range 0x1901 (+256 bytes) leaves the requester's buffer 0x1800 (+512 bytes)"
        );
    let bad_key = Request {
        key: b"not the key",
        ..with(12, req.ranges.clone())
    };
    assert_eq!(
        ask(&mut a, &mut b, &bad_key),
        "LOOPBACK error -3: remote key does not match the peer's region"
    );
    if !driver::driver_present() {
        // A valid request reaches the copy, which needs the driver.
        let answer = ask(&mut a, &mut b, &with(13, req.ranges.clone()));
        assert_eq!(answer, driver::no_driver().to_string());
    }
    assert_eq!(a.staged_in_flight(), 0);
}

#[test]
fn vram_keys_of_another_protocol_version_are_refused() {
    let mem = Box::new(Mem::new(BASE));
    let mut a = Staged::new(host_only(&mem, 1));
    let peer = a.connect(&2u32.to_le_bytes()).unwrap();
    let region = Region {
        addr: 0x1100,
        len: 256,
        dev: 1,
        kind: MemKind::Vram,
    };
    let key = msg::vram_key(b"sixteen byte key");
    assert!(matches!(
        a.unpack_key(&peer, &region, &key),
        Ok(StagedKey::Vram(r, s)) if r == region && &s == b"sixteen byte key"
    ));
    // Each side publishes its own random secret.
    let vram = StagedReg::Vram(region);
    let mut packed = [0u8; 64];
    let n = a.pack_key(&vram, &mut packed).unwrap();
    let other = Staged::new(host_only(&mem, 3));
    let mut packed2 = [0u8; 64];
    let n2 = other.pack_key(&vram, &mut packed2).unwrap();
    assert_eq!((n, n2), (22, 22));
    assert_eq!(msg::vram_secret(&packed[..n]), Some(a.secret));
    assert_ne!(packed[..n], packed2[..n2]);
    let mut v1 = key;
    v1[5] = 1;
    assert_eq!(
        a.unpack_key(&peer, &region, &v1).unwrap_err().to_string(),
        "LOOPBACK error 1: VRAM 0x1100: the peer's key (22 bytes, starting 004b58534701) is not \
             of staging version 2"
    );
    assert_eq!(
        a.unpack_key(&peer, &region, &msg::VRAM_KEY)
            .unwrap_err()
            .to_string(),
        "LOOPBACK error 1: VRAM 0x1100: the peer's key (6 bytes, starting 004b58534702) is not \
             of staging version 2"
    );
}

/// A DRAM-only post of more than [`DIRECT_INLINE`] segments passes its
/// segment list to the inner transport in `direct`, which keeps its
/// allocation: the next such post allocates nothing. The bytes arrive.
#[test]
fn long_dram_posts_reuse_one_segment_list() {
    let mem = Box::new(Mem::new(BASE));
    let mut a = Staged::new(host_only(&mem, 1));
    let b = host_only(&mem, 2);
    let (src, dst) = (Region::dram(BASE, 1024), Region::dram(BASE + 2048, 1024));
    let data: Vec<u8> = (0..1024u32).map(|i| (i * 7 + 3) as u8).collect();
    mem.write(BASE, &data).unwrap();
    let local = a.register(&src).unwrap();
    let peer = a.connect(&2u32.to_le_bytes()).unwrap();
    let mut key = [0u8; 64];
    let n = b.pack_key(&dst, &mut key).unwrap();
    let remote = a.unpack_key(&peer, &dst, &key[..n]).unwrap();
    let segments: Vec<_> = (0..128u64)
        .map(|i| Segment {
            local_addr: BASE + i * 8,
            remote_addr: BASE + 2048 + i * 8,
            len: 8,
            local: &local,
            remote: &remote,
            remote_region_addr: dst.addr,
        })
        .collect();
    let mut seen = Vec::new();
    for round in 0..3u64 {
        let posted = a.post(
            XferOp::Write,
            &peer,
            segments.as_slice().into(),
            None,
            Token(round),
        );
        if posted.unwrap() == PostStatus::InProgress {
            let c = (0..1000).find_map(|_| a.poll()).expect("a completion");
            assert_eq!((c.token, c.result), (Token(round), Ok(())));
        }
        assert!(a.direct.capacity() >= 128, "{}", a.direct.capacity());
        assert!(a.direct.is_empty());
        seen.push(a.direct.as_ptr() as usize);
    }
    assert_eq!(seen[0], seen[1], "the second post allocated");
    assert_eq!(seen[1], seen[2], "the third post allocated");
    let mut got = vec![0u8; 1024];
    mem.read(BASE + 2048, &mut got).unwrap();
    assert_eq!(got, data);
}

/// The transport can move to a progress thread when its inner one can.
#[test]
fn staged_is_send() {
    fn send<T: Send>() {}
    send::<Staged<Loopback<'static, 4096>>>();
    send::<crate::CudaIpcTransport>();
}
