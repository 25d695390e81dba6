//! `sluice-bench hostile`: what hostile clients cost a well-behaved subscriber.
//!
//! A real `sluice serve` (child process, default limits) follows the bench's in-process
//! upstream: a prefill of synthetic frames sent as fast as it takes them (a log for replays
//! to scan), then frames paced at `--rate`. One bystander, a Jetstream v2 subscriber to
//! everything on 127.0.0.1, reads throughout on a thread and runtime of its own (so the
//! attackers' work in the bench process does not delay its reads); each event's latency is
//! its receive instant minus the instant the publisher sent its frame (one monotonic clock),
//! and its seqs are checked for gaps and repeats. Phases alternate: unloaded, an attack,
//! unloaded, the next attack, ...; each is measured for `--duration` seconds after
//! `--settle` seconds. Attackers connect from their own loopback addresses
//! (127.0.0.10 and up, `--attack-ips` of them), like clients behind different addresses.
//!
//! Attacks (each bounded by its phase and by its counts):
//! - `slowloris`: 500 connections each sending a request head one byte a second;
//! - `fragments`: 100 websockets each holding an unfinished 700 KiB message, with pings;
//! - `event-flood`: 50 workers requesting `/event/{seq}` across the log, one request
//!   per connection, as fast as answered;
//! - `scans`: 20 replays from seq 1 whose filter matches nothing, each reconnecting every
//!   3 s;
//! - `churn`: 32 workers opening and closing websocket connections as fast as they can;
//! - `filters`: 30 v1 connections each sending a 10,000-DID `options_update` every second.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use futures_util::{SinkExt, StreamExt};
use parking_lot::Mutex;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

use crate::frame_meta::{commit_key, json_str};
use crate::hist::{now_ns, Hist};
use crate::procs::{
    free_port, metric, metrics, proc_cpu_secs, proc_rss_kb, serve_command, start_watchdog,
    wait_tcp, ChildGuard, ServeArgs, TempDir,
};
use crate::publisher::{next_frame, start_generator, start_upstream, GenFrame, PubSink};
use crate::report::{median, open_results};
use crate::stamps::Stamps;

#[derive(Parser, Clone)]
pub struct HostileArgs {
    #[command(flatten)]
    serve: ServeArgs,
    /// Upstream frames per second while measuring (each synthetic commit is one op, so
    /// about the bystander's event rate); the live firehose averaged 400-500 in 2026.
    #[arg(long, default_value_t = 500)]
    rate: u32,
    /// Frames sent as fast as sluice takes them before the first phase: the log that
    /// replays scan.
    #[arg(long, default_value_t = 100_000)]
    prefill: u64,
    /// Measurement window of each phase, seconds.
    #[arg(long, default_value_t = 15)]
    duration: u64,
    /// Seconds between a phase's start (an attack under way) and its measurement.
    #[arg(long, default_value_t = 3)]
    settle: u64,
    /// Rounds of all phases; the summary shows medians over them.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Attacks, comma separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "slowloris,fragments,event-flood,scans,churn,filters"
    )]
    attacks: Vec<Attack>,
    /// Loopback addresses the attackers spread over (127.0.0.10 and up).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u8).range(1..=200))]
    attack_ips: u8,
    /// Niceness of the attacker process (`nice -n`): the attackers run as a child process
    /// of their own, by default at the lowest priority, so that on this one machine their
    /// own CPU (which a real attacker spends elsewhere) delays the daemon and the
    /// bystander as little as possible. 0 runs them at normal priority.
    #[arg(long, default_value_t = 19, value_parser = clap::value_parser!(u8).range(0..=19))]
    attacker_nice: u8,
    /// Seed of the synthetic frames.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// DID pool of the synthetic frames.
    #[arg(long, default_value_t = 2000)]
    dids: usize,
    /// Write every phase's result as one JSON line to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Where the data dir and the daemon's log go.
    #[arg(long, default_value = "/tmp")]
    tmp: std::path::PathBuf,
}

/// Internal: one attack, run as its own process by `hostile` for `--secs`; prints what the
/// attackers did as one JSON line at the end.
#[derive(Parser, Clone)]
pub struct AttackArgs {
    #[arg(long, value_enum)]
    attack: Attack,
    /// The subscriber listener of the daemon under attack.
    #[arg(long)]
    addr: SocketAddr,
    #[arg(long)]
    secs: u64,
    #[arg(long, default_value_t = 8)]
    attack_ips: u8,
    /// Newest seq of the log, for `/event` lookups.
    #[arg(long, default_value_t = 1)]
    newest: u64,
}

