//! Engine tests over the loopback transport, with and without faults.

use super::*;
use crate::error::DescError;
use crate::mem::{MemKind, MemKinds};
use crate::storage::{Capacities, Managed};
use crate::transport::fault::{FaultInjector, FaultPlan};
use crate::transport::loopback::{Loopback, LoopbackMemory};
use crate::transport::Completion;

const ARENA: usize = 4096;
const BASE: u64 = 0x10000;
/// Alice's region.
const A: u64 = BASE;
/// Bob's region.
const B: u64 = BASE + 0x800;
const LEN: u64 = 1024;

type Mem = LoopbackMemory<ARENA>;
type Eng<'m> = Engine<'static, Loopback<'m, ARENA>>;
type FEng<'m> = Engine<'static, FaultInjector<Loopback<'m, ARENA>>>;

/// The tables these tests use: 8 regions, 4 peers, 8 transfers, 16
/// segments per transfer, 4 prepared lists, 128-byte notifications.
const CAPS: Capacities = Capacities {
    regions: 8,
    peers: 4,
    remote_regions: 32,
    xfers: 8,
    segments: 128,
    segments_per_chunk: 4,
    prepared_lists: 4,
    prepared_entries: 64,
    notifications: 8,
    notification_len: 128,
};

fn leak<S>(n: u32, empty: impl Fn() -> S) -> Managed<'static, S> {
    extern crate std;
    let v: std::vec::Vec<S> = (0..n).map(|_| empty()).collect();
    Managed::Borrowed(std::boxed::Box::leak(v.into_boxed_slice()))
}

/// Storage of `caps`, borrowed from leaked vectors.
fn storage<T: Transport>(caps: &Capacities) -> Storage<'static, T> {
    Storage {
        regions: leak(caps.regions, || crate::storage::RegionSlot::EMPTY),
        peers: leak(caps.peers, || PeerSlot::EMPTY),
        remote: leak(caps.remote_regions, || RemoteSlot::EMPTY),
        xfers: leak(caps.xfers, || XferSlot::EMPTY),
        segments: leak(caps.segments, || SegRec::EMPTY),
        chunks: leak(caps.segments / caps.segments_per_chunk, || 0),
        preps: leak(caps.prepared_lists, || PrepSlot::EMPTY),
        entries: leak(caps.prepared_entries, || Resolved::EMPTY),
        notes: leak(caps.notifications * caps.notification_len, || 0),
        note_slots: leak(caps.notifications, || NoteSlot::EMPTY),
    }
}

fn test_config() -> EngineConfig {
    EngineConfig {
        segments_per_xfer: 16,
        ..EngineConfig::default()
    }
}

/// An engine with [`CAPS`] and `config`.
fn new_eng<T: Transport>(
    name: &str,
    t: T,
    config: EngineConfig,
) -> Result<Engine<'static, T>, Error> {
    Engine::new(name, t, config, storage(&CAPS))
}

fn now(n: u64) -> Instant {
    Instant::from_nanos(n)
}

fn pattern(seed: u8, len: usize) -> [u8; 256] {
    let mut p = [0u8; 256];
    for (i, b) in p.iter_mut().take(len).enumerate() {
        *b = seed.wrapping_add((i as u8).wrapping_mul(7));
    }
    p
}

fn metadata<E: Transport>(e: &Engine<'_, E>, buf: &mut [u8; 1024]) -> usize {
    e.local_metadata(buf).unwrap()
}

/// Registers alice's region at `A` and bob's at `B`, and loads bob's
/// metadata into alice (and alice's into bob when `both`).
fn connect<T: Transport, U: Transport>(
    a: &mut Engine<'static, T>,
    b: &mut Engine<'static, U>,
    both: bool,
) {
    a.register(Region::dram(A, LEN)).unwrap();
    b.register(Region::dram(B, LEN)).unwrap();
    let mut buf = [0u8; 1024];
    let n = metadata(b, &mut buf);
    assert_eq!(a.load_remote(&buf[..n]).unwrap().as_str(), "bob");
    if both {
        let n = metadata(a, &mut buf);
        b.load_remote(&buf[..n]).unwrap();
    }
}

fn engines(mem: &Mem) -> (Eng<'_>, Eng<'_>) {
    let mut a = new_eng("alice", Loopback::new(mem, 1), test_config()).unwrap();
    let mut b = new_eng("bob", Loopback::new(mem, 2), test_config()).unwrap();
    connect(&mut a, &mut b, true);
    (a, b)
}

fn faulty(mem: &Mem, plan: FaultPlan) -> (FEng<'_>, Eng<'_>) {
    let mut a = new_eng(
        "alice",
        FaultInjector::new(Loopback::new(mem, 1), plan),
        test_config(),
    )
    .unwrap();
    let mut b = new_eng("bob", Loopback::new(mem, 2), test_config()).unwrap();
    connect(&mut a, &mut b, false);
    (a, b)
}

/// Prepares a WRITE of the 8 bytes at `A` to the 8 bytes at `remote` on bob,
/// carrying `notification`.
fn write8<T: Transport>(
    e: &mut Engine<'static, T>,
    remote: u64,
    notification: Option<&[u8]>,
) -> Result<XferHandle, Error> {
    e.prepare(
        XferOp::Write,
        &[Desc::new(A, 8)],
        &[Desc::new(remote, 8)],
        "bob",
        notification,
    )
}

fn read(mem: &Mem, addr: u64, len: usize) -> [u8; 256] {
    let mut out = [0u8; 256];
    mem.read(addr, &mut out[..len]).unwrap();
    out
}

#[test]
fn write_moves_bytes_completes_on_poll_and_can_be_reposted() {
    let mem = Mem::new(BASE);
    let (mut a, _b) = engines(&mem);
    let data = pattern(3, 128);
    mem.write(A, &data[..128]).unwrap();
    let h = a
        .prepare(
            XferOp::Write,
            &[Desc::new(A, 100), Desc::new(A + 100, 28)],
            &[Desc::new(B + 8, 100), Desc::new(B + 108, 28)],
            "bob",
            None,
        )
        .unwrap();
    assert_eq!(a.state(h), Ok(XferState::Prepared));
    let t = a.telemetry(h).unwrap();
    assert_eq!((t.bytes, t.descs, t.segments), (128, 2, 1));
    assert_eq!(a.post(h, now(10)), Ok(XferState::InProgress));
    a.post_finished(h, now(15));
    assert_eq!(a.state(h), Ok(XferState::InProgress));
    assert_eq!(a.post(h, now(11)), Err(Error::InProgress { handle: h }));
    assert_eq!(a.in_flight(), 1);
    assert_eq!(a.poll(now(20)), 1);
    assert_eq!(a.state(h), Ok(XferState::Done));
    assert_eq!(&read(&mem, B + 8, 128)[..128], &data[..128]);
    let t = a.telemetry(h).unwrap();
    assert_eq!(
        (t.posted_at, t.post_nanos, t.completed_at),
        (Some(now(10)), 5, Some(now(20)))
    );
    // Re-post from Done moves the (new) bytes again.
    let data2 = pattern(99, 128);
    mem.write(A, &data2[..128]).unwrap();
    assert_eq!(a.post(h, now(30)), Ok(XferState::InProgress));
    assert_eq!(a.poll(now(40)), 1);
    assert_eq!(&read(&mem, B + 8, 128)[..128], &data2[..128]);
    a.release(h).unwrap();
    assert_eq!(a.state(h), Err(Error::StaleHandle { handle: h }));
    assert_eq!(a.post(h, now(50)), Err(Error::StaleHandle { handle: h }));
    assert_eq!(a.release(h), Err(Error::StaleHandle { handle: h }));
    let never = XferHandle {
        index: 77,
        generation: 0,
    };
    assert_eq!(a.state(never), Err(Error::StaleHandle { handle: never }));
}

