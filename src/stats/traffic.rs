//! Traffic totals of one backend of one database (what `SHOW STATS` shows),
//! and their averages over the last `stats_period`.
//!
//! Invariant: totals only grow (atomics, updated once per transaction by the
//! session that ran it); averages are recomputed by the stats ticker alone.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::histogram::{AtomicBuckets, BucketsSnapshot};

/// Stripes per counter set: each worker thread writes its own (see
/// [`super::stripe_of`]), so the hot path does not bounce cache lines
/// between cores and adds without locked instructions; readers add the
/// stripes up.
const STRIPES: usize = 8;

/// One thread's share of the counters. Times are microseconds.
#[derive(Default)]
#[repr(align(128))]
struct Stripe {
    server_assignments: AtomicU64,
    xacts: AtomicU64,
    queries: AtomicU64,
    received: AtomicU64,
    sent: AtomicU64,
    xact_us: AtomicU64,
    query_us: AtomicU64,
    wait_us: AtomicU64,
    client_parses: AtomicU64,
    server_parses: AtomicU64,
    binds: AtomicU64,
    logins: AtomicU64,
    statements: AtomicU64,
    errors: AtomicU64,
    slow: AtomicU64,
    prepared_invalidations: AtomicU64,
    prepared_reprepares: AtomicU64,
    misroute_retries: AtomicU64,
    query_latency: AtomicBuckets,
    xact_latency: AtomicBuckets,
    wait_latency: AtomicBuckets,
}

/// Counters of one (database, backend).
#[derive(Default)]
pub struct Traffic {
    stripes: [Stripe; STRIPES],
    averages: Mutex<Averages>,
}

/// Latency histograms of one (database, backend).
#[derive(Debug, Clone, Copy, Default)]
pub struct Latencies {
    pub statement: BucketsSnapshot,
    pub transaction: BucketsSnapshot,
    pub wait: BucketsSnapshot,
}

/// A plain copy of the counters.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Totals {
    pub server_assignments: u64,
    pub xacts: u64,
    pub queries: u64,
    pub received: u64,
    pub sent: u64,
    pub xact_us: u64,
    pub query_us: u64,
    pub wait_us: u64,
    pub client_parses: u64,
    pub server_parses: u64,
    pub binds: u64,
    pub logins: u64,
    pub statements: u64,
    pub errors: u64,
    pub slow: u64,
    /// Shared server-side statements found stale (a server answered one with
    /// `cached plan must not change result type`).
    pub prepared_invalidations: u64,
    /// Stale statements closed and prepared afresh on a server.
    pub prepared_reprepares: u64,
    /// Reads a replica refused as writes (25006), run again on the primary.
    pub misroute_retries: u64,
}

/// PgBouncer's `avg_*`: counts and bytes per second over the last period,
/// times per transaction / query / assignment in that period.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Averages {
    pub server_assignments: u64,
    pub xacts: u64,
    pub queries: u64,
    pub received: u64,
    pub sent: u64,
    pub xact_us: u64,
    pub query_us: u64,
    pub wait_us: u64,
    pub client_parses: u64,
    pub server_parses: u64,
    pub binds: u64,
    pub logins: u64,
    last: Option<(Instant, Totals)>,
}

/// What one transaction adds, summed locally and applied once.
#[derive(Debug, Default, Clone, Copy)]
pub struct Delta {
    pub xacts: u64,
    pub queries: u64,
    pub received: u64,
    pub sent: u64,
    pub xact_us: u64,
    pub query_us: u64,
    pub client_parses: u64,
    pub server_parses: u64,
    pub binds: u64,
    pub statements: u64,
    pub errors: u64,
    pub slow: u64,
    pub prepared_invalidations: u64,
    pub prepared_reprepares: u64,
    pub misroute_retries: u64,
}

/// This thread's stripe and whether it writes it alone.
struct Writer<'a> {
    s: &'a Stripe,
    owned: bool,
}

impl Writer<'_> {
    fn add(&self, a: impl Fn(&Stripe) -> &AtomicU64, v: u64) {
        if v > 0 {
            super::bump(a(self.s), v, self.owned);
        }
    }
}

