//! The process lifecycle, on the real binary: config reload by SIGHUP and
//! RELOAD (pool shrinks under load without dropping clients; a broken file
//! changes nothing), and graceful shutdown by SHUTDOWN and SIGTERM (no
//! transaction in flight is cut off).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::time::Duration;

use harness::cluster;
use harness::daemon::Daemon;
use tokio_postgres::SimpleQueryMessage;

fn config(db: &str, pool_size: u32, extra: &str) -> String {
    format!(
        r#"
[tidepool]
listen = ["127.0.0.1:{{port}}"]
admin_users = ["admin"]
shutdown_timeout = "20s"

[pool]
default_pool_size = {pool_size}
max_client_conn = 200
client_login_timeout = "5s"

[databases.{db}]
host = "127.0.0.1"
port = {port}

[users.app]
password = "{app_pw}"

[users.admin]
password = "adminpw"
{extra}
"#,
        port = cluster().primary_port(),
        app_pw = harness::APP_PASSWORD,
    )
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Console rows as column → value maps.
fn console(
    d: &Daemon,
    cmd: &str,
) -> Result<Vec<std::collections::HashMap<String, String>>, String> {
    let url = d.url("admin", "adminpw", "pgbouncer");
    rt().block_on(async {
        let c = harness::connect(&url).await.map_err(|e| format!("{e:?}"))?;
        let msgs = c.simple_query(cmd).await.map_err(|e| format!("{e:?}"))?;
        Ok(harness::rows(msgs))
    })
}

fn servers_of(d: &Daemon, db: &str) -> u64 {
    console(d, "SHOW POOLS")
        .unwrap()
        .iter()
        .filter(|r| r["database"] == db)
        .map(|r| {
            ["sv_active", "sv_idle", "sv_login"]
                .iter()
                .map(|c| r[*c].parse::<u64>().unwrap())
                .sum::<u64>()
        })
        .sum()
}

fn backends_in_postgres(db: &str) -> i64 {
    let out = harness::psql(
        &cluster().superuser_url("postgres"),
        &[
            "-At",
            "-c",
            &format!(
                "select count(*) from pg_stat_activity where datname = '{db}' and backend_type = 'client backend'"
            ),
        ],
        None,
    );
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

fn pgbench_init(db: &str) {
    let out = harness::pgbench(&cluster().app_url(db), &["-i", "-q", "-s", "1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn balances_match(db: &str) -> bool {
    let out = harness::psql(
        &cluster().app_url(db),
        &[
            "-At",
            "-c",
            "select (select sum(abalance) from pgbench_accounts) = (select coalesce(sum(delta), 0) from pgbench_history)",
        ],
        None,
    );
    String::from_utf8_lossy(&out.stdout).trim() == "t"
}

#[test]
fn sighup_shrinks_the_pool_under_load_without_dropping_clients() {
    let db = cluster().create_database("shrink");
    pgbench_init(&db);
    let d = Daemon::start(&config(&db, 8, ""));
    let url = d.url(harness::APP_USER, harness::APP_PASSWORD, &db);
    let bench = std::thread::spawn(move || {
        harness::pgbench(
            &url,
            &["-n", "-c", "16", "-j", "2", "-T", "6", "-M", "simple"],
        )
    });
    harness::wait_until("the pool to fill", Duration::from_secs(10), || {
        servers_of(&d, &db) >= 8
    });
    d.write_config(&config(&db, 2, ""));
    d.signal(libc::SIGHUP);
    let out = bench.join().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}\n{err}");
    assert!(text.contains("number of failed transactions: 0 "), "{text}");
    assert!(!err.contains("aborted"), "a client was dropped:\n{err}");
    // The pool converged to the new size, as PostgreSQL sees it too.
    harness::wait_until("the pool to shrink to 2", Duration::from_secs(15), || {
        servers_of(&d, &db) <= 2 && backends_in_postgres(&db) <= 2
    });
    let pools = console(&d, "SHOW POOLS").unwrap();
    assert!(
        pools
            .iter()
            .any(|r| r["database"] == db && r["pool_size"] == "2"),
        "{pools:?}"
    );
    assert!(d.log().contains("config reloaded"), "{}", d.log());
    assert!(balances_match(&db));
}

#[test]
fn a_broken_config_changes_nothing_and_a_good_one_adds_a_database() {
    let c = cluster();
    let db = c.create_database("reload");
    let added = c.create_database("added");
    let d = Daemon::start(&config(&db, 4, ""));
    let app = |name: &str| d.url(harness::APP_USER, harness::APP_PASSWORD, name);
    let default_pool_size = |d: &Daemon| {
        console(d, "SHOW CONFIG")
            .unwrap()
            .into_iter()
            .find(|r| r["key"] == "default_pool_size")
            .map(|r| r["value"].clone())
            .unwrap()
    };
    // A connected client across every reload below.
    let rt = rt();
    let client = rt.block_on(harness::connect(&app(&db))).unwrap();
    rt.block_on(client.simple_query("select 1")).unwrap();

    // SIGHUP with a broken file: logged, nothing changes.
    d.write_config(
        &config(&db, 4, "").replace("default_pool_size = 4", "default_pool_size = \"many\""),
    );
    d.signal(libc::SIGHUP);
    harness::wait_until(
        "the reload error in the log",
        Duration::from_secs(10),
        || d.log().contains("reload failed"),
    );
    assert_eq!(default_pool_size(&d), "4");
    // RELOAD says why.
    let err = console(&d, "RELOAD").unwrap_err();
    assert!(
        err.contains("F0000") && err.contains("default_pool_size"),
        "{err}"
    );
    rt.block_on(client.simple_query("select 1")).unwrap();

    // A good file: a new database and a new size, the client unaffected.
    let extra = format!(
        "[databases.{added}]\nhost = \"127.0.0.1\"\nport = {}\n",
        c.primary_port()
    );
    d.write_config(&config(&db, 6, &extra));
    console(&d, "RELOAD").unwrap();
    assert_eq!(default_pool_size(&d), "6");
    rt.block_on(client.simple_query("select 1")).unwrap();
    let other = rt.block_on(harness::connect(&app(&added))).unwrap();
    rt.block_on(other.simple_query("select 1")).unwrap();
    // Removing it again refuses new clients of it; connected ones stay.
    d.write_config(&config(&db, 6, ""));
    console(&d, "RELOAD").unwrap();
    let err = rt.block_on(harness::connect(&app(&added))).unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("3D000"), "{err:?}");
    rt.block_on(other.simple_query("select 1")).unwrap();
    rt.block_on(client.simple_query("select 1")).unwrap();

    // A setting bound at start: logged, and SHOW CONFIG keeps showing the
    // value in force (it showed the file's, which nothing listened on).
    let config_value = |key: &str| {
        console(&d, "SHOW CONFIG")
            .unwrap()
            .into_iter()
            .find(|r| r["key"] == key)
            .map(|r| r["value"].clone())
            .unwrap()
    };
    let listening = config_value("listen");
    d.write_config(&config(&db, 6, "").replace(
        "listen = [\"127.0.0.1:{port}\"]",
        "listen = [\"127.0.0.1:{port}\", \"127.0.0.1:1\"]",
    ));
    // The console's RELOAD says so too, not only the log.
    let out = harness::psql(
        &d.url("admin", "adminpw", "pgbouncer"),
        &["-c", "RELOAD"],
        None,
    );
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && said.contains("WARNING:  listen changes only on restart"),
        "{said}"
    );
    assert_eq!(config_value("listen"), listening);
    assert!(d.log().contains("changes only on restart"), "{}", d.log());
    rt.block_on(client.simple_query("select 1")).unwrap();
}

#[test]
fn shutdown_during_pgbench_cuts_off_no_transaction() {
    let db = cluster().create_database("shutdown");
    pgbench_init(&db);
    let mut d = Daemon::start(&config(&db, 4, ""));
    let url = d.url(harness::APP_USER, harness::APP_PASSWORD, &db);
    let bench = std::thread::spawn(move || {
        harness::pgbench(
            &url,
            &["-n", "-c", "12", "-j", "2", "-T", "60", "-M", "extended"],
        )
    });
    harness::wait_until("transactions to run", Duration::from_secs(20), || {
        console(&d, "SHOW STATS")
            .map(|rows| {
                rows.iter().any(|r| {
                    r["database"] == db && r["total_xact_count"].parse::<u64>().unwrap_or(0) > 200
                })
            })
            .unwrap_or(false)
    });
    console(&d, "SHUTDOWN").unwrap();
    let status = d
        .wait_exit(Duration::from_secs(30))
        .expect("tidepool exits after SHUTDOWN");
    assert!(status.success(), "{status:?}\n{}", d.log());
    let out = bench.join().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    // Every client stopped when it tried to start its next transaction (the
    // BEGIN, command 4 of pgbench's tpcb-like script), never inside one.
    let aborted: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("aborted in command"))
        .collect();
    assert!(!aborted.is_empty(), "pgbench saw no shutdown?\n{err}");
    for line in &aborted {
        assert!(
            line.contains("aborted in command 4 "),
            "a transaction was cut off: {line}\n{err}"
        );
    }
    assert!(err.contains("FATAL:  tidepool is shutting down"), "{err}");
    assert!(
        !err.contains("08006") && !err.contains("server connection lost"),
        "{err}"
    );
    assert!(balances_match(&db));
    // After shutdown began, new connections are refused.
    assert!(std::net::TcpStream::connect(("127.0.0.1", d.port)).is_err());
}

