//! Query shapes: statement text with every literal masked, and a cache of them.
//!
//! [`masked_hash`] and [`mask`] share one lexer that follows PostgreSQL's
//! scanner closely enough to find every literal: quoted strings (`'…'` with
//! `''`, `E'…'` with backslash escapes, `U&'…'`, `B'…'`, `X'…'`, `N'…'`),
//! dollar quotes (`$tag$…$tag$`), and numbers (`42`, `1.5`, `.5`, `1e-3`,
//! `0x1F`, `1_000`). Parameters (`$1`), identifiers (`t1`, `col_2`) and
//! double-quoted identifiers are kept verbatim; comments are dropped and runs of
//! whitespace collapse to one space. Strings follow
//! `standard_conforming_strings = on`, PostgreSQL's default. Anything left open
//! at the end (a string, a dollar quote, a quoted identifier) is masked up to
//! the end, so a malformed statement cannot leak what follows its opening
//! quote.
//!
//! [`Fingerprints`] maps a statement to its [`Shape`]. The shape's text never
//! holds a raw literal: PostgreSQL's own normalizer (`pg_query`) runs first and
//! [`mask`] always runs over its output, because the normalizer keeps comments
//! and leaves literals in many utility statements (`ALTER SYSTEM SET`,
//! `ALTER ROLE … SET`, `PREPARE … AS`, `COPY … FROM 'file'`, `FETCH n`,
//! `COMMENT ON`, DDL defaults and `CHECK`s, `OPTIONS (…)`, `UESCAPE`). The
//! cache never holds a lock while parsing.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex, PoisonError};

use lexer::{Literal, Sink, lex};
// PostgreSQL's rules for spaces, comments and strings, shared with the
// session-effects scanner (`client::sql`).
pub(crate) use lexer::{block_comment_end, is_space, line_comment_end, string_end};
pub use template::Template;
use template::{MAX_TEMPLATE_BYTES, TemplateSink};
// A fast hash: this runs over every statement's tokens. Shapes that collide
// (64 bits) would share statistics; nothing depends on it beyond that.
use rustc_hash::FxHasher;

mod lexer;
mod template;

/// Longest shape text kept, in bytes, including the trailing `…`.
pub const MAX_TEXT_BYTES: usize = 2048;
/// Statements longer than this skip `pg_query` and go straight to [`mask`].
pub const MAX_PG_QUERY_BYTES: usize = 64 * 1024;
/// Number of independently locked cache shards.
const SHARDS: usize = 16;
/// Marks where a literal was in the byte stream [`masked_hash`] hashes; not
/// valid UTF-8, so no text token can produce it.
const LITERAL_MARK: u8 = 0xFF;

/// A statement's shape: its fingerprint and its text with literals masked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shape {
    /// `pg_query`'s fingerprint, or [`masked_hash`] when the statement does not
    /// parse or is longer than [`MAX_PG_QUERY_BYTES`].
    pub id: u64,
    /// Normalized text: literals are `$n`, no comments, at most
    /// [`MAX_TEXT_BYTES`] bytes (cut on a char boundary and ended with `…`).
    pub text: Arc<str>,
}

/// Hash of `sql` with literals masked, comments skipped and whitespace runs
/// collapsed. One pass, no allocation. Statements that differ only in their
/// literals, comments or spacing hash the same; `$n` parameters count as
/// written, so `id = $1` and `id = 1` hash differently.
pub fn masked_hash(sql: &str) -> u64 {
    let mut sink = HashSink(FxHasher::default());
    lex(sql, &mut sink);
    sink.0.finish()
}

/// What statistics and logs show of `sql` when its literals cannot be told
/// apart: only its first word (`select …`). The lexer reads text as
/// PostgreSQL does with `standard_conforming_strings = on` in UTF-8 (or an
/// encoding whose multibyte characters have no ASCII bytes); under
/// `standard_conforming_strings = off`, or in a client encoding whose second
/// bytes may be ASCII (SJIS's `ソ` ends in a backslash byte), it would take
/// a literal's end for its middle and show what follows.
pub fn opaque(sql: &str) -> String {
    let word: String = crate::stats::trace::without_edge_comments(sql)
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_alphabetic() || *c == '_')
        .take(32)
        .collect::<String>()
        .to_ascii_lowercase();
    if word.is_empty() {
        "…".to_owned()
    } else {
        format!("{word} …")
    }
}

