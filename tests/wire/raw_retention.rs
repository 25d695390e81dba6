//! The raw floor over real websockets: with raw frames dropped below it (their own
//! retention) the raw wire's cursor follows it (`#info OutdatedCursor`, then the oldest
//! frame held) while v1 and v2 still serve the events below it, and
//! `/event/{seq}?wire=raw` answers 404 there, naming the floor and the JSON wires.

use crate::wire_common;

use std::time::Duration;

use sluice::log::RawRetention;
use sluice::upstream::replay::Speed;
use wire_common::*;

/// The corpus, durable, with raw frames capped at ~a third of theirs: the raw floor is
/// above the oldest event once this returns.
async fn env_with_raw_floor() -> (Env, u64) {
    let env = Env::start(corpus(), Speed::Max, false, |c| {
        c.log.segment_target_bytes = 4096;
        c.log.retention.check_interval = Duration::from_millis(50);
        c.log.retention.raw = Some(RawRetention {
            max_age: Duration::from_secs(24 * 3600),
            max_bytes: 160 * 1024,
        });
    })
    .await;
    env.wait_all_ingested().await;
    env.wait_durable().await;
    let deadline = tokio::time::Instant::now() + LIMIT;
    let reader = env.daemon.log.reader();
    loop {
        if let Some(floor) = reader.raw_floor() {
            if floor > reader.bounds().unwrap().oldest_seq {
                return (env, floor);
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "raw retention dropped no frame"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_raw_wire_follows_the_raw_floor_while_v1_and_v2_serve_below_it() {
    let _machine = crate::exclusive::shared().await;
    let (env, floor) = env_with_raw_floor().await;
    let events = env.events();
    assert_eq!(events[0].seq, 1, "the JSON of every event is held");
    let floor_event = &events[(floor - 1) as usize];
    let start = env
        .frames
        .iter()
        .position(|f| frame_seq(f) == floor_event.upstream_seq)
        .unwrap();
    assert!(start > 0);
    let want = &env.frames[start..];

    // Raw below the floor: #info OutdatedCursor, then every frame from the oldest held.
    let mut ws = connect(&env.url(&format!("{RAW_PATH}?cursor=0"))).await;
    let got = read_binaries(&mut ws, want.len() + 1).await;
    let (header, body) = decode_frame(&got[0]);
    assert_eq!(cbor_text(&header, "t").as_deref(), Some("#info"));
    assert_eq!(cbor_text(&body, "name").as_deref(), Some("OutdatedCursor"));
    assert!(got[1..] == want[..], "then the frames from the raw floor");
    assert_quiet(&mut ws, "after the newest frame").await;
    // A cursor just below the floor's frame is served from it without the #info.
    let cursor = frame_seq(&env.frames[start - 1]);
    let mut ws = connect(&env.url(&format!("{RAW_PATH}?cursor={cursor}"))).await;
    let got = read_binaries(&mut ws, want.len()).await;
    assert!(got == want, "cursor at the frame before the floor");

    // v2 from seq 1 (below the raw floor): every event, in order.
    let mut ws = connect(&env.url(&format!("{V2_PATH}?cursor=1"))).await;
    let got = read_json(&mut ws, events.len()).await;
    let seqs: Vec<u64> = got
        .iter()
        .map(|m| m["payload"]["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (1..=events.len() as u64).collect::<Vec<_>>());
    // v1 from the oldest event's time: starts there, below the raw floor.
    let mut ws = connect(&env.url(&format!("/subscribe?cursor={}", events[0].time_us))).await;
    let got = read_json(&mut ws, 3).await;
    assert_eq!(got[0]["time_us"].as_i64(), Some(events[0].time_us));
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_lookup_of_a_raw_frame_below_the_raw_floor_is_a_404_that_names_the_way() {
    let _machine = crate::exclusive::shared().await;
    let (env, floor) = env_with_raw_floor().await;
    let below = floor - 1;
    let (status, _, body) = http_get(env.addr(), &format!("/event/{below}?wire=raw")).await;
    let body = String::from_utf8_lossy(&body);
    assert_eq!(status, 404, "{body}");
    assert!(
        body.contains("no longer held") && body.contains(&format!("from seq {floor}")),
        "{body}"
    );
    assert!(body.contains("wire=v1 or wire=v2"), "{body}");
    // Its JSON is still there; the floor's own frame is served.
    let (status, _, _) = http_get(env.addr(), &format!("/event/{below}?wire=v2")).await;
    assert_eq!(status, 200);
    let (status, _, frame) = http_get(env.addr(), &format!("/event/{floor}?wire=raw")).await;
    assert_eq!(status, 200);
    assert_eq!(
        frame_seq(&frame),
        env.events()[(floor - 1) as usize].upstream_seq
    );
    env.stop().await;
}
