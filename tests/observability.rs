//! Observability, seen from outside the process: Debian's
//! `prometheus-pgbouncer-exporter` scraping the admin console, `/metrics`
//! parsed by the Python Prometheus client's own parsers, `/readyz` following
//! the primary, and replica health and lag in `/metrics` and the console.
//!
//! Every test runs the real `tidepool` binary (`harness::daemon::Daemon`)
//! because the metrics listener is part of the process, not of `Proxy`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use harness::daemon::{Daemon, free_port, http_get, http_get_with};
use harness::{APP_PASSWORD, APP_USER, Cluster};

/// Deadline for every wait on a condition in this file.
const DEADLINE: Duration = Duration::from_secs(30);
const EXPORTER: &str = "/usr/bin/prometheus-pgbouncer-exporter";
/// The system Python, which has Debian's `python3-prometheus-client`.
const PYTHON: &str = "/usr/bin/python3";
const ADMIN_USER: &str = "admin";
const ADMIN_PASSWORD: &str = "adminpw";

/// A daemon config for `db` on `primary_port`, with users `app` and `admin`
/// (console only), the metrics listener on, and `db_extra` lines in the
/// database's table.
fn daemon_toml(primary_port: u16, db: &str, db_extra: &str) -> String {
    format!(
        r#"
[tidepool]
listen = ["127.0.0.1:{{port}}"]
admin_users = ["{ADMIN_USER}"]

[pool]
default_pool_size = 5
client_login_timeout = "5s"

[databases.{db}]
host = "127.0.0.1"
port = {primary_port}
{db_extra}

[users.{APP_USER}]
password = "{APP_PASSWORD}"

[users.{ADMIN_USER}]
password = "{ADMIN_PASSWORD}"

[metrics]
listen = "127.0.0.1:{{metrics_port}}"
"#
    )
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs `sql` (a psql script on stdin) through tidepool as `app`; panics
/// unless psql succeeds.
fn app_script(d: &Daemon, db: &str, sql: &str) -> String {
    let out = harness::psql(&d.url(APP_USER, APP_PASSWORD, db), &["-q"], Some(sql));
    assert!(
        out.status.success(),
        "psql through tidepool failed on\n{sql}\nstderr: {}\ntidepool log:\n{}",
        text(&out.stderr),
        d.log()
    );
    text(&out.stdout)
}

/// Runs one console command as `admin` with `--csv`: (header, rows).
fn console_csv(d: &Daemon, command: &str) -> (Vec<String>, Vec<Vec<String>>) {
    let out = harness::psql(
        &d.url(ADMIN_USER, ADMIN_PASSWORD, "pgbouncer"),
        &["--csv", "-c", command],
        None,
    );
    assert!(
        out.status.success(),
        "{command} on the console failed: {}\ntidepool log:\n{}",
        text(&out.stderr),
        d.log()
    );
    let mut lines = parse_csv(&text(&out.stdout)).into_iter();
    let header = lines
        .next()
        .unwrap_or_else(|| panic!("{command}: no header"));
    (header, lines.collect())
}

/// Rows of `command` as column-name -> value maps.
fn console_rows(d: &Daemon, command: &str) -> Vec<Vec<(String, String)>> {
    let (header, rows) = console_csv(d, command);
    rows.into_iter()
        .map(|r| header.iter().cloned().zip(r).collect())
        .collect()
}

fn col<'a>(row: &'a [(String, String)], name: &str) -> &'a str {
    row.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no column {name} in {row:?}"))
}

/// Minimal RFC 4180 reader (psql `--csv` quotes fields with `,`, `"` or
/// newlines).
fn parse_csv(s: &str) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let mut row = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') => quoted = true,
            (false, ',') => row.push(std::mem::take(&mut field)),
            (false, '\n') => {
                row.push(std::mem::take(&mut field));
                rows.push(std::mem::take(&mut row));
            }
            (false, '\r') => {}
            (false, c) => field.push(c),
        }
    }
    if !field.is_empty() || !row.is_empty() {
        row.push(field);
        rows.push(row);
    }
    rows
}

/// GET that reports failure instead of panicking: None when nothing
/// listens, the connection breaks, or the reply is empty.
fn try_http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).ok()?;
    let resp = text(&resp);
    let status = resp.split_whitespace().nth(1)?.parse().ok()?;
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((status, body))
}

