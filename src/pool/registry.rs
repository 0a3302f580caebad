//! All pools, keyed by (database, user, backend), created on first use from
//! the config; replica health per database; per-database pause state. A
//! reload re-applies the config here ([`Registry::apply`]).
//!
//! Invariant: a pool whose connect target changed or whose database was
//! removed is retired, never mutated: clients notice through
//! [`Registry::generation`] and move to a fresh pool at their next
//! transaction.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use super::{Pool, PoolKey, PoolParts, PoolSettings, lock};
use crate::auth::scram::ScramKeys;
use crate::auth::secret::Secret;
use crate::auth::server::Credentials;
use crate::config::{Config, Database};
use crate::health::{Health, HealthCredentials, spawn_checker};
use crate::server::ConnectSpec;
use crate::server::list::ServerList;
use crate::stats::Stats;

/// Which server of a database: 0 is the primary, `i + 1` is replica `i`.
pub type BackendIndex = usize;

/// PAUSE/RESUME state of one database.
#[derive(Default)]
pub struct DbControl {
    paused: AtomicBool,
    resumed: Notify,
}

impl DbControl {
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Relaxed)
    }

    pub fn pause(&self) {
        self.paused.store(true, Ordering::Relaxed);
    }

    pub fn resume(&self) {
        self.paused.store(false, Ordering::Relaxed);
        self.resumed.notify_waiters();
    }

    /// Returns once the database is not paused.
    pub async fn wait_resumed(&self) {
        loop {
            let n = self.resumed.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            if !self.is_paused() {
                return;
            }
            n.await;
        }
    }
}

/// What a database's health checker was started with.
#[derive(PartialEq)]
struct HealthSource {
    db: Database,
    creds: Vec<HealthCredentials>,
    period: Duration,
    max_lag: Duration,
    failover: crate::config::Failover,
}

pub struct Registry {
    pools: Mutex<HashMap<PoolKey, Arc<Pool>>>,
    /// Pools a reload retired, listed while their connections drain.
    retired: Mutex<Vec<std::sync::Weak<Pool>>>,
    /// `max_db_connections` per (database, backend).
    db_caps: Mutex<HashMap<(String, BackendIndex), Arc<super::Cap>>>,
    /// `max_user_connections` per user.
    user_caps: Mutex<HashMap<String, Arc<super::Cap>>>,
    health: Mutex<HashMap<String, (HealthSource, Arc<Health>)>>,
    controls: Mutex<HashMap<String, Arc<DbControl>>>,
    /// PAUSE with no database (or SIGUSR1) is in force: a database that a
    /// reload adds starts paused too, until RESUME with no database.
    pooler_paused: AtomicBool,
    catalogs: Mutex<HashMap<String, Arc<super::Catalog>>>,
    /// Bumped by every reload; sessions compare it once per transaction.
    generation: AtomicU64,
    pub servers: Arc<ServerList>,
    stats: Arc<Stats>,
}

