//! Replay server against a real websocket client on 127.0.0.1: cursor semantics, the
//! FutureCursor error, pacing, looping with rewritten seq/time, idle after the end.

use std::time::{Duration, Instant};

use bytes::Bytes;
use ciborium::Value;
use futures_util::StreamExt;
use sluice::upstream::replay::{self, Listen, ReplayOptions, ReplaySource, Speed};
use sluice::upstream::synth::{self, SynthOptions};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

type Client =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

const STEP: Duration = Duration::from_secs(5);

struct Server {
    url: String,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start(frames: &[Vec<u8>], speed: Speed, looped: bool) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let opts = ReplayOptions {
        frames: ReplaySource::Frames(frames.iter().cloned().map(Bytes::from).collect()),
        listen: Listen::Listener(listener),
        speed,
        looped,
    };
    Server {
        url: format!("ws://{addr}{}", replay::SUBSCRIBE_REPOS_PATH),
        task: tokio::spawn(replay::serve(opts)),
    }
}

async fn connect(url: &str) -> Client {
    let (ws, _) = tokio::time::timeout(STEP, tokio_tungstenite::connect_async(url))
        .await
        .expect("connect in time")
        .expect("connect");
    ws
}

/// The next binary frame; panics on close, error or timeout.
async fn next_frame(ws: &mut Client) -> Vec<u8> {
    next_frame_within(ws, STEP).await
}

/// The next binary frame within `limit`; panics on close, error or timeout.
async fn next_frame_within(ws: &mut Client, limit: Duration) -> Vec<u8> {
    loop {
        let msg = tokio::time::timeout(limit, ws.next())
            .await
            .expect("frame in time")
            .expect("stream still open")
            .expect("no websocket error");
        match msg {
            Message::Binary(b) => return b.to_vec(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected message {other:?}"),
        }
    }
}

/// Asserts nothing arrives for `quiet` and the connection is still open.
async fn assert_idle(ws: &mut Client, quiet: Duration) {
    if let Ok(msg) = tokio::time::timeout(quiet, ws.next()).await {
        panic!("expected an idle open connection, got {msg:?}");
    }
}

fn parts(frame: &[u8]) -> (Value, Value) {
    let mut rest = frame;
    let header: Value = ciborium::de::from_reader(&mut rest).expect("header");
    let body: Value = ciborium::de::from_reader(&mut rest).expect("body");
    (header, body)
}

fn get<'a>(map: &'a Value, key: &str) -> Option<&'a Value> {
    map.as_map()?
        .iter()
        .find(|(k, _)| k.as_text() == Some(key))
        .map(|(_, v)| v)
}

fn seq_of(frame: &[u8]) -> i64 {
    let (_, body) = parts(frame);
    let n = get(&body, "seq").and_then(Value::as_integer).expect("seq");
    i64::try_from(n).expect("seq fits i64")
}

fn time_of(frame: &[u8]) -> String {
    let (_, body) = parts(frame);
    get(&body, "time")
        .and_then(Value::as_text)
        .expect("time")
        .to_owned()
}

fn frames(count: usize) -> Vec<Vec<u8>> {
    synth::generate(&SynthOptions {
        count,
        seed: 3,
        ..SynthOptions::default()
    })
}

#[tokio::test]
async fn no_cursor_serves_everything_then_idles() {
    let frames = frames(60);
    let server = start(&frames, Speed::Max, false).await;
    let mut ws = connect(&server.url).await;
    for expected in &frames {
        assert_eq!(
            &next_frame(&mut ws).await,
            expected,
            "byte-identical frames"
        );
    }
    assert_idle(&mut ws, Duration::from_millis(300)).await;

    // A second, concurrent connection gets its own full stream.
    let mut other = connect(&server.url).await;
    assert_eq!(next_frame(&mut other).await, frames[0]);
}

