//! TLS on both sides. PostgreSQL is made to accept the application user
//! over TLS only (`hostssl`, and `hostnossl ... reject`); tidepool offers TLS
//! to clients and reaches PostgreSQL with `server_tls_sslmode = verify-full`.
//! psql checks tidepool's certificate with `sslmode=verify-full`; a client
//! in plain text is refused with a FATAL naming the setting; PostgreSQL 17's
//! direct TLS (ALPN `postgresql`) works; client certificates are checked
//! with `verify-ca`; SHOW CLIENTS / SHOW SERVERS say what was negotiated; a
//! reload puts a new certificate in force without dropping connected
//! clients. Certificates are made with the openssl command-line tool.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use harness::daemon::Daemon;
use harness::{TestProxy, cluster};

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tidepool-tls-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

use harness::certs::make_certs;

const SERVER_EXT: &str = "subjectAltName=DNS:localhost,IP:127.0.0.1\n\
     basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n";
const CLIENT_EXT: &str = "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n";

/// PostgreSQL with TLS on, the application user accepted over TLS only.
fn postgres_requires_tls(c: &harness::Cluster, certs: &Path) {
    let data = c.primary_data_dir();
    for f in ["pg.crt", "pg.key"] {
        let to = data.join(f);
        std::fs::copy(certs.join(f), &to).unwrap();
        std::fs::set_permissions(&to, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        harness::give_to_server_user(&to);
    }
    // The other users keep the harness's rules: the cluster is this
    // binary's, and its other tests log them in meanwhile (md5user's
    // md5-stored password fails a scram-sha-256 line).
    let hba = "local all all trust\n\
               hostnossl all app 127.0.0.1/32 reject\n\
               hostssl all app 127.0.0.1/32 scram-sha-256\n\
               host all trustuser 127.0.0.1/32 trust\n\
               host all md5user 127.0.0.1/32 md5\n\
               host all all 127.0.0.1/32 scram-sha-256\n";
    std::fs::write(data.join("pg_hba.conf"), hba).unwrap();
    let out = harness::psql(
        &c.superuser_url("postgres"),
        &[
            "-c",
            "alter system set ssl = on",
            "-c",
            "alter system set ssl_cert_file = 'pg.crt'",
            "-c",
            "alter system set ssl_key_file = 'pg.key'",
        ],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    c.reload_primary();
}

fn psql_at(conninfo: &str, sql: &str) -> (bool, String, String) {
    use std::io::Write;
    let mut cmd = Command::new(harness::pg_bin("psql"));
    cmd.args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-d", conninfo])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    harness::client_env(&mut cmd, conninfo);
    cmd.env_remove("PGSSLMODE");
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let text = format!("{sql}\n");
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(text.as_bytes());
    });
    let out = child.wait_with_output().unwrap();
    let _ = writer.join();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A rustls client for direct TLS (no SSLRequest), trusting `ca`.
fn direct_tls_config(ca: &Path, alpn: bool) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    if alpn {
        config.alpn_protocols = vec![b"postgresql".to_vec()];
    }
    Arc::new(config)
}

/// Logs in with direct TLS; the client and the certificate tidepool showed.
async fn direct_login(
    port: u16,
    ca: &Path,
    alpn: bool,
    db: &str,
) -> Result<(tokio_postgres::Client, Vec<u8>), String> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(direct_tls_config(ca, alpn))
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let cert = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    let mut cfg = tokio_postgres::Config::new();
    cfg.user("app").password(harness::APP_PASSWORD).dbname(db);
    let (client, conn) = cfg
        .connect_raw(tls, tokio_postgres::NoTls)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok((client, cert))
}

/// Client keys readable by their owner only, as libpq wants them.
fn private_keys(dir: &Path, names: &[&str]) {
    for name in names {
        let key = dir.join(format!("{name}.key"));
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
    }
}