impl Registry {
    /// Must run inside a tokio runtime: starts a health checker for every
    /// database with replicas.
    pub fn new(config: &Config, stats: Arc<Stats>) -> Self {
        let r = Self {
            pools: Mutex::new(HashMap::new()),
            retired: Mutex::new(Vec::new()),
            db_caps: Mutex::new(HashMap::new()),
            user_caps: Mutex::new(HashMap::new()),
            health: Mutex::new(HashMap::new()),
            controls: Mutex::new(HashMap::new()),
            pooler_paused: AtomicBool::new(false),
            catalogs: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(0),
            servers: Arc::new(ServerList::default()),
            stats,
        };
        r.apply_health(config);
        r
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Starts, keeps or replaces each database's health checker.
    fn apply_health(&self, config: &Config) {
        let mut health = lock(&self.health);
        health.retain(|name, _| {
            config
                .databases
                .get(name)
                .is_some_and(|d| !d.replicas.is_empty())
        });
        for (name, db) in &config.databases {
            if db.replicas.is_empty() {
                continue;
            }
            let source = HealthSource {
                db: db.clone(),
                creds: health_credentials(config, name, db),
                period: config.routing.health_check_period,
                max_lag: config.routing.max_replica_lag,
                failover: config.routing.failover,
            };
            if health.get(name).is_some_and(|(s, _)| *s == source) {
                continue;
            }
            let h = Arc::new(Health::new(db));
            // Same servers: writes stay where failover put them.
            if let Some((_, old)) = health.get(name) {
                h.inherit(old);
            }
            if source.creds.is_empty() {
                tracing::warn!(
                    database = %name,
                    "no credentials for health checks (set health_user/health_password, or give a user a plain password): reads stay on the primary"
                );
            } else {
                spawn_checker(
                    &h,
                    source.creds.clone(),
                    source.period,
                    source.max_lag,
                    name.clone(),
                    config.server_tls(name).cloned(),
                    source.failover,
                );
            }
            health.insert(name.clone(), (source, h));
        }
    }

    /// Replica health of a database, when it has replicas.
    pub fn health(&self, db_name: &str) -> Option<Arc<Health>> {
        lock(&self.health).get(db_name).map(|(_, h)| h.clone())
    }

    /// Every pool in service, and retired ones until their last connection
    /// is gone.
    pub fn pools(&self) -> Vec<Arc<Pool>> {
        let mut v: Vec<Arc<Pool>> = lock(&self.pools).values().cloned().collect();
        lock(&self.retired).retain(|w| match w.upgrade() {
            Some(p) if p.server_count() > 0 => {
                v.push(p);
                true
            }
            _ => false,
        });
        v.sort_by(|a, b| (&a.database, &a.user, a.backend).cmp(&(&b.database, &b.user, b.backend)));
        v
    }

    /// PAUSE/RESUME state of a database.
    /// The catalog epoch of `db_name`, shared by all its pools.
    pub fn catalog(&self, db_name: &str) -> Arc<super::Catalog> {
        lock(&self.catalogs)
            .entry(db_name.to_owned())
            .or_default()
            .clone()
    }

    pub fn control(&self, db_name: &str) -> Arc<DbControl> {
        lock(&self.controls)
            .entry(db_name.to_owned())
            .or_insert_with(|| {
                let c = DbControl::default();
                if self.pooler_paused() {
                    c.pause();
                }
                Arc::new(c)
            })
            .clone()
    }

    /// Whether a PAUSE of the whole pooler is in force.
    pub fn pooler_paused(&self) -> bool {
        self.pooler_paused.load(Ordering::Relaxed)
    }

    /// Puts a PAUSE of the whole pooler in force or ends it.
    pub fn set_pooler_paused(&self, on: bool) {
        self.pooler_paused.store(on, Ordering::Relaxed);
    }

    /// The pool for a client of `user` on `db_name`. `client_key` is the
    /// client's SCRAM ClientKey, used when only a verifier is configured.
    #[allow(clippy::too_many_arguments)]
    pub fn pool_for(
        &self,
        config: &Config,
        db_name: &str,
        db: &Database,
        user: &str,
        secret: Option<&Secret>,
        client_key: Option<[u8; 32]>,
        backend: BackendIndex,
    ) -> Arc<Pool> {
        let (creds, server_user, awaiting_keys) = credentials(db, user, secret, client_key);
        let key = PoolKey {
            database: db_name.to_owned(),
            user: user.to_owned(),
            backend,
        };
        let mut pools = lock(&self.pools);
        if let Some(p) = pools.get(&key) {
            if !matches!(creds, Credentials::None) {
                p.offer_credentials(creds);
            }
            return p.clone();
        }
        let settings = pool_settings(config, db, user);
        let (host, port) = target(db, backend);
        let c = config;
        let db_cap = lock(&self.db_caps)
            .entry((db_name.to_owned(), backend))
            .or_insert_with(|| super::Cap::new(c.max_db_connections(db) as usize))
            .clone();
        let user_cap = lock(&self.user_caps)
            .entry(user.to_owned())
            .or_insert_with(|| super::Cap::new(c.max_user_connections(user) as usize))
            .clone();
        let spec = ConnectSpec {
            host,
            port,
            dbname: db.dbname.clone().unwrap_or_else(|| db_name.to_owned()),
            user: server_user,
            creds,
            timeout: c.pool.server_connect_timeout,
            tls: config.server_tls(db_name).map(|t| Arc::new(t.clone())),
            keepalive: c.keepalive(),
        };
        let pool = Pool::new(
            PoolParts {
                traffic: self.stats.traffic(db_name, backend),
                key: key.clone(),
                spec,
                caps: [db_cap, user_cap],
                awaiting_keys,
                servers: self.servers.clone(),
                catalog: self.catalog(db_name),
            },
            settings,
        );
        for cap in &pool.caps {
            let member: std::sync::Weak<dyn super::caps::IdleHolder> =
                Arc::downgrade(&pool) as std::sync::Weak<super::Pool>;
            cap.join(member);
        }
        tokio::spawn(super::maintain::run(Arc::downgrade(&pool)));
        pools.insert(key, pool.clone());
        pool
    }

    /// Re-applies a (reloaded) config: pools keep running with new sizes and
    /// timeouts; pools of removed databases or changed hosts are retired;
    /// health checkers follow their database's replicas.
    pub fn apply(&self, config: &Config, secret: impl Fn(&str) -> Option<Secret>) {
        self.apply_health(config);
        // Caps move to their new sizes in place (see `pool::Cap`).
        for ((db, _), cap) in lock(&self.db_caps).iter() {
            if let Some(d) = config.databases.get(db) {
                cap.resize(config.max_db_connections(d) as usize);
            }
        }
        for (user, cap) in lock(&self.user_caps).iter() {
            cap.resize(config.max_user_connections(user) as usize);
        }
        let mut pools = lock(&self.pools);
        // Lowered caps: idle connections over them close now.
        for pool in pools.values() {
            pool.shed_excess();
        }
        let mut retired = Vec::new();
        pools.retain(|key, pool| {
            let Some(db) = config.databases.get(&key.database) else {
                pool.retire(super::Retirement::Draining);
                retired.push(Arc::downgrade(pool));
                return false;
            };
            // New server connections use the TLS and keepalive settings in force.
            {
                let mut spec = lock(&pool.spec);
                spec.tls = config
                    .server_tls(&key.database)
                    .map(|t| Arc::new(t.clone()));
                spec.keepalive = config.keepalive();
            }
            let spec = lock(&pool.spec).clone();
            let (host, port) = target(db, key.backend);
            let dbname = db.dbname.clone().unwrap_or_else(|| key.database.clone());
            let server_user = db.user.clone().unwrap_or_else(|| key.user.clone());
            let gone = key.backend > db.replicas.len()
                || (host, port, dbname, server_user)
                    != (spec.host, spec.port, spec.dbname, spec.user);
            if gone {
                pool.retire(super::Retirement::Replaced);
                retired.push(Arc::downgrade(pool));
                return false;
            }
            let s = secret(&key.user);
            let (creds, _, awaiting) = credentials(db, &key.user, s.as_ref(), None);
            let creds = (!awaiting && !matches!(creds, Credentials::None)).then_some(creds);
            pool.update(pool_settings(config, db, &key.user), creds);
            true
        });
        drop(pools);
        lock(&self.retired).extend(retired);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }
}

/// Host and port of a database's backend.
fn target(db: &Database, backend: BackendIndex) -> (String, u16) {
    match backend.checked_sub(1).and_then(|i| db.replicas.get(i)) {
        Some(r) => (r.host.clone(), r.port),
        None => (db.host.clone(), db.port),
    }
}

fn pool_settings(c: &Config, db: &Database, user: &str) -> PoolSettings {
    PoolSettings {
        mode: c.pool_mode(db),
        size: c.pool_size(db, c.users.get(user)),
        min_size: c.min_pool_size(db),
        reserve_size: c.reserve_pool_size(db),
        query_wait_timeout: c.pool.query_wait_timeout,
        server_idle_timeout: c.pool.server_idle_timeout,
        server_lifetime: c.pool.server_lifetime,
        server_reset_query: c.pool.server_reset_query.clone(),
        server_check_delay: c.pool.server_check_delay,
        server_check_query: c.pool.server_check_query.clone(),
        server_check_timeout: c.pool.server_connect_timeout,
        slow_query_threshold: db
            .slow_query_threshold
            .unwrap_or(c.stats.slow_query_threshold),
    }
}

/// Who the health checker may log in as, in the order it tries them (a
/// login the server refuses moves it to the next): `health_user`, else the
/// database's `user`; else every configured user tidepool can log in as
/// (a plain password, or none for `trust`), users that clients log in as
/// first, those listed in `admin_users` or `stats_users` (often console-only,
/// unknown to the server) last.
pub fn health_credentials(config: &Config, name: &str, db: &Database) -> Vec<HealthCredentials> {
    let dbname = db.dbname.clone().unwrap_or_else(|| name.to_owned());
    if let Some(user) = db.health_user.clone().or_else(|| db.user.clone()) {
        let password = db.health_password.clone().or_else(|| db.password.clone());
        return vec![HealthCredentials {
            user,
            password,
            dbname,
        }];
    }
    let console = |user: &str| console_user(config, user);
    let mut candidates: Vec<(bool, bool, HealthCredentials)> = config
        .users
        .iter()
        .filter_map(|(user, u)| {
            let password = match u.password.as_deref().map(Secret::parse) {
                Some(Ok(Secret::Plain(p))) => Some(p),
                None => None,
                // A hash or verifier: tidepool cannot log in with it.
                Some(_) => return None,
            };
            Some((
                console(user),
                password.is_none(),
                HealthCredentials {
                    user: user.clone(),
                    password,
                    dbname: dbname.clone(),
                },
            ))
        })
        .collect();
    // Stable: alphabetical within each group.
    candidates.sort_by_key(|(console, no_password, _)| (*console, *no_password));
    candidates.into_iter().map(|(_, _, c)| c).collect()
}

/// Listed in `admin_users` or `stats_users`: often a console-only user the
/// server does not know.
fn console_user(config: &Config, user: &str) -> bool {
    config.tidepool.admin_users.iter().any(|u| u == user)
        || config.tidepool.stats_users.iter().any(|u| u == user)
}

/// What `tidepool check` says about health checks: a database with
/// replicas and no credentials the checker can use never routes a read to
/// them; one whose only candidates are console users likely fails to log in.
pub fn health_warnings(config: &Config) -> Vec<String> {
    let mut out = Vec::new();
    for (name, db) in &config.databases {
        if db.replicas.is_empty() {
            continue;
        }
        let creds = health_credentials(config, name, db);
        let console = |user: &str| console_user(config, user);
        if creds.is_empty() {
            out.push(format!(
                "database {name} has replicas but no credentials for health checks: every read stays on the primary; set health_user and health_password, or give a user a plain password"
            ));
        } else if db.health_user.is_none() && creds.iter().all(|c| console(&c.user)) {
            // (A health_user named in the config is the operator's choice,
            // console user or not.)
            out.push(format!(
                "database {name}: health checks can only log in as console users ({}); unless one exists on the server, every read stays on the primary; set health_user and health_password",
                creds.iter().map(|c| c.user.as_str()).collect::<Vec<_>>().join(", ")
            ));
        }
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    fn config(users: &str, db_extra: &str) -> Config {
        let toml = format!(
            r#"
[tidepool]
admin_users = ["admin"]
stats_users = ["stats"]

[databases.app]
host = "127.0.0.1"
port = 5432
replicas = [{{ host = "127.0.0.1", port = 5433 }}]
{db_extra}

{users}
"#
        );
        Config::from_toml_str(&toml, "test.toml").unwrap()
    }

    fn users_of(c: &Config) -> Vec<String> {
        health_credentials(c, "app", &c.databases["app"])
            .into_iter()
            .map(|h| h.user)
            .collect()
    }

    #[test]
    fn health_checks_try_client_users_before_console_users() {
        // The shipped proxy.toml's shape: alphabetically `admin` comes
        // first, but it is a console user.
        let c = config(
            r#"
[users.admin]
password = "admin"
[users.app]
password = "secret"
[users.stats]
password = "stats"
[users.hashed]
password = "md5a3556571e93b0d20722ba62be61e8c2d"
auth_type = "md5"
[users.trusted]
auth_type = "trust"
"#,
            "",
        );
        assert_eq!(users_of(&c), ["app", "trusted", "admin", "stats"]);
        assert!(health_warnings(&c).is_empty());
    }

    #[test]
    fn health_user_or_database_user_is_the_only_candidate() {
        let users = "[users.app]\npassword = \"secret\"";
        let c = config(users, "health_user = \"monitor\"\nhealth_password = \"m\"");
        assert_eq!(users_of(&c), ["monitor"]);
        let c = config(users, "user = \"owner\"\npassword = \"o\"");
        assert_eq!(users_of(&c), ["owner"]);
    }

    #[test]
    fn check_warns_when_replicas_cannot_be_checked() {
        let c = config(
            "[users.app]\npassword = \"SCRAM-SHA-256$4096:c2FsdA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\"",
            "",
        );
        let w = health_warnings(&c);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("no credentials"), "{w:?}");
        let c = config("[users.admin]\npassword = \"admin\"", "");
        let w = health_warnings(&c);
        assert!(
            w.len() == 1 && w[0].contains("console users (admin)"),
            "{w:?}"
        );
        // Named on purpose: no warning.
        let c = config(
            "[users.admin]\npassword = \"admin\"",
            "health_user = \"admin\"\nhealth_password = \"admin\"",
        );
        assert!(health_warnings(&c).is_empty());
    }
}
