//! Routing policy: which backend runs a transaction, from its class, the
//! client's hints and wishes, replica health and weights, and
//! read-your-writes; and the accounting of where transactions ran.
//!
//! Invariants: a write never goes to a replica (only reads and read-only
//! transactions are offered one); a replica is chosen only when it is not
//! banned and, with read-your-writes, has replayed past the client's last
//! write. A transaction on a replica counts as outstanding there exactly as
//! long as its [`OnReplica`] guard lives.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use super::Class;
use super::hints::Hint;
use crate::config::schema::{ReplicaFallback, Routing, TransactionRouting};
use crate::health::Health;

/// Where a transaction runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Primary,
    Replica(usize),
    /// A read with no usable replica and `replica_fallback = "error"`.
    NoReplica,
}

/// What the client's next transaction asks for.
#[derive(Debug, Clone, Copy)]
pub struct Request {
    pub class: Class,
    /// A `/* tidepool: … */` hint on its first statement.
    pub hint: Option<Hint>,
    /// `SET tidepool.route = 'primary'`.
    pub forced_primary: bool,
    /// The `BEGIN` tidepool answered itself that it follows, if any.
    pub begun: Begun,
    /// When this client last wrote (`Health::now` time), if it did.
    pub last_write: Option<u64>,
}

/// A transaction block tidepool began for the client (answering its lone
/// `BEGIN` itself) before the request's statement, the first of the block
/// that a server sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Begun {
    /// None: the statement starts its own transaction, or a server has the
    /// block already.
    No,
    /// `BEGIN`: the block may write.
    ReadWrite,
    /// `BEGIN READ ONLY`: the block reads only, unless its first statement
    /// makes it read-write (`SET TRANSACTION READ WRITE`, a write class).
    ReadOnly,
}

/// Whether a statement of `class` after `begun` may start a transaction on
/// a replica (hints aside; after a plain deferred `BEGIN`, [`choose`] asks
/// more). A block begun read-only runs on a replica whole unless its first
/// statement may write: `SET TRANSACTION READ WRITE` or `SERIALIZABLE` (a
/// hot standby refuses both), or a write, which the read-only block refuses
/// on the primary as a replica would (most: `LISTEN` it runs), but a write
/// never goes to a replica. (The session counts a read that calls volatile
/// functions as a read there: the block cannot write.)
pub fn fits_replica(class: Class, begun: Begun) -> bool {
    match begun {
        Begun::ReadOnly => !matches!(class, Class::Write | Class::Begin),
        Begun::No | Begun::ReadWrite => matches!(class, Class::Read | Class::BeginReadOnly),
    }
}

/// The client's routing wish: the custom setting `tidepool.route`.
pub const ROUTE_SETTING: &str = "tidepool.route";

/// The warning owed for a `tidepool.route` value routing does not know
/// (PostgreSQL takes any value of a custom setting, so a misspelt
/// `primary` would silently leave reads on replicas); None for `primary`,
/// `any` and the empty (reset) value, in any case.
pub fn route_setting_warning(value: &str) -> Option<String> {
    let known = ["primary", "any", ""]
        .iter()
        .any(|k| value.trim().eq_ignore_ascii_case(k));
    (!known).then(|| {
        format!(
            "tidepool.route = \"{value}\" is not a route tidepool knows (\"primary\" or \"any\"): it routes as \"any\", reads may go to replicas"
        )
    })
}

/// Whether `sql` may run in an autocommit transaction on a replica: a read,
/// a read-only BEGIN or a neutral statement (`class`), or hinted there (see
/// [`hint`]). The route and a replica's own scan judge each statement of a
/// batch by this one rule, so they never disagree.
pub fn replica_may_run(
    sql: &str,
    classifier: &super::Classifier,
    class: impl FnOnce() -> Class,
) -> bool {
    matches!(class(), Class::Read | Class::BeginReadOnly | Class::Neutral)
        || hint(sql, classifier) == Some(Hint::Replica)
}

/// The `/* tidepool: … */` hint of `sql`, as routing honours it: a replica
/// hint stands for a statement that is a read but for its functions'
/// volatility (what the hint is for: a function the catalog calls
/// VOLATILE that only reads); one the classifier knows writes (INSERT,
/// `nextval`, an advisory lock, `FOR UPDATE`, …) goes to the primary
/// whatever the hint says. A write never reaches a replica.
pub fn hint(sql: &str, classifier: &super::Classifier) -> Option<Hint> {
    match super::hints::hint(sql) {
        Some(Hint::Replica)
            if classifier.would_parse_long(sql)
                || classifier.classify(sql).class == Class::Write =>
        {
            None
        }
        h => h,
    }
}

