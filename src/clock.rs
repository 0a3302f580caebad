//! Coarse clocks for times people read at second resolution (a client's
//! last request, a query's last call) and for limits counted in seconds (a
//! server connection's lifetime and idle time): one atomic load instead of a
//! clock read on the hot path. The client sweep (every 100 ms) and the stats
//! ticker refresh them; before the first refresh they read the real clocks.
//!
//! Invariant: never ahead of the real clocks, and behind them by at most the
//! refresh period while the refreshing tasks run.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

/// Microseconds since the Unix epoch at the last refresh; 0 = never.
static NOW_US: AtomicU64 = AtomicU64::new(0);
/// Microseconds since [`BASE`] at the last refresh.
static MONO_US: AtomicU64 = AtomicU64::new(0);
/// The origin of the coarse monotonic clock.
static BASE: OnceLock<Instant> = OnceLock::new();

fn base() -> Instant {
    *BASE.get_or_init(Instant::now)
}

/// Nanoseconds on the monotonic clock, from an arbitrary origin: for
/// measuring statement and wait times on the hot path, where reading and
/// subtracting a plain integer costs less than `Instant`'s checked
/// arithmetic.
pub fn mono_ns() -> u64 {
    let ts = read(libc::CLOCK_MONOTONIC);
    (ts.tv_sec as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(ts.tv_nsec as u64)
}

/// Microseconds on the monotonic clock as of the kernel's last tick (a few
/// milliseconds old at most): the cheapest read (no time-stamp counter), for
/// bookkeeping that only needs to tell milliseconds apart.
pub fn mono_coarse_us() -> u64 {
    let ts = read(libc::CLOCK_MONOTONIC_COARSE);
    (ts.tv_sec as u64)
        .wrapping_mul(1_000_000)
        .wrapping_add(ts.tv_nsec as u64 / 1000)
}

/// One clock read (through the vDSO: no system call).
fn read(clock: libc::clockid_t) -> libc::timespec {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid place for the result, and the clocks used
    // here exist on every Linux; it cannot fail with these arguments.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts
}

/// Microseconds since the Unix epoch, read from the real clock.
pub fn precise_us() -> u64 {
    let ts = read(libc::CLOCK_REALTIME);
    (ts.tv_sec as u64)
        .wrapping_mul(1_000_000)
        .wrapping_add(ts.tv_nsec as u64 / 1000)
}

/// Reads the real clocks into the coarse ones.
pub fn refresh() {
    NOW_US.store(precise_us(), Ordering::Relaxed);
    let since = base().elapsed().as_micros() as u64;
    MONO_US.fetch_max(since, Ordering::Relaxed);
}

/// Microseconds on the coarse monotonic clock (from the process's first
/// reading), as of the last refresh: for limits in seconds.
pub fn coarse_mono_us() -> u64 {
    match MONO_US.load(Ordering::Relaxed) {
        0 => base().elapsed().as_micros() as u64,
        us => us,
    }
}

/// Time from `then` (a [`coarse_mono_us`] reading) to the coarse now; zero
/// when `then` is later.
pub fn coarse_since(then: u64) -> Duration {
    Duration::from_micros(coarse_mono_us().saturating_sub(then))
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

    #[test]
    fn coarse_monotonic_time_follows_refreshes_and_is_never_ahead() {
        refresh();
        let a = coarse_mono_us();
        assert!(a <= base().elapsed().as_micros() as u64);
        std::thread::sleep(Duration::from_millis(5));
        refresh();
        assert!(coarse_since(a) >= Duration::from_millis(5));
        assert!(coarse_mono_us() <= base().elapsed().as_micros() as u64);
    }
}
