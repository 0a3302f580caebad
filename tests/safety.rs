//! Safety against peers that misbehave or die: clients that vanish in the
//! middle of a transaction, a COPY or a query; backends terminated under a
//! client; malformed bytes before and after login. In every case no dirty
//! server reaches another client, the proxy keeps serving, and clients that
//! did nothing wrong are not disturbed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::collections::HashSet;
use std::time::Duration;

use harness::raw::{self, Msg, Raw};
use harness::{TestProxy, cluster};
use tokio::io::AsyncWriteExt;
use tokio_postgres::{Client, SimpleQueryMessage};

/// Deadline for every wait on a condition in this file.
const DEADLINE: Duration = Duration::from_secs(30);

/// Most server connections open in any one pool (a pool is per database and
/// user, so `app` and `trustuser` clients use different pools).
fn max_servers_per_pool(proxy: &TestProxy) -> usize {
    proxy
        .shared
        .registry
        .pools()
        .iter()
        .map(|p| p.server_count())
        .max()
        .unwrap_or(0)
}

/// First column of the first row of a simple query.
async fn value(client: &Client, sql: &str) -> String {
    let msgs = client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    msgs.iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or("").to_owned()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{sql}: no row"))
}

fn sqlstate(e: &tokio_postgres::Error) -> Option<String> {
    e.code().map(|c| c.code().to_owned())
}

/// A field of an ErrorResponse body (`S` severity, `C` code, `M` message).
fn field(m: &Msg, which: u8) -> Option<String> {
    m.body
        .split(|&b| b == 0)
        .find(|f| f.first() == Some(&which))
        .map(|f| String::from_utf8_lossy(&f[1..]).into_owned())
}

/// Messages as `E(FATAL 57P01: text)`, `Z(I)`, `D`, ... for assertion output.
fn describe(msgs: &[Msg]) -> String {
    let one = |m: &Msg| match m.tag {
        b'E' | b'N' => format!(
            "{}({} {}: {})",
            m.tag as char,
            field(m, b'S').unwrap_or_default(),
            m.code().unwrap_or_default(),
            m.message().unwrap_or_default()
        ),
        b'Z' => format!("Z({})", String::from_utf8_lossy(&m.body)),
        t => (t as char).to_string(),
    };
    msgs.iter().map(one).collect::<Vec<_>>().join(", ")
}

async fn count(admin: &Client, sql: &str, db: &str) -> i64 {
    admin
        .query_one(sql, &[&db])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
        .get(0)
}

/// Server connections of `db` sitting in an open transaction.
async fn idle_in_transaction(admin: &Client, db: &str) -> i64 {
    count(
        admin,
        "select count(*) from pg_stat_activity \
         where datname = $1 and state like 'idle in transaction%'",
        db,
    )
    .await
}

async fn wait_no_idle_in_transaction(admin: &Client, db: &str) {
    harness::wait_until_async(
        "no server connection idle in transaction",
        DEADLINE,
        || async { idle_in_transaction(admin, db).await == 0 },
    )
    .await;
}

/// Waits until a backend of `db` runs `sql` and returns its pid.
async fn wait_running(admin: &Client, db: &str, sql: &str) -> i32 {
    let pid = std::cell::Cell::new(None);
    harness::wait_until_async(&format!("`{sql}` to be running"), DEADLINE, || async {
        let row = admin
            .query_opt(
                "select pid from pg_stat_activity \
                 where datname = $1 and state = 'active' and query = $2",
                &[&db, &sql],
            )
            .await
            .expect("pg_stat_activity");
        pid.set(row.map(|r| r.get::<_, i32>(0)));
        pid.get().is_some()
    })
    .await;
    pid.get().expect("pid found")
}

/// Waits until no backend of `db` is running anything like `pattern`.
async fn wait_not_running(admin: &Client, db: &str, pattern: &str) {
    harness::wait_until_async(
        &format!("no backend running `{pattern}`"),
        DEADLINE,
        || async {
            let n: i64 = admin
                .query_one(
                    "select count(*) from pg_stat_activity \
                     where datname = $1 and state <> 'idle' and query like $2 \
                     and pid <> pg_backend_pid()",
                    &[&db, &pattern],
                )
                .await
                .expect("pg_stat_activity")
                .get(0);
            n == 0
        },
    )
    .await;
}

