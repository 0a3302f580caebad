//! Issue 17's routing corpus, checked against a real standby: hundreds of
//! statements, each first validated directly (a write fails on the standby
//! and runs on the primary; a read runs on the standby), then run through
//! tidepool configured like the shipped `proxy.toml` (console users `admin`
//! and `stats` that do not exist on the server, no `health_user`). No write
//! may reach the replica, at least 95 % of the reads must be served by it,
//! and no statement may fail.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use harness::{APP_PASSWORD, APP_USER, TestProxy};

const DEADLINE: Duration = Duration::from_secs(60);

const SCHEMA: &str = "
create table t (id int primary key, v text);
insert into t values (1, 'a'), (2, 'b');
create table events (id bigserial primary key, msg text);
create sequence seq;
create sequence invoice_seq;
create function log_event(msg text) returns bigint language plpgsql as
  $$ declare i bigint; begin insert into events (msg) values (msg) returning id into i; return i; end $$;
create function log_event_sql(msg text) returns bigint language sql as
  $$ insert into events (msg) values (msg) returning id $$;
create function next_invoice_no() returns bigint language sql as
  $$ select nextval('invoice_seq') $$;
create function pure_add(a int, b int) returns int language sql immutable as $$ select a + b $$;
create function stable_count() returns bigint language sql stable as $$ select count(*) from t $$;
";

/// Calls that write (each fails on a standby).
const WRITING_CALLS: &[&str] = &[
    "log_event('x')",
    "log_event(msg => 'x')",
    "public.log_event('x')",
    "log_event_sql('x')",
    "next_invoice_no()",
    "nextval('seq')",
    "setval('seq', 100)",
    "txid_current()",
];

/// Calls that only read (each runs on a standby).
const READING_CALLS: &[&str] = &[
    "lower('A')",
    "now()",
    "pure_add(1, 2)",
    "stable_count()",
    "random()",
    "clock_timestamp()",
    "length('abc')",
    "pg_is_in_recovery()",
    "gen_random_uuid()",
];

/// Places a call can stand, `{f}` being the call.
const PLACES: &[&str] = &[
    "select {f}",
    "SELECT {f} AS v",
    "select * from (select {f}) s",
    "select 1 where {f} is not null",
    "select case when true then {f} end",
    "select coalesce(null, {f})",
    "select (select {f})",
    "with a as (select {f} as v) select * from a",
    "select * from t, lateral (select {f}) l",
    "select 1 union all select 1 where {f} is not null",
    "select count({f})",
    "select * from t join (values (1)) b(y) on {f} is not null",
    "values ({f})",
    "values (1), (2) except select 3 where {f} is null",
    "select 1 order by {f}",
    "select 1 group by {f}",
    "select 1 having {f} is not null",
    "select exists (select 1 where {f} is not null)",
    "select 1 where 1 in (select 1 where {f} is not null)",
    "select array[{f}]",
    "select row({f})",
    "select count(*) over (order by {f})",
    "select {f} from t where id = 1",
    "select 1 limit (select 1 where {f} is not null)",
    "select 1; select {f}",
    "/*x*/SELECT {f}",
    "SELECT/**/{f}",
    "explain analyze select {f}",
    "explain (analyze, costs off) select {f}",
];

/// Statements that write without a function.
const PLAIN_WRITES: &[&str] = &[
    "insert into events (msg) values ('w')",
    "insert into events (msg) select 'w' returning id",
    "update t set v = v where id = 1",
    "update t set v = v returning *",
    "delete from events where id < 0",
    "delete from events where false returning *",
    "merge into t using (values (1)) s(id) on t.id = s.id when matched then update set v = t.v",
    "with d as (delete from events where id < 0 returning *) select * from d",
    "with i as (insert into events (msg) values ('cte') returning id) select id from i",
    "select * from t for update",
    "select * from t where id = 1 for share",
    "select * from t for no key update skip locked",
    "create table if not exists ddl_made (a int)",
    "drop table if exists ddl_dropped",
    "create index if not exists t_v on t (v)",
    "alter table t alter column v set default 'd'",
    "comment on table t is 'corpus'",
    "truncate table ddl_made",
    "grant select on t to public",
    "create or replace view tv as select * from t",
    "create table if not exists ddl_as as select 1 as a",
    "select 1; insert into events (msg) values ('multi')",
    "select 1; update t set v = v where id = 2",
    "/*x*/INSERT INTO events (msg) VALUES ('c')",
    "explain analyze insert into events (msg) values ('e')",
    "explain (analyze) update t set v = v where id = 1",
    "explain analyze create table if not exists ddl_explained as select 1",
    "vacuum t",
    "analyze t",
    "cluster t using t_pkey",
    "reindex table t",
    "begin; lock table t in share mode; commit",
    "select setval('seq', 5, true)",
    "do $$ begin perform log_event('do'); end $$",
    "refresh materialized view mv",
    "select nextval('seq'); select 1",
    "notify corpus_channel",
    "listen corpus_channel",
    "select pg_current_wal_lsn()",
];

