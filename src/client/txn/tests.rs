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
    assert!(
        t.verdict(false) != Verdict::Reuse,
        "one Sync still unanswered"
    );
    feed_server(&mut t, &msg(b'Z', b"I"));
    assert!(t.verdict(false) == Verdict::Reuse);
}

#[test]
fn unsynced_extended_messages_keep_the_server() {
    let mut t = Tracker::new(TxStatus::Idle, Policy::default());
    feed_client(
        &mut t,
        &[msg(b'Q', b"x\0"), msg(b'P', valid_body(b'P'))].concat(),
    );
    feed_server(&mut t, &msg(b'Z', b"I"));
    assert!(t.verdict(false) != Verdict::Reuse);
    feed_client(&mut t, &msg(b'S', b""));
    feed_server(&mut t, &msg(b'Z', b"I"));
    assert!(t.verdict(false) == Verdict::Reuse);
}

#[test]
fn open_transaction_and_failed_transaction_keep_the_server() {
    let mut t = Tracker::new(TxStatus::Idle, Policy::default());
    feed_client(&mut t, &msg(b'Q', b"begin\0"));
    feed_server(&mut t, &msg(b'Z', b"T"));
    assert!(t.verdict(false) != Verdict::Reuse);
    assert!(t.is_quiet());
    feed_client(&mut t, &msg(b'Q', b"bad\0"));
    feed_server(&mut t, &msg(b'Z', b"E"));
    assert!(t.verdict(false) != Verdict::Reuse);
    feed_client(&mut t, &msg(b'Q', b"rollback\0"));
    feed_server(&mut t, &msg(b'Z', b"I"));
    assert!(t.verdict(false) == Verdict::Reuse);
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
    assert!(t.verdict(false) == Verdict::Reuse);
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

mod verdict_props {
    use super::*;
    use proptest::prelude::*;

    /// A client or server message, well formed.
    #[derive(Debug, Clone, Copy)]
    enum Step {
        Client(u8),
        /// A ReadyForQuery with this status.
        Ready(u8),
        Server(u8),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            prop::sample::select(&b"QPBDESHC"[..]).prop_map(Step::Client),
            prop::sample::select(&b"ITE"[..]).prop_map(Step::Ready),
            prop::sample::select(&b"123CnsITE"[..]).prop_map(|t| match t {
                b'I' => Step::Server(b'I'),
                b'T' => Step::Server(b'T'),
                b'E' => Step::Server(b'E'),
                t => Step::Server(t),
            }),
        ]
    }

    fn client_body(tag: u8) -> &'static [u8] {
        match tag {
            b'Q' => b"select 1\0",
            b'D' | b'C' => b"P\0",
            t => valid_body(t),
        }
    }

    fn server_body(tag: u8) -> &'static [u8] {
        match tag {
            b'E' => b"SERROR\0VERROR\0C42601\0Mx\0\0",
            b'C' => b"SELECT 1\0",
            b'T' => b"\0\0",
            _ => b"",
        }
    }

    proptest! {
        /// Whatever the client and server say, in any order, the server is
        /// reused only when every request that owes a ReadyForQuery got
        /// one, nothing is unsynced and the last status was idle. The model
        /// is PostgreSQL's: after an error in an extended-query batch the
        /// server skips everything up to the Sync, a simple query included.
        #[test]
        fn reuse_only_when_idle_and_every_sync_answered(steps in prop::collection::vec(step(), 0..60)) {
            let mut t = Tracker::new(TxStatus::Idle, Policy::default());
            // The client's requests the server has not finished: 'X'
            // (extended, before its Sync), 'S' (a Sync), 'Q' (a query).
            let mut open: std::collections::VecDeque<u8> = Default::default();
            let mut status = TxStatus::Idle;
            // The server skips everything up to the next Sync.
            let mut skipping = false;
            for s in steps {
                match s {
                    Step::Client(tag) => {
                        match tag {
                            b'S' => {
                                skipping = false;
                                open.push_back(b'S');
                            }
                            _ if skipping => {}
                            b'Q' => open.push_back(b'Q'),
                            b'H' => {}
                            _ => open.push_back(b'X'),
                        }
                        feed_client(&mut t, &msg(tag, client_body(tag)));
                    }
                    Step::Ready(st) => {
                        // Ends the first query or Sync, and what came before it.
                        while let Some(r) = open.pop_front() {
                            if r != b'X' {
                                break;
                            }
                        }
                        status = match st { b'I' => TxStatus::Idle, b'T' => TxStatus::InTransaction, _ => TxStatus::Failed };
                        feed_server(&mut t, &msg(b'Z', &[st]));
                    }
                    Step::Server(tag) => {
                        if tag == b'E' && open.front() == Some(&b'X') {
                            // An extended message failed: skipped up to the Sync.
                            while open.front().is_some_and(|r| *r != b'S') {
                                open.pop_front();
                            }
                            skipping = open.is_empty();
                        }
                        feed_server(&mut t, &msg(tag, server_body(tag)));
                    }
                }
                if t.verdict(false) == Verdict::Reuse {
                    prop_assert!(open.is_empty(), "reused with requests unanswered: {:?}", open);
                    prop_assert_eq!(status, TxStatus::Idle);
                }
                prop_assert_eq!(t.verdict(true), Verdict::Close);
            }
        }
    }
}

