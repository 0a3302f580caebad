#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;

/// Statements and the literal values that must never appear in their shape.
///
/// `pg_query::normalize` (18.1) leaves literals in several of these: comments,
/// `ALTER SYSTEM SET`, `ALTER ROLE … SET`, `FETCH n`, `COPY … FROM 'file'`,
/// `PREPARE … AS`, `CREATE TABLE … DEFAULT`, `CHECK (…)`, `COMMENT ON`,
/// `CREATE DATABASE … ENCODING`, `OPTIONS (…)` and `UESCAPE '…'`; the shape
/// text is masked again after it, so none of them may leak.
const CORPUS: &[(&str, &[&str])] = &[
    (
        "SELECT * FROM users WHERE email = 'alice@example.com'",
        &["alice", "example.com"],
    ),
    (
        "select * from t where name = 'O''Reilly s3cr3t'",
        &["Reilly", "s3cr3t"],
    ),
    (r"select E'it\'s a s3cr3t\n'", &["s3cr3t"]),
    (
        r"select e'back\\slash s3cr3t', 'after'",
        &["s3cr3t", "after", "slash"],
    ),
    (r"select 'C:\' as p, 'hunter2' as q", &["C:", "hunter2"]),
    (
        "select $$dollar s3cr3t 'quoted'$$",
        &["s3cr3t", "quoted", "dollar"],
    ),
    (
        "select $tag$ body $notag$ s3cr3t $tag$",
        &["s3cr3t", "body", "notag"],
    ),
    (
        "select $fn$ x $$ inner s3cr3t $$ $fn$",
        &["s3cr3t", "inner"],
    ),
    (
        "select $a$ s3cr3t $a$ || $b$ hunter2 $b$",
        &["s3cr3t", "hunter2"],
    ),
    ("select * from t where id = 987654", &["987654"]),
    ("select * from t where x = -987654", &["987654"]),
    (
        "select 1.25e-3 + .75 + 0x1F2E + 1_000_000",
        &["1.25", "1F2E", "1_000", ".75"],
    ),
    ("select 0o777 + 0b101010 + 1e10", &["777", "101010", "1e10"]),
    ("select pg_sleep(0.123456)", &["123456"]),
    (
        "select * from t where id in (111111, 222222, 333333)",
        &["111111", "222222", "333333"],
    ),
    (
        "select * from t where s in ('aaa1', 'bbb2', 'ccc3')",
        &["aaa1", "bbb2", "ccc3"],
    ),
    ("select array[424242, 434343]", &["424242", "434343"]),
    (
        "select * from t where a = 'x' -- comment with 'quote s3cr3t\n and b = 2",
        &["s3cr3t", "quote", "comment"],
    ),
    ("select /* it's a s3cr3t */ 1", &["s3cr3t", "it's"]),
    (
        "select /* outer /* nested 's3cr3t' */ still s3cr3t */ 424242",
        &["s3cr3t", "424242", "nested", "still"],
    ),
    (
        "SET application_name = 'payroll s3cr3t'",
        &["payroll", "s3cr3t"],
    ),
    ("SET search_path TO 'schema_s3cr3t', public", &["s3cr3t"]),
    ("SET LOCAL statement_timeout = 424242", &["424242"]),
    ("SET x = 'v'", &["'v'"]),
    ("set my.var = 'hunter2'", &["hunter2"]),
    ("ALTER SYSTEM SET work_mem = '64MB'", &["64MB"]),
    (
        "select * from t LIMIT 55555 OFFSET 77777",
        &["55555", "77777"],
    ),
    ("select * from t LIMIT 5", &["5"]),
    ("FETCH 424242 FROM cur", &["424242"]),
    ("ALTER ROLE r PASSWORD 'p'", &["'p'"]),
    ("ALTER ROLE r PASSWORD 'hunter2'", &["hunter2"]),
    ("CREATE USER u WITH PASSWORD 'p'", &["'p'"]),
    ("CREATE USER u WITH PASSWORD 'hunter2'", &["hunter2"]),
    (
        "CREATE ROLE u LOGIN ENCRYPTED PASSWORD 'md5abcdef0123' VALID UNTIL '2030-01-01'",
        &["abcdef", "2030"],
    ),
    ("ALTER USER u WITH PASSWORD $$hunter2$$", &["hunter2"]),
    ("ALTER USER u WITH PASSWORD E'hun\\'ter2'", &["hun", "ter2"]),
    (
        "CREATE USER MAPPING FOR u SERVER s OPTIONS (user 'bob_s3cr3t', password 'hunter2')",
        &["bob_s3cr3t", "hunter2"],
    ),
    (r"select U&'d\0061t\+000061 s3cr3t'", &["s3cr3t", "0061"]),
    (r"select U&'x!0061 s3cr3t' UESCAPE '!'", &["s3cr3t", "'!'"]),
    (
        "select B'101010', X'DEADBEEF', N'nat s3cr3t'",
        &["101010", "DEADBEEF", "s3cr3t"],
    ),
    (
        "insert into t (a, b) values ('v1 s3cr3t', 424242), ('v2 hunter2', 434343)",
        &["s3cr3t", "hunter2", "424242", "434343"],
    ),
    (
        "update t set pw = 'hunter2' where id = 987654",
        &["hunter2", "987654"],
    ),
    (r#"select '{"k": "s3cr3t"}'::jsonb"#, &["s3cr3t"]),
    (
        "select date '2024-12-31', interval '3 days s3cr3t'",
        &["2024", "s3cr3t", "days"],
    ),
    (
        "select * from t where a = 'x' and b = $1 and c = 'y s3cr3t'",
        &["s3cr3t", "'x'"],
    ),
    ("COPY t FROM '/tmp/s3cr3t.csv'", &["s3cr3t", "/tmp"]),
    ("select 'multi\nline s3cr3t'", &["s3cr3t", "multi"]),
    (
        "select 'first s3cr3t'\n'second hunter2'",
        &["s3cr3t", "hunter2"],
    ),
    (
        "DO $$ begin raise notice 's3cr3t'; end $$",
        &["s3cr3t", "notice"],
    ),
    (
        "select set_config('my.key', 's3cr3t', false)",
        &["s3cr3t", "my.key"],
    ),
    (
        "prepare p as select * from t where x = 'hunter2'",
        &["hunter2"],
    ),
    (
        "explain analyze select * from t where x = 'hunter2'",
        &["hunter2"],
    ),
    (
        "select * from t where x = 'unterminated s3cr3t",
        &["s3cr3t"],
    ),
    (
        "selec broken syntax where x = 'hunter2' and y = 424242",
        &["hunter2", "424242"],
    ),
    (
        r#"select "Weird""Col" from "T" where "Weird""Col" = 'hunter2'"#,
        &["hunter2"],
    ),
    (
        "CREATE FUNCTION f() RETURNS int AS $body$ select 424242 $body$ LANGUAGE sql",
        &["424242"],
    ),
    ("select 'dollar $1 inside s3cr3t'", &["s3cr3t", "inside"]),
    (
        "select * from t where a = 'x'; select 'hunter2'",
        &["hunter2", "'x'"],
    ),
    ("NOTIFY chan, 's3cr3t'", &["s3cr3t"]),
    ("select pg_notify('chan', 's3cr3t')", &["s3cr3t"]),
    ("CALL proc('hunter2', 424242)", &["hunter2", "424242"]),
    ("VALUES (1e10, 'hunter2')", &["hunter2", "1e10"]),
    (
        r"select x from t where y like 'abc%s3cr3t%' escape '\'",
        &["s3cr3t", "abc%"],
    ),
    ("select 424242::int, '434343'::text", &["424242", "434343"]),
    (
        "CREATE TABLE t (a int default 424242, b text default 'hunter2')",
        &["424242", "hunter2"],
    ),
    (
        "ALTER TABLE t ADD CONSTRAINT c CHECK (a > 424242)",
        &["424242"],
    ),
    ("COMMENT ON TABLE t IS 's3cr3t'", &["s3cr3t"]),
    (
        "CREATE DATABASE d WITH OWNER = bob ENCODING = 'UTF8' CONNECTION LIMIT = 424242",
        &["UTF8", "424242"],
    ),
    (
        "select * from t where x = 'ünïcode s3cr3t' and y = 'ü'",
        &["s3cr3t", "ünïcode", "'ü'"],
    ),
    ("select E'\\x41 s3cr3t'", &["s3cr3t", "x41"]),
    (
        "select * from t where d = 1 and e = 'e''q s3cr3t'",
        &["s3cr3t"],
    ),
    (
        "select * from t where token = decode('c2VjcmV0', 'base64')",
        &["c2VjcmV0", "base64"],
    ),
    ("select * from t where f = 424242.5e+3", &["424242"]),
    ("ALTER ROLE r SET search_path = 'hunter2'", &["hunter2"]),
    (
        "CREATE SERVER s FOREIGN DATA WRAPPER w OPTIONS (host 'db.internal', port '5433')",
        &["db.internal", "5433"],
    ),
    (
        "SELECT 'a' || $q$b hunter2$q$ || E'c' || 424242",
        &["hunter2", "424242"],
    ),
];

fn assert_no_secret(what: &str, sql: &str, text: &str, secrets: &[&str]) {
    for secret in secrets {
        assert!(
            !text.contains(secret),
            "{what} of {sql:?} keeps {secret:?}: {text:?}"
        );
    }
}

#[test]
fn shape_text_never_keeps_a_literal() {
    let cache = Fingerprints::new(1024);
    for (sql, secrets) in CORPUS {
        let shape = cache.shape(sql);
        assert_no_secret("shape", sql, &shape.text, secrets);
        assert!(!shape.text.is_empty(), "{sql:?}");
    }
}

#[test]
fn mask_never_keeps_a_literal() {
    for (sql, secrets) in CORPUS {
        assert_no_secret("mask", sql, &mask(sql), secrets);
    }
}

#[test]
fn mask_is_idempotent() {
    for (sql, _) in CORPUS {
        let once = mask(sql);
        assert_eq!(mask(&once), once, "{sql:?}");
    }
}

#[test]
fn mask_keeps_structure_and_identifiers() {
    assert_eq!(
        mask("SELECT *  FROM t1\n WHERE col_2 = 'x' AND y=42 -- c 'q'\n"),
        "SELECT * FROM t1 WHERE col_2 = $1 AND y=$2"
    );
    assert_eq!(mask("select x/*c*/from y"), "select x from y");
    assert_eq!(mask("  select 1  "), "select $1");
    assert_eq!(
        mask(r#"select "a""b", "T 1".c from "T 1""#),
        r#"select "a""b", "T 1".c from "T 1""#
    );
    assert_eq!(
        mask(r#"select U&"d\0061t" from t"#),
        r#"select U&"d\0061t" from t"#
    );
    assert_eq!(mask("select a$1, b$$ from t"), "select a$1, b$$ from t");
    assert_eq!(mask("select e 'x', name'y'"), "select e $1, name$2");
    assert_eq!(
        mask("select ü1 from tä where ö = 'ß'"),
        "select ü1 from tä where ö = $1"
    );
}

#[test]
fn mask_masks_every_literal_kind() {
    assert_eq!(
        mask("select 1.5e-3, .5, 0x1F, 1_000, 1e10, 7., 0b11, 0o7"),
        "select $1, $2, $3, $4, $5, $6, $7, $8"
    );
    assert_eq!(
        mask(r"select 'a''b', E'c\'d', e'\\', U&'x', B'1', X'F', N'n', b'0'"),
        "select $1, $2, $3, $4, $5, $6, $7, $8"
    );
    assert_eq!(
        mask("select $$a$$, $q$ $$ $q$, $_x1$b$_x1$"),
        "select $1, $2, $3"
    );
    assert_eq!(mask("select -1, +2.5"), "select -$1, +$2");
    assert_eq!(
        mask("select x::int[], 'a'::text"),
        "select x::int[], $1::text"
    );
}

#[test]
fn mask_numbers_literals_after_existing_parameters() {
    assert_eq!(mask("select $1, 'a', $3, 5"), "select $1, $4, $3, $5");
    assert_eq!(mask("select 'a' where x = $2"), "select $3 where x = $2");
    // A `$n` inside a literal is not a parameter.
    assert_eq!(mask("select '$9', 1"), "select $1, $2");
}

#[test]
fn mask_swallows_anything_left_open() {
    assert_eq!(mask("select 'abc"), "select $1");
    assert_eq!(mask("select E'abc\\'"), "select $1");
    assert_eq!(mask(r#"select "abc from t where p = 'x'"#), "select $1");
    assert_eq!(mask("select $$abc 'x'"), "select $1");
    assert_eq!(mask("select $t$abc $$ 'x'"), "select $1");
    assert_eq!(mask("select 1 /* abc /* 'x' */"), "select $1");
    assert_eq!(mask("select 1 -- 'x'"), "select $1");
    assert_eq!(mask("select $ 1"), "select $ $1");
    assert_eq!(mask(""), "");
    assert_eq!(mask("-- only a comment"), "");
}

#[test]
fn masked_hash_ignores_literals_spacing_and_comments() {
    let base = masked_hash("select * from t where id = 1 and s = 'a'");
    for same in [
        "select * from t where id = 2 and s = 'bbb'",
        "select *\n  from t\twhere id = 3.5 and s = E'x\\'y'",
        "select * /* c */ from t -- x\n where id = 0x10 and s = $$z$$",
        "  select * from t where id = 1 and s = 'a'  ",
    ] {
        assert_eq!(masked_hash(same), base, "{same:?}");
    }
    for different in [
        "select * from t where id = 1 or s = 'a'",
        "select * from t1 where id = 1 and s = 'a'",
        "select * from t where id = $1 and s = 'a'",
        "select * from t where id = 1 and s = \"a\"",
        "SELECT * FROM t WHERE id = 1 AND s = 'a'",
        "select * from t where id = 1 and s = 'a' and 1 = 1",
    ] {
        assert_ne!(masked_hash(different), base, "{different:?}");
    }
    assert_ne!(
        masked_hash("select * from t1"),
        masked_hash("select * from t2")
    );
    assert_ne!(
        masked_hash("select col_1 from t"),
        masked_hash("select col_2 from t")
    );
    assert_ne!(masked_hash("select a b"), masked_hash("select ab"));
}

#[test]
fn same_query_with_other_literals_shares_one_shape() {
    let cache = Fingerprints::new(64);
    let a = cache.shape("select * from t where id = 1");
    let b = cache.shape("select * from t where id = 2");
    let c = cache.shape("select  *  from t where id = 3 -- hi");
    assert!(Arc::ptr_eq(&a, &b));
    assert!(Arc::ptr_eq(&a, &c));
    assert_eq!(&*a.text, "select * from t where id = $1");
    assert_eq!(
        a.id,
        pg_query::fingerprint("select * from t where id = 1", 0, 0)
            .unwrap()
            .value
    );
    let other = cache.shape("select * from t where name = 'x'");
    assert_ne!(other.id, a.id);
    assert_eq!(cache.len(), 2);
}

#[test]
fn identifiers_with_digits_survive() {
    let cache = Fingerprints::new(64);
    let shape = cache.shape("select col_2, t1.x3 from t1 where col_2 = 42");
    assert_eq!(&*shape.text, "select col_2, t1.x3 from t1 where col_2 = $1");
}

#[test]
fn comments_are_removed_from_shape_text() {
    let cache = Fingerprints::new(64);
    let shape = cache.shape("/* app:web 'k' */ select 1 -- trailing\n");
    assert_eq!(&*shape.text, "select $1");
}

#[test]
fn a_carriage_return_ends_a_line_comment_as_in_postgres() {
    // What follows the comment is a statement, not more comment.
    assert_eq!(
        mask("select 1 -- c\rfrom t where a = 'x'"),
        "select $1 from t where a = $2"
    );
    assert_ne!(
        masked_hash("select 1 -- c\rfrom t"),
        masked_hash("select 1")
    );
}

#[test]
fn unparseable_statement_falls_back_to_mask() {
    let cache = Fingerprints::new(64);
    let sql = "selec broken where x = 'hunter2'";
    let shape = cache.shape(sql);
    assert_eq!(shape.id, masked_hash(sql));
    assert_eq!(&*shape.text, "selec broken where x = $1");
    // A NUL byte cannot reach pg_query's C API either.
    let shape = cache.shape("select 'a\0b'");
    assert_eq!(&*shape.text, "select $1");
}

#[test]
fn long_statement_skips_pg_query_and_is_truncated() {
    let cache = Fingerprints::new(64);
    let mut sql = String::from("select ");
    while sql.len() <= MAX_PG_QUERY_BYTES {
        sql.push_str("colümn_name, 'hunter2', ");
    }
    sql.push('1');
    let shape = cache.shape(&sql);
    assert_eq!(shape.id, masked_hash(&sql));
    assert!(shape.text.len() <= MAX_TEXT_BYTES, "{}", shape.text.len());
    assert!(shape.text.ends_with('…'));
    assert!(!shape.text.contains("hunter2"));
    assert!(
        shape
            .text
            .starts_with("select colümn_name, $1, colümn_name, $2")
    );
}

#[test]
fn parsed_statement_text_is_truncated_on_a_char_boundary() {
    let cache = Fingerprints::new(64);
    let columns: Vec<String> = (0..400).map(|i| format!("ä{i}")).collect();
    let sql = format!("select {} from t where x = 'hunter2'", columns.join(", "));
    assert!(sql.len() < MAX_PG_QUERY_BYTES);
    let shape = cache.shape(&sql);
    assert_eq!(shape.id, pg_query::fingerprint(&sql, 0, 0).unwrap().value);
    assert!(shape.text.len() <= MAX_TEXT_BYTES);
    assert!(shape.text.ends_with('…'));
    // A short statement is kept whole.
    let short = cache.shape("select 'ä'");
    assert_eq!(&*short.text, "select $1");
}

#[test]
fn full_shard_is_cleared_not_grown() {
    let cache = Fingerprints::new(32);
    for i in 0..1_000 {
        let shape = cache.shape(&format!("select c{i} from t where x = {i}"));
        assert!(shape.text.starts_with(&format!("select c{i} from t")));
    }
    assert!(cache.len() <= 32, "{}", cache.len());
    assert!(!cache.is_empty());
    let tiny = Fingerprints::new(0);
    tiny.shape("select 1");
    tiny.shape("select 2, 3");
    assert!(tiny.len() <= SHARDS);
}

#[test]
fn threads_agree_on_shapes() {
    let cache = Fingerprints::new(256);
    let shapes: Vec<Arc<Shape>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let cache = &cache;
                scope.spawn(move || {
                    let mut last = None;
                    for i in 0..200 {
                        last = Some(
                            cache.shape(&format!("select * from t where a = {}", t * 1000 + i)),
                        );
                    }
                    last.unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // Each thread caches its own copy (no shared lock on the hot path); all
    // agree on the shape.
    assert!(shapes.windows(2).all(|w| w[0] == w[1]));
    assert!((1..=4).contains(&cache.len()));
}

/// Deterministic pseudo-random statements from tricky pieces (no `"`, so
/// every `'` of the input starts, ends or sits inside a literal or comment).
fn random_statements(count: usize) -> Vec<String> {
    const PIECES: &[&str] = &[
        "'", "''", "$", "$$", "$a$", "$1", "\\", "-", "--", "/*", "*/", "*", "e", "E", "U&", "x",
        "B", "N", "1", "0x", ".", "5", "_", "ä", " ", "\n", "select", "t1", ";", "(", ")", "=",
    ];
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    (0..count)
        .map(|_| {
            let len = (next() % 24) as usize;
            (0..len)
                .map(|_| PIECES[(next() % PIECES.len() as u64) as usize])
                .collect()
        })
        .collect()
}

#[test]
fn random_input_never_panics_and_never_leaks_a_quote() {
    let cache = Fingerprints::new(4096);
    for sql in random_statements(3_000) {
        let masked = mask(&sql);
        assert!(!masked.contains('\''), "{sql:?} -> {masked:?}");
        let _ = masked_hash(&sql);
        let shape = cache.shape(&sql);
        assert!(!shape.text.contains('\''), "{sql:?} -> {:?}", shape.text);
    }
}

/// Where the lexer finds literals.
#[derive(Default)]
struct Spans(Vec<(lexer::Literal, usize, usize)>);

impl lexer::Sink for Spans {
    fn text(&mut self, _token: &str) {}
    fn literal(&mut self, kind: lexer::Literal, start: usize, end: usize) {
        self.0.push((kind, start, end));
    }
    fn param(&mut self, _token: &str, _n: u64) {}
    fn space(&mut self) {}
}

/// `sql` with other literals: digits and letters inside each literal
/// changed, everything else kept.
pub(super) fn other_literals(sql: &str) -> String {
    let mut spans = Spans::default();
    lex(sql, &mut spans);
    let mut out = sql.as_bytes().to_vec();
    for (kind, start, end) in spans.0 {
        let skip = match kind {
            lexer::Literal::Number => 0,
            lexer::Literal::Plain => 1,
            lexer::Literal::Escaped | lexer::Literal::Prefixed => 2,
            lexer::Literal::Unicode => 3,
            lexer::Literal::Other => continue,
        };
        for b in out.iter_mut().take(end).skip(start + skip) {
            *b = match *b {
                b'0'..=b'8' => *b + 1,
                b'9' => b'0',
                b'a'..=b'y' if kind != lexer::Literal::Number => *b + 1,
                other => other,
            };
        }
    }
    String::from_utf8(out).expect("only ASCII bytes changed")
}

#[test]
fn a_template_matches_the_same_statement_with_other_literals() {
    let cases = [
        "SELECT abalance FROM pgbench_accounts WHERE aid = 12345;",
        "select * from t where a = 'x' and b in (1, 2.5, .5, 1e3) and c = E'\\'q' and d = B'101'",
        "update t set v = U&'d\\0061t' where id = 0x1F -- comment 42\n",
        "insert into t1 values ($1, 'it''s', 7)",
    ];
    for sql in cases {
        let (key, template) = hash_and_template(sql);
        let template = template.expect("templated");
        assert_eq!(key, masked_hash(sql));
        assert!(template.matches(sql.as_bytes()), "{sql}");
        for other in [
            other_literals(sql),
            sql.replace("12345", "7"),
            sql.replace("'x'", "'a much longer string'"),
        ] {
            assert!(template.matches(other.as_bytes()), "{sql} vs {other}");
            assert_eq!(masked_hash(&other), key, "{other}");
        }
        // Not the same statement: other identifiers, spacing or keywords.
        for other in [
            sql.replace("FROM", "from"),
            sql.replacen(' ', "  ", 1),
            format!("{sql} "),
            sql.replace("t ", "u "),
        ] {
            if other != sql {
                assert!(!template.matches(other.as_bytes()), "{sql} vs {other}");
            }
        }
    }
    // A number where the template had a string is another statement.
    let (_, t) = hash_and_template("select 'a'");
    assert!(!t.expect("templated").matches(b"select 1"));
}

#[test]
fn dollar_quotes_and_long_statements_have_no_template() {
    assert!(hash_and_template("select $$x$$").1.is_none());
    assert!(hash_and_template("select $a$ x $a$").1.is_none());
    let long = format!("select {}", "1, ".repeat(1000));
    assert!(hash_and_template(&long).1.is_none());
    // Parameters are text, not literals.
    assert!(hash_and_template("select $1").1.is_some());
}

#[test]
fn a_template_matches_only_statements_with_its_masked_text() {
    // The invariant, over tricky random input: whatever a template
    // matches masks to the same text (so it has the same shape).
    let statements = random_statements(3_000);
    let templates: Vec<_> = statements
        .iter()
        .filter_map(|s| hash_and_template(s).1.map(|t| (s, t)))
        .collect();
    assert!(
        templates.len() > 1_000,
        "most random statements are templated"
    );
    let mut matched = 0;
    for (i, (sql, template)) in templates.iter().enumerate() {
        let candidates = [
            other_literals(sql),
            statements[(i * 7 + 1) % statements.len()].clone(),
            statements[(i * 13 + 5) % statements.len()].clone(),
        ];
        for other in candidates {
            if template.matches(other.as_bytes()) {
                matched += 1;
                assert_eq!(mask(&other), mask(sql), "{sql:?} vs {other:?}");
                assert_eq!(
                    masked_hash(&other),
                    masked_hash(sql),
                    "{sql:?} vs {other:?}"
                );
            }
        }
    }
    assert!(matched > 1_000, "the literal variants match ({matched})");
}
