//! The checker task: one per database with replicas, polling every
//! `health_check_period` over its own tokio-postgres connections.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_postgres::{Client, SimpleQueryMessage};

use super::{Backend, Health, parse_lsn};
use crate::router::Functions;

/// Who the checker logs in as.
#[derive(Clone, PartialEq)]
pub struct HealthCredentials {
    pub user: String,
    pub password: Option<String>,
    pub dbname: String,
}

/// How often the function volatilities are loaded again when no DDL went
/// through tidepool (DDL elsewhere, an extension installed).
const FUNCTIONS_REFRESH: Duration = Duration::from_secs(60);

/// How often the same failure is logged again.
const LOG_AGAIN_AFTER: Duration = Duration::from_secs(60);

/// A failed check: what kind, in the server's own words when it gave any.
struct Failure {
    kind: &'static str,
    detail: String,
}

impl Failure {
    fn new(kind: &'static str, detail: impl Into<String>) -> Self {
        Failure {
            kind,
            detail: detail.into(),
        }
    }

    /// From a tokio-postgres error: the server's message and SQLSTATE (a
    /// login refused is `login_failed`), else the error and its cause.
    fn from_pg(connecting: bool, e: &tokio_postgres::Error) -> Self {
        if let Some(db) = e.as_db_error() {
            let code = db.code().code();
            let kind = if connecting
                && (code.starts_with("28") || code == crate::error::SqlState::UNKNOWN_DATABASE.0)
            {
                "login_failed"
            } else {
                "check_failed"
            };
            return Failure::new(kind, format!("{} (SQLSTATE {code})", db.message()));
        }
        let mut detail = e.to_string();
        let mut cause = std::error::Error::source(e);
        while let Some(c) = cause {
            detail.push_str(": ");
            detail.push_str(&c.to_string());
            cause = c.source();
        }
        Failure::new(
            if connecting {
                "unreachable"
            } else {
                "check_failed"
            },
            detail,
        )
    }

    fn problem(&self) -> super::Problem {
        super::Problem {
            kind: self.kind,
            detail: self.detail.clone(),
        }
    }
}

/// Logs a backend's failure when it is new or was last logged a while ago.
#[derive(Default)]
struct LogLimit {
    last: Option<(String, std::time::Instant)>,
}

impl LogLimit {
    fn should_log(&mut self, detail: &str) -> bool {
        let again = self
            .last
            .as_ref()
            .is_none_or(|(d, at)| d != detail || at.elapsed() >= LOG_AGAIN_AFTER);
        if again {
            self.last = Some((detail.to_owned(), std::time::Instant::now()));
        }
        again
    }

    fn clear(&mut self) {
        self.last = None;
    }
}