#[test]
fn read_pulls_remote_bytes_and_coalescing_can_be_off() {
    let mem = Mem::new(BASE);
    let (_a, _b) = engines(&mem);
    let config = EngineConfig {
        coalesce: false,
        ..test_config()
    };
    let mut c = new_eng("carol", Loopback::new(&mem, 3), config).unwrap();
    c.register(Region::dram(BASE + 0x400, 256)).unwrap();
    let mut buf = [0u8; 1024];
    let n = metadata(&_b, &mut buf);
    c.load_remote(&buf[..n]).unwrap();
    let data = pattern(42, 64);
    mem.write(B + 500, &data[..64]).unwrap();
    let h = c
        .prepare(
            XferOp::Read,
            &[Desc::new(BASE + 0x400, 32), Desc::new(BASE + 0x420, 32)],
            &[Desc::new(B + 500, 32), Desc::new(B + 532, 32)],
            "bob",
            None,
        )
        .unwrap();
    assert_eq!(c.telemetry(h).unwrap().segments, 2);
    c.post(h, now(0)).unwrap();
    assert_eq!(c.poll(now(1)), 1);
    assert_eq!(&read(&mem, BASE + 0x400, 64)[..64], &data[..64]);
}

#[test]
fn request_errors_name_the_bad_value() {
    let mem = Mem::new(BASE);
    let (mut a, _b) = engines(&mem);
    let ok = [Desc::new(A, 8)];
    let rok = [Desc::new(B, 8)];
    assert_eq!(
        a.prepare(XferOp::Write, &ok, &rok, "eve", None),
        Err(Error::unknown_peer("eve"))
    );
    assert_eq!(
        a.prepare(
            XferOp::Write,
            &ok,
            &[Desc::new(B, 8), Desc::new(B + 8, 8)],
            "bob",
            None
        ),
        Err(Error::CountMismatch {
            local: 1,
            remote: 2
        })
    );
    assert_eq!(
        a.prepare(XferOp::Write, &ok, &[Desc::new(B, 9)], "bob", None),
        Err(Error::LengthMismatch {
            index: 0,
            local: 8,
            remote: 9
        })
    );
    assert_eq!(
        a.prepare(
            XferOp::Write,
            &[Desc::new(A, 8), Desc::new(A + LEN - 4, 8)],
            &[Desc::new(B, 8), Desc::new(B, 8)],
            "bob",
            None
        ),
        Err(Error::InvalidDesc {
            side: Side::Local,
            index: 1,
            addr: A + LEN - 4,
            len: 8,
            reason: DescError::OutsideRegistration {
                region_addr: A,
                region_len: LEN
            },
        })
    );
    assert_eq!(
        a.prepare(XferOp::Write, &ok, &[Desc::on_dev(B, 8, 1)], "bob", None),
        Err(Error::InvalidDesc {
            side: Side::Remote,
            index: 0,
            addr: B,
            len: 8,
            reason: DescError::DeviceMismatch { region_dev: 0 },
        })
    );
    assert_eq!(
        a.check_remote("bob", &[Desc::new(B, 8), Desc::new(A, 8)]),
        Err(Error::InvalidDesc {
            side: Side::Remote,
            index: 1,
            addr: A,
            len: 8,
            reason: DescError::NotRegistered
        })
    );
    assert_eq!(a.check_remote("bob", &rok), Ok(()));
    // Nothing was left behind by the failures: all 8 slots are free.
    let hs: heapless::Vec<XferHandle, 8> = (0..8)
        .map(|_| a.prepare(XferOp::Write, &ok, &rok, "bob", None).unwrap())
        .collect();
    assert_eq!(
        a.prepare(XferOp::Write, &ok, &rok, "bob", None),
        Err(Error::CapacityExceeded {
            what: "transfers",
            capacity: 8,
            setting: "xfers"
        })
    );
    for h in hs {
        a.release(h).unwrap();
    }
    let many = [Desc::new(A, 1); 17];
    let rmany = [Desc::new(B, 1); 17];
    assert_eq!(
        a.prepare(XferOp::Write, &many, &rmany, "bob", None),
        Err(Error::CapacityExceeded {
            what: "segments per transfer",
            capacity: 16,
            setting: "segments_per_xfer"
        })
    );
    assert_eq!(
        a.deregister(A).map(|r| r.addr),
        Ok(A),
        "failed prepares leave no users behind"
    );
}

#[test]
fn registration_rules() {
    let mem = Mem::new(BASE);
    let mut lb = Loopback::new(&mem, 1);
    let mut caps = lb.capabilities();
    caps.mem_kinds = MemKinds::DRAM;
    lb.set_capabilities(caps);
    let mut a = new_eng("alice", lb, test_config()).unwrap();
    assert_eq!(
        a.register(Region::vram(A, 64, 0)),
        Err(Error::UnsupportedMemKind {
            backend: "LOOPBACK",
            kind: MemKind::Vram
        })
    );
    a.register(Region::dram(A, 64)).unwrap();
    assert!(matches!(
        a.register(Region::dram(A + 32, 64)),
        Err(Error::OverlappingRegistration { .. })
    ));
    assert!(matches!(
        a.register(Region::dram(0, 64)),
        Err(Error::Backend {
            backend: "LOOPBACK",
            code: -1,
            ..
        })
    ));
    assert_eq!(
        a.deregister(A + 1),
        Err(Error::NotRegistered {
            addr: A + 1,
            len: 0
        })
    );
    assert_eq!(a.regions().count(), 1);
    assert_eq!(
        new_eng("", Loopback::new(&mem, 1), test_config()).err(),
        Some(Error::InvalidName { len: 0 })
    );
    let long = [b'x'; 65];
    assert_eq!(
        new_eng(
            core::str::from_utf8(&long).unwrap(),
            Loopback::new(&mem, 1),
            test_config()
        )
        .err(),
        Some(Error::InvalidName { len: 65 })
    );
}

#[test]
fn busy_regions_cannot_be_deregistered() {
    let mem = Mem::new(BASE);
    let (mut a, _b) = engines(&mem);
    let h = a
        .prepare(
            XferOp::Write,
            &[Desc::new(A, 8), Desc::new(A + 16, 8)],
            &[Desc::new(B, 8), Desc::new(B + 16, 8)],
            "bob",
            None,
        )
        .unwrap();
    assert_eq!(
        a.deregister(A),
        Err(Error::RegionBusy { addr: A, users: 2 })
    );
    a.release(h).unwrap();
    assert_eq!(a.deregister(A), Ok(Region::dram(A, LEN)));
}

#[test]
fn release_in_progress_cancels_or_is_refused() {
    let mem = Mem::new(BASE);
    let (mut a, mut b) = engines(&mem);
    let h = write8(&mut a, B, Some(b"done")).unwrap();
    a.post(h, now(0)).unwrap();
    a.release(h).unwrap();
    assert_eq!(a.poll(now(1)), 0, "a cancelled transfer reports nothing");
    let mut buf = [0u8; 128];
    assert_eq!(
        b.poll_notification(&mut buf),
        None,
        "a cancelled transfer's notification is not sent"
    );

    let mut caps = a.transport().capabilities();
    caps.can_cancel = false;
    a.transport_mut().set_capabilities(caps);
    let h = write8(&mut a, B, None).unwrap();
    a.post(h, now(0)).unwrap();
    assert_eq!(a.release(h), Err(Error::InProgress { handle: h }));
    assert_eq!(a.state(h), Ok(XferState::InProgress));
    assert_eq!(a.poll(now(1)), 1);
    a.release(h).unwrap();
}

