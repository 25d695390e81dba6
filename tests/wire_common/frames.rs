//! Upstream frames: the real corpus, synthetic frames, and reading a frame's CBOR back.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use sluice::upstream::replay::Speed;

use super::env::Env;

/// A daemon fed the real corpus at full speed, with every frame ingested.
pub async fn corpus_env() -> Env {
    let env = Env::start(corpus(), Speed::Max, false, |_| {}).await;
    env.wait_all_ingested().await;
    env
}

/// The 150 real relay frames of the shared corpus (July 2026).
pub fn corpus() -> Vec<Bytes> {
    // Resolved here rather than with `sluice::upstream::capture::upstream_fixtures_dir`,
    // whose `CARGO_MANIFEST_DIR` is baked into the library build: with a target directory
    // shared between worktrees it may point at another checkout.
    let dir = match std::env::var_os("SLUICE_UPSTREAM_FIXTURES") {
        Some(dir) => std::path::PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures-upstream"),
    };
    let path = dir.join("jetstream-corpus/frames.bin");
    let frames = sluice::upstream::capture::read_all(&path, 64 << 20)
        .unwrap_or_else(|e| panic!("the shared corpus is required ({}): {e}", path.display()));
    assert_eq!(frames.len(), 150, "corpus frame count");
    frames.into_iter().map(Bytes::from).collect()
}

/// `count` synthetic frames starting `age` before now (so age retention keeps them).
/// Generation is slow in a debug build, so frames are shared by every test of the process
/// asking for the same `(count, seed, age)`.
pub fn synth(count: usize, seed: u64, age: Duration) -> Vec<Bytes> {
    type Cache = std::sync::Mutex<std::collections::HashMap<(usize, u64, Duration), Vec<Bytes>>>;
    static CACHE: std::sync::OnceLock<Cache> = std::sync::OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let mut cache = cache.lock().unwrap();
    cache
        .entry((count, seed, age))
        .or_insert_with(|| {
            let now_ms = sluice::clock::now_us() / 1000;
            synth_at(count, seed, 1_000_000, now_ms - age.as_millis() as i64)
        })
        .clone()
}

/// `count` synthetic frames from `start_seq`, the first at unix ms `start_time_ms`.
pub fn synth_at(count: usize, seed: u64, start_seq: u64, start_time_ms: i64) -> Vec<Bytes> {
    let opts = sluice::upstream::synth::SynthOptions {
        seed,
        count,
        start_seq,
        start_time_ms,
        dids: 300,
    };
    sluice::upstream::synth::generate(&opts)
        .into_iter()
        .map(Bytes::from)
        .collect()
}

/// Header and body of a `subscribeRepos` frame.
pub fn decode_frame(frame: &[u8]) -> (ciborium::Value, ciborium::Value) {
    let mut rest = frame;
    let header: ciborium::Value = ciborium::from_reader(&mut rest).expect("frame header");
    let body: ciborium::Value = ciborium::from_reader(&mut rest).expect("frame body");
    assert!(rest.is_empty(), "trailing bytes after the frame body");
    (header, body)
}

pub fn cbor_get<'a>(map: &'a ciborium::Value, key: &str) -> Option<&'a ciborium::Value> {
    map.as_map()?
        .iter()
        .find(|(k, _)| k.as_text() == Some(key))
        .map(|(_, v)| v)
}

pub fn cbor_text(map: &ciborium::Value, key: &str) -> Option<String> {
    cbor_get(map, key)?.as_text().map(str::to_string)
}

pub fn cbor_int(map: &ciborium::Value, key: &str) -> Option<i128> {
    cbor_get(map, key)?.as_integer().map(i128::from)
}

/// The upstream `seq` of a frame.
pub fn frame_seq(frame: &[u8]) -> i64 {
    let (_, body) = decode_frame(frame);
    cbor_int(&body, "seq").expect("frame seq") as i64
}

/// The message type (`#commit`, ...) of a frame.
pub fn frame_type(frame: &[u8]) -> String {
    let (header, _) = decode_frame(frame);
    cbor_text(&header, "t").unwrap_or_default()
}

/// The collections touched by a `#commit` frame's ops (empty for other types).
pub fn frame_collections(frame: &[u8]) -> Vec<String> {
    let (header, body) = decode_frame(frame);
    if cbor_text(&header, "t").as_deref() != Some("#commit") {
        return Vec::new();
    }
    let Some(ops) = cbor_get(&body, "ops").and_then(|o| o.as_array()) else {
        return Vec::new();
    };
    ops.iter()
        .filter_map(|op| cbor_text(op, "path"))
        .map(|p| p.split('/').next().unwrap_or_default().to_string())
        .collect()
}
