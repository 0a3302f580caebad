//! A light look at SQL text: which statements change session state, which
//! need a dedicated server (session features), and which drop prepared
//! statements. Not a parser: it reads leading keywords of each statement and
//! a few function names, and errs on the side of "changed" (a false positive
//! costs one extra round trip, never correctness).

mod commands;
mod lex;

use commands::{
    deallocate_name, execute_name, nested_execute, prepared_sql, session_functions,
    set_config_names, setting_name,
};
pub(crate) use lex::{
    contains_ignore_case, dollar_quote_end, first_keyword, identifier, is_ident_byte, keyword_at,
    leading_words, skip_space, split_statements,
};

use crate::client::pins;
use crate::stats::fingerprint::{block_comment_end, is_space, line_comment_end, string_end};

/// What a query string does to the session.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Effects {
    /// SET/RESET/DISCARD/set_config: the session parameters may have changed.
    pub params_changed: bool,
    /// A feature that ties the client to its server, named for messages
    /// (one of [`crate::client::pins::REASONS`]).
    pub session_feature: Option<&'static str>,
    /// May end session state that pinned a client (CLOSE, DISCARD, DROP,
    /// UNLISTEN, an advisory unlock): worth asking the server
    /// whether the pin can end.
    pub releases_session_state: bool,
    /// A `LISTEN` statement.
    pub listen: bool,
    /// `UNLISTEN` statements: their channels (None: `UNLISTEN *`).
    pub unlisten: Vec<Option<String>>,
    /// DISCARD ALL or DEALLOCATE ALL: every prepared statement is gone.
    pub drops_all_statements: bool,
    /// `DEALLOCATE [PREPARE] name` as the only statement.
    pub deallocate: Option<String>,
    /// SQL-level `PREPARE` or `EXECUTE` as the only statement.
    pub prepared: Option<PreparedSql>,
    /// A prepared statement run inside another one (`EXPLAIN [ANALYZE]
    /// EXECUTE p`, `CREATE TABLE t AS EXECUTE p`), as the only statement.
    pub nested_execute: Option<NestedExecute>,
    /// In a query of several statements: where each `EXECUTE p` (alone or
    /// inside EXPLAIN / CREATE TABLE AS) names its statement, in order.
    pub executes: Vec<NestedExecute>,
    /// Custom (dotted) parameters set or reset: `pg_settings` does not list
    /// them, so they are read back by name.
    pub custom_params: Vec<String>,
    /// DDL (`CREATE`, `ALTER`, `DROP`, `IMPORT FOREIGN SCHEMA`): prepared
    /// statements may no longer fit the catalog once it commits.
    pub ddl: bool,
    /// Mentions `pg_prepared_statements`: the client is shown its own
    /// statements (`client::statement_list`).
    pub lists_statements: bool,
}

impl Effects {
    /// Nothing to note: the statement leaves the session as it was.
    pub fn is_plain(&self) -> bool {
        *self == Effects::default()
    }
}

/// Where a nested `EXECUTE` names its statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NestedExecute {
    pub name: String,
    /// Byte range of the name in the query text.
    pub start: usize,
    pub end: usize,
}

/// A single-statement SQL `PREPARE name ... AS ...` or `EXECUTE name ...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PreparedSql {
    /// `rest` is everything after the name: `[(types)] AS statement`.
    Prepare { name: String, rest: String },
    /// `rest` is everything after the name: `[(args)]`.
    Execute { name: String, rest: String },
}

