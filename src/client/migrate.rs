//! Moving clients to the process that took over (`upgrade`): after a
//! takeover, each client of the old process that is between transactions
//! and can be moved (a plain or Unix-socket connection, nothing buffered,
//! no server held or pinned) is sent to the new process, its socket by
//! SCM_RIGHTS and its session as a [`Record`]; the new process serves it
//! from its next request on. The client sees nothing: same connection,
//! same parameters, prepared statements, LISTEN channels and cancel key.
//!
//! The stream carries frames `u32 length (big-endian) | JSON record`, each
//! with exactly one descriptor sent along with its first byte; records and
//! descriptors therefore pair up in order however the bytes are split.
//!
//! The other way, the new process writes `CANCEL pid secret` lines: cancel
//! requests whose key it does not know, for the clients still here
//! (`cancel`).
//!
//! Invariants: a client whose record could not be sent stays served here
//! ([`Outbox::send`] fails before the socket is given up, and the outbox
//! closes so that nobody else tries); one frame is written whole before the
//! next starts (the outbox's lock); frames over [`MAX_RECORD`] are refused.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};

use std::sync::Arc;

use crate::auth::secret::Secret;
use crate::cancel::CancelRegistry;
use crate::server::prepared::Statement;

/// Largest record sent or accepted (a client with more prepared statement
/// text than this stays in the old process until it leaves).
pub const MAX_RECORD: usize = 16 << 20;

/// How long one client's record may take to send before the outbox gives
/// up on the new process (the client then stays here).
const SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// What a moved client's session is made of again in the new process.
/// Fields a later version adds are read as their defaults.
#[derive(Serialize, Deserialize, Debug, PartialEq, Default)]
#[serde(default)]
pub struct Record {
    pub database: String,
    pub user: String,
    /// Session parameters as the client sees them.
    pub params: BTreeMap<String, String>,
    /// Startup-packet parameters (what RESET returns to).
    pub startup: BTreeMap<String, String>,
    /// The cancel key the client was given.
    pub pid: i32,
    pub secret: i32,
    pub statements: Vec<MovedStatement>,
    pub custom_params: Vec<String>,
    /// The SCRAM ClientKey (base64), for passthrough to replicas.
    pub client_key: Option<String>,
    /// What auth_query found for a user not in the config.
    pub fetched_secret: Option<MovedSecret>,
    /// Shared-LISTEN channels.
    pub channels: Vec<String>,
    /// Microseconds since the epoch.
    pub connect_us: u64,
    /// The client wrote recently (read-your-writes applies again).
    pub wrote: bool,
}

/// A named prepared statement of the client.
#[derive(Serialize, Deserialize, Debug, PartialEq, Default)]
#[serde(default)]
pub struct MovedStatement {
    pub name: String,
    /// The Parse body after the statement name (base64), or
    pub parse: Option<String>,
    /// for SQL `PREPARE`, what follows its name.
    pub sql: Option<String>,
    pub foreign: bool,
    /// The row shape the client was told (`Statement::promised`): a
    /// migration that changes it is reported after the move as before.
    pub shape: Option<u64>,
    /// For a statement that runs one of the client's SQL-prepared ones
    /// (`EXECUTE tidepool_…`: psycopg prepares `EXECUTE p` itself), that
    /// one's server name: it is prepared first wherever this one is (see
    /// [`statements`]). Without it a moved client's statement failed on
    /// every server that lacked the other.
    pub needs: Option<String>,
}

/// The moved client's statements again (see [`MovedStatement::statement`]),
/// each one that runs another of them linked to it again.
pub fn statements(
    moved: &[MovedStatement],
    context: u64,
) -> std::collections::HashMap<String, std::sync::Arc<Statement>> {
    type Made<'a> = (Option<&'a String>, (String, std::sync::Arc<Statement>));
    let made: Vec<Made> = moved
        .iter()
        .filter_map(|m| Some((m.needs.as_ref(), m.statement(context)?)))
        .collect();
    let by_server_name: std::collections::HashMap<String, std::sync::Arc<Statement>> = made
        .iter()
        .filter(|(_, (_, s))| s.sql_prepare.is_some())
        .map(|(_, (_, s))| (s.name.clone(), s.clone()))
        .collect();
    made.into_iter()
        .map(|(needs, (name, mut stmt))| {
            if let Some(needed) = needs.and_then(|n| by_server_name.get(n))
                && let Some(s) = std::sync::Arc::get_mut(&mut stmt)
            {
                s.needs = Some(needed.clone());
            }
            (name, stmt)
        })
        .collect()
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
pub enum MovedSecret {
    Plain(String),
    Md5(String),
    /// In `pg_authid`'s text form.
    Scram(String),
}

