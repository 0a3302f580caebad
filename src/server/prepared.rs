//! Prepared statements on the server side: statements are identified by their
//! content (query text and parameter types), named after a hash of it, and
//! kept per server connection in a bounded LRU.
//!
//! Invariant: `ServerStatements` lists exactly the statements tidepool has
//! prepared (or is preparing) on that connection under tidepool's names; a
//! failed Parse is removed again by the session (see `server::expect`).

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};

use crate::protocol::ProtocolError;
use crate::protocol::messages::Body;
use crate::protocol::write;

/// One statement, shared by every client that prepared the same text/types.
#[derive(Debug, Clone)]
pub struct Statement {
    pub hash: u64,
    /// The name tidepool gives it on servers.
    pub name: String,
    /// A complete Parse message under `name`, ready to send; empty for a
    /// statement prepared with SQL `PREPARE`.
    pub parse: Bytes,
    /// For SQL `PREPARE`: the statement that prepares it under `name`.
    pub sql_prepare: Option<String>,
    /// The query text (for classification), read one char per byte when
    /// it is not UTF-8 (`foreign`, see `protocol::messages::foreign_text`).
    pub query: String,
    /// The client sent its text in another encoding than UTF-8.
    pub foreign: bool,
    /// Its fingerprint, computed on first use.
    pub shape: std::sync::OnceLock<Arc<crate::stats::Shape>>,
    /// The generation of its text (`pool::Catalog`) when it was prepared:
    /// the client was told the row shape of that generation.
    pub generation: u64,
    /// The row shape the client holds for it: set from the server
    /// statement's description once known.
    pub promised: std::sync::OnceLock<Described>,
    /// Whether running it leaves the session as it was (set by the client
    /// side on first use: `client::sql::effects`).
    pub plain: std::sync::OnceLock<bool>,
    /// The trace context of its text's sqlcommenter comment.
    pub trace: Option<crate::stats::trace::Trace>,
    /// The statement its text runs (`EXECUTE tidepool_…`, a client's SQL
    /// `EXECUTE p` prepared as a statement of its own): a server must have
    /// it too before this one is bound or described there.
    pub needs: Option<Arc<Statement>>,
}

impl Statement {
    /// Splits a client's Parse body into its statement name and the shared
    /// statement; `context` is the client's parse settings
    /// (`server::params::parse_context`), part of what it is shared by.
    pub fn from_parse(
        body: &[u8],
        context: u64,
    ) -> Result<(String, Arc<Statement>), ProtocolError> {
        let mut b = Body::new(body, "Parse");
        let client_name = b.cstr()?.to_owned();
        let rest = b.rest();
        let mut q = Body::new(rest, "Parse");
        let query = q.sql()?;
        let foreign = matches!(query, std::borrow::Cow::Owned(_));
        let query = query.into_owned();
        let n = q.i16()?;
        if n < 0 {
            return Err(ProtocolError::Malformed("Parse"));
        }
        q.bytes(n as usize * 4)?;
        // Keyed by the text without its edge comments (a sqlcommenter
        // trace context unique to each query shares one server statement)
        // and the parameter types.
        let text_len = rest.iter().position(|&c| c == 0).unwrap_or(rest.len());
        let key_text = if foreign {
            &rest[..text_len]
        } else {
            crate::stats::trace::without_edge_comments(&query).as_bytes()
        };
        let mut h = std::collections::hash_map::DefaultHasher::new();
        key_text.hash(&mut h);
        rest[text_len..].hash(&mut h);
        context.hash(&mut h);
        let hash = h.finish();
        let trace = crate::stats::trace::traceparent(&query);
        let name = format!("tidepool_{hash:016x}");
        let mut parse = BytesMut::with_capacity(rest.len() + name.len() + 6);
        write::message(
            &mut parse,
            crate::protocol::FrontendTag::Parse.byte(),
            |m| {
                m.put_slice(name.as_bytes());
                m.put_u8(0);
                m.put_slice(rest);
            },
        );
        Ok((
            client_name,
            Arc::new(Statement {
                hash,
                name,
                parse: parse.freeze(),
                sql_prepare: None,
                query,
                foreign,
                shape: std::sync::OnceLock::new(),
                generation: 0,
                promised: std::sync::OnceLock::new(),
                plain: std::sync::OnceLock::new(),
                trace,
                needs: None,
            }),
        ))
    }

