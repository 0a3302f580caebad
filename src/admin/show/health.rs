//! SHOW HEALTH and SHOW REPLICAS (tidepool): pool health per database
//! and each backend's state as routing sees it.

use super::*;

pub(super) fn health(shared: &Shared) -> ResultSet {
    let mut rs = ResultSet::new(&[
        ("database", Text),
        ("status", Text),
        ("statements", Numeric),
        ("slow", Numeric),
        ("slow_ratio", Numeric),
        ("slow_query_threshold", Numeric),
        ("window", Numeric),
        ("cl_waiting", Int4),
        ("longest_wait_us", Numeric),
        ("recommendation", Text),
    ]);
    let settings = shared.settings();
    let cfg = &settings.config.stats;
    let counts = snapshot::pool_clients(&snapshot::clients(shared));
    for (name, db) in &settings.config.databases {
        let h = shared.stats.health(name, cfg);
        let slow = db.slow_query_threshold.unwrap_or(cfg.slow_query_threshold);
        // The most pressed pool of this database decides the recommendation.
        let mut line = String::new();
        let (mut waiting_all, mut maxwait_all) = (0, 0);
        for p in shared
            .registry
            .pools()
            .iter()
            .filter(|p| &p.database == name)
        {
            let c = counts
                .get(&(p.database.clone(), p.user.clone(), p.backend))
                .copied()
                .unwrap_or_default();
            let (waiting, maxwait) = (c.waiting, c.max_wait_us);
            waiting_all += waiting;
            maxwait_all = maxwait_all.max(maxwait);
            let r = recommendation(
                waiting,
                maxwait,
                p.server_count() + p.opening_count(),
                p.settings().size,
                &h,
                slow.as_millis(),
            );
            if line.is_empty() && !r.is_empty() {
                line = format!(
                    "pool {}/{}: {r}",
                    backend_name(&p.database, p.backend),
                    p.user
                );
            }
        }
        if line.is_empty() {
            line = recommendation(0, 0, 0, 1, &h, slow.as_millis());
        }
        rs.push(vec![
            name.as_str().into(),
            h.status.as_str().into(),
            h.statements.into(),
            h.slow.into(),
            h.ratio.into(),
            (slow.as_micros() as u64).into(),
            (cfg.health_window.as_secs()).into(),
            waiting_all.into(),
            maxwait_all.into(),
            line.into(),
        ]);
    }
    rs
}

pub(super) fn replicas(shared: &Shared) -> ResultSet {
    let mut rs = ResultSet::new(&[
        ("database", Text),
        ("backend_role", Text),
        ("backend", Text),
        ("weight", Int4),
        ("healthy", Int4),
        ("lag_ms", Numeric),
        ("lag_bytes", Numeric),
        ("outstanding", Int4),
        ("reads", Numeric),
        ("writes", Numeric),
        ("bans", Numeric),
        ("reason", Text),
        ("writer", Int4),
    ]);
    use std::sync::atomic::Ordering::Relaxed;
    let settings = shared.settings();
    for name in settings.config.databases.keys() {
        let Some(h) = shared.registry.health(name) else {
            continue;
        };
        let all = std::iter::once(&h.primary).chain(h.replicas.iter());
        for (b, r) in all.enumerate() {
            // One reading for both columns (a check may change it between two).
            let lag = r.lag();
            rs.push(vec![
                backend_name(name, b).into(),
                role(b).into(),
                format!("{}:{}", r.host, r.port).into(),
                r.weight.into(),
                (!r.is_banned()).into(),
                // NULL while not known (an unreachable replica's last lag
                // would pass for its current one).
                lag.map(|(ms, _)| ms).into(),
                lag.map(|(_, bytes)| bytes).into(),
                r.outstanding.load(Relaxed).into(),
                r.reads.load(Relaxed).into(),
                r.writes.load(Relaxed).into(),
                r.bans.load(Relaxed).into(),
                r.problem().map(|p| p.to_string()).into(),
                (h.writer() == b).into(),
            ]);
        }
    }
    rs
}
