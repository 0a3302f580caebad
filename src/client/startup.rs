//! The startup phase: TLS negotiation (`client::negotiate`), the startup
//! packet, TLS required by `client_tls_sslmode`, cancel requests, the client limit, database and user lookup, authentication,
//! and the greeting (AuthenticationOk, ParameterStatus set, a proxy-issued
//! BackendKeyData, ReadyForQuery).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::BytesMut;
use tokio::net::TcpStream;

use super::Shared;
use super::admission::{address_rules, client_caps};
use super::list::Listed;
use crate::auth::AuthError;
use crate::error::ClientError;
use crate::pool::{Pool, PoolError, Release};
use crate::protocol::TxStatus;
use crate::protocol::startup::{StartupError, StartupPacket};
use crate::protocol::stream::Stream;
use crate::protocol::write;
use crate::server::params::{canonical, is_tracked, valid_name};

/// Who logged in: a client of a database, or of the admin console (whose
/// session the caller starts: the console sits above clients).
pub enum Login {
    Client {
        stream: Stream,
        login: Box<LoggedIn>,
        listed: Listed,
    },
    Admin {
        stream: Stream,
        login: AdminLogin,
        listed: Listed,
    },
}

/// Runs the startup phase. `None` when the connection ends here (cancel
/// request, refused login, timeout); errors were already sent.
pub async fn login(tcp: TcpStream, shared: &Arc<Shared>, id: u64) -> Option<Login> {
    let settings = shared.settings();
    let timeout = settings.config.pool.client_login_timeout;
    let acceptor = settings.config.client_tls().cloned();
    drop(settings);
    let started = std::time::Instant::now();
    // Encryption first: a client that stalls here is closed silently (it
    // could not read an error in the middle of a handshake).
    let negotiating = super::negotiate::negotiate(tcp, acceptor.as_ref());
    let negotiated = if timeout.is_zero() {
        negotiating.await
    } else {
        tokio::time::timeout(timeout, negotiating)
            .await
            .ok()
            .flatten()
    };
    let (mut stream, first) = negotiated?;
    let required = acceptor.as_ref().is_some_and(|a| a.mode.required());
    // SCRAM channel binding to this connection's TLS (its certificate's
    // tls-server-end-point hash), when it has TLS.
    let binding = acceptor
        .as_ref()
        .filter(|_| stream.is_tls())
        .and_then(|a| a.end_point.clone());
    let handshaking = handshake(&mut stream, shared, first, required, binding.as_deref(), id);
    let result = if timeout.is_zero() {
        handshaking.await
    } else {
        let left = timeout
            .saturating_sub(started.elapsed())
            .max(std::time::Duration::from_millis(1));
        match tokio::time::timeout(left, handshaking).await {
            Ok(r) => r,
            Err(_) => Err(Some(ClientError::LoginTimeout)),
        }
    };
    let peer_ip = stream.peer_addr().ok().map(|a| a.ip().to_canonical());
    match (&result, peer_ip) {
        (Err(Some(ClientError::AuthFailed(_))), Some(ip)) => {
            // Answered after a delay that grows with the address's failures,
            // served by this client's task alone.
            let limits = shared.settings().config.throttle_limits();
            let delay = shared
                .throttle
                .failed(ip, crate::clock::mono_ns() / 1000, &limits);
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
        }
        (Ok(Some(_)), Some(ip)) => shared.throttle.succeeded(ip),
        _ => {}
    }
    // Admin consoles get a key that cancels nothing (secret 0: never matched,
    // see `cancel`).
    let listed = |database: &str, user: &str, pid: i32| {
        shared.list.add(super::list::ClientInfo::new(
            id,
            user,
            database,
            stream.peer_addr().ok(),
            stream.local_addr().ok(),
            (pid, 0),
            stream.tls_code(),
        ))
    };
    match result {
        Ok(Some(Greeted::Client(parts, listed))) => Some(Login::Client {
            stream,
            login: Box::new(parts),
            listed,
        }),
        Ok(Some(Greeted::Admin(a))) => {
            let listed = listed(&a.database, &a.user, a.pid);
            listed.info.set_application_name(&a.application_name);
            Some(Login::Admin {
                stream,
                login: a,
                listed,
            })
        }
        Ok(None) => None,
        Err(Some(e)) => {
            tracing::info!(client = id, peer = %stream.peer_addr().map(|a| a.to_string()).unwrap_or_default(), error = %e, "login refused");
            let mut out = BytesMut::new();
            e.write_fatal(&mut out);
            let _ = stream.write_all(&out).await;
            let _ = stream.shutdown().await;
            None
        }
        Err(None) => None,
    }
}

