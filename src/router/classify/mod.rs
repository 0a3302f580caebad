//! Statement classification with PostgreSQL's own grammar (`pg_query`),
//! cached by query text so a repeated statement costs a hash.
//!
//! Anything that is not clearly a read is a write; anything unparseable is a
//! write. A multi-statement string takes the class of its most demanding
//! statement. A read's verdict lists the functions it calls wherever they
//! stand (select list, FROM, LATERAL, VALUES, CTEs, sub-selects, every
//! statement of the string, the statement `EXPLAIN ANALYZE` runs): it stays
//! a read only if every one is known not to write (`Verdict::resolve`, with
//! the database's function volatilities from `router::functions`).

use std::collections::HashMap;
use std::collections::{BTreeSet, HashSet};
use std::hash::Hasher;
use std::sync::{Arc, Mutex, PoisonError};

use pg_query::protobuf::TransactionStmtKind as TxKind;
use pg_query::protobuf::node::Node as N;
use serde_json::Value;

use super::functions::Functions;

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
];

/// Built-in functions marked VOLATILE that only read: a call of one of them
/// does not keep a statement off the replicas (documented in
/// docs/routing.md).
pub const READ_ONLY_VOLATILE: &[&str] = &[
    "random",
    "random_normal",
    "clock_timestamp",
    "timeofday",
    "pg_sleep",
    "pg_sleep_for",
    "pg_sleep_until",
    "gen_random_uuid",
    "uuid_generate_v1",
    "uuid_generate_v1mc",
    "uuid_generate_v4",
    "pg_is_in_recovery",
    "pg_last_wal_receive_lsn",
    "pg_last_wal_replay_lsn",
    "pg_last_xact_replay_timestamp",
    "pg_is_wal_replay_paused",
    "pg_get_wal_replay_pause_state",
    "pg_relation_size",
    "pg_total_relation_size",
    "pg_table_size",
    "pg_indexes_size",
    "pg_database_size",
    "pg_tablespace_size",
    "pg_stat_get_activity",
    "pg_stat_statements",
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
        if WRITE_FUNCTIONS.contains(&f.as_str())
            || self.write_functions.contains(&f)
            || self
                .write_functions
                .contains(&function.to_ascii_lowercase())
        {
            return true;
        }
        self.strict
            && !READ_FUNCTIONS.contains(&f.as_str())
            && !self.read_only_functions.contains(&f)
    }

    /// Known not to write whatever its volatility: the user's
    /// `read_only_functions` (by name or schema-qualified name) and the
    /// built-in read-only volatile functions (unqualified or in
    /// `pg_catalog`).
    fn reads(&self, function: &str) -> bool {
        let lower = function.to_ascii_lowercase();
        let (schema, name) = match lower.rsplit_once('.') {
            Some((schema, name)) => (Some(schema), name),
            None => (None, lower.as_str()),
        };
        self.read_only_functions.contains(&lower)
            || self.read_only_functions.contains(name)
            || (schema.is_none_or(|s| s == "pg_catalog") && READ_ONLY_VOLATILE.contains(&name))
    }
}

/// What the classifier says about a query string: its class and, for a
/// read, the functions whose volatility decides whether it stays one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub class: Class,
    /// Functions called (as written, schema-qualified when they were), not
    /// already known to write or to only read.
    pub calls: Arc<[Box<str>]>,
}

impl Verdict {
    fn of(class: Class) -> Self {
        Verdict {
            class,
            calls: Arc::from(Vec::new()),
        }
    }

    /// The class, once the functions are looked up: a read that calls a
    /// VOLATILE function, or one that `functions` does not know (or with no
    /// function catalog at all), needs the primary.
    pub fn resolve(&self, functions: Option<&Functions>) -> Class {
        if self.class != Class::Read || self.calls.is_empty() {
            return self.class;
        }
        match functions {
            Some(f) if self.calls.iter().all(|c| f.is_read_only(c)) => Class::Read,
            _ => Class::Write,
        }
    }
}

/// Statements longer than this are not parsed: they go to the primary.
/// Parsing is proportional to the text (a 100 MB multi-row INSERT would hold
/// the event loop for seconds), and when in doubt, the primary.
pub const MAX_CLASSIFIED_BYTES: usize = 256 * 1024;

/// Statements at least this long are parsed off the event loop (a 200 KiB
/// `IN` list takes a few hundred milliseconds to parse).
pub const INLINE_BYTES: usize = 8 * 1024;

