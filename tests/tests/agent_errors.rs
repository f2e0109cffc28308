//! Every invalid call the core rejects, made through the `Agent` and
//! answered with its exact error; backend selection from the environment
//! (in child processes, so no test changes this process's environment);
//! agents on different backends refusing each other.
#![allow(clippy::result_large_err)]

use std::time::Duration;

use kvxfer::{Agent, AgentConfig, Desc, Error, WaitOutcome, XferOp, XferState};
use kvxfer_core::error::{bounded, DescError, MetaError, Side};
use kvxfer_tests::{debug_of, AlignedBuf, Fabric, Peer};

const LEN: u64 = 64 << 10;
const BIG: u64 = 64 << 20;

/// UCX as this process's own agent gets it, for a peer to match.
fn ucx_like_parent() -> Fabric {
    let mut f = Fabric::ucx();
    f.vars[2] = std::env::var("UCX_TLS").ok();
    f
}

/// An in-process UCX agent without a progress thread (so a posted transfer
/// stays in progress until this test polls) and a peer process with a
/// registered buffer of `remote_len` bytes; returns (agent, peer, peer's
/// name, peer's buffer).
fn setup(name: &str, remote_len: u64) -> (Agent, Peer, String, u64) {
    let cfg = AgentConfig::default()
        .with_backend("UCX")
        .with_progress_thread(false);
    let agent = Agent::new(name, cfg).unwrap();
    let mut peer = Peer::spawn(&format!("{name}-peer"), &ucx_like_parent());
    let dst = peer.alloc(remote_len);
    let pname = agent.connect(peer.addr()).unwrap();
    assert_eq!(pname, peer.name);
    (agent, peer, pname, dst)
}

#[test]
fn descriptor_and_peer_errors_are_exact() {
    let (agent, peer, p, dst) = setup("errs", LEN);
    let mut buf = AlignedBuf::new(LEN as usize);
    let unreg = AlignedBuf::new(4096);
    let a = buf.addr();
    // SAFETY: `buf` outlives its registration (deregistered below); no
    // transfer is posted in this test.
    unsafe { agent.register_slice(buf.as_mut_slice()).unwrap() };
    let ok_pair = (Desc::new(a, 64), Desc::new(dst, 64));

    // Unknown peer, through every call that names one.
    let nobody = Error::unknown_peer("nobody");
    let l = [ok_pair.0];
    let r = [ok_pair.1];
    assert_eq!(
        agent
            .submit(XferOp::Write, &l, &r, "nobody", None)
            .unwrap_err(),
        nobody
    );
    assert_eq!(
        agent
            .prepare(XferOp::Read, &l, &r, "nobody", None)
            .unwrap_err(),
        nobody
    );
    assert_eq!(agent.notify("nobody", b"x").unwrap_err(), nobody);
    assert_eq!(agent.check_remote("nobody", &r).unwrap_err(), nobody);
    assert_eq!(agent.prep_remote("nobody", &r).unwrap_err(), nobody);
    assert_eq!(agent.invalidate_remote("nobody").unwrap_err(), nobody);

    // Unregistered memory: local, remote, and deregistration.
    let bad_local = [ok_pair.0, Desc::new(unreg.addr(), 64)];
    let two_r = [ok_pair.1, Desc::new(dst + 64, 64)];
    assert_eq!(
        agent
            .submit(XferOp::Write, &bad_local, &two_r, &p, None)
            .unwrap_err(),
        Error::InvalidDesc {
            side: Side::Local,
            index: 1,
            addr: unreg.addr(),
            len: 64,
            reason: DescError::NotRegistered
        }
    );
    let two_l = [ok_pair.0, Desc::new(a + 64, 64)];
    let bad_remote = [ok_pair.1, Desc::new(8, 64)];
    assert_eq!(
        agent
            .submit(XferOp::Read, &two_l, &bad_remote, &p, None)
            .unwrap_err(),
        Error::InvalidDesc {
            side: Side::Remote,
            index: 1,
            addr: 8,
            len: 64,
            reason: DescError::NotRegistered
        }
    );
    assert_eq!(
        agent.deregister(unreg.addr()).unwrap_err(),
        Error::NotRegistered {
            addr: unreg.addr(),
            len: 0
        }
    );

    // Descriptors leaving their registration by one byte.
    let out_l = [ok_pair.0, Desc::new(a + LEN - 63, 64)];
    assert_eq!(
        agent
            .submit(XferOp::Write, &out_l, &two_r, &p, None)
            .unwrap_err(),
        Error::InvalidDesc {
            side: Side::Local,
            index: 1,
            addr: a + LEN - 63,
            len: 64,
            reason: DescError::OutsideRegistration {
                region_addr: a,
                region_len: LEN
            }
        }
    );
    let out_r = [ok_pair.1, Desc::new(dst + LEN - 63, 64)];
    let remote_outside = Error::InvalidDesc {
        side: Side::Remote,
        index: 1,
        addr: dst + LEN - 63,
        len: 64,
        reason: DescError::OutsideRegistration {
            region_addr: dst,
            region_len: LEN,
        },
    };
    assert_eq!(
        agent
            .submit(XferOp::Write, &two_l, &out_r, &p, None)
            .unwrap_err(),
        remote_outside
    );
    assert_eq!(agent.check_remote(&p, &out_r).unwrap_err(), remote_outside);
    assert_eq!(
        agent.prep_local(&[Desc::new(a, 0)]).unwrap_err(),
        Error::InvalidDesc {
            side: Side::Local,
            index: 0,
            addr: a,
            len: 0,
            reason: DescError::ZeroLength
        }
    );

    // Mismatched lengths and counts.
    let long_l = [ok_pair.0, Desc::new(a + 64, 128)];
    assert_eq!(
        agent
            .submit(XferOp::Write, &long_l, &two_r, &p, None)
            .unwrap_err(),
        Error::LengthMismatch {
            index: 1,
            local: 128,
            remote: 64
        }
    );
    assert_eq!(
        agent
            .submit(XferOp::Write, &two_l, &r, &p, None)
            .unwrap_err(),
        Error::CountMismatch {
            local: 2,
            remote: 1
        }
    );

    // Nothing above left a registration in use.
    assert_eq!(agent.deregister(a).unwrap().addr, a);
    drop(peer);
    agent.shutdown();
}

