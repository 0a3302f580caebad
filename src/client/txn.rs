//! What is outstanding between one client and the server it is using:
//! ReadyForQuery responses owed, extended-query messages not yet synced, COPY
//! state and the last transaction status. Pure state, no I/O: both scanners
//! feed it, and it alone decides whether the server may be released.

use std::sync::Arc;

use super::memo::Memo;
use super::sql::{Effects, effects};
use super::timing::Timing;
use crate::protocol::messages::{
    Body, ErrorFields, error_fields, parameter_status, ready_for_query,
};
use crate::protocol::scan::{Inspector, Step};
use crate::protocol::{BackendTag, FrontendTag, ProtocolError, TxStatus};
use crate::router::hints::{Hint, hint};
use crate::router::{Class, Classifier, Functions};
use crate::server::expect::{Expect, Owed, Undo};
use crate::stats::fingerprint::hash_and_template;
use crate::stats::{Fingerprints, Shape};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Copy {
    #[default]
    None,
    In,
    Out,
    Both,
}

/// How this client's messages are treated (fixed per session).
#[derive(Debug, Clone, Copy, Default)]
pub struct Policy {
    /// Named prepared statements are rewritten to shared server statements.
    pub named_statements: bool,
    /// Session features are refused instead of pinning the client.
    pub refuse_session_features: bool,
}

/// Client bytes and held answer kept for the safety net, at most.
pub const MISROUTE_HOLD: usize = 64 * 1024;

/// The safety net of an autocommit read sent to a replica: until its first
/// row (or the end of its answer) the answer is held back and the client's
/// bytes are kept, so that when the replica refuses it as a write (25006)
/// it runs again on the primary and the client never sees the refusal.
#[derive(Debug, Default)]
pub enum Misroute {
    #[default]
    Off,
    /// Holding: the client bytes sent so far.
    Armed(bytes::BytesMut),
    /// The replica said 25006: these bytes go to the primary once its
    /// answer is over.
    Fired(bytes::BytesMut),
}

impl Misroute {
    /// The answer is held back from the client.
    pub fn holds(&self) -> bool {
        !matches!(self, Misroute::Off)
    }

    /// Gives up the net (a row came, the answer ended, too much to hold).
    pub fn disarm(&mut self) {
        if matches!(self, Misroute::Armed(_)) {
            *self = Misroute::Off;
        }
    }
}

/// What tells, on a replica, which statements need the primary.
#[derive(Debug, Clone)]
pub struct ReplicaGuard {
    pub classifier: Arc<Classifier>,
    /// The database's function volatilities (None: not known yet).
    pub functions: Option<Arc<Functions>>,
}

#[derive(Debug)]
pub struct Tracker {
    /// Extended-query messages were sent since the last Sync.
    pub unsynced: bool,
    pub status: TxStatus,
    pub copy: Copy,
    /// The client sent Terminate.
    pub terminated: bool,
    /// The server sent a FATAL error: it is closing. Held back from the
    /// client, which gets a connection-failure ERROR instead and keeps its
    /// own connection.
    pub server_fatal: Option<ErrorFields>,
    /// Responses owed, in order, with what tidepool injects or drops.
    pub expect: Expect,
    /// tidepool answered a client message with an error: drop the client's
    /// messages until its Sync, as PostgreSQL would.
    pub client_skip: bool,
    /// The session parameters may have changed (SET, RESET, DISCARD, ...).
    pub params_changed: bool,
    /// A session feature was used: the client keeps this server.
    pub pin: Option<&'static str>,
    /// The ErrorResponse at the head of the server's bytes names one of
    /// tidepool's statements: the session renames it before it passes.
    pub rename_error: bool,
    /// That ErrorResponse was renamed: let it pass this time.
    pub error_renamed: bool,
    /// Statements (hash, generation) a server said no longer fit the
    /// catalog, with the body of its ErrorResponse, for the session to mark
    /// stale.
    pub stale: Vec<(u64, u64, Vec<u8>)>,
    /// Custom (dotted) parameters this transaction set or reset.
    pub custom_params: Vec<String>,
    /// Statements (hash, version) a server said refer to something gone
    /// (`cache lookup failed`), for the session to prepare afresh.
    pub broken: Vec<(u64, u64)>,
    /// DDL was sent since the server was last outside a transaction.
    pub ddl: bool,
    /// A transaction that ran DDL ended: the session advances the
    /// database's epoch so every server statement is prepared afresh.
    pub schema_changed: bool,
    /// The client's next message waits (unread by tidepool) until a
    /// statement prepared for it was described, so that its row shape is
    /// compared with the client's before it runs.
    pub hold: bool,
    pub policy: Policy,
    /// On a replica: statements that need the primary stop the scan.
    pub replica_guard: Option<ReplicaGuard>,
    /// A statement that needs the primary waits until this replica
    /// transaction is over.
    pub reroute: bool,
    /// Statement and transaction times.
    pub timing: Timing,
    /// The safety net of a read on a replica.
    pub misroute: Misroute,
    /// Statements this client sent lately; kept across [`Tracker::reset`].
    memo: Memo,
}

