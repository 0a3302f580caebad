//! SHOW POOLS, with each pool's health and a sizing recommendation.

use super::*;

/// Why a pool needs attention, in one line (empty when it does not).
pub fn recommendation(
    waiting: u64,
    maxwait_us: u64,
    servers: usize,
    size: u32,
    health: &PoolHealth,
    slow_ms: u128,
) -> String {
    if waiting > 0 && servers >= size as usize {
        return format!(
            "saturated: {waiting} client(s) waiting (longest {:.1} ms) with all {size} server connections in use; raise pool_size or shorten transactions (see SHOW QUERIES)",
            maxwait_us as f64 / 1000.0
        );
    }
    if health.status != HealthStatus::Healthy {
        return format!(
            "{:.1}% of statements in the last window took over {slow_ms} ms; see SHOW SLOW_QUERIES",
            health.ratio * 100.0
        );
    }
    String::new()
}

pub(super) fn pools(shared: &Shared) -> ResultSet {
    let mut rs = ResultSet::new(&[
        ("database", Text),
        ("user", Text),
        ("cl_active", Int4),
        ("cl_waiting", Int4),
        ("cl_active_cancel_req", Int4),
        ("cl_waiting_cancel_req", Int4),
        ("sv_active", Int4),
        ("sv_active_cancel", Int4),
        ("sv_being_canceled", Int4),
        ("sv_idle", Int4),
        ("sv_used", Int4),
        ("sv_tested", Int4),
        ("sv_login", Int4),
        ("maxwait", Int4),
        ("maxwait_us", Int4),
        ("pool_mode", Text),
        ("load_balance_hosts", Text),
        ("backend_role", Text),
        ("backend", Text),
        ("pool_size", Int4),
        ("status", Text),
        ("recommendation", Text),
        ("utilization", Numeric),
    ]);
    let counts = snapshot::pool_clients(&snapshot::clients(shared));
    let advice = super::advise(shared, &counts);
    let cfg = shared.settings().config.stats.clone();
    for p in shared.registry.pools() {
        if p.is_retired() && p.server_count() == 0 {
            continue;
        }
        let s = p.settings();
        let c = counts
            .get(&(p.database.clone(), p.user.clone(), p.backend))
            .copied()
            .unwrap_or_default();
        let (active, waiting, maxwait) = (c.active, c.waiting, c.max_wait_us);
        let health = shared.stats.health(&p.database, &cfg);
        let sv_active = p.active_count();
        let (sv_idle, sv_used) = p.idle_split();
        let sv_tested = p.testing_count();
        let sv_login = p.opening_count();
        rs.push(vec![
            backend_name(&p.database, p.backend).into(),
            p.user.as_str().into(),
            active.into(),
            waiting.into(),
            0i64.into(),
            0i64.into(),
            sv_active.into(),
            0i64.into(),
            0i64.into(),
            sv_idle.into(),
            sv_used.into(),
            sv_tested.into(),
            sv_login.into(),
            (maxwait / 1_000_000).into(),
            (maxwait % 1_000_000).into(),
            s.mode.as_str().into(),
            Value::Null,
            role(p.backend).into(),
            (*p.addr).into(),
            s.size.into(),
            backend_status(
                shared,
                &p.database,
                p.backend,
                health.status.as_str(),
                Some(&*p),
            )
            .into(),
            recommendation(
                waiting,
                maxwait,
                sv_active + sv_idle + sv_used + sv_tested + sv_login,
                s.size,
                &health,
                s.slow_query_threshold.as_millis(),
            )
            .into(),
            advice
                .iter()
                .find(|a| a.database == p.database && a.user == p.user && a.backend == p.backend)
                .map_or(Value::Null, |a| {
                    Value::Text(format!("{:.2}", a.utilization * 100.0))
                }),
        ]);
    }
    rs
}
