//! tidepool's memory stays within its config whatever clients send,
//! measured as the real process's peak resident set (VmHWM): a 2 GiB
//! message is refused from its header, and many large messages at once are
//! held to `max_client_buffer_bytes` (the rest get 53200), not the sum of
//! what was sent.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::time::Duration;

use harness::cluster;
use harness::daemon::Daemon;
use harness::raw::{self, Raw};
use tokio::io::AsyncWriteExt;

const MIB: u64 = 1 << 20;

fn config(db: &str, tidepool_extra: &str) -> String {
    format!(
        "[tidepool]\nlisten = [\"127.0.0.1:{{port}}\"]\n{tidepool_extra}\n\
         [pool]\ndefault_pool_size = 4\n\
         [databases.{db}]\nhost = \"127.0.0.1\"\nport = {}\n\
         [users.trustuser]\nauth_type = \"trust\"\n",
        cluster().primary_port()
    )
}

/// A field of /proc/PID/status in bytes (VmRSS, VmHWM).
fn status_bytes(pid: i32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = s
        .lines()
        .find(|l| l.starts_with(&format!("{field}:")))
        .unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

/// Sends a message header announcing `len` bytes, then up to `send` bytes
/// of body (stopping when tidepool closes), and returns what it answered.
async fn announce(port: u16, db: &str, tag: u8, len: i32, send: usize) -> Vec<raw::Msg> {
    let mut c = Raw::login_trust(port, db).await;
    let mut head = vec![tag];
    head.extend(len.to_be_bytes());
    head.extend(b"select length('");
    c.send(&head).await;
    let chunk = vec![b'x'; 1 << 20];
    let mut sent = 0;
    while sent < send {
        let n = chunk.len().min(send - sent);
        if c.stream.write_all(&chunk[..n]).await.is_err() {
            break;
        }
        sent += n;
    }
    c.read_to_close().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_gib_message_is_refused_without_memory_growth() {
    let db = cluster().create_database("two_gib");
    let d = Daemon::start(&config(&db, ""));
    // Warm up: a login and a query.
    let mut warm = Raw::login_trust(d.port, &db).await;
    warm.send(&raw::query("select 1")).await;
    warm.read_until_ready().await;
    let base = status_bytes(d.pid(), "VmRSS");

    // 2 GiB announced (the largest length word), 256 MiB actually sent.
    let msgs = announce(d.port, &db, b'Q', i32::MAX, 256 << 20).await;
    let fatal = msgs.iter().find(|m| m.tag == b'E').expect("an error");
    assert_eq!(fatal.code().as_deref(), Some("08P01"));
    assert!(
        fatal
            .message()
            .unwrap()
            .contains("max_message_size (67108864 bytes)"),
        "{:?}",
        fatal.message()
    );
    let peak = status_bytes(d.pid(), "VmHWM");
    eprintln!("peak RSS {} MiB, {} MiB before", peak / MIB, base / MIB);
    assert!(
        peak < base + 16 * MIB,
        "peak RSS {} MiB, {} MiB before",
        peak / MIB,
        base / MIB
    );
    // The others go on.
    warm.send(&raw::query("select 2")).await;
    assert!(warm.read_until_ready().await.iter().any(|m| m.tag == b'D'));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_large_messages_at_once_stay_within_max_client_buffer_bytes() {
    let db = cluster().create_database("many_large");
    let bound = 48 * MIB;
    let d = Daemon::start(&config(&db, &format!("max_client_buffer_bytes = {bound}")));
    let mut warm = Raw::login_trust(d.port, &db).await;
    warm.send(&raw::query("select 1")).await;
    warm.read_until_ready().await;
    let base = status_bytes(d.pid(), "VmRSS");

    // Eight clients each send a 20 MiB query (160 MiB in all, each under
    // max_message_size) at once: at most two fit the bound at a time.
    let len = 20 << 20;
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let db = db.clone();
            let port = d.port;
            tokio::spawn(async move {
                let mut c = Raw::login_trust(port, &db).await;
                let body = format!("select length('{}')\0", "x".repeat(len - 20));
                let mut msg = vec![b'Q'];
                msg.extend(((body.len() + 4) as i32).to_be_bytes());
                msg.extend(body.as_bytes());
                if c.stream.write_all(&msg).await.is_err() {
                    return Err("53200".to_owned());
                }
                let msgs = c.read_until_ready_or_close().await;
                match msgs.iter().find(|m| m.tag == b'E') {
                    Some(e) => Err(e.code().unwrap()),
                    None => Ok(()),
                }
            })
        })
        .collect();
    let (mut served, mut refused) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(()) => served += 1,
            Err(code) => {
                assert_eq!(code, "53200");
                refused += 1;
            }
        }
    }
    assert!(served >= 1, "served {served}, refused {refused}");
    eprintln!("served {served}, refused {refused}");
    let peak = status_bytes(d.pid(), "VmHWM");
    eprintln!("peak RSS {} MiB, {} MiB before", peak / MIB, base / MIB);
    // The bound, and what is not a client's buffer (the answer, allocator
    // slack): well under the 160 MiB sent.
    assert!(
        peak < base + bound + 32 * MIB,
        "peak RSS {} MiB, {} MiB before, bound {} MiB",
        peak / MIB,
        base / MIB,
        bound / MIB
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    warm.send(&raw::query("select 2")).await;
    assert!(warm.read_until_ready().await.iter().any(|m| m.tag == b'D'));
}
