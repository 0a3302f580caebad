//! Clients pinned to their server by session state: why, since when, and
//! how many pins and unpins each reason caused.
//!
//! Invariants: a pinned client holds a [`Pin`], and the table has a row for
//! it exactly as long as the guard lives (dropping it removes the row), so
//! SHOW CLIENTS never shows a departed client as pinned. Unpinned clients
//! cost nothing here: pins are rare, so they live in this side table rather
//! than in every client's `ClientInfo`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// Every reason a client can be pinned for: the text the SQL scan and the
/// server check name it by (shown in SHOW CLIENTS and logs), and its
/// metric label.
pub const REASONS: [(&str, &str); 6] = [
    (LISTEN, "listen"),
    (HOLD_CURSOR, "with_hold_cursor"),
    (TEMP_TABLE, "temp_table"),
    (ADVISORY_LOCK, "advisory_lock"),
    (SQL_PREPARE, "sql_prepare"),
    (LOAD, "load"),
];
pub const LISTEN: &str = "LISTEN";
pub const HOLD_CURSOR: &str = "WITH HOLD cursors";
pub const TEMP_TABLE: &str = "temporary tables";
pub const ADVISORY_LOCK: &str = "session advisory locks (pg_advisory_lock)";
pub const SQL_PREPARE: &str = "PREPARE in a multi-statement query";
pub const LOAD: &str = "LOAD";

/// Whether the server can tell that this reason's state is gone (LOAD and
/// a PREPARE hidden in a multi-statement query cannot be checked: those
/// pins last for the session).
pub fn ends(reason: &str) -> bool {
    !matches!(reason, SQL_PREPARE | LOAD)
}

fn index(reason: &str) -> usize {
    REASONS
        .iter()
        .position(|(r, _)| *r == reason)
        .unwrap_or(REASONS.len() - 1)
}

/// The pin table and its counters.
#[derive(Default)]
pub struct Pins {
    table: Mutex<HashMap<u64, (&'static str, SystemTime)>>,
    pinned: [AtomicU64; REASONS.len()],
    unpinned: [AtomicU64; REASONS.len()],
}

impl Pins {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (&'static str, SystemTime)>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Pins client `id` for `reason`.
    pub fn pin(self: &Arc<Self>, id: u64, reason: &'static str) -> Pin {
        self.pinned[index(reason)].fetch_add(1, Relaxed);
        self.lock().insert(id, (reason, SystemTime::now()));
        Pin {
            id,
            reason,
            pins: self.clone(),
        }
    }

    /// Why client `id` is pinned and since when, if it is.
    pub fn of(&self, id: u64) -> Option<(&'static str, SystemTime)> {
        self.lock().get(&id).copied()
    }

    /// Clients pinned now, by reason label.
    pub fn current(&self) -> [(&'static str, u64); REASONS.len()] {
        let mut out = REASONS.map(|(_, label)| (label, 0));
        for (reason, _) in self.lock().values() {
            out[index(reason)].1 += 1;
        }
        out
    }

    /// Pins and unpins so far, by reason label.
    pub fn totals(&self) -> Vec<(&'static str, u64, u64)> {
        REASONS
            .iter()
            .enumerate()
            .map(|(i, (_, label))| {
                (
                    *label,
                    self.pinned[i].load(Relaxed),
                    self.unpinned[i].load(Relaxed),
                )
            })
            .collect()
    }
}

/// A client's pin: the row in the table lives as long as this does.
pub struct Pin {
    id: u64,
    reason: &'static str,
    pins: Arc<Pins>,
}

impl Pin {
    pub fn reason(&self) -> &'static str {
        self.reason
    }

    /// The state that caused the pin is gone but another remains: the
    /// reason shown changes, the pin stays (and keeps its start).
    pub fn now_for(&mut self, reason: &'static str) {
        if reason != self.reason {
            self.reason = reason;
            if let Some(row) = self.pins.lock().get_mut(&self.id) {
                row.0 = reason;
            }
        }
    }

    /// The session state is gone: the client goes back to sharing servers
    /// (counted as an unpin; a pin merely dropped with its client or its
    /// server is not).
    pub fn release(self) {
        self.pins.unpinned[index(self.reason)].fetch_add(1, Relaxed);
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        self.pins.lock().remove(&self.id);
    }
}

impl std::fmt::Debug for Pin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pin")
            .field("id", &self.id)
            .field("reason", &self.reason)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pin_is_listed_while_it_lives_and_counted_once() {
        let pins = Arc::new(Pins::default());
        let mut p = pins.pin(7, HOLD_CURSOR);
        assert_eq!(pins.of(7).map(|r| r.0), Some(HOLD_CURSOR));
        p.now_for(TEMP_TABLE);
        assert_eq!(pins.of(7).map(|r| r.0), Some(TEMP_TABLE));
        p.release();
        assert_eq!(pins.of(7), None);
        let totals = pins.totals();
        assert_eq!(totals[1], ("with_hold_cursor", 1, 0));
        assert_eq!(totals[2], ("temp_table", 0, 1));
        // Dropped with its client: gone from the table, not an unpin.
        let p = pins.pin(8, LOAD);
        drop(p);
        assert_eq!(pins.of(8), None);
        assert_eq!(pins.totals()[5], ("load", 1, 0));
        assert!(pins.current().iter().all(|(_, n)| *n == 0));
    }

    #[test]
    fn unknown_reasons_and_ends() {
        assert!(ends(LISTEN) && ends(TEMP_TABLE) && ends(ADVISORY_LOCK) && ends(HOLD_CURSOR));
        assert!(!ends(LOAD) && !ends(SQL_PREPARE));
    }
}
