//! Upgrades without refusing a client: a new tidepool started with
//! `--takeover` asks the running one, over the Unix socket `upgrade_socket`,
//! for its listening sockets. The old process sends them (SCM_RIGHTS) and,
//! once the new one has them, stops accepting and lets its clients finish:
//! they stay until they leave, for up to `shutdown_timeout`, and are then
//! closed at their next transaction boundary as in a shutdown. Both
//! processes accept from the same sockets in between, so no connection
//! attempt is refused or lost.
//!
//! Clients move too (`client::migrate`): each one between transactions
//! is sent to the new process with its session, and the old process exits
//! once none is left. Only clients that cannot move (TLS, pinned) stay
//! until they leave or `shutdown_timeout` ends them.
//!
//! The exchange: the new process writes `TAKEOVER 1\n`; the old answers
//! one message carrying the descriptors and the text `LISTENERS n METRICS
//! m CLIENTS 1\n` (n client listeners in config order, then m = 0 or 1
//! metrics listener; `CLIENTS 1`: it can move its clients, in record format
//! 1); the new process writes `OK\n` once it holds them, then `CLIENTS\n`
//! if it takes clients, and the connection carries them from then on. A process of an earlier
//! version neither offers nor takes clients, and the takeover works as
//! without moves. Invariant: the old process stops accepting only after
//! that `OK`, so an aborted takeover leaves it serving as before.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::client::Shared;

const HELLO: &str = "TAKEOVER 1\n";

/// The listening sockets received from the old process.
pub struct Inherited {
    pub listeners: Vec<std::net::TcpListener>,
    pub metrics: Option<std::net::TcpListener>,
}

/// What a takeover brings besides the caller's setup: the connection
/// the old process's clients come over (`client::migrate::receive`),
/// when it moves them.
pub struct TakenOver<T> {
    pub ready: T,
    pub clients: Option<UnixStream>,
}

/// Asks the tidepool listening on `path` for its listening sockets, makes
/// this process ready with them (`setup`), and only then tells the old one
/// to stop accepting: a setup that fails leaves the old process serving.
pub fn take_over<T>(
    path: &Path,
    setup: impl FnOnce(Inherited) -> std::io::Result<T>,
) -> std::io::Result<TakenOver<T>> {
    let mut s = UnixStream::connect(path).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("no tidepool to take over at {}: {e}", path.display()),
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(HELLO.as_bytes())?;
    let (text, fds) = recv_fds(&s)?;
    let mut words = text.split_whitespace();
    let (Some("LISTENERS"), Some(n), Some("METRICS"), Some(m)) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        return Err(invalid(&format!("unexpected answer {text:?}")));
    };
    // Clients in the record format this version reads (`client::migrate`).
    let moves = (words.next(), words.next()) == (Some("CLIENTS"), Some("1"));
    let (n, m): (usize, usize) = (
        n.parse().map_err(|_| invalid("bad count"))?,
        m.parse().map_err(|_| invalid("bad count"))?,
    );
    if fds.len() != n + m || m > 1 {
        return Err(invalid(&format!(
            "{} descriptors for {n} listeners and {m} metrics",
            fds.len()
        )));
    }
    let mut all: Vec<std::net::TcpListener> = fds
        .into_iter()
        .map(|fd| {
            let l = std::net::TcpListener::from(fd);
            l.set_nonblocking(true).map(|()| l)
        })
        .collect::<Result<_, _>>()?;
    let metrics = if m == 1 { all.pop() } else { None };
    let ready = setup(Inherited {
        listeners: all,
        metrics,
    })?;
    if moves {
        s.write_all(b"OK\nCLIENTS\n")?;
        // Clients may come at any pace from here on.
        s.set_read_timeout(None)?;
    } else {
        s.write_all(b"OK\n")?;
    }
    Ok(TakenOver {
        ready,
        clients: moves.then_some(s),
    })
}

/// The takeover thread's copies of the listening sockets. [`Handoff::close`]
/// drops them when the listeners close (a shutdown), so that nothing keeps
/// the sockets open and nothing hands over a closed one.
pub struct Handoff(Arc<Mutex<Option<Vec<OwnedFd>>>>);

impl Handoff {
    pub fn close(&self) {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take();
    }
}

