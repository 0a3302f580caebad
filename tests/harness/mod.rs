//! Integration-test harness for tidepool.
//!
//! Include it from a test binary with `mod harness;`.
//!
//! * [`cluster()`] / [`cluster_with_replica()`] start (once per test binary,
//!   lazily) a throw-away PostgreSQL cluster that is shared by every test in
//!   the binary. Use [`Cluster::create_database`] to get a private database so
//!   tests do not interfere with each other.
//! * [`Cluster::start_new`] starts a private cluster (e.g. for tests that
//!   restart the primary); it is stopped and deleted when dropped.
//! * Every postmaster is spawned from a dedicated keeper thread with
//!   `PR_SET_PDEATHSIG = SIGQUIT`, so servers die together with the test
//!   process even when it is killed. Data lives under
//!   `$TMPDIR/tidepool-test-<pid>-<n>/`; directories left behind by dead test
//!   processes are removed the next time the harness starts.
//! * When running as root, the servers run as the `postgres` OS user (or a
//!   `tidepool-pg` user created on demand).
//!
//! Roles on the primary (see the constants below): superuser `postgres`
//! (SCRAM), `app` (SCRAM, LOGIN CREATEDB), `md5user` (password stored as md5,
//! pg_hba method `md5`), `trustuser` (pg_hba `trust` over TCP).
//!
//! Blocking: the `Cluster` methods that are not `async` (start/stop, psql,
//! create_database, ...) block the calling thread. In a `#[tokio::test]` that
//! also runs tidepool in-process on the same runtime, call them through
//! `tokio::task::spawn_blocking` (or use the `*_async` wrappers, or a
//! `multi_thread` runtime) so the proxy keeps being polled meanwhile.

#![allow(dead_code)]
#![allow(clippy::expect_used, clippy::unwrap_used)]

/// Certificates made with openssl, for TLS tests.
pub mod certs;
mod cluster;
/// Running the tidepool binary as a child process.
pub mod daemon;
mod keeper;
/// A network namespace on a veth pair: a link a test can cut.
pub mod netns;
mod os;
mod process;

/// Starting tidepool in-process.
pub mod proxy;
/// A byte-level protocol client.
pub mod raw;
/// A throw-away redis-server.
pub mod redis;
/// Split writes and comparable answers, for differential tests.
pub mod wire;

use std::future::Future;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub use cluster::Cluster;
#[allow(unused_imports)]
pub use process::client_env;
#[allow(unused_imports)]
pub use proxy::TestProxy;

/// Host every test server listens on.
pub const HOST: &str = "127.0.0.1";
/// Superuser created by initdb (SCRAM).
pub const SUPERUSER: &str = "postgres";
pub const SUPERUSER_PASSWORD: &str = "postgres";
/// Ordinary application role (SCRAM, LOGIN, CREATEDB); owns databases made by
/// [`Cluster::create_database`].
pub const APP_USER: &str = "app";
pub const APP_PASSWORD: &str = "secret";
/// Role whose password is stored as an md5 hash; pg_hba uses `md5` for it.
pub const MD5_USER: &str = "md5user";
pub const MD5_PASSWORD: &str = "md5secret";
/// Role without password; pg_hba uses `trust` for it on 127.0.0.1.
pub const TRUST_USER: &str = "trustuser";

/// Default deadline for waits inside the harness (server start, replica sync).
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(60);
/// Deadline for one `psql` run.
pub const PSQL_TIMEOUT: Duration = Duration::from_secs(120);
/// Deadline for one `pgbench` run.
pub const PGBENCH_TIMEOUT: Duration = Duration::from_secs(600);

/// The primary-only cluster shared by all tests of this test binary.
/// Started on first use; panics (in every caller) if it could not start.
pub fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Result<Cluster, String>> = OnceLock::new();
    match CLUSTER.get_or_init(|| Cluster::try_start_new(0)) {
        Ok(c) => c,
        Err(e) => panic!("shared PostgreSQL cluster failed to start: {e}"),
    }
}

/// A primary + one streaming replica shared by all tests of this test binary
/// (a different cluster from [`cluster()`]).
pub fn cluster_with_replica() -> &'static Cluster {
    static CLUSTER: OnceLock<Result<Cluster, String>> = OnceLock::new();
    match CLUSTER.get_or_init(|| Cluster::try_start_new(1)) {
        Ok(c) => c,
        Err(e) => panic!("shared PostgreSQL cluster with replica failed to start: {e}"),
    }
}

/// Path of a PostgreSQL program: the server bindir (`pg_config --bindir`, else
/// the highest `/usr/lib/postgresql/*/bin`), else `/usr/bin`, else bare `name`
/// (resolved through `PATH`).
/// Makes `path` the PostgreSQL server user's (a key file it must read).
pub fn give_to_server_user(path: &std::path::Path) {
    os::chown_to_server_user(path).expect("chown to the server user");
}

pub fn pg_bin(name: &str) -> PathBuf {
    os::pg_bin(name)
}

/// `postgresql://user:password@127.0.0.1:port/db`. No percent-encoding is
/// done: keep names and passwords URL-safe.
pub fn url(port: u16, user: &str, password: Option<&str>, db: &str) -> String {
    match password {
        Some(pw) => format!("postgresql://{user}:{pw}@{HOST}:{port}/{db}"),
        None => format!("postgresql://{user}@{HOST}:{port}/{db}"),
    }
}

