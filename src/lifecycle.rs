//! Process lifecycle: signals, reload orchestration, shutdown and drain.
//!
//! - SIGTERM / SIGINT / the console's SHUTDOWN start a shutdown: listeners
//!   close, idle clients are told `57P01` and closed, clients inside a
//!   transaction finish it first, and after `shutdown_timeout` whatever is
//!   left is closed.
//! - SIGHUP / the console's RELOAD re-read the config file. An invalid file
//!   is logged and changes nothing.
//! - SIGUSR1 / the console's PAUSE hold new transactions (of every database,
//!   or of one) and close server connections once running transactions
//!   end; SIGUSR2 / RESUME let them go on (PgBouncer's signals).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::client::Shared;
use crate::client::list::Eviction;
use crate::config::{Config, ConfigError};

/// Resolves on SIGINT or SIGTERM.
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Reloads the config on every SIGHUP, for as long as the process runs.
pub async fn reload_on_sighup(shared: Arc<Shared>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP; reload with the console's RELOAD");
            return;
        };
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the config");
            let _ = reload(&shared);
        }
    }
    #[cfg(not(unix))]
    {
        let _ = shared;
    }
}

/// PAUSE and RESUME of the whole pooler on SIGUSR1 and SIGUSR2, as
/// PgBouncer: for as long as the process runs.
pub async fn pause_on_sigusr(shared: Arc<Shared>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut usr1), Ok(mut usr2)) = (
            signal(SignalKind::user_defined1()),
            signal(SignalKind::user_defined2()),
        ) else {
            tracing::warn!("cannot listen for SIGUSR1/SIGUSR2; pause with the console's PAUSE");
            return;
        };
        loop {
            tokio::select! {
                Some(()) = usr1.recv() => {
                    tracing::info!("SIGUSR1: pausing every database");
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        if pause(&shared, None).await.is_err() {
                            tracing::info!("the pause ended (RESUME) before it was complete");
                        }
                    });
                }
                Some(()) = usr2.recv() => {
                    tracing::info!("SIGUSR2: resuming every database");
                    resume(&shared, None);
                }
                else => return,
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = shared;
    }
}

/// The databases a PAUSE, RESUME or KILL applies to: `db`, or all (and
/// then the pooler as a whole: databases a reload adds come in paused).
pub fn pause_targets(shared: &Shared, db: Option<&str>) -> Vec<String> {
    match db {
        Some(d) => vec![d.to_owned()],
        None => shared.settings().config.databases.keys().cloned().collect(),
    }
}

/// A PAUSE that RESUME ended before it was complete.
#[derive(Debug, thiserror::Error)]
#[error("RESUME came before the pause was complete")]
pub struct PauseCanceled;

/// PAUSE of database `db`, or of the whole pooler: new transactions wait;
/// returns once running transactions have ended and the databases' server
/// connections are closed, or fails when a RESUME of one of them came
/// first.
pub async fn pause(shared: &Shared, db: Option<&str>) -> Result<(), PauseCanceled> {
    let dbs = hold(shared, db);
    let controls: Vec<_> = dbs.iter().map(|d| shared.registry.control(d)).collect();
    tracing::info!(databases = ?dbs, "PAUSE: waiting for running transactions to finish");
    // New transactions wait; running ones finish and give their server back.
    loop {
        if controls.iter().any(|c| !c.is_paused()) {
            return Err(PauseCanceled);
        }
        let busy: usize = shared
            .registry
            .pools()
            .iter()
            .filter(|p| dbs.contains(&p.database))
            .map(|p| p.active_count())
            .sum();
        if busy == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    close_idle_of(shared, &dbs);
    tracing::info!(databases = ?dbs, "paused");
    Ok(())
}

/// Marks database `db`, or the whole pooler, paused (new transactions
/// wait; see `DbControl`), as PAUSE and KILL begin. Returns the databases.
pub fn hold(shared: &Shared, db: Option<&str>) -> Vec<String> {
    if db.is_none() {
        shared.registry.set_pooler_paused(true);
    }
    let dbs = pause_targets(shared, db);
    for d in &dbs {
        shared.registry.control(d).pause();
    }
    dbs
}

/// Closes the idle server connections of databases `dbs` (retired pools
/// still draining included).
pub fn close_idle_of(shared: &Shared, dbs: &[String]) {
    for p in shared.registry.pools() {
        if dbs.contains(&p.database) {
            p.close_idle();
        }
    }
}

/// RESUME of database `db`, or of the whole pooler (which also ends a
/// PAUSE of the whole pooler). Returns the databases that were paused.
pub fn resume(shared: &Shared, db: Option<&str>) -> Vec<String> {
    let paused: Vec<String> = pause_targets(shared, db)
        .into_iter()
        .filter(|d| shared.registry.control(d).is_paused())
        .collect();
    if db.is_none() {
        shared.registry.set_pooler_paused(false);
    }
    for d in &paused {
        shared.registry.control(d).resume();
    }
    tracing::info!(databases = ?paused, "resumed");
    paused
}

/// Why a reload did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("no config file to reload (tidepool was started from an in-memory config)")]
    NoFile,
    #[error(transparent)]
    Invalid(#[from] ConfigError),
}

/// Re-reads the config file and puts it in force; returns the changed
/// settings that only a restart applies. On error the running config stays
/// and the error is logged.
pub fn reload(shared: &Shared) -> Result<Vec<&'static str>, ReloadError> {
    let Some(path) = &shared.config_path else {
        tracing::error!("reload: {}", ReloadError::NoFile);
        return Err(ReloadError::NoFile);
    };
    match Config::load(path) {
        Ok(config) => {
            let kept = shared.apply(config);
            tracing::info!(file = %path.display(), "config reloaded");
            Ok(kept)
        }
        Err(e) => {
            tracing::error!(error = %e, "reload failed; the running config stays in force");
            Err(e.into())
        }
    }
}

