//! Plumbing shared by the tests that re-run their own binary as a child
//! process: a guard that reaps the child, and hex for passing bytes over
//! the child's stdout.

use std::process::Child;

/// Kills the child unless it has exited.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

// Not every test that includes this module uses it.
#[allow(unused_imports)]
pub use kvxfer_testkit::hex;

/// Bytes of hex text (panics on anything else).
pub fn unhex(s: &str) -> Vec<u8> {
    kvxfer_testkit::unhex(s).expect("hex")
}
