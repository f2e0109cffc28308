//! The scenarios of the conformance suite, each between this process and
//! a [`Target`] process. `module` is the `module_path!()` of the suite
//! module, whose `target_process` the target runs.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use kvxfer_core::{Error, MemKind, PostStatus, Region, Token, Transport, XferOp};

use crate::initiator::XFER_TIMEOUT;
use crate::{assert_same, checksum, pattern, Backend, Initiator, Memory, Target};

/// A target with a buffer of `len` bytes and an initiator connected to it.
fn pair<B: Backend>(b: &B, module: &str, len: usize) -> (Target, Initiator<B::T>) {
    let target = Target::start(module, len);
    let ini = Initiator::connect(b.transport(), &target);
    assert_eq!(ini.t.name(), b.expect().name, "Transport::name");
    (target, ini)
}

/// `len` bytes of the backend's memory holding the pattern of `seed`
/// (zeroes for seed 0).
fn memory<B: Backend>(b: &B, len: usize, seed: u64) -> Box<dyn Memory> {
    let mut m = b.memory(len);
    if seed != 0 {
        m.fill(seed);
    }
    m
}

/// Posts and waits; panics if the transfer fails.
fn run<T: Transport>(
    ini: &mut Initiator<T>,
    op: XferOp,
    reg: usize,
    parts: &[(u64, u64, u64)],
    note: Option<&[u8]>,
    what: &str,
) {
    if let Err(e) = ini.run_parts(op, reg, parts, note) {
        panic!("{what}: {e}");
    }
}

/// WRITE of 100 bytes at a non-zero offset of the target (which tells
/// offset-based keys from address-based ones), compared there byte for
/// byte with the bytes around it untouched; READ of 100 bytes from an odd
/// offset.
pub fn write_read_100_bytes<B: Backend>(b: &B, module: &str) {
    let (mut target, mut ini) = pair(b, module, 4096);
    let src = memory(b, 100, 1);
    let reg = ini.register_region(&src.region());
    run(
        &mut ini,
        XferOp::Write,
        reg,
        &[(src.addr(), 17, 100)],
        None,
        "WRITE",
    );
    assert_same(&target.bytes(17, 100), &src.to_vec(), "WRITE of 100 bytes");
    assert_same(&target.bytes(0, 17), &[0; 17], "bytes before the WRITE");
    assert_same(&target.bytes(117, 8), &[0; 8], "bytes after the WRITE");

    target.fill(42);
    let dst = memory(b, 100, 0);
    let reg = ini.register_region(&dst.region());
    run(
        &mut ini,
        XferOp::Read,
        reg,
        &[(dst.addr(), 33, 100)],
        None,
        "READ",
    );
    assert_same(
        &dst.to_vec(),
        &pattern(42, 4096)[33..133],
        "READ of 100 bytes",
    );
    ini.close();
    target.quit();
}

/// 128 blocks of 16 KiB scattered on both sides (nothing coalesces):
/// WRITE, checked by the target's checksum of its whole buffer, then READ
/// back into other slots and compared block by block.
pub fn scattered_128_x_16_kib<B: Backend>(b: &B, module: &str) {
    const BLOCK: usize = 16 * 1024;
    const BLOCKS: usize = 128;
    let remote_len = 2 * BLOCKS * BLOCK;
    let (mut target, mut ini) = pair(b, module, remote_len);
    let src = memory(b, 3 * BLOCKS * BLOCK, 7);
    let back = memory(b, 3 * BLOCKS * BLOCK, 0);
    let src_reg = ini.register_region(&src.region());
    let back_reg = ini.register_region(&back.region());
    let local_slot = |i: usize| (i * 37) % (3 * BLOCKS);
    let remote_slot = |i: usize| (i * 91) % (2 * BLOCKS);
    let back_slot = |i: usize| (i * 53) % (3 * BLOCKS);
    let parts = |base: u64, slot: &dyn Fn(usize) -> usize| -> Vec<(u64, u64, u64)> {
        (0..BLOCKS)
            .map(|i| {
                (
                    base + (slot(i) * BLOCK) as u64,
                    (remote_slot(i) * BLOCK) as u64,
                    BLOCK as u64,
                )
            })
            .collect()
    };
    let w = parts(src.addr(), &local_slot);
    run(
        &mut ini,
        XferOp::Write,
        src_reg,
        &w,
        None,
        "scattered WRITE",
    );
    let src_bytes = src.to_vec();
    let mut image = vec![0u8; remote_len];
    for i in 0..BLOCKS {
        let (l, r) = (local_slot(i) * BLOCK, remote_slot(i) * BLOCK);
        image[r..r + BLOCK].copy_from_slice(&src_bytes[l..l + BLOCK]);
    }
    assert_eq!(
        target.sum(0, remote_len),
        checksum(&image),
        "the target's buffer after the scattered WRITE"
    );
    let r = parts(back.addr(), &back_slot);
    run(&mut ini, XferOp::Read, back_reg, &r, None, "scattered READ");
    let back_bytes = back.to_vec();
    for i in 0..BLOCKS {
        let (l, k) = (local_slot(i) * BLOCK, back_slot(i) * BLOCK);
        assert_same(
            &back_bytes[k..k + BLOCK],
            &src_bytes[l..l + BLOCK],
            &format!("block {i} after the round trip"),
        );
    }
    ini.close();
    target.quit();
}

