//! SHOW DATABASES, USERS, CONFIG, LISTS and STATE: what is configured and
//! how much of it is in use.

use super::*;

pub(super) fn databases(shared: &Shared) -> ResultSet {
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
        *clients.entry(cl.database().to_string()).or_default() += 1;
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
                c.reserve_pool_size(db).into(),
                (c.pool.server_lifetime.as_secs()).into(),
                c.pool_mode(db).as_str().into(),
                Value::Null,
                c.max_db_connections(db).into(),
                servers.get(&(name.clone(), b)).copied().unwrap_or(0).into(),
                c.max_db_client_connections(db).into(),
                clients.get(name).copied().unwrap_or(0).into(),
                paused.into(),
                0i64.into(),
                role(b).into(),
                backend_status(shared, name, b, stats_status, None).into(),
                // Older exporters' name for reserve_pool_size.
                c.reserve_pool_size(db).into(),
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

pub(super) fn users(shared: &Shared) -> ResultSet {
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
        *clients.entry(c.user().to_string()).or_default() += 1;
    }
    for (name, u) in &settings.config.users {
        rs.push(vec![
            name.as_str().into(),
            u.pool_size.into(),
            0i64.into(),
            Value::Null,
            settings.config.max_user_connections(name).into(),
            servers.get(name).copied().unwrap_or(0).into(),
            settings.config.max_user_client_connections(name).into(),
            clients.get(name).copied().unwrap_or(0).into(),
        ]);
    }
    rs
}

pub(super) fn config(shared: &Shared) -> ResultSet {
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

pub(super) fn lists(shared: &Shared) -> ResultSet {
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

pub(super) fn state(shared: &Shared) -> ResultSet {
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
