//! Unit tests of the transport's state logic against a real provider.

mod notifications {
    use std::time::{Duration, Instant};

    use kvxfer_core::{Completion, Error, Token, Transport};

    use crate::xfer::OpKind;
    use crate::{FabricConfig, FabricPeer, FabricTransport};

    /// A notification longer than the receiver accepts is refused by the
    /// sender (the receiver's limit travels in its address), so it is
    /// never cut and lost there.
    #[test]
    fn a_notification_longer_than_the_receiver_takes_is_refused_when_sent() {
        let cfg = FabricConfig::default().with_provider("tcp;ofi_rxm");
        let small = FabricConfig {
            max_notification: 256,
            ..cfg.clone()
        };
        let mut rx = FabricTransport::new(&small).expect("receiver");
        let mut tx = FabricTransport::new(&cfg).expect("sender");
        let address = rx.address.clone();
        let peer = tx.connect(&address).expect("connect");
        assert_eq!(
            tx.send_notification(&peer, &[7u8; 257]),
            Err(Error::NotificationTooLong { len: 257, max: 256 })
        );
        tx.send_notification(&peer, &[7u8; 256]).expect("256 bytes");
        let mut buf = [0u8; 4096];
        let deadline = Instant::now() + Duration::from_secs(10);
        let got = loop {
            let _ = tx.poll();
            match rx.poll_notification(&mut buf) {
                Some(r) => break r,
                None => assert!(Instant::now() < deadline, "nothing arrived"),
            }
        };
        assert_eq!(got, Ok(256));
        assert_eq!(rx.lost_notes, 0);
    }

    /// A transfer whose notification send is still with the provider when
    /// it is abandoned: the send buffer must come back when that send
    /// completes, or the pool drains one buffer per such abandon.
    #[test]
    fn an_abandoned_notification_send_gives_its_buffer_back() {
        let cfg = FabricConfig::default().with_provider("tcp;ofi_rxm");
        let mut t = FabricTransport::new(&cfg).expect("tcp;ofi_rxm transport");
        let sends = t.free_sends.len();
        // A real peer (this endpoint itself): the abandon removes it from
        // the address vector.
        let address = t.address.clone();
        let peer = t.connect(&address).expect("connect to itself");
        let slot = t.free_xfers.pop().unwrap();
        let gen = {
            let x = &mut t.xfers[slot as usize];
            x.peer = peer.addr;
            x.peer_id = peer.id;
            x.peer_label = peer.label.clone();
            x.gen = x.gen.wrapping_add(1);
            x.live = true;
            x.token = Token(7);
            x.has_notif = true;
            x.notif_sent = true;
            x.outstanding = 1;
            x.gen
        };
        t.active.push(slot);
        let buf = t.free_sends.pop().unwrap();
        let op = t
            .alloc_op(OpKind::XferNotif {
                xfer: slot,
                gen,
                buf,
            })
            .unwrap();
        t.abandon(Token(7)).expect("in flight");
        assert_eq!(
            t.poll().map(|c| (c.token, c.result)),
            Some((Token(7), Err(Error::disconnected(peer.label()))))
        );
        assert_eq!(
            t.abandon(Token(7)),
            Err(Error::Unsupported {
                backend: crate::BACKEND,
                what: "abandoning a transfer that is not in flight",
            })
        );
        assert_eq!(t.free_sends.len(), sends - 1, "still with the provider");
        // The provider reports the orphaned send at last.
        let ctx = t.ctxs.ptr(op);
        t.on_completion(ctx, 0, None);
        assert_eq!(t.ops[op as usize], OpKind::Free);
        assert_eq!(t.free_sends.len(), sends, "the send buffer is back");
        t.disconnect(peer);
    }

    /// A transport connected to itself, over tcp;ofi_rxm, with the
    /// connection set up by a first notification.
    fn self_connected() -> (FabricTransport, FabricPeer) {
        let cfg = FabricConfig::default().with_provider("tcp;ofi_rxm");
        let mut t = FabricTransport::new(&cfg).expect("tcp;ofi_rxm transport");
        let address = t.address.clone();
        let peer = t.connect(&address).expect("connect to itself");
        t.send_notification(&peer, b"hello").unwrap();
        assert_eq!(collect(&mut t, 1, 0).0, [b"hello"]);
        (t, peer)
    }

