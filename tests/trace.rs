//! Trace correlation: sqlcommenter comments (`/*traceparent='00-…'*/`,
//! leading or trailing) are kept out of every cache key and statistic, so
//! a comment unique to each query leaves one row in SHOW QUERIES and no
//! extra parse in the classifier; the trace and span ids of a slow
//! statement are in SHOW SLOW_QUERIES.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::collections::HashMap;

use harness::TestProxy;

const ADMIN_PW: &str = "adminpw";

fn proxy(c: &harness::Cluster, db: &str) -> TestProxy {
    TestProxy::start(&format!(
        r#"
[tidepool]
listen = ["127.0.0.1:0"]
admin_users = ["admin"]

[pool]
default_pool_size = 4

[stats]
slow_query_threshold = "40ms"

[databases.{db}]
host = "127.0.0.1"
port = {port}
replicas = [{{ host = "127.0.0.1", port = {replica} }}]

[users.app]
password = "{app_pw}"

[users.admin]
password = "{ADMIN_PW}"
"#,
        port = c.primary_port(),
        replica = c.replica_ports()[0],
        app_pw = harness::APP_PASSWORD,
    ))
}

fn traceparent(i: u64) -> String {
    format!(
        "00-{:032x}-{:016x}-01",
        0xabc0_0000_u128 + u128::from(i),
        0x5000 + i
    )
}

fn counter(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in /metrics"))
}

async fn rows(p: &TestProxy, cmd: &str) -> Vec<HashMap<String, String>> {
    harness::console(&p.url_as("admin", Some(ADMIN_PW), "pgbouncer"), cmd).await
}

/// 10,000 statements of one shape, each with its own traceparent comment
/// (trailing, and leading), other literals each time: one SHOW QUERIES
/// row, and the classifier parses the shape once at most per form.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unique_trace_comments_leave_one_row_and_no_parses() {
    let c = harness::cluster_with_replica();
    let db = c.create_database("tracecache");
    let p = proxy(c, &db);
    let client = p.client(&db).await;
    let owner = harness::connect(&c.app_url(&db)).await.unwrap();
    owner
        .batch_execute("create table orders (id int primary key, total int)")
        .await
        .unwrap();
    let misses = || {
        counter(
            &tidepool::http::metrics::render(&p.shared).unwrap(),
            "tidepool_classifier_cache_misses_total",
        )
    };
    let warm = format!(
        "select total from orders where id = 0 /*application='shop',traceparent='{}'*/",
        traceparent(0)
    );
    client.simple_query(&warm).await.unwrap();
    let before = misses();
    for i in 1..=10_000u64 {
        let sql = if i % 2 == 0 {
            format!(
                "select total from orders where id = {i} /*application='shop',traceparent='{}'*/",
                traceparent(i)
            )
        } else {
            format!(
                "/*traceparent='{}'*/ select total from orders where id = {i}",
                traceparent(i)
            )
        };
        client.simple_query(&sql).await.unwrap();
    }
    // The leading form is another text for the client's memo but the same
    // key for the classifier: at most one more parse, not 10,000.
    let parsed = misses() - before;
    assert!(parsed <= 1, "{parsed} parses for one shape");
    let queries: Vec<_> = rows(&p, "SHOW QUERIES")
        .await
        .into_iter()
        .filter(|r| r["query"].contains("orders"))
        .collect();
    assert_eq!(queries.len(), 1, "{queries:?}");
    assert_eq!(queries[0]["calls"], "10001", "{queries:?}");
}

/// A slow statement's trace and span ids are in SHOW SLOW_QUERIES.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_statement_carries_its_trace_ids() {
    let c = harness::cluster_with_replica();
    let db = c.create_database("traceslow");
    let p = proxy(c, &db);
    let client = p.client(&db).await;
    let tp = traceparent(77);
    client
        .simple_query(&format!(
            "select pg_sleep(0.1) /*controller='orders',traceparent='{tp}'*/"
        ))
        .await
        .unwrap();
    // Extended protocol, unnamed statement: the comment is in the Parse.
    let tp2 = traceparent(78);
    client
        .query(
            &format!("select pg_sleep(0.1), $1::int /*traceparent='{tp2}'*/"),
            &[&5i32],
        )
        .await
        .unwrap();
    let slow = rows(&p, "SHOW SLOW_QUERIES").await;
    let ids: Vec<(String, String)> = slow
        .iter()
        .filter(|r| r["query"].contains("pg_sleep"))
        .map(|r| (r["trace_id"].clone(), r["span_id"].clone()))
        .collect();
    assert!(
        ids.contains(&(
            format!("{:032x}", 0xabc0_0000_u128 + 77),
            format!("{:016x}", 0x5000 + 77)
        )),
        "{slow:?}"
    );
    assert!(
        ids.contains(&(
            format!("{:032x}", 0xabc0_0000_u128 + 78),
            format!("{:016x}", 0x5000 + 78)
        )),
        "{slow:?}"
    );
    // The masked text carries no comment.
    assert!(
        slow.iter().all(|r| !r["query"].contains("traceparent")),
        "{slow:?}"
    );
}

/// Named statements that differ only in their trace comment share one
/// server statement per server: the server parses the shape once per
/// connection, not once per comment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_with_unique_trace_comments_share_server_statements() {
    let c = harness::cluster_with_replica();
    let db = c.create_database("traceprep");
    let p = proxy(c, &db);
    let owner = harness::connect(&c.app_url(&db)).await.unwrap();
    owner
        .batch_execute("create table orders (id int primary key, total int); insert into orders values (1, 10)")
        .await
        .unwrap();
    let client = p.client(&db).await;
    for i in 0..50u64 {
        let st = client
            .prepare(&format!(
                "select total from orders where id = $1 /*traceparent='{}'*/",
                traceparent(i)
            ))
            .await
            .unwrap();
        let row = client.query_one(&st, &[&1i32]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), 10);
    }
    let stats = rows(&p, "SHOW STATS").await;
    let parses: u64 = stats
        .iter()
        .filter(|r| r["database"].starts_with(&db))
        .map(|r| r["total_server_parse_count"].parse::<u64>().unwrap())
        .sum();
    assert!(
        parses <= 8,
        "{parses} server parses for one shape: {stats:?}"
    );
}
