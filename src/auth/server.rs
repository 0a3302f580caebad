//! Logging in to PostgreSQL: tidepool plays the client's part of whichever
//! method the server asks for (SCRAM-SHA-256, md5, cleartext or trust).

use bytes::BytesMut;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::AuthError;
use super::scram::{KeyClient, MECHANISM, ScramKeys};
use crate::protocol::frame::read_frame;
use crate::protocol::messages::{Body, error_fields};
use crate::protocol::tag::{BackendTag, auth_code};
use crate::protocol::write;

const LIMIT: usize = 64 * 1024;

/// What tidepool can prove to PostgreSQL for one user.
#[derive(Clone, Debug)]
pub enum Credentials {
    /// Nothing: works only if the server trusts us.
    None,
    Password(String),
    /// `md5...` as stored by PostgreSQL: enough for md5 auth.
    Md5Hash(String),
    /// Recovered from a client's SCRAM login (verifier passthrough).
    Scram(ScramKeys),
}

/// Runs authentication after the startup packet was sent; returns at
/// AuthenticationOk.
pub async fn login<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    user: &str,
    creds: &Credentials,
) -> Result<(), AuthError> {
    let mut out = BytesMut::new();
    let mut sasl: Option<Sasl> = None;
    loop {
        let frame = read_frame(stream, buf, LIMIT).await?;
        match BackendTag::from_byte(frame.tag) {
            BackendTag::ErrorResponse => {
                let fields =
                    error_fields(&frame.body).map_err(|e| AuthError::Protocol(e.to_string()))?;
                return Err(AuthError::Server(Box::new(fields)));
            }
            BackendTag::Authentication => {}
            BackendTag::NegotiateProtocolVersion => continue,
            other => {
                return Err(AuthError::Protocol(format!(
                    "unexpected message '{}' during login",
                    other.byte() as char
                )));
            }
        }
        let mut b = Body::new(&frame.body, "Authentication");
        let code = b.i32().map_err(|e| AuthError::Protocol(e.to_string()))?;
        out.clear();
        match code {
            auth_code::OK => return Ok(()),
            auth_code::CLEARTEXT => {
                let Credentials::Password(p) = creds else {
                    return Err(AuthError::NoPassword(user.to_owned()));
                };
                let mut pw = p.as_bytes().to_vec();
                pw.push(0);
                write::password(&mut out, &pw);
            }
            auth_code::MD5 => {
                let salt: [u8; 4] = b
                    .bytes(4)
                    .ok()
                    .and_then(|s| s.try_into().ok())
                    .ok_or_else(|| AuthError::Protocol("bad md5 salt".into()))?;
                let hashed = match creds {
                    Credentials::Password(p) => postgres_protocol::authentication::md5_hash(
                        user.as_bytes(),
                        p.as_bytes(),
                        salt,
                    ),
                    Credentials::Md5Hash(h) => super::client::salted_md5(h, salt),
                    _ => return Err(AuthError::NoPassword(user.to_owned())),
                };
                let mut pw = hashed.into_bytes();
                pw.push(0);
                write::password(&mut out, &pw);
            }
            auth_code::SASL => {
                let mut offered = false;
                while let Ok(m) = b.cstr() {
                    if m.is_empty() {
                        break;
                    }
                    offered |= m == MECHANISM;
                }
                if !offered {
                    return Err(AuthError::Unsupported("SASL without SCRAM-SHA-256".into()));
                }
                let (state, first) = Sasl::start(creds, user)?;
                write::sasl_initial_response(&mut out, MECHANISM, &first);
                sasl = Some(state);
            }
            auth_code::SASL_CONTINUE => {
                let state = sasl
                    .as_mut()
                    .ok_or_else(|| AuthError::Protocol("SASL continue before start".into()))?;
                let reply = state.update(b.rest())?;
                write::password(&mut out, &reply);
            }
            auth_code::SASL_FINAL => {
                let state = sasl
                    .as_mut()
                    .ok_or_else(|| AuthError::Protocol("SASL final before start".into()))?;
                state.finish(b.rest())?;
                continue;
            }
            other => return Err(AuthError::Unsupported(format!("code {other}"))),
        }
        stream.write_all(&out).await?;
    }
}

enum Sasl {
    Password(Box<ScramSha256>),
    Keys(KeyClient),
}

impl Sasl {
    fn start(creds: &Credentials, user: &str) -> Result<(Self, Vec<u8>), AuthError> {
        match creds {
            Credentials::Password(p) => {
                let s = ScramSha256::new(p.as_bytes(), ChannelBinding::unsupported());
                let first = s.message().to_vec();
                Ok((Sasl::Password(Box::new(s)), first))
            }
            Credentials::Scram(keys) => {
                let (c, first) = KeyClient::start(*keys);
                Ok((Sasl::Keys(c), first.into_bytes()))
            }
            _ => Err(AuthError::NoPassword(user.to_owned())),
        }
    }

    fn update(&mut self, data: &[u8]) -> Result<Vec<u8>, AuthError> {
        match self {
            Sasl::Password(s) => {
                s.update(data)
                    .map_err(|e| AuthError::Protocol(e.to_string()))?;
                Ok(s.message().to_vec())
            }
            Sasl::Keys(c) => c
                .update(data)
                .map(String::into_bytes)
                .map_err(|e| AuthError::Protocol(e.to_string())),
        }
    }

    fn finish(&mut self, data: &[u8]) -> Result<(), AuthError> {
        match self {
            Sasl::Password(s) => s
                .finish(data)
                .map_err(|e| AuthError::Protocol(e.to_string())),
            Sasl::Keys(c) => c
                .finish(data)
                .map_err(|e| AuthError::Protocol(e.to_string())),
        }
    }
}
