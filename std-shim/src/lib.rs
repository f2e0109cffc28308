//! kvxfer: move KV-cache blocks between inference-engine processes over UCX, libfabric or CUDA IPC.
