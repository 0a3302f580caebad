//! One backend connection to PostgreSQL.
//!
//! Owns: the socket, the server's parameters (as reported, plus what tidepool
//! set), its cancel key and its last known transaction status. Lives in
//! exactly one place at a time: a pool's idle list or one client task.
//!
//! Invariant: a `ServerConn` is only idle in a pool when its last
//! ReadyForQuery said `I` and nothing is outstanding on it.

pub mod addr;
mod connect;
pub mod exchange;
pub mod expect;
pub mod list;
pub mod params;
pub mod prepared;
pub mod session_functions;
pub mod session_state;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::BytesMut;

pub use connect::{ConnectSpec, connect};

use crate::auth::AuthError;
use crate::protocol::frame::{FrameError, read_frame};
use crate::protocol::messages::{ErrorFields, error_fields, parameter_status, ready_for_query};
use crate::protocol::tag::BackendTag;
use crate::protocol::{ProtocolError, TxStatus, write};

/// Messages from a server that tidepool reads itself (not forwarded) are small.
const INTERNAL_LIMIT: usize = 1024 * 1024;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Where to send a CancelRequest for the query running on a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelKey {
    pub addr: addr::ServerAddr,
    pub pid: i32,
    pub secret: i32,
}

/// How long tidepool's own queries on a server may take (they are short:
/// SET, parameter and catalog reads, checks).
pub const INTERNAL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("connect timed out")]
    Timeout,
    #[error(transparent)]
    Login(#[from] AuthError),
    #[error("server sent a malformed message: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("server error {}: {}", .0.code, .0.message)]
    Query(ErrorFields),
    #[error("server closed the connection")]
    Closed,
    /// tidepool's own query (parameters, checks, catalog reads) got no
    /// answer in time: the server stopped answering.
    #[error("the server did not answer tidepool's query within {0:?}")]
    Unresponsive(std::time::Duration),
    #[error("{0}")]
    Tls(String),
}

impl From<FrameError> for ServerError {
    fn from(e: FrameError) -> Self {
        match e {
            FrameError::Protocol(p) => ServerError::Protocol(p),
            FrameError::Eof => ServerError::Closed,
            FrameError::Io(io) => ServerError::Io(io),
        }
    }
}

pub struct ServerConn {
    pub stream: crate::protocol::stream::Stream,
    pub id: u64,
    pub cancel_key: CancelKey,
    /// Current session parameters: reported by the server or set by tidepool.
    pub params: BTreeMap<String, String>,
    pub tx: TxStatus,
    /// When opened and last used, on the coarse monotonic clock
    /// ([`crate::clock::coarse_mono_us`]).
    pub created: u64,
    pub last_used: u64,
    /// Bytes read from the server not yet handled. Empty while idle.
    pub buf: BytesMut,
    /// Named statements tidepool prepared on this connection.
    pub prepared: prepared::ServerStatements,
    /// Bytes to send before the client's first message of the next
    /// transaction (a deferred BEGIN). Taken by the session.
    pub prepend: Option<BytesMut>,
    /// Its entry in the server list (set by the pool that opened it).
    pub listed: Option<list::ListedServer>,
    /// The client parameter set this connection was last brought to, while
    /// nothing has changed its parameters since: a client holding the same
    /// (shared) set needs no comparison at checkout.
    pub synced_to: Option<std::sync::Arc<BTreeMap<String, String>>>,
    /// A replica's connection whose transactions are serializable by
    /// default (the role's, database's or server's
    /// `default_transaction_isolation`, read when it opened): a hot standby
    /// refuses every transaction it would run.
    pub serializable_default: bool,
}

impl std::fmt::Debug for ServerConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConn")
            .field("id", &self.id)
            .field("pid", &self.cancel_key.pid)
            .field("tx", &self.tx)
            .finish()
    }
}

