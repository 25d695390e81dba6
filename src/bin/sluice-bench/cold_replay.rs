//! The `cold-replay` command: many v1 subscribers replaying an hour of the log from disk
//! while live subscribers' latency is measured, alternating with windows without replay.
//!
//! The data dir is filled first, in this process, through sluice's own ingest and log, with
//! frames dated over the last `--span-secs` 1-4 ms apart (about the 2026 live rate), so the
//! store holds an hour of source time: the synthetic generator's frames (`--data synth`),
//! or the real corpus's 150 relay frames (`--data corpus`, from the shared upstream
//! fixtures), cycled and ingested again with new stamps as the log bench's corpus mode
//! does, so the replayed v1 events are real ones in size and shape. Then `sluice
//! serve` runs on it with a paced live upstream continuing the upstream seqs, and a few live
//! v1 subscribers are timed (upstream send to subscriber read) the whole time. Each run is
//! a window without replay, then a window in which `--replayers` v1 subscribers connect
//! with `cursor` = the oldest stored event's source time (µs) and read until they reach the
//! first live event (then they leave) or the window ends. The replayers run in processes
//! of their own (`replayers.rs`), apart from the publisher and the live subscribers.
//! Reported per window: the replayers' delivered events/s (stored events received,
//! summed, over the time until the last one caught up or the window ended) and their mean
//! v1 bytes per delivered event, the live
//! subscribers' p50 and p99, and the CPU of sluice, of the replayers and of the bench.
//! With `--variant`, each run starts one `sluice serve` per variant in turn on the same
//! store, so settings alternate window by window; `--store` keeps the filled store for
//! later calls.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use serde_json::json;

use sluice::decode::DecodeLimits;
use sluice::event::StampState;
use sluice::ingest::{IngestOutcome, Ingestor};
use sluice::log::{Log, LogConfig};
use sluice::upstream::capture::{read_all, upstream_fixtures_dir};
use sluice::upstream::synth::{Synth, SynthOptions};

use crate::control::{PH_AFTER, PH_MEASURE, PH_STALL};
use crate::hist::{now_ns, Hist};
use crate::procs::{
    cpu_each, free_port, self_cpu, serve_command, start_watchdog, wait_tcp, ChildGuard, ServeArgs,
    TempDir, SERVE_NO_LIMITS,
};
use crate::publisher::{start_upstream, Feed, PubSink};
use crate::replayers::Replayers;
use crate::report::{f, open_results, q};
use crate::subscribers::{connect, run_sub, sub_url, SubShared, SubSpec};
use crate::target::{Target, Wire};

