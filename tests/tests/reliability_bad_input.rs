//! Bad input through the Agent: metadata that is truncated, corrupted,
//! of a newer version, from another backend or with oversized counts;
//! descriptors out of range, of zero length or overflowing; deregistration
//! of memory a transfer uses; a full request table. Each is refused with
//! its specific error, nothing panics, and nothing is written: the target
//! process's memory and our own are read back and compared byte for byte
//! afterwards, and the peer loaded before keeps working.
#![allow(clippy::result_large_err)]

mod reliability_common;

use std::time::Duration;

use kvxfer::side_channel::Client;
use kvxfer::{Agent, Capacities, Desc, Error, XferOp, DEFAULT_CAPACITIES};

/// The initiator's remote-region table and transfer table: small, so that
/// the test fills them.
const REMOTE_REGIONS: usize = 16;
const XFERS: usize = 64;
use kvxfer_core::error::{bounded, DescError, MetaError, Side};
use kvxfer_core::wire::{copy_into, Encoder, Metadata, HEADER_LEN, VERSION};
use kvxfer_core::Region;
use reliability_common::{config, pattern, read_all, run, Buf, Target, TargetSpec};

const ENTRY: &str = "child_entry";
const LEN: usize = 64 << 10;
const PEER: &str = "bad-target";

#[test]
#[ignore = "child role of this file's tests; they spawn it"]
fn child_entry() {
    reliability_common::maybe_run_target();
}

fn meta_err(r: Result<String, Error>) -> MetaError {
    match r {
        Err(Error::BadMetadata(m)) => m,
        other => panic!("expected BadMetadata, got {other:?}"),
    }
}

/// Re-encodes `blob` with another backend name and `extra` fake regions
/// appended after its own.
fn reencode(blob: &[u8], backend: &str, extra: usize) -> Vec<u8> {
    let m = Metadata::decode(blob).expect("good metadata");
    let mut out = vec![0u8; blob.len() + (extra + 1) * 64];
    let mut enc = Encoder::new(&mut out, m.name, backend, |b| copy_into(b, m.address)).unwrap();
    let mut last = 0;
    for r in m.regions() {
        enc.region(&r.region, |b| copy_into(b, r.key)).unwrap();
        last = r.region.addr + r.region.len;
    }
    for i in 0..extra as u64 {
        let region = Region::dram(last + 4096 * (i + 1), 16);
        enc.region(&region, |b| copy_into(b, b"k")).unwrap();
    }
    let n = enc.finish().unwrap();
    out.truncate(n);
    out
}