/// The backend for `req` on a database whose health is `h`.
pub fn choose(h: &Health, routing: &Routing, req: &Request) -> Route {
    let by_first = routing.transaction_routing == TransactionRouting::FirstStatement;
    let wants_replica = match req.hint {
        Some(Hint::Primary) => false,
        Some(Hint::Replica) => true,
        None if req.forced_primary => false,
        // After a deferred BEGIN: SET TRANSACTION READ ONLY makes the
        // transaction read-only; other reads count only when routing by the
        // first statement.
        None => match req.begun {
            Begun::ReadWrite => {
                req.class == Class::BeginReadOnly || (by_first && req.class == Class::Read)
            }
            begun => fits_replica(req.class, begun),
        },
    };
    if h.replicas.is_empty() || !wants_replica || !h.checked.load(Relaxed) {
        return Route::Primary;
    }
    let since = req.last_write.filter(|_| routing.read_your_writes);
    // Least outstanding transactions per unit of weight; ties rotate.
    let load = |r: &crate::health::Backend| {
        (r.outstanding.load(Relaxed) as u64 + 1) * 1000 / u64::from(r.weight)
    };
    let usable = || {
        h.replicas
            .iter()
            .enumerate()
            .filter(|(i, r)| !r.is_banned() && since.is_none_or(|t| h.replica_has_replayed(*i, t)))
            .map(|(i, r)| (i, load(r)))
    };
    // Two passes over the few replicas instead of a list per transaction:
    // the least load and how many share it, then the turn's one of those.
    let (min, ties) = usable().fold((u64::MAX, 0usize), |(min, n), (_, l)| match l.cmp(&min) {
        std::cmp::Ordering::Less => (l, 1),
        std::cmp::Ordering::Equal => (min, n + 1),
        std::cmp::Ordering::Greater => (min, n),
    });
    let best = (ties > 0).then(|| {
        let turn = h.next.fetch_add(1, Relaxed) % ties;
        usable()
            .filter(|(_, l)| *l == min)
            .nth(turn)
            // Loads move under other clients between the passes: then the
            // least loaded now.
            .or_else(|| usable().min_by_key(|(_, l)| *l))
            .map(|(i, _)| i)
    });
    let best = best.flatten();
    match (best, routing.replica_fallback) {
        (Some(i), _) => Route::Replica(i),
        (None, _) if since.is_some() => Route::Primary,
        (None, ReplicaFallback::Primary) => Route::Primary,
        (None, ReplicaFallback::Error) => Route::NoReplica,
    }
}

/// A transaction on replica `i`: outstanding there while this lives.
pub struct OnReplica {
    health: Arc<Health>,
    i: usize,
}

impl OnReplica {
    pub fn new(health: Arc<Health>, i: usize) -> Self {
        if let Some(r) = health.replicas.get(i) {
            r.outstanding.fetch_add(1, Relaxed);
        }
        OnReplica { health, i }
    }

    /// It got a server there: one more read routed to the replica.
    pub fn started(&self) {
        if let Some(r) = self.health.replicas.get(self.i) {
            r.reads.fetch_add(1, Relaxed);
        }
    }

    /// No server could be had there: the replica is avoided until healthy
    /// again.
    pub fn failed(self, why: &str) {
        if let Some(r) = self.health.replicas.get(self.i) {
            r.ban("unreachable", why);
        }
    }
}

impl Drop for OnReplica {
    fn drop(&mut self) {
        if let Some(r) = self.health.replicas.get(self.i) {
            r.outstanding.fetch_sub(1, Relaxed);
        }
    }
}

