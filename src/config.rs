//! Configuration: every setting is a flag, a `SLUICE_*` environment variable, and a key in
//! the TOML file given by `--config` (the key is the flag name with `_` for `-`).
//! Precedence: flag, then environment, then file, then the built-in default.
//!
//! Owns names, defaults and validation of settings. Must never read anything but the
//! config file, and never start anything.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgMatches, Args, CommandFactory, FromArgMatches};

use crate::cluster::ClusterConfig;
use crate::fanout::filter::FilterLimits;
use crate::fanout::{CatchupThreads, HubConfig, SlowPolicy};
use crate::http::admission::AdmissionConfig;
use crate::http::admission_text::TextConfig;
use crate::http::budget::MemoryConfig;
use crate::http::listen::ListenConfig;
use crate::http::session::SessionConfig;
use crate::ingest::IngestConfig;
use crate::log::{LogConfig, RawRetention, RetentionConfig};
use crate::priority::Background;
use crate::sink::RedisSinkConfig;
use crate::upstream::client::{UpstreamConfig, DEFAULT_UPSTREAM};
use crate::wire::zstd::DictionarySource;

const MIB: u64 = 1024 * 1024;

/// `--catchup-pace-mib-per-sec` by default (docs/DECISIONS.md, "Session 14").
pub const DEFAULT_CATCHUP_PACE_MIB_PER_SEC: u64 = crate::fanout::DEFAULT_PACE_BYTES_PER_SEC / MIB;

/// `--catchup-pace-events-per-sec` by default (docs/DECISIONS.md, "Session 15").
pub const DEFAULT_CATCHUP_PACE_EVENTS_PER_SEC: u64 = crate::fanout::DEFAULT_PACE_EVENTS_PER_SEC;

