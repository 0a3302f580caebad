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
//! never call anything. For the same reason a statement's routing class
//! (read or write) is the same for every text that matches: the entry keeps
//! the class of the first one classified, so a client that sends one kind of
//! statement with new literals each time is parsed once, not every time.

use std::sync::Arc;

use crate::router::{Class, Classifier, Functions, Verdict};
use crate::stats::Shape;
use crate::stats::fingerprint::{Template, hash_and_template};

/// Templates kept per client (the oldest is replaced).
const ENTRIES: usize = 8;

#[derive(Debug)]
pub struct Entry {
    template: Template,
    /// The shape, when per-query statistics were on at the time.
    pub shape: Option<Arc<Shape>>,
    /// The statement changes no session state and needs no special handling.
    pub plain: bool,
    /// Its routing verdict, once asked for.
    class: Option<Verdict>,
}

#[derive(Debug, Default)]
pub struct Memo {
    entries: Vec<Entry>,
    /// Next slot to replace once full.
    next: usize,
    /// What the client's unnamed statement drops when run: it lives until
    /// the client parses another, across transactions, as on a server.
    pub unnamed_drops: UnnamedDrops,
}

/// What running the unnamed statement drops of the client's prepared
/// statements.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub enum UnnamedDrops {
    #[default]
    Nothing,
    /// DEALLOCATE ALL, DISCARD ALL: every statement, on the server too.
    All,
    /// `DEALLOCATE name`: the client's statement of that name, which only
    /// tidepool knows by it (see `client::prepared`'s unnamed Bind).
    One(String),
}

impl Memo {
    /// The entry whose template `sql` matches.
    pub fn find(&mut self, sql: &str) -> Option<&mut Entry> {
        // Templates are of the text without its edge comments (see
        // `stats::trace`): a per-query trace comment still finds its entry.
        self.find_key(crate::stats::trace::without_edge_comments(sql))
    }

    /// [`Memo::find`] for a text already without its edge comments.
    pub fn find_key(&mut self, key: &str) -> Option<&mut Entry> {
        self.entries
            .iter_mut()
            .find(|e| e.template.matches(key.as_bytes()))
    }

    /// The routing class of `sql`: from the entry it matches (classified
    /// once per entry), else from the classifier (and remembered).
    /// `functions` are the database's function volatilities (None: not
    /// known, and a read that calls a function needs the primary).
    pub fn class(
        &mut self,
        sql: &str,
        classifier: &Classifier,
        functions: Option<&Functions>,
    ) -> Class {
        if let Some(e) = self.find(sql) {
            return e
                .class
                .get_or_insert_with(|| classifier.classify(sql))
                .resolve(functions);
        }
        let verdict = classifier.classify(sql);
        let class = verdict.resolve(functions);
        let sql = crate::stats::trace::without_edge_comments(sql);
        if let Some(template) = hash_and_template(sql).1 {
            let plain = super::sql::effects(sql).is_plain();
            self.remember(template, None, plain).class = Some(verdict);
        }
        class
    }

    pub fn remember(
        &mut self,
        template: Template,
        shape: Option<Arc<Shape>>,
        plain: bool,
    ) -> &mut Entry {
        let entry = Entry {
            template,
            shape,
            plain,
            class: None,
        };
        let i = if self.entries.len() < ENTRIES {
            self.entries.push(entry);
            self.entries.len() - 1
        } else {
            let i = self.next;
            self.entries[i] = entry;
            self.next = (i + 1) % ENTRIES;
            i
        };
        &mut self.entries[i]
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
        let hit = m.find("select * from t where id = 42").expect("hit");
        assert_eq!(hit.shape.as_deref(), Some(&*shape));
        assert!(
            m.find("select 2")
                .is_some_and(|e| e.plain && e.shape.is_none())
        );
        assert!(m.find("select * from u where id = 42").is_none());
    }

    #[test]
    fn classifies_a_statement_once_whatever_its_literals() {
        let classifier = Classifier::new(crate::router::classify::Rules::default());
        let mut m = Memo::default();
        assert_eq!(
            m.class("select * from t where id = 1", &classifier, None),
            Class::Read
        );
        assert_eq!(
            m.class("insert into t values (1)", &classifier, None),
            Class::Write
        );
        assert_eq!(m.entries.len(), 2);
        for i in 2..50 {
            assert_eq!(
                m.class(
                    &format!("select * from t where id = {i}"),
                    &classifier,
                    None
                ),
                Class::Read
            );
            assert_eq!(
                m.class(&format!("insert into t values ({i})"), &classifier, None),
                Class::Write
            );
        }
        assert_eq!(m.entries.len(), 2, "matched, not added");
        // A comment at an edge (a hint, a sqlcommenter trace) is no part
        // of the key: the same entry (the router reads hints from the
        // full text, not from the memo).
        let hinted = "/* tidepool:primary */ select * from t where id = 3";
        assert_eq!(m.class(hinted, &classifier, None), Class::Read);
        let traced = "select * from t where id = 4 /*traceparent='00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01'*/";
        assert_eq!(m.class(traced, &classifier, None), Class::Read);
        assert_eq!(m.entries.len(), 2);
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
        assert!(m.find("select c0 from t where a = 9").is_none());
        let newest = ENTRIES + 2;
        let hit = m.find(&format!("select c{newest} from t where a = 9"));
        assert_eq!(hit.map(|e| e.plain), Some(newest.is_multiple_of(2)));
    }
}