#[test]
fn late_completion_for_a_reused_slot_is_ignored() {
    let mem = Mem::new(BASE);
    let (mut a, _b) = faulty(&mem, FaultPlan::default());
    let h1 = write8(&mut a, B, None).unwrap();
    a.post(h1, now(0)).unwrap();
    let old = current_token(&a, h1);
    assert_eq!(a.poll(now(1)), 1);
    a.release(h1).unwrap();
    let h2 = write8(&mut a, B, None).unwrap();
    assert_eq!(h2.index, h1.index);
    assert_ne!(h2.generation, h1.generation);
    a.transport_mut().delay_next_completion(2);
    a.post(h2, now(2)).unwrap();
    a.transport_mut()
        .inject_completion(Completion {
            token: old,
            result: Err(Error::Cancelled),
        })
        .unwrap();
    a.transport_mut()
        .inject_completion(Completion {
            token: Token(u64::MAX),
            result: Ok(()),
        })
        .unwrap();
    assert_eq!(a.poll(now(3)), 0);
    assert_eq!(a.state(h2), Ok(XferState::InProgress));
    assert_eq!(a.poll(now(4)), 0);
    assert_eq!(a.poll(now(5)), 1);
    assert_eq!(a.state(h2), Ok(XferState::Done));
    assert_eq!(a.state(h1), Err(Error::StaleHandle { handle: h1 }));
}

/// The token of the transfer's current (latest) post.
fn current_token<T: Transport>(e: &Engine<'static, T>, h: XferHandle) -> Token {
    let i = h.index as usize;
    token_of(i, h.generation, e.xfers[i].posts)
}

#[test]
fn each_post_has_its_own_token() {
    let mem = Mem::new(BASE);
    let (mut a, _b) = faulty(&mem, FaultPlan::default());
    let h = write8(&mut a, B, None).unwrap();
    a.post(h, now(0)).unwrap();
    let first = current_token(&a, h);
    assert_eq!(a.poll(now(1)), 1);
    assert_eq!(a.state(h), Ok(XferState::Done));
    assert_eq!(a.ignored_completions(), 0);

    // Re-post; its own completion is held back two polls.
    a.transport_mut().delay_next_completion(2);
    assert_eq!(a.post(h, now(2)), Ok(XferState::InProgress));
    let second = current_token(&a, h);
    assert_ne!(second, first);
    assert_eq!(token_parts(first).0, token_parts(second).0);
    assert_eq!(token_parts(first).1, token_parts(second).1);
    // A duplicate completion of the first post, success or failure, does
    // not finish the re-post.
    for result in [Ok(()), Err(Error::Cancelled)] {
        a.transport_mut()
            .inject_completion(Completion {
                token: first,
                result,
            })
            .unwrap();
    }
    assert_eq!(a.poll(now(3)), 0);
    assert_eq!(a.state(h), Ok(XferState::InProgress));
    assert_eq!(a.ignored_completions(), 2);
    assert_eq!(a.telemetry(h).unwrap().completed_at, None);
    assert_eq!(a.poll(now(4)), 0);
    assert_eq!(a.state(h), Ok(XferState::InProgress));
    // Its own completion finishes it.
    assert_eq!(a.poll(now(5)), 1);
    assert_eq!(a.state(h), Ok(XferState::Done));
    assert_eq!(a.telemetry(h).unwrap().completed_at, Some(now(5)));
    assert_eq!(a.ignored_completions(), 2);

    // Releasing an in-progress re-post cancels its current post: nothing
    // of it is reported afterwards.
    a.transport_mut().delay_next_completion(5);
    a.post(h, now(6)).unwrap();
    a.release(h).unwrap();
    for t in 7..15 {
        assert_eq!(a.poll(now(t)), 0);
    }
    assert_eq!(a.transport().held(), 0);
    assert_eq!(a.ignored_completions(), 2);
}

#[test]
fn failed_posts_and_completions_leave_failed_state_and_can_be_reposted() {
    let mem = Mem::new(BASE);
    let (mut a, _b) = faulty(&mem, FaultPlan::default());
    let e = Error::backend("LOOPBACK", -42, "injected");
    let h = write8(&mut a, B, None).unwrap();
    a.transport_mut().fail_next_post(e.clone());
    assert_eq!(a.post(h, now(0)), Err(e.clone()));
    assert_eq!(a.state(h), Ok(XferState::Failed(e.clone())));
    a.transport_mut().fail_next_completion(e.clone());
    assert_eq!(a.post(h, now(1)), Ok(XferState::InProgress));
    assert_eq!(a.poll(now(2)), 1);
    assert_eq!(a.state(h), Ok(XferState::Failed(e)));
    assert_eq!(a.post(h, now(3)), Ok(XferState::InProgress));
    assert_eq!(a.poll(now(4)), 1);
    assert_eq!(a.state(h), Ok(XferState::Done));
    assert_eq!(a.transport().stats().posts_failed, 1);
    assert_eq!(a.transport().stats().completions_failed, 1);
}

#[test]
fn disconnection_names_the_peer() {
    let mem = Mem::new(BASE);
    let (mut a, _b) = faulty(&mem, FaultPlan::default());
    let h = write8(&mut a, B, None).unwrap();
    a.transport_mut().delay_next_completion(5);
    a.post(h, now(0)).unwrap();
    a.poll(now(1));
    a.transport_mut().disconnect();
    assert_eq!(a.poll(now(2)), 1);
    assert_eq!(
        a.state(h),
        Ok(XferState::Failed(Error::disconnected("bob")))
    );
    assert_eq!(a.post(h, now(3)), Err(Error::disconnected("bob")));
    assert_eq!(a.notify("bob", b"x"), Err(Error::disconnected("bob")));
}

#[test]
fn reordered_and_delayed_completions_all_land_on_their_transfers() {
    let mem = Mem::new(BASE);
    let plan = FaultPlan {
        seed: 7,
        max_delay_polls: 3,
        reorder: true,
        ..FaultPlan::default()
    };
    let (mut a, _b) = faulty(&mem, plan);
    let mut hs: heapless::Vec<XferHandle, 8> = heapless::Vec::new();
    for k in 0..8u64 {
        mem.write(A + k * 16, &pattern(k as u8, 16)[..16]).unwrap();
        let h = a
            .prepare(
                XferOp::Write,
                &[Desc::new(A + k * 16, 16)],
                &[Desc::new(B + k * 16, 16)],
                "bob",
                None,
            )
            .unwrap();
        a.post(h, now(k)).unwrap();
        hs.push(h).unwrap();
    }
    let mut done = 0;
    for t in 0..40 {
        done += a.poll(now(100 + t));
    }
    assert_eq!(done, 8);
    for (k, h) in hs.iter().enumerate() {
        assert_eq!(a.state(*h), Ok(XferState::Done));
        assert_eq!(
            &read(&mem, B + k as u64 * 16, 16)[..16],
            &pattern(k as u8, 16)[..16]
        );
    }
    let s = a.transport().stats();
    assert!(
        s.completions_delayed > 0 && s.completions_reordered > 0,
        "{s:?}"
    );
}

#[test]
fn inline_completion_is_done_at_once() {
    let mem = Mem::new(BASE);
    let (mut a, mut b) = engines(&mem);
    let mut caps = a.transport().capabilities();
    caps.may_complete_inline = true;
    a.transport_mut().set_capabilities(caps);
    mem.write(A, b"inline!!").unwrap();
    let h = write8(&mut a, B, Some(b"n")).unwrap();
    assert_eq!(a.post(h, now(5)), Ok(XferState::Done));
    assert_eq!(a.telemetry(h).unwrap().completed_at, Some(now(5)));
    assert_eq!(&read(&mem, B, 8)[..8], b"inline!!");
    let mut buf = [0u8; 128];
    let n = b.poll_notification(&mut buf).unwrap().unwrap();
    assert_eq!((n.peer.as_str(), &buf[..n.len]), ("alice", &b"n"[..]));
}

