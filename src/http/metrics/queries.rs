//! Metric families of the per-query statistics: the top normalized
//! queries by total time (calls, errors, rows, time, latency percentiles),
//! labelled with their database, fingerprint and masked text.

use prometheus_client::encoding::DescriptorEncoder;

use super::{counter, cut, gauge, labels, secs};
use crate::client::Shared;

/// Per-query series exported (the top N by total time).
const TOP_QUERIES: usize = 20;

pub(super) fn encode(enc: &mut DescriptorEncoder, shared: &Shared) -> std::fmt::Result {
    let top: Vec<_> = shared
        .stats
        .queries
        .snapshot()
        .into_iter()
        .take(TOP_QUERIES)
        .collect();
    let mut calls = Vec::new();
    let mut errors = Vec::new();
    let mut qrows = Vec::new();
    let mut qtime = Vec::new();
    let mut quantiles = Vec::new();
    for q in &top {
        let fp = format!("{:016x}", q.fingerprint);
        let text = cut(&q.query);
        let l = labels(&[
            ("database", &q.database),
            ("fingerprint", &fp),
            ("query", &text),
        ]);
        calls.push((l.clone(), q.calls));
        errors.push((l.clone(), q.errors));
        qrows.push((l.clone(), q.rows));
        qtime.push((l.clone(), secs(q.total_us)));
        for (pct, v) in [
            ("50", q.p50_us),
            ("90", q.p90_us),
            ("95", q.p95_us),
            ("99", q.p99_us),
        ] {
            let mut lq = l.clone();
            lq.push(("percentile".into(), pct.into()));
            quantiles.push((lq, secs(v)));
        }
    }
    counter(
        enc,
        "tidepool_query_calls",
        "Calls of a normalized query (top by total time)",
        &calls,
    )?;
    counter(
        enc,
        "tidepool_query_errors",
        "Failed calls of a normalized query",
        &errors,
    )?;
    counter(
        enc,
        "tidepool_query_rows",
        "Rows returned or affected by a normalized query",
        &qrows,
    )?;
    counter(
        enc,
        "tidepool_query_time_seconds",
        "Total time of a normalized query",
        &qtime,
    )?;
    gauge(
        enc,
        "tidepool_query_latency_seconds",
        "Latency percentiles of a normalized query",
        &quantiles,
    )?;
    Ok(())
}