/// 64 MiB WRITE, checked by the target's checksum; the target then fills
/// its buffer anew and a 64 MiB READ must bring that back.
pub fn large_64_mib<B: Backend>(b: &B, module: &str) {
    const LEN: usize = 64 << 20;
    let (mut target, mut ini) = pair(b, module, LEN);
    let src = memory(b, LEN, 64);
    let back = memory(b, LEN, 0);
    let src_reg = ini.register_region(&src.region());
    let back_reg = ini.register_region(&back.region());
    let started = Instant::now();
    run(
        &mut ini,
        XferOp::Write,
        src_reg,
        &[(src.addr(), 0, LEN as u64)],
        None,
        "WRITE 64 MiB",
    );
    let wrote = started.elapsed();
    assert_eq!(target.sum(0, LEN), checksum(&src.to_vec()), "64 MiB WRITE");
    target.fill(4242);
    let read = [(back.addr(), 0, LEN as u64)];
    run(&mut ini, XferOp::Read, back_reg, &read, None, "READ 64 MiB");
    assert_same(&back.to_vec(), &pattern(4242, LEN), "64 MiB READ");
    eprintln!("{module}: 64 MiB WRITE in {wrote:?}");
    ini.close();
    target.quit();
}

/// A notification attached to a WRITE of 16 segments reaches the target
/// after the data, binary payload intact; stand-alone notifications (one
/// of the longest length, with zero bytes) arrive intact and in order and
/// report no completion; one byte too many is refused with both lengths.
pub fn notifications_after_the_data<B: Backend>(b: &B, module: &str) {
    const LEN: usize = 1 << 20;
    let (mut target, mut ini) = pair(b, module, LEN);
    let max = ini.t.capabilities().max_notification as usize;
    let src = memory(b, LEN, 99);
    let reg = ini.register_region(&src.region());
    let parts: Vec<_> = (0..16u64)
        .map(|i| {
            (
                src.addr() + i * LEN as u64 / 16,
                i * LEN as u64 / 16,
                LEN as u64 / 16,
            )
        })
        .collect();
    let note = b"block\0ready\xff\x00\x01";
    run(
        &mut ini,
        XferOp::Write,
        reg,
        &parts,
        Some(note),
        "WRITE with a notification",
    );
    let (got, sum) = target.note();
    assert_eq!(got, note, "the notification of the WRITE");
    assert_eq!(
        sum,
        checksum(&src.to_vec()),
        "the notification came before the data"
    );

    let no_completion = |ini: &mut Initiator<B::T>| {
        if let Some(c) = ini.t.poll() {
            panic!("a stand-alone notification reported a completion: {c:?}");
        }
    };
    let mut longest = pattern(5, max);
    longest[17] = 0;
    ini.t
        .send_notification(ini.peer.as_ref().expect("peer"), &longest)
        .expect("send the longest notification");
    let (got, _) = target.note_while(|| no_completion(&mut ini));
    assert_same(&got, &longest, "the longest notification");
    for i in 0..5 {
        let msg = format!("msg-{i}");
        ini.t
            .send_notification(ini.peer.as_ref().expect("peer"), msg.as_bytes())
            .expect("send a notification");
    }
    for i in 0..5 {
        let (got, _) = target.note_while(|| no_completion(&mut ini));
        assert_eq!(
            got,
            format!("msg-{i}").as_bytes(),
            "notification {i} in order"
        );
    }
    let too_long = vec![1u8; max + 1];
    assert_eq!(
        ini.t
            .send_notification(ini.peer.as_ref().expect("peer"), &too_long),
        Err(Error::NotificationTooLong {
            len: max as u64 + 1,
            max: max as u64
        })
    );
    ini.assert_quiet(
        Duration::from_millis(200),
        "a stand-alone notification reported a completion",
    );
    ini.close();
    target.quit();
}