fn pem_der(path: &Path) -> Vec<u8> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_file(path).unwrap().to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_on_both_sides_to_a_server_that_accepts_only_tls() {
    let c = cluster();
    let db = c.create_database("tls");
    let certs = tempdir("certs");
    make_certs(
        &certs,
        "ca",
        &[
            ("pg", "/CN=localhost", SERVER_EXT),
            ("proxy", "/CN=localhost", SERVER_EXT),
            ("proxy2", "/CN=localhost", SERVER_EXT),
            ("client", "/CN=app", CLIENT_EXT),
        ],
    );
    make_certs(&certs, "otherca", &[]);
    postgres_requires_tls(c, &certs);
    let ca = certs.join("ca.crt");

    // PostgreSQL itself refuses the application user in plain text.
    let direct = format!(
        "host=127.0.0.1 port={} user=app password={} dbname={db} sslmode=disable",
        c.primary_port(),
        harness::APP_PASSWORD
    );
    let (ok, _, err) = psql_at(&direct, "select 1");
    assert!(!ok && err.contains("no encryption"), "{err}");

    let toml = format!(
        "[tidepool]\nlisten = [\"127.0.0.1:{{port}}\"]\nstats_users = [\"app\"]\n\
         client_tls_sslmode = \"require\"\n\
         client_tls_cert_file = \"{certs}/proxy.crt\"\nclient_tls_key_file = \"{certs}/proxy.key\"\n\
         [pool]\ndefault_pool_size = 2\nserver_tls_sslmode = \"verify-full\"\n\
         server_tls_ca_file = \"{certs}/ca.crt\"\n\
         [routing]\nhealth_check_period = \"200ms\"\n\
         [databases.{db}]\nhost = \"127.0.0.1\"\nport = {port}\n\
         replicas = [{{ host = \"127.0.0.1\", port = {port} }}]\n\
         [users.app]\npassword = \"{pw}\"\n",
        certs = certs.display(),
        port = c.primary_port(),
        pw = harness::APP_PASSWORD,
    );
    let d = Daemon::start(&toml);
    let via = |mode: &str, extra: &str| {
        format!(
            "host=localhost port={} user=app password={} dbname={db} sslmode={mode} {extra}",
            d.port,
            harness::APP_PASSWORD
        )
    };

    // psql checks tidepool's certificate and name; tidepool's connection to
    // PostgreSQL is TLS too (pg_stat_ssl of the server session).
    let url = via("verify-full", &format!("sslrootcert={}", ca.display()));
    let (ok, out, err) = psql_at(
        &url,
        "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
    );
    assert!(ok, "{err}");
    assert_eq!(out, "t");
    let (ok, out, err) = psql_at(&url, "\\conninfo");
    assert!(ok && out.contains("SSL connection"), "{out} {err}");
    // psql's own catalog queries (\d sends over 1 KiB) over TLS.
    let (ok, out, err) = psql_at(&url, "create table tls_t (a int primary key); \\d tls_t");
    assert!(ok && out.contains("a|integer||not null|"), "{out} {err}");
    // SCRAM bound to the TLS channel (SCRAM-SHA-256-PLUS,
    // tls-server-end-point), which libpq can insist on: a man in the middle
    // with another certificate could not complete it. It used to fail:
    // "server did not offer an authentication method that supports channel
    // binding".
    let (ok, out, err) = psql_at(
        &format!("{url} channel_binding=require"),
        "select current_user",
    );
    assert!(ok && out == "app", "{out} {err}");

    // Plain text where TLS is required: a clear FATAL naming the setting.
    let (ok, _, err) = psql_at(&via("disable", ""), "select 1");
    assert!(!ok, "plain text accepted");
    assert!(
        err.contains("FATAL") && err.contains("client_tls_sslmode"),
        "{err}"
    );
    // Another CA's certificate: psql refuses tidepool.
    let other = via(
        "verify-full",
        &format!("sslrootcert={}/otherca.crt", certs.display()),
    );
    let (ok, _, err) = psql_at(&other, "select 1");
    assert!(!ok && err.contains("certificate"), "{err}");

    // PostgreSQL 17's direct TLS: ALPN postgresql, no SSLRequest.
    let (client, cert) = direct_login(d.port, &ca, true, &db).await.unwrap();
    assert_eq!(cert, pem_der(&certs.join("proxy.crt")));
    let rows = client.simple_query("select 1").await.unwrap();
    let data = rows
        .iter()
        .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
        .count();
    assert_eq!(data, 1);
    assert!(
        direct_login(d.port, &ca, false, &db).await.is_err(),
        "direct TLS without ALPN"
    );

    // Large answers, a large query and concurrent clients, all over TLS on
    // both sides (records split across reads and writes, backpressure).
    let (ok, out, err) = psql_at(
        &url,
        "select repeat(md5(g::text), 1000) from generate_series(1, 625) g",
    );
    assert!(ok, "{err}");
    assert_eq!(out.len(), 625 * 32_001 - 1, "20 MB of rows through TLS");
    let big = "x".repeat(3_000_000);
    let (ok, out, err) = psql_at(&url, &format!("select length('{big}')"));
    assert!(ok && out == "3000000", "{err}");
    let script = certs.join("bench.sql");
    std::fs::write(
        &script,
        "select repeat('a', 3000) from generate_series(1, 30);\nselect :client_id;\n",
    )
    .unwrap();
    let out = harness::pgbench(
        &via("require", ""),
        &[
            "-n",
            "-c",
            "8",
            "-j",
            "2",
            "-t",
            "50",
            "-M",
            "extended",
            "-f",
            script.to_str().unwrap(),
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("number of transactions actually processed: 400/400"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The console says what was negotiated, for clients and servers.
    let console = via(
        "verify-full",
        &format!("sslrootcert={} dbname=pgbouncer", ca.display()),
    )
    .replace(&format!("dbname={db} "), "");
    let (ok, out, err) = psql_at(&console, "show clients");
    assert!(ok, "{err}");
    assert!(out.contains("TLSv1."), "SHOW CLIENTS: {out}");
    let (ok, out, err) = psql_at(&console, "show servers");
    assert!(ok, "{err}");
    assert!(out.contains("TLSv1."), "SHOW SERVERS: {out}");

    // The health checker reaches the TLS-only server too: the primary is
    // checked without a login failure (the "replica", the primary itself
    // listed again, is seen for what it is: not in recovery).
    harness::wait_until("health checks over TLS", Duration::from_secs(20), || {
        let (ok, out, _) = psql_at(&console, "show replicas");
        // The primary's row with an empty `reason` (column 12).
        ok && out.lines().any(|l| {
            let cols: Vec<&str> = l.split('|').collect();
            cols.get(1) == Some(&"primary") && cols.get(11) == Some(&"")
        })
    });
    let (_, out, _) = psql_at(&console, "show replicas");
    assert!(
        !out.contains("login_failed") && !out.contains("unreachable"),
        "{out}"
    );

    // A new certificate in force after a reload; the connected client stays.
    std::fs::copy(certs.join("proxy2.crt"), certs.join("proxy.crt")).unwrap();
    std::fs::copy(certs.join("proxy2.key"), certs.join("proxy.key")).unwrap();
    d.signal(libc::SIGHUP);
    let want = pem_der(&certs.join("proxy2.crt"));
    harness::wait_until_async(
        "the new certificate in force",
        Duration::from_secs(20),
        || async {
            direct_login(d.port, &ca, true, &db)
                .await
                .is_ok_and(|(_, cert)| cert == want)
        },
    )
    .await;
    client.simple_query("select 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_are_checked_with_verify_ca() {
    let c = cluster();
    let db = c.create_database("tls_client_cert");
    let certs = tempdir("client-certs");
    make_certs(
        &certs,
        "ca",
        &[
            ("proxy", "/CN=localhost", SERVER_EXT),
            ("client", "/CN=app", CLIENT_EXT),
            ("other", "/CN=someone_else", CLIENT_EXT),
        ],
    );
    make_certs(&certs, "otherca", &[("stranger", "/CN=app", CLIENT_EXT)]);
    let toml = harness::proxy::config_toml(c, &db, "", "").replace(
        "[tidepool]\n",
        &format!(
            "[tidepool]\nclient_tls_sslmode = \"verify-ca\"\n\
             client_tls_cert_file = \"{d}/proxy.crt\"\nclient_tls_key_file = \"{d}/proxy.key\"\n\
             client_tls_ca_file = \"{d}/ca.crt\"\n",
            d = certs.display()
        ),
    );
    let proxy = TestProxy::start(&toml);
    let base = format!(
        "host=localhost port={} user=app password={} dbname={db} sslmode=verify-full sslrootcert={}/ca.crt",
        proxy.port(),
        harness::APP_PASSWORD,
        certs.display()
    );
    let with = |name: &str| {
        format!(
            "{base} sslcert={d}/{name}.crt sslkey={d}/{name}.key",
            d = certs.display()
        )
    };
    private_keys(&certs, &["client", "stranger", "other"]);
    let (ok, out, err) = psql_at(&with("client"), "select 1");
    assert!(ok && out == "1", "{err}");
    let (ok, _, err) = psql_at(&base, "select 1");
    assert!(!ok, "no client certificate accepted: {err}");
    let (ok, _, err) = psql_at(&with("stranger"), "select 1");
    assert!(!ok, "another CA's client certificate accepted: {err}");

    // The HBA method cert: the certificate's CN is the user, no password.
    std::fs::write(
        certs.join("hba.conf"),
        "hostssl all app 127.0.0.1/32 cert\nhostnossl all all 0.0.0.0/0 reject\n",
    )
    .unwrap();
    let proxy = TestProxy::start(&toml.replace(
        "[tidepool]\n",
        &format!(
            "[tidepool]\nauth_hba_file = \"{}/hba.conf\"\n",
            certs.display()
        ),
    ));
    let no_password = |name: &str| {
        format!(
            "host=localhost port={} user=app dbname={db} sslmode=verify-full sslrootcert={d}/ca.crt \
             sslcert={d}/{name}.crt sslkey={d}/{name}.key",
            proxy.port(),
            d = certs.display()
        )
    };
    let (ok, out, err) = psql_at(&no_password("client"), "select current_user");
    assert!(ok && out == "app", "{out} {err}");
    let (ok, _, err) = psql_at(&no_password("other"), "select 1");
    assert!(
        !ok && err.contains("certificate authentication failed for user \"app\""),
        "{err}"
    );
}

/// HBA `clientcert` options with client certificates optional (sslmode
/// require, a CA file): `verify-full` wants a certificate naming the user
/// besides the password, `verify-ca` any verified one; an option tidepool
/// does not know fails the load instead of being ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hba_clientcert_options_are_enforced() {
    let c = cluster();
    let db = c.create_database("tls_clientcert");
    let certs = tempdir("clientcert-opt");
    make_certs(
        &certs,
        "ca",
        &[
            ("proxy", "/CN=localhost", SERVER_EXT),
            ("client", "/CN=app", CLIENT_EXT),
            ("other", "/CN=someone_else", CLIENT_EXT),
        ],
    );
    private_keys(&certs, &["client", "other"]);
    std::fs::write(
        certs.join("hba.conf"),
        format!(
            "hostssl all app 127.0.0.1/32 scram-sha-256 clientcert=verify-full\n\
             hostssl all {md5} 127.0.0.1/32 md5 clientcert=verify-ca clientname=CN\n\
             host all all 127.0.0.1/32 reject\n",
            md5 = harness::MD5_USER
        ),
    )
    .unwrap();
    let toml = harness::proxy::config_toml(c, &db, "", "").replace(
        "[tidepool]\n",
        &format!(
            "[tidepool]\nclient_tls_sslmode = \"require\"\n\
             client_tls_cert_file = \"{d}/proxy.crt\"\nclient_tls_key_file = \"{d}/proxy.key\"\n\
             client_tls_ca_file = \"{d}/ca.crt\"\nauth_hba_file = \"{d}/hba.conf\"\n",
            d = certs.display()
        ),
    );
    let proxy = TestProxy::start(&toml);
    let login = |user: &str, password: &str, cert: Option<&str>| {
        let mut s = format!(
            "host=localhost port={} user={user} password={password} dbname={db} sslmode=verify-full sslrootcert={d}/ca.crt",
            proxy.port(),
            d = certs.display()
        );
        if let Some(name) = cert {
            s += &format!(
                " sslcert={d}/{name}.crt sslkey={d}/{name}.key",
                d = certs.display()
            );
        }
        psql_at(&s, "select current_user")
    };
    let (app, md5) = (harness::APP_PASSWORD, harness::MD5_PASSWORD);
    let (ok, out, err) = login("app", app, Some("client"));
    assert!(ok && out == "app", "{out} {err}");
    let (ok, _, err) = login("app", app, None);
    assert!(
        !ok && err.contains("connection requires a valid client certificate"),
        "{err}"
    );
    let (ok, _, err) = login("app", app, Some("other"));
    assert!(
        !ok && err.contains("clientcert=verify-full") && err.contains("CN mismatch"),
        "{err}"
    );
    let (ok, _, err) = login("app", "wrong", Some("client"));
    assert!(
        !ok && err.contains("password authentication failed"),
        "{err}"
    );
    let (ok, out, err) = login(harness::MD5_USER, md5, Some("other"));
    assert!(ok && out == harness::MD5_USER, "{out} {err}");
    let (ok, _, err) = login(harness::MD5_USER, md5, None);
    assert!(
        !ok && err.contains("connection requires a valid client certificate"),
        "{err}"
    );

    // An option tidepool does not know is a load error, not ignored.
    std::fs::write(
        certs.join("bad.conf"),
        "hostssl all all 127.0.0.1/32 scram-sha-256 foo=bar\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tidepool"))
        .args(["check", "--config"])
        .arg({
            let p = certs.join("bad.toml");
            std::fs::write(&p, toml.replace("hba.conf", "bad.conf")).unwrap();
            p
        })
        .output()
        .unwrap();
    let err =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success() && err.contains("bad.conf:1") && err.contains("\"foo\""),
        "{err}"
    );
}

#[test]
fn unreadable_certificates_fail_the_config_with_the_key() {
    let dir = tempdir("bad");
    std::fs::write(dir.join("not-a-cert.pem"), "hello").unwrap();
    for (extra, key) in [
        ("client_tls_sslmode = \"require\"\n", "client_tls_cert_file"),
        (
            "client_tls_sslmode = \"require\"\nclient_tls_cert_file = \"not-a-cert.pem\"\nclient_tls_key_file = \"not-a-cert.pem\"\n",
            "client_tls_cert_file",
        ),
        (
            "client_tls_sslmode = \"verify-ca\"\nclient_tls_cert_file = \"nope.pem\"\nclient_tls_key_file = \"nope.pem\"\n",
            "client_tls_cert_file",
        ),
    ] {
        std::fs::write(
            dir.join("proxy.toml"),
            format!("[tidepool]\n{extra}[databases.x]\nhost = \"127.0.0.1\"\n"),
        )
        .unwrap();
        let (passed, text) = harness::tidepool_check(&dir.join("proxy.toml"));
        assert!(!passed, "{extra}: {text}");
        assert!(text.contains(key), "{extra}: {text}");
    }
}

/// The bytes of an SSLRequest (or, with `code`, another request packet).
fn request(code: i32) -> Vec<u8> {
    [8i32.to_be_bytes(), code.to_be_bytes()].concat()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encryption_requests_split_at_every_byte_and_injected_bytes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const SSL: i32 = 80_877_103;
    const GSS: i32 = 80_877_104;
    let c = cluster();
    let db = c.create_database("tls_negotiation");
    let certs = tempdir("negotiation");
    make_certs(&certs, "ca", &[("proxy", "/CN=localhost", SERVER_EXT)]);
    let with_tls = TestProxy::start(&harness::proxy::config_toml(c, &db, "", "").replace(
        "[tidepool]\n",
        &format!(
            "[tidepool]\nclient_tls_sslmode = \"prefer\"\n\
             client_tls_cert_file = \"{d}/proxy.crt\"\nclient_tls_key_file = \"{d}/proxy.key\"\n",
            d = certs.display()
        ),
    ));
    let without = TestProxy::for_db(c, &db, "");
    let answer = |port: u16, parts: Vec<Vec<u8>>| async move {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        for p in parts {
            s.write_all(&p).await.unwrap();
            s.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut b = [0u8; 1];
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut b)).await {
            Ok(Ok(1)) => Some(b[0]),
            _ => None,
        }
    };
    let ssl = request(SSL);
    for cut in 0..=ssl.len() {
        let parts = vec![ssl[..cut].to_vec(), ssl[cut..].to_vec()];
        assert_eq!(
            answer(with_tls.port(), parts.clone()).await,
            Some(b'S'),
            "cut {cut}"
        );
        assert_eq!(answer(without.port(), parts).await, Some(b'N'), "cut {cut}");
    }
    // GSSENCRequest: N, then an SSLRequest on the same connection: S.
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", with_tls.port()))
        .await
        .unwrap();
    s.write_all(&request(GSS)).await.unwrap();
    assert_eq!(s.read_u8().await.unwrap(), b'N');
    s.write_all(&ssl).await.unwrap();
    assert_eq!(s.read_u8().await.unwrap(), b'S');
    // Bytes right behind the SSLRequest (a man in the middle's injection):
    // closed without an answer, as PostgreSQL does.
    let injected = [ssl.clone(), raw_startup()].concat();
    assert_eq!(answer(with_tls.port(), vec![injected]).await, None);
}