#[derive(clap::Args, Clone)]
pub(crate) struct ColdReplayArgs {
    #[command(flatten)]
    pub(crate) serve: ServeArgs,
    /// Source-time span of the stored history, seconds: the replayers start this far back.
    #[arg(long, default_value_t = 3600)]
    pub(crate) span_secs: u64,
    /// Live upstream frames per second while sluice serves.
    #[arg(long, default_value_t = 500)]
    pub(crate) rate: u32,
    /// v1 subscribers replaying from the oldest stored event in each replay window.
    #[arg(long, default_value_t = 100)]
    pub(crate) replayers: usize,
    /// Live v1 subscribers (everything, no cursor), timed in every window.
    #[arg(long, default_value_t = 5)]
    pub(crate) live: usize,
    /// Length of a window without replay, seconds.
    #[arg(long, default_value_t = 30)]
    pub(crate) duration: u64,
    /// Longest replay window, seconds (it ends earlier once every replayer caught up).
    #[arg(long, default_value_t = 60)]
    pub(crate) replay_secs: u64,
    /// Seconds of live traffic before the first window.
    #[arg(long, default_value_t = 5)]
    pub(crate) warmup: u64,
    /// Runs, each a window without and a window with replay; the summary shows medians.
    #[arg(long, default_value_t = 3)]
    pub(crate) runs: usize,
    /// `sluice serve`'s `--scan-events-per-sec` and `--scan-events-per-sec-per-ip` (all
    /// replayers connect from one address). The default lifts the budget, so the bench
    /// measures what the process can deliver; at sluice's defaults (100,000 and 50,000)
    /// replays from one address scan at most 50,000 events/s in all.
    #[arg(long, default_value_t = 1_000_000_000)]
    pub(crate) scan_events_per_sec: u64,
    /// Processes the replayers run in (`sluice-bench cold-replay-read`, one thread each),
    /// apart from the bench's publisher and live subscribers.
    #[arg(long, default_value_t = 2)]
    pub(crate) replay_procs: usize,
    /// Niceness of the replayers' processes (0-19): they stand for remote machines, and
    /// at 19 their reading takes only what sluice's live path and the live subscribers
    /// being timed leave of the cores. 0 makes them compete at normal priority.
    #[arg(long, default_value_t = 19,
          value_parser = clap::value_parser!(i32).range(0..=19))]
    pub(crate) replay_nice: i32,
    /// Runs the replayers' processes in the SCHED_IDLE class instead of at
    /// `--replay-nice`: closer to remote machines, whose reading takes no core from the
    /// live path at all.
    #[arg(long)]
    pub(crate) replay_idle: bool,
    /// What the stored hour is made of: `synth` (the synthetic generator's frames, ~524 B
    /// per v1 event) or `corpus` (the real relay frames of the shared upstream fixtures'
    /// `jetstream-corpus`, cycled and stamped again). The live upstream is synthetic either
    /// way (its frames carry the send instants the live subscribers are timed by).
    #[arg(long, value_enum, default_value_t = Data::Synth)]
    pub(crate) data: Data,
    /// Seed of the synthetic frames (the live upstream uses seed + 1).
    #[arg(long, default_value_t = 1)]
    pub(crate) seed: u64,
    /// DID pool of the synthetic frames.
    #[arg(long, default_value_t = 100_000)]
    pub(crate) dids: usize,
    /// Write every window's result as one JSON line to this file.
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
    /// Where the data dir and the child's log go.
    #[arg(long, default_value = "/tmp")]
    pub(crate) tmp: PathBuf,
    /// A `sluice serve` setting to compare, as `NAME=ARG[,ARG...]` (repeat for several,
    /// e.g. `--variant paced=--catchup-pace-mib-per-sec=200`): each run then starts one
    /// `sluice serve` per variant in turn on the same store (a window without and one
    /// with replay each), so the variants alternate; the summary gives each one's medians.
    /// An ARG `--sluice=PATH` runs that binary for the variant instead of `--sluice` (to
    /// alternate two builds), and is not passed to it. Without it, one `sluice serve`
    /// runs every window.
    #[arg(long)]
    pub(crate) variant: Vec<String>,
    /// Keep the filled store in this directory and use it again on later calls (it is
    /// filled only when the directory holds none); the caller deletes it. Without it, the
    /// store is filled under `--tmp` and deleted at the end.
    #[arg(long)]
    pub(crate) store: Option<PathBuf>,
}

/// What `cold-replay` stores: see [`ColdReplayArgs::data`].
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Data {
    Synth,
    Corpus,
}

impl Data {
    fn name(self) -> &'static str {
        match self {
            Data::Synth => "synth",
            Data::Corpus => "corpus",
        }
    }
}

/// One `sluice serve` setting compared by [`cold_replay`]: a name and its extra arguments.
struct Variant {
    name: String,
    args: Vec<String>,
    /// The binary this variant runs, if not `--sluice`.
    sluice: Option<PathBuf>,
}

impl Variant {
    fn parse(text: &str) -> anyhow::Result<Self> {
        let Some((name, args)) = text.split_once('=') else {
            bail!("--variant {text:?}: expected NAME=ARG[,ARG...]");
        };
        let mut sluice = None;
        let mut rest = Vec::new();
        for arg in args.split(',').filter(|a| !a.is_empty()) {
            match arg.strip_prefix("--sluice=") {
                Some(path) => sluice = Some(PathBuf::from(path)),
                None => rest.push(arg.to_owned()),
            }
        }
        Ok(Self {
            name: name.to_owned(),
            args: rest,
            sluice,
        })
    }
}

/// What the fill stored.
struct Filled {
    events: u64,
    frames: u64,
    first_time_us: i64,
    last_time_us: i64,
    /// The last upstream seq stored (the live upstream continues above it).
    upstream_cursor: i64,
    secs: f64,
    store_bytes: u64,
    /// What the store was filled with ([`Data::name`]).
    data: String,
    /// The stored events' v1 messages, summed (what a full v1 replay delivers).
    v1_bytes: u64,
}