/// The answer to one internal query.
#[derive(Default)]
struct Exchange {
    changed: Vec<(String, String)>,
    rows: Vec<Vec<String>>,
    /// NotificationResponse messages that came meanwhile (a server that
    /// listens for its pinned client), whole, for that client.
    notifications: BytesMut,
}

/// A DataRow's columns as text (NULL as empty).
fn text_row(body: &[u8]) -> Result<Vec<String>, ProtocolError> {
    let mut b = crate::protocol::messages::Body::new(body, "DataRow");
    let n = b.i16()?;
    let mut cols = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        let len = b.i32()?;
        cols.push(if len < 0 {
            String::new()
        } else {
            String::from_utf8_lossy(b.bytes(len as usize)?).into_owned()
        });
    }
    Ok(cols)
}

impl ServerConn {
    fn new(
        stream: crate::protocol::stream::Stream,
        cancel_key: CancelKey,
        params: BTreeMap<String, String>,
    ) -> Self {
        let now = crate::clock::coarse_mono_us();
        Self {
            stream,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            cancel_key,
            params,
            tx: TxStatus::Idle,
            created: now,
            last_used: now,
            buf: BytesMut::new(),
            prepared: prepared::ServerStatements::default(),
            prepend: None,
            listed: None,
            synced_to: None,
            serializable_default: false,
        }
    }

    /// Cheap liveness check for an idle connection: a closed socket or any
    /// unsolicited bytes (e.g. a FATAL at server shutdown) mean it is unusable.
    pub fn looks_alive(&self) -> bool {
        self.stream.looks_alive()
    }

    /// Runs a query tidepool issues itself and reads its whole response.
    /// ParameterStatus changes are applied to `self.params` and returned.
    pub async fn run_internal(&mut self, sql: &str) -> Result<Vec<(String, String)>, ServerError> {
        Ok(self.exchange(sql).await?.changed)
    }

    /// PostgreSQL's own spelling of each (name, value) (see
    /// [`params::canonical_sql`]); the server's settings stay as they were.
    pub async fn canonical_values(
        &mut self,
        pairs: &[(String, String)],
    ) -> Result<Vec<(String, String)>, ServerError> {
        Ok(pairs_of(
            self.exchange(&params::canonical_sql(pairs)).await?.rows,
        ))
    }

    /// Runs `sql` (its answer is not needed) and returns the
    /// NotificationResponse messages that came meanwhile, whole.
    pub async fn run_collecting(&mut self, sql: &str) -> Result<BytesMut, ServerError> {
        Ok(self.exchange(sql).await?.notifications)
    }

    /// The value of setting `name` (`SHOW name`).
    pub async fn setting(&mut self, name: &str) -> Result<String, ServerError> {
        let e = self.exchange(&format!("SHOW {name}")).await?;
        Ok(e.rows
            .into_iter()
            .next()
            .and_then(|r| r.into_iter().next())
            .unwrap_or_default())
    }

    /// The channels this connection listens on, and the notifications that
    /// came meanwhile.
    pub async fn listening_channels(&mut self) -> Result<(Vec<String>, BytesMut), ServerError> {
        let e = self
            .exchange("select pg_catalog.pg_listening_channels()")
            .await?;
        let channels = e
            .rows
            .into_iter()
            .filter_map(|r| r.into_iter().next())
            .collect();
        Ok((channels, e.notifications))
    }

    /// The session state this connection holds (see [`session_state`];
    /// None: an answer of another shape), and the notifications that
    /// arrived while it was asked.
    pub async fn session_state(
        &mut self,
    ) -> Result<(Option<session_state::SessionState>, BytesMut), ServerError> {
        let e = self.exchange(session_state::QUERY).await?;
        let state = e
            .rows
            .first()
            .and_then(|r| session_state::SessionState::from_row(r));
        Ok((state, e.notifications))
    }

    /// The database's functions that may change session settings (see
    /// [`session_functions::QUERY`]).
    pub async fn session_functions(
        &mut self,
    ) -> Result<session_functions::SessionFunctions, ServerError> {
        let rows = self.exchange(&session_functions::query()).await?.rows;
        Ok(session_functions::SessionFunctions::from_rows(rows))
    }

