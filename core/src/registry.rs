//! registry (to be implemented).
