//! The logged-in client's main loop: wait for work without a server, check
//! one out, bring its parameters to the client's, forward both directions as
//! whole buffers until the transaction ends, release (or clean up), repeat.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::Shared;
use super::startup::{LoggedIn, pool_error};
use super::txn::Tracker;
use crate::cancel::{CancelHandle, send_cancel};
use crate::config::PoolMode;
use crate::error::ClientError;
use crate::pool::{Pool, PooledConn, Release};
use crate::protocol::scan::{Scanner, checked_len};
use crate::protocol::{FrontendTag, ProtocolError, TxStatus, write};
use crate::server::ServerError;
use crate::server::params::{is_tracked, sync_sql};

/// Read buffers grow in steps of this much while there is work.
const READ_CHUNK: usize = 16 * 1024;
/// First read buffer when an idle client becomes readable; an idle client
/// itself holds no read buffer at all.
const IDLE_KEEP: usize = 4 * 1024;
/// Server messages can be as large as PostgreSQL allows (1 GiB fields).
const SERVER_MESSAGE_LIMIT: usize = (1 << 30) + 64;
/// How long a ROLLBACK on behalf of a vanished client may take.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Session {
    stream: TcpStream,
    buf: BytesMut,
    out: BytesMut,
    shared: Arc<Shared>,
    pool: Arc<Pool>,
    params: BTreeMap<String, String>,
    cancel: CancelHandle,
    /// An error owed to the client's next request (server lost while idle in
    /// a transaction, or no server could be had).
    owe_error: Option<ClientError>,
    /// After an error inside an extended-query batch: drop until Sync.
    skip_until_sync: bool,
    /// Bytes of a dropped message still to be read and thrown away.
    discard: usize,
    limit: usize,
    database: String,
    user: String,
}

enum Next {
    Transaction,
    Exit,
}

/// How forwarding ended.
enum TxEnd {
    /// The server is idle and clean; give it back.
    Done,
    /// The client went away (or sent Terminate) with the server in this state.
    ClientGone { mid_message: bool },
    /// The server connection failed. `client_skip` bytes of a client message
    /// that was being streamed to it are still to come and must be dropped.
    ServerLost { reason: String, client_skip: usize },
    /// The client broke the protocol or timed out: tell it and close.
    ClientFatal(ClientError),
}

impl Session {
    pub fn new(stream: TcpStream, shared: Arc<Shared>, l: LoggedIn) -> Self {
        Self {
            stream,
            buf: l.buf,
            out: BytesMut::new(),
            limit: shared.config.tidepool.max_message_size,
            shared,
            pool: l.pool,
            params: l.params,
            cancel: l.cancel,
            owe_error: None,
            skip_until_sync: false,
            discard: 0,
            database: l.database,
            user: l.user,
        }
    }

