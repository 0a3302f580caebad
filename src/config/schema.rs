//! The serde types of `proxy.toml`. Every table rejects unknown keys; each
//! field's doc states its default (values live in `defaults.rs`).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::defaults;
use super::defaults::fns::*;
use super::duration::{self, optional as opt_duration};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub tidepool: General,
    #[serde(default)]
    pub pool: PoolSettings,
    #[serde(default)]
    pub databases: BTreeMap<String, Database>,
    #[serde(default)]
    pub users: BTreeMap<String, User>,
    #[serde(default)]
    pub routing: Routing,
    #[serde(default)]
    pub stats: Stats,
    #[serde(default)]
    pub metrics: Metrics,
    #[serde(default)]
    pub rate_limits: RateLimits,
    #[serde(default)]
    pub tracing: super::otlp::Tracing,
    /// The rules of `[tidepool] auth_hba_file`, read with the config.
    #[serde(skip)]
    pub(crate) hba: Option<std::sync::Arc<crate::auth::hba::Hba>>,
    /// What `client_tls_*` offers clients, built with the config.
    #[serde(skip)]
    pub(crate) client_tls: Built<crate::tls::Acceptor>,
    /// How each database's servers are reached (`server_tls_*`).
    #[serde(skip)]
    pub(crate) server_tls: BTreeMap<String, Built<crate::tls::Connector>>,
}

/// Something the config builds from its files when it is loaded. Equal when
/// it is the very same build (a reload builds afresh).
#[derive(Debug, Clone)]
pub struct Built<T>(pub Option<std::sync::Arc<T>>);

impl<T> Default for Built<T> {
    fn default() -> Self {
        Built(None)
    }
}

impl<T> PartialEq for Built<T> {
    fn eq(&self, other: &Self) -> bool {
        match (&self.0, &other.0) {
            (Some(a), Some(b)) => std::sync::Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        }
    }
}

/// `[stats]`: traffic averages, per-query statistics, slow queries, pool health.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stats {
    /// How often `avg_*` columns are recomputed (PgBouncer's `stats_period`). Default `60s`.
    #[serde(default = "d_stats_period", with = "duration")]
    pub stats_period: Duration,
    /// Statements slower than this are slow (logged, listed, counted). Default `100ms`.
    #[serde(default = "d_slow", with = "duration")]
    pub slow_query_threshold: Duration,
    /// Recent slow statements kept for `SHOW SLOW_QUERIES`. Default 100.
    #[serde(default = "d_slow_log")]
    pub slow_query_log_size: usize,
    /// Distinct normalized queries tracked (top-N by total time); 0 = off. Default 1000.
    #[serde(default = "d_fingerprints")]
    pub max_query_fingerprints: usize,
    /// The window pool health is judged over. Default `60s`.
    #[serde(default = "d_health_window", with = "duration")]
    pub health_window: Duration,
    /// Share of slow statements from which a pool is `degraded`. Default 0.05.
    #[serde(default = "d_degraded")]
    pub degraded_slow_ratio: f64,
    /// Share of slow statements above which a pool is `unhealthy`. Default 0.10.
    #[serde(default = "d_unhealthy")]
    pub unhealthy_slow_ratio: f64,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            stats_period: d_stats_period(),
            slow_query_threshold: d_slow(),
            slow_query_log_size: d_slow_log(),
            max_query_fingerprints: d_fingerprints(),
            health_window: d_health_window(),
            degraded_slow_ratio: d_degraded(),
            unhealthy_slow_ratio: d_unhealthy(),
        }
    }
}

/// `[rate_limits]`: named tiers of transactions per second or minute that
/// users and databases are assigned to (`rate_limit_tier`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimits {
    /// Over the limit, how long a transaction waits for its turn before it
    /// is refused (53400); `0s`: refused at once. Default `0s`.
    #[serde(default, with = "duration")]
    pub rate_limit_wait: Duration,
    /// Where several instances share their limits' state:
    /// `redis://[:password@]host:port[/db]`. Unreachable, each instance
    /// limits locally to its share (`instances`); queries never wait on it
    /// longer than `rate_limit_backend_timeout`. Default none (local).
    pub rate_limit_backend: Option<String>,
    /// How long one decision may wait for the backend before it is made
    /// locally (and the backend is taken as down). Default `50ms`.
    #[serde(default = "d_rate_backend_timeout", with = "duration")]
    pub rate_limit_backend_timeout: Duration,
    /// The tiers, by name.
    #[serde(default)]
    pub tiers: BTreeMap<String, RateTier>,
}

