//! `sluice-bench redis-consumers`: Redis consumers of sluice's sink side by side with the
//! home-made pub/sub rebroadcaster sluice replaces, on the same paced upstream.
//!
//! Targets, alternating within each run (every target a child process on 127.0.0.1, fed by
//! the fan-out bench's in-process upstream and generator, so every target gets the same
//! frames at the same rate):
//! - `sink`: `sluice serve --redis-sink` and its redis-server (AOF on, `appendfsync
//!   everysec`); each consumer reads its streams with `XREAD BLOCK`, from the ids it saw
//!   last, reconnecting (and resuming from those ids) if Redis goes away.
//! - `rebroadcaster`: `sluice-bench redis-rebroadcast` (the upstream websocket, each frame
//!   decoded once to Jetstream v1 JSON by sluice's own decoder, one `PUBLISH` per event on
//!   the channel of its collection or kind) and its redis-server (no persistence: pub/sub
//!   keeps nothing); each consumer `SUBSCRIBE`s to the same names.
//! - `sink+outage` (with `--outage-secs N`): as `sink`, but redis-server is killed (SIGKILL)
//!   5 s into the measured window and started again N s later from its AOF.
//!   With `--pairs`, only `sink` and `sink+outage` alternate, so the websocket
//!   subscribers' p99 with the outage is compared with the same invocation's without it
//!   (whole window, and the window's tail from the restart moment on, which holds the
//!   catch-up); the sink's `/metrics` during the catch-up say its batches and where its
//!   time went (writes, waiting for the log, backoff).
//!
//! Stream keys and channels have the same names (`sluice:c:<collection>`,
//! `sluice:k:<kind>`); consumer i takes the same names on every target (the fan-out bench's
//! realistic mix: 1-3 of posts, likes, follows, or everything for one in ten). Latency =
//! consumer read instant − upstream send instant (the fan-out bench's send stamps, keyed by
//! commit DID and rev; each consumer stamps one delivery in `--consumer-sample`). The
//! consumers run in `--consumer-procs` processes of their own (`redis_readers.rs`), so
//! their reading is not the bench's; their CPU is reported apart. CPU per delivered event =
//! CPU of the target's processes (sluice or the rebroadcaster, plus redis-server) in the
//! measured window over the events consumers received in it. On the sink targets, `--ws-subscribers` Jetstream v2 websocket
//! subscribers of sluice are timed too, so an outage's effect on them shows against the run
//! without one. After the window the publisher stops and consumers drain (bounded); what a
//! consumer never received is counted as missing.
//!
//! Every loop is bounded: the publisher by the phase, the drain by `--drain-secs`, the
//! consumer processes by the target's run (killed after it), and the whole run by the
//! number of runs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use futures_util::StreamExt;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use sluice::event::StampState;
use sluice::ingest::{IngestOutcome, Ingestor};
use sluice::sink::{shape, RedisSinkConfig};

use crate::control::{PH_AFTER, PH_MEASURE, PH_STALL};
use crate::hist::Hist;
use crate::procs::{
    free_port, proc_cpu_secs, serve_command, wait_tcp, ChildGuard, ServeArgs, TempDir,
    SERVE_NO_LIMITS,
};
use crate::publisher::{start_upstream, Feed, PubCtx, PubSink};
use crate::redis_readers::{Readers, ReadersAt, Via};
use crate::report::{median, q};
use crate::resp::{publishing_conn, resp_command};
use crate::sink::SinkRedisArgs;
use crate::subscribers::{
    self as subscribers, delivered, filter_names, realistic_filter, run_sub, sub_url, SubShared,
    SubSpec,
};
use crate::target::{Target, Wire};

const PREFIX: &str = "sluice:";
/// The measured window's tail: from the moment the outage target restarts Redis (the same
/// moment on the `sink` target, with `--outage-secs`) to the window's end.
const TAIL: u8 = PH_STALL;
const ALL_COLLECTIONS: [&str; 6] = [
    "app.bsky.feed.like",
    "app.bsky.feed.post",
    "app.bsky.feed.repost",
    "app.bsky.graph.follow",
    "app.bsky.graph.block",
    "app.bsky.actor.profile",
];

