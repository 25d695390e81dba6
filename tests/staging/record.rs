//! Record against a local replay server: the capture written must be byte-identical to what
//! was served, and every stop condition and skip must be honoured and reported.

use std::time::Duration;

use bytes::Bytes;
use sluice::upstream::capture;
use sluice::upstream::record::{self, RecordOptions, StopReason};
use sluice::upstream::replay::{self, Listen, ReplayOptions, ReplaySource, Speed};
use sluice::upstream::synth::{self, SynthOptions};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// Every recording in these tests must finish well within this.
const BOUND: Duration = Duration::from_secs(20);

struct Server {
    url: String,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start(frames: &[Vec<u8>], looped: bool) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let opts = ReplayOptions {
        frames: ReplaySource::Frames(frames.iter().cloned().map(Bytes::from).collect()),
        listen: Listen::Listener(listener),
        speed: Speed::Max,
        looped,
    };
    Server {
        url: format!("ws://{addr}{}", replay::SUBSCRIBE_REPOS_PATH),
        task: tokio::spawn(replay::serve(opts)),
    }
}

async fn run(opts: RecordOptions) -> anyhow::Result<record::RecordSummary> {
    tokio::time::timeout(BOUND, record::record(opts))
        .await
        .expect("recording finished in time")
}

fn capture_bytes(frames: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in frames {
        capture::write_frame(&mut out, f).expect("in-memory write");
    }
    out
}

fn frames(count: usize) -> Vec<Vec<u8>> {
    synth::generate(&SynthOptions {
        count,
        seed: 5,
        ..SynthOptions::default()
    })
}

fn seq(frame: &[u8]) -> i64 {
    let mut rest = frame;
    let _: ciborium::Value = ciborium::de::from_reader(&mut rest).expect("header");
    let body: ciborium::Value = ciborium::de::from_reader(&mut rest).expect("body");
    let n = body
        .as_map()
        .and_then(|m| m.iter().find(|(k, _)| k.as_text() == Some("seq")))
        .and_then(|(_, v)| v.as_integer())
        .expect("seq");
    i64::try_from(n).expect("fits")
}

#[tokio::test]
async fn count_stop_writes_byte_identical_capture() {
    let frames = frames(120);
    let server = start(&frames, false).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("rec.bin");
    let summary = run(RecordOptions {
        count: Some(120),
        ..RecordOptions::new(&server.url, &out)
    })
    .await
    .expect("record");
    assert_eq!(summary.stop, StopReason::Count);
    assert_eq!(summary.frames, 120);
    assert_eq!(summary.oversized, 0);
    assert_eq!(summary.first_seq, Some(seq(&frames[0])));
    assert_eq!(summary.last_seq, Some(seq(&frames[119])));
    let written = std::fs::read(&out).expect("capture");
    assert_eq!(summary.bytes, written.len() as u64);
    assert!(
        written == capture_bytes(&frames),
        "capture differs from what was served"
    );
}

#[tokio::test]
async fn count_stops_mid_stream_of_a_looping_upstream() {
    let frames = frames(15);
    let server = start(&frames, true).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("rec.bin");
    let summary = run(RecordOptions {
        count: Some(40),
        ..RecordOptions::new(&server.url, &out)
    })
    .await
    .expect("record");
    assert_eq!(summary.frames, 40);
    let back = capture::read_all(&out, 5 << 20).expect("read back");
    assert_eq!(back.len(), 40);
    assert_eq!(&back[..15], &frames[..]);
    for w in back.windows(2) {
        assert!(seq(&w[1]) > seq(&w[0]));
    }
}

#[tokio::test]
async fn duration_stop_keeps_everything_received() {
    let frames = frames(40);
    let server = start(&frames, false).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("rec.bin");
    let summary = run(RecordOptions {
        duration: Some(Duration::from_millis(600)),
        ..RecordOptions::new(&server.url, &out)
    })
    .await
    .expect("record");
    assert_eq!(summary.stop, StopReason::Duration);
    assert!(summary.elapsed >= Duration::from_millis(600));
    assert_eq!(
        std::fs::read(&out).expect("capture"),
        capture_bytes(&frames)
    );
}

#[tokio::test]
async fn oversized_frames_are_counted_and_skipped() {
    let frames = frames(80);
    let mut sizes: Vec<usize> = frames.iter().map(Vec::len).collect();
    sizes.sort_unstable();
    let limit = sizes[sizes.len() / 2];
    let kept: Vec<Vec<u8>> = frames
        .iter()
        .filter(|f| f.len() <= limit)
        .cloned()
        .collect();
    let server = start(&frames, false).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("rec.bin");
    let summary = run(RecordOptions {
        duration: Some(Duration::from_millis(500)),
        max_frame: limit,
        ..RecordOptions::new(&server.url, &out)
    })
    .await
    .expect("record");
    assert_eq!(summary.frames as usize, kept.len());
    assert_eq!(summary.oversized as usize, frames.len() - kept.len());
    assert!(summary.oversized > 0);
    assert_eq!(std::fs::read(&out).expect("capture"), capture_bytes(&kept));
}

#[tokio::test]
async fn cursor_in_url_and_append() {
    let frames = frames(30);
    let server = start(&frames, false).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("rec.bin");
    run(RecordOptions {
        count: Some(10),
        ..RecordOptions::new(&server.url, &out)
    })
    .await
    .expect("first part");
    let resume = seq(&frames[9]);
    let summary = run(RecordOptions {
        count: Some(20),
        append: true,
        ..RecordOptions::new(format!("{}?cursor={resume}", server.url), &out)
    })
    .await
    .expect("second part");
    assert_eq!(summary.first_seq, Some(seq(&frames[10])));
    assert_eq!(
        std::fs::read(&out).expect("capture"),
        capture_bytes(&frames)
    );
}

#[tokio::test]
async fn upstream_error_frame_is_recorded_then_close_ends_it() {
    let frames = frames(5);
    let server = start(&frames, false).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("rec.bin");
    let future = seq(&frames[4]) + 100;
    let summary = run(RecordOptions {
        count: Some(100),
        ..RecordOptions::new(format!("{}?cursor={future}", server.url), &out)
    })
    .await
    .expect("record");
    assert_eq!(summary.stop, StopReason::UpstreamClosed);
    assert_eq!(summary.frames, 1, "the FutureCursor error frame is kept");
    assert_eq!(summary.last_seq, None);
}

#[tokio::test]
async fn bad_options_and_unreachable_upstreams_are_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("rec.bin");
    assert!(run(RecordOptions::new("http://127.0.0.1:1/", &out))
        .await
        .is_err());
    assert!(run(RecordOptions {
        count: Some(0),
        ..RecordOptions::new("ws://127.0.0.1:1/", &out)
    })
    .await
    .is_err());

    // Nothing listening.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    assert!(run(RecordOptions::new(format!("ws://{addr}/"), &out))
        .await
        .is_err());

    // A plain TCP peer where TLS is expected: an error, never a crash.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let peer = tokio::spawn(async move {
        if let Ok((sock, _)) = listener.accept().await {
            tokio::time::sleep(Duration::from_millis(200)).await;
            drop(sock);
        }
    });
    assert!(run(RecordOptions::new(format!("wss://{addr}/"), &out))
        .await
        .is_err());
    peer.abort();
}