impl Tracker {
    pub fn new(status: TxStatus, policy: Policy) -> Self {
        Self {
            unsynced: false,
            status,
            copy: Copy::None,
            terminated: false,
            server_fatal: None,
            expect: Expect::default(),
            client_skip: false,
            params_changed: false,
            pin: None,
            stale: Vec::new(),
            rename_error: false,
            error_renamed: false,
            custom_params: Vec::new(),
            broken: Vec::new(),
            ddl: false,
            schema_changed: false,
            hold: false,
            policy,
            replica_guard: None,
            reroute: false,
            timing: Timing::default(),
            misroute: Misroute::Off,
            memo: Memo::default(),
        }
    }

    /// Starts afresh for the next transaction, keeping the allocations (the
    /// queues of owed answers and statement timings) of the last one.
    pub fn reset(&mut self, status: TxStatus, policy: Policy) {
        self.unsynced = false;
        self.status = status;
        self.copy = Copy::None;
        self.terminated = false;
        self.server_fatal = None;
        self.expect.clear();
        self.client_skip = false;
        self.params_changed = false;
        self.pin = None;
        self.stale.clear();
        self.rename_error = false;
        self.error_renamed = false;
        self.custom_params.clear();
        self.broken.clear();
        self.ddl = false;
        self.schema_changed = false;
        self.hold = false;
        self.policy = policy;
        self.replica_guard = None;
        self.reroute = false;
        self.timing.clear();
        self.misroute = Misroute::Off;
    }

    /// Nothing is owed, nothing is half-sent, and the server is outside a
    /// transaction: it may serve another client.
    pub fn is_idle(&self) -> bool {
        self.is_quiet() && self.status == TxStatus::Idle
    }

    /// Nothing is owed, but a transaction may be open (ROLLBACK would clean it).
    pub fn is_quiet(&self) -> bool {
        !self.unsynced
            && !self.client_skip
            && !self.hold
            && self.copy == Copy::None
            && self.expect.is_empty()
    }

    /// `shapes` fingerprints statements for per-query statistics (None: off).
    pub fn client_side<'a>(&'a mut self, shapes: Option<&'a Fingerprints>) -> ClientSide<'a> {
        ClientSide { t: self, shapes }
    }

    pub fn server_side<'a>(&'a mut self, params: &'a mut Vec<(String, String)>) -> ServerSide<'a> {
        ServerSide { t: self, params }
    }

    /// Notes what a query text does to the session. Returns true when the
    /// query must not be forwarded as it is (a refused session feature).
    pub fn note_sql(&mut self, sql: &str) -> bool {
        self.note_effects(&effects(sql))
    }

    /// On a replica, outside a transaction: does `sql` need the primary?
    fn needs_primary(&mut self, sql: &str) -> bool {
        let Some(g) = &self.replica_guard else {
            return false;
        };
        if self.status != TxStatus::Idle || hint(sql) == Some(Hint::Replica) {
            return false;
        }
        !matches!(
            self.memo.class(sql, &g.classifier, g.functions.as_deref()),
            Class::Read | Class::BeginReadOnly | Class::Neutral
        )
    }

    /// The routing class of `sql`, through this client's memo.
    pub fn classify(
        &mut self,
        sql: &str,
        classifier: &Classifier,
        functions: Option<&Functions>,
    ) -> Class {
        self.memo.class(sql, classifier, functions)
    }

