//! The server → client inspector: ReadyForQuery and transaction status,
//! ParameterStatus, COPY state, errors (stale statements, a FATAL, a
//! replica's refusal of a write), and where tidepool must insert or drop an
//! answer.

use super::*;

/// Whether a server error says a statement's result no longer fits the
/// catalog (a migration changed it).
pub fn plan_changed(e: &ErrorFields) -> bool {
    e.code == crate::error::SqlState::CACHED_PLAN_CHANGED.0 && e.message == PLAN_CHANGED
}

/// How an error text names one of tidepool's statements (`"tidepool_` and
/// its hash in hex).
pub const INTERNAL_NAME_MARK: &[u8] = b"\"tidepool_";

/// A replica refusing a write: `cannot execute … in a read-only transaction`.
pub const READ_ONLY_TRANSACTION: &str = crate::error::SqlState::READ_ONLY_TRANSACTION.0;

/// PostgreSQL's words for a prepared statement whose result type changed.
pub const PLAN_CHANGED: &str = "cached plan must not change result type";

/// Inspector for server → client bytes. ParameterStatus values are collected
/// into `params` for the session to apply. It stops where tidepool must
/// insert an answer of its own or drop one the client did not ask for.
pub struct ServerSide<'a> {
    pub(super) t: &'a mut Tracker,
    pub(super) params: &'a mut Vec<(String, String)>,
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
            BackendTag::CopyInResponse
            | BackendTag::CopyOutResponse
            | BackendTag::CopyBothResponse => t.misroute.disarm(),
            BackendTag::EmptyQueryResponse | BackendTag::PortalSuspended => {
                t.timing.statement_end();
            }
            _ => {}
        }
        // Only ReadyForQuery reads its body, and it is inspected.
        let _ = t.exchange.on_server(tag_kind, &[]);
        Step::Pass
    }

    fn inspect(&mut self, tag: u8, body: &[u8]) -> Result<Step, ProtocolError> {
        let t = &mut *self.t;
        let kind = BackendTag::from_byte(tag);
        match kind {
            BackendTag::ReadyForQuery => {
                let status = ready_for_query(body)?;
                if status == TxStatus::Idle && std::mem::take(&mut t.ddl) {
                    t.schema_changed = true;
                }
                t.misroute.disarm();
                t.timing.ready(status);
                if t.policy.listen_shared {
                    t.unlisten_fate.ready(status, &mut t.unlistens);
                    if let Some((hub, id)) = &t.hub {
                        for ch in &t.unlistens {
                            hub.unlisten(*id, ch.as_deref());
                        }
                    }
                }
            }
            BackendTag::CommandComplete => {
                t.timing.command_complete(body);
                if t.policy.listen_shared {
                    t.unlisten_fate.completed(body);
                }
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
                    || (t.expect.head_position_shift() != 0 && !fields.position.is_empty())
                    || (t.timeout_cancel.is_some()
                        && fields.code == crate::error::SqlState::QUERY_CANCELED.0);
                if !std::mem::take(&mut t.error_renamed) && rewrite {
                    // It names one of tidepool's statements, or points into
                    // tidepool's rewrite of the query: the session puts the
                    // client's name and position in and scans it again.
                    t.rename_error = true;
                    return Ok(Step::Stop);
                }
                let serializable =
                    t.replica_guard.is_some() && fields.is_standby_serializable_refusal();
                t.serializable_refused |= serializable;
                if let Misroute::Armed(replay) = &mut t.misroute {
                    t.misroute = if fields.code == READ_ONLY_TRANSACTION || serializable {
                        Misroute::Fired(std::mem::take(replay))
                    } else {
                        Misroute::Off
                    };
                }
                if let Some((hash, version)) = t.expect.head_bound_statement() {
                    if plan_changed(&fields) {
                        t.stale.push((hash, version, body.to_vec()));
                    } else if fields.code == crate::error::SqlState::INTERNAL.0
                        && fields.message.starts_with("cache lookup failed")
                    {
                        t.broken.push((hash, version));
                    }
                }
                t.timing.error();
                if t.policy.listen_shared {
                    t.unlisten_fate.error();
                }
            }
            _ => {}
        }
        t.exchange.on_server(kind, body)?;
        Ok(Step::Pass)
    }
}
