//! End to end over real websockets: a `replay` upstream on 127.0.0.1 feeding the ingest
//! pipeline. Covers the real capture, restart without seq reuse, oversized frames, a stalled
//! upstream, a held-up sink that is not one, and a `FutureCursor` error frame. Every wait is bounded.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde_json::json;
use sluice::decode::dagcbor_encode::encode_dag_cbor;
use sluice::event::{Event, EventKind, StampState};
use sluice::ingest::{start_ingest, IngestConfig, IngestHandle};
use sluice::log::{Log, LogConfig};
use sluice::upstream::capture::{read_all, upstream_fixtures_dir};
use sluice::upstream::client::UpstreamConfig;
use sluice::upstream::replay::{self, Listen, ReplayOptions, ReplaySource, Speed};
use tokio::net::TcpListener;

type Collected = Arc<Mutex<Vec<Event>>>;

async fn start_replay(frames: Vec<Bytes>) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let opts = ReplayOptions {
            frames: ReplaySource::Frames(frames),
            listen: Listen::Listener(listener),
            speed: Speed::Max,
            looped: false,
        };
        if let Err(e) = replay::serve(opts).await {
            panic!("replay failed: {e:#}");
        }
    });
    (addr, task)
}

fn config(addr: SocketAddr) -> IngestConfig {
    let upstream = UpstreamConfig {
        upstream: format!("ws://{addr}"),
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        ..UpstreamConfig::default()
    };
    IngestConfig::new(upstream)
}

fn start(config: IngestConfig, state: StampState) -> (IngestHandle, Collected) {
    let collected: Collected = Arc::default();
    let sink_events = collected.clone();
    let handle = start_ingest(config, state, move |events: Vec<Event>| {
        sink_events.lock().unwrap().extend(events);
        Ok(())
    })
    .unwrap();
    (handle, collected)
}

/// Ingest into a real event log under `dir`, as `serve` does.
fn start_logged(config: IngestConfig, dir: &Path) -> (IngestHandle, Arc<Log>) {
    // The corpus is months old: age retention counts back from the newest event, so it stays.
    let (log, state) = Log::open(LogConfig::new(dir)).unwrap();
    let log = Arc::new(log);
    let handle = start_ingest(config, state, log.clone()).unwrap();
    (handle, log)
}

fn upstream_seqs(collected: &Collected) -> Vec<i64> {
    collected
        .lock()
        .unwrap()
        .iter()
        .map(|e| e.upstream_seq)
        .collect()
}

