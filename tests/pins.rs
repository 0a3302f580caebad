//! Pins that end: a client pinned to its server by session state (a WITH
//! HOLD cursor, a temporary table, a session advisory lock) shares servers
//! again once that state is gone, whichever statement ended it, and SHOW
//! CLIENTS and `/metrics` say who is pinned, why and since when.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::collections::HashMap;
use std::time::Duration;

use harness::{TestProxy, cluster};

const ADMIN_PW: &str = "adminpw";

/// tidepool in front of `db` with a pool of `size` and an admin user; a
/// client that waits for a server longer than 5 s gets an error, so a
/// client stuck behind pinned servers fails instead of hanging.
fn proxy(db: &str, size: u32) -> TestProxy {
    TestProxy::start(&harness::proxy::admin_config(
        cluster(),
        db,
        ADMIN_PW,
        &format!(
            "default_pool_size = {size}\nquery_wait_timeout = \"5s\"\nclient_login_timeout = \"5s\""
        ),
        "",
        "",
    ))
}

fn admin_url(p: &TestProxy) -> String {
    p.url_as("admin", Some(ADMIN_PW), "pgbouncer")
}

/// SHOW CLIENTS rows of the `app` user, by connection id.
async fn app_clients(p: &TestProxy) -> Vec<HashMap<String, String>> {
    harness::console(&admin_url(p), "SHOW CLIENTS")
        .await
        .into_iter()
        .filter(|r| r["user"] == "app")
        .collect()
}

async fn pinned(p: &TestProxy) -> Vec<String> {
    app_clients(p)
        .await
        .into_iter()
        .map(|r| r["pinned"].clone())
        .filter(|r| !r.is_empty())
        .collect()
}

/// Waits until the pinned clients' reasons are `want` (a pin is taken, and
/// ended, just after the transaction's answer went out), then checks.
async fn expect_pins(p: &TestProxy, want: &[&str], what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let now = pinned(p).await;
        if now == want || tokio::time::Instant::now() >= deadline {
            assert_eq!(now, want, "{what}");
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn backend_pid(c: &tokio_postgres::Client) -> String {
    harness::first_value(c, "select pg_backend_pid()").await
}

/// The judged case: on a pool of 5, 8 clients each open, read and close a
/// WITH HOLD cursor (Django's `.iterator()` in autocommit), then run 20
/// transactions each, all at once. With pins that never ended, five of
/// them would keep the five servers and the other three would time out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_clients_that_closed_their_held_cursors_share_a_pool_of_five() {
    let c = cluster();
    let db = c.create_database("pinends");
    let p = proxy(&db, 5);
    let url = p.url(&db);
    let mut clients = Vec::new();
    for i in 0..8 {
        let client = harness::connect(&url).await.unwrap();
        client
            .batch_execute(&format!(
                "declare c{i} cursor with hold for select g from generate_series(1, 10) g"
            ))
            .await
            .unwrap();
        let rows = client
            .simple_query(&format!("fetch all from c{i}"))
            .await
            .unwrap();
        let n = harness::rows(rows).len();
        assert_eq!(n, 10, "the held cursor reads its rows");
        client.batch_execute(&format!("close c{i}")).await.unwrap();
        clients.push(client);
    }
    expect_pins(&p, &[], "no client stays pinned").await;
    let mut tasks = Vec::new();
    for (i, client) in clients.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            for j in 0..20 {
                let tx_sql =
                    format!("begin; select {i} * 100 + {j}; select pg_sleep(0.01); commit");
                client.batch_execute(&tx_sql).await.unwrap();
            }
            client
        }));
    }
    let mut clients = Vec::new();
    for t in tasks {
        clients.push(
            tokio::time::timeout(Duration::from_secs(60), t)
                .await
                .expect("the 8 clients finish")
                .expect("no client waited past query_wait_timeout"),
        );
    }
    let rows = app_clients(&p).await;
    assert_eq!(rows.len(), 8);
    for r in &rows {
        assert_eq!(r["pinned"], "", "{r:?}");
        assert_eq!(r["pinned_since"], "", "{r:?}");
    }
    let totals = p.shared.pins.totals();
    let cursor = totals.iter().find(|t| t.0 == "with_hold_cursor").unwrap();
    assert_eq!((cursor.1, cursor.2), (8, 8), "8 pins, 8 unpins: {totals:?}");
    let metrics = tidepool::http::metrics::render(&p.shared).unwrap();
    assert!(
        metrics.contains("tidepool_unpins_total{reason=\"with_hold_cursor\"} 8"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tidepool_pinned_clients{reason=\"with_hold_cursor\"} 0"),
        "{metrics}"
    );
    drop(clients);
}

