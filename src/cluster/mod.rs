//! Scale-out and failover over Redis: N nodes, one ingest leader, one seq space.
//!
//! Owns: the node's role (leader or standby) under a fenced lease, the leader's append of
//! stamped frames into one Redis Stream (`link`, `functions.lua`), and every node's tail of
//! that stream into its own [`Log`] with the leader's seqs (`tail`). Must never: append
//! without holding the lease (checked by Redis in the same step as the write, and by the
//! leader's own clock before it), write a seq twice or out of order into the stream or a
//! log, or hold events itself beyond one append batch.
//!
//! Shape: the leader runs the ordinary upstream client and [`Ingestor`] on the ingest
//! thread, with a sink that hands each frame's events to the appender (`append`), which
//! encodes batches ahead of the appends in flight and appends each with one fenced
//! transaction (`link::AppendCommands`), several in flight on one connection. Every node, the leader too,
//! reads the stream with one blocking reader and re-derives each frame's events with the
//! same decode and encode code, stamped with the seqs and times the leader chose, so its
//! log, and every cursor into it, is the same as every other node's.
//!
//! [`Ingestor`]: crate::ingest::Ingestor

pub mod append;
pub mod entry;
mod lease;
pub mod link;
mod node;
mod tail;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::time::Duration;

pub use lease::NamedLease;
pub use node::{Node, NodeParts};

/// Everything the cluster is configured with.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// `redis://host:port/db`.
    pub redis_url: String,
    /// Names the keys: nodes with the same name form one cluster.
    pub name: String,
    /// This node's name in the lease and the node reports; unique per running node.
    pub node_id: String,
    /// The lease's time to live. The leader renews every third of it and stops appending
    /// on its own before it can have expired; standbys take over after it.
    pub lease_ttl: Duration,
    /// Standbys try to take the lease this often, with ±50% jitter.
    pub standby_poll: Duration,
    /// The stream keeps at most this many events...
    pub window_events: u64,
    /// ...and at most about this many bytes of entries (whichever is smaller).
    pub window_max_bytes: u64,
    /// Trimming never removes events a live node has not read yet, unless the byte bound
    /// forces it; and it always keeps at least this many events.
    pub window_floor_events: u64,
    /// Refuse to start unless Redis is set up so an acknowledged append survives a crash.
    pub require_durable: bool,
    /// Most events, and uncompressed frame bytes, per append.
    pub batch_max_events: usize,
    pub batch_max_bytes: usize,
    /// Frames queued between ingest and the appender before ingest blocks.
    pub append_queue_frames: usize,
    /// Appends (batches) in flight at once on the appender's connection.
    pub append_in_flight: usize,
    /// zstd level of entries (-3: a third less leader CPU than 1 for 2% more entry
    /// bytes and the same Redis memory; docs/DECISIONS.md).
    pub compression_level: i32,
    /// Largest decompressed entry a node accepts.
    pub max_entry_bytes: usize,
    /// Deadline of one Redis command.
    pub redis_timeout: Duration,
    /// How long a subscriber's cursor past this node's log waits for the log to reach it
    /// (`http::app::resolve_settled`).
    pub cursor_grace: Duration,
}

impl ClusterConfig {
    pub fn new(
        redis_url: impl Into<String>,
        name: impl Into<String>,
        node_id: impl Into<String>,
    ) -> Self {
        Self {
            redis_url: redis_url.into(),
            name: name.into(),
            node_id: node_id.into(),
            lease_ttl: Duration::from_secs(3),
            standby_poll: Duration::from_millis(250),
            window_events: 300_000,
            window_max_bytes: 768 * 1024 * 1024,
            window_floor_events: 10_000,
            require_durable: false,
            batch_max_events: 5_000,
            batch_max_bytes: 4 * 1024 * 1024,
            append_queue_frames: 4096,
            append_in_flight: 4,
            compression_level: -3,
            max_entry_bytes: 64 * 1024 * 1024,
            redis_timeout: Duration::from_secs(2),
            cursor_grace: Duration::from_secs(2),
        }
    }
}

/// Why a cluster step failed.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ClusterError {
    #[error("cluster configuration: {0}")]
    Config(String),
    #[error("redis unavailable: {0}")]
    Unavailable(String),
    /// The caller does not hold the lease (another node does, or it expired).
    #[error("fenced: {0}")]
    Fenced(String),
    /// The batch does not continue the stream.
    #[error("append does not continue the stream: {0}")]
    Gap(String),
    /// The batch's upstream cursor does not advance the stream's.
    #[error("upstream cursor does not advance: {0}")]
    Cursor(String),
    #[error("the resume state is missing in redis: {0}")]
    NoState(String),
    #[error("redis error {code}: {detail}")]
    Server { code: String, detail: String },
    #[error("unexpected reply from redis: {0}")]
    Protocol(String),
    #[error("stream entry: {0}")]
    Entry(#[from] entry::EntryError),
    #[error("the stream does not re-derive here: {0}")]
    Rederive(String),
    #[error("local log: {0}")]
    Log(String),
}

