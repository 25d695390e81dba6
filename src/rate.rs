//! The one rate limiter: a token bucket, used for new connections (admission), catch-up
//! reads (events per second per subscriber), subscriber updates (messages per second per
//! connection) and routing-index changes (entries per second, hub-wide); and
//! [`SharedBudget`], a server-wide bucket with a bucket per client beside it, for budgets
//! one client must not be able to take whole.
//!
//! Owns: refilling by elapsed time and taking tokens, and the jittered `Retry-After` a
//! refused client is told ([`retry_after`]). Must never: sleep or block (the
//! caller decides whether to wait, refuse or close), or hold more than its burst.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// A take refused because the wait it needed exceeds what the caller allows: how long
/// that wait would have been (nothing was taken).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooLong {
    pub would_wait: Duration,
}

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

    /// The rate, per second.
    pub fn rate(&self) -> f64 {
        self.rate
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
    pub fn take_within(&mut self, n: f64, max_wait: Duration) -> Result<Duration, TooLong> {
        self.refill();
        let short = n - self.tokens;
        let wait = if short <= 0.0 {
            Duration::ZERO
        } else {
            // Saturates: a debt at a near-zero rate is longer than a Duration holds.
            Duration::try_from_secs_f64(short / self.rate).unwrap_or(Duration::MAX)
        };
        if wait > max_wait {
            return Err(TooLong { would_wait: wait });
        }
        self.tokens -= n;
        Ok(wait)
    }

    /// Gives back `n` tokens taken for work that will not be done (up to the burst).
    pub fn refund(&mut self, n: f64) {
        self.refill();
        self.tokens = (self.tokens + n).min(self.burst);
    }

    /// How long until `n` tokens could be taken without debt; zero if now.
    pub fn wait_for(&mut self, n: f64) -> Duration {
        self.refill();
        let short = n - self.tokens;
        if short <= 0.0 {
            Duration::ZERO
        } else {
            Duration::try_from_secs_f64(short / self.rate).unwrap_or(Duration::MAX)
        }
    }

    /// Whether the bucket holds its whole burst (nothing owed or recently used).
    pub fn is_full(&mut self) -> bool {
        self.refill();
        self.tokens >= self.burst
    }

    fn refill(&mut self) {
        let now = Instant::now();
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
    }
}

/// A budget shared by all clients, with a share per client beside it: taking draws on
/// both, so one client (one key, a client IP) gets at most its share however many
/// connections it opens, and the total stays bounded however many clients there are.
#[derive(Debug)]
pub struct SharedBudget<K> {
    total: TokenBucket,
    per_key: HashMap<K, TokenBucket>,
    key_rate: f64,
    key_burst: f64,
}

/// Keys tracked before idle (full) buckets are forgotten.
const PRUNE_AT: usize = 4096;

impl<K: Hash + Eq + Copy> SharedBudget<K> {
    pub fn new(total_rate: f64, total_burst: f64, key_rate: f64, key_burst: f64) -> Self {
        Self {
            total: TokenBucket::new(total_rate, total_burst),
            per_key: HashMap::new(),
            key_rate,
            key_burst,
        }
    }

    /// New limits (a reload); what has accrued is kept up to the new bursts.
    pub fn set_limits(&mut self, total_rate: f64, total_burst: f64, key_rate: f64, key_burst: f64) {
        self.total.set_limits(total_rate, total_burst);
        (self.key_rate, self.key_burst) = (key_rate, key_burst);
        for bucket in self.per_key.values_mut() {
            bucket.set_limits(key_rate, key_burst);
        }
    }

    fn bucket(&mut self, key: K) -> &mut TokenBucket {
        if self.per_key.len() >= PRUNE_AT && !self.per_key.contains_key(&key) {
            self.per_key.retain(|_, bucket| !bucket.is_full());
        }
        let (rate, burst) = (self.key_rate, self.key_burst);
        self.per_key
            .entry(key)
            .or_insert_with(|| TokenBucket::new(rate, burst))
    }

    /// Like [`TokenBucket::take_within`], from the total and from `key`'s share (when
    /// given) together: the wait is the longer of the two, and a refusal takes nothing.
    pub fn take_within(
        &mut self,
        key: Option<K>,
        n: f64,
        max_wait: Duration,
    ) -> Result<Duration, TooLong> {
        let mut wait = self.total.wait_for(n);
        if let Some(key) = key {
            wait = wait.max(self.bucket(key).wait_for(n));
        }
        if wait > max_wait {
            return Err(TooLong { would_wait: wait });
        }
        self.total.take_on_credit(n);
        if let Some(key) = key {
            self.bucket(key).take_on_credit(n);
        }
        Ok(wait)
    }

