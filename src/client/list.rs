//! What the process knows about each logged-in client, for `SHOW CLIENTS`,
//! `SHOW POOLS`, `KILL` and shutdown. Each client task owns one
//! [`ClientInfo`] and updates its atomics as it moves between idle, waiting
//! and active; the [`ClientList`] holds a shared reference while the task's
//! [`Listed`] guard lives.
//!
//! Invariant: the hot path writes only its own client's fields (relaxed
//! atomics, no lock).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::task::Poll;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use futures_util::task::AtomicWaker;

use crate::clock::precise_us as now_us;

/// Where a client is in its cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ClientState {
    /// Logged in, no request outstanding.
    Idle = 0,
    /// Waiting for a server (or for RESUME).
    Waiting = 1,
    /// Holding a server.
    Active = 2,
}

impl ClientState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Waiting => "waiting",
            Self::Active => "active",
        }
    }
}

/// Why a client is asked to leave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Eviction {
    None = 0,
    /// A new process took over (`upgrade`): move to it at the next
    /// transaction boundary where the session can be moved
    /// (`client::migrate`); stay here otherwise.
    Migrate = 1,
    /// A takeover could not move it (see `Migrate`): it is served here
    /// until it leaves, and not tried again.
    Stay = 2,
    /// The process is shutting down: leave once the transaction is over.
    Shutdown = 3,
    /// Idle for longer than `client_idle_timeout`: leave now.
    IdleTimeout = 4,
    /// `KILL`: leave now.
    Killed = 5,
    /// `shutdown_timeout` passed during a shutdown: leave now, even inside
    /// a transaction.
    ShutdownNow = 6,
}

impl Eviction {
    /// Not asked to leave: nothing, or only a takeover's move (done or
    /// not), which the client may ignore.
    pub fn stays(self) -> bool {
        matches!(self, Eviction::None | Eviction::Migrate | Eviction::Stay)
    }

    /// Asked to leave at once, even inside a transaction.
    pub fn leaves_now(self) -> bool {
        matches!(self, Eviction::Killed | Eviction::ShutdownNow)
    }
}

/// Kept small (it outlives parking, see `client::park`): with its reference
/// counts it fits the allocator's 192-byte class (see [`INFO_CLASS`]).
pub struct ClientInfo {
    pub id: u64,
    /// `user`, a NUL, `database` (neither can hold a NUL: protocol strings
    /// end at one), shared by every client of the pair (`client::intern`).
    names: Arc<String>,
    addr: PackedAddr,
    local: PackedAddr,
    /// Microseconds since the epoch.
    connect_us: u64,
    /// The proxy-issued cancel key the client knows: its process id (for
    /// most clients their id, see `cancel`) and secret.
    pub pid: i32,
    secret: i32,
    state: AtomicU8,
    /// Backend index of the server held or waited for (0 = primary).
    backend: AtomicU8,
    /// Microseconds since the epoch of the last request / wait start.
    request_time: AtomicU64,
    wait_start: AtomicU64,
    /// How long a wait for a server may last, in ms from `wait_start`
    /// (MAX = no limit).
    wait_limit_ms: AtomicU32,
    /// Server id while active, else 0.
    link: AtomicU64,
    /// Its named prepared statements (saturating at 65,535).
    pub prepared: std::sync::atomic::AtomicU16,
    /// Shared by every client of that name (`client::intern`).
    application_name: ArcSwap<String>,
    eviction: AtomicU8,
    /// Parking: 0 = busy since the last sweep, 1 = seen idle by one sweep,
    /// 2 = asked to park.
    park: AtomicU8,
    /// A wake-up call for the client task (it is asked to leave, or to
    /// park): a flag and the waker of the task that waits for it (see
    /// [`ClientInfo::poll_nudged`]). Two fields, not a struct of their own:
    /// the flag fills a byte of this record's padding instead of 7 bytes
    /// of its own.
    nudged: AtomicBool,
    waker: AtomicWaker,
    /// The TLS cipher suite negotiated (`protocol::stream::tls_text`), 0:
    /// plain. Two bytes: this struct must stay in its allocator class.
    pub tls: u16,
    /// Its transactions, queries, wait and bytes so far.
    pub counts: super::apps::Counts,
}

