//! Session parameters: which ones follow a client from server to server, and
//! the pure plan that brings a server's parameters to a client's.

use std::collections::BTreeMap;

/// Reported by PostgreSQL but not settable by clients.
const READ_ONLY: &[&str] = &[
    "server_version",
    "server_encoding",
    "integer_datetimes",
    "is_superuser",
    "in_hot_standby",
    "scram_iterations",
];

/// The session's identity: set before any other parameter (they run as the
/// identity they set), `session_authorization` before `role` (setting the
/// session user resets the role).
const IDENTITY: &[&str] = &["session_authorization", "role"];

/// Startup keys that are not session parameters.
const NOT_PARAMS: &[&str] = &["user", "database", "options", "replication"];

/// Settings PostgreSQL reads a statement's text under: literals are
/// converted (time zone, date and interval styles, backslashes, encoding,
/// `array_nulls`), names resolved (`search_path`, as the role sees it) and
/// `= NULL` read (`transform_null_equals`) once, at Parse. A prepared
/// statement keeps what it was parsed as.
const PARSE_SETTINGS: &[&str] = &[
    "timezone",
    "datestyle",
    "intervalstyle",
    "standard_conforming_strings",
    "backslash_quote",
    "client_encoding",
    "array_nulls",
    "search_path",
    "transform_null_equals",
    "role",
    "session_authorization",
];

/// A digest of the parse settings among `params` (a session's): clients
/// share a server statement only when theirs agree, so no client runs a
/// statement another client's settings parsed.
pub fn parse_context(params: &BTreeMap<String, String>) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for (k, v) in params {
        if PARSE_SETTINGS.iter().any(|p| p.eq_ignore_ascii_case(k)) {
            k.to_ascii_lowercase().hash(&mut h);
            v.hash(&mut h);
        }
    }
    h.finish()
}

pub fn is_tracked(name: &str) -> bool {
    !READ_ONLY.iter().any(|r| r.eq_ignore_ascii_case(name))
        && !NOT_PARAMS.iter().any(|r| r.eq_ignore_ascii_case(name))
}

/// A parameter name safe to splice into SET (letters, digits, `_`, `.`).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
}

/// A string literal that means the same whatever `standard_conforming_strings` is.
/// One spelling per parameter: the server's reported spelling (`TimeZone`)
/// when it reports it, otherwise lowercase (as `pg_settings` names it).
pub fn canonical(name: &str, reported: &BTreeMap<String, String>) -> String {
    reported
        .keys()
        .find(|k| k.eq_ignore_ascii_case(name))
        .cloned()
        .unwrap_or_else(|| name.to_ascii_lowercase())
}

fn quote_literal(v: &str) -> String {
    if v.contains('\\') {
        format!("E'{}'", v.replace('\\', "\\\\").replace('\'', "''"))
    } else {
        format!("'{}'", v.replace('\'', "''"))
    }
}

/// One query that returns, for each (name, value), PostgreSQL's own
/// spelling of the value (`ISO, MDY` for `iso,mdy`, `UTF8` for `utf8`,
/// `Europe/Rome` for `europe/rome`), and changes nothing: the values are
/// set locally to the statement's own transaction. Fails, with PostgreSQL's
/// error, on a value PostgreSQL refuses.
pub fn canonical_sql(pairs: &[(String, String)]) -> String {
    let values: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("({}, {})", quote_literal(k), quote_literal(v)))
        .collect();
    format!(
        "SELECT n, pg_catalog.set_config(n, v, true) FROM (VALUES {}) s(n, v)",
        values.join(", ")
    )
}

