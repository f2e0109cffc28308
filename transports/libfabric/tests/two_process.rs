//! libfabric between two processes, through the `Transport` trait: the
//! conformance suite of `kvxfer-testkit` on providers `tcp;ofi_rxm`, `shm`
//! and `sockets` (and the native `tcp` of libfabric 2.x), then what is
//! libfabric's own (address and key formats, a dead `shm` peer, memory
//! never touched after an abandoned transfer, provider choice).
//!
//! The transport keeps no deadline (the engine does, and abandons a
//! transfer past it): where a test needs one, it abandons the transfer
//! itself, as the engine would.
//!
//! Each test spawns this test binary again as its target process (see
//! `kvxfer_testkit::target`).

// kvxfer_core::Error is a large inline value by design (no_std, no alloc).
#![allow(clippy::result_large_err)]

use std::time::{Duration, Instant};

use kvxfer_core::{Completion, Error, Region, Segment, Token, Transport, XferOp};
use kvxfer_libfabric::{FabricConfig, FabricReg, FabricRemoteKey, FabricTransport, BACKEND};
use kvxfer_testkit::{checksum, conformance_suite, pattern, Backend, Expect, PeerDeath};

/// How long the tests wait for a transfer to a live target: generous, as
/// a loaded 2-core machine took seconds with the `sockets` provider (a
/// 128 × 16 KiB WRITE and 300 WRITEs in flight while another build ran).
const STEP: Duration = Duration::from_secs(70);

/// The tests' transport configuration.
fn config(provider: &str) -> FabricConfig {
    FabricConfig::default().with_provider(provider)
}

