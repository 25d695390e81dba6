//! The ingest thread: the upstream client and the ingest loop on one single-threaded
//! runtime of their own, handing each stamped batch to an [`EventSink`].
//!
//! Owns the frame queue between the client and the decoder, the handling of what the
//! upstream says about our cursor (`#info OutdatedCursor`, `FutureCursor`,
//! `ConsumerTooSlow`), the seq-regression check within one connection, and the counters
//! it publishes. Must never hold events past the sink's `append` (the sink's
//! backpressure is ingest's), or drop a decode failure without counting and logging it.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::{IngestConfig, IngestOutcome, IngestStats, Ingestor};
use crate::event::{Event, StampState};
use crate::logging::RateLimited;
use crate::upstream::client::{self, ReceivedFrame, UpstreamShared};

/// Receives stamped events in order, on the ingest thread. It may block (backpressure from
/// the log); an error stops ingest, since events could not be kept.
pub trait EventSink: Send + 'static {
    fn append(&mut self, events: Vec<Event>) -> anyhow::Result<()>;
}

impl<F: FnMut(Vec<Event>) -> anyhow::Result<()> + Send + 'static> EventSink for F {
    fn append(&mut self, events: Vec<Event>) -> anyhow::Result<()> {
        self(events)
    }
}

/// A running ingest pipeline.
pub struct IngestHandle {
    pub shared: Arc<UpstreamShared>,
    /// A snapshot of the ingest counters, refreshed every idle tick or 1,000 frames.
    pub stats: Arc<parking_lot::Mutex<IngestStats>>,
    shutdown: watch::Sender<bool>,
    thread: std::thread::JoinHandle<anyhow::Result<IngestStats>>,
}

impl IngestHandle {
    /// True once the ingest thread has ended (its sink failed, or it was shut down).
    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// Stops reading upstream, lets ingest finish what it has; the log keeps the resume state.
    pub async fn shutdown(self) -> anyhow::Result<IngestStats> {
        let _ = self.shutdown.send(true);
        let thread = self.thread;
        tokio::task::spawn_blocking(move || thread.join())
            .await?
            .map_err(|_| anyhow::anyhow!("ingest thread panicked"))?
    }
}

/// Starts the ingest thread, which runs the upstream client and the ingest loop, stamping
/// from `state` (where the log left off).
///
/// Both run on one single-threaded runtime on that thread: a frame read from the socket
/// reaches the decoder without waking another thread, and the rest of the daemon's runtime
/// is left to the subscribers. The bounded frame queue between them still lets the client
/// read ahead while a burst is decoded.
pub fn start_ingest(
    config: IngestConfig,
    state: StampState,
    sink: impl EventSink,
) -> anyhow::Result<IngestHandle> {
    let shared = Arc::new(UpstreamShared::new(state.upstream_cursor));
    let stats = Arc::new(parking_lot::Mutex::new(IngestStats::default()));
    start_ingest_with(config, state, sink, shared, stats)
}

/// [`start_ingest`] with counters that outlive it: a cluster node starts ingest each time
/// it becomes the leader and keeps one set of upstream counters for its whole life.
pub fn start_ingest_with(
    config: IngestConfig,
    state: StampState,
    sink: impl EventSink,
    shared: Arc<UpstreamShared>,
    stats: Arc<parking_lot::Mutex<IngestStats>>,
) -> anyhow::Result<IngestHandle> {
    tracing::info!(
        next_seq = state.next_seq,
        upstream_cursor = ?state.upstream_cursor,
        "resuming ingest"
    );
    shared.set_cursor(state.upstream_cursor);
    shared.reset_flow();
    let (frames_tx, frames_rx) = mpsc::channel(config.frame_queue.max(1));
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let thread_shared = shared.clone();
    let thread_stats = stats.clone();
    let thread = std::thread::Builder::new()
        .name("sluice-ingest".into())
        .spawn(move || {
            runtime.block_on(async move {
                let client = tokio::spawn(client::run(
                    config.upstream,
                    thread_shared.clone(),
                    frames_tx,
                    shutdown_rx,
                ));
                let ingested = ingest_loop(
                    frames_rx,
                    Ingestor::new(state, config.decode_limits),
                    sink,
                    thread_shared,
                    thread_stats,
                    config.idle_tick,
                )
                .await;
                if ingested.is_err() {
                    // Nothing will take its frames any more.
                    client.abort();
                }
                let upstream = client.await;
                let stats = ingested?;
                match upstream {
                    Ok(result) => result?,
                    Err(e) if e.is_cancelled() => {}
                    Err(e) => anyhow::bail!("upstream task panicked: {e}"),
                }
                Ok(stats)
            })
        })?;
    Ok(IngestHandle {
        shared,
        stats,
        shutdown: shutdown_tx,
        thread,
    })
}

