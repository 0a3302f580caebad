//! Process-wide counters. Atomics only: updated on the hot path without locks,
//! read by the admin console and metrics (later) through a snapshot.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Counters {
    /// Parse messages tidepool sent to servers for named statements.
    pub prepares: AtomicU64,
    /// Client Parses answered without a server round trip (statement already there).
    pub prepare_hits: AtomicU64,
    /// Statements closed on a server to respect `max_prepared_statements`.
    pub prepare_evictions: AtomicU64,
    /// Checkouts that needed SET/RESET to match the client's parameters.
    pub param_syncs: AtomicU64,
    /// Reads of a server's session settings after a client changed them.
    pub param_refreshes: AtomicU64,
    /// Clients pinned to their server by a session feature.
    pub pins: AtomicU64,
}

impl Counters {
    pub fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