fn raw_startup() -> Vec<u8> {
    harness::raw::startup("app", "postgres")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_tls_client_parks_and_comes_back() {
    let c = cluster();
    let db = c.create_database("tls_parking");
    let certs = tempdir("parking");
    make_certs(&certs, "ca", &[("proxy", "/CN=localhost", SERVER_EXT)]);
    let toml = harness::proxy::config_toml(c, &db, "park_idle_clients_after = \"200ms\"", "")
        .replace(
            "[tidepool]\n",
            &format!(
                "[tidepool]\nclient_tls_sslmode = \"require\"\n\
                 client_tls_cert_file = \"{d}/proxy.crt\"\nclient_tls_key_file = \"{d}/proxy.key\"\n",
                d = certs.display()
            ),
        );
    let proxy = TestProxy::start(&toml);
    let ca = certs.join("ca.crt");
    let (client, _) = direct_login(proxy.port(), &ca, true, &db).await.unwrap();
    for round in 0..3 {
        assert_eq!(
            harness::first_value(&client, &format!("select {round}")).await,
            round.to_string()
        );
        harness::wait_until_async("the TLS client parked", Duration::from_secs(10), || async {
            !proxy.shared.lot.is_empty()
        })
        .await;
    }
    // Back from the lot, it still speaks TLS, including a large answer.
    let long = harness::first_value(&client, "select repeat('t', 300000)").await;
    assert_eq!(long.len(), 300_000);
}
