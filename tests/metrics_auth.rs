//! The metrics endpoint's protection: a bearer token or basic
//! authentication for `/metrics` and `/readyz` (`/healthz` stays open for
//! probes), secrets never shown by SHOW CONFIG, and a warning at start when
//! the endpoint listens beyond this machine without authentication.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::io::{Read, Write};

use harness::cluster;
use harness::daemon::Daemon;

/// GET `path` with extra header lines; (status, body).
fn get(port: u16, path: &str, headers: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nhost: x\r\n{headers}\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, body)
}

fn config(c: &harness::Cluster, db: &str, metrics: &str) -> String {
    format!(
        "[tidepool]\nlisten = [\"127.0.0.1:{{port}}\"]\nstats_users = [\"app\"]\n\
         [metrics]\n{metrics}\n\
         [databases.{db}]\nhost = \"127.0.0.1\"\nport = {}\n\
         [users.app]\npassword = \"{}\"\n",
        c.primary_port(),
        harness::APP_PASSWORD
    )
}

#[test]
fn metrics_need_the_token_or_the_password_when_one_is_set() {
    let c = cluster();
    let db = c.create_database("metrics_auth");
    let d = Daemon::start(&config(
        c,
        &db,
        "listen = \"127.0.0.1:{metrics_port}\"\nauth_token = \"t0ken\"\n\
         auth_user = \"prom\"\nauth_password = \"pa:ss\"",
    ));
    let p = d.metrics_port;
    assert_eq!(get(p, "/metrics", "").0, 401);
    assert_eq!(get(p, "/readyz", "").0, 401);
    assert_eq!(get(p, "/metrics", "authorization: Bearer nope\r\n").0, 401);
    assert_eq!(get(p, "/healthz", "").0, 200, "probes need no secret");
    let (status, body) = get(p, "/metrics", "Authorization: Bearer t0ken\r\n");
    assert_eq!(status, 200);
    assert!(body.contains("tidepool_info"), "{body}");
    // prom:pa:ss in base64.
    assert_eq!(
        get(p, "/metrics", "authorization: Basic cHJvbTpwYTpzcw==\r\n").0,
        200
    );
    assert_eq!(
        get(p, "/metrics", "authorization: Basic cHJvbTp3cm9uZw==\r\n").0,
        401
    );

    // SHOW CONFIG says a secret is set, never what it is.
    let url = d.url("app", harness::APP_PASSWORD, "pgbouncer");
    let out = harness::psql(&url, &["-At", "-c", "show config"], None);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("metrics_auth_token|(set)"), "{text}");
    assert!(!text.contains("t0ken") && !text.contains("pa:ss"), "{text}");
}

#[test]
fn a_public_endpoint_without_authentication_is_warned_about() {
    let c = cluster();
    let db = c.create_database("metrics_public");
    let d = Daemon::start(&config(c, &db, "listen = \"0.0.0.0:{metrics_port}\""));
    harness::wait_until("the warning", std::time::Duration::from_secs(10), || {
        d.log().contains("without authentication")
    });
    assert_eq!(get(d.metrics_port, "/metrics", "").0, 200);

    let quiet = Daemon::start(&config(c, &db, "listen = \"127.0.0.1:{metrics_port}\""));
    assert_eq!(get(quiet.metrics_port, "/healthz", "").0, 200);
    assert!(
        !quiet.log().contains("without authentication"),
        "{}",
        quiet.log()
    );
}
