//! LISTEN/NOTIFY without pinning (`listen_mode = "shared"`): per database one
//! listener connection to the primary, owned by tidepool, listens on the
//! union of its clients' channels; each notification is queued for every
//! client subscribed to its channel, and the client is woken (resumed, if
//! parked) to deliver it between its messages.
//!
//! Invariants: a client's subscriptions and queue live here, keyed by its
//! id, exactly while its [`Membership`] guard lives (the session, or its
//! parked record, holds it); `confirmed` is what the listener connection
//! is known to listen on; a new subscription is inactive (gets nothing)
//! until a round trip on the listener connection that began after it was
//! made has ended, so it gets exactly the notifications committed after
//! its LISTEN (those before were read ahead of that round trip's answer),
//! and the client's LISTEN is answered only then; a queue holds at most `max_queued_notifications`
//! messages (one shared allocation per notification), past that the client
//! is told and closed instead of growing.

mod task;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use crate::client::list::ClientInfo;
use crate::client::park::Lot;
use crate::pool::Pool;

/// How long a client's LISTEN waits for the listener connection to listen.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Every database's hub.
pub struct Listeners {
    hubs: Mutex<HashMap<String, Arc<Hub>>>,
    lot: Arc<Lot>,
    /// Notifications queued for clients (one per client reached).
    pub delivered: AtomicU64,
    /// Clients closed because their queue overflowed.
    pub overflows: AtomicU64,
    /// Times a listener connection was (re)established after a loss.
    pub reconnects: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Listeners {
    pub fn new(lot: Arc<Lot>) -> Arc<Self> {
        Arc::new(Self {
            hubs: Mutex::default(),
            lot,
            delivered: AtomicU64::new(0),
            overflows: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
        })
    }

    /// The hub of `database` (made, with its listener task, on first use;
    /// `pool` is the primary pool whose connection settings it uses).
    pub fn hub(self: &Arc<Self>, database: &str, pool: &Arc<Pool>) -> Arc<Hub> {
        let mut hubs = lock(&self.hubs);
        if let Some(h) = hubs.get(database) {
            h.use_pool(pool);
            return h.clone();
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let hub = Arc::new(Hub {
            database: database.to_owned(),
            listeners: Arc::downgrade(self),
            pool: Mutex::new(pool.clone()),
            state: Mutex::default(),
            wake: tx,
            queue_limit: AtomicUsize::new(usize::MAX),
        });
        tokio::spawn(task::run(hub.clone(), rx));
        hubs.insert(database.to_owned(), hub.clone());
        hub
    }

    /// (database, channel, clients) for SHOW LISTENERS, ordered.
    pub fn channels(&self) -> Vec<(String, String, usize)> {
        let hubs: Vec<Arc<Hub>> = lock(&self.hubs).values().cloned().collect();
        let mut rows: Vec<(String, String, usize)> = hubs
            .iter()
            .flat_map(|h| {
                let s = h.state();
                s.channels
                    .iter()
                    .map(|(c, m)| (h.database.clone(), c.to_string(), m.len()))
                    .collect::<Vec<_>>()
            })
            .collect();
        rows.sort();
        rows
    }

    /// Per database: (subscribed clients, channels, listener connected).
    pub fn databases(&self) -> BTreeMap<String, (usize, usize, bool)> {
        lock(&self.hubs)
            .iter()
            .map(|(db, h)| {
                let s = h.state();
                (db.clone(), (s.members.len(), s.channels.len(), s.connected))
            })
            .collect()
    }
}

/// What a LISTEN could not do.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the listener connection to the primary is not available: {0}")]
pub struct ListenError(pub String);

/// One database's subscriptions and listener connection.
pub struct Hub {
    database: String,
    listeners: std::sync::Weak<Listeners>,
    /// The primary pool whose connection settings the listener uses (the
    /// latest one a client came with: a reload may have replaced it).
    pool: Mutex<Arc<Pool>>,
    state: Mutex<State>,
    /// Tells the listener task that the wanted channels changed; an ack
    /// sender, when the caller waits for them to be listened on.
    wake: mpsc::UnboundedSender<Option<oneshot::Sender<Result<(), ListenError>>>>,
    /// `max_queued_notifications` (as the latest subscriber's settings say).
    queue_limit: AtomicUsize,
}

#[derive(Default)]
struct State {
    /// Channel → subscribed clients (the owner of subscriptions), each
    /// active (delivered to) or waiting for the listener's next round trip.
    channels: HashMap<Arc<str>, BTreeMap<u64, bool>>,
    members: HashMap<u64, Member>,
    /// Channels the listener connection listens on now.
    confirmed: HashSet<Arc<str>>,
    connected: bool,
}

struct Member {
    info: Arc<ClientInfo>,
    queue: VecDeque<Bytes>,
    overflowed: bool,
    /// Owed a NOTICE: the listener connection was lost and re-made.
    missed: bool,
}

/// What a client's session takes from its queue.
#[derive(Default)]
pub struct Drained {
    pub messages: Vec<Bytes>,
    /// Notifications may have been lost (the listener connection was re-made).
    pub missed: bool,
    /// The queue overflowed: the client must be closed.
    pub overflowed: bool,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("database", &self.database)
            .finish_non_exhaustive()
    }
}

impl Hub {
    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn use_pool(&self, pool: &Arc<Pool>) {
        let mut p = lock(&self.pool);
        if !Arc::ptr_eq(&p, pool) {
            *p = pool.clone();
        }
    }

