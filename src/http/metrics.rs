//! `/metrics`: live state as Prometheus metrics, built at scrape time by a
//! `prometheus-client` collector (no second set of counters is kept).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::admin::show::backend_name;
use crate::client::Shared;
use crate::stats::HealthStatus;
use crate::stats::histogram::{BOUNDS_US, BucketsSnapshot};

mod advice;
pub mod classic;
mod queries;
mod sessions;
mod spans;

/// Query text in labels is cut to this many bytes.
const LABEL_TEXT: usize = 200;

type Labels = Vec<(String, String)>;
/// Families built side by side: (name, help, samples).
type Families<'a, V> = Vec<(&'a str, &'a str, Vec<(Labels, V)>)>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

struct Snapshot(Arc<Shared>);

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("tidepool metrics")
    }
}

pub fn render(shared: &Arc<Shared>) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Snapshot(shared.clone())));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)?;
    Ok(out)
}

/// Writes one family: a descriptor and a sample per label set.
fn gauge<V: prometheus_client::encoding::EncodeGaugeValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[(Labels, V)],
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (l, v) in samples {
        m.encode_family(l)?.encode_gauge(v)?;
    }
    Ok(())
}

fn counter<V: prometheus_client::encoding::EncodeCounterValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[(Labels, V)],
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (l, v) in samples {
        m.encode_family(l)?
            .encode_counter::<NoLabelSet, _, f64>(v, None)?;
    }
    Ok(())
}

fn histogram(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[(Labels, BucketsSnapshot)],
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (l, h) in samples {
        // The encoder wants per-bucket counts and adds them up itself.
        let mut buckets = Vec::with_capacity(BOUNDS_US.len() + 1);
        let mut prev = 0;
        for (i, bound) in BOUNDS_US.iter().enumerate() {
            let c = h.cumulative[i];
            buckets.push((*bound as f64 / 1e6, c.saturating_sub(prev)));
            prev = c;
        }
        buckets.push((f64::INFINITY, h.count.saturating_sub(prev)));
        m.encode_family(l)?.encode_histogram::<NoLabelSet>(
            h.sum_us as f64 / 1e6,
            h.count,
            &buckets,
            None,
        )?;
    }
    Ok(())
}

fn secs(us: u64) -> f64 {
    us as f64 / 1e6
}

fn cut(s: &str) -> String {
    crate::stats::cut_text(s, LABEL_TEXT)
}

impl Collector for Snapshot {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let shared = &self.0;
        let settings = shared.settings();
        let cfg = &settings.config;

        gauge(
            &mut enc,
            "tidepool_info",
            "tidepool's version",
            &[(labels(&[("version", env!("CARGO_PKG_VERSION"))]), 1u32)],
        )?;
        gauge(
            &mut enc,
            "tidepool_client_connections",
            "Client connections open now (logging in or logged in)",
            &[(Labels::new(), shared.clients.load(Relaxed))],
        )?;
        gauge(
            &mut enc,
            "tidepool_max_client_conn",
            "max_client_conn",
            &[(Labels::new(), cfg.pool.max_client_conn)],
        )?;

        gauge(
            &mut enc,
            "tidepool_clients_parked",
            "Idle clients parked without a task (park_idle_clients_after)",
            &[(Labels::new(), shared.lot.len() as u64)],
        )?;
        counter(
            &mut enc,
            "tidepool_event_loop_stalls",
            "Times a runtime thread ran one task for over 100 ms, or the event loop's heartbeat was over 100 ms late (each is logged; delays while its threads waited for a CPU are logged, not counted)",
            &[(Labels::new(), shared.watchdog.stalls())],
        )?;
        if let Some(m) = crate::memory::usage() {
            gauge(
                &mut enc,
                "tidepool_memory_allocated_bytes",
                "Bytes the allocator has handed out to tidepool",
                &[(Labels::new(), m.allocated)],
            )?;
            gauge(
                &mut enc,
                "tidepool_memory_resident_bytes",
                "Bytes in pages the allocator keeps resident",
                &[(Labels::new(), m.resident)],
            )?;
        }

