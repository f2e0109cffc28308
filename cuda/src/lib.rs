//! CUDA memory for kvxfer: VRAM registration, staging through pinned host memory, and a CUDA-IPC transport.
