//! Every frontend message that carries client data, at sizes straddling
//! every buffer threshold tidepool has (and PostgreSQL's own limits), sent
//! in one write, split at random byte boundaries and one byte at a time,
//! gets the answer PostgreSQL itself gives to the same bytes. Just over
//! `max_message_size`, a message gets a FATAL 08P01 naming the limit and
//! closes only that client.
//!
//! Thresholds: tidepool's read buffers start at 896 bytes (then 1,792,
//! 3,584, ...; 1 KiB until 2026-12), are kept up to 4 KiB
//! while idle and grow in steps of up to 16 KiB; PostgreSQL reads in 8 KiB
//! and limits startup packets to 10,000 bytes after the length word, SASL
//! messages to a length word of 1,024 and messages without client data
//! (Describe, Close, Execute, Sync, ...) to one of 10,000.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use bytes::{BufMut, BytesMut};
use harness::TestProxy;
use harness::raw;
use harness::wire::{Split, normalize, read_answer, write_split};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// `max_message_size` in the proxy under test.
const MAX: usize = 2 << 20;

/// The sizes tried: every threshold ± 1, and PostgreSQL's own limits.
const SIZES: &[usize] = &[
    0,
    1,
    895,
    896,
    897,
    1023,
    1024,
    1025,
    1791,
    1792,
    1793,
    4095,
    4096,
    4097,
    8191,
    8192,
    8193,
    9_999,
    10_000,
    10_001,
    10_004,
    10_005,
    16_383,
    16_384,
    16_385,
    65_535,
    65_536,
    65_537,
    1 << 20,
    MAX - 1,
    MAX,
    MAX + 1,
];

/// Messages up to this size are also sent one byte per write.
const BYTEWISE_UP_TO: usize = 8193;

/// How an authentication step ended: the exchange goes on, or a FATAL error
/// ends the connection.
fn outcome(answer: &[String]) -> &'static str {
    match answer {
        [one] if one.starts_with("R(") => "continues",
        [err, closed] if err.contains("S=FATAL") && closed == "!(closed)" => "refused",
        _ => "other",
    }
}

/// One exchange: `setup` messages (sent whole), then `bytes` split as asked,
/// then the answer. `header_only`: the peer is expected to refuse the
/// message from its length word, so only that goes out (sending the body to
/// a socket the peer closed would reset the connection and lose its error).
struct Exchange {
    login: Login,
    setup: Vec<u8>,
    bytes: Vec<u8>,
    header_only: usize,
}

#[derive(Clone, Copy)]
enum Login {
    /// Logged in as the trust user; answers to `bytes` read to ReadyForQuery.
    Trust,
    /// Nothing sent yet: `bytes` is the startup packet itself.
    None,
    /// Startup as `app` (SCRAM) sent; `bytes` answer the SASL request.
    Sasl,
}

async fn run(port: u16, db: &str, x: &Exchange, split: Split) -> Vec<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let mut buf = BytesMut::new();
    match x.login {
        Login::Trust => {
            stream
                .write_all(&raw::startup(harness::TRUST_USER, db))
                .await
                .unwrap();
            let m = read_answer(&mut stream, &mut buf, false).await;
            assert_eq!(m.last().map(|m| m.tag), Some(b'Z'), "{:?}", normalize(&m));
        }
        Login::Sasl => {
            stream
                .write_all(&raw::startup(harness::APP_USER, db))
                .await
                .unwrap();
            let m = read_answer(&mut stream, &mut buf, true).await;
            assert_eq!(
                normalize(&m).last().unwrap(),
                "R(\0\0\0\nSCRAM-SHA-256\0\0)"
            );
        }
        Login::None => {}
    }
    if !x.setup.is_empty() {
        stream.write_all(&x.setup).await.unwrap();
        if matches!(x.login, Login::Sasl) {
            // The answer to the client-first message comes first.
            let m = read_answer(&mut stream, &mut buf, true).await;
            assert_eq!(normalize(&m).last().unwrap(), "R(SASLContinue)");
        }
    }
    let out = if x.header_only > 0 {
        &x.bytes[..x.header_only]
    } else {
        &x.bytes[..]
    };
    // A refused write (the peer closed early) shows in the answer.
    let _ = write_split(&mut stream, out, split).await;
    let stop_at_auth = matches!(x.login, Login::Sasl | Login::None);
    let mut answer = read_answer(&mut stream, &mut buf, stop_at_auth).await;
    if matches!(x.login, Login::None | Login::Sasl) {
        // What matters in the startup phase is how it ends.
        answer.retain(|m| m.tag != b'N');
    }
    normalize(&answer)
}

