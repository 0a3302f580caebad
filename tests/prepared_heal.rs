//! Prepared statements heal after a migration changes their result: the
//! client that used the stale statement gets PostgreSQL's own 0A000 once,
//! its re-prepare works, and so does every other client's (issue 24's
//! "fails forever" outage). A client that still holds the old row shape
//! never receives rows of the new one: it gets the 0A000 PostgreSQL would
//! give it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use harness::TestProxy;

const SELECT: &str = "select * from t where id = $1";

fn code(e: &tokio_postgres::Error) -> String {
    e.code().map(|c| c.code().to_owned()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_heal_after_a_migration_changes_their_result() {
    let cluster = harness::cluster();
    let db = tokio::task::spawn_blocking(move || cluster.create_database("heal"))
        .await
        .unwrap();
    let admin = cluster.admin_client(&db).await;
    admin
        .batch_execute(
            "create table t (id int primary key, v text);
             insert into t values (1, 'a');
             grant all on t to public;",
        )
        .await
        .unwrap();
    let proxy = TestProxy::for_db(cluster, &db, "default_pool_size = 2");

    // Four clients on two servers prepare the statement and use it, so that
    // both servers hold it.
    let mut clients = Vec::new();
    for _ in 0..4 {
        let c = proxy.client(&db).await;
        let s = c.prepare(SELECT).await.unwrap();
        assert_eq!(c.query(&s, &[&1i32]).await.unwrap()[0].len(), 2);
        clients.push((c, s));
    }
    admin
        .batch_execute("alter table t add column extra int not null default 7")
        .await
        .unwrap();

    // Each client's old statement fails as PostgreSQL fails it (for as long
    // as it uses it), never with rows of three columns; after preparing
    // again it sees the new row.
    for (i, (c, old)) in clients.iter().enumerate() {
        for attempt in 0..2 {
            match c.query(old, &[&1i32]).await {
                Err(e) => assert_eq!(code(&e), "0A000", "client {i}, attempt {attempt}: {e:?}"),
                Ok(rows) => panic!(
                    "client {i}, attempt {attempt}: rows of {} columns for a statement described with 2",
                    rows[0].len()
                ),
            }
        }
        let fresh = c.prepare(SELECT).await.unwrap();
        for _ in 0..3 {
            let rows = c.query(&fresh, &[&1i32]).await.unwrap();
            assert_eq!(rows[0].len(), 3, "client {i} after preparing again");
            assert_eq!(rows[0].get::<_, i32>(2), 7);
        }
    }
    // A new client never sees the old plan.
    let late = proxy.client(&db).await;
    for _ in 0..4 {
        let s = late.prepare(SELECT).await.unwrap();
        assert_eq!(late.query(&s, &[&1i32]).await.unwrap()[0].len(), 3);
    }

    let totals = proxy.shared.stats.traffic(&db, 0).totals();
    assert!(
        totals.prepared_invalidations >= 1,
        "invalidations counted: {totals:?}"
    );
    assert!(
        totals.prepared_reprepares >= 1,
        "re-prepares counted: {totals:?}"
    );
}

/// Runs `sql` on a client; a failure is the test's failure.
async fn exec(c: &tokio_postgres::Client, sql: &str) {
    c.batch_execute(sql).await.unwrap();
}

/// A statement used on a server that never had it, prepared there after a
/// migration nobody told tidepool about, gives the client PostgreSQL's
/// 0A000, never rows of a shape its driver does not expect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_prepared_afresh_on_another_server_keeps_its_row_shape() {
    let cluster = harness::cluster();
    let db = tokio::task::spawn_blocking(move || cluster.create_database("reshape"))
        .await
        .unwrap();
    let admin = cluster.admin_client(&db).await;
    exec(
        &admin,
        "create table t (id int primary key, v text);
         insert into t values (1, 'a');
         grant all on t to public;",
    )
    .await;
    let proxy = TestProxy::for_db(cluster, &db, "default_pool_size = 2");
    let a = proxy.client(&db).await;
    let holder = proxy.client(&db).await;
    let other = proxy.client(&db).await;

    // `holder` keeps one server, so `a` prepares on the other one (P2).
    exec(&holder, "begin; select 1").await;
    let old = a.prepare(SELECT).await.unwrap();
    assert_eq!(a.query(&old, &[&1i32]).await.unwrap()[0].len(), 2);
    // `other` takes P2 (the only free one); `holder` gives P1 back.
    exec(&other, "begin; select 1").await;
    exec(&holder, "commit").await;
    admin
        .batch_execute("alter table t add column extra int not null default 7")
        .await
        .unwrap();
    // `a` now runs on P1, which never had the statement: prepared there
    // afresh, it would give three columns.
    for attempt in 0..2 {
        match a.query(&old, &[&1i32]).await {
            Err(e) => assert_eq!(code(&e), "0A000", "attempt {attempt}: {e:?}"),
            Ok(rows) => panic!(
                "attempt {attempt}: rows of {} columns for a statement described with 2",
                rows[0].len()
            ),
        }
    }
    let fresh = a.prepare(SELECT).await.unwrap();
    assert_eq!(a.query(&fresh, &[&1i32]).await.unwrap()[0].len(), 3);
    exec(&other, "commit").await;
    // On P2 (which has the statement from before) too.
    for _ in 0..3 {
        assert_eq!(a.query(&fresh, &[&1i32]).await.unwrap()[0].len(), 3);
    }
}

/// What one step of the migration workload gave a client.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Columns(usize),
    Error(String),
}

