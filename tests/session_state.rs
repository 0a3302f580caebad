//! Session state in transaction mode: SET/RESET parameters follow their
//! client from server to server and never leak to other clients; session
//! features (LISTEN, advisory locks, temp tables, WITH HOLD cursors) pin a
//! client to its server, or are refused with `session_features = "error"`;
//! named prepared statements outlive transactions and servers.
//!
//! Most tests run on a pool of 2 servers. Where a test must be sure a client
//! moves to a server it has not used, two "holder" clients each open a
//! transaction (taking both servers) and the one holding the other server
//! lets go, so the client's next query can only run there.
//!
//! Set `TIDEPOOL_TEST_DIRECT=1` to run the same checks against PostgreSQL
//! itself (server-switching and tidepool-only checks are skipped): that tells
//! a wrong expectation from a proxy bug.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::time::Duration;

use harness::{TestProxy, cluster};
use tokio_postgres::types::Type;
use tokio_postgres::{AsyncMessage, Client, Notification, SimpleQueryMessage};

/// Deadline for anything a test waits for (notifications, tasks).
const WAIT: Duration = Duration::from_secs(60);

fn direct() -> bool {
    std::env::var("TIDEPOOL_TEST_DIRECT").is_ok_and(|v| v == "1")
}

/// Where the test's clients connect: tidepool, or the primary itself.
struct Target {
    proxy: Option<TestProxy>,
    url: String,
}

impl Target {
    fn new(c: &harness::Cluster, db: &str, pool_extra: &str) -> Target {
        Self::with_db_extra(c, db, pool_extra, "")
    }

    fn with_db_extra(c: &harness::Cluster, db: &str, pool_extra: &str, db_extra: &str) -> Target {
        if direct() {
            return Target {
                proxy: None,
                url: c.app_url(db),
            };
        }
        let toml = harness::proxy::config_toml(c, db, pool_extra, db_extra);
        let proxy = TestProxy::start(&toml);
        let url = proxy.url(db);
        Target {
            proxy: Some(proxy),
            url,
        }
    }

    fn is_proxy(&self) -> bool {
        self.proxy.is_some()
    }

    async fn client(&self) -> Client {
        harness::connect(&self.url)
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.url))
    }

    async fn client_with(&self, query_params: &str) -> Client {
        let url = format!("{}?{query_params}", self.url);
        harness::connect(&url)
            .await
            .unwrap_or_else(|e| panic!("connect to {url}: {e}"))
    }
}

/// Pool of two servers; enough client slots for the crowd tests; waiting for
/// a server fails (rather than hangs) if a test deadlocks the pool.
const POOL2: &str = "default_pool_size = 2\nmax_client_conn = 400\nquery_wait_timeout = \"20s\"";

/// An error with its SQLSTATE and server message, if it has them.
fn explain(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!(
            "{e}: {} {} (detail: {:?})",
            d.code().code(),
            d.message(),
            d.detail()
        ),
        None => format!("{e:?}"),
    }
}

/// First column of every row of a simple query.
async fn simple_col(client: &Client, sql: &str) -> Vec<Option<String>> {
    client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {}", explain(&e)))
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r.get(0).map(str::to_owned)),
            _ => None,
        })
        .collect()
}

async fn simple_one(client: &Client, sql: &str) -> String {
    let rows = simple_col(client, sql).await;
    assert_eq!(rows.len(), 1, "{sql}: {rows:?}");
    rows[0].clone().unwrap_or_default()
}

async fn pid(client: &Client) -> i32 {
    simple_one(client, "select pg_backend_pid()")
        .await
        .parse()
        .unwrap()
}

const PARAMS: [&str; 4] = [
    "application_name",
    "TimeZone",
    "search_path",
    "statement_timeout",
];

/// The four tracked parameters via `SHOW` (simple protocol).
async fn shown(client: &Client) -> Vec<String> {
    let mut out = Vec::new();
    for p in PARAMS {
        out.push(simple_one(client, &format!("show {p}")).await);
    }
    out
}

/// The four tracked parameters via `current_setting` (extended protocol,
/// unnamed statement), in one query.
async fn current(client: &Client) -> Vec<String> {
    let row = client
        .query_typed(
            "select current_setting('application_name'), current_setting('TimeZone'), \
             current_setting('search_path'), current_setting('statement_timeout')",
            &[],
        )
        .await
        .expect("current_setting");
    (0..4).map(|i| row[0].get::<_, String>(i)).collect()
}

/// Both views agree and equal `want`.
async fn assert_settings(client: &Client, want: &[String], what: &str) {
    assert_eq!(shown(client).await, want, "{what} (SHOW)");
    assert_eq!(current(client).await, want, "{what} (current_setting)");
}

/// Two clients that can take both servers of a pool of two, to force a third
/// client onto the server it did not use last.
struct Holders {
    a: Client,
    b: Client,
}

impl Holders {
    async fn new(t: &Target) -> Holders {
        Holders {
            a: t.client().await,
            b: t.client().await,
        }
    }

    /// Leaves the server with backend `pid` free and keeps the other one in
    /// an open transaction; returns the holder to `release` afterwards.
    async fn occupy_all_but(&self, pid: i32) -> &Client {
        self.a.batch_execute("begin").await.unwrap();
        let pa = self::pid(&self.a).await;
        self.b.batch_execute("begin").await.unwrap();
        let pb = self::pid(&self.b).await;
        assert_ne!(pa, pb, "two open transactions share a server");
        let (keep, free) = if pa == pid {
            (&self.b, &self.a)
        } else {
            assert_eq!(pb, pid, "backend {pid} is neither of the two servers");
            (&self.a, &self.b)
        };
        free.batch_execute("commit").await.unwrap();
        keep
    }

