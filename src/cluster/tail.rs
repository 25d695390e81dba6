//! The stream reader: one blocking reader per node that writes the stream's events into
//! the node's own log with the leader's seqs.
//!
//! Owns: the node's position in the stream (its log's newest seq), the continuity check,
//! re-deriving each frame's events, and the discontinuity when the stream no longer holds
//! what the node lacks. Must never: append a seq out of order, skip a seq without recording
//! the discontinuity, or read more than one bounded batch ahead of the log.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::link::{Keys, Link, RawEntry};
use super::{entry, ClusterConfig, ClusterError, ClusterShared};
use crate::decode::DecodeLimits;
use crate::event::{Event, StampState};
use crate::ingest::{IngestOutcome, Ingestor};
use crate::log::Log;
use crate::logging::RateLimited;
use crate::upstream::client::UpstreamShared;

/// Entries per read.
const READ_COUNT: usize = 64;
/// How long one read waits for a new entry.
const BLOCK: Duration = Duration::from_millis(500);

pub struct Tailer {
    pub config: ClusterConfig,
    pub keys: Keys,
    pub log: Arc<Log>,
    pub shared: Arc<ClusterShared>,
    pub upstream: Arc<UpstreamShared>,
    pub limits: DecodeLimits,
    pub stop: watch::Receiver<bool>,
}

impl Tailer {
    /// Runs until `stop`; on its own thread with its own runtime.
    pub fn run(self) {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(error = %e, "cluster stream reader cannot start its runtime");
                return;
            }
        };
        runtime.block_on(self.run_async());
    }

    async fn run_async(self) {
        let mut link = match Link::new(&self.config.redis_url, self.config.redis_timeout) {
            Ok(link) => link,
            Err(e) => {
                tracing::error!(error = %e, "cluster stream reader cannot start");
                return;
            }
        };
        let mut ingestor = Ingestor::new(StampState::fresh(), self.limits.clone());
        let mut decoder = match entry::EntryDecoder::new() {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(error = %e, "cluster stream reader cannot start its decoder");
                return;
            }
        };
        let mut error_log = RateLimited::new(5, Duration::from_secs(10));
        let mut backoff = Duration::from_millis(50);
        while !*self.stop.borrow() {
            // The watchdog's evidence that this node's ingest (here: the stream) is alive.
            self.upstream
                .ingest_heartbeat
                .fetch_add(1, Ordering::Relaxed);
            let after = self.log.reader().newest_seq();
            let step = match link.read_after(&self.keys, after, READ_COUNT, BLOCK).await {
                Ok(entries) => {
                    self.shared.redis_up.store(true, Ordering::Relaxed);
                    self.apply(&mut ingestor, &mut decoder, after, entries)
                }
                Err(e) => Err(e),
            };
            match step {
                Ok(()) => backoff = Duration::from_millis(50),
                Err(e) => {
                    self.shared.tail_errors.fetch_add(1, Ordering::Relaxed);
                    if matches!(e, ClusterError::Unavailable(_)) {
                        self.shared.redis_up.store(false, Ordering::Relaxed);
                    }
                    self.shared.note_error(&e);
                    if let (true, suppressed) = error_log.check() {
                        tracing::error!(reason = e.reason(), error = %e, position = after, suppressed, "cluster stream reader: retrying");
                    }
                    if let ClusterError::Log(_) = e {
                        return;
                    }
                    let mut stop = self.stop.clone();
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.changed() => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    /// Writes entries after `after` into the log.
    fn apply(
        &self,
        ingestor: &mut Ingestor,
        decoder: &mut entry::EntryDecoder,
        after: u64,
        entries: Vec<RawEntry>,
    ) -> Result<(), ClusterError> {
        let mut expected = after + 1;
        let mut events: Vec<Event> = Vec::new();
        for raw in entries {
            let records = decoder.decode(&raw.payload, self.config.max_entry_bytes)?;
            for record in records {
                if record.last_seq() < expected {
                    // Already held: only after the stream was re-seeded behind this node.
                    self.shared
                        .skipped_held
                        .fetch_add(u64::from(record.events), Ordering::Relaxed);
                    continue;
                }
                if record.first_seq != expected {
                    // The stream no longer holds what this node lacks (it was away longer
                    // than the window): the log's floor moves to where the stream starts.
                    if !events.is_empty() {
                        self.append(std::mem::take(&mut events))?;
                    }
                    self.discontinuity(expected, record.first_seq)?;
                }
                match ingestor.restamp(
                    record.frame.clone(),
                    record.received_us,
                    record.first_seq,
                    record.first_time_us,
                ) {
                    IngestOutcome::Events(evs)
                        if evs.len() == record.events as usize
                            && evs.first().map(|e| e.seq) == Some(record.first_seq) =>
                    {
                        expected = record.last_seq() + 1;
                        events.extend(evs);
                    }
                    other => {
                        return Err(ClusterError::Rederive(format!(
                            "frame at seq {} (upstream {}) gave {:?} here, the leader {} events",
                            record.first_seq,
                            record.upstream_seq,
                            outcome_summary(&other),
                            record.events
                        )));
                    }
                }
            }
            self.shared.tailed_entries.fetch_add(1, Ordering::Relaxed);
        }
        if !events.is_empty() {
            self.append(events)?;
        }
        Ok(())
    }

    fn append(&self, events: Vec<Event>) -> Result<(), ClusterError> {
        let n = events.len() as u64;
        self.log
            .append(events)
            .map_err(|e| ClusterError::Log(e.to_string()))?;
        self.shared.tailed_events.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    fn discontinuity(&self, expected: u64, resumes_at: u64) -> Result<(), ClusterError> {
        if resumes_at < expected {
            return Err(ClusterError::Gap(format!(
                "stream entry starts at seq {resumes_at}, inside what this node holds (next {expected})"
            )));
        }
        self.shared.discontinuities.fetch_add(1, Ordering::Relaxed);
        self.shared
            .discontinuity_events
            .fetch_add(resumes_at - expected, Ordering::Relaxed);
        tracing::error!(
            missing_from = expected,
            missing_through = resumes_at - 1,
            "DISCONTINUITY: this node was away longer than the stream's window; seqs {} to {} \
             are not on this node, its oldest retained event is now {}; cursors inside the \
             hole get their wire's too-old answer",
            expected,
            resumes_at - 1,
            resumes_at
        );
        self.log
            .restart_at(resumes_at)
            .map_err(|e| ClusterError::Log(e.to_string()))
    }
}

fn outcome_summary(outcome: &IngestOutcome) -> String {
    match outcome {
        IngestOutcome::Events(evs) => format!(
            "{} events from seq {:?}",
            evs.len(),
            evs.first().map(|e| e.seq)
        ),
        IngestOutcome::Duplicate { upstream_seq } => format!("a duplicate of {upstream_seq}"),
        IngestOutcome::Info { name, .. } => format!("#info {name}"),
        IngestOutcome::ErrorFrame { error, .. } => format!("error frame {error}"),
        IngestOutcome::DecodeFailed(e) => format!("decode failure {}", e.reason()),
    }
}