/// Runs one attack for `--secs`, then stops it (bounded) and prints its counts.
pub async fn attack(args: AttackArgs) -> anyhow::Result<()> {
    let ctx = AttackCtx {
        addr: args.addr,
        stop: Arc::new(AtomicBool::new(false)),
        stats: Arc::new(AttackStats::default()),
        newest: args.newest,
    };
    let mut set = tokio::task::JoinSet::new();
    start_attack(args.attack, args.attack_ips, &ctx, &mut set);
    tokio::time::sleep(Duration::from_secs(args.secs)).await;
    ctx.stop.store(true, Ordering::Relaxed);
    let wound_down = tokio::time::timeout(Duration::from_secs(5), async {
        while set.join_next().await.is_some() {}
    })
    .await;
    if wound_down.is_err() {
        set.abort_all();
    }
    println!("{}", ctx.stats.snapshot());
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Attack {
    Slowloris,
    Fragments,
    EventFlood,
    Scans,
    Churn,
    Filters,
}

impl Attack {
    fn name(self) -> &'static str {
        match self {
            Attack::Slowloris => "slowloris 500",
            Attack::Fragments => "fragment hoarding 100 x 700 KiB",
            Attack::EventFlood => "/event flood, 50 workers",
            Attack::Scans => "zero-match scans, 20 replays",
            Attack::Churn => "connect churn, 32 workers",
            Attack::Filters => "10,000-DID updates, 30 conns",
        }
    }
}

/// What the attackers did, summed over their tasks.
#[derive(Default)]
struct AttackStats {
    /// Connections or requests attempted.
    attempts: AtomicU64,
    /// Upgraded, answered 200, or (slowloris) accepted and held.
    admitted: AtomicU64,
    /// Refused with an HTTP status (429, 503) or a connect error.
    refused: AtomicU64,
    /// Closed by the daemon after being admitted (deadline, budget, close frame).
    closed: AtomicU64,
}

impl AttackStats {
    fn snapshot(&self) -> serde_json::Value {
        let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
        json!({
            "attempts": ld(&self.attempts),
            "admitted": ld(&self.admitted),
            "refused": ld(&self.refused),
            "closed_by_daemon": ld(&self.closed),
        })
    }
}

// ---------------------------------------------------------------------------------------
// The bystander
// ---------------------------------------------------------------------------------------

/// One phase as the bystander saw it.
#[derive(Default)]
struct Seen {
    hist: Hist,
    events: u64,
    /// Seqs skipped (a gap of n counts n).
    lost: u64,
    /// Seqs at or below one already seen.
    repeated: u64,
}

struct Bystander {
    phase: AtomicUsize,
    phases: Mutex<Vec<Seen>>,
    ended: Mutex<Option<String>>,
    stop: AtomicBool,
    /// Gaps and repeats seen between measured phases.
    unmeasured_lost: AtomicU64,
    unmeasured_repeated: AtomicU64,
}

impl Bystander {
    fn new(phases: usize) -> Self {
        Bystander {
            phase: AtomicUsize::new(0),
            phases: Mutex::new((0..phases).map(|_| Seen::default()).collect()),
            ended: Mutex::new(None),
            stop: AtomicBool::new(false),
            unmeasured_lost: AtomicU64::new(0),
            unmeasured_repeated: AtomicU64::new(0),
        }
    }
}

/// `"key":<digits>` out of a JSON text, first occurrence.
fn json_u64(text: &str, key: &str) -> Option<u64> {
    let pat = format!("\"{key}\":");
    let start = text.find(&pat)? + pat.len();
    let digits = text[start..]
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len() - start);
    text[start..start + digits].parse().ok()
}

