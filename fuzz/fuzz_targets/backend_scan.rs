//! Server → client bytes through `Scanner` and `Tracker::server_side`, with
//! a queue of owed responses chosen by the fuzzer (tidepool's own answers,
//! swallowed ParseComplete/CloseComplete/provoked errors, internal queries),
//! read in pieces and whole: no panic, the scanner's promises hold after
//! every call (see `tidepool_fuzz::drive`), and both runs agree.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tidepool::server::expect::{Owed, Undo};
use tidepool_fuzz::{Input, Server, drive, tracker, tracker_state};

/// One owed response per setup byte.
fn owed(b: u8) -> Owed {
    let undo = Undo {
        server_stmt: (b & 0x10 != 0).then_some(u64::from(b)),
        client_name: (b & 0x20 != 0).then(|| format!("s{b}")),
    };
    match b % 12 {
        0 => Owed::Parse {
            swallow: b & 0x40 != 0,
            undo,
        },
        1 => Owed::Bind,
        2 => Owed::DescribeStatement,
        3 => Owed::DescribePortal,
        4 => Owed::Execute,
        5 => Owed::Close {
            swallow: b & 0x40 != 0,
        },
        6 => Owed::Sync,
        7 => Owed::UntilReady {
            undo: (b & 0x40 != 0).then_some(undo),
            failed: false,
            position_shift: 0,
            bound: None,
        },
        8 => Owed::Internal,
        // A synthetic answer: a ParseComplete, or an ErrorResponse.
        9 => Owed::Synthetic {
            bytes: Bytes::from_static(b"1\0\0\0\x04"),
            undo,
        },
        10 => Owed::Abort,
        _ => Owed::Synthetic {
            bytes: Bytes::from_static(b"E\0\0\0\x0eSERROR\0M?\0\0"),
            undo,
        },
    }
}

fuzz_target!(|data: &[u8]| {
    let Some(input) = Input::parse(data) else {
        return;
    };
    let run = |chunks: &[&[u8]]| {
        let mut s = Server {
            t: tracker(input.flags),
            params: Vec::new(),
            swallowing_error: false,
        };
        for &b in input.setup {
            s.t.expect.push(owed(b));
        }
        let o = drive(&mut s, input.limit(), chunks);
        // Whatever happened, the queue's bookkeeping stays usable.
        let _ = s.t.expect.take_undos();
        let _ = s.t.expect.take_confirmed();
        (o, tracker_state(&s.t), s.params)
    };
    let (whole, whole_t, whole_p) = run(&[input.stream]);
    let (pieces, pieces_t, pieces_p) = run(&input.chunks());
    whole.assert_agrees(&pieces);
    assert_eq!(whole_t, pieces_t, "reading in pieces changed the tracker");
    assert_eq!(
        whole_p, pieces_p,
        "reading in pieces changed the parameters"
    );
});
