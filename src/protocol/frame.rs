//! Reading one whole tagged message, for the startup and authentication
//! phases where tidepool reads message by message (the data path uses
//! [`super::scan`] instead).

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use super::ProtocolError;
use super::scan::checked_len;

/// A complete message: its tag and body (length word removed).
#[derive(Debug)]
pub struct Frame {
    pub tag: u8,
    pub body: BytesMut,
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("connection closed")]
    Eof,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Reads one message through `buf` (bytes after it stay in `buf`).
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    limit: usize,
) -> Result<Frame, FrameError> {
    loop {
        if buf.len() >= 5 {
            let total = checked_len(buf[0], &buf[1..5], limit)?;
            if buf.len() >= total {
                let mut msg = buf.split_to(total);
                let tag = msg[0];
                msg.advance(5);
                return Ok(Frame { tag, body: msg });
            }
            buf.reserve(total - buf.len());
        } else {
            buf.reserve(512);
        }
        if r.read_buf(buf).await? == 0 {
            return Err(FrameError::Eof);
        }
    }
}
