//! Health of each backend of a database: a checker task per database keeps,
//! for the primary, a short history of its WAL position, and for each
//! replica whether it is reachable, still a replica, how far behind it is
//! (bytes and seconds) and up to which primary sample it has replayed.
//! Routing reads these atomics; nothing here is on the query path.
//!
//! Invariants: a replica starts banned and is used only after a successful
//! check; it is banned when unreachable, promoted, or lagging more than
//! `max_replica_lag`, and unbanned after `UNBAN_AFTER` healthy checks in a row.

mod checker;
pub mod tls;

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

pub use checker::{HealthCredentials, spawn_checker};

/// Healthy checks in a row before a banned replica is used again.
pub const UNBAN_AFTER: u32 = 2;

/// One backend (the primary or a replica) as routing sees it.
#[derive(Debug)]
pub struct Backend {
    pub host: String,
    pub port: u16,
    pub weight: u32,
    pub banned: AtomicBool,
    streak: AtomicU32,
    /// Transactions running on it now (for least-outstanding balancing).
    pub outstanding: AtomicUsize,
    /// Replication lag in milliseconds and bytes (replicas), as of the last
    /// check that measured it; [`LAG_UNKNOWN`] before the first and after a
    /// failed one (see [`Backend::lag`]).
    pub lag_ms: AtomicU64,
    pub lag_bytes: AtomicU64,
    /// Nanoseconds since `Health::epoch` of the newest primary sample this
    /// replica has replayed (read-your-writes); 0 = none yet.
    pub caught_up_to: AtomicU64,
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub bans: AtomicU64,
    /// Why the backend is unhealthy now (None: healthy, or not checked yet).
    problem: Mutex<Option<Problem>>,
}

/// What `Backend::lag_ms` holds while the lag is not known.
pub const LAG_UNKNOWN: u64 = u64::MAX;

/// Why a backend is unhealthy: a category for metrics and the words for
/// people (the server's own message and SQLSTATE when it gave one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Low-cardinality label: `unreachable`, `login_failed`,
    /// `check_failed`, `promoted`, `lagging`, `in_recovery`.
    pub kind: &'static str,
    pub detail: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind, self.detail)
    }
}

impl Backend {
    fn new(host: &str, port: u16, weight: u32, banned: bool) -> Self {
        Self {
            host: host.to_owned(),
            port,
            weight: weight.max(1),
            banned: AtomicBool::new(banned),
            streak: AtomicU32::new(0),
            outstanding: AtomicUsize::new(0),
            // A replica starts unchecked: its lag unknown.
            lag_ms: AtomicU64::new(if banned { LAG_UNKNOWN } else { 0 }),
            lag_bytes: AtomicU64::new(if banned { LAG_UNKNOWN } else { 0 }),
            caught_up_to: AtomicU64::new(0),
            reads: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            bans: AtomicU64::new(0),
            problem: Mutex::new(if banned {
                Some(Problem {
                    kind: "unchecked",
                    detail: "no successful health check yet".into(),
                })
            } else {
                None
            }),
        }
    }

