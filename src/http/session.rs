//! One subscriber's websocket session: the writer loop shared by every wire.
//!
//! Owns batching (many events, one write), the write timeout, ping/pong keepalive with
//! dead-peer detection, per-subscriber message size limits, the close on shutdown, and
//! the dispatcher's side of the session (`DirectWriter`: the same encoding, written
//! without blocking while the session waits, the rest left to the session).
//! Must never: encode an event itself (wires hand over pre-encoded bytes, compressed once
//! per scheme and shared), wait on a peer without
//! a timeout, or keep reading from the log after the peer is gone.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use tokio::sync::watch;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::event::Event;
use crate::fanout::filter::Filter;
use crate::fanout::{Direct, DirectWrite, End, PoolError, Subscription};
use crate::http::admission_text::{self, ClientOptions, TextBusy, TextJob, TextPool};
use crate::http::budget::{spent_in, Spent};
use crate::log::SharedEvent;
use crate::rate::TokenBucket;

use super::websocket::{Conn, Socket};
use crate::wire::Frame;

/// Limits of one session.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// No progress for this long ends the session (the peer is not reading): writing one
    /// chunk of `WRITE_CHUNK_BYTES` (or one larger message) must fit in it.
    pub write_timeout: Duration,
    pub ping_interval: Duration,
    /// No pong (or any message) for this long ends the session (checked at each ping).
    pub pong_timeout: Duration,
    /// Events taken from the queue per write.
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
    /// Least time between two writes to one subscriber: an event that finds the last
    /// write older than this goes out at once; otherwise the session waits out the rest
    /// and sends everything queued by then in one write (one syscall per few events in a
    /// busy stream, at most this much added latency). Zero writes every batch at once.
    pub coalesce: Duration,
    /// A message from the subscriber (all its fragments) must arrive within this long of
    /// its first byte, or the session closes with 1008.
    pub client_message_timeout: Duration,
    /// Whether the dispatcher writes a live subscriber's events itself while the session
    /// waits with nothing in hand ([`DirectWriter`]); off, every write is the session's.
    pub direct_writes: bool,
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
            client_message_timeout: Duration::from_secs(10),
            direct_writes: true,
        }
    }
}

/// What a wire decides for each session.
pub trait WireSession: Send + 'static {
    /// The message carrying this event, or `None` to skip it (e.g. the rest of a raw frame),
    /// uncompressed: the size limits apply to it.
    fn message(&mut self, event: &Event) -> Option<Frame>;
    /// A message as it goes on this subscriber's wire: compressed if it asked for it.
    /// `seq` names the event the message carries (its compressed form is shared by every
    /// subscriber of the scheme), `None` for a message of this subscriber's own (a notice,
    /// an error frame). `None` back: it could not be encoded (counted by the wire) and is
    /// not sent.
    fn encode(&self, frame: Frame, seq: Option<u64>) -> Option<Frame> {
        let _ = seq;
        Some(frame)
    }
    /// The client's own message size limit (0 = none).
    fn client_max_message_bytes(&self) -> usize;
    /// What to tell the subscriber about an event it will not get because of its size.
    fn oversized_notice(&self, event: &Event, size: usize, limit: usize) -> Option<Frame>;
    /// How the session says goodbye when its stream ends with `end`.
    fn ending(&self, end: &End) -> Closing;
    /// A text message from the client (e.g. `options_update`): the work that reads it
    /// (run off the async workers once its size is paid for), or `None` to ignore it (the
    /// default: v2 and raw clients have nothing to send, so a stray message is ignored
    /// rather than punished).
    fn on_text(&mut self, text: tokio_tungstenite::tungstenite::Utf8Bytes) -> Option<TextJob> {
        let _ = text;
        None
    }
    /// Applies what a text message asked for: the filter it asks for, if any (the session
    /// pays its index work and applies it).
    fn apply_text(&mut self, options: ClientOptions) -> Option<Filter> {
        Some(options.filter)
    }
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
    /// The hub-wide index budget could not pay for the filter change within
    /// `fanout::MAX_INDEX_WAIT`; this is how long it would have taken.
    IndexBusy(Duration),
    /// The subscriber broke the websocket protocol (an unmasked frame, a bad opcode, an
    /// invalid close code: 1002; text that is not UTF-8: 1007).
    Violation {
        code: u16,
        problem: String,
    },
    /// What the subscriber holds (a message under way, its filter) did not fit the
    /// client-memory budget.
    MemorySpent(Spent),
    /// The subscriber did not finish a message within `client_message_timeout`.
    MessageTimeout,
    /// The client-text budget (`admission_text`) could not take the subscriber's message
    /// within `admission_text::MAX_TEXT_WAIT`.
    TextBusy(TextBusy),
}

