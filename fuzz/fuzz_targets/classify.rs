//! Routing classification (`router::classify::classify`, on PostgreSQL's own
//! parser) and the statement fingerprints (`mask`, `masked_hash`,
//! `hash_and_template`) on arbitrary text. No panic, and:
//! - strict rules never classify a statement as less demanding;
//! - `hash_and_template`'s hash is `masked_hash`, and a template matches its
//!   own statement;
//! - a statement another statement's template matches has the same hash;
//! - masking is idempotent for text without `$` (see `mask`'s docs).
//!
//! Input: two statements separated by the first NUL byte (the second only
//! for the template check).
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use tidepool::config::schema::Routing;
use tidepool::router::classify::{Rules, classify};
use tidepool::stats::fingerprint::{hash_and_template, mask, masked_hash};

static RULES: LazyLock<Rules> = LazyLock::new(|| Rules::from_config(&Routing::default()));
static STRICT: LazyLock<Rules> = LazyLock::new(|| {
    Rules::from_config(&Routing {
        strict: true,
        write_functions: vec!["my_writer".into()],
        read_only_functions: vec!["my_reader".into(), "public.f".into()],
        ..Routing::default()
    })
});

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (a, b) = text.split_once('\0').unwrap_or((&text, ""));

    let class = classify(a, &RULES).class;
    let strict = classify(a, &STRICT).class;
    assert!(
        strict >= class,
        "strict rules made {a:?} less demanding: {strict:?} < {class:?}"
    );

    let (hash, template) = hash_and_template(a);
    assert_eq!(hash, masked_hash(a));
    if let Some(t) = &template {
        assert!(
            t.matches(a.as_bytes()),
            "{a:?} does not match its own template"
        );
        if t.matches(b.as_bytes()) {
            assert_eq!(masked_hash(b), hash, "{b:?} matches the template of {a:?}");
        }
    }

    let masked = mask(a);
    if !a.contains('$') {
        assert_eq!(mask(&masked), masked, "masking {a:?} twice changed it");
    }
});
