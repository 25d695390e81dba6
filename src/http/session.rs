//! One subscriber's websocket session: the writer loop shared by every wire.
//!
//! Owns batching (feed many, flush once), the write timeout, ping/pong keepalive with
//! dead-peer detection, per-subscriber message size limits, and the close on shutdown.
//! Must never: encode an event (wires hand over pre-encoded bytes), wait on a peer without
//! a timeout, or keep reading from the log after the peer is gone.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::watch;

use crate::event::Event;
use crate::fanout::{End, Subscription};
use crate::log::SharedEvent;
use crate::rate::TokenBucket;

/// Limits of one session.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// No progress for this long ends the session (the peer is not reading): feeding and
    /// flushing one chunk of `FLUSH_CHUNK_BYTES` (or one larger message) must fit in it.
    pub write_timeout: Duration,
    pub ping_interval: Duration,
    /// No pong (or any message) for this long ends the session (checked at each ping).
    pub pong_timeout: Duration,
    /// Events written per flush.
    pub max_batch: usize,
    /// Largest message sent to any subscriber, bytes (clients may ask for less).
    pub server_max_message_bytes: usize,
    /// Base of the retry hint sent on shutdown, seconds; jitter of the same size is added.
    pub retry_after_secs: u64,
    /// Kernel send buffer of each subscriber socket, bytes.
    pub socket_send_buffer: usize,
    /// Largest message a subscriber may send, bytes: what one connection can make the
    /// daemon buffer. A larger one closes the session with 1009.
    pub client_max_message_bytes: usize,
    /// Text messages (v1 `options_update`) a subscriber may send per second, with a burst
    /// of as many. Each one can rebuild its filter under the hub's lock, so one more closes
    /// the connection with 1008 rather than let it slow everyone's dispatch.
    pub client_updates_per_sec: u32,
    /// Least time between two flushes to one subscriber: an event that finds the last
    /// flush older than this goes out at once; otherwise the session waits out the rest
    /// and sends everything queued by then in one write (one syscall per few events in a
    /// busy stream, at most this much added latency). Zero flushes every batch at once.
    pub coalesce: Duration,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            write_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(20),
            pong_timeout: Duration::from_secs(60),
            max_batch: 256,
            server_max_message_bytes: 8 * 1024 * 1024,
            retry_after_secs: 5,
            socket_send_buffer: 128 * 1024,
            // An `options_update` with 10,000 DIDs is ~0.5 MB.
            client_max_message_bytes: 2 * 1024 * 1024,
            client_updates_per_sec: 10,
            coalesce: Duration::from_micros(1000),
        }
    }
}

/// What a wire decides for each session.
pub trait WireSession: Send + 'static {
    /// The message carrying this event, or `None` to skip it (e.g. the rest of a raw frame).
    fn message(&mut self, event: &Event) -> Option<Message>;
    /// The client's own message size limit (0 = none).
    fn client_max_message_bytes(&self) -> usize;
    /// What to tell the subscriber about an event it will not get because of its size.
    fn oversized_notice(&self, event: &Event, size: usize, limit: usize) -> Option<Message>;
    /// The last message before closing for `end`, and the close code and reason.
    fn ending(&self, end: &End) -> (Option<Message>, u16, String);
    /// A text message from the client (e.g. `options_update`); Err closes the session.
    fn on_text(&mut self, text: &str, sub: &mut Subscription) -> Result<(), String>;
}

/// Live counters of one wire, shared by its sessions and read by metrics.
#[derive(Debug, Default)]
pub struct WireCounters {
    pub events: AtomicU64,
    pub bytes: AtomicU64,
    pub oversized: AtomicU64,
}

/// Why a session ended, for metrics and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEnd {
    PeerClosed,
    PeerDead,
    WriteTimeout,
    WriteFailed,
    Shutdown,
    Stream(End),
    Protocol(String),
    /// The subscriber sent a message over `client_max_message_bytes`.
    MessageTooBig,
    /// The subscriber sent text messages faster than `client_updates_per_sec`.
    UpdatesTooFast,
}