/// libfabric over one provider.
struct Fabric(&'static str);

impl Backend for Fabric {
    type T = FabricTransport;

    fn transport(&self) -> FabricTransport {
        FabricTransport::new(&config(self.0)).expect("libfabric transport")
    }

    fn expect(&self) -> Expect {
        Expect {
            name: BACKEND,
            peer_death: Some(PeerDeath {
                within: Duration::from_secs(5),
                error: match self.0 {
                    // tcp reports the broken connection.
                    "tcp;ofi_rxm" | "tcp" => |e| matches!(e, Error::RemoteDisconnected { .. }),
                    // sockets fails the transfers with an I/O error.
                    _ => |e| {
                        matches!(
                            e,
                            Error::RemoteDisconnected { .. }
                                | Error::Backend {
                                    backend: BACKEND,
                                    ..
                                }
                        )
                    },
                },
            }),
        }
    }

    fn in_flight(&self, t: &FabricTransport) -> Option<usize> {
        Some(t.in_flight())
    }
}

conformance_suite!(tcp_rxm, Fabric("tcp;ofi_rxm"));
// A dead shm peer is found by the deadline alone: see
// `shm_peer_death_fails_within_deadline`.
conformance_suite!(shm, Fabric("shm"), no_peer_death);
conformance_suite!(sockets, Fabric("sockets"));
// libfabric 2.x's tcp provider gives FI_EP_RDM itself (1.x layers rxm
// under the same name, tested above).
#[cfg(libfabric_v2)]
conformance_suite!(tcp, Fabric("tcp"));

// ------------------------------------------- the suite's harness, libfabric's way

type Target = kvxfer_testkit::Target;

/// A target of the suite module for a provider.
trait Spawn {
    fn spawn(provider: &str, size: usize) -> Self;
}

impl Spawn for Target {
    fn spawn(provider: &str, size: usize) -> Target {
        let module = match provider {
            "tcp;ofi_rxm" => "two_process::tcp_rxm",
            "shm" => "two_process::shm",
            "sockets" => "two_process::sockets",
            "tcp" => "two_process::tcp",
            other => panic!("no suite module for provider {other}"),
        };
        Target::start(module, size)
    }
}

/// The initiator's side: a transport connected to a target.
type Initiator = kvxfer_testkit::Initiator<FabricTransport>;

/// The initiator as these tests use it: segments as offsets into a local
/// buffer and into the target's.
trait FabricInitiator {
    fn new(provider: &str, target: &Target, remote_len: usize) -> Self;
    fn with_config(cfg: FabricConfig, target: &Target, remote_len: usize) -> Self;
    /// Posts a transfer of `(local offset, remote offset, len)` triples.
    fn post(
        &mut self,
        op: XferOp,
        reg: &FabricReg,
        local: &[u8],
        pairs: &[(usize, usize, usize)],
        notification: Option<&[u8]>,
        token: u64,
    ) -> Result<kvxfer_core::PostStatus, Error>;
    /// Polls until `n` completions arrived; panics after `timeout`.
    fn wait(&mut self, n: usize, timeout: Duration) -> Vec<Completion>;
    /// Posts, expects it in progress, and waits for its success.
    fn run(
        &mut self,
        op: XferOp,
        reg: &FabricReg,
        local: &[u8],
        pairs: &[(usize, usize, usize)],
        token: u64,
    );
}

impl FabricInitiator for Initiator {
    fn new(provider: &str, target: &Target, remote_len: usize) -> Initiator {
        Initiator::with_config(config(provider), target, remote_len)
    }

    fn with_config(cfg: FabricConfig, target: &Target, remote_len: usize) -> Initiator {
        assert_eq!(target.region.len, remote_len as u64, "the target's buffer");
        let t = FabricTransport::new(&cfg).expect("initiator transport");
        Initiator::connect(t, target)
    }

    fn post(
        &mut self,
        op: XferOp,
        reg: &FabricReg,
        local: &[u8],
        pairs: &[(usize, usize, usize)],
        notification: Option<&[u8]>,
        token: u64,
    ) -> Result<kvxfer_core::PostStatus, Error> {
        let rkey = self.rkey.as_ref().unwrap();
        let segs: Vec<Segment<'_, FabricReg, FabricRemoteKey>> = pairs
            .iter()
            .map(|&(lo, ro, len)| Segment {
                local_addr: local.as_ptr() as u64 + lo as u64,
                remote_addr: self.remote.addr + ro as u64,
                len: len as u64,
                local: reg,
                remote: rkey,
                remote_region_addr: self.remote.addr,
            })
            .collect();
        self.t.post(
            op,
            self.peer.as_ref().unwrap(),
            kvxfer_core::Segments::from(&segs[..]),
            notification,
            Token(token),
        )
    }

    fn wait(&mut self, n: usize, timeout: Duration) -> Vec<Completion> {
        self.wait_n(n, timeout)
    }

    fn run(
        &mut self,
        op: XferOp,
        reg: &FabricReg,
        local: &[u8],
        pairs: &[(usize, usize, usize)],
        token: u64,
    ) {
        let st = self.post(op, reg, local, pairs, None, token).expect("post");
        assert_eq!(st, kvxfer_core::PostStatus::InProgress);
        let c = self.wait(1, STEP);
        assert_eq!(
            c[0],
            Completion {
                token: Token(token),
                result: Ok(())
            }
        );
    }
}

fn local_buf(len: usize, seed: u64) -> Vec<u8> {
    pattern(seed, len)
}

// ------------------------------------------------------------ libfabric's own

fn peer_death(provider: &str) {
    let mut target = Target::spawn(provider, 1 << 20);
    let mut ini = Initiator::new(provider, &target, 1 << 20);
    let mut src = local_buf(1 << 20, 1);
    let reg = ini
        .t
        .register(&Region::dram(src.as_mut_ptr() as u64, src.len() as u64))
        .unwrap();
    ini.run(XferOp::Write, &reg, &src, &[(0, 0, 1 << 20)], 1);
    target.child.kill().unwrap();
    target.child.wait().unwrap();
    let posted = ini.post(XferOp::Write, &reg, &src, &[(0, 0, 1 << 20)], None, 2);
    match posted {
        // Refused at once is fine too, if it says why.
        Err(e) => assert!(
            matches!(
                e,
                Error::Backend {
                    backend: BACKEND,
                    ..
                } | Error::RemoteDisconnected { .. }
            ),
            "{e}"
        ),
        Ok(_) => {
            // The engine's deadline: 2 s. A provider that finds the peer
            // gone fails the transfer before; one that does not (shm)
            // keeps it in flight until the engine abandons it.
            const DEADLINE: Duration = Duration::from_secs(2);
            let start = Instant::now();
            let mut got = None;
            while got.is_none() && start.elapsed() < DEADLINE {
                got = ini.t.poll();
                std::thread::sleep(Duration::from_millis(1));
            }
            let abandoned = got.is_none();
            let c = match got {
                Some(c) => c,
                None => {
                    assert_eq!(ini.t.in_flight(), 1, "{provider}: lost the transfer");
                    ini.t.abandon(Token(2)).expect("abandon at the deadline");
                    ini.wait(1, Duration::from_secs(1)).remove(0)
                }
            };
            assert_eq!(c.token, Token(2));
            assert_eq!(ini.t.in_flight(), 0);
            eprintln!(
                "{provider}: WRITE to a dead peer: {:?} after {:?} (abandoned: {abandoned})",
                c.result,
                start.elapsed()
            );
            match (provider, abandoned, &c.result) {
                // tcp reports the broken connection at once.
                ("tcp;ofi_rxm", false, Err(Error::RemoteDisconnected { .. })) => {}
                ("tcp;ofi_rxm", _, other) => {
                    panic!("tcp: a WRITE to a dead peer gave {other:?} (abandoned: {abandoned})")
                }
                // shm never completes it: it stays in flight until the
                // deadline abandons it.
                ("shm", true, Err(Error::RemoteDisconnected { .. })) => {}
                ("shm", _, other) => {
                    panic!("shm: a WRITE to a dead peer gave {other:?} (abandoned: {abandoned})")
                }
                _ => {}
            }
            match &c.result {
                Err(Error::RemoteDisconnected { .. })
                | Err(Error::Backend {
                    backend: BACKEND, ..
                }) => {}
                other => panic!("a WRITE to a dead peer gave {other:?}"),
            }
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "failure took {:?}",
                start.elapsed()
            );
        }
    }
    ini.t.deregister(reg);
}

