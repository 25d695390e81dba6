//! The hub-wide routing-index budget: subscribing and changing filters pay for their index
//! work, wait when the budget is short, are refused past `MAX_INDEX_WAIT`, and a caught-up
//! subscriber the budget cannot pay for stays on the log without losing anything.

use crate::log_common;

use std::sync::Arc;
use std::time::Duration;

use log_common::{test_config, EventGen};
use sluice::fanout::filter::{Filter, FilterLimits};
use sluice::fanout::{Hub, HubConfig, IndexBusy, SlowPolicy, Start, MAX_INDEX_WAIT};
use sluice::log::Log;
use sluice::wire::WireKind;

fn did_filter(count: usize) -> Filter {
    let dids: Vec<String> = (0..count)
        .map(|i| format!("did:plc:budget{i:08}"))
        .collect();
    let limits = FilterLimits {
        max_collections: 100,
        max_dids: 100_000,
    };
    Filter::build(&[], &dids, &[], &limits).unwrap()
}

fn hub_with_budget(dir: &std::path::Path, per_sec: u64) -> (Arc<Log>, EventGen, Hub) {
    let (log, state) = Log::open(test_config(dir)).unwrap();
    let log = Arc::new(log);
    let config = HubConfig {
        index_changes_per_sec: per_sec,
        ..HubConfig::default()
    };
    let hub = Hub::start(log.reader(), config).unwrap();
    (log, EventGen::new(state), hub)
}

fn between(d: Duration, low_ms: u64, high_ms: u64) -> bool {
    d >= Duration::from_millis(low_ms) && d <= Duration::from_millis(high_ms)
}

#[tokio::test]
async fn subscribes_and_filter_changes_wait_for_the_budget_and_are_refused_past_the_limit() {
    let _machine = crate::exclusive::alone().await;
    let dir = tempfile::tempdir().unwrap();
    let (_log, _gen, hub) = hub_with_budget(dir.path(), 1000);
    // 250 DIDs occupy 250 entries; going in pays for coming out too: 500 of the 1,000.
    let f250 = did_filter(250);
    assert_eq!(f250.index_entries(), 250);
    assert_eq!(
        hub.reserve_subscribe(&f250, Start::Live),
        Ok(Duration::ZERO)
    );
    assert_eq!(
        hub.reserve_subscribe(&f250, Start::Live),
        Ok(Duration::ZERO)
    );
    // Empty now: the next one waits about half a second.
    let third = hub.reserve_subscribe(&f250, Start::Live);
    assert!(
        matches!(third, Ok(w) if between(w, 400, 500)),
        "third reservation: {third:?}"
    );
    // A subscription from the log enters the index only when it catches up: free now.
    assert_eq!(
        hub.reserve_subscribe(&f250, Start::From(1)),
        Ok(Duration::ZERO)
    );
    // 2,500 DIDs with 500 owed would take 5.5 s: refused, and nothing is taken.
    let refused = hub.reserve_subscribe(&did_filter(2500), Start::Live);
    assert!(
        matches!(refused, Err(IndexBusy { would_wait }) if would_wait > MAX_INDEX_WAIT),
        "big reservation: {refused:?}"
    );
    let sub = hub.subscribe(
        WireKind::JetstreamV2,
        Filter::default(),
        SlowPolicy::Catchup,
        Start::Live,
    );
    // A filter change pays the same way: 50 DIDs is 100 more entries owed, ~0.6 s.
    let change = sub.reserve_filter_change(&did_filter(50));
    assert!(
        matches!(change, Ok(w) if between(w, 500, 600)),
        "filter change: {change:?}"
    );
    let stats = hub.stats();
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(stats.index_waits.load(Relaxed), 2);
    assert_eq!(stats.index_refusals.load(Relaxed), 1);
}

