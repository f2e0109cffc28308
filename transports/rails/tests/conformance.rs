//! The conformance suite of `kvxfer-testkit` over [`Rails`] of two
//! libfabric `tcp;ofi_rxm` endpoints, both on the loopback interface, so
//! that every transfer of 1 MiB and more is striped over two connections
//! and smaller ones are spread; between two processes. The same suite runs
//! over three rails on `lo` with a topology (a map pinning host memory of
//! NUMA node 0 to the second and third rail, every region located there),
//! so that parts go over a preferred subset (which rails carried the bytes
//! is asserted in `tests/tests/reliability_rails.rs`).
#![allow(clippy::result_large_err)]

use std::time::Duration;

use kvxfer_core::rails::{MapEntry, MapKey};
use kvxfer_core::Error;
use kvxfer_core::Region;
use kvxfer_libfabric::{FabricConfig, FabricTransport, BACKEND};
use kvxfer_rails::{MemPlace, Place, Rails, RailsConfig, Topology};
use kvxfer_testkit::{conformance_suite, Backend, Expect, PeerDeath};

/// Two rails on `lo`.
struct TwoRails;

impl Backend for TwoRails {
    type T = Rails<FabricTransport>;

    fn transport(&self) -> Rails<FabricTransport> {
        let rail = || {
            let cfg = FabricConfig::default()
                .with_provider("tcp;ofi_rxm")
                .with_interface("lo");
            (
                "lo".to_string(),
                FabricTransport::new(&cfg).expect("libfabric on lo"),
            )
        };
        Rails::new("conformance", vec![rail(), rail()], RailsConfig::default())
    }

    fn expect(&self) -> Expect {
        expect()
    }
}

fn lo_rail() -> (String, FabricTransport) {
    let cfg = FabricConfig::default()
        .with_provider("tcp;ofi_rxm")
        .with_interface("lo");
    (
        "lo".to_string(),
        FabricTransport::new(&cfg).expect("libfabric on lo"),
    )
}

fn on_node_0(_: &Region) -> MemPlace {
    MemPlace::Host { numa: Some(0) }
}

/// Three rails on `lo`, every region preferring the second and third.
struct PinnedRails;

impl Backend for PinnedRails {
    type T = Rails<FabricTransport>;

    fn transport(&self) -> Rails<FabricTransport> {
        let mut r = Rails::new(
            "conformance",
            vec![lo_rail(), lo_rail(), lo_rail()],
            RailsConfig::default(),
        );
        let map = [1, 2].map(|rail| MapEntry {
            key: MapKey::Numa(0),
            rail,
        });
        r.set_topology(Topology {
            nics: vec![Place::default(); 3],
            map: map.to_vec(),
            sysfs: "/nonexistent".into(),
            locate: on_node_0,
        });
        r
    }

    fn expect(&self) -> Expect {
        expect()
    }
}

fn expect() -> Expect {
    Expect {
        name: BACKEND,
        peer_death: Some(PeerDeath {
            within: Duration::from_secs(5),
            // Both rails fail: the transfer names the rails.
            error: |e| matches!(e, Error::RailsFailed { .. }),
        }),
        empty_metadata: None,
    }
}

conformance_suite!(two_rails_lo, TwoRails);
conformance_suite!(three_rails_lo_pinned, PinnedRails);
