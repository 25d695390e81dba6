//! Recording: subscribes to an upstream `subscribeRepos` websocket and appends every binary
//! frame, byte for byte, to a capture file that [`super::replay`] can serve later.
//!
//! Owns: the recording connection, its stop conditions (count, duration, Ctrl-C, upstream
//! close), the per-frame size limit, and durability of the capture (buffered writes,
//! flushed and fsynced before returning, also on errors). Must never: decode or alter a
//! frame (a capture is evidence of what the upstream sent), hold more than one frame in
//! memory besides the write buffer, or silently drop a frame (every skip is counted and
//! logged).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

use super::capture;
use super::replay;

/// The relay's own frame limit, and so the default for [`RecordOptions::max_frame`].
pub const DEFAULT_MAX_FRAME: usize = 5 << 20;
/// Floor of the transport limit (see [`RecordOptions::max_frame`]).
const MIN_TRANSPORT_LIMIT: usize = 16 << 20;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
const WRITE_BUFFER: usize = 1 << 20;

/// What to record and when to stop.
#[derive(Debug, Clone)]
pub struct RecordOptions {
    /// `ws://` or `wss://` URL of the subscribeRepos endpoint, query included (e.g.
    /// `?cursor=N` to record from a known point).
    pub url: String,
    /// The capture file. Created if missing; truncated unless `append`.
    pub output: PathBuf,
    /// Append to an existing capture instead of truncating it.
    pub append: bool,
    /// Stop after this many frames have been written (skipped oversized frames do not count).
    pub count: Option<u64>,
    /// Stop this long after the connection is established.
    pub duration: Option<Duration>,
    /// Frames larger than this are counted, logged and skipped, not written. Frames beyond
    /// the transport limit, `max(4 × max_frame, 16 MiB)`, cannot be skipped: the websocket
    /// library refuses them and the recording ends with an error (what was written stays).
    pub max_frame: usize,
}

impl RecordOptions {
    /// Truncating, no count or duration limit (so: until Ctrl-C or upstream close), 5 MiB
    /// frame limit.
    pub fn new(url: impl Into<String>, output: impl Into<PathBuf>) -> Self {
        Self {
            url: url.into(),
            output: output.into(),
            append: false,
            count: None,
            duration: None,
            max_frame: DEFAULT_MAX_FRAME,
        }
    }
}

/// Why a recording ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// `count` frames written.
    Count,
    /// `duration` elapsed.
    Duration,
    /// Ctrl-C (SIGINT), or SIGTERM on Unix.
    Interrupted,
    /// The upstream closed the connection (a close frame, an error frame is still recorded
    /// first, or the stream ended).
    UpstreamClosed,
}

/// What a finished recording did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordSummary {
    /// Frames written to the capture.
    pub frames: u64,
    /// Bytes appended to the capture, length prefixes included.
    pub bytes: u64,
    /// Frames above `max_frame`, skipped.
    pub oversized: u64,
    /// Text messages (not part of subscribeRepos), ignored.
    pub ignored_text: u64,
    /// Upstream `seq` of the first and last written frame that carries one: the last is the
    /// cursor to resume recording from.
    pub first_seq: Option<i64>,
    pub last_seq: Option<i64>,
    pub elapsed: Duration,
    pub stop: StopReason,
}

