//! The config as `(key, value, default, changeable)` rows for the console's
//! `SHOW CONFIG`. Values as in `proxy.toml`.

use std::time::Duration;

use super::schema::{Config, General, Metrics, PoolSettings, Routing, Stats};

fn d(v: Duration) -> String {
    humantime::format_duration(v).to_string()
}

fn list(v: &[String]) -> String {
    v.join(",")
}

fn routing(t: super::schema::TransactionRouting) -> &'static str {
    match t {
        super::schema::TransactionRouting::Primary => "primary",
        super::schema::TransactionRouting::FirstStatement => "first_statement",
    }
}

type Row = (String, String, String, bool);

/// Keys are bare, as in PgBouncer (exporters look them up by name); the
/// one name two sections share is `metrics_listen`.
fn row(section: &str, key: &str, value: String, default: String, changeable: bool) -> Row {
    let key = if section == "metrics" {
        format!("metrics_{key}")
    } else {
        key.to_owned()
    };
    (key, value, default, changeable)
}

/// Every process-wide setting (databases and users are shown by
/// `SHOW DATABASES` and `SHOW USERS`). `changeable` means RELOAD applies it.
pub fn describe(c: &Config) -> Vec<Row> {
    let (g, gd) = (&c.tidepool, General::default());
    let (p, pd) = (&c.pool, PoolSettings::default());
    let (r, rd) = (&c.routing, Routing::default());
    let (s, sd) = (&c.stats, Stats::default());
    let (m, md) = (&c.metrics, Metrics::default());
    let auth = |a: super::AuthType| a.name().to_owned();
    let opt = |o: &Option<String>| o.clone().unwrap_or_default();
    // Secrets are never shown: only whether one is set.
    let secret = |o: &Option<String>| if o.is_some() { "(set)" } else { "" }.to_owned();
    let (l, ld) = (&c.rate_limits, super::schema::RateLimits::default());
    let mode = |m: crate::tls::Mode| m.name().to_owned();
    // Keys added after the first release, each (section, key, value,
    // default); all of them RELOAD applies.
    let later: [(&str, &str, String, String); 29] = [
        (
            "tidepool",
            "client_tls_sslmode",
            mode(g.client_tls_sslmode),
            mode(gd.client_tls_sslmode),
        ),
        (
            "tidepool",
            "client_tls_cert_file",
            opt(&g.client_tls_cert_file),
            String::new(),
        ),
        (
            "tidepool",
            "client_tls_key_file",
            opt(&g.client_tls_key_file),
            String::new(),
        ),
        (
            "tidepool",
            "client_tls_ca_file",
            opt(&g.client_tls_ca_file),
            String::new(),
        ),
        ("tidepool", "auth_user", opt(&g.auth_user), String::new()),
        (
            "tidepool",
            "auth_query",
            g.auth_query.clone(),
            gd.auth_query.clone(),
        ),
        (
            "tidepool",
            "auth_dbname",
            opt(&g.auth_dbname),
            String::new(),
        ),
        (
            "tidepool",
            "auth_cache_lifetime",
            d(g.auth_cache_lifetime),
            d(gd.auth_cache_lifetime),
        ),
        (
            "tidepool",
            "max_client_buffer_bytes",
            g.max_client_buffer_bytes.to_string(),
            gd.max_client_buffer_bytes.to_string(),
        ),
        (
            "tidepool",
            "unix_socket_dir",
            opt(&g.unix_socket_dir),
            String::new(),
        ),
        (
            "tidepool",
            "upgrade_socket",
            opt(&g.upgrade_socket),
            String::new(),
        ),
        (
            "tidepool",
            "so_reuseport",
            g.so_reuseport.to_string(),
            gd.so_reuseport.to_string(),
        ),
        (
            "tidepool",
            "instances",
            g.instances.to_string(),
            gd.instances.to_string(),
        ),
        (
            "tidepool",
            "tcp_keepalive",
            g.tcp_keepalive.to_string(),
            gd.tcp_keepalive.to_string(),
        ),
        (
            "tidepool",
            "tcp_keepidle",
            d(g.tcp_keepidle),
            d(gd.tcp_keepidle),
        ),
        (
            "tidepool",
            "tcp_keepintvl",
            d(g.tcp_keepintvl),
            d(gd.tcp_keepintvl),
        ),
        (
            "tidepool",
            "tcp_keepcnt",
            g.tcp_keepcnt.to_string(),
            gd.tcp_keepcnt.to_string(),
        ),
        (
            "tidepool",
            "tcp_user_timeout",
            d(g.tcp_user_timeout),
            d(gd.tcp_user_timeout),
        ),
        (
            "routing",
            "failover",
            c.routing.failover.name().to_owned(),
            rd.failover.name().to_owned(),
        ),
        (
            "pool",
            "server_check_delay",
            d(p.server_check_delay),
            d(pd.server_check_delay),
        ),
        (
            "pool",
            "server_check_query",
            p.server_check_query.clone(),
            String::new(),
        ),
        (
            "pool",
            "server_tls_sslmode",
            mode(p.server_tls_sslmode),
            mode(pd.server_tls_sslmode),
        ),
        (
            "pool",
            "server_tls_ca_file",
            opt(&p.server_tls_ca_file),
            String::new(),
        ),
        (
            "pool",
            "server_tls_cert_file",
            opt(&p.server_tls_cert_file),
            String::new(),
        ),
        (
            "pool",
            "server_tls_key_file",
            opt(&p.server_tls_key_file),
            String::new(),
        ),
        (
            "rate_limits",
            "rate_limit_wait",
            d(l.rate_limit_wait),
            d(ld.rate_limit_wait),
        ),
        // The URL without its password.
        (
            "rate_limits",
            "rate_limit_backend",
            l.rate_limit_backend
                .as_deref()
                .map(redact_url)
                .unwrap_or_default(),
            String::new(),
        ),
        (
            "rate_limits",
            "rate_limit_backend_timeout",
            d(l.rate_limit_backend_timeout),
            d(ld.rate_limit_backend_timeout),
        ),
        (
            "rate_limits",
            "rate_limit_tiers",
            l.tiers.keys().cloned().collect::<Vec<_>>().join(","),
            String::new(),
        ),
    ];
    let mut rows = vec![
        row(
            "tidepool",
            "listen",
            list(&g.listen),
            list(&gd.listen),
            false,
        ),
        row(
            "tidepool",
            "admin_users",
            list(&g.admin_users),
            list(&gd.admin_users),
            true,
        ),
        row(
            "tidepool",
            "stats_users",
            list(&g.stats_users),
            list(&gd.stats_users),
            true,
        ),
        row(
            "tidepool",
            "auth_type",
            auth(g.auth_type),
            auth(gd.auth_type),
            true,
        ),
        row(
            "tidepool",
            "max_message_size",
            g.max_message_size.to_string(),
            gd.max_message_size.to_string(),
            true,
        ),
        row(
            "tidepool",
            "shutdown_timeout",
            d(g.shutdown_timeout),
            d(gd.shutdown_timeout),
            true,
        ),
        row(
            "tidepool",
            "auth_hba_file",
            opt(&g.auth_hba_file),
            opt(&gd.auth_hba_file),
            true,
        ),
        row(
            "tidepool",
            "auth_failure_delay",
            d(g.auth_failure_delay),
            d(gd.auth_failure_delay),
            true,
        ),
        row(
            "tidepool",
            "auth_failure_max_delay",
            d(g.auth_failure_max_delay),
            d(gd.auth_failure_max_delay),
            true,
        ),
        row(
            "tidepool",
            "auth_failure_limit",
            g.auth_failure_limit.to_string(),
            gd.auth_failure_limit.to_string(),
            true,
        ),
        row(
            "tidepool",
            "auth_failure_cooldown",
            d(g.auth_failure_cooldown),
            d(gd.auth_failure_cooldown),
            true,
        ),
        row(
            "pool",
            "pool_mode",
            p.pool_mode.as_str().into(),
            pd.pool_mode.as_str().into(),
            true,
        ),
        row(
            "pool",
            "default_pool_size",
            p.default_pool_size.to_string(),
            pd.default_pool_size.to_string(),
            true,
        ),
        row(
            "pool",
            "min_pool_size",
            p.min_pool_size.to_string(),
            pd.min_pool_size.to_string(),
            true,
        ),
        row(
            "pool",
            "max_client_conn",
            p.max_client_conn.to_string(),
            pd.max_client_conn.to_string(),
            true,
        ),
        row(
            "pool",
            "max_db_connections",
            p.max_db_connections.to_string(),
            pd.max_db_connections.to_string(),
            true,
        ),
        row(
            "pool",
            "max_user_connections",
            p.max_user_connections.to_string(),
            pd.max_user_connections.to_string(),
            true,
        ),
        row(
            "pool",
            "max_db_client_connections",
            p.max_db_client_connections.to_string(),
            pd.max_db_client_connections.to_string(),
            true,
        ),
        row(
            "pool",
            "max_user_client_connections",
            p.max_user_client_connections.to_string(),
            pd.max_user_client_connections.to_string(),
            true,
        ),
        row(
            "pool",
            "query_wait_timeout",
            d(p.query_wait_timeout),
            d(pd.query_wait_timeout),
            true,
        ),
        row(
            "pool",
            "client_login_timeout",
            d(p.client_login_timeout),
            d(pd.client_login_timeout),
            true,
        ),
        row(
            "pool",
            "server_connect_timeout",
            d(p.server_connect_timeout),
            d(pd.server_connect_timeout),
            false,
        ),
        row(
            "pool",
            "server_idle_timeout",
            d(p.server_idle_timeout),
            d(pd.server_idle_timeout),
            true,
        ),
        row(
            "pool",
            "server_lifetime",
            d(p.server_lifetime),
            d(pd.server_lifetime),
            true,
        ),
        row(
            "pool",
            "idle_transaction_timeout",
            d(p.idle_transaction_timeout),
            d(pd.idle_transaction_timeout),
            true,
        ),
        row(
            "pool",
            "query_wait_notify",
            d(p.query_wait_notify),
            d(pd.query_wait_notify),
            true,
        ),
        row(
            "pool",
            "leak_warn_after",
            d(p.leak_warn_after),
            d(pd.leak_warn_after),
            true,
        ),
        row(
            "pool",
            "reserve_pool_size",
            p.reserve_pool_size.to_string(),
            pd.reserve_pool_size.to_string(),
            true,
        ),
        row(
            "pool",
            "reserve_pool_timeout",
            d(p.reserve_pool_timeout),
            d(pd.reserve_pool_timeout),
            true,
        ),
        row(
            "pool",
            "query_timeout",
            d(p.query_timeout),
            d(pd.query_timeout),
            true,
        ),
        row(
            "pool",
            "client_idle_timeout",
            d(p.client_idle_timeout),
            d(pd.client_idle_timeout),
            true,
        ),
        row(
            "pool",
            "park_idle_clients_after",
            d(p.park_idle_clients_after),
            d(pd.park_idle_clients_after),
            true,
        ),
        row(
            "pool",
            "server_reset_query",
            p.server_reset_query.clone(),
            pd.server_reset_query.clone(),
            true,
        ),
        row(
            "pool",
            "max_prepared_statements",
            p.max_prepared_statements.to_string(),
            pd.max_prepared_statements.to_string(),
            true,
        ),
        row(
            "pool",
            "session_features",
            format!("{:?}", p.session_features).to_lowercase(),
            format!("{:?}", pd.session_features).to_lowercase(),
            true,
        ),
        row(
            "pool",
            "listen_mode",
            format!("{:?}", p.listen_mode).to_lowercase(),
            format!("{:?}", pd.listen_mode).to_lowercase(),
            true,
        ),
        row(
            "pool",
            "max_queued_notifications",
            p.max_queued_notifications.to_string(),
            pd.max_queued_notifications.to_string(),
            true,
        ),
        row(
            "routing",
            "health_check_period",
            d(r.health_check_period),
            d(rd.health_check_period),
            true,
        ),
        row(
            "routing",
            "max_replica_lag",
            d(r.max_replica_lag),
            d(rd.max_replica_lag),
            true,
        ),
        row(
            "routing",
            "replica_fallback",
            format!("{:?}", r.replica_fallback).to_lowercase(),
            format!("{:?}", rd.replica_fallback).to_lowercase(),
            true,
        ),
        row(
            "routing",
            "read_your_writes",
            r.read_your_writes.to_string(),
            rd.read_your_writes.to_string(),
            true,
        ),
        row(
            "routing",
            "strict",
            r.strict.to_string(),
            rd.strict.to_string(),
            true,
        ),
        row(
            "routing",
            "write_functions",
            list(&r.write_functions),
            list(&rd.write_functions),
            true,
        ),
        row(
            "routing",
            "read_only_functions",
            list(&r.read_only_functions),
            list(&rd.read_only_functions),
            true,
        ),
        row(
            "routing",
            "transaction_routing",
            routing(r.transaction_routing).into(),
            routing(rd.transaction_routing).into(),
            true,
        ),
        row(
            "stats",
            "stats_period",
            d(s.stats_period),
            d(sd.stats_period),
            true,
        ),
        row(
            "stats",
            "slow_query_threshold",
            d(s.slow_query_threshold),
            d(sd.slow_query_threshold),
            true,
        ),
        row(
            "stats",
            "slow_query_log_size",
            s.slow_query_log_size.to_string(),
            sd.slow_query_log_size.to_string(),
            false,
        ),
        row(
            "stats",
            "max_query_fingerprints",
            s.max_query_fingerprints.to_string(),
            sd.max_query_fingerprints.to_string(),
            false,
        ),
        row(
            "stats",
            "health_window",
            d(s.health_window),
            d(sd.health_window),
            true,
        ),
        row(
            "stats",
            "degraded_slow_ratio",
            s.degraded_slow_ratio.to_string(),
            sd.degraded_slow_ratio.to_string(),
            true,
        ),
        row(
            "stats",
            "unhealthy_slow_ratio",
            s.unhealthy_slow_ratio.to_string(),
            sd.unhealthy_slow_ratio.to_string(),
            true,
        ),
        row("metrics", "listen", opt(&m.listen), opt(&md.listen), false),
        row(
            "metrics",
            "auth_token",
            secret(&m.auth_token),
            String::new(),
            true,
        ),
        row(
            "metrics",
            "auth_user",
            opt(&m.auth_user),
            opt(&md.auth_user),
            true,
        ),
        row(
            "metrics",
            "auth_password",
            secret(&m.auth_password),
            String::new(),
            true,
        ),
    ];
    rows.extend(
        c.tracing
            .describe(&super::otlp::Tracing::default())
            .into_iter()
            .map(|(key, v, dv)| row("tracing", key, v, dv, key == "sample_ratio")),
    );
    rows.extend(
        later
            .into_iter()
            // Listening options apply at start only.
            .map(|(section, key, v, dv)| {
                row(
                    section,
                    key,
                    v,
                    dv,
                    !matches!(key, "so_reuseport" | "upgrade_socket" | "unix_socket_dir"),
                )
            }),
    );
    rows
}

/// `redis://:secret@host/0` as `redis://:***@host/0`.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}
