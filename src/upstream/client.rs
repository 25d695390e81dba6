//! The one upstream subscription.
//!
//! Owns: connecting to the relay, the frame size limit, stall detection (ping/pong),
//! full-jitter reconnect backoff, resuming from the cursor that ingest has reached, and
//! handing each frame over in an allocation of its own (never a view into the read buffer).
//! Must never: decode a frame (ingest does, once), read ahead of ingest by more than the
//! channel's bound, or retry an oversized frame forever.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::{
    self,
    error::CapacityError,
    protocol::{frame::coding::CloseCode, CloseFrame, WebSocketConfig},
    Message,
};

use crate::clock::now_us;

/// What one read of the upstream socket takes at most, and so what tungstenite zeroes
/// before each read. A frame of any size up to `max_frame_bytes` is still read whole
/// (its buffer grows to hold it); this only bounds one `recv`. tungstenite's 128 KiB
/// default zeroed up to that much before every read at the live rate of one frame per
/// read (docs/DECISIONS.md, "Subscriber writes", session 17 "F: the ingest path").
pub const READ_BUFFER_BYTES: usize = 32 * 1024;

/// The relay sluice subscribes to when none is configured.
pub const DEFAULT_UPSTREAM: &str = "wss://bsky.network/xrpc/com.atproto.sync.subscribeRepos";
const SUBSCRIBE_PATH: &str = "/xrpc/com.atproto.sync.subscribeRepos";

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// A host (`bsky.network`) or a full `ws://` / `wss://` URL.
    pub upstream: String,
    /// Largest frame read; bigger ones are counted, logged and skipped.
    pub max_frame_bytes: usize,
    /// No frame and no pong for this long means the connection is dead.
    pub stall_timeout: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// How long a connect (TCP + TLS + upgrade) may take.
    pub connect_timeout: Duration,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            upstream: DEFAULT_UPSTREAM.to_string(),
            max_frame_bytes: 5 * 1024 * 1024,
            stall_timeout: Duration::from_secs(30),
            backoff_min: Duration::from_millis(250),
            backoff_max: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(15),
        }
    }
}

/// Builds the subscription URL from a host or URL, with `?cursor=` when resuming.
pub fn subscribe_url(upstream: &str, cursor: Option<i64>) -> anyhow::Result<url::Url> {
    let with_scheme = if upstream.contains("://") {
        upstream.to_string()
    } else {
        format!("wss://{upstream}")
    };
    let mut url = url::Url::parse(&with_scheme)
        .map_err(|e| anyhow::anyhow!("invalid upstream {upstream:?}: {e}"))?;
    match url.scheme() {
        "ws" | "wss" => {}
        other => anyhow::bail!("upstream scheme must be ws or wss, not {other:?}"),
    }
    if url.host_str().is_none_or(str::is_empty) {
        anyhow::bail!("upstream {upstream:?} has no host");
    }
    if url.path().is_empty() || url.path() == "/" {
        url.set_path(SUBSCRIBE_PATH);
    }
    let kept: Vec<(String, String)> = url
        .query_pairs()
        .filter(|(k, _)| k != "cursor")
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    url.set_query(None);
    if !kept.is_empty() || cursor.is_some() {
        let mut pairs = url.query_pairs_mut();
        for (k, v) in &kept {
            pairs.append_pair(k, v);
        }
        if let Some(cursor) = cursor {
            pairs.append_pair("cursor", &cursor.to_string());
        }
    }
    Ok(url)
}

/// A frame as received, before decoding.
#[derive(Debug)]
pub struct ReceivedFrame {
    pub bytes: Bytes,
    pub received_us: i64,
    /// Which connection it came on: seq regressions are only anomalies within one.
    pub connection: u64,
}