#[test]
fn sigterm_lets_an_open_transaction_commit_then_closes() {
    let db = cluster().create_database("sigterm");
    let mut d = Daemon::start(&config(
        &db,
        4,
        "[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n",
    ));
    assert_eq!(harness::daemon::http_get(d.metrics_port, "/readyz").0, 200);
    let url = d.url(harness::APP_USER, harness::APP_PASSWORD, &db);
    let rt = rt();
    let busy = rt.block_on(harness::connect(&url)).unwrap();
    let idle = rt.block_on(harness::connect(&url)).unwrap();
    rt.block_on(busy.simple_query("create table t (x int); begin; insert into t values (42)"))
        .unwrap();
    rt.block_on(idle.simple_query("select 1")).unwrap();
    d.signal(libc::SIGTERM);
    // The idle client is told and closed; the busy one may finish.
    harness::wait_until(
        "the idle client to be closed",
        Duration::from_secs(10),
        || idle.is_closed(),
    );
    assert!(d.is_running(), "exited while a transaction was open");
    // Draining: not ready, but still observable.
    let (status, body) = harness::daemon::http_get(d.metrics_port, "/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("shutting down"), "{body}");
    assert_eq!(harness::daemon::http_get(d.metrics_port, "/metrics").0, 200);
    rt.block_on(busy.simple_query("insert into t values (43); commit"))
        .unwrap();
    let status = d
        .wait_exit(Duration::from_secs(15))
        .expect("exits once the transaction is done");
    assert!(status.success(), "{status:?}");
    let out = harness::psql(
        &cluster().app_url(&db),
        &["-At", "-c", "select sum(x) from t"],
        None,
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "85");
}

#[test]
fn a_reload_adds_users_and_replicas_without_dropping_clients() {
    let c = harness::cluster_with_replica();
    let db = c.create_database("grow");
    c.wait_for_replicas();
    let primary_only = format!(
        r#"
[tidepool]
listen = ["127.0.0.1:{{port}}"]
admin_users = ["admin"]

[pool]
default_pool_size = 4

[databases.{db}]
host = "127.0.0.1"
port = {port}
health_user = "{app}"
health_password = "{pw}"

[users.app]
password = "{pw}"

[users.admin]
password = "adminpw"
"#,
        port = c.primary_port(),
        app = harness::APP_USER,
        pw = harness::APP_PASSWORD,
    );
    let d = Daemon::start(&primary_only);
    let rt = rt();
    let client = rt
        .block_on(harness::connect(&d.url(
            harness::APP_USER,
            harness::APP_PASSWORD,
            &db,
        )))
        .unwrap();
    rt.block_on(client.simple_query("select 1")).unwrap();
    // trustuser is not configured yet.
    let trust_url = harness::url(d.port, harness::TRUST_USER, None, &db);
    assert!(rt.block_on(harness::connect(&trust_url)).is_err());
    assert!(console(&d, "SHOW REPLICAS").unwrap().is_empty());

    let grown = primary_only
        .replace(
            &format!("port = {}\nhealth_user", c.primary_port()),
            &format!(
                "port = {}\nreplicas = [{{ host = \"127.0.0.1\", port = {} }}]\nhealth_user",
                c.primary_port(),
                c.replica_ports()[0]
            ),
        )
        .replace(
            "[users.admin]",
            &format!(
                "[users.{}]\nauth_type = \"trust\"\n\n[users.admin]",
                harness::TRUST_USER
            ),
        );
    d.write_config(&grown);
    d.signal(libc::SIGHUP);
    harness::wait_until(
        "the replica to be checked and healthy",
        Duration::from_secs(30),
        || {
            console(&d, "SHOW REPLICAS")
                .map(|rows| {
                    rows.iter()
                        .any(|r| r["backend_role"] == "replica" && r["healthy"] == "1")
                })
                .unwrap_or(false)
        },
    );
    // The connected client kept its connection, and its reads may now go to the replica.
    harness::wait_until("a read on the replica", Duration::from_secs(30), || {
        let rows = rt
            .block_on(client.simple_query("select pg_is_in_recovery()"))
            .unwrap();
        rows.iter().any(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0) == Some("t"),
            _ => false,
        })
    });
    // And the new user can log in.
    let trust = rt.block_on(harness::connect(&trust_url)).unwrap();
    rt.block_on(trust.simple_query("select 1")).unwrap();
}

