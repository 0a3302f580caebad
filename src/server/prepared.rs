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
    /// The query text (for classification).
    pub query: String,
    /// Its fingerprint, computed on first use.
    pub shape: std::sync::OnceLock<Arc<crate::stats::Shape>>,
    /// The generation of its text (`pool::Catalog`) when it was prepared:
    /// the client was told the row shape of that generation.
    pub generation: u64,
}

impl Statement {
    /// Splits a client's Parse body into its statement name and the shared
    /// statement.
    pub fn from_parse(body: &[u8]) -> Result<(String, Arc<Statement>), ProtocolError> {
        let mut b = Body::new(body, "Parse");
        let client_name = b.cstr()?.to_owned();
        let rest = b.rest();
        let mut q = Body::new(rest, "Parse");
        let query = q.cstr()?.to_owned();
        let n = q.i16()?;
        if n < 0 {
            return Err(ProtocolError::Malformed("Parse"));
        }
        q.bytes(n as usize * 4)?;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        rest.hash(&mut h);
        let hash = h.finish();
        let name = format!("tidepool_{hash:016x}");
        let mut parse = BytesMut::with_capacity(rest.len() + name.len() + 6);
        write::message(&mut parse, b'P', |m| {
            m.put_slice(name.as_bytes());
            m.put_u8(0);
            m.put_slice(rest);
        });
        Ok((
            client_name,
            Arc::new(Statement {
                hash,
                name,
                parse: parse.freeze(),
                sql_prepare: None,
                query,
                shape: std::sync::OnceLock::new(),
                generation: 0,
            }),
        ))
    }

    /// A statement from SQL `PREPARE name <rest>`, where `rest` is
    /// `[(types)] AS statement`.
    pub fn from_sql_prepare(rest: &str) -> Arc<Statement> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        "sql-prepare".hash(&mut h);
        rest.hash(&mut h);
        let hash = h.finish();
        let name = server_name(hash);
        Arc::new(Statement {
            hash,
            sql_prepare: Some(format!("PREPARE {name}{rest}")),
            name,
            parse: Bytes::new(),
            query: rest.to_owned(),
            shape: std::sync::OnceLock::new(),
            generation: 0,
        })
    }
}

/// The statements one server connection has, least recently used first out,
/// each with the generation of its text it was prepared in.
#[derive(Debug, Default)]
pub struct ServerStatements {
    /// Hash → (last use, generation).
    used: HashMap<u64, (u64, u64)>,
    tick: u64,
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
    /// Whether the server has this statement, in any generation.
    pub fn contains(&self, hash: u64) -> bool {
        self.used.contains_key(&hash)
    }

    /// Whether the server has `stmt` as prepared in its generation.
    pub fn has(&self, stmt: &Statement) -> bool {
        self.used
            .get(&stmt.hash)
            .is_some_and(|(_, g)| *g == stmt.generation)
    }

    pub fn touch(&mut self, hash: u64) {
        self.tick += 1;
        if let Some((t, _)) = self.used.get_mut(&hash) {
            *t = self.tick;
        }
    }

    /// Records `hash` (prepared in `generation`); returns the least recently
    /// used statement to close when more than `cap` would be kept.
    pub fn insert(&mut self, hash: u64, generation: u64, cap: usize) -> Option<u64> {
        self.tick += 1;
        self.used.insert(hash, (self.tick, generation));
        if self.used.len() <= cap.max(1) {
            return None;
        }
        let victim = self
            .used
            .iter()
            .filter(|(h, _)| **h != hash)
            .min_by_key(|(_, (t, _))| *t)
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
        let (a, s1) = Statement::from_parse(&parse_body("s1", "select $1")).unwrap();
        let (b, s2) = Statement::from_parse(&parse_body("other", "select $1")).unwrap();
        let (_, s3) = Statement::from_parse(&parse_body("s1", "select $1 + 1")).unwrap();
        assert_eq!((a.as_str(), b.as_str()), ("s1", "other"));
        assert_eq!(s1.hash, s2.hash);
        assert_ne!(s1.hash, s3.hash);
        assert_eq!(s1.name, server_name(s1.hash));
        assert_eq!(s1.parse[0], b'P');
        assert!(Statement::from_parse(b"s1\0select").is_err());
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
}
