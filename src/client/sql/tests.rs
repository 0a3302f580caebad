use super::*;

#[test]
fn nested_executes_are_found_where_they_stand() {
    // The name, and the text it stands as.
    let at = |sql: &str| {
        effects(sql)
            .nested_execute
            .map(|n| (n.name.clone(), sql[n.start..n.end].to_owned()))
    };
    assert_eq!(at("explain execute p(1)"), Some(("p".into(), "p".into())));
    assert_eq!(
        at("EXPLAIN (ANALYZE, COSTS OFF) EXECUTE Q3 (1)"),
        Some(("q3".into(), "Q3".into()))
    );
    assert_eq!(
        at("explain analyze verbose execute \"P\"(1)"),
        Some(("P".into(), "\"P\"".into()))
    );
    assert_eq!(
        at("create temp table t (a, b) as execute p(1)"),
        Some(("p".into(), "p".into()))
    );
    assert_eq!(
        at("create table s.t as execute p"),
        Some(("p".into(), "p".into()))
    );
    for sql in [
        "explain select 1",
        "create table t as select 1",
        "create table execute (a int)",
        "explain execute p(1); select 1",
        "select 'explain execute p'",
    ] {
        assert_eq!(effects(sql).nested_execute, None, "{sql}");
    }
}

#[test]
fn executes_in_a_query_of_several_statements_are_found_in_order() {
    let found = |sql: &str| -> Vec<(String, String)> {
        effects(sql)
            .executes
            .iter()
            .map(|n| (n.name.clone(), sql[n.start..n.end].to_owned()))
            .collect()
    };
    assert_eq!(
        found("select 1; EXECUTE P(1); explain execute \"q\"; begin;execute r"),
        [
            ("p".into(), "P".into()),
            ("q".into(), "\"q\"".into()),
            ("r".into(), "r".into())
        ]
    );
    // Alone, it is `prepared` / `nested_execute`; in text, nothing.
    assert!(found("execute p(1)").is_empty());
    assert!(found("explain execute p(1)").is_empty());
    assert!(found("select 'execute p'; select 2").is_empty());
}

#[test]
fn transaction_exits_are_the_statements_a_failed_transaction_parses() {
    for sql in [
        "ROLLBACK",
        " /* c */ rollback to s1",
        "commit",
        "END",
        "abort",
        "prepare transaction 'x'",
    ] {
        assert!(exits_transaction(sql), "{sql}");
    }
    for sql in [
        "select 1",
        "prepare p as select 1",
        "begin",
        "rollbacks",
        "",
    ] {
        assert!(!exits_transaction(sql), "{sql}");
    }
}

#[test]
fn substring_search_ignores_case_with_or_without_an_anchor() {
    assert!(contains_ignore_case(
        "select PG_Advisory_Lock(1)",
        "pg_advisory_lock"
    ));
    assert!(contains_ignore_case(
        "pg_try_advisory_lock",
        "pg_try_advisory_lock"
    ));
    assert!(contains_ignore_case("x _set_config", "set_config"));
    assert!(!contains_ignore_case("set_confi", "set_config"));
    assert!(!contains_ignore_case("_", "set_config"));
    assert!(!contains_ignore_case(
        "pg_advisory_xact_lock(1)",
        "pg_advisory_lock"
    ));
    assert!(contains_ignore_case(
        "declare c cursor WITH HOLD for",
        "with hold"
    ));
    assert!(!contains_ignore_case("with  hold", "with hold"));
}

#[test]
fn a_trailing_semicolon_keeps_the_fast_path_right() {
    assert_eq!(
        effects("SELECT abalance FROM t WHERE aid = 1;"),
        Effects::default()
    );
    assert!(
        effects("select pg_advisory_lock(1);  ")
            .session_feature
            .is_some()
    );
    assert!(effects("select 1; set a = 1;").params_changed);
    assert!(effects("select ';'; set a = 1").params_changed);
}

