//! Who may log in, before and after the password: the address rules of
//! `auth_hba_file` (and the client certificate they ask for) and the
//! per-database and per-user client caps.
//!
//! Invariant: both only decide; the caller writes the refusal.

use super::Shared;
use crate::error::ClientError;
use crate::protocol::stream::Stream;

/// What `auth_hba_file` says of this login: the method that replaces the
/// configured auth_type (None: no rules configured), or PostgreSQL's
/// refusal (28000) when no line matches, the line rejects, or it asks for a
/// client certificate this connection cannot have.
pub(super) fn address_rules(
    stream: &Stream,
    config: &crate::config::Config,
    database: &str,
    user: &str,
) -> Result<Option<crate::auth::AuthType>, Option<ClientError>> {
    use crate::auth::AuthType;
    use crate::auth::hba::{ClientCert, Method, Peer};
    let Some(hba) = config.hba() else {
        return Ok(None);
    };
    // A client on the Unix socket has no IP address: `local` lines apply.
    let addr = if stream.is_unix() {
        None
    } else {
        Some(
            stream
                .peer_addr()
                .map(|a| a.ip().to_canonical())
                .map_err(|_| None)?,
        )
    };
    let peer = Peer {
        addr,
        tls: stream.is_tls(),
        database,
        user,
    };
    let who = || {
        Box::new(crate::error::HbaPeer {
            host: addr.map_or_else(|| "[local]".to_owned(), |a| a.to_string()),
            user: user.to_owned(),
            database: database.to_owned(),
            tls: peer.tls,
        })
    };
    let Some((method, clientcert)) = hba.rule_for(&peer) else {
        return Err(Some(ClientError::HbaNoEntry(who())));
    };
    let auth = match method {
        Method::Reject => return Err(Some(ClientError::HbaRejected(who()))),
        Method::Cert | Method::Trust => AuthType::Trust,
        Method::Md5 => AuthType::Md5,
        Method::Password => AuthType::Password,
        Method::ScramSha256 => AuthType::ScramSha256,
    };
    // The client certificate (verified against client_tls_ca_file), as
    // PostgreSQL checks it: required by `cert` and by a `clientcert`
    // option; `cert` and `verify-full` want it to name the user.
    if let Some(check) = clientcert {
        let Some(der) = stream.peer_certificate() else {
            return Err(Some(ClientError::CertificateRequired));
        };
        let named = crate::tls::common_name(&der).as_deref() == Some(user);
        match (method, check) {
            (Method::Cert, _) if !named => {
                return Err(Some(ClientError::CertificateMismatch(user.to_owned())));
            }
            (_, ClientCert::VerifyFull) if !named => {
                return Err(Some(ClientError::CertificateNameMismatch(user.to_owned())));
            }
            _ => {}
        }
    }
    Ok(Some(auth))
}

/// `max_db_client_connections` and `max_user_client_connections`: this
/// client would be one too many (the clients counted are those logged in).
pub(super) fn client_caps(
    shared: &Shared,
    config: &crate::config::Config,
    db: &crate::config::Database,
    database: &str,
    user: &str,
) -> Result<(), Option<ClientError>> {
    let (db_max, user_max) = (
        config.max_db_client_connections(db),
        config.max_user_client_connections(user),
    );
    if db_max == 0 && user_max == 0 {
        return Ok(());
    }
    // Counted in place (no copy of the list per login).
    let (mut same_db, mut same_user) = (0u32, 0u32);
    shared.list.for_each(|c| {
        same_db += u32::from(c.database() == database);
        same_user += u32::from(c.user() == user);
    });
    let events = &shared.stats.counters.limits;
    if db_max > 0 && same_db >= db_max {
        crate::stats::Counters::add(&events.max_db_client_connections);
        return Err(Some(ClientError::ClientCap(
            "max_db_client_connections",
            db_max,
        )));
    }
    if user_max > 0 && same_user >= user_max {
        crate::stats::Counters::add(&events.max_user_client_connections);
        return Err(Some(ClientError::ClientCap(
            "max_user_client_connections",
            user_max,
        )));
    }
    Ok(())
}
