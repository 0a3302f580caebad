//! The two scans of the forwarding loop: client → server (`ClientIn`:
//! named statements renamed, refused features answered, what an error
//! drops) and server → client (`scan_server`: answers tidepool owes or
//! swallows, errors renamed back to the client's names).
//!
//! Invariant: each moves whole messages only, and leaves its input at a
//! message boundary or with the head of one not yet complete.

use super::ahead::Ahead;
use super::*;
use crate::client::txn::Batch;

/// Appends `chunk` to `out` without copying when `out` is empty.
pub(super) fn append(out: &mut BytesMut, chunk: BytesMut) {
    if out.is_empty() {
        *out = chunk;
    } else {
        out.unsplit(chunk);
    }
}

/// The client → server half of forwarding.
pub(super) struct ClientIn<'a> {
    pub(super) statements: &'a mut HashMap<String, Arc<Statement>>,
    pub(super) counters: &'a Counters,
    pub(super) catalog: &'a crate::pool::Catalog,
    pub(super) cap: usize,
    pub(super) shapes: &'a Fingerprints,
}

impl ClientIn<'_> {
    /// Moves what can be sent from `buf` to `to_server`, handling the
    /// messages the scanner stops at (named statements, refused features,
    /// messages dropped after an error), and puts answers tidepool now owes
    /// at the head of the stream into `to_client`.
    pub(super) fn scan(
        &mut self,
        buf: &mut BytesMut,
        cscan: &mut Scanner,
        t: &mut Tracker,
        prepared: &mut ServerStatements,
        to_server: &mut BytesMut,
        to_client: &mut BytesMut,
    ) -> Result<(), ProtocolError> {
        loop {
            if t.replica_guard.is_some()
                && t.status == TxStatus::Idle
                && t.batch == Batch::Synced
                && !cscan.mid_message()
                && !matches!(
                    super::ahead::batch(buf, usize::MAX, self.statements, |sql| !t
                        .needs_primary(sql, false)),
                    Ahead::NotABatch | Ahead::ReplicaMay
                )
            {
                // A batch the replica may not take whole: it waits, unsent,
                // for the primary (see `ahead`).
                t.reroute = true;
                break;
            }
            let s = cscan.scan(buf, &mut t.client_side(Some(self.shapes)))?;
            t.timing.delta.received += s.forward as u64;
            let chunk = buf.split_to(s.forward);
            if let crate::client::txn::Misroute::Armed(replay) = &mut t.misroute {
                if replay.len() + chunk.len() > crate::client::txn::MISROUTE_HOLD {
                    t.misroute = crate::client::txn::Misroute::Off;
                } else {
                    replay.extend_from_slice(&chunk);
                }
            }
            append(to_server, chunk);
            if !s.stopped || t.terminated || t.reroute {
                break;
            }
            let total = checked_len(buf[0], &buf[1..5], usize::MAX)?;
            let msg = buf.split_to(total);
            t.timing.delta.received += total as u64;
            // tidepool rewrites or answers this one itself: no replay.
            t.misroute.give_up();
            Handler {
                statements: self.statements,
                prepared,
                t,
                to_server,
                counters: self.counters,
                catalog: self.catalog,
                cap: self.cap,
                shapes: Some(self.shapes),
            }
            .handle(msg[0], &msg)?;
            if t.batch == Batch::Held {
                // The message waits for the server's answer; it is handed
                // over again then, and counted then.
                t.timing.delta.received -= total as u64;
                let mut msg = msg;
                msg.unsplit(std::mem::take(buf));
                *buf = msg;
                break;
            }
        }
        t.expect.take_synthetic(to_client);
        if t.expect.has_undos() {
            apply_undos(t.expect.take_undos(), self.statements, prepared);
        }
        Ok(())
    }
}

/// The server → client half: forwards what may pass, drops answers to
/// tidepool's own messages, inserts tidepool's answers in order.
pub(super) fn scan_server(
    sbuf: &mut BytesMut,
    sscan: &mut Scanner,
    t: &mut Tracker,
    changed: &mut Vec<(String, String)>,
    to_client: &mut BytesMut,
    statements: &HashMap<String, Arc<Statement>>,
) -> Result<(), ProtocolError> {
    loop {
        let s = sscan.scan(sbuf, &mut t.server_side(changed))?;
        append(to_client, sbuf.split_to(s.forward));
        if !s.stopped || t.server_fatal.is_some() {
            if !sscan.mid_message() && t.server_fatal.is_none() {
                // Answers tidepool owes right after the last server message
                // (an error it answered for a query the client sent before
                // this answer was over) go now: no server message may ever
                // come to carry them.
                t.expect.take_synthetic(to_client);
            }
            return Ok(());
        }
        if std::mem::take(&mut t.rename_error) {
            // An error naming tidepool's statement: the client's own name
            // goes in, and the message is scanned again as it now reads.
            let total = checked_len(sbuf[0], &sbuf[1..5], SERVER_MESSAGE_LIMIT)?;
            let msg = sbuf.split_to(total);
            let mut renamed = BytesMut::with_capacity(total + sbuf.len());
            write::message(&mut renamed, msg[0], |b| {
                b.put_slice(&rewrite_error(
                    &msg[5..],
                    statements,
                    t.expect.head_position_shift(),
                    t.timeout_cancel.as_deref(),
                ))
            });
            renamed.extend_from_slice(sbuf);
            *sbuf = renamed;
            t.error_renamed = true;
            continue;
        }
        if t.expect.head_is_synthetic() {
            t.expect.take_synthetic(to_client);
            continue;
        }
        if t.expect.head_is_internal() {
            // An answer to tidepool's own query: drop it whole.
            if sbuf.len() < 5 {
                return Ok(());
            }
            let total = checked_len(sbuf[0], &sbuf[1..5], SERVER_MESSAGE_LIMIT)?;
            if sbuf.len() < total {
                return Ok(());
            }
            let msg = sbuf.split_to(total);
            if msg[0] == crate::protocol::BackendTag::ReadyForQuery.byte() {
                t.status = crate::protocol::messages::ready_for_query(&msg[5..])?;
                t.expect.on_message(msg[0]);
            } else if msg[0] == crate::protocol::BackendTag::ErrorResponse.byte() {
                tracing::debug!("tidepool's own PREPARE failed on the server");
            }
            continue;
        }
        if sbuf.len() >= 5 && t.expect.swallows(sbuf[0]) {
            use crate::protocol::BackendTag as B;
            let tag = sbuf[0];
            let kind = B::from_byte(tag);
            let total = match kind {
                // The server failing where tidepool made it fail, and the
                // answers to a hidden Describe.
                B::ErrorResponse | B::ParameterDescription | B::RowDescription | B::NoData => {
                    checked_len(tag, &sbuf[1..5], SERVER_MESSAGE_LIMIT)?
                }
                _ if checked_len(tag, &sbuf[1..5], 5)? != 5 => {
                    return Err(ProtocolError::Malformed("ParseComplete/CloseComplete"));
                }
                _ => 5,
            };
            if sbuf.len() < total {
                return Ok(());
            }
            let msg = sbuf.split_to(total);
            t.expect.on_hidden_description(tag, &msg[5..]);
            continue;
        }
        return Ok(());
    }
}
