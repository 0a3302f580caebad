//! What tidepool knows of a database's catalog: which shared server-side
//! statements it has moved away from, and which functions may change
//! session settings (see `server::session_functions`; read from a server
//! at a database's first transaction, again after DDL through tidepool and
//! at least every minute).
//!
//! Statement versions: Three counters make a statement's *version*:
//! - a generation per statement text, advanced when a server answers one of
//!   tidepool's statements with `cached plan must not change result type`
//!   (a migration changed its result);
//! - a reset count per text, advanced when a server says the statement
//!   refers to something that is gone (`cache lookup failed`);
//! - an epoch for the whole database, advanced when a transaction that ran
//!   DDL through tidepool ends.
//!
//! Invariants: a server statement prepared in an older version of its text
//! is closed before the text is prepared there again, so no client's new
//! Parse is ever mapped onto it. A client statement whose row shape tidepool
//! does not know and that was prepared in an older generation is answered
//! with PostgreSQL's own 0A000 on its next use, as PostgreSQL would answer
//! that client, and its re-prepare succeeds (clients whose row shape is
//! known are compared by shape instead, see `client::prepared`). Pools of
//! every user and backend of the database share one `Catalog`. No lock is
//! taken until some statement went stale.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use arc_swap::ArcSwapOption;
use bytes::Bytes;

use crate::server::session_functions::SessionFunctions;

/// How long a list of session-changing functions is trusted (functions
/// created outside tidepool are seen within this time).
const CHANGERS_FOR_US: u64 = 60_000_000;

#[derive(Debug, Default)]
pub struct Catalog {
    /// True once any statement went stale (then `generations` is read).
    any: AtomicBool,
    /// Statement hash → (generation, resets) (absent: 0, 0). Grows only
    /// with statements a server reported as changed or broken.
    generations: Mutex<HashMap<u64, (u64, u64)>>,
    /// Advanced by every DDL transaction forwarded to this database.
    epoch: AtomicU64,
    /// The body of the server's ErrorResponse that reported a change, to
    /// answer clients in the server's exact words (drivers recognise it by
    /// its fields: asyncpg by the routine, `RevalidateCachedQuery`).
    error: Mutex<Option<Bytes>>,
    /// Functions that may change session settings (None: none known).
    changers: ArcSwapOption<SessionFunctions>,
    /// `changers` holds a list: read without touching the ArcSwap on
    /// every transaction of a database that has none.
    any_changers: AtomicBool,
    /// When the list must be read again (coarse monotonic µs; 0: now).
    changers_due_us: AtomicU64,
    /// The epoch the list was read in (one more than it: never read).
    changers_epoch: AtomicU64,
    /// One session reads the list at a time.
    changers_loading: AtomicBool,
}

impl Catalog {
    fn counts(&self, hash: u64) -> (u64, u64) {
        if !self.any.load(Ordering::Acquire) {
            return (0, 0);
        }
        self.generations
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&hash)
            .copied()
            .unwrap_or((0, 0))
    }

    /// The current generation of the statement with this hash: how many
    /// times a server said its result changed.
    pub fn generation(&self, hash: u64) -> u64 {
        self.counts(hash).0
    }

    /// The version a server statement of this text must have been prepared
    /// in to be used now. Every counter only grows, so their sum changes
    /// whenever one does.
    pub fn version(&self, hash: u64) -> u64 {
        let (generation, resets) = self.counts(hash);
        generation + resets + self.epoch.load(Ordering::Acquire)
    }

    /// A server said the statement prepared in version `seen` no longer
    /// fits the catalog: later uses need a new generation. Returns true when
    /// this advanced it (several servers and clients may report the same
    /// change; it counts once).
    pub fn mark_stale(&self, hash: u64, seen: u64, error: &[u8]) -> bool {
        *self.error.lock().unwrap_or_else(PoisonError::into_inner) =
            Some(Bytes::copy_from_slice(error));
        self.advance(hash, seen, |c| c.0 += 1)
    }

    /// A server said the statement prepared in version `seen` refers to
    /// something that no longer exists: servers prepare it afresh, clients
    /// are not told anything (their row shape did not change).
    pub fn mark_broken(&self, hash: u64, seen: u64) -> bool {
        self.advance(hash, seen, |c| c.1 += 1)
    }

    fn advance(&self, hash: u64, seen: u64, bump: impl FnOnce(&mut (u64, u64))) -> bool {
        let epoch = self.epoch.load(Ordering::Acquire);
        let mut g = self
            .generations
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let current = g.entry(hash).or_insert((0, 0));
        if current.0 + current.1 + epoch != seen {
            return false;
        }
        bump(current);
        self.any.store(true, Ordering::Release);
        true
    }

    /// A transaction that ran DDL ended: every server statement of the
    /// database is prepared afresh before its next use.
    pub fn schema_changed(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }
}

impl Catalog {
    /// Whether the list of session-changing functions should be read now;
    /// true for one caller at a time, which then calls
    /// [`Catalog::changers_read`] with what it read (None: it could not).
    pub fn changers_due(&self) -> bool {
        let epoch = self.epoch.load(Ordering::Acquire);
        let due = self.changers_epoch.load(Ordering::Acquire) != epoch
            || crate::clock::coarse_mono_us() >= self.changers_due_us.load(Ordering::Acquire);
        due && !self.changers_loading.swap(true, Ordering::AcqRel)
    }

    /// The list read after [`Catalog::changers_due`] (at `epoch`, read
    /// before the query ran), or None when it could not be read (tried
    /// again at the next due time; the last list stays).
    pub fn changers_read(&self, epoch: u64, read: Option<SessionFunctions>) {
        if let Some(f) = read {
            self.any_changers.store(!f.is_empty(), Ordering::Release);
            self.changers.store((!f.is_empty()).then(|| Arc::new(f)));
            self.changers_epoch.store(epoch, Ordering::Release);
        }
        self.changers_due_us.store(
            crate::clock::coarse_mono_us() + CHANGERS_FOR_US,
            Ordering::Release,
        );
        self.changers_loading.store(false, Ordering::Release);
    }

    /// The functions that may change session settings, if any.
    pub fn changers(&self) -> Option<Arc<SessionFunctions>> {
        if !self.any_changers.load(Ordering::Acquire) {
            return None;
        }
        self.changers.load_full()
    }

    /// The database's DDL epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// The body of the ErrorResponse a server gave for a changed statement.
    pub fn plan_changed_error(&self) -> Option<Bytes> {
        self.error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_reported_twice_advances_once() {
        let c = Catalog::default();
        assert_eq!(c.generation(7), 0);
        assert!(c.mark_stale(7, 0, b""));
        assert!(
            !c.mark_stale(7, 0, b""),
            "the same change, seen on another server"
        );
        assert_eq!(c.generation(7), 1);
        assert_eq!(c.generation(8), 0);
        assert!(c.mark_stale(7, 1, b""));
        assert_eq!(c.generation(7), 2);
    }

    #[test]
    fn every_counter_moves_the_version_and_only_stale_moves_the_generation() {
        let c = Catalog::default();
        assert_eq!(c.version(7), 0);
        c.schema_changed();
        assert_eq!((c.version(7), c.version(8), c.generation(7)), (1, 1, 0));
        assert!(!c.mark_broken(7, 0), "seen before the DDL: already stale");
        assert!(c.mark_broken(7, 1));
        assert_eq!((c.version(7), c.version(8), c.generation(7)), (2, 1, 0));
        assert!(c.mark_stale(7, 2, b""));
        assert_eq!((c.version(7), c.generation(7)), (3, 1));
    }
}
