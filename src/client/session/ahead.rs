//! Reading ahead through the extended-protocol batch at the head of a
//! client's buffer before any of it goes to a replica.
//!
//! The messages up to a Sync are one implicit transaction. Once part of a
//! batch ran on a replica, a write later in it has nowhere to go: the replica
//! must not run it, and what already ran there cannot move (PostgreSQL
//! answers nothing before the Sync, so the client would wait forever). So a
//! batch goes to a replica only when all of it, through its Sync, is already
//! here and every statement in it may run there.
//!
//! Invariant: [`Ahead::ReplicaMay`] only for a whole batch whose every
//! statement passed the caller's test; anything not read to the end (a
//! message not all here, a Flush or another message before the Sync, a
//! statement whose text is unknown here) is [`Ahead::NotAllHere`].

use std::collections::HashMap;
use std::sync::Arc;

use crate::protocol::FrontendTag;
use crate::protocol::messages::Body;
use crate::protocol::scan::checked_len;
use crate::server::prepared::Statement;

/// What the batch at the head of the buffer allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ahead {
    /// Not an extended-protocol batch (a simple Query, or nothing yet).
    NotABatch,
    /// All here through its Sync, and every statement may run on a replica.
    ReplicaMay,
    /// A statement in it must run on the primary.
    NeedsPrimary,
    /// Not all of it is here (or it flushes before its Sync): only the
    /// primary can take it without knowing the rest.
    NotAllHere,
}

/// Whether `b` starts with a message of the extended protocol.
fn starts_batch(b: &[u8]) -> bool {
    matches!(
        b.first().map(|&t| FrontendTag::from_byte(t)),
        Some(
            FrontendTag::Parse
                | FrontendTag::Bind
                | FrontendTag::Describe
                | FrontendTag::Execute
                | FrontendTag::Close
                | FrontendTag::Flush
                | FrontendTag::Sync
        )
    )
}

