//! Proxy-issued cancel keys and the server each one currently points at.
//!
//! Every client gets a key at login: its process id is the client's own id
//! (as PostgreSQL's is its backend's), its secret is random. A CancelRequest
//! carrying the key is forwarded to the server the client holds at that
//! moment (that server's own key, found through the client and server lists
//! by the registry's `holder`), and only there: none while the client holds
//! none. So a client's key costs no entry here and nothing per transaction:
//! the client list already says who holds what.
//!
//! Keys that are not a client's id are kept in a map: those a takeover
//! (`upgrade`) moved here with their clients, and those of ids past
//! `i32::MAX` (random pids). During a takeover, a request whose key is not
//! known here is passed to the old process, whose clients that have not
//! moved yet still hold their keys there (`CANCEL pid secret` lines over the
//! takeover's connection, see `client::migrate`).
//!
//! Invariants: secrets are random; a request with a wrong secret does
//! nothing here; the lock is held only for map lookups, never across I/O
//! (the pass to the old process is one non-blocking send).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::BytesMut;
use rand::RngExt;
use tokio::io::AsyncWriteExt;

use crate::protocol::write;
use crate::server::CancelKey;
use crate::server::list::CancelInFlight;

/// What the client list says of a client (by id): the key it was given and
/// the server a request for it goes to now (`None`: it holds no server),
/// claimed for the request until it is dropped.
pub struct Holder {
    pub pid: i32,
    pub secret: i32,
    pub target: Option<CancelInFlight>,
}

/// Looks a client up by id.
type Lookup = Box<dyn Fn(u64) -> Option<Holder> + Send + Sync>;

pub struct CancelRegistry {
    /// Keys whose pid is not their client's id: pid → its secret and client.
    map: Mutex<HashMap<i32, Owner>>,
    holder: Lookup,
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

impl CancelHandle {
    /// Whether the key's pid is `client`'s id: then a request finds the
    /// client through the client list alone, and the handle guards nothing
    /// (a moved key that happens to equal the id resolves the same way once
    /// its entry is gone).
    pub fn is_client_id(&self, client: u64) -> bool {
        u64::try_from(self.pid).is_ok_and(|pid| pid == client)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Default for CancelRegistry {
    /// A registry with no clients (tests).
    fn default() -> Self {
        Self::new(|_| None)
    }
}

impl CancelRegistry {
    /// `holder`: a client's key and the server it holds now, by id.
    pub fn new(holder: impl Fn(u64) -> Option<Holder> + Send + Sync + 'static) -> Self {
        Self {
            map: Mutex::default(),
            holder: Box::new(holder),
            old_process: Mutex::default(),
        }
    }

    /// A fresh key for client `client`: its id as the pid (a random one,
    /// kept in the map, past `i32::MAX`) and a random secret.
    pub fn register(self: &Arc<Self>, client: u64) -> CancelHandle {
        let mut rng = rand::rng();
        let secret = rng.random::<i32>();
        if let Ok(pid) = i32::try_from(client)
            && pid > 0
        {
            return self.handle_of(pid, secret);
        }
        let mut map = lock(&self.map);
        let pid = loop {
            let pid = rng.random_range(1..i32::MAX);
            if !map.contains_key(&pid) {
                break pid;
            }
        };
        self.insert(&mut map, pid, secret, client)
    }

    /// The handle of a key whose pid is its client's id (see
    /// [`CancelHandle::is_client_id`]): such a key has nothing in the
    /// registry to register.
    pub fn handle_of(self: &Arc<Self>, pid: i32, secret: i32) -> CancelHandle {
        CancelHandle {
            registry: self.clone(),
            pid,
            secret,
        }
    }

    /// Registers the key a client already holds (one a takeover moved
    /// here); a fresh key when another moved client here has that pid (the
    /// moved client's cancels then go nowhere, as after a lost key). A pid
    /// that is also a client's id here is no conflict: the secrets tell
    /// the two apart.
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
        self.handle_of(pid, secret)
    }

    /// `None` when no client here has this key; else the server a request
    /// should be forwarded to, if its client holds a server.
    fn resolve(&self, pid: i32, secret: i32) -> Option<Option<CancelInFlight>> {
        if pid <= 0 {
            return None;
        }
        let mapped = match lock(&self.map).get(&pid) {
            Some(o) if o.secret == secret => Some(o.client()),
            _ => None,
        };
        // A mapped key first (a moved client's pid may also be an id here).
        let client = mapped.unwrap_or(pid as u64);
        let h = (self.holder)(client)?;
        (h.pid == pid && h.secret == secret).then_some(h.target)
    }

    /// The server key a valid request should be forwarded to, if any.
    pub fn target(&self, pid: i32, secret: i32) -> Option<CancelKey> {
        self.resolve(pid, secret).flatten().map(|t| t.key())
    }

    /// Forwards a client's CancelRequest; silently ignores bad keys, as
    /// PostgreSQL does.
    pub async fn cancel(&self, pid: i32, secret: i32) {
        let claim = match self.resolve(pid, secret) {
            Some(Some(claim)) => claim,
            None if self.pass_to_old_process(pid, secret) => {
                tracing::debug!(pid, "cancel request passed to the old process");
                return;
            }
            _ => {
                tracing::debug!(pid, "cancel request with unknown key ignored");
                return;
            }
        };
        let key = claim.key();
        let server = key.addr.to_string();
        if let Err(e) = send_cancel(key).await {
            tracing::warn!(error = %e, server, "could not forward cancel request");
        }
        // Only now may the server be lent again (`claim` counted it).
        drop(claim);
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

/// How long a server may take to act on a cancel request.
const CANCEL_DONE_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);

/// Sends a CancelRequest for `key` to its server, and waits until the
/// server has acted on it: PostgreSQL signals the backend, then closes the
/// request's connection. A backend that gets the signal while idle ignores
/// it, so once this returns the request cannot stop a later query.
pub async fn send_cancel(key: CancelKey) -> std::io::Result<()> {
    use tokio::io::AsyncReadExt;
    let mut s = key.addr.connect().await?;
    let mut out = BytesMut::with_capacity(16);
    write::cancel_request(&mut out, key.pid, key.secret);
    s.write_all(&out).await?;
    let mut sink = [0u8; 64];
    let closed = async {
        while s.read(&mut sink).await? > 0 {}
        Ok::<(), std::io::Error>(())
    };
    match tokio::time::timeout(CANCEL_DONE_WITHIN, closed).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the server did not close the cancel request's connection",
        )),
    }
}

