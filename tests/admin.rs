//! The admin console: access rules, PgBouncer's columns, exact transaction
//! counts after pgbench, slow statements with literals masked, per-query
//! percentiles, PAUSE/RESUME and KILL.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::collections::HashMap;
use std::time::Duration;

use harness::daemon::Daemon;
use harness::{TestProxy, cluster};

const ADMIN_PW: &str = "adminpw";
const STATS_PW: &str = "statspw";

/// A config with an admin and a stats user, for `db` on the shared cluster.
fn config(db: &str, listen: &str, extra: &str) -> String {
    let c = cluster();
    format!(
        r#"
[tidepool]
listen = ["{listen}"]
admin_users = ["admin"]
stats_users = ["stats"]

[pool]
default_pool_size = 5
client_login_timeout = "5s"

[databases.{db}]
host = "127.0.0.1"
port = {port}

[users.app]
password = "{app_pw}"

[users.admin]
password = "{ADMIN_PW}"

[users.stats]
password = "{STATS_PW}"
{extra}
"#,
        port = c.primary_port(),
        app_pw = harness::APP_PASSWORD,
    )
}

fn proxy(db: &str, extra: &str) -> TestProxy {
    TestProxy::start(&config(db, "127.0.0.1:0", extra))
}

async fn show(url: &str, cmd: &str) -> Vec<HashMap<String, String>> {
    harness::console(url, cmd).await
}

/// The header line of `psql --csv -c cmd`: the column names in order.
fn header(url: &str, cmd: &str) -> Vec<String> {
    let out = harness::psql(url, &["--csv", "-c", cmd], None);
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or("")
        .split(',')
        .map(str::to_owned)
        .collect()
}

fn num(row: &HashMap<String, String>, col: &str) -> u64 {
    row.get(col)
        .unwrap_or_else(|| panic!("no column {col} in {row:?}"))
        .parse()
        .unwrap_or_else(|_| panic!("{col} is not a number in {row:?}"))
}