    /// A statement from SQL `PREPARE name <rest>`, where `rest` is
    /// `[(types)] AS statement`, under parse settings `context`.
    pub fn from_sql_prepare(rest: &str, foreign: bool, context: u64) -> Arc<Statement> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        "sql-prepare".hash(&mut h);
        rest.hash(&mut h);
        context.hash(&mut h);
        let hash = h.finish();
        let name = server_name(hash);
        Arc::new(Statement {
            hash,
            sql_prepare: Some(format!("PREPARE {name}{rest}")),
            name,
            parse: Bytes::new(),
            query: rest.to_owned(),
            foreign,
            shape: std::sync::OnceLock::new(),
            generation: 0,
            promised: std::sync::OnceLock::new(),
            plain: std::sync::OnceLock::new(),
            trace: None,
            needs: None,
        })
    }
}

/// The statements one server connection has, least recently used first out,
/// each with the version of its text it was prepared in (`pool::Catalog`)
/// and its row shape once the server described it.
#[derive(Debug, Default)]
pub struct ServerStatements {
    used: HashMap<u64, Entry>,
    tick: u64,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    last_use: u64,
    version: u64,
    shape: Option<Described>,
}

/// A row shape (see [`row_shape`]) as one server described it, and when:
/// of two descriptions that differ, the later one is the catalog's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Described {
    pub shape: u64,
    /// Increases with every description, process-wide.
    pub seq: u64,
}

impl Described {
    /// A description received now.
    pub fn now(shape: u64) -> Described {
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        Described {
            shape,
            seq: SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        }
    }
}

impl Statement {
    /// This statement as prepared in `generation` of its text.
    pub fn in_generation(mut stmt: Arc<Statement>, generation: u64) -> Arc<Statement> {
        if stmt.generation != generation {
            Arc::make_mut(&mut stmt).generation = generation;
        }
        stmt
    }
}

impl ServerStatements {
    /// Whether the server has this statement, in any version.
    pub fn contains(&self, hash: u64) -> bool {
        self.used.contains_key(&hash)
    }

    /// Whether the server has this statement prepared in `version`.
    pub fn fresh(&self, hash: u64, version: u64) -> bool {
        self.used.get(&hash).is_some_and(|e| e.version == version)
    }

    /// The row shape the server described for this statement, if known.
    pub fn shape(&self, hash: u64) -> Option<Described> {
        self.used.get(&hash).and_then(|e| e.shape)
    }

    /// The server described this statement (as prepared now).
    pub fn set_shape(&mut self, hash: u64, shape: Described) {
        if let Some(e) = self.used.get_mut(&hash) {
            e.shape = Some(shape);
        }
    }

    pub fn touch(&mut self, hash: u64) {
        self.tick += 1;
        if let Some(e) = self.used.get_mut(&hash) {
            e.last_use = self.tick;
        }
    }

    /// Records `hash` (prepared in `version`, not yet described); returns
    /// the least recently used statement to close when more than `cap`
    /// would be kept.
    pub fn insert(&mut self, hash: u64, version: u64, cap: usize) -> Option<u64> {
        self.tick += 1;
        self.used.insert(
            hash,
            Entry {
                last_use: self.tick,
                version,
                shape: None,
            },
        );
        if self.used.len() <= cap.max(1) {
            return None;
        }
        let victim = self
            .used
            .iter()
            .filter(|(h, _)| **h != hash)
            .min_by_key(|(_, e)| e.last_use)
            .map(|(h, _)| *h)?;
        self.used.remove(&victim);
        Some(victim)
    }

    pub fn remove(&mut self, hash: u64) {
        self.used.remove(&hash);
    }

    pub fn clear(&mut self) {
        self.used.clear();
    }

    pub fn len(&self) -> usize {
        self.used.len()
    }

    pub fn is_empty(&self) -> bool {
        self.used.is_empty()
    }
}