#[tokio::test]
async fn cursor_is_exclusive() {
    let frames = frames(40);
    let server = start(&frames, Speed::Max, false).await;
    let k = 17;
    let cursor = seq_of(&frames[k]);
    let mut ws = connect(&format!("{}?cursor={cursor}", server.url)).await;
    for expected in &frames[k + 1..] {
        assert_eq!(&next_frame(&mut ws).await, expected);
    }
    assert_idle(&mut ws, Duration::from_millis(200)).await;

    // A cursor below the first seq starts from the beginning.
    let mut ws = connect(&format!("{}?cursor=0", server.url)).await;
    assert_eq!(next_frame(&mut ws).await, frames[0]);

    // A cursor at the last seq is caught up: nothing, but no error either.
    let last = seq_of(&frames[frames.len() - 1]);
    let mut ws = connect(&format!("{}?cursor={last}", server.url)).await;
    assert_idle(&mut ws, Duration::from_millis(200)).await;
}

#[tokio::test]
async fn future_cursor_gets_error_frame_and_close() {
    let frames = frames(10);
    let server = start(&frames, Speed::Max, false).await;
    let last = seq_of(&frames[frames.len() - 1]);
    let mut ws = connect(&format!("{}?cursor={}", server.url, last + 1)).await;
    let (header, body) = parts(&next_frame(&mut ws).await);
    assert_eq!(
        get(&header, "op").and_then(Value::as_integer),
        Some((-1).into())
    );
    assert_eq!(
        get(&body, "error").and_then(Value::as_text),
        Some("FutureCursor")
    );
    assert!(get(&body, "message").and_then(Value::as_text).is_some());
    let end = tokio::time::timeout(STEP, ws.next())
        .await
        .expect("closed in time");
    assert!(
        matches!(end, None | Some(Ok(Message::Close(_))) | Some(Err(_))),
        "expected the stream to end, got {end:?}"
    );
}

#[tokio::test]
async fn bad_requests_are_refused_before_upgrade() {
    let frames = frames(3);
    let server = start(&frames, Speed::Max, false).await;
    let base = server.url.replace(replay::SUBSCRIBE_REPOS_PATH, "");
    assert!(
        tokio_tungstenite::connect_async(format!("{base}/elsewhere"))
            .await
            .is_err()
    );
    assert!(
        tokio_tungstenite::connect_async(format!("{}?cursor=soon", server.url))
            .await
            .is_err()
    );
}

fn source_span_ms(frames: &[Vec<u8>]) -> f64 {
    let parse = |f: &Vec<u8>| {
        time::OffsetDateTime::parse(&time_of(f), &time::format_description::well_known::Rfc3339)
            .expect("rfc3339")
    };
    let span = parse(&frames[frames.len() - 1]) - parse(&frames[0]);
    span.as_seconds_f64() * 1000.0
}

/// From before connecting to the last frame: the server cannot start its schedule before
/// we connect, so this can never be shorter than the paced span, however loaded the host.
async fn time_to_receive(url: &str, n: usize) -> Duration {
    let t0 = Instant::now();
    let mut ws = connect(url).await;
    for _ in 0..n {
        next_frame(&mut ws).await;
    }
    t0.elapsed()
}

#[tokio::test]
async fn speed_paces_by_source_time() {
    let frames = frames(250);
    let span = source_span_ms(&frames);
    assert!(span > 400.0, "fixture spans {span} ms");

    for factor in [1.0, 4.0] {
        let server = start(&frames, Speed::Factor(factor), false).await;
        let took = time_to_receive(&server.url, frames.len())
            .await
            .as_secs_f64()
            * 1000.0;
        let want = span / factor;
        assert!(
            took >= want && took <= want + 1500.0,
            "speed {factor}: took {took:.0} ms for a source span of {want:.0} ms"
        );
    }

    let server = start(&frames, Speed::Max, false).await;
    let took = time_to_receive(&server.url, frames.len())
        .await
        .as_secs_f64()
        * 1000.0;
    assert!(took < span, "max speed took {took:.0} ms");
}

