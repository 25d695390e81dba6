//! The raw wire's "each frame once" rule, at the hub: a raw subscriber is handed each
//! upstream frame once, with the first of its events the subscriber is shown, on the live
//! path and in catch-up alike, while v1 subscribers still get every op.

use crate::log_common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use log_common::{test_config, EventGen};
use sluice::event::{Event, EventKind};
use sluice::fanout::filter::{Filter, FilterLimits};
use sluice::fanout::{Hub, HubConfig, SlowPolicy, Start, Subscription};
use sluice::log::{Log, SharedEvent};
use sluice::wire::WireKind;

const LIKE: &str = "app.bsky.feed.like";
const POST: &str = "app.bsky.feed.post";
const FOLLOW: &str = "app.bsky.graph.follow";

/// Frames of three ops each, collections in a pattern that makes a like/post filter
/// match some frames through two ops, some through one, some through none.
fn templates() -> Vec<Vec<Event>> {
    let patterns: [[&str; 3]; 4] = [
        [LIKE, POST, LIKE],
        [FOLLOW, LIKE, FOLLOW],
        [FOLLOW, FOLLOW, FOLLOW],
        [POST, FOLLOW, POST],
    ];
    patterns
        .iter()
        .enumerate()
        .map(|(i, collections)| {
            let raw = Bytes::from(format!("frame-{i}").into_bytes());
            collections
                .iter()
                .enumerate()
                .map(|(op, c)| Event {
                    seq: 0,
                    time_us: 0,
                    upstream_seq: 0,
                    received_us: 0,
                    kind: EventKind::Commit,
                    did: format!("did:plc:t{i}").into(),
                    collection: Some((*c).into()),
                    op_index: op as u16,
                    v1_json: Some(Bytes::from(format!("{{\"i\":{i},\"op\":{op}}}"))),
                    v2_json: None,
                    raw_frame: raw.clone(),
                })
                .collect()
        })
        .collect()
}

/// Reads until `want` events are delivered (bounded by a hang timeout), then checks
/// that nothing more is queued.
async fn read_n(sub: &mut Subscription, want: usize) -> Vec<SharedEvent> {
    let mut got: Vec<SharedEvent> = Vec::new();
    while got.len() < want {
        let batch = tokio::time::timeout(Duration::from_secs(10), sub.next_batch(7))
            .await
            .expect("events never delivered")
            .expect("subscription ended");
        got.extend(batch);
    }
    got.extend(sub.try_next_batch(64));
    got
}

/// What each subscriber should be handed: per frame, the events its filter matches,
/// and on the raw wire only the first of them.
fn expected(frames: &[Vec<Event>], wanted: &[&str], raw: bool) -> Vec<(i64, u16)> {
    let mut out = Vec::new();
    for frame in frames {
        let matching = frame.iter().filter(|e| {
            wanted.is_empty() || wanted.contains(&e.collection.as_deref().unwrap_or(""))
        });
        for e in matching {
            out.push((e.upstream_seq, e.op_index));
            if raw {
                break;
            }
        }
    }
    out
}

