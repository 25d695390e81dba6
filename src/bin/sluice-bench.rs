//! `sluice-bench`: fan-out benchmark of a real `sluice serve` against two raw-wire
//! baselines (a websocat broadcast relay and a home-made Redis pub/sub rebroadcaster).
//!
//! Everything runs on 127.0.0.1. The bench process is the upstream relay (an in-process
//! `subscribeRepos` server fed by the `sluice::upstream::synth` generator, paced to an exact
//! frame rate) and all the subscribers; the system under test runs as child processes, so
//! its CPU and memory are read from `/proc/<pid>` alone.
//!
//! Latency is measured without touching the frames: the publisher records the instant it
//! hands each frame to the socket, keyed by the frame's upstream `seq` and by its commit
//! `(repo DID, rev)`. A raw-wire subscriber reads the `seq` back out of the CBOR frame it
//! receives; a Jetstream v1/v2 subscriber reads `did` and `rev` out of the JSON event (all
//! events of one commit share its send instant; identity/account events carry no rev
//! and are counted but not timed). Latency = receive instant − send instant, both from the
//! bench's one monotonic clock. Frames are generated fresh (never looped), so every key is
//! unique within a run.
//!
//! Every load loop is bounded: the publisher by the phase's duration, connection attempts by
//! count and timeout, and the whole run by a watchdog that kills the children and exits.

use std::collections::HashMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, TryRecvError};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use ciborium_ll::{Decoder, Header};
use clap::{Parser, Subcommand, ValueEnum};
use futures_util::{Sink, SinkExt, StreamExt};
use parking_lot::{Mutex, RwLock};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

use sluice::upstream::synth::{Synth, SynthOptions};

#[path = "bench_sink/mod.rs"]
mod bench_sink;

// ---------------------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------------------

#[derive(Parser)]
#[command(
    name = "sluice-bench",
    about = "Fan-out benchmark: sluice serve vs websocat and a Redis pub/sub rebroadcaster",
    long_about = "Fan-out benchmark of a real `sluice serve` (child process) fed by an in-process \
paced upstream of synthetic relay frames, with N websocket subscribers; measures relay CPU per \
delivered event, latency from upstream send to subscriber read, RSS at idle and while a fraction \
of subscribers stall, and the same for raw-wire baselines (websocat broadcast, Redis pub/sub \
rebroadcaster) on the same frames, rate and subscriber count. Only 127.0.0.1 is used."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the fan-out benchmark (sluice on the chosen wires, then the baselines).
    Fanout(FanoutArgs),
    /// Internal: the Redis pub/sub rebroadcaster baseline, run as its own process so its
    /// CPU can be measured. Subscribes to a Redis channel and forwards every message to
    /// every websocket client (tokio broadcast channel of shared bytes; a lagging client
    /// skips messages, as pub/sub does).
    RedisRelay(RedisRelayArgs),
    /// Cluster: the leader's fenced append into a real redis-server, per batch size and
    /// zstd level (events/s, bytes per event in Redis).
    ClusterAppend(cluster::AppendArgs),
    /// Cluster: N nodes on one redis-server; leader SIGKILLs and graceful handovers, the
    /// silence each causes at a surviving node's subscriber.
    ClusterFailover(cluster::FailoverArgs),
    /// Cluster: CPU of Redis and of each node per event with 1, 2, 3 nodes on one
    /// redis-server and a number of subscribers per node.
    ClusterScale(cluster::ScaleArgs),
    /// Throughput of the Redis sink into a local redis-server: a log of synthetic events
    /// written out from position 0, timed, with CPU per event of the sink and of Redis.
    RedisSink(bench_sink::RedisSinkArgs),
    /// Redis memory under the sink at a live rate (2,000 events/s by default) for minutes,
    /// sampled every 10 s: with trimming it levels off and stays flat.
    RedisSinkMemory(bench_sink::RedisSinkMemoryArgs),
    /// Hostile clients: a bystander subscriber's latency, losses and repeats during each
    /// attack (slowloris, fragment hoarding, /event flood, zero-match scans, connect
    /// churn, 10,000-DID filter updates), alternating with unloaded phases.
    Hostile(hostile::HostileArgs),
    /// Internal: one attack of `hostile`, run as its own (niced) process.
    HostileAttack(hostile::AttackArgs),
}

#[path = "bench_cluster/mod.rs"]
mod cluster;

#[path = "bench_hostile/mod.rs"]
mod hostile;

