//! A takeover's moves (`client::migrate`) on the session's side: the old
//! process sends a client between transactions; the new one makes its
//! session again from the record and serves it from its next request.

use std::os::fd::{AsRawFd, OwnedFd};

use super::*;
use crate::client::migrate::{Record, decode_key};

impl Session {
    /// A takeover asked this client to move, and it can now: nothing
    /// buffered or owed, no server, not pinned, no TLS session.
    pub(super) fn may_move(&self) -> bool {
        self.listed.info.eviction() == Eviction::Migrate
            && !self.stream.is_tls()
            && self.shared.outbox.is_open()
            && self.parkable()
    }

    /// Hands this client to the new process. `None` once it is there (or
    /// lost on the way); the session back when it could not be sent, to be
    /// served here as before.
    pub(super) async fn move_out(self: Box<Self>) -> Option<Box<Self>> {
        let shared = self.shared.clone();
        let id = self.listed.info.id;
        let parked = match self.into_parked() {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(client = id, error = %e, "could not move client; closing it");
                return None;
            }
        };
        let record = parked.record();
        // A KILL (or a shutdown) while it waited for its turn: it stays.
        let info = parked.info();
        let still = || info.eviction() == Eviction::Migrate;
        match shared
            .outbox
            .send(&record, parked.socket().as_raw_fd(), still)
            .await
        {
            Ok(()) => {
                tracing::debug!(client = id, "client moved to the new process");
                // Our copy of the socket closes; the new process has its own.
                drop(parked);
                None
            }
            Err(e) => {
                tracing::warn!(client = id, error = %e, "could not move client to the new process; it stays here");
                // Not again (a parked record forgets nothing of this): it
                // is served here until it leaves.
                parked.info().evict(Eviction::Stay);
                match parked.into_session() {
                    Ok((session, _slot)) => Some(session),
                    Err(e) => {
                        tracing::warn!(client = id, error = %e, "could not resume client; closing it");
                        None
                    }
                }
            }
        }
    }
}

/// Serves a client the old process moved here (see `client::migrate`).
pub async fn adopt(shared: Arc<Shared>, r: Record, fd: OwnedFd) {
    let slot = crate::client::ClientSlot::new(&shared);
    let id = shared.next_client_id();
    let std = std::net::TcpStream::from(fd);
    let tcp = match std
        .set_nonblocking(true)
        .and_then(|()| TcpStream::from_std(std))
    {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(error = %e, "a moved client's socket is unusable; closed");
            return;
        }
    };
    let stream = Stream::from_parts(tcp, None);
    match Box::pin(rebuild(&shared, r, stream, id)).await {
        Ok(session) => {
            tracing::debug!(client = id, "client moved here from the old process");
            tokio::spawn(watchdog::Watched::new(
                &shared.watchdog,
                id,
                session.run(slot),
            ));
        }
        Err((mut stream, e)) => {
            tracing::warn!(client = id, error = %e, "a moved client cannot be served here; closing it");
            let mut out = BytesMut::new();
            e.write_fatal(&mut out);
            let _ = tokio::time::timeout(FATAL_WRITE, stream.write_all(&out)).await;
        }
    }
}

/// The session of a moved client, under this process's config.
async fn rebuild(
    shared: &Arc<Shared>,
    r: Record,
    stream: Stream,
    id: u64,
) -> Result<Box<Session>, (Stream, ClientError)> {
    let settings = shared.settings();
    let config = &settings.config;
    let Some(db) = config.databases.get(&r.database) else {
        return Err((stream, ClientError::UnknownDatabase(r.database)));
    };
    let fetched = r
        .fetched_secret
        .as_ref()
        .and_then(|s| s.secret())
        .map(Arc::new);
    let secret = settings
        .users
        .get(&r.user)
        .and_then(|u| u.secret.as_ref())
        .or(fetched.as_deref());
    let client_key = r.client_key.as_deref().and_then(decode_key);
    // The key first: a cancel sent meanwhile finds the client.
    let cancel = shared.cancel.adopt(r.pid, r.secret, id);
    let pool = shared
        .registry
        .pool_for(config, &r.database, db, &r.user, secret, client_key, 0);
    if pool.defaults().is_none()
        && let Err(e) = super::super::startup::learn_defaults(&pool).await
    {
        return Err((stream, e));
    }
    // Already admitted by the old process: listed without the caps, which
    // would turn a move into a dropped client.
    let listed = {
        let _admitting = shared
            .admission
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        shared.list.add(
            crate::client::list::ClientInfo::new(
                id,
                &r.user,
                &r.database,
                stream.peer_addr().ok(),
                stream.local_addr().ok(),
                (cancel.pid, cancel.secret),
                0,
            )
            .connected_at(r.connect_us),
        )
    };
    let l = LoggedIn {
        policy: super::super::startup::policy_for(config, db),
        params: pool.intern(r.params),
        startup: pool.intern(r.startup),
        database: r.database,
        user: r.user,
        pool,
        buf: BytesMut::new(),
        cancel,
        client_key,
        fetched_secret: fetched,
    };
    let mut session = Box::new(Session::new(stream, shared.clone(), l, listed));
    let context = session.param_facts().parse_context.0;
    session.statements = crate::client::migrate::statements(&r.statements, context);
    session.count_statements();
    session.custom_params = r.custom_params.into_iter().collect();
    if r.wrote {
        // Its last write's position is the old process's: reads wait for
        // the replicas as if it had just written.
        session.last_write = session.health.as_ref().map(|h| h.now());
    }
    if !r.channels.is_empty() {
        session.listen_again(&r.channels).await;
    }
    Ok(session)
}
