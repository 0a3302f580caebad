//! Trackers between transactions: a few per runtime thread, for whichever
//! client starts a transaction next there. A tracker's queues (owed
//! answers, statement timings) keep their allocations from one transaction
//! to the next, so the hot path allocates nothing; but kept per client, an
//! idle client that has not parked yet held ~2.6 KiB of them (10,000 idle
//! clients: 26 MiB). Here at most one tracker per transaction in progress
//! exists, plus `KEEP` spares per thread.
//!
//! Invariants: a spare was reset when it came back (it holds no replica
//! guard, no LISTEN hub, nothing of its last client); the client's own
//! statement memo never stays here ([`take`] lends it to the tracker,
//! [`give_back`] returns it).

use std::cell::RefCell;

use super::{Policy, Tracker};
use crate::client::memo::Memo;
use crate::protocol::TxStatus;

/// Spares kept per thread (the pool's transactions in progress at once are
/// what matters: beyond this, a finished tracker is freed).
const KEEP: usize = 32;

thread_local! {
    // Boxed in the list too: a tracker is ~1 KiB, handed over as a pointer,
    // never moved.
    #[allow(clippy::vec_box)]
    static SPARES: RefCell<Vec<Box<Tracker>>> = const { RefCell::new(Vec::new()) };
}

/// A clean tracker for a transaction starting in `status`, with `memo`
/// (the client's own, lent for the transaction: give it back with
/// [`give_back`]).
pub fn take(status: TxStatus, policy: Policy, memo: &mut Memo) -> Box<Tracker> {
    let mut t = SPARES
        .with(|s| s.borrow_mut().pop())
        .unwrap_or_else(|| Box::new(Tracker::new(TxStatus::Idle, policy)));
    t.start(status, policy);
    std::mem::swap(&mut t.memo, memo);
    t
}

/// The transaction is over: the client's memo goes back to `memo`, the
/// tracker, emptied, to this thread's spares.
pub fn give_back(mut t: Box<Tracker>, memo: &mut Memo) {
    // The tracker now holds the placeholder the client had while lent
    // (empty: every tracker's memo is, between transactions).
    std::mem::swap(&mut t.memo, memo);
    let policy = t.policy;
    t.reset(TxStatus::Idle, policy);
    SPARES.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < KEEP {
            s.push(t);
        }
    });
}

/// Frees this thread's spares. After a burst of logins went idle, the spares
/// made in it are scattered over slabs that would otherwise empty; the next
/// transactions make new ones.
pub fn clear() {
    let spares = SPARES.with(|s| std::mem::take(&mut *s.borrow_mut()));
    drop(spares);
}

/// Spares on this thread now (tests).
#[cfg(test)]
pub fn kept() -> usize {
    SPARES.with(|s| s.borrow().len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::Classifier;

    fn policy() -> Policy {
        Policy {
            named_statements: false,
            refuse_session_features: false,
            listen_shared: false,
        }
    }

    #[test]
    fn the_memo_stays_the_clients_and_spares_are_clean_and_bounded() {
        let classifier = Classifier::new(crate::router::classify::Rules::default());
        let (mut mine, mut theirs) = (Memo::default(), Memo::default());
        mine.class("select * from t where id = 1", &classifier, None);
        let mut t = take(TxStatus::Idle, policy(), &mut mine);
        assert!(mine.find("select * from t where id = 2").is_none(), "lent");
        assert!(t.memo.find("select * from t where id = 3").is_some());
        // The transaction leaves state behind that must not reach the next
        // client.
        t.params_changed = true;
        t.pin = Some("a temp table");
        give_back(t, &mut mine);
        assert!(
            mine.find("select * from t where id = 4").is_some(),
            "given back"
        );
        let mut t = take(TxStatus::InTransaction, policy(), &mut theirs);
        assert!(!t.params_changed && t.pin.is_none());
        assert_eq!(t.status, TxStatus::InTransaction);
        assert!(
            t.memo.find("select * from t where id = 5").is_none(),
            "not mine"
        );
        give_back(t, &mut theirs);
        // A burst of transactions at once leaves at most KEEP spares.
        let many: Vec<_> = (0..KEEP + 10)
            .map(|_| take(TxStatus::Idle, policy(), &mut Memo::default()))
            .collect();
        for t in many {
            give_back(t, &mut Memo::default());
        }
        assert_eq!(kept(), KEEP);
        // After a burst went idle, the thread lets its spares go; the next
        // transaction makes a new one.
        clear();
        assert_eq!(kept(), 0);
        let t = take(TxStatus::Idle, policy(), &mut mine);
        give_back(t, &mut mine);
        assert_eq!(kept(), 1);
    }
}
