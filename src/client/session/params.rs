//! Bringing a checked-out server's session parameters to the client's, and
//! learning them back after a transaction that changed them.

use super::*;

impl Session {
    /// Brings a server's session parameters to the client's (one round trip,
    /// only when they differ) and remembers which set it now has.
    pub(super) async fn sync_params(
        &mut self,
        mut pooled: PooledConn,
    ) -> Result<PooledConn, ClientError> {
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
                Err(ServerError::Query(f)) if f.is_standby_serializable_refusal() => {
                    // The client's role or database makes its transactions
                    // serializable: routing takes the primary instead.
                    pooled.release(Release::Reuse);
                    return Err(ClientError::ReplicaSerializable);
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

    /// Reads the database's functions that may change session settings on
    /// this server (the catalog said the list is due; see `pool::Catalog`).
    pub(super) async fn read_changers(
        &mut self,
        mut pooled: PooledConn,
    ) -> Result<PooledConn, ClientError> {
        let catalog = pooled.pool().catalog.clone();
        let epoch = catalog.epoch();
        let conn = pooled.conn();
        match conn.session_functions().await {
            Ok(f) => {
                tracing::debug!(
                    functions = f.len(),
                    "read the functions that may change settings"
                );
                catalog.changers_read(epoch, Some(f));
                Ok(pooled)
            }
            Err(ServerError::Query(f)) if f.is_standby_serializable_refusal() => {
                catalog.changers_read(epoch, None);
                pooled.release(Release::Reuse);
                Err(ClientError::ReplicaSerializable)
            }
            Err(e) => {
                catalog.changers_read(epoch, None);
                tracing::warn!(error = %e, "could not list the functions that may change settings");
                if matches!(e, ServerError::Query(_)) && conn.tx == TxStatus::Idle {
                    return Ok(pooled);
                }
                pooled.release(Release::Close);
                Err(ClientError::ServerConnect {
                    database: self.database.clone(),
                    reason: e.to_string(),
                })
            }
        }
    }

    /// After a transaction that changed session settings, learns the
    /// server's settings: they are now the client's (what it SET stays its
    /// own) and the server's known state.
    pub(super) async fn refresh_params(&mut self, server: &mut PooledConn) {
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
                // A client that named no application has none (RESET ALL
                // and DISCARD ALL bring it back), whatever tidepool named
                // its server connection.
                const APP: &str = "application_name";
                if !changed.iter().any(|k| k == APP) && !self.startup.contains_key(APP) {
                    mine.insert(APP.to_owned(), String::new());
                }
                // A RESET (or DISCARD ALL) on the server reported the server
                // connection's own defaults (its application_name is
                // tidepool's; its TimeZone is not the one the client gave at
                // startup): the client, told those, now hears its own again,
                // as it would never have heard otherwise from PostgreSQL.
                for (k, v) in mine.iter().filter(|(k, _)| defaults.contains_key(*k)) {
                    if let Some(told) = self.params.get(k)
                        && !told.eq_ignore_ascii_case(v)
                    {
                        write::parameter_status(&mut self.out, k, v);
                    }
                }
                conn.params.retain(|k, _| !is_tracked(k));
                conn.params.extend(actual);
                conn.synced_to = None;
                let route = crate::router::policy::ROUTE_SETTING;
                let was = self.params.get(route).cloned();
                self.params = Arc::new(mine);
                if let Some(v) = self.params.get(route)
                    && was.as_ref() != Some(v)
                    && let Some(w) = crate::router::policy::route_setting_warning(v)
                {
                    write::notice_response(&mut self.out, "22023", &w);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not read session settings; closing that server");
                conn.tx = TxStatus::Failed;
            }
        }
    }
}
