//! Message tags as enums: the only place where wire tag bytes are spelled out.

/// `from_byte` through a table of every byte's tag (a single load), built
/// at compile time from the type's `decode`.
macro_rules! decode_by_table {
    () => {
        const TABLE: [Self; 256] = {
            let mut t = [Self::Other(0); 256];
            let mut i = 0;
            while i < 256 {
                t[i] = Self::decode(i as u8);
                i += 1;
            }
            t
        };

        pub fn from_byte(b: u8) -> Self {
            Self::TABLE[b as usize]
        }
    };
}

/// PostgreSQL's largest length word for [`FrontendTag::is_small`] messages
/// (`PQ_SMALL_MESSAGE_LIMIT`).
pub const SMALL_MESSAGE_LIMIT: usize = 10_000;

/// The first byte of a message sent by a client (frontend).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrontendTag {
    Query,
    Parse,
    Bind,
    Describe,
    Execute,
    Close,
    Sync,
    Flush,
    CopyData,
    CopyDone,
    CopyFail,
    FunctionCall,
    Terminate,
    /// `p`: PasswordMessage, SASLInitialResponse or SASLResponse.
    Password,
    Other(u8),
}

impl FrontendTag {
    /// Message types that start a transaction when one arrives while the
    /// client has no server.
    pub fn starts_transaction(self) -> bool {
        matches!(
            self,
            Self::Query
                | Self::FunctionCall
                | Self::Parse
                | Self::Bind
                | Self::Describe
                | Self::Execute
                | Self::Close
        )
    }

    /// Message types that carry no client data, whose length word
    /// PostgreSQL limits to [`SMALL_MESSAGE_LIMIT`] (and closes the
    /// connection past it).
    pub fn is_small(self) -> bool {
        matches!(
            self,
            Self::Describe
                | Self::Execute
                | Self::Close
                | Self::Sync
                | Self::Flush
                | Self::CopyDone
                | Self::CopyFail
                | Self::Terminate
        )
    }

    const fn decode(b: u8) -> Self {
        match b {
            b'Q' => Self::Query,
            b'P' => Self::Parse,
            b'B' => Self::Bind,
            b'D' => Self::Describe,
            b'E' => Self::Execute,
            b'C' => Self::Close,
            b'S' => Self::Sync,
            b'H' => Self::Flush,
            b'd' => Self::CopyData,
            b'c' => Self::CopyDone,
            b'f' => Self::CopyFail,
            b'F' => Self::FunctionCall,
            b'X' => Self::Terminate,
            b'p' => Self::Password,
            other => Self::Other(other),
        }
    }

    decode_by_table!();

    pub fn byte(self) -> u8 {
        match self {
            Self::Query => b'Q',
            Self::Parse => b'P',
            Self::Bind => b'B',
            Self::Describe => b'D',
            Self::Execute => b'E',
            Self::Close => b'C',
            Self::Sync => b'S',
            Self::Flush => b'H',
            Self::CopyData => b'd',
            Self::CopyDone => b'c',
            Self::CopyFail => b'f',
            Self::FunctionCall => b'F',
            Self::Terminate => b'X',
            Self::Password => b'p',
            Self::Other(b) => b,
        }
    }

    /// Extended-query messages whose effects last until the next Sync.
    pub fn is_extended(self) -> bool {
        matches!(
            self,
            Self::Parse | Self::Bind | Self::Describe | Self::Execute | Self::Close | Self::Flush
        )
    }
}

/// The first byte of a message sent by a server (backend).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendTag {
    Authentication,
    BackendKeyData,
    ParameterStatus,
    ReadyForQuery,
    ErrorResponse,
    NoticeResponse,
    NotificationResponse,
    CommandComplete,
    DataRow,
    RowDescription,
    CopyInResponse,
    CopyOutResponse,
    CopyBothResponse,
    CopyData,
    CopyDone,
    EmptyQueryResponse,
    ParseComplete,
    BindComplete,
    CloseComplete,
    NoData,
    ParameterDescription,
    PortalSuspended,
    FunctionCallResponse,
    NegotiateProtocolVersion,
    Other(u8),
}

impl BackendTag {
    const fn decode(b: u8) -> Self {
        match b {
            b'R' => Self::Authentication,
            b'K' => Self::BackendKeyData,
            b'S' => Self::ParameterStatus,
            b'Z' => Self::ReadyForQuery,
            b'E' => Self::ErrorResponse,
            b'N' => Self::NoticeResponse,
            b'A' => Self::NotificationResponse,
            b'C' => Self::CommandComplete,
            b'D' => Self::DataRow,
            b'T' => Self::RowDescription,
            b'G' => Self::CopyInResponse,
            b'H' => Self::CopyOutResponse,
            b'W' => Self::CopyBothResponse,
            b'd' => Self::CopyData,
            b'c' => Self::CopyDone,
            b'I' => Self::EmptyQueryResponse,
            b'1' => Self::ParseComplete,
            b'2' => Self::BindComplete,
            b'3' => Self::CloseComplete,
            b'n' => Self::NoData,
            b't' => Self::ParameterDescription,
            b's' => Self::PortalSuspended,
            b'V' => Self::FunctionCallResponse,
            b'v' => Self::NegotiateProtocolVersion,
            other => Self::Other(other),
        }
    }

    decode_by_table!();

    pub fn byte(self) -> u8 {
        match self {
            Self::Authentication => b'R',
            Self::BackendKeyData => b'K',
            Self::ParameterStatus => b'S',
            Self::ReadyForQuery => b'Z',
            Self::ErrorResponse => b'E',
            Self::NoticeResponse => b'N',
            Self::NotificationResponse => b'A',
            Self::CommandComplete => b'C',
            Self::DataRow => b'D',
            Self::RowDescription => b'T',
            Self::CopyInResponse => b'G',
            Self::CopyOutResponse => b'H',
            Self::CopyBothResponse => b'W',
            Self::CopyData => b'd',
            Self::CopyDone => b'c',
            Self::EmptyQueryResponse => b'I',
            Self::ParseComplete => b'1',
            Self::BindComplete => b'2',
            Self::CloseComplete => b'3',
            Self::NoData => b'n',
            Self::ParameterDescription => b't',
            Self::PortalSuspended => b's',
            Self::FunctionCallResponse => b'V',
            Self::NegotiateProtocolVersion => b'v',
            Self::Other(b) => b,
        }
    }
}

/// Transaction status carried by ReadyForQuery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxStatus {
    Idle,
    InTransaction,
    Failed,
}

impl TxStatus {
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            b'I' => Some(Self::Idle),
            b'T' => Some(Self::InTransaction),
            b'E' => Some(Self::Failed),
            _ => None,
        }
    }

    pub fn byte(self) -> u8 {
        match self {
            Self::Idle => b'I',
            Self::InTransaction => b'T',
            Self::Failed => b'E',
        }
    }
}

/// Startup-phase request codes (the "protocol version" field of untagged packets).
pub const PROTOCOL_3_0: i32 = 196_608;
pub const SSL_REQUEST_CODE: i32 = 80_877_103;
pub const GSSENC_REQUEST_CODE: i32 = 80_877_104;
pub const CANCEL_REQUEST_CODE: i32 = 80_877_102;

/// Authentication request subtypes (the int32 after an `R` tag).
pub mod auth_code {
    pub const OK: i32 = 0;
    pub const CLEARTEXT: i32 = 3;
    pub const MD5: i32 = 5;
    pub const SASL: i32 = 10;
    pub const SASL_CONTINUE: i32 = 11;
    pub const SASL_FINAL: i32 = 12;
}
