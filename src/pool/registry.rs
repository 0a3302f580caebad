//! All pools, keyed by (database, user), created on first use from the config.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;

use super::{Pool, PoolSettings, lock};
use crate::auth::scram::ScramKeys;
use crate::auth::secret::Secret;
use crate::auth::server::Credentials;
use crate::config::{Config, Database};
use crate::health::{Health, HealthCredentials, spawn_checker};
use crate::server::ConnectSpec;

/// Which server of a database: 0 is the primary, `i + 1` is replica `i`.
pub type BackendIndex = usize;

pub struct Registry {
    config: Arc<Config>,
    pools: Mutex<HashMap<(String, String, BackendIndex), Arc<Pool>>>,
    db_permits: Mutex<HashMap<(String, BackendIndex), Arc<Semaphore>>>,
    health: HashMap<String, Arc<Health>>,
}

impl Registry {
    /// Must run inside a tokio runtime: starts a health checker for every
    /// database with replicas.
    pub fn new(config: Arc<Config>) -> Self {
        let mut health = HashMap::new();
        for (name, db) in &config.databases {
            if db.replicas.is_empty() {
                continue;
            }
            let h = Arc::new(Health::new(db));
            match health_credentials(&config, name, db) {
                Some(creds) => spawn_checker(
                    &h,
                    creds,
                    config.routing.health_check_period,
                    config.routing.max_replica_lag,
                    name.clone(),
                ),
                None => tracing::warn!(
                    database = %name,
                    "no credentials for health checks (set health_user/health_password): reads stay on the primary"
                ),
            }
            health.insert(name.clone(), h);
        }
        Self {
            config,
            pools: Mutex::new(HashMap::new()),
            db_permits: Mutex::new(HashMap::new()),
            health,
        }
    }

    /// Replica health of a database, when it has replicas.
    pub fn health(&self, db_name: &str) -> Option<Arc<Health>> {
        self.health.get(db_name).cloned()
    }

    pub fn pools(&self) -> Vec<Arc<Pool>> {
        lock(&self.pools).values().cloned().collect()
    }

    /// The pool for a client of `user` on `db_name`. `client_key` is the
    /// client's SCRAM ClientKey, used when only a verifier is configured.
    pub fn pool_for(
        &self,
        db_name: &str,
        db: &Database,
        user: &str,
        secret: Option<&Secret>,
        client_key: Option<[u8; 32]>,
        backend: BackendIndex,
    ) -> Arc<Pool> {
        let (creds, server_user, awaiting_keys) = credentials(db, user, secret, client_key);
        let key = (db_name.to_owned(), user.to_owned(), backend);
        let mut pools = lock(&self.pools);
        if let Some(p) = pools.get(&key) {
            if !matches!(creds, Credentials::None) {
                p.offer_credentials(creds);
            }
            return p.clone();
        }
        let c = &self.config;
        let user_cfg = c.users.get(user);
        let settings = PoolSettings {
            mode: c.pool_mode(db),
            size: c.pool_size(db, user_cfg),
            min_size: c.min_pool_size(db),
            query_wait_timeout: c.pool.query_wait_timeout,
            server_idle_timeout: c.pool.server_idle_timeout,
            server_lifetime: c.pool.server_lifetime,
            server_reset_query: c.pool.server_reset_query.clone(),
        };
        let (host, port) = match backend.checked_sub(1).and_then(|i| db.replicas.get(i)) {
            Some(r) => (r.host.clone(), r.port),
            None => (db.host.clone(), db.port),
        };
        let db_permits = (c.pool.max_db_connections > 0).then(|| {
            lock(&self.db_permits)
                .entry((db_name.to_owned(), backend))
                .or_insert_with(|| Arc::new(Semaphore::new(c.pool.max_db_connections as usize)))
                .clone()
        });
        let spec = ConnectSpec {
            host,
            port,
            dbname: db.dbname.clone().unwrap_or_else(|| db_name.to_owned()),
            user: server_user,
            creds,
            timeout: c.pool.server_connect_timeout,
        };
        let pool = Pool::new(
            db_name.to_owned(),
            user.to_owned(),
            settings,
            spec,
            db_permits,
            awaiting_keys,
        );
        tokio::spawn(super::maintain::run(Arc::downgrade(&pool)));
        pools.insert(key, pool.clone());
        pool
    }
}

/// Who the health checker logs in as: `health_user`, else the database's
/// `user`, else the first configured user with a plain password.
fn health_credentials(config: &Config, name: &str, db: &Database) -> Option<HealthCredentials> {
    let dbname = db.dbname.clone().unwrap_or_else(|| name.to_owned());
    if let Some(user) = db.health_user.clone().or_else(|| db.user.clone()) {
        let password = db.health_password.clone().or_else(|| db.password.clone());
        return Some(HealthCredentials {
            user,
            password,
            dbname,
        });
    }
    config
        .users
        .iter()
        .find_map(|(user, u)| match u.password.as_deref().map(Secret::parse) {
            Some(Ok(Secret::Plain(p))) => Some(HealthCredentials {
                user: user.clone(),
                password: Some(p),
                dbname: dbname.clone(),
            }),
            _ => None,
        })
}

/// How to log in to the server for this client: the database's own user and
/// password if set, else the client's user with what its secret allows.
fn credentials(
    db: &Database,
    user: &str,
    secret: Option<&Secret>,
    client_key: Option<[u8; 32]>,
) -> (Credentials, String, bool) {
    if let Some(db_user) = &db.user {
        let creds = db
            .password
            .clone()
            .map_or(Credentials::None, Credentials::Password);
        return (creds, db_user.clone(), false);
    }
    let creds = match secret {
        Some(Secret::Plain(p)) => Credentials::Password(p.clone()),
        Some(Secret::Md5(h)) => Credentials::Md5Hash(h.clone()),
        Some(Secret::Scram(v)) => {
            return match client_key {
                Some(client_key) => (
                    Credentials::Scram(ScramKeys {
                        client_key,
                        server_key: v.server_key,
                    }),
                    user.to_owned(),
                    true,
                ),
                None => (Credentials::None, user.to_owned(), true),
            };
        }
        None => Credentials::None,
    };
    (creds, user.to_owned(), false)
}
