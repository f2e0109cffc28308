//! The operating-system calls of the CUDA-IPC transport: cross-memory
//! attach and the liveness check of a peer process.

use kvxfer_core::XferOp;

/// One `process_vm_writev` (WRITE: local to remote) or `process_vm_readv`
/// (READ: remote to local) of `n` bytes between `local` in this process
/// and `remote` in process `pid`: the bytes moved, or the `errno`.
///
/// `[local, local+n)` must be memory of this process that stays allocated
/// for the call and that no Rust reference reads (READ) or writes
/// meanwhile: the transport passes only ranges inside registrations of a
/// transfer in flight, or its own pinned bounce buffers. The kernel checks
/// the peer's range itself.
pub(crate) fn process_vm(
    op: XferOp,
    pid: u32,
    local: u64,
    remote: u64,
    n: usize,
) -> Result<usize, i32> {
    let liov = libc::iovec {
        iov_base: local as *mut std::ffi::c_void,
        iov_len: n,
    };
    let riov = libc::iovec {
        iov_base: remote as *mut std::ffi::c_void,
        iov_len: n,
    };
    let res = match op {
        // SAFETY: one iovec on each side, valid for the call. The kernel
        // reads `n` bytes of this process at `local` (live, see above) and
        // checks the peer's range itself, failing with EFAULT rather than
        // touching unmapped memory.
        XferOp::Write => unsafe {
            libc::process_vm_writev(pid as libc::pid_t, &liov, 1, &riov, 1, 0)
        },
        // SAFETY: as above; the kernel writes only the `n` bytes at
        // `local`, which no Rust reference reads meanwhile.
        XferOp::Read => unsafe {
            libc::process_vm_readv(pid as libc::pid_t, &liov, 1, &riov, 1, 0)
        },
    };
    if res < 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
    }
    Ok(res as usize)
}

/// Whether process `pid` is known to be gone (`kill(pid, 0)` gives
/// `ESRCH`).
pub(crate) fn process_gone(pid: u32) -> bool {
    // SAFETY: signal 0 sends nothing; it only checks that the process exists.
    let res = unsafe { libc::kill(pid as libc::pid_t, 0) };
    res != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

/// Two anonymous pages, the second unmapped again: a range that runs off
/// mapped memory after 4096 bytes. Unmapped in `Drop`.
#[cfg(test)]
pub(crate) struct HalfMapped(pub(crate) u64);

#[cfg(test)]
impl HalfMapped {
    /// The mapping, its first page filled with `fill`.
    pub(crate) fn new(fill: u8) -> HalfMapped {
        // SAFETY: a fresh private anonymous mapping; nothing else uses it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                8192,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        // SAFETY: the first page is ours; the second is unmapped and never
        // touched again.
        unsafe {
            std::ptr::write_bytes(p.cast::<u8>(), fill, 4096);
            assert_eq!(libc::munmap(p.cast::<u8>().add(4096).cast(), 4096), 0);
        }
        HalfMapped(p as u64)
    }

    /// The first page.
    pub(crate) fn first_page(&self) -> &[u8] {
        // SAFETY: the first page stays mapped until `Drop`.
        unsafe { std::slice::from_raw_parts(self.0 as *const u8, 4096) }
    }
}

#[cfg(test)]
impl Drop for HalfMapped {
    fn drop(&mut self) {
        // SAFETY: unmaps the page mapped in `new`.
        unsafe { libc::munmap(self.0 as *mut std::ffi::c_void, 4096) };
    }
}