/// Statements that read without a call.
const PLAIN_READS: &[&str] = &[
    "select 1",
    "select * from t",
    "select * from t where id = 1",
    "SELECT v FROM t ORDER BY id DESC LIMIT 1",
    "select t.*, e.msg from t left join events e on e.id = t.id",
    "select count(*) from t",
    "select count(*) from events",
    "with x as (select * from t) select * from x",
    "select * from t where id in (select id from t)",
    "table t",
    "values (1), (2)",
    "show search_path",
    "select 1; select 2",
    "/* comment */ select 1",
    "explain select * from t",
    "explain insert into events (msg) values ('planned only')",
    "explain select log_event('not run')",
    "select relname from pg_class where relname = 't'",
    "select current_setting('search_path')",
    "select 'log_event(''x'')' as text_not_a_call",
    "select $$ insert into t values (1) $$",
    "select 1 -- ; insert into t values (1)",
];

fn corpus() -> (Vec<String>, Vec<String>) {
    let mut writes: Vec<String> = PLAIN_WRITES.iter().map(|s| s.to_string()).collect();
    let mut reads: Vec<String> = PLAIN_READS.iter().map(|s| s.to_string()).collect();
    for place in PLACES {
        for f in WRITING_CALLS {
            writes.push(place.replace("{f}", f));
        }
        for f in READING_CALLS {
            reads.push(place.replace("{f}", f));
        }
    }
    (writes, reads)
}

