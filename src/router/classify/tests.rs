//! The classifier's cases.

use super::*;

/// A catalog like a database's: a few read-only functions and the
/// issue's writing ones.
fn functions() -> Functions {
    Functions::from_rows([
        ("pg_catalog", "count", false),
        ("pg_catalog", "lower", false),
        ("pg_catalog", "now", false),
        ("pg_catalog", "coalesce_like", false),
        ("pg_catalog", "generate_series", false),
        ("pg_catalog", "jsonb_build_object", false),
        ("public", "log_event", true),
        ("public", "next_invoice_no", true),
        ("public", "pure_add", false),
    ])
}

fn c(sql: &str) -> Class {
    classify(sql, &Rules::default()).resolve(Some(&functions()))
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
        assert_eq!(cached.classify(&just).class, Class::Read);
        assert_eq!(cached.classify(&over).class, Class::Write);
        assert_eq!(cached.classify("select 1").class, Class::Read);
        assert_eq!(
            cached.classify("insert into t values (1)").class,
            Class::Write
        );
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
        "copy t to stdout",
        "COPY t (a, b) TO STDOUT WITH (FORMAT csv)",
        "copy (select * from t where a > 1) to stdout",
        "copy (values (1)) to stdout",
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
        "copy t to '/tmp/t.csv'",
        "copy t to program 'cat'",
        "copy (select * from t) to '/tmp/t.csv'",
        "copy (insert into t values (1) returning *) to stdout",
        "copy (select nextval('s')) to stdout",
        "copy (select * from t for update) to stdout",
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
    // The last access mode wins, as in PostgreSQL.
    assert_eq!(c("BEGIN TRANSACTION READ ONLY, READ WRITE"), Class::Begin);
    assert_eq!(c("begin read write, read only"), Class::BeginReadOnly);
    assert_eq!(
        c("BEGIN; SET TRANSACTION READ ONLY; SET TRANSACTION READ WRITE; SELECT 1"),
        Class::Write
    );
    assert_eq!(
        c(
            "BEGIN; SET TRANSACTION READ ONLY; SET TRANSACTION ISOLATION LEVEL REPEATABLE READ; SELECT 1"
        ),
        Class::BeginReadOnly
    );
    assert_eq!(c("start transaction read only"), Class::BeginReadOnly);
    assert_eq!(
        c("begin isolation level repeatable read, read only"),
        Class::BeginReadOnly
    );
    assert_eq!(c("begin read write"), Class::Begin);
    assert_eq!(
        c("begin; set transaction read only; select 1"),
        Class::BeginReadOnly
    );
    assert_eq!(
        c("begin; set transaction read write; select 1"),
        Class::Write
    );
    // Making a transaction read-write is a write: a hot standby refuses it
    // (after a deferred `BEGIN READ ONLY` it decides the backend).
    for sql in [
        "set transaction read write",
        "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ WRITE",
        "set transaction_read_only = off",
        "set local transaction_read_only to false",
        "SET transaction_read_only = 0",
        "set transaction_read_only = 'n'",
        "set transaction_read_only to default",
        "reset transaction_read_only",
        "set transaction_read_only = bogus",
    ] {
        assert_eq!(c(sql), Class::Write, "{sql}");
    }
    for sql in [
        "set transaction_read_only = on",
        "SET transaction_read_only TO true",
        "set transaction_read_only = 't'",
        "set transaction_read_only = yes",
        "set transaction_read_only = 1",
        "set session characteristics as transaction read write",
        "set default_transaction_read_only = off",
    ] {
        assert_eq!(c(sql), Class::Neutral, "{sql}");
    }
    assert_eq!(
        c("begin; set transaction read only; insert into t values (1)"),
        Class::Write
    );
    assert_eq!(c("commit"), Class::Neutral);
    assert_eq!(c("set search_path = a"), Class::Neutral);
    assert_eq!(c("set transaction read only"), Class::BeginReadOnly);
    // A standby cannot run serializable transactions.
    for sql in [
        "BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY",
        "begin transaction isolation level serializable, read only, deferrable",
        "start transaction read only isolation level serializable",
        "set transaction isolation level serializable, read only",
        "BEGIN; SET TRANSACTION ISOLATION LEVEL SERIALIZABLE READ ONLY",
        "begin isolation level serializable",
    ] {
        assert_eq!(c(sql), Class::Write, "{sql}");
    }
    assert_eq!(
        c("begin isolation level repeatable read read only"),
        Class::BeginReadOnly
    );
    assert_eq!(
        c("set transaction isolation level serializable"),
        Class::Write
    );
    assert_eq!(
        c("set transaction isolation level read committed"),
        Class::Neutral
    );
}

