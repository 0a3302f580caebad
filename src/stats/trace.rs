//! Trace context in SQL comments (sqlcommenter: `/*traceparent='00-…'*/`,
//! leading or trailing): the W3C trace and span ids, and the statement's
//! text without its leading and trailing comments, which is what every
//! cache keys on (the classification cache, the client's statement memo,
//! templates), so that a comment unique to each query costs nothing.
//!
//! Invariant: [`without_edge_comments`] only ever removes whole block
//! comments at the very start or end of the text (and the space around
//! them): what is left runs exactly as the full text would. Where the text
//! has a dollar quote, trailing comments are left alone rather than guessed.

use super::fingerprint::{block_comment_end, is_space, line_comment_end, string_end};

/// A W3C trace context: the trace and the span (parent id) of the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trace {
    pub trace_id: u128,
    pub span_id: u64,
    /// The trace flags; bit 0: the caller records (samples) this trace.
    pub flags: u8,
}

impl Trace {
    pub fn trace_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }

    pub fn span_hex(&self) -> String {
        format!("{:016x}", self.span_id)
    }

    /// Whether the caller samples this trace (the `sampled` flag).
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }
}

/// The `traceparent` of a sqlcommenter comment in `sql`, if it has one:
/// `traceparent='00-<32 hex>-<16 hex>-<2 hex>'` (the value may be
/// URL-encoded; its characters need no encoding). An all-zero id is none.
pub fn traceparent(sql: &str) -> Option<Trace> {
    let b = sql.as_bytes();
    // sqlcommenter puts its comment at an edge: a statement without a
    // block comment at either end costs two comparisons, no search.
    if plain_edges(b, true) {
        return None;
    }
    traceparent_searched(sql)
}

/// [`traceparent`] without its look at the edges.
fn traceparent_searched(sql: &str) -> Option<Trace> {
    let b = sql.as_bytes();
    let t = sql.trim_ascii();
    let t = t.strip_suffix(';').unwrap_or(t).trim_ascii_end();
    if !t.starts_with("/*") && !t.ends_with("*/") {
        return None;
    }
    static FINDER: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"traceparent"));
    let at = FINDER.find(b)?;
    let rest = &b[at + "traceparent".len()..];
    let rest = rest.strip_prefix(b"=")?;
    let rest = rest.strip_prefix(b"'").unwrap_or(rest);
    // 00-<trace>-<span>-<flags>
    let v = rest.get(..55)?;
    if v.get(..3) != Some(b"00-") || v[35] != b'-' || v[52] != b'-' {
        return None;
    }

    let trace_id = u128::from_str_radix(hex(&v[3..35])?, 16).ok()?;
    let span_id = u64::from_str_radix(hex(&v[36..52])?, 16).ok()?;
    let flags = u8::from_str_radix(hex(&v[53..55])?, 16).ok()?;
    (trace_id != 0 && span_id != 0).then_some(Trace {
        trace_id,
        span_id,
        flags,
    })
}

/// `s` as text when it is all hex digits.
fn hex(s: &[u8]) -> Option<&str> {
    std::str::from_utf8(s)
        .ok()
        .filter(|t| t.bytes().all(|c| c.is_ascii_hexdigit()))
}

/// `sql` without the block comments (and space) at its start and end. A
/// statement with no comment at either edge is returned as it is, after
/// one look at each end.
pub fn without_edge_comments(sql: &str) -> &str {
    let b = sql.as_bytes();
    if plain_edges(b, false) {
        return sql;
    }
    edge_comments_trimmed(sql)
}

/// [`without_edge_comments`] without its look at the edges.
fn edge_comments_trimmed(sql: &str) -> &str {
    let b = sql.as_bytes();
    let mut start = 0;
    loop {
        while start < b.len() && is_space(b[start]) {
            start += 1;
        }
        if b.get(start..start + 2) == Some(b"/*") {
            let end = block_comment_end(b, start);
            if end == b.len() && !b[start..].ends_with(b"*/") {
                // An open comment: the text is all comment (or malformed).
                return sql;
            }
            start = end;
        } else {
            break;
        }
    }
    let mut end = b.len();
    loop {
        while end > start && is_space(b[end - 1]) {
            end -= 1;
        }
        if end >= start + 4 && b[..end].ends_with(b"*/") {
            match trailing_comment_start(&b[start..end]) {
                Some(at) => end = start + at,
                None => break,
            }
        } else {
            break;
        }
    }
    sql.get(start..end).unwrap_or(sql)
}

/// True when `b` neither starts nor ends with a block comment or space: its
/// first byte is no space and no `/`, and neither is its last (the one
/// before a final `;` when `semicolon`). One look at each end: the common
/// statement needs no trimming.
fn plain_edges(b: &[u8], semicolon: bool) -> bool {
    let edge = |c: u8| !is_space(c) && c != b'/';
    let last = match b {
        [.., before, b';'] if semicolon => *before,
        [.., last] => *last,
        [] => return false,
    };
    b.first().is_some_and(|&c| edge(c)) && edge(last)
}

