//! Real client libraries through tidepool in transaction mode, each with
//! fewer server connections than client connections, each relying on named
//! prepared statements that outlive a transaction: Python asyncpg and
//! psycopg 3, node-postgres named queries, pgjdbc with `prepareThreshold=1`
//! and `pgbench -M prepared`.
//!
//! The programs live in `tests/clients/`; `scripts/test` installs what they
//! need. Each one checks its own results, exits non-zero on any error and
//! bounds its own runtime; the test asserts it exits 0 and printed its `OK`
//! line. Set `TIDEPOOL_TEST_DIRECT=1` to point the programs at PostgreSQL
//! itself instead of tidepool (to tell a program bug from a proxy bug).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use harness::{TestProxy, cluster};

/// Every program bounds itself to this many seconds...
const PROGRAM_TIMEOUT_SECS: u64 = 120;
/// ...and is killed by the test if it somehow outlives this.
const HARD_TIMEOUT: Duration = Duration::from_secs(PROGRAM_TIMEOUT_SECS + 60);

const PGJDBC_JAR: &str = "/usr/share/java/postgresql.jar";

fn clients_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients")
}

fn direct() -> bool {
    std::env::var("TIDEPOOL_TEST_DIRECT").is_ok_and(|v| v == "1")
}

/// Where a client program connects: tidepool in front of `db` with
/// `pool_extra`, or (with `TIDEPOOL_TEST_DIRECT=1`) the primary itself.
struct Target {
    proxy: Option<TestProxy>,
    port: u16,
    db: String,
    pool_size: usize,
}

impl Target {
    fn new(c: &harness::Cluster, db: &str, pool_size: usize, pool_extra: &str) -> Target {
        let extra = format!("default_pool_size = {pool_size}\n{pool_extra}");
        let proxy = (!direct()).then(|| TestProxy::for_db(c, db, &extra));
        let port = proxy.as_ref().map_or(c.primary_port(), TestProxy::port);
        Target {
            proxy,
            port,
            db: db.to_owned(),
            pool_size,
        }
    }

    fn url(&self) -> String {
        harness::url(
            self.port,
            harness::APP_USER,
            Some(harness::APP_PASSWORD),
            &self.db,
        )
    }

    /// tidepool never opened more servers than its pool allows.
    fn assert_pool_respected(&self) {
        if let Some(p) = &self.proxy {
            assert!(
                p.server_count() <= self.pool_size,
                "tidepool has {} servers, pool size {}",
                p.server_count(),
                self.pool_size
            );
        }
    }
}

fn describe(what: &str, out: &Output) -> String {
    format!(
        "{what}: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `cmd` to completion with stdout/stderr captured; kills it after
/// [`HARD_TIMEOUT`].
fn run(mut cmd: Command, what: &str) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("TIDEPOOL_CLIENT_TIMEOUT", PROGRAM_TIMEOUT_SECS.to_string());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("could not start {what} ({cmd:?}): {e}"));
    let pipe_reader = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            buf
        })
    };
    let out_thread = pipe_reader(Box::new(child.stdout.take().unwrap()));
    let err_thread = pipe_reader(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + HARD_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for child") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let out = Output {
                status: child.wait().expect("reap child"),
                stdout: out_thread.join().unwrap_or_default(),
                stderr: err_thread.join().unwrap_or_default(),
            };
            panic!(
                "{}",
                describe(&format!("{what} killed after {HARD_TIMEOUT:?}"), &out)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Output {
        status,
        stdout: out_thread.join().unwrap_or_default(),
        stderr: err_thread.join().unwrap_or_default(),
    }
}

async fn run_async(cmd: Command, what: &str) -> Output {
    let what = what.to_owned();
    tokio::task::spawn_blocking(move || run(cmd, &what))
        .await
        .expect("program runner thread")
}

/// Panics with install advice when `cmd` cannot run successfully.
fn require(what: &str, cmd: &mut Command) {
    let ok = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "{what} is missing: run scripts/test to install it");
}

