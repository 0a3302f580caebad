//! The one table from failures to what a client is told: SQLSTATE, severity
//! and message. No other module picks a SQLSTATE.

use std::time::Duration;

use bytes::BytesMut;

use crate::protocol::ProtocolError;
use crate::protocol::write;

/// A SQLSTATE code, named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SqlState(pub &'static str);

impl SqlState {
    pub const PROTOCOL_VIOLATION: Self = Self("08P01");
    pub const CONNECTION_FAILURE: Self = Self("08006");
    pub const SQLCLIENT_UNABLE_TO_ESTABLISH: Self = Self("08001");
    pub const INVALID_PASSWORD: Self = Self("28P01");
    pub const INVALID_AUTHORIZATION: Self = Self("28000");
    pub const UNKNOWN_DATABASE: Self = Self("3D000");
    pub const TOO_MANY_CONNECTIONS: Self = Self("53300");
    pub const ADMIN_SHUTDOWN: Self = Self("57P01");
    pub const IDLE_IN_TRANSACTION_TIMEOUT: Self = Self("25P03");
    pub const IDLE_SESSION_TIMEOUT: Self = Self("57P05");
    pub const QUERY_CANCELED: Self = Self("57014");
    pub const CONFIGURATION_LIMIT_EXCEEDED: Self = Self("53400");
    pub const OUT_OF_MEMORY: Self = Self("53200");
    pub const FEATURE_NOT_SUPPORTED: Self = Self("0A000");
    pub const INTERNAL: Self = Self("XX000");
    pub const INVALID_PARAMETER_VALUE: Self = Self("22023");
    pub const DUPLICATE_PREPARED_STATEMENT: Self = Self("42P05");
    pub const IN_FAILED_TRANSACTION: Self = Self("25P02");
    pub const UNDEFINED_PREPARED_STATEMENT: Self = Self("26000");
    /// Also what a server says when a cached plan's result changed.
    pub const CACHED_PLAN_CHANGED: Self = Self("0A000");
    /// What a replica answers to a write: read-only transaction.
    pub const READ_ONLY_TRANSACTION: Self = Self("25006");
    pub const SYNTAX_ERROR: Self = Self("42601");
    pub const INSUFFICIENT_PRIVILEGE: Self = Self("42501");
    pub const OBJECT_NOT_IN_PREREQUISITE_STATE: Self = Self("55000");
    pub const CONFIG_FILE_ERROR: Self = Self("F0000");
    pub const SUCCESSFUL_COMPLETION: Self = Self("00000");
    pub const PROGRAM_LIMIT_EXCEEDED: Self = Self("54000");
    pub const CANNOT_CONNECT_NOW: Self = Self("57P03");
}

/// ERROR ends the current request; FATAL ends the client's connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        }
    }
}

