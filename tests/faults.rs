//! Faults survived: a backend that stops answering (SIGSTOP) is turned
//! into an error by the timeouts, never a hang, and its server is not used
//! again; the primary killed (`kill -9`) under load and restarted: every
//! client gets an answer or an error, and tidepool serves again by itself;
//! a partition between tidepool and a replica (a relay that stops
//! forwarding: no data, no reset), healed afterwards. A replica stopped and
//! started under read load is in tests/routing.rs, a promotion in
//! tests/failover.rs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use harness::{Cluster, TestProxy, cluster};

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) on a PostgreSQL backend of the test's own cluster.
    unsafe { libc::kill(pid, sig) };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_stops_answering_becomes_an_error_not_a_hang() {
    let c = cluster();
    let db = c.create_database("sigstop");
    let proxy = TestProxy::for_db(
        c,
        &db,
        "default_pool_size = 1\nquery_timeout = \"1s\"\nquery_wait_timeout = \"20s\"",
    );
    let client = proxy.client(&db).await;
    let pid: i32 = client
        .query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    signal(pid, libc::SIGSTOP);
    let answer =
        tokio::time::timeout(Duration::from_secs(30), client.simple_query("select 1")).await;
    signal(pid, libc::SIGCONT);
    let err = answer
        .expect("the query hung on a stopped backend")
        .expect_err("a stopped backend cannot answer");
    let d = err.as_db_error().expect("an error from tidepool");
    assert_eq!(d.code().code(), "08006", "{d:?}");
    assert!(d.message().contains("query_timeout"), "{}", d.message());
    // The same client goes on.
    client.simple_query("select 1").await.unwrap();
    // The client, and others, are served again, by another server.
    let other = proxy.client(&db).await;
    let p2: i32 = tokio::time::timeout(
        Duration::from_secs(30),
        other.query_one("select pg_backend_pid()", &[]),
    )
    .await
    .expect("the pool recovered")
    .unwrap()
    .get(0);
    assert_ne!(
        p2, pid,
        "the stopped backend's connection is not used again"
    );
}