/// Asserts the program succeeded and printed a line starting with `ok_line`.
fn assert_ok(what: &str, out: &Output, ok_line: &str) {
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.lines().any(|l| l.starts_with(ok_line)),
        "{}",
        describe(what, out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_asyncpg_pool_with_statement_cache() {
    require(
        "python3 with asyncpg",
        Command::new("python3").args(["-c", "import asyncpg"]),
    );
    let c = cluster();
    let db = c.create_database("asyncpg");
    // asyncpg keeps up to 20 connections; tidepool gives them 5 servers.
    let target = Target::new(c, &db, 5, "");
    let mut cmd = Command::new("python3");
    cmd.arg(clients_dir().join("python/asyncpg_check.py"))
        .arg(target.url());
    let out = run_async(cmd, "asyncpg_check.py").await;
    assert_ok("asyncpg_check.py", &out, "asyncpg: OK");
    target.assert_pool_respected();
}

/// Issue 24's report: after `ALTER TABLE … ADD COLUMN` (run elsewhere),
/// asyncpg's cached statements fail once with PostgreSQL's 0A000, asyncpg
/// re-prepares, and every connection (and a new one) gets the new row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_asyncpg_statements_heal_after_a_migration() {
    require(
        "python3 with asyncpg",
        Command::new("python3").args(["-c", "import asyncpg"]),
    );
    let c = cluster();
    let db = c.create_database("asyncpg_heal");
    let target = Target::new(c, &db, 5, "");
    let mut cmd = Command::new("python3");
    cmd.arg(clients_dir().join("python/asyncpg_heal.py"))
        .arg(target.url())
        .arg(c.app_url(&db));
    let out = run_async(cmd, "asyncpg_heal.py").await;
    assert_ok("asyncpg_heal.py", &out, "asyncpg heal: OK");
    target.assert_pool_respected();
}

/// Issue 24: across ADD COLUMN, ALTER COLUMN TYPE and DROP COLUMN (run
/// elsewhere), asyncpg (with and without a transaction) and psycopg with
/// server-side statements see the same rows and the same SQLSTATEs through
/// tidepool as directly, attempt for attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_drivers_see_a_migration_as_they_would_directly() {
    require(
        "python3 with asyncpg and psycopg",
        Command::new("python3").args(["-c", "import asyncpg, psycopg"]),
    );
    let c = cluster();
    let db = c.create_database("migration_diff");
    let proxy = TestProxy::for_db(c, &db, "default_pool_size = 3");
    let mut lines = Vec::new();
    // Migrations run elsewhere, then through tidepool itself.
    for (url, table, ddl_url) in [
        (c.app_url(&db), "direct_t", c.app_url(&db)),
        (proxy.url(&db), "proxied_t", c.app_url(&db)),
        (proxy.url(&db), "proxied_ddl_t", proxy.url(&db)),
    ] {
        let mut cmd = Command::new("python3");
        cmd.arg(clients_dir().join("python/migration_diff.py"))
            .arg(url)
            .arg(ddl_url)
            .arg(table);
        let out = run_async(cmd, "migration_diff.py").await;
        assert!(
            out.status.success(),
            "{}",
            describe("migration_diff.py", &out)
        );
        lines.push(String::from_utf8_lossy(&out.stdout).trim().to_owned());
    }
    assert_eq!(lines[1], lines[0], "through tidepool vs PostgreSQL");
    assert_eq!(
        lines[2], lines[0],
        "migrations through tidepool vs PostgreSQL"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_psycopg3_prepared_threads_and_pipeline() {
    require(
        "python3 with psycopg 3",
        Command::new("python3").args(["-c", "import psycopg"]),
    );
    let c = cluster();
    let db = c.create_database("psycopg");
    let target = Target::new(c, &db, 4, "");
    let mut cmd = Command::new("python3");
    cmd.arg(clients_dir().join("python/psycopg_check.py"))
        .arg(target.url());
    let out = run_async(cmd, "psycopg_check.py").await;
    assert_ok("psycopg_check.py", &out, "psycopg: OK");
    target.assert_pool_respected();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_postgres_named_queries() {
    let node_dir = clients_dir().join("node");
    require("node", Command::new("node").arg("--version"));
    assert!(
        node_dir.join("node_modules/pg").is_dir(),
        "node-postgres is missing in {}: run scripts/test (or npm ci there)",
        node_dir.display()
    );
    let c = cluster();
    let db = c.create_database("nodepg");
    let target = Target::new(c, &db, 5, "");
    let mut cmd = Command::new("node");
    cmd.arg(node_dir.join("named_queries.js"))
        .arg(target.url())
        .current_dir(&node_dir);
    let out = run_async(cmd, "named_queries.js").await;
    assert_ok("named_queries.js", &out, "node-postgres: OK");
    target.assert_pool_respected();
}

/// LISTEN/NOTIFY workers, unchanged, on tidepool's shared LISTEN
/// (`listen_mode = "shared"`, the default): psycopg 3's `notifies()` and
/// asyncpg's `add_listener`, each receiving every notification in order
/// while their connections keep running queries on a pool of 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_listen_workers_psycopg_notifies_and_asyncpg_add_listener() {
    require(
        "python3 with asyncpg and psycopg",
        Command::new("python3").args(["-c", "import asyncpg, psycopg"]),
    );
    let c = cluster();
    let db = c.create_database("pylisten");
    let target = Target::new(c, &db, 2, "");
    let mut cmd = Command::new("python3");
    cmd.arg(clients_dir().join("python/listen_workers.py"))
        .arg(target.url());
    let out = run_async(cmd, "listen_workers.py").await;
    assert_ok("listen_workers.py", &out, "listen workers: OK");
    target.assert_pool_respected();
}

/// node-postgres' `client.on('notification')` worker, unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_postgres_listen_worker() {
    let node_dir = clients_dir().join("node");
    require("node", Command::new("node").arg("--version"));
    let c = cluster();
    let db = c.create_database("nodelisten");
    let target = Target::new(c, &db, 2, "");
    let mut cmd = Command::new("node");
    cmd.arg(node_dir.join("listen_worker.js"))
        .arg(target.url())
        .current_dir(&node_dir);
    let out = run_async(cmd, "listen_worker.js").await;
    assert_ok("listen_worker.js", &out, "node listen: OK");
    target.assert_pool_respected();
}

/// Compiles `java/<class>.java` into a fresh directory under the target dir.
fn compile_java(class: &str) -> PathBuf {
    let classes = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "{}-{}",
        class.to_lowercase(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&classes);
    std::fs::create_dir_all(&classes).expect("create class dir");
    let mut javac = Command::new("javac");
    javac
        .args(["-encoding", "UTF-8", "-cp", PGJDBC_JAR, "-d"])
        .arg(&classes)
        .arg(clients_dir().join(format!("java/{class}.java")));
    let out = run(javac, "javac");
    assert!(
        out.status.success(),
        "{}",
        describe(&format!("javac {class}"), &out)
    );
    classes
}

/// Java and pgjdbc are here, or the test says how to get them.
fn require_java() {
    require(
        "javac (default-jdk-headless)",
        Command::new("javac").arg("-version"),
    );
    require("java", Command::new("java").arg("-version"));
    assert!(
        Path::new(PGJDBC_JAR).is_file(),
        "{PGJDBC_JAR} is missing: run scripts/test (apt-get install libpostgresql-jdbc-java)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn java_pgjdbc_server_prepared_statements_and_batch() {
    require_java();
    let classes = tokio::task::spawn_blocking(|| compile_java("JdbcCheck"))
        .await
        .expect("javac thread");
    let c = cluster();
    let db = c.create_database("jdbc");
    let target = Target::new(c, &db, 4, "");
    let jdbc_url = format!(
        "jdbc:postgresql://{}:{}/{}?prepareThreshold=1&connectTimeout=10&socketTimeout=90",
        harness::HOST,
        target.port,
        db
    );
    let mut cmd = Command::new("java");
    cmd.arg("-cp")
        .arg(format!("{PGJDBC_JAR}:{}", classes.display()))
        .arg("JdbcCheck")
        .arg(&jdbc_url)
        .arg(harness::APP_USER)
        .arg(harness::APP_PASSWORD);
    let out = run_async(cmd, "JdbcCheck").await;
    let _ = std::fs::remove_dir_all(&classes);
    assert_ok("JdbcCheck", &out, "pgjdbc: OK");
    target.assert_pool_respected();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_prepared_50_clients_through_a_pool_of_10() {
    let c = cluster();
    let db = c.create_database("benchprep");
    let init = harness::pgbench_async(&c.app_url(&db), &["-i", "-q", "-s", "1"]).await;
    assert!(init.status.success(), "{}", describe("pgbench -i", &init));
    let target = Target::new(c, &db, 10, "max_client_conn = 200");
    // Own runner rather than harness::pgbench: a shorter deadline, since a
    // pgbench whose clients lost their statements can hang instead of exit.
    let mut cmd = Command::new(harness::pg_bin("pgbench"));
    harness::client_env(&mut cmd, &target.url());
    cmd.args(["-n", "-c", "50", "-j", "2", "-t", "40", "-M", "prepared"])
        .arg(target.url());
    let out = run_async(cmd, "pgbench -M prepared").await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        describe("pgbench -M prepared", &out)
    );
    assert!(
        text.contains("number of transactions actually processed: 2000/2000"),
        "{}",
        describe("pgbench -M prepared", &out)
    );
    assert!(
        text.contains("number of failed transactions: 0 "),
        "{}",
        describe("pgbench -M prepared", &out)
    );
    let admin = c.admin_client(&db).await;
    let row = admin
        .query_one(
            "select (select sum(abalance) from pgbench_accounts)::bigint, \
                    (select sum(delta) from pgbench_history)::bigint, \
                    (select count(*) from pgbench_history)",
            &[],
        )
        .await
        .unwrap();
    let (abalance, delta, history): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(history, 2000, "one history row per transaction");
    assert_eq!(abalance, delta, "sum(abalance) != sum(delta)");
    target.assert_pool_respected();
}

/// Issue 24's judged scenario: 50 async tasks on SQLAlchemy's asyncpg engine
/// at its defaults and 10 on a psycopg engine, a column added mid-run and a
/// column's type changed later, each failed read retried once. Through
/// tidepool (pool of 5, migrations run elsewhere or through tidepool) the
/// reads fail as they fail directly: the same SQLSTATEs, never more first
/// failures than PostgreSQL gives, no failed retry, never a row of another
/// shape than the table's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlalchemy_engines_see_migrations_as_they_would_directly() {
    require(
        "python3 with SQLAlchemy, asyncpg and psycopg",
        Command::new("python3").args(["-c", "import sqlalchemy, asyncpg, psycopg"]),
    );
    let c = cluster();
    let db = c.create_database("sqlalchemy_migration");
    let proxy = TestProxy::for_db(c, &db, "default_pool_size = 5");
    let mut reports = Vec::new();
    for (url, table, ddl_url) in [
        (c.app_url(&db), "direct_t", c.app_url(&db)),
        (proxy.url(&db), "proxied_t", c.app_url(&db)),
        (proxy.url(&db), "proxied_ddl_t", proxy.url(&db)),
    ] {
        let mut cmd = Command::new("python3");
        cmd.arg(clients_dir().join("python/sqlalchemy_migration.py"))
            .arg(url)
            .arg(ddl_url)
            .arg(table);
        let out = run_async(cmd, "sqlalchemy_migration.py").await;
        assert!(
            out.status.success(),
            "{}",
            describe("sqlalchemy_migration.py", &out)
        );
        let line = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let report: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("{table}: not JSON ({e}): {line}"));
        reports.push((table, report));
    }
    let direct = &reports[0].1;
    for (table, report) in &reports {
        let phases = report.as_object().expect("phases");
        assert_eq!(phases.len(), 6, "{table}: {report}");
        for (phase, counts) in phases {
            let context = format!("{table}, {phase}: {report}\ndirectly: {direct}");
            assert_eq!(counts["retries_failed"], 0, "{context}");
            assert_eq!(counts["wrong_shape"], 0, "{context}");
            let first = counts["first_failed"].as_object().expect("first_failed");
            let first_direct = direct[phase]["first_failed"].as_object().expect("direct");
            for (code, n) in first {
                let direct_n = first_direct.get(code).and_then(|v| v.as_u64());
                assert!(
                    direct_n.is_some_and(|d| n.as_u64().unwrap_or(u64::MAX) <= d),
                    "{code} failed more often than directly: {context}"
                );
            }
        }
    }
    println!("{reports:?}");
}