/// 300 WRITEs of 32 KiB in flight at once, each to its own slice of the
/// target, each completed exactly once; the target's buffer then matches
/// (checksum), and 300 READs in flight bring every slice back.
pub fn many_in_flight<B: Backend>(b: &B, module: &str) {
    const XFERS: usize = 300;
    const SLICE: usize = 32 * 1024;
    let (mut target, mut ini) = pair(b, module, XFERS * SLICE);
    let src = memory(b, XFERS * SLICE, 77);
    let back = memory(b, XFERS * SLICE, 0);
    let src_reg = ini.register_region(&src.region());
    let back_reg = ini.register_region(&back.region());
    for (op, reg, base) in [
        (XferOp::Write, src_reg, src.addr()),
        (XferOp::Read, back_reg, back.addr()),
    ] {
        let mut pending = BTreeSet::new();
        for i in 0..XFERS {
            let off = (i * SLICE) as u64;
            let token = Token(1000 + i as u64);
            match ini.post_parts(op, reg, &[(base + off, off, SLICE as u64)], None, token) {
                Ok(PostStatus::Done) => {}
                Ok(PostStatus::InProgress) => {
                    pending.insert(token);
                }
                Err(e) => panic!("post {i} of {XFERS}: {e}"),
            }
        }
        if let Some(n) = b.in_flight(&ini.t) {
            assert_eq!(n, pending.len(), "transfers the transport tracks");
        }
        let deadline = Instant::now() + XFER_TIMEOUT;
        while !pending.is_empty() {
            assert!(
                Instant::now() < deadline,
                "{} {} transfers never completed",
                pending.len(),
                op.name()
            );
            if let Some(c) = ini.t.poll() {
                assert!(
                    pending.remove(&c.token),
                    "unexpected or repeated {:?}",
                    c.token
                );
                if let Err(e) = c.result {
                    panic!("{} {:?}: {e}", op.name(), c.token);
                }
            }
        }
        assert_eq!(ini.t.poll(), None, "no completion beyond one per transfer");
        if op == XferOp::Write {
            assert_eq!(
                target.sum(0, XFERS * SLICE),
                checksum(&src.to_vec()),
                "the target's buffer after {XFERS} WRITEs"
            );
        }
    }
    assert_same(&back.to_vec(), &src.to_vec(), "after the WRITEs and READs");
    ini.close();
    target.quit();
}

