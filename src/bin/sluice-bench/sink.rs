//! `sluice-bench redis-sink`: throughput of the Redis sink into a local `redis-server`.
//!
//! The bench fills an event log with synthetic events (decoded, stamped and encoded as
//! ingest does), then, per run, starts a fresh `redis-server` child and the sink from
//! position 0 in this process, and times it until its position reaches the log's newest
//! event. Reported per run: events/s, this process's CPU per sunk event (the sink: log
//! reads, shaping, Redis protocol) and redis-server's CPU per event. This is the catch-up
//! case (Redis back after an outage, or a first start), which is also the sink's
//! sustained ceiling: live traffic only ever asks for less.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Parser;
use serde_json::json;

use sluice::event::StampState;
use sluice::ingest::{IngestOutcome, Ingestor};
use sluice::log::{Log, LogConfig};
use sluice::sink::RedisSinkConfig;
use sluice::upstream::synth::{Synth, SynthOptions};

use crate::procs::{free_port, proc_cpu_secs, self_cpu, wait_tcp, ChildGuard, TempDir};
use crate::report::median;

/// The redis-server a sink bench starts for itself, the AOF on.
#[derive(clap::Args, Clone)]
pub(crate) struct SinkRedisArgs {
    /// appendfsync of the sink's redis-server (the AOF is on): always, everysec or no.
    #[arg(long, default_value = "everysec")]
    pub(crate) appendfsync: String,
    /// The redis-server binary.
    #[arg(long, default_value = "redis-server")]
    pub(crate) redis_server: String,
}

impl SinkRedisArgs {
    /// Starts a redis-server on a free port with its files and log in `dir`, and waits
    /// until it listens.
    async fn start(&self, dir: &Path) -> anyhow::Result<(ChildGuard, u16)> {
        let port = free_port()?;
        let mut cmd = Command::new(&self.redis_server);
        cmd.args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "yes"])
            .args(["--appendfsync", &self.appendfsync])
            .arg("--dir")
            .arg(dir);
        let mut redis = ChildGuard::spawn("redis-server", &mut cmd, Some(dir.join("redis.log")))?;
        wait_tcp(port, &mut redis, 30).await?;
        Ok((redis, port))
    }
}

#[derive(Parser, Clone)]
pub struct RedisSinkArgs {
    /// Events in the log the sink writes out in each run.
    #[arg(long, default_value_t = 300_000)]
    events: usize,
    /// Runs per variant; variants alternate within each run, the summary shows medians.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Events per write (--redis-sink-batch-events).
    #[arg(long, default_value_t = 2000)]
    batch_events: usize,
    #[command(flatten)]
    redis: SinkRedisArgs,
    #[command(flatten)]
    run: SinkRunArgs,
}

/// What the two sink benches run on: the synthetic frames and a place for their files.
#[derive(clap::Args, Clone)]
struct SinkRunArgs {
    /// Seed of the synthetic frames.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Directory for the log and redis-server's files (a subdirectory, removed after).
    #[arg(long, default_value = "/tmp")]
    tmp: std::path::PathBuf,
}

impl SinkRunArgs {
    fn temp_dir(&self, tag: &str) -> anyhow::Result<TempDir> {
        TempDir::fresh(&self.tmp, &format!("sink-{tag}"))
    }
}

