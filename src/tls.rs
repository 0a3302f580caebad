//! TLS settings made into rustls configurations, on both sides: tidepool as
//! the server its clients connect to (`client_tls_*`), and as the client of
//! PostgreSQL (`server_tls_*`). PgBouncer's names and meanings for the modes.
//!
//! Built when the config is loaded (a certificate or key that cannot be read
//! fails the load, and a reload keeps what is in force); each login and each
//! server connection takes the configuration in force when it starts, so a
//! reload changes certificates for new connections without touching
//! connected ones. The crypto is ring's.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

/// The ALPN protocol name PostgreSQL uses (required with direct TLS).
pub const ALPN: &[u8] = b"postgresql";

/// `client_tls_sslmode` / `server_tls_sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Plain only (a client asking for TLS is told `N`).
    Disable,
    /// Clients: TLS when they ask. Servers: TLS when the server offers it.
    Allow,
    /// Same as `allow` (PgBouncer's and libpq's preference for TLS).
    Prefer,
    /// TLS always; certificates not checked.
    Require,
    /// TLS always; the peer's certificate must chain to the CA file.
    VerifyCa,
    /// As `verify-ca`; for servers, the certificate must also name the host.
    VerifyFull,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Disable => "disable",
            Mode::Allow => "allow",
            Mode::Prefer => "prefer",
            Mode::Require => "require",
            Mode::VerifyCa => "verify-ca",
            Mode::VerifyFull => "verify-full",
        }
    }

    /// Plain connections are refused.
    pub fn required(self) -> bool {
        self >= Mode::Require
    }
}

fn provider() -> Arc<CryptoProvider> {
    // ring: no cmake/aws-lc build on a fresh machine; its missing
    // post-quantum key exchange is what the deprecation is about.
    #[allow(deprecated)]
    let p = rustls::crypto::ring::default_provider();
    Arc::new(p)
}

fn read_certs(path: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{what} {path}: {e}"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{what} {path}: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{what} {path}: no certificate in it"));
    }
    Ok(certs)
}

fn read_key(path: &str, what: &str) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| format!("{what} {path}: {e}"))
}

fn roots(path: &str, what: &str) -> Result<Arc<RootCertStore>, String> {
    let mut roots = RootCertStore::empty();
    for c in read_certs(path, what)? {
        roots.add(c).map_err(|e| format!("{what} {path}: {e}"))?;
    }
    Ok(Arc::new(roots))
}

/// Where Debian (and most distributions) keep the system's trusted roots.
pub const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// A client config for HTTPS (the OTLP exporter): certificates checked
/// against `ca_file`, or against the system's roots when there is none.
pub fn https_client_config(ca_file: Option<&str>) -> Result<rustls::ClientConfig, String> {
    let roots = match ca_file {
        Some(path) => roots(path, "CA file")?,
        None => {
            let mut roots = RootCertStore::empty();
            // A system bundle may hold certificates rustls cannot use; the
            // others still count.
            let (added, _) =
                roots.add_parsable_certificates(read_certs(SYSTEM_ROOTS, "system CA bundle")?);
            if added == 0 {
                return Err(format!("{SYSTEM_ROOTS}: no usable certificate"));
            }
            Arc::new(roots)
        }
    };
    https_config(roots)
}

/// A client config that trusts no one: for a connector that only ever
/// speaks plain http.
pub fn https_client_config_without_roots() -> Result<rustls::ClientConfig, String> {
    https_config(Arc::new(RootCertStore::empty()))
}

fn https_config(roots: Arc<RootCertStore>) -> Result<rustls::ClientConfig, String> {
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// The client side: what tidepool offers its clients.
#[derive(Debug, Clone)]
pub struct Acceptor {
    pub mode: Mode,
    pub config: Arc<rustls::ServerConfig>,
    /// SCRAM channel-binding data of the certificate presented
    /// ([`end_point`]); None when its signature's hash cannot say.
    pub end_point: Option<Arc<[u8]>>,
}

/// The files of `client_tls_*`.
#[derive(Debug, Clone, Copy)]
pub struct AcceptorFiles<'a> {
    pub mode: Mode,
    pub cert: Option<&'a str>,
    pub key: Option<&'a str>,
    pub ca: Option<&'a str>,
}

