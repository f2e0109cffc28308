//! The system calls: `pidfd_open`, `poll` on a pidfd, and cross-memory
//! attach (`process_vm_writev` / `process_vm_readv`).
#![allow(unsafe_code)]

use std::mem::MaybeUninit;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// Most iovecs one cross-memory-attach call takes (the kernel's `IOV_MAX`).
pub const IOV_MAX: usize = 1024;

/// A pidfd for process `pid`, or the errno.
pub fn pidfd_open(pid: u32) -> Result<OwnedFd, i32> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new file
    // descriptor or -1; no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: `fd` is a new descriptor this process owns from here on.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Whether the process behind `pidfd` has exited (the pidfd is readable).
pub fn exited(pidfd: RawFd) -> bool {
    let mut p = libc::pollfd {
        fd: pidfd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd, valid for the call; a zero timeout never blocks.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & (libc::POLLIN | libc::POLLHUP) != 0
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// One cross-memory-attach call: moves the pieces `(local, remote, len)`
/// between this process and process `pid` (`write`: local to remote).
/// Returns the bytes moved (possibly fewer than asked), or the errno.
///
/// The caller guarantees that every local range lies in memory of this
/// process that stays mapped and that no Rust reference reads or writes
/// during the call; the kernel checks the remote ranges itself and fails
/// with `EFAULT` instead of touching unmapped memory.
pub fn cma(write: bool, pid: u32, pieces: &[(u64, u64, u64)]) -> Result<usize, i32> {
    // Only the first `n` entries are written and passed: zeroing two
    // 1,024-entry arrays per call cost more than a 4 KiB copy.
    let mut local = [const { MaybeUninit::<libc::iovec>::uninit() }; IOV_MAX];
    let mut remote = [const { MaybeUninit::<libc::iovec>::uninit() }; IOV_MAX];
    let n = pieces.len().min(IOV_MAX);
    for (k, &(l, r, len)) in pieces.iter().take(n).enumerate() {
        local[k].write(libc::iovec {
            iov_base: l as usize as *mut libc::c_void,
            iov_len: len as usize,
        });
        remote[k].write(libc::iovec {
            iov_base: r as usize as *mut libc::c_void,
            iov_len: len as usize,
        });
    }
    // The kernel reads the first `n` entries of each, written above.
    let (l, r) = (
        local.as_ptr().cast::<libc::iovec>(),
        remote.as_ptr().cast::<libc::iovec>(),
    );
    let res = if write {
        // SAFETY: `n` valid iovecs on each side; the local ranges are the
        // caller's registered memory (see above), read by the kernel.
        unsafe { libc::process_vm_writev(pid as libc::pid_t, l, n as _, r, n as _, 0) }
    } else {
        // SAFETY: as above; the kernel writes the local ranges, memory no
        // Rust reference touches during the call.
        unsafe { libc::process_vm_readv(pid as libc::pid_t, l, n as _, r, n as _, 0) }
    };
    if res < 0 {
        Err(errno())
    } else {
        Ok(res as usize)
    }
}