/// Runs the bystander on a thread and current-thread runtime of its own.
fn start_bystander(
    url: String,
    stamps: Arc<Stamps>,
    me: Arc<Bystander>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(r) => r,
            Err(e) => {
                *me.ended.lock() = Some(format!("runtime: {e}"));
                return;
            }
        };
        runtime.block_on(async move {
            let ws = match connect_v2(&url).await {
                Ok(ws) => ws,
                Err(e) => {
                    *me.ended.lock() = Some(format!("connect: {e}"));
                    return;
                }
            };
            let (_sink, mut source) = ws.split();
            let mut last_seq: Option<u64> = None;
            while !me.stop.load(Ordering::Relaxed) {
                let next = tokio::time::timeout(Duration::from_secs(1), source.next()).await;
                let msg = match next {
                    Err(_) => continue,
                    Ok(Some(Ok(m))) => m,
                    Ok(Some(Err(e))) => {
                        *me.ended.lock() = Some(format!("error: {e}"));
                        return;
                    }
                    Ok(None) => {
                        *me.ended.lock() = Some("stream ended".into());
                        return;
                    }
                };
                let now = now_ns();
                let Message::Text(text) = msg else {
                    if let Message::Close(c) = msg {
                        *me.ended.lock() = Some(format!("closed: {c:?}"));
                        return;
                    }
                    continue;
                };
                let text = text.as_str();
                let sent = match (json_str(text, "did"), json_str(text, "rev")) {
                    (Some(d), Some(r)) => stamps.get(commit_key(d, r)),
                    _ => None,
                };
                // Seqs are checked throughout; a gap or repeat between two measured
                // phases counts in the unmeasured tally.
                let (lost, repeated) = match (json_u64(text, "seq"), last_seq) {
                    (Some(seq), Some(last)) if seq <= last => (0, 1),
                    (Some(seq), Some(last)) => {
                        last_seq = Some(seq);
                        (seq - last - 1, 0)
                    }
                    (Some(seq), None) => {
                        last_seq = Some(seq);
                        (0, 0)
                    }
                    (None, _) => (0, 0),
                };
                let phase = me.phase.load(Ordering::Relaxed);
                if phase == usize::MAX {
                    me.unmeasured_lost.fetch_add(lost, Ordering::Relaxed);
                    me.unmeasured_repeated
                        .fetch_add(repeated, Ordering::Relaxed);
                    continue;
                }
                let mut phases = me.phases.lock();
                let Some(seen) = phases.get_mut(phase) else {
                    continue;
                };
                seen.events += 1;
                seen.lost += lost;
                seen.repeated += repeated;
                if let Some(sent) = sent {
                    seen.hist.record(now.saturating_sub(sent) / 1000);
                }
            }
        });
    })
}

type ClientWs = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

async fn connect_v2(url: &str) -> anyhow::Result<ClientWs> {
    let mut request = url.into_client_request()?;
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static("xrpc.v1.json"),
    );
    let (ws, _) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(request),
    )
    .await
    .context("connect timed out")??;
    Ok(ws)
}

// ---------------------------------------------------------------------------------------
// Attackers
// ---------------------------------------------------------------------------------------

/// The `i`th attacker's source address.
fn attacker_ip(attack_ips: u8, i: usize) -> IpAddr {
    let n = usize::from(attack_ips.max(1));
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 10 + (i % n) as u8))
}

async fn connect_from(from: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    tokio::time::timeout(Duration::from_secs(5), socket.connect(to))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
}

/// A websocket client from `from`; `Err(Some(status))` when refused with an HTTP status.
async fn ws_from(
    from: IpAddr,
    to: SocketAddr,
    path: &str,
    v2: bool,
) -> Result<tokio_tungstenite::WebSocketStream<TcpStream>, Option<u16>> {
    let tcp = connect_from(from, to).await.map_err(|_| None)?;
    let mut request = format!("ws://{to}{path}")
        .into_client_request()
        .map_err(|_| None)?;
    if v2 {
        request.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_static("xrpc.v1.json"),
        );
    }
    match tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::client_async(request, tcp),
    )
    .await
    {
        Ok(Ok((ws, _))) => Ok(ws),
        Ok(Err(tokio_tungstenite::tungstenite::Error::Http(response))) => {
            Err(Some(response.status().as_u16()))
        }
        _ => Err(None),
    }
}

