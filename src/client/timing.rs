//! Statement and transaction timing for one client, fed by both scanners.
//!
//! Each statement the server runs for the client — a simple-protocol Query,
//! or an extended-protocol Execute — is queued when it is forwarded and
//! finished by its answer (CommandComplete, EmptyQueryResponse,
//! PortalSuspended, ErrorResponse, or for a Query its ReadyForQuery).
//! Answers arrive in order, so the queue's head is always the statement
//! being answered. A ReadyForQuery also ends a "query" in PgBouncer's sense,
//! and with status `I` a transaction.
//!
//! Invariant: only messages the client sent and the server answers are
//! queued; what tidepool sends or answers itself never is. No raw query text
//! is kept: statements carry their [`Shape`] (literals masked).

use std::collections::VecDeque;
use std::sync::Arc;

use crate::protocol::TxStatus;
use crate::stats::trace::Trace;
use crate::stats::{Delta, Shape};

/// A statement the server answered.
#[derive(Debug)]
pub struct Finished {
    pub shape: Option<Arc<Shape>>,
    /// The caller's trace context, from a sqlcommenter comment.
    pub trace: Option<Trace>,
    pub us: u64,
    pub rows: u64,
    pub error: bool,
}

/// A transaction the server finished (ReadyForQuery `I`).
#[derive(Debug)]
pub struct XactDone {
    /// When its first request was forwarded, and when it ended (monotonic
    /// ns).
    pub start: u64,
    pub end: u64,
    pub statements: u32,
    pub rows: u64,
    pub error: bool,
    /// Its first statement other than transaction control (BEGIN,
    /// COMMIT, SAVEPOINT, ...), or its first statement when all are.
    pub first: Option<Arc<Shape>>,
    /// The first trace context its statements carried.
    pub trace: Option<Trace>,
}

impl XactDone {
    pub fn us(&self) -> u64 {
        self.end.saturating_sub(self.start) / 1000
    }
}

/// What the transaction under way has done so far.
#[derive(Debug, Default)]
struct XactSoFar {
    statements: u32,
    rows: u64,
    error: bool,
    first: Option<Arc<Shape>>,
    trace: Option<Trace>,
}

/// A transaction-control statement (by its first word): a transaction is
/// named by what it does, not by its BEGIN.
fn is_control(text: &str) -> bool {
    let word = text
        .trim_start()
        .split(|c: char| !c.is_ascii_alphabetic())
        .next()
        .unwrap_or_default();
    [
        "begin",
        "start",
        "commit",
        "end",
        "rollback",
        "abort",
        "savepoint",
        "release",
    ]
    .iter()
    .any(|w| word.eq_ignore_ascii_case(w))
}

#[derive(Debug)]
enum Pending {
    Statement {
        shape: Option<Arc<Shape>>,
        trace: Option<Trace>,
        start: u64,
        rows: u64,
        error: bool,
        /// A simple-protocol Query: it ends at its ReadyForQuery.
        simple: bool,
    },
    /// A Sync or FunctionCall: its ReadyForQuery ends a query.
    Ready { start: u64 },
}

#[derive(Debug, Default)]
pub struct Timing {
    queue: VecDeque<Pending>,
    /// Shape of the unnamed prepared statement.
    unnamed: Option<Arc<Shape>>,
    /// Shape of the unnamed portal, bound in this batch.
    unnamed_portal: Option<Arc<Shape>>,
    /// Trace context of the unnamed statement, and of the unnamed portal.
    unnamed_trace: Option<Trace>,
    portal_trace: Option<Trace>,
    /// Named portals bound (few).
    portals: Vec<(String, Option<Arc<Shape>>)>,
    xact_start: Option<u64>,
    /// Start of the query (in PgBouncer's sense) being answered.
    query_start: Option<u64>,
    /// Statements finished since the session last looked.
    pub done: Vec<Finished>,
    /// Transactions finished since the session last looked.
    pub xacts_done: Vec<XactDone>,
    xact: XactSoFar,
    /// Whether transactions keep their statement count, rows, name and
    /// trace (for spans); off, only their times are kept.
    pub detail: bool,
    /// Totals to add to the pool's traffic counters.
    pub delta: Delta,
}