pub async fn redis_sink(args: RedisSinkArgs) -> anyhow::Result<()> {
    let dir = args.run.temp_dir("log")?;
    eprintln!("filling a log with {} synthetic events", args.events);
    let (log, _) =
        Log::open(LogConfig::new(dir.0.join("log"))).map_err(|e| anyhow::anyhow!("log: {e}"))?;
    let mut ingestor = Ingestor::new(StampState::fresh(), Default::default());
    let synth = Synth::new(&SynthOptions {
        seed: args.run.seed,
        count: args.events,
        ..SynthOptions::default()
    });
    let mut appended = 0usize;
    for frame in synth {
        let received = sluice::clock::now_us();
        if let IngestOutcome::Events(events) = ingestor.ingest(Bytes::from(frame), received) {
            appended += events.len();
            log.append(events)
                .map_err(|e| anyhow::anyhow!("append: {e}"))?;
        }
        if appended >= args.events {
            break;
        }
    }
    if !log.flush(Duration::from_secs(120)) {
        bail!("the log did not become durable");
    }
    let reader = log.reader();
    let newest = reader.durable_seq();
    eprintln!("log holds {newest} events");
    let variants: [(&str, bool); 2] = [("collection+kind streams", false), ("+ all stream", true)];
    let mut results: Vec<serde_json::Value> = Vec::new();
    for run in 0..args.runs {
        for &(name, all) in &variants {
            let rdir = args.run.temp_dir(&format!("redis-{run}-{all}"))?;
            let (redis, port) = args.redis.start(&rdir.0).await?;
            let mut config = RedisSinkConfig::new(format!("redis://127.0.0.1:{port}/0"));
            config.all_stream = all;
            config.batch_max_events = args.batch_events;
            config.max_age = None; // the synthetic events span minutes; nothing to age out
            let (cpu0, rcpu0, t0) = (self_cpu(), proc_cpu_secs(redis.pid()), Instant::now());
            let sink = sluice::sink::start(reader.clone(), config)
                .map_err(|e| anyhow::anyhow!("sink: {e}"))?;
            let deadline = t0 + Duration::from_secs(600);
            while sink.stats.position.load(Ordering::Relaxed) < newest {
                if Instant::now() > deadline {
                    bail!("the sink did not finish within 600 s");
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let secs = t0.elapsed().as_secs_f64();
            let cpu = self_cpu() - cpu0;
            let rcpu = proc_cpu_secs(redis.pid())
                .zip(rcpu0)
                .map_or(f64::NAN, |(b, a)| b - a);
            let entries = sink.stats.entries.load(Ordering::Relaxed);
            sink.shutdown(Duration::from_secs(5)).await;
            let eps = newest as f64 / secs;
            let r = json!({
                "run": run, "variant": name, "events": newest, "entries": entries,
                "seconds": secs, "events_per_sec": eps,
                "sink_cpu_us_per_event": cpu * 1e6 / newest as f64,
                "redis_cpu_us_per_event": rcpu * 1e6 / newest as f64,
            });
            eprintln!("{r}");
            results.push(r);
            drop(redis);
        }
    }
    let mut summary = Vec::new();
    for &(name, _) in &variants {
        let of = |field: &str| {
            median(
                results
                    .iter()
                    .filter(|r| r["variant"] == name)
                    .filter_map(|r| r[field].as_f64())
                    .collect(),
            )
        };
        summary.push(json!({
            "variant": name,
            "median_events_per_sec": of("events_per_sec"),
            "median_sink_cpu_us_per_event": of("sink_cpu_us_per_event"),
            "median_redis_cpu_us_per_event": of("redis_cpu_us_per_event"),
        }));
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&json!({"runs": results, "summary": summary}))
            .context("summary")?
    );
    log.close().map_err(|e| anyhow::anyhow!("close: {e}"))?;
    Ok(())
}

#[derive(Parser, Clone)]
pub struct RedisSinkMemoryArgs {
    /// Events appended to the log per second (live traffic peaks near 2,000).
    #[arg(long, default_value_t = 2000)]
    rate: u64,
    /// Length of the run, seconds.
    #[arg(long, default_value_t = 300)]
    duration: u64,
    /// Seconds between samples of redis-server's `INFO memory`.
    #[arg(long, default_value_t = 10)]
    interval: u64,
    /// --redis-sink-max-len of the run (0 = no length bound).
    #[arg(long, default_value_t = 50_000)]
    max_len: u64,
    /// --redis-sink-max-age-secs of the run (0 = no age bound). The synthetic events'
    /// source times advance 1-4 ms per frame, faster than the wall clock at this rate.
    #[arg(long, default_value_t = 0)]
    max_age_secs: u64,
    /// Also the `<prefix>all` stream.
    #[arg(long, default_value_t = false)]
    all: bool,
    #[command(flatten)]
    redis: SinkRedisArgs,
    #[command(flatten)]
    run: SinkRunArgs,
}

/// `INFO memory` fields, in bytes.
fn info_field(info: &str, name: &str) -> Option<u64> {
    info.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|v| v.trim().parse().ok())
}