impl Filled {
    fn to_json(&self) -> serde_json::Value {
        json!({
            "events": self.events,
            "frames": self.frames,
            "first_time_us": self.first_time_us,
            "last_time_us": self.last_time_us,
            "upstream_cursor": self.upstream_cursor,
            "secs": self.secs,
            "store_bytes": self.store_bytes,
            "data": self.data,
            "v1_bytes": self.v1_bytes,
        })
    }

    fn from_json(v: &serde_json::Value) -> Option<Self> {
        Some(Self {
            events: v["events"].as_u64()?,
            frames: v["frames"].as_u64()?,
            first_time_us: v["first_time_us"].as_i64()?,
            last_time_us: v["last_time_us"].as_i64()?,
            upstream_cursor: v["upstream_cursor"].as_i64()?,
            secs: v["secs"].as_f64()?,
            store_bytes: v["store_bytes"].as_u64()?,
            // Stores kept by earlier bench builds were synthetic and did not count bytes.
            data: v["data"].as_str().unwrap_or("synth").to_owned(),
            v1_bytes: v["v1_bytes"].as_u64().unwrap_or(0),
        })
    }

    /// Mean v1 message bytes per stored event.
    fn v1_bytes_per_event(&self) -> f64 {
        self.v1_bytes as f64 / self.events.max(1) as f64
    }
}

/// The corpus's frames that ingest to events, as templates to cycle.
fn corpus_frames() -> anyhow::Result<Vec<Bytes>> {
    let path = upstream_fixtures_dir().join("jetstream-corpus/frames.bin");
    let frames = read_all(&path, 8 << 20)
        .with_context(|| format!("reading the corpus at {}", path.display()))?;
    let mut ingestor = Ingestor::new(StampState::fresh(), DecodeLimits::default());
    let templates: Vec<Bytes> = frames
        .into_iter()
        .map(Bytes::from)
        .filter(|f| {
            matches!(ingestor.ingest(f.clone(), i64::MAX / 2),
                     IngestOutcome::Events(e) if !e.is_empty())
        })
        .collect();
    if templates.is_empty() {
        bail!("no frame of {} ingests to an event", path.display());
    }
    Ok(templates)
}

/// The frames a fill stores, each with the source time (µs) its first event gets.
enum Frames {
    Synth(Synth),
    /// The corpus's templates, cycled, 1-4 ms apart from `time_us` on.
    Corpus {
        templates: Vec<Bytes>,
        next: usize,
        time_us: i64,
        rng: rand::rngs::StdRng,
    },
}