mod unlisten_fate {
    use super::super::UnlistenFate;
    use crate::protocol::TxStatus;

    fn fate(sent: &[&str]) -> UnlistenFate {
        let mut f = UnlistenFate::default();
        f.sent.extend(sent.iter().map(|c| Some((*c).to_owned())));
        f
    }

    #[test]
    fn committed_unlistens_apply_and_rolled_back_ones_do_not() {
        let mut out = Vec::new();
        // Autocommit: applies at once.
        let mut f = fate(&["a"]);
        f.completed(b"UNLISTEN\0");
        f.ready(TxStatus::Idle, &mut out);
        assert_eq!(out, [Some("a".to_owned())]);

        // BEGIN; UNLISTEN b; ROLLBACK
        out.clear();
        let mut f = fate(&["b"]);
        f.completed(b"BEGIN\0");
        f.ready(TxStatus::InTransaction, &mut out);
        f.completed(b"UNLISTEN\0");
        f.ready(TxStatus::InTransaction, &mut out);
        f.completed(b"ROLLBACK\0");
        f.ready(TxStatus::Idle, &mut out);
        assert!(out.is_empty());

        // BEGIN; UNLISTEN c; <error>; COMMIT (answered ROLLBACK)
        let mut f = fate(&["c"]);
        f.completed(b"UNLISTEN\0");
        f.ready(TxStatus::InTransaction, &mut out);
        f.error();
        f.ready(TxStatus::Failed, &mut out);
        f.completed(b"ROLLBACK\0");
        f.ready(TxStatus::Idle, &mut out);
        assert!(out.is_empty());

        // One implicit transaction: UNLISTEN d; SELECT 1/0
        let mut f = fate(&["d"]);
        f.completed(b"UNLISTEN\0");
        f.error();
        f.ready(TxStatus::Idle, &mut out);
        assert!(out.is_empty());

        // An error that a savepoint undid does not stop the COMMIT.
        let mut f = fate(&["e"]);
        f.completed(b"UNLISTEN\0");
        f.ready(TxStatus::InTransaction, &mut out);
        f.error();
        f.ready(TxStatus::Failed, &mut out);
        f.completed(b"ROLLBACK\0"); // ROLLBACK TO SAVEPOINT's tag
        f.ready(TxStatus::InTransaction, &mut out);
        f.completed(b"COMMIT\0");
        f.ready(TxStatus::Idle, &mut out);
        assert_eq!(out, [Some("e".to_owned())]);

        // An UNLISTEN that failed never ran: nothing to apply.
        out.clear();
        let mut f = fate(&["f"]);
        f.error();
        f.ready(TxStatus::Idle, &mut out);
        assert!(out.is_empty());
    }
}
