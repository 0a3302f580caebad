//! SHOW STATS, STATS_TOTALS, STATS_AVERAGES and TOTALS: PgBouncer's
//! columns in its order, then tidepool's.

use super::*;

pub(super) fn stats(shared: &Shared) -> ResultSet {
    let mut rs = ResultSet::new(&[
        ("database", Text),
        ("total_xact_count", Numeric),
        ("total_query_count", Numeric),
        ("total_received", Numeric),
        ("total_sent", Numeric),
        ("total_xact_time", Numeric),
        ("total_query_time", Numeric),
        ("total_wait_time", Numeric),
        ("avg_xact_count", Numeric),
        ("avg_query_count", Numeric),
        ("avg_recv", Numeric),
        ("avg_sent", Numeric),
        ("avg_xact_time", Numeric),
        ("avg_query_time", Numeric),
        ("avg_wait_time", Numeric),
        ("total_server_assignment_count", Numeric),
        ("total_client_parse_count", Numeric),
        ("total_server_parse_count", Numeric),
        ("total_bind_count", Numeric),
        ("total_client_login_count", Numeric),
        ("avg_server_assignment_count", Numeric),
        ("avg_client_parse_count", Numeric),
        ("avg_server_parse_count", Numeric),
        ("avg_bind_count", Numeric),
        ("avg_client_login_count", Numeric),
        ("backend_role", Text),
        ("backend", Text),
        ("total_statement_count", Numeric),
        ("total_error_count", Numeric),
        ("total_slow_count", Numeric),
        ("total_requests", Numeric),
        ("prepared_invalidations", Numeric),
        ("prepared_reprepares", Numeric),
        ("misroute_retries", Numeric),
    ]);
    for TrafficRow {
        database: db,
        backend: b,
        totals: t,
        averages: a,
        ..
    } in snapshot::traffic(shared)
    {
        rs.push(vec![
            backend_name(&db, b).into(),
            t.xacts.into(),
            t.queries.into(),
            t.received.into(),
            t.sent.into(),
            t.xact_us.into(),
            t.query_us.into(),
            t.wait_us.into(),
            a.xacts.into(),
            a.queries.into(),
            a.received.into(),
            a.sent.into(),
            a.xact_us.into(),
            a.query_us.into(),
            a.wait_us.into(),
            t.server_assignments.into(),
            t.client_parses.into(),
            t.server_parses.into(),
            t.binds.into(),
            t.logins.into(),
            a.server_assignments.into(),
            a.client_parses.into(),
            a.server_parses.into(),
            a.binds.into(),
            a.logins.into(),
            role(b).into(),
            backend_addr(shared, &db, b),
            t.statements.into(),
            t.errors.into(),
            t.slow.into(),
            t.queries.into(),
            t.prepared_invalidations.into(),
            t.prepared_reprepares.into(),
            t.misroute_retries.into(),
        ]);
    }
    rs
}

pub(super) fn stats_totals(shared: &Shared) -> ResultSet {
    let mut rs = ResultSet::new(&[
        ("database", Text),
        ("xact_count", Numeric),
        ("query_count", Numeric),
        ("bytes_received", Numeric),
        ("bytes_sent", Numeric),
        ("xact_time", Numeric),
        ("query_time", Numeric),
        ("wait_time", Numeric),
        ("server_assignment_count", Numeric),
        ("client_parse_count", Numeric),
        ("server_parse_count", Numeric),
        ("bind_count", Numeric),
        ("client_login_count", Numeric),
        ("backend_role", Text),
        ("statement_count", Numeric),
        ("error_count", Numeric),
        ("slow_count", Numeric),
        ("requests", Numeric),
        ("prepared_invalidations", Numeric),
        ("prepared_reprepares", Numeric),
        ("misroute_retries", Numeric),
    ]);
    for TrafficRow {
        database: db,
        backend: b,
        totals: t,
        ..
    } in snapshot::traffic(shared)
    {
        rs.push(vec![
            backend_name(&db, b).into(),
            t.xacts.into(),
            t.queries.into(),
            t.received.into(),
            t.sent.into(),
            t.xact_us.into(),
            t.query_us.into(),
            t.wait_us.into(),
            t.server_assignments.into(),
            t.client_parses.into(),
            t.server_parses.into(),
            t.binds.into(),
            t.logins.into(),
            role(b).into(),
            t.statements.into(),
            t.errors.into(),
            t.slow.into(),
            t.queries.into(),
            t.prepared_invalidations.into(),
            t.prepared_reprepares.into(),
            t.misroute_retries.into(),
        ]);
    }
    rs
}

pub(super) fn stats_averages(shared: &Shared) -> ResultSet {
    let mut rs = ResultSet::new(&[
        ("database", Text),
        ("xact_count", Numeric),
        ("query_count", Numeric),
        ("bytes_received", Numeric),
        ("bytes_sent", Numeric),
        ("xact_time", Numeric),
        ("query_time", Numeric),
        ("wait_time", Numeric),
        ("server_assignment_count", Numeric),
        ("avg_client_parse_count", Numeric),
        ("avg_server_parse_count", Numeric),
        ("avg_bind_count", Numeric),
        ("avg_client_login_count", Numeric),
        ("backend_role", Text),
    ]);
    for TrafficRow {
        database: db,
        backend: b,
        averages: a,
        ..
    } in snapshot::traffic(shared)
    {
        rs.push(vec![
            backend_name(&db, b).into(),
            a.xacts.into(),
            a.queries.into(),
            a.received.into(),
            a.sent.into(),
            a.xact_us.into(),
            a.query_us.into(),
            a.wait_us.into(),
            a.server_assignments.into(),
            a.client_parses.into(),
            a.server_parses.into(),
            a.binds.into(),
            a.logins.into(),
            role(b).into(),
        ]);
    }
    rs
}

pub(super) fn totals(shared: &Shared) -> ResultSet {
    let mut t = Totals::default();
    let mut a = crate::stats::Averages::default();
    for TrafficRow {
        totals: tt,
        averages: aa,
        ..
    } in snapshot::traffic(shared)
    {
        t.add(&tt);
        a.add(&aa);
    }
    let mut rs = ResultSet::new(&[("name", Text), ("value", Numeric)]);
    for (k, v) in [
        ("total_server_assignment_count", t.server_assignments),
        ("total_xact_count", t.xacts),
        ("total_query_count", t.queries),
        ("total_client_bytes", t.received),
        ("total_server_bytes", t.sent),
        ("total_xact_time", t.xact_us),
        ("total_query_time", t.query_us),
        ("total_wait_time", t.wait_us),
        ("total_client_parse_count", t.client_parses),
        ("total_server_parse_count", t.server_parses),
        ("total_bind_count", t.binds),
        ("total_client_login_count", t.logins),
        ("avg_server_assignment_count", a.server_assignments),
        ("avg_xact_count", a.xacts),
        ("avg_query_count", a.queries),
        ("avg_client_bytes", a.received),
        ("avg_server_bytes", a.sent),
        ("avg_xact_time", a.xact_us),
        ("avg_query_time", a.query_us),
        ("avg_wait_time", a.wait_us),
        ("avg_client_parse_count", a.client_parses),
        ("avg_server_parse_count", a.server_parses),
        ("avg_bind_count", a.binds),
        ("avg_client_login_count", a.logins),
    ] {
        rs.push(vec![k.into(), v.into()]);
    }
    rs
}
