//! CUDA memory for kvxfer: VRAM registration, staging through pinned host
//! memory, and a CUDA-IPC transport.
//!
//! * [`driver`]: loads `libcuda` at run time (no GPU or no driver gives the
//!   error "no CUDA driver found", never a panic), device count and
//!   [`DeviceInfo`], primary [`Context`]s, and [`pointer_info`]: the memory
//!   kind and GPU of any pointer.
//! * [`memory`]: [`DeviceBuffer`] (VRAM) and [`PinnedBuffer`] (page-locked
//!   host memory), both freed in `Drop`.
//! * [`ipc`]: [`CudaIpcTransport`], the `CUDA_IPC` backend: VRAM and DRAM
//!   between processes on one host — CUDA IPC handles and asynchronous
//!   copies with CUDA events for VRAM, cross-memory attach for a peer's
//!   DRAM; notifications over a per-host Unix datagram socket, delivered
//!   after the data.
//! * [`staged`]: [`Staged`], VRAM (local or the peer's) for transports
//!   without GPU support (UCX, libfabric) through pipelined copies into
//!   pinned, registered bounce buffers.
//! * [`staging_wire`]: the requests and answers with which two `Staged`
//!   move data into and out of each other's VRAM.
//! * [`wire`]: the byte layouts of the transport address and packed keys.
//! * [`notify`]: the notification channel.
#![deny(missing_docs)]
// Every function returns kvxfer-core's `Error`, the type the `Transport`
// contract uses; it is large by design (bounded texts, no allocation).
#![allow(clippy::result_large_err)]
// `unsafe` only in the modules that call the driver or the OS.
#![deny(unsafe_code)]

#[allow(unsafe_code)]
pub mod driver;
pub mod ipc;
#[allow(unsafe_code)]
pub mod memory;
pub mod notify;
#[allow(unsafe_code)]
mod os;
pub mod staged;
pub mod staging_wire;
#[allow(unsafe_code)]
mod stream;
pub mod wire;

pub use driver::{
    device_count, device_info, devices, driver_present, driver_version, pointer_info, Context,
    DeviceInfo, PointerInfo, BACKEND, NO_DRIVER,
};
pub use ipc::{CudaIpcTransport, IpcPeer, IpcReg, IpcRemoteKey, PEER_ACCESS_ENV};
pub use memory::{DeviceBuffer, PinnedBuffer};
pub use staged::{Staged, StagedKey, StagedReg, StagingConfig};
