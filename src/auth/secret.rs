//! A user's configured password in one of its three forms.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;

use super::AuthType;

/// A parsed SCRAM-SHA-256 verifier (as stored in `pg_authid`).
#[derive(Clone, PartialEq, Eq)]
pub struct ScramVerifier {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

#[derive(Clone)]
pub enum Secret {
    Plain(String),
    Scram(ScramVerifier),
    /// `md5` followed by 32 hex digits: md5(password || username).
    Md5(String),
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.kind())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SecretError(String);

impl Secret {
    pub fn parse(s: &str) -> Result<Secret, SecretError> {
        if let Some(rest) = s.strip_prefix("SCRAM-SHA-256$") {
            return parse_verifier(rest).map(Secret::Scram).ok_or_else(|| {
                SecretError(
                    "malformed SCRAM-SHA-256 verifier (expected SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>)"
                        .into(),
                )
            });
        }
        if s.len() == 35 && s.starts_with("md5") && s[3..].bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(Secret::Md5(s.to_ascii_lowercase()));
        }
        Ok(Secret::Plain(s.to_owned()))
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Secret::Plain(_) => "plain password",
            Secret::Scram(_) => "SCRAM-SHA-256 verifier",
            Secret::Md5(_) => "md5 hash",
        }
    }

    /// Whether clients can be verified with `auth` using this secret. A
    /// SCRAM verifier asked for md5 verifies with SCRAM, as PostgreSQL does.
    pub fn supports(&self, auth: AuthType) -> bool {
        matches!(
            (self, auth),
            (_, AuthType::Trust)
                | (Secret::Plain(_), _)
                | (Secret::Scram(_), AuthType::ScramSha256 | AuthType::Md5)
                | (Secret::Md5(_), AuthType::Md5)
                | (_, AuthType::Password)
        )
    }

    /// Whether `password` (sent in clear text) is this secret's password.
    /// For a SCRAM verifier this runs its PBKDF2 iterations.
    pub fn matches_password(&self, user: &str, password: &[u8]) -> bool {
        let eq = super::constant_time_eq;
        match self {
            Secret::Plain(p) => eq(p.as_bytes(), password),
            Secret::Md5(h) => eq(
                h.as_bytes(),
                postgres_protocol::password::md5(password, user).as_bytes(),
            ),
            Secret::Scram(v) => super::scram::password_matches(v, password),
        }
    }

    /// The verifier used to check a client's SCRAM proof. A plain password
    /// gets a fresh random salt per call; callers keep the result.
    pub fn scram_verifier(&self) -> Option<ScramVerifier> {
        match self {
            Secret::Scram(v) => Some(v.clone()),
            Secret::Plain(p) => {
                let v = postgres_protocol::password::scram_sha_256(p.as_bytes());
                v.strip_prefix("SCRAM-SHA-256$").and_then(parse_verifier)
            }
            Secret::Md5(_) => None,
        }
    }

    /// `md5` + md5(password || username), as PostgreSQL stores it.
    pub fn md5_hash(&self, user: &str) -> Option<String> {
        match self {
            Secret::Md5(h) => Some(h.clone()),
            Secret::Plain(p) => Some(postgres_protocol::password::md5(p.as_bytes(), user)),
            Secret::Scram(_) => None,
        }
    }
}

fn parse_verifier(s: &str) -> Option<ScramVerifier> {
    let (iter_salt, keys) = s.split_once('$')?;
    let (iter, salt) = iter_salt.split_once(':')?;
    let (stored, server) = keys.split_once(':')?;
    Some(ScramVerifier {
        iterations: iter.parse().ok().filter(|&i| i > 0)?,
        salt: B64.decode(salt).ok()?,
        stored_key: B64.decode(stored).ok()?.try_into().ok()?,
        server_key: B64.decode(server).ok()?.try_into().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_forms() {
        let v = postgres_protocol::password::scram_sha_256(b"pw");
        assert!(matches!(Secret::parse(&v).unwrap(), Secret::Scram(_)));
        assert!(matches!(
            Secret::parse("md5aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa").unwrap(),
            Secret::Md5(_)
        ));
        assert!(matches!(Secret::parse("secret").unwrap(), Secret::Plain(_)));
        assert!(Secret::parse("SCRAM-SHA-256$x:y$z").is_err());
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let s = Secret::parse("hunter2").unwrap();
        assert!(!format!("{s:?}").contains("hunter2"));
    }
}