/// Fills `dir` with `span_secs` of `data`'s frames dated up to now, through ingest and the
/// log as `sluice serve` would store them (default log settings). Corpus frames are
/// stamped again as they are stored (new seqs and times, upstream seqs renumbered), as a
/// cluster follower restamps a leader's frames.
fn fill(
    dir: &std::path::Path,
    data: Data,
    span_secs: u64,
    seed: u64,
    dids: usize,
) -> anyhow::Result<Filled> {
    let started = Instant::now();
    let (log, state) = Log::open(LogConfig::new(dir)).context("opening the log to fill")?;
    if state.next_seq != 1 {
        bail!("{} already holds a log", dir.display());
    }
    let now_us = sluice::clock::now_us();
    let span_us = i64::try_from(span_secs)?.saturating_mul(1_000_000);
    let end_us = now_us.saturating_sub(1_000_000);
    let start_us = end_us - span_us;
    let mut source = match data {
        Data::Synth => Frames::Synth(Synth::new(&SynthOptions {
            seed,
            count: usize::MAX,
            dids,
            start_seq: 1,
            start_time_ms: start_us / 1000,
        })),
        Data::Corpus => Frames::Corpus {
            templates: corpus_frames()?,
            next: 0,
            time_us: start_us,
            rng: rand::SeedableRng::seed_from_u64(seed),
        },
    };
    let mut ingestor = Ingestor::new(state, DecodeLimits::default());
    let (mut events, mut frames, mut v1_bytes) = (0u64, 0u64, 0u64);
    let (mut first_time_us, mut last_time_us, mut upstream_cursor) = (None, 0i64, 0i64);
    loop {
        let outcome = match &mut source {
            Frames::Synth(synth) => {
                let Some(frame) = synth.next() else { break };
                ingestor.ingest(Bytes::from(frame), now_us)
            }
            Frames::Corpus {
                templates,
                next,
                time_us,
                rng,
            } => {
                let frame = templates[*next % templates.len()].clone();
                *next += 1;
                *time_us = (*time_us).max(last_time_us + 1);
                let outcome = ingestor.restamp(frame, now_us, ingestor.state().next_seq, *time_us);
                *time_us += rand::Rng::gen_range(rng, 1..=4) * 1000;
                match outcome {
                    IngestOutcome::Events(mut batch) => {
                        // Upstream seqs renumbered: the corpus's own repeat every cycle.
                        // (The stored raw frames keep their own seq inside: this store is
                        // for v1 and v2 replays, not for the raw wire's.)
                        let upstream = upstream_cursor + 1;
                        for e in &mut batch {
                            e.upstream_seq = upstream;
                        }
                        IngestOutcome::Events(batch)
                    }
                    other => other,
                }
            }
        };
        let IngestOutcome::Events(batch) = outcome else {
            continue;
        };
        let Some(last) = batch.last() else { continue };
        last_time_us = last.time_us;
        upstream_cursor = last.upstream_seq;
        first_time_us.get_or_insert(batch[0].time_us);
        events += batch.len() as u64;
        frames += 1;
        v1_bytes += batch
            .iter()
            .map(|e| e.v1_json.as_ref().map_or(0, |j| j.len() as u64))
            .sum::<u64>();
        log.append(batch).context("appending the fill")?;
        if last_time_us >= end_us {
            break;
        }
    }
    if !log.flush(Duration::from_secs(600)) {
        bail!("the fill did not become durable within 600 s");
    }
    let store_bytes = log.reader().store().size_bytes();
    log.close().context("closing the filled log")?;
    Ok(Filled {
        events,
        frames,
        first_time_us: first_time_us.unwrap_or(last_time_us),
        last_time_us,
        upstream_cursor,
        secs: started.elapsed().as_secs_f64(),
        store_bytes,
        data: data.name().to_owned(),
        v1_bytes,
    })
}

