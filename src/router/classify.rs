//! Statement classification with PostgreSQL's own grammar (`pg_query`),
//! cached by query text so a repeated statement costs a hash.
//!
//! Anything that is not clearly a read is a write; anything unparseable is a
//! write. A multi-statement string takes the class of its most demanding
//! statement.

use std::collections::HashMap;
use std::collections::HashSet;
use std::hash::Hasher;
use std::sync::{Mutex, PoisonError};

use pg_query::NodeRef;
use pg_query::protobuf::TransactionStmtKind as TxKind;
use pg_query::protobuf::node::Node as N;

/// What a statement needs, least demanding first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Class {
    /// SET, COMMIT, ROLLBACK, …: runs wherever the client's transaction is.
    Neutral,
    /// Safe on a replica.
    Read,
    /// `BEGIN READ ONLY` (or `SET TRANSACTION READ ONLY`): a replica may run
    /// the whole transaction.
    BeginReadOnly,
    /// An explicit transaction that may write.
    Begin,
    /// Must run on the primary.
    Write,
}

/// Functions that change state even inside a SELECT.
const WRITE_FUNCTIONS: &[&str] = &[
    "nextval",
    "setval",
    "set_config",
    "pg_advisory_lock",
    "pg_advisory_lock_shared",
    "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared",
    "pg_advisory_xact_lock",
    "pg_advisory_xact_lock_shared",
    "pg_try_advisory_xact_lock",
    "pg_try_advisory_xact_lock_shared",
    "pg_advisory_unlock",
    "pg_advisory_unlock_shared",
    "pg_advisory_unlock_all",
    "pg_notify",
    "txid_current",
    "pg_current_xact_id",
    "lo_create",
    "lo_import",
    "lo_unlink",
    "lo_put",
    "lo_from_bytea",
    "pg_switch_wal",
    "pg_create_restore_point",
    "pg_create_physical_replication_slot",
    "pg_create_logical_replication_slot",
    "pg_drop_replication_slot",
    "pg_logical_emit_message",
    "pg_terminate_backend",
    "pg_cancel_backend",
    "pg_reload_conf",
    "pg_rotate_logfile",
    "pg_stat_reset",
    "dblink_exec",
];

/// Functions known to be read-only, for `strict` mode (built-in basics).
const READ_FUNCTIONS: &[&str] = &[
    "count",
    "sum",
    "avg",
    "min",
    "max",
    "now",
    "current_timestamp",
    "pg_is_in_recovery",
    "pg_backend_pid",
    "version",
    "coalesce",
    "lower",
    "upper",
    "length",
    "abs",
    "round",
    "random",
    "generate_series",
    "array_agg",
    "string_agg",
    "json_agg",
    "jsonb_agg",
    "to_char",
    "date_trunc",
    "extract",
    "concat",
    "substring",
    "pg_sleep",
    "current_setting",
    "pg_last_wal_replay_lsn",
    "pg_current_wal_lsn",
];

/// Classification rules from `[routing]`.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    pub strict: bool,
    pub write_functions: HashSet<String>,
    pub read_only_functions: HashSet<String>,
}

impl Rules {
    pub fn from_config(r: &crate::config::schema::Routing) -> Self {
        Self {
            strict: r.strict,
            write_functions: r
                .write_functions
                .iter()
                .map(|f| f.to_ascii_lowercase())
                .collect(),
            read_only_functions: r
                .read_only_functions
                .iter()
                .map(|f| f.to_ascii_lowercase())
                .collect(),
        }
    }

    fn writes(&self, function: &str) -> bool {
        let f = function
            .rsplit('.')
            .next()
            .unwrap_or(function)
            .to_ascii_lowercase();
        if WRITE_FUNCTIONS.contains(&f.as_str()) || self.write_functions.contains(&f) {
            return true;
        }
        self.strict
            && !READ_FUNCTIONS.contains(&f.as_str())
            && !self.read_only_functions.contains(&f)
    }
}

/// Statements longer than this are not parsed: they go to the primary.
/// Parsing is proportional to the text (a 100 MB multi-row INSERT would hold
/// the event loop for seconds), and when in doubt, the primary.
pub const MAX_CLASSIFIED_BYTES: usize = 256 * 1024;

