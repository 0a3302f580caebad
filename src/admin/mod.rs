//! The admin console: a virtual database (`pgbouncer`, alias `tidepool`)
//! reached through the normal listen port, speaking the simple-query
//! protocol, with PgBouncer's commands and column names.
//!
//! Access: `admin_users` may run everything, `stats_users` only `SHOW`.
//! Errors end the command, never the console session (except a protocol
//! violation, which closes it like any client).
//!
//! Layout: [`command`] parses a statement, [`show`] builds the result sets
//! from live state, [`control`] runs PAUSE/RESUME/KILL/RELOAD/SHUTDOWN,
//! [`output`] writes them as protocol messages.

mod command;
mod control;
pub mod output;
pub mod show;

use std::sync::Arc;

use bytes::BytesMut;

pub use command::{Command, parse};

use crate::client::Shared;
use crate::client::list::{Eviction, Listed};
use crate::client::startup::AdminLogin;
use crate::error::ClientError;
use crate::error::SqlState;
use crate::protocol::frame::{FrameError, read_frame};
use crate::protocol::{ProtocolError, TxStatus, write};

pub use crate::protocol::SERVER_VERSION;

/// Largest console query accepted.
const QUERY_LIMIT: usize = 64 * 1024;

/// Console errors, with their SQLSTATE.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("invalid command '{0}', use SHOW HELP;")]
    Syntax(String),
    #[error("admin access needed (this user is in stats_users only)")]
    NotAdmin,
    #[error("no such database: {0}")]
    NoDatabase(String),
    #[error("{0}")]
    State(String),
    #[error("reload failed: {0}")]
    Reload(String),
}

impl AdminError {
    pub fn sqlstate(&self) -> &'static str {
        match self {
            AdminError::Syntax(_) => SqlState::SYNTAX_ERROR.0,
            AdminError::NotAdmin => SqlState::INSUFFICIENT_PRIVILEGE.0,
            AdminError::NoDatabase(_) => SqlState::UNKNOWN_DATABASE.0,
            AdminError::State(_) => SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE.0,
            AdminError::Reload(_) => SqlState::CONFIG_FILE_ERROR.0,
        }
    }
}

/// One console session.
pub struct Console {
    stream: crate::protocol::stream::Stream,
    shared: Arc<Shared>,
    login: AdminLogin,
    listed: Listed,
}

impl Console {
    pub fn new(
        stream: crate::protocol::stream::Stream,
        shared: Arc<Shared>,
        login: AdminLogin,
        listed: Listed,
    ) -> Self {
        Self {
            stream,
            shared,
            login,
            listed,
        }
    }

