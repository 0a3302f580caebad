//! Shared LISTEN (`listen_mode = "shared"`) in the session: a batch of only
//! LISTEN/UNLISTEN statements outside a transaction is answered here, once
//! the database's listener connection listens; notifications queued for
//! the client are written out while it is idle; a LISTEN that ran on a
//! server inside the client's transaction moves to the listener once the
//! transaction is over, and the server stops listening before it is shared.
//!
//! Invariant: a server goes back to the pool listening on nothing (it is
//! closed when that cannot be made sure of).

use super::*;
use crate::client::listen::{Hub, Membership};
use crate::client::sql::{identifier, keyword_at, skip_space, split_statements};
use crate::protocol::BackendTag;

/// One statement of a batch answered here.
enum Op {
    Listen(String),
    /// None: `UNLISTEN *`.
    Unlisten(Option<String>),
}

/// A reply owed for one message of an answered extended batch.
enum Reply {
    Parse,
    Bind,
    /// Describe of the statement (`S`) or the portal (`P`).
    Describe(u8),
    Execute,
}

impl Session {
    /// The database's hub, joined on first use.
    fn hub(&mut self) -> Arc<Hub> {
        if let Some(m) = &self.listen {
            return m.hub.clone();
        }
        let hub = self.shared.listen.hub(&self.database, &self.pool);
        self.listen = Some(Membership::new(hub.clone(), self.listed.info.id));
        hub
    }

    /// A client a takeover moved here listens again on its channels; it is
    /// told that notifications sent during the move may be missing.
    pub(super) async fn listen_again(&mut self, channels: &[String]) {
        let hub = self.hub();
        let limit = self.settings.config.pool.max_queued_notifications as usize;
        let note = match hub.listen(&self.listed.info, channels, limit).await {
            Ok(()) => "tidepool was upgraded: notifications sent while this connection moved to the new process may have been missed".to_owned(),
            Err(e) => format!(
                "tidepool was upgraded and could not listen again on this connection's channels: {e}"
            ),
        };
        write::notice_response(&mut self.out, "01000", &note);
    }

    /// Writes what waits for the client (notifications, a NOTICE that
    /// some may have been missed) into `out`; an overflowed queue ends it.
    pub(super) fn take_notifications(&mut self) -> Result<(), ClientError> {
        let Some(m) = &self.listen else {
            return Ok(());
        };
        let d = m.hub.drain(self.listed.info.id);
        if d.overflowed {
            return Err(ClientError::NotificationOverflow(
                self.settings.config.pool.max_queued_notifications,
            ));
        }
        if d.missed {
            write::notice_response(
                &mut self.out,
                "01000",
                "tidepool's LISTEN connection to the primary was lost and made again: notifications sent meanwhile may have been missed",
            );
        }
        for m in d.messages {
            self.out.extend_from_slice(&m);
        }
        Ok(())
    }

    /// [`Session::flush_out`] for the idle phase: for a listening client
    /// the send also hears its nudges, so that one that does not read while
    /// its notifications pile up is closed (NotificationOverflow) instead
    /// of holding its task in a send for ever. Ok(false): the client is gone.
    pub(super) async fn flush_idle(&mut self) -> Result<bool, ClientError> {
        if self.listen.is_none() || self.out.is_empty() {
            return Ok(self.flush_out().await.is_ok());
        }
        let info = self.listed.info.clone();
        loop {
            let sent = tokio::select! {
                r = self.stream.send_all(&mut self.out) => Some(r),
                _ = info.nudged() => None,
            };
            match sent {
                Some(Ok(())) => {
                    self.out.clear();
                    // A nudge taken by this send (not by the idle wait
                    // after it) may be for a notification queued since the
                    // last drain: it goes now, or it would wait for the
                    // next nudge. One drain at a time: what waits stays in
                    // the hub's bounded queue.
                    self.take_notifications()?;
                    if self.out.is_empty() {
                        return Ok(true);
                    }
                }
                Some(Err(_)) => return Ok(false),
                None => {
                    if self
                        .listen
                        .as_ref()
                        .is_some_and(|m| m.hub.overflowed(info.id))
                    {
                        return Err(ClientError::NotificationOverflow(
                            self.settings.config.pool.max_queued_notifications,
                        ));
                    }
                    if let Some(e) = self.evicted(false) {
                        return Err(e);
                    }
                }
            }
        }
    }

    /// Whether something waits for this client in its hub.
    pub(super) fn notifications_pending(&self) -> bool {
        self.listen
            .as_ref()
            .is_some_and(|m| m.hub.has_pending(self.listed.info.id))
    }

