//! Bounded pools of server connections, one per (database, user).
//!
//! Owns: idle server connections, the permits that bound how many exist, the
//! fair (FIFO) queue of clients waiting for one (all three under one lock,
//! see `checkout`), warm-up and idle pruning.
//!
//! Invariants: at most `pool_size` connections exist per pool (a permit is
//! held while a connection is checked out or being created; a new connection
//! is only opened when no idle one is left). A `PooledConn` dropped without
//! `release` closes its connection. Locks are never held across `.await`.

mod caps;
mod catalog;
mod checkout;
mod maintain;
mod registry;
mod retire;

pub use caps::Cap;
pub use catalog::Catalog;
pub use checkout::{PooledConn, Release, Waiter};
pub use registry::{BackendIndex, DbControl, Registry, health_credentials, health_warnings};
pub use retire::Retirement;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use checkout::Core;
use tokio::sync::OwnedSemaphorePermit;

use crate::auth::server::Credentials;
use crate::config::PoolMode;
use crate::server::{ConnectSpec, ServerConn, ServerError};

/// Limits and timeouts of one pool, resolved from the config. A reload may
/// replace them while the pool runs.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolSettings {
    pub mode: PoolMode,
    pub size: u32,
    pub min_size: u32,
    /// Reserve connections, for clients that waited `reserve_pool_timeout`.
    pub reserve_size: u32,
    pub query_wait_timeout: Duration,
    pub server_idle_timeout: Duration,
    pub server_lifetime: Duration,
    pub server_reset_query: String,
    /// Idle this long, a connection is checked before it serves.
    pub server_check_delay: Duration,
    pub server_check_query: String,
    /// How long the check may take (`server_connect_timeout`).
    pub server_check_timeout: Duration,
    /// Statements slower than this are slow.
    pub slow_query_threshold: Duration,
}

/// Parameter sets a pool remembers for sharing.
const INTERNED: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("timed out after {0:?} waiting for a server connection")]
    Timeout(Duration),
    /// Boxed: a checkout's result is moved through every client task's
    /// state on each transaction, and the rare error should not size it.
    #[error(transparent)]
    Connect(Box<ServerError>),
}

impl From<ServerError> for PoolError {
    fn from(e: ServerError) -> Self {
        PoolError::Connect(Box::new(e))
    }
}

/// An idle connection and the database-wide permit it holds.
struct Idle {
    /// Boxed: a checked-out connection then costs its client's task one
    /// pointer, not the whole connection state.
    conn: Box<ServerConn>,
    /// Permits of the caps this connection counts under (database, user).
    _permits: Vec<OwnedSemaphorePermit>,
}

/// One more in a gauge while it lives (a connection being opened or
/// tested), one less when dropped, however the work ends.
pub(crate) struct Counted<'a>(&'a AtomicUsize);

impl<'a> Counted<'a> {
    pub(crate) fn new(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::Relaxed);
        Counted(n)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Which pool: clients' database and user, and the backend (0 = primary,
/// `i + 1` = replica `i`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PoolKey {
    pub database: String,
    pub user: String,
    pub backend: usize,
}