#[tokio::test]
async fn loop_rewrites_seq_and_time_only() {
    let frames = frames(30);
    let server = start(&frames, Speed::Max, true).await;
    let mut ws = connect(&server.url).await;
    let mut got = Vec::new();
    for _ in 0..frames.len() * 3 + 7 {
        got.push(next_frame(&mut ws).await);
    }
    for w in got.windows(2) {
        assert!(seq_of(&w[1]) > seq_of(&w[0]), "seq increases across laps");
        assert!(
            time_of(&w[1]) > time_of(&w[0]),
            "time increases across laps"
        );
    }
    assert_eq!(&got[..frames.len()], &frames[..], "lap 0 is byte-identical");
    let stride = seq_of(&got[frames.len()]) - seq_of(&frames[0]);
    for (i, original) in frames.iter().enumerate() {
        let relapped = &got[frames.len() * 2 + i];
        assert_eq!(seq_of(relapped), seq_of(original) + 2 * stride);
        let (h1, b1) = parts(original);
        let (h2, b2) = parts(relapped);
        assert_eq!(h1, h2);
        let strip = |b: Value| -> Vec<(Value, Value)> {
            b.into_map()
                .expect("map")
                .into_iter()
                .filter(|(k, _)| !matches!(k.as_text(), Some("seq" | "time")))
                .collect()
        };
        assert_eq!(strip(b1), strip(b2), "only seq and time change");
    }

    // A cursor inside lap 2 resumes right after it.
    let cursor = seq_of(&got[frames.len() * 2 + 4]);
    let mut ws = connect(&format!("{}?cursor={cursor}", server.url)).await;
    assert_eq!(next_frame(&mut ws).await, got[frames.len() * 2 + 5]);
}

#[tokio::test]
async fn a_long_source_gap_is_capped() {
    let first = synth::generate(&SynthOptions {
        count: 2,
        ..SynthOptions::default()
    });
    // The same traffic an hour later, spliced on: real time would wait an hour.
    let later = synth::generate(&SynthOptions {
        count: 1,
        start_seq: 2_000_000,
        start_time_ms: SynthOptions::default().start_time_ms + 3_600_000,
        ..SynthOptions::default()
    });
    let frames: Vec<Vec<u8>> = first.into_iter().chain(later).collect();
    let server = start(&frames, Speed::Factor(1.0), false).await;
    let t0 = Instant::now();
    let mut ws = connect(&server.url).await;
    next_frame(&mut ws).await;
    next_frame(&mut ws).await;
    // The per-frame STEP equals the cap itself, so this wait needs its own, longer bound.
    let third = next_frame_within(&mut ws, replay::MAX_PACING_WAIT + Duration::from_secs(3)).await;
    assert_eq!(third, frames[2]);
    // Started before the connection, so the full capped wait must fit inside.
    assert!(t0.elapsed() >= replay::MAX_PACING_WAIT);
}

/// The real relay frames in the shared fixtures replay byte-identically on
/// lap 0 and keep seq/time increasing on later laps: the patcher copes with real encodings.
#[tokio::test]
async fn real_relay_capture_loops_cleanly() {
    let path =
        sluice::upstream::capture::upstream_fixtures_dir().join("jetstream-corpus/frames.bin");
    assert!(
        path.is_file(),
        "real corpus missing at {} (set SLUICE_UPSTREAM_FIXTURES)",
        path.display()
    );
    let frames = sluice::upstream::capture::read_all(&path, 5 << 20).expect("corpus");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = Server {
        url: format!("ws://{addr}{}", replay::SUBSCRIBE_REPOS_PATH),
        task: tokio::spawn(replay::serve(ReplayOptions {
            frames: ReplaySource::File(path),
            listen: Listen::Listener(listener),
            speed: Speed::Max,
            looped: true,
        })),
    };
    let mut ws = connect(&server.url).await;
    let mut got = Vec::new();
    for _ in 0..frames.len() * 2 + 3 {
        got.push(next_frame(&mut ws).await);
    }
    assert_eq!(&got[..frames.len()], &frames[..]);
    for w in got.windows(2) {
        assert!(seq_of(&w[1]) > seq_of(&w[0]));
    }
    // Real relay times are not strictly ordered, so a lap shifts every time by the same
    // amount, at least the capture's whole time span.
    let nanos = |f: &Vec<u8>| {
        time::OffsetDateTime::parse(&time_of(f), &time::format_description::well_known::Rfc3339)
            .expect("rfc3339")
            .unix_timestamp_nanos()
    };
    let times: Vec<i128> = frames.iter().map(nanos).collect();
    let span = times.iter().max().expect("frames") - times.iter().min().expect("frames");
    let shift = nanos(&got[frames.len()]) - times[0];
    assert!(shift > span);
    for (i, original) in frames.iter().enumerate() {
        let relapped = &got[frames.len() + i];
        assert_eq!(nanos(relapped) - times[i], shift);
        assert_eq!(relapped.len(), original.len(), "same-width seq and time");
    }
}
