//! Shared helpers for the hostile-client tests: a real `sluice serve` process fed by an
//! in-process `replay` upstream, attackers connecting from their own loopback address
//! (127.0.0.2, 127.0.0.3: all of 127/8 is loopback on Linux), a well-behaved bystander
//! subscriber, and the admin endpoints read over plain HTTP. Every wait is bounded.
#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use sluice::upstream::replay::{self, Listen, ReplayOptions, ReplaySource, Speed};
use sluice::upstream::synth::{generate, SynthOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;

/// The longest any single wait may take.
pub const LIMIT: Duration = Duration::from_secs(30);

pub const V2_PATH: &str = "/xrpc/network.bsky.jetstream.subscribeEvents";

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A replay upstream on 127.0.0.1 sending `count` synthetic frames dated just before now,
/// at `speed` times real time (frames are 1-4 ms apart), so events keep arriving for a
/// while; returns its `ws://` URL.
pub async fn slow_upstream(count: usize, speed: f64) -> String {
    let now_ms = sluice::clock::now_us() / 1000;
    let frames: Vec<Bytes> = generate(&SynthOptions {
        count,
        start_time_ms: now_ms - 60_000,
        ..SynthOptions::default()
    })
    .into_iter()
    .map(Bytes::from)
    .collect();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the upstream");
    let url = format!("ws://{}", listener.local_addr().expect("upstream address"));
    tokio::spawn(replay::serve(ReplayOptions {
        frames: ReplaySource::Frames(frames),
        listen: Listen::Listener(listener),
        speed: Speed::Factor(speed),
        looped: false,
    }));
    url
}

/// A running `sluice serve`, killed on drop.
pub struct Serve {
    pub child: Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub stderr: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Serve {
    /// Starts `sluice serve` on free loopback ports with `extra` settings; with `nofile`,
    /// under that open-file limit (soft and hard). Returns once `/healthz` answers.
    pub async fn start(upstream: &str, extra: &[&str], nofile: Option<u64>) -> Serve {
        let dir = tempfile::tempdir().expect("temp dir");
        let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let admin: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let stderr = dir.path().join("stderr.log");
        let bin = env!("CARGO_BIN_EXE_sluice");
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--upstream".into(),
            upstream.into(),
            "--data-dir".into(),
            dir.path().join("data").to_string_lossy().into_owned(),
            "--listen".into(),
            addr.to_string(),
            "--admin-listen".into(),
            admin.to_string(),
            "--backoff-min-ms".into(),
            "20".into(),
            "--backoff-max-ms".into(),
            "200".into(),
        ];
        // A short retry hint unless the test sets its own.
        if !extra.contains(&"--retry-after-secs") {
            args.extend(["--retry-after-secs".into(), "1".into()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut command = match nofile {
            None => {
                let mut c = Command::new(bin);
                c.args(&args);
                c
            }
            Some(n) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!("ulimit -n {n} && exec \"$0\" \"$@\""))
                    .arg(bin)
                    .args(&args);
                c
            }
        };
        let log = std::fs::File::create(&stderr).expect("stderr file");
        let child = command
            .env("SLUICE_LOG_FILTER", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn sluice serve");
        let serve = Serve {
            child,
            addr,
            admin,
            stderr,
            dir,
        };
        let deadline = Instant::now() + LIMIT;
        loop {
            if let Some((200, _)) = http_get(serve.admin, "/healthz").await {
                return serve;
            }
            assert!(
                Instant::now() < deadline,
                "sluice serve did not answer /healthz within {LIMIT:?}: {}",
                serve.stderr_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    pub fn url(&self, path_and_query: &str) -> String {
        format!("ws://{}{path_and_query}", self.addr)
    }

    /// `/metrics`, which must answer within 5 s (a hang bound: a loaded CI machine takes
    /// more than a second at times).
    pub async fn metrics(&self) -> String {
        match tokio::time::timeout(Duration::from_secs(5), http_get(self.admin, "/metrics")).await {
            Ok(Some((200, text))) => text,
            other => panic!("/metrics did not answer 200 within 5 s: {other:?}"),
        }
    }

    /// Sends `sig` (e.g. `-TERM`) to the daemon.
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {sig}");
    }

    /// Waits for the process to exit; its status and how long that took.
    pub fn wait_exit(&mut self, within: Duration) -> (std::process::ExitStatus, Duration) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return (status, start.elapsed());
            }
            assert!(
                start.elapsed() < within,
                "sluice serve did not exit within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A metric's value: the first line whose name and labels start with `prefix` (e.g.
/// `sluice_connections_open{listener="subscriber"`), or `None`.
pub fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(prefix) && l[prefix.len()..].starts_with([' ', ',', '}']))
        .and_then(|l| l.rsplit_once(' '))
        .and_then(|(_, v)| v.parse().ok())
}

/// A one-shot HTTP/1.1 GET from 127.0.0.1: status and body, or `None` if it failed or
/// took more than 5 s.
pub async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.ok()?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let status = text.split_whitespace().nth(1)?.parse().ok()?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Some((status, body))
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .ok()
        .flatten()
}

/// A TCP connection to `to` from the loopback address `from`.
pub async fn connect_from(from: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    tokio::time::timeout(Duration::from_secs(5), socket.connect(to))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
}

/// A slowloris client: sends a request line and the start of a header, then one more
/// header byte every `drip`, until the server closes the connection (or `give_up`
/// passes). Returns how long after connecting the server closed it, or `None` if it was
/// still open at `give_up`.
pub async fn slowloris(
    from: IpAddr,
    to: SocketAddr,
    drip: Duration,
    give_up: Duration,
) -> Option<Duration> {
    let start = Instant::now();
    let mut stream = match connect_from(from, to).await {
        Ok(s) => s,
        // Refused at once counts as closed at once.
        Err(_) => return Some(start.elapsed()),
    };
    let head = b"GET /subscribe HTTP/1.1\r\nHost: x\r\nX-Slow: ";
    if stream.write_all(head).await.is_err() {
        return Some(start.elapsed());
    }
    let mut buf = [0u8; 1024];
    let mut next_drip = tokio::time::Instant::now() + drip;
    loop {
        if start.elapsed() >= give_up {
            return None;
        }
        tokio::select! {
            read = stream.read(&mut buf) => match read {
                Ok(0) | Err(_) => return Some(start.elapsed()),
                // A refusal's HTTP answer: the close follows.
                Ok(_) => continue,
            },
            _ = tokio::time::sleep_until(next_drip) => {
                next_drip += drip;
                if stream.write_all(b"a").await.is_err() {
                    return Some(start.elapsed());
                }
            }
        }
    }
}

/// A v2 subscriber reading from `cursor` (inclusive), recording every seq it gets.
pub struct Bystander {
    pub seqs: Vec<u64>,
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
}

impl Bystander {
    pub async fn connect(serve: &Serve, cursor: u64) -> Bystander {
        let url = serve.url(&format!("{V2_PATH}?cursor={cursor}"));
        let (ws, _) = tokio::time::timeout(
            Duration::from_secs(5),
            tokio_tungstenite::connect_async(&url),
        )
        .await
        .expect("bystander connect timed out")
        .expect("bystander connect");
        Bystander {
            seqs: Vec::new(),
            ws,
        }
    }

    /// Reads for `how_long` (or until the stream is quiet for 5 s); panics if it ends.
    pub async fn read_for(&mut self, how_long: Duration) {
        let until = tokio::time::Instant::now() + how_long;
        loop {
            let next = tokio::select! {
                next = tokio::time::timeout(Duration::from_secs(5), self.ws.next()) => next,
                _ = tokio::time::sleep_until(until) => return,
            };
            match next {
                Ok(Some(Ok(Message::Text(t)))) => {
                    let v: serde_json::Value =
                        serde_json::from_str(t.as_str()).expect("v2 message is JSON");
                    if let Some(seq) = v["payload"]["seq"].as_u64() {
                        self.seqs.push(seq);
                    }
                }
                Ok(Some(Ok(_))) => {}
                Err(_) => return,
                Ok(other) => panic!("bystander's stream ended: {other:?}"),
            }
        }
    }

    /// Every seq from the first on, once each, in order.
    pub fn assert_gapless_from(&self, first: u64) {
        assert!(!self.seqs.is_empty(), "the bystander got nothing");
        for (i, seq) in self.seqs.iter().enumerate() {
            assert_eq!(*seq, first + i as u64, "gap or duplicate at index {i}");
        }
    }
}

pub fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

// ---- raw websocket frames -----------------------------------------------------------

pub const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// Upgrades a connection from `from` to `path` by hand; the stream after the 101, or the
/// response head if it was not a 101.
pub async fn raw_ws(from: IpAddr, to: SocketAddr, path: &str) -> Result<TcpStream, String> {
    let mut stream = connect_from(from, to).await.map_err(|e| e.to_string())?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {WS_KEY}\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    let read_head = async {
        while !head.ends_with(b"\r\n\r\n") {
            match stream.read(&mut byte).await {
                Ok(1) => head.push(byte[0]),
                _ => return false,
            }
        }
        true
    };
    let whole = tokio::time::timeout(Duration::from_secs(5), read_head)
        .await
        .unwrap_or(false);
    let head = String::from_utf8_lossy(&head).into_owned();
    if whole && head.starts_with("HTTP/1.1 101") {
        Ok(stream)
    } else {
        Err(head)
    }
}

/// A masked client frame; `fin` false leaves the message unfinished.
pub fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
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

/// Reads server frames until a close frame and returns its code (`None`: the connection
/// ended without one, or nothing came within `within`).
pub async fn close_code<R: AsyncReadExt + Unpin>(stream: &mut R, within: Duration) -> Option<u16> {
    let work = async {
        loop {
            let mut head = [0u8; 2];
            stream.read_exact(&mut head).await.ok()?;
            let len = match head[1] & 0x7f {
                126 => u64::from(stream.read_u16().await.ok()?),
                127 => stream.read_u64().await.ok()?,
                n => u64::from(n),
            };
            let mut payload = vec![0u8; usize::try_from(len).ok()?];
            stream.read_exact(&mut payload).await.ok()?;
            if head[0] & 0x0f == 0x8 {
                return payload.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]]));
            }
        }
    };
    tokio::time::timeout(within, work).await.ok().flatten()
}

