//! Assembly of the running daemon: upstream client → ingest thread → event sink.
//!
//! Owns the wiring between stages and their lifecycles. Must never hold events itself:
//! the ingest thread hands each batch to the sink and keeps only its stamp state.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use crate::decode::DecodeLimits;
use crate::event::Event;
use crate::ingest::{IngestOutcome, IngestStats, Ingestor, StampState};
use crate::log::checkpoint::Checkpoint;
use crate::logging::RateLimited;
use crate::upstream::client::{self, ReceivedFrame, UpstreamConfig, UpstreamShared};

/// Receives stamped events in order. Runs on the ingest thread: it must not block for long.
pub trait EventSink: Send + 'static {
    fn append(&mut self, events: Vec<Event>);
}

impl<F: FnMut(Vec<Event>) + Send + 'static> EventSink for F {
    fn append(&mut self, events: Vec<Event>) {
        self(events)
    }
}

#[derive(Debug, Clone)]
pub struct IngestConfig {
    pub upstream: UpstreamConfig,
    pub data_dir: PathBuf,
    pub decode_limits: DecodeLimits,
    /// Frames buffered between the socket and ingest; the socket is not read past it.
    pub frame_queue: usize,
    /// Seqs leased per checkpoint write (see `log::checkpoint`).
    pub seq_lease_block: u64,
    /// How often the upstream cursor is saved.
    pub checkpoint_interval: Duration,
}

impl IngestConfig {
    pub fn new(upstream: UpstreamConfig, data_dir: PathBuf) -> Self {
        Self {
            upstream,
            data_dir,
            decode_limits: DecodeLimits::default(),
            frame_queue: 1024,
            seq_lease_block: 100_000,
            checkpoint_interval: Duration::from_secs(1),
        }
    }
}

/// A running ingest pipeline.
pub struct IngestHandle {
    pub shared: Arc<UpstreamShared>,
    shutdown: watch::Sender<bool>,
    client: tokio::task::JoinHandle<anyhow::Result<()>>,
    ingest: std::thread::JoinHandle<anyhow::Result<IngestStats>>,
}

impl IngestHandle {
    /// Stops reading upstream, lets ingest finish what it has, saves the checkpoint.
    pub async fn shutdown(self) -> anyhow::Result<IngestStats> {
        let _ = self.shutdown.send(true);
        self.client
            .await
            .map_err(|e| anyhow::anyhow!("upstream task panicked: {e}"))??;
        tokio::task::spawn_blocking(move || self.ingest.join())
            .await?
            .map_err(|_| anyhow::anyhow!("ingest thread panicked"))?
    }
}

/// Starts the upstream client and the ingest thread. Must be called inside a runtime.
pub fn start_ingest(config: IngestConfig, sink: impl EventSink) -> anyhow::Result<IngestHandle> {
    let (checkpoint, state) = Checkpoint::open(&config.data_dir, config.seq_lease_block)?;
    tracing::info!(
        next_seq = state.next_seq,
        upstream_cursor = ?state.upstream_cursor,
        data_dir = %config.data_dir.display(),
        "resuming"
    );
    let shared = Arc::new(UpstreamShared::new(state.upstream_cursor));
    let (frames_tx, frames_rx) = mpsc::channel(config.frame_queue.max(1));
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let ingest_shared = shared.clone();
    let limits = config.decode_limits.clone();
    let interval = config.checkpoint_interval;
    let runtime = tokio::runtime::Handle::current();
    let ingest = std::thread::Builder::new()
        .name("sluice-ingest".into())
        .spawn(move || {
            ingest_loop(
                &runtime,
                frames_rx,
                Ingestor::new(state, limits),
                checkpoint,
                sink,
                ingest_shared,
                interval,
            )
        })?;
    let client = tokio::spawn(client::run(
        config.upstream,
        shared.clone(),
        frames_tx,
        shutdown_rx,
    ));
    Ok(IngestHandle {
        shared,
        shutdown: shutdown_tx,
        client,
        ingest,
    })
}

fn ingest_loop(
    runtime: &tokio::runtime::Handle,
    mut frames: mpsc::Receiver<ReceivedFrame>,
    mut ingestor: Ingestor,
    mut checkpoint: Checkpoint,
    mut sink: impl EventSink,
    shared: Arc<UpstreamShared>,
    checkpoint_interval: Duration,
) -> anyhow::Result<IngestStats> {
    let mut decode_log = RateLimited::new(10, Duration::from_secs(10));
    let mut regression_log = RateLimited::new(10, Duration::from_secs(10));
    let mut last_accepted: Option<(u64, i64)> = None;
    let mut last_saved = Instant::now();
    let mut saved_state: StampState = ingestor.state();
    loop {
        // Wake at least once per checkpoint interval so an idle stream still gets its
        // cursor saved.
        let next = runtime.block_on(async {
            tokio::time::timeout(checkpoint_interval, frames.recv()).await
        });
        let frame = match next {
            Ok(Some(frame)) => frame,
            Ok(None) => break,
            Err(_elapsed) => {
                if ingestor.state() != saved_state {
                    saved_state = ingestor.state();
                    checkpoint.save(&saved_state)?;
                    last_saved = Instant::now();
                }
                continue;
            }
        };
        let connection = frame.connection;
        match ingestor.ingest(frame.bytes, frame.received_us) {
            IngestOutcome::Events(events) => {
                if let Some(last) = events.last() {
                    checkpoint.ensure_leased(last.seq, &ingestor.state())?;
                    last_accepted = Some((connection, last.upstream_seq));
                }
                shared.set_cursor(ingestor.state().upstream_cursor);
                sink.append(events);
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
        if last_saved.elapsed() >= checkpoint_interval && ingestor.state() != saved_state {
            saved_state = ingestor.state();
            checkpoint.save(&saved_state)?;
            last_saved = Instant::now();
        }
    }
    checkpoint.save(&ingestor.state())?;
    Ok(ingestor.stats().clone())
}