/// The three runs of a migration differential: directly; through tidepool
/// with the migrations run elsewhere; through tidepool with the migrations
/// run through it too. Each gives (queries URL, migrations URL, table).
fn migration_runs(
    c: &harness::Cluster,
    proxy: &TestProxy,
    db: &str,
) -> [(String, String, &'static str); 3] {
    [
        (c.app_url(db), c.app_url(db), "direct_t"),
        (proxy.url(db), c.app_url(db), "proxied_t"),
        (proxy.url(db), proxy.url(db), "proxied_ddl_t"),
    ]
}

/// Issue 24 for node-postgres named queries: across ADD COLUMN, ALTER
/// COLUMN TYPE and DROP COLUMN, the same rows and SQLSTATEs through tidepool
/// as directly, attempt for attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_postgres_sees_a_migration_as_it_would_directly() {
    let node_dir = clients_dir().join("node");
    require("node", Command::new("node").arg("--version"));
    let c = cluster();
    let db = c.create_database("node_migration");
    let proxy = TestProxy::for_db(c, &db, "default_pool_size = 2");
    let mut lines = Vec::new();
    for (url, ddl_url, table) in migration_runs(c, &proxy, &db) {
        let mut cmd = Command::new("node");
        cmd.arg(node_dir.join("migration_diff.js"))
            .arg(url)
            .arg(ddl_url)
            .arg(table)
            .current_dir(&node_dir);
        let out = run_async(cmd, "migration_diff.js").await;
        assert!(
            out.status.success(),
            "{}",
            describe("migration_diff.js", &out)
        );
        lines.push(String::from_utf8_lossy(&out.stdout).trim().to_owned());
    }
    assert!(
        lines[0].contains("\"error\""),
        "the migrations fail something: {}",
        lines[0]
    );
    assert_eq!(lines[1], lines[0], "through tidepool vs PostgreSQL");
    assert_eq!(
        lines[2], lines[0],
        "migrations through tidepool vs PostgreSQL"
    );
}

