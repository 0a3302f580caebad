//! Differential test: one seeded, randomized workload runs straight against
//! PostgreSQL and through tidepool, and both must answer the same, message
//! for message (rows, command tags, transaction status, SQLSTATEs and error
//! texts).
//!
//! The workload: two clients interleaved on a pool of two servers, sending
//! simple queries (single, multi-statement, empty, failing), extended-query
//! batches (unnamed and named statements, pipelines with several Syncs,
//! errors mid-batch), transactions with savepoints, COPY in (good and bad
//! rows) and out, session settings, statements of random sizes around the
//! buffer thresholds, and cancels of running queries; every request is
//! written split at random byte boundaries.
//!
//! `TIDEPOOL_DIFF_SEEDS` (default 3) and `TIDEPOOL_DIFF_STEPS` (default 150)
//! set the size of the run; `TIDEPOOL_DIFF_SEED` replays one seed. A longer
//! run: `./scripts/test --long`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::time::Duration;

use bytes::{BufMut, BytesMut};
use harness::TestProxy;
use harness::raw::{self, Msg};
use harness::wire::{Rng, Split, normalize, write_split};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Literal sizes the generator favours: around tidepool's buffer steps.
const SIZES: &[usize] = &[
    0, 1, 10, 200, 1000, 1019, 1024, 1100, 4090, 4096, 4100, 8190, 8200, 16_400, 70_000,
];

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One request of a client and how many ReadyForQuery end its answer.
struct Request {
    client: usize,
    bytes: Vec<u8>,
    readies: usize,
    /// Cancel the request once it shows as running.
    cancel: bool,
    what: String,
}

fn pad(rng: &mut Rng) -> String {
    let n = SIZES[rng.below(SIZES.len() as u64) as usize];
    // Vary the text so that statements differ (and caches are exercised).
    let c = (b'a' + rng.below(26) as u8) as char;
    c.to_string().repeat(n)
}

fn copy_data(row: &str) -> Vec<u8> {
    raw::msg(b'd', row.as_bytes())
}

