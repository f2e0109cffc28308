//! Memory the suite moves: host memory, or a backend's own (GPU memory).

use kvxfer_core::Region;

/// A buffer a transport registers: its region, and its bytes read and
/// written from the host.
pub trait Memory {
    /// The whole buffer as a region of its kind.
    fn region(&self) -> Region;
    /// Writes `data` at offset `off`.
    fn write(&mut self, off: usize, data: &[u8]);
    /// Reads `len` bytes at offset `off`.
    fn read(&self, off: usize, len: usize) -> Vec<u8>;

    /// First address.
    fn addr(&self) -> u64 {
        self.region().addr
    }
    /// Length in bytes.
    fn len(&self) -> usize {
        self.region().len as usize
    }
    /// Whether it is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// A copy of all of it.
    fn to_vec(&self) -> Vec<u8> {
        self.read(0, self.len())
    }
    /// Fills all of it with the pattern of `seed`.
    fn fill(&mut self, seed: u64) {
        self.write(0, &crate::pattern(seed, self.len()));
    }
}

/// Host memory.
pub struct HostMemory(Vec<u8>);

impl HostMemory {
    /// `len` zero bytes.
    pub fn zeroed(len: usize) -> Self {
        HostMemory(vec![0; len])
    }
}

impl Memory for HostMemory {
    fn region(&self) -> Region {
        Region::dram(self.0.as_ptr() as u64, self.0.len() as u64)
    }
    fn write(&mut self, off: usize, data: &[u8]) {
        self.0[off..off + data.len()].copy_from_slice(data);
    }
    fn read(&self, off: usize, len: usize) -> Vec<u8> {
        self.0[off..off + len].to_vec()
    }
    fn fill(&mut self, seed: u64) {
        crate::fill(&mut self.0, seed);
    }
}