    /// Makes a transfer to `peer` whose data has been delivered and whose
    /// notification `notif` is still to be issued (by the next `poll`).
    fn data_delivered(t: &mut FabricTransport, peer: &FabricPeer, token: Token, notif: &[u8]) {
        let slot = t.free_xfers.pop().unwrap();
        let x = &mut t.xfers[slot as usize];
        x.peer = peer.addr;
        x.peer_id = peer.id;
        x.peer_label = peer.label.clone();
        x.gen = x.gen.wrapping_add(1);
        x.live = true;
        x.token = token;
        x.notif = notif.to_vec();
        x.has_notif = true;
        x.notif_sent = false;
        t.active.push(slot);
    }

    /// Polls until `notifs` notifications and `completions` completions
    /// arrived (5 s at most); returns them in arrival order.
    fn collect(
        t: &mut FabricTransport,
        notifs: usize,
        completions: usize,
    ) -> (Vec<Vec<u8>>, Vec<Completion>) {
        let deadline = Instant::now() + Duration::from_secs(5);
        let (mut got, mut done) = (Vec::new(), Vec::new());
        let mut buf = [0u8; 64];
        while got.len() < notifs || done.len() < completions {
            assert!(
                Instant::now() < deadline,
                "timed out with notifications {got:?} and completions {done:?}"
            );
            if let Some(c) = t.poll() {
                done.push(c);
            }
            while let Some(n) = t.poll_notification(&mut buf) {
                got.push(buf[..n.expect("notification")].to_vec());
            }
        }
        (got, done)
    }

    /// A standalone notification the provider refused (the operation pool
    /// was empty, as under FI_EAGAIN) is still queued when a transfer's
    /// data is delivered: the transfer's notification is queued behind it,
    /// and one issued after goes after both.
    #[test]
    fn a_transfer_notification_does_not_overtake_a_queued_one() {
        let (mut t, peer) = self_connected();
        let sends = t.free_sends.len();
        let ops = std::mem::take(&mut t.free_ops);
        t.send_notification(&peer, b"first").unwrap();
        assert_eq!(t.pending_sends.len(), 1);
        // The provider could take a send again, but "first" is still
        // queued when the transfer's data is found delivered.
        t.free_ops = ops;
        data_delivered(&mut t, &peer, Token(7), b"transfer");
        t.advance();
        assert_eq!(t.pending_sends.len(), 2, "queued behind the first");
        t.send_notification(&peer, b"last").unwrap();
        let (got, done) = collect(&mut t, 3, 1);
        assert_eq!(got, [&b"first"[..], b"transfer", b"last"]);
        assert_eq!(
            done.into_iter()
                .map(|c| (c.token, c.result))
                .collect::<Vec<_>>(),
            [(Token(7), Ok(()))]
        );
        assert!(t.pending_sends.is_empty());
        assert_eq!(t.free_sends.len(), sends);
        t.disconnect(peer);
    }

    /// A transfer's notification refused by the provider is queued, so a
    /// standalone notification issued after it cannot overtake it; the
    /// transfer completes only once it is sent.
    #[test]
    fn a_refused_transfer_notification_keeps_its_place() {
        let (mut t, peer) = self_connected();
        let ops = std::mem::take(&mut t.free_ops);
        data_delivered(&mut t, &peer, Token(9), b"transfer");
        assert!(t.poll().is_none());
        assert_eq!(t.pending_sends.len(), 1, "queued on pushback");
        t.send_notification(&peer, b"after").unwrap();
        for _ in 0..10 {
            assert!(t.poll().is_none(), "complete before its notification left");
        }
        t.free_ops = ops;
        let (got, done) = collect(&mut t, 2, 1);
        assert_eq!(got, [&b"transfer"[..], b"after"]);
        assert_eq!(done[0].token, Token(9));
        assert_eq!(done[0].result, Ok(()));
        t.disconnect(peer);
    }