/// A transport that can cancel stops an in-flight WRITE (with a
/// notification): `Ok` soon, no completion after it, unknown tokens are
/// fine to cancel, and a later WRITE moves data byte for byte. One that
/// cannot says so, exactly.
pub fn cancel<B: Backend>(b: &B, module: &str) {
    const LEN: usize = 32 << 20;
    let (mut target, mut ini) = pair(b, module, LEN);
    let name = b.expect().name;
    if !ini.t.capabilities().can_cancel {
        assert_eq!(
            ini.t.cancel(Token(1)),
            Err(Error::Unsupported {
                backend: name,
                what: "cancel"
            })
        );
        ini.close();
        target.quit();
        return;
    }
    let src = memory(b, LEN, 3);
    let reg = ini.register_region(&src.region());
    let chunk = 512 * 1024;
    let parts: Vec<_> = (0..LEN / chunk)
        .map(|i| {
            (
                src.addr() + (i * chunk) as u64,
                (i * chunk) as u64,
                chunk as u64,
            )
        })
        .collect();
    let st = ini
        .post_parts(XferOp::Write, reg, &parts, Some(b"never"), Token(11))
        .expect("post");
    let started = Instant::now();
    if st == PostStatus::InProgress {
        ini.t.cancel(Token(11)).expect("cancel");
    }
    let took = started.elapsed();
    eprintln!("{module}: post gave {st:?}, cancel took {took:?}");
    assert!(took < Duration::from_secs(6), "cancel took {took:?}");
    ini.t
        .cancel(Token(999))
        .expect("cancel of an unknown token");
    ini.assert_quiet(Duration::from_millis(300), "completion after cancel");
    let src_bytes = src.to_vec();
    run(
        &mut ini,
        XferOp::Write,
        reg,
        &[(src.addr(), 0, 100)],
        None,
        "WRITE after cancel",
    );
    assert_same(
        &target.bytes(0, 100),
        &src_bytes[..100],
        "WRITE after cancel",
    );
    ini.close();
    target.quit();
}

/// Bad inputs fail with their exact errors, and the transport works on.
pub fn bad_inputs_exact_errors<B: Backend>(b: &B, module: &str) {
    let (mut target, mut ini) = pair(b, module, 4096);
    let name = b.expect().name;
    let caps = ini.t.capabilities();
    let local = memory(b, 4096, 0);
    let addr = local.addr();
    let kind = local.region().kind;
    let t = &mut ini.t;

    // Memory.
    if !caps.mem_kinds.contains(MemKind::Vram) {
        assert_eq!(
            t.register(&Region::vram(addr, 4096, 0)).err(),
            Some(Error::UnsupportedMemKind {
                backend: name,
                kind: MemKind::Vram
            })
        );
    }
    let mut empty = local.region();
    empty.len = 0;
    assert_eq!(
        t.register(&empty).err(),
        Some(Error::InvalidRegion { addr, len: 0 })
    );
    let mut wraps = local.region();
    wraps.addr = u64::MAX - 1;
    wraps.len = 16;
    assert_eq!(
        t.register(&wraps).err(),
        Some(Error::InvalidRegion {
            addr: u64::MAX - 1,
            len: 16
        }),
        "a {kind:?} region past the end of the address space"
    );

    // Buffers too small for a key or an address say how much is needed.
    let reg = t.register(&local.region()).expect("register");
    let mut buf = [0u8; 4096];
    let klen = t.pack_key(&reg, &mut buf).expect("pack key");
    assert!(klen > 1, "a packed key of {klen} bytes");
    for short in [klen - 1, 1] {
        assert_eq!(
            t.pack_key(&reg, &mut buf[..short]),
            Err(Error::BufferTooSmall {
                needed: klen as u64,
                available: short as u64
            })
        );
    }
    let alen = t.local_address(&mut buf).expect("local address");
    assert!(alen > 1, "an address of {alen} bytes");
    for short in [alen - 1, 1] {
        assert_eq!(
            t.local_address(&mut buf[..short]),
            Err(Error::BufferTooSmall {
                needed: alen as u64,
                available: short as u64
            })
        );
    }

    // Addresses and keys that are not one.
    // Exactly the error the backend declares, else an `Error::Backend`
    // naming it (the library under it refused).
    let empty = b.expect().empty_metadata;
    let check = |r: Result<(), Error>, declared: Option<&Error>, what: &str| match declared {
        Some(e) => assert_eq!(r.as_ref().err(), Some(e), "{what}"),
        None => assert!(
            matches!(&r, Err(Error::Backend { backend, .. }) if *backend == name),
            "{what} gave {r:?}"
        ),
    };
    // (Not any garbage: UCX 1.13 aborts the process on an address of a
    // wrong version.)
    let r = t.connect(&[]).map(|_| ());
    check(
        r,
        empty.as_ref().map(|e| &e.address),
        "connect to an empty address",
    );
    let peer = ini.peer.take().expect("peer");
    // (Not any truncated key: UCX 1.13 unpacks a key of 9 of its 10 bytes.)
    let r = ini.t.unpack_key(&peer, &target.region, &[]).map(|_| ());
    check(r, empty.as_ref().map(|e| &e.key), "an empty key");
    let max = caps.max_notification as u64;
    assert_eq!(
        ini.t
            .send_notification(&peer, &vec![0u8; max as usize + 904]),
        Err(Error::NotificationTooLong {
            len: max + 904,
            max
        })
    );
    ini.peer = Some(peer);
    ini.regs.push(reg);

    // Still works.
    let mut src = memory(b, 100, 0);
    src.write(0, &pattern(9, 100));
    let r = ini.register_region(&src.region());
    run(
        &mut ini,
        XferOp::Write,
        r,
        &[(src.addr(), 0, 100)],
        None,
        "WRITE after bad inputs",
    );
    assert_same(
        &target.bytes(0, 100),
        &pattern(9, 100),
        "WRITE after bad inputs",
    );
    ini.close();
    target.quit();
}