/// Everything that can go wrong for one client, as the client will see it.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{}", client_protocol_text(.0))]
    Protocol(#[from] ProtocolError),
    #[error("password authentication failed for user \"{0}\"")]
    AuthFailed(String),
    #[error("{0}")]
    AuthProtocol(String),
    #[error("no PostgreSQL user name specified in startup packet")]
    NoUser,
    /// No line of `auth_hba_file` matches (PostgreSQL's words).
    #[error("no pg_hba.conf entry for host \"{}\", user \"{}\", database \"{}\", {}", .0.host, .0.user, .0.database, .0.encryption())]
    HbaNoEntry(Box<HbaPeer>),
    /// The first matching line of `auth_hba_file` says `reject`.
    #[error("pg_hba.conf rejects connection for host \"{}\", user \"{}\", database \"{}\", {}", .0.host, .0.user, .0.database, .0.encryption())]
    HbaRejected(Box<HbaPeer>),
    /// The client's address failed to log in too often: refused, before
    /// any password exchange, for this much longer.
    #[error("too many failed logins from this address; try again in {} s", .0.as_secs().max(1))]
    LoginThrottled(Duration),
    /// `client_tls_sslmode` requires TLS and the client did not ask for it.
    #[error("TLS is required (client_tls_sslmode): connect with sslmode=require or stronger")]
    TlsRequired,
    /// An HBA `cert` line for a client without a TLS client certificate.
    #[error("connection requires a valid client certificate")]
    CertificateRequired,
    /// An HBA `cert` line, and the certificate names someone else.
    #[error("certificate authentication failed for user \"{0}\"")]
    CertificateMismatch(String),
    /// An HBA line with `clientcert=verify-full`, and the certificate
    /// names someone else.
    #[error("certificate validation (clientcert=verify-full) failed for user \"{0}\": CN mismatch")]
    CertificateNameMismatch(String),
    #[error("database \"{0}\" does not exist")]
    UnknownDatabase(String),
    #[error("unsupported startup parameter: {0}")]
    UnsupportedStartup(String),
    #[error("no more connections allowed (max_client_conn = {0})")]
    TooManyClients(u32),
    /// A per-database or per-user client cap (its setting, its value).
    #[error("no more connections allowed ({0} = {1})")]
    ClientCap(&'static str, u32),
    #[error(
        "query_wait_timeout: no server connection became free in pool {database}/{user} within {waited:?}{detail}"
    )]
    PoolTimeout {
        database: String,
        user: String,
        waited: Duration,
        /// Who holds the pool and what to change (empty when unknown).
        detail: String,
    },
    #[error("could not connect to server for database \"{database}\": {reason}")]
    ServerConnect { database: String, reason: String },
    #[error("server login failed: {message}")]
    ServerLogin { code: String, message: String },
    /// A replica's server connection whose transactions would be
    /// serializable (a hot standby refuses them); routing takes the primary
    /// instead, so clients do not see it.
    #[error("cannot use serializable mode in a hot standby")]
    ReplicaSerializable,
    #[error("server connection lost during the transaction; it was rolled back: {0}")]
    ServerLost(String),
    #[error("client_login_timeout: login not completed in time")]
    LoginTimeout,
    #[error("idle_transaction_timeout: transaction idle for longer than {0:?}")]
    IdleTransactionTimeout(Duration),
    #[error("client_idle_timeout: connection idle for longer than {0:?}")]
    ClientIdleTimeout(Duration),
    /// The next message would pass `max_client_buffer_bytes`.
    #[error(
        "out of memory: buffering this message would pass max_client_buffer_bytes ({0} bytes for all clients)"
    )]
    BufferBudget(usize),
    /// Over a `[rate_limits]` tier (the transaction did not run).
    #[error("rate limit exceeded for {} \"{}\" (tier {}: {})", .0.scope, .0.name, .0.tier.name, .0.tier.describe())]
    RateLimited(Box<crate::ratelimit::Refused>),
    #[error("tidepool is shutting down")]
    Shutdown,
    #[error("connection killed by an administrator (KILL)")]
    Killed,
    /// A session tied to its server (pinned, or session mode) whose
    /// server's backend a failover fenced: its state cannot follow.
    #[error(
        "terminating connection: its session state is on {0}, which takes no writes since a failover moved them (fenced); reconnect"
    )]
    Fenced(String),
    #[error("user \"{0}\" is not allowed on the admin console (not in admin_users or stats_users)")]
    AdminNotAllowed(String),
    #[error("internal error in tidepool: {0}")]
    Internal(String),
    /// A LISTEN tidepool could not make good (`listen_mode = "shared"`).
    #[error("could not LISTEN: {0}")]
    Listen(String),
    /// More notifications waited for the client than
    /// `max_queued_notifications`: it was not taking them.
    #[error(
        "too many notifications queued for this client (max_queued_notifications = {0}): it is not reading them"
    )]
    NotificationOverflow(u32),
    /// A statement in a transaction tidepool began for the client and whose
    /// first statement failed before a server ran it (PostgreSQL's words).
    #[error("current transaction is aborted, commands ignored until end of transaction block")]
    InFailedTransaction,
    /// PostgreSQL refused a startup parameter's value (its code and words).
    #[error("{}", .0.message)]
    ParameterRefused(Box<crate::protocol::messages::ErrorFields>),
}

/// Who a refused login was, as PostgreSQL's HBA messages name it.
#[derive(Debug)]
pub struct HbaPeer {
    pub host: String,
    pub user: String,
    pub database: String,
    pub tls: bool,
}

impl HbaPeer {
    fn encryption(&self) -> &'static str {
        if self.tls {
            "SSL encryption"
        } else {
            "no encryption"
        }
    }
}

/// A client's protocol error in its words; a message over the size limit
/// names the setting that sets it.
fn client_protocol_text(e: &ProtocolError) -> String {
    match e {
        ProtocolError::TooLarge { tag, len, limit } => format!(
            "protocol violation: message of type '{tag}' is {len} bytes, over max_message_size ({limit} bytes)"
        ),
        // PostgreSQL's own words.
        ProtocolError::UnsupportedVersion { .. } | ProtocolError::StartupLength => e.to_string(),
        e => format!("protocol violation: {e}"),
    }
}

