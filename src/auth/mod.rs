//! Authentication in both directions: verifying clients (tidepool as the
//! server) and logging in to PostgreSQL (tidepool as the client).
//!
//! Invariant: passwords, verifiers and keys are never logged or put into
//! error messages.

pub mod client;
pub mod hba;
pub mod scram;
pub mod secret;
pub mod server;
pub mod throttle;

/// Equal bytes, compared in time that does not depend on where they differ
/// (passwords, hashes, proofs, tokens).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// How clients prove who they are (`[tidepool] auth_type`, or per user).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
pub enum AuthType {
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    #[serde(rename = "md5")]
    Md5,
    #[serde(rename = "trust")]
    Trust,
    /// The password in clear text (PostgreSQL's `password` method); meant
    /// for TLS connections.
    #[serde(rename = "password")]
    Password,
}

impl AuthType {
    /// The name in the config and in pg_hba.conf.
    pub fn name(self) -> &'static str {
        match self {
            AuthType::ScramSha256 => "scram-sha-256",
            AuthType::Md5 => "md5",
            AuthType::Trust => "trust",
            AuthType::Password => "password",
        }
    }
}

/// Errors during authentication in either direction.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("password authentication failed for user \"{0}\"")]
    Failed(String),
    #[error("authentication protocol violation: {0}")]
    Protocol(String),
    #[error("server requested unsupported authentication method {0}")]
    Unsupported(String),
    #[error("no password available to log in to the server as \"{0}\"")]
    NoPassword(String),
    #[error("server rejected login: {} ({})", .0.message, .0.code)]
    Server(Box<crate::protocol::messages::ErrorFields>),
    #[error(transparent)]
    Frame(#[from] crate::protocol::frame::FrameError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}