/// Classifies one query string (uncached).
pub fn classify(sql: &str, rules: &Rules) -> Verdict {
    if sql.len() > MAX_CLASSIFIED_BYTES {
        return Verdict::of(Class::Write);
    }
    let Ok(parsed) = pg_query::parse(sql, 0) else {
        return Verdict::of(Class::Write);
    };
    let mut class = Class::Neutral;
    let mut read_only_tx = false;
    let mut calls = BTreeSet::new();
    for raw in &parsed.protobuf.stmts {
        let node = raw.stmt.as_ref().and_then(|s| s.node.as_ref());
        if let Some(N::VariableSetStmt(v)) = node
            && v.name == "TRANSACTION"
        {
            // The last access mode set wins.
            if let Some(ro) = access_mode(&v.args) {
                read_only_tx = ro;
            }
        }
        class = class.max(statement_class(node, rules, &mut calls));
        if class == Class::Write {
            return Verdict::of(Class::Write);
        }
    }
    // `BEGIN; SET TRANSACTION READ ONLY; …` in one string is read-only too.
    if class == Class::Begin && read_only_tx {
        class = Class::BeginReadOnly;
    }
    if class != Class::Read {
        return Verdict::of(class);
    }
    Verdict {
        class,
        calls: calls.into_iter().collect::<Vec<_>>().into(),
    }
}

/// How a statement ends a transaction block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// `COMMIT`, `END` (in an aborted transaction PostgreSQL rolls back and
    /// says `ROLLBACK`).
    Commit,
    /// `ROLLBACK`, `ABORT`.
    Rollback,
}

/// The ending `sql` is when it is exactly one plain transaction end: not
/// `AND CHAIN` (which begins the next), not a savepoint's or a prepared
/// transaction's command.
pub fn transaction_end(sql: &str) -> Option<Ending> {
    match transaction_end_chained(sql) {
        Some((ending, false)) => Some(ending),
        _ => None,
    }
}

/// [`transaction_end`], `AND CHAIN` included: the ending, and whether a new
/// transaction with the same characteristics begins at once.
pub fn transaction_end_chained(sql: &str) -> Option<(Ending, bool)> {
    // The first word rules out nearly every statement without a parse (a
    // deferred transaction's first statement passes here, on the loop).
    let ends = ["commit", "end", "rollback", "abort"];
    if sql.len() > MAX_CLASSIFIED_BYTES
        || !ends.iter().any(|w| super::opening::first_word_is(sql, w))
    {
        return None;
    }
    let parsed = pg_query::parse(sql, 0).ok()?;
    let [raw] = parsed.protobuf.stmts.as_slice() else {
        return None;
    };
    match raw.stmt.as_ref()?.node.as_ref()? {
        N::TransactionStmt(t) => match t.kind() {
            TxKind::TransStmtCommit => Some((Ending::Commit, t.chain)),
            TxKind::TransStmtRollback => Some((Ending::Rollback, t.chain)),
            _ => None,
        },
        _ => None,
    }
}

/// The class of one statement; for a read, the functions it calls go into
/// `calls` (and one known to write makes it a write).
fn statement_class(node: Option<&N>, rules: &Rules, calls: &mut BTreeSet<Box<str>>) -> Class {
    match node {
        Some(n @ (N::SelectStmt(_) | N::VariableShowStmt(_))) => match serde_json::to_value(n) {
            Ok(tree) if !writes_within(&tree, rules, calls) => Class::Read,
            _ => Class::Write,
        },
        // COPY … TO STDOUT reads: a table, or a query judged as itself
        // (`COPY (INSERT … RETURNING …) TO STDOUT` writes). COPY FROM writes;
        // COPY TO a server file or program acts on that server's host.
        Some(N::CopyStmt(c)) if !c.is_from && !c.is_program && c.filename.is_empty() => {
            match c.query.as_ref().and_then(|q| q.node.as_ref()) {
                Some(q) => statement_class(Some(q), rules, calls),
                None => Class::Read,
            }
        }
        // EXPLAIN plans without running; EXPLAIN ANALYZE runs the statement.
        Some(N::ExplainStmt(e)) if analyze_option(&e.options) => {
            statement_class(e.query.as_ref().and_then(|q| q.node.as_ref()), rules, calls)
        }
        Some(N::ExplainStmt(_)) => Class::Read,
        // A hot standby cannot run a serializable transaction (0A000):
        // one asked for, read-only or not, runs on the primary.
        Some(N::TransactionStmt(t)) if serializable_option(&t.options) => Class::Write,
        Some(N::VariableSetStmt(v)) if v.name == "TRANSACTION" && serializable_option(&v.args) => {
            Class::Write
        }
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
        // Alone, it starts the read-only part of a transaction whose BEGIN
        // tidepool deferred.
        Some(N::VariableSetStmt(v)) if v.name == "TRANSACTION" && read_only_option(&v.args) => {
            Class::BeginReadOnly
        }
        // It makes the transaction read-write, which a hot standby refuses
        // (0A000): alone, it starts the read-write part of a transaction
        // whose `BEGIN READ ONLY` tidepool deferred.
        Some(N::VariableSetStmt(v)) if sets_read_write(v) => Class::Write,
        Some(N::VariableSetStmt(_)) | Some(N::DiscardStmt(_)) | Some(N::DeallocateStmt(_)) => {
            Class::Neutral
        }
        _ => Class::Write,
    }
}