pub struct Pool {
    pub database: String,
    pub user: String,
    pub backend: usize,
    settings: ArcSwap<PoolSettings>,
    /// The settings the hot path reads, as plain atomics.
    pub hot: HotSettings,
    spec: Mutex<ConnectSpec>,
    /// Idle connections, permits and waiting checkouts.
    core: Mutex<Core>,
    /// Caps this pool's connections count under: `max_db_connections`
    /// (this database and backend), `max_user_connections` (this user).
    caps: [Arc<Cap>; 2],
    in_use: AtomicUsize,
    /// Connections being opened.
    opening: AtomicUsize,
    /// Connections running `server_check_query` before they serve.
    testing: AtomicUsize,
    /// A connection went back to the idle list: checkouts waiting on a cap
    /// (`open`) take it instead of a new one.
    idle_ready: tokio::sync::Notify,
    /// Whether a reload took this pool out of the registry, and why
    /// ([`Retirement`] as its `u8`).
    retired: std::sync::atomic::AtomicU8,
    pub traffic: Arc<crate::stats::Traffic>,
    servers: Arc<crate::server::list::ServerList>,
    /// `host:port` of the backend, for statistics and logs.
    pub addr: Arc<str>,
    awaiting_keys: bool,
    defaults: Mutex<Option<Arc<BTreeMap<String, String>>>>,
    /// Recently seen client parameter sets (see [`Pool::intern`]).
    interned: Mutex<Vec<Arc<BTreeMap<String, String>>>>,
    /// Statements some server of this pool has parsed without error.
    known_statements: Mutex<std::collections::HashSet<u64>>,
    /// Startup parameter values as clients wrote them → PostgreSQL's own
    /// spelling (learnt from a server once per distinct value; bounded).
    canonical: Mutex<std::collections::HashMap<(String, String), String>>,
    /// The database's statement generations (see [`Catalog`]).
    pub catalog: Arc<Catalog>,
    /// The server's `max_connections` (0: not read yet), for sizing advice.
    pub max_connections: std::sync::atomic::AtomicU32,
    /// Until when (coarse monotonic µs; 0: never seen) this pool's
    /// clients' transactions are known to be serializable by default on the
    /// replicas, which refuse them: they run on the primary meanwhile.
    serializable_until: AtomicU64,
    /// Why the last attempt to open a connection failed, while no attempt
    /// has succeeded since (for SHOW DATABASES and SHOW POOLS).
    connect_failure: Mutex<Option<ConnectFailure>>,
}

/// Why a pool's last attempt to open a server connection failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectFailure {
    /// The server answered and refused this pool's login (its user's
    /// password, its role, its database): the pool's problem, not the
    /// server's, which other pools still reach.
    pub login_refused: bool,
    pub message: String,
}

impl std::fmt::Display for ConnectFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = if self.login_refused {
            "login refused"
        } else {
            "unreachable"
        };
        write!(f, "{kind}: {}", self.message)
    }
}

/// How long a replica's refusal of a user's serializable default is
/// trusted: a role default removed since is seen within this time.
const SERIALIZABLE_FOR_US: u64 = 60_000_000;

/// The few settings read on every transaction (checkout, forwarding,
/// release), kept beside the `ArcSwap` so that reading them costs a plain
/// load. Written only by [`Pool::new`] and [`Pool::update`].
#[derive(Debug, Default)]
pub struct HotSettings {
    size: AtomicUsize,
    server_lifetime_ms: AtomicU64,
    slow_query_us: AtomicU64,
    query_wait_timeout_ms: AtomicU64,
    /// `server_check_delay` in microseconds (compared with `last_used`).
    server_check_delay_us: AtomicU64,
    session_mode: AtomicBool,
}

impl HotSettings {
    fn set(&self, s: &PoolSettings) {
        self.size.store(s.size as usize, Ordering::Relaxed);
        self.server_lifetime_ms
            .store(s.server_lifetime.as_millis() as u64, Ordering::Relaxed);
        self.slow_query_us
            .store(s.slow_query_threshold.as_micros() as u64, Ordering::Relaxed);
        self.session_mode
            .store(s.mode == PoolMode::Session, Ordering::Relaxed);
        self.query_wait_timeout_ms
            .store(s.query_wait_timeout.as_millis() as u64, Ordering::Relaxed);
        self.server_check_delay_us
            .store(s.server_check_delay.as_micros() as u64, Ordering::Relaxed);
    }

    /// `server_check_delay` in microseconds.
    pub fn server_check_delay_us(&self) -> u64 {
        self.server_check_delay_us.load(Ordering::Relaxed)
    }

    /// `query_wait_timeout` (zero: wait forever).
    pub fn query_wait_timeout(&self) -> Duration {
        Duration::from_millis(self.query_wait_timeout_ms.load(Ordering::Relaxed))
    }

    pub fn size(&self) -> usize {
        self.size.load(Ordering::Relaxed)
    }

    pub fn server_lifetime(&self) -> Duration {
        Duration::from_millis(self.server_lifetime_ms.load(Ordering::Relaxed))
    }

    /// `slow_query_threshold` in microseconds.
    pub fn slow_query_us(&self) -> u64 {
        self.slow_query_us.load(Ordering::Relaxed)
    }