    /// A transfer abandoned with its notification still queued: the
    /// notification is never sent and its buffer comes back.
    #[test]
    fn an_abandoned_transfer_drops_its_queued_notification() {
        let (mut t, peer) = self_connected();
        let sends = t.free_sends.len();
        let ops = std::mem::take(&mut t.free_ops);
        data_delivered(&mut t, &peer, Token(11), b"transfer");
        assert!(t.poll().is_none());
        assert_eq!(t.pending_sends.len(), 1);
        assert_eq!(t.free_sends.len(), sends - 1);
        t.abandon(Token(11)).expect("in flight");
        assert!(t.pending_sends.is_empty());
        assert_eq!(t.free_sends.len(), sends);
        t.free_ops = ops;
        assert_eq!(
            t.poll().map(|c| (c.token, c.result)),
            Some((Token(11), Err(Error::disconnected(peer.label()))))
        );
        let mut buf = [0u8; 64];
        let deadline = Instant::now() + Duration::from_millis(200);
        while Instant::now() < deadline {
            t.poll();
            assert!(t.poll_notification(&mut buf).is_none(), "it was sent");
        }
        t.disconnect(peer);
    }
}

mod setup {
    use std::time::Instant;

    use kvxfer_core::{Error, Region, Transport};
    use libfabric_sys as sys;

    use crate::transport::{EAGAIN, RECV_SETUP_TIMEOUT};
    use crate::xfer::Xfer;
    use crate::{FabricConfig, FabricTransport, BACKEND};

    #[test]
    fn operations_the_provider_cancelled_mean_the_peer_is_gone() {
        let x = Xfer::empty();
        let ecanceled = -(sys::FI_ECANCELED as i32);
        for (errno, prov_errno) in [
            (ecanceled, libc::ENOENT),
            (ecanceled, 0),
            (-(sys::FI_ENOTCONN as i32), 0),
            (-(sys::FI_EIO as i32), libc::ECONNRESET),
        ] {
            assert_eq!(
                FabricTransport::xfer_error(&x, errno, prov_errno, true, "t"),
                Error::disconnected(""),
                "{errno} {prov_errno}"
            );
        }
        assert_eq!(
            FabricTransport::xfer_error(&x, -(sys::FI_EIO as i32), libc::ECONNRESET, false, "t"),
            Error::backend(BACKEND, -(sys::FI_EIO as i64), "WRITE t")
        );
    }

    /// A registration dropped on another thread is not closed there (the
    /// domain takes no call concurrent with the transport's): the
    /// transport closes it on its next call.
    #[test]
    fn a_registration_dropped_elsewhere_is_closed_by_the_transport() {
        let cfg = FabricConfig::default().with_provider("tcp;ofi_rxm");
        let mut t = FabricTransport::new(&cfg).expect("transport");
        let buf = vec![0u8; 4096];
        let reg = t
            .register(&Region::dram(buf.as_ptr() as u64, 4096))
            .expect("register");
        std::thread::spawn(move || drop(reg)).join().unwrap();
        assert_eq!(t.fabric.dropped_regs(), 1);
        assert!(t.poll().is_none());
        assert_eq!(t.fabric.dropped_regs(), 0);
        // Deregistration closes at once.
        let reg = t
            .register(&Region::dram(buf.as_ptr() as u64, 4096))
            .expect("register");
        t.deregister(reg);
        assert_eq!(t.fabric.dropped_regs(), 0);
    }

    /// A registration outliving its transport keeps the domain (and the
    /// fabric) open: the endpoint closes with the transport, the domain
    /// with the last registration.
    #[test]
    fn a_registration_keeps_its_domain_open_after_the_transport() {
        let cfg = FabricConfig::default().with_provider("tcp;ofi_rxm");
        let mut t = FabricTransport::new(&cfg).expect("transport");
        let buf = vec![0u8; 4096];
        let reg = t
            .register(&Region::dram(buf.as_ptr() as u64, 4096))
            .expect("register");
        let domain = std::sync::Arc::downgrade(t.fabric.domain());
        drop(t);
        assert!(domain.upgrade().is_some(), "closed under a registration");
        drop(reg);
        assert!(domain.upgrade().is_none(), "left open after the last one");
    }