/// Writers insert unique ids through tidepool while the primary is killed
/// (`kill -9`) and restarted: every insert gets an answer or an error (no
/// hang), every insert acknowledged is in the table afterwards (none lost
/// silently; commits are synchronous here), and tidepool serves pgbench
/// again by itself, with no server reused dirty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_primary_killed_under_load_and_restarted() {
    let c = tokio::task::spawn_blocking(|| Arc::new(Cluster::start_new(0)))
        .await
        .unwrap();
    let db = c.create_database("crash");
    let admin = c.admin_client(&db).await;
    admin
        .simple_query(&format!(
            "alter database {db} set synchronous_commit = on; \
             create table t (id bigint primary key); grant all on t to app"
        ))
        .await
        .unwrap();
    drop(admin);
    let proxy = TestProxy::for_db(
        &c,
        &db,
        "default_pool_size = 4\nserver_connect_timeout = \"2s\"\nquery_wait_timeout = \"10s\"\nquery_timeout = \"5s\"",
    );
    let url = proxy.url(&db);
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..8i64)
        .map(|w| {
            let (url, stop) = (url.clone(), stop.clone());
            tokio::spawn(async move {
                let (mut acked, mut errors) = (Vec::new(), 0u32);
                let mut client = None;
                let mut n = 0i64;
                while !stop.load(Ordering::Relaxed) {
                    if client.is_none() {
                        client = harness::connect(&url).await.ok();
                        if client.is_none() {
                            errors += 1;
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    }
                    let Some(c) = &client else { continue };
                    n += 1;
                    let id = w * 1_000_000 + n;
                    let sql = format!("insert into t values ({id})");
                    let insert = c.simple_query(&sql);
                    match tokio::time::timeout(Duration::from_secs(30), insert).await {
                        Err(_) => panic!("an insert hung"),
                        Ok(Ok(_)) => acked.push(id),
                        Ok(Err(_)) => {
                            errors += 1;
                            if c.is_closed() {
                                client = None;
                            }
                        }
                    }
                }
                (acked, errors)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let c2 = c.clone();
    tokio::task::spawn_blocking(move || {
        c2.kill_primary();
        std::thread::sleep(Duration::from_secs(1));
        c2.start_primary();
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let mut acked = BTreeSet::new();
    let mut errors = 0;
    for w in writers {
        let (a, e) = w.await.unwrap();
        acked.extend(a);
        errors += e;
    }
    assert!(errors > 0, "the crash was seen by the clients");
    let admin = c.admin_client(&db).await;
    let stored: BTreeSet<i64> = admin
        .query("select id from t", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let lost: Vec<&i64> = acked.difference(&stored).collect();
    assert!(lost.is_empty(), "acknowledged but not stored: {lost:?}");
    assert!(!acked.is_empty());

    // Recovered by itself: pgbench through tidepool, every transaction.
    harness::pgbench_script_all_succeed(
        &url,
        "begin;\nselect count(*) from t;\ninsert into t select coalesce(max(id), 0) + 1 from t where id < 0 on conflict do nothing;\ncommit;\n",
    )
    .await;
}

/// The sibling: a server that stops answering while tidepool runs its own
/// query on it (here bringing its session parameters to a client's) fails
/// that client's request after `INTERNAL_TIMEOUT` (15 s), even without
/// `query_timeout`, and the connection is not reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_stops_answering_tidepools_own_query_is_given_up() {
    let c = cluster();
    let db = c.create_database("sigstop_internal");
    let proxy = TestProxy::for_db(
        c,
        &db,
        "default_pool_size = 1\nquery_wait_timeout = \"60s\"",
    );
    let first = proxy.client(&db).await;
    let pid: i32 = first
        .query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    drop(first);
    // A client with another setting logs in (tidepool learns the value's
    // spelling now); the idle server must be brought to it before it serves.
    let url = format!("{}?options=-c%20statement_timeout%3D4321", proxy.url(&db));
    let other = harness::connect(&url).await.unwrap();
    signal(pid, libc::SIGSTOP);
    let answer =
        tokio::time::timeout(Duration::from_secs(40), other.simple_query("select 1")).await;
    signal(pid, libc::SIGCONT);
    let err = answer.expect("hung on tidepool's own query").unwrap_err();
    let d = err.as_db_error().expect("an error from tidepool");
    assert!(d.message().contains("did not answer"), "{}", d.message());
    let p2: i32 = other
        .query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_ne!(p2, pid);
}

/// A TCP relay in front of a server that can be cut: while cut it reads
/// and writes nothing (no data, no reset: a network partition as the two
/// ends see it; bytes wait in the kernel and flow again once healed), and
/// connections made meanwhile get nowhere. Used where the machine cannot
/// make network namespaces (see [`Link`]).
struct Relay {
    port: u16,
    cut: Arc<AtomicBool>,
}

/// The link between tidepool and a server that a test cuts: a veth pair
/// into a network namespace (the kernel drops what crosses a cut link),
/// or, where this machine cannot make namespaces (not root, no iproute2),
/// a relay in this process, said so on stderr.
enum Link {
    Netns(harness::netns::Netns, std::net::SocketAddr),
    Relay(Relay),
}

impl Link {
    async fn to(target: u16) -> Link {
        match harness::netns::Netns::new() {
            Ok(n) => {
                let at = n.link_to(target).await;
                Link::Netns(n, at)
            }
            Err(why) => {
                eprintln!(
                    "network namespaces unavailable ({why}): the partition is made by a relay in the test instead"
                );
                Link::Relay(relay(target).await)
            }
        }
    }
}

impl Link {
    /// Where tidepool connects to reach the server across the link.
    fn addr(&self) -> (String, u16) {
        match self {
            Link::Netns(_, at) => (at.ip().to_string(), at.port()),
            Link::Relay(r) => ("127.0.0.1".into(), r.port),
        }
    }

    fn cut(&self) {
        match self {
            Link::Netns(n, _) => n.cut(),
            Link::Relay(r) => r.cut.store(true, Ordering::Relaxed),
        }
    }

    fn heal(&self) {
        match self {
            Link::Netns(n, _) => n.heal(),
            Link::Relay(r) => r.cut.store(false, Ordering::Relaxed),
        }
    }
}

async fn relay(target: u16) -> Relay {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let cut = Arc::new(AtomicBool::new(false));
    let cut2 = cut.clone();
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            let cut = cut2.clone();
            tokio::spawn(async move {
                while cut.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else {
                    return;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pipe(cr, sw, cut.clone()));
                tokio::spawn(pipe(sr, cw, cut));
            });
        }
    });
    Relay { port, cut }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    cut: Arc<AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        while cut.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            // Looked at again every 50 ms, so that a cut stops the flow.
            _ = tokio::time::sleep(Duration::from_millis(50)) => continue,
        };
        while cut.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A partition between tidepool and a replica: the read in flight there
/// becomes an error (query_timeout, then the server given up), not a hang;
/// the replica is banned by its timed-out health checks and reads go to the
/// primary; once the partition heals, reads go back to the replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_between_tidepool_and_a_replica() {
    let c = harness::cluster_with_replica();
    let db = c.create_database("partition");
    let r = Link::to(c.replica_ports()[0]).await;
    let toml = format!(
        "{}\n[routing]\nhealth_check_period = \"200ms\"\n",
        harness::proxy::config_toml(
            c,
            &db,
            "default_pool_size = 4\nquery_timeout = \"3s\"\nserver_connect_timeout = \"1s\"\nquery_wait_timeout = \"20s\"",
            &format!(
                "replicas = [{{ host = \"{}\", port = {} }}]",
                r.addr().0,
                r.addr().1
            ),
        )
    );
    let proxy = TestProxy::start(&toml);
    let client = proxy.client(&db).await;
    let replica = c.replica_ports()[0];
    harness::wait_until_async("reads on the replica", Duration::from_secs(30), || async {
        harness::server_port(&client).await.ok() == Some(replica)
    })
    .await;

    // A read in flight on the replica when the partition starts.
    let reader = proxy.client(&db).await;
    let in_flight = tokio::spawn(async move {
        tokio::time::timeout(
            Duration::from_secs(40),
            reader.simple_query("select pg_sleep(10), inet_server_port()"),
        )
        .await
    });
    // Cut once the read runs there (a fixed pause raced a short read).
    let on_replica = c.admin_client_on(replica, "postgres").await;
    harness::wait_until_async("the read running on the replica", Duration::from_secs(30), || async {
        let n: i64 = on_replica
            .query_one(
                "select count(*) from pg_stat_activity where query like 'select pg_sleep(10)%' and state = 'active'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        n == 1
    })
    .await;
    r.cut();
    let answer = in_flight
        .await
        .unwrap()
        .expect("a read hung across a partition");
    // Its answer cannot cross the partition: an error naming
    // query_timeout (the cancel cannot cross either), not a hang.
    let e = answer.expect_err("the answer crossed a cut link");
    let d = e.as_db_error().expect("an error from tidepool");
    assert!(d.message().contains("query_timeout"), "{d:?}");

    // Banned by its health checks; reads go to the primary meanwhile.
    harness::wait_until_async(
        "reads move to the primary",
        Duration::from_secs(30),
        || async {
            matches!(
                tokio::time::timeout(Duration::from_secs(10), harness::server_port(&client)).await,
                Ok(Ok(p)) if p == c.primary_port()
            )
        },
    )
    .await;
    let metrics = tidepool::http::metrics::render(&proxy.shared).unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("tidepool_backend_up{")
                && l.contains("replica")
                && l.ends_with(" 0")),
        "{metrics}"
    );

    // Healed: the replica is checked healthy again and serves reads.
    r.heal();
    harness::wait_until_async(
        "reads back on the replica",
        Duration::from_secs(60),
        || async {
            matches!(
                tokio::time::timeout(Duration::from_secs(10), harness::server_port(&client)).await,
                Ok(Ok(p)) if p == replica
            )
        },
    )
    .await;
}

/// The other side of giving up on a silent server: a client that is slow
/// to read a large answer is not a silent server. Past `query_timeout` and
/// its grace it gets its rows (or the server's own 57014), never 08006.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_slow_to_read_its_answer_is_not_given_up() {
    let c = cluster();
    let db = c.create_database("slow_reader");
    let proxy = TestProxy::for_db(c, &db, "default_pool_size = 1\nquery_timeout = \"1s\"");
    let mut slow = harness::raw::Raw::login_trust(proxy.port(), &db).await;
    // About 20 MB of rows, far more than the sockets buffer.
    slow.send(&harness::raw::query(
        "select repeat('x', 1000) from generate_series(1, 20000)",
    ))
    .await;
    // Nothing read for longer than query_timeout and the 5 s grace.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let msgs = slow.read_until_ready_or_close().await;
    let codes: Vec<String> = msgs.iter().filter_map(|m| m.code()).collect();
    assert!(
        !codes.iter().any(|c| c == "08006"),
        "the server was given up under a slow client: {codes:?}"
    );
    assert!(
        msgs.last().is_some_and(|m| m.tag == b'Z'),
        "the session goes on"
    );
    let rows = msgs.iter().filter(|m| m.tag == b'D').count();
    assert!(rows > 1000, "{rows} rows, {codes:?}");
}

