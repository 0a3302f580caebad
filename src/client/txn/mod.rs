//! What is outstanding between one client and the server it is using:
//! ReadyForQuery responses owed, extended-query messages not yet synced, COPY
//! state and the last transaction status. Pure state, no I/O: both scanners
//! feed it, and it alone decides whether the server may be released.

mod client_side;
mod server_side;
pub mod spare;

pub use client_side::{ClientSide, shape_in, shape_of};
pub use server_side::{INTERNAL_NAME_MARK, PLAN_CHANGED, ServerSide};

use std::sync::Arc;

use super::memo::Memo;
pub use super::memo::UnnamedDrops;
use super::sql::{Effects, effects};
use super::timing::Timing;
use crate::protocol::messages::{
    Body, ErrorFields, error_fields, parameter_status, ready_for_query,
};
use crate::protocol::scan::{Inspector, Step};
use crate::protocol::{BackendTag, FrontendTag, ProtocolError, TxStatus};
use crate::router::{Class, Classifier, Functions};
pub use crate::server::exchange::{Batch, Copy, Exchange, Verdict};
use crate::server::expect::{Owed, Undo};
use crate::server::session_functions::SessionFunctions;
use crate::stats::fingerprint::hash_and_template;
use crate::stats::{Fingerprints, Shape};

/// How this client's messages are treated (fixed per session).
#[derive(Debug, Clone, Copy, Default)]
pub struct Policy {
    /// Named prepared statements are rewritten to shared server statements.
    pub named_statements: bool,
    /// Session features are refused instead of pinning the client.
    pub refuse_session_features: bool,
    /// `listen_mode = "shared"` in transaction mode: LISTEN is tidepool's
    /// (answered and delivered by it), not a session feature.
    pub listen_shared: bool,
}

/// Client bytes and held answer kept for the safety net, at most.
pub const MISROUTE_HOLD: usize = 64 * 1024;

/// The safety net of an autocommit read sent to a replica: until its first
/// row (or the end of its answer) the answer is held back and the client's
/// bytes are kept, so that when the replica refuses it as a write (25006)
/// or as serializable (0A000, a serializable default) it runs again on the
/// primary and the client never sees the refusal.
#[derive(Debug, Default)]
pub enum Misroute {
    #[default]
    Off,
    /// Holding: the client bytes sent so far.
    Armed(bytes::BytesMut),
    /// The replica said 25006 or 0A000: these bytes go to the primary once its
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

    /// Gives up the net even after a refusal, which then reaches the client
    /// as it is: what follows can no longer run again (a second request
    /// in flight, too much to hold, a message tidepool answers itself).
    /// Holding on would hold the answer for good.
    pub fn give_up(&mut self) {
        *self = Misroute::Off;
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
    /// What the server owes, the batch, COPY and the transaction status.
    pub exchange: Exchange,
    /// The client sent Terminate.
    pub terminated: bool,
    /// The server sent a FATAL error: it is closing. Held back from the
    /// client, which gets a connection-failure ERROR instead and keeps its
    /// own connection.
    pub server_fatal: Option<ErrorFields>,
    /// The session parameters may have changed (SET, RESET, DISCARD, ...).
    pub params_changed: bool,
    /// A statement that drops every prepared statement on the server
    /// (DEALLOCATE ALL, DISCARD ALL) ran: a Query, or a Bind of a prepared
    /// statement of that text (a Parse alone drops nothing). What tidepool
    /// knows the server has is void.
    pub drops_statements: bool,
    /// A session feature was used: the client keeps this server.
    pub pin: Option<&'static str>,
    /// Session state that pins the client may have ended (or just began:
    /// a rolled-back or `ON COMMIT DROP` one ends with its transaction):
    /// the server is asked at the next transaction boundary.
    pub pin_check_due: bool,
    /// Shared LISTEN: a LISTEN ran on the server in this transaction; its
    /// channels move to tidepool's listener once it is over.
    pub listen_changed: bool,
    /// Shared LISTEN: UNLISTENs (None: `*`) whose transaction committed.
    /// They apply to `hub` as the ReadyForQuery that ends it is read,
    /// before the client can see it (a notification sent after the client
    /// saw its UNLISTEN done must not reach it), and again once the server
    /// is idle.
    pub unlistens: Vec<Option<String>>,
    /// The client's LISTEN hub and its id there, when it is a member.
    pub hub: Option<(std::sync::Arc<crate::client::listen::Hub>, u64)>,
    /// What becomes of UNLISTENs forwarded to the server.
    pub unlisten_fate: UnlistenFate,
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
    /// The replica refused a transaction as serializable (the session's
    /// role or database default, or the server's): the client's reads go to
    /// the primary for a while.
    pub serializable_refused: bool,
    /// A request ran past `query_timeout` and was canceled: the message the
    /// server's 57014 is given instead of "user request".
    pub timeout_cancel: Option<String>,
    /// Functions of the database that may change session settings (set
    /// by the session for each transaction; a call is a parameter change).
    pub changers: Option<Arc<SessionFunctions>>,
    /// The session's parse settings (`server::params::parse_context`), and
    /// a context of this client's alone for statements prepared after a
    /// setting changed in this transaction (set by the session for each
    /// transaction).
    pub parse_context: (u64, u64),
    /// Statistics cannot tell this session's literals apart: its
    /// statements are shown by their first word only
    /// (`stats::fingerprint::opaque`).
    pub opaque_literals: bool,
    /// Statements this client sent lately: the client's own, lent to the
    /// tracker for a transaction (see [`spare`]).
    memo: Memo,
}

impl Tracker {
    pub fn new(status: TxStatus, policy: Policy) -> Self {
        Self {
            exchange: Exchange::new(status),
            terminated: false,
            server_fatal: None,
            params_changed: false,
            drops_statements: false,
            pin: None,
            pin_check_due: false,
            listen_changed: false,
            unlistens: Vec::new(),
            hub: None,
            unlisten_fate: UnlistenFate::default(),
            stale: Vec::new(),
            rename_error: false,
            error_renamed: false,
            custom_params: Vec::new(),
            broken: Vec::new(),
            ddl: false,
            schema_changed: false,
            policy,
            replica_guard: None,
            reroute: false,
            timing: Timing::default(),
            misroute: Misroute::Off,
            serializable_refused: false,
            changers: None,
            timeout_cancel: None,
            parse_context: (0, 0),
            opaque_literals: false,
            memo: Memo::default(),
        }
    }

