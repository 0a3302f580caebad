//! SCRAM-SHA-256 (RFC 5802/7677) message logic, without I/O.
//!
//! `ServerExchange` verifies a client against a stored verifier and recovers
//! the client's ClientKey, which `KeyClient` can later use to log in to
//! PostgreSQL when only a verifier (no plain password) is configured. Channel
//! binding is not offered (no TLS yet), so `p=` GS2 headers are refused.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, KeyInit, Mac};
use rand::RngExt;
use sha2::{Digest, Sha256};

use super::constant_time_eq;
use super::secret::ScramVerifier;

pub const MECHANISM: &str = "SCRAM-SHA-256";

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    #[allow(clippy::expect_used)] // HMAC accepts keys of any length.
    let mut m = Hmac::<Sha256>::new_from_slice(key).expect("hmac accepts any key length");
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

fn nonce() -> String {
    let bytes: [u8; 18] = rand::rng().random();
    B64.encode(bytes)
}

fn attr(msg: &str, name: char) -> Option<&str> {
    msg.split(',').find_map(|part| {
        let mut chars = part.chars();
        (chars.next() == Some(name) && chars.next() == Some('=')).then(|| &part[2..])
    })
}

/// Server side of one exchange.
pub struct ServerExchange {
    verifier: ScramVerifier,
    client_first_bare: String,
    server_first: String,
    gs2_header: String,
    nonce: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScramError {
    #[error("malformed SCRAM message")]
    Malformed,
    #[error("channel binding is not supported")]
    ChannelBinding,
    #[error("SCRAM nonce mismatch")]
    Nonce,
    #[error("SCRAM proof does not match")]
    BadProof,
    #[error("server SCRAM signature does not match")]
    BadServerSignature,
}

impl ServerExchange {
    /// Takes the client-first-message; returns the exchange and server-first-message.
    pub fn start(
        verifier: ScramVerifier,
        client_first: &[u8],
    ) -> Result<(Self, String), ScramError> {
        Self::start_with_nonce(verifier, client_first, &self::nonce())
    }

    /// As [`ServerExchange::start`], with the server's part of the nonce
    /// given (RFC 7677's test vector fixes it).
    fn start_with_nonce(
        verifier: ScramVerifier,
        client_first: &[u8],
        server_nonce: &str,
    ) -> Result<(Self, String), ScramError> {
        let msg = std::str::from_utf8(client_first).map_err(|_| ScramError::Malformed)?;
        let (gs2_header, bare) = match msg.as_bytes().first() {
            Some(b'n') | Some(b'y') => {
                let mut it = msg.splitn(3, ',');
                let cb = it.next().ok_or(ScramError::Malformed)?;
                let authzid = it.next().ok_or(ScramError::Malformed)?;
                let bare = it.next().ok_or(ScramError::Malformed)?;
                (format!("{cb},{authzid},"), bare)
            }
            Some(b'p') => return Err(ScramError::ChannelBinding),
            _ => return Err(ScramError::Malformed),
        };
        // An empty client nonce is PostgreSQL's to accept too: the server's
        // own random part makes the combined nonce unique.
        let client_nonce = attr(bare, 'r').ok_or(ScramError::Malformed)?;
        let nonce = format!("{client_nonce}{server_nonce}");
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&verifier.salt),
            verifier.iterations
        );
        Ok((
            Self {
                verifier,
                client_first_bare: bare.to_owned(),
                server_first: server_first.clone(),
                gs2_header,
                nonce,
            },
            server_first,
        ))
    }

    /// Checks the client-final-message. Returns the server-final-message and
    /// the client's ClientKey.
    pub fn finish(self, client_final: &[u8]) -> Result<(String, [u8; 32]), ScramError> {
        let msg = std::str::from_utf8(client_final).map_err(|_| ScramError::Malformed)?;
        let (without_proof, proof_b64) = msg.rsplit_once(",p=").ok_or(ScramError::Malformed)?;
        let cbind = attr(without_proof, 'c').ok_or(ScramError::Malformed)?;
        if B64.decode(cbind).ok().as_deref() != Some(self.gs2_header.as_bytes()) {
            return Err(ScramError::ChannelBinding);
        }
        if attr(without_proof, 'r') != Some(self.nonce.as_str()) {
            return Err(ScramError::Nonce);
        }
        let proof: [u8; 32] = B64
            .decode(proof_b64)
            .ok()
            .and_then(|p| p.try_into().ok())
            .ok_or(ScramError::Malformed)?;
        let auth_message = format!(
            "{},{},{}",
            self.client_first_bare, self.server_first, without_proof
        );
        let signature = hmac(&self.verifier.stored_key, &[auth_message.as_bytes()]);
        let mut client_key = [0u8; 32];
        for i in 0..32 {
            client_key[i] = proof[i] ^ signature[i];
        }
        let stored: [u8; 32] = Sha256::digest(client_key).into();
        if !constant_time_eq(&stored, &self.verifier.stored_key) {
            return Err(ScramError::BadProof);
        }
        let server_sig = hmac(&self.verifier.server_key, &[auth_message.as_bytes()]);
        Ok((format!("v={}", B64.encode(server_sig)), client_key))
    }
}

