//! Where a server listens, and opening a socket to it. As in libpq, a `host`
//! that starts with `/` is the directory of PostgreSQL's Unix-domain socket
//! (`unix_socket_directories`), and the socket is `HOST/.s.PGSQL.PORT`;
//! anything else is a name or address reached over TCP.
//!
//! Invariant: a [`ServerAddr`] names the socket a connection was opened on,
//! so a cancel request for it goes to the same server by the same way.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::TcpStream;

/// The socket of one server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerAddr {
    Tcp(SocketAddr),
    /// A Unix-domain socket, with the port its name was made from (what
    /// SHOW SERVERS shows).
    Unix {
        path: Arc<Path>,
        port: u16,
    },
}

/// Whether `host` names a socket directory rather than a TCP host.
pub fn is_socket_dir(host: &str) -> bool {
    host.starts_with('/')
}

/// PostgreSQL's socket file for `port` in `dir`.
pub fn socket_path(dir: &str, port: u16) -> PathBuf {
    Path::new(dir).join(format!(".s.PGSQL.{port}"))
}

impl ServerAddr {
    /// Where `host` and `port` lead, without connecting for a TCP host (its
    /// address is known only once connected).
    fn unix(host: &str, port: u16) -> Option<Self> {
        is_socket_dir(host).then(|| ServerAddr::Unix {
            path: socket_path(host, port).into(),
            port,
        })
    }

    pub fn is_unix(&self) -> bool {
        matches!(self, ServerAddr::Unix { .. })
    }

    /// Opens a new socket to this server (e.g. for a cancel request).
    pub async fn connect(&self) -> std::io::Result<TcpStream> {
        match self {
            ServerAddr::Tcp(a) => TcpStream::connect(a).await,
            ServerAddr::Unix { path, .. } => unix_stream(path).await,
        }
    }
}

impl std::fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServerAddr::Tcp(a) => a.fmt(f),
            ServerAddr::Unix { path, .. } => path.display().fmt(f),
        }
    }
}

async fn unix_stream(path: &Path) -> std::io::Result<TcpStream> {
    let s = tokio::net::UnixStream::connect(path).await?;
    crate::protocol::stream::unix_as_tcp(s)
}

/// Opens a socket to `host`:`port`: TCP with `TCP_NODELAY` and the
/// keepalive settings, or the Unix-domain socket of a socket directory
/// (neither applies there).
pub async fn open(
    host: &str,
    port: u16,
    keepalive: &crate::protocol::keepalive::KeepAlive,
) -> std::io::Result<(TcpStream, ServerAddr)> {
    if let Some(addr) = ServerAddr::unix(host, port) {
        return Ok((addr.connect().await?, addr));
    }
    let tcp = TcpStream::connect((host, port)).await?;
    tcp.set_nodelay(true)?;
    crate::protocol::keepalive::apply(&tcp, keepalive)?;
    let addr = tcp.peer_addr()?;
    Ok((tcp, ServerAddr::Tcp(addr)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_starting_with_a_slash_is_a_socket_directory() {
        assert!(is_socket_dir("/var/run/postgresql"));
        assert!(!is_socket_dir("127.0.0.1"));
        assert!(!is_socket_dir("db.example.com"));
        assert!(!is_socket_dir("::1"));
        assert_eq!(
            socket_path("/var/run/postgresql", 5433),
            Path::new("/var/run/postgresql/.s.PGSQL.5433")
        );
        let a = ServerAddr::unix("/tmp/x", 6000).unwrap();
        assert!(a.is_unix());
        assert_eq!(a.to_string(), "/tmp/x/.s.PGSQL.6000");
        assert!(ServerAddr::unix("localhost", 6000).is_none());
    }

    #[tokio::test]
    async fn a_missing_socket_is_a_connect_error_not_a_panic() {
        let dir = std::env::temp_dir().join(format!("tidepool-addr-{}", std::process::id()));
        let err = open(
            dir.to_str().unwrap_or("/nonexistent"),
            1,
            &Default::default(),
        )
        .await
        .err();
        assert!(err.is_some());
    }
}
