//! Choosing where a transaction runs (primary or a replica, from the
//! statement's class, hints, health and read-your-writes) and checking a
//! server out of that backend's pool.

use super::*;

impl Session {
    /// Decides where the transaction starting at the front of the buffer
    /// runs: reads (and read-only transactions) to a healthy replica that has
    /// replayed this client's writes, everything else to the primary.
    pub(super) fn choose_route(&mut self) -> (Route, Class) {
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

    /// Bookkeeping once a routed transaction is over.
    pub(super) fn after_route(&mut self, route: Route, class: Class) {
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
    pub(super) async fn acquire_routed(
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

    pub(super) fn replica_pool(&mut self, i: usize) -> Arc<Pool> {
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
}