/// Threads of process `pid` now.
pub fn threads_of(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
}

/// Waits until the log's newest seq (from `/metrics`) is at least `seq`.
pub async fn wait_logged(serve: &Serve, seq: u64) {
    let deadline = Instant::now() + LIMIT;
    loop {
        let newest = metric(&serve.metrics().await, "sluice_log_newest_seq").unwrap_or(0.0);
        if newest >= seq as f64 {
            return;
        }
        assert!(Instant::now() < deadline, "log reached only seq {newest}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A one-shot HTTP/1.1 GET from the loopback address `from`: the status, or `None`.
pub async fn http_status_from(from: IpAddr, to: SocketAddr, path: &str) -> Option<u16> {
    // What went wrong is printed (a test that expected a status shows why it got none).
    let exchange = async {
        let mut stream = connect_from(from, to)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut raw = Vec::new();
        let read = stream.read_to_end(&mut raw).await;
        let text = String::from_utf8_lossy(&raw);
        let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok());
        match (read, status) {
            (Ok(_), Some(status)) => Ok(status),
            (read, _) => Err(format!(
                "read: {read:?} after {} bytes: {:?}",
                raw.len(),
                text.chars().take(200).collect::<String>()
            )),
        }
    };
    match tokio::time::timeout(Duration::from_secs(5), exchange).await {
        Ok(Ok(status)) => Some(status),
        Ok(Err(why)) => {
            eprintln!("GET {path} from {from}: no status ({why})");
            None
        }
        Err(_) => {
            eprintln!("GET {path} from {from}: no answer within 5 s");
            None
        }
    }
}

/// A websocket client connecting from the loopback address `from`.
pub async fn ws_from(
    from: IpAddr,
    to: SocketAddr,
    path: &str,
) -> Result<tokio_tungstenite::WebSocketStream<TcpStream>, tokio_tungstenite::tungstenite::Error> {
    let tcp = connect_from(from, to).await?;
    let url = format!("ws://{to}{path}");
    let (ws, _) = tokio_tungstenite::client_async(url, tcp).await?;
    Ok(ws)
}