#[test]
fn notifications_carry_the_sender_and_follow_the_data() {
    let mem = Mem::new(BASE);
    let (mut a, mut b) = engines(&mem);
    let mut buf = [0u8; 128];
    assert_eq!(b.poll_notification(&mut buf), None);
    a.notify("bob", b"hello").unwrap();
    let n = b.poll_notification(&mut buf).unwrap().unwrap();
    assert_eq!((n.peer.as_str(), &buf[..n.len]), ("alice", &b"hello"[..]));
    // NOTIF is 128: 1 length byte + "alice" leaves 122 bytes of payload.
    assert_eq!(
        a.notify("bob", &[0u8; 123]),
        Err(Error::NotificationTooLong { len: 123, max: 122 })
    );
    a.notify("bob", &[7u8; 122]).unwrap();
    let mut small = [0u8; 100];
    assert_eq!(
        b.poll_notification(&mut small),
        Some(Err(Error::BufferTooSmall {
            needed: 128,
            available: 100
        }))
    );
    let n = b.poll_notification(&mut buf).unwrap().unwrap();
    assert_eq!(&buf[..n.len], &[7u8; 122][..]);
    assert_eq!(a.notify("eve", b"x"), Err(Error::unknown_peer("eve")));
    assert_eq!(
        write8(&mut a, B, Some(&[0u8; 123])),
        Err(Error::NotificationTooLong { len: 123, max: 122 })
    );

    mem.write(A, b"kv-block").unwrap();
    let h = write8(&mut a, B, Some(b"block 0 ready")).unwrap();
    a.post(h, now(0)).unwrap();
    assert_eq!(
        b.poll_notification(&mut buf),
        None,
        "no notification before completion"
    );
    assert_eq!(a.poll(now(1)), 1);
    let n = b.poll_notification(&mut buf).unwrap().unwrap();
    assert_eq!(
        (n.peer.as_str(), &buf[..n.len]),
        ("alice", &b"block 0 ready"[..])
    );
    assert_eq!(&read(&mem, B, 8)[..8], b"kv-block");
}

#[test]
fn malformed_notification_frames_are_reported() {
    let mem = Mem::new(BASE);
    let (mut a, mut b) = engines(&mem);
    let bob = a.transport_mut().connect(&2u32.to_le_bytes()).unwrap();
    a.transport_mut()
        .send_notification(&bob, &[9, b'a'])
        .unwrap();
    let mut buf = [0u8; 64];
    assert_eq!(
        b.poll_notification(&mut buf),
        Some(Err(Error::MalformedNotification { len: 2 }))
    );
}

#[test]
fn reload_retires_the_old_load_and_invalidate_forgets() {
    let mem = Mem::new(BASE);
    let (mut a, mut b) = engines(&mem);
    let prepared = write8(&mut a, B, None).unwrap();
    let flying = write8(&mut a, B + 8, None).unwrap();
    a.post(flying, now(0)).unwrap();
    // Bob registers more memory and republishes.
    b.register(Region::dram(BASE + 0xc00, 64)).unwrap();
    let mut buf = [0u8; 1024];
    let n = metadata(&b, &mut buf);
    a.load_remote(&buf[..n]).unwrap();
    assert_eq!(a.remote_regions("bob").unwrap().count(), 2);
    assert_eq!(
        a.post(prepared, now(1)),
        Err(Error::StalePeer {
            peer: bounded("bob")
        })
    );
    assert_eq!(
        a.poll(now(2)),
        1,
        "the transfer in flight finishes on the old load"
    );
    assert_eq!(a.state(flying), Ok(XferState::Done));
    a.release(prepared).unwrap();
    a.release(flying).unwrap();
    let h = write8(&mut a, BASE + 0xc00, None).unwrap();
    a.post(h, now(3)).unwrap();
    a.poll(now(4));
    assert_eq!(a.state(h), Ok(XferState::Done));
    a.release(h).unwrap();
    // Retired loads do not pile up: reloading many times fits in 4 peer slots.
    for _ in 0..10 {
        a.load_remote(&buf[..n]).unwrap();
    }
    a.invalidate_remote("bob").unwrap();
    assert!(!a.has_remote("bob"));
    assert_eq!(a.invalidate_remote("bob"), Err(Error::unknown_peer("bob")));
    assert_eq!(write8(&mut a, B, None), Err(Error::unknown_peer("bob")));
}

#[test]
fn load_remote_refuses_foreign_self_oversized_and_bad_keys() {
    let mem = Mem::new(BASE);
    let (mut a, _b) = engines(&mem);
    let mut buf = [0u8; 1024];
    let n = metadata(&a, &mut buf);
    assert_eq!(
        a.load_remote(&buf[..n]),
        Err(Error::BadMetadata(MetaError::SelfReference))
    );
    assert_eq!(
        a.load_remote(&buf[..n - 1])
            .err()
            .map(|e| matches!(e, Error::BadMetadata(MetaError::Truncated { .. }))),
        Some(true)
    );

    let mut enc = Encoder::new(&mut buf, "ucx-peer", "UCX", |_| Ok(0)).unwrap();
    enc.region(&Region::dram(0, 8), |_| Ok(0)).unwrap();
    let n = enc.finish().unwrap();
    assert_eq!(
        a.load_remote(&buf[..n]),
        Err(Error::BadMetadata(MetaError::BackendMismatch {
            expected: "LOOPBACK",
            found: bounded("UCX")
        }))
    );

    let mut enc = Encoder::new(&mut buf, "big", "LOOPBACK", |b| {
        crate::wire::copy_into(b, &9u32.to_le_bytes())
    })
    .unwrap();
    // Bob's one region is loaded; 32 more do not fit the 32-entry table.
    for k in 0..32 {
        enc.region(&Region::dram(k * 8, 8), |_| Ok(0)).unwrap();
    }
    let n = enc.finish().unwrap();
    assert_eq!(
        a.load_remote(&buf[..n]),
        Err(Error::CapacityExceeded {
            what: "remote regions",
            capacity: 32,
            setting: "remote_regions"
        })
    );
    assert!(!a.has_remote("big"));

    let mut enc = Encoder::new(&mut buf, "forger", "LOOPBACK", |b| {
        crate::wire::copy_into(b, &9u32.to_le_bytes())
    })
    .unwrap();
    enc.region(&Region::dram(B, 8), |b| {
        crate::wire::copy_into(b, b"not-a-key")
    })
    .unwrap();
    let n = enc.finish().unwrap();
    assert!(matches!(
        a.load_remote(&buf[..n]),
        Err(Error::Backend {
            backend: "LOOPBACK",
            code: -3,
            ..
        })
    ));
    assert!(!a.has_remote("forger"));

    let mut small = [0u8; 10];
    assert!(matches!(
        a.local_metadata(&mut small),
        Err(Error::BufferTooSmall { available: 10, .. })
    ));
}

