//! The logged-in client's main loop: wait for work without a server, check
//! one out, bring its parameters to the client's, forward both directions as
//! whole buffers until the transaction ends, release (or clean up), repeat.
//!
//! One file per phase: `idle` (waiting without a server, answers that need
//! none), `route` (which backend, checkout), `params` (parameter sync),
//! `forward` (the I/O loop of one transaction), `cleanup` (ends that are not
//! a clean release), `parking` (giving the task up while idle); `record` and
//! `rename` serve forwarding. This file holds the session's state and the
//! phase loop (`run`).
//!
//! Invariants: the session holds a server only inside `run`'s transaction
//! step, and gives it back on every path (`Release`); a transaction starts
//! only once its first message is whole.

mod ahead;
mod cleanup;
mod deferred;
mod forward;
mod idle;
mod listen;
mod moved;
mod params;
mod parking;
mod pin;
mod record;
mod rename;
mod route;
mod scans;

use forward::poll_read_into;
use idle::{first_statement, reserve_head};
pub use moved::adopt;
pub use parking::Parked;
use record::StatementCtx;
use rename::rewrite_error;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::{Buf, BufMut, BytesMut};
use tokio::net::TcpStream;

use crate::protocol::stream::Stream;

use super::list::{Eviction, Listed};
use super::prepared::{Handler, apply_undos};
use super::startup::{LoggedIn, pool_error};
use super::txn::{Policy, Tracker};
use super::{Settings, Shared};
use crate::cancel::{CancelHandle, send_cancel};
use crate::config::PoolMode;
use crate::error::ClientError;
use crate::health::Health;
use crate::pool::{DbControl, Pool, PooledConn, Release, Waiter};
use crate::protocol::scan::{Scanner, checked_len, frontend_len};
use crate::protocol::{FrontendTag, ProtocolError, TxStatus, write};
use crate::router::Class;
use crate::router::policy::Route;
use crate::server::ServerError;
use crate::server::params::{canonical, is_tracked, sync_sql};
use crate::server::prepared::{ServerStatements, Statement};
use crate::stats::{Counters, Fingerprints, Role, SlowQuery};
use crate::watchdog::{self, Phase};

/// Read buffers start this small and double (up to steps of
/// [`READ_CHUNK`]) when a read would find less than [`READ_ROOM`] free.
/// 896, not 1,024: the allocator keeps 1 KiB objects four to a 4 KiB slab
/// and 896-byte ones 32 to a 28 KiB slab, and each slab costs it a record
/// that it keeps after the slab is gone; a burst of 10,000 logins (each
/// idle client holds its buffer until it parks) left ~30 bytes of such
/// records per client with 1 KiB buffers.
const READ_START: usize = 896;
const READ_CHUNK: usize = 16 * 1024;
const READ_ROOM: usize = 256;
/// Largest read buffer a client keeps between transactions (reused in place
/// while it is active; a parked client holds none, and neither does an idle
/// one when parking is off). Most clients' requests fit [`READ_START`]: an
/// idle client waiting to park then holds 896 bytes, not the most it ever
/// needed.
const IDLE_KEEP: usize = 4 * 1024;
/// Server messages can be as large as PostgreSQL allows (1 GiB fields).
const SERVER_MESSAGE_LIMIT: usize = (1 << 30) + 64;
/// How long a ROLLBACK on behalf of a vanished client may take.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a closing client gets to take its last error.
const FATAL_WRITE: Duration = Duration::from_secs(5);

/// A session's parameters (shared, copy on write).
type ParamSet = Arc<BTreeMap<String, String>>;

