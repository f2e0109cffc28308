//! CUDA IPC, GPU to GPU on one host: [`kvxfer_cuda::CudaIpcTransport`].

use super::Descriptor;

/// CUDA IPC as users see it.
pub(super) const DESCRIPTOR: Descriptor = Descriptor {
    name: "CUDA_IPC",
    c_name: c"CUDA_IPC",
    aliases: &[],
    needs: None,
    settings: &["CUDA_VISIBLE_DEVICES"],
};

#[cfg(feature = "cuda")]
pub(super) use imp::*;

#[cfg(feature = "cuda")]
mod imp {
    use kvxfer_core::Error;

    use crate::backends::AgentTransport;
    use crate::config::AgentConfig;

    /// The transport the agent drives.
    pub(crate) type Transport = kvxfer_cuda::CudaIpcTransport;
    /// CUDA IPC has no settings of its own.
    pub(crate) type Config = ();

    /// No configuration types.
    pub(crate) mod settings {}

    /// The transport of an agent; its copies do not wait on a peer.
    pub(crate) fn build(
        _name: &str,
        _cfg: &AgentConfig,
        _deadline: Option<std::time::Duration>,
    ) -> Result<Transport, Error> {
        kvxfer_cuda::CudaIpcTransport::new()
    }

    /// A CUDA driver must be present.
    pub(crate) fn preflight(_provider: Option<&str>) -> Result<(), String> {
        if kvxfer_cuda::driver_present() {
            return Ok(());
        }
        Err(
            "backend CUDA_IPC: no CUDA driver found (libcuda.so.1); it needs an NVIDIA GPU and \
             its driver"
                .to_string(),
        )
    }

    /// Whether the transport opens.
    pub(crate) fn report() -> String {
        let cfg = AgentConfig::default()
            .with_backend("CUDA_IPC")
            .with_listen(None);
        match crate::Agent::new("kvxfer-info", cfg) {
            Ok(a) => {
                a.shutdown();
                "CUDA_IPC: built in; transport opens\n".to_string()
            }
            Err(e) => format!("CUDA_IPC: built in; transport fails: {e}\n"),
        }
    }

    impl AgentTransport for Transport {
        /// Peers are on this host; copies do not wait on them.
        fn keepalive(&self) -> bool {
            false
        }

        fn vram_path(&self) -> &'static str {
            "cuda-ipc"
        }

        fn vram_reason(&self) -> String {
            "CUDA_IPC maps the peer's VRAM with CUDA IPC handles".to_string()
        }
    }
}