    /// Subscribes the client (`info`) to `channels`, returning once the
    /// listener connection listens on all of them.
    pub async fn listen(
        self: &Arc<Self>,
        info: &Arc<ClientInfo>,
        channels: &[String],
        queue_limit: usize,
    ) -> Result<(), ListenError> {
        self.queue_limit.store(queue_limit.max(1), Relaxed);
        let wait = {
            let mut s = self.state();
            s.members.entry(info.id).or_insert_with(|| Member {
                info: info.clone(),
                queue: VecDeque::new(),
                overflowed: false,
                missed: false,
            });
            let mut wait = false;
            for ch in channels {
                let key: Arc<str> = match s.channels.get_key_value(ch.as_str()) {
                    Some((k, _)) => k.clone(),
                    None => ch.as_str().into(),
                };
                // Already active: nothing changes (LISTEN twice is one).
                let entry = s.channels.entry(key).or_default();
                wait |= !*entry.entry(info.id).or_insert(false);
            }
            wait
        };
        if !wait {
            return Ok(());
        }
        let (tx, rx) = oneshot::channel();
        if self.wake.send(Some(tx)).is_err() {
            return Err(ListenError("the listener task ended".into()));
        }
        match tokio::time::timeout(SUBSCRIBE_TIMEOUT, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(ListenError("the listener task ended".into())),
            Err(_) => Err(ListenError(format!(
                "no LISTEN on the primary within {SUBSCRIBE_TIMEOUT:?}"
            ))),
        }
    }

    /// Unsubscribes the client from `channel`, or from every channel
    /// (None). The listener stops listening on channels nobody wants.
    pub fn unlisten(&self, id: u64, channel: Option<&str>) {
        let mut s = self.state();
        let emptied = match channel {
            Some(ch) => remove(&mut s.channels, id, |c| &**c == ch),
            None => remove(&mut s.channels, id, |_| true),
        };
        drop(s);
        if emptied {
            let _ = self.wake.send(None);
        }
    }

    /// The channels client `id` is subscribed to (a takeover moves them).
    pub fn channels_of(&self, id: u64) -> Vec<String> {
        let s = self.state();
        let mut v: Vec<String> = s
            .channels
            .iter()
            .filter(|(_, ids)| ids.contains_key(&id))
            .map(|(ch, _)| ch.to_string())
            .collect();
        v.sort();
        v
    }

    /// The client left: its subscriptions and queue go.
    fn forget(&self, id: u64) {
        let mut s = self.state();
        s.members.remove(&id);
        let emptied = remove(&mut s.channels, id, |_| true);
        drop(s);
        if emptied {
            let _ = self.wake.send(None);
        }
    }

    /// Returns once the listener connection made a round trip that began
    /// after this call: every notification committed before it has been
    /// read and queued.
    pub async fn barrier(&self) -> Result<(), ListenError> {
        let (tx, rx) = oneshot::channel();
        if self.wake.send(Some(tx)).is_err() {
            return Err(ListenError("the listener task ended".into()));
        }
        match tokio::time::timeout(SUBSCRIBE_TIMEOUT, rx).await {
            Ok(Ok(r)) => r,
            _ => Err(ListenError("no answer from the listener connection".into())),
        }
    }

    /// Puts `messages` (what the server a client's LISTEN ran on heard
    /// until it stopped listening, in commit order) into client `id`'s
    /// queue: one the queue already has a copy of stays where that copy
    /// is; the others came before the hub listened for the client, so they
    /// go first. Per channel, the order is the order of commits.
    pub fn merge_heard(&self, id: u64, messages: Vec<Bytes>) -> Result<(), Vec<Bytes>> {
        let mut s = self.state();
        let Some(m) = s.members.get_mut(&id) else {
            return Err(messages);
        };
        let older: Vec<Bytes> = messages
            .into_iter()
            .filter(|msg| !m.queue.contains(msg))
            .collect();
        for msg in older.into_iter().rev() {
            m.queue.push_front(msg);
        }
        Ok(())
    }

    /// Subscriptions not active yet.
    fn inactive(&self) -> Vec<(Arc<str>, u64)> {
        self.state()
            .channels
            .iter()
            .flat_map(|(c, m)| {
                m.iter()
                    .filter(|(_, active)| !**active)
                    .map(|(id, _)| (c.clone(), *id))
            })
            .collect()
    }

