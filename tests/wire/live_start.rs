//! A live subscription starts after what is logged when it is made, even while the
//! dispatcher still trails the log.

use crate::log_common;

use std::sync::Arc;
use std::time::Duration;

use log_common::{test_config, EventGen};
use sluice::fanout::filter::Filter;
use sluice::fanout::{Hub, HubConfig, SlowPolicy, Start};
use sluice::log::Log;
use sluice::wire::WireKind;

#[tokio::test(flavor = "current_thread")]
async fn live_starts_after_the_newest_logged_event_not_the_newest_dispatched() {
    let _machine = crate::exclusive::shared().await;
    let dir = tempfile::tempdir().unwrap();
    let (log, state) = Log::open(test_config(dir.path())).unwrap();
    let log = Arc::new(log);
    let mut gen = EventGen::new(state);
    // On a current-thread runtime the dispatcher spawned here does not run until this test
    // awaits, so everything appended before `subscribe` is logged but not yet dispatched.
    let hub = Hub::start(log.reader(), HubConfig::default()).unwrap();
    for _ in 0..5 {
        log.append(gen.next_frame()).unwrap();
    }
    let logged_before = log.reader().newest_seq();
    assert!(logged_before > 0);
    let mut sub = hub.subscribe(
        WireKind::JetstreamV2,
        Filter::default(),
        SlowPolicy::Catchup,
        Start::Live,
    );
    assert_eq!(sub.seen_through(), logged_before);

    let frame = gen.next_frame();
    let first_new = frame[0].seq;
    log.append(frame).unwrap();
    let newest = log.reader().newest_seq();
    let mut got = Vec::new();
    while got.last().is_none_or(|&seq| seq < newest) {
        let batch = tokio::time::timeout(Duration::from_secs(10), sub.next_batch(64))
            .await
            .expect("the new event was never delivered")
            .expect("subscription ended");
        got.extend(batch.iter().map(|e| e.seq));
    }
    let expected: Vec<u64> = (first_new..=newest).collect();
    assert_eq!(
        got, expected,
        "live delivered events logged before it started"
    );
}
