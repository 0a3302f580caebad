//! SHOW RATE_LIMITS (tidepool): each user's and database's rate limiter,
//! its tier and what it admitted, made wait and refused; SHOW LISTENERS
//! (tidepool): who listens on what through the shared LISTEN connection.

use super::*;

pub(super) fn rate_limits(shared: &Shared) -> ResultSet {
    let mut rs = ResultSet::new(&[
        ("scope", Text),
        ("name", Text),
        ("tier", Text),
        ("rate", Text),
        ("burst", Numeric),
        ("tokens", Numeric),
        ("admitted", Numeric),
        ("waited", Numeric),
        ("rejected", Numeric),
        ("backend", Text),
    ]);
    let backend = match shared.rate_limits.backend() {
        None => "local".to_owned(),
        Some(b) if b.is_up() => format!("redis {}", b.target),
        Some(b) => format!("local share 1/{} (redis {} down)", b.instances, b.target),
    };
    for l in shared.rate_limits.all() {
        let tier = l.tier();
        rs.push(vec![
            l.scope.into(),
            l.name.as_str().into(),
            tier.name.as_str().into(),
            tier.describe().split(',').next().unwrap_or("").into(),
            (tier.burst as i64).into(),
            (l.tokens() as i64).into(),
            (l.admitted.load(std::sync::atomic::Ordering::Relaxed) as i64).into(),
            (l.waited.load(std::sync::atomic::Ordering::Relaxed) as i64).into(),
            (l.rejected.load(std::sync::atomic::Ordering::Relaxed) as i64).into(),
            backend.as_str().into(),
        ]);
    }
    rs
}

/// SHOW LISTENERS: shared LISTEN, one row per (database, channel) with the
/// clients listening on it, and whether the database's listener
/// connection to the primary is up.
pub(super) fn listeners(shared: &Shared) -> ResultSet {
    let mut rs = ResultSet::new(&[
        ("database", Text),
        ("channel", Text),
        ("clients", Numeric),
        ("connected", Text),
    ]);
    let dbs = shared.listen.databases();
    for (db, channel, clients) in shared.listen.channels() {
        let up = dbs.get(&db).is_some_and(|d| d.2);
        rs.push(vec![
            db.into(),
            channel.into(),
            (clients as i64).into(),
            if up { "yes" } else { "no" }.into(),
        ]);
    }
    rs
}