    /// A tracker that was [`reset`](Tracker::reset) starts a transaction in
    /// `status`.
    fn start(&mut self, status: TxStatus, policy: Policy) {
        self.exchange.status = status;
        self.policy = policy;
    }

    /// Starts afresh for the next transaction, keeping the allocations (the
    /// queues of owed answers and statement timings) of the last one.
    pub fn reset(&mut self, status: TxStatus, policy: Policy) {
        self.exchange.reset(status);
        self.terminated = false;
        self.server_fatal = None;
        self.params_changed = false;
        self.drops_statements = false;
        self.pin = None;
        self.pin_check_due = false;
        self.listen_changed = false;
        self.unlistens.clear();
        self.hub = None;
        self.unlisten_fate = UnlistenFate::default();
        self.stale.clear();
        self.rename_error = false;
        self.error_renamed = false;
        self.custom_params.clear();
        self.broken.clear();
        self.ddl = false;
        self.schema_changed = false;
        self.policy = policy;
        self.replica_guard = None;
        self.reroute = false;
        self.timing.clear();
        self.misroute = Misroute::Off;
        self.serializable_refused = false;
        self.timeout_cancel = None;
        self.parse_context = (0, 0);
        self.opaque_literals = false;
    }

    /// The parse settings a statement prepared now is read under: the
    /// session's, or after a setting changed in this transaction (its new
    /// value is not known here yet) the client's own, shared with nobody.
    pub fn statement_context(&self) -> u64 {
        if self.params_changed {
            self.parse_context.1
        } else {
            self.parse_context.0
        }
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
        let e = self.effects_of(sql);
        self.note_effects(&e)
    }

    /// Notes a prepared statement's text; text in another encoding than
    /// UTF-8 (`foreign`) counts as changing settings (see `client_side`).
    pub fn note_statement(&mut self, query: &str, foreign: bool) -> bool {
        self.params_changed |= foreign;
        self.note_sql(query)
    }

    /// A prepared statement runs (its Bind): what its text does to the
    /// session, as [`Self::note_statement`], and running it (not parsing
    /// it) drops the server's statements if its text says so.
    /// Returns those effects (a `DEALLOCATE name` the caller carries out).
    pub fn note_run(&mut self, query: &str, foreign: bool) -> Effects {
        self.params_changed |= foreign;
        let e = self.effects_of(query);
        self.drops_statements |= e.drops_all_statements;
        self.note_effects(&e);
        e
    }

