//! `client::sql::effects` on arbitrary text: no panic, what it reports is
//! well formed (names it extracts are non-empty and come from the text), and
//! PostgreSQL's own parser (`pg_query`) is the oracle for the statements that
//! matter to pooling: every PREPARE, LISTEN, session SET/RESET, DISCARD and
//! DEALLOCATE ALL PostgreSQL reads in the text must be noticed (a PREPARE or
//! SET that slipped through unnoticed would leave its state on a shared
//! server), and a text PostgreSQL reads as one PREPARE, EXECUTE or
//! DEALLOCATE must give the statement name PostgreSQL reads.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pg_query::protobuf::node::Node as N;
use tidepool::client::sql::{Effects, PreparedSql, effects};

/// The name `effects` took from a PREPARE or EXECUTE.
fn prepared_name(e: &Effects) -> Option<&str> {
    match &e.prepared {
        Some(PreparedSql::Prepare { name, .. } | PreparedSql::Execute { name, .. }) => Some(name),
        None => None,
    }
}

fn check_against_postgres(sql: &str, e: &Effects) {
    let Ok(parsed) = pg_query::parse(sql, 0) else {
        return;
    };
    let stmts = &parsed.protobuf.stmts;
    let single = stmts.len() == 1;
    for stmt in stmts {
        let Some(node) = stmt.stmt.as_ref().and_then(|s| s.node.as_ref()) else {
            continue;
        };
        match node {
            // Mapped to a shared server statement, or the client is pinned.
            N::PrepareStmt(p) if single => assert!(
                prepared_name(e) == Some(p.name.as_str()) || e.session_feature.is_some(),
                "PREPARE {:?} missed: {e:?}",
                p.name
            ),
            N::PrepareStmt(p) => assert!(
                e.session_feature.is_some(),
                "PREPARE {:?} in a multi-statement query missed: {e:?}",
                p.name
            ),
            N::ExecuteStmt(x) if single => assert!(
                prepared_name(e) == Some(x.name.as_str()) || e.session_feature.is_some(),
                "EXECUTE {:?} missed: {e:?}",
                x.name
            ),
            N::DeallocateStmt(d) if d.isall => {
                assert!(e.drops_all_statements, "DEALLOCATE ALL missed: {e:?}")
            }
            N::DeallocateStmt(d) if single => assert_eq!(
                e.deallocate.as_deref(),
                Some(d.name.as_str()),
                "DEALLOCATE {:?} missed",
                d.name
            ),
            N::ListenStmt(_) => assert!(e.session_feature.is_some(), "LISTEN missed: {e:?}"),
            N::DiscardStmt(_) => assert!(e.params_changed, "DISCARD missed: {e:?}"),
            N::VariableSetStmt(v) if !v.is_local && !v.name.starts_with("TRANSACTION") => {
                assert!(e.params_changed, "SET/RESET {:?} missed: {e:?}", v.name)
            }
            _ => {}
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let sql = String::from_utf8_lossy(data);
    let e = effects(&sql);
    let lower = sql.to_ascii_lowercase();
    if let Some(name) = &e.deallocate {
        assert!(!name.is_empty());
    }
    match &e.prepared {
        Some(PreparedSql::Prepare { name, rest } | PreparedSql::Execute { name, rest }) => {
            assert!(!name.is_empty());
            assert!(
                sql.contains(rest.as_str()),
                "rest {rest:?} is not from the text"
            );
        }
        None => {}
    }
    for p in &e.custom_params {
        assert!(p.contains('.'), "custom parameter without a dot: {p:?}");
        // Each part is a name in the text (quotes and spaces around `.` gone;
        // set_config's literal names may have empty parts).
        for part in p.split('.').filter(|part| !part.is_empty()) {
            let part = part.to_ascii_lowercase();
            assert!(
                lower.contains(&part) || lower.contains(&part.replace('"', "\"\"")),
                "custom parameter {p:?} is not from the text"
            );
        }
    }
    if e.drops_all_statements {
        assert!(e.params_changed || e.deallocate.is_none());
    }
    assert_eq!(e, effects(&sql), "effects is not deterministic");
    check_against_postgres(&sql, &e);
});
