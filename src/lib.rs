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

pub mod auth;
pub mod cancel;
pub mod client;
pub mod config;
pub mod error;
pub mod health;
pub mod lifecycle;
pub mod listener;
pub mod pool;
pub mod protocol;
pub mod router;
pub mod server;
pub mod stats;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

pub use config::Config;

/// A bound, not yet running proxy.
pub struct Proxy {
    listeners: Vec<TcpListener>,
    shared: Arc<client::Shared>,
}

impl Proxy {
    /// Binds every `listen` address of `config`.
    pub async fn bind(config: Config) -> std::io::Result<Proxy> {
        let mut listeners = Vec::new();
        for addr in &config.tidepool.listen {
            let l = TcpListener::bind(addr.as_str()).await.map_err(|e| {
                std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}"))
            })?;
            listeners.push(l);
        }
        Ok(Proxy {
            listeners,
            shared: Arc::new(client::Shared::new(Arc::new(config))),
        })
    }

    /// The addresses actually bound (useful with port 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// Shared state, for in-process inspection (tests, admin).
    pub fn shared(&self) -> Arc<client::Shared> {
        self.shared.clone()
    }

    /// Serves until `shutdown` resolves, then waits up to `drain` for clients.
    pub async fn run(self, shutdown: impl Future<Output = ()>, drain: Duration) {
        let (tx, rx) = tokio::sync::watch::channel(false);
        for l in self.listeners {
            tracing::info!(addr = ?l.local_addr().ok(), "listening");
            tokio::spawn(listener::accept_loop(l, self.shared.clone(), rx.clone()));
        }
        shutdown.await;
        let _ = tx.send(true);
        lifecycle::drain(&self.shared, drain).await;
    }
}
