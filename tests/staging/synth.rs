//! Synthetic frames: deterministic, structurally valid subscribeRepos frames with real CARs,
//! the traffic mix we claim, and a committed fixture that cannot drift from the generator.

use std::collections::{BTreeMap, HashSet};

use ciborium::Value;
use cid::Cid;
use sluice::upstream::capture;
use sluice::upstream::synth::{self, SynthOptions};

/// Decodes one CBOR value from the front of `buf`, advancing it.
fn take_value(buf: &mut &[u8]) -> Value {
    ciborium::de::from_reader(buf).expect("a CBOR value")
}

fn split_frame(frame: &[u8]) -> (Value, Value) {
    let mut rest = frame;
    let header = take_value(&mut rest);
    let body = take_value(&mut rest);
    assert!(rest.is_empty(), "trailing bytes after the body");
    (header, body)
}

fn field<'a>(map: &'a Value, key: &str) -> Option<&'a Value> {
    map.as_map()?
        .iter()
        .find(|(k, _)| k.as_text() == Some(key))
        .map(|(_, v)| v)
}

fn text<'a>(map: &'a Value, key: &str) -> &'a str {
    field(map, key)
        .and_then(Value::as_text)
        .unwrap_or_else(|| panic!("text field {key}"))
}

fn uint(map: &Value, key: &str) -> u64 {
    let v = field(map, key)
        .and_then(Value::as_integer)
        .expect("int field");
    u64::try_from(v).expect("non-negative")
}

fn link(v: &Value) -> Option<Cid> {
    match v {
        Value::Tag(42, inner) => {
            let bytes = inner.as_bytes()?;
            assert_eq!(bytes.first(), Some(&0), "CID link must start with 0x00");
            Some(Cid::try_from(&bytes[1..]).expect("valid CID"))
        }
        _ => None,
    }
}

/// DAG-CBOR canonical key order, checked recursively: length first, then bytes.
fn assert_canonical_keys(v: &Value) {
    match v {
        Value::Map(pairs) => {
            let keys: Vec<&str> = pairs
                .iter()
                .map(|(k, _)| k.as_text().expect("text keys only"))
                .collect();
            for w in keys.windows(2) {
                let ordered = (w[0].len(), w[0].as_bytes()) < (w[1].len(), w[1].as_bytes());
                assert!(ordered, "keys out of canonical order: {:?}", keys);
            }
            pairs.iter().for_each(|(_, v)| assert_canonical_keys(v));
        }
        Value::Array(items) => items.iter().for_each(assert_canonical_keys),
        Value::Tag(t, inner) => {
            assert_eq!(*t, 42, "only tag 42 is allowed");
            assert_canonical_keys(inner);
        }
        Value::Float(_) => panic!("floats are not allowed in atproto data"),
        _ => {}
    }
}

fn read_uvarint(buf: &mut &[u8]) -> u64 {
    let mut n = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = buf.split_first().expect("varint byte");
        *buf = rest;
        n |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return n;
        }
    }
    panic!("varint too long");
}

/// Parses a CARv1, checking every block's CID is the sha2-256 of its bytes.
fn parse_car(car: &[u8]) -> (Vec<Cid>, BTreeMap<Cid, Vec<u8>>) {
    let mut rest = car;
    let hlen = read_uvarint(&mut rest) as usize;
    let (hbytes, tail) = rest.split_at(hlen);
    rest = tail;
    let mut hslice = hbytes;
    let header = take_value(&mut hslice);
    assert!(hslice.is_empty());
    assert_canonical_keys(&header);
    assert_eq!(uint(&header, "version"), 1);
    let roots: Vec<Cid> = field(&header, "roots")
        .and_then(Value::as_array)
        .expect("roots")
        .iter()
        .map(|v| link(v).expect("root link"))
        .collect();
    let mut blocks = BTreeMap::new();
    while !rest.is_empty() {
        let len = read_uvarint(&mut rest) as usize;
        let (section, tail) = rest.split_at(len);
        rest = tail;
        let mut cursor = std::io::Cursor::new(section);
        let cid = Cid::read_bytes(&mut cursor).expect("section CID");
        let data = &section[cursor.position() as usize..];
        assert_eq!(cid.version(), cid::Version::V1);
        assert_eq!(cid.codec(), synth::CODEC_DAG_CBOR);
        assert_eq!(
            cid,
            synth::cid_for(synth::CODEC_DAG_CBOR, data),
            "block CID is not the sha2-256 of its bytes"
        );
        let mut d = data;
        let block = take_value(&mut d);
        assert!(d.is_empty(), "trailing bytes in a block");
        assert_canonical_keys(&block);
        blocks.insert(cid, data.to_vec());
    }
    (roots, blocks)
}

