//! Parking: an idle client gives up its task and buffers (`client::park`
//! keeps its socket and what cannot be derived again), and comes back as a
//! session when it has work.

use super::*;

impl Session {
    /// Nothing ties this idle client to its task: no bytes buffered either
    /// way, nothing owed, no server, no transaction.
    pub(super) fn parkable(&self) -> bool {
        self.buf.is_empty()
            && self.out.is_empty()
            && self.discard == 0
            && !self.skip_until_sync
            && self.owe_error.is_none()
            && self.deferred.is_none()
            && self.pinned.is_none()
            && !self.notifications_pending()
            // A TLS session with something pending keeps its task: the
            // socket alone would not say so.
            && self.stream.is_quiet()
    }

    /// Moves this client to the parking lot. `None` when it is parked (or
    /// lost on the way); the session back when the lot could not take it.
    pub(super) fn park(self: Box<Self>) -> Option<Box<Self>> {
        let lot = self.shared.lot.clone();
        let id = self.listed.info.id;
        let hub = self.listen.as_ref().map(|m| m.hub.clone());
        let info = self.listed.info.clone();
        let parked = match self.into_parked() {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(client = id, error = %e, "could not park client; closing it");
                return None;
            }
        };
        match lot.park(parked) {
            Ok(()) => {
                tracing::debug!(client = id, "client parked");
                // A notification queued while it was parking found no
                // task to wake and no parked record: resume it now.
                if hub.is_some_and(|h| h.has_pending(id)) {
                    lot.wake(id);
                }
                // Asked to leave (or move) while it was parking, after
                // the lot last looked: let it out.
                if !matches!(info.eviction(), Eviction::None | Eviction::Stay) {
                    lot.wake_evicted();
                }
                None
            }
            Err(p) => match p.into_session() {
                // The slot taken for the record is given back: this task's
                // own still counts the client.
                Ok((session, _slot)) => Some(session),
                Err(e) => {
                    tracing::warn!(client = id, error = %e, "could not resume client; closing it");
                    None
                }
            },
        }
    }

    /// Keeps what cannot be derived again; the socket leaves the runtime.
    pub(super) fn into_parked(self: Box<Self>) -> std::io::Result<Parked> {
        let s = *self;
        // A waker kept for this task would keep the task's memory.
        s.listed.info.forget_waker();
        let (tcp, tls) = s.stream.into_parts();
        let socket = tcp.into_std()?;
        let rare = (!s.statements.is_empty()
            || !s.custom_params.is_empty()
            || s.client_key.is_some()
            || s.fetched_secret.is_some()
            || s.listen.is_some()
            || tls.is_some())
        .then(|| {
            Box::new(Rare {
                statements: s.statements,
                custom_params: s.custom_params,
                client_key: s.client_key,
                fetched_secret: s.fetched_secret,
                listen: s.listen,
                tls,
            })
        });
        // A key whose pid is the client's id needs no handle while parked:
        // one is made again on resume.
        let cancel = (!s.cancel.is_client_id(s.listed.info.id)).then(|| Box::new(s.cancel));
        Ok(Parked {
            slot: crate::client::ClientSlot::new(&s.shared),
            socket,
            listed: s.listed,
            pool: s.pool,
            params: s.params,
            startup: s.startup,
            cancel,
            policy: s.policy,
            // 1 ns later at worst (a write at 0): a stricter wait for replicas.
            last_write: s
                .last_write
                .and_then(|at| std::num::NonZeroU64::new(at.max(1))),
            rare,
        })
    }
}

/// A parked client (see `client::park`): only what [`Session`] cannot
/// derive again from the config, the registry and the client list.
pub struct Parked {
    socket: std::net::TcpStream,
    /// Counts the client while it has no task.
    slot: crate::client::ClientSlot,
    listed: Listed,
    pool: Arc<Pool>,
    params: Arc<BTreeMap<String, String>>,
    startup: Arc<BTreeMap<String, String>>,
    /// Its cancel key's handle when the key is in the registry's map (a
    /// key moved here by a takeover); `None` for a key that is the
    /// client's id, which needs none (see `cancel`).
    cancel: Option<Box<CancelHandle>>,
    policy: Policy,
    /// Its last write (read-your-writes): 8 bytes, which keeps a boxed
    /// record within the allocator's 80-byte class (see `client::park`).
    last_write: Option<std::num::NonZeroU64>,
    /// What most clients do not have (boxed so that they pay 8 bytes).
    rare: Option<Box<Rare>>,
}

