//! Limits that protect the database: idle clients closed
//! (`client_idle_timeout`, with PostgreSQL's idle-session code; a client
//! idle inside a transaction is left to `idle_transaction_timeout`),
//! `query_timeout`, the reserve pool, per-user and per-database caps on
//! clients and servers, rate limits (their exactness with 1,000 clients)
//! and the bound on bytes buffered for clients. Shared rate limits are in
//! tests/shared_limits.rs, peak memory in tests/memory_bound.rs.

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
    let metrics = tidepool::http::metrics::render(&proxy.shared).unwrap();
    assert!(
        metrics.contains("tidepool_limit_events_total{reason=\"query_timeout\"} 2"),
        "{metrics}"
    );
    client.simple_query("begin").await.unwrap();
    for _ in 0..6 {
        client.simple_query("select pg_sleep(0.3)").await.unwrap();
    }
    client.simple_query("commit").await.unwrap();
    // No backend is left running the canceled sleeps.
    let admin = c.admin_client(&db).await;
    let left = admin
        .query_one(
            "select count(*) from pg_stat_activity where datname = current_database() and query like 'select pg_sleep(%' and state = 'active' and pid <> pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(left, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_waited_reserve_pool_timeout_gets_a_reserve_connection() {
    let c = cluster();
    let db = c.create_database("reserve_pool");
    let proxy = TestProxy::start(
        &harness::proxy::config_toml(
            c,
            &db,
            "default_pool_size = 2\nreserve_pool_size = 1\nreserve_pool_timeout = \"1s\"\nquery_wait_timeout = \"30s\"",
            "",
        )
        .replace("[tidepool]\n", "[tidepool]\nstats_users = [\"app\"]\n"),
    );
    // Two clients hold both servers.
    let holders = [proxy.client(&db).await, proxy.client(&db).await];
    for h in &holders {
        h.simple_query("begin; select 1").await.unwrap();
    }
    // A third waits, then runs on a reserve connection.
    let third = proxy.client(&db).await;
    let started = Instant::now();
    let backends = harness::first_value(
        &third,
        "select count(*) from pg_stat_activity where datname = current_database()",
    )
    .await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "served after {waited:?}"
    );
    assert_eq!(backends, "3", "two pooled connections and one reserve");
    let metrics = tidepool::http::metrics::render(&proxy.shared).unwrap();
    assert!(
        metrics.contains("tidepool_limit_events_total{reason=\"reserve_pool\"} 1"),
        "{metrics}"
    );
    // A fourth waits too: the one reserve connection is in use... until the
    // third's transaction ended and closed it; then the fourth gets it.
    let fourth = proxy.client(&db).await;
    assert_eq!(harness::first_value(&fourth, "select 4").await, "4");
    // SHOW DATABASES shows the reserve pool.
    let console = harness::console(
        &proxy.url_as("app", Some(harness::APP_PASSWORD), "pgbouncer"),
        "SHOW DATABASES",
    )
    .await;
    let row = console.iter().find(|r| r["name"] == db).unwrap();
    assert_eq!(row["reserve_pool_size"], "1");
    for h in &holders {
        h.simple_query("commit").await.unwrap();
    }
    // Reserve connections do not stay: back to at most two.
    harness::wait_until_async("reserve closed", Duration::from_secs(10), || async {
        harness::first_value(
            &third,
            "select count(*) from pg_stat_activity where datname = current_database()",
        )
        .await
            == "2"
    })
    .await;
}