/// Classifies one query string (uncached).
pub fn classify(sql: &str, rules: &Rules) -> Class {
    if sql.len() > MAX_CLASSIFIED_BYTES {
        return Class::Write;
    }
    let Ok(parsed) = pg_query::parse(sql, 0) else {
        return Class::Write;
    };
    let mut class = Class::Neutral;
    let mut read_only_tx = false;
    for raw in &parsed.protobuf.stmts {
        let node = raw.stmt.as_ref().and_then(|s| s.node.as_ref());
        let c = match node {
            Some(N::SelectStmt(_)) | Some(N::VariableShowStmt(_)) => Class::Read,
            Some(N::ExplainStmt(_)) => Class::Read,
            Some(N::TransactionStmt(t)) => match t.kind() {
                TxKind::TransStmtBegin | TxKind::TransStmtStart => {
                    if read_only_option(&t.options) {
                        Class::BeginReadOnly
                    } else {
                        Class::Begin
                    }
                }
                _ => Class::Neutral,
            },
            Some(N::VariableSetStmt(v)) if v.name == "TRANSACTION" => {
                read_only_tx |= read_only_option(&v.args);
                // Alone, it starts the read-only part of a transaction whose
                // BEGIN tidepool deferred.
                if read_only_option(&v.args) {
                    Class::BeginReadOnly
                } else {
                    Class::Neutral
                }
            }
            Some(N::VariableSetStmt(_)) | Some(N::DiscardStmt(_)) | Some(N::DeallocateStmt(_)) => {
                Class::Neutral
            }
            _ => Class::Write,
        };
        class = class.max(c);
    }
    // `BEGIN; SET TRANSACTION READ ONLY; …` in one string is read-only too.
    if class == Class::Begin && read_only_tx {
        class = Class::BeginReadOnly;
    }
    if class >= Class::Begin {
        return class;
    }
    // Look inside: locking clauses, SELECT INTO, data-modifying CTEs, writing functions.
    for (node, _, _, _) in parsed.protobuf.nodes() {
        let writes = match node {
            NodeRef::SelectStmt(s) => s.into_clause.is_some() || !s.locking_clause.is_empty(),
            NodeRef::InsertStmt(_)
            | NodeRef::UpdateStmt(_)
            | NodeRef::DeleteStmt(_)
            | NodeRef::MergeStmt(_) => true,
            _ => false,
        };
        if writes {
            return Class::Write;
        }
    }
    if parsed.functions().iter().any(|f| rules.writes(f)) {
        return Class::Write;
    }
    class
}

fn read_only_option(options: &[pg_query::protobuf::Node]) -> bool {
    options.iter().any(|o| match &o.node {
        Some(N::DefElem(d)) if d.defname == "transaction_read_only" => {
            match d.arg.as_ref().and_then(|a| a.node.as_ref()) {
                Some(N::AConst(c)) => matches!(
                    &c.val,
                    Some(pg_query::protobuf::a_const::Val::Ival(i)) if i.ival == 1
                ),
                _ => false,
            }
        }
        Some(N::AConst(c)) => matches!(
            &c.val,
            Some(pg_query::protobuf::a_const::Val::Sval(s)) if s.sval.eq_ignore_ascii_case("read only")
        ),
        _ => false,
    })
}

const SHARDS: usize = 16;
const SHARD_CAPACITY: usize = 4096;

/// A classifier with a sharded cache keyed by a 128-bit keyed hash of the
/// query text (SipHash-1-3 with random keys): a cache entry costs a few
/// bytes whatever the statement's size, and two texts that share a key would
/// take 2^64 tries to find even for someone who could see the hashes.
pub struct Classifier {
    rules: Rules,
    shards: Vec<Mutex<HashMap<u128, Class>>>,
    keys: (u64, u64),
}

impl std::fmt::Debug for Classifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Classifier")
    }
}

impl Classifier {
    pub fn new(rules: Rules) -> Self {
        Self {
            rules,
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            keys: (rand::random(), rand::random()),
        }
    }

    fn key(&self, sql: &str) -> u128 {
        use siphasher::sip128::Hasher128;
        let mut h = siphasher::sip128::SipHasher13::new_with_keys(self.keys.0, self.keys.1);
        h.write(sql.as_bytes());
        h.finish128().as_u128()
    }

