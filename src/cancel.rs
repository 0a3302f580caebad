//! Proxy-issued cancel keys and the server each one currently points at.
//!
//! Every client gets a random (pid, secret) pair at login; its entry names
//! the client. A CancelRequest carrying the key is forwarded to the server
//! the client holds at that moment (its own key, found through the client
//! and server lists by the registry's `target`), and only there: none while
//! the client holds none. No per-client allocation, and nothing to update
//! per transaction: the client and server lists already say who holds what.
//!
//! During a takeover (`upgrade`), a request whose key is not known here is
//! passed to the old process, whose clients that have not moved yet still
//! hold their keys there (`CANCEL pid secret` lines over the takeover's
//! connection, see `client::migrate`).
//!
//! Invariants: secrets are random; a request with a wrong secret does
//! nothing; the lock is held only for map lookups, never across I/O (the
//! pass to the old process is one non-blocking send).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::BytesMut;
use rand::RngExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::protocol::write;
use crate::server::CancelKey;

/// The server a client (by id) holds now, as that server's cancel key.
type Target = Box<dyn Fn(u64) -> Option<CancelKey> + Send + Sync>;

pub struct CancelRegistry {
    /// pid → its secret and client.
    map: Mutex<HashMap<i32, Owner>>,
    target: Target,
    /// After a takeover, while the old process runs: where requests with
    /// keys unknown here go.
    old_process: Mutex<Option<std::os::unix::net::UnixStream>>,
}

/// A key's secret and the client it names: 4-byte aligned, so that an entry
/// of the map is 16 bytes, not 24 (one per client; see `client::park`).
#[derive(Clone, Copy)]
struct Owner {
    secret: i32,
    client: [u32; 2],
}

impl Owner {
    fn new(secret: i32, client: u64) -> Self {
        Self {
            secret,
            client: [client as u32, (client >> 32) as u32],
        }
    }

    fn client(self) -> u64 {
        u64::from(self.client[0]) | (u64::from(self.client[1]) << 32)
    }
}

/// A client's registration; removed from the registry when dropped.
pub struct CancelHandle {
    registry: Arc<CancelRegistry>,
    pub pid: i32,
    pub secret: i32,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Default for CancelRegistry {
    /// A registry whose clients never hold a server (tests).
    fn default() -> Self {
        Self::new(|_| None)
    }
}

impl CancelRegistry {
    /// `target`: the server a client holds now, if any.
    pub fn new(target: impl Fn(u64) -> Option<CancelKey> + Send + Sync + 'static) -> Self {
        Self {
            map: Mutex::default(),
            target: Box::new(target),
            old_process: Mutex::default(),
        }
    }

    /// A fresh key for client `client`.
    pub fn register(self: &Arc<Self>, client: u64) -> CancelHandle {
        let mut rng = rand::rng();
        let mut map = lock(&self.map);
        let (pid, secret) = loop {
            let pid = rng.random_range(1..i32::MAX);
            if !map.contains_key(&pid) {
                break (pid, rng.random::<i32>());
            }
        };
        self.insert(&mut map, pid, secret, client)
    }

    /// Registers the key a client already holds (one a takeover moved
    /// here); a fresh key when another client here has that pid (the
    /// moved client's cancels then go nowhere, as after a lost key).
    pub fn adopt(self: &Arc<Self>, pid: i32, secret: i32, client: u64) -> CancelHandle {
        {
            let mut map = lock(&self.map);
            if pid > 0 && !map.contains_key(&pid) {
                return self.insert(&mut map, pid, secret, client);
            }
        }
        tracing::warn!(
            pid,
            "a moved client's cancel key is taken here; it gets a new one"
        );
        self.register(client)
    }

    /// The entry for a free `pid`, and its handle.
    fn insert(
        self: &Arc<Self>,
        map: &mut HashMap<i32, Owner>,
        pid: i32,
        secret: i32,
        client: u64,
    ) -> CancelHandle {
        map.insert(pid, Owner::new(secret, client));
        CancelHandle {
            registry: self.clone(),
            pid,
            secret,
        }
    }

    /// The server key a valid request should be forwarded to, if any.
    pub fn target(&self, pid: i32, secret: i32) -> Option<CancelKey> {
        let client = match lock(&self.map).get(&pid) {
            Some(o) if o.secret == secret => o.client(),
            _ => return None,
        };
        (self.target)(client)
    }

