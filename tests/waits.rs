//! Waits that tell you what to do: a client waiting for a server longer
//! than `query_wait_notify` gets a NOTICE naming the pool and who holds it;
//! its `query_wait_timeout` error names the pool, its size, the clients
//! waiting, the holders by application_name with how long they held, and
//! the setting to change.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::time::Duration;

use harness::{TestProxy, cluster};
use tokio_postgres::AsyncMessage;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_client_is_told_who_holds_the_pool() {
    let c = cluster();
    let db = c.create_database("waits");
    let p = TestProxy::for_db(
        c,
        &db,
        "default_pool_size = 2\nquery_wait_notify = \"1s\"\nquery_wait_timeout = \"3s\"\nmax_client_conn = 100",
    );
    let url = |app: &str| format!("{}?application_name={app}", p.url(&db));
    // Two holders take both servers and keep their transactions open.
    let mut holders = Vec::new();
    for _ in 0..2 {
        let h = harness::connect(&url("report-job")).await.unwrap();
        h.batch_execute("begin; select 1").await.unwrap();
        holders.push(h);
    }
    // Eighteen more clients queue behind them.
    let mut queued = Vec::new();
    for i in 0..17 {
        let q = harness::connect(&url("web")).await.unwrap();
        queued.push(tokio::spawn(async move {
            q.batch_execute(&format!("select {i}")).await
        }));
    }
    let (waiter, mut connection) = tokio_postgres::connect(&url("web"), tokio_postgres::NoTls)
        .await
        .unwrap();
    let (tx, mut notices) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(m) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            match m {
                Ok(AsyncMessage::Notice(n)) => {
                    // A NOTICE, as the docs and PgBouncer say.
                    let _ = tx.send(format!(
                        "{} {} {}",
                        n.severity(),
                        n.code().code(),
                        n.message()
                    ));
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    let err = tokio::time::timeout(
        Duration::from_secs(60),
        waiter.batch_execute("select 'waiter'"),
    )
    .await
    .expect("the wait ends")
    .expect_err("no server for the waiter");
    let e = err.as_db_error().expect("an ErrorResponse");
    assert_eq!(e.code().code(), "53300");
    let m = e.message();
    for part in [
        "query_wait_timeout",
        &format!("pool {db}/app"),
        "pool size 2",
        "clients waiting",
        "held by report-job x2",
        "default_pool_size",
        "SHOW LEAKS",
    ] {
        assert!(m.contains(part), "{part:?} not in {m:?}");
    }
    let notice = notices
        .try_recv()
        .expect("the query_wait_notify NOTICE came first");
    assert!(notice.starts_with("NOTICE 00000 "), "{notice}");
    assert!(notice.contains("query_wait_notify"), "{notice}");
    assert!(notice.contains("held by report-job x2"), "{notice}");
    assert!(notices.try_recv().is_err(), "told once");
    drop(holders);
    for q in queued {
        let _ = q.await;
    }
}

/// Who holds the pool: SHOW CLIENTS and SHOW SERVERS link each client to
/// its server both ways, SHOW CLIENTS carries each client's totals after
/// PgBouncer's columns, and `/metrics` has totals per application_name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_and_servers_are_linked_and_counted() {
    let c = cluster();
    let db = c.create_database("holders");
    let p = TestProxy::for_db(c, &db, "default_pool_size = 2");
    // The harness config has no admin user: the rows come in-process,
    // from the same functions SHOW CLIENTS and SHOW SERVERS use.
    let url = |app: &str| format!("{}?application_name={app}", p.url(&db));
    let a = harness::connect(&url("checkout")).await.unwrap();
    let b = harness::connect(&url("reports")).await.unwrap();
    for i in 0..7 {
        a.batch_execute(&format!("select {i}")).await.unwrap();
    }
    for i in 0..3 {
        b.batch_execute(&format!("begin; select {i}; commit"))
            .await
            .unwrap();
    }
    // `a` holds a server in an open transaction.
    a.batch_execute("begin; select 'held'").await.unwrap();
    let shared = &p.shared;
    // A transaction is counted just after its answer is written: b's last
    // may be counted a moment after the test saw it.
    let counted = |app: &str| {
        tidepool::snapshot::clients(shared)
            .iter()
            .find(|r| r.application_name == app)
            .map_or(0, |r| r.counts.xacts)
    };
    harness::wait_until("b's transactions counted", Duration::from_secs(10), || {
        counted("reports") == 3
    });
    let clients = tidepool::snapshot::clients(shared);
    let ca = clients
        .iter()
        .find(|r| r.application_name == "checkout")
        .unwrap();
    let cb = clients
        .iter()
        .find(|r| r.application_name == "reports")
        .unwrap();
    assert_eq!(ca.counts.xacts, 7, "{ca:?}");
    assert_eq!(cb.counts.xacts, 3, "{cb:?}");
    assert!(ca.counts.bytes > 0 && ca.counts.queries >= 7, "{ca:?}");
    // Linked both ways.
    assert_ne!(ca.link, 0, "the active client names its server");
    let servers = tidepool::server::list::rows(&shared.registry.servers);
    let s = servers
        .iter()
        .find(|s| s.id == ca.link)
        .expect("its server");
    assert!(s.active);
    assert_eq!(s.link, ca.id, "the server names its client");
    let metrics = tidepool::http::metrics::render(shared).unwrap();
    assert!(
        metrics.contains("tidepool_app_transactions_total{application_name=\"checkout\"} 7"),
        "{metrics}"
    );
    assert!(metrics.contains("tidepool_app_transactions_total{application_name=\"reports\"} 3"));
    assert!(metrics.contains("tidepool_app_transactions_total{application_name=\"other\"}"));
    a.batch_execute("commit").await.unwrap();
}