impl Default for RateLimits {
    fn default() -> Self {
        RateLimits {
            rate_limit_wait: Duration::ZERO,
            rate_limit_backend: None,
            rate_limit_backend_timeout: d_rate_backend_timeout(),
            tiers: BTreeMap::new(),
        }
    }
}

/// One tier: `per_second` or `per_minute` transactions, with a `burst`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateTier {
    /// Transactions per second.
    pub per_second: Option<u64>,
    /// Transactions per minute.
    pub per_minute: Option<u64>,
    /// Transactions admitted at once beyond the rate. Default 0.
    #[serde(default)]
    pub burst: u64,
}

/// `[metrics]`: the HTTP endpoint for Prometheus and probes.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// IP:port serving `/metrics`, `/healthz`, `/readyz`. Default none (off).
    pub listen: Option<String>,
    /// A bearer token `/metrics` and `/readyz` require
    /// (`Authorization: Bearer TOKEN`). Default none.
    pub auth_token: Option<String>,
    /// With `auth_password`: HTTP basic authentication for `/metrics` and
    /// `/readyz`. Default none.
    pub auth_user: Option<String>,
    /// The basic-authentication password. Default none.
    pub auth_password: Option<String>,
}

impl Metrics {
    /// Whether requests must authenticate.
    pub fn requires_auth(&self) -> bool {
        self.auth_token.is_some() || self.auth_user.is_some()
    }
}

/// `[routing]`: read routing to replicas, health checks, read-your-writes.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Routing {
    /// How often each backend is checked. Default `1s`.
    #[serde(default = "d_health_period", with = "duration")]
    pub health_check_period: Duration,
    /// A replica further behind than this is banned. Default `10s`.
    #[serde(default = "d_max_lag", with = "duration")]
    pub max_replica_lag: Duration,
    /// With no usable replica, reads go to the `primary` or fail (`error`). Default `primary`.
    #[serde(default)]
    pub replica_fallback: ReplicaFallback,
    /// After a client's write, its reads use only replicas that replayed it. Default true.
    #[serde(default = "d_true")]
    pub read_your_writes: bool,
    /// Only functions known to be read-only may run on replicas. Default false.
    #[serde(default)]
    pub strict: bool,
    /// Extra functions that write (added to the built-in list). Default empty.
    #[serde(default)]
    pub write_functions: Vec<String>,
    /// Extra functions known to be read-only (for `strict`). Default empty.
    #[serde(default)]
    pub read_only_functions: Vec<String>,
    /// Explicit transactions go to the `primary` as a whole (unless read-only),
    /// or are routed by their `first_statement`. Default `primary`.
    #[serde(default)]
    pub transaction_routing: TransactionRouting,
    /// When the primary is unreachable (or in recovery) and a configured
    /// replica is no longer in recovery (an operator or Patroni promoted
    /// it), `auto` sends writes there; `manual` waits for a RELOAD with a
    /// new primary. Default `auto`.
    #[serde(default)]
    pub failover: Failover,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Failover {
    #[default]
    Auto,
    Manual,
}

