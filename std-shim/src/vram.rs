//! Which path VRAM takes per backend, and the start-up probe that decides
//! it for libfabric (`FI_HMEM` with CUDA).

/// Bytes of VRAM the libfabric probe registers on GPU 0.
#[cfg(all(feature = "libfabric", feature = "cuda"))]
const PROBE_LEN: u64 = 4096;

/// Decides whether `t` registers VRAM itself: where its provider granted
/// `FI_HMEM`, registers 4 KiB of VRAM on GPU 0 with `FI_HMEM_CUDA`; a
/// refusal (or no GPU) leaves VRAM to staging.
#[cfg(all(feature = "libfabric", feature = "cuda"))]
pub(crate) fn probe_fabric(t: &mut kvxfer_libfabric::FabricTransport) {
    if !t.offers_hmem() {
        return;
    }
    match kvxfer_cuda::DeviceBuffer::new(0, PROBE_LEN) {
        // `buf` is VRAM of GPU 0 that this process allocated; it lives
        // until the end of this arm, after the probe closed its
        // registration.
        Ok(buf) => {
            t.probe_native_vram(buf.ptr(), buf.len(), buf.device());
        }
        Err(e) => log::debug!("LIBFABRIC: no VRAM for the FI_HMEM probe: {e}"),
    }
}

/// Why UCX moves VRAM the way it does.
#[cfg(all(feature = "ucx", feature = "cuda"))]
pub(crate) fn ucx_reason(t: &kvxfer_ucx::UcxTransport) -> String {
    if t.native_vram() {
        "this UCX supports CUDA memory and registers VRAM itself".to_string()
    } else if !t.config().native_vram {
        format!("{}=0", kvxfer_ucx::NATIVE_VRAM_ENV)
    } else if !kvxfer_cuda::driver_present() {
        "no CUDA driver found".to_string()
    } else {
        "this UCX has no CUDA support (built without CUDA, or its cuda module is missing)"
            .to_string()
    }
}

/// Why libfabric moves VRAM the way it does.
#[cfg(all(feature = "libfabric", feature = "cuda"))]
pub(crate) fn fabric_reason(t: &kvxfer_libfabric::FabricTransport) -> String {
    if !t.native_vram() && !kvxfer_cuda::driver_present() {
        "no CUDA driver found".to_string()
    } else {
        t.vram_reason().to_string()
    }
}