/// The row shape a RowDescription (or NoData, an empty body) tells a
/// client: per column its name, type and type modifier, what PostgreSQL
/// compares before it answers `cached plan must not change result type`
/// (the source table and column numbers are left out: a table dropped and
/// created again with the same columns gives the same rows).
pub fn row_shape(tag: u8, body: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    tag.hash(&mut h);
    let mut fields = body.get(2..).unwrap_or_default();
    while let Some(end) = memchr::memchr(0, fields) {
        let (name, rest) = fields.split_at(end);
        name.hash(&mut h);
        // table oid (4), column number (2), type oid (4), type size (2),
        // type modifier (4), format (2).
        let Some(attrs) = rest.get(1..19) else {
            break;
        };
        attrs[6..10].hash(&mut h);
        attrs[12..16].hash(&mut h);
        fields = &rest[19..];
    }
    fields.hash(&mut h);
    h.finish()
}

/// The server-side name for a statement hash.
pub fn server_name(hash: u64) -> String {
    format!("tidepool_{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_body(name: &str, q: &str) -> Vec<u8> {
        let mut v = name.as_bytes().to_vec();
        v.push(0);
        v.extend_from_slice(q.as_bytes());
        v.push(0);
        v.extend_from_slice(&1i16.to_be_bytes());
        v.extend_from_slice(&23i32.to_be_bytes());
        v
    }

    #[test]
    fn same_text_same_statement_whatever_the_client_name() {
        let (a, s1) = Statement::from_parse(&parse_body("s1", "select $1"), 0).unwrap();
        let (b, s2) = Statement::from_parse(&parse_body("other", "select $1"), 0).unwrap();
        let (_, s3) = Statement::from_parse(&parse_body("s1", "select $1 + 1"), 0).unwrap();
        assert_eq!((a.as_str(), b.as_str()), ("s1", "other"));
        assert_eq!(s1.hash, s2.hash);
        assert_ne!(s1.hash, s3.hash);
        assert_eq!(s1.name, server_name(s1.hash));
        assert_eq!(s1.parse[0], b'P');
        assert!(Statement::from_parse(b"s1\0select", 0).is_err());
        // Parsed under other settings: another server statement.
        let (_, s4) = Statement::from_parse(&parse_body("s1", "select $1"), 7).unwrap();
        assert_ne!(s1.hash, s4.hash);
        assert_ne!(
            Statement::from_sql_prepare(" AS select 1", false, 0).hash,
            Statement::from_sql_prepare(" AS select 1", false, 7).hash
        );
    }

    #[test]
    fn lru_evicts_the_least_recently_used() {
        let mut s = ServerStatements::default();
        assert_eq!(s.insert(1, 0, 2), None);
        assert_eq!(s.insert(2, 0, 2), None);
        s.touch(1);
        assert_eq!(s.insert(3, 0, 2), Some(2));
        assert!(s.contains(1) && s.contains(3) && !s.contains(2));
    }

    fn row_description(columns: &[(&str, u32, u32, i32)]) -> Vec<u8> {
        let mut v = (columns.len() as i16).to_be_bytes().to_vec();
        for (name, table, ty, typmod) in columns {
            v.extend_from_slice(name.as_bytes());
            v.push(0);
            v.extend_from_slice(&table.to_be_bytes());
            v.extend_from_slice(&1i16.to_be_bytes());
            v.extend_from_slice(&ty.to_be_bytes());
            v.extend_from_slice(&4i16.to_be_bytes());
            v.extend_from_slice(&typmod.to_be_bytes());
            v.extend_from_slice(&0i16.to_be_bytes());
        }
        v
    }

    #[test]
    fn row_shapes_compare_names_types_and_modifiers_only() {
        let shape = |c: &[(&str, u32, u32, i32)]| row_shape(b'T', &row_description(c));
        let base = shape(&[("id", 1, 23, -1), ("v", 1, 25, -1)]);
        assert_eq!(base, shape(&[("id", 9, 23, -1), ("v", 9, 25, -1)]));
        assert_ne!(base, shape(&[("id", 1, 23, -1)]));
        assert_ne!(base, shape(&[("id", 1, 20, -1), ("v", 1, 25, -1)]));
        assert_ne!(base, shape(&[("id", 1, 23, -1), ("w", 1, 25, -1)]));
        assert_ne!(base, shape(&[("id", 1, 23, 8), ("v", 1, 25, -1)]));
        assert_ne!(row_shape(b'n', b""), shape(&[]));
        // A truncated description still hashes (it never panics).
        let mut cut = row_description(&[("id", 1, 23, -1)]);
        cut.truncate(8);
        let _ = row_shape(b'T', &cut);
    }

    #[test]
    fn versions_and_shapes_belong_to_the_entry() {
        let mut s = ServerStatements::default();
        s.insert(1, 3, 10);
        assert!(s.fresh(1, 3) && !s.fresh(1, 4) && !s.fresh(2, 3));
        assert_eq!(s.shape(1), None);
        let d = Described::now(42);
        s.set_shape(1, d);
        s.set_shape(2, d);
        assert_eq!((s.shape(1), s.shape(2)), (Some(d), None));
        assert!(Described::now(42).seq > d.seq);
        s.insert(1, 4, 10);
        assert_eq!(s.shape(1), None, "prepared again: described again");
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        /// Prepare statement `h` in `version` (the catalog's now).
        Prepare {
            h: u64,
            version: u64,
        },
        Touch(u64),
        Remove(u64),
        Describe {
            h: u64,
            shape: u64,
        },
        Clear,
    }

    fn op() -> impl Strategy<Value = Op> {
        let h = 0u64..12;
        prop_oneof![
            (h.clone(), 0u64..3).prop_map(|(h, version)| Op::Prepare { h, version }),
            h.clone().prop_map(Op::Touch),
            h.clone().prop_map(Op::Remove),
            (h, 0u64..3).prop_map(|(h, shape)| Op::Describe { h, shape }),
            Just(Op::Clear),
        ]
    }

    proptest! {
        /// The per-server prepared set against a model (a list in use
        /// order): never more than `cap` statements; eviction takes the least
        /// recently used one other than the one being prepared; a statement
        /// is fresh only in the version it was prepared in; a shape belongs
        /// to the preparation it describes (preparing again forgets it).
        #[test]
        fn the_prepared_set_is_a_bounded_lru_of_versions(
            cap in 1usize..6,
            ops in prop::collection::vec(op(), 0..80),
        ) {
            let mut s = ServerStatements::default();
            // Most recently used last: (hash, version, shape).
            let mut model: Vec<(u64, u64, Option<u64>)> = Vec::new();
            for op in ops {
                match op {
                    Op::Prepare { h, version } => {
                        let victim = s.insert(h, version, cap);
                        model.retain(|e| e.0 != h);
                        model.push((h, version, None));
                        let expected = (model.len() > cap).then(|| model.remove(0).0);
                        prop_assert_eq!(victim, expected);
                    }
                    Op::Touch(h) => {
                        s.touch(h);
                        if let Some(at) = model.iter().position(|e| e.0 == h) {
                            let e = model.remove(at);
                            model.push(e);
                        }
                    }
                    Op::Remove(h) => {
                        s.remove(h);
                        model.retain(|e| e.0 != h);
                    }
                    Op::Describe { h, shape } => {
                        s.set_shape(h, Described { shape, seq: 0 });
                        if let Some(e) = model.iter_mut().find(|e| e.0 == h) {
                            e.2 = Some(shape);
                        }
                    }
                    Op::Clear => {
                        s.clear();
                        model.clear();
                    }
                }
                prop_assert!(s.len() <= cap);
                prop_assert_eq!(s.len(), model.len());
                for h in 0..12u64 {
                    let m = model.iter().find(|e| e.0 == h);
                    prop_assert_eq!(s.contains(h), m.is_some());
                    for v in 0..3u64 {
                        prop_assert_eq!(s.fresh(h, v), m.is_some_and(|e| e.1 == v));
                    }
                    prop_assert_eq!(s.shape(h).map(|d| d.shape), m.and_then(|e| e.2));
                }
            }
        }
    }
}
