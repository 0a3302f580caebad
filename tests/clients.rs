//! Real clients through tidepool: tokio-postgres simple and extended queries,
//! psql multi-statement strings, notices, COPY round trips, raw pipelines and
//! FunctionCall.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use harness::raw::{self, Raw};
use harness::{TestProxy, cluster};
use tokio_postgres::types::Type;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_simple_and_extended_queries() {
    let c = cluster();
    let db = c.create_database("tp");
    let proxy = TestProxy::for_db(c, &db, "");
    let client = proxy.client(&db).await;

    let rows = client.simple_query("select 1; select 'two'").await.unwrap();
    let values: Vec<_> = rows
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .collect();
    assert_eq!(values, ["1", "two"]);

    client
        .batch_execute("create table t(id int primary key, v text)")
        .await
        .unwrap();
    // Unnamed statements (one round trip each) work in any transaction.
    for i in 0..20 {
        client
            .query_typed(
                "insert into t values ($1, $2)",
                &[(&i, Type::INT4), (&format!("v{i}"), Type::TEXT)],
            )
            .await
            .unwrap();
    }
    let rows = client
        .query_typed(
            "select count(*), max(v) from t where id >= $1",
            &[(&10i32, Type::INT4)],
        )
        .await
        .unwrap();
    assert_eq!(rows[0].get::<_, i64>(0), 10);
    assert_eq!(rows[0].get::<_, String>(1), "v19");

    // Named statements live as long as the transaction that prepared them.
    let mut client = client;
    let tx = client.transaction().await.unwrap();
    let stmt = tx.prepare("select v from t where id = $1").await.unwrap();
    for i in [3i32, 7, 11] {
        let v: String = tx.query_one(&stmt, &[&i]).await.unwrap().get(0);
        assert_eq!(v, format!("v{i}"));
    }
    tx.commit().await.unwrap();

    // A transaction spans several round trips on one server.
    let tx = client.transaction().await.unwrap();
    tx.execute("insert into t values (100, 'tx')", &[])
        .await
        .unwrap();
    let pid1: i32 = tx
        .query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let pid2: i32 = tx
        .query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(pid1, pid2, "one transaction, one server");
    tx.rollback().await.unwrap();
    let n: i64 = client
        .query_one("select count(*) from t where id = 100", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_multi_statement_notices_and_errors() {
    let c = cluster();
    let db = c.create_database("psql");
    let proxy = TestProxy::for_db(c, &db, "");
    let out = harness::psql_async(
        &proxy.url(&db),
        &[
            "-At",
            "-c",
            "create table m(a int); insert into m values (1),(2); select sum(a) from m",
            "-c",
            "do $$ begin raise notice 'hello from %', 'plpgsql'; end $$",
        ],
        None,
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.lines().any(|l| l == "3"), "{stdout}");
    assert!(stderr.contains("NOTICE:  hello from plpgsql"), "{stderr}");

    // An error inside a transaction leaves it failed ('E') until ROLLBACK, on
    // the same server; afterwards everything works.
    let script = "begin;\nselect pg_backend_pid() as p \\gset\nselect 1/0;\nselect 1;\nrollback;\nselect 'after';\n";
    let out = harness::psql_async(
        &proxy.url(&db),
        &["-At", "-v", "ON_ERROR_STOP=0"],
        Some(script),
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stderr.contains("division by zero"), "{stderr}");
    assert!(
        stderr.contains("current transaction is aborted"),
        "server kept for the failed transaction: {stderr}"
    );
    assert!(stdout.contains("after"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_copy_round_trip_of_100k_rows() {
    let c = cluster();
    let db = c.create_database("copy");
    let proxy = TestProxy::for_db(c, &db, "");
    let url = proxy.url(&db);
    let mut data = String::new();
    for i in 0..100_000 {
        data.push_str(&format!("{i}\trow number {i} with some text\n"));
    }
    let setup = harness::psql_async(&url, &["-c", "create table src(id int, t text)"], None).await;
    assert!(setup.status.success());
    let load = harness::psql_async(&url, &["-c", "copy src from stdin"], Some(&data)).await;
    assert!(
        load.status.success(),
        "{}",
        String::from_utf8_lossy(&load.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&load.stdout).trim(), "COPY 100000");

    let out = harness::psql_async(&url, &["-c", "copy src to stdout"], None).await;
    assert!(out.status.success());
    assert_eq!(out.stdout.len(), data.len());
    assert_eq!(
        out.stdout,
        data.as_bytes(),
        "COPY TO STDOUT returns what went in"
    );

    let direct = c.admin_client(&db).await;
    let row = direct
        .query_one(
            "select count(*), md5(string_agg(id::text || t, ',' order by id)) from src",
            &[],
        )
        .await
        .unwrap();
    let proxied = proxy.client(&db).await;
    let row2 = proxied
        .query_one(
            "select count(*), md5(string_agg(id::text || t, ',' order by id)) from src",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 100_000);
    assert_eq!(row.get::<_, String>(1), row2.get::<_, String>(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_extended_batches_with_several_syncs() {
    let c = cluster();
    let db = c.create_database("pipe");
    let proxy = TestProxy::for_db(c, &db, "");
    let mut r = Raw::login_trust(proxy.port(), &db).await;
    let mut batch = Vec::new();
    for i in 0..5 {
        batch.extend(raw::parse("", "select $1::int * 2"));
        batch.extend(raw::bind("", &[&i.to_string()]));
        batch.extend(raw::describe_portal());
        batch.extend(raw::execute());
        batch.extend(raw::sync());
    }
    // One error in the middle: only its own segment fails.
    batch.extend(raw::parse("", "select 1/0"));
    batch.extend(raw::bind("", &[]));
    batch.extend(raw::execute());
    batch.extend(raw::sync());
    batch.extend(raw::parse("", "select 'last'"));
    batch.extend(raw::bind("", &[]));
    batch.extend(raw::execute());
    batch.extend(raw::flush());
    r.send(&batch).await;
    let mut rows = Vec::new();
    let mut readies = 0;
    let mut errors = Vec::new();
    while readies < 6 {
        let m = r.next().await.expect("message");
        match m.tag {
            b'D' => rows.push(String::from_utf8_lossy(&m.body[6..]).into_owned()),
            b'Z' => readies += 1,
            b'E' => errors.push(m.code().unwrap_or_default()),
            _ => {}
        }
    }
    assert_eq!(rows, ["0", "2", "4", "6", "8"]);
    assert_eq!(errors, ["22012"]);
    // Flush (no Sync yet) still delivers the last result; the server stays ours.
    loop {
        let m = r.next().await.expect("message");
        if m.tag == b'D' {
            assert_eq!(&m.body[6..], b"last");
        }
        if m.tag == b'C' {
            break;
        }
    }
    r.send(&raw::sync()).await;
    let tail = r.read_until_ready().await;
    assert_eq!(tail.last().map(|m| m.body.clone()), Some(b"I".to_vec()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn function_call_and_terminate() {
    let c = cluster();
    let db = c.create_database("fcall");
    let proxy = TestProxy::for_db(c, &db, "");
    let mut r = Raw::login_trust(proxy.port(), &db).await;
    // FunctionCall: int4abs (oid 1397) with one text-format argument.
    r.send(&raw::function_call(1397, &["-42"])).await;
    let msgs = r.read_until_ready().await;
    let v = msgs
        .iter()
        .find(|m| m.tag == b'V')
        .expect("FunctionCallResponse");
    assert_eq!(&v.body[4..], b"42");
    r.send(&raw::msg(b'X', b"")).await;
    assert!(r.read_to_close().await.is_empty());
}
