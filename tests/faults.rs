//! Faults survived: a backend that stops answering (SIGSTOP) is turned
//! into an error by the timeouts, never a hang, and its server is not used
//! again; the primary killed (`kill -9`) under load and restarted: every
//! client gets an answer or an error, and tidepool serves again by itself;
//! a replica stopped and started under read load.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use harness::{Cluster, TestProxy, cluster};

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) on a PostgreSQL backend of the test's own cluster.
    unsafe { libc::kill(pid, sig) };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_stops_answering_becomes_an_error_not_a_hang() {
    let c = cluster();
    let db = c.create_database("sigstop");
    let proxy = TestProxy::for_db(
        c,
        &db,
        "default_pool_size = 1\nquery_timeout = \"1s\"\nquery_wait_timeout = \"20s\"",
    );
    let client = proxy.client(&db).await;
    let pid: i32 = client
        .query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    signal(pid, libc::SIGSTOP);
    let answer =
        tokio::time::timeout(Duration::from_secs(30), client.simple_query("select 1")).await;
    signal(pid, libc::SIGCONT);
    let err = answer
        .expect("the query hung on a stopped backend")
        .expect_err("a stopped backend cannot answer");
    let d = err.as_db_error().expect("an error from tidepool");
    assert_eq!(d.code().code(), "08006", "{d:?}");
    assert!(d.message().contains("query_timeout"), "{}", d.message());
    // The same client goes on.
    client.simple_query("select 1").await.unwrap();
    // The client, and others, are served again, by another server.
    let other = proxy.client(&db).await;
    let p2: i32 = tokio::time::timeout(
        Duration::from_secs(30),
        other.query_one("select pg_backend_pid()", &[]),
    )
    .await
    .expect("the pool recovered")
    .unwrap()
    .get(0);
    assert_ne!(
        p2, pid,
        "the stopped backend's connection is not used again"
    );
}

/// Writers insert unique ids through tidepool while the primary is killed
/// (`kill -9`) and restarted: every insert gets an answer or an error (no
/// hang), every insert acknowledged is in the table afterwards (none lost
/// silently; commits are synchronous here), and tidepool serves pgbench
/// again by itself, with no server reused dirty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_primary_killed_under_load_and_restarted() {
    let c = tokio::task::spawn_blocking(|| Arc::new(Cluster::start_new(0)))
        .await
        .unwrap();
    let db = c.create_database("crash");
    let admin = c.admin_client(&db).await;
    admin
        .simple_query(&format!(
            "alter database {db} set synchronous_commit = on; \
             create table t (id bigint primary key); grant all on t to app"
        ))
        .await
        .unwrap();
    drop(admin);
    let proxy = TestProxy::for_db(
        &c,
        &db,
        "default_pool_size = 4\nserver_connect_timeout = \"2s\"\nquery_wait_timeout = \"10s\"\nquery_timeout = \"5s\"",
    );
    let url = proxy.url(&db);
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..8i64)
        .map(|w| {
            let (url, stop) = (url.clone(), stop.clone());
            tokio::spawn(async move {
                let (mut acked, mut errors) = (Vec::new(), 0u32);
                let mut client = None;
                let mut n = 0i64;
                while !stop.load(Ordering::Relaxed) {
                    if client.is_none() {
                        client = harness::connect(&url).await.ok();
                        if client.is_none() {
                            errors += 1;
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    }
                    let Some(c) = &client else { continue };
                    n += 1;
                    let id = w * 1_000_000 + n;
                    let sql = format!("insert into t values ({id})");
                    let insert = c.simple_query(&sql);
                    match tokio::time::timeout(Duration::from_secs(30), insert).await {
                        Err(_) => panic!("an insert hung"),
                        Ok(Ok(_)) => acked.push(id),
                        Ok(Err(_)) => {
                            errors += 1;
                            if c.is_closed() {
                                client = None;
                            }
                        }
                    }
                }
                (acked, errors)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let c2 = c.clone();
    tokio::task::spawn_blocking(move || {
        c2.kill_primary();
        std::thread::sleep(Duration::from_secs(1));
        c2.start_primary();
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let mut acked = BTreeSet::new();
    let mut errors = 0;
    for w in writers {
        let (a, e) = w.await.unwrap();
        acked.extend(a);
        errors += e;
    }
    assert!(errors > 0, "the crash was seen by the clients");
    let admin = c.admin_client(&db).await;
    let stored: BTreeSet<i64> = admin
        .query("select id from t", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let lost: Vec<&i64> = acked.difference(&stored).collect();
    assert!(lost.is_empty(), "acknowledged but not stored: {lost:?}");
    assert!(!acked.is_empty());

    // Recovered by itself: pgbench through tidepool, every transaction.
    harness::pgbench_script_all_succeed(
        &url,
        "begin;\nselect count(*) from t;\ninsert into t select coalesce(max(id), 0) + 1 from t where id < 0 on conflict do nothing;\ncommit;\n",
    )
    .await;
}

/// The sibling: a server that stops answering while tidepool runs its own
/// query on it (here bringing its session parameters to a client's) fails
/// that client's request after `INTERNAL_TIMEOUT` (15 s), even without
/// `query_timeout`, and the connection is not reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_stops_answering_tidepools_own_query_is_given_up() {
    let c = cluster();
    let db = c.create_database("sigstop_internal");
    let proxy = TestProxy::for_db(
        c,
        &db,
        "default_pool_size = 1\nquery_wait_timeout = \"60s\"",
    );
    let first = proxy.client(&db).await;
    let pid: i32 = first
        .query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    drop(first);
    // A client with another setting logs in (tidepool learns the value's
    // spelling now); the idle server must be brought to it before it serves.
    let url = format!("{}?options=-c%20statement_timeout%3D4321", proxy.url(&db));
    let other = harness::connect(&url).await.unwrap();
    signal(pid, libc::SIGSTOP);
    let answer =
        tokio::time::timeout(Duration::from_secs(40), other.simple_query("select 1")).await;
    signal(pid, libc::SIGCONT);
    let err = answer.expect("hung on tidepool's own query").unwrap_err();
    let d = err.as_db_error().expect("an error from tidepool");
    assert!(d.message().contains("did not answer"), "{}", d.message());
    let p2: i32 = other
        .query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_ne!(p2, pid);
}
