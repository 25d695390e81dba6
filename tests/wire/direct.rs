//! Direct writes from the dispatcher (`--direct-writes`, on by default), end to end over
//! real sockets while ingest runs at real time (~400 events/s): a client that stops
//! reading makes the direct write block, which hands over to its session with nothing
//! lost, repeated or reordered; a peer that never reads again is still closed by the
//! write timeout; an `options_update` applies on the direct path; and pings and pongs
//! flow between direct writes. Each test checks from the hub's counters that the
//! direct path was taken, so none of them passes on the session's path alone. And on a
//! hub with a recording connection: direct writes are paced by the session's interval,
//! each carrying what queued meanwhile.

use crate::wire_common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::json;
use sluice::upstream::replay::Speed;
use tokio_tungstenite::tungstenite::Message;
use wire_common::*;

/// ~3,200 synthetic frames replayed at real time: ~8 s of live traffic at ~400 events/s.
async fn live_env(extra: &[&str]) -> Env {
    let frames = synth(3200, 31, Duration::from_secs(1200));
    let env = Env::start_with(frames, Speed::Factor(1.0), false, false, extra, |_| {}).await;
    env.wait_seq(1).await;
    env
}

struct Outcomes {
    written: u64,
    handed: u64,
    refused: u64,
}

fn direct(env: &Env) -> Outcomes {
    let stats = env.daemon.hub.stats();
    Outcomes {
        written: stats.direct_written.load(Ordering::Relaxed),
        handed: stats.direct_handed.load(Ordering::Relaxed),
        refused: stats.direct_refused.load(Ordering::Relaxed),
    }
}

fn ended(env: &Env, reason: &str) -> u64 {
    let ended = env.daemon.app.stats.ended.lock();
    ended.get(reason).copied().unwrap_or(0)
}

/// The upstream seqs of every frame from the first one `got` holds to the end.
fn raw_expected_from(env: &Env, first: u64) -> Vec<u64> {
    env.frames
        .iter()
        .map(|f| frame_seq(f) as u64)
        .filter(|&s| s >= first)
        .collect()
}

/// A live raw subscriber that stops reading for 2 s after 200 frames (its socket and the
/// server's fill: the direct writes block and hand over), then reads on: it gets every
/// frame from its first one to the last, once each and in order, without leaving the
/// live path (no overflow, so what is proven is the hand-over, not catch-up).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_direct_write_hands_over_with_nothing_lost_or_reordered() {
    let _machine = crate::exclusive::alone().await;
    let env = live_env(&["--socket-send-buffer-kib", "8"]).await;
    let ws = connect_small_buffer(&env.url(RAW_PATH), SMALL_RCVBUF).await;
    let target = Arc::new(AtomicU64::new(u64::MAX));
    let how = Follow {
        wire: Wire::Raw,
        pause_after: Some(200),
        pause: Duration::from_secs(2),
        deadline: tokio::time::Instant::now() + Duration::from_secs(90),
    };
    let t = target.clone();
    let task = tokio::spawn(async move {
        let mut ws = ws;
        follow(&mut ws, how, &t).await
    });
    env.wait_all_ingested().await;
    let last = frame_seq(env.frames.last().unwrap()) as u64;
    target.store(last, Ordering::Release);
    let got = task.await.unwrap();

    assert_eq!(got.close, None, "the subscriber was closed");
    let first = *got.positions.first().expect("no frames at all");
    let want = raw_expected_from(&env, first);
    assert_eq!(
        got.positions.len(),
        want.len(),
        "frames missing or repeated"
    );
    assert_eq!(got.positions, want, "frames out of order");
    let outcomes = direct(&env);
    assert!(outcomes.written > 0, "no direct write was made");
    assert!(
        outcomes.handed + outcomes.refused > 0,
        "no direct write blocked while the client did not read"
    );
    let overflows = env.daemon.hub.stats().overflows.load(Ordering::Relaxed);
    assert_eq!(overflows, 0, "the subscriber left the live path");
    env.stop().await;
}

