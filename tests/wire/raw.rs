//! Raw `com.atproto.sync.subscribeRepos` end to end over real websockets: the upstream
//! frames byte for byte (compared with the frames the replay upstream sent, not with the
//! log), exclusive upstream-seq cursors, OutdatedCursor #info, FutureCursor error frame,
//! the `wantedCollections` extension sending each frame at most once, oversized frames as
//! #info plus `/event/{seq}?wire=raw`, and invalid parameters.

use crate::wire_common;

use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;
use sluice::upstream::replay::Speed;
use wire_common::*;

/// The corpus, committed to the store too, so these tests read it back from disk as well
/// as from the hot tail (the first-commit edge has its own test below).
async fn corpus_env() -> Env {
    let env = wire_common::corpus_env().await;
    env.wait_durable().await;
    env
}

/// `(t, name or error, message)` of an `#info` or error frame; `None` for other frames.
fn control(frame: &[u8]) -> Option<(String, String, String)> {
    let (header, body) = decode_frame(frame);
    let op = cbor_int(&header, "op")?;
    let t = cbor_text(&header, "t").unwrap_or_default();
    if op == -1 {
        return Some((
            "error".into(),
            cbor_text(&body, "error")?,
            cbor_text(&body, "message").unwrap_or_default(),
        ));
    }
    (t == "#info").then(|| {
        (
            t,
            cbor_text(&body, "name").unwrap_or_default(),
            cbor_text(&body, "message").unwrap_or_default(),
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_frames_are_byte_for_byte_with_an_exclusive_upstream_cursor() {
    let _machine = crate::exclusive::shared().await;
    let env = corpus_env().await;
    let frames = env.frames.clone();
    let seqs: Vec<i64> = frames.iter().map(|f| frame_seq(f)).collect();
    for k in [0usize, 1, 90, 149] {
        // cursor = seq of frame k-1 (exclusive) starts at frame k.
        let cursor = if k == 0 { seqs[0] - 1 } else { seqs[k - 1] };
        let mut ws = connect(&env.url(&format!("{RAW_PATH}?cursor={cursor}"))).await;
        let got = read_binaries(&mut ws, frames.len() - k).await;
        assert_quiet(&mut ws, "after the last frame").await;
        for (i, (g, f)) in got.iter().zip(&frames[k..]).enumerate() {
            assert!(
                g == f,
                "frame {} differs from what the upstream sent",
                k + i
            );
        }
    }
    // At the newest upstream seq: caught up, nothing to send; no cursor: live.
    let last = *seqs.last().unwrap();
    let mut ws = connect(&env.url(&format!("{RAW_PATH}?cursor={last}"))).await;
    assert_quiet(&mut ws, "caught-up cursor").await;
    let mut ws = connect(&env.url(RAW_PATH)).await;
    assert_quiet(&mut ws, "no cursor").await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_cursor_just_below_the_oldest_event_before_the_first_commit() {
    let _machine = crate::exclusive::shared().await;
    // A long commit interval keeps every event in the hot tail only, as in the first
    // 100 ms of a fresh log (or once retention has deleted every stored segment).
    let env = Env::start(corpus(), Speed::Max, false, |c| {
        c.log.commit_interval = std::time::Duration::from_secs(120);
        c.log.commit_max_events = 1_000_000;
    })
    .await;
    env.wait_all_ingested().await;
    let frames = env.frames.clone();
    let cursor = frame_seq(&frames[0]) - 1;
    let mut ws = connect(&env.url(&format!("{RAW_PATH}?cursor={cursor}"))).await;
    let got = read_binaries(&mut ws, frames.len()).await;
    assert!(got == frames, "every frame after the cursor");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_outdated_cursor_info_then_oldest_and_future_cursor_error_frame() {
    let _machine = crate::exclusive::shared().await;
    let env = corpus_env().await;
    let frames = env.frames.clone();
    let first = frame_seq(&frames[0]);
    let last = frame_seq(frames.last().unwrap());

    // Below what is held: #info OutdatedCursor, then from the oldest frame.
    let mut ws = connect(&env.url(&format!("{RAW_PATH}?cursor={}", first - 10))).await;
    let got = read_binaries(&mut ws, frames.len() + 1).await;
    let (t, name, _) = control(&got[0]).expect("an #info frame first");
    assert_eq!((t.as_str(), name.as_str()), ("#info", "OutdatedCursor"));
    assert!(got[1..] == frames[..], "then every frame from the oldest");
    assert_quiet(&mut ws, "after OutdatedCursor replay").await;

    // Beyond the newest: a FutureCursor error frame, then close.
    let mut ws = connect(&env.url(&format!("{RAW_PATH}?cursor={}", last + 1000))).await;
    let (before, _close) = read_until_close(&mut ws, 5).await;
    assert_eq!(before.len(), 1, "{before:?}");
    let Got::Binary(frame) = &before[0] else {
        panic!("expected an error frame, got {:?}", before[0])
    };
    let (t, error, message) = control(frame).expect("an error frame");
    assert_eq!((t.as_str(), error.as_str()), ("error", "FutureCursor"));
    assert!(message.contains(&last.to_string()), "{message}");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_outdated_cursor_after_retention_deleted_a_prefix() {
    let _machine = crate::exclusive::shared().await;
    let env = Env::with_deleted_prefix().await;
    let oldest = env.oldest_seq();
    let held = env.events_from(oldest);
    let oldest_upstream = held[0].upstream_seq;
    // The frames the daemon still holds, from the upstream's own bytes.
    let start = env
        .frames
        .iter()
        .position(|f| frame_seq(f) == oldest_upstream)
        .unwrap();
    let want = &env.frames[start..];
    let mut ws = connect(&env.url(&format!("{RAW_PATH}?cursor=0"))).await;
    let got = read_binaries(&mut ws, want.len() + 1).await;
    let (_, name, _) = control(&got[0]).expect("#info first");
    assert_eq!(name, "OutdatedCursor");
    assert!(
        got[1..] == want[..],
        "from the oldest held frame, byte for byte"
    );
    // Just below the oldest held upstream seq is not outdated: no #info.
    let mut ws = connect(&env.url(&format!("{RAW_PATH}?cursor={}", oldest_upstream - 1))).await;
    let got = read_binaries(&mut ws, want.len()).await;
    assert!(got[..] == want[..]);
    env.stop().await;
}

/// Frames the `wantedCollections` extension passes, from the upstream bytes alone.
fn expected_filtered(frames: &[Bytes], wanted: &[&str]) -> Vec<Bytes> {
    frames
        .iter()
        .filter(|f| {
            if frame_type(f) != "#commit" {
                return true;
            }
            frame_collections(f).iter().any(|c| {
                wanted.iter().any(|w| match w.strip_suffix('*') {
                    Some(p) => c.starts_with(p),
                    None => c == w,
                })
            })
        })
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_wanted_collections_passes_each_matching_frame_once() {
    let _machine = crate::exclusive::shared().await;
    // Synthetic frames have multi-op commits across collections: the case where a frame
    // matches through several of its ops and must still be sent once.
    let frames = synth(600, 5, std::time::Duration::from_secs(600));
    let multi = frames
        .iter()
        .filter(|f| {
            let c = frame_collections(f);
            c.len() >= 2
                && c.iter()
                    .filter(|c| c.starts_with("app.bsky.feed.") || c.starts_with("app.bsky.graph."))
                    .count()
                    >= 2
        })
        .count();
    assert!(multi > 0, "some frames match through two or more ops");
    let env = Env::start(frames.clone(), Speed::Max, false, |_| {}).await;
    env.wait_all_ingested().await;
    env.wait_durable().await;
    let before = frame_seq(&frames[0]) - 1;
    let corpus_frames = frames;
    for wanted in [
        vec!["app.bsky.feed.like"],
        vec!["app.bsky.feed.*", "app.bsky.graph.*"],
        vec!["app.bsky.feed.post", "app.bsky.feed.repost"],
        vec!["com.example.none"],
    ] {
        let mut query = format!("{RAW_PATH}?cursor={before}");
        for w in &wanted {
            query.push_str(&format!("&wantedCollections={}", enc(w)));
        }
        let want = expected_filtered(&corpus_frames, &wanted);
        let mut ws = connect(&env.url(&query)).await;
        let got = read_binaries(&mut ws, want.len()).await;
        assert_quiet(&mut ws, &query).await;
        assert!(got == want, "{query}: frames differ from the upstream's");
    }
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_oversized_frames_become_info_and_are_fetchable() {
    let _machine = crate::exclusive::shared().await;
    let cap = 1200;
    let env = Env::start(corpus(), Speed::Max, false, |c| {
        c.session.server_max_message_bytes = cap;
    })
    .await;
    env.wait_all_ingested().await;
    env.wait_durable().await;
    let frames = env.frames.clone();
    let big = frames.iter().filter(|f| f.len() > cap).count();
    assert!(
        big > 0 && big < frames.len(),
        "{big} frames over {cap} bytes"
    );
    let events = env.events();
    let mut ws =
        connect(&env.url(&format!("{RAW_PATH}?cursor={}", frame_seq(&frames[0]) - 1))).await;
    let got = read_binaries(&mut ws, frames.len()).await;
    assert_quiet(&mut ws, "oversized").await;
    for (g, f) in got.iter().zip(&frames) {
        if f.len() <= cap {
            assert!(g == f);
            continue;
        }
        let (t, name, message) = control(g).expect("an #info in place of the frame");
        assert_eq!((t.as_str(), name.as_str()), ("#info", "EventTooBig"));
        let upstream = frame_seq(f);
        let seq = events
            .iter()
            .find(|e| e.upstream_seq == upstream)
            .unwrap()
            .seq;
        assert!(
            message.contains(&format!("upstream seq {upstream}")),
            "{message}"
        );
        assert!(message.contains(&format!("sluice seq {seq}")), "{message}");
        assert!(message.contains(&f.len().to_string()), "{message}");
        let fetch = format!("/event/{seq}?wire=raw");
        assert!(message.contains(&fetch), "{message}");
        let (status, headers, body) = http_get(env.addr(), &fetch).await;
        assert_eq!(status, 200);
        assert_eq!(
            header(&headers, "content-type"),
            Some("application/vnd.ipld.dag-cbor")
        );
        assert!(body == f[..], "fetched frame is the upstream's bytes");
    }
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_invalid_parameters_get_400_naming_the_problem() {
    let _machine = crate::exclusive::shared().await;
    let env = corpus_env().await;
    let many: String = (0..101)
        .map(|i| format!("wantedCollections=app.bsky.c{i}.x&"))
        .collect();
    for (query, needle) in [
        ("cursor=abc".to_string(), "cursor"),
        ("cursor=1.0".to_string(), "cursor"),
        ("wantedCollections=bad".to_string(), "bad"),
        (
            "wantedCollections=app.bsky.feed.post&collections=x".to_string(),
            "collections",
        ),
        ("kinds=commit".to_string(), "kinds"),
        ("slowConsumer=sometimes".to_string(), "sometimes"),
        (many, "too many collections"),
    ] {
        let (status, _, body) = refused(&env.url(&format!("{RAW_PATH}?{query}"))).await;
        assert_eq!(status, 400, "{}: {body}", short(&query));
        let v: Value = serde_json::from_str(&body).unwrap();
        let message = v["message"].as_str().unwrap();
        assert!(message.contains(needle), "{}: {message}", short(&query));
    }
    env.stop().await;
}

/// `--coalesce-us` bounds how often a subscriber is written to, by its session or by the
/// dispatcher's direct writes (on, the default): under a steady stream (~400 frames/s,
/// 1–4 ms apart) with a 100 ms interval, frames arrive in bursts about 100 ms apart, each
/// carrying tens of frames, instead of one write per frame. The first frame goes out by
/// a direct write (nothing was written before it), so both paths are in play.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_writes_are_coalesced_to_one_flush_per_interval() {
    // Alone: the bursts are told apart by when they arrive (gaps of 40 ms or more), which
    // a sibling test's load on the same cores would blur.
    let _machine = crate::exclusive::alone().await;
    let frames = synth(3000, 41, Duration::from_secs(1200));
    let env = Env::start_with(
        frames,
        Speed::Factor(1.0),
        false,
        false,
        &["--coalesce-us", "100000"],
        |_| {},
    )
    .await;
    env.wait_seq(1).await;
    let mut ws = connect(&env.url(RAW_PATH)).await;
    let window = Duration::from_secs(2);
    let started = tokio::time::Instant::now();
    let mut arrivals = Vec::new();
    while started.elapsed() < window {
        match next(&mut ws, LIMIT).await {
            Got::Binary(_) => arrivals.push(tokio::time::Instant::now()),
            other => panic!("after {} frames: {other:?}", arrivals.len()),
        }
    }
    let bursts = 1 + arrivals
        .windows(2)
        .filter(|w| w[1] - w[0] >= Duration::from_millis(40))
        .count();
    let per_burst = arrivals.len() / bursts;
    assert!(
        (8..=22).contains(&bursts) && per_burst >= 10,
        "{} frames in {window:?} came in {bursts} bursts ({per_burst} per burst); expected \
         about one burst per 100 ms",
        arrivals.len()
    );
    let direct = env
        .daemon
        .hub
        .stats()
        .direct_written
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        direct >= 1,
        "no direct write was made: the dispatcher's path was not tested"
    );
    env.stop().await;
}