/// The live subscribers' latency histogram of phase `ph`, emptied for the next window.
fn take_hist(live: &[Arc<SubShared>], ph: u8) -> (Hist, u64) {
    let mut h = Hist::new();
    let mut delivered = 0;
    for s in live {
        let mut hist = s.hist.lock();
        h.merge(&hist[ph as usize]);
        hist[ph as usize] = Hist::new();
        delivered += s.delivered[ph as usize].swap(0, Ordering::Relaxed);
    }
    (h, delivered)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub(crate) async fn cold_replay(args: ColdReplayArgs) -> anyhow::Result<()> {
    if args.replayers == 0 || args.live == 0 || args.rate == 0 || args.span_secs == 0 {
        bail!("--replayers, --live, --rate and --span-secs must be positive");
    }
    let runs = args.runs.max(1);
    let variants = if args.variant.is_empty() {
        vec![Variant {
            name: "serve".into(),
            args: Vec::new(),
            sluice: None,
        }]
    } else {
        args.variant
            .iter()
            .map(|v| Variant::parse(v))
            .collect::<anyhow::Result<Vec<_>>>()?
    };
    let per_run = (args.warmup + args.duration + args.replay_secs + 30) * variants.len() as u64;
    start_watchdog(Duration::from_secs(900 + per_run * runs as u64));
    let dir = TempDir::fresh(&args.tmp, "cold-replay")?;
    let (data, filled) = store(&args, &dir).await?;

    let mut out = open_results(args.json.as_deref())?;
    let mut results = Vec::new();
    if args.variant.is_empty() {
        let start_seq = live_start_seq(&filled)?;
        let all = 1..=runs;
        results = serve_windows(&args, &dir, &data, &filled, &variants[0], all, start_seq).await?;
    } else {
        for run in 1..=runs {
            for variant in &variants {
                let start_seq = live_start_seq(&filled)?;
                let r = serve_windows(&args, &dir, &data, &filled, variant, run..=run, start_seq)
                    .await?;
                results.extend(r);
            }
        }
    }
    if let Some(file) = out.as_mut() {
        use std::io::Write as _;
        for r in &results {
            writeln!(file, "{r}")?;
        }
    }
    for variant in &variants {
        summary(&args, &filled, &variant.name, &results, runs);
    }
    Ok(())
}

/// Where a new `sluice serve`'s live upstream starts its seqs: above the fill's, and above
/// every earlier serve's on this store (a kept store holds their live events, and sluice
/// drops frames at or below its cursor). The wall clock in µs at the serve's start does
/// both: an earlier serve, started earlier, published fewer than 10^6 frames a second.
fn live_start_seq(filled: &Filled) -> anyhow::Result<u64> {
    let above_fill = u64::try_from(filled.upstream_cursor)?.saturating_add(1_000);
    Ok(above_fill.max(u64::try_from(sluice::clock::now_us())?))
}

/// The store to replay: kept in `--store` (filled there on first use), or filled in
/// `dir` (deleted with it).
async fn store(args: &ColdReplayArgs, dir: &TempDir) -> anyhow::Result<(PathBuf, Filled)> {
    let (data, meta) = match &args.store {
        Some(keep) => (keep.join("data"), Some(keep.join("filled.json"))),
        None => (dir.0.join("data"), None),
    };
    if let (Some(keep), Some(meta)) = (&args.store, &meta) {
        std::fs::create_dir_all(keep).with_context(|| format!("creating {}", keep.display()))?;
        if let Ok(text) = std::fs::read_to_string(meta) {
            let value: serde_json::Value = serde_json::from_str(&text)?;
            let filled = Filled::from_json(&value)
                .with_context(|| format!("{} is not a fill's record", meta.display()))?;
            if filled.data != args.data.name() {
                bail!(
                    "{} holds a store of {} events; this call asks for --data {}",
                    data.display(),
                    filled.data,
                    args.data.name()
                );
            }
            eprintln!(
                "using the store in {} ({} {} events, {:.0} v1 bytes each, filled earlier)",
                data.display(),
                filled.events,
                filled.data,
                filled.v1_bytes_per_event()
            );
            return Ok((data, filled));
        }
        if data.exists() {
            bail!("{} holds a store without its fill record", data.display());
        }
    }
    eprintln!(
        "filling {} with {} s of {} events...",
        data.display(),
        args.span_secs,
        args.data.name()
    );
    let (fill_dir, kind, span, seed, dids) = (
        data.clone(),
        args.data,
        args.span_secs,
        args.seed,
        args.dids,
    );
    let filled =
        tokio::task::spawn_blocking(move || fill(&fill_dir, kind, span, seed, dids)).await??;
    eprintln!(
        "  {} events ({} frames) over {:.0} s of source time in {:.1} s; store {} MiB; \
         {:.0} v1 bytes per event",
        filled.events,
        filled.frames,
        (filled.last_time_us - filled.first_time_us) as f64 / 1e6,
        filled.secs,
        filled.store_bytes >> 20,
        filled.v1_bytes_per_event()
    );
    if let Some(meta) = &meta {
        std::fs::write(meta, filled.to_json().to_string())?;
    }
    Ok((data, filled))
}

/// One `sluice serve` (with `variant`'s arguments) on `data`, its live upstream and live
/// subscribers, for `runs`: each a window without replay, then one with it. One result
/// per window.
async fn serve_windows(
    args: &ColdReplayArgs,
    dir: &TempDir,
    data: &std::path::Path,
    filled: &Filled,
    variant: &Variant,
    runs: std::ops::RangeInclusive<usize>,
    start_seq: u64,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let (tx, sinks) = tokio::sync::mpsc::channel::<PubSink>(4);
    let upstream = start_upstream(tx).await?;
    let port = free_port()?;
    let binary = variant.sluice.as_ref().unwrap_or(&args.serve.sluice);
    let mut cmd = serve_command(binary, &upstream, port, data);
    let scan = args.scan_events_per_sec.to_string();
    cmd.args(SERVE_NO_LIMITS)
        .args(["--scan-events-per-sec", &scan])
        .args(["--scan-events-per-sec-per-ip", &scan])
        .args(&args.serve.serve_args)
        .args(&variant.args);
    let log = dir.0.join(format!("serve-{}.log", variant.name));
    let mut serve = ChildGuard::spawn("sluice serve", &mut cmd, Some(log))?;
    wait_tcp(port, &mut serve, 60).await?;

    let feed = Feed::ready_from(args.rate, args.seed.wrapping_add(1), args.dids, start_seq).await;
    let ctx = feed.ctx.clone();
    let live_url = sub_url(Target::Sluice(Wire::V1), port, None);
    let mut live = Vec::new();
    let mut live_tasks = Vec::new();
    for _ in 0..args.live {
        let spec = Arc::new(SubSpec {
            url: live_url.clone(),
            v2: false,
            compressed: false,
            dictionary: None,
            filter: None,
            stalls: false,
        });
        let conn = connect(&spec).await.context("live subscriber")?;
        let shared = Arc::new(SubShared::new());
        live.push(Arc::clone(&shared));
        live_tasks.push(tokio::spawn(run_sub(
            spec,
            conn,
            Arc::clone(&ctx.ctl),
            Arc::clone(&ctx.stamps),
            shared,
        )));
    }
    let publisher = feed.start(sinks, args.warmup).await;

    let mut results = Vec::new();
    let replay_url = format!(
        "ws://127.0.0.1:{port}/subscribe?cursor={}",
        filled.first_time_us
    );
    for run in runs {
        for with_replay in [false, true] {
            serve.check_alive()?;
            let ph = if with_replay { PH_STALL } else { PH_MEASURE };
            let _ = take_hist(&live, ph);
            let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
            let cpu0 = cpu_each(std::slice::from_ref(&serve))[0];
            let bench_cpu0 = self_cpu();
            let mut replayers_cpu_pct = 0.0;
            let t0 = Instant::now();
            let t0_ns = now_ns();
            ctx.ctl.phase.store(ph, Ordering::Relaxed);
            let mut replay_result = serde_json::Value::Null;
            if with_replay {
                let mut replayers = Replayers::spawn(
                    &replay_url,
                    filled.last_time_us,
                    args.replayers,
                    args.replay_procs,
                    args.replay_nice,
                    args.replay_idle,
                    &dir.0,
                )?;
                let cpu0 = replayers.cpu_secs();
                let deadline = t0 + Duration::from_secs(args.replay_secs);
                let mut progress = replayers.progress();
                while Instant::now() < deadline
                    && (progress.caught + progress.failed) < args.replayers as u64
                {
                    replayers.check_alive()?;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    progress = replayers.progress();
                }
                let window_ns = now_ns().saturating_sub(t0_ns);
                let replay_cpu = replayers.cpu_secs() - cpu0;
                drop(replayers);
                // All caught up: the time until the last did; else the whole window.
                let span_ns = if progress.caught == args.replayers as u64 {
                    progress.last_caught_ns.saturating_sub(t0_ns).max(1)
                } else {
                    window_ns
                };
                let secs = span_ns as f64 / 1e9;
                let (caught, failed, replayed, replayed_bytes) = (
                    progress.caught,
                    progress.failed,
                    progress.replayed,
                    progress.replayed_bytes,
                );
                replayers_cpu_pct = replay_cpu / (window_ns as f64 / 1e9) * 100.0;
                replay_result = json!({
                    "replayers": args.replayers,
                    "caught_up": caught,
                    "failed": failed,
                    "replayed_events": replayed,
                    "secs": secs,
                    "delivered_per_sec": replayed as f64 / secs,
                    "delivered_mib_per_sec": replayed_bytes as f64 / secs / f64::from(1 << 20),
                    "v1_bytes_per_event": replayed_bytes as f64 / replayed.max(1) as f64,
                    "per_replayer_per_sec": replayed as f64 / secs / args.replayers as f64,
                });
            } else {
                tokio::time::sleep(Duration::from_secs(args.duration)).await;
            }
            ctx.ctl.phase.store(PH_AFTER, Ordering::Relaxed);
            let secs = t0.elapsed().as_secs_f64();
            let cpu = cpu_each(std::slice::from_ref(&serve))[0] - cpu0;
            let bench_cpu = self_cpu() - bench_cpu0;
            let (hist, live_delivered) = take_hist(&live, ph);
            let r = json!({
                "variant": variant.name,
                "run": run,
                "secs": secs,
                "live_subscribers": args.live,
                "live_delivered_per_sec": live_delivered as f64 / secs,
                "live_p50_us": q(&hist, 0.5),
                "live_p99_us": q(&hist, 0.99),
                "live_max_us": hist.max,
                "live_timed": hist.n,
                "serve_cpu_pct": cpu / secs * 100.0,
                "replayers_cpu_pct": replayers_cpu_pct,
                "bench_cpu_pct": bench_cpu / secs * 100.0,
                "replay": replay_result,
                "with_replay": with_replay,
                "loadavg": load.trim(),
            });
            eprintln!(
                "  {} run {run} {}: live p50 {} us p99 {} us ({} timed), CPU serve {}% replayers {}% bench {}%{}; load {}",
                variant.name,
                if with_replay {
                    "WITH replay"
                } else {
                    "no replay"
                },
                f(&r["live_p50_us"]),
                f(&r["live_p99_us"]),
                f(&r["live_timed"]),
                f(&r["serve_cpu_pct"]),
                f(&r["replayers_cpu_pct"]),
                f(&r["bench_cpu_pct"]),
                if with_replay {
                    format!(
                        "; replayers {} caught up of {} ({} failed), delivered {} events/s ({} MiB/s, {} v1 B/event) over {} s",
                        f(&replay_result["caught_up"]),
                        args.replayers,
                        f(&replay_result["failed"]),
                        f(&replay_result["delivered_per_sec"]),
                        f(&replay_result["delivered_mib_per_sec"]),
                        f(&replay_result["v1_bytes_per_event"]),
                        f(&replay_result["secs"]),
                    )
                } else {
                    String::new()
                },
                load.trim()
            );
            results.push(r);
            // Let the replayers' connections close before the next window.
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }
    ctx.ctl.stop_publish.store(true, Ordering::Relaxed);
    let _ = tokio::time::timeout(Duration::from_secs(10), publisher).await;
    serve.check_alive()?;
    for t in live_tasks {
        t.abort();
    }
    drop(serve);
    Ok(results)
}

/// Prints the medians of `variant`'s windows.
fn summary(
    args: &ColdReplayArgs,
    filled: &Filled,
    variant: &str,
    results: &[serde_json::Value],
    runs: usize,
) {
    let pick = |with: bool, key: &dyn Fn(&serde_json::Value) -> Option<f64>| {
        median(
            results
                .iter()
                .filter(|r| r["variant"].as_str() == Some(variant))
                .filter(|r| r["with_replay"].as_bool() == Some(with))
                .filter_map(key)
                .collect(),
        )
    };
    let get = |key: &'static str| move |r: &serde_json::Value| r[key].as_f64();
    let delivered = pick(true, &|r: &serde_json::Value| {
        r["replay"]["delivered_per_sec"].as_f64()
    });
    let delivered_mib = pick(true, &|r: &serde_json::Value| {
        r["replay"]["delivered_mib_per_sec"].as_f64()
    });
    let bytes_per_event = pick(true, &|r: &serde_json::Value| {
        r["replay"]["v1_bytes_per_event"].as_f64()
    });
    let (p50_without, p50_with) = (
        pick(false, &get("live_p50_us")),
        pick(true, &get("live_p50_us")),
    );
    let (p99_without, p99_with) = (
        pick(false, &get("live_p99_us")),
        pick(true, &get("live_p99_us")),
    );
    println!(
        "\ncold-replay [{variant}]: {} stored {} events ({:.0} v1 B each) over {} s, {} replayers, live {} frames/s, {} runs (medians):\n  \
         replay delivered {:.0} events/s ({:.0} MiB/s, {:.0} v1 B per delivered event); live p50 {:.0} us without replay, {:.0} us with (ratio {:.2}); \
         live p99 {:.0} us without, {:.0} us with (ratio {:.2});\n  \
         CPU % without / with replay: serve {:.0} / {:.0}, replayers - / {:.0}, bench {:.0} / {:.0}",
        filled.events,
        filled.data,
        filled.v1_bytes_per_event(),
        args.span_secs,
        args.replayers,
        args.rate,
        runs,
        delivered,
        delivered_mib,
        bytes_per_event,
        p50_without,
        p50_with,
        p50_with / p50_without,
        p99_without,
        p99_with,
        p99_with / p99_without,
        pick(false, &get("serve_cpu_pct")),
        pick(true, &get("serve_cpu_pct")),
        pick(true, &get("replayers_cpu_pct")),
        pick(false, &get("bench_cpu_pct")),
        pick(true, &get("bench_cpu_pct")),
    );
}
