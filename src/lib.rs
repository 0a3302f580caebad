//! tidepool: a PostgreSQL wire-protocol proxy and transaction-mode pooler.
//!
//! ```text
//! client socket ──► client task ──► Pool(db, user) ──► ServerConn
//!      ▲              │ (frames, tx state,                 │
//!      └──────────────┘  params)                           │
//!           ◄──── forward server bytes until ReadyForQuery 'I' ◄──┘
//! ```
//!
//! [`Proxy::bind`] opens the listeners; [`Proxy::run`] serves until the
//! shutdown future resolves, then stops accepting and lets clients finish.

pub mod admin;
pub mod auth;
pub mod cancel;
pub mod client;
pub mod clock;
pub mod config;
pub mod error;
pub mod health;
pub mod http;
pub mod lifecycle;
pub mod listener;
pub mod listing;
pub mod memory;
pub mod pool;
pub mod protocol;
pub mod ratelimit;
pub mod router;
pub mod server;
pub mod snapshot;
pub mod stats;
pub mod tls;
pub mod watchdog;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

pub use config::Config;

/// A bound, not yet running proxy.
pub struct Proxy {
    listeners: Vec<TcpListener>,
    metrics: Option<TcpListener>,
    shared: Arc<client::Shared>,
}

impl Proxy {
    /// Binds every `listen` address of `config` (and `[metrics] listen`).
    pub async fn bind(config: Config) -> std::io::Result<Proxy> {
        Self::bind_with_path(config, None).await
    }

    /// Like [`Proxy::bind`]; RELOAD and SIGHUP re-read `path`.
    pub async fn bind_with_path(config: Config, path: Option<PathBuf>) -> std::io::Result<Proxy> {
        let mut listeners = Vec::new();
        for addr in &config.tidepool.listen {
            let l = TcpListener::bind(addr.as_str()).await.map_err(|e| {
                std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}"))
            })?;
            listeners.push(l);
        }
        let metrics = match &config.metrics.listen {
            Some(addr) => Some(TcpListener::bind(addr.as_str()).await.map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("cannot listen on {addr} for metrics: {e}"),
                )
            })?),
            None => None,
        };
        if let Some(l) = &metrics
            && let Ok(addr) = l.local_addr()
            && !addr.ip().is_loopback()
            && !config.metrics.requires_auth()
        {
            tracing::warn!(
                %addr,
                "the metrics endpoint listens beyond this machine without authentication; \
                 set [metrics] auth_token (or auth_user and auth_password), or listen on 127.0.0.1"
            );
        }
        Ok(Proxy {
            listeners,
            metrics,
            shared: Arc::new(client::Shared::new(config, path)),
        })
    }

    /// The addresses actually bound (useful with port 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// The metrics endpoint's address, when enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Shared state, for in-process inspection (tests, admin).
    pub fn shared(&self) -> Arc<client::Shared> {
        self.shared.clone()
    }

    /// Serves until `shutdown` resolves (or the console's SHUTDOWN), then
    /// stops accepting and lets clients finish their transactions for up to
    /// `drain` (default: `shutdown_timeout`).
    pub async fn run(self, shutdown: impl Future<Output = ()>, drain: Option<Duration>) {
        let (tx, rx) = tokio::sync::watch::channel(false);
        for l in self.listeners {
            tracing::info!(addr = ?l.local_addr().ok(), "listening");
            tokio::spawn(listener::accept_loop(l, self.shared.clone(), rx.clone()));
        }
        // The HTTP endpoint outlives the listeners: during the drain /readyz
        // answers 503 and /metrics still shows the clients finishing.
        let (http_tx, http_rx) = tokio::sync::watch::channel(false);
        if let Some(l) = self.metrics {
            tracing::info!(addr = ?l.local_addr().ok(), "serving /metrics, /healthz, /readyz");
            tokio::spawn(http::serve(l, self.shared.clone(), http_rx));
        }
        let ticker = tokio::spawn(lifecycle::stats_ticker(self.shared.clone()));
        // The watchdog's thread (stall reports, the shutdown deadline) lives
        // as long as this call; its heartbeat runs on the event loop.
        let watchdog = self.shared.watchdog.start();
        if let Err(e) = &watchdog {
            tracing::warn!(error = %e, "cannot start the event-loop watchdog");
        }
        let heartbeat = tokio::spawn(self.shared.watchdog.clone().heartbeat());
        let lot = tokio::spawn(client::park::run(self.shared.clone()));
        tokio::select! {
            _ = shutdown => {}
            _ = self.shared.lifecycle.shutdown_requested.notified() => {
                tracing::info!("SHUTDOWN from the admin console");
            }
        }
        self.shared
            .lifecycle
            .shutting_down
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = tx.send(true);
        let limit = drain.unwrap_or(self.shared.settings().config.tidepool.shutdown_timeout);
        self.shared.watchdog.shutdown_started(limit);
        lifecycle::shut_down(&self.shared, limit).await;
        let _ = http_tx.send(true);
        ticker.abort();
        lot.abort();
        heartbeat.abort();
        drop(watchdog);
    }
}
