//! The idle phase: waiting without a server until the client's next
//! transaction has a whole first message, answering what needs no server,
//! and the deferred `BEGIN`.
//!
//! Invariant: a transaction starts only once its first message is whole, so
//! forwarding always consumes client bytes.

use super::*;

impl Session {
    /// Reads more client bytes; an idle client with an empty buffer first
    /// waits for readability so that it holds no buffer while waiting. For
    /// hand-written polls (each step may repeat: the buffer preparation is
    /// idempotent).
    pub(super) fn poll_read_more(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<usize>> {
        if self.buf.is_empty() && self.buf.capacity() > 0 {
            let parks = !self.settings.config.pool.park_idle_clients_after.is_zero();
            if self.buf.capacity() > IDLE_KEEP || !parks {
                self.buf = BytesMut::new();
                self.charge.release();
            } else {
                // Reclaims the whole allocation in place once the bytes
                // forwarded from it are gone (no allocation, no growth:
                // every buffer is at least this big).
                self.buf.reserve(READ_START);
            }
        }
        if self.buf.capacity() == 0 {
            // The buffer is made only once there is something to read.
            std::task::ready!(self.stream.poll_read_ready(cx))?;
            let mut chunk = BytesMut::with_capacity(READ_START);
            let r = std::task::ready!(self.stream.poll_read(&mut chunk, cx));
            if r.is_ok() {
                self.buf = chunk;
            }
            return Poll::Ready(r);
        }
        poll_read_into(&self.stream, &mut self.buf, cx)
    }

    pub(super) async fn flush_out(&mut self) -> std::io::Result<()> {
        if !self.out.is_empty() {
            self.stream.send_all(&mut self.out).await?;
            self.out.clear();
            if self.out.capacity() > IDLE_KEEP {
                self.out = BytesMut::new();
            }
        }
        Ok(())
    }

    /// Idle phase: answers what needs no server (Sync, Flush, stray COPY
    /// messages, owed errors) and returns when a transaction starts.
    pub(super) async fn wait_for_work(&mut self) -> Result<Next, ClientError> {
        watchdog::phase(Phase::Idle);
        loop {
            if self.discard > 0 {
                let n = self.discard.min(self.buf.len());
                self.buf.advance(n);
                self.discard -= n;
            }
            // A transaction starts only once its first message is whole: the
            // routing decision and the tracker need it, and a message that
            // is still arriving must be read here, not spun on. The rest of
            // a dropped message is read (and thrown away) the same way,
            // with KILL and shutdown heard meanwhile.
            let wanted = if self.discard > 0 {
                self.discard
            } else {
                self.head_shortfall()?
            };
            if wanted > 0 {
                // Notifications go out between messages, while idle.
                self.take_notifications()?;
                if !self.flush_idle().await? {
                    return Ok(Next::Exit);
                }
                // Asked to move (a takeover), and nothing is left to send
                // or to read first: here, before any wait, so that a nudge
                // or a transaction's end comes back to it.
                if self.may_move() {
                    return Ok(Next::Move);
                }
                // Room for the whole message at once (bounded by
                // `max_message_size`), not a doubling per read.
                if self.buf.len() >= 5 && self.discard == 0 {
                    self.buf.reserve(wanted);
                    if !self.charge.cover(self.buf.capacity()) {
                        crate::stats::Counters::add(
                            &self.shared.stats.counters.limits.max_client_buffer_bytes,
                        );
                        return Err(ClientError::BufferBudget(self.shared.buffers.limit()));
                    }
                }
                let info = self.listed.info.clone();
                let read = std::future::poll_fn(|cx| {
                    if let Poll::Ready(r) = self.poll_read_more(cx) {
                        return Poll::Ready(Some(r));
                    }
                    info.poll_nudged(cx).map(|()| None)
                })
                .await;
                let Some(read) = read else {
                    match self.evicted(self.deferred.is_some()) {
                        Some(e) => return Err(e),
                        None if info.park_requested() && self.parkable() => {
                            return Ok(Next::Park);
                        }
                        None => continue,
                    }
                };
                match read {
                    Ok(0) | Err(_) => return Ok(Next::Exit),
                    Ok(_) => continue,
                }
            }
            let tag = FrontendTag::from_byte(self.buf[0]);
            let total = frontend_len(self.buf[0], &self.buf[1..5], self.limit)?;
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
                    self.settle_deferred();
                    let status = self.idle_status();
                    write::ready_for_query(&mut self.out, status);
                }
                _ if self.skip_until_sync => self.discard = total,
                FrontendTag::Query | FrontendTag::FunctionCall if owes => {
                    self.discard = total;
                    if let Some(e) = self.owe_error.take() {
                        e.write_to(&mut self.out);
                    }
                    let status = self.idle_status();
                    write::ready_for_query(&mut self.out, status);
                }
                _ if owes => {
                    self.discard = total;
                    if let Some(e) = self.owe_error.take() {
                        e.write_to(&mut self.out);
                    }
                    self.skip_until_sync = true;
                }
                FrontendTag::Parse | FrontendTag::Close if self.answer_without_server() => {}
                FrontendTag::Query | FrontendTag::Parse if self.answer_listen().await => {}
                t if t.starts_transaction() => {
                    if self.flush_out().await.is_err() {
                        return Ok(Next::Exit);
                    }
                    return Ok(Next::Transaction);
                }
                // Password and unknown types (every other type is matched above).
                _ => {
                    return Err(ProtocolError::UnexpectedTag(self.buf[0] as char).into());
                }
            }
        }
    }

    /// Bytes still missing before the message at the head of the buffer can
    /// be acted on while idle: its header, or (for a message that starts a
    /// transaction) its whole body. 0 when it can be acted on now.
    pub(super) fn head_shortfall(&self) -> Result<usize, ClientError> {
        if self.buf.len() < 5 {
            return Ok(5 - self.buf.len());
        }
        let total = frontend_len(self.buf[0], &self.buf[1..5], self.limit)?;
        let starts_transaction = FrontendTag::from_byte(self.buf[0]).starts_transaction();
        // Messages dropped while an error is owed or a batch is skipped are
        // discarded as they stream in, whatever their size.
        let dropped = self.owe_error.is_some() || self.skip_until_sync;
        Ok(if starts_transaction && !dropped {
            total.saturating_sub(self.buf.len())
        } else {
            0
        })
    }

    /// A batch of only Parse (of statements this pool's servers already
    /// parsed), Close (of statements) and a final Sync needs no server: the
    /// answers are known. This keeps "prepare on connect" from taking a
    /// server, which matters when a client prepares while others hold every
    /// server. Returns false (changing nothing) for anything else.
    pub(super) fn answer_without_server(&mut self) -> bool {
        // Not inside a transaction tidepool began (its status, and an
        // aborted one's refusals, are `answer_deferred`'s).
        if !self.policy.named_statements || self.deferred.is_some() {
            return false;
        }
        // The common batch begins with a Parse of the unnamed statement,
        // which always needs a server: no further look.
        if self.buf.first() == Some(&FrontendTag::Parse.byte()) && self.buf.get(5) == Some(&0) {
            return false;
        }
        let context = self.param_facts().parse_context.0;
        let mut pos = 0;
        let mut plan: Vec<(String, Option<Arc<Statement>>)> = Vec::new();
        loop {
            let rest = &self.buf[pos..];
            if rest.len() < 5 {
                return false;
            }
            let Ok(total) = checked_len(rest[0], &rest[1..5], self.limit) else {
                return false;
            };
            if rest.len() < total {
                return false;
            }
            let body = &rest[5..total];
            match FrontendTag::from_byte(rest[0]) {
                // The unnamed statement always needs a server.
                FrontendTag::Parse if body.first() == Some(&0) => return false,
                FrontendTag::Parse => {
                    let Ok((name, stmt)) = Statement::from_parse(body, context) else {
                        return false;
                    };
                    let generation = self.pool.catalog.generation(stmt.hash);
                    let stmt = Statement::in_generation(stmt, generation);
                    let taken = self.statements.contains_key(&name)
                        || plan.iter().any(|(n, s)| n == &name && s.is_some());
                    if name.is_empty() || taken || !self.pool.knows_statement(stmt.hash) {
                        return false;
                    }
                    if crate::client::sql::effects(&stmt.query) != Default::default() {
                        return false;
                    }
                    plan.push((name, Some(stmt)));
                }
                FrontendTag::Close if body.first() == Some(&b'S') => {
                    let mut b = crate::protocol::messages::Body::new(&body[1..], "Close");
                    let Ok(name) = b.cstr() else { return false };
                    plan.push((name.to_owned(), None));
                }
                FrontendTag::Sync => {
                    pos += total;
                    break;
                }
                _ => return false,
            }
            pos += total;
        }
        for (name, stmt) in plan {
            match stmt {
                Some(stmt) => {
                    self.statements.insert(name, stmt);
                    Counters::add(&self.shared.stats.counters.prepare_hits);
                    write::message(
                        &mut self.out,
                        crate::protocol::BackendTag::ParseComplete.byte(),
                        |_| {},
                    );
                }
                None => {
                    self.statements.remove(&name);
                    write::message(
                        &mut self.out,
                        crate::protocol::BackendTag::CloseComplete.byte(),
                        |_| {},
                    );
                }
            }
        }
        write::ready_for_query(&mut self.out, TxStatus::Idle);
        self.discard = pos;
        true
    }
}

