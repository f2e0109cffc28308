//! kvxfer's conformance suite for every [`Transport`],
//! and the helpers the repository's tests share.
//!
//! One suite, many backends, as rustls runs one API suite per crypto
//! provider: a transport crate describes itself with a [`Backend`] and
//! instantiates the suite in one line of an integration test,
//!
//! ```text
//! kvxfer_testkit::conformance_suite!(tcp, Ucx::tls("tcp"));
//! ```
//!
//! which adds a module `tcp` of tests: WRITE/READ of 100 bytes, scattered
//! blocks, 64 MiB, notifications after the data, many transfers in flight,
//! cancel, bad inputs with their exact errors and, unless left out with
//! `no_peer_death`, a peer killed mid-stream. Every test runs between two
//! processes: this test binary spawns itself as the target ([`target`]).
//! Attributes after the backend (`#[ignore = "needs a GPU"]`) go on every
//! test of the module.
#![deny(missing_docs)]
#![allow(clippy::result_large_err)]

mod data;
pub mod initiator;
pub mod memory;
pub mod scenarios;
pub mod target;

use std::time::Duration;

use kvxfer_core::{Error, Transport};

pub use data::{
    assert_same, check_pattern, checksum, fill, fill_pattern, first_diff, hex, pattern,
    pattern_byte, splitmix64, unhex,
};
pub use initiator::Initiator;
pub use memory::{HostMemory, Memory};
pub use target::Target;

/// A transport under test: how to build it and what it promises.
pub trait Backend {
    /// The transport.
    type T: Transport;

    /// A new transport (each process of a test calls it once).
    fn transport(&self) -> Self::T;

    /// What the suite expects of this transport.
    fn expect(&self) -> Expect;

    /// `len` zeroed bytes of the memory this backend moves (host memory
    /// by default).
    fn memory(&self, len: usize) -> Box<dyn Memory> {
        Box::new(HostMemory::zeroed(len))
    }

    /// Answers a backend-specific command `args` sent to the target
    /// process (see [`target`]); `None` for an unknown one.
    fn command(&self, t: &mut Self::T, args: &[&str]) -> Option<String> {
        let _ = (t, args);
        None
    }

    /// How many transfers the transport tracks as in flight, where it
    /// says.
    fn in_flight(&self, t: &Self::T) -> Option<usize> {
        let _ = t;
        None
    }
}

/// What the suite expects of a [`Backend`].
#[derive(Clone, Debug)]
pub struct Expect {
    /// [`Transport::name`].
    pub name: &'static str,
    /// How a dead peer shows; `None` where it is not detected (the suite
    /// is then instantiated with `no_peer_death`).
    pub peer_death: Option<PeerDeath>,
    /// The exact errors for an empty address and an empty key, where the
    /// transport reads them itself; `None` where the library under it
    /// refuses them, with an [`Error::Backend`] naming [`name`](Self::name).
    pub empty_metadata: Option<EmptyMetadata>,
}

/// The exact errors a transport gives for empty metadata.
#[derive(Clone, Debug)]
pub struct EmptyMetadata {
    /// Of [`Transport::connect`] to an empty address.
    pub address: Error,
    /// Of [`Transport::unpack_key`] of an empty key.
    pub key: Error,
}

/// How a transport reports a peer killed mid-stream.
#[derive(Clone, Debug)]
pub struct PeerDeath {
    /// Every transfer in flight at the kill ends within this long, and a
    /// post after it fails within this long.
    pub within: Duration,
    /// Whether a transfer's failure after the kill is one this transport
    /// may report.
    pub error: fn(&Error) -> bool,
}

/// One module of conformance tests for a [`Backend`]: see the crate docs.
#[macro_export]
macro_rules! conformance_suite {
    ($module:ident, $backend:expr, no_peer_death $(, #[$attr:meta])* $(,)?) => {
        $crate::conformance_suite!(@module $module, $backend, [$(#[$attr])*], []);
    };
    ($module:ident, $backend:expr $(, #[$attr:meta])* $(,)?) => {
        $crate::conformance_suite!(@module $module, $backend, [$(#[$attr])*], [peer_death]);
    };
    (@module $module:ident, $backend:expr, $attrs:tt, [$($extra:ident)*]) => {
        mod $module {
            #[allow(unused_imports)]
            use super::*;

            fn backend() -> impl $crate::Backend {
                $backend
            }

            #[test]
            #[ignore = "target process of the conformance suite; its tests spawn it"]
            fn target_process() {
                $crate::target::serve_if_spawned(&backend());
            }

            $crate::conformance_suite!(@test $attrs, write_read_100_bytes);
            $crate::conformance_suite!(@test $attrs, scattered_128_x_16_kib);
            $crate::conformance_suite!(@test $attrs, large_64_mib);
            $crate::conformance_suite!(@test $attrs, notifications_after_the_data);
            $crate::conformance_suite!(@test $attrs, many_in_flight);
            $crate::conformance_suite!(@test $attrs, cancel);
            $crate::conformance_suite!(@test $attrs, bad_inputs_exact_errors);
            $($crate::conformance_suite!(@test $attrs, $extra);)*
        }
    };
    (@test [$(#[$attr:meta])*], $name:ident) => {
        #[test]
        $(#[$attr])*
        fn $name() {
            $crate::scenarios::$name(&backend(), module_path!());
        }
    };
}
