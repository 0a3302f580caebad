//! SHOW RATE_LIMITS (tidepool): each user's and database's rate limiter,
//! its tier and what it admitted, made wait and refused.

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