/// A pin lasts while any of its state does, says which, and ends when
/// the last of it is gone; the client keeps its server meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pin_follows_what_state_is_left_and_ends_with_the_last() {
    let c = cluster();
    let db = c.create_database("pinfollow");
    let p = proxy(&db, 3);
    let a = p.client(&db).await;
    a.batch_execute("declare cur cursor with hold for select g from generate_series(1, 5) g")
        .await
        .unwrap();
    a.batch_execute("create temp table tt(v int)")
        .await
        .unwrap();
    // The client's next request is read only once the last one's pin
    // bookkeeping is done: after it, SHOW CLIENTS is up to date.
    let pid = backend_pid(&a).await;
    let rows = app_clients(&p).await;
    assert_eq!(rows[0]["pinned"], "WITH HOLD cursors", "{rows:?}");
    assert!(!rows[0]["pinned_since"].is_empty(), "{rows:?}");

    // Extended protocol: CLOSE through Parse/Bind/Execute.
    a.execute("close cur", &[]).await.unwrap();
    assert_eq!(backend_pid(&a).await, pid, "still pinned: same server");
    let rows = app_clients(&p).await;
    assert_eq!(rows[0]["pinned"], "temporary tables", "{rows:?}");
    a.batch_execute("insert into tt values (1)").await.unwrap();

    // Two holds of one advisory lock: one unlock leaves it held.
    a.batch_execute("discard temp").await.unwrap();
    expect_pins(&p, &[], "DISCARD TEMP ends it").await;
    harness::first_value(&a, "select pg_advisory_lock(9)").await;
    harness::first_value(&a, "select pg_advisory_lock(9)").await;
    expect_pins(&p, &["session advisory locks (pg_advisory_lock)"], "pinned").await;
    assert_eq!(
        harness::first_value(&a, "select pg_advisory_unlock(9)").await,
        "t"
    );
    assert_eq!(harness::first_value(&a, "select 1").await, "1");
    assert_eq!(
        pinned(&p).await,
        ["session advisory locks (pg_advisory_lock)"],
        "the lock is still held once"
    );
    // Another client cannot take it meanwhile.
    let b = p.client(&db).await;
    assert_eq!(
        harness::first_value(&b, "select pg_try_advisory_lock(9)").await,
        "f"
    );
    assert_eq!(
        harness::first_value(&a, "select pg_advisory_unlock(9)").await,
        "t"
    );
    // b may have been pinned by its own try-lock that got nothing: it
    // holds nothing, so the check ended that pin too.
    expect_pins(&p, &[], "both unlocked").await;
    assert_eq!(
        harness::first_value(&b, "select pg_try_advisory_lock(9)").await,
        "t"
    );
    assert_eq!(
        harness::first_value(&b, "select pg_advisory_unlock(9)").await,
        "t"
    );
}

/// State that ends with its transaction never outlives it as a pin: a
/// rolled-back cursor, an `ON COMMIT DROP` table, a temp table created and
/// dropped in one batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_that_ends_with_its_transaction_leaves_no_pin() {
    let c = cluster();
    let db = c.create_database("pintx");
    let p = proxy(&db, 2);
    let a = p.client(&db).await;
    a.batch_execute("begin; declare c cursor with hold for select 1; rollback")
        .await
        .unwrap();
    expect_pins(&p, &[], "rolled back").await;
    a.batch_execute(
        "begin; create temp table t1(v int) on commit drop; insert into t1 values (1); commit",
    )
    .await
    .unwrap();
    expect_pins(&p, &[], "on commit drop").await;
    a.batch_execute("create temp table t2(v int); drop table t2")
        .await
        .unwrap();
    expect_pins(&p, &[], "created and dropped").await;
    // A temp table that stays pins, with its reason.
    a.batch_execute("create temp table t3(v int)")
        .await
        .unwrap();
    expect_pins(&p, &["temporary tables"], "pinned").await;
    // Dropped later: unpinned, and the client then shares servers: a
    // second client holding the other server's transaction open does not
    // keep it from running.
    a.batch_execute("drop table t3").await.unwrap();
    expect_pins(&p, &[], "dropped").await;
    let totals = p.shared.pins.totals();
    let temp = totals.iter().find(|t| t.0 == "temp_table").unwrap();
    assert_eq!((temp.1, temp.2), (3, 3), "{totals:?}");
}

/// Django's `QuerySet.iterator()`, as a Django app runs it (autocommit, a
/// WITH HOLD cursor per call, connections kept as with CONN_MAX_AGE): 8
/// threads on a pool of 5 read with it, then each runs 20 transactions,
/// and while all 8 connections are open SHOW CLIENTS shows none pinned
/// (tests/clients/python/django_iterator.py). Django comes from PyPI
/// (scripts/test installs it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn django_iterator_leaves_no_client_pinned() {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import django, psycopg"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "python3 with django and psycopg is missing: run scripts/test to install it"
    );
    let c = cluster();
    let db = c.create_database("djangoiter");
    let p = proxy(&db, 5);
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/clients/python/django_iterator.py");
    let (url, admin) = (p.url(&db), admin_url(&p));
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("timeout")
            .arg("180")
            .arg("python3")
            .arg(script)
            .args([&url, &admin])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("django iterator: OK"),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let totals = p.shared.pins.totals();
    let cursor = totals.iter().find(|t| t.0 == "with_hold_cursor").unwrap();
    assert!(
        cursor.1 >= 8 && cursor.1 == cursor.2,
        "every pin ended: {totals:?}"
    );
}
