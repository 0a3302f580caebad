//! Every default value of `proxy.toml`, in one place. PgBouncer's defaults are
//! kept where a PgBouncer setting of the same name exists.

use std::time::Duration;

pub fn listen() -> Vec<String> {
    vec!["127.0.0.1:6432".to_owned()]
}
pub const AUTH_TYPE: &str = "scram-sha-256";
/// Largest message accepted from a client (bytes): 64 MiB, a statement far
/// larger than applications send, and a bound that many clients at once
/// cannot turn into gigabytes. PostgreSQL itself caps at 1 GiB.
pub const MAX_MESSAGE_SIZE: usize = 64 * 1024 * 1024;

pub const DEFAULT_POOL_SIZE: u32 = 20;
pub const MIN_POOL_SIZE: u32 = 0;
pub const MAX_CLIENT_CONN: u32 = 100;
/// 0 = unlimited, as in PgBouncer.
pub const MAX_DB_CONNECTIONS: u32 = 0;
pub const QUERY_WAIT_TIMEOUT: Duration = Duration::from_secs(120);
pub const CLIENT_LOGIN_TIMEOUT: Duration = Duration::from_secs(60);
pub const SERVER_CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
pub const SERVER_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
pub const SERVER_LIFETIME: Duration = Duration::from_secs(3600);
/// 0 = disabled, as in PgBouncer.
pub const IDLE_TRANSACTION_TIMEOUT: Duration = Duration::ZERO;
/// tidepool's own: idle clients leave their task after this (0 = never).
pub const PARK_IDLE_CLIENTS_AFTER: Duration = Duration::from_secs(1);
pub const SERVER_RESET_QUERY: &str = "DISCARD ALL";
pub const PORT: u16 = 5432;
/// As in PgBouncer 1.22+.
pub const MAX_PREPARED_STATEMENTS: u32 = 200;
pub const HEALTH_CHECK_PERIOD: Duration = Duration::from_secs(1);
pub const MAX_REPLICA_LAG: Duration = Duration::from_secs(10);
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
/// Failed-login throttling: the first failure's delay, its cap, the
/// failures before an address is refused, and for how long.
pub const AUTH_FAILURE_DELAY: Duration = Duration::from_millis(100);
pub const AUTH_FAILURE_MAX_DELAY: Duration = Duration::from_secs(2);
pub const AUTH_FAILURE_LIMIT: u32 = 20;
pub const AUTH_FAILURE_COOLDOWN: Duration = Duration::from_secs(60);
/// PgBouncer's default auth_query (schema-qualified: it runs with
/// search_path fixed anyway).
pub const AUTH_QUERY: &str = "SELECT rolname, CASE WHEN rolvaliduntil < pg_catalog.now() THEN NULL ELSE rolpassword END FROM pg_catalog.pg_authid WHERE rolname = $1 AND rolcanlogin";
/// How long an auth_query answer is used.
pub const AUTH_CACHE_LIFETIME: Duration = Duration::from_secs(60);
/// As in PgBouncer.
pub const STATS_PERIOD: Duration = Duration::from_secs(60);
pub const SLOW_QUERY_THRESHOLD: Duration = Duration::from_millis(100);
pub const SLOW_QUERY_LOG_SIZE: usize = 100;
pub const MAX_QUERY_FINGERPRINTS: usize = 1000;
pub const HEALTH_WINDOW: Duration = Duration::from_secs(60);
pub const DEGRADED_SLOW_RATIO: f64 = 0.05;
pub const UNHEALTHY_SLOW_RATIO: f64 = 0.10;

/// The functions `#[serde(default = ...)]` in `schema` names.
pub(super) mod fns {
    use std::time::Duration;

    use super::super::schema::PoolMode;
    use crate::auth::AuthType;