#[test]
fn session_changes_are_seen_and_local_ones_ignored() {
    assert!(effects("SET search_path = a").params_changed);
    assert!(effects("  /* hi */ set TimeZone to 'UTC'").params_changed);
    assert!(effects("select 1; reset all").params_changed);
    assert!(effects("select set_config('a.b', '1', false)").params_changed);
    assert!(effects("SET ROLE r").params_changed);
    assert!(effects("set session authorization u").params_changed);
    assert!(effects("do $$ begin perform 1; end $$").params_changed);
    assert!(effects("CALL p()").params_changed);
    assert!(!effects("select 'do'").params_changed);
    assert!(!effects("SET LOCAL statement_timeout = 5").params_changed);
    assert!(!effects("set transaction isolation level serializable").params_changed);
    assert!(!effects("update t set a = 1").params_changed);
    assert!(!effects("select 'set x = 1; reset'").params_changed);
}

#[test]
fn custom_parameters_are_named() {
    assert_eq!(
        effects("SET app.tenant = 'a'").custom_params,
        ["app.tenant"]
    );
    assert_eq!(effects("set session my.x to 1").custom_params, ["my.x"]);
    assert_eq!(effects("reset app.tenant").custom_params, ["app.tenant"]);
    assert_eq!(
        effects("select set_config('App.User', 'x', false)").custom_params,
        ["app.user"]
    );
    assert!(effects("set search_path = a").custom_params.is_empty());
}

#[test]
fn session_features_are_named() {
    assert_eq!(effects("LISTEN chan").session_feature, Some("LISTEN"));
    assert!(
        effects("select pg_advisory_lock(1)")
            .session_feature
            .is_some()
    );
    assert!(
        effects("select pg_advisory_xact_lock(1)")
            .session_feature
            .is_none()
    );
    assert!(
        effects("create temp table t(a int)")
            .session_feature
            .is_some()
    );
    assert!(
        effects("CREATE GLOBAL TEMPORARY TABLE t(a int)")
            .session_feature
            .is_some()
    );
    assert!(
        effects("create table temp(a int)")
            .session_feature
            .is_none()
    );
    assert!(
        effects("declare c cursor with hold for select 1")
            .session_feature
            .is_some()
    );
    assert!(
        effects("declare c cursor for select 1")
            .session_feature
            .is_none()
    );
    assert!(
        effects("do $$ begin perform 1; end $$; listen x")
            .session_feature
            .is_some()
    );
}

#[test]
fn sql_prepare_and_execute_are_parsed() {
    assert_eq!(
        effects("PREPARE Foo (int, numeric(10,2)) AS select $1, $2").prepared,
        Some(PreparedSql::Prepare {
            name: "foo".into(),
            rest: " (int, numeric(10,2)) AS select $1, $2".into()
        })
    );
    assert_eq!(
        effects("execute \"Foo\"(1, 'a')").prepared,
        Some(PreparedSql::Execute {
            name: "Foo".into(),
            rest: "(1, 'a')".into()
        })
    );
    assert!(effects("prepare x as\nselect 1").prepared.is_some());
    assert_eq!(effects("prepare x select 1").prepared, None);
    assert!(
        effects("prepare x as select 1; select 2")
            .session_feature
            .is_some()
    );
    assert_eq!(effects("prepare x as select 1").session_feature, None);
}

#[test]
fn statement_dropping_is_recognised() {
    assert!(effects("DISCARD ALL").drops_all_statements);
    assert!(effects("deallocate all").drops_all_statements);
    assert!(effects("DEALLOCATE PREPARE ALL").drops_all_statements);
    assert_eq!(effects("deallocate s1").deallocate.as_deref(), Some("s1"));
    assert_eq!(
        effects("DEALLOCATE PREPARE \"S1\"").deallocate.as_deref(),
        Some("S1")
    );
    assert_eq!(effects("deallocate s1; select 1").deallocate, None);
}

