//! Helpers for kvxfer's multi-process integration tests.
