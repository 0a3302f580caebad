//! A deliberately low-level client for tests that need exact bytes on the
//! wire: pipelines, FunctionCall, malformed input.

use std::time::Duration;

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct Raw {
    pub stream: TcpStream,
    buf: BytesMut,
}

/// One backend message.
#[derive(Debug, Clone)]
pub struct Msg {
    pub tag: u8,
    pub body: Vec<u8>,
}

impl Msg {
    /// SQLSTATE of an ErrorResponse/NoticeResponse.
    pub fn code(&self) -> Option<String> {
        field(&self.body, b'C')
    }
    pub fn message(&self) -> Option<String> {
        field(&self.body, b'M')
    }
}

fn field(body: &[u8], which: u8) -> Option<String> {
    let mut i = 0;
    while i < body.len() && body[i] != 0 {
        let t = body[i];
        let end = body[i + 1..].iter().position(|&b| b == 0)? + i + 1;
        if t == which {
            return Some(String::from_utf8_lossy(&body[i + 1..end]).into_owned());
        }
        i = end + 1;
    }
    None
}

pub fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    v.extend_from_slice(body);
    v
}

pub fn query(sql: &str) -> Vec<u8> {
    let mut b = sql.as_bytes().to_vec();
    b.push(0);
    msg(b'Q', &b)
}

/// A fastpath FunctionCall of the function with OID `oid`, text arguments,
/// text result.
pub fn function_call(oid: u32, args: &[&str]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&oid.to_be_bytes());
    b.extend_from_slice(&1i16.to_be_bytes());
    b.extend_from_slice(&0i16.to_be_bytes());
    b.extend_from_slice(&(args.len() as i16).to_be_bytes());
    for a in args {
        b.extend_from_slice(&(a.len() as i32).to_be_bytes());
        b.extend_from_slice(a.as_bytes());
    }
    b.extend_from_slice(&0i16.to_be_bytes());
    msg(b'F', &b)
}

pub fn parse(name: &str, sql: &str) -> Vec<u8> {
    parse_typed(name, sql, &[])
}

/// Parse with parameter type OIDs.
pub fn parse_typed(name: &str, sql: &str, types: &[u32]) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_slice(name.as_bytes());
    b.put_u8(0);
    b.put_slice(sql.as_bytes());
    b.put_u8(0);
    b.put_i16(types.len() as i16);
    for t in types {
        b.put_u32(*t);
    }
    msg(b'P', &b)
}

/// Bind unnamed portal to `stmt` with text parameters.
pub fn bind(stmt: &str, params: &[&str]) -> Vec<u8> {
    let params: Vec<Option<&str>> = params.iter().copied().map(Some).collect();
    bind_nullable(stmt, &params)
}

/// Bind unnamed portal to `stmt` with text parameters, `None` as NULL.
pub fn bind_nullable(stmt: &str, params: &[Option<&str>]) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_u8(0);
    b.put_slice(stmt.as_bytes());
    b.put_u8(0);
    b.put_i16(0);
    b.put_i16(params.len() as i16);
    for p in params {
        match p {
            Some(p) => {
                b.put_i32(p.len() as i32);
                b.put_slice(p.as_bytes());
            }
            None => b.put_i32(-1),
        }
    }
    b.put_i16(0);
    msg(b'B', &b)
}

/// Describe of a named statement.
pub fn describe_statement(name: &str) -> Vec<u8> {
    statement_message(b'D', name)
}

/// Close of a named statement.
pub fn close_statement(name: &str) -> Vec<u8> {
    statement_message(b'C', name)
}

fn statement_message(tag: u8, name: &str) -> Vec<u8> {
    let mut b = vec![b'S'];
    b.extend_from_slice(name.as_bytes());
    b.push(0);
    msg(tag, &b)
}

pub fn execute() -> Vec<u8> {
    msg(b'E', b"\0\0\0\0\0")
}

pub fn describe_portal() -> Vec<u8> {
    msg(b'D', b"P\0")
}

pub fn sync() -> Vec<u8> {
    msg(b'S', b"")
}

pub fn flush() -> Vec<u8> {
    msg(b'H', b"")
}

pub fn startup(user: &str, db: &str) -> Vec<u8> {
    startup_with(user, db, &[])
}

/// A startup packet with more parameters (`client_encoding`, ...).
pub fn startup_with(user: &str, db: &str, more: &[(&str, &str)]) -> Vec<u8> {
    startup_version(196_608, user, db, more)
}

/// A startup packet for protocol `version` (3.0 is 196,608; 3.2 is
/// 196,610) with more parameters.
pub fn startup_version(version: i32, user: &str, db: &str, more: &[(&str, &str)]) -> Vec<u8> {
    let mut body = BytesMut::new();
    body.put_i32(version);
    for (k, v) in [("user", user), ("database", db)].iter().chain(more) {
        body.put_slice(k.as_bytes());
        body.put_u8(0);
        body.put_slice(v.as_bytes());
        body.put_u8(0);
    }
    body.put_u8(0);
    let mut v = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    v.extend_from_slice(&body);
    v
}

impl Raw {
    pub async fn connect(port: u16) -> Raw {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("raw connect");
        Raw {
            stream,
            buf: BytesMut::new(),
        }
    }

    /// One byte of the answer (an SSLRequest's `S` or `N`).
    pub async fn read_byte(&mut self) -> u8 {
        use tokio::io::AsyncReadExt;
        assert!(self.buf.is_empty(), "bytes already buffered");
        self.stream.read_u8().await.expect("a byte")
    }

    /// Connects and logs in as `trustuser` (trust auth) to `db`.
    pub async fn login_trust(port: u16, db: &str) -> Raw {
        let mut r = Raw::connect(port).await;
        r.send(&startup(super::TRUST_USER, db)).await;
        let msgs = r.read_until_ready().await;
        assert!(
            msgs.iter().any(|m| m.tag == b'R'),
            "no AuthenticationOk: {msgs:?}"
        );
        r
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("raw send");
    }

    /// Next message, or None at EOF. Panics after 30 s of silence.
    pub async fn next(&mut self) -> Option<Msg> {
        loop {
            if self.buf.len() >= 5 {
                let len = i32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]])
                    as usize;
                if self.buf.len() > len {
                    let tag = self.buf[0];
                    self.buf.advance(5);
                    let body = self.buf.split_to(len - 4).to_vec();
                    return Some(Msg { tag, body });
                }
            }
            let n =
                tokio::time::timeout(Duration::from_secs(30), self.stream.read_buf(&mut self.buf))
                    .await
                    .expect("raw read timed out")
                    .unwrap_or(0);
            if n == 0 {
                return None;
            }
        }
    }

    /// Messages up to and including the next ReadyForQuery.
    pub async fn read_until_ready(&mut self) -> Vec<Msg> {
        let out = self.read_until_ready_or_close().await;
        assert!(
            out.last().is_some_and(|m| m.tag == b'Z'),
            "connection closed before ReadyForQuery: {out:?}"
        );
        out
    }

    /// Messages up to the next ReadyForQuery, or to the close.
    pub async fn read_until_ready_or_close(&mut self) -> Vec<Msg> {
        let mut out = Vec::new();
        while let Some(m) = self.next().await {
            let done = m.tag == b'Z';
            out.push(m);
            if done {
                break;
            }
        }
        out
    }

    /// Everything until the peer closes the connection.
    pub async fn read_to_close(&mut self) -> Vec<Msg> {
        let mut out = Vec::new();
        while let Some(m) = self.next().await {
            out.push(m);
        }
        out
    }
}
