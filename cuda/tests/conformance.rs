//! The conformance suite over CUDA_IPC, GPU memory on both sides and host
//! memory on both sides. Every test needs a GPU, so each is ignored by
//! default (never counted as passed without one); on a GPU machine:
//!
//! ```text
//! cargo test -p kvxfer-cuda --test conformance -- --ignored --test-threads=1
//! ```

#![allow(clippy::result_large_err)]

use std::time::Duration;

use kvxfer_core::{Error, MetaError, Region};
use kvxfer_cuda::wire::IpcAddress;
use kvxfer_cuda::{CudaIpcTransport, DeviceBuffer};
use kvxfer_testkit::{
    conformance_suite, Backend, EmptyMetadata, Expect, HostMemory, Memory, PeerDeath,
};

/// GPU memory of device 0, zeroed.
struct Vram(DeviceBuffer);

impl Memory for Vram {
    fn region(&self) -> Region {
        self.0.region()
    }
    fn write(&mut self, off: usize, data: &[u8]) {
        self.0
            .copy_from_host(off as u64, data)
            .expect("copy to the GPU");
    }
    fn read(&self, off: usize, len: usize) -> Vec<u8> {
        let all = self.0.to_vec().expect("copy from the GPU");
        all[off..off + len].to_vec()
    }
    fn to_vec(&self) -> Vec<u8> {
        self.0.to_vec().expect("copy from the GPU")
    }
}

/// Prints the transport's warnings (e.g. an IPC mapping of a dead peer
/// that would not close) to stderr, where a test's output shows them.
struct Warnings;

impl log::Log for Warnings {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::Level::Warn
    }
    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            eprintln!("[{} {}] {}", r.level(), r.target(), r.args());
        }
    }
    fn flush(&self) {}
}

/// CUDA_IPC moving GPU memory (`true`) or host memory.
struct CudaIpc {
    vram: bool,
}

impl Backend for CudaIpc {
    type T = CudaIpcTransport;

    fn transport(&self) -> CudaIpcTransport {
        if log::set_logger(&Warnings).is_ok() {
            log::set_max_level(log::LevelFilter::Warn);
        }
        CudaIpcTransport::new().expect("CUDA_IPC transport (needs a GPU)")
    }

    fn expect(&self) -> Expect {
        Expect {
            name: "CUDA_IPC",
            // The peer's process is watched: gone means RemoteDisconnected.
            peer_death: Some(PeerDeath {
                within: Duration::from_secs(5),
                error: |e| matches!(e, Error::RemoteDisconnected { .. }),
            }),
            // CUDA_IPC reads its own addresses and keys: an empty one is
            // short by exactly its length (a key by its tag byte).
            empty_metadata: Some(EmptyMetadata {
                address: Error::BadMetadata(MetaError::Truncated {
                    needed: IpcAddress::LEN as u64,
                    available: 0,
                }),
                key: Error::BadMetadata(MetaError::Truncated {
                    needed: 1,
                    available: 0,
                }),
            }),
        }
    }

    fn memory(&self, len: usize) -> Box<dyn Memory> {
        if !self.vram {
            return Box::new(HostMemory::zeroed(len));
        }
        let mut b = DeviceBuffer::new(0, len as u64).expect("GPU memory");
        b.fill(0).expect("zero GPU memory");
        Box::new(Vram(b))
    }

    fn in_flight(&self, t: &CudaIpcTransport) -> Option<usize> {
        Some(t.in_flight())
    }
}

conformance_suite!(vram, CudaIpc { vram: true }, #[ignore = "needs a GPU"]);
conformance_suite!(dram, CudaIpc { vram: false }, #[ignore = "needs a GPU"]);