#[derive(Parser, Clone)]
pub(crate) struct RedisConsumersArgs {
    #[command(flatten)]
    serve: ServeArgs,
    /// Upstream frames (about events) per second.
    #[arg(long, default_value_t = 2000)]
    rate: u32,
    /// Redis consumers per target.
    #[arg(long, default_value_t = 100)]
    consumers: usize,
    /// Processes the consumers are spread over (each one thread; their CPU is reported
    /// apart from the targets').
    #[arg(long, default_value_t = 4)]
    consumer_procs: usize,
    /// Niceness of the consumer processes (0 = the bench's): with 19 they stand in for
    /// consumers on other machines, taking only what sluice and Redis leave of the cores.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(i32).range(0..=19))]
    consumer_nice: i32,
    /// Each consumer stamps one delivery in this many (its latency sample).
    #[arg(long, default_value_t = 8)]
    consumer_sample: u64,
    /// Jetstream v2 websocket subscribers of sluice on the sink targets (timed).
    #[arg(long, default_value_t = 20)]
    ws_subscribers: usize,
    /// Measured window, seconds (after the warmup).
    #[arg(long, default_value_t = 20)]
    duration: u64,
    /// Seconds of traffic before the window.
    #[arg(long, default_value_t = 5)]
    warmup: u64,
    /// Most seconds consumers may take to receive what was sent, after the window.
    #[arg(long, default_value_t = 30)]
    drain_secs: u64,
    /// With N > 0, also the `sink+outage` target: redis-server killed 5 s into the window
    /// and started again N s later (the window must be longer than N + 10).
    #[arg(long, default_value_t = 0)]
    outage_secs: u64,
    /// Only the `sink+outage` target (the catch-up after an outage, measured alone).
    #[arg(long, default_value_t = false)]
    outage_only: bool,
    /// Only `sink` and `sink+outage`, alternating (needs --outage-secs): the same
    /// consumers and websocket subscribers with and without the outage, and the ratio of
    /// the subscribers' p99 in each run's pair.
    #[arg(long, default_value_t = false)]
    pairs: bool,
    /// Runs; targets alternate within each, the summary shows medians.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    #[command(flatten)]
    redis: SinkRedisArgs,
    /// Seed of the synthetic frames and of the consumers' mix.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// DID pool of the synthetic frames.
    #[arg(long, default_value_t = 2000)]
    dids: usize,
    /// Where temporary data dirs and child logs go.
    #[arg(long, default_value = "/tmp")]
    tmp: PathBuf,
}

#[derive(Parser, Clone)]
pub(crate) struct RebroadcastArgs {
    /// The upstream's websocket URL.
    #[arg(long)]
    upstream: String,
    /// Redis server, host:port.
    #[arg(long)]
    redis: SocketAddr,
    /// Prefix of the channels.
    #[arg(long, default_value = PREFIX)]
    prefix: String,
}

/// `sluice-bench redis-rebroadcast`: the home-made rebroadcaster, as its own process so its
/// CPU can be read. Each upstream frame is decoded once (sluice's decoder, so the
/// comparison is of the architecture, not of a decoder) and each event's v1 JSON is
/// PUBLISHed on its collection's (or kind's) channel, pipelined, flushed per frame.
pub(crate) async fn rebroadcast(args: RebroadcastArgs) -> anyhow::Result<()> {
    let mut w = publishing_conn(args.redis).await?;
    let (ws, _) = tokio_tungstenite::connect_async(args.upstream.as_str())
        .await
        .context("connecting to the upstream")?;
    let (_keep, mut source) = ws.split();
    let mut ingestor = Ingestor::new(StampState::fresh(), Default::default());
    let mut config = RedisSinkConfig::new("redis://127.0.0.1/0");
    config.prefix = args.prefix;
    while let Some(msg) = source.next().await {
        let Message::Binary(frame) = msg? else {
            continue;
        };
        if let IngestOutcome::Events(events) = ingestor.ingest(frame, sluice::clock::now_us()) {
            for event in &events {
                let Some(shaped) = shape(event, &config) else {
                    continue;
                };
                for entry in &shaped.entries {
                    let cmd = resp_command(&[b"PUBLISH", entry.key.as_bytes(), &shaped.json]);
                    w.write_all(&cmd).await?;
                }
            }
        }
        w.flush().await?;
    }
    Ok(())
}

