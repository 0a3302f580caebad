//! Before the startup packet: SSLRequest and GSSENCRequest, and
//! PostgreSQL 17's direct TLS (a TLS ClientHello as the first byte, ALPN
//! `postgresql`). Answers `S` and makes the TLS handshake when
//! `client_tls_sslmode` allows TLS, `N` otherwise (PostgreSQL's own
//! behaviour: the client goes on in plain text or gives up).
//!
//! Invariants: bytes sent after an SSLRequest before the handshake (which a
//! man in the middle could have injected) end the connection, as in
//! PostgreSQL; a TLS handshake is made at most once; what the handshake
//! read beyond itself stays in the stream for the first read.

use std::os::fd::AsRawFd;

use tokio::net::TcpStream;

use crate::protocol::startup::{StartupError, StartupPacket, read_packet};
use crate::protocol::stream::Stream;
use crate::tls::{ALPN, Acceptor};

/// The first byte of a TLS record carrying a handshake message.
const TLS_HANDSHAKE: u8 = 0x16;

/// Negotiates encryption and reads the first packet that is not a request
/// for it. None: the connection ends silently (the peer left, or a
/// handshake failed).
pub async fn negotiate(
    tcp: TcpStream,
    tls: Option<&Acceptor>,
) -> Option<(Stream, Result<StartupPacket, StartupError>)> {
    let mut stream = Stream::plain(tcp);
    if let Some(acceptor) = tls {
        let mut first = [0u8; 1];
        if stream.tcp().peek(&mut first).await.ok()? == 1 && first[0] == TLS_HANDSHAKE {
            stream = accept(stream, acceptor, true).await?;
        }
    }
    // Each request is answered once, as PostgreSQL does; a second one is
    // refused (see `startup`).
    let (mut ssl_done, mut gss_done) = (false, false);
    loop {
        match read_packet(&mut stream).await {
            Ok(StartupPacket::SslRequest) if !stream.is_tls() && !ssl_done => match tls {
                Some(acceptor) => {
                    if sent_more(stream.tcp()) {
                        tracing::info!("client sent data after its SSLRequest; closing it");
                        return None;
                    }
                    stream.write_all(b"S").await.ok()?;
                    stream = accept(stream, acceptor, false).await?;
                }
                None => {
                    ssl_done = true;
                    stream.write_all(b"N").await.ok()?;
                }
            },
            Ok(StartupPacket::GssEncRequest) if !stream.is_tls() && !gss_done => {
                gss_done = true;
                stream.write_all(b"N").await.ok()?;
            }
            other => return Some((stream, other)),
        }
    }
}

/// Whether the client sent bytes beyond its SSLRequest already.
fn sent_more(tcp: &TcpStream) -> bool {
    let mut b = [0u8; 1];
    // SAFETY: receives at most one byte into `b`, without removing it.
    let n = unsafe {
        libc::recv(
            tcp.as_raw_fd(),
            b.as_mut_ptr().cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n > 0
}

/// The TLS handshake on a plain stream. Direct TLS must name ALPN
/// `postgresql`, as PostgreSQL requires.
async fn accept(stream: Stream, acceptor: &Acceptor, direct: bool) -> Option<Stream> {
    let tcp = stream.into_tcp().ok()?;
    let tls = match tokio_rustls::TlsAcceptor::from(acceptor.config.clone())
        .accept(tcp)
        .await
    {
        Ok(t) => t,
        Err(e) => {
            tracing::info!(error = %e, "client TLS handshake failed");
            return None;
        }
    };
    let (tcp, conn) = tls.into_inner();
    if direct && conn.alpn_protocol() != Some(ALPN) {
        tracing::info!("direct TLS connection without ALPN \"postgresql\"; closing it");
        return None;
    }
    Some(Stream::tls(tcp, rustls::Connection::Server(conn)))
}