/// Names read as PostgreSQL's scanner reads them (fuzzing found
/// `EXECUTE ""` taken as a statement named ""; PostgreSQL refuses a
/// zero-length quoted name, and the other spellings below went to the
/// server unmapped, or under another name).
#[test]
fn statement_names_are_read_like_postgres() {
    let name = |sql: &str| match effects(sql).prepared {
        Some(PreparedSql::Prepare { name, .. } | PreparedSql::Execute { name, .. }) => Some(name),
        None => None,
    };
    assert_eq!(name("EXECUTE \"\""), None);
    assert_eq!(name("PREPARE \"\" AS select 1"), None);
    assert_eq!(name("PREPARE 1x AS select 1"), None);
    assert_eq!(name("prepare_x AS select 1"), None);
    assert_eq!(
        effects("PREPARE \"a\"\"b\" AS select 1").prepared,
        Some(PreparedSql::Prepare {
            name: "a\"b".into(),
            rest: " AS select 1".into()
        })
    );
    assert_eq!(name("PREPARE Été AS select 1").as_deref(), Some("Été"));
    assert_eq!(name("EXECUTE Été(1)").as_deref(), Some("Été"));
    assert_eq!(name("EXECUTE\"S1\"").as_deref(), Some("S1"));
    assert_eq!(name("PREPARE x AS--c\nselect 1").as_deref(), Some("x"));
    assert_eq!(name("PREPARE x AS/*c*/select 1").as_deref(), Some("x"));
    assert_eq!(name("PREPARE x ASselect 1"), None);
    let long = "a".repeat(70);
    assert_eq!(
        name(&format!("EXECUTE {long}")).as_deref(),
        Some(&long[..63])
    );
    let dealloc = |sql: &str| effects(sql).deallocate;
    assert_eq!(dealloc("DEALLOCATE Été").as_deref(), Some("Été"));
    assert_eq!(dealloc("DEALLOCATE \"a b\"").as_deref(), Some("a b"));
    assert_eq!(dealloc("deallocate prepare").as_deref(), Some("prepare"));
    assert_eq!(
        dealloc("deallocate prepare_x").as_deref(),
        Some("prepare_x")
    );
    assert_eq!(dealloc("DEALLOCATE \"all\"").as_deref(), Some("all"));
    assert!(!effects("DEALLOCATE \"all\"").drops_all_statements);
    assert_eq!(dealloc("DEALLOCATE \"\""), None);
}

/// Statements PostgreSQL's parser reads but the first reading missed
/// (found by the sql_effects fuzzer's pg_query oracle): a quoted name
/// right after the keyword, vertical tab as space, nested comments,
/// backslash-escaped quotes in `E''`, `$` inside identifiers.
#[test]
fn statements_are_found_where_postgres_finds_them() {
    let e = effects("SET\"a\".b = 1");
    assert!(e.params_changed);
    assert_eq!(e.custom_params, ["a.b"]);
    assert_eq!(effects("RESET\"a\".b").custom_params, ["a.b"]);
    assert_eq!(
        effects("SET app.\"Tenant\" = 1").custom_params,
        ["app.Tenant"]
    );
    assert_eq!(effects("LISTEN\"x\"").session_feature, Some("LISTEN"));
    assert!(effects("\x0bSET x = 1").params_changed);
    assert!(effects("/* /* */ */ SET x = 1").params_changed);
    assert!(effects("select E'\\';'; SET x = 1").params_changed);
    assert!(effects("select e'\\'' ; reset all").params_changed);
    assert!(effects("select x$a$; set y = 1; select $a$").params_changed);
    assert!(!effects("select $a$; set y = 1; $a$").params_changed);
    assert!(!effects("select 'it''s; set y = 1'").params_changed);
    assert!(
        effects("PREPARE\x0bx AS select 1").prepared.is_some(),
        "vertical tab after PREPARE"
    );
    // A carriage return ends a -- comment.
    assert!(effects("EXECUTE --c\rx").prepared.is_some());
    assert!(effects("select 1; --c\rset x = 1").params_changed);
}
