//! Metric families of the OpenTelemetry export (`[tracing]`): spans
//! exported, dropped at the full queue, or lost to failed exports, and the
//! queue's length. Present only while export is on.

use prometheus_client::encoding::DescriptorEncoder;

use super::{Labels, counter, gauge, labels};
use crate::client::Shared;

pub(super) fn encode(enc: &mut DescriptorEncoder, shared: &Shared) -> std::fmt::Result {
    let spans = &shared.spans;
    if !spans.enabled() {
        return Ok(());
    }
    let (exported, dropped, failed) = spans.counts();
    let samples: Vec<(Labels, u64)> = [
        ("exported", exported),
        ("dropped", dropped),
        ("failed", failed),
    ]
    .iter()
    .map(|(result, n)| (labels(&[("result", result)]), *n))
    .collect();
    counter(
        enc,
        "tidepool_otlp_spans",
        "Transaction spans by result: exported, dropped (the export queue was full) or failed (the collector did not take them)",
        &samples,
    )?;
    gauge(
        enc,
        "tidepool_otlp_queue_spans",
        "Transaction spans waiting for export (at most otlp_queue_size)",
        &[(Labels::new(), spans.queued() as i64)],
    )
}
