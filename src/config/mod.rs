//! `proxy.toml`: loading, validation and the resolved view the rest of the
//! proxy reads.
//!
//! Invariant: a `Config` that exists has passed validation; every error names
//! the file, the line and the key. Unknown keys are errors.

pub mod defaults;
mod describe;
mod duration;
pub mod otlp;
pub mod schema;
mod validate;

use std::path::Path;

pub use crate::auth::AuthType;
pub use describe::describe;
pub use schema::{
    Config, Database, Failover, ListenMode, PoolMode, PoolSettings, SessionFeatures, User,
};

/// A problem with the config file, located where possible.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{file}{}: {key}{}{message}", line.map(|l| format!(":{l}")).unwrap_or_default(), if key.is_empty() { "" } else { ": " })]
pub struct ConfigError {
    pub file: String,
    pub line: Option<usize>,
    pub key: String,
    pub message: String,
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let src = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            line: None,
            key: String::new(),
            message: format!("cannot read config: {e}"),
        })?;
        Self::from_toml_in(&src, &file, path.parent())
    }

    /// Parses and validates TOML text; `file` is used in error messages.
    /// Files it names (`auth_hba_file`) are relative to the working directory.
    pub fn from_toml_str(src: &str, file: &str) -> Result<Config, ConfigError> {
        Self::from_toml_in(src, file, None)
    }

    fn from_toml_in(src: &str, file: &str, dir: Option<&Path>) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(src).map_err(|e| {
            let line = e.span().map(|s| line_of(src, s.start));
            ConfigError {
                file: file.to_owned(),
                line,
                key: key_at(src, e.span().map(|s| s.start)),
                message: e.message().trim().to_owned(),
            }
        })?;
        validate::check(&config).map_err(|(path, message)| ConfigError {
            file: file.to_owned(),
            line: validate::locate(src, &path),
            key: path.join("."),
            message,
        })?;
        let resolve = |name: &str| match dir {
            Some(d) if Path::new(name).is_relative() => d.join(name),
            _ => Path::new(name).to_path_buf(),
        };
        if let Some(name) = &config.tidepool.auth_hba_file {
            let path = resolve(name);
            let located = |line: Option<usize>, message: String| ConfigError {
                file: path.display().to_string(),
                line,
                key: "tidepool.auth_hba_file".into(),
                message,
            };
            let text = std::fs::read_to_string(&path)
                .map_err(|e| located(None, format!("cannot read the HBA file: {e}")))?;
            let hba = crate::auth::hba::Hba::parse(&text)
                .map_err(|e| located(Some(e.line), e.message))?;
            config.hba = Some(std::sync::Arc::new(hba));
        }
        build_tls(&mut config, &resolve).map_err(|(key, message)| ConfigError {
            file: file.to_owned(),
            line: validate::locate(src, &key.split('.').map(str::to_owned).collect::<Vec<_>>()),
            key,
            message,
        })?;
        Ok(config)
    }

    /// The TCP keepalive settings, for client and server sockets.
    pub fn keepalive(&self) -> crate::protocol::keepalive::KeepAlive {
        let g = &self.tidepool;
        crate::protocol::keepalive::KeepAlive {
            enabled: g.tcp_keepalive,
            idle: g.tcp_keepidle,
            interval: g.tcp_keepintvl,
            count: g.tcp_keepcnt,
            user_timeout: g.tcp_user_timeout,
        }
    }

    /// The failed-login throttling settings.
    pub fn throttle_limits(&self) -> crate::auth::throttle::Limits {
        let g = &self.tidepool;
        crate::auth::throttle::Limits {
            delay: g.auth_failure_delay,
            max_delay: g.auth_failure_max_delay,
            limit: g.auth_failure_limit,
            cooldown: g.auth_failure_cooldown,
        }
    }

    /// What tidepool offers clients for TLS (None: disabled).
    pub fn client_tls(&self) -> Option<&crate::tls::Acceptor> {
        self.client_tls.0.as_deref()
    }

    /// How the servers of database `name` are reached.
    pub fn server_tls(&self, name: &str) -> Option<&crate::tls::Connector> {
        self.server_tls.get(name).and_then(|b| b.0.as_deref())
    }

    /// The address rules of `auth_hba_file`, if one is set.
    pub fn hba(&self) -> Option<&crate::auth::hba::Hba> {
        self.hba.as_deref()
    }

    /// Pool size for a (database, user) pair, most specific setting first.
    pub fn pool_size(&self, db: &Database, user: Option<&User>) -> u32 {
        user.and_then(|u| u.pool_size)
            .or(db.pool_size)
            .unwrap_or(self.pool.default_pool_size)
    }

    /// The rate-limit tier named `name`, if `[rate_limits.tiers]` has it.
    pub fn rate_tier(&self, name: &str) -> Option<crate::ratelimit::Tier> {
        let t = self.rate_limits.tiers.get(name)?;
        let (rate, per) = match (t.per_second, t.per_minute) {
            (Some(r), None) => (r, std::time::Duration::from_secs(1)),
            (None, Some(r)) => (r, std::time::Duration::from_secs(60)),
            _ => return None,
        };
        Some(crate::ratelimit::Tier {
            name: name.to_owned(),
            rate,
            per,
            burst: t.burst,
        })
    }

    /// Server connections `db` may have per backend (0: no cap).
    pub fn max_db_connections(&self, db: &Database) -> u32 {
        db.max_db_connections
            .unwrap_or(self.pool.max_db_connections)
    }

    /// Server connections `user` may have across its pools (0: no cap).
    pub fn max_user_connections(&self, user: &str) -> u32 {
        self.users
            .get(user)
            .and_then(|u| u.max_user_connections)
            .unwrap_or(self.pool.max_user_connections)
    }

    /// Client connections `db` may have (0: no cap).
    pub fn max_db_client_connections(&self, db: &Database) -> u32 {
        db.max_db_client_connections
            .unwrap_or(self.pool.max_db_client_connections)
    }

    /// Client connections `user` may have (0: no cap).
    pub fn max_user_client_connections(&self, user: &str) -> u32 {
        self.users
            .get(user)
            .and_then(|u| u.max_user_client_connections)
            .unwrap_or(self.pool.max_user_client_connections)
    }

    /// Reserve connections per pool of `db`.
    pub fn reserve_pool_size(&self, db: &Database) -> u32 {
        db.reserve_pool_size.unwrap_or(self.pool.reserve_pool_size)
    }

    pub fn min_pool_size(&self, db: &Database) -> u32 {
        db.min_pool_size.unwrap_or(self.pool.min_pool_size)
    }

    pub fn pool_mode(&self, db: &Database) -> PoolMode {
        db.pool_mode.unwrap_or(self.pool.pool_mode)
    }

    pub fn session_features(&self, db: &Database) -> SessionFeatures {
        db.session_features.unwrap_or(self.pool.session_features)
    }

    pub fn auth_type(&self, user: Option<&User>) -> AuthType {
        user.and_then(|u| u.auth_type)
            .unwrap_or(self.tidepool.auth_type)
    }
}