/// How long a test waits for what it needs before failing: generous, since the paced
/// upstreams (a frame every 5-10 ms, for 300 frames and more) and ingest can be starved for
/// long on a loaded machine (CI's two cores, this binary's other tests beside them).
const PATIENCE: Duration = Duration::from_secs(60);

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {PATIENCE:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn corpus() -> Vec<Bytes> {
    let path = upstream_fixtures_dir().join("jetstream-corpus/frames.bin");
    assert!(path.is_file(), "real corpus missing at {}", path.display());
    read_all(&path, 5 << 20)
        .unwrap()
        .into_iter()
        .map(Bytes::from)
        .collect()
}

fn frame(header: serde_json::Value, body: serde_json::Value) -> Bytes {
    let mut bytes = encode_dag_cbor(&header).unwrap();
    bytes.extend(encode_dag_cbor(&body).unwrap());
    Bytes::from(bytes)
}

fn identity(seq: i64, handle: &str) -> Bytes {
    frame(
        json!({"op": 1, "t": "#identity"}),
        json!({"did": "did:plc:e2etestaaaaaaaaaaaaaaaaa", "seq": seq,
               "time": "2026-01-01T00:00:00.000Z", "handle": handle}),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_of_the_real_capture_is_ingested_with_correct_stamps() {
    let frames = corpus();
    let (addr, _replay) = start_replay(frames.clone()).await;
    let (handle, collected) = start(config(addr), StampState::fresh());
    wait_for("152 events", || collected.lock().unwrap().len() >= 152).await;
    let stats = handle.shutdown().await.unwrap();
    let events = collected.lock().unwrap().clone();
    assert_eq!(events.len(), 152);
    assert_eq!(stats.frames, 150);
    assert_eq!(stats.decode_errors, 0);
    let mut raw = Vec::new();
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e.seq, i as u64 + 1);
        assert!(e.time_us <= e.received_us);
        if i > 0 {
            assert!(e.time_us > events[i - 1].time_us);
        }
        if let Some(frame) = sluice::wire::raw::frame_of(e) {
            raw.push(frame.clone());
        }
    }
    assert_eq!(
        raw, frames,
        "every frame arrives once, byte for byte, in order"
    );
    let identity = events
        .iter()
        .filter(|e| e.kind == EventKind::Identity)
        .count();
    let account = events
        .iter()
        .filter(|e| e.kind == EventKind::Account)
        .count();
    assert_eq!((identity, account), (1, 1));
}

/// A frame kept by the log holds its own bytes only: the payload tungstenite hands over is a
/// view into its read buffer, and keeping that view pinned the whole buffer (and made each
/// later read allocate a new one). Checked at the sink: once the batch is dropped, its raw
/// frame must be the only handle on its allocation, byte for byte the frame sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_handed_to_ingest_holds_only_its_own_allocation() {
    let frames = corpus();
    let (addr, _replay) = start_replay(frames.clone()).await;
    let kept: Arc<Mutex<Vec<Result<bytes::BytesMut, Bytes>>>> = Arc::default();
    let sink_kept = kept.clone();
    let handle = start_ingest(
        config(addr),
        StampState::fresh(),
        move |events: Vec<Event>| {
            let raw = events.first().map(|e| e.raw_frame.clone());
            drop(events);
            if let Some(raw) = raw {
                sink_kept.lock().unwrap().push(raw.try_into_mut());
            }
            Ok(())
        },
    )
    .unwrap();
    wait_for("150 frames", || kept.lock().unwrap().len() >= 150).await;
    handle.shutdown().await.unwrap();
    let kept = std::mem::take(&mut *kept.lock().unwrap());
    assert_eq!(kept.len(), 150);
    for (i, (raw, sent)) in kept.into_iter().zip(&frames).enumerate() {
        match raw {
            Ok(unique) => assert_eq!(&unique[..], &sent[..], "frame {i}"),
            Err(_) => {
                panic!("frame {i} shares its allocation with something the sink does not hold")
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_resumes_from_the_log_without_gap_or_duplicate() {
    let frames = corpus();
    let dir = tempfile::tempdir().unwrap();
    // First run sees only the first 100 frames.
    let (addr, replay_task) = start_replay(frames[..100].to_vec()).await;
    let (handle, log) = start_logged(config(addr), dir.path());
    wait_for("first 100 frames", || {
        handle.shared.cursor() == Some(31_527_015_421)
    })
    .await;
    handle.shutdown().await.unwrap();
    assert!(log.flush(PATIENCE));
    log.close().unwrap();
    drop(log);
    replay_task.abort();
    // Second run: the upstream now has all 150; only the last 50 are new.
    let (addr, _replay) = start_replay(frames.clone()).await;
    let (handle, log) = start_logged(config(addr), dir.path());
    wait_for("the rest", || {
        handle.shared.cursor() == Some(31_527_015_471)
    })
    .await;
    let stats = handle.shutdown().await.unwrap();
    assert_eq!(
        stats.duplicates_dropped, 0,
        "resumed with ?cursor, nothing re-sent"
    );
    let reader = log.reader();
    let mut events = Vec::new();
    while let Some(next) = events
        .last()
        .map_or(Some(1), |e: &sluice::log::SharedEvent| {
            (e.seq < reader.newest_seq()).then_some(e.seq + 1)
        })
    {
        events.extend(reader.read_from(next, 1000, usize::MAX).unwrap());
    }
    assert_eq!(events.len(), 152, "every event exactly once");
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e.seq, i as u64 + 1, "gapless across the restart");
    }
    let raw: Vec<Bytes> = events
        .iter()
        .filter_map(|e| sluice::wire::raw::frame_of(e).cloned())
        .collect();
    assert_eq!(raw, frames, "every upstream frame once, in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_frame_is_counted_and_skipped_without_losing_the_rest() {
    let mut frames: Vec<Bytes> = (1..=10).map(|s| identity(s, "ok.test")).collect();
    frames[4] = identity(5, &"x".repeat(100_000));
    let (addr, _replay) = start_replay(frames).await;
    let mut cfg = config(addr);
    cfg.upstream.max_frame_bytes = 64 * 1024;
    let (handle, collected) = start(cfg, StampState::fresh());
    wait_for("the 9 small frames", || {
        collected.lock().unwrap().len() >= 9
    })
    .await;
    let shared = handle.shared.clone();
    handle.shutdown().await.unwrap();
    let seqs = upstream_seqs(&collected);
    assert_eq!(seqs, vec![1, 2, 3, 4, 6, 7, 8, 9, 10]);
    assert!(shared.oversized_frames.load(Ordering::Relaxed) >= 1);
    assert_eq!(shared.skipped_oversized.load(Ordering::Relaxed), 1);
}

/// An oversized frame that repeats the last good seq must not cost the frame after it:
/// sluice cannot read a refused frame's seq, so it first resumes from the last good cursor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_frame_repeating_a_seq_does_not_cost_its_neighbour() {
    let mut frames: Vec<Bytes> = (1..=4).map(|s| identity(s, "ok.test")).collect();
    // A (seq 4), an oversized frame carrying seq 4 again, B (seq 5), C (seq 6).
    frames.push(identity(4, &"x".repeat(100_000)));
    frames.push(identity(5, "ok.test"));
    frames.push(identity(6, "ok.test"));
    let (addr, _replay) = start_replay(frames).await;
    let mut cfg = config(addr);
    cfg.upstream.max_frame_bytes = 64 * 1024;
    let (handle, collected) = start(cfg, StampState::fresh());
    wait_for("every valid frame", || collected.lock().unwrap().len() >= 6).await;
    let shared = handle.shared.clone();
    handle.shutdown().await.unwrap();
    assert_eq!(upstream_seqs(&collected), vec![1, 2, 3, 4, 5, 6]);
    assert!(shared.oversized_frames.load(Ordering::Relaxed) >= 1);
    assert_eq!(shared.skipped_oversized.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_upstream_is_detected_and_replaced() {
    // Accepts the websocket, then never reads or writes: pings go unanswered.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let held = Arc::new(Mutex::new(Vec::new()));
    let held_in_task = held.clone();
    let accepts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let accepts_in_task = accepts.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            if let Ok(ws) = tokio_tungstenite::accept_async(tcp).await {
                accepts_in_task.fetch_add(1, Ordering::SeqCst);
                held_in_task.lock().unwrap().push(ws);
            }
        }
    });
    let mut cfg = config(addr);
    cfg.upstream.stall_timeout = Duration::from_millis(600);
    let (handle, _) = start(cfg, StampState::fresh());
    wait_for("a second connection after a stall", || {
        accepts.load(Ordering::SeqCst) >= 2
    })
    .await;
    assert!(handle.shared.stalls.load(Ordering::Relaxed) >= 1);
    handle.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_held_up_longer_than_the_stall_timeout_is_not_an_upstream_stall() {
    // A live upstream: a frame every 10 ms (bounded), answering pings as it reads.
    let (addr, accepts) = paced_upstream(1000, Duration::from_millis(10)).await;
    let mut cfg = config(addr);
    cfg.upstream.stall_timeout = Duration::from_millis(500);
    let collected: Collected = Arc::default();
    let sink_events = collected.clone();
    let mut held = false;
    // The first append holds the ingest thread three stall timeouts long, as a log append
    // waiting on backpressure would; frames keep arriving in the socket meanwhile.
    let handle = start_ingest(cfg, StampState::fresh(), move |events: Vec<Event>| {
        if !held {
            held = true;
            std::thread::sleep(Duration::from_millis(1500));
        }
        sink_events.lock().unwrap().extend(events);
        Ok(())
    })
    .unwrap();
    wait_for("frames well past the hold", || {
        collected.lock().unwrap().len() >= 300
    })
    .await;
    assert_one_connection_without_a_stall_or_a_gap(handle, &accepts, &collected).await;
}

/// No stall was counted, the upstream was connected to once, and every frame it sent
/// arrived, from the first and in order; then ingest stops.
async fn assert_one_connection_without_a_stall_or_a_gap(
    handle: IngestHandle,
    accepts: &std::sync::atomic::AtomicUsize,
    collected: &Collected,
) {
    assert_eq!(handle.shared.stalls.load(Ordering::Relaxed), 0);
    assert_eq!(accepts.load(Ordering::SeqCst), 1);
    let seqs = upstream_seqs(collected);
    assert_eq!(seqs, (1..=seqs.len() as i64).collect::<Vec<_>>());
    handle.shutdown().await.unwrap();
}

/// A paced live upstream: a frame every `every` (at most `count`), answering pings.
async fn paced_upstream(
    count: i64,
    every: Duration,
) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let accepts_in_task = accepts.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let Ok(ws) = tokio_tungstenite::accept_async(tcp).await else {
                continue;
            };
            accepts_in_task.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let (mut sink, mut stream) = ws.split();
                tokio::spawn(async move { while let Some(Ok(_)) = stream.next().await {} });
                for seq in 1..=count {
                    let frame = identity(seq, &format!("p{seq}.test"));
                    if sink.send(Message::Binary(frame)).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(every).await;
                }
            });
        }
    });
    (addr, accepts)
}

