//! Typed, borrowed views of the few messages tidepool reads the body of.
//! Parsing happens once, at the edge, into these types.

use super::{ProtocolError, TxStatus};

/// A cursor over a message body.
pub struct Body<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Body<'a> {
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Self { buf, what }
    }

    fn err(&self) -> ProtocolError {
        ProtocolError::Malformed(self.what)
    }

    pub fn i32(&mut self) -> Result<i32, ProtocolError> {
        match self.buf {
            [a, b, c, d, rest @ ..] => {
                self.buf = rest;
                Ok(i32::from_be_bytes([*a, *b, *c, *d]))
            }
            _ => Err(self.err()),
        }
    }

    pub fn i16(&mut self) -> Result<i16, ProtocolError> {
        match self.buf {
            [a, b, rest @ ..] => {
                self.buf = rest;
                Ok(i16::from_be_bytes([*a, *b]))
            }
            _ => Err(self.err()),
        }
    }

    pub fn u8(&mut self) -> Result<u8, ProtocolError> {
        match self.buf {
            [a, rest @ ..] => {
                self.buf = rest;
                Ok(*a)
            }
            _ => Err(self.err()),
        }
    }

    /// A NUL-terminated UTF-8 string.
    pub fn cstr(&mut self) -> Result<&'a str, ProtocolError> {
        // Names are mostly empty ("" is the unnamed statement or portal).
        let end = match self.buf.first() {
            Some(0) => {
                self.buf = &self.buf[1..];
                return Ok("");
            }
            _ => memchr::memchr(0, self.buf).ok_or(ProtocolError::Malformed(self.what))?,
        };
        let s = std::str::from_utf8(&self.buf[..end]).map_err(|_| self.err())?;
        self.buf = &self.buf[end + 1..];
        Ok(s)
    }

    /// A NUL-terminated SQL text. UTF-8 (or ASCII) text is borrowed. Text
    /// in another client encoding (LATIN1, EUC_JP, SJIS, ...) is read one
    /// char per byte (see [`foreign_text`]): every ASCII byte stays where it
    /// was, so the lexer and the classifier read its structure, and the
    /// bytes come back exactly with [`foreign_bytes`].
    pub fn sql(&mut self) -> Result<std::borrow::Cow<'a, str>, ProtocolError> {
        // Most SQL is ASCII: one pass finds its end and proves it UTF-8.
        if let Some(end) = ascii_until_nul(self.buf) {
            let (text, rest) = self.buf.split_at(end);
            self.buf = &rest[1..];
            // SAFETY: every byte of `text` is below 0x80 (`ascii_until_nul`),
            // and ASCII is valid UTF-8.
            return Ok(std::borrow::Cow::Borrowed(unsafe {
                std::str::from_utf8_unchecked(text)
            }));
        }
        let b = self.cbytes()?;
        Ok(match std::str::from_utf8(b) {
            Ok(s) => std::borrow::Cow::Borrowed(s),
            Err(_) => std::borrow::Cow::Owned(foreign_text(b)),
        })
    }

    /// A NUL-terminated field as bytes, in whatever encoding.
    pub fn cbytes(&mut self) -> Result<&'a [u8], ProtocolError> {
        let end = memchr::memchr(0, self.buf).ok_or(ProtocolError::Malformed(self.what))?;
        let s = &self.buf[..end];
        self.buf = &self.buf[end + 1..];
        Ok(s)
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.buf.len() < n {
            return Err(self.err());
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

pub fn ready_for_query(body: &[u8]) -> Result<TxStatus, ProtocolError> {
    match body {
        [b] => TxStatus::from_byte(*b).ok_or(ProtocolError::Malformed("ReadyForQuery")),
        _ => Err(ProtocolError::Malformed("ReadyForQuery")),
    }
}

pub fn parameter_status(body: &[u8]) -> Result<(&str, &str), ProtocolError> {
    let mut b = Body::new(body, "ParameterStatus");
    Ok((b.cstr()?, b.cstr()?))
}

pub fn backend_key_data(body: &[u8]) -> Result<(i32, i32), ProtocolError> {
    let mut b = Body::new(body, "BackendKeyData");
    Ok((b.i32()?, b.i32()?))
}

/// The fields of an ErrorResponse or NoticeResponse that tidepool cares about.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorFields {
    pub severity: String,
    pub code: String,
    pub message: String,
    /// `D`, `H` and `P`, empty when absent.
    pub detail: String,
    pub hint: String,
    pub position: String,
    /// `R`: the PostgreSQL function that raised it (never translated).
    pub routine: String,
}

impl ErrorFields {
    /// A hot standby refusing a transaction because it would be
    /// serializable (`default_transaction_isolation = serializable`, from
    /// the session, the role, the database or the server's configuration):
    /// 0A000 from `GetSerializableTransactionSnapshot`. Such a session's
    /// transactions can only run on the primary.
    pub fn is_standby_serializable_refusal(&self) -> bool {
        self.code == "0A000" && self.routine == "GetSerializableTransactionSnapshot"
    }
}

