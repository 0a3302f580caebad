//! Semantic checks after parsing, and locating a key path in the source so
//! errors can name the line.

use std::net::SocketAddr;

use super::schema::Config;
use crate::auth::AuthType;
use crate::auth::secret::Secret;

type Invalid = (Vec<String>, String);

fn invalid(path: &[&str], msg: impl Into<String>) -> Invalid {
    (path.iter().map(|s| (*s).to_owned()).collect(), msg.into())
}

pub fn check(c: &Config) -> Result<(), Invalid> {
    if c.tidepool.listen.is_empty() {
        return Err(invalid(
            &["tidepool", "listen"],
            "at least one address is required",
        ));
    }
    for a in &c.tidepool.listen {
        if a.parse::<SocketAddr>().is_err() {
            return Err(invalid(
                &["tidepool", "listen"],
                format!("{a:?} is not an IP:port address"),
            ));
        }
    }
    if c.tidepool.max_message_size < 1024 {
        return Err(invalid(
            &["tidepool", "max_message_size"],
            "must be at least 1024",
        ));
    }
    let p = &c.pool;
    if p.default_pool_size == 0 {
        return Err(invalid(
            &["pool", "default_pool_size"],
            "must be at least 1",
        ));
    }
    if p.min_pool_size > p.default_pool_size {
        return Err(invalid(
            &["pool", "min_pool_size"],
            "must not exceed default_pool_size",
        ));
    }
    if p.max_client_conn == 0 {
        return Err(invalid(&["pool", "max_client_conn"], "must be at least 1"));
    }
    if c.databases.is_empty() {
        return Err(invalid(
            &["databases"],
            "at least one [databases.NAME] table is required",
        ));
    }
    for (name, db) in &c.databases {
        if db.host.trim().is_empty() {
            return Err(invalid(&["databases", name, "host"], "must not be empty"));
        }
        if db.pool_size == Some(0) {
            return Err(invalid(
                &["databases", name, "pool_size"],
                "must be at least 1",
            ));
        }
        if db.min_pool_size.unwrap_or(p.min_pool_size) > c.pool_size(db, None) {
            return Err(invalid(
                &["databases", name, "min_pool_size"],
                "must not exceed the pool size",
            ));
        }
        for (i, r) in db.replicas.iter().enumerate() {
            if r.weight == 0 {
                return Err(invalid(
                    &["databases", name, "replicas"],
                    format!("replica {i}: weight must be at least 1"),
                ));
            }
        }
        if db.password.is_some() && db.user.is_none() {
            return Err(invalid(
                &["databases", name, "password"],
                "a database password needs a database user",
            ));
        }
    }
    let st = &c.stats;
    if st.stats_period.is_zero() {
        return Err(invalid(&["stats", "stats_period"], "must be more than 0"));
    }
    if st.health_window.is_zero() {
        return Err(invalid(&["stats", "health_window"], "must be more than 0"));
    }
    for (key, v) in [
        ("degraded_slow_ratio", st.degraded_slow_ratio),
        ("unhealthy_slow_ratio", st.unhealthy_slow_ratio),
    ] {
        if !(0.0..=1.0).contains(&v) {
            return Err(invalid(&["stats", key], "must be between 0 and 1"));
        }
    }
    if st.unhealthy_slow_ratio < st.degraded_slow_ratio {
        return Err(invalid(
            &["stats", "unhealthy_slow_ratio"],
            "must not be below degraded_slow_ratio",
        ));
    }
    if let Some(url) = &c.rate_limits.rate_limit_backend
        && let Err(e) = redis::Client::open(url.as_str())
    {
        return Err(invalid(
            &["rate_limits", "rate_limit_backend"],
            format!("not a usable Redis URL: {e}"),
        ));
    }
    if c.rate_limits.rate_limit_backend_timeout.is_zero() {
        return Err(invalid(
            &["rate_limits", "rate_limit_backend_timeout"],
            "must be above 0",
        ));
    }
    if c.tidepool.instances == 0 {
        return Err(invalid(&["tidepool", "instances"], "must be at least 1"));
    }
    for (name, t) in &c.rate_limits.tiers {
        match (t.per_second, t.per_minute) {
            (Some(r), None) | (None, Some(r)) if r > 0 => {}
            _ => {
                return Err(invalid(
                    &["rate_limits", "tiers", name],
                    "needs one of per_second or per_minute, above 0",
                ));
            }
        }
    }
    for (name, u) in &c.users {
        if let Some(t) = &u.rate_limit_tier
            && !c.rate_limits.tiers.contains_key(t)
        {
            return Err(invalid(
                &["users", name, "rate_limit_tier"],
                format!("no tier {t:?} in [rate_limits.tiers]"),
            ));
        }
    }
    for (name, d) in &c.databases {
        if let Some(t) = &d.rate_limit_tier
            && !c.rate_limits.tiers.contains_key(t)
        {
            return Err(invalid(
                &["databases", name, "rate_limit_tier"],
                format!("no tier {t:?} in [rate_limits.tiers]"),
            ));
        }
    }
    if let Some(u) = &c.tidepool.auth_user {
        let plain = c
            .users
            .get(u)
            .and_then(|u| u.password.as_deref())
            .and_then(|p| Secret::parse(p).ok())
            .is_some_and(|s| matches!(s, Secret::Plain(_)));
        if !plain {
            return Err(invalid(
                &["tidepool", "auth_user"],
                format!(
                    "{u:?} must be a [users] entry with a plain password (tidepool logs in as it)"
                ),
            ));
        }
        if !c.tidepool.auth_query.contains("$1") {
            return Err(invalid(
                &["tidepool", "auth_query"],
                "must take the user name as $1",
            ));
        }
    }
    if let Some(a) = &c.metrics.listen
        && a.parse::<SocketAddr>().is_err()
    {
        return Err(invalid(
            &["metrics", "listen"],
            format!("{a:?} is not an IP:port address"),
        ));
    }
    match (&c.metrics.auth_user, &c.metrics.auth_password) {
        (Some(_), None) => {
            return Err(invalid(
                &["metrics", "auth_password"],
                "required with auth_user (HTTP basic authentication)",
            ));
        }
        (None, Some(_)) => {
            return Err(invalid(
                &["metrics", "auth_user"],
                "required with auth_password (HTTP basic authentication)",
            ));
        }
        _ => {}
    }
    c.tracing
        .check()
        .map_err(|(key, message)| invalid(&["tracing", key], message))?;
    if c.routing.health_check_period.is_zero() {
        return Err(invalid(
            &["routing", "health_check_period"],
            "must be more than 0",
        ));
    }
    for (name, user) in &c.users {
        let auth = c.auth_type(Some(user));
        let secret = match &user.password {
            Some(p) => Secret::parse(p)
                .map_err(|e| invalid(&["users", name, "password"], e.to_string()))?,
            None if auth == AuthType::Trust => continue,
            None => {
                return Err(invalid(
                    &["users", name, "password"],
                    "required unless auth_type is trust",
                ));
            }
        };
        if user.pool_size == Some(0) {
            return Err(invalid(&["users", name, "pool_size"], "must be at least 1"));
        }
        if !secret.supports(auth) {
            return Err(invalid(
                &["users", name, "password"],
                format!(
                    "a {} cannot be used with auth_type \"{}\"",
                    secret.kind(),
                    auth.name()
                ),
            ));
        }
    }
    Ok(())
}

/// 1-based line of the deepest key of `path` that exists in `src`.
pub fn locate(src: &str, path: &[String]) -> Option<usize> {
    let doc = toml_edit::Document::parse(src).ok()?;
    let mut table = doc.as_table() as &dyn toml_edit::TableLike;
    let mut best = None;
    for key in path {
        let (k, item) = table.get_key_value(key)?;
        if let Some(span) = k.span().or_else(|| item.span()) {
            best = Some(span.start);
        }
        match item.as_table_like() {
            Some(t) => table = t,
            None => break,
        }
    }
    best.map(|off| super::line_of(src, off))
}
