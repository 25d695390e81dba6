//! The catch-up pool: where subscribers in catch-up read the log and write what they
//! read, on threads at a lower priority than the live path.
//!
//! Owns a small tokio runtime of its own (`--catchup-threads` workers, and its blocking
//! threads for reads below the hot tail), every thread of it at `--catchup-nice`. The
//! live path (the ingest thread, the log writer, the dispatcher and its direct writes,
//! live sessions) runs on the main runtime at normal priority, so when the cores are
//! busy the kernel runs it first and catch-up gets what is left. Must never run live
//! work, or keep running after [`CatchupPool::stop`] (tasks still under way are given a
//! bounded time, then dropped).

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

/// How long [`CatchupPool::stop`] lets catch-up work under way finish (a write is at
/// most one catch-up batch).
const STOP_GRACE: Duration = Duration::from_secs(2);

/// The catch-up pool was stopped (shutdown): the work was not run, or was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStopped;

/// The pool's threads and niceness (fixed at start).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CatchupThreads {
    /// Async worker threads (catch-up writes); 0 = one per core.
    pub threads: usize,
    /// Niceness of every thread of the pool (0-19; 0 = the live path's priority).
    pub nice: i32,
}

impl Default for CatchupThreads {
    fn default() -> Self {
        Self {
            threads: 0,
            nice: 19,
        }
    }
}

/// The low-priority runtime catch-up runs on. Stopped on [`CatchupPool::stop`] or drop.
pub struct CatchupPool {
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
    handle: Mutex<Option<tokio::runtime::Handle>>,
    /// The pool's threads alive now (workers and blocking threads).
    alive: Arc<AtomicUsize>,
}

impl CatchupPool {
    /// Starts the pool's runtime (its threads lower their own priority as they start).
    pub fn start(config: CatchupThreads) -> std::io::Result<Self> {
        let workers = match config.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let nice = config.nice;
        let alive = Arc::new(AtomicUsize::new(0));
        let (started, stopped) = (alive.clone(), alive.clone());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name("sluice-catchup")
            .on_thread_start(move || {
                started.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = crate::priority::lower_this_thread(nice) {
                    tracing::warn!(error = %e, nice, "cannot lower a catch-up thread's priority");
                }
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
        })
    }

    fn handle(&self) -> Result<tokio::runtime::Handle, PoolStopped> {
        self.handle.lock().clone().ok_or(PoolStopped)
    }

    /// Runs `work` on the pool's workers and waits for its output.
    pub async fn run<F>(&self, work: F) -> Result<F::Output, PoolStopped>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle()?.spawn(work).await.map_err(|_| PoolStopped)
    }

    /// Runs the blocking `work` (a read below the hot tail) on the pool's blocking
    /// threads and waits for its output.
    pub async fn read<T, F>(&self, work: F) -> Result<T, PoolStopped>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        self.handle()?
            .spawn_blocking(work)
            .await
            .map_err(|_| PoolStopped)
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
                nice: 7,
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
        assert_eq!(pool.run(async { 1 }).await, Err(PoolStopped));
        assert_eq!(pool.read(|| 1).await, Err(PoolStopped));
    }
}
