//! The memory allocator: jemalloc, for every binary that links tidepool.
//!
//! jemalloc keeps objects of one size class together and, with the options
//! built in by `.cargo/config.toml` (a background thread, a 250 ms decay for
//! freed pages), gives pages that emptied back to the system on its own. That
//! matters after a burst of logins: the tasks of clients that then go idle
//! and park are freed, and their memory leaves the process instead of
//! staying as holes between the records of parked clients.

//! Each thread also keeps a cache of freed objects to hand out again; an
//! idle thread never trims it, and the cached objects keep otherwise empty
//! slabs (pages) in use. After clients park, [`flush_thread_cache`] gives
//! them back. Objects a thread keeps for reuse on its own (the caller's
//! `drop_kept`, e.g. spare trackers) go first: made during the burst of
//! logins, they are scattered over slabs that would otherwise empty.

use std::sync::atomic::{AtomicU64, Ordering};

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The allocator's view of the process: bytes handed out to tidepool, and
/// bytes in pages it keeps resident (including its own metadata).
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    pub allocated: u64,
    pub resident: u64,
}

/// Fresh figures (the statistics are refreshed first); `None` if jemalloc
/// does not answer.
pub fn usage() -> Option<Usage> {
    tikv_jemalloc_ctl::epoch::advance().ok()?;
    Some(Usage {
        allocated: tikv_jemalloc_ctl::stats::allocated::read().ok()? as u64,
        resident: tikv_jemalloc_ctl::stats::resident::read().ok()? as u64,
    })
}

/// Asks every runtime thread to flush its cache (see
/// [`flush_thread_cache`]): the calling thread now, after `drop_kept` let go
/// of what it keeps for reuse, the others the next time they go idle
/// ([`flush_if_asked`], the runtime's park hook, with their own). With several
/// workers, clients park on all of them, and the caches of the threads that
/// did not run the parking sweep kept their slabs too (10,000 parked
/// clients on two workers: ~750 KB of cached objects pinning ~4 MB).
pub fn flush_all_thread_caches(drop_kept: impl FnOnce()) {
    drop_kept();
    flush_thread_cache();
    FLUSH_ASKED.fetch_add(1, Ordering::Relaxed);
}

/// The runtime's park hook: flushes this thread's cache if a flush was asked
/// for since its last one, after `drop_kept` let go of what the thread keeps
/// for reuse (objects made in a burst of logins, scattered over slabs that
/// would otherwise stay). Costs a load and a compare otherwise.
pub fn flush_if_asked(drop_kept: impl FnOnce()) {
    let asked = FLUSH_ASKED.load(Ordering::Relaxed);
    FLUSHED.with(|seen| {
        if seen.get() != asked {
            seen.set(asked);
            drop_kept();
            flush_thread_cache();
        }
    });
}

/// Flushes asked for so far ([`flush_all_thread_caches`]).
static FLUSH_ASKED: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// The last flush this thread did, as a count of [`FLUSH_ASKED`].
    static FLUSHED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Returns the calling thread's cached free objects to their slabs, so that
/// slabs left empty can be given back to the system (the parking sweep calls
/// it after clients parked: their freed sessions sit in that cache).
pub fn flush_thread_cache() {
    // SAFETY: "thread.tcache.flush" takes and returns nothing, so every
    // pointer is null and the length zero, as jemalloc requires.
    let r = unsafe {
        tikv_jemalloc_sys::mallctl(
            c"thread.tcache.flush".as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        )
    };
    if r != 0 {
        tracing::debug!(error = r, "could not flush the allocator's thread cache");
    }
}