/// Whether the lexer cannot tell literals apart under these session
/// settings (see [`opaque`]).
pub fn literals_unreadable(params: &std::collections::BTreeMap<String, String>) -> bool {
    let is = |k: &str, v: &[&str]| {
        params
            .get(k)
            .is_some_and(|x| v.iter().any(|v| x.eq_ignore_ascii_case(v)))
    };
    is("standard_conforming_strings", &["off"])
        || is(
            "client_encoding",
            &[
                "SJIS",
                "SHIFT_JIS_2004",
                "BIG5",
                "GBK",
                "UHC",
                "GB18030",
                "JOHAB",
            ],
        )
}

/// [`masked_hash`] and the [`Template`] of `sql` (when it can have one).
pub fn hash_and_template(sql: &str) -> (u64, Option<Template>) {
    if sql.len() > MAX_TEMPLATE_BYTES {
        return (masked_hash(sql), None);
    }
    let mut sink = (HashSink(FxHasher::default()), TemplateSink::default());
    lex(sql, &mut sink);
    (sink.0.0.finish(), sink.1.finish(sql))
}

/// `sql` with each literal replaced by `$n`, comments removed and whitespace
/// collapsed. Existing `$n` parameters are kept, and literals are numbered in
/// order after the highest of them, so the result reads like PostgreSQL's
/// normalized text, and masking it again changes nothing (for statements
/// that lex as SQL; stray `$` signs may merge with a placeholder).
pub fn mask(sql: &str) -> String {
    mask_limited(sql, usize::MAX)
}

/// Like [`mask`], but stops once the text passes `limit` bytes.
fn mask_limited(sql: &str, limit: usize) -> String {
    let mut params = MaxParam(0);
    if sql.contains('$') {
        lex(sql, &mut params);
    }
    let mut sink = MaskSink {
        out: String::with_capacity(sql.len().min(limit.saturating_add(16))),
        next: params.0.saturating_add(1),
        limit,
    };
    lex(sql, &mut sink);
    sink.out
}

/// The text a [`Shape`] keeps: masked, then cut to [`MAX_TEXT_BYTES`].
fn shape_text(sql: &str) -> Arc<str> {
    let mut text = mask_limited(sql, MAX_TEXT_BYTES);
    if text.len() > MAX_TEXT_BYTES {
        let mut cut = MAX_TEXT_BYTES - '…'.len_utf8();
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push('…');
    }
    Arc::from(text)
}

/// Computes a shape from scratch (the cache's miss path).
fn compute_shape(sql: &str, masked: u64) -> Shape {
    if sql.len() <= MAX_PG_QUERY_BYTES
        && let Ok(normalized) = pg_query::normalize(sql)
        && let Ok(fingerprint) = pg_query::fingerprint(sql, 0, 0)
    {
        // The normalizer leaves some literals and all comments: mask its
        // output too (it keeps the normalizer's `$n` as they are).
        return Shape {
            id: fingerprint.value,
            text: shape_text(&normalized),
        };
    }
    Shape {
        id: masked,
        text: shape_text(sql),
    }
}

/// Hasher for keys that already are 64-bit hashes: passes them through.
#[derive(Default)]
pub(crate) struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn write_u64(&mut self, key: u64) {
        self.0 = key;
    }
}

/// A map keyed by a 64-bit hash.
pub(crate) type KeyMap<V> = HashMap<u64, V, BuildHasherDefault<KeyHasher>>;

/// A bounded cache from statement text (by [`masked_hash`]) to its [`Shape`].
///
/// Statements with the same masked hash share the shape computed for the
/// first of them seen, so its id stays the same while it is cached.
///
/// A hit costs one lexer pass, one short lock and an `Arc` clone. A shard that
/// is full is cleared before the next insert: it is only a cache.
pub struct Fingerprints {
    shards: [Mutex<KeyMap<Arc<Shape>>>; SHARDS],
    per_shard: usize,
}

impl Fingerprints {
    /// A cache of about `cap` shapes (at least one per shard).
    pub fn new(cap: usize) -> Self {
        Self {
            shards: std::array::from_fn(|_| Mutex::new(KeyMap::default())),
            per_shard: cap.max(1),
        }
    }