impl SessionEnd {
    pub fn reason(&self) -> &'static str {
        match self {
            SessionEnd::PeerClosed => "peer_closed",
            SessionEnd::PeerDead => "peer_dead",
            SessionEnd::WriteTimeout => "write_timeout",
            SessionEnd::WriteFailed => "write_failed",
            SessionEnd::Shutdown => "shutdown",
            SessionEnd::Stream(End::TooOld { .. }) => "too_old",
            SessionEnd::Stream(End::TooSlow) => "too_slow",
            SessionEnd::Stream(End::Closed) => "log_closed",
            SessionEnd::Stream(End::ReadFailed(_)) => "read_failed",
            SessionEnd::Protocol(_) => "protocol",
            SessionEnd::MessageTooBig => "message_too_big",
            SessionEnd::UpdatesTooFast => "updates_too_fast",
        }
    }
}

/// Jittered retry hint: base plus up to base again.
pub fn retry_after(base_secs: u64) -> u64 {
    use rand::Rng;
    base_secs + rand::thread_rng().gen_range(0..=base_secs.max(1))
}

/// Runs the session until the peer leaves, the stream ends, or shutdown.
///
/// The socket is not split into halves: it is read only by the `select!` futures and
/// written only after one of them completes, so one owner suffices and no read or write
/// pays for the lock a split pair shares.
pub async fn run(
    mut socket: WebSocket,
    mut sub: Subscription,
    mut wire: impl WireSession,
    config: SessionConfig,
    mut shutdown: watch::Receiver<bool>,
    initial: Vec<Message>,
    counters: &WireCounters,
) -> SessionEnd {
    for message in initial {
        if socket.send(message).await.is_err() {
            return SessionEnd::WriteFailed;
        }
    }
    let mut ping = tokio::time::interval(config.ping_interval);
    ping.tick().await;
    let mut last_heard = tokio::time::Instant::now();
    let updates_per_sec = f64::from(config.client_updates_per_sec);
    let mut updates = TokenBucket::new(updates_per_sec, updates_per_sec);
    let mut last_flush: Option<tokio::time::Instant> = None;
    let end = loop {
        let mut batch = tokio::select! {
            biased;
            _ = shutdown.changed() => break SessionEnd::Shutdown,
            incoming = socket.next() => {
                match incoming {
                    Some(Ok(Message::Text(text))) => {
                        last_heard = tokio::time::Instant::now();
                        if !updates.try_take(1.0) {
                            break SessionEnd::UpdatesTooFast;
                        }
                        if let Err(problem) = wire.on_text(text.as_str(), &mut sub) {
                            break SessionEnd::Protocol(problem);
                        }
                    }
                    Some(Ok(Message::Close(_))) | None => break SessionEnd::PeerClosed,
                    Some(Ok(_)) => last_heard = tokio::time::Instant::now(),
                    Some(Err(e)) if is_capacity_error(&e) => break SessionEnd::MessageTooBig,
                    Some(Err(_)) => break SessionEnd::PeerClosed,
                }
                continue;
            }
            _ = ping.tick() => {
                // Checked per ping rather than with a timer of its own (re-armed on every
                // wakeup): a dead peer is noticed within one ping interval of the timeout.
                if last_heard.elapsed() >= config.pong_timeout {
                    break SessionEnd::PeerDead;
                }
                if tokio::time::timeout(config.write_timeout, socket.send(Message::Ping(Default::default()))).await.is_err() {
                    break SessionEnd::WriteTimeout;
                }
                continue;
            }
            batch = sub.next_batch(config.max_batch) => match batch {
                Ok(events) => events,
                Err(end) => break SessionEnd::Stream(end),
            },
        };
        // At most one flush per `coalesce`: an event after a quiet spell goes out at once;
        // in a busy stream the session sleeps out the rest of the interval and then takes
        // everything that queued meanwhile, so it is woken once per flush rather than once
        // per event.
        if let Some(earliest) = last_flush.map(|t| t + config.coalesce) {
            if batch.len() < config.max_batch && tokio::time::Instant::now() < earliest {
                tokio::time::sleep_until(earliest).await;
                batch.extend(sub.try_next_batch(config.max_batch - batch.len()));
            }
        }
        match write_batch(&mut socket, &mut wire, &batch, &config, counters).await {
            Ok(true) => last_flush = Some(tokio::time::Instant::now()),
            Ok(false) => {}
            Err(end) => break end,
        }
    };
    let (last, code, reason) = match &end {
        SessionEnd::Shutdown => (
            None,
            1012,
            format!(
                "sluice is restarting; resume with your cursor in {} s",
                retry_after(config.retry_after_secs)
            ),
        ),
        SessionEnd::Stream(stream_end) => wire.ending(stream_end),
        SessionEnd::Protocol(problem) => (None, 1008, problem.clone()),
        SessionEnd::PeerDead => (None, 1001, "no pong".to_string()),
        SessionEnd::MessageTooBig => (
            None,
            1009,
            format!("message over {} bytes", config.client_max_message_bytes),
        ),
        SessionEnd::UpdatesTooFast => (
            None,
            1008,
            format!(
                "more than {} messages per second",
                config.client_updates_per_sec
            ),
        ),
        _ => (None, 1000, String::new()),
    };
    if !matches!(
        end,
        SessionEnd::PeerClosed | SessionEnd::WriteFailed | SessionEnd::WriteTimeout
    ) {
        let close = async {
            if let Some(last) = last {
                socket.send(last).await?;
            }
            socket
                .send(Message::Close(Some(CloseFrame {
                    code,
                    reason: truncate_reason(reason).into(),
                })))
                .await
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), close).await;
    }
    end
}

