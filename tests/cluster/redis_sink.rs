//! The Redis sink against a real `redis-server`: every event of the real corpus (plus a
//! `tooBig` commit, a create whose record is missing, a `#sync` and an unknown type) lands
//! in the right streams with the right ids and fields; Redis killed and restarted from its
//! AOF mid-stream loses and repeats nothing; `kill -9` of `sluice serve` at random
//! moments leaves every stream holding each event exactly once, in seq order; and in a
//! cluster one node sinks at a time, another taking over when it dies.

use crate::redis_common;
use crate::serve_common;
use crate::wire_common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use rand::{Rng, SeedableRng};
use redis::aio::MultiplexedConnection;
use redis::Value;
use redis_common::{free_port, RedisServer};
use serde_json::json;
use sluice::decode::dagcbor_encode::encode_dag_cbor;
use sluice::decode::DecodeLimits;
use sluice::event::{Event, EventKind, StampState};
use sluice::ingest::{IngestOutcome, Ingestor};
use sluice::log::{Log, LogConfig, LogReader};
use sluice::sink::{RedisSinkConfig, SinkStats};
use sluice::upstream::capture::{read_all, upstream_fixtures_dir};

const DID: &str = "did:plc:sinkedgeaaaaaaaaaaaaaaaa";
const CID: &str = "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm";

fn frame(t: &str, body: serde_json::Value) -> Bytes {
    let mut bytes = encode_dag_cbor(&json!({"op": 1, "t": t})).unwrap();
    bytes.extend(encode_dag_cbor(&body).unwrap());
    Bytes::from(bytes)
}

fn empty_car() -> serde_json::Value {
    let header = encode_dag_cbor(&json!({"roots": [{"$link": CID}], "version": 1})).unwrap();
    let mut car = vec![u8::try_from(header.len()).unwrap()];
    car.extend(header);
    json!({"$bytes": base64::engine::general_purpose::STANDARD_NO_PAD.encode(car)})
}

/// The real corpus, then frames it lacks: a `tooBig` commit, a commit whose created
/// record is missing, a `#sync` and an unknown type.
fn corpus_and_edges() -> Vec<Bytes> {
    let path = upstream_fixtures_dir().join("jetstream-corpus/frames.bin");
    assert!(
        path.is_file(),
        "real corpus missing at {} (set SLUICE_UPSTREAM_FIXTURES)",
        path.display()
    );
    let mut frames: Vec<Bytes> = read_all(&path, 5 << 20)
        .expect("read corpus")
        .into_iter()
        .map(Bytes::from)
        .collect();
    let seq = 90_000_000_000i64; // after the corpus's seqs
    let commit = |seq: i64, too_big: bool| {
        frame(
            "#commit",
            json!({
                "repo": DID, "rev": "3mptbyplj5d2a", "since": null, "seq": seq,
                "time": "2026-07-04T14:39:14.000Z", "commit": {"$link": CID},
                "blocks": empty_car(), "tooBig": too_big, "rebase": false, "blobs": [],
                "ops": [
                    {"action": "create", "path": "app.bsky.feed.post/3mptbyplj5d2a", "cid": {"$link": CID}},
                    {"action": "delete", "path": "app.bsky.feed.like/3mptbyplj5d2b", "cid": null},
                ],
            }),
        )
    };
    frames.push(commit(seq, true));
    frames.push(commit(seq + 1, false));
    frames.push(frame(
        "#sync",
        json!({"did": DID, "seq": seq + 2, "time": "2026-07-04T14:39:15.000Z",
               "rev": "3mptbyplj5d2c", "blocks": empty_car()}),
    ));
    frames.push(frame(
        "#futureThing",
        json!({"did": DID, "seq": seq + 3, "time": "2026-07-04T14:39:16.000Z"}),
    ));
    frames
}

fn ingest_all(frames: &[Bytes]) -> Vec<Event> {
    let mut ingestor = Ingestor::new(StampState::fresh(), DecodeLimits::default());
    let mut events = Vec::new();
    for (i, f) in frames.iter().enumerate() {
        match ingestor.ingest(f.clone(), 1_900_000_000_000_000) {
            IngestOutcome::Events(batch) => events.extend(batch),
            other => panic!("frame {i}: {other:?}"),
        }
    }
    events
}

fn sink_config(url: &str) -> RedisSinkConfig {
    let mut c = RedisSinkConfig::new(url);
    c.all_stream = true;
    c.publish = true;
    c.batch_max_events = 64; // several writes even for the small corpus
    c.timeout = Duration::from_secs(2);
    c.backoff_min = Duration::from_millis(20);
    c.backoff_max = Duration::from_millis(200);
    c
}

async fn connect(url: &str) -> MultiplexedConnection {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let client = redis::Client::open(url).unwrap();
        match client.get_multiplexed_async_connection().await {
            Ok(mut con) => {
                // Past AOF loading: a real command answers.
                let ping: redis::RedisResult<String> =
                    redis::cmd("PING").query_async(&mut con).await;
                if ping.is_ok() {
                    return con;
                }
            }
            Err(e) if Instant::now() > deadline => panic!("cannot connect to {url}: {e}"),
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).unwrap(),
        Value::SimpleString(s) => s.clone(),
        other => panic!("not a string: {other:?}"),
    }
}

/// One stream entry: id and fields.
type Entry = (String, BTreeMap<String, String>);

async fn xrange(con: &mut MultiplexedConnection, key: &str) -> Vec<Entry> {
    let reply: Value = redis::cmd("XRANGE")
        .arg(key)
        .arg("-")
        .arg("+")
        .query_async(con)
        .await
        .unwrap();
    let Value::Array(items) = reply else {
        panic!("{reply:?}")
    };
    items
        .iter()
        .map(|item| {
            let Value::Array(pair) = item else {
                panic!("{item:?}")
            };
            let Value::Array(fields) = &pair[1] else {
                panic!("{pair:?}")
            };
            let fields = fields
                .chunks(2)
                .map(|kv| (text(&kv[0]), text(&kv[1])))
                .collect();
            (text(&pair[0]), fields)
        })
        .collect()
}

async fn stream_keys(con: &mut MultiplexedConnection, prefix: &str) -> BTreeSet<String> {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(con)
        .await
        .unwrap();
    let mut streams = BTreeSet::new();
    for key in keys {
        let t: String = redis::cmd("TYPE").arg(&key).query_async(con).await.unwrap();
        if t == "stream" {
            streams.insert(key);
        }
    }
    streams
}

async fn position(con: &mut MultiplexedConnection, config: &RedisSinkConfig) -> u64 {
    let seq: Option<String> = redis::cmd("HGET")
        .arg(config.position_key())
        .arg("seq")
        .query_async(con)
        .await
        .unwrap();
    seq.map_or(0, |s| s.parse().unwrap())
}