/// Whether `password` gives the verifier's StoredKey (RFC 5802's Hi():
/// PBKDF2-HMAC-SHA-256 over the verifier's salt and iterations).
pub fn password_matches(v: &ScramVerifier, password: &[u8]) -> bool {
    let salted = salted_password(password, &v.salt, v.iterations);
    let client_key = hmac(&salted, &[b"Client Key"]);
    let stored: [u8; 32] = Sha256::digest(client_key).into();
    constant_time_eq(&stored, &v.stored_key)
}

/// RFC 5802's Hi(password, salt, iterations): PBKDF2 with HMAC-SHA-256.
fn salted_password(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut u = hmac(password, &[salt, &1u32.to_be_bytes()]);
    let mut salted = u;
    for _ in 1..iterations {
        u = hmac(password, &[&u]);
        for (s, x) in salted.iter_mut().zip(u) {
            *s ^= x;
        }
    }
    salted
}

/// Keys recovered from a client's SCRAM login, enough to log in to a server
/// whose verifier has the same salt and iteration count.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ScramKeys {
    pub client_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl std::fmt::Debug for ScramKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScramKeys(..)")
    }
}

/// Client side of an exchange using ClientKey/ServerKey instead of a password.
pub struct KeyClient {
    keys: ScramKeys,
    client_first_bare: String,
    auth_message: String,
}

impl KeyClient {
    /// Returns the client and the client-first-message.
    pub fn start(keys: ScramKeys) -> (Self, String) {
        let bare = format!("n=,r={}", nonce());
        let first = format!("n,,{bare}");
        (
            Self {
                keys,
                client_first_bare: bare,
                auth_message: String::new(),
            },
            first,
        )
    }

    /// Takes server-first, returns client-final.
    pub fn update(&mut self, server_first: &[u8]) -> Result<String, ScramError> {
        let sf = std::str::from_utf8(server_first).map_err(|_| ScramError::Malformed)?;
        let nonce = attr(sf, 'r').ok_or(ScramError::Malformed)?;
        let ours = attr(&self.client_first_bare, 'r').ok_or(ScramError::Malformed)?;
        if !nonce.starts_with(ours) {
            return Err(ScramError::Nonce);
        }
        let without_proof = format!("c=biws,r={nonce}");
        self.auth_message = format!("{},{},{}", self.client_first_bare, sf, without_proof);
        let stored: [u8; 32] = Sha256::digest(self.keys.client_key).into();
        let sig = hmac(&stored, &[self.auth_message.as_bytes()]);
        let mut proof = [0u8; 32];
        for i in 0..32 {
            proof[i] = self.keys.client_key[i] ^ sig[i];
        }
        Ok(format!("{without_proof},p={}", B64.encode(proof)))
    }

