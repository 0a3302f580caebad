//! Limits that protect the database (issue 20, in progress):
//! `client_idle_timeout` closes a client idle outside a transaction, parked
//! or not, with PostgreSQL's idle-session code; a client idle inside a
//! transaction is left to `idle_transaction_timeout`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::time::{Duration, Instant};

use harness::raw::{self, Raw};
use harness::{TestProxy, cluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_clients_are_closed_after_client_idle_timeout() {
    let c = cluster();
    let db = c.create_database("client_idle");
    for parking in ["\"0s\"", "\"200ms\""] {
        let proxy = TestProxy::for_db(
            c,
            &db,
            &format!("client_idle_timeout = \"1s\"\npark_idle_clients_after = {parking}"),
        );
        let mut idle = Raw::login_trust(proxy.port(), &db).await;
        idle.send(&raw::query("select 1")).await;
        idle.read_until_ready().await;
        let mut in_tx = Raw::login_trust(proxy.port(), &db).await;
        in_tx.send(&raw::query("begin")).await;
        in_tx.read_until_ready().await;

        let started = Instant::now();
        let msgs = idle.read_to_close().await;
        let fatal = msgs
            .iter()
            .find(|m| m.tag == b'E')
            .expect("an error before the close");
        assert_eq!(fatal.code().as_deref(), Some("57P05"), "parking {parking}");
        assert!(
            fatal.message().unwrap().contains("client_idle_timeout"),
            "{:?}",
            fatal.message()
        );
        assert!(started.elapsed() >= Duration::from_millis(500));

        // Inside a transaction the client stays, past the same time.
        tokio::time::sleep(Duration::from_millis(800)).await;
        in_tx.send(&raw::query("select 2")).await;
        let answer = in_tx.read_until_ready().await;
        assert!(answer.iter().any(|m| m.tag == b'D'), "{answer:?}");
    }
}