        // Clients by database, user and state.
        let rows = crate::snapshot::clients(shared);
        let mut clients: HashMap<(String, String, &'static str), u64> = HashMap::new();
        for r in &rows {
            *clients
                .entry((r.database.clone(), r.user.clone(), r.state.as_str()))
                .or_default() += 1;
        }
        let mut samples: Vec<(Labels, u64)> = clients
            .into_iter()
            .map(|((db, user, state), n)| {
                (
                    labels(&[("database", &db), ("user", &user), ("state", state)]),
                    n,
                )
            })
            .collect();
        samples.sort_by(|a, b| a.0.cmp(&b.0));
        gauge(
            &mut enc,
            "tidepool_clients",
            "Logged-in clients by state (idle, waiting for a server, active)",
            &samples,
        )?;

        // Pools.
        let pools = shared.registry.pools();
        let counts = crate::snapshot::pool_clients(&rows);
        let mut servers = Vec::new();
        let mut sizes = Vec::new();
        let mut waiting = Vec::new();
        let mut maxwait = Vec::new();
        for p in &pools {
            let name = backend_name(&p.database, p.backend);
            let role = if p.backend == 0 { "primary" } else { "replica" };
            let base = [
                ("database", name.as_str()),
                ("user", p.user.as_str()),
                ("backend", &*p.addr),
                ("role", role),
            ];
            for (state, n) in [
                ("active", p.active_count()),
                ("idle", p.idle_count()),
                ("login", p.opening_count()),
            ] {
                let mut l = base.to_vec();
                l.push(("state", state));
                servers.push((labels(&l), n as u64));
            }
            sizes.push((labels(&base), u64::from(p.settings().size)));
            let c = counts
                .get(&(p.database.clone(), p.user.clone(), p.backend))
                .copied()
                .unwrap_or_default();
            waiting.push((labels(&base), c.waiting));
            maxwait.push((labels(&base), secs(c.max_wait_us)));
        }
        gauge(
            &mut enc,
            "tidepool_servers",
            "Server connections by pool and state",
            &servers,
        )?;
        gauge(&mut enc, "tidepool_pool_size", "Pool size", &sizes)?;
        gauge(
            &mut enc,
            "tidepool_pool_waiting_clients",
            "Clients waiting for a server of this pool",
            &waiting,
        )?;
        gauge(
            &mut enc,
            "tidepool_pool_maxwait_seconds",
            "How long the oldest waiting client has waited",
            &maxwait,
        )?;

        // Traffic per database backend.
        let rows = crate::snapshot::traffic(shared);
        let mut traffic: Families<u64> = vec![
            ("tidepool_transactions", "Transactions completed", vec![]),
            (
                "tidepool_queries",
                "Queries (requests up to ReadyForQuery) completed",
                vec![],
            ),
            (
                "tidepool_statements",
                "Statements run (simple queries and Executes)",
                vec![],
            ),
            (
                "tidepool_statement_errors",
                "Statements that failed",
                vec![],
            ),
            (
                "tidepool_slow_statements",
                "Statements over slow_query_threshold",
                vec![],
            ),
            (
                "tidepool_received_bytes",
                "Bytes received from clients",
                vec![],
            ),
            ("tidepool_sent_bytes", "Bytes sent to clients", vec![]),
            (
                "tidepool_server_assignments",
                "Times a server was assigned to a client",
                vec![],
            ),
            ("tidepool_client_logins", "Client logins", vec![]),
            (
                "tidepool_client_parses",
                "Parse messages from clients",
                vec![],
            ),
            ("tidepool_binds", "Bind messages from clients", vec![]),
            (
                "tidepool_prepared_invalidations",
                "Shared server-side statements found stale (a migration changed their result)",
                vec![],
            ),
            (
                "tidepool_prepared_reprepares",
                "Stale statements closed and prepared afresh on a server",
                vec![],
            ),
            (
                "tidepool_misroute_retries",
                "Reads a replica refused as writes (25006), run again on the primary",
                vec![],
            ),
        ];
        let mut times: Families<f64> = vec![
            (
                "tidepool_transaction_seconds",
                "Time spent in transactions",
                vec![],
            ),
            ("tidepool_query_seconds", "Time spent in queries", vec![]),
            (
                "tidepool_wait_seconds",
                "Time clients waited for a server",
                vec![],
            ),
        ];
        let mut hists: Families<BucketsSnapshot> = vec![
            (
                "tidepool_statement_duration_seconds",
                "Statement latency",
                vec![],
            ),
            (
                "tidepool_transaction_duration_seconds",
                "Transaction latency",
                vec![],
            ),
            (
                "tidepool_wait_duration_seconds",
                "Time to get a server",
                vec![],
            ),
        ];
        for row in &rows {
            let name = backend_name(&row.database, row.backend);
            let l = labels(&[
                ("database", &name),
                (
                    "role",
                    if row.backend == 0 {
                        "primary"
                    } else {
                        "replica"
                    },
                ),
            ]);
            let tot = row.totals;
            for (i, v) in [
                tot.xacts,
                tot.queries,
                tot.statements,
                tot.errors,
                tot.slow,
                tot.received,
                tot.sent,
                tot.server_assignments,
                tot.logins,
                tot.client_parses,
                tot.binds,
                tot.prepared_invalidations,
                tot.prepared_reprepares,
                tot.misroute_retries,
            ]
            .into_iter()
            .enumerate()
            {
                traffic[i].2.push((l.clone(), v));
            }
            for (i, v) in [tot.xact_us, tot.query_us, tot.wait_us]
                .into_iter()
                .enumerate()
            {
                times[i].2.push((l.clone(), secs(v)));
            }
            let lat = row.counters.latencies();
            hists[0].2.push((l.clone(), lat.statement));
            hists[1].2.push((l.clone(), lat.transaction));
            hists[2].2.push((l.clone(), lat.wait));
        }
        for (name, help, s) in &traffic {
            counter(&mut enc, name, help, s)?;
        }
        for (name, help, s) in &times {
            counter(&mut enc, name, help, s)?;
        }
        for (name, help, s) in &hists {
            histogram(&mut enc, name, help, s)?;
        }

        // Pool health per database.
        let mut status = Vec::new();
        let mut ratio = Vec::new();
        for name in cfg.databases.keys() {
            let h = shared.stats.health(name, &cfg.stats);
            for s in [
                HealthStatus::Healthy,
                HealthStatus::Degraded,
                HealthStatus::Unhealthy,
            ] {
                status.push((
                    labels(&[("database", name), ("status", s.as_str())]),
                    u32::from(h.status == s),
                ));
            }
            ratio.push((labels(&[("database", name)]), h.ratio));
        }
        gauge(
            &mut enc,
            "tidepool_pool_health",
            "1 for the database's current health status (by share of slow statements)",
            &status,
        )?;
        gauge(
            &mut enc,
            "tidepool_pool_slow_ratio",
            "Share of slow statements in the last health_window",
            &ratio,
        )?;

        // Backends: health and lag.
        let mut up = Vec::new();
        let mut lag_s = Vec::new();
        let mut lag_b = Vec::new();
        let mut bans = Vec::new();
        let mut down = Vec::new();
        for name in cfg.databases.keys() {
            let Some(h) = shared.registry.health(name) else {
                continue;
            };
            for (b, r) in std::iter::once(&h.primary)
                .chain(h.replicas.iter())
                .enumerate()
            {
                let addr = format!("{}:{}", r.host, r.port);
                let l = labels(&[
                    ("database", &backend_name(name, b)),
                    ("role", if b == 0 { "primary" } else { "replica" }),
                    ("backend", &addr),
                ]);
                up.push((l.clone(), u32::from(!r.is_banned())));
                if let Some(p) = r.problem() {
                    down.push((
                        labels(&[
                            ("database", &backend_name(name, b)),
                            ("role", if b == 0 { "primary" } else { "replica" }),
                            ("backend", &addr),
                            ("reason", p.kind),
                        ]),
                        1u32,
                    ));
                }
                if b > 0 {
                    // No sample while the lag is not known (see
                    // `Backend::lag`).
                    if let Some((ms, bytes)) = r.lag() {
                        lag_s.push((l.clone(), ms as f64 / 1000.0));
                        lag_b.push((l.clone(), bytes));
                    }
                    bans.push((l, r.bans.load(Relaxed)));
                }
            }
        }
        gauge(
            &mut enc,
            "tidepool_backend_up",
            "1 when the backend is healthy and used for routing",
            &up,
        )?;
        gauge(
            &mut enc,
            "tidepool_backend_down",
            "1 for a backend whose health checks fail, labelled with why: unchecked, unreachable, login_failed, check_failed, promoted, lagging, in_recovery (the details: SHOW REPLICAS' reason)",
            &down,
        )?;
        gauge(
            &mut enc,
            "tidepool_replica_lag_seconds",
            "Replication lag of a replica at its last check (no sample while not known)",
            &lag_s,
        )?;
        gauge(
            &mut enc,
            "tidepool_replica_lag_bytes",
            "Replication lag of a replica in WAL bytes",
            &lag_b,
        )?;
        counter(
            &mut enc,
            "tidepool_replica_bans",
            "Times a replica was banned",
            &bans,
        )?;
        let (mut writers, mut failovers) = (Vec::new(), Vec::new());
        for name in cfg.databases.keys() {
            if let Some(h) = shared.registry.health(name) {
                let w = h.writer();
                let b = h.writer_backend();
                writers.push((
                    labels(&[
                        ("database", name),
                        ("writer", &backend_name(name, w)),
                        ("backend", &format!("{}:{}", b.host, b.port)),
                    ]),
                    w as i64,
                ));
                failovers.push((labels(&[("database", name)]), h.failovers.load(Relaxed)));
            }
        }
        gauge(
            &mut enc,
            "tidepool_writer_backend",
            "The backend that takes writes: 0 the configured primary, N replica N after a failover",
            &writers,
        )?;
        counter(
            &mut enc,
            "tidepool_failovers",
            "Times writes moved to another backend (failover = \"auto\")",
            &failovers,
        )?;

        queries::encode(&mut enc, shared)?;

        // Process-wide events.
        let c = &shared.stats.counters;
        for (name, help, v) in [
            (
                "tidepool_server_prepares",
                "Parse messages sent to servers for named statements",
                &c.prepares,
            ),
            (
                "tidepool_prepare_hits",
                "Client Parses answered without a server round trip",
                &c.prepare_hits,
            ),
            (
                "tidepool_prepare_evictions",
                "Statements closed to respect max_prepared_statements",
                &c.prepare_evictions,
            ),
            (
                "tidepool_param_syncs",
                "Checkouts that set session parameters",
                &c.param_syncs,
            ),
            (
                "tidepool_param_refreshes",
                "Reads of session settings after a client changed them",
                &c.param_refreshes,
            ),
        ] {
            counter(&mut enc, name, help, &[(Labels::new(), v.load(Relaxed))])?;
        }
        sessions::encode(&mut enc, shared)?;
        advice::encode(&mut enc, shared)?;
        spans::encode(&mut enc, shared)?;
        let events: Vec<(Labels, u64)> = c
            .limits
            .rows()
            .iter()
            .map(|(reason, n)| (labels(&[("reason", reason)]), *n))
            .collect();
        counter(
            &mut enc,
            "tidepool_limit_events",
            "What the limits did: clients closed (client_idle_timeout), requests canceled (query_timeout), reserve connections granted, logins and messages refused",
            &events,
        )?;
        let limiters = shared.rate_limits.all();
        let label = |l: &crate::ratelimit::Limiter| {
            labels(&[
                ("scope", l.scope),
                ("name", &l.name),
                ("tier", &l.tier().name),
            ])
        };
        for (name, help, pick) in [
            (
                "tidepool_rate_limit_admitted",
                "Transactions a rate limit admitted",
                (|l: &crate::ratelimit::Limiter| &l.admitted)
                    as fn(&crate::ratelimit::Limiter) -> &std::sync::atomic::AtomicU64,
            ),
            (
                "tidepool_rate_limit_waited",
                "Transactions a rate limit admitted after a wait",
                |l| &l.waited,
            ),
            (
                "tidepool_rate_limit_rejected",
                "Transactions a rate limit refused (53400)",
                |l| &l.rejected,
            ),
        ] {
            let samples: Vec<(Labels, u64)> = limiters
                .iter()
                .map(|l| (label(l), pick(l).load(Relaxed)))
                .collect();
            counter(&mut enc, name, help, &samples)?;
        }
        let tokens: Vec<(Labels, i64)> = limiters
            .iter()
            .map(|l| (label(l), l.tokens() as i64))
            .collect();
        gauge(
            &mut enc,
            "tidepool_rate_limit_tokens",
            "Transactions a rate limit would admit at once now",
            &tokens,
        )?;
        if let Some(b) = shared.rate_limits.backend() {
            let l = labels(&[("backend", &b.target)]);
            gauge(
                &mut enc,
                "tidepool_rate_limit_backend_up",
                "Whether the shared rate-limit backend (rate_limit_backend) answers: 1 shared limits, 0 local shares",
                &[(l.clone(), i64::from(b.is_up()))],
            )?;
            counter(
                &mut enc,
                "tidepool_rate_limit_backend_errors",
                "Calls to the shared rate-limit backend that failed or timed out",
                &[(l.clone(), b.errors.load(Relaxed))],
            )?;
            counter(
                &mut enc,
                "tidepool_rate_limit_local_decisions",
                "Rate-limit decisions made locally (with this instance's share) because the shared backend was down",
                &[(l, b.local_decisions.load(Relaxed))],
            )?;
        }
        let t = &shared.throttle;
        counter(
            &mut enc,
            "tidepool_login_failures",
            "Failed client logins (wrong password or unknown user)",
            &[(Labels::new(), t.failures.load(Relaxed))],
        )?;
        counter(
            &mut enc,
            "tidepool_logins_refused",
            "Logins refused because their address failed too often (auth_failure_limit)",
            &[(Labels::new(), t.refused.load(Relaxed))],
        )?;
        gauge(
            &mut enc,
            "tidepool_login_blocked_addresses",
            "Source addresses refused now after too many failed logins",
            &[(
                Labels::new(),
                t.blocked(crate::clock::mono_ns() / 1000) as i64,
            )],
        )?;
        Ok(())
    }
}
