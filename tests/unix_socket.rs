//! The Unix-domain listening socket (`unix_socket_dir`): psql (and its `\d`)
//! and pgbench reach tidepool through `DIR/.s.PGSQL.PORT` as they would
//! PostgreSQL or PgBouncer; `local` lines of `auth_hba_file` apply to those
//! clients and only to them; the file goes when tidepool stops.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use harness::{TestProxy, cluster};

fn socket_url(dir: &std::path::Path, port: u16, user: &str, db: &str) -> String {
    // libpq: a host that starts with `/` is a socket directory.
    format!("host={} port={port} user={user} dbname={db}", dir.display())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_and_pgbench_reach_tidepool_on_its_unix_socket() {
    let c = cluster();
    let db = c.create_database("unix_socket");
    let dir = std::env::temp_dir().join(format!("tidepool-unix-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let hba = dir.join("hba.conf");
    // The socket's clients log in without a password; TCP ones need one.
    std::fs::write(
        &hba,
        "local all all trust\nhost all all all scram-sha-256\n",
    )
    .unwrap();
    let toml = harness::proxy::config_toml(c, &db, "", "").replace(
        "[tidepool]\n",
        &format!(
            "[tidepool]\nunix_socket_dir = \"{}\"\nauth_hba_file = \"{}\"\nstats_users = [\"app\"]\n",
            dir.display(),
            hba.display()
        ),
    );
    let proxy = TestProxy::start(&toml);
    let socket = dir.join(format!(".s.PGSQL.{}", proxy.port()));
    assert!(socket.exists(), "{}", socket.display());

    let url = socket_url(&dir, proxy.port(), "app", &db);
    let out = harness::psql_async(
        &url,
        &[
            "-c",
            "create table t (id int primary key, name text)",
            "-c",
            "\\d t",
            "-c",
            "select inet_server_port()",
        ],
        None,
    )
    .await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("Table \"public.t\""), "{text}");
    assert!(
        text.contains(&c.primary_port().to_string()),
        "through tidepool to the server: {text}"
    );

    harness::pgbench_script_all_succeed(&url, "select count(*) from t;\n").await;

    // A socket client parks when idle like a TCP one, and comes back.
    let parked = harness::connect(&url).await.unwrap();
    parked.simple_query("select 1").await.unwrap();
    harness::wait_until_async(
        "the idle client parked",
        std::time::Duration::from_secs(10),
        || async { proxy.shared.lot.len() == 1 },
    )
    .await;
    parked.simple_query("select 2").await.unwrap();
    // SHOW CLIENTS names it as PgBouncer does.
    let clients = harness::console(
        &proxy.url_as("app", Some(harness::APP_PASSWORD), "pgbouncer"),
        "SHOW CLIENTS",
    )
    .await;
    assert!(
        clients
            .iter()
            .any(|r| r["database"] == db && r["addr"] == "unix"),
        "{clients:?}"
    );

    // `local` lines are for the socket only: over TCP, the password.
    let tcp_no_password = harness::connect(&proxy.url_as("app", None, &db)).await;
    assert!(
        tcp_no_password.is_err(),
        "TCP must not match `local all all trust`"
    );
    proxy
        .client(&db)
        .await
        .simple_query("select 1")
        .await
        .unwrap();

    drop(proxy);
    harness::wait_until(
        "the socket file removed",
        std::time::Duration::from_secs(10),
        || !socket.exists(),
    );
    let _ = std::fs::remove_dir_all(&dir);
}
