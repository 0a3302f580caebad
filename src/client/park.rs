//! The parking lot for idle clients.
//!
//! A client idle between transactions for `park_idle_clients_after` gives up
//! its task, its buffers and its registration with the runtime: its socket
//! waits in the lot's own epoll set (one registration with the runtime for
//! all of them) and its session shrinks to a [`Parked`] record of what
//! cannot be derived again. When the socket turns readable (a request, or
//! the client leaving), or the client is asked to leave (KILL, shutdown), it
//! is taken out and resumes as a new task with a full session.
//!
//! Who parks is decided by a sweep over the client list every half period:
//! a client seen idle by two sweeps in a row with no transaction in between
//! is nudged, and parks itself if it can (see `Session::parkable`). The hot
//! path pays one relaxed store per transaction for this.
//!
//! Invariants: a parked client holds no server, no buffered bytes and owes
//! nothing; it stays listed and counted (`max_client_conn`, SHOW CLIENTS) as
//! an idle client; a record is in the map exactly while its socket is
//! registered in the lot's epoll set.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use hashbrown::HashTable;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;

use super::Shared;
use super::list::Eviction;
use super::session::Parked;
use crate::listing::id_hash;

/// Readiness events taken from the lot's epoll set per system call.
const EVENTS: usize = 256;

pub struct Lot {
    /// Adds and removes sockets; `None` when no epoll set could be made
    /// (then nobody parks).
    registry: Option<mio::Registry>,
    /// Taken by the lot's task when it starts.
    poll: Mutex<Option<Poll>>,
    /// Boxed, found by the id in their client record: a bucket is one
    /// pointer (a table grows by doubling, and its empty buckets would cost
    /// a whole record each), and the records, 80 bytes, take the places that
    /// the parking clients' checkout mailboxes (the one object of that
    /// class an active session keeps) leave, so parking leaves no holes.
    parked: Mutex<HashTable<Box<Parked>>>,
    /// Wakes the lot's task to let evicted (or woken) clients out.
    kick: Notify,
    /// Clients to resume because something waits for them (a
    /// notification), whether or not they are parked yet.
    woken: Mutex<Vec<u64>>,
    /// Some parked client was asked to leave since the last look.
    evictions: std::sync::atomic::AtomicBool,
}

impl Default for Lot {
    fn default() -> Self {
        let made = Poll::new().and_then(|p| Ok((p.registry().try_clone()?, p)));
        match made {
            Ok((registry, poll)) => Self {
                registry: Some(registry),
                poll: Mutex::new(Some(poll)),
                parked: Mutex::default(),
                kick: Notify::new(),
                woken: Mutex::default(),
                evictions: Default::default(),
            },
            Err(e) => {
                tracing::warn!(error = %e, "no epoll set for the parking lot; idle clients will not be parked");
                Self {
                    registry: None,
                    poll: Mutex::new(None),
                    parked: Mutex::default(),
                    kick: Notify::new(),
                    woken: Mutex::default(),
                    evictions: Default::default(),
                }
            }
        }
    }
}

impl Lot {
    fn map(&self) -> MutexGuard<'_, HashTable<Box<Parked>>> {
        self.parked.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Clients parked now.
    /// Bytes one parked client takes in the lot (its record, besides the
    /// socket the kernel keeps).
    pub fn item_size() -> usize {
        std::mem::size_of::<Parked>() + std::mem::size_of::<Box<Parked>>()
    }

