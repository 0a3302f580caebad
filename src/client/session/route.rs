//! Choosing where a transaction runs (primary or a replica, from the
//! statement's class, hints, health and read-your-writes) and checking a
//! server out of that backend's pool.

use super::ahead::Ahead;
use super::*;
use crate::router::hints::Hint;
use crate::router::policy;

impl Session {
    /// Decides where the transaction starting at the front of the buffer
    /// runs (`router::policy`): reads and read-only transactions to a
    /// healthy replica that has replayed this client's writes, everything
    /// else to the primary.
    pub(super) fn choose_route(&mut self) -> (Route, Class) {
        let replayed = std::mem::take(&mut self.replayed);
        let Some(h) = &self.health else {
            return (Route::Primary, Class::Write);
        };
        // Session mode: a server for the whole session, which may write at
        // any time: the primary's.
        if h.replicas.is_empty()
            || self.pinned.is_some()
            || self.pool.hot.mode() == crate::config::PoolMode::Session
        {
            return (Route::Primary, Class::Write);
        }
        let functions = h.functions.load();
        let begun = self.begun();
        let (class, hint) = match first_statement(&self.buf, self.limit, &self.statements) {
            // A statement a replica refused before goes to the primary.
            Some(sql)
                if h.any_misrouted()
                    && h.misrouted(crate::stats::fingerprint::hash_and_template(sql).0) =>
            {
                (Class::Write, None)
            }
            Some(sql) => {
                let classifier = &self.settings.classifier;
                let mut class = self.memo.class(sql, classifier, functions.as_deref());
                if begun == policy::Begun::ReadOnly
                    && class == Class::Write
                    && !classifier.would_parse_long(sql)
                    && classifier.classify(sql).class == Class::Read
                {
                    // A read but for its functions' volatility, in a block
                    // the client declared read-only: nothing in it can
                    // write, and the declaration is what sends such reads
                    // to a replica.
                    class = Class::Read;
                }
                (class, policy::hint(sql, classifier))
            }
            None => (Class::Write, None),
        };
        let mut class = class;
        let mut forced = replayed
            || param_facts(&mut self.param_facts, &self.params, self.listed.info.id).forced_primary
            || self.pool.serializable_on_replicas();
        if !forced && (hint == Some(Hint::Replica) || policy::fits_replica(class, begun)) {
            // An extended-protocol batch goes to a replica only whole and
            // all of it fit to run there (see `ahead`), judged statement by
            // statement as a replica's transaction judges them.
            let (memo, classifier) = (&mut self.memo, &self.settings.classifier);
            let fit = |sql: &str| {
                policy::replica_may_run(sql, classifier, || {
                    memo.class(sql, classifier, functions.as_deref())
                })
            };
            match super::ahead::batch(&self.buf, self.limit, &self.statements, fit) {
                Ahead::NeedsPrimary => (class, forced) = (Class::Write, true),
                Ahead::NotAllHere => forced = true,
                Ahead::NotABatch | Ahead::ReplicaMay => {}
            }
        }
        let request = policy::Request {
            class,
            hint,
            forced_primary: forced,
            begun,
            last_write: self.last_write,
        };
        (
            policy::choose(h, &self.settings.config.routing, &request),
            class,
        )
    }

    /// Classifies the long statements of the transaction at the head of
    /// the buffer on a blocking thread, into the classifier's cache, before
    /// [`Self::choose_route`] asks for them: parsing is proportional to the
    /// text (a 200 KiB `IN` list takes a few hundred milliseconds), and it
    /// must not hold the event loop and every other client on it. Called
    /// only when that much is buffered.
    pub(super) async fn classify_long_ahead(&mut self) {
        let Some(h) = &self.health else {
            return;
        };
        if h.replicas.is_empty() || self.pinned.is_some() {
            return;
        }
        let classifier = self.settings.classifier.clone();
        let long: Vec<String> = texts_ahead(&self.buf, self.limit, &self.statements)
            .into_iter()
            .filter(|sql| classifier.would_parse_long(sql))
            .map(str::to_owned)
            .collect();
        if long.is_empty() {
            return;
        }
        let work = tokio::task::spawn_blocking(move || {
            for sql in &long {
                classifier.classify(sql);
            }
        });
        if let Err(e) = work.await {
            tracing::warn!(error = %e, "classifying a long statement failed; it goes to the primary");
        }
    }

