//! Checking a server connection out of a pool and giving it back.
//!
//! A pool has `size` permits. A checkout takes one (or waits for one, first
//! come first served), then an idle connection or a new one; the permit is
//! held while the connection is lent, and comes back with it. A permit that
//! comes back while clients wait goes straight to the first of them, with
//! its connection when that may serve again: no idle list round trip, no
//! second wake-up. All of it happens under the pool's one lock ([`Core`]),
//! never held across an `.await`.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use super::{Idle, Pool, PoolError, lock};
use crate::protocol::TxStatus;
use crate::server::ServerConn;

/// The pool's one critical section: idle connections, free permits and the
/// queue of waiting checkouts.
#[derive(Default)]
pub(super) struct Core {
    pub(super) idle: Vec<Idle>,
    /// Permits no checkout holds. Idle connections hold none.
    pub(super) free: usize,
    /// Permits to take out of circulation as they come back (a reload
    /// shrank the pool while they were in use).
    pub(super) excess: usize,
    /// Checkouts waiting for a permit, oldest first. Every waiter here is
    /// still waiting: one that gives up removes itself under this lock.
    waiters: VecDeque<Arc<Waiter>>,
    /// Reserve permits lent (each with its connection, closed when it
    /// comes back): at most the pool's `reserve_size`.
    pub(super) reserve_out: usize,
}

impl Core {
    pub(super) fn new(size: usize) -> Self {
        Self {
            free: size,
            ..Self::default()
        }
    }
}

/// A checkout's mailbox while it waits for a permit. A client keeps one for
/// all its checkouts (one at a time), so waiting allocates nothing.
pub struct Waiter {
    state: Mutex<Mailbox>,
}

struct Mailbox {
    /// The waiting task's waker (kept between waits: the same task waits).
    waker: Option<Waker>,
    grant: Grant,
}

enum Grant {
    /// Not waiting.
    Idle,
    /// In a pool's queue.
    Waiting,
    /// A permit, with a connection when the last holder's may serve again.
    Granted(Option<Idle>),
    /// A reserve permit (the checkout waited `reserve_pool_timeout`).
    Reserve,
}

/// What a wait for a permit brought.
enum Got {
    Permit(Option<Idle>),
    Reserve,
}

impl Waiter {
    pub fn new() -> Arc<Waiter> {
        Arc::new(Waiter {
            state: Mutex::new(Mailbox {
                waker: None,
                grant: Grant::Idle,
            }),
        })
    }
}

/// A server connection lent to one client. Give it back with
/// [`PooledConn::release`]; dropping it closes the connection.
pub struct PooledConn {
    idle: Option<Idle>,
    pool: Arc<Pool>,
    /// Opened on a reserve permit: closed when it comes back.
    reserve: bool,
}

/// How a connection comes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// Idle, nothing outstanding: may serve another client.
    Reuse,
    /// State unknown or broken: close it.
    Close,
}

