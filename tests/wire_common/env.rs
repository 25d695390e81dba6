//! A `replay` upstream and a whole daemon in process, and the log as the ground truth.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use sluice::config::ServeConfig;
use sluice::daemon::Daemon;
use sluice::upstream::replay::{self, Listen, ReplayOptions, ReplaySource, Speed};
use tokio::net::TcpListener;

use super::frames::{frame_seq, synth_at};
use super::LIMIT;

/// Jetstream's dictionaries as shipped to clients (`SLUICE_JETSTREAM_DICTIONARIES`, default
/// `../shared/jetstream-dictionaries`): tests decode with these files, not with sluice's
/// embedded copy.
pub fn jetstream_dictionary(name: &str) -> Vec<u8> {
    let dir = match std::env::var_os("SLUICE_JETSTREAM_DICTIONARIES") {
        Some(dir) => std::path::PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/jetstream-dictionaries"),
    };
    let path = dir.join(name);
    std::fs::read(&path)
        .unwrap_or_else(|e| panic!("Jetstream's dictionary {} is required: {e}", path.display()))
}

/// A `replay` upstream on 127.0.0.1.
pub async fn start_replay(
    frames: Vec<Bytes>,
    speed: Speed,
    looped: bool,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let opts = ReplayOptions {
            frames: ReplaySource::Frames(frames),
            listen: Listen::Listener(listener),
            speed,
            looped,
        };
        if let Err(e) = replay::serve(opts).await {
            panic!("replay failed: {e:#}");
        }
    });
    (addr, task)
}

