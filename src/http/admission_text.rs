//! What subscribers send us (v1 `options_update`) is read off the async workers and paid
//! for by size.
//!
//! Owns the small pool of threads that parse and validate client text messages (a
//! 10,000-DID `options_update` is ~440 KB of JSON, milliseconds of CPU), run at a lower
//! priority than the workers that deliver events; and the byte budget every message is
//! charged before it is parsed, in total and per client IP ([`SharedBudget`]: the
//! address's share first, then the total, so one address draws on the total only at its
//! share's pace). Must never: parse a large message on an async worker, hold a charge
//! whose wait exceeds [`MAX_TEXT_WAIT`] (the sender is closed with 1013 instead), or let
//! one address parse more than its share.
//!
//! Memory: a message waiting for its charge or a thread is held by its own session (one
//! per connection, at most `--max-client-message-kib`), and no message waits longer than
//! [`MAX_TEXT_WAIT`] per step, so what waits is bounded by the total rate times twice
//! that wait plus the bursts.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use parking_lot::Mutex;

use crate::fanout::filter::Filter;
use crate::rate::{SharedBudget, TooLong};

/// Limits of client text messages.
#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    /// Bytes of client text messages parsed per second across the server (burst as many).
    pub bytes_per_sec: u64,
    /// One client IP's share of `bytes_per_sec` (burst as many).
    pub bytes_per_sec_per_ip: u64,
    /// Threads parsing messages of [`INLINE_BYTES`] or more (fixed at start).
    pub threads: usize,
    /// Niceness of those threads (0-19, fixed at start): above the async workers', so on
    /// a busy machine parsing yields to delivery.
    pub nice: i32,
}

impl Default for TextConfig {
    fn default() -> Self {
        Self {
            bytes_per_sec: 4 * 1024 * 1024,
            bytes_per_sec_per_ip: 1024 * 1024,
            threads: 1,
            nice: 10,
        }
    }
}

/// Messages smaller than this are parsed in place: a hop to the pool and back costs more
/// than parsing them (an `options_update` of a few collections is ~200 B).
pub const INLINE_BYTES: usize = 8 * 1024;

/// Longest a message waits for its address's share, or then for the total; longer, and
/// the sender is closed with 1013 (retry later) rather than queued.
pub const MAX_TEXT_WAIT: Duration = Duration::from_secs(5);

/// What a client's options message asks for, once parsed and validated.
#[derive(Debug)]
pub struct ClientOptions {
    pub filter: Filter,
    /// A new `maxMessageSizeBytes`, if the message sets one.
    pub max_message_bytes: Option<usize>,
}

/// The work that reads one text message: runs on the pool (or in place when small).
pub type TextJob = Box<dyn FnOnce() -> Result<ClientOptions, String> + Send>;

/// The budget could not take a message within [`MAX_TEXT_WAIT`]: how long it would
/// have waited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextBusy(pub Duration);

/// Counters for metrics.
#[derive(Debug, Default)]
pub struct TextStats {
    /// Messages parsed in place (under [`INLINE_BYTES`]) and on the pool.
    pub inline: AtomicU64,
    pub pooled: AtomicU64,
    /// Bytes of messages charged to the budget.
    pub bytes: AtomicU64,
    /// Messages that waited for the budget, and ones refused (sender closed with 1013).
    pub waited: AtomicU64,
    pub refused: AtomicU64,
}

type Job = Box<dyn FnOnce() + Send>;

/// The pool and the budget, shared by every session.
pub struct TextPool {
    budget: Mutex<SharedBudget<IpAddr>>,
    config: Mutex<TextConfig>,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    pub stats: TextStats,
}

impl TextPool {
    /// Starts `config.threads` parsing threads (at least one).
    pub fn new(config: TextConfig) -> std::io::Result<Arc<Self>> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..config.threads.max(1) {
            let rx = rx.clone();
            // A failure to lower is logged: the pool still works at the workers' priority.
            let class = crate::priority::Background::Nice(config.nice);
            std::thread::Builder::new()
                .name(format!("sluice-text-{i}"))
                .spawn(move || {
                    crate::priority::lower_this_thread_or_log(class, "client text parsing");
                    loop {
                        // The lock is held only while waiting for the next job.
                        let job = rx.lock().recv();
                        match job {
                            // A job that panics loses its answer (its session is closed
                            // as busy), not the thread.
                            Ok(job) => {
                                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                            }
                            Err(_) => return,
                        }
                    }
                })?;
        }
        let (total, ip) = rates(&config);
        Ok(Arc::new(Self {
            budget: Mutex::new(SharedBudget::new(total, total, ip, ip)),
            config: Mutex::new(config),
            jobs: Mutex::new(Some(tx)),
            stats: TextStats::default(),
        }))
    }

    /// The limits in force.
    pub fn config(&self) -> TextConfig {
        self.config.lock().clone()
    }

    /// New rates (SIGHUP); the threads and their priority stay as started.
    pub fn set_config(&self, config: &TextConfig) {
        let (total, ip) = rates(config);
        self.budget.lock().set_limits(total, total, ip, ip);
        let mut current = self.config.lock();
        current.bytes_per_sec = config.bytes_per_sec;
        current.bytes_per_sec_per_ip = config.bytes_per_sec_per_ip;
    }

    /// Charges a message of `bytes` to `ip`'s share: how long to wait before
    /// [`TextPool::parse`] (the sender keeps being read meanwhile), or, charging nothing,
    /// the wait over [`MAX_TEXT_WAIT`] it would have been.
    pub fn charge_share(&self, ip: Option<IpAddr>, bytes: usize) -> Result<Duration, TextBusy> {
        self.stats.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        let Some(ip) = ip else {
            return Ok(Duration::ZERO);
        };
        let result = self
            .budget
            .lock()
            .take_share_within(ip, bytes as f64, MAX_TEXT_WAIT);
        self.count(result)
    }

    /// Parses a message of `bytes` with `job`, after taking it from the total (waiting
    /// for it unless that would exceed [`MAX_TEXT_WAIT`]): on the pool, or in place when
    /// it is small. `Err` when the total is spent that far, or the pool has stopped.
    pub async fn parse(
        &self,
        bytes: usize,
        job: TextJob,
    ) -> Result<Result<ClientOptions, String>, TextBusy> {
        let taken = self
            .budget
            .lock()
            .take_total_within(bytes as f64, MAX_TEXT_WAIT);
        let wait = self.count(taken)?;
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        if bytes < INLINE_BYTES {
            self.stats.inline.fetch_add(1, Ordering::Relaxed);
            return Ok(job());
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let sent = match &*self.jobs.lock() {
            Some(jobs) => jobs
                .send(Box::new(move || {
                    let _ = tx.send(job());
                }))
                .is_ok(),
            None => false,
        };
        if !sent {
            return Err(TextBusy(MAX_TEXT_WAIT));
        }
        self.stats.pooled.fetch_add(1, Ordering::Relaxed);
        rx.await.map_err(|_| TextBusy(MAX_TEXT_WAIT))
    }

    /// Stops the threads once the jobs queued are done.
    pub fn stop(&self) {
        self.jobs.lock().take();
    }

    fn count(&self, result: Result<Duration, TooLong>) -> Result<Duration, TextBusy> {
        match result {
            Ok(wait) => {
                if !wait.is_zero() {
                    self.stats.waited.fetch_add(1, Ordering::Relaxed);
                }
                Ok(wait)
            }
            Err(TooLong { would_wait }) => {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                Err(TextBusy(would_wait))
            }
        }
    }
}