/// Every setting of `sluice serve`. Defaults suit a small VPS (2 cores, 2-4 GB).
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// TOML file with settings (keys are flag names with `_`); flags and env vars win.
    #[arg(long, env = "SLUICE_CONFIG")]
    pub config: Option<PathBuf>,

    // ---- upstream and ingest
    /// Relay to subscribe to: a host (bsky.network) or a full ws:// or wss:// URL.
    #[arg(long, env = "SLUICE_UPSTREAM", default_value = DEFAULT_UPSTREAM)]
    pub upstream: String,
    /// Largest upstream frame read, bytes (the relay's own limit is 5 MiB). A larger one is
    /// counted, logged with its size and skipped by resuming past it.
    #[arg(long, env = "SLUICE_MAX_FRAME_BYTES", default_value_t = 5 * MIB,
          value_parser = clap::value_parser!(u64).range(1024..=1024 * MIB))]
    pub max_frame_bytes: u64,
    /// Seconds without a frame or a pong before the upstream connection is replaced.
    #[arg(long, env = "SLUICE_STALL_TIMEOUT_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub stall_timeout_secs: u64,
    /// Reconnect backoff ceiling at the first attempt, ms (full jitter below it).
    #[arg(long, env = "SLUICE_BACKOFF_MIN_MS", default_value_t = 250,
          value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub backoff_min_ms: u64,
    /// Largest reconnect backoff, ms.
    #[arg(long, env = "SLUICE_BACKOFF_MAX_MS", default_value_t = 30_000,
          value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    pub backoff_max_ms: u64,
    /// Frames buffered between the upstream socket and ingest.
    #[arg(long, env = "SLUICE_FRAME_QUEUE", default_value_t = 1024,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub frame_queue: u64,
    /// Deepest CBOR nesting accepted in a frame.
    #[arg(long, env = "SLUICE_MAX_CBOR_DEPTH", default_value_t = 64,
          value_parser = clap::value_parser!(u64).range(4..=4096))]
    pub max_cbor_depth: u64,

    // ---- log
    /// Directory of the embedded event log.
    #[arg(long, env = "SLUICE_DATA_DIR", default_value = "./sluice-data")]
    pub data_dir: PathBuf,
    /// Ceiling of the in-memory hot tail of recent events, MiB: it never holds more,
    /// whatever the rate. Live subscribers and those a little behind read the tail without
    /// copies; older reads go to the store (docs/DECISIONS.md, "Subscriber writes" and
    /// "Memory at the defaults").
    #[arg(long, env = "SLUICE_TAIL_MAX_MIB", default_value_t = 128,
          value_parser = clap::value_parser!(u64).range(1..=1024 * 1024))]
    pub tail_max_mib: u64,
    /// Hot tail kept at any rate, MiB (capped by --tail-max-mib): ~16 s of the firehose at
    /// 500 events/s.
    #[arg(long, env = "SLUICE_TAIL_MIN_MIB", default_value_t = 32,
          value_parser = clap::value_parser!(u64).range(1..=1024 * 1024))]
    pub tail_min_mib: u64,
    /// Above --tail-min-mib, the hot tail keeps this many seconds of the stream (by
    /// receipt time) up to --tail-max-mib, so at high rates a subscriber that overflows
    /// catches up from memory: 5 s is ~43 MiB at 2,000 events/s and ~107 MiB at 5,000/s
    /// (0 = the tail is --tail-min-mib at any rate).
    #[arg(long, env = "SLUICE_TAIL_MIN_SECS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub tail_min_secs: u64,
    /// Bound of the log writer's queue, MiB: events ingested but not yet committed. When
    /// it is full, ingest stops reading the upstream until the writer catches up.
    #[arg(long, env = "SLUICE_LOG_QUEUE_MIB", default_value_t = 32,
          value_parser = clap::value_parser!(u64).range(1..=64 * 1024))]
    pub log_queue_mib: u64,
    /// Block cache of the log's index, MiB (the event data itself is read from its files
    /// through the OS page cache, which the kernel sizes and reclaims).
    #[arg(long, env = "SLUICE_LOG_INDEX_CACHE_MIB", default_value_t = 16,
          value_parser = clap::value_parser!(u64).range(1..=64 * 1024))]
    pub log_index_cache_mib: u64,
    /// Decoded log segments kept so concurrent replays of the same stretch decode it once
    /// and share its messages, MiB of payload (0 = every replay decodes for itself).
    #[arg(long, env = "SLUICE_LOG_DECODED_CACHE_MIB", default_value_t = 16,
          value_parser = clap::value_parser!(u64).range(0..=64 * 1024))]
    pub log_decoded_cache_mib: u64,
    /// Log segments a sequential replay has decoded ahead, on a thread of their own, after
    /// each segment it decodes itself (0 = off; needs --log-decoded-cache-mib).
    #[arg(long, env = "SLUICE_LOG_READ_AHEAD_SEGMENTS", default_value_t = 1,
          value_parser = clap::value_parser!(u64).range(0..=16))]
    pub log_read_ahead_segments: u64,
    /// Uncompressed bytes per log segment, KiB: a scan pays fixed work per segment, a
    /// replay decodes whole segments (docs/DECISIONS.md, Event log, session 13). Commits
    /// cut segments too; merging (--log-merge-segments) joins the small ones to this size.
    #[arg(long, env = "SLUICE_LOG_SEGMENT_KIB", default_value_t = 1024,
          value_parser = clap::value_parser!(u64).range(16..=64 * 1024))]
    pub log_segment_kib: u64,
    /// Merge runs of small log segments (cut at every commit at the live rate, ~50 events
    /// each at 500 events/s) into full-size ones on the retention thread, so a replay of
    /// live-written hours scans as fast as of bulk-written ones (docs/DECISIONS.md, Event
    /// log, session 13). `false`: segments stay as committed.
    #[arg(long, env = "SLUICE_LOG_MERGE_SEGMENTS", default_value_t = true,
          num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub log_merge_segments: bool,
    /// A merge of small log segments keeps a segment's raw frames as the writer compressed
    /// them (a raw frame is compressed once) when they hold at least this many KiB plain;
    /// smaller ones (low rates) are compressed again together, into zstd frames of at
    /// least this size (docs/DECISIONS.md, Event log, session 17). 0: always kept; at
    /// least --log-segment-kib: always compressed again (the merge before session 17).
    #[arg(long, env = "SLUICE_LOG_MERGE_KEEP_RAW_KIB", default_value_t = 128,
          value_parser = clap::value_parser!(u64).range(0..=64 * 1024))]
    pub log_merge_keep_raw_kib: u64,
    /// Write the log's raw-frame files with O_DIRECT, past the page cache: the kernel's
    /// allocation of cache pages for the frames was the commit's largest CPU cost under a
    /// sustained append (docs/DECISIONS.md, Event log, session 14). Falls back to
    /// buffered writes by itself where the file system refuses O_DIRECT. `false`: through
    /// the page cache (recently written frames then stay cached for raw replays).
    #[arg(long, env = "SLUICE_LOG_DIRECT_RAW_WRITES", default_value_t = true,
          num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub log_direct_raw_writes: bool,
    /// zstd level of the raw frames the log stores while its writer keeps up (the live
    /// rate): smaller files for CPU the live rate leaves idle.
    #[arg(long, env = "SLUICE_LOG_RAW_ZSTD_LEVEL", default_value_t = 3, allow_hyphen_values = true,
          value_parser = clap::value_parser!(i32).range(-50..=19))]
    pub log_raw_zstd_level: i32,
    /// zstd level of the raw frames of a group the log writer takes with a backlog
    /// building (catching up, bursts): cheap, so the writer keeps pace. Set it equal to
    /// --log-raw-zstd-level for one fixed level.
    #[arg(long, env = "SLUICE_LOG_RAW_ZSTD_FAST_LEVEL", default_value_t = -3, allow_hyphen_values = true,
          value_parser = clap::value_parser!(i32).range(-50..=19))]
    pub log_raw_zstd_fast_level: i32,
    /// Group commit: commit at least this often while events are pending, ms. Longer
    /// means fewer, larger writes; an event is durable at most this long after ingest.
    #[arg(long, env = "SLUICE_COMMIT_INTERVAL_MS", default_value_t = 100,
          value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub commit_interval_ms: u64,
    /// Group commit: commit as soon as this many events are pending.
    #[arg(long, env = "SLUICE_COMMIT_MAX_EVENTS", default_value_t = 20_000,
          value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub commit_max_events: u64,
    /// Retention by age, hours: events whose source time is more than this older than the
    /// newest event's are deleted (measured back from the newest event, not the clock, so a
    /// replayed old capture is kept and a long upstream outage does not empty the log).
    #[arg(long, env = "SLUICE_RETENTION_HOURS", default_value_t = 72,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub retention_hours: u64,
    /// Retention by size of the stored log, GiB: the total of the JSON wires' share and
    /// the raw frames' share (--raw-retention-max-gib).
    #[arg(long, env = "SLUICE_RETENTION_MAX_GIB", default_value_t = 20,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub retention_max_gib: u64,
    /// Raw frames' own retention by age, hours, back from the newest event: older frames
    /// are dropped while their JSON stays (the raw wire's cursor floor follows them).
    #[arg(long, env = "SLUICE_RAW_RETENTION_HOURS", default_value_t = 24,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub raw_retention_hours: u64,
    /// Raw frames' share of --retention-max-gib, GiB (fractions allowed); the JSON wires
    /// get the rest. Default: a fifth of --retention-max-gib (4 of 20).
    #[arg(long, env = "SLUICE_RAW_RETENTION_MAX_GIB")]
    pub raw_retention_max_gib: Option<f64>,

    // ---- subscribers
    /// Address of the subscriber endpoints (/subscribe, subscribeEvents, subscribeRepos).
    #[arg(long, env = "SLUICE_LISTEN", default_value = "127.0.0.1:6008")]
    pub listen: SocketAddr,
    /// Address of the admin endpoints (/metrics, /healthz, /readyz, status page at /).
    /// Keep it private: it is not rate limited.
    #[arg(long, env = "SLUICE_ADMIN_LISTEN", default_value = "127.0.0.1:6009")]
    pub admin_listen: SocketAddr,
    /// /readyz fails while the newest event is more than this many seconds behind now.
    #[arg(long, env = "SLUICE_READY_MAX_LAG_SECS", default_value_t = 120,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub ready_max_lag_secs: u64,
    /// Per-subscriber live queue bound, events.
    #[arg(long, env = "SLUICE_QUEUE_MAX_EVENTS", default_value_t = 4096,
          value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub queue_max_events: u64,
    /// Per-subscriber live queue bound, KiB of encoded events.
    #[arg(long, env = "SLUICE_QUEUE_MAX_KIB", default_value_t = 8192,
          value_parser = clap::value_parser!(u64).range(1..=16 * 1024 * 1024))]
    pub queue_max_kib: u64,
    /// What happens to a subscriber whose queue overflows: catchup (lossless, reads the
    /// log at its own pace) or disconnect (ConsumerTooSlow). Clients may choose with
    /// `slowConsumer=`.
    #[arg(long, env = "SLUICE_SLOW_CONSUMER", default_value = "catchup")]
    pub slow_consumer: SlowPolicy,
    /// Concurrent log reads below the hot tail (cold replays), across all subscribers.
    #[arg(long, env = "SLUICE_COLD_READ_CONCURRENCY", default_value_t = 4,
          value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub cold_read_concurrency: u64,
    /// Per-connection ceiling while replaying, events per second.
    #[arg(long, env = "SLUICE_REPLAY_EVENTS_PER_SEC", default_value_t = 200_000,
          value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    pub replay_events_per_sec: u64,
    /// Bytes one subscriber reads from the log per catch-up step, KiB (always at least one
    /// event). Held while that batch is written, so with N subscribers in catch-up, catch-up
    /// keeps at most N times this resident.
    #[arg(long, env = "SLUICE_CATCHUP_BATCH_KIB", default_value_t = 1024,
          value_parser = clap::value_parser!(u64).range(16..=1024 * 1024))]
    pub catchup_batch_kib: u64,
    /// Largest message sent to any subscriber, bytes; larger events are not sent, counted,
    /// and the subscriber is told.
    #[arg(long, env = "SLUICE_MAX_MESSAGE_BYTES", default_value_t = 8 * MIB,
          value_parser = clap::value_parser!(u64).range(1024..=1024 * MIB))]
    pub max_message_bytes: u64,
    /// Maximum concurrent subscribers (over it: HTTP 503 with Retry-After).
    #[arg(long, env = "SLUICE_MAX_SUBSCRIBERS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub max_subscribers: u64,
    /// New subscriber connections per second, sustained (over it: HTTP 429).
    #[arg(long, env = "SLUICE_CONNECTS_PER_SEC", default_value_t = 500,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub connects_per_sec: u64,
    /// Burst allowance of new connections.
    #[arg(long, env = "SLUICE_CONNECT_BURST", default_value_t = 2_000,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub connect_burst: u64,
    /// Concurrent subscribers per client IP (over it: HTTP 429).
    #[arg(long, env = "SLUICE_MAX_PER_IP", default_value_t = 2_500,
          value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub max_per_ip: u64,
    /// Base of retry hints (Retry-After, close reasons), seconds; jitter of up to as much
    /// again is added so retries spread out.
    #[arg(long, env = "SLUICE_RETRY_AFTER_SECS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub retry_after_secs: u64,
    /// Kernel send buffer per subscriber socket, KiB. Bounds kernel memory per subscriber
    /// and lets a slow consumer show up in its queue instead of in the kernel.
    #[arg(long, env = "SLUICE_SOCKET_SEND_BUFFER_KIB", default_value_t = 128,
          value_parser = clap::value_parser!(u64).range(4..=65536))]
    pub socket_send_buffer_kib: u64,
    /// Largest message a subscriber may send, KiB (an `options_update` naming 10,000 DIDs
    /// is ~500 KiB). Bounds what one connection can make the daemon buffer; a larger
    /// message closes that connection with 1009.
    #[arg(long, env = "SLUICE_MAX_CLIENT_MESSAGE_KIB", default_value_t = 2048,
          value_parser = clap::value_parser!(u64).range(1..=65536))]
    pub max_client_message_kib: u64,
    /// Text messages (v1 `options_update`) one subscriber may send per second, with a burst
    /// of as many. Each can rebuild that subscriber's filter under the fan-out's lock, so
    /// one more closes the connection with 1008 instead of slowing every other subscriber.
    #[arg(long, env = "SLUICE_MAX_CLIENT_UPDATES_PER_SEC", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_client_updates_per_sec: u32,
    /// Routing-index entries (a DID, or a collection) that subscribes and filter changes
    /// may add per second across the whole server, with a burst of as many; each addition
    /// also pays for its later removal. It bounds how long filter changes can hold the
    /// lock every event's dispatch needs (~0.1 µs per entry). A subscribe that would wait
    /// more than 5 s gets HTTP 503 with Retry-After, an `options_update` a close with 1013.
    /// Must be at least twice `--max-dids`.
    #[arg(long, env = "SLUICE_MAX_INDEX_CHANGES_PER_SEC", default_value_t = 200_000,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000_000))]
    pub max_index_changes_per_sec: u64,
    /// The share of `--max-index-changes-per-sec` one client IP may use (burst as many),
    /// so one address filling the budget does not hold up everyone else's subscribes.
    /// At least twice `--max-dids`.
    #[arg(long, env = "SLUICE_MAX_INDEX_CHANGES_PER_SEC_PER_IP", default_value_t = 50_000,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000_000))]
    pub max_index_changes_per_sec_per_ip: u64,
    /// Events replays (catch-up reads) may scan per second across the server, matched
    /// or not (burst as many): bounds the CPU replays take. The default leaves most of
    /// 2 cores to live traffic (docs/DECISIONS.md, "The scan budget's default").
    #[arg(long, env = "SLUICE_SCAN_EVENTS_PER_SEC", default_value_t = 100_000,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000_000))]
    pub scan_events_per_sec: u64,
    /// The share of `--scan-events-per-sec` one client IP may use, however many
    /// connections it opens.
    #[arg(long, env = "SLUICE_SCAN_EVENTS_PER_SEC_PER_IP", default_value_t = 50_000,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000_000))]
    pub scan_events_per_sec_per_ip: u64,
    /// New subscriber connections per second one client IP may open (burst five times
    /// as many, at most `--connect-burst`), its share of `--connects-per-sec`
    /// (over it: HTTP 429).
    #[arg(long, env = "SLUICE_CONNECTS_PER_SEC_PER_IP", default_value_t = 100,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub connects_per_sec_per_ip: u64,
    /// `/event/{seq}` requests per second one client IP may make (burst as many); over
    /// it: HTTP 429. Reads below the hot tail also wait for the cold-read pool.
    #[arg(long, env = "SLUICE_EVENT_REQUESTS_PER_SEC_PER_IP", default_value_t = 50,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub event_requests_per_sec_per_ip: u64,
    /// `/event/{seq}` requests per second from all clients together (burst as many); over
    /// it: HTTP 429 for everyone until the budget refills. A lookup below the hot tail
    /// decodes a stored segment (up to ~1 ms of CPU), so this bounds what lookups can take of
    /// the daemon however many addresses send them.
    #[arg(long, env = "SLUICE_EVENT_REQUESTS_PER_SEC", default_value_t = 200,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub event_requests_per_sec: u64,
    /// Threads running the subscriber sessions, the dispatcher and the HTTP listeners
    /// (0 = one per core). Ingest and the log writer have threads of their own. Fewer
    /// workers mean fewer cross-thread wakeups: on 2 cores one worker spent 5-16% less CPU
    /// per delivered event, but it caps the fan-out at one core (BENCHMARKS.md).
    #[arg(long, env = "SLUICE_WORKER_THREADS", default_value_t = 0,
          value_parser = clap::value_parser!(u64).range(0..=1024))]
    pub worker_threads: u64,
    /// Least microseconds between two writes to one subscriber: an event after a quiet
    /// spell is sent at once, a busy stream is written once per interval with everything
    /// queued by then (fewer syscalls, at most this much added latency; 0 = every batch
    /// at once). The runtime's timers tick every millisecond, so a wait ends on the next
    /// tick at or after the interval.
    #[arg(long, env = "SLUICE_COALESCE_US", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(0..=100_000))]
    pub coalesce_us: u64,
    /// Let the dispatcher write a live subscriber's events to its socket itself while the
    /// subscriber's queue is empty and its session waits (one non-blocking write, no task
    /// woken); the session takes over whatever the socket does not accept at once. Paced by
    /// `--coalesce-us` like the session's writes: an event within the interval of the
    /// subscriber's last write (by either path) is queued and its session writes it.
    /// `false`: every write is the session's (BENCHMARKS.md, Fan-out, sessions 10-11).
    #[arg(long, env = "SLUICE_DIRECT_WRITES", default_value_t = true,
          num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub direct_writes: bool,
    /// Seconds a subscriber may take to accept 256 KiB of writes (or one larger message)
    /// before it is dropped.
    #[arg(long, env = "SLUICE_WRITE_TIMEOUT_SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub write_timeout_secs: u64,
    /// Seconds between pings to subscribers.
    #[arg(long, env = "SLUICE_PING_INTERVAL_SECS", default_value_t = 20,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub ping_interval_secs: u64,
    /// Seconds without any message from a subscriber before it is considered dead (checked
    /// at each ping: it is closed within one ping interval after this).
    #[arg(long, env = "SLUICE_PONG_TIMEOUT_SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub pong_timeout_secs: u64,
    /// Seconds a client may take to send a request's line and headers (both listeners);
    /// slower, and the connection is closed.
    #[arg(long, env = "SLUICE_HEADER_READ_TIMEOUT_SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub header_read_timeout_secs: u64,
    /// Seconds from accepting a connection to its websocket upgrade (both listeners); a
    /// connection not upgraded by then is closed, so a plain HTTP connection (`/event`,
    /// `/metrics`, keep-alive included) lives at most this long. At least
    /// `--header-read-timeout-secs`.
    #[arg(long, env = "SLUICE_HANDSHAKE_TIMEOUT_SECS", default_value_t = 15,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub handshake_timeout_secs: u64,
    /// Connections accepted on the subscriber listener and not yet upgraded (or answered);
    /// one more is answered HTTP 503 and closed. Each may hold up to
    /// `--max-request-head-kib` of request head.
    #[arg(long, env = "SLUICE_MAX_PENDING_CONNECTIONS", default_value_t = 1024,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_pending_connections: u64,
    /// The same per client IP (both listeners); one more is answered HTTP 429 and closed.
    #[arg(long, env = "SLUICE_MAX_PENDING_PER_IP", default_value_t = 64,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_pending_per_ip: u64,
    /// Largest request head (request line and headers) read from a client, KiB; a URI is
    /// at most 64 KiB whatever this says. Larger: HTTP 431.
    #[arg(long, env = "SLUICE_MAX_REQUEST_HEAD_KIB", default_value_t = 80,
          value_parser = clap::value_parser!(u64).range(8..=4096))]
    pub max_request_head_kib: u64,
    /// File descriptors kept from subscriber connections, for the log's files, the
    /// upstream, the listeners and admin connections (which may use a quarter of it);
    /// the subscriber listener refuses connections (HTTP 503) once it holds the open-file
    /// limit minus this. The soft open-file limit is raised to the hard one at start.
    #[arg(long, env = "SLUICE_FD_RESERVE", default_value_t = 1024,
          value_parser = clap::value_parser!(u64).range(16..=1_000_000))]
    pub fd_reserve: u64,
    /// Memory all subscribers together may make the daemon hold, MiB: messages they have
    /// started and not finished, and their filters (~216 B per DID). A connection whose
    /// next bytes or filter do not fit is closed with 1013.
    #[arg(long, env = "SLUICE_CLIENT_MEMORY_MIB", default_value_t = 256,
          value_parser = clap::value_parser!(u64).range(1..=1024 * 1024))]
    pub client_memory_mib: u64,
    /// The share of that one client IP may hold, MiB.
    #[arg(long, env = "SLUICE_CLIENT_MEMORY_PER_IP_MIB", default_value_t = 32,
          value_parser = clap::value_parser!(u64).range(1..=1024 * 1024))]
    pub client_memory_per_ip_mib: u64,
    /// Seconds a subscriber has to finish a message (all its fragments) once it started
    /// it; later, the connection is closed with 1008. Pings do not extend it.
    #[arg(long, env = "SLUICE_CLIENT_MESSAGE_TIMEOUT_SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub client_message_timeout_secs: u64,
    /// KiB of subscriber text messages (v1 `options_update`) the daemon reads per second
    /// across all subscribers (burst as many). Each message is charged by its size before
    /// it is parsed; one that would wait more than 5 s closes its connection with 1013.
    #[arg(long, env = "SLUICE_CLIENT_TEXT_KIB_PER_SEC", default_value_t = 4096,
          value_parser = clap::value_parser!(u64).range(1..=16 * 1024 * 1024))]
    pub client_text_kib_per_sec: u64,
    /// The share of `--client-text-kib-per-sec` one client IP may use (burst as many),
    /// however many connections it opens. At least `--max-client-message-kib` / 6.
    #[arg(long, env = "SLUICE_CLIENT_TEXT_KIB_PER_SEC_PER_IP", default_value_t = 1024,
          value_parser = clap::value_parser!(u64).range(1..=16 * 1024 * 1024))]
    pub client_text_kib_per_sec_per_ip: u64,
    /// Threads that parse subscriber text messages of 8 KiB or more, off the threads
    /// that deliver events (fixed at start).
    #[arg(long, env = "SLUICE_CLIENT_TEXT_THREADS", default_value_t = 1,
          value_parser = clap::value_parser!(u64).range(1..=64))]
    pub client_text_threads: u64,
    /// Niceness of those threads (0-19; fixed at start): above the delivering threads'
    /// so that, when the cores are busy, parsing waits and delivery does not.
    #[arg(long, env = "SLUICE_CLIENT_TEXT_NICE", default_value_t = 10,
          value_parser = clap::value_parser!(u8).range(0..=19))]
    pub client_text_nice: u8,
    /// Async threads of the catch-up pool, where subscribers in catch-up (replays, slow
    /// consumers) write what they read from the log (reads below the hot tail run on its
    /// blocking threads); 0 = one per core (fixed at start).
    #[arg(long, env = "SLUICE_CATCHUP_THREADS", default_value_t = 0,
          value_parser = clap::value_parser!(u64).range(0..=256))]
    pub catchup_threads: u64,
    /// Niceness of the catch-up pool's threads with `--catchup-sched nice` (0-19; fixed at
    /// start): above the live path's, so that on busy cores live delivery runs first and
    /// catch-up takes what is left. The log's read-ahead thread (`--log-read-ahead-segments`)
    /// decodes for catch-up and runs at the same niceness. 0 runs catch-up at the live
    /// path's priority.
    #[arg(long, env = "SLUICE_CATCHUP_NICE", default_value_t = 19,
          value_parser = clap::value_parser!(u8).range(0..=19))]
    pub catchup_nice: u8,
    /// Scheduling of the catch-up pool's threads and the log's read-ahead thread: nice
    /// (at `--catchup-nice`) or idle (Linux's SCHED_IDLE class: they run only on what the
    /// live path leaves of a core, and a live thread that wakes takes the core from them
    /// at once instead of waiting for their time slice to end).
    #[arg(long, env = "SLUICE_CATCHUP_SCHED", default_value = "nice")]
    pub catchup_sched: CatchupSched,
    /// With `--catchup-sched idle`: milliseconds catch-up may make no progress while its
    /// threads wait for a core (the cores busy with other work) before they are raised to
    /// nice 19 until some of it finishes; bounds how long other work can starve replays.
    /// 0 = never raised. Needs RLIMIT_NICE >= 1 or CAP_SYS_NICE (refusals are counted).
    #[arg(long, env = "SLUICE_CATCHUP_STARVATION_MS", default_value_t = 500,
          value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub catchup_starvation_ms: u64,
    /// Mebibytes per second all subscribers in catch-up (replays, slow consumers) may be
    /// sent in total, counted as their events' bytes on their wires before compression:
    /// each catch-up write waits on the catch-up pool until its bytes are due, so replays
    /// take a bounded share of the machine and only last longer (lossless; nothing is
    /// dropped or closed for it). 0 = unpaced (fixed at start).
    #[arg(long, env = "SLUICE_CATCHUP_PACE_MIB_PER_SEC", default_value_t = DEFAULT_CATCHUP_PACE_MIB_PER_SEC,
          value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pub catchup_pace_mib_per_sec: u64,
    /// Events per second all subscribers in catch-up may be sent in total, beside the
    /// pace in bytes: each catch-up write waits until both its bytes and its events are
    /// due. Bounds catch-up's per-event costs (reads, hand-offs, one message each), which
    /// a pace in bytes leaves unbounded when events are small. 0 = unpaced (fixed at
    /// start).
    #[arg(long, env = "SLUICE_CATCHUP_PACE_EVENTS_PER_SEC", default_value_t = DEFAULT_CATCHUP_PACE_EVENTS_PER_SEC,
          value_parser = clap::value_parser!(u64).range(0..=1_000_000_000))]
    pub catchup_pace_events_per_sec: u64,
    /// Milliseconds a refusal (HTTP 429/503 with Retry-After, e.g. over a connect or
    /// `/event` rate) is held before it is sent, at most its Retry-After; every refusal
    /// closes its connection. A client that retries at once then asks at most
    /// `--max-held-refusals-per-ip` times per hold per address. 0 = answer at once. Less
    /// than `--handshake-timeout-secs`.
    #[arg(long, env = "SLUICE_REFUSAL_HOLD_MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(0..=600_000))]
    pub refusal_hold_ms: u64,
    /// Refusals held at once per client IP; past it refusals are answered at once and
    /// new connections from that IP are refused (429) before their request is read.
    #[arg(long, env = "SLUICE_MAX_HELD_REFUSALS_PER_IP", default_value_t = 16,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_held_refusals_per_ip: u64,
    /// Milliseconds a connection refused before its request was read (over the
    /// pending-connection caps or `--max-held-refusals-per-ip`) stays open after its
    /// answer, reading and dropping the client's request (at most
    /// `--max-request-head-kib`) until the client closes or the head has ended, so the
    /// close is not a reset that loses the answer. Never for a refusal of the descriptor
    /// reserve. 0 = close at once.
    #[arg(long, env = "SLUICE_REFUSAL_LINGER_MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub refusal_linger_ms: u64,
    /// Refused connections lingering at once per client IP (`--refusal-linger-ms`); past
    /// it they are closed at once.
    #[arg(long, env = "SLUICE_MAX_LINGERING_REFUSALS_PER_IP", default_value_t = 16,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_lingering_refusals_per_ip: u64,
    /// Refused connections lingering at once per listener, from all addresses; past it
    /// they are closed at once. Each holds a descriptor, counted against the reserve.
    #[arg(long, env = "SLUICE_MAX_LINGERING_REFUSALS", default_value_t = 256,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_lingering_refusals: u64,
    /// Most collections one subscriber may name.
    #[arg(long, env = "SLUICE_MAX_COLLECTIONS", default_value_t = 100,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub max_collections: u64,
    /// Most DIDs one subscriber may name.
    #[arg(long, env = "SLUICE_MAX_DIDS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_dids: u64,
    /// zstd dictionary of Jetstream v1 `compress=true`: `jetstream` (the one every v1
    /// client embeds, built in), `trained` (sluice's own, trained at first use; clients
    /// must fetch it from /zstd-dictionary) or a file.
    #[arg(long, env = "SLUICE_ZSTD_DICTIONARY", default_value = "jetstream")]
    pub zstd_dictionary: String,
    /// zstd dictionary of Jetstream v2 `zstdDictionary=<id>`, served at
    /// /xrpc/network.bsky.jetstream.getZstdDictionary: `jetstream` (Jetstream's, ID
    /// 20260811, built in) or a file holding a structured dictionary (its header carries
    /// the ID clients ask for).
    #[arg(long, env = "SLUICE_ZSTD_DICTIONARY_V2", default_value = "jetstream")]
    pub zstd_dictionary_v2: String,
    /// MiB of compressed events kept per compression scheme (v1, v2) so each event is
    /// compressed once for all its subscribers; past it an event is compressed for each
    /// subscriber that needs it instead of being kept.
    #[arg(long, env = "SLUICE_ZSTD_CACHE_MIB", default_value_t = 32,
          value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub zstd_cache_mib: u64,
    /// Seconds allowed for a graceful shutdown before exiting anyway.
    #[arg(long, env = "SLUICE_SHUTDOWN_TIMEOUT_SECS", default_value_t = 20,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub shutdown_timeout_secs: u64,
    /// Log filter (tracing EnvFilter syntax, e.g. `info` or `sluice=debug`); overrides the
    /// global --log. Re-read on SIGHUP.
    #[arg(long, env = "SLUICE_LOG_FILTER")]
    pub log_filter: Option<String>,
    /// Seconds between progress summaries in the log (0 = never).
    #[arg(long, env = "SLUICE_STATS_INTERVAL_SECS", default_value_t = 60)]
    pub stats_interval_secs: u64,

    // ---- cluster (Redis)
    /// Join a cluster through this Redis (`redis://host:port/db`): one node, the leader,
    /// ingests into a shared Redis Stream and every node serves from it. Without it, sluice
    /// runs alone on its embedded log.
    #[arg(long, env = "SLUICE_REDIS")]
    pub redis: Option<String>,
    /// Cluster name: nodes on one Redis with the same name share one seq space.
    #[arg(long, env = "SLUICE_CLUSTER", default_value = "sluice")]
    pub cluster: String,
    /// This node's name in the cluster (unique per running node). Default: the host name
    /// and the --listen port.
    #[arg(long, env = "SLUICE_CLUSTER_NODE_ID")]
    pub cluster_node_id: Option<String>,
    /// Leader lease time to live, ms. The leader renews every third of it and stops
    /// appending a fifth of it before it could expire; a standby takes over after it.
    #[arg(long, env = "SLUICE_LEASE_TTL_MS", default_value_t = 3000,
          value_parser = clap::value_parser!(u64).range(500..=600_000))]
    pub lease_ttl_ms: u64,
    /// How often a standby tries to take the lease, ms (±50% jitter).
    #[arg(long, env = "SLUICE_STANDBY_POLL_MS", default_value_t = 250,
          value_parser = clap::value_parser!(u64).range(10..=60_000))]
    pub standby_poll_ms: u64,
    /// Most events the shared stream keeps (a node away longer than this rejoins with a
    /// recorded discontinuity; deep replay stays on each node's own log).
    #[arg(long, env = "SLUICE_CLUSTER_WINDOW_EVENTS", default_value_t = 300_000,
          value_parser = clap::value_parser!(u64).range(1_000..=1_000_000_000))]
    pub cluster_window_events: u64,
    /// Most MiB of entries the shared stream keeps (wins over everything else: Redis
    /// memory is the scarce resource).
    #[arg(long, env = "SLUICE_CLUSTER_WINDOW_MAX_MIB", default_value_t = 768,
          value_parser = clap::value_parser!(u64).range(1..=1_048_576))]
    pub cluster_window_max_mib: u64,
    /// Events the stream always keeps, whatever the window says.
    #[arg(long, env = "SLUICE_CLUSTER_WINDOW_FLOOR_EVENTS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(0..=1_000_000_000))]
    pub cluster_window_floor_events: u64,
    /// Refuse to start unless Redis has appendonly yes and appendfsync always (otherwise
    /// a warning is logged).
    #[arg(long, env = "SLUICE_REDIS_REQUIRE_DURABLE", default_value_t = false,
          num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set,
          value_parser = clap::value_parser!(bool))]
    pub redis_require_durable: bool,
    /// Frames queued between ingest and the Redis appender before ingest stops reading.
    #[arg(long, env = "SLUICE_CLUSTER_APPEND_QUEUE", default_value_t = 4096,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub cluster_append_queue: u64,
    /// Appends in flight at once on the leader's Redis connection (each at most one
    /// batch); Redis checks each one when it reaches it.
    #[arg(long, env = "SLUICE_CLUSTER_APPEND_IN_FLIGHT", default_value_t = 4,
          value_parser = clap::value_parser!(u64).range(1..=64))]
    pub cluster_append_in_flight: u64,
    /// Most events per append (one stream entry).
    #[arg(long, env = "SLUICE_CLUSTER_BATCH_MAX_EVENTS", default_value_t = 5_000,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub cluster_batch_max_events: u64,
    /// Deadline of one Redis command, ms (a blocking stream read adds its wait).
    #[arg(long, env = "SLUICE_REDIS_TIMEOUT_MS", default_value_t = 2000,
          value_parser = clap::value_parser!(u64).range(10..=600_000))]
    pub redis_timeout_ms: u64,
    /// How long a subscriber's cursor just past this node's log waits for the log to reach
    /// it, ms (a subscriber moving here from a dead node continues without a gap or a
    /// duplicate); after it the cursor is resolved as it is.
    #[arg(long, env = "SLUICE_CLUSTER_CURSOR_GRACE_MS", default_value_t = 2000,
          value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub cluster_cursor_grace_ms: u64,
    // ---- Redis sink
    /// Write every event to Redis streams (one per collection and per kind), e.g.
    /// `redis://127.0.0.1:6379/0`. Off when unset.
    #[arg(long, env = "SLUICE_REDIS_SINK")]
    pub redis_sink: Option<String>,
    /// Prefix of every key the Redis sink writes.
    #[arg(long, env = "SLUICE_REDIS_SINK_PREFIX", default_value = "sluice:")]
    pub redis_sink_prefix: String,
    /// Also write every event to the stream `<prefix>all`.
    #[arg(long, env = "SLUICE_REDIS_SINK_ALL", default_value_t = false,
          num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub redis_sink_all: bool,
    /// Also PUBLISH each collection event's JSON on the channel `<prefix>c:<collection>`
    /// (for consumers of a pub/sub rebroadcaster; a missed message is gone).
    #[arg(long, env = "SLUICE_REDIS_SINK_PUBLISH", default_value_t = false,
          num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub redis_sink_publish: bool,
    /// Each stream is trimmed to about this many entries (0 = no length bound).
    #[arg(long, env = "SLUICE_REDIS_SINK_MAX_LEN", default_value_t = 1_000_000,
          value_parser = clap::value_parser!(u64).range(0..=1_000_000_000))]
    pub redis_sink_max_len: u64,
    /// Entries whose source time is more than this many seconds older than the newest
    /// sunk event's are trimmed (approximately; 0 = no age bound).
    #[arg(long, env = "SLUICE_REDIS_SINK_MAX_AGE_SECS", default_value_t = 86_400,
          value_parser = clap::value_parser!(u64).range(0..=100_000_000))]
    pub redis_sink_max_age_secs: u64,
    /// Most events per write to Redis (with --redis-sink-batch-kib, the sink's memory bound).
    #[arg(long, env = "SLUICE_REDIS_SINK_BATCH_EVENTS", default_value_t = 2000,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub redis_sink_batch_events: u64,
    /// Most KiB of event JSON per write to Redis.
    #[arg(long, env = "SLUICE_REDIS_SINK_BATCH_KIB", default_value_t = 4096,
          value_parser = clap::value_parser!(u64).range(1..=512 * 1024))]
    pub redis_sink_batch_kib: u64,
    /// Deadline of one Redis command of the sink, ms; past it the sink reconnects.
    #[arg(long, env = "SLUICE_REDIS_SINK_TIMEOUT_MS", default_value_t = 5000,
          value_parser = clap::value_parser!(u64).range(10..=600_000))]
    pub redis_sink_timeout_ms: u64,
    /// Ceiling of the sink's backoff after repeated errors from a live Redis, ms (full
    /// jitter, doubling from 100 ms). A Redis that refuses connections is probed instead
    /// (--redis-sink-probe-ms).
    #[arg(long, env = "SLUICE_REDIS_SINK_BACKOFF_MAX_MS", default_value_t = 5000,
          value_parser = clap::value_parser!(u64).range(100..=600_000))]
    pub redis_sink_backoff_max_ms: u64,
    /// While Redis refuses connections or is loading its data, the sink tries again this
    /// often, ms (no backoff): how long after Redis returns the sink may take to notice.
    #[arg(long, env = "SLUICE_REDIS_SINK_PROBE_MS", default_value_t = 100,
          value_parser = clap::value_parser!(u64).range(10..=60_000))]
    pub redis_sink_probe_ms: u64,
    /// Niceness of the sink's threads (0-19; fixed at start): its log reads, encoding and
    /// Redis I/O run on a runtime of their own at this niceness, so that on busy cores
    /// live delivery runs first (a catch-up after an outage takes what is left). 0 runs
    /// it at the live path's priority.
    #[arg(long, env = "SLUICE_REDIS_SINK_NICE", default_value_t = 19,
          value_parser = clap::value_parser!(u8).range(0..=19))]
    pub redis_sink_nice: u8,
}