    /// A batch (a simple Query, or an unnamed Parse/Bind/Describe/Execute
    /// ending in Sync, whole in the buffer) of only LISTEN and UNLISTEN
    /// statements, outside a transaction, is answered here. Returns false,
    /// changing nothing, for anything else (it goes to a server).
    pub(super) async fn answer_listen(&mut self) -> bool {
        if !self.policy.listen_shared || self.deferred.is_some() {
            return false;
        }
        let Some((ops, replies, consumed)) = self.listen_batch() else {
            return false;
        };
        let id = self.listed.info.id;
        let hub = self.hub();
        let limit = self.settings.config.pool.max_queued_notifications as usize;
        let mut done = Vec::new();
        let mut failed = None;
        for op in &ops {
            let r = match op {
                Op::Listen(ch) => hub
                    .listen(&self.listed.info, std::slice::from_ref(ch), limit)
                    .await
                    .map(|()| "LISTEN"),
                Op::Unlisten(ch) => {
                    hub.unlisten(id, ch.as_deref());
                    Ok("UNLISTEN")
                }
            };
            match r {
                Ok(tag) => done.push(tag),
                Err(e) => {
                    failed = Some(ClientError::Listen(e.0));
                    break;
                }
            }
        }
        self.buf.advance(consumed);
        let complete = write::command_complete;
        match replies {
            None => {
                for tag in done {
                    complete(&mut self.out, tag);
                }
                if let Some(e) = failed {
                    e.write_to(&mut self.out);
                }
            }
            Some(replies) => {
                for r in replies {
                    match r {
                        Reply::Parse => empty(&mut self.out, BackendTag::ParseComplete),
                        Reply::Bind => empty(&mut self.out, BackendTag::BindComplete),
                        Reply::Describe(kind) => {
                            if kind == b'S' {
                                write::message(
                                    &mut self.out,
                                    BackendTag::ParameterDescription.byte(),
                                    |b| b.extend_from_slice(&0i16.to_be_bytes()),
                                );
                            }
                            empty(&mut self.out, BackendTag::NoData);
                        }
                        Reply::Execute => match (done.first(), &failed) {
                            (Some(tag), _) => complete(&mut self.out, tag),
                            (None, Some(e)) => e.write_to(&mut self.out),
                            (None, None) => {}
                        },
                    }
                }
            }
        }
        write::ready_for_query(&mut self.out, TxStatus::Idle);
        true
    }

    /// The statements, the replies owed (None: a simple Query) and the
    /// bytes of the batch at the head of the buffer, if it is one
    /// [`Session::answer_listen`] answers.
    fn listen_batch(&self) -> Option<(Vec<Op>, Option<Vec<Reply>>, usize)> {
        let b = &self.buf[..];
        if b.len() < 5 {
            return None;
        }
        let first = checked_len(b[0], &b[1..5], self.limit).ok()?;
        if FrontendTag::from_byte(b[0]) == FrontendTag::Query {
            // Most statements show at their first byte that they are no
            // LISTEN: no text decoding for them.
            if !may_be_listen(b.get(5..first)?) {
                return None;
            }
            let mut body = crate::protocol::messages::Body::new(b.get(5..first)?, "Query");
            let sql = body.cstr().ok()?;
            return Some((listen_ops(sql)?, None, first));
        }
        // Extended: unnamed statement and portal, no parameters, one
        // LISTEN/UNLISTEN, then Sync.
        let mut pos = 0;
        let mut ops = None;
        let mut replies = Vec::new();
        loop {
            let rest = b.get(pos..)?;
            if rest.len() < 5 {
                return None;
            }
            let total = checked_len(rest[0], &rest[1..5], self.limit).ok()?;
            let body = rest.get(5..total)?;
            let mut m = crate::protocol::messages::Body::new(body, "message");
            match FrontendTag::from_byte(rest[0]) {
                FrontendTag::Parse if ops.is_none() => {
                    // The statement name (empty: one byte), then the text.
                    if body.first() != Some(&0) || !may_be_listen(&body[1..]) {
                        return None;
                    }
                    let name = m.cstr().ok()?;
                    let sql = m.cstr().ok()?;
                    let params = m.i16().ok()?;
                    if !name.is_empty() || params != 0 {
                        return None;
                    }
                    let parsed = listen_ops(sql)?;
                    if parsed.len() != 1 {
                        return None;
                    }
                    ops = Some(parsed);
                    replies.push(Reply::Parse);
                }
                FrontendTag::Bind if ops.is_some() => {
                    let (portal, stmt) = (m.cstr().ok()?, m.cstr().ok()?);
                    if !portal.is_empty() || !stmt.is_empty() || m.i16().ok()? != 0 {
                        return None;
                    }
                    if m.i16().ok()? != 0 {
                        return None;
                    }
                    replies.push(Reply::Bind);
                }
                FrontendTag::Describe if ops.is_some() => {
                    let kind = m.u8().ok()?;
                    if !m.cstr().ok()?.is_empty() {
                        return None;
                    }
                    replies.push(Reply::Describe(kind));
                }
                FrontendTag::Execute if ops.is_some() => {
                    if !m.cstr().ok()?.is_empty() {
                        return None;
                    }
                    replies.push(Reply::Execute);
                }
                FrontendTag::Sync if ops.is_some() => {
                    return Some((ops?, Some(replies), pos + total));
                }
                _ => return None,
            }
            pos += total;
        }
    }

