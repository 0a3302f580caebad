//! Proves the integration-test harness itself works (no tidepool involved).

mod harness;

use std::time::Duration;

use harness::{
    APP_PASSWORD, APP_USER, Cluster, MD5_PASSWORD, MD5_USER, TRUST_USER, cluster,
    cluster_with_replica,
};

#[tokio::test]
async fn app_user_connects_with_scram_to_its_own_database() {
    let c = cluster();
    let db = c.create_database("smoke scram");
    let client = harness::connect(&c.url(APP_USER, Some(APP_PASSWORD), &db))
        .await
        .expect("app/secret should connect over SCRAM");
    client
        .batch_execute("CREATE TABLE t (id int); INSERT INTO t VALUES (1), (2);")
        .await
        .expect("app should own its database");
    let row = client
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .expect("count rows");
    assert_eq!(row.get::<_, i64>(0), 2);

    let wrong = harness::connect(&c.url(APP_USER, Some("wrong"), &db)).await;
    assert!(wrong.is_err(), "a wrong password must be rejected");

    let admin = c.admin_client("postgres").await;
    let row = admin
        .query_one(
            "SELECT rolpassword LIKE 'SCRAM-SHA-256$%' FROM pg_authid WHERE rolname = $1",
            &[&APP_USER],
        )
        .await
        .expect("look up app's password");
    assert!(
        row.get::<_, bool>(0),
        "app's password should be stored as SCRAM"
    );
}

#[tokio::test]
async fn md5_and_trust_users_connect() {
    let c = cluster();
    let md5 = harness::connect(&c.url(MD5_USER, Some(MD5_PASSWORD), "postgres"))
        .await
        .expect("md5user/md5secret should connect");
    let row = md5
        .query_one("SELECT current_user::text", &[])
        .await
        .expect("query as md5user");
    assert_eq!(row.get::<_, String>(0), MD5_USER);

    let trust = harness::connect(&c.url(TRUST_USER, None, "postgres"))
        .await
        .expect("trustuser should connect without a password");
    let row = trust
        .query_one("SELECT current_user::text", &[])
        .await
        .expect("query as trustuser");
    assert_eq!(row.get::<_, String>(0), TRUST_USER);

    let admin = c.admin_client("postgres").await;
    let row = admin
        .query_one(
            "SELECT rolpassword LIKE 'md5%' FROM pg_authid WHERE rolname = $1",
            &[&MD5_USER],
        )
        .await
        .expect("look up md5user's password");
    assert!(
        row.get::<_, bool>(0),
        "md5user's password should be stored as md5"
    );
}

#[tokio::test]
async fn create_database_makes_distinct_app_owned_databases() {
    let c = cluster();
    let a = c.create_database("Smoke-DB");
    let b = c.create_database("Smoke-DB");
    assert_ne!(a, b);
    let admin = c.admin_client("postgres").await;
    for db in [&a, &b] {
        let row = admin
            .query_one(
                "SELECT pg_get_userbyid(datdba)::text FROM pg_database WHERE datname = $1",
                &[db],
            )
            .await
            .expect("look up database owner");
        assert_eq!(row.get::<_, String>(0), APP_USER, "owner of {db}");
    }
}

#[tokio::test]
async fn psql_and_pgbench_wrappers_work() {
    let c = cluster();
    let db = c.create_database("smoke_tools");
    let url = c.app_url(&db);

    let out = harness::psql_async(&url, &["-At"], Some("SELECT 40 + 2;")).await;
    assert!(out.status.success(), "psql failed: {out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");

    let out = harness::psql_async(&url, &["-c", "SELECT no_such_column"], None).await;
    assert!(!out.status.success(), "a failing statement must fail psql");

    let out = harness::pgbench_async(&url, &["-i", "-q", "-s", "1"]).await;
    assert!(out.status.success(), "pgbench -i failed: {out:?}");
    let out = harness::pgbench_async(&url, &["-c", "2", "-t", "20", "-n"]).await;
    assert!(out.status.success(), "pgbench run failed: {out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("number of transactions actually processed: 40/40"),
        "unexpected pgbench output: {stdout}"
    );
}