fn is_plc_did(s: &str) -> bool {
    s.strip_prefix("did:plc:").is_some_and(|id| {
        id.len() == 24
            && id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b))
    })
}

fn is_tid(s: &str) -> bool {
    s.len() == 13
        && s.bytes()
            .all(|b| b"234567abcdefghijklmnopqrstuvwxyz".contains(&b))
}

#[derive(Default)]
struct Tally {
    ops_by_collection: BTreeMap<String, u64>,
    creates: u64,
    updates: u64,
    deletes: u64,
    kinds: BTreeMap<String, u64>,
    with_embed_blob: u64,
}

/// Validates one frame in full and adds it to the tally; returns (seq, time).
fn check_frame(frame: &[u8], tally: &mut Tally) -> (u64, String) {
    let (header, body) = split_frame(frame);
    assert_canonical_keys(&header);
    assert_canonical_keys(&body);
    assert_eq!(uint(&header, "op"), 1);
    let t = text(&header, "t").to_owned();
    *tally.kinds.entry(t.clone()).or_default() += 1;
    let seq = uint(&body, "seq");
    let time = text(&body, "time").to_owned();
    assert!(time.ends_with('Z') && time.len() == 24, "time {time}");
    match t.as_str() {
        "#commit" => check_commit(&body, tally),
        "#identity" => {
            assert!(is_plc_did(text(&body, "did")));
            assert!(text(&body, "handle").ends_with(".bsky.social"));
        }
        "#account" => {
            assert!(is_plc_did(text(&body, "did")));
            let active = field(&body, "active")
                .and_then(Value::as_bool)
                .expect("active");
            assert_eq!(field(&body, "status").is_some(), !active);
        }
        "#sync" => {
            assert!(is_tid(text(&body, "rev")));
            let car = field(&body, "blocks")
                .and_then(Value::as_bytes)
                .expect("blocks");
            let (roots, blocks) = parse_car(car);
            assert_eq!(roots.len(), 1);
            assert_eq!(blocks.len(), 1, "a #sync CAR holds only the commit block");
            assert!(blocks.contains_key(&roots[0]));
        }
        other => panic!("unexpected frame type {other}"),
    }
    (seq, time)
}

