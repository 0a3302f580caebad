//! No state crosses clients. On a pool of one server, client A changes its
//! role, session user or settings in one of the ways PostgreSQL offers (SET
//! ROLE, SET SESSION AUTHORIZATION, set_config, RESET ALL, DISCARD ALL, a
//! function, a DO block, a procedure, dynamic SQL, in simple and extended
//! protocol); then client B, of the same user, shares the server. B must see
//! exactly what a fresh connection sees, and A must keep exactly what it
//! would keep directly (the same steps run on PostgreSQL itself give the
//! expected state: a differential test).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use harness::{TestProxy, cluster};
use tokio_postgres::Client;

/// What a client sees of its identity and settings.
const STATE: &str = "select current_user::text || '|' || session_user::text || '|' || \
     current_setting('search_path') || '|' || current_setting('statement_timeout') || '|' || \
     current_setting('work_mem') || '|' || current_setting('application_name') || '|' || \
     coalesce(nullif(current_setting('app.tenant', true), ''), '(unset)')";

enum Step {
    /// One simple-protocol query (may hold several statements).
    Simple(&'static str),
    /// One extended-protocol statement with text parameters.
    Extended(&'static str, &'static [&'static str]),
}
use Step::{Extended, Simple};

struct Case {
    name: &'static str,
    user: &'static str,
    steps: &'static [Step],
}

const CASES: &[Case] = &[
    Case {
        name: "SET ROLE",
        user: "app",
        steps: &[Simple("SET ROLE r_other")],
    },
    Case {
        name: "set_config('role')",
        user: "app",
        steps: &[Simple("select set_config('role', 'tenant_x', false)")],
    },
    Case {
        name: "set_config('role') in extended protocol",
        user: "app",
        steps: &[Extended(
            "select set_config($1, $2, false)",
            &["role", "r_other"],
        )],
    },
    Case {
        name: "SET ROLE inside a committed transaction",
        user: "app",
        steps: &[Simple(
            "begin; set role r_other; set search_path = leak; commit",
        )],
    },
    Case {
        name: "SET ROLE inside a rolled-back transaction",
        user: "app",
        steps: &[Simple("begin; set role r_other; rollback")],
    },
    Case {
        name: "SET SESSION AUTHORIZATION",
        user: "postgres",
        steps: &[Simple("SET SESSION AUTHORIZATION app")],
    },
    Case {
        name: "SET SESSION AUTHORIZATION then SET ROLE",
        user: "postgres",
        steps: &[
            Simple("SET SESSION AUTHORIZATION app"),
            Simple("SET ROLE r_other"),
        ],
    },
    Case {
        name: "RESET ALL keeps the role",
        user: "app",
        steps: &[
            Simple("SET ROLE r_other"),
            Simple("SET search_path = leak"),
            Simple("RESET ALL"),
        ],
    },
    Case {
        // A custom setting made inside a function (the multi-tenant
        // pattern): PostgreSQL lists custom settings nowhere, so the name
        // is found in the function's body; it stays the caller's.
        name: "custom setting in a function",
        user: "app",
        steps: &[Simple("select set_tenant(42)")],
    },
    Case {
        // The same, two calls down: the functions that call a function
        // that sets are found too (they used to leak the tenant).
        name: "custom setting in a nested function",
        user: "app",
        steps: &[Simple("select app_login(43)")],
    },
    Case {
        name: "DISCARD ALL",
        user: "app",
        steps: &[
            Simple("SET ROLE r_other"),
            Simple("SET work_mem = '9MB'"),
            Simple("DISCARD ALL"),
        ],
    },
    Case {
        name: "RESET ROLE",
        user: "app",
        steps: &[Simple("SET ROLE r_other"), Simple("RESET ROLE")],
    },
    Case {
        name: "SQL PREPARE of a set_config, executed in a later transaction",
        user: "app",
        steps: &[
            Simple("PREPARE leak AS select set_config('work_mem', '11MB', false)"),
            Simple("EXECUTE leak"),
        ],
    },
    Case {
        name: "set_config in a PL/pgSQL function",
        user: "app",
        steps: &[Simple("select leaky()")],
    },
    Case {
        name: "set_config in an SQL function, extended protocol",
        user: "app",
        steps: &[Extended("select public.leaky_sql()", &[])],
    },
    Case {
        name: "SET ROLE by dynamic SQL in a function",
        user: "app",
        steps: &[Simple("SELECT Dyn_Role ()")],
    },
    Case {
        name: "DO block",
        user: "app",
        steps: &[Simple(
            "DO $$ begin perform set_config('search_path', 'leak', false); end $$",
        )],
    },
    Case {
        name: "procedure",
        user: "app",
        steps: &[Simple("CALL proc_leak()")],
    },
    Case {
        name: "a function created through tidepool, then called",
        user: "app",
        steps: &[
            Simple(
                "create or replace function made_here() returns int language plpgsql as \
                 $$ begin perform set_config('work_mem', '5MB', false); return 1; end $$",
            ),
            Simple("select made_here()"),
        ],
    },
    Case {
        name: "application_name and a role together",
        user: "app",
        steps: &[Simple(
            "set application_name = 'tenant-a'; set role tenant_x; set statement_timeout = '3s'",
        )],
    },
];

const SETUP: &str = r#"
do $$ begin create role r_other nologin; exception when duplicate_object then null; end $$;
do $$ begin create role tenant_x nologin; exception when duplicate_object then null; end $$;
grant r_other, tenant_x to app;
create schema leak;
grant usage on schema leak to public;
create function leaky() returns text language plpgsql
  as $f$ begin perform set_config('search_path', 'leak', false); return 'ok'; end $f$;
create function leaky_sql() returns text language sql
  as $f$ select set_config('work_mem', '7MB', false) $f$;
create function dyn_role() returns void language plpgsql
  as $f$ begin execute 'set role ' || 'tenant_x'; end $f$;
create function set_tenant(t int) returns void language plpgsql
  as $f$ begin perform set_config('app.tenant', t::text, false); end $f$;
create function enter_tenant(t int) returns int language plpgsql
  as $f$ begin perform set_tenant(t); return t; end $f$;
create function app_login(t int) returns int language sql
  as $f$ select enter_tenant(t) $f$;
create procedure proc_leak() language plpgsql
  as $f$ begin perform set_config('statement_timeout', '42s', false); end $f$;
"#;

async fn state(c: &Client) -> String {
    let rows = c.simple_query(STATE).await.unwrap();
    rows.iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .unwrap()
}

/// Runs the steps; returns each step's outcome (ok or the SQLSTATE).
async fn run(c: &Client, steps: &[Step]) -> Vec<String> {
    let mut out = Vec::new();
    for s in steps {
        let r = match s {
            Simple(sql) => c.batch_execute(sql).await.map(|_| ()),
            Extended(sql, params) => {
                let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params
                    .iter()
                    .map(|p| p as &(dyn tokio_postgres::types::ToSql + Sync))
                    .collect();
                c.query(*sql, &params).await.map(|_| ())
            }
        };
        out.push(match r {
            Ok(()) => "ok".to_owned(),
            Err(e) => e.code().map_or(e.to_string(), |c| c.code().to_owned()),
        });
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_role_session_user_or_setting_crosses_clients_on_a_pool_of_one() {
    let c = cluster();
    let db = c.create_database("isolation");
    let admin = c.admin_client(&db).await;
    admin.batch_execute(SETUP).await.unwrap();
    let toml = harness::proxy::config_toml(c, &db, "default_pool_size = 1", "")
        + &format!(
            "\n[users.postgres]\npassword = \"{}\"\n",
            harness::SUPERUSER_PASSWORD
        );
    let proxy = TestProxy::start(&toml);
    let password = |u: &str| {
        if u == harness::SUPERUSER {
            harness::SUPERUSER_PASSWORD
        } else {
            harness::APP_PASSWORD
        }
    };
    let mut failures = Vec::new();
    for case in CASES {
        let direct_url = c.url(case.user, Some(password(case.user)), &db);
        let proxy_url = proxy.url_as(case.user, Some(password(case.user)), &db);

        // Directly: what a fresh connection sees, and what A keeps.
        let fresh = state(&harness::connect(&direct_url).await.unwrap()).await;
        let direct_a = harness::connect(&direct_url).await.unwrap();
        let direct_outcome = run(&direct_a, case.steps).await;
        let direct_kept = state(&direct_a).await;
        drop(direct_a);

        // Through tidepool, on one server: B, then A's steps, then B again.
        let b = harness::connect(&proxy_url).await.unwrap();
        let a = harness::connect(&proxy_url).await.unwrap();
        let b_before = state(&b).await;
        let outcome = run(&a, case.steps).await;
        let a_after = state(&a).await;
        let b_after = state(&b).await;
        let a_again = state(&a).await;
        let newcomer = state(&harness::connect(&proxy_url).await.unwrap()).await;
        let b_last = state(&b).await;

        let mut wrong = Vec::new();
        if outcome != direct_outcome {
            wrong.push(format!(
                "steps gave {outcome:?}, directly {direct_outcome:?}"
            ));
        }
        for (who, got) in [
            ("B before A's steps", &b_before),
            ("B after A's steps", &b_after),
            ("a new client", &newcomer),
            ("B at last", &b_last),
        ] {
            if *got != fresh {
                wrong.push(format!("{who} sees {got}, a fresh connection {fresh}"));
            }
        }
        for (who, got) in [("A after its steps", &a_after), ("A after B ran", &a_again)] {
            if *got != direct_kept {
                wrong.push(format!("{who} sees {got}, directly {direct_kept}"));
            }
        }
        let restores = matches!(
            case.name,
            "RESET ROLE" | "DISCARD ALL" | "SET ROLE inside a rolled-back transaction"
        );
        if direct_kept == fresh && !restores {
            wrong.push(format!(
                "the case changes nothing directly ({fresh}): it tests nothing"
            ));
        }
        if !wrong.is_empty() {
            failures.push(format!("{}: {}", case.name, wrong.join("; ")));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The functions query tidepool runs after every DDL transaction (and once
/// a minute) is compiled by no JIT: its cost estimate passes
/// `jit_above_cost`, and compiling took ~0.9 s each time (a restore through
/// tidepool took minutes). Judged by PostgreSQL's own EXPLAIN ANALYZE of the
/// text as sent (the SET LOCAL in the same simple query, its implicit
/// transaction); where this PostgreSQL has JIT, the bare query uses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_functions_query_runs_without_jit() {
    use tidepool::server::session_functions::{QUERY, query};
    let c = cluster();
    let db = c.create_database("nojit");
    let direct = c.admin_client(&db).await;
    let jit_lines = |msgs: Vec<tokio_postgres::SimpleQueryMessage>| -> usize {
        msgs.iter()
            .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0).is_some_and(|l| l.starts_with("JIT"))))
            .count()
    };
    let sent = query();
    let (set, rest) = sent.split_once("; ").unwrap();
    assert_eq!(rest, QUERY);
    let explained = format!("{set}; explain (analyze) {rest}");
    assert_eq!(jit_lines(direct.simple_query(&explained).await.unwrap()), 0);
    let available = direct
        .query_one("select pg_catalog.pg_jit_available()", &[])
        .await
        .unwrap()
        .get::<_, bool>(0);
    let bare = jit_lines(
        direct
            .simple_query(&format!("set jit = on; explain (analyze) {QUERY}"))
            .await
            .unwrap(),
    );
    assert_eq!(bare > 0, available, "JIT available: {available}");
}