/// The workload of one seed, the same for both targets.
fn workload(seed: u64, steps: usize) -> Vec<Request> {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut out = Vec::new();
    // Named statements each client has prepared.
    let mut named: [Vec<String>; 2] = [Vec::new(), Vec::new()];
    for step in 0..steps {
        let client = rng.below(2) as usize;
        let simple = |sql: String| (raw::query(&sql), 1, sql);
        let (bytes, readies, what) = match rng.below(18) {
            0 => {
                let p = pad(&mut rng);
                simple(format!(
                    "select {step} as step, length('{p}'), md5('{p}'), '{p}' = '{p}' as same"
                ))
            }
            1 => simple(format!("select {step}; select 1/0; select 'never reached'")),
            2 => simple(
                ["selec 1", "select * from no_such_table", "select 'a'::int"]
                    [rng.below(3) as usize]
                    .to_owned(),
            ),
            3 => simple(
                [
                    "begin",
                    "commit",
                    "rollback",
                    "begin read only",
                    "savepoint s1",
                    "rollback to s1",
                ][rng.below(6) as usize]
                    .to_owned(),
            ),
            4 => {
                let p = pad(&mut rng);
                simple(format!(
                    "insert into items (client, v) values ({client}, '{p}') returning id, length(v)"
                ))
            }
            5 => simple(format!(
                "select client, count(*), sum(length(v)), max(id) from items group by client order by client /* {step} */"
            )),
            6 => {
                // An unnamed extended-query statement with parameters.
                let p = pad(&mut rng);
                let mut b = raw::parse("", "select $1::text || $2::text as joined, $3::int + 1");
                let n = step.to_string();
                b.extend(raw::bind_nullable("", &[Some(&p), None, Some(&n)]));
                b.extend(raw::describe_portal());
                b.extend(raw::execute());
                b.extend(raw::sync());
                (b, 1, format!("extended unnamed ({} B)", p.len()))
            }
            7 => {
                // Prepare a named statement, or run one prepared before.
                let mine = &mut named[client];
                if mine.is_empty() || rng.below(3) == 0 {
                    let name = format!("s{client}_{step}");
                    let p = pad(&mut rng);
                    let sql = format!(
                        "select id, v = '{p}' from items where id > $1 order by id limit 3"
                    );
                    let mut b = raw::parse_typed(&name, &sql, &[23]);
                    b.extend(raw::describe_statement(&name));
                    b.extend(raw::sync());
                    mine.push(name.clone());
                    (b, 1, format!("prepare {name}"))
                } else {
                    let name = mine[rng.below(mine.len() as u64) as usize].clone();
                    let mut b = raw::bind(&name, &[&(step % 7).to_string()]);
                    b.extend(raw::execute());
                    b.extend(raw::sync());
                    (b, 1, format!("execute {name}"))
                }
            }
            8 => {
                // A pipeline: several batches, one failing in the middle
                // (the rest of its batch is skipped until its Sync).
                let mut b = Vec::new();
                for i in 0..3 {
                    let sql = if i == 1 && rng.below(2) == 0 {
                        "select 1/0".to_owned()
                    } else {
                        format!("select {i}, {step}")
                    };
                    b.extend(raw::parse("", &sql));
                    b.extend(raw::bind("", &[]));
                    b.extend(raw::execute());
                    b.extend(raw::sync());
                }
                (b, 3, "pipeline of three syncs".into())
            }
            9 => {
                let mut b = raw::query("copy items (client, v) from stdin");
                let rows = 1 + rng.below(4);
                for _ in 0..rows {
                    let p = pad(&mut rng);
                    b.extend(copy_data(&format!("{client}\t{p}\n")));
                }
                if rng.below(4) == 0 {
                    b.extend(copy_data("not-a-number\tx\n"));
                }
                b.extend(raw::msg(b'c', b""));
                (b, 1, format!("copy in {rows} rows"))
            }
            10 => simple(
                "copy (select id, client, length(v) from items order by id desc limit 5) to stdout"
                    .into(),
            ),
            11 => {
                let mb = 1 + rng.below(64);
                simple(format!("set work_mem = '{mb}MB'"))
            }
            12 => simple("show work_mem".into()),
            13 => simple(String::new()),
            14 => {
                // Named statement closed, then described: gone.
                let mine = &mut named[client];
                match mine.pop() {
                    Some(name) => {
                        let mut b = raw::close_statement(&name);
                        b.extend(raw::describe_statement(&name));
                        b.extend(raw::sync());
                        (b, 1, format!("close {name}"))
                    }
                    None => simple("select 'nothing to close'".into()),
                }
            }
            15 => {
                // SQL-level PREPARE (sometimes of a name already taken).
                let k = rng.below(4);
                simple(format!(
                    "prepare q{client}_{k} as select $1::int + {k}, 'q'"
                ))
            }
            16 => {
                let k = rng.below(4);
                match rng.below(3) {
                    0 => simple(format!("deallocate q{client}_{k}")),
                    _ => simple(format!("execute q{client}_{k} ({step})")),
                }
            }
            _ => {
                if rng.below(3) == 0 {
                    out.push(Request {
                        client,
                        bytes: raw::query(&format!("select pg_sleep(30) /* cancel me {step} */")),
                        readies: 1,
                        cancel: true,
                        what: "cancelled pg_sleep".into(),
                    });
                    continue;
                }
                simple(format!("select {step} /* plain */"))
            }
        };
        out.push(Request {
            client,
            bytes,
            readies,
            cancel: false,
            what,
        });
    }
    out
}

/// A logged-in client of one target, with its cancel key.
struct Client {
    stream: TcpStream,
    buf: BytesMut,
    key: (i32, i32),
}

async fn login(port: u16, db: &str) -> Client {
    let (mut c, msgs) = login_with(port, db, &[]).await;
    let k = msgs.iter().find(|m| m.tag == b'K').expect("BackendKeyData");
    c.key = (
        i32::from_be_bytes(k.body[0..4].try_into().unwrap()),
        i32::from_be_bytes(k.body[4..8].try_into().unwrap()),
    );
    c
}

/// Logs in as the trust user with `params` besides user and database; the
/// client and what the login answered (to ReadyForQuery or the end).
async fn login_with(port: u16, db: &str, params: &[(&str, &str)]) -> (Client, Vec<Msg>) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let packet = harness::raw::startup_with(harness::TRUST_USER, db, params);
    stream.write_all(&packet).await.unwrap();
    let mut c = Client {
        stream,
        buf: BytesMut::new(),
        key: (0, 0),
    };
    let msgs = read_readies(&mut c, 1).await;
    (c, msgs)
}