    pub async fn run(mut self) {
        let mut buf = std::mem::take(&mut self.login.buf);
        loop {
            let info = self.listed.info.clone();
            let frame = tokio::select! {
                f = read_frame(&mut self.stream, &mut buf, QUERY_LIMIT) => f,
                _ = info.nudged() => {
                    // Nudges also ask idle clients to park; consoles never do
                    // (reading a frame is cancel-safe: bytes stay in `buf`).
                    let e = match info.eviction() {
                        // Console sessions are not moved by a takeover.
                        Eviction::None | Eviction::Migrate | Eviction::Stay => continue,
                        Eviction::Killed => ClientError::Killed,
                        Eviction::Shutdown | Eviction::ShutdownNow => ClientError::Shutdown,
                        Eviction::IdleTimeout => ClientError::ClientIdleTimeout(
                            self.shared.settings().config.pool.client_idle_timeout,
                        ),
                    };
                    return self.close_with(e).await;
                }
            };
            let frame = match frame {
                Ok(f) => f,
                // The console's own bound, not max_message_size.
                Err(FrameError::Protocol(ProtocolError::TooLarge { len, limit, .. })) => {
                    return self
                        .close_with(ClientError::AuthProtocol(format!(
                            "protocol violation: a console query of {len} bytes is over the console's limit of {limit} bytes"
                        )))
                        .await;
                }
                Err(FrameError::Protocol(p)) => return self.close_with(p.into()).await,
                Err(_) => return,
            };
            match frame.tag {
                b'Q' => {
                    let sql =
                        match crate::protocol::messages::Body::new(&frame.body, "Query").cstr() {
                            Ok(s) => s.to_owned(),
                            Err(e) => return self.close_with(e.into()).await,
                        };
                    let mut out = BytesMut::new();
                    // Busy while a command runs (PAUSE and WAIT_CLOSE may
                    // wait), idle from its answer on: client_idle_timeout
                    // counts from the last command, not from the login.
                    self.listed.info.active(0);
                    self.execute(&sql, &mut out).await;
                    write::ready_for_query(&mut out, TxStatus::Idle);
                    let written = self.stream.write_all(&out).await;
                    self.listed.info.idle();
                    if written.is_err() {
                        return;
                    }
                }
                b'X' => return,
                b'P' | b'B' | b'D' | b'E' | b'S' | b'H' | b'C' | b'F' => {
                    return self
                        .close_with(ClientError::AuthProtocol(
                            "extended query protocol not supported by admin console".into(),
                        ))
                        .await;
                }
                other => {
                    return self
                        .close_with(ProtocolError::UnexpectedTag(other as char).into())
                        .await;
                }
            }
        }
    }

    async fn close_with(&mut self, e: ClientError) {
        let mut out = BytesMut::new();
        e.write_fatal(&mut out);
        let _ = self.stream.write_all(&out).await;
        let _ = self.stream.shutdown().await;
    }

    /// Runs every statement of a query string; an error stops the rest.
    async fn execute(&mut self, sql: &str, out: &mut BytesMut) {
        let statements: Vec<&str> = sql
            .split(';')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        if statements.is_empty() {
            write::message(
                out,
                crate::protocol::BackendTag::EmptyQueryResponse.byte(),
                |_| {},
            );
            return;
        }
        for stmt in statements {
            let result = match parse(stmt) {
                Ok(cmd) => self.run_command(cmd, out).await,
                Err(e) => Err(e),
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "admin command failed");
                write::error_response(out, "ERROR", e.sqlstate(), &e.to_string());
                return;
            }
        }
    }

    async fn run_command(&mut self, cmd: Command, out: &mut BytesMut) -> Result<(), AdminError> {
        if cmd.needs_admin() && !self.login.admin {
            return Err(AdminError::NotAdmin);
        }
        let shared = self.shared.clone();
        match cmd {
            Command::Show(what) => {
                if what == "ADVICE" {
                    // The servers' max_connections bound the advice: read
                    // once per pool, on a short connection of its own.
                    for p in shared.registry.pools() {
                        let _ = tokio::time::timeout(
                            std::time::Duration::from_secs(5),
                            p.learn_max_connections(),
                        )
                        .await;
                    }
                }
                show::show(&shared, &what, out)
            }
            Command::Set => {
                output::notice(out, "SET ignored", None);
                output::command_complete(out, "SET");
                Ok(())
            }
            Command::Pause(db) => control::pause(&shared, db.as_deref(), out).await,
            Command::Resume(db) => control::resume(&shared, db.as_deref(), out),
            Command::Kill(db) => control::kill(&shared, db.as_deref(), out),
            Command::Reload => control::reload(&shared, out),
            Command::Shutdown => {
                tracing::info!(user = %self.login.user, "SHUTDOWN requested on the admin console");
                shared.request_shutdown();
                output::command_complete(out, "SHUTDOWN");
                Ok(())
            }
            Command::ShutdownWaitForClients => {
                tracing::info!(user = %self.login.user, "SHUTDOWN WAIT_FOR_CLIENTS requested on the admin console: no new clients; exiting once the connected ones have left");
                shared.request_shutdown_when_clients_leave();
                output::command_complete(out, "SHUTDOWN");
                Ok(())
            }
        }
    }
}
