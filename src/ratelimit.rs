//! Rate limits per user and per database (`[rate_limits]`): each limited
//! user or database has one limiter, shared by all its clients, that admits
//! transactions at a rate with a burst.
//!
//! The limiter is GCRA (the generic cell rate algorithm, as Redis's
//! `CL.THROTTLE`): a theoretical arrival time moves one emission interval
//! per admission; a request is admitted when it is not earlier than that time
//! minus the burst tolerance. Over any time `t` from a full start it admits
//! `burst + 1 + floor(t / interval)`: rate × time + burst, to within one,
//! exactly, whatever the number of clients (one lock per limiter, integer
//! nanoseconds, no drift).
//!
//! Invariants: a limiter's state is only its arrival time (a reload that
//! changes its tier keeps it); a refused request costs nothing; waiting for
//! admission is the client's own task sleeping until its turn, never a lock
//! held across an await.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// A tier: `per` nanoseconds for `rate` admissions, with `burst`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tier {
    pub name: String,
    pub rate: u64,
    pub per: Duration,
    pub burst: u64,
}

impl Tier {
    /// Nanoseconds between admissions at the steady rate.
    fn interval(&self) -> u64 {
        (u64::try_from(self.per.as_nanos()).unwrap_or(u64::MAX) / self.rate.max(1)).max(1)
    }

    /// `10/min, burst 2`.
    pub fn describe(&self) -> String {
        let unit = if self.per == Duration::from_secs(60) {
            "min"
        } else {
            "s"
        };
        format!("{}/{unit}, burst {}", self.rate, self.burst)
    }
}

/// The pure algorithm: admit at `now` (ns), or say when to come back.
#[derive(Debug, Default, Clone, Copy)]
pub struct Gcra {
    /// Theoretical arrival time (ns); 0: a full burst is available.
    tat: u64,
}

impl Gcra {
    /// Ok when admitted (the state moves on); Err(how long until it would
    /// be) otherwise (the state is unchanged).
    pub fn admit(&mut self, now: u64, tier: &Tier) -> Result<(), Duration> {
        let interval = tier.interval();
        let tolerance = interval.saturating_mul(tier.burst);
        let tat = self.tat.max(now);
        let allowed_at = tat.saturating_sub(tolerance);
        if now < allowed_at {
            return Err(Duration::from_nanos(allowed_at - now));
        }
        self.tat = tat + interval;
        Ok(())
    }
}

/// One user's or database's limiter, with its counts.
#[derive(Debug)]
pub struct Limiter {
    pub scope: &'static str,
    pub name: String,
    tier: Mutex<Tier>,
    gcra: Mutex<Gcra>,
    pub admitted: AtomicU64,
    /// Admitted after waiting.
    pub waited: AtomicU64,
    pub rejected: AtomicU64,
}

/// Why a request was not admitted: which limit, for the client's message.
#[derive(Debug, Clone)]
pub struct Refused {
    pub scope: &'static str,
    pub name: String,
    pub tier: Tier,
}

impl Limiter {
    pub fn tier(&self) -> Tier {
        self.tier
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn try_admit(&self, now: u64) -> Result<(), Duration> {
        let tier = self.tier();
        self.gcra
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .admit(now, &tier)
    }

    /// Admits one transaction, waiting up to `wait` for its turn.
    pub async fn admit(&self, wait: Duration) -> Result<(), Refused> {
        let deadline = crate::clock::mono_ns()
            .saturating_add(u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX));
        let mut waited = false;
        loop {
            let now = crate::clock::mono_ns();
            match self.try_admit(now) {
                Ok(()) => {
                    self.admitted.fetch_add(1, Ordering::Relaxed);
                    if waited {
                        self.waited.fetch_add(1, Ordering::Relaxed);
                    }
                    return Ok(());
                }
                Err(after)
                    if now.saturating_add(u64::try_from(after.as_nanos()).unwrap_or(u64::MAX))
                        <= deadline =>
                {
                    waited = true;
                    tokio::time::sleep(after).await;
                }
                Err(_) => {
                    self.rejected.fetch_add(1, Ordering::Relaxed);
                    return Err(Refused {
                        scope: self.scope,
                        name: self.name.clone(),
                        tier: self.tier(),
                    });
                }
            }
        }
    }

