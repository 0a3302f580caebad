//! Everything tidepool counts, for the admin console and `/metrics`.
//!
//! - [`Counters`]: process-wide events (prepares, parameter syncs, pins).
//! - [`Traffic`]: per (database, backend) totals and averages — `SHOW STATS`.
//! - [`QueryStats`]: per normalized query calls, rows, errors, latency
//!   percentiles, bounded to the top N by total time — `SHOW QUERIES`.
//! - [`SlowLog`]: the most recent slow statements — `SHOW SLOW_QUERIES`.
//! - [`spans::Spans`]: transactions sampled for OpenTelemetry, queued for
//!   the exporter.
//! - pool health: the share of slow statements per database over the last
//!   `health_window`.
//!
//! Invariant: nothing here stores a query's literals; query text enters only
//! through [`Fingerprints`], which masks them. The hot path touches atomics
//! and sharded maps only; whole-table locks are taken by readers and the
//! ticker.

mod counters;
pub mod fingerprint;
pub mod histogram;
pub mod queries;
pub mod slow;
pub mod spans;
pub mod trace;
pub mod traffic;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

pub use counters::Counters;
pub use fingerprint::{Fingerprints, Shape};
pub use queries::{QueryStats, Role};
pub use slow::{SlowLog, SlowQuery};
pub use traffic::{Averages, Delta, Latencies, Totals, Traffic};

use crate::config::schema::Stats as StatsConfig;

/// `s` cut to at most `max` bytes (at a character boundary), with `…`
/// when cut: text shown outside (metric labels, spans) stays bounded.
pub fn cut_text(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// A small number for the current thread, distinct per thread (assigned on
/// first use). Hot-path statistics index their stripes with it so that each
/// worker thread writes its own cache lines.
pub fn thread_shard() -> usize {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    SHARD.with(|s| *s)
}

/// Which of `n` stripes the current thread writes, and whether it writes it
/// alone: the first `n - 1` threads (in order of first use) own one each,
/// later threads share the last one.
pub fn stripe_of(n: usize) -> (usize, bool) {
    let s = thread_shard();
    if s + 1 < n {
        (s, true)
    } else {
        (n.saturating_sub(1), false)
    }
}

/// Adds `v` to a striped counter: a plain load and store (no locked
/// instruction) when this thread alone writes it (`owned`, see
/// [`stripe_of`]), an atomic add otherwise. Readers only load, so they see
/// every completed add either way.
#[inline]
pub fn bump(a: &std::sync::atomic::AtomicU64, v: u64, owned: bool) {
    use std::sync::atomic::Ordering::Relaxed;
    if owned {
        a.store(a.load(Relaxed).wrapping_add(v), Relaxed);
    } else {
        a.fetch_add(v, Relaxed);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A database's health, judged by its share of slow statements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthStatus {
    Healthy,
    Degraded,
    Unhealthy,
}

impl HealthStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Healthy => "healthy",
            Self::Degraded => "degraded",
            Self::Unhealthy => "unhealthy",
        }
    }
}

/// Statements and slow statements of one database in the last window.
#[derive(Debug, Clone, Copy)]
pub struct PoolHealth {
    pub status: HealthStatus,
    pub statements: u64,
    pub slow: u64,
    pub ratio: f64,
}

impl PoolHealth {
    pub fn judge(statements: u64, slow: u64, cfg: &StatsConfig) -> Self {
        let ratio = if statements == 0 {
            0.0
        } else {
            slow as f64 / statements as f64
        };
        let status = if ratio > cfg.unhealthy_slow_ratio {
            HealthStatus::Unhealthy
        } else if ratio >= cfg.degraded_slow_ratio && slow > 0 {
            HealthStatus::Degraded
        } else {
            HealthStatus::Healthy
        };
        Self {
            status,
            statements,
            slow,
            ratio,
        }
    }
}

/// (when, statements so far, slow statements so far).
type Sample = (Instant, u64, u64);

pub struct Stats {
    pub counters: Counters,
    traffic: Mutex<BTreeMap<(String, usize), Arc<Traffic>>>,
    pub queries: QueryStats,
    pub slow: SlowLog,
    pub shapes: Fingerprints,
    /// Per database: (when, statements, slow) samples covering the window.
    windows: Mutex<HashMap<String, VecDeque<Sample>>>,
    pub started: SystemTime,
    /// Whether per-query statistics are kept at all.
    pub per_query: bool,
}