/// The stall timer is armed once per connection and moved on when it fires after a
/// frame came (not re-armed per frame), and the counters are published every idle tick
/// (not only after a tick without frames): a steady stream lasting many stall timeouts
/// is never a stall, and its counters show up long before 1,000 frames.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steady_stream_is_never_a_stall_and_its_counters_are_published_every_tick() {
    let (addr, accepts) = paced_upstream(2000, Duration::from_millis(5)).await;
    let mut cfg = config(addr);
    cfg.upstream.stall_timeout = Duration::from_millis(200);
    cfg.idle_tick = Duration::from_millis(100);
    let (handle, collected) = start(cfg, StampState::fresh());
    // Published while frames keep coming every 5 ms, well below the 1,000-frame refresh.
    wait_for("counters published during the stream", || {
        let published = handle.stats.lock().frames;
        published > 0 && published < 1000
    })
    .await;
    // Well past several stall timeouts of steady frames.
    wait_for("frames over 6 stall timeouts", || {
        collected.lock().unwrap().len() >= 250
    })
    .await;
    assert_one_connection_without_a_stall_or_a_gap(handle, &accepts, &collected).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn future_cursor_makes_ingest_follow_the_new_numbering() {
    let frames: Vec<Bytes> = (1..=5).map(|s| identity(s, "ok.test")).collect();
    let (addr, _replay) = start_replay(frames).await;
    // Resume state from a relay whose seqs were far higher.
    let state = StampState {
        next_seq: 501,
        last_time_us: 0,
        upstream_cursor: Some(999_999),
    };
    let (handle, collected) = start(config(addr), state);
    wait_for("5 events after FutureCursor", || {
        collected.lock().unwrap().len() >= 5
    })
    .await;
    handle.shutdown().await.unwrap();
    let events = collected.lock().unwrap().clone();
    assert_eq!(
        events.iter().map(|e| e.upstream_seq).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5]
    );
    assert!(events[0].seq > 500, "sluice's own seq keeps increasing");
}
