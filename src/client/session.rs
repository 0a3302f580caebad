//! The logged-in client's main loop: wait for work without a server, check
//! one out, bring its parameters to the client's, forward both directions as
//! whole buffers until the transaction ends, release (or clean up), repeat.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

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
use crate::router::hints::{Hint, hint};
use crate::server::ServerError;
use crate::server::params::{canonical, is_tracked, sync_sql};
use crate::server::prepared::{ServerStatements, Statement};
use crate::stats::{Counters, Fingerprints, Role, SlowQuery};
use crate::watchdog::{self, Phase};

/// Read buffers start this small and double (up to steps of
/// [`READ_CHUNK`]) when a read would find less than [`READ_ROOM`] free.
const READ_START: usize = 1024;
const READ_CHUNK: usize = 16 * 1024;
const READ_ROOM: usize = 256;
/// Largest read buffer a client keeps between transactions (reused in place
/// while it is active; a parked client holds none, and neither does an idle
/// one when parking is off). Most clients' requests fit [`READ_START`]: an
/// idle client waiting to park then holds 1 KiB, not the most it ever needed.
const IDLE_KEEP: usize = 4 * 1024;
/// Server messages can be as large as PostgreSQL allows (1 GiB fields).
const SERVER_MESSAGE_LIMIT: usize = (1 << 30) + 64;
/// How long a ROLLBACK on behalf of a vanished client may take.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Session {
    stream: TcpStream,
    buf: BytesMut,
    out: BytesMut,
    shared: Arc<Shared>,
    /// The config this client runs under; refreshed after a reload.
    settings: Arc<Settings>,
    generation: u64,
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
    /// Set once a session feature tied the client to its server.
    pinned: Option<&'static str>,
    /// Startup-packet parameters: what RESET goes back to.
    startup: Arc<BTreeMap<String, String>>,
    client_key: Option<[u8; 32]>,
    /// Replica health of this database (None without replicas).
    health: Option<Arc<Health>>,
    /// Pools of the replicas, by replica index, made on first use.
    replica_pools: Vec<Option<Arc<Pool>>>,
    /// When this client last finished a transaction that may have written
    /// (nanos in `health`'s clock), for read-your-writes.
    last_write: Option<u64>,
    /// A lone BEGIN answered by tidepool; it is sent ahead of the next
    /// statement, on the backend that statement is routed to.
    deferred_begin: Option<String>,
    /// Custom (dotted) parameters this client has touched.
    custom_params: std::collections::BTreeSet<String>,
    /// What a fresh server of this pool reports (fixed after login).
    defaults: Arc<BTreeMap<String, String>>,
    /// The last transaction's tracker, kept for its allocations.
    spare_tracker: Option<Box<Tracker>>,
    /// This client's mailbox while it waits for a server.
    waiter: Arc<Waiter>,
}

/// A parked client (see `client::park`): only what [`Session`] cannot
/// derive again from the config, the registry and the client list.
pub struct Parked {
    socket: std::net::TcpStream,
    /// Counts the client while it has no task.
    slot: super::ClientSlot,
    listed: Listed,
    pool: Arc<Pool>,
    params: Arc<BTreeMap<String, String>>,
    startup: Arc<BTreeMap<String, String>>,
    cancel: CancelHandle,
    policy: Policy,
    last_write: Option<u64>,
    /// What most clients do not have (boxed so that they pay 8 bytes).
    rare: Option<Box<Rare>>,
}

struct Rare {
    statements: HashMap<String, Arc<Statement>>,
    custom_params: std::collections::BTreeSet<String>,
    client_key: Option<[u8; 32]>,
}

impl Parked {
    pub fn info(&self) -> &super::list::ClientInfo {
        &self.listed.info
    }

    pub fn socket(&self) -> &std::net::TcpStream {
        &self.socket
    }

    /// Runs the client again in a task of its own.
    pub fn resume(self) {
        let id = self.listed.info.id;
        match self.into_session() {
            Ok((session, slot)) => {
                tracing::debug!(client = id, "client resumed");
                tokio::spawn(crate::watchdog::Watched::new(id, session.run(slot)));
            }
            Err(e) => {
                tracing::warn!(client = id, error = %e, "could not resume client; closing it")
            }
        }
    }

    /// Registers the socket with the runtime again and rebuilds the session.
    fn into_session(self) -> std::io::Result<(Box<Session>, super::ClientSlot)> {
        let stream = TcpStream::from_std(self.socket)?;
        let shared = self.slot.shared().clone();
        let rare = self.rare.map(|r| *r);
        let client_key = rare.as_ref().and_then(|r| r.client_key);
        let l = LoggedIn {
            database: self.listed.info.database.to_string(),
            user: self.listed.info.user.to_string(),
            pool: self.pool,
            params: self.params,
            buf: BytesMut::new(),
            cancel: self.cancel,
            policy: self.policy,
            startup: self.startup,
            client_key,
        };
        let mut session = Box::new(Session::new(stream, shared, l, self.listed));
        // The config may have been reloaded meanwhile: look at the next
        // transaction, as after any reload.
        session.generation = u64::MAX;
        session.last_write = self.last_write;
        if let Some(r) = rare {
            session.statements = r.statements;
            session.custom_params = r.custom_params;
        }
        Ok((session, self.slot))
    }
}

/// Where a transaction runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Primary,
    Replica(usize),
    /// A read with no usable replica and `replica_fallback = "error"`.
    NoReplica,
}

enum Next {
    Transaction,
    Exit,
    /// Asked to park, and nothing stands in the way.
    Park,
}

/// How forwarding ended.
enum TxEnd {
    /// The server is idle and clean; give it back.
    Done,
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
    /// The replica refused the read as a write (25006) before anything of
    /// its answer reached the client: these client bytes run again, on the
    /// primary. The server is idle and clean.
    Misrouted { replay: BytesMut },
}

