//! What the scanner targets share: an input format that carries its own cut
//! points, and a driver that runs a message stream through
//! [`Scanner`] and a [`Tracker`] the way the session does, checking the
//! scanner's promises after every call.
//!
//! Input of `frontend_scan` and `backend_scan`:
//!
//! ```text
//! flags: u8 | setup: n (u8), n bytes | cuts: k (u8), k × u16 LE | stream
//! ```
//!
//! `setup` is target-specific (the backend target turns each byte into an
//! owed response queued before the stream); `cuts` split the stream into the
//! reads the proxy would see. The same stream is also scanned whole, and both
//! runs must agree on everything: bytes forwarded (and inserted), where the
//! scan stopped, errors, every inspected message, and the tracker's state.

use bytes::BytesMut;
use tidepool::client::txn::{Batch, Copy, Tracker};
use tidepool::protocol::messages::ready_for_query;
use tidepool::protocol::scan::{Inspector, Scanned, Scanner, Step, checked_len};
use tidepool::protocol::{BackendTag, FrontendTag, ProtocolError, TxStatus};

/// A decoded fuzz input.
pub struct Input<'a> {
    pub flags: u8,
    pub setup: &'a [u8],
    /// Sorted cut points, each `<= stream.len()`.
    pub cuts: Vec<usize>,
    pub stream: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn parse(data: &'a [u8]) -> Option<Self> {
        let (&flags, rest) = data.split_first()?;
        let (&n, rest) = rest.split_first()?;
        let (setup, rest) = rest.split_at_checked(usize::from(n % 32))?;
        let (&k, rest) = rest.split_first()?;
        let (cut_bytes, stream) = rest.split_at_checked(usize::from(k % 32) * 2)?;
        let mut cuts: Vec<usize> = cut_bytes
            .chunks_exact(2)
            .map(|c| usize::from(u16::from_le_bytes([c[0], c[1]])) % (stream.len() + 1))
            .collect();
        cuts.sort_unstable();
        Some(Self {
            flags,
            setup,
            cuts,
            stream,
        })
    }

    /// The stream split at the cut points (empty reads included).
    pub fn chunks(&self) -> Vec<&'a [u8]> {
        let mut out = Vec::with_capacity(self.cuts.len() + 1);
        let mut at = 0;
        for &c in &self.cuts {
            out.push(&self.stream[at..c]);
            at = c;
        }
        out.push(&self.stream[at..]);
        out
    }

    /// The scanner's message size limit: small (so `TooLarge` is reachable)
    /// or the proxy's server-side limit.
    pub fn limit(&self) -> usize {
        if self.flags & 0x80 == 0 {
            4096
        } else {
            (1 << 30) + 64
        }
    }
}

/// Records every message the scanner hands to `inspect`.
pub struct Recording<'a, I> {
    pub inner: I,
    pub seen: &'a mut Vec<(u8, Vec<u8>)>,
}

impl<I: Inspector> Inspector for Recording<'_, I> {
    fn classify(&mut self, tag: u8) -> Step {
        self.inner.classify(tag)
    }
    fn inspect(&mut self, tag: u8, body: &[u8]) -> Result<Step, ProtocolError> {
        self.seen.push((tag, body.to_vec()));
        self.inner.inspect(tag, body)
    }
}

/// What the session does at a message the scanner stopped before.
pub enum OnStop {
    /// The session is done with this stream (Terminate, a FATAL, a reroute).
    End,
    /// Consume the whole message (once it is all there) and go on.
    Consume,
    /// Consume just these many bytes of it (they are there) and go on.
    ConsumeNow(usize),
    /// Something changed (answers inserted): scan again.
    Rescan,
    /// The session waits for more bytes.
    Wait,
}

/// One direction of a session, as the driver needs it.
pub trait Side {
    fn scan(
        &mut self,
        scanner: &mut Scanner,
        buf: &[u8],
        seen: &mut Vec<(u8, Vec<u8>)>,
    ) -> Result<Scanned, ProtocolError>;
    /// The scanner stopped before `buf[0..]` (its header is whole). Bytes
    /// the session sends on its own go to `out`.
    fn on_stop(&mut self, buf: &[u8], out: &mut Vec<u8>) -> Result<OnStop, ProtocolError>;
    /// A whole message consumed after [`OnStop::Consume`].
    fn consumed(&mut self, msg: &[u8]) -> Result<(), ProtocolError>;
}

/// Everything a run produces; two runs over the same stream must be equal.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Bytes passed on, with the session's own insertions in place.
    pub out: Vec<u8>,
    /// Stream offsets where the scan stopped, with the tag there.
    pub stops: Vec<(usize, u8)>,
    /// The error that ended the run, if any.
    pub error: Option<ProtocolError>,
    /// Every message inspected, in order.
    pub inspected: Vec<(u8, Vec<u8>)>,
    /// Stream bytes neither forwarded nor consumed at the end.
    pub left: usize,
    pub ended: bool,
}