impl MovedStatement {
    pub fn of(name: &str, s: &Statement) -> Self {
        // The Parse message is `P len name\0 rest`.
        let rest = s.parse.get(5 + s.name.len() + 1..).unwrap_or_default();
        MovedStatement {
            name: name.to_owned(),
            parse: s.sql_prepare.is_none().then(|| B64.encode(rest)),
            sql: s.sql_prepare.as_ref().map(|_| s.query.clone()),
            foreign: s.foreign,
            shape: s.promised.get().map(|d| d.shape),
            needs: s.needs.as_ref().map(|n| n.name.clone()),
        }
    }

    /// The statement again, under its client name, promised the shape the
    /// client was told (as told before anything this process describes).
    /// `context`: the moved client's parse settings.
    pub fn statement(&self, context: u64) -> Option<(String, std::sync::Arc<Statement>)> {
        let made = self.made(context)?;
        if let Some(shape) = self.shape {
            let _ = made
                .1
                .promised
                .set(crate::server::prepared::Described::now(shape));
        }
        Some(made)
    }

    fn made(&self, context: u64) -> Option<(String, std::sync::Arc<Statement>)> {
        match (&self.parse, &self.sql) {
            (Some(p), _) => {
                let rest = B64.decode(p).ok()?;
                let mut body = Vec::with_capacity(self.name.len() + 1 + rest.len());
                body.extend_from_slice(self.name.as_bytes());
                body.push(0);
                body.extend_from_slice(&rest);
                Statement::from_parse(&body, context).ok()
            }
            (None, Some(sql)) => Some((
                self.name.clone(),
                Statement::from_sql_prepare(sql, self.foreign, context),
            )),
            (None, None) => None,
        }
    }
}

impl MovedSecret {
    pub fn of(s: &Secret) -> Self {
        match s {
            Secret::Plain(p) => MovedSecret::Plain(p.clone()),
            Secret::Md5(m) => MovedSecret::Md5(m.clone()),
            Secret::Scram(v) => MovedSecret::Scram(format!(
                "SCRAM-SHA-256${}:{}${}:{}",
                v.iterations,
                B64.encode(&v.salt),
                B64.encode(v.stored_key),
                B64.encode(v.server_key)
            )),
        }
    }

    pub fn secret(&self) -> Option<Secret> {
        match self {
            MovedSecret::Plain(p) => Some(Secret::Plain(p.clone())),
            MovedSecret::Md5(m) => Some(Secret::Md5(m.clone())),
            MovedSecret::Scram(s) => Secret::parse(s)
                .ok()
                .filter(|s| matches!(s, Secret::Scram(_))),
        }
    }
}

pub fn encode_key(k: &[u8; 32]) -> String {
    B64.encode(k)
}

pub fn decode_key(k: &str) -> Option<[u8; 32]> {
    B64.decode(k).ok()?.try_into().ok()
}

/// A record as one frame.
pub fn frame(r: &Record) -> io::Result<Vec<u8>> {
    let mut out = vec![0u8; 4];
    serde_json::to_writer(&mut out, r).map_err(io::Error::other)?;
    let len = out.len() - 4;
    if len > MAX_RECORD {
        return Err(io::Error::other("session too large to move"));
    }
    out[..4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

/// The old process's side: where moving clients send themselves.
#[derive(Default)]
pub struct Outbox {
    stream: tokio::sync::Mutex<Option<Arc<tokio::net::UnixStream>>>,
    open: AtomicBool,
    /// Clients moved so far.
    pub moved: AtomicU64,
}

impl Outbox {
    /// Clients may move from now on, over `s` (the takeover's connection);
    /// the cancel requests that come back on it go to `cancel`. Runs in the
    /// runtime's context.
    pub fn open(&self, s: tokio::net::UnixStream, cancel: Arc<CancelRegistry>) {
        let s = Arc::new(s);
        if let Ok(mut g) = self.stream.try_lock() {
            *g = Some(s.clone());
            self.open.store(true, Ordering::Release);
        }
        tokio::spawn(pass_cancels(s, cancel));
    }

    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    /// Sends one client: its record and its socket, if `still` says it
    /// is still to move once its turn comes. On an error nothing of it was
    /// handed over (the caller keeps serving it); an error of the
    /// connection closes the outbox: the new process is gone or broken.
    pub async fn send(
        &self,
        r: &Record,
        socket: RawFd,
        still: impl Fn() -> bool,
    ) -> io::Result<()> {
        let frame = frame(r)?;
        let mut g = self.stream.lock().await;
        let Some(s) = g.as_ref() else {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "no new process",
            ));
        };
        if !still() {
            return Err(io::Error::other("no longer moving"));
        }
        // A new process that stops reading must not hold the clients
        // waiting to move (and their requests) for ever.
        let written = tokio::time::timeout(SEND_TIMEOUT, write_frame(s, &frame, socket))
            .await
            .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()));
        match written {
            Ok(()) => {
                self.moved.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                self.open.store(false, Ordering::Release);
                // A frame cut short must not stay half sent: the new
                // process sees the end and drops it (and its socket copy).
                shut_write(s.as_raw_fd());
                *g = None;
                Err(e)
            }
        }
    }
}

