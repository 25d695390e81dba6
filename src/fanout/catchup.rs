//! The catch-up pool: where subscribers in catch-up read the log and write what they
//! read, on threads at a lower priority than the live path.
//!
//! Owns a small tokio runtime of its own (`--catchup-threads` workers, and its blocking
//! threads for reads below the hot tail), every thread of it at `--catchup-nice` or in the
//! idle class (`--catchup-sched idle`, then with its starvation bound, an
//! [`IdleWatch`] counting the pool's work). The live path (the ingest thread, the log
//! writer, the dispatcher and its direct writes, live sessions) runs on the main runtime
//! at normal priority, so when the cores are busy the kernel runs it first and catch-up
//! gets what is left. Cold reads are filtered where they are read, on the pool, so the
//! sessions' workers get only what they write. With `--catchup-pace-mib-per-sec` and
//! `--catchup-pace-events-per-sec`, every catch-up write first pays its bytes and its
//! events into the server-wide pace (`Pace`: one token bucket for each) and waits, on the
//! pool, until both are due: replays then take a bounded share of the machine and only
//! last longer (nothing is dropped or closed for it). Must never run
//! live work, or keep running after [`CatchupPool::stop`] (tasks still under way are
//! given a bounded time, then dropped).

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use crate::priority::{Background, IdleWatch, WatchStats};
use crate::rate::TokenBucket;

/// How long [`CatchupPool::stop`] lets catch-up work under way finish (a write is at
/// most one catch-up batch).
const STOP_GRACE: Duration = Duration::from_secs(2);

/// Why work handed to the catch-up pool gave no output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolError {
    /// The pool was stopped (shutdown): the work was not run, or was dropped.
    Stopped,
    /// The work panicked (a bug, counted and logged); the panic's message.
    Panicked(String),
}

impl PoolError {
    /// Stable label for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            PoolError::Stopped => "stopped",
            PoolError::Panicked(_) => "panicked",
        }
    }
}

impl std::fmt::Display for PoolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PoolError::Stopped => f.write_str("the catch-up pool has stopped"),
            PoolError::Panicked(message) => {
                write!(f, "catch-up work panicked: {message}")
            }
        }
    }
}

/// What the pool's threads are doing now and have done, for `/metrics`.
#[derive(Debug, Default)]
pub struct PoolStats {
    /// Catch-up reads below the hot tail handed to the pool and not finished (queued or
    /// running).
    pub reads: AtomicUsize,
    /// Catch-up writes handed to the pool and not finished (one per subscriber at most).
    pub writes: AtomicUsize,
    /// Work that panicked (each is logged; the subscriber's session ends).
    pub panics: AtomicU64,
    /// Catch-up writes that waited for the pace (`Pace`).
    pub paced_writes: AtomicU64,
    /// Time those writes waited, summed, nanoseconds.
    pub paced_ns: AtomicU64,
    /// Bytes of catch-up writes paid into the pace (every catch-up write's, waited or
    /// not); 0 while bytes are unpaced.
    pub paced_bytes: AtomicU64,
    /// Events of catch-up writes paid into the pace; 0 while events are unpaced.
    pub paced_events: AtomicU64,
}

/// What one catch-up write pays into the pace: its events' bytes on the subscriber's
/// wire (before compression) and how many events it sends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PaceCost {
    pub bytes: u64,
    pub events: u64,
}

/// Counts one piece of work in flight, from when it is handed to the pool until it is
/// dropped (finished, panicked, or dropped by a stop); the starvation bound's progress.
struct InFlight {
    stats: Arc<PoolStats>,
    count: fn(&PoolStats) -> &AtomicUsize,
    watch: Option<IdleWatch>,
}