    /// The shape of `sql`; statements that differ only in literals, comments
    /// or spacing share one `Arc`.
    pub fn shape(&self, sql: &str) -> Arc<Shape> {
        self.lookup(sql, masked_hash(sql))
    }

    /// Like [`Fingerprints::shape`], and the statement's [`Template`] (none
    /// for statements with dollar quotes, or longer than 2 KiB), from one
    /// pass of the lexer.
    pub fn shape_and_template(&self, sql: &str) -> (Arc<Shape>, Option<Template>) {
        let (key, template) = hash_and_template(sql);
        (self.lookup(sql, key), template)
    }

    fn lookup(&self, sql: &str, key: u64) -> Arc<Shape> {
        // One cache per worker thread: a hot query never contends for a lock.
        let shard = &self.shards[super::thread_shard() % SHARDS];
        if let Some(hit) = shard
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
        {
            return Arc::clone(hit);
        }
        let shape = Arc::new(compute_shape(sql, key));
        let mut map = shard.lock().unwrap_or_else(PoisonError::into_inner);
        if map.len() >= self.per_shard && !map.contains_key(&key) {
            map.clear();
        }
        Arc::clone(map.entry(key).or_insert(shape))
    }

    /// Shapes cached now.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Feeds [`masked_hash`]: the masked text as bytes, a literal as one byte
/// that no text can contain.
struct HashSink(FxHasher);

impl Sink for HashSink {
    fn text(&mut self, token: &str) {
        self.0.write(token.as_bytes());
    }
    fn literal(&mut self, _kind: Literal, _start: usize, _end: usize) {
        self.0.write_u8(LITERAL_MARK);
    }
    fn param(&mut self, token: &str, _n: u64) {
        self.0.write(token.as_bytes());
    }
    fn space(&mut self) {
        self.0.write_u8(b' ');
    }
}

/// Finds the highest `$n` parameter.
struct MaxParam(u64);

impl Sink for MaxParam {
    fn text(&mut self, _token: &str) {}
    fn literal(&mut self, _kind: Literal, _start: usize, _end: usize) {}
    fn param(&mut self, _token: &str, n: u64) {
        self.0 = self.0.max(n);
    }
    fn space(&mut self) {}
}

/// Builds [`mask`]'s text, numbering literals from `next`.
struct MaskSink {
    out: String,
    /// Number of the next literal's placeholder.
    next: u64,
    limit: usize,
}

impl Sink for MaskSink {
    fn text(&mut self, token: &str) {
        self.out.push_str(token);
    }
    fn literal(&mut self, _kind: Literal, _start: usize, _end: usize) {
        // Writing to a String cannot fail.
        let _ = write!(self.out, "${}", self.next);
        self.next = self.next.saturating_add(1);
    }
    fn param(&mut self, token: &str, _n: u64) {
        self.out.push_str(token);
    }
    fn space(&mut self) {
        self.out.push(' ');
    }
    fn done(&self) -> bool {
        self.out.len() > self.limit
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod proptests {
    use proptest::prelude::*;

    use super::*;

    /// Two literals of one kind (the kinds `Template` tells apart).
    fn literal_pair() -> impl Strategy<Value = (String, String)> {
        fn two(
            s: impl Strategy<Value = String> + Clone,
        ) -> impl Strategy<Value = (String, String)> {
            (s.clone(), s)
        }
        prop_oneof![
            two(prop_oneof![
                "[0-9]{1,5}",
                "[0-9]{1,3}\\.[0-9]{0,3}",
                "\\.[0-9]{1,3}",
                "[0-9]{1,2}[eE][+-]?[0-9]{1,2}",
                "0[xX][0-9a-fA-F]{1,4}",
                "[1-9]_[0-9]{3}",
            ]),
            two("'([a-z ;\\\\\"$]|'')*'"),
            two("[eE]'([a-z ;\"]|\\\\[a-z'\\\\]|'')*'"),
            two("[bBxXnN]'[0-9a-f]*'"),
            two("[uU]&'[a-z ]*'"),
        ]
    }

    #[derive(Debug, Clone)]
    enum Token {
        Text(String),
        Literal(String, String),
    }

    fn token() -> impl Strategy<Value = Token> {
        prop_oneof![
            3 => prop_oneof![
                "[a-z][a-z0-9_]{0,5}",
                "\"[A-Za-z ']{1,5}\"",
                "\\$[1-9]",
                prop::sample::select(vec!["=", "<>", "+", ",", "(", ")", "::", "*", "||", ";"])
                    .prop_map(str::to_owned),
            ]
            .prop_map(Token::Text),
            2 => literal_pair().prop_map(|(a, b)| Token::Literal(a, b)),
        ]
    }

    /// What separates tokens: always starts with whitespace.
    fn separator() -> impl Strategy<Value = String> {
        prop::sample::select(vec![
            " ",
            "  ",
            "\n\t",
            " /* c */ ",
            " /* a /* b */ */\n",
            " -- c'\n",
        ])
        .prop_map(str::to_owned)
    }

    /// A statement from `tokens`, with the first or second literal of each
    /// pair, and `seps` between tokens.
    fn build(tokens: &[Token], seps: &[String], second: bool) -> String {
        let mut s = String::new();
        for (i, t) in tokens.iter().enumerate() {
            if i > 0 {
                s.push_str(&seps[i % seps.len()]);
            }
            s.push_str(match t {
                Token::Text(x) => x,
                Token::Literal(a, b) => {
                    if second {
                        b
                    } else {
                        a
                    }
                }
            });
        }
        s
    }

    /// Text that lexes in many ways: quotes, comments, numbers, prefixes.
    fn sqlish(dollars: bool) -> impl Strategy<Value = String> {
        let pieces: Vec<&'static str> = vec![
            "'", "''", "\\", "-", "--", "/*", "*/", "*", "e", "E", "U&", "u", "x", "B", "N", "1",
            "0x", ".", "5", "e5", "_", "ä", " ", "\n", "select", "t1", ";", "(", "=", "\"",
        ];
        let dollar_pieces = vec!["$", "$$", "$a$", "$1", "$9"];
        let all: Vec<&'static str> = if dollars {
            pieces.into_iter().chain(dollar_pieces).collect()
        } else {
            pieces
        };
        prop::collection::vec(prop::sample::select(all), 0..24).prop_map(|v| v.concat())
    }