async fn wait_for_position(stats: &SinkStats, seq: u64, within: Duration) {
    let deadline = Instant::now() + within;
    while stats.position.load(Ordering::Relaxed) < seq {
        assert!(
            Instant::now() < deadline,
            "sink reached {} of {seq} in {within:?}",
            stats.position.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn all_events(reader: &LogReader) -> Vec<sluice::log::SharedEvent> {
    let mut events = Vec::new();
    let mut next = 1;
    while next <= reader.newest_seq() {
        let batch = reader.read_from(next, 10_000, usize::MAX).unwrap();
        next = batch.last().unwrap().seq + 1;
        events.extend(batch);
    }
    events
}

/// Every stream under the prefix holds exactly the entries the log's events call for:
/// each once, in seq order, with id `<seq>-0` and the fields `event`, `time_us`, `seq`,
/// `did`; and no other stream exists.
async fn assert_streams_match(
    con: &mut MultiplexedConnection,
    config: &RedisSinkConfig,
    events: &[sluice::log::SharedEvent],
) {
    let mut expected: BTreeMap<String, Vec<Entry>> = BTreeMap::new();
    for event in events {
        let Some(shaped) = sluice::sink::shape(event, config) else {
            continue;
        };
        for entry in shaped.entries {
            let fields = BTreeMap::from([
                (
                    "event".to_string(),
                    String::from_utf8(shaped.json.to_vec()).unwrap(),
                ),
                ("time_us".to_string(), event.time_us.to_string()),
                ("seq".to_string(), event.seq.to_string()),
                ("did".to_string(), event.did.to_string()),
            ]);
            expected
                .entry(entry.key)
                .or_default()
                .push((format!("{}-0", event.seq), fields));
        }
    }
    let keys = stream_keys(con, &config.prefix).await;
    assert_eq!(
        keys,
        expected.keys().cloned().collect::<BTreeSet<_>>(),
        "exactly the expected streams"
    );
    for (key, want) in &expected {
        let got = xrange(con, key).await;
        let got_ids: Vec<&str> = got.iter().map(|(id, _)| id.as_str()).collect();
        let want_ids: Vec<&str> = want.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(got_ids, want_ids, "{key}: each event once, in seq order");
        assert!(got == *want, "{key}: fields match the log's events");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_lands_in_the_right_streams_with_ids_and_fields() {
    let _machine = crate::exclusive::shared().await;
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = Log::open(LogConfig::new(dir.path())).unwrap();
    let events = ingest_all(&corpus_and_edges());
    let newest = events.last().unwrap().seq;
    let kinds: BTreeSet<_> = events.iter().map(|e| e.kind.as_str()).collect();
    for kind in [
        "commit",
        "commit_too_big",
        "identity",
        "account",
        "sync",
        "unknown",
    ] {
        assert!(kinds.contains(kind), "{kind} is covered: {kinds:?}");
    }
    let likes = events
        .iter()
        .filter(|e| e.collection.as_deref() == Some("app.bsky.feed.like"))
        .count();
    log.append(events).unwrap();
    assert!(log.flush(Duration::from_secs(10)));

    let config = sink_config(&redis.url());
    let mut con = connect(&redis.url()).await;
    // A consumer of the old rebroadcaster: pub/sub on the like channel.
    let mut pubsub = redis::Client::open(redis.url())
        .unwrap()
        .get_async_pubsub()
        .await
        .unwrap();
    pubsub
        .subscribe(format!("{}c:app.bsky.feed.like", config.prefix))
        .await
        .unwrap();
    let sink = sluice::sink::start(log.reader(), config.clone()).unwrap();
    wait_for_position(&sink.stats, newest, Duration::from_secs(20)).await;
    assert_eq!(position(&mut con, &config).await, newest);

    let reader = log.reader();
    let stored = all_events(&reader);
    assert_streams_match(&mut con, &config, &stored).await;

    // The same facts, checked without the sink's own shaping code.
    for e in &stored {
        let id = format!("{}-0", e.seq);
        let find = |entries: &[Entry]| entries.iter().find(|(i, _)| *i == id).cloned();
        match e.kind {
            EventKind::Commit => {
                let key = format!("sluice:c:{}", e.collection.as_deref().unwrap());
                let (_, fields) = find(&xrange(&mut con, &key).await).expect("entry");
                assert_eq!(fields["event"].as_bytes(), e.v1_json.as_deref().unwrap());
                assert_eq!(fields["time_us"], e.time_us.to_string(), "source time");
                assert_eq!(fields["did"], *e.did);
            }
            EventKind::Identity | EventKind::Account => {
                let key = format!("sluice:k:{}", e.kind.as_str());
                let (_, fields) = find(&xrange(&mut con, &key).await).expect("entry");
                assert_eq!(fields["event"].as_bytes(), e.v1_json.as_deref().unwrap());
            }
            EventKind::CommitTooBig => {
                for key in [
                    "sluice:c:app.bsky.feed.post",
                    "sluice:c:app.bsky.feed.like",
                    "sluice:k:tooBig",
                ] {
                    let (_, fields) = find(&xrange(&mut con, key).await)
                        .unwrap_or_else(|| panic!("tooBig in {key}"));
                    let v: serde_json::Value = serde_json::from_str(&fields["event"]).unwrap();
                    assert_eq!(v["kind"], "tooBig");
                    assert_eq!(v["did"], DID);
                    assert_eq!(v["time_us"], e.time_us);
                    assert_eq!(v["tooBig"]["rev"], "3mptbyplj5d2a");
                    assert_eq!(
                        v["tooBig"]["ops"][1]["path"],
                        "app.bsky.feed.like/3mptbyplj5d2b"
                    );
                }
            }
            EventKind::Sync => {
                let (_, fields) = find(&xrange(&mut con, "sluice:k:sync").await).expect("sync");
                let v: serde_json::Value = serde_json::from_str(&fields["event"]).unwrap();
                assert_eq!(v["kind"], "sync");
                assert_eq!(v["sync"]["rev"], "3mptbyplj5d2c");
                assert_eq!(v["cursor"], e.seq);
            }
            EventKind::CommitEmpty | EventKind::Unknown => {
                let all = xrange(&mut con, "sluice:all").await;
                assert!(find(&all).is_none(), "no JSON form, not written");
            }
        }
    }
    let missing = stored
        .iter()
        .find(|e| &*e.did == DID && e.kind == EventKind::Commit && e.op_index == 0)
        .expect("the commit with a missing record");
    let posts = xrange(&mut con, "sluice:c:app.bsky.feed.post").await;
    let (_, fields) = posts
        .iter()
        .find(|(id, _)| *id == format!("{}-0", missing.seq))
        .expect("missing-record create is written");
    let v: serde_json::Value = serde_json::from_str(&fields["event"]).unwrap();
    assert_eq!(v["commit"]["recordMissing"], true);
    assert_eq!(
        xrange(&mut con, "sluice:all").await.len(),
        stored
            .iter()
            .filter(|e| !matches!(e.kind, EventKind::CommitEmpty | EventKind::Unknown))
            .count()
    );
    assert_eq!(
        sink.stats.skipped.load(Ordering::Relaxed),
        1,
        "the unknown type"
    );
    assert_eq!(sink.stats.duplicates.load(Ordering::Relaxed), 0);

    // Published too: one message per like entry (the corpus's likes and the tooBig).
    use futures_util::StreamExt;
    let mut messages = pubsub.on_message();
    let mut published = 0;
    while published < likes + 1 {
        let next = tokio::time::timeout(Duration::from_secs(5), messages.next()).await;
        let msg = next.expect("every like is published").expect("pubsub open");
        let payload: String = msg.get_payload().unwrap();
        assert!(payload.contains("app.bsky.feed.like"), "{payload}");
        published += 1;
    }
    sink.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_mid_stream_loses_and_repeats_nothing() {
    let _machine = crate::exclusive::shared().await;
    let mut redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = Log::open(LogConfig::new(dir.path())).unwrap();
    let events = ingest_all(&corpus_and_edges());
    let newest = events.last().unwrap().seq;
    let half = events.len() / 2;
    let mut events = events.into_iter();
    log.append(events.by_ref().take(half).collect()).unwrap();
    assert!(log.flush(Duration::from_secs(10)));

    let config = sink_config(&redis.url());
    let sink = sluice::sink::start(log.reader(), config.clone()).unwrap();
    wait_for_position(&sink.stats, half as u64, Duration::from_secs(20)).await;

    redis.kill9();
    // Ingest goes on while Redis is away; the log keeps everything.
    log.append(events.collect()).unwrap();
    assert!(log.flush(Duration::from_secs(10)));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        sink.stats.position.load(Ordering::Relaxed) < newest,
        "nothing can be written while Redis is away"
    );
    let errors: u64 = sluice::sink::SinkError::REASONS
        .iter()
        .map(|r| sink.stats.errors(r))
        .sum();
    assert!(errors > 0, "the outage is counted");
    assert!(!sink.stats.connected.load(Ordering::Relaxed));

    redis.restart();
    wait_for_position(&sink.stats, newest, Duration::from_secs(30)).await;
    let mut con = connect(&redis.url()).await;
    assert_eq!(position(&mut con, &config).await, newest);
    assert_streams_match(&mut con, &config, &all_events(&log.reader())).await;
    assert_eq!(sink.stats.duplicates.load(Ordering::Relaxed), 0);
    assert_eq!(sink.stats.position_conflicts.load(Ordering::Relaxed), 0);
    sink.shutdown(Duration::from_secs(5)).await;
}

/// A Redis that went away is found again by the sink's probes (every `probe_interval`),
/// not after its backoff, here set far longer than the test waits; a live Redis that
/// keeps failing is backed off from, not probed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_redis_is_found_by_probes_and_a_failing_one_is_backed_off_from() {
    let _machine = crate::exclusive::shared().await;
    let mut redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = Log::open(LogConfig::new(dir.path())).unwrap();
    let events = ingest_all(&corpus_and_edges());
    let newest = events.last().unwrap().seq;
    let (first, second) = (events.len() / 3, 2 * events.len() / 3);
    let mut events = events.into_iter();
    log.append(events.by_ref().take(first).collect()).unwrap();
    assert!(log.flush(Duration::from_secs(10)));

    let mut config = sink_config(&redis.url());
    config.backoff_min = Duration::from_secs(600);
    config.backoff_max = Duration::from_secs(600);
    config.probe_interval = Duration::from_millis(50);
    let sink = sluice::sink::start(log.reader(), config.clone()).unwrap();
    wait_for_position(&sink.stats, first as u64, Duration::from_secs(20)).await;

    redis.kill9();
    log.append(events.by_ref().take(second - first).collect())
        .unwrap();
    assert!(log.flush(Duration::from_secs(10)));
    // Redis refuses connections: the sink probes it again and again (with the backoff, it
    // would make one attempt in up to 600 s).
    let deadline = Instant::now() + Duration::from_secs(30);
    while sink.stats.probes.load(Ordering::Relaxed) < 5 {
        assert!(Instant::now() < deadline, "no probes while Redis is away");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!sink.stats.connected.load(Ordering::Relaxed));
    assert!(sink.stats.position.load(Ordering::Relaxed) < second as u64);

    redis.restart();
    // Only the probes can find it within the bound: the backoff is 600 s.
    wait_for_position(&sink.stats, second as u64, Duration::from_secs(30)).await;
    let mut con = connect(&redis.url()).await;
    assert_eq!(position(&mut con, &config).await, second as u64);
    assert_eq!(sink.stats.duplicates.load(Ordering::Relaxed), 0);

    // A live Redis that answers with errors: the position is no seq. The first failure
    // is retried after the probe interval, every further one after the backoff, so
    // within a few seconds the sink fails only about twice, and never probes.
    let probes = sink.stats.probes.load(Ordering::Relaxed);
    assert_eq!(sink.stats.errors("reply"), 0);
    let _: () = redis::cmd("HSET")
        .arg(config.position_key())
        .arg("seq")
        .arg("not-a-seq")
        .query_async(&mut con)
        .await
        .unwrap();
    log.append(events.collect()).unwrap();
    assert!(log.flush(Duration::from_secs(10)));
    let deadline = Instant::now() + Duration::from_secs(30);
    while sink.stats.errors("reply") < 2 {
        assert!(
            Instant::now() < deadline,
            "the bad position is not reported: {} errors",
            sink.stats.errors("reply")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let errors = sink.stats.errors("reply");
    assert!(
        (2..=3).contains(&errors),
        "a failing Redis is backed off from: {errors} errors in 3 s"
    );
    assert_eq!(sink.stats.probes.load(Ordering::Relaxed), probes);
    assert!(sink.stats.position.load(Ordering::Relaxed) < newest);
    sink.shutdown(Duration::from_secs(5)).await;
}

/// Niceness of this process's threads named `name` (Linux: field 19 of each task's stat).
fn nice_of_threads(name: &str) -> Vec<i64> {
    let mut out = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim_end() != name {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue; // the thread ended meanwhile
        };
        // After the command name's closing parenthesis: field 3 onwards.
        let (_, rest) = stat.rsplit_once(')').unwrap();
        let nice: i64 = rest.split_whitespace().nth(16).unwrap().parse().unwrap();
        out.push(nice);
    }
    out
}

/// The sink's work (its loop and Redis I/O, and the log reads and encoding on its blocking
/// threads) runs on threads of its own at `--redis-sink-nice` (19 here: the highest, so
/// the check holds whatever niceness the test runs at below it), not on the caller's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sink_runs_on_its_own_threads_at_its_niceness() {
    let _machine = crate::exclusive::shared().await;
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = Log::open(LogConfig::new(dir.path())).unwrap();
    let events = ingest_all(&corpus_and_edges());
    let newest = events.last().unwrap().seq;
    log.append(events).unwrap();
    assert!(log.flush(Duration::from_secs(10)));
    let own = sluice::priority::this_thread_nice().unwrap();
    assert!(
        own < 19,
        "the test already runs at niceness {own}: nothing to check"
    );
    let mut config = sink_config(&redis.url());
    config.nice = 19;
    let sink = sluice::sink::start(log.reader(), config.clone()).unwrap();
    // Several batches: the log was read on the sink's blocking threads.
    wait_for_position(&sink.stats, newest, Duration::from_secs(20)).await;
    assert!(sink.stats.batches.load(Ordering::Relaxed) > 1);
    for name in ["redis-sink", "redis-sink-read"] {
        let nices = nice_of_threads(name);
        assert!(!nices.is_empty(), "no thread named {name}");
        // Other tests' sinks run at the default, 19 too; the caller's threads at `own`.
        assert!(
            nices.iter().all(|&n| n == 19),
            "{name} threads at niceness {nices:?}, the test's at {own}"
        );
    }
    let mut con = connect(&redis.url()).await;
    assert_streams_match(&mut con, &config, &all_events(&log.reader())).await;
    sink.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_writer_with_a_stale_position_writes_nothing() {
    let _machine = crate::exclusive::shared().await;
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = Log::open(LogConfig::new(dir.path())).unwrap();
    let events = ingest_all(&corpus_and_edges());
    let newest = events.last().unwrap().seq;
    log.append(events).unwrap();
    assert!(log.flush(Duration::from_secs(10)));
    let config = sink_config(&redis.url());
    // Two sinks on one Redis (two daemons pointed at it by mistake): the position check
    // makes the slower one resume from where the other got, never rewrite or skip.
    let a = sluice::sink::start(log.reader(), config.clone()).unwrap();
    let b = sluice::sink::start(log.reader(), config.clone()).unwrap();
    wait_for_position(&a.stats, newest, Duration::from_secs(20)).await;
    wait_for_position(&b.stats, newest, Duration::from_secs(20)).await;
    let mut con = connect(&redis.url()).await;
    assert_streams_match(&mut con, &config, &all_events(&log.reader())).await;
    let written = a.stats.events.load(Ordering::Relaxed) + b.stats.events.load(Ordering::Relaxed);
    let skipped = a.stats.skipped.load(Ordering::Relaxed) + b.stats.skipped.load(Ordering::Relaxed);
    assert_eq!(written, newest, "each event written by exactly one of them");
    assert!(skipped <= 1);
    assert_eq!(
        a.stats.duplicates.load(Ordering::Relaxed) + b.stats.duplicates.load(Ordering::Relaxed),
        0
    );
    a.shutdown(Duration::from_secs(5)).await;
    b.shutdown(Duration::from_secs(5)).await;
}

/// A `sluice serve` child, killed if the test panics first.
struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_serve(
    upstream: &str,
    data: &std::path::Path,
    redis: &str,
    admin: u16,
    port: u16,
) -> Serve {
    let child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["serve", "--upstream", upstream, "--data-dir"])
        .arg(data)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
        .args(["--redis-sink", redis, "--redis-sink-all"])
        .args(["--redis-sink-batch-events", "200"])
        .args(["--redis-sink-timeout-ms", "1000"])
        .args(["--commit-interval-ms", "20"])
        .args(["--backoff-min-ms", "20", "--backoff-max-ms", "200"])
        .stdout(Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(data.with_extension("log"))
                .unwrap(),
        )
        .spawn()
        .unwrap();
    Serve(child)
}

const KILLS: usize = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_nines_of_serve_leave_every_stream_exactly_once_in_order() {
    let _machine = crate::exclusive::shared().await;
    let redis = RedisServer::start();
    // About 2,000 events/s (synthetic frames are 1-4 ms apart in source time and carry
    // ~1.2 events each: 4x is ~1,600 frames/s), ~10 s of them, so the kills (each 0.3-0.9 s
    // into a life, every life resuming from its cursor) land while frames still arrive.
    let (frames, upstream) = serve_common::paced_upstream(16_000, 18, 4.0).await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = RedisSinkConfig {
        all_stream: true,
        ..RedisSinkConfig::new(redis.url())
    };
    let mut con = connect(&redis.url()).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(18);
    let mut positions = Vec::new();
    for _ in 0..KILLS {
        let mut child = spawn_serve(&upstream, &data, &redis.url(), free_port(), free_port());
        tokio::time::sleep(Duration::from_millis(rng.gen_range(300..900))).await;
        child.0.kill().unwrap(); // SIGKILL
        child.0.wait().unwrap();
        positions.push(position(&mut con, &config).await);
    }
    assert!(
        positions.windows(2).all(|w| w[1] >= w[0]),
        "the position never goes back: {positions:?}"
    );
    assert!(
        positions.iter().filter(|&&p| p > 0).count() >= KILLS / 2,
        "kills landed while the sink was writing: {positions:?}"
    );
    // A clean run until everything is in the log and in Redis.
    let (admin, port) = (free_port(), free_port());
    let mut child = spawn_serve(&upstream, &data, &redis.url(), admin, port);
    let done = async {
        // The raw wire delivers the last upstream frame...
        serve_common::raw_wire_delivers(port, frames.last().unwrap()).await;
        // ...and the sink has written up to the log's newest event.
        loop {
            let status = status_json(admin).await;
            let sink_pos = status["redis_sink"]["position"].as_u64();
            let newest = status["log"]["bounds"]["newest_seq"].as_u64();
            if let (Some(p), Some(n)) = (sink_pos, newest) {
                if p == n {
                    return n;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let newest = tokio::time::timeout(Duration::from_secs(90), done)
        .await
        .expect("the final run ingests and sinks everything within 90 s");
    let status = status_json(admin).await;
    assert_eq!(status["redis_sink"]["duplicates"], 0, "{status}");
    Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(child.0.wait().unwrap().success());
    let (log, _) = Log::open(LogConfig::new(&data)).unwrap();
    let events = all_events(&log.reader());
    assert_eq!(events.last().unwrap().seq, newest);
    let raw: Vec<&Bytes> = events
        .iter()
        .filter_map(|e| sluice::wire::raw::frame_of(e))
        .collect();
    assert_eq!(raw.len(), frames.len(), "the log holds every frame once");
    assert_eq!(position(&mut con, &config).await, newest);
    assert_streams_match(&mut con, &config, &events).await;
}

async fn status_json(admin: u16) -> serde_json::Value {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", admin)).await else {
        return serde_json::Value::Null;
    };
    let req = "GET /status.json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    if s.write_all(req.as_bytes()).await.is_err() {
        return serde_json::Value::Null;
    }
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    let text = String::from_utf8_lossy(&out);
    text.split_once("\r\n\r\n")
        .and_then(|(_, body)| serde_json::from_str(body).ok())
        .unwrap_or(serde_json::Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_position_rewrites_nothing_twice_and_counts_the_repeats() {
    let _machine = crate::exclusive::shared().await;
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = Log::open(LogConfig::new(dir.path())).unwrap();
    let events = ingest_all(&corpus_and_edges());
    let newest = events.last().unwrap().seq;
    let half = events.len() / 2;
    let mut events = events.into_iter();
    log.append(events.by_ref().take(half).collect()).unwrap();
    assert!(log.flush(Duration::from_secs(10)));
    let config = sink_config(&redis.url());
    let sink = sluice::sink::start(log.reader(), config.clone()).unwrap();
    wait_for_position(&sink.stats, half as u64, Duration::from_secs(20)).await;
    let written = sink.stats.entries.load(Ordering::Relaxed);
    assert!(written > 0);
    // Someone deletes the position: the sink's next write finds it changed, starts over
    // from seq 1, and every entry already there fails harmlessly and is counted.
    let mut con = connect(&redis.url()).await;
    let _: i64 = redis::cmd("DEL")
        .arg(config.position_key())
        .query_async(&mut con)
        .await
        .unwrap();
    log.append(events.collect()).unwrap();
    assert!(log.flush(Duration::from_secs(10)));
    let deadline = Instant::now() + Duration::from_secs(20);
    while position(&mut con, &config).await < newest {
        assert!(Instant::now() < deadline, "the sink caught up again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(sink.stats.duplicates.load(Ordering::Relaxed), written);
    assert!(sink.stats.position_conflicts.load(Ordering::Relaxed) >= 1);
    assert_streams_match(&mut con, &config, &all_events(&log.reader())).await;
    sink.shutdown(Duration::from_secs(5)).await;
}

#[derive(Clone, Copy)]
enum Example {
    Python,
    Node,
}

/// Runs `examples/redis/consume.py` or `consume.mjs`; its output lines (`<id> <json>`).
fn run_consumer(
    example: Example,
    url: &str,
    cursor: &std::path::Path,
    extra: &[&str],
) -> Vec<String> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/redis");
    let (program, script, needs) = match example {
        Example::Python => ("python3", "consume.py", "python3 with `pip install redis`"),
        Example::Node => (
            "node",
            "consume.mjs",
            "node 18+ and `npm install --prefix examples/redis`",
        ),
    };
    let out = Command::new(program)
        .arg(format!("{dir}/{script}"))
        .args(["--url", url, "--stream", "sluice:c:app.bsky.feed.like"])
        .arg("--cursor-file")
        .arg(cursor)
        .args(extra)
        .output()
        .unwrap_or_else(|e| panic!("{script} needs {needs}: {e}"));
    assert!(
        out.status.success(),
        "{script} failed (it needs {needs}): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_example_resumes_across_restarts_without_gap_or_duplicate() {
    let _machine = crate::exclusive::shared().await;
    example_resumes(Example::Python).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_example_resumes_across_restarts_without_gap_or_duplicate() {
    let _machine = crate::exclusive::shared().await;
    example_resumes(Example::Node).await;
}

/// A consumer reads 10 likes, stops; Redis is killed and restarted from its AOF while
/// sluice ingests more; the consumer starts again from its saved id and reads the rest:
/// together, every like of the stream once, in order.
async fn example_resumes(example: Example) {
    let mut redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = Log::open(LogConfig::new(dir.path().join("log"))).unwrap();
    let events = ingest_all(&corpus_and_edges());
    let newest = events.last().unwrap().seq;
    let half = events.len() / 2;
    let mut events = events.into_iter();
    log.append(events.by_ref().take(half).collect()).unwrap();
    assert!(log.flush(Duration::from_secs(10)));
    let config = sink_config(&redis.url());
    let sink = sluice::sink::start(log.reader(), config.clone()).unwrap();
    wait_for_position(&sink.stats, half as u64, Duration::from_secs(20)).await;

    let cursor = dir.path().join("like.cursor");
    let url = redis.url();
    let first = {
        let (url, cursor) = (url.clone(), cursor.clone());
        tokio::task::spawn_blocking(move || run_consumer(example, &url, &cursor, &["--max", "10"]))
            .await
            .unwrap()
    };
    assert_eq!(first.len(), 10);
    // Redis crashes and comes back from its AOF; sluice goes on ingesting meanwhile.
    redis.kill9();
    log.append(events.collect()).unwrap();
    assert!(log.flush(Duration::from_secs(10)));
    redis.restart();
    wait_for_position(&sink.stats, newest, Duration::from_secs(30)).await;
    let rest = tokio::task::spawn_blocking(move || {
        run_consumer(example, &url, &cursor, &["--idle-exit", "1"])
    })
    .await
    .unwrap();

    let mut con = connect(&redis.url()).await;
    let stream = xrange(&mut con, "sluice:c:app.bsky.feed.like").await;
    assert!(stream.len() > 10);
    let read: Vec<(String, serde_json::Value)> = first
        .iter()
        .chain(&rest)
        .map(|line| {
            let (id, json) = line.split_once(' ').unwrap();
            (id.to_string(), serde_json::from_str(json).unwrap())
        })
        .collect();
    let ids: Vec<&str> = read.iter().map(|(id, _)| id.as_str()).collect();
    let want: Vec<&str> = stream.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids, want, "every like once, in order, across the restarts");
    for ((_, json), (_, fields)) in read.iter().zip(&stream) {
        let stored: serde_json::Value = serde_json::from_str(&fields["event"]).unwrap();
        assert_eq!(*json, stored);
    }
    sink.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_trimmed_by_length_and_by_source_time_age() {
    let _machine = crate::exclusive::shared().await;
    use sluice::upstream::synth::{generate, SynthOptions};
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = Log::open(LogConfig::new(dir.path().join("log"))).unwrap();
    let frames: Vec<Bytes> = generate(&SynthOptions {
        count: 8_000,
        seed: 5,
        ..SynthOptions::default()
    })
    .into_iter()
    .map(Bytes::from)
    .collect();
    let mut events = ingest_all(&frames);
    let last = events.pop().unwrap();
    let mut config = sink_config(&redis.url());
    config.publish = false;
    config.batch_max_events = 2000;
    config.max_len = 1000;
    config.max_age = Some(Duration::from_secs(1));
    let sink = sluice::sink::start(log.reader(), config.clone()).unwrap();
    let mut con = connect(&redis.url()).await;
    // Four rounds a little over a second apart, so age trimming (at most once a second)
    // runs during the run and not only at its end.
    let chunk = events.len().div_ceil(4);
    let mut events = events.into_iter().peekable();
    while events.peek().is_some() {
        let batch: Vec<Event> = events.by_ref().take(chunk).collect();
        let upto = batch.last().unwrap().seq;
        log.append(batch).unwrap();
        assert!(log.flush(Duration::from_secs(10)));
        wait_for_position(&sink.stats, upto, Duration::from_secs(30)).await;
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    // One more write after the last pause applies the age trim at the newest time.
    let newest = last.seq;
    log.append(vec![last]).unwrap();
    assert!(log.flush(Duration::from_secs(10)));
    wait_for_position(&sink.stats, newest, Duration::from_secs(30)).await;
    let newest_time = log.reader().bounds().unwrap().newest_time_us;
    let len = |v: &[Entry]| v.len();
    let all = xrange(&mut con, "sluice:all").await;
    // Approximate trimming removes whole nodes (100 entries by default): allow one.
    assert!(len(&all) <= 1000 + 100, "all: {} entries", len(&all));
    let within_age = all
        .iter()
        .filter(|(_, f)| f["time_us"].parse::<i64>().unwrap() >= newest_time - 1_000_000)
        .count();
    assert!(
        within_age < 1000,
        "the age bound is the tighter one here: {within_age}"
    );
    assert!(
        len(&all) <= within_age + 100,
        "all holds {} entries, {within_age} within 1 s of source time",
        len(&all)
    );
    for key in stream_keys(&mut con, "sluice:").await {
        let n = xrange(&mut con, &key).await.len();
        assert!(n <= 1100, "{key}: {n} entries");
    }
    assert_eq!(
        sink.stats.events.load(Ordering::Relaxed),
        newest,
        "trimming drops old entries, never new ones"
    );
    sink.shutdown(Duration::from_secs(5)).await;
}

/// The whole daemon with a sink: Redis killed mid-stream and restarted from its AOF 30 s
/// later (the outage the issue names). A v2 subscriber keeps receiving every event, in
/// order, throughout; `/readyz` stays ready and names the sink's state; `/metrics` counts
/// the outage and the sink's growing lag; afterwards the sink catches up and the streams
/// hold every event once. (Its effect on subscribers' latency is measured by
/// `sluice-bench redis-consumers --outage-secs 30`, not timed here.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_away_does_not_touch_ingest_or_subscribers() {
    let _machine = crate::exclusive::shared().await;
    use wire_common::{http_get, Env, V2_PATH};
    let mut redis = RedisServer::start();
    let now_ms = sluice::clock::now_us() / 1000;
    // About 1,600 frames 1-4 ms apart in source time, replayed at a tenth of that pace:
    // traffic for ~40 s, so that it flows all through the 30 s outage.
    let frames = wire_common::synth_at(1600, 7, 1_000_000, now_ms - 60_000);
    let mut config = sink_config(&redis.url());
    config.publish = false;
    let sink = config.clone();
    let env = Env::start(
        frames,
        sluice::upstream::replay::Speed::Factor(0.1),
        false,
        move |c| c.redis_sink = Some(sink),
    )
    .await;
    let mut ws = wire_common::connect(&env.url(&format!("{V2_PATH}?cursor=0"))).await;
    let mut received = 0u64;
    let mut last_seq = 0u64;
    for seq in read_for(&mut ws, Instant::now() + Duration::from_millis(800)).await {
        assert!(seq > last_seq, "in order");
        (last_seq, received) = (seq, received + 1);
    }
    assert!(received > 0, "events flow before the outage");

    redis.kill9();
    let outage = Instant::now();
    let before = received;
    for seq in read_for(&mut ws, Instant::now() + Duration::from_millis(1500)).await {
        assert!(seq > last_seq, "in order");
        (last_seq, received) = (seq, received + 1);
    }
    assert!(
        received > before,
        "the subscriber kept receiving while Redis was away ({before} -> {received})"
    );
    let admin = env.daemon.admin_addr;
    let (status, _, body) = http_get(admin, "/readyz").await;
    let body = String::from_utf8_lossy(&body).into_owned();
    assert_eq!(status, 200, "Redis does not decide readiness: {body}");
    assert!(body.contains("redis sink: disconnected"), "{body}");
    let (_, _, metrics) = http_get(admin, "/metrics").await;
    let metrics = String::from_utf8_lossy(&metrics).into_owned();
    assert!(
        metrics.contains("sluice_redis_sink_connected 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("sluice_redis_sink_lag_events"),
        "{metrics}"
    );
    let errors: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("sluice_redis_sink_errors_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(errors > 0, "the outage is counted:\n{metrics}");

    // The rest of the 30 s: the subscriber keeps receiving, second after second.
    while outage.elapsed() < Duration::from_secs(30) {
        let before = received;
        for seq in read_for(&mut ws, Instant::now() + Duration::from_secs(5)).await {
            assert!(seq > last_seq, "in order");
            (last_seq, received) = (seq, received + 1);
        }
        assert!(
            received > before,
            "the subscriber received nothing for 5 s, {:?} into the Redis outage",
            outage.elapsed()
        );
    }
    let (_, _, metrics) = http_get(admin, "/metrics").await;
    let metrics = String::from_utf8_lossy(&metrics).into_owned();
    let lag: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("sluice_redis_sink_lag_events "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    assert!(
        lag > 100.0,
        "after 30 s without Redis the sink is behind the log:\n{metrics}"
    );

    redis.restart();
    env.wait_all_ingested().await;
    let newest = env.daemon.log.reader().newest_seq();
    let deadline = Instant::now() + Duration::from_secs(30);
    while last_seq < newest {
        assert!(
            Instant::now() < deadline,
            "subscriber reached {last_seq} of {newest}"
        );
        for seq in read_for(&mut ws, Instant::now() + Duration::from_millis(300)).await {
            assert!(seq > last_seq, "in order");
            last_seq = seq;
        }
    }
    let mut con = connect(&redis.url()).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while position(&mut con, &config).await < newest {
        assert!(
            Instant::now() < deadline,
            "the sink caught up after Redis came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, _, body) = http_get(admin, "/readyz").await;
    let body = String::from_utf8_lossy(&body).into_owned();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("redis sink: connected, 0 events"), "{body}");
    assert_streams_match(&mut con, &config, &all_events(&env.daemon.log.reader())).await;
    // Where the sink's time went is counted: its writes and batches, and the backoff it
    // waited out while Redis was away.
    let (_, _, metrics) = http_get(admin, "/metrics").await;
    let metrics = String::from_utf8_lossy(&metrics).into_owned();
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} is exported:\n{metrics}"))
    };
    assert!(value("sluice_redis_sink_batches_total") > 0.0, "{metrics}");
    for part in ["write", "backoff"] {
        assert!(
            value(&format!(
                "sluice_redis_sink_time_microseconds_total{{part=\"{part}\"}}"
            )) > 0.0,
            "the sink's {part} time is counted:\n{metrics}"
        );
    }
    assert!(
        metrics.contains("sluice_redis_sink_time_microseconds_total{part=\"read_wait\"}"),
        "{metrics}"
    );

    // The status page shows the sink (rendered by a real browser).
    let url = format!("http://{admin}/");
    let profile = tempfile::tempdir().unwrap();
    let dom = tokio::task::spawn_blocking(move || {
        Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
            ])
            .args([
                "--disable-background-networking",
                "--virtual-time-budget=4000",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("--dump-dom")
            .arg(&url)
            .output()
            .expect("chromium is required (Debian package `chromium`; .ci/run installs it)")
    })
    .await
    .unwrap();
    let dom = String::from_utf8_lossy(&dom.stdout);
    assert!(
        dom.contains(&format!(
            "<td>position (seq)</td><td class=\"n\">{}</td>",
            fmt_thousands(newest)
        )),
        "the status page shows the sink at its position: {dom}"
    );
}

/// `n` as the status page prints it (en-US thousands separators).
fn fmt_thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The seqs of the v2 messages a subscriber reads until `until`.
async fn read_for(ws: &mut wire_common::Ws, until: Instant) -> Vec<u64> {
    let mut got = Vec::new();
    while Instant::now() < until {
        match wire_common::next(ws, Duration::from_millis(200)).await {
            wire_common::Got::Text(t) => got.push(wire_common::scan_u64(&t, "seq").unwrap_or(0)),
            wire_common::Got::Timeout => {}
            other => panic!("the subscriber lost its stream: {other:?}"),
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_redis_refuses_is_counted_as_rejected_not_as_a_repeat() {
    let _machine = crate::exclusive::shared().await;
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = Log::open(LogConfig::new(dir.path())).unwrap();
    let events = ingest_all(&corpus_and_edges());
    let newest = events.last().unwrap().seq;
    let identities = events
        .iter()
        .filter(|e| e.kind == EventKind::Identity)
        .count() as u64;
    assert!(identities > 0);
    log.append(events).unwrap();
    assert!(log.flush(Duration::from_secs(10)));
    let config = sink_config(&redis.url());
    let mut con = connect(&redis.url()).await;
    // Someone else's string where the identity stream belongs.
    let _: () = redis::cmd("SET")
        .arg("sluice:k:identity")
        .arg("not a stream")
        .query_async(&mut con)
        .await
        .unwrap();
    let sink = sluice::sink::start(log.reader(), config.clone()).unwrap();
    wait_for_position(&sink.stats, newest, Duration::from_secs(20)).await;
    assert_eq!(sink.stats.rejected.load(Ordering::Relaxed), identities);
    assert_eq!(sink.stats.duplicates.load(Ordering::Relaxed), 0);
    let account = xrange(&mut con, "sluice:k:account").await;
    assert!(!account.is_empty(), "the other streams are written");
    sink.shutdown(Duration::from_secs(5)).await;
}

/// A `sluice serve` child that joins cluster `sinks` on `redis` and runs the sink there too.
fn spawn_node(id: &str, upstream: &str, dir: &std::path::Path, redis: &str, admin: u16) -> Serve {
    let data = dir.join(id);
    let child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["serve", "--upstream", upstream, "--data-dir"])
        .arg(&data)
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
        .args([
            "--redis",
            redis,
            "--cluster",
            "sinks",
            "--cluster-node-id",
            id,
        ])
        // A TTL a loaded machine's delayed renewal does not lapse before the kill.
        .args(["--lease-ttl-ms", "2000", "--standby-poll-ms", "100"])
        // Apart from the cluster's own keys (`sluice:{sinks}:...`).
        .args(["--redis-sink", redis, "--redis-sink-all"])
        .args(["--redis-sink-prefix", "fire:"])
        .args(["--redis-sink-batch-events", "200"])
        .args(["--redis-sink-timeout-ms", "1000"])
        .args(["--commit-interval-ms", "20"])
        .args(["--backoff-min-ms", "20", "--backoff-max-ms", "200"])
        .args(["--log-filter", "sluice=info"])
        .stdout(Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(data.with_extension("log"))
                .unwrap(),
        )
        .spawn()
        .unwrap();
    Serve(child)
}

/// Two cluster nodes on one Redis, both configured with the sink: only the holder of the
/// cluster's sink lease writes; SIGKILLed mid-stream, the other node takes the lease over
/// and continues from the stored position, so every stream holds each event once, in
/// order, with nothing missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_cluster_one_node_sinks_and_another_takes_over_without_gap_or_repeat() {
    let _machine = crate::exclusive::shared().await;
    use sluice::upstream::replay::{self, Listen, ReplayOptions, ReplaySource, Speed};
    use sluice::upstream::synth::{generate, SynthOptions};
    let redis = RedisServer::start();
    let frames: Vec<Bytes> = generate(&SynthOptions {
        count: 3000,
        seed: 21,
        ..SynthOptions::default()
    })
    .into_iter()
    .map(Bytes::from)
    .collect();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = format!("ws://{}", listener.local_addr().unwrap());
    tokio::spawn(replay::serve(ReplayOptions {
        frames: ReplaySource::Frames(frames.clone()),
        listen: Listen::Listener(listener),
        // ~7 s of frames: the kill lands while they are still arriving.
        speed: Speed::Factor(1.0),
        looped: false,
    }));
    let dir = tempfile::tempdir().unwrap();
    let ids = ["a", "b"];
    let admins = [free_port(), free_port()];
    let mut nodes: Vec<Option<Serve>> = ids
        .iter()
        .zip(admins)
        .map(|(id, admin)| Some(spawn_node(id, &upstream, dir.path(), &redis.url(), admin)))
        .collect();
    let logs = || {
        ids.iter()
            .map(|id| std::fs::read_to_string(dir.path().join(id).with_extension("log")))
            .filter_map(Result::ok)
            .collect::<Vec<_>>()
            .join("\n----\n")
    };
    // Watch both nodes for a while once one sinks: exactly one is active, and the other
    // has written nothing.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut holder = None;
    let mut samples = 0;
    while samples < 10 {
        assert!(
            Instant::now() < deadline,
            "one node sinks within 60 s\n{}",
            logs()
        );
        let a = status_json(admins[0]).await;
        let b = status_json(admins[1]).await;
        let active = |s: &serde_json::Value| s["redis_sink"]["active"] == true;
        let written = |s: &serde_json::Value| s["redis_sink"]["events"].as_u64().unwrap_or(0);
        if a.is_null() || b.is_null() || !(active(&a) || active(&b)) {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        assert!(!(active(&a) && active(&b)), "both nodes sink: {a} {b}");
        let (h, other) = if active(&a) { (0, &b) } else { (1, &a) };
        assert!(holder.is_none() || holder == Some(h), "the lease moved");
        holder = Some(h);
        assert_eq!(
            written(other),
            0,
            "the node without the lease writes nothing: {other}"
        );
        samples += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let h = holder.unwrap();
    let survivor = 1 - h;
    // Kill the holder while it is writing.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = status_json(admins[h]).await;
        if s["redis_sink"]["events"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the holder writes\n{}", logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut killed = nodes[h].take().unwrap();
    killed.0.kill().unwrap(); // SIGKILL
    killed.0.wait().unwrap();
    let mut con = connect(&redis.url()).await;
    let config = RedisSinkConfig {
        all_stream: true,
        prefix: "fire:".into(),
        ..RedisSinkConfig::new(redis.url())
    };
    let at_kill = position(&mut con, &config).await;
    assert!(at_kill > 0, "the holder had written before it died");
    // The survivor takes over the lease (and ingest, if the dead node led) and sinks
    // everything the upstream sends.
    let mut ingestor = Ingestor::new(StampState::fresh(), DecodeLimits::default());
    let total: u64 = frames
        .iter()
        .map(
            |f| match ingestor.ingest(f.clone(), 1_900_000_000_000_000) {
                IngestOutcome::Events(e) => e.len() as u64,
                _ => 0,
            },
        )
        .sum();
    let deadline = Instant::now() + Duration::from_secs(90);
    let newest = loop {
        assert!(
            Instant::now() < deadline,
            "the survivor sinks everything within 90 s\n{}",
            logs()
        );
        let s = status_json(admins[survivor]).await;
        let sink_pos = s["redis_sink"]["position"].as_u64();
        let newest = s["log"]["bounds"]["newest_seq"].as_u64();
        if newest == Some(total) && s["redis_sink"]["active"] == true && sink_pos == newest {
            break total;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let s = status_json(admins[survivor]).await;
    assert!(
        s["redis_sink"]["events"].as_u64().unwrap_or(0) > 0,
        "the survivor wrote after the takeover: {s}"
    );
    assert_eq!(s["redis_sink"]["duplicates"], 0, "{s}");
    let mut survivor_node = nodes[survivor].take().unwrap();
    Command::new("kill")
        .args(["-TERM", &survivor_node.0.id().to_string()])
        .status()
        .unwrap();
    assert!(survivor_node.0.wait().unwrap().success(), "{}", logs());
    let (log, _) = Log::open(LogConfig::new(dir.path().join(ids[survivor]))).unwrap();
    let events = all_events(&log.reader());
    assert_eq!(events.last().unwrap().seq, newest);
    assert_eq!(position(&mut con, &config).await, newest);
    assert!(at_kill < newest, "the survivor had work left to take over");
    assert_streams_match(&mut con, &config, &events).await;
}

/// The cluster's named lease on its own: of two keepers exactly one holds it, a release
/// hands it to the other at once under a higher epoch, and a keeper whose lease was taken
/// from it in Redis says so. The function library is not loaded beforehand: the keepers
/// load it themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_lease_has_one_holder_passes_on_release_and_is_lost_when_taken() {
    let _machine = crate::exclusive::shared().await;
    use sluice::cluster::{ClusterConfig, NamedLease};
    let redis = RedisServer::start();
    let keeper = |node: &str| {
        let mut c = ClusterConfig::new(redis.url(), "leases", node);
        // Long enough that a renewal delayed on a loaded machine does not lapse it.
        c.lease_ttl = Duration::from_millis(3000);
        c.standby_poll = Duration::from_millis(50);
        NamedLease::start(&c, "sink").unwrap()
    };
    let a = keeper("a");
    let b = keeper("b");
    let (ra, rb) = (a.subscribe(), b.subscribe());
    let held = |r: &tokio::sync::watch::Receiver<Option<u64>>| *r.borrow();
    let deadline = Instant::now() + Duration::from_secs(20);
    while held(&ra).is_none() && held(&rb).is_none() {
        assert!(Instant::now() < deadline, "nobody took the lease");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Over a TTL and more: never both, and never the other while the first renews.
    let first_a = held(&ra).is_some();
    for _ in 0..40 {
        let (ha, hb) = (held(&ra), held(&rb));
        assert!(
            ha.is_none() || hb.is_none(),
            "both hold: a {ha:?}, b {hb:?}"
        );
        let other_holds = if first_a { hb.is_some() } else { ha.is_some() };
        assert!(
            !other_holds,
            "the lease moved while renewed: a {ha:?}, b {hb:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let first_epoch = if first_a { held(&ra) } else { held(&rb) }.unwrap();
    let (holder, other, r_other) = if first_a { (a, b, rb) } else { (b, a, ra) };
    holder.shutdown().await;
    // Released, not expired: taken within a few polls (bound: far above one TTL).
    let deadline = Instant::now() + Duration::from_secs(10);
    while held(&r_other).is_none() {
        assert!(
            Instant::now() < deadline,
            "the other keeper took the released lease"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let second_epoch = held(&r_other).unwrap();
    assert!(second_epoch > first_epoch, "{second_epoch} > {first_epoch}");
    assert_eq!(other.takeovers.load(Ordering::Relaxed), 1);
    // Someone else takes the lease in Redis: the keeper's next renewal is fenced.
    redis.command(&[
        "HSET",
        "sluice:{leases}:lease:sink",
        "node",
        "x",
        "epoch",
        "999999",
    ]);
    redis.command(&["PERSIST", "sluice:{leases}:lease:sink"]); // x holds it for good
    let deadline = Instant::now() + Duration::from_secs(10);
    while held(&r_other).is_some() {
        assert!(
            Instant::now() < deadline,
            "the keeper noticed it lost the lease"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(held(&r_other), None, "held by x, not retaken");
    other.shutdown().await;
}
