//! auth_query: logins of users not listed in `proxy.toml`. tidepool asks
//! the database for the user's SCRAM verifier (or md5 hash) over a
//! connection of its own as `auth_user`, and the client then proves its
//! password against it; with SCRAM the ClientKey it proves recovers logs
//! tidepool in to PostgreSQL, so tidepool never needs the plain password.
//!
//! Invariants: the user name is only ever a bind parameter (never spliced
//! into SQL); the query runs on tidepool's own connection, with
//! `search_path` fixed to `pg_catalog, pg_temp` before anything else
//! (PgBouncer's CVE-2025-12819 cannot happen here: no client sets anything
//! on that connection); answers are cached per (database, user) for
//! `auth_cache_lifetime`, in a table of bounded size; a user the query does
//! not find (or whose password is NULL or expired) is unknown, and gets the
//! same exchange as any unknown user.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::auth::secret::Secret;
use crate::config::{Config, Database};
use crate::error::ClientError;

/// Cached answers at most.
const MAX_CACHED: usize = 10_000;

/// (database, user) → (the secret found, if any; when it was asked).
type Cache = HashMap<(String, String), (Option<Arc<Secret>>, Instant)>;

#[derive(Default)]
pub struct AuthQuery {
    cache: Mutex<Cache>,
    /// One connection per database, made on first use.
    conns: tokio::sync::Mutex<HashMap<String, tokio_postgres::Client>>,
}

impl AuthQuery {
    /// The secret of `user` for database `name` (None: no such user), from
    /// the cache or the database.
    pub async fn lookup(
        &self,
        config: &Config,
        name: &str,
        db: &Database,
        user: &str,
    ) -> Result<Option<Arc<Secret>>, ClientError> {
        let lifetime = config.tidepool.auth_cache_lifetime;
        let key = (name.to_owned(), user.to_owned());
        if let Some((secret, at)) = self.lock_cache().get(&key)
            && at.elapsed() < lifetime
        {
            return Ok(secret.clone());
        }
        let secret = self.ask(config, name, db, user).await?.map(Arc::new);
        let mut cache = self.lock_cache();
        if cache.len() >= MAX_CACHED {
            cache.retain(|_, (_, at)| at.elapsed() < lifetime);
            if cache.len() >= MAX_CACHED
                && let Some(oldest) = cache
                    .iter()
                    .min_by_key(|(_, (_, at))| *at)
                    .map(|(k, _)| k.clone())
            {
                cache.remove(&oldest);
            }
        }
        cache.insert(key, (secret.clone(), Instant::now()));
        Ok(secret)
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `auth_query` for `user`.
    async fn ask(
        &self,
        config: &Config,
        name: &str,
        db: &Database,
        user: &str,
    ) -> Result<Option<Secret>, ClientError> {
        let failed = |reason: String| ClientError::ServerConnect {
            database: name.to_owned(),
            reason: format!("auth_query: {reason}"),
        };
        let mut conns = self.conns.lock().await;
        if conns
            .get(name)
            .is_none_or(tokio_postgres::Client::is_closed)
        {
            let client = connect(config, name, db).await.map_err(failed)?;
            conns.insert(name.to_owned(), client);
        }
        let Some(client) = conns.get(name) else {
            return Err(failed("no connection".into()));
        };
        let timeout = config
            .pool
            .server_connect_timeout
            .max(Duration::from_secs(1));
        let row = tokio::time::timeout(
            timeout,
            client.query_opt(config.tidepool.auth_query.as_str(), &[&user]),
        )
        .await
        .map_err(|_| failed("timed out".into()))?
        .map_err(|e| failed(e.to_string()))?;
        let Some(row) = row else {
            return Ok(None);
        };
        let password: Option<String> = row.try_get(1).map_err(|e| failed(e.to_string()))?;
        Ok(password.and_then(|p| Secret::parse(&p).ok()))
    }
}

/// A connection as `auth_user` to the database's primary (or `auth_dbname`),
/// TLS as `server_tls_*` says, `search_path` fixed.
async fn connect(
    config: &Config,
    name: &str,
    db: &Database,
) -> Result<tokio_postgres::Client, String> {
    let g = &config.tidepool;
    let user = g.auth_user.as_deref().ok_or("no auth_user")?;
    let password = config
        .users
        .get(user)
        .and_then(|u| u.password.clone())
        .ok_or("auth_user has no password in proxy.toml")?;
    let mut cfg = tokio_postgres::Config::new();
    cfg.host(&db.host)
        .port(db.port)
        .user(user)
        .password(password)
        .dbname(
            g.auth_dbname
                .as_deref()
                .or(db.dbname.as_deref())
                .unwrap_or(name),
        )
        .application_name("tidepool-auth")
        .connect_timeout(config.pool.server_connect_timeout);
    let timeout = config
        .pool
        .server_connect_timeout
        .max(Duration::from_secs(1));
    let client = crate::health::tls::connect(&mut cfg, config.server_tls(name), timeout)
        .await
        .map_err(|e| match e {
            crate::health::tls::ConnectError::Timeout => "connect timed out".to_owned(),
            crate::health::tls::ConnectError::Postgres(e) => e.to_string(),
        })?;
    client
        .batch_execute("SET search_path = pg_catalog, pg_temp")
        .await
        .map_err(|e| e.to_string())?;
    Ok(client)
}