    pub async fn run(mut self) {
        tracing::debug!(database = %self.database, user = %self.user, "session started");
        loop {
            match self.wait_for_work().await {
                Ok(Next::Exit) => return,
                Ok(Next::Transaction) => {}
                Err(e) => return self.fatal(e).await,
            }
            let mut server = match self.acquire().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::info!(error = %e, "no server for client request");
                    self.owe_error = Some(e);
                    continue;
                }
            };
            let mut tracker = Tracker::new(server.conn().tx);
            let end = self.forward(&mut server, &mut tracker).await;
            self.cancel.point_at(None);
            server.conn().tx = tracker.status;
            match end {
                TxEnd::Done => server.release(Release::Reuse),
                TxEnd::ClientGone { mid_message } => {
                    self.clean_up(server, &tracker, mid_message).await;
                    return;
                }
                TxEnd::ServerLost {
                    reason,
                    client_skip,
                } => {
                    tracing::warn!(%reason, "server connection lost mid-transaction");
                    server.release(Release::Close);
                    self.discard = client_skip;
                    self.server_lost(&tracker, reason);
                }
                TxEnd::ClientFatal(e) => {
                    self.clean_up(server, &tracker, true).await;
                    return self.fatal(e).await;
                }
            }
        }
    }

    /// Sends a FATAL error and closes the connection.
    async fn fatal(&mut self, e: ClientError) {
        tracing::info!(error = %e, "closing client");
        e.write_to(&mut self.out);
        let _ = self.stream.write_all(&self.out).await;
        let _ = self.stream.shutdown().await;
    }

    /// Reads more client bytes; an idle client with an empty buffer first
    /// waits for readability so that it holds no buffer while waiting.
    async fn read_more(&mut self) -> std::io::Result<usize> {
        if self.buf.is_empty() && self.buf.capacity() > 0 {
            self.buf = BytesMut::new();
        }
        if self.buf.capacity() == 0 {
            loop {
                self.stream.readable().await?;
                let mut chunk = BytesMut::with_capacity(IDLE_KEEP);
                match self.stream.try_read_buf(&mut chunk) {
                    Ok(n) => {
                        self.buf = chunk;
                        return Ok(n);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            }
        }
        if self.buf.capacity() - self.buf.len() < 1024 {
            self.buf.reserve(READ_CHUNK);
        }
        self.stream.read_buf(&mut self.buf).await
    }

    async fn flush_out(&mut self) -> std::io::Result<()> {
        if !self.out.is_empty() {
            self.stream.write_all(&self.out).await?;
            self.out.clear();
            if self.out.capacity() > IDLE_KEEP {
                self.out = BytesMut::new();
            }
        }
        Ok(())
    }

    /// Idle phase: answers what needs no server (Sync, Flush, stray COPY
    /// messages, owed errors) and returns when a transaction starts.
    async fn wait_for_work(&mut self) -> Result<Next, ClientError> {
        loop {
            if self.discard > 0 {
                let n = self.discard.min(self.buf.len());
                self.buf.advance(n);
                self.discard -= n;
                if self.discard > 0 {
                    if self.read_more().await.unwrap_or(0) == 0 {
                        return Ok(Next::Exit);
                    }
                    continue;
                }
            }
            if self.buf.len() < 5 {
                if self.flush_out().await.is_err() {
                    return Ok(Next::Exit);
                }
                match self.read_more().await {
                    Ok(0) | Err(_) => return Ok(Next::Exit),
                    Ok(_) => continue,
                }
            }
            let tag = FrontendTag::from_byte(self.buf[0]);
            let total = checked_len(self.buf[0], &self.buf[1..5], self.limit)?;
            let owes = self.owe_error.is_some();
            match tag {
                FrontendTag::Terminate => {
                    let _ = self.flush_out().await;
                    return Ok(Next::Exit);
                }
                // PostgreSQL ignores these outside COPY (a failed COPY's tail).
                FrontendTag::CopyData
                | FrontendTag::CopyDone
                | FrontendTag::CopyFail
                | FrontendTag::Flush => {
                    self.discard = total;
                }
                FrontendTag::Sync => {
                    self.discard = total;
                    if let Some(e) = self.owe_error.take() {
                        e.write_to(&mut self.out);
                    }
                    self.skip_until_sync = false;
                    write::ready_for_query(&mut self.out, TxStatus::Idle);
                }
                _ if self.skip_until_sync => self.discard = total,
                FrontendTag::Query | FrontendTag::FunctionCall if owes => {
                    self.discard = total;
                    if let Some(e) = self.owe_error.take() {
                        e.write_to(&mut self.out);
                    }
                    write::ready_for_query(&mut self.out, TxStatus::Idle);
                }
                _ if owes => {
                    self.discard = total;
                    if let Some(e) = self.owe_error.take() {
                        e.write_to(&mut self.out);
                    }
                    self.skip_until_sync = true;
                }
                FrontendTag::Query
                | FrontendTag::FunctionCall
                | FrontendTag::Parse
                | FrontendTag::Bind
                | FrontendTag::Describe
                | FrontendTag::Execute
                | FrontendTag::Close => {
                    if self.flush_out().await.is_err() {
                        return Ok(Next::Exit);
                    }
                    return Ok(Next::Transaction);
                }
                FrontendTag::Password | FrontendTag::Other(_) => {
                    return Err(ProtocolError::UnexpectedTag(self.buf[0] as char).into());
                }
            }
        }
    }

    /// Checks out a server and brings its session parameters to ours.
    async fn acquire(&mut self) -> Result<PooledConn, ClientError> {
        let mut pooled = self
            .pool
            .checkout()
            .await
            .map_err(|e| pool_error(&self.pool, e))?;
        let defaults = self.pool.defaults().unwrap_or_default();
        let conn = pooled.conn();
        if let Some(sql) = sync_sql(&self.params, &conn.params, &defaults) {
            tracing::debug!(server = conn.id, "syncing session parameters");
            match conn.run_internal(&sql).await {
                Ok(changed) => {
                    // Keep the server's spelling (e.g. `UTF8` for `utf8`) so
                    // the next comparison matches.
                    for (k, v) in changed {
                        if let Some(mine) = self.params.get_mut(&k) {
                            *mine = v;
                        }
                    }
                }
                Err(ServerError::Query(f)) => {
                    let reuse = if conn.tx == TxStatus::Idle {
                        Release::Reuse
                    } else {
                        Release::Close
                    };
                    pooled.release(reuse);
                    return Err(ClientError::ServerLogin {
                        code: f.code,
                        message: format!("applying session parameters: {}", f.message),
                    });
                }
                Err(e) => {
                    pooled.release(Release::Close);
                    return Err(ClientError::ServerConnect {
                        database: self.database.clone(),
                        reason: e.to_string(),
                    });
                }
            }
        }
        self.cancel.point_at(Some(pooled.conn().cancel_key));
        Ok(pooled)
    }

    /// Forwards between client and server until the server can be released
    /// (transaction mode), or something ends the session.
    async fn forward(&mut self, pooled: &mut PooledConn, t: &mut Tracker) -> TxEnd {
        let mode = self.pool.settings.mode;
        let idle_tx_timeout = self.shared.config.pool.idle_transaction_timeout;
        let conn = pooled.conn();
        let mut cscan = Scanner::new(self.limit);
        let mut sscan = Scanner::new(SERVER_MESSAGE_LIMIT);
        let mut to_server;
        let mut to_client = BytesMut::new();
        let mut changed = Vec::new();
        let mut client_closed = false;

        // Bytes already read (the message that started this transaction).
        match cscan.scan(&self.buf, &mut t.client_side()) {
            Ok(s) => to_server = self.buf.split_to(s.forward),
            Err(e) => return TxEnd::ClientFatal(e.into()),
        }
        let (mut sr, mut sw) = conn.stream.split();
        let (mut cr, mut cw) = self.stream.split();
        loop {
            if let (true, Some(f)) = (to_client.is_empty(), &t.server_fatal) {
                // The server is going away; what it said becomes the reason.
                return lost(format!("{} ({})", f.message, f.code), &cscan);
            }
            if to_client.is_empty() && to_server.is_empty() {
                if client_closed {
                    return TxEnd::ClientGone {
                        mid_message: cscan.mid_message() || sscan.mid_message(),
                    };
                }
                if mode == PoolMode::Transaction
                    && t.is_idle()
                    && !cscan.mid_message()
                    && !sscan.mid_message()
                    && conn.buf.is_empty()
                {
                    conn.tx = t.status;
                    return TxEnd::Done;
                }
            }
            let idle_in_tx =
                !idle_tx_timeout.is_zero() && t.is_quiet() && t.status != TxStatus::Idle;
            tokio::select! {
                r = sw.write_buf(&mut to_server), if !to_server.is_empty() => {
                    if let Err(e) = r {
                        return lost(e.to_string(), &cscan);
                    }
                    if to_server.is_empty() {
                        to_server = BytesMut::new();
                    }
                }
                r = cw.write_buf(&mut to_client), if !to_client.is_empty() => {
                    if r.is_err() {
                        client_closed = true;
                        to_client.clear();
                        to_server.clear();
                    }
                    if to_client.is_empty() {
                        to_client = BytesMut::new();
                    }
                }
                r = read_into(&mut sr, &mut conn.buf), if to_client.is_empty() => {
                    match r {
                        Ok(0) => return lost("server closed the connection".into(), &cscan),
                        Err(e) => return lost(e.to_string(), &cscan),
                        Ok(_) => {}
                    }
                    match sscan.scan(&conn.buf, &mut t.server_side(&mut changed)) {
                        Ok(s) => to_client = conn.buf.split_to(s.forward),
                        Err(e) => return lost(e.to_string(), &cscan),
                    }

                    for (k, v) in changed.drain(..) {
                        if is_tracked(&k) {
                            self.params.insert(k.clone(), v.clone());
                        }
                        conn.params.insert(k, v);
                    }
                    if client_closed {
                        to_client.clear();
                    }
                }
                r = read_into(&mut cr, &mut self.buf), if to_server.is_empty() && !client_closed && !t.terminated => {
                    match r {
                        Ok(0) | Err(_) => {
                            client_closed = true;
                            continue;
                        }
                        Ok(_) => {}
                    }
                    match cscan.scan(&self.buf, &mut t.client_side()) {
                        Ok(s) => to_server = self.buf.split_to(s.forward),
                        Err(e) => return TxEnd::ClientFatal(e.into()),
                    }
                    if t.terminated {
                        client_closed = true;
                    }
                }
                _ = tokio::time::sleep(idle_tx_timeout), if idle_in_tx => {
                    return TxEnd::ClientFatal(ClientError::IdleTransactionTimeout(idle_tx_timeout));
                }
            }
        }
    }

    /// The client left (or must be closed) while holding `server`: make the
    /// server clean for the next client, or close it.
    async fn clean_up(&mut self, mut server: PooledConn, t: &Tracker, mid_message: bool) {
        let conn = server.conn();
        if mid_message || !t.is_quiet() || !conn.buf.is_empty() {
            // A query or COPY is still running: stop it, then drop the connection.
            let key = conn.cancel_key;
            if t.pending > 0 {
                let _ = send_cancel(key).await;
            }
            server.release(Release::Close);
            return;
        }
        let reset = if self.pool.settings.mode == PoolMode::Session {
            Some(self.pool.settings.server_reset_query.clone()).filter(|q| !q.is_empty())
        } else {
            None
        };
        let sql = match (t.status, reset) {
            (TxStatus::Idle, None) => return server.release(Release::Reuse),
            (TxStatus::Idle, Some(reset)) => reset,
            (_, Some(reset)) => format!("ROLLBACK; {reset}"),
            (_, None) => "ROLLBACK".to_owned(),
        };
        let ok = matches!(
            tokio::time::timeout(CLEANUP_TIMEOUT, conn.run_internal(&sql)).await,
            Ok(Ok(_))
        ) && conn.tx == TxStatus::Idle;
        tracing::debug!(server = conn.id, ok, "cleaned up after departed client");
        server.release(if ok { Release::Reuse } else { Release::Close });
    }

    /// Tells the client its server died: every owed ReadyForQuery gets an
    /// error first; an unsynced batch is skipped until its Sync; a client idle
    /// in the transaction gets the error on its next request.
    fn server_lost(&mut self, t: &Tracker, reason: String) {
        let err = || ClientError::ServerLost(reason.clone());
        for _ in 0..t.pending {
            err().write_to(&mut self.out);
            write::ready_for_query(&mut self.out, TxStatus::Idle);
        }
        if t.unsynced {
            err().write_to(&mut self.out);
            self.skip_until_sync = true;
        } else if t.pending == 0 && t.status != TxStatus::Idle {
            self.owe_error = Some(err());
        }
    }
}

fn lost(reason: String, cscan: &Scanner) -> TxEnd {
    TxEnd::ServerLost {
        reason,
        client_skip: cscan.remaining(),
    }
}

async fn read_into<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
) -> std::io::Result<usize> {
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(READ_CHUNK);
    }
    r.read_buf(buf).await
}
