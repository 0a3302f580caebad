//! Streaming scanner over a byte buffer of tagged messages.
//!
//! The proxy forwards whole buffers. The scanner walks message headers in
//! place and decides, per message, whether its bytes may simply pass, whether
//! the complete message must be looked at first, or whether forwarding must
//! stop before it. A passing message may be split across reads: its remaining
//! body length is remembered (`skip`) and the next chunk's bytes pass without
//! a header. Nothing is copied and nothing is allocated here.
//!
//! Invariant: a declared length is checked (`4 <= len`, `len <= limit`) before
//! any decision that could make a caller buffer the message.

use super::ProtocolError;

/// What to do with one message, decided from its tag (and body, for `Inspect`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Forward the bytes without looking at the body.
    Pass,
    /// Buffer until complete, then call [`Inspector::inspect`].
    Inspect,
    /// Forward nothing from here on; the caller handles this message itself.
    Stop,
}

/// Callbacks the scanner asks about each message.
pub trait Inspector {
    /// Decide from the tag alone.
    fn classify(&mut self, tag: u8) -> Step;
    /// Look at a complete message (tag and body without the length word).
    /// Returns `Pass` to forward it or `Stop` to stop before it.
    fn inspect(&mut self, tag: u8, body: &[u8]) -> Result<Step, ProtocolError>;
}

/// Result of one scan over a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scanned {
    /// Leading bytes that may be forwarded now.
    pub forward: usize,
    /// True when scanning stopped at a message the inspector asked to stop at.
    pub stopped: bool,
}

/// Per-direction scanner state.
#[derive(Debug, Clone)]
pub struct Scanner {
    skip: usize,
    limit: usize,
    /// Client → server: PostgreSQL's per-type limits apply too.
    frontend: bool,
}

impl Scanner {
    /// For server → client bytes.
    pub fn new(limit: usize) -> Self {
        Self {
            skip: 0,
            limit,
            frontend: false,
        }
    }

    /// For client → server bytes (see [`frontend_len`]).
    pub fn frontend(limit: usize) -> Self {
        Self {
            skip: 0,
            limit,
            frontend: true,
        }
    }

    /// True while a passing message has been partly forwarded.
    pub fn mid_message(&self) -> bool {
        self.skip > 0
    }

    /// Bytes of a partly forwarded message not yet seen.
    pub fn remaining(&self) -> usize {
        self.skip
    }

    /// Walk `buf` from its start.
    pub fn scan<I: Inspector>(
        &mut self,
        buf: &[u8],
        inspector: &mut I,
    ) -> Result<Scanned, ProtocolError> {
        let mut pos = 0;
        if self.skip > 0 {
            let n = self.skip.min(buf.len());
            self.skip -= n;
            pos = n;
        }
        while buf.len() - pos >= 5 {
            let tag = buf[pos];
            let len_bytes = &buf[pos + 1..pos + 5];
            let total = if self.frontend {
                frontend_len(tag, len_bytes, self.limit)?
            } else {
                checked_len(tag, len_bytes, self.limit)?
            };
            match inspector.classify(tag) {
                Step::Stop => {
                    return Ok(Scanned {
                        forward: pos,
                        stopped: true,
                    });
                }
                Step::Pass => {
                    let avail = buf.len() - pos;
                    if total > avail {
                        self.skip = total - avail;
                        return Ok(Scanned {
                            forward: buf.len(),
                            stopped: false,
                        });
                    }
                    pos += total;
                }
                Step::Inspect => {
                    if buf.len() - pos < total {
                        break;
                    }
                    match inspector.inspect(tag, &buf[pos + 5..pos + total])? {
                        Step::Stop => {
                            return Ok(Scanned {
                                forward: pos,
                                stopped: true,
                            });
                        }
                        Step::Pass | Step::Inspect => pos += total,
                    }
                }
            }
        }
        Ok(Scanned {
            forward: pos,
            stopped: false,
        })
    }
}