/// The names consumer `i` reads (stream keys or channels).
fn consumer_keys(seed: u64, i: usize) -> (Option<u8>, Vec<String>) {
    let filter = realistic_filter(seed, i);
    let mut keys: Vec<String> = match filter {
        Some(f) => filter_names(f)
            .into_iter()
            .map(|c| format!("{PREFIX}c:{c}"))
            .collect(),
        None => ALL_COLLECTIONS
            .iter()
            .map(|c| format!("{PREFIX}c:{c}"))
            .chain(["identity", "account"].map(|k| format!("{PREFIX}k:{k}")))
            .collect(),
    };
    keys.sort();
    (filter, keys)
}

// ---------------------------------------------------------------------------------------
// Targets
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Sink,
    SinkOutage,
    Rebroadcaster,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Sink => "sink",
            Kind::SinkOutage => "sink+outage",
            Kind::Rebroadcaster => "rebroadcaster",
        }
    }
    fn sink(self) -> bool {
        matches!(self, Kind::Sink | Kind::SinkOutage)
    }
}

fn redis_command(
    args: &RedisConsumersArgs,
    kind: Kind,
    port: u16,
    dir: &std::path::Path,
) -> Command {
    let mut cmd = Command::new(&args.redis.redis_server);
    cmd.args(["--bind", "127.0.0.1", "--port", &port.to_string()])
        .args(["--save", "", "--daemonize", "no"]);
    if kind.sink() {
        cmd.args([
            "--appendonly",
            "yes",
            "--appendfsync",
            &args.redis.appendfsync,
        ]);
    } else {
        cmd.args(["--appendonly", "no"])
            .args(["--client-output-buffer-limit", "pubsub 256mb 64mb 60"]);
    }
    cmd.arg("--dir").arg(dir);
    cmd
}