/// A copy of one client's state.
#[derive(Debug, Clone)]
pub struct ClientRow {
    pub id: u64,
    pub user: String,
    pub database: String,
    pub addr: Option<SocketAddr>,
    pub local: Option<SocketAddr>,
    pub connect_time: SystemTime,
    pub pid: i32,
    pub state: ClientState,
    pub backend: usize,
    pub request_time_us: u64,
    pub wait_us: u64,
    pub link: u64,
    pub prepared: u32,
    pub application_name: String,
    pub tls: String,
    /// Its totals so far.
    pub counts: super::apps::Totals,
    /// Since when it is in its state (µs since the epoch).
    pub state_since_us: u64,
}

/// The allocator class a listed [`ClientInfo`] (with its `Arc`'s two
/// counts) must fit. Not 256: an active client's session also allocates
/// 256-byte objects (its socket's registration with the runtime), which go
/// when it parks; records of that class would sit among their holes, and
/// 10,000 parked clients kept ~200 bytes each of half-empty pages.
/// Nothing an active session keeps is of this class, so parked clients'
/// records fill whole pages.
pub const INFO_CLASS: usize = 192;

/// A socket address in 19 bytes (`Option<SocketAddr>` takes 32), for
/// [`ClientInfo`]. IPv6 flow info and scope ids are not kept (nothing shows
/// them).
#[derive(Clone, Copy)]
struct PackedAddr {
    ip: [u8; 16],
    port: [u8; 2],
    /// 0: none, 4: IPv4 (in `ip[..4]`), 6: IPv6.
    kind: u8,
}

impl PackedAddr {
    fn pack(a: Option<SocketAddr>) -> Self {
        let mut ip = [0u8; 16];
        let (kind, port) = match a {
            None => (0, 0),
            Some(SocketAddr::V4(v4)) => {
                ip[..4].copy_from_slice(&v4.ip().octets());
                (4, v4.port())
            }
            Some(SocketAddr::V6(v6)) => {
                ip = v6.ip().octets();
                (6, v6.port())
            }
        };
        Self {
            ip,
            port: port.to_ne_bytes(),
            kind,
        }
    }

    fn get(&self) -> Option<SocketAddr> {
        let port = u16::from_ne_bytes(self.port);
        match self.kind {
            4 => {
                let [a, b, c, d, ..] = self.ip;
                Some(SocketAddr::from(([a, b, c, d], port)))
            }
            6 => Some(SocketAddr::from((self.ip, port))),
            _ => None,
        }
    }
}

impl ClientInfo {
    pub fn new(
        id: u64,
        user: &str,
        database: &str,
        addr: Option<SocketAddr>,
        local: Option<SocketAddr>,
        (pid, secret): (i32, i32),
        tls: u16,
    ) -> Self {
        Self {
            tls,
            id,
            secret,
            names: super::intern::intern(&format!("{user}\0{database}")),
            addr: PackedAddr::pack(addr),
            local: PackedAddr::pack(local),
            connect_us: now_us(),
            pid,
            state: AtomicU8::new(ClientState::Idle as u8),
            backend: AtomicU8::new(0),
            request_time: AtomicU64::new(now_us()),
            wait_start: AtomicU64::new(now_us()),
            wait_limit_ms: AtomicU32::new(u32::MAX),
            link: AtomicU64::new(0),
            prepared: std::sync::atomic::AtomicU16::new(0),
            application_name: ArcSwap::new(super::intern::intern("")),
            eviction: AtomicU8::new(Eviction::None as u8),
            park: AtomicU8::new(0),
            nudged: AtomicBool::new(false),
            waker: AtomicWaker::new(),
            counts: Default::default(),
        }
    }