/// State shared between the client and ingest.
#[derive(Debug, Default)]
pub struct UpstreamShared {
    /// The highest upstream seq ingest has accepted, `i64::MIN` when none.
    cursor: AtomicI64,
    /// Frames handed to ingest, and frames ingest has finished with: the client waits for
    /// them to match before reconnecting, so the resume cursor is exact.
    sent: AtomicU64,
    processed: AtomicU64,
    pub connected: AtomicBool,
    /// Bumped by every ingest loop iteration (at least once per idle tick): the watchdog's
    /// evidence that ingest is alive.
    pub ingest_heartbeat: AtomicU64,
    pub connects: AtomicU64,
    pub reconnects: AtomicU64,
    pub oversized_frames: AtomicU64,
    pub skipped_oversized: AtomicU64,
    pub stalls: AtomicU64,
    pub connect_failures: AtomicU64,
}

impl UpstreamShared {
    pub fn new(cursor: Option<i64>) -> Self {
        let shared = Self::default();
        shared.set_cursor(cursor);
        shared
    }

    pub fn cursor(&self) -> Option<i64> {
        match self.cursor.load(Ordering::Acquire) {
            i64::MIN => None,
            c => Some(c),
        }
    }

    pub fn set_cursor(&self, cursor: Option<i64>) {
        self.cursor
            .store(cursor.unwrap_or(i64::MIN), Ordering::Release);
    }

    /// Ingest calls this after handling each frame (after updating the cursor).
    pub fn frame_processed(&self) {
        self.processed.fetch_add(1, Ordering::AcqRel);
    }

    /// Forgets frames a previous ingest run was handed but never finished (it was stopped):
    /// a new run must not wait for them before reconnecting.
    pub fn reset_flow(&self) {
        self.processed
            .store(self.sent.load(Ordering::Acquire), Ordering::Release);
    }

    fn drained(&self) -> bool {
        self.processed.load(Ordering::Acquire) >= self.sent.load(Ordering::Acquire)
    }
}

/// Why a connection ended.
enum Ended {
    Shutdown,
    /// The connection made progress (at least one frame) before it ended.
    Progress,
    Failed,
    /// A frame over the limit; nothing is known about it but its size.
    Oversized,
}

/// Where oversized frames were met: the resume cursor they followed, and how many seqs past
/// it the next connection resumes (0: retry from the cursor itself).
#[derive(Clone, Copy)]
struct OversizedAt {
    at: i64,
    skip: i64,
}

/// Runs the subscription until `shutdown` turns true, sending frames to ingest.
pub async fn run(
    config: UpstreamConfig,
    shared: Arc<UpstreamShared>,
    frames: mpsc::Sender<ReceivedFrame>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    subscribe_url(&config.upstream, None)?;
    let mut attempt: u32 = 0;
    let mut connection: u64 = 0;
    // Oversized frames met at the same resume cursor, and how far to step past it. sluice
    // cannot read the seq of a frame it refused, so the first time it resumes from the last
    // good cursor (a refused frame that repeated an old seq is then simply not resent, and
    // the frame after it is not lost); only when that same position yields an oversized
    // frame again is the frame after the cursor known to be the oversized one, and the
    // client steps past it, one more seq each time.
    let mut oversized_at: Option<OversizedAt> = None;
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        wait_for_ingest(&shared, &mut shutdown).await;
        let cursor = shared.cursor();
        let resume = match (oversized_at, cursor) {
            (Some(OversizedAt { at, skip }), Some(c)) if at == c && skip > 0 => {
                shared.skipped_oversized.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    upstream_cursor = c,
                    skipped_through = c + skip,
                    "resuming past an upstream frame larger than --max-frame-bytes: \
                     that event is lost to sluice; raise the limit to receive it"
                );
                Some(c + skip)
            }
            _ => cursor,
        };
        connection += 1;
        let url = subscribe_url(&config.upstream, resume)?;
        let ended =
            connect_and_read(&config, &url, &shared, &frames, &mut shutdown, connection).await;
        shared.connected.store(false, Ordering::Release);
        match ended {
            Ended::Shutdown => return Ok(()),
            Ended::Progress => {
                attempt = 0;
                oversized_at = None;
            }
            Ended::Failed => attempt = attempt.saturating_add(1),
            Ended::Oversized => {
                wait_for_ingest(&shared, &mut shutdown).await;
                let now = shared.cursor();
                oversized_at = match (oversized_at, now) {
                    (Some(OversizedAt { at, skip }), Some(c)) if at == c => {
                        Some(OversizedAt { at, skip: skip + 1 })
                    }
                    // First time at this position: retry from the last good cursor.
                    (_, Some(c)) => Some(OversizedAt { at: c, skip: 0 }),
                    // No cursor: resuming live skips the frame by itself.
                    (_, None) => None,
                };
                // Nothing is wrong with the link: reconnect promptly.
                attempt = 0;
            }
        }
        if frames.is_closed() {
            return Ok(());
        }
        shared.reconnects.fetch_add(1, Ordering::Relaxed);
        let delay = backoff_delay(&config, attempt);
        tracing::info!(
            delay_ms = delay.as_millis() as u64,
            attempt,
            "reconnecting to upstream"
        );
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.changed() => return Ok(()),
        }
    }
}