#[test]
fn repost_while_in_progress_and_stale_lists() {
    let (agent, peer, p, dst) = setup("repost", BIG);
    let mut buf = AlignedBuf::new(BIG as usize);
    let a = buf.addr();
    // SAFETY: `buf` outlives its registration (deregistered below) and
    // is only read by WRITEs.
    unsafe { agent.register_slice(buf.as_mut_slice()).unwrap() };

    let req = agent
        .prepare(
            XferOp::Write,
            &[Desc::new(a, BIG)],
            &[Desc::new(dst, BIG)],
            &p,
            None,
        )
        .unwrap();
    assert_eq!(req.status(), Ok(XferState::Prepared));
    // Without a progress thread the state moves only when this test polls,
    // so the transfer is still in progress at the second post.
    assert_eq!(req.post(), Ok(XferState::InProgress));
    assert_eq!(
        req.post(),
        Err(Error::InProgress {
            handle: req.handle()
        })
    );
    assert_eq!(
        agent.deregister(a),
        Err(Error::RegionBusy { addr: a, users: 1 })
    );
    assert_eq!(req.wait(Duration::from_secs(20)), WaitOutcome::Done);
    // Re-posting a finished transfer is allowed.
    req.repost().unwrap();
    assert_eq!(req.wait(Duration::from_secs(20)), WaitOutcome::Done);
    req.release().unwrap();

    // Prepared lists: stale after release, out-of-range indices, stale
    // after the peer is invalidated.
    let pl = agent
        .prep_local(&[Desc::new(a, 4096), Desc::new(a + 4096, 4096)])
        .unwrap();
    let pr = agent
        .prep_remote(&p, &[Desc::new(dst, 4096), Desc::new(dst + 8192, 4096)])
        .unwrap();
    assert_eq!(
        agent
            .make_xfer(XferOp::Write, pl, &[0, 2], pr, &[1, 0], None)
            .unwrap_err(),
        Error::IndexOutOfRange {
            side: Side::Local,
            index: 1,
            value: 2,
            len: 2
        }
    );
    assert_eq!(
        agent
            .make_xfer(XferOp::Write, pl, &[0, 1], pr, &[1], None)
            .unwrap_err(),
        Error::CountMismatch {
            local: 2,
            remote: 1
        }
    );
    let x = agent
        .make_xfer(XferOp::Write, pl, &[0, 1], pr, &[1, 0], Some(b"prepared"))
        .unwrap();
    x.post().unwrap();
    assert_eq!(x.wait(Duration::from_secs(20)), WaitOutcome::Done);
    x.release().unwrap();
    agent.release_local(pl).unwrap();
    let stale = Error::StalePrepared {
        index: pl.index,
        generation: pl.generation,
    };
    assert_eq!(
        agent
            .make_xfer(XferOp::Write, pl, &[0], pr, &[0], None)
            .unwrap_err(),
        stale
    );
    assert_eq!(agent.release_local(pl).unwrap_err(), stale);
    let pl2 = agent.prep_local(&[Desc::new(a, 4096)]).unwrap();
    agent.invalidate_remote(&p).unwrap();
    assert_eq!(
        agent
            .make_xfer(XferOp::Write, pl2, &[0], pr, &[0], None)
            .unwrap_err(),
        Error::StalePeer { peer: bounded(&p) }
    );
    agent.release_remote(pr).unwrap();
    agent.release_local(pl2).unwrap();
    assert_eq!(agent.deregister(a).unwrap().addr, a);
    drop(peer);
    agent.shutdown();
}

