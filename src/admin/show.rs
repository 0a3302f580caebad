//! `SHOW ...`: every result set of the console, built from live state.
//! Columns are PgBouncer's with PgBouncer's types; `SHOW STATS` keeps
//! PgBouncer 1.18's 15 columns first, in order, then the newer PgBouncer
//! columns. tidepool's own columns come after them, and legacy names old
//! exporters still read (`total_requests`, `requests`, `reserve_pool`) last.
//!
//! A database with replicas has one row per backend: the primary under the
//! database's name, replica `i` (from 1) as `NAME@replicaI`, with
//! `backend_role` and `backend` columns saying which is which.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::SystemTime;

use bytes::BytesMut;

use super::AdminError;
use super::output::{ResultSet, Type, Value, command_complete, notice};
use crate::client::Shared;
use crate::client::list::{ClientRow, ClientState};
use crate::stats::{HealthStatus, PoolHealth, Totals};

use Type::{Int4, Int8, Numeric, Text};

/// The row name of a database's backend.
pub fn backend_name(database: &str, backend: usize) -> String {
    if backend == 0 {
        database.to_owned()
    } else {
        format!("{database}@replica{backend}")
    }
}

fn role(backend: usize) -> &'static str {
    if backend == 0 { "primary" } else { "replica" }
}

