//! Giving the heap that departed nodes freed back to the OS (N-LEAK-2).
//!
//! When many streams come and go (a unit's nodes restarting, a peer reconnecting in a loop),
//! their buffers are freed into glibc's malloc arenas, which keep the pages: the process's
//! resident size stays at the high-water mark of the burst, and where that mark lands depends
//! on which thread freed what. The churn bench showed it: after the same 20,000 cycles the
//! level varied between runs by 5 MiB, and `malloc_trim` brought every run back to the same
//! 11 MiB (BENCHMARKS.md, "Returning freed memory").
//!
//! So the daemon runs a [`MemoryReturn`] task: once streams have ended and no stream has been
//! attached or ended for `memoryReturnDelay` (2 s by default), it asks the allocator to give
//! its free pages back ([`return_freed`]), on a blocking thread, and logs the resident size
//! before and after. One purge per burst of departures: a unit whose nodes stay connected is
//! never purged, and neither is one whose streams keep coming and going (the memory is being
//! reused then). Elsewhere than on glibc the purge does nothing.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use smcontroller_routing::Controller;
use tokio::{task::JoinHandle, time::Instant};
use tracing::{debug, info};

/// The default of `memoryReturnDelay`: how long streams must have stood still after some
/// ended before the freed memory is returned.
pub const DEFAULT_MEMORY_RETURN_DELAY: Duration = Duration::from_secs(2);

/// The longest the task sleeps between two looks at the controller's counters.
const MAX_TICK: Duration = Duration::from_secs(1);

/// Decides when to purge, from the controller's stream counters: when at least one stream
/// has ended since the last purge, and neither counter has moved for the quiet period.
#[derive(Debug, Clone)]
pub struct Trigger {
    quiet: Duration,
    /// The counters (attached, ended) as last seen, and since when they have not moved.
    seen: (u64, u64),
    since: Instant,
    /// Streams ended at the last purge (or at the start).
    ended_at_purge: u64,
}

impl Trigger {
    /// A trigger that has seen the counters `attached` and `ended` at `now`; streams ended
    /// before it do not count.
    pub fn new(quiet: Duration, now: Instant, attached: u64, ended: u64) -> Self {
        Self {
            quiet,
            seen: (attached, ended),
            since: now,
            ended_at_purge: ended,
        }
    }

    /// Looks at the counters at `now`: `true` if it is time to purge (which the trigger then
    /// takes as done).
    pub fn observe(&mut self, now: Instant, attached: u64, ended: u64) -> bool {
        if (attached, ended) != self.seen {
            self.seen = (attached, ended);
            self.since = now;
            return false;
        }
        if ended > self.ended_at_purge && now.duration_since(self.since) >= self.quiet {
            self.ended_at_purge = ended;
            return true;
        }
        false
    }
}

/// The task that returns freed memory after streams have ended (see the module
/// documentation). Stops when dropped.
#[derive(Debug)]
pub struct MemoryReturn {
    task: JoinHandle<()>,
    returns: Arc<AtomicU64>,
    /// The controller's `streams_ended` that the last purge followed.
    covered: Arc<AtomicU64>,
    /// How long the last purge took, microseconds (on its blocking thread).
    took_us: Arc<AtomicU64>,
}

impl MemoryReturn {
    /// Watches `controller` and calls [`return_freed`] once streams have ended and no stream
    /// has been attached or ended for `quiet`. Counted in `smcontroller_memory_returns_total`.
    /// Must be called within a tokio runtime.
    pub fn spawn(controller: Controller, quiet: Duration) -> Self {
        Self::spawn_with(controller, quiet, || {
            let before = rss_bytes();
            let started = std::time::Instant::now();
            let released = return_freed();
            let took = started.elapsed();
            let after = rss_bytes();
            if released {
                info!(
                    rss_before_kib = before.map(|b| b / 1024),
                    rss_after_kib = after.map(|b| b / 1024),
                    heap_in_use_kib = heap_in_use().map(|b| b / 1024),
                    took_us = took.as_micros() as u64,
                    "streams ended: returned freed memory to the OS"
                );
            } else {
                debug!("streams ended: nothing to return to the OS");
            }
        })
    }

