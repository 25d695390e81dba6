//! The bench's one monotonic clock and its log-linear latency histogram.

use std::sync::OnceLock;
use std::time::Instant;

pub(crate) fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Nanoseconds since the bench's epoch (monotonic).
pub(crate) fn now_ns() -> u64 {
    u64::try_from(epoch().elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Log-linear histogram of microseconds: exact below 128 µs, then 64 sub-buckets per power
/// of two (relative resolution 1/64, about 1.6%). Quantiles report a bucket's upper bound.
#[derive(Clone)]
pub(crate) struct Hist {
    pub(crate) counts: Vec<u32>,
    pub(crate) n: u64,
    pub(crate) max: u64,
}

pub(crate) const HIST_MAX_MSB: u32 = 40;
pub(crate) const HIST_LEN: usize = 128 + (HIST_MAX_MSB as usize - 7 + 1) * 64;

impl Hist {
    pub(crate) fn new() -> Self {
        Hist {
            counts: Vec::new(),
            n: 0,
            max: 0,
        }
    }

    pub(crate) fn index(v: u64) -> usize {
        if v < 128 {
            return v as usize;
        }
        let msb = (63 - v.leading_zeros()).min(HIST_MAX_MSB);
        let sub = (v >> (msb - 6)) & 63;
        128 + (msb as usize - 7) * 64 + sub as usize
    }

    pub(crate) fn upper(index: usize) -> u64 {
        if index < 128 {
            return index as u64;
        }
        let k = index - 128;
        let msb = (k / 64) as u32 + 7;
        let sub = (k % 64) as u64;
        ((64 + sub + 1) << (msb - 6)) - 1
    }

    pub(crate) fn record(&mut self, us: u64) {
        if self.counts.is_empty() {
            self.counts = vec![0; HIST_LEN];
        }
        let i = Self::index(us).min(HIST_LEN - 1);
        self.counts[i] = self.counts[i].saturating_add(1);
        self.n += 1;
        self.max = self.max.max(us);
    }

    pub(crate) fn merge(&mut self, other: &Hist) {
        if other.n == 0 {
            return;
        }
        if self.counts.is_empty() {
            self.counts = vec![0; HIST_LEN];
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a = a.saturating_add(*b);
        }
        self.n += other.n;
        self.max = self.max.max(other.max);
    }

    /// Upper bound of the bucket holding quantile `q`, capped at the exact max.
    pub(crate) fn quantile(&self, q: f64) -> Option<u64> {
        if self.n == 0 {
            return None;
        }
        let rank = ((q * self.n as f64).ceil() as u64).clamp(1, self.n);
        let mut seen = 0u64;
        for (i, c) in self.counts.iter().enumerate() {
            seen += u64::from(*c);
            if seen >= rank {
                return Some(Self::upper(i).min(self.max));
            }
        }
        Some(self.max)
    }
}

impl Default for Hist {
    fn default() -> Self {
        Hist::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hist_buckets_are_monotonic_and_bounded() {
        let mut prev = 0;
        for v in (0..1_000_000u64).step_by(7) {
            let i = Hist::index(v);
            assert!(i >= prev);
            prev = i;
            assert!(Hist::upper(i) >= v, "v={v}");
            assert!(Hist::upper(i) as f64 <= v as f64 * 1.04 + 1.0, "v={v}");
        }
        let mut h = Hist::new();
        for v in 1..=1000 {
            h.record(v);
        }
        assert_eq!(h.quantile(1.0), Some(1000));
        let p50 = h.quantile(0.5).unwrap_or(0);
        assert!((500..=510).contains(&p50), "{p50}");
    }
}
