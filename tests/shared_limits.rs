//! Rate limits shared by two tidepool processes through a real
//! `redis-server` (`rate_limit_backend`): together they admit one limit's
//! worth; with Redis stopped or not answering (SIGSTOP) every query is
//! still answered at once, with each instance limiting to its share; and
//! once Redis is back the limits are shared again. Skipped, saying so,
//! where redis-server is not installed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::time::{Duration, Instant};

use harness::cluster;
use harness::daemon::{Daemon, http_get};
use harness::redis::Redis;

fn config(db: &str, redis: &str) -> String {
    format!(
        r#"
[tidepool]
listen = ["127.0.0.1:{{port}}"]
instances = 2
auth_failure_delay = "0s"
auth_failure_limit = 0

[metrics]
listen = "127.0.0.1:{{metrics_port}}"

[pool]
default_pool_size = 4
client_login_timeout = "5s"

[databases.{db}]
host = "127.0.0.1"
port = {port}

[users.app]
password = "{app_pw}"
rate_limit_tier = "free"

[users.trustuser]
auth_type = "trust"
rate_limit_tier = "fast"

[rate_limits]
rate_limit_wait = "0s"
rate_limit_backend = "{redis}"
rate_limit_backend_timeout = "1s"
[rate_limits.tiers]
free = {{ per_minute = 10, burst = 2 }}
fast = {{ per_second = 1000, burst = 100 }}
"#,
        port = cluster().primary_port(),
        app_pw = harness::APP_PASSWORD,
    )
}

/// The value of the metric line starting with `prefix` (labels included).
fn metric(d: &Daemon, prefix: &str) -> Option<f64> {
    let (_, body) = http_get(d.metrics_port, "/metrics");
    body.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn backend_up(d: &Daemon) -> bool {
    metric(d, "tidepool_rate_limit_backend_up") == Some(1.0)
}

/// Log lines whose message contains `text`.
fn logged(d: &Daemon, text: &str) -> usize {
    d.log_lines()
        .iter()
        .filter(|l| {
            l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(text))
        })
        .count()
}

