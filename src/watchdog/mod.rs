//! The event-loop watchdog: makes a blocked or spinning runtime thread loud.
//!
//! Owns two observations, read by one OS thread outside the runtime:
//!
//! - a **heartbeat** that a task on the runtime renews every [`BEAT`] (an
//!   idle process wakes for nothing else that often): when it goes stale,
//!   something kept the event loop from running tasks;
//! - a **slot per runtime thread** saying which client task that thread is
//!   polling right now, since when, and in which phase ([`Watched`] fills it
//!   around every poll of a client task; [`phase`] updates the phase).
//!
//! A poll or a heartbeat gap longer than [`STALL`] is one stall: logged once
//! at error level (the client and what its task was doing, when a client
//! task was being polled) and counted (`tidepool_event_loop_stalls_total`).
//!
//! It also owns the last resort of a shutdown: once a shutdown has begun
//! ([`Watchdog::shutdown_started`], or SIGTERM/SIGINT seen by a signal
//! handler that needs no event loop), a process still alive after
//! `shutdown_timeout` plus [`SHUTDOWN_GRACE`] exits, whatever a task does.
//!
//! Never takes a lock on the hot path: a poll costs a thread-local lookup,
//! one clock read and a few relaxed loads and stores.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

mod delay;

use delay::{Baseline, Delay, Reading};

/// A poll (or a gap between heartbeats) longer than this is a stall.
pub const STALL: Duration = Duration::from_millis(100);
/// How often the watchdog looks.
const TICK: Duration = Duration::from_millis(25);
/// How often the runtime renews the heartbeat. Each renewal wakes an
/// otherwise idle event loop, so it is as rare as a stall's bound allows:
/// a heartbeat counts as stale once it is older than this plus [`STALL`].
const BEAT: Duration = Duration::from_millis(50);
/// Time past `shutdown_timeout` before a shutdown is forced.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// What a client task is doing, for the stall report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    Other = 0,
    Login,
    Idle,
    Route,
    Checkout,
    Forward,
    Release,
    CleanUp,
}

impl Phase {
    const ALL: [Phase; 8] = [
        Phase::Other,
        Phase::Login,
        Phase::Idle,
        Phase::Route,
        Phase::Checkout,
        Phase::Forward,
        Phase::Release,
        Phase::CleanUp,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Other => "other",
            Phase::Login => "logging in",
            Phase::Idle => "waiting for the client's next request",
            Phase::Route => "choosing a backend",
            Phase::Checkout => "checking out a server",
            Phase::Forward => "forwarding a transaction",
            Phase::Release => "releasing its server",
            Phase::CleanUp => "cleaning up its server",
        }
    }

    fn from_u8(v: u8) -> Phase {
        Phase::ALL.get(v as usize).copied().unwrap_or(Phase::Other)
    }
}

/// What one runtime thread is polling.
#[derive(Default)]
struct Slot {
    /// The watchdog whose client task this thread polls (its address):
    /// only that one counts a stall here (several proxies in one process,
    /// as in tests, each count their own).
    owner: std::sync::atomic::AtomicUsize,
    /// Client id being polled (0: none).
    client: AtomicU64,
    /// Monotonic µs when that poll began (0: not polling a client task).
    since: AtomicU64,
    phase: AtomicU8,
    thread: Mutex<String>,
    /// The thread's kernel id (0: unknown), to read its scheduling delays.
    tid: std::sync::atomic::AtomicI32,
}

thread_local! {
    /// This thread's slot, once it polled a watched task.
    static SLOT: Cell<Option<&'static Slot>> = const { Cell::new(None) };
}

/// Slots live as long as the process (one per runtime thread ever seen:
/// a handful), so a thread-local can point at them without a count.
static SLOTS: Mutex<Vec<&'static Slot>> = Mutex::new(Vec::new());

/// This thread's slot: a thread-local load on the hot path (inlined; the
/// first call on a thread makes the slot, out of line).
#[inline]
fn slot() -> &'static Slot {
    SLOT.with(|s| s.get()).unwrap_or_else(new_slot)
}

