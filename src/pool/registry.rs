//! All pools, keyed by (database, user), created on first use from the config.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;

use super::{Pool, PoolSettings, lock};
use crate::auth::scram::ScramKeys;
use crate::auth::secret::Secret;
use crate::auth::server::Credentials;
use crate::config::{Config, Database};
use crate::server::ConnectSpec;

pub struct Registry {
    config: Arc<Config>,
    pools: Mutex<HashMap<(String, String), Arc<Pool>>>,
    db_permits: HashMap<String, Arc<Semaphore>>,
}

impl Registry {
    pub fn new(config: Arc<Config>) -> Self {
        let max = config.pool.max_db_connections;
        let db_permits = if max > 0 {
            config
                .databases
                .keys()
                .map(|k| (k.clone(), Arc::new(Semaphore::new(max as usize))))
                .collect()
        } else {
            HashMap::new()
        };
        Self {
            config,
            pools: Mutex::new(HashMap::new()),
            db_permits,
        }
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
    ) -> Arc<Pool> {
        let (creds, server_user, awaiting_keys) = credentials(db, user, secret, client_key);
        let key = (db_name.to_owned(), user.to_owned());
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
        let spec = ConnectSpec {
            host: db.host.clone(),
            port: db.port,
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
            self.db_permits.get(db_name).cloned(),
            awaiting_keys,
        );
        tokio::spawn(super::maintain::run(Arc::downgrade(&pool)));
        pools.insert(key, pool.clone());
        pool
    }
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
