//! Verifying a client: tidepool plays the PostgreSQL server's part of the
//! SCRAM-SHA-256, md5 or trust exchange. The caller sends AuthenticationOk or
//! the error response; this module only decides.

use bytes::BytesMut;
use rand::RngExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::AuthError;
use super::AuthType;
use super::scram::{MECHANISM, MECHANISM_PLUS, ServerExchange};
use super::secret::{ScramVerifier, Secret};
use crate::protocol::FrontendTag;
use crate::protocol::frame::read_frame;
use crate::protocol::messages::Body;
use crate::protocol::tag::auth_code;
use crate::protocol::write;

/// PostgreSQL's limit for a password, SASLInitialResponse or SASLResponse
/// message: a length word of at most 1,024 (so 1,025 bytes with the tag).
/// PostgreSQL answers a longer one with "password authentication failed".
const AUTH_MESSAGE_LIMIT: usize = 1024 + 1;

/// What a successful login proved.
#[derive(Debug, Default)]
pub struct Verified {
    /// The client's SCRAM ClientKey, when it logged in with SCRAM.
    pub client_key: Option<[u8; 32]>,
}

/// What the exchange checks a client against.
pub struct Expected<'a> {
    pub user: &'a str,
    /// False for users missing from the config: they still go through a full
    /// exchange so that messages don't reveal whether the user exists.
    pub known: bool,
    pub secret: Option<&'a Secret>,
    pub verifier: Option<&'a ScramVerifier>,
    /// Verifier used in place of a missing one.
    pub decoy: &'a ScramVerifier,
    pub auth: AuthType,
    /// The connection's TLS channel-binding data (tls-server-end-point):
    /// SCRAM-SHA-256-PLUS is offered with it.
    pub binding: Option<&'a [u8]>,
}

/// Runs the exchange.
pub async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    e: &Expected<'_>,
) -> Result<Verified, AuthError> {
    let Expected {
        user,
        known,
        secret,
        verifier,
        decoy,
        auth,
        binding,
    } = *e;
    match auth {
        AuthType::Trust if known => Ok(Verified::default()),
        AuthType::Trust => Err(AuthError::Failed(user.to_owned())),
        // As PostgreSQL: md5 asked for, but the password is stored as a
        // SCRAM verifier, which cannot check an md5 answer: SCRAM instead.
        AuthType::Md5 if matches!(secret, Some(Secret::Scram(_))) => {
            scram(stream, buf, user, (verifier, decoy), binding).await
        }
        AuthType::Md5 => md5(stream, buf, user, secret).await,
        AuthType::ScramSha256 => scram(stream, buf, user, (verifier, decoy), binding).await,
        AuthType::Password => password(stream, buf, user, secret).await,
    }
}

/// PostgreSQL's `password` method: the password in clear text.
async fn password<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    user: &str,
    secret: Option<&Secret>,
) -> Result<Verified, AuthError> {
    let mut out = BytesMut::new();
    write::auth_request(&mut out, auth_code::CLEARTEXT, &[]);
    stream.write_all(&out).await?;
    let body = read_password(stream, buf, user).await?;
    let sent = Body::new(&body, "PasswordMessage")
        .cbytes()
        .map_err(|e| AuthError::Protocol(e.to_string()))?
        .to_vec();
    let Some(secret) = secret.cloned() else {
        return Err(AuthError::Failed(user.to_owned()));
    };
    // A SCRAM verifier costs its PBKDF2 iterations: off the event loop. The
    // password proves the ClientKey a SCRAM login would have, which logs
    // the client in to the server as SCRAM passthrough does.
    let owner = user.to_owned();
    let checked = tokio::task::spawn_blocking(move || match &secret {
        Secret::Scram(v) => super::scram::client_key_of(v, &sent).map(Some),
        other => other.matches_password(&owner, &sent).then_some(None),
    })
    .await
    .ok()
    .flatten();
    match checked {
        Some(client_key) => Ok(Verified { client_key }),
        None => Err(AuthError::Failed(user.to_owned())),
    }
}

async fn read_password<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    user: &str,
) -> Result<BytesMut, AuthError> {
    use crate::protocol::frame::FrameError;
    let frame = match read_frame(stream, buf, AUTH_MESSAGE_LIMIT).await {
        Ok(f) => f,
        // A length PostgreSQL refuses fails the login, in its words.
        Err(FrameError::Protocol(_)) => return Err(AuthError::Failed(user.to_owned())),
        Err(e) => return Err(e.into()),
    };
    if FrontendTag::from_byte(frame.tag) != FrontendTag::Password {
        return Err(AuthError::Protocol(format!(
            "expected password response, got message type '{}'",
            frame.tag as char
        )));
    }
    Ok(frame.body)
}