    /// Wakes the client task waiting for a nudge, or the next one to wait.
    pub fn notify(&self) {
        self.nudged.store(true, Ordering::SeqCst);
        self.waker.wake();
    }

    /// The client's task ends (it parks) or another one takes over (it
    /// resumed): the registered waker is stale, and must not keep the
    /// finished task's memory alive.
    pub fn forget_waker(&self) {
        drop(self.waker.take());
    }

    /// Resolves once nudged since it last resolved. Meant for one task at a
    /// time (a second waiter would take the first one's place).
    pub fn nudged(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| self.poll_nudged(cx))
    }

    /// [`ClientInfo::nudged`] for hand-written polls. Polling it again
    /// from the same task keeps the registered waker (no clone, no lock).
    pub fn poll_nudged(&self, cx: &mut std::task::Context<'_>) -> Poll<()> {
        if self.nudged.load(Ordering::Relaxed) && self.nudged.swap(false, Ordering::SeqCst) {
            return Poll::Ready(());
        }
        self.waker.register(cx.waker());
        // A notify that came before the waker was registered.
        if self.nudged.swap(false, Ordering::SeqCst) {
            return Poll::Ready(());
        }
        Poll::Pending
    }

    /// A request found a server at once (no wait): only the request time,
    /// from the coarse clock (shown to the second).
    pub fn requested(&self, backend: usize) {
        self.backend.store(backend as u8, Ordering::Relaxed);
        self.request_time
            .store(crate::clock::coarse_us(), Ordering::Relaxed);
    }

    /// Waiting for a server, for at most `limit` (zero: no limit). The client
    /// sweep nudges the client once the limit passes. Returns when the wait
    /// started (µs since the Unix epoch).
    pub fn waiting_at_most(&self, backend: usize, limit: std::time::Duration) -> u64 {
        let ms = if limit.is_zero() {
            u32::MAX
        } else {
            u32::try_from(limit.as_millis()).unwrap_or(u32::MAX - 1)
        };
        self.wait_limit_ms.store(ms, Ordering::Relaxed);
        let now = now_us();
        self.wait_started(backend, now);
        now
    }

    fn deadline(&self) -> u64 {
        match self.wait_limit_ms.load(Ordering::Relaxed) {
            u32::MAX => u64::MAX,
            ms => self
                .wait_start
                .load(Ordering::Relaxed)
                .saturating_add(u64::from(ms) * 1000),
        }
    }

    /// The wait's limit has passed.
    /// How long the client has waited for a server (0 when not waiting).
    pub fn waited_us(&self) -> u64 {
        if self.state.load(Ordering::Relaxed) != ClientState::Waiting as u8 {
            return 0;
        }
        now_us().saturating_sub(self.wait_start.load(Ordering::Relaxed))
    }

    /// The client sweep: nudges a client that has waited `reserve` (the
    /// reserve pool's timeout) so that it asks for a reserve connection.
    pub fn sweep_reserve(&self, now: u64, reserve: std::time::Duration) {
        if self.state.load(Ordering::Relaxed) == ClientState::Waiting as u8
            && now.saturating_sub(self.wait_start.load(Ordering::Relaxed))
                >= u64::try_from(reserve.as_micros()).unwrap_or(u64::MAX)
        {
            self.notify();
        }
    }

    pub fn wait_expired(&self) -> bool {
        now_us() >= self.deadline()
    }

    /// The client sweep: nudges a client whose wait passed its limit (`now`
    /// from one clock read per sweep).
    /// The client sweep (every `period_us`): nudges a waiting client whose
    /// wait passed its limit, or passed `notify_us` (not zero) since the
    /// last sweep (its session then tells it, once: `query_wait_notify`).
    pub fn sweep_wait(&self, now: u64, notify_us: u64, period_us: u64) {
        if self.state.load(Ordering::Relaxed) != ClientState::Waiting as u8 {
            return;
        }
        let waited = now.saturating_sub(self.wait_start.load(Ordering::Relaxed));
        let notify = notify_us > 0 && waited >= notify_us && waited < notify_us + period_us;
        if notify || now >= self.deadline() {
            self.notify();
        }
    }

    fn wait_started(&self, backend: usize, now: u64) {
        self.backend.store(backend as u8, Ordering::Relaxed);
        self.wait_start.store(now, Ordering::Relaxed);
        self.request_time.store(now, Ordering::Relaxed);
        self.state
            .store(ClientState::Waiting as u8, Ordering::Relaxed);
    }

    pub fn active(&self, server: u64) {
        self.link.store(server, Ordering::Relaxed);
        self.state
            .store(ClientState::Active as u8, Ordering::Relaxed);
    }

    pub fn idle(&self) {
        self.link.store(0, Ordering::Relaxed);
        self.state.store(ClientState::Idle as u8, Ordering::Relaxed);
        self.park.store(0, Ordering::Relaxed);
        // While idle, `wait_start` is when it became idle.
        self.wait_start
            .store(crate::clock::coarse_us(), Ordering::Relaxed);
    }

    /// The client sweep: nudges a client whose request has run past
    /// `query_timeout` (`limit`, not zero) since `request_time`; the
    /// forwarding loop then looks at its oldest request, and cancels it or
    /// moves `request_time` up to it.
    pub fn sweep_query(&self, now: u64, limit: std::time::Duration) {
        if !limit.is_zero()
            && self.state.load(Ordering::Relaxed) == ClientState::Active as u8
            && now.saturating_sub(self.request_time.load(Ordering::Relaxed))
                > u64::try_from(limit.as_micros()).unwrap_or(u64::MAX)
        {
            self.notify();
        }
    }

    /// The oldest request in flight started at `wall_us`: the query sweep
    /// waits from there.
    pub fn request_started(&self, wall_us: u64) {
        self.request_time.store(wall_us, Ordering::Relaxed);
    }

    /// The client sweep: a client idle for longer than `limit` (not zero)
    /// is evicted (`now` from one clock read per sweep). True when it was.
    pub fn sweep_idle_timeout(&self, now: u64, limit: std::time::Duration) -> bool {
        let idle_since = self.wait_start.load(Ordering::Relaxed);
        let expired = !limit.is_zero()
            && self.state.load(Ordering::Relaxed) == ClientState::Idle as u8
            && now.saturating_sub(idle_since)
                > u64::try_from(limit.as_micros()).unwrap_or(u64::MAX)
            && self.eviction().stays();
        if expired {
            self.evict(Eviction::IdleTimeout);
        }
        expired
    }

    /// The parking sweep: a client seen idle by two sweeps in a row (no
    /// transaction in between) is asked to park; true when it was.
    pub fn sweep_idle(&self) -> bool {
        if self.state.load(Ordering::Relaxed) != ClientState::Idle as u8 {
            return false;
        }
        if self
            .park
            .compare_exchange(0, 1, Ordering::Relaxed, Ordering::Relaxed)
            == Err(1)
        {
            self.park.store(2, Ordering::Relaxed);
            self.notify();
            return true;
        }
        false
    }

    pub fn park_requested(&self) -> bool {
        self.park.load(Ordering::Relaxed) == 2
    }

    /// Back from the parking lot: the idle clock starts again.
    pub fn unparked(&self) {
        self.park.store(0, Ordering::Relaxed);
    }

    /// The client's current `application_name`.
    pub fn application_name(&self) -> String {
        self.application_name.load().to_string()
    }

    pub fn set_application_name(&self, name: &str) {
        if **self.application_name.load() != *name {
            self.application_name.store(super::intern::intern(name));
        }
    }

    /// The secret of its cancel key.
    pub fn secret(&self) -> i32 {
        self.secret
    }

    /// When the client connected (microseconds since the epoch).
    pub fn connect_us(&self) -> u64 {
        self.connect_us
    }

    pub fn user(&self) -> &str {
        self.names.split('\0').next().unwrap_or_default()
    }

    pub fn database(&self) -> &str {
        self.names.split_once('\0').map_or("", |(_, d)| d)
    }

    /// The server it holds (0: none).
    pub fn link(&self) -> u64 {
        self.link.load(Ordering::Relaxed)
    }

    /// The client's address (none for a Unix socket).
    pub fn addr(&self) -> Option<SocketAddr> {
        self.addr.get()
    }

    /// The same client, connected at `us` (one a takeover moved here).
    pub fn connected_at(mut self, us: u64) -> Self {
        self.connect_us = us;
        self
    }

    pub fn evict(&self, why: Eviction) {
        // A kill outranks a shutdown, which outranks a move.
        self.eviction.fetch_max(why as u8, Ordering::Relaxed);
        self.notify();
    }

    pub fn eviction(&self) -> Eviction {
        match self.eviction.load(Ordering::Relaxed) {
            0 => Eviction::None,
            1 => Eviction::Migrate,
            2 => Eviction::Stay,
            3 => Eviction::Shutdown,
            4 => Eviction::IdleTimeout,
            5 => Eviction::Killed,
            _ => Eviction::ShutdownNow,
        }
    }

    pub fn row(&self) -> ClientRow {
        let state = match self.state.load(Ordering::Relaxed) {
            1 => ClientState::Waiting,
            2 => ClientState::Active,
            _ => ClientState::Idle,
        };
        let wait_us = if state == ClientState::Waiting {
            now_us().saturating_sub(self.wait_start.load(Ordering::Relaxed))
        } else {
            0
        };
        let state_since_us = match state {
            ClientState::Active => self.request_time.load(Ordering::Relaxed),
            _ => self.wait_start.load(Ordering::Relaxed),
        };
        ClientRow {
            counts: self.counts.totals(),
            state_since_us,
            id: self.id,
            user: self.user().to_string(),
            database: self.database().to_string(),
            addr: self.addr.get(),
            local: self.local.get(),
            connect_time: SystemTime::UNIX_EPOCH
                + std::time::Duration::from_micros(self.connect_us),
            pid: self.pid,
            state,
            backend: self.backend.load(Ordering::Relaxed) as usize,
            request_time_us: self.request_time.load(Ordering::Relaxed),
            wait_us,
            link: self.link.load(Ordering::Relaxed),
            prepared: u32::from(self.prepared.load(Ordering::Relaxed)),
            tls: crate::protocol::stream::tls_text(self.tls),
            application_name: self.application_name(),
        }
    }
}

