//! The checker task: one per database with replicas, polling every
//! `health_check_period` over its own tokio-postgres connections.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

use super::{Backend, Health, parse_lsn};

/// Who the checker logs in as.
#[derive(Clone, PartialEq)]
pub struct HealthCredentials {
    pub user: String,
    pub password: Option<String>,
    pub dbname: String,
}

/// Starts the checker for `health`; it stops when `health` is dropped.
pub fn spawn_checker(
    health: &Arc<Health>,
    creds: HealthCredentials,
    period: Duration,
    max_lag: Duration,
    name: String,
) {
    let weak = Arc::downgrade(health);
    tokio::spawn(async move {
        let mut primary: Option<Client> = None;
        let mut replicas: Vec<Option<Client>> = Vec::new();
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let keep = (max_lag * 4).max(Duration::from_secs(60)).as_nanos() as u64;
        loop {
            tick.tick().await;
            let Some(h) = weak.upgrade() else { return };
            replicas.resize_with(h.replicas.len(), || None);
            match probe(
                &mut primary,
                &h.primary,
                &creds,
                period,
                "pg_current_wal_insert_lsn()",
            )
            .await
            {
                Ok((in_recovery, lsn)) => {
                    if in_recovery {
                        tracing::error!(database = %name, "the primary is in recovery: it was demoted or is a standby; check the configuration");
                    }
                    h.record_primary(lsn, keep);
                    // Shown as up/down (the primary is never avoided).
                    h.primary.banned.store(false, Ordering::Relaxed);
                }
                Err(e) => {
                    tracing::warn!(database = %name, error = %e, "primary health check failed");
                    h.primary.banned.store(true, Ordering::Relaxed);
                    primary = None;
                }
            }
            for (i, r) in h.replicas.iter().enumerate() {
                match probe(
                    &mut replicas[i],
                    r,
                    &creds,
                    period,
                    "pg_last_wal_replay_lsn()",
                )
                .await
                {
                    Ok((false, _)) => {
                        tracing::error!(database = %name, replica = %format!("{}:{}", r.host, r.port), "replica is not in recovery: it was promoted; no reads go there");
                        r.ban("promoted (not in recovery)");
                    }
                    Ok((true, replay)) => {
                        let (caught_up, lag, lag_bytes) = h.replica_position(replay);
                        r.caught_up_to.store(caught_up, Ordering::Relaxed);
                        r.lag_ms.store(lag / 1_000_000, Ordering::Relaxed);
                        r.lag_bytes.store(lag_bytes, Ordering::Relaxed);
                        if Duration::from_nanos(lag) > max_lag {
                            r.ban("replication lag over max_replica_lag");
                        } else {
                            r.healthy();
                        }
                    }
                    Err(e) => {
                        replicas[i] = None;
                        r.ban(&format!("health check failed: {e}"));
                    }
                }
            }
            h.checked.store(true, Ordering::Relaxed);
        }
    });
}

/// Runs the check query on `b`, connecting first if needed.
async fn probe(
    client: &mut Option<Client>,
    b: &Backend,
    creds: &HealthCredentials,
    timeout: Duration,
    lsn_fn: &str,
) -> Result<(bool, u64), String> {
    let timeout = timeout.max(Duration::from_secs(1));
    if client.as_ref().is_none_or(Client::is_closed) {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host(&b.host)
            .port(b.port)
            .user(&creds.user)
            .dbname(&creds.dbname)
            .application_name("tidepool-health")
            .connect_timeout(timeout);
        if let Some(p) = &creds.password {
            cfg.password(p);
        }
        let (c, conn) = tokio::time::timeout(timeout, cfg.connect(NoTls))
            .await
            .map_err(|_| "connect timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        *client = Some(c);
    }
    let Some(c) = client.as_ref() else {
        return Err("no connection".into());
    };
    let sql = format!("select pg_is_in_recovery()::text, coalesce({lsn_fn}, '0/0')::text");
    let rows = tokio::time::timeout(timeout, c.simple_query(&sql))
        .await
        .map_err(|_| "check timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    for m in rows {
        if let SimpleQueryMessage::Row(r) = m {
            let in_recovery = r.get(0) == Some("true");
            let lsn = r.get(1).and_then(parse_lsn).unwrap_or(0);
            return Ok((in_recovery, lsn));
        }
    }
    Err("no row".into())
}