/// Ends the writing half of the outbox's stream (a tokio stream, which has
/// no synchronous shutdown), best effort: the other end sees the stream end.
fn shut_write(fd: RawFd) {
    // SAFETY: shutdown on a socket this process holds open.
    unsafe { libc::shutdown(fd, libc::SHUT_WR) };
}

/// Longest `CANCEL pid secret` line.
const CANCEL_LINE: usize = 64;

/// Serves the new process's `CANCEL pid secret` lines until it closes.
async fn pass_cancels(s: Arc<tokio::net::UnixStream>, cancel: Arc<CancelRegistry>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 256];
    loop {
        if s.readable().await.is_err() {
            return;
        }
        match s.try_read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(_) => return,
        }
        while let Some(end) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=end).collect();
            if let Some((pid, secret)) = cancel_line(&line) {
                let cancel = cancel.clone();
                tokio::spawn(async move { cancel.cancel(pid, secret).await });
            }
        }
        if buf.len() > CANCEL_LINE {
            tracing::warn!(
                "takeover: the new process sent something other than cancel requests; no longer read"
            );
            return;
        }
    }
}

/// `CANCEL pid secret\n`.
fn cancel_line(line: &[u8]) -> Option<(i32, i32)> {
    let text = std::str::from_utf8(line).ok()?;
    let mut w = text.split_whitespace();
    match (w.next(), w.next(), w.next(), w.next()) {
        (Some("CANCEL"), Some(pid), Some(secret), None) => {
            Some((pid.parse().ok()?, secret.parse().ok()?))
        }
        _ => None,
    }
}

async fn write_frame(s: &tokio::net::UnixStream, frame: &[u8], socket: RawFd) -> io::Result<()> {
    let mut sent = 0;
    while sent < frame.len() {
        // The descriptor goes with the first byte only.
        let fds: &[RawFd] = if sent == 0 { &[socket] } else { &[] };
        let n = s
            .async_io(tokio::io::Interest::WRITABLE, || {
                crate::fdpass::send(s.as_raw_fd(), &frame[sent..], fds)
            })
            .await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        sent += n;
    }
    Ok(())
}

/// The new process's side: reads frames and their descriptors from the old
/// process (blocking; run on a thread of its own) and hands each client to
/// `adopt`, until the old process closes the stream.
pub fn receive(s: std::os::unix::net::UnixStream, mut adopt: impl FnMut(Record, OwnedFd)) {
    let mut bytes: Vec<u8> = Vec::new();
    let mut fds: VecDeque<OwnedFd> = VecDeque::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut got = Vec::new();
    loop {
        match crate::fdpass::recv(s.as_raw_fd(), &mut chunk, &mut got) {
            Ok(0) => return,
            Ok(n) => {
                bytes.extend_from_slice(&chunk[..n]);
                fds.extend(got.drain(..));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!(error = %e, "takeover: reading moved clients failed; the rest stay with the old process");
                // The old process's next send fails: it stops moving
                // clients instead of handing them to nobody.
                let _ = s.shutdown(std::net::Shutdown::Both);
                return;
            }
        }
        loop {
            match take_frame(&mut bytes, &mut fds) {
                Ok(Some((r, fd))) => adopt(r, fd),
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "takeover: a moved client's record is broken; stopping");
                    let _ = s.shutdown(std::net::Shutdown::Both);
                    return;
                }
            }
        }
    }
}

