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

mod admission;
pub mod apps;
pub mod auth_query;
pub mod budget;
mod intern;
pub mod leaks;
pub mod list;
pub mod listen;
pub mod memo;
pub mod migrate;
mod negotiate;
mod options;
pub mod park;
pub mod pins;
mod prepared;
pub(crate) mod session;
pub mod sql;
pub(crate) mod startup;
mod statement_list;
mod timing;
pub mod txn;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use arc_swap::ArcSwap;
use tokio::sync::Notify;

use crate::auth::secret::{ScramVerifier, Secret};
use crate::cancel::CancelRegistry;
use crate::config::Config;
use crate::pool::Registry;
use crate::router::Classifier;
use crate::stats::Stats;

/// A user's secret and the SCRAM verifier derived from it once at start.
pub struct UserAuth {
    pub secret: Option<Secret>,
    pub verifier: Option<ScramVerifier>,
}

/// What a reload replaces as a whole: the config and what is derived from it.
pub struct Settings {
    pub config: Config,
    pub users: HashMap<String, UserAuth>,
    pub classifier: Arc<Classifier>,
}

impl Settings {
    /// Derives users' verifiers and the classifier; `previous` lends its
    /// classifier (and cache) when the routing rules did not change.
    fn new(config: Config, previous: Option<&Settings>) -> Self {
        let users = config
            .users
            .iter()
            .map(|(name, u)| {
                let secret = u.password.as_deref().and_then(|p| Secret::parse(p).ok());
                // Verifiers cost a PBKDF2 run: reuse them when unchanged.
                let verifier = previous
                    .and_then(|p| p.config.users.get(name).zip(p.users.get(name)))
                    .filter(|(old, _)| old.password == u.password)
                    .and_then(|(_, a)| a.verifier.clone())
                    .or_else(|| secret.as_ref().and_then(Secret::scram_verifier));
                (name.clone(), UserAuth { secret, verifier })
            })
            .collect();
        let classifier = match previous {
            Some(p) if same_rules(&p.config, &config) => p.classifier.clone(),
            _ => Arc::new(Classifier::new(
                crate::router::classify::Rules::from_config(&config.routing),
            )),
        };
        Self {
            config,
            users,
            classifier,
        }
    }
}

fn same_rules(a: &Config, b: &Config) -> bool {
    let (a, b) = (&a.routing, &b.routing);
    a.strict == b.strict
        && a.write_functions == b.write_functions
        && a.read_only_functions == b.read_only_functions
}

/// Shutdown in progress, and how to ask for one from inside (SHUTDOWN).
#[derive(Default)]
pub struct Lifecycle {
    pub shutting_down: AtomicBool,
    pub shutdown_requested: Notify,
    /// The shutdown asked for waits for clients to leave on their own
    /// (SHUTDOWN WAIT_FOR_CLIENTS) instead of asking them to.
    pub wait_for_clients: AtomicBool,
    /// How long that wait may last (0: until they leave).
    pub wait_limit_ms: AtomicU64,
}

/// What every client task shares.
pub struct Shared {
    settings: ArcSwap<Settings>,
    pub registry: Registry,
    pub cancel: Arc<CancelRegistry>,
    /// Verifier of a random password, for the exchange with unknown users.
    pub decoy: ScramVerifier,
    /// Connections open now, logging in or logged in.
    pub clients: AtomicU32,
    pub stats: Arc<Stats>,
    pub list: Arc<list::ClientList>,
    /// Idle clients without a task.
    pub lot: Arc<park::Lot>,
    /// Clients pinned to their server, and why.
    pub pins: Arc<pins::Pins>,
    /// Clients holding a server without using it (`leak_warn_after`).
    pub leaks: Arc<leaks::Leaks>,
    /// Totals per application_name (bounded).
    pub apps: apps::Apps,
    /// Transactions sampled for OpenTelemetry, on their way to the
    /// exporter (`[tracing]`).
    pub spans: Arc<crate::stats::spans::Spans>,
    /// Shared LISTEN: per database, the listener connection and who
    /// listens on what.
    pub listen: Arc<listen::Listeners>,
    pub lifecycle: Lifecycle,
    /// Event-loop stalls and the shutdown deadline.
    pub watchdog: Arc<crate::watchdog::Watchdog>,
    /// Bytes buffered for clients' whole messages (`max_client_buffer_bytes`).
    pub buffers: Arc<budget::Budget>,
    /// Rate limiters of users and databases (`[rate_limits]`).
    pub rate_limits: crate::ratelimit::RateLimits,
    /// Held while a login counts the clients of its user and database
    /// and lists itself, so that the client caps are exact.
    pub admission: std::sync::Mutex<()>,
    /// Secrets of users not in the config (`auth_query`).
    pub auth_query: auth_query::AuthQuery,
    /// Failed logins per source address.
    pub throttle: crate::auth::throttle::Throttle,
    /// The file RELOAD and SIGHUP read, when the config came from one.
    pub config_path: Option<PathBuf>,
    /// After a takeover: where clients move to the new process.
    pub outbox: migrate::Outbox,
    next_id: AtomicU64,
}

