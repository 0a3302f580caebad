//! Per-query statistics in bounded memory, keyed by (database, query shape).
//!
//! [`QueryStats`] has one shard per recording worker thread (up to 16), each
//! behind its own short `std::sync::Mutex` (never held across an `.await`,
//! never held while doing anything but updating one map) and holding at most
//! `max_entries` entries. A shard that is full evicts its entry with the
//! smallest `total_us` to make room, and counts the eviction. A snapshot
//! merges the shards and lists at most `max_entries`. Entries hold the shared `Arc`s of the database name and the
//! [`Shape`], so they never keep query text of their own (and so never a raw
//! literal).

use std::collections::HashMap;
use std::hash::Hasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use super::fingerprint::{KeyMap, Shape};
use super::histogram::Histogram;

/// Number of independently locked shards.
const SHARDS: usize = 16;

/// Which kind of backend served a query.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Primary,
    Replica,
}

/// Statistics of one (database, shape) pair.
#[derive(Clone)]
struct Entry {
    database: Arc<str>,
    shape: Arc<Shape>,
    calls: u64,
    errors: u64,
    rows: u64,
    total_us: u64,
    primary_calls: u64,
    replica_calls: u64,
    histogram: Histogram,
    /// µs since the Unix epoch (coarse clock).
    last_seen_us: u64,
}

impl Entry {
    fn new(database: &Arc<str>, shape: &Arc<Shape>, now: u64) -> Self {
        Self {
            database: Arc::clone(database),
            shape: Arc::clone(shape),
            calls: 0,
            errors: 0,
            rows: 0,
            total_us: 0,
            primary_calls: 0,
            replica_calls: 0,
            histogram: Histogram::new(),
            last_seen_us: now,
        }
    }

    /// True if this entry is for `database` and `shape` (and not another pair
    /// whose key collides).
    fn is_for(&self, database: &Arc<str>, shape: &Shape) -> bool {
        self.shape.id == shape.id
            && (Arc::ptr_eq(&self.database, database) || *self.database == **database)
    }

    fn add(&mut self, role: Role, us: u64, rows: u64, error: bool, now: u64) {
        self.calls = self.calls.saturating_add(1);
        self.errors = self.errors.saturating_add(u64::from(error));
        self.rows = self.rows.saturating_add(rows);
        self.total_us = self.total_us.saturating_add(us);
        match role {
            Role::Primary => self.primary_calls = self.primary_calls.saturating_add(1),
            Role::Replica => self.replica_calls = self.replica_calls.saturating_add(1),
        }
        self.histogram.record(us);
        self.last_seen_us = now;
    }

    /// Adds another thread's counts for the same pair.
    fn merge(&mut self, o: &Entry) {
        self.calls = self.calls.saturating_add(o.calls);
        self.errors = self.errors.saturating_add(o.errors);
        self.rows = self.rows.saturating_add(o.rows);
        self.total_us = self.total_us.saturating_add(o.total_us);
        self.primary_calls = self.primary_calls.saturating_add(o.primary_calls);
        self.replica_calls = self.replica_calls.saturating_add(o.replica_calls);
        self.histogram.merge(&o.histogram);
        self.last_seen_us = self.last_seen_us.max(o.last_seen_us);
    }

    fn row(&self) -> QueryRow {
        let h = &self.histogram;
        QueryRow {
            database: Arc::clone(&self.database),
            fingerprint: self.shape.id,
            query: Arc::clone(&self.shape.text),
            calls: self.calls,
            errors: self.errors,
            rows: self.rows,
            total_us: self.total_us,
            mean_us: h.mean_us(),
            p50_us: h.percentile(50.0),
            p90_us: h.percentile(90.0),
            p95_us: h.percentile(95.0),
            p99_us: h.percentile(99.0),
            min_us: h.min_us(),
            max_us: h.max_us(),
            primary_calls: self.primary_calls,
            replica_calls: self.replica_calls,
            last_seen: SystemTime::UNIX_EPOCH + std::time::Duration::from_micros(self.last_seen_us),
        }
    }
}

/// One (database, shape) pair as the admin console and metrics see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueryRow {
    pub database: Arc<str>,
    pub fingerprint: u64,
    /// Shape text, literals masked.
    pub query: Arc<str>,
    pub calls: u64,
    pub errors: u64,
    pub rows: u64,
    pub total_us: u64,
    pub mean_us: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p95_us: u64,
    pub p99_us: u64,
    pub min_us: u64,
    pub max_us: u64,
    pub primary_calls: u64,
    pub replica_calls: u64,
    pub last_seen: SystemTime,
}