async fn outcome(c: &tokio_postgres::Client, sql: &str) -> Result<(), String> {
    c.simple_query(sql)
        .await
        .map(|_| ())
        .map_err(|e| match e.as_db_error() {
            Some(db) => format!("{} {}", db.code().code(), db.message()),
            None => e.to_string(),
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_write_reaches_the_replica_and_reads_use_it() {
    let cluster = harness::cluster_with_replica();
    let db = tokio::task::spawn_blocking(move || cluster.create_database("corpus"))
        .await
        .unwrap();
    let primary = harness::connect(&cluster.app_url(&db)).await.unwrap();
    primary.batch_execute(SCHEMA).await.unwrap();
    primary
        .batch_execute("create materialized view mv as select 1 as a")
        .await
        .unwrap();
    let standby_url = standby_url(cluster, &db);
    wait_for_standby(
        &standby_url,
        "select count(*) from pg_proc where proname = 'stable_count'",
    )
    .await;
    let standby = harness::connect(&standby_url).await.unwrap();

    // The corpus means what it says: directly, every write fails on the
    // standby and runs on the primary, every read runs on the standby.
    let (writes, reads) = corpus();
    assert!(
        writes.len() + reads.len() >= 450,
        "{} statements",
        writes.len() + reads.len()
    );
    let mut wrong = Vec::new();
    for sql in &writes {
        if outcome(&standby, sql).await.is_ok() {
            wrong.push(format!("write runs on the standby: {sql}"));
        }
        // A write failing inside its own BEGIN leaves a failed transaction.
        let _ = standby.simple_query("rollback").await;
        if let Err(e) = outcome(&primary, sql).await {
            wrong.push(format!("write fails on the primary ({e}): {sql}"));
        }
    }
    for sql in &reads {
        if let Err(e) = outcome(&standby, sql).await {
            wrong.push(format!("read fails on the standby ({e}): {sql}"));
        }
    }
    assert!(wrong.is_empty(), "corpus errors:\n{}", wrong.join("\n"));

    // tidepool, configured like the shipped proxy.toml.
    let toml = format!(
        r#"
[tidepool]
listen = ["127.0.0.1:0"]
admin_users = ["admin"]
stats_users = ["stats"]

[pool]
default_pool_size = 4

[databases.{db}]
host = "127.0.0.1"
port = {port}
replicas = [{{ host = "127.0.0.1", port = {replica} }}]

[users.app]
password = "{APP_PASSWORD}"

[users.admin]
password = "admin"

[users.stats]
password = "stats"

[routing]
health_check_period = "200ms"
"#,
        port = cluster.primary_port(),
        replica = cluster.replica_ports()[0],
    );
    let proxy = TestProxy::start(&toml);
    let reader = proxy.client(&db).await;
    harness::wait_until_async("reads to reach the replica", DEADLINE, || async {
        let rows = reader
            .simple_query("select pg_is_in_recovery()::text")
            .await
            .unwrap();
        rows.iter().any(
            |m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("true")),
        )
    })
    .await;
    let health = proxy.shared.registry.health(&db).unwrap();
    harness::wait_until_async("function volatilities to load", DEADLINE, || async {
        health.functions.load().is_some()
    })
    .await;
    let on_replica =
        || health.replicas[0].reads.load(Relaxed) + health.replicas[0].writes.load(Relaxed);

    let mut failures = Vec::new();
    let mut on_primary = Vec::new();
    for sql in &reads {
        let before = on_replica();
        if let Err(e) = outcome(&reader, sql).await {
            failures.push(format!("read failed ({e}): {sql}"));
        }
        if on_replica() == before {
            on_primary.push(sql.as_str());
        }
    }
    // Each write from a client of its own: read-your-writes keeps a
    // client's statements on the primary for a while after it wrote, which
    // would hide a misrouted write.
    let mut writes_on_replica = Vec::new();
    for sql in &writes {
        let writer = proxy.client(&db).await;
        let before = on_replica();
        if let Err(e) = outcome(&writer, sql).await {
            failures.push(format!("write failed ({e}): {sql}"));
        }
        if on_replica() != before {
            writes_on_replica.push(sql.as_str());
        }
    }
    assert!(
        failures.is_empty(),
        "failures through tidepool:\n{}",
        failures.join("\n")
    );
    assert!(
        writes_on_replica.is_empty(),
        "writes sent to the replica:\n{}",
        writes_on_replica.join("\n")
    );
    let served = reads.len() - on_primary.len();
    println!(
        "{} writes, none on the replica; {served} of {} reads served by the replica",
        writes.len(),
        reads.len()
    );
    assert!(
        served * 100 >= reads.len() * 95,
        "{served} of {} reads served by the replica; on the primary:\n{}",
        reads.len(),
        on_primary.join("\n")
    );
}

/// With only a console user to log in as (unknown to the server), health
/// checks fail and every surface says why, in the server's own words: SHOW
/// REPLICAS' reason, SHOW DATABASES' status, the metric.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_health_check_says_why() {
    let cluster = harness::cluster_with_replica();
    let db = tokio::task::spawn_blocking(move || cluster.create_database("why"))
        .await
        .unwrap();
    let toml = format!(
        r#"
[tidepool]
listen = ["127.0.0.1:0"]
admin_users = ["admin"]

[databases.{db}]
host = "127.0.0.1"
port = {port}
replicas = [{{ host = "127.0.0.1", port = {replica} }}]

[users.admin]
password = "admin"

[routing]
health_check_period = "200ms"
"#,
        port = cluster.primary_port(),
        replica = cluster.replica_ports()[0],
    );
    let proxy = TestProxy::start(&toml);
    let health = proxy.shared.registry.health(&db).unwrap();
    harness::wait_until_async("the replica's problem to be known", DEADLINE, || async {
        health.replicas[0]
            .problem()
            .is_some_and(|p| p.kind == "login_failed")
    })
    .await;
    let console_url = proxy.url_as("admin", Some("admin"), "pgbouncer");
    let replicas = harness::console(&console_url, "SHOW REPLICAS").await;
    let reason = &replicas[1]["reason"];
    assert!(
        reason.starts_with("login_failed: ")
            && reason.contains("(SQLSTATE 28P01)")
            && reason.contains("\"admin\""),
        "{replicas:?}"
    );
    let databases = harness::console(&console_url, "SHOW DATABASES").await;
    let replica_row = databases
        .iter()
        .find(|r| r["name"] == format!("{db}@replica1"))
        .expect("replica row");
    assert!(
        replica_row["status"].starts_with("down: login_failed: "),
        "{replica_row:?}"
    );
    let (ready, body) = tidepool::http::ready(&proxy.shared).await;
    assert!(ready, "replicas do not decide readiness: {body}");
    assert!(
        body.lines().any(
            |l| l.starts_with(&format!("{db}: replica ")) && l.contains("down: login_failed: ")
        ),
        "{body}"
    );
    let metrics = tidepool::http::metrics::render(&proxy.shared).unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("tidepool_backend_down{")
                && l.contains("reason=\"login_failed\"")
                && l.contains(&format!("database=\"{db}@replica1\""))),
        "{metrics}"
    );
}