impl PooledConn {
    pub fn conn(&mut self) -> &mut ServerConn {
        self.parts().1
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// The pool and the connection at once (e.g. to account traffic to the
    /// pool while forwarding on the connection).
    pub fn parts(&mut self) -> (&Pool, &mut ServerConn) {
        #[allow(clippy::expect_used)] // `idle` is only None inside release/drop.
        let conn = &mut self
            .idle
            .as_mut()
            .expect("checked-out connection present")
            .conn;
        (&self.pool, conn)
    }

    pub fn release(mut self, how: Release) {
        let Some(mut idle) = self.idle.take() else {
            return;
        };
        let pool = &*self.pool;
        if self.reserve {
            // The burst it served is over (or not): reserve connections do
            // not stay.
            if let Some(l) = &idle.conn.listed {
                l.info.returned(idle.conn.prepared.len());
            }
            pool.in_use.fetch_sub(1, Ordering::Relaxed);
            lock(&pool.core).reserve_out -= 1;
            tracing::debug!(pool = %pool.name(), server = idle.conn.id, "reserve connection closed");
            tokio::spawn(idle.conn.terminate());
            return;
        }
        let lifetime = pool.hot.server_lifetime();
        let expired =
            !lifetime.is_zero() && crate::clock::coarse_since(idle.conn.created) >= lifetime;
        let clean = idle.conn.tx == TxStatus::Idle && idle.conn.buf.is_empty();
        // A cancel request still on its way could stop the next client's
        // query: such a server is closed instead (see `server::list`).
        let cancel_coming = idle
            .conn
            .listed
            .as_ref()
            .is_some_and(|l| l.info.returned(idle.conn.prepared.len()));
        if cancel_coming {
            tracing::debug!(pool = %pool.name(), server = idle.conn.id, "a cancel request is on its way to the server; closing it");
        }
        pool.in_use.fetch_sub(1, Ordering::Relaxed);
        let reuse = how == Release::Reuse
            && clean
            && !expired
            && !cancel_coming
            && pool.retirement() != super::Retirement::Replaced
            && pool.caps_excess() == 0;
        if reuse {
            idle.conn.last_used = crate::clock::coarse_mono_us();
            // Few servers exist: keep a normal-sized read buffer for the
            // next transaction instead of reallocating it; drop big ones.
            if idle.conn.buf.capacity() > 64 * 1024 {
                idle.conn.buf = bytes::BytesMut::new();
            }
        }
        let (id, back) = (idle.conn.id, reuse.then_some(idle));
        let refused = pool.give_back(&mut lock(&pool.core), back);
        if let Some(idle) = refused {
            tracing::debug!(pool = %pool.name(), server = id, ?how, "closing server connection");
            tokio::spawn(idle.conn.terminate());
        } else if !reuse {
            tracing::debug!(pool = %pool.name(), server = id, ?how, expired, "server connection closed");
        }
    }
}

impl Drop for PooledConn {
    fn drop(&mut self) {
        if let Some(idle) = self.idle.take() {
            self.pool.in_use.fetch_sub(1, Ordering::Relaxed);
            if self.reserve {
                lock(&self.pool.core).reserve_out -= 1;
            } else {
                let _ = self.pool.give_back(&mut lock(&self.pool.core), None);
            }
            tracing::debug!(pool = %self.pool.name(), server = idle.conn.id, "server connection dropped without release; closed");
        }
    }
}

/// A permit a checkout (or warm-up) holds while it finds a connection;
/// given back if that is abandoned.
pub(super) struct Held<'a> {
    pool: &'a Pool,
    armed: bool,
    /// A reserve permit.
    reserve: bool,
}

impl Held<'_> {
    /// Gives the permit back with a fresh idle connection (warm-up).
    pub(super) fn give_back(mut self, idle: Idle) {
        self.armed = false;
        if let Some(refused) = self.pool.give_back(&mut lock(&self.pool.core), Some(idle)) {
            tokio::spawn(refused.conn.terminate());
        }
    }

    fn keep(mut self) {
        self.armed = false;
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if self.armed {
            let mut core = lock(&self.pool.core);
            if self.reserve {
                core.reserve_out -= 1;
            } else {
                let _ = self.pool.give_back(&mut core, None);
            }
        }
    }
}

/// Waits for a permit (see [`Waiter`]); gives it on if dropped after it
/// came.
struct Wait<'a> {
    pool: &'a Pool,
    waiter: Option<Arc<Waiter>>,
}

impl Future for Wait<'_> {
    type Output = Got;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Got> {
        let Some(w) = &self.waiter else {
            return Poll::Pending;
        };
        let mut mailbox = lock(&w.state);
        match std::mem::replace(&mut mailbox.grant, Grant::Idle) {
            Grant::Granted(conn) => {
                drop(mailbox);
                self.waiter = None;
                Poll::Ready(Got::Permit(conn))
            }
            Grant::Reserve => {
                drop(mailbox);
                self.waiter = None;
                Poll::Ready(Got::Reserve)
            }
            other => {
                mailbox.grant = other;
                if !mailbox
                    .waker
                    .as_ref()
                    .is_some_and(|k| k.will_wake(cx.waker()))
                {
                    mailbox.waker = Some(cx.waker().clone());
                }
                Poll::Pending
            }
        }
    }
}

