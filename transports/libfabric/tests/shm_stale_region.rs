//! A `shm` transport is created, and transfers, while `/dev/shm` holds
//! regions left by a dead process that had this process's id.
//!
//! shm names an endpoint's region after the process id by default
//! (`<pid>:<uid>:<index>`). A process killed without cleanup leaves its
//! region; a later process given the same id found "its" region in use by
//! a live process (itself) and `fi_enable` failed with `Device or resource
//! busy`. The transport now names the endpoint itself.
//!
//! Its own test binary: shm numbers the endpoints of a process from 0, so
//! the stale names below are the ones the default scheme would pick here.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kvxfer_core::{PostStatus, Region, Segment, Segments, Token, Transport, XferOp};
use kvxfer_libfabric::{provider_usable, FabricConfig, FabricTransport};

/// Held by each test: the first looks for the files a transport adds to
/// `/dev/shm`, which the second must not add to meanwhile.
static SERIAL: Mutex<()> = Mutex::new(());

/// Removes the files it holds when dropped (also when the test fails).
struct Stale(Vec<PathBuf>);

impl Drop for Stale {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn shm_files() -> HashSet<PathBuf> {
    std::fs::read_dir("/dev/shm")
        .expect("/dev/shm")
        .map(|e| e.expect("entry").path())
        .collect()
}

#[test]
fn shm_transfers_despite_regions_left_under_this_process_id() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    assert!(provider_usable("shm"), "libfabric offers shm here");
    let cfg = FabricConfig::default().with_provider("shm");
    let before = shm_files();
    let mut tx = FabricTransport::new(&cfg).expect("first shm transport");
    // The region of `tx`, as a dead process with this id would have left
    // it (its header names this process, which is alive).
    let region = shm_files()
        .difference(&before)
        .find(|p| std::fs::metadata(p).is_ok_and(|m| m.len() > 0))
        .cloned()
        .expect("the region of the first transport in /dev/shm");
    let uid = std::fs::metadata(&region).expect("region").uid();
    let mut stale = Stale(Vec::new());
    for index in 0..16 {
        let name = PathBuf::from(format!("/dev/shm/{}:{uid}:{index}", std::process::id()));
        if !name.exists() {
            std::fs::copy(&region, &name).expect("stale region");
            stale.0.push(name);
        }
    }
    assert!(!stale.0.is_empty());

    let mut rx = FabricTransport::new(&cfg).expect("shm transport beside stale regions");
    let mut address = vec![0u8; 1024];
    let n = rx.local_address(&mut address).expect("address");
    let peer = tx.connect(&address[..n]).expect("connect");

    const LEN: usize = 256 * 1024;
    let src: Vec<u8> = (0..LEN).map(|i| (i % 251) as u8).collect();
    let mut dst = vec![0u8; LEN];
    let src_region = Region::dram(src.as_ptr() as u64, LEN as u64);
    let dst_region = Region::dram(dst.as_mut_ptr() as u64, LEN as u64);
    let src_reg = tx.register(&src_region).expect("register source");
    let dst_reg = rx.register(&dst_region).expect("register target");
    let mut key = [0u8; 256];
    let k = rx.pack_key(&dst_reg, &mut key).expect("pack key");
    let rkey = tx
        .unpack_key(&peer, &dst_region, &key[..k])
        .expect("unpack key");
    let seg = [Segment {
        local_addr: src_region.addr,
        remote_addr: dst_region.addr,
        len: LEN as u64,
        local: &src_reg,
        remote: &rkey,
        remote_region_addr: dst_region.addr,
    }];
    let st = tx
        .post(
            XferOp::Write,
            &peer,
            Segments::from(&seg[..]),
            None,
            Token(1),
        )
        .expect("post WRITE");
    if st == PostStatus::InProgress {
        let deadline = Instant::now() + Duration::from_secs(30);
        let done = loop {
            if let Some(c) = tx.poll() {
                break c;
            }
            let _ = rx.poll();
            assert!(Instant::now() < deadline, "WRITE not done in 30 s");
        };
        assert_eq!((done.token, done.result), (Token(1), Ok(())));
    }
    assert!(dst == src, "the target's bytes after the WRITE");
    tx.deregister(src_reg);
    rx.deregister(dst_reg);
    tx.disconnect(peer);
}

/// Regions named by transports of dead processes are removed when a shm
/// transport is created; those of live processes stay.
#[test]
fn regions_of_dead_processes_are_removed() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut child = std::process::Command::new("true")
        .spawn()
        .expect("spawn true");
    let dead = child.id();
    child.wait().expect("wait for true");
    let dead_region = PathBuf::from(format!("/dev/shm/kvxfer-{dead}-1-0:0:0"));
    let live_region = PathBuf::from(format!(
        "/dev/shm/kvxfer-{}-1-999999:0:0",
        std::process::id()
    ));
    let files = Stale(vec![dead_region.clone(), live_region.clone()]);
    for p in &files.0 {
        std::fs::write(p, [0u8; 64]).expect("region file");
    }
    let _t =
        FabricTransport::new(&FabricConfig::default().with_provider("shm")).expect("shm transport");
    assert!(!dead_region.exists(), "{dead_region:?} removed");
    assert!(live_region.exists(), "{live_region:?} kept");
}