fn check_commit(body: &Value, tally: &mut Tally) {
    let keys: HashSet<&str> = body
        .as_map()
        .expect("map")
        .iter()
        .filter_map(|(k, _)| k.as_text())
        .collect();
    let expected: HashSet<&str> = [
        "repo", "rev", "since", "commit", "blocks", "ops", "prevData", "tooBig", "rebase", "blobs",
        "seq", "time",
    ]
    .into_iter()
    .collect();
    assert_eq!(keys, expected);
    let repo = text(body, "repo");
    assert!(is_plc_did(repo), "{repo}");
    assert_eq!(field(body, "tooBig").and_then(Value::as_bool), Some(false));
    assert_eq!(field(body, "rebase").and_then(Value::as_bool), Some(false));
    let rev = text(body, "rev");
    assert!(is_tid(rev));
    if let Some(Value::Text(since)) = field(body, "since") {
        assert!(since.as_str() < rev, "since {since} must precede rev {rev}");
    }
    assert!(link(field(body, "prevData").expect("prevData")).is_some());
    let commit_cid = link(field(body, "commit").expect("commit")).expect("commit link");
    let car = field(body, "blocks")
        .and_then(Value::as_bytes)
        .expect("blocks");
    let (roots, blocks) = parse_car(car);
    assert_eq!(roots, vec![commit_cid]);

    let mut commit_bytes = blocks
        .get(&commit_cid)
        .expect("commit block in CAR")
        .as_slice();
    let commit = take_value(&mut commit_bytes);
    assert_eq!(text(&commit, "did"), repo);
    assert_eq!(text(&commit, "rev"), rev);
    assert_eq!(uint(&commit, "version"), 3);
    assert!(matches!(field(&commit, "prev"), Some(Value::Null)));
    assert_eq!(
        field(&commit, "sig")
            .and_then(Value::as_bytes)
            .map(Vec::len),
        Some(64)
    );
    let data = link(field(&commit, "data").expect("data")).expect("data link");
    let mut root_bytes = blocks.get(&data).expect("MST root in CAR").as_slice();
    let root = take_value(&mut root_bytes);
    let entries = field(&root, "e")
        .and_then(Value::as_array)
        .expect("entries");
    assert!(!entries.is_empty());
    for e in entries {
        assert!(field(e, "p").and_then(Value::as_integer).is_some());
        assert!(field(e, "k").and_then(Value::as_bytes).is_some());
        assert!(link(field(e, "v").expect("v")).is_some());
    }

    let ops = field(body, "ops").and_then(Value::as_array).expect("ops");
    assert!(!ops.is_empty() && ops.len() <= 200);
    for op in ops {
        let path = text(op, "path");
        let (collection, rkey) = path.split_once('/').expect("collection/rkey");
        *tally
            .ops_by_collection
            .entry(collection.to_owned())
            .or_default() += 1;
        match text(op, "action") {
            "create" | "update" => {
                if text(op, "action") == "create" {
                    tally.creates += 1;
                    assert!(field(op, "prev").is_none(), "creates carry no prev");
                } else {
                    tally.updates += 1;
                    assert!(link(field(op, "prev").expect("prev")).is_some());
                }
                let cid = link(field(op, "cid").expect("cid")).expect("cid link");
                let mut rec_bytes = blocks.get(&cid).expect("op record in CAR").as_slice();
                let record = take_value(&mut rec_bytes);
                assert_eq!(text(&record, "$type"), collection);
                if collection == "app.bsky.actor.profile" {
                    assert_eq!(rkey, "self");
                } else {
                    assert!(is_tid(rkey), "{rkey}");
                    assert!(text(&record, "createdAt").ends_with('Z'));
                }
                if collection == "app.bsky.feed.post" {
                    let t = text(&record, "text");
                    assert!(!t.is_empty() && t.len() <= 3000);
                    if let Some(embed) = field(&record, "embed") {
                        if text(embed, "$type") == "app.bsky.embed.images" {
                            tally.with_embed_blob += 1;
                            let images = field(embed, "images").and_then(Value::as_array);
                            let blob = field(&images.expect("images")[0], "image").expect("blob");
                            assert_eq!(text(blob, "$type"), "blob");
                            let r = link(field(blob, "ref").expect("ref")).expect("ref link");
                            assert_eq!(r.codec(), synth::CODEC_RAW);
                        }
                    }
                }
            }
            "delete" => {
                tally.deletes += 1;
                assert!(matches!(field(op, "cid"), Some(Value::Null)));
                assert!(link(field(op, "prev").expect("prev")).is_some());
            }
            other => panic!("unexpected action {other}"),
        }
    }
}

fn check_all(frames: &[Vec<u8>]) -> Tally {
    let mut tally = Tally::default();
    let mut last: Option<(u64, String)> = None;
    for frame in frames {
        let (seq, time) = check_frame(frame, &mut tally);
        if let Some((last_seq, last_time)) = &last {
            assert!(seq > *last_seq, "seq must increase strictly");
            assert!(time > *last_time, "time must increase");
        }
        last = Some((seq, time));
    }
    tally
}