/// [`checked_len`] for a client's message: also within PostgreSQL's own
/// limit for message types that carry no client data (Sync, Execute, ...),
/// which PostgreSQL answers by closing the connection.
pub fn frontend_len(tag: u8, len_bytes: &[u8], limit: usize) -> Result<usize, ProtocolError> {
    if !super::FrontendTag::from_byte(tag).is_small() {
        return checked_len(tag, len_bytes, limit);
    }
    let small = limit.min(super::tag::SMALL_MESSAGE_LIMIT + 1);
    checked_len(tag, len_bytes, small).map_err(|e| match e {
        ProtocolError::TooLarge { tag, len, .. } if small < limit => {
            ProtocolError::SmallTooLarge { tag, len }
        }
        e => e,
    })
}

/// Total message size (tag byte included) from the 4-byte big-endian length,
/// checked against `limit`.
pub fn checked_len(tag: u8, len_bytes: &[u8], limit: usize) -> Result<usize, ProtocolError> {
    let raw = match len_bytes {
        [a, b, c, d] => i32::from_be_bytes([*a, *b, *c, *d]),
        _ => return Err(ProtocolError::Malformed("header")),
    };
    if raw < 4 {
        return Err(ProtocolError::BadLength {
            tag: tag as char,
            len: i64::from(raw),
        });
    }
    let total = raw as usize + 1;
    if total > limit {
        return Err(ProtocolError::TooLarge {
            tag: tag as char,
            len: total,
            limit,
        });
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct CountSyncs {
        syncs: usize,
        stop_at: Option<u8>,
    }

    impl Inspector for CountSyncs {
        fn classify(&mut self, tag: u8) -> Step {
            if Some(tag) == self.stop_at {
                Step::Stop
            } else if tag == b'Q' {
                Step::Inspect
            } else {
                if tag == b'S' {
                    self.syncs += 1;
                }
                Step::Pass
            }
        }
        fn inspect(&mut self, _tag: u8, body: &[u8]) -> Result<Step, ProtocolError> {
            if body.last() != Some(&0) {
                return Err(ProtocolError::Malformed("Query"));
            }
            Ok(Step::Pass)
        }
    }

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    fn insp() -> CountSyncs {
        CountSyncs {
            syncs: 0,
            stop_at: None,
        }
    }

    #[test]
    fn passes_whole_messages_and_keeps_partial_header() {
        let mut buf = msg(b'S', b"");
        buf.extend_from_slice(&msg(b'S', b""));
        buf.extend_from_slice(&[b'S', 0, 0]);
        let mut s = Scanner::new(1024);
        let mut i = insp();
        let r = s.scan(&buf, &mut i).unwrap();
        assert_eq!(r.forward, 10);
        assert_eq!(i.syncs, 2);
        assert!(!s.mid_message());
    }

    #[test]
    fn streams_a_passing_message_split_across_reads() {
        let m = msg(b'd', &[7u8; 100]);
        let mut s = Scanner::new(1024);
        let mut i = insp();
        let r = s.scan(&m[..30], &mut i).unwrap();
        assert_eq!(r.forward, 30);
        assert!(s.mid_message());
        let mut rest = m[30..].to_vec();
        rest.extend_from_slice(&msg(b'S', b""));
        let r = s.scan(&rest, &mut i).unwrap();
        assert_eq!(r.forward, rest.len());
        assert_eq!(i.syncs, 1);
        assert!(!s.mid_message());
    }

    #[test]
    fn inspected_message_waits_until_complete() {
        let m = msg(b'Q', b"select 1\0");
        let mut s = Scanner::new(1024);
        let mut i = insp();
        assert_eq!(s.scan(&m[..8], &mut i).unwrap().forward, 0);
        assert_eq!(s.scan(&m, &mut i).unwrap().forward, m.len());
    }

    #[test]
    fn rejects_short_and_oversized_lengths() {
        let mut s = Scanner::new(100);
        let mut i = insp();
        let bad = [b'Q', 0, 0, 0, 3];
        assert!(matches!(
            s.scan(&bad, &mut i),
            Err(ProtocolError::BadLength { .. })
        ));
        let huge = [b'd', 0x7f, 0xff, 0xff, 0xff];
        assert!(matches!(
            s.scan(&huge, &mut i),
            Err(ProtocolError::TooLarge { .. })
        ));
        let neg = [b'd', 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            s.scan(&neg, &mut i),
            Err(ProtocolError::BadLength { .. })
        ));
    }

    #[test]
    fn stops_before_the_requested_message() {
        let mut buf = msg(b'S', b"");
        buf.extend_from_slice(&msg(b'X', b""));
        let mut s = Scanner::new(100);
        let mut i = CountSyncs {
            syncs: 0,
            stop_at: Some(b'X'),
        };
        let r = s.scan(&buf, &mut i).unwrap();
        assert_eq!(
            r,
            Scanned {
                forward: 5,
                stopped: true
            }
        );
    }

    #[test]
    fn every_split_point_gives_the_same_forward_total() {
        let mut all = Vec::new();
        for (t, b) in [
            (b'Q', &b"select 1\0"[..]),
            (b'd', &[1u8; 40][..]),
            (b'S', &b""[..]),
        ] {
            all.extend_from_slice(&msg(t, b));
        }
        for cut in 0..all.len() {
            let mut s = Scanner::new(1024);
            let mut i = insp();
            let mut buf = all[..cut].to_vec();
            let r1 = s.scan(&buf, &mut i).unwrap();
            buf.drain(..r1.forward);
            buf.extend_from_slice(&all[cut..]);
            let r2 = s.scan(&buf, &mut i).unwrap();
            assert_eq!(r1.forward + r2.forward, all.len(), "cut at {cut}");
            assert_eq!(i.syncs, 1);
        }
    }
}

