//! Per-client and per-`application_name` totals: transactions, queries,
//! time waited for a server and bytes, added once per transaction.
//!
//! Invariant: the table of application names is bounded ([`MAX_APPS`]):
//! past it, new names count under `other`, so a client that invents a
//! name per connection cannot grow memory or `/metrics` cardinality.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

/// Distinct application names counted apart.
pub const MAX_APPS: usize = 256;
/// The name the rest count under.
pub const OTHER: &str = "other";

/// Running totals (of one client, or one application name).
#[derive(Debug, Default)]
pub struct Counts {
    pub xacts: AtomicU64,
    pub queries: AtomicU64,
    pub wait_us: AtomicU64,
    pub bytes: AtomicU64,
}

/// A plain copy of [`Counts`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    pub xacts: u64,
    pub queries: u64,
    pub wait_us: u64,
    pub bytes: u64,
}

impl Counts {
    /// A transaction's share: its transactions, queries and bytes.
    pub fn transaction(&self, xacts: u64, queries: u64, bytes: u64) {
        if xacts > 0 {
            self.xacts.fetch_add(xacts, Relaxed);
        }
        if queries > 0 {
            self.queries.fetch_add(queries, Relaxed);
        }
        if bytes > 0 {
            self.bytes.fetch_add(bytes, Relaxed);
        }
    }

    pub fn waited(&self, us: u64) {
        if us > 0 {
            self.wait_us.fetch_add(us, Relaxed);
        }
    }

    pub fn totals(&self) -> Totals {
        Totals {
            xacts: self.xacts.load(Relaxed),
            queries: self.queries.load(Relaxed),
            wait_us: self.wait_us.load(Relaxed),
            bytes: self.bytes.load(Relaxed),
        }
    }
}

/// The application names' totals.
#[derive(Default)]
pub struct Apps {
    table: Mutex<HashMap<Box<str>, Arc<Counts>>>,
    other: Arc<Counts>,
}

impl Apps {
    /// The totals `name` counts under (looked up when a client's name is
    /// set or changes, not per transaction).
    pub fn counts(&self, name: &str) -> Arc<Counts> {
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = t.get(name) {
            return c.clone();
        }
        if t.len() >= MAX_APPS || name == OTHER {
            return self.other.clone();
        }
        let c = Arc::new(Counts::default());
        t.insert(name.into(), c.clone());
        c
    }

    /// The `top` names with the most transactions, then `other` (the rest
    /// and the names past the table's bound, summed).
    pub fn top(&self, top: usize) -> Vec<(String, Totals)> {
        let t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let mut all: Vec<(String, Totals)> =
            t.iter().map(|(n, c)| (n.to_string(), c.totals())).collect();
        drop(t);
        all.sort_by(|a, b| b.1.xacts.cmp(&a.1.xacts).then_with(|| a.0.cmp(&b.0)));
        let mut other = self.other.totals();
        for (_, rest) in all.iter().skip(top) {
            other.xacts += rest.xacts;
            other.queries += rest.queries;
            other.wait_us += rest.wait_us;
            other.bytes += rest.bytes;
        }
        all.truncate(top);
        all.push((OTHER.to_owned(), other));
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_past_the_bound_and_past_the_top_count_as_other() {
        let apps = Apps::default();
        for i in 0..MAX_APPS + 10 {
            apps.counts(&format!("app{i}")).transaction(1, 1, 10);
        }
        apps.counts("app0").transaction(5, 5, 0);
        let top = apps.top(3);
        assert_eq!(top.len(), 4);
        assert_eq!(top[0].0, "app0");
        assert_eq!(top[0].1.xacts, 6);
        let total: u64 = top.iter().map(|(_, t)| t.xacts).sum();
        assert_eq!(total, (MAX_APPS + 10) as u64 + 5, "nothing lost");
        assert_eq!(top[3].0, OTHER);
    }
}