impl ClientError {
    pub fn sqlstate(&self) -> SqlState {
        match self {
            ClientError::Protocol(ProtocolError::UnsupportedVersion { .. }) => {
                SqlState::FEATURE_NOT_SUPPORTED
            }
            ClientError::Protocol(_) | ClientError::AuthProtocol(_) | ClientError::LoginTimeout => {
                SqlState::PROTOCOL_VIOLATION
            }
            ClientError::AuthFailed(_) => SqlState::INVALID_PASSWORD,
            ClientError::NoUser
            | ClientError::HbaNoEntry(_)
            | ClientError::HbaRejected(_)
            | ClientError::CertificateRequired
            | ClientError::CertificateMismatch(_)
            | ClientError::CertificateNameMismatch(_)
            | ClientError::LoginThrottled(_)
            | ClientError::TlsRequired => SqlState::INVALID_AUTHORIZATION,
            ClientError::UnknownDatabase(_) => SqlState::UNKNOWN_DATABASE,
            ClientError::UnsupportedStartup(_) | ClientError::ReplicaSerializable => {
                SqlState::FEATURE_NOT_SUPPORTED
            }
            ClientError::TooManyClients(_)
            | ClientError::ClientCap(..)
            | ClientError::PoolTimeout { .. } => SqlState::TOO_MANY_CONNECTIONS,
            ClientError::ServerConnect { .. } => SqlState::SQLCLIENT_UNABLE_TO_ESTABLISH,
            // PostgreSQL's own code where a client may act on it (retry
            // later: shutting down, starting up, too many connections).
            ClientError::ServerLogin { code, .. } => match code.as_str() {
                "57P03" => SqlState::CANNOT_CONNECT_NOW,
                "57P01" => SqlState::ADMIN_SHUTDOWN,
                "53300" => SqlState::TOO_MANY_CONNECTIONS,
                _ => SqlState::CONNECTION_FAILURE,
            },
            ClientError::ServerLost(_) => SqlState::CONNECTION_FAILURE,
            ClientError::IdleTransactionTimeout(_) => SqlState::IDLE_IN_TRANSACTION_TIMEOUT,
            ClientError::ClientIdleTimeout(_) => SqlState::IDLE_SESSION_TIMEOUT,
            ClientError::RateLimited(_) => SqlState::CONFIGURATION_LIMIT_EXCEEDED,
            ClientError::BufferBudget(_) => SqlState::OUT_OF_MEMORY,
            ClientError::Shutdown | ClientError::Killed | ClientError::Fenced(_) => {
                SqlState::ADMIN_SHUTDOWN
            }
            ClientError::AdminNotAllowed(_) => SqlState::INVALID_AUTHORIZATION,
            ClientError::Internal(_) => SqlState::INTERNAL,
            ClientError::Listen(_) => SqlState::CANNOT_CONNECT_NOW,
            ClientError::NotificationOverflow(_) => SqlState::PROGRAM_LIMIT_EXCEEDED,
            ClientError::ParameterRefused(_) => SqlState::INVALID_PARAMETER_VALUE,
            ClientError::InFailedTransaction => SqlState::IN_FAILED_TRANSACTION,
        }
    }

    /// Whether the client's connection ends with this error.
    pub fn severity(&self) -> Severity {
        match self {
            ClientError::PoolTimeout { .. }
            | ClientError::ServerConnect { .. }
            | ClientError::ServerLogin { .. }
            | ClientError::ReplicaSerializable
            | ClientError::ServerLost(_)
            | ClientError::Listen(_)
            | ClientError::InFailedTransaction
            | ClientError::RateLimited(_) => Severity::Error,
            _ => Severity::Fatal,
        }
    }

    /// Appends the ErrorResponse for this error.
    pub fn write_to(&self, buf: &mut BytesMut) {
        self.write_as(buf, self.severity());
    }

    /// Appends the ErrorResponse for this error ending the connection (a
    /// refused login, a closed session): FATAL whatever it would be inside
    /// a session, as PostgreSQL ends one (a server that refused tidepool's
    /// login is an ERROR to a session, which stays).
    pub fn write_fatal(&self, buf: &mut BytesMut) {
        self.write_as(buf, Severity::Fatal);
    }

    fn write_as(&self, buf: &mut BytesMut, severity: Severity) {
        let severity = severity.as_str();
        match self {
            // PostgreSQL's own words, as it refuses a login.
            ClientError::ParameterRefused(f) => write::error_response_with(
                buf,
                severity,
                &f.code,
                &f.message,
                &[(b'D', &f.detail), (b'H', &f.hint)],
            ),
            e => write::error_response(buf, severity, e.sqlstate().0, &e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_login_refusal_keeps_the_codes_a_client_acts_on() {
        let refused = |code: &str| {
            ClientError::ServerLogin {
                code: code.into(),
                message: "m".into(),
            }
            .sqlstate()
            .0
        };
        assert_eq!(refused("57P03"), "57P03");
        assert_eq!(refused("53300"), "53300");
        assert_eq!(refused("57P01"), "57P01");
        assert_eq!(refused("28P01"), "08006", "not the client's own password");
    }

    #[test]
    fn codes_match_the_contract() {
        assert_eq!(ClientError::AuthFailed("u".into()).sqlstate().0, "28P01");
        assert_eq!(
            ClientError::UnknownDatabase("d".into()).sqlstate().0,
            "3D000"
        );
        let t = ClientError::PoolTimeout {
            database: "d".into(),
            user: "u".into(),
            waited: Duration::from_secs(1),
            detail: String::new(),
        };
        assert_eq!(t.sqlstate().0, "53300");
        assert_eq!(t.severity(), Severity::Error);
        assert_eq!(ClientError::TooManyClients(1).sqlstate().0, "53300");
        assert_eq!(
            ClientError::Protocol(ProtocolError::Malformed("x"))
                .sqlstate()
                .0,
            "08P01"
        );
    }
}
