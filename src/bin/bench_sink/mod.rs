//! `sluice-bench redis-sink`: throughput of the Redis sink into a local `redis-server`.
//!
//! The bench fills an event log with synthetic events (decoded, stamped and encoded as
//! ingest does), then, per run, starts a fresh `redis-server` child and the sink from
//! position 0 in this process, and times it until its position reaches the log's newest
//! event. Reported per run: events/s, this process's CPU per sunk event (the sink: log
//! reads, shaping, Redis protocol) and redis-server's CPU per event. This is the catch-up
//! case (Redis back after an outage, or a first start), which is also the sink's
//! sustained ceiling: live traffic only ever asks for less.

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

use super::{free_port, proc_cpu_secs, self_cpu, wait_tcp, ChildGuard, TempDir};

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
    /// redis-server's appendfsync (the AOF is on): always, everysec or no.
    #[arg(long, default_value = "everysec")]
    appendfsync: String,
    /// The redis-server binary.
    #[arg(long, default_value = "redis-server")]
    redis_server: String,
    /// Seed of the synthetic frames.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Directory for the log and redis-server's files (a subdirectory, removed after).
    #[arg(long, default_value = "/tmp")]
    tmp: std::path::PathBuf,
}

fn temp_dir(base: &std::path::Path, tag: &str) -> anyhow::Result<TempDir> {
    let dir = base.join(format!("sluice-bench-sink-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(TempDir(dir))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

pub async fn redis_sink(args: RedisSinkArgs) -> anyhow::Result<()> {
    let dir = temp_dir(&args.tmp, "log")?;
    eprintln!("filling a log with {} synthetic events", args.events);
    let (log, _) =
        Log::open(LogConfig::new(dir.0.join("log"))).map_err(|e| anyhow::anyhow!("log: {e}"))?;
    let mut ingestor = Ingestor::new(StampState::fresh(), Default::default());
    let synth = Synth::new(&SynthOptions {
        seed: args.seed,
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
            let rdir = temp_dir(&args.tmp, &format!("redis-{run}-{all}"))?;
            let port = free_port()?;
            let mut cmd = Command::new(&args.redis_server);
            cmd.args(["--bind", "127.0.0.1", "--port", &port.to_string()])
                .args(["--save", "", "--appendonly", "yes"])
                .args(["--appendfsync", &args.appendfsync])
                .arg("--dir")
                .arg(&rdir.0);
            let mut redis =
                ChildGuard::spawn("redis-server", &mut cmd, Some(rdir.0.join("redis.log")))?;
            wait_tcp(port, &mut redis, 30).await?;
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
