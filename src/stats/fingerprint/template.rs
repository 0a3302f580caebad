//! A statement's skeleton: its text with the place and kind of each literal,
//! so that another statement can be recognized as the same one with other
//! literals by comparing bytes instead of lexing it.
//!
//! Invariant: [`Template::matches`] is true only for a text that [`lex`]
//! would split into the same tokens as the template's own, but for the
//! literals' contents: so it has the same masked hash, and the same shape.
//! That holds because the text between literals is compared byte for byte
//! and each literal's end is found by the lexer's own rule for its kind.
//! Statements with dollar quotes or anything left open are never templated.
//!
//! [`lex`]: super::lexer::lex

use super::lexer::{Literal, Sink, literal_end};

/// Longest statement given a template.
pub const MAX_TEMPLATE_BYTES: usize = 2048;
/// Most literals in a templated statement.
const MAX_LITERALS: usize = 64;

/// See the module docs.
#[derive(Debug, Clone)]
pub struct Template {
    text: Box<[u8]>,
    /// Each literal's kind and `start..end` in `text`, in order.
    literals: Box<[(u32, u32, Literal)]>,
}

impl Template {
    /// True when `sql` is the template's statement with other literals (of
    /// the same kinds, in the same places).
    pub fn matches(&self, sql: &[u8]) -> bool {
        let t = &*self.text;
        let (mut ti, mut si) = (0usize, 0usize);
        for &(start, end, kind) in &*self.literals {
            let Some(verbatim) = t.get(ti..start as usize) else {
                return false;
            };
            if sql.get(si..si + verbatim.len()) != Some(verbatim) {
                return false;
            }
            si += verbatim.len();
            match literal_end(sql, si, kind) {
                Some(e) => si = e,
                None => return false,
            }
            ti = end as usize;
        }
        sql.get(si..) == t.get(ti..)
    }
}

/// Collects a template while the lexer runs for something else.
#[derive(Default)]
pub(super) struct TemplateSink {
    literals: Vec<(u32, u32, Literal)>,
    refused: bool,
}

impl TemplateSink {
    /// The template of `sql`, the text this sink was fed.
    pub(super) fn finish(self, sql: &str) -> Option<Template> {
        (!self.refused && sql.len() <= MAX_TEMPLATE_BYTES).then(|| Template {
            text: sql.as_bytes().into(),
            literals: self.literals.into_boxed_slice(),
        })
    }
}

impl Sink for TemplateSink {
    fn text(&mut self, _token: &str) {}
    fn literal(&mut self, kind: Literal, start: usize, end: usize) {
        if kind == Literal::Other || self.literals.len() >= MAX_LITERALS {
            self.refused = true;
            return;
        }
        match (u32::try_from(start), u32::try_from(end)) {
            (Ok(s), Ok(e)) => self.literals.push((s, e, kind)),
            _ => self.refused = true,
        }
    }
    fn param(&mut self, _token: &str, _n: u64) {}
    fn space(&mut self) {}
}
