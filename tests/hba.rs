//! Address rules (`auth_hba_file`): the same pg_hba.conf lines given to
//! PostgreSQL and to tidepool refuse and admit the same logins with the same
//! SQLSTATE and message, for clients from different loopback addresses
//! (127.0.0.1, .2, .3: every 127/8 address is this machine's). The console
//! obeys them too, and a reload puts new rules in force without dropping
//! connected clients (a broken file keeps the old rules).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::time::Duration;

use harness::daemon::Daemon;
use harness::login_from;
use harness::{TestProxy, cluster};
use tokio_postgres::Client;

const RULES: &str = "\
# The same rules for PostgreSQL and for tidepool.
local   all       all                      trust
host    all       rejected   127.0.0.1/32  reject
host    all       app        127.0.0.3     255.255.255.255   reject
host    all       trustuser  127.0.0.1/32  trust
host    all       md5user    127.0.0.1/32  md5
host    \"all\",pgbouncer,all all 127.0.0.1/32 scram-sha-256
host    all       md5user    127.0.0.3/32  password
host    all       all        127.0.0.3/32  scram-sha-256
host    all       all        ::1/128       scram-sha-256
";

fn outcome(r: &Result<Client, (String, String)>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err((code, message)) => format!("{code} {message}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_rules_admit_and_refuse_as_postgresql_does() {
    let c = cluster();
    let db = c.create_database("hba");
    // PostgreSQL takes the rules (this test binary has its own cluster).
    std::fs::write(c.primary_data_dir().join("pg_hba.conf"), RULES).unwrap();
    c.reload_primary();

    let dir = tempdir();
    let hba = dir.join("hba.conf");
    std::fs::write(&hba, RULES).unwrap();
    let toml = harness::proxy::config_toml(c, &db, "", "").replace(
        "[tidepool]\n",
        &format!(
            "[tidepool]\nauth_hba_file = \"{}\"\nstats_users = [\"app\"]\n",
            hba.display()
        ),
    );
    let proxy = TestProxy::start(&toml);
    let app_pw = harness::APP_PASSWORD;
    let cases: &[(&str, &str, &str)] = &[
        ("127.0.0.1", "app", app_pw),
        ("127.0.0.1", "app", "wrong"),
        ("127.0.0.2", "app", app_pw),
        ("127.0.0.3", "app", app_pw),
        ("127.0.0.1", "rejected", "x"),
        ("127.0.0.2", "rejected", "x"),
        ("127.0.0.1", "md5user", harness::MD5_PASSWORD),
        ("127.0.0.2", "md5user", harness::MD5_PASSWORD),
        ("127.0.0.3", "md5user", harness::MD5_PASSWORD),
        ("127.0.0.3", "md5user", "wrong"),
        ("127.0.0.1", "trustuser", ""),
        ("127.0.0.2", "trustuser", ""),
        ("127.0.0.2", "no_such_user", "x"),
    ];
    let mut wrong = Vec::new();
    let mut refusals = 0;
    for (source, user, pw) in cases {
        let direct = outcome(&login_from(source, c.primary_port(), user, pw, &db).await);
        let through = outcome(&login_from(source, proxy.port(), user, pw, &db).await);
        refusals += usize::from(direct.starts_with("28000"));
        if direct != through {
            wrong.push(format!(
                "{user} from {source}: directly {direct}, through tidepool {through}"
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    assert!(
        refusals >= 5,
        "the cases refuse too little to test the rules"
    );

    // The console obeys the same rules.
    let console = outcome(&login_from("127.0.0.2", proxy.port(), "app", app_pw, "pgbouncer").await);
    assert!(
        console.starts_with("28000 no pg_hba.conf entry for host \"127.0.0.2\""),
        "{console}"
    );
    let console = login_from("127.0.0.1", proxy.port(), "app", app_pw, "pgbouncer").await;
    assert!(console.is_ok(), "{}", outcome(&console));
}

#[test]
fn a_broken_rules_file_is_refused_with_its_line() {
    let dir = tempdir();
    std::fs::write(
        dir.join("hba.conf"),
        "host all all 0.0.0.0/0 trust\nhost all +group all md5\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("proxy.toml"),
        "[tidepool]\nauth_hba_file = \"hba.conf\"\n[databases.x]\nhost = \"127.0.0.1\"\n",
    )
    .unwrap();
    let (passed, text) = harness::tidepool_check(&dir.join("proxy.toml"));
    assert!(!passed, "{text}");
    assert!(text.contains("hba.conf:2"), "{text}");
    assert!(text.contains("group membership"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_puts_new_rules_in_force_without_dropping_clients() {
    let c = cluster();
    let db = c.create_database("hba_reload");
    let toml = |rules_file: &str| {
        format!(
            "[tidepool]\nlisten = [\"127.0.0.1:{{port}}\"]\nauth_hba_file = \"{rules_file}\"\n\
             [pool]\ndefault_pool_size = 2\n\
             [databases.{db}]\nhost = \"127.0.0.1\"\nport = {}\n\
             [users.app]\npassword = \"{}\"\n",
            c.primary_port(),
            harness::APP_PASSWORD
        )
    };
    // A relative path: next to the config file.
    let d = Daemon::start(&toml("hba.conf").replace("auth_hba_file = \"hba.conf\"\n", ""));
    let hba = d.config_path.parent().unwrap().join("hba.conf");
    std::fs::write(&hba, "host all app 127.0.0.1/32 scram-sha-256\n").unwrap();
    d.write_config(&toml("hba.conf").replace("{port}", &d.port.to_string()));
    d.signal(libc::SIGHUP);
    let pw = harness::APP_PASSWORD;
    harness::wait_until_async("the rules in force", Duration::from_secs(20), || async {
        login_from("127.0.0.2", d.port, "app", pw, &db)
            .await
            .is_err()
    })
    .await;
    let kept = login_from("127.0.0.1", d.port, "app", pw, &db)
        .await
        .unwrap();

    // Everyone from 127.0.0.1 refused now; the connected client stays.
    std::fs::write(&hba, "host all app 127.0.0.1/32 reject\n").unwrap();
    d.signal(libc::SIGHUP);
    harness::wait_until_async(
        "the new rules in force",
        Duration::from_secs(20),
        || async {
            login_from("127.0.0.1", d.port, "app", pw, &db)
                .await
                .is_err()
        },
    )
    .await;
    let refused = outcome(&login_from("127.0.0.1", d.port, "app", pw, &db).await);
    assert!(
        refused.starts_with(
            "28000 pg_hba.conf rejects connection for host \"127.0.0.1\", user \"app\""
        ),
        "{refused}"
    );
    kept.simple_query("select 1").await.unwrap();

    // A broken file: the reload fails, the rules in force stay.
    std::fs::write(&hba, "host all app 127.0.0.1/32 ident\n").unwrap();
    d.signal(libc::SIGHUP);
    harness::wait_until("the reload refused", Duration::from_secs(20), || {
        d.log().contains("reload failed")
    });
    assert!(
        login_from("127.0.0.1", d.port, "app", pw, &db)
            .await
            .is_err()
    );
    kept.simple_query("select 1").await.unwrap();
}

fn tempdir() -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!(
        "tidepool-hba-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}
