//! Wire formats, one file each. Owns the byte layout of what subscribers receive; must
//! never be invoked per subscriber: each event is encoded once, at ingest.

pub mod jetstream_v1;
pub mod jetstream_v2;
mod json;
pub mod raw;
pub mod zstd;