/// The row count at the end of a CommandComplete tag ("SELECT 5", "INSERT 0 5").
pub fn tag_rows(tag: &[u8]) -> u64 {
    let tag = tag.strip_suffix(b"\0").unwrap_or(tag);
    let last = tag.rsplit(|&b| b == b' ').next().unwrap_or_default();
    if last.is_empty() || last.len() == tag.len() {
        return 0;
    }
    // Digits only, as `u64`'s parse reads them (no sign from a server);
    // anything else, or an overflow, counts no rows.
    let mut n: u64 = 0;
    for &c in last {
        if !c.is_ascii_digit() {
            return 0;
        }
        match n
            .checked_mul(10)
            .and_then(|n| n.checked_add(u64::from(c - b'0')))
        {
            Some(v) => n = v,
            None => return 0,
        }
    }
    n
}

impl Timing {
    /// Empty again, keeping the allocations for the next transaction.
    pub fn clear(&mut self) {
        self.queue.clear();
        self.unnamed = None;
        self.unnamed_portal = None;
        self.unnamed_trace = None;
        self.portal_trace = None;
        self.portals.clear();
        self.xact_start = None;
        self.query_start = None;
        self.done.clear();
        self.xacts_done.clear();
        self.xact = XactSoFar::default();
        self.delta = Delta::default();
    }

    /// When the oldest request still waiting for its answer was sent
    /// (monotonic ns), if one is.
    pub fn oldest_pending(&self) -> Option<u64> {
        self.queue.front().map(|p| match p {
            Pending::Statement { start, .. } | Pending::Ready { start } => *start,
        })
    }

    fn started(&mut self, now: u64) {
        self.xact_start.get_or_insert(now);
        self.query_start.get_or_insert(now);
    }

    /// A simple-protocol Query was forwarded.
    pub fn query(&mut self, shape: Option<Arc<Shape>>, trace: Option<Trace>) {
        let now = crate::clock::mono_ns();
        self.started(now);
        self.queue.push_back(Pending::Statement {
            shape,
            trace,
            start: now,
            rows: 0,
            error: false,
            simple: true,
        });
    }

    /// An unnamed statement was parsed (forwarded as is).
    pub fn parse_unnamed(&mut self, shape: Option<Arc<Shape>>, trace: Option<Trace>) {
        self.delta.client_parses += 1;
        self.unnamed = shape;
        self.unnamed_trace = trace;
    }

    /// A named statement was parsed (or answered from the pool's cache).
    pub fn parse_named(&mut self) {
        self.delta.client_parses += 1;
    }

    /// A portal was bound: to `shape`, or with `None` to the unnamed statement.
    /// `trace`: the named statement's trace context (the unnamed one's is
    /// known from its Parse).
    pub fn bind(&mut self, portal: &str, shape: Option<Option<Arc<Shape>>>, trace: Option<Trace>) {
        self.delta.binds += 1;
        let trace = if shape.is_none() {
            self.unnamed_trace
        } else {
            trace
        };
        let shape = shape.unwrap_or_else(|| self.unnamed.clone());
        if portal.is_empty() {
            self.unnamed_portal = shape;
            self.portal_trace = trace;
            return;
        }
        match self.portals.iter_mut().find(|(p, _)| p == portal) {
            Some(slot) => slot.1 = shape,
            None => self.portals.push((portal.to_owned(), shape)),
        }
    }

    pub fn execute(&mut self, portal: &str) {
        let now = crate::clock::mono_ns();
        self.started(now);
        let (shape, trace) = if portal.is_empty() {
            (self.unnamed_portal.clone(), self.portal_trace)
        } else {
            let shape = self
                .portals
                .iter()
                .find(|(p, _)| p == portal)
                .and_then(|(_, s)| s.clone());
            (shape, None)
        };
        self.queue.push_back(Pending::Statement {
            shape,
            trace,
            start: now,
            rows: 0,
            error: false,
            simple: false,
        });
    }

