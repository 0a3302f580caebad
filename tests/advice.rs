//! Pool-sizing advice: under pgbench, SHOW ADVICE recommends more servers
//! for a pool too small for the load and fewer for an oversized one, each
//! with the figures it used (arrival rate, server time, busy servers,
//! utilization, the server's max_connections) and its reasoning; SHOW POOLS
//! has the utilization and `/metrics` both.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::collections::HashMap;
use std::time::Duration;

use harness::{TestProxy, cluster};

const ADMIN_PW: &str = "adminpw";

fn proxy(db: &str, size: u32) -> TestProxy {
    TestProxy::start(&harness::proxy::admin_config(
        cluster(),
        db,
        ADMIN_PW,
        &format!("default_pool_size = {size}\nmax_client_conn = 100"),
        "",
        "[stats]\nstats_period = \"1s\"",
    ))
}

/// Runs 4 pgbench clients, each transaction 20 ms on the server, for
/// `secs`, while polling SHOW ADVICE until `done` accepts its row.
async fn advice_under_load(
    p: &TestProxy,
    db: &str,
    secs: u32,
    done: impl Fn(&HashMap<String, String>) -> bool,
) -> HashMap<String, String> {
    let script =
        std::env::temp_dir().join(format!("tidepool-advice-{}-{db}.sql", std::process::id()));
    std::fs::write(&script, "select pg_sleep(0.02);\n").unwrap();
    let url = p.url(db);
    let args = [
        "-n".to_owned(),
        "-c".to_owned(),
        "4".to_owned(),
        "-j".to_owned(),
        "2".to_owned(),
        "-T".to_owned(),
        secs.to_string(),
        "-f".to_owned(),
        script.display().to_string(),
    ];
    let load = tokio::spawn(async move {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        harness::pgbench_async(&url, &args).await
    });
    let admin = p.url_as("admin", Some(ADMIN_PW), "pgbouncer");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(u64::from(secs));
    let mut last = HashMap::new();
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rows = harness::console(&admin, "SHOW ADVICE").await;
        if let Some(r) = rows.into_iter().find(|r| r["database"] == db) {
            if done(&r) {
                last = r;
                break;
            }
            last = r;
        }
    }
    let out = load.await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_file(&script);
    last
}

fn num(r: &HashMap<String, String>, k: &str) -> f64 {
    r[k].parse().unwrap_or_else(|_| panic!("{k} in {r:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_small_a_pool_is_told_to_grow_and_too_large_one_to_shrink() {
    let c = cluster();

    // Four clients, 20 ms each, on 2 servers: both busy all the time.
    let small = c.create_database("advicesmall");
    let p = proxy(&small, 2);
    let r = advice_under_load(&p, &small, 8, |r| {
        !r["recommended_size"].is_empty() && !r["max_connections"].is_empty()
    })
    .await;
    let rec: u32 = r["recommended_size"].parse().unwrap_or(0);
    assert!(rec > 2, "more than 2: {r:?}");
    assert!(num(&r, "utilization") > 80.0, "{r:?}");
    assert!(
        num(&r, "arrival_rate") > 10.0 && num(&r, "server_time_ms") >= 20.0,
        "{r:?}"
    );
    assert!(
        r["reasoning"].contains("Little's law") && r["reasoning"].contains("more"),
        "{r:?}"
    );
    assert!(
        num(&r, "max_connections") >= 10.0,
        "read from the server: {r:?}"
    );
    let pools = harness::console(
        &p.url_as("admin", Some(ADMIN_PW), "pgbouncer"),
        "SHOW POOLS",
    )
    .await;
    let row = pools.iter().find(|x| x["database"] == small).unwrap();
    assert!(!row["utilization"].is_empty(), "{row:?}");
    let metrics = tidepool::http::metrics::render(&p.shared).unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("tidepool_pool_recommended_size{") && l.contains(&small)),
        "{metrics}"
    );
    drop(p);

    // The same load on 40 servers: most sit idle.
    let large = c.create_database("advicelarge");
    let p = proxy(&large, 40);
    let r = advice_under_load(&p, &large, 8, |r| !r["recommended_size"].is_empty()).await;
    let rec: u32 = r["recommended_size"].parse().unwrap_or(u32::MAX);
    assert!(rec < 40, "fewer than 40: {r:?}");
    assert!(num(&r, "utilization") < 50.0, "{r:?}");
    assert!(r["reasoning"].contains("fewer"), "{r:?}");
}