/// Whatever clients are doing (a query that runs for minutes, a transaction
/// left open, a message half sent), SIGTERM ends the process once
/// `shutdown_timeout` has passed.
#[test]
fn sigterm_ends_the_process_within_shutdown_timeout_whatever_clients_do() {
    use std::io::Write;
    let db = cluster().create_database("sigterm_stuck");
    let toml = config(&db, 4, "[users.trustuser]\nauth_type = \"trust\"\n")
        .replace("shutdown_timeout = \"20s\"", "shutdown_timeout = \"2s\"");
    let mut d = Daemon::start(&toml);
    let url = d.url(harness::APP_USER, harness::APP_PASSWORD, &db);
    let rt = rt();
    let sleeper = rt.block_on(harness::connect(&url)).unwrap();
    let holder = rt.block_on(harness::connect(&url)).unwrap();
    rt.block_on(holder.simple_query("begin; select 1")).unwrap();
    let sleeping = rt.spawn(async move { sleeper.simple_query("select pg_sleep(600)").await });
    // A client that logged in and then sent 10 bytes of a 100 kB query.
    let mut half = std::net::TcpStream::connect(("127.0.0.1", d.port)).unwrap();
    rt.block_on(async {
        let c = harness::connect(&url).await.unwrap();
        harness::wait_until_async("the sleep to start", Duration::from_secs(30), || async {
            sleeps_running(&c).await.unwrap_or(0) > 0
        })
        .await;
    });
    let mut startup = Vec::new();
    let body = format!("\0\x03\0\0user\0trustuser\0database\0{db}\0\0");
    startup.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    startup.extend_from_slice(body.as_bytes());
    half.write_all(&startup).unwrap();
    let mut head = vec![b'Q'];
    head.extend_from_slice(&100_000i32.to_be_bytes());
    head.extend_from_slice(b"select 1 ");
    half.write_all(&head).unwrap();

    d.signal(libc::SIGTERM);
    let status = d.wait_exit(Duration::from_secs(30));
    assert!(
        status.is_some(),
        "still running 30 s after SIGTERM with shutdown_timeout = 2s"
    );
    // The client whose query ran past shutdown_timeout was told why, as
    // PostgreSQL's fast shutdown tells its sessions, and its query did not
    // go on running on the server for nobody.
    let err = rt
        .block_on(sleeping)
        .unwrap()
        .expect_err("the sleep was cut off");
    assert_eq!(err.code().map(|c| c.code()), Some("57P01"), "{err:?}");
    rt.block_on(async {
        let c = cluster().admin_client(&db).await;
        harness::wait_until_async(
            "the cut-off query to end on the server",
            Duration::from_secs(10),
            || async { sleeps_running(&c).await == Some(0) },
        )
        .await;
    });
    drop(holder);
}