    pub fn mode(&self) -> PoolMode {
        if self.session_mode.load(Ordering::Relaxed) {
            PoolMode::Session
        } else {
            PoolMode::Transaction
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Closes up to `n` idle connections, the last ones in the idle list (as
/// popped), for a smaller pool or a lowered cap.
fn close_last_idle(core: &mut Core, n: usize) {
    let keep = core.idle.len().saturating_sub(n);
    for i in core.idle.drain(keep..) {
        tokio::spawn(i.conn.terminate());
    }
}

impl caps::IdleHolder for Pool {
    fn close_one_idle(&self) -> bool {
        let mut core = lock(&self.core);
        if core.idle.is_empty() {
            return false;
        }
        // The least recently used: idle connections are taken from the end.
        let idle = core.idle.remove(0);
        tracing::debug!(pool = %self.name(), server = idle.conn.id, "closing an idle server connection for another pool under a full cap");
        tokio::spawn(idle.conn.terminate());
        true
    }
}

/// What a pool is made from (besides its settings).
pub struct PoolParts {
    pub key: PoolKey,
    pub spec: ConnectSpec,
    pub caps: [Arc<Cap>; 2],
    pub awaiting_keys: bool,
    pub traffic: Arc<crate::stats::Traffic>,
    pub servers: Arc<crate::server::list::ServerList>,
    /// The database's statement generations, shared by all its pools.
    pub catalog: Arc<Catalog>,
}

impl Pool {
    pub fn new(parts: PoolParts, settings: PoolSettings) -> Arc<Self> {
        let PoolParts {
            key,
            spec,
            caps,
            awaiting_keys,
            traffic,
            servers,
            catalog,
        } = parts;
        let hot = HotSettings::default();
        hot.set(&settings);
        Arc::new(Self {
            addr: format!("{}:{}", spec.host, spec.port).into(),
            core: Mutex::new(Core::new(settings.size as usize)),
            database: key.database,
            user: key.user,
            backend: key.backend,
            settings: ArcSwap::from_pointee(settings),
            hot,
            spec: Mutex::new(spec),
            caps,
            in_use: AtomicUsize::new(0),
            opening: AtomicUsize::new(0),
            testing: AtomicUsize::new(0),
            idle_ready: tokio::sync::Notify::new(),
            retired: std::sync::atomic::AtomicU8::new(Retirement::Serving as u8),
            traffic,
            servers,
            awaiting_keys,
            defaults: Mutex::new(None),
            known_statements: Mutex::new(std::collections::HashSet::new()),
            canonical: Mutex::new(std::collections::HashMap::new()),
            max_connections: Default::default(),
            serializable_until: AtomicU64::new(0),
            connect_failure: Mutex::new(None),
            catalog,
            interned: Mutex::new(Vec::new()),
        })
    }

    /// The current settings (a reload may replace them).
    /// How this pool connects (for a connection of tidepool's own outside
    /// the pool, such as the LISTEN connection).
    pub fn connect_spec(&self) -> ConnectSpec {
        lock(&self.spec).clone()
    }

    /// Reads the server's `max_connections` once, on a short connection of
    /// its own (not one of the pool's: a saturated pool must not hide it).
    pub async fn learn_max_connections(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        if self.max_connections.load(Relaxed) != 0 {
            return;
        }
        let spec = self.connect_spec();
        let Ok(mut conn) = crate::server::connect(&spec).await else {
            return;
        };
        if let Ok(n) = conn.setting("max_connections").await
            && let Ok(n) = n.parse::<u32>()
        {
            self.max_connections.store(n, Relaxed);
        }
        conn.terminate().await;
    }

    pub fn settings(&self) -> arc_swap::Guard<Arc<PoolSettings>> {
        self.settings.load()
    }

    /// Server connections that exist now (idle plus checked out).
    pub fn server_count(&self) -> usize {
        lock(&self.core).idle.len() + self.in_use.load(Ordering::Relaxed)
    }

    pub fn idle_count(&self) -> usize {
        lock(&self.core).idle.len()
    }

    pub fn active_count(&self) -> usize {
        self.in_use.load(Ordering::Relaxed)
    }

    pub fn opening_count(&self) -> usize {
        self.opening.load(Ordering::Relaxed)
    }

    /// Idle connections as (ready, due for a check): those unused for
    /// `server_check_delay` are PgBouncer's `sv_used`.
    pub fn idle_split(&self) -> (usize, usize) {
        let core = lock(&self.core);
        let due = core.idle.iter().filter(|i| self.due_for_check(i)).count();
        (core.idle.len() - due, due)
    }

    /// Connections running `server_check_query` now (`sv_tested`).
    pub fn testing_count(&self) -> usize {
        self.testing.load(Ordering::Relaxed)
    }

    /// Closes every idle connection (PAUSE, KILL, retirement).
    pub fn close_idle(&self) {
        let idle: Vec<Idle> = std::mem::take(&mut lock(&self.core).idle);
        for i in idle {
            tokio::spawn(i.conn.terminate());
        }
    }

    /// Applies new settings from a reload. A smaller size takes effect at
    /// once for idle connections and permits, and as busy connections come
    /// back for the rest.
    pub fn update(&self, new: PoolSettings, creds: Option<Credentials>) {
        let old = self.settings.load_full();
        if let Some(c) = creds {
            lock(&self.spec).creds = c;
        }
        if *old == new {
            return;
        }
        let (from, to) = (old.size, new.size);
        self.hot.set(&new);
        self.settings.store(Arc::new(new));
        if to != from {
            self.resize(from, to);
        }
        if to < from {
            self.trim_idle();
        }
        tracing::info!(pool = %self.name(), from, to, "pool settings reloaded");
    }

    /// Connections beyond what a cap this pool counts under allows now (a
    /// reload lowered `max_db_connections` or `max_user_connections`).
    pub(crate) fn caps_excess(&self) -> usize {
        self.caps.iter().map(|c| c.excess()).max().unwrap_or(0)
    }

    /// Closes idle connections while a cap is over its size (busy ones
    /// close as they come back, see `checkout`).
    pub fn shed_excess(&self) {
        let n = self.caps_excess();
        if n > 0 {
            close_last_idle(&mut lock(&self.core), n);
        }
    }

    /// Closes idle connections beyond the pool size.
    fn trim_idle(&self) {
        let size = self.hot.size();
        let in_use = self.in_use.load(Ordering::Relaxed);
        let mut core = lock(&self.core);
        let over = (core.idle.len() + in_use).saturating_sub(size);
        close_last_idle(&mut core, over);
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

    /// PostgreSQL's spelling of `value` for parameter `name`, if learnt.
    pub fn canonical_value(&self, name: &str, value: &str) -> Option<String> {
        lock(&self.canonical)
            .get(&(name.to_owned(), value.to_owned()))
            .cloned()
    }

    /// Remembers spellings learnt from a server.
    pub fn learn_canonical(&self, learnt: impl IntoIterator<Item = ((String, String), String)>) {
        let mut map = lock(&self.canonical);
        if map.len() > 4096 {
            // Only a cache: distinct startup values are few in practice.
            map.clear();
        }
        map.extend(learnt);
    }

    /// Whether every connection cap this pool counts against has room now
    /// (a hint: a checkout may take it first).
    pub(super) fn caps_have_room(&self) -> bool {
        self.caps.iter().all(|c| c.has_room())
    }

    async fn open(&self) -> Result<Idle, PoolError> {
        let (wait, timeout) = {
            let s = self.settings();
            (s.query_wait_timeout_or_max(), s.query_wait_timeout)
        };
        let deadline = tokio::time::Instant::now() + wait;
        let mut permits = Vec::with_capacity(self.caps.len());
        for cap in &self.caps {
            if let Some(p) = cap.try_acquire() {
                permits.push(p);
                continue;
            }
            // While a cap is full, a connection of this pool that comes back
            // serves this checkout instead (it holds its own permits).
            let starved = cap.starve();
            loop {
                let notified = self.idle_ready.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                // Another pool's connection coming back idle may be evicted.
                let elsewhere = starved.idle_ready();
                tokio::pin!(elsewhere);
                elsewhere.as_mut().enable();
                if let Some(idle) = self.pop_idle(&mut lock(&self.core)) {
                    return Ok(idle);
                }
                // Another pool's idle connection under the cap makes room.
                if cap.evict_idle(self as *const Pool as *const ())
                    && let Some(p) = cap.try_acquire()
                {
                    permits.push(p);
                    break;
                }
                tokio::select! {
                    p = cap.acquire() => match p {
                        Some(p) => {
                            permits.push(p);
                            break;
                        }
                        None => return Err(PoolError::Timeout(timeout)),
                    },
                    _ = &mut notified => {}
                    _ = &mut elsewhere => {}
                    _ = tokio::time::sleep_until(deadline) => return Err(PoolError::Timeout(timeout)),
                }
            }
        }
        let spec = lock(&self.spec).clone();
        let conn = {
            // Counted while it lasts, also when the checkout is abandoned.
            let _opening = Counted::new(&self.opening);
            crate::server::connect(&spec).await
        };
        let mut conn = match conn {
            Ok(c) => {
                *lock(&self.connect_failure) = None;
                c
            }
            Err(e) => {
                let login_refused = matches!(
                    e,
                    crate::server::ServerError::Login(crate::auth::AuthError::Server(_))
                        | crate::server::ServerError::Query(_)
                );
                *lock(&self.connect_failure) = Some(ConnectFailure {
                    login_refused,
                    message: e.to_string(),
                });
                return Err(e.into());
            }
        };
        if self.backend > 0 {
            // A replica's: a default this connection's transactions cannot
            // run under there (SHOW takes no snapshot: it answers even so).
            conn.serializable_default = conn
                .setting("default_transaction_isolation")
                .await
                .is_ok_and(|v| v == "serializable");
        }
        let local = conn.stream.local_addr().ok();
        conn.listed = Some(
            self.servers.add(
                crate::server::list::ServerInfo::new(
                    conn.id,
                    &self.database,
                    self.backend,
                    &self.user,
                    local,
                    conn.cancel_key.clone(),
                )
                .with_tls(conn.stream.tls_summary()),
            ),
        );
        {
            let mut d = lock(&self.defaults);
            if d.is_none() {
                *d = Some(Arc::new(conn.params.clone()));
            }
        }
        tracing::debug!(pool = %self.name(), server = conn.id, pid = conn.cancel_key.pid, "server connection opened");
        Ok(Idle {
            conn: Box::new(conn),
            _permits: permits,
        })
    }

    /// A shared copy of `params`: clients of this pool with the same
    /// parameters share one map (less memory per client, and a checkout can
    /// see by pointer that a server already has them).
    pub fn intern(&self, params: BTreeMap<String, String>) -> Arc<BTreeMap<String, String>> {
        let mut seen = lock(&self.interned);
        if let Some(p) = seen.iter().find(|p| ***p == params) {
            return p.clone();
        }
        let p = Arc::new(params);
        if seen.len() >= INTERNED {
            seen.remove(0);
        }
        seen.push(p.clone());
        p
    }

    /// A replica refused this pool's clients' transactions as serializable
    /// (their role's or database's default): they run on the primary for
    /// a while. Told once per while in the log.
    pub fn replicas_refuse_serializable(&self) {
        let now = crate::clock::coarse_mono_us();
        let before = self
            .serializable_until
            .swap(now + SERIALIZABLE_FOR_US, Ordering::Relaxed);
        if before <= now {
            tracing::warn!(pool = %self.name(), "this user's transactions are serializable by default (default_transaction_isolation), which a hot standby refuses (0A000): its reads run on the primary");
        }
    }

    /// Whether this pool's clients' transactions must run on the primary
    /// (see [`Pool::replicas_refuse_serializable`]).
    pub fn serializable_on_replicas(&self) -> bool {
        let until = self.serializable_until.load(Ordering::Relaxed);
        until != 0 && crate::clock::coarse_mono_us() < until
    }

    /// Why this pool's last attempt to open a server connection failed, if
    /// none succeeded since.
    pub fn connect_failure(&self) -> Option<ConnectFailure> {
        lock(&self.connect_failure).clone()
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
