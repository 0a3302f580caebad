//! SHOW STATS, STATS_TOTALS, STATS_AVERAGES and TOTALS: PgBouncer's
//! columns in its order, then tidepool's.

use super::*;

/// PgBouncer 1.25's twelve traffic counters, in its column order, as
/// (SHOW STATS' total name, SHOW STATS' average name, STATS_TOTALS' name,
/// STATS_AVERAGES' name); their values are [`counters`]' in the same order.
type Names = (&'static str, &'static str, &'static str, &'static str);

const COUNTERS: [Names; 12] = [
    (
        "total_server_assignment_count",
        "avg_server_assignment_count",
        "server_assignment_count",
        "server_assignment_count",
    ),
    (
        "total_xact_count",
        "avg_xact_count",
        "xact_count",
        "xact_count",
    ),
    (
        "total_query_count",
        "avg_query_count",
        "query_count",
        "query_count",
    ),
    (
        "total_received",
        "avg_recv",
        "bytes_received",
        "bytes_received",
    ),
    ("total_sent", "avg_sent", "bytes_sent", "bytes_sent"),
    ("total_xact_time", "avg_xact_time", "xact_time", "xact_time"),
    (
        "total_query_time",
        "avg_query_time",
        "query_time",
        "query_time",
    ),
    ("total_wait_time", "avg_wait_time", "wait_time", "wait_time"),
    (
        "total_client_parse_count",
        "avg_client_parse_count",
        "client_parse_count",
        "avg_client_parse_count",
    ),
    (
        "total_server_parse_count",
        "avg_server_parse_count",
        "server_parse_count",
        "avg_server_parse_count",
    ),
    (
        "total_bind_count",
        "avg_bind_count",
        "bind_count",
        "avg_bind_count",
    ),
    (
        "total_client_login_count",
        "avg_client_login_count",
        "client_login_count",
        "avg_client_login_count",
    ),
];

/// The counters of [`COUNTERS`], totals or averages alike.
fn counters(c: [u64; 12]) -> impl Iterator<Item = Value> {
    c.into_iter().map(Value::from)
}

fn totals_of(t: &Totals) -> [u64; 12] {
    [
        t.server_assignments,
        t.xacts,
        t.queries,
        t.received,
        t.sent,
        t.xact_us,
        t.query_us,
        t.wait_us,
        t.client_parses,
        t.server_parses,
        t.binds,
        t.logins,
    ]
}

fn averages_of(a: &crate::stats::Averages) -> [u64; 12] {
    [
        a.server_assignments,
        a.xacts,
        a.queries,
        a.received,
        a.sent,
        a.xact_us,
        a.query_us,
        a.wait_us,
        a.client_parses,
        a.server_parses,
        a.binds,
        a.logins,
    ]
}

/// tidepool's totals after PgBouncer's: (SHOW STATS name, STATS_TOTALS name).
const OWN_TOTALS: [(&str, &str); 7] = [
    ("total_statement_count", "statement_count"),
    ("total_error_count", "error_count"),
    ("total_slow_count", "slow_count"),
    // PgBouncer before 1.8 (Debian's Python exporter still reads it).
    ("total_requests", "requests"),
    ("prepared_invalidations", "prepared_invalidations"),
    ("prepared_reprepares", "prepared_reprepares"),
    ("misroute_retries", "misroute_retries"),
];

fn own_totals(t: &Totals) -> impl Iterator<Item = Value> {
    [
        t.statements,
        t.errors,
        t.slow,
        t.queries,
        t.prepared_invalidations,
        t.prepared_reprepares,
        t.misroute_retries,
    ]
    .into_iter()
    .map(Value::from)
}

/// A result set of `first` columns, then the names `pick` takes from
/// [`COUNTERS`] (each group of twelve in turn), then `last`.
fn columns(
    first: &[(&'static str, Type)],
    groups: &[fn(&Names) -> &'static str],
    last: &[(&'static str, Type)],
) -> ResultSet {
    let mut cols: Vec<(&'static str, Type)> = first.to_vec();
    for pick in groups {
        cols.extend(COUNTERS.iter().map(|c| (pick(c), Numeric)));
    }
    cols.extend_from_slice(last);
    ResultSet::new(&cols)
}

pub(super) fn stats(shared: &Shared) -> ResultSet {
    let mut last = vec![("backend_role", Text), ("backend", Text)];
    last.extend(OWN_TOTALS.iter().map(|(name, _)| (*name, Numeric)));
    let mut rs = columns(&[("database", Text)], &[|c| c.0, |c| c.1], &last);
    for TrafficRow {
        database: db,
        backend: b,
        totals: t,
        averages: a,
        ..
    } in snapshot::traffic(shared)
    {
        let mut row = vec![backend_name(&db, b).into()];
        row.extend(counters(totals_of(&t)));
        row.extend(counters(averages_of(&a)));
        row.push(role(b).into());
        row.push(backend_addr(shared, &db, b));
        row.extend(own_totals(&t));
        rs.push(row);
    }
    rs
}

pub(super) fn stats_totals(shared: &Shared) -> ResultSet {
    let mut last = vec![("backend_role", Text)];
    last.extend(OWN_TOTALS.iter().map(|(_, name)| (*name, Numeric)));
    let mut rs = columns(&[("database", Text)], &[|c| c.2], &last);
    for TrafficRow {
        database: db,
        backend: b,
        totals: t,
        ..
    } in snapshot::traffic(shared)
    {
        let mut row = vec![backend_name(&db, b).into()];
        row.extend(counters(totals_of(&t)));
        row.push(role(b).into());
        row.extend(own_totals(&t));
        rs.push(row);
    }
    rs
}

pub(super) fn stats_averages(shared: &Shared) -> ResultSet {
    let mut rs = columns(&[("database", Text)], &[|c| c.3], &[("backend_role", Text)]);
    for TrafficRow {
        database: db,
        backend: b,
        averages: a,
        ..
    } in snapshot::traffic(shared)
    {
        let mut row = vec![backend_name(&db, b).into()];
        row.extend(counters(averages_of(&a)));
        row.push(role(b).into());
        rs.push(row);
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