/// Connects with tokio-postgres (no TLS) and spawns the connection task.
/// `config` is a libpq-style key/value string or a `postgresql://` URL.
pub async fn connect(config: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(config, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        // Errors here (e.g. the server going away in a restart test) surface
        // on the client side as well; nothing else to do with them.
        let _ = connection.await;
    });
    Ok(client)
}

/// Runs a command on the admin console at `url` (a fresh connection) and
/// returns its rows as column → value maps.
pub async fn console(url: &str, cmd: &str) -> Vec<std::collections::HashMap<String, String>> {
    let client = connect(url).await.expect("console login");
    rows(client.simple_query(cmd).await.expect(cmd))
}

/// The rows of a simple-query answer as column → value maps (NULL as "").
pub fn rows(
    msgs: Vec<tokio_postgres::SimpleQueryMessage>,
) -> Vec<std::collections::HashMap<String, String>> {
    msgs.into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                r.columns()
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (c.name().to_owned(), r.get(i).unwrap_or("").to_owned()))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

/// Runs `psql -X -v ON_ERROR_STOP=1 -d <url> <args...>`, feeding `stdin` if
/// given. The password in the URL is also exported as `PGPASSWORD`; PG*
/// variables from the environment that could redirect the connection are
/// removed. Panics only if psql cannot be run or exceeds [`PSQL_TIMEOUT`];
/// check `status`/`stdout`/`stderr` of the returned output yourself.
pub fn psql(url: &str, args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = Command::new(pg_bin("psql"));
    cmd.args(["-X", "-v", "ON_ERROR_STOP=1", "-d", url])
        .args(args);
    process::client_env(&mut cmd, url);
    process::run_with_timeout(
        cmd,
        stdin.map(|s| s.as_bytes().to_vec()),
        PSQL_TIMEOUT,
        "psql",
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

/// Runs `pgbench <args...> <url>` (the URL is the trailing dbname argument).
/// Same environment handling as [`psql`]; deadline [`PGBENCH_TIMEOUT`].
pub fn pgbench(url: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new(pg_bin("pgbench"));
    cmd.args(args).arg(url);
    process::client_env(&mut cmd, url);
    process::run_with_timeout(cmd, None, PGBENCH_TIMEOUT, "pgbench")
        .unwrap_or_else(|e| panic!("{e}"))
}

/// [`psql`] on a blocking thread, for async tests.
pub async fn psql_async(url: &str, args: &[&str], stdin: Option<&str>) -> Output {
    let url = url.to_owned();
    let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    let stdin = stdin.map(str::to_owned);
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        psql(&url, &args, stdin.as_deref())
    })
    .await
    .expect("psql_async: blocking task failed")
}

/// [`pgbench`] on a blocking thread, for async tests.
pub async fn pgbench_async(url: &str, args: &[&str]) -> Output {
    let url = url.to_owned();
    let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        pgbench(&url, &args)
    })
    .await
    .expect("pgbench_async: blocking task failed")
}

/// The port of the server a statement through `c` ran on
/// (`inet_server_port()`): which backend tidepool chose.
pub async fn server_port(c: &tokio_postgres::Client) -> Result<u16, tokio_postgres::Error> {
    let rows = c.simple_query("select inet_server_port()").await?;
    Ok(rows
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).and_then(|p| p.parse().ok()),
            _ => None,
        })
        .expect("inet_server_port() returned no port"))
}

/// Runs `script` (SQL) with pgbench on 4 clients (2 threads), 50
/// transactions each, and asserts that all 200 succeeded.
pub async fn pgbench_script_all_succeed(url: &str, script: &str) {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let path = std::env::temp_dir().join(format!(
        "tidepool-pgbench-{}-{}.sql",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::write(&path, script).expect("write the pgbench script");
    let file = path.to_str().expect("a UTF-8 temp path").to_owned();
    let out = pgbench_async(url, &["-n", "-c", "4", "-j", "2", "-t", "50", "-f", &file]).await;
    let _ = std::fs::remove_file(&path);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("number of transactions actually processed: 200/200"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Polls `cond` (every 20 ms) until it returns true; panics with `what` if
/// that does not happen within `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Async version of [`wait_until`]: polls `cond().await` every 20 ms.
pub async fn wait_until_async<F, Fut>(what: &str, timeout: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if cond().await {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Logs in from the loopback address `source` (any 127/8 address is this
/// machine's) to tidepool or PostgreSQL on `port`: the client, or the
/// server's (SQLSTATE, message).
pub async fn login_from(
    source: &str,
    port: u16,
    user: &str,
    password: &str,
    db: &str,
) -> Result<tokio_postgres::Client, (String, String)> {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let stream = sock
        .connect(format!("127.0.0.1:{port}").parse().unwrap())
        .await
        .unwrap();
    let mut cfg = tokio_postgres::Config::new();
    cfg.user(user).password(password).dbname(db);
    match cfg.connect_raw(stream, tokio_postgres::NoTls).await {
        Ok((client, conn)) => {
            tokio::spawn(conn);
            Ok(client)
        }
        Err(e) => Err(match e.as_db_error() {
            Some(d) => (d.code().code().to_owned(), d.message().to_owned()),
            None => ("none".into(), e.to_string()),
        }),
    }
}

/// `tidepool check --config <config>`: whether it passed, and what it printed.
pub fn tidepool_check(config: &std::path::Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tidepool"))
        .arg("check")
        .arg("--config")
        .arg(config)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    (out.status.success(), text)
}

/// The first column of the first row `sql` returns (simple protocol).
pub async fn first_value(client: &tokio_postgres::Client, sql: &str) -> String {
    client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .into_iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{sql}: no row"))
}