pub struct Session {
    stream: Stream,
    buf: BytesMut,
    out: BytesMut,
    shared: Arc<Shared>,
    /// The config this client runs under; refreshed after a reload.
    settings: Arc<Settings>,
    generation: u64,
    /// This client's share of `max_client_buffer_bytes` (see
    /// `client::budget`).
    charge: super::budget::Charge,
    /// The rate limiters this client's transactions pass (its user's, its
    /// database's); empty for most.
    limiters: Vec<Arc<crate::ratelimit::Limiter>>,
    /// This client in the client list (SHOW CLIENTS, KILL, shutdown).
    listed: Listed,
    /// PAUSE/RESUME of this client's database.
    control: Arc<DbControl>,
    /// The database name, shared with per-query statistics.
    db_label: Arc<str>,
    pool: Arc<Pool>,
    /// Session parameters as the client sees them; shared (copy on write)
    /// between clients whose parameters are the same.
    params: Arc<BTreeMap<String, String>>,
    /// What routing and statement sharing read of `params`, for that very
    /// parameter set (held, so its address cannot be reused): read again
    /// only when the parameters changed (see `route::ParamFacts`).
    param_facts: Option<(ParamSet, route::ParamFacts)>,
    cancel: CancelHandle,
    /// An error owed to the client's next request (server lost while idle in
    /// a transaction, or no server could be had).
    owe_error: Option<ClientError>,
    /// After an error inside an extended-query batch: drop until Sync.
    skip_until_sync: bool,
    /// Bytes of a dropped message still to be read and thrown away.
    discard: usize,
    limit: usize,
    database: String,
    user: String,
    /// This client's named prepared statements.
    statements: HashMap<String, Arc<Statement>>,
    policy: Policy,
    /// Set while session state (a held cursor, a temp table, ...) ties
    /// the client to its server.
    pinned: Option<crate::client::pins::Pin>,
    /// Shared LISTEN: this client's place in its database's hub, once it
    /// listened.
    listen: Option<crate::client::listen::Membership>,
    /// Startup-packet parameters: what RESET goes back to.
    startup: Arc<BTreeMap<String, String>>,
    client_key: Option<[u8; 32]>,
    /// The secret auth_query found (a user not in the config).
    fetched_secret: Option<Arc<crate::auth::secret::Secret>>,
    /// Replica health of this database (None without replicas).
    health: Option<Arc<Health>>,
    /// Pools of the replicas, by replica index, made on first use.
    replica_pools: Vec<Option<Arc<Pool>>>,
    /// When this client last finished a transaction that may have written
    /// (nanos in `health`'s clock), for read-your-writes.
    last_write: Option<u64>,
    /// The request at the head of the buffer is a read a replica lost
    /// (it went away under it): it runs on the primary, once.
    replayed: bool,
    /// A transaction tidepool began for the client without a server (see
    /// `deferred`).
    deferred: Option<deferred::Deferred>,
    /// Custom (dotted) parameters this client has touched.
    custom_params: std::collections::BTreeSet<String>,
    /// What a fresh server of this pool reports (fixed after login).
    defaults: Arc<BTreeMap<String, String>>,
    /// The statements it sent lately (lent to each transaction's tracker).
    memo: crate::client::memo::Memo,
    /// This client's mailbox while it waits for a server.
    waiter: Arc<Waiter>,
    /// The totals of its application_name.
    app: Arc<crate::client::apps::Counts>,
    /// How long the last checkout waited for a server (µs), for the span
    /// of the transaction it served.
    pool_wait_us: u64,
}

enum Next {
    Transaction,
    Exit,
    /// Asked to park, and nothing stands in the way.
    Park,
    /// Asked to move to the process that took over, and it can.
    Move,
}

/// How forwarding ended.
enum TxEnd {
    /// The server is idle and clean; give it back.
    Done,
    /// A transaction is over on the server of a pinned client whose
    /// session state may be gone: ask the server, then give it back or
    /// forward on.
    PinCheck,
    /// The client went away (or sent Terminate) with the server in this state.
    ClientGone { mid_message: bool },
    /// The server connection failed. `client_skip` bytes of a client message
    /// that was being streamed to it are still to come and must be dropped.
    ServerLost { reason: String, client_skip: usize },
    /// The server ended the session with this FATAL ErrorResponse.
    ServerFatal { reason: String, fatal: BytesMut },
    /// The client broke the protocol or timed out: tell it and close.
    ClientFatal(ClientError),
    /// KILL: the client's connection ends now.
    Killed,
    /// The replica refused the read as a write (25006), or went away,
    /// before anything of its answer reached the client: these client
    /// bytes run again, on the primary.
    Misrouted {
        replay: BytesMut,
        /// The replica refused it (25006, 0A000); else it went away (its
        /// server is dead).
        refused: bool,
    },
}