impl Session {
    pub fn new(stream: TcpStream, shared: Arc<Shared>, l: LoggedIn, listed: Listed) -> Self {
        let pool_defaults = l.pool.defaults().unwrap_or_default();
        let settings = shared.settings();
        let generation = shared.registry.generation();
        listed
            .info
            .set_application_name(l.params.get("application_name").map_or("", |s| s));
        Self {
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
            startup: l.startup,
            client_key: l.client_key,
            replica_pools: Vec::new(),
            last_write: None,
            deferred_begin: None,
            custom_params: std::collections::BTreeSet::new(),
            defaults: pool_defaults,
            health: None,
            spare_tracker: None,
            waiter: Waiter::new(),
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
        self.limit = self.settings.config.tidepool.max_message_size;
        self.health = self.shared.registry.health(&self.database);
        self.replica_pools.clear();
        if self.pool.is_retired()
            && let Some(db) = self.settings.config.databases.get(&self.database)
        {
            let secret = self
                .settings
                .users
                .get(&self.user)
                .and_then(|u| u.secret.as_ref());
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

    /// Why this client must leave now, if it must.
    fn evicted(&self, in_transaction: bool) -> Option<ClientError> {
        match self.listed.info.eviction() {
            Eviction::Killed => Some(ClientError::Killed),
            Eviction::Shutdown if !in_transaction => Some(ClientError::Shutdown),
            _ => None,
        }
    }

    /// Serves the client until it leaves (or parks); `_slot` counts it
    /// meanwhile.
    pub async fn run(mut self: Box<Self>, _slot: super::ClientSlot) {
        tracing::debug!(database = %self.database, user = %self.user, "session started");
        self.listed.info.nudge.forget_waker();
        loop {
            // Liveness: each transaction spends from the task's cooperative
            // budget, so a client whose transactions never wait (a server
            // free at once, answers already buffered) still lets the others
            // run after a bounded amount of work.
            tokio::task::coop::consume_budget().await;
            let idle_in_tx = self.deferred_begin.is_some();
            if let Some(e) = self.evicted(idle_in_tx) {
                return Box::pin(self.fatal(e)).await;
            }
            match self.wait_for_work().await {
                Ok(Next::Exit) => return,
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
            if self.defer_begin() {
                continue;
            }
            if self.control.is_paused() && self.deferred_begin.is_none() {
                // PAUSE: hold new transactions until RESUME.
                self.listed.info.waiting(0);
                let (control, info) = (self.control.clone(), self.listed.info.clone());
                Box::pin(async move {
                    tokio::select! {
                        _ = control.wait_resumed() => {}
                        _ = info.nudge.nudged() => {}
                    }
                })
                .await;
                self.listed.info.idle();
                if let Some(e) = self.evicted(false) {
                    return Box::pin(self.fatal(e)).await;
                }
                self.refresh();
            }
            watchdog::phase(Phase::Route);
            let (route, class) = self.choose_route();
            // Checkout and forwarding run inline: boxing them would cost two
            // allocations per transaction. Rare phases (fatal errors, clean-up,
            // parameter refresh) are boxed so the task does not carry their
            // state; an idle client gives its whole task up by parking.
            let (mut server, route) = match self.acquire_routed(route).await {
                Ok(s) => s,
                Err(ClientError::Killed) => {
                    let e = self.evicted(true).unwrap_or(ClientError::Killed);
                    return Box::pin(self.fatal(e)).await;
                }
                Err(e) => {
                    tracing::info!(client = self.listed.info.id, error = %e, "no server for client request");
                    self.owe_error = Some(e);
                    continue;
                }
            };
            // The last transaction's tracker, emptied: its queues keep their
            // allocations.
            let mut tracker = match self.spare_tracker.take() {
                Some(mut t) => {
                    t.reset(server.conn().tx, self.policy);
                    t
                }
                None => Box::new(Tracker::new(server.conn().tx, self.policy)),
            };
            let had_prepend = self.deferred_begin.is_some();
            if let Some(begin) = self.deferred_begin.take() {
                // The client's BEGIN, run first on the chosen backend; its
                // answers were already given.
                let mut out = BytesMut::new();
                write::query(&mut out, &begin);
                tracker.pending += 1;
                tracker.expect.push(crate::server::expect::Owed::Internal);
                server.conn().prepend = Some(out);
            }
            if let (Route::Replica(_), None) = (route, self.pinned) {
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
            let end = self.forward(&mut server, &mut tracker).await;
            watchdog::phase(Phase::Release);
            self.after_route(route, class);
            self.cancel.point_at(None);
            server.conn().tx = tracker.status;
            server.pool().traffic.apply(&tracker.timing.delta);
            self.listed.info.idle();
            // SHOW CLIENTS' prepared_statements: this client's named ones.
            self.listed.info.prepared.store(
                self.statements.len() as u32,
                std::sync::atomic::Ordering::Relaxed,
            );
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
                TxEnd::Done => {
                    if tracker.params_changed {
                        self.custom_params.extend(tracker.custom_params.drain(..));
                        let refreshing = Box::pin(self.refresh_params(&mut server));
                        refreshing.await;
                        self.listed.info.set_application_name(
                            self.params.get("application_name").map_or("", |s| s),
                        );
                    }
                    server.release(Release::Reuse);
                    self.spare_tracker = Some(tracker);
                }
                TxEnd::Killed => {
                    // KILL drops the server connection too, after stopping
                    // whatever runs on it.
                    if tracker.pending > 0 {
                        let _ = Box::pin(send_cancel(server.conn().cancel_key)).await;
                    }
                    server.release(Release::Close);
                    return Box::pin(self.fatal(ClientError::Killed)).await;
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
                TxEnd::Misrouted { replay } => {
                    server.pool().traffic.apply(&crate::stats::traffic::Delta {
                        misroute_retries: 1,
                        ..Default::default()
                    });
                    server.release(Release::Reuse);
                    self.spare_tracker = Some(tracker);
                    self.misrouted(replay);
                }
            }
        }
    }

    /// Nothing ties this idle client to its task: no bytes buffered either
    /// way, nothing owed, no server, no transaction.
    fn parkable(&self) -> bool {
        self.buf.is_empty()
            && self.out.is_empty()
            && self.discard == 0
            && !self.skip_until_sync
            && self.owe_error.is_none()
            && self.deferred_begin.is_none()
            && self.pinned.is_none()
    }

    /// Moves this client to the parking lot. `None` when it is parked (or
    /// lost on the way); the session back when the lot could not take it.
    fn park(self: Box<Self>) -> Option<Box<Self>> {
        let lot = self.shared.lot.clone();
        let id = self.listed.info.id;
        let parked = match self.into_parked() {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(client = id, error = %e, "could not park client; closing it");
                return None;
            }
        };
        match lot.park(parked) {
            Ok(()) => {
                tracing::debug!(client = id, "client parked");
                None
            }
            Err(p) => match p.into_session() {
                // The slot taken for the record is given back: this task's
                // own still counts the client.
                Ok((session, _slot)) => Some(session),
                Err(e) => {
                    tracing::warn!(client = id, error = %e, "could not resume client; closing it");
                    None
                }
            },
        }
    }

    /// Keeps what cannot be derived again; the socket leaves the runtime.
    fn into_parked(self: Box<Self>) -> std::io::Result<Parked> {
        let s = *self;
        // A waker kept for this task would keep the task's memory.
        s.listed.info.nudge.forget_waker();
        let rare =
            (!s.statements.is_empty() || !s.custom_params.is_empty() || s.client_key.is_some())
                .then(|| {
                    Box::new(Rare {
                        statements: s.statements,
                        custom_params: s.custom_params,
                        client_key: s.client_key,
                    })
                });
        Ok(Parked {
            slot: super::ClientSlot::new(&s.shared),
            socket: s.stream.into_std()?,
            listed: s.listed,
            pool: s.pool,
            params: s.params,
            startup: s.startup,
            cancel: s.cancel,
            policy: s.policy,
            last_write: s.last_write,
            rare,
        })
    }

    /// Sends a FATAL error and closes the connection.
    async fn fatal(&mut self, e: ClientError) {
        tracing::info!(client = self.listed.info.id, peer = ?self.listed.info.addr, error = %e, "closing client");
        e.write_to(&mut self.out);
        let _ = self.stream.write_all(&self.out).await;
        let _ = self.stream.shutdown().await;
    }

    /// Reads more client bytes; an idle client with an empty buffer first
    /// waits for readability so that it holds no buffer while waiting. For
    /// hand-written polls (each step may repeat: the buffer preparation is
    /// idempotent).
    fn poll_read_more(&mut self, cx: &mut std::task::Context<'_>) -> Poll<std::io::Result<usize>> {
        if self.buf.is_empty() && self.buf.capacity() > 0 {
            let parks = !self.settings.config.pool.park_idle_clients_after.is_zero();
            if self.buf.capacity() > IDLE_KEEP || !parks {
                self.buf = BytesMut::new();
            } else {
                // Reclaims the whole allocation in place once the bytes
                // forwarded from it are gone (no allocation, no growth:
                // every buffer is at least this big).
                self.buf.reserve(READ_START);
            }
        }
        if self.buf.capacity() == 0 {
            // The buffer is made only once there is something to read.
            std::task::ready!(self.stream.poll_read_ready(cx))?;
            let mut chunk = BytesMut::with_capacity(READ_START);
            let r = std::task::ready!(crate::protocol::io::poll_read(&self.stream, &mut chunk, cx));
            if r.is_ok() {
                self.buf = chunk;
            }
            return Poll::Ready(r);
        }
        poll_read_into(&self.stream, &mut self.buf, cx)
    }

    async fn flush_out(&mut self) -> std::io::Result<()> {
        if !self.out.is_empty() {
            crate::protocol::io::send_all(&self.stream, &mut self.out).await?;
            self.out.clear();
            if self.out.capacity() > IDLE_KEEP {
                self.out = BytesMut::new();
            }
        }
        Ok(())
    }

    /// Idle phase: answers what needs no server (Sync, Flush, stray COPY
    /// messages, owed errors) and returns when a transaction starts.
    async fn wait_for_work(&mut self) -> Result<Next, ClientError> {
        watchdog::phase(Phase::Idle);
        loop {
            if self.discard > 0 {
                let n = self.discard.min(self.buf.len());
                self.buf.advance(n);
                self.discard -= n;
            }
            // A transaction starts only once its first message is whole: the
            // routing decision and the tracker need it, and a message that
            // is still arriving must be read here, not spun on. The rest of
            // a dropped message is read (and thrown away) the same way,
            // with KILL and shutdown heard meanwhile.
            let wanted = if self.discard > 0 {
                self.discard
            } else {
                self.head_shortfall()?
            };
            if wanted > 0 {
                if self.flush_out().await.is_err() {
                    return Ok(Next::Exit);
                }
                // Room for the whole message at once (bounded by
                // `max_message_size`), not a doubling per read.
                if self.buf.len() >= 5 && self.discard == 0 {
                    self.buf.reserve(wanted);
                }
                let info = self.listed.info.clone();
                let read = std::future::poll_fn(|cx| {
                    if let Poll::Ready(r) = self.poll_read_more(cx) {
                        return Poll::Ready(Some(r));
                    }
                    info.nudge.poll_nudged(cx).map(|()| None)
                })
                .await;
                let Some(read) = read else {
                    match self.evicted(self.deferred_begin.is_some()) {
                        Some(e) => return Err(e),
                        None if info.park_requested() && self.parkable() => {
                            return Ok(Next::Park);
                        }
                        None => continue,
                    }
                };
                match read {
                    Ok(0) | Err(_) => return Ok(Next::Exit),
                    Ok(_) => continue,
                }
            }
            let tag = FrontendTag::from_byte(self.buf[0]);
            let total = frontend_len(self.buf[0], &self.buf[1..5], self.limit)?;
            let owes = self.owe_error.is_some();
            match tag {
                FrontendTag::Terminate => {
                    let _ = self.flush_out().await;
                    return Ok(Next::Exit);
                }
                // PostgreSQL ignores these outside COPY (a failed COPY's tail).
                FrontendTag::CopyData
                | FrontendTag::CopyDone
                | FrontendTag::CopyFail
                | FrontendTag::Flush => {
                    self.discard = total;
                }
                FrontendTag::Sync => {
                    self.discard = total;
                    if let Some(e) = self.owe_error.take() {
                        e.write_to(&mut self.out);
                    }
                    self.skip_until_sync = false;
                    let status = if self.deferred_begin.is_some() {
                        TxStatus::InTransaction
                    } else {
                        TxStatus::Idle
                    };
                    write::ready_for_query(&mut self.out, status);
                }
                _ if self.skip_until_sync => self.discard = total,
                FrontendTag::Query | FrontendTag::FunctionCall if owes => {
                    self.discard = total;
                    if let Some(e) = self.owe_error.take() {
                        e.write_to(&mut self.out);
                    }
                    write::ready_for_query(&mut self.out, TxStatus::Idle);
                }
                _ if owes => {
                    self.discard = total;
                    if let Some(e) = self.owe_error.take() {
                        e.write_to(&mut self.out);
                    }
                    self.skip_until_sync = true;
                }
                FrontendTag::Parse | FrontendTag::Close if self.answer_without_server() => {}
                t if t.starts_transaction() => {
                    if self.flush_out().await.is_err() {
                        return Ok(Next::Exit);
                    }
                    return Ok(Next::Transaction);
                }
                // Password and unknown types (every other type is matched above).
                _ => {
                    return Err(ProtocolError::UnexpectedTag(self.buf[0] as char).into());
                }
            }
        }
    }

    /// Bytes still missing before the message at the head of the buffer can
    /// be acted on while idle: its header, or (for a message that starts a
    /// transaction) its whole body. 0 when it can be acted on now.
    fn head_shortfall(&self) -> Result<usize, ClientError> {
        if self.buf.len() < 5 {
            return Ok(5 - self.buf.len());
        }
        let total = frontend_len(self.buf[0], &self.buf[1..5], self.limit)?;
        let starts_transaction = FrontendTag::from_byte(self.buf[0]).starts_transaction();
        // Messages dropped while an error is owed or a batch is skipped are
        // discarded as they stream in, whatever their size.
        let dropped = self.owe_error.is_some() || self.skip_until_sync;
        Ok(if starts_transaction && !dropped {
            total.saturating_sub(self.buf.len())
        } else {
            0
        })
    }

    /// A batch of only Parse (of statements this pool's servers already
    /// parsed), Close (of statements) and a final Sync needs no server: the
    /// answers are known. This keeps "prepare on connect" from taking a
    /// server, which matters when a client prepares while others hold every
    /// server. Returns false (changing nothing) for anything else.
    fn answer_without_server(&mut self) -> bool {
        if !self.policy.named_statements {
            return false;
        }
        let mut pos = 0;
        let mut plan: Vec<(String, Option<Arc<Statement>>)> = Vec::new();
        loop {
            let rest = &self.buf[pos..];
            if rest.len() < 5 {
                return false;
            }
            let Ok(total) = checked_len(rest[0], &rest[1..5], self.limit) else {
                return false;
            };
            if rest.len() < total {
                return false;
            }
            let body = &rest[5..total];
            match FrontendTag::from_byte(rest[0]) {
                // The unnamed statement always needs a server.
                FrontendTag::Parse if body.first() == Some(&0) => return false,
                FrontendTag::Parse => {
                    let Ok((name, stmt)) = Statement::from_parse(body) else {
                        return false;
                    };
                    let generation = self.pool.catalog.generation(stmt.hash);
                    let stmt = Statement::in_generation(stmt, generation);
                    let taken = self.statements.contains_key(&name)
                        || plan.iter().any(|(n, s)| n == &name && s.is_some());
                    if name.is_empty() || taken || !self.pool.knows_statement(stmt.hash) {
                        return false;
                    }
                    if crate::client::sql::effects(&stmt.query) != Default::default() {
                        return false;
                    }
                    plan.push((name, Some(stmt)));
                }
                FrontendTag::Close if body.first() == Some(&b'S') => {
                    let mut b = crate::protocol::messages::Body::new(&body[1..], "Close");
                    let Ok(name) = b.cstr() else { return false };
                    plan.push((name.to_owned(), None));
                }
                FrontendTag::Sync => {
                    pos += total;
                    break;
                }
                _ => return false,
            }
            pos += total;
        }
        for (name, stmt) in plan {
            match stmt {
                Some(stmt) => {
                    self.statements.insert(name, stmt);
                    Counters::add(&self.shared.stats.counters.prepare_hits);
                    write::message(
                        &mut self.out,
                        crate::protocol::BackendTag::ParseComplete.byte(),
                        |_| {},
                    );
                }
                None => {
                    self.statements.remove(&name);
                    write::message(
                        &mut self.out,
                        crate::protocol::BackendTag::CloseComplete.byte(),
                        |_| {},
                    );
                }
            }
        }
        write::ready_for_query(&mut self.out, TxStatus::Idle);
        self.discard = pos;
        true
    }

    /// Decides where the transaction starting at the front of the buffer
    /// runs: reads (and read-only transactions) to a healthy replica that has
    /// replayed this client's writes, everything else to the primary.
    fn choose_route(&mut self) -> (Route, Class) {
        let Some(h) = &self.health else {
            return (Route::Primary, Class::Write);
        };
        if h.replicas.is_empty() || self.pinned.is_some() {
            return (Route::Primary, Class::Write);
        }
        let forced_primary = self
            .params
            .get("tidepool.route")
            .is_some_and(|v| v.eq_ignore_ascii_case("primary"));
        let memo = spare_tracker(&mut self.spare_tracker, self.policy);
        let functions = h.functions.load();
        let (class, hinted) = match first_statement(&self.buf, self.limit, &self.statements) {
            // A statement a replica refused before goes to the primary.
            Some(sql)
                if h.any_misrouted()
                    && h.misrouted(crate::stats::fingerprint::hash_and_template(sql).0) =>
            {
                (Class::Write, None)
            }
            Some(sql) => (
                memo.classify(sql, &self.settings.classifier, functions.as_deref()),
                hint(sql),
            ),
            None => (Class::Write, None),
        };
        let by_first = self.settings.config.routing.transaction_routing
            == crate::config::schema::TransactionRouting::FirstStatement;
        let wants_replica = match hinted {
            Some(Hint::Primary) => false,
            Some(Hint::Replica) => true,
            // After a deferred BEGIN: SET TRANSACTION READ ONLY makes the
            // transaction read-only; other reads count only when routing by
            // the first statement.
            None if self.deferred_begin.is_some() => {
                !forced_primary
                    && (class == Class::BeginReadOnly || (by_first && class == Class::Read))
            }
            None => !forced_primary && matches!(class, Class::Read | Class::BeginReadOnly),
        };
        if !wants_replica || !h.checked.load(std::sync::atomic::Ordering::Relaxed) {
            return (Route::Primary, class);
        }
        let routing = &self.settings.config.routing;
        let since = self.last_write.filter(|_| routing.read_your_writes);
        // Least outstanding transactions per unit of weight; ties rotate.
        let load = |r: &crate::health::Backend| {
            (r.outstanding.load(std::sync::atomic::Ordering::Relaxed) as u64 + 1) * 1000
                / u64::from(r.weight)
        };
        let usable: Vec<(usize, u64)> = h
            .replicas
            .iter()
            .enumerate()
            .filter(|(i, r)| !r.is_banned() && since.is_none_or(|t| h.replica_has_replayed(*i, t)))
            .map(|(i, r)| (i, load(r)))
            .collect();
        let best = usable.iter().map(|(_, l)| *l).min().and_then(|min| {
            let ties: Vec<usize> = usable
                .iter()
                .filter(|(_, l)| *l == min)
                .map(|(i, _)| *i)
                .collect();
            let turn = h.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            ties.get(turn % ties.len().max(1)).copied()
        });
        match (best, routing.replica_fallback) {
            (Some(i), _) => (Route::Replica(i), class),
            (None, _) if since.is_some() => (Route::Primary, class),
            (None, crate::config::schema::ReplicaFallback::Primary) => (Route::Primary, class),
            (None, crate::config::schema::ReplicaFallback::Error) => (Route::NoReplica, class),
        }
    }

    /// A lone `BEGIN` as the first message, on a database with replicas, is
    /// answered here and sent later with the transaction's first statement,
    /// which decides the backend. Returns true when it consumed the message.
    fn defer_begin(&mut self) -> bool {
        let has_replicas = self.health.as_ref().is_some_and(|h| !h.replicas.is_empty());
        if !has_replicas || self.deferred_begin.is_some() || self.pinned.is_some() {
            return false;
        }
        if self.buf.first() != Some(&FrontendTag::Query.byte()) {
            return false;
        }
        let Some(sql) = first_statement(&self.buf, self.limit, &self.statements) else {
            return false;
        };
        let single = !sql.trim().trim_end_matches(';').contains(';');
        let memo = spare_tracker(&mut self.spare_tracker, self.policy);
        // BEGIN calls no function: no volatilities needed.
        if !single || memo.classify(sql, &self.settings.classifier, None) != Class::Begin {
            return false;
        }
        let sql = sql.to_owned();
        let Ok(total) = checked_len(self.buf[0], &self.buf[1..5], self.limit) else {
            return false;
        };
        self.buf.advance(total);
        write::message(
            &mut self.out,
            crate::protocol::BackendTag::CommandComplete.byte(),
            |b| b.put_slice(b"BEGIN\0"),
        );
        write::ready_for_query(&mut self.out, TxStatus::InTransaction);
        self.deferred_begin = Some(sql);
        true
    }

    /// Bookkeeping once a routed transaction is over.
    fn after_route(&mut self, route: Route, class: Class) {
        let Some(h) = &self.health else { return };
        match route {
            Route::Replica(i) => {
                if let Some(r) = h.replicas.get(i) {
                    r.outstanding
                        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
            _ => {
                if class >= Class::Begin {
                    h.primary
                        .writes
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    self.last_write = Some(h.now());
                } else {
                    h.primary
                        .reads
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
    }

    /// Checks out a server on `route`. A replica that cannot give one is
    /// banned and the next choice is tried, before anything ran there.
    async fn acquire_routed(
        &mut self,
        mut route: Route,
    ) -> Result<(PooledConn, Route), ClientError> {
        loop {
            match route {
                Route::Primary => {
                    let pool = self.pool.clone();
                    return Ok((self.acquire(&pool).await?, Route::Primary));
                }
                Route::NoReplica => {
                    return Err(ClientError::ServerConnect {
                        database: self.database.clone(),
                        reason: "no healthy replica (replica_fallback = \"error\")".into(),
                    });
                }
                Route::Replica(i) => {
                    let pool = self.replica_pool(i);
                    let h = self.health.clone();
                    if let Some(r) = h.as_ref().and_then(|h| h.replicas.get(i)) {
                        r.outstanding
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    match self.acquire(&pool).await {
                        Ok(s) => {
                            if let Some(r) = h.as_ref().and_then(|h| h.replicas.get(i)) {
                                r.reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                            return Ok((s, route));
                        }
                        Err(e) => {
                            if let Some(r) = h.as_ref().and_then(|h| h.replicas.get(i)) {
                                r.outstanding
                                    .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                                r.ban("unreachable", &format!("checkout failed: {e}"));
                            }
                            route = self.choose_route().0;
                            if route == Route::Replica(i) {
                                route = Route::Primary;
                            }
                        }
                    }
                }
            }
        }
    }

    fn replica_pool(&mut self, i: usize) -> Arc<Pool> {
        if self.replica_pools.len() <= i {
            self.replica_pools.resize(i + 1, None);
        }
        if let Some(p) = &self.replica_pools[i] {
            return p.clone();
        }
        let shared = self.shared.clone();
        let settings = self.settings.clone();
        let secret = settings
            .users
            .get(&self.user)
            .and_then(|u| u.secret.as_ref());
        let pool = match settings.config.databases.get(&self.database) {
            Some(db) => shared.registry.pool_for(
                &settings.config,
                &self.database,
                db,
                &self.user,
                secret,
                self.client_key,
                i + 1,
            ),
            None => self.pool.clone(),
        };
        self.replica_pools[i] = Some(pool.clone());
        pool
    }

    /// Checks out a server and brings its session parameters to ours.
    async fn acquire(&mut self, pool: &Arc<Pool>) -> Result<PooledConn, ClientError> {
        watchdog::phase(Phase::Checkout);
        let info = self.listed.info.clone();
        // No timer per wait: the client sweep nudges this task once
        // `query_wait_timeout` has passed (see `client::park`).
        let waiter = self.waiter.clone();
        let checkout = pool.checkout_untimed(&waiter);
        tokio::pin!(checkout);
        // Most checkouts find a server at once: then there is no wait to
        // time and no waiting state to show.
        let first = std::future::poll_fn(|cx| Poll::Ready(checkout.as_mut().poll(cx))).await;
        let started = match first {
            Poll::Ready(_) => None,
            Poll::Pending => {
                Some(info.waiting_at_most(pool.backend, pool.hot.query_wait_timeout()))
            }
        };
        let checkout = if let Poll::Ready(r) = first {
            info.requested(pool.backend);
            r
        } else {
            loop {
                let done = std::future::poll_fn(|cx| {
                    if let Poll::Ready(r) = checkout.as_mut().poll(cx) {
                        return Poll::Ready(Some(r));
                    }
                    info.nudge.poll_nudged(cx).map(|()| None)
                })
                .await;
                if let Some(r) = done {
                    break r;
                }
                if info.eviction() == Eviction::Killed {
                    info.idle();
                    return Err(ClientError::Killed);
                }
                if info.wait_expired() {
                    info.idle();
                    let limit = pool.settings().query_wait_timeout;
                    return Err(pool_error(pool, crate::pool::PoolError::Timeout(limit)));
                }
            }
        };
        let mut pooled = match checkout {
            Ok(p) => p,
            Err(e) => {
                info.idle();
                return Err(pool_error(pool, e));
            }
        };
        pool.traffic.assigned(started.map_or(Duration::ZERO, |s| {
            Duration::from_micros(crate::clock::precise_us().saturating_sub(s))
        }));
        info.active(pooled.conn().id);
        if let Some(l) = &pooled.conn().listed {
            l.info.lent(info.id);
        }
        // Fast path: this server was last brought to this very (shared)
        // parameter set and nothing changed it since.
        let in_sync = pooled
            .conn()
            .synced_to
            .as_ref()
            .is_some_and(|p| Arc::ptr_eq(p, &self.params));
        if !in_sync {
            pooled = Box::pin(self.sync_params(pooled)).await?;
        }
        self.cancel.point_at(Some(pooled.conn().cancel_key));
        Ok(pooled)
    }

    /// Brings a server's session parameters to the client's (one round trip,
    /// only when they differ) and remembers which set it now has.
    async fn sync_params(&mut self, mut pooled: PooledConn) -> Result<PooledConn, ClientError> {
        let defaults = self.defaults.clone();
        let conn = pooled.conn();
        if let Some(sql) = sync_sql(&self.params, &conn.params, &defaults) {
            tracing::debug!(server = conn.id, "syncing session parameters");
            match conn.run_internal(&sql).await {
                Ok(changed) => {
                    Counters::add(&self.shared.stats.counters.param_syncs);
                    // The server now has exactly the client's values...
                    conn.params.retain(|k, _| {
                        !is_tracked(k) || self.params.contains_key(k) || defaults.contains_key(k)
                    });
                    for (k, v) in self.params.iter() {
                        conn.params.insert(k.clone(), v.clone());
                    }
                    // ...in the server's spelling (e.g. `UTF8` for `utf8`), so
                    // the next comparison matches.
                    for (k, v) in changed {
                        if self.params.get(&k).is_some_and(|mine| *mine != v) {
                            Arc::make_mut(&mut self.params).insert(k.clone(), v.clone());
                        }
                        conn.params.insert(k, v);
                    }
                }
                Err(ServerError::Query(f)) => {
                    let reuse = if conn.tx == TxStatus::Idle {
                        Release::Reuse
                    } else {
                        Release::Close
                    };
                    pooled.release(reuse);
                    return Err(ClientError::ServerLogin {
                        code: f.code,
                        message: format!("applying session parameters: {}", f.message),
                    });
                }
                Err(e) => {
                    pooled.release(Release::Close);
                    return Err(ClientError::ServerConnect {
                        database: self.database.clone(),
                        reason: e.to_string(),
                    });
                }
            }
        }
        pooled.conn().synced_to = Some(self.params.clone());
        Ok(pooled)
    }

    /// Forwards between client and server until the server can be released
    /// (transaction mode), or something ends the session.
    async fn forward(&mut self, pooled: &mut PooledConn, t: &mut Tracker) -> TxEnd {
        let mode = self.pool.hot.mode();
        let idle_tx_timeout = self.settings.config.pool.idle_transaction_timeout;
        let (server_pool, conn) = pooled.parts();
        let stmt_ctx = StatementCtx {
            database: &self.db_label,
            user: &self.user,
            backend: &server_pool.addr,
            role: if server_pool.backend == 0 {
                Role::Primary
            } else {
                Role::Replica
            },
            client: self.listed.info.addr,
            slow_us: server_pool.hot.slow_query_us(),
        };
        let info = self.listed.info.clone();
        let mut cscan = Scanner::frontend(self.limit);
        let mut sscan = Scanner::new(SERVER_MESSAGE_LIMIT);
        let mut to_client = BytesMut::new();
        let mut changed = Vec::new();
        let mut client_closed = false;

        let stats = &*self.shared.stats;
        let counters = &stats.counters;
        let cap = self.settings.config.pool.max_prepared_statements as usize;
        let mut client = ClientIn {
            statements: &mut self.statements,
            counters,
            catalog: &server_pool.catalog,
            cap,
            shapes: &stats.shapes,
        };
        // Bytes already read (the message that started this transaction)
        // are scanned on the first pass.
        let mut to_server = conn.prepend.take().unwrap_or_default();
        let mut rescan = true;
        let (sr, sw) = conn.stream.split();
        let (cr, cw) = self.stream.split();
        loop {
            if t.reroute && t.pending == 0 && t.status != TxStatus::Idle && to_server.is_empty() {
                // The replica transaction went on (BEGIN READ ONLY): what
                // waited runs there and gets PostgreSQL's own answer.
                t.reroute = false;
                t.replica_guard = None;
                rescan = true;
            }
            if std::mem::take(&mut rescan)
                && let Err(e) = client.scan(
                    &mut self.buf,
                    &mut cscan,
                    t,
                    &mut conn.prepared,
                    &mut to_server,
                    &mut to_client,
                )
            {
                return TxEnd::ClientFatal(e.into());
            }
            // What the scan left starts at a message boundary: a message
            // that must be seen whole gets room for all of it at once.
            reserve_head(&mut self.buf, self.limit);
            if t.pending > 1 || to_client.len() > super::txn::MISROUTE_HOLD {
                // A second request in flight, or too much to hold: the
                // safety net covers one request's answer only.
                t.misroute.disarm();
            }
            if let super::txn::Misroute::Fired(_) = &t.misroute
                && t.pending == 0
                && t.expect.is_empty()
                && to_server.is_empty()
                && conn.buf.is_empty()
                && !sscan.mid_message()
                && t.status == TxStatus::Idle
                && let super::txn::Misroute::Fired(replay) = std::mem::take(&mut t.misroute)
            {
                // The refusal and what came with it never reach the client.
                to_client.clear();
                conn.tx = t.status;
                return TxEnd::Misrouted { replay };
            }
            let holding = t.misroute.holds();
            if t.terminated {
                client_closed = true;
            }
            if let (true, Some(f)) = (to_client.is_empty(), &t.server_fatal) {
                // The server ends the session under the client's
                // transaction (pg_terminate_backend, a timeout, a shutdown):
                // the client gets its FATAL, as it would directly, and then
                // its connection ends, as it would directly.
                let reason = format!("{} ({})", f.message, f.code);
                // The scan stopped at the (whole) FATAL message.
                let whole = (conn.buf.len() >= 5)
                    .then(|| checked_len(conn.buf[0], &conn.buf[1..5], SERVER_MESSAGE_LIMIT).ok())
                    .flatten()
                    .filter(|total| conn.buf.len() >= *total);
                let Some(total) = whole else {
                    return lost(reason, &cscan);
                };
                let fatal = conn.buf.split_to(total);
                return TxEnd::ServerFatal { reason, fatal };
            }
            if to_client.is_empty() && to_server.is_empty() {
                if client_closed {
                    return TxEnd::ClientGone {
                        mid_message: cscan.mid_message() || sscan.mid_message(),
                    };
                }
                if let (None, Some(reason)) = (self.pinned, t.pin) {
                    self.pinned = Some(reason);
                    Counters::add(&counters.pins);
                    tracing::info!(
                        client = info.id,
                        reason,
                        "client pinned to its server for the rest of its session"
                    );
                }
                if mode == PoolMode::Transaction
                    && self.pinned.is_none()
                    && t.is_idle()
                    && !cscan.mid_message()
                    && !sscan.mid_message()
                    && conn.buf.is_empty()
                {
                    conn.tx = t.status;
                    return TxEnd::Done;
                }
            }
            let idle_in_tx =
                !idle_tx_timeout.is_zero() && t.is_quiet() && t.status != TxStatus::Idle;
            let read_client = to_server.is_empty() && !client_closed && !t.terminated && !t.hold;
            // Sends first, without a wait: a socket is nearly always writable,
            // and most turns only send what was just scanned.
            let sent = if !to_server.is_empty() {
                unless_would_block(crate::protocol::io::try_send(sw.as_ref(), &mut to_server))
                    .map(Event::SentServer)
            } else if !to_client.is_empty() && !holding {
                unless_would_block(crate::protocol::io::try_send(cw.as_ref(), &mut to_client))
                    .map(Event::SentClient)
            } else {
                None
            };
            let event = if let Some(sent) = sent {
                sent
            } else if to_server.is_empty() && to_client.is_empty() && !idle_in_tx {
                // The usual wait, between a request sent and its answer:
                // polled by hand, without building a select! of futures.
                std::future::poll_fn(|cx| {
                    if let Poll::Ready(r) = poll_read_into(sr.as_ref(), &mut conn.buf, cx) {
                        return Poll::Ready(Event::ServerRead(r));
                    }
                    if read_client
                        && let Poll::Ready(r) = poll_read_into(cr.as_ref(), &mut self.buf, cx)
                    {
                        return Poll::Ready(Event::ClientRead(r));
                    }
                    info.nudge.poll_nudged(cx).map(|()| Event::Nudged)
                })
                .await
            } else {
                // `biased`: the branches are tried in order, without drawing
                // a random number per poll; none starves, as each one drains
                // what enables it (a send empties its buffer; reads stop
                // while what they brought waits to be sent).
                tokio::select! {
                    biased;
                    r = crate::protocol::io::send(sw.as_ref(), &mut to_server), if !to_server.is_empty() => Event::SentServer(r),
                    r = crate::protocol::io::send(cw.as_ref(), &mut to_client), if !to_client.is_empty() && !holding => Event::SentClient(r),
                    r = read_into(sr.as_ref(), &mut conn.buf), if to_client.is_empty() || holding => Event::ServerRead(r),
                    r = read_into(cr.as_ref(), &mut self.buf), if read_client => Event::ClientRead(r),
                    // Made on first poll (the timer and its clock read cost
                    // nothing while the branch is off), afresh each time round.
                    _ = async { tokio::time::sleep(idle_tx_timeout).await }, if idle_in_tx => Event::IdleTimeout,
                    _ = info.nudge.nudged() => Event::Nudged,
                }
            };
            match event {
                Event::SentServer(r) => {
                    if let Err(e) = r {
                        return lost(e.to_string(), &cscan);
                    }
                    if to_server.is_empty() {
                        to_server = BytesMut::new();
                    }
                }
                Event::SentClient(r) => {
                    match r {
                        Ok(n) => t.timing.delta.sent += n as u64,
                        Err(_) => {
                            client_closed = true;
                            to_client.clear();
                            to_server.clear();
                        }
                    }
                    if to_client.is_empty() {
                        to_client = BytesMut::new();
                    }
                }
                Event::ServerRead(r) => {
                    match r {
                        Ok(0) => return lost("server closed the connection".into(), &cscan),
                        Err(e) => return lost(e.to_string(), &cscan),
                        Ok(_) => {}
                    }
                    if let Err(e) = scan_server(
                        &mut conn.buf,
                        &mut sscan,
                        t,
                        &mut changed,
                        &mut to_client,
                        client.statements,
                    ) {
                        return lost(e.to_string(), &cscan);
                    }
                    apply_undos(t.expect.take_undos(), client.statements, &mut conn.prepared);
                    self.pool.confirm_statements(&t.expect.take_confirmed());
                    for (hash, shape) in t.expect.take_described() {
                        let shape = crate::server::prepared::Described::now(shape);
                        conn.prepared.set_shape(hash, shape);
                        // The client statements just prepared here are
                        // promised this shape.
                        for stmt in client.statements.values().filter(|s| s.hash == hash) {
                            let _ = stmt.promised.set(shape);
                        }
                    }
                    if t.hold && !t.expect.describing() {
                        // The held message goes on; if preparing it failed
                        // (the client got the error), the server skips to
                        // the Sync and so does the client's stream.
                        t.hold = false;
                        t.client_skip |= t.expect.skipping();
                        rescan = true;
                    }
                    for (hash, version) in t.broken.drain(..) {
                        server_pool.catalog.mark_broken(hash, version);
                    }
                    if std::mem::take(&mut t.schema_changed) {
                        // DDL ended: every server prepares its statements
                        // afresh before their next use, and the function
                        // volatilities are loaded again.
                        server_pool.catalog.schema_changed();
                        if let Some(h) = &self.health {
                            h.functions_stale
                                .store(true, std::sync::atomic::Ordering::Release);
                        }
                    }
                    for (hash, generation, error) in t.stale.drain(..) {
                        // Every server of the database closes this text's
                        // statement before preparing it again; clients
                        // that prepared it before get PostgreSQL's 0A000.
                        if server_pool.catalog.mark_stale(hash, generation, &error) {
                            t.timing.delta.prepared_invalidations += 1;
                            tracing::info!(
                                statement = %crate::server::prepared::server_name(hash),
                                "a statement's result changed (a migration?): prepared afresh at its next use"
                            );
                        }
                    }
                    t.pending = t.pending.saturating_sub(t.expect.take_skipped_ready());
                    if !t.timing.done.is_empty() || !t.timing.xacts_done.is_empty() {
                        stmt_ctx.record(stats, &server_pool.traffic, &self.params, &mut t.timing);
                    }

                    for (k, v) in changed.drain(..) {
                        if is_tracked(&k) && self.params.get(&k) != Some(&v) {
                            Arc::make_mut(&mut self.params).insert(k.clone(), v.clone());
                        }
                        conn.params.insert(k, v);
                        conn.synced_to = None;
                    }
                    if client_closed {
                        to_client.clear();
                    }
                }
                Event::ClientRead(r) => match r {
                    Ok(0) | Err(_) => client_closed = true,
                    Ok(_) => rescan = true,
                },
                Event::IdleTimeout => {
                    return TxEnd::ClientFatal(ClientError::IdleTransactionTimeout(
                        idle_tx_timeout,
                    ));
                }
                // KILL wakes this; a shutdown (or a parking sweep) does not
                // interrupt a transaction.
                Event::Nudged => {
                    if info.eviction() == Eviction::Killed {
                        return TxEnd::Killed;
                    }
                }
            }
        }
    }

    /// A read the replica refused as a write: its statement goes to the
    /// primary from now on (logged once, literals masked), and the client's
    /// bytes are put back to run there now.
    fn misrouted(&mut self, replay: BytesMut) {
        if let (Some(h), Some(sql)) = (
            &self.health,
            first_statement(&replay, self.limit, &self.statements),
        ) {
            let fingerprint = crate::stats::fingerprint::hash_and_template(sql).0;
            if h.remember_misrouted(fingerprint) {
                let shape = self.shared.stats.shapes.shape(sql);
                tracing::warn!(
                    database = %self.database,
                    statement = %shape.text,
                    "a replica refused a read as a write (25006): run again on the primary, and sent there from now on (a function that writes? list it in write_functions)"
                );
            }
        }
        let mut buf = BytesMut::with_capacity(replay.len() + self.buf.len());
        buf.extend_from_slice(&replay);
        buf.extend_from_slice(&self.buf);
        self.buf = buf;
    }

    /// After a transaction that changed session settings, learns the
    /// server's settings: they are now the client's (what it SET stays its
    /// own) and the server's known state.
    async fn refresh_params(&mut self, server: &mut PooledConn) {
        let conn = server.conn();
        Counters::add(&self.shared.stats.counters.param_refreshes);
        match conn.session_settings(&self.custom_params).await {
            Ok(rows) => {
                let defaults = self.defaults.clone();
                // What the server has now: its reported parameters and every
                // setting this session changed.
                let mut actual: BTreeMap<String, String> = conn
                    .params
                    .iter()
                    .filter(|(k, _)| is_tracked(k) && defaults.contains_key(*k))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                let mut changed = Vec::new();
                for (k, v) in rows {
                    let k = canonical(&k, &defaults);
                    if is_tracked(&k) && crate::server::params::valid_name(&k) {
                        changed.push(k.clone());
                        actual.insert(k, v);
                    }
                }
                // What the client has: the same, except that parameters it
                // did not change (or RESET) are its startup values.
                let mut mine = actual.clone();
                for (k, v) in self.startup.iter() {
                    if !changed.contains(k) {
                        mine.insert(k.clone(), v.clone());
                    }
                }
                conn.params.retain(|k, _| !is_tracked(k));
                conn.params.extend(actual);
                conn.synced_to = None;
                self.params = Arc::new(mine);
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not read session settings; closing that server");
                conn.tx = TxStatus::Failed;
            }
        }
    }

    /// The client left (or must be closed) while holding `server`: make the
    /// server clean for the next client, or close it.
    async fn clean_up(&mut self, mut server: PooledConn, t: &Tracker, mid_message: bool) {
        watchdog::phase(Phase::CleanUp);
        let conn = server.conn();
        if self.pinned.is_some() {
            // Its session state (listeners, locks, temp tables) dies with it.
            return server.release(Release::Close);
        }
        if mid_message || !t.is_quiet() || !conn.buf.is_empty() {
            // A query or COPY is still running: stop it, then drop the connection.
            let key = conn.cancel_key;
            if t.pending > 0 {
                let _ = send_cancel(key).await;
            }
            server.release(Release::Close);
            return;
        }
        let pool_settings = self.pool.settings();
        let reset = if pool_settings.mode == PoolMode::Session {
            Some(pool_settings.server_reset_query.clone()).filter(|q| !q.is_empty())
        } else {
            None
        };
        let sql = match (t.status, reset) {
            (TxStatus::Idle, None) => return server.release(Release::Reuse),
            (TxStatus::Idle, Some(reset)) => reset,
            (_, Some(reset)) => format!("ROLLBACK; {reset}"),
            (_, None) => "ROLLBACK".to_owned(),
        };
        let ok = matches!(
            tokio::time::timeout(CLEANUP_TIMEOUT, conn.run_internal(&sql)).await,
            Ok(Ok(_))
        ) && conn.tx == TxStatus::Idle;
        tracing::debug!(server = conn.id, ok, "cleaned up after departed client");
        server.release(if ok { Release::Reuse } else { Release::Close });
    }

    /// Tells the client its server died: every owed ReadyForQuery gets an
    /// error first; an unsynced batch is skipped until its Sync; a client idle
    /// in the transaction gets the error on its next request.
    fn server_lost(&mut self, t: &Tracker, reason: String) {
        let err = || ClientError::ServerLost(reason.clone());
        for _ in 0..t.pending {
            err().write_to(&mut self.out);
            write::ready_for_query(&mut self.out, TxStatus::Idle);
        }
        if t.unsynced {
            err().write_to(&mut self.out);
            self.skip_until_sync = true;
        } else if t.pending == 0 && t.status != TxStatus::Idle {
            self.owe_error = Some(err());
        }
    }
}

/// Who ran statements where, for per-query statistics and the slow log.
struct StatementCtx<'a> {
    database: &'a Arc<str>,
    user: &'a str,
    backend: &'a Arc<str>,
    role: Role,
    client: Option<std::net::SocketAddr>,
    slow_us: u64,
}

impl StatementCtx<'_> {
    /// Records finished statements and transactions: latency histograms,
    /// per-query statistics, and slow statements (listed and logged with
    /// their normalized text only).
    fn record(
        &self,
        stats: &crate::stats::Stats,
        traffic: &crate::stats::Traffic,
        params: &BTreeMap<String, String>,
        timing: &mut super::timing::Timing,
    ) {
        for us in timing.xacts_done.drain(..) {
            traffic.transaction_latency(us);
        }
        for f in timing.done.drain(..) {
            traffic.statement_latency(f.us);
            let Some(shape) = f.shape else { continue };
            if stats.per_query {
                stats
                    .queries
                    .record(self.database, &shape, self.role, f.us, f.rows, f.error);
            }
            if f.us <= self.slow_us && self.slow_us > 0 {
                continue;
            }
            timing.delta.slow += 1;
            let app = params.get("application_name").map_or("", |s| s.as_str());
            let client = self.client.map(|a| a.to_string()).unwrap_or_default();
            tracing::warn!(
                target: "tidepool::slow_query",
                database = &**self.database,
                user = self.user,
                backend = &**self.backend,
                role = self.role.as_str(),
                application_name = app,
                client_addr = %client,
                duration_ms = f.us as f64 / 1000.0,
                rows = f.rows,
                error = f.error,
                fingerprint = %format_args!("{:016x}", shape.id),
                query = &*shape.text,
                "slow query"
            );
            stats.slow.push(SlowQuery {
                at: std::time::SystemTime::now(),
                database: self.database.clone(),
                user: self.user.into(),
                backend: self.backend.clone(),
                role: self.role,
                application_name: app.to_owned(),
                client_addr: client,
                duration_us: f.us,
                rows: f.rows,
                error: f.error,
                fingerprint: shape.id,
                query: shape.text.clone(),
            });
        }
    }
}

/// The kept tracker (made when there is none yet), for its statement memo
/// before a transaction has a server.
fn spare_tracker(spare: &mut Option<Box<Tracker>>, policy: Policy) -> &mut Tracker {
    spare.get_or_insert_with(|| Box::new(Tracker::new(TxStatus::Idle, policy)))
}

/// The SQL of the message at the head of `b` that starts a transaction, if
/// it has one (`statements`: the client's named statements).
fn first_statement<'a>(
    b: &'a [u8],
    limit: usize,
    statements: &'a HashMap<String, Arc<Statement>>,
) -> Option<&'a str> {
    if b.len() < 5 {
        return None;
    }
    let total = checked_len(b[0], &b[1..5], limit).ok()?;
    let body = b.get(5..total)?;
    let mut body = crate::protocol::messages::Body::new(body, "first message");
    match FrontendTag::from_byte(b[0]) {
        FrontendTag::Query => body.cstr().ok(),
        FrontendTag::Parse => {
            body.cstr().ok()?;
            body.cstr().ok()
        }
        FrontendTag::Bind => {
            body.cstr().ok()?;
            let name = body.cstr().ok()?;
            statements.get(name).map(|s| s.query.as_str())
        }
        _ => None,
    }
}

/// Makes room for the rest of the message whose header starts `buf` (its
/// length already checked against `limit` by the scan that left it there).
fn reserve_head(buf: &mut BytesMut, limit: usize) {
    if buf.len() >= 5
        && let Ok(total) = checked_len(buf[0], &buf[1..5], limit)
        && total > buf.len()
    {
        buf.reserve(total - buf.len());
    }
}

/// Appends `chunk` to `out` without copying when `out` is empty.
fn append(out: &mut BytesMut, chunk: BytesMut) {
    if out.is_empty() {
        *out = chunk;
    } else {
        out.unsplit(chunk);
    }
}

/// The client → server half of forwarding.
struct ClientIn<'a> {
    statements: &'a mut HashMap<String, Arc<Statement>>,
    counters: &'a Counters,
    catalog: &'a crate::pool::Catalog,
    cap: usize,
    shapes: &'a Fingerprints,
}

impl ClientIn<'_> {
    /// Moves what can be sent from `buf` to `to_server`, handling the
    /// messages the scanner stops at (named statements, refused features,
    /// messages dropped after an error), and puts answers tidepool now owes
    /// at the head of the stream into `to_client`.
    fn scan(
        &mut self,
        buf: &mut BytesMut,
        cscan: &mut Scanner,
        t: &mut Tracker,
        prepared: &mut ServerStatements,
        to_server: &mut BytesMut,
        to_client: &mut BytesMut,
    ) -> Result<(), ProtocolError> {
        loop {
            let s = cscan.scan(buf, &mut t.client_side(Some(self.shapes)))?;
            t.timing.delta.received += s.forward as u64;
            let chunk = buf.split_to(s.forward);
            if let super::txn::Misroute::Armed(replay) = &mut t.misroute {
                if replay.len() + chunk.len() > super::txn::MISROUTE_HOLD {
                    t.misroute = super::txn::Misroute::Off;
                } else {
                    replay.extend_from_slice(&chunk);
                }
            }
            append(to_server, chunk);
            if !s.stopped || t.terminated || t.reroute {
                break;
            }
            let total = checked_len(buf[0], &buf[1..5], usize::MAX)?;
            let msg = buf.split_to(total);
            t.timing.delta.received += total as u64;
            // tidepool rewrites or answers this one itself: no replay.
            t.misroute.disarm();
            Handler {
                statements: self.statements,
                prepared,
                t,
                to_server,
                counters: self.counters,
                catalog: self.catalog,
                cap: self.cap,
                shapes: Some(self.shapes),
            }
            .handle(msg[0], &msg)?;
            if t.hold {
                // The message waits for the server's answer; it is handed
                // over again then, and counted then.
                t.timing.delta.received -= total as u64;
                let mut msg = msg;
                msg.unsplit(std::mem::take(buf));
                *buf = msg;
                break;
            }
        }
        t.expect.take_synthetic(to_client);
        apply_undos(t.expect.take_undos(), self.statements, prepared);
        t.pending = t.pending.saturating_sub(t.expect.take_skipped_ready());
        Ok(())
    }
}

/// The server → client half: forwards what may pass, drops answers to
/// tidepool's own messages, inserts tidepool's answers in order.
fn scan_server(
    sbuf: &mut BytesMut,
    sscan: &mut Scanner,
    t: &mut Tracker,
    changed: &mut Vec<(String, String)>,
    to_client: &mut BytesMut,
    statements: &HashMap<String, Arc<Statement>>,
) -> Result<(), ProtocolError> {
    loop {
        let s = sscan.scan(sbuf, &mut t.server_side(changed))?;
        append(to_client, sbuf.split_to(s.forward));
        if !s.stopped || t.server_fatal.is_some() {
            if !sscan.mid_message() && t.server_fatal.is_none() {
                // Answers tidepool owes right after the last server message
                // (an error it answered for a query the client sent before
                // this answer was over) go now: no server message may ever
                // come to carry them.
                t.expect.take_synthetic(to_client);
            }
            return Ok(());
        }
        if std::mem::take(&mut t.rename_error) {
            // An error naming tidepool's statement: the client's own name
            // goes in, and the message is scanned again as it now reads.
            let total = checked_len(sbuf[0], &sbuf[1..5], SERVER_MESSAGE_LIMIT)?;
            let msg = sbuf.split_to(total);
            let mut renamed = BytesMut::with_capacity(total + sbuf.len());
            write::message(&mut renamed, msg[0], |b| {
                b.put_slice(&rewrite_error(
                    &msg[5..],
                    statements,
                    t.expect.head_position_shift(),
                ))
            });
            renamed.extend_from_slice(sbuf);
            *sbuf = renamed;
            t.error_renamed = true;
            continue;
        }
        if t.expect.head_is_synthetic() {
            t.expect.take_synthetic(to_client);
            continue;
        }
        if t.expect.head_is_internal() {
            // An answer to tidepool's own query: drop it whole.
            if sbuf.len() < 5 {
                return Ok(());
            }
            let total = checked_len(sbuf[0], &sbuf[1..5], SERVER_MESSAGE_LIMIT)?;
            if sbuf.len() < total {
                return Ok(());
            }
            let msg = sbuf.split_to(total);
            if msg[0] == crate::protocol::BackendTag::ReadyForQuery.byte() {
                t.status = crate::protocol::messages::ready_for_query(&msg[5..])?;
                t.pending = t.pending.saturating_sub(1);
                t.expect.on_message(msg[0]);
            } else if msg[0] == crate::protocol::BackendTag::ErrorResponse.byte() {
                tracing::debug!("tidepool's own PREPARE failed on the server");
            }
            continue;
        }
        if sbuf.len() >= 5 && t.expect.swallows(sbuf[0]) {
            use crate::protocol::BackendTag as B;
            let tag = sbuf[0];
            let kind = B::from_byte(tag);
            let total = match kind {
                // The server failing where tidepool made it fail, and the
                // answers to a hidden Describe.
                B::ErrorResponse | B::ParameterDescription | B::RowDescription | B::NoData => {
                    checked_len(tag, &sbuf[1..5], SERVER_MESSAGE_LIMIT)?
                }
                _ if checked_len(tag, &sbuf[1..5], 5)? != 5 => {
                    return Err(ProtocolError::Malformed("ParseComplete/CloseComplete"));
                }
                _ => 5,
            };
            if sbuf.len() < total {
                return Ok(());
            }
            let msg = sbuf.split_to(total);
            t.expect.on_hidden_description(tag, &msg[5..]);
            continue;
        }
        return Ok(());
    }
}

/// An ErrorResponse body as the client would have had it: statement names
/// its own, the position (`P`) in its own text (`shift` characters back).
fn rewrite_error(body: &[u8], statements: &HashMap<String, Arc<Statement>>, shift: i32) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len());
    let mut fields = body;
    while let [tag, rest @ ..] = fields {
        if *tag == 0 {
            break;
        }
        let end = memchr::memchr(0, rest).unwrap_or(rest.len());
        let value = &rest[..end];
        out.push(*tag);
        match std::str::from_utf8(value)
            .ok()
            .and_then(|v| v.parse::<i32>().ok())
        {
            Some(p) if *tag == b'P' && shift != 0 && p - shift >= 1 => {
                out.extend_from_slice((p - shift).to_string().as_bytes());
            }
            _ => out.extend_from_slice(&rename_statements(value, statements)),
        }
        out.push(0);
        fields = rest.get(end + 1..).unwrap_or(&[]);
    }
    out.push(0);
    out
}

/// `text` with each `"tidepool_<hash>"` replaced by the client's name for
/// that statement (the first in name order when it gave it several).
fn rename_statements(body: &[u8], statements: &HashMap<String, Arc<Statement>>) -> Vec<u8> {
    let mark = crate::client::txn::INTERNAL_NAME_MARK;
    let mut out = Vec::with_capacity(body.len());
    let mut rest = body;
    while let Some(at) = memchr::memmem::find(rest, mark) {
        let hex_start = at + mark.len();
        let hash = rest
            .get(hex_start..hex_start + 16)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u64::from_str_radix(h, 16).ok());
        let name = hash.and_then(|h| {
            statements
                .iter()
                .filter(|(_, s)| s.hash == h)
                .map(|(n, _)| n)
                .min()
        });
        match name {
            Some(name) => {
                out.extend_from_slice(&rest[..at + 1]);
                out.extend_from_slice(name.as_bytes());
                rest = &rest[hex_start + 16..];
            }
            None => {
                out.extend_from_slice(&rest[..hex_start]);
                rest = &rest[hex_start..];
            }
        }
    }
    out.extend_from_slice(rest);
    out
}

fn lost(reason: String, cscan: &Scanner) -> TxEnd {
    TxEnd::ServerLost {
        reason,
        client_skip: cscan.remaining(),
    }
}

async fn read_into(stream: &TcpStream, buf: &mut BytesMut) -> std::io::Result<usize> {
    std::future::poll_fn(|cx| poll_read_into(stream, buf, cx)).await
}

/// Reads what `stream` has into `buf` (growing it when nearly full), or
/// registers for readability.
fn poll_read_into(
    stream: &TcpStream,
    buf: &mut BytesMut,
    cx: &mut std::task::Context<'_>,
) -> Poll<std::io::Result<usize>> {
    if buf.capacity() - buf.len() < READ_ROOM {
        buf.reserve(buf.capacity().clamp(READ_START, READ_CHUNK));
    }
    crate::protocol::io::poll_read(stream, buf, cx)
}

/// `None` for a send that found the socket full (wait for it instead).
fn unless_would_block(r: std::io::Result<usize>) -> Option<std::io::Result<usize>> {
    match r {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
        r => Some(r),
    }
}

/// What ended one turn of [`Session::forward`].
enum Event {
    SentServer(std::io::Result<usize>),
    SentClient(std::io::Result<usize>),
    ServerRead(std::io::Result<usize>),
    ClientRead(std::io::Result<usize>),
    IdleTimeout,
    Nudged,
}