impl Traffic {
    fn stripe(&self) -> Writer<'_> {
        let (i, owned) = super::stripe_of(STRIPES);
        Writer {
            s: &self.stripes[i],
            owned,
        }
    }

    pub fn apply(&self, d: &Delta) {
        let s = self.stripe();
        s.add(|s| &s.xacts, d.xacts);
        s.add(|s| &s.queries, d.queries);
        s.add(|s| &s.received, d.received);
        s.add(|s| &s.sent, d.sent);
        s.add(|s| &s.xact_us, d.xact_us);
        s.add(|s| &s.query_us, d.query_us);
        s.add(|s| &s.client_parses, d.client_parses);
        s.add(|s| &s.server_parses, d.server_parses);
        s.add(|s| &s.binds, d.binds);
        s.add(|s| &s.statements, d.statements);
        s.add(|s| &s.errors, d.errors);
        s.add(|s| &s.slow, d.slow);
        s.add(|s| &s.prepared_invalidations, d.prepared_invalidations);
        s.add(|s| &s.prepared_reprepares, d.prepared_reprepares);
        s.add(|s| &s.misroute_retries, d.misroute_retries);
    }

    /// A server was handed to a client after `wait`.
    pub fn assigned(&self, wait: Duration) {
        let us = wait.as_micros() as u64;
        let s = self.stripe();
        s.add(|s| &s.server_assignments, 1);
        s.add(|s| &s.wait_us, us);
        s.s.wait_latency.record(us, s.owned);
    }

    pub fn login(&self) {
        self.stripe().add(|s| &s.logins, 1);
    }

    pub fn statement_latency(&self, us: u64) {
        let s = self.stripe();
        s.s.query_latency.record(us, s.owned);
    }

    pub fn transaction_latency(&self, us: u64) {
        let s = self.stripe();
        s.s.xact_latency.record(us, s.owned);
    }

    pub fn latencies(&self) -> Latencies {
        let mut l = Latencies::default();
        for s in &self.stripes {
            l.statement.merge(&s.query_latency.snapshot());
            l.transaction.merge(&s.xact_latency.snapshot());
            l.wait.merge(&s.wait_latency.snapshot());
        }
        l
    }

    pub fn totals(&self) -> Totals {
        let mut t = Totals::default();
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        for s in &self.stripes {
            t.add(&Totals {
                server_assignments: g(&s.server_assignments),
                xacts: g(&s.xacts),
                queries: g(&s.queries),
                received: g(&s.received),
                sent: g(&s.sent),
                xact_us: g(&s.xact_us),
                query_us: g(&s.query_us),
                wait_us: g(&s.wait_us),
                client_parses: g(&s.client_parses),
                server_parses: g(&s.server_parses),
                binds: g(&s.binds),
                logins: g(&s.logins),
                statements: g(&s.statements),
                errors: g(&s.errors),
                slow: g(&s.slow),
                prepared_invalidations: g(&s.prepared_invalidations),
                prepared_reprepares: g(&s.prepared_reprepares),
                misroute_retries: g(&s.misroute_retries),
            });
        }
        t
    }

    pub fn averages(&self) -> Averages {
        *self.averages.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Recomputes the averages from the change since the last call.
    pub fn roll(&self, now: Instant) {
        let cur = self.totals();
        let mut avg = self.averages.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((then, prev)) = avg.last {
            let secs = now.duration_since(then).as_secs_f64().max(1e-3);
            let rate = |a: u64, b: u64| ((a.saturating_sub(b)) as f64 / secs).round() as u64;
            let per = |t: u64, pt: u64, n: u64, pn: u64| {
                let n = n.saturating_sub(pn);
                t.saturating_sub(pt).checked_div(n).unwrap_or(0)
            };
            *avg = Averages {
                server_assignments: rate(cur.server_assignments, prev.server_assignments),
                xacts: rate(cur.xacts, prev.xacts),
                queries: rate(cur.queries, prev.queries),
                received: rate(cur.received, prev.received),
                sent: rate(cur.sent, prev.sent),
                xact_us: per(cur.xact_us, prev.xact_us, cur.xacts, prev.xacts),
                query_us: per(cur.query_us, prev.query_us, cur.queries, prev.queries),
                wait_us: per(
                    cur.wait_us,
                    prev.wait_us,
                    cur.server_assignments,
                    prev.server_assignments,
                ),
                client_parses: rate(cur.client_parses, prev.client_parses),
                server_parses: rate(cur.server_parses, prev.server_parses),
                binds: rate(cur.binds, prev.binds),
                logins: rate(cur.logins, prev.logins),
                last: None,
            };
        }
        avg.last = Some((now, cur));
    }
}