/// Runs `select 1`: Ok, or the SQLSTATE and message of the error.
async fn select(c: &tokio_postgres::Client) -> Result<(), (String, String)> {
    match tokio::time::timeout(Duration::from_secs(20), c.simple_query("select 1")).await {
        Err(_) => panic!("a query waited on the rate-limit backend"),
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => {
            let d = e.as_db_error().expect("an error from tidepool");
            Err((d.code().code().to_owned(), d.message().to_owned()))
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_a_limit_through_redis_and_go_on_without_it() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    let db = cluster().create_database("shared_limits");
    let toml = config(&db, &redis.url());
    let a = Daemon::start(&toml);
    let b = Daemon::start(&toml);
    for d in [&a, &b] {
        harness::wait_until("connected to redis", Duration::from_secs(20), || {
            backend_up(d)
        });
        let (status, body) = http_get(d.metrics_port, "/readyz");
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("reachable (limits shared)"), "{body}");
    }

    // `free` is 10/min with a burst of 2: three at once, then one every 6 s,
    // for both instances together (each alone would admit three).
    let app = |d: &Daemon| d.url("app", harness::APP_PASSWORD, &db);
    let (ca, cb) = (
        harness::connect(&app(&a)).await.unwrap(),
        harness::connect(&app(&b)).await.unwrap(),
    );
    let started = Instant::now();
    let mut admitted = [0u64; 2];
    for i in 0..20 {
        let c = if i % 2 == 0 { &ca } else { &cb };
        match select(c).await {
            Ok(()) => admitted[i % 2] += 1,
            Err((code, message)) => {
                assert_eq!(code, "53400", "{message}");
                assert!(message.contains("tier free"), "{message}");
            }
        }
    }
    let most = 3 + started.elapsed().as_secs() / 6;
    let total = admitted[0] + admitted[1];
    assert!(
        (3..=most).contains(&total),
        "admitted {admitted:?} between the two, expected 3 (at most {most})"
    );
    assert!(
        redis
            .command(&["EXISTS", "tidepool:ratelimit:user:app"])
            .unwrap()
            .starts_with(":1"),
        "the limiter's state is in redis"
    );
    let trust = |d: &Daemon| harness::url(d.port, "trustuser", None, &db);
    let (ta, tb) = (
        harness::connect(&trust(&a)).await.unwrap(),
        harness::connect(&trust(&b)).await.unwrap(),
    );
    select(&ta).await.unwrap();
    select(&tb).await.unwrap();

    // Redis stops answering without closing its connections: no query waits
    // on it past rate_limit_backend_timeout; decisions are local.
    redis.pause(true);
    for _ in 0..3 {
        select(&ta).await.unwrap();
        select(&tb).await.unwrap();
    }
    for d in [&a, &b] {
        assert!(!backend_up(d), "down once a call timed out");
        assert!(metric(d, "tidepool_rate_limit_backend_errors_total").unwrap() >= 1.0);
        assert!(metric(d, "tidepool_rate_limit_local_decisions_total").unwrap() >= 3.0);
    }
    redis.pause(false);
    for d in [&a, &b] {
        harness::wait_until("reconnected", Duration::from_secs(20), || backend_up(d));
    }

    // Redis stopped: still answered at once; the local share applies (the
    // `free` limit is spent, so app is refused; trustuser's is not).
    redis.stop();
    for _ in 0..5 {
        select(&ta).await.unwrap();
        select(&tb).await.unwrap();
    }
    let (code, message) = select(&ca).await.unwrap_err();
    assert_eq!(code, "53400", "{message}");
    for d in [&a, &b] {
        assert!(!backend_up(d));
        let (status, body) = http_get(d.metrics_port, "/readyz");
        assert_eq!(status, 200, "queries go on: {body}");
        assert!(
            body.contains("unreachable (local limits, share 1/2)"),
            "{body}"
        );
    }

    // Back: shared again, and each change was logged once.
    redis.resume_process();
    for d in [&a, &b] {
        harness::wait_until("reconnected", Duration::from_secs(20), || backend_up(d));
    }
    select(&ta).await.unwrap();
    assert!(
        redis
            .command(&["EXISTS", "tidepool:ratelimit:user:trustuser"])
            .unwrap()
            .starts_with(":1"),
        "decided in redis again"
    );
    for d in [&a, &b] {
        assert_eq!(
            logged(d, "rate-limit backend unreachable"),
            2,
            "{}",
            d.log()
        );
        assert_eq!(
            logged(d, "rate-limit backend reachable again"),
            2,
            "{}",
            d.log()
        );
        assert!(!d.log().contains("password"), "no credentials in the log");
    }
}

/// Through Redis too, a transaction its database's limit refuses costs its
/// user's limit nothing: the user's admission is taken back in Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_by_one_shared_limit_costs_the_others_nothing() {
    let Some(redis) = Redis::start() else {
        return;
    };
    let c = cluster();
    let (db1, db2) = (
        c.create_database("shared_both_a"),
        c.create_database("shared_both_b"),
    );
    let toml = config(&db1, &redis.url())
        .replace("instances = 2", "instances = 1")
        .replace("rate_limit_tier = \"free\"", "rate_limit_tier = \"user\"")
        .replace(
            &format!("[databases.{db1}]\n"),
            &format!("[databases.{db1}]\nrate_limit_tier = \"db\"\n"),
        )
        .replace(
            "[rate_limits.tiers]\n",
            "[rate_limits.tiers]\nuser = { per_minute = 1, burst = 1 }\ndb = { per_minute = 1, burst = 0 }\n",
        )
        + &format!(
            "\n[databases.{db2}]\nhost = \"127.0.0.1\"\nport = {}\n",
            c.primary_port()
        );
    let d = Daemon::start(&toml);
    harness::wait_until("connected to redis", Duration::from_secs(20), || {
        backend_up(&d)
    });
    let app = |db: &str| d.url("app", harness::APP_PASSWORD, db);
    let on1 = harness::connect(&app(&db1)).await.unwrap();
    let on2 = harness::connect(&app(&db2)).await.unwrap();
    // The user has two (burst 1), db1 one.
    select(&on1).await.unwrap();
    let (code, message) = select(&on1).await.unwrap_err();
    assert_eq!(code, "53400", "{message}");
    assert!(message.contains("tier db"), "{message}");
    // The user's second is still there, for db2.
    select(&on2).await.unwrap();
    let (code, message) = select(&on2).await.unwrap_err();
    assert!(message.contains("tier user"), "{code} {message}");
    assert!(backend_up(&d), "decided in redis throughout");
    assert_eq!(
        metric(&d, "tidepool_rate_limit_local_decisions_total"),
        Some(0.0)
    );
}
