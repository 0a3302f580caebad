//! `SHOW ...`: every result set of the console, built from live state.
//! Columns are PgBouncer's with PgBouncer's types; `SHOW STATS` keeps
//! PgBouncer 1.18's 15 columns first, in order, then the newer PgBouncer
//! columns. tidepool's own columns come after them, and legacy names old
//! exporters still read (`total_requests`, `requests`, `reserve_pool`) last.
//!
//! A database with replicas has one row per backend: the primary under the
//! database's name, replica `i` (from 1) as `NAME@replicaI`, with
//! `backend_role` and `backend` columns saying which is which.
//!
//! `SHOW` is parsed into [`Show`]; one file per family of result sets, this
//! one for what they share.

mod advice;
mod connections;
mod health;
mod limits;
mod logins;
mod memory;
mod pools;
mod queries;
mod settings;
mod stats;

pub use advice::{Advice, advise};
use connections::{clients, leaks, servers};
use health::{health, replicas};
use limits::{listeners, rate_limits};
use logins::auth_failures;
use memory::mem;
use pools::pools;
pub use pools::recommendation;
use queries::{queries, slow_queries};
use settings::{config, databases, lists, state, users};
use stats::{stats, stats_averages, stats_totals, totals};

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::SystemTime;

use bytes::BytesMut;

use super::AdminError;
use super::output::{ResultSet, Type, Value, command_complete, notice};
use crate::client::Shared;
use crate::snapshot::{self, TrafficRow};
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

/// What `SHOW` can show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Show {
    Help,
    Stats,
    StatsTotals,
    StatsAverages,
    Totals,
    Pools,
    Clients,
    Servers,
    Databases,
    Users,
    Config,
    Lists,
    Version,
    State,
    Queries,
    SlowQueries,
    Health,
    Replicas,
    AuthFailures,
    RateLimits,
    Mem,
    Listeners,
    Leaks,
    Advice,
}

impl Show {
    /// From the (upper-cased) word after SHOW.
    pub fn parse(what: &str) -> Option<Show> {
        Some(match what {
            "HELP" => Show::Help,
            "STATS" => Show::Stats,
            "STATS_TOTALS" => Show::StatsTotals,
            "STATS_AVERAGES" => Show::StatsAverages,
            "TOTALS" => Show::Totals,
            "POOLS" => Show::Pools,
            "CLIENTS" => Show::Clients,
            "SERVERS" => Show::Servers,
            "DATABASES" => Show::Databases,
            "USERS" => Show::Users,
            "CONFIG" => Show::Config,
            "LISTS" => Show::Lists,
            "VERSION" => Show::Version,
            "STATE" => Show::State,
            "QUERIES" => Show::Queries,
            "SLOW_QUERIES" => Show::SlowQueries,
            "HEALTH" => Show::Health,
            "REPLICAS" => Show::Replicas,
            "AUTH_FAILURES" => Show::AuthFailures,
            "RATE_LIMITS" => Show::RateLimits,
            "MEM" => Show::Mem,
            "LISTENERS" => Show::Listeners,
            "LEAKS" => Show::Leaks,
            "ADVICE" => Show::Advice,
            _ => return None,
        })
    }

    /// The rows (None: HELP, which is a NOTICE).
    fn rows(self, shared: &Shared) -> Option<ResultSet> {
        Some(match self {
            Show::Help => return None,
            Show::Stats => stats(shared),
            Show::StatsTotals => stats_totals(shared),
            Show::StatsAverages => stats_averages(shared),
            Show::Totals => totals(shared),
            Show::Pools => pools(shared),
            Show::Clients => clients(shared),
            Show::Servers => servers(shared),
            Show::Databases => databases(shared),
            Show::Users => users(shared),
            Show::Config => config(shared),
            Show::Lists => lists(shared),
            Show::Version => {
                let mut rs = ResultSet::new(&[("version", Text)]);
                rs.push(vec![VERSION.into()]);
                rs
            }
            Show::State => state(shared),
            Show::Queries => queries(shared),
            Show::SlowQueries => slow_queries(shared),
            Show::Health => health(shared),
            Show::Replicas => replicas(shared),
            Show::AuthFailures => auth_failures(shared),
            Show::RateLimits => rate_limits(shared),
            Show::Mem => mem(shared),
            Show::Listeners => listeners(shared),
            Show::Leaks => leaks(shared),
            Show::Advice => advice::advice(shared),
        })
    }
}

pub fn show(shared: &Shared, what: &str, out: &mut BytesMut) -> Result<(), AdminError> {
    let Some(which) = Show::parse(what) else {
        return Err(AdminError::Syntax(format!("SHOW {what}")));
    };
    match which.rows(shared) {
        Some(rs) => rs.write(out, "SHOW"),
        None => {
            notice(out, "Console usage", Some(HELP));
            command_complete(out, "SHOW");
        }
    }
    Ok(())
}

pub const VERSION: &str = concat!(
    "tidepool ",
    env!("CARGO_PKG_VERSION"),
    ", compatible with PgBouncer 1.25.0"
);

const HELP: &str = "\
SHOW HELP|CONFIG|DATABASES|POOLS|CLIENTS|SERVERS|USERS|VERSION|STATE
SHOW STATS|STATS_TOTALS|STATS_AVERAGES|TOTALS|LISTS|MEM
SHOW QUERIES|SLOW_QUERIES|HEALTH|REPLICAS|AUTH_FAILURES|RATE_LIMITS|LISTENERS|LEAKS|ADVICE   (tidepool)
SET key = arg   (accepted and ignored)
RELOAD
PAUSE [<db>]
RESUME [<db>]
KILL [<db>]
SHUTDOWN
SHUTDOWN WAIT_FOR_CLIENTS";

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

/// The `status` column of a backend's rows: `down: <kind>: <detail>` while
/// its health checks fail (the server's own message and SQLSTATE when it
/// gave one), else what its statement statistics say. Without health checks
/// (no replicas) the pools' own attempts tell: for a database's row, only a
/// server that cannot be reached (one user's refused login is that user's
/// pool's problem); for a pool's row (`pool`), that pool's last failure.
fn backend_status(
    shared: &Shared,
    db: &str,
    backend: usize,
    stats_status: &str,
    pool: Option<&crate::pool::Pool>,
) -> String {
    let problem = shared.registry.health(db).and_then(|h| {
        if backend == 0 {
            h.primary.problem()
        } else {
            h.replicas.get(backend - 1).and_then(|r| r.problem())
        }
    });
    let failure = || match pool {
        Some(p) => p.connect_failure(),
        None => shared
            .registry
            .pools()
            .iter()
            .filter(|p| p.database == db && p.backend == backend)
            .filter_map(|p| p.connect_failure())
            .find(|f| !f.login_refused),
    };
    match problem {
        Some(p) => format!("down: {p}"),
        None => match failure() {
            Some(f) => format!("down: {f}"),
            None => stats_status.to_owned(),
        },
    }
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