    /// Takes `n` from both on credit; how long until the debt is paid.
    pub fn take_on_credit(&mut self, key: Option<K>, n: f64) -> Duration {
        self.take_within(key, n, Duration::MAX)
            .unwrap_or(Duration::MAX)
    }

    /// Takes `n` from `key`'s share only, on credit; how long until that debt is paid.
    /// For work paced in two steps (this, then [`SharedBudget::take_total_on_credit`]
    /// once the wait is over), so a key whose share is in debt never draws the total
    /// into debt for everyone: however many requests it queues, it takes from the total
    /// at its share's rate.
    pub fn take_share_on_credit(&mut self, key: Option<K>, n: f64) -> Duration {
        match key {
            Some(key) => self.bucket(key).take_on_credit(n),
            None => Duration::ZERO,
        }
    }

    /// Like [`SharedBudget::take_share_on_credit`], but takes nothing and returns the wait
    /// it would have been when that exceeds `max_wait`.
    pub fn take_share_within(
        &mut self,
        key: K,
        n: f64,
        max_wait: Duration,
    ) -> Result<Duration, TooLong> {
        self.bucket(key).take_within(n, max_wait)
    }

    /// Like [`SharedBudget::take_total_on_credit`], but takes nothing and returns the wait
    /// it would have been when that exceeds `max_wait`.
    pub fn take_total_within(&mut self, n: f64, max_wait: Duration) -> Result<Duration, TooLong> {
        self.total.take_within(n, max_wait)
    }

    /// Takes `n` from the total only, on credit; how long until that debt is paid.
    pub fn take_total_on_credit(&mut self, n: f64) -> Duration {
        self.total.take_on_credit(n)
    }

    /// Gives back `n` taken for work that will not be done.
    pub fn refund(&mut self, key: Option<K>, n: f64) {
        self.total.refund(n);
        if let Some(bucket) = key.and_then(|k| self.per_key.get_mut(&k)) {
            bucket.refund(n);
        }
    }

    /// The rates in force: the total's and each key's share.
    pub fn rates(&self) -> (f64, f64) {
        (self.total.rate(), self.key_rate)
    }

    /// Keys tracked now.
    pub fn keys(&self) -> usize {
        self.per_key.len()
    }
}

fn positive(rate: f64, burst: f64) -> (f64, f64) {
    let floor = |x: f64| if x > 0.0 { x } else { f64::MIN_POSITIVE };
    (floor(rate), floor(burst))
}