#[test]
fn deterministic_from_seed() {
    let opts = SynthOptions {
        count: 300,
        ..SynthOptions::default()
    };
    let a = synth::generate(&opts);
    let b = synth::generate(&opts);
    assert_eq!(a.len(), 300);
    assert_eq!(a, b);
    let c = synth::generate(&SynthOptions { seed: 2, ..opts });
    assert_ne!(a, c);
}

#[test]
fn frames_are_valid_and_start_where_asked() {
    let opts = SynthOptions {
        seed: 7,
        count: 2000,
        start_seq: 42,
        start_time_ms: 1_700_000_000_000,
        dids: 300,
    };
    let frames = synth::generate(&opts);
    let (_, first) = split_frame(&frames[0]);
    assert_eq!(uint(&first, "seq"), 42);
    assert_eq!(text(&first, "time"), "2023-11-14T22:13:20.000Z");
    check_all(&frames);
}

#[test]
fn traffic_mix_within_tolerance() {
    let opts = SynthOptions {
        seed: 11,
        count: 10_000,
        ..SynthOptions::default()
    };
    let tally = check_all(&synth::generate(&opts));
    let total: u64 = tally.ops_by_collection.values().sum();
    let share =
        |c: &str| tally.ops_by_collection.get(c).copied().unwrap_or(0) as f64 / total as f64;
    let within = |c: &str, want: f64, tol: f64| {
        let got = share(c);
        assert!((got - want).abs() <= tol, "{c}: {got:.4} vs {want}");
    };
    within("app.bsky.feed.like", 0.70, 0.02);
    within("app.bsky.feed.post", 0.12, 0.015);
    within("app.bsky.feed.repost", 0.10, 0.015);
    within("app.bsky.graph.follow", 0.06, 0.01);
    within("app.bsky.graph.block", 0.01, 0.005);
    within("app.bsky.actor.profile", 0.01, 0.005);
    let deletes = tally.deletes as f64 / total as f64;
    assert!((0.03..=0.07).contains(&deletes), "deletes {deletes:.4}");
    assert!(tally.updates > 0 && tally.creates > 0);
    assert!(tally.with_embed_blob > 0);
    for kind in ["#commit", "#identity", "#account", "#sync"] {
        assert!(tally.kinds.get(kind).copied().unwrap_or(0) > 0, "no {kind}");
    }
    let commits = tally.kinds["#commit"] as f64 / opts.count as f64;
    assert!(commits > 0.94, "commits {commits}");
}

#[test]
fn capture_writer_round_trips() {
    let opts = SynthOptions {
        count: 50,
        ..SynthOptions::default()
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("synth.bin");
    assert_eq!(synth::write_capture_file(&opts, &path).expect("write"), 50);
    let back = capture::read_all(&path, 5 << 20).expect("read back");
    assert_eq!(back, synth::generate(&opts));
}

/// `fixtures/synth-1000.bin` must be exactly what the generator makes with the default
/// options. Set `SLUICE_REGENERATE_FIXTURES=1` to rewrite it after an intended change.
#[test]
fn committed_fixture_matches_generator() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/synth-1000.bin");
    let opts = SynthOptions::default();
    if std::env::var_os("SLUICE_REGENERATE_FIXTURES").is_some() {
        synth::write_capture_file(&opts, &path).expect("regenerate fixture");
    }
    let mut expected = Vec::new();
    synth::write_capture(&opts, &mut expected).expect("in-memory capture");
    let committed = std::fs::read(&path).expect("fixtures/synth-1000.bin is committed");
    assert!(
        committed == expected,
        "fixtures/synth-1000.bin drifted from the generator; if the change is intended, \
         rerun with SLUICE_REGENERATE_FIXTURES=1 and commit the result"
    );
    check_all(&capture::read_all(&path, 5 << 20).expect("fixture parses"));
}
