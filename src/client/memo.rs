//! The statements one client sent lately, kept as templates (text with its
//! literals' places) with what tidepool worked out about them: their shape
//! for per-query statistics and whether they touch session state.
//!
//! Clients repeat a few statements with other literals (pgbench, ORMs that
//! inline values, drivers that parse the same text for every execution). A
//! text that matches a template is known without lexing it again: one byte
//! comparison instead of two scans (shape, then effects).
//!
//! Invariant: an entry says "no effects" only when the template's own text
//! has none ([`super::sql::effects`] is the default) — and effects come from
//! keywords and function names, which a match keeps byte for byte; literals
//! never call anything.

use std::sync::Arc;

use crate::stats::Shape;
use crate::stats::fingerprint::Template;

/// Templates kept per client (the oldest is replaced).
const ENTRIES: usize = 8;

#[derive(Debug)]
pub struct Entry {
    template: Template,
    /// The shape, when per-query statistics were on at the time.
    pub shape: Option<Arc<Shape>>,
    /// The statement changes no session state and needs no special handling.
    pub plain: bool,
}

#[derive(Debug, Default)]
pub struct Memo {
    entries: Vec<Entry>,
    /// Next slot to replace once full.
    next: usize,
}

impl Memo {
    /// The entry whose template `sql` matches; with `need_shape`, only one
    /// that has a shape.
    pub fn find(&self, sql: &str, need_shape: bool) -> Option<&Entry> {
        self.entries
            .iter()
            .find(|e| (!need_shape || e.shape.is_some()) && e.template.matches(sql.as_bytes()))
    }

    pub fn remember(&mut self, template: Template, shape: Option<Arc<Shape>>, plain: bool) {
        let entry = Entry {
            template,
            shape,
            plain,
        };
        if self.entries.len() < ENTRIES {
            self.entries.push(entry);
        } else {
            self.entries[self.next] = entry;
            self.next = (self.next + 1) % ENTRIES;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::fingerprint::hash_and_template;

    fn template(sql: &str) -> Template {
        hash_and_template(sql).1.expect("templated")
    }

    #[test]
    fn finds_a_statement_like_one_remembered() {
        let mut m = Memo::default();
        m.remember(template("select 1"), None, true);
        let shape = Arc::new(Shape {
            id: 7,
            text: "select * from t where id = $1".into(),
        });
        m.remember(
            template("select * from t where id = 5"),
            Some(shape.clone()),
            true,
        );
        let hit = m.find("select * from t where id = 42", true).expect("hit");
        assert_eq!(hit.shape.as_deref(), Some(&*shape));
        assert!(m.find("select 2", false).is_some_and(|e| e.plain));
        // Remembered without a shape: no hit when one is needed.
        assert!(m.find("select 2", true).is_none());
        assert!(m.find("select * from u where id = 42", false).is_none());
    }

    #[test]
    fn keeps_the_latest_few() {
        let mut m = Memo::default();
        for i in 0..ENTRIES + 3 {
            m.remember(
                template(&format!("select c{i} from t where a = 1")),
                None,
                i.is_multiple_of(2),
            );
        }
        assert_eq!(m.entries.len(), ENTRIES);
        assert!(m.find("select c0 from t where a = 9", false).is_none());
        let newest = ENTRIES + 2;
        let hit = m.find(&format!("select c{newest} from t where a = 9"), false);
        assert_eq!(hit.map(|e| e.plain), Some(newest.is_multiple_of(2)));
    }
}
