//! The shared rate-limit backend (`rate_limit_backend = "redis://..."`):
//! several tidepool instances in front of one database keep each limiter's
//! GCRA state in Redis, moved by one atomic Lua script on Redis's own clock,
//! so that together they admit one limit's worth.
//!
//! Invariants: a query never waits on Redis longer than
//! `rate_limit_backend_timeout`; once a call fails, the backend is down and
//! every decision is local (each instance `1/instances` of the tier) until a
//! background task has reconnected; going down and coming back are logged
//! once each. The URL's password is never logged.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::aio::MultiplexedConnection;

use super::Tier;

/// GCRA in microseconds on Redis's clock. KEYS[1]: the limiter;
/// ARGV: interval (µs), burst. Returns {wait µs (0: admitted), the
/// arrival time's lead over now in µs after the decision}.
const SCRIPT: &str = r"
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = interval * tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local allowed_at = tat - tolerance
if now < allowed_at then
  return {allowed_at - now, tat - now}
end
tat = tat + interval
redis.call('SET', KEYS[1], string.format('%d', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
return {0, tat - now}
";

/// Takes back one admission: the arrival time moves back one interval
/// (µs, ARGV[1]), its expiry kept. Nothing when the key expired meanwhile.
const TAKE_BACK: &str = r"
local tat = redis.call('GET', KEYS[1])
if not tat then return 0 end
local ttl = redis.call('PTTL', KEYS[1])
if ttl <= 0 then return 0 end
redis.call('SET', KEYS[1], string.format('%d', tonumber(tat) - tonumber(ARGV[1])), 'PX', ttl)
return 1
";

/// Where the keys live in Redis.
const KEY_PREFIX: &str = "tidepool:ratelimit:";

/// How long between reconnection attempts while Redis is down.
const RETRY: Duration = Duration::from_secs(1);

/// A decision made in Redis: admitted, or the wait until it would be; and
/// how far the shared arrival time leads now (for the local token view).
#[derive(Debug, Clone, Copy)]
pub struct Remote {
    pub verdict: Result<(), Duration>,
    pub lead: Duration,
}

#[derive(Debug)]
pub struct Backend {
    client: redis::Client,
    /// `host:port` of the URL, for logs (no credentials).
    pub target: String,
    pub timeout: Duration,
    /// Instances sharing the limit: each one's share while Redis is down.
    pub instances: u64,
    script: redis::Script,
    take_back: redis::Script,
    /// The connection while Redis answers; `None` while it is down.
    conn: ArcSwapOption<MultiplexedConnection>,
    reconnecting: AtomicBool,
    /// Whether the last transition logged was "down" (logs once each way).
    logged_down: AtomicBool,
    /// Calls that failed or timed out.
    pub errors: AtomicU64,
    /// Decisions made locally because Redis was down.
    pub local_decisions: AtomicU64,
}

impl Backend {
    /// A backend for `url` (not yet connected: the first use, or the
    /// runtime at hand, starts connecting). Err for a URL the client
    /// library cannot use.
    pub fn new(url: &str, timeout: Duration, instances: u64) -> Result<Arc<Backend>, String> {
        let client = redis::Client::open(url).map_err(|e| e.to_string())?;
        let target = client.get_connection_info().addr().to_string();
        let b = Arc::new(Backend {
            client,
            target,
            timeout,
            instances: instances.max(1),
            script: redis::Script::new(SCRIPT),
            take_back: redis::Script::new(TAKE_BACK),
            conn: ArcSwapOption::empty(),
            reconnecting: AtomicBool::new(false),
            logged_down: AtomicBool::new(false),
            errors: AtomicU64::new(0),
            local_decisions: AtomicU64::new(0),
        });
        if tokio::runtime::Handle::try_current().is_ok() {
            b.reconnect();
        }
        Ok(b)
    }

    /// Whether Redis answers (as of the last call).
    pub fn is_up(&self) -> bool {
        self.conn.load().is_some()
    }

    /// One admission decision for `key` under `tier` in Redis; `None` when
    /// Redis is down or did not answer in time (decide locally then).
    pub async fn admit(self: &Arc<Self>, key: &str, tier: &Tier) -> Option<Remote> {
        let Some(conn) = self.conn.load_full() else {
            self.reconnect();
            self.local_decisions.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        let mut conn = (*conn).clone();
        let interval_us = (tier.interval() / 1000).max(1);
        let mut invocation = self.script.key(format!("{KEY_PREFIX}{key}"));
        invocation.arg(interval_us).arg(tier.burst);
        let call = invocation.invoke_async::<(i64, i64)>(&mut conn);
        let failure = match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok((wait, lead))) => {
                let us = |v: i64| Duration::from_micros(u64::try_from(v).unwrap_or(0));
                return Some(Remote {
                    verdict: if wait > 0 { Err(us(wait)) } else { Ok(()) },
                    lead: us(lead),
                });
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {:?}", self.timeout),
        };
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.local_decisions.fetch_add(1, Ordering::Relaxed);
        self.down(&failure);
        None
    }

    /// Takes back one admission of `key` made with `interval` (ns); false
    /// when Redis is down or did not answer in time (take it back locally).
    pub async fn take_back(self: &Arc<Self>, key: &str, interval: u64) -> bool {
        let Some(conn) = self.conn.load_full() else {
            return false;
        };
        let mut conn = (*conn).clone();
        let mut invocation = self.take_back.key(format!("{KEY_PREFIX}{key}"));
        invocation.arg((interval / 1000).max(1));
        let call = invocation.invoke_async::<i64>(&mut conn);
        let failure = match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(_)) => return true,
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {:?}", self.timeout),
        };
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.down(&failure);
        false
    }

    /// Marks Redis down (logged once) and starts reconnecting.
    fn down(self: &Arc<Self>, why: &str) {
        self.conn.store(None);
        if !self.logged_down.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                backend = %self.target,
                error = why,
                share = format!("1/{}", self.instances),
                "rate-limit backend unreachable: limits are local (each instance its share) until it answers again"
            );
        }
        self.reconnect();
    }

    /// Starts the background task that connects, unless one runs.
    fn reconnect(self: &Arc<Self>) {
        if self.reconnecting.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            self.reconnecting.store(false, Ordering::Release);
            return;
        };
        let weak = Arc::downgrade(self);
        rt.spawn(connect_until_up(weak));
    }
}

/// Tries to connect every [`RETRY`] until it works or the backend is
/// dropped (a reload replaced it).
async fn connect_until_up(weak: Weak<Backend>) {
    loop {
        let Some(b) = weak.upgrade() else { return };
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(b.timeout.max(Duration::from_millis(500))))
            .set_response_timeout(Some(b.timeout));
        let attempt = b
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await;
        match attempt {
            Ok(conn) => {
                b.conn.store(Some(Arc::new(conn)));
                b.reconnecting.store(false, Ordering::Release);
                if b.logged_down.swap(false, Ordering::Relaxed) {
                    tracing::info!(backend = %b.target, "rate-limit backend reachable again: limits are shared");
                } else {
                    tracing::info!(backend = %b.target, "rate-limit backend connected: limits are shared");
                }
                return;
            }
            Err(e) => {
                if !b.logged_down.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        backend = %b.target,
                        error = %e,
                        share = format!("1/{}", b.instances),
                        "rate-limit backend unreachable: limits are local (each instance its share) until it answers"
                    );
                }
            }
        }
        drop(b);
        tokio::time::sleep(RETRY).await;
    }
}
