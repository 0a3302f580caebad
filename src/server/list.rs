//! Every open server connection, for `SHOW SERVERS` and `SHOW POOLS`.
//!
//! A connection is listed from the moment its pool opens it until it is
//! dropped (its [`ListedServer`] guard removes it). Its state atomics are
//! written by whoever holds the connection.
//!
//! Invariant: a cancel request reaches a server only while the server is
//! lent to the client that asked ([`ServerInfo::claim_cancel`]), and a
//! server that comes back while one is on its way is not lent again
//! ([`ServerInfo::returned`]): a late cancel never stops another client's
//! query.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::SystemTime;

use crate::clock::precise_us as now_us;

pub struct ServerInfo {
    pub id: u64,
    /// The database as clients name it, and which backend (0 = primary).
    pub database: String,
    pub backend: usize,
    pub user: String,
    pub addr: crate::server::addr::ServerAddr,
    pub local: Option<SocketAddr>,
    pub connect_time: SystemTime,
    pub pid: i32,
    /// The server's cancel secret (with `addr` and `pid`, its cancel key).
    secret: i32,
    /// True while lent to a client.
    active: AtomicU8,
    link: AtomicU64,
    request_time: AtomicU64,
    pub prepared: AtomicU32,
    /// Cancel requests on their way to this server.
    cancels: AtomicU32,
    /// What TLS negotiated, or empty.
    pub tls: String,
}

/// A cancel request on its way to a server, counted on it until dropped
/// (once the server has read it and closed the request's connection).
pub struct CancelInFlight(Arc<ServerInfo>);

impl CancelInFlight {
    /// Where the request goes.
    pub fn key(&self) -> crate::server::CancelKey {
        self.0.cancel_key()
    }
}

impl Drop for CancelInFlight {
    fn drop(&mut self) {
        self.0.cancels.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Debug, Clone)]
pub struct ServerRow {
    pub id: u64,
    pub database: String,
    pub backend: usize,
    pub user: String,
    pub addr: crate::server::addr::ServerAddr,
    pub local: Option<SocketAddr>,
    pub connect_time: SystemTime,
    pub pid: i32,
    pub active: bool,
    pub link: u64,
    pub request_time_us: u64,
    pub prepared: u32,
    pub tls: String,
}

impl ServerInfo {
    pub fn new(
        id: u64,
        database: &str,
        backend: usize,
        user: &str,
        local: Option<SocketAddr>,
        key: crate::server::CancelKey,
    ) -> Self {
        Self {
            tls: String::new(),
            id,
            database: database.to_owned(),
            backend,
            user: user.to_owned(),
            addr: key.addr,
            local,
            connect_time: SystemTime::now(),
            pid: key.pid,
            secret: key.secret,
            active: AtomicU8::new(0),
            link: AtomicU64::new(0),
            request_time: AtomicU64::new(now_us()),
            prepared: AtomicU32::new(0),
            cancels: AtomicU32::new(0),
        }
    }

    /// With what TLS negotiated (SHOW SERVERS' `tls`).
    pub fn with_tls(mut self, tls: String) -> Self {
        self.tls = tls;
        self
    }

    /// The client it is lent to (0: none).
    pub fn link(&self) -> u64 {
        self.link.load(Ordering::Relaxed)
    }

    pub fn cancel_key(&self) -> crate::server::CancelKey {
        crate::server::CancelKey {
            addr: self.addr.clone(),
            pid: self.pid,
            secret: self.secret,
        }
    }

    pub fn lent(&self, client: u64) {
        self.link.store(client, Ordering::Relaxed);
        self.active.store(1, Ordering::Relaxed);
        self.request_time
            .store(crate::clock::coarse_us(), Ordering::Relaxed);
    }

    /// A cancel request for `client` may go to this server: only while it
    /// is lent to that client, and counted until the request is done. The
    /// count goes up before the link is read and [`Self::returned`] clears
    /// the link before it reads the count, both sequentially consistent:
    /// either the request sees the server gone, or the return sees the
    /// request coming.
    pub fn claim_cancel(self: &Arc<Self>, client: u64) -> Option<CancelInFlight> {
        self.cancels.fetch_add(1, Ordering::SeqCst);
        let claim = CancelInFlight(self.clone());
        (client != 0 && self.link.load(Ordering::SeqCst) == client).then_some(claim)
    }

    /// Back from its client. True when a cancel request is on its way to
    /// it: the server may still act on it, so it must not be lent again.
    pub fn returned(&self, prepared: usize) -> bool {
        self.link.store(0, Ordering::SeqCst);
        self.active.store(0, Ordering::Relaxed);
        self.prepared.store(prepared as u32, Ordering::Relaxed);
        self.cancels.load(Ordering::SeqCst) > 0
    }

    pub fn row(&self) -> ServerRow {
        ServerRow {
            id: self.id,
            database: self.database.clone(),
            backend: self.backend,
            user: self.user.clone(),
            addr: self.addr.clone(),
            local: self.local,
            connect_time: self.connect_time,
            pid: self.pid,
            active: self.active.load(Ordering::Relaxed) == 1,
            link: self.link.load(Ordering::Relaxed),
            request_time_us: self.request_time.load(Ordering::Relaxed),
            prepared: self.prepared.load(Ordering::Relaxed),
            tls: self.tls.clone(),
        }
    }
}

impl crate::listing::Listable for ServerInfo {
    fn id(&self) -> u64 {
        self.id
    }
}

/// Every open server connection.
pub type ServerList = crate::listing::Listing<ServerInfo>;
/// Keeps a connection listed while it exists.
pub type ListedServer = crate::listing::Entry<ServerInfo>;

/// Every open server connection's state, by id.
pub fn rows(list: &ServerList) -> Vec<ServerRow> {
    list.all().iter().map(|i| i.row()).collect()
}
