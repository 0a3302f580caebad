//! Wall-clock time for timestamps people read at second resolution (a
//! client's last request, a query's last call): one atomic load instead of
//! a clock read on the hot path. The stats ticker refreshes it twice a
//! second; before its first refresh it reads the real clock.
//!
//! Invariant: never ahead of the real clock, and behind it by at most the
//! ticker's period while the ticker runs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

/// Microseconds since the Unix epoch at the last refresh; 0 = never.
static NOW_US: AtomicU64 = AtomicU64::new(0);

/// Microseconds since the Unix epoch, read from the real clock.
pub fn precise_us() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Reads the real clock into the coarse one.
pub fn refresh() {
    NOW_US.store(precise_us(), Ordering::Relaxed);
}

/// Microseconds since the Unix epoch, as of the last refresh.
pub fn coarse_us() -> u64 {
    match NOW_US.load(Ordering::Relaxed) {
        0 => {
            refresh();
            NOW_US.load(Ordering::Relaxed)
        }
        us => us,
    }
}

pub fn coarse() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_micros(coarse_us())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coarse_time_follows_refreshes_and_is_never_ahead() {
        let a = coarse_us();
        assert!(a > 0 && a <= precise_us());
        std::thread::sleep(Duration::from_millis(5));
        refresh();
        let b = coarse_us();
        assert!(b >= a + 5_000 && b <= precise_us());
    }
}
