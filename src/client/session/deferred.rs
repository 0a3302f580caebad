//! The transaction tidepool begins for a client without a server: on a
//! database with replicas a lone `BEGIN` is answered here and sent with the
//! transaction's first statement, which decides the backend.
//!
//! Owns its states (`Deferred`): begun (the `BEGIN` waits to be sent), and
//! aborted (its first statement failed before any server ran it). Invariant:
//! the client sees PostgreSQL's transaction status throughout. A failure
//! before a server ran anything aborts the client's transaction, as an
//! error would directly (status `E`, never `I` with the `BEGIN` still
//! pending: its later statements would have run inside a transaction the
//! client did not know of, and been lost); a plain `COMMIT` or `ROLLBACK`
//! ends it here, with no server to ask.

use super::idle::first_statement;
use super::*;
use crate::router::classify::{Ending, transaction_end};

/// A transaction the client began that no server has seen yet.
#[derive(Debug)]
pub(super) enum Deferred {
    /// Its `BEGIN`, to send ahead of the first statement.
    Begun(String),
    /// Its first statement failed before a server ran it (no server in
    /// time, a paused database's wait ran out, the primary down): aborted,
    /// as PostgreSQL's is after an error, until the client ends it.
    Aborted,
}

impl Session {
    /// A lone `BEGIN` as the first message, on a database with replicas, is
    /// answered here and sent later with the transaction's first statement,
    /// which decides the backend. Returns true when it consumed the message.
    pub(super) fn defer_begin(&mut self) -> bool {
        let has_replicas = self.health.as_ref().is_some_and(|h| !h.replicas.is_empty());
        if !has_replicas || self.deferred.is_some() || self.pinned.is_some() {
            return false;
        }
        if self.buf.first() != Some(&FrontendTag::Query.byte()) {
            return false;
        }
        // Most queries are not a BEGIN, and their first word says so: they
        // skip the text's checks and the classifier's memo here (routing
        // looks the statement up again anyway).
        if !crate::router::opening::may_begin(self.buf.get(5..).unwrap_or_default()) {
            return false;
        }
        let Some(sql) = first_statement(&self.buf, self.limit, &self.statements) else {
            return false;
        };
        let single = !sql.trim().trim_end_matches(';').contains(';');
        // BEGIN calls no function: no volatilities needed.
        if !single || self.memo.class(sql, &self.settings.classifier, None) != Class::Begin {
            return false;
        }
        let sql = sql.to_owned();
        let Ok(total) = checked_len(self.buf[0], &self.buf[1..5], self.limit) else {
            return false;
        };
        self.buf.advance(total);
        // PostgreSQL's tag: `START TRANSACTION` says so.
        let tag = if crate::router::opening::first_word_is(&sql, "start") {
            "START TRANSACTION"
        } else {
            "BEGIN"
        };
        write::command_complete(&mut self.out, tag);
        write::ready_for_query(&mut self.out, TxStatus::InTransaction);
        self.deferred = Some(Deferred::Begun(sql));
        true
    }

    /// The transaction status the client sees while no server serves it.
    pub(super) fn idle_status(&self) -> TxStatus {
        match self.deferred {
            None => TxStatus::Idle,
            Some(Deferred::Begun(_)) => TxStatus::InTransaction,
            Some(Deferred::Aborted) => TxStatus::Failed,
        }
    }

    /// The client's request could not run (`e` is owed to it): the
    /// deferred transaction it was in is aborted.
    pub(super) fn owe(&mut self, e: ClientError) {
        if self.deferred.is_some() {
            self.deferred = Some(Deferred::Aborted);
        }
        self.owe_error = Some(e);
    }

    /// Answers the message at the head of the buffer here when the
    /// deferred transaction allows it: a plain `COMMIT` or `ROLLBACK` ends
    /// it (nothing ran anywhere); in an aborted one anything else gets
    /// PostgreSQL's 25P02 (an extended-protocol batch once, up to its
    /// Sync). True when it consumed the message.
    pub(super) fn answer_deferred(&mut self) -> bool {
        let aborted = match &self.deferred {
            None => return false,
            Some(d) => matches!(d, Deferred::Aborted),
        };
        if self.buf.len() < 5 {
            return false;
        }
        let Ok(total) = checked_len(self.buf[0], &self.buf[1..5], self.limit) else {
            return false;
        };
        let tag = FrontendTag::from_byte(self.buf[0]);
        if aborted && tag == FrontendTag::Parse && parses_a_transaction_end(self.buf.get(5..total))
        {
            // An extended-protocol COMMIT or ROLLBACK (its batch answered
            // piece by piece): it ends the aborted transaction, and runs on a
            // server outside any (PostgreSQL warns there is none, 25P01; a
            // COMMIT is tagged COMMIT, not ROLLBACK). Nothing of the
            // transaction ran anywhere, so the outcome is PostgreSQL's.
            self.deferred = None;
            return false;
        }
        let query = (tag == FrontendTag::Query)
            .then(|| first_statement(&self.buf, self.limit, &self.statements))
            .flatten();
        let ending = query.and_then(transaction_end);
        match (ending, aborted) {
            (Some(ending), _) => {
                // PostgreSQL rolls an aborted transaction back at COMMIT too.
                let tag = if aborted || ending == Ending::Rollback {
                    "ROLLBACK"
                } else {
                    "COMMIT"
                };
                write::command_complete(&mut self.out, tag);
                self.deferred = None;
                write::ready_for_query(&mut self.out, TxStatus::Idle);
            }
            (None, false) => return false,
            (None, true) if query.is_some_and(|q| q.trim().is_empty()) => {
                write::message(
                    &mut self.out,
                    crate::protocol::BackendTag::EmptyQueryResponse.byte(),
                    |_| {},
                );
                write::ready_for_query(&mut self.out, TxStatus::Failed);
            }
            (None, true) => {
                ClientError::InFailedTransaction.write_to(&mut self.out);
                if matches!(tag, FrontendTag::Query | FrontendTag::FunctionCall) {
                    write::ready_for_query(&mut self.out, TxStatus::Failed);
                } else {
                    self.skip_until_sync = true;
                }
            }
        }
        self.buf.advance(total);
        true
    }
}

/// Whether a Parse message's body prepares a COMMIT or ROLLBACK (`END`,
/// `ABORT`, `COMMIT AND CHAIN`... not `COMMIT PREPARED`).
fn parses_a_transaction_end(body: Option<&[u8]>) -> bool {
    let Some(body) = body else { return false };
    let mut b = crate::protocol::messages::Body::new(body, "Parse");
    let (Ok(_name), Ok(sql)) = (b.cstr(), b.sql()) else {
        return false;
    };
    transaction_end(&sql).is_some()
}