/// Console connections let in beyond `max_client_conn`.
pub const CONSOLE_HEADROOM: u32 = 16;

/// What a logged-in client brings to its session.
pub struct LoggedIn {
    pub database: String,
    pub user: String,
    pub pool: Arc<Pool>,
    pub params: Arc<BTreeMap<String, String>>,
    pub buf: BytesMut,
    pub cancel: crate::cancel::CancelHandle,
    pub policy: super::txn::Policy,
    /// Parameters from the startup packet: what RESET returns to.
    pub startup: Arc<BTreeMap<String, String>>,
    /// The client's SCRAM ClientKey, for replica pools (passthrough).
    pub client_key: Option<[u8; 32]>,
    /// The secret auth_query found, for a user not in the config.
    pub fetched_secret: Option<Arc<crate::auth::secret::Secret>>,
}

/// A console login: who, and with what rights.
pub struct AdminLogin {
    pub user: String,
    pub database: String,
    pub application_name: String,
    pub admin: bool,
    pub pid: i32,
    pub buf: BytesMut,
}

/// A finished handshake.
pub enum Greeted {
    /// A client, listed (counted against the client caps) already.
    Client(LoggedIn, super::list::Listed),
    Admin(AdminLogin),
}

/// The console's database names.
pub const ADMIN_DATABASES: [&str; 2] = ["pgbouncer", "tidepool"];

