//! Parking of idle clients (`park_idle_clients_after`): a parked client
//! keeps its session (prepared statements, settings, counted and listed as
//! idle), comes back on its next message, and is let out by KILL and by a
//! shutdown.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::collections::HashMap;
use std::time::Duration;

use harness::daemon::Daemon;
use harness::{TestProxy, cluster};
use tokio_postgres::SimpleQueryMessage;

const ADMIN_PW: &str = "adminpw";

fn config(db: &str, listen: &str, extra: &str) -> String {
    format!(
        r#"
[tidepool]
listen = ["{listen}"]
admin_users = ["admin"]
shutdown_timeout = "20s"

[pool]
default_pool_size = 4
max_client_conn = 500
client_login_timeout = "5s"
park_idle_clients_after = "200ms"

[databases.{db}]
host = "127.0.0.1"
port = {port}

[users.app]
password = "{app_pw}"

[users.admin]
password = "{ADMIN_PW}"
{extra}
"#,
        port = cluster().primary_port(),
        app_pw = harness::APP_PASSWORD,
    )
}

async fn show(url: &str, cmd: &str) -> Vec<HashMap<String, String>> {
    harness::console(url, cmd).await
}

/// SHOW LISTS as list → items.
async fn lists(console: &str) -> HashMap<String, i64> {
    show(console, "SHOW LISTS")
        .await
        .into_iter()
        .map(|r| (r["list"].clone(), r["items"].parse().unwrap()))
        .collect()
}

async fn wait_parked(console: &str, n: i64) {
    harness::wait_until_async(
        &format!("{n} parked clients"),
        Duration::from_secs(15),
        || async { lists(console).await["parked_clients"] == n },
    )
    .await;
}

fn text(msgs: &[SimpleQueryMessage]) -> Vec<String> {
    msgs.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or("").to_owned()),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_client_keeps_its_session_and_comes_back() {
    let db = cluster().create_database("park_session");
    let p = TestProxy::start(&config(&db, "127.0.0.1:0", ""));
    let console = p.url_as("admin", Some(ADMIN_PW), "pgbouncer");
    let client = p.client(&db).await;

    // Session state a parked client must not lose: a named prepared
    // statement and a setting.
    let stmt = client.prepare("select $1::int + 1").await.unwrap();
    client
        .simple_query("set application_name = 'parked-app'; set statement_timeout = '7s'")
        .await
        .unwrap();
    wait_parked(&console, 1).await;

    // Parked, it is still listed as an idle client and counted once.
    let clients = show(&console, "SHOW CLIENTS").await;
    let mine: Vec<_> = clients.iter().filter(|c| c["database"] == db).collect();
    assert_eq!(mine.len(), 1, "{clients:?}");
    assert_eq!(mine[0]["state"], "idle");
    assert_eq!(mine[0]["application_name"], "parked-app");
    let l = lists(&console).await;
    assert_eq!(
        l["login_clients"], 0,
        "a parked client is counted once: {l:?}"
    );

    // Its next message brings it back with everything it had.
    let row = client.query_one(&stmt, &[&41i32]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
    let got = text(&client.simple_query("show statement_timeout").await.unwrap());
    assert_eq!(got, ["7s"]);
    let got = text(&client.simple_query("show application_name").await.unwrap());
    assert_eq!(got, ["parked-app"]);

    // And it parks again, and comes back again, many times over.
    for i in 0..3 {
        wait_parked(&console, 1).await;
        let row = client.query_one(&stmt, &[&i]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), i + 1);
    }

    // The cancel key it got at login still cancels its queries after it
    // parked and came back (the key outlives its tasks).
    wait_parked(&console, 1).await;
    let cancel = client.cancel_token();
    let canceler = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        cancel.cancel_query(tokio_postgres::NoTls).await.unwrap();
    });
    let err = tokio::time::timeout(
        Duration::from_secs(15),
        client.simple_query("select pg_sleep(30)"),
    )
    .await
    .expect("canceled within 15 s")
    .expect_err("the sleep is canceled");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::QUERY_CANCELED),
        "{err}"
    );
    canceler.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_parked_clients_all_work_again() {
    let db = cluster().create_database("park_many");
    let p = TestProxy::start(&config(&db, "127.0.0.1:0", ""));
    let console = p.url_as("admin", Some(ADMIN_PW), "pgbouncer");
    let mut clients = Vec::new();
    for _ in 0..200 {
        let c = p.client(&db).await;
        c.simple_query("select 1").await.unwrap();
        clients.push(c);
    }
    wait_parked(&console, 200).await;
    // All of them at once, through a pool of 4.
    let mut set = tokio::task::JoinSet::new();
    for (i, c) in clients.into_iter().enumerate() {
        set.spawn(async move {
            let got = text(&c.simple_query(&format!("select {i}")).await.unwrap());
            assert_eq!(got, [i.to_string()]);
            c
        });
    }
    let mut clients = set.join_all().await;
    // A client that leaves while parked is gone from the list.
    drop(clients.pop());
    harness::wait_until_async(
        "the closed client to leave",
        Duration::from_secs(10),
        || async {
            lists(&console).await["used_clients"] == 200 // 199 + the console
        },
    )
    .await;
    wait_parked(&console, 199).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_reaches_parked_clients() {
    let db = cluster().create_database("park_kill");
    let p = TestProxy::start(&config(&db, "127.0.0.1:0", ""));
    let console = p.url_as("admin", Some(ADMIN_PW), "pgbouncer");
    let client = p.client(&db).await;
    client.simple_query("select 1").await.unwrap();
    wait_parked(&console, 1).await;
    show(&console, &format!("KILL {db}")).await;
    harness::wait_until_async(
        "the parked client to be closed",
        Duration::from_secs(10),
        || {
            let closed = client.is_closed();
            async move { closed }
        },
    )
    .await;
    assert_eq!(lists(&console).await["parked_clients"], 0);
    let clients = show(&console, "SHOW CLIENTS").await;
    assert!(clients.iter().all(|c| c["database"] != db), "{clients:?}");
}

#[test]
fn sigterm_closes_parked_clients_and_exits() {
    let db = cluster().create_database("park_sigterm");
    let mut d = Daemon::start(&config(&db, "127.0.0.1:{port}", ""));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let url = d.url(harness::APP_USER, harness::APP_PASSWORD, &db);
    let console = d.url("admin", ADMIN_PW, "pgbouncer");
    let clients: Vec<_> = (0..5)
        .map(|_| {
            let c = rt.block_on(harness::connect(&url)).unwrap();
            rt.block_on(c.simple_query("select 1")).unwrap();
            c
        })
        .collect();
    rt.block_on(wait_parked(&console, 5));
    d.signal(libc::SIGTERM);
    harness::wait_until(
        "parked clients to be closed",
        Duration::from_secs(10),
        || clients.iter().all(|c| c.is_closed()),
    );
    let status = d
        .wait_exit(Duration::from_secs(10))
        .expect("tidepool exits");
    assert!(status.success(), "{status:?}");
}
