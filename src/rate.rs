//! The one rate limiter: a token bucket, used for new connections (admission), catch-up
//! reads (events per second per subscriber), subscriber updates (messages per second per
//! connection) and routing-index changes (entries per second, hub-wide).
//!
//! Owns: refilling by elapsed time and taking tokens. Must never: sleep or block (the
//! caller decides whether to wait, refuse or close), or hold more than its burst.

use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct TokenBucket {
    /// Tokens added per second.
    rate: f64,
    /// Most tokens held; the bucket starts full.
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket. A rate or burst at or below zero is treated as the smallest positive
    /// one, so a misconfigured limit throttles rather than divides by zero.
    pub fn new(rate: f64, burst: f64) -> Self {
        let (rate, burst) = positive(rate, burst);
        Self {
            rate,
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    /// New limits (a reload): what has accrued so far is kept, up to the new burst.
    pub fn set_limits(&mut self, rate: f64, burst: f64) {
        self.refill();
        (self.rate, self.burst) = positive(rate, burst);
        self.tokens = self.tokens.min(self.burst);
    }

    /// Takes `n` tokens if the bucket holds them.
    pub fn try_take(&mut self, n: f64) -> bool {
        self.refill();
        if self.tokens < n {
            return false;
        }
        self.tokens -= n;
        true
    }

    /// Takes `n` tokens now, borrowing against the future if need be; returns how long
    /// until the debt is paid off (zero when there was none), which is how long a caller
    /// that paces itself should wait.
    pub fn take_on_credit(&mut self, n: f64) -> Duration {
        // No wait exceeds `Duration::MAX`, so this always takes.
        self.take_within(n, Duration::MAX).unwrap_or(Duration::MAX)
    }

    /// Takes `n` tokens if the debt that leaves is paid off within `max_wait`, and returns
    /// that wait (zero when there is no debt); takes nothing and returns the wait it would
    /// have been otherwise. For costs that may be deferred a little but not queued without
    /// end.
    pub fn take_within(&mut self, n: f64, max_wait: Duration) -> Result<Duration, Duration> {
        self.refill();
        let short = n - self.tokens;
        let wait = if short <= 0.0 {
            Duration::ZERO
        } else {
            // Saturates: a debt at a near-zero rate is longer than a Duration holds.
            Duration::try_from_secs_f64(short / self.rate).unwrap_or(Duration::MAX)
        };
        if wait > max_wait {
            return Err(wait);
        }
        self.tokens -= n;
        Ok(wait)
    }

    fn refill(&mut self) {
        let now = Instant::now();
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
    }
}

fn positive(rate: f64, burst: f64) -> (f64, f64) {
    let floor = |x: f64| if x > 0.0 { x } else { f64::MIN_POSITIVE };
    (floor(rate), floor(burst))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_bucket_gives_its_burst_then_refuses() {
        let mut bucket = TokenBucket::new(0.001, 3.0);
        assert!((0..3).all(|_| bucket.try_take(1.0)));
        assert!(!bucket.try_take(1.0));
    }

    #[test]
    fn tokens_come_back_with_time_up_to_the_burst() {
        let mut bucket = TokenBucket::new(1000.0, 2.0);
        assert!(bucket.try_take(2.0));
        std::thread::sleep(Duration::from_millis(20));
        // 20 ms at 1,000/s would be 20 tokens; the burst caps it at 2.
        assert!(bucket.try_take(2.0));
        assert!(!bucket.try_take(1.0));
    }

    #[test]
    fn credit_is_paid_off_at_the_rate() {
        let mut bucket = TokenBucket::new(100.0, 100.0);
        assert_eq!(bucket.take_on_credit(100.0), Duration::ZERO);
        let wait = bucket.take_on_credit(50.0);
        // 50 tokens owed at 100/s: about half a second (less whatever accrued meanwhile).
        assert!(wait > Duration::from_millis(400) && wait <= Duration::from_millis(500));
    }

    #[test]
    fn new_limits_cap_what_has_accrued() {
        let mut bucket = TokenBucket::new(0.001, 10.0);
        bucket.set_limits(0.001, 2.0);
        assert!(bucket.try_take(2.0));
        assert!(!bucket.try_take(1.0));
    }

    #[test]
    fn a_zero_rate_throttles_instead_of_dividing_by_zero() {
        let mut bucket = TokenBucket::new(0.0, 0.0);
        assert!(!bucket.try_take(1.0));
        assert!(bucket.take_on_credit(1.0) > Duration::from_secs(3600));
    }

    #[test]
    fn take_within_takes_only_what_is_paid_off_in_time() {
        let mut bucket = TokenBucket::new(100.0, 100.0);
        assert_eq!(bucket.take_within(60.0, Duration::ZERO), Ok(Duration::ZERO));
        // 40 left: 100 more is 60 short, 0.6 s at 100/s.
        let refused = bucket.take_within(100.0, Duration::from_millis(100));
        assert!(matches!(refused, Err(w) if w > Duration::from_millis(500)));
        // Refusing took nothing: 40 are still there.
        assert_eq!(bucket.take_within(40.0, Duration::ZERO), Ok(Duration::ZERO));
        let waited = bucket.take_within(50.0, Duration::from_secs(1));
        assert!(
            matches!(waited, Ok(w) if w > Duration::from_millis(400) && w <= Duration::from_millis(500))
        );
        // In debt now: even one token must wait.
        assert!(bucket.take_within(1.0, Duration::ZERO).is_err());
    }
}