impl crate::listing::Listable for ClientInfo {
    fn id(&self) -> u64 {
        self.id
    }
}

/// Every logged-in client.
pub type ClientList = crate::listing::Listing<ClientInfo>;

/// What a cancel request for `client` needs (`cancel::CancelRegistry`'s
/// lookup): the key the client was given, and the server it holds, once that
/// server is lent to it, which is after the session's parameters were
/// applied (a cancel must not hit tidepool's own SET, which would fail the
/// client's login to the server).
pub fn cancel_holder(
    clients: &ClientList,
    servers: &crate::server::list::ServerList,
    client: u64,
) -> Option<crate::cancel::Holder> {
    let info = clients.get(client)?;
    let link = info.link();
    let target = if link == 0 {
        None
    } else {
        servers.get(link).and_then(|s| s.claim_cancel(client))
    };
    Some(crate::cancel::Holder {
        pid: info.pid,
        secret: info.secret,
        target,
    })
}

/// Keeps a client listed while its task lives.
pub type Listed = crate::listing::Entry<ClientInfo>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_info_fits_its_allocator_class() {
        // See INFO_CLASS: with the two reference counts of its `Arc` it must
        // stay within its class.
        let size = std::mem::size_of::<ClientInfo>() + 16;
        assert!(size <= INFO_CLASS, "{size}");
    }

    #[test]
    fn a_cancel_goes_to_the_server_lent_to_the_client_and_nowhere_else() {
        use crate::server::CancelKey;
        use crate::server::list::{ServerInfo, ServerList};
        let clients = std::sync::Arc::new(ClientList::default());
        let servers = std::sync::Arc::new(ServerList::default());
        let key = CancelKey {
            addr: crate::server::addr::ServerAddr::Tcp("127.0.0.1:5432".parse().unwrap()),
            pid: 4242,
            secret: -7,
        };
        let c = clients.add(ClientInfo::new(1, "u", "d", None, None, (9, 1), 0));
        let s = servers.add(ServerInfo::new(7, "d", 0, "u", None, key.clone()));
        let target =
            || cancel_holder(&clients, &servers, 1).and_then(|h| h.target.map(|t| t.key()));
        assert_eq!(target(), None, "holds nothing");
        c.info.active(7);
        assert_eq!(target(), None, "checked out, parameters not applied yet");
        s.info.lent(1);
        assert_eq!(target(), Some(key));
        assert!(!s.info.returned(0), "no cancel on its way");
        s.info.lent(2);
        assert_eq!(target(), None, "the server went to another client");
        c.info.idle();
        assert_eq!(target(), None);
        assert!(
            cancel_holder(&clients, &servers, 3).is_none(),
            "unknown client"
        );
        let h = cancel_holder(&clients, &servers, 1).unwrap();
        assert_eq!((h.pid, h.secret), (9, 1), "the key it was given");
    }

    #[test]
    fn names_and_addresses_read_back() {
        for (user, db) in [("bench", "bench"), ("", "d"), ("u", ""), ("ü ser", "db.x")] {
            let v4: SocketAddr = "10.1.2.3:5432".parse().unwrap();
            let v6: SocketAddr = "[2001:db8::1]:65535".parse().unwrap();
            let c = ClientInfo::new(1, user, db, Some(v6), Some(v4), (7, 1), 0);
            assert_eq!((c.user(), c.database()), (user, db));
            assert_eq!(c.addr(), Some(v6));
            let row = c.row();
            assert_eq!((row.addr, row.local), (Some(v6), Some(v4)));
            assert_eq!((row.user.as_str(), row.database.as_str()), (user, db));
        }
        let unix = ClientInfo::new(2, "u", "d", None, None, (7, 1), 0);
        assert_eq!((unix.addr(), unix.row().local), (None, None));
    }

    /// Counts the wakers alive for one pretend task (its reference count).
    struct Task(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Task {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn a_nudge_wakes_the_kept_waker_and_forgets_it_on_request() {
        use std::sync::Arc;
        use std::task::{Context, Poll, Waker};
        let nudge = ClientInfo::new(1, "u", "d", None, None, (7, 1), 0);
        let task = Arc::new(Task(Default::default()));
        let waker = Waker::from(task.clone());
        let mut cx = Context::from_waker(&waker);
        assert_eq!(nudge.poll_nudged(&mut cx), Poll::Pending);
        assert_eq!(nudge.poll_nudged(&mut cx), Poll::Pending);
        // One kept, not one per poll.
        assert_eq!(Arc::strong_count(&task), 3);
        nudge.notify();
        assert_eq!(task.0.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(nudge.poll_nudged(&mut cx), Poll::Ready(()));
        assert_eq!(nudge.poll_nudged(&mut cx), Poll::Pending);
        // A task that ends (parks) must not be kept alive by its waker.
        nudge.forget_waker();
        assert_eq!(Arc::strong_count(&task), 2);
        // A nudge before the next task waits is not lost.
        nudge.notify();
        assert_eq!(nudge.poll_nudged(&mut cx), Poll::Ready(()));
    }
}