    /// Checks server-final.
    pub fn finish(&self, server_final: &[u8]) -> Result<(), ScramError> {
        let sf = std::str::from_utf8(server_final).map_err(|_| ScramError::Malformed)?;
        let v = attr(sf, 'v').ok_or(ScramError::Malformed)?;
        let expected = hmac(&self.keys.server_key, &[self.auth_message.as_bytes()]);
        match B64.decode(v) {
            Ok(sig) if constant_time_eq(&sig, &expected) => Ok(()),
            _ => Err(ScramError::BadServerSignature),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::secret::Secret;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    fn verifier(pw: &str) -> ScramVerifier {
        Secret::parse(pw).unwrap().scram_verifier().unwrap()
    }

    #[test]
    fn accepts_a_real_client_and_recovers_its_key() {
        let v = verifier("secret");
        let mut client = ScramSha256::new(b"secret", ChannelBinding::unsupported());
        let (server, first) = ServerExchange::start(v.clone(), client.message()).unwrap();
        client.update(first.as_bytes()).unwrap();
        let (fin, key) = server.finish(client.message()).unwrap();
        client.finish(fin.as_bytes()).unwrap();
        let stored: [u8; 32] = Sha256::digest(key).into();
        assert_eq!(stored, v.stored_key);

        // The recovered key logs in against the same verifier.
        let keys = ScramKeys {
            client_key: key,
            server_key: v.server_key,
        };
        let (mut kc, first) = KeyClient::start(keys);
        let (server, sfirst) = ServerExchange::start(v, first.as_bytes()).unwrap();
        let cfinal = kc.update(sfirst.as_bytes()).unwrap();
        let (sfinal, _) = server.finish(cfinal.as_bytes()).unwrap();
        kc.finish(sfinal.as_bytes()).unwrap();
    }

    /// RFC 7677, section 3: the exchange for user "user", password
    /// "pencil", byte for byte.
    #[test]
    fn rfc_7677_test_vector() {
        let salt = B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let salted = salted_password(b"pencil", &salt, 4096);
        let client_key = hmac(&salted, &[b"Client Key"]);
        let v = ScramVerifier {
            iterations: 4096,
            salt,
            stored_key: Sha256::digest(client_key).into(),
            server_key: hmac(&salted, &[b"Server Key"]),
        };
        let (server, first) = ServerExchange::start_with_nonce(
            v.clone(),
            b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO",
            "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0",
        )
        .unwrap();
        assert_eq!(
            first,
            "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
        );
        let (fin, key) = server
            .finish(b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
            .unwrap();
        assert_eq!(fin, "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=");
        assert_eq!(key, client_key);
        assert!(password_matches(&v, b"pencil"));
        assert!(!password_matches(&v, b"pencil2"));
    }

    #[test]
    fn a_clear_text_password_is_checked_against_the_verifier() {
        let v = verifier("s3cret");
        assert!(password_matches(&v, b"s3cret"));
        assert!(!password_matches(&v, b"s3cret "));
        assert!(!password_matches(&v, b""));
    }

    #[test]
    fn rejects_a_wrong_password() {
        let v = verifier("secret");
        let mut client = ScramSha256::new(b"wrong", ChannelBinding::unsupported());
        let (server, first) = ServerExchange::start(v, client.message()).unwrap();
        client.update(first.as_bytes()).unwrap();
        assert_eq!(
            server.finish(client.message()).unwrap_err(),
            ScramError::BadProof
        );
    }

    #[test]
    fn garbage_is_an_error() {
        let v = verifier("secret");
        assert!(ServerExchange::start(v.clone(), b"").is_err());
        assert!(ServerExchange::start(v.clone(), b"\xff\xfe").is_err());
        assert!(ServerExchange::start(v.clone(), b"n,,").is_err());
        let (s, _) = ServerExchange::start(v, b"n,,n=,r=abc").unwrap();
        assert!(s.finish(b"c=biws,r=x,p=zz").is_err());
    }
}