    pub fn note_effects(&mut self, e: &Effects) -> bool {
        self.params_changed |= e.params_changed || e.drops_all_statements;
        self.ddl |= e.ddl;
        self.custom_params.extend(e.custom_params.iter().cloned());
        match e.session_feature {
            Some(_) if self.policy.refuse_session_features => true,
            Some(f) => {
                self.pin.get_or_insert(f);
                false
            }
            None => false,
        }
    }
}

/// Inspector for client → server bytes.
///
/// Messages it can forward unchanged pass; named-statement messages, refused
/// features and messages to drop stop the scan for the session to handle.
pub struct ClientSide<'a> {
    t: &'a mut Tracker,
    shapes: Option<&'a Fingerprints>,
}

/// The shape of `sql` when per-query statistics are on.
pub fn shape_of(shapes: Option<&Fingerprints>, sql: &str) -> Option<Arc<Shape>> {
    shapes.map(|s| s.shape(sql))
}

impl ClientSide<'_> {
    /// What `sql` is: its shape (when per-query statistics are on) and its
    /// effects on the session (`None`: it has none). A statement like one
    /// this client sent lately is known from the memo without lexing it.
    fn look(&mut self, sql: &str) -> (Option<Arc<Shape>>, Option<Effects>) {
        let t = &mut *self.t;
        if let Some(hit) = t.memo.find(sql) {
            let shape = match self.shapes {
                // Remembered for routing, before statistics wanted its shape.
                Some(s) => Some(hit.shape.get_or_insert_with(|| s.shape(sql)).clone()),
                None => None,
            };
            return (shape, (!hit.plain).then(|| effects(sql)));
        }
        let e = effects(sql);
        let (shape, template) = match self.shapes {
            Some(s) => {
                let (shape, template) = s.shape_and_template(sql);
                (Some(shape), template)
            }
            None => (None, hash_and_template(sql).1),
        };
        let plain = e.is_plain();
        if let Some(template) = template {
            t.memo.remember(template, shape.clone(), plain);
        }
        (shape, (!plain).then_some(e))
    }
}

