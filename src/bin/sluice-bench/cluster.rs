//! `sluice-bench cluster-append` and `sluice-bench cluster-failover`: the cluster's
//! benchmarks against a real `redis-server` (AOF on, `appendfsync always`) on 127.0.0.1.
//!
//! - `cluster-append` drives the leader's appender (`cluster::append::run`: batches of
//!   what is queued, encoded one ahead of the fenced append in flight) with stamped events
//!   of the real corpus or synthetic frames queued as fast as it takes them, for several
//!   batch bounds and zstd levels, and reports events/s, entry bytes per event, CPU and
//!   Redis memory per event.
//! - `cluster-failover` runs N `sluice serve --redis` nodes fed by a looped, paced
//!   upstream; one live v2 subscriber per node records when each event arrives. The
//!   leader is SIGKILLed (or SIGTERMed, for handovers) at random moments and restarted as
//!   a standby; a takeover's time is the longest silence a surviving node's subscriber saw
//!   around it (last event before to first event after).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Parser;
use futures_util::StreamExt;
use parking_lot::Mutex;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use sluice::cluster::append::{self as cluster_append, TermCtl};
use sluice::cluster::link::{Acquire, Keys, Link};
use sluice::cluster::{ClusterConfig, ClusterShared};
use sluice::event::{Event, StampState};
use sluice::ingest::{IngestOutcome, Ingestor};
use std::sync::atomic::Ordering;

/// The redis-server a cluster bench starts for itself, on a free port in a temp dir.
#[derive(clap::Args, Clone)]
pub struct RedisServerArgs {
    /// redis-server binary.
    #[arg(long, default_value = "redis-server")]
    pub redis_server: String,
    /// Extra redis-server arguments, e.g. `--redis-arg=--rdbcompression --redis-arg=no`.
    #[arg(long, allow_hyphen_values = true)]
    pub redis_arg: Vec<String>,
}

impl RedisServerArgs {
    fn start(&self, dir: &std::path::Path) -> anyhow::Result<(Proc, u16)> {
        start_redis(&self.redis_server, dir, &self.redis_arg)
    }
}

#[derive(Parser, Clone)]
pub struct AppendArgs {
    #[command(flatten)]
    pub redis: RedisServerArgs,
    /// Events appended per configuration.
    #[arg(long, default_value_t = 200_000)]
    pub events: usize,
    /// `corpus` (the real frames in ../shared/fixtures-upstream, looped) or `synth`.
    #[arg(long, default_value = "corpus")]
    pub source: String,
    /// Most events per append (one stream entry; the appender takes what is queued up to
    /// it); 0 = one frame per entry.
    #[arg(long, value_delimiter = ',', default_value = "0,100,1000,5000")]
    pub batch: Vec<usize>,
    /// zstd levels of entries.
    #[arg(long, value_delimiter = ',', default_value = "-3")]
    pub level: Vec<i32>,
    /// Appends in flight at once (`--cluster-append-in-flight`).
    #[arg(long, value_delimiter = ',', default_value = "4")]
    pub in_flight: Vec<usize>,
    /// Rounds over every configuration, alternating (medians are taken over rounds).
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// Where redis-server keeps its AOF.
    #[arg(long, default_value = "/tmp")]
    pub tmp: PathBuf,
}

#[derive(Parser, Clone)]
pub struct FailoverArgs {
    /// The sluice binary.
    #[arg(long, default_value = "target/release/sluice")]
    pub sluice: PathBuf,
    #[command(flatten)]
    pub redis: RedisServerArgs,
    /// Nodes in the cluster.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Leader SIGKILLs.
    #[arg(long, default_value_t = 20)]
    pub kills: usize,
    /// Graceful handovers (SIGTERM of the leader).
    #[arg(long, default_value_t = 5)]
    pub handovers: usize,
    /// Upstream frames per second.
    #[arg(long, default_value_t = 2000)]
    pub rate: u32,
    /// `--lease-ttl-ms` of the nodes.
    #[arg(long, default_value_t = 3000)]
    pub lease_ttl_ms: u64,
    /// `--standby-poll-ms` of the nodes.
    #[arg(long, default_value_t = 250)]
    pub standby_poll_ms: u64,
    #[arg(long, default_value = "/tmp")]
    pub tmp: PathBuf,
}

/// A child process killed when dropped.
struct Proc(Option<Child>);