impl SessionEnd {
    /// Every `reason()` label, so metrics can show each one at 0 from the first scrape.
    pub const REASONS: [&'static str; 17] = [
        "peer_closed",
        "peer_dead",
        "write_timeout",
        "write_failed",
        "shutdown",
        "too_old",
        "too_slow",
        "log_closed",
        "read_failed",
        "protocol",
        "message_too_big",
        "updates_too_fast",
        "index_busy",
        "protocol_error",
        "memory_budget",
        "message_timeout",
        "text_busy",
    ];

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
            SessionEnd::IndexBusy(_) => "index_busy",
            SessionEnd::Violation { .. } => "protocol_error",
            SessionEnd::MemorySpent(_) => "memory_budget",
            SessionEnd::MessageTimeout => "message_timeout",
            SessionEnd::TextBusy(_) => "text_busy",
        }
    }
}

/// Waits out `wait` unless shutdown comes first; whether it was waited out.
pub async fn pause(wait: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    if wait.is_zero() {
        return true;
    }
    tokio::select! {
        _ = tokio::time::sleep(wait) => true,
        _ = shutdown.wait_for(|&s| s) => false,
    }
}

/// How a session says goodbye on the wire: its last message, if the wire has one for
/// this end (an error frame), then a close frame with `code` and `reason`.
pub struct Closing {
    pub last: Option<Frame>,
    pub code: u16,
    pub reason: String,
}

impl Closing {
    /// Every wire's goodbye at shutdown (`End::Closed`): 1012, nothing before it.
    pub fn restarting() -> Self {
        Closing {
            last: None,
            code: 1012,
            reason: "sluice is restarting".into(),
        }
    }

    /// Every wire's goodbye when the log could not be read (`End::ReadFailed`): 1011,
    /// after `last`, the wire's own error frame if it has one.
    pub fn internal_error(last: Option<Frame>) -> Self {
        Closing {
            last,
            code: 1011,
            reason: "InternalError".into(),
        }
    }
}

/// How waiting for the index budget before applying a filter change ended.
enum Waited {
    Done,
    /// Another text message came meanwhile: it replaces the change waiting.
    Superseded(tokio_tungstenite::tungstenite::Utf8Bytes),
    Ended(SessionEnd),
}

/// Waits out `wait` before a filter change while still reading the client, so one that
/// leaves (or sends a newer update) does not leave a change queued on the budget.
async fn wait_for_budget(
    socket: &mut Socket,
    wait: Duration,
    shutdown: &mut watch::Receiver<bool>,
) -> Waited {
    if wait.is_zero() {
        return Waited::Done;
    }
    let until = tokio::time::Instant::now() + wait;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(until) => return Waited::Done,
            _ = shutdown.wait_for(|&s| s) => return Waited::Ended(SessionEnd::Shutdown),
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Text(text))) => return Waited::Superseded(text),
                Some(Ok(Message::Ping(p) | Message::Pong(p))) => {
                    if let Some(memory) = socket.memory() {
                        memory.control_done(p.len() + 6);
                    }
                }
                Some(Ok(Message::Binary(_) | Message::Frame(_))) => {
                    if let Some(memory) = socket.memory() {
                        memory.message_done();
                    }
                }
                Some(Ok(Message::Close(_))) | None => {
                    return Waited::Ended(SessionEnd::PeerClosed)
                }
                Some(Err(e)) => return Waited::Ended(read_error(e)),
            },
        }
    }
}

