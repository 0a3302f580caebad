//! PostgreSQL's lexical rules as far as tidepool needs them: keywords,
//! identifiers (quoted or bare, cut to 63 bytes), spaces and comments,
//! dollar quotes, and statements split at `;` outside quotes.

use super::*;

/// The bare word after `from` (comments and spaces skipped), lowercased,
/// and where it ends; empty if none starts there.
pub(crate) fn keyword_at(stmt: &str, from: usize) -> (String, usize) {
    let i = skip_space(stmt, from);
    let end = i + stmt.as_bytes()[i..]
        .iter()
        .take_while(|c| is_ident_byte(**c))
        .count();
    (stmt[i..end].to_ascii_lowercase(), end)
}

pub(crate) fn first_keyword(stmt: &str) -> String {
    keyword_at(stmt, 0).0
}

pub(crate) fn skip_space(s: &str, mut i: usize) -> usize {
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
pub(crate) fn dollar_quote_end(s: &str, i: usize) -> Option<usize> {
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

/// PostgreSQL keeps the first 63 bytes of an identifier (NAMEDATALEN - 1).
pub(crate) const MAX_IDENTIFIER_BYTES: usize = 63;

/// A byte of a bare identifier after its first (multi-byte characters are
/// letters to PostgreSQL's scanner).
pub(crate) fn is_ident_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80
}

/// An SQL identifier at `i` and where it ends, read as PostgreSQL's scanner
/// does: quoted (case kept, `""` is a `"`, never empty) or bare (starting
/// with a letter, `_` or a multi-byte character; ASCII lowercased), cut to
/// 63 bytes on a character boundary.
pub(crate) fn identifier(s: &str, i: usize) -> Option<(String, usize)> {
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

/// Case-insensitive substring test for ASCII needles. The needles here all
/// hold a `_`, rare in SQL text, so only the text's underscores are tried as
/// anchors; a needle without one falls back to trying every position.
pub(crate) fn contains_ignore_case(hay: &str, needle: &str) -> bool {
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
pub(crate) fn split_statements(sql: &str) -> Vec<&str> {
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
pub(crate) fn leading_words(stmt: &str, n: usize) -> Vec<String> {
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