#[cfg(test)]
mod proptests {
    use proptest::prelude::*;

    use super::*;

    const LIMIT: usize = 1024;

    /// Inspects `Q` and `P`, stops at `stop_at`, passes the rest; records
    /// every message it sees whole and counts tag-only decisions.
    #[derive(Default)]
    struct Recorder {
        stop_at: Option<u8>,
        inspected: Vec<(u8, Vec<u8>)>,
        passed: usize,
    }

    impl Inspector for Recorder {
        fn classify(&mut self, tag: u8) -> Step {
            if Some(tag) == self.stop_at {
                Step::Stop
            } else if tag == b'Q' || tag == b'P' {
                Step::Inspect
            } else {
                self.passed += 1;
                Step::Pass
            }
        }
        fn inspect(&mut self, tag: u8, body: &[u8]) -> Result<Step, ProtocolError> {
            self.inspected.push((tag, body.to_vec()));
            Ok(Step::Pass)
        }
    }

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    /// Well-formed messages (tag, body) that fit the limit.
    fn messages() -> impl Strategy<Value = Vec<(u8, Vec<u8>)>> {
        let tag = prop::sample::select(&b"QPBDESXdcHCZT"[..]);
        prop::collection::vec((tag, prop::collection::vec(any::<u8>(), 0..200)), 0..12)
    }

    /// Feeds `stream` cut at `cuts` the way the session does: each read is
    /// appended to what was not forwarded, and the forwarded prefix leaves.
    /// Returns the bytes forwarded in total and where it stopped, if it did.
    fn feed(stream: &[u8], cuts: &[usize], r: &mut Recorder) -> (usize, Option<usize>) {
        let mut s = Scanner::new(LIMIT);
        let mut buf = Vec::new();
        let mut forwarded = 0;
        let mut at = 0;
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
        cuts.sort_unstable();
        cuts.push(stream.len());
        for cut in cuts {
            buf.extend_from_slice(&stream[at..cut]);
            at = cut;
            let res = s.scan(&buf, r).expect("valid stream");
            assert!(res.forward <= buf.len());
            buf.drain(..res.forward);
            forwarded += res.forward;
            if res.stopped {
                return (forwarded, Some(forwarded));
            }
        }
        assert!(buf.is_empty(), "a whole stream leaves nothing behind");
        assert!(!s.mid_message());
        (forwarded, None)
    }

