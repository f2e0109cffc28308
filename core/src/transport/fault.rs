//! Fault injector (to be implemented).
