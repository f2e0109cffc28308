//! wire (to be implemented).
