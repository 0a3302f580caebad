//! Forwarding one transaction: the I/O loop that moves whole buffers both
//! ways, through the two scans of `scans` (client → server, server →
//! client); it ends with a `TxEnd` saying how.
//!
//! Invariant: the server is given back only when the tracker says idle, no
//! message is half forwarded either way, and nothing is buffered.

use super::scans::{ClientIn, scan_server};
use super::*;
use crate::client::txn::Batch;

impl Session {
    /// Forwards between client and server until the server can be released
    /// (transaction mode), or something ends the session.
    pub(super) async fn forward(&mut self, pooled: &mut PooledConn, t: &mut Tracker) -> TxEnd {
        let mode = self.pool.hot.mode();
        let idle_tx_timeout = self.settings.config.pool.idle_transaction_timeout;
        let (server_pool, conn) = pooled.parts();
        // The checkout's wait belongs to its first transaction only.
        let pool_wait_us = std::mem::take(&mut self.pool_wait_us);
        let stmt_ctx = StatementCtx {
            database: &self.db_label,
            user: &self.user,
            backend: &server_pool.addr,
            role: if server_pool.backend == 0 {
                Role::Primary
            } else {
                Role::Replica
            },
            client: self.listed.info.addr(),
            slow_us: server_pool.hot.slow_query_us(),
            backend_index: server_pool.backend,
            spans: &self.shared.spans,
            pool_wait_us: std::cell::Cell::new(pool_wait_us),
        };
        let info = self.listed.info.clone();
        let mut cscan = Scanner::frontend(self.limit);
        let mut sscan = Scanner::new(SERVER_MESSAGE_LIMIT);
        // What the session owes the client already (notifications that
        // came while a pinned server was asked about its state) goes first.
        let mut to_client = std::mem::take(&mut self.out);
        let mut changed = Vec::new();
        let mut client_closed = false;
        // When the server last sent something (for a server that may have
        // stopped answering after query_timeout's cancel).
        let mut server_heard = crate::clock::mono_ns();

        let stats = &*self.shared.stats;
        let counters = &stats.counters;
        let cap = self.settings.config.pool.max_prepared_statements as usize;
        let mut client = ClientIn {
            statements: &mut self.statements,
            counters,
            catalog: &server_pool.catalog,
            cap,
            shapes: &stats.shapes,
        };
        // Bytes already read (the message that started this transaction)
        // are scanned on the first pass.
        let mut to_server = conn.prepend.take().unwrap_or_default();
        let mut rescan = true;
        // Leak detection: since when the client, holding this server, has
        // left it unused (monotonic ns), its reported hold, and its last
        // statement's fingerprint (for the report).
        let leak_after = self.settings.config.pool.leak_warn_after;
        let mut quiet_since: Option<u64> = None;
        let mut leak: Option<crate::client::leaks::LeakGuard> = None;
        let mut last_fingerprint: Option<u64> = None;
        // Since when the client's transaction has been idle (monotonic ns).
        let mut idle_tx_since: Option<u64> = None;
        let (ss, cs) = (&conn.stream, &self.stream);
        loop {
            if t.reroute
                && t.expect.ready_owed() == 0
                && t.status != TxStatus::Idle
                && to_server.is_empty()
            {
                // The replica transaction went on (BEGIN READ ONLY): what
                // waited runs there and gets PostgreSQL's own answer.
                t.reroute = false;
                t.replica_guard = None;
                rescan = true;
            }
            if std::mem::take(&mut rescan)
                && let Err(e) = client.scan(
                    &mut self.buf,
                    &mut cscan,
                    t,
                    &mut conn.prepared,
                    &mut to_server,
                    &mut to_client,
                )
            {
                return TxEnd::ClientFatal(e.into());
            }
            // What the scan left starts at a message boundary: a message
            // that must be seen whole gets room for all of it at once.
            reserve_head(&mut self.buf, self.limit);
            if self.buf.capacity() > crate::client::budget::CHARGED_ABOVE
                && !self.charge.cover(self.buf.capacity())
            {
                Counters::add(&counters.limits.max_client_buffer_bytes);
                return TxEnd::ClientFatal(ClientError::BufferBudget(self.shared.buffers.limit()));
            }
            if t.expect.ready_owed() > 1 || to_client.len() > crate::client::txn::MISROUTE_HOLD {
                // A second request in flight, or too much to hold: the
                // safety net covers one request's answer only.
                t.misroute.give_up();
            }
            if let crate::client::txn::Misroute::Fired(_) = &t.misroute
                && t.expect.ready_owed() == 0
                && t.expect.is_empty()
                && to_server.is_empty()
                && conn.buf.is_empty()
                && !sscan.mid_message()
                && let crate::client::txn::Misroute::Fired(replay) = std::mem::take(&mut t.misroute)
            {
                // The refusal and what came with it never reach the client.
                // A transaction block the query opened on the replica is
                // left there: that server is closed (see the session), and
                // the whole query runs again on the primary.
                to_client.clear();
                conn.tx = t.status;
                return TxEnd::Misrouted {
                    replay,
                    refused: true,
                };
            }
            let holding = t.misroute.holds();
            if t.terminated {
                client_closed = true;
            }
            if server_pool.backend != 0
                && let Some(f) = &t.server_fatal
                && (to_client.is_empty() || t.misroute.holds())
            {
                // A replica ends the session (a restart's shutdown, a
                // terminated backend): the client never chose it.
                let reason = format!("{} ({})", f.message, f.code);
                return replica_gone(t, &mut to_client, reason, &cscan);
            }
            if let (true, Some(f)) = (to_client.is_empty(), &t.server_fatal) {
                // The server ends the session under the client's
                // transaction (pg_terminate_backend, a timeout, a shutdown):
                // the client gets its FATAL, as it would directly, and then
                // its connection ends, as it would directly.
                let reason = format!("{} ({})", f.message, f.code);
                // The scan stopped at the (whole) FATAL message.
                let whole = (conn.buf.len() >= 5)
                    .then(|| checked_len(conn.buf[0], &conn.buf[1..5], SERVER_MESSAGE_LIMIT).ok())
                    .flatten()
                    .filter(|total| conn.buf.len() >= *total);
                let Some(total) = whole else {
                    return lost(reason, &cscan);
                };
                let fatal = conn.buf.split_to(total);
                return TxEnd::ServerFatal { reason, fatal };
            }
            if to_client.is_empty() && to_server.is_empty() {
                if client_closed {
                    return TxEnd::ClientGone {
                        mid_message: cscan.mid_message() || sscan.mid_message(),
                    };
                }
                if let (None, Some(reason)) = (&self.pinned, t.pin) {
                    self.pinned = Some(self.shared.pins.pin(info.id, reason));
                    // Pinned on a replica (state taken in a read-only
                    // transaction): the client's transactions run there
                    // while the state lasts, as they come; a write gets the
                    // replica's own refusal at once. Nothing may move them
                    // to the primary (the net waited for a replay that a
                    // pinned session never makes: the client hung).
                    t.replica_guard = None;
                    t.misroute.give_up();
                    tracing::info!(
                        client = info.id,
                        reason,
                        "client pinned to its server while its session state lasts"
                    );
                }
                let half_sent = cscan.mid_message() || sscan.mid_message() || !conn.buf.is_empty();
                if mode == PoolMode::Transaction
                    && t.verdict(half_sent) == crate::client::txn::Verdict::Reuse
                {
                    match &self.pinned {
                        None => {
                            conn.tx = t.status;
                            return TxEnd::Done;
                        }
                        Some(pin) if t.pin_check_due && crate::client::pins::ends(pin.reason()) => {
                            conn.tx = t.status;
                            return TxEnd::PinCheck;
                        }
                        Some(_) => {}
                    }
                }
            }
            let idle_in_tx =
                !idle_tx_timeout.is_zero() && t.is_quiet() && t.status != TxStatus::Idle;
            // Counted from when the transaction went quiet, not from this
            // turn of the loop: other wake-ups (query_timeout's checks every
            // sweep, a leak report) must not restart it.
            if !idle_in_tx {
                idle_tx_since = None;
            }
            let idle_tx_due = idle_in_tx.then(|| due_after(&mut idle_tx_since, idle_tx_timeout));
            let held_unused = !leak_after.is_zero()
                && to_server.is_empty()
                && to_client.is_empty()
                && t.is_quiet()
                && (t.status != TxStatus::Idle || self.pinned.is_some());
            if !held_unused {
                quiet_since = None;
                leak = None;
            }
            let leak_due =
                (held_unused && leak.is_none()).then(|| due_after(&mut quiet_since, leak_after));
            let read_client =
                to_server.is_empty() && !client_closed && !t.terminated && t.batch != Batch::Held;
            // Sends first, without a wait: a socket is nearly always writable,
            // and most turns only send what was just scanned.
            let sent = if !to_server.is_empty() {
                unless_would_block(ss.try_send(&mut to_server)).map(Event::SentServer)
            } else if !to_client.is_empty() && !holding {
                unless_would_block(cs.try_send(&mut to_client)).map(Event::SentClient)
            } else {
                None
            };
            let event = if let Some(sent) = sent {
                sent
            } else if to_server.is_empty()
                && to_client.is_empty()
                && !idle_in_tx
                && leak_due.is_none()
            {
                // The usual wait, between a request sent and its answer:
                // polled by hand, without building a select! of futures.
                std::future::poll_fn(|cx| {
                    if let Poll::Ready(r) = poll_read_into(ss, &mut conn.buf, cx) {
                        return Poll::Ready(Event::ServerRead(r));
                    }
                    if read_client && let Poll::Ready(r) = poll_read_into(cs, &mut self.buf, cx) {
                        return Poll::Ready(Event::ClientRead(r));
                    }
                    info.poll_nudged(cx).map(|()| Event::Nudged)
                })
                .await
            } else {
                // `biased`: the branches are tried in order, without drawing
                // a random number per poll; none starves, as each one drains
                // what enables it (a send empties its buffer; reads stop
                // while what they brought waits to be sent).
                tokio::select! {
                    biased;
                    r = ss.send(&mut to_server), if !to_server.is_empty() => Event::SentServer(r),
                    r = cs.send(&mut to_client), if !to_client.is_empty() && !holding => Event::SentClient(r),
                    r = read_into(ss, &mut conn.buf), if to_client.is_empty() || holding => Event::ServerRead(r),
                    r = read_into(cs, &mut self.buf), if read_client => Event::ClientRead(r),
                    // Made on first poll (the timer costs nothing while the
                    // branch is off), for the deadline set above.
                    _ = async { tokio::time::sleep_until(idle_tx_due.unwrap_or_else(tokio::time::Instant::now)).await }, if idle_tx_due.is_some() => Event::IdleTimeout,
                    _ = async { tokio::time::sleep_until(leak_due.unwrap_or_else(tokio::time::Instant::now)).await }, if leak_due.is_some() => Event::Leak,
                    _ = info.nudged() => Event::Nudged,
                }
            };
            match event {
                Event::SentServer(r) => {
                    if let Err(e) = r {
                        return lost(e.to_string(), &cscan);
                    }
                    if to_server.is_empty() {
                        to_server = BytesMut::new();
                    }
                }
                Event::SentClient(r) => {
                    match r {
                        Ok(n) => t.timing.delta.sent += n as u64,
                        Err(_) => {
                            client_closed = true;
                            to_client.clear();
                            to_server.clear();
                        }
                    }
                    if to_client.is_empty() {
                        to_client = BytesMut::new();
                    }
                }
                Event::ServerRead(r) => {
                    server_heard = crate::clock::mono_ns();
                    match r {
                        Ok(0) | Err(_) if server_pool.backend != 0 => {
                            let reason = r.err().map_or_else(
                                || "server closed the connection".to_owned(),
                                |e| e.to_string(),
                            );
                            return replica_gone(t, &mut to_client, reason, &cscan);
                        }
                        Ok(0) => return lost("server closed the connection".into(), &cscan),
                        Err(e) => return lost(e.to_string(), &cscan),
                        Ok(_) => {}
                    }
                    if let Err(e) = scan_server(
                        &mut conn.buf,
                        &mut sscan,
                        t,
                        &mut changed,
                        &mut to_client,
                        client.statements,
                    ) {
                        return lost(e.to_string(), &cscan);
                    }
                    if t.expect.has_statement_news() {
                        apply_undos(t.expect.take_undos(), client.statements, &mut conn.prepared);
                        self.pool.confirm_statements(&t.expect.take_confirmed());
                        for (hash, shape) in t.expect.take_described() {
                            let shape = crate::server::prepared::Described::now(shape);
                            conn.prepared.set_shape(hash, shape);
                            // The client statements just prepared here are
                            // promised this shape.
                            for stmt in client.statements.values().filter(|s| s.hash == hash) {
                                let _ = stmt.promised.set(shape);
                            }
                        }
                    }
                    if t.batch == Batch::Held && !t.expect.describing() {
                        // The held message goes on; if preparing it failed
                        // (the client got the error), the server skips to
                        // the Sync and so does the client's stream.
                        t.batch = if t.expect.skipping() {
                            Batch::Skipping
                        } else {
                            Batch::Open
                        };
                        rescan = true;
                    }
                    for (hash, version) in t.broken.drain(..) {
                        server_pool.catalog.mark_broken(hash, version);
                    }
                    if std::mem::take(&mut t.schema_changed) {
                        // DDL ended: every server prepares its statements
                        // afresh before their next use, and the function
                        // volatilities are loaded again.
                        server_pool.catalog.schema_changed();
                        if let Some(h) = &self.health {
                            h.functions_stale
                                .store(true, std::sync::atomic::Ordering::Release);
                        }
                    }
                    for (hash, generation, error) in t.stale.drain(..) {
                        // Every server of the database closes this text's
                        // statement before preparing it again; clients
                        // that prepared it before get PostgreSQL's 0A000.
                        if server_pool.catalog.mark_stale(hash, generation, &error) {
                            t.timing.delta.prepared_invalidations += 1;
                            tracing::info!(
                                statement = %crate::server::prepared::server_name(hash),
                                "a statement's result changed (a migration?): prepared afresh at its next use"
                            );
                        }
                    }
                    if !t.timing.done.is_empty() || !t.timing.xacts_done.is_empty() {
                        if let Some(id) = t
                            .timing
                            .done
                            .iter()
                            .rev()
                            .find_map(|f| f.shape.as_ref().map(|s| s.id))
                        {
                            last_fingerprint = Some(id);
                        }
                        stmt_ctx.record(stats, &server_pool.traffic, &self.params, &mut t.timing);
                    }

                    // Mostly none (an empty drain still costs its guard).
                    if !changed.is_empty() {
                        for (k, v) in changed.drain(..) {
                            if is_tracked(&k) && self.params.get(&k) != Some(&v) {
                                Arc::make_mut(&mut self.params).insert(k.clone(), v.clone());
                            }
                            conn.params.insert(k, v);
                            conn.synced_to = None;
                        }
                    }
                    if client_closed {
                        to_client.clear();
                    }
                }
                Event::ClientRead(r) => match r {
                    Ok(0) | Err(_) => {
                        client_closed = true;
                        // Nobody to replay for: what is held goes (or
                        // fails to go) now, so that the end is seen.
                        t.misroute.give_up();
                    }
                    Ok(_) => {
                        if t.status == TxStatus::Idle
                            && t.is_quiet()
                            && (self.pinned.is_some() || mode == PoolMode::Session)
                            && self
                                .health
                                .as_ref()
                                .is_some_and(|h| h.is_fenced(server_pool.backend))
                        {
                            // A failover moved writes away from the server
                            // this session's state is on: nothing more of
                            // it may run there (the state cannot move).
                            return TxEnd::ClientFatal(ClientError::Fenced(
                                server_pool.addr.to_string(),
                            ));
                        }
                        rescan = true;
                    }
                },
                Event::IdleTimeout => {
                    return TxEnd::ClientFatal(ClientError::IdleTransactionTimeout(
                        idle_tx_timeout,
                    ));
                }
                Event::Leak => {
                    let state = match (t.status, &self.pinned) {
                        (TxStatus::Failed, _) => "idle in transaction (aborted)".to_owned(),
                        (TxStatus::InTransaction, _) => "idle in transaction".to_owned(),
                        (TxStatus::Idle, Some(p)) => format!("pinned idle ({})", p.reason()),
                        (TxStatus::Idle, None) => "idle".to_owned(),
                    };
                    let quiet = quiet_since
                        .map(|s| Duration::from_nanos(crate::clock::mono_ns().saturating_sub(s)))
                        .unwrap_or_default();
                    leak = Some(
                        self.shared.leaks.report(crate::client::leaks::Leak {
                            client: info.id,
                            user: self.user.clone(),
                            database: self.database.clone(),
                            application_name: info.application_name(),
                            addr: info
                                .addr()
                                .map_or_else(|| "unix".to_owned(), |a| a.to_string()),
                            state,
                            since: std::time::SystemTime::now() - quiet,
                            fingerprint: last_fingerprint,
                        }),
                    );
                }
                // KILL wakes this; a shutdown (or a parking sweep) does not
                // interrupt a transaction.
                Event::Nudged => {
                    if info.eviction().leaves_now() {
                        return TxEnd::Killed;
                    }
                    let limit = self.settings.config.pool.query_timeout;
                    if limit.is_zero() {
                        continue;
                    }
                    let ns =
                        |d: std::time::Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
                    let now = crate::clock::mono_ns();
                    let age = t
                        .timing
                        .oldest_pending()
                        .map_or(0, |s| now.saturating_sub(s));
                    if t.timeout_cancel.is_none() {
                        if age >= ns(limit) {
                            // Canceled on the server; the server is closed
                            // after this transaction, so that a late cancel
                            // can never reach another client's query.
                            tracing::info!(
                                client = info.id,
                                server = conn.id,
                                ?limit,
                                "query_timeout: canceling the request"
                            );
                            Counters::add(&counters.limits.query_timeout);
                            t.timeout_cancel = Some(format!(
                                "canceling statement due to query_timeout ({})",
                                humantime::format_duration(limit)
                            ));
                            let key = conn.cancel_key.clone();
                            tokio::spawn(async move {
                                let _ = crate::cancel::send_cancel(key).await;
                            });
                        } else {
                            info.request_started(
                                crate::clock::precise_us().saturating_sub(age / 1000),
                            );
                        }
                        continue;
                    }
                    // Canceled already. A server that is silent while
                    // tidepool waits on it (stopped, partitioned away) is
                    // given up after a grace: the client gets an error now
                    // instead of waiting on it for ever. A client slow to
                    // take its answer, a server still sending, or COPY FROM
                    // STDIN (the server waits for the client) is not that.
                    let grace = limit.max(CANCEL_GRACE);
                    let server_waits_for_client = matches!(
                        t.copy,
                        crate::client::txn::Copy::In | crate::client::txn::Copy::Both
                    );
                    if to_client.is_empty()
                        && !server_waits_for_client
                        && now.saturating_sub(server_heard) >= ns(grace)
                        && age >= ns(limit + grace)
                    {
                        return lost(
                            format!(
                                "query_timeout ({}) canceled the request and the server did not answer within {} more; its connection is closed",
                                humantime::format_duration(limit),
                                humantime::format_duration(grace)
                            ),
                            &cscan,
                        );
                    }
                }
            }
        }
    }
}