async fn run(c: &tokio_postgres::Client, s: &tokio_postgres::Statement) -> Outcome {
    match c.query(s, &[&1i32]).await {
        Ok(rows) => Outcome::Columns(rows.first().map_or(0, |r| r.len())),
        Err(e) => Outcome::Error(code(&e)),
    }
}

/// The same migrations, run by the clients themselves, directly and through
/// tidepool (pool of 2 for 4 clients): the same outcome at every step. DDL
/// that tidepool forwards makes every server prepare its statements afresh:
/// a statement whose rows did not change runs on without an error, one whose
/// rows changed fails with 0A000 for each client that holds the old shape,
/// as PostgreSQL fails it, and a type dropped and created again is never
/// looked up by its old identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_through_tidepool_answer_as_postgresql_does() {
    let cluster = harness::cluster();
    let mut outcomes = Vec::new();
    for through_tidepool in [false, true] {
        let db = tokio::task::spawn_blocking(move || cluster.create_database("migrate"))
            .await
            .unwrap();
        let direct = cluster.app_url(&db);
        let setup = harness::connect(&direct).await.unwrap();
        exec(
            &setup,
            "create type mood as enum ('calm', 'busy');
             create table t (id int primary key, v text, m mood default 'calm');
             insert into t values (1, 'a');",
        )
        .await;
        let proxy =
            through_tidepool.then(|| TestProxy::for_db(cluster, &db, "default_pool_size = 2"));
        let mut clients = Vec::new();
        for _ in 0..4 {
            clients.push(match &proxy {
                Some(p) => p.client(&db).await,
                None => harness::connect(&direct).await.unwrap(),
            });
        }
        let texts = [
            "select id, v from t where id = $1",
            "select * from t where id = $1",
            "select id, m from t where id = $1",
        ];
        let mut log = Vec::new();
        let mut statements = Vec::new();
        for c in &clients {
            let mut mine = Vec::new();
            for text in texts {
                mine.push(c.prepare(text).await.unwrap());
            }
            statements.push(mine);
        }
        let round = |label: &'static str, statements: &Vec<Vec<tokio_postgres::Statement>>| {
            let clients = &clients;
            let statements = statements.clone();
            async move {
                let mut out = Vec::new();
                for (i, c) in clients.iter().enumerate() {
                    for (j, s) in statements[i].iter().enumerate() {
                        out.push((label, i, j, run(c, s).await));
                    }
                }
                out
            }
        };
        log.extend(round("before", &statements).await);
        exec(
            &clients[0],
            "alter table t add column extra int not null default 7",
        )
        .await;
        log.extend(round("added", &statements).await);
        // Type and table dropped and created again, same shape.
        exec(
            &clients[1],
            "alter table t drop column m;
             drop type mood;
             create type mood as enum ('calm', 'busy');
             alter table t add column m mood default 'calm';",
        )
        .await;
        log.extend(round("recreated", &statements).await);
        for (i, c) in clients.iter().enumerate() {
            for (j, text) in texts.iter().enumerate() {
                statements[i][j] = c.prepare(text).await.unwrap();
            }
        }
        log.extend(round("prepared again", &statements).await);
        exec(
            &clients[2],
            "begin; alter table t alter column v type varchar(10); commit",
        )
        .await;
        log.extend(round("retyped", &statements).await);
        outcomes.push(log);
    }
    let (direct, pooled) = (&outcomes[0], &outcomes[1]);
    for (d, p) in direct.iter().zip(pooled) {
        assert_eq!(
            d, p,
            "directly vs through tidepool (label, client, statement, outcome)"
        );
    }
    assert_eq!(direct.len(), pooled.len());
    // The workload means something: some steps failed and some did not.
    assert!(
        direct
            .iter()
            .any(|(_, _, _, o)| matches!(o, Outcome::Error(_)))
    );
    assert!(
        direct
            .iter()
            .any(|(l, _, _, o)| *l == "added" && *o == Outcome::Columns(2))
    );
}

