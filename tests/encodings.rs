//! Clients in other encodings: query and statement text need not be UTF-8.
//! Each client encoding's queries (simple and extended protocol, named
//! statements reused across transactions, text the lexer could misread in
//! encodings whose second bytes look like ASCII) run directly and through
//! tidepool; every answer must be the same, byte for byte. psql with
//! PGCLIENTENCODING=LATIN1 round-trips a non-ASCII literal as well.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use harness::raw::{self, Msg, Raw};
use harness::{TestProxy, cluster};

fn startup(user: &str, db: &str, encoding: &str) -> Vec<u8> {
    raw::startup_with(user, db, &[("client_encoding", encoding)])
}

fn cstr(b: &[u8]) -> Vec<u8> {
    let mut v = b.to_vec();
    v.push(0);
    v
}

fn query(sql: &[u8]) -> Vec<u8> {
    raw::msg(b'Q', &cstr(sql))
}

fn parse(name: &str, sql: &[u8]) -> Vec<u8> {
    let mut body = cstr(name.as_bytes());
    body.extend(cstr(sql));
    body.extend(0i16.to_be_bytes());
    raw::msg(b'P', &body)
}

fn bind(stmt: &str, params: &[&[u8]]) -> Vec<u8> {
    let mut body = cstr(b"");
    body.extend(cstr(stmt.as_bytes()));
    body.extend(0i16.to_be_bytes());
    body.extend((params.len() as i16).to_be_bytes());
    for p in params {
        body.extend((p.len() as i32).to_be_bytes());
        body.extend_from_slice(p);
    }
    body.extend(0i16.to_be_bytes());
    raw::msg(b'B', &body)
}

fn extended(name: &str, sql: &[u8], params: &[&[u8]]) -> Vec<u8> {
    let mut v = parse(name, sql);
    v.extend(bind(name, params));
    v.extend(raw::execute());
    v.extend(raw::sync());
    v
}

/// Runs each request (one or more messages ending in Query or Sync) and
/// returns the answers, the backend-specific ones left out.
async fn answers(port: u16, db: &str, encoding: &str, requests: &[Vec<u8>]) -> Vec<Vec<String>> {
    let mut r = Raw::connect(port).await;
    r.send(&startup(harness::TRUST_USER, db, encoding)).await;
    let login = r.read_until_ready().await;
    assert!(login.iter().any(|m| m.tag == b'R'), "login: {login:?}");
    let mut out = Vec::new();
    for req in requests {
        r.send(req).await;
        let msgs: Vec<Msg> = r.read_until_ready().await;
        out.push(
            msgs.iter()
                .filter(|m| !matches!(m.tag, b'S' | b'K' | b'N'))
                .map(|m| match m.tag {
                    // Errors by code and message (the rest names source lines).
                    b'E' => format!("E {:?} {:?}", m.code(), m.message()),
                    _ => format!("{} {:?}", m.tag as char, m.body),
                })
                .collect(),
        );
    }
    out
}

struct Encoding {
    name: &'static str,
    /// A word in that encoding (its bytes).
    word: &'static [u8],
}

const ENCODINGS: &[Encoding] = &[
    Encoding {
        name: "LATIN1",
        word: b"caf\xe9 \xe0 \xe9l\xe8ve",
    },
    Encoding {
        name: "WIN1252",
        word: b"\x80 caf\xe9",
    },
    Encoding {
        name: "EUC_JP",
        word: b"\xa5\xc6\xa5\xb9\xa5\xc8",
    },
    // Second bytes that look like ASCII: 0x5C is a backslash.
    Encoding {
        name: "SJIS",
        word: b"\x95\x5c\x83\x5c",
    },
    Encoding {
        name: "UTF8",
        word: "caf\u{e9} \u{6771}\u{4eac}".as_bytes(),
    },
];

fn requests(word: &[u8]) -> Vec<Vec<u8>> {
    let cat = |parts: &[&[u8]]| parts.concat();
    vec![
        query(&cat(&[b"select '", word, b"' as w, length('", word, b"')"])),
        query(&cat(&[b"select E'", word, b"', 1"])),
        query(&cat(&[b"select 1 as \"", word, b"\""])),
        query(&cat(&[
            b"set application_name = '",
            word,
            b"'; show application_name",
        ])),
        query(&cat(&[
            b"select '",
            word,
            b"' where false; set search_path = '",
            word,
            b"'",
        ])),
        query(b"show search_path"),
        query(&cat(&[b"select nosuchcolumn_", word])),
        extended("s1", &cat(&[b"select $1::text || '", word, b"'"]), &[word]),
        // The named statement again, in another transaction.
        [bind("s1", &[b"x"]), raw::execute(), raw::sync()].concat(),
        extended(
            "",
            &cat(&[b"select upper('", word, b"'), $1::text"]),
            &[word],
        ),
        query(b"reset all; show search_path"),
        // SQL-level prepared statements, which tidepool renames.
        query(&cat(&[b"prepare q(text) as select $1 || '", word, b"'"])),
        query(&cat(&[b"execute q('", word, b"')"])),
        query(&cat(&[b"execute q('", word])),
        query(b"deallocate q"),
        // Not valid in the encoding (or anywhere, for UTF-8).
        query(b"select '\xff\xff'"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_in_any_client_encoding_answer_as_postgresql_does() {
    let c = cluster();
    let db = c.create_database("encodings");
    let proxy = TestProxy::for_db(c, &db, "default_pool_size = 1");
    let mut wrong = Vec::new();
    for e in ENCODINGS {
        let reqs = requests(e.word);
        let direct = answers(c.primary_port(), &db, e.name, &reqs).await;
        let through = answers(proxy.port(), &db, e.name, &reqs).await;
        for (i, (d, t)) in direct.iter().zip(&through).enumerate() {
            if d != t {
                wrong.push(format!(
                    "{} request {i}: directly {d:?}\n  through tidepool {t:?}",
                    e.name
                ));
            }
        }
        // Each answer is what the request asked for, not an error across
        // the board.
        assert!(
            direct[0].iter().any(|m| m.starts_with('D')),
            "{}: {:?}",
            e.name,
            direct[0]
        );
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn psql_in_latin1_round_trips_a_non_ascii_literal() {
    let c = cluster();
    let db = c.create_database("encodings_psql");
    let proxy = TestProxy::for_db(c, &db, "");
    let run = |port: u16| {
        let url = harness::url(port, harness::APP_USER, Some(harness::APP_PASSWORD), &db);
        let mut cmd = std::process::Command::new(harness::pg_bin("psql"));
        cmd.args([&url, "-X", "-At", "-v", "ON_ERROR_STOP=1"])
            .env("PGCLIENTENCODING", "LATIN1")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"select 'caf\xe9';\nselect length('\xe9l\xe8ve');\n")
            .unwrap();
        let out = child.wait_with_output().unwrap();
        (out.status.success(), out.stdout, out.stderr)
    };
    let direct = run(c.primary_port());
    let through = run(proxy.port());
    assert!(
        direct.0,
        "directly: {:?}",
        String::from_utf8_lossy(&direct.2)
    );
    assert_eq!(direct.1, b"caf\xe9\n5\n");
    assert_eq!(
        through,
        direct,
        "through tidepool: {:?}",
        String::from_utf8_lossy(&through.2)
    );
}