/// Polls `path` until `accept(status, body)`; panics with the last answer
/// and the daemon's log after [`DEADLINE`].
fn poll_http(d: &Daemon, path: &str, what: &str, accept: impl Fn(u16, &str) -> bool) -> String {
    let deadline = Instant::now() + DEADLINE;
    let mut last = None;
    loop {
        if let Some((status, body)) = try_http_get(d.metrics_port, path) {
            if accept(status, &body) {
                return body;
            }
            last = Some((status, body));
        }
        if Instant::now() >= deadline {
            panic!(
                "timed out after {DEADLINE:?} waiting for {what} on {path}; last answer: {last:?}\ntidepool log:\n{}",
                d.log()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Lines of a text exposition that are samples of `name` (exactly that
/// sample name) and carry every label pair in `labels`.
fn samples<'a>(body: &'a str, name: &str, labels: &[(&str, &str)]) -> Vec<&'a str> {
    body.lines()
        .filter(|l| {
            let Some(rest) = l.strip_prefix(name) else {
                return false;
            };
            (rest.starts_with('{') || rest.starts_with(' '))
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
        })
        .collect()
}

/// The value of a sample line (`name{...} 1.0`).
fn sample_value(line: &str) -> f64 {
    line.rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no value in {line:?}"))
}

// ---------------------------------------------------------------------------
// 1. Debian's prometheus-pgbouncer-exporter against the console

/// The exporter process; killed (and its temp dir removed) when dropped, so
/// it dies on a failed assertion too.
struct Exporter {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Exporter {
    fn start(console_port: u16) -> Exporter {
        assert!(
            Path::new(EXPORTER).exists(),
            "{EXPORTER} is missing: install the Debian package prometheus-pgbouncer-exporter \
             (scripts/test installs it: apt-get install prometheus-pgbouncer-exporter python3-prometheus-client)"
        );
        let port = free_port();
        let dir =
            std::env::temp_dir().join(format!("tidepool-exporter-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("exporter dir");
        let stderr = std::fs::File::create(dir.join("stderr")).expect("exporter stderr file");
        let mut cmd = Command::new(EXPORTER);
        cmd.args([
            "--pgbouncer-host",
            "127.0.0.1",
            "--pgbouncer-port",
            &console_port.to_string(),
            "--pgbouncer-user",
            ADMIN_USER,
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
        ]);
        // configargparse reads these (CLI > env > config file); libpq reads PG*.
        for var in [
            "HOST",
            "PORT",
            "CONFIG",
            "LICENCE_LOCATION",
            "PGBOUNCER_HOST",
            "PGBOUNCER_PORT",
            "PGBOUNCER_USER",
            "PGBOUNCER_DATABASES",
            "PYTHONPATH",
            "PYTHONHOME",
        ] {
            cmd.env_remove(var);
        }
        harness::client_env(&mut cmd, "");
        cmd.env("PGPASSWORD", ADMIN_PASSWORD)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        let child = cmd.spawn().expect("start prometheus-pgbouncer-exporter");
        Exporter { child, port, dir }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr")).unwrap_or_default()
    }

    /// Panics with the exporter's stderr if it has exited.
    fn assert_running(&mut self, d: &Daemon) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "prometheus-pgbouncer-exporter exited ({status}); its stderr:\n{}\ntidepool log:\n{}",
                self.stderr(),
                d.log()
            );
        }
    }

    /// GET /metrics until it answers 200 (the exporter must stay up).
    fn scrape(&mut self, d: &Daemon) -> String {
        let deadline = Instant::now() + DEADLINE;
        let mut last: Option<(u16, String)>;
        loop {
            self.assert_running(d);
            match try_http_get(self.port, "/metrics") {
                Some((200, body)) => return body,
                other => last = other,
            }
            if Instant::now() >= deadline {
                panic!(
                    "exporter's /metrics did not answer 200 within {DEADLINE:?}; last answer: {last:?}\nexporter stderr:\n{}\ntidepool log:\n{}",
                    self.stderr(),
                    d.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn debian_pgbouncer_exporter_reads_the_console() {
    let c = harness::cluster();
    let db = c.create_database("exporter");
    let d = Daemon::start(&daemon_toml(c.primary_port(), &db, ""));

    let queries = 3;
    app_script(
        &d,
        &db,
        "select 1;\nselect g from generate_series(1, 20) g;\nselect now();\n",
    );

    let mut exporter = Exporter::start(d.port);
    let body = exporter.scrape(&d);

    let requests = samples(&body, "pgbouncer_requests_total", &[("database", &db)]);
    assert_eq!(
        requests.len(),
        1,
        "one pgbouncer_requests_total series for {db}:\n{body}"
    );
    assert!(
        sample_value(requests[0]) >= f64::from(queries),
        "pgbouncer_requests_total counts the {queries} queries: {}",
        requests[0]
    );
    assert_eq!(
        samples(
            &body,
            "pgbouncer_active_clients",
            &[("database", &db), ("user", APP_USER)]
        )
        .len(),
        1,
        "pgbouncer_active_clients for ({db}, app):\n{body}"
    );
    let pool_size = samples(&body, "pgbouncer_pool_size", &[("database", &db)]);
    assert_eq!(pool_size.len(), 1, "pgbouncer_pool_size for {db}:\n{body}");
    assert_eq!(sample_value(pool_size[0]), 5.0, "{}", pool_size[0]);
    let used = samples(&body, "pgbouncer_used_clients", &[]);
    assert_eq!(used.len(), 1, "pgbouncer_used_clients:\n{body}");
    assert!(
        sample_value(used[0]) >= 1.0,
        "the exporter's own console session is a used client: {}",
        used[0]
    );

    // The exporter keeps one console connection; a second scrape reuses it.
    app_script(&d, &db, "select 2;\n");
    let second = exporter.scrape(&d);
    let requests2 = samples(&second, "pgbouncer_requests_total", &[("database", &db)]);
    assert_eq!(requests2.len(), 1, "second scrape:\n{second}");
    assert!(
        sample_value(requests2[0]) > sample_value(requests[0]),
        "the second scrape sees the later query: {} then {}",
        requests[0],
        requests2[0]
    );
    exporter.assert_running(&d);
}

// ---------------------------------------------------------------------------
// 2. /metrics parsed by prometheus_client

/// Parses a JSON pair of bodies from stdin (OpenMetrics, classic) with
/// prometheus_client's parser for each and prints, per parser, every family
/// with its type and samples, as JSON.
const PARSE_SCRIPT: &str = r#"
import json, math, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics
from prometheus_client.parser import text_string_to_metric_families as classic
bodies = json.loads(sys.stdin.read())
out = {}
for (name, parse), body in zip((("openmetrics", openmetrics), ("classic", classic)), bodies):
    out[name] = [
        {
            "name": f.name,
            "type": f.type,
            "samples": [
                [s.name, s.labels, s.value if math.isfinite(s.value) else str(s.value)]
                for s in f.samples
            ],
        }
        for f in parse(body)
    ]
print(json.dumps(out))
"#;

struct Family {
    name: String,
    kind: String,
    /// (sample name, labels, value)
    samples: Vec<(String, serde_json::Map<String, serde_json::Value>, f64)>,
}

fn parse_with_prometheus_client(om: &str, classic: &str) -> (Vec<Family>, Vec<Family>) {
    let mut cmd = Command::new(PYTHON);
    cmd.args(["-c", PARSE_SCRIPT])
        .env_remove("PYTHONPATH")
        .env_remove("PYTHONHOME");
    let body = serde_json::to_string(&[om, classic]).unwrap();
    let out = run_with_stdin(cmd, &body);
    assert!(
        out.status.success(),
        "prometheus_client could not parse /metrics: {}\nbody:\n{body}",
        text(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("parser output is JSON");
    let families = |key: &str| -> Vec<Family> {
        v[key]
            .as_array()
            .expect("family list")
            .iter()
            .map(|f| Family {
                name: f["name"].as_str().unwrap().to_owned(),
                kind: f["type"].as_str().unwrap().to_owned(),
                samples: f["samples"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|s| {
                        (
                            s[0].as_str().unwrap().to_owned(),
                            s[1].as_object().unwrap().clone(),
                            s[2].as_f64().unwrap_or(f64::NAN),
                        )
                    })
                    .collect(),
            })
            .collect()
    };
    (families("openmetrics"), families("classic"))
}

/// Runs `cmd` to completion with `stdin` fed to it, capturing its output.
fn run_with_stdin(mut cmd: Command, stdin: &str) -> std::process::Output {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("run /usr/bin/python3");
    let mut pipe = child.stdin.take().expect("stdin");
    let data = stdin.as_bytes().to_vec();
    let writer = std::thread::spawn(move || {
        let _ = pipe.write_all(&data);
    });
    let out = child.wait_with_output().expect("python output");
    let _ = writer.join();
    out
}

fn family<'a>(families: &'a [Family], name: &str) -> &'a Family {
    families.iter().find(|f| f.name == name).unwrap_or_else(|| {
        panic!(
            "no family {name}; families: {:?}",
            families.iter().map(|f| &f.name).collect::<Vec<_>>()
        )
    })
}

/// The values of `f`'s samples named `sample` whose labels include `labels`.
fn values(f: &Family, sample: &str, labels: &[(&str, &str)]) -> Vec<f64> {
    f.samples
        .iter()
        .filter(|(n, l, _)| {
            n == sample
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).and_then(|x| x.as_str()) == Some(*v))
        })
        .map(|(_, _, v)| *v)
        .collect()
}

#[test]
fn metrics_endpoint_parses_as_prometheus_text() {
    let c = harness::cluster();
    let db = c.create_database("metrics");
    let d = Daemon::start(&daemon_toml(c.primary_port(), &db, ""));

    // Four transactions, seven statements; a table name with a `"` in it
    // ends up in query labels.
    let transactions = 4.0;
    app_script(
        &d,
        &db,
        r#"select 1;
select g from generate_series(1, 50) g;
begin;
create table "odd""name" (x int);
insert into "odd""name" values (1), (2);
commit;
select x from "odd""name";
"#,
    );
    let out = harness::psql(
        &d.url(APP_USER, APP_PASSWORD, &db),
        &["-c", "select 1/0"],
        None,
    );
    assert!(!out.status.success(), "select 1/0 must fail");
    assert!(
        text(&out.stderr).contains("division by zero"),
        "{}",
        text(&out.stderr)
    );

    // Prometheus asks for OpenMetrics; promtool and curl get the classic
    // text, which `promtool check metrics` passes without a word (it
    // warned of a missing help text for every counter when it got
    // OpenMetrics).
    let (status, body) = http_get_with(
        d.metrics_port,
        "/metrics",
        "Accept: application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.3\r\n",
    );
    assert_eq!(status, 200, "{body}");
    assert!(
        body.trim_end().ends_with("# EOF"),
        "OpenMetrics ends with # EOF"
    );
    let (status, plain) = http_get(d.metrics_port, "/metrics");
    assert_eq!(status, 200, "{plain}");
    assert!(!plain.contains("# EOF"), "{plain}");
    let mut promtool = Command::new("promtool");
    promtool.args(["check", "metrics"]);
    let checked = run_with_stdin(promtool, &plain);
    assert!(
        checked.status.success() && checked.stdout.is_empty() && checked.stderr.is_empty(),
        "promtool check metrics: {}{}",
        text(&checked.stdout),
        text(&checked.stderr)
    );
    let (om, classic) = parse_with_prometheus_client(&body, &plain);

    for families in [&om, &classic] {
        for name in [
            "tidepool_servers",
            "tidepool_clients",
            "tidepool_pool_health",
            "tidepool_clients_parked",
            "tidepool_memory_allocated_bytes",
            "tidepool_memory_resident_bytes",
        ] {
            assert_eq!(family(families, name).kind, "gauge", "{name}");
        }
        for name in [
            "tidepool_transactions",
            "tidepool_query_calls",
            "tidepool_event_loop_stalls",
        ] {
            assert_eq!(family(families, name).kind, "counter", "{name}");
        }
        assert_eq!(
            family(families, "tidepool_statement_duration_seconds").kind,
            "histogram"
        );
    }

    // The allocator's figures are live: something is allocated, and kept
    // resident.
    let allocated = family(&om, "tidepool_memory_allocated_bytes").samples[0].2;
    let resident = family(&om, "tidepool_memory_resident_bytes").samples[0].2;
    assert!(
        allocated > 0.0 && resident >= allocated,
        "{allocated} {resident}"
    );

    let primary = [("database", db.as_str()), ("role", "primary")];
    let xacts = values(
        family(&om, "tidepool_transactions"),
        "tidepool_transactions_total",
        &primary,
    );
    assert_eq!(xacts.len(), 1, "one transactions series for {db}");
    assert!(
        xacts[0] >= transactions,
        "tidepool_transactions_total {} < {transactions} transactions run",
        xacts[0]
    );
    let errors = values(
        family(&om, "tidepool_statement_errors"),
        "tidepool_statement_errors_total",
        &primary,
    );
    assert!(
        errors.first().is_some_and(|e| *e >= 1.0),
        "the failed statement is counted: {errors:?}"
    );
    let latency = family(&om, "tidepool_statement_duration_seconds");
    let count = values(
        latency,
        "tidepool_statement_duration_seconds_count",
        &primary,
    );
    assert!(
        count.first().is_some_and(|n| *n >= 7.0),
        "every statement is in the histogram: {count:?}"
    );
    let inf = values(
        latency,
        "tidepool_statement_duration_seconds_bucket",
        &[("database", &db), ("le", "+Inf")],
    );
    assert_eq!(inf, count, "the +Inf bucket holds every observation");

    // Per-query series: the multi-row select's rows, the failed query's
    // error, and the label with a quote in it survives the round trip.
    let rows = family(&om, "tidepool_query_rows");
    let series_rows: Vec<_> = rows
        .samples
        .iter()
        .filter(|(_, l, _)| {
            l.get("database").and_then(|v| v.as_str()) == Some(db.as_str())
                && l.get("query")
                    .and_then(|v| v.as_str())
                    .is_some_and(|q| q.contains("generate_series"))
        })
        .collect();
    assert_eq!(
        series_rows.len(),
        1,
        "one normalized generate_series query: {series_rows:?}"
    );
    assert!(
        series_rows[0].2 >= 50.0,
        "50 rows returned: {:?}",
        series_rows[0]
    );
    let query_errors = family(&om, "tidepool_query_errors");
    assert!(
        query_errors.samples.iter().any(|(_, l, v)| {
            l.get("database").and_then(|x| x.as_str()) == Some(db.as_str()) && *v >= 1.0
        }),
        "a query of {db} has an error: {:?}",
        query_errors.samples
    );
    assert!(
        family(&om, "tidepool_query_calls")
            .samples
            .iter()
            .any(|(_, l, _)| l
                .get("query")
                .and_then(|q| q.as_str())
                .is_some_and(|q| q.contains(r#"from "odd""name""#))),
        "the quoted identifier is in a query label, unescaped by the parser: {:?}",
        family(&om, "tidepool_query_calls").samples
    );

    let (status, body) = http_get(d.metrics_port, "/healthz");
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, _) = http_get(d.metrics_port, "/nope");
    assert_eq!(status, 404);
}

// ---------------------------------------------------------------------------
// 3. /readyz follows the primary

#[test]
fn readyz_flips_when_the_primary_stops() {
    let c = Cluster::start_new(0);
    let db = c.create_database("readyz");
    let d = Daemon::start(&daemon_toml(c.primary_port(), &db, ""));
    let target = format!("{db}: primary 127.0.0.1:{}", c.primary_port());

    let body = poll_http(&d, "/readyz", "readiness", |s, _| s == 200);
    assert!(
        body.contains(&format!("{target} reachable")),
        "/readyz names the database: {body}"
    );

    c.stop_primary();
    let body = poll_http(&d, "/readyz", "503 with the primary stopped", |s, _| {
        s == 503
    });
    assert!(
        body.contains(&format!("{target} unreachable")),
        "/readyz names the unreachable database: {body}"
    );
    let (status, _) = http_get(d.metrics_port, "/healthz");
    assert_eq!(status, 200, "liveness does not depend on the primary");

    c.start_primary();
    let body = poll_http(&d, "/readyz", "200 with the primary back", |s, _| s == 200);
    assert!(body.contains(&format!("{target} reachable")), "{body}");
    // And clients get through again.
    assert!(app_script(&d, &db, "select 42;\n").contains("42"));
}

// ---------------------------------------------------------------------------
// 4. Replica health and lag

#[test]
fn replica_health_and_lag_are_exported() {
    let c = harness::cluster_with_replica();
    let db = c.create_database("replica_metrics");
    c.wait_for_replicas();
    let replica_port = c.replica_ports()[0];
    let replica_addr = format!("127.0.0.1:{replica_port}");
    let d = Daemon::start(&daemon_toml(
        c.primary_port(),
        &db,
        &format!(
            "replicas = [{{ host = \"127.0.0.1\", port = {replica_port} }}]\n\
             health_user = \"{APP_USER}\"\nhealth_password = \"{APP_PASSWORD}\""
        ),
    ));
    let replica_name = format!("{db}@replica1");
    let replica = [
        ("database", replica_name.as_str()),
        ("role", "replica"),
        ("backend", replica_addr.as_str()),
    ];

    let body = poll_http(&d, "/metrics", "the replica to be up", |s, body| {
        s == 200
            && samples(body, "tidepool_backend_up", &replica)
                .first()
                .is_some_and(|l| sample_value(l) == 1.0)
    });
    let primary_up = samples(
        &body,
        "tidepool_backend_up",
        &[("database", &db), ("role", "primary")],
    );
    assert_eq!(primary_up.len(), 1, "primary backend series:\n{body}");
    let lag = samples(&body, "tidepool_replica_lag_seconds", &replica);
    assert_eq!(lag.len(), 1, "replica lag series:\n{body}");
    assert!(sample_value(lag[0]) >= 0.0, "{}", lag[0]);
    assert_eq!(
        samples(&body, "tidepool_replica_lag_bytes", &replica).len(),
        1,
        "replica lag bytes series:\n{body}"
    );
    assert!(
        samples(
            &body,
            "tidepool_replica_lag_seconds",
            &[("role", "primary")]
        )
        .is_empty(),
        "no lag series for a primary:\n{body}"
    );

    let replicas = console_rows(&d, "SHOW REPLICAS");
    let row = replicas
        .iter()
        .find(|r| col(r, "database") == replica_name)
        .unwrap_or_else(|| panic!("SHOW REPLICAS has no {replica_name}: {replicas:?}"));
    assert_eq!(col(row, "backend_role"), "replica");
    assert_eq!(col(row, "backend"), replica_addr);
    assert_eq!(col(row, "healthy"), "1", "{row:?}");
    let primary_row = replicas
        .iter()
        .find(|r| col(r, "database") == db)
        .unwrap_or_else(|| panic!("SHOW REPLICAS has no {db}: {replicas:?}"));
    assert_eq!(col(primary_row, "backend_role"), "primary");

    // Reads routed to the replica are counted on its own rows.
    let app = harness::url(d.port, APP_USER, Some(APP_PASSWORD), &db);
    for _ in 0..10 {
        let out = harness::psql(&app, &["-c", "select count(*) from pg_class"], None);
        assert!(out.status.success(), "{out:?}");
    }
    let stats = console_rows(&d, "SHOW STATS");
    let row = stats
        .iter()
        .find(|r| col(r, "database") == replica_name)
        .unwrap_or_else(|| panic!("SHOW STATS has no {replica_name}: {stats:?}"));
    assert_eq!(col(row, "backend_role"), "replica");
    assert!(
        col(row, "total_xact_count").parse::<u64>().unwrap() >= 10,
        "{row:?}"
    );
    let queries = console_rows(&d, "SHOW QUERIES");
    let q = queries
        .iter()
        .find(|r| col(r, "query").contains("pg_class"))
        .unwrap_or_else(|| panic!("{queries:?}"));
    assert_eq!(col(q, "backend_role"), "replica", "{q:?}");

    let databases = console_rows(&d, "SHOW DATABASES");
    let row = databases
        .iter()
        .find(|r| col(r, "name") == replica_name)
        .unwrap_or_else(|| panic!("SHOW DATABASES has no {replica_name}: {databases:?}"));
    assert_eq!(col(row, "backend_role"), "replica");
    assert_eq!(col(row, "port"), replica_port.to_string());
    // Exporters that label by `database` (Debian's) must see distinct rows:
    // a replica's server-side name carries its `@replicaN` suffix.
    assert_eq!(col(row, "database"), replica_name);
    let mut names: Vec<&str> = databases.iter().map(|r| col(r, "database")).collect();
    let n = names.len();
    names.sort_unstable();
    names.dedup();
    assert_eq!(
        names.len(),
        n,
        "duplicate database column values: {databases:?}"
    );
}
