//! TensorRT-LLM's transfer scenarios over UCX, every agent in its own
//! process: once with UCX's default transports (shared memory on one host)
//! and once with `UCX_TLS=tcp`, so the network path is covered too.

use kvxfer_tests::scenarios;
use kvxfer_tests::{random_seed, Fabric};

macro_rules! suite {
    ($modname:ident, $fabric:expr) => {
        mod $modname {
            use super::*;

            fn run(f: fn(&Fabric, u64)) {
                let seed = random_seed();
                eprintln!("fabric {:?}, seed {seed}", $fabric.label);
                f(&$fabric, seed);
            }

            #[test]
            fn basic_write_100_bytes() {
                run(scenarios::basic_write);
            }

            #[test]
            fn basic2_read() {
                run(scenarios::basic_read);
            }

            #[test]
            fn connect_two_writers_into_one() {
                run(scenarios::connect_three);
            }

            #[test]
            fn sync_message() {
                run(scenarios::sync_message);
            }

            #[test]
            fn kv_shaped_128_scattered_blocks() {
                run(scenarios::kv_shaped);
            }

            #[test]
            fn large_64_mib() {
                run(scenarios::large);
            }

            #[test]
            fn many_in_flight() {
                run(scenarios::many_in_flight);
            }
        }
    };
}

suite!(default_tls, Fabric::ucx());
suite!(tcp_only, Fabric::ucx_tcp());