    /// Forwards a client's CancelRequest; silently ignores bad keys, as
    /// PostgreSQL does.
    pub async fn cancel(&self, pid: i32, secret: i32) {
        let Some(key) = self.target(pid, secret) else {
            if !lock(&self.map).contains_key(&pid) && self.pass_to_old_process(pid, secret) {
                tracing::debug!(pid, "cancel request passed to the old process");
                return;
            }
            tracing::debug!(pid, "cancel request with unknown key ignored");
            return;
        };
        if let Err(e) = send_cancel(key).await {
            tracing::warn!(error = %e, server = %key.addr, "could not forward cancel request");
        }
    }
}

impl CancelRegistry {
    /// Requests with keys unknown here go to the old process over `s`
    /// from now on, until it is gone.
    pub fn pass_unknown_to(&self, s: std::os::unix::net::UnixStream) {
        *lock(&self.old_process) = Some(s);
    }

    /// One non-blocking send of `CANCEL pid secret`; false when there is
    /// no old process (any more).
    fn pass_to_old_process(&self, pid: i32, secret: i32) -> bool {
        use std::os::fd::AsRawFd;
        let mut old = lock(&self.old_process);
        let Some(s) = old.as_ref() else {
            return false;
        };
        let line = format!("CANCEL {pid} {secret}\n");
        // SAFETY: send(2) on an open socket this process owns, from a
        // buffer of the length given.
        let n = unsafe {
            libc::send(
                s.as_raw_fd(),
                line.as_ptr().cast(),
                line.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n == line.len() as isize {
            return true;
        }
        let e = std::io::Error::last_os_error();
        if n < 0 && e.kind() == std::io::ErrorKind::WouldBlock {
            tracing::warn!(
                pid,
                "cancel request for the old process dropped: its connection is full"
            );
            return true;
        }
        // Gone (or a partial line, which would garble the next): stop.
        *old = None;
        false
    }
}

/// Sends a CancelRequest for `key` to its server.
pub async fn send_cancel(key: CancelKey) -> std::io::Result<()> {
    let mut s = TcpStream::connect(key.addr).await?;
    let mut out = BytesMut::with_capacity(16);
    write::cancel_request(&mut out, key.pid, key.secret);
    s.write_all(&out).await?;
    s.shutdown().await
}

impl Drop for CancelHandle {
    fn drop(&mut self) {
        lock(&self.registry.map).remove(&self.pid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_right_secret_finds_the_server() {
        let key = CancelKey {
            addr: "127.0.0.1:5432".parse().unwrap(),
            pid: 7,
            secret: 9,
        };
        // Client 5 holds a server; client 6 holds none.
        let reg = Arc::new(CancelRegistry::new(move |c| (c == 5).then_some(key)));
        let h = reg.register(5);
        let idle = reg.register(6);
        assert_eq!(reg.target(h.pid, h.secret), Some(key));
        assert_eq!(reg.target(h.pid, h.secret.wrapping_add(1)), None);
        assert_eq!(reg.target(idle.pid, idle.secret), None);
        let pid = h.pid;
        drop(h);
        assert_eq!(reg.target(pid, 0), None);
        // A moved client's key is adopted for it, unless the pid is taken.
        let moved = reg.adopt(1234, 42, 5);
        assert_eq!(reg.target(1234, 42), Some(key));
        let clash = reg.adopt(1234, 43, 6);
        assert_ne!(clash.pid, 1234);
        drop(moved);
        assert_eq!(reg.target(1234, 42), None);
    }

    #[test]
    fn an_entry_is_16_bytes_and_keeps_any_client_id() {
        assert_eq!(std::mem::size_of::<(i32, Owner)>(), 16);
        for id in [0, 1, u64::from(u32::MAX), u64::from(u32::MAX) + 1, u64::MAX] {
            assert_eq!(Owner::new(-1, id).client(), id);
        }
        let key = CancelKey {
            addr: "127.0.0.1:5432".parse().unwrap(),
            pid: 7,
            secret: 9,
        };
        let big = u64::from(u32::MAX) + 5;
        let reg = Arc::new(CancelRegistry::new(move |c| (c == big).then_some(key)));
        let h = reg.register(big);
        assert_eq!(reg.target(h.pid, h.secret), Some(key));
    }
}
