//! Transaction spans for OpenTelemetry: which transactions are sampled, and
//! the bounded queue that hands their spans to the exporter (`crate::otlp`).
//!
//! Invariants: offering a span never waits; a full queue drops the span and
//! counts it. With export off (no `otlp_endpoint`) nothing is sampled and no
//! span is built. A client's `traceparent` decides by its sampled flag; a
//! transaction without one is sampled at `sample_ratio`, by its new trace id.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use tokio::sync::mpsc;

use super::Shape;
use super::trace::Trace;
use crate::config::otlp::Tracing;

/// One transaction, as exported.
#[derive(Debug, Clone)]
pub struct TxSpan {
    pub trace_id: u128,
    pub span_id: u64,
    /// The client's span (its `traceparent`), 0 for a root span.
    pub parent_span_id: u64,
    /// From when the client's request waited for a server to its
    /// ReadyForQuery.
    pub start: SystemTime,
    pub end: SystemTime,
    /// Waiting for a server from the pool.
    pub pool_wait_us: u64,
    /// From the first request forwarded to the server to its answer's end.
    pub server_us: u64,
    pub database: Arc<str>,
    pub user: String,
    pub application_name: String,
    /// 0: the primary; n: replica n.
    pub backend: usize,
    /// The server, as `host:port`.
    pub server_addr: Arc<str>,
    pub client_addr: Option<SocketAddr>,
    pub statements: u32,
    pub rows: u64,
    pub error: bool,
    /// The statement that names the transaction (literals masked).
    pub statement: Option<Arc<Shape>>,
}

/// Sampling, the queue to the exporter and its counts.
pub struct Spans {
    sender: Option<mpsc::Sender<TxSpan>>,
    receiver: Mutex<Option<mpsc::Receiver<TxSpan>>>,
    /// `sample_ratio` over 2^64, compared with a new trace id's low bits;
    /// `u64::MAX`: every transaction.
    threshold: AtomicU64,
    dropped: AtomicU64,
    exported: AtomicU64,
    failed: AtomicU64,
}

fn threshold(ratio: f64) -> u64 {
    if ratio >= 1.0 {
        u64::MAX
    } else if ratio > 0.0 {
        // 2^64 · ratio, below u64::MAX for any ratio under 1.
        (ratio * 18_446_744_073_709_551_616.0) as u64
    } else {
        0
    }
}

impl Spans {
    /// Export on when `cfg` names an endpoint.
    pub fn new(cfg: &Tracing) -> Self {
        let (sender, receiver) = match cfg.otlp_endpoint {
            Some(_) => {
                let (tx, rx) = mpsc::channel(cfg.otlp_queue_size.max(1));
                (Some(tx), Some(rx))
            }
            None => (None, None),
        };
        Self {
            sender,
            receiver: Mutex::new(receiver),
            threshold: AtomicU64::new(threshold(cfg.sample_ratio)),
            dropped: AtomicU64::new(0),
            exported: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        }
    }

    pub fn enabled(&self) -> bool {
        self.sender.is_some()
    }

    /// A reload's `sample_ratio`.
    pub fn set_ratio(&self, ratio: f64) {
        self.threshold.store(threshold(ratio), Relaxed);
    }

    /// The trace and span ids of a new span for a transaction whose client
    /// sent `parent`, when that transaction is to be exported.
    pub fn sample(&self, parent: Option<Trace>) -> Option<(u128, u64)> {
        self.sender.as_ref()?;
        let span_id = loop {
            let id: u64 = rand::random();
            if id != 0 {
                break id;
            }
        };
        if let Some(p) = parent {
            return p.sampled().then_some((p.trace_id, span_id));
        }
        let limit = self.threshold.load(Relaxed);
        if limit == 0 {
            return None;
        }
        let trace_id: u128 = rand::random::<u128>() | 1;
        (limit == u64::MAX || (trace_id as u64) < limit).then_some((trace_id, span_id))
    }

