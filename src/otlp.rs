//! OpenTelemetry export: the task that takes transaction spans off the
//! queue ([`Spans`]), batches them and posts them to an OTLP/HTTP(S) collector
//! with the `opentelemetry-otlp` exporter.
//!
//! Invariants: this task is the queue's only reader and the data path never
//! waits for it: while an export is in flight (or retried), spans wait in
//! the bounded queue and what does not fit is dropped there and counted. At
//! shutdown an export in flight is given up and what is queued gets one
//! last export, bounded by `otlp_timeout` (5 s at most).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkError;
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter as _, SpanLinks};
use tokio::sync::watch;

use crate::config::otlp::{OtlpProtocol, Tracing};
use crate::stats::spans::{Spans, TxSpan};

/// Failed exports are logged at most this often.
const LOG_EVERY: Duration = Duration::from_secs(60);
/// The export at shutdown takes at most this long (or `otlp_timeout`).
pub const LAST_EXPORT: Duration = Duration::from_secs(5);
/// Statement text on a span is cut to this many bytes.
const STATEMENT_TEXT: usize = 2048;

/// Builds the exporter `cfg` describes (inside the runtime: its HTTP client
/// runs there).
pub fn exporter(cfg: &Tracing) -> Result<opentelemetry_otlp::SpanExporter, String> {
    let url = cfg.traces_url().ok_or("no otlp_endpoint")?;
    let protocol = match cfg.otlp_protocol {
        OtlpProtocol::HttpProtobuf => Protocol::HttpBinary,
        OtlpProtocol::HttpJson => Protocol::HttpJson,
    };
    let headers: HashMap<String, String> = cfg
        .otlp_headers
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    // hyper with rustls (ring): http and https endpoints alike.
    // Roots are read only for https; plain http needs none.
    let tls = if url.starts_with("https://") {
        crate::tls::https_client_config(cfg.otlp_ca_file.as_deref())?
    } else {
        crate::tls::https_client_config_without_roots()?
    };
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    let client = opentelemetry_http::hyper::HyperClient::new(connector, cfg.otlp_timeout, None);
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(client)
        .with_endpoint(url)
        .with_protocol(protocol)
        .with_timeout(cfg.otlp_timeout)
        .with_headers(headers)
        .build()
        .map_err(|e| e.to_string())?;
    exporter.set_resource(
        &Resource::builder_empty()
            .with_service_name(cfg.service_name.clone())
            .with_attributes([KeyValue::new("service.version", env!("CARGO_PKG_VERSION"))])
            .build(),
    );
    Ok(exporter)
}