/// How many backends run `select pg_sleep(600)` now (None: not known).
async fn sleeps_running(c: &tokio_postgres::Client) -> Option<i64> {
    c.query_one(
        "select count(*) from pg_stat_activity where query = 'select pg_sleep(600)' and state = 'active'",
        &[],
    )
    .await
    .ok()
    .map(|r| r.get(0))
}

/// A database named after `name`, and a tidepool in front of it that can
/// be taken over (`upgrade_socket`), with `shutdown_timeout` as given.
struct Upgradable {
    db: String,
    socket: std::path::PathBuf,
    toml: String,
    old: Daemon,
    url: String,
}

fn upgradable(name: &str, shutdown_timeout: &str) -> Upgradable {
    let db = cluster().create_database(name);
    let socket = std::env::temp_dir().join(format!("tidepool-{name}-{}.sock", std::process::id()));
    let toml = config(&db, 4, "").replace(
        "shutdown_timeout = \"20s\"",
        &format!(
            "shutdown_timeout = \"{shutdown_timeout}\"\nupgrade_socket = \"{}\"",
            socket.display()
        ),
    );
    let old = Daemon::start(&toml);
    let url = old.url(harness::APP_USER, harness::APP_PASSWORD, &db);
    Upgradable {
        db,
        socket,
        toml,
        old,
        url,
    }
}

/// An upgrade that refuses and drops no client: a second tidepool started
/// with `--takeover` receives the first one's listening sockets over
/// `upgrade_socket`, then its clients, each between two transactions, with
/// their sessions; the first exits once none is left. pgbench's long-lived
/// clients outlive the old process's `shutdown_timeout` (2 s) by far, so
/// they can only have finished their run by moving; clients connecting for
/// every transaction (-C) run throughout. (`so_reuseport` alone loses the
/// connections queued on the socket that closes: they are refused.)
#[test]
fn an_upgrade_under_pgbench_drops_no_client() {
    let Upgradable {
        db,
        socket,
        toml,
        mut old,
        url,
    } = upgradable("upgrade", "2s");
    pgbench_init(&db);
    let (u1, u2) = (url.clone(), url.clone());
    let steady = std::thread::spawn(move || {
        harness::pgbench(
            &u1,
            &["-n", "-c", "6", "-j", "2", "-T", "12", "-M", "extended"],
        )
    });
    let churn = std::thread::spawn(move || {
        harness::pgbench(&u2, &["-n", "-C", "-c", "2", "-j", "1", "-T", "12", "-S"])
    });
    std::thread::sleep(Duration::from_secs(2));
    let new = take_over(&old, &toml);
    assert!(
        new.log().contains("took over the listening sockets"),
        "{}",
        new.log()
    );
    // The old process exits while pgbench still runs: its clients moved.
    let status = old
        .wait_exit(Duration::from_secs(8))
        .expect("the old process exits once its clients moved");
    assert!(status.success(), "{status:?}\n{}", old.log());
    assert!(
        old.log().contains("clients moved to the new process"),
        "{}",
        old.log()
    );
    assert!(
        !old.log().contains("closing the remaining"),
        "no client was left to close: {}",
        old.log()
    );
    for (name, out) in [
        ("steady", steady.join().unwrap()),
        ("churn", churn.join().unwrap()),
    ] {
        let text = String::from_utf8_lossy(&out.stdout);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{name}: {text}{err}");
        assert!(!err.contains("error"), "{name}: {err}");
        assert!(
            text.contains("number of failed transactions: 0"),
            "{name}: {text}"
        );
    }
    let served = harness::pgbench(&url, &["-n", "-c", "2", "-t", "20", "-S"]);
    assert!(
        served.status.success(),
        "{}",
        String::from_utf8_lossy(&served.stderr)
    );
    let stats = console(&new, "SHOW STATS").unwrap();
    let row = stats.iter().find(|r| r["database"] == db).unwrap();
    assert!(row["total_xact_count"].parse::<u64>().unwrap() >= 40);
    // The new one can itself be taken over later (it listens on the socket).
    assert!(std::os::unix::net::UnixStream::connect(&socket).is_ok());
    assert!(balances_match(&db));
    let _ = std::fs::remove_file(&socket);
}