/// Starts the checker for `health`; it stops when `health` is dropped.
/// `candidates` are tried in order: a login refused moves to the next one.
pub fn spawn_checker(
    health: &Arc<Health>,
    candidates: Vec<HealthCredentials>,
    period: Duration,
    max_lag: Duration,
    name: String,
    tls: Option<crate::tls::Connector>,
    failover: crate::config::Failover,
) {
    let weak = Arc::downgrade(health);
    tokio::spawn(async move {
        let mut primary: Option<Client> = None;
        let mut replicas: Vec<Option<Client>> = Vec::new();
        let mut logs: Vec<LogLimit> = Vec::new();
        let mut who = 0usize;
        let mut functions_loaded: Option<std::time::Instant> = None;
        // The writer's failed rounds in a row (writes move after
        // `FAILOVER_AFTER`).
        let mut misses = 0u32;
        // Rounds run: replicas are judged (their lag needs the primary's
        // earlier samples) from `UNBAN_AFTER` on.
        let mut rounds = 0u32;
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let keep = (max_lag * 4).max(Duration::from_secs(60)).as_nanos() as u64;
        loop {
            tick.tick().await;
            let Some(h) = weak.upgrade() else { return };
            if candidates.is_empty() {
                return;
            }
            replicas.resize_with(h.replicas.len(), || None);
            logs.resize_with(h.replicas.len() + 1, LogLimit::default);
            // Which backends answered as a primary this round.
            let mut writable = vec![false; h.replicas.len() + 1];
            let writer = h.writer();
            // A login refused moves to the next configured user at once,
            // each tried once a round: the round goes on (replicas, the
            // writer's fate) whatever the primary answers.
            let mut tries = 0;
            let (creds, answer) = loop {
                let creds = &candidates[who % candidates.len()];
                let answer = probe(
                    &mut primary,
                    &h.primary,
                    creds,
                    period,
                    "pg_current_wal_insert_lsn()",
                    tls.as_ref(),
                )
                .await;
                match &answer {
                    Err(f) if f.kind == "login_failed" && tries + 1 < candidates.len() => {
                        tries += 1;
                        who += 1;
                        primary = None;
                        replicas.iter_mut().for_each(|r| *r = None);
                    }
                    _ => break (creds, answer),
                }
            };
            match answer {
                Ok((in_recovery, lsn)) => {
                    logs[0].clear();
                    writable[0] = !in_recovery;
                    if in_recovery {
                        if writer == 0 {
                            tracing::error!(database = %name, "the primary is in recovery: it was demoted or is a standby; check the configuration");
                        }
                        h.primary.primary_failed(super::Problem {
                            kind: "in_recovery",
                            detail: "the primary is in recovery (demoted, or a standby)".into(),
                        });
                    } else {
                        h.primary.primary_ok();
                    }
                    // The WAL history replicas are measured against is the
                    // writer's (after a failover, the promoted replica's).
                    if writer == 0 {
                        h.record_primary(lsn, keep);
                    }
                    let stale = h.functions_stale.swap(false, Ordering::AcqRel)
                        || functions_loaded.is_none_or(|at| at.elapsed() >= FUNCTIONS_REFRESH);
                    if stale && let Some(c) = &primary {
                        match load_functions(c, period).await {
                            Ok(f) => {
                                tracing::debug!(database = %name, names = f.len(), "function volatilities loaded");
                                h.functions.store(Some(Arc::new(f)));
                                functions_loaded = Some(std::time::Instant::now());
                            }
                            Err(e) => {
                                h.functions_stale.store(true, Ordering::Release);
                                tracing::warn!(database = %name, error = %e.detail, "loading function volatilities failed: reads that call functions stay on the primary");
                            }
                        }
                    }
                }
                Err(f) => {
                    if logs[0].should_log(&f.detail) {
                        tracing::warn!(
                            database = %name,
                            user = %creds.user,
                            reason = f.kind,
                            error = %f.detail,
                            "primary health check failed"
                        );
                    }
                    h.primary.primary_failed(f.problem());
                    primary = None;
                }
            }
            for (i, r) in h.replicas.iter().enumerate() {
                match probe(
                    &mut replicas[i],
                    r,
                    creds,
                    period,
                    if writer == i + 1 {
                        "pg_current_wal_insert_lsn()"
                    } else {
                        "pg_last_wal_replay_lsn()"
                    },
                    tls.as_ref(),
                )
                .await
                {
                    Ok((false, lsn)) => {
                        writable[i + 1] = true;
                        // Its last lag as a replica would pass for a current one.
                        r.is_a_primary(writer == i + 1);
                        if writer == i + 1 {
                            h.record_primary(lsn, keep);
                        }
                        if writer != i + 1 {
                            tracing::error!(database = %name, replica = %format!("{}:{}", r.host, r.port), "replica is not in recovery: it was promoted; no reads go there");
                        }
                        r.ban("promoted", "not in recovery: it was promoted");
                    }
                    Ok((true, replay)) => {
                        logs[i + 1].clear();
                        let (caught_up, lag, lag_bytes) = h.replica_position(replay);
                        r.caught_up_to.store(caught_up, Ordering::Relaxed);
                        r.set_lag(lag / 1_000_000, lag_bytes);
                        if Duration::from_nanos(lag) > max_lag {
                            r.ban(
                                "lagging",
                                &format!(
                                    "replication lag {} ms over max_replica_lag ({} ms)",
                                    lag / 1_000_000,
                                    max_lag.as_millis()
                                ),
                            );
                        } else {
                            r.healthy();
                        }
                    }
                    Err(f) => {
                        replicas[i] = None;
                        r.lag_unknown();
                        if logs[i + 1].should_log(&f.detail) {
                            tracing::warn!(
                                database = %name,
                                replica = %format!("{}:{}", r.host, r.port),
                                user = %creds.user,
                                reason = f.kind,
                                error = %f.detail,
                                "replica health check failed"
                            );
                        }
                        r.ban(f.kind, &f.detail);
                    }
                }
            }
            rounds = rounds.saturating_add(1);
            if rounds >= super::UNBAN_AFTER {
                h.checked.store(true, Ordering::Relaxed);
            }
            decide_writer(&h, &writable, failover, &name, &mut misses);
        }
    });
}

/// Rounds in a row the writer must fail before writes move: one missed
/// check is not a dead primary.
const FAILOVER_AFTER: u32 = 2;