impl InFlight {
    fn new(
        stats: &Arc<PoolStats>,
        count: fn(&PoolStats) -> &AtomicUsize,
        watch: &Option<IdleWatch>,
    ) -> Self {
        count(stats).fetch_add(1, Ordering::Relaxed);
        if let Some(watch) = watch {
            watch.handed();
        }
        Self {
            stats: stats.clone(),
            count,
            watch: watch.clone(),
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        (self.count)(&self.stats).fetch_sub(1, Ordering::Relaxed);
        if let Some(watch) = &self.watch {
            watch.finished();
        }
    }
}

/// The pool's threads and their priority, and the pace of its writes (fixed at start).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CatchupThreads {
    /// Async worker threads (catch-up writes); 0 = one per core.
    pub threads: usize,
    /// Where every thread of the pool runs: a niceness (0-19; 0 = the live path's
    /// priority) or the idle scheduling class.
    pub class: Background,
    /// In the idle class, how long catch-up work may make no progress while its threads
    /// wait for a core before they are raised to nice 19 until it does
    /// ([`IdleWatch`]); zero: never.
    pub starvation_bound: Duration,
    /// Bytes per second all catch-up writes together may send (`Pace`); 0: unpaced.
    pub pace_bytes_per_sec: u64,
    /// Events per second all catch-up writes together may send (`Pace`); 0: unpaced.
    pub pace_events_per_sec: u64,
}

/// Nice 19, as the daemon's default (`--catchup-sched nice`; the idle class is the
/// operator's choice, docs/DECISIONS.md, "Session 12"), at the daemon's default pace.
impl Default for CatchupThreads {
    fn default() -> Self {
        Self {
            threads: 0,
            class: Background::Nice(19),
            starvation_bound: DEFAULT_STARVATION_BOUND,
            pace_bytes_per_sec: DEFAULT_PACE_BYTES_PER_SEC,
            pace_events_per_sec: DEFAULT_PACE_EVENTS_PER_SEC,
        }
    }
}

/// The catch-up pace by default (`--catchup-pace-mib-per-sec` 320): on 2 cores, 100 cold
/// v1 replays of real events (~570 B each) still get ≥ 500,000 events/s and the live p99
/// stays within 20% of unloaded (docs/DECISIONS.md, "Session 14" and "Session 15").
pub const DEFAULT_PACE_BYTES_PER_SEC: u64 = 320 * 1024 * 1024;

/// The catch-up pace in events by default (`--catchup-pace-events-per-sec`): bounds the
/// per-event part of catch-up's cost (reads, hand-offs, one websocket message each),
/// which the pace in bytes leaves unbounded for small events (docs/DECISIONS.md,
/// "Session 15").
pub const DEFAULT_PACE_EVENTS_PER_SEC: u64 = 600_000;

/// How much of the pace's rate one burst may be: after a quiet spell, catch-up writes go
/// out unpaced for at most this long before they queue on the bucket.
const PACE_BURST: Duration = Duration::from_millis(20);

/// The server-wide pace of catch-up writes: a token bucket of bytes per second and one
/// of events per second, each shared by every subscriber in catch-up. A write takes its
/// bytes and its events on credit and waits until both debts are paid (so writes are
/// served in the order they asked, each waiting its share), on the pool's own timer;
/// nothing is refused or dropped. Bounds what the kernel's sends (per byte) and the
/// reads, hand-offs and messages (per event) of the replays (each session reads its
/// next batch only after writing the last) take of the machine, whatever the wire, the
/// filter and the events' sizes.
struct Pace {
    bytes: Option<Mutex<TokenBucket>>,
    events: Option<Mutex<TokenBucket>>,
    bytes_per_sec: u64,
    events_per_sec: u64,
}

/// A token bucket of `per_sec` with [`PACE_BURST`] of burst; none for 0 (unpaced).
fn pace_bucket(per_sec: u64) -> Option<Mutex<TokenBucket>> {
    (per_sec > 0).then(|| {
        let rate = per_sec as f64;
        // At least one whole unit of burst: a rate under 50/s still lets one through.
        Mutex::new(TokenBucket::new(
            rate,
            (rate * PACE_BURST.as_secs_f64()).max(1.0),
        ))
    })
}

impl Pace {
    fn new(bytes_per_sec: u64, events_per_sec: u64) -> Self {
        Self {
            bytes: pace_bucket(bytes_per_sec),
            events: pace_bucket(events_per_sec),
            bytes_per_sec,
            events_per_sec,
        }
    }

