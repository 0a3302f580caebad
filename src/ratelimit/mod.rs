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
//! With `rate_limit_backend` the arrival time lives in Redis
//! ([`shared`]), so that several instances share one limit; while Redis is
//! down each instance decides locally with its share of the tier.
//!
//! Invariants: a limiter's state is only its arrival time (a reload that
//! changes its tier keeps it); a refused request costs nothing, in any of
//! the limiters it passes ([`admit_all`]); waiting for
//! admission is the client's own task sleeping until its turn, never a lock
//! held across an await.

mod gcra;
pub mod shared;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwapOption;

pub use gcra::Gcra;
pub use shared::Backend;

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

    /// One of `instances`' share of this tier (at least one a period).
    fn share(&self, instances: u64) -> Tier {
        if instances <= 1 {
            return self.clone();
        }
        Tier {
            name: self.name.clone(),
            rate: (self.rate / instances).max(1),
            per: self.per,
            burst: self.burst / instances,
        }
    }
}

/// One user's or database's limiter, with its counts.
#[derive(Debug)]
pub struct Limiter {
    pub scope: &'static str,
    pub name: String,
    /// `scope:name`, its key in the shared backend.
    key: String,
    /// Shared, so that reading it on every admission copies no name.
    tier: Mutex<Arc<Tier>>,
    gcra: Mutex<Gcra>,
    pub admitted: AtomicU64,
    /// Admitted after waiting.
    pub waited: AtomicU64,
    pub rejected: AtomicU64,
}

/// Admits one transaction past each of `limiters` in turn, waiting up to
/// `wait` at each; when one refuses, those that admitted it take it back
/// (a refused request costs nothing, also across limiters: a database's
/// refusal used to spend its user's token).
pub async fn admit_all(
    limiters: &[Arc<Limiter>],
    wait: Duration,
    backend: Option<&Arc<Backend>>,
) -> Result<(), Refused> {
    for (i, l) in limiters.iter().enumerate() {
        if let Err(refused) = l.admit(wait, backend).await {
            for earlier in &limiters[..i] {
                earlier.take_back(backend).await;
            }
            return Err(refused);
        }
    }
    Ok(())
}

/// Why a request was not admitted: which limit, for the client's message.
#[derive(Debug, Clone)]
pub struct Refused {
    pub scope: &'static str,
    pub name: String,
    pub tier: Arc<Tier>,
}

impl Limiter {
    pub fn tier(&self) -> Arc<Tier> {
        self.tier
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn gcra(&self) -> std::sync::MutexGuard<'_, Gcra> {
        self.gcra.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// One decision: in the shared backend when there is one and it
    /// answers (the local state then mirrors it, for the token count), else
    /// here, with this instance's share of the tier when a backend is set.
    async fn try_admit(&self, backend: Option<&Arc<Backend>>) -> Result<(), Duration> {
        let tier = self.tier();
        if let Some(b) = backend {
            if let Some(remote) = b.admit(&self.key, &tier).await {
                let lead = u64::try_from(remote.lead.as_nanos()).unwrap_or(u64::MAX);
                self.gcra().tat = crate::clock::mono_ns().saturating_add(lead);
                return remote.verdict;
            }
            return self
                .gcra()
                .admit(crate::clock::mono_ns(), &tier.share(b.instances));
        }
        self.gcra().admit(crate::clock::mono_ns(), &tier)
    }

    /// Admits one transaction, waiting up to `wait` for its turn; decided
    /// in `backend` when there is one.
    pub async fn admit(
        &self,
        wait: Duration,
        backend: Option<&Arc<Backend>>,
    ) -> Result<(), Refused> {
        let deadline = crate::clock::mono_ns()
            .saturating_add(u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX));
        let mut waited = false;
        loop {
            let verdict = self.try_admit(backend).await;
            let now = crate::clock::mono_ns();
            match verdict {
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

    /// Takes back one admission this limiter made (a later limiter of the
    /// same request refused it): in the shared backend when it answers,
    /// else here.
    async fn take_back(&self, backend: Option<&Arc<Backend>>) {
        let tier = self.tier();
        self.admitted.fetch_sub(1, Ordering::Relaxed);
        let interval = match backend {
            Some(b) if b.take_back(&self.key, tier.interval()).await => return,
            // Decided here with this instance's share (see `try_admit`).
            Some(b) => tier.share(b.instances).interval(),
            None => tier.interval(),
        };
        self.gcra().take_back(interval);
    }

    /// Admissions available right now (whole tokens).
    pub fn tokens(&self) -> u64 {
        let tier = self.tier();
        let g = *self.gcra();
        let now = crate::clock::mono_ns();
        let interval = tier.interval();
        let used = g.tat.saturating_sub(now);
        (interval.saturating_mul(tier.burst + 1).saturating_sub(used)) / interval
    }
}

/// Every limiter, by (scope, name), and the shared backend if any.
#[derive(Debug, Default)]
pub struct RateLimits {
    limiters: Mutex<HashMap<(&'static str, String), Arc<Limiter>>>,
    backend: ArcSwapOption<Backend>,
    /// What `backend` was made from (URL, timeout, instances).
    made_from: Mutex<Option<(String, Duration, u64)>>,
}

impl RateLimits {
    /// The shared backend in force, if `rate_limit_backend` is set.
    pub fn backend(&self) -> Option<Arc<Backend>> {
        self.backend.load_full()
    }

    /// Puts `config`'s backend in force: made anew when its URL, timeout
    /// or instance count changed (the old one's connection closes), kept
    /// otherwise; removed when unset. The limiters' state stays.
    pub fn configure(&self, config: &crate::config::Config) {
        let wanted = config.rate_limits.rate_limit_backend.as_ref().map(|url| {
            (
                url.clone(),
                config.rate_limits.rate_limit_backend_timeout,
                config.tidepool.instances,
            )
        });
        let mut made = self
            .made_from
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if *made == wanted {
            return;
        }
        let backend = match &wanted {
            None => None,
            Some((url, timeout, instances)) => match Backend::new(url, *timeout, *instances) {
                Ok(b) => Some(b),
                Err(e) => {
                    // The config check refuses such a URL; keep local limits.
                    tracing::error!(error = %e, "rate_limit_backend unusable: limits stay local");
                    None
                }
            },
        };
        self.backend.store(backend);
        *made = wanted;
    }

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
                    key: format!("{scope}:{name}"),
                    tier: Mutex::new(Arc::new(tier.clone())),
                    gcra: Mutex::new(Gcra::default()),
                    admitted: AtomicU64::new(0),
                    waited: AtomicU64::new(0),
                    rejected: AtomicU64::new(0),
                })
            })
            .clone();
        let mut t = l.tier.lock().unwrap_or_else(PoisonError::into_inner);
        if **t != *tier {
            *t = Arc::new(tier.clone());
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
