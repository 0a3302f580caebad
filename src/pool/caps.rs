//! Caps on server connections shared by several pools:
//! `max_db_connections` (per database and backend, primary and replicas
//! counted apart) and `max_user_connections` (per user, all databases). A
//! pool takes a permit before it opens a connection and gives it back when
//! the connection closes.
//!
//! Invariants: a reload resizes a cap in place: raising adds permits at
//! once; lowering takes the free ones at once and the rest as connections
//! close (never closing a connection in use; its pools close idle ones at
//! once and busy ones as they come back while the cap has an
//! [`Cap::excess`]); the permits in circulation always move toward the
//! configured size. Zero means no cap. A pool that needs a connection while
//! its cap is full may have another member pool close an idle one (as
//! PgBouncer evicts one): idle connections never keep a cap full for good,
//! also when they become idle after the pool began to wait (a member's
//! connection coming back idle wakes the pools starved on the cap).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use tokio::sync::futures::Notified;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// What "no cap" counts as.
const UNLIMITED: usize = Semaphore::MAX_PERMITS >> 4;

/// A pool as a cap sees it: something holding idle connections under it.
pub trait IdleHolder: Send + Sync {
    /// Closes its least recently used idle connection, giving its permits
    /// back; false when it has none.
    fn close_one_idle(&self) -> bool;
}

pub struct Cap {
    sem: Arc<Semaphore>,
    /// The pools counted under this cap.
    members: Mutex<Vec<Weak<dyn IdleHolder>>>,
    /// The configured size (0: no cap).
    size: AtomicUsize,
    /// Permits the semaphore has in circulation (free or held).
    total: Arc<AtomicUsize>,
    /// A shrink waiting for held permits to come back.
    shrinking: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Pools waiting for room under this cap (see [`Cap::starve`]).
    starved: AtomicUsize,
    /// Wakes them when a member's connection comes back idle.
    idle_ready: Notify,
}

/// A pool waiting for room under a cap, for as long as it lives.
pub struct Starved<'a>(&'a Cap);

impl Starved<'_> {
    /// Resolves when a member's connection comes back idle (enable it
    /// before looking for one to evict).
    pub fn idle_ready(&self) -> Notified<'_> {
        self.0.idle_ready.notified()
    }
}

impl Drop for Starved<'_> {
    fn drop(&mut self) {
        self.0.starved.fetch_sub(1, Ordering::Relaxed);
    }
}

fn permits(size: usize) -> usize {
    if size == 0 { UNLIMITED } else { size }
}

impl Cap {
    pub fn new(size: usize) -> Arc<Cap> {
        Arc::new(Cap {
            sem: Arc::new(Semaphore::new(permits(size))),
            members: Mutex::new(Vec::new()),
            size: AtomicUsize::new(size),
            total: Arc::new(AtomicUsize::new(permits(size))),
            shrinking: Mutex::new(None),
            starved: AtomicUsize::new(0),
            idle_ready: Notify::new(),
        })
    }

    /// The configured size (0: no cap).
    pub fn size(&self) -> usize {
        self.size.load(Ordering::Relaxed)
    }

    /// A permit if one is free now.
    pub fn try_acquire(&self) -> Option<OwnedSemaphorePermit> {
        self.sem.clone().try_acquire_owned().ok()
    }

    /// Counts `pool` under this cap (see [`Cap::evict_idle`]).
    pub fn join(&self, pool: Weak<dyn IdleHolder>) {
        let mut members = self.members.lock().unwrap_or_else(PoisonError::into_inner);
        members.retain(|m| m.strong_count() > 0);
        members.push(pool);
    }

    /// Makes room for `asking` (a member, by address) by closing an idle
    /// connection of another member; true when one was closed.
    pub fn evict_idle(&self, asking: *const ()) -> bool {
        let members: Vec<Arc<dyn IdleHolder>> = self
            .members
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|m| m.as_ptr() as *const () != asking)
            .filter_map(Weak::upgrade)
            .collect();
        members.iter().any(|m| m.close_one_idle())
    }

    /// Counts a pool as waiting for room under this cap while the value
    /// lives.
    pub fn starve(&self) -> Starved<'_> {
        self.starved.fetch_add(1, Ordering::Relaxed);
        Starved(self)
    }

    /// A member's connection came back idle: pools starved on this cap
    /// look again for one to evict (one load when none waits).
    pub fn idle_came_back(&self) {
        if self.starved.load(Ordering::Relaxed) > 0 {
            self.idle_ready.notify_waiters();
        }
    }

    /// Whether a permit is free now (a hint: another may take it first).
    pub fn has_room(&self) -> bool {
        self.sem.available_permits() > 0
    }

    /// A permit, when one is free (waits otherwise).
    pub async fn acquire(&self) -> Option<OwnedSemaphorePermit> {
        self.sem.clone().acquire_owned().await.ok()
    }

    /// Resizes to `size` (see the module's invariants).
    pub fn resize(&self, size: usize) {
        let mut shrinking = self
            .shrinking
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(task) = shrinking.take() {
            // Not yet done: its permits were never taken.
            task.abort();
        }
        self.size.store(size, Ordering::Relaxed);
        let want = permits(size);
        let total = self.total.load(Ordering::Acquire);
        if want > total {
            self.sem.add_permits(want - total);
            self.total.store(want, Ordering::Release);
        } else if want < total {
            let deficit = total - want;
            let now = self.sem.forget_permits(deficit);
            self.total.fetch_sub(now, Ordering::AcqRel);
            let rest = deficit - now;
            if rest > 0 {
                let (sem, total) = (self.sem.clone(), self.total.clone());
                *shrinking = Some(tokio::spawn(async move {
                    if let Ok(p) = sem.acquire_many_owned(rest as u32).await {
                        p.forget();
                        total.fetch_sub(rest, Ordering::AcqRel);
                    }
                }));
            }
        }
    }

    /// Permits in circulation beyond the configured size (after a reload
    /// lowered it): connections to close rather than keep.
    pub fn excess(&self) -> usize {
        match self.size() {
            0 => 0,
            size => self.total.load(Ordering::Acquire).saturating_sub(size),
        }
    }

    /// Permits held now (connections open or opening under this cap).
    pub fn in_use(&self) -> usize {
        self.total
            .load(Ordering::Acquire)
            .saturating_sub(self.sem.available_permits())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_cap_grows_at_once_and_shrinks_as_permits_come_back() {
        let cap = Cap::new(2);
        let a = cap.acquire().await.unwrap();
        let b = cap.acquire().await.unwrap();
        assert_eq!(cap.in_use(), 2);
        cap.resize(3);
        let c = cap.acquire().await.unwrap();
        cap.resize(1);
        assert_eq!(cap.excess(), 2, "three held, one allowed");
        drop(a);
        drop(b);
        tokio::task::yield_now().await;
        // c is still held: nothing else gets in until it comes back.
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), cap.acquire())
                .await
                .is_err()
        );
        drop(c);
        let d = tokio::time::timeout(std::time::Duration::from_secs(1), cap.acquire())
            .await
            .unwrap()
            .unwrap();
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), cap.acquire())
                .await
                .is_err()
        );
        drop(d);
        cap.resize(0);
        let many: Vec<_> = futures_util::future::join_all((0..100).map(|_| cap.acquire())).await;
        assert!(many.iter().all(Option::is_some));
    }
}