/// `Err(None)` means: close silently (the peer is gone or spoke nonsense
/// before a startup packet, where an ErrorResponse would not be understood).
/// `first` is the first packet after encryption was negotiated;
/// `tls_required`: a client that did not negotiate TLS is refused.
async fn handshake(
    stream: &mut Stream,
    shared: &Arc<Shared>,
    first: Result<StartupPacket, StartupError>,
    tls_required: bool,
    binding: Option<&[u8]>,
    id: u64,
) -> Result<Option<Greeted>, Option<ClientError>> {
    let (minor, startup) = match first {
        Ok(StartupPacket::Cancel { pid, secret }) => {
            shared.cancel.cancel(pid, secret).await;
            return Ok(None);
        }
        Ok(StartupPacket::Startup { minor, params }) => (minor, params),
        // A second SSLRequest or GSSENCRequest, or one inside TLS: what
        // PostgreSQL answers then (their codes read as protocol versions).
        Ok(p @ (StartupPacket::SslRequest | StartupPacket::GssEncRequest)) => {
            let code = if p == StartupPacket::SslRequest {
                crate::protocol::tag::SSL_REQUEST_CODE
            } else {
                crate::protocol::tag::GSSENC_REQUEST_CODE
            };
            return Err(Some(ClientError::Protocol(
                crate::protocol::ProtocolError::unsupported_version(code),
            )));
        }
        Err(StartupError::Protocol(p)) => return Err(Some(ClientError::Protocol(p))),
        Err(StartupError::Eof) | Err(StartupError::Io(_)) => return Err(None),
    };
    if tls_required && !stream.is_tls() {
        return Err(Some(ClientError::TlsRequired));
    }

    let mut user = None;
    let mut database = None;
    let mut client_params = BTreeMap::new();
    // Protocol options (`_pq_.*`): tidepool knows none.
    let mut unknown_options = Vec::new();
    for (k, v) in startup {
        match k.as_str() {
            "user" => user = Some(v),
            "database" => database = Some(v),
            "options" => super::options::parse_options(&v, &mut client_params)?,
            "replication" if v != "false" && v != "0" && v != "off" => {
                return Err(Some(ClientError::UnsupportedStartup(
                    "replication connections are not pooled".into(),
                )));
            }
            "replication" => {}
            _ if k.starts_with("_pq_.") => unknown_options.push(k),
            _ if valid_name(&k) => {
                client_params.insert(k, v);
            }
            _ => return Err(Some(ClientError::UnsupportedStartup(k))),
        }
    }
    let user = user
        .filter(|u| !u.is_empty())
        .ok_or(Some(ClientError::NoUser))?;
    let database = database
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| user.clone());
    if minor > 0 || !unknown_options.is_empty() {
        // As PostgreSQL: the client learns that 3.0 is spoken here (and
        // which of its options are not), and goes on at 3.0.
        let names: Vec<&str> = unknown_options.iter().map(String::as_str).collect();
        let mut out = bytes::BytesMut::new();
        crate::protocol::write::negotiate_protocol_version(&mut out, 0, &names);
        stream.write_all(&out).await.map_err(|_| None)?;
    }

    let settings = shared.settings();
    let config = &settings.config;
    let max = config.pool.max_client_conn;
    // The console is let in past max_client_conn, as PgBouncer lets it: a
    // full pooler is when an operator needs it. By a few only, so that
    // connections naming the console cannot go around the limit unbounded.
    let room = if ADMIN_DATABASES.contains(&database.as_str()) {
        CONSOLE_HEADROOM
    } else {
        0
    };
    if shared.clients.load(Ordering::Relaxed) > max.saturating_add(room) {
        return Err(Some(ClientError::TooManyClients(max)));
    }
    // An address that failed too often is refused before anything else.
    if let Ok(peer) = stream.peer_addr()
        && let Err(left) = shared
            .throttle
            .check(peer.ip().to_canonical(), crate::clock::mono_ns() / 1000)
    {
        return Err(Some(ClientError::LoginThrottled(left)));
    }
    // The address rules decide next: who may try, and how.
    let auth_type = match address_rules(stream, config, &database, &user)? {
        Some(a) => a,
        None => config.auth_type(config.users.get(&user)),
    };
    let Some(db) = config.databases.get(&database) else {
        if ADMIN_DATABASES.contains(&database.as_str()) {
            // PostgreSQL's spelling of a name: printable ASCII (others as
            // `?`), at most 63 bytes.
            let app: String = client_params
                .get("application_name")
                .map(|a| {
                    a.chars()
                        .map(|ch| if (' '..='~').contains(&ch) { ch } else { '?' })
                        .take(63)
                        .collect()
                })
                .unwrap_or_default();
            return admin_login(
                stream,
                shared,
                &settings,
                (user, database, app),
                auth_type,
                binding,
            )
            .await;
        }
        // As PostgreSQL: who the client is comes first, so only a client
        // that proves it learns which databases are here. A user known only
        // to a database's auth_query has no database to ask: unknown here.
        let auth = settings.users.get(&user);
        prove(stream, shared, &user, auth, auth_type, binding).await?;
        return Err(Some(
            authenticated_then(stream, ClientError::UnknownDatabase(database)).await,
        ));
    };
    // A user not in the config: the database says who it is (auth_query).
    let fetched = match (
        settings.users.contains_key(&user),
        &config.tidepool.auth_user,
    ) {
        (false, Some(_)) => shared
            .auth_query
            .lookup(config, &database, db, &user)
            .await
            .map_err(Some)?,
        _ => None,
    };
    let fetched_auth = fetched.as_ref().map(|s| super::UserAuth {
        secret: Some((**s).clone()),
        verifier: s.scram_verifier(),
    });
    let auth = settings.users.get(&user).or(fetched_auth.as_ref());
    // A password stored as md5 can only be proven with md5.
    let auth_type = match (&fetched_auth, auth_type) {
        (Some(a), crate::auth::AuthType::ScramSha256) if a.verifier.is_none() => {
            crate::auth::AuthType::Md5
        }
        (_, t) => t,
    };
    let (verified, buf) = prove(stream, shared, &user, auth, auth_type, binding).await?;
    tracing::debug!(%user, %database, "client authenticated");
    // A first look, before any server work; the exact check is below.
    client_caps(shared, config, db, &database, &user)?;

    let pool = shared.registry.pool_for(
        config,
        &database,
        db,
        &user,
        auth.and_then(|a| a.secret.as_ref()),
        verified.client_key,
        0,
    );
    let defaults = match pool.defaults() {
        Some(d) => d,
        None => learn_defaults(&pool).await.map_err(Some)?,
    };

    let mut params: BTreeMap<String, String> = defaults
        .iter()
        .filter(|(k, _)| is_tracked(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    // A client that names no application has none, as directly (the
    // server connection's own name is tidepool's business).
    params.insert("application_name".into(), String::new());
    let client_params: BTreeMap<String, String> = client_params
        .into_iter()
        .map(|(k, v)| (canonical(&k, &defaults), v))
        .collect();
    let client_params = match Box::pin(canonical_values(&pool, &defaults, client_params)).await {
        Ok(p) => p,
        Err(Some(e @ ClientError::ParameterRefused(_))) => {
            return Err(Some(authenticated_then(stream, e).await));
        }
        Err(e) => return Err(e),
    };
    params.extend(client_params.clone());

    let cancel = shared.cancel.register(id);
    // Counted and listed in one step, before the client hears it is in:
    // two logins at once cannot both take the last place.
    let listed = {
        let _admitting = shared
            .admission
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        client_caps(shared, config, db, &database, &user)?;
        shared.list.add(super::list::ClientInfo::new(
            id,
            &user,
            &database,
            stream.peer_addr().ok(),
            stream.local_addr().ok(),
            (cancel.pid, cancel.secret),
            stream.tls_code(),
        ))
    };
    let mut out = BytesMut::with_capacity(512);
    write::auth_ok(&mut out);
    for (k, v) in defaults.iter().filter(|(k, _)| !params.contains_key(*k)) {
        write::parameter_status(&mut out, k, v);
    }
    for (k, v) in &params {
        if defaults.contains_key(k) {
            write::parameter_status(&mut out, k, v);
        }
    }
    write::backend_key_data(&mut out, cancel.pid, cancel.secret);
    if let Some(w) = params
        .get(crate::router::policy::ROUTE_SETTING)
        .and_then(|v| crate::router::policy::route_setting_warning(v))
    {
        write::notice_response(&mut out, "22023", &w);
    }
    write::ready_for_query(&mut out, TxStatus::Idle);
    stream.write_all(&out).await.map_err(|_| None)?;
    let policy = policy_for(config, db);
    pool.traffic.login();
    Ok(Some(Greeted::Client(
        LoggedIn {
            client_key: verified.client_key,
            fetched_secret: fetched,
            startup: pool.intern(client_params),
            params: pool.intern(params),
            policy,
            database,
            user,
            pool,
            buf,
            cancel,
        },
        listed,
    )))
}

/// The password exchange: the client proves it is `user` (whose secret is
/// `auth`, if tidepool knows the user; an unknown one goes through a full
/// exchange all the same and fails). Also returns what the client sent
/// beyond the exchange (a pipelining client's first query).
async fn prove(
    stream: &mut Stream,
    shared: &Shared,
    user: &str,
    auth: Option<&super::UserAuth>,
    auth_type: crate::auth::AuthType,
    binding: Option<&[u8]>,
) -> Result<(crate::auth::client::Verified, BytesMut), Option<ClientError>> {
    let expected = crate::auth::client::Expected {
        user,
        known: auth.is_some(),
        secret: auth.and_then(|a| a.secret.as_ref()),
        verifier: auth.and_then(|a| a.verifier.as_ref()),
        decoy: &shared.decoy,
        auth: auth_type,
        binding,
    };
    let mut buf = BytesMut::new();
    let verified = crate::auth::client::authenticate(stream, &mut buf, &expected)
        .await
        .map_err(|e| match e {
            AuthError::Failed(u) => Some(ClientError::AuthFailed(u)),
            AuthError::Frame(_) | AuthError::Io(_) => None,
            other => Some(ClientError::AuthProtocol(other.to_string())),
        })?;
    Ok((verified, buf))
}

/// Logs a user in to the admin console: only `admin_users` and
/// `stats_users`, authenticated like any client.
async fn admin_login(
    stream: &mut Stream,
    shared: &Arc<Shared>,
    settings: &super::Settings,
    (user, database, application_name): (String, String, String),
    auth_type: crate::auth::AuthType,
    binding: Option<&[u8]>,
) -> Result<Option<Greeted>, Option<ClientError>> {
    let general = &settings.config.tidepool;
    let admin = general.admin_users.contains(&user);
    if !admin && !general.stats_users.contains(&user) {
        return Err(Some(ClientError::AdminNotAllowed(user)));
    }
    let auth = settings.users.get(&user);
    let (_, buf) = prove(stream, shared, &user, auth, auth_type, binding).await?;
    tracing::info!(%user, admin, "admin console login");
    let pid: i32 = rand::random::<i32>() & i32::MAX;
    let mut out = BytesMut::with_capacity(256);
    write::auth_ok(&mut out);
    for (k, v) in [
        ("server_version", crate::protocol::SERVER_VERSION),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("TimeZone", "UTC"),
        ("standard_conforming_strings", "on"),
        ("integer_datetimes", "on"),
        ("application_name", application_name.as_str()),
    ] {
        write::parameter_status(&mut out, k, v);
    }
    write::backend_key_data(&mut out, pid, rand::random());
    write::ready_for_query(&mut out, TxStatus::Idle);
    stream.write_all(&out).await.map_err(|_| None)?;
    Ok(Some(Greeted::Admin(AdminLogin {
        user,
        database,
        application_name,
        admin,
        pid,
        buf,
    })))
}

/// A refusal PostgreSQL makes once the client has proven who it is (an
/// unknown database, a startup parameter it refuses): AuthenticationOk
/// first, as PostgreSQL sends it, then the error (the caller writes it).
async fn authenticated_then(stream: &mut Stream, e: ClientError) -> ClientError {
    let mut out = BytesMut::with_capacity(9);
    write::auth_ok(&mut out);
    let _ = stream.write_all(&out).await;
    e
}

/// Opens the pool's first connection to learn what a server reports.
/// The client's startup parameters in PostgreSQL's own spelling (what
/// PostgreSQL would report back: `ISO, MDY` for `iso,mdy`), learnt from a
/// server once per distinct value; a value PostgreSQL refuses refuses the
/// login with PostgreSQL's error, as directly.
async fn canonical_values(
    pool: &Arc<Pool>,
    defaults: &BTreeMap<String, String>,
    mut params: BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, Option<ClientError>> {
    // An application_name of printable ASCII is spelled as it is (cut to
    // 63 bytes): no server needed, so a login with a new name does not
    // wait behind a busy pool.
    for (k, v) in params.iter_mut() {
        if k == "application_name" && v.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            v.truncate(63);
        }
    }
    let unknown: Vec<(String, String)> = params
        .iter()
        .filter(|(k, v)| {
            is_tracked(k)
                && defaults.get(*k) != Some(*v)
                && pool.canonical_value(k, v).is_none()
                && !(*k == "application_name" && v.bytes().all(|b| (0x20..0x7f).contains(&b)))
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if !unknown.is_empty() {
        let mut conn = pool
            .checkout()
            .await
            .map_err(|e| Some(pool_error(pool, e)))?;
        let answer = conn.conn().canonical_values(&unknown).await;
        let clean = conn.conn().tx == TxStatus::Idle;
        conn.release(if clean {
            Release::Reuse
        } else {
            Release::Close
        });
        match answer {
            Ok(rows) => {
                let by_name: BTreeMap<String, String> = rows.into_iter().collect();
                pool.learn_canonical(unknown.into_iter().filter_map(|(k, v)| {
                    let c = by_name.get(&k)?.clone();
                    Some(((k, v), c))
                }));
            }
            Err(crate::server::ServerError::Query(f)) => {
                return Err(Some(ClientError::ParameterRefused(Box::new(f))));
            }
            Err(e) => {
                return Err(Some(ClientError::ServerConnect {
                    database: pool.database.clone(),
                    reason: e.to_string(),
                }));
            }
        }
    }
    for (k, v) in params.iter_mut() {
        if let Some(c) = pool.canonical_value(k, v) {
            *v = c;
        }
    }
    Ok(params)
}

/// What the config says of how this database's clients are served.
pub(crate) fn policy_for(
    config: &crate::config::Config,
    db: &crate::config::Database,
) -> super::txn::Policy {
    use crate::config::{ListenMode, PoolMode, SessionFeatures};
    let transaction = config.pool_mode(db) == PoolMode::Transaction;
    super::txn::Policy {
        named_statements: transaction && config.pool.max_prepared_statements > 0,
        refuse_session_features: transaction
            && config.session_features(db) == SessionFeatures::Error,
        listen_shared: transaction && config.pool.listen_mode == ListenMode::Shared,
    }
}

pub(crate) async fn learn_defaults(
    pool: &Arc<Pool>,
) -> Result<Arc<BTreeMap<String, String>>, ClientError> {
    let conn = pool.checkout().await.map_err(|e| pool_error(pool, e))?;
    conn.release(Release::Reuse);
    pool.defaults().ok_or_else(|| ClientError::ServerConnect {
        database: pool.database.clone(),
        reason: "server reported no parameters".into(),
    })
}

/// A server's refusal while tidepool logged in or set it up.
fn server_login(f: crate::protocol::messages::ErrorFields) -> ClientError {
    ClientError::ServerLogin {
        code: f.code,
        message: f.message,
    }
}

/// Maps a checkout failure to what the client is told.
pub fn pool_error(pool: &Pool, e: PoolError) -> ClientError {
    use crate::server::ServerError;
    let e = match e {
        PoolError::Timeout(waited) => {
            return ClientError::PoolTimeout {
                database: pool.database.clone(),
                user: pool.user.clone(),
                waited,
                detail: String::new(),
            };
        }
        PoolError::Connect(e) => *e,
    };
    match e {
        ServerError::Query(f) => server_login(f),
        ServerError::Login(AuthError::Server(f)) => server_login(*f),
        other => ClientError::ServerConnect {
            database: pool.database.clone(),
            reason: other.to_string(),
        },
    }
}