    /// Pays `cost` into both buckets and waits until it is due in both (at once while
    /// unpaced), counting it.
    async fn wait(&self, cost: PaceCost, stats: &PoolStats) {
        let mut wait = Duration::ZERO;
        if let Some(bucket) = &self.bytes {
            stats.paced_bytes.fetch_add(cost.bytes, Ordering::Relaxed);
            wait = wait.max(bucket.lock().take_on_credit(cost.bytes as f64));
        }
        if let Some(bucket) = &self.events {
            stats.paced_events.fetch_add(cost.events, Ordering::Relaxed);
            wait = wait.max(bucket.lock().take_on_credit(cost.events as f64));
        }
        if wait.is_zero() {
            return;
        }
        tokio::time::sleep(wait).await;
        stats.paced_writes.fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX);
        stats.paced_ns.fetch_add(ns, Ordering::Relaxed);
    }
}

/// The threads the idle pool's starvation bound raises: the pool's own, and the log's
/// read-ahead thread, which decodes segments the pool's reads may wait for.
const WATCHED_THREADS: &[&str] = &["sluice-catchup", "sluice-log-read-ahead"];

/// The idle pool's starvation bound by default (`--catchup-starvation-ms`).
pub const DEFAULT_STARVATION_BOUND: Duration = Duration::from_millis(500);

/// The low-priority runtime catch-up runs on. Stopped on [`CatchupPool::stop`] or drop.
pub struct CatchupPool {
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
    handle: Mutex<Option<tokio::runtime::Handle>>,
    /// The pool's threads alive now (workers and blocking threads).
    alive: Arc<AtomicUsize>,
    stats: Arc<PoolStats>,
    /// The starvation bound of an idle-class pool, and how long it is.
    watch: Option<IdleWatch>,
    starvation_bound: Duration,
    pace: Arc<Pace>,
}

impl CatchupPool {
    /// Starts the pool's runtime (its threads lower their own priority as they start).
    pub fn start(config: CatchupThreads) -> std::io::Result<Self> {
        let workers = match config.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let class = config.class;
        let watch = match class {
            Background::Idle if !config.starvation_bound.is_zero() => {
                Some(IdleWatch::start(config.starvation_bound, WATCHED_THREADS)?)
            }
            _ => None,
        };
        let alive = Arc::new(AtomicUsize::new(0));
        let (started, stopped) = (alive.clone(), alive.clone());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name("sluice-catchup")
            .on_thread_start(move || {
                started.fetch_add(1, Ordering::Relaxed);
                crate::priority::lower_this_thread_or_log(class, "catch-up pool");
            })
            .on_thread_stop(move || {
                stopped.fetch_sub(1, Ordering::Relaxed);
            })
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        Ok(Self {
            runtime: Mutex::new(Some(runtime)),
            handle: Mutex::new(Some(handle)),
            alive,
            stats: Arc::new(PoolStats::default()),
            starvation_bound: if watch.is_some() {
                config.starvation_bound
            } else {
                Duration::ZERO
            },
            watch,
            pace: Arc::new(Pace::new(
                config.pace_bytes_per_sec,
                config.pace_events_per_sec,
            )),
        })
    }

    fn handle(&self) -> Result<tokio::runtime::Handle, PoolError> {
        self.handle.lock().clone().ok_or(PoolError::Stopped)
    }

