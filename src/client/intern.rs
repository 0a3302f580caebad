//! One shared copy of each short string that many clients repeat (their user
//! and database, their `application_name`), for the client list: ten
//! thousand clients of one application hold one allocation between them, not
//! one each (a parked client is kept as small as it can be, see
//! `client::park`).
//!
//! Invariants: the table holds each string once; a string that no client
//! holds any more leaves the table at the next purge, which runs when the
//! table has doubled since the last one, so the table stays within about
//! twice the distinct strings in use, whatever clients send.

use std::collections::HashSet;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};

/// The strings in use and the size that triggers the next purge.
struct Table {
    strings: HashSet<Arc<String>>,
    purge_at: usize,
}

/// Purges never run below this many strings (a few users, databases and
/// applications are the normal case).
const MIN_PURGE: usize = 64;

static TABLE: LazyLock<Mutex<Table>> = LazyLock::new(|| {
    Mutex::new(Table {
        strings: HashSet::new(),
        purge_at: MIN_PURGE,
    })
});

/// The shared copy of `s` (made if it is new).
pub fn intern(s: &str) -> Arc<String> {
    let mut t = TABLE.lock().unwrap_or_else(PoisonError::into_inner);
    let key = s.to_owned();
    if let Some(found) = t.strings.get(&key) {
        return found.clone();
    }
    if t.strings.len() >= t.purge_at {
        // Held only by the table: no client uses it any more.
        t.strings.retain(|s| Arc::strong_count(s) > 1);
        t.purge_at = (t.strings.len() * 2).max(MIN_PURGE);
    }
    let shared = Arc::new(key);
    t.strings.insert(shared.clone());
    shared
}

/// Strings in the table now (tests).
#[cfg(test)]
fn len() -> usize {
    TABLE
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .strings
        .len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_strings_share_one_copy() {
        let a = intern("intern-test-a");
        let b = intern(&String::from("intern-test-a"));
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(*a, "intern-test-a");
        assert!(!Arc::ptr_eq(&a, &intern("intern-test-b")));
    }

    #[test]
    fn strings_nobody_holds_are_purged_and_the_table_stays_bounded() {
        // A client renaming its application over and over.
        let kept = intern("intern-test-kept");
        for i in 0..10_000 {
            drop(intern(&format!("intern-test-churn-{i}")));
        }
        // Other tests hold a few strings of their own at the same time.
        assert!(len() <= 2 * MIN_PURGE + 16, "{}", len());
        assert!(Arc::ptr_eq(&kept, &intern("intern-test-kept")));
    }
}