fn unsupported(value: &str) -> String {
    debug_of(&Error::UnsupportedBackend {
        value: bounded(value),
        supported: kvxfer::config::BUILT_IN,
    })
}

#[test]
fn backend_from_environment_variables() {
    let f = Fabric::ucx();
    let env = |kv: Option<&str>, trt: Option<&str>| {
        Peer::builder("envsel", &f)
            .env("KVXFER_BACKEND", kv)
            .env("TRTLLM_NIXL_KVCACHE_BACKEND", trt)
            .env("KVXFER_LIBFABRIC_PROVIDER", Some("tcp;ofi_rxm"))
    };
    assert_eq!(
        env(Some("NCCL"), None).try_spawn().unwrap_err(),
        unsupported("NCCL")
    );
    assert_eq!(
        env(None, Some("mooncake")).try_spawn().unwrap_err(),
        unsupported("mooncake")
    );
    // An invalid KVXFER_BACKEND is an error, not a fall-through.
    assert_eq!(
        env(Some("bogus"), Some("UCX")).try_spawn().unwrap_err(),
        unsupported("bogus")
    );
    // TensorRT-LLM's variable alone selects the backend.
    let p = env(None, Some("libfabric")).try_spawn().unwrap();
    assert_eq!(p.backend, "LIBFABRIC");
    // KVXFER_BACKEND wins over it; the config wins over both.
    let p = env(Some("UCX"), Some("LIBFABRIC")).try_spawn().unwrap();
    assert_eq!(p.backend, "UCX");
    let p = env(Some("LIBFABRIC"), Some("bogus"))
        .config_backend("UCX")
        .try_spawn()
        .unwrap();
    assert_eq!(p.backend, "UCX");
    let p = env(None, None).try_spawn().unwrap();
    assert_eq!(p.backend, "UCX");
}

