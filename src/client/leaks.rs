//! Leak detection: clients that hold a server without using it — idle in a
//! transaction, or pinned and idle — for longer than `leak_warn_after`.
//! Each such hold is reported once, by name (a warning log line, a row in
//! SHOW LEAKS, a counter); `idle_transaction_timeout` stays the way to end
//! them.
//!
//! Invariant: a row is in the table exactly while its [`LeakGuard`] lives:
//! the session drops it when the client sends something, or lets go of the
//! server, or leaves.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// One client holding a server unused.
#[derive(Debug, Clone)]
pub struct Leak {
    pub client: u64,
    pub user: String,
    pub database: String,
    pub application_name: String,
    pub addr: String,
    /// `idle in transaction`, `idle in transaction (aborted)`, or
    /// `pinned idle (<reason>)`.
    pub state: String,
    /// When the client last sent something (the hold began).
    pub since: SystemTime,
    /// The fingerprint of its last statement, if statistics saw one.
    pub fingerprint: Option<u64>,
}

#[derive(Default)]
pub struct Leaks {
    table: Mutex<BTreeMap<u64, Leak>>,
    /// Holds reported so far.
    pub reported: AtomicU64,
}

impl Leaks {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Leak>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reports `leak`: logged once, listed while the guard lives.
    pub fn report(self: &Arc<Self>, leak: Leak) -> LeakGuard {
        let held = leak.since.elapsed().unwrap_or_default();
        tracing::warn!(
            client = leak.client,
            user = %leak.user,
            database = %leak.database,
            application_name = %leak.application_name,
            client_addr = %leak.addr,
            state = %leak.state,
            held_s = held.as_secs_f64(),
            fingerprint = %leak.fingerprint.map(|f| format!("{f:016x}")).unwrap_or_default(),
            "client holds a server without using it (leak_warn_after); idle_transaction_timeout ends such holds"
        );
        self.reported.fetch_add(1, Relaxed);
        let client = leak.client;
        self.lock().insert(client, leak);
        LeakGuard {
            client,
            leaks: self.clone(),
        }
    }

    /// Holds reported and still going.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The holds reported and still going, by client id.
    pub fn rows(&self) -> Vec<Leak> {
        self.lock().values().cloned().collect()
    }
}

/// A reported hold: its row goes when this does.
pub struct LeakGuard {
    client: u64,
    leaks: Arc<Leaks>,
}

impl Drop for LeakGuard {
    fn drop(&mut self) {
        self.leaks.lock().remove(&self.client);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leak_is_listed_while_its_guard_lives_and_counted_once() {
        let leaks = Arc::new(Leaks::default());
        let leak = Leak {
            client: 3,
            user: "u".into(),
            database: "d".into(),
            application_name: "app".into(),
            addr: "127.0.0.1:1".into(),
            state: "idle in transaction".into(),
            since: SystemTime::now(),
            fingerprint: Some(7),
        };
        let g = leaks.report(leak);
        assert_eq!(leaks.rows().len(), 1);
        drop(g);
        assert!(leaks.rows().is_empty());
        assert_eq!(leaks.reported.load(Relaxed), 1);
    }
}
