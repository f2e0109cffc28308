//! libfabric transport for kvxfer: FI_EP_RDM endpoints with RMA.