impl Failover {
    pub fn name(self) -> &'static str {
        match self {
            Failover::Auto => "auto",
            Failover::Manual => "manual",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransactionRouting {
    #[default]
    Primary,
    FirstStatement,
}

impl Default for Routing {
    fn default() -> Self {
        Self {
            health_check_period: d_health_period(),
            max_replica_lag: d_max_lag(),
            replica_fallback: ReplicaFallback::Primary,
            read_your_writes: true,
            strict: false,
            write_functions: Vec::new(),
            read_only_functions: Vec::new(),
            transaction_routing: TransactionRouting::Primary,
            failover: Failover::Auto,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplicaFallback {
    #[default]
    Primary,
    Error,
}

/// `[tidepool]`: process-wide settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct General {
    /// Addresses to listen on. Default `["127.0.0.1:6432"]`.
    #[serde(default = "defaults::listen")]
    pub listen: Vec<String>,
    /// Users allowed every admin-console command. Default empty.
    #[serde(default)]
    pub admin_users: Vec<String>,
    /// Users allowed the admin console's SHOW commands. Default empty.
    #[serde(default)]
    pub stats_users: Vec<String>,
    /// How clients authenticate: `scram-sha-256`, `md5` or `trust`. Default `scram-sha-256`.
    #[serde(default = "default_auth_type")]
    pub auth_type: AuthType,
    /// Largest client message in bytes. Default 64 MiB.
    #[serde(default = "default_max_message_size")]
    pub max_message_size: usize,
    /// On SIGTERM/SIGINT/SHUTDOWN, how long transactions in flight may take
    /// to finish before connections are closed. Default `30s`.
    #[serde(default = "d_shutdown", with = "duration")]
    pub shutdown_timeout: Duration,
    /// Address rules in pg_hba.conf format (PgBouncer's subset), checked
    /// before authentication; relative to the config file. Default none.
    #[serde(default)]
    pub auth_hba_file: Option<String>,
    /// Delay before a failed login is answered; doubles with each failure
    /// from the same address. `0s`: none. Default `100ms`.
    #[serde(default = "d_auth_delay", with = "duration")]
    pub auth_failure_delay: Duration,
    /// The most a failed login is delayed. Default `2s`.
    #[serde(default = "d_auth_max_delay", with = "duration")]
    pub auth_failure_max_delay: Duration,
    /// Failed logins after which an address is refused for
    /// `auth_failure_cooldown`; 0: never. Default 20.
    #[serde(default = "d_auth_limit")]
    pub auth_failure_limit: u32,
    /// How long a refused address stays refused, and how long failures are
    /// remembered. Default `60s`.
    #[serde(default = "d_auth_cooldown", with = "duration")]
    pub auth_failure_cooldown: Duration,
    /// TLS for clients: `disable`, `allow`, `prefer`, `require`,
    /// `verify-ca`, `verify-full` (PgBouncer's meanings). Default `disable`.
    #[serde(default = "d_client_tls")]
    pub client_tls_sslmode: crate::tls::Mode,
    /// The certificate (PEM, chain) tidepool shows clients. Default none.
    #[serde(default)]
    pub client_tls_cert_file: Option<String>,
    /// Its private key (PEM). Default none.
    #[serde(default)]
    pub client_tls_key_file: Option<String>,
    /// CA certificates that sign clients' certificates (verify-ca,
    /// verify-full). Default none.
    #[serde(default)]
    pub client_tls_ca_file: Option<String>,
    /// A user of `[users]` (with a plain password) that tidepool logs in as
    /// to look up users not in the config with `auth_query`. Default none.
    #[serde(default)]
    pub auth_user: Option<String>,
    /// The query that returns (name, password or verifier) for `$1`.
    /// Default PgBouncer's, on pg_authid.
    #[serde(default = "d_auth_query")]
    pub auth_query: String,
    /// The database `auth_query` runs in. Default: the one the client asks for.
    #[serde(default)]
    pub auth_dbname: Option<String>,
    /// How long an answer of `auth_query` is used. Default `60s`.
    #[serde(default = "d_auth_cache", with = "duration")]
    pub auth_cache_lifetime: Duration,
    /// Bytes all clients' buffered whole messages may take together (each
    /// buffer above 64 KiB counts); past it a client gets 53200. Default
    /// 256 MiB.
    #[serde(default = "d_client_buffers")]
    pub max_client_buffer_bytes: usize,
    /// How many tidepool instances serve the same databases (sidecars):
    /// while `rate_limit_backend` is unreachable each instance limits
    /// locally to `1/instances` of every tier. Default 1.
    #[serde(default = "d_instances")]
    pub instances: u64,
    /// Listen with SO_REUSEPORT, so that a second tidepool can listen on the
    /// same addresses during an upgrade (PgBouncer's name). Default false.
    #[serde(default)]
    pub so_reuseport: bool,
    /// A Unix socket on which this tidepool hands its listening sockets to
    /// a new one started with `--takeover` (upgrades without refusing a
    /// connection). Default none.
    pub upgrade_socket: Option<String>,
    /// A directory for a Unix-domain listening socket `.s.PGSQL.PORT` (the
    /// port of the first `listen` address), as PgBouncer's. Default none.
    pub unix_socket_dir: Option<String>,
    /// TCP keepalive on client and server connections. Default true.
    #[serde(default = "d_true")]
    pub tcp_keepalive: bool,
    /// Idle time before the first keepalive probe; `0s`: the OS default.
    #[serde(default, with = "duration")]
    pub tcp_keepidle: Duration,
    /// Time between keepalive probes; `0s`: the OS default.
    #[serde(default, with = "duration")]
    pub tcp_keepintvl: Duration,
    /// Unanswered probes before the connection is dropped; 0: the OS default.
    #[serde(default)]
    pub tcp_keepcnt: u32,
    /// How long sent data may stay unacknowledged before the connection is
    /// dropped (TCP_USER_TIMEOUT); `0s`: the OS default.
    #[serde(default, with = "duration")]
    pub tcp_user_timeout: Duration,
}

impl Default for General {
    fn default() -> Self {
        Self {
            listen: defaults::listen(),
            admin_users: Vec::new(),
            stats_users: Vec::new(),
            auth_type: default_auth_type(),
            max_message_size: defaults::MAX_MESSAGE_SIZE,
            shutdown_timeout: d_shutdown(),
            auth_hba_file: None,
            auth_failure_delay: d_auth_delay(),
            auth_failure_max_delay: d_auth_max_delay(),
            auth_failure_limit: d_auth_limit(),
            auth_failure_cooldown: d_auth_cooldown(),
            client_tls_sslmode: d_client_tls(),
            client_tls_cert_file: None,
            client_tls_key_file: None,
            client_tls_ca_file: None,
            auth_user: None,
            auth_query: d_auth_query(),
            auth_dbname: None,
            auth_cache_lifetime: d_auth_cache(),
            max_client_buffer_bytes: d_client_buffers(),
            instances: d_instances(),
            so_reuseport: false,
            upgrade_socket: None,
            unix_socket_dir: None,
            tcp_keepalive: true,
            tcp_keepidle: Duration::ZERO,
            tcp_keepintvl: Duration::ZERO,
            tcp_keepcnt: 0,
            tcp_user_timeout: Duration::ZERO,
        }
    }
}

use crate::auth::AuthType;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    Transaction,
    Session,
}

impl PoolMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Transaction => "transaction",
            Self::Session => "session",
        }
    }
}