/// A `/metrics` value of sluice's admin listener (plain HTTP/1.0 GET).
async fn metrics(admin: u16) -> Option<String> {
    let get = async {
        let mut s = TcpStream::connect(("127.0.0.1", admin)).await.ok()?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .await
            .ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        String::from_utf8(buf).ok()
    };
    tokio::time::timeout(Duration::from_secs(2), get)
        .await
        .ok()?
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Back to live: lag within half a second of traffic (the group commit alone holds up to
/// 100 ms of it).
fn live_lag(rate: f64) -> f64 {
    (rate * 0.5).max(500.0)
}

/// One `/metrics` sample while the sink catches up.
#[derive(Clone, Copy)]
struct Sample {
    /// Seconds since the outage ended.
    t: f64,
    lag: f64,
    /// Events written, transactions applied, and the sink's time (µs) in writes, waiting
    /// for the log and in backoff (`sluice_redis_sink_time_microseconds_total`).
    events: f64,
    batches: f64,
    write_us: f64,
    read_wait_us: f64,
    backoff_us: f64,
}

fn sample(m: &str, t: f64) -> Option<Sample> {
    let part = |p: &str| {
        metric(
            m,
            &format!("sluice_redis_sink_time_microseconds_total{{part=\"{p}\"}}"),
        )
        .unwrap_or(0.0)
    };
    Some(Sample {
        t,
        lag: metric(m, "sluice_redis_sink_lag_events")?,
        events: metric(m, "sluice_redis_sink_events_total")?,
        batches: metric(m, "sluice_redis_sink_batches_total").unwrap_or(0.0),
        write_us: part("write"),
        read_wait_us: part("read_wait"),
        backoff_us: part("backoff"),
    })
}

/// What the samples say about the catch-up: from the first write after the restart until
/// the lag is back to live, its rate, the sink's batches and where its time went.
fn catch_up(samples: &[Sample], rate: f64) -> serde_json::Value {
    let live = live_lag(rate);
    let first_write = samples
        .windows(2)
        .find(|w| w[1].events > w[0].events)
        .map(|w| w[0]);
    let caught = samples
        .iter()
        .skip_while(|s| first_write.is_none_or(|f| s.t <= f.t))
        .find(|s| s.lag <= live);
    let peak_lag = samples.iter().map(|s| s.lag).fold(0.0, f64::max);
    match (first_write, caught) {
        (Some(f), Some(c)) if c.t > f.t => {
            let secs = c.t - f.t;
            let batches = c.batches - f.batches;
            json!({
                "resume_delay_secs": f.t,
                "catch_up_secs": secs,
                "caught_up_events": c.events - f.events,
                "catch_up_events_per_sec": (c.events - f.events) / secs,
                "peak_lag_events": peak_lag,
                "batches": batches,
                "events_per_batch": (c.events - f.events) / batches.max(1.0),
                "share_write": (c.write_us - f.write_us) / 1e6 / secs,
                "share_read_wait": (c.read_wait_us - f.read_wait_us) / 1e6 / secs,
                "share_backoff": (c.backoff_us - f.backoff_us) / 1e6 / secs,
            })
        }
        _ => json!({"peak_lag_events": peak_lag, "caught_up": false}),
    }
}

async fn run_target(
    args: &RedisConsumersArgs,
    kind: Kind,
    run: usize,
) -> anyhow::Result<serde_json::Value> {
    eprintln!("== run {run}: {} ==", kind.name());
    let dir = args.tmp.join(format!(
        "sluice-bench-consumers-{}-{}-{run}",
        std::process::id(),
        kind.name().replace('+', "-")
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let dir = TempDir(dir);
    let rdir = dir.0.join("redis");
    std::fs::create_dir_all(&rdir)?;
    let rport = free_port()?;
    let mut redis = ChildGuard::spawn(
        "redis-server",
        &mut redis_command(args, kind, rport, &rdir),
        Some(dir.0.join("redis.log")),
    )?;
    wait_tcp(rport, &mut redis, 30).await?;

    let (tx, sinks) = tokio::sync::mpsc::channel::<PubSink>(4);
    let up_url = start_upstream(tx).await?;
    let (port, admin) = (free_port()?, free_port()?);
    let mut target = if kind.sink() {
        let mut cmd = serve_command(&args.serve.sluice, &up_url, port, &dir.0.join("data"));
        cmd.args(["--admin-listen", &format!("127.0.0.1:{admin}")])
            .args(SERVE_NO_LIMITS)
            .args(["--redis-sink", &format!("redis://127.0.0.1:{rport}/0")])
            .args(&args.serve.serve_args);
        let mut g = ChildGuard::spawn("sluice serve", &mut cmd, Some(dir.0.join("serve.log")))?;
        wait_tcp(port, &mut g, 30).await?;
        g
    } else {
        let exe = std::env::current_exe()?;
        let mut cmd = Command::new(exe);
        cmd.arg("redis-rebroadcast")
            .args(["--upstream", &up_url])
            .args(["--redis", &format!("127.0.0.1:{rport}")]);
        ChildGuard::spawn(
            "redis-rebroadcast",
            &mut cmd,
            Some(dir.0.join("rebroadcast.log")),
        )?
    };

    let feed = Feed::ready(args.rate, args.seed, args.dids).await;
    let PubCtx {
        rate,
        ctl,
        stamps,
        tallies,
    } = feed.ctx.clone();

    // Consumers (their own processes), then the websocket subscribers (sink targets).
    let mut filters = Vec::new();
    let mut keys = Vec::new();
    for i in 0..args.consumers {
        let (filter, k) = consumer_keys(args.seed, i);
        filters.push(filter);
        keys.push(k);
    }
    let mut readers = Readers::spawn(
        rport,
        if kind.sink() {
            Via::Streams
        } else {
            Via::PubSub
        },
        &keys,
        ReadersAt {
            procs: args.consumer_procs,
            sample: args.consumer_sample,
            log_dir: &dir.0,
            nice: args.consumer_nice,
        },
        Arc::clone(&ctl),
        Arc::clone(&stamps),
    )?;
    let mut tasks = Vec::new();
    let mut ws_subs = Vec::new();
    if kind.sink() {
        for i in 0..args.ws_subscribers {
            let filter = realistic_filter(args.seed.wrapping_add(7), i);
            let spec = Arc::new(SubSpec {
                url: sub_url(Target::Sluice(Wire::V2), port, filter),
                v2: true,
                compressed: false,
                dictionary: None,
                filter,
                stalls: false,
            });
            let ws = subscribers::connect(&spec)
                .await
                .context("websocket subscriber")?;
            let me = Arc::new(SubShared::new());
            ws_subs.push(Arc::clone(&me));
            tasks.push(tokio::spawn(run_sub(
                spec,
                ws,
                Arc::clone(&ctl),
                Arc::clone(&stamps),
                me,
            )));
        }
    }
    let connect_deadline = Instant::now() + Duration::from_secs(30);
    while readers.snapshot().await?.connected < args.consumers as u64 {
        readers.check_alive()?;
        if Instant::now() > connect_deadline {
            bail!("consumers did not connect to redis-server within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    target.check_alive()?;

    let publisher = feed.start(sinks, args.warmup).await;

    let cpu = |pid: u32| proc_cpu_secs(pid).unwrap_or(0.0);
    let (t_cpu0, mut r_cpu0) = (cpu(target.pid()), cpu(redis.pid()));
    let mut redis_cpu_acc = 0.0;
    let c_cpu0 = readers.cpu_secs();
    let at_start = readers.snapshot().await?.totals.iter().sum::<u64>();
    ctl.phase.store(PH_MEASURE, Ordering::Relaxed);
    let t0 = Instant::now();
    let window = Duration::from_secs(args.duration);
    let mut outage = serde_json::Value::Null;
    let mut catch_up_samples = None;
    if kind == Kind::SinkOutage {
        let at = Duration::from_secs(5);
        tokio::time::sleep(at).await;
        redis_cpu_acc += cpu(redis.pid()) - r_cpu0;
        drop(redis); // SIGKILL, reaped
        eprintln!(
            "  redis-server killed; restarting in {} s",
            args.outage_secs
        );
        let mut lag_at_restart = 0.0;
        let restart_at = Instant::now() + Duration::from_secs(args.outage_secs);
        while Instant::now() < restart_at {
            if let Some(lag) = metrics(admin)
                .await
                .and_then(|m| metric(&m, "sluice_redis_sink_lag_events"))
            {
                lag_at_restart = lag;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        redis = ChildGuard::spawn(
            "redis-server",
            &mut redis_command(args, kind, rport, &rdir),
            Some(dir.0.join("redis-2.log")),
        )?;
        let restarted = Instant::now();
        // From here on latencies go to the window's tail (the catch-up's part of it).
        ctl.phase.store(TAIL, Ordering::Relaxed);
        r_cpu0 = 0.0;
        wait_tcp(rport, &mut redis, 30).await?;
        // Sampled until the sink is back to live (not only within the window: on a loaded
        // machine the catch-up can outlast it), bounded by the window and the drain.
        let live = live_lag(rate);
        let until = t0 + window + Duration::from_secs(args.drain_secs);
        let sampler = tokio::spawn(async move {
            let mut samples: Vec<Sample> = Vec::new();
            while Instant::now() < until {
                if let Some(s) = metrics(admin)
                    .await
                    .and_then(|m| sample(&m, restarted.elapsed().as_secs_f64()))
                {
                    let wrote = samples.first().is_some_and(|f| s.events > f.events);
                    samples.push(s);
                    if wrote && s.lag <= live {
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            samples
        });
        tokio::time::sleep_until((t0 + window).into()).await;
        catch_up_samples = Some(sampler);
        outage = json!({
            "lag_at_restart_events": lag_at_restart,
            "outage_secs": args.outage_secs,
        });
    } else {
        if args.outage_secs > 0 {
            // The same split as the outage target's: the tail starts when its Redis
            // would be restarted.
            tokio::time::sleep(Duration::from_secs(5 + args.outage_secs)).await;
            ctl.phase.store(TAIL, Ordering::Relaxed);
        }
        tokio::time::sleep_until((t0 + window).into()).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    let target_cpu = cpu(target.pid()) - t_cpu0;
    let redis_cpu = redis_cpu_acc + cpu(redis.pid()) - r_cpu0;
    let consumers_cpu = readers.cpu_secs() - c_cpu0;
    let got = readers
        .snapshot()
        .await?
        .totals
        .iter()
        .sum::<u64>()
        .saturating_sub(at_start);
    ctl.phase.store(PH_AFTER, Ordering::Relaxed);
    ctl.stop_publish.store(true, Ordering::Relaxed);
    let pub_stats = publisher.await.context("publisher")?;

    // Drain: every consumer should end with what it was sent.
    let expected: Vec<u64> = filters
        .iter()
        .map(|f| {
            tallies
                .iter()
                .map(|t| {
                    // The v1 wire sends identity and account events to every subscriber;
                    // a consumer with a filter reads only its collections' streams.
                    let kinds =
                        t.identity.load(Ordering::Relaxed) + t.account.load(Ordering::Relaxed);
                    let v1 = t.expected(Target::Sluice(Wire::V1), *f);
                    if f.is_some() {
                        v1.saturating_sub(kinds)
                    } else {
                        v1
                    }
                })
                .sum()
        })
        .collect();
    let drain_deadline = Instant::now() + Duration::from_secs(args.drain_secs);
    let mut last = readers.snapshot().await?;
    while Instant::now() < drain_deadline && last.totals.iter().zip(&expected).any(|(t, e)| t < e) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        last = readers.snapshot().await?;
    }
    if let Some(sampler) = catch_up_samples {
        let samples = sampler.await.unwrap_or_default();
        let mut c = catch_up(&samples, rate);
        if let (Some(o), Some(c)) = (outage.as_object_mut(), c.as_object_mut()) {
            o.append(c);
        }
    }
    let missing: u64 = last
        .totals
        .iter()
        .zip(&expected)
        .map(|(t, e)| e.saturating_sub(*t))
        .sum();
    let extra: u64 = last
        .totals
        .iter()
        .zip(&expected)
        .map(|(t, e)| t.saturating_sub(*e))
        .sum();
    if std::env::var_os("SLUICE_BENCH_DEBUG").is_some() {
        for ((t, e), f) in last.totals.iter().zip(&expected).zip(&filters) {
            eprintln!("  consumer {f:?}: expected {e}, got {t}");
        }
    }
    let mut hist = readers.hist.lock()[PH_MEASURE as usize].clone();
    hist.merge(&readers.hist.lock()[TAIL as usize]);
    let (mut ws_hist, mut ws_tail) = (Hist::new(), Hist::new());
    for s in &ws_subs {
        let h = s.hist.lock();
        ws_hist.merge(&h[PH_MEASURE as usize]);
        ws_hist.merge(&h[TAIL as usize]);
        ws_tail.merge(&h[TAIL as usize]);
    }
    let unmatched = readers.unmatched.load(Ordering::Relaxed);
    let ws_ended = ws_subs
        .iter()
        .filter(|s| s.ended.load(Ordering::Relaxed))
        .count();
    for t in tasks {
        t.abort();
    }
    let r = json!({
        "run": run,
        "target": kind.name(),
        "rate": args.rate,
        "consumers": args.consumers,
        "consumer_nice": args.consumer_nice,
        "window_secs": secs,
        "frames_sent": pub_stats.sent,
        "delivered_in_window": got,
        "delivered_per_sec": got as f64 / secs,
        "target_cpu_secs": target_cpu,
        "redis_cpu_secs": redis_cpu,
        "cpu_us_per_delivered": (target_cpu + redis_cpu) * 1e6 / got.max(1) as f64,
        "consumers_cpu_secs": consumers_cpu,
        "consumers_cpu_us_per_delivered": consumers_cpu * 1e6 / got.max(1) as f64,
        "target_cpu_us_per_delivered": target_cpu * 1e6 / got.max(1) as f64,
        "redis_cpu_us_per_delivered": redis_cpu * 1e6 / got.max(1) as f64,
        "p50_us": q(&hist, 0.5),
        "p99_us": q(&hist, 0.99),
        "p999_us": q(&hist, 0.999),
        "max_us": hist.max,
        "timed": hist.n,
        "unmatched": unmatched,
        "missing_after_drain": missing,
        "extra": extra,
        "consumer_reconnects": last.reconnects,
        "ws_subscribers": ws_subs.len(),
        "ws_p50_us": q(&ws_hist, 0.5),
        "ws_p99_us": q(&ws_hist, 0.99),
        "ws_max_us": ws_hist.max,
        "ws_tail_p50_us": q(&ws_tail, 0.5),
        "ws_tail_p99_us": q(&ws_tail, 0.99),
        "ws_tail_timed": ws_tail.n,
        "ws_delivered_in_window": delivered(&ws_subs, PH_MEASURE) + delivered(&ws_subs, TAIL),
        "ws_ended": ws_ended,
        "outage": outage,
        "load_avg_1m": load_avg(),
    });
    eprintln!("  {r}");
    drop(target);
    drop(redis);
    Ok(r)
}

fn load_avg() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

pub(crate) async fn redis_consumers(args: RedisConsumersArgs) -> anyhow::Result<()> {
    if args.outage_secs > 0 && args.duration < args.outage_secs + 10 {
        bail!("--duration must be at least --outage-secs + 10 (the outage starts 5 s in)");
    }
    let mut kinds = vec![Kind::Sink, Kind::Rebroadcaster];
    if args.outage_secs > 0 {
        kinds.push(Kind::SinkOutage);
    }
    if args.outage_only || args.pairs {
        if args.outage_secs == 0 {
            bail!("--outage-only and --pairs need --outage-secs");
        }
        kinds = if args.pairs {
            vec![Kind::Sink, Kind::SinkOutage]
        } else {
            vec![Kind::SinkOutage]
        };
    }
    let mut results = Vec::new();
    for run in 0..args.runs {
        // Alternate the order too, so neither target always runs first.
        let order: Vec<Kind> = if run % 2 == 0 {
            kinds.clone()
        } else {
            kinds.iter().rev().copied().collect()
        };
        for kind in order {
            results.push(run_target(&args, kind, run).await?);
        }
    }
    let mut summary = Vec::new();
    for kind in &kinds {
        let of = |field: &str| {
            median(
                results
                    .iter()
                    .filter(|r| r["target"] == kind.name())
                    .filter_map(|r| r[field].as_f64())
                    .collect(),
            )
        };
        let mut s = json!({
            "target": kind.name(),
            "median_delivered_per_sec": of("delivered_per_sec"),
            "median_cpu_us_per_delivered": of("cpu_us_per_delivered"),
            "median_target_cpu_us_per_delivered": of("target_cpu_us_per_delivered"),
            "median_redis_cpu_us_per_delivered": of("redis_cpu_us_per_delivered"),
            "median_consumers_cpu_us_per_delivered": of("consumers_cpu_us_per_delivered"),
            "median_p50_us": of("p50_us"),
            "median_p99_us": of("p99_us"),
            "median_ws_p99_us": of("ws_p99_us"),
            "median_ws_tail_p99_us": of("ws_tail_p99_us"),
            "missing_after_drain": results.iter().filter(|r| r["target"] == kind.name()).map(|r| r["missing_after_drain"].as_u64().unwrap_or(0)).sum::<u64>(),
        });
        if *kind == Kind::SinkOutage {
            s["median_catch_up_events_per_sec"] = json!(median(
                results
                    .iter()
                    .filter(|r| r["target"] == kind.name())
                    .filter_map(|r| r["outage"]["catch_up_events_per_sec"].as_f64())
                    .collect()
            ));
        }
        summary.push(s);
    }
    // Each run's websocket p99 with the outage over the one without (whole window, and
    // the tail from the restart on).
    let ratios = |field: &str| -> Vec<f64> {
        (0..args.runs)
            .filter_map(|run| {
                let p99 = |kind: Kind| {
                    results
                        .iter()
                        .find(|r| r["run"] == run && r["target"] == kind.name())
                        .and_then(|r| r[field].as_f64())
                };
                Some(p99(Kind::SinkOutage)? / p99(Kind::Sink)?)
            })
            .collect()
    };
    let (whole, tail) = (ratios("ws_p99_us"), ratios("ws_tail_p99_us"));
    let pairs = json!({
        "ws_p99_ratio_outage_over_none": whole,
        "median_ratio": median(whole.clone()),
        "ws_tail_p99_ratio_outage_over_none": tail,
        "median_tail_ratio": median(tail.clone()),
    });
    println!(
        "{}",
        serde_json::to_string_pretty(
            &json!({"runs": results, "summary": summary, "ws_p99_pairs": pairs})
        )
        .context("summary")?
    );
    Ok(())
}