/// 1-based line number of a byte offset.
fn line_of(src: &str, offset: usize) -> usize {
    src.as_bytes()[..offset.min(src.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The key written at the start of the line holding `offset`, if any.
fn key_at(src: &str, offset: Option<usize>) -> String {
    let Some(offset) = offset else {
        return String::new();
    };
    let start = src[..offset.min(src.len())]
        .rfind('\n')
        .map_or(0, |i| i + 1);
    let line = src[start..].lines().next().unwrap_or("");
    match line.split_once('=') {
        Some((k, _)) if !line.trim_start().starts_with('[') => k.trim().to_owned(),
        _ => line.trim().to_owned(),
    }
}

/// Builds the TLS configurations from their files (relative to the config
/// file); an error names the key (`tidepool.client_tls_cert_file`).
fn build_tls(
    config: &mut Config,
    resolve: &dyn Fn(&str) -> std::path::PathBuf,
) -> Result<(), (String, String)> {
    use crate::tls::{Acceptor, AcceptorFiles, Connector, ConnectorFiles};
    use std::sync::Arc;
    let path = |o: &Option<String>| o.as_deref().map(|n| resolve(n).display().to_string());
    let g = &config.tidepool;
    let (cert, key, ca) = (
        path(&g.client_tls_cert_file),
        path(&g.client_tls_key_file),
        path(&g.client_tls_ca_file),
    );
    let acceptor = Acceptor::build(AcceptorFiles {
        mode: g.client_tls_sslmode,
        cert: cert.as_deref(),
        key: key.as_deref(),
        ca: ca.as_deref(),
    })
    .map_err(|(k, e)| (format!("tidepool.{k}"), e))?;
    config.client_tls = schema::Built(acceptor.map(Arc::new));
    let p = &config.pool;
    let mut server = std::collections::BTreeMap::new();
    for (name, db) in &config.databases {
        let or =
            |mine: &Option<String>, pool: &Option<String>| path(&mine.clone().or(pool.clone()));
        let (ca, cert, key) = (
            or(&db.server_tls_ca_file, &p.server_tls_ca_file),
            or(&db.server_tls_cert_file, &p.server_tls_cert_file),
            or(&db.server_tls_key_file, &p.server_tls_key_file),
        );
        let connector = Connector::build(ConnectorFiles {
            mode: db.server_tls_sslmode.unwrap_or(p.server_tls_sslmode),
            ca: ca.as_deref(),
            cert: cert.as_deref(),
            key: key.as_deref(),
        })
        .map_err(|(k, e)| match db.server_tls_sslmode {
            Some(_) => (format!("databases.{name}.{k}"), e),
            None => (format!("pool.{k}"), e),
        })?;
        server.insert(name.clone(), schema::Built(Some(Arc::new(connector))));
    }
    config.server_tls = server;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: &str = r#"
[tidepool]
listen = ["127.0.0.1:6432"]
admin_users = ["admin"]
stats_users = ["stats"]

[pool]
pool_mode = "transaction"
default_pool_size = 25

[databases.app]
host = "127.0.0.1"
port = 5432
dbname = "app"
replicas = [{ host = "127.0.0.1", port = 5433 }]

[users.app]
password = "secret"
"#;

    #[test]
    fn the_documented_shape_loads() {
        let c = Config::from_toml_str(SHAPE, "proxy.toml").unwrap();
        assert_eq!(c.pool.default_pool_size, 25);
        assert_eq!(c.databases["app"].replicas[0].port, 5433);
        assert_eq!(c.pool.query_wait_timeout, defaults::QUERY_WAIT_TIMEOUT);
    }

    #[test]
    fn unknown_key_is_rejected_with_line_and_key() {
        let src = SHAPE.replace(
            "default_pool_size = 25",
            "default_pool_size = 25\npool_sise = 3",
        );
        let e = Config::from_toml_str(&src, "proxy.toml").unwrap_err();
        assert_eq!(e.line, Some(10), "{e}");
        assert!(e.to_string().contains("pool_sise"), "{e}");
    }

    #[test]
    fn invalid_value_names_key_and_line() {
        let src = SHAPE.replace("default_pool_size = 25", "default_pool_size = 0");
        let e = Config::from_toml_str(&src, "proxy.toml").unwrap_err();
        assert_eq!(e.key, "pool.default_pool_size");
        assert_eq!(e.line, Some(9), "{e}");
        let src = SHAPE.replace("port = 5432", "port = \"x\"");
        let e = Config::from_toml_str(&src, "proxy.toml").unwrap_err();
        assert_eq!(e.line, Some(13), "{e}");
    }

    #[test]
    fn metrics_basic_authentication_needs_both_halves() {
        let with =
            |lines: &str| format!("{SHAPE}\n[metrics]\nlisten = \"127.0.0.1:9127\"\n{lines}");
        let e = Config::from_toml_str(&with("auth_user = \"prom\""), "p").unwrap_err();
        assert_eq!(e.key, "metrics.auth_password", "{e}");
        let e = Config::from_toml_str(&with("auth_password = \"pw\""), "p").unwrap_err();
        assert_eq!(e.key, "metrics.auth_user", "{e}");
        Config::from_toml_str(&with("auth_user = \"prom\"\nauth_password = \"pw\""), "p").unwrap();
    }

    #[test]
    fn durations_accept_units_and_seconds() {
        let src = SHAPE.replace(
            "default_pool_size = 25",
            "default_pool_size = 25\nquery_wait_timeout = \"500ms\"\nserver_lifetime = 30",
        );
        let c = Config::from_toml_str(&src, "p").unwrap();
        assert_eq!(c.pool.query_wait_timeout.as_millis(), 500);
        assert_eq!(c.pool.server_lifetime.as_secs(), 30);
        let bad = SHAPE.replace("default_pool_size = 25", "query_wait_timeout = \"soon\"");
        let e = Config::from_toml_str(&bad, "p").unwrap_err();
        assert!(e.to_string().contains("query_wait_timeout"), "{e}");
    }
}