/// A masked client frame.
fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x5au8, 0x13, 0xc7, 0x81];
    let mut frame = vec![if fin { 0x80 } else { 0 } | opcode];
    match payload.len() {
        n if n < 126 => frame.push(0x80 | n as u8),
        n if n <= 0xffff => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// Upgrades by hand from `from`; the stream after the 101, or the status otherwise.
async fn raw_upgrade(from: IpAddr, to: SocketAddr, path: &str) -> Result<TcpStream, Option<u16>> {
    let mut stream = connect_from(from, to).await.map_err(|_| None)?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|_| None)?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    let read = async {
        while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
            match stream.read(&mut byte).await {
                Ok(1) => head.push(byte[0]),
                _ => return false,
            }
        }
        true
    };
    let whole = tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .unwrap_or(false);
    let status = String::from_utf8_lossy(&head)
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok());
    match (whole, status) {
        (true, Some(101)) => Ok(stream),
        (_, status) => Err(status),
    }
}

fn count_refusal(stats: &AttackStats) {
    stats.refused.fetch_add(1, Ordering::Relaxed);
}

/// Waits until the daemon closes `stream` (EOF or error) or `stop` is set; discards
/// what it sends. True if the daemon closed it.
async fn wait_closed(
    stream: &mut TcpStream,
    stop: &AtomicBool,
    ping_every: Option<Duration>,
) -> bool {
    let mut buf = vec![0u8; 16 * 1024];
    let mut next_ping =
        tokio::time::Instant::now() + ping_every.unwrap_or(Duration::from_secs(3600));
    loop {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        tokio::select! {
            read = stream.read(&mut buf) => match read {
                Ok(0) | Err(_) => return true,
                Ok(_) => {}
            },
            _ = tokio::time::sleep_until(next_ping) => {
                next_ping += ping_every.unwrap_or(Duration::from_secs(3600));
                if stream.write_all(&client_frame(true, 0x9, b"hi")).await.is_err() {
                    return true;
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

struct AttackCtx {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    stats: Arc<AttackStats>,
    /// Newest seq to aim replays and lookups at.
    newest: u64,
}

/// One attacking task's view: its number, the address it attacks from, and what it needs.
#[derive(Clone)]
struct Worker {
    i: usize,
    ip: IpAddr,
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    stats: Arc<AttackStats>,
}

impl Worker {
    /// Counts a refused attempt, then pauses `pause_ms` before the next one (so a refused
    /// attacker does not spin).
    async fn refused(&self, pause_ms: u64) {
        count_refusal(&self.stats);
        tokio::time::sleep(Duration::from_millis(pause_ms)).await;
    }
}

/// Spawns `workers` tasks, task i attacking from attacker address i; each repeats
/// `attempt` (counted in `attempts`, given the attempt's number) until the attack stops.
fn spawn_workers<F, Fut>(
    set: &mut tokio::task::JoinSet<()>,
    ctx: &AttackCtx,
    attack_ips: u8,
    workers: usize,
    attempt: F,
) where
    F: Fn(Worker, u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    for i in 0..workers {
        let worker = Worker {
            i,
            ip: attacker_ip(attack_ips, i),
            addr: ctx.addr,
            stop: ctx.stop.clone(),
            stats: ctx.stats.clone(),
        };
        let attempt = attempt.clone();
        set.spawn(async move {
            let mut n = 0u64;
            while !worker.stop.load(Ordering::Relaxed) {
                worker.stats.attempts.fetch_add(1, Ordering::Relaxed);
                attempt(worker.clone(), n).await;
                n += 1;
            }
        });
    }
}

/// Starts `attack`'s tasks; they run until `ctx.stop` is set.
fn start_attack(
    attack: Attack,
    attack_ips: u8,
    ctx: &AttackCtx,
    set: &mut tokio::task::JoinSet<()>,
) {
    match attack {
        Attack::Slowloris => spawn_workers(set, ctx, attack_ips, 500, |w, _| async move {
            let Ok(mut stream) = connect_from(w.ip, w.addr).await else {
                return w.refused(200).await;
            };
            if stream
                .write_all(b"GET /subscribe HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                .await
                .is_err()
            {
                count_refusal(&w.stats);
                return;
            }
            w.stats.admitted.fetch_add(1, Ordering::Relaxed);
            let mut buf = [0u8; 1024];
            let mut drip = tokio::time::interval(Duration::from_secs(1));
            let closed = loop {
                if w.stop.load(Ordering::Relaxed) {
                    break false;
                }
                tokio::select! {
                    read = stream.read(&mut buf) => match read {
                        Ok(0) | Err(_) => break true,
                        Ok(_) => {}
                    },
                    _ = drip.tick() => {
                        if stream.write_all(b"a").await.is_err() {
                            break true;
                        }
                    }
                }
            };
            if closed {
                w.stats.closed.fetch_add(1, Ordering::Relaxed);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }),
        Attack::Fragments => {
            let fragment = Arc::new(client_frame(false, 0x1, &vec![b'x'; 700 * 1024]));
            spawn_workers(set, ctx, attack_ips, 100, move |w, _| {
                let fragment = fragment.clone();
                async move {
                    let path = "/subscribe?wantedCollections=com.example.none";
                    let Ok(mut stream) = raw_upgrade(w.ip, w.addr, path).await else {
                        return w.refused(500).await;
                    };
                    w.stats.admitted.fetch_add(1, Ordering::Relaxed);
                    // The write may end half-way when the budget closes the connection.
                    let _ = stream.write_all(&fragment).await;
                    if wait_closed(&mut stream, &w.stop, Some(Duration::from_secs(2))).await {
                        w.stats.closed.fetch_add(1, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            })
        }
        Attack::EventFlood => {
            let newest = ctx.newest.max(1);
            spawn_workers(set, ctx, attack_ips, 50, move |w, n| async move {
                // A seq spread over the log, different for every worker and attempt (a
                // splitmix64 step of the pair).
                let mut k = ((w.i as u64) << 40) ^ n;
                k = (k ^ (k >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
                k = (k ^ (k >> 27)).wrapping_mul(0x94d049bb133111eb);
                k ^= k >> 31;
                let seq = 1 + (k >> 11) % newest;
                let status = async {
                    let mut stream = connect_from(w.ip, w.addr).await.ok()?;
                    let request = format!(
                        "GET /event/{seq} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                    );
                    stream.write_all(request.as_bytes()).await.ok()?;
                    let mut raw = Vec::new();
                    stream.read_to_end(&mut raw).await.ok()?;
                    String::from_utf8_lossy(&raw)
                        .split_whitespace()
                        .nth(1)?
                        .parse::<u16>()
                        .ok()
                };
                match tokio::time::timeout(Duration::from_secs(5), status).await {
                    Ok(Some(200)) => {
                        w.stats.admitted.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => count_refusal(&w.stats),
                }
            })
        }
        Attack::Scans => spawn_workers(set, ctx, attack_ips, 20, |w, _| async move {
            let path = "/xrpc/network.bsky.jetstream.subscribeEvents?cursor=1&collections=com.example.nothing";
            let Ok(mut ws) = ws_from(w.ip, w.addr, path, true).await else {
                return w.refused(500).await;
            };
            w.stats.admitted.fetch_add(1, Ordering::Relaxed);
            let until = tokio::time::Instant::now() + Duration::from_secs(3);
            loop {
                let next = tokio::select! {
                    next = ws.next() => next,
                    _ = tokio::time::sleep_until(until) => break,
                };
                match next {
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                        w.stats.closed.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    Some(Ok(_)) => {}
                }
            }
            let _ = ws.close(None).await;
        }),
        Attack::Churn => spawn_workers(set, ctx, attack_ips, 32, |w, _| async move {
            let path = "/subscribe?wantedCollections=app.bsky.feed.post";
            match ws_from(w.ip, w.addr, path, false).await {
                Ok(mut ws) => {
                    w.stats.admitted.fetch_add(1, Ordering::Relaxed);
                    let _ = ws.close(None).await;
                }
                Err(_) => count_refusal(&w.stats),
            }
        }),
        Attack::Filters => {
            let dids: Vec<String> = (0..10_000).map(|i| format!("did:plc:{i:024}")).collect();
            let update = Arc::new(
                json!({"type": "options_update", "payload": {"wantedDids": dids}}).to_string(),
            );
            spawn_workers(set, ctx, attack_ips, 30, move |w, _| {
                let update = update.clone();
                async move {
                    let path = "/subscribe?requireHello=true";
                    let Ok(mut ws) = ws_from(w.ip, w.addr, path, false).await else {
                        return w.refused(500).await;
                    };
                    w.stats.admitted.fetch_add(1, Ordering::Relaxed);
                    let mut every = tokio::time::interval(Duration::from_secs(1));
                    loop {
                        if w.stop.load(Ordering::Relaxed) {
                            break;
                        }
                        tokio::select! {
                            _ = every.tick() => {
                                if ws.send(Message::Text(update.as_str().into())).await.is_err() {
                                    w.stats.closed.fetch_add(1, Ordering::Relaxed);
                                    break;
                                }
                            }
                            next = ws.next() => match next {
                                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                                    w.stats.closed.fetch_add(1, Ordering::Relaxed);
                                    break;
                                }
                                Some(Ok(_)) => {}
                            },
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            })
        }
    }
}

// ---------------------------------------------------------------------------------------
// The daemon and the upstream
// ---------------------------------------------------------------------------------------

/// Sends `prefill` frames as fast as the sink takes them, then frames at `rate` stamped
/// with their send instant, until `stop`.
async fn feed(
    mut sinks: tokio::sync::mpsc::Receiver<PubSink>,
    mut frames: std::sync::mpsc::Receiver<GenFrame>,
    stamps: Arc<Stamps>,
    prefill: u64,
    rate: f64,
    stop: Arc<AtomicBool>,
    sent_total: Arc<AtomicU64>,
) {
    let Ok(Some(mut sink)) = tokio::time::timeout(Duration::from_secs(30), sinks.recv()).await
    else {
        return;
    };
    let next = |sinks: &mut tokio::sync::mpsc::Receiver<PubSink>, sink: &mut PubSink| {
        if let Ok(new) = sinks.try_recv() {
            *sink = new;
        }
    };
    for i in 0..prefill {
        let Some(frame) = next_frame(&mut frames).await else {
            return;
        };
        if sink.feed(&frame.bytes).await.is_err() {
            next(&mut sinks, &mut sink);
        }
        if i % 64 == 63 {
            let _ = sink.flush().await;
        }
        sent_total.fetch_add(1, Ordering::Relaxed);
    }
    let _ = sink.flush().await;
    let t0 = Instant::now();
    let mut sent = 0u64;
    while !stop.load(Ordering::Relaxed) {
        next(&mut sinks, &mut sink);
        let due = (t0.elapsed().as_secs_f64() * rate) as u64;
        while sent < due {
            let Some(frame) = next_frame(&mut frames).await else {
                return;
            };
            sent += 1;
            let ns = now_ns();
            if let Some(k) = frame.meta.commit_key {
                stamps.insert(k, ns);
            }
            if sink.feed(&frame.bytes).await.is_err() {
                next(&mut sinks, &mut sink);
            }
            sent_total.fetch_add(1, Ordering::Relaxed);
        }
        let _ = sink.flush().await;
        let at = t0 + Duration::from_secs_f64((sent + 1) as f64 / rate);
        tokio::time::sleep_until(at.into()).await;
    }
}

fn q(h: &Hist, p: f64) -> serde_json::Value {
    h.quantile(p).map_or(serde_json::Value::Null, |v| json!(v))
}

pub async fn hostile(args: HostileArgs) -> anyhow::Result<()> {
    if args.rate == 0 || args.duration == 0 || args.attacks.is_empty() {
        bail!("--rate, --duration and --attacks must be given");
    }
    let runs = args.runs.max(1);
    // Phases: per run, an unloaded phase before each attack, and one at the end.
    let mut plan: Vec<Option<Attack>> = Vec::new();
    for _ in 0..runs {
        for attack in &args.attacks {
            plan.push(None);
            plan.push(Some(*attack));
        }
    }
    plan.push(None);
    let phase_secs = args.settle + args.duration + 10;
    let bound = Duration::from_secs(phase_secs * plan.len() as u64 + 600);
    start_watchdog(bound);

    let dir = TempDir::fresh(&args.tmp, "hostile")?;
    let (tx, sinks) = tokio::sync::mpsc::channel::<PubSink>(4);
    let upstream = start_upstream(tx).await?;
    let port = free_port()?;
    let admin_port = free_port()?;
    let mut cmd = serve_command(&args.serve.sluice, &upstream, port, &dir.0.join("data"));
    cmd.args(["--admin-listen", &format!("127.0.0.1:{admin_port}")])
        .args(&args.serve.serve_args);
    let mut serve = ChildGuard::spawn("sluice serve", &mut cmd, Some(dir.0.join("serve.log")))?;
    wait_tcp(port, &mut serve, 30).await?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let admin: SocketAddr = ([127, 0, 0, 1], admin_port).into();
    eprintln!("sluice serve pid {}", serve.pid());

    let stamps = Arc::new(Stamps::new(f64::from(args.rate) as usize * 600));
    let stop_feed = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let (frames, _made) = start_generator(args.seed, args.dids, 20_000);
    let feeder = tokio::spawn(feed(
        sinks,
        frames,
        stamps.clone(),
        args.prefill,
        f64::from(args.rate),
        stop_feed.clone(),
        sent.clone(),
    ));
    // Wait for the prefill to be logged (each synthetic commit is one event or more).
    eprintln!("prefilling {} frames", args.prefill);
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        serve.check_alive()?;
        let newest = metric(&metrics(admin).await, "sluice_log_newest_seq").unwrap_or(0.0);
        if newest >= args.prefill as f64 {
            break;
        }
        if Instant::now() > deadline {
            bail!("the prefill was not logged within 600 s (newest seq {newest})");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let bystander = Arc::new(Bystander::new(plan.len()));
    let reader = start_bystander(
        format!("ws://{addr}/xrpc/network.bsky.jetstream.subscribeEvents"),
        stamps.clone(),
        bystander.clone(),
    );
    let mut out = open_results(args.json.as_deref())?;
    let mut results = Vec::new();
    for (i, step) in plan.iter().enumerate() {
        serve.check_alive()?;
        let newest = metric(&metrics(admin).await, "sluice_log_newest_seq").unwrap_or(1.0);
        let attacker = match step {
            Some(attack) => {
                let mut cmd = Command::new("nice");
                cmd.args(["-n", &args.attacker_nice.to_string()])
                    .arg(std::env::current_exe()?)
                    .arg("hostile-attack")
                    .arg("--attack")
                    .arg(
                        attack
                            .to_possible_value()
                            .map_or(String::new(), |v| v.get_name().to_string()),
                    )
                    .arg("--addr")
                    .arg(addr.to_string())
                    .arg("--secs")
                    .arg((args.settle + args.duration).to_string())
                    .arg("--attack-ips")
                    .arg(args.attack_ips.to_string())
                    .arg("--newest")
                    .arg((newest as u64).to_string());
                let out = dir.0.join(format!("attack-{i}.out"));
                Some((
                    ChildGuard::spawn("attacker", &mut cmd, Some(out.clone()))?,
                    out,
                ))
            }
            None => None,
        };
        let name = step.map_or("unloaded", |a| a.name());
        eprintln!("== phase {i}: {name} ==");
        tokio::time::sleep(Duration::from_secs(args.settle)).await;
        bystander.phase.store(i, Ordering::Relaxed);
        let cpu0 = proc_cpu_secs(serve.pid()).unwrap_or(0.0);
        let t0 = Instant::now();
        let mut rss_max = 0;
        let mut not_ready = 0;
        while t0.elapsed() < Duration::from_secs(args.duration) {
            tokio::time::sleep(Duration::from_millis(1000)).await;
            rss_max = rss_max.max(proc_rss_kb(serve.pid()).unwrap_or(0));
            if metric(&metrics(admin).await, "sluice_ready") != Some(1.0) {
                not_ready += 1;
            }
        }
        let secs = t0.elapsed().as_secs_f64();
        let cpu = proc_cpu_secs(serve.pid()).unwrap_or(0.0) - cpu0;
        // Between phases: nothing is measured while the attack winds down.
        bystander.phase.store(usize::MAX, Ordering::Relaxed);
        let mut attack_stats = serde_json::Value::Null;
        if let Some((mut child, out)) = attacker {
            let deadline = Instant::now() + Duration::from_secs(20);
            while matches!(child.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            attack_stats = std::fs::read_to_string(&out)
                .unwrap_or_default()
                .lines()
                .rev()
                .find_map(|l| serde_json::from_str(l).ok())
                .unwrap_or(serde_json::Value::Null);
            drop(child);
        }
        let text = metrics(admin).await;
        let (hist, events, lost, repeated) = {
            let phases = bystander.phases.lock();
            let seen = &phases[i];
            (seen.hist.clone(), seen.events, seen.lost, seen.repeated)
        };
        let result = json!({
            "phase": i,
            "attack": name,
            "events": events,
            "events_per_sec": events as f64 / secs,
            "p50_us": q(&hist, 0.5),
            "p99_us": q(&hist, 0.99),
            "max_us": hist.max,
            "lost": lost,
            "repeated": repeated,
            "sluice_cpu_pct": cpu / secs * 100.0,
            "sluice_rss_max_kb": rss_max,
            "not_ready_samples": not_ready,
            "log_commit_failures": metric(&text, "sluice_log_commit_failures_total"),
            "attack_stats": attack_stats,
            "attacker_nice": args.attacker_nice,
            "loadavg": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
        });
        eprintln!(
            "  events {events} p50 {} us p99 {} us max {} us lost {lost} repeated {repeated} cpu {:.0}% rss {} KiB attack {}",
            result["p50_us"], result["p99_us"], hist.max, cpu / secs * 100.0, rss_max, result["attack_stats"]
        );
        if let Some(f) = out.as_mut() {
            use std::io::Write as _;
            writeln!(f, "{result}")?;
        }
        results.push(result);
        if let Some(why) = bystander.ended.lock().clone() {
            bail!("the bystander's stream ended: {why}");
        }
    }
    bystander.stop.store(true, Ordering::Relaxed);
    stop_feed.store(true, Ordering::Relaxed);
    let _ = tokio::time::timeout(Duration::from_secs(10), feeder).await;
    let _ = reader.join();
    serve.check_alive()?;
    print_summary(&args, &results);
    println!(
        "\nbystander between phases: {} lost, {} repeated; sluice serve alive at the end",
        bystander.unmeasured_lost.load(Ordering::Relaxed),
        bystander.unmeasured_repeated.load(Ordering::Relaxed)
    );
    drop(serve);
    Ok(())
}

/// One row per attack: medians over runs of the attack's phases and of the unloaded
/// phase just before each.
fn print_summary(args: &HostileArgs, results: &[serde_json::Value]) {
    let f = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
    println!(
        "| attack | unloaded p50 µs | unloaded p99 µs | attacked p50 µs | attacked p99 µs | p99 ratio (median of runs) | lost | repeated | sluice CPU % unloaded / attacked | attack attempts / admitted / refused / closed by daemon |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for attack in &args.attacks {
        let name = attack.name();
        let pairs: Vec<(&serde_json::Value, &serde_json::Value)> = results
            .windows(2)
            .filter(|w| w[1]["attack"] == name && w[0]["attack"] == "unloaded")
            .map(|w| (&w[0], &w[1]))
            .collect();
        let med = |get: &dyn Fn(&serde_json::Value) -> f64, side: usize| -> f64 {
            median(
                pairs
                    .iter()
                    .map(|(a, b)| get(if side == 0 { a } else { b }))
                    .collect(),
            )
        };
        let ratio = median(
            pairs
                .iter()
                .map(|(a, b)| f(&b["p99_us"]) / f(&a["p99_us"]))
                .collect(),
        );
        let sum = |key: &str| -> u64 {
            pairs
                .iter()
                .map(|(_, b)| b[key].as_u64().unwrap_or(0))
                .sum()
        };
        let stat = |key: &str| -> f64 { med(&|r| f(&r["attack_stats"][key]), 1) };
        println!(
            "| {name} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2}× | {} | {} | {:.0} / {:.0} | {:.0} / {:.0} / {:.0} / {:.0} |",
            med(&|r| f(&r["p50_us"]), 0),
            med(&|r| f(&r["p99_us"]), 0),
            med(&|r| f(&r["p50_us"]), 1),
            med(&|r| f(&r["p99_us"]), 1),
            ratio,
            sum("lost"),
            sum("repeated"),
            med(&|r| f(&r["sluice_cpu_pct"]), 0),
            med(&|r| f(&r["sluice_cpu_pct"]), 1),
            stat("attempts"),
            stat("admitted"),
            stat("refused"),
            stat("closed_by_daemon"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_read_out_of_v2_messages() {
        let text = r#"{"$type":"message","payload":{"$type":"x#commit","seq":4211,"did":"did:plc:a","time":"t","commit":{"rev":"3l"}}}"#;
        assert_eq!(json_u64(text, "seq"), Some(4211));
        assert_eq!(json_str(text, "rev"), Some("3l"));
        assert_eq!(json_u64(r#"{"seq":7}"#, "seq"), Some(7));
        assert_eq!(json_u64(r#"{"other":7}"#, "seq"), None);
    }

    #[test]
    fn attackers_spread_over_their_addresses() {
        let ips: std::collections::BTreeSet<IpAddr> = (0..10).map(|i| attacker_ip(3, i)).collect();
        assert_eq!(ips.len(), 3);
        assert!(ips.iter().all(|ip| ip.is_loopback()));
    }
}
