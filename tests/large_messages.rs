//! Statements of every size answer through tidepool exactly as PostgreSQL
//! answers them, while another client keeps being served: simple queries
//! just over the first read buffer (the 1 KiB freeze), psql's own `\d`
//! catalog queries, 8 KiB, 64 KiB and 1 MiB statements. Run through the
//! shipped config's shape: a database with a streaming replica, pool of 5.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use harness::TestProxy;

/// How long `select 1` may take before the other client counts as stuck
/// (a wedged proxy never answers; a busy one answers in milliseconds).
const STUCK: Duration = Duration::from_secs(5);

/// A `select` whose Query message is exactly `total` bytes long (tag and
/// length word included), for `total` of at least 40.
fn query_of_size(total: usize) -> String {
    let head = "select length('";
    let tail = "'), md5('x')";
    // Q + len(4) + text + NUL
    let pad = total - 5 - head.len() - tail.len() - 1;
    format!("{head}{}{tail}", "x".repeat(pad))
}

/// Runs `select 1` through `url` until `stop`, counting answers; any answer
/// slower than [`STUCK`] or any error is recorded as a failure.
fn watcher(
    url: String,
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<Result<(), String>> {
    tokio::spawn(async move {
        let client = harness::connect(&url)
            .await
            .map_err(|e| format!("watcher connect: {e}"))?;
        while !stop.load(Ordering::Relaxed) {
            match tokio::time::timeout(STUCK, client.simple_query("select 1")).await {
                Ok(Ok(_)) => {
                    answered.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Err(e)) => return Err(format!("select 1 failed: {e}")),
                Err(_) => return Err(format!("select 1 took longer than {STUCK:?}")),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    })
}

/// psql's output for `args` directly and through tidepool must be the same.
async fn same_through_proxy(direct: &str, proxied: &str, args: &[&str], what: &str) {
    let d = harness::psql_async(direct, args, None).await;
    let p = harness::psql_async(proxied, args, None).await;
    let text = |o: &std::process::Output| {
        format!(
            "status {:?}\nstdout:\n{}\nstderr:\n{}",
            o.status.code(),
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    assert!(d.status.success(), "{what} directly: {}", text(&d));
    assert_eq!(text(&p), text(&d), "{what}: through tidepool vs direct");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_of_every_size_answer_like_postgres_while_others_are_served() {
    let cluster = harness::cluster_with_replica();
    let db = tokio::task::spawn_blocking(move || cluster.create_database("large_messages"))
        .await
        .unwrap();
    let direct = cluster.app_url(&db);
    let setup = harness::connect(&direct).await.unwrap();
    setup
        .batch_execute(
            "create table accounts (id int primary key, owner text not null, balance numeric);
             create index on accounts (owner);
             create function add_one(int) returns int language sql as 'select $1 + 1';
             create schema ledger;",
        )
        .await
        .unwrap();
    // Reads go to the replica: it must have the schema first.
    tokio::task::spawn_blocking(move || cluster.wait_for_replicas())
        .await
        .unwrap();
    let db_extra = format!(
        "replicas = [{{ host = \"127.0.0.1\", port = {} }}]",
        cluster.replica_ports()[0]
    );
    let proxy = TestProxy::start(&harness::proxy::config_toml(
        cluster,
        &db,
        "default_pool_size = 5",
        &db_extra,
    ));
    let proxied = proxy.url(&db);

    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let watch = watcher(proxied.clone(), stop.clone(), answered.clone());

    // The reported case, then every read-buffer threshold and the sizes
    // the issue names.
    for total in [
        897,
        1_100,
        1_536,
        1_793,
        4_095,
        4_096,
        4_097,
        8_191,
        8_192,
        8_193,
        65_535,
        65_536,
        65_537,
        1 << 20,
    ] {
        let sql = query_of_size(total);
        // One argument may hold at most 128 KiB (MAX_ARG_STRLEN).
        if total < 100_000 {
            same_through_proxy(
                &direct,
                &proxied,
                &["-At", "-c", &sql],
                &format!("a {total}-byte simple query"),
            )
            .await;
        }
        // The same text as a file, the way the report ran it.
        let d = harness::psql_async(&direct, &["-At", "-f", "-"], Some(&format!("{sql};\n"))).await;
        let p =
            harness::psql_async(&proxied, &["-At", "-f", "-"], Some(&format!("{sql};\n"))).await;
        assert_eq!(p.stdout, d.stdout, "{total} bytes through psql -f");
        assert!(p.status.success(), "{}", String::from_utf8_lossy(&p.stderr));
    }

    // psql's describe commands send catalog queries of 1-2 KiB.
    for cmd in [
        "\\d accounts",
        "\\d",
        "\\dt",
        "\\df",
        "\\df add_one",
        "\\dn",
        "\\du",
        "\\di",
        "\\l",
    ] {
        same_through_proxy(&direct, &proxied, &["-c", cmd], cmd).await;
    }
    // The same with -E (psql prints the queries it sends).
    same_through_proxy(&direct, &proxied, &["-E", "-c", "\\d accounts"], "-E \\d").await;

    stop.store(true, Ordering::Relaxed);
    watch.await.unwrap().unwrap();
    assert!(
        answered.load(Ordering::Relaxed) > 0,
        "the other client was served throughout"
    );
    // The watcher's `select 1` and a new client still work afterwards.
    let fresh = proxy.client(&db).await;
    fresh.simple_query("select 1").await.unwrap();
}