impl Drop for Wait<'_> {
    fn drop(&mut self) {
        let Some(w) = self.waiter.take() else { return };
        let mut core = lock(&self.pool.core);
        let grant = std::mem::replace(&mut lock(&w.state).grant, Grant::Idle);
        let refused = match grant {
            // The permit came but nobody took it: pass it on.
            Grant::Granted(conn) => self.pool.give_back(&mut core, conn),
            Grant::Waiting => {
                core.waiters.retain(|x| !Arc::ptr_eq(x, &w));
                None
            }
            Grant::Reserve => {
                core.reserve_out -= 1;
                None
            }
            Grant::Idle => None,
        };
        drop(core);
        if let Some(idle) = refused {
            tokio::spawn(idle.conn.terminate());
        }
    }
}

impl Pool {
    /// Waits (fairly, up to `query_wait_timeout`) for a permit, then hands out
    /// an idle connection or opens a new one.
    pub async fn checkout(self: &Arc<Self>) -> Result<PooledConn, PoolError> {
        let wait = self.settings().query_wait_timeout_or_max();
        let timeout = self.settings().query_wait_timeout;
        let waiter = Waiter::new();
        match tokio::time::timeout(wait, self.checkout_untimed(&waiter)).await {
            Ok(r) => r,
            Err(_) => Err(PoolError::Timeout(timeout)),
        }
    }

    /// Like [`Pool::checkout`], but waits for a permit without a timer: the
    /// caller enforces `query_wait_timeout` itself (clients do, through the
    /// client sweep, so that a wait costs no timer registration). `waiter`
    /// is the caller's mailbox, used by one checkout at a time.
    pub async fn checkout_untimed(
        self: &Arc<Self>,
        waiter: &Arc<Waiter>,
    ) -> Result<PooledConn, PoolError> {
        let (found, reserve) = if self.take_permit(waiter) {
            (self.pop_idle(&mut lock(&self.core)), false)
        } else {
            let granted = Wait {
                pool: self,
                waiter: Some(waiter.clone()),
            }
            .await;
            // A connection handed over by the client that released it was
            // clean, alive and within its lifetime a moment ago.
            match granted {
                Got::Permit(Some(i)) => (Some(i), false),
                Got::Permit(None) => (self.pop_idle(&mut lock(&self.core)), false),
                // A reserve permit always opens a connection of its own.
                Got::Reserve => (None, true),
            }
        };
        // The permit is ours from here; `held` gives it back if opening a
        // connection fails or is abandoned.
        let mut held = self.held();
        held.reserve = reserve;
        let found = match found {
            // Unused for server_check_delay: it must answer the check first.
            Some(i) if self.due_for_check(&i) => Box::pin(self.check(i)).await,
            found => found,
        };
        let idle = match found {
            Some(i) => i,
            // Rare (the pool grows): boxed, so that every waiting client's
            // task does not carry the connection set-up's state.
            None => Box::pin(self.open()).await?,
        };
        held.keep();
        self.in_use.fetch_add(1, Ordering::Relaxed);
        Ok(PooledConn {
            idle: Some(idle),
            pool: self.clone(),
            reserve,
        })
    }

    /// A waiting checkout (`waiter`) gets a reserve permit, if the pool has
    /// one left; true when it did (the checkout then opens a connection).
    /// The caller decides that it waited `reserve_pool_timeout`.
    pub fn grant_reserve(&self, waiter: &Arc<Waiter>) -> bool {
        let size = self.settings().reserve_size as usize;
        if size == 0 {
            return false;
        }
        let mut core = lock(&self.core);
        if core.reserve_out >= size {
            return false;
        }
        let mut mailbox = lock(&waiter.state);
        if !matches!(mailbox.grant, Grant::Waiting) {
            return false;
        }
        core.waiters.retain(|x| !Arc::ptr_eq(x, waiter));
        core.reserve_out += 1;
        mailbox.grant = Grant::Reserve;
        if let Some(w) = &mailbox.waker {
            w.wake_by_ref();
        }
        tracing::info!(pool = %self.name(), "a client waited reserve_pool_timeout: opening a reserve connection");
        true
    }

    /// Reserve connections lent now.
    pub fn reserve_in_use(&self) -> usize {
        lock(&self.core).reserve_out
    }