/// SQL that makes a server with `server` parameters match `client`, or `None`
/// when they already match. Keys the server has but the client does not (set
/// for an earlier client, never reported by default) are RESET.
pub fn sync_sql(
    client: &BTreeMap<String, String>,
    server: &BTreeMap<String, String>,
    defaults: &BTreeMap<String, String>,
) -> Option<String> {
    // set_config() takes the value as text, parsed like a config file entry,
    // so list-valued settings (search_path) keep their elements.
    let identity_rank = |k: &str| {
        IDENTITY
            .iter()
            .position(|i| *i == k)
            .unwrap_or(IDENTITY.len())
    };
    let mut differing: Vec<(&String, &String)> = client
        .iter()
        .filter(|(k, v)| server.get(*k) != Some(*v) && valid_name(k))
        .collect();
    differing.sort_by_key(|(k, _)| identity_rank(k));
    let sets: Vec<String> = differing
        .into_iter()
        .map(|(k, v)| {
            format!(
                "pg_catalog.set_config({}, {}, false)",
                quote_literal(k),
                quote_literal(v)
            )
        })
        .collect();
    let resets: Vec<&String> = server
        .keys()
        .filter(|k| {
            !client.contains_key(*k) && !defaults.contains_key(*k) && is_tracked(k) && valid_name(k)
        })
        .collect();
    let mut sql = String::new();
    // An identity another client took is given up first: what follows runs
    // as this client's. Then the other settings another client left, before
    // the SELECT: one may keep the SELECT from running at all (a serializable
    // default_transaction_isolation on a hot standby, a tiny
    // statement_timeout).
    let mut resets = resets;
    resets.sort_by_key(|k| identity_rank(k));
    for k in resets {
        sql.push_str(&format!("RESET {k};"));
    }
    if !sets.is_empty() {
        sql.push_str("SELECT ");
        sql.push_str(&sets.join(", "));
        sql.push(';');
    }
    (!sql.is_empty()).then_some(sql)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parse_context_follows_parse_settings_only() {
        let of = |pairs: &[(&str, &str)]| {
            parse_context(
                &pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            )
        };
        let base = of(&[("TimeZone", "UTC"), ("application_name", "a")]);
        assert_eq!(base, of(&[("TimeZone", "UTC"), ("application_name", "b")]));
        assert_ne!(
            base,
            of(&[("TimeZone", "Asia/Tokyo"), ("application_name", "a")])
        );
        for k in [
            "DateStyle",
            "search_path",
            "client_encoding",
            "standard_conforming_strings",
        ] {
            assert_ne!(base, of(&[("TimeZone", "UTC"), (k, "x")]), "{k}");
        }
        assert_eq!(of(&[("work_mem", "1MB")]), of(&[("work_mem", "2MB")]));
    }

    fn m(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
            .collect()
    }

    #[test]
    fn nothing_to_do_when_equal() {
        let a = m(&[("application_name", "x")]);
        assert_eq!(sync_sql(&a, &a, &a), None);
    }

    #[test]
    fn sets_differences_and_resets_leftovers() {
        let defaults = m(&[("application_name", "")]);
        let client = m(&[("application_name", "it's")]);
        let server = m(&[("application_name", ""), ("extra_float_digits", "3")]);
        assert_eq!(
            sync_sql(&client, &server, &defaults).unwrap(),
            "RESET extra_float_digits;SELECT pg_catalog.set_config('application_name', 'it''s', false);"
        );
        // What another client left goes before the SELECT, which it could
        // stop (a serializable default on a hot standby refuses a SELECT).
        let server = m(&[
            ("application_name", ""),
            ("default_transaction_isolation", "serializable"),
        ]);
        assert!(
            sync_sql(&client, &server, &defaults)
                .unwrap()
                .starts_with("RESET default_transaction_isolation;SELECT ")
        );
    }

    #[test]
    fn the_identity_is_given_up_or_taken_before_any_other_setting() {
        let defaults = m(&[("session_authorization", "app")]);
        let server = m(&[
            ("role", "r_other"),
            ("search_path", "x"),
            ("session_authorization", "app"),
        ]);
        let client = m(&[("session_authorization", "app"), ("search_path", "y")]);
        assert_eq!(
            sync_sql(&client, &server, &defaults).unwrap(),
            "RESET role;SELECT pg_catalog.set_config('search_path', 'y', false);"
        );
        let server = m(&[("session_authorization", "other"), ("TimeZone", "GMT")]);
        let client = m(&[
            ("TimeZone", "UTC"),
            ("role", "r"),
            ("session_authorization", "app"),
        ]);
        assert_eq!(
            sync_sql(&client, &server, &defaults).unwrap(),
            "SELECT pg_catalog.set_config('session_authorization', 'app', false), \
             pg_catalog.set_config('role', 'r', false), \
             pg_catalog.set_config('TimeZone', 'UTC', false);"
        );
    }

    #[test]
    fn backslashes_are_escaped() {
        assert_eq!(quote_literal("a\\b'c"), "E'a\\\\b''c'");
    }

    #[test]
    fn hostile_names_are_never_spliced() {
        let client = m(&[("a;drop table x", "1")]);
        assert_eq!(sync_sql(&client, &BTreeMap::new(), &BTreeMap::new()), None);
        assert!(!is_tracked("server_version"));
        assert!(is_tracked("TimeZone"));
    }
}