/// Everything `serve` runs with, derived from [`ServeArgs`].
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub ingest: IngestConfig,
    pub log: LogConfig,
    pub hub: HubConfig,
    pub session: SessionConfig,
    pub admission: AdmissionConfig,
    pub filter_limits: FilterLimits,
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub ready_max_lag: Duration,
    pub slow_policy: SlowPolicy,
    pub zstd_dictionary: DictionarySource,
    pub zstd_dictionary_v2: DictionarySource,
    /// Bytes of compressed events kept per scheme.
    pub zstd_cache_bytes: usize,
    pub shutdown_timeout: Duration,
    pub stats_interval: Option<Duration>,
    /// Set with `--redis`: this node joins a cluster.
    pub cluster: Option<ClusterConfig>,
    /// Limits before the upgrade on the subscriber listener (`http::listen`).
    pub listen_limits: ListenConfig,
    /// Descriptors kept from subscriber connections.
    pub fd_reserve: u64,
    /// The budget of client-held memory (`http::budget`).
    pub client_memory: MemoryConfig,
    /// The budget and threads of client text messages (`http::admission_text`).
    pub client_text: TextConfig,
    pub redis_sink: Option<RedisSinkConfig>,
}

impl ServeConfig {
    /// The admin listener's limits: the subscriber listener's timeouts, at most a quarter
    /// of the descriptor reserve pending at once, and small request heads.
    pub fn admin_listen_limits(&self) -> ListenConfig {
        let quarter = usize::try_from(self.fd_reserve / 4).unwrap_or(usize::MAX);
        ListenConfig {
            max_pending: self.listen_limits.max_pending.min(quarter),
            max_head_bytes: 16 * 1024,
            send_buffer_bytes: None,
            ..self.listen_limits.clone()
        }
    }
}

