//! The memory allocator: mimalloc, told to hand freed memory back to the system at once.
//!
//! A full registry read makes and drops millions of small strings (each field value of each
//! record). With glibc's malloc that was about a third of the daemon's CPU at start, and what
//! it freed stayed resident. The fleet benchmark at 100,000 providers (`docs/benchmarks.md`)
//! measured start to ready and resident memory after it (medians of three to five starts on
//! one machine, 2026-12-01): glibc capped at two arenas 2.7-3.6 s and 150-160 MB; mimalloc
//! with its defaults 2.0-2.3 s and 170-195 MB; mimalloc with immediate purging and no eager
//! arena commit (what [`tune`] sets) 2.0-2.5 s and 115-140 MB.

/// The allocator the `tokenwarden` binary installs (`src/main.rs`); the library leaves the
/// choice to whoever links it.
pub type Allocator = mimalloc::MiMalloc;

// mimalloc v3's option numbers (`mi_option_e` in its mimalloc.h); checked against the
// defaults of the linked build (purge delay 1000 ms, arena eager commit 2) before they are set.
const ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
const ARENA_EAGER_COMMIT_DEFAULT: std::os::raw::c_long = 2;
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
const PURGE_DELAY_DEFAULT: std::os::raw::c_long = 1000;

/// Sets immediate purging and lazy arena commit; `false` (nothing set) when the linked
/// mimalloc's options do not have the expected defaults, i.e. its option numbers differ.
pub fn tune() -> bool {
    // SAFETY: mi_option_get and mi_option_set read and write mimalloc's option table, which
    // is safe at any time (it is made for it); they run before the runtime starts its threads.
    unsafe {
        if libmimalloc_sys::mi_option_get(PURGE_DELAY) != PURGE_DELAY_DEFAULT
            || libmimalloc_sys::mi_option_get(ARENA_EAGER_COMMIT) != ARENA_EAGER_COMMIT_DEFAULT
        {
            return false;
        }
        libmimalloc_sys::mi_option_set(PURGE_DELAY, 0);
        libmimalloc_sys::mi_option_set(ARENA_EAGER_COMMIT, 0);
    }
    true
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
    }
}