async fn read_readies(c: &mut Client, mut readies: usize) -> Vec<Msg> {
    let mut out = Vec::new();
    loop {
        while c.buf.len() >= 5 {
            let len = i32::from_be_bytes([c.buf[1], c.buf[2], c.buf[3], c.buf[4]]) as usize;
            if c.buf.len() < len + 1 {
                break;
            }
            let m = c.buf.split_to(len + 1);
            let msg = Msg {
                tag: m[0],
                body: m[5..].to_vec(),
            };
            let ready = msg.tag == b'Z';
            out.push(msg);
            if ready {
                readies -= 1;
                if readies == 0 {
                    return out;
                }
            }
        }
        c.buf.reserve(64 * 1024);
        let n = tokio::time::timeout(Duration::from_secs(60), c.stream.read_buf(&mut c.buf))
            .await
            .unwrap_or_else(|_| panic!("no answer within 60 s; so far {:?}", normalize(&out)))
            .unwrap_or(0);
        if n == 0 {
            out.push(Msg {
                tag: b'!',
                body: b"closed".to_vec(),
            });
            return out;
        }
    }
}

/// Sends CancelRequest for `key` to `port` once `marker` runs on the server.
async fn cancel_when_running(
    port: u16,
    db: &str,
    key: (i32, i32),
    watch: &tokio_postgres::Client,
    marker: &str,
) {
    let sql = "select count(*) from pg_stat_activity \
               where state = 'active' and datname = $1 and query like $2";
    let pattern = format!("%{marker} */%");
    loop {
        let n: i64 = watch.query_one(sql, &[&db, &pattern]).await.unwrap().get(0);
        if n > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut b = BytesMut::new();
    b.put_i32(16);
    b.put_i32(80_877_102);
    b.put_i32(key.0);
    b.put_i32(key.1);
    s.write_all(&b).await.unwrap();
    let mut sink = Vec::new();
    let _ = s.read_to_end(&mut sink).await;
}

/// A RowDescription names each column's table by OID, which differs
/// between the two databases: blank it.
fn without_table_oids(m: &mut Msg) {
    if m.tag != b'T' || m.body.len() < 2 {
        return;
    }
    let n = i16::from_be_bytes([m.body[0], m.body[1]]) as usize;
    let mut at = 2;
    for _ in 0..n {
        let Some(end) = m.body[at..].iter().position(|&b| b == 0) else {
            return;
        };
        at += end + 1;
        if m.body.len() < at + 18 {
            return;
        }
        m.body[at..at + 4].fill(0);
        at += 18;
    }
}

/// Runs `work` against `port` (database `db`); the answers, normalized.
async fn run(
    port: u16,
    db: &str,
    work: &[Request],
    seed: u64,
    watch: &tokio_postgres::Client,
) -> Vec<Vec<String>> {
    let mut clients = [login(port, db).await, login(port, db).await];
    let mut answers = Vec::new();
    let mut rng = Rng(seed ^ 0xA5A5_5A5A | 1);
    for r in work {
        let c = &mut clients[r.client];
        let split = match rng.below(3) {
            0 => Split::Whole,
            _ => Split::Random(rng.next()),
        };
        write_split(&mut c.stream, &r.bytes, split).await.unwrap();
        let mut got = if r.cancel {
            let marker = std::str::from_utf8(&r.bytes[5..r.bytes.len() - 1])
                .unwrap()
                .split("/* ")
                .nth(1)
                .unwrap()
                .trim_end_matches(" */")
                .to_owned();
            // In a failed transaction the statement never runs: its error
            // comes back, and there is nothing to cancel.
            let key = c.key;
            let cancel = cancel_when_running(port, db, key, watch, &marker);
            let got = {
                let read = read_readies(c, r.readies);
                tokio::pin!(read);
                tokio::select! {
                    got = &mut read => got,
                    () = cancel => read.await,
                }
            };
            // A cancel can reach a backend twice (PostgreSQL signals it
            // asynchronously); a query of the harness's own, not compared,
            // takes what may still come instead of the next step.
            c.stream.write_all(&raw::query("select 1")).await.unwrap();
            read_readies(c, 1).await;
            got
        } else {
            read_readies(c, r.readies).await
        };
        got.iter_mut().for_each(without_table_oids);
        if r.cancel {
            // Whether the row description went out before the cancel landed
            // is a race on both paths.
            got.retain(|m| m.tag != b'T');
        }
        answers.push(normalize(&got));
    }
    answers
}

async fn one_seed(seed: u64, steps: usize) {
    let cluster = harness::cluster();
    let (direct_db, proxied_db) = tokio::task::spawn_blocking(move || {
        (
            cluster.create_database("diff_direct"),
            cluster.create_database("diff_proxied"),
        )
    })
    .await
    .unwrap();
    for db in [&direct_db, &proxied_db] {
        let admin = cluster.admin_client(db).await;
        admin
            .batch_execute(
                "create table items (id serial primary key, client int not null, v text not null);
                 grant all on items to public; grant all on sequence items_id_seq to public;",
            )
            .await
            .unwrap();
    }
    let watch = cluster.admin_client("postgres").await;
    let proxy = TestProxy::for_db(cluster, &proxied_db, "default_pool_size = 2");
    let work = workload(seed, steps);
    let direct = run(cluster.primary_port(), &direct_db, &work, seed, &watch).await;
    let through = run(proxy.port(), &proxied_db, &work, seed, &watch).await;
    for (i, (d, t)) in direct.iter().zip(&through).enumerate() {
        assert_eq!(
            t, d,
            "seed {seed}, step {i} (client {}: {}): through tidepool vs PostgreSQL (replay: TIDEPOOL_DIFF_SEED={seed})",
            work[i].client, work[i].what
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_workload_answers_like_postgres() {
    let steps = env_or("TIDEPOOL_DIFF_STEPS", 150) as usize;
    let seeds: Vec<u64> = match std::env::var("TIDEPOOL_DIFF_SEED") {
        Ok(s) => vec![s.parse().expect("TIDEPOOL_DIFF_SEED is a number")],
        Err(_) => (1..=env_or("TIDEPOOL_DIFF_SEEDS", 3)).collect(),
    };
    for seed in seeds {
        one_seed(seed, steps).await;
    }
}

/// A client whose `client_encoding` is LATIN9 gets the server's messages in
/// LATIN9, byte for byte, as it would directly (an error text with `é`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_messages_in_the_clients_encoding_pass_byte_for_byte() {
    let cluster = harness::cluster();
    let db = tokio::task::spawn_blocking(move || cluster.create_database("latin9"))
        .await
        .unwrap();
    let proxy = TestProxy::for_db(cluster, &db, "");
    let mut answers = Vec::new();
    for port in [cluster.primary_port(), proxy.port()] {
        let (mut c, _) = login_with(port, &db, &[("client_encoding", "LATIN9")]).await;
        let mut answer = Vec::new();
        for sql in ["select chr(233)::int", "select chr(233) as e", "select 1"] {
            c.stream.write_all(&raw::query(sql)).await.unwrap();
            answer.push(normalize(&read_readies(&mut c, 1).await));
        }
        answers.push(answer);
    }
    assert_eq!(answers[1], answers[0], "through tidepool vs PostgreSQL");
    assert!(
        answers[0][0].iter().any(|m| m.contains("C=22P02")),
        "{:?}",
        answers[0]
    );
}

/// Logs in with `params` (besides user and database); the ParameterStatus
/// values for `keys`, or the error that refused the login.
async fn reported(port: u16, db: &str, params: &[(&str, &str)], keys: &[&str]) -> Vec<String> {
    let (mut c, msgs) = login_with(port, db, params).await;
    let mut out: Vec<String> = msgs
        .iter()
        .filter(|m| m.tag == b'S')
        .filter_map(|m| {
            let mut parts = m.body.split(|&b| b == 0);
            let k = String::from_utf8_lossy(parts.next()?).into_owned();
            let v = String::from_utf8_lossy(parts.next()?).into_owned();
            keys.contains(&k.as_str()).then(|| format!("{k}={v}"))
        })
        .collect();
    out.sort();
    out.extend(normalize(&msgs).into_iter().filter(|m| m.starts_with("E(")));
    if out.iter().all(|m| !m.starts_with("E(")) {
        // What the session itself says.
        c.stream
            .write_all(&raw::query(
                "show datestyle; show timezone; show application_name",
            ))
            .await
            .unwrap();
        out.extend(
            normalize(&read_readies(&mut c, 1).await)
                .into_iter()
                .filter(|m| m.starts_with("D(")),
        );
    }
    out
}

/// Startup parameters come back in PostgreSQL's own spelling (`ISO, MDY`,
/// `UTF8`, `Europe/Rome`), `application_name` is the client's own (empty
/// when it set none), and a value PostgreSQL refuses refuses the login with
/// PostgreSQL's error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_parameters_come_back_as_postgres_reports_them() {
    let cluster = harness::cluster();
    let db = tokio::task::spawn_blocking(move || cluster.create_database("startup_params"))
        .await
        .unwrap();
    let proxy = TestProxy::for_db(cluster, &db, "");
    let keys = [
        "DateStyle",
        "client_encoding",
        "TimeZone",
        "application_name",
        "IntervalStyle",
    ];
    let cases: &[&[(&str, &str)]] = &[
        &[],
        &[
            ("options", "-c datestyle=iso,mdy"),
            ("client_encoding", "utf8"),
        ],
        &[("TimeZone", "europe/rome"), ("application_name", "billing")],
        &[(
            "options",
            "-c intervalstyle=SQL_STANDARD -c DateStyle=german",
        )],
        &[("options", "-c datestyle=nonsense")],
        &[("timezone", "Mars/Olympus")],
    ];
    for params in cases {
        let direct = reported(cluster.primary_port(), &db, params, &keys).await;
        let through = reported(proxy.port(), &db, params, &keys).await;
        assert_eq!(
            through, direct,
            "{params:?}: through tidepool vs PostgreSQL"
        );
    }
}

/// Errors about a client's prepared statement name the client's statement,
/// as PostgreSQL would, never tidepool's shared one, and point into the
/// client's own text; `EXPLAIN EXECUTE p` and `CREATE TABLE … AS EXECUTE p`
/// run the client's `p`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_name_the_clients_own_statements() {
    let cluster = harness::cluster();
    let db = tokio::task::spawn_blocking(move || cluster.create_database("stmt_names"))
        .await
        .unwrap();
    let proxy = TestProxy::for_db(cluster, &db, "");
    let requests: Vec<Vec<u8>> = vec![
        [raw::parse("q3", "select $1::int"), raw::sync()].concat(),
        // Two parameters for a statement that takes one.
        [raw::bind("q3", &["1", "2"]), raw::execute(), raw::sync()].concat(),
        raw::query("prepare p(int) as select $1 + 1"),
        raw::query("execute p(1, 2)"),
        raw::query("execute p('x')"),
        raw::query("  /* a comment */ EXECUTE   p ('y')"),
        raw::query("prepare r as select $1a"),
        raw::query("prepare q(nonexistenttype) as select $1"),
        // Prepared statements run inside other statements.
        raw::query("explain (costs off) execute p(1)"),
        raw::query("EXPLAIN (ANALYZE, VERBOSE, COSTS OFF, TIMING OFF, SUMMARY OFF) EXECUTE p(2)"),
        raw::query("create temp table made as execute p(41)"),
        raw::query("select * from made"),
        raw::query("create table made2 (n) as execute p(1, 2)"),
        raw::query("explain execute nope(1)"),
        [raw::bind("q3", &["41"]), raw::execute(), raw::sync()].concat(),
    ];
    let mut answers = Vec::new();
    for port in [cluster.primary_port(), proxy.port()] {
        let mut c = login(port, &db).await;
        let mut answer = Vec::new();
        for r in &requests {
            c.stream.write_all(r).await.unwrap();
            let mut got = read_readies(&mut c, 1).await;
            got.iter_mut().for_each(without_table_oids);
            answer.push(normalize(&got));
        }
        answers.push(answer);
    }
    for (i, (d, t)) in answers[0].iter().zip(&answers[1]).enumerate() {
        assert_eq!(t, d, "request {i}: through tidepool vs PostgreSQL");
    }
    assert!(
        answers[1]
            .iter()
            .flatten()
            .all(|m| !m.contains("tidepool_")),
        "{:?}",
        answers[1]
    );
}
