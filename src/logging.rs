//! Process logging setup and rate limiting of per-event problems.
//!
//! Owns how sluice talks to the journal. Must never let a burst of bad frames flood it:
//! per-event problems go through a [`RateLimited`] that logs the first few per interval
//! and then a summary of how many were suppressed.

use std::time::{Duration, Instant};

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

/// Changes the log filter of the running process (SIGHUP).
#[derive(Clone)]
pub struct LogControl {
    handle: reload::Handle<EnvFilter, Registry>,
}

impl LogControl {
    pub fn set_filter(&self, filter: &str) -> anyhow::Result<()> {
        let parsed = EnvFilter::try_new(filter)
            .map_err(|e| anyhow::anyhow!("invalid log filter {filter:?}: {e}"))?;
        self.handle
            .reload(parsed)
            .map_err(|e| anyhow::anyhow!("cannot change the log filter: {e}"))
    }
}

/// Installs the global subscriber: `pretty` for humans, `json` for log shippers.
pub fn init(format: &str, filter: &str) -> anyhow::Result<LogControl> {
    let filter = EnvFilter::try_new(filter)
        .map_err(|e| anyhow::anyhow!("invalid log filter {filter:?}: {e}"))?;
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let result = match format {
        "json" => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        "pretty" => registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .try_init(),
        other => anyhow::bail!("unknown log format {other:?} (use pretty or json)"),
    };
    result.map_err(|e| anyhow::anyhow!("cannot install logger: {e}"))?;
    Ok(LogControl { handle })
}

/// Allows `burst` messages per `interval`; counts the rest.
pub struct RateLimited {
    interval: Duration,
    burst: u32,
    window_start: Instant,
    in_window: u32,
    suppressed: u64,
}

impl RateLimited {
    pub fn new(burst: u32, interval: Duration) -> Self {
        Self {
            interval,
            burst,
            window_start: Instant::now(),
            in_window: 0,
            suppressed: 0,
        }
    }

    /// Whether to log this occurrence. When a new window opens, returns how many were
    /// suppressed in the previous one so the caller can say so.
    pub fn check(&mut self) -> (bool, u64) {
        let now = Instant::now();
        let mut carried = 0;
        if now.duration_since(self.window_start) >= self.interval {
            carried = std::mem::take(&mut self.suppressed);
            self.window_start = now;
            self.in_window = 0;
        }
        if self.in_window < self.burst {
            self.in_window += 1;
            (true, carried)
        } else {
            self.suppressed += 1;
            (false, carried)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_a_burst_and_reports_suppressed() {
        // The 100 checks must fall in one 30 ms window: asserted of a round that took less
        // (a round the machine stalled for a window, CI's loaded cores, rightly allows more
        // and is run again, for at most 30 s).
        let interval = Duration::from_millis(30);
        let (mut limiter, allowed) = crate::test_rounds::on_time(interval, || {
            let mut limiter = RateLimited::new(3, interval);
            let allowed = (0..100).filter(|_| limiter.check().0).count();
            (limiter, allowed)
        });
        assert_eq!(allowed, 3);
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(limiter.check(), (true, 97));
    }
}
