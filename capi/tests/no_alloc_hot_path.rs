//! The C ABI's hot path allocates nothing: `kvxfer_make_xfer` into a
//! reused handle, `kvxfer_xfer_post` and `kvxfer_xfer_status` until done,
//! 1000 times in a row, make no heap allocation on the calling thread.
//!
//! Two agents in this process over UCX; the initiator has no progress
//! thread, so every poll and completion happens on the measuring thread,
//! which a counting global allocator watches. The data moved is compared
//! byte for byte afterwards.
#![allow(clippy::result_large_err)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};

use kvxfer_capi::*;

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
}

fn note_alloc() {
    if COUNTING.with(Cell::get) {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded unchanged to the system allocator; the
// counter has no effect on the memory handed out.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_alloc();
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_alloc();
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_alloc();
        // SAFETY: forwarded; `ptr` came from this allocator with `layout`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded; `ptr` came from this allocator with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations_in(f: impl FnOnce()) -> u64 {
    let before = ALLOCS.load(Ordering::Relaxed);
    COUNTING.with(|c| c.set(true));
    f();
    COUNTING.with(|c| c.set(false));
    ALLOCS.load(Ordering::Relaxed) - before
}

fn ok(s: kvxfer_status) {
    if s != kvxfer_status::KVXFER_OK {
        // SAFETY: kvxfer_last_error returns a NUL-terminated string that
        // stays valid until the next failing call on this thread.
        let msg = unsafe { std::ffi::CStr::from_ptr(kvxfer_last_error()) };
        panic!("{s:?}: {}", msg.to_string_lossy());
    }
}

const BLOCK: u64 = 4096;
const BLOCKS: u32 = 64;
const SPAN: usize = (2 * BLOCK * BLOCKS as u64) as usize;

#[test]
fn make_post_status_allocate_nothing() {
    let pattern: Vec<u8> = (0..SPAN).map(|i| (i % 251) as u8 + 1).collect();
    let mut src = pattern.clone();
    let mut dst = vec![0u8; SPAN];
    let mut target: *mut kvxfer_agent = ptr::null_mut();
    let mut initiator: *mut kvxfer_agent = ptr::null_mut();
    let mut cfg = std::mem::MaybeUninit::<kvxfer_config>::uninit();
    // SAFETY: every pointer passed below is valid for the call: C strings
    // are literals, buffers outlive their registrations (the agents are
    // freed before the buffers drop), and handles come from these calls.
    unsafe {
        ok(kvxfer_config_init(cfg.as_mut_ptr()));
        let mut cfg = cfg.assume_init();
        cfg.backend = c"UCX".as_ptr();
        ok(kvxfer_agent_new(
            c"capi-noalloc-target".as_ptr(),
            &cfg,
            &mut target,
        ));
        cfg.listen = c"".as_ptr();
        cfg.progress_thread = 0;
        ok(kvxfer_agent_new(
            c"capi-noalloc-initiator".as_ptr(),
            &cfg,
            &mut initiator,
        ));
        ok(kvxfer_register(
            target,
            dst.as_mut_ptr() as u64,
            SPAN as u64,
            0,
            0,
        ));
        ok(kvxfer_register(
            initiator,
            src.as_mut_ptr() as u64,
            SPAN as u64,
            0,
            0,
        ));
        let mut md = vec![0u8; 1 << 16];
        let mut len = 0usize;
        ok(kvxfer_local_metadata(
            target,
            md.as_mut_ptr(),
            md.len(),
            &mut len,
        ));
        let mut name = [0 as std::ffi::c_char; 64];
        ok(kvxfer_load_remote(
            initiator,
            md.as_ptr(),
            len,
            name.as_mut_ptr(),
            name.len(),
            ptr::null_mut(),
        ));

        // Every other block, so that the blocks stay separate segments.
        let at = |base: &[u8], i: u32| base.as_ptr() as u64 + 2 * u64::from(i) * BLOCK;
        let local: Vec<kvxfer_desc> = (0..BLOCKS)
            .map(|i| kvxfer_desc {
                addr: at(&src, i),
                len: BLOCK,
                dev: 0,
            })
            .collect();
        let remote: Vec<kvxfer_desc> = (0..BLOCKS)
            .map(|i| kvxfer_desc {
                addr: at(&dst, i),
                len: BLOCK,
                dev: 0,
            })
            .collect();
        let mut ll = kvxfer_local_list { opaque: 0 };
        let mut rl = kvxfer_remote_list { opaque: 0 };
        ok(kvxfer_prep_local(
            initiator,
            local.as_ptr(),
            local.len(),
            &mut ll,
        ));
        ok(kvxfer_prep_remote(
            initiator,
            name.as_ptr(),
            remote.as_ptr(),
            remote.len(),
            &mut rl,
        ));
        let idx: Vec<u32> = (0..BLOCKS).collect();
        let mut xfer: *mut kvxfer_xfer = ptr::null_mut();
        let mut run = || {
            ok(kvxfer_make_xfer(
                initiator,
                kvxfer_op::KVXFER_WRITE as u32,
                ll,
                idx.as_ptr(),
                idx.len(),
                rl,
                idx.as_ptr(),
                idx.len(),
                ptr::null(),
                0,
                &mut xfer,
            ));
            let mut st = kvxfer_xfer_state::KVXFER_XFER_PREPARED;
            ok(kvxfer_xfer_post(xfer, &mut st));
            while st != kvxfer_xfer_state::KVXFER_XFER_DONE {
                ok(kvxfer_xfer_status(xfer, &mut st));
            }
        };
        // Warm-up: the handle exists, pools and queues reach their size.
        for _ in 0..50 {
            run();
        }
        let n = allocations_in(|| {
            for _ in 0..1000 {
                run();
            }
        });
        assert_eq!(n, 0, "{n} heap allocations in 1000 make/post/status rounds");

        ok(kvxfer_xfer_free(xfer));
        ok(kvxfer_release_local(initiator, ll));
        ok(kvxfer_release_remote(initiator, rl));
        ok(kvxfer_agent_free(initiator));
        ok(kvxfer_agent_free(target));
    }
    for i in 0..BLOCKS as usize {
        let r = 2 * i * BLOCK as usize..(2 * i + 1) * BLOCK as usize;
        assert_eq!(dst[r.clone()], pattern[r.clone()], "block {i} differs");
        let gap = (2 * i + 1) * BLOCK as usize..(2 * i + 2) * BLOCK as usize;
        assert!(
            dst[gap].iter().all(|&b| b == 0),
            "gap after block {i} was written"
        );
    }
}