    /// The settings this session changed (`pg_settings.source = 'session'`),
    /// as name → value. Custom (dotted) parameters are not in `pg_settings`;
    /// `custom` names those to read back by name (empty values count as unset).
    pub async fn session_settings(
        &mut self,
        custom: &std::collections::BTreeSet<String>,
    ) -> Result<Vec<(String, String)>, ServerError> {
        // `role` is hidden from pg_settings; `none` is no role.
        let mut sql = String::from(
            "select name, setting from pg_catalog.pg_settings where source = 'session' \
             union all select 'role', r from pg_catalog.current_setting('role') r where r <> 'none'",
        );
        let names: Vec<String> = custom
            .iter()
            .filter(|n| params::valid_name(n))
            .map(|n| format!("'{n}'"))
            .collect();
        if !names.is_empty() {
            sql.push_str(&format!(
                " union all select n, v from (select n, pg_catalog.current_setting(n, true) v \
                 from unnest(array[{}]::text[]) n) c where coalesce(v, '') <> ''",
                names.join(",")
            ));
        }
        Ok(pairs_of(self.exchange(&sql).await?.rows))
    }

    /// Sends one simple query and reads its whole answer: rows as text,
    /// ParameterStatus changes (also applied to `self.params`), the final
    /// transaction status; an ErrorResponse becomes the error.
    async fn exchange(&mut self, sql: &str) -> Result<Exchange, ServerError> {
        // A server that stopped answering must not hold its client for ever.
        tokio::time::timeout(INTERNAL_TIMEOUT, self.exchange_untimed(sql))
            .await
            .unwrap_or(Err(ServerError::Unresponsive(INTERNAL_TIMEOUT)))
    }

    async fn exchange_untimed(&mut self, sql: &str) -> Result<Exchange, ServerError> {
        let mut out = BytesMut::new();
        write::query(&mut out, sql);
        self.stream.write_all(&out).await?;
        let mut result = Exchange::default();
        let mut failure = None;
        loop {
            let frame = read_frame(&mut self.stream, &mut self.buf, INTERNAL_LIMIT).await?;
            match BackendTag::from_byte(frame.tag) {
                BackendTag::ReadyForQuery => {
                    self.tx = ready_for_query(&frame.body)?;
                    break;
                }
                BackendTag::DataRow => result.rows.push(text_row(&frame.body)?),
                BackendTag::NotificationResponse => {
                    write::message(&mut result.notifications, frame.tag, |b| {
                        b.extend_from_slice(&frame.body)
                    });
                }
                BackendTag::ErrorResponse => failure = Some(error_fields(&frame.body)?),
                BackendTag::ParameterStatus => {
                    let (k, v) = parameter_status(&frame.body)?;
                    self.params.insert(k.to_owned(), v.to_owned());
                    self.synced_to = None;
                    result.changed.push((k.to_owned(), v.to_owned()));
                }
                _ => {}
            }
        }
        self.last_used = crate::clock::coarse_mono_us();
        match failure {
            Some(f) => Err(ServerError::Query(f)),
            None => Ok(result),
        }
    }

    /// Says goodbye politely; errors are irrelevant since the socket closes anyway.
    pub async fn terminate(mut self) {
        let mut out = BytesMut::new();
        write::terminate(&mut out);
        let _ = tokio::time::timeout(
            std::time::Duration::from_millis(100),
            self.stream.write_all(&out),
        )
        .await;
    }
}

/// Two-column rows as (name, value) pairs.
fn pairs_of(rows: Vec<Vec<String>>) -> Vec<(String, String)> {
    rows.into_iter()
        .filter_map(|r| match <[String; 2]>::try_from(r) {
            Ok([k, v]) => Some((k, v)),
            Err(_) => None,
        })
        .collect()
}