/// Reads the batch at the head of `b` (messages up to `limit` bytes), asking
/// `may_run` of each statement it would run (a Parse's text, or a named
/// statement's for a Bind).
pub(super) fn batch(
    b: &[u8],
    limit: usize,
    statements: &HashMap<String, Arc<Statement>>,
    mut may_run: impl FnMut(&str) -> bool,
) -> Ahead {
    if !starts_batch(b) {
        return Ahead::NotABatch;
    }
    // Statements parsed earlier in this batch (the unnamed one is ""): a
    // Bind of one was checked at its Parse.
    let mut parsed: Vec<&[u8]> = Vec::new();
    let mut rest = b;
    loop {
        if rest.len() < 5 {
            return Ahead::NotAllHere;
        }
        let Ok(total) = checked_len(rest[0], &rest[1..5], limit) else {
            return Ahead::NotAllHere;
        };
        let Some(body) = rest.get(5..total) else {
            return Ahead::NotAllHere;
        };
        let mut body = Body::new(body, "message");
        match FrontendTag::from_byte(rest[0]) {
            FrontendTag::Sync => return Ahead::ReplicaMay,
            FrontendTag::Parse => {
                let (Ok(name), Ok(sql)) = (body.cbytes(), body.cbytes()) else {
                    return Ahead::NotAllHere;
                };
                // Text in another client encoding is not classified.
                let Ok(sql) = std::str::from_utf8(sql) else {
                    return Ahead::NeedsPrimary;
                };
                if !may_run(sql) {
                    return Ahead::NeedsPrimary;
                }
                parsed.push(name);
            }
            FrontendTag::Bind => {
                let (Ok(_portal), Ok(name)) = (body.cbytes(), body.cbytes()) else {
                    return Ahead::NotAllHere;
                };
                if !parsed.contains(&name) {
                    let known = std::str::from_utf8(name)
                        .ok()
                        .and_then(|n| statements.get(n))
                        .filter(|s| !s.foreign && !name.is_empty());
                    match known {
                        Some(s) if may_run(&s.query) => {}
                        Some(_) => return Ahead::NeedsPrimary,
                        None => return Ahead::NotAllHere,
                    }
                }
            }
            FrontendTag::Describe | FrontendTag::Execute | FrontendTag::Close => {}
            _ => return Ahead::NotAllHere,
        }
        rest = &rest[total..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{BufMut, BytesMut};

    fn msg(out: &mut BytesMut, tag: u8, body: &[u8]) {
        out.put_u8(tag);
        out.put_i32(body.len() as i32 + 4);
        out.put_slice(body);
    }
    fn parse(out: &mut BytesMut, name: &str, sql: &str) {
        msg(out, b'P', format!("{name}\0{sql}\0\0\0").as_bytes());
    }
    fn bind(out: &mut BytesMut, name: &str) {
        msg(out, b'B', format!("\0{name}\0\0\0\0\0\0\0").as_bytes());
    }
    fn exec(out: &mut BytesMut) {
        msg(out, b'E', b"\0\0\0\0\0");
    }
    fn reads(sql: &str) -> bool {
        sql.starts_with("select")
    }
    fn ahead(b: &[u8]) -> Ahead {
        batch(b, 1 << 20, &HashMap::new(), reads)
    }

    #[test]
    fn a_batch_goes_to_a_replica_only_whole_and_all_reads() {
        let mut b = BytesMut::new();
        parse(&mut b, "", "select 1");
        bind(&mut b, "");
        exec(&mut b);
        let reads_only = b.clone();
        assert_eq!(ahead(&reads_only), Ahead::NotAllHere, "no Sync yet");
        let mut flushed = reads_only.clone();
        msg(&mut flushed, b'H', b"");
        assert_eq!(
            ahead(&flushed),
            Ahead::NotAllHere,
            "a Flush before the Sync"
        );
        let mut synced = reads_only.clone();
        msg(&mut synced, b'S', b"");
        assert_eq!(ahead(&synced), Ahead::ReplicaMay);
        // Cut anywhere before the Sync's end: never ReplicaMay.
        for cut in 0..synced.len() {
            assert_ne!(ahead(&synced[..cut]), Ahead::ReplicaMay, "cut at {cut}");
        }

        let mut write = reads_only.clone();
        parse(&mut write, "", "insert into t values (1)");
        bind(&mut write, "");
        exec(&mut write);
        assert_eq!(ahead(&write), Ahead::NeedsPrimary, "before its Sync came");
        msg(&mut write, b'S', b"");
        assert_eq!(ahead(&write), Ahead::NeedsPrimary);

        // After the Sync, another batch is another transaction.
        let mut two = synced.clone();
        parse(&mut two, "", "insert into t values (1)");
        assert_eq!(ahead(&two), Ahead::ReplicaMay);

        let mut q = BytesMut::new();
        msg(&mut q, b'Q', b"select 1\0");
        assert_eq!(ahead(&q), Ahead::NotABatch);
        assert_eq!(ahead(b""), Ahead::NotABatch);
    }

    #[test]
    fn binds_are_judged_by_their_statements() {
        let mut b = BytesMut::new();
        parse(&mut b, "s1", "select 1");
        bind(&mut b, "s1");
        exec(&mut b);
        msg(&mut b, b'S', b"");
        assert_eq!(ahead(&b), Ahead::ReplicaMay, "parsed in the same batch");

        let mut unknown = BytesMut::new();
        bind(&mut unknown, "s9");
        msg(&mut unknown, b'S', b"");
        assert_eq!(ahead(&unknown), Ahead::NotAllHere, "text unknown here");
        let mut unnamed = BytesMut::new();
        bind(&mut unnamed, "");
        msg(&mut unnamed, b'S', b"");
        assert_eq!(
            ahead(&unnamed),
            Ahead::NotAllHere,
            "an earlier unnamed statement"
        );

        let mut foreign = BytesMut::new();
        msg(&mut foreign, b'P', b"\0select '\xe9'\0\0\0");
        msg(&mut foreign, b'S', b"");
        assert_eq!(ahead(&foreign), Ahead::NeedsPrimary);

        let mut big = BytesMut::new();
        parse(&mut big, "", &format!("select '{}'", "x".repeat(100)));
        msg(&mut big, b'S', b"");
        assert_eq!(batch(&big, 64, &HashMap::new(), reads), Ahead::NotAllHere);
    }
}
