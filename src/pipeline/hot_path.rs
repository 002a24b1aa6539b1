//! Marks the live per-bin path of the real-time threads (the decode thread's body from the
//! second bin on, the acquisition thread's `Source::next` and ring hand-off), so that an
//! allocation there can be told from the rest: tests/no_alloc.rs installs a counting
//! allocator that asks [`active`] (nih-plug's assert_process_allocs, as a count rather than
//! an abort). In a normal build nothing reads the mark; setting it is one thread-local store.

use std::cell::Cell;

thread_local! {
    static ACTIVE: Cell<bool> = const { Cell::new(false) };
}

/// Whether the calling thread is inside its marked per-bin path.
pub fn active() -> bool {
    ACTIVE.try_with(Cell::get).unwrap_or(false)
}

/// Marks (or unmarks) the calling thread's per-bin path.
pub fn set(on: bool) {
    let _ = ACTIVE.try_with(|a| a.set(on));
}