/// A live subscriber that never reads after the upgrade: the direct writes fill its
/// socket, and its session closes it by the write timeout (1 s), long before the upstream
/// ends; the connection then ends for the client too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_reading_is_closed_by_the_write_timeout() {
    let _machine = crate::exclusive::alone().await;
    let env = live_env(&["--socket-send-buffer-kib", "8", "--write-timeout-secs", "1"]).await;
    let mut ws = connect_small_buffer(&env.url(RAW_PATH), SMALL_RCVBUF).await;
    let connected = tokio::time::Instant::now();
    while ended(&env, "write_timeout") == 0 {
        assert!(
            connected.elapsed() < LIMIT,
            "the silent subscriber was not dropped within {LIMIT:?} (write timeout 1 s)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let outcomes = direct(&env);
    assert!(outcomes.written > 0, "no direct write was made");
    assert!(
        outcomes.handed + outcomes.refused > 0,
        "no direct write blocked"
    );
    let (received, end) = count_binary_until_end(&mut ws, LIMIT).await;
    assert!(
        matches!(end, Got::Gone(_) | Got::Closed(_)),
        "expected the connection to end, got {end:?} after {received} frames"
    );
    assert!(received < env.frames.len(), "it got every frame");
    env.stop().await;
}

/// The collection of a v1 event; `None` for identity and account events, which every
/// v1 subscriber gets whatever its collections.
fn collection(text: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(text).unwrap();
    match v["kind"].as_str() {
        Some("commit") => Some(v["commit"]["collection"].as_str().unwrap().to_string()),
        Some("identity" | "account") => None,
        other => panic!("unexpected kind {other:?} in {text}"),
    }
}

/// A v1 subscriber of likes switches to posts mid-stream with `options_update`: before
/// the switch it gets only likes, after it only posts (identity and account events
/// throughout), with cursors increasing, while the dispatcher writes to it directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_options_update_applies_on_the_direct_path() {
    let _machine = crate::exclusive::alone().await;
    let env = live_env(&[]).await;
    let mut ws = connect(&env.url("/subscribe?wantedCollections=app.bsky.feed.like")).await;
    let mut seen = Vec::new();
    while seen.len() < 50 {
        match next(&mut ws, LIMIT).await {
            Got::Text(t) => seen.push(t),
            other => panic!("got {other:?} before the update"),
        }
    }
    let written_before = direct(&env).written;
    assert!(written_before > 0, "no direct write before the update");
    let update = json!({"type": "options_update",
                        "payload": {"wantedCollections": ["app.bsky.feed.post"]}});
    send_text(&mut ws, update.to_string()).await;
    let mut switched = false;
    let mut posts = 0;
    while posts < 20 {
        let text = match next(&mut ws, LIMIT).await {
            Got::Text(t) => t,
            other => panic!("got {other:?} after the update ({posts} posts so far)"),
        };
        match collection(&text).as_deref() {
            Some("app.bsky.feed.post") => {
                switched = true;
                posts += 1;
            }
            Some("app.bsky.feed.like") => {
                assert!(!switched, "a like after the first post: {text}")
            }
            Some(other) => panic!("neither a like nor a post: {other} in {text}"),
            None => {}
        }
        seen.push(text);
    }
    for text in &seen[..50] {
        let c = collection(text);
        assert!(
            c.is_none() || c.as_deref() == Some("app.bsky.feed.like"),
            "{text}"
        );
    }
    let cursors: Vec<u64> = seen.iter().filter_map(|t| scan_u64(t, "cursor")).collect();
    assert_eq!(cursors.len(), seen.len());
    assert!(
        cursors.windows(2).all(|w| w[0] < w[1]),
        "cursors not increasing"
    );
    assert!(
        direct(&env).written > written_before,
        "no direct write after the update"
    );
    env.stop().await;
}