/// The other exception: in COPY FROM STDIN the server waits for the client,
/// so a client that pauses its COPY past `query_timeout` and its grace is
/// answered by the server (its own cancel error or the COPY's result),
/// never given up with 08006.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_copy_from_stdin_is_not_given_up() {
    let c = cluster();
    let db = c.create_database("paused_copy");
    c.admin_client(&db)
        .await
        .simple_query("create table t (id int); grant all on t to public")
        .await
        .unwrap();
    let proxy = TestProxy::for_db(c, &db, "default_pool_size = 1\nquery_timeout = \"1s\"");
    let mut copy = harness::raw::Raw::login_trust(proxy.port(), &db).await;
    copy.send(&harness::raw::query("copy t from stdin")).await;
    let started = copy.next().await.expect("an answer to COPY");
    assert_eq!(started.tag, b'G', "CopyInResponse");
    // Nothing sent for longer than query_timeout and the 5 s grace.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let mut rest = harness::raw::msg(b'd', b"1\n");
    rest.extend(harness::raw::msg(b'c', b""));
    copy.send(&rest).await;
    let msgs = copy.read_until_ready_or_close().await;
    let codes: Vec<String> = msgs.iter().filter_map(|m| m.code()).collect();
    assert!(
        !codes.iter().any(|c| c == "08006"),
        "the server was given up during a paused COPY: {codes:?}"
    );
    assert!(
        msgs.last().is_some_and(|m| m.tag == b'Z'),
        "the session goes on: {codes:?}"
    );
}

/// A server that refuses tidepool's login for a reason a client acts on
/// (too many connections here; shutting down or starting up, 57P03, in a
/// restart) gives the client PostgreSQL's own SQLSTATE, not 08006.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_refusing_logins_for_too_many_connections_says_53300() {
    let c = cluster();
    let db = c.create_database("conn_limit");
    c.admin_client("postgres")
        .await
        .batch_execute(&format!("alter database \"{db}\" connection limit 0"))
        .await
        .unwrap();
    let proxy = TestProxy::for_db(c, &db, "");
    let e = harness::connect(&proxy.url(&db))
        .await
        .expect_err("no server connection can be opened");
    let d = e.as_db_error().expect("an error from tidepool");
    assert_eq!(d.code().code(), "53300", "{d:?}");
    assert!(
        d.message().contains("too many connections"),
        "{}",
        d.message()
    );
}