/// The close reason for a filter the index budget could not pay for in time.
pub fn index_busy_reason(wait: Duration) -> String {
    format!(
        "the server is busy with filter changes; retry in {} s",
        wait.as_secs() + 1
    )
}

/// Runs the session until the peer leaves, the stream ends, or shutdown.
///
/// The socket is not split into halves: it is read only by the `select!` futures and
/// written only after one of them completes, so one owner suffices and no read or write
/// pays for the lock a split pair shares.
// Each argument comes from a different owner (the socket, the hub, the wire, the
// settings, the shared counters and the client-text pool).
#[allow(clippy::too_many_arguments)]
pub async fn run(
    mut socket: Socket,
    mut sub: Subscription,
    wire: impl WireSession,
    config: SessionConfig,
    mut shutdown: watch::Receiver<bool>,
    initial: Vec<Frame>,
    counters: &Arc<WireCounters>,
    texts: &TextPool,
) -> SessionEnd {
    // Shared with the dispatcher's direct writes, which encode with it too.
    let wire = Arc::new(Mutex::new(wire));
    let initial: Vec<Frame> = initial
        .into_iter()
        .filter_map(|frame| wire.lock().encode(frame, None))
        .collect();
    if let Err(end) = write_chunked(&mut socket, &initial, &config).await {
        return end;
    }
    // Grows to the batches this subscriber actually gets: an idle one holds nothing.
    let mut frames = Vec::new();
    let mut ping = tokio::time::interval(config.ping_interval);
    ping.tick().await;
    let mut last_heard = tokio::time::Instant::now();
    let updates_per_sec = f64::from(config.client_updates_per_sec);
    let mut updates = TokenBucket::new(updates_per_sec, updates_per_sec);
    // Checks that a message under way is finished in time; re-armed only when it fires,
    // so the loop does not register a timer per batch.
    let message_check = tokio::time::sleep(config.client_message_timeout);
    tokio::pin!(message_check);
    // One future for the whole session: `changed()` made afresh on every turn of the loop
    // registered with the shutdown channel, which every session shares, and unregistered
    // again whenever another branch won (twice per write).
    let mut stop = shutdown.clone();
    let stopping = async move {
        let _ = stop.wait_for(|&s| s).await;
    };
    tokio::pin!(stopping);
    if let Some(peer) = socket.peer() {
        sub.set_peer(peer.ip());
    }
    if config.direct_writes && socket.conn().takes_direct() {
        let writer = DirectWriter {
            wire: wire.clone(),
            conn: socket.conn().clone(),
            server_max_message_bytes: config.server_max_message_bytes,
            counters: counters.clone(),
        };
        sub.set_direct(Arc::new(writer), config.coalesce);
    }
    let charged = match socket.memory() {
        Some(memory) => memory.set_filter(sub.filter().memory_bytes()),
        None => Ok(()),
    };
    let end = if let Err(why) = charged {
        SessionEnd::MemorySpent(why)
    } else {
        'session: loop {
            let mut batch = tokio::select! {
                biased;
                () = &mut stopping => break SessionEnd::Shutdown,
                incoming = socket.recv() => {
                    match incoming {
                        Some(Ok(Message::Text(text))) => {
                        // An update that arrives while an earlier one waits for the index
                        // budget replaces it (the earlier one's reservation is refunded).
                        let mut next_text = Some(text);
                        while let Some(text) = next_text.take() {
                            last_heard = tokio::time::Instant::now();
                            if let Some(memory) = socket.memory() {
                                memory.message_done();
                            }
                            if !updates.try_take(1.0) {
                                break 'session SessionEnd::UpdatesTooFast;
                            }
                            let size = text.len();
                            let Some(job) = wire.lock().on_text(text) else {
                                continue;
                            };
                            // Paid for by size before it is parsed: the address's share
                            // (still reading the client meanwhile), then the total.
                            let ip = socket.peer().map(|p| p.ip());
                            let wait = match texts.charge_share(ip, size) {
                                Ok(wait) => wait,
                                Err(busy) => break 'session SessionEnd::TextBusy(busy),
                            };
                            match wait_for_budget(&mut socket, wait, &mut shutdown).await {
                                Waited::Done => {}
                                Waited::Superseded(newer) => {
                                    next_text = Some(newer);
                                    continue;
                                }
                                Waited::Ended(end) => break 'session end,
                            }
                            let options = match texts.parse(size, job).await {
                                Ok(Ok(options)) => options,
                                Ok(Err(problem)) => break 'session SessionEnd::Protocol(problem),
                                Err(busy) => break 'session SessionEnd::TextBusy(busy),
                            };
                            let Some(filter) = wire.lock().apply_text(options) else {
                                continue;
                            };
                            let wait = match sub.reserve_filter_change(&filter) {
                                Ok(wait) => wait,
                                Err(busy) => break 'session SessionEnd::IndexBusy(busy.would_wait),
                            };
                            match wait_for_budget(&mut socket, wait, &mut shutdown).await {
                                Waited::Done => {}
                                Waited::Superseded(newer) => {
                                    sub.refund_filter_change(&filter);
                                    next_text = Some(newer);
                                    continue;
                                }
                                Waited::Ended(end) => {
                                    // The client left (or we stop) before the change was
                                    // applied: it costs the budget nothing.
                                    sub.refund_filter_change(&filter);
                                    break 'session end;
                                }
                            }
                            if let Some(memory) = socket.memory() {
                                if let Err(why) = memory.set_filter(filter.memory_bytes()) {
                                    break 'session SessionEnd::MemorySpent(why);
                                }
                            }
                            sub.set_filter(filter);
                        }
                    }
                    Some(Ok(Message::Close(frame))) => {
                            // tungstenite has queued the answering close (1002 for a code
                            // the protocol does not allow); send it.
                            let _ = tokio::time::timeout(CLOSE_WAIT, socket.flush()).await;
                            // tungstenite hands over a close with a code the protocol does
                            // not allow as 1002 "Protocol violation", the answer it sends.
                            break match frame {
                                Some(f) if u16::from(f.code) == 1002
                                    && f.reason.as_str() == TUNGSTENITE_BAD_CLOSE =>
                                {
                                    SessionEnd::Violation {
                                        code: 1002,
                                        problem: "close code not allowed".to_string(),
                                    }
                                }
                                _ => SessionEnd::PeerClosed,
                            };
                        }
                        None => break SessionEnd::PeerClosed,
                        Some(Ok(message)) => {
                            last_heard = tokio::time::Instant::now();
                            if let Some(memory) = socket.memory() {
                                match &message {
                                    // Masked client frame of up to 125 bytes: 6 bytes of header.
                                    Message::Ping(p) | Message::Pong(p) => memory.control_done(p.len() + 6),
                                    _ => memory.message_done(),
                                }
                            }
                        }
                        Some(Err(e)) => break read_error(e),
                    }
                    continue;
                }
                _ = &mut message_check => {
                    let timeout = config.client_message_timeout;
                    let since = socket.memory().and_then(|m| m.partial_since());
                    if since.is_some_and(|t| t.elapsed() >= timeout) {
                        break SessionEnd::MessageTimeout;
                    }
                    let next = since.unwrap_or_else(tokio::time::Instant::now) + timeout;
                    message_check.as_mut().reset(next);
                    continue;
                }
                _ = ping.tick() => {
                    // Checked per ping rather than with a timer of its own (re-armed on every
                    // wakeup): a dead peer is noticed within one ping interval of the timeout.
                    if last_heard.elapsed() >= config.pong_timeout {
                        break SessionEnd::PeerDead;
                    }
                    if tokio::time::timeout(config.write_timeout, socket.ping()).await.is_err() {
                        break SessionEnd::WriteTimeout;
                    }
                    continue;
                }
                batch = sub.next_batch(config.max_batch) => match batch {
                    Ok(events) => events,
                    Err(end) => break SessionEnd::Stream(end),
                },
            };
            if batch.is_empty() {
                // The rest of a direct write the socket did not take at once.
                let flushed = tokio::time::timeout(config.write_timeout, socket.flush()).await;
                if let Err(end) = write_step(flushed) {
                    break end;
                }
                sub.wrote(tokio::time::Instant::now());
                continue;
            }
            // At most one write per `coalesce`: an event after a quiet spell goes out at once;
            // in a busy stream the session sleeps out the rest of the interval and then takes
            // everything that queued meanwhile, so it is woken once per write rather than once
            // per event. The last write may have been the dispatcher's (it queues what comes
            // within the interval of its own write).
            if let Some(earliest) = sub.last_write().map(|t| t + config.coalesce) {
                if batch.len() < config.max_batch && tokio::time::Instant::now() < earliest {
                    tokio::time::sleep_until(earliest).await;
                    batch.extend(sub.try_next_batch(config.max_batch - batch.len()));
                }
            }
            let written = if sub.is_live() {
                write_batch(&mut socket, &wire, &batch, &mut frames, &config, counters).await
            } else {
                match write_catchup(&sub, socket, &wire, batch, frames, &config, counters).await {
                    Ok((back, scratch, written)) => {
                        (socket, frames) = (back, scratch);
                        written
                    }
                    // The pool stopped (shutdown) with the connection in its hands.
                    Err(PoolError::Stopped) => return SessionEnd::Shutdown,
                    // The write panicked (counted and logged by the pool): the
                    // connection went with it.
                    Err(PoolError::Panicked(_)) => return SessionEnd::WriteFailed,
                }
            };
            match written {
                Ok(true) => sub.wrote(tokio::time::Instant::now()),
                Ok(false) => {}
                Err(end) => break end,
            }
        }
    };
    // The dispatcher writes nothing after this: the session's last frames are its own.
    socket.conn().close_direct();
    drop(sub);
    let (last, code, reason) = match &end {
        SessionEnd::Shutdown => (
            None,
            1012,
            format!(
                "sluice is restarting; resume with your cursor in {} s",
                crate::rate::retry_after(config.retry_after_secs)
            ),
        ),
        SessionEnd::Stream(stream_end) => {
            let closing = wire.lock().ending(stream_end);
            (closing.last, closing.code, closing.reason)
        }
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
        SessionEnd::IndexBusy(wait) => (None, 1013, index_busy_reason(*wait)),
        SessionEnd::TextBusy(busy) => (None, 1013, admission_text::busy_reason(*busy)),
        SessionEnd::Violation { code, problem } => (None, *code, problem.clone()),
        SessionEnd::MemorySpent(why) => (
            None,
            1013,
            format!(
                "{why}; retry in {} s",
                crate::rate::retry_after(config.retry_after_secs)
            ),
        ),
        SessionEnd::MessageTimeout => (
            None,
            1008,
            format!(
                "message not finished within {} s",
                config.client_message_timeout.as_secs()
            ),
        ),
        _ => (None, 1000, String::new()),
    };
    if !matches!(
        end,
        SessionEnd::PeerClosed | SessionEnd::WriteFailed | SessionEnd::WriteTimeout
    ) {
        let close = async {
            let last = last.and_then(|frame| wire.lock().encode(frame, None));
            if let Some(last) = last {
                socket.write_frames(&[last]).await?;
            }
            socket.close(code, &reason).await
        };
        let _ = tokio::time::timeout(CLOSE_WAIT, close).await;
    }
    end
}

