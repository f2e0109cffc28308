//! The conformance suite of `kvxfer-testkit` over [`Rails`] of two UCX
//! transports (`tcp`), each with its own UCP context restricted to the
//! loopback interface (`UcxConfig::net_devices`), so that every transfer
//! of 1 MiB and more is striped over two UCX endpoints and smaller ones
//! are spread; between two processes.
#![allow(clippy::result_large_err)]

use std::time::Duration;

use kvxfer_core::Error;
use kvxfer_rails::{Rails, RailsConfig};
use kvxfer_testkit::{conformance_suite, Backend, Expect, PeerDeath};
use kvxfer_ucx::{UcxConfig, UcxTransport, BACKEND};

/// Two UCX rails on `lo`.
struct TwoUcxRails;

impl Backend for TwoUcxRails {
    type T = Rails<UcxTransport>;

    fn transport(&self) -> Rails<UcxTransport> {
        let rail = || {
            let mut cfg = UcxConfig::default().with_net_devices("lo");
            cfg.tls = Some("tcp".to_string());
            (
                "lo".to_string(),
                UcxTransport::new(&cfg).expect("UCX tcp on lo"),
            )
        };
        Rails::new(
            "conformance-ucx",
            vec![rail(), rail()],
            RailsConfig::default(),
        )
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

conformance_suite!(two_ucx_rails_lo, TwoUcxRails);
