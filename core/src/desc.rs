//! desc (to be implemented).
