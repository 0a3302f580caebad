//! The PostgreSQL wire protocol, as far as tidepool needs it.
//!
//! Owns: message tags, bounded frame headers, the streaming scanner that lets
//! whole buffers pass while spotting the few messages that change state, the
//! startup-phase packets, and builders for the messages tidepool writes itself.
//!
//! Invariant: every length read from the network is checked against a limit
//! before any memory is reserved for it.

pub mod frame;
pub mod io;
pub mod keepalive;
pub mod messages;
pub mod scan;
pub mod startup;
pub mod stream;
pub mod tag;
pub mod write;

pub use tag::{BackendTag, FrontendTag, TxStatus};

/// What the console reports as `server_version`.
pub const SERVER_VERSION: &str = concat!("1.25.0/tidepool ", env!("CARGO_PKG_VERSION"));

/// Errors found while framing bytes from a peer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("invalid message length {len} for message type '{tag}'")]
    BadLength { tag: char, len: i64 },
    #[error("message of type '{tag}' is {len} bytes, over the limit of {limit}")]
    TooLarge { tag: char, len: usize, limit: usize },
    #[error(
        "invalid message length: message of type '{tag}' is {len} bytes, over PostgreSQL's limit of {} for this type",
        tag::SMALL_MESSAGE_LIMIT + 1
    )]
    SmallTooLarge { tag: char, len: usize },
    #[error("unexpected message type '{0}'")]
    UnexpectedTag(char),
    #[error("malformed {0} message")]
    Malformed(&'static str),
    /// PostgreSQL's words, and its 0A000 (see `error`).
    #[error("unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0")]
    UnsupportedVersion { major: u16, minor: u16 },
    /// A startup packet's length word out of PostgreSQL's bounds.
    #[error("invalid length of startup packet")]
    StartupLength,
}

impl ProtocolError {
    /// A startup packet whose version word `code` is not protocol 3 (or a
    /// request code where a startup packet must come), read as PostgreSQL
    /// reads it: major.minor.
    pub fn unsupported_version(code: i32) -> Self {
        ProtocolError::UnsupportedVersion {
            major: (code >> 16) as u16,
            minor: (code & 0xffff) as u16,
        }
    }
}
