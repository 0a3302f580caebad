//! What the current upstream exporter (prometheus-community's
//! `pgbouncer_exporter`, collector.go) reads from the console, checked
//! column by column, since it cannot be installed here (no Go toolchain or
//! module proxy): for SHOW DATABASES, STATS_TOTALS and POOLS every column it
//! maps exists and every metric column parses as a number (or is NULL,
//! which it takes as NaN); SHOW LISTS has two columns and every list it
//! exports; SHOW CONFIG has four columns with numeric `max_client_conn` and
//! `max_user_connections`; SHOW STATS (its ping) and SHOW VERSION answer.
//! A missing or renamed column would silently drop a metric there.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::collections::HashMap;

use harness::{TestProxy, cluster};
use tokio_postgres::SimpleQueryMessage;

/// (column, is a metric) per namespace, as collector.go's metricMaps.
const DATABASES: &[(&str, bool)] = &[
    ("name", false),
    ("host", false),
    ("port", false),
    ("database", false),
    ("force_user", false),
    ("pool_size", true),
    ("reserve_pool", true),
    ("pool_mode", false),
    ("max_connections", true),
    ("current_connections", true),
    ("paused", true),
    ("disabled", true),
];
const STATS_TOTALS: &[(&str, bool)] = &[
    ("database", false),
    ("query_count", true),
    ("query_time", true),
    ("bytes_received", true),
    ("requests", true),
    ("bytes_sent", true),
    ("wait_time", true),
    ("xact_count", true),
    ("xact_time", true),
    ("client_parse_count", true),
    ("server_parse_count", true),
    ("bind_count", true),
];
const POOLS: &[(&str, bool)] = &[
    ("database", false),
    ("user", false),
    ("cl_active", true),
    ("cl_active_cancel_req", true),
    ("cl_waiting", true),
    ("cl_waiting_cancel_req", true),
    ("sv_active", true),
    ("sv_active_cancel", true),
    ("sv_being_canceled", true),
    ("sv_idle", true),
    ("sv_used", true),
    ("sv_tested", true),
    ("sv_login", true),
    ("maxwait", true),
];
const LISTS: &[&str] = &[
    "databases",
    "users",
    "pools",
    "free_clients",
    "used_clients",
    "login_clients",
    "free_servers",
    "used_servers",
    "dns_names",
    "dns_zones",
    "dns_queries",
];

/// (column names, rows as name → value) of a console command.
async fn show(
    c: &tokio_postgres::Client,
    cmd: &str,
) -> (Vec<String>, Vec<HashMap<String, Option<String>>>) {
    let mut names = Vec::new();
    let mut rows = Vec::new();
    for m in c.simple_query(cmd).await.unwrap() {
        match m {
            SimpleQueryMessage::RowDescription(cols) => {
                names = cols.iter().map(|c| c.name().to_owned()).collect();
            }
            SimpleQueryMessage::Row(r) => {
                let cols: Vec<String> = r.columns().iter().map(|c| c.name().to_owned()).collect();
                if names.is_empty() {
                    names = cols.clone();
                }
                rows.push(
                    cols.iter()
                        .enumerate()
                        .map(|(i, n)| (n.clone(), r.get(i).map(str::to_owned)))
                        .collect(),
                );
            }
            _ => {}
        }
    }
    (names, rows)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_exporter_finds_every_column_it_maps() {
    let c = cluster();
    let db = c.create_database("exporter_columns");
    let proxy = TestProxy::start(
        &harness::proxy::config_toml(c, &db, "", "")
            .replace("[tidepool]\n", "[tidepool]\nstats_users = [\"app\"]\n"),
    );
    let app = proxy.client(&db).await;
    app.simple_query("select 1").await.unwrap();
    let console = harness::connect(&proxy.url_as("app", Some(harness::APP_PASSWORD), "pgbouncer"))
        .await
        .unwrap();

    // Its ping, and its version row.
    assert!(!show(&console, "SHOW STATS;").await.1.is_empty());
    assert_eq!(show(&console, "SHOW VERSION;").await.1.len(), 1);

    for (cmd, mapping) in [
        ("SHOW DATABASES;", DATABASES),
        ("SHOW STATS_TOTALS;", STATS_TOTALS),
        ("SHOW POOLS;", POOLS),
    ] {
        let (names, rows) = show(&console, cmd).await;
        assert!(!rows.is_empty(), "{cmd} has no rows");
        for (col, metric) in mapping {
            assert!(
                names.iter().any(|n| n == col),
                "{cmd} lacks {col}: {names:?}"
            );
            if *metric {
                for row in &rows {
                    if let Some(v) = &row[*col] {
                        assert!(
                            v.parse::<f64>().is_ok(),
                            "{cmd} {col} = {v:?} is not a number"
                        );
                    }
                }
            }
        }
    }

    let (names, rows) = show(&console, "SHOW LISTS;").await;
    assert_eq!(names.len(), 2, "{names:?}");
    for list in LISTS {
        let row = rows
            .iter()
            .find(|r| r["list"].as_deref() == Some(*list))
            .unwrap_or_else(|| panic!("SHOW LISTS lacks {list}"));
        assert!(row["items"].as_deref().unwrap().parse::<f64>().is_ok());
    }

    let (names, rows) = show(&console, "SHOW CONFIG;").await;
    assert_eq!(names.len(), 4, "{names:?}");
    for key in ["max_client_conn", "max_user_connections"] {
        let row = rows
            .iter()
            .find(|r| r["key"].as_deref() == Some(key))
            .unwrap_or_else(|| panic!("SHOW CONFIG lacks {key}"));
        assert!(
            row["value"].as_deref().unwrap().parse::<f64>().is_ok(),
            "{row:?}"
        );
    }
}
