//! Bounded pools of server connections, one per (database, user).
//!
//! Owns: idle server connections, the permits that bound how many exist, the
//! fair (FIFO) queue of clients waiting for one, warm-up and idle pruning.
//!
//! Invariants: at most `pool_size` connections exist per pool (a permit is
//! held while a connection is checked out or being created; a new connection
//! is only opened when no idle one is left). A `PooledConn` dropped without
//! `release` closes its connection. Locks are never held across `.await`.

mod checkout;
mod maintain;
mod registry;

pub use checkout::{PooledConn, Release};
pub use registry::{BackendIndex, Registry};

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::auth::server::Credentials;
use crate::config::PoolMode;
use crate::server::{ConnectSpec, ServerConn, ServerError};

/// Limits and timeouts of one pool, resolved from the config.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub mode: PoolMode,
    pub size: u32,
    pub min_size: u32,
    pub query_wait_timeout: Duration,
    pub server_idle_timeout: Duration,
    pub server_lifetime: Duration,
    pub server_reset_query: String,
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("timed out after {0:?} waiting for a server connection")]
    Timeout(Duration),
    #[error(transparent)]
    Connect(#[from] ServerError),
}

/// An idle connection and the database-wide permit it holds.
struct Idle {
    conn: ServerConn,
    _db_permit: Option<OwnedSemaphorePermit>,
}

pub struct Pool {
    pub database: String,
    pub user: String,
    pub settings: PoolSettings,
    spec: Mutex<ConnectSpec>,
    idle: Mutex<Vec<Idle>>,
    permits: Arc<Semaphore>,
    db_permits: Option<Arc<Semaphore>>,
    in_use: AtomicUsize,
    awaiting_keys: bool,
    defaults: Mutex<Option<Arc<BTreeMap<String, String>>>>,
    /// Statements some server of this pool has parsed without error.
    known_statements: Mutex<std::collections::HashSet<u64>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Pool {
    pub fn new(
        database: String,
        user: String,
        settings: PoolSettings,
        spec: ConnectSpec,
        db_permits: Option<Arc<Semaphore>>,
        awaiting_keys: bool,
    ) -> Arc<Self> {
        Arc::new(Self {
            permits: Arc::new(Semaphore::new(settings.size as usize)),
            database,
            user,
            settings,
            spec: Mutex::new(spec),
            idle: Mutex::new(Vec::new()),
            db_permits,
            in_use: AtomicUsize::new(0),
            awaiting_keys,
            defaults: Mutex::new(None),
            known_statements: Mutex::new(std::collections::HashSet::new()),
        })
    }

    /// Server connections that exist now (idle plus checked out).
    pub fn server_count(&self) -> usize {
        lock(&self.idle).len() + self.in_use.load(Ordering::Relaxed)
    }

    pub fn idle_count(&self) -> usize {
        lock(&self.idle).len()
    }

    /// Supplies credentials learned from a client login (SCRAM passthrough).
    pub fn offer_credentials(&self, creds: Credentials) {
        let mut spec = lock(&self.spec);
        if matches!(spec.creds, Credentials::None) {
            spec.creds = creds;
        }
    }

    /// False while the pool waits for a client's SCRAM login to learn the
    /// keys it needs (verifier passthrough); warm-up waits for that too.
    fn can_log_in(&self) -> bool {
        !self.awaiting_keys || !matches!(lock(&self.spec).creds, Credentials::None)
    }

    /// The parameters a fresh server connection reports, learned from the
    /// first connection this pool opened.
    pub fn defaults(&self) -> Option<Arc<BTreeMap<String, String>>> {
        lock(&self.defaults).clone()
    }

    async fn open(&self) -> Result<Idle, PoolError> {
        let db_permit = match &self.db_permits {
            Some(s) => match tokio::time::timeout(
                self.settings.query_wait_timeout_or_max(),
                s.clone().acquire_owned(),
            )
            .await
            {
                Ok(Ok(p)) => Some(p),
                _ => return Err(PoolError::Timeout(self.settings.query_wait_timeout)),
            },
            None => None,
        };
        let spec = lock(&self.spec).clone();
        let conn = crate::server::connect(&spec).await?;
        {
            let mut d = lock(&self.defaults);
            if d.is_none() {
                *d = Some(Arc::new(conn.params.clone()));
            }
        }
        tracing::debug!(pool = %self.name(), server = conn.id, pid = conn.cancel_key.pid, "server connection opened");
        Ok(Idle {
            conn,
            _db_permit: db_permit,
        })
    }

    /// Records statements a server parsed successfully.
    pub fn confirm_statements(&self, hashes: &[u64]) {
        if !hashes.is_empty() {
            lock(&self.known_statements).extend(hashes.iter().copied());
        }
    }

    /// Whether a statement is known to parse on this pool's servers.
    pub fn knows_statement(&self, hash: u64) -> bool {
        lock(&self.known_statements).contains(&hash)
    }

    pub fn name(&self) -> String {
        format!("{}/{}", self.database, self.user)
    }
}

impl PoolSettings {
    /// `query_wait_timeout`, where 0 means "wait forever".
    pub fn query_wait_timeout_or_max(&self) -> Duration {
        if self.query_wait_timeout.is_zero() {
            Duration::from_secs(60 * 60 * 24 * 365)
        } else {
            self.query_wait_timeout
        }
    }
}
