//! Wire formats, one file each. Owns the byte layout of what subscribers receive; must
//! never be invoked per subscriber: each event is encoded once, at ingest, and compressed
//! at most once per compression scheme (`zstd`), whoever needs it first.

pub mod jetstream_v1;
pub mod jetstream_v2;
pub mod json;
pub mod raw;
pub mod zstd;