/// The `Retry-After` a refused client is told: the base plus up to the base again, so the
/// clients refused together do not all come back in the same second.
pub fn retry_after(base_secs: u64) -> u64 {
    use rand::Rng;
    base_secs + rand::thread_rng().gen_range(0..=base_secs.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rounds::on_time;

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
        // 20 ms at 1,000/s would be 20 tokens; the burst caps it at 2: taking them leaves
        // none for a take less than a token's time (1 ms) later.
        let (refilled, more) = on_time(Duration::from_millis(1), || {
            let mut bucket = bucket.clone();
            (bucket.try_take(2.0), bucket.try_take(1.0))
        });
        assert!(refilled);
        assert!(!more);
    }

    #[test]
    fn credit_is_paid_off_at_the_rate() {
        // 50 tokens owed at 100/s: about half a second (less whatever accrued meanwhile,
        // under 10 tokens in a round of less than 100 ms).
        let (first, wait) = on_time(Duration::from_millis(100), || {
            let mut bucket = TokenBucket::new(100.0, 100.0);
            (bucket.take_on_credit(100.0), bucket.take_on_credit(50.0))
        });
        assert_eq!(first, Duration::ZERO);
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
    fn a_shared_budget_gives_each_key_its_share_and_bounds_the_total() {
        // Each round from fresh buckets, asserted of one that took less than 10 ms (under
        // one token of the total at 100/s: the last take finds the total spent).
        let (a, b, c) = (1u8, 2u8, 3u8);
        let (answers, keys) = on_time(Duration::from_millis(10), || {
            let mut budget = SharedBudget::new(100.0, 100.0, 40.0, 40.0);
            let answers = [
                // One key takes its share and then waits, however often it asks.
                budget.take_within(Some(a), 40.0, Duration::ZERO),
                budget.take_within(Some(a), 10.0, Duration::from_millis(100)),
                // Others are not held up by it.
                budget.take_within(Some(b), 40.0, Duration::ZERO),
                // The total binds across keys: 20 left of 100.
                budget.take_within(Some(c), 30.0, Duration::from_millis(50)),
                budget.take_within(Some(c), 20.0, Duration::ZERO),
                // A refund gives both back.
                {
                    budget.refund(Some(a), 40.0);
                    budget.take_within(Some(a), 40.0, Duration::ZERO)
                },
                // Without a key only the total counts (it is spent now).
                budget.take_within(None, 1.0, Duration::ZERO),
            ];
            (answers, budget.keys())
        });
        assert_eq!(answers[0], Ok(Duration::ZERO));
        assert!(answers[1].is_err());
        assert_eq!(answers[2], Ok(Duration::ZERO));
        assert!(answers[3].is_err());
        assert_eq!(answers[4], Ok(Duration::ZERO));
        assert_eq!(answers[5], Ok(Duration::ZERO));
        assert!(answers[6].is_err());
        assert_eq!(keys, 3);
    }

    #[test]
    fn a_share_in_debt_does_not_draw_the_total_into_debt() {
        let mut budget = SharedBudget::new(100.0, 100.0, 10.0, 10.0);
        // A key queueing many requests on its share: each waits longer, none touches
        // the total.
        let waits: Vec<Duration> = (0..5)
            .map(|_| budget.take_share_on_credit(Some(1u8), 10.0))
            .collect();
        assert!(waits.windows(2).all(|w| w[1] > w[0]), "{waits:?}");
        assert_eq!(budget.take_total_on_credit(100.0), Duration::ZERO);
        assert_eq!(budget.take_share_on_credit(None, 1e9), Duration::ZERO);
    }

    #[test]
    fn new_shares_bind_a_key_already_tracked() {
        let mut budget = SharedBudget::new(1000.0, 1000.0, 100.0, 100.0);
        assert!(budget.take_within(Some(1u8), 50.0, Duration::ZERO).is_ok());
        budget.set_limits(1000.0, 1000.0, 0.001, 10.0);
        assert_eq!(budget.rates(), (1000.0, 0.001));
        // The key had 50 left; the new burst caps it at 10.
        assert!(budget.take_within(Some(1u8), 11.0, Duration::ZERO).is_err());
        assert!(budget.take_within(Some(1u8), 10.0, Duration::ZERO).is_ok());
        // A key seen for the first time starts with the new share.
        assert!(budget.take_within(Some(2u8), 11.0, Duration::ZERO).is_err());
    }

    #[test]
    fn idle_keys_are_forgotten_when_many_are_tracked() {
        let mut budget = SharedBudget::new(1e9, 1e9, 10.0, 10.0);
        for key in 0..PRUNE_AT as u32 {
            budget.take_on_credit(Some(key), 0.0);
        }
        budget.take_on_credit(Some(u32::MAX), 5.0);
        // Everyone before held a full bucket: all forgotten but the newcomer.
        assert_eq!(budget.keys(), 1);
    }

    #[test]
    fn take_within_takes_only_what_is_paid_off_in_time() {
        // Asserted of a round that took less than 100 ms (under 10 tokens at 100/s).
        let answers = on_time(Duration::from_millis(100), || {
            let mut bucket = TokenBucket::new(100.0, 100.0);
            [
                bucket.take_within(60.0, Duration::ZERO),
                // 40 left: 100 more is 60 short, 0.6 s at 100/s.
                bucket.take_within(100.0, Duration::from_millis(100)),
                // Refusing took nothing: 40 are still there.
                bucket.take_within(40.0, Duration::ZERO),
                bucket.take_within(50.0, Duration::from_secs(1)),
                // In debt now: even one token must wait.
                bucket.take_within(1.0, Duration::ZERO),
            ]
        });
        assert_eq!(answers[0], Ok(Duration::ZERO));
        assert!(
            matches!(answers[1], Err(TooLong { would_wait }) if would_wait > Duration::from_millis(500))
        );
        assert_eq!(answers[2], Ok(Duration::ZERO));
        assert!(
            matches!(answers[3], Ok(w) if w > Duration::from_millis(400) && w <= Duration::from_millis(500))
        );
        assert!(answers[4].is_err());
    }
}
