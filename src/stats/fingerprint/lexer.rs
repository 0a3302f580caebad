//! The literal-finding lexer behind [`mask`](super::mask) and
//! [`masked_hash`](super::masked_hash).
//!
//! It follows PostgreSQL's scanner (`scan.l`) only as far as needed to tell
//! literals, parameters, identifiers, comments and whitespace apart, with
//! `standard_conforming_strings = on`. It never allocates, never panics on any
//! input (every index is checked or bounded by the input length), and every
//! token boundary falls on an ASCII byte, so each token is a valid `&str` slice
//! of the input. Anything left open at the end of the input (string, dollar
//! quote, quoted identifier) is reported as one literal, so nothing after an
//! opening quote is ever passed on as text.

/// What kind of literal the lexer found: enough to find the end of another
/// literal of the same kind at the same place in another text
/// ([`literal_end`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Literal {
    /// A number: a digit, or `.` and a digit, up to [`number_end`].
    Number,
    /// `'…'`.
    Plain,
    /// `E'…'` (backslash escapes).
    Escaped,
    /// `B'…'`, `X'…'` or `N'…'`.
    Prefixed,
    /// `U&'…'`.
    Unicode,
    /// A dollar quote, or something left open at the end.
    Other,
}

/// Receives the tokens of one statement from [`lex`].
pub(super) trait Sink {
    /// A token kept verbatim: keyword, identifier, operator, quoted identifier.
    fn text(&mut self, token: &str);
    /// A literal, masked: its kind and where it is (`start..end` of the
    /// input, prefix and quotes included).
    fn literal(&mut self, kind: Literal, start: usize, end: usize);
    /// A `$n` parameter, kept verbatim; `n` is its number.
    fn param(&mut self, token: &str, n: u64);
    /// One separator standing for a run of whitespace and comments.
    fn space(&mut self);
    /// True once the sink wants no more tokens.
    fn done(&self) -> bool {
        false
    }
}

/// Two sinks fed at once (one lexer pass).
impl<A: Sink, B: Sink> Sink for (A, B) {
    fn text(&mut self, token: &str) {
        self.0.text(token);
        self.1.text(token);
    }
    fn literal(&mut self, kind: Literal, start: usize, end: usize) {
        self.0.literal(kind, start, end);
        self.1.literal(kind, start, end);
    }
    fn param(&mut self, token: &str, n: u64) {
        self.0.param(token, n);
        self.1.param(token, n);
    }
    fn space(&mut self) {
        self.0.space();
        self.1.space();
    }
    fn done(&self) -> bool {
        self.0.done() && self.1.done()
    }
}

/// PostgreSQL's whitespace (its scanner's `space`).
pub(crate) fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

/// First byte of an identifier or dollar-quote tag (any non-ASCII byte too,
/// so multi-byte characters stay whole).
fn is_ident_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b >= 0x80
}

/// Later bytes of a dollar-quote tag.
fn is_tag_char(b: u8) -> bool {
    is_ident_start(b) || b.is_ascii_digit()
}

/// Later bytes of an identifier (which, unlike a tag, may hold `$`).
fn is_ident_char(b: u8) -> bool {
    is_tag_char(b) || b == b'$'
}

/// Splits `sql` into tokens for `sink`. Every token boundary is at an ASCII
/// byte, so slices of `sql` are on char boundaries.
pub(super) fn lex(sql: &str, sink: &mut impl Sink) {
    let b = sql.as_bytes();
    let mut i = 0;
    let mut gap = false;
    let mut started = false;
    while i < b.len() && !sink.done() {
        let c = b[i];
        let next = b.get(i + 1).copied();
        if is_space(c) {
            gap = true;
            i += 1;
            continue;
        }
        if c == b'-' && next == Some(b'-') {
            i = line_comment_end(b, i);
            gap = true;
            continue;
        }
        if c == b'/' && next == Some(b'*') {
            i = block_comment_end(b, i);
            gap = true;
            continue;
        }
        if gap && started {
            sink.space();
        }
        gap = false;
        started = true;
        i = match c {
            b'\'' => {
                let end = string_end(b, i + 1, false);
                sink.literal(Literal::Plain, i, end);
                end
            }
            b'"' => quoted_ident(sql, i, sink),
            b'$' => dollar(sql, i, sink),
            b'0'..=b'9' => {
                let end = number_end(b, i);
                sink.literal(Literal::Number, i, end);
                end
            }
            b'.' if next.is_some_and(|n| n.is_ascii_digit()) => {
                let end = number_end(b, i);
                sink.literal(Literal::Number, i, end);
                end
            }
            c if is_ident_start(c) => word(sql, i, sink),
            _ => {
                sink.text(sql.get(i..i + 1).unwrap_or(""));
                i + 1
            }
        };
    }
}