#[tokio::test]
async fn replica_streams_changes_from_primary() {
    let c = cluster_with_replica();
    let replica_port = *c
        .replica_ports()
        .first()
        .expect("cluster_with_replica has a replica");
    assert_ne!(replica_port, c.primary_port());

    let db = c.create_database("smoke_replica");
    let primary = harness::connect(&c.app_url(&db))
        .await
        .expect("connect to primary as app");
    primary
        .batch_execute("CREATE TABLE t (v text); INSERT INTO t VALUES ('hello replica');")
        .await
        .expect("write on primary");

    // The database itself is created on the replica by WAL replay too.
    let replica_url = harness::url(replica_port, APP_USER, Some(APP_PASSWORD), &db);
    harness::wait_until_async(
        "the new row to be readable on the replica",
        Duration::from_secs(60),
        || async {
            let Ok(client) = harness::connect(&replica_url).await else {
                return false;
            };
            client
                .query_opt("SELECT v FROM t WHERE v = 'hello replica'", &[])
                .await
                .is_ok_and(|row| row.is_some())
        },
    )
    .await;

    let replica = harness::connect(&replica_url)
        .await
        .expect("connect to replica as app");
    let row = replica
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .expect("ask replica whether it is in recovery");
    assert!(row.get::<_, bool>(0), "replica must be in recovery");
    let err = replica
        .batch_execute("INSERT INTO t VALUES ('nope')")
        .await
        .expect_err("writes on the replica must fail");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION),
        "unexpected error: {err:?}"
    );

    // wait_for_replicas() makes later writes visible without polling by hand.
    primary
        .batch_execute("INSERT INTO t VALUES ('second')")
        .await
        .expect("second write on primary");
    tokio::task::spawn_blocking(|| cluster_with_replica().wait_for_replicas())
        .await
        .expect("wait_for_replicas task");
    let row = replica
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .expect("count on replica");
    assert_eq!(row.get::<_, i64>(0), 2);
}

#[tokio::test]
async fn private_cluster_restarts_primary_on_same_port() {
    let c = tokio::task::spawn_blocking(|| Cluster::start_new(0))
        .await
        .expect("start private cluster");
    let port = c.primary_port();
    let root = c.root_dir().to_path_buf();
    assert!(root.exists());

    let db = c.create_database("restart");
    let before = harness::connect(&c.app_url(&db))
        .await
        .expect("connect before restart");
    before
        .batch_execute("CREATE TABLE kept (id int); INSERT INTO kept VALUES (7);")
        .await
        .expect("write before restart");

    let c = tokio::task::spawn_blocking(move || {
        c.stop_primary();
        assert!(!c.primary_is_running());
        c
    })
    .await
    .expect("stop primary");
    assert!(
        before.simple_query("SELECT 1").await.is_err(),
        "a connection must not survive the shutdown"
    );
    assert!(
        harness::connect(&c.app_url(&db)).await.is_err(),
        "nothing should accept connections while the primary is stopped"
    );

    let c = tokio::task::spawn_blocking(move || {
        c.start_primary();
        c.restart_primary();
        c
    })
    .await
    .expect("start primary again");
    assert_eq!(c.primary_port(), port);
    let after = harness::connect(&c.app_url(&db))
        .await
        .expect("connect after restart");
    let row = after
        .query_one("SELECT id FROM kept", &[])
        .await
        .expect("data survives the restart");
    assert_eq!(row.get::<_, i32>(0), 7);
    assert!(c.primary_log().contains("database system is ready"));

    drop(after);
    tokio::task::spawn_blocking(move || drop(c))
        .await
        .expect("drop private cluster");
    assert!(!root.exists(), "dropping the cluster removes its directory");
}
