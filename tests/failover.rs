//! Failover: the primary is killed (`kill -9`), an operator promotes a
//! replica (`pg_ctl promote`), and with `[routing] failover = "auto"`
//! tidepool notices (the replica answers `pg_is_in_recovery()` false) and
//! sends writes there by itself, while reads keep flowing on the other
//! replica; every write that failed meanwhile failed at the client, and
//! none of them is found afterwards. With `failover = "manual"` writes wait
//! for a RELOAD naming the new primary.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use harness::{Cluster, TestProxy};

const DEADLINE: Duration = Duration::from_secs(60);

fn config(c: &Cluster, db: &str, failover: &str) -> String {
    let ports = c.replica_ports();
    format!(
        "{}\n[routing]\nhealth_check_period = \"200ms\"\nmax_replica_lag = \"3s\"\nfailover = \"{failover}\"\n",
        harness::proxy::config_toml(
            c,
            db,
            "default_pool_size = 4\nserver_connect_timeout = \"2s\"\nquery_wait_timeout = \"10s\"",
            &format!(
                "replicas = [{{ host = \"127.0.0.1\", port = {} }}, {{ host = \"127.0.0.1\", port = {} }}]",
                ports[0], ports[1]
            ),
        )
    )
    .replace("[tidepool]\n", "[tidepool]\nstats_users = [\"app\"]\n")
}

async fn setup(prefix: &'static str) -> (Arc<Cluster>, String) {
    tokio::task::spawn_blocking(move || {
        let c = Cluster::start_new(2);
        let db = c.create_database(prefix);
        c.wait_for_replicas();
        (Arc::new(c), db)
    })
    .await
    .unwrap()
}

/// tidepool in front of the cluster with `failover = mode`, and the table
/// the writes go to; the client URL.
async fn start(c: &Cluster, db: &str, mode: &str) -> (TestProxy, String) {
    let proxy = TestProxy::start(&config(c, db, mode));
    c.admin_client(db)
        .await
        .simple_query("create table t (id bigint primary key); grant all on t to app")
        .await
        .unwrap();
    let url = proxy.url(db);
    (proxy, url)
}

/// A write through tidepool; Ok(the port of the server that took it).
async fn write(url: &str, id: i64) -> Result<u16, String> {
    let run = async {
        let c = harness::connect(url).await.map_err(|e| e.to_string())?;
        let rows = c
            .simple_query(&format!(
                "begin; insert into t values ({id}); select inet_server_port(); commit"
            ))
            .await
            .map_err(|e| e.to_string())?;
        rows.iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(|p| p.parse().unwrap()),
                _ => None,
            })
            .ok_or_else(|| "no row".to_owned())
    };
    // Never a hang: failures come back within the timeouts.
    tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .unwrap_or_else(|_| panic!("a write hung"))
}