impl Stats {
    pub fn new(cfg: &StatsConfig) -> Self {
        Self {
            counters: Counters::default(),
            traffic: Mutex::new(BTreeMap::new()),
            queries: QueryStats::new(cfg.max_query_fingerprints.max(1)),
            slow: SlowLog::new(cfg.slow_query_log_size),
            shapes: Fingerprints::new((cfg.max_query_fingerprints * 4).max(1024)),
            windows: Mutex::new(HashMap::new()),
            started: SystemTime::now(),
            per_query: cfg.max_query_fingerprints > 0,
        }
    }

    /// The counters of `database`'s backend `backend` (0 = primary).
    pub fn traffic(&self, database: &str, backend: usize) -> Arc<Traffic> {
        lock(&self.traffic)
            .entry((database.to_owned(), backend))
            .or_default()
            .clone()
    }

    /// Every (database, backend) seen so far, in order.
    pub fn traffic_rows(&self) -> Vec<((String, usize), Arc<Traffic>)> {
        lock(&self.traffic)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Statements and slow statements of a database (all backends) so far.
    fn database_totals(&self) -> BTreeMap<String, (u64, u64)> {
        let mut out: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for ((db, _), t) in lock(&self.traffic).iter() {
            let e = out.entry(db.clone()).or_default();
            let tot = t.totals();
            e.0 += tot.statements;
            e.1 += tot.slow;
        }
        out
    }

    /// Periodic work: recompute averages (when `roll`), and sample the
    /// statement counts that pool health is judged on.
    pub fn tick(&self, now: Instant, window: Duration, roll: bool) {
        if roll {
            for (_, t) in self.traffic_rows() {
                t.roll(now);
            }
        }
        let totals = self.database_totals();
        let mut w = lock(&self.windows);
        for (db, (n, slow)) in totals {
            let q = w.entry(db).or_default();
            if q.is_empty() {
                // A database's first sample: everything so far is recent.
                q.push_back((now, 0, 0));
            }
            q.push_back((now, n, slow));
            // Keep one sample at or before the window's start.
            while q.len() > 2 && q.get(1).is_some_and(|s| now.duration_since(s.0) >= window) {
                q.pop_front();
            }
        }
    }

    /// A database's health over the last window.
    pub fn health(&self, database: &str, cfg: &StatsConfig) -> PoolHealth {
        let (n, slow) = self
            .database_totals()
            .get(database)
            .copied()
            .unwrap_or_default();
        let (n0, slow0) = lock(&self.windows)
            .get(database)
            .and_then(|q| q.front().map(|s| (s.1, s.2)))
            .unwrap_or_default();
        PoolHealth::judge(n.saturating_sub(n0), slow.saturating_sub(slow0), cfg)
    }
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Replica => "replica",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_thresholds() {
        let cfg = StatsConfig::default();
        assert_eq!(PoolHealth::judge(0, 0, &cfg).status, HealthStatus::Healthy);
        assert_eq!(
            PoolHealth::judge(100, 4, &cfg).status,
            HealthStatus::Healthy
        );
        assert_eq!(
            PoolHealth::judge(100, 5, &cfg).status,
            HealthStatus::Degraded
        );
        assert_eq!(
            PoolHealth::judge(100, 10, &cfg).status,
            HealthStatus::Degraded
        );
        assert_eq!(
            PoolHealth::judge(100, 11, &cfg).status,
            HealthStatus::Unhealthy
        );
    }

    #[test]
    fn health_counts_only_the_window() {
        let cfg = StatsConfig::default();
        let s = Stats::new(&cfg);
        let t = s.traffic("app", 0);
        let start = Instant::now();
        t.apply(&Delta {
            statements: 100,
            slow: 50,
            ..Delta::default()
        });
        s.tick(start, Duration::from_secs(10), false);
        t.apply(&Delta {
            statements: 100,
            ..Delta::default()
        });
        s.tick(
            start + Duration::from_secs(11),
            Duration::from_secs(10),
            false,
        );
        s.tick(
            start + Duration::from_secs(12),
            Duration::from_secs(10),
            false,
        );
        let h = s.health("app", &cfg);
        assert_eq!(h.statements, 100, "{h:?}");
        assert_eq!(h.slow, 0);
        assert_eq!(h.status, HealthStatus::Healthy);
    }
}
