//! Measures the statement classifier's cost per statement, uncached (a
//! fresh parse with PostgreSQL's grammar) and cached (a hash lookup).
//!
//! `cargo run --release --example classifier_cost`

use std::hint::black_box;
use std::time::Instant;

use tidepool::router::Classifier;
use tidepool::router::classify::{Rules, classify};

fn main() {
    let statements: Vec<String> = (0..2000)
        .map(|i| match i % 4 {
            0 => format!("SELECT abalance FROM pgbench_accounts WHERE aid = {i}"),
            1 => format!("UPDATE pgbench_accounts SET abalance = abalance + {i} WHERE aid = 7"),
            2 => format!(
                "with x as (select * from orders o join customers c on c.id = o.customer_id where o.id > {i}) select count(*) from x"
            ),
            _ => format!("select * from t where a = {i} for update"),
        })
        .collect();
    let rules = Rules::default();
    let start = Instant::now();
    for s in &statements {
        black_box(classify(s, &rules));
    }
    let uncached = start.elapsed() / statements.len() as u32;

    let cl = Classifier::new(Rules::default());
    for s in &statements {
        cl.classify(s);
    }
    let rounds = 200;
    let start = Instant::now();
    for _ in 0..rounds {
        for s in &statements {
            black_box(cl.classify(s));
        }
    }
    let cached = start.elapsed() / (statements.len() * rounds) as u32;
    println!("classifier: uncached {uncached:?} per statement, cached {cached:?} per statement");
}