/// Reads through one client until `stop`: (answered, failed).
fn read_load(url: String, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<(u64, u64)> {
    tokio::spawn(async move {
        let ok = AtomicU64::new(0);
        let mut failed = 0;
        let mut client = harness::connect(&url).await.ok();
        while !stop.load(Ordering::Relaxed) {
            let Some(c) = &client else {
                client = harness::connect(&url).await.ok();
                failed += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            match tokio::time::timeout(
                Duration::from_secs(30),
                c.simple_query("select count(*) from t"),
            )
            .await
            {
                Ok(Ok(_)) => {
                    ok.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Err(_)) => {
                    failed += 1;
                    client = None;
                }
                Err(_) => panic!("a read hung"),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (ok.load(Ordering::Relaxed), failed)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_failover_sends_writes_to_the_promoted_replica() {
    let (c, db) = setup("failover_auto").await;
    let (proxy, url) = start(&c, &db, "auto").await;
    let primary = c.primary_port();
    assert_eq!(write(&url, 1).await.unwrap(), primary);
    let c2 = c.clone();
    tokio::task::spawn_blocking(move || c2.wait_for_replicas())
        .await
        .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let reads = read_load(url.clone(), stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The primary crashes: writes fail at the client (never hang, never
    // reported committed).
    let c2 = c.clone();
    tokio::task::spawn_blocking(move || c2.kill_primary())
        .await
        .unwrap();
    let mut failed_ids = Vec::new();
    for id in 100..103 {
        match write(&url, id).await {
            Err(_) => failed_ids.push(id),
            Ok(port) => panic!("a write reported committed on {port} with the primary dead"),
        }
    }

    // The operator promotes replica 0; tidepool follows by itself.
    let c2 = c.clone();
    tokio::task::spawn_blocking(move || c2.promote_replica(0))
        .await
        .unwrap();
    let promoted = c.replica_ports()[0];
    let mut id = 200;
    harness::wait_until_async("writes reach the promoted replica", DEADLINE, || {
        id += 1;
        let url = url.clone();
        async move { write(&url, id).await == Ok(promoted) }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let (read_ok, _read_failed) = reads.await.unwrap();
    assert!(read_ok > 0, "reads kept flowing on the other replica");

    // Nothing that failed at the client is there; what succeeded is.
    let newp = c.admin_client_on(promoted, &db).await;
    let rows = newp
        .query("select id from t order by id", &[])
        .await
        .unwrap();
    let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    for f in &failed_ids {
        assert!(
            !ids.contains(f),
            "write {f} failed at the client but is there: {ids:?}"
        );
    }
    assert!(ids.contains(&1) && ids.contains(&id), "{ids:?}");

    // The console and /metrics say where writes go.
    let console = proxy.url_as("app", Some(harness::APP_PASSWORD), "pgbouncer");
    let replicas = harness::console(&console, "SHOW REPLICAS").await;
    let writer: Vec<&String> = replicas
        .iter()
        .filter(|r| r["writer"] == "1")
        .map(|r| &r["database"])
        .collect();
    assert_eq!(writer, [&format!("{db}@replica1")], "{replicas:?}");
    // A primary now: no lag (its last one as a replica is gone), as the
    // configured primary shows.
    harness::wait_until_async("the writer to show no lag", DEADLINE, || async {
        harness::console(&console, "SHOW REPLICAS")
            .await
            .iter()
            .any(|r| r["writer"] == "1" && r["lag_ms"] == "0" && r["lag_bytes"] == "0")
    })
    .await;
    // The other replica still follows the dead primary: measured against
    // the new writer's WAL, it falls behind and stops serving reads (it
    // would serve stale rows).
    harness::wait_until_async("the stale replica is banned", DEADLINE, || async {
        harness::console(&console, "SHOW REPLICAS")
            .await
            .iter()
            .any(|r| r["database"] == format!("{db}@replica2") && r["reason"].contains("lagging"))
    })
    .await;
    // Promoted too (split brain): fenced, never followed, and following no
    // one its lag is unknown (its last one, lagging, showed before).
    let c2 = c.clone();
    tokio::task::spawn_blocking(move || c2.promote_replica(1))
        .await
        .unwrap();
    harness::wait_until_async("the second promoted replica to show", DEADLINE, || async {
        harness::console(&console, "SHOW REPLICAS")
            .await
            .iter()
            .any(|r| {
                r["database"] == format!("{db}@replica2")
                    && r["reason"].contains("promoted")
                    && r["lag_ms"].is_empty()
                    && r["lag_bytes"].is_empty()
            })
    })
    .await;
    let metrics = tidepool::http::metrics::render(&proxy.shared).unwrap();
    assert!(
        metrics.contains(&format!("tidepool_failovers_total{{database=\"{db}\"}} 1")),
        "{metrics}"
    );
    let (ready, body) = tidepool::http::ready(&proxy.shared).await;
    assert!(ready, "ready again once writes have a home: {body}");

    // A RELOAD of the same config keeps writes where failover put them
    // (the old primary is fenced, even once it is back as a primary).
    let c2 = c.clone();
    tokio::task::spawn_blocking(move || c2.start_primary())
        .await
        .unwrap();
    proxy
        .shared
        .apply(tidepool::Config::from_toml_str(&config(&c, &db, "auto"), "reload.toml").unwrap());
    tokio::time::sleep(Duration::from_secs(1)).await;
    for n in 0..5 {
        assert_eq!(write(&url, 900 + n).await, Ok(promoted), "after the reload");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_failover_waits_for_a_reload_naming_the_new_primary() {
    let (c, db) = setup("failover_manual").await;
    let (proxy, url) = start(&c, &db, "manual").await;
    write(&url, 1).await.unwrap();
    let c2 = c.clone();
    tokio::task::spawn_blocking(move || {
        c2.wait_for_replicas();
        c2.kill_primary();
        c2.promote_replica(0);
    })
    .await
    .unwrap();
    // Several health rounds later, writes still fail: no one said where.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(write(&url, 2).await.is_err());

    // RELOAD with the promoted replica as the primary.
    let promoted = c.replica_ports()[0];
    let toml = config(&c, &db, "manual").replacen(
        &format!("port = {}\n", c.primary_port()),
        &format!("port = {promoted}\n"),
        1,
    );
    proxy
        .shared
        .apply(tidepool::Config::from_toml_str(&toml, "reload.toml").unwrap());
    let mut id = 10;
    harness::wait_until_async("writes reach the new primary", DEADLINE, || {
        id += 1;
        let url = url.clone();
        async move { write(&url, id).await == Ok(promoted) }
    })
    .await;
}

/// A session tied to its server (pinned by an advisory lock) on the
/// primary when a failover fences it: the primary is still up and the
/// session's connection with it (only new connections are refused, so its
/// health checks fail), but writes now belong to the promoted replica. The
/// session's next statement gets FATAL 57P01 and runs nowhere: it wrote on
/// the fenced primary, diverging from the new one, before. A session that
/// is not tied to its server writes on the promoted replica. (With several
/// users configured, a primary refusing logins also stopped the health
/// rounds before the replicas and the writer's fate: writes never moved.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_pinned_to_a_fenced_primary_is_ended() {
    let (c, db) = setup("failover_pinned").await;
    let (_proxy, url) = start(&c, &db, "auto").await;
    let primary = c.primary_port();
    let pinned = harness::connect(&url).await.unwrap();
    pinned
        .batch_execute("select pg_advisory_lock(7)")
        .await
        .unwrap();
    assert_eq!(harness::server_port(&pinned).await.unwrap(), primary);

    // New connections to the primary are refused and the health checker's
    // is ended (its checks fail); the pinned session's connection stays.
    // The operator promotes a replica.
    let hba = c.primary_data_dir().join("pg_hba.conf");
    let text = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!(
            "host all postgres 127.0.0.1/32 scram-sha-256\nhost all all 127.0.0.1/32 reject\n{text}"
        ),
    )
    .unwrap();
    let c2 = c.clone();
    let db2 = db.clone();
    tokio::task::spawn_blocking(move || {
        c2.wait_for_replicas();
        c2.reload_primary();
        c2.primary_sql(
            &db2,
            "select pg_terminate_backend(pid) from pg_stat_activity where application_name = 'tidepool-health'",
        );
        c2.promote_replica(0);
    })
    .await
    .unwrap();
    let promoted = c.replica_ports()[0];
    let mut id = 10;
    harness::wait_until_async("writes reach the promoted replica", DEADLINE, || {
        id += 1;
        let url = url.clone();
        async move { write(&url, id).await == Ok(promoted) }
    })
    .await;

    let e = tokio::time::timeout(
        Duration::from_secs(30),
        pinned.batch_execute("insert into t values (1000)"),
    )
    .await
    .expect("answered, not held")
    .unwrap_err();
    let db_error = e.as_db_error().unwrap_or_else(|| panic!("{e:?}"));
    assert_eq!(db_error.code().code(), "57P01", "{e:?}");
    assert!(db_error.message().contains("fenced"), "{e:?}");
    assert!(pinned.is_closed() || pinned.simple_query("select 1").await.is_err());
    let old = c.admin_client_on(primary, &db).await;
    let n: i64 = old
        .query_one("select count(*) from t where id = 1000", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "the write ran on the fenced primary");
    // Its lock went with its server connection.
    harness::wait_until_async("the lock to be released", DEADLINE, || {
        let old = &old;
        async move {
            old.query_one(
                "select count(*) from pg_locks where locktype = 'advisory'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
                == 0
        }
    })
    .await;
}
