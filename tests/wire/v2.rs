//! Jetstream v2 (`network.bsky.jetstream.subscribeEvents`) end to end over real websockets:
//! the `xrpc.v1.json` subprotocol, `kinds`/`dids`/`collections`, seq cursors (inclusive),
//! µs cursors, CursorTooOld as a pre-upgrade 400, FutureCursor as an #info then live,
//! oversized events as #info plus `/event/{seq}`, and every invalid parameter.

use crate::wire_common;

use std::time::Duration;

use serde_json::Value;
use sluice::event::{Event, EventKind};
use sluice::upstream::replay::Speed;
use wire_common::*;

const NSID: &str = "network.bsky.jetstream.subscribeEvents";

fn v2_events(env: &Env) -> Vec<sluice::log::SharedEvent> {
    env.events()
        .into_iter()
        .filter(|e| e.v2_json.is_some())
        .collect()
}

fn v2_text(e: &Event) -> String {
    String::from_utf8(e.v2_json.as_ref().unwrap().to_vec()).unwrap()
}

fn seqs_of(values: &[Value]) -> Vec<u64> {
    values
        .iter()
        .map(|v| {
            v["payload"]["seq"]
                .as_u64()
                .unwrap_or_else(|| panic!("no seq in {v}"))
        })
        .collect()
}

fn info_name(v: &Value) -> Option<&str> {
    (v["$type"] == "message" && v["payload"]["$type"] == format!("{NSID}#info"))
        .then(|| v["payload"]["name"].as_str().unwrap())
}

