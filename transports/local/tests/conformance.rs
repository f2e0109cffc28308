//! The conformance suite over `Local<T>`: the target is a process of this
//! host, so data moves by cross-memory attach and notifications through
//! the inner transport (UCX, or libfabric over `tcp;ofi_rxm`).

#![allow(clippy::result_large_err)]

use std::time::Duration;

use kvxfer_core::Error;
use kvxfer_libfabric::{FabricConfig, FabricTransport};
use kvxfer_local::{Local, LocalConfig};
use kvxfer_testkit::{conformance_suite, Backend, Expect, PeerDeath};
use kvxfer_ucx::{UcxConfig, UcxTransport};

/// `Local` over UCX.
struct OverUcx;

/// `Local` over libfabric `tcp;ofi_rxm`.
struct OverFabric;

/// A dead peer is seen through its pidfd: `RemoteDisconnected`, soon.
fn peer_death() -> Option<PeerDeath> {
    Some(PeerDeath {
        within: Duration::from_secs(2),
        error: |e| matches!(e, Error::RemoteDisconnected { .. }),
    })
}

impl Backend for OverUcx {
    type T = Local<UcxTransport>;

    fn transport(&self) -> Self::T {
        let inner = UcxTransport::new(&UcxConfig::default()).expect("UCX transport");
        Local::new(inner, LocalConfig::default())
    }

    fn expect(&self) -> Expect {
        Expect {
            name: "UCX",
            peer_death: peer_death(),
            empty_metadata: None,
        }
    }
}

impl Backend for OverFabric {
    type T = Local<FabricTransport>;

    fn transport(&self) -> Self::T {
        let config = FabricConfig::default().with_provider("tcp;ofi_rxm");
        let inner = FabricTransport::new(&config).expect("libfabric transport");
        Local::new(inner, LocalConfig::default())
    }

    fn expect(&self) -> Expect {
        Expect {
            name: kvxfer_libfabric::BACKEND,
            peer_death: peer_death(),
            empty_metadata: None,
        }
    }
}

conformance_suite!(over_ucx, OverUcx);
conformance_suite!(over_libfabric, OverFabric);