/// Per-query statistics (see the module docs).
///
/// Each worker thread records into its own shard (see
/// [`super::thread_shard`]), so the same hot query run on every core never
/// contends for one lock; readers merge the shards by (database, query).
pub struct QueryStats {
    shards: [Mutex<KeyMap<Entry>>; SHARDS],
    per_shard: usize,
    max_entries: usize,
    evictions: AtomicU64,
}

impl QueryStats {
    /// Room for `max_entries` pairs (per recording thread; a snapshot lists
    /// at most `max_entries`).
    pub fn new(max_entries: usize) -> Self {
        Self {
            shards: std::array::from_fn(|_| Mutex::new(KeyMap::default())),
            per_shard: max_entries.max(1),
            max_entries: max_entries.max(1),
            evictions: AtomicU64::new(0),
        }
    }

    /// Counts one execution of `shape` on `database`, served by `role`, that
    /// took `us` microseconds and returned `rows` rows.
    pub fn record(
        &self,
        database: &Arc<str>,
        shape: &Arc<Shape>,
        role: Role,
        us: u64,
        rows: u64,
        error: bool,
    ) {
        let key = shape.id ^ database_hash(database);
        // `last_seen` is shown to the second: the coarse clock will do.
        let now = crate::clock::coarse_us();
        let mut map = self.lock();
        if let Some(entry) = map.get_mut(&key) {
            if entry.is_for(database, shape) {
                entry.add(role, us, rows, error, now);
                return;
            }
            // Another pair with the same key: it gives way.
            *entry = Entry::new(database, shape, now);
            entry.add(role, us, rows, error, now);
            self.evictions.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if map.len() >= self.per_shard {
            let smallest = map
                .iter()
                .min_by_key(|(_, entry)| entry.total_us)
                .map(|(&key, _)| key);
            if let Some(smallest) = smallest {
                map.remove(&smallest);
                self.evictions.fetch_add(1, Ordering::Relaxed);
            }
        }
        let mut entry = Entry::new(database, shape, now);
        entry.add(role, us, rows, error, now);
        map.insert(key, entry);
    }

    /// Every entry, largest `total_us` first.
    pub fn snapshot(&self) -> Vec<QueryRow> {
        // Merge the threads' entries of each (database, query) first.
        let mut merged: HashMap<(Arc<str>, u64), Entry> = HashMap::new();
        for shard in &self.shards {
            let map = shard.lock().unwrap_or_else(PoisonError::into_inner);
            for e in map.values() {
                match merged.entry((Arc::clone(&e.database), e.shape.id)) {
                    std::collections::hash_map::Entry::Occupied(mut o) => o.get_mut().merge(e),
                    std::collections::hash_map::Entry::Vacant(v) => {
                        v.insert(e.clone());
                    }
                }
            }
        }
        let mut rows: Vec<QueryRow> = merged.values().map(Entry::row).collect();
        rows.sort_unstable_by(|a, b| {
            b.total_us
                .cmp(&a.total_us)
                .then(b.calls.cmp(&a.calls))
                .then(a.database.cmp(&b.database))
                .then(a.fingerprint.cmp(&b.fingerprint))
        });
        rows.truncate(self.max_entries);
        rows
    }

    /// Entries held now.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops every entry (the eviction count is kept).
    pub fn clear(&self) {
        for shard in &self.shards {
            shard.lock().unwrap_or_else(PoisonError::into_inner).clear();
        }
    }

    /// Entries dropped to make room since start.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, KeyMap<Entry>> {
        self.shards[super::thread_shard() % SHARDS]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

fn database_hash(database: &str) -> u64 {
    let mut hasher = rustc_hash::FxHasher::default();
    hasher.write(database.as_bytes());
    hasher.finish()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn shape(id: u64, text: &str) -> Arc<Shape> {
        Arc::new(Shape {
            id,
            text: Arc::from(text),
        })
    }

    #[test]
    fn records_calls_rows_errors_roles_and_latency() {
        let stats = QueryStats::new(64);
        let db: Arc<str> = Arc::from("app");
        let s = shape(7, "select $1");
        // `last_seen` comes from the coarse clock.
        crate::clock::refresh();
        let before = crate::clock::coarse();
        for us in 1..=100 {
            let role = if us % 4 == 0 {
                Role::Replica
            } else {
                Role::Primary
            };
            stats.record(&db, &s, role, us, 2, us % 10 == 0);
        }
        let rows = stats.snapshot();
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert_eq!(&*r.database, "app");
        assert_eq!(r.fingerprint, 7);
        assert_eq!(&*r.query, "select $1");
        assert_eq!(r.calls, 100);
        assert_eq!(r.errors, 10);
        assert_eq!(r.rows, 200);
        assert_eq!(r.total_us, 5050);
        assert_eq!(r.mean_us, 50);
        assert_eq!(r.min_us, 1);
        assert_eq!(r.max_us, 100);
        assert_eq!(r.primary_calls, 75);
        assert_eq!(r.replica_calls, 25);
        assert!(r.p50_us.abs_diff(50) <= 2, "{}", r.p50_us);
        assert!(r.p90_us.abs_diff(90) <= 3, "{}", r.p90_us);
        assert!(r.p99_us.abs_diff(99) <= 3, "{}", r.p99_us);
        assert!(r.p50_us <= r.p90_us && r.p90_us <= r.p95_us && r.p95_us <= r.p99_us);
        assert!(r.last_seen >= before);
    }

    #[test]
    fn same_shape_in_two_databases_is_two_rows() {
        let stats = QueryStats::new(64);
        let s = shape(7, "select $1");
        stats.record(&Arc::from("a"), &s, Role::Primary, 10, 0, false);
        // An equal name in another Arc is the same database.
        stats.record(&Arc::from("a"), &s, Role::Primary, 10, 0, false);
        stats.record(&Arc::from("b"), &s, Role::Primary, 5, 0, false);
        let rows = stats.snapshot();
        assert_eq!(rows.len(), 2);
        assert_eq!((&*rows[0].database, rows[0].calls), ("a", 2));
        assert_eq!((&*rows[1].database, rows[1].calls), ("b", 1));
        assert_eq!(stats.len(), 2);
    }

    #[test]
    fn snapshot_is_sorted_by_total_time() {
        let stats = QueryStats::new(1_000);
        let db: Arc<str> = Arc::from("app");
        for id in 0..50u64 {
            let s = shape(id.wrapping_mul(0x9E37_79B9_7F4A_7C15), "q");
            stats.record(&db, &s, Role::Primary, (id * 37) % 50 + 1, 0, false);
        }
        let rows = stats.snapshot();
        assert_eq!(rows.len(), 50);
        assert!(rows.windows(2).all(|w| w[0].total_us >= w[1].total_us));
    }

    #[test]
    fn full_shard_evicts_the_smallest_total() {
        let stats = QueryStats::new(2); // two entries per recording thread
        let db: Arc<str> = Arc::from("app");
        let same_shard = |k: u64, text: &str| shape(k, text);
        stats.record(&db, &same_shard(1, "big"), Role::Primary, 1_000, 0, false);
        stats.record(&db, &same_shard(2, "small"), Role::Primary, 1, 0, false);
        stats.record(&db, &same_shard(3, "third"), Role::Primary, 10, 0, false);
        let names: Vec<String> = stats
            .snapshot()
            .iter()
            .map(|r| r.query.to_string())
            .collect();
        assert_eq!(names, ["big", "third"]);
        assert_eq!(stats.evictions(), 1);
        // An existing entry is updated, not evicted.
        stats.record(&db, &same_shard(3, "third"), Role::Primary, 10, 0, false);
        assert_eq!(stats.evictions(), 1);
        assert_eq!(stats.len(), 2);
    }

    #[test]
    fn memory_stays_bounded() {
        let stats = QueryStats::new(160);
        let db: Arc<str> = Arc::from("app");
        for id in 0..10_000u64 {
            let s = shape(id.wrapping_mul(0x9E37_79B9_7F4A_7C15), "q");
            stats.record(&db, &s, Role::Replica, id, 1, false);
        }
        assert!(stats.len() <= 160, "{}", stats.len());
        assert!(stats.evictions() >= 10_000 - 160);
        stats.clear();
        assert!(stats.is_empty());
        assert!(stats.snapshot().is_empty());
    }

    #[test]
    fn colliding_key_replaces_the_entry() {
        let stats = QueryStats::new(64);
        let a: Arc<str> = Arc::from("a");
        let b: Arc<str> = Arc::from("b");
        let s = shape(5, "first");
        // A shape whose id collides with (a, s) when recorded for b.
        let t = shape(5 ^ database_hash(&a) ^ database_hash(&b), "second");
        stats.record(&a, &s, Role::Primary, 3, 0, false);
        stats.record(&b, &t, Role::Primary, 4, 0, false);
        let rows = stats.snapshot();
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (&*rows[0].database, &*rows[0].query, rows[0].calls),
            ("b", "second", 1)
        );
        assert_eq!(stats.evictions(), 1);
    }

    #[test]
    fn concurrent_records_are_all_counted() {
        let stats = QueryStats::new(64);
        let db: Arc<str> = Arc::from("app");
        let s = shape(9, "q");
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for _ in 0..1_000 {
                        stats.record(&db, &s, Role::Primary, 1, 1, false);
                    }
                });
            }
        });
        let rows = stats.snapshot();
        assert_eq!(rows[0].calls, 4_000);
        assert_eq!(rows[0].rows, 4_000);
    }
}