impl ClusterError {
    /// A stable label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            ClusterError::Config(_) => "config",
            ClusterError::Unavailable(_) => "unavailable",
            ClusterError::Fenced(_) => "fenced",
            ClusterError::Gap(_) => "gap",
            ClusterError::Cursor(_) => "cursor",
            ClusterError::NoState(_) => "no_state",
            ClusterError::Server { .. } => "server",
            ClusterError::Protocol(_) => "protocol",
            ClusterError::Entry(_) => "entry",
            ClusterError::Rederive(_) => "rederive",
            ClusterError::Log(_) => "log",
        }
    }

    /// Redis answered that the function library is not loaded (it lost its data, or was
    /// replaced by an empty server): load it again.
    pub fn is_missing_function(&self) -> bool {
        matches!(self, ClusterError::Server { detail, .. } if detail.contains("Function not found"))
    }

    fn from_server(code: &str, detail: Option<&str>) -> Self {
        let detail = detail.unwrap_or("").to_string();
        match code {
            "FENCED" => ClusterError::Fenced(detail),
            "GAP" => ClusterError::Gap(detail),
            "CURSOR" => ClusterError::Cursor(detail),
            "NOSTATE" => ClusterError::NoState(detail),
            _ => ClusterError::Server {
                code: code.to_string(),
                detail,
            },
        }
    }
}

/// This node's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Standby = 0,
    Leader = 1,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Standby => "standby",
            Role::Leader => "leader",
        }
    }
}

/// Upper bounds (seconds) of the append latency histogram.
pub const APPEND_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// A fixed-bucket latency histogram of atomics (cumulative when rendered).
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; 13],
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn record(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = APPEND_BUCKETS
            .iter()
            .position(|&b| s <= b)
            .unwrap_or(APPEND_BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// Cumulative counts per bucket bound (the last is +Inf), and the sum in seconds.
    pub fn snapshot(&self) -> (Vec<(f64, u64)>, f64) {
        let mut total = 0;
        let mut out = Vec::with_capacity(APPEND_BUCKETS.len() + 1);
        for (i, b) in self.buckets.iter().enumerate() {
            total += b.load(Ordering::Relaxed);
            out.push((
                APPEND_BUCKETS.get(i).copied().unwrap_or(f64::INFINITY),
                total,
            ));
        }
        (out, self.sum_us.load(Ordering::Relaxed) as f64 / 1e6)
    }
}

/// What one node last reported (the `nodes` hash).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NodeReport {
    pub node: String,
    /// The seq its log holds up to.
    pub position: u64,
    pub reported_ms: u64,
    pub role: String,
    pub subscribers: u64,
    /// Events the stream holds beyond this node's log.
    pub lag_events: u64,
}

impl NodeReport {
    pub fn render(position: u64, ms: u64, role: Role, subscribers: u64) -> String {
        format!("{position} {ms} {} {subscribers}", role.as_str())
    }

    pub fn parse(node: &str, text: &str) -> Option<Self> {
        let mut parts = text.split(' ');
        Some(Self {
            node: node.to_string(),
            position: parts.next()?.parse().ok()?,
            reported_ms: parts.next()?.parse().ok()?,
            role: parts.next()?.to_string(),
            subscribers: parts.next()?.parse().ok()?,
            lag_events: 0,
        })
    }
}

/// The node's state and counters, read by the admin endpoints.
#[derive(Debug, Default)]
pub struct ClusterShared {
    pub node_id: String,
    pub cluster: String,
    role: AtomicU8,
    pub epoch: AtomicU64,
    /// The stream reader's last call succeeded.
    pub redis_up: AtomicBool,
    /// The stream's next seq as last read (its newest event + 1).
    pub stream_next_seq: AtomicU64,
    pub takeovers: AtomicU64,
    pub step_downs: AtomicU64,
    pub handovers: AtomicU64,
    pub appends: AtomicU64,
    /// Appends sent and not answered yet.
    pub append_in_flight: AtomicU64,
    pub appended_events: AtomicU64,
    pub appended_bytes: AtomicU64,
    pub append_retries: AtomicU64,
    /// Appends whose transaction Redis aborted (the state or the stream was written
    /// between the check and the `EXEC`), sent again with every later one.
    pub append_aborts: AtomicU64,
    pub fenced_appends: AtomicU64,
    pub trimmed_entries: AtomicU64,
    pub trims: AtomicU64,
    pub discontinuities: AtomicU64,
    pub discontinuity_events: AtomicU64,
    pub tailed_events: AtomicU64,
    pub tailed_entries: AtomicU64,
    pub skipped_held: AtomicU64,
    pub tail_errors: AtomicU64,
    pub append_latency: Histogram,
    pub nodes: parking_lot::Mutex<Vec<NodeReport>>,
    pub last_error: parking_lot::Mutex<Option<String>>,
}

impl ClusterShared {
    pub fn role(&self) -> Role {
        match self.role.load(Ordering::Relaxed) {
            1 => Role::Leader,
            _ => Role::Standby,
        }
    }

    fn set_role(&self, role: Role) {
        self.role.store(role as u8, Ordering::Relaxed);
    }

    fn note_error(&self, e: &ClusterError) {
        *self.last_error.lock() = Some(e.to_string());
    }

    /// Why this node is not ready, as far as the cluster is concerned.
    pub fn not_ready(&self) -> Option<String> {
        if !self.redis_up.load(Ordering::Relaxed) {
            let why = self
                .last_error
                .lock()
                .clone()
                .unwrap_or_else(|| "not connected yet".into());
            return Some(format!(
                "redis unreachable ({why}); serving what this node holds"
            ));
        }
        None
    }
}