impl Acceptor {
    /// None when TLS is disabled; an error names the file and the key.
    pub fn build(f: AcceptorFiles<'_>) -> Result<Option<Acceptor>, (&'static str, String)> {
        if f.mode == Mode::Disable {
            return Ok(None);
        }
        let cert = f.cert.ok_or((
            "client_tls_cert_file",
            "required unless client_tls_sslmode is disable".to_owned(),
        ))?;
        let key = f.key.ok_or((
            "client_tls_key_file",
            "required unless client_tls_sslmode is disable".to_owned(),
        ))?;
        let certs = read_certs(cert, "certificate").map_err(|e| ("client_tls_cert_file", e))?;
        let end_point = certs.first().and_then(|c| end_point(c)).map(Arc::from);
        let key = read_key(key, "key").map_err(|e| ("client_tls_key_file", e))?;
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| ("client_tls_sslmode", e.to_string()))?;
        // With a CA file, client certificates are asked for (as PostgreSQL
        // does with ssl_ca_file) and verified when sent: required from
        // verify-ca on, and by HBA lines (`cert`, `clientcert=`) below it.
        let builder = match f.ca {
            None if f.mode >= Mode::VerifyCa => {
                return Err((
                    "client_tls_ca_file",
                    "required for verify-ca and verify-full".to_owned(),
                ));
            }
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let roots = roots(ca, "CA file").map_err(|e| ("client_tls_ca_file", e))?;
                let verifier =
                    rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider());
                let verifier = if f.mode >= Mode::VerifyCa {
                    verifier
                } else {
                    verifier.allow_unauthenticated()
                };
                let verifier = verifier
                    .build()
                    .map_err(|e| ("client_tls_ca_file", e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder
            .with_single_cert(certs, key)
            .map_err(|e| ("client_tls_key_file", e.to_string()))?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(Some(Acceptor {
            mode: f.mode,
            config: Arc::new(config),
            end_point,
        }))
    }
}

/// RFC 5929's `tls-server-end-point` data of a certificate (DER): its hash
/// under its signature algorithm's hash function, SHA-256 for MD5 and SHA-1,
/// as PostgreSQL computes it. None for an algorithm without a single hash
/// (Ed25519, RSASSA-PSS) or a certificate that does not parse: channel
/// binding is then not offered, as PostgreSQL cannot offer it either.
pub fn end_point(cert: &[u8]) -> Option<Vec<u8>> {
    use sha2::Digest;
    // Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signature }
    let (certificate, _) = der_sequence(cert)?;
    let (_tbs, rest) = der_element(certificate)?;
    let (algorithm, _) = der_sequence(rest)?;
    let (0x06, oid, _) = der_tlv(algorithm)? else {
        return None;
    };
    const RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
    const ECDSA_SHA2: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03];
    const ECDSA_SHA1: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x01];
    let bits = match oid {
        [p @ .., 0x04 | 0x05 | 0x0b | 0x0e] if p == RSA => 256, // md5, sha1, sha256, sha224
        [p @ .., 0x0c] if p == RSA => 384,
        [p @ .., 0x0d] if p == RSA => 512,
        o if o == ECDSA_SHA1 => 256,
        [p @ .., 0x01 | 0x02] if p == ECDSA_SHA2 => 256, // sha224, sha256
        [p @ .., 0x03] if p == ECDSA_SHA2 => 384,
        [p @ .., 0x04] if p == ECDSA_SHA2 => 512,
        _ => return None,
    };
    Some(match bits {
        256 => sha2::Sha256::digest(cert).to_vec(),
        384 => sha2::Sha384::digest(cert).to_vec(),
        _ => sha2::Sha512::digest(cert).to_vec(),
    })
}

/// One DER element: (tag, contents, what follows).
fn der_tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = b.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |l, &x| (l << 8) | usize::from(x));
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// The contents of the SEQUENCE starting `b`, and what follows it.
fn der_sequence(b: &[u8]) -> Option<(&[u8], &[u8])> {
    match der_tlv(b)? {
        (0x30, contents, rest) => Some((contents, rest)),
        _ => None,
    }
}

/// One element whole, and what follows it.
fn der_element(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let (_, _, rest) = der_tlv(b)?;
    Some((&b[..b.len() - rest.len()], rest))
}

/// The server side: how tidepool connects to one database's servers.
#[derive(Debug, Clone)]
pub struct Connector {
    pub mode: Mode,
    /// None when the mode is disable.
    pub config: Option<Arc<rustls::ClientConfig>>,
}

/// The files of `server_tls_*`.
#[derive(Debug, Clone, Copy)]
pub struct ConnectorFiles<'a> {
    pub mode: Mode,
    pub ca: Option<&'a str>,
    pub cert: Option<&'a str>,
    pub key: Option<&'a str>,
}

impl Connector {
    pub fn build(f: ConnectorFiles<'_>) -> Result<Connector, (&'static str, String)> {
        if f.mode == Mode::Disable {
            return Ok(Connector {
                mode: f.mode,
                config: None,
            });
        }
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| ("server_tls_sslmode", e.to_string()))?;
        let builder = if f.mode >= Mode::VerifyCa {
            let ca = f.ca.ok_or((
                "server_tls_ca_file",
                "required for verify-ca and verify-full".to_owned(),
            ))?;
            let roots = roots(ca, "CA file").map_err(|e| ("server_tls_ca_file", e))?;
            let webpki =
                rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider())
                    .build()
                    .map_err(|e| ("server_tls_ca_file", e.to_string()))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Verifier {
                    webpki: Some(webpki),
                    check_name: f.mode == Mode::VerifyFull,
                }))
        } else {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Verifier {
                    webpki: None,
                    check_name: false,
                }))
        };
        let config = match (f.cert, f.key) {
            (Some(c), Some(k)) => {
                let certs =
                    read_certs(c, "certificate").map_err(|e| ("server_tls_cert_file", e))?;
                let key = read_key(k, "key").map_err(|e| ("server_tls_key_file", e))?;
                builder
                    .with_client_auth_cert(certs, key)
                    .map_err(|e| ("server_tls_key_file", e.to_string()))?
            }
            (None, None) => builder.with_no_client_auth(),
            (Some(_), None) => {
                return Err((
                    "server_tls_key_file",
                    "required with server_tls_cert_file".into(),
                ));
            }
            (None, Some(_)) => {
                return Err((
                    "server_tls_cert_file",
                    "required with server_tls_key_file".into(),
                ));
            }
        };
        let mut config = config;
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(Connector {
            mode: f.mode,
            config: Some(Arc::new(config)),
        })
    }

    /// The name the server's certificate is checked against (verify-full).
    pub fn server_name(host: &str) -> Result<ServerName<'static>, String> {
        ServerName::try_from(host.to_owned()).map_err(|e| format!("{host}: {e}"))
    }
}