/// Walks a statement's whole parse tree: true when anything in it writes (a
/// data-modifying statement or CTE, SELECT INTO, a locking clause, a call of
/// a function known to write); other function calls go into `calls`.
fn writes_within(tree: &Value, rules: &Rules, calls: &mut BTreeSet<Box<str>>) -> bool {
    match tree {
        Value::Object(fields) => fields.iter().any(|(key, inner)| {
            let here = match key.as_str() {
                "InsertStmt" | "UpdateStmt" | "DeleteStmt" | "MergeStmt" => true,
                "SelectStmt" => {
                    !inner["into_clause"].is_null()
                        || inner["locking_clause"]
                            .as_array()
                            .is_some_and(|l| !l.is_empty())
                }
                "FuncCall" => {
                    let name = function_name(&inner["funcname"]);
                    if rules.writes(&name) {
                        true
                    } else {
                        if !rules.reads(&name) {
                            calls.insert(name.into_boxed_str());
                        }
                        false
                    }
                }
                _ => false,
            };
            here || writes_within(inner, rules, calls)
        }),
        Value::Array(items) => items.iter().any(|i| writes_within(i, rules, calls)),
        _ => false,
    }
}

/// `schema.name` (or `name`) from a FuncCall's `funcname` list.
fn function_name(funcname: &Value) -> String {
    let parts: Vec<&str> = funcname
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p["node"]["String"]["sval"].as_str())
                .collect()
        })
        .unwrap_or_default();
    parts.join(".")
}

/// `EXPLAIN (ANALYZE [true])` or `EXPLAIN ANALYZE`.
fn analyze_option(options: &[pg_query::protobuf::Node]) -> bool {
    options.iter().any(|o| match &o.node {
        Some(N::DefElem(d)) if d.defname == "analyze" => {
            match d.arg.as_ref().and_then(|a| a.node.as_ref()) {
                None => true,
                Some(N::Boolean(b)) => b.boolval,
                Some(N::String(s)) => !matches!(s.sval.as_str(), "false" | "off" | "0"),
                Some(N::AConst(c)) => !matches!(
                    &c.val,
                    Some(pg_query::protobuf::a_const::Val::Ival(i)) if i.ival == 0
                ) && !matches!(
                    &c.val,
                    Some(pg_query::protobuf::a_const::Val::Boolval(b)) if !b.boolval
                ) && !matches!(
                    &c.val,
                    Some(pg_query::protobuf::a_const::Val::Sval(s)) if matches!(s.sval.as_str(), "false" | "off")
                ),
                _ => true,
            }
        }
        _ => false,
    })
}

/// `ISOLATION LEVEL SERIALIZABLE` among a transaction's options.
fn serializable_option(options: &[pg_query::protobuf::Node]) -> bool {
    options.iter().any(|o| match &o.node {
        Some(N::DefElem(d)) if d.defname == "transaction_isolation" => matches!(
            d.arg.as_ref().and_then(|a| a.node.as_ref()),
            Some(N::AConst(c)) if matches!(
                &c.val,
                Some(pg_query::protobuf::a_const::Val::Sval(s)) if s.sval.eq_ignore_ascii_case("serializable")
            )
        ),
        _ => false,
    })
}

