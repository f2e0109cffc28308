//! Unit tests of cross-memory attach and the copy pool.

use super::cma::*;
use super::pool::*;
use super::*;
use crate::os::HalfMapped;

fn me() -> u32 {
    std::process::id()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn cma_moves_bytes_both_ways() {
    let src = pattern((1 << 20) + 13, 5);
    let mut dst = vec![0u8; src.len()];
    let (s, d) = (src.as_ptr() as u64, dst.as_mut_ptr() as u64);
    cma_copy(XferOp::Write, me(), s, d, src.len() as u64).unwrap();
    assert!(dst == src, "WRITE over cross-memory attach differs");
    let mut back = vec![0u8; 1000];
    cma_copy(XferOp::Read, me(), back.as_mut_ptr() as u64, s + 77, 1000).unwrap();
    assert_eq!(&back[..], &src[77..1077]);
}

#[test]
fn cma_short_count_is_continued_then_reported_at_the_address() {
    // READ: the remote range ends after one page. The first call moves
    // 4096 bytes, the continuation fails at the unmapped page.
    let remote = HalfMapped::new(0x5A);
    let mut local = vec![0u8; 8192];
    let l = local.as_mut_ptr() as u64;
    let e = cma_copy(XferOp::Read, me(), l, remote.0, 8192).unwrap_err();
    assert_eq!(
        e,
        Error::backend(
            BACKEND,
            libc::EFAULT as i64,
            &format!(
                "process_vm_readv pid {}: EFAULT at remote {:#x}, local {:#x}",
                me(),
                remote.0 + 4096,
                l + 4096
            )
        )
    );
    assert!(
        local[..4096].iter().all(|&b| b == 0x5A),
        "first page not moved"
    );
    assert!(
        local[4096..].iter().all(|&b| b == 0),
        "bytes past the fault"
    );
    // WRITE into the same range: the first page is written, then EFAULT.
    let src = pattern(8192, 9);
    let e = cma_copy(XferOp::Write, me(), src.as_ptr() as u64, remote.0, 8192).unwrap_err();
    assert_eq!(
        e,
        Error::backend(
            BACKEND,
            libc::EFAULT as i64,
            &format!(
                "process_vm_writev pid {}: EFAULT at remote {:#x}, local {:#x}",
                me(),
                remote.0 + 4096,
                src.as_ptr() as u64 + 4096
            )
        )
    );
    assert_eq!(remote.first_page(), &src[..4096]);
}

#[test]
fn cma_to_a_gone_process_names_its_pid() {
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    let buf = [1u8; 64];
    for op in [XferOp::Write, XferOp::Read] {
        let p = buf.as_ptr() as u64;
        assert_eq!(
            cma_copy(op, pid, p, p, 64),
            Err(Error::disconnected(&format!(
                "CUDA_IPC peer pid {pid} is gone"
            )))
        );
    }
}

#[test]
fn cma_errors_name_the_call_the_pid_and_the_cause() {
    let e = cma_error(XferOp::Write, 4194304, libc::EPERM, 0x10, 0x20, 0, 100);
    assert_eq!(
        e,
        Error::backend(
            BACKEND,
            1,
            "process_vm_writev: cross-memory attach to pid 4194304 refused (ptrace/Yama/seccomp)"
        )
    );
    // The whole text fits the bounded error text.
    match &e {
        Error::Backend { text, .. } => assert!(text.ends_with("(ptrace/Yama/seccomp)")),
        _ => unreachable!(),
    }
    assert_eq!(
        cma_error(XferOp::Read, 77, libc::EPERM, 0, 0, 0, 1),
        Error::backend(
            BACKEND,
            1,
            "process_vm_readv: cross-memory attach to pid 77 refused (ptrace/Yama/seccomp)"
        )
    );
    assert_eq!(
        cma_error(XferOp::Read, 77, libc::ESRCH, 0, 0, 0, 1),
        Error::disconnected("CUDA_IPC peer pid 77 is gone")
    );
    assert_eq!(
        cma_error(XferOp::Read, 77, libc::ENOMEM, 0, 0, 4096, 8192),
        Error::backend(
            BACKEND,
            libc::ENOMEM as i64,
            &format!(
                "process_vm_readv pid 77, 4096 of 8192 bytes moved: {}",
                std::io::Error::from_raw_os_error(libc::ENOMEM)
            )
        )
    );
}

/// Polls `parts` until every part finished, at most 30 s.
fn wait_parts(parts: &CmaParts) {
    let start = std::time::Instant::now();
    while !parts.done() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(30),
            "parts did not finish"
        );
        std::thread::sleep(std::time::Duration::from_micros(100));
    }
}