/// When a wait of `after` ends that started at `since` (monotonic ns; set
/// to now if the wait starts now): a deadline kept across the loop's turns.
fn due_after(since: &mut Option<u64>, after: Duration) -> tokio::time::Instant {
    let since = *since.get_or_insert_with(crate::clock::mono_ns);
    let waited = Duration::from_nanos(crate::clock::mono_ns().saturating_sub(since));
    tokio::time::Instant::now() + after.saturating_sub(waited)
}

/// After `query_timeout` canceled a request, how long (at least) the server
/// has to answer before it is given up as unresponsive.
const CANCEL_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// A replica went away under the client's request (its connection closed,
/// or ended by a FATAL: a restart, a terminated backend). An autocommit
/// read none of whose answer reached the client runs again on the primary,
/// as a refused one does (a fast restart of a replica used to end such
/// clients with its FATAL); otherwise the client gets 08006 and stays, as
/// for any server lost.
fn replica_gone(
    t: &mut Tracker,
    to_client: &mut BytesMut,
    reason: String,
    cscan: &Scanner,
) -> TxEnd {
    use crate::client::txn::Misroute;
    match std::mem::take(&mut t.misroute) {
        Misroute::Armed(replay) | Misroute::Fired(replay) => {
            tracing::info!(%reason, "a replica went away under a read: it runs again on the primary");
            // Held back: none of it reached the client.
            to_client.clear();
            TxEnd::Misrouted {
                replay,
                refused: false,
            }
        }
        Misroute::Off => lost(reason, cscan),
    }
}