    /// Queues `span` for export, or drops and counts it when the queue is
    /// full (or export is off).
    pub fn offer(&self, span: TxSpan) {
        let sent = self
            .sender
            .as_ref()
            .is_some_and(|tx| tx.try_send(span).is_ok());
        if !sent {
            self.dropped.fetch_add(1, Relaxed);
        }
    }

    /// The exporter's end of the queue (once).
    pub fn take_receiver(&self) -> Option<mpsc::Receiver<TxSpan>> {
        self.receiver
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// Spans waiting for export now.
    pub fn queued(&self) -> usize {
        self.sender
            .as_ref()
            .map_or(0, |tx| tx.max_capacity() - tx.capacity())
    }

    /// The exporter's outcome for `n` spans.
    pub fn exported(&self, n: usize, ok: bool) {
        let c = if ok { &self.exported } else { &self.failed };
        c.fetch_add(n as u64, Relaxed);
    }

    /// (exported, dropped because the queue was full, failed to export).
    pub fn counts(&self) -> (u64, u64, u64) {
        (
            self.exported.load(Relaxed),
            self.dropped.load(Relaxed),
            self.failed.load(Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on(ratio: f64, queue: usize) -> Spans {
        Spans::new(&Tracing {
            otlp_endpoint: Some("http://127.0.0.1:4318".into()),
            sample_ratio: ratio,
            otlp_queue_size: queue,
            ..Tracing::default()
        })
    }

    fn span() -> TxSpan {
        TxSpan {
            trace_id: 1,
            span_id: 2,
            parent_span_id: 0,
            start: SystemTime::UNIX_EPOCH,
            end: SystemTime::UNIX_EPOCH,
            pool_wait_us: 0,
            server_us: 0,
            database: "db".into(),
            user: "u".into(),
            application_name: String::new(),
            backend: 0,
            server_addr: "h:1".into(),
            client_addr: None,
            statements: 1,
            rows: 0,
            error: false,
            statement: None,
        }
    }

    #[test]
    fn off_samples_nothing() {
        let s = Spans::new(&Tracing::default());
        let parent = Trace {
            trace_id: 5,
            span_id: 6,
            flags: 1,
        };
        assert!(!s.enabled());
        assert_eq!(s.sample(Some(parent)), None);
        assert_eq!(s.sample(None), None);
        assert!(s.take_receiver().is_none());
    }

    #[test]
    fn a_client_trace_decides_by_its_flag() {
        let s = on(0.0, 8);
        let sampled = Trace {
            trace_id: 5,
            span_id: 6,
            flags: 1,
        };
        let (trace, span) = s.sample(Some(sampled)).unwrap();
        assert_eq!(trace, 5);
        assert_ne!(span, 0);
        assert_ne!(span, 6);
        let unsampled = Trace {
            flags: 0,
            ..sampled
        };
        assert_eq!(on(1.0, 8).sample(Some(unsampled)), None);
        // Without one: the ratio.
        assert_eq!(s.sample(None), None);
        assert!(on(1.0, 8).sample(None).is_some());
        let half = on(0.5, 8);
        let n = (0..4000).filter(|_| half.sample(None).is_some()).count();
        assert!((1600..2400).contains(&n), "{n} of 4000 sampled at 0.5");
        half.set_ratio(0.0);
        assert_eq!(half.sample(None), None);
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let s = on(1.0, 2);
        let mut rx = s.take_receiver().unwrap();
        assert!(s.take_receiver().is_none());
        for _ in 0..5 {
            s.offer(span());
        }
        assert_eq!(s.queued(), 2);
        assert_eq!(s.counts(), (0, 3, 0));
        assert!(rx.try_recv().is_ok());
        assert_eq!(s.queued(), 1);
        s.exported(1, true);
        s.exported(4, false);
        assert_eq!(s.counts(), (1, 3, 4));
    }
}