/// Checks a server's certificate as the mode says: not at all (require; the
/// handshake's signatures are still checked), its chain (verify-ca), its
/// chain and name (verify-full).
#[derive(Debug)]
struct Verifier {
    webpki: Option<Arc<rustls::client::WebPkiServerVerifier>>,
    check_name: bool,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(webpki) = &self.webpki else {
            return Ok(ServerCertVerified::assertion());
        };
        match webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
                if !self.check_name =>
            {
                Ok(ServerCertVerified::assertion())
            }
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The subject's common name (CN) of a DER certificate, when it has one
/// in a string type a user name can be compared with (UTF8String,
/// PrintableString, IA5String). The last CN wins, as in PostgreSQL.
pub fn common_name(der: &[u8]) -> Option<String> {
    let tlv = der_tlv;
    const SEQUENCE: u8 = 0x30;
    const SET: u8 = 0x31;
    const CN: &[u8] = &[0x55, 0x04, 0x03];
    let (tag, cert, _) = tlv(der)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, tbs, _) = tlv(cert)?;
    if tag != SEQUENCE {
        return None;
    }
    let mut rest = tbs;
    // [0] version (optional), serial, signature algorithm, issuer,
    // validity, then the subject.
    let (tag, _, after) = tlv(rest)?;
    if tag == 0xa0 {
        rest = after;
    }
    for _ in 0..4 {
        rest = tlv(rest)?.2;
    }
    let (tag, mut names, _) = tlv(rest)?;
    if tag != SEQUENCE {
        return None;
    }
    let mut found = None;
    while !names.is_empty() {
        let (tag, mut set, next) = tlv(names)?;
        names = next;
        if tag != SET {
            return None;
        }
        while !set.is_empty() {
            let (tag, attr, next) = tlv(set)?;
            set = next;
            if tag != SEQUENCE {
                return None;
            }
            let (tag, oid, value) = tlv(attr)?;
            if tag == 0x06 && oid == CN {
                let (kind, text, _) = tlv(value)?;
                if matches!(kind, 0x0c | 0x13 | 0x16) {
                    found = std::str::from_utf8(text).ok().map(str::to_owned);
                }
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A DER element.
    fn el(tag: u8, content: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        if content.len() < 0x80 {
            v.push(content.len() as u8);
        } else {
            v.push(0x82);
            v.extend((content.len() as u16).to_be_bytes());
        }
        v.extend_from_slice(content);
        v
    }

    fn name(cn: &[u8], string_tag: u8) -> Vec<u8> {
        let o = el(0x06, &[0x55, 0x04, 0x0a]);
        let org = el(0x31, &el(0x30, &[o, el(0x0c, b"Org")].concat()));
        let c = el(0x06, &[0x55, 0x04, 0x03]);
        let common = el(0x31, &el(0x30, &[c, el(string_tag, cn)].concat()));
        el(0x30, &[org, common].concat())
    }

    fn cert(issuer_cn: &[u8], subject_cn: &[u8], string_tag: u8) -> Vec<u8> {
        let tbs = el(
            0x30,
            &[
                el(0xa0, &el(0x02, &[2])),
                el(0x02, &[1, 2, 3]),
                el(0x30, &el(0x06, &[1, 2])),
                name(issuer_cn, 0x0c),
                el(
                    0x30,
                    &[el(0x17, b"260101000000Z"), el(0x17, b"270101000000Z")].concat(),
                ),
                name(subject_cn, string_tag),
                el(0x30, &[0u8; 200]),
            ]
            .concat(),
        );
        el(0x30, &[tbs, el(0x30, &[]), el(0x03, &[0])].concat())
    }

    #[test]
    fn the_subjects_common_name_not_the_issuers() {
        assert_eq!(
            common_name(&cert(b"ca", b"app", 0x0c)).as_deref(),
            Some("app")
        );
        assert_eq!(
            common_name(&cert(b"ca", b"bob", 0x13)).as_deref(),
            Some("bob")
        );
        assert_eq!(common_name(&cert(b"ca", b"x", 0x1e)), None, "BMPString");
        assert_eq!(common_name(b""), None);
        assert_eq!(common_name(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
        let c = cert(b"ca", b"app", 0x0c);
        for cut in 0..c.len() {
            let _ = common_name(&c[..cut]);
        }
    }
}