#[test]
fn prepared_lists_make_transfers_by_index() {
    let mem = Mem::new(BASE);
    let (mut a, mut b) = engines(&mem);
    let blocks: [Desc; 4] = core::array::from_fn(|k| Desc::new(A + k as u64 * 64, 64));
    let remote: [Desc; 4] = core::array::from_fn(|k| Desc::new(B + k as u64 * 64, 64));
    let l = a.prep_local(&blocks).unwrap();
    let r = a.prep_remote("bob", &remote).unwrap();
    for k in 0..4u64 {
        mem.write(A + k * 64, &pattern(k as u8 + 10, 64)[..64])
            .unwrap();
    }
    // Blocks 2 and 3 go to remote blocks 0 and 1: contiguous on both sides.
    let h = a
        .make_xfer(XferOp::Write, l, &[2, 3], r, &[0, 1], Some(b"kv"))
        .unwrap();
    let t = a.telemetry(h).unwrap();
    assert_eq!((t.bytes, t.descs, t.segments), (128, 2, 1));
    a.post(h, now(0)).unwrap();
    a.poll(now(1));
    assert_eq!(a.state(h), Ok(XferState::Done));
    assert_eq!(&read(&mem, B, 64)[..64], &pattern(12, 64)[..64]);
    assert_eq!(&read(&mem, B + 64, 64)[..64], &pattern(13, 64)[..64]);
    let mut buf = [0u8; 64];
    assert_eq!(b.poll_notification(&mut buf).unwrap().unwrap().len, 2);
    a.release(h).unwrap();

    assert_eq!(
        a.make_xfer(XferOp::Write, l, &[0, 4], r, &[0, 1], None),
        Err(Error::IndexOutOfRange {
            side: Side::Local,
            index: 1,
            value: 4,
            len: 4
        })
    );
    assert_eq!(
        a.make_xfer(XferOp::Write, l, &[0], r, &[9], None),
        Err(Error::IndexOutOfRange {
            side: Side::Remote,
            index: 0,
            value: 9,
            len: 4
        })
    );
    assert_eq!(
        a.make_xfer(XferOp::Write, l, &[0], r, &[], None),
        Err(Error::CountMismatch {
            local: 1,
            remote: 0
        })
    );
    assert_eq!(
        a.deregister(A),
        Err(Error::RegionBusy { addr: A, users: 4 })
    );
    assert_eq!(
        a.prep_local(&[Desc::new(A, 0)]),
        Err(Error::InvalidDesc {
            side: Side::Local,
            index: 0,
            addr: A,
            len: 0,
            reason: DescError::ZeroLength
        })
    );
    assert_eq!(
        a.prep_remote("eve", &remote),
        Err(Error::unknown_peer("eve"))
    );

    // A reload of the peer makes the remote list stale.
    let mut md = [0u8; 1024];
    let n = metadata(&b, &mut md);
    a.load_remote(&md[..n]).unwrap();
    assert_eq!(
        a.make_xfer(XferOp::Write, l, &[0], r, &[0], None),
        Err(Error::StalePeer {
            peer: bounded("bob")
        })
    );
    a.release_remote(r).unwrap();
    assert_eq!(
        a.release_remote(r),
        Err(Error::StalePrepared {
            index: r.index,
            generation: r.generation
        })
    );
    let stale_as_local = PreparedLocal {
        index: r.index,
        generation: r.generation,
    };
    assert!(matches!(
        a.release_local(stale_as_local),
        Err(Error::StalePrepared { .. })
    ));
    a.release_local(l).unwrap();
    assert_eq!(a.deregister(A).map(|r| r.len), Ok(LEN));
    let lists: heapless::Vec<PreparedRemote, 4> = (0..4)
        .map(|_| a.prep_remote("bob", &remote).unwrap())
        .collect();
    assert_eq!(
        a.prep_remote("bob", &remote),
        Err(Error::CapacityExceeded {
            what: "prepared lists",
            capacity: 4,
            setting: "prepared_lists"
        })
    );
    assert_eq!(lists.len(), 4);
}

#[test]
fn seeded_fault_plans_never_break_the_lifecycle() {
    for seed in 1..20u64 {
        let mem = Mem::new(BASE);
        let plan = FaultPlan {
            seed,
            fail_post_per_mille: 150,
            fail_completion_per_mille: 150,
            max_delay_polls: 2,
            reorder: true,
            ..FaultPlan::default()
        };
        let (mut a, _b) = faulty(&mem, plan);
        let mut live: heapless::Vec<XferHandle, 8> = heapless::Vec::new();
        let mut rng = seed;
        for step in 0..300u64 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            match rng % 4 {
                0 if !live.is_full() => {
                    let k = rng % 8;
                    let h = a
                        .prepare(
                            XferOp::Write,
                            &[Desc::new(A + k * 8, 8)],
                            &[Desc::new(B + k * 8, 8)],
                            "bob",
                            None,
                        )
                        .unwrap();
                    live.push(h).unwrap();
                }
                1 if !live.is_empty() => {
                    let h = live[(rng >> 8) as usize % live.len()];
                    let before = a.state(h).unwrap();
                    match a.post(h, now(step)) {
                        Ok(s) => assert_eq!(s, XferState::InProgress),
                        Err(Error::InProgress { .. }) => assert_eq!(before, XferState::InProgress),
                        Err(e) => assert_eq!(a.state(h), Ok(XferState::Failed(e))),
                    }
                }
                2 if !live.is_empty() => {
                    let i = (rng >> 8) as usize % live.len();
                    a.release(live[i]).unwrap();
                    assert!(a.state(live[i]).is_err());
                    live.swap_remove(i);
                }
                _ => {
                    a.poll(now(step));
                }
            }
        }
        for _ in 0..10 {
            a.poll(now(1000));
        }
        for h in live {
            assert!(matches!(
                a.state(h),
                Ok(XferState::Prepared | XferState::Done | XferState::Failed(_))
            ));
            a.release(h).unwrap();
        }
        assert_eq!(a.transport().held(), 0);
        assert_eq!(a.deregister(A).map(|r| r.addr), Ok(A));
    }
}

#[test]
fn a_frame_that_cannot_fit_the_sender_name_is_refused() {
    // The transport carries at most 4 bytes: the frame of "alice" (1 + 5
    // bytes) does not fit even with an empty payload.
    let mem = Mem::new(BASE);
    let mut lb = Loopback::new(&mem, 1);
    let mut caps = lb.capabilities();
    caps.max_notification = 4;
    lb.set_capabilities(caps);
    let mut a = new_eng("alice", lb, test_config()).unwrap();
    let mut b = new_eng("bob", Loopback::new(&mem, 2), test_config()).unwrap();
    connect(&mut a, &mut b, true);
    let too_long = Err(Error::NotificationTooLong { len: 6, max: 4 });
    assert_eq!(a.notify("bob", b""), too_long);
    assert_eq!(write8(&mut a, B, Some(b"")).map(|_| ()), too_long);
    let mut buf = [0u8; 128];
    assert_eq!(b.poll_notification(&mut buf), None, "nothing was sent");

    // An engine whose NOTIF capacity is smaller than its name's frame.
    let small = Capacities {
        notification_len: 4,
        ..CAPS
    };
    let mut c = Engine::new(
        "carol",
        Loopback::new(&mem, 3),
        test_config(),
        storage(&small),
    )
    .unwrap();
    let mut meta = [0u8; 1024];
    let n = metadata(&b, &mut meta);
    c.load_remote(&meta[..n]).unwrap();
    assert_eq!(
        c.notify("bob", b""),
        Err(Error::NotificationTooLong { len: 6, max: 4 })
    );
    assert_eq!(b.poll_notification(&mut buf), None, "nothing was sent");
}

#[test]
fn a_frame_naming_a_sender_longer_than_any_agent_name_is_malformed() {
    let mem = Mem::new(BASE);
    let (mut a, mut b) = engines(&mem);
    let bob = a.transport_mut().connect(&2u32.to_le_bytes()).unwrap();
    let mut frame = [b'x'; 1 + NAME_CAP + 1 + 3];
    frame[0] = (NAME_CAP + 1) as u8;
    a.transport_mut().send_notification(&bob, &frame).unwrap();
    let mut buf = [0u8; 128];
    assert_eq!(
        b.poll_notification(&mut buf),
        Some(Err(Error::MalformedNotification {
            len: frame.len() as u64
        }))
    );
    // A name of exactly NAME_CAP bytes is accepted whole.
    let mut frame = [b'y'; 1 + NAME_CAP + 2];
    frame[0] = NAME_CAP as u8;
    a.transport_mut().send_notification(&bob, &frame).unwrap();
    let n = b.poll_notification(&mut buf).unwrap().unwrap();
    assert_eq!((n.peer.len(), &buf[..n.len]), (NAME_CAP, &b"yy"[..]));
}

