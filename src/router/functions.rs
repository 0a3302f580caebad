//! The volatility of a database's functions, as its primary's `pg_proc`
//! says: what decides whether a read that calls a function may run on a
//! replica. Loaded by the health checker (`health::checker`), replaced as a
//! whole on each refresh.
//!
//! Invariant: a name maps to "volatile" when any function of that name (any
//! overload, and for an unqualified name any schema) is VOLATILE, so an
//! unqualified call is judged by the most demanding function it could
//! resolve to whatever the search_path. A name that is absent is unknown,
//! and an unknown function is never taken for a read-only one.

use std::collections::HashMap;

/// The query that lists (schema, name, any overload volatile).
pub const QUERY: &str = "select n.nspname::text, p.proname::text, bool_or(p.provolatile = 'v') \
     from pg_catalog.pg_proc p join pg_catalog.pg_namespace n on n.oid = p.pronamespace \
     group by 1, 2";

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Functions {
    /// `name` and `schema.name` → some function of that name is VOLATILE.
    volatile: HashMap<Box<str>, bool>,
}

impl Functions {
    /// From rows of [`QUERY`]: (schema, name, volatile).
    pub fn from_rows<I, S>(rows: I) -> Self
    where
        I: IntoIterator<Item = (S, S, bool)>,
        S: AsRef<str>,
    {
        let mut volatile: HashMap<Box<str>, bool> = HashMap::new();
        for (schema, name, v) in rows {
            let (schema, name) = (schema.as_ref(), name.as_ref());
            *volatile.entry(name.into()).or_default() |= v;
            *volatile
                .entry(format!("{schema}.{name}").into_boxed_str())
                .or_default() |= v;
        }
        Functions { volatile }
    }

    /// True only for a function known here and not VOLATILE. `call` is the
    /// name as the parser gives it (folded to lower case unless quoted),
    /// schema-qualified when it was written so.
    pub fn is_read_only(&self, call: &str) -> bool {
        self.volatile.get(call) == Some(&false)
    }

    pub fn len(&self) -> usize {
        self.volatile.len()
    }

    pub fn is_empty(&self) -> bool {
        self.volatile.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_volatile_overload_or_schema_makes_the_name_volatile() {
        let f = Functions::from_rows([
            ("pg_catalog", "lower", false),
            ("public", "log_event", true),
            ("public", "pick", false),
            ("audit", "pick", true),
            ("public", "Mixed", false),
        ]);
        assert!(f.is_read_only("lower"));
        assert!(f.is_read_only("pg_catalog.lower"));
        assert!(!f.is_read_only("log_event"));
        assert!(!f.is_read_only("pick"), "some schema's pick writes");
        assert!(f.is_read_only("public.pick"));
        assert!(!f.is_read_only("audit.pick"));
        assert!(!f.is_read_only("unknown_fn"), "unknown is never read-only");
        assert!(f.is_read_only("Mixed"));
        assert!(!f.is_read_only("mixed"));
    }
}
