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
    proxy_with(c, db, 4, "[stats]\nslow_query_threshold = \"40ms\"")
}

/// tidepool in front of `db` (and the cluster's replica) with a pool of
/// `pool_size` and the `sections` given.
fn proxy_with(c: &harness::Cluster, db: &str, pool_size: u32, sections: &str) -> TestProxy {
    let replica = format!(
        "replicas = [{{ host = \"127.0.0.1\", port = {} }}]",
        c.replica_ports()[0]
    );
    TestProxy::start(&harness::proxy::admin_config(
        c,
        db,
        ADMIN_PW,
        &format!("default_pool_size = {pool_size}"),
        &replica,
        sections,
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

/// A small OTLP/HTTP collector: takes `POST /v1/traces` (protobuf or
/// JSON), keeps every span with its resource's service name, and answers
/// 200 — or, when `hang`, reads requests and never answers.
struct Collector {
    port: u16,
    spans: Received,
    json: ReceivedJson,
    requests: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;

type Received = std::sync::Arc<std::sync::Mutex<Vec<(String, Span)>>>;
type ReceivedJson = std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>;

/// Serves one connection's requests (see [`Collector`]).
async fn serve<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut sock: S,
    hang: bool,
    spans: Received,
    json: ReceivedJson,
    requests: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = Vec::new();
    loop {
        // One request: headers, then Content-Length bytes.
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 8192];
            match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
        assert!(head.starts_with("post /v1/traces "), "{head}");
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map(|v| v.trim().parse().unwrap())
            .unwrap_or(0);
        while buf.len() < head_end + len {
            let mut chunk = [0u8; 8192];
            match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body: Vec<u8> = buf.drain(..head_end + len).skip(head_end).collect();
        requests.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if hang {
            continue;
        }
        if head.contains("content-type: application/json") {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            json.lock().unwrap().push(v);
        } else {
            use prost::Message;
            let req = ExportTraceServiceRequest::decode(&body[..]).unwrap();
            let mut got = spans.lock().unwrap();
            for rs in req.resource_spans {
                let service = rs
                    .resource
                    .iter()
                    .flat_map(|r| r.attributes.iter())
                    .find(|kv| kv.key == "service.name")
                    .and_then(|kv| kv.value.as_ref()?.value.as_ref())
                    .map(|v| match v {
                        AnyValue::StringValue(s) => s.clone(),
                        other => format!("{other:?}"),
                    })
                    .unwrap_or_default();
                for ss in rs.scope_spans {
                    for s in ss.spans {
                        got.push((service.clone(), s));
                    }
                }
            }
        }
        let answer =
            "HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
        if sock.write_all(answer.as_bytes()).await.is_err() {
            return;
        }
    }
}

impl Collector {
    async fn start(hang: bool) -> Collector {
        Self::start_with(hang, None).await
    }

    /// With `tls`: over https.
    async fn start_with(hang: bool, tls: Option<tokio_rustls::TlsAcceptor>) -> Collector {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let c = Collector {
            port,
            spans: Default::default(),
            json: Default::default(),
            requests: Default::default(),
        };
        let (spans, json, requests) = (c.spans.clone(), c.json.clone(), c.requests.clone());
        tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                let (spans, json, requests) = (spans.clone(), json.clone(), requests.clone());
                let tls = tls.clone();
                tokio::spawn(async move {
                    match tls {
                        None => serve(sock, hang, spans, json, requests).await,
                        Some(acceptor) => {
                            if let Ok(s) = acceptor.accept(sock).await {
                                serve(s, hang, spans, json, requests).await
                            }
                        }
                    }
                });
            }
        });
        c
    }

    /// The spans received so far whose trace id is `trace`.
    fn of_trace(&self, trace: u128) -> Vec<Span> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, s)| s.trace_id == trace.to_be_bytes())
            .map(|(_, s)| s.clone())
            .collect()
    }
}

fn attr(s: &Span, key: &str) -> Option<AnyValue> {
    s.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.clone())
}

fn int_attr(s: &Span, key: &str) -> i64 {
    match attr(s, key) {
        Some(AnyValue::IntValue(v)) => v,
        other => panic!("{key}: {other:?} in {s:?}"),
    }
}

