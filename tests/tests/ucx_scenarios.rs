//! TensorRT-LLM's transfer scenarios over UCX, every agent in its own
//! process: once with UCX's default transports (shared memory on one host)
//! and once with `UCX_TLS=tcp`, so the network path is covered too.

use kvxfer_tests::{scenario_suite, scenarios, Fabric};

/// The shared scenarios plus a 100-byte WRITE and two writers into one target.
macro_rules! suite {
    ($modname:ident, $fabric:expr) => {
        scenario_suite!($modname, $fabric, {
            #[test]
            fn basic_write_100_bytes() {
                run(scenarios::basic_write);
            }

            #[test]
            fn connect_two_writers_into_one() {
                run(scenarios::connect_three);
            }
        });
    };
}

suite!(default_tls, Fabric::ucx());
suite!(tcp_only, Fabric::ucx_tcp());
