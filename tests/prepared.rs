//! Named prepared statements in transaction mode, at the protocol level:
//! they follow the client across servers, and errors, Describe, Close and
//! DEALLOCATE/DISCARD behave as PostgreSQL would for that client.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use harness::raw::{self, Msg, Raw};
use harness::{TestProxy, cluster};
use std::sync::atomic::Ordering;

fn tags(msgs: &[Msg]) -> String {
    msgs.iter().map(|m| m.tag as char).collect()
}

/// Runs `bytes` and returns the messages up to the ReadyForQuery.
async fn round(r: &mut Raw, bytes: Vec<u8>) -> Vec<Msg> {
    r.send(&bytes).await;
    r.read_until_ready().await
}

/// `sql` prepared as statement `name` and run at once, as libpq's
/// PQsendQueryParams (`name` empty) and psycopg's prepared statements send
/// it: Parse, Bind, Describe of the portal, Execute, Sync.
fn run_statement(name: &str, sql: &str) -> Vec<u8> {
    [
        raw::parse(name, sql),
        raw::bind(name, &[]),
        raw::describe_portal(),
        raw::execute(),
        raw::sync(),
    ]
    .concat()
}

async fn backend_pid(r: &mut Raw) -> String {
    let msgs = round(r, raw::query("select pg_backend_pid()")).await;
    let row = msgs.iter().find(|m| m.tag == b'D').unwrap();
    String::from_utf8_lossy(&row.body[6..]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_follows_its_client_to_another_server() {
    let c = cluster();
    let db = c.create_database("follow");
    let proxy = TestProxy::for_db(c, &db, "default_pool_size = 2");
    let mut a = Raw::login_trust(proxy.port(), &db).await;
    let mut other = Raw::login_trust(proxy.port(), &db).await;

    let msgs = round(
        &mut a,
        [raw::parse("s1", "select $1::int * 10"), raw::sync()].concat(),
    )
    .await;
    assert_eq!(tags(&msgs), "1Z");
    let first = backend_pid(&mut a).await;

    // Hold the server `a` used, so its next transaction runs elsewhere.
    let mut held = false;
    for _ in 0..10 {
        round(&mut other, raw::query("begin")).await;
        if backend_pid(&mut other).await == first {
            held = true;
            break;
        }
        round(&mut other, raw::query("commit")).await;
    }
    assert!(held, "could not take a's first server");
    assert_ne!(backend_pid(&mut a).await, first);

    let msgs = round(
        &mut a,
        [raw::bind("s1", &["7"]), raw::execute(), raw::sync()].concat(),
    )
    .await;
    assert_eq!(tags(&msgs), "2DCZ", "{msgs:?}");
    assert_eq!(&msgs[1].body[6..], b"70");
    round(&mut other, raw::query("commit")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn describe_close_and_errors_behave_like_postgres() {
    let c = cluster();
    let db = c.create_database("pgsem");
    let proxy = TestProxy::for_db(c, &db, "default_pool_size = 2");
    let mut r = Raw::login_trust(proxy.port(), &db).await;

    // Describe of a statement: ParameterDescription, then RowDescription.
    let msgs = round(
        &mut r,
        [
            raw::parse("q", "select $1::text as t, 2 as n"),
            raw::describe_statement("q"),
            raw::sync(),
        ]
        .concat(),
    )
    .await;
    assert_eq!(tags(&msgs), "1tTZ", "{msgs:?}");

    // A Parse error: the error, nothing registered, the client goes on.
    let msgs = round(
        &mut r,
        [raw::parse("bad", "select from where"), raw::sync()].concat(),
    )
    .await;
    assert_eq!(tags(&msgs), "EZ");
    assert_eq!(msgs[0].code().as_deref(), Some("42601"));
    let msgs = round(
        &mut r,
        [raw::bind("bad", &[]), raw::execute(), raw::sync()].concat(),
    )
    .await;
    assert_eq!(tags(&msgs), "EZ");
    assert_eq!(msgs[0].code().as_deref(), Some("26000"));

    // Messages after an error are skipped until Sync, as PostgreSQL does.
    let msgs = round(
        &mut r,
        [
            raw::bind("nope", &[]),
            raw::execute(),
            raw::parse("later", "select 1"),
            raw::sync(),
        ]
        .concat(),
    )
    .await;
    assert_eq!(tags(&msgs), "EZ", "{msgs:?}");
    let msgs = round(
        &mut r,
        [raw::bind("later", &[]), raw::execute(), raw::sync()].concat(),
    )
    .await;
    assert_eq!(
        msgs[0].code().as_deref(),
        Some("26000"),
        "skipped Parse must not exist"
    );

    // Duplicate names are refused; Close of an unknown name is fine.
    let msgs = round(&mut r, [raw::parse("q", "select 3"), raw::sync()].concat()).await;
    assert_eq!(msgs[0].code().as_deref(), Some("42P05"));
    let msgs = round(
        &mut r,
        [raw::close_statement("never"), raw::sync()].concat(),
    )
    .await;
    assert_eq!(tags(&msgs), "3Z");

    // Close, then the name is free again with a new text.
    let msgs = round(
        &mut r,
        [
            raw::close_statement("q"),
            raw::parse("q", "select 'again'"),
            raw::bind("q", &[]),
            raw::execute(),
            raw::sync(),
        ]
        .concat(),
    )
    .await;
    assert_eq!(tags(&msgs), "312DCZ", "{msgs:?}");
    assert_eq!(&msgs[3].body[6..], b"again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deallocate_and_discard_forget_the_clients_statements() {
    let c = cluster();
    let db = c.create_database("dealloc");
    let proxy = TestProxy::for_db(c, &db, "default_pool_size = 2");
    let mut r = Raw::login_trust(proxy.port(), &db).await;
    for stmt in ["deallocate all", "discard all", "deallocate s"] {
        let msgs = round(&mut r, [raw::parse("s", "select 1"), raw::sync()].concat()).await;
        assert_eq!(tags(&msgs), "1Z", "{stmt}: {msgs:?}");
        let msgs = round(&mut r, raw::query(stmt)).await;
        assert!(msgs.iter().all(|m| m.tag != b'E'), "{stmt}: {msgs:?}");
        let msgs = round(
            &mut r,
            [raw::bind("s", &[]), raw::execute(), raw::sync()].concat(),
        )
        .await;
        // (A ParameterStatus may come first: after DISCARD ALL the client
        // hears its own application_name again.)
        let err = msgs.iter().find(|m| m.tag == b'E');
        assert_eq!(
            err.and_then(|m| m.code()).as_deref(),
            Some("26000"),
            "{stmt}: {msgs:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_server_cache_is_bounded_and_evicts_least_recently_used() {
    let c = cluster();
    let db = c.create_database("lru");
    let proxy = TestProxy::for_db(c, &db, "default_pool_size = 1\nmax_prepared_statements = 3");
    let mut r = Raw::login_trust(proxy.port(), &db).await;
    for i in 0..8 {
        let msgs = round(
            &mut r,
            [
                raw::parse(&format!("s{i}"), &format!("select {i}")),
                raw::sync(),
            ]
            .concat(),
        )
        .await;
        assert_eq!(tags(&msgs), "1Z");
    }
    for round_no in 0..3 {
        for i in (0..8).rev() {
            let msgs = round(
                &mut r,
                [
                    raw::bind(&format!("s{i}"), &[]),
                    raw::execute(),
                    raw::sync(),
                ]
                .concat(),
            )
            .await;
            assert_eq!(tags(&msgs), "2DCZ", "round {round_no} s{i}: {msgs:?}");
            assert_eq!(msgs[1].body[6..], *i.to_string().as_bytes());
        }
    }
    let msgs = round(
        &mut r,
        raw::query("select count(*) from pg_prepared_statements"),
    )
    .await;
    let row = msgs.iter().find(|m| m.tag == b'D').unwrap();
    let n: i32 = String::from_utf8_lossy(&row.body[6..]).parse().unwrap();
    assert!(n <= 3, "server holds {n} statements");
    assert!(
        proxy
            .shared
            .stats
            .counters
            .prepare_evictions
            .load(Ordering::Relaxed)
            > 0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn re_preparing_a_known_statement_costs_no_server_parse() {
    let c = cluster();
    let db = c.create_database("reprep");
    let proxy = TestProxy::for_db(c, &db, "default_pool_size = 1");
    let stats = &proxy.shared.stats;
    // Many clients prepare the same text: one server, one Parse on it.
    for _ in 0..10 {
        let mut r = Raw::login_trust(proxy.port(), &db).await;
        let msgs = round(
            &mut r,
            [
                raw::parse("mine", "select $1::int + 1"),
                raw::bind("mine", &["1"]),
                raw::execute(),
                raw::sync(),
            ]
            .concat(),
        )
        .await;
        assert_eq!(tags(&msgs), "12DCZ");
    }
    assert_eq!(stats.counters.prepares.load(Ordering::Relaxed), 1);
    assert_eq!(stats.counters.prepare_hits.load(Ordering::Relaxed), 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_prepare_execute_and_deallocate_work_across_servers() {
    let c = cluster();
    let db = c.create_database("sqlprep");
    let proxy = TestProxy::for_db(c, &db, "default_pool_size = 2");
    let mut a = Raw::login_trust(proxy.port(), &db).await;
    let mut b = Raw::login_trust(proxy.port(), &db).await;

    let msgs = round(&mut a, raw::query("PREPARE twice(int) AS select $1 * 2")).await;
    assert_eq!(tags(&msgs), "CZ", "{msgs:?}");
    // Another client may use the same name for something else.
    let msgs = round(&mut b, raw::query("prepare twice(text) as select $1 || $1")).await;
    assert_eq!(tags(&msgs), "CZ", "{msgs:?}");

    for i in 0..6 {
        // Alternate which client holds a transaction so servers change hands.
        let (holder, user, want) = if i % 2 == 0 {
            (&mut b, &mut a, "42")
        } else {
            (&mut a, &mut b, "2121")
        };
        round(holder, raw::query("begin; select 1")).await;
        let msgs = round(user, raw::query("execute twice(21)")).await;
        let row = msgs.iter().find(|m| m.tag == b'D').expect("a row");
        assert_eq!(String::from_utf8_lossy(&row.body[6..]), want);
        round(holder, raw::query("commit")).await;
    }
    let msgs = round(&mut a, raw::query("execute twice(5)")).await;
    let row = msgs.iter().find(|m| m.tag == b'D').unwrap();
    assert_eq!(&row.body[6..], b"10");
    let msgs = round(&mut b, raw::query("execute twice('ab')")).await;
    let row = msgs.iter().find(|m| m.tag == b'D').unwrap();
    assert_eq!(&row.body[6..], b"abab");

    let msgs = round(&mut a, raw::query("PREPARE twice AS select 1")).await;
    assert_eq!(msgs[0].code().as_deref(), Some("42P05"));
    let msgs = round(&mut a, raw::query("DEALLOCATE twice")).await;
    assert_eq!(tags(&msgs), "CZ");
    let msgs = round(&mut a, raw::query("execute twice(1)")).await;
    assert_eq!(msgs[0].code().as_deref(), Some("26000"), "{msgs:?}");
    // b's statement is untouched.
    let msgs = round(&mut b, raw::query("execute twice('x')")).await;
    let row = msgs.iter().find(|m| m.tag == b'D').unwrap();
    assert_eq!(&row.body[6..], b"xx");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_prepared_costs_no_extra_round_trips_once_warm() {
    let c = cluster();
    let db = c.create_database("pgbprep");
    let init = harness::pgbench_async(&c.app_url(&db), &["-i", "-q", "-s", "1"]).await;
    assert!(init.status.success());
    let proxy = TestProxy::for_db(c, &db, "default_pool_size = 5\nmax_client_conn = 100");
    let out = harness::pgbench_async(
        &proxy.url(&db),
        &["-n", "-c", "20", "-j", "2", "-t", "50", "-M", "prepared"],
    )
    .await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("number of failed transactions: 0 "), "{text}");
    let s = &proxy.shared.stats;
    let prepares = s.counters.prepares.load(Ordering::Relaxed);
    let hits = s.counters.prepare_hits.load(Ordering::Relaxed);
    let syncs = s.counters.param_syncs.load(Ordering::Relaxed);
    let refreshes = s.counters.param_refreshes.load(Ordering::Relaxed);
    eprintln!(
        "pgbench -M prepared, 20 clients x 50 tpcb transactions on 5 servers: \
         {prepares} server Parses, {hits} Parses answered without a round trip, \
         {syncs} parameter syncs, {refreshes} parameter refreshes"
    );
    // 7 statements (incl. BEGIN/END) on at most 5 servers.
    assert!(prepares <= 7 * 5, "re-prepared too often: {prepares}");
    // One SET of application_name per server; clients agree on everything.
    assert!(syncs <= 5, "parameter syncs: {syncs}");
    assert_eq!(refreshes, 0);
}

/// `pg_prepared_statements` shows a client its own statements under its own
/// names, as PostgreSQL shows them directly: SQL-level and protocol-level,
/// gone after DEALLOCATE, and never another client's (tidepool shares server
/// statements between clients).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_prepared_statements_lists_the_clients_own_statements() {
    let c = cluster();
    let db = c.create_database("listed");
    let proxy = TestProxy::for_db(c, &db, "default_pool_size = 2");
    const LIST: &str = "select name, statement, from_sql, parameter_types::text \
                        from pg_prepared_statements order by name";
    async fn listing(client: &tokio_postgres::Client) -> Vec<Vec<String>> {
        let rows = client.simple_query(LIST).await.unwrap();
        rows.into_iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                    (0..4)
                        .map(|i| r.get(i).unwrap_or("").to_owned())
                        // tokio-postgres numbers its statements process-wide.
                        .map(|v| {
                            if v.len() > 1
                                && v.starts_with('s')
                                && v[1..].bytes().all(|b| b.is_ascii_digit())
                            {
                                "sN".to_owned()
                            } else {
                                v
                            }
                        })
                        .collect(),
                ),
                _ => None,
            })
            .collect()
    }
    let mut seen = Vec::new();
    for through_tidepool in [false, true] {
        let connect = || async {
            if through_tidepool {
                proxy.client(&db).await
            } else {
                harness::connect(&c.app_url(&db)).await.unwrap()
            }
        };
        let a = connect().await;
        let b = connect().await;
        let mut log = Vec::new();
        a.batch_execute("PREPARE p AS select 1").await.unwrap();
        a.batch_execute("PREPARE q (int) AS select $1 + 1")
            .await
            .unwrap();
        let _s0 = a.prepare("select $1::text").await.unwrap();
        log.push(listing(&a).await);
        // Another client, sharing servers with `a`, sees nothing of a's.
        log.push(listing(&b).await);
        b.batch_execute("PREPARE p AS select 1").await.unwrap();
        log.push(listing(&b).await);
        a.batch_execute("DEALLOCATE p").await.unwrap();
        log.push(listing(&a).await);
        log.push(listing(&b).await);
        // Extended protocol, and qualified and aliased references.
        let rows = a
            .query(
                "select s.name from pg_catalog.pg_prepared_statements s where s.from_sql order by 1",
                &[],
            )
            .await
            .unwrap();
        log.push(vec![rows.iter().map(|r| r.get::<_, String>(0)).collect()]);
        seen.push(log);
    }
    assert_eq!(seen[1], seen[0], "through tidepool vs PostgreSQL");
    assert_eq!(seen[0][0].len(), 3, "{:?}", seen[0]);
}

/// A query tidepool answers itself (DEALLOCATE of a client's statement),
/// pipelined right behind one the server answers: its answer follows the
/// server's ReadyForQuery even when no other server message comes (it used
/// to wait for one forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_tidepool_owes_after_the_servers_last_message_is_sent() {
    let c = cluster();
    let db = c.create_database("trailing");
    let proxy = TestProxy::for_db(c, &db, "default_pool_size = 1");
    let mut r = Raw::login_trust(proxy.port(), &db).await;
    for round_no in 0..20 {
        let msgs = round(
            &mut r,
            raw::query(&format!("PREPARE p{round_no} AS select 1")),
        )
        .await;
        assert_eq!(tags(&msgs), "CZ");
        r.send(
            &[
                raw::query("select pg_sleep(0.01)"),
                raw::query(&format!("DEALLOCATE p{round_no}")),
            ]
            .concat(),
        )
        .await;
        let first = tokio::time::timeout(std::time::Duration::from_secs(10), r.read_until_ready())
            .await
            .expect("the server's answer");
        assert_eq!(tags(&first), "TDCZ");
        let second = tokio::time::timeout(std::time::Duration::from_secs(10), r.read_until_ready())
            .await
            .expect("tidepool's own answer, after the server's last message");
        assert_eq!(tags(&second), "CZ");
    }
}

/// PostgreSQL reads a statement's text once, at Parse, under the session's
/// settings: literals are converted (time zone, date style, backslashes),
/// names resolved (search_path). Two clients whose settings differ must not
/// share one server statement: the second would run what the first one's
/// settings made of the text (a black-box probe saw another time zone's
/// timestamp, DMY dates read as MDY, and 0A000 "cached plan must not change
/// result type" with schema-per-tenant tables). Compared with PostgreSQL
/// directly, pool of one so that both clients use the same server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_with_other_parse_settings_do_not_share_a_statement() {
    let c = cluster();
    let db = c.create_database("parsectx");
    let proxy = TestProxy::for_db(c, &db, "default_pool_size = 1");
    let setup = proxy.client(&db).await;
    setup
        .batch_execute(
            "create schema t1; create schema t2;
             create table t1.tab (a int); insert into t1.tab values (1);
             create table t2.tab (a text, b int); insert into t2.tab values ('x', 2);
             grant usage on schema t1, t2 to public;
             grant select on t1.tab, t2.tab to public",
        )
        .await
        .unwrap();
    drop(setup);
    // (settings of the first client, of the second, the statement)
    let cases = [
        (
            "set timezone = 'UTC'",
            "set timezone = 'Asia/Tokyo'",
            "select '2024-01-01 00:00'::timestamptz::text",
        ),
        (
            "set datestyle = 'ISO, MDY'",
            "set datestyle = 'ISO, DMY'",
            "select '01/02/2024'::date::text",
        ),
        (
            "set standard_conforming_strings = on",
            "set standard_conforming_strings = off",
            "select length('a\\nb')::text",
        ),
        (
            "set search_path = t1",
            "set search_path = t2",
            "select row(tab.*)::text from tab",
        ),
    ];
    let direct = c.app_url(&db);
    for (first, second, sql) in cases {
        let mut answers = Vec::new();
        for url in [direct.clone(), proxy.url(&db)] {
            let a = harness::connect(&url).await.unwrap();
            let b = harness::connect(&url).await.unwrap();
            a.batch_execute(first).await.unwrap();
            b.batch_execute(second).await.unwrap();
            let mut got = Vec::new();
            for client in [&a, &b] {
                let st = client.prepare(sql).await.unwrap();
                let row = client
                    .query_one(&st, &[])
                    .await
                    .map(|r| r.get::<_, String>(0))
                    .map_err(|e| e.code().map(|c| c.code().to_owned()));
                got.push(row);
            }
            answers.push(got);
        }
        assert_eq!(
            answers[1], answers[0],
            "{sql}: through tidepool vs directly"
        );
    }
}

/// DEALLOCATE ALL (or DISCARD ALL) run as a prepared statement of its own,
/// as psycopg with `prepare_threshold=0` runs every statement, drops every
/// statement on that server: another client's statements there must be
/// prepared again, not used as if still there (they failed with 26000
/// `prepared statement "…" does not exist`; found by a black-box probe).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deallocate_all_as_a_prepared_statement_spares_other_clients() {
    let c = cluster();
    let db = c.create_database("deallocprep");
    let proxy = TestProxy::for_db(c, &db, "default_pool_size = 1");
    let mut a = Raw::login_trust(proxy.port(), &db).await;
    let mut b = Raw::login_trust(proxy.port(), &db).await;
    let run_a = || [raw::bind("a1", &[]), raw::execute(), raw::sync()].concat();
    let msgs = round(
        &mut a,
        [raw::parse("a1", "select 41 + 1"), raw::sync()].concat(),
    )
    .await;
    assert_eq!(tags(&msgs), "1Z");
    assert_eq!(tags(&round(&mut a, run_a()).await), "2DCZ");
    for drop_all in ["deallocate all", "discard all", "DEALLOCATE PREPARE ALL"] {
        // b runs it through the one server, as a named and as the unnamed
        // statement.
        for name in ["b1", ""] {
            let msgs = round(
                &mut b,
                [
                    raw::parse(name, drop_all),
                    raw::bind(name, &[]),
                    raw::execute(),
                    raw::sync(),
                ]
                .concat(),
            )
            .await;
            assert!(!msgs.iter().any(|m| m.tag == b'E'), "{drop_all}: {msgs:?}");
            let msgs = round(&mut a, run_a()).await;
            assert_eq!(
                tags(&msgs),
                "2DCZ",
                "after b's {drop_all:?} ({name:?}): {msgs:?}"
            );
        }
        // ParameterStatus may come anywhere (DISCARD ALL resets them).
        let quiet = |m: &[Msg]| tags(m).replace('S', "");
        // As psycopg sends it: the Parse in a round of its own, then the
        // Bind and Execute. Parsed, it drops nothing yet.
        let msgs = round(&mut b, [raw::parse("b2", drop_all), raw::sync()].concat()).await;
        assert_eq!(quiet(&msgs), "1Z", "{drop_all}: {msgs:?}");
        assert_eq!(quiet(&round(&mut a, run_a()).await), "2DCZ", "{drop_all}");
        let msgs = round(&mut b, [raw::parse("b3", "select 1"), raw::sync()].concat()).await;
        assert_eq!(
            quiet(&msgs),
            "1Z",
            "after a Parse of {drop_all:?}: {msgs:?}"
        );
        let msgs = round(
            &mut b,
            [raw::bind("b2", &[]), raw::execute(), raw::sync()].concat(),
        )
        .await;
        assert!(!msgs.iter().any(|m| m.tag == b'E'), "{drop_all}: {msgs:?}");
        assert_eq!(quiet(&round(&mut a, run_a()).await), "2DCZ", "{drop_all}");
        // b's statements are gone, as directly: b2 and b3 may be parsed again.
        for name in ["b2", "b3"] {
            let msgs = round(&mut b, [raw::parse(name, "select 2"), raw::sync()].concat()).await;
            assert_eq!(quiet(&msgs), "1Z", "{drop_all}: {name}: {msgs:?}");
            let msgs = round(&mut b, [raw::close_statement(name), raw::sync()].concat()).await;
            assert!(!msgs.iter().any(|m| m.tag == b'E'), "{msgs:?}");
        }
        // A newcomer prepares what the server had before.
        let mut c = Raw::login_trust(proxy.port(), &db).await;
        let msgs = round(
            &mut c,
            [raw::parse("c1", "select 41 + 1"), raw::sync()].concat(),
        )
        .await;
        assert_eq!(quiet(&msgs), "1Z", "{drop_all}: {msgs:?}");
    }
}

/// `DEALLOCATE name` sent as the unnamed statement (psycopg in pipeline
/// mode evicting from its statement cache with libpq < 17): the client's
/// statement is gone and the answers are PostgreSQL's, `DEALLOCATE` tag
/// and all; an unknown name is PostgreSQL's 26000 naming it. Before, the
/// server was asked to drop the client's name, which only tidepool knows:
/// 26000 for a statement the client had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deallocate_name_as_the_unnamed_statement_drops_the_clients_statement() {
    let c = cluster();
    let db = c.create_database("deallocname");
    let proxy = TestProxy::for_db(c, &db, "default_pool_size = 1");
    let mut a = Raw::login_trust(proxy.port(), &db).await;
    let mut b = Raw::login_trust(proxy.port(), &db).await;
    let dealloc = |name: &str| run_statement("", &format!("DEALLOCATE {name}"));
    let run = |name: &str| [raw::bind(name, &[]), raw::execute(), raw::sync()].concat();
    let msgs = round(
        &mut a,
        [raw::parse("a1", "select 41 + 1"), raw::sync()].concat(),
    )
    .await;
    assert_eq!(tags(&msgs), "1Z");
    // Twice: the first round must leave nothing behind on the server.
    for _ in 0..2 {
        let msgs = round(&mut b, [raw::parse("b1", "select 1"), raw::sync()].concat()).await;
        assert_eq!(tags(&msgs), "1Z", "{msgs:?}");
        assert_eq!(tags(&round(&mut b, run("b1")).await), "2DCZ");
        let msgs = round(&mut b, dealloc("b1")).await;
        assert_eq!(tags(&msgs), "12nCZ", "{msgs:?}");
        assert_eq!(&msgs[3].body[..], b"DEALLOCATE\0");
        let msgs = round(&mut b, run("b1")).await;
        assert_eq!(tags(&msgs), "EZ", "{msgs:?}");
        assert_eq!(msgs[0].code().as_deref(), Some("26000"));
        // Another client's statement on the same server is untouched.
        assert_eq!(tags(&round(&mut a, run("a1")).await), "2DCZ");
    }
    // An unknown name: PostgreSQL's error at the Execute, naming it.
    let msgs = round(&mut b, dealloc("nope")).await;
    assert_eq!(tags(&msgs), "12nEZ", "{msgs:?}");
    assert_eq!(msgs[3].code().as_deref(), Some("26000"));
    assert!(msgs[3].message().unwrap().contains("\"nope\""), "{msgs:?}");
    // Parsed in a round of its own, then bound: the same.
    let msgs = round(&mut b, [raw::parse("b2", "select 2"), raw::sync()].concat()).await;
    assert_eq!(tags(&msgs), "1Z");
    let msgs = round(
        &mut b,
        [raw::parse("", "deallocate prepare b2"), raw::sync()].concat(),
    )
    .await;
    assert_eq!(tags(&msgs), "1Z");
    let msgs = round(
        &mut b,
        [raw::bind("", &[]), raw::execute(), raw::sync()].concat(),
    )
    .await;
    assert_eq!(tags(&msgs), "2CZ", "{msgs:?}");
    assert_eq!(tags(&round(&mut b, run("b2")).await), "EZ");
}

/// SQL-level PREPARE, EXECUTE, EXPLAIN EXECUTE and DEALLOCATE sent as
/// extended-protocol statements (psycopg 3 sends every `execute` that way)
/// behave as simple queries do: the client's statement follows it to any
/// server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_prepare_and_execute_as_extended_statements_follow_the_client() {
    let c = cluster();
    let db = c.create_database("sqlprepext");
    let proxy = TestProxy::for_db(c, &db, "default_pool_size = 2");
    let mut a = Raw::login_trust(proxy.port(), &db).await;
    let mut other = Raw::login_trust(proxy.port(), &db).await;
    let ext = |sql: &str| run_statement("", sql);
    let msgs = round(&mut a, ext("prepare p(int) as select $1 * 2")).await;
    assert_eq!(tags(&msgs), "12nCZ", "{msgs:?}");
    // As psycopg with prepare_threshold=0 sends it: prepared and run at once.
    let named = run_statement;
    let msgs = round(&mut a, named("_pg3_0", "prepare r(int) as select $1 * 3")).await;
    assert_eq!(tags(&msgs), "12nCZ", "{msgs:?}");
    for k in 0..4 {
        if k % 2 == 1 {
            round(&mut other, raw::query("begin; select 1")).await;
        }
        let msgs = round(
            &mut a,
            named(&format!("_pg3_{}", k + 1), &format!("execute r({k})")),
        )
        .await;
        assert_eq!(tags(&msgs), "12TDCZ", "execute r {k}: {msgs:?}");
        if k % 2 == 1 {
            round(&mut other, raw::query("commit")).await;
        }
    }
    // DEALLOCATE prepared as a named statement (psycopg's too), twice: the
    // second finds nothing, as directly.
    let msgs = round(&mut a, named("_pg3_9", "deallocate r")).await;
    assert_eq!(tags(&msgs), "12nCZ", "{msgs:?}");
    let msgs = round(
        &mut a,
        [raw::bind("_pg3_9", &[]), raw::execute(), raw::sync()].concat(),
    )
    .await;
    assert_eq!(tags(&msgs), "2EZ", "{msgs:?}");
    assert_eq!(msgs[1].code().as_deref(), Some("26000"));
    let msgs = round(&mut a, ext("execute r(1)")).await;
    assert_eq!(
        msgs.iter()
            .find(|m| m.tag == b'E')
            .and_then(|m| m.code())
            .as_deref(),
        Some("26000")
    );
    for k in 0..4 {
        // Another client holds a server meanwhile: `a` moves between them.
        if k % 2 == 1 {
            round(&mut other, raw::query("begin; select 1")).await;
        }
        let msgs = round(&mut a, ext(&format!("execute p({k})"))).await;
        assert_eq!(tags(&msgs), "12TDCZ", "execute {k}: {msgs:?}");
        assert_eq!(&msgs[3].body[6..], (k * 2).to_string().as_bytes());
        let msgs = round(&mut a, ext(&format!("explain execute p({k})"))).await;
        assert!(!msgs.iter().any(|m| m.tag == b'E'), "{msgs:?}");
        if k % 2 == 1 {
            round(&mut other, raw::query("commit")).await;
        }
    }
    // `EXECUTE p(21)` prepared as a statement of its own (psycopg's
    // prepare_threshold; EXECUTE takes no `$n`, as directly), bound on
    // either server.
    let msgs = round(&mut a, ext("prepare q(int) as select $1 * 2")).await;
    assert_eq!(tags(&msgs), "12nCZ", "{msgs:?}");
    let msgs = round(
        &mut a,
        [raw::parse("e1", "execute q(21)"), raw::sync()].concat(),
    )
    .await;
    assert_eq!(tags(&msgs), "1Z", "{msgs:?}");
    for k in 0..4 {
        if k % 2 == 1 {
            round(&mut other, raw::query("begin; select 1")).await;
        }
        let msgs = round(
            &mut a,
            [raw::bind("e1", &[]), raw::execute(), raw::sync()].concat(),
        )
        .await;
        assert_eq!(tags(&msgs), "2DCZ", "e1 {k}: {msgs:?}");
        assert_eq!(&msgs[1].body[6..], b"42");
        if k % 2 == 1 {
            round(&mut other, raw::query("commit")).await;
        }
    }
    let msgs = round(&mut a, ext("deallocate p")).await;
    assert_eq!(tags(&msgs), "12nCZ", "{msgs:?}");
    let msgs = round(&mut a, ext("execute p(1)")).await;
    assert_eq!(msgs.last().map(|m| m.tag), Some(b'Z'));
    assert_eq!(
        msgs.iter()
            .find(|m| m.tag == b'E')
            .and_then(|m| m.code())
            .as_deref(),
        Some("26000")
    );
}

/// `EXECUTE p` of a statement prepared with SQL PREPARE, inside a query of
/// several statements (`select 1; execute p(1)`, `begin; execute p(2);
/// commit`, EXPLAIN EXECUTE among others), on whichever server: as
/// directly. Before, only a query of that one statement was given
/// tidepool's name for it: 26000 otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execute_inside_a_multi_statement_query_finds_the_statement() {
    let c = cluster();
    let db = c.create_database("execmulti");
    let proxy = TestProxy::for_db(c, &db, "default_pool_size = 2");
    let mut a = Raw::login_trust(proxy.port(), &db).await;
    let mut other = Raw::login_trust(proxy.port(), &db).await;
    let msgs = round(&mut a, raw::query("prepare pm(int) as select $1 * 2")).await;
    assert_eq!(tags(&msgs), "CZ", "{msgs:?}");
    let rows = |msgs: &[Msg]| -> Vec<String> {
        msgs.iter()
            .filter(|m| m.tag == b'D')
            .map(|m| String::from_utf8_lossy(&m.body[6..]).into_owned())
            .collect()
    };
    for k in 0..4 {
        if k % 2 == 1 {
            round(&mut other, raw::query("begin; select 1")).await;
        }
        let msgs = round(&mut a, raw::query(&format!("select 1; execute pm({k})"))).await;
        assert_eq!(
            rows(&msgs),
            ["1".to_owned(), (k * 2).to_string()],
            "{msgs:?}"
        );
        let msgs = round(
            &mut a,
            raw::query(&format!(
                "begin; execute pm({k}); execute   \"pm\"(1); commit"
            )),
        )
        .await;
        assert_eq!(
            rows(&msgs),
            [(k * 2).to_string(), "2".to_owned()],
            "{msgs:?}"
        );
        let msgs = round(&mut a, raw::query("explain execute pm(3); select 2")).await;
        assert!(!msgs.iter().any(|m| m.tag == b'E'), "{msgs:?}");
        if k % 2 == 1 {
            round(&mut other, raw::query("commit")).await;
        }
    }
    // An unknown name: PostgreSQL's own 26000.
    let msgs = round(&mut a, raw::query("select 1; execute nope(1)")).await;
    assert_eq!(msgs.iter().find_map(Msg::code).as_deref(), Some("26000"));
}
