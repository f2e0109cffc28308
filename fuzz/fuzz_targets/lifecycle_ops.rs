//! Random sequences of engine operations, over the loopback transport with
//! seeded faults, checked against a simple model of the lifecycle.
#![no_main]

use kvxfer_core::transport::fault::{FaultInjector, FaultPlan};
use kvxfer_core::transport::loopback::{Loopback, LoopbackMemory};
use kvxfer_core::{
    Capacities, Desc, Engine, EngineConfig, Error, Instant, Region, Storage, XferHandle, XferOp,
    XferState,
};
use libfuzzer_sys::fuzz_target;

const BASE: u64 = 0x1000;
const SIZE: usize = 4096;
const A: u64 = BASE;
const B: u64 = BASE + 2048;
const LEN: u64 = 1024;

type Eng<'m> = Engine<'static, FaultInjector<Loopback<'m, SIZE>>>;
type Target<'m> = Engine<'static, Loopback<'m, SIZE>>;

/// 4 regions, 2 peers, 4 transfers of up to 8 segments, 2 prepared lists.
const CAPS: Capacities = Capacities {
    regions: 4,
    peers: 2,
    remote_regions: 8,
    xfers: 4,
    segments: 32,
    segments_per_chunk: 4,
    prepared_lists: 2,
    prepared_entries: 16,
    notifications: 4,
    notification_len: 64,
};

fn config() -> EngineConfig {
    EngineConfig::default().with_segments_per_xfer(8)
}

#[derive(Clone, Debug, PartialEq)]
enum Model {
    Prepared,
    InProgress,
    Finished,
}

fuzz_target!(|data: &[u8]| {
    let Some((&seed, ops)) = data.split_first() else {
        return;
    };
    let mem: LoopbackMemory<SIZE> = LoopbackMemory::new(BASE);
    let plan = FaultPlan {
        seed: seed as u64 + 1,
        fail_post_per_mille: 100,
        fail_completion_per_mille: 100,
        max_delay_polls: (seed % 3) as u32,
        reorder: seed & 4 != 0,
        ..FaultPlan::default()
    };
    let mut a: Eng<'_> = Engine::new(
        "a",
        FaultInjector::new(Loopback::new(&mem, 1), plan),
        config(),
        Storage::owned(&CAPS),
    )
    .unwrap();
    let mut b: Target<'_> =
        Engine::new("b", Loopback::new(&mem, 2), config(), Storage::owned(&CAPS)).unwrap();
    a.register(Region::dram(A, LEN)).unwrap();
    b.register(Region::dram(B, LEN)).unwrap();
    let mut md = [0u8; 256];
    let n = b.local_metadata(&mut md).unwrap();
    a.load_remote(&md[..n]).unwrap();

    let mut live: Vec<(XferHandle, Model)> = Vec::new();
    let mut released: Vec<XferHandle> = Vec::new();
    let mut note = [0u8; 128];
    for (t, pair) in ops.chunks(2).enumerate() {
        let now = Instant::from_nanos(t as u64);
        let (op, arg) = (pair[0] % 8, *pair.get(1).unwrap_or(&0) as u64);
        match op {
            0 => {
                let off = (arg % 16) * 8;
                let r = a.prepare(
                    XferOp::Write,
                    &[Desc::new(A + off, 8)],
                    &[Desc::new(B + off, 8)],
                    "b",
                    None,
                );
                match r {
                    Ok(h) => live.push((h, Model::Prepared)),
                    Err(e) => {
                        assert_eq!(live.len(), 4);
                        assert_eq!(
                            e,
                            Error::CapacityExceeded {
                                what: "transfers",
                                capacity: 4,
                                setting: "xfers",
                            }
                        );
                    }
                }
            }
            1 if !live.is_empty() => {
                let i = arg as usize % live.len();
                let (h, m) = live[i].clone();
                match a.post(h, now) {
                    Ok(s) => {
                        assert_ne!(m, Model::InProgress);
                        assert_eq!(s, XferState::InProgress);
                        live[i].1 = Model::InProgress;
                    }
                    Err(Error::InProgress { handle }) => {
                        assert_eq!(handle, h);
                        assert_eq!(m, Model::InProgress);
                    }
                    Err(e) => {
                        assert_ne!(m, Model::InProgress);
                        assert_eq!(a.state(h), Ok(XferState::Failed(e)));
                        live[i].1 = Model::Finished;
                    }
                }
            }
            2 if !live.is_empty() => {
                let i = arg as usize % live.len();
                let (h, m) = live[i].clone();
                match a.release(h) {
                    Ok(()) => {
                        live.swap_remove(i);
                        released.push(h);
                    }
                    Err(Error::InProgress { .. }) => assert_eq!(m, Model::InProgress),
                    Err(e) => panic!("release failed: {e}"),
                }
            }
            3 => {
                let before: Vec<XferState> =
                    live.iter().map(|(h, _)| a.state(*h).unwrap()).collect();
                let mut ended = Vec::new();
                let finished = a.poll_with(now, |e| ended.push((e.handle, e.state.clone())));
                assert_eq!(ended.len(), finished);
                let mut changed = 0;
                for ((h, m), was) in live.iter_mut().zip(before) {
                    let s = a.state(*h).unwrap();
                    let reported: Vec<_> = ended.iter().filter(|(e, _)| e == h).collect();
                    if s != was {
                        assert_eq!(was, XferState::InProgress);
                        assert!(matches!(s, XferState::Done | XferState::Failed(_)));
                        // Handed on once, with the state it ended in.
                        assert_eq!(reported.len(), 1);
                        assert_eq!(reported[0].1, s);
                        *m = Model::Finished;
                        changed += 1;
                    } else {
                        assert!(reported.is_empty());
                    }
                }
                assert_eq!(changed, finished);
            }
            4 => a.transport_mut().set_cancel_unsupported(arg & 1 == 1),
            5 => {
                let busy = !live.is_empty();
                match a.deregister(A) {
                    Err(Error::RegionBusy { addr, .. }) => assert!(busy && addr == A),
                    Ok(_) => {
                        assert!(!busy);
                        a.register(Region::dram(A, LEN)).unwrap();
                    }
                    Err(e) => panic!("deregister failed: {e}"),
                }
            }
            6 => {
                if let Some(h) = released.get(arg as usize % released.len().max(1)) {
                    assert_eq!(a.state(*h), Err(Error::StaleHandle { handle: *h }));
                    assert_eq!(a.post(*h, now), Err(Error::StaleHandle { handle: *h }));
                }
            }
            _ => {
                let msg = [arg as u8; 3];
                if a.notify("b", &msg).is_ok() {
                    let n = b.poll_notification(&mut note).unwrap().unwrap();
                    assert_eq!((n.peer.as_str(), &note[..n.len]), ("a", &msg[..]));
                }
            }
        }
        for (h, m) in &live {
            let s = a.state(*h).unwrap();
            match m {
                Model::Prepared => assert_eq!(s, XferState::Prepared),
                Model::InProgress => assert_eq!(s, XferState::InProgress),
                Model::Finished => assert!(matches!(s, XferState::Done | XferState::Failed(_))),
            }
        }
    }
});