    /// After a transaction in which LISTEN or UNLISTEN ran on `server`:
    /// UNLISTENs apply to the hub; the channels the server listens on now
    /// (those of LISTENs that committed) move to the hub, and the server
    /// stops listening. Returns false when the server may still listen
    /// (it must be closed, not shared).
    pub(super) async fn move_listens(&mut self, server: &mut PooledConn, t: &Tracker) -> bool {
        let id = self.listed.info.id;
        let hub = self.hub();
        for ch in &t.unlistens {
            hub.unlisten(id, ch.as_deref());
        }
        if !t.listen_changed {
            return true;
        }
        // What the server hears until it stops listening, in commit order.
        let mut heard = BytesMut::new();
        let channels = match server.conn().listening_channels().await {
            Ok((channels, notes)) => {
                heard.extend_from_slice(&notes);
                channels
            }
            Err(e) => {
                tracing::warn!(client = id, error = %e, "cannot read the channels a LISTEN left on its server; closing the server");
                return false;
            }
        };
        if !channels.is_empty() {
            let limit = self.settings.config.pool.max_queued_notifications as usize;
            if let Err(e) = hub.listen(&self.listed.info, &channels, limit).await {
                tracing::warn!(client = id, error = %e, "LISTEN of a transaction not moved to the listener");
                write::notice_response(
                    &mut self.out,
                    "01000",
                    &format!(
                        "notifications of the channels this transaction listened on may be missed: {e}"
                    ),
                );
            }
        }
        let clean = match server.conn().run_collecting("UNLISTEN *").await {
            Ok(notes) => {
                heard.extend_from_slice(&notes);
                true
            }
            Err(e) => {
                tracing::warn!(client = id, error = %e, "UNLISTEN * failed on a server; closing it");
                false
            }
        };
        if !heard.is_empty() {
            // The listener has copies of the latest of them: once it has
            // read everything sent before the server stopped listening,
            // the two are merged in its queue.
            let messages = crate::client::listen::split_messages(heard);
            let merged = match hub.barrier().await {
                Ok(()) => hub.merge_heard(id, messages),
                Err(_) => Err(messages),
            };
            if let Err(messages) = merged {
                for m in messages {
                    self.out.extend_from_slice(&m);
                }
            }
        }
        clean
    }
}

/// Whether a statement's text (raw bytes) may start with LISTEN or
/// UNLISTEN: its first byte after spaces is `l`, `u`, or starts a comment.
fn may_be_listen(text: &[u8]) -> bool {
    text.iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| matches!(b, b'l' | b'L' | b'u' | b'U' | b'/' | b'-'))
}

fn empty(out: &mut BytesMut, tag: BackendTag) {
    write::message(out, tag.byte(), |_| {});
}

/// The statements of `sql` when every one is a LISTEN or UNLISTEN of one
/// channel (or `UNLISTEN *`); None otherwise.
fn listen_ops(sql: &str) -> Option<Vec<Op>> {
    // Every statement is checked on its way in: one look at the first
    // word before any splitting (a batch starts with LISTEN or UNLISTEN).
    let head = sql.as_bytes().get(skip_space(sql, 0)..)?;
    let starts = |w: &[u8]| {
        head.get(..w.len())
            .is_some_and(|h| h.eq_ignore_ascii_case(w))
    };
    if !starts(b"listen") && !starts(b"unlisten") {
        return None;
    }
    let stmts = split_statements(sql);
    if stmts.is_empty() {
        return None;
    }
    stmts
        .into_iter()
        .map(|stmt| {
            let (kw, end) = keyword_at(stmt, 0);
            let at = skip_space(stmt, end);
            let (op, after) = match kw.as_str() {
                "listen" => {
                    let (name, after) = identifier(stmt, at)?;
                    (Op::Listen(name), after)
                }
                "unlisten" if stmt.as_bytes().get(at) == Some(&b'*') => {
                    (Op::Unlisten(None), at + 1)
                }
                "unlisten" => {
                    let (name, after) = identifier(stmt, at)?;
                    (Op::Unlisten(Some(name)), after)
                }
                _ => return None,
            };
            // Nothing but space (or a comment) after the name.
            (skip_space(stmt, after) >= stmt.trim_end().len()).then_some(op)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(sql: &str) -> Option<Vec<String>> {
        listen_ops(sql).map(|ops| {
            ops.into_iter()
                .map(|op| match op {
                    Op::Listen(c) => format!("+{c}"),
                    Op::Unlisten(Some(c)) => format!("-{c}"),
                    Op::Unlisten(None) => "-*".to_owned(),
                })
                .collect()
        })
    }

    #[test]
    fn only_listen_and_unlisten_batches_are_answered_here() {
        assert_eq!(names("LISTEN jobs").unwrap(), ["+jobs"]);
        assert_eq!(names("listen \"Jobs\";").unwrap(), ["+Jobs"]);
        assert_eq!(
            names("LISTEN a; UNLISTEN b; unlisten *").unwrap(),
            ["+a", "-b", "-*"]
        );
        assert_eq!(
            names("  /* c */ LISTEN Mixed_Case  ").unwrap(),
            ["+mixed_case"]
        );
        assert!(names("LISTEN a; SELECT 1").is_none());
        assert!(names("LISTEN").is_none());
        assert!(names("LISTEN a b").is_none());
        assert!(names("NOTIFY a").is_none());
        assert!(names("").is_none());
    }
}