/// With pings every second and a pong timeout of 2 s, a raw subscriber that reads for
/// 5 s gets pings between the events written to it directly and stays connected (its
/// client answers each one); every frame it reads parses, so no ping and no event cut
/// into another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_works_while_direct_writes_flow() {
    let _machine = crate::exclusive::alone().await;
    let env = live_env(&["--ping-interval-secs", "1", "--pong-timeout-secs", "2"]).await;
    let mut ws = connect(&env.url(RAW_PATH)).await;
    let (mut pings, mut frames, mut last_seq) = (0, 0, 0u64);
    let until = tokio::time::Instant::now() + Duration::from_secs(5);
    while let Ok(message) = tokio::time::timeout_at(until, ws.next()).await {
        match message {
            Some(Ok(Message::Ping(_))) => pings += 1,
            Some(Ok(Message::Binary(b))) => {
                let seq = frame_seq(&b) as u64;
                assert!(seq > last_seq, "frame {seq} after {last_seq}");
                last_seq = seq;
                frames += 1;
            }
            other => panic!("unexpected {other:?} after {frames} frames and {pings} pings"),
        }
    }
    assert!(pings >= 2, "{pings} pings in 5 s at one per second");
    assert!(frames >= 100, "{frames} frames in 5 s at ~400/s");
    assert_eq!(
        ended(&env, "peer_dead"),
        0,
        "the reading client was dropped"
    );
    assert!(direct(&env).written > 0, "no direct write was made");
    assert_quiet_or_events(&mut ws).await;
    env.stop().await;
}

/// The subscriber is still connected: the next message is an event, not an end.
async fn assert_quiet_or_events(ws: &mut Ws) {
    match next(ws, Duration::from_secs(2)).await {
        Got::Binary(_) | Got::Timeout => {}
        other => panic!("the subscriber's stream ended: {other:?}"),
    }
}

/// The dispatcher's side of a subscriber, as a fake connection that takes every write and
/// records when it came and what it carried.
#[derive(Default)]
struct Recorder {
    writes: parking_lot::Mutex<Vec<(tokio::time::Instant, Vec<u64>)>>,
}

impl sluice::fanout::DirectWrite for Recorder {
    fn try_write(&self, events: &[&sluice::event::Event]) -> sluice::fanout::Direct {
        let seqs = events.iter().map(|e| e.seq).collect();
        self.writes.lock().push((tokio::time::Instant::now(), seqs));
        sluice::fanout::Direct::Written
    }
}

/// A log in a temp dir and a hub reading it: the dispatcher's side without a daemon.
fn log_and_hub() -> (
    tempfile::TempDir,
    Arc<sluice::log::Log>,
    crate::log_common::EventGen,
    sluice::fanout::Hub,
) {
    use crate::log_common::{test_config, EventGen};
    let dir = tempfile::tempdir().unwrap();
    let (log, state) = sluice::log::Log::open(test_config(dir.path())).unwrap();
    let log = Arc::new(log);
    let hub =
        sluice::fanout::Hub::start(log.reader(), sluice::fanout::HubConfig::default()).unwrap();
    (dir, log, EventGen::new(state), hub)
}

/// Subscribes live to everything with `writer` as the dispatcher's direct path, paced by
/// `pace`, and plays the session: the seq of each event that reaches it instead of a
/// direct write goes to `got`.
fn subscribe_direct(
    hub: &sluice::fanout::Hub,
    writer: Arc<dyn sluice::fanout::DirectWrite>,
    pace: Duration,
    got: impl Fn(u64) + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    use sluice::fanout::{filter::Filter, SlowPolicy, Start};
    let mut sub = hub.subscribe(
        sluice::wire::WireKind::JetstreamV2,
        Filter::default(),
        SlowPolicy::Catchup,
        Start::Live,
    );
    sub.set_direct(writer, pace);
    tokio::spawn(async move {
        loop {
            match sub.next_batch(256).await {
                Ok(batch) => batch.iter().for_each(|e| got(e.seq)),
                Err(end) => panic!("subscription ended: {end:?}"),
            }
        }
    })
}

