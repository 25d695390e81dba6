//! Shared parts of the cluster tests: a real `redis-server` on a free loopback port with
//! AOF on (`appendfsync always`), real `sluice serve` processes joined to it, and readers
//! that follow a cluster's wires across node deaths.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

pub use crate::redis_common::{free_port, RedisServer};

/// A `sluice serve --redis` child; killed when dropped.
pub struct Node {
    pub id: String,
    pub port: u16,
    pub admin: u16,
    pub data: PathBuf,
    pub log_path: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
}

impl Node {
    /// A node of cluster `test` on `redis`, reading `upstream`, with a short lease.
    pub fn new(id: &str, dir: &Path, redis: &str, upstream: &str, extra: &[&str]) -> Self {
        let port = free_port();
        let admin = free_port();
        let data = dir.join(id);
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--upstream".into(),
            upstream.into(),
            "--data-dir".into(),
            data.display().to_string(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--admin-listen".into(),
            format!("127.0.0.1:{admin}"),
            "--redis".into(),
            redis.into(),
            "--cluster".into(),
            "test".into(),
            "--cluster-node-id".into(),
            id.into(),
            "--lease-ttl-ms".into(),
            "1000".into(),
            "--standby-poll-ms".into(),
            "100".into(),
            "--commit-interval-ms".into(),
            "20".into(),
            "--backoff-min-ms".into(),
            "20".into(),
            "--backoff-max-ms".into(),
            "200".into(),
            "--log-filter".into(),
            "sluice=info".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut node = Node {
            id: id.into(),
            port,
            admin,
            log_path: dir.join(format!("{id}.log")),
            data,
            args,
            child: None,
        };
        node.start();
        node
    }

    pub fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{sig}");
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        if self.child.is_none() {
            return;
        }
        self.signal("TERM");
        let mut child = self.child.take().unwrap();
        let exit = child.wait().unwrap();
        assert!(
            exit.success(),
            "{} exits cleanly after SIGTERM: {exit:?}\n{}",
            self.id,
            self.log()
        );
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `/status.json`, `None` while the node does not answer.
    pub async fn status(&self) -> Option<serde_json::Value> {
        let body = get(
            SocketAddr::from(([127, 0, 0, 1], self.admin)),
            "/status.json",
        )
        .await?;
        serde_json::from_slice(&body.1).ok()
    }

    pub async fn role(&self) -> Option<String> {
        let s = self.status().await?;
        Some(s["cluster"]["role"].as_str()?.to_string())
    }

    pub async fn newest_seq(&self) -> Option<u64> {
        self.status().await?["log"]["bounds"]["newest_seq"].as_u64()
    }

    pub async fn metrics(&self) -> String {
        get(SocketAddr::from(([127, 0, 0, 1], self.admin)), "/metrics")
            .await
            .map(|(_, b)| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    pub async fn readyz(&self) -> Option<(u16, String)> {
        get(SocketAddr::from(([127, 0, 0, 1], self.admin)), "/readyz")
            .await
            .map(|(s, b)| (s, String::from_utf8_lossy(&b).into_owned()))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_ref() {
            // A SIGSTOPped child must be continued to die cleanly on some kernels.
            let _ = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
        }
        self.kill9();
    }
}

/// A tolerant HTTP GET: `None` when the server does not answer.
pub async fn get(addr: SocketAddr, path: &str) -> Option<(u16, Vec<u8>)> {
    let work = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.ok()?;
        Some(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(5), work)
        .await
        .ok()??;
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status: u16 = head.split(' ').nth(1)?.parse().ok()?;
    let mut body = raw[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = Vec::new();
        let mut rest = &body[..];
        loop {
            let end = rest.windows(2).position(|w| w == b"\r\n")?;
            let size =
                usize::from_str_radix(std::str::from_utf8(&rest[..end]).ok()?.trim(), 16).ok()?;
            rest = &rest[end + 2..];
            if size == 0 {
                break;
            }
            out.extend_from_slice(rest.get(..size)?);
            rest = rest.get(size + 2..)?;
        }
        body = out;
    }
    Some((status, body))
}

/// Waits until `f` returns `Some`, polling every 50 ms, or panics with `what`.
pub async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The node among `nodes` that says it leads.
pub async fn leader(nodes: &[Node]) -> Option<usize> {
    for (i, n) in nodes.iter().enumerate() {
        if n.running() && n.role().await.as_deref() == Some("leader") {
            return Some(i);
        }
    }
    None
}

pub fn upstream_seq(frame: &[u8]) -> i64 {
    match sluice::decode::decode_frame(frame, &Default::default()) {
        Ok(sluice::decode::DecodedFrame::Message(m)) => m.seq.unwrap(),
        other => panic!("{other:?}"),
    }
}

/// Everything a node's v2 wire returns from seq 1 up to `last`, as seqs.
pub async fn v2_seqs(addr: SocketAddr, last: u64) -> Vec<u64> {
    let url = format!("ws://{addr}/xrpc/network.bsky.jetstream.subscribeEvents?cursor=1");
    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let mut seqs = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while seqs.last().copied().unwrap_or(0) < last {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .unwrap_or_else(|_| {
                panic!("v2 from {addr}: only {} events by the deadline", seqs.len())
            });
        match msg {
            Some(Ok(Message::Text(t))) => {
                let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                if let Some(seq) = v["payload"]["seq"].as_u64() {
                    seqs.push(seq);
                }
            }
            Some(Ok(_)) => {}
            other => panic!("v2 from {addr} ended: {other:?}"),
        }
    }
    seqs
}

/// Every raw frame a node's raw wire returns after upstream seq `after`, until `last_frame`.
pub async fn raw_frames(addr: SocketAddr, after: i64, last_frame: &Bytes) -> Vec<Bytes> {
    let url = format!("ws://{addr}/xrpc/com.atproto.sync.subscribeRepos?cursor={after}");
    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let mut frames = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while frames.last() != Some(last_frame) {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "raw from {addr}: only {} frames by the deadline",
                    frames.len()
                )
            });
        match msg {
            Some(Ok(Message::Binary(b))) => frames.push(b),
            Some(Ok(_)) => {}
            other => panic!("raw from {addr} ended: {other:?}"),
        }
    }
    frames
}