    proptest! {
        /// Any split of a valid stream forwards all of it, decides each
        /// passing message once, and shows each inspected message exactly
        /// once and whole.
        #[test]
        fn any_split_forwards_everything_and_inspects_whole_messages(
            msgs in messages(),
            cuts in prop::collection::vec(any::<usize>(), 0..10),
        ) {
            let stream: Vec<u8> = msgs.iter().flat_map(|(t, b)| msg(*t, b)).collect();
            let mut r = Recorder::default();
            let (forwarded, stopped) = feed(&stream, &cuts, &mut r);
            prop_assert_eq!(forwarded, stream.len());
            prop_assert_eq!(stopped, None);
            let want: Vec<(u8, Vec<u8>)> = msgs
                .iter()
                .filter(|(t, _)| *t == b'Q' || *t == b'P')
                .cloned()
                .collect();
            prop_assert_eq!(&r.inspected, &want);
            prop_assert_eq!(r.passed, msgs.len() - want.len());
        }

        /// Wherever the stream is cut, forwarding stops right before the
        /// first message the inspector stops at.
        #[test]
        fn any_split_stops_at_the_same_message(
            msgs in messages(),
            cuts in prop::collection::vec(any::<usize>(), 0..10),
        ) {
            let stream: Vec<u8> = msgs.iter().flat_map(|(t, b)| msg(*t, b)).collect();
            let first_x = msgs.iter().position(|(t, _)| *t == b'X');
            let want = first_x.map(|i| msgs[..i].iter().map(|(_, b)| b.len() + 5).sum::<usize>());
            let mut r = Recorder { stop_at: Some(b'X'), ..Recorder::default() };
            let (forwarded, stopped) = feed(&stream, &cuts, &mut r);
            prop_assert_eq!(stopped, want);
            prop_assert_eq!(forwarded, want.unwrap_or(stream.len()));
        }

        /// A declared length under 4 (negative ones included) or over the
        /// limit is refused as soon as its header is whole, after the valid
        /// messages before it, whatever the tag (so nothing is ever buffered
        /// for it), and `checked_len` agrees.
        #[test]
        fn bad_lengths_are_refused(
            msgs in messages(),
            tag in any::<u8>(),
            len in prop_oneof![
                i32::MIN..4,
                (LIMIT as i32)..=i32::MAX,
                Just(3),
                Just(LIMIT as i32),
                Just(-1),
            ],
            tail in prop::collection::vec(any::<u8>(), 0..8),
        ) {
            let mut stream: Vec<u8> = msgs.iter().flat_map(|(t, b)| msg(*t, b)).collect();
            let valid = stream.len();
            stream.push(tag);
            stream.extend_from_slice(&len.to_be_bytes());
            stream.extend_from_slice(&tail);
            let expected = || if len < 4 {
                ProtocolError::BadLength { tag: tag as char, len: i64::from(len) }
            } else {
                ProtocolError::TooLarge { tag: tag as char, len: len as usize + 1, limit: LIMIT }
            };
            prop_assert_eq!(checked_len(tag, &len.to_be_bytes(), LIMIT), Err(expected()));
            // Whole, and with the valid part forwarded first.
            let mut r = Recorder::default();
            prop_assert_eq!(Scanner::new(LIMIT).scan(&stream, &mut r), Err(expected()));
            let mut s = Scanner::new(LIMIT);
            let first = s.scan(&stream[..valid], &mut r);
            prop_assert_eq!(first, Ok(Scanned { forward: valid, stopped: false }));
            prop_assert_eq!(s.scan(&stream[valid..], &mut r), Err(expected()));
        }

        /// Lengths in range are accepted: a passing message's bytes all go
        /// (its unseen rest is remembered), an inspected one waits whole.
        #[test]
        fn lengths_in_range_are_accepted(len in 4..(LIMIT as i32), inspect in any::<bool>()) {
            let tag = if inspect { b'Q' } else { b'd' };
            let mut header = vec![tag];
            header.extend_from_slice(&len.to_be_bytes());
            prop_assert_eq!(checked_len(tag, &header[1..], LIMIT), Ok(len as usize + 1));
            let mut s = Scanner::new(LIMIT);
            let r = s.scan(&header, &mut Recorder::default());
            if inspect || len == 4 {
                // An empty body is whole with its header.
                let forward = if len == 4 { 5 } else { 0 };
                prop_assert_eq!(r, Ok(Scanned { forward, stopped: false }));
                prop_assert!(!s.mid_message());
            } else {
                prop_assert_eq!(r, Ok(Scanned { forward: 5, stopped: false }));
                prop_assert_eq!(s.remaining(), len as usize - 4);
            }
        }
    }
}
