//! A light look at SQL text: which statements change session state, which
//! need a dedicated server (session features), and which drop prepared
//! statements. Not a parser: it reads leading keywords of each statement and
//! a few function names, and errs on the side of "changed" (a false positive
//! costs one extra round trip, never correctness).

use crate::stats::fingerprint::{block_comment_end, is_space, line_comment_end, string_end};

/// What a query string does to the session.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Effects {
    /// SET/RESET/DISCARD/set_config: the session parameters may have changed.
    pub params_changed: bool,
    /// A feature that ties the client to its server, named for messages.
    pub session_feature: Option<&'static str>,
    /// DISCARD ALL or DEALLOCATE ALL: every prepared statement is gone.
    pub drops_all_statements: bool,
    /// `DEALLOCATE [PREPARE] name` as the only statement.
    pub deallocate: Option<String>,
    /// SQL-level `PREPARE` or `EXECUTE` as the only statement.
    pub prepared: Option<PreparedSql>,
    /// A prepared statement run inside another one (`EXPLAIN [ANALYZE]
    /// EXECUTE p`, `CREATE TABLE t AS EXECUTE p`), as the only statement.
    pub nested_execute: Option<NestedExecute>,
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
        let (set_config, advisory) = session_functions(sql);
        if set_config {
            e.params_changed = true;
            e.custom_params.extend(set_config_names(sql));
        }
        if advisory {
            e.session_feature = Some("session advisory locks (pg_advisory_lock)");
        }
        return e;
    }
    let lower_has = |needle: &str| contains_ignore_case(sql, needle);
    if lower_has("set_config") {
        e.params_changed = true;
        e.custom_params.extend(set_config_names(sql));
    }
    if lower_has("pg_advisory_lock") || lower_has("pg_try_advisory_lock") {
        e.session_feature = Some("session advisory locks (pg_advisory_lock)");
    }
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
        if single && matches!(w(0), "explain" | "create") {
            // `stmt` lies within `sql`: positions are made the query's.
            let offset = stmt.as_ptr() as usize - sql.as_ptr() as usize;
            e.nested_execute = nested_execute(stmt).map(|n| NestedExecute {
                start: n.start + offset,
                end: n.end + offset,
                ..n
            });
        }
        // PREPARE, EXECUTE and DEALLOCATE by their leading keyword alone: a
        // name may follow it without a space (`EXECUTE"s1"`).
        match first_keyword(stmt).as_str() {
            "prepare" | "execute" if single => {
                e.prepared = prepared_sql(stmt);
                continue;
            }
            "prepare" => {
                e.session_feature = Some("PREPARE in a multi-statement query");
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
                if w(1) == "all" {
                    e.drops_all_statements = true;
                }
            }
            "listen" => e.session_feature = Some("LISTEN"),
            "declare" if contains_ignore_case(stmt, "with hold") => {
                e.session_feature = Some("WITH HOLD cursors")
            }
            "create"
                if w(1) == "temp"
                    || w(1) == "temporary"
                    || ((w(1) == "global" || w(1) == "local")
                        && (w(2) == "temp" || w(2) == "temporary")) =>
            {
                e.session_feature = Some("temporary tables")
            }
            "create" | "alter" | "drop" | "import" => e.ddl = true,
            "load" => e.session_feature = Some("LOAD"),
            _ => {}
        }
    }
    e
}

