//! Shared helpers for the end-to-end wire tests: a `replay` upstream and a whole daemon on
//! 127.0.0.1, websocket clients, a tiny HTTP/1.1 GET, CBOR frame reading, and the log as
//! the ground truth of what each wire should carry. Every wait is bounded.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use sluice::config::ServeConfig;
use sluice::daemon::Daemon;
use sluice::event::Event;
use sluice::upstream::replay::{self, Listen, ReplayOptions, ReplaySource, Speed};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderMap;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// The longest any single wait in these tests may take.
pub const LIMIT: Duration = Duration::from_secs(20);
/// How long "nothing more arrives" is watched for.
pub const QUIET: Duration = Duration::from_millis(400);

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub const V2_PATH: &str = "/xrpc/network.bsky.jetstream.subscribeEvents";
pub const RAW_PATH: &str = "/xrpc/com.atproto.sync.subscribeRepos";

// ---- upstream frames ----------------------------------------------------------------

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

// ---- upstream and daemon ------------------------------------------------------------

/// Jetstream's dictionaries as shipped to clients (`SLUICE_JETSTREAM_DICTIONARIES`, default
/// `../shared/jetstream-dictionaries`): tests decode with these files, not with sluice's
/// embedded copy.
pub fn jetstream_dictionary(name: &str) -> Vec<u8> {
    let dir = match std::env::var_os("SLUICE_JETSTREAM_DICTIONARIES") {
        Some(dir) => std::path::PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/jetstream-dictionaries"),
    };
    let path = dir.join(name);
    std::fs::read(&path)
        .unwrap_or_else(|e| panic!("Jetstream's dictionary {} is required: {e}", path.display()))
}

/// A `replay` upstream on 127.0.0.1.
pub async fn start_replay(
    frames: Vec<Bytes>,
    speed: Speed,
    looped: bool,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let opts = ReplayOptions {
            frames: ReplaySource::Frames(frames),
            listen: Listen::Listener(listener),
            speed,
            looped,
        };
        if let Err(e) = replay::serve(opts).await {
            panic!("replay failed: {e:#}");
        }
    });
    (addr, task)
}

