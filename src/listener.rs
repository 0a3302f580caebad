//! Accept loop: one task per client. Client limits and SSL/GSSENC answers
//! happen in the client's own startup phase, so a slow client never slows
//! the accept loop. What login returns decides what the connection becomes:
//! a client session or an admin console session.

use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};

use std::sync::atomic::Ordering;

use tracing::Instrument;

use crate::client::{self, Shared};

/// Accepts until `shutdown` resolves.
/// A listening socket on `addr`; with `reuseport` (`so_reuseport`),
/// another tidepool may listen on the same address at the same time (the
/// kernel spreads new connections between them): the way to upgrade or
/// restart without refusing a client.
pub async fn bind(addr: &str, reuseport: bool) -> std::io::Result<TcpListener> {
    let mut last = None;
    for a in tokio::net::lookup_host(addr).await? {
        let socket = if a.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        if reuseport {
            socket.set_reuseport(true)?;
        }
        match socket.bind(a).and_then(|()| socket.listen(1024)) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(last
        .unwrap_or_else(|| std::io::Error::new(std::io::ErrorKind::AddrNotAvailable, "no address")))
}

pub async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => {
                    tokio::spawn(crate::watchdog::Watched::new(
                        &shared.watchdog,
                        0,
                        serve(stream, shared.clone()),
                    ));
                }
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            _ = shutdown.changed() => return,
        }
    }
}

/// Serves one accepted connection: logs it in, then runs its session as a
/// task of its own (so that each poll of a busy client starts at the
/// session's own loop, not down through the login's futures).
/// Accepts clients on the Unix socket (`unix_socket_dir`) until shutdown.
pub async fn accept_unix_loop(
    listener: tokio::net::UnixListener,
    shared: Arc<Shared>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            r = listener.accept() => match r.and_then(|(s, _)| crate::protocol::stream::unix_as_tcp(s)) {
                Ok(stream) => {
                    tokio::spawn(crate::watchdog::Watched::new(&shared.watchdog, 0, serve(stream, shared.clone())));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept on the Unix socket failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            _ = shutdown.changed() => return,
        }
    }
}

/// The Unix socket for clients: `DIR/.s.PGSQL.PORT`, PostgreSQL's and
/// PgBouncer's name, so `psql -h DIR -p PORT` finds it. A file left by a
/// process that is gone is replaced; one that answers is an error.
/// `replacing`: a takeover, whose old process still has the file.
pub fn bind_unix(
    dir: &str,
    port: u16,
    replacing: bool,
) -> std::io::Result<(tokio::net::UnixListener, std::path::PathBuf)> {
    let path = std::path::Path::new(dir).join(format!(".s.PGSQL.{port}"));
    if !replacing && std::os::unix::net::UnixStream::connect(&path).is_ok() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!("{} is in use by another server", path.display()),
        ));
    }
    // Only a socket file is replaced, never another kind of file.
    if let Ok(m) = std::fs::symlink_metadata(&path) {
        use std::os::unix::fs::FileTypeExt;
        if !m.file_type().is_socket() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        std::fs::remove_file(&path)?;
    }
    let l = tokio::net::UnixListener::bind(&path)?;
    // Who may log in is decided by authentication (and `local` lines of
    // auth_hba_file), as with PgBouncer's default unix_socket_mode.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777))?;
    Ok((l, path))
}

/// (device, inode) of a file, to know it again.
pub fn file_id(path: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// Removes the socket file at exit if it is still the one this process
/// made (a successor may have put its own there).
pub fn remove_unix_if_ours(path: &std::path::Path, ours: Option<(u64, u64)>) {
    if ours.is_some() && file_id(path) == ours {
        let _ = std::fs::remove_file(path);
    }
}

async fn serve(stream: TcpStream, shared: Arc<Shared>) {
    let slot = client::ClientSlot::new(&shared);
    let id = shared.next_client_id();
    // Shutting down: a connection accepted just before is refused, unless
    // the process waits for its clients (a takeover, WAIT_FOR_CLIENTS):
    // then it is served like the others.
    if shared.lifecycle.shutting_down.load(Ordering::Relaxed)
        && !shared.lifecycle.wait_for_clients.load(Ordering::Relaxed)
    {
        return;
    }
    // A debug-level span, and only when debug logging is on: otherwise the
    // task is not wrapped at all (nothing to enter and exit on every poll).
    // Info and warn lines of a client carry `client` (its id) themselves.
    let debug = tracing::enabled!(tracing::Level::DEBUG);
    let peer = if debug { stream.peer_addr().ok() } else { None };
    let work = async move {
        if !crate::protocol::stream::is_unix_socket(&stream) {
            // TCP only (a Unix socket has neither).
            let _ = stream.set_nodelay(true);
            let keepalive = shared.settings().config.keepalive();
            if let Err(e) = crate::protocol::keepalive::apply(&stream, &keepalive) {
                tracing::warn!(error = %e, "could not set TCP keepalive on a client connection");
            }
        }
        match Box::pin(client::startup::login(stream, &shared, id)).await {
            Some(client::startup::Login::Client {
                stream,
                login,
                listed,
            }) => {
                let session = Box::new(client::session::Session::new(
                    stream,
                    shared.clone(),
                    *login,
                    listed,
                ));
                let run = crate::watchdog::Watched::new(&shared.watchdog, id, session.run(slot));
                if debug {
                    tokio::spawn(run.instrument(tracing::Span::current()));
                } else {
                    tokio::spawn(run);
                }
            }
            Some(client::startup::Login::Admin {
                stream,
                login,
                listed,
            }) => {
                let console = crate::admin::Console::new(stream, shared.clone(), login, listed);
                Box::pin(console.run()).await;
                drop(slot);
                tracing::debug!("client finished");
            }
            None => tracing::debug!("client finished"),
        }
    };
    if debug {
        work.instrument(tracing::debug_span!("client", id, peer = %peer.map(|a| a.to_string()).unwrap_or_default()))
            .await;
    } else {
        work.await;
    }
}