/// End of a `--` comment: after its newline, `\n` or `\r` as in
/// PostgreSQL's scanner.
pub(crate) fn line_comment_end(b: &[u8], start: usize) -> usize {
    b[start..]
        .iter()
        .position(|&c| c == b'\n' || c == b'\r')
        .map_or(b.len(), |p| start + p + 1)
}

/// End of a `/* */` comment, which nests; an open one runs to the end.
pub(crate) fn block_comment_end(b: &[u8], start: usize) -> usize {
    let mut depth = 0usize;
    let mut j = start;
    while j + 1 < b.len() {
        match (b[j], b[j + 1]) {
            (b'/', b'*') => {
                depth += 1;
                j += 2;
            }
            (b'*', b'/') => {
                depth = depth.saturating_sub(1);
                j += 2;
                if depth == 0 {
                    return j;
                }
            }
            _ => j += 1,
        }
    }
    b.len()
}

/// End of a quoted string whose body starts at `from`: `''` is a quote, and a
/// backslash escapes the next byte when `backslash` is set (`E'…'`).
pub(crate) fn string_end(b: &[u8], from: usize, backslash: bool) -> usize {
    let mut j = from;
    while j < b.len() {
        match b[j] {
            b'\\' if backslash => j += 2,
            b'\'' if b.get(j + 1) == Some(&b'\'') => j += 2,
            b'\'' => return j + 1,
            _ => j += 1,
        }
    }
    b.len()
}

/// `"ident"` (with `""` inside) is kept; an unterminated one is masked.
fn quoted_ident(sql: &str, start: usize, sink: &mut impl Sink) -> usize {
    let b = sql.as_bytes();
    let mut j = start + 1;
    while j < b.len() {
        if b[j] == b'"' {
            if b.get(j + 1) == Some(&b'"') {
                j += 2;
                continue;
            }
            sink.text(sql.get(start..=j).unwrap_or(""));
            return j + 1;
        }
        j += 1;
    }
    sink.literal(Literal::Other, start, b.len());
    b.len()
}

/// `$n` parameter, `$tag$…$tag$` dollar quote, or a lone `$`.
fn dollar(sql: &str, start: usize, sink: &mut impl Sink) -> usize {
    let b = sql.as_bytes();
    let mut j = start + 1;
    if b.get(j).is_some_and(u8::is_ascii_digit) {
        while b.get(j).is_some_and(u8::is_ascii_digit) {
            j += 1;
        }
        let token = sql.get(start..j).unwrap_or("");
        let n = token
            .get(1..)
            .and_then(|d| d.parse().ok())
            .unwrap_or(u64::MAX);
        sink.param(token, n);
        return j;
    }
    if b.get(j).is_some_and(|&c| is_ident_start(c)) {
        j += 1;
        while b.get(j).is_some_and(|&c| is_tag_char(c)) {
            j += 1;
        }
    }
    if b.get(j) != Some(&b'$') {
        sink.text("$");
        return start + 1;
    }
    let body = j + 1;
    let end = match (sql.get(start..body), sql.get(body..)) {
        (Some(delimiter), Some(rest)) => rest
            .find(delimiter)
            .map_or(b.len(), |p| body + p + delimiter.len()),
        _ => b.len(),
    };
    sink.literal(Literal::Other, start, end);
    end
}

