//! GCRA, the generic cell rate algorithm (as Redis's `CL.THROTTLE`), pure:
//! a theoretical arrival time moves one emission interval per admission; a
//! request is admitted when it is not earlier than that time minus the
//! burst tolerance. Over any time `t` from a full start it admits
//! `burst + 1 + floor(t / interval)`.
//!
//! Invariants: the state is only the arrival time; a refusal leaves it as it
//! was; all arithmetic is in integer nanoseconds (no drift).

use std::time::Duration;

use super::Tier;

/// The pure algorithm: admit at `now` (ns), or say when to come back.
#[derive(Debug, Default, Clone, Copy)]
pub struct Gcra {
    /// Theoretical arrival time (ns); 0: a full burst is available.
    pub(super) tat: u64,
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

    /// Undoes one admission made with `interval` (whatever came after it).
    pub fn take_back(&mut self, interval: u64) {
        self.tat = self.tat.saturating_sub(interval);
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
    fn an_admission_taken_back_is_available_again() {
        let t = tier(1, 60, 0);
        let mut g = Gcra::default();
        let now = 1_000 * SEC;
        assert!(g.admit(now, &t).is_ok());
        assert!(g.admit(now, &t).is_err());
        g.take_back(t.interval());
        assert!(g.admit(now + 1, &t).is_ok(), "the token came back");
        assert!(g.admit(now + 2, &t).is_err());
    }

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