/// Records `opts.url` into `opts.output` until the first of: `count` frames written,
/// `duration` elapsed since the connection was established, Ctrl-C, or the upstream
/// closing. With neither `count` nor `duration` set, it records until Ctrl-C or upstream
/// close. Ctrl-C (and SIGTERM on Unix) always stops gracefully: the capture is flushed and
/// fsynced either way, so callers must not race this future against their own signal
/// handling (dropping it mid-way loses the unflushed tail and the fsync).
///
/// Errors: a URL that is not `ws://`/`wss://`, a zero `count` or `max_frame`, failing to
/// open the output, connect (30 s timeout) or write, or a transport error mid-stream. In the
/// mid-stream case every frame received before the error is already flushed and fsynced.
pub async fn record(opts: RecordOptions) -> anyhow::Result<RecordSummary> {
    let url = url::Url::parse(&opts.url).with_context(|| format!("upstream URL {}", opts.url))?;
    if !matches!(url.scheme(), "ws" | "wss") {
        bail!("upstream URL must be ws:// or wss://, got {}", opts.url);
    }
    if opts.count == Some(0) {
        bail!("count must be at least 1");
    }
    if opts.max_frame == 0 {
        bail!("max_frame must be at least 1 byte");
    }

    let file = tokio::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(opts.append)
        .truncate(!opts.append)
        .open(&opts.output)
        .await
        .with_context(|| format!("opening capture {}", opts.output.display()))?;
    let mut out = tokio::io::BufWriter::with_capacity(WRITE_BUFFER, file);

    let transport_limit = opts.max_frame.saturating_mul(4).max(MIN_TRANSPORT_LIMIT);
    let config = WebSocketConfig::default()
        .max_message_size(Some(transport_limit))
        .max_frame_size(Some(transport_limit));
    let request = opts.url.clone();
    // Run the connect in its own task: a TLS stack without a crypto provider panics inside
    // the library, and that must end this recording with an error, not the process.
    let connect = tokio::spawn(async move {
        tokio_tungstenite::connect_async_with_config(request, Some(config), true).await
    });
    let (mut ws, _) = tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .with_context(|| format!("connecting to {} timed out", opts.url))?
        .map_err(|e| {
            let hint = if url.scheme() == "wss" {
                " (for wss://, this build may lack a rustls crypto provider)"
            } else {
                ""
            };
            anyhow::anyhow!(
                "connecting to {}: the connector failed: {e}{hint}",
                opts.url
            )
        })?
        .with_context(|| format!("connecting to {}", opts.url))?;
    tracing::info!(url = %opts.url, output = %opts.output.display(), "record: connected");

    let started = Instant::now();
    let deadline = opts.duration.map(|d| started + d);
    let mut summary = RecordSummary {
        frames: 0,
        bytes: 0,
        oversized: 0,
        ignored_text: 0,
        first_seq: None,
        last_seq: None,
        elapsed: Duration::ZERO,
        stop: StopReason::UpstreamClosed,
    };
    let interrupted = interrupt();
    tokio::pin!(interrupted);
    let mut scratch = Vec::new();

    let outcome: anyhow::Result<StopReason> = async {
        loop {
            let msg = tokio::select! {
                msg = ws.next() => msg,
                _ = sleep_until_opt(deadline) => return Ok(StopReason::Duration),
                _ = &mut interrupted => return Ok(StopReason::Interrupted),
            };
            let frame = match msg {
                None | Some(Ok(Message::Close(_))) => return Ok(StopReason::UpstreamClosed),
                Some(Err(e)) => return Err(anyhow::Error::new(e).context("upstream stream")),
                Some(Ok(Message::Binary(frame))) => frame,
                Some(Ok(Message::Text(_))) => {
                    summary.ignored_text += 1;
                    continue;
                }
                Some(Ok(_)) => continue, // ping/pong: the library answers pings itself
            };
            if frame.len() > opts.max_frame {
                summary.oversized += 1;
                tracing::warn!(
                    size = frame.len(),
                    limit = opts.max_frame,
                    after_seq = ?summary.last_seq,
                    "record: frame over the size limit skipped"
                );
                continue;
            }
            scratch.clear();
            capture::write_frame(&mut scratch, &frame)?;
            out.write_all(&scratch)
                .await
                .with_context(|| format!("writing {}", opts.output.display()))?;
            summary.frames += 1;
            summary.bytes += scratch.len() as u64;
            if let Some(seq) = replay::frame_seq(&frame) {
                summary.first_seq.get_or_insert(seq);
                summary.last_seq = Some(seq);
            }
            if opts.count.is_some_and(|n| summary.frames >= n) {
                return Ok(StopReason::Count);
            }
        }
    }
    .await;

    // Durability first, whatever happened above: the frames already received are the point.
    let synced = async {
        out.flush().await?;
        out.into_inner().sync_all().await
    }
    .await
    .with_context(|| format!("flushing {}", opts.output.display()));
    if !matches!(outcome, Ok(StopReason::UpstreamClosed) | Err(_)) {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, ws.close(None)).await;
    }
    summary.elapsed = started.elapsed();
    summary.stop = outcome.with_context(|| {
        format!(
            "recording stopped after {} frames (flushed to {})",
            summary.frames,
            opts.output.display()
        )
    })?;
    synced?;
    tracing::info!(?summary, "record: done");
    Ok(summary)
}

/// Resolves on Ctrl-C (SIGINT) or, on Unix, SIGTERM (systemd's stop), so a recording run as
/// a service also ends with its capture flushed.
async fn interrupt() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c() => {}
                    _ = term.recv() => {}
                }
                return;
            }
            Err(e) => tracing::warn!(error = %e, "record: cannot watch SIGTERM; Ctrl-C only"),
        }
    }
    ctrl_c().await;
}

/// Ctrl-C; if it cannot be watched, never (an error must not read as an interrupt).
async fn ctrl_c() {
    if let Err(e) = tokio::signal::ctrl_c().await {
        tracing::warn!(error = %e, "record: cannot watch Ctrl-C");
        std::future::pending::<()>().await;
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