/// SQL-level PREPARE/EXECUTE across a migration, directly and through
/// tidepool (two clients on a pool of 2): the same outcomes, and the
/// statement heals once the client prepares it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_prepared_statements_heal_as_they_do_directly() {
    let cluster = harness::cluster();
    let mut runs = Vec::new();
    for through_tidepool in [false, true] {
        let db = tokio::task::spawn_blocking(move || cluster.create_database("sqlheal"))
            .await
            .unwrap();
        let direct = cluster.app_url(&db);
        let setup = harness::connect(&direct).await.unwrap();
        exec(
            &setup,
            "create table t (id int primary key, v text); insert into t values (1, 'a');",
        )
        .await;
        let proxy =
            through_tidepool.then(|| TestProxy::for_db(cluster, &db, "default_pool_size = 2"));
        let mut clients = Vec::new();
        for _ in 0..2 {
            clients.push(match &proxy {
                Some(p) => p.client(&db).await,
                None => harness::connect(&direct).await.unwrap(),
            });
        }
        let mut log = Vec::new();
        async fn step(c: &tokio_postgres::Client, sql: &str) -> String {
            let answer =
                tokio::time::timeout(std::time::Duration::from_secs(20), c.simple_query(sql))
                    .await
                    .unwrap_or_else(|_| panic!("no answer to {sql}"));
            match answer {
                Ok(msgs) => format!(
                    "ok {:?}",
                    msgs.iter()
                        .filter_map(|m| match m {
                            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.len()),
                            _ => None,
                        })
                        .collect::<Vec<_>>()
                ),
                Err(e) => format!("error {}", code(&e)),
            }
        }
        for c in &clients {
            log.push(step(c, "PREPARE p AS select * from t").await);
            log.push(step(c, "EXECUTE p").await);
        }
        exec(&setup, "alter table t add column extra int default 7").await;
        for c in &clients {
            for _ in 0..2 {
                log.push(step(c, "EXECUTE p").await);
                log.push(
                    step(c, "EXPLAIN EXECUTE p")
                        .await
                        .replace(|ch: char| ch.is_ascii_digit(), "#"),
                );
            }
            log.push(step(c, "DEALLOCATE p").await);
            log.push(step(c, "PREPARE p AS select * from t").await);
            log.push(step(c, "EXECUTE p").await);
            log.push(step(c, "EXECUTE p").await);
        }
        runs.push(log);
    }
    assert_eq!(runs[1], runs[0], "through tidepool vs PostgreSQL");
    assert!(runs[0].iter().any(|l| l == "error 0A000"), "{:?}", runs[0]);
    assert_eq!(runs[0].last().map(String::as_str), Some("ok [3]"));
}
