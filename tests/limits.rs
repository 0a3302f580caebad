//! Limits that protect the database (issue 20, in progress):
//! `client_idle_timeout` closes a client idle outside a transaction, parked
//! or not, with PostgreSQL's idle-session code; a client idle inside a
//! transaction is left to `idle_transaction_timeout`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::time::{Duration, Instant};

use harness::raw::{self, Raw};
use harness::{TestProxy, cluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_clients_are_closed_after_client_idle_timeout() {
    let c = cluster();
    let db = c.create_database("client_idle");
    for parking in ["\"0s\"", "\"200ms\""] {
        let proxy = TestProxy::for_db(
            c,
            &db,
            &format!("client_idle_timeout = \"1s\"\npark_idle_clients_after = {parking}"),
        );
        let mut idle = Raw::login_trust(proxy.port(), &db).await;
        idle.send(&raw::query("select 1")).await;
        idle.read_until_ready().await;
        let mut in_tx = Raw::login_trust(proxy.port(), &db).await;
        in_tx.send(&raw::query("begin")).await;
        in_tx.read_until_ready().await;

        let started = Instant::now();
        let msgs = idle.read_to_close().await;
        let fatal = msgs
            .iter()
            .find(|m| m.tag == b'E')
            .expect("an error before the close");
        assert_eq!(fatal.code().as_deref(), Some("57P05"), "parking {parking}");
        assert!(
            fatal.message().unwrap().contains("client_idle_timeout"),
            "{:?}",
            fatal.message()
        );
        assert!(started.elapsed() >= Duration::from_millis(500));

        // Inside a transaction the client stays, past the same time.
        tokio::time::sleep(Duration::from_millis(800)).await;
        in_tx.send(&raw::query("select 2")).await;
        let answer = in_tx.read_until_ready().await;
        assert!(answer.iter().any(|m| m.tag == b'D'), "{answer:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_past_query_timeout_is_canceled_with_57014() {
    let c = cluster();
    let db = c.create_database("query_timeout");
    let proxy = TestProxy::for_db(c, &db, "query_timeout = \"1s\"\ndefault_pool_size = 1");
    let client = proxy.client(&db).await;
    for extended in [false, true] {
        let started = Instant::now();
        let e = if extended {
            client
                .query("select pg_sleep($1)", &[&30.0f64])
                .await
                .err()
                .unwrap()
        } else {
            client
                .simple_query("select pg_sleep(30)")
                .await
                .err()
                .unwrap()
        };
        let db_error = e.as_db_error().expect("a server error");
        assert_eq!(db_error.code().code(), "57014");
        assert!(
            db_error.message().contains("query_timeout"),
            "{}",
            db_error.message()
        );
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{:?}",
            started.elapsed()
        );
        // The client goes on; the pool of one serves it (and others) again.
        let rows = client.simple_query("select 1").await.unwrap();
        assert!(rows.len() >= 2);
        let other = proxy.client(&db).await;
        other.simple_query("select 2").await.unwrap();
    }
    // A transaction of short statements lasting longer than the limit is
    // left alone: the limit is per request.
    client.simple_query("begin").await.unwrap();
    for _ in 0..6 {
        client.simple_query("select pg_sleep(0.3)").await.unwrap();
    }
    client.simple_query("commit").await.unwrap();
    // No backend is left running the canceled sleeps.
    let admin = c.admin_client(&db).await;
    let left = admin
        .query_one(
            "select count(*) from pg_stat_activity where query like 'select pg_sleep(%' and state = 'active' and pid <> pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(left, 0);
}