    pub fn default_auth_type() -> AuthType {
        AuthType::ScramSha256
    }
    pub fn default_max_message_size() -> usize {
        super::MAX_MESSAGE_SIZE
    }
    pub fn default_pool_mode() -> PoolMode {
        PoolMode::Transaction
    }
    pub fn default_pool_size() -> u32 {
        super::DEFAULT_POOL_SIZE
    }
    pub fn default_max_client_conn() -> u32 {
        super::MAX_CLIENT_CONN
    }
    pub fn default_port() -> u16 {
        super::PORT
    }
    pub fn d_query_wait() -> Duration {
        super::QUERY_WAIT_TIMEOUT
    }
    pub fn d_login() -> Duration {
        super::CLIENT_LOGIN_TIMEOUT
    }
    pub fn d_connect() -> Duration {
        super::SERVER_CONNECT_TIMEOUT
    }
    pub fn d_server_idle() -> Duration {
        super::SERVER_IDLE_TIMEOUT
    }
    pub fn d_lifetime() -> Duration {
        super::SERVER_LIFETIME
    }
    pub fn d_park() -> Duration {
        super::PARK_IDLE_CLIENTS_AFTER
    }
    pub fn d_health_period() -> Duration {
        super::HEALTH_CHECK_PERIOD
    }
    pub fn d_max_lag() -> Duration {
        super::MAX_REPLICA_LAG
    }
    pub fn d_true() -> bool {
        true
    }
    pub fn d_weight() -> u32 {
        1
    }
    pub fn d_max_prepared() -> u32 {
        super::MAX_PREPARED_STATEMENTS
    }
    pub fn d_shutdown() -> Duration {
        super::SHUTDOWN_TIMEOUT
    }
    pub fn d_auth_delay() -> Duration {
        super::AUTH_FAILURE_DELAY
    }
    pub fn d_auth_max_delay() -> Duration {
        super::AUTH_FAILURE_MAX_DELAY
    }
    pub fn d_auth_limit() -> u32 {
        super::AUTH_FAILURE_LIMIT
    }
    pub fn d_auth_cooldown() -> Duration {
        super::AUTH_FAILURE_COOLDOWN
    }
    pub fn d_auth_query() -> String {
        super::AUTH_QUERY.to_owned()
    }
    pub fn d_auth_cache() -> Duration {
        super::AUTH_CACHE_LIFETIME
    }
    pub fn d_instances() -> u64 {
        1
    }
    pub fn d_rate_backend_timeout() -> Duration {
        Duration::from_millis(50)
    }
    pub fn d_client_buffers() -> usize {
        256 << 20
    }
    pub fn d_reserve_timeout() -> Duration {
        Duration::from_secs(5)
    }
    pub fn d_client_tls() -> crate::tls::Mode {
        crate::tls::Mode::Disable
    }
    pub fn d_server_tls() -> crate::tls::Mode {
        crate::tls::Mode::Prefer
    }
    pub fn d_stats_period() -> Duration {
        super::STATS_PERIOD
    }
    pub fn d_slow() -> Duration {
        super::SLOW_QUERY_THRESHOLD
    }
    pub fn d_slow_log() -> usize {
        super::SLOW_QUERY_LOG_SIZE
    }
    pub fn d_fingerprints() -> usize {
        super::MAX_QUERY_FINGERPRINTS
    }
    pub fn d_health_window() -> Duration {
        super::HEALTH_WINDOW
    }
    pub fn d_degraded() -> f64 {
        super::DEGRADED_SLOW_RATIO
    }
    pub fn d_unhealthy() -> f64 {
        super::UNHEALTHY_SLOW_RATIO
    }
    pub fn d_query_wait_notify() -> Duration {
        Duration::from_secs(5)
    }
    pub fn d_leak_warn_after() -> Duration {
        Duration::from_secs(10)
    }
    pub fn d_max_queued_notifications() -> u32 {
        10_000
    }
    pub fn d_check_delay() -> Duration {
        Duration::from_secs(30)
    }
    pub fn d_reset_query() -> String {
        super::SERVER_RESET_QUERY.to_owned()
    }
}