impl Outcome {
    /// Panics unless `self` and `other` (the same stream, read in other
    /// pieces) agree. After an error they agree on everything but what was
    /// forwarded: a scan that fails forwards nothing, so the bytes forwarded
    /// before the error are a prefix of each other (the session drops the
    /// connection there).
    pub fn assert_agrees(&self, other: &Outcome) {
        if self.error.is_none() && other.error.is_none() {
            assert_eq!(self, other, "reading in pieces changed the outcome");
            return;
        }
        assert_eq!(
            self.error, other.error,
            "reading in pieces changed the error"
        );
        assert_eq!(
            self.stops, other.stops,
            "reading in pieces changed the stops"
        );
        assert_eq!(
            self.inspected, other.inspected,
            "reading in pieces changed what was inspected"
        );
        let n = self.out.len().min(other.out.len());
        assert_eq!(
            self.out[..n],
            other.out[..n],
            "forwarded bytes differ before an error"
        );
    }
}

/// Runs `chunks` (one stream, in reads) through `side`, checking after each
/// scan that the scanner kept its promises.
pub fn drive<S: Side>(side: &mut S, limit: usize, chunks: &[&[u8]]) -> Outcome {
    let mut scanner = Scanner::new(limit);
    let mut buf: Vec<u8> = Vec::new();
    let mut at = 0usize; // stream offset of buf[0]
    let mut o = Outcome::default();
    let mut consume: Option<usize> = None;
    let len: usize = chunks.iter().map(|c| c.len()).sum();
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        let mut rescans = 0;
        loop {
            if let Some(total) = consume {
                if buf.len() < total {
                    break;
                }
                if let Err(e) = side.consumed(&buf[..total]) {
                    o.error = Some(e);
                    o.left = len - at;
                    return o;
                }
                buf.drain(..total);
                at += total;
                consume = None;
            }
            let was_mid = scanner.remaining();
            let r = match side.scan(&mut scanner, &buf, &mut o.inspected) {
                Ok(r) => r,
                Err(e) => {
                    o.error = Some(e);
                    o.left = len - at;
                    return o;
                }
            };
            check_scanned(&scanner, &buf, r, was_mid, limit);
            o.out.extend_from_slice(&buf[..r.forward]);
            buf.drain(..r.forward);
            at += r.forward;
            if !r.stopped {
                break;
            }
            o.stops.push((at, buf[0]));
            let action = match side.on_stop(&buf, &mut o.out) {
                Ok(a) => a,
                Err(e) => {
                    o.error = Some(e);
                    o.left = len - at;
                    return o;
                }
            };
            match action {
                OnStop::End => {
                    o.ended = true;
                    o.left = len - at;
                    return o;
                }
                OnStop::Consume => {
                    let total = checked_len(buf[0], &buf[1..5], usize::MAX)
                        .expect("the scanner stopped at a message with a bad length");
                    assert!(total <= limit, "stopped at a message over the limit");
                    consume = Some(total);
                }
                OnStop::ConsumeNow(n) => {
                    buf.drain(..n);
                    at += n;
                }
                OnStop::Rescan => {
                    rescans += 1;
                    assert!(rescans < 1000, "the session would spin at offset {at}");
                }
                OnStop::Wait => break,
            }
        }
    }
    o.left = len - at;
    o
}

/// The scanner's promises for one successful scan of `buf`.
fn check_scanned(scanner: &Scanner, buf: &[u8], r: Scanned, was_mid: usize, limit: usize) {
    assert!(r.forward <= buf.len(), "forward past the buffer");
    if was_mid > 0 {
        // The rest of a passing message goes first, without a header.
        assert!(r.forward >= was_mid.min(buf.len()));
    }
    if r.stopped {
        assert!(!scanner.mid_message(), "stopped in the middle of a message");
        let rest = &buf[r.forward..];
        assert!(rest.len() >= 5, "stopped without a whole header");
        let total = checked_len(rest[0], &rest[1..5], limit);
        assert!(
            total.is_ok(),
            "stopped at a header the scanner should have refused"
        );
        return;
    }
    if scanner.mid_message() {
        // A passing message runs past the buffer: all of it goes.
        assert_eq!(r.forward, buf.len());
        return;
    }
    let rest = &buf[r.forward..];
    if rest.len() >= 5 {
        // What stays behind is one message waiting to be inspected whole.
        let total = checked_len(rest[0], &rest[1..5], limit)
            .expect("left a header behind that the scanner should have refused");
        assert!(total > rest.len(), "left a whole message behind");
    }
}

/// Client → server, as `Session::scan_client` drives it.
pub struct Client<'a> {
    pub t: Tracker,
    pub shapes: Option<&'a tidepool::stats::Fingerprints>,
}