/// `YYYY-MM-DD HH:MM:SS UTC`, as PgBouncer prints times.
pub fn timestamp(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn timestamp_us(us: u64) -> String {
    timestamp(SystemTime::UNIX_EPOCH + std::time::Duration::from_micros(us))
}

fn addr_parts(a: Option<SocketAddr>) -> (Value, Value) {
    match a {
        Some(a) => (a.ip().to_string().into(), a.port().into()),
        None => (Value::Null, Value::Null),
    }
}

pub fn show(shared: &Shared, what: &str, out: &mut BytesMut) -> Result<(), AdminError> {
    let rs = match what {
        "HELP" => {
            notice(out, "Console usage", Some(HELP));
            command_complete(out, "SHOW");
            return Ok(());
        }
        "STATS" => stats(shared),
        "STATS_TOTALS" => stats_totals(shared),
        "STATS_AVERAGES" => stats_averages(shared),
        "TOTALS" => totals(shared),
        "POOLS" => pools(shared),
        "CLIENTS" => clients(shared),
        "SERVERS" => servers(shared),
        "DATABASES" => databases(shared),
        "USERS" => users(shared),
        "CONFIG" => config(shared),
        "LISTS" => lists(shared),
        "VERSION" => {
            let mut rs = ResultSet::new(&[("version", Text)]);
            rs.push(vec![VERSION.into()]);
            rs
        }
        "STATE" => state(shared),
        "QUERIES" => queries(shared),
        "SLOW_QUERIES" => slow_queries(shared),
        "HEALTH" => health(shared),
        "REPLICAS" => replicas(shared),
        other => return Err(AdminError::Syntax(format!("SHOW {other}"))),
    };
    rs.write(out, "SHOW");
    Ok(())
}

pub const VERSION: &str = concat!(
    "tidepool ",
    env!("CARGO_PKG_VERSION"),
    ", compatible with PgBouncer 1.25.0"
);

const HELP: &str = "\
SHOW HELP|CONFIG|DATABASES|POOLS|CLIENTS|SERVERS|USERS|VERSION|STATE
SHOW STATS|STATS_TOTALS|STATS_AVERAGES|TOTALS|LISTS
SHOW QUERIES|SLOW_QUERIES|HEALTH|REPLICAS   (tidepool)
SET key = arg   (accepted and ignored)
RELOAD
PAUSE [<db>]
RESUME [<db>]
KILL [<db>]
SHUTDOWN";

/// Totals and averages per (database, backend), every configured backend
/// included.
fn traffic(shared: &Shared) -> Vec<(String, usize, Totals, crate::stats::Averages)> {
    let settings = shared.settings();
    for (name, db) in &settings.config.databases {
        for b in 0..=db.replicas.len() {
            shared.stats.traffic(name, b);
        }
    }
    shared
        .stats
        .traffic_rows()
        .into_iter()
        .map(|((db, b), t)| (db, b, t.totals(), t.averages()))
        .collect()
}

fn backend_addr(shared: &Shared, database: &str, backend: usize) -> Value {
    let settings = shared.settings();
    let db = settings.config.databases.get(database);
    match db.map(|d| {
        backend
            .checked_sub(1)
            .and_then(|i| d.replicas.get(i))
            .map_or((d.host.clone(), d.port), |r| (r.host.clone(), r.port))
    }) {
        Some((h, p)) => format!("{h}:{p}").into(),
        None => Value::Null,
    }
}

fn stats(shared: &Shared) -> ResultSet {
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
    for (db, b, t, a) in traffic(shared) {
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

fn stats_totals(shared: &Shared) -> ResultSet {
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
    for (db, b, t, _) in traffic(shared) {
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

fn stats_averages(shared: &Shared) -> ResultSet {
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
    for (db, b, _, a) in traffic(shared) {
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

fn totals(shared: &Shared) -> ResultSet {
    let mut t = Totals::default();
    let mut a = crate::stats::Averages::default();
    for (_, _, tt, aa) in traffic(shared) {
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

/// Clients per (database, user, backend): (active, waiting, longest wait µs).
/// An idle client counts toward its primary pool.
fn client_counts(rows: &[ClientRow]) -> HashMap<(String, String, usize), (u64, u64, u64)> {
    let mut m: HashMap<(String, String, usize), (u64, u64, u64)> = HashMap::new();
    for c in rows {
        let backend = if c.state == ClientState::Idle {
            0
        } else {
            c.backend
        };
        let e = m
            .entry((c.database.clone(), c.user.clone(), backend))
            .or_default();
        if c.state == ClientState::Waiting {
            e.1 += 1;
            e.2 = e.2.max(c.wait_us);
        } else {
            e.0 += 1;
        }
    }
    m
}

fn client_rows(shared: &Shared) -> Vec<ClientRow> {
    shared.list.all().iter().map(|c| c.row()).collect()
}

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

fn pools(shared: &Shared) -> ResultSet {
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
    ]);
    let counts = client_counts(&client_rows(shared));
    let cfg = shared.settings().config.stats.clone();
    for p in shared.registry.pools() {
        if p.is_retired() && p.server_count() == 0 {
            continue;
        }
        let s = p.settings();
        let (active, waiting, maxwait) = counts
            .get(&(p.database.clone(), p.user.clone(), p.backend))
            .copied()
            .unwrap_or_default();
        let health = shared.stats.health(&p.database, &cfg);
        let sv_active = p.active_count();
        let sv_idle = p.idle_count();
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
            0i64.into(),
            0i64.into(),
            sv_login.into(),
            (maxwait / 1_000_000).into(),
            (maxwait % 1_000_000).into(),
            s.mode.as_str().into(),
            Value::Null,
            role(p.backend).into(),
            (*p.addr).into(),
            s.size.into(),
            backend_status(shared, &p.database, p.backend, health.status.as_str()).into(),
            recommendation(
                waiting,
                maxwait,
                sv_active + sv_idle + sv_login,
                s.size,
                &health,
                s.slow_query_threshold.as_millis(),
            )
            .into(),
        ]);
    }
    rs
}

const CONNECTION_COLUMNS: [(&str, Type); 21] = [
    ("type", Text),
    ("user", Text),
    ("database", Text),
    ("replication", Text),
    ("state", Text),
    ("addr", Text),
    ("port", Int4),
    ("local_addr", Text),
    ("local_port", Int4),
    ("connect_time", Text),
    ("request_time", Text),
    ("wait", Int4),
    ("wait_us", Int4),
    ("close_needed", Int4),
    ("ptr", Text),
    ("link", Text),
    ("remote_pid", Int4),
    ("tls", Text),
    ("application_name", Text),
    ("prepared_statements", Int4),
    ("id", Int8),
];

fn ptr(kind: char, id: u64) -> String {
    format!("0x{}{id:011x}", if kind == 'C' { '1' } else { '2' })
}

fn clients(shared: &Shared) -> ResultSet {
    let mut cols = CONNECTION_COLUMNS.to_vec();
    cols.push(("backend_role", Text));
    let mut rs = ResultSet::new(&cols);
    for c in client_rows(shared) {
        let (addr, port) = addr_parts(c.addr);
        let (laddr, lport) = addr_parts(c.local);
        let active = c.state == ClientState::Active;
        rs.push(vec![
            "C".into(),
            c.user.into(),
            c.database.into(),
            "none".into(),
            c.state.as_str().into(),
            addr,
            port,
            laddr,
            lport,
            timestamp(c.connect_time).into(),
            timestamp_us(c.request_time_us).into(),
            (c.wait_us / 1_000_000).into(),
            (c.wait_us % 1_000_000).into(),
            0i64.into(),
            ptr('C', c.id).into(),
            if active {
                ptr('S', c.link).into()
            } else {
                Value::Text(String::new())
            },
            c.pid.into(),
            "".into(),
            c.application_name.into(),
            c.prepared.into(),
            c.id.into(),
            if c.state == ClientState::Idle {
                Value::Null
            } else {
                role(c.backend).into()
            },
        ]);
    }
    rs
}

fn servers(shared: &Shared) -> ResultSet {
    let mut cols = CONNECTION_COLUMNS.to_vec();
    cols.push(("backend_role", Text));
    let mut rs = ResultSet::new(&cols);
    for s in crate::server::list::rows(&shared.registry.servers) {
        let (addr, port) = addr_parts(Some(s.addr));
        let (laddr, lport) = addr_parts(s.local);
        rs.push(vec![
            "S".into(),
            s.user.into(),
            backend_name(&s.database, s.backend).into(),
            "none".into(),
            if s.active { "active" } else { "idle" }.into(),
            addr,
            port,
            laddr,
            lport,
            timestamp(s.connect_time).into(),
            timestamp_us(s.request_time_us).into(),
            0i64.into(),
            0i64.into(),
            0i64.into(),
            ptr('S', s.id).into(),
            if s.active {
                ptr('C', s.link).into()
            } else {
                Value::Text(String::new())
            },
            s.pid.into(),
            "".into(),
            "".into(),
            s.prepared.into(),
            s.id.into(),
            role(s.backend).into(),
        ]);
    }
    rs
}

fn databases(shared: &Shared) -> ResultSet {
    let mut rs = ResultSet::new(&[
        ("name", Text),
        ("host", Text),
        ("port", Int4),
        ("database", Text),
        ("force_user", Text),
        ("pool_size", Int4),
        ("min_pool_size", Int4),
        ("reserve_pool_size", Int4),
        ("server_lifetime", Int4),
        ("pool_mode", Text),
        ("load_balance_hosts", Text),
        ("max_connections", Int4),
        ("current_connections", Int4),
        ("max_client_connections", Int4),
        ("current_client_connections", Int4),
        ("paused", Int4),
        ("disabled", Int4),
        ("backend_role", Text),
        ("status", Text),
        ("reserve_pool", Int4),
    ]);
    let settings = shared.settings();
    let c = &settings.config;
    let mut servers: BTreeMap<(String, usize), usize> = BTreeMap::new();
    for p in shared.registry.pools() {
        *servers.entry((p.database.clone(), p.backend)).or_default() += p.server_count();
    }
    let mut clients: HashMap<String, u64> = HashMap::new();
    for cl in shared.list.all() {
        *clients.entry(cl.database.to_string()).or_default() += 1;
    }
    for (name, db) in &c.databases {
        let paused = shared.registry.control(name).is_paused();
        let stats_status = shared.stats.health(name, &c.stats).status.as_str();
        let hosts = std::iter::once((db.host.clone(), db.port))
            .chain(db.replicas.iter().map(|r| (r.host.clone(), r.port)));
        for (b, (host, port)) in hosts.enumerate() {
            rs.push(vec![
                backend_name(name, b).into(),
                host.into(),
                port.into(),
                // Exporters label rows by this column (Debian's by this one
                // alone), so a replica's carries its `@replicaN` suffix.
                backend_name(&db.dbname.clone().unwrap_or_else(|| name.clone()), b).into(),
                db.user.clone().into(),
                c.pool_size(db, None).into(),
                c.min_pool_size(db).into(),
                0i64.into(),
                (c.pool.server_lifetime.as_secs()).into(),
                c.pool_mode(db).as_str().into(),
                Value::Null,
                c.pool.max_db_connections.into(),
                servers.get(&(name.clone(), b)).copied().unwrap_or(0).into(),
                0i64.into(),
                clients.get(name).copied().unwrap_or(0).into(),
                paused.into(),
                0i64.into(),
                role(b).into(),
                backend_status(shared, name, b, stats_status).into(),
                0i64.into(),
            ]);
        }
    }
    for admin in crate::client::startup::ADMIN_DATABASES {
        rs.push(vec![
            admin.into(),
            Value::Null,
            Value::Null,
            admin.into(),
            Value::Null,
            2i64.into(),
            0i64.into(),
            0i64.into(),
            0i64.into(),
            "statement".into(),
            Value::Null,
            0i64.into(),
            0i64.into(),
            0i64.into(),
            clients.get(admin).copied().unwrap_or(0).into(),
            0i64.into(),
            0i64.into(),
            "admin".into(),
            Value::Null,
            0i64.into(),
        ]);
    }
    rs
}

fn users(shared: &Shared) -> ResultSet {
    let mut rs = ResultSet::new(&[
        ("name", Text),
        ("pool_size", Int4),
        ("reserve_pool_size", Int4),
        ("pool_mode", Text),
        ("max_user_connections", Int4),
        ("current_connections", Int4),
        ("max_user_client_connections", Int4),
        ("current_client_connections", Int4),
    ]);
    let settings = shared.settings();
    let mut servers: HashMap<String, usize> = HashMap::new();
    for p in shared.registry.pools() {
        *servers.entry(p.user.clone()).or_default() += p.server_count();
    }
    let mut clients: HashMap<String, u64> = HashMap::new();
    for c in shared.list.all() {
        *clients.entry(c.user.to_string()).or_default() += 1;
    }
    for (name, u) in &settings.config.users {
        rs.push(vec![
            name.as_str().into(),
            u.pool_size.into(),
            0i64.into(),
            Value::Null,
            0i64.into(),
            servers.get(name).copied().unwrap_or(0).into(),
            0i64.into(),
            clients.get(name).copied().unwrap_or(0).into(),
        ]);
    }
    rs
}

fn config(shared: &Shared) -> ResultSet {
    let mut rs = ResultSet::new(&[
        ("key", Text),
        ("value", Text),
        ("default", Text),
        ("changeable", Text),
    ]);
    let settings = shared.settings();
    for (key, value, default, changeable) in crate::config::describe(&settings.config) {
        rs.push(vec![
            key.into(),
            value.into(),
            default.into(),
            if changeable { "yes" } else { "no" }.into(),
        ]);
    }
    rs
}

fn lists(shared: &Shared) -> ResultSet {
    let settings = shared.settings();
    let pools = shared.registry.pools();
    let logged_in = shared.list.len();
    let connections = shared.clients.load(std::sync::atomic::Ordering::Relaxed) as usize;
    let servers: usize = pools.iter().map(|p| p.server_count()).sum();
    let mut rs = ResultSet::new(&[("list", Text), ("items", Int4)]);
    for (k, v) in [
        ("databases", settings.config.databases.len()),
        ("users", settings.config.users.len()),
        ("peers", 0),
        ("pools", pools.len()),
        ("peer_pools", 0),
        ("free_clients", 0),
        ("used_clients", logged_in),
        ("login_clients", connections.saturating_sub(logged_in)),
        ("free_servers", 0),
        ("used_servers", servers),
        ("dns_names", 0),
        ("dns_zones", 0),
        ("dns_queries", 0),
        ("dns_pending", 0),
        // tidepool's own: idle clients without a task (also in used_clients).
        ("parked_clients", shared.lot.len()),
    ] {
        rs.push(vec![k.into(), v.into()]);
    }
    rs
}

fn state(shared: &Shared) -> ResultSet {
    let settings = shared.settings();
    let all_paused = settings
        .config
        .databases
        .keys()
        .all(|d| shared.registry.control(d).is_paused());
    let shutting = shared
        .lifecycle
        .shutting_down
        .load(std::sync::atomic::Ordering::Relaxed);
    let mut rs = ResultSet::new(&[("key", Text), ("value", Text)]);
    for (k, v) in [
        ("active", !all_paused && !shutting),
        ("paused", all_paused),
        ("suspended", false),
        ("shutting_down", shutting),
    ] {
        rs.push(vec![k.into(), if v { "yes" } else { "no" }.into()]);
    }
    rs
}

fn queries(shared: &Shared) -> ResultSet {
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

fn slow_queries(shared: &Shared) -> ResultSet {
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
        ]);
    }
    rs
}

fn health(shared: &Shared) -> ResultSet {
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
    let counts = client_counts(&client_rows(shared));
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
            let (_, waiting, maxwait) = counts
                .get(&(p.database.clone(), p.user.clone(), p.backend))
                .copied()
                .unwrap_or_default();
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

/// The `status` column of a backend's rows: `down: <kind>: <detail>` while
/// its health checks fail (the server's own message and SQLSTATE when it
/// gave one), else what its statement statistics say.
fn backend_status(shared: &Shared, db: &str, backend: usize, stats_status: &str) -> String {
    let problem = shared.registry.health(db).and_then(|h| {
        if backend == 0 {
            h.primary.problem()
        } else {
            h.replicas.get(backend - 1).and_then(|r| r.problem())
        }
    });
    match problem {
        Some(p) => format!("down: {p}"),
        None => stats_status.to_owned(),
    }
}

fn replicas(shared: &Shared) -> ResultSet {
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
    ]);
    use std::sync::atomic::Ordering::Relaxed;
    let settings = shared.settings();
    for name in settings.config.databases.keys() {
        let Some(h) = shared.registry.health(name) else {
            continue;
        };
        let all = std::iter::once(&h.primary).chain(h.replicas.iter());
        for (b, r) in all.enumerate() {
            rs.push(vec![
                backend_name(name, b).into(),
                role(b).into(),
                format!("{}:{}", r.host, r.port).into(),
                r.weight.into(),
                (!r.is_banned()).into(),
                r.lag_ms.load(Relaxed).into(),
                r.lag_bytes.load(Relaxed).into(),
                r.outstanding.load(Relaxed).into(),
                r.reads.load(Relaxed).into(),
                r.writes.load(Relaxed).into(),
                r.bans.load(Relaxed).into(),
                r.problem().map(|p| p.to_string()).into(),
            ]);
        }
    }
    rs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_civil_utc() {
        assert_eq!(timestamp(SystemTime::UNIX_EPOCH), "1970-01-01 00:00:00 UTC");
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_795_415_291);
        assert_eq!(timestamp(t), "2026-11-23 06:28:11 UTC");
    }

    #[test]
    fn replica_rows_are_named_apart() {
        assert_eq!(backend_name("app", 0), "app");
        assert_eq!(backend_name("app", 2), "app@replica2");
    }
}
