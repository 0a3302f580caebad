//! SHOW QUERIES and SHOW SLOW_QUERIES (tidepool): per-query statistics
//! and the slow-statement log, literals masked.

use super::*;

pub(super) fn queries(shared: &Shared) -> ResultSet {
    let mut rs = ResultSet::new(&[
        ("database", Text),
        ("fingerprint", Text),
        ("query", Text),
        ("calls", Numeric),
        ("errors", Numeric),
        ("rows", Numeric),
        ("total_time", Numeric),
        ("mean_time", Numeric),
        ("p50_time", Numeric),
        ("p90_time", Numeric),
        ("p95_time", Numeric),
        ("p99_time", Numeric),
        ("min_time", Numeric),
        ("max_time", Numeric),
        ("backend_role", Text),
        ("primary_calls", Numeric),
        ("replica_calls", Numeric),
        ("last_seen", Text),
    ]);
    for q in shared.stats.queries.snapshot() {
        let roles = match (q.primary_calls > 0, q.replica_calls > 0) {
            (true, true) => "both",
            (false, true) => "replica",
            _ => "primary",
        };
        rs.push(vec![
            (*q.database).into(),
            format!("{:016x}", q.fingerprint).into(),
            (*q.query).into(),
            q.calls.into(),
            q.errors.into(),
            q.rows.into(),
            q.total_us.into(),
            q.mean_us.into(),
            q.p50_us.into(),
            q.p90_us.into(),
            q.p95_us.into(),
            q.p99_us.into(),
            q.min_us.into(),
            q.max_us.into(),
            roles.into(),
            q.primary_calls.into(),
            q.replica_calls.into(),
            timestamp(q.last_seen).into(),
        ]);
    }
    rs
}

pub(super) fn slow_queries(shared: &Shared) -> ResultSet {
    let mut rs = ResultSet::new(&[
        ("time", Text),
        ("database", Text),
        ("user", Text),
        ("backend", Text),
        ("backend_role", Text),
        ("application_name", Text),
        ("client_addr", Text),
        ("duration", Numeric),
        ("rows", Numeric),
        ("error", Int4),
        ("fingerprint", Text),
        ("query", Text),
        ("trace_id", Text),
        ("span_id", Text),
    ]);
    for s in shared.stats.slow.snapshot() {
        rs.push(vec![
            timestamp(s.at).into(),
            (*s.database).into(),
            (*s.user).into(),
            (*s.backend).into(),
            s.role.as_str().into(),
            s.application_name.into(),
            s.client_addr.into(),
            s.duration_us.into(),
            s.rows.into(),
            s.error.into(),
            format!("{:016x}", s.fingerprint).into(),
            (*s.query).into(),
            s.trace.map_or(Value::Null, |t| t.trace_hex().into()),
            s.trace.map_or(Value::Null, |t| t.span_hex().into()),
        ]);
    }
    rs
}