    /// A permit now (true), or a place in the queue for `waiter`.
    fn take_permit(&self, waiter: &Arc<Waiter>) -> bool {
        let mut core = lock(&self.core);
        if core.free > 0 {
            core.free -= 1;
            return true;
        }
        lock(&waiter.state).grant = Grant::Waiting;
        core.waiters.push_back(waiter.clone());
        false
    }

    /// A free permit, if one is free now (warm-up).
    pub(super) fn try_permit(&self) -> Option<Held<'_>> {
        let mut core = lock(&self.core);
        if core.free == 0 {
            return None;
        }
        core.free -= 1;
        Some(self.held())
    }

    fn held(&self) -> Held<'_> {
        Held {
            pool: self,
            armed: true,
            reserve: false,
        }
    }

    /// An idle connection fit to serve; dead or expired ones are dropped.
    pub(super) fn pop_idle(&self, core: &mut Core) -> Option<Idle> {
        while let Some(idle) = core.idle.pop() {
            if self.usable(&idle) {
                return Some(idle);
            }
        }
        None
    }

    /// On every checkout of an idle connection: two plain loads and a
    /// subtraction (the coarse clock is refreshed by the ticker).
    pub(super) fn due_for_check(&self, idle: &Idle) -> bool {
        crate::clock::coarse_mono_us().saturating_sub(idle.conn.last_used)
            >= self.hot.server_check_delay_us()
    }

    /// Runs `server_check_query` on a connection that sat idle: it serves
    /// when the server answers in time; otherwise it is closed (None: open
    /// another).
    async fn check(&self, mut idle: Idle) -> Option<Idle> {
        let settings = self.settings();
        let _testing = super::Counted::new(&self.testing);
        let answered = tokio::time::timeout(
            settings.server_check_timeout,
            idle.conn.run_internal(&settings.server_check_query),
        )
        .await;
        match answered {
            Ok(Ok(_)) if idle.conn.tx == crate::protocol::TxStatus::Idle => Some(idle),
            other => {
                let why = match other {
                    Err(_) => "no answer in time".to_owned(),
                    Ok(Err(e)) => e.to_string(),
                    Ok(Ok(_)) => "left a transaction open".to_owned(),
                };
                tracing::info!(pool = %self.name(), server = idle.conn.id, reason = %why, "server_check_query failed: closing the connection");
                None
            }
        }
    }

    fn usable(&self, idle: &Idle) -> bool {
        let lifetime = self.hot.server_lifetime();
        let ok = idle.conn.looks_alive()
            && (lifetime.is_zero() || crate::clock::coarse_since(idle.conn.created) < lifetime);
        if !ok {
            tracing::debug!(pool = %self.name(), server = idle.conn.id, "discarding dead or expired idle connection");
        }
        ok
    }

    /// A permit comes back, with its connection when that may serve again:
    /// to the first waiter, else to the free permits and the idle list.
    /// Returns a connection the pool will not keep (to close).
    pub(super) fn give_back(&self, core: &mut Core, conn: Option<Idle>) -> Option<Idle> {
        if core.excess > 0 {
            core.excess -= 1;
            return conn;
        }
        if let Some(w) = core.waiters.pop_front() {
            let mut mailbox = lock(&w.state);
            mailbox.grant = Grant::Granted(conn);
            if let Some(waker) = &mailbox.waker {
                waker.wake_by_ref();
            }
            return None;
        }
        core.free += 1;
        let conn = conn?;
        let size = self.hot.size();
        if core.idle.len() + self.in_use.load(Ordering::Relaxed) < size {
            core.idle.push(conn);
            self.idle_ready.notify_waiters();
            for cap in &self.caps {
                cap.idle_came_back();
            }
            return None;
        }
        Some(conn)
    }

    /// A reload changed the size: permits added serve waiters first; permits
    /// removed come out of the free ones now and the rest as they return.
    pub(super) fn resize(&self, from: u32, to: u32) {
        let mut core = lock(&self.core);
        if to > from {
            let mut grow = (to - from) as usize;
            let cancel = core.excess.min(grow);
            core.excess -= cancel;
            grow -= cancel;
            for _ in 0..grow {
                let _ = self.give_back(&mut core, None);
            }
        } else {
            let shrink = (from - to) as usize;
            let gone = core.free.min(shrink);
            core.free -= gone;
            core.excess += shrink - gone;
        }
    }
}
