//! One client connection, from accept to goodbye.
//!
//! Phases (one task per client):
//!
//! ```text
//! startup ──► idle ──► checkout ──► sync params ──► forward ──► release ──► idle …
//!  (ssl/gss 'N',  (no server,     (fair wait,     (SET only      (whole buffers,  (at RFQ 'I', all
//!   auth, keys)    tiny buffers)    timeout)        if different)  both directions)  Syncs answered)
//! ```
//!
//! Invariants: a client never holds a server while idle in transaction mode;
//! a server leaves a client only through `PooledConn::release`, clean, or is
//! closed; errors for this client go to this client only.

mod prepared;
mod session;
pub mod sql;
mod startup;
pub mod txn;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use tokio::net::TcpStream;
use tracing::Instrument;

use crate::auth::secret::{ScramVerifier, Secret};
use crate::cancel::CancelRegistry;
use crate::config::Config;
use crate::pool::Registry;

/// A user's secret and the SCRAM verifier derived from it once at start.
pub struct UserAuth {
    pub secret: Option<Secret>,
    pub verifier: Option<ScramVerifier>,
}

/// What every client task shares.
pub struct Shared {
    pub config: Arc<Config>,
    pub registry: Registry,
    pub cancel: Arc<CancelRegistry>,
    pub users: HashMap<String, UserAuth>,
    /// Verifier of a random password, for the exchange with unknown users.
    pub decoy: ScramVerifier,
    pub clients: AtomicU32,
    pub stats: crate::stats::Counters,
    pub classifier: Arc<crate::router::Classifier>,
    next_id: AtomicU64,
}

impl Shared {
    pub fn new(config: Arc<Config>) -> Self {
        let users = config
            .users
            .iter()
            .map(|(name, u)| {
                let secret = u.password.as_deref().and_then(|p| Secret::parse(p).ok());
                let verifier = secret.as_ref().and_then(Secret::scram_verifier);
                (name.clone(), UserAuth { secret, verifier })
            })
            .collect();
        let random: u128 = rand::random();
        let decoy = Secret::Plain(format!("{random:x}"))
            .scram_verifier()
            .unwrap_or_else(|| ScramVerifier {
                iterations: 4096,
                salt: random.to_be_bytes().to_vec(),
                stored_key: rand::random(),
                server_key: rand::random(),
            });
        let classifier = Arc::new(crate::router::Classifier::new(
            crate::router::classify::Rules::from_config(&config.routing),
        ));
        Self {
            decoy,
            registry: Registry::new(config.clone()),
            config,
            cancel: Arc::new(CancelRegistry::default()),
            users,
            clients: AtomicU32::new(0),
            stats: crate::stats::Counters::default(),
            classifier,
            next_id: AtomicU64::new(1),
        }
    }
}

/// Counts a client for `max_client_conn` while it lives.
struct ClientSlot(Arc<Shared>);

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves one accepted connection until it ends.
pub async fn serve(stream: TcpStream, shared: Arc<Shared>) {
    shared.clients.fetch_add(1, Ordering::Relaxed);
    let _slot = ClientSlot(shared.clone());
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let span = tracing::info_span!("client", id, %peer);
    async move {
        let _ = stream.set_nodelay(true);
        if let Some(session) = startup::login(stream, &shared).await {
            session.run().await;
        }
        tracing::debug!("client finished");
    }
    .instrument(span)
    .await;
}
