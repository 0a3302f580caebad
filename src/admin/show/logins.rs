//! SHOW AUTH_FAILURES (tidepool): the source addresses whose logins failed
//! lately, as the failed-login throttle (`auth::throttle`) remembers them.

use super::*;

pub(super) fn auth_failures(shared: &Shared) -> ResultSet {
    let mut rs = ResultSet::new(&[
        ("address", Text),
        ("failures", Int4),
        ("last_failure_seconds_ago", Numeric),
        ("blocked", Text),
        ("blocked_seconds_left", Numeric),
    ]);
    let limits = shared.settings().config.throttle_limits();
    let now = crate::clock::mono_ns() / 1000;
    for r in shared.throttle.rows(now, &limits) {
        rs.push(vec![
            r.address.to_string().into(),
            i64::from(r.failures).into(),
            (r.last_failure_ago.as_secs() as i64).into(),
            if r.blocked_for.is_zero() { "no" } else { "yes" }.into(),
            (r.blocked_for.as_secs() as i64).into(),
        ]);
    }
    rs
}
