//! What classifying one statement costs, measured in this process: the
//! micro-benchmark behind `tidepool classify --bench` (benchmark scenario 7).
//!
//! Three paths, as a client meets them:
//! - **parsed**: no cache knows the text; PostgreSQL's grammar (`pg_query`)
//!   parses it and the tree is walked ([`super::classify::classify`]);
//! - **text cache**: the shared cache holds this exact text
//!   ([`super::Classifier::classify`]: a hash, a shard lock, a lookup);
//! - **template memo**: the client sent this statement lately, perhaps
//!   with other literals (`crate::client::memo`: a byte comparison of the
//!   statement's template). Its cost does not depend on the literals'
//!   values, only on the text's length, so the same text is reused.
//!
//! Each figure is the median of several batches, each long enough for the
//! clock's resolution not to matter. Nothing here runs in the proxy.

use std::hint::black_box;
use std::time::{Duration, Instant};

use super::classify::{Class, Classifier, Rules, classify};
use crate::client::memo::Memo;

/// Statements measured when none are given: what `pgbench` sends, and a
/// few shapes applications send.
pub const DEFAULT_STATEMENTS: &[&str] = &[
    "SELECT abalance FROM pgbench_accounts WHERE aid = 48213;",
    "UPDATE pgbench_accounts SET abalance = abalance + -4211 WHERE aid = 48213;",
    "select o.id, o.total, c.name from orders o join customers c on c.id = o.customer_id \
     where o.created_at > '2026-11-01' and c.region = 'eu' order by o.total desc limit 20",
    "BEGIN",
];

/// One statement's class and costs, in nanoseconds per classification.
#[derive(Debug, Clone)]
pub struct Costs {
    pub statement: String,
    pub class: Class,
    pub parsed_ns: f64,
    pub text_cache_ns: f64,
    pub template_memo_ns: f64,
}

/// Batches per figure (the median is reported).
const BATCHES: usize = 7;

/// Measures `sql` on each path, each batch for about `batch`.
pub fn measure(sql: &str, rules: &Rules, batch: Duration) -> Costs {
    let classifier = Classifier::new(rules.clone());
    let mut memo = Memo::default();
    let class = classify(sql, rules);
    // Fills the text cache and the memo, so that the loops below only hit.
    classifier.classify(sql);
    memo.class(sql, &classifier, None);
    Costs {
        statement: sql.to_owned(),
        class: class.class,
        parsed_ns: per_call(batch, || classify(black_box(sql), rules).class),
        text_cache_ns: per_call(batch, || classifier.classify(black_box(sql)).class),
        template_memo_ns: per_call(batch, || memo.class(black_box(sql), &classifier, None)),
    }
}

/// Median nanoseconds per call of `f` over [`BATCHES`] batches of about
/// `batch` each (the first call sizes the batches).
fn per_call(batch: Duration, mut f: impl FnMut() -> Class) -> f64 {
    let started = Instant::now();
    black_box(f());
    let once = started.elapsed().max(Duration::from_nanos(20));
    let calls = (batch.as_nanos() / once.as_nanos()).clamp(1, 50_000_000) as u64;
    let mut samples: Vec<f64> = (0..BATCHES)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..calls {
                black_box(f());
            }
            t.elapsed().as_nanos() as f64 / calls as f64
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[BATCHES / 2]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_every_path_and_the_class() {
        let c = measure(
            DEFAULT_STATEMENTS[0],
            &Rules::default(),
            Duration::from_millis(2),
        );
        assert_eq!(c.class, Class::Read);
        assert!(c.parsed_ns > 0.0 && c.text_cache_ns > 0.0 && c.template_memo_ns > 0.0);
        let w = measure(
            DEFAULT_STATEMENTS[1],
            &Rules::default(),
            Duration::from_millis(2),
        );
        assert_eq!(w.class, Class::Write);
    }
}
