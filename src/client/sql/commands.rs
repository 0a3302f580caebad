//! The commands whose words tidepool reads: PREPARE, EXECUTE (also nested
//! in EXPLAIN or CREATE TABLE AS), DEALLOCATE, SET and set_config names.

use super::*;

/// `EXPLAIN [options] EXECUTE name …` or `CREATE … AS EXECUTE name …` (a
/// single statement): the name and where it stands in `stmt`.
pub(crate) fn nested_execute(stmt: &str) -> Option<NestedExecute> {
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

/// Literal custom (dotted) names in `set_config('app.x', ...)` calls.
pub(crate) fn set_config_names(sql: &str) -> Vec<String> {
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

/// The statement `DEALLOCATE [PREPARE] name` drops: `Some(None)` for ALL,
/// `None` when no name can be read (the server will answer with an error).
pub(crate) fn deallocate_name(stmt: &str) -> Option<Option<String>> {
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
/// Where `EXECUTE name …` (`stmt` starts with EXECUTE) names its statement.
pub(crate) fn execute_name(stmt: &str) -> Option<NestedExecute> {
    let (keyword, kw_end) = keyword_at(stmt, 0);
    if keyword != "execute" {
        return None;
    }
    let start = skip_space(stmt, kw_end);
    let (name, end) = identifier(stmt, start)?;
    Some(NestedExecute { name, start, end })
}

pub(crate) fn prepared_sql(stmt: &str) -> Option<PreparedSql> {
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

/// A setting's name at `i` (after spaces and comments), as PostgreSQL reads
/// it: identifiers joined by `.` (`app."Tenant"` is `app.Tenant`).
pub(crate) fn setting_name(stmt: &str, i: usize) -> Option<String> {
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

/// What `sql` calls that touches the session.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Calls {
    pub set_config: bool,
    /// A session-level advisory lock function.
    pub advisory_lock: bool,
    /// `pg_advisory_unlock[_shared|_all]`: a session lock may be gone.
    pub advisory_unlock: bool,
}

/// What `sql` calls of [`Calls`]: one pass over the text's underscores
/// (every name has one).
pub(crate) fn session_functions(sql: &str) -> Calls {
    let h = sql.as_bytes();
    let at = |i: usize, back: usize, name: &[u8]| {
        i >= back
            && h.get(i - back..i - back + name.len())
                .is_some_and(|w| w.eq_ignore_ascii_case(name))
    };
    let mut c = Calls::default();
    for i in memchr::memchr_iter(b'_', h) {
        c.set_config |= at(i, 3, b"set_config");
        c.advisory_lock |= at(i, 2, b"pg_advisory_lock") || at(i, 2, b"pg_try_advisory_lock");
        c.advisory_unlock |= at(i, 2, b"pg_advisory_unlock");
    }
    c
}