/// The target killed mid-stream of 8 MiB WRITEs: every transfer in flight
/// ends, done or failed with an error the backend may report, within its
/// bound; a later post fails (at once or by its completion) within it too.
pub fn peer_death<B: Backend>(b: &B, module: &str) {
    const LEN: usize = 8 << 20;
    let death = b
        .expect()
        .peer_death
        .expect("a backend that detects a dead peer (else: no_peer_death)");
    let name = b.expect().name;
    let refused = |e: &Error| {
        matches!(e, Error::RemoteDisconnected { .. })
            || matches!(e, Error::Backend { backend, .. } if *backend == name)
            || (death.error)(e)
    };
    let (mut target, mut ini) = pair(b, module, LEN);
    let src = memory(b, LEN, 8);
    let reg = ini.register_region(&src.region());
    let parts = [(src.addr(), 0, LEN as u64)];
    let mut in_flight: Vec<u64> = Vec::new();
    let mut next = 100u64;
    let mut completed = 0;
    let mut killed_at: Option<Instant> = None;
    let mut failures = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline, "the stream did not end");
        while killed_at.is_none() && in_flight.len() < 4 {
            match ini.post_parts(XferOp::Write, reg, &parts, None, Token(next)) {
                Ok(PostStatus::Done) => completed += 1,
                Ok(PostStatus::InProgress) => in_flight.push(next),
                Err(e) => panic!("post before the kill: {e}"),
            }
            next += 1;
        }
        if killed_at.is_none() && completed >= 3 {
            target.kill();
            killed_at = Some(Instant::now());
        }
        if let Some(c) = ini.t.poll() {
            let pos = in_flight
                .iter()
                .position(|&t| t == c.token.0)
                .unwrap_or_else(|| panic!("completion of unknown {:?}", c.token));
            in_flight.swap_remove(pos);
            match c.result {
                Ok(()) => completed += 1,
                Err(e) => {
                    assert!(killed_at.is_some(), "failure before the kill: {e}");
                    assert!((death.error)(&e), "after the kill: {e:?}");
                    failures += 1;
                }
            }
        }
        if let Some(at) = killed_at {
            if in_flight.is_empty() {
                eprintln!(
                    "{module}: transfers in flight ended {:?} after the kill ({failures} failed)",
                    at.elapsed()
                );
                break;
            }
            assert!(
                at.elapsed() < death.within,
                "{} transfers still in flight {:?} after the kill",
                in_flight.len(),
                death.within
            );
        }
    }
    // The peer is dead: a new post fails now or its completion does.
    let failed_at = Instant::now();
    let err = loop {
        match ini.post_parts(XferOp::Write, reg, &parts, None, Token(1)) {
            Err(e) => {
                assert!(refused(&e), "a post to a dead peer refused with {e:?}");
                break e;
            }
            Ok(PostStatus::InProgress) => {
                if let Err(e) = ini.wait_for(Token(1), death.within) {
                    assert!((death.error)(&e), "a WRITE to a dead peer: {e:?}");
                    break e;
                }
            }
            Ok(PostStatus::Done) => {}
        }
        assert!(
            failed_at.elapsed() < death.within,
            "posts to a dead peer keep succeeding"
        );
    };
    eprintln!(
        "{module}: a WRITE to the dead peer: {err} after {:?}",
        failed_at.elapsed()
    );
    ini.close();
}