impl Drop for CancelHandle {
    /// Removes its map entry, if it has one (most keys have none).
    fn drop(&mut self) {
        let mut map = lock(&self.registry.map);
        if map.get(&self.pid).is_some_and(|o| o.secret == self.secret) {
            map.remove(&self.pid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_key() -> CancelKey {
        CancelKey {
            addr: crate::server::addr::ServerAddr::Tcp("127.0.0.1:5432".parse().unwrap()),
            pid: 7,
            secret: 9,
        }
    }

    /// A client list in a map: id → (pid, secret, holds a server).
    type Clients = Arc<Mutex<HashMap<u64, (i32, i32, bool)>>>;

    fn registry(clients: &Clients) -> Arc<CancelRegistry> {
        let clients = clients.clone();
        Arc::new(CancelRegistry::new(move |id| {
            let (pid, secret, holds) = *lock(&clients).get(&id)?;
            let server = Arc::new(crate::server::list::ServerInfo::new(
                1,
                "d",
                0,
                "u",
                None,
                server_key(),
            ));
            server.lent(id);
            Some(Holder {
                pid,
                secret,
                target: server.claim_cancel(id).filter(|_| holds),
            })
        }))
    }

    /// What a request would resolve to, as keys.
    fn resolved(reg: &CancelRegistry, pid: i32, secret: i32) -> Option<Option<CancelKey>> {
        reg.resolve(pid, secret).map(|t| t.map(|t| t.key()))
    }

    #[test]
    fn only_the_right_secret_finds_the_server() {
        let clients = Clients::default();
        let reg = registry(&clients);
        // Client 5 holds a server; client 6 holds none.
        let h = reg.register(5);
        let idle = reg.register(6);
        assert_eq!((h.pid, idle.pid), (5, 6), "a client's pid is its id");
        assert!(h.is_client_id(5) && !h.is_client_id(6));
        lock(&clients).insert(5, (h.pid, h.secret, true));
        lock(&clients).insert(6, (idle.pid, idle.secret, false));
        assert!(lock(&reg.map).is_empty(), "no entry for them");
        assert_eq!(reg.target(h.pid, h.secret), Some(server_key()));
        assert_eq!(reg.target(h.pid, h.secret.wrapping_add(1)), None);
        assert_eq!(
            resolved(&reg, h.pid, h.secret.wrapping_add(1)),
            None,
            "unknown key"
        );
        assert_eq!(reg.target(idle.pid, idle.secret), None);
        assert_eq!(
            resolved(&reg, idle.pid, idle.secret),
            Some(None),
            "known, holds none"
        );
        assert_eq!(reg.target(0, 0), None);
        assert_eq!(reg.target(-5, h.secret), None);
        // Gone from the list: its key finds nothing.
        lock(&clients).remove(&5);
        assert_eq!(reg.target(h.pid, h.secret), None);
    }

    #[test]
    fn moved_keys_are_mapped_and_told_apart_from_ids_by_their_secret() {
        let clients = Clients::default();
        let reg = registry(&clients);
        // Client 3 here; a moved client (id 8 here) kept pid 3 and its own
        // secret from the old process.
        let native = reg.register(3);
        lock(&clients).insert(3, (3, native.secret, true));
        let secret = native.secret.wrapping_add(1);
        let moved = reg.adopt(3, secret, 8);
        assert_eq!((moved.pid, moved.secret), (3, secret));
        assert!(!moved.is_client_id(8), "kept while parked");
        lock(&clients).insert(8, (3, secret, false));
        assert_eq!(reg.target(3, native.secret), Some(server_key()));
        assert_eq!(
            resolved(&reg, 3, secret),
            Some(None),
            "the moved one, holding none"
        );
        lock(&clients).insert(8, (3, secret, true));
        assert_eq!(reg.target(3, secret), Some(server_key()));
        // A second moved client with that pid gets a fresh key.
        let clash = reg.adopt(3, 42, 9);
        assert_eq!(clash.pid, 9);
        // The native key's drop leaves the moved key's entry alone.
        drop(native);
        assert_eq!(lock(&reg.map).len(), 1);
        drop(moved);
        assert!(lock(&reg.map).is_empty());
    }

    #[test]
    fn ids_past_i32_get_a_mapped_random_pid() {
        assert_eq!(std::mem::size_of::<(i32, Owner)>(), 16);
        for id in [0, 1, u64::from(u32::MAX), u64::from(u32::MAX) + 1, u64::MAX] {
            assert_eq!(Owner::new(-1, id).client(), id);
        }
        let clients = Clients::default();
        let reg = registry(&clients);
        let big = u64::from(u32::MAX) + 5;
        let h = reg.register(big);
        assert!(h.pid > 0);
        lock(&clients).insert(big, (h.pid, h.secret, true));
        assert_eq!(reg.target(h.pid, h.secret), Some(server_key()));
        drop(h);
        assert!(lock(&reg.map).is_empty());
    }
}