/// Serves takeover requests on `path` until one succeeds: then the running
/// proxy stops accepting and drains (see the module doc). `fds` are the
/// client listeners in config order, then the metrics listener if any.
/// `replacing`: this process just took over from the one that listened on
/// `path`, whose socket file it replaces.
pub fn serve(
    path: &Path,
    fds: Vec<OwnedFd>,
    metrics: bool,
    shared: Arc<Shared>,
    replacing: bool,
) -> std::io::Result<Handoff> {
    // A socket file left by a process that is gone is replaced; one that
    // answers belongs to a running tidepool.
    if !replacing && UnixStream::connect(path).is_ok() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!(
                "another tidepool answers on {} (start this one with --takeover to replace it)",
                path.display()
            ),
        ));
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    let path = path.to_owned();
    let held = Arc::new(Mutex::new(Some(fds)));
    let runtime = tokio::runtime::Handle::current();
    let handoff = Handoff(held.clone());
    std::thread::Builder::new()
        .name("tidepool-upgrade".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                // Held while handing over: the listeners cannot close
                // meanwhile (`Handoff::close` waits).
                let mut guard = held.lock().unwrap_or_else(PoisonError::into_inner);
                let Some(fds) = guard.as_ref() else {
                    // Closed: a shutdown is under way, nothing to hand over.
                    return;
                };
                let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
                match hand_over(&conn, &raw, metrics) {
                    Ok(moves) => {
                        guard.take();
                        drop(guard);
                        if moves {
                            tracing::info!(socket = %path.display(), "a new tidepool took over the listening sockets: no longer accepting; clients move to it between transactions");
                            start_moves(conn, &shared, &runtime);
                        } else {
                            tracing::info!(socket = %path.display(), "a new tidepool took over the listening sockets: no longer accepting; clients finish here");
                        }
                        shared.request_shutdown_after_takeover();
                        return;
                    }
                    Err(e) => tracing::warn!(error = %e, "takeover request failed; still serving"),
                }
            }
        })?;
    Ok(handoff)
}

/// Opens the outbox on `conn` and asks every client to move (see
/// `client::migrate`).
fn start_moves(conn: UnixStream, shared: &Shared, runtime: &tokio::runtime::Handle) {
    let _entered = runtime.enter();
    let stream = conn
        .set_nonblocking(true)
        .and_then(|()| tokio::net::UnixStream::from_std(conn));
    match stream {
        Ok(s) => {
            shared.outbox.open(s, shared.cancel.clone());
            for c in shared.list.all() {
                c.evict(crate::client::list::Eviction::Migrate);
            }
            shared.lot.wake_evicted();
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot move clients to the new process; they finish here")
        }
    }
}

/// Hands the listeners over; true when the new process takes the clients
/// too.
fn hand_over(conn: &UnixStream, fds: &[RawFd], metrics: bool) -> std::io::Result<bool> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    // A line of at most a few bytes: a peer that never ends it cannot
    // make this grow.
    let mut reader = BufReader::new(conn.take(64));
    let mut hello = String::new();
    reader.read_line(&mut hello)?;
    if hello != HELLO {
        return Err(invalid(&format!("unexpected request {hello:?}")));
    }
    let m = usize::from(metrics);
    let text = format!("LISTENERS {} METRICS {m} CLIENTS 1\n", fds.len() - m);
    send_fds(conn, text.as_bytes(), fds)?;
    let mut ok = [0u8; 3];
    reader.read_exact(&mut ok)?;
    if &ok != b"OK\n" {
        return Err(invalid("the new process did not confirm"));
    }
    // The new process writes `CLIENTS` with its OK when it takes them; one
    // of an earlier version closes the connection instead.
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut clients = String::new();
    let takes = reader.read_line(&mut clients).is_ok() && clients == "CLIENTS\n";
    conn.set_read_timeout(None)?;
    Ok(takes)
}

fn invalid(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, format!("takeover: {what}"))
}

fn send_fds(s: &UnixStream, data: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
    let n = crate::fdpass::send(s.as_raw_fd(), data, fds)?;
    if n != data.len() {
        return Err(invalid("short write"));
    }
    Ok(())
}

fn recv_fds(s: &UnixStream) -> std::io::Result<(String, Vec<OwnedFd>)> {
    let mut data = [0u8; 256];
    let mut fds = Vec::new();
    let n = crate::fdpass::recv(s.as_raw_fd(), &mut data, &mut fds)?;
    Ok((String::from_utf8_lossy(&data[..n]).into_owned(), fds))
}