impl Side for Client<'_> {
    fn scan(
        &mut self,
        scanner: &mut Scanner,
        buf: &[u8],
        seen: &mut Vec<(u8, Vec<u8>)>,
    ) -> Result<Scanned, ProtocolError> {
        let mut r = Recording {
            inner: self.t.client_side(self.shapes),
            seen,
        };
        scanner.scan(buf, &mut r)
    }

    fn on_stop(&mut self, _buf: &[u8], _out: &mut Vec<u8>) -> Result<OnStop, ProtocolError> {
        Ok(if self.t.terminated || self.t.reroute {
            OnStop::End
        } else {
            OnStop::Consume
        })
    }

    fn consumed(&mut self, msg: &[u8]) -> Result<(), ProtocolError> {
        // As the session's handler does while skipping to a Sync.
        let t = &mut self.t;
        if t.batch == Batch::Skipping && FrontendTag::from_byte(msg[0]) == FrontendTag::Sync {
            t.batch = Batch::Synced;
            t.expect.push(tidepool::server::expect::Owed::Sync);
        }
        Ok(())
    }
}

/// Server → client, as `scan_server` in the session drives it.
pub struct Server {
    pub t: Tracker,
    pub params: Vec<(String, String)>,
    /// The message being consumed is an ErrorResponse tidepool provoked.
    pub swallowing_error: bool,
}

impl Side for Server {
    fn scan(
        &mut self,
        scanner: &mut Scanner,
        buf: &[u8],
        seen: &mut Vec<(u8, Vec<u8>)>,
    ) -> Result<Scanned, ProtocolError> {
        let mut r = Recording {
            inner: self.t.server_side(&mut self.params),
            seen,
        };
        scanner.scan(buf, &mut r)
    }

    fn on_stop(&mut self, buf: &[u8], out: &mut Vec<u8>) -> Result<OnStop, ProtocolError> {
        let t = &mut self.t;
        if t.server_fatal.is_some() {
            return Ok(OnStop::End);
        }
        if t.expect.head_is_synthetic() {
            let mut b = BytesMut::new();
            t.expect.take_synthetic(&mut b);
            out.extend_from_slice(&b);
            return Ok(OnStop::Rescan);
        }
        if t.expect.head_is_internal() {
            return Ok(OnStop::Consume);
        }
        if t.expect.swallows(buf[0]) {
            if buf[0] == BackendTag::ErrorResponse.byte() {
                // The error tidepool made the server give: dropped whole.
                self.swallowing_error = true;
                return Ok(OnStop::Consume);
            }
            if checked_len(buf[0], &buf[1..5], 5)? != 5 {
                return Err(ProtocolError::Malformed("ParseComplete/CloseComplete"));
            }
            t.expect.on_message(buf[0]);
            return Ok(OnStop::ConsumeNow(5));
        }
        panic!("the server scan stopped for no reason the session handles");
    }

    fn consumed(&mut self, msg: &[u8]) -> Result<(), ProtocolError> {
        let t = &mut self.t;
        if std::mem::take(&mut self.swallowing_error) {
            t.expect.on_message(msg[0]);
            return Ok(());
        }
        if msg[0] == BackendTag::ReadyForQuery.byte() {
            t.status = ready_for_query(&msg[5..])?;
            t.expect.on_message(msg[0]);
        }
        Ok(())
    }
}

/// The tracker state two equivalent runs must share.
#[derive(Debug, PartialEq)]
pub struct TrackerState {
    pub pending: u32,
    pub batch: Batch,
    pub status: TxStatus,
    pub copy: Copy,
    pub terminated: bool,
    pub server_fatal: Option<String>,
    pub params_changed: bool,
    pub pin: Option<&'static str>,
    pub custom_params: Vec<String>,
    pub reroute: bool,
    pub expect_empty: bool,
    pub skipping: bool,
}

pub fn tracker_state(t: &Tracker) -> TrackerState {
    TrackerState {
        pending: t.expect.ready_owed(),
        batch: t.batch,
        status: t.status,
        copy: t.copy,
        terminated: t.terminated,
        server_fatal: t.server_fatal.as_ref().map(|f| format!("{f:?}")),
        params_changed: t.params_changed,
        pin: t.pin,
        custom_params: t.custom_params.clone(),
        reroute: t.reroute,
        expect_empty: t.expect.is_empty(),
        skipping: t.expect.skipping(),
    }
}

/// A tracker in a state chosen by `flags`.
pub fn tracker(flags: u8) -> Tracker {
    let status = match flags & 3 {
        0 | 3 => TxStatus::Idle,
        1 => TxStatus::InTransaction,
        _ => TxStatus::Failed,
    };
    let policy = tidepool::client::txn::Policy {
        named_statements: flags & 4 != 0,
        refuse_session_features: flags & 8 != 0,
        listen_shared: flags & 64 != 0,
    };
    let mut t = Tracker::new(status, policy);
    t.copy = match (flags >> 4) & 3 {
        1 => Copy::In,
        2 => Copy::Out,
        _ => Copy::None,
    };
    t
}
