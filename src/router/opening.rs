//! What a statement's first word tells before it is parsed or looked up:
//! a cheap test that lets the hot path skip classifying statements that
//! cannot be what it is looking for.
//!
//! Invariant: a `false` is certain (the classifier could not say otherwise);
//! a `true` only means "look closer".

/// Whether the statement whose text starts `head` (the bytes available, not
/// necessarily all of it) may be a `BEGIN` or `START TRANSACTION`. Leading
/// whitespace is skipped; a comment, a text that ends before its first word
/// does, or a first word of `begin`/`start` (any case) answers `true`.
pub fn may_begin(head: &[u8]) -> bool {
    // PostgreSQL's whitespace: space, \t, \n, \r, \f, \v; and `;` (empty
    // statements before the first one).
    let Some(start) = head
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0c | 0x0b | b';'))
    else {
        return true;
    };
    let rest = &head[start..];
    if rest.starts_with(b"--") || rest.starts_with(b"/*") || rest.len() < 2 {
        return true;
    }
    let word_len = rest
        .iter()
        .position(|b| !b.is_ascii_alphabetic())
        .unwrap_or(rest.len());
    // The whole first word must be there to rule it out.
    if word_len == rest.len() && word_len < b"start".len() {
        return true;
    }
    let word = &rest[..word_len];
    word.eq_ignore_ascii_case(b"begin") || word.eq_ignore_ascii_case(b"start")
}

/// Whether the first word of `sql` (after whitespace, empty statements and
/// comments, nested ones included) is `word`, in any case.
pub fn first_word_is(sql: &str, word: &str) -> bool {
    let mut rest = sql.as_bytes();
    loop {
        rest = match rest {
            [b' ' | b'\t' | b'\n' | b'\r' | 0x0c | 0x0b | b';', tail @ ..] => tail,
            [b'-', b'-', tail @ ..] => match tail.iter().position(|&b| b == b'\n') {
                Some(end) => &tail[end..],
                None => return false,
            },
            [b'/', b'*', ..] => {
                let mut depth = 0usize;
                let mut i = 0;
                loop {
                    match rest.get(i..i + 2) {
                        Some(b"/*") => (depth, i) = (depth + 1, i + 2),
                        Some(b"*/") => {
                            (depth, i) = (depth - 1, i + 2);
                            if depth == 0 {
                                break;
                            }
                        }
                        Some(_) => i += 1,
                        None => return false,
                    }
                }
                &rest[i..]
            }
            _ => break,
        };
    }
    let len = rest
        .iter()
        .position(|b| !b.is_ascii_alphabetic())
        .unwrap_or(rest.len());
    rest[..len].eq_ignore_ascii_case(word.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_word_is_found_past_whitespace_and_comments() {
        for sql in [
            "start transaction",
            " ;START",
            "/* a /* b */ c */ start",
            "-- x\nstart;",
        ] {
            assert!(first_word_is(sql, "start"), "{sql:?}");
        }
        for sql in [
            "begin",
            "started",
            "/* start */ begin",
            "-- start",
            "/* start",
            "",
        ] {
            assert!(!first_word_is(sql, "start"), "{sql:?}");
        }
    }
    use crate::router::Class;
    use crate::router::classify::{Rules, classify};

    #[test]
    fn transaction_starts_pass_and_other_statements_do_not() {
        for sql in [
            "begin",
            "BEGIN;",
            "  Begin isolation level serializable",
            "\n\tstart transaction",
            "START TRANSACTION READ WRITE",
            "/* app */ begin",
            "-- note\nbegin",
            "begin/*x*/",
            "",
            " ",
            "b",
            "beg",
            ";begin",
            " ; ;\nstart transaction",
        ] {
            assert!(may_begin(sql.as_bytes()), "{sql:?}");
        }
        for sql in [
            "SELECT abalance FROM pgbench_accounts WHERE aid = 1;",
            "select 1",
            "commit",
            "beginning",
            "started",
            "insert into t values (1)",
            "\"begin\"",
            "(select 1)",
            "set transaction read only",
        ] {
            assert!(!may_begin(sql.as_bytes()), "{sql:?}");
        }
    }

    proptest::proptest! {
        /// Never a false `false`: whatever the text (keywords, comments,
        /// whitespace and punctuation mixed at random, cut anywhere), when
        /// `may_begin` rules a statement out, the classifier does not call
        /// it a BEGIN either.
        #[test]
        fn a_ruled_out_statement_is_never_a_begin(
            parts in proptest::collection::vec(
                proptest::sample::select(vec![
                    "begin", "BEGIN", "start", "StArT", "transaction", "read", "only",
                    "write", "isolation", "level", "serializable", "select", "1", " ",
                    "\t", "\n", "\x0b", "\x0c", "--c\n", "/* c */", "/*", "*/", ";", ",",
                    "(", ")", "\"", "'", "work", "é", "b", "egin",
                ]),
                0..8,
            ),
            cut in 0usize..64,
        ) {
            let sql: String = parts.concat();
            let head = &sql.as_bytes()[..cut.min(sql.len())];
            if !may_begin(head) {
                let class = classify(&sql, &Rules::default()).class;
                proptest::prop_assert!(class != Class::Begin, "{sql:?} (head {head:?})");
            }
        }
    }
}
