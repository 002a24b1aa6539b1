//! The counting global allocator of the allocation tests: a test binary that includes this
//! file (`#[path = "common/alloc_count.rs"] mod alloc_count;`) gets it as its allocator.
//! It counts, per thread, every allocation and reallocation, and, on any thread, those made
//! while latentloop's live per-bin path is marked ([`latentloop::pipeline::hot_path`]): the
//! decode thread's per-bin body and the acquisition thread's `Source::next` and hand-off.
//! libzmq's own mallocs are C and not seen here.
#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;

thread_local! {
    static MINE: Cell<usize> = const { Cell::new(0) };
}
static LIVE: AtomicUsize = AtomicUsize::new(0);

fn count() {
    // try_with: allocations during a thread's teardown, after its locals are gone.
    let _ = MINE.try_with(|c| c.set(c.get() + 1));
    if latentloop::pipeline::hot_path::active() {
        LIVE.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded to the system allocator unchanged; counting touches only a
// const-initialised thread-local and an atomic, neither of which allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller's contract for GlobalAlloc::alloc, passed on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from System through `alloc`/`realloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: as for dealloc; the caller's contract for realloc, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations made so far on the calling thread.
pub fn on_this_thread() -> usize {
    MINE.with(|c| c.get())
}

/// Allocations made so far inside latentloop's marked per-bin path, on any thread.
pub fn in_live_path() -> usize {
    LIVE.load(Ordering::Relaxed)
}

/// Runs `f` and returns what it returned and how many allocations it made on this thread.
pub fn counted<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let before = on_this_thread();
    let r = f();
    (r, on_this_thread() - before)
}

/// Panics unless the counter sees an allocation (so a zero elsewhere means something).
pub fn assert_counter_counts() {
    let (_, n) = counted(|| std::hint::black_box(vec![0u8; 16]));
    assert!(n > 0, "the allocation counter counts");
}
