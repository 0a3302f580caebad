//! Every open server connection, for `SHOW SERVERS` and `SHOW POOLS`.
//!
//! A connection is listed from the moment its pool opens it until it is
//! dropped (its [`ListedServer`] guard removes it). Its state atomics are
//! written by whoever holds the connection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use crate::client::list::now_us;

const SHARDS: usize = 16;

pub struct ServerInfo {
    pub id: u64,
    /// The database as clients name it, and which backend (0 = primary).
    pub database: String,
    pub backend: usize,
    pub user: String,
    pub addr: SocketAddr,
    pub local: Option<SocketAddr>,
    pub connect_time: SystemTime,
    pub pid: i32,
    /// True while lent to a client.
    active: AtomicU8,
    link: AtomicU64,
    request_time: AtomicU64,
    pub prepared: AtomicU32,
}

#[derive(Debug, Clone)]
pub struct ServerRow {
    pub id: u64,
    pub database: String,
    pub backend: usize,
    pub user: String,
    pub addr: SocketAddr,
    pub local: Option<SocketAddr>,
    pub connect_time: SystemTime,
    pub pid: i32,
    pub active: bool,
    pub link: u64,
    pub request_time_us: u64,
    pub prepared: u32,
}

impl ServerInfo {
    pub fn new(
        id: u64,
        database: &str,
        backend: usize,
        user: &str,
        addr: SocketAddr,
        local: Option<SocketAddr>,
        pid: i32,
    ) -> Self {
        Self {
            id,
            database: database.to_owned(),
            backend,
            user: user.to_owned(),
            addr,
            local,
            connect_time: SystemTime::now(),
            pid,
            active: AtomicU8::new(0),
            link: AtomicU64::new(0),
            request_time: AtomicU64::new(now_us()),
            prepared: AtomicU32::new(0),
        }
    }

    pub fn lent(&self, client: u64) {
        self.link.store(client, Ordering::Relaxed);
        self.active.store(1, Ordering::Relaxed);
        self.request_time.store(now_us(), Ordering::Relaxed);
    }

    pub fn returned(&self, prepared: usize) {
        self.link.store(0, Ordering::Relaxed);
        self.active.store(0, Ordering::Relaxed);
        self.prepared.store(prepared as u32, Ordering::Relaxed);
    }

    pub fn row(&self) -> ServerRow {
        ServerRow {
            id: self.id,
            database: self.database.clone(),
            backend: self.backend,
            user: self.user.clone(),
            addr: self.addr,
            local: self.local,
            connect_time: self.connect_time,
            pid: self.pid,
            active: self.active.load(Ordering::Relaxed) == 1,
            link: self.link.load(Ordering::Relaxed),
            request_time_us: self.request_time.load(Ordering::Relaxed),
            prepared: self.prepared.load(Ordering::Relaxed),
        }
    }
}

#[derive(Default)]
pub struct ServerList {
    shards: [Mutex<HashMap<u64, Arc<ServerInfo>>>; SHARDS],
}

/// Keeps a connection listed while it exists.
pub struct ListedServer {
    list: Arc<ServerList>,
    pub info: Arc<ServerInfo>,
}

impl Drop for ListedServer {
    fn drop(&mut self) {
        self.list.shard(self.info.id).remove(&self.info.id);
    }
}

impl ServerList {
    fn shard(&self, id: u64) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<ServerInfo>>> {
        self.shards[id as usize % SHARDS]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub fn add(self: &Arc<Self>, info: ServerInfo) -> ListedServer {
        let info = Arc::new(info);
        self.shard(info.id).insert(info.id, info.clone());
        ListedServer {
            list: self.clone(),
            info,
        }
    }

    pub fn rows(&self) -> Vec<ServerRow> {
        let mut v: Vec<ServerRow> = self
            .shards
            .iter()
            .flat_map(|s| {
                s.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .values()
                    .map(|i| i.row())
                    .collect::<Vec<_>>()
            })
            .collect();
        v.sort_by_key(|r| r.id);
        v
    }
}