/// Issue 24 for pgjdbc (`prepareThreshold=1`): across ADD COLUMN, ALTER
/// COLUMN TYPE and DROP COLUMN, the same rows and SQLSTATEs through tidepool
/// as directly, attempt for attempt (pgjdbc heals by itself directly, so
/// through tidepool too: no error at all).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn java_pgjdbc_sees_a_migration_as_it_would_directly() {
    require_java();
    let classes = tokio::task::spawn_blocking(|| compile_java("MigrationDiff"))
        .await
        .expect("javac thread");
    let c = cluster();
    let db = c.create_database("jdbc_migration");
    let proxy = TestProxy::for_db(c, &db, "default_pool_size = 2");
    let jdbc = |port: u16| {
        format!(
            "jdbc:postgresql://{}:{port}/{db}?prepareThreshold=1&connectTimeout=10&socketTimeout=90",
            harness::HOST
        )
    };
    let mut lines = Vec::new();
    for (url, ddl_url, table) in migration_runs(c, &proxy, &db) {
        let port = |u: &str| {
            if u == proxy.url(&db) {
                proxy.port()
            } else {
                c.primary_port()
            }
        };
        let mut cmd = Command::new("java");
        cmd.arg("-cp")
            .arg(format!("{PGJDBC_JAR}:{}", classes.display()))
            .arg("MigrationDiff")
            .arg(jdbc(port(&url)))
            .arg(jdbc(port(&ddl_url)))
            .arg(harness::APP_USER)
            .arg(harness::APP_PASSWORD)
            .arg(table);
        let out = run_async(cmd, "MigrationDiff").await;
        assert!(out.status.success(), "{}", describe("MigrationDiff", &out));
        lines.push(String::from_utf8_lossy(&out.stdout).trim().to_owned());
    }
    let _ = std::fs::remove_dir_all(&classes);
    // pgjdbc prepares again by itself on `cached plan must not change result
    // type`: directly, every read succeeds with the new columns.
    assert!(
        lines[0].contains("[\"add column\",0,\"0\",\"ok\",3,"),
        "{}",
        lines[0]
    );
    assert_eq!(lines[1], lines[0], "through tidepool vs PostgreSQL");
    assert_eq!(
        lines[2], lines[0],
        "migrations through tidepool vs PostgreSQL"
    );
}