#[tokio::test]
async fn a_caught_up_subscriber_without_budget_stays_on_the_log_and_loses_nothing() {
    let _machine = crate::exclusive::alone().await;
    let dir = tempfile::tempdir().unwrap();
    let (log, mut gen, hub) = hub_with_budget(dir.path(), 1000);
    for _ in 0..20 {
        log.append(gen.next_frame()).unwrap();
    }
    // Spend the burst and owe about a second more.
    assert_eq!(
        hub.reserve_subscribe(&did_filter(500), Start::Live),
        Ok(Duration::ZERO)
    );
    assert!(hub
        .reserve_subscribe(&did_filter(500), Start::Live)
        .is_ok_and(|w| between(w, 900, 1000)));
    let mut sub = hub.subscribe(
        WireKind::JetstreamV2,
        Filter::default(),
        SlowPolicy::Catchup,
        Start::From(1),
    );
    let mut got: Vec<u64> = Vec::new();
    let mut rejoined_after = None;
    let started = std::time::Instant::now();
    // Keep logging while it catches up, is held on the log, and finally rejoins.
    loop {
        let elapsed = started.elapsed();
        assert!(
            elapsed < Duration::from_secs(10),
            "never rejoined (got through {:?})",
            got.last()
        );
        if rejoined_after.is_none() && sub.is_live() {
            rejoined_after = Some(elapsed);
        }
        // Quiet spells let it reach the tip and try to rejoin (0.3-0.6 s: no budget yet;
        // after 1 s: paid off); the logging in between must reach it through the log.
        let ms = elapsed.as_millis();
        let logging = ms < 300 || (600..900).contains(&ms) || (1500..2000).contains(&ms);
        if logging {
            log.append(gen.next_frame()).unwrap();
        } else if ms >= 2000 && got.last() == Some(&log.reader().newest_seq()) {
            break;
        }
        if let Ok(batch) = tokio::time::timeout(Duration::from_millis(50), sub.next_batch(64)).await
        {
            got.extend(batch.expect("subscription ended").iter().map(|e| e.seq));
        }
    }
    let rejoined_after = rejoined_after.expect("never rejoined the live path");
    assert!(
        rejoined_after >= Duration::from_millis(800),
        "rejoined after {rejoined_after:?}, before the budget could pay"
    );
    assert!(
        hub.stats()
            .rejoins_deferred
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0,
        "the rejoin was never deferred"
    );
    let newest = log.reader().newest_seq();
    let expected: Vec<u64> = (1..=newest).collect();
    assert_eq!(got, expected, "gap or duplicate across the deferred rejoin");
}

/// A frame of one event by `did`, on the first template's event.
fn frame_by(did: &str) -> Vec<sluice::event::Event> {
    let mut event = log_common::template_frames()[0][0].clone();
    event.did = did.into();
    vec![event]
}

#[tokio::test]
async fn a_large_filter_change_applies_the_difference_and_leaves_the_index_exact() {
    let _machine = crate::exclusive::alone().await;
    let dir = tempfile::tempdir().unwrap();
    let (log, state) = Log::open(test_config(dir.path())).unwrap();
    let log = Arc::new(log);
    let hub = Hub::start(log.reader(), HubConfig::default()).unwrap();
    let did = |i: usize| format!("did:plc:swap{i:08}");
    let filter = |range: std::ops::Range<usize>| {
        let dids: Vec<String> = range.map(did).collect();
        Filter::build(&[], &dids, &[], &FilterLimits::default()).unwrap()
    };
    let mut sub = hub.subscribe(
        WireKind::JetstreamV2,
        filter(0..3000),
        SlowPolicy::Catchup,
        Start::Live,
    );
    assert_eq!(hub.index_size(), 3000);
    // Overlapping sets, larger than one step of the lock: 1,500 leave, 1,500 come.
    sub.set_filter(filter(1500..4500));
    const { assert!(1500 > sluice::fanout::INDEX_STEP) };
    assert_eq!(
        hub.index_size(),
        3000,
        "the index holds exactly the new filter"
    );
    let frames: Vec<Vec<sluice::event::Event>> = [0, 2000, 4000, 9999]
        .iter()
        .map(|&i| frame_by(&did(i)))
        .collect();
    let mut gen = EventGen::with_templates(frames, state);
    for _ in 0..4 {
        log.append(gen.next_frame()).unwrap();
    }
    let mut got = Vec::new();
    while let Ok(Ok(batch)) =
        tokio::time::timeout(Duration::from_millis(300), sub.next_batch(64)).await
    {
        got.extend(batch.iter().map(|e| e.did.to_string()));
    }
    assert_eq!(
        got,
        vec![did(2000), did(4000)],
        "only the new filter's events"
    );
    // The same set again changes nothing; then to one DID, and to collections.
    sub.set_filter(filter(1500..4500));
    assert_eq!(hub.index_size(), 3000);
    sub.set_filter(filter(7..8));
    assert_eq!(hub.index_size(), 1);
    let limits = FilterLimits::default();
    let posts = Filter::build(&["app.bsky.feed.post".to_string()], &[], &[], &limits).unwrap();
    sub.set_filter(posts);
    // The collection, and the list of collection subscribers that get non-commit events.
    assert_eq!(hub.index_size(), 2);
    drop(sub);
    assert_eq!(hub.index_size(), 0, "nothing left behind");
}