impl Session {
    pub fn new(stream: Stream, shared: Arc<Shared>, l: LoggedIn, listed: Listed) -> Self {
        let pool_defaults = l.pool.defaults().unwrap_or_default();
        let settings = shared.settings();
        let generation = shared.registry.generation();
        listed
            .info
            .set_application_name(l.params.get("application_name").map_or("", |s| s));
        if shared.outbox.is_open() {
            // Logged in during a takeover: moves along with the others.
            listed.info.evict(Eviction::Migrate);
        }
        let limiters = limiters_for(&shared, &settings.config, &l.user, &l.database);
        let app = shared
            .apps
            .counts(l.params.get("application_name").map_or("", |s| s));
        Self {
            charge: super::budget::Charge::new(shared.buffers.clone()),
            limiters,
            stream,
            buf: l.buf,
            out: BytesMut::new(),
            limit: settings.config.tidepool.max_message_size,
            control: shared.registry.control(&l.database),
            db_label: l.database.as_str().into(),
            settings,
            generation,
            listed,
            shared,
            pool: l.pool,
            params: l.params,
            cancel: l.cancel,
            owe_error: None,
            skip_until_sync: false,
            discard: 0,
            database: l.database,
            user: l.user,
            statements: HashMap::new(),
            policy: l.policy,
            pinned: None,
            listen: None,
            startup: l.startup,
            client_key: l.client_key,
            fetched_secret: l.fetched_secret,
            replica_pools: Vec::new(),
            last_write: None,
            deferred: None,
            replayed: false,
            custom_params: std::collections::BTreeSet::new(),
            defaults: pool_defaults,
            health: None,
            memo: Default::default(),
            param_facts: None,
            waiter: Waiter::new(),
            app,
            pool_wait_us: 0,
        }
        .with_health()
    }

    fn with_health(mut self) -> Self {
        self.health = self.shared.registry.health(&self.database);
        self
    }

    /// After a reload: the new settings, and fresh pools and health where
    /// the old ones were retired or replaced.
    fn refresh(&mut self) {
        let generation = self.shared.registry.generation();
        if generation == self.generation {
            return;
        }
        self.generation = generation;
        self.settings = self.shared.settings();
        self.limiters = limiters_for(
            &self.shared,
            &self.settings.config,
            &self.user,
            &self.database,
        );
        self.limit = self.settings.config.tidepool.max_message_size;
        self.health = self.shared.registry.health(&self.database);
        self.replica_pools.clear();
        if self.pool.is_retired()
            && let Some(db) = self.settings.config.databases.get(&self.database)
        {
            let secret = self.secret();
            self.pool = self.shared.registry.pool_for(
                &self.settings.config,
                &self.database,
                db,
                &self.user,
                secret,
                self.client_key,
                0,
            );
        }
    }

    /// The user's secret: the config's, or what auth_query found.
    fn secret(&self) -> Option<&crate::auth::secret::Secret> {
        self.settings
            .users
            .get(&self.user)
            .and_then(|u| u.secret.as_ref())
            .or(self.fetched_secret.as_deref())
    }

    /// Passes every rate limiter of this client, waiting up to
    /// `rate_limit_wait` for each.
    async fn admit(&self) -> Result<(), crate::ratelimit::Refused> {
        if self.limiters.is_empty() {
            return Ok(());
        }
        let wait = self.settings.config.rate_limits.rate_limit_wait;
        let backend = self.shared.rate_limits.backend();
        crate::ratelimit::admit_all(&self.limiters, wait, backend.as_ref()).await
    }