    /// Why the backend is unhealthy now, if it is.
    pub fn problem(&self) -> Option<Problem> {
        self.problem
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn set_problem(&self, p: Option<Problem>) {
        *self
            .problem
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = p;
    }

    /// Takes over `old`'s state (the same server, a reload restarted its
    /// checker): in use or banned, why, its lag and its counts. A replica
    /// used to start banned again, out of use until checked twice. Not
    /// `caught_up_to`, which counts from the old `Health`'s epoch: until
    /// the next check, read-your-writes sends reads after a write to the
    /// primary.
    fn inherit(&self, old: &Backend) {
        for (new, old) in [
            (&self.lag_ms, &old.lag_ms),
            (&self.lag_bytes, &old.lag_bytes),
            (&self.reads, &old.reads),
            (&self.writes, &old.writes),
            (&self.bans, &old.bans),
        ] {
            new.store(old.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        self.streak
            .store(old.streak.load(Ordering::Relaxed), Ordering::Relaxed);
        self.banned.store(old.is_banned(), Ordering::Relaxed);
        self.set_problem(old.problem());
    }

    /// The replication lag (ms, bytes) as last measured; None when it is not
    /// known now (never checked, or the last check failed: a last value
    /// would pass for the current one).
    pub fn lag(&self) -> Option<(u64, u64)> {
        // Both read as unknown when either is: a check that fails between
        // the two loads must not pair a measured ms with unknown bytes.
        match (
            self.lag_ms.load(Ordering::Relaxed),
            self.lag_bytes.load(Ordering::Relaxed),
        ) {
            (LAG_UNKNOWN, _) | (_, LAG_UNKNOWN) => None,
            known => Some(known),
        }
    }

    /// Its check measured this lag (ms, bytes).
    pub fn set_lag(&self, ms: u64, bytes: u64) {
        self.lag_ms.store(ms, Ordering::Relaxed);
        self.lag_bytes.store(bytes, Ordering::Relaxed);
    }

    /// Its check failed: the lag is no longer known.
    pub fn lag_unknown(&self) {
        self.set_lag(LAG_UNKNOWN, LAG_UNKNOWN);
    }

    /// It answered as a primary: no replication lag to speak of (0 for the
    /// writer, as the primary shows) or none known (a promoted replica that
    /// is not the writer: it follows no one).
    pub fn is_a_primary(&self, writer: bool) {
        if writer {
            self.set_lag(0, 0);
        } else {
            self.lag_unknown();
        }
    }

    /// Records a failed check of the primary (it is never avoided: shown
    /// down, with why).
    pub fn primary_failed(&self, problem: Problem) {
        self.banned.store(true, Ordering::Relaxed);
        self.set_problem(Some(problem));
    }

    /// Records a good check of the primary.
    pub fn primary_ok(&self) {
        self.banned.store(false, Ordering::Relaxed);
        self.set_problem(None);
    }

    pub fn is_banned(&self) -> bool {
        self.banned.load(Ordering::Relaxed)
    }

    /// Bans now (failed check, failed checkout, lag), saying why.
    pub fn ban(&self, kind: &'static str, detail: &str) {
        self.streak.store(0, Ordering::Relaxed);
        self.set_problem(Some(Problem {
            kind,
            detail: detail.to_owned(),
        }));
        if !self.banned.swap(true, Ordering::Relaxed) {
            self.bans.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(backend = %format!("{}:{}", self.host, self.port), reason = kind, detail, "replica banned");
        }
    }

    /// Records a healthy check; unbans after enough in a row.
    fn healthy(&self) {
        let streak = self.streak.fetch_add(1, Ordering::Relaxed) + 1;
        if streak >= UNBAN_AFTER && self.banned.swap(false, Ordering::Relaxed) {
            // Replicas start out of use until checked: only a ban lifted is
            // an unban.
            let backend = format!("{}:{}", self.host, self.port);
            tracing::info!(%backend, "{}", in_use_again(self.bans.load(Ordering::Relaxed)));
        }
        if !self.banned.load(Ordering::Relaxed) {
            self.set_problem(None);
        }
    }
}

/// What the log says when a replica comes into use: replicas start out
/// of use until checked, and only a ban lifted (`bans` > 0) is an unban.
fn in_use_again(bans: u64) -> &'static str {
    if bans == 0 {
        "replica checked healthy: reads may go there"
    } else {
        "replica unbanned"
    }
}

/// Health of one database's backends.
#[derive(Debug)]
pub struct Health {
    epoch: Instant,
    pub primary: Backend,
    pub replicas: Vec<Backend>,
    /// Recent primary samples: (nanos since epoch, WAL LSN).
    history: Mutex<VecDeque<(u64, u64)>>,
    /// False until the checks have run long enough to judge the replicas
    /// (`UNBAN_AFTER` rounds: a replica's lag needs the primary's earlier
    /// samples), or when none can run: reads go to the primary meanwhile,
    /// whatever `replica_fallback` says (a replica not yet judged is not a
    /// failed one).
    pub checked: AtomicBool,
    /// Rotates ties between equally loaded replicas.
    pub next: AtomicUsize,
    /// The primary's function volatilities, once the checker loaded them
    /// (until then a read that calls a function stays on the primary).
    pub functions: arc_swap::ArcSwapOption<crate::router::Functions>,
    /// DDL went through tidepool since `functions` was loaded: the checker
    /// loads them again at its next round.
    pub functions_stale: AtomicBool,
    /// Fingerprints of reads a replica refused as writes (25006): they go
    /// to the primary from then on. Bounded by `MISROUTES_KEPT`.
    misrouted: Mutex<std::collections::HashSet<u64>>,
    any_misrouted: AtomicBool,
    /// The backend that takes writes: 0, the configured primary, or `i + 1`
    /// when replica `i` was promoted and `failover = "auto"` moved writes
    /// there. Only the checker changes it.
    writer: AtomicUsize,
    /// Backends never to take writes again without a RELOAD (bit `k`:
    /// backend `k`): a second primary seen beside the writer, and a writer
    /// that writes moved away from (it may have diverged).
    fenced: AtomicU64,
    /// Times writes moved to another backend.
    pub failovers: AtomicU64,
}

/// Fingerprints of misrouted statements kept per database (the set starts
/// again when full: a statement forgotten gets one more retry).
const MISROUTES_KEPT: usize = 10_000;

impl Health {
    pub fn new(db: &crate::config::Database) -> Self {
        Self {
            epoch: Instant::now(),
            primary: Backend::new(&db.host, db.port, 1, false),
            replicas: db
                .replicas
                .iter()
                .map(|r| Backend::new(&r.host, r.port, r.weight, true))
                .collect(),
            history: Mutex::new(VecDeque::new()),
            checked: AtomicBool::new(false),
            next: AtomicUsize::new(0),
            functions: arc_swap::ArcSwapOption::empty(),
            functions_stale: AtomicBool::new(true),
            misrouted: Mutex::new(std::collections::HashSet::new()),
            any_misrouted: AtomicBool::new(false),
            writer: AtomicUsize::new(0),
            fenced: AtomicU64::new(0),
            failovers: AtomicU64::new(0),
        }
    }

    /// Keeps where writes go, and each backend's state, across a RELOAD
    /// that left the backends as they were (`old` checked the same
    /// servers): a reload must not send writes back to a fenced former
    /// primary, nor take healthy replicas out of use.
    pub fn inherit(&self, old: &Health) {
        let same = self.primary.host == old.primary.host
            && self.primary.port == old.primary.port
            && self.replicas.len() == old.replicas.len()
            && self
                .replicas
                .iter()
                .zip(&old.replicas)
                .all(|(a, b)| a.host == b.host && a.port == b.port);
        if same {
            self.primary.inherit(&old.primary);
            for (new, old) in self.replicas.iter().zip(&old.replicas) {
                new.inherit(old);
            }
            self.checked
                .store(old.checked.load(Ordering::Relaxed), Ordering::Relaxed);
            self.writer.store(old.writer(), Ordering::Relaxed);
            self.fenced
                .store(old.fenced.load(Ordering::Relaxed), Ordering::Relaxed);
            self.failovers
                .store(old.failovers.load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }

    /// The fenced backends (bit `k`: backend `k`).
    pub fn fenced(&self) -> u64 {
        self.fenced.load(Ordering::Relaxed)
    }

    /// Whether backend `k` (0: the configured primary, `i + 1`: replica
    /// `i`) is fenced: a failover moved writes away from it.
    pub fn is_fenced(&self, k: usize) -> bool {
        k < 64 && self.fenced() & (1 << k) != 0
    }

    /// The backend that takes writes now (0: the configured primary,
    /// `i + 1`: replica `i`, promoted).
    pub fn writer(&self) -> usize {
        self.writer.load(Ordering::Relaxed)
    }

    /// Backend `k`: 0 the configured primary, `i + 1` replica `i` (the
    /// primary for an index out of range).
    pub fn backend(&self, k: usize) -> &Backend {
        match k {
            0 => &self.primary,
            i => self.replicas.get(i - 1).unwrap_or(&self.primary),
        }
    }

    /// The writer's backend record.
    pub fn writer_backend(&self) -> &Backend {
        self.backend(self.writer())
    }

    /// Whether any statement was found misrouted (then fingerprints are
    /// worth computing at routing).
    pub fn any_misrouted(&self) -> bool {
        self.any_misrouted.load(Ordering::Relaxed)
    }

    /// Whether the statement with this fingerprint was found misrouted.
    pub fn misrouted(&self, fingerprint: u64) -> bool {
        self.any_misrouted()
            && self
                .misrouted
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .contains(&fingerprint)
    }

    /// Remembers a misrouted statement; true the first time.
    pub fn remember_misrouted(&self, fingerprint: u64) -> bool {
        let mut set = self
            .misrouted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if set.len() >= MISROUTES_KEPT {
            set.clear();
        }
        self.any_misrouted.store(true, Ordering::Relaxed);
        set.insert(fingerprint)
    }

    /// Nanoseconds since this health record began.
    pub fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Whether replica `i` has replayed everything the primary had at `since`
    /// (nanos since epoch).
    pub fn replica_has_replayed(&self, i: usize, since: u64) -> bool {
        self.replicas
            .get(i)
            .is_some_and(|r| r.caught_up_to.load(Ordering::Relaxed) > since)
    }

    fn record_primary(&self, lsn: u64, keep_nanos: u64) {
        let now = self.now();
        let mut h = self
            .history
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        h.push_back((now, lsn));
        while h.len() > 2 && h.front().is_some_and(|(t, _)| now - t > keep_nanos) {
            h.pop_front();
        }
    }

    /// From a replica's replay position: (newest primary sample time it has
    /// replayed, lag in nanos, lag in bytes).
    fn replica_position(&self, replay: u64) -> (u64, u64, u64) {
        let now = self.now();
        let h = self
            .history
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let caught_up = h
            .iter()
            .rev()
            .find(|(_, lsn)| *lsn <= replay)
            .map_or(0, |(t, _)| *t);
        let newest = h.back().map_or(0, |(_, l)| *l);
        let lag_bytes = newest.saturating_sub(replay);
        let lag = h
            .iter()
            .find(|(_, lsn)| *lsn > replay)
            .map_or(0, |(t, _)| now.saturating_sub(*t));
        (caught_up, lag, lag_bytes)
    }
}

/// Where writes go once the writer has failed enough rounds in a row:
/// `writable[k]` says whether backend `k` (0 the configured primary, `i + 1`
/// replica `i`) answered and is not in recovery; `fenced` (bit `k`) are
/// never chosen. The writer stays while it is writable; otherwise the first
/// writable backend that is not fenced takes over; with none, nothing
/// changes (writes fail until one is). Pure, for the checker and its tests.
pub fn next_writer(writer: usize, writable: &[bool], fenced: u64) -> usize {
    if writable.get(writer).copied().unwrap_or(false) {
        return writer;
    }
    writable
        .iter()
        .enumerate()
        .position(|(k, w)| *w && (k >= 64 || fenced & (1 << k) == 0))
        .unwrap_or(writer)
}

/// `X/Y` text LSN to a number.
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lag_half_stored_reads_as_unknown() {
        let r = Backend::new("h", 1, 1, true);
        assert_eq!(r.lag(), None, "a replica starts unknown");
        r.lag_ms.store(5, Ordering::Relaxed);
        r.lag_bytes.store(700, Ordering::Relaxed);
        assert_eq!(r.lag(), Some((5, 700)));
        // A failed check seen halfway (bytes already unknown, ms not yet).
        r.lag_bytes.store(LAG_UNKNOWN, Ordering::Relaxed);
        assert_eq!(r.lag(), None);
        r.lag_unknown();
        assert_eq!(r.lag(), None);
        assert_eq!(
            Backend::new("p", 1, 1, false).lag(),
            Some((0, 0)),
            "primary"
        );
    }

    #[test]
    fn a_replica_first_checked_is_not_said_to_be_unbanned() {
        assert!(!in_use_again(0).contains("unbanned"));
        assert_eq!(in_use_again(1), "replica unbanned");
    }

    #[test]
    fn writes_move_only_from_a_writer_that_cannot_take_them() {
        // The primary is fine: it stays, even with a promoted replica
        // beside it (split brain is reported, not followed).
        assert_eq!(next_writer(0, &[true, true, false], 0), 0);
        // The primary is down, replica 1 (backend 2) was promoted.
        assert_eq!(next_writer(0, &[false, false, true], 0), 2);
        // Nothing writable: no move.
        assert_eq!(next_writer(0, &[false, false, false], 0), 0);
        // The promoted one stays even when the old primary comes back.
        assert_eq!(next_writer(2, &[true, false, true], 0b001), 2);
        // It failed; the old primary is a primary again but fenced (writes
        // moved away from it): no move back without a RELOAD.
        assert_eq!(next_writer(2, &[true, false, false], 0b001), 2);
        // A fenced second primary is never chosen; another one may be.
        assert_eq!(next_writer(0, &[false, true, true], 0b010), 2);
    }

    #[test]
    fn lsn_parsing() {
        assert_eq!(parse_lsn("0/3000060"), Some(0x3000060));
        assert_eq!(parse_lsn("1/0"), Some(1 << 32));
        assert_eq!(parse_lsn("x"), None);
    }

    #[test]
    fn replica_position_from_history() {
        let db: crate::config::Database =
            toml::from_str("host = \"h\"\nreplicas = [{ host = \"r\" }]").unwrap();
        let h = Health::new(&db);
        h.record_primary(100, u64::MAX);
        let t1 = h.history.lock().unwrap().back().unwrap().0;
        h.record_primary(200, u64::MAX);
        let (caught, _, bytes) = h.replica_position(150);
        assert_eq!(caught, t1);
        assert_eq!(bytes, 50);
        let (_, lag, bytes) = h.replica_position(200);
        assert_eq!((lag, bytes), (0, 0));
        assert!(h.replicas[0].is_banned(), "replicas start banned");
    }

    #[test]
    fn a_reload_keeps_the_replicas_state_when_they_are_the_same() {
        let db: crate::config::Database =
            toml::from_str("host = \"h\"\nreplicas = [{ host = \"r\" }, { host = \"s\" }]")
                .unwrap();
        let old = Health::new(&db);
        for _ in 0..UNBAN_AFTER {
            old.replicas[0].healthy();
        }
        old.replicas[0].reads.store(7, Ordering::Relaxed);
        old.replicas[1].ban("lagging", "10 s behind");
        old.checked.store(true, Ordering::Relaxed);
        let new = Health::new(&db);
        new.inherit(&old);
        assert!(!new.replicas[0].is_banned(), "in use, as it was");
        assert!(new.checked.load(Ordering::Relaxed), "checked, as it was");
        assert_eq!(new.replicas[0].reads.load(Ordering::Relaxed), 7);
        assert!(new.replicas[1].is_banned());
        assert_eq!(new.replicas[1].problem().map(|p| p.kind), Some("lagging"));
        // Other servers: checked afresh.
        let moved: crate::config::Database =
            toml::from_str("host = \"h\"\nreplicas = [{ host = \"t\" }, { host = \"s\" }]")
                .unwrap();
        let fresh = Health::new(&moved);
        fresh.inherit(&old);
        assert!(
            fresh.replicas[0].is_banned(),
            "a new server starts unchecked"
        );
    }
}
