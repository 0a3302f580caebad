//! TLS for tidepool's own tokio-postgres connections (the health checker's,
//! auth_query's): the database's
//! `server_tls_*` settings (the same rustls configuration as pooled server
//! connections), given to tokio-postgres through its `MakeTlsConnect`.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};

use crate::tls::{Connector, Mode};

/// Makes one TLS connector per connection (the host is its server name).
#[derive(Clone)]
pub struct MakeRustls(pub Arc<rustls::ClientConfig>);

pub struct RustlsConnect {
    config: Arc<rustls::ClientConfig>,
    name: rustls::pki_types::ServerName<'static>,
}

/// The TLS stream tokio-postgres reads and writes.
pub struct RustlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S> MakeTlsConnect<S> for MakeRustls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, io::Error> {
        let name = Connector::server_name(domain).map_err(io::Error::other)?;
        Ok(RustlsConnect {
            config: self.0.clone(),
            name,
        })
    }
}

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            tokio_rustls::TlsConnector::from(self.config)
                .connect(self.name, stream)
                .await
                .map(RustlsStream)
        })
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

/// tokio-postgres' sslmode for a `server_tls_sslmode`.
pub fn ssl_mode(mode: Mode) -> tokio_postgres::config::SslMode {
    use tokio_postgres::config::SslMode;
    match mode {
        Mode::Disable => SslMode::Disable,
        Mode::Allow | Mode::Prefer => SslMode::Prefer,
        _ => SslMode::Require,
    }
}

/// Why [`connect`] failed.
pub enum ConnectError {
    Timeout,
    Postgres(tokio_postgres::Error),
}

/// Connects `cfg` within `timeout`, over TLS as `tls` says (a database's
/// `server_tls_*`; None or disable: plain; a socket directory: plain, as
/// for pooled connections), and drives the connection in a task of its own.
pub async fn connect(
    cfg: &mut tokio_postgres::Config,
    tls: Option<&Connector>,
    timeout: std::time::Duration,
) -> Result<tokio_postgres::Client, ConnectError> {
    let local = cfg
        .get_hosts()
        .iter()
        .all(|h| matches!(h, tokio_postgres::config::Host::Unix(_)));
    match tls
        .and_then(|t| Some((t.mode, t.config.clone()?)))
        .filter(|_| !local)
    {
        Some((mode, config)) => {
            cfg.ssl_mode(ssl_mode(mode));
            connect_with(cfg, MakeRustls(config), timeout).await
        }
        None => connect_with(cfg, tokio_postgres::NoTls, timeout).await,
    }
}

async fn connect_with<T>(
    cfg: &tokio_postgres::Config,
    tls: T,
    timeout: std::time::Duration,
) -> Result<tokio_postgres::Client, ConnectError>
where
    T: MakeTlsConnect<tokio_postgres::Socket>,
    T::Stream: Send + 'static,
{
    let (client, conn) = tokio::time::timeout(timeout, cfg.connect(tls))
        .await
        .map_err(|_| ConnectError::Timeout)?
        .map_err(ConnectError::Postgres)?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}
