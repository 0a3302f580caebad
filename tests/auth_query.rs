//! auth_query: users not in `proxy.toml` log in with the secret PostgreSQL
//! stores for them, SCRAM end to end (tidepool logs in to the server with
//! the ClientKey the client proved; it never sees a password), md5-stored
//! passwords with md5. A user name carrying SQL is just a name; a
//! search_path an attacker set on auth_user's role cannot substitute a
//! fake pg_authid; answers are cached for `auth_cache_lifetime` only.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::time::Duration;

use harness::{TestProxy, cluster};

async fn login(
    proxy: &TestProxy,
    user: &str,
    password: &str,
    db: &str,
) -> Result<tokio_postgres::Client, String> {
    harness::connect(&proxy.url_as(user, Some(password), db))
        .await
        .map_err(|e| match e.as_db_error() {
            Some(d) => format!("{} {}", d.code().code(), d.message()),
            None => e.to_string(),
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_not_in_the_config_log_in_with_the_servers_secret() {
    let c = cluster();
    let db = c.create_database("auth_query");
    let admin = c.admin_client(&db).await;
    let fake = postgres_protocol::password::scram_sha_256(b"fake password");
    admin
        .batch_execute(&format!(
            "create role qa_user login password 'qa pass';
             set password_encryption = 'md5';
             create role qa_md5 login password 'md5 pass';
             reset password_encryption;
             grant all on database \"{db}\" to qa_user, qa_md5;
             create table victim (x int);
             -- What a search_path attack would plant: a fake pg_authid.
             create table public.pg_authid (rolname name, rolpassword text,
               rolcanlogin bool, rolvaliduntil timestamptz);
             insert into public.pg_authid values ('qa_fake', '{fake}', true, null);
             alter role postgres in database \"{db}\" set search_path = public, pg_catalog;"
        ))
        .await
        .unwrap();
    // PostgreSQL itself takes md5 for the md5-stored user (this test
    // binary has its own cluster).
    let hba_path = c.primary_data_dir().join("pg_hba.conf");
    let hba = std::fs::read_to_string(&hba_path).unwrap();
    std::fs::write(
        &hba_path,
        format!("host all qa_md5 127.0.0.1/32 md5\n{hba}"),
    )
    .unwrap();
    c.reload_primary();
    let toml = harness::proxy::config_toml(c, &db, "", "").replace(
        "[tidepool]\n",
        "[tidepool]\nauth_user = \"postgres\"\nauth_cache_lifetime = \"1s\"\n",
    ) + &format!(
        "\n[users.postgres]\npassword = \"{}\"\n",
        harness::SUPERUSER_PASSWORD
    );
    let proxy = TestProxy::start(&toml);

    // SCRAM end to end: the server session is the user's own.
    let qa = login(&proxy, "qa_user", "qa pass", &db).await.unwrap();
    assert_eq!(
        harness::first_value(&qa, "select current_user").await,
        "qa_user"
    );
    assert_eq!(
        harness::first_value(&qa, "select session_user").await,
        "qa_user"
    );
    // A password stored as md5 logs in with md5.
    let md5 = login(&proxy, "qa_md5", "md5 pass", &db).await.unwrap();
    assert_eq!(
        harness::first_value(&md5, "select current_user").await,
        "qa_md5"
    );

    // With md5 asked for (a migrated `auth_type = md5`), a SCRAM-stored
    // password logs in with SCRAM, as PostgreSQL does.
    let md5_toml = toml.replace("[tidepool]\n", "[tidepool]\nauth_type = \"md5\"\n");
    let md5_proxy = TestProxy::start(&md5_toml);
    for (user, pw) in [("qa_user", "qa pass"), ("qa_md5", "md5 pass")] {
        let c = login(&md5_proxy, user, pw, &db)
            .await
            .unwrap_or_else(|e| panic!("{user} with md5 asked for: {e}"));
        assert_eq!(harness::first_value(&c, "select current_user").await, user);
        let e = login(&md5_proxy, user, "wrong", &db).await.err().unwrap();
        assert!(e.starts_with("28P01"), "{user}: {e}");
    }
    drop(md5_proxy);

    // Wrong passwords, unknown users, names carrying SQL: the same refusal.
    for (user, pw) in [
        ("qa_user", "wrong"),
        ("qa_md5", "wrong"),
        ("nobody_here", "x"),
        ("qa_user' or '1'='1", "x"),
        ("x'; drop table victim; --", "x"),
        ("qa_user\\", "qa pass"),
        ("qa_fake", "fake password"),
    ] {
        let e = login(&proxy, user, pw, &db).await.err().unwrap();
        assert!(
            e.starts_with("28P01 password authentication failed"),
            "{user}: {e}"
        );
    }
    assert_eq!(
        harness::first_value(&admin, "select count(*) from victim").await,
        "0",
        "the table is still there"
    );

    // A new password is in force once the cached answer is older than
    // auth_cache_lifetime.
    admin
        .batch_execute("alter role qa_user password 'new pass'")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let e = login(&proxy, "qa_user", "qa pass", &db)
        .await
        .err()
        .unwrap();
    assert!(e.starts_with("28P01"), "{e}");
    let qa2 = login(&proxy, "qa_user", "new pass", &db).await.unwrap();
    assert_eq!(
        harness::first_value(&qa2, "select current_user").await,
        "qa_user"
    );
    drop(qa);
}

#[test]
fn auth_user_needs_a_plain_password_in_the_config() {
    let dir = std::env::temp_dir().join(format!("tidepool-authq-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("proxy.toml"),
        "[tidepool]\nauth_user = \"ghost\"\n[databases.x]\nhost = \"127.0.0.1\"\n",
    )
    .unwrap();
    let (passed, text) = harness::tidepool_check(&dir.join("proxy.toml"));
    assert!(!passed && text.contains("auth_user"), "{text}");
}