fn str_attr(s: &Span, key: &str) -> String {
    match attr(s, key) {
        Some(AnyValue::StringValue(v)) => v,
        other => panic!("{key}: {other:?} in {s:?}"),
    }
}

/// tidepool (pool of 1, a replica) exporting spans to `endpoint`, with the
/// other `[tracing]` lines given.
fn traced_proxy(c: &harness::Cluster, db: &str, endpoint: &str, lines: &[&str]) -> TestProxy {
    let tracing = format!(
        "[tracing]\notlp_endpoint = \"{endpoint}\"\n{}",
        lines.join("\n")
    );
    proxy_with(c, db, 1, &tracing)
}

/// A fresh database, a collector (`hang`: one that never answers) and
/// tidepool exporting to it at `path` with the other `[tracing]` lines.
async fn traced(
    prefix: &str,
    hang: bool,
    path: &str,
    lines: &[&str],
) -> (Collector, TestProxy, String) {
    let c = harness::cluster_with_replica();
    let db = c.create_database(prefix);
    let collector = Collector::start(hang).await;
    let endpoint = format!("http://127.0.0.1:{}{path}", collector.port);
    let p = traced_proxy(c, &db, &endpoint, lines);
    (collector, p, db)
}

/// A collector gets one span per transaction: a child of the client's
/// traceparent (by its sampled flag), with the pool wait, the server time,
/// the backend, the statement's fingerprint and the row count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_spans_are_children_of_the_client_trace() {
    let c = harness::cluster_with_replica();
    let db = c.create_database("traceotlp");
    let owner = harness::connect(&c.app_url(&db)).await.unwrap();
    owner
        .batch_execute(
            "create table items (id int primary key, v int);
             insert into items select g, g from generate_series(1, 10) g",
        )
        .await
        .unwrap();
    c.wait_for_replicas();
    let collector = Collector::start(false).await;
    let p = traced_proxy(
        c,
        &db,
        &format!("http://127.0.0.1:{}", collector.port),
        &["otlp_flush_interval = \"50ms\"", "sample_ratio = 1.0"],
    );
    let holder = p.client(&db).await;
    let waiter = std::sync::Arc::new(p.client(&db).await);

    // The pool's one primary server is held; the traced transaction waits
    // for it, at least 300 ms after it was seen waiting.
    holder
        .batch_execute("begin; update items set v = v where id = 1")
        .await
        .unwrap();
    let tp = traceparent(901);
    let w = waiter.clone();
    let tp2 = tp.clone();
    // As an ORM sends it: one statement per query, the comment on the
    // statement.
    let traced = tokio::spawn(async move {
        w.batch_execute("begin").await?;
        w.batch_execute(&format!(
            "update items set v = v + 1 where id <= 7 /*traceparent='{tp2}'*/"
        ))
        .await?;
        w.batch_execute("commit").await
    });
    harness::wait_until_async(
        "the traced client waits",
        std::time::Duration::from_secs(10),
        || async {
            rows(&p, "SHOW POOLS")
                .await
                .iter()
                .any(|r| r["database"] == db && r["cl_waiting"] == "1")
        },
    )
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    holder.batch_execute("commit").await.unwrap();
    traced.await.unwrap().unwrap();

    // An unsampled parent is not exported; a read goes to the replica (a
    // client that wrote nothing: read-your-writes keeps no one to the
    // primary).
    let reader = p.client(&db).await;
    let replica = c.replica_ports()[0];
    harness::wait_until_async(
        "a read to reach the replica (its first health check)",
        std::time::Duration::from_secs(20),
        || async { harness::server_port(&reader).await.ok() == Some(replica) },
    )
    .await;
    let unsampled = traceparent(902).replace("-01", "-00");
    reader
        .simple_query(&format!("select 1 /*traceparent='{unsampled}'*/"))
        .await
        .unwrap();
    let tp3 = traceparent(903);
    let got = reader
        .simple_query(&format!(
            "select id from items where id <= 3 /*traceparent='{tp3}'*/"
        ))
        .await
        .unwrap();
    let n = got
        .iter()
        .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
        .count();
    assert_eq!(n, 3);

    let trace = |i: u64| 0xabc0_0000_u128 + u128::from(i);
    harness::wait_until(
        "the read's span",
        std::time::Duration::from_secs(20),
        || !collector.of_trace(trace(903)).is_empty(),
    );
    // Spans of one client are exported in order: the unsampled one, sent
    // before, would be here by now.
    assert!(collector.of_trace(trace(902)).is_empty());

    let write = collector.of_trace(trace(901));
    assert_eq!(write.len(), 1, "one span per transaction: {write:?}");
    let w = &write[0];
    assert_eq!(w.parent_span_id, (0x5000u64 + 901).to_be_bytes());
    assert_ne!(w.span_id, (0x5000u64 + 901).to_be_bytes());
    assert_eq!(w.name, "transaction");
    assert_eq!(str_attr(w, "tidepool.backend"), "primary");
    assert_eq!(str_attr(w, "db.namespace"), db);
    assert!(int_attr(w, "tidepool.pool_wait_us") >= 300_000, "{w:?}");
    assert!(int_attr(w, "tidepool.server_us") > 0, "{w:?}");
    assert_eq!(int_attr(w, "db.response.returned_rows"), 7);
    // The UPDATE and the COMMIT (tidepool answered the BEGIN itself and
    // sent it ahead of the UPDATE).
    assert_eq!(int_attr(w, "tidepool.statements"), 2);
    let text = str_attr(w, "db.query.text");
    assert!(text.starts_with("update items set v = v + $1"), "{text}");
    assert!(!text.contains("traceparent"), "{text}");
    // The fingerprint is SHOW QUERIES' for the same statement.
    let queries = rows(&p, "SHOW QUERIES").await;
    let fp = str_attr(w, "tidepool.fingerprint");
    assert!(
        queries
            .iter()
            .any(|r| r["query"].starts_with("update items") && r["fingerprint"] == fp),
        "{fp} not in {queries:?}"
    );
    // The span covers the wait and the server time.
    assert!(
        w.end_time_unix_nano - w.start_time_unix_nano
            >= (int_attr(w, "tidepool.pool_wait_us") as u64) * 1000,
        "{w:?}"
    );

    let read = &collector.of_trace(trace(903))[0];
    assert_eq!(str_attr(read, "tidepool.backend"), "replica 1");
    assert_eq!(int_attr(read, "db.response.returned_rows"), 3);
    assert_eq!(int_attr(read, "tidepool.pool_wait_us"), 0);
    assert!(
        collector
            .spans
            .lock()
            .unwrap()
            .iter()
            .all(|(service, _)| service == "tidepool")
    );
    let metrics = tidepool::http::metrics::render(&p.shared).unwrap();
    assert!(
        counter(&metrics, "tidepool_otlp_spans_total{result=\"exported\"}") >= 2,
        "{metrics}"
    );
}

