//! Cancel requests: a proxy-issued key cancels exactly that client's query on
//! whichever server it has, and nothing else.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::time::Duration;

use harness::raw::Raw;
use harness::{TestProxy, cluster};
use tokio::io::AsyncWriteExt;

async fn wait_running(c: &harness::Cluster, db: &str, needle: &str) {
    let admin = c.admin_client("postgres").await;
    let needle = needle.to_owned();
    harness::wait_until_async("query is running", Duration::from_secs(20), || {
        let admin = &admin;
        let needle = needle.clone();
        let db = db.to_owned();
        async move {
            let n: i64 = admin
                .query_one(
                    "select count(*) from pg_stat_activity where datname = $1 and state = 'active' and query like $2",
                    &[&db, &format!("%{needle}%")],
                )
                .await
                .unwrap()
                .get(0);
            n > 0
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_exactly_that_clients_query() {
    let c = cluster();
    let db = c.create_database("cancel");
    let proxy = TestProxy::for_db(c, &db, "default_pool_size = 4");
    let victim = proxy.client(&db).await;
    let bystander = proxy.client(&db).await;
    let token = victim.cancel_token();

    let other = tokio::spawn(async move {
        bystander
            .query_one("select 'still here' from pg_sleep(5) /* bystander */", &[])
            .await
            .map(|r| r.get::<_, String>(0))
    });
    let run = tokio::spawn(async move {
        let r = victim
            .simple_query("select pg_sleep(10) /* victim */")
            .await;
        (victim, r)
    });
    wait_running(c, &db, "victim").await;
    wait_running(c, &db, "bystander").await;
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let (victim, r) = run.await.unwrap();
    let err = r.expect_err("query was cancelled");
    assert_eq!(
        err.as_db_error().map(|e| e.code().code()),
        Some("57014"),
        "{err}"
    );
    assert_eq!(
        other.await.unwrap().expect("bystander unaffected"),
        "still here"
    );
    // The cancelled client carries on.
    let n: i32 = victim.query_one("select 5", &[]).await.unwrap().get(0);
    assert_eq!(n, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_with_a_wrong_key_does_nothing() {
    let c = cluster();
    let db = c.create_database("badcancel");
    let proxy = TestProxy::for_db(c, &db, "");
    let client = proxy.client(&db).await;
    let run = tokio::spawn(async move {
        client
            .query_one("select 'done' from pg_sleep(4) /* keep */", &[])
            .await
            .map(|r| r.get::<_, String>(0))
    });
    wait_running(c, &db, "keep").await;
    for (pid, secret) in [(1i32, 1i32), (i32::MAX, 0), (12345, -5)] {
        let mut r = Raw::connect(proxy.port()).await;
        let mut pkt = Vec::new();
        pkt.extend_from_slice(&16i32.to_be_bytes());
        pkt.extend_from_slice(&80_877_102i32.to_be_bytes());
        pkt.extend_from_slice(&pid.to_be_bytes());
        pkt.extend_from_slice(&secret.to_be_bytes());
        r.stream.write_all(&pkt).await.unwrap();
        assert!(r.read_to_close().await.is_empty());
    }
    assert_eq!(run.await.unwrap().expect("not cancelled"), "done");
}

/// A cancel that comes just after its client's query ended (a driver's
/// timeout firing as the answer arrives: asyncpg's `timeout=`, pgx's
/// context, JDBC's setQueryTimeout) must not stop the query another client
/// runs by then on the same server. It used to: the request was forwarded
/// to the server the client held when it came, which PostgreSQL reached
/// after the server had gone to another client (a black-box probe saw 4-12
/// such cancels in 8 s). Directly, PostgreSQL never cancels another
/// session's query.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_cancel_never_stops_another_clients_query() {
    let c = cluster();
    let db = c.create_database("latecancel");
    let proxy = TestProxy::for_db(c, &db, "default_pool_size = 2");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut bystanders = Vec::new();
    for _ in 0..3 {
        let client = proxy.client(&db).await;
        let stop = stop.clone();
        bystanders.push(tokio::spawn(async move {
            let mut canceled = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Err(e) = client.simple_query("select pg_sleep(0.01)").await {
                    assert_eq!(e.code().map(|c| c.code()), Some("57014"), "{e}");
                    canceled += 1;
                }
            }
            canceled
        }));
    }
    let mut cancelers = Vec::new();
    for _ in 0..3 {
        let client = proxy.client(&db).await;
        cancelers.push(tokio::spawn(async move {
            let token = client.cancel_token();
            for _ in 0..150 {
                // Cancels of its own, late, sometimes a query of its own.
                let _ = client.simple_query("select 1").await;
                let _ = token.cancel_query(tokio_postgres::NoTls).await;
            }
        }));
    }
    for c in cancelers {
        c.await.unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut canceled = 0;
    for b in bystanders {
        canceled += b.await.unwrap();
    }
    assert_eq!(
        canceled, 0,
        "queries of clients that sent no cancel were canceled"
    );
}