/// The safety net: a read that writes where tidepool cannot see it (a view
/// over a writing function) is refused by the replica (25006); tidepool runs
/// it again on the primary before the client sees anything, counts it, and
/// sends the statement straight to the primary from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_the_replica_refuses_runs_again_on_the_primary() {
    let cluster = harness::cluster_with_replica();
    let db = tokio::task::spawn_blocking(move || cluster.create_database("misroute"))
        .await
        .unwrap();
    let primary = harness::connect(&cluster.app_url(&db)).await.unwrap();
    primary.batch_execute(SCHEMA).await.unwrap();
    primary
        .batch_execute("create view writes_when_read as select log_event('view') as id")
        .await
        .unwrap();
    wait_for_standby(
        &standby_url(cluster, &db),
        "select count(*) from pg_views where viewname = 'writes_when_read'",
    )
    .await;
    let proxy = TestProxy::start(&format!(
        "{}\n[routing]\nhealth_check_period = \"200ms\"\n",
        harness::proxy::config_toml(
            cluster,
            &db,
            "default_pool_size = 2",
            &format!(
                "replicas = [{{ host = \"127.0.0.1\", port = {} }}]",
                cluster.replica_ports()[0]
            )
        )
    ));
    let c = proxy.client(&db).await;
    harness::wait_until_async("reads to reach the replica", DEADLINE, || async {
        let rows = c
            .simple_query("select pg_is_in_recovery()::text")
            .await
            .unwrap();
        rows.iter().any(
            |m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("true")),
        )
    })
    .await;
    let retries = || proxy.shared.stats.traffic(&db, 1).totals().misroute_retries;
    let events = || async {
        let rows = primary
            .query("select count(*) from events where msg = 'view'", &[])
            .await
            .unwrap();
        rows[0].get::<_, i64>(0)
    };
    // Simple protocol, then extended (an unnamed statement: the net covers
    // messages tidepool forwards as they are); each runs once, on the
    // primary.
    let rows = c
        .simple_query("select id from writes_when_read")
        .await
        .unwrap();
    assert_eq!(harness::rows(rows).len(), 1);
    assert_eq!(retries(), 1, "counted on the replica's row");
    assert_eq!(events().await, 1, "ran once");
    let again = proxy.client(&db).await;
    let rows = typed(&again).await.unwrap();
    assert!(rows[0].get::<_, i64>(0) > 0);
    assert_eq!(retries(), 2);
    assert_eq!(events().await, 2);
    // Remembered: the same statements go straight to the primary.
    for _ in 0..3 {
        c.simple_query("select id from writes_when_read")
            .await
            .unwrap();
        typed(&again).await.unwrap();
    }
    assert_eq!(retries(), 2, "no more retries");
    assert_eq!(events().await, 8);
    // A read that only reads still goes to the replica (from a client that
    // did not just write: read-your-writes).
    let c = proxy.client(&db).await;
    let rows = c
        .simple_query("select pg_is_in_recovery()::text")
        .await
        .unwrap();
    assert!(rows.iter().any(
        |m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("true"))
    ));
}

/// The view read through an unnamed statement (Parse, Bind, Describe,
/// Execute, Sync in one write).
async fn typed(
    c: &tokio_postgres::Client,
) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
    c.query_typed(
        "select id from writes_when_read where id > $1",
        &[(&0i64, tokio_postgres::types::Type::INT8)],
    )
    .await
}

fn standby_url(cluster: &harness::Cluster, db: &str) -> String {
    harness::url(cluster.replica_ports()[0], APP_USER, Some(APP_PASSWORD), db)
}

/// Waits until `count_sql` (a count) answers 1 on the standby: it replayed
/// what the test created on the primary.
async fn wait_for_standby(url: &str, count_sql: &str) {
    harness::wait_until_async("the standby to replay the schema", DEADLINE, || async {
        match harness::connect(url).await {
            Ok(s) => s.simple_query(count_sql).await.is_ok_and(|r| {
                r.iter().any(|m| {
                    matches!(m, tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("1"))
                })
            }),
            Err(_) => false,
        }
    })
    .await;
}