#[derive(Parser, Clone)]
struct FanoutArgs {
    /// The sluice binary to benchmark.
    #[arg(long, default_value = "target/release/sluice")]
    sluice: PathBuf,
    /// Websocket subscribers per phase.
    #[arg(long, default_value_t = 100)]
    subscribers: usize,
    /// Upstream frames per second (each synthetic commit frame is one repo op, so this is
    /// also about the v1/v2 event rate).
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Measurement window per phase, seconds (after the warmup).
    #[arg(long, default_value_t = 20)]
    duration: u64,
    /// Seconds of traffic before the measurement window starts.
    #[arg(long, default_value_t = 5)]
    warmup: u64,
    /// sluice wires to measure, comma separated: raw, v1, v2. Each is its own phase.
    #[arg(long, value_delimiter = ',', default_value = "raw")]
    wire: Vec<Wire>,
    /// Subscriber filters on sluice: `realistic` (about 90% take 1-3 of posts/likes/follows,
    /// 10% take everything) or `all` (everyone takes everything). The baselines cannot
    /// filter: their subscribers always get every frame.
    #[arg(long, value_enum, default_value = "realistic")]
    mix: Mix,
    /// Baselines to run after the sluice phases, comma separated: websocat, redis, none.
    #[arg(long, value_delimiter = ',', default_value = "websocat,redis")]
    baselines: Vec<BaselineArg>,
    /// Fraction of subscribers that stop reading during the stall phase (sluice only).
    #[arg(long, default_value_t = 0.1)]
    stall_fraction: f64,
    /// Length of the stall phase, seconds (0 skips it). Issue 4 asks for 300.
    #[arg(long, default_value_t = 20)]
    stall_secs: u64,
    /// Repeat every phase this many times; the summary shows medians.
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Seed of the synthetic frames and of the filter mix (the same in every phase, so all
    /// targets see the same frames).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// DID pool of the synthetic frames.
    #[arg(long, default_value_t = 2000)]
    dids: usize,
    /// websocat binary.
    #[arg(long, default_value = "websocat")]
    websocat: String,
    /// redis-server binary.
    #[arg(long, default_value = "redis-server")]
    redis_server: String,
    /// Extra argument for `sluice serve` (repeat for several), e.g.
    /// `--serve-arg=--tail-max-mib=64`.
    #[arg(long = "serve-arg", allow_hyphen_values = true)]
    serve_args: Vec<String>,
    /// Concurrent connection attempts while subscribers connect.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    /// Write every phase's result as one JSON line to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Where temporary data dirs and child logs go.
    #[arg(long, default_value = "/tmp")]
    tmp: PathBuf,
}

#[derive(Parser, Clone)]
struct RedisRelayArgs {
    /// Redis server, host:port.
    #[arg(long)]
    redis: SocketAddr,
    /// Channel to subscribe to.
    #[arg(long, default_value = "sluice-bench")]
    channel: String,
    /// Websocket listen address.
    #[arg(long)]
    listen: SocketAddr,
    /// Messages a client may lag behind before it skips ahead.
    #[arg(long, default_value_t = 16384)]
    capacity: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Wire {
    Raw,
    V1,
    V2,
    /// v1 with `compress=true` (Jetstream's v1 zstd dictionary).
    V1z,
    /// v2 with `zstdDictionary=<id>` (Jetstream's v2 zstd dictionary).
    V2z,
}

impl Wire {
    fn name(self) -> &'static str {
        match self {
            Wire::Raw => "raw",
            Wire::V1 => "v1",
            Wire::V2 => "v2",
            Wire::V1z => "v1z",
            Wire::V2z => "v2z",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mix {
    Realistic,
    All,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum BaselineArg {
    Websocat,
    Redis,
    None,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    Sluice(Wire),
    Websocat,
    Redis,
}

impl Target {
    fn name(self) -> String {
        match self {
            Target::Sluice(w) => format!("sluice/{}", w.name()),
            Target::Websocat => "websocat/raw".into(),
            Target::Redis => "redis/raw".into(),
        }
    }
    fn wire(self) -> Wire {
        match self {
            Target::Sluice(w) => w,
            _ => Wire::Raw,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Clock, histogram
// ---------------------------------------------------------------------------------------

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Nanoseconds since the bench's epoch (monotonic).
fn now_ns() -> u64 {
    u64::try_from(epoch().elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Log-linear histogram of microseconds: exact below 128 µs, then 64 sub-buckets per power
/// of two (relative resolution 1/64, about 1.6%). Quantiles report a bucket's upper bound.
#[derive(Clone)]
struct Hist {
    counts: Vec<u32>,
    n: u64,
    max: u64,
}

const HIST_MAX_MSB: u32 = 40;
const HIST_LEN: usize = 128 + (HIST_MAX_MSB as usize - 7 + 1) * 64;

impl Hist {
    fn new() -> Self {
        Hist {
            counts: Vec::new(),
            n: 0,
            max: 0,
        }
    }

    fn index(v: u64) -> usize {
        if v < 128 {
            return v as usize;
        }
        let msb = (63 - v.leading_zeros()).min(HIST_MAX_MSB);
        let sub = (v >> (msb - 6)) & 63;
        128 + (msb as usize - 7) * 64 + sub as usize
    }

    fn upper(index: usize) -> u64 {
        if index < 128 {
            return index as u64;
        }
        let k = index - 128;
        let msb = (k / 64) as u32 + 7;
        let sub = (k % 64) as u64;
        ((64 + sub + 1) << (msb - 6)) - 1
    }

    fn record(&mut self, us: u64) {
        if self.counts.is_empty() {
            self.counts = vec![0; HIST_LEN];
        }
        let i = Self::index(us).min(HIST_LEN - 1);
        self.counts[i] = self.counts[i].saturating_add(1);
        self.n += 1;
        self.max = self.max.max(us);
    }

    fn merge(&mut self, other: &Hist) {
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
    fn quantile(&self, q: f64) -> Option<u64> {
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

// ---------------------------------------------------------------------------------------
// Frame metadata (a few bytes of CBOR reading, independent of sluice's decoder)
// ---------------------------------------------------------------------------------------

const CLS_POST: u8 = 1;
const CLS_LIKE: u8 = 2;
const CLS_FOLLOW: u8 = 4;
const CLS_OTHER: u8 = 8;
const CLS_NONCOMMIT: u8 = 16;

#[derive(Clone, Copy, PartialEq, Eq)]
enum FrameType {
    Commit,
    Identity,
    Account,
    Sync,
    Other,
}

struct FrameMeta {
    seq: Option<i64>,
    /// hash of (repo DID, rev) for commits and syncs.
    commit_key: Option<u64>,
    ftype: FrameType,
    /// Union of the classes of the frame's ops (plus CLS_NONCOMMIT for non-commits).
    mask: u8,
    /// Ops per class: post, like, follow, other.
    ops: [u16; 4],
}

const MAX_DEPTH: usize = 64;

fn head_at(buf: &[u8], pos: usize) -> Option<(Header, usize)> {
    let rest = buf.get(pos..)?;
    let mut dec = Decoder::from(rest);
    let header = dec.pull().ok()?;
    Some((header, pos + dec.offset()))
}

fn skip_value(buf: &[u8], pos: usize, depth: usize) -> Option<usize> {
    if depth > MAX_DEPTH {
        return None;
    }
    let (header, mut at) = head_at(buf, pos)?;
    match header {
        Header::Bytes(len) | Header::Text(len) => {
            let end = at.checked_add(len?)?;
            (end <= buf.len()).then_some(end)
        }
        Header::Array(len) => {
            for _ in 0..len? {
                at = skip_value(buf, at, depth + 1)?;
            }
            Some(at)
        }
        Header::Map(len) => {
            for _ in 0..len? {
                at = skip_value(buf, at, depth + 1)?;
                at = skip_value(buf, at, depth + 1)?;
            }
            Some(at)
        }
        Header::Tag(_) => skip_value(buf, at, depth + 1),
        Header::Break => None,
        _ => Some(at),
    }
}

fn text_at(buf: &[u8], pos: usize) -> Option<(&str, usize)> {
    match head_at(buf, pos)? {
        (Header::Text(Some(len)), at) => {
            let end = at.checked_add(len)?;
            let s = std::str::from_utf8(buf.get(at..end)?).ok()?;
            Some((s, end))
        }
        _ => None,
    }
}

fn int_at(buf: &[u8], pos: usize) -> Option<i64> {
    match head_at(buf, pos)?.0 {
        Header::Positive(n) => i64::try_from(n).ok(),
        Header::Negative(n) => i64::try_from(n).ok().map(|n| -1 - n),
        _ => None,
    }
}

/// Calls `f(key, value_pos)` for each text key of the map at `pos`; returns the map's end.
/// `f` returns false to stop early (then `None` is returned).
fn walk_map(buf: &[u8], pos: usize, mut f: impl FnMut(&str, usize) -> bool) -> Option<usize> {
    let (header, mut at) = head_at(buf, pos)?;
    let Header::Map(Some(len)) = header else {
        return None;
    };
    for _ in 0..len {
        let (key, key_end) = match text_at(buf, at) {
            Some((k, end)) => (Some(k), end),
            None => (None, skip_value(buf, at, 1)?),
        };
        if let Some(k) = key {
            if !f(k, key_end) {
                return None;
            }
        }
        at = skip_value(buf, key_end, 1)?;
    }
    Some(at)
}

/// The top-level `seq` of a frame's body: what a raw-wire subscriber reads to match.
fn frame_seq(frame: &[u8]) -> Option<i64> {
    let body = skip_value(frame, 0, 0)?;
    let mut seq = None;
    walk_map(frame, body, |k, v| {
        if k == "seq" {
            seq = int_at(frame, v);
            return false;
        }
        true
    });
    seq
}

fn class_of(collection: &str) -> (u8, usize) {
    match collection {
        "app.bsky.feed.post" => (CLS_POST, 0),
        "app.bsky.feed.like" => (CLS_LIKE, 1),
        "app.bsky.graph.follow" => (CLS_FOLLOW, 2),
        _ => (CLS_OTHER, 3),
    }
}

fn frame_meta(frame: &[u8]) -> FrameMeta {
    let mut meta = FrameMeta {
        seq: None,
        commit_key: None,
        ftype: FrameType::Other,
        mask: 0,
        ops: [0; 4],
    };
    let mut t = None;
    let Some(body) = walk_map(frame, 0, |k, v| {
        if k == "t" {
            t = text_at(frame, v).map(|(s, _)| s.to_owned());
        }
        true
    }) else {
        return meta;
    };
    meta.ftype = match t.as_deref() {
        Some("#commit") => FrameType::Commit,
        Some("#identity") => FrameType::Identity,
        Some("#account") => FrameType::Account,
        Some("#sync") => FrameType::Sync,
        _ => FrameType::Other,
    };
    let (mut repo, mut rev) = (None, None);
    let mut ops_pos = None;
    walk_map(frame, body, |k, v| {
        match k {
            "seq" => meta.seq = int_at(frame, v),
            // `#commit` names the repo `repo`, `#sync` names it `did`.
            "repo" | "did" => repo = text_at(frame, v).map(|(s, _)| s),
            "rev" => rev = text_at(frame, v).map(|(s, _)| s),
            "ops" => ops_pos = Some(v),
            _ => {}
        }
        true
    });
    // v2 shows `#sync` events with their rev too, so they are timed like commits.
    if let (Some(repo), Some(rev)) = (repo, rev) {
        meta.commit_key = Some(commit_key(repo, rev));
    }
    if meta.ftype != FrameType::Commit {
        meta.mask = CLS_NONCOMMIT;
        return meta;
    }
    if let Some(Some((Header::Array(Some(n)), mut at))) = ops_pos.map(|p| head_at(frame, p)) {
        for _ in 0..n {
            let mut path = None;
            let Some(end) = walk_map(frame, at, |k, v| {
                if k == "path" {
                    path = text_at(frame, v).map(|(s, _)| s);
                }
                true
            }) else {
                break;
            };
            if let Some(p) = path {
                let coll = p.split('/').next().unwrap_or(p);
                let (bit, i) = class_of(coll);
                meta.mask |= bit;
                meta.ops[i] = meta.ops[i].saturating_add(1);
            }
            at = end;
        }
    }
    meta
}

/// FNV-1a over `did`, a separator and `rev`.
fn commit_key(did: &str, rev: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in did.bytes().chain(std::iter::once(0xff)).chain(rev.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn seq_key(seq: i64) -> u64 {
    // splitmix64 finaliser, with a tag so it never collides with a commit key by design.
    let mut z = (seq as u64) ^ 0x5851_f42d_4c95_7f2d;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `"key":"value"` out of a flat-ish JSON text, first occurrence.
fn json_str<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let mut pat = String::with_capacity(key.len() + 4);
    pat.push('"');
    pat.push_str(key);
    pat.push_str("\":\"");
    let start = text.find(&pat)? + pat.len();
    let len = text[start..].find('"')?;
    Some(&text[start..start + len])
}

// ---------------------------------------------------------------------------------------
// Send stamps
// ---------------------------------------------------------------------------------------

const STAMP_SHARDS: usize = 64;

/// (current, previous) generation of one shard.
type Generations = (HashMap<u64, u64>, HashMap<u64, u64>);

/// Send instant per key, sharded; each shard keeps a current and a previous generation so
/// memory stays bounded on long runs (a lookup older than two generations misses).
struct Stamps {
    shards: Vec<RwLock<Generations>>,
    per_shard_cap: usize,
}

impl Stamps {
    fn new(keep: usize) -> Self {
        Stamps {
            shards: (0..STAMP_SHARDS)
                .map(|_| RwLock::new((HashMap::new(), HashMap::new())))
                .collect(),
            per_shard_cap: (keep / STAMP_SHARDS).max(1024),
        }
    }
    fn insert(&self, key: u64, ns: u64) {
        let mut s = self.shards[(key as usize) % STAMP_SHARDS].write();
        if s.0.len() >= self.per_shard_cap {
            s.1 = std::mem::take(&mut s.0);
        }
        s.0.insert(key, ns);
    }
    fn get(&self, key: u64) -> Option<u64> {
        let s = self.shards[(key as usize) % STAMP_SHARDS].read();
        s.0.get(&key).or_else(|| s.1.get(&key)).copied()
    }
}

// ---------------------------------------------------------------------------------------
// Control and tallies
// ---------------------------------------------------------------------------------------

const PH_WARMUP: u8 = 0;
const PH_MEASURE: u8 = 1;
const PH_STALL: u8 = 2;
const PH_AFTER: u8 = 3;
const PH_COUNT: usize = 4;

struct Control {
    phase: AtomicU8,
    stall_active: AtomicBool,
    stop_publish: AtomicBool,
}

/// What the publisher sent in each phase, to compute what each subscriber should get.
#[derive(Default)]
struct Tally {
    frames: AtomicU64,
    by_mask: [AtomicU64; 32],
    ops: [AtomicU64; 4],
    identity: AtomicU64,
    account: AtomicU64,
    sync: AtomicU64,
}

impl Tally {
    fn add(&self, m: &FrameMeta) {
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
    fn expected(&self, target: Target, filter: Option<u8>) -> u64 {
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

// ---------------------------------------------------------------------------------------
// Generator and publisher
// ---------------------------------------------------------------------------------------

struct GenFrame {
    bytes: Bytes,
    meta: FrameMeta,
}

/// Starts the synthetic frame generator on its own thread; it stays ahead of the publisher
/// by at most `ahead` frames and ends when the receiver is dropped.
fn start_generator(seed: u64, dids: usize, ahead: usize) -> (Receiver<GenFrame>, Arc<AtomicU64>) {
    let (tx, rx) = sync_channel::<GenFrame>(ahead);
    let made = Arc::new(AtomicU64::new(0));
    let made2 = Arc::clone(&made);
    std::thread::spawn(move || {
        // Frames are dated from now, like a live firehose: with the synthesizer's fixed
        // 2025 date, sluice's retention (by source time) deleted each segment as it was
        // committed, and a subscriber that fell into catch-up was ended as too old.
        let synth = Synth::new(&SynthOptions {
            seed,
            count: usize::MAX,
            dids,
            start_time_ms: sluice::clock::now_us() / 1000,
            ..SynthOptions::default()
        });
        for frame in synth {
            let meta = frame_meta(&frame);
            if tx
                .send(GenFrame {
                    bytes: Bytes::from(frame),
                    meta,
                })
                .is_err()
            {
                return;
            }
            made2.fetch_add(1, Ordering::Relaxed);
        }
    });
    (rx, made)
}

type BoxSink = Pin<Box<dyn Sink<Message, Error = anyhow::Error> + Send>>;

enum PubSink {
    Ws(BoxSink),
    Redis {
        w: BufWriter<tokio::net::tcp::OwnedWriteHalf>,
        channel: String,
    },
}

impl PubSink {
    async fn feed(&mut self, frame: &Bytes) -> anyhow::Result<()> {
        match self {
            PubSink::Ws(s) => s.feed(Message::Binary(frame.clone())).await,
            PubSink::Redis { w, channel } => {
                let head = format!(
                    "*3\r\n$7\r\nPUBLISH\r\n${}\r\n{}\r\n${}\r\n",
                    channel.len(),
                    channel,
                    frame.len()
                );
                w.write_all(head.as_bytes()).await?;
                w.write_all(frame).await?;
                w.write_all(b"\r\n").await?;
                Ok(())
            }
        }
    }
    async fn flush(&mut self) -> anyhow::Result<()> {
        match self {
            PubSink::Ws(s) => s.flush().await,
            PubSink::Redis { w, .. } => Ok(w.flush().await?),
        }
    }
}

#[derive(Default)]
struct PubStats {
    sent: u64,
    underruns: u64,
    send_errors: u64,
    reconnects: u64,
    /// Lateness of each send against its schedule, µs.
    lag: Hist,
}

impl Default for Hist {
    fn default() -> Self {
        Hist::new()
    }
}

struct PubCtx {
    rate: f64,
    ctl: Arc<Control>,
    stamps: Arc<Stamps>,
    tallies: Arc<[Tally; PH_COUNT]>,
}

/// Paces frames out at `rate` until `stop_publish`. New sinks (an upstream reconnect)
/// replace the current one.
async fn publish(
    ctx: PubCtx,
    rx: Receiver<GenFrame>,
    mut sinks: tokio::sync::mpsc::Receiver<PubSink>,
) -> PubStats {
    let mut stats = PubStats::default();
    let mut sink = match tokio::time::timeout(Duration::from_secs(30), sinks.recv()).await {
        Ok(Some(s)) => Some(s),
        _ => return stats,
    };
    let t0 = Instant::now();
    let mut sent: u64 = 0;
    while !ctx.ctl.stop_publish.load(Ordering::Relaxed) {
        if let Ok(new) = sinks.try_recv() {
            sink = Some(new);
            stats.reconnects += 1;
        }
        let due = (t0.elapsed().as_secs_f64() * ctx.rate) as u64;
        let mut starved = false;
        let mut fed = false;
        while sent < due {
            let frame = match rx.try_recv() {
                Ok(f) => f,
                Err(TryRecvError::Empty) => {
                    stats.underruns += 1;
                    starved = true;
                    break;
                }
                Err(TryRecvError::Disconnected) => return stats,
            };
            let scheduled = t0 + Duration::from_secs_f64(sent as f64 / ctx.rate);
            sent += 1;
            let ns = now_ns();
            stats
                .lag
                .record(u64::try_from(scheduled.elapsed().as_micros()).unwrap_or(u64::MAX));
            if let Some(seq) = frame.meta.seq {
                ctx.stamps.insert(seq_key(seq), ns);
            }
            if let Some(k) = frame.meta.commit_key {
                ctx.stamps.insert(k, ns);
            }
            let phase = ctx.ctl.phase.load(Ordering::Relaxed) as usize;
            ctx.tallies[phase.min(PH_COUNT - 1)].add(&frame.meta);
            if let Some(s) = sink.as_mut() {
                if s.feed(&frame.bytes).await.is_err() {
                    stats.send_errors += 1;
                    sink = None;
                } else {
                    fed = true;
                }
            }
            stats.sent += 1;
            // Never hold the socket unflushed for long when far behind.
            if fed && sent % 64 == 0 {
                if let Some(s) = sink.as_mut() {
                    if s.flush().await.is_err() {
                        stats.send_errors += 1;
                        sink = None;
                    }
                }
            }
        }
        if fed {
            if let Some(s) = sink.as_mut() {
                if s.flush().await.is_err() {
                    stats.send_errors += 1;
                    sink = None;
                }
            }
        }
        let next = t0 + Duration::from_secs_f64((sent + 1) as f64 / ctx.rate);
        if starved {
            tokio::time::sleep(Duration::from_millis(1)).await;
        } else {
            tokio::time::sleep_until(next.into()).await;
        }
    }
    stats
}

/// Accepts upstream connections from sluice on `listener` (any path) and hands each one's
/// sink to the publisher; reads are drained so pings are answered.
async fn upstream_server(listener: TcpListener, sinks: tokio::sync::mpsc::Sender<PubSink>) {
    for _ in 0..1000 {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let Ok(Ok(ws)) = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_tungstenite::accept_async(stream),
        )
        .await
        else {
            continue;
        };
        let (sink, mut source) = ws.split();
        tokio::spawn(async move { while let Some(Ok(_)) = source.next().await {} });
        let sink: BoxSink = Box::pin(sink.sink_map_err(anyhow::Error::from));
        if sinks.send(PubSink::Ws(sink)).await.is_err() {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------
// Subscribers
// ---------------------------------------------------------------------------------------

struct SubShared {
    /// Messages received per phase.
    delivered: [AtomicU64; PH_COUNT],
    hist: Mutex<[Hist; PH_COUNT]>,
    unmatched: AtomicU64,
    connected: AtomicBool,
    ended: AtomicBool,
    /// Why the connection ended, if it did.
    end_reason: Mutex<Option<String>>,
}

impl SubShared {
    fn new() -> Self {
        SubShared {
            delivered: Default::default(),
            hist: Mutex::new([Hist::new(), Hist::new(), Hist::new(), Hist::new()]),
            unmatched: AtomicU64::new(0),
            connected: AtomicBool::new(false),
            ended: AtomicBool::new(false),
            end_reason: Mutex::new(None),
        }
    }
}

struct SubSpec {
    url: String,
    v2: bool,
    /// A compressed wire (v1z, v2z).
    compressed: bool,
    /// The zstd dictionary of a compressed wire for the subscribers that decompress each
    /// message to time it: one in `TIMED_EVERY`, so that decompressing in the bench's own
    /// process does not starve the publisher and the other subscribers (it did at 200).
    dictionary: Option<&'static zstd::dict::DecoderDictionary<'static>>,
    /// CLS_* mask, None = everything.
    filter: Option<u8>,
    stalls: bool,
}

fn filter_names(f: u8) -> Vec<&'static str> {
    let mut v = Vec::new();
    if f & CLS_POST != 0 {
        v.push("app.bsky.feed.post");
    }
    if f & CLS_LIKE != 0 {
        v.push("app.bsky.feed.like");
    }
    if f & CLS_FOLLOW != 0 {
        v.push("app.bsky.graph.follow");
    }
    v
}

/// The realistic mix: subscriber i takes everything with probability 0.1, else 1-3 of
/// posts/likes/follows; deterministic in (seed, i).
fn realistic_filter(seed: u64, i: usize) -> Option<u8> {
    let r = seq_key((seed as i64).wrapping_mul(1_000_003).wrapping_add(i as i64));
    if r % 10 == 0 {
        return None;
    }
    let r = r / 10;
    let k = 1 + (r % 3) as usize;
    let mut bits = [CLS_POST, CLS_LIKE, CLS_FOLLOW];
    // A tiny deterministic shuffle.
    let mut s = r / 3;
    for j in (1..3).rev() {
        let pick = (s % (j as u64 + 1)) as usize;
        bits.swap(j, pick);
        s /= j as u64 + 1;
    }
    Some(bits[..k].iter().fold(0, |a, b| a | b))
}

/// On a compressed wire, one subscriber in this many decompresses (and times) every message;
/// the others count what they receive.
const TIMED_EVERY: usize = 10;

/// Jetstream's v1 (1) or v2 (2) dictionary, prepared once for the bench's subscribers.
fn decoder_dictionary(version: u8) -> &'static zstd::dict::DecoderDictionary<'static> {
    static V1: std::sync::OnceLock<zstd::dict::DecoderDictionary<'static>> =
        std::sync::OnceLock::new();
    static V2: std::sync::OnceLock<zstd::dict::DecoderDictionary<'static>> =
        std::sync::OnceLock::new();
    if version == 1 {
        V1.get_or_init(|| {
            zstd::dict::DecoderDictionary::copy(sluice::wire::zstd::JETSTREAM_V1_DICTIONARY)
        })
    } else {
        V2.get_or_init(|| {
            zstd::dict::DecoderDictionary::copy(sluice::wire::zstd::JETSTREAM_V2_DICTIONARY)
        })
    }
}

fn sub_url(target: Target, port: u16, filter: Option<u8>) -> String {
    let base = format!("ws://127.0.0.1:{port}");
    let (path, param) = match target {
        Target::Sluice(Wire::Raw) => ("/xrpc/com.atproto.sync.subscribeRepos", "wantedCollections"),
        Target::Sluice(Wire::V1 | Wire::V1z) => ("/subscribe", "wantedCollections"),
        Target::Sluice(Wire::V2 | Wire::V2z) => (
            "/xrpc/network.bsky.jetstream.subscribeEvents",
            "collections",
        ),
        Target::Websocat | Target::Redis => return format!("{base}/"),
    };
    let mut url = format!("{base}{path}");
    if let Some(f) = filter {
        for (i, c) in filter_names(f).into_iter().enumerate() {
            url.push(if i == 0 { '?' } else { '&' });
            url.push_str(param);
            url.push('=');
            url.push_str(c);
        }
    }
    let opt_in = match target {
        Target::Sluice(Wire::V1z) => Some("compress=true".to_string()),
        Target::Sluice(Wire::V2z) => Some(format!(
            "zstdDictionary={}",
            sluice::wire::zstd::JETSTREAM_V2_DICTIONARY_ID
        )),
        _ => None,
    };
    if let Some(opt_in) = opt_in {
        url.push(if url.contains('?') { '&' } else { '?' });
        url.push_str(&opt_in);
    }
    url
}

type ClientWs = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

async fn connect_sub(spec: &SubSpec) -> anyhow::Result<ClientWs> {
    let mut last = anyhow!("not tried");
    for attempt in 0..5u64 {
        let mut req = spec.url.as_str().into_client_request()?;
        if spec.v2 {
            req.headers_mut().insert(
                "Sec-WebSocket-Protocol",
                HeaderValue::from_static("xrpc.v1.json"),
            );
        }
        match tokio::time::timeout(
            Duration::from_secs(10),
            tokio_tungstenite::connect_async(req),
        )
        .await
        {
            Ok(Ok((ws, _))) => return Ok(ws),
            Ok(Err(e)) => last = anyhow!("{e}"),
            Err(_) => last = anyhow!("connect timed out"),
        }
        tokio::time::sleep(Duration::from_millis(200 * (attempt + 1))).await;
    }
    Err(last)
}

async fn run_sub(
    spec: Arc<SubSpec>,
    ws: ClientWs,
    ctl: Arc<Control>,
    stamps: Arc<Stamps>,
    me: Arc<SubShared>,
) {
    let (_sink, mut source) = ws.split();
    let mut decompressor = spec
        .dictionary
        .and_then(|d| zstd::bulk::Decompressor::with_prepared_dictionary(d).ok());
    me.connected.store(true, Ordering::Relaxed);
    loop {
        if spec.stalls && ctl.stall_active.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let msg = match source.next().await {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                *me.end_reason.lock() = Some(format!("error: {e}"));
                break;
            }
            None => {
                *me.end_reason.lock() = Some("stream ended".into());
                break;
            }
        };
        let now = now_ns();
        let key = match &msg {
            Message::Binary(b) if spec.compressed => decompressor
                .as_mut()
                .and_then(|d| d.decompress(b, 64 << 20).ok())
                .and_then(|plain| {
                    let t = std::str::from_utf8(&plain).ok()?;
                    Some(commit_key(json_str(t, "did")?, json_str(t, "rev")?))
                }),
            Message::Binary(b) => frame_seq(b).map(seq_key),
            Message::Text(t) => {
                let t = t.as_str();
                match (json_str(t, "did"), json_str(t, "rev")) {
                    (Some(d), Some(r)) => Some(commit_key(d, r)),
                    _ => None,
                }
            }
            Message::Close(c) => {
                *me.end_reason.lock() = Some(format!("closed: {c:?}"));
                break;
            }
            _ => continue,
        };
        let phase = (ctl.phase.load(Ordering::Relaxed) as usize).min(PH_COUNT - 1);
        me.delivered[phase].fetch_add(1, Ordering::Relaxed);
        match key.and_then(|k| stamps.get(k)) {
            Some(sent) => {
                let us = now.saturating_sub(sent) / 1000;
                me.hist.lock()[phase].record(us);
            }
            None => {
                // identity/account events carry no rev: not timed.
                if (matches!(msg, Message::Binary(_)) && !spec.compressed) || key.is_some() {
                    me.unmatched.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
    me.ended.store(true, Ordering::Relaxed);
}

// ---------------------------------------------------------------------------------------
// /proc readings and child processes
// ---------------------------------------------------------------------------------------

fn clk_tck() -> f64 {
    static TCK: OnceLock<f64> = OnceLock::new();
    *TCK.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|v| *v > 0.0)
            .unwrap_or(100.0)
    })
}

/// utime + stime of a process, seconds.
fn proc_cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the comm: state is field 3, so utime (14) and stime (15) are at 11 and 12.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / clk_tck())
}

fn proc_rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// (busy, total) jiffies of the whole machine.
fn machine_jiffies() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

static CHILD_PIDS: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// A child process killed (SIGKILL) and reaped when dropped.
struct ChildGuard {
    child: Child,
    name: String,
    log: Option<PathBuf>,
}

impl ChildGuard {
    fn spawn(name: &str, cmd: &mut Command, log: Option<PathBuf>) -> anyhow::Result<Self> {
        if let Some(path) = &log {
            let f = std::fs::File::create(path)?;
            cmd.stderr(Stdio::from(f.try_clone()?))
                .stdout(Stdio::from(f));
        }
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        CHILD_PIDS.lock().push(child.id());
        Ok(ChildGuard {
            child,
            name: name.to_owned(),
            log,
        })
    }
    fn pid(&self) -> u32 {
        self.child.id()
    }
    fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Ok(Some(status)) = self.child.try_wait() {
            bail!(
                "{} exited early ({status}); log tail:\n{}",
                self.name,
                self.log_tail()
            );
        }
        Ok(())
    }
    fn log_tail(&self) -> String {
        let Some(path) = &self.log else {
            return String::new();
        };
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let pid = self.child.id();
        let _ = self.child.kill();
        let _ = self.child.wait();
        CHILD_PIDS.lock().retain(|p| *p != pid);
    }
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

async fn wait_tcp(port: u16, child: &mut ChildGuard, secs: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        child.check_alive()?;
        if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!(
        "{} did not listen on {port} within {secs}s; log tail:\n{}",
        child.name,
        child.log_tail()
    )
}

// ---------------------------------------------------------------------------------------
// One phase
// ---------------------------------------------------------------------------------------

struct Running {
    /// Processes whose CPU is the target's (name, guard).
    procs: Vec<ChildGuard>,
    /// Where subscribers connect.
    port: u16,
    /// Sink the publisher writes to.
    sinks: tokio::sync::mpsc::Receiver<PubSink>,
    _dir: Option<TempDir>,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn start_target(args: &FanoutArgs, target: Target, tag: &str) -> anyhow::Result<Running> {
    let dir = args
        .tmp
        .join(format!("sluice-bench-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let dir = TempDir(dir);
    let (tx, rx) = tokio::sync::mpsc::channel::<PubSink>(4);
    match target {
        Target::Sluice(_) => {
            let up = TcpListener::bind("127.0.0.1:0").await?;
            let up_port = up.local_addr()?.port();
            tokio::spawn(upstream_server(up, tx));
            let port = free_port()?;
            let mut cmd = Command::new(&args.sluice);
            cmd.arg("serve")
                .arg("--upstream")
                .arg(format!(
                    "ws://127.0.0.1:{up_port}/xrpc/com.atproto.sync.subscribeRepos"
                ))
                .arg("--listen")
                .arg(format!("127.0.0.1:{port}"))
                .arg("--data-dir")
                .arg(dir.0.join("data"))
                .args(["--log", "warn", "--stats-interval-secs", "0"])
                .args([
                    "--connects-per-sec",
                    "1000000",
                    "--connect-burst",
                    "1000000",
                ])
                .args(["--max-per-ip", "10000000", "--max-subscribers", "10000000"])
                .args(&args.serve_args);
            let mut g = ChildGuard::spawn("sluice serve", &mut cmd, Some(dir.0.join("serve.log")))?;
            wait_tcp(port, &mut g, 30).await?;
            Ok(Running {
                procs: vec![g],
                port,
                sinks: rx,
                _dir: Some(dir),
            })
        }
        Target::Websocat => {
            let port = free_port()?;
            let mut cmd = Command::new(&args.websocat);
            // -b: binary messages; broadcast:mirror: sends every message from any client
            // to all connected clients; the buffer holds the largest frame, the queue is
            // the broadcast reuser's backlog.
            cmd.args([
                "-b",
                "-E",
                "--buffer-size",
                "8388608",
                "--queue-len",
                "4096",
            ]);
            cmd.arg(format!("ws-l:127.0.0.1:{port}"))
                .arg("broadcast:mirror:");
            let mut g = ChildGuard::spawn("websocat", &mut cmd, Some(dir.0.join("websocat.log")))?;
            wait_tcp(port, &mut g, 30).await?;
            // The publisher is one more client; it drains the echo of its own frames.
            let ws = connect_sub(&SubSpec {
                url: format!("ws://127.0.0.1:{port}/"),
                v2: false,
                compressed: false,
                dictionary: None,
                filter: None,
                stalls: false,
            })
            .await
            .context("publisher connecting to websocat")?;
            let (sink, mut source) = ws.split();
            tokio::spawn(async move { while let Some(Ok(_)) = source.next().await {} });
            let sink: BoxSink = Box::pin(sink.sink_map_err(anyhow::Error::from));
            tx.send(PubSink::Ws(sink)).await.ok();
            Ok(Running {
                procs: vec![g],
                port,
                sinks: rx,
                _dir: Some(dir),
            })
        }
        Target::Redis => {
            let rport = free_port()?;
            let mut cmd = Command::new(&args.redis_server);
            cmd.args(["--bind", "127.0.0.1", "--port", &rport.to_string()])
                .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
                .args(["--client-output-buffer-limit", "pubsub 256mb 64mb 60"])
                .arg("--dir")
                .arg(&dir.0);
            let mut redis =
                ChildGuard::spawn("redis-server", &mut cmd, Some(dir.0.join("redis.log")))?;
            wait_tcp(rport, &mut redis, 30).await?;
            let port = free_port()?;
            let exe = std::env::current_exe()?;
            let mut cmd = Command::new(exe);
            cmd.arg("redis-relay")
                .arg("--redis")
                .arg(format!("127.0.0.1:{rport}"))
                .arg("--listen")
                .arg(format!("127.0.0.1:{port}"));
            let mut relay =
                ChildGuard::spawn("redis-relay", &mut cmd, Some(dir.0.join("relay.log")))?;
            wait_tcp(port, &mut relay, 30).await?;
            // The relay listens only after its SUBSCRIBE was confirmed.
            let stream = TcpStream::connect(("127.0.0.1", rport)).await?;
            let _ = stream.set_nodelay(true);
            let (mut r, w) = stream.into_split();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                while let Ok(n) = r.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
            });
            tx.send(PubSink::Redis {
                w: BufWriter::with_capacity(1 << 20, w),
                channel: "sluice-bench".into(),
            })
            .await
            .ok();
            Ok(Running {
                procs: vec![relay, redis],
                port,
                sinks: rx,
                _dir: Some(dir),
            })
        }
    }
}

fn rss_total(procs: &[ChildGuard]) -> u64 {
    procs.iter().filter_map(|p| proc_rss_kb(p.pid())).sum()
}

fn cpu_each(procs: &[ChildGuard]) -> Vec<f64> {
    procs
        .iter()
        .map(|p| proc_cpu_secs(p.pid()).unwrap_or(0.0))
        .collect()
}

fn self_cpu() -> f64 {
    proc_cpu_secs(std::process::id()).unwrap_or(0.0)
}

fn q(h: &Hist, p: f64) -> serde_json::Value {
    h.quantile(p).map_or(serde_json::Value::Null, |v| json!(v))
}

async fn run_phase(
    args: &FanoutArgs,
    target: Target,
    run: usize,
) -> anyhow::Result<serde_json::Value> {
    let tag = format!("{}-{run}", target.name().replace('/', "-"));
    eprintln!("== run {run}: {} ==", target.name());
    let mut running = start_target(args, target, &tag).await?;
    for p in &running.procs {
        eprintln!("  {} pid {}", p.name, p.pid());
    }
    let sinks = std::mem::replace(&mut running.sinks, tokio::sync::mpsc::channel(1).1);

    let ctl = Arc::new(Control {
        phase: AtomicU8::new(PH_WARMUP),
        stall_active: AtomicBool::new(false),
        stop_publish: AtomicBool::new(false),
    });
    let rate = f64::from(args.rate.max(1));
    let stamps = Arc::new(Stamps::new((rate * 180.0) as usize * 2));
    let tallies: Arc<[Tally; PH_COUNT]> = Arc::new(Default::default());

    // Generate ahead before anything is measured.
    let ahead = (args.rate as usize * 4).max(1000);
    let (gen_rx, made) = start_generator(args.seed, args.dids, ahead);
    let fill_deadline = Instant::now() + Duration::from_secs(60);
    while made.load(Ordering::Relaxed) < ahead as u64 && Instant::now() < fill_deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_base = rss_total(&running.procs);

    // Subscribers.
    let stall_every = if args.stall_fraction > 0.0 {
        (1.0 / args.stall_fraction).round().max(1.0) as usize
    } else {
        usize::MAX
    };
    let is_sluice = matches!(target, Target::Sluice(_));
    let specs: Vec<Arc<SubSpec>> = (0..args.subscribers)
        .map(|i| {
            let filter = if !is_sluice || args.mix == Mix::All {
                None
            } else {
                realistic_filter(args.seed, i)
            };
            Arc::new(SubSpec {
                url: sub_url(target, running.port, filter),
                v2: matches!(target.wire(), Wire::V2 | Wire::V2z) && is_sluice,
                compressed: matches!(target.wire(), Wire::V1z | Wire::V2z),
                dictionary: match target {
                    _ if i % TIMED_EVERY != 0 => None,
                    Target::Sluice(Wire::V1z) => Some(decoder_dictionary(1)),
                    Target::Sluice(Wire::V2z) => Some(decoder_dictionary(2)),
                    _ => None,
                },
                filter,
                stalls: is_sluice
                    && stall_every != usize::MAX
                    && i % stall_every == stall_every - 1,
            })
        })
        .collect();
    let shared: Vec<Arc<SubShared>> = specs.iter().map(|_| Arc::new(SubShared::new())).collect();
    let mut tasks = Vec::with_capacity(specs.len());
    let sem = Arc::new(tokio::sync::Semaphore::new(args.connect_concurrency.max(1)));
    let mut connect_errors = 0usize;
    let mut first_error = None;
    let connecting: Vec<_> = specs
        .iter()
        .map(|spec| {
            let spec = Arc::clone(spec);
            let sem = Arc::clone(&sem);
            tokio::spawn(async move {
                let _permit = sem.acquire_owned().await;
                connect_sub(&spec).await
            })
        })
        .collect();
    for (i, c) in connecting.into_iter().enumerate() {
        match c.await {
            Ok(Ok(ws)) => tasks.push(tokio::spawn(run_sub(
                Arc::clone(&specs[i]),
                ws,
                Arc::clone(&ctl),
                Arc::clone(&stamps),
                Arc::clone(&shared[i]),
            ))),
            Ok(Err(e)) => {
                connect_errors += 1;
                first_error.get_or_insert_with(|| e.to_string());
            }
            Err(e) => {
                connect_errors += 1;
                first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    for p in running.procs.iter_mut() {
        p.check_alive()?;
    }
    if connect_errors > 0 {
        eprintln!(
            "  {connect_errors} subscribers failed to connect (first: {})",
            first_error.unwrap_or_default()
        );
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_idle = rss_total(&running.procs);
    let connected = args.subscribers - connect_errors;
    let per_sub_idle = if connected > 0 {
        (rss_idle.saturating_sub(rss_base) * 1024) as f64 / connected as f64
    } else {
        0.0
    };

    // Traffic.
    let publisher = tokio::spawn(publish(
        PubCtx {
            rate,
            ctl: Arc::clone(&ctl),
            stamps: Arc::clone(&stamps),
            tallies: Arc::clone(&tallies),
        },
        gen_rx,
        sinks,
    ));
    tokio::time::sleep(Duration::from_secs(args.warmup)).await;

    let delivered = |ph: usize| -> u64 {
        shared
            .iter()
            .map(|s| s.delivered[ph].load(Ordering::Relaxed))
            .sum()
    };
    let cpu0 = cpu_each(&running.procs);
    let self0 = self_cpu();
    let m0 = machine_jiffies();
    let t0 = Instant::now();
    ctl.phase.store(PH_MEASURE, Ordering::Relaxed);
    let rss_start_measure = rss_total(&running.procs);
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut rss_max_measure = 0;
    let measure_end = t0 + Duration::from_secs(args.duration);
    while Instant::now() < measure_end {
        tokio::time::sleep(Duration::from_millis(500)).await;
        rss_max_measure = rss_max_measure.max(rss_total(&running.procs));
    }
    ctl.phase.store(PH_AFTER, Ordering::Relaxed);
    let secs = t0.elapsed().as_secs_f64();
    let cpu1 = cpu_each(&running.procs);
    let self1 = self_cpu();
    let m1 = machine_jiffies();
    let rss_end_measure = rss_total(&running.procs);
    let delivered_measure = delivered(PH_MEASURE as usize);

    // Stall phase (sluice only).
    let mut stall = serde_json::Value::Null;
    let stalled_count = specs.iter().filter(|s| s.stalls).count();
    if is_sluice && args.stall_secs > 0 && stalled_count > 0 {
        let rss_start = rss_total(&running.procs);
        ctl.phase.store(PH_STALL, Ordering::Relaxed);
        ctl.stall_active.store(true, Ordering::Relaxed);
        let mut samples = Vec::new();
        let end = Instant::now() + Duration::from_secs(args.stall_secs);
        while Instant::now() < end {
            tokio::time::sleep(Duration::from_secs(1)).await;
            samples.push(rss_total(&running.procs));
        }
        ctl.stall_active.store(false, Ordering::Relaxed);
        ctl.phase.store(PH_AFTER, Ordering::Relaxed);
        let rss_max = samples.iter().copied().max().unwrap_or(rss_start);
        let rss_min = samples.iter().copied().min().unwrap_or(rss_start);
        let mut others = Hist::new();
        for (spec, s) in specs.iter().zip(&shared) {
            if !spec.stalls {
                others.merge(&s.hist.lock()[PH_STALL as usize]);
            }
        }
        // Give stalled subscribers time to catch up, bounded.
        let before: Vec<u64> = shared
            .iter()
            .map(|s| s.delivered[PH_AFTER as usize].load(Ordering::Relaxed))
            .collect();
        tokio::time::sleep(Duration::from_secs(5)).await;
        let stalled_ended = specs
            .iter()
            .zip(&shared)
            .filter(|(sp, s)| sp.stalls && s.ended.load(Ordering::Relaxed))
            .count();
        let others_ended = specs
            .iter()
            .zip(&shared)
            .filter(|(sp, s)| !sp.stalls && s.ended.load(Ordering::Relaxed))
            .count();
        let stalled_resumed = specs
            .iter()
            .zip(&shared)
            .zip(&before)
            .filter(|((sp, s), b)| {
                sp.stalls && s.delivered[PH_AFTER as usize].load(Ordering::Relaxed) > **b
            })
            .count();
        let reasons: Vec<String> = specs
            .iter()
            .zip(&shared)
            .filter(|(sp, _)| sp.stalls)
            .filter_map(|(_, s)| s.end_reason.lock().clone())
            .take(3)
            .collect();
        let growth = if rss_start > 0 {
            (rss_max as f64 - rss_start as f64) / rss_start as f64 * 100.0
        } else {
            0.0
        };
        stall = json!({
            "secs": args.stall_secs,
            "stalled_subscribers": stalled_count,
            "rss_start_kb": rss_start,
            "rss_min_kb": rss_min,
            "rss_max_kb": rss_max,
            "rss_end_kb": samples.last().copied().unwrap_or(rss_start),
            "rss_growth_pct": growth,
            "rss_slope_kb_s": (samples.last().copied().unwrap_or(rss_start) as f64 - rss_start as f64)
                / args.stall_secs as f64,
            "rss_samples_kb": samples,
            "others_p50_us": q(&others, 0.5),
            "others_p99_us": q(&others, 0.99),
            "others_max_us": others.max,
            "others_ended": others_ended,
            "stalled_ended": stalled_ended,
            "stalled_resumed_reading": stalled_resumed,
            "stalled_end_reasons": reasons,
        });
    }

    ctl.stop_publish.store(true, Ordering::Relaxed);
    let pubstats = tokio::time::timeout(Duration::from_secs(10), publisher)
        .await
        .ok()
        .and_then(|r| r.ok())
        .unwrap_or_default();
    for p in running.procs.iter_mut() {
        p.check_alive()?;
    }

    // Results.
    let mut hist = Hist::new();
    let mut unmatched = 0;
    let mut expected_measure = 0u64;
    let mut delivered_live = 0u64;
    for (spec, s) in specs.iter().zip(&shared) {
        if !s.connected.load(Ordering::Relaxed) {
            continue;
        }
        hist.merge(&s.hist.lock()[PH_MEASURE as usize]);
        unmatched += s.unmatched.load(Ordering::Relaxed);
        expected_measure += tallies[PH_MEASURE as usize].expected(target, spec.filter);
        delivered_live += s.delivered[PH_MEASURE as usize].load(Ordering::Relaxed);
    }
    for t in tasks {
        t.abort();
    }
    let cpu_secs: Vec<f64> = cpu1.iter().zip(&cpu0).map(|(a, b)| a - b).collect();
    let total_cpu: f64 = cpu_secs.iter().sum();
    let per_event_us = if delivered_measure > 0 {
        total_cpu * 1e6 / delivered_measure as f64
    } else {
        f64::NAN
    };
    let machine_busy = match (m0, m1) {
        (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => (b1 - b0) as f64 / (t1 - t0) as f64 * 100.0,
        _ => f64::NAN,
    };
    let names: Vec<String> = running.procs.iter().map(|p| p.name.clone()).collect();
    let frames_measure = tallies[PH_MEASURE as usize].frames.load(Ordering::Relaxed);
    let result = json!({
        "run": run,
        "target": target.name(),
        "mix": if is_sluice { format!("{:?}", args.mix).to_lowercase() } else { "all (no filtering)".into() },
        "subscribers": args.subscribers,
        "connected": connected,
        "rate": args.rate,
        "duration_s": secs,
        "frames_sent_measure": frames_measure,
        "frame_rate_achieved": frames_measure as f64 / secs,
        "delivered_measure": delivered_measure,
        "delivered_per_sec": delivered_measure as f64 / secs,
        "expected_measure": expected_measure,
        "delivery_ratio": if expected_measure > 0 { delivered_live as f64 / expected_measure as f64 } else { f64::NAN },
        "cpu_us_per_event": per_event_us,
        "cpu_pct": total_cpu / secs * 100.0,
        "cpu_by_process": names.iter().zip(&cpu_secs).map(|(n, c)| json!({"name": n, "cpu_s": c, "us_per_event": if delivered_measure > 0 { c * 1e6 / delivered_measure as f64 } else { f64::NAN }})).collect::<Vec<_>>(),
        "bench_cpu_pct": (self1 - self0) / secs * 100.0,
        "machine_busy_pct": machine_busy,
        "p50_us": q(&hist, 0.5),
        "p90_us": q(&hist, 0.9),
        "p99_us": q(&hist, 0.99),
        "p999_us": q(&hist, 0.999),
        "max_us": hist.max,
        "timed_samples": hist.n,
        "unmatched": unmatched,
        "rss_base_kb": rss_base,
        "rss_idle_kb": rss_idle,
        "idle_bytes_per_subscriber": per_sub_idle,
        "rss_end_measure_kb": rss_end_measure,
        "rss_max_measure_kb": rss_max_measure,
        "rss_start_measure_kb": rss_start_measure,
        "rss_slope_measure_kb_s": (rss_end_measure as f64 - rss_start_measure as f64) / secs,
        "loadavg_at_measure": loadavg.trim(),
        "publisher": {
            "sent": pubstats.sent,
            "underruns": pubstats.underruns,
            "send_errors": pubstats.send_errors,
            "reconnects": pubstats.reconnects,
            "lag_p99_us": q(&pubstats.lag, 0.99),
            "lag_max_us": pubstats.lag.max,
        },
        "stall": stall,
    });
    print_phase(&result);
    drop(running);
    Ok(result)
}

fn f(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Number(n) => {
            let x = n.as_f64().unwrap_or(f64::NAN);
            if (x.fract() == 0.0 && x.abs() < 1e15) || x.abs() >= 100.0 {
                format!("{x:.0}")
            } else {
                format!("{x:.2}")
            }
        }
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn print_phase(r: &serde_json::Value) {
    eprintln!(
        "  {} mix={} subs={}/{} rate={} (achieved {}/s): delivered {}/s (ratio {}), \
         CPU {} us/event ({}% of a core), p50 {} us p99 {} us max {} us, \
         RSS base {} KiB idle {} KiB ({} B/sub) end {} KiB (slope {} KiB/s); bench CPU {}%, machine busy {}%, load {}",
        r["target"].as_str().unwrap_or(""),
        r["mix"].as_str().unwrap_or(""),
        f(&r["connected"]),
        f(&r["subscribers"]),
        f(&r["rate"]),
        f(&r["frame_rate_achieved"]),
        f(&r["delivered_per_sec"]),
        f(&r["delivery_ratio"]),
        f(&r["cpu_us_per_event"]),
        f(&r["cpu_pct"]),
        f(&r["p50_us"]),
        f(&r["p99_us"]),
        f(&r["max_us"]),
        f(&r["rss_base_kb"]),
        f(&r["rss_idle_kb"]),
        f(&r["idle_bytes_per_subscriber"]),
        f(&r["rss_end_measure_kb"]),
        f(&r["rss_slope_measure_kb_s"]),
        f(&r["bench_cpu_pct"]),
        f(&r["machine_busy_pct"]),
        r["loadavg_at_measure"].as_str().unwrap_or(""),
    );
    let s = &r["stall"];
    if !s.is_null() {
        eprintln!(
            "  stall {}s of {} subs: RSS start {} max {} end {} KiB (growth {}%, slope {} KiB/s); others p99 {} us max {} us; \
             stalled ended {} resumed {}; others ended {}",
            f(&s["secs"]),
            f(&s["stalled_subscribers"]),
            f(&s["rss_start_kb"]),
            f(&s["rss_max_kb"]),
            f(&s["rss_end_kb"]),
            f(&s["rss_growth_pct"]),
            f(&s["rss_slope_kb_s"]),
            f(&s["others_p99_us"]),
            f(&s["others_max_us"]),
            f(&s["stalled_ended"]),
            f(&s["stalled_resumed_reading"]),
            f(&s["others_ended"]),
        );
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn print_summary(results: &[serde_json::Value]) {
    let mut targets: Vec<String> = Vec::new();
    for r in results {
        let t = r["target"].as_str().unwrap_or("").to_owned();
        if !targets.contains(&t) {
            targets.push(t);
        }
    }
    let get = |rs: &[&serde_json::Value], path: &[&str]| -> f64 {
        median(
            rs.iter()
                .map(|r| {
                    let mut v = *r;
                    for p in path {
                        v = &v[*p];
                    }
                    v.as_f64().unwrap_or(f64::NAN)
                })
                .collect(),
        )
    };
    let sluice_raw: Vec<&serde_json::Value> = results
        .iter()
        .filter(|r| r["target"] == "sluice/raw")
        .collect();
    let base_cpu = get(&sluice_raw, &["cpu_us_per_event"]);
    println!(
        "| target | runs | delivered/s | CPU µs/event | vs sluice/raw | p50 µs | p99 µs | max µs | idle B/sub | RSS end KiB | stall RSS growth % | bench CPU % | machine busy % |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for t in targets {
        let rs: Vec<&serde_json::Value> = results.iter().filter(|r| r["target"] == t).collect();
        let cpu = get(&rs, &["cpu_us_per_event"]);
        println!(
            "| {t} | {} | {:.0} | {:.2} | {:.2}× | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {:.0} | {:.0} |",
            rs.len(),
            get(&rs, &["delivered_per_sec"]),
            cpu,
            cpu / base_cpu,
            get(&rs, &["p50_us"]),
            get(&rs, &["p99_us"]),
            get(&rs, &["max_us"]),
            get(&rs, &["idle_bytes_per_subscriber"]),
            get(&rs, &["rss_end_measure_kb"]),
            {
                let g = get(&rs, &["stall", "rss_growth_pct"]);
                if g.is_finite() {
                    format!("{g:.1}")
                } else {
                    "-".into()
                }
            },
            get(&rs, &["bench_cpu_pct"]),
            get(&rs, &["machine_busy_pct"]),
        );
    }
}

async fn fanout(args: FanoutArgs) -> anyhow::Result<()> {
    if args.subscribers == 0 || args.rate == 0 || args.duration == 0 {
        bail!("--subscribers, --rate and --duration must be positive");
    }
    if !(0.0..=1.0).contains(&args.stall_fraction) {
        bail!("--stall-fraction must be within 0..=1");
    }
    let mut targets: Vec<Target> = args.wire.iter().map(|w| Target::Sluice(*w)).collect();
    for b in &args.baselines {
        match b {
            BaselineArg::Websocat => targets.push(Target::Websocat),
            BaselineArg::Redis => targets.push(Target::Redis),
            BaselineArg::None => {}
        }
    }
    targets.dedup();
    let runs = args.runs.max(1);
    // Watchdog: every phase is bounded; this bounds the whole run even if something hangs.
    let per_phase = args.warmup + args.duration + args.stall_secs + 120;
    let bound = Duration::from_secs(per_phase * (targets.len() * runs) as u64 + 120);
    std::thread::spawn(move || {
        std::thread::sleep(bound);
        eprintln!("sluice-bench: watchdog: run exceeded {bound:?}; killing children");
        for pid in CHILD_PIDS.lock().iter() {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
        }
        std::process::exit(3);
    });

    let mut out = match &args.json {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("opening {}", p.display()))?,
        ),
        None => None,
    };
    let mut results = Vec::new();
    for run in 1..=runs {
        for t in &targets {
            match run_phase(&args, *t, run).await {
                Ok(r) => {
                    if let Some(f) = out.as_mut() {
                        writeln!(f, "{r}")?;
                    }
                    results.push(r);
                }
                Err(e) => eprintln!("  phase {} failed: {e:#}", t.name()),
            }
        }
    }
    println!(
        "\nsubscribers={} rate={}/s duration={}s warmup={}s mix={:?} runs={} (medians)",
        args.subscribers, args.rate, args.duration, args.warmup, args.mix, runs
    );
    print_summary(&results);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Redis pub/sub rebroadcaster (baseline)
// ---------------------------------------------------------------------------------------

/// Reads one RESP value as a list of bulk strings (arrays flattened); integers and simple
/// strings are returned as their text.
async fn read_resp<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
    out: &mut Vec<Bytes>,
    depth: usize,
) -> anyhow::Result<()> {
    if depth > 4 {
        bail!("RESP nesting too deep");
    }
    let mut line = Vec::new();
    let n = r.read_until(b'\n', &mut line).await?;
    if n == 0 {
        bail!("redis closed the connection");
    }
    if line.len() < 3 || !line.ends_with(b"\r\n") {
        bail!("malformed RESP line");
    }
    let kind = line[0];
    let text = std::str::from_utf8(&line[1..line.len() - 2])?;
    match kind {
        b'*' => {
            let count: i64 = text.parse()?;
            for _ in 0..count.max(0) {
                Box::pin(read_resp(r, out, depth + 1)).await?;
            }
        }
        b'$' => {
            let len: i64 = text.parse()?;
            if len < 0 {
                out.push(Bytes::new());
                return Ok(());
            }
            let len = usize::try_from(len)?;
            if len > 64 << 20 {
                bail!("RESP bulk string too large");
            }
            let mut buf = vec![0u8; len + 2];
            r.read_exact(&mut buf).await?;
            buf.truncate(len);
            out.push(Bytes::from(buf));
        }
        b':' | b'+' => out.push(Bytes::copy_from_slice(text.as_bytes())),
        b'-' => bail!("redis error: {text}"),
        _ => bail!("unexpected RESP type {kind}"),
    }
    Ok(())
}

async fn redis_relay(args: RedisRelayArgs) -> anyhow::Result<()> {
    let stream = TcpStream::connect(args.redis).await?;
    let _ = stream.set_nodelay(true);
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::with_capacity(1 << 20, r);
    let cmd = format!(
        "*2\r\n$9\r\nSUBSCRIBE\r\n${}\r\n{}\r\n",
        args.channel.len(),
        args.channel
    );
    w.write_all(cmd.as_bytes()).await?;
    let mut parts = Vec::new();
    read_resp(&mut r, &mut parts, 0).await?;
    if parts.first().map(|b| b.as_ref()) != Some(b"subscribe".as_slice()) {
        bail!("unexpected SUBSCRIBE reply");
    }
    let (tx, _) = tokio::sync::broadcast::channel::<Bytes>(args.capacity.max(16));
    let listener = TcpListener::bind(args.listen).await?;
    let tx2 = tx.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let mut rx = tx2.subscribe();
            tokio::spawn(async move {
                let _ = stream.set_nodelay(true);
                let Ok(ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                let (mut sink, mut source) = ws.split();
                tokio::spawn(async move { while let Some(Ok(_)) = source.next().await {} });
                loop {
                    let first = match rx.recv().await {
                        Ok(b) => b,
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(_) => return,
                    };
                    if sink.feed(Message::Binary(first)).await.is_err() {
                        return;
                    }
                    // Batch whatever else is ready, then flush once.
                    for _ in 0..256 {
                        match rx.try_recv() {
                            Ok(b) => {
                                if sink.feed(Message::Binary(b)).await.is_err() {
                                    return;
                                }
                            }
                            Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_)) => {}
                            Err(_) => break,
                        }
                    }
                    if sink.flush().await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    println!("ready");
    let _ = std::io::stdout().flush();
    loop {
        parts.clear();
        read_resp(&mut r, &mut parts, 0).await?;
        if parts.len() == 3 && parts[0].as_ref() == b"message" {
            let payload = parts.pop().unwrap_or_default();
            let _ = tx.send(payload);
        }
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _ = epoch();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.cmd {
        Cmd::Fanout(args) => rt.block_on(fanout(args)),
        Cmd::RedisRelay(args) => rt.block_on(redis_relay(args)),
        Cmd::ClusterAppend(args) => rt.block_on(cluster::append(args)),
        Cmd::ClusterFailover(args) => rt.block_on(cluster::failover(args)),
        Cmd::ClusterScale(args) => rt.block_on(cluster::scale(args)),
        Cmd::RedisSink(args) => rt.block_on(bench_sink::redis_sink(args)),
        Cmd::RedisSinkMemory(args) => rt.block_on(bench_sink::redis_sink_memory(args)),
        Cmd::Hostile(args) => rt.block_on(hostile::hostile(args)),
        Cmd::HostileAttack(args) => rt.block_on(hostile::attack(args)),
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

    #[test]
    fn meta_of_synthetic_frames() {
        let frames: Vec<Vec<u8>> = Synth::new(&SynthOptions {
            count: 300,
            ..SynthOptions::default()
        })
        .collect();
        let mut commits = 0;
        for fr in &frames {
            let m = frame_meta(fr);
            assert_eq!(m.seq, frame_seq(fr));
            assert!(m.seq.is_some());
            if m.ftype == FrameType::Commit {
                commits += 1;
                assert!(m.commit_key.is_some());
                assert!(m.ops.iter().sum::<u16>() >= 1);
            }
        }
        assert!(commits > 250);
    }

    #[test]
    fn json_fields() {
        let t = r#"{"did":"did:plc:abc","time_us":1,"kind":"commit","commit":{"rev":"3k","operation":"create"}}"#;
        assert_eq!(json_str(t, "did"), Some("did:plc:abc"));
        assert_eq!(json_str(t, "rev"), Some("3k"));
        assert_eq!(json_str(t, "nope"), None);
    }

    #[test]
    fn realistic_mix_shape() {
        let n = 10_000;
        let all = (0..n).filter(|i| realistic_filter(7, *i).is_none()).count();
        assert!((800..1200).contains(&all), "{all}");
        for i in 0..n {
            if let Some(f) = realistic_filter(7, i) {
                assert!(f != 0 && f & !(CLS_POST | CLS_LIKE | CLS_FOLLOW) == 0);
            }
        }
    }
}