impl Inspector for ClientSide<'_> {
    fn classify(&mut self, tag: u8) -> Step {
        let t = &mut *self.t;
        let tag = FrontendTag::from_byte(tag);
        if tag == FrontendTag::Terminate {
            t.terminated = true;
            return Step::Stop;
        }
        if t.client_skip {
            return Step::Inspect;
        }
        match tag {
            FrontendTag::Query
            | FrontendTag::Parse
            | FrontendTag::Bind
            | FrontendTag::Describe
            | FrontendTag::Execute
            | FrontendTag::Close => return Step::Inspect,
            FrontendTag::Sync => {
                t.unsynced = false;
                t.expect.push(Owed::Sync);
                t.timing.sync(false);
            }
            FrontendTag::FunctionCall => {
                t.expect.push(Owed::UntilReady {
                    undo: None,
                    failed: false,
                    position_shift: 0,
                    bound: None,
                });
                t.timing.sync(true);
            }
            FrontendTag::Flush => t.unsynced = true,
            FrontendTag::CopyDone | FrontendTag::CopyFail if t.copy == Copy::In => {
                t.copy = Copy::None;
            }
            _ => {}
        }
        Step::Pass
    }

    fn inspect(&mut self, tag: u8, body: &[u8]) -> Result<Step, ProtocolError> {
        let t = &mut *self.t;
        if t.client_skip {
            return Ok(Step::Stop);
        }
        let named = t.policy.named_statements;
        match FrontendTag::from_byte(tag) {
            FrontendTag::Query => {
                let sql = Body::new(body, "Query").cstr()?;
                if t.needs_primary(sql) {
                    t.reroute = true;
                    return Ok(Step::Stop);
                }
                let (shape, e) = self.look(sql);
                let t = &mut *self.t;
                if let Some(e) = e {
                    let refused = e.session_feature.is_some() && t.policy.refuse_session_features;
                    let prepared =
                        (e.prepared.is_some() || e.nested_execute.is_some() || e.lists_statements)
                            && t.policy.named_statements;
                    if e.deallocate.is_some() || e.drops_all_statements || refused || prepared {
                        return Ok(Step::Stop);
                    }
                    t.note_effects(&e);
                }
                t.expect.push(Owed::UntilReady {
                    undo: None,
                    failed: false,
                    position_shift: 0,
                    bound: None,
                });
                t.timing.query(shape);
            }
            FrontendTag::Parse => {
                let mut b = Body::new(body, "Parse");
                let name = b.cstr()?;
                let sql = b.cstr()?;
                if t.needs_primary(sql) {
                    t.reroute = true;
                    return Ok(Step::Stop);
                }
                if named && !name.is_empty() {
                    return Ok(Step::Stop);
                }
                let (shape, e) = self.look(sql);
                if named && e.as_ref().is_some_and(|e| e.lists_statements) {
                    return Ok(Step::Stop);
                }
                let t = &mut *self.t;
                if let Some(e) = e
                    && t.note_effects(&e)
                {
                    return Ok(Step::Stop);
                }
                t.unsynced = true;
                t.expect.push(Owed::Parse {
                    swallow: false,
                    undo: Undo::default(),
                });
                if name.is_empty() {
                    t.timing.parse_unnamed(shape);
                } else {
                    t.timing.parse_named();
                }
            }
            FrontendTag::Bind => {
                let mut b = Body::new(body, "Bind");
                let portal = b.cstr()?;
                let statement = b.cstr()?;
                if named && !statement.is_empty() {
                    return Ok(Step::Stop);
                }
                t.unsynced = true;
                t.expect.push(Owed::Bind);
                let shape = (!statement.is_empty()).then_some(None);
                t.timing.bind(portal, shape);
            }
            FrontendTag::Execute => {
                let portal = Body::new(body, "Execute").cstr()?;
                t.unsynced = true;
                t.expect.push(Owed::Execute);
                t.timing.execute(portal);
            }
            FrontendTag::Describe | FrontendTag::Close => {
                let mut b = Body::new(body, "Describe/Close");
                let kind = b.u8()?;
                if named && kind == b'S' && !b.cstr()?.is_empty() {
                    return Ok(Step::Stop);
                }
                t.unsynced = true;
                t.expect.push(match (FrontendTag::from_byte(tag), kind) {
                    (FrontendTag::Close, _) => Owed::Close { swallow: false },
                    (_, b'S') => Owed::DescribeStatement,
                    _ => Owed::DescribePortal,
                });
            }
            _ => {}
        }
        Ok(Step::Pass)
    }
}

/// Whether a server error says a statement's result no longer fits the
/// catalog (a migration changed it).
fn plan_changed(e: &ErrorFields) -> bool {
    e.code == "0A000" && e.message == PLAN_CHANGED
}

/// How an error text names one of tidepool's statements (`"tidepool_` and
/// its hash in hex).
pub const INTERNAL_NAME_MARK: &[u8] = b"\"tidepool_";

/// A replica refusing a write: `cannot execute … in a read-only transaction`.
const READ_ONLY_TRANSACTION: &str = "25006";

/// PostgreSQL's words for a prepared statement whose result type changed.
pub const PLAN_CHANGED: &str = "cached plan must not change result type";

/// Inspector for server → client bytes. ParameterStatus values are collected
/// into `params` for the session to apply. It stops where tidepool must
/// insert an answer of its own or drop one the client did not ask for.
pub struct ServerSide<'a> {
    t: &'a mut Tracker,
    params: &'a mut Vec<(String, String)>,
}