struct Rare {
    statements: HashMap<String, Arc<Statement>>,
    custom_params: std::collections::BTreeSet<String>,
    client_key: Option<[u8; 32]>,
    fetched_secret: Option<Arc<crate::auth::secret::Secret>>,
    /// Its place in a LISTEN hub: its subscriptions outlive parking.
    listen: Option<crate::client::listen::Membership>,
    /// Its TLS session, if it has one.
    tls: Option<crate::protocol::stream::TlsSession>,
}

impl Parked {
    pub fn info(&self) -> &crate::client::list::ClientInfo {
        &self.listed.info
    }

    pub fn socket(&self) -> &std::net::TcpStream {
        &self.socket
    }

    /// Whether a takeover can move it (`client::migrate`): a TLS session
    /// cannot leave this process.
    pub fn movable(&self) -> bool {
        self.rare.as_ref().is_none_or(|r| r.tls.is_none())
    }

    /// What the new process needs to serve it (see `client::migrate`).
    pub(super) fn record(&self) -> crate::client::migrate::Record {
        use crate::client::migrate::{MovedSecret, MovedStatement, Record, encode_key};
        let rare = self.rare.as_deref();
        let info = &self.listed.info;
        let mut statements: Vec<MovedStatement> = rare
            .map(|r| {
                r.statements
                    .iter()
                    .map(|(name, s)| MovedStatement::of(name, s))
                    .collect()
            })
            .unwrap_or_default();
        statements.sort_by(|a, b| a.name.cmp(&b.name));
        Record {
            database: info.database().to_string(),
            user: info.user().to_string(),
            params: (*self.params).clone(),
            startup: (*self.startup).clone(),
            pid: info.pid,
            secret: info.secret(),
            statements,
            custom_params: rare
                .map(|r| r.custom_params.iter().cloned().collect())
                .unwrap_or_default(),
            client_key: rare.and_then(|r| r.client_key.as_ref()).map(encode_key),
            fetched_secret: rare
                .and_then(|r| r.fetched_secret.as_deref())
                .map(MovedSecret::of),
            channels: rare
                .and_then(|r| r.listen.as_ref())
                .map(|m| m.hub.channels_of(info.id))
                .unwrap_or_default(),
            connect_us: info.connect_us(),
            wrote: self.last_write.is_some(),
        }
    }

    /// Runs the client again in a task of its own.
    pub fn resume(self) {
        let id = self.listed.info.id;
        match self.into_session() {
            Ok((session, slot)) => {
                tracing::debug!(client = id, "client resumed");
                let watchdog = session.shared.watchdog.clone();
                tokio::spawn(crate::watchdog::Watched::new(
                    &watchdog,
                    id,
                    session.run(slot),
                ));
            }
            Err(e) => {
                tracing::warn!(client = id, error = %e, "could not resume client; closing it")
            }
        }
    }

    /// Registers the socket with the runtime again and rebuilds the session.
    pub(super) fn into_session(self) -> std::io::Result<(Box<Session>, crate::client::ClientSlot)> {
        let mut rare = self.rare.map(|r| *r);
        let tls = rare.as_mut().and_then(|r| r.tls.take());
        let stream = Stream::from_parts(TcpStream::from_std(self.socket)?, tls);
        let shared = self.slot.shared().clone();
        let info = &self.listed.info;
        let cancel = match self.cancel {
            Some(mapped) => *mapped,
            None => shared.cancel.handle_of(info.pid, info.secret()),
        };
        let client_key = rare.as_ref().and_then(|r| r.client_key);
        let fetched_secret = rare.as_ref().and_then(|r| r.fetched_secret.clone());
        let l = LoggedIn {
            database: self.listed.info.database().to_string(),
            user: self.listed.info.user().to_string(),
            pool: self.pool,
            params: self.params,
            buf: BytesMut::new(),
            cancel,
            policy: self.policy,
            startup: self.startup,
            client_key,
            fetched_secret,
        };
        let mut session = Box::new(Session::new(stream, shared, l, self.listed));
        // The config may have been reloaded meanwhile: look at the next
        // transaction, as after any reload.
        session.generation = u64::MAX;
        session.last_write = self.last_write.map(std::num::NonZeroU64::get);
        if let Some(r) = rare {
            session.statements = r.statements;
            session.custom_params = r.custom_params;
            session.listen = r.listen;
        }
        Ok((session, self.slot))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_parked_record_fits_its_allocator_class() {
        // See `client::park`: boxed, a record must stay within the 80-byte
        // class (an active session's one object of that class, its
        // checkout mailbox, goes as its record comes, so the records take
        // the places the mailboxes leave).
        let size = std::mem::size_of::<super::Parked>();
        assert!((65..=80).contains(&size), "{size}");
    }
}
