//! The responses a server still owes, in order, so tidepool can drop the
//! answers to messages it injected (a lazy Parse, an LRU Close) and insert
//! answers to client messages it did not forward (a Parse of a statement the
//! server already has, a Close of a client's statement). Pure: no I/O.
//!
//! Invariants: items are pushed in the order messages are sent; after an
//! ErrorResponse every item up to the next Sync is dropped (the server skips
//! those messages), and their undo actions are reported; while the server is
//! skipping, messages before the next Sync owe nothing. The ReadyForQuery
//! messages owed are the queue's own count of its boundaries (Sync, queries,
//! tidepool's queries): nobody keeps it beside the queue.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};

use crate::protocol::BackendTag;

/// What to take back when an owed response never comes (the message failed
/// or was skipped after an error).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Undo {
    /// The server does not have this statement after all.
    pub server_stmt: Option<u64>,
    /// The client's statement of this name does not exist after all.
    pub client_name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owed {
    Parse {
        swallow: bool,
        undo: Undo,
    },
    Bind,
    /// A Bind of a statement tidepool prepared (hash, version it was
    /// prepared in: `pool::Catalog`), so that an error saying it went stale
    /// can name it.
    BindNamed {
        hash: u64,
        version: u64,
    },
    DescribeStatement,
    DescribePortal,
    /// A Describe tidepool sent after preparing statement `hash`, to learn
    /// the row shape it has on this server: its answers are dropped.
    DescribeHidden {
        hash: u64,
    },
    Execute,
    Close {
        swallow: bool,
    },
    Sync,
    /// A simple Query or FunctionCall: everything until ReadyForQuery. If it
    /// fails, `undo` applies.
    UntilReady {
        undo: Option<Undo>,
        failed: bool,
        /// Characters tidepool's rewrite of the query added before the
        /// client's text (`EXECUTE tidepool_…` for `execute p`): error
        /// positions are moved back by this much.
        position_shift: i32,
        /// The statement (hash, version) it runs, for `EXECUTE p`: an
        /// error saying it went stale can name it.
        bound: Option<(u64, u64)>,
    },
    /// A simple query tidepool sent itself: every answer, ReadyForQuery
    /// included, is dropped.
    Internal,
    /// A message tidepool sent so that the server fails at this point, as
    /// PostgreSQL would have on the client's message that tidepool answered
    /// with an error itself (the transaction aborts, the server skips to
    /// Sync). Its ErrorResponse is dropped.
    Abort,
    /// An answer tidepool gives itself when this point of the stream is reached.
    Synthetic {
        bytes: Bytes,
        undo: Undo,
    },
}

impl Owed {
    /// Answered by a ReadyForQuery (which ends its answer).
    #[inline]
    fn is_boundary(&self) -> bool {
        matches!(self, Owed::Sync | Owed::UntilReady { .. } | Owed::Internal)
    }
}

#[derive(Debug, Default)]
pub struct Expect {
    queue: VecDeque<Owed>,
    /// The server hit an error and skips messages until the next Sync.
    skipping: bool,
    undos: Vec<Undo>,
    /// Statements a server parsed successfully (known valid for this pool).
    confirmed: Vec<u64>,
    /// Boundaries (items answered by a ReadyForQuery) in `queue`.
    ready_owed: u32,
    /// Row shapes (statement hash, shape) hidden Describes returned.
    described: Vec<(u64, u64)>,
}

impl Expect {
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Empty again, keeping the allocations for the next transaction.
    pub fn clear(&mut self) {
        self.queue.clear();
        self.skipping = false;
        self.undos.clear();
        self.confirmed.clear();
        self.ready_owed = 0;
        self.described.clear();
    }

    /// ReadyForQuery messages the server still owes (one per Sync, query,
    /// function call and query of tidepool's own in the queue).
    pub fn ready_owed(&self) -> u32 {
        self.ready_owed
    }

    /// True while messages sent now would be skipped by the server.
    pub fn skipping(&self) -> bool {
        self.skipping
    }

    /// Records a message sent (or answered by tidepool) in stream order.
    #[inline]
    pub fn push(&mut self, owed: Owed) {
        if matches!(owed, Owed::Sync) {
            self.skipping = false;
        } else if self.skipping {
            self.forget(owed);
            return;
        }
        if owed.is_boundary() {
            self.ready_owed += 1;
        }
        self.queue.push_back(owed);
    }