/// Address and key formats: what the suite cannot ask of every transport.
fn formats(provider: &str) {
    let target = Target::spawn(provider, 4096);
    let mut ini = Initiator::new(provider, &target, 4096);
    let peer = ini.peer.take().unwrap();
    let region = target.region;
    // Packed keys have a fixed length.
    match ini.t.unpack_key(&peer, &region, &target.key[..5]) {
        Err(Error::Backend {
            backend: BACKEND,
            text,
            ..
        }) => assert!(text.contains("5 bytes"), "{text}"),
        other => panic!("truncated key gave {other:?}"),
    }
    // Addresses of another provider are refused by name.
    let mut wrong = target.addr.clone();
    let plen = wrong[1] as usize;
    wrong.splice(2..2 + plen, b"xyz".iter().copied());
    wrong[1] = 3;
    match ini.t.connect(&wrong) {
        Err(Error::Backend {
            backend: BACKEND,
            text,
            ..
        }) => assert!(text.contains("xyz"), "{text}"),
        other => panic!("foreign address gave {other:?}"),
    }
    match ini.t.connect(&[9, 9, 9]) {
        Err(Error::Backend {
            backend: BACKEND, ..
        }) => {}
        other => panic!("garbage address gave {other:?}"),
    }
    let mut small = [0u8; 4];
    let mut buf = vec![0u8; 64];
    let reg = ini
        .t
        .register(&Region::dram(buf.as_mut_ptr() as u64, 64))
        .unwrap();
    assert_eq!(
        ini.t.pack_key(&reg, &mut small),
        Err(Error::BufferTooSmall {
            needed: 9,
            available: 4
        })
    );
    let mut address = [0u8; 512];
    ini.t.local_address(&mut address).expect("local address");
    assert_eq!(address[0], 2, "address version");
    ini.t.deregister(reg);
    ini.peer = Some(peer);
    ini.close();
    target.quit();
}

/// The byte an abandoned transfer's local buffer is filled with after its
/// registration is gone.
const SENTINEL: u8 = 0xab;