#[test]
fn cma_workers_move_split_and_grouped_pieces() {
    let long = (5 * CMA_PART + 13) as usize;
    let src = pattern(long + 3000, 3);
    let mut dst = vec![0u8; long + 3000 + 3 * 7];
    let (s, d) = (src.as_ptr() as u64, dst.as_mut_ptr() as u64);
    let mut pieces = Vec::new();
    // One long range (split in pieces of CMA_PART), then three short
    // ones, each 7 bytes further on in the target.
    split_into(&mut pieces, me(), s, d, long as u64, None);
    for k in 0..3u64 {
        let at = long as u64 + k * 1000;
        split_into(&mut pieces, me(), s + at, d + at + 7 * (k + 1), 1000, None);
    }
    assert_eq!(pieces.len(), 9);
    let (parts, work) = into_parts(XferOp::Write, pieces);
    // Five full parts; the 13-byte tail shares the sixth with the short ones.
    let sizes: Vec<(usize, u64)> = work
        .iter()
        .map(|p| (p.pieces.len(), p.pieces.iter().map(|x| x.len).sum()))
        .collect();
    assert_eq!(
        sizes,
        [
            (1, CMA_PART),
            (1, CMA_PART),
            (1, CMA_PART),
            (1, CMA_PART),
            (1, CMA_PART),
            (4, 3013)
        ]
    );
    assert!(!parts.done());
    let pool = CmaPool::new().unwrap();
    assert_eq!(pool.threads.len(), CMA_WORKERS);
    pool.submit(work);
    wait_parts(&parts);
    assert_eq!(parts.take_error(), None);
    let mut expected = src[..long].to_vec();
    for k in 0..3 {
        expected.extend_from_slice(&[0u8; 7]);
        expected.extend_from_slice(&src[long + k * 1000..long + (k + 1) * 1000]);
    }
    assert!(dst == expected, "target differs after the workers' WRITE");
    // READ back through the same pool into a fresh buffer.
    let mut back = vec![0u8; long];
    let mut pieces = Vec::new();
    split_into(
        &mut pieces,
        me(),
        back.as_mut_ptr() as u64,
        d,
        long as u64,
        None,
    );
    let (parts, work) = into_parts(XferOp::Read, pieces);
    pool.submit(work);
    wait_parts(&parts);
    assert_eq!(parts.take_error(), None);
    assert!(back[..] == src[..long], "READ through the workers differs");
}

#[test]
fn cma_workers_report_the_error_only_after_every_part_finished() {
    let remote = HalfMapped::new(0);
    let src = pattern(4 * CMA_PART as usize, 7);
    let mut good = vec![0u8; 3 * CMA_PART as usize];
    let mut after_fault = vec![0u8; 1000];
    let s = src.as_ptr() as u64;
    let mut pieces = Vec::new();
    // Three parts of good target memory, queued first ...
    split_into(
        &mut pieces,
        me(),
        s,
        good.as_mut_ptr() as u64,
        good.len() as u64,
        None,
    );
    // ... then one part whose first piece runs off the mapped page and
    // whose second piece must then not be moved.
    let faulty = s + good.len() as u64;
    split_into(&mut pieces, me(), faulty, remote.0, 8192, None);
    split_into(
        &mut pieces,
        me(),
        faulty + 8192,
        after_fault.as_mut_ptr() as u64,
        1000,
        None,
    );
    let (parts, work) = into_parts(XferOp::Write, pieces);
    assert_eq!(work.len(), 4);
    let pool = CmaPool::new().unwrap();
    pool.submit(work);
    wait_parts(&parts);
    assert_eq!(
        parts.take_error(),
        Some(Error::backend(
            BACKEND,
            libc::EFAULT as i64,
            &format!(
                "process_vm_writev pid {}: EFAULT at remote {:#x}, local {:#x}",
                me(),
                remote.0 + 4096,
                faulty + 4096
            )
        ))
    );
    // Every part queued before the failing one had started, so all of
    // them landed before the failure could be reported.
    assert!(good[..] == src[..good.len()], "earlier parts incomplete");
    assert_eq!(remote.first_page(), &src[good.len()..good.len() + 4096]);
    assert!(
        after_fault.iter().all(|&b| b == 0),
        "piece after the fault moved"
    );
    // A transfer that already failed skips the parts it has not started.
    let failed = Arc::new(CmaParts::new(1));
    failed.fail(Error::disconnected("first"));
    failed.fail(Error::disconnected("second"));
    pool.submit(vec![Part {
        op: XferOp::Write,
        pieces: vec![Piece {
            pid: me(),
            local: s,
            remote: after_fault.as_mut_ptr() as u64,
            len: 1000,
            vram: None,
        }],
        parts: failed.clone(),
    }]);
    wait_parts(&failed);
    assert_eq!(failed.take_error(), Some(Error::disconnected("first")));
    assert!(after_fault.iter().all(|&b| b == 0), "skipped part moved");
}

#[test]
fn cma_workers_are_joined_on_drop_and_touch_nothing_afterwards() {
    let len = 16 * CMA_PART as usize;
    let src = pattern(len, 11);
    let mut dst = vec![0u8; len];
    let mut pieces = Vec::new();
    split_into(
        &mut pieces,
        me(),
        src.as_ptr() as u64,
        dst.as_mut_ptr() as u64,
        len as u64,
        None,
    );
    let (parts, work) = into_parts(XferOp::Write, pieces);
    let pool = CmaPool::new().unwrap();
    pool.submit(work);
    drop(pool);
    // The workers are gone: the target no longer changes.
    let snapshot = dst.clone();
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert!(dst == snapshot, "target written after the pool was dropped");
    // Whatever part finished moved all of its bytes.
    let whole = |k: usize| {
        let r = k * CMA_PART as usize..(k + 1) * CMA_PART as usize;
        dst[r.clone()] == src[r]
    };
    let finished = (0..16).filter(|&k| whole(k)).count();
    let left = parts.left.load(Ordering::Acquire);
    assert_eq!(finished + left, 16, "{finished} parts landed, {left} left");
}
