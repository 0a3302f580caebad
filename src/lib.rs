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
pub mod fdpass;
pub mod health;
pub mod http;
pub mod lifecycle;
pub mod listener;
pub mod listing;
pub mod memory;
pub mod otlp;
pub mod pool;
pub mod protocol;
pub mod ratelimit;
pub mod router;
pub mod server;
pub mod snapshot;
pub mod stats;
pub mod tls;
pub mod upgrade;
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
    /// The Unix socket (`unix_socket_dir`) and its path.
    unix: Option<(tokio::net::UnixListener, PathBuf)>,
    shared: Arc<client::Shared>,
    /// The listeners came from a takeover (`upgrade_socket` is replaced).
    took_over: bool,
    /// After a takeover: where the old process's clients come from.
    moved_in: Option<std::os::unix::net::UnixStream>,
}

impl Proxy {
    /// Binds every `listen` address of `config` (and `[metrics] listen`).
    pub async fn bind(config: Config) -> std::io::Result<Proxy> {
        Self::bind_with_path(config, None).await
    }

    /// Like [`Proxy::bind`]; RELOAD and SIGHUP re-read `path`.
    pub async fn bind_with_path(config: Config, path: Option<PathBuf>) -> std::io::Result<Proxy> {
        Self::bind_with(config, path, false).await
    }

    /// Like [`Proxy::bind_with_path`]; with `takeover`, the listening
    /// sockets come from the tidepool running on `upgrade_socket` (see
    /// [`upgrade`]) instead of being bound here.
    pub async fn bind_with(
        config: Config,
        path: Option<PathBuf>,
        takeover: bool,
    ) -> std::io::Result<Proxy> {
        if takeover {
            return Self::take_over(config, path).await;
        }
        let mut listeners = Vec::new();
        for addr in &config.tidepool.listen {
            let l = listener::bind(addr, config.tidepool.so_reuseport)
                .await
                .map_err(|e| {
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
        let unix = Self::bind_unix(
            config.tidepool.unix_socket_dir.as_deref(),
            &listeners,
            false,
        )?;
        Ok(Proxy {
            listeners,
            metrics,
            unix,
            shared: Arc::new(client::Shared::new(config, path)),
            took_over: false,
            moved_in: None,
        })
    }

    /// The Unix socket in `dir` (`unix_socket_dir`), named after the first
    /// TCP listener's port.
    fn bind_unix(
        dir: Option<&str>,
        listeners: &[TcpListener],
        replacing: bool,
    ) -> std::io::Result<Option<(tokio::net::UnixListener, PathBuf)>> {
        let Some(dir) = dir else {
            return Ok(None);
        };
        let port = listeners
            .first()
            .and_then(|l| l.local_addr().ok())
            .map_or(6432, |a| a.port());
        listener::bind_unix(dir, port, replacing)
            .map(Some)
            .map_err(|e| std::io::Error::new(e.kind(), format!("unix_socket_dir {dir}: {e}")))
    }

    async fn take_over(config: Config, path: Option<PathBuf>) -> std::io::Result<Proxy> {
        let Some(socket) = config.tidepool.upgrade_socket.clone() else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "--takeover needs [tidepool] upgrade_socket",
            ));
        };
        // Everything that can fail happens before the old process is told
        // to stop accepting (inside `take_over`).
        let rt = tokio::runtime::Handle::current();
        let (want_listeners, want_metrics) = (
            config.tidepool.listen.len(),
            config.metrics.listen.is_some(),
        );
        let unix_dir = config.tidepool.unix_socket_dir.clone();
        let taken = tokio::task::spawn_blocking(move || {
            upgrade::take_over(socket.as_ref(), |got| {
                let _runtime = rt.enter();
                if got.listeners.len() != want_listeners || got.metrics.is_some() != want_metrics {
                    tracing::warn!(
                        inherited = got.listeners.len(),
                        configured = want_listeners,
                        "the running tidepool listened on other addresses than this config: serving its sockets; restart to change them"
                    );
                }
                let listeners = got
                    .listeners
                    .into_iter()
                    .map(TcpListener::from_std)
                    .collect::<Result<Vec<_>, _>>()?;
                let metrics = got.metrics.map(TcpListener::from_std).transpose()?;
                let unix = Self::bind_unix(unix_dir.as_deref(), &listeners, true)?;
                Ok((listeners, metrics, unix))
            })
        })
        .await
        .map_err(std::io::Error::other)??;
        let (listeners, metrics, unix) = taken.ready;
        tracing::info!(
            listeners = listeners.len(),
            moves_clients = taken.clients.is_some(),
            "took over the listening sockets of the running tidepool"
        );
        Ok(Proxy {
            listeners,
            metrics,
            unix,
            shared: Arc::new(client::Shared::new(config, path)),
            took_over: true,
            moved_in: taken.clients,
        })
    }