/// A frontend message.
fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    raw::msg(tag, body)
}

fn cstr(b: &mut BytesMut, s: &[u8]) {
    b.put_slice(s);
    b.put_u8(0);
}

/// `n` bytes of client data: a message of total size `n` when `n` is at
/// least `overhead`, else `n` bytes of padding (so 0 and 1 mean "empty" and
/// "one byte").
fn pad_for(n: usize, overhead: usize) -> Vec<u8> {
    vec![b'x'; if n >= overhead { n - overhead } else { n }]
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Query,
    Parse,
    Bind,
    Execute,
    Describe,
    Close,
    CopyData,
    FunctionCall,
    Startup,
    SaslInitial,
    SaslResponse,
}

/// The exchange that sends a `kind` message of size `n`.
fn exchange(kind: Kind, n: usize, db: &str, textlen_oid: u32) -> Exchange {
    let trust = |bytes: Vec<u8>, setup: Vec<u8>| Exchange {
        login: Login::Trust,
        setup,
        bytes,
        header_only: 0,
    };
    match kind {
        Kind::Query => {
            let head = b"select length('";
            let tail = b"')";
            let q = if n == 0 {
                msg(b'Q', b"\0")
            } else {
                let pad = pad_for(n, 5 + head.len() + tail.len() + 1);
                let mut b = BytesMut::new();
                b.put_slice(head);
                b.put_slice(&pad);
                b.put_slice(tail);
                b.put_u8(0);
                msg(b'Q', &b)
            };
            trust(q, vec![])
        }
        Kind::Parse => {
            let head = b"select length('";
            let tail = b"')";
            let pad = pad_for(n, 5 + 1 + head.len() + tail.len() + 1 + 2);
            let mut b = BytesMut::new();
            cstr(&mut b, b"");
            b.put_slice(head);
            b.put_slice(&pad);
            b.put_slice(tail);
            b.put_u8(0);
            b.put_i16(0);
            let p = msg(b'P', &b);
            let mut all = p;
            all.extend(raw::bind("", &[]));
            all.extend(raw::execute());
            all.extend(raw::sync());
            trust(all, vec![])
        }
        Kind::Bind => {
            let pad = pad_for(n, 5 + 1 + 1 + 2 + 2 + 4 + 2);
            let mut b = BytesMut::new();
            cstr(&mut b, b"");
            cstr(&mut b, b"");
            b.put_i16(0);
            b.put_i16(1);
            b.put_i32(pad.len() as i32);
            b.put_slice(&pad);
            b.put_i16(0);
            let bind = msg(b'B', &b);
            let mut all = raw::parse("", "select length($1::text), md5($1::text)");
            all.extend(bind);
            all.extend(raw::describe_portal());
            all.extend(raw::execute());
            all.extend(raw::sync());
            trust(all, vec![])
        }
        Kind::Execute => {
            let portal = pad_for(n, 5 + 1 + 4);
            let mut b = BytesMut::new();
            cstr(&mut b, &portal);
            cstr(&mut b, b"");
            b.put_i16(0);
            b.put_i16(0);
            b.put_i16(0);
            let bind = msg(b'B', &b);
            let mut e = BytesMut::new();
            cstr(&mut e, &portal);
            e.put_i32(0);
            let exec = msg(b'E', &e);
            let mut all = raw::parse("", "select 42");
            all.extend(bind);
            all.extend(exec);
            all.extend(raw::sync());
            trust(all, vec![])
        }
        Kind::Describe | Kind::Close => {
            let name = pad_for(n, 5 + 1 + 1);
            let mut b = BytesMut::new();
            b.put_u8(b'S');
            cstr(&mut b, &name);
            let m = msg(if kind == Kind::Describe { b'D' } else { b'C' }, &b);
            let mut all = m;
            all.extend(raw::sync());
            trust(all, vec![])
        }
        Kind::CopyData => {
            let mut row = pad_for(n, 5 + 1);
            row.push(b'\n');
            let d = msg(b'd', &row);
            let mut all = d;
            all.extend(msg(b'c', b""));
            trust(all, raw::query("copy sink (v) from stdin"))
        }
        Kind::FunctionCall => {
            let pad = pad_for(n, 5 + 4 + 2 + 2 + 2 + 4 + 2);
            let mut b = BytesMut::new();
            b.put_u32(textlen_oid);
            b.put_i16(1);
            b.put_i16(0);
            b.put_i16(1);
            b.put_i32(pad.len() as i32);
            b.put_slice(&pad);
            b.put_i16(0);
            let f = msg(b'F', &b);
            trust(f, vec![])
        }
        Kind::Startup => {
            let fixed = {
                let mut b = BytesMut::new();
                b.put_i32(196_608);
                cstr(&mut b, b"user");
                cstr(&mut b, harness::TRUST_USER.as_bytes());
                cstr(&mut b, b"database");
                cstr(&mut b, db.as_bytes());
                cstr(&mut b, b"application_name");
                b
            };
            let app = pad_for(n, 4 + fixed.len() + 1 + 1);
            let mut b = fixed;
            cstr(&mut b, &app);
            b.put_u8(0);
            let mut packet = ((b.len() + 4) as i32).to_be_bytes().to_vec();
            packet.extend_from_slice(&b);
            Exchange {
                login: Login::None,
                setup: vec![],
                bytes: packet,
                header_only: 0,
            }
        }
        Kind::SaslInitial => {
            let head = b"n,,n=,r=";
            let mut data = head.to_vec();
            data.extend(pad_for(n, 5 + 14 + 4 + head.len()));
            let mut b = BytesMut::new();
            cstr(&mut b, b"SCRAM-SHA-256");
            b.put_i32(data.len() as i32);
            b.put_slice(&data);
            let p = msg(b'p', &b);
            Exchange {
                login: Login::Sasl,
                setup: vec![],
                bytes: p,
                header_only: 0,
            }
        }
        Kind::SaslResponse => {
            // A well-formed client-first message, then a client-final one of
            // the size under test (its proof cannot be right).
            let mut b = BytesMut::new();
            cstr(&mut b, b"SCRAM-SHA-256");
            let first = b"n,,n=,r=abcdefghijklmnopqrstuvwx";
            b.put_i32(first.len() as i32);
            b.put_slice(first);
            let head = b"c=biws,r=abcdefghijklmnopqrstuvwx,p=";
            let mut data = head.to_vec();
            data.extend(pad_for(n, 5 + head.len()));
            let p = msg(b'p', &data);
            Exchange {
                login: Login::Sasl,
                setup: msg(b'p', &b),
                bytes: p,
                header_only: 0,
            }
        }
    }
}