/// `[pool]`: pool limits and timeouts, with PgBouncer's names.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSettings {
    /// `transaction` or `session`. Default `transaction`.
    #[serde(default = "default_pool_mode")]
    pub pool_mode: PoolMode,
    /// Server connections per (database, user) pool. Default 20.
    #[serde(default = "default_pool_size")]
    pub default_pool_size: u32,
    /// Warm server connections kept per pool. Default 0.
    #[serde(default)]
    pub min_pool_size: u32,
    /// Client connections accepted in total. Default 100.
    #[serde(default = "default_max_client_conn")]
    pub max_client_conn: u32,
    /// Server connections per database across its pools; 0 = unlimited. Default 0.
    #[serde(default)]
    pub max_db_connections: u32,
    /// Server connections per user across all its pools; 0 = unlimited.
    /// Default 0.
    #[serde(default)]
    pub max_user_connections: u32,
    /// Client connections per database; 0 = unlimited. Default 0.
    #[serde(default)]
    pub max_db_client_connections: u32,
    /// Client connections per user; 0 = unlimited. Default 0.
    #[serde(default)]
    pub max_user_client_connections: u32,
    /// How long a client waits for a server before `53300`. Default `120s`; `0` waits forever.
    #[serde(default = "d_query_wait", with = "duration")]
    pub query_wait_timeout: Duration,
    /// A client that has waited this long for a server gets a NOTICE
    /// saying so (PgBouncer 1.25's name and meaning). Default `5s`; `0` off.
    #[serde(default = "d_query_wait_notify", with = "duration")]
    pub query_wait_notify: Duration,
    /// Time allowed for a client's startup and authentication. Default `60s`.
    #[serde(default = "d_login", with = "duration")]
    pub client_login_timeout: Duration,
    /// Time allowed to connect and log in to a server. Default `15s`.
    #[serde(default = "d_connect", with = "duration")]
    pub server_connect_timeout: Duration,
    /// Idle server connections above `min_pool_size` close after this. Default `600s`; `0` never.
    #[serde(default = "d_server_idle", with = "duration")]
    pub server_idle_timeout: Duration,
    /// Server connections close at release once this old. Default `3600s`; `0` never.
    #[serde(default = "d_lifetime", with = "duration")]
    pub server_lifetime: Duration,
    /// A client idle inside a transaction this long is disconnected. Default `0` (off).
    #[serde(default, with = "duration")]
    pub idle_transaction_timeout: Duration,
    /// A client that holds a server without using it (idle in a
    /// transaction, or pinned and idle) this long is reported once: a
    /// warning, SHOW LEAKS, a counter. Default `10s`; `0` off.
    #[serde(default = "d_leak_warn_after", with = "duration")]
    pub leak_warn_after: Duration,
    /// A client idle (between transactions) this long is parked: it gives up
    /// its task and runtime registration until it sends something. Default
    /// `1s`; `0` never parks.
    #[serde(default = "d_park", with = "duration")]
    pub park_idle_clients_after: Duration,
    /// Run on a server when a session-mode client leaves. Default `DISCARD ALL`; empty = none.
    #[serde(default = "d_reset_query")]
    pub server_reset_query: String,
    /// An idle server connection unused for this long is checked with
    /// `server_check_query` before a client gets it (PgBouncer's meaning;
    /// `0s`: checked every time). Default `30s`.
    #[serde(default = "d_check_delay", with = "duration")]
    pub server_check_delay: Duration,
    /// The check: a query the server must answer without error. Default
    /// empty: an empty query (PostgreSQL answers EmptyQueryResponse, the
    /// cheapest round trip), as PgBouncer 1.25.
    #[serde(default)]
    pub server_check_query: String,
    /// Named prepared statements kept per server connection (LRU); 0 turns
    /// statement tracking off in transaction mode. Default 200.
    #[serde(default = "d_max_prepared")]
    pub max_prepared_statements: u32,
    /// What session features (LISTEN, session advisory locks, temp tables,
    /// WITH HOLD cursors, SQL PREPARE) do in transaction mode: `pin` keeps the
    /// client on its server, `error` refuses the statement. Default `pin`.
    #[serde(default)]
    pub session_features: SessionFeatures,
    /// LISTEN in transaction mode: `shared` (tidepool listens for its
    /// clients on one connection per database and delivers to them; no
    /// pin) or `pin` (a session feature, as `session_features` says).
    /// Default `shared`.
    #[serde(default)]
    pub listen_mode: ListenMode,
    /// Notifications queued for one client that has not taken them yet
    /// (busy in a transaction, or not reading); past that the client is
    /// closed (54000). Default 10000.
    #[serde(default = "d_max_queued_notifications")]
    pub max_queued_notifications: u32,
    /// Extra server connections a pool may open for clients that waited
    /// `reserve_pool_timeout` (PgBouncer's meaning). Default 0.
    #[serde(default)]
    pub reserve_pool_size: u32,
    /// How long a client waits before a reserve connection may serve it.
    /// Default `5s`.
    #[serde(default = "d_reserve_timeout", with = "duration")]
    pub reserve_pool_timeout: Duration,
    /// A statement running longer than this is canceled on the server and
    /// the client gets 57014 naming the setting. `0s`: never. Default `0s`.
    #[serde(default, with = "duration")]
    pub query_timeout: Duration,
    /// A client idle (outside a transaction) for longer than this is
    /// closed (57P05). `0s`: never. Default `0s`.
    #[serde(default, with = "duration")]
    pub client_idle_timeout: Duration,
    /// TLS to PostgreSQL: `disable`, `allow`, `prefer`, `require`,
    /// `verify-ca`, `verify-full`. Default `prefer`.
    #[serde(default = "d_server_tls")]
    pub server_tls_sslmode: crate::tls::Mode,
    /// CA certificates that sign the servers' certificates. Default none.
    #[serde(default)]
    pub server_tls_ca_file: Option<String>,
    /// A client certificate tidepool shows servers. Default none.
    #[serde(default)]
    pub server_tls_cert_file: Option<String>,
    /// Its private key. Default none.
    #[serde(default)]
    pub server_tls_key_file: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenMode {
    #[default]
    Shared,
    Pin,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionFeatures {
    #[default]
    Pin,
    Error,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            pool_mode: default_pool_mode(),
            default_pool_size: defaults::DEFAULT_POOL_SIZE,
            min_pool_size: defaults::MIN_POOL_SIZE,
            max_client_conn: defaults::MAX_CLIENT_CONN,
            max_db_connections: defaults::MAX_DB_CONNECTIONS,
            max_user_connections: 0,
            max_db_client_connections: 0,
            max_user_client_connections: 0,
            query_wait_timeout: defaults::QUERY_WAIT_TIMEOUT,
            query_wait_notify: d_query_wait_notify(),
            client_login_timeout: defaults::CLIENT_LOGIN_TIMEOUT,
            server_connect_timeout: defaults::SERVER_CONNECT_TIMEOUT,
            server_idle_timeout: defaults::SERVER_IDLE_TIMEOUT,
            server_lifetime: defaults::SERVER_LIFETIME,
            idle_transaction_timeout: defaults::IDLE_TRANSACTION_TIMEOUT,
            leak_warn_after: d_leak_warn_after(),
            park_idle_clients_after: defaults::PARK_IDLE_CLIENTS_AFTER,
            server_reset_query: d_reset_query(),
            server_check_delay: d_check_delay(),
            server_check_query: String::new(),
            max_prepared_statements: defaults::MAX_PREPARED_STATEMENTS,
            session_features: SessionFeatures::Pin,
            listen_mode: ListenMode::Shared,
            max_queued_notifications: d_max_queued_notifications(),
            reserve_pool_size: 0,
            reserve_pool_timeout: d_reserve_timeout(),
            client_idle_timeout: Duration::ZERO,
            query_timeout: Duration::ZERO,
            server_tls_sslmode: d_server_tls(),
            server_tls_ca_file: None,
            server_tls_cert_file: None,
            server_tls_key_file: None,
        }
    }
}