pub fn effects(sql: &str) -> Effects {
    let mut e = Effects::default();
    // Fast path, no allocation: one plain DML/query statement can only
    // matter through the functions it calls.
    // A trailing `;` (as pgbench and many drivers send) still makes one
    // statement; a `;` anywhere else (even quoted) takes the full scan.
    let body = sql.trim_end().strip_suffix(';').unwrap_or(sql);
    e.lists_statements = contains_ignore_case(sql, "pg_prepared_statements");
    if !body.contains(';') && starts_with_plain_statement(body) {
        let calls = session_functions(sql);
        if calls.set_config {
            e.params_changed = true;
            e.custom_params.extend(set_config_names(sql));
        }
        if calls.advisory_lock {
            e.session_feature = Some(pins::ADVISORY_LOCK);
        }
        e.releases_session_state = calls.advisory_unlock;
        return e;
    }
    let lower_has = |needle: &str| contains_ignore_case(sql, needle);
    if lower_has("set_config") {
        e.params_changed = true;
        e.custom_params.extend(set_config_names(sql));
    }
    if lower_has("pg_advisory_lock") || lower_has("pg_try_advisory_lock") {
        e.session_feature = Some(pins::ADVISORY_LOCK);
    }
    e.releases_session_state = lower_has("pg_advisory_unlock");
    let statements: Vec<&str> = split_statements(sql);
    let single = statements.len() == 1;
    for stmt in statements {
        // The first word ends where a quoted name may start (`LISTEN"x"`).
        let (kw, kw_end) = keyword_at(stmt, 0);
        let words: Vec<String> = if kw.is_empty() {
            leading_words(stmt, 4)
        } else {
            std::iter::once(kw)
                .chain(leading_words(&stmt[kw_end..], 3))
                .collect()
        };
        let w = |i: usize| words.get(i).map(String::as_str).unwrap_or("");
        let custom = |name: &str| name.contains('.').then(|| name.to_owned());
        // `stmt` lies within `sql`: positions are made the query's.
        let offset = stmt.as_ptr() as usize - sql.as_ptr() as usize;
        let in_query = |n: NestedExecute| NestedExecute {
            start: n.start + offset,
            end: n.end + offset,
            ..n
        };
        if matches!(w(0), "explain" | "create") {
            match nested_execute(stmt).map(in_query) {
                Some(n) if !single => e.executes.push(n),
                n => e.nested_execute = n,
            }
        }
        if !single && first_keyword(stmt) == "execute" {
            e.executes.extend(execute_name(stmt).map(in_query));
        }
        // PREPARE, EXECUTE and DEALLOCATE by their leading keyword alone: a
        // name may follow it without a space (`EXECUTE"s1"`).
        match first_keyword(stmt).as_str() {
            "prepare" | "execute" if single => {
                e.prepared = prepared_sql(stmt);
                continue;
            }
            "prepare" => {
                e.session_feature = Some(pins::SQL_PREPARE);
                continue;
            }
            "deallocate" => {
                match deallocate_name(stmt) {
                    Some(None) => e.drops_all_statements = true,
                    Some(Some(name)) if single => e.deallocate = Some(name),
                    _ => {}
                }
                continue;
            }
            _ => {}
        }
        match w(0) {
            "set" if w(1) != "local" && w(1) != "transaction" => {
                e.params_changed = true;
                let at = if w(1) == "session" {
                    keyword_at(stmt, kw_end).1
                } else {
                    kw_end
                };
                e.custom_params
                    .extend(setting_name(stmt, at).as_deref().and_then(custom));
            }
            "reset" => {
                e.params_changed = true;
                e.custom_params
                    .extend(setting_name(stmt, kw_end).as_deref().and_then(custom));
            }
            "discard" => {
                e.params_changed = true;
                e.releases_session_state = true;
                if w(1) == "all" {
                    e.drops_all_statements = true;
                    // DISCARD ALL includes UNLISTEN *.
                    e.unlisten.push(None);
                }
            }
            // A DO block or a procedure may SET anything (set_config, SET
            // ROLE): the session's settings are read back afterwards.
            "do" | "call" => e.params_changed = true,
            "listen" => {
                e.session_feature = Some(pins::LISTEN);
                e.listen = true;
            }
            "unlisten" => {
                e.releases_session_state = true;
                e.unlisten.push(listen_channel(stmt, kw_end));
            }
            "declare" if contains_ignore_case(stmt, "with hold") => {
                e.session_feature = Some(pins::HOLD_CURSOR)
            }
            "close" | "drop" => {
                e.releases_session_state = true;
                e.ddl |= w(0) == "drop";
            }
            "create"
                if w(1) == "temp"
                    || w(1) == "temporary"
                    || ((w(1) == "global" || w(1) == "local")
                        && (w(2) == "temp" || w(2) == "temporary")) =>
            {
                e.session_feature = Some(pins::TEMP_TABLE)
            }
            "create" | "alter" | "import" => e.ddl = true,
            "load" => e.session_feature = Some(pins::LOAD),
            _ => {}
        }
    }
    e
}

/// The channel of a `LISTEN`/`UNLISTEN` whose keyword ends at `at`
/// (None: `*`, or no name).
pub fn listen_channel(stmt: &str, at: usize) -> Option<String> {
    let i = skip_space(stmt, at);
    if stmt.as_bytes().get(i) == Some(&b'*') {
        return None;
    }
    identifier(stmt, i).map(|(name, _)| name)
}

/// Whether `sql` ends a transaction (COMMIT, END, ROLLBACK [TO], ABORT,
/// PREPARE TRANSACTION): the only statements PostgreSQL parses in a
/// failed transaction.
pub fn exits_transaction(sql: &str) -> bool {
    let words = leading_words(sql, 2);
    match words.first().map(String::as_str) {
        Some("commit" | "end" | "rollback" | "abort") => true,
        Some("prepare") => words.get(1).is_some_and(|w| w == "transaction"),
        _ => false,
    }
}

/// Whether the text starts with a keyword of a statement that cannot change
/// session state by itself (SELECT, INSERT, UPDATE, DELETE, WITH, VALUES, …).
fn starts_with_plain_statement(sql: &str) -> bool {
    let t = sql.trim_start().as_bytes();
    let word_len = t.iter().take_while(|b| b.is_ascii_alphabetic()).count();
    // Lower-cased into a stack buffer: one comparison per keyword of that
    // length, no case-folding per keyword.
    let mut w = [0u8; 6];
    let Some(word) = t.get(..word_len).filter(|w| w.len() <= 6) else {
        return false;
    };
    for (d, s) in w.iter_mut().zip(word) {
        *d = s.to_ascii_lowercase();
    }
    matches!(
        &w[..word_len],
        b"select"
            | b"insert"
            | b"update"
            | b"delete"
            | b"with"
            | b"values"
            | b"table"
            | b"merge"
            | b"copy"
    )
}

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