    /// Like [`spawn`](Self::spawn), with `purge` (run on a blocking thread) in place of
    /// [`return_freed`]: for tests.
    pub fn spawn_with<F>(controller: Controller, quiet: Duration, purge: F) -> Self
    where
        F: Fn() + Clone + Send + Sync + 'static,
    {
        let returns = Arc::new(AtomicU64::new(0));
        let covered = Arc::new(AtomicU64::new(0));
        let took_us = Arc::new(AtomicU64::new(0));
        let (counted, covering, timing) = (returns.clone(), covered.clone(), took_us.clone());
        let task = tokio::spawn(async move {
            let mut trigger = Trigger::new(
                quiet,
                Instant::now(),
                controller.streams_attached(),
                controller.streams_ended(),
            );
            let mut tick = tokio::time::interval(quiet.min(MAX_TICK).max(Duration::from_millis(1)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let ended = controller.streams_ended();
                if !trigger.observe(Instant::now(), controller.streams_attached(), ended) {
                    continue;
                }
                // A blocking thread: a purge of a large heap walks every arena.
                let purge = purge.clone();
                let took = tokio::task::spawn_blocking(move || {
                    let started = std::time::Instant::now();
                    purge();
                    started.elapsed()
                })
                .await
                .unwrap_or_default();
                timing.store(
                    u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
                    Ordering::Relaxed,
                );
                covering.store(ended, Ordering::Relaxed);
                counted.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("smcontroller_memory_returns_total").increment(1);
            }
        });
        Self {
            task,
            returns,
            covered,
            took_us,
        }
    }

    /// How many purges the task has made.
    pub fn returns(&self) -> u64 {
        self.returns.load(Ordering::Relaxed)
    }

    /// How many streams had ended ([`Controller::streams_ended`]) when the last purge was
    /// decided: once it reaches a count read from the controller, the memory of those
    /// streams has been returned (the bench waits on it).
    pub fn covered(&self) -> u64 {
        self.covered.load(Ordering::Relaxed)
    }

    /// How long the last purge took (zero before the first): while it runs, the allocator's
    /// arenas are locked in turn, so this is what it can cost the other threads at most.
    pub fn last_purge_took(&self) -> Duration {
        Duration::from_micros(self.took_us.load(Ordering::Relaxed))
    }
}

impl Drop for MemoryReturn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Asks the allocator to give the free pages of its heap back to the OS; `true` if it gave
/// some. On glibc, `malloc_trim(0)`: every arena's free pages, not only the top of the main
/// heap. Elsewhere it does nothing and returns `false`.
pub fn return_freed() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // One of the workspace's two uses of `unsafe`, with `heap_in_use` below (the lint is
        // `deny`, not `forbid`, for them).
        // SAFETY: malloc_trim takes no pointer and touches only the allocator's own state,
        // under the allocator's locks; glibc documents it as thread-safe (MT-Safe), and the
        // process's allocator is glibc's malloc (no global allocator is set in this crate).
        #[allow(unsafe_code)]
        let released = unsafe { libc::malloc_trim(0) };
        released == 1
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Bytes of heap the allocator has handed out and not had back: what the process's live
/// allocations hold, without what the allocator keeps free (glibc's `mallinfo2`, in-use
/// chunks of every arena plus mmapped ones). `None` elsewhere than on glibc. It walks every
/// arena under its lock: for a purge's log line and the bench, not for a hot path.
pub fn heap_in_use() -> Option<u64> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 takes nothing and returns a struct by value, read from the
        // allocator's own state under its locks; glibc (2.33 and later) documents it as
        // thread-safe (MT-Unsafe only under `init`, which is its first call's lazy set-up,
        // itself locked).
        #[allow(unsafe_code)]
        let info = unsafe { libc::mallinfo2() };
        Some((info.uordblks + info.hblkhd) as u64)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        None
    }
}

