//! What is outstanding between one client and the server it is using:
//! ReadyForQuery responses owed, extended-query messages not yet synced, COPY
//! state and the last transaction status. Pure state, no I/O: both scanners
//! feed it, and it alone decides whether the server may be released.

use crate::protocol::messages::{ErrorFields, error_fields, parameter_status, ready_for_query};
use crate::protocol::scan::{Inspector, Step};
use crate::protocol::{BackendTag, FrontendTag, ProtocolError, TxStatus};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Copy {
    #[default]
    None,
    In,
    Out,
    Both,
}

#[derive(Debug, Clone)]
pub struct Tracker {
    /// ReadyForQuery messages the server still owes (one per Sync, Query, FunctionCall).
    pub pending: u32,
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
}

impl Tracker {
    pub fn new(status: TxStatus) -> Self {
        Self {
            pending: 0,
            unsynced: false,
            status,
            copy: Copy::None,
            terminated: false,
            server_fatal: None,
        }
    }

    /// Nothing is owed, nothing is half-sent, and the server is outside a
    /// transaction: it may serve another client.
    pub fn is_idle(&self) -> bool {
        self.pending == 0
            && !self.unsynced
            && self.copy == Copy::None
            && self.status == TxStatus::Idle
    }

    /// Nothing is owed, but a transaction may be open (ROLLBACK would clean it).
    pub fn is_quiet(&self) -> bool {
        self.pending == 0 && !self.unsynced && self.copy == Copy::None
    }

    pub fn client_side(&mut self) -> ClientSide<'_> {
        ClientSide(self)
    }

    pub fn server_side<'a>(&'a mut self, params: &'a mut Vec<(String, String)>) -> ServerSide<'a> {
        ServerSide { t: self, params }
    }
}

/// Inspector for client → server bytes.
pub struct ClientSide<'a>(&'a mut Tracker);

impl Inspector for ClientSide<'_> {
    fn classify(&mut self, tag: u8) -> Step {
        let t = &mut *self.0;
        match FrontendTag::from_byte(tag) {
            FrontendTag::Terminate => {
                t.terminated = true;
                return Step::Stop;
            }
            FrontendTag::Sync => {
                t.pending += 1;
                t.unsynced = false;
            }
            FrontendTag::Query | FrontendTag::FunctionCall => t.pending += 1,
            FrontendTag::CopyDone | FrontendTag::CopyFail if t.copy == Copy::In => {
                t.copy = Copy::None;
            }
            other if other.is_extended() => t.unsynced = true,
            _ => {}
        }
        Step::Pass
    }

    fn inspect(&mut self, _tag: u8, _body: &[u8]) -> Result<Step, ProtocolError> {
        Ok(Step::Pass)
    }
}

/// Inspector for server → client bytes. ParameterStatus values are collected
/// into `params` for the session to apply.
pub struct ServerSide<'a> {
    t: &'a mut Tracker,
    params: &'a mut Vec<(String, String)>,
}

impl Inspector for ServerSide<'_> {
    fn classify(&mut self, tag: u8) -> Step {
        match BackendTag::from_byte(tag) {
            BackendTag::ReadyForQuery | BackendTag::ParameterStatus | BackendTag::ErrorResponse => {
                Step::Inspect
            }
            BackendTag::CopyInResponse => {
                self.t.copy = Copy::In;
                Step::Pass
            }
            BackendTag::CopyOutResponse => {
                self.t.copy = Copy::Out;
                Step::Pass
            }
            BackendTag::CopyBothResponse => {
                self.t.copy = Copy::Both;
                Step::Pass
            }
            BackendTag::CommandComplete if self.t.copy == Copy::Out => {
                self.t.copy = Copy::None;
                Step::Pass
            }
            _ => Step::Pass,
        }
    }

    fn inspect(&mut self, tag: u8, body: &[u8]) -> Result<Step, ProtocolError> {
        match BackendTag::from_byte(tag) {
            BackendTag::ReadyForQuery => {
                self.t.status = ready_for_query(body)?;
                self.t.pending = self.t.pending.saturating_sub(1);
                self.t.copy = Copy::None;
            }
            BackendTag::ParameterStatus => {
                let (k, v) = parameter_status(body)?;
                self.params.push((k.to_owned(), v.to_owned()));
            }
            BackendTag::ErrorResponse => {
                let fields = error_fields(body)?;
                if fields.severity == "FATAL" || fields.severity == "PANIC" {
                    self.t.server_fatal = Some(fields);
                    return Ok(Step::Stop);
                }
                if self.t.copy == Copy::Out {
                    self.t.copy = Copy::None;
                }
            }
            _ => {}
        }
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

    fn feed_client(t: &mut Tracker, bytes: &[u8]) {
        let mut s = Scanner::new(1 << 20);
        s.scan(bytes, &mut t.client_side()).unwrap();
    }

    fn feed_server(t: &mut Tracker, bytes: &[u8]) -> Vec<(String, String)> {
        let mut s = Scanner::new(1 << 20);
        let mut p = Vec::new();
        s.scan(bytes, &mut t.server_side(&mut p)).unwrap();
        p
    }

    #[test]
    fn release_waits_for_every_sync() {
        let mut t = Tracker::new(TxStatus::Idle);
        let mut c = Vec::new();
        for tag in [b'P', b'B', b'E', b'S', b'B', b'E', b'S'] {
            c.extend_from_slice(&msg(tag, b""));
        }
        feed_client(&mut t, &c);
        assert_eq!(t.pending, 2);
        feed_server(&mut t, &msg(b'Z', b"I"));
        assert!(!t.is_idle(), "one Sync still unanswered");
        feed_server(&mut t, &msg(b'Z', b"I"));
        assert!(t.is_idle());
    }

    #[test]
    fn unsynced_extended_messages_keep_the_server() {
        let mut t = Tracker::new(TxStatus::Idle);
        feed_client(&mut t, &[msg(b'Q', b"x\0"), msg(b'P', b"")].concat());
        feed_server(&mut t, &msg(b'Z', b"I"));
        assert!(!t.is_idle());
        feed_client(&mut t, &msg(b'S', b""));
        feed_server(&mut t, &msg(b'Z', b"I"));
        assert!(t.is_idle());
    }

    #[test]
    fn open_transaction_and_failed_transaction_keep_the_server() {
        let mut t = Tracker::new(TxStatus::Idle);
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
        let mut t = Tracker::new(TxStatus::Idle);
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
        let mut t = Tracker::new(TxStatus::InTransaction);
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
        let mut t = Tracker::new(TxStatus::Idle);
        let err = msg(b'E', b"SERROR\0VERROR\0C22012\0Mdivision by zero\0\0");
        let r = s.scan(&err, &mut t.server_side(&mut p)).unwrap();
        assert_eq!(r.forward, err.len());
        assert!(t.server_fatal.is_none());
    }

    #[test]
    fn parameter_status_is_collected_and_terminate_stops() {
        let mut t = Tracker::new(TxStatus::Idle);
        let p = feed_server(&mut t, &msg(b'S', b"TimeZone\0UTC\0"));
        assert_eq!(p, vec![("TimeZone".into(), "UTC".into())]);
        let mut s = Scanner::new(1024);
        let r = s
            .scan(
                &[msg(b'Q', b"x\0"), msg(b'X', b"")].concat(),
                &mut t.client_side(),
            )
            .unwrap();
        assert!(r.stopped);
        assert!(t.terminated);
    }
}
