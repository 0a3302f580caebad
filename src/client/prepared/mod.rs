//! A client's named prepared statements, mapped onto shared server
//! statements, and the handling of the client messages that name them.
//!
//! Each client keeps its own namespace (name → statement). On the server a
//! statement is prepared under a content-derived name, lazily, in the same
//! write as the client's own messages (no extra round trip), and answers the
//! client did not ask for are dropped via the `Expect` queue. Messages the
//! client sent but tidepool answers itself (a Parse of a statement the server
//! already has, a Close) get synthetic answers at the right place in the
//! stream.
//!
//! Row shapes: every Parse tidepool sends is followed by a hidden Describe,
//! so each server statement's row shape is known, and each client statement
//! is promised the shape of the server statement it was first mapped onto.
//! A Bind runs only on a server statement of the promised shape: when the
//! statement must be prepared on this server first, the Bind waits (the
//! client's bytes stay unread) until that server described it; a different
//! shape gets PostgreSQL's own 0A000, never rows the client's driver would
//! decode by the wrong columns.

mod answers;
mod sql_level;

pub use answers::apply_undos;
use answers::{
    aborted, duplicate, plan_changed, position_shift, refused, simple, synthetic, undefined,
};

use std::collections::HashMap;
use std::sync::Arc;

use bytes::{BufMut, BytesMut};

use super::sql::{PreparedSql, effects};
use super::txn::{Tracker, shape_of};
use crate::pool::Catalog;
use crate::protocol::messages::Body;
use crate::protocol::{BackendTag, FrontendTag, ProtocolError, write};
use crate::server::expect::{Owed, Undo};
use crate::server::prepared::{ServerStatements, Statement, server_name};
use crate::stats::{Counters, Fingerprints};

/// A statement name no client or tidepool uses (tidepool's own are
/// `tidepool_` and 16 hex digits): describing it fails without side effects.
const ABORT_PROBE: &str = "tidepool_abort_here";
/// A query that fails to parse, without side effects.
const ABORT_QUERY: &str =
    "tidepool: abort the transaction, as the error answered for the client did";
/// Everything one stopped client message may touch.
pub struct Handler<'a> {
    pub statements: &'a mut HashMap<String, Arc<Statement>>,
    pub prepared: &'a mut ServerStatements,
    pub t: &'a mut Tracker,
    pub to_server: &'a mut BytesMut,
    pub counters: &'a Counters,
    /// The database's statement generations.
    pub catalog: &'a Catalog,
    pub cap: usize,
    /// Fingerprints for per-query statistics (None: off).
    pub shapes: Option<&'a Fingerprints>,
}

