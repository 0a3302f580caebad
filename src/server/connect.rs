//! Opening a server connection: TCP, startup packet, login, and reading the
//! initial ParameterStatus set and BackendKeyData up to ReadyForQuery.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

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
}

pub async fn connect(spec: &ConnectSpec) -> Result<ServerConn, ServerError> {
    match tokio::time::timeout(spec.timeout, connect_inner(spec)).await {
        Ok(r) => r,
        Err(_) => Err(ServerError::Timeout),
    }
}

async fn connect_inner(spec: &ConnectSpec) -> Result<ServerConn, ServerError> {
    let mut stream = TcpStream::connect((spec.host.as_str(), spec.port)).await?;
    stream.set_nodelay(true)?;
    let addr: SocketAddr = stream.peer_addr()?;
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
                key = Some(CancelKey { addr, pid, secret });
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