/// Each path (the dispatcher's direct writes, the session) delivers in order, and together
/// they deliver each of `expected` exactly once; `label` starts every failure message.
fn assert_each_path_in_order_and_every_event_once(
    label: &str,
    direct_seqs: &[u64],
    session_seqs: &[u64],
    expected: &[u64],
) {
    assert!(
        direct_seqs.windows(2).all(|w| w[0] < w[1]),
        "{label}{direct_seqs:?}"
    );
    assert!(
        session_seqs.windows(2).all(|w| w[0] < w[1]),
        "{label}{session_seqs:?}"
    );
    let mut all: Vec<u64> = direct_seqs.iter().chain(session_seqs).copied().collect();
    all.sort_unstable();
    assert_eq!(
        all, expected,
        "{label}direct {direct_seqs:?}, session {session_seqs:?}"
    );
}

/// Direct writes are paced like the session's (`--coalesce-us`): with a 100 ms interval
/// and an event every ~2 ms, the dispatcher writes a parked subscriber at most once per
/// interval, each write carrying what queued meanwhile, without handing it to the
/// session; and every event is delivered once, in order, by one path or the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_writes_are_paced_and_batch_what_queued_meanwhile() {
    let _machine = crate::exclusive::shared().await;
    let pace = Duration::from_millis(100);
    let (_dir, log, mut gen, hub) = log_and_hub();
    let recorder = Arc::new(Recorder::default());
    // The session's side: whatever reaches it instead of a direct write.
    let session_got = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let got = session_got.clone();
    let session = subscribe_direct(&hub, recorder.clone(), pace, move |seq| {
        got.lock().push(seq)
    });
    // The session parked before the first event: observed, not assumed after a sleep (on a
    // loaded machine the session task can take longer to park than any sleep, and the
    // events then rightly go to it). The dispatcher writes directly only to a parked
    // session: events are appended one at a time until one arrives by a direct write.
    // What the probe delivered is then forgotten; its write started a pacing interval,
    // which only delays the next write.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let probe = log.reader().newest_seq() + 1;
        log.append(gen.next_frame()).unwrap();
        let direct = loop {
            if recorder
                .writes
                .lock()
                .iter()
                .any(|(_, s)| s.contains(&probe))
            {
                break true;
            }
            if session_got.lock().contains(&probe) {
                break false;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the probe event {probe} reached neither path within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        if direct {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the session never parked within 30 s"
        );
    }
    recorder.writes.lock().clear();
    session_got.lock().clear();
    let first = log.reader().newest_seq() + 1;
    let started = tokio::time::Instant::now();
    for _ in 0..150 {
        log.append(gen.next_frame()).unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let newest = log.reader().newest_seq();
    let expected: Vec<u64> = (first..=newest).collect();
    // Wait (bounded) until every event was written by one path or the other.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let direct_seqs = loop {
        let seqs: Vec<u64> = recorder
            .writes
            .lock()
            .iter()
            .flat_map(|(_, s)| s.clone())
            .collect();
        let seen = seqs.len() + session_got.lock().len();
        if seen >= expected.len() || tokio::time::Instant::now() > deadline {
            break seqs;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let elapsed = started.elapsed();
    session.abort();
    let session_seqs = session_got.lock().clone();
    let writes = recorder.writes.lock().clone();

    assert_each_path_in_order_and_every_event_once("", &direct_seqs, &session_seqs, &expected);
    // At most one write per interval (the dispatcher's rounds and timer only ever wait
    // longer), so no more writes than intervals elapsed.
    let intervals = (elapsed.as_millis() / pace.as_millis()) as usize + 1;
    assert!(
        writes.len() <= intervals,
        "{} direct writes in {elapsed:?}",
        writes.len()
    );
    // The session was left asleep: events waited for the dispatcher, many to a write.
    assert!(
        direct_seqs.len() >= expected.len() / 2 && direct_seqs.len() >= 3 * writes.len(),
        "{} of {} events written directly in {} writes",
        direct_seqs.len(),
        expected.len(),
        writes.len()
    );
}

/// One of many subscribers' connections as the dispatcher writes to them: records which
/// subscriber each write went to and what it carried, and the first write of all appends
/// one more frame to the log (so it is there while the dispatcher is still writing the
/// first event to the others).
struct TurnWriter {
    id: usize,
    turns: Arc<Turns>,
}

struct Turns {
    log: Arc<sluice::log::Log>,
    gen: parking_lot::Mutex<crate::log_common::EventGen>,
    writes: parking_lot::Mutex<Vec<(usize, Vec<u64>)>>,
}

impl sluice::fanout::DirectWrite for TurnWriter {
    fn try_write(&self, events: &[&sluice::event::Event]) -> sluice::fanout::Direct {
        let seqs = events.iter().map(|e| e.seq).collect();
        let first = {
            let mut writes = self.turns.writes.lock();
            writes.push((self.id, seqs));
            writes.len() == 1
        };
        if first {
            let frame = self.turns.gen.lock().next_frame();
            self.turns.log.append(frame).unwrap();
        }
        sluice::fanout::Direct::Written
    }
}

/// An event that reaches the log while the dispatcher is writing a round to many parked
/// subscribers is dispatched before the round's last writes are made, and joins them: the
/// dispatcher writes a bounded group of subscribers per turn of its loop, the others
/// that are due waiting in their queues (sessions asleep) for the next turns, instead of
/// writing every subscriber of the round back to back and making the new event wait a
/// whole pacing interval for all of them. And still at most one write per subscriber per
/// interval (a minute here), each subscriber's events in order, each event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_that_comes_during_a_big_round_joins_the_writes_not_yet_made() {
    const SUBS: usize = 100;
    let _machine = crate::exclusive::shared().await;
    let pace = Duration::from_secs(60);
    let (_dir, log, mut gen, hub) = log_and_hub();
    let first_frame = gen.next_frame();
    let turns = Arc::new(Turns {
        log: log.clone(),
        gen: parking_lot::Mutex::new(gen),
        writes: parking_lot::Mutex::new(Vec::new()),
    });
    let session_got = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let mut sessions = Vec::new();
    for id in 0..SUBS {
        let writer = TurnWriter {
            id,
            turns: turns.clone(),
        };
        let got = session_got.clone();
        sessions.push(subscribe_direct(&hub, Arc::new(writer), pace, move |seq| {
            got.lock().push((id, seq))
        }));
    }
    // Let the sessions park before the first event.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let a_first = log.reader().newest_seq() + 1;
    log.append(first_frame).unwrap();
    let a: Vec<u64> = (a_first..=log.reader().newest_seq()).collect();
    // Wait (bounded) until the first frame reached every subscriber by one path or the
    // other and some write carried the second frame (appended by the first write).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (subs, joined) = {
            let writes = turns.writes.lock();
            let mut subs: Vec<usize> = writes.iter().map(|(id, _)| *id).collect();
            subs.extend(session_got.lock().iter().map(|(id, _)| *id));
            subs.sort_unstable();
            subs.dedup();
            let b_first = a.last().map_or(0, |s| s + 1);
            let joined = writes.iter().any(|(_, seqs)| seqs.contains(&b_first));
            (subs.len(), joined)
        };
        if (subs >= SUBS && joined) || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Give any write that would break the pacing a chance to happen.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for session in &sessions {
        session.abort();
    }
    let writes = turns.writes.lock().clone();
    let b_first = a.last().unwrap() + 1;
    let b_last = log.reader().newest_seq();
    assert!(
        b_last >= b_first,
        "the first write did not append the second frame"
    );
    let session_got = session_got.lock().clone();

    let mut per_sub: Vec<Vec<u64>> = vec![Vec::new(); SUBS];
    for (id, seq) in session_got.iter().copied() {
        per_sub[id].push(seq);
    }
    let mut written = vec![0usize; SUBS];
    for (id, seqs) in &writes {
        written[*id] += 1;
        assert!(
            written[*id] == 1 || seqs.iter().all(|&s| s >= b_first),
            "subscriber {id} written twice within the interval: {writes:?}"
        );
        per_sub[*id].extend(seqs);
    }
    // Every subscriber got the first frame, once, in order, before anything newer.
    for (id, seqs) in per_sub.iter().enumerate() {
        assert_eq!(
            seqs.get(..a.len()),
            Some(&a[..]),
            "subscriber {id}: {seqs:?}"
        );
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "subscriber {id}: {seqs:?}"
        );
    }
    // Subscribers written in the dispatcher's later turns carried the second frame in
    // the same write as the first (written after it was dispatched); the ones written
    // before it have it queued for their next interval.
    let joined = writes
        .iter()
        .position(|(_, seqs)| seqs.first() == Some(&a_first) && seqs.contains(&b_first));
    let directly = written.iter().filter(|&&n| n > 0).count();
    assert!(
        directly >= SUBS / 2,
        "{directly} of {SUBS} subscribers were written directly: the sessions did not park"
    );
    let Some(joined) = joined else {
        panic!(
            "no write carried the frame that came during the round: every subscriber was \
             written the first frame before the second was dispatched ({} writes)",
            writes.len()
        );
    };
    assert!(
        joined < directly,
        "{joined} writes were made before the second frame was dispatched"
    );
}

