//! `client::sql::effects` on arbitrary text: no panic, and what it reports is
//! well formed (names it extracts are non-empty and come from the text).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidepool::client::sql::{PreparedSql, effects};

fuzz_target!(|data: &[u8]| {
    let sql = String::from_utf8_lossy(data);
    let e = effects(&sql);
    let lower = sql.to_ascii_lowercase();
    if let Some(name) = &e.deallocate {
        assert!(!name.is_empty());
        assert!(!e.drops_all_statements || name != "all");
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
        assert!(
            lower.contains(&p.to_ascii_lowercase()),
            "custom parameter {p:?} is not from the text"
        );
    }
    if e.drops_all_statements {
        assert!(e.params_changed || e.deallocate.is_none());
    }
    assert_eq!(e, effects(&sql), "effects is not deterministic");
});
