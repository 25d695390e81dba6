//! Phase control shared by publisher and subscribers, and the tallies of what was sent.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};

use crate::frame_meta::{
    FrameMeta, FrameType, CLS_FOLLOW, CLS_LIKE, CLS_NONCOMMIT, CLS_OTHER, CLS_POST,
};
use crate::target::{Target, Wire};

pub(crate) const PH_WARMUP: u8 = 0;
pub(crate) const PH_MEASURE: u8 = 1;
pub(crate) const PH_STALL: u8 = 2;
pub(crate) const PH_AFTER: u8 = 3;
pub(crate) const PH_COUNT: usize = 4;

pub(crate) struct Control {
    pub(crate) phase: AtomicU8,
    pub(crate) stall_active: AtomicBool,
    pub(crate) stop_publish: AtomicBool,
}

/// What the publisher sent in each phase, to compute what each subscriber should get.
#[derive(Default)]
pub(crate) struct Tally {
    pub(crate) frames: AtomicU64,
    pub(crate) by_mask: [AtomicU64; 32],
    pub(crate) ops: [AtomicU64; 4],
    pub(crate) identity: AtomicU64,
    pub(crate) account: AtomicU64,
    pub(crate) sync: AtomicU64,
}

impl Tally {
    pub(crate) fn add(&self, m: &FrameMeta) {
        self.frames.fetch_add(1, Ordering::Relaxed);
        self.by_mask[(m.mask & 31) as usize].fetch_add(1, Ordering::Relaxed);
        for (a, n) in self.ops.iter().zip(m.ops) {
            a.fetch_add(u64::from(n), Ordering::Relaxed);
        }
        match m.ftype {
            FrameType::Identity => self.identity.fetch_add(1, Ordering::Relaxed),
            FrameType::Account => self.account.fetch_add(1, Ordering::Relaxed),
            FrameType::Sync => self.sync.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
    }

    /// Messages a subscriber with `filter` (a CLS_* mask, or None for everything) should
    /// receive on `target`.
    pub(crate) fn expected(&self, target: Target, filter: Option<u8>) -> u64 {
        let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
        match target.wire() {
            Wire::Raw => match filter {
                None => ld(&self.frames),
                Some(f) => (0..32)
                    .filter(|m| (*m as u8) & (f | CLS_NONCOMMIT) != 0)
                    .map(|m| ld(&self.by_mask[m]))
                    .sum(),
            },
            Wire::V1 | Wire::V2 | Wire::V1z | Wire::V2z => {
                let bits = [CLS_POST, CLS_LIKE, CLS_FOLLOW, CLS_OTHER];
                let ops: u64 = (0..4)
                    .filter(|i| filter.is_none_or(|f| f & bits[*i] != 0))
                    .map(|i| ld(&self.ops[i]))
                    .sum();
                let sync = if matches!(target.wire(), Wire::V2 | Wire::V2z) {
                    ld(&self.sync)
                } else {
                    0
                };
                ops + ld(&self.identity) + ld(&self.account) + sync
            }
        }
    }
}