impl Handler<'_> {
    /// Handles one complete client message the scanner stopped at.
    pub fn handle(&mut self, tag: u8, msg: &[u8]) -> Result<(), ProtocolError> {
        let body = &msg[5..];
        let t = &mut *self.t;
        let tag = FrontendTag::from_byte(tag);
        if t.batch == crate::client::txn::Batch::Skipping {
            if tag == FrontendTag::Sync {
                t.batch = crate::client::txn::Batch::Synced;
                t.expect.push(Owed::Sync);
                t.timing.sync(false);
                self.to_server.extend_from_slice(msg);
            }
            return Ok(());
        }
        match tag {
            FrontendTag::Query => self.query(msg, body),
            FrontendTag::Parse => self.parse(msg, body),
            FrontendTag::Bind => self.bind(body),
            FrontendTag::Describe => self.describe(body),
            FrontendTag::Close => self.close(body),
            _ => {
                self.to_server.extend_from_slice(msg);
                Ok(())
            }
        }
    }

    /// A query tidepool answers (or refuses) itself, or forwards after
    /// updating its view of the client's statements.
    fn query(&mut self, msg: &[u8], body: &[u8]) -> Result<(), ProtocolError> {
        let sql = Body::new(body, "Query").sql()?;
        // Text in another client encoding: read one char per byte, written
        // back byte for byte, and taken to change settings (see
        // `txn::client_side`).
        let foreign = matches!(sql, std::borrow::Cow::Owned(_));
        let sql = &*sql;
        let mut e = self.t.effects_of(sql);
        e.params_changed |= foreign;
        let t = &mut *self.t;
        let answered_here = (e.session_feature.is_some() && t.policy.refuse_session_features)
            || e.deallocate.is_some()
            || (e.prepared.is_some() && t.policy.named_statements);
        if answered_here && t.status == crate::protocol::TxStatus::Failed {
            // PostgreSQL runs none of these in a failed transaction.
            self.fail_query(aborted());
            return Ok(());
        }
        if let (Some(feature), true) = (e.session_feature, t.policy.refuse_session_features) {
            self.fail_query(refused(feature));
            return Ok(());
        }
        if let Some(name) = &e.deallocate
            && self.statements.remove(name).is_some()
        {
            let mut out = BytesMut::new();
            write::command_complete(&mut out, "DEALLOCATE");
            write::ready_for_query(&mut out, t.status);
            synthetic(t, out, Undo::default());
            return Ok(());
        }
        if let (Some(p), true) = (&e.prepared, t.policy.named_statements) {
            return self.sql_prepared(msg, sql, foreign, p);
        }
        let named = t.policy.named_statements;
        if e.lists_statements && named {
            let refs = super::statement_list::references(sql);
            if !refs.is_empty() {
                let rewritten = self.list_statements(sql, &refs);
                self.t.note_effects(&e);
                write::query_text(self.to_server, &rewritten, foreign);
                self.owe_query(sql, 0, None);
                return Ok(());
            }
        }
        if let (Some(n), true) = (&e.nested_execute, named)
            && let Some(stmt) = self.lookup(&n.name)
        {
            // EXPLAIN EXECUTE p, CREATE TABLE … AS EXECUTE p: p is the
            // client's name for tidepool's statement.
            if self.stale(&stmt) {
                self.fail_query(plan_changed(self.catalog));
                return Ok(());
            }
            self.ensure(&stmt);
            self.t.note_effects(&e);
            let rewritten = format!("{}{}{}", &sql[..n.start], stmt.name, &sql[n.end..]);
            write::query_text(self.to_server, &rewritten, foreign);
            let shift = stmt.name.len() as i32 - (n.end - n.start) as i32;
            self.owe_query(
                sql,
                shift,
                Some((stmt.hash, self.catalog.version(stmt.hash))),
            );
            return Ok(());
        }
        if !e.executes.is_empty() && named {
            return self.executes_in_query(sql, foreign, &e);
        }
        if e.drops_all_statements {
            self.statements.clear();
            self.prepared.clear();
            self.t.drops_statements = true;
        }
        self.t.note_effects(&e);
        self.owe_query(sql, 0, None);
        self.to_server.extend_from_slice(msg);
        Ok(())
    }

    /// A query was written to the server for the client's `sql`: its
    /// answer, up to ReadyForQuery, is owed to the client.
    fn owe_query(&mut self, sql: &str, position_shift: i32, bound: Option<(u64, u64)>) {
        let t = &mut *self.t;
        t.expect.push(Owed::UntilReady {
            undo: None,
            failed: false,
            position_shift,
            bound,
        });
        t.timing.query(
            shape_of(self.shapes, sql, t.opaque_literals),
            crate::stats::trace::traceparent(sql),
        );
    }

    fn parse(&mut self, msg: &[u8], body: &[u8]) -> Result<(), ProtocolError> {
        if self.t.policy.named_statements {
            let mut b = Body::new(body, "Parse");
            let name = b.cstr()?;
            let query = b.sql()?;
            let foreign = matches!(query, std::borrow::Cow::Owned(_));
            let rest = b.rest();
            let refs = super::statement_list::references(&query);
            if !refs.is_empty() {
                // The query reads pg_prepared_statements: it is prepared
                // with the client's statements as they are now.
                let rewritten = self.list_statements(&query, &refs);
                return self.parse_text(name, &rewritten, foreign, rest, None);
            }
            let e = effects(&query);
            match self.sql_prepared_in_parse(&query, foreign, &e)? {
                sql_level::ParseAs::AsIs => {}
                sql_level::ParseAs::Answered => return Ok(()),
                sql_level::ParseAs::Text(text, needs) => {
                    return self.parse_text(name, &text, foreign, rest, needs);
                }
            }
        }
        self.parse_as_is(msg, body)
    }

    /// The client's statements as `pg_prepared_statements` would list them,
    /// in place of each reference to it in `sql`; each is made sure to be
    /// on this server first.
    fn list_statements(&mut self, sql: &str, refs: &[super::statement_list::Reference]) -> String {
        let mut mine: Vec<(String, Arc<Statement>)> = self
            .statements
            .iter()
            .map(|(n, s)| (n.clone(), s.clone()))
            .collect();
        mine.sort_by(|a, b| a.0.cmp(&b.0));
        for (_, stmt) in &mine {
            self.ensure(stmt);
        }
        let texts: Vec<String> = mine
            .iter()
            .map(|(name, s)| match &s.sql_prepare {
                Some(_) => format!("PREPARE {name} {}", s.query.trim_start()),
                None => s.query.clone(),
            })
            .collect();
        let listed: Vec<super::statement_list::Listed<'_>> = mine
            .iter()
            .zip(&texts)
            .map(|((name, s), text)| super::statement_list::Listed {
                name,
                statement: text,
                server_name: &s.name,
                from_sql: s.sql_prepare.is_some(),
            })
            .collect();
        super::statement_list::rewrite(sql, refs, &listed)
    }

    fn parse_as_is(&mut self, msg: &[u8], body: &[u8]) -> Result<(), ProtocolError> {
        self.parse_with(msg, body, None)
    }

    /// [`Handler::parse_as_is`] of a text that runs statement `needs`.
    fn parse_with(
        &mut self,
        msg: &[u8],
        body: &[u8],
        needs: Option<Arc<Statement>>,
    ) -> Result<(), ProtocolError> {
        let (name, mut stmt) = Statement::from_parse(body, self.t.statement_context())?;
        if needs.is_some() {
            Arc::make_mut(&mut stmt).needs = needs;
        }
        let stmt = self.in_current_generation(stmt);
        let t = &mut *self.t;
        t.batch.open();
        if t.note_statement(&stmt.query, stmt.foreign) {
            let feature = effects(&stmt.query)
                .session_feature
                .unwrap_or("session feature");
            return self.fail(refused(feature));
        }
        if name.is_empty() || !t.policy.named_statements {
            t.expect.push(Owed::Parse {
                swallow: false,
                undo: Undo::default(),
            });
            if name.is_empty() {
                t.timing.parse_unnamed(
                    shape_of(self.shapes, &stmt.query, t.opaque_literals),
                    crate::stats::trace::traceparent(&stmt.query),
                );
            } else {
                t.timing.parse_named();
            }
            self.to_server.extend_from_slice(msg);
            return Ok(());
        }
        t.timing.parse_named();
        if t.status == crate::protocol::TxStatus::Failed
            && !super::sql::exits_transaction(&stmt.query)
        {
            // PostgreSQL refuses to parse anything but COMMIT/ROLLBACK in a
            // failed transaction, before it looks at the name; a statement
            // the server already has must not be answered as parsed.
            return self.fail(aborted());
        }
        if self.statements.contains_key(&name) {
            return self.fail(duplicate(&name));
        }
        self.statements.insert(name.clone(), stmt.clone());
        let undo_client = Some(name);
        if self
            .prepared
            .fresh(stmt.hash, self.catalog.version(stmt.hash))
        {
            if let Some(shape) = self.prepared.shape(stmt.hash) {
                let _ = stmt.promised.set(shape);
            }
            self.prepared.touch(stmt.hash);
            Counters::add(&self.counters.prepare_hits);
            synthetic(
                self.t,
                simple(BackendTag::ParseComplete),
                Undo {
                    server_stmt: None,
                    client_name: undo_client,
                },
            );
        } else {
            self.prepare_on_server(&stmt, false, undo_client);
        }
        Ok(())
    }

    fn bind(&mut self, body: &[u8]) -> Result<(), ProtocolError> {
        let mut b = Body::new(body, "Bind");
        let portal = b.cstr()?;
        let name = b.cstr()?;
        let rest = b.rest();
        if name.is_empty() {
            return self.bind_unnamed_deallocate(portal, body);
        }
        let Some(stmt) = self.lookup(name) else {
            return self.fail(undefined(name));
        };
        if let Some(needs) = &stmt.needs {
            self.ensure(needs);
        }
        // What it does to the session is this transaction's, whenever it
        // was parsed (a SET, a set_config, a function that sets); a
        // DEALLOCATE of one of the client's statements drops it now.
        if (!*stmt
            .plain
            .get_or_init(|| !stmt.foreign && effects(&stmt.query).is_plain())
            || self.t.calls_changer(&stmt.query))
            && let Some(target) = self.t.note_run(&stmt.query, stmt.foreign).deallocate
        {
            self.deallocate_on_bind(&target);
        }
        let version = self.catalog.version(stmt.hash);
        let fresh = self.prepared.fresh(stmt.hash, version);
        match (stmt.promised.get().copied(), &stmt.sql_prepare) {
            (Some(promised), None) => {
                if !fresh {
                    // Prepared here afresh: run the Bind once this server
                    // said which rows the statement gives now.
                    self.prepare_on_server(&stmt, true, None);
                    self.hold();
                    return Ok(());
                }
                match self.prepared.shape(stmt.hash) {
                    // Being described (prepared earlier in this batch).
                    None => {
                        self.hold();
                        return Ok(());
                    }
                    Some(here) if here.shape == promised.shape => self.prepared.touch(stmt.hash),
                    Some(here) if here.seq > promised.seq => {
                        // A migration changed this statement's result since
                        // the client was told its rows: PostgreSQL's answer
                        // to that client, until it prepares it again.
                        return self.fail(plan_changed(self.catalog));
                    }
                    Some(_) => {
                        // This server's statement is older than what the
                        // client was told (a migration nobody reported):
                        // prepared here again, then compared again.
                        self.forget_on_server(stmt.hash);
                        self.prepare_on_server(&stmt, true, None);
                        self.hold();
                        return Ok(());
                    }
                }
            }
            _ => {
                // No row shape known: the statement's generation tells
                // whether a server said its result changed since.
                if self.stale(&stmt) {
                    return self.fail(plan_changed(self.catalog));
                }
                if fresh && let Some(shape) = self.prepared.shape(stmt.hash) {
                    let _ = stmt.promised.set(shape);
                }
                self.ensure(&stmt);
            }
        }
        write::message(self.to_server, FrontendTag::Bind.byte(), |m| {
            m.put_slice(portal.as_bytes());
            m.put_u8(0);
            m.put_slice(stmt.name.as_bytes());
            m.put_u8(0);
            m.put_slice(rest);
        });
        self.t.batch.open();
        self.t.expect.push(Owed::BindNamed {
            hash: stmt.hash,
            version,
        });
        let shape = self.shape(&stmt);
        self.t.timing.bind(portal, Some(shape), stmt.trace);
        Ok(())
    }

    fn describe(&mut self, body: &[u8]) -> Result<(), ProtocolError> {
        let mut b = Body::new(body, "Describe");
        b.u8()?;
        let name = b.cstr()?;
        let Some(stmt) = self.lookup(name) else {
            return self.fail(undefined(name));
        };
        if let Some(needs) = &stmt.needs {
            self.ensure(needs);
        }
        self.ensure(&stmt);
        write::message(self.to_server, FrontendTag::Describe.byte(), |m| {
            m.put_u8(b'S');
            m.put_slice(stmt.name.as_bytes());
            m.put_u8(0);
        });
        self.t.batch.open();
        self.t.expect.push(Owed::DescribeStatement);
        Ok(())
    }

    /// Closing a client's statement only forgets the client's name: the
    /// server statement stays for others (the LRU bounds it).
    fn close(&mut self, body: &[u8]) -> Result<(), ProtocolError> {
        let mut b = Body::new(body, "Close");
        b.u8()?;
        let name = b.cstr()?;
        self.statements.remove(name);
        self.t.batch.open();
        synthetic(self.t, simple(BackendTag::CloseComplete), Undo::default());
        Ok(())
    }

    /// A statement's shape, computed once per statement.
    fn shape(&self, stmt: &Statement) -> Option<Arc<crate::stats::Shape>> {
        let shapes = self.shapes?;
        let opaque = self.t.opaque_literals;
        Some(
            stmt.shape
                .get_or_init(|| crate::client::txn::shape_in(shapes, &stmt.query, opaque))
                .clone(),
        )
    }

    fn lookup(&self, name: &str) -> Option<Arc<Statement>> {
        self.statements.get(name).cloned()
    }

    /// The client's current message waits until what was sent for it is
    /// answered (the server is asked to answer now, without a Sync); the
    /// session hands it over again then.
    fn hold(&mut self) {
        write::message(self.to_server, FrontendTag::Flush.byte(), |_| {});
        self.t.batch = crate::client::txn::Batch::Held;
    }

    /// Makes sure the server has `stmt` by the time the next message runs.
    fn ensure(&mut self, stmt: &Arc<Statement>) {
        if self
            .prepared
            .fresh(stmt.hash, self.catalog.version(stmt.hash))
        {
            self.prepared.touch(stmt.hash);
        } else {
            self.prepare_on_server(stmt, true, None);
        }
    }

    /// Records `hash` on the server; past the limit, queues a Close of the
    /// least recently used statement.
    fn evict_for(&mut self, stmt: &Statement) {
        let hash = stmt.hash;
        let version = self.catalog.version(hash);
        if self.prepared.contains(hash) && !self.prepared.fresh(hash, version) {
            // The server has this text from an older version: close it
            // first (its plan may no longer fit the catalog).
            self.forget_on_server(hash);
        }
        if let Some(victim) = self.prepared.insert(hash, version, self.cap) {
            self.close_on_server(victim);
            Counters::add(&self.counters.prepare_evictions);
        }
    }

    /// The server's statement `hash` is closed, to be prepared afresh
    /// (counted as a re-prepare).
    fn forget_on_server(&mut self, hash: u64) {
        self.close_on_server(hash);
        self.prepared.remove(hash);
        self.t.timing.delta.prepared_reprepares += 1;
    }

    /// Queues a Close of tidepool's statement `hash` on the server; its
    /// CloseComplete is dropped.
    fn close_on_server(&mut self, hash: u64) {
        self.close_named(&server_name(hash));
    }

    /// Queues a Close of the server statement `name`; its CloseComplete is
    /// dropped (a Close of a statement that does not exist succeeds).
    fn close_named(&mut self, name: &str) {
        write::message(self.to_server, FrontendTag::Close.byte(), |m| {
            m.put_u8(b'S');
            m.put_slice(name.as_bytes());
            m.put_u8(0);
        });
        self.t.expect.push(Owed::Close { swallow: true });
    }

    /// `stmt` as prepared now, in the current generation of its text.
    fn in_current_generation(&self, stmt: Arc<Statement>) -> Arc<Statement> {
        let generation = self.catalog.generation(stmt.hash);
        Statement::in_generation(stmt, generation)
    }

    /// A server said `stmt`'s result changed since the client prepared it
    /// (see `pool::Catalog`): the client is answered PostgreSQL's 0A000.
    fn stale(&self, stmt: &Statement) -> bool {
        self.catalog.generation(stmt.hash) != stmt.generation
    }

    /// Queues what prepares `stmt` on the server ahead of the client's next
    /// message: a Parse, or for SQL-prepared statements tidepool's own
    /// PREPARE query, whose answers are dropped.
    fn prepare_on_server(
        &mut self,
        stmt: &Arc<Statement>,
        swallow: bool,
        client_name: Option<String>,
    ) {
        self.evict_for(stmt);
        self.t.timing.delta.server_parses += 1;
        if let Some(sql) = &stmt.sql_prepare {
            write::query(self.to_server, sql);
            self.t.expect.push(Owed::Internal);
            Counters::add(&self.counters.prepares);
            return;
        }
        self.to_server.extend_from_slice(&stmt.parse);
        self.t.expect.push(Owed::Parse {
            swallow,
            undo: Undo {
                server_stmt: Some(stmt.hash),
                client_name,
            },
        });
        // Learns the row shape it has here (answers dropped).
        write::message(self.to_server, FrontendTag::Describe.byte(), |m| {
            m.put_u8(b'S');
            m.put_slice(stmt.name.as_bytes());
            m.put_u8(0);
        });
        self.t.expect.push(Owed::DescribeHidden { hash: stmt.hash });
        Counters::add(&self.counters.prepares);
    }

    /// Answers the current message with an error and drops the client's
    /// messages until its Sync, as PostgreSQL does after an error. The
    /// server is made to fail at the same point (a Describe of a statement
    /// that cannot exist), so that it too aborts the transaction (or the
    /// implicit one of this batch) and skips to the Sync.
    fn fail(&mut self, error: BytesMut) -> Result<(), ProtocolError> {
        synthetic(self.t, error, Undo::default());
        write::message(self.to_server, FrontendTag::Describe.byte(), |b| {
            b.put_u8(b'S');
            b.put_slice(ABORT_PROBE.as_bytes());
            b.put_u8(0);
        });
        self.t.expect.push(Owed::Abort);
        self.t.batch = crate::client::txn::Batch::Skipping;
        Ok(())
    }

    /// Answers the current simple query with an error and ReadyForQuery,
    /// as PostgreSQL would: inside a transaction block the transaction is
    /// aborted, on the server too (a query that fails to parse).
    fn fail_query(&mut self, mut error: BytesMut) {
        let t = &mut *self.t;
        let in_block = t.status != crate::protocol::TxStatus::Idle;
        let status = if in_block {
            crate::protocol::TxStatus::Failed
        } else {
            crate::protocol::TxStatus::Idle
        };
        write::ready_for_query(&mut error, status);
        synthetic(t, error, Undo::default());
        if in_block {
            // What the client was just told, before the server confirms it:
            // the client's next query may come first.
            t.status = status;
            write::query(self.to_server, ABORT_QUERY);
            t.expect.push(Owed::Internal);
        }
    }
}