    /// SHOW CLIENTS' prepared_statements: this client's named ones.
    fn count_statements(&self) {
        self.listed.info.prepared.store(
            self.statements.len().min(usize::from(u16::MAX)) as u16,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// Why this client must leave now, if it must.
    fn evicted(&self, in_transaction: bool) -> Option<ClientError> {
        match self.listed.info.eviction() {
            Eviction::Killed => Some(ClientError::Killed),
            Eviction::ShutdownNow => Some(ClientError::Shutdown),
            Eviction::Shutdown if !in_transaction => Some(ClientError::Shutdown),
            Eviction::IdleTimeout if !in_transaction => Some(ClientError::ClientIdleTimeout(
                self.settings.config.pool.client_idle_timeout,
            )),
            _ => None,
        }
    }

    /// Serves the client until it leaves (or parks); `_slot` counts it
    /// meanwhile.
    pub async fn run(mut self: Box<Self>, _slot: super::ClientSlot) {
        tracing::debug!(database = %self.database, user = %self.user, "session started");
        self.listed.info.forget_waker();
        loop {
            // Liveness: each transaction spends from the task's cooperative
            // budget, so a client whose transactions never wait (a server
            // free at once, answers already buffered) still lets the others
            // run after a bounded amount of work.
            tokio::task::coop::consume_budget().await;
            let idle_in_tx = self.deferred.is_some();
            if let Some(e) = self.evicted(idle_in_tx) {
                return Box::pin(self.fatal(e)).await;
            }
            match self.wait_for_work().await {
                Ok(Next::Exit) => return,
                Ok(Next::Move) => match Box::pin(self.move_out()).await {
                    None => return,
                    Some(back) => {
                        self = back;
                        continue;
                    }
                },
                Ok(Next::Park) => match self.park() {
                    None => return,
                    Some(back) => {
                        self = back;
                        continue;
                    }
                },
                Ok(Next::Transaction) => {}
                Err(e) => return Box::pin(self.fatal(e)).await,
            }
            self.refresh();
            // A deferred transaction's end, or anything in an aborted one,
            // needs no server.
            if self.answer_deferred() {
                continue;
            }
            // Rate limits count transactions as they start: a BEGIN that
            // tidepool answers itself (deferred) is admitted here, and its
            // transaction's first statement is not asked again (refused
            // then, it would leave the client's transaction half run).
            if self.deferred.is_none()
                && !self.limiters.is_empty()
                && let Err(refused) = Box::pin(self.admit()).await
            {
                // Over a rate limit: the transaction does not run; its
                // request gets the error, as a server's would.
                self.owe_error = Some(ClientError::RateLimited(Box::new(refused)));
                continue;
            }
            // PAUSE holds every transaction that has not reached a server,
            // its BEGIN answered here or not (a deferred BEGIN used to let
            // its transaction through).
            if self.control.is_paused() {
                // PAUSE: hold new transactions until RESUME, for at most
                // query_wait_timeout (as PgBouncer counts a paused wait).
                let limit = self.pool.settings().query_wait_timeout;
                self.listed.info.waiting_at_most(0, limit);
                let (control, info) = (self.control.clone(), self.listed.info.clone());
                let expired = Box::pin(async move {
                    // Other nudges (a takeover's move, a park request) do
                    // not end a PAUSE: only RESUME, an eviction or the
                    // wait's limit (the client sweep nudges then) does.
                    while control.is_paused() && info.eviction().stays() {
                        if info.wait_expired() {
                            return true;
                        }
                        tokio::select! {
                            _ = control.wait_resumed() => {}
                            _ = info.nudged() => {}
                        }
                    }
                    false
                })
                .await;
                self.listed.info.idle();
                if let Some(e) = self.evicted(self.deferred.is_some()) {
                    return Box::pin(self.fatal(e)).await;
                }
                if expired {
                    let mut e = super::startup::pool_error(
                        &self.pool,
                        crate::pool::PoolError::Timeout(limit),
                    );
                    if let ClientError::PoolTimeout {
                        detail, database, ..
                    } = &mut e
                    {
                        *detail =
                            format!("; database {database} is paused (PAUSE) and was not resumed");
                    }
                    tracing::info!(client = self.listed.info.id, error = %e, "paused wait timed out");
                    self.owe(e);
                    continue;
                }
                self.refresh();
            }
            if self.defer_begin() {
                continue;
            }
            watchdog::phase(Phase::Route);
            if self.buf.len() > route::INLINE_CLASSIFY_BYTES {
                Box::pin(self.classify_long_ahead()).await;
            }
            let (route, class) = self.choose_route();
            // Checkout and forwarding run inline: boxing them would cost two
            // allocations per transaction. Rare phases (fatal errors, clean-up,
            // parameter refresh) are boxed so the task does not carry their
            // state; an idle client gives its whole task up by parking.
            let (mut server, route, on_replica) = match self.acquire_routed(route).await {
                Ok(s) => s,
                Err(ClientError::Killed) => {
                    let e = self.evicted(true).unwrap_or(ClientError::Killed);
                    return Box::pin(self.fatal(e)).await;
                }
                Err(e) => {
                    tracing::info!(client = self.listed.info.id, error = %e, "no server for client request");
                    self.owe(e);
                    continue;
                }
            };
            // A spare tracker of this thread, emptied: its queues keep their
            // allocations (see `txn::spare`).
            let mut tracker =
                super::txn::spare::take(server.conn().tx, self.policy, &mut self.memo);
            tracker.changers = server.pool().catalog.changers();
            let facts = self.param_facts();
            tracker.parse_context = facts.parse_context;
            tracker.opaque_literals = facts.opaque_literals;
            tracker.timing.detail = self.shared.spans.enabled();
            if let Some(m) = &self.listen {
                tracker.hub = Some((m.hub.clone(), self.listed.info.id));
            }
            let had_prepend = self.deferred.is_some();
            if let Some(deferred::Deferred::Begun { sql: begin, .. }) = self.deferred.take() {
                // The client's BEGIN, run first on the chosen backend; its
                // answers were already given.
                let mut out = BytesMut::new();
                write::query(&mut out, &begin);
                tracker.expect.push(crate::server::expect::Owed::Internal);
                server.conn().prepend = Some(out);
            }
            if let (Route::Replica(_), true) = (route, self.pinned.is_none()) {
                tracker.replica_guard = Some(super::txn::ReplicaGuard {
                    classifier: self.settings.classifier.clone(),
                    functions: self.health.as_ref().and_then(|h| h.functions.load_full()),
                });
                if tracker.status == TxStatus::Idle && !had_prepend {
                    // An autocommit read: should the replica refuse it as a
                    // write, it runs again on the primary.
                    tracker.misroute = super::txn::Misroute::Armed(BytesMut::new());
                }
            }
            watchdog::phase(Phase::Forward);
            let end = loop {
                match self.forward(&mut server, &mut tracker).await {
                    TxEnd::PinCheck => {
                        tracker.pin_check_due = false;
                        if Box::pin(self.pin_ended(&mut server)).await {
                            break TxEnd::Done;
                        }
                    }
                    end => break end,
                }
            };
            watchdog::phase(Phase::Release);
            drop(on_replica);
            self.after_route(route, class);
            if tracker.serializable_refused {
                // The replica refused this session's transactions as
                // serializable (its role's or database's default, which
                // routing cannot see): its user's go to the primary.
                self.pool.replicas_refuse_serializable();
            }
            server.conn().tx = tracker.status;
            if tracker.drops_statements {
                // Whatever ran it (a Query or a prepared statement of its
                // own), the server has none of its statements left (other
                // clients' are prepared again when next used), and neither
                // has the client, as directly.
                server.conn().prepared.clear();
                self.statements.clear();
            }
            server.pool().traffic.apply(&tracker.timing.delta);
            {
                let d = &tracker.timing.delta;
                let bytes = d.received + d.sent;
                self.listed
                    .info
                    .counts
                    .transaction(d.xacts, d.queries, bytes);
                self.app.transaction(d.xacts, d.queries, bytes);
            }
            self.listed.info.idle();
            self.count_statements();
            let progressed = tracker.timing.delta.received > 0 || had_prepend;
            match end {
                TxEnd::Done if !progressed => {
                    // A transaction that consumed nothing would start again at
                    // once, forever: a bug, made loud and ended here instead
                    // of a spinning task.
                    tracing::error!(
                        client = self.listed.info.id,
                        "transaction ended without consuming a client message; closing the client"
                    );
                    server.release(Release::Reuse);
                    return Box::pin(
                        self.fatal(ClientError::Internal("no progress in a transaction".into())),
                    )
                    .await;
                }
                TxEnd::Done | TxEnd::PinCheck => {
                    let mut clean = true;
                    if tracker.listen_changed || !tracker.unlistens.is_empty() {
                        clean = Box::pin(self.move_listens(&mut server, &tracker)).await;
                    }
                    if tracker.params_changed {
                        self.custom_params.extend(tracker.custom_params.drain(..));
                        let refreshing = Box::pin(self.refresh_params(&mut server));
                        refreshing.await;
                        let app = self.params.get("application_name").map_or("", |s| s);
                        if self.listed.info.application_name() != app {
                            self.app = self.shared.apps.counts(app);
                        }
                        self.listed.info.set_application_name(app);
                    }
                    // After a query_timeout cancel the server is closed: a
                    // cancel that lands late must not reach another client.
                    server.release(if tracker.timeout_cancel.is_some() || !clean {
                        Release::Close
                    } else {
                        Release::Reuse
                    });
                    super::txn::spare::give_back(tracker, &mut self.memo);
                }
                TxEnd::Killed => {
                    // KILL drops the server connection too, after stopping
                    // whatever runs on it.
                    if tracker.expect.ready_owed() > 0 {
                        let _ = Box::pin(send_cancel(server.conn().cancel_key.clone())).await;
                    }
                    server.release(Release::Close);
                    let e = self.evicted(true).unwrap_or(ClientError::Killed);
                    return Box::pin(self.fatal(e)).await;
                }
                TxEnd::ClientGone { mid_message } => {
                    Box::pin(self.clean_up(server, &tracker, mid_message)).await;
                    return;
                }
                TxEnd::ServerLost {
                    reason,
                    client_skip,
                } => {
                    tracing::warn!(client = self.listed.info.id, %reason, "server connection lost mid-transaction");
                    server.release(Release::Close);
                    // The session state a pin was for is gone with the server.
                    self.pinned = None;
                    self.discard = client_skip;
                    self.server_lost(&tracker, reason);
                }
                TxEnd::ServerFatal { reason, fatal } => {
                    tracing::warn!(client = self.listed.info.id, %reason, "server ended the session under a client; closing the client as PostgreSQL would");
                    server.release(Release::Close);
                    self.out.extend_from_slice(&fatal);
                    let _ = self.flush_out().await;
                    let _ = self.stream.shutdown().await;
                    return;
                }
                TxEnd::ClientFatal(e) => {
                    Box::pin(self.clean_up(server, &tracker, true)).await;
                    return Box::pin(self.fatal(e)).await;
                }
                TxEnd::Misrouted { replay, refused } => {
                    server.pool().traffic.apply(&crate::stats::traffic::Delta {
                        misroute_retries: 1,
                        ..Default::default()
                    });
                    // A block the refused query opened there ends with the
                    // connection (nothing of it reached the client).
                    let idle = refused && server.conn().tx == TxStatus::Idle;
                    server.release(if idle { Release::Reuse } else { Release::Close });
                    // A serializable refusal is not the statement's fault
                    // but the session's (noted above), nor a replica gone.
                    let statement_at_fault = refused && !tracker.serializable_refused;
                    self.replayed = !refused;
                    super::txn::spare::give_back(tracker, &mut self.memo);
                    self.misrouted(replay, statement_at_fault);
                }
            }
        }
    }

    /// Sends a FATAL error and closes the connection.
    async fn fatal(&mut self, e: ClientError) {
        tracing::info!(client = self.listed.info.id, peer = %self.listed.info.addr().map(|a| a.to_string()).unwrap_or_default(), error = %e, "closing client");
        e.write_fatal(&mut self.out);
        // Bounded: a client that does not read (the reason it may be
        // closed) must not hold its task here.
        let _ = tokio::time::timeout(FATAL_WRITE, async {
            let _ = self.stream.write_all(&self.out).await;
            let _ = self.stream.shutdown().await;
        })
        .await;
    }
}

/// The limiters of `user` and `database` under `config` (made on first use).
fn limiters_for(
    shared: &Shared,
    config: &crate::config::Config,
    user: &str,
    database: &str,
) -> Vec<Arc<crate::ratelimit::Limiter>> {
    let mut v = Vec::new();
    let tiers = [
        (
            "user",
            user,
            config
                .users
                .get(user)
                .and_then(|u| u.rate_limit_tier.as_deref()),
        ),
        (
            "database",
            database,
            config
                .databases
                .get(database)
                .and_then(|d| d.rate_limit_tier.as_deref()),
        ),
    ];
    for (scope, name, tier) in tiers {
        if let Some(t) = tier.and_then(|t| config.rate_tier(t)) {
            v.push(shared.rate_limits.limiter(scope, name, &t));
        }
    }
    v
}