    /// Runs `work` (a catch-up write) on the pool's workers and waits for its output.
    pub async fn run<F>(&self, work: F) -> Result<F::Output, PoolError>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let handle = self.handle()?;
        let counted = InFlight::new(&self.stats, |s| &s.writes, &self.watch);
        let joined = handle
            .spawn(async move {
                let _counted = counted;
                work.await
            })
            .await;
        self.joined(joined)
    }

    /// Runs `work` (a catch-up write of `cost`) on the pool's workers once the pace lets
    /// it go (`Pace`; at once while unpaced), and waits for its output. The wait is the
    /// pool's: the caller's write timeout starts with `work`.
    pub async fn run_paced<F>(&self, cost: PaceCost, work: F) -> Result<F::Output, PoolError>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let (pace, stats) = (self.pace.clone(), self.stats.clone());
        self.run(async move {
            pace.wait(cost, &stats).await;
            work.await
        })
        .await
    }

    /// The pace of catch-up writes in force, bytes per second; 0 while unpaced.
    pub fn pace_bytes_per_sec(&self) -> u64 {
        self.pace.bytes_per_sec
    }

    /// The pace of catch-up writes in force, events per second; 0 while unpaced.
    pub fn pace_events_per_sec(&self) -> u64 {
        self.pace.events_per_sec
    }

    /// Runs the blocking `work` (a read below the hot tail) on the pool's blocking
    /// threads and waits for its output.
    pub async fn read<T, F>(&self, work: F) -> Result<T, PoolError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let handle = self.handle()?;
        let counted = InFlight::new(&self.stats, |s| &s.reads, &self.watch);
        let joined = handle
            .spawn_blocking(move || {
                let _counted = counted;
                work()
            })
            .await;
        self.joined(joined)
    }

    /// The output of work the pool ran, or why there is none: a panic is told apart
    /// from a stop (and counted and logged), so a bug in a read does not look like a
    /// restart to the subscriber.
    fn joined<T>(&self, joined: Result<T, tokio::task::JoinError>) -> Result<T, PoolError> {
        match joined {
            Ok(output) => Ok(output),
            Err(e) if e.is_panic() => {
                let payload = e.into_panic();
                let message = payload
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "(no message)".to_owned());
                self.stats.panics.fetch_add(1, Ordering::Relaxed);
                tracing::error!(panic = %message, "catch-up work panicked");
                Err(PoolError::Panicked(message))
            }
            Err(_) => Err(PoolError::Stopped),
        }
    }

    /// What the pool is doing now and has done.
    pub fn stats(&self) -> &PoolStats {
        &self.stats
    }

    /// What the idle pool's starvation bound has done; `None` without one (nice class,
    /// or a zero bound).
    pub fn starvation(&self) -> Option<&WatchStats> {
        self.watch.as_ref().map(IdleWatch::stats)
    }

    /// The starvation bound in force: zero without one.
    pub fn starvation_bound(&self) -> Duration {
        self.starvation_bound
    }

    /// Whether the pool still takes work.
    pub fn is_running(&self) -> bool {
        self.handle.lock().is_some()
    }

    /// The pool's threads alive now.
    pub fn threads_alive(&self) -> usize {
        self.alive.load(Ordering::Relaxed)
    }

    /// Stops taking work, lets what is under way finish for at most [`STOP_GRACE`], and
    /// ends the pool's threads. Blocks for that long at most: call it off the async
    /// workers (`spawn_blocking`) or at the end of a shutdown.
    pub fn stop(&self) {
        self.handle.lock().take();
        let runtime = self.runtime.lock().take();
        if let Some(runtime) = runtime {
            runtime.shutdown_timeout(STOP_GRACE);
        }
    }
}