/// Full-jitter exponential backoff: uniform in [0, min(max, min·2^attempt)].
pub fn backoff_delay(config: &UpstreamConfig, attempt: u32) -> Duration {
    let ceiling = config
        .backoff_min
        .saturating_mul(1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX))
        .min(config.backoff_max);
    let millis = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rand::thread_rng().gen_range(0..=millis))
}

async fn wait_for_ingest(shared: &UpstreamShared, shutdown: &mut watch::Receiver<bool>) {
    // Bounded: ingest handles a frame in microseconds; if it is wedged, resuming from an
    // older cursor is still correct (ingest drops what it has already seen).
    for _ in 0..500 {
        if shared.drained() || *shutdown.borrow() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn connect_and_read(
    config: &UpstreamConfig,
    url: &url::Url,
    shared: &UpstreamShared,
    frames: &mpsc::Sender<ReceivedFrame>,
    shutdown: &mut watch::Receiver<bool>,
    connection: u64,
) -> Ended {
    let ws_config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
        .max_message_size(Some(config.max_frame_bytes))
        .max_frame_size(Some(config.max_frame_bytes));
    tracing::info!(%url, "connecting to upstream");
    let connect = tokio_tungstenite::connect_async_with_config(url.as_str(), Some(ws_config), true);
    let stream = tokio::select! {
        result = tokio::time::timeout(config.connect_timeout, connect) => match result {
            Ok(Ok((stream, _response))) => stream,
            Ok(Err(err)) => {
                shared.connect_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%url, error = %err, "upstream connect failed");
                return Ended::Failed;
            }
            Err(_) => {
                shared.connect_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%url, timeout_s = config.connect_timeout.as_secs(), "upstream connect timed out");
                return Ended::Failed;
            }
        },
        _ = shutdown.changed() => return Ended::Shutdown,
    };
    shared.connected.store(true, Ordering::Release);
    shared.connects.fetch_add(1, Ordering::Relaxed);
    tracing::info!(%url, "upstream connected");
    let (mut sink, mut source) = stream.split();
    let ping_every = (config.stall_timeout / 3).max(Duration::from_millis(100));
    let mut ping = tokio::time::interval(ping_every);
    ping.tick().await;
    let mut last_heard = tokio::time::Instant::now();
    let mut progressed = false;
    // One shutdown future and one stall timer for the whole connection, not one of each
    // per frame: at a live rate every frame found both pending and registered them anew
    // (a waiter on the shutdown channel, an entry in the timer wheel) only to drop them
    // when the frame arrived. The stall timer is armed at the deadline of the last frame
    // heard when it was armed; when it fires it is moved to the current one if a frame
    // came meanwhile, so a stall is still "nothing heard for `stall_timeout`".
    let shutdown_signal = shutdown.changed();
    tokio::pin!(shutdown_signal);
    let stall = tokio::time::sleep_until(last_heard + config.stall_timeout);
    tokio::pin!(stall);
    let ended = loop {
        // Biased, stall check last: after the thread was held up (a log append waiting on
        // backpressure), a frame already in the socket must count before the deadline does.
        tokio::select! {
            biased;
            _ = &mut shutdown_signal => {
                let close = CloseFrame { code: CloseCode::Away, reason: "sluice shutting down".into() };
                let _ = tokio::time::timeout(Duration::from_secs(1), sink.send(Message::Close(Some(close)))).await;
                break Ended::Shutdown;
            }
            _ = ping.tick() => {
                if let Err(err) = sink.send(Message::Ping(Bytes::new())).await {
                    tracing::warn!(error = %err, "upstream ping failed");
                    break Ended::Failed;
                }
            }
            next = source.next() => match next {
                Some(Ok(Message::Binary(read))) => {
                    last_heard = tokio::time::Instant::now();
                    // The frame in an allocation of its own: tungstenite's payload is a
                    // view into its read buffer, so keeping it (the log keeps every frame
                    // for seconds) pinned that buffer, and each read past it allocated a
                    // new 64 KiB one. The copy lets tungstenite reuse one buffer, and a
                    // frame held anywhere holds only its own bytes.
                    let bytes = Bytes::copy_from_slice(&read);
                    drop(read);
                    let frame = ReceivedFrame { bytes, received_us: now_us(), connection };
                    shared.sent.fetch_add(1, Ordering::AcqRel);
                    if frames.send(frame).await.is_err() {
                        break Ended::Shutdown;
                    }
                    progressed = true;
                }
                Some(Ok(Message::Close(close))) => {
                    tracing::warn!(?close, "upstream closed the connection");
                    break Ended::Failed;
                }
                Some(Ok(_)) => last_heard = tokio::time::Instant::now(),
                Some(Err(tungstenite::Error::Capacity(CapacityError::MessageTooLong { size, max_size }))) => {
                    shared.oversized_frames.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(size, max_size, "upstream frame exceeds --max-frame-bytes; reconnecting from the last good cursor");
                    break Ended::Oversized;
                }
                Some(Err(err)) => {
                    tracing::warn!(error = %err, "upstream read failed");
                    break Ended::Failed;
                }
                None => {
                    tracing::warn!("upstream connection ended");
                    break Ended::Failed;
                }
            },
            () = &mut stall => {
                let deadline = last_heard + config.stall_timeout;
                if deadline > tokio::time::Instant::now() {
                    // Heard from since the timer was armed: not a stall yet.
                    stall.as_mut().reset(deadline);
                    continue;
                }
                shared.stalls.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(stall_timeout_s = config.stall_timeout.as_secs(), "upstream stalled: no frame and no pong; replacing the connection");
                break Ended::Failed;
            }
        }
    };
    match ended {
        Ended::Failed if progressed => Ended::Progress,
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_urls_from_hosts_and_urls() {
        assert_eq!(
            subscribe_url("bsky.network", None).unwrap().as_str(),
            "wss://bsky.network/xrpc/com.atproto.sync.subscribeRepos"
        );
        assert_eq!(
            subscribe_url("ws://127.0.0.1:9/", Some(42))
                .unwrap()
                .as_str(),
            "ws://127.0.0.1:9/xrpc/com.atproto.sync.subscribeRepos?cursor=42"
        );
        assert_eq!(
            subscribe_url("wss://h/custom?cursor=1&x=y", Some(7))
                .unwrap()
                .as_str(),
            "wss://h/custom?x=y&cursor=7"
        );
        assert!(subscribe_url("http://h", None).is_err());
        assert!(subscribe_url("wss://", None).is_err());
    }

    #[test]
    fn backoff_is_bounded_and_grows() {
        let config = UpstreamConfig::default();
        for attempt in 0..40 {
            let delay = backoff_delay(&config, attempt);
            assert!(delay <= config.backoff_max);
        }
        let first_ceiling = config.backoff_min;
        for _ in 0..100 {
            assert!(backoff_delay(&config, 0) <= first_ceiling);
        }
    }
}
