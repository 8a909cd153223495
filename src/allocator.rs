//! The memory allocator: mimalloc, told to hand freed memory back to the system at once and
//! to use no transparent huge pages.
//!
//! A full registry read makes and drops millions of small strings (each field value of each
//! record). With glibc's malloc that was about a third of the daemon's CPU at start, and what
//! it freed stayed resident. The fleet benchmark at 100,000 providers (`docs/benchmarks.md`)
//! measured start to ready and resident memory after it (medians of three to five starts on
//! one machine, 2026-12-01): glibc capped at two arenas 2.7-3.6 s and 150-160 MB; mimalloc
//! with its defaults 2.0-2.3 s and 170-195 MB; mimalloc with immediate purging and no eager
//! arena commit (what [`tune`] sets) 2.0-2.5 s and 115-140 MB.
//!
//! Immediate purging has a price while a full read runs: memory freed by one batch is given
//! back and faulted in, zeroed, by the next (a fifth of the daemon's CPU during a start at
//! 100,000 providers, most of it in the kernel's `clear_page`). A full read therefore runs
//! in a [`Burst`]: mimalloc's default delay of one second while it lasts, immediate purging
//! and a collection once it ends, so what the read freed goes back at once.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// The allocator the `tokenwarden` binary installs (`src/main.rs`); the library leaves the
/// choice to whoever links it.
pub type Allocator = mimalloc::MiMalloc;

// mimalloc v3's option numbers (`mi_option_e` in its mimalloc.h); checked against the
// defaults of the linked build (purge delay 1000 ms, arena eager commit 2) before they are set.
const ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
const ARENA_EAGER_COMMIT_DEFAULT: std::os::raw::c_long = 2;
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
const PURGE_DELAY_DEFAULT: std::os::raw::c_long = 1000;
const ALLOW_THP: libmimalloc_sys::mi_option_t = 43;
const ALLOW_THP_DEFAULT: std::os::raw::c_long = 1;

/// Sets immediate purging and lazy arena commit, and turns transparent huge pages off for
/// the process; `false` (nothing set) when the linked mimalloc's options do not have the
/// expected defaults, i.e. its option numbers differ.
///
/// Huge pages: mimalloc asks for them on its arenas (`MADV_HUGEPAGE`), so every first touch
/// of heap memory faults in and zeroes 2 MiB. On the reference machine (a VM, the kernel's
/// THP setting `madvise`) that was a third of the daemon's CPU during a start at 100,000
/// providers; without them a start took 20 % less daemon CPU and 13 % less time
/// (docs/benchmarks.md). The daemon's heap is touched sparsely (small records, a map of
/// them), where huge pages buy little.
pub fn tune() -> bool {
    // SAFETY: mi_option_get and mi_option_set read and write mimalloc's option table, which
    // is safe at any time (it is made for it); they run before the runtime starts its threads.
    unsafe {
        if libmimalloc_sys::mi_option_get(PURGE_DELAY) != PURGE_DELAY_DEFAULT
            || libmimalloc_sys::mi_option_get(ARENA_EAGER_COMMIT) != ARENA_EAGER_COMMIT_DEFAULT
            || libmimalloc_sys::mi_option_get(ALLOW_THP) != ALLOW_THP_DEFAULT
        {
            return false;
        }
        libmimalloc_sys::mi_option_set(PURGE_DELAY, 0);
        libmimalloc_sys::mi_option_set(ARENA_EAGER_COMMIT, 0);
        // New arenas without MADV_HUGEPAGE; the one mapped before main is covered by the
        // process-wide switch below, which the kernel checks at each fault.
        libmimalloc_sys::mi_option_set(ALLOW_THP, 0);
    }
    // SAFETY: PR_SET_THP_DISABLE takes plain integers and changes only this process's
    // huge-page policy; it fails (ignored: huge pages stay allowed) only on old kernels.
    let _ = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    TUNED.store(true, Ordering::Relaxed);
    true
}

/// [`tune`] set the options: bursts may change the purge delay.
static TUNED: AtomicBool = AtomicBool::new(false);
/// Bursts running (full reads may overlap: the last one to end settles).
static BURSTS: AtomicUsize = AtomicUsize::new(0);

/// A stretch of heavy allocation and freeing (a full registry read): freed memory is kept
/// for reuse while any burst lasts, and handed back when the last one ends. Does nothing
/// where [`tune`] did not run or did not set the options (tests, other allocators).
#[must_use = "the burst ends when this is dropped"]
pub struct Burst(bool);

/// Starts a [`Burst`].
pub fn burst() -> Burst {
    if !TUNED.load(Ordering::Relaxed) {
        return Burst(false);
    }
    if BURSTS.fetch_add(1, Ordering::AcqRel) == 0 {
        // SAFETY: as in `tune`; mimalloc reads the option on each purge decision.
        unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, PURGE_DELAY_DEFAULT) };
    }
    Burst(true)
}

impl Drop for Burst {
    fn drop(&mut self) {
        if self.0 && BURSTS.fetch_sub(1, Ordering::AcqRel) == 1 {
            // SAFETY: as in `tune`; mi_collect may be called from any thread at any time.
            unsafe {
                libmimalloc_sys::mi_option_set(PURGE_DELAY, 0);
                libmimalloc_sys::mi_collect(true);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_linked_mimalloc_has_the_option_numbers_tune_expects() {
        assert!(
            super::tune(),
            "mimalloc's option numbers changed: update allocator.rs"
        );
        // SAFETY: reads mimalloc's option table.
        let purge = unsafe { libmimalloc_sys::mi_option_get(super::PURGE_DELAY) };
        assert_eq!(purge, 0);
        let purge = || unsafe { libmimalloc_sys::mi_option_get(super::PURGE_DELAY) };
        let outer = super::burst();
        assert_eq!(
            purge(),
            super::PURGE_DELAY_DEFAULT,
            "a burst delays purging"
        );
        let inner = super::burst();
        drop(outer);
        assert_eq!(
            purge(),
            super::PURGE_DELAY_DEFAULT,
            "until the last burst ends"
        );
        drop(inner);
        assert_eq!(purge(), 0, "then purging is immediate again");
        // SAFETY: reads mimalloc's option table.
        let thp = unsafe { libmimalloc_sys::mi_option_get(super::ALLOW_THP) };
        assert_eq!(thp, 0, "mimalloc asks for no huge pages");
        // SAFETY: PR_GET_THP_DISABLE takes no pointers.
        let off = unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) };
        assert_eq!(off, 1, "huge pages are off for the process");
    }
}