fn usize_of(v: u64) -> anyhow::Result<usize> {
    usize::try_from(v).map_err(|_| anyhow::anyhow!("{v} does not fit this platform"))
}

/// How the catch-up pool's threads and the log's read-ahead thread give way to the live
/// path (`--catchup-sched`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CatchupSched {
    /// At `--catchup-nice`.
    Nice,
    /// In the SCHED_IDLE class (`--catchup-nice` does not apply).
    Idle,
}

impl ServeArgs {
    /// Where the catch-up pool's threads and the read-ahead thread run.
    pub fn catchup_class(&self) -> Background {
        match self.catchup_sched {
            CatchupSched::Nice => Background::Nice(i32::from(self.catchup_nice)),
            CatchupSched::Idle => Background::Idle,
        }
    }

    /// Async worker threads to start: `--worker-threads`, or one per core.
    pub fn runtime_worker_threads(&self) -> usize {
        match self.worker_threads {
            0 => std::thread::available_parallelism().map_or(1, |cores| cores.get()),
            n => usize::try_from(n).unwrap_or(1),
        }
    }

    /// Validates and derives the runtime configuration.
    pub fn to_config(&self) -> anyhow::Result<ServeConfig> {
        if self.max_index_changes_per_sec < 2 * self.max_dids {
            anyhow::bail!(
                "--max-index-changes-per-sec ({}) must be at least twice --max-dids ({}): a \
                 subscriber naming that many DIDs could never be admitted",
                self.max_index_changes_per_sec,
                self.max_dids
            );
        }
        if self.max_index_changes_per_sec_per_ip < 2 * self.max_dids {
            anyhow::bail!(
                "--max-index-changes-per-sec-per-ip ({}) must be at least twice --max-dids \
                 ({}): a subscriber naming that many DIDs could never be admitted",
                self.max_index_changes_per_sec_per_ip,
                self.max_dids
            );
        }
        if self.backoff_min_ms > self.backoff_max_ms {
            anyhow::bail!(
                "backoff_min_ms ({}) is larger than backoff_max_ms ({})",
                self.backoff_min_ms,
                self.backoff_max_ms
            );
        }
        if self.pong_timeout_secs <= self.ping_interval_secs {
            anyhow::bail!(
                "pong_timeout_secs ({}) must exceed ping_interval_secs ({})",
                self.pong_timeout_secs,
                self.ping_interval_secs
            );
        }
        if self.client_memory_per_ip_mib > self.client_memory_mib {
            anyhow::bail!(
                "client_memory_per_ip_mib ({}) is larger than client_memory_mib ({})",
                self.client_memory_per_ip_mib,
                self.client_memory_mib
            );
        }
        if self.client_text_kib_per_sec_per_ip > self.client_text_kib_per_sec {
            anyhow::bail!(
                "client_text_kib_per_sec_per_ip ({}) is larger than client_text_kib_per_sec ({})",
                self.client_text_kib_per_sec_per_ip,
                self.client_text_kib_per_sec
            );
        }
        // A message waits at most MAX_TEXT_WAIT for its share after the burst (one second
        // of it): the largest message allowed must fit in that.
        let text_window = crate::http::admission_text::MAX_TEXT_WAIT.as_secs() + 1;
        if self.client_text_kib_per_sec_per_ip * text_window < self.max_client_message_kib {
            anyhow::bail!(
                "client_text_kib_per_sec_per_ip ({}) must be at least max_client_message_kib                  ({}) / {text_window}: the largest message allowed could never be read",
                self.client_text_kib_per_sec_per_ip,
                self.max_client_message_kib
            );
        }
        if self.handshake_timeout_secs < self.header_read_timeout_secs {
            anyhow::bail!(
                "handshake_timeout_secs ({}) must be at least header_read_timeout_secs ({})",
                self.handshake_timeout_secs,
                self.header_read_timeout_secs
            );
        }
        if self.refusal_hold_ms >= self.handshake_timeout_secs * 1000 {
            anyhow::bail!(
                "refusal_hold_ms ({}) must be less than handshake_timeout_secs ({}) in ms: a \
                 held refusal is a connection not yet upgraded",
                self.refusal_hold_ms,
                self.handshake_timeout_secs
            );
        }
        crate::upstream::client::subscribe_url(&self.upstream, None)?;
        let zstd_dictionary = DictionarySource::parse(&self.zstd_dictionary);
        let zstd_dictionary_v2 = DictionarySource::parse(&self.zstd_dictionary_v2);
        for (name, source) in [
            ("zstd_dictionary", &zstd_dictionary),
            ("zstd_dictionary_v2", &zstd_dictionary_v2),
        ] {
            if let DictionarySource::File(path) = source {
                if !path.is_file() {
                    anyhow::bail!(
                        "{name} {} is not a readable file (or jetstream{})",
                        path.display(),
                        if name == "zstd_dictionary" {
                            ", trained"
                        } else {
                            ""
                        }
                    );
                }
            }
        }
        if zstd_dictionary_v2 == DictionarySource::Trained {
            anyhow::bail!(
                "zstd_dictionary_v2 cannot be trained: v2 clients fetch a dictionary by its ID; \
                 use jetstream or a file"
            );
        }
        let upstream = UpstreamConfig {
            upstream: self.upstream.clone(),
            max_frame_bytes: usize_of(self.max_frame_bytes)?,
            stall_timeout: Duration::from_secs(self.stall_timeout_secs),
            backoff_min: Duration::from_millis(self.backoff_min_ms),
            backoff_max: Duration::from_millis(self.backoff_max_ms),
            ..UpstreamConfig::default()
        };
        let mut ingest = IngestConfig::new(upstream);
        ingest.frame_queue = usize_of(self.frame_queue)?;
        ingest.decode_limits.max_depth = usize_of(self.max_cbor_depth)?;
        let mut log = LogConfig::new(self.data_dir.clone());
        log.tail_max_bytes = usize_of(self.tail_max_mib * MIB)?;
        log.tail_min_bytes = usize_of(self.tail_min_mib * MIB)?;
        log.tail_min_age = Duration::from_secs(self.tail_min_secs);
        log.queue_max_bytes = usize_of(self.log_queue_mib * MIB)?;
        log.index_cache_bytes = self.log_index_cache_mib * MIB;
        log.decoded_cache_bytes = usize_of(self.log_decoded_cache_mib * MIB)?;
        log.read_ahead_segments = usize_of(self.log_read_ahead_segments)?;
        log.merge_small_segments = self.log_merge_segments;
        log.merge_keep_raw_bytes = usize_of(self.log_merge_keep_raw_kib * 1024)?;
        log.direct_raw_writes = self.log_direct_raw_writes;
        log.segment_target_bytes = usize_of(self.log_segment_kib * 1024)?;
        log.read_ahead_class = self.catchup_class();
        log.compression.raw_level = self.log_raw_zstd_level;
        log.compression.raw_fast_level = self.log_raw_zstd_fast_level;
        log.commit_interval = Duration::from_millis(self.commit_interval_ms);
        log.commit_max_events = usize_of(self.commit_max_events)?;
        let max_bytes = self.retention_max_gib * 1024 * MIB;
        let raw_max_bytes = match self.raw_retention_max_gib {
            None => max_bytes / 5,
            Some(gib) if gib.is_finite() && gib > 0.0 && gib < self.retention_max_gib as f64 => {
                (gib * (1024 * MIB) as f64) as u64
            }
            Some(gib) => anyhow::bail!(
                "raw_retention_max_gib = {gib} must be more than 0 and less than \
                 retention_max_gib = {} (it is the raw frames' share of it)",
                self.retention_max_gib
            ),
        };
        log.retention = RetentionConfig {
            max_age: Duration::from_secs(self.retention_hours * 3600),
            max_bytes,
            raw: Some(RawRetention {
                max_age: Duration::from_secs(self.raw_retention_hours * 3600),
                max_bytes: raw_max_bytes,
            }),
            ..RetentionConfig::default()
        };
        let hub = HubConfig {
            queue_max_events: usize_of(self.queue_max_events)?,
            queue_max_bytes: usize_of(self.queue_max_kib * 1024)?,
            cold_read_concurrency: usize_of(self.cold_read_concurrency)?,
            replay_events_per_sec: self.replay_events_per_sec,
            catchup_batch_bytes: usize_of(self.catchup_batch_kib * 1024)?,
            index_changes_per_sec: self.max_index_changes_per_sec,
            index_changes_per_sec_per_ip: self.max_index_changes_per_sec_per_ip,
            scan_events_per_sec: self.scan_events_per_sec,
            scan_events_per_sec_per_ip: self.scan_events_per_sec_per_ip,
            catchup: CatchupThreads {
                threads: usize_of(self.catchup_threads)?,
                class: self.catchup_class(),
                starvation_bound: Duration::from_millis(self.catchup_starvation_ms),
                pace_bytes_per_sec: self.catchup_pace_mib_per_sec.saturating_mul(MIB),
                pace_events_per_sec: self.catchup_pace_events_per_sec,
            },
            ..HubConfig::default()
        };
        let session = SessionConfig {
            write_timeout: Duration::from_secs(self.write_timeout_secs),
            ping_interval: Duration::from_secs(self.ping_interval_secs),
            pong_timeout: Duration::from_secs(self.pong_timeout_secs),
            server_max_message_bytes: usize_of(self.max_message_bytes)?,
            retry_after_secs: self.retry_after_secs,
            socket_send_buffer: usize_of(self.socket_send_buffer_kib * 1024)?,
            client_max_message_bytes: usize_of(self.max_client_message_kib * 1024)?,
            client_updates_per_sec: self.max_client_updates_per_sec,
            coalesce: Duration::from_micros(self.coalesce_us),
            client_message_timeout: Duration::from_secs(self.client_message_timeout_secs),
            direct_writes: self.direct_writes,
            ..SessionConfig::default()
        };
        let admission = AdmissionConfig {
            max_subscribers: usize_of(self.max_subscribers)?,
            connects_per_sec: self.connects_per_sec as f64,
            connect_burst: self.connect_burst as f64,
            max_per_ip: usize_of(self.max_per_ip)?,
            retry_after_secs: self.retry_after_secs,
            connects_per_sec_per_ip: self.connects_per_sec_per_ip as f64,
            event_requests_per_sec_per_ip: self.event_requests_per_sec_per_ip as f64,
            event_requests_per_sec: self.event_requests_per_sec as f64,
        };
        let cluster = match &self.redis {
            None => None,
            Some(url) => {
                if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                    anyhow::bail!("--redis must be a redis:// URL, not {url:?}");
                }
                if self.cluster.is_empty()
                    || !self
                        .cluster
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                {
                    anyhow::bail!(
                        "--cluster must be letters, digits, '-', '_' or '.', not {:?}",
                        self.cluster
                    );
                }
                let node_id = match &self.cluster_node_id {
                    Some(id) if !id.is_empty() && !id.contains(' ') => id.clone(),
                    Some(id) => {
                        anyhow::bail!("--cluster-node-id {id:?} must be non-empty without spaces")
                    }
                    None => format!("{}:{}", host_name(), self.listen.port()),
                };
                let mut c = ClusterConfig::new(url.clone(), self.cluster.clone(), node_id);
                c.lease_ttl = Duration::from_millis(self.lease_ttl_ms);
                c.standby_poll = Duration::from_millis(self.standby_poll_ms);
                c.window_events = self.cluster_window_events;
                c.window_max_bytes = self.cluster_window_max_mib * MIB;
                c.window_floor_events = self.cluster_window_floor_events;
                c.require_durable = self.redis_require_durable;
                c.append_queue_frames = usize_of(self.cluster_append_queue)?;
                c.append_in_flight = usize_of(self.cluster_append_in_flight)?;
                c.batch_max_events = usize_of(self.cluster_batch_max_events)?;
                c.redis_timeout = Duration::from_millis(self.redis_timeout_ms);
                c.cursor_grace = Duration::from_millis(self.cluster_cursor_grace_ms);
                Some(c)
            }
        };
        let redis_sink = match &self.redis_sink {
            None => None,
            Some(url) => {
                let parsed = url::Url::parse(url)
                    .map_err(|e| anyhow::anyhow!("redis_sink {url:?} is not a URL: {e}"))?;
                if !matches!(parsed.scheme(), "redis" | "redis+unix" | "unix") {
                    anyhow::bail!("redis_sink {url:?} must be a redis:// (or unix://) URL");
                }
                if self.redis_sink_prefix.is_empty() {
                    anyhow::bail!("redis_sink_prefix must not be empty");
                }
                // Every cluster key starts `sluice:{<cluster>}:`; the sink's keys end in
                // `sink`, `all`, `c:...` or `k:...`, so only a prefix inside the cluster's
                // key space could name one of its keys (`...:lease:` + `sink`).
                if self.redis.is_some() && self.redis_sink_prefix.starts_with("sluice:{") {
                    anyhow::bail!(
                        "redis_sink_prefix {:?} is inside the cluster's keys (sluice:{{<cluster>}}:...): choose another",
                        self.redis_sink_prefix
                    );
                }
                let mut sink = RedisSinkConfig::new(url.clone());
                sink.prefix = self.redis_sink_prefix.clone();
                sink.all_stream = self.redis_sink_all;
                sink.publish = self.redis_sink_publish;
                sink.max_len = self.redis_sink_max_len;
                sink.max_age = (self.redis_sink_max_age_secs > 0)
                    .then(|| Duration::from_secs(self.redis_sink_max_age_secs));
                sink.batch_max_events = usize_of(self.redis_sink_batch_events)?;
                sink.batch_max_bytes = usize_of(self.redis_sink_batch_kib * 1024)?;
                sink.timeout = Duration::from_millis(self.redis_sink_timeout_ms);
                sink.backoff_max = Duration::from_millis(self.redis_sink_backoff_max_ms);
                sink.probe_interval = Duration::from_millis(self.redis_sink_probe_ms);
                sink.nice = i32::from(self.redis_sink_nice);
                Some(sink)
            }
        };
        Ok(ServeConfig {
            cluster,
            ingest,
            log,
            hub,
            session,
            admission,
            filter_limits: FilterLimits {
                max_collections: usize_of(self.max_collections)?,
                max_dids: usize_of(self.max_dids)?,
            },
            listen: self.listen,
            admin_listen: self.admin_listen,
            ready_max_lag: Duration::from_secs(self.ready_max_lag_secs),
            slow_policy: self.slow_consumer,
            zstd_dictionary,
            zstd_dictionary_v2,
            zstd_cache_bytes: usize_of(self.zstd_cache_mib * MIB)?,
            shutdown_timeout: Duration::from_secs(self.shutdown_timeout_secs),
            stats_interval: (self.stats_interval_secs > 0)
                .then(|| Duration::from_secs(self.stats_interval_secs)),
            listen_limits: ListenConfig {
                header_read_timeout: Duration::from_secs(self.header_read_timeout_secs),
                handshake_timeout: Duration::from_secs(self.handshake_timeout_secs),
                max_pending: usize_of(self.max_pending_connections)?,
                max_pending_per_ip: usize_of(self.max_pending_per_ip)?,
                max_head_bytes: usize_of(self.max_request_head_kib * 1024)?,
                send_buffer_bytes: None,
                retry_after_secs: self.retry_after_secs,
                max_dids: usize_of(self.max_dids)?,
                refusal_hold: Duration::from_millis(self.refusal_hold_ms),
                max_held_refusals_per_ip: usize_of(self.max_held_refusals_per_ip)?,
                refusal_linger: Duration::from_millis(self.refusal_linger_ms),
                max_lingering_refusals_per_ip: usize_of(self.max_lingering_refusals_per_ip)?,
                max_lingering_refusals: usize_of(self.max_lingering_refusals)?,
            },
            fd_reserve: self.fd_reserve,
            client_memory: MemoryConfig {
                total_bytes: usize_of(self.client_memory_mib * MIB)?,
                per_ip_bytes: usize_of(self.client_memory_per_ip_mib * MIB)?,
            },
            client_text: TextConfig {
                bytes_per_sec: self.client_text_kib_per_sec * 1024,
                bytes_per_sec_per_ip: self.client_text_kib_per_sec_per_ip * 1024,
                threads: usize_of(self.client_text_threads)?,
                nice: i32::from(self.client_text_nice),
            },
            redis_sink,
        })
    }
}

