//! Checking a server connection out of a pool and giving it back.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::OwnedSemaphorePermit;

use super::{Idle, Pool, PoolError, lock};
use crate::protocol::TxStatus;
use crate::server::ServerConn;

/// A server connection lent to one client. Give it back with
/// [`PooledConn::release`]; dropping it closes the connection.
pub struct PooledConn {
    idle: Option<Idle>,
    pool: Arc<Pool>,
    permit: Option<OwnedSemaphorePermit>,
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
        let pool = self.pool.clone();
        let s = pool.settings();
        let expired = !s.server_lifetime.is_zero()
            && crate::clock::coarse_since(idle.conn.created) >= s.server_lifetime;
        let clean = idle.conn.tx == TxStatus::Idle && idle.conn.buf.is_empty();
        if let Some(l) = &idle.conn.listed {
            l.info.returned(idle.conn.prepared.len());
        }
        let shrunk = pool.take_excess();
        let in_use = pool
            .in_use
            .fetch_sub(1, Ordering::Relaxed)
            .saturating_sub(1);
        let mut idle_list = lock(&pool.idle);
        let fits = idle_list.len() + in_use < s.size as usize;
        if how == Release::Reuse && clean && !expired && !shrunk && fits && !pool.is_retired() {
            idle.conn.last_used = crate::clock::coarse_instant();
            // Few servers exist: keep a normal-sized read buffer for the
            // next transaction instead of reallocating it; drop big ones.
            if idle.conn.buf.capacity() > 64 * 1024 {
                idle.conn.buf = bytes::BytesMut::new();
            }
            idle_list.push(idle);
        } else {
            drop(idle_list);
            tracing::debug!(pool = %pool.name(), server = idle.conn.id, ?how, expired, shrunk, "closing server connection");
            tokio::spawn(idle.conn.terminate());
        }
        // The permit goes back (waking the next waiter in FIFO order), or out
        // of circulation when the pool shrank.
        if let (true, Some(p)) = (shrunk, self.permit.take()) {
            p.forget();
        }
    }
}

impl Drop for PooledConn {
    fn drop(&mut self) {
        if let Some(idle) = self.idle.take() {
            self.pool.in_use.fetch_sub(1, Ordering::Relaxed);
            if let (true, Some(p)) = (self.pool.take_excess(), self.permit.take()) {
                p.forget();
            }
            tracing::debug!(pool = %self.pool.name(), server = idle.conn.id, "server connection dropped without release; closed");
        }
    }
}

impl Pool {
    /// Waits (fairly, up to `query_wait_timeout`) for a permit, then hands out
    /// an idle connection or opens a new one.
    pub async fn checkout(self: &Arc<Self>) -> Result<PooledConn, PoolError> {
        self.checkout_with(true).await
    }

    /// Like [`Pool::checkout`], but waits for a permit without a timer: the
    /// caller enforces `query_wait_timeout` itself (clients do, through the
    /// client sweep, so that a wait costs no timer registration).
    pub async fn checkout_untimed(self: &Arc<Self>) -> Result<PooledConn, PoolError> {
        self.checkout_with(false).await
    }

    async fn checkout_with(self: &Arc<Self>, timed: bool) -> Result<PooledConn, PoolError> {
        let (wait, timeout, lifetime) = {
            let s = self.settings();
            (
                s.query_wait_timeout_or_max(),
                s.query_wait_timeout,
                s.server_lifetime,
            )
        };
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) if !timed => match self.permits.clone().acquire_owned().await {
                Ok(p) => p,
                Err(_) => return Err(PoolError::Timeout(timeout)),
            },
            Err(_) => {
                match tokio::time::timeout(wait, self.permits.clone().acquire_owned()).await {
                    Ok(Ok(p)) => p,
                    _ => return Err(PoolError::Timeout(timeout)),
                }
            }
        };
        let reused = loop {
            let candidate = lock(&self.idle).pop();
            match candidate {
                None => break None,
                Some(idle)
                    if idle.conn.looks_alive()
                        && (lifetime.is_zero()
                            || crate::clock::coarse_since(idle.conn.created) < lifetime) =>
                {
                    break Some(idle);
                }
                Some(dead) => {
                    tracing::debug!(pool = %self.name(), server = dead.conn.id, "discarding dead or expired idle connection");
                }
            }
        };
        let idle = match reused {
            Some(i) => i,
            None => self.open().await?,
        };
        self.in_use.fetch_add(1, Ordering::Relaxed);
        Ok(PooledConn {
            idle: Some(idle),
            pool: self.clone(),
            permit: Some(permit),
        })
    }
}