/// A transport whose transfers never end and cannot be cancelled; it logs
/// what is handed back to it.
struct Stuck<'l> {
    log: &'l core::cell::RefCell<heapless::Vec<(&'static str, u64), 16>>,
    /// A registration the library still uses (`in_use`).
    busy: &'l core::cell::Cell<u64>,
    /// Whether `cancel` succeeds.
    cancels: bool,
}

impl Transport for Stuck<'_> {
    type LocalReg = u64;
    type Peer = u64;
    type RemoteKey = u64;

    fn name(&self) -> &'static str {
        "STUCK"
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }
    fn register(&mut self, region: &Region) -> Result<u64, Error> {
        Ok(region.addr)
    }
    fn deregister(&mut self, reg: u64) {
        let _ = self.log.borrow_mut().push(("deregister", reg));
    }
    fn in_use(&mut self, reg: &u64) -> bool {
        *reg == self.busy.get()
    }
    fn pack_key(&self, reg: &u64, out: &mut [u8]) -> Result<usize, Error> {
        crate::wire::copy_into(out, &reg.to_le_bytes())
    }
    fn local_address(&self, out: &mut [u8]) -> Result<usize, Error> {
        crate::wire::copy_into(out, &[7])
    }
    fn connect(&mut self, _address: &[u8]) -> Result<u64, Error> {
        Ok(7)
    }
    fn disconnect(&mut self, peer: u64) {
        let _ = self.log.borrow_mut().push(("disconnect", peer));
    }
    fn unpack_key(&mut self, _peer: &u64, region: &Region, _key: &[u8]) -> Result<u64, Error> {
        Ok(region.addr)
    }
    fn release_key(&mut self, key: u64) {
        let _ = self.log.borrow_mut().push(("release_key", key));
    }
    fn post(
        &mut self,
        _op: XferOp,
        _peer: &u64,
        _segments: Segments<'_, u64, u64>,
        _notification: Option<&[u8]>,
        _token: Token,
    ) -> Result<PostStatus, Error> {
        Ok(PostStatus::InProgress)
    }
    fn poll(&mut self) -> Option<Completion> {
        None
    }
    fn cancel(&mut self, token: Token) -> Result<(), Error> {
        if self.cancels {
            let _ = self.log.borrow_mut().push(("cancel", token.0));
            return Ok(());
        }
        Err(Error::Unsupported {
            backend: "STUCK",
            what: "cancel",
        })
    }
    fn send_notification(&mut self, _peer: &u64, _msg: &[u8]) -> Result<(), Error> {
        Ok(())
    }
    fn poll_notification(&mut self, _buf: &mut [u8]) -> Option<Result<usize, Error>> {
        None
    }
}

#[test]
fn drop_never_hands_back_what_a_stuck_transfer_uses() {
    let log = core::cell::RefCell::new(heapless::Vec::new());
    let busy = core::cell::Cell::new(0);
    let mut md = [0u8; 256];
    let n = {
        let mut peer = new_eng(
            "bob",
            Stuck {
                log: &log,
                busy: &busy,
                cancels: false,
            },
            test_config(),
        )
        .unwrap();
        peer.register(Region::dram(0x9000, 64)).unwrap();
        peer.local_metadata(&mut md).unwrap()
    };
    log.borrow_mut().clear();
    {
        let mut a = new_eng(
            "alice",
            Stuck {
                log: &log,
                busy: &busy,
                cancels: false,
            },
            test_config(),
        )
        .unwrap();
        a.register(Region::dram(0x1000, 64)).unwrap();
        a.register(Region::dram(0x2000, 64)).unwrap();
        a.load_remote(&md[..n]).unwrap();
        let h = a
            .prepare(
                XferOp::Write,
                &[Desc::new(0x1000, 8)],
                &[Desc::new(0x9000, 8)],
                "bob",
                None,
            )
            .unwrap();
        a.post(h, now(0)).unwrap();
        // Releasing it is refused: the transport cannot cancel.
        assert_eq!(a.release(h), Err(Error::InProgress { handle: h }));
    }
    // The unused region was handed back; the stuck transfer's region, its
    // peer's connection and key were not.
    assert_eq!(log.borrow().as_slice(), &[("deregister", 0x2000)]);
}

#[test]
fn a_region_the_library_still_uses_is_not_deregistered() {
    let log = core::cell::RefCell::new(heapless::Vec::new());
    let busy = core::cell::Cell::new(0x1000);
    let t = Stuck {
        log: &log,
        busy: &busy,
        cancels: false,
    };
    let mut a = new_eng("alice", t, test_config()).unwrap();
    a.register(Region::dram(0x1000, 64)).unwrap();
    assert_eq!(
        a.deregister(0x1000),
        Err(Error::RegionInUse { addr: 0x1000 })
    );
    assert!(log.borrow().is_empty(), "handed back while in use");
    assert_eq!(a.regions().count(), 1, "still registered");
    busy.set(0);
    assert_eq!(a.deregister(0x1000).map(|r| r.addr), Ok(0x1000));
    assert_eq!(log.borrow().as_slice(), &[("deregister", 0x1000)]);
}

/// Two engines over `Stuck` transports: "alice" with regions 0x1000 and
/// 0x2000, and "bob" (region 0x9000) loaded into it.
fn stuck_pair<'l>(
    log: &'l core::cell::RefCell<heapless::Vec<(&'static str, u64), 16>>,
    busy: &'l core::cell::Cell<u64>,
    cancels: bool,
) -> (Engine<'static, Stuck<'l>>, heapless::Vec<u8, 256>) {
    stuck_pair_with(log, busy, cancels, test_config())
}

/// [`stuck_pair`], alice with `config`.
fn stuck_pair_with<'l>(
    log: &'l core::cell::RefCell<heapless::Vec<(&'static str, u64), 16>>,
    busy: &'l core::cell::Cell<u64>,
    cancels: bool,
    config: EngineConfig,
) -> (Engine<'static, Stuck<'l>>, heapless::Vec<u8, 256>) {
    let mut md = [0u8; 256];
    let mut bob = new_eng("bob", Stuck { log, busy, cancels }, test_config()).unwrap();
    bob.register(Region::dram(0x9000, 64)).unwrap();
    let n = bob.local_metadata(&mut md).unwrap();
    let mut a = new_eng("alice", Stuck { log, busy, cancels }, config).unwrap();
    a.register(Region::dram(0x1000, 64)).unwrap();
    a.register(Region::dram(0x2000, 64)).unwrap();
    a.load_remote(&md[..n]).unwrap();
    (a, heapless::Vec::from_slice(&md[..n]).unwrap())
}

