//! The Unix-domain listening socket (`unix_socket_dir`): psql (and its `\d`)
//! and pgbench reach tidepool through `DIR/.s.PGSQL.PORT` as they would
//! PostgreSQL or PgBouncer; `local` lines of `auth_hba_file` apply to those
//! clients and only to them; the file goes when tidepool stops. And the
//! other way: a database or replica whose `host` is PostgreSQL's socket
//! directory is reached through its socket, as libpq would.

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

/// The server's port as it knows it (`inet_server_port()` is NULL on a
/// socket).
async fn server_port(c: &tokio_postgres::Client) -> u16 {
    let rows = c.simple_query("show port").await.unwrap();
    rows.iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0)?.parse().ok(),
            _ => None,
        })
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_behind_a_socket_directory_are_reached_through_their_sockets() {
    let c = harness::cluster_with_replica();
    let db = c.create_database("server_socket");
    c.wait_for_replicas();
    let dir = c.socket_dir().display().to_string();
    // The harness's servers have no TLS: `require` over TCP would fail, but
    // a socket is local and takes none (as in libpq), pooled connections,
    // health checks and all.
    let db_extra = format!(
        "replicas = [{{ host = \"{dir}\", port = {} }}]\nserver_tls_sslmode = \"require\"",
        c.replica_ports()[0]
    );
    let toml = format!(
        "{}\n[routing]\nhealth_check_period = \"200ms\"\n",
        harness::proxy::config_toml(c, &db, "default_pool_size = 4", &db_extra)
    )
    .replace("host = \"127.0.0.1\"", &format!("host = \"{dir}\""))
    .replace("[tidepool]\n", "[tidepool]\nstats_users = [\"app\"]\n");
    let proxy = TestProxy::start(&toml);

    // Reads reach the replica once its health check (over the socket)
    // passed; writes go to the primary.
    let client = proxy.client(&db).await;
    harness::wait_until_async(
        "a read to reach the replica",
        std::time::Duration::from_secs(30),
        || async { server_port(&client).await == c.replica_ports()[0] },
    )
    .await;
    client
        .batch_execute("create table t (id int); insert into t values (1)")
        .await
        .unwrap();
    let rows = client
        .simple_query("begin; insert into t values (2) returning current_setting('port'); commit")
        .await
        .unwrap();
    assert!(
        rows.iter().any(|m| matches!(m,
            tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some(&c.primary_port().to_string()))),
        "the write ran on the primary: {rows:?}"
    );

    // SHOW SERVERS: `unix` and the port the socket is named after.
    let console = proxy.url_as("app", Some(harness::APP_PASSWORD), "pgbouncer");
    let servers = harness::console(&console, "SHOW SERVERS").await;
    let ours: Vec<_> = servers.iter().filter(|r| r["database"] == db).collect();
    assert!(!ours.is_empty(), "{servers:?}");
    for r in &ours {
        assert_eq!(r["addr"], "unix", "{r:?}");
        let port: u16 = r["port"].parse().unwrap();
        assert!(
            port == c.primary_port() || port == c.replica_ports()[0],
            "{r:?}"
        );
    }

    // A cancel request reaches the server through its socket (the write
    // keeps the statement on the primary, where it is looked for).
    let victim = proxy.client(&db).await;
    let token = victim.cancel_token();
    let run = tokio::spawn(async move {
        victim
            .simple_query("insert into t values (3); select pg_sleep(30) /* socket victim */")
            .await
    });
    harness::wait_until_async(
        "the query to run",
        std::time::Duration::from_secs(10),
        || async {
            let rows = harness::connect(&c.superuser_url(&db))
                .await
                .unwrap()
                .simple_query(
                    "select 1 from pg_stat_activity where query like '%socket victim%' \
                     and pid <> pg_backend_pid() and state = 'active'",
                )
                .await
                .unwrap();
            rows.iter()
                .any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
        },
    )
    .await;
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let err = tokio::time::timeout(std::time::Duration::from_secs(10), run)
        .await
        .expect("the cancel stopped the query")
        .unwrap()
        .expect_err("cancelled");
    assert_eq!(
        err.as_db_error().map(|e| e.code().code()),
        Some("57014"),
        "{err}"
    );
}