/// A second tidepool started with `--takeover` of `old`, once both say
/// it took over.
fn take_over(old: &Daemon, toml: &str) -> Daemon {
    let new = Daemon::start_with(toml, old.port, &["--takeover"]);
    // Both sides: each logs its half when it is done, in no fixed order.
    harness::wait_until("the takeover", Duration::from_secs(10), || {
        old.log().contains("a new tidepool took over")
            && new.log().contains("took over the listening sockets")
    });
    new
}

/// Waits until `d`'s SHOW CLIENTS lists a client of the application user.
async fn wait_for_app_client(d: &Daemon, what: &str) {
    let admin = d.url("admin", "adminpw", "pgbouncer");
    harness::wait_until_async(what, Duration::from_secs(10), || {
        let admin = admin.clone();
        async move {
            let c = harness::connect(&admin).await.unwrap();
            let rows = harness::rows(c.simple_query("SHOW CLIENTS").await.unwrap());
            rows.iter().any(|r| r["user"] == harness::APP_USER)
        }
    })
    .await;
}

/// A `pg_sleep(30)` of `c`, canceled with its cancel key half a second in,
/// ends with 57014 well before its time.
async fn assert_canceled(c: &tokio_postgres::Client, what: &str) {
    let cancel = c.cancel_token();
    let (slept, ()) = tokio::time::timeout(Duration::from_secs(15), async {
        tokio::join!(c.simple_query("select pg_sleep(30)"), async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            cancel.cancel_query(tokio_postgres::NoTls).await.unwrap();
        })
    })
    .await
    .unwrap_or_else(|_| panic!("{what}: not canceled within 15 s"));
    assert_eq!(
        slept.unwrap_err().code(),
        Some(&tokio_postgres::error::SqlState::QUERY_CANCELED),
        "{what}"
    );
}

