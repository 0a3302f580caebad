//! `pg_prepared_statements` as a client would see it directly: its own
//! prepared statements, under its own names, and nothing of other clients'.
//!
//! Server statements are shared by content under tidepool's names, so a
//! query that reads the view has each reference to it replaced by a
//! subquery over the server's view, joined to the client's names. Every row
//! keeps the view's own row type (whatever the server's version adds), with
//! `name`, `statement` and `from_sql` the client's.
//!
//! Invariant: only references that name the relation are replaced (bare or
//! `pg_catalog.`-qualified, outside strings, comments and quoted text, not a
//! column qualifier); the rest of the text is kept byte for byte.

use super::sql::{dollar_quote_end as dollar_end, is_ident_byte as ident_byte, skip_space};
use crate::stats::fingerprint::{block_comment_end, line_comment_end, string_end};

const VIEW: &str = "pg_prepared_statements";

/// One of the client's statements as the view shows it.
pub struct Listed<'a> {
    pub name: &'a str,
    /// What the client sent to prepare it (the query text, or the whole
    /// `PREPARE` command).
    pub statement: &'a str,
    /// tidepool's name for it on the server.
    pub server_name: &'a str,
    pub from_sql: bool,
}

/// Where `sql` names the view: byte ranges to replace, and whether an alias
/// follows (else the subquery takes the view's name as its alias).
#[derive(Debug, PartialEq, Eq)]
pub struct Reference {
    pub start: usize,
    pub end: usize,
    pub aliased: bool,
}

/// Words that may follow a relation in FROM and are not an alias.
const NOT_ALIASES: &[&str] = &[
    "where",
    "join",
    "inner",
    "left",
    "right",
    "full",
    "cross",
    "natural",
    "on",
    "using",
    "group",
    "order",
    "having",
    "window",
    "limit",
    "offset",
    "fetch",
    "for",
    "union",
    "except",
    "intersect",
    "returning",
    "tablesample",
];

/// The references to the view in `sql`.
pub fn references(sql: &str) -> Vec<Reference> {
    let b = sql.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        i = match b[i] {
            b'\'' => {
                let escapes =
                    i > 0 && matches!(b[i - 1], b'e' | b'E') && (i < 2 || !ident_byte(b[i - 2]));
                string_end(b, i + 1, escapes)
            }
            b'-' if b.get(i + 1) == Some(&b'-') => line_comment_end(b, i),
            b'/' if b.get(i + 1) == Some(&b'*') => block_comment_end(b, i),
            b'$' if i == 0 || !ident_byte(b[i - 1]) => dollar_end(sql, i).unwrap_or(i + 1),
            b'"' => {
                let end = b[i + 1..]
                    .iter()
                    .position(|&c| c == b'"')
                    .map_or(b.len(), |p| i + p + 2);
                if &sql[i..end] == "\"pg_prepared_statements\"" {
                    out.extend(reference(sql, i, end));
                }
                end
            }
            c if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 => {
                let end = i + b[i..].iter().take_while(|c| ident_byte(**c)).count();
                if sql[i..end].eq_ignore_ascii_case(VIEW) {
                    out.extend(reference(sql, i, end));
                }
                end
            }
            _ => i + 1,
        };
    }
    out
}

/// The name at `start..end` as a relation reference, if it is one.
fn reference(sql: &str, start: usize, end: usize) -> Option<Reference> {
    let b = sql.as_bytes();
    // Followed by `.`: a column qualifier (`pg_prepared_statements.name`).
    let next = skip_space(sql, end);
    if b.get(next) == Some(&b'.') {
        return None;
    }
    // Qualified: only by pg_catalog.
    let mut from = start;
    if start > 0 && b[start - 1] == b'.' {
        let q_end = start - 1;
        let q_start = b[..q_end]
            .iter()
            .rposition(|c| !ident_byte(*c) && *c != b'"')
            .map_or(0, |p| p + 1);
        let qualifier = sql[q_start..q_end].trim_matches('"');
        if !qualifier.eq_ignore_ascii_case("pg_catalog") {
            return None;
        }
        from = q_start;
    }
    let word_end = next + b[next..].iter().take_while(|c| ident_byte(**c)).count();
    let word = &sql[next..word_end];
    let aliased = b.get(next) == Some(&b'"')
        || (!word.is_empty()
            && !word.as_bytes()[0].is_ascii_digit()
            && !NOT_ALIASES.iter().any(|k| word.eq_ignore_ascii_case(k)));
    Some(Reference {
        start: from,
        end,
        aliased,
    })
}