/// Resolves once no client connection is left (SHUTDOWN WAIT_FOR_CLIENTS);
/// console sessions (the one that asked, among others) are not waited for.
pub async fn clients_gone(shared: &Arc<Shared>) {
    let mut logged = std::time::Instant::now();
    let left = || {
        let consoles = shared
            .list
            .all()
            .iter()
            .filter(|c| crate::client::startup::ADMIN_DATABASES.contains(&c.database()))
            .count();
        shared
            .clients
            .load(Ordering::Relaxed)
            .saturating_sub(consoles as u32)
    };
    while left() > 0 {
        if logged.elapsed() >= Duration::from_secs(10) {
            logged = std::time::Instant::now();
            tracing::info!(
                clients = shared.clients.load(Ordering::Relaxed),
                "waiting for clients to leave (SHUTDOWN WAIT_FOR_CLIENTS)"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tracing::info!("all clients left");
}

/// Asks every client to leave: idle ones now, busy ones after their
/// transaction. Then waits until all have left, or `limit` passes.
pub async fn shut_down(shared: &Arc<Shared>, limit: Duration) {
    shared
        .lifecycle
        .shutting_down
        .store(true, Ordering::Relaxed);
    for c in shared.list.all() {
        c.evict(Eviction::Shutdown);
    }
    shared.lot.wake_evicted();
    let deadline = tokio::time::Instant::now() + limit;
    while shared.clients.load(Ordering::Relaxed) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left = shared.clients.load(Ordering::Relaxed);
    if left > 0 {
        tracing::warn!(
            clients = left,
            "shutdown_timeout reached; closing the remaining connections"
        );
        // Told why (FATAL 57P01, as PostgreSQL's fast shutdown tells its
        // sessions), their running queries canceled, as KILL does; a
        // moment for that, then the process ends whatever is left.
        for c in shared.list.all() {
            c.evict(Eviction::ShutdownNow);
        }
        shared.lot.wake_evicted();
        let grace = tokio::time::Instant::now() + Duration::from_secs(1);
        while shared.clients.load(Ordering::Relaxed) > 0 && tokio::time::Instant::now() < grace {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    } else {
        tracing::info!("all clients left; exiting");
    }
}

/// Statistics upkeep: health-window samples twice a second, averages every
/// `stats_period`.
pub async fn stats_ticker(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_roll = std::time::Instant::now();
    shared.stats.tick(
        last_roll,
        shared.settings().config.stats.health_window,
        true,
    );
    loop {
        tick.tick().await;
        crate::clock::refresh();
        let cfg = shared.settings().config.stats.clone();
        let now = std::time::Instant::now();
        let roll = now.duration_since(last_roll) >= cfg.stats_period;
        if roll {
            last_roll = now;
            // Sizing advice needs each server's max_connections: read
            // once per pool (a short connection of its own).
            let pools = shared.registry.pools();
            tokio::spawn(async move {
                for p in pools {
                    let _ = tokio::time::timeout(Duration::from_secs(5), p.learn_max_connections())
                        .await;
                }
            });
        }
        shared.stats.tick(now, cfg.health_window, roll);
    }
}
