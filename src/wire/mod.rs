//! Wire formats, one file each. Owns the byte layout of what subscribers receive; must
//! never be invoked per subscriber: each event is encoded once, at ingest.