/// `EXPLAIN [options] EXECUTE name …` or `CREATE … AS EXECUTE name …` (a
/// single statement): the name and where it stands in `stmt`.
fn nested_execute(stmt: &str) -> Option<NestedExecute> {
    let b = stmt.as_bytes();
    let (first, mut i) = keyword_at(stmt, 0);
    let mut last_word = first.clone();
    loop {
        i = skip_space(stmt, i);
        match *b.get(i)? {
            b'(' => {
                // Options, column lists: balanced, with no quotes inside.
                let mut depth = 0usize;
                while let Some(&c) = b.get(i) {
                    match c {
                        b'(' => depth += 1,
                        b')' => depth = depth.saturating_sub(1),
                        b'\'' | b'"' | b'$' => return None,
                        _ => {}
                    }
                    i += 1;
                    if depth == 0 {
                        break;
                    }
                }
            }
            b'.' | b',' | b'=' => i += 1,
            b'"' => i = identifier(stmt, i)?.1,
            c if is_ident_byte(c) => {
                let (word, end) = keyword_at(stmt, i);
                if word == "execute" && (last_word == "as" || first == "explain") {
                    let at = skip_space(stmt, end);
                    let (name, name_end) = identifier(stmt, at)?;
                    return Some(NestedExecute {
                        name,
                        start: at,
                        end: name_end,
                    });
                }
                last_word = word;
                i = end;
            }
            _ => return None,
        }
    }
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

/// Literal custom (dotted) names in `set_config('app.x', ...)` calls.
fn set_config_names(sql: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = sql;
    while let Some(at) = rest.to_ascii_lowercase().find("set_config") {
        rest = &rest[at + "set_config".len()..];
        let args = rest.trim_start().trim_start_matches('(').trim_start();
        if let Some(lit) = args.strip_prefix('\'')
            && let Some(end) = lit.find('\'')
            && lit[..end].contains('.')
        {
            names.push(lit[..end].to_ascii_lowercase());
        }
    }
    names
}

/// The bare word after `from` (comments and spaces skipped), lowercased,
/// and where it ends; empty if none starts there.
fn keyword_at(stmt: &str, from: usize) -> (String, usize) {
    let i = skip_space(stmt, from);
    let end = i + stmt.as_bytes()[i..]
        .iter()
        .take_while(|c| is_ident_byte(**c))
        .count();
    (stmt[i..end].to_ascii_lowercase(), end)
}

fn first_keyword(stmt: &str) -> String {
    keyword_at(stmt, 0).0
}

/// The statement `DEALLOCATE [PREPARE] name` drops: `Some(None)` for ALL,
/// `None` when no name can be read (the server will answer with an error).
fn deallocate_name(stmt: &str) -> Option<Option<String>> {
    let (_, mut i) = keyword_at(stmt, 0);
    let (word, after) = keyword_at(stmt, i);
    if word == "prepare" && identifier(stmt, skip_space(stmt, after)).is_some() {
        // `DEALLOCATE PREPARE x`; alone, `prepare` is the name itself.
        i = after;
    }
    let at = skip_space(stmt, i);
    let (name, end) = identifier(stmt, at)?;
    if name == "all" && stmt.as_bytes()[at] != b'"' {
        return Some(None);
    }
    // Only the name may follow.
    (skip_space(stmt, end) == stmt.len()).then_some(Some(name))
}

/// Parses `PREPARE name [(types)] AS stmt` or `EXECUTE name [(args)]`.
fn prepared_sql(stmt: &str) -> Option<PreparedSql> {
    let b = stmt.as_bytes();
    let (keyword, kw_end) = keyword_at(stmt, 0);
    let i = skip_space(stmt, kw_end);
    let (name, after) = identifier(stmt, i)?;
    let rest = stmt[after..].trim_end().to_owned();
    match keyword.as_str() {
        "prepare" => {
            // Must contain AS after optional parenthesised types.
            let mut j = skip_space(stmt, after);
            if b.get(j) == Some(&b'(') {
                let mut depth = 0;
                while j < b.len() {
                    match b[j] {
                        b'(' => depth += 1,
                        b')' => {
                            depth -= 1;
                            if depth == 0 {
                                j += 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                    j += 1;
                }
                j = skip_space(stmt, j);
            }
            let as_kw = stmt.get(j..j + 2)?;
            // AS ends where a word would: at a space, `(`, a comment, …
            let next = b.get(j + 2).copied().unwrap_or(b' ');
            if !as_kw.eq_ignore_ascii_case("as") || is_ident_byte(next) {
                return None;
            }
            Some(PreparedSql::Prepare { name, rest })
        }
        "execute" => Some(PreparedSql::Execute { name, rest }),
        _ => None,
    }
}

pub(super) fn skip_space(s: &str, mut i: usize) -> usize {
    let b = s.as_bytes();
    loop {
        while i < b.len() && is_space(b[i]) {
            i += 1;
        }
        if b[i..].starts_with(b"--") {
            i = line_comment_end(b, i);
        } else if b[i..].starts_with(b"/*") {
            i = block_comment_end(b, i);
        } else {
            return i;
        }
    }
}

/// End of a dollar quote (`$tag$…$tag$`) starting at `i`, if one starts
/// there (an open one runs to the end).
pub(super) fn dollar_quote_end(s: &str, i: usize) -> Option<usize> {
    let b = s.as_bytes();
    let mut j = i + 1;
    if b.get(j)
        .is_some_and(|&c| c.is_ascii_alphabetic() || c == b'_' || c >= 0x80)
    {
        while b
            .get(j)
            .is_some_and(|&c| c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80)
        {
            j += 1;
        }
    }
    if b.get(j) != Some(&b'$') {
        return None;
    }
    let tag = &s[i..=j];
    Some(
        s[j + 1..]
            .find(tag)
            .map_or(b.len(), |p| j + 1 + p + tag.len()),
    )
}

/// A setting's name at `i` (after spaces and comments), as PostgreSQL reads
/// it: identifiers joined by `.` (`app."Tenant"` is `app.Tenant`).
fn setting_name(stmt: &str, i: usize) -> Option<String> {
    let mut at = skip_space(stmt, i);
    let mut name = String::new();
    loop {
        let (part, end) = identifier(stmt, at)?;
        name.push_str(&part);
        let dot = skip_space(stmt, end);
        if stmt.as_bytes().get(dot) != Some(&b'.') {
            return Some(name);
        }
        name.push('.');
        at = skip_space(stmt, dot + 1);
    }
}

/// PostgreSQL keeps the first 63 bytes of an identifier (NAMEDATALEN - 1).
const MAX_IDENTIFIER_BYTES: usize = 63;

/// A byte of a bare identifier after its first (multi-byte characters are
/// letters to PostgreSQL's scanner).
pub(super) fn is_ident_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80
}

/// An SQL identifier at `i` and where it ends, read as PostgreSQL's scanner
/// does: quoted (case kept, `""` is a `"`, never empty) or bare (starting
/// with a letter, `_` or a multi-byte character; ASCII lowercased), cut to
/// 63 bytes on a character boundary.
fn identifier(s: &str, i: usize) -> Option<(String, usize)> {
    let b = s.as_bytes();
    let (mut name, end) = if b.get(i) == Some(&b'"') {
        let mut name = String::new();
        let mut j = i + 1;
        loop {
            let close = j + s.get(j..)?.find('"')?;
            name.push_str(&s[j..close]);
            if b.get(close + 1) == Some(&b'"') {
                name.push('"');
                j = close + 2;
            } else if name.is_empty() {
                return None;
            } else {
                break (name, close + 1);
            }
        }
    } else {
        let first = *b.get(i)?;
        if !(first.is_ascii_alphabetic() || first == b'_' || first >= 0x80) {
            return None;
        }
        let len = b[i..].iter().take_while(|c| is_ident_byte(**c)).count();
        (s[i..i + len].to_ascii_lowercase(), i + len)
    };
    if name.len() > MAX_IDENTIFIER_BYTES {
        let mut cut = MAX_IDENTIFIER_BYTES;
        while !name.is_char_boundary(cut) {
            cut -= 1;
        }
        name.truncate(cut);
    }
    Some((name, end))
}

/// Whether `sql` calls `set_config`, and a session-level advisory lock
/// function: one pass over the text's underscores (all three names have one).
fn session_functions(sql: &str) -> (bool, bool) {
    let h = sql.as_bytes();
    let at = |i: usize, back: usize, name: &[u8]| {
        i >= back
            && h.get(i - back..i - back + name.len())
                .is_some_and(|w| w.eq_ignore_ascii_case(name))
    };
    let (mut set_config, mut advisory) = (false, false);
    for i in memchr::memchr_iter(b'_', h) {
        set_config |= at(i, 3, b"set_config");
        advisory |= at(i, 2, b"pg_advisory_lock") || at(i, 2, b"pg_try_advisory_lock");
    }
    (set_config, advisory)
}

/// Case-insensitive substring test for ASCII needles. The needles here all
/// hold a `_`, rare in SQL text, so only the text's underscores are tried as
/// anchors; a needle without one falls back to trying every position.
fn contains_ignore_case(hay: &str, needle: &str) -> bool {
    let (h, n) = (hay.as_bytes(), needle.as_bytes());
    if n.is_empty() {
        return true;
    }
    let Some(anchor) = n.iter().position(|&b| b == b'_') else {
        return h.windows(n.len()).any(|w| w.eq_ignore_ascii_case(n));
    };
    h.iter().enumerate().any(|(i, &b)| {
        b == b'_'
            && i >= anchor
            && h.get(i - anchor..i - anchor + n.len())
                .is_some_and(|w| w.eq_ignore_ascii_case(n))
    })
}

/// Splits on `;` outside quotes and comments, which are read as PostgreSQL's
/// scanner reads them: `E'…'` strings with backslash escapes, nested
/// `/* */` comments, `$tag$` quotes (a `$` inside an identifier is not one).
fn split_statements(sql: &str) -> Vec<&str> {
    let b = sql.as_bytes();
    let mut out = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < b.len() {
        i = match b[i] {
            b'\'' => {
                let escapes =
                    i > 0 && matches!(b[i - 1], b'e' | b'E') && (i < 2 || !is_ident_byte(b[i - 2]));
                string_end(b, i + 1, escapes)
            }
            b'"' => b[i + 1..]
                .iter()
                .position(|&c| c == b'"')
                .map_or(b.len(), |p| i + p + 2),
            b'-' if b.get(i + 1) == Some(&b'-') => line_comment_end(b, i),
            b'/' if b.get(i + 1) == Some(&b'*') => block_comment_end(b, i),
            b'$' if i == 0 || !is_ident_byte(b[i - 1]) => dollar_quote_end(sql, i).unwrap_or(i + 1),
            b';' => {
                out.push(&sql[start..i]);
                start = i + 1;
                i + 1
            }
            _ => i + 1,
        };
    }
    out.push(&sql[start.min(sql.len())..]);
    out.retain(|s| !leading_words(s, 1).is_empty());
    out
}

/// The first `n` words of a statement, lowercased, skipping comments.
fn leading_words(stmt: &str, n: usize) -> Vec<String> {
    let mut words = Vec::new();
    let b = stmt.as_bytes();
    let mut i = 0;
    while i < b.len() && words.len() < n {
        let c = b[i];
        if is_space(c) || c == b'(' {
            i += 1;
        } else if c == b'-' && b.get(i + 1) == Some(&b'-') {
            i = line_comment_end(b, i);
        } else if c == b'/' && b.get(i + 1) == Some(&b'*') {
            i = block_comment_end(b, i);
        } else {
            let start = i;
            while i < b.len()
                && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b'"' || b[i] == b'.')
            {
                i += 1;
            }
            if i == start {
                break;
            }
            let word = &stmt[start..i];
            if word.starts_with('"') {
                words.push(word.trim_matches('"').to_owned());
            } else {
                words.push(word.to_ascii_lowercase());
            }
        }
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_executes_are_found_where_they_stand() {
        // The name, and the text it stands as.
        let at = |sql: &str| {
            effects(sql)
                .nested_execute
                .map(|n| (n.name.clone(), sql[n.start..n.end].to_owned()))
        };
        assert_eq!(at("explain execute p(1)"), Some(("p".into(), "p".into())));
        assert_eq!(
            at("EXPLAIN (ANALYZE, COSTS OFF) EXECUTE Q3 (1)"),
            Some(("q3".into(), "Q3".into()))
        );
        assert_eq!(
            at("explain analyze verbose execute \"P\"(1)"),
            Some(("P".into(), "\"P\"".into()))
        );
        assert_eq!(
            at("create temp table t (a, b) as execute p(1)"),
            Some(("p".into(), "p".into()))
        );
        assert_eq!(
            at("create table s.t as execute p"),
            Some(("p".into(), "p".into()))
        );
        for sql in [
            "explain select 1",
            "create table t as select 1",
            "create table execute (a int)",
            "explain execute p(1); select 1",
            "select 'explain execute p'",
        ] {
            assert_eq!(effects(sql).nested_execute, None, "{sql}");
        }
    }

    #[test]
    fn transaction_exits_are_the_statements_a_failed_transaction_parses() {
        for sql in [
            "ROLLBACK",
            " /* c */ rollback to s1",
            "commit",
            "END",
            "abort",
            "prepare transaction 'x'",
        ] {
            assert!(exits_transaction(sql), "{sql}");
        }
        for sql in [
            "select 1",
            "prepare p as select 1",
            "begin",
            "rollbacks",
            "",
        ] {
            assert!(!exits_transaction(sql), "{sql}");
        }
    }

    #[test]
    fn substring_search_ignores_case_with_or_without_an_anchor() {
        assert!(contains_ignore_case(
            "select PG_Advisory_Lock(1)",
            "pg_advisory_lock"
        ));
        assert!(contains_ignore_case(
            "pg_try_advisory_lock",
            "pg_try_advisory_lock"
        ));
        assert!(contains_ignore_case("x _set_config", "set_config"));
        assert!(!contains_ignore_case("set_confi", "set_config"));
        assert!(!contains_ignore_case("_", "set_config"));
        assert!(!contains_ignore_case(
            "pg_advisory_xact_lock(1)",
            "pg_advisory_lock"
        ));
        assert!(contains_ignore_case(
            "declare c cursor WITH HOLD for",
            "with hold"
        ));
        assert!(!contains_ignore_case("with  hold", "with hold"));
    }

    #[test]
    fn a_trailing_semicolon_keeps_the_fast_path_right() {
        assert_eq!(
            effects("SELECT abalance FROM t WHERE aid = 1;"),
            Effects::default()
        );
        assert!(
            effects("select pg_advisory_lock(1);  ")
                .session_feature
                .is_some()
        );
        assert!(effects("select 1; set a = 1;").params_changed);
        assert!(effects("select ';'; set a = 1").params_changed);
    }

    #[test]
    fn session_changes_are_seen_and_local_ones_ignored() {
        assert!(effects("SET search_path = a").params_changed);
        assert!(effects("  /* hi */ set TimeZone to 'UTC'").params_changed);
        assert!(effects("select 1; reset all").params_changed);
        assert!(effects("select set_config('a.b', '1', false)").params_changed);
        assert!(!effects("SET LOCAL statement_timeout = 5").params_changed);
        assert!(!effects("set transaction isolation level serializable").params_changed);
        assert!(!effects("update t set a = 1").params_changed);
        assert!(!effects("select 'set x = 1; reset'").params_changed);
    }

    #[test]
    fn custom_parameters_are_named() {
        assert_eq!(
            effects("SET app.tenant = 'a'").custom_params,
            ["app.tenant"]
        );
        assert_eq!(effects("set session my.x to 1").custom_params, ["my.x"]);
        assert_eq!(effects("reset app.tenant").custom_params, ["app.tenant"]);
        assert_eq!(
            effects("select set_config('App.User', 'x', false)").custom_params,
            ["app.user"]
        );
        assert!(effects("set search_path = a").custom_params.is_empty());
    }

    #[test]
    fn session_features_are_named() {
        assert_eq!(effects("LISTEN chan").session_feature, Some("LISTEN"));
        assert!(
            effects("select pg_advisory_lock(1)")
                .session_feature
                .is_some()
        );
        assert!(
            effects("select pg_advisory_xact_lock(1)")
                .session_feature
                .is_none()
        );
        assert!(
            effects("create temp table t(a int)")
                .session_feature
                .is_some()
        );
        assert!(
            effects("CREATE GLOBAL TEMPORARY TABLE t(a int)")
                .session_feature
                .is_some()
        );
        assert!(
            effects("create table temp(a int)")
                .session_feature
                .is_none()
        );
        assert!(
            effects("declare c cursor with hold for select 1")
                .session_feature
                .is_some()
        );
        assert!(
            effects("declare c cursor for select 1")
                .session_feature
                .is_none()
        );
        assert!(
            effects("do $$ begin perform 1; end $$; listen x")
                .session_feature
                .is_some()
        );
    }

    #[test]
    fn sql_prepare_and_execute_are_parsed() {
        assert_eq!(
            effects("PREPARE Foo (int, numeric(10,2)) AS select $1, $2").prepared,
            Some(PreparedSql::Prepare {
                name: "foo".into(),
                rest: " (int, numeric(10,2)) AS select $1, $2".into()
            })
        );
        assert_eq!(
            effects("execute \"Foo\"(1, 'a')").prepared,
            Some(PreparedSql::Execute {
                name: "Foo".into(),
                rest: "(1, 'a')".into()
            })
        );
        assert!(effects("prepare x as\nselect 1").prepared.is_some());
        assert_eq!(effects("prepare x select 1").prepared, None);
        assert!(
            effects("prepare x as select 1; select 2")
                .session_feature
                .is_some()
        );
        assert_eq!(effects("prepare x as select 1").session_feature, None);
    }

    #[test]
    fn statement_dropping_is_recognised() {
        assert!(effects("DISCARD ALL").drops_all_statements);
        assert!(effects("deallocate all").drops_all_statements);
        assert!(effects("DEALLOCATE PREPARE ALL").drops_all_statements);
        assert_eq!(effects("deallocate s1").deallocate.as_deref(), Some("s1"));
        assert_eq!(
            effects("DEALLOCATE PREPARE \"S1\"").deallocate.as_deref(),
            Some("S1")
        );
        assert_eq!(effects("deallocate s1; select 1").deallocate, None);
    }

    /// Names read as PostgreSQL's scanner reads them (fuzzing found
    /// `EXECUTE ""` taken as a statement named ""; PostgreSQL refuses a
    /// zero-length quoted name, and the other spellings below went to the
    /// server unmapped, or under another name).
    #[test]
    fn statement_names_are_read_like_postgres() {
        let name = |sql: &str| match effects(sql).prepared {
            Some(PreparedSql::Prepare { name, .. } | PreparedSql::Execute { name, .. }) => {
                Some(name)
            }
            None => None,
        };
        assert_eq!(name("EXECUTE \"\""), None);
        assert_eq!(name("PREPARE \"\" AS select 1"), None);
        assert_eq!(name("PREPARE 1x AS select 1"), None);
        assert_eq!(name("prepare_x AS select 1"), None);
        assert_eq!(
            effects("PREPARE \"a\"\"b\" AS select 1").prepared,
            Some(PreparedSql::Prepare {
                name: "a\"b".into(),
                rest: " AS select 1".into()
            })
        );
        assert_eq!(name("PREPARE Été AS select 1").as_deref(), Some("Été"));
        assert_eq!(name("EXECUTE Été(1)").as_deref(), Some("Été"));
        assert_eq!(name("EXECUTE\"S1\"").as_deref(), Some("S1"));
        assert_eq!(name("PREPARE x AS--c\nselect 1").as_deref(), Some("x"));
        assert_eq!(name("PREPARE x AS/*c*/select 1").as_deref(), Some("x"));
        assert_eq!(name("PREPARE x ASselect 1"), None);
        let long = "a".repeat(70);
        assert_eq!(
            name(&format!("EXECUTE {long}")).as_deref(),
            Some(&long[..63])
        );
        let dealloc = |sql: &str| effects(sql).deallocate;
        assert_eq!(dealloc("DEALLOCATE Été").as_deref(), Some("Été"));
        assert_eq!(dealloc("DEALLOCATE \"a b\"").as_deref(), Some("a b"));
        assert_eq!(dealloc("deallocate prepare").as_deref(), Some("prepare"));
        assert_eq!(
            dealloc("deallocate prepare_x").as_deref(),
            Some("prepare_x")
        );
        assert_eq!(dealloc("DEALLOCATE \"all\"").as_deref(), Some("all"));
        assert!(!effects("DEALLOCATE \"all\"").drops_all_statements);
        assert_eq!(dealloc("DEALLOCATE \"\""), None);
    }

    /// Statements PostgreSQL's parser reads but the first reading missed
    /// (found by the sql_effects fuzzer's pg_query oracle): a quoted name
    /// right after the keyword, vertical tab as space, nested comments,
    /// backslash-escaped quotes in `E''`, `$` inside identifiers.
    #[test]
    fn statements_are_found_where_postgres_finds_them() {
        let e = effects("SET\"a\".b = 1");
        assert!(e.params_changed);
        assert_eq!(e.custom_params, ["a.b"]);
        assert_eq!(effects("RESET\"a\".b").custom_params, ["a.b"]);
        assert_eq!(
            effects("SET app.\"Tenant\" = 1").custom_params,
            ["app.Tenant"]
        );
        assert_eq!(effects("LISTEN\"x\"").session_feature, Some("LISTEN"));
        assert!(effects("\x0bSET x = 1").params_changed);
        assert!(effects("/* /* */ */ SET x = 1").params_changed);
        assert!(effects("select E'\\';'; SET x = 1").params_changed);
        assert!(effects("select e'\\'' ; reset all").params_changed);
        assert!(effects("select x$a$; set y = 1; select $a$").params_changed);
        assert!(!effects("select $a$; set y = 1; $a$").params_changed);
        assert!(!effects("select 'it''s; set y = 1'").params_changed);
        assert!(
            effects("PREPARE\x0bx AS select 1").prepared.is_some(),
            "vertical tab after PREPARE"
        );
        // A carriage return ends a -- comment.
        assert!(effects("EXECUTE --c\rx").prepared.is_some());
        assert!(effects("select 1; --c\rset x = 1").params_changed);
    }
}

#[cfg(test)]
mod proptests {
    use proptest::prelude::*;

    use super::*;

    /// Text made of what `effects` looks at: keywords, quotes, comment and
    /// dollar-quote marks, `;`, brackets, and multi-byte characters.
    fn sqlish() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            prop::sample::select(vec![
                "set ",
                "reset ",
                "discard ",
                "all",
                "deallocate ",
                "prepare ",
                "execute ",
                "listen ",
                "declare ",
                "with hold",
                "create ",
                "temp ",
                "load ",
                "select ",
                "as ",
                "set_config(",
                "pg_advisory_lock(",
                "app.x",
                "local ",
                "session ",
            ])
            .prop_map(str::to_owned),
            "[ ;'\"$/*\\-\n()._a-zA-Z0-9é€]{1,4}",
        ];
        prop::collection::vec(piece, 0..16).prop_map(|v| v.concat())
    }

    /// A plain SELECT: no session effect, no `;`, nothing after a `--`.
    fn plain_select() -> impl Strategy<Value = String> {
        let expr = prop_oneof![
            "[a-z][a-z0-9]{0,6}",
            "[0-9]{1,4}",
            "'[a-z ;]{0,8}'",
            "\"[A-Za-z ;]{1,6}\"",
        ];
        (
            prop::sample::select(vec!["select", "SELECT", "Select"]),
            prop::collection::vec(expr, 1..4),
            prop::option::of("[a-z]{1,6}"),
        )
            .prop_map(|(kw, exprs, from)| {
                let mut s = format!("{kw} {}", exprs.join(", "));
                if let Some(t) = from {
                    s.push_str(" from ");
                    s.push_str(&t);
                }
                s
            })
    }

    /// Whitespace and comments whose text names nothing `effects` looks for
    /// (no `_`, so no `set_config` or `pg_advisory_lock`).
    fn filler() -> impl Strategy<Value = String> {
        let one = prop_oneof![
            "[ \t\r\n]{1,3}",
            "[a-z ;']{0,10}".prop_map(|c| format!("/*{c}*/")),
            "[a-z ;']{0,10}".prop_map(|c| format!("--{c}\n")),
        ];
        prop::collection::vec(one, 0..3).prop_map(|v| v.concat())
    }

    proptest! {
        #[test]
        fn effects_never_panics(sql in any::<String>()) {
            let _ = effects(&sql);
        }

        #[test]
        fn effects_never_panics_on_sql_like_text(sql in sqlish()) {
            let e = effects(&sql);
            if let Some(name) = &e.deallocate {
                prop_assert!(!name.is_empty());
            }
        }

        /// A plain SELECT stays plain with whitespace and comments around it
        /// and a trailing `;` (slow path or fast path alike).
        #[test]
        fn comments_and_spacing_keep_a_select_plain(
            sel in plain_select(),
            before in filler(),
            after in filler(),
            semi in any::<bool>(),
        ) {
            prop_assert!(effects(&sel).is_plain(), "{:?} is not plain", sel);
            let wrapped = format!("{before}{sel} {after}{}", if semi { ";" } else { "" });
            prop_assert!(effects(&wrapped).is_plain(), "{:?} is not plain", wrapped);
        }

        /// `SET` of a dotted name is seen, and named, with comments and
        /// spacing around it.
        #[test]
        fn a_custom_set_is_seen_through_comments(
            name in "[a-z]{1,5}\\.[a-z]{1,5}",
            before in filler(),
            after in filler(),
        ) {
            let e = effects(&format!("{before}SET {name} = 'v' {after}"));
            prop_assert!(e.params_changed);
            prop_assert_eq!(e.custom_params, vec![name]);
        }
    }
}
