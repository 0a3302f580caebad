//! `auth_hba_file` text: `Hba::parse` over any text never panics; rules it
//! accepts answer any peer without a panic, and parsing is a function of the
//! text (the same text, the same rules). Also the certificate readers
//! (`tls::common_name`, and `tls::end_point` for SCRAM channel binding)
//! over the same bytes: any input, no panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidepool::auth::hba::{Hba, Peer};

fuzz_target!(|data: &[u8]| {
    let _ = tidepool::tls::common_name(data);
    let _ = tidepool::tls::end_point(data);
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(hba) = Hba::parse(text) else {
        return;
    };
    assert_eq!(Hba::parse(text).ok().as_ref(), Some(&hba));
    // `None`: a client of the Unix socket (`local` lines).
    for addr in ["127.0.0.1", "10.1.2.3", "::1", "::ffff:10.0.0.1", "fe80::1", ""] {
        for tls in [false, true] {
            let _ = hba.method_for(&Peer {
                addr: addr.parse().ok(),
                tls,
                database: "app",
                user: "app",
            });
        }
    }
});