async fn md5<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    user: &str,
    secret: Option<&Secret>,
) -> Result<Verified, AuthError> {
    let salt: [u8; 4] = rand::rng().random();
    let mut out = BytesMut::new();
    write::auth_request(&mut out, auth_code::MD5, &salt);
    stream.write_all(&out).await?;
    let body = read_password(stream, buf, user).await?;
    let mut b = Body::new(&body, "PasswordMessage");
    let sent = b.cstr().map_err(|e| AuthError::Protocol(e.to_string()))?;
    let Some(stored) = secret.and_then(|s| s.md5_hash(user)) else {
        return Err(AuthError::Failed(user.to_owned()));
    };
    let expected = salted_md5(&stored, salt);
    if super::constant_time_eq(sent.as_bytes(), expected.as_bytes()) {
        Ok(Verified::default())
    } else {
        Err(AuthError::Failed(user.to_owned()))
    }
}

/// `md5` + md5(hex-part-of-stored || salt): what a client sends for md5 auth.
pub fn salted_md5(stored: &str, salt: [u8; 4]) -> String {
    use md5::{Digest, Md5};
    let hex = stored.strip_prefix("md5").unwrap_or(stored);
    let mut h = Md5::new();
    h.update(hex.as_bytes());
    h.update(salt);
    let digest = h.finalize();
    let mut s = String::with_capacity(35);
    s.push_str("md5");
    for byte in digest.iter() {
        s.push_str(&format!("{byte:02x}"));
    }
    s
}

async fn scram<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    user: &str,
    (verifier, decoy): (Option<&ScramVerifier>, &ScramVerifier),
    binding: Option<&[u8]>,
) -> Result<Verified, AuthError> {
    let mut out = BytesMut::new();
    // As PostgreSQL: with TLS, the channel-bound mechanism first.
    if binding.is_some() {
        write::auth_sasl_mechanisms(&mut out, &[MECHANISM_PLUS, MECHANISM]);
    } else {
        write::auth_sasl_mechanisms(&mut out, &[MECHANISM]);
    }
    stream.write_all(&out).await?;

    let body = read_password(stream, buf, user).await?;
    let mut b = Body::new(&body, "SASLInitialResponse");
    let proto = |e: crate::protocol::ProtocolError| AuthError::Protocol(e.to_string());
    let mechanism = b.cstr().map_err(proto)?;
    let plus = match mechanism {
        MECHANISM => false,
        MECHANISM_PLUS if binding.is_some() => true,
        _ => {
            return Err(AuthError::Protocol(format!(
                "unsupported SASL mechanism \"{mechanism}\""
            )));
        }
    };
    let len = b.i32().map_err(proto)?;
    let data = b
        .bytes(usize::try_from(len).map_err(|_| AuthError::Protocol("bad SASL length".into()))?)
        .map_err(proto)?;

    // Unknown users get the decoy verifier: same messages, certain failure.
    // Its salt is derived from the user name, so it is stable per name, as
    // PostgreSQL's mock salt is.
    let known = verifier.is_some();
    let v = match verifier {
        Some(v) => v.clone(),
        None => {
            use sha2::{Digest, Sha256};
            let mut d = decoy.clone();
            let digest = Sha256::new()
                .chain_update(&decoy.salt)
                .chain_update(user.as_bytes())
                .finalize();
            d.salt = digest[..16].to_vec();
            d
        }
    };
    let offered = super::scram::Binding {
        data: binding,
        plus,
    };
    let (exchange, server_first) =
        ServerExchange::start(v, data, offered).map_err(|e| AuthError::Protocol(e.to_string()))?;
    out.clear();
    write::auth_request(&mut out, auth_code::SASL_CONTINUE, server_first.as_bytes());
    stream.write_all(&out).await?;

    let body = read_password(stream, buf, user).await?;
    match exchange.finish(&body) {
        Ok((server_final, client_key)) if known => {
            out.clear();
            write::auth_request(&mut out, auth_code::SASL_FINAL, server_final.as_bytes());
            stream.write_all(&out).await?;
            Ok(Verified {
                client_key: Some(client_key),
            })
        }
        Ok(_) | Err(super::scram::ScramError::BadProof) => Err(AuthError::Failed(user.to_owned())),
        Err(e) => Err(AuthError::Protocol(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn salted_md5_matches_libpq() {
        let stored = postgres_protocol::password::md5(b"pw", "u");
        let salt = [1, 2, 3, 4];
        let client = postgres_protocol::authentication::md5_hash(b"u", b"pw", salt);
        assert_eq!(salted_md5(&stored, salt), client);
    }
}
