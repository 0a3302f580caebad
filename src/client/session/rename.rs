//! Server errors as the client would have had them directly: tidepool's
//! statement names replaced by the client's, positions moved back into the
//! client's own text.

use super::*;

/// An ErrorResponse body as the client would have had it: statement names
/// its own, the position (`P`) in its own text (`shift` characters back).
///
/// `canceled`: the message of a 57014 tidepool provoked (`query_timeout`).
pub(super) fn rewrite_error(
    body: &[u8],
    statements: &HashMap<String, Arc<Statement>>,
    shift: i32,
    canceled: Option<&str>,
) -> Vec<u8> {
    let is_cancel = canceled.is_some()
        && crate::protocol::messages::error_fields(body)
            .is_ok_and(|f| f.code == crate::error::SqlState::QUERY_CANCELED.0);
    let mut out = Vec::with_capacity(body.len());
    let mut fields = body;
    while let [tag, rest @ ..] = fields {
        if *tag == 0 {
            break;
        }
        let end = memchr::memchr(0, rest).unwrap_or(rest.len());
        let value = &rest[..end];
        out.push(*tag);
        match std::str::from_utf8(value)
            .ok()
            .and_then(|v| v.parse::<i32>().ok())
        {
            Some(p) if *tag == b'P' && shift != 0 && p - shift >= 1 => {
                out.extend_from_slice((p - shift).to_string().as_bytes());
            }
            _ if *tag == b'M' && is_cancel => {
                out.extend_from_slice(canceled.unwrap_or_default().as_bytes());
            }
            _ => out.extend_from_slice(&rename_statements(value, statements)),
        }
        out.push(0);
        fields = rest.get(end + 1..).unwrap_or(&[]);
    }
    out.push(0);
    out
}

/// `text` with each `"tidepool_<hash>"` replaced by the client's name for
/// that statement (the first in name order when it gave it several).
pub(super) fn rename_statements(
    body: &[u8],
    statements: &HashMap<String, Arc<Statement>>,
) -> Vec<u8> {
    let mark = crate::client::txn::INTERNAL_NAME_MARK;
    let mut out = Vec::with_capacity(body.len());
    let mut rest = body;
    while let Some(at) = memchr::memmem::find(rest, mark) {
        let hex_start = at + mark.len();
        let hash = rest
            .get(hex_start..hex_start + 16)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u64::from_str_radix(h, 16).ok());
        let name = hash.and_then(|h| {
            statements
                .iter()
                .filter(|(_, s)| s.hash == h)
                .map(|(n, _)| n)
                .min()
        });
        match name {
            Some(name) => {
                out.extend_from_slice(&rest[..at + 1]);
                out.extend_from_slice(name.as_bytes());
                rest = &rest[hex_start + 16..];
            }
            None => {
                out.extend_from_slice(&rest[..hex_start]);
                rest = &rest[hex_start..];
            }
        }
    }
    out.extend_from_slice(rest);
    out
}