/// End of a numeric literal starting at `start` (a digit, or `.` then a digit).
/// Trailing letters and digits (`0x1F`, `123abc`) belong to it.
fn number_end(b: &[u8], start: usize) -> usize {
    // Runs counted over a slice iterator: no bounds check per byte.
    fn run(b: &[u8], j: usize, ok: impl Fn(u8) -> bool) -> usize {
        j + b
            .get(j..)
            .map_or(0, |r| r.iter().take_while(|&&c| ok(c)).count())
    }
    let digits = |j: usize| run(b, j, |c| c.is_ascii_digit() || c == b'_');
    let radix = b[start] == b'0'
        && matches!(
            b.get(start + 1),
            Some(b'x' | b'X' | b'o' | b'O' | b'b' | b'B')
        );
    let mut j = start;
    if radix {
        j += 2;
    } else {
        j = digits(j);
        if b.get(j) == Some(&b'.') && b.get(j + 1) != Some(&b'.') {
            j = digits(j + 1);
        }
        if matches!(b.get(j), Some(b'e' | b'E')) {
            let k = if matches!(b.get(j + 1), Some(b'+' | b'-')) {
                j + 2
            } else {
                j + 1
            };
            if b.get(k).is_some_and(u8::is_ascii_digit) {
                j = digits(k);
            }
        }
    }
    run(b, j, |c| c.is_ascii_alphanumeric() || c == b'_')
}

/// An identifier or keyword, or a prefixed string (`E'…'`, `U&'…'`, …).
fn word(sql: &str, start: usize, sink: &mut impl Sink) -> usize {
    let b = sql.as_bytes();
    let mut j = start + 1;
    while b.get(j).is_some_and(|&c| is_ident_char(c)) {
        j += 1;
    }
    let after = b.get(j).copied();
    if j == start + 1 && after == Some(b'\'') {
        match b[start] {
            b'e' | b'E' => {
                let end = string_end(b, j + 1, true);
                sink.literal(Literal::Escaped, start, end);
                return end;
            }
            b'b' | b'B' | b'x' | b'X' | b'n' | b'N' => {
                let end = string_end(b, j + 1, false);
                sink.literal(Literal::Prefixed, start, end);
                return end;
            }
            _ => {}
        }
    }
    if j == start + 1
        && matches!(b[start], b'u' | b'U')
        && after == Some(b'&')
        && b.get(j + 1) == Some(&b'\'')
    {
        let end = string_end(b, j + 2, false);
        sink.literal(Literal::Unicode, start, end);
        return end;
    }
    sink.text(sql.get(start..j).unwrap_or(""));
    j
}

/// End of a literal of `kind` starting at `start` of `b`, if one starts
/// there: the same end [`lex`] finds when it meets that literal at a token
/// boundary. `None` for [`Literal::Other`], which is never matched.
pub(super) fn literal_end(b: &[u8], start: usize, kind: Literal) -> Option<usize> {
    let at = |k: usize| b.get(start + k).copied();
    match kind {
        Literal::Number => {
            let first = at(0)?;
            (first.is_ascii_digit() || (first == b'.' && at(1).is_some_and(|n| n.is_ascii_digit())))
                .then(|| number_end(b, start))
        }
        Literal::Plain => (at(0) == Some(b'\'')).then(|| string_end(b, start + 1, false)),
        Literal::Escaped => (matches!(at(0), Some(b'e' | b'E')) && at(1) == Some(b'\''))
            .then(|| string_end(b, start + 2, true)),
        Literal::Prefixed => (matches!(at(0), Some(b'b' | b'B' | b'x' | b'X' | b'n' | b'N'))
            && at(1) == Some(b'\''))
        .then(|| string_end(b, start + 2, false)),
        Literal::Unicode => {
            (matches!(at(0), Some(b'u' | b'U')) && at(1) == Some(b'&') && at(2) == Some(b'\''))
                .then(|| string_end(b, start + 3, false))
        }
        Literal::Other => None,
    }
}
