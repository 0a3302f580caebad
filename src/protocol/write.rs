//! Builders for the messages tidepool writes itself. Each appends one complete
//! message to a caller-owned buffer, so a batch goes out in one write.

use bytes::{BufMut, BytesMut};

use super::tag::{BackendTag, FrontendTag, TxStatus, auth_code};

/// Appends a tagged message whose body is written by `body`, fixing up the length.
pub fn message(buf: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    buf.put_u8(tag);
    let at = buf.len();
    buf.put_i32(0);
    body(buf);
    let len = (buf.len() - at) as i32;
    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

/// NegotiateProtocolVersion: the newest version of protocol 3 that tidepool
/// speaks (the whole version word, 3.minor, as PostgreSQL sends it: libpq
/// reads it so), and the protocol options (`_pq_.*`) it did not know.
pub fn negotiate_protocol_version(buf: &mut BytesMut, newest_minor: u16, unknown: &[&str]) {
    message(buf, b'v', |b| {
        b.put_i32(super::tag::PROTOCOL_3_0 | i32::from(newest_minor));
        b.put_i32(unknown.len() as i32);
        for o in unknown {
            cstr(b, o);
        }
    });
}

fn cstr(buf: &mut BytesMut, s: &str) {
    buf.put_slice(s.as_bytes());
    buf.put_u8(0);
}

pub fn error_response(buf: &mut BytesMut, severity: &str, code: &str, msg: &str) {
    error_response_with(buf, severity, code, msg, &[]);
}

/// An ErrorResponse with more fields (`(b'D', detail)`, `(b'H', hint)`, …);
/// empty values are left out.
pub fn error_response_with(
    buf: &mut BytesMut,
    severity: &str,
    code: &str,
    msg: &str,
    more: &[(u8, &str)],
) {
    fields_message(buf, BackendTag::ErrorResponse, severity, code, msg, more);
}

/// A NoticeResponse (severity WARNING): something the client should know
/// that is not an error.
pub fn notice_response(buf: &mut BytesMut, code: &str, msg: &str) {
    fields_message(buf, BackendTag::NoticeResponse, "WARNING", code, msg, &[]);
}

/// A NoticeResponse of severity NOTICE (SQLSTATE 00000), as PostgreSQL's
/// informational notices.
pub fn notice(buf: &mut BytesMut, msg: &str) {
    fields_message(buf, BackendTag::NoticeResponse, "NOTICE", "00000", msg, &[]);
}

fn fields_message(
    buf: &mut BytesMut,
    tag: BackendTag,
    severity: &str,
    code: &str,
    msg: &str,
    more: &[(u8, &str)],
) {
    message(buf, tag.byte(), |b| {
        b.put_u8(b'S');
        cstr(b, severity);
        b.put_u8(b'V');
        cstr(b, severity);
        b.put_u8(b'C');
        cstr(b, code);
        b.put_u8(b'M');
        cstr(b, msg);
        for (field, value) in more.iter().filter(|(_, v)| !v.is_empty()) {
            b.put_u8(*field);
            cstr(b, value);
        }
        b.put_u8(0);
    });
}

/// CommandComplete with its tag (`BEGIN`, `INSERT 0 1`, …).
pub fn command_complete(buf: &mut BytesMut, tag: &str) {
    message(buf, BackendTag::CommandComplete.byte(), |b| {
        b.put_slice(tag.as_bytes());
        b.put_u8(0);
    });
}

pub fn ready_for_query(buf: &mut BytesMut, status: TxStatus) {
    message(buf, BackendTag::ReadyForQuery.byte(), |b| {
        b.put_u8(status.byte())
    });
}

pub fn parameter_status(buf: &mut BytesMut, name: &str, value: &str) {
    message(buf, BackendTag::ParameterStatus.byte(), |b| {
        cstr(b, name);
        cstr(b, value);
    });
}

pub fn backend_key_data(buf: &mut BytesMut, pid: i32, secret: i32) {
    message(buf, BackendTag::BackendKeyData.byte(), |b| {
        b.put_i32(pid);
        b.put_i32(secret);
    });
}

pub fn auth_ok(buf: &mut BytesMut) {
    auth_request(buf, auth_code::OK, &[]);
}

pub fn auth_request(buf: &mut BytesMut, code: i32, data: &[u8]) {
    message(buf, BackendTag::Authentication.byte(), |b| {
        b.put_i32(code);
        b.put_slice(data);
    });
}

pub fn auth_sasl_mechanisms(buf: &mut BytesMut, mechanisms: &[&str]) {
    message(buf, BackendTag::Authentication.byte(), |b| {
        b.put_i32(auth_code::SASL);
        for m in mechanisms {
            cstr(b, m);
        }
        b.put_u8(0);
    });
}

pub fn query(buf: &mut BytesMut, sql: &str) {
    message(buf, FrontendTag::Query.byte(), |b| cstr(b, sql));
}

/// A Query of text made from a client's: `foreign` when it was read with
/// `messages::foreign_text` (a client encoding other than UTF-8), whose
/// bytes are given back as the client sent them.
pub fn query_text(buf: &mut BytesMut, sql: &str, foreign: bool) {
    if foreign {
        message(buf, FrontendTag::Query.byte(), |b| {
            b.put_slice(&super::messages::foreign_bytes(sql));
            b.put_u8(0);
        });
    } else {
        query(buf, sql);
    }
}

pub fn terminate(buf: &mut BytesMut) {
    message(buf, FrontendTag::Terminate.byte(), |_| {});
}

pub fn password(buf: &mut BytesMut, data: &[u8]) {
    message(buf, FrontendTag::Password.byte(), |b| b.put_slice(data));
}

pub fn sasl_initial_response(buf: &mut BytesMut, mechanism: &str, data: &[u8]) {
    message(buf, FrontendTag::Password.byte(), |b| {
        cstr(b, mechanism);
        b.put_i32(data.len() as i32);
        b.put_slice(data);
    });
}

/// The untagged startup packet: protocol 3.0 and `key\0value\0` pairs.
pub fn startup(buf: &mut BytesMut, params: &[(&str, &str)]) {
    let at = buf.len();
    buf.put_i32(0);
    buf.put_i32(super::tag::PROTOCOL_3_0);
    for (k, v) in params {
        cstr(buf, k);
        cstr(buf, v);
    }
    buf.put_u8(0);
    let len = (buf.len() - at) as i32;
    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

pub fn cancel_request(buf: &mut BytesMut, pid: i32, secret: i32) {
    buf.put_i32(16);
    buf.put_i32(super::tag::CANCEL_REQUEST_CODE);
    buf.put_i32(pid);
    buf.put_i32(secret);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_are_fixed_up() {
        let mut b = BytesMut::new();
        ready_for_query(&mut b, TxStatus::Idle);
        assert_eq!(&b[..], &[b'Z', 0, 0, 0, 5, b'I']);
        let mut b = BytesMut::new();
        startup(&mut b, &[("user", "a")]);
        assert_eq!(b.len(), 4 + 4 + 5 + 2 + 1);
        assert_eq!(
            i32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize,
            b.len()
        );
    }
}
