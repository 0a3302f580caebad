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
async fn serve(stream: TcpStream, shared: Arc<Shared>) {
    let slot = client::ClientSlot::new(&shared);
    let id = shared.next_client_id();
    if shared.lifecycle.shutting_down.load(Ordering::Relaxed) {
        return;
    }
    // A debug-level span, and only when debug logging is on: otherwise the
    // task is not wrapped at all (nothing to enter and exit on every poll).
    // Info and warn lines of a client carry `client` (its id) themselves.
    let debug = tracing::enabled!(tracing::Level::DEBUG);
    let peer = if debug { stream.peer_addr().ok() } else { None };
    let work = async move {
        let _ = stream.set_nodelay(true);
        let keepalive = shared.settings().config.keepalive();
        if let Err(e) = crate::protocol::keepalive::apply(&stream, &keepalive) {
            tracing::warn!(error = %e, "could not set TCP keepalive on a client connection");
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
                let run = crate::watchdog::Watched::new(id, session.run(slot));
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
        work.instrument(tracing::debug_span!("client", id, peer = ?peer))
            .await;
    } else {
        work.await;
    }
}