fn keys(events: &[SharedEvent]) -> Vec<(i64, u16)> {
    events
        .iter()
        .map(|e| (e.upstream_seq, e.op_index))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_subscribers_get_each_frame_once_live_and_in_catch_up() {
    let _machine = crate::exclusive::shared().await;
    let dir = tempfile::tempdir().unwrap();
    let (log, state) = Log::open(test_config(dir.path())).unwrap();
    let log = Arc::new(log);
    let hub = Hub::start(log.reader(), HubConfig::default()).unwrap();
    let mut gen = EventGen::with_templates(templates(), state);
    let limits = FilterLimits::default();
    let liked = Filter::build(&[LIKE.into(), POST.into()], &[], &[], &limits).unwrap();

    // Live subscribers first, then 12 frames (48 events).
    let live = |wire, filter: &Filter| {
        hub.subscribe(wire, filter.clone(), SlowPolicy::Catchup, Start::Live)
    };
    let mut raw_all = live(WireKind::Raw, &Filter::default());
    let mut raw_liked = live(WireKind::Raw, &liked);
    let mut v1_liked = live(WireKind::JetstreamV1, &liked);
    let mut frames = Vec::new();
    for _ in 0..12 {
        let frame = gen.next_frame();
        log.append(frame.clone()).unwrap();
        frames.push(frame);
    }

    let want_raw_all = expected(&frames, &[], true);
    let want_raw_liked = expected(&frames, &[LIKE, POST], true);
    let want_v1_liked = expected(&frames, &[LIKE, POST], false);
    // The pattern has frames matching through two ops, so the rule has work to do.
    assert!(want_v1_liked.len() > want_raw_liked.len());

    assert!(raw_all.is_live());
    assert_eq!(
        keys(&read_n(&mut raw_all, want_raw_all.len()).await),
        want_raw_all
    );
    assert_eq!(
        keys(&read_n(&mut raw_liked, want_raw_liked.len()).await),
        want_raw_liked
    );
    assert_eq!(
        keys(&read_n(&mut v1_liked, want_v1_liked.len()).await),
        want_v1_liked
    );

    // The same from the log: catch-up batches (7 events) end inside frames.
    let from = |wire, filter: &Filter| {
        hub.subscribe(wire, filter.clone(), SlowPolicy::Catchup, Start::From(1))
    };
    let mut raw_all = from(WireKind::Raw, &Filter::default());
    let mut raw_liked = from(WireKind::Raw, &liked);
    let mut v1_liked = from(WireKind::JetstreamV1, &liked);
    assert!(!raw_all.is_live());
    assert_eq!(
        keys(&read_n(&mut raw_all, want_raw_all.len()).await),
        want_raw_all
    );
    assert_eq!(
        keys(&read_n(&mut raw_liked, want_raw_liked.len()).await),
        want_raw_liked
    );
    assert_eq!(
        keys(&read_n(&mut v1_liked, want_v1_liked.len()).await),
        want_v1_liked
    );
}

/// A raw subscriber whose queue overflows in the middle of a frame continues from the log
/// without the frame again, and is handed the rest once after it rejoins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_overflow_mid_frame_does_not_repeat_the_frame() {
    let _machine = crate::exclusive::shared().await;
    let dir = tempfile::tempdir().unwrap();
    let (log, state) = Log::open(test_config(dir.path())).unwrap();
    let log = Arc::new(log);
    // A queue of one event: the unread subscriber holds the first liked op of frame 0
    // and overflows at frame 1; catch-up starts at frame 0's second op, which is liked
    // too and must not bring frame 0 again.
    let config = HubConfig {
        queue_max_events: 1,
        ..HubConfig::default()
    };
    let hub = Hub::start(log.reader(), config).unwrap();
    let mut gen = EventGen::with_templates(templates(), state);
    let limits = FilterLimits::default();
    let liked = Filter::build(&[LIKE.into(), POST.into()], &[], &[], &limits).unwrap();
    let mut raw_liked = hub.subscribe(WireKind::Raw, liked, SlowPolicy::Catchup, Start::Live);
    let mut frames = Vec::new();
    for _ in 0..40 {
        let frame = gen.next_frame();
        log.append(frame.clone()).unwrap();
        frames.push(frame);
    }
    // The subscriber reads nothing until its queue has overflowed (bounded wait).
    let overflows = || hub.stats().overflows.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(10);
    while overflows() == 0 {
        assert!(Instant::now() < deadline, "the queue bound was never hit");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let want = expected(&frames, &[LIKE, POST], true);
    let got = read_n(&mut raw_liked, want.len()).await;
    assert!(!raw_liked.is_live() || hub.stats().rejoins.load(Ordering::Relaxed) >= 1);
    assert_eq!(keys(&got), want);
}
