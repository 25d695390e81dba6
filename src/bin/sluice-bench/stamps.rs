//! Send stamps: the instant each frame was handed to the socket, by match key.

use std::collections::HashMap;

use parking_lot::RwLock;

pub(crate) const STAMP_SHARDS: usize = 64;

/// (current, previous) generation of one shard.
pub(crate) type Generations = (HashMap<u64, u64>, HashMap<u64, u64>);

/// Send instant per key, sharded; each shard keeps a current and a previous generation so
/// memory stays bounded on long runs (a lookup older than two generations misses).
pub(crate) struct Stamps {
    pub(crate) shards: Vec<RwLock<Generations>>,
    pub(crate) per_shard_cap: usize,
}

impl Stamps {
    pub(crate) fn new(keep: usize) -> Self {
        Stamps {
            shards: (0..STAMP_SHARDS)
                .map(|_| RwLock::new((HashMap::new(), HashMap::new())))
                .collect(),
            per_shard_cap: (keep / STAMP_SHARDS).max(1024),
        }
    }
    pub(crate) fn insert(&self, key: u64, ns: u64) {
        let mut s = self.shards[(key as usize) % STAMP_SHARDS].write();
        if s.0.len() >= self.per_shard_cap {
            s.1 = std::mem::take(&mut s.0);
        }
        s.0.insert(key, ns);
    }
    pub(crate) fn get(&self, key: u64) -> Option<u64> {
        let s = self.shards[(key as usize) % STAMP_SHARDS].read();
        s.0.get(&key).or_else(|| s.1.get(&key)).copied()
    }
}
