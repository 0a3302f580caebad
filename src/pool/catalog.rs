//! Which shared server-side statements the database's catalog has moved
//! away from, per database: a generation per statement text, advanced when a
//! server answers one of tidepool's statements with `cached plan must not
//! change result type` (a migration changed its result).
//!
//! Invariants: a server statement prepared in an older generation of its
//! text is closed before the text is prepared there again, so no client's
//! new Parse is ever mapped onto it; a client statement prepared in an older
//! generation is answered with PostgreSQL's own 0A000 on its next use, as
//! PostgreSQL would answer that client (it was told the old row shape), and
//! its re-prepare succeeds. Pools of every user and backend of the database
//! share one `Catalog`. No lock is taken until some statement went stale.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use bytes::Bytes;

#[derive(Debug, Default)]
pub struct Catalog {
    /// True once any statement went stale (then `generations` is read).
    any: AtomicBool,
    /// Statement hash → generation (absent: 0). Grows only with statements
    /// whose result a migration changed.
    generations: Mutex<HashMap<u64, u64>>,
    /// The body of the server's ErrorResponse that reported a change, to
    /// answer clients in the server's exact words (drivers recognise it by
    /// its fields: asyncpg by the routine, `RevalidateCachedQuery`).
    error: Mutex<Option<Bytes>>,
}

impl Catalog {
    /// The current generation of the statement with this hash.
    pub fn generation(&self, hash: u64) -> u64 {
        if !self.any.load(Ordering::Acquire) {
            return 0;
        }
        self.generations
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&hash)
            .copied()
            .unwrap_or(0)
    }

    /// A server said the statement prepared in generation `seen` no longer
    /// fits the catalog: later uses need a new generation. Returns true when
    /// this advanced it (several servers and clients may report the same
    /// change; it counts once).
    pub fn mark_stale(&self, hash: u64, seen: u64, error: &[u8]) -> bool {
        *self.error.lock().unwrap_or_else(PoisonError::into_inner) =
            Some(Bytes::copy_from_slice(error));
        let mut g = self
            .generations
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let current = g.entry(hash).or_insert(0);
        if *current != seen {
            return false;
        }
        *current += 1;
        self.any.store(true, Ordering::Release);
        true
    }
}

impl Catalog {
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
}