// --- more drivers, unmodified, with their defaults (issue 25) ----------------------
//
// Each runs the same workload (tests/clients/<driver>): more workers than the
// pool has servers, each with its own connection, running a query by id
// (checked), an update and an insert in a transaction, with a column added
// half way through by one of them; the sums and counts are checked at the end.
// With TIDEPOOL_TEST_DIRECT=1 they run against PostgreSQL itself.

/// Pool size of the driver tests: fewer servers than the drivers' workers.
const DRIVER_POOL: usize = 3;
const DRIVER_WORKERS: usize = 8;

/// A database with the drivers' tables: 100 items, no events.
async fn driver_database(c: &harness::Cluster, name: &str) -> String {
    let db = c.create_database(name);
    let owner = harness::connect(&c.app_url(&db)).await.expect("owner");
    owner
        .batch_execute(
            "create table items (id int primary key, name varchar(50) not null, qty int not null default 0);
             insert into items select g, 'item' || g, 0 from generate_series(1, 100) g;
             create table events (worker int not null, n int not null);",
        )
        .await
        .expect("driver tables");
    db
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn php_pdo_with_native_prepares() {
    require(
        "php with pdo_pgsql (php-cli php-pgsql)",
        Command::new("php").args(["-r", "exit(extension_loaded('pdo_pgsql') ? 0 : 1);"]),
    );
    let c = cluster();
    let db = driver_database(c, "phppdo").await;
    let target = Target::new(c, &db, DRIVER_POOL, "");
    let mut cmd = Command::new("php");
    cmd.arg(clients_dir().join("php/pdo_check.php"))
        .arg(harness::HOST)
        .arg(target.port.to_string())
        .arg(&db)
        .arg(harness::APP_USER)
        .arg(harness::APP_PASSWORD)
        .arg(DRIVER_WORKERS.to_string())
        .arg("200");
    let out = run_async(cmd, "pdo_check.php").await;
    assert_ok("pdo_check.php", &out, "php pdo: OK");
    target.assert_pool_respected();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ruby_activerecord_with_prepared_statements_and_threads() {
    require(
        "ruby with activerecord and pg (ruby-activerecord ruby-pg)",
        Command::new("ruby").args(["-e", "require 'active_record'; require 'pg'"]),
    );
    let c = cluster();
    let db = driver_database(c, "rubyar").await;
    let target = Target::new(c, &db, DRIVER_POOL, "");
    let mut cmd = Command::new("ruby");
    cmd.arg(clients_dir().join("ruby/activerecord_check.rb"))
        .arg(target.url())
        .arg("10")
        .arg("100");
    let out = run_async(cmd, "activerecord_check.rb").await;
    assert_ok("activerecord_check.rb", &out, "ruby activerecord: OK");
    target.assert_pool_respected();
}

/// Builds tests/clients/go/pgx_check offline against Debian's pgx v4.
fn build_pgx_check() -> PathBuf {
    let bin =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("pgx_check-{}", std::process::id()));
    let mut go = Command::new("go");
    go.args(["build", "-o"])
        .arg(&bin)
        .arg(".")
        .current_dir(clients_dir().join("go/pgx_check"))
        .env("GOPATH", "/usr/share/gocode")
        .env("GO111MODULE", "off")
        .env("GOFLAGS", "")
        .env(
            "GOCACHE",
            Path::new(env!("CARGO_TARGET_TMPDIR")).join("gocache"),
        );
    let out = run(go, "go build");
    assert!(
        out.status.success(),
        "{}",
        describe("go build pgx_check", &out)
    );
    bin
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_pgx_with_its_statement_cache() {
    require("go (golang-go)", Command::new("go").arg("version"));
    assert!(
        Path::new("/usr/share/gocode/src/github.com/jackc/pgx/v4").is_dir(),
        "pgx v4 is missing: run scripts/test (apt-get install golang-github-jackc-pgx-v4-dev)"
    );
    let bin = tokio::task::spawn_blocking(build_pgx_check)
        .await
        .expect("go build thread");
    let c = cluster();
    let db = driver_database(c, "gopgx").await;
    let target = Target::new(c, &db, DRIVER_POOL, "");
    let mut cmd = Command::new(&bin);
    cmd.arg(target.url())
        .arg(DRIVER_WORKERS.to_string())
        .arg("200");
    let out = run_async(cmd, "pgx_check").await;
    let _ = std::fs::remove_file(&bin);
    assert_ok("pgx_check", &out, "go pgx: OK");
    target.assert_pool_respected();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn java_pgjdbc_metadata_of_statements_never_executed() {
    require_java();
    let classes = tokio::task::spawn_blocking(|| compile_java("JdbcMetadataCheck"))
        .await
        .expect("javac thread");
    let c = cluster();
    let db = driver_database(c, "jdbcmeta").await;
    let target = Target::new(c, &db, DRIVER_POOL, "");
    // pgjdbc's defaults (prepareThreshold 5).
    let jdbc_url = format!(
        "jdbc:postgresql://{}:{}/{}?connectTimeout=10&socketTimeout=90",
        harness::HOST,
        target.port,
        db
    );
    let mut cmd = Command::new("java");
    cmd.arg("-cp")
        .arg(format!("{PGJDBC_JAR}:{}", classes.display()))
        .arg("JdbcMetadataCheck")
        .arg(&jdbc_url)
        .arg(harness::APP_USER)
        .arg(harness::APP_PASSWORD)
        .arg(DRIVER_WORKERS.to_string())
        .arg("40");
    let out = run_async(cmd, "JdbcMetadataCheck").await;
    let _ = std::fs::remove_dir_all(&classes);
    assert_ok("JdbcMetadataCheck", &out, "pgjdbc metadata: OK");
    target.assert_pool_respected();
}

/// Rust sqlx with its defaults: a PgPool whose connections cache every
/// query as a named prepared statement (capacity 100 per connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_sqlx_with_its_statement_cache() {
    let c = cluster();
    let db = driver_database(c, "sqlx").await;
    let target = Target::new(c, &db, DRIVER_POOL, "");
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(DRIVER_WORKERS as u32)
        .acquire_timeout(Duration::from_secs(60))
        .connect(&target.url())
        .await
        .expect("sqlx pool");
    let iterations = 200usize;
    let mut tasks = Vec::new();
    for w in 0..DRIVER_WORKERS {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = pool.acquire().await.expect("a connection");
            for i in 0..iterations {
                let id = ((w * 7 + i) % 100 + 1) as i32;
                let (got, name, _qty): (i32, String, i32) =
                    sqlx::query_as("SELECT id, name, qty FROM items WHERE id = $1")
                        .bind(id)
                        .fetch_one(&mut *conn)
                        .await
                        .unwrap_or_else(|e| panic!("worker {w}: select {id}: {e}"));
                assert_eq!((got, name), (id, format!("item{id}")));
                let mut tx = sqlx::Connection::begin(&mut *conn).await.expect("begin");
                let done = sqlx::query("UPDATE items SET qty = qty + 1 WHERE id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await
                    .expect("update");
                assert_eq!(done.rows_affected(), 1);
                sqlx::query("INSERT INTO events (worker, n) VALUES ($1, $2)")
                    .bind(w as i32)
                    .bind(i as i32)
                    .execute(&mut *tx)
                    .await
                    .expect("insert");
                tx.commit().await.expect("commit");
                if w == 0 && i == iterations / 2 {
                    sqlx::query("ALTER TABLE items ADD COLUMN note text")
                        .execute(&mut *conn)
                        .await
                        .expect("alter");
                }
            }
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(120), t)
            .await
            .expect("the workers finish")
            .expect("a worker failed");
    }
    let (sum, events): (i64, i64) =
        sqlx::query_as("SELECT sum(qty)::int8, (SELECT count(*) FROM events) FROM items")
            .fetch_one(&pool)
            .await
            .expect("totals");
    let want = (DRIVER_WORKERS * iterations) as i64;
    assert_eq!((sum, events), (want, want));
    pool.close().await;
    target.assert_pool_respected();
}