/// Without a client trace, `sample_ratio` decides: 0 exports nothing of
/// those, 1 everything; http/json carries the same span.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_spans_follow_sample_ratio_and_json_works() {
    let (collector, p, db) = traced(
        "traceratio",
        false,
        "/v1/traces",
        &[
            "otlp_protocol = \"http/json\"",
            "otlp_flush_interval = \"50ms\"",
            "sample_ratio = 0.0",
            "service_name = \"pooler-a\"",
        ],
    )
    .await;
    let client = p.client(&db).await;
    for _ in 0..20 {
        client.simple_query("select 1").await.unwrap();
    }
    let tp = traceparent(911);
    client
        .simple_query(&format!("select 2 /*traceparent='{tp}'*/"))
        .await
        .unwrap();
    // The extended protocol (tokio-postgres prepares a named statement):
    // the trace comes with the statement's Parse.
    let tp = traceparent(912);
    client
        .query(&format!("select $1::int /*traceparent='{tp}'*/"), &[&5i32])
        .await
        .unwrap();
    let spans = || -> Vec<serde_json::Value> {
        collector
            .json
            .lock()
            .unwrap()
            .iter()
            .flat_map(|b| b["resourceSpans"].as_array().unwrap().clone())
            .flat_map(|rs| rs["scopeSpans"].as_array().unwrap().clone())
            .flat_map(|ss| ss["spans"].as_array().unwrap().clone())
            .collect()
    };
    harness::wait_until(
        "the traced spans",
        std::time::Duration::from_secs(20),
        || spans().len() >= 2,
    );
    let bodies = collector.json.lock().unwrap().clone();
    let spans = spans();
    assert_eq!(spans.len(), 2, "only the traced transactions: {bodies:?}");
    for (span, i) in spans.iter().zip([911u64, 912]) {
        assert_eq!(
            span["traceId"],
            format!("{:032x}", 0xabc0_0000_u128 + u128::from(i))
        );
        assert_eq!(span["parentSpanId"], format!("{:016x}", 0x5000 + i));
    }
    let service = &bodies[0]["resourceSpans"][0]["resource"]["attributes"];
    assert!(service.to_string().contains("pooler-a"), "{service}");
}