#[cold]
#[inline(never)]
fn new_slot() -> &'static Slot {
    let slot: &'static Slot = Box::leak(Box::default());
    // SAFETY: gettid(2) takes nothing and cannot fail.
    slot.tid.store(unsafe { libc::gettid() }, Ordering::Relaxed);
    if let Ok(mut name) = slot.thread.lock() {
        *name = std::thread::current()
            .name()
            .unwrap_or("unnamed")
            .to_owned();
    }
    if let Ok(mut all) = SLOTS.lock() {
        all.push(slot);
    }
    SLOT.with(|s| s.set(Some(slot)));
    slot
}

fn now_us() -> u64 {
    // Never 0, which means "not polling". The coarse clock (a tick's
    // resolution, milliseconds) is plenty for stalls of STALL and more, and
    // the cheapest read: every poll of every client task takes one.
    crate::clock::mono_coarse_us() + 1
}

/// Notes the phase of the client task this thread is polling.
pub fn phase(p: Phase) {
    slot().phase.store(p as u8, Ordering::Relaxed);
}

/// A client task, with its polls recorded in this thread's slot.
pub struct Watched<F> {
    /// Its proxy's watchdog (the address: see `Slot::owner`).
    owner: usize,
    client: u64,
    /// The task's phase between polls (the slot holds it during one).
    phase: u8,
    inner: Pin<Box<F>>,
}

impl<F: Future> Watched<F> {
    pub fn new(owner: &Arc<Watchdog>, client: u64, inner: F) -> Self {
        let phase = if client == 0 {
            Phase::Login
        } else {
            Phase::Other
        };
        Self {
            owner: Arc::as_ptr(owner) as usize,
            client,
            phase: phase as u8,
            inner: Box::pin(inner),
        }
    }
}

impl<F: Future> Future for Watched<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let s = slot();
        s.owner.store(self.owner, Ordering::Relaxed);
        s.client.store(self.client, Ordering::Relaxed);
        s.phase.store(self.phase, Ordering::Relaxed);
        s.since.store(now_us(), Ordering::Relaxed);
        let r = self.inner.as_mut().poll(cx);
        s.since.store(0, Ordering::Relaxed);
        self.phase = s.phase.load(Ordering::Relaxed);
        r
    }
}

/// Stall detection and the shutdown deadline of one proxy.
#[derive(Default)]
pub struct Watchdog {
    beat: AtomicU64,
    stalls: AtomicU64,
    /// Monotonic µs when a shutdown began (0: none), and how long it may take.
    shutdown_at: AtomicU64,
    shutdown_limit_us: AtomicU64,
    /// Exit the process when a shutdown overruns (the binary; not tests).
    enforce: AtomicBool,
    stop: AtomicBool,
}

impl Watchdog {
    /// Stalls seen since start.
    pub fn stalls(&self) -> u64 {
        self.stalls.load(Ordering::Relaxed)
    }

