//! The shipped config is valid, the CLI validates configs, and the
//! configuration reference documents every key the code accepts.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

/// Field names of every `pub struct` in the config schema.
fn schema_keys() -> Vec<String> {
    let src = std::fs::read_to_string("src/config/schema.rs").unwrap()
        + &std::fs::read_to_string("src/config/otlp.rs").unwrap();
    let mut keys = Vec::new();
    for line in src.lines() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix("pub ") {
            if rest.starts_with("struct") || rest.starts_with("enum") || rest.starts_with("fn") {
                continue;
            }
            if let Some((name, _)) = rest.split_once(':') {
                keys.push(name.trim().to_owned());
            }
        }
    }
    keys
}

#[test]
fn every_config_key_is_documented() {
    let doc = std::fs::read_to_string("docs/configuration.md").unwrap();
    let keys = schema_keys();
    assert!(keys.len() > 20, "parsed too few keys: {keys:?}");
    for k in keys {
        if [
            "tidepool",
            "pool",
            "databases",
            "users",
            "routing",
            "stats",
            "metrics",
            "rate_limits",
            "tracing",
        ]
        .contains(&k.as_str())
        {
            continue;
        }
        assert!(
            doc.contains(&format!("`{k}`")),
            "docs/configuration.md lacks `{k}`"
        );
    }
}

#[test]
fn shipped_proxy_toml_is_valid_and_has_the_agreed_defaults() {
    let c = tidepool::Config::load(std::path::Path::new("proxy.toml")).unwrap();
    assert_eq!(c.pool.max_client_conn, 1000);
    assert_eq!(c.pool.default_pool_size, 25);
    assert_eq!(c.pool.min_pool_size, 10);
    assert_eq!(c.pool.max_db_connections, 100);
    let out = Command::new(env!("CARGO_BIN_EXE_tidepool"))
        .args(["check", "--config", "proxy.toml"])
        .output()
        .unwrap();
    assert!(out.status.success());
}

#[test]
fn check_rejects_a_bad_config_naming_line_and_key() {
    let dir = std::env::temp_dir().join(format!("tidepool-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.toml");
    std::fs::write(
        &path,
        "[pool]\ndefault_pool_size = 5\nmax_client_con = 10\n\n[databases.app]\nhost = \"h\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tidepool"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("bad.toml:3"), "{err}");
    assert!(err.contains("max_client_con"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn classify_prints_each_statements_class_under_the_configs_rules() {
    let out = Command::new(env!("CARGO_BIN_EXE_tidepool"))
        .args(["classify", "--config", "proxy.toml"])
        .args([
            "select 1",
            "insert into t values (1)",
            "select nextval('s')",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let classes: Vec<&str> = text
        .lines()
        .map(|l| l.split('\t').next().unwrap())
        .collect();
    assert_eq!(classes, ["Read", "Write", "Write"], "{text}");
}

/// Field names of `pub struct {name}` in the config schema.
fn struct_keys(name: &str) -> Vec<String> {
    let src = std::fs::read_to_string("src/config/schema.rs").unwrap();
    let start = src
        .find(&format!("pub struct {name} {{"))
        .unwrap_or_else(|| panic!("no struct {name}"));
    let body = &src[start..];
    let body = &body[..body.find("\n}").unwrap()];
    body.lines()
        .skip(1)
        .filter_map(|l| l.trim().strip_prefix("pub "))
        .filter_map(|r| r.split_once(':').map(|(k, _)| k.trim().to_owned()))
        .collect()
}

/// Every process-wide setting (all but the per-database and per-user
/// tables, shown by SHOW DATABASES and SHOW USERS) is a SHOW CONFIG row,
/// so that an operator sees every limit in force.
#[test]
fn show_config_has_every_process_wide_key() {
    let rows: Vec<String> = tidepool::config::describe(
        &tidepool::Config::from_toml_str("[databases.d]\nhost = \"h\"\n", "t.toml").unwrap(),
    )
    .into_iter()
    .map(|r| r.0)
    .collect();
    let mut missing = Vec::new();
    for (section, prefix) in [
        ("General", ""),
        ("PoolSettings", ""),
        ("Routing", ""),
        ("Stats", ""),
        ("RateLimits", ""),
        ("Metrics", "metrics_"),
    ] {
        for k in struct_keys(section) {
            let key = format!("{prefix}{k}");
            // Tiers are a table of their own (SHOW RATE_LIMITS shows them
            // in use); their names are listed as `rate_limit_tiers`.
            let key = if key == "tiers" {
                "rate_limit_tiers".to_owned()
            } else {
                key
            };
            if !rows.contains(&key) {
                missing.push(format!("{section}.{key}"));
            }
        }
    }
    assert!(missing.is_empty(), "SHOW CONFIG lacks {missing:?}");
}

#[test]
fn show_config_hides_the_rate_limit_backends_password() {
    let c = tidepool::Config::from_toml_str(
        "[databases.d]\nhost = \"h\"\n[rate_limits]\nrate_limit_backend = \"redis://tp:sekret@10.0.0.5:6379/2\"\n",
        "t.toml",
    )
    .unwrap();
    let rows = tidepool::config::describe(&c);
    let row = rows.iter().find(|r| r.0 == "rate_limit_backend").unwrap();
    assert_eq!(row.1, "redis://tp:***@10.0.0.5:6379/2");
    // And a URL the client cannot use is refused with its key named.
    let e = tidepool::Config::from_toml_str(
        "[databases.d]\nhost = \"h\"\n[rate_limits]\nrate_limit_backend = \"http://x\"\n",
        "t.toml",
    )
    .unwrap_err();
    assert!(e.to_string().contains("rate_limit_backend"), "{e}");
}