/// After a round of checks: with `failover = "auto"`, writes move from a
/// writer that failed [`FAILOVER_AFTER`] rounds in a row to a backend that
/// answered as a primary and is not fenced (see [`super::next_writer`]); the
/// old writer is fenced then. A second primary seen beside a working writer
/// is fenced and reported, never followed. Fences last until a RELOAD
/// changes the backends.
fn decide_writer(
    h: &Health,
    writable: &[bool],
    failover: crate::config::Failover,
    name: &str,
    misses: &mut u32,
) {
    let writer = h.writer();
    let addr = |k: usize| {
        let b = h.backend(k);
        format!("{}:{}", b.host, b.port)
    };
    let writer_ok = writable.get(writer).copied().unwrap_or(false);
    if failover == crate::config::Failover::Manual {
        if !writer_ok && let Some(k) = writable.iter().position(|w| *w) {
            tracing::warn!(database = %name, promoted = %addr(k), "the primary cannot take writes and another backend is a primary; failover = \"manual\": RELOAD with the new primary to move writes");
        }
        return;
    }
    let fence = |k: usize, why: &str| {
        if k < 64 && h.fenced.fetch_or(1 << k, Ordering::Relaxed) & (1 << k) == 0 {
            tracing::error!(database = %name, backend = %addr(k), writer = %addr(h.writer()), "{why}: fenced; it takes no writes until a RELOAD changes the backends");
        }
    };
    if writer_ok {
        *misses = 0;
        for (k, w) in writable.iter().enumerate() {
            if *w && k != writer {
                fence(
                    k,
                    "a second backend answers as a primary beside the writer (split brain)",
                );
            }
        }
        return;
    }
    *misses += 1;
    if *misses < FAILOVER_AFTER {
        return;
    }
    let next = super::next_writer(writer, writable, h.fenced());
    if next != writer {
        fence(writer, "writes moved away from this backend");
        h.writer.store(next, Ordering::Relaxed);
        h.failovers.fetch_add(1, Ordering::Relaxed);
        *misses = 0;
        tracing::warn!(database = %name, from = %addr(writer), to = %addr(next), "failover: the writer failed its checks and this backend is a primary; writes go there now");
    }
}

/// Loads the database's function volatilities from the primary.
async fn load_functions(c: &Client, timeout: Duration) -> Result<Functions, Failure> {
    let timeout = timeout.max(Duration::from_secs(5));
    let msgs = tokio::time::timeout(timeout, c.simple_query(crate::router::functions::QUERY))
        .await
        .map_err(|_| Failure::new("check_failed", "loading functions timed out"))?
        .map_err(|e| Failure::from_pg(false, &e))?;
    Ok(Functions::from_rows(msgs.iter().filter_map(|m| match m {
        SimpleQueryMessage::Row(r) => Some((
            r.get(0).unwrap_or_default(),
            r.get(1).unwrap_or_default(),
            r.get(2) == Some("t"),
        )),
        _ => None,
    })))
}

/// Runs the check query on `b`, connecting first if needed.
async fn probe(
    client: &mut Option<Client>,
    b: &Backend,
    creds: &HealthCredentials,
    timeout: Duration,
    lsn_fn: &str,
    tls: Option<&crate::tls::Connector>,
) -> Result<(bool, u64), Failure> {
    let timeout = timeout.max(Duration::from_secs(1));
    if client.as_ref().is_none_or(Client::is_closed) {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host(&b.host)
            .port(b.port)
            .user(&creds.user)
            .dbname(&creds.dbname)
            .application_name("tidepool-health")
            // The check's own transactions: a serializable default (the
            // user's, the database's) would make a hot standby refuse them
            // (0A000) and a healthy replica look broken. No JIT: compiling
            // the functions query costs far more than running it.
            .options("-c default_transaction_isolation=read\\ committed -c jit=off")
            .connect_timeout(timeout);
        if let Some(p) = &creds.password {
            cfg.password(p);
        }
        // The database's server_tls_* settings, as for pooled connections.
        let c = match super::tls::connect(&mut cfg, tls, timeout).await {
            Ok(c) => c,
            Err(super::tls::ConnectError::Timeout) => {
                return Err(Failure::new("unreachable", "connect timed out"));
            }
            Err(super::tls::ConnectError::Postgres(e)) => return Err(Failure::from_pg(true, &e)),
        };
        *client = Some(c);
    }
    let Some(c) = client.as_ref() else {
        return Err(Failure::new("unreachable", "no connection"));
    };
    let sql = format!("select pg_is_in_recovery()::text, coalesce({lsn_fn}, '0/0')::text");
    let rows = tokio::time::timeout(timeout, c.simple_query(&sql))
        .await
        .map_err(|_| Failure::new("check_failed", "check timed out"))?
        .map_err(|e| Failure::from_pg(false, &e))?;
    for m in rows {
        if let SimpleQueryMessage::Row(r) = m {
            let in_recovery = r.get(0) == Some("true");
            let lsn = r.get(1).and_then(parse_lsn).unwrap_or(0);
            return Ok((in_recovery, lsn));
        }
    }
    Err(Failure::new(
        "check_failed",
        "the check query returned no row",
    ))
}