    /// Bookkeeping once a routed transaction is over (a replica's is its
    /// guard's, dropped with it).
    pub(super) fn after_route(&mut self, route: Route, class: Class) {
        if let (Some(h), Route::Primary | Route::NoReplica) = (&self.health, route)
            && let Some(at) = policy::ran_on_primary(h, class)
        {
            self.last_write = Some(at);
        }
    }

    /// Checks out a server on `route`. A replica that cannot give one is
    /// banned and the next choice is tried, before anything ran there. A
    /// replica's transaction comes with its guard.
    pub(super) async fn acquire_routed(
        &mut self,
        mut route: Route,
    ) -> Result<(PooledConn, Route, Option<policy::OnReplica>), ClientError> {
        loop {
            match route {
                Route::Primary => {
                    let pool = self.writer_pool();
                    return Ok((self.acquire(&pool).await?, Route::Primary, None));
                }
                Route::NoReplica => {
                    return Err(ClientError::ServerConnect {
                        database: self.database.clone(),
                        reason: "no healthy replica (replica_fallback = \"error\")".into(),
                    });
                }
                Route::Replica(i) => {
                    let pool = self.replica_pool(i);
                    let guard = self.health.clone().map(|h| policy::OnReplica::new(h, i));
                    match self.acquire(&pool).await {
                        Ok(s) => {
                            if let Some(g) = &guard {
                                g.started();
                            }
                            return Ok((s, route, guard));
                        }
                        Err(ClientError::ReplicaSerializable) => {
                            // Not the replica's fault: this user's
                            // transactions are serializable by default.
                            self.pool.replicas_refuse_serializable();
                            route = Route::Primary;
                        }
                        Err(e) => {
                            if let Some(g) = guard {
                                g.failed(&format!("checkout failed: {e}"));
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

    /// The pool of the backend that takes writes: the primary's, or a
    /// promoted replica's after a failover (`[routing] failover`).
    fn writer_pool(&mut self) -> Arc<Pool> {
        match self.health.as_ref().map(|h| h.writer()) {
            Some(w) if w > 0 => self.replica_pool(w - 1),
            _ => self.pool.clone(),
        }
    }

    pub(super) fn replica_pool(&mut self, i: usize) -> Arc<Pool> {
        if self.replica_pools.len() <= i {
            self.replica_pools.resize(i + 1, None);
        }
        if let Some(p) = &self.replica_pools[i] {
            return p.clone();
        }
        let shared = self.shared.clone();
        let settings = self.settings.clone();
        let secret = self.secret().cloned();
        let pool = match settings.config.databases.get(&self.database) {
            Some(db) => shared.registry.pool_for(
                &settings.config,
                &self.database,
                db,
                &self.user,
                secret.as_ref(),
                self.client_key,
                i + 1,
            ),
            None => self.pool.clone(),
        };
        self.replica_pools[i] = Some(pool.clone());
        pool
    }

    /// `query_wait_notify`: tells the waiting client who holds the pool.
    async fn notify_waiting(&mut self, pool: &Arc<Pool>, waited_us: u64) {
        let holders = self.pool_holders(pool);
        let mut out = BytesMut::new();
        write::notice(&mut out, &holders.notice(waited_us));
        let _ = tokio::time::timeout(Duration::from_secs(1), self.stream.send_all(&mut out)).await;
    }

    /// Checks out a server and brings its session parameters to ours.
    pub(super) async fn acquire(&mut self, pool: &Arc<Pool>) -> Result<PooledConn, ClientError> {
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
            let notify_us = self.settings.config.pool.query_wait_notify.as_micros() as u64;
            let mut notified = false;
            loop {
                let done = std::future::poll_fn(|cx| {
                    if let Poll::Ready(r) = checkout.as_mut().poll(cx) {
                        return Poll::Ready(Some(r));
                    }
                    info.poll_nudged(cx).map(|()| None)
                })
                .await;
                if let Some(r) = done {
                    break r;
                }
                if info.eviction().leaves_now() {
                    info.idle();
                    return Err(ClientError::Killed);
                }
                if info.wait_expired() {
                    let limit = pool.settings().query_wait_timeout;
                    let holders = self.pool_holders(pool);
                    info.idle();
                    let mut e = pool_error(pool, crate::pool::PoolError::Timeout(limit));
                    if let ClientError::PoolTimeout { detail, .. } = &mut e {
                        *detail = holders.detail();
                    }
                    return Err(e);
                }
                if !notified && notify_us > 0 && info.waited_us() >= notify_us {
                    // query_wait_notify: told once per wait.
                    notified = true;
                    // Boxed: its timer would size every checkout's state.
                    Box::pin(self.notify_waiting(pool, info.waited_us())).await;
                }
                // Waited reserve_pool_timeout: a reserve connection, if the
                // pool has one left (the checkout then completes with it).
                if info.waited_us()
                    >= self.settings.config.pool.reserve_pool_timeout.as_micros() as u64
                    && pool.grant_reserve(&waiter)
                {
                    crate::stats::Counters::add(&self.shared.stats.counters.limits.reserve_pool);
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
        if pooled.conn().serializable_default
            && self
                .health
                .as_ref()
                .is_some_and(|h| h.writer() != pool.backend)
        {
            // A replica's connection opened serializable by default: it
            // would refuse whatever this client runs (0A000).
            info.idle();
            pooled.release(Release::Reuse);
            return Err(ClientError::ReplicaSerializable);
        }
        let waited = started.map_or(Duration::ZERO, |s| {
            Duration::from_micros(crate::clock::precise_us().saturating_sub(s))
        });
        pool.traffic.assigned(waited);
        let us = waited.as_micros() as u64;
        self.pool_wait_us = us;
        info.counts.waited(us);
        self.app.waited(us);
        info.active(pooled.conn().id);
        if pooled.pool().catalog.changers_due() {
            pooled = Box::pin(self.read_changers(pooled)).await?;
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
        // Lent from here: cancel requests reach it (see
        // `list::cancel_target`), now that tidepool's own queries are done.
        if let Some(l) = &pooled.conn().listed {
            l.info.lent(info.id);
        }
        Ok(pooled)
    }
}

/// Who holds a pool's servers while a client waits: for the
/// `query_wait_notify` NOTICE and the `query_wait_timeout` error.
struct Holders {
    pool: String,
    size: usize,
    cap: u32,
    waiting: usize,
    /// (application_name, clients holding, longest hold in seconds), most
    /// clients first.
    by_app: Vec<(String, usize, f64)>,
}

impl Holders {
    fn held_by(&self) -> String {
        if self.by_app.is_empty() {
            return "no client (servers are opening or closing)".to_owned();
        }
        self.by_app
            .iter()
            .take(3)
            .map(|(app, n, longest)| {
                let app = if app.is_empty() {
                    "(no application_name)"
                } else {
                    app
                };
                format!("{app} x{n} (longest {longest:.1} s)")
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn limits(&self) -> String {
        let cap = if self.cap > 0 {
            format!(", max_db_connections {}", self.cap)
        } else {
            String::new()
        };
        format!(
            "pool size {}{cap}, {} clients waiting",
            self.size, self.waiting
        )
    }

    /// The `query_wait_notify` NOTICE.
    fn notice(&self, waited_us: u64) -> String {
        format!(
            "waiting {:.1} s for a server connection of pool {}: {}; held by {} (query_wait_notify)",
            waited_us as f64 / 1e6,
            self.pool,
            self.limits(),
            self.held_by()
        )
    }

    /// What the `query_wait_timeout` error adds after its first words.
    fn detail(&self) -> String {
        format!(
            "; {}; held by {}; raise default_pool_size (or max_db_connections) if the servers are busy, or see SHOW LEAKS and SHOW CLIENTS for clients that hold them idle",
            self.limits(),
            self.held_by()
        )
    }
}

impl Session {
    /// The clients holding and waiting for `pool`'s servers now (a rare
    /// path: a long wait or its end).
    fn pool_holders(&self, pool: &Pool) -> Holders {
        let now = crate::clock::coarse_us();
        let mut waiting = 0;
        let mut apps: std::collections::HashMap<String, (usize, f64)> = Default::default();
        for c in crate::snapshot::clients(&self.shared) {
            if c.database != pool.database || c.user != pool.user || c.backend != pool.backend {
                continue;
            }
            match c.state {
                crate::client::list::ClientState::Waiting => waiting += 1,
                crate::client::list::ClientState::Active => {
                    let held = now.saturating_sub(c.request_time_us) as f64 / 1e6;
                    let e = apps.entry(c.application_name).or_default();
                    e.0 += 1;
                    e.1 = e.1.max(held);
                }
                _ => {}
            }
        }
        let mut by_app: Vec<(String, usize, f64)> =
            apps.into_iter().map(|(a, (n, l))| (a, n, l)).collect();
        by_app.sort_by(|a, b| b.1.cmp(&a.1).then(b.2.total_cmp(&a.2)));
        let cap = self
            .settings
            .config
            .databases
            .get(&pool.database)
            .and_then(|d| d.max_db_connections)
            .unwrap_or(self.settings.config.pool.max_db_connections);
        Holders {
            pool: format!("{}/{}", pool.database, pool.user),
            size: pool.hot.size(),
            cap,
            waiting,
            by_app,
        }
    }
}

impl Session {
    /// What routing and statement sharing read of the session's
    /// parameters, remembered for its very parameter set.
    pub(super) fn param_facts(&mut self) -> ParamFacts {
        param_facts(&mut self.param_facts, &self.params, self.listed.info.id)
    }
}

/// Statements at least this long are classified off the event loop
/// ([`Session::classify_long_ahead`]).
pub(super) const INLINE_CLASSIFY_BYTES: usize = crate::router::classify::INLINE_BYTES;

/// The statement texts of the transaction at the head of `b` that routing
/// reads: a Query's, or each Parse's (and a Bind's named statement's) up to
/// the first Sync; only messages all here.
fn texts_ahead<'a>(
    b: &'a [u8],
    limit: usize,
    statements: &'a std::collections::HashMap<String, Arc<crate::server::prepared::Statement>>,
) -> Vec<&'a str> {
    let mut texts = Vec::new();
    let mut rest = b;
    while rest.len() >= 5 {
        let Ok(total) = crate::protocol::scan::checked_len(rest[0], &rest[1..5], limit) else {
            break;
        };
        if rest.len() < total {
            break;
        }
        let tag = crate::protocol::FrontendTag::from_byte(rest[0]);
        if let Some(sql) = first_statement(&rest[..total], limit, statements) {
            texts.push(sql);
        }
        if matches!(
            tag,
            crate::protocol::FrontendTag::Query | crate::protocol::FrontendTag::Sync
        ) {
            break;
        }
        rest = &rest[total..];
    }
    texts
}

/// What routing and statement sharing read of a session's parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ParamFacts {
    /// `tidepool.route = primary`, or transactions serializable by default
    /// (a hot standby cannot run them: 0A000).
    pub forced_primary: bool,
    /// The session's parse settings (`server::params::parse_context`) and
    /// a context of this client's alone (see `Tracker::statement_context`).
    pub parse_context: (u64, u64),
    /// Statistics and logs cannot tell this session's literals apart
    /// (`stats::fingerprint::literals_unreadable`).
    pub opaque_literals: bool,
}

/// The facts of `params` (client `client`'s); `cache` remembers them for
/// that very parameter set, so the map is read again only when the
/// parameters changed.
fn param_facts(
    cache: &mut Option<(ParamSet, ParamFacts)>,
    params: &ParamSet,
    client: u64,
) -> ParamFacts {
    if let Some((seen, facts)) = cache
        && Arc::ptr_eq(seen, params)
    {
        return *facts;
    }
    let is = |k: &str, v: &str| params.get(k).is_some_and(|x| x.eq_ignore_ascii_case(v));
    let shared = crate::server::params::parse_context(params);
    let facts = ParamFacts {
        forced_primary: is(policy::ROUTE_SETTING, "primary")
            || is("default_transaction_isolation", "serializable"),
        parse_context: (
            shared,
            shared ^ client.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 1,
        ),
        opaque_literals: crate::stats::fingerprint::literals_unreadable(params),
    };
    *cache = Some((params.clone(), facts));
    facts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_route_hint_follows_the_parameter_set() {
        let mut cache = None;
        let forced_primary =
            |cache: &mut _, params: &ParamSet| param_facts(cache, params, 1).forced_primary;
        let mut params: ParamSet = Arc::default();
        assert!(!forced_primary(&mut cache, &params));
        // SET tidepool.route = primary: a new set (copy on write).
        Arc::make_mut(&mut params).insert("tidepool.route".into(), "Primary".into());
        assert!(forced_primary(&mut cache, &params));
        assert!(forced_primary(&mut cache, &params), "cached");
        Arc::make_mut(&mut params).insert("tidepool.route".into(), "any".into());
        assert!(!forced_primary(&mut cache, &params));
        let reset: ParamSet = Arc::default();
        assert!(!forced_primary(&mut cache, &reset));
    }
}
