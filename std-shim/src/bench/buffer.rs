//! The registered buffers a benchmark moves: host memory or VRAM.

use super::*;

/// Where a bench buffer lives.
enum Storage {
    Host(Vec<u8>),
    #[cfg(feature = "cuda")]
    Device(kvxfer_cuda::DeviceBuffer),
}

/// A registered buffer (host memory, or VRAM with the `cuda` feature),
/// deregistered before it is freed.
pub(super) struct Buffer {
    agent: Agent,
    storage: Storage,
    addr: u64,
    pub(super) len: usize,
}

impl Buffer {
    pub(super) fn new(
        agent: &Agent,
        len: usize,
        seed: Option<u64>,
        mem: MemKind,
        dev: u32,
    ) -> Result<Buffer, Error> {
        let mut host = vec![0u8; len];
        if let Some(s) = seed {
            fill_random(&mut host, s);
        }
        let storage = match mem {
            MemKind::Dram => Storage::Host(host),
            #[cfg(feature = "cuda")]
            MemKind::Vram => Storage::Device(kvxfer_cuda::DeviceBuffer::from_host(dev, &host)?),
            #[cfg(not(feature = "cuda"))]
            MemKind::Vram => return Err(bench_err(VRAM_NEEDS_CUDA)),
        };
        let addr = match &storage {
            Storage::Host(v) => v.as_ptr() as u64,
            #[cfg(feature = "cuda")]
            Storage::Device(d) => d.ptr(),
        };
        // SAFETY: the memory lives in this struct and is deregistered in
        // `Drop` before it is freed; it never moves (a heap block or a
        // device allocation). Its bytes are read only through `checksum`,
        // after the transfers that write it are done.
        unsafe { agent.register(addr, len as u64, dev, mem)? };
        Ok(Buffer {
            agent: agent.clone(),
            storage,
            addr,
            len,
        })
    }

    pub(super) fn addr(&self) -> u64 {
        self.addr
    }

    /// Fills the whole buffer with new bytes from `seed` (see
    /// [`fill_random`]). Only called while no transfer uses it.
    pub(super) fn refill(&mut self, seed: u64) -> Result<(), Error> {
        match &mut self.storage {
            Storage::Host(v) => fill_random(v, seed),
            #[cfg(feature = "cuda")]
            Storage::Device(d) => {
                let mut host = vec![0u8; self.len];
                fill_random(&mut host, seed);
                d.copy_from_host(0, &host)?;
            }
        }
        Ok(())
    }

    /// Checksum of the blocks of `block` bytes every `stride` bytes in
    /// the first `n` bytes, hashed as one byte string (`None` if the
    /// buffer is shorter or the layout is not one).
    pub(super) fn checksum(
        &self,
        n: usize,
        block: usize,
        stride: usize,
    ) -> Result<Option<u64>, Error> {
        if n > self.len || block == 0 || stride < block {
            return Ok(None);
        }
        let sum = |data: &[u8]| {
            let mut h = checksum(b"");
            let mut at = 0;
            while at < n {
                h = fnv_update(h, &data[at..(at + block).min(n)]);
                at += stride;
            }
            h
        };
        match &self.storage {
            Storage::Host(v) => Ok(Some(sum(&v[..n]))),
            #[cfg(feature = "cuda")]
            Storage::Device(d) => {
                let mut host = vec![0u8; n];
                d.copy_to_host(0, &mut host)?;
                Ok(Some(sum(&host)))
            }
        }
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        match self.agent.deregister(self.addr) {
            Ok(_) | Err(Error::ShutDown) => {}
            // Never free memory a peer could still write into.
            Err(e) => {
                log::error!("deregistering the bench buffer failed ({e}); leaking it");
                let storage = std::mem::replace(&mut self.storage, Storage::Host(Vec::new()));
                std::mem::forget(storage);
            }
        }
    }
}