/// The process's resident set size, bytes (`VmRSS` of `/proc/self/status`); `None` where
/// there is no such file.
pub fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line
        .trim_start_matches("VmRSS:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUIET: Duration = Duration::from_secs(2);

    fn at(start: Instant, ms: u64) -> Instant {
        start + Duration::from_millis(ms)
    }

    #[test]
    fn n_leak_2_purges_once_streams_ended_and_then_stood_still() {
        let t0 = Instant::now();
        let mut trigger = Trigger::new(QUIET, t0, 10, 0);
        // Streams end at 100 ms; still moving at 900 ms.
        assert!(!trigger.observe(at(t0, 100), 10, 4));
        assert!(!trigger.observe(at(t0, 900), 10, 10));
        // Not yet the quiet period since the last move.
        assert!(!trigger.observe(at(t0, 2_800), 10, 10));
        assert!(trigger.observe(at(t0, 2_900), 10, 10));
        // Once per burst.
        assert!(!trigger.observe(at(t0, 10_000), 10, 10));
        assert!(!trigger.observe(at(t0, 60_000), 10, 10));
    }

    #[test]
    fn n_leak_2_no_purge_without_an_ended_stream() {
        let t0 = Instant::now();
        // Streams that ended before the trigger started do not count.
        let mut trigger = Trigger::new(QUIET, t0, 50, 20);
        // New nodes connect and stay.
        assert!(!trigger.observe(at(t0, 500), 80, 20));
        for s in 1..100 {
            assert!(!trigger.observe(at(t0, 500 + s * 1_000), 80, 20));
        }
    }

    #[test]
    fn n_leak_2_no_purge_while_streams_keep_coming_and_going() {
        let t0 = Instant::now();
        let mut trigger = Trigger::new(QUIET, t0, 0, 0);
        // A reconnect loop: one stream in and one out every second, for a minute.
        for s in 1..=60 {
            assert!(!trigger.observe(at(t0, s * 1_000), s, s - 1));
        }
        // It stops: one purge after the quiet period.
        assert!(!trigger.observe(at(t0, 61_000), 60, 60));
        assert!(!trigger.observe(at(t0, 62_000), 60, 60));
        assert!(trigger.observe(at(t0, 63_000), 60, 60));
        // A new departure later: one more.
        assert!(!trigger.observe(at(t0, 100_000), 60, 61));
        assert!(trigger.observe(at(t0, 102_000), 60, 61));
    }

    /// The task over a real controller, under tokio's paused clock: streams that end are
    /// followed by one purge, the quiet period after the last of them, and no more.
    #[tokio::test(start_paused = true)]
    async fn n_leak_2_one_purge_the_quiet_period_after_the_last_stream_ended() {
        use smcontroller_routing::{InboundEvent, Receivers, Settings};

        let controller = Controller::new(
            Settings::default(),
            Receivers::all(Arc::new(crate::receivers::Recorder::new())),
        );
        let purged = Arc::new(AtomicU64::new(0));
        let task = MemoryReturn::spawn_with(controller.clone(), QUIET, {
            let purged = purged.clone();
            move || {
                purged.fetch_add(1, Ordering::Relaxed);
            }
        });
        // Nothing has ended: no purge however long it waits.
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(task.returns(), 0);

        // Three streams that end at once (the SM hangs up before registering).
        for _ in 0..3 {
            let _commands = controller
                .attach(futures::stream::empty::<InboundEvent>())
                .unwrap();
        }
        while controller.streams_ended() < 3 {
            tokio::task::yield_now().await;
        }
        let ended_at = Instant::now();
        // The purge comes once the counters have stood still for the quiet period, at the
        // next tick at most a second later.
        while task.returns() == 0 {
            assert!(
                ended_at.elapsed() <= QUIET + MAX_TICK + Duration::from_millis(10),
                "no purge {:?} after the streams ended",
                ended_at.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(ended_at.elapsed() >= QUIET, "{:?}", ended_at.elapsed());
        assert_eq!(purged.load(Ordering::Relaxed), 1);
        assert_eq!(task.covered(), 3);
        // And no more while nothing moves.
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(task.returns(), 1);
        assert_eq!(purged.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn the_resident_size_is_read_on_linux() {
        if cfg!(target_os = "linux") {
            let rss = rss_bytes().expect("VmRSS of /proc/self/status");
            assert!(rss > 1024 * 1024, "{rss}");
        }
    }

    #[test]
    fn the_heap_in_use_follows_an_allocation_on_glibc() {
        if cfg!(all(target_os = "linux", target_env = "gnu")) {
            let before = heap_in_use().expect("mallinfo2");
            // 64 MiB: far more than other tests' threads allocate meanwhile.
            let block = vec![1u8; 64 << 20];
            let with = heap_in_use().expect("mallinfo2");
            assert!(with >= before + (60 << 20), "{before} -> {with}");
            drop(block);
            let after = heap_in_use().expect("mallinfo2");
            assert!(after + (60 << 20) <= with, "{with} -> {after}");
            // Giving back after a large free does not fail.
            return_freed();
        } else {
            assert_eq!(heap_in_use(), None);
        }
    }
}