impl Inspector for ServerSide<'_> {
    fn classify(&mut self, tag: u8) -> Step {
        let t = &mut *self.t;
        if t.expect.head_is_tidepools() || t.expect.swallows(tag) {
            return Step::Stop;
        }
        let tag_kind = BackendTag::from_byte(tag);
        if tag_kind == BackendTag::DataRow {
            // Rows pass untouched (and change nothing owed); the first one
            // ends the safety net (rows are not held).
            t.misroute.disarm();
            return Step::Pass;
        }
        match tag_kind {
            BackendTag::ReadyForQuery
            | BackendTag::ParameterStatus
            | BackendTag::ErrorResponse
            | BackendTag::CommandComplete => {
                return Step::Inspect;
            }
            BackendTag::CopyInResponse => {
                t.copy = Copy::In;
                t.misroute.disarm();
            }
            BackendTag::CopyOutResponse => {
                t.copy = Copy::Out;
                t.misroute.disarm();
            }
            BackendTag::CopyBothResponse => {
                t.copy = Copy::Both;
                t.misroute.disarm();
            }
            BackendTag::EmptyQueryResponse | BackendTag::PortalSuspended => {
                t.timing.statement_end();
            }
            _ => {}
        }
        t.expect.on_message(tag);
        Step::Pass
    }

    fn inspect(&mut self, tag: u8, body: &[u8]) -> Result<Step, ProtocolError> {
        let t = &mut *self.t;
        match BackendTag::from_byte(tag) {
            BackendTag::ReadyForQuery => {
                t.status = ready_for_query(body)?;
                if t.status == TxStatus::Idle && std::mem::take(&mut t.ddl) {
                    t.schema_changed = true;
                }
                t.misroute.disarm();
                t.copy = Copy::None;
                t.timing.ready(t.status);
            }
            BackendTag::CommandComplete => {
                if t.copy == Copy::Out {
                    t.copy = Copy::None;
                }
                t.timing.command_complete(body);
            }
            BackendTag::ParameterStatus => {
                let (k, v) = parameter_status(body)?;
                self.params.push((k.to_owned(), v.to_owned()));
            }
            BackendTag::ErrorResponse => {
                let fields = error_fields(body)?;
                if fields.severity == "FATAL" || fields.severity == "PANIC" {
                    t.server_fatal = Some(fields);
                    return Ok(Step::Stop);
                }
                let rewrite = memchr::memmem::find(body, INTERNAL_NAME_MARK).is_some()
                    || (t.expect.head_position_shift() != 0 && !fields.position.is_empty());
                if !std::mem::take(&mut t.error_renamed) && rewrite {
                    // It names one of tidepool's statements, or points into
                    // tidepool's rewrite of the query: the session puts the
                    // client's name and position in and scans it again.
                    t.rename_error = true;
                    return Ok(Step::Stop);
                }
                if t.copy == Copy::Out {
                    t.copy = Copy::None;
                }
                if let Misroute::Armed(replay) = &mut t.misroute {
                    t.misroute = if fields.code == READ_ONLY_TRANSACTION {
                        Misroute::Fired(std::mem::take(replay))
                    } else {
                        Misroute::Off
                    };
                }
                if let Some((hash, version)) = t.expect.head_bound_statement() {
                    if plan_changed(&fields) {
                        t.stale.push((hash, version, body.to_vec()));
                    } else if fields.code == "XX000"
                        && fields.message.starts_with("cache lookup failed")
                    {
                        t.broken.push((hash, version));
                    }
                }
                t.timing.error();
            }
            _ => {}
        }
        t.expect.on_message(tag);
        Ok(Step::Pass)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::scan::Scanner;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    /// Smallest well-formed body for an extended-query message.
    fn valid_body(tag: u8) -> &'static [u8] {
        match tag {
            b'P' => b"\0select 1\0\0\0",
            b'B' => b"\0\0\0\0\0\0\0\0",
            b'E' => b"\0\0\0\0\0",
            _ => b"",
        }
    }

    fn feed_client(t: &mut Tracker, bytes: &[u8]) {
        let mut s = Scanner::new(1 << 20);
        s.scan(bytes, &mut t.client_side(None)).unwrap();
    }

    fn feed_server(t: &mut Tracker, bytes: &[u8]) -> Vec<(String, String)> {
        let mut s = Scanner::new(1 << 20);
        let mut p = Vec::new();
        s.scan(bytes, &mut t.server_side(&mut p)).unwrap();
        p
    }

    #[test]
    fn release_waits_for_every_sync() {
        let mut t = Tracker::new(TxStatus::Idle, Policy::default());
        let mut c = Vec::new();
        for tag in [b'P', b'B', b'E', b'S', b'B', b'E', b'S'] {
            c.extend_from_slice(&msg(tag, valid_body(tag)));
        }
        feed_client(&mut t, &c);
        assert_eq!(t.expect.ready_owed(), 2);
        feed_server(&mut t, &msg(b'Z', b"I"));
        assert!(!t.is_idle(), "one Sync still unanswered");
        feed_server(&mut t, &msg(b'Z', b"I"));
        assert!(t.is_idle());
    }

    #[test]
    fn unsynced_extended_messages_keep_the_server() {
        let mut t = Tracker::new(TxStatus::Idle, Policy::default());
        feed_client(
            &mut t,
            &[msg(b'Q', b"x\0"), msg(b'P', valid_body(b'P'))].concat(),
        );
        feed_server(&mut t, &msg(b'Z', b"I"));
        assert!(!t.is_idle());
        feed_client(&mut t, &msg(b'S', b""));
        feed_server(&mut t, &msg(b'Z', b"I"));
        assert!(t.is_idle());
    }

    #[test]
    fn open_transaction_and_failed_transaction_keep_the_server() {
        let mut t = Tracker::new(TxStatus::Idle, Policy::default());
        feed_client(&mut t, &msg(b'Q', b"begin\0"));
        feed_server(&mut t, &msg(b'Z', b"T"));
        assert!(!t.is_idle());
        assert!(t.is_quiet());
        feed_client(&mut t, &msg(b'Q', b"bad\0"));
        feed_server(&mut t, &msg(b'Z', b"E"));
        assert!(!t.is_idle());
        feed_client(&mut t, &msg(b'Q', b"rollback\0"));
        feed_server(&mut t, &msg(b'Z', b"I"));
        assert!(t.is_idle());
    }

    #[test]
    fn copy_in_is_tracked_until_done() {
        let mut t = Tracker::new(TxStatus::Idle, Policy::default());
        feed_client(&mut t, &msg(b'Q', b"copy\0"));
        feed_server(&mut t, &msg(b'G', &[0, 0, 0]));
        assert_eq!(t.copy, Copy::In);
        feed_client(&mut t, &[msg(b'd', b"1\n"), msg(b'c', b"")].concat());
        assert_eq!(t.copy, Copy::None);
        feed_server(&mut t, &[msg(b'C', b"COPY 1\0"), msg(b'Z', b"I")].concat());
        assert!(t.is_idle());
    }

    #[test]
    fn a_server_fatal_is_held_back() {
        let mut t = Tracker::new(TxStatus::InTransaction, Policy::default());
        let mut s = Scanner::new(1 << 20);
        let mut p = Vec::new();
        let bytes = [
            msg(b'N', b"SNOTICE\0C00000\0Mhi\0\0"),
            msg(b'E', b"SFATAL\0VFATAL\0C57P01\0Mterminating\0\0"),
        ]
        .concat();
        let r = s.scan(&bytes, &mut t.server_side(&mut p)).unwrap();
        assert!(r.stopped);
        let notice_len = msg(b'N', b"SNOTICE\0C00000\0Mhi\0\0").len();
        assert_eq!(
            r.forward, notice_len,
            "the notice passes, the FATAL does not"
        );
        assert_eq!(
            t.server_fatal.as_ref().map(|f| f.code.as_str()),
            Some("57P01")
        );
        // An ordinary ERROR passes.
        let mut t = Tracker::new(TxStatus::Idle, Policy::default());
        let err = msg(b'E', b"SERROR\0VERROR\0C22012\0Mdivision by zero\0\0");
        let r = s.scan(&err, &mut t.server_side(&mut p)).unwrap();
        assert_eq!(r.forward, err.len());
        assert!(t.server_fatal.is_none());
    }

    #[test]
    fn parameter_status_is_collected_and_terminate_stops() {
        let mut t = Tracker::new(TxStatus::Idle, Policy::default());
        let p = feed_server(&mut t, &msg(b'S', b"TimeZone\0UTC\0"));
        assert_eq!(p, vec![("TimeZone".into(), "UTC".into())]);
        let mut s = Scanner::new(1024);
        let r = s
            .scan(
                &[msg(b'Q', b"x\0"), msg(b'X', b"")].concat(),
                &mut t.client_side(None),
            )
            .unwrap();
        assert!(r.stopped);
        assert!(t.terminated);
    }
}
