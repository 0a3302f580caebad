//! Pooling behaviour: many clients on few servers, pgbench correctness,
//! fair waiting with `query_wait_timeout`, `max_client_conn`, warm
//! `min_pool_size`, session mode and per-client startup parameters.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::time::Duration;

use harness::{TestProxy, cluster};
use tokio_postgres::types::Type;

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Server connections to `db` (a database of the test's own that only
/// tidepool connects to; they carry their clients' application names).
async fn tidepool_servers(c: &harness::Cluster, db: &str) -> i64 {
    let admin = c.admin_client("postgres").await;
    admin
        .query_one(
            "select count(*) from pg_stat_activity where datname = $1 and backend_type = 'client backend'",
            &[&db],
        )
        .await
        .unwrap()
        .get(0)
}

async fn balances_match(c: &harness::Cluster, db: &str) -> bool {
    let admin = c.admin_client(db).await;
    admin
        .query_one(
            "select (select sum(abalance) from pgbench_accounts) = (select sum(delta) from pgbench_history)",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_50_clients_through_a_pool_of_10() {
    let c = cluster();
    let db = c.create_database("bench");
    let init = harness::pgbench_async(&c.app_url(&db), &["-i", "-q", "-s", "1"]).await;
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let proxy = TestProxy::for_db(c, &db, "default_pool_size = 10\nmax_client_conn = 200");
    for mode in ["simple", "extended"] {
        let out = harness::pgbench_async(
            &proxy.url(&db),
            &["-n", "-c", "50", "-j", "2", "-t", "40", "-M", mode],
        )
        .await;
        let text = stdout(&out);
        assert!(
            out.status.success(),
            "{mode}: {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.contains("number of transactions actually processed: 2000/2000"),
            "{mode}: {text}"
        );
        assert!(
            text.contains("number of failed transactions: 0 "),
            "{mode}: {text}"
        );
        assert!(
            balances_match(c, &db).await,
            "{mode}: sum(abalance) != sum(delta)"
        );
    }
    assert!(tidepool_servers(c, &db).await <= 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_clients_share_ten_servers() {
    let c = cluster();
    let db = c.create_database("thousand");
    let proxy = TestProxy::for_db(c, &db, "default_pool_size = 10\nmax_client_conn = 1100");
    let url = proxy.url_as(harness::TRUST_USER, None, &db);
    let mut clients = Vec::new();
    for _ in 0..1000 {
        clients.push(harness::connect(&url).await.expect("client connects"));
    }
    let mut tasks = Vec::new();
    for (i, client) in clients.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let v: i32 = client
                .query_typed(
                    "select $1::int + 1 from pg_sleep(0.001)",
                    &[(&(i as i32), Type::INT4)],
                )
                .await
                .expect("query served")[0]
                .get(0);
            assert_eq!(v, i as i32 + 1);
            client
        }));
    }
    let mut kept = Vec::new();
    for t in tasks {
        kept.push(t.await.expect("task"));
    }
    assert!(
        proxy.server_count() <= 10,
        "servers: {}",
        proxy.server_count()
    );
    assert!(tidepool_servers(c, &db).await <= 10);
    drop(kept);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_pool_gives_query_wait_timeout_then_recovers() {
    let c = cluster();
    let db = c.create_database("exhaust");
    let proxy = TestProxy::for_db(c, &db, "default_pool_size = 1\nquery_wait_timeout = \"1s\"");
    let mut holder = proxy.client(&db).await;
    let tx = holder.transaction().await.unwrap();
    tx.execute("select 1", &[]).await.unwrap();

    let waiter = proxy.client(&db).await;
    let err = waiter
        .simple_query("select 1")
        .await
        .expect_err("no server can be had");
    let db_err = err.as_db_error().expect("an ErrorResponse");
    assert_eq!(db_err.code().code(), "53300");
    assert!(
        db_err.message().contains("query_wait_timeout"),
        "{}",
        db_err.message()
    );

    // The waiting client is still usable once the server is free.
    tx.commit().await.unwrap();
    let n: i32 = waiter.query_one("select 7", &[]).await.unwrap().get(0);
    assert_eq!(n, 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_clients_are_served_in_turn() {
    let c = cluster();
    let db = c.create_database("fair");
    let proxy = TestProxy::for_db(
        c,
        &db,
        "default_pool_size = 1\nquery_wait_timeout = \"60s\"",
    );
    let mut tasks = Vec::new();
    for i in 0..20 {
        let client = proxy.client(&db).await;
        tasks.push(tokio::spawn(async move {
            client
                .query_typed("select $1::int from pg_sleep(0.01)", &[(&i, Type::INT4)])
                .await
                .map(|r| r[0].get::<_, i32>(0))
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        assert_eq!(t.await.unwrap().expect("served"), i as i32);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_client_conn_rejects_extra_clients_cleanly() {
    let c = cluster();
    let db = c.create_database("maxconn");
    let proxy = TestProxy::for_db(c, &db, "max_client_conn = 3");
    let a = proxy.client(&db).await;
    let b = proxy.client(&db).await;
    let cc = proxy.client(&db).await;
    let err = harness::connect(&proxy.url(&db))
        .await
        .expect_err("fourth client refused");
    let code = err.as_db_error().map(|e| e.code().code().to_owned());
    assert_eq!(code.as_deref(), Some("53300"), "{err}");
    for cl in [&a, &b, &cc] {
        cl.simple_query("select 1").await.unwrap();
    }
    drop(cc);
    harness::wait_until_async("a slot frees up", Duration::from_secs(10), || async {
        harness::connect(&proxy.url(&db)).await.is_ok()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_pool_size_keeps_warm_connections() {
    let c = cluster();
    let db = c.create_database("warm");
    let proxy = TestProxy::for_db(c, &db, "default_pool_size = 5\nmin_pool_size = 3");
    let client = proxy.client(&db).await;
    client.simple_query("select 1").await.unwrap();
    harness::wait_until_async("three warm servers", Duration::from_secs(20), || async {
        tidepool_servers(c, &db).await >= 3
    })
    .await;
    assert!(proxy.server_count() >= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_mode_shares_servers_and_session_mode_keeps_one() {
    let c = cluster();
    let db = c.create_database("modes");
    // Transaction mode, one server: two clients alternate on it.
    let proxy = TestProxy::for_db(c, &db, "default_pool_size = 1");
    let a = proxy.client(&db).await;
    let b = proxy.client(&db).await;
    let pa: i32 = a
        .query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let pb: i32 = b
        .query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(pa, pb, "one server serves both clients");
    drop(proxy);

    let proxy = TestProxy::for_db(c, &db, "pool_mode = \"session\"\ndefault_pool_size = 2");
    let a = proxy.client(&db).await;
    a.batch_execute("set work_mem = '7MB'").await.unwrap();
    let p1: i32 = a
        .query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let p2: i32 = a
        .query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(p1, p2);
    let wm: String = a.query_one("show work_mem", &[]).await.unwrap().get(0);
    assert_eq!(wm, "7MB");
    let b = proxy.client(&db).await;
    let pb: i32 = b
        .query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_ne!(p1, pb, "session mode: a server per client");
    drop(a);
    drop(b);
    // The server a departed session client used is reset before reuse.
    let c2 = proxy.client(&db).await;
    let c3 = proxy.client(&db).await;
    for cl in [&c2, &c3] {
        let wm: String = cl.query_one("show work_mem", &[]).await.unwrap().get(0);
        assert_ne!(wm, "7MB", "session state must not leak");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_parameters_follow_each_client() {
    let c = cluster();
    let db = c.create_database("params");
    let proxy = TestProxy::for_db(c, &db, "default_pool_size = 1");
    let url = |app: &str| {
        format!(
            "{}?application_name={app}&options=-c%20DateStyle%3DGerman",
            proxy.url(&db)
        )
    };
    let alpha = harness::connect(&url("alpha")).await.unwrap();
    let beta = harness::connect(&format!("{}?application_name=beta", proxy.url(&db)))
        .await
        .unwrap();
    for _ in 0..3 {
        let a: String = alpha
            .query_one("show application_name", &[])
            .await
            .unwrap()
            .get(0);
        let ds: String = alpha.query_one("show DateStyle", &[]).await.unwrap().get(0);
        let b: String = beta
            .query_one("show application_name", &[])
            .await
            .unwrap()
            .get(0);
        let bds: String = beta.query_one("show DateStyle", &[]).await.unwrap().get(0);
        assert_eq!(a, "alpha");
        assert!(ds.starts_with("German"), "{ds}");
        assert_eq!(b, "beta");
        assert!(bds.starts_with("ISO"), "{bds}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_transaction_timeout_closes_the_client_and_rolls_back() {
    idle_transaction_timeout_case("idletx", "idle_transaction_timeout = \"1s\"").await;
}

/// With a shorter query_timeout, whose checks wake the client's task every
/// sweep: those wake-ups used to restart the idle timer, so it never fired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_transaction_timeout_fires_beside_a_shorter_query_timeout() {
    idle_transaction_timeout_case(
        "idletx_qt",
        "idle_transaction_timeout = \"1s\"\nquery_timeout = \"300ms\"",
    )
    .await;
}

async fn idle_transaction_timeout_case(name: &str, pool: &str) {
    let c = cluster();
    let db = c.create_database(name);
    let proxy = TestProxy::for_db(c, &db, pool);
    let admin = c.admin_client(&db).await;
    admin
        .batch_execute("create table x(a int); grant all on x to public")
        .await
        .unwrap();
    let mut r = harness::raw::Raw::login_trust(proxy.port(), &db).await;
    r.send(&harness::raw::query("begin; insert into x values (1)"))
        .await;
    let msgs = r.read_until_ready().await;
    assert_eq!(msgs.last().unwrap().body, b"T", "{msgs:?}");
    let rest = r.read_to_close().await;
    let err = rest
        .iter()
        .find(|m| m.tag == b'E')
        .expect("an error before close");
    assert_eq!(err.code().as_deref(), Some("25P03"));
    let n: i64 = admin
        .query_one("select count(*) from x", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "the open transaction was rolled back");
    // Its server is reused cleanly.
    let client = proxy.client(&db).await;
    let rows = client
        .simple_query("select txid_current_if_assigned() is null")
        .await
        .unwrap();
    let clean = rows
        .iter()
        .any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("t")));
    assert!(clean, "the next client starts outside any transaction");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_lifetime_and_idle_timeout_recycle_connections() {
    let c = cluster();
    let db = c.create_database("recycle");
    let proxy = TestProxy::for_db(c, &db, "default_pool_size = 1\nserver_lifetime = \"1s\"");
    let client = proxy.client(&db).await;
    let first: i32 = client
        .query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    harness::wait_until_async(
        "a new server after server_lifetime",
        Duration::from_secs(20),
        || async {
            let pid: i32 = client
                .query_one("select pg_backend_pid()", &[])
                .await
                .unwrap()
                .get(0);
            pid != first
        },
    )
    .await;
    drop(proxy);

    let proxy = TestProxy::for_db(c, &db, "server_idle_timeout = \"1s\"");
    let client = proxy.client(&db).await;
    client.simple_query("select 1").await.unwrap();
    assert!(proxy.server_count() >= 1);
    harness::wait_until_async("idle servers closed", Duration::from_secs(20), || async {
        proxy.server_count() == 0 && tidepool_servers(c, &db).await == 0
    })
    .await;
    // And a new one is opened on demand.
    client.simple_query("select 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_settings_follow_their_client_and_never_leak() {
    let c = cluster();
    let db = c.create_database("customguc");
    let proxy = TestProxy::for_db(c, &db, "default_pool_size = 2");
    let a = proxy.client(&db).await;
    a.batch_execute("set app.tenant = 'tenant-a'")
        .await
        .unwrap();
    let others: Vec<_> = futures_util::future::join_all((0..10).map(|_| proxy.client(&db))).await;
    for round in 0..5 {
        for o in &others {
            let v: Option<String> = o
                .query_one("select current_setting('app.tenant', true)", &[])
                .await
                .unwrap()
                .get(0);
            assert!(
                v.as_deref().unwrap_or("").is_empty(),
                "round {round}: another client saw app.tenant = {v:?}"
            );
        }
        let mine: Option<String> = a
            .query_one("select current_setting('app.tenant', true)", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(mine.as_deref(), Some("tenant-a"), "round {round}");
    }
    a.batch_execute("reset app.tenant").await.unwrap();
    let v: Option<String> = a
        .query_one("select current_setting('app.tenant', true)", &[])
        .await
        .unwrap()
        .get(0);
    assert!(v.as_deref().unwrap_or("").is_empty());
}

/// `server_check_delay` / `server_check_query`: a connection idle past the
/// delay is `sv_used`, checked before it serves (`sv_tested` meanwhile) and
/// kept when it answers; one that fails the check is replaced without the
/// client seeing it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_checked_before_they_serve_again() {
    let c = cluster();
    let db = c.create_database("server_check");
    let toml = harness::proxy::config_toml(
        c,
        &db,
        "default_pool_size = 1\nserver_check_delay = \"1s\"\nserver_check_query = \"select pg_sleep(0.8)\"",
        "",
    )
    .replace("[tidepool]\n", "[tidepool]\nstats_users = [\"app\"]\n");
    let proxy = TestProxy::start(&toml);
    let console = proxy.url_as("app", Some(harness::APP_PASSWORD), "pgbouncer");
    let pool = || {
        let console = console.clone();
        let db = db.clone();
        async move {
            let rows = harness::console(&console, "SHOW POOLS").await;
            let row = rows.into_iter().find(|r| r["database"] == db).unwrap();
            let n = |k: &str| row[k].parse::<u32>().unwrap();
            (n("sv_idle"), n("sv_used"), n("sv_tested"))
        }
    };
    let client = proxy.client(&db).await;
    let first: i32 = client
        .query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(pool().await, (1, 0, 0), "fresh: idle");
    harness::wait_until_async(
        "idle past server_check_delay",
        Duration::from_secs(10),
        || async { pool().await == (0, 1, 0) },
    )
    .await;
    let (again, tested) = tokio::join!(
        async {
            client
                .query_one("select pg_backend_pid()", &[])
                .await
                .unwrap()
                .get::<_, i32>(0)
        },
        async {
            let mut seen = false;
            for _ in 0..40 {
                if pool().await.2 == 1 {
                    seen = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            seen
        }
    );
    assert!(tested, "sv_tested while the check ran");
    assert_eq!(again, first, "it passed the check: the same server serves");
    drop(proxy);

    // A check that fails: the connection is closed and another serves.
    let toml = harness::proxy::config_toml(
        c,
        &db,
        "default_pool_size = 1\nserver_check_delay = \"0s\"\nserver_check_query = \"select 1/0\"",
        "",
    );
    let proxy = TestProxy::start(&toml);
    let client = proxy.client(&db).await;
    let mut pids = Vec::new();
    for _ in 0..3 {
        pids.push(
            client
                .query_one("select pg_backend_pid()", &[])
                .await
                .unwrap()
                .get::<_, i32>(0),
        );
    }
    pids.dedup();
    assert_eq!(
        pids.len(),
        3,
        "each checkout found the idle one failing: {pids:?}"
    );
    assert!(proxy.server_count() <= 1);
}
