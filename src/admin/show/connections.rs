//! SHOW CLIENTS and SHOW SERVERS: one row per connection, PgBouncer's
//! columns; SHOW LEAKS (tidepool): clients holding a server unused.

use super::*;
use crate::client::list::ClientState;

pub(super) const CONNECTION_COLUMNS: [(&str, Type); 21] = [
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

pub(super) fn ptr(kind: char, id: u64) -> String {
    format!("0x{}{id:011x}", if kind == 'C' { '1' } else { '2' })
}

pub(super) fn clients(shared: &Shared) -> ResultSet {
    let mut cols = CONNECTION_COLUMNS.to_vec();
    cols.extend([
        ("backend_role", Text),
        ("pinned", Text),
        ("pinned_since", Text),
        ("xact_count", Numeric),
        ("query_count", Numeric),
        ("wait_time_us", Numeric),
        ("bytes", Numeric),
        ("state_since", Text),
    ]);
    let mut rs = ResultSet::new(&cols);
    for c in snapshot::clients(shared) {
        let (addr, port, laddr, lport) = if c.addr.is_none() && c.local.is_none() {
            // A client of the Unix socket (a TCP one always has both):
            // `unix`, as PgBouncer shows it.
            let unix = || Value::from("unix");
            (unix(), Value::Null, unix(), Value::Null)
        } else {
            let (addr, port) = addr_parts(c.addr);
            let (laddr, lport) = addr_parts(c.local);
            (addr, port, laddr, lport)
        };
        // A console session running a command is active with no server.
        let linked = c.state == ClientState::Active && c.link != 0;
        let pin = shared.pins.of(c.id);
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
            if linked {
                ptr('S', c.link).into()
            } else {
                Value::Text(String::new())
            },
            c.pid.into(),
            c.tls.into(),
            c.application_name.into(),
            c.prepared.into(),
            c.id.into(),
            match c.state {
                ClientState::Waiting => role(c.backend).into(),
                ClientState::Active if linked => role(c.backend).into(),
                _ => Value::Null,
            },
            pin.map_or("", |p| p.0).into(),
            pin.map_or(Value::Null, |p| timestamp(p.1).into()),
            (c.counts.xacts as i64).into(),
            (c.counts.queries as i64).into(),
            (c.counts.wait_us as i64).into(),
            (c.counts.bytes as i64).into(),
            timestamp_us(c.state_since_us).into(),
        ]);
    }
    rs
}

pub(super) fn servers(shared: &Shared) -> ResultSet {
    let mut cols = CONNECTION_COLUMNS.to_vec();
    cols.push(("backend_role", Text));
    let mut rs = ResultSet::new(&cols);
    for s in crate::server::list::rows(&shared.registry.servers) {
        let (addr, port, laddr, lport) = match &s.addr {
            crate::server::addr::ServerAddr::Tcp(a) => {
                let (addr, port) = addr_parts(Some(*a));
                let (laddr, lport) = addr_parts(s.local);
                (addr, port, laddr, lport)
            }
            // On a socket directory: `unix`, as PgBouncer shows it, with
            // the port the socket is named after.
            crate::server::addr::ServerAddr::Unix { port, .. } => {
                ("unix".into(), (*port).into(), "unix".into(), Value::Null)
            }
        };
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
            s.tls.into(),
            "".into(),
            s.prepared.into(),
            s.id.into(),
            role(s.backend).into(),
        ]);
    }
    rs
}

/// SHOW LEAKS: clients that hold a server without using it (idle in a
/// transaction, or pinned and idle) for longer than `leak_warn_after`.
pub(super) fn leaks(shared: &Shared) -> ResultSet {
    let mut rs = ResultSet::new(&[
        ("id", Int8),
        ("user", Text),
        ("database", Text),
        ("application_name", Text),
        ("addr", Text),
        ("state", Text),
        ("since", Text),
        ("held_s", Numeric),
        ("fingerprint", Text),
    ]);
    for l in shared.leaks.rows() {
        let held = l.since.elapsed().unwrap_or_default().as_secs() as i64;
        rs.push(vec![
            (l.client as i64).into(),
            l.user.into(),
            l.database.into(),
            l.application_name.into(),
            l.addr.into(),
            l.state.into(),
            timestamp(l.since).into(),
            held.into(),
            l.fingerprint
                .map_or(Value::Null, |f| format!("{f:016x}").into()),
        ]);
    }
    rs
}
