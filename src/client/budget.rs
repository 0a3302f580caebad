//! The bound on bytes buffered for clients (`max_client_buffer_bytes`):
//! a message that must be seen whole before it is forwarded (a Query, a
//! Parse, a Bind) is buffered whole, up to `max_message_size` each; across
//! all clients, buffers above [`CHARGED_ABOVE`] bytes are charged to one
//! budget. A client whose next message would pass it gets FATAL 53200
//! instead of making tidepool's memory grow.
//!
//! Invariants: a client's charge is its read buffer's capacity while that
//! is above [`CHARGED_ABOVE`], taken before the buffer is used and given
//! back when the buffer is released (at idle) or the client leaves; the
//! charges never add up past the limit.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Buffers up to this size are not charged (most clients' stay far below).
pub const CHARGED_ABOVE: usize = 64 * 1024;

#[derive(Debug)]
pub struct Budget {
    limit: AtomicUsize,
    used: AtomicUsize,
}

impl Budget {
    pub fn new(limit: usize) -> Arc<Budget> {
        Arc::new(Budget {
            limit: AtomicUsize::new(limit),
            used: AtomicUsize::new(0),
        })
    }

    /// A reload's new limit (charges already held stay).
    pub fn set_limit(&self, limit: usize) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    /// Bytes charged now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn take(&self, n: usize) -> bool {
        let limit = self.limit();
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                u.checked_add(n).filter(|t| *t <= limit)
            })
            .is_ok()
    }

    fn give(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }
}

/// One client's charge, given back when dropped.
#[derive(Debug)]
pub struct Charge {
    budget: Arc<Budget>,
    held: usize,
}

impl Charge {
    pub fn new(budget: Arc<Budget>) -> Charge {
        Charge { budget, held: 0 }
    }

    /// Charges a buffer of `capacity` bytes; false when the budget cannot
    /// take it (nothing changes then).
    pub fn cover(&mut self, capacity: usize) -> bool {
        if capacity <= CHARGED_ABOVE || capacity <= self.held {
            return true;
        }
        if !self.budget.take(capacity - self.held) {
            return false;
        }
        self.held = capacity;
        true
    }

    /// The buffer was released.
    pub fn release(&mut self) {
        if self.held > 0 {
            self.budget.give(self.held);
            self.held = 0;
        }
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_never_pass_the_limit_and_come_back() {
        let b = Budget::new(1 << 20);
        let mut a = Charge::new(b.clone());
        let mut c = Charge::new(b.clone());
        assert!(a.cover(1000), "small buffers are free");
        assert_eq!(b.used(), 0);
        assert!(a.cover(600 * 1024));
        assert!(!c.cover(600 * 1024), "over the limit");
        assert_eq!(b.used(), 600 * 1024);
        assert!(a.cover(800 * 1024), "growing charges the difference");
        assert_eq!(b.used(), 800 * 1024);
        a.release();
        assert!(c.cover(600 * 1024));
        drop(c);
        assert_eq!(b.used(), 0);
    }
}
