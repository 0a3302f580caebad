//! TCP keepalive on both sides: with `tcp_keepidle = "7s"`, the kernel shows
//! a keepalive timer of at most 7 s (the system default is two hours) on
//! tidepool's socket to its client and on its socket to PostgreSQL (`ss -o`).
//! Every option reaching the socket is a unit test of `protocol::keepalive`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::process::Command;
use std::time::Duration;

use harness::cluster;
use harness::daemon::Daemon;

/// Keepalive timers (seconds left) of established sockets matching `filter`.
fn keepalive_timers(filter: &str) -> Vec<f64> {
    let out = Command::new("ss")
        .args(["-tnoH", "state", "established", filter])
        .output()
        .expect("ss (iproute2)");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split("timer:(keepalive,")
        .skip(1)
        .filter_map(|rest| {
            let t = rest.split(',').next()?;
            // 6.9sec, 850ms, 1min...
            if let Some(s) = t.strip_suffix("sec") {
                s.parse().ok()
            } else if let Some(ms) = t.strip_suffix("ms") {
                ms.parse::<f64>().ok().map(|m| m / 1000.0)
            } else if let Some(m) = t.strip_suffix("min") {
                m.parse::<f64>().ok().map(|m| m * 60.0)
            } else {
                None
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_settings_reach_both_sides() {
    let c = cluster();
    let db = c.create_database("keepalive");
    let d = Daemon::start(&format!(
        "[tidepool]\nlisten = [\"127.0.0.1:{{port}}\"]\ntcp_keepidle = \"7s\"\n\
         tcp_keepintvl = \"3s\"\ntcp_keepcnt = 2\ntcp_user_timeout = \"20s\"\n\
         [databases.{db}]\nhost = \"127.0.0.1\"\nport = {}\n\
         [users.app]\npassword = \"{}\"\n",
        c.primary_port(),
        harness::APP_PASSWORD
    ));
    let client = harness::connect(&d.url("app", harness::APP_PASSWORD, &db))
        .await
        .unwrap();
    client.simple_query("select 1").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let to_client = keepalive_timers(&format!("( sport = :{} )", d.port));
    assert!(
        !to_client.is_empty(),
        "no keepalive timer on the client socket"
    );
    assert!(to_client.iter().all(|s| *s <= 7.0), "{to_client:?}");
    let to_server = keepalive_timers(&format!("( dport = :{} )", c.primary_port()));
    assert!(
        !to_server.is_empty(),
        "no keepalive timer on a server socket"
    );
    assert!(to_server.iter().all(|s| *s <= 7.0), "{to_server:?}");
}