fn row_for<'a>(
    rows: &'a [HashMap<String, String>],
    key: &str,
    value: &str,
) -> &'a HashMap<String, String> {
    rows.iter()
        .find(|r| r.get(key).map(String::as_str) == Some(value))
        .unwrap_or_else(|| panic!("no row with {key} = {value}: {rows:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_access_follows_admin_and_stats_users() {
    let c = cluster();
    let db = c.create_database("console");
    let p = proxy(&db, "");
    let admin = p.url_as("admin", Some(ADMIN_PW), "pgbouncer");
    let stats = p.url_as("stats", Some(STATS_PW), "pgbouncer");

    // Both may SHOW, through either name of the console.
    assert!(!show(&admin, "SHOW STATS").await.is_empty());
    let alias = show(&p.url_as("stats", Some(STATS_PW), "tidepool"), "SHOW LISTS").await;
    assert!(!alias.is_empty());
    let v = show(&stats, "SHOW VERSION").await;
    assert!(v[0]["version"].contains("tidepool"), "{v:?}");

    // A stats user may not control anything; the session goes on.
    let client = harness::connect(&stats).await.unwrap();
    let err = client.simple_query("PAUSE").await.unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("42501"), "{err:?}");
    assert!(client.simple_query("SHOW LISTS").await.is_ok());
    // Unknown commands are errors, not disconnects.
    let err = client.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("42601"), "{err:?}");
    assert!(client.simple_query("SHOW STATE").await.is_ok());

    // Users outside admin_users/stats_users, and wrong passwords, are refused.
    let err = harness::connect(&p.url("pgbouncer")).await.unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("28000"), "{err:?}");
    let err = harness::connect(&p.url_as("admin", Some("wrong"), "pgbouncer"))
        .await
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("28P01"), "{err:?}");

    // The extended protocol is refused with a clear error.
    let client = harness::connect(&admin).await.unwrap();
    let err = client.query("SHOW STATS", &[]).await.unwrap_err();
    assert!(
        format!("{err:?}").contains("extended query protocol"),
        "{err:?}"
    );

    // psql works, including SHOW HELP's notice.
    let out = harness::psql_async(&admin, &["-c", "SHOW HELP"], None).await;
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("SHOW"),
        "{out:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_commands_have_pgbouncers_columns_in_order() {
    let c = cluster();
    let db = c.create_database("columns");
    let p = proxy(&db, "");
    let client = p.client(&db).await;
    client.simple_query("select 1").await.unwrap();
    let admin = p.url_as("admin", Some(ADMIN_PW), "pgbouncer");
    let expect: &[(&str, &[&str])] = &[
        // PgBouncer 1.25 (what SHOW VERSION claims), as its stats.c writes them.
        (
            "SHOW STATS",
            &[
                "database",
                "total_server_assignment_count",
                "total_xact_count",
                "total_query_count",
                "total_received",
                "total_sent",
                "total_xact_time",
                "total_query_time",
                "total_wait_time",
                "total_client_parse_count",
                "total_server_parse_count",
                "total_bind_count",
                "total_client_login_count",
                "avg_server_assignment_count",
                "avg_xact_count",
                "avg_query_count",
                "avg_recv",
                "avg_sent",
                "avg_xact_time",
                "avg_query_time",
                "avg_wait_time",
                "avg_client_parse_count",
                "avg_server_parse_count",
                "avg_bind_count",
                "avg_client_login_count",
            ],
        ),
        (
            "SHOW STATS_TOTALS",
            &[
                "database",
                "server_assignment_count",
                "xact_count",
                "query_count",
                "bytes_received",
                "bytes_sent",
                "xact_time",
                "query_time",
                "wait_time",
                "client_parse_count",
                "server_parse_count",
                "bind_count",
                "client_login_count",
            ],
        ),
        (
            "SHOW STATS_AVERAGES",
            &[
                "database",
                "server_assignment_count",
                "xact_count",
                "query_count",
                "bytes_received",
                "bytes_sent",
                "xact_time",
                "query_time",
                "wait_time",
                "avg_client_parse_count",
                "avg_server_parse_count",
                "avg_bind_count",
                "avg_client_login_count",
            ],
        ),
        ("SHOW TOTALS", &["name", "value"]),
        (
            "SHOW POOLS",
            &[
                "database",
                "user",
                "cl_active",
                "cl_waiting",
                "cl_active_cancel_req",
                "cl_waiting_cancel_req",
                "sv_active",
                "sv_active_cancel",
                "sv_being_canceled",
                "sv_idle",
                "sv_used",
                "sv_tested",
                "sv_login",
                "maxwait",
                "maxwait_us",
                "pool_mode",
            ],
        ),
        (
            "SHOW CLIENTS",
            &[
                "type",
                "user",
                "database",
                "replication",
                "state",
                "addr",
                "port",
                "local_addr",
                "local_port",
                "connect_time",
                "request_time",
                "wait",
                "wait_us",
                "close_needed",
                "ptr",
                "link",
                "remote_pid",
                "tls",
                "application_name",
                "prepared_statements",
                "id",
            ],
        ),
        (
            "SHOW SERVERS",
            &[
                "type",
                "user",
                "database",
                "replication",
                "state",
                "addr",
                "port",
                "local_addr",
                "local_port",
                "connect_time",
                "request_time",
                "wait",
                "wait_us",
                "close_needed",
                "ptr",
                "link",
                "remote_pid",
                "tls",
                "application_name",
                "prepared_statements",
                "id",
            ],
        ),
        (
            "SHOW DATABASES",
            &[
                "name",
                "host",
                "port",
                "database",
                "force_user",
                "pool_size",
                "min_pool_size",
                "reserve_pool_size",
                "server_lifetime",
                "pool_mode",
                "load_balance_hosts",
                "max_connections",
                "current_connections",
                "max_client_connections",
                "current_client_connections",
                "paused",
                "disabled",
            ],
        ),
        (
            "SHOW USERS",
            &[
                "name",
                "pool_size",
                "reserve_pool_size",
                "pool_mode",
                "max_user_connections",
                "current_connections",
                "max_user_client_connections",
                "current_client_connections",
            ],
        ),
        ("SHOW CONFIG", &["key", "value", "default", "changeable"]),
        ("SHOW LISTS", &["list", "items"]),
        ("SHOW MEM", &["name", "size", "used", "free", "memtotal"]),
        ("SHOW VERSION", &["version"]),
        ("SHOW STATE", &["key", "value"]),
    ];
    for (cmd, cols) in expect {
        let admin = admin.clone();
        let cmd2 = cmd.to_string();
        let got = tokio::task::spawn_blocking(move || header(&admin, &cmd2))
            .await
            .unwrap();
        assert!(got.len() >= cols.len(), "{cmd}: {got:?}");
        assert_eq!(&got[..cols.len()], *cols, "{cmd}");
    }
    // SHOW MEM counts what the structures hold: this test's client and its
    // server; memtotal is size × (used + free).
    let mem = show(&admin, "SHOW MEM").await;
    let clients = row_for(&mem, "name", "client_cache");
    assert!(num(clients, "used") >= 1, "{mem:?}");
    assert!(
        num(row_for(&mem, "name", "server_cache"), "used") >= 1,
        "{mem:?}"
    );
    for row in &mem {
        assert_eq!(
            num(row, "memtotal"),
            num(row, "size") * (num(row, "used") + num(row, "free")),
            "{row:?}"
        );
    }
    // Legacy names old exporters read are still there, at the end.
    let stats = show(&admin, "SHOW STATS").await;
    assert!(stats[0].contains_key("total_requests"));
    let dbs = show(&admin, "SHOW DATABASES").await;
    assert!(dbs[0].contains_key("reserve_pool"));
    let lists = show(&admin, "SHOW LISTS").await;
    let names: Vec<&str> = lists.iter().map(|r| r["list"].as_str()).collect();
    for l in [
        "databases",
        "users",
        "pools",
        "free_clients",
        "used_clients",
        "login_clients",
        "free_servers",
        "used_servers",
        "dns_names",
        "dns_zones",
        "dns_queries",
        "dns_pending",
    ] {
        assert!(names.contains(&l), "SHOW LISTS lacks {l}: {names:?}");
    }
    // Live state: our client is listed, and its server.
    let clients = show(&admin, "SHOW CLIENTS").await;
    assert!(
        clients
            .iter()
            .any(|r| r["database"] == db && r["user"] == "app"),
        "{clients:?}"
    );
    // The console session asking (psql names itself): its application
    // name, active while it runs the command, no server and no role.
    let out = harness::psql_async(&admin, &["-AF|", "-c", "SHOW CLIENTS"], None).await;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or("").split('|').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let me: Vec<&str> = lines
        .map(|l| l.split('|').collect::<Vec<_>>())
        .find(|r| {
            r.len() == header.len()
                && r[col("database")] == "pgbouncer"
                && r[col("application_name")] == "psql"
        })
        .unwrap_or_else(|| panic!("no psql console row in {text}"));
    assert_eq!(me[col("state")], "active", "{text}");
    assert_eq!(me[col("link")], "", "{text}");
    assert_eq!(me[col("backend_role")], "", "{text}");
    let servers = show(&admin, "SHOW SERVERS").await;
    assert!(servers.iter().any(|r| r["database"] == db), "{servers:?}");
    let pools = show(&admin, "SHOW POOLS").await;
    let pool = row_for(&pools, "database", &db);
    assert_eq!(num(pool, "cl_active"), 1);
    assert_eq!(num(pool, "sv_idle") + num(pool, "sv_active"), 1);
    assert_eq!(pool["pool_mode"], "transaction");
    drop(client);
}

