//! One reading of the live state that both the admin console (`SHOW`) and
//! `/metrics` render: the clients' rows, the per-backend traffic totals
//! (every configured backend included, even before its first transaction),
//! and what the clients of each pool are doing.
//!
//! Invariant: counts here are derived from the structures that hold the
//! items (the client list, the stats registry) at the moment of reading;
//! nothing is kept beside them.

use std::collections::HashMap;
use std::sync::Arc;

use crate::client::Shared;
use crate::client::list::{ClientRow, ClientState};
use crate::stats::{Averages, Totals, Traffic};

/// Traffic of one (database, backend): its totals and averages as read
/// now, and its counters (for what only some renderings need, latency
/// histograms).
#[derive(Clone)]
pub struct TrafficRow {
    pub database: String,
    pub backend: usize,
    pub totals: Totals,
    pub averages: Averages,
    pub counters: Arc<Traffic>,
}

/// What a pool's clients are doing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolClients {
    /// Logged-in clients not waiting (idle ones count on the primary).
    pub active: u64,
    pub waiting: u64,
    /// The longest wait now, in µs.
    pub max_wait_us: u64,
}

/// Every configured backend's traffic, in the registry's order.
pub fn traffic(shared: &Shared) -> Vec<TrafficRow> {
    let settings = shared.settings();
    for (name, db) in &settings.config.databases {
        for b in 0..=db.replicas.len() {
            shared.stats.traffic(name, b);
        }
    }
    shared
        .stats
        .traffic_rows()
        .into_iter()
        .map(|((database, backend), t)| TrafficRow {
            database,
            backend,
            totals: t.totals(),
            averages: t.averages(),
            counters: t,
        })
        .collect()
}

/// Every logged-in client's row.
pub fn clients(shared: &Shared) -> Vec<ClientRow> {
    shared.list.all().iter().map(|c| c.row()).collect()
}

/// Clients per pool, keyed by (database, user, backend).
pub fn pool_clients(rows: &[ClientRow]) -> HashMap<(String, String, usize), PoolClients> {
    let mut m: HashMap<(String, String, usize), PoolClients> = HashMap::new();
    for c in rows {
        let backend = if c.state == ClientState::Idle {
            0
        } else {
            c.backend
        };
        let e = m
            .entry((c.database.clone(), c.user.clone(), backend))
            .or_default();
        if c.state == ClientState::Waiting {
            e.waiting += 1;
            e.max_wait_us = e.max_wait_us.max(c.wait_us);
        } else {
            e.active += 1;
        }
    }
    m
}
