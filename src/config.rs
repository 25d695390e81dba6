//! Configuration: every setting as a flag and as a `SLUICE_*` environment variable
//! (flags win). Owns names, defaults and validation of settings; must never read files or
//! the network itself.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::daemon::IngestConfig;
use crate::upstream::client::{UpstreamConfig, DEFAULT_UPSTREAM};

/// Settings of the upstream subscription and ingest.
#[derive(Debug, Clone, Args)]
pub struct IngestArgs {
    /// Relay to subscribe to: a host (bsky.network) or a full ws:// or wss:// URL.
    #[arg(long, env = "SLUICE_UPSTREAM", default_value = DEFAULT_UPSTREAM)]
    pub upstream: String,

    /// Directory for durable state (checkpoint, and the log once it exists).
    #[arg(long, env = "SLUICE_DATA_DIR", default_value = "./sluice-data")]
    pub data_dir: PathBuf,

    /// Largest upstream frame read, in bytes (the relay's own limit is 5 MiB). A larger
    /// frame is counted, logged and skipped by reconnecting past it.
    #[arg(long, env = "SLUICE_MAX_FRAME_BYTES", default_value_t = 5 * 1024 * 1024,
          value_parser = clap::value_parser!(u64).range(1024..=1024 * 1024 * 1024))]
    pub max_frame_bytes: u64,

    /// Seconds without a frame or a pong before the upstream connection is replaced.
    #[arg(long, env = "SLUICE_STALL_TIMEOUT_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub stall_timeout_secs: u64,

    /// Smallest reconnect backoff ceiling, milliseconds (full jitter below it).
    #[arg(long, env = "SLUICE_BACKOFF_MIN_MS", default_value_t = 250,
          value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub backoff_min_ms: u64,

    /// Largest reconnect backoff, milliseconds.
    #[arg(long, env = "SLUICE_BACKOFF_MAX_MS", default_value_t = 30_000,
          value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    pub backoff_max_ms: u64,

    /// Frames buffered between the upstream socket and ingest.
    #[arg(long, env = "SLUICE_FRAME_QUEUE", default_value_t = 1024,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub frame_queue: u64,

    /// Maximum CBOR nesting depth accepted in a frame.
    #[arg(long, env = "SLUICE_MAX_CBOR_DEPTH", default_value_t = 64,
          value_parser = clap::value_parser!(u64).range(4..=4096))]
    pub max_cbor_depth: u64,
}

impl IngestArgs {
    pub fn to_config(&self) -> anyhow::Result<IngestConfig> {
        if self.backoff_min_ms > self.backoff_max_ms {
            anyhow::bail!(
                "--backoff-min-ms ({}) is larger than --backoff-max-ms ({})",
                self.backoff_min_ms,
                self.backoff_max_ms
            );
        }
        crate::upstream::client::subscribe_url(&self.upstream, None)?;
        let upstream = UpstreamConfig {
            upstream: self.upstream.clone(),
            max_frame_bytes: usize::try_from(self.max_frame_bytes)?,
            stall_timeout: Duration::from_secs(self.stall_timeout_secs),
            backoff_min: Duration::from_millis(self.backoff_min_ms),
            backoff_max: Duration::from_millis(self.backoff_max_ms),
            ..UpstreamConfig::default()
        };
        let mut config = IngestConfig::new(upstream, self.data_dir.clone());
        config.frame_queue = usize::try_from(self.frame_queue)?;
        config.decode_limits.max_depth = usize::try_from(self.max_cbor_depth)?;
        Ok(config)
    }
}