/// `SET TRANSACTION READ WRITE`, or `transaction_read_only` set (or reset)
/// to anything but a true value: the transaction may write.
fn sets_read_write(v: &pg_query::protobuf::VariableSetStmt) -> bool {
    use pg_query::protobuf::a_const::Val;
    if v.name == "TRANSACTION" {
        return access_mode(&v.args) == Some(false);
    }
    if !v.name.eq_ignore_ascii_case("transaction_read_only") {
        return false;
    }
    // PostgreSQL's parse_bool: a prefix of `true` or `yes`, `on`, `1`.
    let truthy = |s: &str| {
        let s = s.to_ascii_lowercase();
        (!s.is_empty() && ("true".starts_with(&s) || "yes".starts_with(&s)))
            || s == "on"
            || s == "1"
    };
    let value = v.args.first().and_then(|a| match &a.node {
        Some(N::AConst(c)) => c.val.as_ref(),
        _ => None,
    });
    !matches!(value, Some(Val::Sval(s)) if truthy(&s.sval))
        && !matches!(value, Some(Val::Ival(i)) if i.ival == 1)
        && !matches!(value, Some(Val::Boolval(b)) if b.boolval)
}

fn read_only_option(options: &[pg_query::protobuf::Node]) -> bool {
    access_mode(options) == Some(true)
}

/// The access mode the options set, the last one given winning as in
/// PostgreSQL (`READ ONLY, READ WRITE` is read-write): Some(true) for read
/// only, Some(false) for read write, None when they set none.
fn access_mode(options: &[pg_query::protobuf::Node]) -> Option<bool> {
    use pg_query::protobuf::a_const::Val;
    options.iter().fold(None, |mode, o| match &o.node {
        Some(N::DefElem(d)) if d.defname == "transaction_read_only" => {
            match d.arg.as_ref().and_then(|a| a.node.as_ref()) {
                Some(N::AConst(c)) => match &c.val {
                    Some(Val::Ival(i)) => Some(i.ival == 1),
                    _ => mode,
                },
                _ => mode,
            }
        }
        Some(N::AConst(c)) => match &c.val {
            Some(Val::Sval(s)) if s.sval.eq_ignore_ascii_case("read only") => Some(true),
            Some(Val::Sval(s)) if s.sval.eq_ignore_ascii_case("read write") => Some(false),
            _ => mode,
        },
        _ => mode,
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
    shards: Vec<Mutex<HashMap<u128, Verdict>>>,
    keys: (u64, u64),
    /// Classifications answered from the cache, and parsed.
    hits: std::sync::atomic::AtomicU64,
    misses: std::sync::atomic::AtomicU64,
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
            hits: Default::default(),
            misses: Default::default(),
        }
    }

    /// (answered from the cache, parsed) since this classifier was made.
    pub fn counts(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.hits.load(Relaxed), self.misses.load(Relaxed))
    }

    fn key(&self, sql: &str) -> u128 {
        use siphasher::sip128::Hasher128;
        let mut h = siphasher::sip128::SipHasher13::new_with_keys(self.keys.0, self.keys.1);
        h.write(sql.as_bytes());
        h.finish128().as_u128()
    }

    /// Whether `sql`'s verdict is cached (no parse needed).
    /// Whether classifying `sql` now would parse a long text (one not in
    /// the cache, from [`INLINE_BYTES`] up to [`MAX_CLASSIFIED_BYTES`]):
    /// work to do off the event loop.
    pub fn would_parse_long(&self, sql: &str) -> bool {
        (INLINE_BYTES..=MAX_CLASSIFIED_BYTES).contains(&sql.len()) && !self.is_cached(sql)
    }

    pub fn is_cached(&self, sql: &str) -> bool {
        let key = self.key(crate::stats::trace::without_edge_comments(sql));
        self.shards[(key as usize) % SHARDS]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(&key)
    }

    pub fn classify(&self, sql: &str) -> Verdict {
        // A comment at either edge (sqlcommenter's trace context, unique
        // per query) changes nothing about the statement: not its key.
        let sql = crate::stats::trace::without_edge_comments(sql);
        let key = self.key(sql);
        let shard = &self.shards[(key as usize) % SHARDS];
        if let Some(v) = shard
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
        {
            self.hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return v.clone();
        }
        self.misses
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let verdict = classify(sql, &self.rules);
        let mut map = shard.lock().unwrap_or_else(PoisonError::into_inner);
        if map.len() >= SHARD_CAPACITY {
            map.clear();
        }
        map.insert(key, verdict.clone());
        verdict
    }
}

#[cfg(test)]
mod tests;