fn rate_limited_proxy(c: &harness::Cluster, db: &str, tiers: &str, wait: &str) -> TestProxy {
    let toml = harness::proxy::config_toml(c, db, "default_pool_size = 4", "")
        .replace("[tidepool]\n", "[tidepool]\nstats_users = [\"app\"]\n")
        .replace(
            "[users.app]\n",
            "[users.app]\nrate_limit_tier = \"limited\"\n",
        )
        + &format!("\n[rate_limits]\nrate_limit_wait = \"{wait}\"\n[rate_limits.tiers]\n{tiers}\n");
    TestProxy::start(&toml)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_admits_rate_times_time_plus_burst_across_clients() {
    let c = cluster();
    let db = c.create_database("rate_limit");
    let proxy = rate_limited_proxy(c, &db, "limited = { per_second = 20, burst = 2 }", "0s");
    // 20 clients hammer one limit for about a second.
    let mut clients = Vec::new();
    for _ in 0..20 {
        clients.push(proxy.client(&db).await);
    }
    let started = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|client| {
            tokio::spawn(async move {
                let (mut ok, mut refused) = (0u64, 0u64);
                while started.elapsed() < Duration::from_millis(1000) {
                    match client.simple_query("select 1").await {
                        Ok(_) => ok += 1,
                        Err(e) => {
                            let d = e.as_db_error().expect("an error from tidepool");
                            assert_eq!(d.code().code(), "53400");
                            assert!(d.message().contains("tier limited"), "{}", d.message());
                            refused += 1;
                        }
                    }
                }
                (ok, refused)
            })
        })
        .collect();
    let (mut ok, mut refused) = (0, 0);
    for t in tasks {
        let (a, r) = t.await.unwrap();
        ok += a;
        refused += r;
    }
    let elapsed = started.elapsed().as_secs_f64();
    // GCRA: burst + 1 at once, then one per 50 ms.
    let most = 3 + (elapsed * 20.0).floor() as u64;
    assert!(ok <= most, "admitted {ok} in {elapsed:.2}s, at most {most}");
    assert!(
        ok + 2 >= 3 + (1.0f64 * 20.0) as u64 - 1,
        "admitted only {ok}"
    );
    assert!(refused > 0);

    // The console and /metrics count it.
    let console = proxy.url_as("app", Some(harness::APP_PASSWORD), "pgbouncer");
    let rows = harness::console(&console, "SHOW RATE_LIMITS").await;
    let row = rows
        .iter()
        .find(|r| r["scope"] == "user" && r["name"] == "app")
        .unwrap();
    assert_eq!(row["tier"], "limited");
    assert_eq!(row["admitted"], ok.to_string());
    assert_eq!(row["rejected"], refused.to_string());
    let metrics = tidepool::http::metrics::render(&proxy.shared).unwrap();
    assert!(
        metrics.contains(&format!(
            "tidepool_rate_limit_rejected_total{{scope=\"user\",name=\"app\",tier=\"limited\"}} {refused}"
        )),
        "{metrics}"
    );
}

/// Logins at once cannot both take the last place under a client cap: the
/// count and the listing are one step (a test that once passed only
/// because the logins came one after another).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_caps_hold_under_logins_at_once() {
    let c = cluster();
    let db = c.create_database("client_caps_race");
    let proxy = TestProxy::start(&harness::proxy::config_toml(
        c,
        &db,
        "",
        "max_db_client_connections = 3",
    ));
    for _round in 0..3 {
        let url = proxy.url_as(harness::TRUST_USER, None, &db);
        let attempts: Vec<_> = (0..24)
            .map(|_| {
                let url = url.clone();
                tokio::spawn(async move { harness::connect(&url).await })
            })
            .collect();
        let mut kept = Vec::new();
        for a in attempts {
            match a.await.unwrap() {
                Ok(client) => kept.push(client),
                Err(e) => assert_eq!(
                    e.as_db_error().map(|d| d.code().code()),
                    Some("53300"),
                    "{e}"
                ),
            }
        }
        assert_eq!(
            kept.len(),
            3,
            "logins admitted under max_db_client_connections = 3"
        );
        drop(kept);
        harness::wait_until_async("clients gone", Duration::from_secs(10), || async {
            proxy.shared.list.is_empty()
        })
        .await;
    }
}

