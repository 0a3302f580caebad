//! Untagged startup-phase packets: StartupMessage, SSLRequest, GSSENCRequest
//! and CancelRequest. Their length is bounded (`MAX_STARTUP_PACKET`) before
//! anything is read into memory.

use tokio::io::{AsyncRead, AsyncReadExt};

use super::ProtocolError;
use super::messages::Body;
use super::tag::{CANCEL_REQUEST_CODE, GSSENC_REQUEST_CODE, PROTOCOL_3_0, SSL_REQUEST_CODE};

/// PostgreSQL's own limit for a startup packet's body (after the length
/// word): the whole packet may be 4 bytes longer.
pub const MAX_STARTUP_PACKET: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    SslRequest,
    GssEncRequest,
    Cancel {
        pid: i32,
        secret: i32,
    },
    /// A StartupMessage of protocol 3.`minor` (tidepool speaks 3.0: a
    /// newer minor is answered with NegotiateProtocolVersion, as
    /// PostgreSQL does).
    Startup {
        minor: u16,
        params: Vec<(String, String)>,
    },
}

/// Errors reading a startup packet.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("connection closed during startup")]
    Eof,
    #[error(transparent)]
    Io(std::io::Error),
}

impl From<std::io::Error> for StartupError {
    fn from(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Self::Eof
        } else {
            Self::Io(e)
        }
    }
}

pub async fn read_packet<R: AsyncRead + Unpin>(r: &mut R) -> Result<StartupPacket, StartupError> {
    let len = r.read_i32().await?;
    if !(8..=MAX_STARTUP_PACKET as i32 + 4).contains(&len) {
        return Err(ProtocolError::StartupLength.into());
    }
    let mut body = vec![0u8; len as usize - 4];
    r.read_exact(&mut body).await?;
    Ok(parse(&body)?)
}

/// Parses a startup packet body (after the length word).
pub fn parse(body: &[u8]) -> Result<StartupPacket, ProtocolError> {
    let mut b = Body::new(body, "startup packet");
    let code = b.i32()?;
    match code {
        SSL_REQUEST_CODE if b.is_empty() => Ok(StartupPacket::SslRequest),
        GSSENC_REQUEST_CODE if b.is_empty() => Ok(StartupPacket::GssEncRequest),
        CANCEL_REQUEST_CODE => {
            let pid = b.i32()?;
            let secret = b.i32()?;
            Ok(StartupPacket::Cancel { pid, secret })
        }
        v if v >> 16 == PROTOCOL_3_0 >> 16 => {
            let mut params = Vec::new();
            loop {
                let key = b.cstr()?;
                if key.is_empty() {
                    break;
                }
                let value = b.cstr()?;
                params.push((key.to_owned(), value.to_owned()));
            }
            Ok(StartupPacket::Startup {
                minor: (v & 0xffff) as u16,
                params,
            })
        }
        other => Err(ProtocolError::unsupported_version(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_startup_and_requests() {
        let mut body = PROTOCOL_3_0.to_be_bytes().to_vec();
        body.extend_from_slice(b"user\0app\0database\0db\0\0");
        assert_eq!(
            parse(&body).unwrap(),
            StartupPacket::Startup {
                minor: 0,
                params: vec![
                    ("user".into(), "app".into()),
                    ("database".into(), "db".into())
                ]
            }
        );
        // 3.2 (libpq 18's max_protocol_version = latest): read, for the
        // handshake to negotiate down; 4.0 is refused.
        let mut body = (PROTOCOL_3_0 + 2).to_be_bytes().to_vec();
        body.extend_from_slice(b"user\0app\0_pq_.x\0y\0\0");
        assert!(matches!(
            parse(&body),
            Ok(StartupPacket::Startup { minor: 2, params }) if params.len() == 2
        ));
        assert!(parse(&[0, 4, 0, 0, 0]).is_err());
        assert_eq!(
            parse(&SSL_REQUEST_CODE.to_be_bytes()).unwrap(),
            StartupPacket::SslRequest
        );
        assert!(parse(&[0, 2, 0, 0]).is_err());
        let mut trunc = PROTOCOL_3_0.to_be_bytes().to_vec();
        trunc.extend_from_slice(b"user\0ap");
        assert!(parse(&trunc).is_err());
    }

    #[tokio::test]
    async fn oversized_length_is_rejected_before_reading() {
        let data: &[u8] = &[0x7f, 0, 0, 0];
        let mut r = data;
        assert!(matches!(
            read_packet(&mut r).await,
            Err(StartupError::Protocol(ProtocolError::StartupLength))
        ));
    }
}
