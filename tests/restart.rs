//! The primary goes away under a running proxy: after a restart the same
//! proxy and the same client connections keep working (at most one failed
//! attempt each); while it is down clients get a clear error instead of a
//! hang, and they recover once it is back.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::sync::Arc;
use std::time::Duration;

use harness::{Cluster, TestProxy};
use tokio_postgres::{Client, SimpleQueryMessage};

/// Deadline for every wait on a condition in this file.
const DEADLINE: Duration = Duration::from_secs(60);

/// A private cluster (started on a blocking thread) and one database in it.
async fn private_cluster(prefix: &'static str) -> (Arc<Cluster>, String) {
    tokio::task::spawn_blocking(move || {
        let c = Cluster::start_new(0);
        let db = c.create_database(prefix);
        (Arc::new(c), db)
    })
    .await
    .expect("start private cluster")
}

async fn blocking(c: &Arc<Cluster>, f: fn(&Cluster)) {
    let c = c.clone();
    tokio::task::spawn_blocking(move || f(&c))
        .await
        .expect("cluster operation");
}

/// First column of the first row of a simple query.
async fn try_value(client: &Client, sql: &str) -> Result<String, tokio_postgres::Error> {
    let msgs = client.simple_query(sql).await?;
    Ok(msgs
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or("").to_owned()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{sql}: no row")))
}

async fn value(client: &Client, sql: &str) -> String {
    try_value(client, sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
}

/// One transaction that writes `id` and reads it back; `Err` if any step fails.
async fn write_transaction(client: &Client, id: i32) -> Result<(), tokio_postgres::Error> {
    let work = async {
        client.batch_execute("begin").await?;
        client
            .batch_execute(&format!("insert into t values ({id})"))
            .await?;
        let n = try_value(client, &format!("select count(*) from t where id = {id}")).await?;
        assert_eq!(n, "1", "own write visible inside the transaction");
        client.batch_execute("commit").await
    };
    let r = work.await;
    if r.is_err() && !client.is_closed() {
        // Leave no failed transaction behind for the retry.
        let _ = client.batch_execute("rollback").await;
    }
    r
}

/// Runs a write transaction; at most one failed attempt is allowed, and that
/// failure must be an error reported by the proxy (the connection survives).
async fn write_with_one_retry(client: &Client, id: i32, who: &str) -> bool {
    match tokio::time::timeout(DEADLINE, write_transaction(client, id))
        .await
        .unwrap_or_else(|_| panic!("{who}: transaction hung"))
    {
        Ok(()) => false,
        Err(first) => {
            assert!(
                first.as_db_error().is_some() && !client.is_closed(),
                "{who}: the failed attempt must be an error on a live connection: {first:?}"
            );
            tokio::time::timeout(DEADLINE, write_transaction(client, id + 1_000_000))
                .await
                .unwrap_or_else(|_| panic!("{who}: retry hung"))
                .unwrap_or_else(|e| {
                    panic!("{who}: second attempt failed too: {e:?} (first: {first:?})")
                });
            true
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_of_primary_is_survived_by_proxy_and_connected_clients() {
    let (c, db) = private_cluster("restart").await;
    let proxy = TestProxy::for_db(
        &c,
        &db,
        "min_pool_size = 2\ndefault_pool_size = 4\nquery_wait_timeout = \"30s\"\nserver_connect_timeout = \"5s\"",
    );
    let a = proxy.client(&db).await;
    let b = proxy.client(&db).await;
    a.batch_execute("create table t(id int)")
        .await
        .expect("create table");
    for i in 0..10 {
        write_transaction(&a, i).await.expect("a before restart");
        write_transaction(&b, 100 + i)
            .await
            .expect("b before restart");
    }
    harness::wait_until_async("min_pool_size servers to be open", DEADLINE, || async {
        proxy.server_count() >= 2
    })
    .await;

    blocking(&c, Cluster::restart_primary).await;

    let mut retried = Vec::new();
    for round in 0..5 {
        if write_with_one_retry(&a, 1000 + round, "client a").await {
            retried.push(("a", round));
        }
        if write_with_one_retry(&b, 2000 + round, "client b").await {
            retried.push(("b", round));
        }
    }
    eprintln!("transactions that needed a retry after the restart: {retried:?}");
    assert!(
        retried.iter().all(|(_, round)| *round == 0),
        "only the first transaction after the restart may fail: {retried:?}"
    );

    let fresh = proxy.client(&db).await;
    write_transaction(&fresh, 3000)
        .await
        .expect("a fresh client after the restart");
    let n = value(&fresh, "select count(*) from t").await;
    assert_eq!(
        n, "31",
        "every committed row survived (retries: {retried:?})"
    );
    harness::wait_until_async(
        "min_pool_size servers to be open again",
        DEADLINE,
        || async { proxy.server_count() >= 2 },
    )
    .await;
    assert!(proxy.server_count() <= 4, "pool size exceeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_primary_gives_a_clear_error_then_the_same_client_recovers() {
    let (c, db) = private_cluster("stopped").await;
    let proxy = TestProxy::for_db(
        &c,
        &db,
        "min_pool_size = 2\ndefault_pool_size = 4\nquery_wait_timeout = \"10s\"\nserver_connect_timeout = \"5s\"",
    );
    let client = proxy.client(&db).await;
    assert_eq!(value(&client, "select 'up'").await, "up");

    blocking(&c, Cluster::stop_primary).await;

    for attempt in 0..2 {
        let err = tokio::time::timeout(DEADLINE, client.simple_query("select 'down'"))
            .await
            .unwrap_or_else(|_| panic!("attempt {attempt}: query hung while the primary is down"))
            .expect_err("a query cannot succeed while the primary is down");
        let db_err = err
            .as_db_error()
            .unwrap_or_else(|| panic!("attempt {attempt}: not a server-reported error: {err:?}"));
        let code = db_err.code().code();
        assert!(
            matches!(code, "08001" | "08006" | "57P03"),
            "attempt {attempt}: unexpected SQLSTATE {code}: {db_err:?}"
        );
        assert!(
            db_err.message().to_lowercase().contains("connect"),
            "attempt {attempt}: message should mention the connection: {}",
            db_err.message()
        );
        assert!(!client.is_closed(), "client connection must survive");
    }
    // Extended protocol too (Parse/Describe/Sync while no server is available).
    let err = tokio::time::timeout(DEADLINE, client.query("select $1::int", &[&1i32]))
        .await
        .expect("extended query hung while the primary is down")
        .expect_err("extended query cannot succeed while the primary is down");
    let code = err.code().map(|c| c.code().to_owned());
    assert!(
        matches!(code.as_deref(), Some("08001" | "08006" | "57P03")),
        "{err:?}"
    );

    blocking(&c, Cluster::start_primary).await;

    assert_eq!(value(&client, "select 'up again'").await, "up again");
    let row = client
        .query_one("select $1::int + 1", &[&41i32])
        .await
        .expect("extended query after restart");
    assert_eq!(row.get::<_, i32>(0), 42);
    let fresh = proxy.client(&db).await;
    assert_eq!(value(&fresh, "select 'fresh'").await, "fresh");
}

/// A restart ends the sessions of the old server with its FATAL (57P01):
/// a client inside a transaction through tidepool sees its connection end,
/// as it would directly, nothing of the transaction is kept, and clients
/// connecting afterwards are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_open_across_primary_restart_ends_that_client_as_postgres_does() {
    let (c, db) = private_cluster("restart_in_tx").await;
    let proxy = TestProxy::for_db(&c, &db, "min_pool_size = 2\ndefault_pool_size = 4");
    let client = proxy.client(&db).await;
    client
        .batch_execute("create table t(id int)")
        .await
        .expect("create table");
    client
        .batch_execute("begin; insert into t values (1)")
        .await
        .expect("open transaction");

    blocking(&c, Cluster::restart_primary).await;

    let err = tokio::time::timeout(DEADLINE, client.batch_execute("insert into t values (2)"))
        .await
        .expect("statement hung after the restart")
        .expect_err("the transaction died with its server");
    let code = err.code().map(|c| c.code().to_owned());
    assert!(
        code.is_none() || code.as_deref() == Some("57P01"),
        "the server's FATAL or the closed connection, never a relabelled error: {err:?}"
    );
    harness::wait_until_async("the client connection to end", DEADLINE, || async {
        client.is_closed()
    })
    .await;
    let fresh = proxy.client(&db).await;
    write_transaction(&fresh, 10)
        .await
        .expect("new transaction after the restart");
    assert_eq!(value(&fresh, "select count(*) from t").await, "1");
}