/// What a client holds in its session moves with it: parameters it set,
/// a custom one, its named prepared statement, its LISTEN channel (with a
/// NOTICE that notifications sent during the move may be missing) and its
/// cancel key. A client inside a transaction at the takeover finishes it
/// on the old process (a cancel for it reaches it there through the new
/// process), then moves; what it wrote is committed. Parked idle clients
/// move as well.
#[test]
fn a_moved_client_keeps_its_session() {
    use tokio_postgres::AsyncMessage;
    let Upgradable {
        db: _,
        socket,
        toml,
        mut old,
        url,
    } = upgradable("upgrade_session", "30s");
    let rt = rt();
    let (a, b, stmt, rows_of_t, mut heard, idle) = rt.block_on(async {
        let (a, mut conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(m) = std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                match m {
                    Ok(AsyncMessage::Notification(n)) => {
                        let _ = tx.send(format!("notification {} {}", n.channel(), n.payload()));
                    }
                    Ok(AsyncMessage::Notice(n)) => {
                        let _ = tx.send(format!("notice {}", n.message()));
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        });
        a.batch_execute(
            "create table t (n int); set statement_timeout = '7s'; set my.var = 'kept'; listen jobs",
        )
        .await
        .unwrap();
        let stmt = a.prepare("select $1::int + 1").await.unwrap();
        let rows_of_t = a.prepare("select * from t").await.unwrap();
        a.query(&rows_of_t, &[]).await.unwrap();
        assert_eq!(a.query_one(&stmt, &[&1i32]).await.unwrap().get::<_, i32>(0), 2);
        let b = harness::connect(&url).await.unwrap();
        b.batch_execute("begin; insert into t values (1)").await.unwrap();
        // Idle long enough to be parked (park_idle_clients_after, 1 s):
        // parked clients move too.
        let mut idle = Vec::new();
        for _ in 0..20 {
            let c = harness::connect(&url).await.unwrap();
            c.batch_execute("select 1").await.unwrap();
            idle.push(c);
        }
        (a, b, stmt, rows_of_t, rx, idle)
    });
    let parked = || {
        console(&old, "SHOW MEM")
            .unwrap()
            .iter()
            .find(|r| r["name"] == "parked_client_cache")
            .map_or(0, |r| r["used"].parse::<u64>().unwrap())
    };
    harness::wait_until(
        "the idle clients parked before the takeover",
        Duration::from_secs(20),
        || parked() >= 20,
    );
    let new = take_over(&old, &toml);
    rt.block_on(async {
        // `a` moved at once (it was idle); the old process waits for `b`.
        wait_for_app_client(&new, "the idle client moved").await;
        let show = |q: &'static str| {
            let a = &a;
            async move {
                a.simple_query(q)
                    .await
                    .map(harness::rows)
                    .map(|r| r[0].values().next().cloned().unwrap_or_default())
                    .unwrap()
            }
        };
        assert_eq!(show("show statement_timeout").await, "7s");
        assert_eq!(show("select current_setting('my.var')").await, "kept");
        assert_eq!(
            a.query_one(&stmt, &[&41i32])
                .await
                .unwrap()
                .get::<_, i32>(0),
            42
        );
        // The NOTICE of the move, then notifications as before.
        let notice = tokio::time::timeout(Duration::from_secs(10), heard.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(
            notice.starts_with("notice tidepool was upgraded"),
            "{notice}"
        );
        let c = harness::connect(&url).await.unwrap();
        c.batch_execute("notify jobs, 'after the move'")
            .await
            .unwrap();
        let n = tokio::time::timeout(Duration::from_secs(10), heard.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, "notification jobs after the move");
        // The cancel key it was given at login still works.
        assert_canceled(&a, "a's sleep").await;
        // `b`, still on the old process inside its transaction: its cancel
        // request reaches the new process, which passes it on.
        b.batch_execute("savepoint s").await.unwrap();
        assert_canceled(&b, "b's sleep").await;
        // `b` commits on the old process, then moves.
        b.batch_execute("rollback to savepoint s; insert into t values (2); commit")
            .await
            .unwrap();
        assert_eq!(
            show("select count(*) from t").await,
            "2",
            "both rows of b's transaction are there"
        );
        b.batch_execute("insert into t values (3)").await.unwrap();
    });
    let status = old
        .wait_exit(Duration::from_secs(15))
        .expect("the old process exits once b moved, before its 30 s shutdown_timeout");
    assert!(status.success(), "{}", old.log());
    rt.block_on(async {
        let n: i64 = b
            .query_one("select count(*) from t", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 3);
    });
    // The clients parked on the old process serve here now.
    rt.block_on(async {
        for c in &idle {
            c.batch_execute("select 1").await.unwrap();
        }
        // The row shape `a` was told moved too: a migration that changes
        // it gets PostgreSQL's answer (0A000), not rows of another shape.
        b.batch_execute("alter table t add column extra int")
            .await
            .unwrap();
        let e = a.query(&rows_of_t, &[]).await.unwrap_err();
        assert_eq!(
            e.code(),
            Some(&tokio_postgres::error::SqlState::FEATURE_NOT_SUPPORTED),
            "{e:?}"
        );
    });
    let _ = std::fs::remove_file(&socket);
}

/// A client whose session cannot be sent (a prepared statement of 17 MB,
/// over the 16 MiB a record may take) stays on the old process and is
/// served there as before, while the others move; the old process exits
/// once it leaves.
#[test]
fn a_client_that_cannot_move_stays_and_is_served() {
    let Upgradable {
        db: _,
        socket,
        toml,
        mut old,
        url,
    } = upgradable("upgrade_stays", "60s");
    let rt = rt();
    let (big, small) = rt.block_on(async {
        let big = harness::connect(&url).await.unwrap();
        let text = format!("prepare big as select 1 /* {} */", "x".repeat(17 << 20));
        big.batch_execute(&text).await.unwrap();
        let small = harness::connect(&url).await.unwrap();
        small.batch_execute("select 1").await.unwrap();
        (big, small)
    });
    let new = take_over(&old, &toml);
    rt.block_on(async {
        wait_for_app_client(&new, "the small client moved").await;
        small.batch_execute("select 1").await.unwrap();
        // The big one is still served, request after request.
        for i in 0..5 {
            let r = tokio::time::timeout(Duration::from_secs(5), big.simple_query("select 2"))
                .await
                .unwrap_or_else(|_| panic!("request {i} of the client that stays got no answer"));
            r.unwrap();
        }
    });
    // Tried once, not again each time it parks and wakes.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        old.log()
            .matches("could not move client to the new process; it stays here")
            .count(),
        1,
        "{}",
        old.log()
    );
    assert!(
        old.wait_exit(Duration::from_millis(500)).is_none(),
        "the old process waits for it"
    );
    drop(big);
    let status = old
        .wait_exit(Duration::from_secs(15))
        .expect("the old process exits once its last client left");
    assert!(status.success(), "{}", old.log());
    let _ = std::fs::remove_file(&socket);
}