/// The v2 filter model, independent of the daemon: kinds, DIDs, collections (commits only).
fn wanted(e: &Event, kinds: &[&str], dids: &[&str], collections: &[&str]) -> bool {
    let kind = match e.kind {
        EventKind::Commit | EventKind::CommitTooBig | EventKind::CommitEmpty => "commit",
        EventKind::Identity => "identity",
        EventKind::Account => "account",
        EventKind::Sync => "sync",
        EventKind::Unknown => return kinds.is_empty() && dids.is_empty() && collections.is_empty(),
    };
    if !kinds.is_empty() && !kinds.contains(&kind) {
        return false;
    }
    if !dids.is_empty() && !dids.contains(&&*e.did) {
        return false;
    }
    if kind != "commit" || collections.is_empty() {
        return true;
    }
    match e.collection.as_deref() {
        None => true,
        Some(c) => collections.iter().any(|w| match w.strip_suffix('*') {
            Some(p) => c.starts_with(p),
            None => c == *w,
        }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_replays_by_inclusive_seq_with_the_subprotocol() {
    let _machine = crate::exclusive::shared().await;
    let env = corpus_env().await;
    let all = v2_events(&env);
    assert_eq!(all.len(), 152);
    let (mut ws, headers) =
        connect_protocol(&env.url(&format!("{V2_PATH}?cursor=1")), "xrpc.v1.json").await;
    assert_eq!(
        headers
            .get("sec-websocket-protocol")
            .map(|v| v.to_str().unwrap()),
        Some("xrpc.v1.json")
    );
    let got = read_texts(&mut ws, all.len()).await;
    assert_quiet(&mut ws, "after the corpus").await;
    for (text, event) in got.iter().zip(&all) {
        assert_eq!(text, &v2_text(event), "bytes of seq {}", event.seq);
        let v: Value = serde_json::from_str(text).unwrap();
        assert_eq!(v["$type"], "message");
        let p = &v["payload"];
        let def = match event.kind {
            EventKind::Commit => "commit",
            EventKind::Identity => "identity",
            EventKind::Account => "account",
            other => panic!("unexpected kind {other:?} in the corpus"),
        };
        assert_eq!(p["$type"], format!("{NSID}#{def}"));
        assert_eq!(p["seq"].as_u64(), Some(event.seq));
        assert_eq!(p["did"].as_str(), Some(&*event.did));
        // `time` is the event's source time to the microsecond, RFC 3339.
        let time = time::OffsetDateTime::parse(
            p["time"].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap();
        assert_eq!(
            time.unix_timestamp_nanos(),
            i128::from(event.time_us) * 1000
        );
        if def == "commit" {
            for field in ["rev", "operation", "collection", "rkey"] {
                assert!(p[field].is_string(), "{field} in {text}");
            }
        }
    }

    // Inclusive seq cursors, and µs cursors (>= 1e15) resolving by source time.
    for k in [1usize, 75, 151] {
        let seq = all[k].seq;
        let mut ws = connect(&env.url(&format!("{V2_PATH}?cursor={seq}"))).await;
        let got = read_json(&mut ws, all.len() - k).await;
        assert_eq!(
            seqs_of(&got),
            all[k..].iter().map(|e| e.seq).collect::<Vec<_>>()
        );
        assert_quiet(&mut ws, "seq cursor").await;
        let t = all[k].time_us;
        let mut ws = connect(&env.url(&format!("{V2_PATH}?cursor={t}"))).await;
        let got = read_json(&mut ws, all.len() - k).await;
        assert_eq!(
            got[0]["payload"]["seq"].as_u64(),
            Some(seq),
            "µs cursor {t}"
        );
        assert_quiet(&mut ws, "µs cursor").await;
    }
    // Seq 0 is the "nothing yet" sentinel: cursor=0 replays from seq 1, as Jetstream v2 does.
    let mut ws = connect(&env.url(&format!("{V2_PATH}?cursor=0"))).await;
    let got = read_json(&mut ws, all.len()).await;
    assert_eq!(seqs_of(&got), all.iter().map(|e| e.seq).collect::<Vec<_>>());
    assert_eq!(got[0]["payload"]["seq"].as_u64(), Some(1));
    assert_quiet(&mut ws, "cursor=0").await;
    // The next seq to be written is the live tip with no notice.
    let next = all.last().unwrap().seq + 1;
    let mut ws = connect(&env.url(&format!("{V2_PATH}?cursor={next}"))).await;
    assert_quiet(&mut ws, "cursor = next seq").await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_filters_by_kinds_dids_and_collections() {
    let _machine = crate::exclusive::shared().await;
    let env = corpus_env().await;
    let all = v2_events(&env);
    let commit_dids: Vec<&str> = all
        .iter()
        .filter(|e| e.kind == EventKind::Commit)
        .map(|e| &*e.did)
        .collect();
    let account_did: &str = &all
        .iter()
        .find(|e| e.kind == EventKind::Account)
        .unwrap()
        .did;
    type Case<'a> = (Vec<&'a str>, Vec<&'a str>, Vec<&'a str>);
    let cases: Vec<Case> = vec![
        (vec!["identity"], vec![], vec![]),
        (vec!["account", "identity"], vec![], vec![]),
        (vec!["commit"], vec![], vec![]),
        (vec!["sync"], vec![], vec![]),
        (vec![], vec![], vec!["app.bsky.feed.like"]),
        (
            vec!["commit"],
            vec![],
            vec!["app.bsky.graph.*", "app.bsky.feed.post"],
        ),
        (vec![], vec![commit_dids[5], account_did], vec![]),
        (vec!["account"], vec![commit_dids[5], account_did], vec![]),
        (vec![], vec![commit_dids[9]], vec!["app.bsky.feed.like"]),
    ];
    for (kinds, dids, collections) in cases {
        let mut query = format!("{V2_PATH}?cursor=1");
        for k in &kinds {
            query.push_str(&format!("&kinds={k}"));
        }
        for d in &dids {
            query.push_str(&format!("&dids={}", enc(d)));
        }
        for c in &collections {
            query.push_str(&format!("&collections={}", enc(c)));
        }
        let want: Vec<u64> = all
            .iter()
            .filter(|e| wanted(e, &kinds, &dids, &collections))
            .map(|e| e.seq)
            .collect();
        let mut ws = connect(&env.url(&query)).await;
        let got = read_json(&mut ws, want.len()).await;
        assert_quiet(&mut ws, &query).await;
        assert_eq!(seqs_of(&got), want, "{query}");
    }
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_invalid_parameters_and_v1_names_get_400_naming_the_problem() {
    let _machine = crate::exclusive::shared().await;
    let env = corpus_env().await;
    let hundred_and_one: String = (0..101)
        .map(|i| format!("collections=app.bsky.c{i}.x&"))
        .collect();
    let cases: Vec<(String, &str, &str)> = vec![
        (
            "wantedCollections=app.bsky.feed.post".into(),
            "InvalidRequest",
            "wantedCollections",
        ),
        (
            "wantedDids=did:plc:abc".into(),
            "InvalidRequest",
            "wantedDids",
        ),
        ("requireHello=true".into(), "InvalidRequest", "requireHello"),
        ("compress=true".into(), "InvalidRequest", "zstdDictionary="),
        (
            "zstdDictionary=x".into(),
            "UnknownZstdDictionary",
            "current dictionary id is 20260811",
        ),
        ("surprise=1".into(), "InvalidRequest", "surprise"),
        ("kinds=commits".into(), "InvalidRequest", "commits"),
        ("collections=notansid".into(), "InvalidRequest", "notansid"),
        (
            "collections=app.bsky.feed.post&kinds=identity".into(),
            "InvalidRequest",
            "kinds",
        ),
        (hundred_and_one, "InvalidRequest", "too many collections"),
        ("dids=did:plc:A+B".into(), "InvalidRequest", "did:plc:A B"),
        ("dids=not-a-did".into(), "InvalidRequest", "not-a-did"),
        ("cursor=-1".into(), "InvalidRequest", "cursor"),
        ("cursor=soon".into(), "InvalidRequest", "cursor"),
        (
            "maxMessageSizeBytes=big".into(),
            "InvalidRequest",
            "maxMessageSizeBytes",
        ),
        ("slowConsumer=never".into(), "InvalidRequest", "never"),
    ];
    for (query, error, needle) in cases {
        let (status, _, body) = refused(&env.url(&format!("{V2_PATH}?{query}"))).await;
        assert_eq!(status, 400, "{}: {body}", short(&query));
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"], error, "{}", short(&query));
        let message = v["message"].as_str().unwrap();
        assert!(
            message.contains(needle),
            "{}: {message:?} should name {needle:?}",
            short(&query)
        );
    }
    // Exactly 100 collections is accepted.
    let hundred: String = (0..100)
        .map(|i| format!("collections=app.bsky.c{i}.x&"))
        .collect();
    let mut ws = connect(&env.url(&format!("{V2_PATH}?{hundred}"))).await;
    assert_quiet(&mut ws, "100 collections").await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_cursor_below_retention_is_a_400_naming_the_floor() {
    let _machine = crate::exclusive::shared().await;
    let env = Env::with_deleted_prefix().await;
    let oldest = env.oldest_seq();
    let (status, _, body) = refused(&env.url(&format!("{V2_PATH}?cursor={}", oldest - 1))).await;
    assert_eq!(status, 400, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"], "CursorTooOld");
    assert!(
        v["message"].as_str().unwrap().contains(&oldest.to_string()),
        "{body}"
    );

    // cursor=0 is seq 1, which retention has passed: the same 400 naming the floor.
    let (status, _, body) = refused(&env.url(&format!("{V2_PATH}?cursor=0"))).await;
    assert_eq!(status, 400, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"], "CursorTooOld");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains(&format!("oldest seq held is {oldest}")),
        "{body}"
    );

    // At the floor: served from the oldest event on, inclusive.
    let held = env.events_from(oldest);
    let want: Vec<u64> = held
        .iter()
        .filter(|e| e.v2_json.is_some() && e.seq >= oldest)
        .map(|e| e.seq)
        .collect();
    let mut ws = connect(&env.url(&format!("{V2_PATH}?cursor={oldest}"))).await;
    let got = read_json(&mut ws, want.len()).await;
    assert_eq!(seqs_of(&got), want);
    assert_quiet(&mut ws, "from the floor").await;

    // A µs cursor older than retention: #info OutdatedCursor, then from the oldest event.
    let mut ws = connect(&env.url(&format!("{V2_PATH}?cursor=1000000000000000"))).await;
    let got = read_json(&mut ws, want.len() + 1).await;
    assert_eq!(info_name(&got[0]), Some("OutdatedCursor"), "{}", got[0]);
    assert_eq!(seqs_of(&got[1..]), want);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_future_cursor_gets_an_info_then_the_live_stream() {
    let _machine = crate::exclusive::shared().await;
    let frames = synth(2000, 21, Duration::from_secs(600));
    let env = Env::start(frames, Speed::Factor(1.0), false, |_| {}).await;
    env.wait_seq(20).await;
    let newest = env.daemon.log.reader().newest_seq();
    let far = newest + 1_000_000;
    let mut ws = connect(&env.url(&format!("{V2_PATH}?cursor={far}"))).await;
    let first = read_json(&mut ws, 1).await.remove(0);
    assert_eq!(info_name(&first), Some("FutureCursor"), "{first}");
    assert!(first["payload"]["message"]
        .as_str()
        .unwrap()
        .contains(&far.to_string()));
    // Then live events, gapless from wherever it joined.
    let got = read_json(&mut ws, 200).await;
    let seqs = seqs_of(&got);
    assert!(
        seqs[0] > newest,
        "live, not replay: {} after newest {newest}",
        seqs[0]
    );
    let want: Vec<u64> = env
        .events_from(seqs[0])
        .iter()
        .filter(|e| e.v2_json.is_some())
        .map(|e| e.seq)
        .take(200)
        .collect();
    assert_eq!(seqs, want);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_oversized_events_become_info_frames_and_are_fetchable() {
    let _machine = crate::exclusive::shared().await;
    let env = corpus_env().await;
    let all = v2_events(&env);
    let mut sizes: Vec<usize> = all
        .iter()
        .map(|e| e.v2_json.as_ref().unwrap().len())
        .collect();
    sizes.sort_unstable();
    let limit = sizes[sizes.len() / 2];
    let mut ws =
        connect(&env.url(&format!("{V2_PATH}?cursor=1&maxMessageSizeBytes={limit}"))).await;
    let got = read_json(&mut ws, all.len()).await;
    assert_quiet(&mut ws, "oversized").await;
    let mut told = 0;
    for (v, event) in got.iter().zip(&all) {
        let size = event.v2_json.as_ref().unwrap().len();
        if size <= limit {
            assert_eq!(v["payload"]["seq"].as_u64(), Some(event.seq));
            continue;
        }
        told += 1;
        assert_eq!(info_name(v), Some("EventTooBig"), "{v}");
        let message = v["payload"]["message"].as_str().unwrap();
        assert!(
            message.contains(&format!("seq {}", event.seq)) && message.contains(&size.to_string()),
            "{message}"
        );
        let fetch = format!("/event/{}?wire=v2", event.seq);
        assert!(message.contains(&fetch), "{message}");
        let (status, _, body) = http_get(env.addr(), &fetch).await;
        assert_eq!(status, 200);
        assert_eq!(body, event.v2_json.as_ref().unwrap().to_vec());
    }
    assert!(told > 0);

    // /event defaults to v2, refuses unknown wires, 404s unknown seqs.
    let seq = all[10].seq;
    let (status, _, body) = http_get(env.addr(), &format!("/event/{seq}")).await;
    assert_eq!(
        (status, body),
        (200, all[10].v2_json.as_ref().unwrap().to_vec())
    );
    let (status, _, body) = http_get(env.addr(), &format!("/event/{seq}?wire=v3")).await;
    assert_eq!(status, 400);
    assert!(String::from_utf8_lossy(&body).contains("v3"));
    let (status, _, _) = http_get(env.addr(), "/event/999999").await;
    assert_eq!(status, 404);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_server_message_cap_applies_without_a_client_limit() {
    let _machine = crate::exclusive::shared().await;
    let env = Env::start(corpus(), Speed::Max, false, |c| {
        c.session.server_max_message_bytes = 700;
    })
    .await;
    env.wait_all_ingested().await;
    let all = v2_events(&env);
    let big = all
        .iter()
        .filter(|e| e.v2_json.as_ref().unwrap().len() > 700)
        .count();
    assert!(
        big > 0 && big < all.len(),
        "the corpus has v2 events over 700 bytes, {big}"
    );
    // A client asking for more than the server cap still gets the cap.
    let mut ws = connect(&env.url(&format!("{V2_PATH}?cursor=1&maxMessageSizeBytes=100000"))).await;
    let got = read_json(&mut ws, all.len()).await;
    let infos = got
        .iter()
        .filter(|v| info_name(v) == Some("EventTooBig"))
        .count();
    assert_eq!(infos, big);
    env.stop().await;
}

/// A client resuming with the next seq (cursor = newest + 1) while ingest runs gets exactly
/// that seq first: an event logged between the cursor's resolution and the subscription
/// (after the upgrade) is not skipped. Each attempt races the live stream (~800 frames/s)
/// against that window. Attempts stop while a tenth of the stream is still to come: a
/// cursor past the last frame would never be answered, and a loaded machine can make 300
/// connections take longer than the stream lasts (~10 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_cursor_at_the_tip_loses_nothing_logged_while_connecting() {
    let _machine = crate::exclusive::shared().await;
    let frames = synth(8000, 61, Duration::from_secs(1200));
    let last_attempt_before = frame_seq(&frames[frames.len() * 9 / 10]);
    let env = Env::start(frames, Speed::Factor(2.0), false, |_| {}).await;
    env.wait_seq(5).await;
    let reader = env.daemon.log.reader();
    let mut attempts = 0;
    while attempts < 300 {
        let cursor = reader.newest_seq() + 1;
        let newest_upstream = reader
            .read_from(cursor - 1, 1, usize::MAX)
            .ok()
            .and_then(|got| got.first().map(|e| e.upstream_seq))
            .unwrap_or(0);
        if newest_upstream >= last_attempt_before {
            break;
        }
        let mut ws = connect(&env.url(&format!("{V2_PATH}?cursor={cursor}"))).await;
        let first = read_json(&mut ws, 1).await.remove(0);
        assert_eq!(info_name(&first), None, "attempt {attempts}: {first}");
        assert_eq!(
            seqs_of(&[first]),
            vec![cursor],
            "attempt {attempts}: the first event after cursor {cursor}"
        );
        attempts += 1;
    }
    assert!(
        attempts >= 50,
        "only {attempts} attempts before the stream's last tenth"
    );
    env.stop().await;
}
