//! The slow-query log: a bounded ring of the most recent slow queries.
//!
//! [`SlowLog`] keeps at most `cap` entries; pushing into a full ring drops the
//! oldest one. `total` counts every push since start, kept or not. Entries carry
//! the shape text (literals masked), never the statement as sent. The ring's
//! `std::sync::Mutex` is held only for one push or one copy.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use super::queries::Role;

/// One query that took longer than the slow threshold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlowQuery {
    /// When it finished.
    pub at: SystemTime,
    pub database: Arc<str>,
    pub user: Arc<str>,
    /// The server that ran it, as `host:port`.
    pub backend: Arc<str>,
    pub role: Role,
    pub application_name: String,
    pub client_addr: String,
    pub duration_us: u64,
    pub rows: u64,
    pub error: bool,
    /// The shape's id ([`Shape::id`](super::fingerprint::Shape::id)).
    pub fingerprint: u64,
    /// The shape's text, literals masked.
    pub query: Arc<str>,
    /// The caller's trace context (sqlcommenter's `traceparent`).
    pub trace: Option<super::trace::Trace>,
}

/// A bounded ring of [`SlowQuery`] (see the module docs).
pub struct SlowLog {
    ring: Mutex<VecDeque<SlowQuery>>,
    cap: usize,
    total: AtomicU64,
}

impl SlowLog {
    /// A ring keeping the last `cap` entries (none when `cap` is 0). Memory
    /// grows with use up to `cap`, never past it.
    pub fn new(cap: usize) -> Self {
        Self {
            ring: Mutex::new(VecDeque::new()),
            cap,
            total: AtomicU64::new(0),
        }
    }

    /// Adds `query`, dropping the oldest entry when the ring is full.
    pub fn push(&self, query: SlowQuery) {
        self.total.fetch_add(1, Ordering::Relaxed);
        if self.cap == 0 {
            return;
        }
        let mut ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
        while ring.len() >= self.cap {
            ring.pop_front();
        }
        ring.push_back(query);
    }

    /// The kept entries, newest first.
    pub fn snapshot(&self) -> Vec<SlowQuery> {
        let ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
        ring.iter().rev().cloned().collect()
    }

    /// Entries pushed since start, including those dropped since.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// Entries kept now.
    pub fn len(&self) -> usize {
        self.ring
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Most entries kept.
    pub fn capacity(&self) -> usize {
        self.cap
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn slow(n: u64) -> SlowQuery {
        SlowQuery {
            at: SystemTime::now(),
            database: Arc::from("app"),
            user: Arc::from("alice"),
            backend: Arc::from("127.0.0.1:5432"),
            role: Role::Primary,
            application_name: "psql".to_string(),
            client_addr: "127.0.0.1:50000".to_string(),
            duration_us: n,
            rows: 1,
            error: false,
            fingerprint: 42,
            query: Arc::from("select $1"),
            trace: None,
        }
    }

    #[test]
    fn keeps_the_newest_first_and_drops_the_oldest() {
        let log = SlowLog::new(3);
        assert!(log.is_empty());
        for n in 1..=5 {
            log.push(slow(n));
        }
        let got: Vec<u64> = log.snapshot().iter().map(|q| q.duration_us).collect();
        assert_eq!(got, [5, 4, 3]);
        assert_eq!(log.total(), 5);
        assert_eq!(log.len(), 3);
        assert_eq!(log.capacity(), 3);
    }

    #[test]
    fn partly_filled_ring_returns_what_it_has() {
        let log = SlowLog::new(100);
        log.push(slow(1));
        log.push(slow(2));
        let got: Vec<u64> = log.snapshot().iter().map(|q| q.duration_us).collect();
        assert_eq!(got, [2, 1]);
        let newest = &log.snapshot()[0];
        assert_eq!(
            (&*newest.user, &*newest.backend, newest.role),
            ("alice", "127.0.0.1:5432", Role::Primary)
        );
    }

    #[test]
    fn zero_capacity_keeps_nothing_but_counts() {
        let log = SlowLog::new(0);
        log.push(slow(1));
        assert!(log.snapshot().is_empty());
        assert_eq!(log.total(), 1);
    }

    #[test]
    fn concurrent_pushes_are_all_counted() {
        let log = SlowLog::new(10);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for n in 0..250 {
                        log.push(slow(n));
                    }
                });
            }
        });
        assert_eq!(log.total(), 1_000);
        assert_eq!(log.len(), 10);
    }
}