#[test]
fn a_failed_peer_fails_its_transfers_and_refuses_posts_until_reloaded() {
    let log = core::cell::RefCell::new(heapless::Vec::new());
    let busy = core::cell::Cell::new(0);
    let (mut a, md) = stuck_pair(&log, &busy, true);
    let w = |a: &mut Engine<'static, Stuck<'_>>, at: u64| {
        a.prepare(
            XferOp::Write,
            &[Desc::new(at, 8)],
            &[Desc::new(0x9000, 8)],
            "bob",
            None,
        )
        .unwrap()
    };
    let (h1, h2) = (w(&mut a, 0x1000), w(&mut a, 0x2000));
    let idle = a.peer_activity("bob").unwrap();
    assert_eq!(
        (idle.in_flight, idle.heard_at, idle.failed),
        (0, None, false)
    );
    assert_eq!(a.busy_peers().count(), 0);
    a.post(h1, now(10)).unwrap();
    a.post(h2, now(20)).unwrap();
    let busy_now = a.peer_activity("bob").unwrap();
    // The clock starts with the first post to an idle peer.
    assert_eq!((busy_now.in_flight, busy_now.heard_at), (2, Some(now(10))));
    assert!(a.busy_peers().eq(["bob"]));
    log.borrow_mut().clear();
    assert_eq!(a.fail_peer("bob", now(30)), Ok(2));
    let gone = Err(Error::disconnected("bob"));
    for h in [h1, h2] {
        assert_eq!(
            a.state(h),
            Ok(XferState::Failed(Error::disconnected("bob")))
        );
        assert_eq!(a.telemetry(h).unwrap().completed_at, Some(now(30)));
    }
    assert_eq!(log.borrow().iter().filter(|e| e.0 == "cancel").count(), 2);
    assert_eq!(a.in_flight(), 0);
    assert_eq!(a.busy_peers().count(), 0);
    assert!(a.peer_activity("bob").unwrap().failed);
    // Later posts are refused, new requests too once posted.
    assert_eq!(a.post(h1, now(40)).map(|_| ()), gone);
    let h3 = w(&mut a, 0x1000);
    assert_eq!(a.post(h3, now(40)).map(|_| ()), gone);
    assert_eq!(
        a.fail_peer("carol", now(40)),
        Err(Error::unknown_peer("carol"))
    );
    // Loading the peer again clears it.
    for h in [h1, h2, h3] {
        a.release(h).unwrap();
    }
    a.load_remote(&md).unwrap();
    assert!(!a.peer_activity("bob").unwrap().failed);
    let h4 = w(&mut a, 0x1000);
    assert_eq!(a.post(h4, now(50)), Ok(XferState::InProgress));
}

#[test]
fn a_failed_peer_keeps_transfers_its_transport_cannot_cancel() {
    let log = core::cell::RefCell::new(heapless::Vec::new());
    let busy = core::cell::Cell::new(0);
    let (mut a, _) = stuck_pair(&log, &busy, false);
    let h = a
        .prepare(
            XferOp::Read,
            &[Desc::new(0x1000, 8)],
            &[Desc::new(0x9000, 8)],
            "bob",
            None,
        )
        .unwrap();
    a.post(h, now(1)).unwrap();
    assert_eq!(a.fail_peer("bob", now(2)), Ok(0));
    // Still in flight: its memory is not reported free.
    assert_eq!(a.state(h), Ok(XferState::InProgress));
    assert_eq!(a.in_flight(), 1);
    assert_eq!(a.release(h), Err(Error::InProgress { handle: h }));
}

/// The deadline the tests below use: 5 ms.
const DEADLINE: Duration = Duration::from_millis(5);
const DEADLINE_NS: u64 = 5_000_000;

fn deadline_config() -> EngineConfig {
    test_config().with_deadline(Some(DEADLINE))
}

/// Alice over a fault injector with a 5 ms deadline, bob loaded into it.
fn faulty_deadline(mem: &Mem) -> (FEng<'_>, Eng<'_>) {
    let inner = FaultInjector::new(Loopback::new(mem, 1), FaultPlan::default());
    let mut a = new_eng("alice", inner, deadline_config()).unwrap();
    let mut b = new_eng("bob", Loopback::new(mem, 2), test_config()).unwrap();
    connect(&mut a, &mut b, false);
    (a, b)
}

#[test]
fn a_transfer_times_out_at_its_deadline_not_before() {
    let mem = Mem::new(BASE);
    let (mut a, _b) = faulty_deadline(&mem);
    let h = write8(&mut a, B, None).unwrap();
    a.transport_mut().delay_next_completion(1000);
    let t0 = 1_000;
    assert_eq!(a.post(h, now(t0)), Ok(XferState::InProgress));
    assert_eq!(a.poll_timeout(), Some(now(t0 + DEADLINE_NS)));
    assert_eq!(a.poll(now(t0 + DEADLINE_NS - 1)), 0);
    assert_eq!(a.state(h), Ok(XferState::InProgress));
    assert_eq!(a.in_flight(), 1);
    assert_eq!(a.poll(now(t0 + DEADLINE_NS)), 1);
    assert_eq!(
        a.state(h),
        Ok(XferState::Failed(Error::TimedOut { after_ms: 5 }))
    );
    assert_eq!(
        a.telemetry(h).unwrap().completed_at,
        Some(now(t0 + DEADLINE_NS))
    );
    assert_eq!(a.in_flight(), 0);
    assert_eq!(a.peer_activity("bob").unwrap().in_flight, 0);
    assert_eq!(a.poll_timeout(), None);
    // The transport was told to abandon it: its held completion is gone.
    assert_eq!(a.transport().held(), 0);
    // A timed-out transfer may be posted again, with a new deadline.
    let t1 = t0 + DEADLINE_NS + 7;
    assert_eq!(a.post(h, now(t1)), Ok(XferState::InProgress));
    assert_eq!(a.poll_timeout(), Some(now(t1 + DEADLINE_NS)));
    assert_eq!(a.poll(now(t1 + 1)), 1);
    assert_eq!(a.state(h), Ok(XferState::Done));
    assert_eq!(a.poll(now(t1 + 2 * DEADLINE_NS)), 0);
    assert_eq!(a.state(h), Ok(XferState::Done));
}

#[test]
fn a_completion_already_there_at_the_deadline_wins() {
    let mem = Mem::new(BASE);
    let (mut a, _b) = faulty_deadline(&mem);
    let h = write8(&mut a, B, None).unwrap();
    a.post(h, now(0)).unwrap();
    assert_eq!(a.poll(now(DEADLINE_NS)), 1);
    assert_eq!(a.state(h), Ok(XferState::Done));
}

#[test]
fn a_completion_after_the_timeout_is_ignored() {
    let mem = Mem::new(BASE);
    let (mut a, _b) = faulty_deadline(&mem);
    let h = write8(&mut a, B, None).unwrap();
    a.transport_mut().delay_next_completion(1000);
    a.post(h, now(0)).unwrap();
    let token = current_token(&a, h);
    assert_eq!(a.poll(now(DEADLINE_NS + 1_000_000)), 1);
    let timed_out = Ok(XferState::Failed(Error::TimedOut { after_ms: 6 }));
    assert_eq!(a.state(h), timed_out);
    let ignored = a.ignored_completions();
    a.transport_mut()
        .inject_completion(Completion {
            token,
            result: Ok(()),
        })
        .unwrap();
    assert_eq!(a.poll(now(DEADLINE_NS + 2_000_000)), 0);
    assert_eq!(a.ignored_completions(), ignored + 1);
    assert_eq!(a.state(h), timed_out);
    assert_eq!(a.in_flight(), 0);
}

#[test]
fn a_transfer_the_transport_cannot_abandon_yet_is_retried() {
    let mem = Mem::new(BASE);
    let (mut a, _b) = faulty_deadline(&mem);
    let h = write8(&mut a, B, None).unwrap();
    a.transport_mut().delay_next_completion(1000);
    a.post(h, now(0)).unwrap();
    a.transport_mut().set_cancel_unsupported(true);
    assert_eq!(a.poll(now(DEADLINE_NS)), 0);
    // Still in flight: its memory stays registered and busy.
    assert_eq!(a.state(h), Ok(XferState::InProgress));
    assert_eq!(a.in_flight(), 1);
    assert!(a.deregister(A).is_err());
    let retry = DEADLINE_NS + 1_000_000;
    assert_eq!(a.poll_timeout(), Some(now(retry)));
    a.transport_mut().set_cancel_unsupported(false);
    assert_eq!(a.poll(now(retry - 1)), 0, "not retried before its time");
    assert_eq!(a.state(h), Ok(XferState::InProgress));
    assert_eq!(a.poll(now(retry)), 1);
    assert_eq!(
        a.state(h),
        Ok(XferState::Failed(Error::TimedOut { after_ms: 6 }))
    );
    assert_eq!(a.poll_timeout(), None);
    a.release(h).unwrap();
    assert_eq!(a.deregister(A), Ok(Region::dram(A, LEN)));
}