/// pgbench without its setup queries: a script file, no vacuum, no scale check.
fn write_script(dir: &std::path::Path) -> String {
    let path = dir.join("select.sql");
    std::fs::write(&path, "SELECT 1 AS one;\n").unwrap();
    path.to_string_lossy().into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_transactions_are_counted_exactly() {
    let c = cluster();
    let db = c.create_database("count");
    let p = proxy(&db, "");
    let admin = p.url_as("admin", Some(ADMIN_PW), "pgbouncer");
    let dir = std::env::temp_dir().join(format!("tidepool-admin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = write_script(&dir);
    let mut expected = 0;
    // A transaction is counted just after its answer is written: once
    // pgbench is done, the count settles a moment later.
    let settled = || async {
        let count = || async {
            num(
                row_for(&show(&admin, "SHOW STATS").await, "database", &db),
                "total_xact_count",
            )
        };
        let mut last = count().await;
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let now = count().await;
            if now == last {
                return now;
            }
            last = now;
        }
    };
    for mode in ["simple", "extended", "prepared"] {
        let before = settled().await;
        let out = harness::pgbench_async(
            &p.url(&db),
            &[
                "-n", "-c", "4", "-j", "2", "-t", "250", "-M", mode, "-f", &script,
            ],
        )
        .await;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{mode}: {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.contains("number of transactions actually processed: 1000/1000"),
            "{text}"
        );
        let after = settled().await;
        // -M prepared also prepares once per connection (a Parse/Sync of its
        // own, i.e. one more transaction per client) unless the pool already
        // knew the statement and answered it without a server.
        let extra = after - before - 1000;
        if mode == "prepared" {
            assert!(extra <= 4, "{mode}: {after} - {before}");
        } else {
            assert_eq!(
                after - before,
                1000,
                "{mode}: total_xact_count must equal pgbench's count"
            );
        }
        expected += 1000;
    }
    let stats = show(&admin, "SHOW STATS").await;
    let row = row_for(&stats, "database", &db);
    assert!(num(row, "total_query_count") >= expected);
    assert!(num(row, "total_received") > 0 && num(row, "total_sent") > 0);
    assert!(num(row, "total_xact_time") > 0 && num(row, "total_query_time") > 0);
    assert!(num(row, "total_server_assignment_count") >= expected);
    assert_eq!(row["backend_role"], "primary");
    let totals = show(&admin, "SHOW TOTALS").await;
    assert!(num(row_for(&totals, "name", "total_xact_count"), "value") >= expected);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A database named after `name` behind a tidepool process that counts
/// statements over 1 s as slow (a busy machine stalls far less); with the
/// app user's URL.
fn slow_daemon(name: &str) -> (&'static harness::Cluster, String, Daemon, String) {
    let c = cluster();
    let db = c.create_database(name);
    let d = Daemon::start(&config(
        &db,
        "127.0.0.1:{port}",
        "[stats]\nslow_query_threshold = \"1s\"",
    ));
    let app = d.url(harness::APP_USER, harness::APP_PASSWORD, &db);
    (c, db, d, app)
}

/// Where tidepool's lexer cannot find literals as PostgreSQL does (SJIS,
/// whose `ソ` ends in a backslash byte; `standard_conforming_strings = off`,
/// where a backslash escapes a quote in any string), statistics and logs
/// show the statement's first word only: a literal never leaks (`E'ソ'`
/// made the lexer end the string early and show the next one).
#[test]
fn literals_stay_hidden_where_the_lexer_cannot_read_them() {
    let (_, _, d, app) = slow_daemon("slowenc");
    let dir = std::env::temp_dir().join(format!("tidepool-slowenc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sjis = dir.join("sjis.sql");
    std::fs::write(
        &sjis,
        b"SELECT pg_sleep(1.1), E'\x83\x5c', 'SECRETsjis4';\n".as_slice(),
    )
    .unwrap();
    let scs = dir.join("scs.sql");
    std::fs::write(
        &scs,
        "set standard_conforming_strings = off;\nSELECT pg_sleep(1.1), 'it\\'s', 'SECRETscs1';\n",
    )
    .unwrap();
    for (url, file) in [
        (format!("{app}?client_encoding=SJIS"), &sjis),
        (app.clone(), &scs),
    ] {
        let out = harness::psql(&url, &["-f", file.to_str().unwrap()], None);
        assert!(out.status.success(), "{out:?}");
    }
    let admin = d.url("admin", ADMIN_PW, "pgbouncer");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let slow = rt.block_on(show(&admin, "SHOW SLOW_QUERIES"));
    assert_eq!(slow.len(), 2, "{slow:?}");
    for s in &slow {
        assert!(!s["query"].contains("SECRET"), "literal leaked: {s:?}");
        assert!(s["query"].starts_with("select"), "{s:?}");
    }
    let queries = rt.block_on(show(&admin, "SHOW QUERIES"));
    assert!(
        queries.iter().all(|q| !q["query"].contains("SECRET")),
        "{queries:?}"
    );
    let log = d.log();
    assert!(!log.contains("SECRET"), "literal in the log:\n{log}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn slow_statements_are_listed_and_logged_without_literals() {
    let (c, db, d, app) = slow_daemon("slow");
    for _ in 0..2 {
        let out = harness::psql(
            &app,
            &["-c", "SELECT pg_sleep(1.1), 'secret-literal'"],
            None,
        );
        assert!(out.status.success(), "{out:?}");
    }
    for i in 0..10 {
        let out = harness::psql(&app, &["-c", &format!("SELECT {i} + 1")], None);
        assert!(out.status.success());
    }
    let admin = d.url("admin", ADMIN_PW, "pgbouncer");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let slow = rt.block_on(show(&admin, "SHOW SLOW_QUERIES"));
    assert_eq!(slow.len(), 2, "{slow:?}");
    for s in &slow {
        assert!(s["query"].contains("pg_sleep"), "{s:?}");
        assert!(
            !s["query"].contains("secret-literal"),
            "literal leaked: {s:?}"
        );
        assert!(num(s, "duration") >= 1_000_000, "{s:?}");
        assert_eq!(s["user"], "app");
        assert_eq!(s["database"], db);
        assert_eq!(s["application_name"], "psql");
        assert!(s["client_addr"].starts_with("127.0.0.1:"), "{s:?}");
        assert_eq!(s["backend"], format!("127.0.0.1:{}", c.primary_port()));
    }
    let queries = rt.block_on(show(&admin, "SHOW QUERIES"));
    assert!(
        queries
            .iter()
            .all(|q| !q["query"].contains("secret-literal"))
    );
    let q = queries
        .iter()
        .find(|q| q["query"].contains("pg_sleep"))
        .unwrap_or_else(|| panic!("{queries:?}"));
    assert_eq!(num(q, "calls"), 2);
    for col in ["p50_time", "p90_time", "p95_time", "p99_time"] {
        // Within the histogram's precision (1/16 of the value).
        assert!(num(q, col) >= 1_000_000, "{col}: {q:?}");
    }
    // The 10 `SELECT n + 1` share one normalized shape.
    let sum = queries
        .iter()
        .find(|q| q["query"].contains('+') && num(q, "calls") == 10)
        .unwrap_or_else(|| panic!("no shared shape: {queries:?}"));
    assert!(!sum["query"].contains('9'), "{sum:?}");
    // 2 of 12 statements were slow: over 10 %.
    let health = rt.block_on(show(&admin, "SHOW HEALTH"));
    assert_eq!(
        row_for(&health, "database", &db)["status"],
        "unhealthy",
        "{health:?}"
    );
    // And each was logged once, as one structured line, masked.
    let log = d.log();
    assert!(
        !log.contains("secret-literal"),
        "literal in the log:\n{log}"
    );
    let lines: Vec<_> = d
        .log_lines()
        .into_iter()
        .filter(|l| l["fields"]["message"] == "slow query")
        .collect();
    assert_eq!(lines.len(), 2, "{log}");
    let f = &lines[0]["fields"];
    assert!(f["query"].as_str().unwrap().contains("pg_sleep"), "{f}");
    assert_eq!(f["database"], db.as_str());
    assert_eq!(f["user"], "app");
    assert_eq!(f["application_name"], "psql");
    assert!(f["duration_ms"].as_f64().unwrap() >= 1000.0, "{f}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_waits_for_transactions_and_holds_new_ones_until_resume() {
    let c = cluster();
    let db = c.create_database("pause");
    let p = proxy(&db, "");
    let admin_url = p.url_as("admin", Some(ADMIN_PW), "pgbouncer");
    let a = p.client(&db).await;
    a.simple_query("create table t (x int)").await.unwrap();
    a.simple_query("begin; insert into t values (1)")
        .await
        .unwrap();

    // PAUSE waits for A's transaction.
    let admin = harness::connect(&admin_url).await.unwrap();
    let pause = tokio::spawn(async move { admin.simple_query("PAUSE").await.map(|_| admin) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !pause.is_finished(),
        "PAUSE returned while a transaction was running"
    );
    a.simple_query("commit").await.unwrap();
    let admin = tokio::time::timeout(Duration::from_secs(10), pause)
        .await
        .expect("PAUSE returned after the commit")
        .unwrap()
        .expect("PAUSE succeeded");
    // Servers were closed; new transactions wait.
    let state = show(&admin_url, "SHOW DATABASES").await;
    assert_eq!(row_for(&state, "name", &db)["paused"], "1");
    let b = p.client(&db).await;
    let held = tokio::spawn(async move { b.simple_query("select count(*) from t").await.is_ok() });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!held.is_finished(), "a query ran while paused");
    let err = admin.simple_query("PAUSE").await.unwrap_err();
    assert!(format!("{err:?}").contains("already paused"), "{err:?}");
    admin.simple_query("RESUME").await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_secs(10), held)
            .await
            .unwrap()
            .unwrap()
    );
    let err = admin
        .simple_query(&format!("RESUME {db}"))
        .await
        .unwrap_err();
    assert!(format!("{err:?}").contains("not paused"), "{err:?}");
    let err = admin.simple_query("PAUSE nosuchdb").await.unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("3D000"));
}

/// A client held by PAUSE waits at most query_wait_timeout (as PgBouncer
/// counts it), gets 53300 saying why, and is served after RESUME; a PAUSE
/// still waiting when a RESUME comes fails instead of saying PAUSE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_wait_ends_at_query_wait_timeout_and_resume_cancels_a_pause() {
    let c = cluster();
    let db = c.create_database("pause_wait");
    let p = TestProxy::start(
        &config(&db, "127.0.0.1:0", "")
            .replace("[pool]\n", "[pool]\nquery_wait_timeout = \"1s\"\n"),
    );
    let admin_url = p.url_as("admin", Some(ADMIN_PW), "pgbouncer");
    let admin = harness::connect(&admin_url).await.unwrap();
    admin.simple_query(&format!("PAUSE {db}")).await.unwrap();
    let b = p.client(&db).await;
    let err = tokio::time::timeout(Duration::from_secs(10), b.simple_query("select 1"))
        .await
        .expect("the paused wait ends")
        .unwrap_err();
    let e = err.as_db_error().expect("an error response");
    assert_eq!(e.code().code(), "53300", "{e:?}");
    assert!(
        e.message().contains("query_wait_timeout") && e.message().contains("paused"),
        "{}",
        e.message()
    );
    admin.simple_query(&format!("RESUME {db}")).await.unwrap();
    b.simple_query("select 2").await.unwrap();

    // RESUME while a PAUSE waits for a transaction: that PAUSE fails.
    b.simple_query("begin").await.unwrap();
    b.simple_query("select 3").await.unwrap();
    let pausing = harness::connect(&admin_url).await.unwrap();
    let pause = tokio::spawn(async move { pausing.simple_query("PAUSE").await });
    // The PAUSE has begun (marked paused) and waits for b's transaction.
    harness::wait_until_async("the PAUSE to begin", Duration::from_secs(20), || async {
        row_for(&show(&admin_url, "SHOW DATABASES").await, "name", &db)["paused"] == "1"
    })
    .await;
    assert!(!pause.is_finished());
    admin.simple_query("RESUME").await.unwrap();
    b.simple_query("commit").await.unwrap();
    let err = tokio::time::timeout(Duration::from_secs(10), pause)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert!(format!("{err:?}").contains("PAUSE canceled"), "{err:?}");
    let state = show(&admin_url, "SHOW DATABASES").await;
    assert_eq!(row_for(&state, "name", &db)["paused"], "0");
    b.simple_query("select 4").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_drops_the_databases_clients_and_pauses_it() {
    let c = cluster();
    let db = c.create_database("kill");
    let other = c.create_database("survivor");
    let p = TestProxy::start(&config(
        &db,
        "127.0.0.1:0",
        &format!(
            "[databases.{other}]\nhost = \"127.0.0.1\"\nport = {}\n",
            c.primary_port()
        ),
    ));
    let victim = p.client(&db).await;
    victim.simple_query("select 1").await.unwrap();
    let survivor = p.client(&other).await;
    let admin = harness::connect(&p.url_as("admin", Some(ADMIN_PW), "pgbouncer"))
        .await
        .unwrap();
    admin.simple_query(&format!("KILL {db}")).await.unwrap();
    harness::wait_until_async(
        "the killed client to be closed",
        Duration::from_secs(10),
        || {
            let closed = victim.is_closed();
            async move { closed }
        },
    )
    .await;
    // Other databases are untouched.
    survivor.simple_query("select 1").await.unwrap();
    // The database stays paused until RESUME.
    let late = p.client(&db).await;
    let held = tokio::spawn(async move { late.simple_query("select 1").await.is_ok() });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!held.is_finished());
    admin.simple_query(&format!("RESUME {db}")).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_secs(10), held)
            .await
            .unwrap()
            .unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_pool_gets_a_recommendation() {
    let c = cluster();
    let db = c.create_database("saturated");
    let p = TestProxy::start(
        // One slow statement (a busy machine) would make the advice speak
        // of slowness; this test is about saturation.
        &config(
            &db,
            "127.0.0.1:0",
            "[stats]\nslow_query_threshold = \"10s\"",
        )
        .replace("default_pool_size = 5", "default_pool_size = 1"),
    );
    let admin = p.url_as("admin", Some(ADMIN_PW), "pgbouncer");
    let holder = p.client(&db).await;
    holder.simple_query("begin; select 1").await.unwrap();
    let waiter = p.client(&db).await;
    let waiting = tokio::spawn(async move { waiter.simple_query("select 2").await.is_ok() });
    let mut pools = Vec::new();
    for _ in 0..250 {
        pools = show(&admin, "SHOW POOLS").await;
        if pools
            .iter()
            .any(|r| r["database"] == db && r["cl_waiting"] == "1")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pool = row_for(&pools, "database", &db);
    assert_eq!(pool["cl_waiting"], "1", "{pool:?}");
    assert_eq!(pool["sv_active"], "1");
    assert!(pool["recommendation"].contains("saturated"), "{pool:?}");
    assert!(pool["recommendation"].contains("pool_size"), "{pool:?}");
    let health = show(&admin, "SHOW HEALTH").await;
    let h = row_for(&health, "database", &db);
    assert!(h["recommendation"].contains("saturated"), "{h:?}");
    assert_eq!(h["cl_waiting"], "1");
    // Once the holder commits, the waiter runs and the advice goes away.
    holder.simple_query("commit").await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .unwrap()
            .unwrap()
    );
    let pools = show(&admin, "SHOW POOLS").await;
    assert_eq!(row_for(&pools, "database", &db)["recommendation"], "");
}

/// `client_idle_timeout` counts a console session's idle time from its last
/// command, as for any client: a console in use is never closed for it (its
/// idle clock used to run from the login, so an operator's session closed
/// that long after logging in, however busy), an idle one is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_console_in_use_outlives_client_idle_timeout() {
    let c = cluster();
    let db = c.create_database("console_idle");
    let toml = config(&db, "127.0.0.1:0", "")
        .replace("[pool]\n", "[pool]\nclient_idle_timeout = \"1s\"\n");
    let p = TestProxy::start(&toml);
    let console = harness::connect(&p.url_as("admin", Some(ADMIN_PW), "pgbouncer"))
        .await
        .unwrap();
    for _ in 0..8 {
        console.simple_query("SHOW VERSION").await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    assert!(
        console.simple_query("SHOW VERSION").await.is_err(),
        "an idle console is closed by client_idle_timeout"
    );
}

/// A console query over the console's 64 KiB bound is refused naming that
/// bound (it named max_message_size, a setting that does not apply).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_console_query_names_the_consoles_limit() {
    let c = cluster();
    let db = c.create_database("console_big");
    let p = proxy(&db, "");
    let console = harness::connect(&p.url_as("admin", Some(ADMIN_PW), "pgbouncer"))
        .await
        .unwrap();
    let big = format!("SHOW VERSION; -- {}", "x".repeat(70_000));
    let e = console.simple_query(&big).await.unwrap_err();
    let db_error = e.as_db_error().expect("an ErrorResponse");
    assert_eq!(db_error.code().code(), "08P01");
    assert!(db_error.message().contains("console's limit"), "{e}");
}

/// A database whose server cannot be reached shows it in SHOW DATABASES and
/// SHOW POOLS even without health checks (no replicas), as `/readyz` does;
/// it said `healthy` before. A database that works says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_shows_down_without_health_checks() {
    let c = cluster();
    let db = c.create_database("reach");
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let p = proxy(
        &db,
        &format!(
            "[databases.gone]\nhost = \"127.0.0.1\"\nport = {closed}\ndbname = \"{db}\"\n\
             [users.ghost]\npassword = \"x\"\n\
             [stats]\nslow_query_threshold = \"10s\"\n"
        ),
    );
    let admin_url = p.url_as("admin", Some(ADMIN_PW), "pgbouncer");
    p.client(&db).await.simple_query("select 1").await.unwrap();
    assert!(harness::connect(&p.url("gone")).await.is_err());
    // A user PostgreSQL does not know: its pool cannot log in, the
    // database's server is fine.
    assert!(
        harness::connect(&p.url_as("ghost", Some("x"), &db))
            .await
            .is_err()
    );
    let dbs = show(&admin_url, "SHOW DATABASES").await;
    let status = &row_for(&dbs, "name", "gone")["status"];
    assert!(status.starts_with("down: unreachable: "), "{status}");
    assert_eq!(row_for(&dbs, "name", &db)["status"], "healthy");
    let pools = show(&admin_url, "SHOW POOLS").await;
    let status = &row_for(&pools, "database", "gone")["status"];
    assert!(status.starts_with("down: unreachable: "), "{status}");
    for row in pools.iter().filter(|r| r["database"] == db) {
        let status = &row["status"];
        if row["user"] == "ghost" {
            assert!(status.starts_with("down: login refused: "), "{status}");
        } else {
            assert_eq!(status, "healthy", "{row:?}");
        }
    }
    assert!(
        pools
            .iter()
            .any(|r| r["database"] == db && r["user"] == "ghost")
    );
}

/// A pooler full of clients (max_client_conn) still lets the console in,
/// as PgBouncer does, but only a few beyond the limit; applications stay
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_gets_in_when_max_client_conn_is_reached() {
    let c = cluster();
    let db = c.create_database("full");
    let p = TestProxy::start(
        &config(&db, "127.0.0.1:0", "").replace("[pool]\n", "[pool]\nmax_client_conn = 3\n"),
    );
    let mut apps = Vec::new();
    for _ in 0..3 {
        apps.push(p.client(&db).await);
    }
    let e = harness::connect(&p.url(&db)).await.unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("53300"), "{e:?}");
    let admin_url = p.url_as("admin", Some(ADMIN_PW), "pgbouncer");
    let pools = show(&admin_url, "SHOW POOLS").await;
    assert_eq!(row_for(&pools, "database", &db)["cl_active"], "3");
    // The headroom is bounded: consoles past it are refused too.
    let mut consoles = Vec::new();
    let refused = loop {
        match harness::connect(&admin_url).await {
            Ok(c) => consoles.push(c),
            Err(e) => break e,
        }
        assert!(consoles.len() <= 64, "consoles let in without bound");
    };
    assert_eq!(
        refused.code().map(|c| c.code()),
        Some("53300"),
        "{refused:?}"
    );
    assert!(!consoles.is_empty());
    for a in &apps {
        a.simple_query("select 1").await.unwrap();
    }
}