    pub fn classify(&self, sql: &str) -> Class {
        let key = self.key(sql);
        let shard = &self.shards[(key as usize) % SHARDS];
        if let Some(c) = shard
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
        {
            return *c;
        }
        let class = classify(sql, &self.rules);
        let mut map = shard.lock().unwrap_or_else(PoisonError::into_inner);
        if map.len() >= SHARD_CAPACITY {
            map.clear();
        }
        map.insert(key, class);
        class
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(sql: &str) -> Class {
        classify(sql, &Rules::default())
    }

    #[test]
    fn statements_over_the_parse_limit_go_to_the_primary() {
        let just = format!("select '{}'", "x".repeat(MAX_CLASSIFIED_BYTES - 9));
        assert_eq!(just.len(), MAX_CLASSIFIED_BYTES);
        assert_eq!(c(&just), Class::Read);
        let over = format!("select '{}'", "x".repeat(MAX_CLASSIFIED_BYTES - 8));
        assert_eq!(c(&over), Class::Write);
        // The cache answers the same as the parser, for both.
        let cached = Classifier::new(Rules::default());
        for _ in 0..2 {
            assert_eq!(cached.classify(&just), Class::Read);
            assert_eq!(cached.classify(&over), Class::Write);
            assert_eq!(cached.classify("select 1"), Class::Read);
            assert_eq!(cached.classify("insert into t values (1)"), Class::Write);
        }
    }

    #[test]
    fn reads() {
        for sql in [
            "select 1",
            "SELECT * FROM t WHERE a = $1",
            "values (1), (2)",
            "table t",
            "show search_path",
            "explain select * from t",
            "with x as (select 1) select * from x",
            "select pg_is_in_recovery()",
            "select 1; select 2",
        ] {
            assert_eq!(c(sql), Class::Read, "{sql}");
        }
    }

    #[test]
    fn writes() {
        for sql in [
            "insert into t values (1)",
            "update t set a = 1",
            "delete from t",
            "merge into t using s on t.a = s.a when matched then do nothing",
            "create table x (a int)",
            "select * from t for update",
            "select * from t for share",
            "select * into newt from t",
            "with d as (delete from t returning *) select * from d",
            "select nextval('s')",
            "select setval('s', 1)",
            "select pg_advisory_lock(1)",
            "copy t from stdin",
            "call p()",
            "select 1; insert into t values (1)",
            "explain analyze insert into t values (1)",
            "not sql at all",
            "vacuum t",
            "lock table t",
        ] {
            assert_eq!(c(sql), Class::Write, "{sql}");
        }
    }

    #[test]
    fn transactions() {
        assert_eq!(c("begin"), Class::Begin);
        assert_eq!(c("BEGIN READ ONLY"), Class::BeginReadOnly);
        assert_eq!(c("start transaction read only"), Class::BeginReadOnly);
        assert_eq!(
            c("begin isolation level serializable, read only"),
            Class::BeginReadOnly
        );
        assert_eq!(c("begin read write"), Class::Begin);
        assert_eq!(
            c("begin; set transaction read only; select 1"),
            Class::BeginReadOnly
        );
        assert_eq!(
            c("begin; set transaction read write; select 1"),
            Class::Begin
        );
        assert_eq!(
            c("begin; set transaction read only; insert into t values (1)"),
            Class::Write
        );
        assert_eq!(c("commit"), Class::Neutral);
        assert_eq!(c("set search_path = a"), Class::Neutral);
        assert_eq!(c("set transaction read only"), Class::BeginReadOnly);
        assert_eq!(
            c("set transaction isolation level serializable"),
            Class::Neutral
        );
    }

    #[test]
    fn strict_mode_and_extra_functions() {
        let mut rules = Rules::default();
        rules.write_functions.insert("my_writer".into());
        assert_eq!(classify("select my_writer()", &rules), Class::Write);
        assert_eq!(classify("select my_reader()", &rules), Class::Read);
        rules.strict = true;
        assert_eq!(classify("select my_reader()", &rules), Class::Write);
        assert_eq!(classify("select count(*) from t", &rules), Class::Read);
    }

    #[test]
    fn the_cache_returns_the_same_answer() {
        let cl = Classifier::new(Rules::default());
        assert_eq!(cl.classify("select 1"), Class::Read);
        assert_eq!(cl.classify("select 1"), Class::Read);
        assert_eq!(cl.classify("insert into t values (1)"), Class::Write);
    }
}