    pub fn len(&self) -> usize {
        self.map().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes a client's record; gives it back if its socket could not be
    /// registered (the client then stays in its task).
    pub fn park(&self, p: Parked) -> Result<(), Parked> {
        let Some(registry) = &self.registry else {
            return Err(p);
        };
        let id = p.info().id;
        let Ok(token) = usize::try_from(id) else {
            return Err(p);
        };
        let mut map = self.map();
        // Registered under the lock: an event for this token finds the record.
        // Registering reports readiness that is already there, so nothing
        // that arrived since the client's last read is missed.
        let fd: RawFd = p.socket().as_raw_fd();
        if let Err(e) = registry.register(&mut SourceFd(&fd), Token(token), Interest::READABLE) {
            tracing::debug!(client = id, error = %e, "could not park client");
            return Err(p);
        }
        map.insert_unique(id_hash(id), Box::new(p), |p| id_hash(p.info().id));
        Ok(())
    }

    /// Takes a client out of the lot, its socket out of the epoll set.
    fn take(&self, id: u64) -> Option<Parked> {
        let p = self
            .map()
            .find_entry(id_hash(id), |p| p.info().id == id)
            .ok()?
            .remove()
            .0;
        if let Some(registry) = &self.registry {
            let fd: RawFd = p.socket().as_raw_fd();
            let _ = registry.deregister(&mut SourceFd(&fd));
        }
        Some(*p)
    }

    /// Lets parked clients that were asked to leave (KILL, shutdown) out,
    /// so that their tasks say goodbye.
    pub fn wake_evicted(&self) {
        self.evictions
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.kick.notify_one();
    }

    /// Resumes client `id` if it is parked (a notification waits for it);
    /// nothing if it is not.
    pub fn wake(&self, id: u64) {
        if self.registry.is_none() {
            return;
        }
        self.woken
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(id);
        self.kick.notify_one();
    }

    /// Parked clients to let out: asked to leave, or to move (`moving`:
    /// the new process takes clients) and able to.
    fn evicted(&self, moving: bool) -> Vec<u64> {
        self.map()
            .iter()
            .filter(|p| match p.info().eviction() {
                Eviction::None | Eviction::Stay => false,
                Eviction::Migrate => moving && p.movable(),
                _ => true,
            })
            .map(|p| p.info().id)
            .collect()
    }
}

/// Resumes a parked client as a task of its own.
fn resume(lot: &Lot, id: u64) {
    if let Some(p) = lot.take(id) {
        p.info().unparked();
        p.resume();
    }
}

/// How often waits for a server are checked against `query_wait_timeout`.
const WAIT_SWEEP: Duration = Duration::from_millis(100);

/// The lot's task: lets clients out when their sockets turn readable or
/// they are evicted, and runs the client sweep: every 100 ms, clients
/// waiting for a server past `query_wait_timeout` are nudged (so a wait
/// needs no timer of its own); every half `park_idle_clients_after`, idle
/// clients are marked and asked to park.
pub async fn run(shared: Arc<Shared>) {
    let lot = shared.lot.clone();
    let poll = lot
        .poll
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take();
    // SAFETY: the `Poll` owns its epoll descriptor for its whole life and
    // `as_raw_fd` always returns that one; the `AsyncFd` owns the `Poll`, so
    // the descriptor stays open exactly while it is registered.
    let mut afd = poll.and_then(|poll| {
        match unsafe { AsyncFd::register_with_interest(poll, tokio::io::Interest::READABLE) } {
            Ok(a) => Some(a),
            Err(e) => {
                tracing::warn!(error = %e, "parking lot unavailable; idle clients will not be parked");
                None
            }
        }
    });
    let mut events = Events::with_capacity(EVENTS);
    let mut tick = tokio::time::interval(WAIT_SWEEP);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_park_sweep = tokio::time::Instant::now();
    // Clients parked at the last look: more since means sessions were freed.
    let mut parked_before = 0;
    // The last tick's sweep asked clients to park.
    let mut asked_to_park = false;
    loop {
        tokio::select! {
            biased;
            ready = readable(&mut afd) => {
                let Some(mut guard) = ready else {
                    afd = None;
                    continue;
                };
                events.clear();
                if let Err(e) = guard.get_inner_mut().poll(&mut events, Some(Duration::ZERO))
                    && e.kind() != std::io::ErrorKind::Interrupted
                {
                    tracing::warn!(error = %e, "parking lot poll failed");
                }
                let mut n = 0;
                for ev in events.iter() {
                    n += 1;
                    resume(&lot, ev.token().0 as u64);
                }
                if n < EVENTS {
                    guard.clear_ready();
                }
            }
            _ = lot.kick.notified() => {
                let woken = std::mem::take(&mut *lot.woken.lock().unwrap_or_else(PoisonError::into_inner));
                for id in woken {
                    resume(&lot, id);
                }
                // Only when asked: a notification's wake-up must not scan
                // every parked client.
                if lot.evictions.swap(false, std::sync::atomic::Ordering::SeqCst) {
                    for id in lot.evicted(shared.outbox.is_open()) {
                        resume(&lot, id);
                    }
                }
            }
            now = tick.tick() => {
                crate::clock::refresh();
                let wall = crate::clock::coarse_us();
                let period = shared.settings().config.pool.park_idle_clients_after / 2;
                let park = lot.registry.is_some() && !period.is_zero() && now >= next_park_sweep;
                // The clients asked at the last tick have parked by now, most
                // of them, and a sweep that finds more parked than at the last
                // one catches the rest: their freed sessions wait in the
                // allocator caches of the threads that ran them, keeping their
                // pages. Give them back, with the spare trackers the burst made.
                let mut flush = std::mem::take(&mut asked_to_park);
                if park {
                    next_park_sweep = now + period;
                    let parked = lot.len();
                    flush |= parked > parked_before;
                    parked_before = parked;
                }
                if flush {
                    crate::memory::flush_all_thread_caches(crate::client::txn::spare::clear);
                }
                let idle_limit = shared.settings().config.pool.client_idle_timeout;
                let query_limit = shared.settings().config.pool.query_timeout;
                let reserve = {
                    let s = shared.settings();
                    let any = s.config.pool.reserve_pool_size > 0
                        || s.config.databases.values().any(|d| d.reserve_pool_size.unwrap_or(0) > 0);
                    any.then_some(s.config.pool.reserve_pool_timeout)
                };
                let mut timed_out = false;
                let notify_us = shared.settings().config.pool.query_wait_notify.as_micros() as u64;
                let period_us = WAIT_SWEEP.as_micros() as u64;
                shared.list.for_each(|c| {
                    c.sweep_wait(wall, notify_us, period_us);
                    c.sweep_query(wall, query_limit);
                    if let Some(r) = reserve {
                        c.sweep_reserve(wall, r);
                    }
                    if c.sweep_idle_timeout(wall, idle_limit) {
                        timed_out = true;
                        crate::stats::Counters::add(
                            &shared.stats.counters.limits.client_idle_timeout,
                        );
                    }
                    if park && c.sweep_idle() {
                        asked_to_park = true;
                    }
                });
                if timed_out {
                    // Parked clients have no task to nudge: they are
                    // resumed to be told.
                    for id in lot.evicted(shared.outbox.is_open()) {
                        resume(&lot, id);
                    }
                }
            }
        }
    }
}

/// The lot's epoll set turning readable; never, without one.
async fn readable(
    afd: &mut Option<AsyncFd<Poll>>,
) -> Option<tokio::io::unix::AsyncFdReadyMutGuard<'_, Poll>> {
    match afd {
        Some(a) => a.readable_mut().await.ok(),
        None => std::future::pending().await,
    }
}