    proptest! {
        /// Statements that differ only in their literals (of any kind, each
        /// literal kept in its kind here), comments and spacing have one
        /// masked hash and one masked text; with the same spacing the first
        /// one's template matches the other.
        #[test]
        fn literals_comments_and_spacing_do_not_change_the_fingerprint(
            tokens in prop::collection::vec(token(), 1..24),
            seps_a in prop::collection::vec(separator(), 1..4),
            seps_b in prop::collection::vec(separator(), 1..4),
        ) {
            let a = build(&tokens, &seps_a, false);
            let b = build(&tokens, &seps_b, true);
            let c = build(&tokens, &seps_a, true);
            prop_assert_eq!(masked_hash(&a), masked_hash(&b), "{:?} vs {:?}", a, b);
            prop_assert_eq!(mask(&a), mask(&b));
            let (hash, template) = hash_and_template(&a);
            prop_assert_eq!(hash, masked_hash(&a));
            let template = template.expect("a short statement without dollar quotes has a template");
            prop_assert!(template.matches(a.as_bytes()));
            prop_assert!(template.matches(c.as_bytes()), "{:?} vs {:?}", a, c);
            prop_assert_eq!(masked_hash(&c), hash);
        }

        /// Masking again changes nothing when the text has no `$` of its own
        /// (see `mask`: a stray `$` may merge with a placeholder).
        #[test]
        fn mask_is_idempotent_without_dollars(sql in sqlish(false)) {
            let once = mask(&sql);
            prop_assert_eq!(mask(&once), once.clone(), "{:?}", sql);
        }

        /// On any text: no panic, `hash_and_template` hashes like
        /// `masked_hash`, a template matches its own statement, and a
        /// statement it matches (here: with the literals changed) hashes the
        /// same.
        #[test]
        fn hash_and_template_agree(sql in prop_oneof![sqlish(true), any::<String>()]) {
            let _ = mask(&sql);
            let (hash, template) = hash_and_template(&sql);
            prop_assert_eq!(hash, masked_hash(&sql));
            if let Some(t) = template {
                prop_assert!(t.matches(sql.as_bytes()));
                let other = tests::other_literals(&sql);
                if t.matches(other.as_bytes()) {
                    prop_assert_eq!(masked_hash(&other), hash, "{:?} vs {:?}", sql, other);
                }
            }
        }
    }
}
