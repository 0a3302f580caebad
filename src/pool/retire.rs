//! A pool out of the registry after a reload, and why (`Retirement`):
//! a removed database's pool drains (its clients keep it and its
//! connections, and it goes with the last of them); a re-targeted one is
//! replaced (its connections close as they come back).
//!
//! Invariant: the state only moves away from `Serving`; a dropped pool
//! ends its idle connections with a Terminate.

use std::sync::atomic::Ordering;

use super::{Pool, lock};

/// Why a pool is out of the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Retirement {
    /// In the registry, serving.
    Serving = 0,
    /// A reload removed its database: the clients still connected keep it
    /// and its connections (reused, as before), and it goes with the last
    /// of them (each transaction used to open a new server).
    Draining = 1,
    /// A reload re-targeted it (host, port, dbname, server user, or its
    /// replica removed): clients move to the new pool at their next
    /// transaction, and its connections close as they come back.
    Replaced = 2,
}

impl Drop for Pool {
    fn drop(&mut self) {
        // A draining pool goes with its last client: its idle connections
        // say goodbye to their servers.
        let idle = std::mem::take(&mut lock(&self.core).idle);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            for i in idle {
                rt.spawn(i.conn.terminate());
            }
        }
    }
}

impl Pool {
    pub fn is_retired(&self) -> bool {
        self.retirement() != Retirement::Serving
    }

    pub fn retirement(&self) -> Retirement {
        match self.retired.load(Ordering::Relaxed) {
            0 => Retirement::Serving,
            1 => Retirement::Draining,
            _ => Retirement::Replaced,
        }
    }

    /// Takes the pool out of the registry (see [`Retirement`]): a replaced
    /// pool's idle connections close now, busy ones when they come back.
    pub fn retire(&self, how: Retirement) {
        self.retired.store(how as u8, Ordering::Relaxed);
        if how == Retirement::Replaced {
            self.close_idle();
        }
    }
}
