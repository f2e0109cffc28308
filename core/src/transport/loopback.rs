//! Loopback transport (to be implemented).