/// `sluice-bench redis-sink-memory`: the sink live at `--rate` events/s for `--duration`
/// seconds into a fresh redis-server, sampling its memory every `--interval` seconds: with
/// the trimming bounds set, Redis memory must level off and stay flat.
pub async fn redis_sink_memory(args: RedisSinkMemoryArgs) -> anyhow::Result<()> {
    let dir = args.run.temp_dir("mem")?;
    let (log, _) =
        Log::open(LogConfig::new(dir.0.join("log"))).map_err(|e| anyhow::anyhow!("log: {e}"))?;
    let (redis, port) = args.redis.start(&dir.0).await?;
    let url = format!("redis://127.0.0.1:{port}/0");
    let mut con = redis::Client::open(url.as_str())?
        .get_multiplexed_async_connection()
        .await?;
    let mut config = RedisSinkConfig::new(url);
    config.all_stream = args.all;
    config.max_len = args.max_len;
    config.max_age = (args.max_age_secs > 0).then(|| Duration::from_secs(args.max_age_secs));
    let sink = sluice::sink::start(log.reader(), config).map_err(|e| anyhow::anyhow!("{e}"))?;
    let total = usize::try_from(args.rate * args.duration)?;
    let mut frames = Synth::new(&SynthOptions {
        seed: args.run.seed,
        count: total + 1000,
        ..SynthOptions::default()
    });
    let mut ingestor = Ingestor::new(StampState::fresh(), Default::default());
    let (cpu0, rcpu0, t0) = (self_cpu(), proc_cpu_secs(redis.pid()), Instant::now());
    let mut appended = 0usize;
    let mut samples: Vec<serde_json::Value> = Vec::new();
    let mut next_sample = Duration::ZERO;
    let end = Duration::from_secs(args.duration);
    loop {
        let elapsed = t0.elapsed();
        if elapsed >= next_sample {
            let info: String = redis::cmd("INFO")
                .arg("memory")
                .query_async(&mut con)
                .await?;
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg("sluice:*")
                .query_async(&mut con)
                .await?;
            let mut entries = 0u64;
            for key in keys.iter().filter(|k| k.as_str() != "sluice:sink") {
                let n: u64 = redis::cmd("XLEN").arg(key).query_async(&mut con).await?;
                entries += n;
            }
            let s = json!({
                "t_s": elapsed.as_secs(),
                "appended": appended,
                "sunk": sink.stats.position.load(Ordering::Relaxed),
                "stream_entries": entries,
                "used_memory": info_field(&info, "used_memory"),
                "used_memory_rss": info_field(&info, "used_memory_rss"),
            });
            eprintln!("{s}");
            samples.push(s);
            if elapsed >= end {
                break;
            }
            next_sample += Duration::from_secs(args.interval.max(1));
        }
        // Append what is due by now (paced in 10 ms steps).
        let due = usize::try_from(u128::from(args.rate) * elapsed.as_millis() / 1000)?.min(total);
        let mut batch = Vec::new();
        while appended + batch.len() < due {
            let Some(frame) = frames.next() else { break };
            if let IngestOutcome::Events(events) =
                ingestor.ingest(Bytes::from(frame), sluice::clock::now_us())
            {
                batch.extend(events);
            }
        }
        appended += batch.len();
        if !batch.is_empty() {
            log.append(batch)
                .map_err(|e| anyhow::anyhow!("append: {e}"))?;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    let sunk = sink.stats.position.load(Ordering::Relaxed);
    let cpu = self_cpu() - cpu0;
    let rcpu = proc_cpu_secs(redis.pid())
        .zip(rcpu0)
        .map_or(f64::NAN, |(b, a)| b - a);
    sink.shutdown(Duration::from_secs(5)).await;
    let used: Vec<f64> = samples
        .iter()
        .filter_map(|s| s["used_memory"].as_f64())
        .collect();
    let second_half = &used[used.len() / 2..];
    let summary = json!({
        "rate": args.rate, "seconds": secs, "appended": appended, "sunk": sunk,
        "max_len": args.max_len, "max_age_secs": args.max_age_secs, "all": args.all,
        "used_memory_max": used.iter().copied().fold(0.0, f64::max),
        "used_memory_second_half_min": second_half.iter().copied().fold(f64::INFINITY, f64::min),
        "used_memory_second_half_max": second_half.iter().copied().fold(0.0, f64::max),
        "used_memory_last": used.last(),
        "process_cpu_us_per_event": cpu * 1e6 / appended.max(1) as f64,
        "redis_cpu_us_per_event": rcpu * 1e6 / appended.max(1) as f64,
    });
    println!(
        "{}",
        serde_json::to_string_pretty(&json!({"samples": samples, "summary": summary}))
            .context("summary")?
    );
    drop(redis);
    log.close().map_err(|e| anyhow::anyhow!("close: {e}"))?;
    Ok(())
}