/// The reason tungstenite puts in place of a peer's close frame whose code the protocol
/// does not allow (it answers with that frame).
const TUNGSTENITE_BAD_CLOSE: &str = "Protocol violation";

/// How long the closing handshake may take to write.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// How the session ends on an error reading the subscriber's messages.
fn read_error(error: WsError) -> SessionEnd {
    use tokio_tungstenite::tungstenite::error::ProtocolError;
    match error {
        WsError::Capacity(_) => SessionEnd::MessageTooBig,
        WsError::Io(e) if spent_in(&e).is_some() => {
            SessionEnd::MemorySpent(spent_in(&e).unwrap_or(Spent::Total))
        }
        WsError::Utf8(problem) => SessionEnd::Violation {
            code: 1007,
            problem: format!("text message is not UTF-8: {problem}"),
        },
        // The peer went away without a closing handshake: not a violation worth a frame.
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => SessionEnd::PeerClosed,
        WsError::Protocol(problem) => SessionEnd::Violation {
            code: 1002,
            problem: problem.to_string(),
        },
        _ => SessionEnd::PeerClosed,
    }
}

/// Writes the batch's messages, a chunk of `WRITE_CHUNK_BYTES` per `writev` at most;
/// whether anything was written. `frames` is scratch space kept across batches.
async fn write_batch(
    socket: &mut Socket,
    wire: &Mutex<impl WireSession>,
    events: &[SharedEvent],
    frames: &mut Vec<Frame>,
    config: &SessionConfig,
    counters: &WireCounters,
) -> Result<bool, SessionEnd> {
    let sent = encode_batch(
        &mut *wire.lock(),
        events,
        frames,
        config.server_max_message_bytes,
    );
    let outcome = write_chunked(socket, frames, config).await;
    sent.count(counters);
    outcome.map(|()| !frames.is_empty())
}