    /// Renews the heartbeat from the runtime, for as long as it runs.
    pub async fn heartbeat(self: Arc<Self>) {
        let mut tick = tokio::time::interval(BEAT);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.beat.store(now_us(), Ordering::Relaxed);
        }
    }

    /// A shutdown began and may take `limit`.
    pub fn shutdown_started(&self, limit: Duration) {
        self.shutdown_limit_us
            .store(limit.as_micros() as u64, Ordering::Relaxed);
        let _ =
            self.shutdown_at
                .compare_exchange(0, now_us(), Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Makes an overrunning shutdown end the process, and lets SIGTERM and
    /// SIGINT start the deadline even when no event loop runs to see them.
    /// For the binary only: a test process must not exit.
    pub fn enforce_shutdown(self: &Arc<Self>, limit: Duration) {
        self.enforce.store(true, Ordering::Relaxed);
        self.shutdown_limit_us
            .store(limit.as_micros() as u64, Ordering::Relaxed);
        #[cfg(unix)]
        for sig in [libc::SIGTERM, libc::SIGINT] {
            let me = self.clone();
            // SAFETY: the action only does relaxed atomic operations and a
            // vDSO clock read, which are async-signal-safe.
            let r = unsafe {
                signal_hook_registry::register(sig, move || {
                    let now = crate::clock::mono_ns() / 1000 + 1;
                    let _ = me.shutdown_at.compare_exchange(
                        0,
                        now,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                })
            };
            if let Err(e) = r {
                tracing::warn!(error = %e, "cannot watch for SIGTERM/SIGINT outside the event loop");
            }
        }
    }

    /// Starts the watching thread; it ends when the returned guard drops.
    pub fn start(self: &Arc<Self>) -> std::io::Result<WatchGuard> {
        self.beat.store(now_us(), Ordering::Relaxed);
        self.stop.store(false, Ordering::Relaxed);
        let me = self.clone();
        std::thread::Builder::new()
            .name("tidepool-watchdog".into())
            .spawn(move || me.watch())?;
        Ok(WatchGuard(self.clone()))
    }

    /// Every tick: a poll or a heartbeat gap past [`STALL`] is a stall,
    /// unless the threads involved spent most of it waiting for a CPU (the
    /// machine was short of CPU: logged at warn level, not counted). Their
    /// delays are read every tick; a delay is judged from the reading taken
    /// the tick before it was first seen 2 ticks late.
    fn watch(&self) {
        let stall_us = STALL.as_micros() as u64;
        let late_us = 2 * TICK.as_micros() as u64;
        // A heartbeat is up to BEAT old between renewals.
        let beat_us = BEAT.as_micros() as u64;
        // Poll starts (per slot) and heartbeat readings already reported.
        let mut reported: Vec<u64> = Vec::new();
        let mut beat_reported = 0;
        let mut poll_base: Vec<Baseline> = Vec::new();
        let mut beat_base = Baseline::default();
        let mut last = Reading::default();
        let mut due: Vec<Delay> = Vec::new();
        while !self.stop.load(Ordering::Relaxed) {
            std::thread::sleep(TICK);
            let now = now_us();
            for d in due.drain(..) {
                self.report(d, now);
            }
            let slots: Vec<&'static Slot> = SLOTS.lock().map(|s| s.clone()).unwrap_or_default();
            let tids: Vec<i32> = slots
                .iter()
                .map(|s| s.tid.load(Ordering::Relaxed))
                .collect();
            reported.resize(slots.len(), 0);
            poll_base.resize_with(slots.len(), Baseline::default);
            let beat = self.beat.load(Ordering::Relaxed);
            if now.saturating_sub(beat) > beat_us + late_us {
                beat_base.take(beat, last.clone());
            }
            let beat_stale = now.saturating_sub(beat) > beat_us + stall_us;
            let me = self as *const Watchdog as usize;
            for (i, s) in slots.iter().enumerate() {
                if s.owner.load(Ordering::Relaxed) != me {
                    // Another proxy's thread in this process (tests).
                    continue;
                }
                let since = s.since.load(Ordering::Relaxed);
                if since == 0 || reported[i] == since || now.saturating_sub(since) <= late_us {
                    continue;
                }
                poll_base[i].take(since, last.only(i));
                if now.saturating_sub(since) <= stall_us {
                    continue;
                }
                reported[i] = since;
                if beat_stale {
                    // The same delay: reported once.
                    beat_reported = beat;
                }
                let thread = s.thread.lock().map(|t| t.clone()).unwrap_or_default();
                due.push(Delay {
                    from: poll_base[i].from.clone(),
                    tids: vec![tids[i]],
                    ms: now.saturating_sub(since) / 1000,
                    // Client 0: a connection still logging in.
                    poll: Some((
                        s.client.load(Ordering::Relaxed),
                        Phase::from_u8(s.phase.load(Ordering::Relaxed)).as_str(),
                        thread,
                    )),
                });
            }
            if beat_stale && beat_reported != beat {
                beat_reported = beat;
                due.push(Delay {
                    from: beat_base.from.clone(),
                    tids: tids.clone(),
                    ms: now.saturating_sub(beat) / 1000,
                    poll: None,
                });
            }
            self.check_shutdown(now);
            last = Reading::of(&tids, now);
        }
    }

    /// Logs a delay: a stall (counted), or the machine's (warn level).
    fn report(&self, d: Delay, now: u64) {
        let short = d.machine_short(now);
        if !short {
            self.stalls.fetch_add(1, Ordering::Relaxed);
        }
        match (d.poll, short) {
            (Some((client, doing, thread)), false) => tracing::error!(
                client,
                doing,
                blocked_ms = d.ms,
                thread,
                "event loop blocked: one client task has run for over {} ms without yielding",
                STALL.as_millis()
            ),
            (Some((client, _, thread)), true) => tracing::warn!(
                client,
                delayed_ms = d.ms,
                thread,
                "a client task's poll took over {} ms, most of it waiting for a CPU: the machine is short of CPU (not counted as a stall)",
                STALL.as_millis()
            ),
            (None, false) => tracing::error!(
                blocked_ms = d.ms,
                "event loop blocked: its heartbeat was not renewed for over {} ms (a task ran long, a call blocked its thread, or too many tasks were runnable)",
                STALL.as_millis()
            ),
            (None, true) => tracing::warn!(
                delayed_ms = d.ms,
                "event loop delayed over {} ms while its threads waited for a CPU: the machine is short of CPU (not counted as a stall)",
                STALL.as_millis()
            ),
        }
    }

    fn check_shutdown(&self, now: u64) {
        let at = self.shutdown_at.load(Ordering::Relaxed);
        if at == 0 || !self.enforce.load(Ordering::Relaxed) {
            return;
        }
        let limit =
            self.shutdown_limit_us.load(Ordering::Relaxed) + SHUTDOWN_GRACE.as_micros() as u64;
        if now.saturating_sub(at) > limit {
            tracing::error!(
                "shutdown overran shutdown_timeout by {} s; exiting now",
                SHUTDOWN_GRACE.as_secs()
            );
            std::process::exit(1);
        }
    }
}

/// Stops the watching thread when dropped.
pub struct WatchGuard(Arc<Watchdog>);

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.0.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::delay::{runqueue_wait_ns, starved};
    use super::*;
    use std::sync::PoisonError;

    /// The poll slots are the process's: one watching test at a time.
    static WATCHING: Mutex<()> = Mutex::new(());

    /// A watchdog watching, and a runtime for its heartbeat; the first
    /// keeps other watching tests out while it lives.
    fn watching() -> (
        std::sync::MutexGuard<'static, ()>,
        Arc<Watchdog>,
        WatchGuard,
        tokio::runtime::Runtime,
    ) {
        let one = WATCHING.lock().unwrap_or_else(PoisonError::into_inner);
        let w = Arc::new(Watchdog::default());
        let guard = w.start().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        (one, w, guard, rt)
    }

    #[test]
    fn a_long_poll_is_one_stall_and_names_the_client() {
        let (_one, w, _guard, rt) = watching();
        rt.block_on(async {
            tokio::spawn(w.clone().heartbeat());
            // A task that blocks its thread for 3 × STALL in one poll.
            Watched::new(&w, 42, async {
                phase(Phase::Forward);
                std::thread::sleep(STALL * 3);
            })
            .await;
            // Let the watchdog look again with the loop running.
            tokio::time::sleep(STALL).await;
        });
        // At least this one (a loaded machine may add heartbeat gaps).
        assert!(w.stalls() >= 1, "a blocked poll is a stall");
    }

    #[test]
    fn a_stall_counts_for_its_own_proxy_only() {
        let (_one, w, _guard, rt) = watching();
        // Another proxy in the process, with its own runtime thread.
        let other = Arc::new(Watchdog::default());
        let _other_guard = other.start().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let beating = other.clone();
        let other_rt = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                tokio::select! {
                    _ = beating.heartbeat() => {}
                    _ = stopped => {}
                }
            });
        });
        rt.block_on(async {
            tokio::spawn(w.clone().heartbeat());
            Watched::new(&w, 42, async {
                std::thread::sleep(STALL * 3);
            })
            .await;
            tokio::time::sleep(STALL).await;
        });
        let _ = stop.send(());
        other_rt.join().unwrap();
        assert!(w.stalls() >= 1, "its own proxy's stall");
        assert_eq!(other.stalls(), 0, "not another proxy's");
    }

    #[test]
    fn a_blocked_loop_is_seen_through_the_heartbeat_and_an_idle_one_is_not() {
        let (_one, w, _guard, rt) = watching();
        rt.block_on(async {
            tokio::spawn(w.clone().heartbeat());
            // Idle for several heartbeats: nothing is stale.
            tokio::time::sleep(BEAT * 6).await;
            assert_eq!(
                w.stalls(),
                0,
                "an idle loop between heartbeats is not stalled"
            );
            // Not a client task: only the heartbeat can tell.
            std::thread::sleep(BEAT + STALL * 3);
            tokio::time::sleep(BEAT + STALL).await;
        });
        assert!(
            w.stalls() >= 1,
            "a loop blocked past its heartbeat is a stall"
        );
    }

    #[test]
    fn waiting_for_a_cpu_is_told_from_being_busy_or_blocked() {
        assert!(starved(60_000_000, 100_000));
        assert!(!starved(40_000_000, 100_000));
        assert!(!starved(0, 0));
        let me = unsafe { libc::gettid() };
        if runqueue_wait_ns(me).is_none() {
            return; // a kernel without scheduler statistics: nothing to tell
        }
        // A thread that sleeps (a blocking call) is not starved.
        let delay = |tids: &[i32]| Delay {
            from: Reading::of(tids, now_us()),
            tids: tids.to_vec(),
            ms: 0,
            poll: None,
        };
        let slept = delay(&[me]);
        std::thread::sleep(Duration::from_millis(150));
        assert!(!slept.machine_short(now_us()));

        // Four busy threads on one CPU: each runs about a quarter of the time
        // and waits for the CPU the rest.
        // SAFETY: a zeroed cpu_set_t is a valid empty set; the calls get its size.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::cpu_set_t>();
        assert_eq!(unsafe { libc::sched_getaffinity(0, size, &mut set) }, 0);
        let cpu = (0..libc::CPU_SETSIZE as usize)
            .find(|&c| unsafe { libc::CPU_ISSET(c, &set) })
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let busy: Vec<_> = (0..4)
            .map(|_| {
                let (stop, tx) = (stop.clone(), tx.clone());
                std::thread::spawn(move || {
                    let mut one: libc::cpu_set_t = unsafe { std::mem::zeroed() };
                    unsafe { libc::CPU_SET(cpu, &mut one) };
                    unsafe { libc::sched_setaffinity(0, size, &one) };
                    tx.send(unsafe { libc::gettid() }).unwrap();
                    while !stop.load(Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        let tids: Vec<i32> = (0..4).map(|_| rx.recv().unwrap()).collect();
        // Only one of them judged: it waited about three quarters of the time.
        let busy_one = delay(&tids[..1]);
        std::thread::sleep(Duration::from_millis(300));
        let kept_off = busy_one.machine_short(now_us());
        stop.store(true, Ordering::Relaxed);
        for b in busy {
            b.join().unwrap();
        }
        assert!(kept_off, "four busy threads on one CPU wait for it");
        // Their files stay open while they live; a thread that ended reads
        // as nothing (and its file is closed), not as its last value.
        for &t in &tids {
            assert!(gone(t), "thread {t} still listed a second after it ended");
        }
    }

    /// Whether thread `tid` reads as ended within a second: `join` returns
    /// once the thread cleared its id, which the kernel does a moment
    /// before the task leaves /proc.
    fn gone(tid: i32) -> bool {
        (0..200).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(5));
            runqueue_wait_ns(tid).is_none()
        })
    }

    #[test]
    fn a_thread_read_again_is_read_afresh() {
        let me = unsafe { libc::gettid() };
        let Some(first) = runqueue_wait_ns(me) else {
            return; // a kernel without scheduler statistics
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let other = std::thread::spawn(move || {
            tx.send(unsafe { libc::gettid() }).unwrap();
            let _ = done_rx.recv();
        });
        let tid = rx.recv().unwrap();
        assert!(runqueue_wait_ns(tid).is_some());
        // Waiting for a CPU only adds up: a second reading of the same file
        // is not the first one's bytes again or a parse of leftovers.
        for _ in 0..100 {
            std::thread::yield_now();
            assert!(runqueue_wait_ns(me).is_some_and(|n| n >= first));
        }
        done_tx.send(()).unwrap();
        other.join().unwrap();
        assert!(
            gone(tid),
            "thread {tid} still listed a second after it ended"
        );
    }
}