    /// Admissions available right now (whole tokens).
    pub fn tokens(&self) -> u64 {
        let tier = self.tier();
        let g = *self.gcra.lock().unwrap_or_else(PoisonError::into_inner);
        let now = crate::clock::mono_ns();
        let interval = tier.interval();
        let used = g.tat.saturating_sub(now);
        (interval.saturating_mul(tier.burst + 1).saturating_sub(used)) / interval
    }
}

/// Every limiter, by (scope, name).
#[derive(Debug, Default)]
pub struct RateLimits {
    limiters: Mutex<HashMap<(&'static str, String), Arc<Limiter>>>,
}

impl RateLimits {
    /// The limiter of `name` in `scope` (`user` or `database`) under `tier`,
    /// made on first use; a changed tier applies from now on.
    pub fn limiter(&self, scope: &'static str, name: &str, tier: &Tier) -> Arc<Limiter> {
        let mut m = self.limiters.lock().unwrap_or_else(PoisonError::into_inner);
        let l = m
            .entry((scope, name.to_owned()))
            .or_insert_with(|| {
                Arc::new(Limiter {
                    scope,
                    name: name.to_owned(),
                    tier: Mutex::new(tier.clone()),
                    gcra: Mutex::new(Gcra::default()),
                    admitted: AtomicU64::new(0),
                    waited: AtomicU64::new(0),
                    rejected: AtomicU64::new(0),
                })
            })
            .clone();
        let mut t = l.tier.lock().unwrap_or_else(PoisonError::into_inner);
        if *t != *tier {
            *t = tier.clone();
        }
        drop(t);
        l
    }

    /// Every limiter made so far, by scope and name.
    pub fn all(&self) -> Vec<Arc<Limiter>> {
        let mut v: Vec<Arc<Limiter>> = self
            .limiters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| (a.scope, &a.name).cmp(&(b.scope, &b.name)));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tier(rate: u64, per_secs: u64, burst: u64) -> Tier {
        Tier {
            name: "t".into(),
            rate,
            per: Duration::from_secs(per_secs),
            burst,
        }
    }

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn ten_a_minute_with_a_burst_of_two_admits_twelve_in_the_first_minute() {
        let t = tier(10, 60, 2);
        let mut g = Gcra::default();
        let start = 1_000 * SEC;
        let mut admitted = 0;
        // A request every 100 ms for a minute.
        for i in 0..600 {
            if g.admit(start + i * SEC / 10, &t).is_ok() {
                admitted += 1;
            }
        }
        assert_eq!(admitted, 12);
    }

    #[test]
    fn a_refusal_says_when_to_come_back_and_costs_nothing() {
        let t = tier(1, 1, 0);
        let mut g = Gcra::default();
        assert!(g.admit(10 * SEC, &t).is_ok());
        let wait = g.admit(10 * SEC, &t).unwrap_err();
        assert_eq!(wait, Duration::from_secs(1));
        assert!(g.admit(10 * SEC + SEC / 2, &t).is_err());
        assert!(g.admit(11 * SEC, &t).is_ok());
    }

    proptest::proptest! {
        /// Whatever the arrival pattern, over a window from a full start the
        /// admissions never exceed burst + 1 + window / interval, and with
        /// demand at every instant they reach it.
        #[test]
        fn admissions_are_rate_times_time_plus_burst(
            rate in 1u64..1000,
            burst in 0u64..50,
            gaps in proptest::collection::vec(0u64..200_000_000, 1..400),
        ) {
            let t = tier(rate, 1, burst);
            let mut g = Gcra::default();
            let start = 5 * SEC;
            let mut now = start;
            let mut admitted = 0u64;
            for gap in gaps {
                now += gap;
                if g.admit(now, &t).is_ok() {
                    admitted += 1;
                }
            }
            let bound = burst + 1 + (now - start) / t.interval();
            proptest::prop_assert!(admitted <= bound, "{admitted} > {bound}");
        }
    }
}