/// A transfer to a stopped target is abandoned at its deadline, as the
/// engine does; its local region is then deregistered and overwritten
/// with `SENTINEL`; the target resumes. No
/// late READ data may land in the buffer, no late WRITE may carry the
/// sentinel to the target, and later posts to that peer fail at once
/// until it is connected again.
fn no_memory_touched_after_abandon(provider: &str, op: XferOp) {
    // A WRITE larger than the socket buffers keeps data in local memory
    // that the provider would still have to read.
    let len: usize = if op == XferOp::Write {
        32 << 20
    } else {
        1 << 20
    };
    let mut target = Target::spawn(provider, len);
    target.fill(5);
    // The engine's deadline for the transfer to the stopped target.
    const DEADLINE: Duration = Duration::from_millis(1000);
    let mut ini = Initiator::new(provider, &target, len);
    let mut local = local_buf(len, 6);
    let reg = ini
        .t
        .register(&Region::dram(local.as_mut_ptr() as u64, len as u64))
        .unwrap();
    // Connected and in use before the target stops.
    ini.run(XferOp::Write, &reg, &local, &[(0, 0, 64)], 9);
    target.signal(libc::SIGSTOP);
    let st = ini.post(op, &reg, &local, &[(0, 0, len)], None, 1);
    assert_eq!(st, Ok(kvxfer_core::PostStatus::InProgress));
    // Nothing completes while the target is stopped.
    let start = Instant::now();
    while start.elapsed() < DEADLINE {
        if let Some(c) = ini.t.poll() {
            panic!("{provider}: {c:?} completed with the target stopped");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    ini.t.abandon(Token(1)).expect("abandon at the deadline");
    let c = ini.wait(1, Duration::from_secs(1));
    assert!(
        matches!(c[0].result, Err(Error::RemoteDisconnected { .. })),
        "{:?}",
        c[0]
    );
    // The engine deregisters only once the provider has let go of the
    // abandoned operations: wait for that, bounded, as it does.
    let start = Instant::now();
    while ini.t.in_use(&reg) {
        assert!(
            start.elapsed() < Duration::from_secs(4),
            "{provider}: the provider never gave back the abandoned operations"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let start = Instant::now();
    ini.t.deregister(reg);
    let dereg = start.elapsed();
    assert!(
        dereg < Duration::from_millis(500),
        "deregister took {dereg:?} although nothing used the memory"
    );
    local.fill(SENTINEL);
    target.signal(libc::SIGCONT);
    // The target serves what it had queued; keep progressing here too.
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        while ini.t.poll().is_some() {}
        std::thread::sleep(Duration::from_millis(1));
    }
    let changed = local.iter().filter(|&&b| b != SENTINEL).count();
    assert_eq!(
        changed, 0,
        "{provider}: {changed} bytes of the deregistered buffer changed after an abandoned {op:?}"
    );
    if op == XferOp::Write {
        assert_eq!(
            target.words(SENTINEL),
            0,
            "{provider}: a late WRITE read the deregistered buffer"
        );
    }
    // The peer whose transfer was abandoned is given up on: a post fails at
    // once until it is connected again.
    let mut other = local_buf(64, 8);
    let reg = ini
        .t
        .register(&Region::dram(other.as_mut_ptr() as u64, 64))
        .unwrap();
    assert_eq!(
        ini.post(XferOp::Write, &reg, &other, &[(0, 0, 64)], None, 2),
        Err(Error::disconnected(""))
    );
    let old = ini.peer.take().unwrap();
    ini.t.disconnect(old);
    ini.peer = Some(ini.t.connect(&target.addr).expect("reconnect"));
    ini.run(XferOp::Write, &reg, &other, &[(0, 0, 64)], 3);
    assert_eq!(target.sum(0, 64), checksum(&other), "WRITE after reconnect");
    ini.t.deregister(reg);
}

// ------------------------------------------------------------------ tests

macro_rules! formats {
    ($($name:ident => $prov:expr),* $(,)?) => {$(
        mod $name {
            #[test]
            fn address_and_key_formats() {
                super::formats($prov)
            }
        }
    )*};
}

formats! {
    tcp_rxm_formats => "tcp;ofi_rxm",
    shm_formats => "shm",
    sockets_formats => "sockets",
}

#[cfg(libfabric_v2)]
formats! {
    tcp_formats => "tcp",
}

#[test]
fn shm_peer_death_fails_within_deadline() {
    peer_death("shm");
}

#[test]
fn tcp_rxm_no_late_read_data_after_abandon_and_deregister() {
    no_memory_touched_after_abandon("tcp;ofi_rxm", XferOp::Read);
}

#[test]
fn tcp_rxm_no_late_write_from_deregistered_memory() {
    no_memory_touched_after_abandon("tcp;ofi_rxm", XferOp::Write);
}

// libfabric 2.1's native tcp fails both (1,044,418 bytes of a 1 MiB
// buffer changed after an abandoned READ; a late WRITE read the buffer), so
// kvxfer does not pick it by default; see the README.
#[cfg(libfabric_v2)]
#[test]
#[ignore = "libfabric 2.1's native tcp touches memory after an abandon: known limitation"]
fn tcp_no_late_read_data_after_abandon_and_deregister() {
    no_memory_touched_after_abandon("tcp", XferOp::Read);
}

#[cfg(libfabric_v2)]
#[test]
#[ignore = "libfabric 2.1's native tcp touches memory after an abandon: known limitation"]
fn tcp_no_late_write_from_deregistered_memory() {
    no_memory_touched_after_abandon("tcp", XferOp::Write);
}

#[test]
fn unknown_provider_is_named_in_the_error() {
    match FabricTransport::new(&config("no-such-provider")) {
        Err(Error::Backend {
            backend: BACKEND,
            text,
            ..
        }) => {
            assert!(text.contains("no-such-provider"), "{text}");
        }
        other => panic!(
            "unknown provider gave {:?}",
            other.map(|t| t.provider_name().to_owned())
        ),
    }
}

#[test]
fn usable_providers_lists_tcp_and_shm() {
    let list = kvxfer_libfabric::usable_providers();
    assert!(list.iter().any(|p| p == "tcp;ofi_rxm"), "{list:?}");
    assert!(list.iter().any(|p| p == "shm"), "{list:?}");
    // On 2.x the native tcp is listed, last.
    let native = list.iter().position(|p| p == "tcp");
    assert_eq!(native.is_some(), cfg!(libfabric_v2), "{list:?}");
    if let Some(native) = native {
        assert_eq!(native, list.len() - 1, "{list:?}");
    }
}

#[test]
fn default_provider_is_the_first_usable() {
    let t = FabricTransport::new(&FabricConfig::default()).expect("default provider");
    let want = match std::env::var(kvxfer_libfabric::PROVIDER_ENV) {
        Ok(named) => named,
        Err(_) => kvxfer_libfabric::usable_providers().remove(0),
    };
    assert_eq!(t.provider_name(), want);
}