/// A PAUSE holds its clients through a takeover: the move's nudge does not
/// let a paused request run; RESUME (on the old process's console) does,
/// and the client then moves.
#[test]
fn pause_holds_through_a_takeover() {
    let Upgradable {
        db,
        socket,
        toml,
        mut old,
        url,
    } = upgradable("upgrade_pause", "60s");
    let admin_url = old.url("admin", "adminpw", "pgbouncer");
    let rt = rt();
    rt.block_on(async {
        let admin = harness::connect(&admin_url).await.unwrap();
        let c = harness::connect(&url).await.unwrap();
        c.batch_execute("select 1").await.unwrap();
        admin.batch_execute(&format!("PAUSE {db}")).await.unwrap();
        let held = tokio::spawn(async move {
            c.batch_execute("select 2").await.unwrap();
            c
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let _new = tokio::task::spawn_blocking({
            let toml = toml.clone();
            let port = old.port;
            move || Daemon::start_with(&toml, port, &["--takeover"])
        })
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(
            !held.is_finished(),
            "a paused request ran during the takeover"
        );
        admin.batch_execute(&format!("RESUME {db}")).await.unwrap();
        let c = tokio::time::timeout(Duration::from_secs(10), held)
            .await
            .expect("RESUME lets it run")
            .unwrap();
        drop(admin);
        c.batch_execute("select 3").await.unwrap();
        drop(_new);
    });
    let _ = old.wait_exit(Duration::from_secs(15));
    let _ = std::fs::remove_file(&socket);
}

/// `SHUTDOWN WAIT_FOR_CLIENTS`: no new clients; the connected one keeps
/// working, and the process exits when it leaves.
#[test]
fn shutdown_wait_for_clients_waits_for_the_last_client() {
    let db = cluster().create_database("wait_for_clients");
    let mut d = Daemon::start(&config(&db, 4, ""));
    let url = d.url(harness::APP_USER, harness::APP_PASSWORD, &db);
    let rt = rt();
    let client = rt.block_on(harness::connect(&url)).unwrap();
    rt.block_on(client.simple_query("select 1")).unwrap();
    // Asked from a console session that stays connected: consoles are not
    // waited for.
    let admin = rt
        .block_on(harness::connect(&d.url("admin", "adminpw", "pgbouncer")))
        .unwrap();
    rt.block_on(admin.simple_query("SHUTDOWN WAIT_FOR_CLIENTS"))
        .unwrap();
    harness::wait_until("no new clients", Duration::from_secs(10), || {
        rt.block_on(harness::connect(&url)).is_err()
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(d.is_running(), "it waits for the client");
    rt.block_on(client.simple_query("select 2")).unwrap();
    drop(client);
    let status = d
        .wait_exit(Duration::from_secs(20))
        .expect("exits once the client left, the console session still open");
    assert!(status.success());
    drop(admin);
}

/// PgBouncer's signals: SIGUSR1 pauses every database (a running
/// transaction finishes, new ones wait), SIGUSR2 resumes; the process and
/// its clients live on (a default SIGUSR1 would end the process). A PAUSE of
/// the whole pooler holds a database that a reload adds meanwhile too.
#[test]
fn sigusr1_pauses_and_sigusr2_resumes_the_whole_pooler() {
    let c = cluster();
    let db = c.create_database("sigusr");
    let added = c.create_database("sigusr_added");
    let d = Daemon::start(&config(&db, 4, ""));
    let app = |name: &str| d.url(harness::APP_USER, harness::APP_PASSWORD, name);
    let rt = rt();
    let open = rt.block_on(harness::connect(&app(&db))).unwrap();
    rt.block_on(open.batch_execute("begin; select 1")).unwrap();
    d.signal(libc::SIGUSR1);
    harness::wait_until("SIGUSR1 in the log", Duration::from_secs(10), || {
        d.log().contains("SIGUSR1")
    });
    // The open transaction goes on and ends; a new one waits.
    rt.block_on(open.batch_execute("select 2; commit")).unwrap();
    let late = rt.block_on(harness::connect(&app(&db))).unwrap();
    let held = rt.spawn(async move { late.batch_execute("select 3").await.map(|_| late) });
    // A database added by a reload while paused is paused too.
    let extra = format!(
        "[databases.{added}]\nhost = \"127.0.0.1\"\nport = {}\n",
        c.primary_port()
    );
    d.write_config(&config(&db, 4, &extra));
    console(&d, "RELOAD").unwrap();
    let newcomer = rt.block_on(harness::connect(&app(&added))).unwrap();
    let held_new = rt.spawn(async move { newcomer.batch_execute("select 4").await.is_ok() });
    std::thread::sleep(Duration::from_millis(500));
    assert!(!held.is_finished(), "a query ran while paused by SIGUSR1");
    assert!(
        !held_new.is_finished(),
        "a database added while the pooler was paused served a query"
    );
    let state = console(&d, "SHOW STATE").unwrap();
    let paused = state.iter().find(|r| r["key"] == "paused").unwrap();
    assert_eq!(paused["value"], "yes", "{state:?}");
    d.signal(libc::SIGUSR2);
    rt.block_on(async {
        let late = tokio::time::timeout(Duration::from_secs(10), held)
            .await
            .expect("SIGUSR2 lets the held query run")
            .unwrap()
            .unwrap();
        late.batch_execute("select 5").await.unwrap();
        assert!(
            tokio::time::timeout(Duration::from_secs(10), held_new)
                .await
                .expect("and the added database's")
                .unwrap()
        );
        open.batch_execute("select 6").await.unwrap();
    });
    assert!(d.log().contains("SIGUSR2"), "{}", d.log());
}

/// A database a reload removes refuses new clients while the connected ones
/// keep their pool and its servers: their transactions reuse them (each one
/// used to open a new server, a hundredfold slowdown), and the servers
/// close once the last of those clients has left.
#[test]
fn a_removed_database_serves_its_connected_clients_on_the_same_servers() {
    let c = cluster();
    let (kept, removed) = (c.create_database("kept"), c.create_database("removed"));
    let config = |with_removed: bool| {
        let mut toml = format!(
            "[tidepool]\nlisten = [\"127.0.0.1:{{port}}\"]\n[pool]\ndefault_pool_size = 2\n\
             [databases.{kept}]\nhost = \"127.0.0.1\"\nport = {port}\n\
             [users.app]\npassword = \"{pw}\"\n",
            port = c.primary_port(),
            pw = harness::APP_PASSWORD,
        );
        if with_removed {
            toml += &format!(
                "[databases.{removed}]\nhost = \"127.0.0.1\"\nport = {}\n",
                c.primary_port()
            );
        }
        toml
    };
    let d = Daemon::start(&config(true));
    let rt = rt();
    let url = d.url(harness::APP_USER, harness::APP_PASSWORD, &removed);
    let client = rt.block_on(harness::connect(&url)).unwrap();
    let pid = |client: &tokio_postgres::Client| {
        rt.block_on(harness::first_value(client, "select pg_backend_pid()"))
    };
    let before = pid(&client);
    d.write_config(&config(false).replace("{port}", &d.port.to_string()));
    d.signal(libc::SIGHUP);
    harness::wait_until("the reload", Duration::from_secs(10), || {
        d.log().contains("config reloaded")
    });
    for _ in 0..5 {
        assert_eq!(pid(&client), before, "the same server, kept");
    }
    assert!(
        rt.block_on(harness::connect(&url)).is_err(),
        "new clients are refused"
    );
    drop(client);
    let admin = rt.block_on(c.admin_client("postgres"));
    harness::wait_until(
        "its server closed after its last client",
        Duration::from_secs(10),
        || {
            let n: i64 = rt
                .block_on(admin.query_one(
                    "select count(*) from pg_stat_activity where pid = $1::text::int",
                    &[&before],
                ))
                .unwrap()
                .get(0);
            n == 0
        },
    );
}

/// A reload that changes a health-check setting (here `max_replica_lag`)
/// restarts the checker but keeps the replicas it already found healthy in
/// use: reads went to the primary (or failed, with `replica_fallback =
/// "error"`) until the new checker had checked them twice.
#[test]
fn a_reload_of_health_settings_keeps_healthy_replicas_in_use() {
    let c = harness::cluster_with_replica();
    let db = c.create_database("health_reload");
    c.wait_for_replicas();
    let config = |lag: &str| {
        format!(
            "[tidepool]\nlisten = [\"127.0.0.1:{{port}}\"]\nadmin_users = [\"admin\"]\n\
             [pool]\ndefault_pool_size = 2\n\
             [routing]\nhealth_check_period = \"2s\"\nmax_replica_lag = \"{lag}\"\n\
             [databases.{db}]\nhost = \"127.0.0.1\"\nport = {}\n\
             replicas = [{{ host = \"127.0.0.1\", port = {} }}]\n\
             health_user = \"{app}\"\nhealth_password = \"{pw}\"\n\
             [users.app]\npassword = \"{pw}\"\n[users.admin]\npassword = \"adminpw\"\n",
            c.primary_port(),
            c.replica_ports()[0],
            app = harness::APP_USER,
            pw = harness::APP_PASSWORD,
        )
    };
    let d = Daemon::start(&config("10s"));
    let rt = rt();
    let client = rt
        .block_on(harness::connect(&d.url(
            harness::APP_USER,
            harness::APP_PASSWORD,
            &db,
        )))
        .unwrap();
    let on_replica = || {
        rt.block_on(harness::first_value(
            &client,
            "select pg_is_in_recovery()::text",
        )) == "true"
    };
    harness::wait_until("reads on the replica", Duration::from_secs(30), &on_replica);
    d.write_config(&config("11s").replace("{port}", &d.port.to_string()));
    d.signal(libc::SIGHUP);
    harness::wait_until("the reload", Duration::from_secs(10), || {
        d.log().contains("config reloaded")
    });
    // The new checker has not checked twice yet (2 s apart): the replica
    // is in use all the same.
    assert!(on_replica(), "reads stay on the replica across the reload");
    let rows = console(&d, "SHOW REPLICAS").unwrap();
    assert!(
        rows.iter()
            .any(|r| r["backend_role"] == "replica" && r["healthy"] == "1"),
        "{rows:?}"
    );
}

/// A moved client's statement that runs one of its SQL-prepared statements
/// (psycopg 3 prepares `EXECUTE p` so after five runs, as tokio-postgres
/// does here) still runs in the new process, whose servers have neither:
/// the link to the SQL-prepared one was not moved, so it was never
/// prepared first and every run failed (0A000, or 26000 under load).
#[test]
fn a_moved_client_keeps_a_statement_that_executes_its_sql_prepared_one() {
    let Upgradable {
        db: _,
        socket,
        toml,
        old,
        url,
    } = upgradable("upgrade_execute", "30s");
    let rt = rt();
    let (client, stmt) = rt.block_on(async {
        let client = harness::connect(&url).await.unwrap();
        client
            .batch_execute("PREPARE ps_a AS SELECT 'A'::text AS x, 1 AS y")
            .await
            .unwrap();
        let stmt = client.prepare("EXECUTE ps_a").await.unwrap();
        let row = client.query_one(&stmt, &[]).await.unwrap();
        assert_eq!(row.get::<_, String>(0), "A");
        (client, stmt)
    });
    let new = take_over(&old, &toml);
    rt.block_on(async {
        wait_for_app_client(&new, "the client moved").await;
        let row = client
            .query_one(&stmt, &[])
            .await
            .expect("the statement runs in the new process");
        assert_eq!(row.get::<_, String>(0), "A");
        assert_eq!(row.get::<_, i32>(1), 1);
    });
    drop(new);
    let _ = std::fs::remove_file(&socket);
}