pub(super) fn lost(reason: String, cscan: &Scanner) -> TxEnd {
    TxEnd::ServerLost {
        reason,
        client_skip: cscan.remaining(),
    }
}

pub(super) async fn read_into(stream: &Stream, buf: &mut BytesMut) -> std::io::Result<usize> {
    std::future::poll_fn(|cx| poll_read_into(stream, buf, cx)).await
}

/// Reads what `stream` has into `buf` (growing it when nearly full), or
/// registers for readability.
pub(super) fn poll_read_into(
    stream: &Stream,
    buf: &mut BytesMut,
    cx: &mut std::task::Context<'_>,
) -> Poll<std::io::Result<usize>> {
    if buf.capacity() - buf.len() < READ_ROOM {
        buf.reserve(buf.capacity().clamp(READ_START, READ_CHUNK));
    }
    stream.poll_read(buf, cx)
}

/// `None` for a send that found the socket full (wait for it instead).
pub(super) fn unless_would_block(r: std::io::Result<usize>) -> Option<std::io::Result<usize>> {
    match r {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
        r => Some(r),
    }
}

/// What ended one turn of [`Session::forward`].
pub(super) enum Event {
    SentServer(std::io::Result<usize>),
    SentClient(std::io::Result<usize>),
    ServerRead(std::io::Result<usize>),
    ClientRead(std::io::Result<usize>),
    IdleTimeout,
    /// A client held its server unused past `leak_warn_after`.
    Leak,
    Nudged,
}
