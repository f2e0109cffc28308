//! UCX transport for kvxfer: one-sided RMA READ/WRITE over libucp.