impl Totals {
    pub fn add(&mut self, o: &Totals) {
        self.server_assignments += o.server_assignments;
        self.xacts += o.xacts;
        self.queries += o.queries;
        self.received += o.received;
        self.sent += o.sent;
        self.xact_us += o.xact_us;
        self.query_us += o.query_us;
        self.wait_us += o.wait_us;
        self.client_parses += o.client_parses;
        self.server_parses += o.server_parses;
        self.binds += o.binds;
        self.logins += o.logins;
        self.statements += o.statements;
        self.errors += o.errors;
        self.slow += o.slow;
        self.prepared_invalidations += o.prepared_invalidations;
        self.prepared_reprepares += o.prepared_reprepares;
        self.misroute_retries += o.misroute_retries;
    }
}

impl Averages {
    /// Sums rates; per-unit times are weighted by the rate they belong to.
    pub fn add(&mut self, o: &Averages) {
        let weigh =
            |a: u64, an: u64, b: u64, bn: u64| (a * an + b * bn).checked_div(an + bn).unwrap_or(0);
        self.xact_us = weigh(self.xact_us, self.xacts, o.xact_us, o.xacts);
        self.query_us = weigh(self.query_us, self.queries, o.query_us, o.queries);
        self.wait_us = weigh(
            self.wait_us,
            self.server_assignments,
            o.wait_us,
            o.server_assignments,
        );
        self.server_assignments += o.server_assignments;
        self.xacts += o.xacts;
        self.queries += o.queries;
        self.received += o.received;
        self.sent += o.sent;
        self.client_parses += o.client_parses;
        self.server_parses += o.server_parses;
        self.binds += o.binds;
        self.logins += o.logins;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn averages_are_rates_and_per_unit_times() {
        let t = Traffic::default();
        let start = Instant::now();
        t.roll(start);
        t.apply(&Delta {
            xacts: 10,
            queries: 20,
            xact_us: 1000,
            query_us: 400,
            received: 500,
            ..Delta::default()
        });
        t.roll(start + Duration::from_secs(2));
        let a = t.averages();
        assert_eq!(a.xacts, 5);
        assert_eq!(a.queries, 10);
        assert_eq!(a.received, 250);
        assert_eq!(a.xact_us, 100);
        assert_eq!(a.query_us, 20);
        assert_eq!(t.totals().xacts, 10);
    }

    #[test]
    fn more_threads_than_stripes_lose_no_count() {
        // Threads that own a stripe add without locked instructions; the
        // rest share the last stripe atomically. Totals must be exact.
        let t = Traffic::default();
        let threads = STRIPES as u64 * 2;
        std::thread::scope(|scope| {
            for _ in 0..threads {
                scope.spawn(|| {
                    for _ in 0..2_000 {
                        t.apply(&Delta {
                            xacts: 1,
                            sent: 3,
                            ..Delta::default()
                        });
                        t.transaction_latency(7);
                        t.assigned(Duration::from_micros(2));
                    }
                });
            }
        });
        let totals = t.totals();
        assert_eq!(totals.xacts, threads * 2_000);
        assert_eq!(totals.sent, threads * 6_000);
        assert_eq!(totals.server_assignments, threads * 2_000);
        assert_eq!(totals.wait_us, threads * 4_000);
        assert_eq!(t.latencies().transaction.count, threads * 2_000);
    }
}
