//! SHOW ADVICE (tidepool): per pool, the `default_pool_size` the observed
//! load needs, by Little's law — busy servers on average = arrival rate ×
//! server time per transaction — sized for a target utilization, bounded by
//! the server's `max_connections` shared among the declared tidepool
//! `instances`; with the figures it used and one sentence of reasoning.
//! Also the utilization SHOW POOLS and `/metrics` show.
//!
//! Invariant: figures are those of the last `stats_period` (PgBouncer's
//! `avg_*`); a pool without transactions in it gets no recommendation.

use super::*;

/// Utilization a pool is sized for: busier pools make clients queue.
const TARGET_UTILIZATION: f64 = 0.7;
/// `superuser_reserved_connections`' default, kept free of pools.
const SUPERUSER_RESERVED: u32 = 3;

/// One pool's figures and recommendation.
#[derive(Debug, Clone)]
pub struct Advice {
    pub database: String,
    pub user: String,
    pub backend: usize,
    pub pool_size: u32,
    /// Transactions per second over the last period.
    pub arrival_rate: f64,
    /// Server time per transaction (ms).
    pub server_ms: f64,
    /// Busy servers on average (arrival rate × server time).
    pub busy: f64,
    /// `busy / pool_size`.
    pub utilization: f64,
    /// 95th percentile of the wait for a server (ms, bucket bound).
    pub p95_wait_ms: f64,
    pub waiting: usize,
    /// The server's `max_connections` (0: not read yet).
    pub max_connections: u32,
    pub instances: u32,
    /// Most servers this pool may have: the server's connections (less
    /// the superuser reserve) per instance, less the other pools' sizes on
    /// that server.
    pub bound: Option<u32>,
    /// None: no transactions in the last period.
    pub recommended: Option<u32>,
    pub reasoning: String,
}

/// The p95 of cumulative buckets, as the bucket bound it falls in (ms).
fn p95_ms(b: &crate::stats::histogram::BucketsSnapshot) -> f64 {
    if b.count == 0 {
        return 0.0;
    }
    let want = (b.count as f64 * 0.95).ceil() as u64;
    for (i, bound) in crate::stats::histogram::BOUNDS_US.iter().enumerate() {
        if b.cumulative[i] >= want {
            return *bound as f64 / 1000.0;
        }
    }
    f64::INFINITY
}

/// Every pool's advice, in SHOW POOLS' order; `counts`: the clients of
/// each pool (`snapshot::pool_clients`), which the caller may have already.
pub fn advise(
    shared: &Shared,
    counts: &HashMap<(String, String, usize), snapshot::PoolClients>,
) -> Vec<Advice> {
    let settings = shared.settings();
    let instances = u32::try_from(settings.config.tidepool.instances.max(1)).unwrap_or(u32::MAX);
    let pools: Vec<_> = shared
        .registry
        .pools()
        .into_iter()
        .filter(|p| !p.is_retired())
        .collect();
    pools
        .iter()
        .map(|p| {
            let size = p.settings().size;
            let avg = p.traffic.averages();
            // Averages are per (database, backend): shared among the
            // users' pools of that backend in proportion to their sizes.
            let same: Vec<_> = pools
                .iter()
                .filter(|q| q.database == p.database && q.backend == p.backend)
                .collect();
            let total: u32 = same.iter().map(|q| q.settings().size).sum::<u32>().max(1);
            let share = f64::from(size) / f64::from(total);
            let arrival_rate = avg.xacts as f64 * share;
            let server_ms = avg.xact_us as f64 / 1000.0;
            let busy = arrival_rate * server_ms / 1000.0;
            let utilization = if size == 0 { 0.0 } else { busy / f64::from(size) };
            let max_connections = p.max_connections.load(std::sync::atomic::Ordering::Relaxed);
            let others: u32 = pools
                .iter()
                .filter(|q| q.backend == p.backend && q.addr == p.addr && !std::sync::Arc::ptr_eq(q, p))
                .map(|q| q.settings().size)
                .sum();
            let bound = (max_connections > 0).then(|| {
                (max_connections.saturating_sub(SUPERUSER_RESERVED) / instances)
                    .saturating_sub(others)
                    .max(1)
            });
            let waiting = counts
                .get(&(p.database.clone(), p.user.clone(), p.backend))
                .map_or(0, |c| c.waiting as usize);
            let p95_wait_ms = p95_ms(&p.traffic.latencies().wait);
            let (recommended, reasoning) = if avg.xacts == 0 {
                (
                    None,
                    "no transactions in the last stats_period: nothing to size by".to_owned(),
                )
            } else {
                let need = ((busy / TARGET_UTILIZATION).ceil() as u32).max(1);
                let rec = bound.map_or(need, |b| need.min(b));
                let verdict = match rec.cmp(&size) {
                    std::cmp::Ordering::Greater => "more servers would cut the waits",
                    std::cmp::Ordering::Less => "fewer servers would do",
                    std::cmp::Ordering::Equal => "the size fits",
                };
                let capped = if rec < need {
                    format!(
                        " (capped at {} by max_connections {max_connections} over {instances} instance(s))",
                        rec
                    )
                } else {
                    String::new()
                };
                (
                    Some(rec),
                    format!(
                        "{arrival_rate:.1} transactions/s x {server_ms:.2} ms of server time each = {busy:.2} busy servers on average (Little's law); at {:.0}% utilization that needs {need}{capped}; the pool has {size} ({:.0}% busy): {verdict}",
                        TARGET_UTILIZATION * 100.0,
                        utilization * 100.0
                    ),
                )
            };
            Advice {
                database: p.database.clone(),
                user: p.user.clone(),
                backend: p.backend,
                pool_size: size,
                arrival_rate,
                server_ms,
                busy,
                utilization,
                p95_wait_ms,
                waiting,
                max_connections,
                instances,
                bound,
                recommended,
                reasoning,
            }
        })
        .collect()
}

pub(super) fn advice(shared: &Shared) -> ResultSet {
    let mut rs = ResultSet::new(&[
        ("database", Text),
        ("user", Text),
        ("backend_role", Text),
        ("pool_size", Int4),
        ("recommended_size", Int4),
        ("arrival_rate", Numeric),
        ("server_time_ms", Numeric),
        ("busy_servers", Numeric),
        ("utilization", Numeric),
        ("p95_wait_ms", Numeric),
        ("cl_waiting", Int4),
        ("max_connections", Int4),
        ("instances", Int4),
        ("bound", Int4),
        ("reasoning", Text),
    ]);
    let num = |x: f64| Value::Text(format!("{x:.2}"));
    let counts = snapshot::pool_clients(&snapshot::clients(shared));
    for a in advise(shared, &counts) {
        rs.push(vec![
            backend_name(&a.database, a.backend).into(),
            a.user.into(),
            role(a.backend).into(),
            i64::from(a.pool_size).into(),
            a.recommended.map_or(Value::Null, |r| i64::from(r).into()),
            num(a.arrival_rate),
            num(a.server_ms),
            num(a.busy),
            num(a.utilization * 100.0),
            num(a.p95_wait_ms),
            (a.waiting as i64).into(),
            if a.max_connections == 0 {
                Value::Null
            } else {
                i64::from(a.max_connections).into()
            },
            i64::from(a.instances).into(),
            a.bound.map_or(Value::Null, |b| i64::from(b).into()),
            a.reasoning.into(),
        ]);
    }
    rs
}