/// A fake connection that refuses every other direct write (the socket would block) and
/// records the ones it takes.
#[derive(Default)]
struct Refuser {
    calls: AtomicU64,
    refused: AtomicU64,
    writes: parking_lot::Mutex<Vec<Vec<u64>>>,
}

impl sluice::fanout::DirectWrite for Refuser {
    fn try_write(&self, events: &[&sluice::event::Event]) -> sluice::fanout::Direct {
        if self.calls.fetch_add(1, Ordering::Relaxed) % 2 == 1 {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return sluice::fanout::Direct::Refused;
        }
        self.writes
            .lock()
            .push(events.iter().map(|e| e.seq).collect());
        sluice::fanout::Direct::Written
    }
}

/// The dispatcher's writes borrow the round's events; a refused write puts its events
/// back at the front of the queue, in order, for the session. Two subscribers share every
/// round (one refusing every other write, one taking all): each gets every event exactly
/// once, each path in order, and the refusing one got events by both paths.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_direct_writes_put_the_borrowed_events_back_in_order() {
    let _machine = crate::exclusive::shared().await;
    let pace = Duration::from_millis(20);
    let (_dir, log, mut gen, hub) = log_and_hub();
    let refuser = Arc::new(Refuser::default());
    let taker = Arc::new(Recorder::default());
    let writers: [Arc<dyn sluice::fanout::DirectWrite>; 2] = [refuser.clone(), taker.clone()];
    let mut sessions = Vec::new();
    let mut session_got = Vec::new();
    for writer in writers {
        let got = Arc::new(parking_lot::Mutex::new(Vec::new()));
        session_got.push(got.clone());
        sessions.push(subscribe_direct(&hub, writer, pace, move |seq| {
            got.lock().push(seq)
        }));
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let first = log.reader().newest_seq() + 1;
    for i in 0..200 {
        log.append(gen.next_frame()).unwrap();
        if i % 4 == 0 {
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
    }
    let newest = log.reader().newest_seq();
    let expected: Vec<u64> = (first..=newest).collect();
    let direct_of = |i: usize| -> Vec<u64> {
        match i {
            0 => refuser.writes.lock().iter().flatten().copied().collect(),
            _ => taker
                .writes
                .lock()
                .iter()
                .flat_map(|(_, s)| s.clone())
                .collect(),
        }
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while (0..2).any(|i| direct_of(i).len() + session_got[i].lock().len() < expected.len())
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for session in &sessions {
        session.abort();
    }
    for (i, got) in session_got.iter().enumerate() {
        let direct_seqs = direct_of(i);
        let session_seqs = got.lock().clone();
        assert_each_path_in_order_and_every_event_once(
            &format!("{i}: "),
            &direct_seqs,
            &session_seqs,
            &expected,
        );
        if i == 0 {
            assert!(
                refuser.refused.load(Ordering::Relaxed) > 0,
                "no write was refused"
            );
            assert!(
                !direct_seqs.is_empty() && !session_seqs.is_empty(),
                "one path only"
            );
        }
    }
}