    /// A Sync or FunctionCall was forwarded.
    pub fn sync(&mut self, function_call: bool) {
        let now = crate::clock::mono_ns();
        if function_call {
            self.started(now);
        }
        self.queue.push_back(Pending::Ready { start: now });
        // The unnamed portal ends with the batch's transaction step.
        self.unnamed_portal = None;
        self.portal_trace = None;
    }

    fn finish_head(&mut self) {
        if let Some(Pending::Statement {
            shape,
            trace,
            start,
            rows,
            error,
            ..
        }) = self.queue.pop_front()
        {
            self.record(shape, trace, start, crate::clock::mono_ns(), rows, error);
        }
    }

    fn record(
        &mut self,
        shape: Option<Arc<Shape>>,
        trace: Option<Trace>,
        start: u64,
        now: u64,
        rows: u64,
        error: bool,
    ) {
        self.delta.statements += 1;
        if error {
            self.delta.errors += 1;
        }
        if self.detail {
            let x = &mut self.xact;
            x.statements += 1;
            x.rows += rows;
            x.error |= error;
            if x.trace.is_none() {
                x.trace = trace;
            }
            if let Some(s) = &shape
                && x.first
                    .as_ref()
                    .is_none_or(|f| is_control(&f.text) && !is_control(&s.text))
            {
                x.first = Some(s.clone());
            }
        }
        self.done.push(Finished {
            shape,
            trace,
            us: now.saturating_sub(start) / 1000,
            rows,
            error,
        });
    }

    pub fn command_complete(&mut self, tag: &[u8]) {
        let n = tag_rows(tag);
        match self.queue.front_mut() {
            Some(Pending::Statement {
                simple: false,
                rows,
                ..
            }) => {
                *rows += n;
                self.finish_head();
            }
            Some(Pending::Statement { rows, .. }) => *rows += n,
            _ => {}
        }
    }

    /// EmptyQueryResponse or PortalSuspended.
    pub fn statement_end(&mut self) {
        if let Some(Pending::Statement { simple: false, .. }) = self.queue.front() {
            self.finish_head();
        }
    }

    pub fn error(&mut self) {
        match self.queue.front_mut() {
            Some(Pending::Statement {
                simple: false,
                error,
                ..
            }) => {
                *error = true;
                self.finish_head();
            }
            Some(Pending::Statement { error, .. }) => *error = true,
            _ => {}
        }
    }

