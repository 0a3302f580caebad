//! What one checked-out server owes its client, and whether it may be given
//! back: the owed-answers queue (`expect`, which also counts the
//! ReadyForQuery messages owed), the state of the client's extended-query
//! batch, COPY, and the last transaction status. Pure: no I/O. The session's
//! inspectors feed it every message both ways (`on_client`, `on_server`),
//! and every path asks it the one release verdict.
//!
//! Invariant: `verdict` says Reuse only when nothing is owed, nothing is
//! unsynced, no COPY runs and the server said it is idle (property-tested
//! over any interleaving of messages in `client::txn`'s tests).

use crate::protocol::messages::ready_for_query;
use crate::protocol::{BackendTag, FrontendTag, ProtocolError, TxStatus};
use crate::server::expect::{Expect, Owed};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Copy {
    #[default]
    None,
    In,
    Out,
    Both,
}

/// Where the client's extended-query batch stands (one state, not three
/// flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Batch {
    /// Nothing sent since the last Sync (or none at all).
    Synced,
    /// Extended-query messages sent, their Sync not yet.
    Open,
    /// Open, and the client's next message waits, unread, until a statement
    /// prepared for it was described (its row shape compared).
    Held,
    /// tidepool answered one of its messages with an error: the client's
    /// messages are dropped until its Sync, as PostgreSQL would.
    Skipping,
}

impl Batch {
    /// An extended-query message was sent (a held or skipping batch stays so).
    pub fn open(&mut self) {
        if *self == Batch::Synced {
            *self = Batch::Open;
        }
    }
}

/// What becomes of a server when its client's transaction stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Idle, nothing owed, nothing half sent: the next client may have it.
    Reuse,
    /// Nothing owed but a transaction is open: ROLLBACK makes it clean.
    RollBack,
    /// Something is owed or half sent: only closing it is safe.
    Close,
}

#[derive(Debug)]
pub struct Exchange {
    /// Responses owed, in order, with what tidepool injects or drops.
    pub expect: Expect,
    /// Where the client's extended-query batch stands.
    pub batch: Batch,
    pub status: TxStatus,
    pub copy: Copy,
}

impl Exchange {
    pub fn new(status: TxStatus) -> Self {
        Exchange {
            expect: Expect::default(),
            batch: Batch::Synced,
            status,
            copy: Copy::None,
        }
    }

    /// Afresh for the next transaction, keeping the queue's allocation.
    pub fn reset(&mut self, status: TxStatus) {
        self.expect.clear();
        self.batch = Batch::Synced;
        self.status = status;
        self.copy = Copy::None;
    }

    /// A client message that passes as it is and needs no more than its
    /// tag to account for (Sync, FunctionCall, Flush, the end of a COPY);
    /// the others are accounted for by whoever reads their bodies.
    pub fn on_client(&mut self, tag: FrontendTag) {
        match tag {
            FrontendTag::Sync => {
                self.batch = Batch::Synced;
                self.expect.push(Owed::Sync);
            }
            FrontendTag::FunctionCall => self.expect.push(Owed::UntilReady {
                undo: None,
                failed: false,
                position_shift: 0,
                bound: None,
            }),
            FrontendTag::Flush => self.batch.open(),
            FrontendTag::CopyDone | FrontendTag::CopyFail if self.copy == Copy::In => {
                self.copy = Copy::None;
            }
            _ => {}
        }
    }

    /// A server message, after whatever else reads it: the transaction
    /// status, COPY state, and which owed answer it completes.
    pub fn on_server(&mut self, tag: BackendTag, body: &[u8]) -> Result<(), ProtocolError> {
        match tag {
            BackendTag::ReadyForQuery => {
                self.status = ready_for_query(body)?;
                self.copy = Copy::None;
            }
            BackendTag::CommandComplete | BackendTag::ErrorResponse if self.copy == Copy::Out => {
                self.copy = Copy::None;
            }
            BackendTag::CopyInResponse => self.copy = Copy::In,
            BackendTag::CopyOutResponse => self.copy = Copy::Out,
            BackendTag::CopyBothResponse => self.copy = Copy::Both,
            _ => {}
        }
        self.expect.on_backend(tag);
        Ok(())
    }

    /// Nothing is owed, but a transaction may be open (ROLLBACK would clean it).
    pub fn is_quiet(&self) -> bool {
        self.batch == Batch::Synced && self.copy == Copy::None && self.expect.is_empty()
    }

    /// What becomes of the server if the transaction stops here: the one
    /// release verdict every path uses (`half_sent`: a message is half
    /// forwarded either way, or server bytes wait unread).
    pub fn verdict(&self, half_sent: bool) -> Verdict {
        if half_sent || !self.is_quiet() {
            Verdict::Close
        } else if self.status == TxStatus::Idle {
            Verdict::Reuse
        } else {
            Verdict::RollBack
        }
    }
}