/// A daemon configuration for tests: listens on an ephemeral port, keeps everything by age,
/// reconnects quickly, and compresses v1 with Jetstream's dictionary (the default) or,
/// with `train_dictionary`, with sluice's own trained at first use.
pub fn serve_config(
    upstream: SocketAddr,
    dir: &Path,
    train_dictionary: bool,
    extra: &[&str],
) -> ServeConfig {
    let upstream_url = format!("ws://{upstream}");
    let data = dir.join("data");
    let data = data.to_str().unwrap().to_string();
    let mut argv: Vec<String> = [
        "x",
        "--upstream",
        &upstream_url,
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--data-dir",
        &data,
        "--backoff-min-ms",
        "20",
        "--backoff-max-ms",
        "200",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if train_dictionary {
        argv.push("--zstd-dictionary".into());
        argv.push("trained".into());
    }
    // Every client of these tests connects from 127.0.0.1, standing in for many clients:
    // the per-address shares are lifted to the server-wide limits, which are what these
    // tests set and check (the shares are tested from several addresses in hostile_*).
    for (flag, value) in [
        ("--max-pending-per-ip", "1000000"),
        ("--connects-per-sec-per-ip", "1000000"),
        ("--event-requests-per-sec-per-ip", "1000000"),
        ("--scan-events-per-sec-per-ip", "1000000000"),
        ("--max-index-changes-per-sec-per-ip", "1000000000"),
    ] {
        argv.push(flag.into());
        argv.push(value.into());
    }
    argv.extend(extra.iter().map(|s| s.to_string()));
    sluice::config::parse_serve_args(argv)
        .unwrap()
        .to_config()
        .unwrap()
}

/// An upstream plus a daemon, torn down by [`Env::stop`] (or dropped at the test's end).
pub struct Env {
    pub daemon: Daemon,
    pub frames: Vec<Bytes>,
    pub replay: tokio::task::JoinHandle<()>,
    pub dir: tempfile::TempDir,
}

impl Env {
    pub async fn start(
        frames: Vec<Bytes>,
        speed: Speed,
        looped: bool,
        tweak: impl FnOnce(&mut ServeConfig),
    ) -> Env {
        Self::start_with(frames, speed, looped, false, &[], tweak).await
    }

    pub async fn start_with(
        frames: Vec<Bytes>,
        speed: Speed,
        looped: bool,
        train_dictionary: bool,
        extra: &[&str],
        tweak: impl FnOnce(&mut ServeConfig),
    ) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let (upstream, replay) = start_replay(frames.clone(), speed, looped).await;
        let mut config = serve_config(upstream, dir.path(), train_dictionary, extra);
        tweak(&mut config);
        let daemon = tokio::time::timeout(LIMIT, Daemon::start(config))
            .await
            .expect("daemon start timed out")
            .expect("daemon start");
        Env {
            daemon,
            frames,
            replay,
            dir,
        }
    }

    /// An upstream whose first 400 frames are from 2020 and the next 400 from ten minutes
    /// ago, with one hour of age retention checked every 50 ms in small segments: once it
    /// returns, retention has deleted a prefix of the log (the oldest held seq is > 1).
    pub async fn with_deleted_prefix() -> Env {
        let now_ms = sluice::clock::now_us() / 1000;
        let mut frames = synth_at(400, 3, 1_000_000, 1_590_000_000_000);
        frames.extend(synth_at(400, 4, 2_000_000, now_ms - 600_000));
        let env = Env::start(frames, Speed::Max, false, |c| {
            c.log.retention.max_age = Duration::from_secs(3600);
            c.log.retention.check_interval = Duration::from_millis(50);
            c.log.segment_target_bytes = 4096;
        })
        .await;
        env.wait_all_ingested().await;
        let deadline = tokio::time::Instant::now() + LIMIT;
        loop {
            let oldest = env.daemon.log.reader().bounds().map_or(0, |b| b.oldest_seq);
            if oldest > 100 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "retention did not delete the 2020 events (oldest seq {oldest})"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        env
    }

    /// The oldest seq retention still holds.
    pub fn oldest_seq(&self) -> u64 {
        self.daemon.log.reader().bounds().unwrap().oldest_seq
    }

    pub fn addr(&self) -> SocketAddr {
        self.daemon.addr
    }

    pub fn url(&self, path_and_query: &str) -> String {
        format!("ws://{}{path_and_query}", self.daemon.addr)
    }

    /// Waits until ingest has accepted the upstream frame with seq `upstream_seq`, and the
    /// log holds (in its tail) the events it produced.
    pub async fn wait_upstream(&self, upstream_seq: i64) {
        let deadline = tokio::time::Instant::now() + LIMIT * 3;
        loop {
            let newest = self.daemon.log.reader().newest_seq();
            let done = newest > 0
                && self
                    .daemon
                    .log
                    .reader()
                    .read_from(newest, 1, usize::MAX)
                    .ok()
                    .and_then(|v| v.first().map(|e| e.upstream_seq >= upstream_seq))
                    .unwrap_or(false);
            if done {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "ingest did not reach upstream seq {upstream_seq} (newest sluice seq {newest})"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until every frame of the capture has been ingested.
    pub async fn wait_all_ingested(&self) {
        let last = frame_seq(self.frames.last().unwrap());
        self.wait_upstream(last).await;
    }

    /// Waits until everything in the log is durable in the store (not only in the tail).
    pub async fn wait_durable(&self) {
        let deadline = tokio::time::Instant::now() + LIMIT;
        let reader = self.daemon.log.reader();
        while reader.store().bounds().map_or(0, |b| b.newest_seq) < reader.newest_seq() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "log never became durable"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until the log holds at least `seq`.
    pub async fn wait_seq(&self, seq: u64) {
        let deadline = tokio::time::Instant::now() + LIMIT * 3;
        while self.daemon.log.reader().newest_seq() < seq {
            assert!(
                tokio::time::Instant::now() < deadline,
                "log did not reach seq {seq}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Every event in the log from `from` on (ground truth for what wires carry).
    pub fn events_from(&self, from: u64) -> Vec<std::sync::Arc<Event>> {
        let reader = self.daemon.log.reader();
        let mut out = Vec::new();
        let mut next = from.max(1);
        for _ in 0..100_000 {
            let batch = reader.read_from(next, 4096, usize::MAX).unwrap();
            let Some(last) = batch.last() else { break };
            next = last.seq + 1;
            out.extend(batch);
        }
        out
    }

    pub fn events(&self) -> Vec<std::sync::Arc<Event>> {
        self.events_from(1)
    }

    pub async fn stop(self) {
        let _ = tokio::time::timeout(LIMIT, self.daemon.shutdown()).await;
        self.replay.abort();
    }
}

// ---- websocket clients --------------------------------------------------------------

/// A URL short enough for a panic message.
pub fn short(url: &str) -> &str {
    match url.char_indices().nth(160) {
        Some((i, _)) => &url[..i],
        None => url,
    }
}

/// Connects, failing the test on refusal or timeout.
pub async fn connect(url: &str) -> Ws {
    let (ws, _) = tokio::time::timeout(LIMIT, tokio_tungstenite::connect_async(url))
        .await
        .unwrap_or_else(|_| panic!("connect to {} timed out", short(url)))
        .unwrap_or_else(|e| panic!("connect to {}: {e}", short(url)));
    ws
}

/// Connects offering `protocol` as the websocket subprotocol; returns the response headers.
pub async fn connect_protocol(url: &str, protocol: &str) -> (Ws, HeaderMap) {
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", protocol.parse().unwrap());
    let (ws, response) = tokio::time::timeout(LIMIT, tokio_tungstenite::connect_async(request))
        .await
        .expect("connect timed out")
        .unwrap_or_else(|e| panic!("connect to {}: {e}", short(url)));
    (ws, response.headers().clone())
}

/// A receive buffer small next to the streams the tests send (megabytes), so a client that
/// stops reading pushes back on the server quickly, yet at least one loopback segment
/// (64 KiB MSS): a window below one segment leaves the sender on TCP's persist timer, whose
/// backoff stalls even a reading client for seconds, which no real client would see.
pub const SMALL_RCVBUF: u32 = 64 * 1024;

/// Connects through a socket with a small receive buffer, so that a client that stops
/// reading pushes back on the server quickly.
pub async fn connect_small_buffer(url: &str, rcvbuf: u32) -> Ws {
    let parsed = url::Url::parse(url).unwrap();
    let addr: SocketAddr = format!("{}:{}", parsed.host_str().unwrap(), parsed.port().unwrap())
        .parse()
        .unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(rcvbuf).unwrap();
    let stream = tokio::time::timeout(LIMIT, socket.connect(addr))
        .await
        .expect("tcp connect timed out")
        .unwrap();
    let (ws, _) = tokio::time::timeout(
        LIMIT,
        tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream)),
    )
    .await
    .expect("handshake timed out")
    .unwrap_or_else(|e| panic!("connect to {}: {e}", short(url)));
    ws
}

/// A refused handshake: status, headers and body text. Panics if the upgrade succeeds.
pub async fn refused(url: &str) -> (u16, HeaderMap, String) {
    match try_connect(url).await {
        Ok(_) => panic!("{} was accepted; expected a refusal", short(url)),
        Err(r) => r,
    }
}

/// Connects, or returns the refusal (status, headers, body).
pub async fn try_connect(url: &str) -> Result<Ws, (u16, HeaderMap, String)> {
    let result = tokio::time::timeout(LIMIT, tokio_tungstenite::connect_async(url))
        .await
        .unwrap_or_else(|_| panic!("connect to {} timed out", short(url)));
    match result {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let status = response.status().as_u16();
            let headers = response.headers().clone();
            let body = response
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            Err((status, headers, body))
        }
        Err(e) => panic!("connect to {}: unexpected error {e}", short(url)),
    }
}

/// What a read yielded.
#[derive(Debug)]
pub enum Got {
    Text(String),
    Binary(Bytes),
    Closed(Option<CloseFrame>),
    /// The stream ended without a close frame, or with an error.
    Gone(String),
    Timeout,
}

/// The next data or close message within `wait` (pings and pongs are skipped).
pub async fn next(ws: &mut Ws, wait: Duration) -> Got {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return Got::Timeout,
            Ok(None) => return Got::Gone("end of stream".into()),
            Ok(Some(Err(e))) => return Got::Gone(e.to_string()),
            Ok(Some(Ok(message))) => match message {
                Message::Text(t) => return Got::Text(t.as_str().to_string()),
                Message::Binary(b) => return Got::Binary(b),
                Message::Close(frame) => return Got::Closed(frame),
                _ => continue,
            },
        }
    }
}

/// Reads exactly `n` text messages as JSON, failing on anything else or on timeout.
pub async fn read_json(ws: &mut Ws, n: usize) -> Vec<serde_json::Value> {
    let mut out = Vec::with_capacity(n);
    let deadline = tokio::time::Instant::now() + LIMIT;
    while out.len() < n {
        let wait = deadline.saturating_duration_since(tokio::time::Instant::now());
        match next(ws, wait).await {
            Got::Text(t) => out.push(serde_json::from_str(&t).unwrap()),
            other => panic!("after {} of {n} messages: got {other:?}", out.len()),
        }
    }
    out
}

/// Reads exactly `n` text messages, raw.
pub async fn read_texts(ws: &mut Ws, n: usize) -> Vec<String> {
    let mut out = Vec::with_capacity(n);
    let deadline = tokio::time::Instant::now() + LIMIT;
    while out.len() < n {
        let wait = deadline.saturating_duration_since(tokio::time::Instant::now());
        match next(ws, wait).await {
            Got::Text(t) => out.push(t),
            other => panic!("after {} of {n} messages: got {other:?}", out.len()),
        }
    }
    out
}

/// Reads exactly `n` binary messages.
pub async fn read_binaries(ws: &mut Ws, n: usize) -> Vec<Bytes> {
    let mut out = Vec::with_capacity(n);
    let deadline = tokio::time::Instant::now() + LIMIT;
    while out.len() < n {
        let wait = deadline.saturating_duration_since(tokio::time::Instant::now());
        match next(ws, wait).await {
            Got::Binary(b) => out.push(b),
            other => panic!("after {} of {n} messages: got {other:?}", out.len()),
        }
    }
    out
}

/// Asserts nothing but pings arrives for [`QUIET`].
pub async fn assert_quiet(ws: &mut Ws, what: &str) {
    match next(ws, QUIET).await {
        Got::Timeout => {}
        other => panic!("{what}: expected nothing more, got {other:?}"),
    }
}

/// Sends a text message.
pub async fn send_text(ws: &mut Ws, text: String) {
    tokio::time::timeout(LIMIT, ws.send(Message::text(text)))
        .await
        .expect("send timed out")
        .expect("send");
}

/// Reads until a close frame (or the end of the stream), returning the messages before it.
pub async fn read_until_close(ws: &mut Ws, max: usize) -> (Vec<Got>, Option<CloseFrame>) {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + LIMIT;
    for _ in 0..max {
        let wait = deadline.saturating_duration_since(tokio::time::Instant::now());
        match next(ws, wait).await {
            Got::Closed(frame) => return (seen, frame),
            Got::Gone(e) => panic!("stream ended without a close frame: {e}"),
            Got::Timeout => panic!("no close frame within {LIMIT:?}"),
            other => seen.push(other),
        }
    }
    panic!("no close frame within {max} messages")
}

/// `"key":<number>` scanned out of a JSON text without parsing the whole thing.
pub fn scan_u64(text: &str, key: &str) -> Option<u64> {
    let needle = format!("\"{key}\":");
    let at = text.find(&needle)? + needle.len();
    let digits: String = text[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

// ---- plain HTTP ---------------------------------------------------------------------

/// A minimal HTTP/1.1 GET: status, lower-cased headers, body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let work = async {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        // A server refusing a huge request may close before reading all of it.
        let _ = stream.write_all(request.as_bytes()).await;
        let mut raw = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => raw.extend_from_slice(&buf[..n]),
            }
        }
        raw
    };
    let raw = tokio::time::timeout(LIMIT, work)
        .await
        .expect("HTTP GET timed out");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("HTTP response head");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut body = raw[split + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    if chunked {
        let mut out = Vec::new();
        let mut rest = &body[..];
        for _ in 0..1_000_000 {
            let line_end = rest.windows(2).position(|w| w == b"\r\n").unwrap();
            let size =
                usize::from_str_radix(std::str::from_utf8(&rest[..line_end]).unwrap().trim(), 16)
                    .unwrap();
            rest = &rest[line_end + 2..];
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[..size]);
            rest = &rest[size + 2..];
        }
        body = out;
    }
    (status, headers, body)
}

pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// Percent-encodes a query value.
pub fn enc(value: &str) -> String {
    url::form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

// ---- stream-following clients -------------------------------------------------------

/// Which wire a following client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    V1,
    V2,
    Raw,
}

/// What a following client saw: the position of every event (v1 `cursor`, v2 `seq`, raw
/// upstream `seq`) in order, and how the stream ended if it did.
#[derive(Debug, Default)]
pub struct Followed {
    pub positions: Vec<u64>,
    /// An error frame (`error` name), if one came.
    pub error: Option<String>,
    /// Close code and reason, if the server closed.
    pub close: Option<(u16, String)>,
    /// Other messages (#info, notices), as text.
    pub other: Vec<String>,
}

/// How a following client behaves.
#[derive(Debug, Clone, Copy)]
pub struct Follow {
    pub wire: Wire,
    /// Stop reading for `pause` after this many events.
    pub pause_after: Option<usize>,
    pub pause: Duration,
    /// Give up at this instant.
    pub deadline: tokio::time::Instant,
}

/// The position carried by one message, or `None` for control messages (recorded).
fn position(wire: Wire, got: &Got, out: &mut Followed) -> Option<u64> {
    match (wire, got) {
        (Wire::V1, Got::Text(t)) => {
            if t.contains("\"kind\":\"notice\"") {
                out.other.push(t.clone());
                return None;
            }
            scan_u64(t, "cursor")
        }
        (Wire::V2, Got::Text(t)) => {
            if t.starts_with("{\"$type\":\"error\"") {
                let v: serde_json::Value = serde_json::from_str(t).unwrap();
                out.error = v["error"].as_str().map(str::to_string);
                return None;
            }
            if t.contains("subscribeEvents#info\"") {
                out.other.push(t.clone());
                return None;
            }
            scan_u64(t, "seq")
        }
        (Wire::Raw, Got::Binary(b)) => {
            let (header, body) = decode_frame(b);
            if cbor_int(&header, "op") == Some(-1) {
                out.error = cbor_text(&body, "error");
                return None;
            }
            if cbor_text(&header, "t").as_deref() == Some("#info") {
                out.other.push(format!("{body:?}"));
                return None;
            }
            cbor_int(&body, "seq").map(|s| s as u64)
        }
        (_, other) => panic!("{wire:?} client got {other:?}"),
    }
}

/// Reads until the position reaches `target` (read at each step: it may be set later),
/// the server closes, or the deadline passes; pauses once if asked.
pub async fn follow(ws: &mut Ws, how: Follow, target: &std::sync::atomic::AtomicU64) -> Followed {
    use std::sync::atomic::Ordering;
    let mut out = Followed::default();
    let mut paused = false;
    loop {
        if out.positions.last().copied().unwrap_or(0) >= target.load(Ordering::Acquire) {
            return out;
        }
        if let Some(n) = how.pause_after {
            if !paused && out.positions.len() >= n {
                paused = true;
                tokio::time::sleep(how.pause).await;
            }
        }
        // Short slices, so a target set while the stream is idle is noticed.
        let wait = how
            .deadline
            .saturating_duration_since(tokio::time::Instant::now())
            .min(Duration::from_millis(50));
        let got = next(ws, wait).await;
        match &got {
            Got::Timeout if tokio::time::Instant::now() >= how.deadline => return out,
            Got::Timeout => continue,
            Got::Closed(frame) => {
                out.close = frame
                    .as_ref()
                    .map(|f| (u16::from(f.code), f.reason.as_str().to_string()));
                return out;
            }
            Got::Gone(e) => {
                out.close = Some((0, e.clone()));
                return out;
            }
            _ => {}
        }
        if let Some(p) = position(how.wire, &got, &mut out) {
            out.positions.push(p);
        }
    }
}