    /// How far error positions of the query answered next are off.
    pub fn head_position_shift(&self) -> i32 {
        match self.queue.front() {
            Some(Owed::UntilReady { position_shift, .. }) => *position_shift,
            _ => 0,
        }
    }

    /// The statement (hash, version) whose Bind the server answers next.
    pub fn head_bound_statement(&self) -> Option<(u64, u64)> {
        match self.queue.front() {
            Some(Owed::BindNamed { hash, version }) => Some((*hash, *version)),
            Some(Owed::UntilReady { bound, .. }) => *bound,
            _ => None,
        }
    }

    pub fn head_is_internal(&self) -> bool {
        matches!(self.queue.front(), Some(Owed::Internal))
    }

    /// The head is tidepool's own: an answer it gives itself, or a query it
    /// sent (either stops forwarding).
    pub fn head_is_tidepools(&self) -> bool {
        matches!(
            self.queue.front(),
            Some(Owed::Synthetic { .. } | Owed::Internal)
        )
    }

    pub fn head_is_synthetic(&self) -> bool {
        matches!(self.queue.front(), Some(Owed::Synthetic { .. }))
    }

    /// Moves the answers tidepool owes at the head of the stream into `out`.
    pub fn take_synthetic(&mut self, out: &mut BytesMut) {
        while let Some(Owed::Synthetic { .. }) = self.queue.front() {
            if let Some(Owed::Synthetic { bytes, .. }) = self.pop() {
                out.extend_from_slice(&bytes);
            }
        }
    }

    /// Whether a server message with `tag` answers something tidepool sent on
    /// its own and must not reach the client.
    pub fn swallows(&self, tag: u8) -> bool {
        match (self.queue.front(), BackendTag::from_byte(tag)) {
            (Some(Owed::Parse { swallow, .. }), BackendTag::ParseComplete) => *swallow,
            (Some(Owed::Close { swallow }), BackendTag::CloseComplete) => *swallow,
            (Some(Owed::Abort), BackendTag::ErrorResponse) => true,
            (
                Some(Owed::DescribeHidden { .. }),
                BackendTag::ParameterDescription | BackendTag::RowDescription | BackendTag::NoData,
            ) => true,
            _ => false,
        }
    }

    /// A hidden Describe is still unanswered.
    pub fn describing(&self) -> bool {
        self.queue
            .iter()
            .any(|o| matches!(o, Owed::DescribeHidden { .. }))
    }

    /// Records the row shape in a dropped answer to a hidden Describe
    /// (RowDescription or NoData; the ParameterDescription before it says
    /// nothing about rows), then advances past it.
    pub fn on_hidden_description(&mut self, tag: u8, body: &[u8]) {
        if let Some(Owed::DescribeHidden { hash }) = self.queue.front()
            && matches!(
                BackendTag::from_byte(tag),
                BackendTag::RowDescription | BackendTag::NoData
            )
        {
            self.described
                .push((*hash, crate::server::prepared::row_shape(tag, body)));
        }
        self.on_message(tag);
    }

    /// Row shapes learned since the last call: (statement hash, shape).
    pub fn take_described(&mut self) -> Vec<(u64, u64)> {
        std::mem::take(&mut self.described)
    }