impl Proc {
    fn pid(&self) -> u32 {
        self.0.as_ref().map_or(0, |c| c.id())
    }
    fn kill9(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
    fn term(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.0.take() {
            Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status()?;
            c.wait()?;
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn start_redis(bin: &str, dir: &std::path::Path, extra: &[String]) -> anyhow::Result<(Proc, u16)> {
    std::fs::create_dir_all(dir)?;
    let port = free_port()?;
    let child = Command::new(bin)
        .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
        .args([
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
        ])
        .args(extra)
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {bin}"))?;
    let proc = Proc(Some(child));
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok((proc, port));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("redis-server did not listen on {port}")
}

fn proc_cpu_secs(pid: u32) -> f64 {
    proc_ticks(pid, 11) / 100.0
}

/// CPU seconds of a process's children that it has waited for (Redis's AOF rewrites).
fn children_cpu_secs(pid: u32) -> f64 {
    proc_ticks(pid, 13) / 100.0
}

/// Fields `at` and `at + 1` of `/proc/<pid>/stat` after the command name, summed.
fn proc_ticks(pid: u32, at: usize) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    f.get(at).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(at + 1).and_then(|v| v.parse().ok()).unwrap_or(0.0)
}

/// Stamped events of `count` events' worth of frames, upstream seqs strictly increasing.
fn stamped(source: &str, count: usize) -> anyhow::Result<Vec<Event>> {
    let frames: Vec<Bytes> = if source == "synth" {
        sluice::upstream::synth::generate(&sluice::upstream::synth::SynthOptions {
            count: count.max(1),
            ..Default::default()
        })
        .into_iter()
        .map(Bytes::from)
        .collect()
    } else {
        let dir = std::env::var_os("SLUICE_UPSTREAM_FIXTURES")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("../shared/fixtures-upstream"));
        let path = dir.join("jetstream-corpus/frames.bin");
        sluice::upstream::capture::read_all(&path, 64 << 20)
            .with_context(|| format!("reading {}", path.display()))?
            .into_iter()
            .map(Bytes::from)
            .collect()
    };
    let mut ingestor = Ingestor::new(StampState::fresh(), Default::default());
    let mut out = Vec::with_capacity(count);
    let mut upstream = 0i64;
    let mut seq = 1u64;
    let mut time = 1_750_000_000_000_000i64;
    'outer: loop {
        for frame in &frames {
            upstream += 1;
            if let IngestOutcome::Events(events) = ingestor.restamp(frame.clone(), time, seq, time)
            {
                for mut e in events {
                    e.upstream_seq = upstream;
                    seq = e.seq + 1;
                    time = e.time_us + 1;
                    out.push(e);
                }
            }
            if out.len() >= count {
                break 'outer;
            }
        }
    }
    Ok(out)
}

async fn redis_int(link: &mut Link, args: &[&str]) -> anyhow::Result<i64> {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    match link.query(&cmd, Duration::from_secs(10)).await? {
        redis::Value::Int(i) => Ok(i),
        other => bail!("{args:?}: {other:?}"),
    }
}

async fn used_memory(link: &mut Link) -> anyhow::Result<u64> {
    let mut cmd = redis::cmd("INFO");
    cmd.arg("memory");
    let text = match link.query(&cmd, Duration::ZERO).await? {
        redis::Value::BulkString(b) => String::from_utf8_lossy(&b).into_owned(),
        redis::Value::VerbatimString { text, .. } => text,
        other => bail!("INFO: {other:?}"),
    };
    text.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .context("used_memory")
}

pub async fn append(args: AppendArgs) -> anyhow::Result<()> {
    let events = stamped(&args.source, args.events)?;
    let raw_bytes: usize = events
        .iter()
        .filter(|e| e.op_index == 0)
        .map(|e| e.raw_frame.len())
        .sum();
    eprintln!(
        "{} events of {} ({:.0} raw frame bytes per event)",
        events.len(),
        args.source,
        raw_bytes as f64 / events.len() as f64
    );
    let dir = args
        .tmp
        .join(format!("sluice-bench-append-{}", std::process::id()));
    for round in 0..args.rounds.max(1) {
        for &in_flight in &args.in_flight {
            for &level in &args.level {
                for &batch in &args.batch {
                    let _ = std::fs::remove_dir_all(&dir);
                    let (mut redis, port) = args.redis.start(&dir)?;
                    let url = format!("redis://127.0.0.1:{port}/0");
                    let mut link = Link::new(&url, Duration::from_secs(5))?;
                    link.load_functions().await?;
                    let keys = Keys::new("bench");
                    // A new cluster's state is seeded one TTL after the first try: keep it short,
                    // then hold the lease for the whole run.
                    let short = Duration::from_millis(200);
                    let grant = loop {
                        match link
                            .acquire(&keys, "bench", short, 0, StampState::fresh())
                            .await?
                        {
                            Acquire::Granted(g) => break g,
                            _ => tokio::time::sleep(Duration::from_millis(50)).await,
                        }
                    };
                    link.renew(&keys, "bench", grant.epoch, Duration::from_secs(3600))
                        .await?;
                    let mem0 = used_memory(&mut link).await?;
                    // The leader's appender as a term runs it: ingest's frames queued, batched up
                    // to `batch` events (0: one frame per entry), encoded one batch ahead of the
                    // append in flight. The queue is filled as fast as it takes frames, as in a
                    // catch-up after an outage.
                    let mut config = ClusterConfig::new(url.clone(), "bench", "bench");
                    config.compression_level = level;
                    config.batch_max_events = batch.max(1);
                    config.append_in_flight = in_flight.max(1);
                    config.window_max_bytes = u64::MAX / 2;
                    let shared = Arc::new(ClusterShared::default());
                    let ctl = Arc::new(TermCtl::new(
                        grant.epoch,
                        Instant::now(),
                        Duration::from_secs(3600),
                    ));
                    let mut frames: Vec<Vec<Event>> = Vec::new();
                    for e in &events {
                        match frames.last_mut() {
                            Some(f) if e.op_index != 0 => f.push(e.clone()),
                            _ => frames.push(vec![e.clone()]),
                        }
                    }
                    let (tx, rx) = std::sync::mpsc::sync_channel(config.append_queue_frames);
                    let redis_cpu0 = proc_cpu_secs(redis.pid());
                    let rewrite_cpu0 = children_cpu_secs(redis.pid());
                    let cpu0 = cpu_self();
                    let t0 = Instant::now();
                    let appender = {
                        let (config, keys, shared, ctl) =
                            (config.clone(), keys.clone(), shared.clone(), ctl.clone());
                        std::thread::spawn(move || {
                            cluster_append::run(config, keys, shared, ctl, rx)
                        })
                    };
                    for f in frames {
                        if tx.send(f).is_err() {
                            break;
                        }
                    }
                    drop(tx);
                    let _ = tokio::task::spawn_blocking(move || appender.join()).await;
                    if let Some(why) = ctl.why.lock().clone() {
                        bail!("the appender ended its term: {why}");
                    }
                    let entries = shared.appends.load(Ordering::Relaxed);
                    let entry_bytes = shared.appended_bytes.load(Ordering::Relaxed) as usize;
                    let appended = shared.appended_events.load(Ordering::Relaxed);
                    if appended != events.len() as u64 {
                        bail!("appended {appended} of {} events", events.len());
                    }
                    let secs = t0.elapsed().as_secs_f64();
                    let cpu = cpu_self() - cpu0;
                    let redis_cpu = proc_cpu_secs(redis.pid()) - redis_cpu0;
                    let rewrite_cpu = children_cpu_secs(redis.pid()) - rewrite_cpu0;
                    let mem1 = used_memory(&mut link).await?;
                    let stream_mem = redis_int(
                        &mut link,
                        &["MEMORY", "USAGE", &keys.stream, "SAMPLES", "0"],
                    )
                    .await?;
                    let n = events.len() as f64;
                    println!(
                        "{}",
                        serde_json::json!({
                            "bench": "cluster-append",
                            "round": round,
                            "in_flight": in_flight,
                            "load1": load1(),
                            "source": args.source,
                            "level": level,
                            "batch_events": batch,
                            "entries": entries,
                            "events_per_entry": events.len() as f64 / entries.max(1) as f64,
                            "events": events.len(),
                            "secs": secs,
                            "events_per_sec": n / secs,
                            "entry_bytes_per_event": entry_bytes as f64 / n,
                            "raw_bytes_per_event": raw_bytes as f64 / n,
                            "stream_memory_bytes_per_event": stream_mem as f64 / n,
                            "used_memory_bytes_per_event": (mem1.saturating_sub(mem0)) as f64 / n,
                            "bench_cpu_us_per_event": cpu * 1e6 / n,
                            "redis_cpu_us_per_event": redis_cpu * 1e6 / n,
                            "redis_rewrite_cpu_us_per_event": rewrite_cpu * 1e6 / n,
                        })
                    );
                    redis.kill9();
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// The 1-minute load average, recorded next to every number.
fn load1() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(-1.0)
}

fn cpu_self() -> f64 {
    proc_cpu_secs(std::process::id())
}

async fn http_get(addr: SocketAddr, path: &str) -> Option<Vec<u8>> {
    let work = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .ok()?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.ok()?;
        let at = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
        Some(raw[at + 4..].to_vec())
    };
    tokio::time::timeout(Duration::from_secs(2), work)
        .await
        .ok()?
}

/// The index of the node that reports itself leader, polling every `poll` for up to 60 s.
async fn wait_for_leader(nodes: &[BenchNode], poll: Duration) -> anyhow::Result<usize> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut found = None;
        for (i, n) in nodes.iter().enumerate() {
            if n.role().await.as_deref() == Some("leader") {
                found = Some(i);
            }
        }
        if let Some(i) = found {
            return Ok(i);
        }
        if Instant::now() > deadline {
            bail!("no leader within 60 s");
        }
        tokio::time::sleep(poll).await;
    }
}

struct BenchNode {
    id: String,
    port: u16,
    admin: u16,
    args: Vec<String>,
    proc: Proc,
    log: PathBuf,
}

impl BenchNode {
    fn start(&mut self, bin: &PathBuf) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(bin)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        self.proc = Proc(Some(child));
        Ok(())
    }

    async fn role(&self) -> Option<String> {
        let body = http_get(
            SocketAddr::from(([127, 0, 0, 1], self.admin)),
            "/status.json",
        )
        .await?;
        let v: serde_json::Value = serde_json::from_slice(&body).ok()?;
        Some(v["cluster"]["role"].as_str()?.to_string())
    }
}

/// Arrival instants (ns since the bench's start) of the events one node's subscriber saw.
type Arrivals = Arc<Mutex<Vec<u64>>>;

/// Keeps a live v2 subscriber on `addr`, reconnecting with its cursor while the node is
/// away; records each event's arrival.
async fn subscriber(
    addr: SocketAddr,
    arrivals: Arrivals,
    base: Instant,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    // The last seq read; 0 before the first (seqs start at 1).
    let cursor = std::sync::atomic::AtomicU64::new(0);
    let url = || match Some(cursor.load(Ordering::Relaxed)).filter(|&c| c > 0) {
        Some(c) => format!(
            "ws://{addr}/xrpc/network.bsky.jetstream.subscribeEvents?cursor={}",
            c + 1
        ),
        None => format!("ws://{addr}/xrpc/network.bsky.jetstream.subscribeEvents"),
    };
    follow(url, Duration::from_millis(100), &stop, |msg| {
        if let tokio_tungstenite::tungstenite::Message::Text(t) = msg {
            let now = base.elapsed().as_nanos() as u64;
            if let Some(seq) = serde_json::from_str::<serde_json::Value>(&t)
                .ok()
                .and_then(|v| v["payload"]["seq"].as_u64())
            {
                cursor.store(seq, Ordering::Relaxed);
                arrivals.lock().push(now);
            }
        }
    })
    .await;
}

/// Follows the websocket at `url()` until `stop` is set: connects (2 s to answer, then
/// `retry_after` before the next try), hands `on_message` every message, and connects
/// again after 2 s of silence or a broken stream.
async fn follow(
    url: impl Fn() -> String,
    retry_after: Duration,
    stop: &std::sync::atomic::AtomicBool,
    mut on_message: impl FnMut(tokio_tungstenite::tungstenite::Message),
) {
    while !stop.load(Ordering::Relaxed) {
        let Ok(Ok((mut ws, _))) = tokio::time::timeout(
            Duration::from_secs(2),
            tokio_tungstenite::connect_async(url()),
        )
        .await
        else {
            tokio::time::sleep(retry_after).await;
            continue;
        };
        while let Ok(Some(Ok(msg))) = tokio::time::timeout(Duration::from_secs(2), ws.next()).await
        {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            on_message(msg);
        }
    }
}

/// The longest silence in `arrivals` that overlaps `at` (ns), within 60 s after it.
fn silence_around(arrivals: &[u64], at: u64) -> Option<u64> {
    let i = arrivals.partition_point(|&t| t <= at);
    let before = *arrivals.get(i.checked_sub(1)?)?;
    let mut longest = arrivals.get(i)?.saturating_sub(before);
    for w in arrivals[i..].windows(2) {
        if w[0] > at + 60_000_000_000 {
            break;
        }
        longest = longest.max(w[1] - w[0]);
    }
    Some(longest)
}

fn quantile(v: &[f64], q: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// An in-process upstream replaying synthetic frames at `rate` frames/s: 20 s of them (1-4
/// ms apart at speed 1), looped with fresh seqs and times. Returns its `ws://` URL.
async fn paced_upstream(rate: u32) -> anyhow::Result<String> {
    let count = (rate as usize * 20).max(1000);
    let now_ms = sluice::clock::now_us() / 1000;
    let frames: Vec<Bytes> =
        sluice::upstream::synth::generate(&sluice::upstream::synth::SynthOptions {
            count,
            start_time_ms: now_ms,
            ..Default::default()
        })
        .into_iter()
        .map(Bytes::from)
        .collect();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let upstream = format!("ws://{}", listener.local_addr()?);
    tokio::spawn(sluice::upstream::replay::serve(
        sluice::upstream::replay::ReplayOptions {
            frames: sluice::upstream::replay::ReplaySource::Frames(frames),
            listen: sluice::upstream::replay::Listen::Listener(listener),
            speed: sluice::upstream::replay::Speed::Factor(f64::from(rate) / 400.0),
            looped: true,
        },
    ));
    Ok(upstream)
}

/// Starts `count` `sluice serve --redis` nodes (`n0`, `n1`, ...) of cluster `bench`.
fn start_nodes(
    bin: &PathBuf,
    dir: &std::path::Path,
    upstream: &str,
    rport: u16,
    count: usize,
    extra: &[&str],
) -> anyhow::Result<Vec<BenchNode>> {
    start_nodes_from(bin, dir, upstream, rport, 0..count, extra)
}

/// Starts nodes `n<i>` for each `i` of `ids`.
fn start_nodes_from(
    bin: &PathBuf,
    dir: &std::path::Path,
    upstream: &str,
    rport: u16,
    ids: std::ops::Range<usize>,
    extra: &[&str],
) -> anyhow::Result<Vec<BenchNode>> {
    let mut nodes = Vec::new();
    for i in ids {
        let id = format!("n{i}");
        let (port, admin) = (free_port()?, free_port()?);
        let mut args_v: Vec<String> = [
            "serve",
            "--upstream",
            upstream,
            "--data-dir",
            &dir.join(&id).display().to_string(),
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--admin-listen",
            &format!("127.0.0.1:{admin}"),
            "--redis",
            &format!("redis://127.0.0.1:{rport}/0"),
            "--cluster",
            "bench",
            "--cluster-node-id",
            &id,
            "--log",
            "warn",
            "--stats-interval-secs",
            "0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args_v.extend(extra.iter().map(|s| s.to_string()));
        let mut node = BenchNode {
            log: dir.join(format!("{id}.log")),
            id,
            port,
            admin,
            args: args_v,
            proc: Proc(None),
        };
        node.start(bin)?;
        nodes.push(node);
    }
    Ok(nodes)
}

pub async fn failover(args: FailoverArgs) -> anyhow::Result<()> {
    let dir = args
        .tmp
        .join(format!("sluice-bench-failover-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let (_redis, rport) = args.redis.start(&dir.join("redis"))?;
    let upstream = paced_upstream(args.rate).await?;
    let mut nodes = start_nodes(
        &args.sluice,
        &dir,
        &upstream,
        rport,
        args.nodes,
        &[
            "--lease-ttl-ms",
            &args.lease_ttl_ms.to_string(),
            "--standby-poll-ms",
            &args.standby_poll_ms.to_string(),
        ],
    )?;
    let base = Instant::now();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let arrivals: Vec<Arrivals> = nodes
        .iter()
        .map(|_| Arc::new(Mutex::new(Vec::new())))
        .collect();
    for (n, a) in nodes.iter().zip(&arrivals) {
        tokio::spawn(subscriber(
            SocketAddr::from(([127, 0, 0, 1], n.port)),
            a.clone(),
            base,
            stop.clone(),
        ));
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(20);
    let mut results: Vec<(&'static str, f64)> = Vec::new();
    let total = args.kills + args.handovers;
    tokio::time::sleep(Duration::from_secs(5)).await;
    for round in 0..total {
        let kind = if round < args.kills {
            "kill"
        } else {
            "handover"
        };
        let leader = wait_for_leader(&nodes, Duration::from_millis(50)).await?;
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..1000))).await;
        let at = base.elapsed().as_nanos() as u64;
        if kind == "kill" {
            nodes[leader].proc.kill9();
        } else {
            nodes[leader].proc.term()?;
        }
        // Wait for the stream to flow again at a surviving node, then restart.
        let witness = (leader + 1) % nodes.len();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let flowing = arrivals[witness]
                .lock()
                .last()
                .is_some_and(|&t| t > at + 200_000_000);
            if flowing {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "{kind} {round}: no events at {} within 60 s",
                    nodes[witness].id
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let gap = silence_around(&arrivals[witness].lock(), at).unwrap_or(0) as f64 / 1e6;
        eprintln!(
            "{kind} {round}: leader {} down; silence at {}: {gap:.0} ms",
            nodes[leader].id, nodes[witness].id
        );
        results.push((kind, gap));
        nodes[leader].start(&args.sluice)?;
        tokio::time::sleep(Duration::from_millis(rng.gen_range(2000..4000))).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for kind in ["kill", "handover"] {
        let v: Vec<f64> = results
            .iter()
            .filter(|r| r.0 == kind)
            .map(|r| r.1)
            .collect();
        if v.is_empty() {
            continue;
        }
        println!(
            "{}",
            serde_json::json!({
                "bench": "cluster-failover",
                "kind": kind,
                "count": v.len(),
                "rate": args.rate,
                "nodes": args.nodes,
                "lease_ttl_ms": args.lease_ttl_ms,
                "p50_ms": quantile(&v, 0.5),
                "p99_ms": quantile(&v, 0.99),
                "max_ms": quantile(&v, 1.0),
                "all_ms": v,
            })
        );
    }
    for n in nodes.iter_mut() {
        let _ = n.proc.term();
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[derive(Parser, Clone)]
pub struct ScaleArgs {
    /// The sluice binary.
    #[arg(long, default_value = "target/release/sluice")]
    pub sluice: PathBuf,
    #[command(flatten)]
    pub redis: RedisServerArgs,
    /// Node counts, one cluster (and one fresh redis-server) each.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    pub nodes: Vec<usize>,
    /// Live raw-wire subscribers per node (every event), one run per value.
    #[arg(long, value_delimiter = ',', default_value = "0,10")]
    pub subscribers: Vec<usize>,
    /// Upstream frames per second.
    #[arg(long, default_value_t = 2000)]
    pub rate: u32,
    /// Seconds of traffic before the measured window.
    #[arg(long, default_value_t = 8)]
    pub warmup_secs: u64,
    /// Seconds measured.
    #[arg(long, default_value_t = 20)]
    pub secs: u64,
    #[arg(long, default_value = "/tmp")]
    pub tmp: PathBuf,
    /// Measure added latency instead of CPU: upstream frame sent -> raw frame read by a
    /// subscriber on a follower (the last node), for each `--nodes` value; 0 nodes is a
    /// single node without Redis, side by side in the same run.
    #[arg(long)]
    pub latency: bool,
    /// Rounds over the `--nodes` values, alternating (with `--latency`).
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// Extra `sluice serve` arguments for every cluster node, e.g.
    /// `--serve-arg=--cluster-append-in-flight=1`.
    #[arg(long, allow_hyphen_values = true)]
    pub serve_arg: Vec<String>,
}

/// A live raw-wire subscriber that counts what it reads, reconnecting while `stop` is
/// unset.
async fn counting_subscriber(
    addr: SocketAddr,
    count: Arc<std::sync::atomic::AtomicU64>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let url = || format!("ws://{addr}/xrpc/com.atproto.sync.subscribeRepos");
    follow(url, Duration::from_millis(200), &stop, |_| {
        count.fetch_add(1, Ordering::Relaxed);
    })
    .await;
}

/// CPU of Redis and of each node per event, with 1, 2, 3... nodes on one Redis and a
/// number of subscribers per node: what a node costs per attached node and per subscriber,
/// and what Redis must handle.
pub async fn scale(args: ScaleArgs) -> anyhow::Result<()> {
    if args.latency {
        return latency(args).await;
    }
    for &count in &args.nodes {
        for &subs in &args.subscribers {
            let dir = args.tmp.join(format!(
                "sluice-bench-scale-{}-{count}-{subs}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir)?;
            let (mut redis, rport) = args.redis.start(&dir.join("redis"))?;
            let upstream = paced_upstream(args.rate).await?;
            let extra: Vec<&str> = args.serve_arg.iter().map(String::as_str).collect();
            let mut nodes = start_nodes(&args.sluice, &dir, &upstream, rport, count, &extra)?;
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let delivered = Arc::new(std::sync::atomic::AtomicU64::new(0));
            for n in &nodes {
                for _ in 0..subs {
                    tokio::spawn(counting_subscriber(
                        SocketAddr::from(([127, 0, 0, 1], n.port)),
                        delivered.clone(),
                        stop.clone(),
                    ));
                }
            }
            let leader = wait_for_leader(&nodes, Duration::from_millis(100)).await?;
            tokio::time::sleep(Duration::from_secs(args.warmup_secs)).await;
            let mut link = Link::new(
                &format!("redis://127.0.0.1:{rport}/0"),
                Duration::from_secs(5),
            )?;
            let keys = Keys::new("bench");
            let next0 = link.state(&keys).await?.map_or(0, |(s, _)| s.next_seq);
            let redis0 = proc_cpu_secs(redis.pid());
            let node0: Vec<f64> = nodes.iter().map(|n| proc_cpu_secs(n.proc.pid())).collect();
            let delivered0 = delivered.load(Ordering::Relaxed);
            let t0 = Instant::now();
            tokio::time::sleep(Duration::from_secs(args.secs)).await;
            let secs = t0.elapsed().as_secs_f64();
            let next1 = link.state(&keys).await?.map_or(0, |(s, _)| s.next_seq);
            let redis_cpu = proc_cpu_secs(redis.pid()) - redis0;
            let node_cpu: Vec<f64> = nodes
                .iter()
                .zip(&node0)
                .map(|(n, c0)| proc_cpu_secs(n.proc.pid()) - c0)
                .collect();
            let got = delivered.load(Ordering::Relaxed) - delivered0;
            stop.store(true, Ordering::Relaxed);
            let events = next1.saturating_sub(next0).max(1) as f64;
            let followers: Vec<f64> = node_cpu
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != leader)
                .map(|(_, c)| c * 1e6 / events)
                .collect();
            let positions: Vec<Option<u64>> = {
                let mut v = Vec::new();
                for n in &nodes {
                    let body =
                        http_get(SocketAddr::from(([127, 0, 0, 1], n.admin)), "/status.json").await;
                    v.push(
                        body.and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                            .and_then(|j| j["log"]["bounds"]["newest_seq"].as_u64()),
                    );
                }
                v
            };
            println!(
                "{}",
                serde_json::json!({
                    "bench": "cluster-scale",
                    "serve_args": args.serve_arg,
                    "load1": load1(),
                    "nodes": count,
                    "subscribers_per_node": subs,
                    "rate": args.rate,
                    "secs": secs,
                    "events_per_sec": events / secs,
                    "redis_cpu_us_per_event": redis_cpu * 1e6 / events,
                    "leader_cpu_us_per_event": node_cpu[leader] * 1e6 / events,
                    "follower_cpu_us_per_event": followers,
                    "delivered_per_subscriber_event": if subs == 0 {
                        0.0
                    } else {
                        got as f64 / (events * (subs * count) as f64)
                    },
                    "stream_next_seq": next1,
                    "node_positions": positions,
                })
            );
            for n in nodes.iter_mut() {
                let _ = n.proc.term();
            }
            redis.kill9();
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    Ok(())
}

/// When each upstream seq was first sent (ns since the bench's base instant).
type SendTimes = Arc<Mutex<std::collections::HashMap<i64, u64>>>;

/// An in-process upstream that sends synthetic frames at `rate` frames/s, paced from its
/// first connection, to whoever connects (from the frame due now) and records when each
/// upstream seq was first sent. Returns its `ws://` URL.
async fn timed_upstream(
    rate: u32,
    frames_total: usize,
    base: Instant,
    sent: SendTimes,
) -> anyhow::Result<String> {
    use futures_util::SinkExt;
    let now_ms = sluice::clock::now_us() / 1000;
    let frames: Arc<Vec<(i64, Bytes)>> = Arc::new(
        sluice::upstream::synth::generate(&sluice::upstream::synth::SynthOptions {
            count: frames_total,
            start_time_ms: now_ms,
            ..Default::default()
        })
        .into_iter()
        .filter_map(
            |f| match sluice::decode::decode_frame(&f, &Default::default()) {
                Ok(sluice::decode::DecodedFrame::Message(m)) => Some((m.seq?, Bytes::from(f))),
                _ => None,
            },
        )
        .collect(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("ws://{}", listener.local_addr()?);
    let start: Arc<std::sync::OnceLock<Instant>> = Arc::new(std::sync::OnceLock::new());
    tokio::spawn(async move {
        for _ in 0..1000 {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let (frames, sent, start) = (frames.clone(), sent.clone(), start.clone());
            tokio::spawn(async move {
                let Ok(ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                let (mut sink, mut source) = ws.split();
                tokio::spawn(async move { while let Some(Ok(_)) = source.next().await {} });
                let t0 = *start.get_or_init(Instant::now);
                let due = |at: Instant| ((at - t0).as_secs_f64() * f64::from(rate)) as usize;
                let mut next = due(Instant::now());
                while next < frames.len() {
                    let upto = due(Instant::now()).min(frames.len() - 1);
                    while next <= upto {
                        let (seq, frame) = &frames[next];
                        let msg = tokio_tungstenite::tungstenite::Message::Binary(frame.clone());
                        if sink.feed(msg).await.is_err() {
                            return;
                        }
                        sent.lock()
                            .entry(*seq)
                            .or_insert(base.elapsed().as_nanos() as u64);
                        next += 1;
                    }
                    if sink.flush().await.is_err() {
                        return;
                    }
                    let wake = t0 + Duration::from_secs_f64((next + 1) as f64 / f64::from(rate));
                    tokio::time::sleep_until(wake.into()).await;
                }
            });
        }
    });
    Ok(url)
}

/// A live raw-wire subscriber on `addr`: while `measure` is set, records each frame's
/// latency (read here minus first sent upstream, ns).
async fn latency_subscriber(
    addr: SocketAddr,
    base: Instant,
    sent: SendTimes,
    measure: Arc<std::sync::atomic::AtomicBool>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    samples: Arc<Mutex<Vec<u64>>>,
) {
    let url = || format!("ws://{addr}/xrpc/com.atproto.sync.subscribeRepos");
    follow(url, Duration::from_millis(200), &stop, |msg| {
        let now = base.elapsed().as_nanos() as u64;
        if !measure.load(Ordering::Relaxed) {
            return;
        }
        let tokio_tungstenite::tungstenite::Message::Binary(frame) = msg else {
            return;
        };
        if let Ok(sluice::decode::DecodedFrame::Message(m)) =
            sluice::decode::decode_frame(&frame, &Default::default())
        {
            let at = m.seq.and_then(|s| sent.lock().get(&s).copied());
            if let Some(at) = at {
                samples.lock().push(now.saturating_sub(at));
            }
        }
    })
    .await;
}

/// `cluster-scale --latency`: added latency, upstream frame -> subscriber read, on a
/// follower of an N-node cluster against a single node without Redis, alternating.
async fn latency(args: ScaleArgs) -> anyhow::Result<()> {
    let subs = args.subscribers.iter().copied().max().unwrap_or(2).max(1);
    for round in 0..args.rounds.max(1) {
        for &count in &args.nodes {
            let dir = args.tmp.join(format!(
                "sluice-bench-latency-{}-{count}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir)?;
            let base = Instant::now();
            let sent: SendTimes = Default::default();
            let total = args.rate as usize * (args.warmup_secs + args.secs + 30) as usize;
            let upstream = timed_upstream(args.rate, total, base, sent.clone()).await?;
            let mut redis = None;
            let mut nodes = if count == 0 {
                let (port, admin) = (free_port()?, free_port()?);
                let mut node = BenchNode {
                    log: dir.join("single.log"),
                    id: "single".into(),
                    port,
                    admin,
                    args: [
                        "serve",
                        "--upstream",
                        &upstream,
                        "--data-dir",
                        &dir.join("single").display().to_string(),
                        "--listen",
                        &format!("127.0.0.1:{port}"),
                        "--admin-listen",
                        &format!("127.0.0.1:{admin}"),
                        "--log",
                        "warn",
                        "--stats-interval-secs",
                        "0",
                    ]
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
                    proc: Proc(None),
                };
                node.start(&args.sluice)?;
                vec![node]
            } else {
                let (r, rport) = args.redis.start(&dir.join("redis"))?;
                redis = Some(r);
                // The first node starts alone so it leads; the measured one is the last.
                let extra: Vec<&str> = args.serve_arg.iter().map(String::as_str).collect();
                let mut nodes = start_nodes(&args.sluice, &dir, &upstream, rport, 1, &extra)?;
                let deadline = Instant::now() + Duration::from_secs(60);
                while nodes[0].role().await.as_deref() != Some("leader") {
                    if Instant::now() > deadline {
                        bail!("no leader within 60 s");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                nodes.extend(start_nodes_from(
                    &args.sluice,
                    &dir,
                    &upstream,
                    rport,
                    1..count,
                    &extra,
                )?);
                nodes
            };
            let Some(measured) = nodes.last() else {
                bail!("no node");
            };
            let addr = SocketAddr::from(([127, 0, 0, 1], measured.port));
            let measured_id = measured.id.clone();
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let measure = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let samples: Arc<Mutex<Vec<u64>>> = Default::default();
            for _ in 0..subs {
                tokio::spawn(latency_subscriber(
                    addr,
                    base,
                    sent.clone(),
                    measure.clone(),
                    stop.clone(),
                    samples.clone(),
                ));
            }
            tokio::time::sleep(Duration::from_secs(args.warmup_secs)).await;
            let load_before = load1();
            measure.store(true, Ordering::Relaxed);
            let cpu0: Vec<f64> = nodes.iter().map(|n| proc_cpu_secs(n.proc.pid())).collect();
            tokio::time::sleep(Duration::from_secs(args.secs)).await;
            measure.store(false, Ordering::Relaxed);
            let cpu: Vec<f64> = nodes
                .iter()
                .zip(&cpu0)
                .map(|(n, c)| (proc_cpu_secs(n.proc.pid()) - c) / args.secs as f64)
                .collect();
            stop.store(true, Ordering::Relaxed);
            let v: Vec<f64> = samples.lock().iter().map(|&ns| ns as f64 / 1e6).collect();
            let expected = f64::from(args.rate) * args.secs as f64 * subs as f64;
            println!(
                "{}",
                serde_json::json!({
                    "bench": "cluster-latency",
                    "serve_args": args.serve_arg,
                    "round": round,
                    "nodes": count,
                    "measured_node": measured_id,
                    "subscribers": subs,
                    "rate": args.rate,
                    "samples": v.len(),
                    "delivery_ratio": v.len() as f64 / expected,
                    "p50_ms": quantile(&v, 0.5),
                    "p90_ms": quantile(&v, 0.9),
                    "p99_ms": quantile(&v, 0.99),
                    "max_ms": quantile(&v, 1.0),
                    "node_cpu_cores": cpu,
                    "load1_before": load_before,
                    "load1_after": load1(),
                })
            );
            for n in nodes.iter_mut() {
                let _ = n.proc.term();
            }
            if let Some(mut r) = redis {
                r.kill9();
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    Ok(())
}