/// This machine's host name, for the default cluster node id.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().replace(' ', "-"))
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "sluice".into())
}

/// A command wrapping [`ServeArgs`], for parsing settings outside the main CLI.
#[derive(Debug, clap::Parser)]
struct ServeOnly {
    #[command(flatten)]
    args: ServeArgs,
}

/// Applies the `--config` TOML file under flags and env vars: every key the file sets is
/// used only where the command line and environment left the default.
pub fn with_config_file(args: ServeArgs, matches: &ArgMatches) -> anyhow::Result<ServeArgs> {
    let Some(path) = args.config.clone() else {
        return Ok(args);
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| anyhow::anyhow!("cannot read config {}: {e}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e| anyhow::anyhow!("config {} is not valid TOML: {e}", path.display()))?;
    let command = ServeOnly::command();
    let mut argv = vec!["sluice-serve".to_string()];
    for (key, value) in &table {
        let id = key.as_str();
        if id == "config" {
            anyhow::bail!(
                "config {}: `config` cannot be set from a config file",
                path.display()
            );
        }
        if !command.get_arguments().any(|a| a.get_id() == id) {
            anyhow::bail!("config {}: unknown setting {key:?}", path.display());
        }
        let explicit = matches!(
            matches.value_source(id),
            Some(clap::parser::ValueSource::CommandLine | clap::parser::ValueSource::EnvVariable)
        );
        if explicit {
            continue;
        }
        let rendered = match value {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            other => anyhow::bail!(
                "config {}: {key} must be a string, number or boolean, not {}",
                path.display(),
                other.type_str()
            ),
        };
        argv.push(format!("--{}", id.replace('_', "-")));
        argv.push(rendered);
    }
    // Explicit values (flags and env vars) are passed again, after the file's, so one parse
    // gives every value the same validation and the precedence stays flag > env > file.
    for arg in command.get_arguments() {
        let id = arg.get_id().as_str();
        let explicit = matches!(
            matches.value_source(id),
            Some(clap::parser::ValueSource::CommandLine | clap::parser::ValueSource::EnvVariable)
        );
        let (Some(long), true) = (arg.get_long(), explicit) else {
            continue;
        };
        if let Some(values) = matches.get_raw(id) {
            for value in values {
                argv.push(format!("--{long}"));
                argv.push(value.to_string_lossy().into_owned());
            }
        }
    }
    let merged = ServeOnly::command()
        .try_get_matches_from(&argv)
        .map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))?;
    let mut args = ServeOnly::from_arg_matches(&merged)?.args;
    args.config = Some(path);
    Ok(args)
}