/// `[databases.NAME]`: a database as clients name it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Database {
    /// Primary host. Required.
    pub host: String,
    /// Primary port. Default 5432.
    #[serde(default = "default_port")]
    pub port: u16,
    /// Real database name on the server. Default: the table key.
    pub dbname: Option<String>,
    /// Log in to PostgreSQL as this user instead of the client's.
    pub user: Option<String>,
    /// Password for `user` (plain text).
    pub password: Option<String>,
    /// Overrides `[pool] default_pool_size` for this database.
    pub pool_size: Option<u32>,
    /// The `[rate_limits.tiers]` tier limiting this database's transactions.
    pub rate_limit_tier: Option<String>,
    /// Overrides `[pool] max_db_connections` for this database.
    pub max_db_connections: Option<u32>,
    /// Overrides `[pool] max_db_client_connections` for this database.
    pub max_db_client_connections: Option<u32>,
    /// Overrides `[pool] reserve_pool_size` for this database.
    pub reserve_pool_size: Option<u32>,
    /// Overrides `[pool] min_pool_size` for this database.
    pub min_pool_size: Option<u32>,
    /// Overrides `[pool] pool_mode` for this database.
    pub pool_mode: Option<PoolMode>,
    /// Overrides `[pool] session_features` for this database.
    pub session_features: Option<SessionFeatures>,
    /// Streaming replicas: reads go there when healthy.
    #[serde(default)]
    pub replicas: Vec<Replica>,
    /// User for health checks. Default: `user`, else the first user with a plain password.
    pub health_user: Option<String>,
    /// Password of `health_user`.
    pub health_password: Option<String>,
    /// Overrides `[stats] slow_query_threshold` for this database.
    #[serde(default, with = "opt_duration")]
    pub slow_query_threshold: Option<Duration>,
    /// Override `[pool] server_tls_sslmode` for this database (and its replicas).
    pub server_tls_sslmode: Option<crate::tls::Mode>,
    /// Override `[pool] server_tls_ca_file`.
    pub server_tls_ca_file: Option<String>,
    /// Override `[pool] server_tls_cert_file`.
    pub server_tls_cert_file: Option<String>,
    /// Override `[pool] server_tls_key_file`.
    pub server_tls_key_file: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Replica {
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
    /// Share of reads relative to other replicas. Default 1.
    #[serde(default = "d_weight")]
    pub weight: u32,
}

/// `[users.NAME]`: a user clients may log in as.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    /// Plain password, `SCRAM-SHA-256$...` verifier or `md5...` hash.
    pub password: Option<String>,
    /// Overrides `[tidepool] auth_type` for this user.
    pub auth_type: Option<AuthType>,
    /// Overrides the pool size for this user's pools.
    pub pool_size: Option<u32>,
    /// Overrides `[pool] max_user_connections` for this user.
    pub max_user_connections: Option<u32>,
    /// Overrides `[pool] max_user_client_connections` for this user.
    pub max_user_client_connections: Option<u32>,
    /// The `[rate_limits.tiers]` tier limiting this user's transactions.
    pub rate_limit_tier: Option<String>,
}
