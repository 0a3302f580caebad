//! Starts tidepool in-process for one test, on its own multi-thread runtime
//! in a background thread (so blocking test code never starves it), listening
//! on a free loopback port. Stopped when the handle is dropped.

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::Cluster;

pub struct TestProxy {
    pub addr: SocketAddr,
    pub shared: Arc<tidepool::client::Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// A config for `db` (a database of `cluster`) with the harness users.
/// `pool_extra` lines go into `[pool]`, `db_extra` into the database table.
pub fn config_toml(cluster: &Cluster, db: &str, pool_extra: &str, db_extra: &str) -> String {
    format!(
        r#"
[tidepool]
listen = ["127.0.0.1:0"]
# Tests fail logins on purpose, many times: no throttling unless a test
# turns it on (tests/throttle.rs).
auth_failure_delay = "0s"
auth_failure_limit = 0

[pool]
{defaults}
{pool_extra}

[databases.{db}]
host = "127.0.0.1"
port = {port}
{db_extra}

[users.app]
password = "{app_pw}"

[users.md5user]
password = "{md5_pw}"
auth_type = "md5"

[users.trustuser]
auth_type = "trust"
"#,
        defaults = [
            ("default_pool_size", "10"),
            ("client_login_timeout", "\"5s\"")
        ]
        .iter()
        .filter(|(k, _)| !pool_extra.contains(k))
        .map(|(k, v)| format!("{k} = {v}\n"))
        .collect::<String>(),
        port = cluster.primary_port(),
        app_pw = super::APP_PASSWORD,
        md5_pw = super::MD5_PASSWORD,
    )
}

/// A config for `db` with the application user and an admin console user
/// (`admin`, password `admin_password`): `pool` lines go into `[pool]`,
/// `db_lines` into the database table, `sections` (whole tables) between.
pub fn admin_config(
    cluster: &Cluster,
    db: &str,
    admin_password: &str,
    pool: &str,
    db_lines: &str,
    sections: &str,
) -> String {
    format!(
        r#"
[tidepool]
listen = ["127.0.0.1:0"]
admin_users = ["admin"]

[pool]
{pool}

{sections}

[databases.{db}]
host = "127.0.0.1"
port = {port}
{db_lines}

[users.app]
password = "{app_pw}"

[users.admin]
password = "{admin_password}"
"#,
        port = cluster.primary_port(),
        app_pw = super::APP_PASSWORD,
    )
}

impl TestProxy {
    /// Starts tidepool with the given TOML (its `listen` should use port 0).
    pub fn start(toml: &str) -> TestProxy {
        let config = tidepool::Config::from_toml_str(toml, "test.toml")
            .unwrap_or_else(|e| panic!("test config invalid: {e}\n{toml}"));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("proxy runtime");
            rt.block_on(async move {
                let proxy = tidepool::Proxy::bind(config).await.expect("bind proxy");
                let addr = proxy.local_addrs()[0];
                ready_tx
                    .send((addr, proxy.shared()))
                    .expect("report address");
                proxy
                    .run(
                        async {
                            let _ = stop_rx.await;
                        },
                        Some(Duration::ZERO),
                    )
                    .await;
            });
            rt.shutdown_timeout(Duration::from_secs(1));
        });
        let (addr, shared) = ready_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("proxy did not start");
        TestProxy {
            addr,
            shared,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// Starts tidepool in front of `db` with the default test config.
    pub fn for_db(cluster: &Cluster, db: &str, pool_extra: &str) -> TestProxy {
        Self::start(&config_toml(cluster, db, pool_extra, ""))
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// URL for `app` through the proxy.
    pub fn url(&self, db: &str) -> String {
        super::url(self.port(), super::APP_USER, Some(super::APP_PASSWORD), db)
    }

    pub fn url_as(&self, user: &str, password: Option<&str>, db: &str) -> String {
        super::url(self.port(), user, password, db)
    }

    /// A tokio-postgres client through the proxy as `app`.
    pub async fn client(&self, db: &str) -> tokio_postgres::Client {
        super::connect(&self.url(db))
            .await
            .expect("connect through tidepool")
    }

    /// Server connections currently open in all pools.
    pub fn server_count(&self) -> usize {
        self.shared
            .registry
            .pools()
            .iter()
            .map(|p| p.server_count())
            .sum()
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