async fn ingest_loop(
    mut frames: mpsc::Receiver<ReceivedFrame>,
    mut ingestor: Ingestor,
    mut sink: impl EventSink,
    shared: Arc<UpstreamShared>,
    published: Arc<parking_lot::Mutex<IngestStats>>,
    idle_tick: Duration,
) -> anyhow::Result<IngestStats> {
    let mut since_publish = 0u32;
    let mut decode_log = RateLimited::new(10, Duration::from_secs(10));
    let mut regression_log = RateLimited::new(10, Duration::from_secs(10));
    let mut last_accepted: Option<(u64, i64)> = None;
    // One timer for the loop's life, not a timeout per frame: at a live rate each frame's
    // wait registered a timer entry and dropped it when the frame came.
    let mut tick = tokio::time::interval(idle_tick.max(Duration::from_millis(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.reset();
    loop {
        // Wake at least once per tick so liveness is visible even when the stream is idle.
        shared
            .ingest_heartbeat
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let frame = tokio::select! {
            biased;
            next = frames.recv() => match next {
                Some(frame) => frame,
                None => break,
            },
            _ = tick.tick() => {
                *published.lock() = ingestor.stats().clone();
                since_publish = 0;
                continue;
            }
        };
        since_publish += 1;
        if since_publish >= 1000 {
            *published.lock() = ingestor.stats().clone();
            since_publish = 0;
        }
        let connection = frame.connection;
        match ingestor.ingest(frame.bytes, frame.received_us) {
            IngestOutcome::Events(events) => {
                if let Some(last) = events.last() {
                    last_accepted = Some((connection, last.upstream_seq));
                }
                shared.set_cursor(ingestor.state().upstream_cursor);
                if let Err(err) = sink.append(events) {
                    shared.frame_processed();
                    return Err(err);
                }
            }
            IngestOutcome::Duplicate { upstream_seq } => {
                if let Some((conn, accepted)) = last_accepted {
                    if conn == connection && upstream_seq <= accepted {
                        ingestor.note_seq_regression();
                        if let (true, suppressed) = regression_log.check() {
                            tracing::warn!(
                                upstream_seq,
                                last_accepted = accepted,
                                suppressed,
                                "upstream seq went backwards within a connection; frame dropped"
                            );
                        }
                    }
                }
            }
            IngestOutcome::Info { name, message } => {
                if name == "OutdatedCursor" {
                    tracing::error!(
                        ?message,
                        "upstream says our cursor is outdated: events between it and the \
                         upstream's oldest retained event were MISSED"
                    );
                } else {
                    tracing::info!(name, ?message, "upstream #info");
                }
            }
            IngestOutcome::ErrorFrame { error, message } => match error.as_str() {
                "FutureCursor" => {
                    tracing::error!(
                        ?message,
                        cursor = ?ingestor.state().upstream_cursor,
                        "upstream says our cursor is in its future (a different or reset \
                         relay); following its live tip from now on"
                    );
                    ingestor.reset_upstream_cursor();
                    shared.set_cursor(None);
                }
                "ConsumerTooSlow" => {
                    tracing::warn!(?message, "upstream dropped us as too slow; resuming")
                }
                other => tracing::warn!(error = other, ?message, "upstream error frame"),
            },
            IngestOutcome::DecodeFailed(err) => {
                if let (true, suppressed) = decode_log.check() {
                    tracing::warn!(reason = err.reason(), error = %err, suppressed, "frame could not be decoded; skipped");
                }
            }
        }
        shared.frame_processed();
    }
    *published.lock() = ingestor.stats().clone();
    Ok(ingestor.stats().clone())
}