/// Feeds the batch's messages and flushes them; whether anything was written.
async fn write_batch<S>(
    sink: &mut S,
    wire: &mut impl WireSession,
    events: &[SharedEvent],
    config: &SessionConfig,
    counters: &WireCounters,
) -> Result<bool, SessionEnd>
where
    S: futures_util::Sink<Message> + Unpin,
{
    // Read per batch: `options_update` may change it mid-stream.
    let limit = match wire.client_max_message_bytes() {
        0 => config.server_max_message_bytes,
        n => n.min(config.server_max_message_bytes),
    };
    let mut unflushed = 0usize;
    let mut fed_any = false;
    let mut outcome = Ok(());
    // The write timeout bounds the time to make progress, not a whole batch: it restarts
    // after every flushed chunk of `FLUSH_CHUNK_BYTES`, and covers the `feed`s too, which
    // wait on the socket once tungstenite's buffer is full.
    let mut deadline = tokio::time::Instant::now() + config.write_timeout;
    let (mut sent, mut sent_bytes, mut oversized) = (0u64, 0u64, 0u64);
    for event in events {
        let Some(message) = wire.message(event) else {
            continue;
        };
        let size = message_len(&message);
        let message = if size > limit {
            oversized += 1;
            match wire.oversized_notice(event, size, limit) {
                Some(notice) => notice,
                None => continue,
            }
        } else {
            sent += 1;
            sent_bytes += size as u64;
            message
        };
        unflushed += message_len(&message).max(1);
        fed_any = true;
        outcome = write_step(tokio::time::timeout_at(deadline, sink.feed(message)).await);
        if outcome.is_ok() && unflushed >= FLUSH_CHUNK_BYTES {
            outcome = write_step(tokio::time::timeout_at(deadline, sink.flush()).await);
            unflushed = 0;
            deadline = tokio::time::Instant::now() + config.write_timeout;
        }
        if outcome.is_err() {
            break;
        }
    }
    if outcome.is_ok() && unflushed > 0 {
        outcome = write_step(tokio::time::timeout_at(deadline, sink.flush()).await);
    }
    counters.events.fetch_add(sent, Ordering::Relaxed);
    counters.bytes.fetch_add(sent_bytes, Ordering::Relaxed);
    counters.oversized.fetch_add(oversized, Ordering::Relaxed);
    outcome.map(|()| fed_any)
}

/// Bytes fed to a subscriber between two flushes at most (plus one message): the unit of
/// progress the write timeout waits for.
const FLUSH_CHUNK_BYTES: usize = 256 * 1024;

/// What one timed feed or flush means for the session.
fn write_step<E>(
    result: Result<Result<(), E>, tokio::time::error::Elapsed>,
) -> Result<(), SessionEnd> {
    match result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(SessionEnd::WriteFailed),
        Err(_) => Err(SessionEnd::WriteTimeout),
    }
}

/// Whether a read failed because the subscriber's message was over the size limit.
fn is_capacity_error(error: &axum::Error) -> bool {
    use tokio_tungstenite::tungstenite::Error;
    std::error::Error::source(error)
        .and_then(|inner| inner.downcast_ref::<Error>())
        .is_some_and(|e| matches!(e, Error::Capacity(_)))
}

fn message_len(message: &Message) -> usize {
    match message {
        Message::Text(t) => t.len(),
        Message::Binary(b) => b.len(),
        _ => 0,
    }
}

/// Close reasons are limited to 123 bytes by the websocket protocol.
fn truncate_reason(mut reason: String) -> String {
    if reason.len() > 123 {
        let mut cut = 123;
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        reason.truncate(cut);
    }
    reason
}