/// [`write_batch`] for a subscriber in catch-up: run on the catch-up pool, below the live
/// path's priority, with the socket and the scratch space handed there and back (the
/// session does nothing else with them meanwhile, as for any write).
async fn write_catchup<W: WireSession>(
    sub: &Subscription,
    mut socket: Socket,
    wire: &Arc<Mutex<W>>,
    batch: Vec<SharedEvent>,
    mut frames: Vec<Frame>,
    config: &SessionConfig,
    counters: &Arc<WireCounters>,
) -> Result<(Socket, Vec<Frame>, Result<bool, SessionEnd>), PoolError> {
    let (wire, config, counters) = (wire.clone(), config.clone(), counters.clone());
    let cost = sub.pace_cost(&batch);
    sub.on_catchup_pool(cost, async move {
        let written =
            write_batch(&mut socket, &wire, &batch, &mut frames, &config, &counters).await;
        (socket, frames, written)
    })
    .await
}

/// What a batch's messages were, for the wire's counters.
#[derive(Default)]
struct Sent {
    events: u64,
    bytes: u64,
    oversized: u64,
}

impl Sent {
    /// Adds to the wire's counters. Every session of the wire shares them (one cache line
    /// between the worker threads): an add of nothing is skipped.
    fn count(&self, counters: &WireCounters) {
        if self.events > 0 {
            counters.events.fetch_add(self.events, Ordering::Relaxed);
            counters.bytes.fetch_add(self.bytes, Ordering::Relaxed);
        }
        if self.oversized > 0 {
            counters
                .oversized
                .fetch_add(self.oversized, Ordering::Relaxed);
        }
    }
}

