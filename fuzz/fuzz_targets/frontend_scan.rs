//! Client → server bytes through `Scanner` and `Tracker::client_side`, read
//! in fuzzer-chosen pieces and whole: no panic, the scanner's promises hold
//! after every call (see `tidepool_fuzz::drive`), and both runs agree.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use tidepool::router::Classifier;
use tidepool::router::classify::Rules;
use tidepool::stats::Fingerprints;
use tidepool_fuzz::{Client, Input, drive, tracker, tracker_state};

fuzz_target!(|data: &[u8]| {
    let Some(input) = Input::parse(data) else {
        return;
    };
    let opt = input.setup.first().copied().unwrap_or(0);
    let guard = (opt & 2 != 0).then(|| {
        Arc::new(Classifier::new(Rules {
            strict: opt & 4 != 0,
            ..Rules::default()
        }))
    });
    let run = |chunks: &[&[u8]]| {
        let shapes = (opt & 1 != 0).then(|| Fingerprints::new(64));
        let mut c = Client {
            t: tracker(input.flags),
            shapes: shapes.as_ref(),
        };
        if input.flags & 0x40 != 0 {
            c.t.batch = tidepool::client::txn::Batch::Skipping;
        }
        c.t.replica_guard = guard
            .clone()
            .map(|classifier| tidepool::client::txn::ReplicaGuard {
                classifier,
                functions: None,
            });
        let o = drive(&mut c, input.limit(), chunks);
        (o, tracker_state(&c.t))
    };
    let (whole, whole_t) = run(&[input.stream]);
    let (pieces, pieces_t) = run(&input.chunks());
    whole.assert_agrees(&pieces);
    assert_eq!(whole_t, pieces_t, "reading in pieces changed the tracker");
    assert!(whole.left <= input.stream.len());
});
