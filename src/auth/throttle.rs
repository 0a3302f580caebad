//! Failed-login throttling, per source address. Each failure is answered
//! after a delay that doubles with the address's consecutive failures (up to
//! a cap); after `limit` failures the address is refused outright, before
//! any password exchange, for a cool-down. A success from the address, or a
//! cool-down without failures, forgets it.
//!
//! Invariants: the delay is served by the failing client's own task (a flood
//! from one address never slows another client); the table holds at most
//! [`MAX_ADDRESSES`] addresses (the oldest quiet ones go first); pure logic
//! over a clock passed in, so it is tested without waiting.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

/// Addresses remembered at most.
pub const MAX_ADDRESSES: usize = 65_536;

/// The throttling settings (`[tidepool] auth_failure_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Delay before answering the first failure; zero: none.
    pub delay: Duration,
    /// The delay doubles per failure up to this.
    pub max_delay: Duration,
    /// Failures after which the address is refused; zero: never.
    pub limit: u32,
    /// How long an address is refused, and how long its failures are
    /// remembered.
    pub cooldown: Duration,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    failures: u32,
    /// Microseconds on the caller's monotonic clock.
    last_failure: u64,
    blocked_until: Option<u64>,
}

/// One address as the console shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub address: IpAddr,
    pub failures: u32,
    pub last_failure_ago: Duration,
    /// How much longer it is refused (zero: it is not).
    pub blocked_for: Duration,
}

#[derive(Debug, Default)]
pub struct Throttle {
    table: Mutex<HashMap<IpAddr, Entry>>,
    /// Failed logins (password, or unknown user) since start.
    pub failures: AtomicU64,
    /// Logins refused because their address was cooling down.
    pub refused: AtomicU64,
}

fn us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl Throttle {
    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Entry>> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Before authentication: Err(how much longer) when `addr` is refused.
    pub fn check(&self, addr: IpAddr, now: u64) -> Result<(), Duration> {
        let t = self.table();
        match t.get(&addr).and_then(|e| e.blocked_until) {
            Some(until) if until > now => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                Err(Duration::from_micros(until - now))
            }
            _ => Ok(()),
        }
    }

    /// A login from `addr` failed: how long to wait before answering.
    pub fn failed(&self, addr: IpAddr, now: u64, l: &Limits) -> Duration {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let mut t = self.table();
        if t.len() >= MAX_ADDRESSES && !t.contains_key(&addr) {
            make_room(&mut t, now, l);
        }
        let e = t.entry(addr).or_insert(Entry {
            failures: 0,
            last_failure: now,
            blocked_until: None,
        });
        let quiet = now.saturating_sub(e.last_failure) > us(l.cooldown);
        let block_over = e.blocked_until.is_some_and(|u| u <= now);
        if quiet || block_over {
            *e = Entry {
                failures: 0,
                last_failure: now,
                blocked_until: None,
            };
        }
        e.failures = e.failures.saturating_add(1);
        e.last_failure = now;
        if l.limit > 0 && e.failures >= l.limit {
            e.blocked_until = Some(now.saturating_add(us(l.cooldown)));
        }
        let doublings = e.failures.saturating_sub(1).min(30);
        l.delay
            .checked_mul(1u32 << doublings)
            .unwrap_or(l.max_delay)
            .min(l.max_delay.max(l.delay))
    }

    /// A login from `addr` succeeded: its failures are forgotten.
    pub fn succeeded(&self, addr: IpAddr) {
        let mut t = self.table();
        if !t.is_empty() {
            t.remove(&addr);
        }
    }

    /// Addresses with failures still remembered, most failures first.
    pub fn rows(&self, now: u64, l: &Limits) -> Vec<Row> {
        let t = self.table();
        let mut rows: Vec<Row> = t
            .iter()
            .filter(|(_, e)| {
                e.blocked_until.is_some_and(|u| u > now)
                    || now.saturating_sub(e.last_failure) <= us(l.cooldown)
            })
            .map(|(a, e)| Row {
                address: *a,
                failures: e.failures,
                last_failure_ago: Duration::from_micros(now.saturating_sub(e.last_failure)),
                blocked_for: Duration::from_micros(
                    e.blocked_until.map_or(0, |u| u.saturating_sub(now)),
                ),
            })
            .collect();
        rows.sort_by(|a, b| b.failures.cmp(&a.failures).then(a.address.cmp(&b.address)));
        rows
    }

    /// Addresses refused now.
    pub fn blocked(&self, now: u64) -> usize {
        self.table()
            .values()
            .filter(|e| e.blocked_until.is_some_and(|u| u > now))
            .count()
    }
}