/// A transaction that its database's limit refuses costs its user's limit
/// nothing (the user's token was spent, and the user was refused on
/// another database with room).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_by_one_limit_costs_the_others_nothing() {
    let c = cluster();
    let (db1, db2) = (
        c.create_database("rate_both_a"),
        c.create_database("rate_both_b"),
    );
    let toml =
        harness::proxy::config_toml(c, &db1, "default_pool_size = 2", "rate_limit_tier = \"db\"")
            .replace("[users.app]\n", "[users.app]\nrate_limit_tier = \"user\"\n")
            + &another_database(c, &db2)
            + "\n[rate_limits]\nrate_limit_wait = \"0s\"\n[rate_limits.tiers]\n\
           user = { per_minute = 1, burst = 1 }\ndb = { per_minute = 1, burst = 0 }\n";
    let proxy = TestProxy::start(&toml);
    let code = |r: Result<Vec<tokio_postgres::SimpleQueryMessage>, tokio_postgres::Error>| {
        r.err().map(|e| {
            e.as_db_error()
                .expect("an error response")
                .code()
                .code()
                .to_owned()
        })
    };
    let on1 = proxy.client(&db1).await;
    let on2 = proxy.client(&db2).await;
    // The user has two (burst 1), db1 one.
    assert_eq!(code(on1.simple_query("select 1").await), None);
    assert_eq!(
        code(on1.simple_query("select 2").await).as_deref(),
        Some("53400"),
        "db1's limit is spent"
    );
    // The user's second is still there, for db2.
    assert_eq!(code(on2.simple_query("select 3").await), None);
    assert_eq!(
        code(on2.simple_query("select 4").await).as_deref(),
        Some("53400")
    );
}

/// The exactness, at its scale: 1,000 clients on one limit (the
/// database's) for two seconds admit burst + 1 + rate × time, to within
/// one, and every other request gets 53400 at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_clients_on_one_limit_get_exactly_its_rate() {
    let c = cluster();
    let db = c.create_database("rate_thousand");
    let toml = harness::proxy::config_toml(
        c,
        &db,
        "default_pool_size = 4\nmax_client_conn = 1100",
        "rate_limit_tier = \"limited\"",
    ) + "\n[rate_limits]\n[rate_limits.tiers]\nlimited = { per_second = 50, burst = 10 }\n";
    let proxy = TestProxy::start(&toml);
    let mut clients = Vec::new();
    for _ in 0..1000 {
        clients.push(Raw::login_trust(proxy.port(), &db).await);
    }
    let started = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut client| {
            tokio::spawn(async move {
                let (mut ok, mut refused) = (0u64, 0u64);
                while started.elapsed() < Duration::from_secs(2) {
                    client.send(&raw::query("select 1")).await;
                    let msgs = client.read_until_ready().await;
                    match msgs.iter().find(|m| m.tag == b'E') {
                        None => ok += 1,
                        Some(e) => {
                            assert_eq!(e.code().as_deref(), Some("53400"), "{:?}", e.message());
                            refused += 1;
                        }
                    }
                    // Each client asks again after a little while, so that
                    // 1,000 of them keep the limit busy without spinning.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                (ok, refused)
            })
        })
        .collect();
    let (mut ok, mut refused) = (0, 0);
    for t in tasks {
        let (a, r) = t.await.unwrap();
        ok += a;
        refused += r;
    }
    let elapsed = started.elapsed();
    let most = 11 + elapsed.as_millis() as u64 / 20;
    assert!(ok <= most, "admitted {ok} in {elapsed:?}, at most {most}");
    // Demand never stopped for 2 s: at least the burst and 2 s' worth, but one.
    assert!(ok + 1 >= 11 + 100, "admitted only {ok} in {elapsed:?}");
    assert!(refused > 1000, "{refused}");
    let rows = proxy.shared.rate_limits.all();
    assert_eq!(rows.len(), 1);
    assert_eq!(
        rows[0].admitted.load(std::sync::atomic::Ordering::Relaxed),
        ok
    );
    assert_eq!(
        rows[0].rejected.load(std::sync::atomic::Ordering::Relaxed),
        refused
    );
}