/// Where the sized message starts in `bytes` (the sized one is the first of
/// the exchange for every kind but Bind and Execute).
fn sized_offset(kind: Kind, x: &Exchange) -> usize {
    match kind {
        Kind::Bind | Kind::Execute => {
            // After the Parse (and for Execute, the Bind) in front of it.
            let mut at = 0;
            let skip = if kind == Kind::Bind { 1 } else { 2 };
            for _ in 0..skip {
                let len = i32::from_be_bytes([
                    x.bytes[at + 1],
                    x.bytes[at + 2],
                    x.bytes[at + 3],
                    x.bytes[at + 4],
                ]) as usize;
                at += len + 1;
            }
            at
        }
        _ => 0,
    }
}

/// Length of the sized message.
fn sized_total(kind: Kind, x: &Exchange) -> usize {
    let at = sized_offset(kind, x);
    let b = &x.bytes[at..];
    if kind == Kind::Startup {
        i32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize
    } else {
        i32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize + 1
    }
}

/// Sends every size of `kind`, each whole, at random splits and (when
/// small) byte by byte, directly and through tidepool, and compares.
async fn compare_kind(kind: Kind) {
    let cluster = harness::cluster();
    let db = tokio::task::spawn_blocking(move || cluster.create_database("boundaries"))
        .await
        .unwrap();
    let admin = cluster.admin_client(&db).await;
    admin
        .batch_execute("create table sink (v text); grant all on sink to public;")
        .await
        .unwrap();
    let textlen_oid: u32 = admin
        .query_one("select 'length(text)'::regprocedure::oid", &[])
        .await
        .unwrap()
        .get(0);
    let toml = harness::proxy::config_toml(cluster, &db, "", "").replacen(
        "listen = [\"127.0.0.1:0\"]",
        &format!("listen = [\"127.0.0.1:0\"]\nmax_message_size = {MAX}"),
        1,
    );
    let proxy = TestProxy::start(&toml);
    // A bystander that must be served throughout, whatever the others send.
    let bystander = proxy.client(&db).await;

    for (seed, &n) in (0x5eed_0000 + kind as u64 * 100..).zip(SIZES) {
        let mut x = exchange(kind, n, &db, textlen_oid);
        let total = sized_total(kind, &x);
        let auth = matches!(kind, Kind::Startup | Kind::SaslInitial | Kind::SaslResponse);
        let small = matches!(kind, Kind::Describe | Kind::Close | Kind::Execute);
        let over_ours = total > MAX && !auth && !small;
        // Refused from the length word alone: PostgreSQL's limits for
        // startup packets, SASL messages and its "small" message types
        // (a length word over 10,000), and ours.
        let refused_early = match kind {
            // 10,000 bytes after the length word.
            Kind::Startup => total > 10_004,
            // A length word over 1,024 (PostgreSQL 15 and later).
            Kind::SaslInitial | Kind::SaslResponse => total > 1_025,
            Kind::Describe | Kind::Close | Kind::Execute => total > 10_001,
            _ => over_ours,
        };
        if refused_early {
            x.header_only = sized_offset(kind, &x) + if kind == Kind::Startup { 4 } else { 5 };
        }
        let mut splits = vec![Split::Whole, Split::Random(seed)];
        if x.bytes.len() <= BYTEWISE_UP_TO {
            splits.push(Split::Bytewise);
        }
        for split in splits {
            let through = run(proxy.port(), &db, &x, split).await;
            if over_ours {
                // PostgreSQL would take it; tidepool's limit is lower. What
                // the server answered to the messages before it (COPY's
                // CopyInResponse) may come first.
                let [.., error, closed] = &through[..] else {
                    panic!("{kind:?} {n} ({total} B) {split:?}: {through:?}");
                };
                assert!(
                    error.starts_with("E(")
                        && error.contains("C=08P01")
                        && error.contains("S=FATAL")
                        && error.contains("max_message_size"),
                    "{kind:?} {n} ({total} B) {split:?}: {through:?}"
                );
                assert_eq!(closed, "!(closed)");
                assert!(
                    through.len() == 2 || (kind == Kind::CopyData && through.len() == 3),
                    "{kind:?} {n} ({total} B) {split:?}: {through:?}"
                );
            } else {
                let direct = run(cluster.primary_port(), &db, &x, split).await;
                // PostgreSQL closes without a word on a length it refuses
                // (it logs "invalid message length"); tidepool says why
                // first, as it does for every protocol violation.
                let explained = direct == ["!(closed)"]
                    && through.len() == 2
                    && through[0].contains("C=08P01")
                    && through[0].contains("S=FATAL")
                    && through[1] == "!(closed)";
                // tidepool verifies SCRAM itself (PostgreSQL never sees
                // the client's messages): the outcome must agree, going on
                // or refusing with a FATAL and closing, not the wording.
                let sasl = matches!(kind, Kind::SaslInitial | Kind::SaslResponse);
                let same_outcome = sasl && outcome(&through) == outcome(&direct);
                assert!(
                    through == direct || explained || same_outcome,
                    "{kind:?}, size {n} (message of {total} B), {split:?}: through tidepool vs PostgreSQL\n through: {through:?}\n  direct: {direct:?}"
                );
            }
            bystander
                .simple_query("select 1")
                .await
                .unwrap_or_else(|e| panic!("bystander after {kind:?} {n} {split:?}: {e}"));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_at_every_boundary() {
    compare_kind(Kind::Query).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parse_at_every_boundary() {
    compare_kind(Kind::Parse).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bind_at_every_boundary() {
    compare_kind(Kind::Bind).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execute_at_every_boundary() {
    compare_kind(Kind::Execute).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn describe_at_every_boundary() {
    compare_kind(Kind::Describe).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_at_every_boundary() {
    compare_kind(Kind::Close).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_data_at_every_boundary() {
    compare_kind(Kind::CopyData).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn function_call_at_every_boundary() {
    compare_kind(Kind::FunctionCall).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_packet_at_every_boundary() {
    compare_kind(Kind::Startup).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_initial_response_at_every_boundary() {
    compare_kind(Kind::SaslInitial).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_response_at_every_boundary() {
    compare_kind(Kind::SaslResponse).await;
}