/// A collector that never answers: transactions go on at full speed, the
/// queue holds `otlp_queue_size` spans, and the rest are dropped and
/// counted; shutdown is not held up beyond `otlp_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_collector_drops_spans_and_blocks_nothing() {
    let (collector, p, db) = traced(
        "tracestuck",
        true,
        "",
        &[
            "otlp_queue_size = 4",
            "otlp_batch_size = 1",
            "otlp_flush_interval = \"1ms\"",
            "otlp_timeout = \"1h\"",
        ],
    )
    .await;
    let client = p.client(&db).await;
    for i in 0..50 {
        client.simple_query(&format!("select {i}")).await.unwrap();
    }
    harness::wait_until(
        "the export hangs",
        std::time::Duration::from_secs(20),
        || collector.requests.load(std::sync::atomic::Ordering::SeqCst) >= 1,
    );
    let metrics = tidepool::http::metrics::render(&p.shared).unwrap();
    let dropped = counter(&metrics, "tidepool_otlp_spans_total{result=\"dropped\"}");
    let queued = counter(&metrics, "tidepool_otlp_queue_spans");
    // One span is in the export that hangs (taken before or after the
    // queue filled), four wait, the rest were dropped.
    assert_eq!(queued, 4, "{metrics}");
    assert!((45..=46).contains(&dropped), "{metrics}");
    assert_eq!(
        counter(&metrics, "tidepool_otlp_spans_total{result=\"exported\"}"),
        0
    );
    drop(client);
}

/// An https collector: its certificate is checked against `otlp_ca_file`;
/// one signed by another CA gets nothing (the export fails, counted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_over_https_checks_the_collector_certificate() {
    let dir = std::env::temp_dir().join(format!("tidepool-otlp-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let ext =
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n";
    harness::certs::make_certs(&dir, "ca", &[("collector", "/CN=collector", ext)]);
    harness::certs::make_certs(&dir, "other-ca", &[]);
    // tidepool's own acceptor: a rustls server with that certificate.
    let (cert, key) = (dir.join("collector.crt"), dir.join("collector.key"));
    let built = tidepool::tls::Acceptor::build(tidepool::tls::AcceptorFiles {
        mode: tidepool::tls::Mode::Require,
        cert: cert.to_str(),
        key: key.to_str(),
        ca: None,
    })
    .unwrap()
    .unwrap();
    let mut config = (*built.config).clone();
    config.alpn_protocols.clear();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let collector = Collector::start_with(false, Some(acceptor)).await;

    let c = harness::cluster_with_replica();
    for (ca, trusted) in [("ca", true), ("other-ca", false)] {
        let db = c.create_database("tracetls");
        let ca_file = format!(
            "otlp_ca_file = \"{}\"",
            dir.join(format!("{ca}.crt")).display()
        );
        let p = traced_proxy(
            c,
            &db,
            &format!("https://127.0.0.1:{}", collector.port),
            &[&ca_file, "otlp_flush_interval = \"50ms\""],
        );
        let client = p.client(&db).await;
        let i = if trusted { 921 } else { 922 };
        let tp = traceparent(i);
        client
            .simple_query(&format!("select 1 /*traceparent='{tp}'*/"))
            .await
            .unwrap();
        let trace = 0xabc0_0000_u128 + u128::from(i);
        if trusted {
            harness::wait_until(
                "the span over https",
                std::time::Duration::from_secs(20),
                || !collector.of_trace(trace).is_empty(),
            );
        } else {
            // Retried, then counted as failed; never received.
            harness::wait_until(
                "the failed export",
                std::time::Duration::from_secs(30),
                || {
                    let m = tidepool::http::metrics::render(&p.shared).unwrap();
                    counter(&m, "tidepool_otlp_spans_total{result=\"failed\"}") == 1
                },
            );
            assert!(collector.of_trace(trace).is_empty());
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