#[test]
fn bad_metadata_and_descriptors_write_nothing() {
    let target = Target::spawn(TargetSpec {
        entry: ENTRY,
        name: PEER,
        backend: "UCX",
        provider: None,
        len: LEN,
        seed: 31,
        env: Vec::new(),
        prefix: Vec::new(),
    });
    let caps = Capacities {
        remote_regions: REMOTE_REGIONS as u32,
        xfers: XFERS as u32,
        ..DEFAULT_CAPACITIES
    };
    let agent = Agent::new("bad-ini", config("UCX", None).with_capacities(caps)).expect("agent");
    let src = Buf::from_vec(pattern(32, LEN));
    let dst = Buf::zeroed(LEN);
    src.register(&agent);
    dst.register(&agent);
    let mut client = Client::connect(&target.addr, None, Duration::from_secs(5)).unwrap();
    let good = client.get_metadata().unwrap();
    assert_eq!(agent.load_remote(&good).unwrap(), PEER);

    // --- metadata ---------------------------------------------------
    // Truncated: in the header, and one byte short of the end.
    for cut in [0usize, 3, 10, HEADER_LEN, good.len() - 1] {
        match meta_err(agent.load_remote(&good[..cut])) {
            MetaError::Truncated { available, .. } => assert!(available <= cut as u64),
            MetaError::BadMagic if cut < 4 => {}
            other => panic!("{cut} bytes: {other:?}"),
        }
    }
    // Corrupted: one body byte flipped fails the checksum.
    let mut bad = good.clone();
    *bad.last_mut().unwrap() ^= 0x40;
    assert!(matches!(
        meta_err(agent.load_remote(&bad)),
        MetaError::ChecksumMismatch { stored, computed } if stored != computed
    ));
    // Corrupted: the checksum itself.
    let mut bad = good.clone();
    bad[12] ^= 1;
    assert!(matches!(
        meta_err(agent.load_remote(&bad)),
        MetaError::ChecksumMismatch { .. }
    ));
    // Not metadata at all.
    assert_eq!(
        meta_err(agent.load_remote(b"GET / HTTP/1.1\r\n\r\n")),
        MetaError::BadMagic
    );
    // A newer version.
    let mut newer = good.clone();
    newer[4..6].copy_from_slice(&(VERSION + 1).to_le_bytes());
    assert_eq!(
        meta_err(agent.load_remote(&newer)),
        MetaError::UnsupportedVersion {
            found: VERSION + 1,
            supported: VERSION
        }
    );
    // From another backend: a real libfabric agent's metadata.
    let fabric = Agent::new(
        "bad-fabric",
        config("LIBFABRIC", Some("tcp;ofi_rxm")).with_listen(None),
    )
    .expect("libfabric agent");
    let fabric_md = fabric.local_metadata().unwrap();
    fabric.shutdown();
    assert_eq!(
        meta_err(agent.load_remote(&fabric_md)),
        MetaError::BackendMismatch {
            expected: "UCX",
            found: bounded("LIBFABRIC")
        }
    );
    // ... and the target's own, relabelled (valid checksum).
    assert!(matches!(
        meta_err(agent.load_remote(&reencode(&good, "NCCL", 0))),
        MetaError::BackendMismatch { expected: "UCX", found } if found.as_str() == "NCCL"
    ));
    // More regions than the agent's remote-region table holds: refused,
    // and the peer's earlier load stays.
    let regions = Metadata::decode(&good).unwrap().region_count as usize;
    let many = reencode(&good, "UCX", REMOTE_REGIONS + 1 - regions);
    assert_eq!(
        agent.load_remote(&many),
        Err(Error::CapacityExceeded {
            what: "remote regions",
            capacity: REMOTE_REGIONS as u32,
            setting: "remote_regions"
        })
    );
    assert_eq!(
        agent.has_remote(PEER),
        Ok(true),
        "the earlier load was kept"
    );
    // A region count larger than the regions present (checksum fixed up).
    let mut lying = good.clone();
    let count_at = good.len() - {
        let m = Metadata::decode(&good).unwrap();
        m.regions().map(|r| 23 + r.key.len()).sum::<usize>() + 2
    };
    lying[count_at..count_at + 2].copy_from_slice(&u16::MAX.to_le_bytes());
    let crc = {
        let mut c = !0u32;
        c = kvxfer_core::wire::crc32_update(c, &lying[..10]);
        !kvxfer_core::wire::crc32_update(c, &lying[HEADER_LEN..])
    };
    lying[10..14].copy_from_slice(&crc.to_le_bytes());
    assert!(matches!(
        meta_err(agent.load_remote(&lying)),
        MetaError::Truncated { .. }
    ));
    // Our own metadata.
    let ours = agent.local_metadata().unwrap();
    assert_eq!(meta_err(agent.load_remote(&ours)), MetaError::SelfReference);
    // Pushed through the side channel, bad metadata is refused by name.
    let err = client.push_metadata(&bad).unwrap_err();
    assert!(err.to_string().contains("checksum mismatch"), "{err}");
    drop(client);
    // None of it replaced the loaded peer.
    assert!(agent.has_remote(PEER).unwrap());

    // --- descriptors ------------------------------------------------
    let t = &target;
    let w = |local: &[Desc], remote: &[Desc]| {
        agent
            .submit(XferOp::Write, local, remote, PEER, None)
            .map(|_| ())
    };
    let invalid = |r: Result<(), Error>| match r {
        Err(Error::InvalidDesc {
            side,
            index,
            reason,
            ..
        }) => (side, index, reason),
        other => panic!("expected InvalidDesc, got {other:?}"),
    };
    // One byte past the end of the target's buffer.
    let (side, index, reason) = invalid(w(
        &[src.desc(0, 16), src.desc(16, 16)],
        &[t.desc(0, 16), t.desc(LEN - 15, 16)],
    ));
    assert_eq!((side, index), (Side::Remote, 1));
    assert!(
        matches!(reason, DescError::OutsideRegistration { region_len, .. } if region_len == LEN as u64)
    );
    // Not registered at the target at all.
    let (side, _, reason) = invalid(w(&[src.desc(0, 16)], &[Desc::new(8, 16)]));
    assert_eq!((side, reason), (Side::Remote, DescError::NotRegistered));
    // Past the end of our own buffer.
    let (side, _, _) = invalid(w(&[src.desc(LEN - 8, 16)], &[t.desc(0, 16)]));
    assert_eq!(side, Side::Local);
    // Zero length.
    let (side, index, reason) = invalid(w(&[src.desc(0, 0)], &[t.desc(0, 0)]));
    assert_eq!((index, reason), (0, DescError::ZeroLength));
    assert!(matches!(side, Side::Local | Side::Remote));
    // Address overflow.
    let (_, _, reason) = invalid(w(&[src.desc(0, 64)], &[Desc::new(u64::MAX - 16, 64)]));
    assert_eq!(reason, DescError::AddressOverflow);
    let (_, _, reason) = invalid(w(&[Desc::new(u64::MAX - 16, 64)], &[t.desc(0, 64)]));
    assert_eq!(reason, DescError::AddressOverflow);
    // Count and length mismatches.
    assert_eq!(
        w(&[src.desc(0, 8)], &[t.desc(0, 8), t.desc(8, 8)]),
        Err(Error::CountMismatch {
            local: 1,
            remote: 2
        })
    );
    assert_eq!(
        w(&[src.desc(0, 8)], &[t.desc(0, 9)]),
        Err(Error::LengthMismatch {
            index: 0,
            local: 8,
            remote: 9
        })
    );
    // An unknown peer.
    assert_eq!(
        agent
            .submit(
                XferOp::Write,
                &[src.desc(0, 8)],
                &[t.desc(0, 8)],
                "nobody",
                None
            )
            .map(|_| ())
            .unwrap_err(),
        Error::unknown_peer("nobody")
    );

    // --- deregistration while in use; a full request table ------------
    let req = agent
        .prepare(
            XferOp::Write,
            &[src.desc(0, 64)],
            &[t.desc(0, 64)],
            PEER,
            None,
        )
        .unwrap();
    match agent.deregister(src.addr()) {
        Err(Error::RegionBusy { addr, users }) => {
            assert_eq!(addr, src.addr());
            assert!(users >= 1);
        }
        other => panic!("deregistration of a busy region gave {other:?}"),
    }
    drop(req);
    let mut reqs = Vec::new();
    for i in 0..XFERS {
        let r = agent.prepare(XferOp::Read, &[dst.desc(i, 1)], &[t.desc(i, 1)], PEER, None);
        match r {
            Ok(r) => reqs.push(r),
            Err(e) => panic!("request {i} of {XFERS}: {e}"),
        }
    }
    assert_eq!(
        agent
            .prepare(XferOp::Read, &[dst.desc(0, 1)], &[t.desc(0, 1)], PEER, None)
            .map(|_| ())
            .unwrap_err(),
        Error::CapacityExceeded {
            what: "transfers",
            capacity: XFERS as u32,
            setting: "xfers"
        }
    );
    drop(reqs);

    // --- nothing was written anywhere --------------------------------
    assert_eq!(
        src.snapshot(),
        pattern(32, LEN),
        "our source buffer changed"
    );
    assert_eq!(
        dst.snapshot(),
        vec![0u8; LEN],
        "our destination buffer changed"
    );
    assert!(
        read_all(&agent, &dst, t, PEER) == pattern(31, LEN),
        "the target's memory changed"
    );
    // And the agent still works for a good WRITE.
    run(
        &agent,
        XferOp::Write,
        &[src.desc(0, LEN)],
        &[t.desc(0, LEN)],
        PEER,
        Duration::from_secs(10),
    )
    .expect("good WRITE");
    dst.fill(&vec![0; LEN]);
    assert!(read_all(&agent, &dst, t, PEER) == pattern(32, LEN));
    agent.deregister(src.addr()).unwrap();
    agent.deregister(dst.addr()).unwrap();
    agent.shutdown();
}