/// `sql` with every reference replaced by the client's own view.
pub fn rewrite(sql: &str, refs: &[Reference], statements: &[Listed<'_>]) -> String {
    let view = subquery(statements);
    let mut out = String::with_capacity(sql.len() + refs.len() * view.len());
    let mut at = 0;
    for r in refs {
        out.push_str(&sql[at..r.start]);
        out.push_str(&view);
        if !r.aliased {
            out.push_str(" AS pg_prepared_statements");
        }
        at = r.end;
    }
    out.push_str(&sql[at..]);
    out
}

/// The client's view: the server's rows of its statements, renamed.
fn subquery(statements: &[Listed<'_>]) -> String {
    if statements.is_empty() {
        return "(SELECT s.* FROM pg_catalog.pg_prepared_statements s WHERE false)".into();
    }
    let rows: Vec<String> = statements
        .iter()
        .map(|s| {
            format!(
                "({}, {}, {}, {})",
                literal(s.name),
                literal(s.statement),
                literal(s.server_name),
                s.from_sql
            )
        })
        .collect();
    format!(
        "(SELECT (pg_catalog.jsonb_populate_record(s, pg_catalog.jsonb_build_object('name', c.name, 'statement', c.statement, 'from_sql', c.from_sql))).* \
         FROM (VALUES {}) AS c(name, statement, server_name, from_sql) \
         JOIN pg_catalog.pg_prepared_statements s ON s.name = c.server_name)",
        rows.join(", ")
    )
}

/// A string literal that reads the same whatever
/// `standard_conforming_strings` says.
fn literal(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 4);
    out.push_str("E'");
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("''"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spans(sql: &str) -> Vec<(&str, bool)> {
        references(sql)
            .into_iter()
            .map(|r| (&sql[r.start..r.end], r.aliased))
            .collect()
    }

    #[test]
    fn finds_the_relation_and_nothing_else() {
        assert_eq!(
            spans("select * from pg_prepared_statements"),
            [("pg_prepared_statements", false)]
        );
        assert_eq!(
            spans("SELECT name FROM pg_catalog.PG_PREPARED_STATEMENTS p WHERE true"),
            [("pg_catalog.PG_PREPARED_STATEMENTS", true)]
        );
        assert_eq!(
            spans("select count(*) from pg_prepared_statements where name = 'x'"),
            [("pg_prepared_statements", false)]
        );
        assert_eq!(
            spans("select * from \"pg_prepared_statements\" as x"),
            [("\"pg_prepared_statements\"", true)]
        );
        assert!(spans("select 'pg_prepared_statements'").is_empty());
        assert!(spans("select 1 -- pg_prepared_statements").is_empty());
        assert!(spans("select $$pg_prepared_statements$$").is_empty());
        assert!(spans("select * from myschema.pg_prepared_statements").is_empty());
        assert_eq!(
            spans("select pg_prepared_statements.name from pg_prepared_statements"),
            [("pg_prepared_statements", false)]
        );
        assert!(spans("select * from pg_prepared_statements_x").is_empty());
    }

    #[test]
    fn rewrites_only_the_references() {
        let sql = "select name from pg_prepared_statements order by 1";
        let refs = references(sql);
        let out = rewrite(
            sql,
            &refs,
            &[Listed {
                name: "q'1",
                statement: "select \\ 1",
                server_name: "tidepool_00000000000000ab",
                from_sql: false,
            }],
        );
        assert!(out.starts_with("select name from (SELECT "), "{out}");
        assert!(
            out.ends_with(" AS pg_prepared_statements order by 1"),
            "{out}"
        );
        assert!(out.contains("(E'q''1', E'select \\\\ 1', E'tidepool_00000000000000ab', false)"));
        let empty = rewrite(sql, &refs, &[]);
        assert!(
            empty.contains("WHERE false) AS pg_prepared_statements"),
            "{empty}"
        );
    }

    proptest::proptest! {
        /// Any text: no panic; every reference names the view; the text
        /// outside the references is kept byte for byte.
        #[test]
        fn any_text_is_scanned_safely(
            parts in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::strategy::Just("pg_prepared_statements".to_owned()),
                    proptest::strategy::Just("pg_catalog.".to_owned()),
                    proptest::strategy::Just("\"pg_prepared_statements\"".to_owned()),
                    proptest::strategy::Just(" AS p ".to_owned()),
                    proptest::strategy::Just(".name".to_owned()),
                    "[ -~éß€\n'\"$;/*-]{0,12}",
                ],
                0..12,
            )
        ) {
            let sql: String = parts.concat();
            let refs = references(&sql);
            let mut last = 0;
            for r in &refs {
                proptest::prop_assert!(r.start >= last && r.end > r.start && r.end <= sql.len());
                let name = sql[r.start..r.end].trim_matches('"').to_ascii_lowercase();
                proptest::prop_assert!(name.ends_with(VIEW), "{name}");
                last = r.end;
            }
            let out = rewrite(&sql, &refs, &[]);
            if refs.is_empty() {
                proptest::prop_assert_eq!(out, sql);
            } else {
                proptest::prop_assert!(out.starts_with(&sql[..refs[0].start]));
                proptest::prop_assert!(out.ends_with(&sql[refs[refs.len() - 1].end..]));
            }
        }
    }
}