#[test]
fn strict_mode_and_extra_functions() {
    let mut rules = Rules::default();
    rules.write_functions.insert("my_writer".into());
    rules.read_only_functions.insert("my_reader".into());
    let f = functions();
    let r = |sql: &str, rules: &Rules| classify(sql, rules).resolve(Some(&f));
    assert_eq!(r("select my_writer()", &rules), Class::Write);
    assert_eq!(r("select my_reader()", &rules), Class::Read);
    assert_eq!(r("select public.my_reader()", &rules), Class::Read);
    assert_eq!(r("select unknown_fn()", &rules), Class::Write);
    rules.strict = true;
    assert_eq!(r("select pure_add(1, 2)", &rules), Class::Write);
    assert_eq!(r("select count(*) from t", &rules), Class::Read);
}

#[test]
fn volatile_or_unknown_functions_anywhere_need_the_primary() {
    for sql in [
        "SELECT log_event('x')",
        "SELECT * FROM log_event('x')",
        "select log_event(msg => 'x')",
        "select * from t where id = log_event('x')",
        "select case when true then log_event('x') end",
        "select coalesce(null, log_event('x'))",
        "select (select log_event('x'))",
        "with a as (select log_event('x')) select * from a",
        "select * from t, lateral (select log_event(t.a)) l",
        "select 1 union all select log_event('x')",
        "select count(log_event('x')) from t",
        "select * from t join u on t.id = log_event('y')",
        "VALUES (log_event('x'))",
        "values (1), (log_event('x'))",
        "SELECT next_invoice_no()",
        "VALUES (nextval('seq'))",
        "select * from t order by log_event('x')",
        "select * from t limit log_event('x')",
        "select array[log_event('x')]",
        "select row(log_event('x'))",
        "select log_event('x') over ()",
        "select * from t group by log_event('x')",
        "select * from t where exists (select log_event('x'))",
        "select * from t where a in (select log_event('x'))",
        "select 1; select log_event('x')",
        "SELECT 1; SELECT log_event('x')",
        "/*x*/SELECT log_event('x')",
        "SELECT/**/log_event('x')",
        "explain analyze select log_event('x')",
        "explain (analyze) select log_event('x')",
        "explain (analyze true, buffers) select log_event('x')",
        "explain analyze create table x as select 1",
        "explain analyze insert into t values (1)",
        "select some_unknown_function()",
        "select public.log_event('x')",
        "select \"log_event\"('x')",
        "select txid_current()",
        "select pg_current_wal_lsn()",
    ] {
        assert_eq!(c(sql), Class::Write, "{sql}");
    }
}

#[test]
fn reads_calling_read_only_functions_stay_reads() {
    for sql in [
        "select count(*) from t",
        "select lower(name), now() from t",
        "select * from generate_series(1, 3) g(i)",
        "select pure_add(1, 2)",
        "select pg_catalog.lower('A')",
        "select random(), clock_timestamp(), gen_random_uuid()",
        "select pg_sleep(0)",
        "select pg_is_in_recovery()",
        "explain select log_event('x')",
        "explain (analyze false) select log_event('x')",
        "select jsonb_build_object('a', 1)",
    ] {
        assert_eq!(c(sql), Class::Read, "{sql}");
    }
    // Without a catalog, a read that calls a function needs the primary;
    // one that calls none does not.
    assert_eq!(
        classify("select lower('a')", &Rules::default()).resolve(None),
        Class::Write
    );
    assert_eq!(
        classify("select * from t where a = 1", &Rules::default()).resolve(None),
        Class::Read
    );
}

#[test]
fn the_cache_returns_the_same_answer() {
    let cl = Classifier::new(Rules::default());
    assert_eq!(cl.classify("select 1").class, Class::Read);
    assert_eq!(cl.classify("select 1").class, Class::Read);
    assert_eq!(cl.classify("insert into t values (1)").class, Class::Write);
}

#[test]
fn plain_transaction_ends_are_told_apart_from_look_alikes() {
    for sql in [
        "commit",
        "END",
        "commit work;",
        " COMMIT TRANSACTION ",
        "commit and no chain",
        "/* c */ commit",
    ] {
        assert_eq!(transaction_end(sql), Some(Ending::Commit), "{sql}");
    }
    for sql in [
        "rollback",
        "ABORT",
        "rollback work",
        "rollback transaction;",
    ] {
        assert_eq!(transaction_end(sql), Some(Ending::Rollback), "{sql}");
    }
    for sql in [
        "commit and chain",
        "rollback and chain",
        "rollback to savepoint a",
        "rollback to a",
        "commit prepared 'x'",
        "rollback prepared 'x'",
        "release savepoint a",
        "commit; commit",
        "select 1",
        "",
        "begin",
    ] {
        assert_eq!(transaction_end(sql), None, "{sql}");
    }
    assert_eq!(
        transaction_end_chained("commit and chain"),
        Some((Ending::Commit, true))
    );
    assert_eq!(
        transaction_end_chained("ROLLBACK WORK AND CHAIN;"),
        Some((Ending::Rollback, true))
    );
    assert_eq!(
        transaction_end_chained("rollback and no chain"),
        Some((Ending::Rollback, false))
    );
    assert_eq!(transaction_end_chained("rollback to a"), None);
}
