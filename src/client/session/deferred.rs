//! The transaction tidepool begins for a client without a server: on a
//! database with replicas a lone `BEGIN` (or `BEGIN READ ONLY`) is answered
//! here and sent with the transaction's first statement, which decides the
//! backend (see `router::policy::Begun`).
//!
//! Owns its states (`Deferred`): begun (the `BEGIN` waits to be sent),
//! aborted (its first statement failed before any server ran it), and
//! ending (an aborted one's COMMIT or ROLLBACK through the extended
//! protocol, answered message by message up to the Sync). Invariant:
//! the client sees PostgreSQL's transaction status throughout. A failure
//! before a server ran anything aborts the client's transaction, as an
//! error would directly (status `E`, never `I` with the `BEGIN` still
//! pending: its later statements would have run inside a transaction the
//! client did not know of, and been lost); a plain `COMMIT` or `ROLLBACK`
//! ends it here, with no server to ask.

use super::idle::first_statement;
use super::*;
use crate::protocol::BackendTag;
use crate::protocol::messages::Body;
use crate::router::classify::{Ending, transaction_end_chained};

/// A transaction the client began that no server has seen yet.
#[derive(Debug)]
pub(super) enum Deferred {
    /// Its `BEGIN`, to send ahead of the first statement, and whether it
    /// began the block read-only.
    Begun { sql: String, read_only: bool },
    /// Its first statement failed before a server ran it (no server in
    /// time, a paused database's wait ran out, the primary down): aborted,
    /// as PostgreSQL's is after an error, until the client ends it.
    Aborted,
    /// An aborted transaction ending through the extended protocol: the
    /// unnamed Parse of its COMMIT or ROLLBACK was answered here, and so are
    /// the Bind, Describe and Execute of it, up to the Sync (all PostgreSQL
    /// accepts in an aborted transaction; no server needed).
    Ending(ExtendedEnd),
}

/// See [`Deferred::Ending`].
#[derive(Debug)]
pub(super) struct ExtendedEnd {
    /// `AND CHAIN`: the next transaction begins at the end.
    chain: bool,
    /// Its Execute ran: at the Sync the transaction is over.
    executed: bool,
}