/// `max_user_connections`: one user's server connections across all its
/// pools (two databases here) stay under the cap; a reload raises it.
/// A `[databases]` table for `db` on the cluster's primary, to append to
/// a config.
fn another_database(c: &harness::Cluster, db: &str) -> String {
    format!(
        "\n[databases.{db}]\nhost = \"127.0.0.1\"\nport = {}\n",
        c.primary_port()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_user_connections_caps_a_user_across_databases() {
    let c = cluster();
    let (db1, db2) = (
        c.create_database("user_cap_a"),
        c.create_database("user_cap_b"),
    );
    let toml = harness::proxy::config_toml(
        c,
        &db1,
        "max_user_connections = 2\nquery_wait_timeout = \"30s\"",
        "",
    )
    .replace("[tidepool]\n", "[tidepool]\nstats_users = [\"app\"]\n")
        + &another_database(c, &db2);
    let proxy = TestProxy::start(&toml);
    let admin = c.admin_client("postgres").await;
    let mut clients = Vec::new();
    for i in 0..6 {
        clients.push(proxy.client(if i % 2 == 0 { &db1 } else { &db2 }).await);
    }
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|c| {
            tokio::spawn(async move {
                c.simple_query("select pg_sleep(0.3)").await.unwrap();
            })
        })
        .collect();
    let mut most = 0;
    let mut dbs_seen = std::collections::HashSet::new();
    for _ in 0..12 {
        for row in admin
            .query(
                "select datname::text from pg_stat_activity where usename = 'app' and datname = any($1)",
                &[&vec![db1.clone(), db2.clone()]],
            )
            .await
            .unwrap()
        {
            dbs_seen.insert(row.get::<_, String>(0));
        }
        let n: i64 = admin
            .query_one(
                "select count(*) from pg_stat_activity where usename = 'app' and datname = any($1)",
                &[&vec![db1.clone(), db2.clone()]],
            )
            .await
            .unwrap()
            .get(0);
        most = most.max(n);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(
        most <= 2,
        "{most} servers for app under max_user_connections = 2"
    );
    assert!(most >= 1 && !dbs_seen.is_empty());
    let rows = harness::console(
        &proxy.url_as("app", Some(harness::APP_PASSWORD), "pgbouncer"),
        "SHOW USERS",
    )
    .await;
    let app = rows.iter().find(|r| r["name"] == "app").unwrap();
    assert_eq!(app["max_user_connections"], "2", "{app:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_limit_a_transaction_waits_up_to_rate_limit_wait() {
    let c = cluster();
    let db = c.create_database("rate_wait");
    let proxy = rate_limited_proxy(c, &db, "limited = { per_second = 10, burst = 0 }", "2s");
    let mut clients = Vec::new();
    for _ in 0..10 {
        clients.push(proxy.client(&db).await);
    }
    // All at once (one after another, a slow round trip would arrive after
    // its slot and not wait).
    let started = Instant::now();
    for r in
        futures_util::future::join_all(clients.iter().map(|c| c.simple_query("select 1"))).await
    {
        r.unwrap();
    }
    // One at once, then one per 100 ms: nine waits.
    assert!(
        started.elapsed() >= Duration::from_millis(800),
        "{:?}",
        started.elapsed()
    );
    let console = proxy.url_as("app", Some(harness::APP_PASSWORD), "pgbouncer");
    let rows = harness::console(&console, "SHOW RATE_LIMITS").await;
    assert!(rows[0]["waited"].parse::<u64>().unwrap() >= 8, "{rows:?}");
    assert_eq!(rows[0]["rejected"], "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_caps_per_user_and_per_database() {
    let c = cluster();
    let db = c.create_database("client_caps");
    let proxy = TestProxy::for_db(c, &db, "max_user_client_connections = 2");
    let _a = proxy.client(&db).await;
    let _b = proxy.client(&db).await;
    let e = harness::connect(&proxy.url(&db)).await.err().unwrap();
    let d = e.as_db_error().unwrap();
    assert_eq!(d.code().code(), "53300");
    assert!(
        d.message().contains("max_user_client_connections = 2"),
        "{}",
        d.message()
    );
    let metrics = tidepool::http::metrics::render(&proxy.shared).unwrap();
    assert!(
        metrics.contains("tidepool_limit_events_total{reason=\"max_user_client_connections\"} 1"),
        "{metrics}"
    );
    // Another user is not counted against app.
    let other =
        harness::connect(&proxy.url_as(harness::MD5_USER, Some(harness::MD5_PASSWORD), &db)).await;
    assert!(other.is_ok());
    drop(_a);
    harness::wait_until_async("a slot again", Duration::from_secs(10), || async {
        harness::connect(&proxy.url(&db)).await.is_ok()
    })
    .await;

    let per_db = TestProxy::start(&harness::proxy::config_toml(
        c,
        &db,
        "",
        "max_db_client_connections = 1",
    ));
    let _one = per_db.client(&db).await;
    let e = harness::connect(&per_db.url(&db)).await.err().unwrap();
    assert!(
        e.as_db_error()
            .unwrap()
            .message()
            .contains("max_db_client_connections = 1"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_db_connections_holds_and_follows_a_reload() {
    let c = cluster();
    let db = c.create_database("db_caps");
    let toml = |max: u32| {
        format!(
            "[tidepool]\nlisten = [\"127.0.0.1:{{port}}\"]\n\
             [pool]\ndefault_pool_size = 10\nmax_db_connections = {max}\nquery_wait_timeout = \"30s\"\n\
             [databases.{db}]\nhost = \"127.0.0.1\"\nport = {}\n\
             [users.app]\npassword = \"{}\"\n",
            c.primary_port(),
            harness::APP_PASSWORD
        )
    };
    let d = harness::daemon::Daemon::start(&toml(2));
    let url = d.url("app", harness::APP_PASSWORD, &db);
    let admin = c.admin_client(&db).await;
    let servers = || async {
        harness::first_value(
            &admin,
            "select count(*) from pg_stat_activity where datname = current_database() and pid <> pg_backend_pid()",
        )
        .await
        .parse::<u32>()
        .unwrap()
    };
    // Every client runs `sql` at once; the most servers seen meanwhile.
    let servers = &servers;
    // `whole`: sample for as long as any runs (a fixed window missed
    // servers slow to open); else the first 400 ms.
    let round = |clients: Vec<tokio_postgres::Client>, sql: &'static str, whole: bool| async move {
        let tasks: Vec<_> = clients
            .into_iter()
            .map(|c| {
                tokio::spawn(async move {
                    c.simple_query(sql).await.unwrap();
                    c
                })
            })
            .collect();
        let mut most = 0;
        let mut samples = 0;
        while if whole {
            tasks.iter().any(|t| !t.is_finished())
        } else {
            samples < 8
        } {
            most = most.max(servers().await);
            samples += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut clients = Vec::new();
        for t in tasks {
            clients.push(t.await.unwrap());
        }
        (clients, most)
    };
    // Six clients, one transaction each at once: never more than two servers.
    let mut clients = Vec::new();
    for _ in 0..6 {
        clients.push(harness::connect(&url).await.unwrap());
    }
    let (clients, most) = round(clients, "select pg_sleep(0.3)", false).await;
    assert!(most <= 2, "{most} servers under max_db_connections = 2");
    // Raised by a reload: four at once now.
    d.write_config(&toml(4).replace("{port}", &d.port.to_string()));
    d.signal(libc::SIGHUP);
    harness::wait_until("the reload", Duration::from_secs(10), || {
        d.log().contains("config reloaded")
    });
    let (clients, most) = round(clients, "select pg_sleep(0.5)", true).await;
    assert!(
        (3..=4).contains(&most),
        "{most} servers under max_db_connections = 4"
    );
    // Lowered by a reload: the idle servers over the new cap close at once
    // (they used to stay until server_idle_timeout), and the load gets one.
    assert!(servers().await >= 3, "the servers stay idle in the pool");
    d.write_config(&toml(1).replace("{port}", &d.port.to_string()));
    d.signal(libc::SIGHUP);
    harness::wait_until_async(
        "idle servers over the cap to close",
        Duration::from_secs(10),
        || async { servers().await <= 1 },
    )
    .await;
    let (_, most) = round(clients, "select pg_sleep(0.2)", false).await;
    assert!(most <= 1, "{most} servers under max_db_connections = 1");
}

/// The configuration: 1,000 pgbench clients on a pool of 25 (10 kept
/// warm, 5 in reserve after 3 s, 100 per database at most) never open more
/// than the pool and its reserve, and every transaction succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_clients_on_a_pool_of_twenty_five() {
    let c = cluster();
    let db = c.create_database("thousand");
    let init = harness::pgbench_async(&c.app_url(&db), &["-i", "-s", "1", "-q"]).await;
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let proxy = TestProxy::start(&harness::proxy::config_toml(
        c,
        &db,
        "max_client_conn = 1100\ndefault_pool_size = 25\nmin_pool_size = 10\n\
         reserve_pool_size = 5\nreserve_pool_timeout = \"3s\"\nmax_db_connections = 100\n\
         query_wait_timeout = \"120s\"",
        "",
    ));
    let admin = c.admin_client(&db).await;
    let url = proxy.url(&db);
    let bench = tokio::spawn(async move {
        harness::pgbench_async(&url, &["-n", "-S", "-c", "1000", "-j", "4", "-t", "10"]).await
    });
    let mut most = 0u32;
    while !bench.is_finished() {
        let n: u32 = harness::first_value(
            &admin,
            "select count(*) from pg_stat_activity where datname = current_database() and pid <> pg_backend_pid()",
        )
        .await
        .parse()
        .unwrap();
        most = most.max(n);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = bench.await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && text.contains("number of transactions actually processed: 10000/10000"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        most <= 30,
        "{most} server connections for a pool of 25 and a reserve of 5"
    );
    assert!(most >= 10, "{most}: the pool was hardly used");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_messages_are_bounded_by_max_client_buffer_bytes() {
    let c = cluster();
    let db = c.create_database("buffer_budget");
    let proxy = TestProxy::start(&harness::proxy::config_toml(c, &db, "", "").replace(
        "[tidepool]\n",
        "[tidepool]\nmax_client_buffer_bytes = 4194304\n",
    ));
    let big = |n: usize| format!("select length('{}')", "x".repeat(n));
    // Under the bound: served, and the charge comes back once idle.
    let ok = proxy.client(&db).await;
    assert_eq!(harness::first_value(&ok, &big(3_000_000)).await, "3000000");
    harness::first_value(&ok, "select 1").await;
    assert_eq!(proxy.shared.buffers.used(), 0, "released at idle");
    // Over it (though under max_message_size): a clear 53200, not memory.
    // Only the message's header is sent: the refusal comes before its body.
    let mut over = Raw::login_trust(proxy.port(), &db).await;
    let mut head = vec![b'Q'];
    head.extend(6_000_004i32.to_be_bytes());
    head.extend(b"select ");
    over.send(&head).await;
    let msgs = over.read_to_close().await;
    let fatal = msgs.iter().find(|m| m.tag == b'E').expect("an error");
    assert_eq!(fatal.code().as_deref(), Some("53200"));
    assert!(
        fatal.message().unwrap().contains("max_client_buffer_bytes"),
        "{:?}",
        fatal.message()
    );
    // Others go on.
    assert_eq!(harness::first_value(&ok, "select 2").await, "2");
    drop(over);
    harness::wait_until_async("charges back", Duration::from_secs(10), || async {
        proxy.shared.buffers.used() == 0
    })
    .await;
}

/// `min_pool_size` above a connection cap: warming stops at the cap (it
/// spun on the event loop, taking and giving back its own idle connection,
/// and other users' queries hung), and a pool that needs a connection
/// while the cap is full closes another pool's idle one (as PgBouncer
/// does): idle connections never keep a user or database out for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caps_below_min_pool_size_neither_spin_nor_starve() {
    let c = cluster();
    let (db1, db2) = (
        c.create_database("cap_warm_a"),
        c.create_database("cap_warm_b"),
    );
    let toml = harness::proxy::config_toml(
        c,
        &db1,
        "min_pool_size = 2\nmax_db_connections = 3\nmax_user_connections = 2\nquery_wait_timeout = \"5s\"",
        "",
    ) + &another_database(c, &db2);
    let proxy = TestProxy::start(&toml);
    let md5 = |db: &str| proxy.url_as(harness::MD5_USER, Some(harness::MD5_PASSWORD), db);
    let within = |what: &'static str| {
        move |r: Result<
            Result<Vec<tokio_postgres::SimpleQueryMessage>, tokio_postgres::Error>,
            _,
        >| {
            r.unwrap_or_else(|_| panic!("{what}: no answer in 10 s"))
                .unwrap_or_else(|e| panic!("{what}: {e:?}"))
        }
    };
    let ten = Duration::from_secs(10);
    // app's pool on db1 warms to 2 of the database's 3.
    let app = proxy.client(&db1).await;
    within("app on db1")(tokio::time::timeout(ten, app.simple_query("select 1")).await);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // md5user's pool on db1 gets the third and wants a second: the cap is
    // full. Its queries go on being answered, again and again.
    let m = harness::connect(&md5(&db1)).await.unwrap();
    for _ in 0..3 {
        within("md5user on db1")(tokio::time::timeout(ten, m.simple_query("select 1")).await);
        tokio::time::sleep(Duration::from_millis(1200)).await;
    }
    // max_user_connections = 2 for app: its db1 pool holds both (idle,
    // warm); a db2 client of app gets one of them closed for it.
    let app2 = proxy.client(&db2).await;
    within("app on db2")(tokio::time::timeout(ten, app2.simple_query("select 2")).await);
    within("app on db1 again")(tokio::time::timeout(ten, app.simple_query("select 3")).await);
}

/// A pool waiting on a full `max_user_connections` gets another database's
/// connection closed for it when that one comes back idle *after* the wait
/// began (it waited out `query_wait_timeout` before: nothing woke it; CI
/// caught it in max_user_connections_caps_a_user_across_databases).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_starved_by_a_cap_gets_a_connection_that_turns_idle_later() {
    let c = cluster();
    let (db1, db2) = (
        c.create_database("cap_later_a"),
        c.create_database("cap_later_b"),
    );
    let toml = harness::proxy::config_toml(
        c,
        &db1,
        "max_user_connections = 2\nquery_wait_timeout = \"8s\"",
        "",
    ) + &another_database(c, &db2);
    let proxy = TestProxy::start(&toml);
    let admin = c.admin_client("postgres").await;
    // Both of app's connections busy on db1.
    let mut busy = Vec::new();
    for _ in 0..2 {
        let client = proxy.client(&db1).await;
        busy.push(tokio::spawn(async move {
            client.simple_query("select pg_sleep(2)").await.unwrap();
            client
        }));
    }
    let (admin, busy_db) = (&admin, &db1);
    harness::wait_until_async("both of app's servers busy on db1", Duration::from_secs(10), || async move {
        let n: i64 = admin
            .query_one(
                "select count(*) from pg_stat_activity where datname = $1 and query like '%pg_sleep%' and state = 'active'",
                &[busy_db],
            )
            .await
            .unwrap()
            .get(0);
        n == 2
    })
    .await;
    // db2's client (its login needs a server: the pool's first) waits on
    // the full cap; db1's connections turn idle a moment later and stay so
    // (their clients stay connected, quiet).
    let answer = async {
        let other = harness::connect(&proxy.url(&db2)).await?;
        other.simple_query("select 2").await
    }
    .await;
    let _quiet: Vec<_> = futures_util::future::join_all(busy).await;
    answer.unwrap_or_else(|e| panic!("db2 starved behind db1's idle connections: {e:?}"));
}

/// On a database with replicas tidepool answers a lone BEGIN itself: the
/// rate limit counts that transaction at its BEGIN, and never refuses a
/// statement inside it (refused there, the rest of the transaction ran and
/// committed without it: a partial commit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_never_cuts_a_transaction_in_two() {
    let c = harness::cluster_with_replica();
    let db = c.create_database("rate_begin");
    c.wait_for_replicas();
    let toml = harness::proxy::config_toml(
        c,
        &db,
        "default_pool_size = 4",
        &format!(
            "replicas = [{{ host = \"127.0.0.1\", port = {} }}]\nrate_limit_tier = \"tight\"",
            c.replica_ports()[0]
        ),
    ) + "\n[routing]\nhealth_check_period = \"200ms\"\n\
         [rate_limits]\nrate_limit_wait = \"0s\"\n[rate_limits.tiers]\ntight = { per_minute = 1, burst = 1 }\n";
    let admin = c.admin_client(&db).await;
    admin
        .batch_execute("create table acct (v int); grant all on acct to app")
        .await
        .unwrap();
    let proxy = TestProxy::start(&toml);
    let a = proxy.client(&db).await;
    let b = proxy.client(&db).await;
    // The burst: two transactions at once. A's BEGIN takes the first...
    a.batch_execute("begin").await.unwrap();
    // ...B's autocommit statement the second, and B's next is refused:
    // the tier has nothing left.
    b.batch_execute("select 1").await.unwrap();
    let e = b.batch_execute("select 2").await.unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("53400"), "{e:?}");
    // A's transaction, admitted at its BEGIN, runs whole.
    a.batch_execute("insert into acct values (-100)")
        .await
        .unwrap();
    a.batch_execute("insert into acct values (100)")
        .await
        .unwrap();
    a.batch_execute("commit").await.unwrap();
    // The next transaction is refused at its BEGIN, and nothing of it runs.
    let e = a.batch_execute("begin").await.unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("53400"), "{e:?}");
    let rows: Vec<i32> = admin
        .query("select v from acct order by v", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(rows, vec![-100, 100]);
}
