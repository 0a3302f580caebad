//! SCRAM-SHA-256 (RFC 5802/7677) message logic, without I/O.
//!
//! `ServerExchange` verifies a client against a stored verifier and recovers
//! the client's ClientKey, which `KeyClient` can later use to log in to
//! PostgreSQL when only a verifier (no plain password) is configured.
//!
//! Channel binding (RFC 5929 `tls-server-end-point`, the type PostgreSQL
//! offers): over TLS the server offers SCRAM-SHA-256-PLUS, and a client that
//! takes it proves it sees the certificate tidepool presented. As in
//! PostgreSQL, a client that says it could bind but believes the server
//! cannot (`y`) while the server can is refused: a man in the middle
//! stripped the offer.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, KeyInit, Mac};
use rand::RngExt;
use sha2::{Digest, Sha256};

use super::constant_time_eq;
use super::secret::ScramVerifier;

pub const MECHANISM: &str = "SCRAM-SHA-256";
/// SCRAM-SHA-256 with channel binding.
pub const MECHANISM_PLUS: &str = "SCRAM-SHA-256-PLUS";
/// The channel-binding type PostgreSQL (and tidepool) supports.
const CB_TYPE: &str = "tls-server-end-point";

/// What the server offered of channel binding, and what the client chose.
#[derive(Debug, Clone, Copy, Default)]
pub struct Binding<'a> {
    /// The connection's channel-binding data (offered when Some).
    pub data: Option<&'a [u8]>,
    /// The client chose SCRAM-SHA-256-PLUS.
    pub plus: bool,
}

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
    /// What the client-final-message's `c=` must carry: the GS2 header,
    /// then the channel-binding data when bound.
    cbind_input: Vec<u8>,
    nonce: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScramError {
    #[error("malformed SCRAM message")]
    Malformed,
    #[error("channel binding is not supported")]
    ChannelBinding,
    #[error(
        "SCRAM channel binding negotiation error: the client supports channel binding but thinks the server does not, and it does"
    )]
    Downgrade,
    #[error("SCRAM channel binding check failed")]
    BindingMismatch,
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
        binding: Binding<'_>,
    ) -> Result<(Self, String), ScramError> {
        Self::start_with_nonce(verifier, client_first, binding, &self::nonce())
    }

    /// As [`ServerExchange::start`], with the server's part of the nonce
    /// given (RFC 7677's test vector fixes it).
    fn start_with_nonce(
        verifier: ScramVerifier,
        client_first: &[u8],
        binding: Binding<'_>,
        server_nonce: &str,
    ) -> Result<(Self, String), ScramError> {
        let msg = std::str::from_utf8(client_first).map_err(|_| ScramError::Malformed)?;
        let mut it = msg.splitn(3, ',');
        let cb = it.next().ok_or(ScramError::Malformed)?;
        let authzid = it.next().ok_or(ScramError::Malformed)?;
        let bare = it.next().ok_or(ScramError::Malformed)?;
        let mut cbind_input = format!("{cb},{authzid},").into_bytes();
        match (cb.as_bytes().first(), binding.plus, binding.data) {
            (Some(b'n'), false, _) => {}
            (Some(b'y'), false, None) => {}
            (Some(b'y'), false, Some(_)) => return Err(ScramError::Downgrade),
            (Some(b'p'), true, Some(data)) if cb.strip_prefix("p=") == Some(CB_TYPE) => {
                cbind_input.extend_from_slice(data);
            }
            // PLUS without binding, binding without PLUS, another type.
            (Some(b'n' | b'y' | b'p'), _, _) => return Err(ScramError::ChannelBinding),
            _ => return Err(ScramError::Malformed),
        }
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
                cbind_input,
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
        if B64.decode(cbind).ok().as_deref() != Some(self.cbind_input.as_slice()) {
            return Err(ScramError::BindingMismatch);
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
    client_key_of(v, password).is_some()
}

/// The ClientKey of `password` under `v`'s salt and iterations, when it is
/// `v`'s password: what a SCRAM login would have proved, so a client that
/// sent its password in clear text can be logged in to the server with it.
pub fn client_key_of(v: &ScramVerifier, password: &[u8]) -> Option<[u8; 32]> {
    let salted = salted_password(password, &v.salt, v.iterations);
    let client_key = hmac(&salted, &[b"Client Key"]);
    let stored: [u8; 32] = Sha256::digest(client_key).into();
    constant_time_eq(&stored, &v.stored_key).then_some(client_key)
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
        let (server, first) =
            ServerExchange::start(v.clone(), client.message(), Binding::default()).unwrap();
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
        let (server, sfirst) =
            ServerExchange::start(v, first.as_bytes(), Binding::default()).unwrap();
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
            Binding::default(),
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
        let (server, first) =
            ServerExchange::start(v, client.message(), Binding::default()).unwrap();
        client.update(first.as_bytes()).unwrap();
        assert_eq!(
            server.finish(client.message()).unwrap_err(),
            ScramError::BadProof
        );
    }

    #[test]
    fn garbage_is_an_error() {
        let v = verifier("secret");
        assert!(ServerExchange::start(v.clone(), b"", Binding::default()).is_err());
        assert!(ServerExchange::start(v.clone(), b"\xff\xfe", Binding::default()).is_err());
        assert!(ServerExchange::start(v.clone(), b"n,,", Binding::default()).is_err());
        let (s, _) = ServerExchange::start(v, b"n,,n=,r=abc", Binding::default()).unwrap();
        assert!(s.finish(b"c=biws,r=x,p=zz").is_err());
    }

    #[test]
    fn channel_binding_over_tls() {
        let v = verifier("secret");
        let data = Sha256::digest(b"the certificate").to_vec();
        let offered = |plus| Binding {
            data: Some(&data),
            plus,
        };
        // A client that binds to the same certificate logs in.
        let mut client = ScramSha256::new(
            b"secret",
            ChannelBinding::tls_server_end_point(data.clone()),
        );
        let (server, first) =
            ServerExchange::start(v.clone(), client.message(), offered(true)).unwrap();
        client.update(first.as_bytes()).unwrap();
        let (fin, _) = server.finish(client.message()).unwrap();
        client.finish(fin.as_bytes()).unwrap();

        // One that saw another certificate (a man in the middle's) does not.
        let mut client = ScramSha256::new(
            b"secret",
            ChannelBinding::tls_server_end_point(Sha256::digest(b"another").to_vec()),
        );
        let (server, first) =
            ServerExchange::start(v.clone(), client.message(), offered(true)).unwrap();
        client.update(first.as_bytes()).unwrap();
        assert_eq!(
            server.finish(client.message()).err(),
            Some(ScramError::BindingMismatch)
        );

        // "I could bind but you cannot" while the server can: stripped offer.
        let client = ScramSha256::new(b"secret", ChannelBinding::unrequested());
        assert_eq!(
            ServerExchange::start(v.clone(), client.message(), offered(false)).err(),
            Some(ScramError::Downgrade)
        );
        // Without TLS that is fine; and a client that does not bind is fine.
        assert!(ServerExchange::start(v.clone(), client.message(), Binding::default()).is_ok());
        let client = ScramSha256::new(b"secret", ChannelBinding::unsupported());
        assert!(ServerExchange::start(v.clone(), client.message(), offered(false)).is_ok());
        // PLUS chosen without binding, or binding under the plain mechanism.
        assert!(ServerExchange::start(v.clone(), client.message(), offered(true)).is_err());
        let client = ScramSha256::new(
            b"secret",
            ChannelBinding::tls_server_end_point(data.clone()),
        );
        assert!(ServerExchange::start(v.clone(), client.message(), offered(false)).is_err());
        assert!(ServerExchange::start(v, b"p=tls-unique,,n=,r=abc", offered(true)).is_err());
    }
}