#[test]
fn poll_timeout_is_the_earliest_deadline_in_flight() {
    let log = core::cell::RefCell::new(heapless::Vec::new());
    let busy = core::cell::Cell::new(0);
    let w = |a: &mut Engine<'static, Stuck<'_>>, at: u64| {
        a.prepare(
            XferOp::Write,
            &[Desc::new(at, 8)],
            &[Desc::new(0x9000, 8)],
            "bob",
            None,
        )
        .unwrap()
    };
    // No deadline configured: never a timeout, transfers stay in flight.
    let (mut a, _) = stuck_pair(&log, &busy, true);
    let h = w(&mut a, 0x1000);
    a.post(h, now(0)).unwrap();
    assert_eq!(a.poll_timeout(), None);
    assert_eq!(a.poll(now(u64::MAX)), 0);
    assert_eq!(a.state(h), Ok(XferState::InProgress));
    drop(a);

    let (mut a, _) = stuck_pair_with(&log, &busy, true, deadline_config());
    assert_eq!(a.poll_timeout(), None, "nothing in flight");
    let (h1, h2) = (w(&mut a, 0x1000), w(&mut a, 0x2000));
    a.post(h2, now(20)).unwrap();
    assert_eq!(a.poll_timeout(), Some(now(20 + DEADLINE_NS)));
    a.post(h1, now(10)).unwrap();
    assert_eq!(a.poll_timeout(), Some(now(10 + DEADLINE_NS)));
    log.borrow_mut().clear();
    assert_eq!(a.poll(now(15 + DEADLINE_NS)), 1);
    assert_eq!(
        a.state(h1),
        Ok(XferState::Failed(Error::TimedOut { after_ms: 5 }))
    );
    assert_eq!(a.state(h2), Ok(XferState::InProgress));
    assert_eq!(a.poll_timeout(), Some(now(20 + DEADLINE_NS)));
    assert_eq!(log.borrow().iter().filter(|e| e.0 == "cancel").count(), 1);
    // A peer declared failed first: its transfers fail as disconnected,
    // and no deadline remains to wait for.
    assert_eq!(a.fail_peer("bob", now(16 + DEADLINE_NS)), Ok(1));
    assert_eq!(
        a.state(h2),
        Ok(XferState::Failed(Error::disconnected("bob")))
    );
    assert_eq!(a.poll_timeout(), None);
    assert_eq!(a.poll(now(u64::MAX)), 0);
    assert_eq!(
        a.state(h2),
        Ok(XferState::Failed(Error::disconnected("bob")))
    );
}

/// What [`Engine::poll_with`] or [`Engine::fail_peer_with`] handed on:
/// handle, final state and when it ended, in order.
type EndLog = heapless::Vec<(XferHandle, XferState, Option<Instant>), 8>;

fn record(log: &mut EndLog) -> impl FnMut(Ended<'_>) + '_ {
    |e| {
        log.push((e.handle, e.state.clone(), e.telemetry.completed_at))
            .expect("room for every transfer of the table");
    }
}

#[test]
fn poll_with_hands_on_each_ended_transfer_once() {
    let mem = Mem::new(BASE);
    let (mut a, _b) = faulty_deadline(&mem);
    let err = Error::backend("LOOPBACK", -5, "injected");
    let done = write8(&mut a, B, None).unwrap();
    let failed = write8(&mut a, B + 8, None).unwrap();
    let late = write8(&mut a, B + 16, None).unwrap();
    let idle = write8(&mut a, B + 24, None).unwrap();
    // The injector alters the next completion drained from the loopback,
    // which completes in post order.
    let mut log = EndLog::new();
    a.post(late, now(0)).unwrap();
    a.transport_mut().delay_next_completion(1000);
    assert_eq!(a.poll_with(now(0), record(&mut log)), 0);
    assert_eq!(log.as_slice(), []);
    a.post(failed, now(0)).unwrap();
    a.post(done, now(0)).unwrap();
    a.transport_mut().fail_next_completion(err.clone());
    assert_eq!(a.poll_with(now(1), record(&mut log)), 2);
    assert_eq!(
        log.as_slice(),
        [
            (failed, XferState::Failed(err), Some(now(1))),
            (done, XferState::Done, Some(now(1))),
        ]
    );
    // Nothing more ends before the deadline; nothing is handed on twice.
    log.clear();
    assert_eq!(a.poll_with(now(DEADLINE_NS - 1), record(&mut log)), 0);
    assert_eq!(log.as_slice(), []);
    assert_eq!(a.poll_with(now(DEADLINE_NS), record(&mut log)), 1);
    let timed_out = XferState::Failed(Error::TimedOut { after_ms: 5 });
    assert_eq!(
        log.as_slice(),
        [(late, timed_out.clone(), Some(now(DEADLINE_NS)))]
    );
    // A late completion of the timed-out post is ignored, not handed on.
    log.clear();
    let token = current_token(&a, late);
    a.transport_mut()
        .inject_completion(Completion {
            token,
            result: Ok(()),
        })
        .unwrap();
    assert_eq!(a.poll_with(now(DEADLINE_NS + 1), record(&mut log)), 0);
    assert_eq!(log.as_slice(), []);
    assert_eq!(a.state(late), Ok(timed_out));
    // Each post ends once: a re-post is handed on again when it ends, and
    // the one never posted never is.
    a.post(done, now(DEADLINE_NS + 2)).unwrap();
    assert_eq!(a.poll_with(now(DEADLINE_NS + 3), record(&mut log)), 1);
    assert_eq!(
        log.as_slice(),
        [(done, XferState::Done, Some(now(DEADLINE_NS + 3)))]
    );
    assert_eq!(a.state(idle), Ok(XferState::Prepared));
    assert_eq!(a.in_flight(), 0);
}

#[test]
fn fail_peer_with_hands_on_the_transfers_it_failed() {
    let log = core::cell::RefCell::new(heapless::Vec::new());
    let busy = core::cell::Cell::new(0);
    let (mut a, _) = stuck_pair(&log, &busy, true);
    let w = |a: &mut Engine<'static, Stuck<'_>>, at: u64| {
        a.prepare(
            XferOp::Write,
            &[Desc::new(at, 8)],
            &[Desc::new(0x9000, 8)],
            "bob",
            None,
        )
        .unwrap()
    };
    let (h1, h2, idle) = (w(&mut a, 0x1000), w(&mut a, 0x2000), w(&mut a, 0x1000));
    a.post(h1, now(10)).unwrap();
    a.post(h2, now(20)).unwrap();
    let mut ended = EndLog::new();
    assert_eq!(a.fail_peer_with("bob", now(30), record(&mut ended)), Ok(2));
    let gone = XferState::Failed(Error::disconnected("bob"));
    assert_eq!(
        ended.as_slice(),
        [(h1, gone.clone(), Some(now(30))), (h2, gone, Some(now(30))),]
    );
    assert_eq!(a.state(idle), Ok(XferState::Prepared));
    // Failed once: failing the peer again or polling hands on nothing.
    ended.clear();
    assert_eq!(a.fail_peer_with("bob", now(40), record(&mut ended)), Ok(0));
    assert_eq!(a.poll_with(now(50), record(&mut ended)), 0);
    assert_eq!(ended.as_slice(), []);
    assert_eq!(
        a.fail_peer_with("carol", now(60), record(&mut ended)),
        Err(Error::unknown_peer("carol"))
    );
    assert_eq!(ended.as_slice(), []);
}
