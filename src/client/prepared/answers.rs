//! The answers tidepool gives for a client's statements itself: PostgreSQL's
//! own errors for them (a duplicate or unknown name, a failed transaction,
//! a refused feature, a statement whose result changed) and the completions
//! it owes in their place in the stream; undoing what a failed Parse
//! promised.

use super::*;
use crate::error::SqlState;

/// SQLSTATEs of the errors PostgreSQL gives for these cases.
const DUPLICATE_PSTATEMENT: &str = SqlState::DUPLICATE_PREPARED_STATEMENT.0;
pub(super) const IN_FAILED_TRANSACTION: &str = SqlState::IN_FAILED_TRANSACTION.0;
pub(super) const UNDEFINED_PSTATEMENT: &str = SqlState::UNDEFINED_PREPARED_STATEMENT.0;
pub(super) const FEATURE_NOT_SUPPORTED: &str = SqlState::FEATURE_NOT_SUPPORTED.0;

pub(super) fn synthetic(t: &mut Tracker, bytes: BytesMut, undo: Undo) {
    t.expect.push(Owed::Synthetic {
        bytes: bytes.freeze(),
        undo,
    });
}

pub(super) fn simple(tag: BackendTag) -> BytesMut {
    let mut b = BytesMut::with_capacity(5);
    write::message(&mut b, tag.byte(), |_| {});
    b
}

/// How many more characters tidepool's rewrite of `client_sql` puts before
/// `rest` (the text after the statement's name, kept as it is) than the
/// client's own text does: error positions come back moved by this much.
pub(super) fn position_shift(client_sql: &str, rest: &str, rewritten_prefix: usize) -> i32 {
    let client_prefix = client_sql
        .rfind(rest)
        .map_or(0, |at| client_sql[..at].chars().count());
    rewritten_prefix as i32 - client_prefix as i32
}

/// PostgreSQL's answer to a statement in a failed transaction.
pub(super) fn aborted() -> BytesMut {
    let mut out = BytesMut::new();
    write::error_response(
        &mut out,
        "ERROR",
        IN_FAILED_TRANSACTION,
        "current transaction is aborted, commands ignored until end of transaction block",
    );
    out
}

/// PostgreSQL's answer to a use of a statement whose result changed: the
/// server's own ErrorResponse when one was seen (drivers recognise it by
/// its fields, asyncpg by the routine), else one with the same fields.
pub(super) fn plan_changed(catalog: &Catalog) -> BytesMut {
    let mut out = BytesMut::new();
    match catalog.plan_changed_error() {
        Some(body) => write::message(&mut out, BackendTag::ErrorResponse.byte(), |b| {
            b.put_slice(&body)
        }),
        None => write::message(&mut out, BackendTag::ErrorResponse.byte(), |b| {
            for (field, value) in [
                (b'S', "ERROR"),
                (b'V', "ERROR"),
                (b'C', FEATURE_NOT_SUPPORTED),
                (b'M', crate::client::txn::PLAN_CHANGED),
                (b'F', "plancache.c"),
                (b'R', "RevalidateCachedQuery"),
            ] {
                b.put_u8(field);
                b.put_slice(value.as_bytes());
                b.put_u8(0);
            }
            b.put_u8(0);
        }),
    }
    out
}

/// PostgreSQL's answer to a second statement of the same name.
pub(super) fn duplicate(name: &str) -> BytesMut {
    let mut out = BytesMut::new();
    write::error_response(
        &mut out,
        "ERROR",
        DUPLICATE_PSTATEMENT,
        &format!("prepared statement \"{name}\" already exists"),
    );
    out
}

pub(super) fn undefined(name: &str) -> BytesMut {
    let mut out = BytesMut::new();
    write::error_response(
        &mut out,
        "ERROR",
        UNDEFINED_PSTATEMENT,
        &format!("prepared statement \"{name}\" does not exist"),
    );
    out
}

pub(super) fn refused(feature: &str) -> BytesMut {
    let mut out = BytesMut::new();
    write::error_response(
        &mut out,
        "ERROR",
        FEATURE_NOT_SUPPORTED,
        &format!(
            "{feature} is not supported in transaction pooling (session_features = \"error\" for this database)"
        ),
    );
    out
}

/// Applies undo actions for Parses that failed or were skipped.
pub fn apply_undos(
    undos: Vec<Undo>,
    statements: &mut HashMap<String, Arc<Statement>>,
    prepared: &mut ServerStatements,
) {
    for u in undos {
        if let Some(h) = u.server_stmt {
            prepared.remove(h);
        }
        if let Some(name) = u.client_name {
            statements.remove(&name);
        }
    }
}