impl Session {
    /// A lone `BEGIN` (read-only or not) as the first message, on a database with replicas, is
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
        // A BEGIN or START TRANSACTION alone: `SET TRANSACTION READ ONLY`
        // is of a read-only BEGIN's class too, but outside a block it
        // begins nothing (a comment before it passes `may_begin`).
        let opening = |w| crate::router::opening::first_word_is(sql, w);
        if lone(sql).is_none() || !(opening("begin") || opening("start")) {
            return false;
        }
        // BEGIN calls no function: no volatilities needed.
        let read_only = match self.memo.class(sql, &self.settings.classifier, None) {
            Class::Begin => false,
            Class::BeginReadOnly => true,
            _ => return false,
        };
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
        self.deferred = Some(Deferred::Begun { sql, read_only });
        true
    }

    /// The block tidepool began for the client, as routing sees it.
    pub(super) fn begun(&self) -> crate::router::policy::Begun {
        use crate::router::policy::Begun;
        match &self.deferred {
            Some(Deferred::Begun {
                read_only: true, ..
            }) => Begun::ReadOnly,
            Some(Deferred::Begun { .. }) => Begun::ReadWrite,
            _ => Begun::No,
        }
    }

    /// The transaction status the client sees while no server serves it.
    pub(super) fn idle_status(&self) -> TxStatus {
        match &self.deferred {
            None => TxStatus::Idle,
            Some(Deferred::Begun { .. }) => TxStatus::InTransaction,
            Some(Deferred::Aborted) => TxStatus::Failed,
            Some(Deferred::Ending(e)) => match (e.executed, e.chain) {
                (false, _) => TxStatus::Failed,
                (true, false) => TxStatus::Idle,
                (true, true) => TxStatus::InTransaction,
            },
        }
    }

    /// At a Sync: an extended-protocol end under way is over (ended, or
    /// still aborted when its Execute never came).
    pub(super) fn settle_deferred(&mut self) {
        if let Some(Deferred::Ending(e)) = &self.deferred {
            self.deferred = match (e.executed, e.chain) {
                (false, _) => Some(Deferred::Aborted),
                (true, false) => None,
                (true, true) => Some(chained()),
            };
        }
    }

    /// The client's request could not run (`e` is owed to it): the
    /// deferred transaction it was in is aborted.
    pub(super) fn owe(&mut self, e: ClientError) {
        if matches!(self.deferred, Some(Deferred::Begun { .. })) {
            self.deferred = Some(Deferred::Aborted);
        }
        self.owe_error = Some(e);
    }

    /// Answers the message at the head of the buffer here when the
    /// deferred transaction allows it: a plain `COMMIT` or `ROLLBACK` ends
    /// it (nothing ran anywhere; `AND CHAIN` begins the next, deferred
    /// too); in an aborted one, so does the unnamed statement's extended
    /// COMMIT or ROLLBACK, and anything else gets PostgreSQL's 25P02 (an
    /// extended-protocol batch once, up to its Sync). True when it consumed
    /// the message.
    pub(super) fn answer_deferred(&mut self) -> bool {
        if self.deferred.is_none() || self.buf.len() < 5 {
            return false;
        }
        let Ok(total) = checked_len(self.buf[0], &self.buf[1..5], self.limit) else {
            return false;
        };
        let tag = FrontendTag::from_byte(self.buf[0]);
        if tag == FrontendTag::Query {
            // A simple query ends an extended batch as a Sync would.
            self.settle_deferred();
        }
        let aborted = match &self.deferred {
            None => return false,
            Some(d) => !matches!(d, Deferred::Begun { .. }),
        };
        let body = self.buf.get(5..total).unwrap_or_default();
        let answered = match &mut self.deferred {
            Some(Deferred::Ending(e)) => answer_ending(e, &mut self.out, tag, body),
            Some(Deferred::Aborted) if tag == FrontendTag::Parse => match unnamed_end(body) {
                Some(chain) => {
                    write::message(&mut self.out, BackendTag::ParseComplete.byte(), |_| {});
                    self.deferred = Some(Deferred::Ending(ExtendedEnd {
                        chain,
                        executed: false,
                    }));
                    true
                }
                None => false,
            },
            _ => false,
        };
        if answered {
            self.buf.advance(total);
            return true;
        }
        let query = (tag == FrontendTag::Query)
            .then(|| first_statement(&self.buf, self.limit, &self.statements))
            .flatten();
        let ending = query.and_then(transaction_end_chained);
        // `SET TRANSACTION READ ONLY` alone, in a block whose BEGIN waits:
        // it joins the BEGIN (the block is read-only from its start), and
        // the next statement decides the backend as after a `BEGIN READ
        // ONLY` (a later `SET TRANSACTION READ WRITE` may still take it to
        // the primary, as PostgreSQL allows before the first query).
        let read_only_set = match query.and_then(lone) {
            Some(q) if !aborted && ending.is_none() => {
                (crate::router::opening::first_word_is(q, "set")
                    && self.memo.class(q, &self.settings.classifier, None) == Class::BeginReadOnly)
                    .then(|| q.to_owned())
            }
            _ => None,
        };
        match (ending, aborted) {
            // COMMIT or ROLLBACK AND CHAIN ends an aborted transaction (rolled
            // back, as PostgreSQL says) and begins the next, deferred again
            // (see `chained`). In a transaction that is not aborted it goes
            // to a server after the BEGIN, which then holds the chained
            // transaction with its characteristics.
            (Some((_, true)), true) => {
                write::command_complete(&mut self.out, "ROLLBACK");
                self.deferred = Some(chained());
                write::ready_for_query(&mut self.out, TxStatus::InTransaction);
            }
            (Some((_, true)), false) => return false,
            (Some((ending, false)), _) => {
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
            (None, false) => {
                let (Some(set), Some(Deferred::Begun { sql, read_only })) =
                    (read_only_set, &mut self.deferred)
                else {
                    return false;
                };
                // On a line of its own: a `--` comment ending the text
                // before must not swallow it.
                sql.push_str("\n;\n");
                sql.push_str(&set);
                *read_only = true;
                write::command_complete(&mut self.out, "SET");
                write::ready_for_query(&mut self.out, TxStatus::InTransaction);
            }
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

/// `sql` without its trailing `;`s when it is one statement (no other `;`).
fn lone(sql: &str) -> Option<&str> {
    let one = sql.trim().trim_end_matches(';');
    (!one.contains(';')).then_some(one)
}

/// The transaction an `AND CHAIN` end of an aborted one begins. PostgreSQL
/// gives it the characteristics the session has after the abort, which
/// rolled back those of the aborted `BEGIN` (`BEGIN ISOLATION LEVEL
/// REPEATABLE READ`, an error, `ROLLBACK AND CHAIN`: the next one is READ
/// COMMITTED, or whatever the session's default is): a plain `BEGIN`.
fn chained() -> Deferred {
    Deferred::Begun {
        sql: "BEGIN".to_owned(),
        read_only: false,
    }
}

/// Whether a Parse body prepares the unnamed statement as a transaction's
/// end (COMMIT, ROLLBACK, their `AND CHAIN`: `Some(chain)`). In an aborted
/// transaction that Parse is answered, and the rest of its batch too (see
/// [`Deferred::Ending`]); any other gets PostgreSQL's 25P02 (a named one
/// too, which PostgreSQL would accept: tidepool would have to keep it).
fn unnamed_end(body: &[u8]) -> Option<bool> {
    let mut b = Body::new(body, "Parse");
    let (Ok(""), Ok(sql)) = (b.cstr(), b.sql()) else {
        return None;
    };
    transaction_end_chained(&sql).map(|(_, chain)| chain)
}

/// The Bind, Describe and Execute of an extended-protocol end, of the
/// unnamed statement and portal: PostgreSQL's answers (an aborted
/// transaction's COMMIT is tagged ROLLBACK). False for anything else
/// (25P02, up to the Sync).
fn answer_ending(end: &mut ExtendedEnd, out: &mut BytesMut, tag: FrontendTag, body: &[u8]) -> bool {
    let mut b = Body::new(body, "extended end");
    match tag {
        FrontendTag::Bind if matches!((b.cstr(), b.cstr()), (Ok(""), Ok(""))) => {
            write::message(out, BackendTag::BindComplete.byte(), |_| {});
        }
        FrontendTag::Describe => match (b.u8(), b.cstr()) {
            (Ok(b'S'), Ok("")) => {
                write::message(out, BackendTag::ParameterDescription.byte(), |m| {
                    m.put_i16(0)
                });
                write::message(out, BackendTag::NoData.byte(), |_| {});
            }
            (Ok(b'P'), Ok("")) => write::message(out, BackendTag::NoData.byte(), |_| {}),
            _ => return false,
        },
        FrontendTag::Execute if matches!(b.cstr(), Ok("")) => {
            write::command_complete(out, "ROLLBACK");
            end.executed = true;
        }
        _ => return false,
    }
    true
}