/// A transaction of `class` ran on the primary: counted as a write (and
/// returned as the client's last write time) or as a read kept there.
pub fn ran_on_primary(h: &Health, class: Class) -> Option<u64> {
    if class >= Class::Begin {
        h.primary.writes.fetch_add(1, Relaxed);
        Some(h.now())
    } else {
        h.primary.reads.fetch_add(1, Relaxed);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(replicas: usize) -> Health {
        let list: Vec<String> = (0..replicas)
            .map(|i| format!("{{ host = \"127.0.0.1\", port = {} }}", 5433 + i))
            .collect();
        let toml = format!(
            "[databases.app]\nhost = \"127.0.0.1\"\nreplicas = [{}]\n",
            list.join(", ")
        );
        let c = crate::Config::from_toml_str(&toml, "t.toml").unwrap();
        let h = Health::new(&c.databases["app"]);
        h.checked.store(true, Relaxed);
        for r in &h.replicas {
            r.banned.store(false, Relaxed);
        }
        h
    }

    fn req(class: Class) -> Request {
        Request {
            class,
            hint: None,
            forced_primary: false,
            begun: Begun::No,
            last_write: None,
        }
    }

    #[test]
    fn writes_never_go_to_a_replica() {
        let h = health(2);
        let routing = Routing::default();
        for class in [Class::Write, Class::Begin, Class::Neutral] {
            assert_eq!(choose(&h, &routing, &req(class)), Route::Primary);
        }
        for class in [Class::Read, Class::BeginReadOnly] {
            assert!(matches!(
                choose(&h, &routing, &req(class)),
                Route::Replica(_)
            ));
        }
    }

    #[test]
    fn a_deferred_read_only_block_goes_where_its_first_statement_may_run() {
        let h = health(2);
        let routing = Routing::default();
        let after = |begun, class| {
            let mut r = req(class);
            r.begun = begun;
            choose(&h, &routing, &r)
        };
        for class in [Class::Read, Class::Neutral, Class::BeginReadOnly] {
            assert!(matches!(after(Begun::ReadOnly, class), Route::Replica(_)));
        }
        // SET TRANSACTION READ WRITE (or SERIALIZABLE) is a write.
        for class in [Class::Write, Class::Begin] {
            assert_eq!(after(Begun::ReadOnly, class), Route::Primary);
        }
        // After a plain BEGIN only SET TRANSACTION READ ONLY goes (routing
        // by the whole transaction, the default).
        assert!(matches!(
            after(Begun::ReadWrite, Class::BeginReadOnly),
            Route::Replica(_)
        ));
        for class in [Class::Read, Class::Neutral, Class::Write] {
            assert_eq!(after(Begun::ReadWrite, class), Route::Primary);
        }
        let mut forced = req(Class::Read);
        forced.begun = Begun::ReadOnly;
        forced.forced_primary = true;
        assert_eq!(choose(&h, &routing, &forced), Route::Primary);
    }

    #[test]
    fn only_unknown_route_values_are_warned_of() {
        for ok in ["primary", "Primary", " PRIMARY ", "any", ""] {
            assert_eq!(route_setting_warning(ok), None, "{ok:?}");
        }
        for bad in ["prmary", "replica", "primary;", "on"] {
            assert!(route_setting_warning(bad).is_some(), "{bad:?}");
        }
    }

    #[test]
    fn hints_wishes_health_and_fallback() {
        let h = health(1);
        let mut routing = Routing::default();
        let mut r = req(Class::Read);
        r.forced_primary = true;
        assert_eq!(choose(&h, &routing, &r), Route::Primary);
        r.hint = Some(Hint::Replica);
        assert_eq!(choose(&h, &routing, &r), Route::Replica(0));
        let mut w = req(Class::Read);
        w.hint = Some(Hint::Primary);
        assert_eq!(choose(&h, &routing, &w), Route::Primary);
        h.replicas[0].banned.store(true, Relaxed);
        assert_eq!(choose(&h, &routing, &req(Class::Read)), Route::Primary);
        routing.replica_fallback = ReplicaFallback::Error;
        assert_eq!(choose(&h, &routing, &req(Class::Read)), Route::NoReplica);
        h.checked.store(false, Relaxed);
        assert_eq!(choose(&h, &routing, &req(Class::Read)), Route::Primary);
    }

    #[test]
    fn a_client_that_wrote_reads_from_the_primary_until_replayed() {
        let h = health(1);
        let routing = Routing::default();
        let mut r = req(Class::Read);
        r.last_write = ran_on_primary(&h, Class::Write);
        assert!(r.last_write.is_some());
        assert_eq!(choose(&h, &routing, &r), Route::Primary);
        assert_eq!(ran_on_primary(&h, Class::Read), None);
    }

    #[test]
    fn the_guard_counts_a_replica_transaction_while_it_lives() {
        let h = Arc::new(health(2));
        let g = OnReplica::new(h.clone(), 1);
        g.started();
        assert_eq!(h.replicas[1].outstanding.load(Relaxed), 1);
        // The least loaded replica is chosen next.
        assert_eq!(
            choose(&h, &Routing::default(), &req(Class::Read)),
            Route::Replica(0)
        );
        drop(g);
        assert_eq!(h.replicas[1].outstanding.load(Relaxed), 0);
        assert_eq!(h.replicas[1].reads.load(Relaxed), 1);
        OnReplica::new(h.clone(), 0).failed("test");
        assert!(h.replicas[0].is_banned());
        assert_eq!(h.replicas[0].outstanding.load(Relaxed), 0);
    }
}