/// The messages of `events` on `wire` into `frames` (cleared first): each event's message
/// encoded for this subscriber, or its oversized notice when the message is over the
/// client's limit (at most `server_max` bytes).
fn encode_batch<E: std::ops::Deref<Target = Event>>(
    wire: &mut impl WireSession,
    events: &[E],
    frames: &mut Vec<Frame>,
    server_max: usize,
) -> Sent {
    // Read per batch: `options_update` may change it mid-stream.
    let limit = match wire.client_max_message_bytes() {
        0 => server_max,
        n => n.min(server_max),
    };
    frames.clear();
    let mut sent = Sent::default();
    for event in events {
        let Some(frame) = wire.message(event) else {
            continue;
        };
        // The limit applies to the uncompressed message, whatever the wire encoding.
        let size = frame.len();
        if size > limit {
            sent.oversized += 1;
            let notice = wire.oversized_notice(event, size, limit);
            frames.extend(notice.and_then(|frame| wire.encode(frame, None)));
        } else if let Some(frame) = wire.encode(frame, Some(event.seq)) {
            sent.events += 1;
            sent.bytes += frame.len() as u64;
            frames.push(frame);
        }
    }
    sent
}

/// The dispatcher's side of a session ([`DirectWrite`]): encodes a live subscriber's
/// events with the session's wire and writes them on its connection without blocking,
/// while the session waits with nothing in hand. What the socket does not take whole is
/// the session's to write (its write timeout applies there).
struct DirectWriter<W> {
    wire: Arc<Mutex<W>>,
    conn: Conn,
    server_max_message_bytes: usize,
    counters: Arc<WireCounters>,
}