    /// Statement hashes confirmed by a ParseComplete since the last call.
    pub fn take_confirmed(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.confirmed)
    }

    /// Whether errors left statements to undo (most scans: none).
    pub fn has_undos(&self) -> bool {
        !self.undos.is_empty()
    }

    /// Whether undos, confirmed or described statements wait to be taken
    /// (most scans: none of them).
    pub fn has_statement_news(&self) -> bool {
        !self.undos.is_empty() || !self.confirmed.is_empty() || !self.described.is_empty()
    }

    /// Undo actions collected since the last call.
    pub fn take_undos(&mut self) -> Vec<Undo> {
        std::mem::take(&mut self.undos)
    }

    /// Advances past one server message (forwarded or swallowed).
    pub fn on_message(&mut self, tag: u8) {
        self.on_backend(BackendTag::from_byte(tag));
    }

    /// [`Expect::on_message`] for a tag already read.
    pub fn on_backend(&mut self, tag: BackendTag) {
        use BackendTag as T;
        if tag == T::DataRow {
            // The most common message, and never the end of an answer.
            return;
        }
        let head = self.queue.front_mut();
        let done = match (head, tag) {
            (_, T::NoticeResponse | T::NotificationResponse | T::ParameterStatus) => false,
            (Some(Owed::UntilReady { failed, .. }), T::ErrorResponse) => {
                *failed = true;
                false
            }
            (Some(Owed::Sync), T::ErrorResponse) => false,
            (_, T::ErrorResponse) => {
                self.fail_until_sync();
                return;
            }
            (_, T::ReadyForQuery) => {
                self.pop_through_boundary();
                return;
            }
            (Some(Owed::Parse { .. }), T::ParseComplete)
            | (Some(Owed::Bind | Owed::BindNamed { .. }), T::BindComplete)
            | (Some(Owed::Close { .. }), T::CloseComplete)
            | (
                Some(Owed::DescribeStatement | Owed::DescribePortal | Owed::DescribeHidden { .. }),
                T::RowDescription | T::NoData,
            )
            | (
                Some(Owed::Execute),
                T::CommandComplete | T::EmptyQueryResponse | T::PortalSuspended,
            ) => true,
            _ => false,
        };
        if done
            && let Some(Owed::Parse {
                undo:
                    Undo {
                        server_stmt: Some(h),
                        ..
                    },
                ..
            }) = self.pop()
        {
            self.confirmed.push(h);
        }
    }

    /// The head failed: it and everything up to the next Sync will not be
    /// answered.
    fn fail_until_sync(&mut self) {
        if self.queue.is_empty() {
            // Nothing of the client's failed (an error out of turn): the
            // server has nothing to skip for it.
            return;
        }
        while let Some(front) = self.queue.front() {
            if matches!(front, Owed::Sync) {
                return;
            }
            if let Some(owed) = self.pop() {
                self.forget(owed);
            }
        }
        self.skipping = true;
    }

    /// Takes the head, keeping the count of boundaries.
    #[inline]
    fn pop(&mut self) -> Option<Owed> {
        let owed = self.queue.pop_front()?;
        if owed.is_boundary() {
            self.ready_owed -= 1;
        }
        Some(owed)
    }

    /// An item whose answers will never come (the server skips it).
    fn forget(&mut self, owed: Owed) {
        match owed {
            Owed::Parse { undo, .. } | Owed::Synthetic { undo, .. } => self.undos.push(undo),
            Owed::UntilReady { undo, .. } => self.undos.extend(undo),
            _ => {}
        }
    }

    fn pop_through_boundary(&mut self) {
        while let Some(item) = self.pop() {
            match item {
                Owed::Sync | Owed::Internal => return,
                Owed::UntilReady { undo, failed, .. } => {
                    if let (Some(undo), true) = (undo, failed) {
                        self.undos.push(undo);
                    }
                    return;
                }
                Owed::Parse { undo, .. } | Owed::Synthetic { undo, .. } => self.undos.push(undo),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn undo(name: &str) -> Undo {
        Undo {
            server_stmt: None,
            client_name: Some(name.into()),
        }
    }

    #[test]
    fn synthetic_answers_come_out_in_stream_order() {
        let mut e = Expect::default();
        e.push(Owed::Bind);
        e.push(Owed::Synthetic {
            bytes: Bytes::from_static(b"1"),
            undo: undo("s1"),
        });
        e.push(Owed::Sync);
        assert!(!e.head_is_synthetic());
        e.on_message(b'2');
        assert!(e.head_is_synthetic());
        let mut out = BytesMut::new();
        e.take_synthetic(&mut out);
        assert_eq!(&out[..], b"1");
        e.on_message(b'Z');
        assert!(e.is_empty());
        assert!(e.take_undos().is_empty());
    }

    #[test]
    fn the_error_tidepool_provoked_is_swallowed_and_skips_to_sync() {
        let mut e = Expect::default();
        e.push(Owed::Execute);
        e.push(Owed::Synthetic {
            bytes: Bytes::from_static(b"E"),
            undo: Undo::default(),
        });
        e.push(Owed::Abort);
        e.push(Owed::Sync);
        e.on_message(b'C');
        let mut out = BytesMut::new();
        e.take_synthetic(&mut out);
        assert_eq!(&out[..], b"E");
        // The server's own error for the probe does not reach the client...
        assert!(e.swallows(b'E'));
        e.on_message(b'E');
        // ...and only the Sync is owed now (the server skips to it).
        assert!(!e.swallows(b'Z'));
        assert!(!e.head_is_tidepools());
        e.on_message(b'Z');
        assert!(e.is_empty());
    }

    #[test]
    fn injected_parse_complete_is_swallowed() {
        let mut e = Expect::default();
        e.push(Owed::Parse {
            swallow: true,
            undo: Undo::default(),
        });
        e.push(Owed::Bind);
        assert!(e.swallows(b'1'));
        e.on_message(b'1');
        assert!(!e.swallows(b'2'));
    }

    #[test]
    fn an_error_drops_everything_until_sync_with_undos() {
        let mut e = Expect::default();
        e.push(Owed::Parse {
            swallow: false,
            undo: undo("a"),
        });
        e.push(Owed::Synthetic {
            bytes: Bytes::new(),
            undo: undo("b"),
        });
        e.push(Owed::Execute);
        e.push(Owed::Sync);
        e.push(Owed::Bind);
        e.on_message(b'E');
        assert_eq!(e.take_undos(), vec![undo("a"), undo("b")]);
        e.on_message(b'Z');
        assert_eq!(e.queue.front(), Some(&Owed::Bind));
    }

    #[test]
    fn after_an_error_without_sync_new_messages_owe_nothing_until_sync() {
        let mut e = Expect::default();
        e.push(Owed::Execute);
        e.on_message(b'E');
        assert!(e.skipping());
        e.push(Owed::Parse {
            swallow: false,
            undo: undo("late"),
        });
        assert!(e.is_empty());
        assert_eq!(e.take_undos(), vec![undo("late")]);
        e.push(Owed::Sync);
        assert!(!e.skipping());
        e.on_message(b'Z');
        assert!(e.is_empty());
    }

    #[test]
    fn errors_inside_a_simple_query_wait_for_ready() {
        let mut e = Expect::default();
        e.push(Owed::UntilReady {
            undo: None,
            failed: false,
            position_shift: 0,
            bound: None,
        });
        e.on_message(b'T');
        e.on_message(b'E');
        assert!(!e.is_empty());
        e.on_message(b'Z');
        assert!(e.is_empty());
    }

    #[test]
    fn describe_statement_ends_at_row_description_or_no_data() {
        let mut e = Expect::default();
        e.push(Owed::DescribeStatement);
        e.on_message(b't');
        assert!(!e.is_empty());
        e.on_message(b'n');
        assert!(e.is_empty());
    }
}

#[cfg(test)]
mod proptests {
    use proptest::prelude::*;

    use super::*;

    /// What may be pushed; each push gets a unique id, carried in its undo
    /// (and a Parse's statement hash, and a synthetic answer's bytes).
    #[derive(Debug, Clone, Copy)]
    enum Push {
        Parse { swallow: bool },
        Bind,
        DescribeStatement,
        DescribePortal,
        DescribeHidden,
        Execute,
        Close { swallow: bool },
        Sync,
        UntilReady,
        Internal,
        Abort,
        Synthetic,
    }

    #[derive(Debug, Clone, Copy)]
    enum Op {
        Push(Push),
        /// A server message with this tag.
        Server(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        let push = prop_oneof![
            any::<bool>().prop_map(|swallow| Push::Parse { swallow }),
            Just(Push::Bind),
            Just(Push::DescribeStatement),
            Just(Push::DescribePortal),
            Just(Push::DescribeHidden),
            Just(Push::Execute),
            any::<bool>().prop_map(|swallow| Push::Close { swallow }),
            Just(Push::Sync),
            Just(Push::UntilReady),
            Just(Push::Internal),
            Just(Push::Abort),
            Just(Push::Synthetic),
        ];
        // Every backend tag `on_message` tells apart, and one it does not.
        let tag = prop::sample::select(&b"123tnTDCIsEZNSAGHWcdx"[..]);
        prop_oneof![push.prop_map(Op::Push), tag.prop_map(Op::Server)]
    }

    fn undo(id: u64) -> Undo {
        Undo {
            server_stmt: Some(id),
            client_name: Some(id.to_string()),
        }
    }

    fn is_boundary(o: &Owed) -> bool {
        matches!(o, Owed::Sync | Owed::UntilReady { .. } | Owed::Internal)
    }

    /// Ids of the pushes still owed.
    fn queued_ids(e: &Expect) -> Vec<u64> {
        e.queue
            .iter()
            .filter_map(|o| match o {
                Owed::Parse { undo, .. } | Owed::Synthetic { undo, .. } => undo.server_stmt,
                Owed::UntilReady { undo, .. } => undo.as_ref().and_then(|u| u.server_stmt),
                _ => None,
            })
            .collect()
    }

    proptest! {
        /// Random pushes and server messages, handled the way the session
        /// and `Tracker` do (tidepool's own answers taken out before the
        /// server's next message, every answer to an internal query but its
        /// ReadyForQuery dropped, swallowed completions passed to
        /// `on_message`, one ReadyForQuery owed per Sync, query and internal
        /// query), never panic and keep:
        /// - the ReadyForQuery count the queue keeps equal to the boundaries
        ///   it holds;
        /// - `skipping` only with an empty queue;
        /// - every Parse and synthetic answer accounted for exactly once:
        ///   still queued, confirmed, answered or undone;
        /// - a query's undo reported at most once;
        /// - synthetic answers in the order they were pushed.
        #[test]
        fn owed_answers_stay_consistent(ops in prop::collection::vec(op(), 0..64)) {
            let mut e = Expect::default();
            let mut next_id = 0u64;
            // Ids of Parse and Synthetic pushes, and of queries, by outcome.
            let mut tracked: Vec<u64> = Vec::new();
            let mut queries: Vec<u64> = Vec::new();
            let mut undone: Vec<u64> = Vec::new();
            let mut confirmed: Vec<u64> = Vec::new();
            let mut answered: Vec<u64> = Vec::new();
            for op in ops {
                match op {
                    Op::Push(p) => {
                        next_id += 1;
                        let id = next_id;
                        let owed = match p {
                            Push::Parse { swallow } => {
                                tracked.push(id);
                                Owed::Parse { swallow, undo: undo(id) }
                            }
                            Push::Bind => Owed::Bind,
                            Push::DescribeStatement => Owed::DescribeStatement,
                            Push::DescribePortal => Owed::DescribePortal,
                            Push::DescribeHidden => Owed::DescribeHidden { hash: id },
                            Push::Execute => Owed::Execute,
                            Push::Close { swallow } => Owed::Close { swallow },
                            Push::Sync => Owed::Sync,
                            Push::UntilReady => {
                                queries.push(id);
                                Owed::UntilReady { undo: Some(undo(id)), failed: false, position_shift: 0, bound: None }
                            }
                            Push::Internal => Owed::Internal,
                            Push::Abort => Owed::Abort,
                            Push::Synthetic => {
                                tracked.push(id);
                                Owed::Synthetic {
                                    bytes: Bytes::from(id.to_be_bytes().to_vec()),
                                    undo: undo(id),
                                }
                            }
                        };
                        e.push(owed);
                    }
                    Op::Server(tag) => {
                        let mut out = BytesMut::new();
                        e.take_synthetic(&mut out);
                        for id in out.chunks(8) {
                            answered.push(u64::from_be_bytes(id.try_into().expect("8 bytes")));
                        }
                        prop_assert!(!e.head_is_synthetic());
                        let ready = tag == b'Z';
                        if e.head_is_internal() {
                            if ready {
                                e.on_message(tag);
                            }
                        } else if e.swallows(tag) {
                            e.on_hidden_description(tag, &[]);
                        } else {
                            e.on_message(tag);
                        }
                    }
                }
                confirmed.extend(e.take_confirmed());
                undone.extend(e.take_undos().into_iter().filter_map(|u| {
                    // Both halves of an undo name the same push.
                    assert_eq!(u.client_name, u.server_stmt.map(|s| s.to_string()));
                    u.server_stmt
                }));

                let boundaries = e.queue.iter().filter(|o| is_boundary(o)).count();
                prop_assert_eq!(e.ready_owed() as usize, boundaries, "ReadyForQuery owed vs queue {:?}", e.queue);
                prop_assert!(!e.skipping() || e.is_empty(), "skipping with {:?} queued", e.queue);
                for (hash, _) in e.take_described() {
                    prop_assert!(hash <= next_id, "a shape for a describe never sent");
                }
                let mut seen: Vec<u64> = queued_ids(&e)
                    .into_iter()
                    .filter(|id| tracked.contains(id))
                    .chain(confirmed.iter().copied())
                    .chain(answered.iter().copied())
                    .chain(undone.iter().copied().filter(|id| tracked.contains(id)))
                    .collect();
                seen.sort_unstable();
                prop_assert_eq!(&seen, &tracked, "Parse/synthetic ids lost or doubled");
                let mut q: Vec<u64> = undone.iter().copied().filter(|id| queries.contains(id)).collect();
                let n = q.len();
                q.sort_unstable();
                q.dedup();
                prop_assert_eq!(q.len(), n, "a query undone twice");
                prop_assert!(answered.windows(2).all(|w| w[0] < w[1]), "synthetic answers out of order");
            }
        }
    }
}