    pub fn ready(&mut self, status: TxStatus) {
        let now = crate::clock::mono_ns();
        // Executes skipped after an error never ran.
        while let Some(Pending::Statement { simple: false, .. }) = self.queue.front() {
            self.queue.pop_front();
        }
        match self.queue.pop_front() {
            Some(Pending::Statement {
                shape,
                trace,
                start,
                rows,
                error,
                ..
            }) => self.record(shape, trace, start, now, rows, error),
            Some(Pending::Ready { .. }) | None => {}
        }
        self.delta.queries += 1;
        if let Some(q) = self.query_start.take() {
            self.delta.query_us += now.saturating_sub(q) / 1000;
        }
        if !self.queue.is_empty() {
            // Pipelined requests: the next query started when it was sent.
            self.query_start = match self.queue.front() {
                Some(Pending::Statement { start, .. }) | Some(Pending::Ready { start }) => {
                    Some(*start)
                }
                None => None,
            };
        }
        if status == TxStatus::Idle {
            if let Some(start) = self.xact_start.take() {
                let x = std::mem::take(&mut self.xact);
                let done = XactDone {
                    start,
                    end: now,
                    statements: x.statements,
                    rows: x.rows,
                    error: x.error,
                    first: x.first,
                    trace: x.trace,
                };
                self.delta.xacts += 1;
                self.delta.xact_us += done.us();
                self.xacts_done.push(done);
            }
        } else if self.xact_start.is_none() {
            self.xact_start = Some(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(id: u64) -> Option<Arc<Shape>> {
        Some(Arc::new(Shape {
            id,
            text: "select $1".into(),
        }))
    }

    #[test]
    fn rows_come_from_the_tag() {
        assert_eq!(tag_rows(b"SELECT 5\0"), 5);
        assert_eq!(tag_rows(b"INSERT 0 12\0"), 12);
        assert_eq!(tag_rows(b"BEGIN\0"), 0);
        assert_eq!(tag_rows(b"CREATE TABLE\0"), 0);
        assert_eq!(tag_rows(b"SELECT 18446744073709551615\0"), u64::MAX);
        assert_eq!(tag_rows(b"SELECT 18446744073709551616\0"), 0, "overflow");
        assert_eq!(tag_rows(b"SELECT 1a\0"), 0);
        assert_eq!(tag_rows(b"MOVE 0\0"), 0);
    }

    #[test]
    fn simple_queries_and_transactions() {
        let mut t = Timing {
            detail: true,
            ..Timing::default()
        };
        t.query(shape(1), None);
        t.command_complete(b"BEGIN\0");
        t.ready(TxStatus::InTransaction);
        t.query(shape(2), None);
        t.command_complete(b"SELECT 3\0");
        t.ready(TxStatus::InTransaction);
        t.query(shape(3), None);
        t.command_complete(b"COMMIT\0");
        t.ready(TxStatus::Idle);
        assert_eq!(t.delta.queries, 3);
        assert_eq!(t.delta.xacts, 1);
        assert_eq!(t.delta.statements, 3);
        assert_eq!(t.done[1].rows, 3);
        assert_eq!(t.done[1].shape.as_ref().map(|s| s.id), Some(2));
        let x = &t.xacts_done[0];
        assert_eq!((x.statements, x.rows, x.error), (3, 3, false));
    }

    #[test]
    fn a_transaction_is_named_by_what_follows_its_begin() {
        let named = |id: u64, text: &str| {
            Some(Arc::new(Shape {
                id,
                text: text.into(),
            }))
        };
        let trace = crate::stats::trace::Trace {
            trace_id: 9,
            span_id: 8,
            flags: 1,
        };
        let mut t = Timing {
            detail: true,
            ..Timing::default()
        };
        t.query(named(1, "BEGIN"), None);
        t.command_complete(b"BEGIN\0");
        t.ready(TxStatus::InTransaction);
        t.query(named(2, "update t set v = $1"), Some(trace));
        t.command_complete(b"UPDATE 2\0");
        t.ready(TxStatus::InTransaction);
        t.query(named(3, "select $1"), None);
        t.error();
        t.ready(TxStatus::Failed);
        t.query(named(4, "ROLLBACK"), None);
        t.command_complete(b"ROLLBACK\0");
        t.ready(TxStatus::Idle);
        // A lone BEGIN names its transaction; the next one starts afresh.
        t.query(named(1, "begin"), None);
        t.command_complete(b"BEGIN\0");
        t.ready(TxStatus::InTransaction);
        t.query(named(5, "commit"), None);
        t.command_complete(b"COMMIT\0");
        t.ready(TxStatus::Idle);
        let x = &t.xacts_done[0];
        assert_eq!((x.statements, x.rows, x.error), (4, 2, true));
        assert_eq!(x.first.as_ref().map(|s| s.id), Some(2));
        assert_eq!(x.trace, Some(trace));
        assert!(x.end >= x.start);
        let y = &t.xacts_done[1];
        assert_eq!((y.statements, y.error, y.trace), (2, false, None));
        assert_eq!(y.first.as_ref().map(|s| s.id), Some(1));
    }

    #[test]
    fn extended_batches_and_skipped_executes() {
        let mut t = Timing::default();
        t.parse_unnamed(shape(7), None);
        t.bind("", None, None);
        t.execute("");
        t.sync(false);
        t.command_complete(b"SELECT 1\0");
        t.ready(TxStatus::Idle);
        assert_eq!(t.done.len(), 1);
        assert_eq!(t.done[0].shape.as_ref().map(|s| s.id), Some(7));
        assert_eq!(t.delta.xacts, 1);
        // An error at the first Execute: the second never runs.
        t.bind("", None, None);
        t.execute("");
        t.execute("");
        t.sync(false);
        t.error();
        t.ready(TxStatus::Idle);
        assert_eq!(t.done.len(), 2);
        assert!(t.done[1].error);
        assert_eq!(t.delta.errors, 1);
        assert_eq!(t.delta.xacts, 2);
        assert_eq!(t.delta.queries, 2);
    }
}
