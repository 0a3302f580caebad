//! Failed-login throttling: 50 bad passwords from one address are delayed,
//! then refused before any password exchange (even the right password) for
//! the cool-down; meanwhile another address logs in as usual, never refused
//! and never delayed; the console and /metrics count it all.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::time::{Duration, Instant};

use harness::login_from;
use harness::{TestProxy, cluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_logins_from_one_address_are_throttled_and_others_are_not() {
    let c = cluster();
    let db = c.create_database("throttle");
    let toml = harness::proxy::config_toml(c, &db, "", "")
        .replace("auth_failure_delay = \"0s\"\n", "")
        .replace("auth_failure_limit = 0\n", "")
        .replace(
            "[tidepool]\n",
            "[tidepool]\nstats_users = [\"app\"]\nauth_failure_delay = \"20ms\"\n\
             auth_failure_max_delay = \"160ms\"\nauth_failure_limit = 10\n\
             auth_failure_cooldown = \"10m\"\n",
        );
    let proxy = TestProxy::start(&toml);
    let port = proxy.port();
    let pw = harness::APP_PASSWORD;

    // The flood: 50 bad passwords from 127.0.0.2, one after the other.
    let flood_db = db.clone();
    let flood = tokio::spawn(async move {
        let mut answers = Vec::new();
        for _ in 0..50 {
            let started = Instant::now();
            let r = login_from("127.0.0.2", port, "app", "wrong", &flood_db).await;
            answers.push((r.err().unwrap(), started.elapsed()));
        }
        answers
    });
    // Meanwhile, good logins from 127.0.0.1 all succeed.
    let mut good = 0;
    while !flood.is_finished() || good < 10 {
        let c = login_from("127.0.0.1", port, "app", pw, &db).await;
        c.unwrap().simple_query("select 1").await.unwrap();
        good += 1;
    }
    let answers = flood.await.unwrap();
    let failed: Vec<_> = answers.iter().filter(|(e, _)| e.0 == "28P01").collect();
    let refused: Vec<_> = answers.iter().filter(|(e, _)| e.0 == "28000").collect();
    assert_eq!(failed.len(), 10, "{answers:?}");
    assert_eq!(refused.len(), 40, "{answers:?}");
    assert!(
        refused[0].0.1.contains("too many failed logins"),
        "{:?}",
        refused[0]
    );
    // Each failure was answered after its delay: 20, 40, 80, then 160 ms.
    for (i, (_, took)) in failed.iter().enumerate() {
        let least = Duration::from_millis(20 << i.min(3));
        assert!(*took >= least, "failure {i} answered after {took:?}");
    }

    // The right password from the refused address is refused too, before
    // any exchange; the other address is not affected.
    let e = login_from("127.0.0.2", port, "app", pw, &db)
        .await
        .err()
        .unwrap();
    assert_eq!(e.0, "28000", "{e:?}");
    assert!(login_from("127.0.0.1", port, "app", pw, &db).await.is_ok());

    // The console lists the address; /metrics counts.
    let console = proxy.url_as("app", Some(pw), "pgbouncer");
    let rows = harness::console(&console, "SHOW AUTH_FAILURES").await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["address"], "127.0.0.2");
    assert_eq!(rows[0]["failures"], "10");
    assert_eq!(rows[0]["blocked"], "yes");
    let metrics = tidepool::http::metrics::render(&proxy.shared).unwrap();
    for line in [
        "tidepool_login_failures_total{} 10",
        "tidepool_logins_refused_total{} 41",
        "tidepool_login_blocked_addresses{} 1",
    ] {
        assert!(metrics.contains(line), "{line} not in:\n{metrics}");
    }
}
