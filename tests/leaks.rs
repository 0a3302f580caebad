//! Leak detection: a client that holds a server without using it (idle in a
//! transaction, or pinned and idle) for longer than `leak_warn_after` is
//! reported once, by name: a warning log line, a SHOW LEAKS row (gone once
//! it uses or lets go of the server), a counter.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::collections::HashMap;
use std::time::Duration;

use harness::cluster;
use harness::daemon::Daemon;

const ADMIN_PW: &str = "adminpw";
const WAIT: Duration = Duration::from_secs(30);

fn daemon(db: &str) -> Daemon {
    let c = cluster();
    Daemon::start(&format!(
        r#"
[tidepool]
listen = ["127.0.0.1:{{port}}"]
admin_users = ["admin"]

[pool]
default_pool_size = 4
leak_warn_after = "1s"

[databases.{db}]
host = "127.0.0.1"
port = {port}

[users.app]
password = "{app_pw}"

[users.admin]
password = "{ADMIN_PW}"

[metrics]
listen = "127.0.0.1:{{metrics_port}}"
"#,
        port = c.primary_port(),
        app_pw = harness::APP_PASSWORD,
    ))
}

async fn leaks(d: &Daemon) -> Vec<HashMap<String, String>> {
    harness::console(&d.url("admin", ADMIN_PW, "pgbouncer"), "SHOW LEAKS").await
}

async fn leaks_become(d: &Daemon, what: &str, n: usize) -> Vec<HashMap<String, String>> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let rows = leaks(d).await;
        if rows.len() == n {
            return rows;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: {rows:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_idle_in_a_transaction_is_named_once_and_forgotten_after() {
    let c = cluster();
    let db = c.create_database("leaks");
    let d = daemon(&db);
    let url = format!(
        "{}?application_name=billing-worker",
        d.url(harness::APP_USER, harness::APP_PASSWORD, &db)
    );
    let leaky = harness::connect(&url).await.unwrap();
    leaky
        .batch_execute("begin; select 42 as leaky_marker")
        .await
        .unwrap();
    // A busy client beside it is no leak.
    let busy = harness::connect(&d.url(harness::APP_USER, harness::APP_PASSWORD, &db))
        .await
        .unwrap();
    busy.batch_execute("select pg_sleep(1.5)").await.unwrap();

    let rows = leaks_become(&d, "the idle transaction is reported", 1).await;
    let r = &rows[0];
    assert_eq!(r["user"], "app");
    assert_eq!(r["database"], db);
    assert_eq!(r["application_name"], "billing-worker");
    assert_eq!(r["state"], "idle in transaction");
    assert!(r["addr"].starts_with("127.0.0.1:"), "{r:?}");
    assert!(!r["since"].is_empty());
    let queries = harness::console(&d.url("admin", ADMIN_PW, "pgbouncer"), "SHOW QUERIES").await;
    let marker = queries
        .iter()
        .find(|q| q["query"].contains("leaky_marker"))
        .expect("the statement in SHOW QUERIES");
    assert_eq!(
        r["fingerprint"], marker["fingerprint"],
        "its last statement"
    );

    // Logged once, by name, while it lasts.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let logged: Vec<_> = d
        .log_lines()
        .into_iter()
        .filter(|l| {
            l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("leak_warn_after"))
        })
        .collect();
    assert_eq!(logged.len(), 1, "{logged:?}");
    assert_eq!(logged[0]["fields"]["application_name"], "billing-worker");
    assert_eq!(logged[0]["level"], "WARN");

    // Using the server ends the report; the counter stays.
    leaky.batch_execute("commit").await.unwrap();
    leaks_become(&d, "the report goes once the client commits", 0).await;
    let (_, metrics) = harness::daemon::http_get(d.metrics_port, "/metrics");
    assert!(metrics.contains("tidepool_leaks_total{} 1"), "{metrics}");

    // A pinned client idle between transactions holds its server too.
    leaky
        .batch_execute("create temp table t (v int)")
        .await
        .unwrap();
    let rows = leaks_become(&d, "the pinned idle client is reported", 1).await;
    assert_eq!(rows[0]["state"], "pinned idle (temporary tables)");
    leaky.batch_execute("drop table t").await.unwrap();
    leaks_become(&d, "unpinned: no report", 0).await;
}