impl Shared {
    pub fn new(config: Config, config_path: Option<PathBuf>) -> Self {
        let buffer_limit = config.tidepool.max_client_buffer_bytes;
        let random: u128 = rand::random();
        let decoy = Secret::Plain(format!("{random:x}"))
            .scram_verifier()
            .unwrap_or_else(|| ScramVerifier {
                iterations: 4096,
                salt: random.to_be_bytes().to_vec(),
                stored_key: rand::random(),
                server_key: rand::random(),
            });
        let stats = Arc::new(Stats::new(&config.stats));
        let rate_limits = crate::ratelimit::RateLimits::default();
        rate_limits.configure(&config);
        let lot = Arc::new(park::Lot::default());
        let spans = Arc::new(crate::stats::spans::Spans::new(&config.tracing));
        let registry = Registry::new(&config, stats.clone());
        let list = Arc::new(list::ClientList::default());
        let cancel = {
            let (clients, servers) = (list.clone(), registry.servers.clone());
            CancelRegistry::new(move |client| list::cancel_holder(&clients, &servers, client))
        };
        Self {
            decoy,
            registry,
            settings: ArcSwap::from_pointee(Settings::new(config, None)),
            cancel: Arc::new(cancel),
            clients: AtomicU32::new(0),
            stats,
            list,
            listen: listen::Listeners::new(lot.clone()),
            lot,
            pins: Arc::default(),
            leaks: Arc::default(),
            apps: Default::default(),
            spans,
            lifecycle: Lifecycle::default(),
            watchdog: Arc::default(),
            throttle: Default::default(),
            auth_query: Default::default(),
            admission: Default::default(),
            rate_limits,
            buffers: budget::Budget::new(buffer_limit),
            config_path,
            outbox: Default::default(),
            next_id: AtomicU64::new(1),
        }
    }

    /// The settings in force now.
    pub fn settings(&self) -> Arc<Settings> {
        self.settings.load_full()
    }

    /// Puts a new config in force: new logins see it at once, pools resize,
    /// retired pools drain, and logged-in clients pick it up at their next
    /// transaction. Connected clients are never dropped.
    /// Puts `config` in force; returns the settings it changes that only a
    /// restart can (their running values stay).
    pub fn apply(&self, mut config: Config) -> Vec<&'static str> {
        self.buffers
            .set_limit(config.tidepool.max_client_buffer_bytes);
        self.rate_limits.configure(&config);
        let old = self.settings.load_full();
        let kept = keep_restart_only(&old.config, &mut config);
        self.spans.set_ratio(config.tracing.sample_ratio);
        let new = Arc::new(Settings::new(config, Some(&old)));
        self.settings.store(new.clone());
        self.registry.apply(&new.config, |user| {
            new.users.get(user).and_then(|u| u.secret.clone())
        });
        kept
    }

    /// A fresh client id.
    pub fn next_client_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Starts a shutdown (SIGTERM, SIGINT or the console's SHUTDOWN).
    pub fn request_shutdown(&self) {
        self.lifecycle.shutdown_requested.notify_one();
    }

    /// Starts a shutdown that lets every client stay until it leaves
    /// (SHUTDOWN WAIT_FOR_CLIENTS); a later SHUTDOWN or signal still ends
    /// it the usual way.
    pub fn request_shutdown_when_clients_leave(&self) {
        self.lifecycle
            .wait_for_clients
            .store(true, Ordering::Relaxed);
        self.lifecycle.shutdown_requested.notify_one();
    }

    /// After a takeover (`upgrade_socket`): clients stay until they leave,
    /// for up to `shutdown_timeout`; then the usual shutdown closes them at
    /// their next transaction boundary.
    pub fn request_shutdown_after_takeover(&self) {
        let limit = self.settings().config.tidepool.shutdown_timeout;
        self.lifecycle
            .wait_limit_ms
            .store(limit.as_millis().max(1) as u64, Ordering::Relaxed);
        self.request_shutdown_when_clients_leave();
    }
}

/// Counts a client for `max_client_conn` while it lives.
pub(crate) struct ClientSlot(Arc<Shared>);

impl ClientSlot {
    pub(crate) fn new(shared: &Arc<Shared>) -> Self {
        shared.clients.fetch_add(1, Ordering::Relaxed);
        Self(shared.clone())
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.0
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Settings bound at start (sockets, sizes of structures made once, the
/// span exporter): a reload cannot change them, so the running value stays
/// in force, and in what SHOW CONFIG shows; a changed one is logged and
/// returned (the console's RELOAD tells it).
fn keep_restart_only(old: &Config, new: &mut Config) -> Vec<&'static str> {
    fn keep<T: PartialEq + Clone>(
        kept: &mut Vec<&'static str>,
        name: &'static str,
        old: &T,
        new: &mut T,
    ) {
        if old != new {
            tracing::warn!(
                setting = name,
                "changes only on restart; the running value stays in force"
            );
            new.clone_from(old);
            kept.push(name);
        }
    }
    let mut kept = Vec::new();
    let (o, n) = (&old.tidepool, &mut new.tidepool);
    keep(&mut kept, "listen", &o.listen, &mut n.listen);
    keep(
        &mut kept,
        "so_reuseport",
        &o.so_reuseport,
        &mut n.so_reuseport,
    );
    keep(
        &mut kept,
        "upgrade_socket",
        &o.upgrade_socket,
        &mut n.upgrade_socket,
    );
    keep(
        &mut kept,
        "unix_socket_dir",
        &o.unix_socket_dir,
        &mut n.unix_socket_dir,
    );
    keep(
        &mut kept,
        "[metrics] listen",
        &old.metrics.listen,
        &mut new.metrics.listen,
    );
    let (o, n) = (&old.stats, &mut new.stats);
    keep(
        &mut kept,
        "slow_query_log_size",
        &o.slow_query_log_size,
        &mut n.slow_query_log_size,
    );
    keep(
        &mut kept,
        "max_query_fingerprints",
        &o.max_query_fingerprints,
        &mut n.max_query_fingerprints,
    );
    // Of [tracing], only sample_ratio applies at once.
    let running = crate::config::otlp::Tracing {
        sample_ratio: new.tracing.sample_ratio,
        ..old.tracing.clone()
    };
    keep(
        &mut kept,
        "[tracing] (other than sample_ratio)",
        &running,
        &mut new.tracing,
    );
    kept
}