    /// More receive buffers than the provider's receive queue holds: on
    /// libfabric 1.x, rxm answers FI_EAGAIN past its
    /// 2048 entries and `new` gives up after its own bound. libfabric 2.x's
    /// rxm grows its queue (as do its shm, sockets and tcp): all are
    /// posted.
    #[test]
    fn more_receive_buffers_than_the_queue_holds() {
        let mut cfg = FabricConfig::default().with_provider("tcp;ofi_rxm");
        cfg.notification_queue = 100_000;
        cfg.max_notification = 16;
        let start = Instant::now();
        let r = FabricTransport::new(&cfg);
        let took = start.elapsed();
        if cfg!(libfabric_v2) {
            let t = r.expect("libfabric 2.x takes 100000 receive buffers");
            assert_eq!(t.provider_name(), "tcp;ofi_rxm");
            return;
        }
        match r {
            Err(Error::Backend {
                backend,
                code,
                text,
            }) => {
                assert_eq!(backend, BACKEND);
                assert_eq!(code, EAGAIN);
                assert!(text.contains("provider tcp;ofi_rxm: fi_recv"), "{text}");
                assert!(text.contains("of 100000 notification buffers"), "{text}");
            }
            other => panic!("gave {:?}", other.map(|t| t.provider_name().to_owned())),
        }
        assert!(
            took >= RECV_SETUP_TIMEOUT && took < RECV_SETUP_TIMEOUT * 2,
            "{took:?}"
        );
    }
}

mod sockets_window {
    use std::time::{Duration, Instant};

    use kvxfer_core::{PostStatus, Region, Segment, Segments, Token, Transport, XferOp};

    use crate::{FabricConfig, FabricTransport};

    /// Over `sockets`, a peer has one operation with the provider at a
    /// time (see `PEER_WINDOW_SOCKETS`): of 16 WRITEs posted at once 15
    /// wait in the transport, a notification sent meanwhile waits too,
    /// and all are issued from `poll`, the WRITEs' bytes arriving whole.
    #[test]
    fn a_sockets_peer_has_one_operation_with_the_provider_at_a_time() {
        const N: usize = 16;
        const LEN: usize = 4096;
        let cfg = FabricConfig::default().with_provider("sockets");
        let mut t = FabricTransport::new(&cfg).expect("sockets transport");
        let src: Vec<u8> = (0..N * LEN).map(|i| (i % 251) as u8).collect();
        let mut dst = vec![0u8; N * LEN];
        let src_region = Region::dram(src.as_ptr() as u64, src.len() as u64);
        let dst_region = Region::dram(dst.as_mut_ptr() as u64, dst.len() as u64);
        let src_reg = t.register(&src_region).expect("register source");
        let dst_reg = t.register(&dst_region).expect("register target");
        let address = t.address.clone();
        let peer = t.connect(&address).expect("connect to itself");
        let mut key = [0u8; 256];
        let n = t.pack_key(&dst_reg, &mut key).expect("pack key");
        let rkey = t
            .unpack_key(&peer, &dst_region, &key[..n])
            .expect("unpack key");
        for i in 0..N {
            let off = (i * LEN) as u64;
            let seg = [Segment {
                local_addr: src_region.addr + off,
                remote_addr: dst_region.addr + off,
                len: LEN as u64,
                local: &src_reg,
                remote: &rkey,
                remote_region_addr: dst_region.addr,
            }];
            let st = t.post(
                XferOp::Write,
                &peer,
                Segments::from(&seg[..]),
                None,
                Token(i as u64),
            );
            assert_eq!(st, Ok(PostStatus::InProgress));
        }
        assert_eq!(t.in_provider.get(&peer.id), Some(&1));
        let waiting: usize = t
            .active
            .iter()
            .filter(|&&s| t.xfers[s as usize].next == 0)
            .count();
        assert_eq!(waiting, N - 1, "WRITEs not yet given to the provider");
        t.send_notification(&peer, b"after").expect("notification");
        assert_eq!(t.pending_sends.len(), 1, "the notification waits");
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut done = 0;
        let mut notes = Vec::new();
        let mut buf = [0u8; 64];
        while done < N || notes.is_empty() {
            assert!(Instant::now() < deadline, "{done} of {N} WRITEs done");
            if let Some(c) = t.poll() {
                assert_eq!(c.result, Ok(()), "{:?}", c.token);
                done += 1;
            }
            assert!(t.in_provider.get(&peer.id).copied().unwrap_or(0) <= 1);
            while let Some(r) = t.poll_notification(&mut buf) {
                notes.push(buf[..r.expect("notification")].to_vec());
            }
        }
        assert_eq!(notes, [b"after"]);
        assert!(t.in_provider.is_empty(), "every operation counted back");
        assert!(dst == src, "the target's bytes after {N} WRITEs");
        t.deregister(src_reg);
        t.deregister(dst_reg);
    }
}