fn rates(config: &TextConfig) -> (f64, f64) {
    (
        config.bytes_per_sec as f64,
        config.bytes_per_sec_per_ip as f64,
    )
}

/// The close reason for a message the text budget could not take in time.
pub fn busy_reason(busy: TextBusy) -> String {
    format!(
        "the server is busy reading client messages; retry in {} s",
        busy.0.as_secs() + 1
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> ClientOptions {
        ClientOptions {
            filter: Filter::default(),
            max_message_bytes: Some(7),
        }
    }

    fn pool(per_ip: u64, total: u64) -> Arc<TextPool> {
        TextPool::new(TextConfig {
            bytes_per_sec: total,
            bytes_per_sec_per_ip: per_ip,
            threads: 1,
            nice: 0,
        })
        .unwrap()
    }

    #[tokio::test]
    async fn large_messages_are_parsed_off_the_calling_thread_and_small_ones_in_place() {
        let pool = pool(1 << 30, 1 << 30);
        let caller = std::thread::current().id();
        let (tx, rx) = std::sync::mpsc::channel();
        let job: TextJob = Box::new(move || {
            tx.send(std::thread::current().name().map(str::to_owned))
                .unwrap();
            Ok(options())
        });
        let parsed = pool.parse(INLINE_BYTES, job).await.unwrap().unwrap();
        assert_eq!(parsed.max_message_bytes, Some(7));
        assert_eq!(rx.recv().unwrap().as_deref(), Some("sluice-text-0"));
        let (tx, rx) = std::sync::mpsc::channel();
        let job: TextJob = Box::new(move || {
            tx.send(std::thread::current().id()).unwrap();
            Err("bad".into())
        });
        let parsed = pool.parse(INLINE_BYTES - 1, job).await.unwrap();
        assert_eq!(parsed.unwrap_err(), "bad");
        assert_eq!(rx.recv().unwrap(), caller);
        assert_eq!(pool.stats.pooled.load(Ordering::Relaxed), 1);
        assert_eq!(pool.stats.inline.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn one_address_is_charged_by_size_and_refused_past_the_longest_wait() {
        // 1 MB/s per address: its first 1 MB is the burst, the next 4 MB wait 4 s, and a
        // further 2 MB would wait 6 s: refused, charging nothing.
        let pool = pool(1_000_000, 100_000_000);
        let a: IpAddr = [127, 0, 0, 2].into();
        let b: IpAddr = [127, 0, 0, 3].into();
        assert_eq!(pool.charge_share(Some(a), 1_000_000), Ok(Duration::ZERO));
        let wait = pool.charge_share(Some(a), 4_000_000).unwrap();
        assert!(wait > Duration::from_secs(3) && wait <= Duration::from_secs(4));
        let refused = pool.charge_share(Some(a), 2_000_000).unwrap_err();
        assert!(refused.0 > MAX_TEXT_WAIT);
        // Another address still has its whole share.
        assert_eq!(pool.charge_share(Some(b), 1_000_000), Ok(Duration::ZERO));
        assert_eq!(pool.stats.refused.load(Ordering::Relaxed), 1);
        assert_eq!(pool.stats.waited.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn the_total_refuses_past_the_longest_wait_and_a_reload_changes_it() {
        let pool = pool(1_000_000, 1_000_000);
        let job = || -> TextJob { Box::new(|| Ok(options())) };
        assert!(pool.parse(1_000_000, job()).await.is_ok());
        // The total is spent: 6 MB more would wait ~6 s.
        assert!(pool.parse(6_000_000, job()).await.is_err());
        pool.set_config(&TextConfig {
            bytes_per_sec: 100_000_000,
            bytes_per_sec_per_ip: 1_000_000,
            threads: 4,
            nice: 0,
        });
        let config = pool.config();
        assert_eq!(config.bytes_per_sec, 100_000_000);
        assert_eq!(config.threads, 1, "threads are fixed at start");
        assert!(pool.parse(6_000_000, job()).await.is_ok());
    }
}