/// The next whole frame and its descriptor, if both are here.
fn take_frame(
    bytes: &mut Vec<u8>,
    fds: &mut VecDeque<OwnedFd>,
) -> io::Result<Option<(Record, OwnedFd)>> {
    let Some(head) = bytes.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
    if len > MAX_RECORD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "record too large",
        ));
    }
    if bytes.len() < 4 + len {
        return Ok(None);
    }
    let Some(fd) = fds.pop_front() else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "a record came without its socket",
        ));
    };
    let r = serde_json::from_slice(&bytes[4..4 + len])
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e));
    bytes.drain(..4 + len);
    Ok(Some((r?, fd)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    const VERIFIER: &str = "SCRAM-SHA-256$4096:4HvP4XjXzAPlnna+XirHAg==$Ue/uundsTOxDgRkS4GuNr7SK6yor+KjCYscdV8OmM2s=:5c7unTzU2ZCZH0lyzXNMWV0X02s9LuyHZF0194PCLm0=";

    fn record(n: usize) -> Record {
        let (name, parse) = {
            let mut body = b"s1\0select $1::int + ".to_vec();
            body.extend_from_slice(n.to_string().as_bytes());
            body.extend_from_slice(b"\0\0\x01\0\0\0\x17");
            Statement::from_parse(&body, 0).unwrap()
        };
        Record {
            database: "db".into(),
            user: format!("u{n}"),
            params: [("application_name".to_owned(), "x".to_owned())].into(),
            startup: BTreeMap::new(),
            pid: 7,
            secret: -3,
            statements: vec![
                MovedStatement::of(&name, &parse),
                MovedStatement::of("p2", &Statement::from_sql_prepare(" AS select 1", false, 0)),
            ],
            custom_params: vec!["my.x".into()],
            client_key: Some(encode_key(&[9; 32])),
            fetched_secret: Some(MovedSecret::of(&Secret::parse(VERIFIER).unwrap())),
            channels: vec!["jobs".into()],
            connect_us: 42,
            wrote: true,
        }
    }

    #[test]
    fn statements_and_secrets_come_back_as_they_were() {
        let r = record(5);
        let (name, s) = r.statements[0].statement(0).unwrap();
        assert_eq!(name, "s1");
        assert_eq!(s.query, "select $1::int + 5");
        let (_, orig) =
            Statement::from_parse(b"s1\0select $1::int + 5\0\0\x01\0\0\0\x17", 0).unwrap();
        assert_eq!((s.hash, &s.parse), (orig.hash, &orig.parse));
        assert!(s.promised.get().is_none(), "no shape was told");
        let told = MovedStatement {
            shape: Some(99),
            ..MovedStatement::of(&name, &orig)
        };
        let (_, again) = told.statement(0).unwrap();
        assert_eq!(again.promised.get().map(|d| d.shape), Some(99));
        let (name, s) = r.statements[1].statement(0).unwrap();
        assert_eq!(name, "p2");
        assert!(s.sql_prepare.as_deref().unwrap().ends_with(" AS select 1"));
        // Each form of secret comes back as it was.
        assert_eq!(
            r.fetched_secret,
            Some(MovedSecret::Scram(VERIFIER.to_owned()))
        );
        for text in [
            VERIFIER,
            "md5aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            "md5-looking plain",
        ] {
            let moved = MovedSecret::of(&Secret::parse(text).unwrap());
            assert_eq!(MovedSecret::of(&moved.secret().unwrap()), moved);
        }
        assert_eq!(
            MovedSecret::Scram("SCRAM-SHA-256$x".into())
                .secret()
                .map(|_| ()),
            None
        );
        assert_eq!(decode_key(r.client_key.as_ref().unwrap()), Some([9; 32]));
    }

    /// A statement whose text came in another encoding than UTF-8 (a
    /// LATIN1 client's `é`, byte 0xE9) moves byte for byte: the same
    /// server statement and the same Parse.
    #[test]
    fn a_statement_in_another_encoding_moves_byte_for_byte() {
        let body = b"s\0select '\xe9'\0\0\0";
        let (name, orig) = Statement::from_parse(body, 0).unwrap();
        assert!(orig.foreign);
        let moved = MovedStatement::of(&name, &orig);
        let json = serde_json::to_string(&moved).unwrap();
        let back: MovedStatement = serde_json::from_str(&json).unwrap();
        let (_, again) = back.statement(0).unwrap();
        assert_eq!(
            (again.hash, &again.parse, again.foreign),
            (orig.hash, &orig.parse, true)
        );
        let sql = Statement::from_sql_prepare(" AS select '\u{e9}'", true, 0);
        let (_, again) = MovedStatement::of("p", &sql).statement(0).unwrap();
        assert_eq!((again.hash, again.foreign), (sql.hash, true));
    }

    /// Frames split at every byte, and several in one read, pair with
    /// their descriptors in order.
    #[test]
    fn frames_pair_with_their_sockets_however_split() {
        let frames: Vec<Vec<u8>> = (0..3).map(|n| frame(&record(n)).unwrap()).collect();
        let all: Vec<u8> = frames.concat();
        for cut in 0..all.len() {
            let mut bytes = Vec::new();
            let mut fds = VecDeque::new();
            let mut out = Vec::new();
            // Descriptors come no later than their frame's first byte.
            for _ in &frames {
                let (a, _b) = UnixStream::pair().unwrap();
                fds.push_back(OwnedFd::from(a));
            }
            for part in [&all[..cut], &all[cut..]] {
                bytes.extend_from_slice(part);
                while let Some((r, _fd)) = take_frame(&mut bytes, &mut fds).unwrap() {
                    out.push(r);
                }
            }
            assert!(bytes.is_empty() && fds.is_empty());
            let users: Vec<String> = out.into_iter().map(|r| r.user).collect();
            assert_eq!(users, ["u0", "u1", "u2"], "cut at {cut}");
        }
        // A frame without a socket, and an oversized one, are errors.
        let mut bytes = frames[0].clone();
        assert!(take_frame(&mut bytes, &mut VecDeque::new()).is_err());
        let mut huge = ((MAX_RECORD + 1) as u32).to_be_bytes().to_vec();
        assert!(take_frame(&mut huge, &mut VecDeque::new()).is_err());
    }

    /// An open outbox and the new process's end of its connection.
    fn open_outbox() -> (Outbox, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let outbox = Outbox::default();
        outbox.open(
            tokio::net::UnixStream::from_std(a).unwrap(),
            Arc::new(CancelRegistry::default()),
        );
        (outbox, b)
    }

    /// A new process that is gone: the send fails, nothing is counted as
    /// moved, and the outbox closes so that no other client tries.
    #[tokio::test]
    async fn a_gone_receiver_closes_the_outbox() {
        let (outbox, b) = open_outbox();
        assert!(outbox.is_open());
        drop(b);
        let (_x, y) = UnixStream::pair().unwrap();
        assert!(
            outbox
                .send(&record(0), y.as_raw_fd(), || true)
                .await
                .is_err()
        );
        assert!(!outbox.is_open());
        assert!(
            outbox
                .send(&record(1), y.as_raw_fd(), || true)
                .await
                .is_err()
        );
        assert_eq!(outbox.moved.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn cancel_lines() {
        assert_eq!(cancel_line(b"CANCEL 12 -7\n"), Some((12, -7)));
        for bad in [
            &b"CANCEL 12\n"[..],
            b"CANCEL 1 2 3\n",
            b"cancel 1 2\n",
            b"CANCEL x 2\n",
            b"\xff\n",
        ] {
            assert_eq!(cancel_line(bad), None, "{bad:?}");
        }
    }

    /// Over a real socket pair: the receiver hands over each record with
    /// the very socket sent along.
    #[tokio::test]
    async fn the_receiver_gets_each_client_with_its_socket() {
        let (outbox, b) = open_outbox();
        // The receiver runs until the stream closes, which the outbox's
        // cancel reader keeps open: records are collected as they come.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            receive(b, |r, fd| {
                let _ = tx.send((r, fd));
            })
        });
        let mut keep = Vec::new();
        for n in 0..3 {
            let (x, y) = UnixStream::pair().unwrap();
            outbox
                .send(&record(n), y.as_raw_fd(), || true)
                .await
                .unwrap();
            keep.push(x);
        }
        let got: Vec<(Record, OwnedFd)> = (0..3)
            .map(|_| rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap())
            .collect();
        assert_eq!(outbox.moved.load(Ordering::Relaxed), 3);
        for ((r, fd), (n, x)) in got.into_iter().zip(keep.iter_mut().enumerate()) {
            assert_eq!(r, record(n));
            let mut y = UnixStream::from(fd);
            x.write_all(&[n as u8]).unwrap();
            let mut b = [0u8; 1];
            y.read_exact(&mut b).unwrap();
            assert_eq!(b[0], n as u8);
        }
    }
}
