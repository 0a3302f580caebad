//! Client authentication (SCRAM-SHA-256, md5, trust) and server login,
//! including SCRAM verifier passthrough, and the errors for bad logins.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use harness::{TestProxy, cluster};

fn code(e: &tokio_postgres::Error) -> Option<String> {
    e.as_db_error().map(|d| d.code().code().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_md5_and_trust_users_log_in() {
    let c = cluster();
    let db = c.create_database("auth");
    let proxy = TestProxy::for_db(c, &db, "");
    for url in [
        proxy.url(&db),
        proxy.url_as(harness::MD5_USER, Some(harness::MD5_PASSWORD), &db),
        proxy.url_as(harness::TRUST_USER, None, &db),
    ] {
        let client = harness::connect(&url)
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        let who: String = client
            .query_one("select current_user::text", &[])
            .await
            .unwrap()
            .get(0);
        assert!(
            url.contains(&format!("//{who}")),
            "{url} logged in as {who}"
        );
    }
    // psql too (libpq's SCRAM).
    let out = harness::psql_async(&proxy.url(&db), &["-Atc", "select 40 + 2"], None).await;
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_unknown_user_and_unknown_database() {
    let c = cluster();
    let db = c.create_database("authfail");
    let proxy = TestProxy::for_db(c, &db, "");
    let e = harness::connect(&proxy.url_as("app", Some("nope"), &db))
        .await
        .unwrap_err();
    assert_eq!(code(&e).as_deref(), Some("28P01"), "{e}");
    let e = harness::connect(&proxy.url_as(harness::MD5_USER, Some("nope"), &db))
        .await
        .unwrap_err();
    assert_eq!(code(&e).as_deref(), Some("28P01"), "{e}");
    let e = harness::connect(&proxy.url_as("nobody", Some("x"), &db))
        .await
        .unwrap_err();
    assert_eq!(code(&e).as_deref(), Some("28P01"), "{e}");
    let e = harness::connect(&proxy.url("no_such_db"))
        .await
        .unwrap_err();
    assert_eq!(code(&e).as_deref(), Some("3D000"), "{e}");
    // As PostgreSQL, who the client is comes first: without the password
    // (or as a user nobody knows) a client cannot tell a missing database
    // from an existing one.
    for url in [
        proxy.url_as("app", Some("nope"), "no_such_db"),
        proxy.url_as(harness::MD5_USER, Some("nope"), "no_such_db"),
        proxy.url_as("nobody", Some("x"), "no_such_db"),
    ] {
        let e = harness::connect(&url).await.unwrap_err();
        assert_eq!(code(&e).as_deref(), Some("28P01"), "{url}: {e}");
    }
    let out = harness::psql_async(
        &proxy.url_as("app", Some("nope"), &db),
        &["-c", "select 1"],
        None,
    )
    .await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("password authentication failed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The proxy still serves good clients.
    let ok = proxy.client(&db).await;
    ok.simple_query("select 1").await.unwrap();
}

/// The test config with app's password as the SCRAM verifier PostgreSQL
/// stores for it.
async fn with_app_verifier(c: &harness::Cluster, db: &str) -> String {
    let admin = c.admin_client("postgres").await;
    let verifier: String = admin
        .query_one(
            "select rolpassword from pg_authid where rolname = 'app'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(verifier.starts_with("SCRAM-SHA-256$"));
    harness::proxy::config_toml(c, db, "", "").replace(
        &format!("password = \"{}\"", harness::APP_PASSWORD),
        &format!("password = \"{verifier}\""),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_verifier_in_config_logs_in_to_the_server_by_passthrough() {
    let c = cluster();
    let db = c.create_database("verifier");
    let proxy = TestProxy::start(&with_app_verifier(c, &db).await);
    let client = proxy.client(&db).await;
    let who: String = client
        .query_one("select current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(who, "app");
    let e = harness::connect(&proxy.url_as("app", Some("wrong"), &db))
        .await
        .unwrap_err();
    assert_eq!(code(&e).as_deref(), Some("28P01"));
}

/// As PostgreSQL: a user whose password is a SCRAM verifier logs in with
/// SCRAM where md5 is asked for (a migrated `auth_type = md5`), and with
/// its clear-text password where `password` is; both reach the server by
/// SCRAM passthrough.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scram_verifier_serves_md5_and_password_users() {
    let c = cluster();
    let db = c.create_database("verimd5");
    let base = with_app_verifier(c, &db).await;
    for method in ["md5", "password"] {
        let toml = base.replace(
            "[users.app]\n",
            &format!("[users.app]\nauth_type = \"{method}\"\n"),
        );
        let proxy = TestProxy::start(&toml);
        let client = harness::connect(&proxy.url(&db))
            .await
            .unwrap_or_else(|e| panic!("{method}: {e}"));
        let who: String = client
            .query_one("select current_user::text", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(who, "app", "{method}");
        let out = harness::psql_async(&proxy.url(&db), &["-Atc", "select 40 + 2"], None).await;
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "42",
            "{method}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let e = harness::connect(&proxy.url_as("app", Some("wrong"), &db))
            .await
            .unwrap_err();
        assert_eq!(code(&e).as_deref(), Some("28P01"), "{method}: {e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn md5_client_auth_with_plain_password() {
    let c = cluster();
    let db = c.create_database("md5c");
    let toml = harness::proxy::config_toml(c, &db, "", "")
        .replace("[users.app]\n", "[users.app]\nauth_type = \"md5\"\n");
    let proxy = TestProxy::start(&toml);
    let client = proxy.client(&db).await;
    client.simple_query("select 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_server_credentials_are_reported_to_the_client() {
    let c = cluster();
    let db = c.create_database("badsrv");
    let proxy = TestProxy::start(&harness::proxy::config_toml(
        c,
        &db,
        "",
        "user = \"app\"\npassword = \"not-the-password\"",
    ));
    let e = harness::connect(&proxy.url(&db)).await.unwrap_err();
    let d = e.as_db_error().expect("error response");
    assert!(
        d.message().contains("password authentication failed"),
        "{}",
        d.message()
    );
    // The login ends: FATAL, as PostgreSQL and PgBouncer refuse one.
    assert_eq!(d.severity(), "FATAL", "{d:?}");
}