/// pg_terminate_backend(pid) from the superuser connection; waits until the
/// backend is gone.
async fn terminate(admin: &Client, pid: i32) {
    let ok: bool = admin
        .query_one("select pg_terminate_backend($1)", &[&pid])
        .await
        .expect("pg_terminate_backend")
        .get(0);
    assert!(ok, "backend {pid} not found to terminate");
    harness::wait_until_async("terminated backend to exit", DEADLINE, || async {
        let n: i64 = admin
            .query_one(
                "select count(*) from pg_stat_activity where pid = $1",
                &[&pid],
            )
            .await
            .expect("pg_stat_activity")
            .get(0);
        n == 0
    })
    .await;
}

/// Runs `clients` × `each` transactions through the proxy at once and checks
/// that every one starts clean: no transaction id assigned before its first
/// write, and `table` (where only uncommitted rows were ever written) empty.
/// Returns the backend pids that served them.
async fn assert_transactions_start_clean(
    proxy: &TestProxy,
    db: &str,
    table: &str,
    clients: usize,
    each: usize,
) -> HashSet<i32> {
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let url = proxy.url(db);
        let table = table.to_owned();
        tasks.push(tokio::spawn(async move {
            let client = harness::connect(&url).await.expect("connect");
            let mut pids: HashSet<i32> = HashSet::new();
            for i in 0..each {
                client.batch_execute("begin").await.expect("begin");
                let sql = format!(
                    "select txid_current_if_assigned() is null, \
                     (select count(*) from {table}), pg_backend_pid()"
                );
                let rows = client.simple_query(&sql).await.expect("check");
                let row = rows
                    .iter()
                    .find_map(|m| match m {
                        SimpleQueryMessage::Row(r) => Some(r),
                        _ => None,
                    })
                    .expect("a row");
                assert_eq!(
                    row.get(0),
                    Some("t"),
                    "transaction {i} inherited a transaction id: not a fresh transaction"
                );
                assert_eq!(
                    row.get(1),
                    Some("0"),
                    "transaction {i} sees rows nobody committed"
                );
                pids.insert(row.get(2).and_then(|p| p.parse().ok()).expect("pid"));
                client.batch_execute("rollback").await.expect("rollback");
            }
            pids
        }));
    }
    let mut pids = HashSet::new();
    for t in tasks {
        pids.extend(t.await.expect("transaction task"));
    }
    pids
}

/// Creates `t(id int primary key, v text)` usable by every role.
async fn create_table(admin: &Client) {
    admin
        .batch_execute(
            "create table t(id int primary key, v text); \
             grant all on t to public",
        )
        .await
        .expect("create table t");
}

// ---------------------------------------------------------------------------
// Clients that vanish.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_client_mid_transaction_leaves_no_open_transaction() {
    let c = cluster();
    let db = c.create_database("kill_mid_tx");
    let proxy = TestProxy::for_db(c, &db, "default_pool_size = 2");
    let admin = c.admin_client(&db).await;
    create_table(&admin).await;

    // Client A: BEGIN; INSERT; then its socket vanishes without Terminate.
    let (a, connection) = tokio_postgres::connect(&proxy.url(&db), tokio_postgres::NoTls)
        .await
        .expect("connect A");
    let connection = tokio::spawn(connection);
    a.batch_execute("begin; insert into t values (1, 'ghost')")
        .await
        .expect("A's insert");
    let pid: i32 = value(&a, "select pg_backend_pid()")
        .await
        .parse()
        .expect("pid");
    harness::wait_until_async("A's server to be idle in transaction", DEADLINE, || async {
        let state: Option<String> = admin
            .query_opt("select state from pg_stat_activity where pid = $1", &[&pid])
            .await
            .expect("pg_stat_activity")
            .and_then(|r| r.get(0));
        state.as_deref() == Some("idle in transaction")
    })
    .await;
    connection.abort();
    let _ = connection.await;
    drop(a);

    wait_no_idle_in_transaction(&admin, &db).await;
    let pids = assert_transactions_start_clean(&proxy, &db, "t", 2, 25).await;
    assert!(!pids.is_empty());
    assert!(max_servers_per_pool(&proxy) <= 2, "pool size exceeded");
    wait_no_idle_in_transaction(&admin, &db).await;

    // The ghost's row lock is gone too: the same key can be inserted at once.
    let b = proxy.client(&db).await;
    tokio::time::timeout(
        DEADLINE,
        b.batch_execute("insert into t values (1, 'real')"),
    )
    .await
    .expect("insert blocked by a lock of the vanished transaction")
    .expect("insert of the same key");
    let v: String = admin
        .query_one("select string_agg(v, ',') from t", &[])
        .await
        .expect("read t")
        .get(0);
    assert_eq!(v, "real", "only the committed row exists");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reset_mid_transaction_leaves_no_open_transaction() {
    let c = cluster();
    let db = c.create_database("reset_mid_tx");
    let proxy = TestProxy::for_db(c, &db, "default_pool_size = 1");
    let admin = c.admin_client(&db).await;
    create_table(&admin).await;

    let mut r = Raw::login_trust(proxy.port(), &db).await;
    r.send(&raw::query("begin; insert into t values (1, 'ghost')"))
        .await;
    let msgs = r.read_until_ready().await;
    assert_eq!(
        msgs.last().map(|m| m.body.clone()),
        Some(b"T".to_vec()),
        "{}",
        describe(&msgs)
    );
    // RST instead of FIN.
    r.stream.set_zero_linger().expect("SO_LINGER");
    drop(r);

    wait_no_idle_in_transaction(&admin, &db).await;
    assert_transactions_start_clean(&proxy, &db, "t", 2, 25).await;
    assert!(max_servers_per_pool(&proxy) <= 1, "pool size exceeded");
}

