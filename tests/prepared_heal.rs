//! Prepared statements heal after a migration changes their result: the
//! client that used the stale statement gets PostgreSQL's own 0A000 once,
//! its re-prepare works, and so does every other client's (issue 24's
//! "fails forever" outage). A client that still holds the old row shape
//! never receives rows of the new one: it gets the 0A000 PostgreSQL would
//! give it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use harness::TestProxy;

const SELECT: &str = "select * from t where id = $1";

fn code(e: &tokio_postgres::Error) -> String {
    e.code().map(|c| c.code().to_owned()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_heal_after_a_migration_changes_their_result() {
    let cluster = harness::cluster();
    let db = tokio::task::spawn_blocking(move || cluster.create_database("heal"))
        .await
        .unwrap();
    let admin = cluster.admin_client(&db).await;
    admin
        .batch_execute(
            "create table t (id int primary key, v text);
             insert into t values (1, 'a');
             grant all on t to public;",
        )
        .await
        .unwrap();
    let proxy = TestProxy::for_db(cluster, &db, "default_pool_size = 2");

    // Four clients on two servers prepare the statement and use it, so that
    // both servers hold it.
    let mut clients = Vec::new();
    for _ in 0..4 {
        let c = proxy.client(&db).await;
        let s = c.prepare(SELECT).await.unwrap();
        assert_eq!(c.query(&s, &[&1i32]).await.unwrap()[0].len(), 2);
        clients.push((c, s));
    }
    admin
        .batch_execute("alter table t add column extra int not null default 7")
        .await
        .unwrap();

    // Each client's old statement fails as PostgreSQL fails it (for as long
    // as it uses it), never with rows of three columns; after preparing
    // again it sees the new row.
    for (i, (c, old)) in clients.iter().enumerate() {
        for attempt in 0..2 {
            match c.query(old, &[&1i32]).await {
                Err(e) => assert_eq!(code(&e), "0A000", "client {i}, attempt {attempt}: {e:?}"),
                Ok(rows) => panic!(
                    "client {i}, attempt {attempt}: rows of {} columns for a statement described with 2",
                    rows[0].len()
                ),
            }
        }
        let fresh = c.prepare(SELECT).await.unwrap();
        for _ in 0..3 {
            let rows = c.query(&fresh, &[&1i32]).await.unwrap();
            assert_eq!(rows[0].len(), 3, "client {i} after preparing again");
            assert_eq!(rows[0].get::<_, i32>(2), 7);
        }
    }
    // A new client never sees the old plan.
    let late = proxy.client(&db).await;
    for _ in 0..4 {
        let s = late.prepare(SELECT).await.unwrap();
        assert_eq!(late.query(&s, &[&1i32]).await.unwrap()[0].len(), 3);
    }

    let totals = proxy.shared.stats.traffic(&db, 0).totals();
    assert!(
        totals.prepared_invalidations >= 1,
        "invalidations counted: {totals:?}"
    );
    assert!(
        totals.prepared_reprepares >= 1,
        "re-prepares counted: {totals:?}"
    );
}
