//! Who ran which statements where: per-query statistics and the slow log,
//! recorded as a transaction's statements end.

use super::*;

/// Who ran statements where, for per-query statistics and the slow log.
pub(super) struct StatementCtx<'a> {
    pub(super) database: &'a Arc<str>,
    pub(super) user: &'a str,
    pub(super) backend: &'a Arc<str>,
    pub(super) role: Role,
    pub(super) client: Option<std::net::SocketAddr>,
    pub(super) slow_us: u64,
    /// 0: the primary; n: replica n.
    pub(super) backend_index: usize,
    /// Transactions sampled for OpenTelemetry go here.
    pub(super) spans: &'a crate::stats::spans::Spans,
    /// The checkout's wait for a server, until the first transaction's
    /// span takes it.
    pub(super) pool_wait_us: std::cell::Cell<u64>,
}

impl StatementCtx<'_> {
    /// Records finished statements and transactions: latency histograms,
    /// per-query statistics, and slow statements (listed and logged with
    /// their normalized text only).
    pub(super) fn record(
        &self,
        stats: &crate::stats::Stats,
        traffic: &crate::stats::Traffic,
        params: &BTreeMap<String, String>,
        timing: &mut crate::client::timing::Timing,
    ) {
        for x in timing.xacts_done.drain(..) {
            traffic.transaction_latency(x.us());
            if let Some(ids) = self.spans.sample(x.trace) {
                self.span(ids, x, params);
            }
        }
        for f in timing.done.drain(..) {
            traffic.statement_latency(f.us);
            let Some(shape) = f.shape else { continue };
            if stats.per_query {
                stats
                    .queries
                    .record(self.database, &shape, self.role, f.us, f.rows, f.error);
            }
            if f.us <= self.slow_us && self.slow_us > 0 {
                continue;
            }
            timing.delta.slow += 1;
            let app = params.get("application_name").map_or("", |s| s.as_str());
            let client = self.client.map(|a| a.to_string()).unwrap_or_default();
            let (trace_id, span_id) = f
                .trace
                .map(|t| (t.trace_hex(), t.span_hex()))
                .unwrap_or_default();
            tracing::warn!(
                target: "tidepool::slow_query",
                database = &**self.database,
                user = self.user,
                backend = &**self.backend,
                role = self.role.as_str(),
                application_name = app,
                client_addr = %client,
                duration_ms = f.us as f64 / 1000.0,
                rows = f.rows,
                error = f.error,
                fingerprint = %format_args!("{:016x}", shape.id),
                query = &*shape.text,
                trace_id = trace_id.as_str(),
                span_id = span_id.as_str(),
                "slow query"
            );
            stats.slow.push(SlowQuery {
                at: std::time::SystemTime::now(),
                database: self.database.clone(),
                user: self.user.into(),
                backend: self.backend.clone(),
                role: self.role,
                application_name: app.to_owned(),
                client_addr: client,
                duration_us: f.us,
                rows: f.rows,
                error: f.error,
                fingerprint: shape.id,
                query: shape.text.clone(),
                trace: f.trace,
            });
        }
    }

    /// Queues the span of transaction `x` for export.
    fn span(
        &self,
        (trace_id, span_id): (u128, u64),
        x: crate::client::timing::XactDone,
        params: &BTreeMap<String, String>,
    ) {
        // Monotonic instants as wall-clock times, through one reading of both.
        let (now_wall, now_mono) = (std::time::SystemTime::now(), crate::clock::mono_ns());
        let wall = |mono: u64| {
            now_wall
                .checked_sub(std::time::Duration::from_nanos(
                    now_mono.saturating_sub(mono),
                ))
                .unwrap_or(now_wall)
        };
        let pool_wait_us = self.pool_wait_us.take();
        let start = wall(x.start)
            .checked_sub(std::time::Duration::from_micros(pool_wait_us))
            .unwrap_or(now_wall);
        self.spans.offer(crate::stats::spans::TxSpan {
            trace_id,
            span_id,
            parent_span_id: x.trace.map_or(0, |t| t.span_id),
            start,
            end: wall(x.end),
            pool_wait_us,
            server_us: x.us(),
            database: self.database.clone(),
            user: self.user.to_owned(),
            application_name: params.get("application_name").cloned().unwrap_or_default(),
            backend: self.backend_index,
            server_addr: self.backend.clone(),
            client_addr: self.client,
            statements: x.statements,
            rows: x.rows,
            error: x.error,
            statement: x.first,
        });
    }
}