/// The fields tidepool reads. Texts are in the client's encoding, which may
/// not be UTF-8 (a LATIN9 client gets LATIN9 messages): they are read
/// lossily here, and the message itself is forwarded byte for byte.
pub fn error_fields(body: &[u8]) -> Result<ErrorFields, ProtocolError> {
    let mut b = Body::new(body, "ErrorResponse");
    let mut out = ErrorFields::default();
    loop {
        let field = b.u8()?;
        if field == 0 {
            return Ok(out);
        }
        let value = String::from_utf8_lossy(b.cbytes()?).into_owned();
        match field {
            b'V' => out.severity = value,
            b'S' if out.severity.is_empty() => out.severity = value,
            b'C' => out.code = value,
            b'M' => out.message = value,
            b'D' => out.detail = value,
            b'H' => out.hint = value,
            b'P' => out.position = value,
            b'R' => out.routine = value,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_error_fields() {
        let body = b"SERROR\0VERROR\0C42601\0Msyntax error\0\0";
        let e = error_fields(body).unwrap();
        assert_eq!(e.code, "42601");
        assert_eq!(e.message, "syntax error");
        assert_eq!(e.severity, "ERROR");
    }

    #[test]
    fn a_standby_serializable_refusal_is_known_by_code_and_routine() {
        let body = b"SERROR\0VERROR\0C0A000\0Mpas en mode s\xe9rialisable\0RGetSerializableTransactionSnapshot\0\0";
        let e = error_fields(body).unwrap();
        assert!(e.is_standby_serializable_refusal(), "{e:?}");
        let other = b"SERROR\0VERROR\0C0A000\0Mnot supported\0Rtransformx\0\0";
        assert!(
            !error_fields(other)
                .unwrap()
                .is_standby_serializable_refusal()
        );
    }

    #[test]
    fn error_texts_in_other_encodings_are_read_not_refused() {
        // "é" in LATIN9 is the single byte 0xE9.
        let body = b"SERROR\0VERROR\0C22P02\0Mcaf\xe9 invalide\0\0";
        let e = error_fields(body).unwrap();
        assert_eq!(e.code, "22P02");
        assert_eq!(e.severity, "ERROR");
        assert!(e.message.starts_with("caf"));
    }

    #[test]
    fn malformed_bodies_are_errors_not_panics() {
        assert!(error_fields(b"C42").is_err());
        assert!(parameter_status(b"a\0").is_err());
        assert!(backend_key_data(b"\0\0").is_err());
        assert!(ready_for_query(b"X").is_err());
        assert!(ready_for_query(b"").is_err());
    }
}

/// Where the first NUL of `b` is, when every byte before it is ASCII; None
/// when a byte above 0x7F comes first or there is no NUL (the caller reads
/// the text the slow way). Eight bytes at a time.
pub fn ascii_until_nul(b: &[u8]) -> Option<usize> {
    const LOW: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let mut words = b.chunks_exact(8);
    let mut at = 0;
    for w in &mut words {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(w);
        let v = u64::from_le_bytes(bytes);
        // A high bit where a byte is zero or above 0x7F.
        if (v.wrapping_sub(LOW) & !v & HIGH) | (v & HIGH) != 0 {
            break;
        }
        at += 8;
    }
    for (i, &c) in b[at..].iter().enumerate() {
        match c {
            0 => return Some(at + i),
            0x80.. => return None,
            _ => {}
        }
    }
    None
}

/// Text that is not UTF-8, one char per byte (byte `b` is char `U+00b`):
/// bytes 0x80 and up become chars that are never ASCII, so nothing in the
/// text can pass for a quote, a semicolon or a keyword that was not there.
pub fn foreign_text(b: &[u8]) -> String {
    b.iter().map(|&c| char::from(c)).collect()
}

/// The bytes [`foreign_text`] read, with any ASCII text inserted since
/// (names tidepool puts in); a char above U+00FF (never produced by
/// `foreign_text`) is written as UTF-8.
pub fn foreign_bytes(s: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    for c in s.chars() {
        match u8::try_from(u32::from(c)) {
            Ok(b) => out.push(b),
            Err(_) => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
        }
    }
    out
}

#[cfg(test)]
mod foreign_tests {
    use super::*;

    #[test]
    fn the_ascii_scan_finds_the_first_nul_or_gives_up_at_a_high_byte() {
        // Every length around the eight-byte steps, the NUL and a high byte
        // at every place: the same answer as a byte-by-byte look.
        for len in 0..40usize {
            for special in [0u8, 0x80, 0xff, 0xc3] {
                for at in 0..=len {
                    let mut b: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
                    if at < len {
                        b[at] = special;
                    }
                    b.push(0);
                    let slow = match b.iter().position(|&c| c == 0 || c >= 0x80) {
                        Some(i) if b[i] == 0 => Some(i),
                        _ => None,
                    };
                    assert_eq!(ascii_until_nul(&b), slow, "{b:?}");
                }
            }
        }
        assert_eq!(ascii_until_nul(b"select 1"), None, "no NUL");
        // 0x01 bytes next to a zero do not hide it (borrows across bytes).
        assert_eq!(
            ascii_until_nul(b"\x01\x01\x00\x01\x01\x01\x01\x01\x01"),
            Some(2)
        );
        let mut b = Body::new(b"select 1\0\x01", "Query");
        assert_eq!(b.sql().unwrap(), "select 1");
        assert_eq!(b.rest(), b"\x01");
    }

    #[test]
    fn foreign_text_round_trips_every_byte_and_keeps_ascii_in_place() {
        let all: Vec<u8> = (1..=255).collect();
        let text = foreign_text(&all);
        assert_eq!(text.chars().count(), all.len());
        assert_eq!(foreign_bytes(&text), all);
        // SJIS 0x95 0x5C: the second byte is a backslash in both readings.
        let t = foreign_text(b"select '\x95\\'");
        assert_eq!(
            foreign_bytes(&format!("EXECUTE x{t}")),
            b"EXECUTE xselect '\x95\\'"
        );
        let mut b = Body::new(b"caf\xe9\0", "Query");
        assert!(matches!(b.sql().unwrap(), std::borrow::Cow::Owned(ref s) if s == "caf\u{e9}"));
        let mut b = Body::new("caf\u{e9}\0".as_bytes(), "Query");
        assert!(matches!(
            b.sql().unwrap(),
            std::borrow::Cow::Borrowed("caf\u{e9}")
        ));
    }
}
