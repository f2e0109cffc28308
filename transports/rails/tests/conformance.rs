//! The conformance suite of `kvxfer-testkit` over [`Rails`] of two
//! libfabric `tcp;ofi_rxm` endpoints, both on the loopback interface, so
//! that every transfer of 1 MiB and more is striped over two connections
//! and smaller ones are spread; between two processes.
#![allow(clippy::result_large_err)]

use std::time::Duration;

use kvxfer_core::Error;
use kvxfer_libfabric::{FabricConfig, FabricTransport, BACKEND};
use kvxfer_rails::{Rails, RailsConfig};
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
}

conformance_suite!(two_rails_lo, TwoRails);
