//! Startup-phase packets: `startup::read_packet` over the bytes as a reader
//! (polled once with a no-op waker: a `&[u8]` never blocks) and
//! `startup::parse` over them as a body. No panic; what is read agrees with
//! what is parsed; a parsed StartupMessage re-encodes to the same packet.
#![no_main]

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use libfuzzer_sys::fuzz_target;
use tidepool::protocol::startup::{
    MAX_STARTUP_PACKET, StartupError, StartupPacket, parse, read_packet,
};

fn read(data: &[u8]) -> Result<StartupPacket, StartupError> {
    let mut r = data;
    let mut fut = pin!(read_packet(&mut r));
    match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("reading from a slice is never pending"),
    }
}

fuzz_target!(|data: &[u8]| {
    // The body parser on its own.
    if let Ok(StartupPacket::Startup { minor, params }) = parse(data) {
        let mut body = data[..4].to_vec();
        for (k, v) in &params {
            assert!(!k.is_empty(), "an empty key ends the list");
            assert!(!k.contains('\0') && !v.contains('\0'));
            body.extend_from_slice(k.as_bytes());
            body.push(0);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        assert_eq!(
            parse(&body).ok(),
            Some(StartupPacket::Startup { minor, params }),
            "re-encoded packet parses differently"
        );
    }
    // The reader: length word, then the body.
    let len = data
        .get(..4)
        .map(|w| i32::from_be_bytes([w[0], w[1], w[2], w[3]]));
    match read(data) {
        Ok(p) => {
            let len = len.expect("a packet was read without a length word") as usize;
            // PostgreSQL's bound is on the body: the length word's 4 bytes
            // come on top.
            assert!((8..=MAX_STARTUP_PACKET + 4).contains(&len));
            assert!(data.len() >= len);
            assert_eq!(parse(&data[4..len]).ok(), Some(p));
        }
        Err(StartupError::Eof) => {
            // Only when the declared packet runs past the input.
            if let Some(len) = len {
                assert!((8..=MAX_STARTUP_PACKET as i32 + 4).contains(&len));
                assert!(data.len() < len as usize);
            }
        }
        Err(StartupError::Protocol(_)) => {}
        Err(StartupError::Io(e)) => panic!("a slice reader failed: {e}"),
    }
});
