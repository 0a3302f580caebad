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
/// set_config or EXECUTE (dynamic SQL), functions in any other language, and
/// functions whose body calls one of those (at any depth: `outer()` calling
/// `set_tenant()`); with each, the dotted names its body mentions
/// (comma-separated): the custom settings (`app.tenant`) it may set, which
/// PostgreSQL lists nowhere (`pg_settings` leaves placeholders out), among
/// other dotted names.
pub const QUERY: &str = r#"with recursive own as (
  select p.oid, p.proname, p.prosrc, l.lanname
  from pg_catalog.pg_proc p
  join pg_catalog.pg_namespace n on n.oid operator(pg_catalog.=) p.pronamespace
  join pg_catalog.pg_language l on l.oid operator(pg_catalog.=) p.prolang
  where n.nspname operator(pg_catalog.<>) all (array['pg_catalog', 'information_schema'])
  and n.nspname not like 'pg\_toast%'
  and not exists (select from pg_catalog.pg_depend d
    where d.classid operator(pg_catalog.=) 'pg_catalog.pg_proc'::pg_catalog.regclass
    and d.objid operator(pg_catalog.=) p.oid and d.deptype operator(pg_catalog.=) 'e')
), ch(oid) as (
  select oid from own
  where lanname operator(pg_catalog.<>) all (array['sql', 'plpgsql'])
  or prosrc operator(pg_catalog.~*) '(set_config|\mset\M|\mreset\M|\mdiscard\M|\mexecute\M|\mcall\M)'
  union
  select o.oid from ch join own x on x.oid operator(pg_catalog.=) ch.oid, own o
  where o.prosrc operator(pg_catalog.~*) pg_catalog.concat('\m',
    pg_catalog.regexp_replace(x.proname, '([^[:alnum:]_])', '\\\1', 'g'), '\M\s*\(')
)
select pg_catalog.lower(p.proname),
  pg_catalog.string_agg(distinct pg_catalog.lower(m.m[1]), ',')
from ch join own p on p.oid operator(pg_catalog.=) ch.oid
left join lateral pg_catalog.regexp_matches(p.prosrc,
  '\m([a-z_][a-z0-9_$]*\.[a-z_][a-z0-9_$]*)\M', 'gi') m(m) on true
group by 1"#;

/// [`QUERY`] as tidepool sends it: without JIT compilation, in the
/// implicit transaction of a two-statement query (`SET LOCAL`, so the
/// session keeps its own `jit`). The query's cost estimate passes
/// `jit_above_cost`: with JIT on (PostgreSQL's default where LLVM is
/// installed) compiling it took about 0.9 s, paid again after every DDL
/// transaction through tidepool (a restore took minutes instead of
/// seconds).
pub fn query() -> String {
    format!("SET LOCAL jit = off; {QUERY}")
}

/// Custom setting names kept at most (read back by name after a call).
const MAX_CUSTOMS: usize = 256;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SessionFunctions {
    /// Lower-cased names, sorted, without duplicates.
    names: Vec<Box<str>>,
    /// Dotted names their bodies mention: the custom settings a call may
    /// have set, to read back by name.
    customs: Vec<Box<str>>,
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
        SessionFunctions {
            names,
            customs: Vec::new(),
        }
    }

    /// From [`QUERY`]'s rows as text: a name and its comma-separated
    /// dotted names (empty for none).
    pub fn from_rows<I: IntoIterator<Item = Vec<String>>>(rows: I) -> Self {
        let mut names = Vec::new();
        let mut customs: Vec<Box<str>> = Vec::new();
        for row in rows {
            let mut cols = row.into_iter();
            if let Some(name) = cols.next() {
                names.push(name);
            }
            if let Some(dotted) = cols.next() {
                customs.extend(
                    dotted
                        .split(',')
                        .filter(|n| crate::server::params::valid_name(n))
                        .map(|n| n.to_ascii_lowercase().into_boxed_str()),
                );
            }
        }
        customs.sort();
        customs.dedup();
        customs.truncate(MAX_CUSTOMS);
        SessionFunctions {
            customs,
            ..Self::new(names)
        }
    }

    /// The custom settings a call of one of the functions may have set.
    pub fn customs(&self) -> &[Box<str>] {
        &self.customs
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

    #[test]
    fn dotted_names_in_bodies_are_the_customs_to_read_back() {
        let f = SessionFunctions::from_rows([
            vec![
                "set_tenant".to_owned(),
                "app.tenant,public.users".to_owned(),
            ],
            vec!["leaky".to_owned(), String::new()],
            vec!["other".to_owned(), "App.Tenant,x;y.z".to_owned()],
        ]);
        assert!(f.called_in("select set_tenant(1)") && f.called_in("select leaky()"));
        let customs: Vec<&str> = f.customs().iter().map(|c| &**c).collect();
        assert_eq!(customs, ["app.tenant", "public.users"]);
    }
}