/// Exports what `spans` queues until `stop` turns true, then what is left.
pub async fn run(spans: Arc<Spans>, cfg: Tracing, mut stop: watch::Receiver<bool>) {
    let Some(mut rx) = spans.take_receiver() else {
        return;
    };
    let exporter = match exporter(&cfg) {
        Ok(e) => e,
        Err(error) => {
            tracing::error!(%error, "cannot export spans: [tracing] otlp_endpoint is ignored");
            return;
        }
    };
    tracing::info!(
        endpoint = cfg.traces_url().unwrap_or_default(),
        protocol = cfg.otlp_protocol.as_str(),
        "exporting transaction spans over OTLP"
    );
    let scope = InstrumentationScope::builder("tidepool")
        .with_version(env!("CARGO_PKG_VERSION"))
        .build();
    let batch_size = cfg.otlp_batch_size.max(1);
    let mut batch: Vec<TxSpan> = Vec::with_capacity(batch_size.min(1024));
    let mut last_logged: Option<std::time::Instant> = None;
    loop {
        let stopping = tokio::select! {
            n = rx.recv_many(&mut batch, batch_size) => n == 0,
            _ = stop.wait_for(|s| *s) => true,
        };
        if !stopping && batch.len() < batch_size {
            // The first span waits a little for company.
            let deadline = tokio::time::sleep(cfg.otlp_flush_interval);
            tokio::pin!(deadline);
            while batch.len() < batch_size {
                let room = batch_size - batch.len();
                tokio::select! {
                    n = rx.recv_many(&mut batch, room) => if n == 0 { break },
                    _ = &mut deadline => break,
                    _ = stop.wait_for(|s| *s) => break,
                }
            }
        }
        if stopping {
            rx.close();
            while batch.len() < batch_size {
                match rx.try_recv() {
                    Ok(s) => batch.push(s),
                    Err(_) => break,
                }
            }
        }
        if !batch.is_empty() {
            let n = batch.len();
            let data = batch.drain(..).map(|s| span_data(s, &scope)).collect();
            let last_call = cfg.otlp_timeout.min(LAST_EXPORT);
            let result = if stopping {
                tokio::time::timeout(last_call, exporter.export(data))
                    .await
                    .unwrap_or(Err(OTelSdkError::Timeout(last_call)))
            } else {
                // A shutdown does not wait for an export in flight: it is
                // given up, and what is queued gets the last call.
                tokio::select! {
                    r = exporter.export(data) => r,
                    _ = stop.wait_for(|s| *s) => Err(OTelSdkError::Timeout(Duration::ZERO)),
                }
            };
            spans.exported(n, result.is_ok());
            if let Err(error) = result
                && last_logged.is_none_or(|t| t.elapsed() >= LOG_EVERY)
            {
                last_logged = Some(std::time::Instant::now());
                tracing::warn!(%error, spans = n, "span export failed (counted in tidepool_otlp_spans_total; logged once a minute)");
            }
        }
        if stopping {
            return;
        }
    }
}

/// `s` as OpenTelemetry span data, with the database semantic conventions
/// where one fits and `tidepool.*` attributes for the rest.
pub fn span_data(s: TxSpan, scope: &InstrumentationScope) -> SpanData {
    let backend = match s.backend {
        0 => "primary".to_owned(),
        n => format!("replica {n}"),
    };
    let (host, port) = s
        .server_addr
        .rsplit_once(':')
        .map_or((&*s.server_addr, 0), |(h, p)| (h, p.parse().unwrap_or(0)));
    let mut attributes = vec![
        KeyValue::new("db.system.name", "postgresql"),
        KeyValue::new("db.namespace", s.database.to_string()),
        KeyValue::new("db.user", s.user),
        KeyValue::new("server.address", host.to_owned()),
        KeyValue::new("server.port", i64::from(port)),
        KeyValue::new("tidepool.backend", backend),
        KeyValue::new("tidepool.pool_wait_us", s.pool_wait_us as i64),
        KeyValue::new("tidepool.server_us", s.server_us as i64),
        KeyValue::new("tidepool.statements", i64::from(s.statements)),
        KeyValue::new("db.response.returned_rows", s.rows as i64),
    ];
    if let Some(shape) = &s.statement {
        attributes.push(KeyValue::new(
            "tidepool.fingerprint",
            format!("{:016x}", shape.id),
        ));
        attributes.push(KeyValue::new(
            "db.query.text",
            crate::stats::cut_text(&shape.text, STATEMENT_TEXT),
        ));
    }
    if !s.application_name.is_empty() {
        attributes.push(KeyValue::new(
            "tidepool.application_name",
            s.application_name,
        ));
    }
    if let Some(a) = s.client_addr {
        attributes.push(KeyValue::new("client.address", a.ip().to_string()));
        attributes.push(KeyValue::new("client.port", i64::from(a.port())));
    }
    SpanData {
        span_context: SpanContext::new(
            TraceId::from(s.trace_id),
            SpanId::from(s.span_id),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        ),
        parent_span_id: SpanId::from(s.parent_span_id),
        parent_span_is_remote: s.parent_span_id != 0,
        span_kind: SpanKind::Server,
        name: "transaction".into(),
        start_time: s.start,
        end_time: s.end,
        attributes,
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status: if s.error {
            Status::error("a statement failed")
        } else {
            Status::Unset
        },
        instrumentation_scope: scope.clone(),
    }
}