    /// Makes these subscriptions active (those still there).
    fn activate(&self, subs: &[(Arc<str>, u64)]) {
        let mut s = self.state();
        for (c, id) in subs {
            if let Some(active) = s.channels.get_mut(c).and_then(|m| m.get_mut(id)) {
                *active = true;
            }
        }
    }

    /// Takes what is queued for client `id`.
    pub fn drain(&self, id: u64) -> Drained {
        let mut s = self.state();
        let Some(m) = s.members.get_mut(&id) else {
            return Drained::default();
        };
        Drained {
            messages: m.queue.drain(..).collect(),
            missed: std::mem::take(&mut m.missed),
            overflowed: m.overflowed,
        }
    }

    /// Whether client `id`'s queue overflowed.
    pub fn overflowed(&self, id: u64) -> bool {
        self.state().members.get(&id).is_some_and(|m| m.overflowed)
    }

    /// Whether something waits for client `id` (checked after it parked).
    pub fn has_pending(&self, id: u64) -> bool {
        self.state()
            .members
            .get(&id)
            .is_some_and(|m| !m.queue.is_empty() || m.missed || m.overflowed)
    }

    /// Queues a NotificationResponse (`message`, whole) for the clients of
    /// `channel` and wakes them.
    fn deliver(&self, channel: &str, message: Bytes, limit: usize) {
        let Some(listeners) = self.listeners.upgrade() else {
            return;
        };
        let mut woken = Vec::new();
        {
            let mut s = self.state();
            let State {
                channels, members, ..
            } = &mut *s;
            let Some(ids) = channels.get(channel) else {
                return;
            };
            for (id, _) in ids.iter().filter(|(_, active)| **active) {
                let Some(m) = members.get_mut(id) else {
                    continue;
                };
                if m.overflowed {
                    continue;
                }
                if m.queue.len() >= limit {
                    m.overflowed = true;
                    m.queue = VecDeque::new();
                    listeners.overflows.fetch_add(1, Relaxed);
                } else {
                    m.queue.push_back(message.clone());
                    listeners.delivered.fetch_add(1, Relaxed);
                }
                woken.push(m.info.clone());
            }
        }
        for info in woken {
            wake(&listeners.lot, &info);
        }
    }

    /// The listener connection was re-made: every client is told that
    /// notifications may have been missed.
    fn lost_some(&self) {
        let Some(listeners) = self.listeners.upgrade() else {
            return;
        };
        let woken: Vec<Arc<ClientInfo>> = {
            let mut s = self.state();
            s.members
                .values_mut()
                .map(|m| {
                    m.missed = true;
                    m.info.clone()
                })
                .collect()
        };
        for info in woken {
            wake(&listeners.lot, &info);
        }
    }
}

/// Wakes a client's task, or resumes it from the parking lot.
fn wake(lot: &Lot, info: &ClientInfo) {
    info.notify();
    lot.wake(info.id);
}

/// Removes `id` from the channels `pick` selects; true when a channel was
/// left without clients (and removed).
fn remove(
    channels: &mut HashMap<Arc<str>, BTreeMap<u64, bool>>,
    id: u64,
    pick: impl Fn(&Arc<str>) -> bool,
) -> bool {
    let mut emptied = false;
    channels.retain(|c, members| {
        if pick(c) && members.remove(&id).is_some() && members.is_empty() {
            emptied = true;
            return false;
        }
        true
    });
    emptied
}

/// A client's place in a hub: dropping it (the client left) removes its
/// subscriptions and queue.
pub struct Membership {
    pub hub: Arc<Hub>,
    id: u64,
}

impl Membership {
    pub fn new(hub: Arc<Hub>, id: u64) -> Self {
        Self { hub, id }
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.hub.forget(self.id);
    }
}

/// Whole messages, one after another in `b` (a trailing part is dropped).
pub fn split_messages(mut b: bytes::BytesMut) -> Vec<Bytes> {
    let mut out = Vec::new();
    while b.len() >= 5 {
        let len = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize + 1;
        if len < 5 || b.len() < len {
            break;
        }
        out.push(b.split_to(len).freeze());
    }
    out
}

/// `"name"`, quoted for SQL.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removing_the_last_member_empties_the_channel() {
        let mut ch: HashMap<Arc<str>, BTreeMap<u64, bool>> = HashMap::new();
        ch.entry("a".into())
            .or_default()
            .extend([(1, true), (2, false)]);
        ch.entry("b".into()).or_default().insert(1, true);
        assert!(remove(&mut ch, 1, |c| &**c == "b"));
        assert!(!ch.contains_key("b"));
        assert!(!remove(&mut ch, 1, |_| true));
        assert_eq!(ch["a"].len(), 1);
        assert!(remove(&mut ch, 2, |_| true));
        assert!(ch.is_empty());
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident("Chan"), "\"Chan\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