/// The SQL of the message at the head of `b` that starts a transaction, if
/// it has one (`statements`: the client's named statements).
pub(super) fn first_statement<'a>(
    b: &'a [u8],
    limit: usize,
    statements: &'a HashMap<String, Arc<Statement>>,
) -> Option<&'a str> {
    if b.len() < 5 {
        return None;
    }
    let total = checked_len(b[0], &b[1..5], limit).ok()?;
    let body = b.get(5..total)?;
    let mut body = crate::protocol::messages::Body::new(body, "first message");
    match FrontendTag::from_byte(b[0]) {
        FrontendTag::Query => body.cstr().ok(),
        FrontendTag::Parse => {
            body.cstr().ok()?;
            body.cstr().ok()
        }
        FrontendTag::Bind => {
            body.cstr().ok()?;
            let name = body.cstr().ok()?;
            // Text in another encoding is not classified (the primary).
            statements
                .get(name)
                .filter(|s| !s.foreign)
                .map(|s| s.query.as_str())
        }
        _ => None,
    }
}

/// Makes room for the rest of the message whose header starts `buf` (its
/// length already checked against `limit` by the scan that left it there).
pub(super) fn reserve_head(buf: &mut BytesMut, limit: usize) {
    if buf.len() >= 5
        && let Ok(total) = checked_len(buf[0], &buf[1..5], limit)
        && total > buf.len()
    {
        buf.reserve(total - buf.len());
    }
}