    /// What `sql` does to the session, a call of a function that may change
    /// settings included.
    pub fn effects_of(&self, sql: &str) -> Effects {
        let mut e = effects(sql);
        if let Some(c) = self.changers.as_ref().filter(|c| c.called_in(sql)) {
            // What it set may include custom settings, which PostgreSQL
            // lists nowhere: the names its body mentions are read back.
            e.params_changed = true;
            e.custom_params
                .extend(c.customs().iter().map(|n| n.to_string()));
        }
        if self.policy.listen_shared && e.session_feature == Some(crate::client::pins::LISTEN) {
            e.session_feature = None;
        }
        e
    }

    /// `sql` calls a function that may change session settings.
    pub fn calls_changer(&self, sql: &str) -> bool {
        self.changers.as_ref().is_some_and(|c| c.called_in(sql))
    }

    /// On a replica, outside a transaction: does `sql` need the primary?
    /// Text in another client encoding (`foreign`) is not classified: it
    /// needs the primary. So, for now, does a long text not classified yet
    /// (see [`Classifier::would_parse_long`]): the transaction ends here and
    /// the session routes it after classifying it off the event loop.
    pub fn needs_primary(&mut self, sql: &str, foreign: bool) -> bool {
        let Some(g) = &self.replica_guard else {
            return false;
        };
        if self.status != TxStatus::Idle {
            return false;
        }
        if !foreign && g.classifier.would_parse_long(sql) {
            // Parsing it here would hold the event loop: the session
            // classifies it off the loop and routes it afresh.
            return true;
        }
        let memo = &mut self.memo;
        !crate::router::policy::replica_may_run(sql, &g.classifier, || {
            if foreign {
                Class::Write
            } else {
                memo.class(sql, &g.classifier, g.functions.as_deref())
            }
        })
    }

    /// What running the client's unnamed statement drops, now that a Bind
    /// runs it (a second Bind runs it again on the server alone).
    pub fn take_unnamed_drops(&mut self) -> UnnamedDrops {
        std::mem::take(&mut self.memo.unnamed_drops)
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
        self.pin_check_due |= e.releases_session_state;
        if self.policy.listen_shared {
            self.listen_changed |= e.listen;
            self.unlisten_fate.sent.extend(e.unlisten.iter().cloned());
        }
        match e.session_feature {
            Some(_) if self.policy.refuse_session_features => true,
            Some(f) => {
                self.pin.get_or_insert(f);
                self.pin_check_due = true;
                false
            }
            None => false,
        }
    }
}

/// UNLISTENs forwarded to the server take effect as PostgreSQL's do: when
/// the server ran them (CommandComplete `UNLISTEN`, or `DISCARD ALL`,
/// which includes `UNLISTEN *`) and their transaction then committed. A rolled-back or failed one leaves the client listening.
#[derive(Debug, Default)]
pub struct UnlistenFate {
    /// Forwarded, in order; the server has not answered them yet.
    sent: std::collections::VecDeque<Option<String>>,
    /// Run by the server in the transaction under way.
    ran: Vec<Option<String>>,
    /// Since the last ReadyForQuery: an error, or a ROLLBACK tag last.
    failed: bool,
    rolled_back: bool,
}

impl UnlistenFate {
    /// A CommandComplete with `tag`.
    pub fn completed(&mut self, tag: &[u8]) {
        self.rolled_back = tag.starts_with(b"ROLLBACK");
        if (tag.starts_with(b"UNLISTEN") || tag.starts_with(b"DISCARD ALL"))
            && let Some(ch) = self.sent.pop_front()
        {
            self.ran.push(ch);
        }
    }

    /// A (non-fatal) ErrorResponse: the implicit transaction of the
    /// statements since the last ReadyForQuery, if that is where they
    /// ran, rolls back.
    pub fn error(&mut self) {
        self.failed = true;
    }

    /// A ReadyForQuery: at `I`, the transaction is over, committed unless
    /// it failed or ended with ROLLBACK; what committed goes to
    /// `committed`.
    pub fn ready(&mut self, status: TxStatus, committed: &mut Vec<Option<String>>) {
        if status == TxStatus::Idle {
            if self.failed || self.rolled_back {
                self.ran.clear();
            } else {
                committed.append(&mut self.ran);
            }
        }
        self.failed = false;
        self.rolled_back = false;
    }
}

#[cfg(test)]
mod tests;

/// The tracker is its exchange with the server, plus what the client side
/// adds (timing, routing guard, effects).
impl std::ops::Deref for Tracker {
    type Target = Exchange;
    fn deref(&self) -> &Exchange {
        &self.exchange
    }
}

impl std::ops::DerefMut for Tracker {
    fn deref_mut(&mut self) -> &mut Exchange {
        &mut self.exchange
    }
}