impl Drop for CatchupPool {
    fn drop(&mut self) {
        self.handle.lock().take();
        // Dropped where blocking may not be allowed (an async task): nothing is waited for.
        if let Some(runtime) = self.runtime.lock().take() {
            runtime.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn work_runs_on_the_pool_threads_at_their_niceness_until_stopped() {
        let pool = std::sync::Arc::new(
            CatchupPool::start(CatchupThreads {
                threads: 1,
                class: Background::Nice(7),
                ..Default::default()
            })
            .unwrap(),
        );
        let here = crate::priority::this_thread_nice().unwrap();
        let (name, nice) = pool
            .run(async {
                (
                    std::thread::current().name().map(str::to_owned),
                    crate::priority::this_thread_nice().unwrap(),
                )
            })
            .await
            .unwrap();
        assert_eq!(name.as_deref(), Some("sluice-catchup"));
        assert!(pool.threads_alive() >= 1);
        assert_eq!(nice, here.max(7));
        let read_nice = pool
            .read(|| crate::priority::this_thread_nice().unwrap())
            .await
            .unwrap();
        assert_eq!(read_nice, here.max(7));
        let stopping = pool.clone();
        tokio::task::spawn_blocking(move || stopping.stop())
            .await
            .unwrap();
        assert!(!pool.is_running());
        assert_eq!(
            pool.threads_alive(),
            0,
            "every thread of the pool has ended"
        );
        assert_eq!(pool.run(async { 1 }).await, Err(PoolError::Stopped));
        assert_eq!(pool.read(|| 1).await, Err(PoolError::Stopped));
        assert_eq!(pool.stats().reads.load(Ordering::Relaxed), 0);
        assert_eq!(pool.stats().writes.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn in_the_idle_class_every_thread_of_the_pool_is_idle_and_keeps_its_niceness() {
        // Without the starvation bound: another test's busy loops could get the pool
        // raised (rightly) while this one looks at its class.
        let pool = CatchupPool::start(CatchupThreads {
            threads: 1,
            class: Background::Idle,
            starvation_bound: Duration::ZERO,
            pace_bytes_per_sec: 0,
            pace_events_per_sec: 0,
        })
        .unwrap();
        assert!(pool.starvation().is_none());
        assert_eq!(pool.starvation_bound(), Duration::ZERO);
        let here = crate::priority::this_thread_nice().unwrap();
        assert!(!crate::priority::this_thread_is_idle().unwrap());
        let on = || {
            (
                crate::priority::this_thread_is_idle().unwrap(),
                crate::priority::this_thread_nice().unwrap(),
            )
        };
        assert_eq!(pool.run(async move { on() }).await, Ok((true, here)));
        assert_eq!(pool.read(on).await, Ok((true, here)));
        drop(pool);
    }

    #[tokio::test]
    async fn a_panic_in_pool_work_is_told_apart_from_a_stop_and_counted() {
        let pool = CatchupPool::start(CatchupThreads {
            threads: 1,
            class: Background::Nice(0),
            ..Default::default()
        })
        .unwrap();
        let read = pool
            .read(|| -> u32 { panic!("a cold read went wrong") })
            .await;
        assert_eq!(
            read,
            Err(PoolError::Panicked("a cold read went wrong".into()))
        );
        let code = 7;
        let write = pool
            .run(async move {
                if code == 7 {
                    panic!("write {code} went wrong");
                }
                code
            })
            .await;
        assert_eq!(write, Err(PoolError::Panicked("write 7 went wrong".into())));
        assert_eq!(pool.stats().panics.load(Ordering::Relaxed), 2);
        // The pool still works after its work panicked.
        assert_eq!(pool.read(|| 3).await, Ok(3));
        assert_eq!(pool.stats().reads.load(Ordering::Relaxed), 0);
        assert_eq!(pool.stats().writes.load(Ordering::Relaxed), 0);
        drop(pool);
    }

    #[tokio::test]
    async fn work_in_flight_is_counted_until_it_ends() {
        let pool = Arc::new(
            CatchupPool::start(CatchupThreads {
                threads: 1,
                class: Background::Nice(0),
                ..Default::default()
            })
            .unwrap(),
        );
        let (go_read, wait_read) = std::sync::mpsc::channel::<()>();
        let (go_write, wait_write) = tokio::sync::oneshot::channel::<()>();
        let reading = tokio::spawn({
            let pool = pool.clone();
            async move { pool.read(move || wait_read.recv().is_ok()).await }
        });
        let writing = tokio::spawn({
            let pool = pool.clone();
            async move { pool.run(async move { wait_write.await.is_ok() }).await }
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while pool.stats().reads.load(Ordering::Relaxed) != 1
            || pool.stats().writes.load(Ordering::Relaxed) != 1
        {
            assert!(std::time::Instant::now() < deadline, "work never counted");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        go_read.send(()).unwrap();
        go_write.send(()).unwrap();
        assert_eq!(reading.await.unwrap(), Ok(true));
        assert_eq!(writing.await.unwrap(), Ok(true));
        assert_eq!(pool.stats().reads.load(Ordering::Relaxed), 0);
        assert_eq!(pool.stats().writes.load(Ordering::Relaxed), 0);
        let stopping = pool.clone();
        tokio::task::spawn_blocking(move || stopping.stop())
            .await
            .unwrap();
    }
}
