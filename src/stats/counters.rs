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
    /// What the limits did, by reason (`tidepool_limit_events_total`).
    pub limits: LimitEvents,
}

/// Each limit's refusals and interventions.
#[derive(Debug, Default)]
pub struct LimitEvents {
    /// Clients closed by `client_idle_timeout`.
    pub client_idle_timeout: AtomicU64,
    /// Requests canceled by `query_timeout`.
    pub query_timeout: AtomicU64,
    /// Reserve connections granted (`reserve_pool_timeout` passed).
    pub reserve_pool: AtomicU64,
    /// Logins refused by `max_db_client_connections`.
    pub max_db_client_connections: AtomicU64,
    /// Logins refused by `max_user_client_connections`.
    pub max_user_client_connections: AtomicU64,
    /// Clients refused by `max_client_buffer_bytes`.
    pub max_client_buffer_bytes: AtomicU64,
}

impl LimitEvents {
    /// (reason, count) for each.
    pub fn rows(&self) -> [(&'static str, u64); 6] {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        [
            ("client_idle_timeout", g(&self.client_idle_timeout)),
            ("query_timeout", g(&self.query_timeout)),
            ("reserve_pool", g(&self.reserve_pool)),
            (
                "max_db_client_connections",
                g(&self.max_db_client_connections),
            ),
            (
                "max_user_client_connections",
                g(&self.max_user_client_connections),
            ),
            ("max_client_buffer_bytes", g(&self.max_client_buffer_bytes)),
        ]
    }
}

impl Counters {
    pub fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