/// Forgets quiet addresses; if none is quiet, the one that failed longest ago.
fn make_room(t: &mut HashMap<IpAddr, Entry>, now: u64, l: &Limits) {
    let cooldown = us(l.cooldown);
    t.retain(|_, e| {
        e.blocked_until.is_some_and(|u| u > now) || now.saturating_sub(e.last_failure) <= cooldown
    });
    if t.len() >= MAX_ADDRESSES
        && let Some(oldest) = t
            .iter()
            .min_by_key(|(_, e)| e.last_failure)
            .map(|(a, _)| *a)
    {
        t.remove(&oldest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Limits = Limits {
        delay: Duration::from_millis(100),
        max_delay: Duration::from_millis(1000),
        limit: 5,
        cooldown: Duration::from_secs(60),
    };
    const S: u64 = 1_000_000;

    fn a(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn delays_double_up_to_the_cap_then_the_address_is_refused() {
        let t = Throttle::default();
        let bad = a("10.0.0.1");
        let delays: Vec<u64> = (0..5)
            .map(|i| t.failed(bad, i * S, &L).as_millis() as u64)
            .collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000]);
        assert_eq!(t.check(bad, 5 * S), Err(Duration::from_secs(59)));
        assert_eq!(t.check(a("10.0.0.2"), 5 * S), Ok(()), "another address");
        assert_eq!(t.blocked(5 * S), 1);
        // The cool-down ends: the address starts afresh.
        assert_eq!(t.check(bad, 64 * S), Ok(()));
        assert_eq!(t.failed(bad, 64 * S, &L), Duration::from_millis(100));
        assert_eq!(t.failures.load(Ordering::Relaxed), 6);
        assert_eq!(t.refused.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_success_or_a_quiet_spell_forgets_the_failures() {
        let t = Throttle::default();
        let x = a("::1");
        t.failed(x, 0, &L);
        t.failed(x, S, &L);
        t.succeeded(x);
        assert_eq!(t.failed(x, 2 * S, &L), Duration::from_millis(100));
        assert_eq!(t.failed(x, 100 * S, &L), Duration::from_millis(100));
        assert_eq!(t.rows(100 * S, &L).len(), 1);
        assert!(t.rows(200 * S, &L).is_empty());
    }

    #[test]
    fn zero_settings_turn_it_off() {
        let off = Limits {
            delay: Duration::ZERO,
            max_delay: Duration::ZERO,
            limit: 0,
            cooldown: Duration::from_secs(60),
        };
        let t = Throttle::default();
        for i in 0..100 {
            assert_eq!(t.failed(a("10.0.0.9"), i, &off), Duration::ZERO);
        }
        assert_eq!(t.check(a("10.0.0.9"), 100), Ok(()));
    }

    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Event {
        Fail(u8),
        Succeed(u8),
        Check(u8),
    }

    fn event() -> impl Strategy<Value = (Event, u64)> {
        (
            prop_oneof![
                (0u8..3).prop_map(Event::Fail),
                (0u8..3).prop_map(Event::Succeed),
                (0u8..3).prop_map(Event::Check),
            ],
            0u64..20 * S,
        )
    }

    proptest! {
        /// Any interleaving of failures, successes and checks from three
        /// addresses (times moving forward by up to 20 s): a fourth address
        /// is never refused; a success lets its address in at once and
        /// makes its next delay the first one; consecutive failures inside
        /// the cool-down never shorten the delay (up to the cap) and refuse
        /// the address once `limit` of them happened.
        #[test]
        fn throttling_keeps_its_promises(events in proptest::collection::vec(event(), 1..200)) {
            let t = Throttle::default();
            let addr = |i: u8| IpAddr::from([10, 0, 0, i]);
            let mut now = 0u64;
            let mut streak = [0u32; 3];
            let mut last_delay = [Duration::ZERO; 3];
            let mut last_fail = [0u64; 3];
            // Refused at some point of the current streak: once the refusal
            // ends, the streak starts again.
            let mut was_blocked = [false; 3];
            for (e, step) in events {
                now += step;
                prop_assert_eq!(t.check(addr(9), now), Ok(()));
                match e {
                    Event::Fail(i) => {
                        let k = usize::from(i);
                        let blocked = t.check(addr(i), now).is_err();
                        let d = t.failed(addr(i), now, &L);
                        prop_assert!(d <= L.max_delay.max(L.delay));
                        let fresh = now - last_fail[k] > 60 * S || streak[k] == 0;
                        if (fresh || was_blocked[k]) && !blocked {
                            streak[k] = 1;
                            was_blocked[k] = false;
                            prop_assert_eq!(d, L.delay);
                        } else {
                            if !blocked {
                                prop_assert!(d >= last_delay[k]);
                            }
                            streak[k] += 1;
                        }
                        if streak[k] >= L.limit {
                            prop_assert!(t.check(addr(i), now).is_err());
                            was_blocked[k] = true;
                        }
                        last_delay[k] = d;
                        last_fail[k] = now;
                    }
                    Event::Succeed(i) => {
                        let k = usize::from(i);
                        t.succeeded(addr(i));
                        prop_assert_eq!(t.check(addr(i), now), Ok(()));
                        prop_assert_eq!(t.failed(addr(i), now, &L), L.delay);
                        streak[k] = 1;
                        was_blocked[k] = false;
                        last_delay[k] = L.delay;
                        last_fail[k] = now;
                    }
                    Event::Check(i) => {
                        let _ = t.check(addr(i), now);
                    }
                }
            }
        }
    }

    #[test]
    fn the_table_is_bounded() {
        let t = Throttle::default();
        for i in 0..(MAX_ADDRESSES as u32 + 10) {
            t.failed(IpAddr::from(i.to_be_bytes()), u64::from(i), &L);
        }
        assert!(t.table().len() <= MAX_ADDRESSES);
    }
}
