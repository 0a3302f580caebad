//! Bytes on the wire for differential tests: writing a request split at
//! chosen byte boundaries, reading answers, and a normal form of answers
//! that can be compared between PostgreSQL and tidepool.

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::raw::Msg;

/// How the bytes go out.
#[derive(Debug, Clone, Copy)]
pub enum Split {
    Whole,
    /// Random chunk sizes from this seed (tiny ones included).
    Random(u64),
    Bytewise,
}

/// xorshift64*: a reproducible stream of chunk sizes.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

pub async fn write_split(
    stream: &mut TcpStream,
    bytes: &[u8],
    split: Split,
) -> std::io::Result<()> {
    match split {
        Split::Whole => stream.write_all(bytes).await,
        Split::Bytewise => {
            for b in bytes {
                stream.write_all(std::slice::from_ref(b)).await?;
            }
            Ok(())
        }
        Split::Random(seed) => {
            let mut rng = Rng(seed | 1);
            let mut at = 0;
            while at < bytes.len() {
                let left = (bytes.len() - at) as u64;
                let n = if rng.below(4) == 0 {
                    1 + rng.below(8)
                } else {
                    1 + rng.below((bytes.len() as u64 / 4).max(16))
                };
                let n = n.min(left) as usize;
                stream.write_all(&bytes[at..at + n]).await?;
                at += n;
            }
            Ok(())
        }
    }
}

/// A message, as compared: ParameterStatus and BackendKeyData differ by
/// design (tidepool issues its own keys), so they are left out; errors and
/// notices are compared field by field except the server's source location.
pub fn normalize(msgs: &[Msg]) -> Vec<String> {
    msgs.iter()
        .filter(|m| !matches!(m.tag, b'S' | b'K'))
        .map(|m| match m.tag {
            b'E' | b'N' => {
                let mut fields: Vec<String> = m
                    .body
                    .split(|&b| b == 0)
                    .filter(|f| !f.is_empty() && !matches!(f[0], b'F' | b'L' | b'R'))
                    .map(|f| format!("{}={}", f[0] as char, shorten(&f[1..])))
                    .collect();
                fields.sort();
                format!("{}({})", m.tag as char, fields.join("|"))
            }
            // AuthenticationSASLContinue carries a random server nonce: its
            // kind is what can be compared.
            b'R' if m.body.get(..4) == Some(&11i32.to_be_bytes()[..]) => "R(SASLContinue)".into(),
            // Long bodies (rows of a 2 MiB value) are compared by digest.
            _ if m.body.len() > 256 => format!(
                "{}(len {}, crc {:08x})",
                m.tag as char,
                m.body.len(),
                crc(&m.body)
            ),
            _ => format!("{}({})", m.tag as char, String::from_utf8_lossy(&m.body)),
        })
        .collect()
}

/// Text of a field, long ones by length and digest (a 1 MiB name would
/// drown the assertion message).
pub fn shorten(b: &[u8]) -> String {
    if b.len() > 200 {
        format!(
            "{}…(len {}, crc {:08x})",
            String::from_utf8_lossy(&b[..40]),
            b.len(),
            crc(b)
        )
    } else {
        String::from_utf8_lossy(b).into_owned()
    }
}

pub fn crc(b: &[u8]) -> u32 {
    // FNV-1a is enough to tell two answers apart.
    b.iter().fold(0x811c_9dc5u32, |h, &x| {
        (h ^ u32::from(x)).wrapping_mul(0x0100_0193)
    })
}

/// Reads messages until ReadyForQuery, an authentication request that needs
/// an answer (`stop_at_auth`), or the end of the connection.
pub async fn read_answer(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    stop_at_auth: bool,
) -> Vec<Msg> {
    let mut out = Vec::new();
    loop {
        while buf.len() >= 5 {
            let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if buf.len() < len + 1 {
                break;
            }
            let m = buf.split_to(len + 1);
            let msg = Msg {
                tag: m[0],
                body: m[5..].to_vec(),
            };
            let auth_wanted = msg.tag == b'R' && msg.body.get(..4) != Some(&[0, 0, 0, 0][..]);
            let done = msg.tag == b'Z' || (stop_at_auth && auth_wanted);
            out.push(msg);
            if done {
                return out;
            }
        }
        buf.reserve(64 * 1024);
        match tokio::time::timeout(Duration::from_secs(60), stream.read_buf(buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                out.push(Msg {
                    tag: b'!',
                    body: b"closed".to_vec(),
                });
                return out;
            }
            Ok(Ok(_)) => {}
            Err(_) => panic!("no answer within 60 s (so far: {:?})", normalize(&out)),
        }
    }
}
