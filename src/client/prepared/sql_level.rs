//! SQL-level prepared statements in transaction mode: `PREPARE`,
//! `EXECUTE`, `EXPLAIN EXECUTE` and `DEALLOCATE name` name a client's
//! statement, which servers know under tidepool's name only. As simple
//! queries and as extended-protocol statements (psycopg 3 sends every
//! statement so) alike, the client's name is put in for tidepool's, and the
//! answers are PostgreSQL's.

use super::*;

/// What becomes of a client's Parse of SQL-level PREPARE / EXECUTE.
pub(super) enum ParseAs {
    /// Not such a statement, or one the server answers itself.
    AsIs,
    /// Answered here (an error).
    Answered,
    /// This text is parsed instead; it runs that statement, if any.
    Text(String, Option<Arc<Statement>>),
}

impl Handler<'_> {
    /// SQL-level `PREPARE` and `EXECUTE`: the client's name maps to a shared
    /// server statement, exactly like a protocol-level Parse.
    pub(super) fn sql_prepared(
        &mut self,
        msg: &[u8],
        client_sql: &str,
        foreign: bool,
        p: &PreparedSql,
    ) -> Result<(), ProtocolError> {
        let status = self.t.status;
        match p {
            PreparedSql::Prepare { name, rest } => {
                if self.statements.contains_key(name) {
                    self.fail_query(duplicate(name));
                    return Ok(());
                }
                let stmt = Statement::from_sql_prepare(rest, foreign, self.t.statement_context());
                let stmt = self.in_current_generation(stmt);
                self.t.note_statement(&stmt.query, stmt.foreign);
                self.statements.insert(name.clone(), stmt.clone());
                if self
                    .prepared
                    .fresh(stmt.hash, self.catalog.version(stmt.hash))
                {
                    self.prepared.touch(stmt.hash);
                    Counters::add(&self.counters.prepare_hits);
                    let mut out = BytesMut::new();
                    write::command_complete(&mut out, "PREPARE");
                    write::ready_for_query(&mut out, status);
                    synthetic(
                        self.t,
                        out,
                        Undo {
                            server_stmt: None,
                            client_name: Some(name.clone()),
                        },
                    );
                    return Ok(());
                }
                self.evict_for(&stmt);
                Counters::add(&self.counters.prepares);
                self.t.timing.delta.server_parses += 1;
                let sql = stmt.sql_prepare.clone().unwrap_or_default();
                write::query_text(self.to_server, &sql, stmt.foreign);
                self.t.expect.push(Owed::UntilReady {
                    undo: Some(Undo {
                        server_stmt: Some(stmt.hash),
                        client_name: Some(name.clone()),
                    }),
                    failed: false,
                    position_shift: position_shift(
                        client_sql,
                        rest,
                        "PREPARE ".len() + stmt.name.len(),
                    ),
                    bound: None,
                });
                self.t
                    .timing
                    .query(shape_of(self.shapes, &sql, self.t.opaque_literals), None);
            }
            PreparedSql::Execute { name, rest } => {
                let Some(stmt) = self.lookup(name) else {
                    // Unknown to tidepool: the server answers (with 26000).
                    self.t.expect.push(Owed::UntilReady {
                        undo: None,
                        failed: false,
                        position_shift: 0,
                        bound: None,
                    });
                    self.t.timing.query(None, None);
                    self.to_server.extend_from_slice(msg);
                    return Ok(());
                };
                if self.stale(&stmt) {
                    self.fail_query(plan_changed(self.catalog));
                    return Ok(());
                }
                self.ensure(&stmt);
                self.t.note_statement(&stmt.query, stmt.foreign);
                write::query_text(
                    self.to_server,
                    &format!("EXECUTE {}{rest}", stmt.name),
                    foreign,
                );
                self.t.expect.push(Owed::UntilReady {
                    undo: None,
                    failed: false,
                    position_shift: position_shift(
                        client_sql,
                        rest,
                        "EXECUTE ".len() + stmt.name.len(),
                    ),
                    bound: Some((stmt.hash, self.catalog.version(stmt.hash))),
                });
                let shape = self.shape(&stmt);
                self.t.timing.query(shape, None);
            }
        }
        Ok(())
    }

    /// A Parse of `text` in place of the client's, named `name`, with the
    /// client's parameter types (`rest`); `needs`: the statement the text
    /// runs.
    pub(super) fn parse_text(
        &mut self,
        name: &str,
        text: &str,
        foreign: bool,
        rest: &[u8],
        needs: Option<Arc<Statement>>,
    ) -> Result<(), ProtocolError> {
        let mut out = BytesMut::new();
        write::message(&mut out, FrontendTag::Parse.byte(), |m| {
            m.put_slice(name.as_bytes());
            m.put_u8(0);
            if foreign {
                m.put_slice(&crate::protocol::messages::foreign_bytes(text));
            } else {
                m.put_slice(text.as_bytes());
            }
            m.put_u8(0);
            m.put_slice(rest);
        });
        self.parse_with(&out, &out[5..], needs)
    }

    /// SQL-level PREPARE, EXECUTE or `EXPLAIN EXECUTE` sent as a Parse
    /// (psycopg 3 sends every statement so), as [`Handler::sql_prepared`]
    /// handles them in a simple query: the client's statement is
    /// tidepool's, wherever the client runs it.
    pub(super) fn sql_prepared_in_parse(
        &mut self,
        query: &str,
        foreign: bool,
        e: &crate::client::sql::Effects,
    ) -> Result<ParseAs, ProtocolError> {
        match (&e.prepared, &e.nested_execute) {
            (Some(PreparedSql::Prepare { name, rest }), _) => {
                if self.statements.contains_key(name) {
                    self.fail(duplicate(name))?;
                    return Ok(ParseAs::Answered);
                }
                let stmt = Statement::from_sql_prepare(rest, foreign, self.t.statement_context());
                let stmt = self.in_current_generation(stmt);
                self.t.note_statement(&stmt.query, stmt.foreign);
                self.statements.insert(name.clone(), stmt);
                // The client's own PREPARE runs too, making a server
                // statement of the client's name, which nothing else uses
                // (tidepool's are its own names): one another client left
                // on this server is closed first.
                self.close_named(name);
                Ok(ParseAs::Text(query.to_owned(), None))
            }
            (Some(PreparedSql::Execute { name, rest }), _) => {
                let Some(stmt) = self.lookup(name) else {
                    // Unknown to tidepool: the server answers (26000).
                    return Ok(ParseAs::AsIs);
                };
                if self.stale(&stmt) {
                    self.fail(plan_changed(self.catalog))?;
                    return Ok(ParseAs::Answered);
                }
                self.ensure(&stmt);
                self.t.note_statement(&stmt.query, stmt.foreign);
                Ok(ParseAs::Text(
                    format!("EXECUTE {}{rest}", stmt.name),
                    Some(stmt),
                ))
            }
            (None, Some(n)) => {
                let Some(stmt) = self.lookup(&n.name) else {
                    return Ok(ParseAs::AsIs);
                };
                if self.stale(&stmt) {
                    self.fail(plan_changed(self.catalog))?;
                    return Ok(ParseAs::Answered);
                }
                self.ensure(&stmt);
                let text = format!("{}{}{}", &query[..n.start], stmt.name, &query[n.end..]);
                Ok(ParseAs::Text(text, Some(stmt)))
            }
            _ => Ok(ParseAs::AsIs),
        }
    }

    /// A Bind of the unnamed statement `DEALLOCATE name` (psycopg's
    /// eviction in pipeline mode): it drops the client's statement, which
    /// the server knows under tidepool's name only. A server statement of
    /// the client's name is made just before (closed first, should one have
    /// stayed), for the server's DEALLOCATE to drop with PostgreSQL's own
    /// answers; an unknown name gets PostgreSQL's own 26000.
    pub(super) fn bind_unnamed_deallocate(
        &mut self,
        portal: &str,
        body: &[u8],
    ) -> Result<(), ProtocolError> {
        if let crate::client::txn::UnnamedDrops::One(target) = self.t.take_unnamed_drops() {
            self.deallocate_on_bind(&target);
        }
        let t = &mut *self.t;
        write::message(self.to_server, FrontendTag::Bind.byte(), |m| {
            m.put_slice(body)
        });
        t.batch.open();
        t.expect.push(Owed::Bind);
        t.timing.bind(portal, None, None);
        Ok(())
    }

    /// A Bind of a statement that runs `DEALLOCATE target` (the unnamed
    /// one, or one the client prepared with that text): the client's
    /// statement is forgotten, and the server gets a statement of that name
    /// for its DEALLOCATE to drop (closed first: one left over from a
    /// client's SQL PREPARE sent as a statement, see
    /// [`Handler::sql_prepared_in_parse`], must not collide). An unknown
    /// name, or a failed transaction, is left to the server's own answer.
    pub(super) fn deallocate_on_bind(&mut self, target: &str) {
        if self.t.status == crate::protocol::TxStatus::Failed
            || self.statements.remove(target).is_none()
        {
            return;
        }
        self.close_named(target);
        let t = &mut *self.t;
        write::message(self.to_server, FrontendTag::Parse.byte(), |m| {
            m.put_slice(target.as_bytes());
            m.put_u8(0);
            m.put_slice(b"SELECT\0\0\0");
        });
        t.expect.push(Owed::Parse {
            swallow: true,
            undo: Undo::default(),
        });
    }

    /// A query of several statements, some of them `EXECUTE p` (alone or
    /// inside EXPLAIN / CREATE TABLE AS): each statement the client
    /// prepared is made sure on this server and named by tidepool's name.
    /// Names tidepool does not know go as they are (the server answers,
    /// or has them: a pinned client's own PREPARE in such a query).
    pub(super) fn executes_in_query(
        &mut self,
        sql: &str,
        foreign: bool,
        e: &crate::client::sql::Effects,
    ) -> Result<(), ProtocolError> {
        let mut rewritten = String::with_capacity(sql.len() + 32);
        let mut at = 0;
        for n in &e.executes {
            let Some(stmt) = self.lookup(&n.name) else {
                continue;
            };
            if self.stale(&stmt) {
                self.fail_query(plan_changed(self.catalog));
                return Ok(());
            }
            self.ensure(&stmt);
            self.t.note_statement(&stmt.query, stmt.foreign);
            rewritten.push_str(&sql[at..n.start]);
            rewritten.push_str(&stmt.name);
            at = n.end;
        }
        rewritten.push_str(&sql[at..]);
        self.t.note_effects(e);
        write::query_text(self.to_server, &rewritten, foreign);
        self.owe_query(sql, 0, None);
        Ok(())
    }
}
