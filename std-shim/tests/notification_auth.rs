//! Notifications with an authentication key: agents sharing the key
//! deliver each other's notifications (alone, after a transfer, and from a
//! request made from prepared lists); a notification from an agent with
//! another key or none, which loaded the receiver's metadata some other
//! way, is refused and reported with the name it claimed.
#![cfg(feature = "ucx")]
#![allow(clippy::result_large_err)]

use std::time::{Duration, Instant};

use kvxfer::{Agent, AgentConfig, Desc, Error, WaitOutcome, XferOp};

fn agent(name: &str, key: &[u8]) -> Agent {
    let cfg = AgentConfig::default()
        .with_backend("UCX")
        .with_auth_key(key.to_vec())
        .with_metrics(true);
    Agent::new(name, cfg).expect("agent")
}

/// Everything `agent` receives within `timeout`, or the first error.
fn collect(agent: &Agent, want: usize, timeout: Duration) -> Result<Vec<(String, Vec<u8>)>, Error> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    while got.len() < want && Instant::now() < deadline {
        for (peer, msgs) in agent.wait_notifications(Duration::from_millis(50))? {
            got.extend(msgs.into_iter().map(|m| (peer.clone(), m)));
        }
    }
    got.sort();
    Ok(got)
}

#[test]
fn only_notifications_sealed_with_the_key_are_delivered() {
    let b = agent("na-b", b"shared key");
    let a = agent("na-a", b"shared key");
    let mut target = vec![0u8; 4096];
    let mut source = vec![7u8; 4096];
    // SAFETY: both buffers outlive their registrations (the agents are
    // shut down first) and are read only after the transfers ended.
    unsafe {
        b.register_slice(&mut target).unwrap();
        a.register_slice(&mut source).unwrap();
    }
    let b_addr = b.listen_addr().unwrap().to_string();
    assert_eq!(a.connect(&b_addr).unwrap(), "na-b");

    // Same key: alone, after a transfer, and from prepared lists.
    a.notify("na-b", b"hello").unwrap();
    let local = [Desc::new(source.as_ptr() as u64, 4096)];
    let remote = [Desc::new(target.as_ptr() as u64, 4096)];
    let req = a
        .submit(XferOp::Write, &local, &remote, "na-b", Some(b"after data"))
        .unwrap();
    assert_eq!(req.wait(Duration::from_secs(10)), WaitOutcome::Done);
    let pl = a.prep_local(&local).unwrap();
    let pr = a.prep_remote("na-b", &remote).unwrap();
    let made = a
        .make_xfer(XferOp::Write, pl, &[0], pr, &[0], Some(b"from lists"))
        .unwrap();
    made.post().unwrap();
    assert_eq!(made.wait(Duration::from_secs(10)), WaitOutcome::Done);
    let got = collect(&b, 3, Duration::from_secs(10)).unwrap();
    let want: Vec<(String, Vec<u8>)> = [&b"after data"[..], b"from lists", b"hello"]
        .iter()
        .map(|m| ("na-a".to_string(), m.to_vec()))
        .collect();
    assert_eq!(got, want);
    assert_eq!(target, source, "the WRITE's data");

    // Another key, and none: the side channel refuses them, so they load
    // the metadata directly; their notifications are refused by name.
    let blob = b.local_metadata().unwrap();
    for (name, key) in [("na-c", &b"other key"[..]), ("na-d", &b""[..])] {
        let x = agent(name, key);
        assert!(
            x.connect(&b_addr).is_err(),
            "{name} passed the side channel"
        );
        assert_eq!(x.load_remote(&blob).unwrap(), "na-b");
        x.notify("na-b", b"forged").unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let err = loop {
            match b.wait_notifications(Duration::from_millis(50)) {
                Err(e) => break e,
                Ok(n) => assert!(n.is_empty(), "{name}'s notification delivered: {n:?}"),
            }
            assert!(
                Instant::now() < deadline,
                "{name}'s notification never seen"
            );
        };
        assert_eq!(
            err,
            Error::NotificationsRefused {
                peer: name.try_into().unwrap(),
                count: 1
            }
        );
        assert!(err.to_string().starts_with(&format!(
            "1 notifications claiming to come from {name:?} were refused: not sealed with this \
             agent's authentication key"
        )));
        x.shutdown();
    }
    // Nothing else arrived meanwhile; the keyed sender still gets through.
    a.notify("na-b", b"still here").unwrap();
    assert_eq!(
        collect(&b, 1, Duration::from_secs(10)).unwrap(),
        vec![("na-a".to_string(), b"still here".to_vec())]
    );
    // The metrics count the same: four sent and received, with two
    // transfers, and the two refused from senders `na-b` never loaded
    // (the series of unknown senders, peer "").
    let (sa, sb) = (a.metrics().snapshot(), b.metrics().snapshot());
    let to_b = sa.peer("na-b").unwrap();
    assert_eq!(to_b.notifications_sent, 4);
    assert_eq!(to_b.transfers, [0, 2]);
    let from_a = sb.peer("na-a").unwrap();
    assert_eq!(from_a.notifications_received, 4);
    assert_eq!(from_a.notifications_refused, 0);
    assert_eq!(sb.peer("").unwrap().notifications_refused, 2);
    assert_eq!(sb.peer("").unwrap().notifications_received, 0);
    a.shutdown();
    b.shutdown();
}