/// Parses serve settings from an argument list (the program name first), applying the
/// config file. Used by `sluice serve` and `sluice config check`.
pub fn parse_serve_args<I, T>(argv: I) -> anyhow::Result<ServeArgs>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let matches = ServeOnly::command().try_get_matches_from(argv)?;
    let args = ServeOnly::from_arg_matches(&matches)?.args;
    with_config_file(args, &matches)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_zstd_levels_reach_the_log_and_negative_levels_parse() {
        let config = |extra: &[&str]| {
            let mut argv = vec!["x", "--upstream", "ws://127.0.0.1:9"];
            argv.extend_from_slice(extra);
            parse_serve_args(argv).and_then(|a| a.to_config())
        };
        let c = config(&[]).unwrap();
        assert_eq!(
            (
                c.log.compression.raw_level,
                c.log.compression.raw_fast_level
            ),
            (3, -3)
        );
        let c = config(&[
            "--log-raw-zstd-level",
            "-1",
            "--log-raw-zstd-fast-level",
            "-7",
        ])
        .unwrap();
        assert_eq!(
            (
                c.log.compression.raw_level,
                c.log.compression.raw_fast_level
            ),
            (-1, -7)
        );
        for bad in ["20", "-51", "x"] {
            assert!(
                config(&["--log-raw-zstd-level", bad]).is_err(),
                "{bad} refused"
            );
        }
    }

    #[test]
    fn the_merge_keeps_raw_frames_from_a_size_set_by_flag_or_file() {
        let keep = |extra: &[&str]| {
            let mut argv = vec!["x", "--upstream", "ws://127.0.0.1:9"];
            argv.extend_from_slice(extra);
            parse_serve_args(argv)
                .and_then(|a| a.to_config())
                .map(|c| c.log.store_config().merge_keep_raw_bytes)
        };
        assert_eq!(keep(&[]).unwrap(), 128 * 1024);
        assert_eq!(keep(&["--log-merge-keep-raw-kib", "0"]).unwrap(), 0);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sluice.toml");
        std::fs::write(&path, "log_merge_keep_raw_kib = 512\n").unwrap();
        assert_eq!(
            keep(&["--config", path.to_str().unwrap()]).unwrap(),
            512 * 1024
        );
        assert!(keep(&["--log-merge-keep-raw-kib", "-1"]).is_err());
        assert!(keep(&["--log-merge-keep-raw-kib", "70000"]).is_err());
    }

    #[test]
    fn raw_retention_is_a_share_of_the_size_cap() {
        let config = |extra: &[&str]| {
            let mut argv = vec!["x", "--upstream", "ws://127.0.0.1:9"];
            argv.extend_from_slice(extra);
            parse_serve_args(argv).and_then(|a| a.to_config())
        };
        let gib = 1024 * MIB;
        // Default: a fifth of the total, 24 h.
        let c = config(&[]).unwrap();
        let raw = c.log.retention.raw.unwrap();
        assert_eq!(c.log.retention.max_bytes, 20 * gib);
        assert_eq!(raw.max_bytes, 4 * gib);
        assert_eq!(raw.max_age, Duration::from_secs(24 * 3600));
        let c = config(&["--retention-max-gib", "10"]).unwrap();
        assert_eq!(c.log.retention.raw.unwrap().max_bytes, 2 * gib);
        // Set, fractions allowed.
        let c = config(&[
            "--raw-retention-max-gib",
            "0.5",
            "--raw-retention-hours",
            "3",
        ])
        .unwrap();
        let raw = c.log.retention.raw.unwrap();
        assert_eq!(raw.max_bytes, gib / 2);
        assert_eq!(raw.max_age, Duration::from_secs(3 * 3600));
        // Not a share: refused, naming both settings.
        for bad in ["20", "25", "0", "-1", "NaN"] {
            let flag = format!("--raw-retention-max-gib={bad}");
            let err = config(&[&flag]).unwrap_err().to_string();
            assert!(
                err.contains("raw_retention_max_gib") || err.contains("raw-retention-max-gib"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn catchup_scheduling_is_nice_by_default_and_idle_when_asked_from_a_flag_or_the_file() {
        let class = |argv: &[&str]| {
            let c = parse_serve_args(argv.iter().copied()).and_then(|a| a.to_config())?;
            anyhow::ensure!(
                c.hub.catchup.class == c.log.read_ahead_class,
                "the read-ahead thread runs as the pool does"
            );
            Ok::<_, anyhow::Error>(c.hub.catchup.class)
        };
        assert_eq!(class(&["x"]).unwrap(), Background::Nice(19));
        assert_eq!(
            class(&["x", "--catchup-sched", "idle"]).unwrap(),
            Background::Idle
        );
        assert_eq!(
            class(&["x", "--catchup-sched", "nice", "--catchup-nice", "5"]).unwrap(),
            Background::Nice(5)
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sluice.toml");
        std::fs::write(&path, "catchup_sched = \"nice\"\ncatchup_nice = 12\n").unwrap();
        assert_eq!(
            class(&["x", "--config", path.to_str().unwrap()]).unwrap(),
            Background::Nice(12)
        );
        assert!(class(&["x", "--catchup-sched", "realtime"]).is_err());
    }

    #[test]
    fn the_hot_tail_is_sized_by_time_under_a_ceiling_from_flags_or_the_file() {
        let tail = |argv: &[&str]| {
            parse_serve_args(argv.iter().copied())
                .and_then(|a| a.to_config())
                .map(|c| {
                    (
                        c.log.tail_min_bytes,
                        c.log.tail_min_age,
                        c.log.tail_max_bytes,
                    )
                })
        };
        assert_eq!(
            tail(&["x"]).unwrap(),
            (
                32 * MIB as usize,
                Duration::from_secs(5),
                128 * MIB as usize
            )
        );
        assert_eq!(
            tail(&[
                "x",
                "--tail-min-mib",
                "16",
                "--tail-min-secs",
                "0",
                "--tail-max-mib",
                "64"
            ])
            .unwrap(),
            (16 * MIB as usize, Duration::ZERO, 64 * MIB as usize)
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sluice.toml");
        std::fs::write(
            &path,
            "tail_min_mib = 48\ntail_min_secs = 20\ntail_max_mib = 512\n",
        )
        .unwrap();
        assert_eq!(
            tail(&["x", "--config", path.to_str().unwrap()]).unwrap(),
            (
                48 * MIB as usize,
                Duration::from_secs(20),
                512 * MIB as usize
            )
        );
        assert!(tail(&["x", "--tail-min-secs", "3601"]).is_err());
        assert!(tail(&["x", "--tail-min-mib", "0"]).is_err());
    }

    #[test]
    fn the_catchup_pace_comes_from_a_flag_or_the_file_in_mib_per_sec() {
        let pace = |argv: &[&str]| {
            parse_serve_args(argv.iter().copied())
                .and_then(|a| a.to_config())
                .map(|c| c.hub.catchup.pace_bytes_per_sec)
        };
        assert_eq!(
            pace(&["x"]).unwrap(),
            DEFAULT_CATCHUP_PACE_MIB_PER_SEC * MIB
        );
        assert_eq!(
            pace(&["x", "--catchup-pace-mib-per-sec", "0"]).unwrap(),
            0,
            "0 = unpaced"
        );
        assert_eq!(
            pace(&["x", "--catchup-pace-mib-per-sec", "150"]).unwrap(),
            150 * MIB
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sluice.toml");
        std::fs::write(&path, "catchup_pace_mib_per_sec = 64\n").unwrap();
        assert_eq!(
            pace(&["x", "--config", path.to_str().unwrap()]).unwrap(),
            64 * MIB
        );
        assert!(pace(&["x", "--catchup-pace-mib-per-sec", "1000001"]).is_err());
        assert!(pace(&["x", "--catchup-pace-mib-per-sec", "-1"]).is_err());
    }

    #[test]
    fn the_catchup_pace_in_events_comes_from_a_flag_or_the_file() {
        let pace = |argv: &[&str]| {
            parse_serve_args(argv.iter().copied())
                .and_then(|a| a.to_config())
                .map(|c| c.hub.catchup.pace_events_per_sec)
        };
        assert_eq!(pace(&["x"]).unwrap(), DEFAULT_CATCHUP_PACE_EVENTS_PER_SEC);
        assert_eq!(
            pace(&["x", "--catchup-pace-events-per-sec", "0"]).unwrap(),
            0,
            "0 = unpaced"
        );
        assert_eq!(
            pace(&["x", "--catchup-pace-events-per-sec", "250000"]).unwrap(),
            250_000
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sluice.toml");
        std::fs::write(&path, "catchup_pace_events_per_sec = 1234\n").unwrap();
        assert_eq!(
            pace(&["x", "--config", path.to_str().unwrap()]).unwrap(),
            1234
        );
        // The flag wins over the file; the bytes pace is its own setting.
        let both = parse_serve_args([
            "x",
            "--config",
            path.to_str().unwrap(),
            "--catchup-pace-events-per-sec",
            "99",
        ])
        .and_then(|a| a.to_config())
        .unwrap();
        assert_eq!(both.hub.catchup.pace_events_per_sec, 99);
        assert_eq!(
            both.hub.catchup.pace_bytes_per_sec,
            DEFAULT_CATCHUP_PACE_MIB_PER_SEC * MIB
        );
        assert!(pace(&["x", "--catchup-pace-events-per-sec", "1000000001"]).is_err());
        assert!(pace(&["x", "--catchup-pace-events-per-sec", "-1"]).is_err());
    }

    #[test]
    fn the_idle_pools_starvation_bound_comes_from_a_flag_or_the_file() {
        let bound = |argv: &[&str]| {
            parse_serve_args(argv.iter().copied())
                .and_then(|a| a.to_config())
                .map(|c| c.hub.catchup.starvation_bound)
        };
        assert_eq!(bound(&["x"]).unwrap(), Duration::from_millis(500));
        assert_eq!(
            bound(&["x", "--catchup-starvation-ms", "0"]).unwrap(),
            Duration::ZERO
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sluice.toml");
        std::fs::write(&path, "catchup_starvation_ms = 250\n").unwrap();
        assert_eq!(
            bound(&["x", "--config", path.to_str().unwrap()]).unwrap(),
            Duration::from_millis(250)
        );
        assert!(bound(&["x", "--catchup-starvation-ms", "60001"]).is_err());
    }

    #[test]
    fn file_fills_defaults_but_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sluice.toml");
        std::fs::write(
            &path,
            "upstream = \"ws://127.0.0.1:9\"\nqueue_max_events = 77\nretention_hours = 5\n",
        )
        .unwrap();
        let args = parse_serve_args([
            "x",
            "--config",
            path.to_str().unwrap(),
            "--retention-hours",
            "9",
        ])
        .unwrap();
        assert_eq!(args.upstream, "ws://127.0.0.1:9");
        assert_eq!(args.queue_max_events, 77);
        assert_eq!(args.retention_hours, 9, "the flag wins over the file");
        assert_eq!(
            args.stall_timeout_secs, 30,
            "untouched settings keep defaults"
        );
        args.to_config().unwrap();
    }

    #[test]
    fn an_index_budget_that_cannot_admit_the_largest_filter_is_refused() {
        let args = parse_serve_args([
            "x",
            "--max-dids",
            "10000",
            "--max-index-changes-per-sec",
            "19999",
        ]);
        let err = args
            .and_then(|a| a.to_config())
            .err()
            .map(|e| e.to_string());
        assert!(
            err.as_deref()
                .is_some_and(|e| e.contains("twice --max-dids")),
            "{err:?}"
        );
        let args = parse_serve_args([
            "x",
            "--max-dids",
            "10000",
            "--max-index-changes-per-sec",
            "20000",
        ]);
        let config = args.and_then(|a| a.to_config());
        assert!(config.is_ok_and(|c| c.hub.index_changes_per_sec == 20_000));
    }

    #[test]
    fn cluster_settings_come_from_flags_and_files_and_bad_ones_are_refused() {
        let none = parse_serve_args(["x"]).unwrap().to_config().unwrap();
        assert!(none.cluster.is_none(), "without --redis sluice runs alone");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "redis = \"redis://10.0.0.5:6379/0\"\ncluster = \"prod\"\nredis_require_durable = true\nlease_ttl_ms = 5000\n",
        )
        .unwrap();
        let args = parse_serve_args([
            "x",
            "--config",
            path.to_str().unwrap(),
            "--cluster-node-id",
            "node-a",
        ])
        .unwrap();
        let c = args.to_config().unwrap().cluster.unwrap();
        assert_eq!(c.redis_url, "redis://10.0.0.5:6379/0");
        assert_eq!((c.name.as_str(), c.node_id.as_str()), ("prod", "node-a"));
        assert!(c.require_durable);
        assert_eq!(c.lease_ttl, Duration::from_secs(5));
        let defaulted = parse_serve_args([
            "x",
            "--redis",
            "redis://h:1/0",
            "--listen",
            "127.0.0.1:7001",
        ])
        .unwrap();
        let c = defaulted.to_config().unwrap().cluster.unwrap();
        assert!(c.node_id.ends_with(":7001"), "{}", c.node_id);
        assert!(!c.require_durable);
        assert_eq!(c.append_in_flight, 4);
        let in_flight = parse_serve_args([
            "x",
            "--redis",
            "redis://h:1/0",
            "--cluster-append-in-flight",
            "2",
        ])
        .unwrap();
        assert_eq!(
            in_flight
                .to_config()
                .unwrap()
                .cluster
                .unwrap()
                .append_in_flight,
            2
        );
        assert!(parse_serve_args(["x", "--cluster-append-in-flight", "0"]).is_err());
        // The sink's default keys (`sluice:sink`, `sluice:c:...`) sit beside the cluster's.
        let both = parse_serve_args([
            "x",
            "--redis",
            "redis://h:1/0",
            "--redis-sink",
            "redis://h:1/0",
        ])
        .unwrap()
        .to_config()
        .unwrap();
        let keys = crate::cluster::link::Keys::new(&both.cluster.unwrap().name);
        let sink = both.redis_sink.unwrap();
        for cluster_key in [&keys.lease, &keys.state, &keys.stream, &keys.fence] {
            assert!(!cluster_key.starts_with(&format!("{}sink", sink.prefix)));
            assert!(!cluster_key.starts_with(&format!("{}c:", sink.prefix)));
            assert!(!cluster_key.starts_with(&format!("{}k:", sink.prefix)));
            assert!(!cluster_key.starts_with(&format!("{}all", sink.prefix)));
        }
        for bad in [
            vec!["x", "--redis", "http://h:1"],
            vec!["x", "--redis", "redis://h:1/0", "--cluster", "a b"],
            vec!["x", "--redis", "redis://h:1/0", "--cluster-node-id", "a b"],
            vec![
                "x",
                "--redis",
                "redis://h:1/0",
                "--redis-sink",
                "redis://h:1/0",
                "--redis-sink-prefix",
                "sluice:{sluice}:lease:",
            ],
        ] {
            let err = parse_serve_args(bad.clone()).and_then(|a| a.to_config());
            assert!(err.is_err(), "{bad:?} is refused");
        }
        assert!(
            parse_serve_args(["x", "--lease-ttl-ms", "10"]).is_err(),
            "TTL has a floor"
        );
    }

    #[test]
    fn redis_sink_settings_from_flags_env_style_values_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sluice.toml");
        std::fs::write(
            &path,
            "redis_sink = \"redis://127.0.0.1:6390/2\"\nredis_sink_publish = true\nredis_sink_max_age_secs = 0\nredis_sink_backoff_max_ms = 1500\n",
        )
        .unwrap();
        let args = parse_serve_args([
            "x",
            "--config",
            path.to_str().unwrap(),
            "--redis-sink-all",
            "--redis-sink-prefix",
            "fh:",
            "--redis-sink-probe-ms",
            "250",
            "--redis-sink-nice",
            "5",
        ])
        .unwrap();
        let sink = args.to_config().unwrap().redis_sink.unwrap();
        assert_eq!(sink.probe_interval, Duration::from_millis(250));
        assert_eq!(sink.nice, 5);
        assert_eq!(sink.url, "redis://127.0.0.1:6390/2");
        assert_eq!(sink.prefix, "fh:");
        assert!(sink.all_stream, "a bare flag is true");
        assert!(sink.publish, "a TOML boolean works");
        assert_eq!(sink.max_age, None, "0 means no age bound");
        assert_eq!(sink.max_len, 1_000_000);
        assert_eq!(sink.backoff_max, Duration::from_millis(1500));
        let defaults = parse_serve_args(["x", "--redis-sink", "redis://h:1/0"])
            .unwrap()
            .to_config()
            .unwrap()
            .redis_sink
            .unwrap();
        assert_eq!(defaults.probe_interval, Duration::from_millis(100));
        assert_eq!(defaults.nice, 19);
        assert!(parse_serve_args(["x", "--redis-sink-nice", "20"]).is_err());
        assert!(parse_serve_args(["x", "--redis-sink-probe-ms", "0"]).is_err());
        let off = parse_serve_args(["x"]).unwrap().to_config().unwrap();
        assert!(off.redis_sink.is_none(), "off unless asked for");
        let bad = parse_serve_args(["x", "--redis-sink", "http://example.com"])
            .unwrap()
            .to_config()
            .unwrap_err()
            .to_string();
        assert!(bad.contains("redis://"), "{bad}");
    }

    #[test]
    fn bad_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "no_such_setting = 1\n").unwrap();
        let err = parse_serve_args(["x", "--config", path.to_str().unwrap()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown setting"), "{err}");
        std::fs::write(&path, "queue_max_events = -3\n").unwrap();
        assert!(parse_serve_args(["x", "--config", path.to_str().unwrap()]).is_err());
        std::fs::write(&path, "ping_interval_secs = 90\n").unwrap();
        let args = parse_serve_args(["x", "--config", path.to_str().unwrap()]).unwrap();
        assert!(args
            .to_config()
            .unwrap_err()
            .to_string()
            .contains("pong_timeout"));
        let missing = dir.path().join("no-such-dictionary");
        let args = parse_serve_args(["x", "--zstd-dictionary", missing.to_str().unwrap()]).unwrap();
        let err = args.to_config().unwrap_err().to_string();
        assert!(
            err.contains("zstd_dictionary") && err.contains("no-such-dictionary"),
            "{err}"
        );
    }

    #[test]
    fn dictionaries_default_to_jetstreams_and_v2_cannot_be_trained() {
        let config = parse_serve_args(["x"]).unwrap().to_config().unwrap();
        assert_eq!(config.zstd_dictionary, DictionarySource::Jetstream);
        assert_eq!(config.zstd_dictionary_v2, DictionarySource::Jetstream);
        assert_eq!(config.zstd_cache_bytes, 32 << 20);
        let config = parse_serve_args(["x", "--zstd-dictionary", "trained"])
            .unwrap()
            .to_config()
            .unwrap();
        assert_eq!(config.zstd_dictionary, DictionarySource::Trained);
        let err = parse_serve_args(["x", "--zstd-dictionary-v2", "trained"])
            .unwrap()
            .to_config()
            .unwrap_err()
            .to_string();
        assert!(err.contains("zstd_dictionary_v2"), "{err}");
        let err = parse_serve_args(["x", "--zstd-dictionary-v2", "/no/such/file"])
            .unwrap()
            .to_config()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("zstd_dictionary_v2") && err.contains("/no/such/file"),
            "{err}"
        );
        assert!(parse_serve_args(["x", "--zstd-cache-mib", "0"]).is_err());
    }
}