/// Client killed while COPY FROM STDIN is in progress, optionally in the
/// middle of a CopyData message.
async fn kill_mid_copy(prefix: &str, partial_message: bool) {
    let c = cluster();
    let db = c.create_database(prefix);
    let proxy = TestProxy::for_db(
        c,
        &db,
        "default_pool_size = 1\nquery_wait_timeout = \"20s\"",
    );
    let admin = c.admin_client(&db).await;
    create_table(&admin).await;

    let mut r = Raw::login_trust(proxy.port(), &db).await;
    r.send(&raw::query("copy t from stdin")).await;
    loop {
        let m = r.next().await.expect("connection closed before COPY");
        assert_ne!(m.tag, b'E', "copy failed: {:?}", m.message());
        if m.tag == b'G' {
            break;
        }
    }
    let mut data = Vec::new();
    for i in 0..500 {
        data.extend(raw::msg(b'd', format!("{i}\trow {i}\n").as_bytes()));
    }
    if partial_message {
        // Announces 64 KiB, sends 6 bytes.
        data.push(b'd');
        data.extend_from_slice(&65_540i32.to_be_bytes());
        data.extend_from_slice(b"9999\tx");
    }
    r.send(&data).await;
    wait_running(&admin, &db, "copy t from stdin").await;
    drop(r);

    wait_not_running(&admin, &db, "copy t%").await;
    wait_no_idle_in_transaction(&admin, &db).await;
    let n: i64 = admin
        .query_one("select count(*) from t", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(n, 0, "rows of an unfinished COPY were committed");

    // The only server was reused clean or replaced; the pool still serves.
    assert_transactions_start_clean(&proxy, &db, "t", 1, 20).await;
    let client = proxy.client(&db).await;
    client
        .batch_execute("insert into t values (1, 'after')")
        .await
        .expect("insert after the killed COPY");
    let n: i64 = admin
        .query_one("select count(*) from t", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(n, 1);
    assert!(max_servers_per_pool(&proxy) <= 1, "pool size exceeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_client_mid_copy_commits_nothing_and_pool_still_serves() {
    kill_mid_copy("kill_mid_copy", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_client_mid_copy_data_message_commits_nothing_and_pool_still_serves() {
    kill_mid_copy("kill_mid_copydata", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_client_mid_query_gets_its_query_cancelled_and_frees_the_server() {
    let c = cluster();
    let db = c.create_database("kill_mid_query");
    let proxy = TestProxy::for_db(
        c,
        &db,
        "default_pool_size = 1\nquery_wait_timeout = \"20s\"",
    );
    let admin = c.admin_client(&db).await;

    let mut r = Raw::login_trust(proxy.port(), &db).await;
    r.send(&raw::query("select pg_sleep(600)")).await;
    wait_running(&admin, &db, "select pg_sleep(600)").await;
    drop(r);

    // Without a cancel the backend would sleep for 10 minutes.
    wait_not_running(&admin, &db, "select pg_sleep(600)").await;
    let client = proxy.client(&db).await;
    assert_eq!(value(&client, "select 'served'").await, "served");
    assert!(max_servers_per_pool(&proxy) <= 1, "pool size exceeded");
}

// ---------------------------------------------------------------------------
// Backends terminated under a client.
// ---------------------------------------------------------------------------

/// What a raw client sees when its backend is terminated: directly, and
/// through tidepool. `mid_query`: terminated while running a query, else
/// idle in a transaction (then the client's next request is sent after).
async fn terminated_under_raw_client(
    port: u16,
    db: &str,
    admin: &Client,
    mid_query: bool,
) -> String {
    let mut r = Raw::login_trust(port, db).await;
    if mid_query {
        r.send(&raw::query("select pg_sleep(301)")).await;
        let pid = wait_running(admin, db, "select pg_sleep(301)").await;
        terminate(admin, pid).await;
    } else {
        r.send(&raw::query(
            "begin; insert into t values (1, 'lost'); select pg_backend_pid()",
        ))
        .await;
        let msgs = r.read_until_ready().await;
        let pid: i32 = msgs
            .iter()
            .find(|m| m.tag == b'D')
            .map(|m| String::from_utf8_lossy(&m.body[6..]).parse().expect("pid"))
            .expect("DataRow");
        terminate(admin, pid).await;
        // Sent after the server said goodbye; whether it is refused or read
        // makes no difference to what comes back.
        let _ = r.stream.write_all(&raw::query("select 'next'")).await;
    }
    let msgs = tokio::time::timeout(DEADLINE, r.read_to_close())
        .await
        .expect("the connection ends");
    describe(&msgs)
}

/// PostgreSQL ends the session of a terminated backend with its FATAL
/// (57P01) and closes the connection; through tidepool the client sees the
/// same, whether it was idle in its transaction or running a query, and
/// nothing of the transaction is committed; other clients go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_backend_ends_the_client_as_postgres_does() {
    let c = cluster();
    let db = c.create_database("term_raw");
    let proxy = TestProxy::for_db(c, &db, "");
    let admin = c.admin_client(&db).await;
    create_table(&admin).await;
    for mid_query in [false, true] {
        let direct = terminated_under_raw_client(c.primary_port(), &db, &admin, mid_query).await;
        let through = terminated_under_raw_client(proxy.port(), &db, &admin, mid_query).await;
        assert_eq!(
            through, direct,
            "mid_query = {mid_query}: through tidepool vs PostgreSQL"
        );
        assert!(direct.contains("FATAL 57P01"), "{direct}");
    }
    assert_eq!(
        count(&admin, "select count(*) from t where $1 <> ''", &db).await,
        0
    );
    // The pool serves the next client on a clean server.
    let client = proxy.client(&db).await;
    assert_eq!(value(&client, "select 'next works'").await, "next works");
    client.batch_execute("begin").await.expect("begin");
    assert_eq!(
        value(&client, "select txid_current_if_assigned() is null").await,
        "t"
    );
    client.batch_execute("commit").await.expect("commit");
}

/// A driver's view: the running query fails with the server's own FATAL
/// 57P01 (not a relabelled 08006) and the connection ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_backend_mid_query_fails_with_the_servers_fatal() {
    let c = cluster();
    let db = c.create_database("term_mid_query");
    let proxy = TestProxy::for_db(c, &db, "");
    let admin = c.admin_client(&db).await;

    let client = std::sync::Arc::new(proxy.client(&db).await);
    let sleeper = client.clone();
    let running = tokio::spawn(async move { sleeper.simple_query("select pg_sleep(300)").await });
    let pid = wait_running(&admin, &db, "select pg_sleep(300)").await;
    terminate(&admin, pid).await;

    let err = tokio::time::timeout(DEADLINE, running)
        .await
        .expect("the running query must end when its backend dies")
        .expect("task")
        .expect_err("the running query must fail");
    assert_eq!(sqlstate(&err).as_deref(), Some("57P01"), "{err:?}");
    harness::wait_until_async("the client connection to end", DEADLINE, || async {
        client.is_closed()
    })
    .await;
    let next = proxy.client(&db).await;
    assert_eq!(value(&next, "select 'next works'").await, "next works");
}

// ---------------------------------------------------------------------------
// Bad input.
// ---------------------------------------------------------------------------

/// A client that stays logged in, inside an open transaction (so it holds a
/// server), while bad input arrives on other connections.
struct Bystander {
    client: Client,
    pid: String,
}

impl Bystander {
    async fn start(proxy: &TestProxy, db: &str) -> Bystander {
        let client = proxy.client(db).await;
        client
            .batch_execute("begin; create temp table bystander(v int) on commit drop; insert into bystander values (42)")
            .await
            .expect("bystander transaction");
        let pid = value(&client, "select pg_backend_pid()").await;
        Bystander { client, pid }
    }

    /// Still in its transaction, on the same server, and works afterwards.
    async fn check(&self) {
        assert_eq!(
            value(&self.client, "select pg_backend_pid()").await,
            self.pid,
            "bystander lost its server"
        );
        assert_eq!(
            value(&self.client, "select sum(v) from bystander").await,
            "42"
        );
    }

    async fn finish(self) {
        self.check().await;
        self.client.batch_execute("commit").await.expect("commit");
        assert_eq!(value(&self.client, "select 'done'").await, "done");
    }
}

/// A fresh tokio-postgres client through the proxy works.
async fn normal_client_works(proxy: &TestProxy, db: &str) {
    let client = tokio::time::timeout(DEADLINE, proxy.client(db))
        .await
        .expect("login through the proxy in time");
    assert_eq!(value(&client, "select 1 + 1").await, "2");
}

/// Reads until the proxy closes the connection (bounded by [`DEADLINE`]).
async fn read_to_close(r: &mut Raw, what: &str) -> Vec<Msg> {
    tokio::time::timeout(DEADLINE, r.read_to_close())
        .await
        .unwrap_or_else(|_| panic!("{what}: connection not closed in time"))
}

/// Before login: only ErrorResponses (if anything), never a login: 08P01,
/// or 0A000 for a version word that is not 3 (garbage read as a protocol
/// version, refused in PostgreSQL's words: "unsupported frontend
/// protocol").
fn assert_refused_before_login(msgs: &[Msg], what: &str) {
    for m in msgs {
        assert_eq!(m.tag, b'E', "{what}: unexpected reply {m:?}");
        let unsupported = m.code().as_deref() == Some("0A000")
            && m.message()
                .is_some_and(|t| t.starts_with("unsupported frontend protocol"));
        assert!(
            m.code().as_deref() == Some("08P01") || unsupported,
            "{what}: {:?} {:?}",
            m.code(),
            m.message()
        );
    }
}

/// After login: exactly one FATAL 08P01 ErrorResponse, then close.
fn assert_fatal_08p01(msgs: &[Msg], what: &str) {
    let errors: Vec<&Msg> = msgs.iter().filter(|m| m.tag == b'E').collect();
    assert_eq!(errors.len(), 1, "{what}: {}", describe(msgs));
    assert_eq!(
        errors[0].code().as_deref(),
        Some("08P01"),
        "{what}: {:?}",
        errors[0].message()
    );
    assert_eq!(field(errors[0], b'S').as_deref(), Some("FATAL"), "{what}");
    assert!(
        msgs.iter().all(|m| m.tag == b'E' || m.tag == b'N'),
        "{what}: unexpected messages {}",
        describe(msgs)
    );
}

async fn garbage_before_startup_packet(port: u16, db: &str) {
    let mut r = Raw::connect(port).await;
    let mut bytes = b"GET / HTTP/1.1\r\nHost: tidepool\r\n\r\n".to_vec();
    bytes.extend(raw::startup(harness::TRUST_USER, db));
    r.send(&bytes).await;
    let msgs = read_to_close(&mut r, "garbage before startup").await;
    assert_refused_before_login(&msgs, "garbage before startup");
}

async fn garbage_instead_of_startup_packet(port: u16, _db: &str) {
    let mut r = Raw::connect(port).await;
    let mut bytes = 16i32.to_be_bytes().to_vec();
    bytes.extend_from_slice(&[0xab; 12]);
    r.send(&bytes).await;
    let msgs = read_to_close(&mut r, "garbage startup packet").await;
    assert_refused_before_login(&msgs, "garbage startup packet");
}

async fn oversized_startup_length(port: u16, _db: &str) {
    let mut r = Raw::connect(port).await;
    // Announces a 2 GiB packet and sends nothing more: the proxy must refuse
    // at once rather than wait for (or allocate) the body.
    r.send(&0x7fff_ffffi32.to_be_bytes()).await;
    let msgs = read_to_close(&mut r, "oversized startup length").await;
    assert_refused_before_login(&msgs, "oversized startup length");
}

async fn truncated_startup_then_close(port: u16, db: &str) {
    let mut r = Raw::connect(port).await;
    let full = raw::startup(harness::TRUST_USER, db);
    r.send(&full[..full.len() / 2]).await;
    r.stream.shutdown().await.expect("shutdown write side");
    let msgs = read_to_close(&mut r, "truncated startup").await;
    assert_refused_before_login(&msgs, "truncated startup");
}

/// Needs `client_login_timeout` well below [`DEADLINE`].
async fn truncated_startup_left_hanging(port: u16, db: &str) {
    let mut r = Raw::connect(port).await;
    let full = raw::startup(harness::TRUST_USER, db);
    r.send(&full[..full.len() / 2]).await;
    let msgs = read_to_close(&mut r, "truncated startup, then silence").await;
    assert_refused_before_login(&msgs, "truncated startup, then silence");
}

/// Needs `client_login_timeout` well below [`DEADLINE`].
async fn silent_client(port: u16, _db: &str) {
    let mut r = Raw::connect(port).await;
    let msgs = read_to_close(&mut r, "silent client").await;
    assert_refused_before_login(&msgs, "silent client");
}

/// Needs `client_login_timeout` well below [`DEADLINE`].
async fn silent_during_password_exchange(port: u16, db: &str) {
    let mut r = Raw::connect(port).await;
    r.send(&raw::startup(harness::APP_USER, db)).await;
    let first = r.next().await.expect("authentication request");
    assert_eq!(first.tag, b'R', "{first:?}");
    let msgs = read_to_close(&mut r, "silent during authentication").await;
    assert_refused_before_login(&msgs, "silent during authentication");
}

async fn oversized_message_after_login(port: u16, db: &str) {
    let mut r = Raw::login_trust(port, db).await;
    // 'Q' announcing ~2 GiB; the body never comes.
    let mut bytes = vec![b'Q'];
    bytes.extend_from_slice(&0x7fff_fff0i32.to_be_bytes());
    r.send(&bytes).await;
    let msgs = read_to_close(&mut r, "oversized message").await;
    assert_fatal_08p01(&msgs, "oversized message");
}

async fn short_length_after_login(port: u16, db: &str) {
    let mut r = Raw::login_trust(port, db).await;
    r.send(&[b'Q', 0, 0, 0, 3]).await;
    let msgs = read_to_close(&mut r, "length 3").await;
    assert_fatal_08p01(&msgs, "length 3");
}

async fn unknown_tag_after_login(port: u16, db: &str) {
    let mut r = Raw::login_trust(port, db).await;
    r.send(&raw::msg(b'z', b"what is this")).await;
    let msgs = read_to_close(&mut r, "unknown tag").await;
    assert_fatal_08p01(&msgs, "unknown tag");
}

/// Inside a transaction the bad header arrives while a server is held.
async fn oversized_message_inside_transaction(port: u16, db: &str) {
    let mut r = Raw::login_trust(port, db).await;
    r.send(&raw::query("begin; select txid_current()")).await;
    let msgs = r.read_until_ready().await;
    assert_eq!(msgs.last().map(|m| m.body.clone()), Some(b"T".to_vec()));
    let mut bytes = vec![b'Q'];
    bytes.extend_from_slice(&0x7fff_fff0i32.to_be_bytes());
    r.send(&bytes).await;
    let msgs = read_to_close(&mut r, "oversized message in a transaction").await;
    assert_fatal_08p01(&msgs, "oversized message in a transaction");
}

async fn short_length_inside_transaction(port: u16, db: &str) {
    let mut r = Raw::login_trust(port, db).await;
    r.send(&raw::query("begin; select txid_current()")).await;
    let msgs = r.read_until_ready().await;
    assert_eq!(msgs.last().map(|m| m.body.clone()), Some(b"T".to_vec()));
    r.send(&[b'P', 0, 0, 0, 0]).await;
    let msgs = read_to_close(&mut r, "length 0 in a transaction").await;
    assert_fatal_08p01(&msgs, "length 0 in a transaction");
}

/// Runs one bad input against a fresh proxy (client_login_timeout 4s: a first login
/// opens a server inside it, slow on a busy machine) with a
/// bystander connected throughout; afterwards a normal client works, the
/// bystander is undisturbed and no server is left in a transaction except
/// the bystander's.
macro_rules! bad_input_test {
    ($name:ident, $input:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let c = cluster();
            let db = c.create_database(stringify!($input));
            let proxy = TestProxy::for_db(c, &db, "client_login_timeout = \"4s\"");
            let admin = c.admin_client(&db).await;
            let bystander = Bystander::start(&proxy, &db).await;
            $input(proxy.port(), &db).await;
            normal_client_works(&proxy, &db).await;
            bystander.check().await;
            harness::wait_until_async(
                "only the bystander's server idle in transaction",
                DEADLINE,
                || async { idle_in_transaction(&admin, &db).await == 1 },
            )
            .await;
            bystander.finish().await;
            wait_no_idle_in_transaction(&admin, &db).await;
        }
    };
}

bad_input_test!(
    garbage_before_startup_packet_is_refused_without_login,
    garbage_before_startup_packet
);
bad_input_test!(
    garbage_instead_of_startup_packet_is_refused,
    garbage_instead_of_startup_packet
);
bad_input_test!(
    oversized_startup_length_is_refused_without_waiting_for_the_body,
    oversized_startup_length
);
bad_input_test!(
    truncated_startup_packet_then_close_is_dropped,
    truncated_startup_then_close
);
bad_input_test!(
    truncated_startup_packet_then_silence_is_closed_by_login_timeout,
    truncated_startup_left_hanging
);
bad_input_test!(silent_client_is_closed_by_login_timeout, silent_client);
bad_input_test!(
    client_silent_during_authentication_is_closed_by_login_timeout,
    silent_during_password_exchange
);
bad_input_test!(
    oversized_message_length_after_login_is_fatal_08p01,
    oversized_message_after_login
);
bad_input_test!(
    message_length_below_four_after_login_is_fatal_08p01,
    short_length_after_login
);
bad_input_test!(
    unknown_message_tag_after_login_is_fatal_08p01,
    unknown_tag_after_login
);
bad_input_test!(
    oversized_message_length_inside_transaction_is_fatal_08p01,
    oversized_message_inside_transaction
);
bad_input_test!(
    message_length_below_four_inside_transaction_is_fatal_08p01,
    short_length_inside_transaction
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_in_sequence_leave_one_long_lived_client_undisturbed() {
    let c = cluster();
    let db = c.create_database("bad_sequence");
    let proxy = TestProxy::for_db(c, &db, "client_login_timeout = \"4s\"");
    let admin = c.admin_client(&db).await;
    let bystander = Bystander::start(&proxy, &db).await;
    let port = proxy.port();

    garbage_before_startup_packet(port, &db).await;
    normal_client_works(&proxy, &db).await;
    garbage_instead_of_startup_packet(port, &db).await;
    normal_client_works(&proxy, &db).await;
    oversized_startup_length(port, &db).await;
    normal_client_works(&proxy, &db).await;
    truncated_startup_then_close(port, &db).await;
    normal_client_works(&proxy, &db).await;
    truncated_startup_left_hanging(port, &db).await;
    normal_client_works(&proxy, &db).await;
    silent_client(port, &db).await;
    normal_client_works(&proxy, &db).await;
    silent_during_password_exchange(port, &db).await;
    normal_client_works(&proxy, &db).await;
    oversized_message_after_login(port, &db).await;
    normal_client_works(&proxy, &db).await;
    short_length_after_login(port, &db).await;
    normal_client_works(&proxy, &db).await;
    unknown_tag_after_login(port, &db).await;
    normal_client_works(&proxy, &db).await;
    oversized_message_inside_transaction(port, &db).await;
    normal_client_works(&proxy, &db).await;
    short_length_inside_transaction(port, &db).await;
    normal_client_works(&proxy, &db).await;

    bystander.check().await;
    harness::wait_until_async(
        "only the bystander's server idle in transaction",
        DEADLINE,
        || async { idle_in_transaction(&admin, &db).await == 1 },
    )
    .await;
    bystander.finish().await;
    wait_no_idle_in_transaction(&admin, &db).await;
}

/// A client in the middle of a message tidepool drops (CopyData outside a
/// COPY: PostgreSQL ignores it) still hears a KILL: the rest of the message
/// is read with the same wait as any idle read, not one that only ends when
/// the bytes come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_half_way_through_a_dropped_message_can_be_killed() {
    let cluster = harness::cluster();
    let db = tokio::task::spawn_blocking(move || cluster.create_database("kill_discard"))
        .await
        .unwrap();
    let proxy = TestProxy::for_db(cluster, &db, "park_idle_clients_after = \"0s\"");
    let mut r = Raw::login_trust(proxy.port(), &db).await;
    // A 1 MB CopyData of which 100 bytes arrive.
    let mut head = vec![b'd'];
    head.extend_from_slice(&1_000_000i32.to_be_bytes());
    head.extend_from_slice(&[b'x'; 100]);
    r.send(&head).await;
    harness::wait_until_async("the client to be listed", DEADLINE, || async {
        !proxy.shared.list.all().is_empty()
    })
    .await;
    // Give the proxy time to read what was sent (the assertion holds
    // either way; this makes the test exercise the half-read message),
    // then KILL every client.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for c in proxy.shared.list.all() {
        c.evict(tidepool::client::list::Eviction::Killed);
    }
    let msgs = r.read_to_close().await;
    assert!(
        msgs.iter()
            .any(|m| m.tag == b'E' && m.code().as_deref() == Some("57P01")),
        "{}",
        describe(&msgs)
    );
}

/// A startup packet for protocol 3.`minor` with `more` parameters.
fn startup_minor(minor: u16, user: &str, db: &str, more: &[(&str, &str)]) -> Vec<u8> {
    raw::startup_version(196_608 | i32::from(minor), user, db, more)
}

/// A client asking for a newer protocol 3 (libpq 18's
/// `max_protocol_version=3.2` or `latest`) or for protocol options
/// (`_pq_.*`) gets NegotiateProtocolVersion, as from PostgreSQL itself, and
/// goes on at 3.0; major version 4 is refused. (tidepool refused 3.2.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newer_protocol_minor_versions_are_negotiated_down_as_postgresql_does() {
    let c = cluster();
    let db = c.create_database("negotiate");
    let proxy = TestProxy::for_db(c, &db, "");
    for (minor, more) in [
        (2u16, vec![]),
        (0, vec![("_pq_.tidepool_test", "on")]),
        (2, vec![("_pq_.a", "1"), ("_pq_.b", "2")]),
    ] {
        let mut answers = Vec::new();
        for port in [c.primary_port(), proxy.port()] {
            let mut r = Raw::connect(port).await;
            r.send(&startup_minor(minor, harness::TRUST_USER, &db, &more))
                .await;
            let login = r.read_until_ready().await;
            let negotiate: Vec<Vec<u8>> = login
                .iter()
                .filter(|m| m.tag == b'v')
                .map(|m| m.body.clone())
                .collect();
            r.send(&raw::query("select 41 + 1")).await;
            let rows = describe(&r.read_until_ready().await);
            answers.push((negotiate, rows));
        }
        assert_eq!(answers[0].0.len(), 1, "PostgreSQL negotiates: {answers:?}");
        assert_eq!(answers[0], answers[1], "3.{minor} with {more:?}");
    }
    // Protocol 4, and a second SSLRequest after the first was answered
    // `N`: PostgreSQL's error (0A000, its words), no session. (A second
    // GSSENCRequest is answered alike; this PostgreSQL, built with GSSAPI,
    // answers the first one `G`.)
    // (tidepool said 08P01 "protocol violation", and answered a second
    // SSLRequest again.)
    let mut v4 = startup_minor(0, harness::TRUST_USER, &db, &[]);
    v4[4..8].copy_from_slice(&(4i32 << 16).to_be_bytes());
    let ssl: &[u8] = &[0, 0, 0, 8, 4, 210, 22, 47];
    for (what, first, then) in [
        ("protocol 4.0", None, v4.clone()),
        ("SSLRequest twice", Some(ssl), ssl.to_vec()),
    ] {
        let mut answers = Vec::new();
        for port in [c.primary_port(), proxy.port()] {
            let mut r = Raw::connect(port).await;
            if let Some(first) = first {
                r.send(first).await;
                assert_eq!(r.read_byte().await, b'N', "{what}");
            }
            r.send(&then).await;
            let msgs = r.read_to_close().await;
            assert!(!msgs.iter().any(|m| m.tag == b'Z'), "{what}: {msgs:?}");
            let e = msgs.iter().find(|m| m.tag == b'E').unwrap();
            answers.push((e.code(), e.message()));
        }
        assert_eq!(answers[0], answers[1], "{what}");
    }
    // A startup packet over PostgreSQL's limit: PostgreSQL closes without a
    // word; tidepool says so in PostgreSQL's log words (it said "invalid
    // message length 20004 for message type '\0'").
    let mut r = Raw::connect(proxy.port()).await;
    r.send(&20_004i32.to_be_bytes()).await;
    let msgs = r.read_to_close().await;
    let e = msgs.iter().find(|m| m.tag == b'E').unwrap();
    assert_eq!(
        e.message().as_deref(),
        Some("invalid length of startup packet")
    );
    assert_eq!(e.code().as_deref(), Some("08P01"));
}

/// Refusals PostgreSQL makes once the client has proven who it is (an
/// unknown database, a startup parameter it refuses) come after an
/// AuthenticationOk, as from PostgreSQL: the same messages, codes and words.
/// (tidepool sent the error alone.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_after_authentication_come_as_postgresql_sends_them() {
    let c = cluster();
    let db = c.create_database("afterauth");
    let proxy = TestProxy::for_db(c, &db, "");
    for (what, packet) in [
        (
            "unknown database",
            raw::startup(harness::TRUST_USER, "no_such_db_here"),
        ),
        (
            "refused parameter",
            startup_minor(0, harness::TRUST_USER, &db, &[("work_mem", "banana")]),
        ),
    ] {
        let mut answers = Vec::new();
        for port in [c.primary_port(), proxy.port()] {
            let mut r = Raw::connect(port).await;
            r.send(&packet).await;
            let msgs = r.read_to_close().await;
            let seen: Vec<(char, Option<String>, Option<String>)> = msgs
                .iter()
                .map(|m| (m.tag as char, m.code(), m.message()))
                .collect();
            answers.push(seen);
        }
        assert_eq!(answers[0], answers[1], "{what}");
    }
}
