//! Functions that may change a session's settings when called (a body that
//! runs `SET`, `set_config`, dynamic SQL, or a language tidepool cannot read),
//! as the database's `pg_proc` says: a transaction that calls one has its
//! session settings read back afterwards, so a setting made inside a function
//! stays its client's and never reaches another client of the server.
//!
//! Invariant: a name is listed when any function of that name (any schema,
//! any overload) may change settings; a call is recognised by the name
//! followed by `(`, case-insensitively, wherever it appears in the text (a
//! false positive costs one round trip after the transaction, never
//! correctness). PostgreSQL's own functions and extensions' are not listed:
//! `set_config` is recognised by `client::sql` itself.

/// Lists (lower-cased name) of functions outside pg_catalog and
/// information_schema, not from an extension, whose body may change a
/// setting: SQL and PL/pgSQL bodies that mention SET, RESET, DISCARD,
/// set_config or EXECUTE (dynamic SQL), and functions in any other language.
pub const QUERY: &str = "select distinct pg_catalog.lower(p.proname) \
     from pg_catalog.pg_proc p \
     join pg_catalog.pg_namespace n on n.oid = p.pronamespace \
     join pg_catalog.pg_language l on l.oid = p.prolang \
     where n.nspname operator(pg_catalog.<>) all (array['pg_catalog', 'information_schema']) \
     and n.nspname not like 'pg\\_toast%' \
     and not exists (select from pg_catalog.pg_depend d \
       where d.classid operator(pg_catalog.=) 'pg_catalog.pg_proc'::pg_catalog.regclass \
       and d.objid operator(pg_catalog.=) p.oid and d.deptype operator(pg_catalog.=) 'e') \
     and (l.lanname operator(pg_catalog.<>) all (array['sql', 'plpgsql']) \
       or p.prosrc operator(pg_catalog.~*) '(set_config|\\mset\\M|\\mreset\\M|\\mdiscard\\M|\\mexecute\\M|\\mcall\\M)')";

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SessionFunctions {
    /// Lower-cased names, sorted, without duplicates.
    names: Vec<Box<str>>,
}

impl SessionFunctions {
    pub fn new<I: IntoIterator<Item = String>>(names: I) -> Self {
        let mut names: Vec<Box<str>> = names
            .into_iter()
            .filter(|n| !n.is_empty())
            .map(|n| n.to_ascii_lowercase().into_boxed_str())
            .collect();
        names.sort();
        names.dedup();
        SessionFunctions { names }
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether `sql` may call one of the functions.
    pub fn called_in(&self, sql: &str) -> bool {
        self.names
            .iter()
            .any(|n| calls(sql.as_bytes(), n.as_bytes()))
    }
}

/// `name` (lower case) appears in `sql` as a word followed by `(`.
fn calls(sql: &[u8], name: &[u8]) -> bool {
    let is_ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80;
    let n = name.len();
    if n == 0 || sql.len() < n {
        return false;
    }
    let mut at = 0;
    while at + n <= sql.len() {
        let Some(i) = sql[at..=sql.len() - n]
            .iter()
            .position(|b| b.to_ascii_lowercase() == name[0])
        else {
            return false;
        };
        let start = at + i;
        let end = start + n;
        let word = sql[start..end].eq_ignore_ascii_case(name)
            && (start == 0 || !is_ident(sql[start - 1]))
            && sql.get(end).is_none_or(|b| !is_ident(*b));
        if word {
            let rest = sql[end..]
                .iter()
                .skip_while(|b| b.is_ascii_whitespace() || **b == b'"');
            if rest.take(1).any(|b| *b == b'(') {
                return true;
            }
        }
        at = start + 1;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_is_the_name_as_a_word_before_a_parenthesis() {
        let f = SessionFunctions::new(["Leaky".to_owned(), "set_tenant".to_owned()]);
        assert!(f.called_in("select leaky()"));
        assert!(f.called_in("SELECT public.LEAKY (1)"));
        assert!(f.called_in("select \"leaky\"()"));
        assert!(f.called_in("select 1; select set_tenant\n(42)"));
        assert!(!f.called_in("select leaky_other()"));
        assert!(!f.called_in("select not_leaky()"));
        assert!(!f.called_in("select leaky from t"));
        assert!(!f.called_in("select 1"));
        assert!(SessionFunctions::default().is_empty());
        assert!(!SessionFunctions::default().called_in("select leaky()"));
    }
}
