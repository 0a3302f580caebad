//! How long the runtime threads waited for a CPU (the kernel's per-thread
//! scheduling statistics), so that a delay the machine caused (too little
//! CPU) is told apart from one a task caused (a stall): readings taken every
//! tick, and the delays seen late, judged against the reading before them.
//!
//! Invariant: only the watchdog's own thread reads here (each thread's file
//! stays open in it); nothing touches the event loop.

/// Nanoseconds thread `tid` of this process has spent runnable but waiting
/// for a CPU (`/proc/self/task/TID/schedstat`, second field); `None` where
/// the kernel does not keep it.
///
/// Each thread's file stays open (in the calling thread: the watchdog's),
/// so that a reading is one `pread`, not an open, a stat, two reads and a
/// close: the watchdog reads every runtime thread's every 10 ms.
pub(super) fn runqueue_wait_ns(tid: i32) -> Option<u64> {
    use std::os::unix::fs::FileExt;
    thread_local! {
        static OPEN: std::cell::RefCell<Vec<(i32, std::fs::File)>> =
            const { std::cell::RefCell::new(Vec::new()) };
    }
    if tid <= 0 {
        return None;
    }
    OPEN.with(|open| {
        let mut open = open.borrow_mut();
        let i = match open.iter().position(|(t, _)| *t == tid) {
            Some(i) => i,
            None => {
                let f = std::fs::File::open(format!("/proc/self/task/{tid}/schedstat")).ok()?;
                open.push((tid, f));
                open.len() - 1
            }
        };
        // Three decimal numbers and a newline.
        let mut buf = [0u8; 96];
        let n = match open[i].1.read_at(&mut buf, 0) {
            Ok(n) if n > 0 => n,
            _ => {
                // The thread is gone: its file with it.
                open.swap_remove(i);
                return None;
            }
        };
        let text = std::str::from_utf8(buf.get(..n)?).ok()?;
        text.split_whitespace().nth(1)?.parse().ok()
    })
}

/// A thread that waited for a CPU for at least half of `elapsed_us` was not
/// held up by the event loop: the machine did not run it.
pub(super) fn starved(waited_ns: u64, elapsed_us: u64) -> bool {
    elapsed_us > 0 && waited_ns / 1000 * 2 >= elapsed_us
}

/// The run-queue waits of the runtime threads at one moment. The watchdog
/// reads them every tick, so that a delay is judged from a reading taken
/// before it began, even when the watchdog's own thread was kept off the CPU
/// too.
#[derive(Default, Clone)]
pub(super) struct Reading {
    at_us: u64,
    waits: Vec<Option<u64>>,
}

impl Reading {
    pub(super) fn of(tids: &[i32], now: u64) -> Self {
        Self {
            at_us: now,
            waits: tids.iter().map(|&t| runqueue_wait_ns(t)).collect(),
        }
    }

    /// The reading of thread `i` alone.
    pub(super) fn only(&self, i: usize) -> Self {
        Self {
            at_us: self.at_us,
            waits: vec![self.waits.get(i).copied().flatten()],
        }
    }
}

/// What ran late (a poll's start or a heartbeat reading) and the reading
/// taken just before it was seen late.
#[derive(Default)]
pub(super) struct Baseline {
    /// 0: none.
    key: u64,
    pub(super) from: Reading,
}

impl Baseline {
    /// Keeps `before` for `key`, unless it already has one for it.
    pub(super) fn take(&mut self, key: u64, before: Reading) {
        if self.key != key {
            *self = Baseline { key, from: before };
        }
    }
}

/// A delay past [`super::STALL`], reported one tick after it was seen: a thread's
/// wait for a CPU is added to its statistics when it gets one, so by then a
/// machine that was short of CPU shows in them.
pub(super) struct Delay {
    pub(super) from: Reading,
    /// The threads involved (the polling one, or every runtime thread).
    pub(super) tids: Vec<i32>,
    pub(super) ms: u64,
    /// A client task's poll (client, what it was doing, thread), or the
    /// heartbeat (`None`).
    pub(super) poll: Option<(u64, &'static str, String)>,
}

impl Delay {
    /// Whether the threads involved waited for a CPU for at least half the
    /// time since the reading (all of them together: an idle thread neither
    /// waits nor runs). False when nothing could be read.
    pub(super) fn machine_short(&self, now: u64) -> bool {
        let mut waited = 0u64;
        let mut read = false;
        for (&tid, before) in self.tids.iter().zip(&self.from.waits) {
            if let (Some(b), Some(n)) = (before, runqueue_wait_ns(tid)) {
                waited += n.saturating_sub(*b);
                read = true;
            }
        }
        read && starved(waited, now.saturating_sub(self.from.at_us))
    }
}