#[test]
fn different_backends_refuse_each_other() {
    let mut u = Peer::spawn("mix-ucx", &Fabric::ucx());
    let mut l = Peer::spawn("mix-fabric", &Fabric::libfabric("tcp;ofi_rxm"));
    u.alloc(4096);
    l.alloc(4096);
    let ucx_refuses = debug_of(&Error::BadMetadata(MetaError::BackendMismatch {
        expected: "UCX",
        found: bounded("LIBFABRIC"),
    }));
    let fabric_refuses = debug_of(&Error::BadMetadata(MetaError::BackendMismatch {
        expected: "LIBFABRIC",
        found: bounded("UCX"),
    }));
    let (ua, la) = (u.addr().to_string(), l.addr().to_string());
    assert_eq!(u.connect(&la), Err(ucx_refuses.clone()));
    assert_eq!(l.connect(&ua), Err(fabric_refuses.clone()));
    let (um, lm) = (u.metadata(), l.metadata());
    assert_eq!(u.load(&lm), Err(ucx_refuses));
    assert_eq!(l.load(&um), Err(fabric_refuses));
    // Neither knows the other afterwards.
    let unknown = |n: &str| debug_of(&Error::unknown_peer(n));
    assert_eq!(u.notify("mix-fabric", b"x"), Err(unknown("mix-fabric")));
    assert_eq!(l.notify("mix-ucx", b"x"), Err(unknown("mix-ucx")));
    u.quit();
    l.quit();
}

/// A peer asks, over the side channel, to have its metadata forgotten;
/// asking for a name the agent does not know is answered with the error.
#[test]
fn side_channel_invalidation_forgets_the_peer() {
    use kvxfer::side_channel::Client;
    let cfg = || AgentConfig::default().with_backend("UCX");
    let a = Agent::new("inv-a", cfg()).unwrap();
    let b = Agent::new("inv-b", cfg()).unwrap();
    let b_addr = b.listen_addr().unwrap().to_string();
    assert_eq!(a.connect(&b_addr).unwrap(), "inv-b");
    assert!(b.has_remote("inv-a").unwrap());
    let mut c = Client::connect(&b_addr, None, Duration::from_secs(5)).unwrap();
    c.invalidate("inv-a").unwrap();
    assert!(!b.has_remote("inv-a").unwrap());
    match c.invalidate("inv-a") {
        Err(Error::Backend { text, .. }) => assert_eq!(
            text.as_str(),
            format!(
                "{b_addr}: invalidate metadata: unknown remote agent \"inv-a\"; load its \
                 metadata first"
            )
        ),
        other => panic!("{other:?}"),
    }
    // Pushing again makes it known again.
    assert_eq!(a.connect(&b_addr).unwrap(), "inv-b");
    assert!(b.has_remote("inv-a").unwrap());
}

#[test]
fn bad_rail_maps_fail_the_agent_naming_the_value() {
    // From the configuration, over libfabric and UCX rails.
    for backend in ["LIBFABRIC", "UCX"] {
        let cfg = |map: &str| {
            AgentConfig::default()
                .with_backend(backend)
                .with_provider("tcp;ofi_rxm")
                .with_listen(None)
                .with_rails(&["lo", "lo"])
                .with_rail_map(map)
        };
        let err = |map: &str| {
            Agent::new("railmap", cfg(map))
                .map(|a| a.shutdown())
                .expect_err(map)
                .to_string()
        };
        assert_eq!(
            err("numa0=lo,gpu1=eth9"),
            "kvxfer error -1: rail map: unknown rail \"eth9\" (rails: lo, lo)",
            "{backend}"
        );
        assert_eq!(
            err("node0=lo"),
            "kvxfer error -1: rail map: bad key \"node0\" (numaN or gpuN)",
            "{backend}"
        );
        // A good map makes an agent.
        Agent::new("railmap", cfg("numa0=lo,gpu0=lo"))
            .expect("good map")
            .shutdown();
    }
    // From the environment.
    let f = Fabric::libfabric("tcp;ofi_rxm");
    let spawn = |map: &str| {
        Peer::builder("railmap-env", &f)
            .env("KVXFER_RAILS", Some("lo,lo"))
            .env("KVXFER_RAIL_MAP", Some(map))
            .try_spawn()
    };
    assert_eq!(
        spawn("numa0").unwrap_err(),
        debug_of(&Error::backend(
            "kvxfer",
            -1,
            "KVXFER_RAIL_MAP: \"numa0\" is not KEY=IF+IF"
        ))
    );
    assert_eq!(
        spawn("numa0=lo+eth1").unwrap_err(),
        debug_of(&Error::backend(
            "kvxfer",
            -1,
            "KVXFER_RAIL_MAP: unknown rail \"eth1\" (rails: lo, lo)"
        ))
    );
}
