//! Opening a server connection: TCP, TLS as `server_tls_sslmode` says (an
//! SSLRequest first), startup packet, login, and reading the initial
//! ParameterStatus set and BackendKeyData up to ReadyForQuery.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::protocol::stream::Stream;
use crate::tls::{Connector, Mode};

use super::{CancelKey, INTERNAL_LIMIT, ServerConn, ServerError};
use crate::auth::server::{Credentials, login};
use crate::protocol::frame::read_frame;
use crate::protocol::messages::{
    backend_key_data, error_fields, parameter_status, ready_for_query,
};
use crate::protocol::tag::BackendTag;
use crate::protocol::write;

/// Everything needed to open one server connection.
#[derive(Debug, Clone)]
pub struct ConnectSpec {
    pub host: String,
    pub port: u16,
    pub dbname: String,
    pub user: String,
    pub creds: Credentials,
    pub timeout: Duration,
    /// How TLS is negotiated (None: plain).
    pub tls: Option<std::sync::Arc<Connector>>,
    pub keepalive: crate::protocol::keepalive::KeepAlive,
}

pub async fn connect(spec: &ConnectSpec) -> Result<ServerConn, ServerError> {
    match tokio::time::timeout(spec.timeout, connect_inner(spec)).await {
        Ok(r) => r,
        Err(_) => Err(ServerError::Timeout),
    }
}

/// Asks the server for TLS (SSLRequest) unless the mode is disable, and
/// makes the handshake when it agrees; a server that refuses is refused in
/// turn when the mode requires TLS.
/// Over a Unix-domain socket there is no TLS (PostgreSQL refuses it there
/// and libpq does not ask, whatever the mode): the socket is local.
async fn negotiate_tls(
    mut tcp: TcpStream,
    unix: bool,
    spec: &ConnectSpec,
) -> Result<Stream, ServerError> {
    let Some((mode, config)) = spec
        .tls
        .as_deref()
        .and_then(|c| Some((c.mode, c.config.clone()?)))
        .filter(|(m, _)| *m != Mode::Disable && !unix)
    else {
        return Ok(Stream::plain(tcp));
    };
    let mut req = BytesMut::with_capacity(8);
    req.put_i32(8);
    req.put_i32(crate::protocol::tag::SSL_REQUEST_CODE);
    tcp.write_all(&req).await?;
    match tcp.read_u8().await? {
        b'S' => {
            let name = Connector::server_name(&spec.host).map_err(ServerError::Tls)?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(|e| {
                    ServerError::Tls(format!("TLS handshake with the server failed: {e}"))
                })?;
            let (tcp, conn) = tls.into_inner();
            Ok(Stream::tls(tcp, rustls::Connection::Client(conn)))
        }
        b'N' if mode.required() => Err(ServerError::Tls(format!(
            "the server does not accept TLS (server_tls_sslmode = {})",
            mode.name()
        ))),
        b'N' => Ok(Stream::plain(tcp)),
        other => Err(ServerError::Tls(format!(
            "unexpected answer to SSLRequest: {:?}",
            other as char
        ))),
    }
}

async fn connect_inner(spec: &ConnectSpec) -> Result<ServerConn, ServerError> {
    let (tcp, addr) = super::addr::open(&spec.host, spec.port, &spec.keepalive).await?;
    let mut stream = negotiate_tls(tcp, addr.is_unix(), spec).await?;
    let mut out = BytesMut::new();
    write::startup(
        &mut out,
        &[
            ("user", &spec.user),
            ("database", &spec.dbname),
            ("application_name", "tidepool"),
        ],
    );
    stream.write_all(&out).await?;
    let mut buf = BytesMut::new();
    login(&mut stream, &mut buf, &spec.user, &spec.creds).await?;

    let mut params = BTreeMap::new();
    let mut key = None;
    loop {
        let frame = read_frame(&mut stream, &mut buf, INTERNAL_LIMIT).await?;
        match BackendTag::from_byte(frame.tag) {
            BackendTag::ParameterStatus => {
                let (k, v) = parameter_status(&frame.body)?;
                params.insert(k.to_owned(), v.to_owned());
            }
            BackendTag::BackendKeyData => {
                let (pid, secret) = backend_key_data(&frame.body)?;
                key = Some(CancelKey {
                    addr: addr.clone(),
                    pid,
                    secret,
                });
            }
            BackendTag::ErrorResponse => {
                return Err(ServerError::Query(error_fields(&frame.body)?));
            }
            BackendTag::ReadyForQuery => {
                ready_for_query(&frame.body)?;
                break;
            }
            _ => {}
        }
    }
    let key = key.unwrap_or(CancelKey {
        addr,
        pid: 0,
        secret: 0,
    });
    let mut conn = ServerConn::new(stream, key, params);
    conn.buf = buf;
    Ok(conn)
}