    /// Keeps the server with backend `pid` busy (so the next query of
    /// another client runs on the other server); returns the holder.
    async fn occupy(&self, pid: i32) -> &Client {
        self.a.batch_execute("begin").await.unwrap();
        let pa = self::pid(&self.a).await;
        self.b.batch_execute("begin").await.unwrap();
        let pb = self::pid(&self.b).await;
        assert_ne!(pa, pb, "two open transactions share a server");
        let (keep, free) = if pa == pid {
            (&self.a, &self.b)
        } else {
            assert_eq!(pb, pid, "backend {pid} is neither of the two servers");
            (&self.b, &self.a)
        };
        free.batch_execute("commit").await.unwrap();
        keep
    }
}

async fn release(holder: &Client) {
    holder.batch_execute("commit").await.unwrap();
}

fn db_error_code(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.code().code().to_owned())
        .unwrap_or_else(|| panic!("not a server error: {e}"))
}

// --- SET / RESET --------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_parameters_follow_their_client_and_never_leak() {
    let c = cluster();
    let db = c.create_database("setparams");
    let owner = harness::connect(&c.app_url(&db)).await.unwrap();
    owner
        .batch_execute(
            "create schema myschema; create table myschema.only_here(v int); \
             insert into myschema.only_here values (42)",
        )
        .await
        .unwrap();
    let t = Target::new(c, &db, POOL2);

    let defaults = shown(&t.client().await).await;
    let x_values: Vec<String> = ["x", "Asia/Tokyo", "myschema, public", "1234ms"]
        .map(str::to_owned)
        .to_vec();
    let y_values: Vec<String> = ["y", "America/New_York", "public", "4321ms"]
        .map(str::to_owned)
        .to_vec();
    for (d, v) in defaults.iter().zip(&x_values) {
        assert_ne!(
            d, v,
            "defaults {defaults:?} must differ from the test values"
        );
    }

    let x = t.client().await;
    x.batch_execute("SET application_name = 'x'").await.unwrap();
    x.batch_execute("SET TimeZone = 'Asia/Tokyo'")
        .await
        .unwrap();
    x.batch_execute("SET search_path = myschema, public")
        .await
        .unwrap();
    x.batch_execute("SET statement_timeout = '1234ms'")
        .await
        .unwrap();
    assert_settings(&x, &x_values, "x right after SET").await;
    // The search_path really applies, not just its display.
    assert_eq!(simple_one(&x, "select v from only_here").await, "42");

    // A second client with other values, set in one multi-statement query.
    let y = t.client().await;
    y.batch_execute(
        "set application_name to 'y'; set time zone 'America/New_York'; \
         set search_path to public; set statement_timeout to 4321",
    )
    .await
    .unwrap();
    assert_settings(&y, &y_values, "y right after SET").await;

    // Deterministically move x (and y) to the server it did not use last.
    if t.is_proxy() {
        let holders = Holders::new(&t).await;
        let mut last = pid(&x).await;
        for round in 0..4 {
            let holder = holders.occupy(last).await;
            let now = pid(&x).await;
            assert_ne!(now, last, "round {round}: x should run on the other server");
            assert_settings(
                &x,
                &x_values,
                &format!("x on another server, round {round}"),
            )
            .await;
            assert_eq!(simple_one(&x, "select v from only_here").await, "42");
            // y runs on the same server as x just did.
            assert_settings(&y, &y_values, &format!("y, round {round}")).await;
            release(holder).await;
            last = pid(&x).await;
        }
    }

    // x and y keep their values in many transactions, interleaved with 100
    // other clients that must only ever see the defaults.
    let mut others = Vec::new();
    for i in 0..100 {
        let client = t.client().await;
        let defaults = defaults.clone();
        others.push(tokio::spawn(async move {
            for round in 0..3 {
                let what = format!("other client {i}, round {round}");
                assert_eq!(shown(&client).await, defaults, "{what} (SHOW)");
                client.batch_execute("begin").await.unwrap();
                assert_eq!(current(&client).await, defaults, "{what} (in transaction)");
                client.batch_execute("commit").await.unwrap();
                let err = client
                    .simple_query("select v from only_here")
                    .await
                    .expect_err("only_here is not on the default search_path");
                assert_eq!(db_error_code(&err), "42P01", "{what}");
            }
        }));
    }
    for (name, client, values) in [("x", &x, &x_values), ("y", &y, &y_values)] {
        for round in 0..40 {
            let what = format!("{name}, transaction {round}");
            if round % 2 == 0 {
                client.batch_execute("begin").await.unwrap();
                assert_settings(client, values, &what).await;
                client.batch_execute("commit").await.unwrap();
            } else {
                assert_settings(client, values, &what).await;
            }
            tokio::task::yield_now().await;
        }
    }
    for o in others {
        tokio::time::timeout(WAIT, o)
            .await
            .expect("other clients finish")
            .expect("other client saw only defaults");
    }
    assert_settings(&x, &x_values, "x at the end").await;
    assert_settings(&y, &y_values, "y at the end").await;
    // And a newcomer still sees the defaults.
    assert_settings(&t.client().await, &defaults, "a new client").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_local_and_undone_set_do_not_persist() {
    let c = cluster();
    let db = c.create_database("setlocal");
    let t = Target::new(c, &db, POOL2);
    let a = t.client().await;
    let other = t.client().await;
    let default_tz = simple_one(&a, "show TimeZone").await;
    assert_ne!(default_tz, "Asia/Tokyo");

    a.batch_execute("set statement_timeout = '1111ms'")
        .await
        .unwrap();

    // SET LOCAL lasts until the end of its transaction.
    a.batch_execute("begin").await.unwrap();
    a.batch_execute("set local statement_timeout = '2222ms'")
        .await
        .unwrap();
    a.batch_execute("set local TimeZone = 'Asia/Tokyo'")
        .await
        .unwrap();
    assert_eq!(simple_one(&a, "show statement_timeout").await, "2222ms");
    assert_eq!(simple_one(&a, "show TimeZone").await, "Asia/Tokyo");
    a.batch_execute("commit").await.unwrap();
    for _ in 0..5 {
        simple_one(&other, "select 1").await;
        assert_eq!(simple_one(&a, "show statement_timeout").await, "1111ms");
        assert_eq!(simple_one(&a, "show TimeZone").await, default_tz);
    }

    // SET LOCAL in the same simple-query string as BEGIN/COMMIT.
    let rows = simple_col(
        &a,
        "begin; set local statement_timeout = '3333ms'; show statement_timeout; commit",
    )
    .await;
    assert_eq!(rows, [Some("3333ms".to_owned())]);
    assert_eq!(simple_one(&a, "show statement_timeout").await, "1111ms");

    // A plain SET in a transaction that is rolled back is undone...
    a.batch_execute("begin; set statement_timeout = '4444ms'")
        .await
        .unwrap();
    assert_eq!(simple_one(&a, "show statement_timeout").await, "4444ms");
    a.batch_execute("rollback").await.unwrap();
    for _ in 0..5 {
        simple_one(&other, "select 1").await;
        assert_eq!(simple_one(&a, "show statement_timeout").await, "1111ms");
    }

    // ...also when the transaction failed...
    a.batch_execute("begin; set statement_timeout = '5555ms'")
        .await
        .unwrap();
    let err = a.batch_execute("select 1/0").await.expect_err("division");
    assert_eq!(db_error_code(&err), "22012");
    a.batch_execute("rollback").await.unwrap();
    assert_eq!(simple_one(&a, "show statement_timeout").await, "1111ms");

    // ...while one in a committed transaction persists.
    a.batch_execute("begin; set statement_timeout = '6666ms'; commit")
        .await
        .unwrap();
    for _ in 0..5 {
        simple_one(&other, "select 1").await;
        assert_eq!(simple_one(&a, "show statement_timeout").await, "6666ms");
    }
    assert_ne!(
        simple_one(&other, "show statement_timeout").await,
        "6666ms",
        "another client sees a's value"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_rolled_back_to_a_savepoint_is_undone() {
    let c = cluster();
    let db = c.create_database("setsavepoint");
    let t = Target::new(c, &db, POOL2);
    let a = t.client().await;
    a.batch_execute(
        "begin; set statement_timeout = '1111ms'; savepoint s1; \
         set statement_timeout = '2222ms'; rollback to savepoint s1; commit",
    )
    .await
    .unwrap();
    assert_eq!(simple_one(&a, "show statement_timeout").await, "1111ms");
    a.batch_execute(
        "begin; savepoint s1; set TimeZone = 'Asia/Tokyo'; release savepoint s1; commit",
    )
    .await
    .unwrap();
    assert_eq!(simple_one(&a, "show TimeZone").await, "Asia/Tokyo");
    if t.is_proxy() {
        let holders = Holders::new(&t).await;
        let last = pid(&a).await;
        let holder = holders.occupy(last).await;
        assert_ne!(pid(&a).await, last);
        assert_eq!(simple_one(&a, "show statement_timeout").await, "1111ms");
        assert_eq!(simple_one(&a, "show TimeZone").await, "Asia/Tokyo");
        release(holder).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_all_and_discard_all_restore_the_clients_defaults() {
    let c = cluster();
    let db = c.create_database("resetall");
    let t = Target::new(c, &db, POOL2);
    // The server defaults, seen by a plain client.
    let plain = shown(&t.client().await).await;
    // This client's own defaults include its startup parameters.
    let a = t
        .client_with("application_name=startapp&options=-c%20statement_timeout%3D5s")
        .await;
    let a_defaults = vec![
        "startapp".to_owned(),
        plain[1].clone(),
        plain[2].clone(),
        "5s".to_owned(),
    ];
    assert_settings(&a, &a_defaults, "a's startup values").await;
    let changed: Vec<String> = ["changed", "Asia/Tokyo", "myschema, public", "1234ms"]
        .map(str::to_owned)
        .to_vec();
    let set_all = "set application_name = 'changed'; set TimeZone = 'Asia/Tokyo'; \
                   set search_path = myschema, public; set statement_timeout = '1234ms'";
    let holders = if t.is_proxy() {
        Some(Holders::new(&t).await)
    } else {
        None
    };
    // Checks `want` on a's current server and then on the other one.
    let check_both_servers = async |want: &[String], what: &str| {
        assert_settings(&a, want, what).await;
        if let Some(h) = &holders {
            let last = pid(&a).await;
            let holder = h.occupy(last).await;
            assert_ne!(pid(&a).await, last, "{what}: a moved to the other server");
            assert_settings(&a, want, &format!("{what}, other server")).await;
            release(holder).await;
        }
    };

    for reset in ["RESET ALL", "DISCARD ALL"] {
        a.batch_execute(set_all).await.unwrap();
        check_both_servers(&changed, &format!("before {reset}")).await;
        a.batch_execute(reset).await.unwrap();
        check_both_servers(&a_defaults, &format!("after {reset}")).await;
    }

    // Single parameters.
    a.batch_execute(set_all).await.unwrap();
    a.batch_execute("RESET TimeZone").await.unwrap();
    a.batch_execute("SET statement_timeout TO DEFAULT")
        .await
        .unwrap();
    let want = vec![
        "changed".to_owned(),
        plain[1].clone(),
        "myschema, public".to_owned(),
        "5s".to_owned(),
    ];
    check_both_servers(&want, "after RESET TimeZone / SET ... TO DEFAULT").await;
    a.batch_execute("reset application_name; reset search_path")
        .await
        .unwrap();
    check_both_servers(&a_defaults, "after resetting the rest").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discard_all_and_deallocate_all_drop_the_clients_prepared_statements() {
    let c = cluster();
    let db = c.create_database("discardstmt");
    let t = Target::new(c, &db, POOL2);
    let other = t.client().await;
    let other_stmt = other.prepare("select $1::int * 3").await.unwrap();
    for reset in ["DISCARD ALL", "DEALLOCATE ALL"] {
        let a = t.client().await;
        let stmt = a.prepare("select $1::int + 1").await.unwrap();
        let v: i32 = a.query_one(&stmt, &[&41]).await.unwrap().get(0);
        assert_eq!(v, 42);
        a.batch_execute(reset).await.unwrap();
        let err = a
            .query_one(&stmt, &[&41])
            .await
            .expect_err("the statement is gone");
        assert_eq!(db_error_code(&err), "26000", "{reset}: {err}");
        // a goes on; the other client's statement is untouched.
        let stmt = a.prepare("select $1::int + 1").await.unwrap();
        let v: i32 = a.query_one(&stmt, &[&1]).await.unwrap().get(0);
        assert_eq!(v, 2);
        let v: i32 = other.query_one(&other_stmt, &[&5]).await.unwrap().get(0);
        assert_eq!(v, 15, "{reset} by another client");
    }
}

// --- session features ------------------------------------------------------------

/// Drives a connection made with `tokio_postgres::connect`, forwarding its
/// notifications.
async fn listening_client(
    url: &str,
) -> (Client, tokio::sync::mpsc::UnboundedReceiver<Notification>) {
    let (client, mut connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("listener connects");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    let _ = tx.send(n);
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    eprintln!("listener connection failed: {e}");
                    break;
                }
                None => break,
            }
        }
    });
    (client, rx)
}

async fn next_notification(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<Notification>,
    what: &str,
) -> Notification {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .unwrap_or_else(|_| panic!("no notification within {WAIT:?}: {what}"))
        .unwrap_or_else(|| panic!("listener connection ended: {what}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_pins_the_client_and_receives_notifications() {
    // listen_mode = "pin" (the shared default is tests/listen.rs').
    let c = cluster();
    let db = c.create_database("listen");
    let t = Target::new(c, &db, &format!("{POOL2}\nlisten_mode = \"pin\""));
    let (listener, mut rx) = listening_client(&t.url).await;
    listener.batch_execute("LISTEN chan").await.unwrap();
    let listener_pid = pid(&listener).await;

    let notifier = t.client().await;
    notifier
        .batch_execute("NOTIFY chan, 'hello'")
        .await
        .unwrap();
    let n = next_notification(&mut rx, "NOTIFY chan, 'hello'").await;
    assert_eq!((n.channel(), n.payload()), ("chan", "hello"));

    // While the listener sits idle on its server, other clients share the
    // other one.
    let mut tasks = Vec::new();
    for i in 0..10 {
        let client = t.client().await;
        tasks.push(tokio::spawn(async move {
            for j in 0..5 {
                let v = simple_one(&client, &format!("select {i} * 100 + {j}")).await;
                assert_eq!(v, (i * 100 + j).to_string());
                if j == 2 {
                    client
                        .batch_execute(&format!(
                            "begin; select pg_notify('chan', 'from {i}'); commit"
                        ))
                        .await
                        .unwrap();
                }
            }
        }));
    }
    for task in tasks {
        tokio::time::timeout(WAIT, task)
            .await
            .expect("other clients finish")
            .expect("other client");
    }
    let mut payloads: Vec<String> = Vec::new();
    for _ in 0..10 {
        let n = next_notification(&mut rx, "pg_notify from the other clients").await;
        assert_eq!(n.channel(), "chan");
        payloads.push(n.payload().to_owned());
    }
    payloads.sort();
    let mut want: Vec<String> = (0..10).map(|i| format!("from {i}")).collect();
    want.sort();
    assert_eq!(payloads, want);

    // The listener keeps its server and keeps working.
    assert_eq!(pid(&listener).await, listener_pid, "LISTEN pins the client");
    listener.batch_execute("begin").await.unwrap();
    assert_eq!(pid(&listener).await, listener_pid);
    listener.batch_execute("commit").await.unwrap();
    notifier
        .batch_execute("NOTIFY chan, 'after'")
        .await
        .unwrap();
    let n = next_notification(&mut rx, "NOTIFY chan, 'after'").await;
    assert_eq!(n.payload(), "after");
    listener.batch_execute("UNLISTEN *").await.unwrap();
    assert_eq!(
        simple_one(&listener, "select 'still fine'").await,
        "still fine"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_features_error_mode_refuses_listen() {
    if direct() {
        return; // a tidepool setting
    }
    let c = cluster();
    let db = c.create_database("listenerr");
    // With listen_mode = "pin", LISTEN is a session feature (shared, it is
    // tidepool's own and refused by nothing).
    let t = Target::with_db_extra(
        c,
        &db,
        &format!("{POOL2}\nlisten_mode = \"pin\""),
        "session_features = \"error\"",
    );
    let client = t.client().await;
    let err = client
        .batch_execute("LISTEN chan")
        .await
        .expect_err("LISTEN is refused");
    let db_err = err.as_db_error().expect("an ErrorResponse");
    assert_eq!(db_err.code().code(), "0A000", "{db_err:?}");
    assert!(db_err.message().contains("LISTEN"), "{}", db_err.message());
    // The client is still usable, and NOTIFY is not a session feature.
    assert_eq!(simple_one(&client, "select 1").await, "1");
    client.batch_execute("NOTIFY chan, 'x'").await.unwrap();
    let mut tx_client = t.client().await;
    let tx = tx_client.transaction().await.unwrap();
    tx.execute("select 2", &[]).await.unwrap();
    tx.commit().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_features_error_mode_refuses_session_locks_temp_tables_and_held_cursors() {
    if direct() {
        return;
    }
    let c = cluster();
    let db = c.create_database("featerr");
    let t = Target::with_db_extra(c, &db, POOL2, "session_features = \"error\"");
    let client = t.client().await;
    for sql in [
        "select pg_advisory_lock(7)",
        "create temp table tt(v int)",
        "declare cur cursor with hold for select 1",
    ] {
        let err = client.batch_execute(sql).await.expect_err(sql);
        assert_eq!(db_error_code(&err), "0A000", "{sql}: {err}");
        assert_eq!(simple_one(&client, "select 1").await, "1", "after {sql}");
    }
    // Transaction-scoped variants are fine.
    client
        .batch_execute("begin; select pg_advisory_xact_lock(7); commit")
        .await
        .unwrap();
    client
        .batch_execute(
            "begin; declare cur cursor for select g from generate_series(1, 3) g; \
             fetch all from cur; commit",
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temp_tables_advisory_locks_and_held_cursors_pin_their_client() {
    let c = cluster();
    let db = c.create_database("pinning");
    let t = Target::new(c, &db, POOL2);
    let a = t.client().await;
    let busy = |n: i32| {
        let url = t.url.clone();
        async move {
            let mut tasks = Vec::new();
            for i in 0..n {
                let url = url.clone();
                tasks.push(tokio::spawn(async move {
                    let client = harness::connect(&url).await.unwrap();
                    for j in 0..3 {
                        let v = simple_one(&client, &format!("select {i} + {j}")).await;
                        assert_eq!(v, (i + j).to_string());
                        let tt: Option<String> = client
                            .query_typed("select to_regclass('tt')::text", &[])
                            .await
                            .unwrap()[0]
                            .get(0);
                        assert_eq!(tt, None, "another client sees a's temp table");
                    }
                }));
            }
            for task in tasks {
                tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
            }
        }
    };

    // Temp table.
    a.batch_execute("create temp table tt(v int)")
        .await
        .unwrap();
    let a_pid = pid(&a).await;
    for i in 0..10 {
        a.batch_execute(&format!("begin; insert into tt values ({i}); commit"))
            .await
            .unwrap();
        busy(5).await;
        assert_eq!(pid(&a).await, a_pid, "a keeps its server");
    }
    assert_eq!(simple_one(&a, "select count(*) from tt").await, "10");

    // Session advisory lock. The probing clients may get pinned themselves
    // (they call advisory lock functions), so each is used once and dropped.
    assert_eq!(simple_one(&a, "select pg_advisory_lock(42)").await, "");
    busy(5).await;
    let probe = t.client().await;
    assert_eq!(
        simple_one(&probe, "select pg_try_advisory_lock(42)").await,
        "f",
        "another client gets a's advisory lock"
    );
    drop(probe);
    assert_eq!(simple_one(&a, "select pg_advisory_unlock(42)").await, "t");
    let probe = t.client().await;
    assert_eq!(
        simple_one(&probe, "select pg_try_advisory_lock(42)").await,
        "t"
    );
    assert_eq!(
        simple_one(&probe, "select pg_advisory_unlock(42)").await,
        "t"
    );
    drop(probe);

    // WITH HOLD cursor, fetched from in later transactions.
    a.batch_execute("declare cur cursor with hold for select g from generate_series(1, 9) g")
        .await
        .unwrap();
    let mut got = Vec::new();
    for _ in 0..3 {
        busy(3).await;
        let rows = simple_col(&a, "begin; fetch 3 from cur; commit").await;
        got.extend(rows.into_iter().map(Option::unwrap));
    }
    assert_eq!(got, ["1", "2", "3", "4", "5", "6", "7", "8", "9"]);
    assert_eq!(pid(&a).await, a_pid, "a keeps its server");
    a.batch_execute("close cur").await.unwrap();
}

// --- named prepared statements -----------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_outlive_transactions_for_20_clients_on_2_servers() {
    let c = cluster();
    let db = c.create_database("prepared");
    let owner = harness::connect(&c.app_url(&db)).await.unwrap();
    owner
        .batch_execute("create table items(client int, n int, v text, primary key (client, n))")
        .await
        .unwrap();
    let t = Target::new(c, &db, POOL2);
    const ROUNDS: i32 = 25;
    let mut tasks = Vec::new();
    for k in 0..20i32 {
        let mut client = t.client().await;
        tasks.push(tokio::spawn(async move {
            // Describe: parameter and column types come from the server.
            let sum = client
                .prepare("select $1::int + $2::int as total, $3::text as label")
                .await
                .unwrap();
            assert_eq!(sum.params(), &[Type::INT4, Type::INT4, Type::TEXT]);
            let cols: Vec<(&str, &Type)> = sum
                .columns()
                .iter()
                .map(|c| (c.name(), c.type_()))
                .collect();
            assert_eq!(cols, [("total", &Type::INT4), ("label", &Type::TEXT)]);
            let ins = client
                .prepare("insert into items(client, n, v) values ($1, $2, $3)")
                .await
                .unwrap();
            assert_eq!(ins.params(), &[Type::INT4, Type::INT4, Type::TEXT]);
            assert!(ins.columns().is_empty());
            let typed = client
                .prepare_typed("select $1 as big", &[Type::INT8])
                .await
                .unwrap();
            assert_eq!(typed.params(), &[Type::INT8]);
            assert_eq!(typed.columns()[0].type_(), &Type::INT8);
            let inferred = client.prepare("select $1 + 1 as next").await.unwrap();
            assert_eq!(inferred.params(), &[Type::INT4]);
            let count = client
                .prepare("select count(*) from items where client = $1")
                .await
                .unwrap();

            for r in 0..ROUNDS {
                let label = format!("k{k}r{r}");
                let row = client.query_one(&sum, &[&k, &r, &label]).await.unwrap();
                assert_eq!(row.get::<_, i32>(0), k + r);
                assert_eq!(row.get::<_, String>(1), label);

                let tx = client.transaction().await.unwrap();
                tx.execute(&ins, &[&k, &r, &label]).await.unwrap();
                let big: i64 = tx
                    .query_one(&typed, &[&(i64::from(k) << 40)])
                    .await
                    .unwrap()
                    .get(0);
                assert_eq!(big, i64::from(k) << 40);
                let n: i64 = tx.query_one(&count, &[&k]).await.unwrap().get(0);
                assert_eq!(n, i64::from(r) + 1);
                tx.commit().await.unwrap();

                if r % 5 == 0 {
                    // Rolled back: the row goes, the statement it prepared stays.
                    let tx = client.transaction().await.unwrap();
                    tx.execute(&ins, &[&k, &(1000 + r), &"gone"]).await.unwrap();
                    let late = tx.prepare("select $1::text || '!'").await.unwrap();
                    tx.rollback().await.unwrap();
                    let v: String = client.query_one(&late, &[&label]).await.unwrap().get(0);
                    assert_eq!(v, format!("{label}!"));
                }
                let next: i32 = client.query_one(&inferred, &[&r]).await.unwrap().get(0);
                assert_eq!(next, r + 1);
            }
            let n: i64 = client.query_one(&count, &[&k]).await.unwrap().get(0);
            assert_eq!(n, i64::from(ROUNDS));
        }));
    }
    for (k, task) in tasks.into_iter().enumerate() {
        tokio::time::timeout(WAIT * 2, task)
            .await
            .unwrap_or_else(|_| panic!("client {k} did not finish"))
            .unwrap_or_else(|e| panic!("client {k}: {e}"));
    }
    let n: i64 = owner
        .query_one("select count(*) from items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 20 * i64::from(ROUNDS));
    if let Some(p) = &t.proxy {
        assert!(p.server_count() <= 2, "servers: {}", p.server_count());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statement_runs_on_a_server_that_never_saw_it() {
    let c = cluster();
    let db = c.create_database("preparedmove");
    let t = Target::new(c, &db, POOL2);
    let a = t.client().await;
    let stmt = a
        .prepare("select $1::int * 2, pg_backend_pid()")
        .await
        .unwrap();
    let row = a.query_one(&stmt, &[&21]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
    if !t.is_proxy() {
        return;
    }
    let holders = Holders::new(&t).await;
    let mut last: i32 = row.get(1);
    for round in 0..4 {
        let holder = holders.occupy(last).await;
        let row = a.query_one(&stmt, &[&round]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), round * 2);
        let now: i32 = row.get(1);
        assert_ne!(now, last, "round {round}: a ran on the other server");
        release(holder).await;
        last = now;
    }
    // And in a transaction on the other server.
    let holder = holders.occupy_all_but(last).await;
    release(holder).await;
    let holder = holders.occupy(last).await;
    a.batch_execute("begin").await.unwrap();
    let row = a.query_one(&stmt, &[&50]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 100);
    assert_ne!(row.get::<_, i32>(1), last);
    a.batch_execute("commit").await.unwrap();
    release(holder).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parse_and_execution_errors_leave_the_client_usable() {
    let c = cluster();
    let db = c.create_database("parseerr");
    let t = Target::new(c, &db, POOL2);
    let mut a = t.client().await;
    let good = a.prepare("select $1::int + 1").await.unwrap();

    let err = a
        .prepare("select nonsense from")
        .await
        .expect_err("syntax error");
    assert_eq!(db_error_code(&err), "42601", "{err}");
    let err = a
        .prepare("select * from no_such_table")
        .await
        .expect_err("undefined table");
    assert_eq!(db_error_code(&err), "42P01", "{err}");
    let v: i32 = a.query_one(&good, &[&1]).await.unwrap().get(0);
    assert_eq!(v, 2);

    // A parse error inside a transaction aborts it; after ROLLBACK all is well.
    let tx = a.transaction().await.unwrap();
    let err = tx
        .prepare("select nonsense from")
        .await
        .expect_err("syntax error");
    assert_eq!(db_error_code(&err), "42601");
    let err = tx
        .query_one(&good, &[&1])
        .await
        .expect_err("aborted transaction");
    assert_eq!(db_error_code(&err), "25P02");
    tx.rollback().await.unwrap();
    let v: i32 = a.query_one(&good, &[&2]).await.unwrap().get(0);
    assert_eq!(v, 3);

    // An execution error does not lose the statement.
    let div = a.prepare("select 10 / $1::int").await.unwrap();
    let err = a
        .query_one(&div, &[&0])
        .await
        .expect_err("division by zero");
    assert_eq!(db_error_code(&err), "22012");
    let v: i32 = a.query_one(&div, &[&2]).await.unwrap().get(0);
    assert_eq!(v, 5);

    // Same checks after moving to the other server.
    if t.is_proxy() {
        let holders = Holders::new(&t).await;
        let last = pid(&a).await;
        let holder = holders.occupy(last).await;
        let err = a
            .prepare("select nonsense from")
            .await
            .expect_err("syntax error");
        assert_eq!(db_error_code(&err), "42601");
        let v: i32 = a.query_one(&div, &[&5]).await.unwrap().get(0);
        assert_eq!(v, 2);
        let v: i32 = a.query_one(&good, &[&9]).await.unwrap().get(0);
        assert_eq!(v, 10);
        release(holder).await;
    }
    let fresh = a.prepare("select 'fresh'::text").await.unwrap();
    let v: String = a.query_one(&fresh, &[]).await.unwrap().get(0);
    assert_eq!(v, "fresh");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_reused_after_many_other_statements() {
    let c = cluster();
    let db = c.create_database("manystmts");
    let t = Target::new(c, &db, POOL2);
    let a = t.client().await;
    let b = t.client().await;
    let first = a.prepare("select $1::int - 1, 'first'").await.unwrap();
    let row = a.query_one(&first, &[&10]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 9);

    // 300 more live statements, each used once; b interleaves its own.
    let mut kept = Vec::new();
    for i in 0..300i32 {
        let s = a
            .prepare(&format!("select $1::int + {i}, '{i}'"))
            .await
            .unwrap();
        let row = a.query_one(&s, &[&1]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), i + 1);
        kept.push(s);
        if i % 10 == 0 {
            let s = b.prepare(&format!("select {i}::int")).await.unwrap();
            let v: i32 = b.query_one(&s, &[]).await.unwrap().get(0);
            assert_eq!(v, i);
        }
    }
    let row = a.query_one(&first, &[&100]).await.unwrap();
    assert_eq!((row.get::<_, i32>(0), row.get::<_, &str>(1)), (99, "first"));
    // All of them again, newest first, in transactions of 50.
    for (chunk_no, chunk) in kept
        .iter()
        .enumerate()
        .rev()
        .collect::<Vec<_>>()
        .chunks(50)
        .enumerate()
    {
        a.batch_execute("begin").await.unwrap();
        for (i, s) in chunk {
            let row = a.query_one(*s, &[&2]).await.unwrap();
            assert_eq!(row.get::<_, i32>(0), *i as i32 + 2, "chunk {chunk_no}");
            assert_eq!(row.get::<_, String>(1), i.to_string());
        }
        a.batch_execute("commit").await.unwrap();
    }
    // 300 short-lived ones (prepared, used, closed), then the first again.
    drop(kept);
    for i in 0..300i32 {
        let s = a.prepare(&format!("select {i} * $1::int")).await.unwrap();
        let v: i32 = a.query_one(&s, &[&2]).await.unwrap().get(0);
        assert_eq!(v, i * 2);
    }
    let row = a.query_one(&first, &[&1]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 0);
}

// --- raw protocol: statement names are per client ---------------------------------------

/// Text of the first column of each DataRow.
fn data_rows(msgs: &[harness::raw::Msg]) -> Vec<String> {
    msgs.iter()
        .filter(|m| m.tag == b'D')
        .map(|m| {
            let b = &m.body;
            assert!(i16::from_be_bytes([b[0], b[1]]) >= 1, "{m:?}");
            let len = i32::from_be_bytes([b[2], b[3], b[4], b[5]]) as usize;
            String::from_utf8_lossy(&b[6..6 + len]).into_owned()
        })
        .collect()
}

fn tags(msgs: &[harness::raw::Msg]) -> String {
    msgs.iter().map(|m| m.tag as char).collect()
}

fn error_code(msgs: &[harness::raw::Msg]) -> Option<String> {
    msgs.iter().find(|m| m.tag == b'E').and_then(|m| m.code())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_statement_name_means_different_things_to_different_clients() {
    use harness::raw::{self, Raw};
    let c = cluster();
    let db = c.create_database("samename");
    let t = Target::new(c, &db, POOL2);
    let port = t.proxy.as_ref().map_or(c.primary_port(), TestProxy::port);
    let mut a = Raw::login_trust(port, &db).await;
    let mut b = Raw::login_trust(port, &db).await;

    // Parse + Bind + Execute + Sync in one go for a; Parse alone for b.
    let mut first = raw::parse("stmt", "select 'A:' || $1::text");
    first.extend(raw::bind("stmt", &["one"]));
    first.extend(raw::execute());
    first.extend(raw::sync());
    a.send(&first).await;
    let msgs = a.read_until_ready().await;
    assert_eq!(data_rows(&msgs), ["A:one"], "{msgs:?}");
    b.send(&[raw::parse("stmt", "select $1::int * 2"), raw::sync()].concat())
        .await;
    let msgs = b.read_until_ready().await;
    assert_eq!(tags(&msgs), "1Z", "{msgs:?}");

    // Describe statement: b's has one int4 parameter and one column.
    b.send(&[raw::describe_statement("stmt"), raw::sync()].concat())
        .await;
    let msgs = b.read_until_ready().await;
    assert_eq!(tags(&msgs), "tTZ", "{msgs:?}");
    let pd = &msgs[0].body;
    assert_eq!(
        &pd[..6],
        &[0u8, 1, 0, 0, 0, 23][..],
        "one int4 parameter: {pd:?}"
    );

    for i in 0..10 {
        a.send(
            &[
                raw::bind("stmt", &[i.to_string().as_str()]),
                raw::execute(),
                raw::sync(),
            ]
            .concat(),
        )
        .await;
        b.send(
            &[
                raw::bind("stmt", &[i.to_string().as_str()]),
                raw::execute(),
                raw::sync(),
            ]
            .concat(),
        )
        .await;
        let ma = a.read_until_ready().await;
        let mb = b.read_until_ready().await;
        assert_eq!(data_rows(&ma), [format!("A:{i}")], "{ma:?}");
        assert_eq!(data_rows(&mb), [(i * 2).to_string()], "{mb:?}");
    }

    // Parsing an existing name is an error (42P05) and changes nothing.
    a.send(&[raw::parse("stmt", "select 'other'"), raw::sync()].concat())
        .await;
    let msgs = a.read_until_ready().await;
    assert_eq!(error_code(&msgs).as_deref(), Some("42P05"), "{msgs:?}");
    a.send(&[raw::bind("stmt", &["x"]), raw::execute(), raw::sync()].concat())
        .await;
    assert_eq!(data_rows(&a.read_until_ready().await), ["A:x"]);

    // Close on a: gone for a (26000), still there for b.
    a.send(&[raw::close_statement("stmt"), raw::sync()].concat())
        .await;
    let msgs = a.read_until_ready().await;
    assert_eq!(tags(&msgs), "3Z", "{msgs:?}");
    a.send(&[raw::bind("stmt", &["x"]), raw::execute(), raw::sync()].concat())
        .await;
    let msgs = a.read_until_ready().await;
    assert_eq!(error_code(&msgs).as_deref(), Some("26000"), "{msgs:?}");
    b.send(&[raw::bind("stmt", &["50"]), raw::execute(), raw::sync()].concat())
        .await;
    assert_eq!(data_rows(&b.read_until_ready().await), ["100"]);

    // a may now reuse the name for something else.
    a.send(
        &[
            raw::parse("stmt", "select 'again'"),
            raw::bind("stmt", &[]),
            raw::execute(),
            raw::sync(),
        ]
        .concat(),
    )
    .await;
    assert_eq!(data_rows(&a.read_until_ready().await), ["again"]);
    b.send(&[raw::bind("stmt", &["4"]), raw::execute(), raw::sync()].concat())
        .await;
    assert_eq!(data_rows(&b.read_until_ready().await), ["8"]);
}

/// What the client was last told of each parameter, from the
/// ParameterStatus messages in `msgs`.
fn reported(msgs: &[harness::raw::Msg]) -> std::collections::BTreeMap<String, String> {
    msgs.iter()
        .filter(|m| m.tag == b'S')
        .filter_map(|m| {
            let mut parts = m.body.split(|b| *b == 0);
            let k = String::from_utf8(parts.next()?.to_vec()).ok()?;
            let v = String::from_utf8(parts.next()?.to_vec()).ok()?;
            Some((k, v))
        })
        .collect()
}

/// After RESET ALL, DISCARD ALL or RESET of one parameter, a client last
/// hears its own startup values, as from PostgreSQL (which says nothing
/// then): not the server connection's (tidepool's application_name, the
/// server's default TimeZone), which the reset reported on that server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_reset_the_client_last_hears_its_own_startup_values() {
    let c = harness::cluster();
    let db = c.create_database("reset_reports");
    let proxy = TestProxy::for_db(c, &db, "");
    for reset in [
        "reset all",
        "discard all",
        "reset application_name; reset timezone",
    ] {
        let mut told = std::collections::BTreeMap::new();
        for port in [c.primary_port(), proxy.port()] {
            let mut r = harness::raw::Raw::connect(port).await;
            r.send(&harness::raw::startup_with(
                harness::TRUST_USER,
                &db,
                &[("application_name", "myapp"), ("TimeZone", "Asia/Tokyo")],
            ))
            .await;
            let mut msgs = r.read_until_ready().await;
            r.send(&harness::raw::query(reset)).await;
            msgs.extend(r.read_until_ready().await);
            r.send(&harness::raw::query("show application_name")).await;
            msgs.extend(r.read_until_ready().await);
            let last = reported(&msgs);
            told.insert(
                port,
                (last["application_name"].clone(), last["TimeZone"].clone()),
            );
        }
        assert_eq!(
            told[&proxy.port()],
            ("myapp".to_owned(), "Asia/Tokyo".to_owned()),
            "{reset}: {told:?}"
        );
        assert_eq!(told[&c.primary_port()], told[&proxy.port()], "{reset}");
    }
}