impl<W: WireSession> DirectWrite for DirectWriter<W> {
    fn try_write(&self, events: &[&Event]) -> Direct {
        thread_local! {
            /// Messages and frame headers of the write being made, kept per thread.
            static SCRATCH: RefCell<(Vec<Frame>, Vec<u8>)> = const { RefCell::new((Vec::new(), Vec::new())) };
        }
        SCRATCH.with_borrow_mut(|(frames, headers)| {
            let sent = encode_batch(
                &mut *self.wire.lock(),
                events,
                frames,
                self.server_max_message_bytes,
            );
            let outcome = if frames.is_empty() {
                // Nothing to send (every event skipped): delivered all the same.
                Direct::Written
            } else {
                self.conn.try_write_frames(frames, headers)
            };
            if outcome != Direct::Refused {
                sent.count(&self.counters);
            }
            frames.clear();
            outcome
        })
    }
}

/// Writes `frames` in chunks of at most `WRITE_CHUNK_BYTES` (or one larger message), each
/// under the write timeout: it bounds the time to make progress, not a whole batch, so a
/// large batch to a reader that keeps up is not cut off.
async fn write_chunked(
    socket: &mut Socket,
    frames: &[Frame],
    config: &SessionConfig,
) -> Result<(), SessionEnd> {
    let mut rest = frames;
    while !rest.is_empty() {
        let mut take = 0;
        let mut bytes = 0;
        while take < rest.len() && (take == 0 || bytes + rest[take].len() <= WRITE_CHUNK_BYTES) {
            bytes += rest[take].len();
            take += 1;
        }
        let deadline = tokio::time::Instant::now() + config.write_timeout;
        write_step(tokio::time::timeout_at(deadline, socket.write_frames(&rest[..take])).await)?;
        rest = &rest[take..];
    }
    Ok(())
}

/// Bytes written to a subscriber per `writev` at most (or one larger message): the unit
/// of progress the write timeout waits for.
const WRITE_CHUNK_BYTES: usize = 256 * 1024;

/// What one timed write means for the session.
fn write_step<E>(
    result: Result<Result<(), E>, tokio::time::error::Elapsed>,
) -> Result<(), SessionEnd> {
    match result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(SessionEnd::WriteFailed),
        Err(_) => Err(SessionEnd::WriteTimeout),
    }
}

#[cfg(test)]
mod tests {
    use super::{End, SessionEnd};
    use std::time::Duration;

    #[test]
    fn every_end_reason_is_listed_once() {
        let all = [
            SessionEnd::PeerClosed,
            SessionEnd::PeerDead,
            SessionEnd::WriteTimeout,
            SessionEnd::WriteFailed,
            SessionEnd::Shutdown,
            SessionEnd::Stream(End::TooOld { oldest: 1 }),
            SessionEnd::Stream(End::TooSlow),
            SessionEnd::Stream(End::Closed),
            SessionEnd::Stream(End::ReadFailed("x".into())),
            SessionEnd::Protocol("x".into()),
            SessionEnd::MessageTooBig,
            SessionEnd::UpdatesTooFast,
            SessionEnd::IndexBusy(Duration::ZERO),
            SessionEnd::Violation {
                code: 1002,
                problem: "x".into(),
            },
            SessionEnd::MemorySpent(crate::http::budget::Spent::Total),
            SessionEnd::MessageTimeout,
            SessionEnd::TextBusy(crate::http::admission_text::TextBusy(Duration::ZERO)),
        ];
        let reasons: Vec<&str> = all.iter().map(SessionEnd::reason).collect();
        assert_eq!(reasons, SessionEnd::REASONS);
    }
}