/// A daemon configuration for tests: listens on an ephemeral port, keeps everything by age,
/// reconnects quickly, and compresses v1 with Jetstream's dictionary (the default) or,
/// with `train_dictionary`, with sluice's own trained at first use.
pub fn serve_config(
    upstream: SocketAddr,
    dir: &Path,
    train_dictionary: bool,
    extra: &[&str],
) -> ServeConfig {
    let upstream_url = format!("ws://{upstream}");
    let data = dir.join("data");
    let data = data.to_str().unwrap().to_string();
    let mut argv: Vec<String> = [
        "x",
        "--upstream",
        &upstream_url,
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--data-dir",
        &data,
        "--backoff-min-ms",
        "20",
        "--backoff-max-ms",
        "200",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if train_dictionary {
        argv.push("--zstd-dictionary".into());
        argv.push("trained".into());
    }
    // Every client of these tests connects from 127.0.0.1, standing in for many clients:
    // the per-address shares are lifted to the server-wide limits, which are what these
    // tests set and check (the shares are tested from several addresses in tests/hostile).
    // The scan budget is lifted whole: its 2-core default (100,000 events/s) would pace
    // a reconnect storm's replays, and these tests check delivery, not that budget.
    for (flag, value) in [
        ("--scan-events-per-sec", "1000000000"),
        ("--max-pending-per-ip", "1000000"),
        ("--connects-per-sec-per-ip", "1000000"),
        ("--event-requests-per-sec-per-ip", "1000000"),
        ("--event-requests-per-sec", "1000000"),
        ("--scan-events-per-sec-per-ip", "1000000000"),
        ("--max-index-changes-per-sec-per-ip", "1000000000"),
    ] {
        argv.push(flag.into());
        argv.push(value.into());
    }
    argv.extend(extra.iter().map(|s| s.to_string()));
    sluice::config::parse_serve_args(argv)
        .unwrap()
        .to_config()
        .unwrap()
}

/// An upstream plus a daemon, torn down by [`Env::stop`] (or dropped at the test's end).
pub struct Env {
    pub daemon: Daemon,
    pub frames: Vec<Bytes>,
    pub replay: tokio::task::JoinHandle<()>,
    /// The daemon's data directory, removed when the environment is dropped.
    _dir: tempfile::TempDir,
}

impl Env {
    pub async fn start(
        frames: Vec<Bytes>,
        speed: Speed,
        looped: bool,
        tweak: impl FnOnce(&mut ServeConfig),
    ) -> Env {
        Self::start_with(frames, speed, looped, false, &[], tweak).await
    }

    pub async fn start_with(
        frames: Vec<Bytes>,
        speed: Speed,
        looped: bool,
        train_dictionary: bool,
        extra: &[&str],
        tweak: impl FnOnce(&mut ServeConfig),
    ) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let (upstream, replay) = start_replay(frames.clone(), speed, looped).await;
        let mut config = serve_config(upstream, dir.path(), train_dictionary, extra);
        tweak(&mut config);
        let daemon = tokio::time::timeout(LIMIT, Daemon::start(config))
            .await
            .expect("daemon start timed out")
            .expect("daemon start");
        Env {
            daemon,
            frames,
            replay,
            _dir: dir,
        }
    }

    /// An upstream whose first 400 frames are from 2020 and the next 400 from ten minutes
    /// ago, with one hour of age retention checked every 50 ms in small segments: once it
    /// returns, retention has deleted a prefix of the log (the oldest held seq is > 1).
    pub async fn with_deleted_prefix() -> Env {
        let now_ms = sluice::clock::now_us() / 1000;
        let mut frames = synth_at(400, 3, 1_000_000, 1_590_000_000_000);
        frames.extend(synth_at(400, 4, 2_000_000, now_ms - 600_000));
        let env = Env::start(frames, Speed::Max, false, |c| {
            c.log.retention.max_age = Duration::from_secs(3600);
            c.log.retention.check_interval = Duration::from_millis(50);
            c.log.segment_target_bytes = 4096;
        })
        .await;
        env.wait_all_ingested().await;
        let deadline = tokio::time::Instant::now() + LIMIT;
        loop {
            let oldest = env.daemon.log.reader().bounds().map_or(0, |b| b.oldest_seq);
            if oldest > 100 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "retention did not delete the 2020 events (oldest seq {oldest})"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        env
    }

    /// The oldest seq retention still holds.
    pub fn oldest_seq(&self) -> u64 {
        self.daemon.log.reader().bounds().unwrap().oldest_seq
    }

    pub fn addr(&self) -> SocketAddr {
        self.daemon.addr
    }

    pub fn url(&self, path_and_query: &str) -> String {
        format!("ws://{}{path_and_query}", self.daemon.addr)
    }

    /// Waits until ingest has accepted the upstream frame with seq `upstream_seq`, and the
    /// log holds (in its tail) the events it produced.
    pub async fn wait_upstream(&self, upstream_seq: i64) {
        let deadline = tokio::time::Instant::now() + LIMIT * 3;
        loop {
            let newest = self.daemon.log.reader().newest_seq();
            let done = newest > 0
                && self
                    .daemon
                    .log
                    .reader()
                    .read_from(newest, 1, usize::MAX)
                    .ok()
                    .and_then(|v| v.first().map(|e| e.upstream_seq >= upstream_seq))
                    .unwrap_or(false);
            if done {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "ingest did not reach upstream seq {upstream_seq} (newest sluice seq {newest})"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until every frame of the capture has been ingested.
    pub async fn wait_all_ingested(&self) {
        let last = frame_seq(self.frames.last().unwrap());
        self.wait_upstream(last).await;
    }

    /// Waits until everything in the log is durable in the store (not only in the tail).
    pub async fn wait_durable(&self) {
        let deadline = tokio::time::Instant::now() + LIMIT;
        let reader = self.daemon.log.reader();
        while reader.store().bounds().map_or(0, |b| b.newest_seq) < reader.newest_seq() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "log never became durable"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until the log holds at least `seq`.
    pub async fn wait_seq(&self, seq: u64) {
        let deadline = tokio::time::Instant::now() + LIMIT * 3;
        while self.daemon.log.reader().newest_seq() < seq {
            assert!(
                tokio::time::Instant::now() < deadline,
                "log did not reach seq {seq}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Every event in the log from `from` on (ground truth for what wires carry).
    pub fn events_from(&self, from: u64) -> Vec<sluice::log::SharedEvent> {
        let reader = self.daemon.log.reader();
        let mut out = Vec::new();
        let mut next = from.max(1);
        for _ in 0..100_000 {
            let batch = reader.read_from(next, 4096, usize::MAX).unwrap();
            let Some(last) = batch.last() else { break };
            next = last.seq + 1;
            out.extend(batch);
        }
        out
    }

    pub fn events(&self) -> Vec<sluice::log::SharedEvent> {
        self.events_from(1)
    }

    pub async fn stop(self) {
        let _ = tokio::time::timeout(LIMIT, self.daemon.shutdown()).await;
        self.replay.abort();
    }
}
