//! Process logging setup and rate limiting of per-event problems.
//!
//! Owns how sluice talks to the journal. Must never let a burst of bad frames flood it:
//! per-event problems go through a [`RateLimited`] that logs the first few per interval
//! and then a summary of how many were suppressed.

use std::time::{Duration, Instant};

/// Installs the global subscriber: `pretty` for humans, `json` for log shippers.
pub fn init(format: &str, filter: &str) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .map_err(|e| anyhow::anyhow!("invalid log filter {filter:?}: {e}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match format {
        "json" => builder.json().try_init(),
        "pretty" => builder.try_init(),
        other => anyhow::bail!("unknown log format {other:?} (use pretty or json)"),
    };
    result.map_err(|e| anyhow::anyhow!("cannot install logger: {e}"))
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
        let mut limiter = RateLimited::new(3, Duration::from_millis(30));
        let allowed = (0..100).filter(|_| limiter.check().0).count();
        assert_eq!(allowed, 3);
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(limiter.check(), (true, 97));
    }
}