/// Where the block comment that ends `b` begins, if one does (scanning
/// strings, quoted names and comments as PostgreSQL's lexer does); None
/// where a dollar quote makes the text hard to read safely.
fn trailing_comment_start(b: &[u8]) -> Option<usize> {
    let mut i = 0;
    let mut last = None;
    while i < b.len() {
        match b[i] {
            b'\'' => {
                let escapes = i > 0 && matches!(b[i - 1], b'e' | b'E');
                i = string_end(b, i + 1, escapes);
            }
            b'"' => {
                i += 1;
                while i < b.len() {
                    if b[i] == b'"' {
                        if b.get(i + 1) == Some(&b'"') {
                            i += 2;
                            continue;
                        }
                        break;
                    }
                    i += 1;
                }
                i += 1;
            }
            // `$1` (a parameter) or a `$` inside a name (`a$b`) is text;
            // anything else may open a dollar quote.
            b'$' if b.get(i + 1).is_some_and(u8::is_ascii_digit)
                || (i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_')) =>
            {
                i += 1
            }
            b'$' => return None,
            b'-' if b.get(i + 1) == Some(&b'-') => i = line_comment_end(b, i),
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let end = block_comment_end(b, i);
                if end == b.len() {
                    last = Some(i);
                }
                i = end;
            }
            _ => i += 1,
        }
    }
    last.filter(|&at| at > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The look at the edges only ever answers as the whole work would.
        #[test]
        fn the_edge_fast_path_agrees_with_the_full_look(
            pieces in prop::collection::vec(prop::sample::select(vec![
                "/*", "*/", "/", "*", " ", "\t", "\n", "\x0b", "\x0c", ";", "'", "a", "1",
                "select 1", "traceparent='00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01'",
            ]), 0..12)
        ) {
            let sql = pieces.concat();
            prop_assert_eq!(without_edge_comments(&sql), edge_comments_trimmed(&sql), "{:?}", sql);
            prop_assert_eq!(traceparent(&sql), traceparent_searched(&sql), "{:?}", sql);
        }
    }

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn sqlcommenter_traceparent_is_read() {
        let sql = format!("select 1 /*application='app',traceparent='{TP}'*/");
        let t = traceparent(&sql).unwrap();
        assert_eq!(t.trace_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.span_hex(), "00f067aa0ba902b7");
        assert!(t.sampled());
        let unsampled = sql.replace("-01'", "-00'");
        assert!(!traceparent(&unsampled).unwrap().sampled());
        assert_eq!(traceparent("select 1"), None);
        assert_eq!(traceparent("select 'traceparent=x'"), None);
        let zero = format!(
            "select 1 /*traceparent='00-{}-00f067aa0ba902b7-01'*/",
            "0".repeat(32)
        );
        assert_eq!(traceparent(&zero), None);
        // Either edge, with a final `;` and space around: found; a text
        // whose edges are plain is not searched.
        for sql in [
            format!("select 1 /*traceparent='{TP}'*/;"),
            format!("select 1 /*traceparent='{TP}'*/ ; "),
            format!(" /*traceparent='{TP}'*/ select 1;"),
            format!("/*traceparent='{TP}'*/select 1"),
            format!("\tselect 1 /*traceparent='{TP}'*/"),
        ] {
            assert!(traceparent(&sql).is_some(), "{sql}");
        }
        for sql in ["select 1;", ";", "", "x", "select /*traceparent=x*/ 1;"] {
            assert_eq!(traceparent(sql), None, "{sql}");
        }
    }

    #[test]
    fn edge_comments_are_dropped_and_nothing_else() {
        let e = without_edge_comments;
        assert_eq!(e("select 1"), "select 1");
        assert_eq!(e(&format!("select 1 /*traceparent='{TP}'*/")), "select 1");
        assert_eq!(e(&format!("/*traceparent='{TP}'*/ select 1")), "select 1");
        assert_eq!(e("/* a */ /* b */select 1 /* c */ /* d */ "), "select 1");
        assert_eq!(e("select 1 /* nested /* x */ y */"), "select 1");
        // Inside a string or a quoted name, a comment is not one.
        assert_eq!(e("select '/*' || 'x */'"), "select '/*' || 'x */'");
        assert_eq!(e("select \"/*\" from t /* c */"), "select \"/*\" from t");
        assert_eq!(e("select E'\\' /* x */'"), "select E'\\' /* x */'");
        // Dollar quotes: trailing comments are left alone; parameters and
        // names with `$` are no dollar quotes.
        assert_eq!(e("select $$ /* $$ /* c */"), "select $$ /* $$ /* c */");
        assert_eq!(
            e("select $tag$ x $tag$ /* c */"),
            "select $tag$ x $tag$ /* c */"
        );
        assert_eq!(
            e("select a$b from t where id = $1 /* c */"),
            "select a$b from t where id = $1"
        );
        // A comment in the middle stays; a text that is all comment stays.
        assert_eq!(e("select /* m */ 1"), "select /* m */ 1");
        assert_eq!(e("/* only */"), "");
        assert_eq!(e("/* open"), "/* open");
        // A line comment before the trailing block one ends at its newline.
        assert_eq!(e("select 1 -- x */\n/* c */"), "select 1 -- x */");
        // Plain edges: the text as it is; space at an edge is trimmed.
        assert_eq!(e("select 1;"), "select 1;");
        assert_eq!(e("select 1 /* c */;"), "select 1 /* c */;");
        assert_eq!(e(" select 1"), "select 1");
        assert_eq!(e("select 1\n"), "select 1");
        assert_eq!(e(""), "");
        assert_eq!(e("/"), "/");
    }
}