    /// Serves the clients the old process moves here, from a thread that
    /// reads them (`client::migrate::receive`) until it is done.
    fn receive_clients(from: std::os::unix::net::UnixStream, shared: Arc<client::Shared>) {
        let runtime = tokio::runtime::Handle::current();
        // The clients still there keep their cancel keys there.
        match from.try_clone() {
            Ok(back) => shared.cancel.pass_unknown_to(back),
            Err(e) => {
                tracing::warn!(error = %e, "cancel requests for the old process's clients will be ignored")
            }
        }
        let started = std::thread::Builder::new()
            .name("tidepool-moves".into())
            .spawn(move || {
                let mut n = 0u64;
                client::migrate::receive(from, |record, fd| {
                    n += 1;
                    runtime.spawn(client::session::adopt(shared.clone(), record, fd));
                });
                tracing::info!(moved = n, "the old process has handed over its clients");
            });
        if let Err(e) = started {
            tracing::warn!(error = %e, "cannot take the old process's clients; they finish there");
        }
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
        let mut handoff = None;
        let upgrade_socket = self
            .shared
            .settings()
            .config
            .tidepool
            .upgrade_socket
            .clone();
        if let Some(socket) = upgrade_socket {
            use std::os::fd::AsFd;
            // Copies of the listening sockets for the takeover thread; they
            // are closed with the listeners (see `upgrade::Handoff`).
            let mut fds = Vec::new();
            for l in &self.listeners {
                fds.push(l.as_fd().try_clone_to_owned());
            }
            if let Some(m) = &self.metrics {
                fds.push(m.as_fd().try_clone_to_owned());
            }
            let made = fds
                .into_iter()
                .collect::<Result<Vec<_>, _>>()
                .and_then(|fds| {
                    upgrade::serve(
                        socket.as_ref(),
                        fds,
                        self.metrics.is_some(),
                        self.shared.clone(),
                        self.took_over,
                    )
                });
            match made {
                Ok(h) => handoff = Some(h),
                Err(e) => {
                    tracing::warn!(error = %e, socket = %socket, "no takeover socket: upgrades will refuse connections")
                }
            }
        }
        // The socket file, and which file it is (a successor may replace it).
        let unix_path = self
            .unix
            .as_ref()
            .map(|(_, p)| (p.clone(), listener::file_id(p)));
        if let Some((l, path)) = self.unix {
            tracing::info!(path = %path.display(), "listening on the Unix socket");
            tokio::spawn(listener::accept_unix_loop(
                l,
                self.shared.clone(),
                rx.clone(),
            ));
        }
        for l in self.listeners {
            tracing::info!(addr = %l.local_addr().map(|a| a.to_string()).unwrap_or_default(), "listening");
            tokio::spawn(listener::accept_loop(l, self.shared.clone(), rx.clone()));
        }
        // The HTTP endpoint outlives the listeners: during the drain /readyz
        // answers 503 and /metrics still shows the clients finishing.
        let (http_tx, http_rx) = tokio::sync::watch::channel(false);
        if let Some(l) = self.metrics {
            tracing::info!(addr = %l.local_addr().map(|a| a.to_string()).unwrap_or_default(), "serving /metrics, /healthz, /readyz");
            tokio::spawn(http::serve(l, self.shared.clone(), http_rx));
        }
        // Transaction spans (`[tracing]`): exported until the clients are
        // gone, then flushed once.
        let (spans_tx, spans_rx) = tokio::sync::watch::channel(false);
        let spans = self.shared.spans.enabled().then(|| {
            tokio::spawn(otlp::run(
                self.shared.spans.clone(),
                self.shared.settings().config.tracing.clone(),
                spans_rx,
            ))
        });
        let ticker = tokio::spawn(lifecycle::stats_ticker(self.shared.clone()));
        // The watchdog's thread (stall reports, the shutdown deadline) lives
        // as long as this call; its heartbeat runs on the event loop.
        let watchdog = self.shared.watchdog.start();
        if let Err(e) = &watchdog {
            tracing::warn!(error = %e, "cannot start the event-loop watchdog");
        }
        let heartbeat = tokio::spawn(self.shared.watchdog.clone().heartbeat());
        let lot = tokio::spawn(client::park::run(self.shared.clone()));
        if let Some(from) = self.moved_in {
            Self::receive_clients(from, self.shared.clone());
        }
        tokio::pin!(shutdown);
        // A future that has finished must not be polled again.
        let signaled = tokio::select! {
            _ = &mut shutdown => true,
            _ = self.shared.lifecycle.shutdown_requested.notified() => {
                tracing::info!("SHUTDOWN from the admin console");
                false
            }
        };
        // Handed over: no more takeovers from here (the sockets go).
        if let Some(h) = &handoff {
            h.close();
        }
        self.shared
            .lifecycle
            .shutting_down
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = tx.send(true);
        if !signaled
            && self
                .shared
                .lifecycle
                .wait_for_clients
                .load(std::sync::atomic::Ordering::Relaxed)
        {
            // Another process (so_reuseport) takes the new clients; these
            // stay until they leave, or until a signal or SHUTDOWN says
            // not to wait any longer.
            let limit_ms = self
                .shared
                .lifecycle
                .wait_limit_ms
                .load(std::sync::atomic::Ordering::Relaxed);
            if limit_ms > 0 {
                // Taken over: the new process answers /metrics and probes
                // on the same socket; this one stops, so that probes and
                // scrapes do not alternate between the two.
                let _ = http_tx.send(true);
            }
            let limit = async {
                if limit_ms == 0 {
                    std::future::pending::<()>().await
                } else {
                    tokio::time::sleep(Duration::from_millis(limit_ms)).await;
                    tracing::info!(
                        "shutdown_timeout passed after the takeover: closing the remaining clients at their next transaction boundary"
                    );
                }
            };
            tokio::select! {
                _ = lifecycle::clients_gone(&self.shared) => {}
                _ = limit => {}
                _ = &mut shutdown => tracing::info!("no longer waiting for clients to leave"),
                _ = self.shared.lifecycle.shutdown_requested.notified() => {
                    tracing::info!("SHUTDOWN: no longer waiting for clients to leave");
                }
            }
            let moved = self
                .shared
                .outbox
                .moved
                .load(std::sync::atomic::Ordering::Relaxed);
            if moved > 0 {
                tracing::info!(moved, "clients moved to the new process");
            }
        }
        let limit = drain.unwrap_or(self.shared.settings().config.tidepool.shutdown_timeout);
        self.shared.watchdog.shutdown_started(limit);
        lifecycle::shut_down(&self.shared, limit).await;
        let _ = http_tx.send(true);
        let _ = spans_tx.send(true);
        if let Some(task) = spans {
            let limit = self.shared.settings().config.tracing.otlp_timeout;
            let limit = limit.min(otlp::LAST_EXPORT) + Duration::from_secs(1);
            let _ = tokio::time::timeout(limit, task).await;
        }
        // The socket file goes with the process, unless a takeover's new
        // process has put its own there.
        if let Some((path, ours)) = unix_path {
            listener::remove_unix_if_ours(&path, ours);
        }
        ticker.abort();
        lot.abort();
        heartbeat.abort();
        drop(watchdog);
    }
}
