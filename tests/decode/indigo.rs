//! Frames and records from indigo and atproto.dart test data: JSON-form frames are encoded with
//! our DAG-CBOR encoder into binary frames and decoded back; record CARs are converted to JSON
//! and checked against expected JSON and against their CIDs.

use std::path::PathBuf;

use base64::Engine as _;
use serde_json::{json, Value};
use sluice::decode::car::Car;
use sluice::decode::cid::cid_string;
use sluice::decode::dagcbor_encode::{cid_string_for_dag_cbor, encode_dag_cbor};
use sluice::decode::json::{cbor_to_json, record_to_json};
use sluice::decode::{
    decode_frame, Action, Body, DecodeLimits, DecodedFrame, Message, RecordState,
};
use sluice::upstream::capture::upstream_fixtures_dir;

fn fixture(rel: &str) -> PathBuf {
    let p = upstream_fixtures_dir().join(rel);
    assert!(
        p.exists(),
        "upstream fixture missing: {} (set SLUICE_UPSTREAM_FIXTURES)",
        p.display()
    );
    p
}

fn load(p: &std::path::Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).expect("read")).expect("json")
}

fn json_files(rel: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(fixture(rel))
        .expect("dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    v.sort();
    v
}

fn encode_frame(header: &Value, body: &Value) -> Vec<u8> {
    let mut f = encode_dag_cbor(header).expect("header encodes");
    f.extend(encode_dag_cbor(body).expect("body encodes"));
    f
}

fn message(frame: &[u8]) -> Message {
    match decode_frame(frame, &DecodeLimits::default()) {
        Ok(DecodedFrame::Message(m)) => m,
        other => panic!("{other:?}"),
    }
}

fn bytes_len(v: &Value) -> usize {
    base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(v["$bytes"].as_str().expect("$bytes").trim_end_matches('='))
        .expect("base64")
        .len()
}

/// Checks a decoded commit against the JSON body it was encoded from; returns records checked.
fn check_commit(m: &Message, body: &Value, what: &str) -> usize {
    let Body::Commit(c) = &m.body else {
        panic!("{what}: not a commit")
    };
    assert_eq!(m.seq, body["seq"].as_i64(), "{what}");
    assert_eq!(m.did.as_deref(), body["repo"].as_str(), "{what}");
    assert_eq!(c.repo, body["repo"].as_str().expect("repo"), "{what}");
    assert_eq!(c.rev, body["rev"].as_str().expect("rev"), "{what}");
    assert_eq!(c.since.as_deref(), body["since"].as_str(), "{what}");
    assert_eq!(
        c.commit.as_deref(),
        body["commit"]["$link"].as_str(),
        "{what}"
    );
    assert_eq!(
        c.prev_data.as_deref(),
        body["prevData"]["$link"].as_str(),
        "{what}"
    );
    assert_eq!(
        c.too_big,
        body["tooBig"].as_bool().unwrap_or(false),
        "{what}"
    );
    assert_eq!(c.blocks_len, bytes_len(&body["blocks"]), "{what}");
    assert!(m.time_us.is_some(), "{what}");
    let ops = body["ops"].as_array().expect("ops");
    assert_eq!(c.ops.len(), ops.len(), "{what}");
    let mut records = 0;
    for (op, want) in c.ops.iter().zip(ops) {
        assert_eq!(
            op.action.as_str(),
            want["action"].as_str().expect("action"),
            "{what}"
        );
        assert_eq!(
            format!("{}/{}", op.collection, op.rkey),
            want["path"].as_str().expect("path")
        );
        assert_eq!(op.cid.as_deref(), want["cid"]["$link"].as_str(), "{what}");
        assert_eq!(op.prev.as_deref(), want["prev"]["$link"].as_str(), "{what}");
        match (&op.record, op.action) {
            (RecordState::None, Action::Delete) => {}
            (RecordState::Json(j), Action::Create | Action::Update) => {
                let v: Value = serde_json::from_str(j).expect("record JSON");
                let cbor = encode_dag_cbor(&v).expect("record re-encodes");
                assert_eq!(
                    Some(cid_string_for_dag_cbor(&cbor)),
                    op.cid,
                    "{what}: record hash"
                );
                records += 1;
            }
            (r, a) => panic!("{what}: {a:?} with {r:?}"),
        }
    }
    records
}

#[test]
fn relay_scenarios() {
    let files = json_files("indigo/relay-scenarios");
    assert_eq!(files.len(), 7);
    let (mut frames, mut legacy, mut records) = (0, 0, 0);
    for path in files {
        let name = path
            .file_name()
            .and_then(|f| f.to_str())
            .expect("name")
            .to_owned();
        for (i, msg) in load(&path)["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .enumerate()
        {
            let what = format!("{name}[{i}]");
            let (header, body) = (&msg["frame"]["header"], &msg["frame"]["body"]);
            let m = message(&encode_frame(header, body));
            assert_eq!(m.t, header["t"].as_str().expect("t"), "{what}");
            assert_eq!(m.seq, body["seq"].as_i64(), "{what}");
            assert_eq!(m.time.as_deref(), body["time"].as_str(), "{what}");
            if m.t == "#commit" {
                records += check_commit(&m, body, &what);
                if body.get("prevData").is_none() {
                    legacy += 1;
                }
            } else {
                assert_eq!(m.did.as_deref(), body["did"].as_str(), "{what}");
                let Body::Other { json } = &m.body else {
                    panic!("{what}")
                };
                let got: Value = serde_json::from_str(json).expect("body JSON");
                let mut want = body.clone();
                if m.t == "#sync" {
                    let n = bytes_len(&want["blocks"]);
                    let o = want.as_object_mut().expect("object");
                    o.remove("blocks");
                    o.insert("blocksLen".into(), json!(n));
                }
                assert_eq!(got, want, "{what}");
            }
            frames += 1;
        }
    }
    assert_eq!(frames, 35);
    assert_eq!(legacy, 15, "legacy (pre-Sync-1.1) commits");
    assert_eq!(records, 18, "create/update records found and hashed");
}

#[test]
fn firehose_commits_legacy() {
    let files = json_files("indigo/firehose-commits");
    assert_eq!(files.len(), 4);
    let mut op_counts = Vec::new();
    for path in files {
        let body = load(&path);
        let m = message(&encode_frame(&json!({"op": 1, "t": "#commit"}), &body));
        let n = check_commit(&m, &body, &path.display().to_string());
        let Body::Commit(c) = &m.body else {
            unreachable!()
        };
        assert!(c.prev_data.is_none(), "pre-Sync-1.1 commit");
        assert_eq!(n, c.ops.len(), "every op's record found");
        op_counts.push(c.ops.len());
    }
    assert_eq!(op_counts, [1, 1, 42, 1]);
}

#[test]
fn repo_slice_legacy_blob_record() {
    let car = std::fs::read(fixture("indigo/records/repo_slice.car")).expect("car");
    let expected = load(&fixture("indigo/records/repo_slice_record.json"));
    let want_cid = expected["cid"].as_str().expect("cid");
    let car = Car::parse(&car, 64).expect("CAR header");
    let mut found = None;
    for block in car.blocks(1000) {
        let (cid, data) = block.expect("section");
        if cid_string(cid) == want_cid {
            found = Some(record_to_json(data, 64).expect("record"));
        }
    }
    let got: Value = serde_json::from_str(&found.expect("record block present")).expect("json");
    assert_eq!(got, expected["value"]);
    // The legacy blob is a plain map: `{cid: string, mimeType}`.
    assert_eq!(
        got["embed"]["images"][0]["image"]["cid"].as_str(),
        Some("bafkreiblkobl6arfg3j7eft3akdhn2hmr2qmzfkefcgu4agnswvssg4a6a")
    );
}

#[test]
fn record_files_roundtrip_byte_exact() {
    for f in [
        "indigo/records/feedpost_record.cbor",
        "indigo/records/post_richtext_link.cbor",
    ] {
        let cbor = std::fs::read(fixture(f)).expect("read");
        let json = record_to_json(&cbor, 64).unwrap_or_else(|e| panic!("{f}: {e}"));
        let v: Value = serde_json::from_str(&json).expect("json");
        assert_eq!(encode_dag_cbor(&v).expect("encodes"), cbor, "{f}");
    }
}

/// Every DAG-CBOR block of whole-repo exports (records, MST nodes with `$bytes` keys and
/// links, signed commits) converts to JSON that re-encodes to the block's own CID.
#[test]
fn whole_repo_cars_every_block_hashes_back() {
    for (f, expect_blocks) in [
        ("atproto-dart/repo.car", Some(3622)),
        ("jetstream-corpus/repo.car", None),
        ("indigo/records/greenground.repo.car", None),
    ] {
        let bytes = std::fs::read(fixture(f)).expect("read");
        let car = Car::parse(&bytes, 64).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert_eq!(car.roots.len(), 1, "{f}");
        let mut n = 0;
        for block in car.blocks(100_000) {
            let (cid, data) = block.unwrap_or_else(|e| panic!("{f}: {e}"));
            n += 1;
            // Only dag-cbor (0x71) blocks; a raw-codec block would not be CBOR.
            if cid.get(..2) != Some(&[0x01, 0x71]) {
                continue;
            }
            let json = cbor_to_json(data, 64).unwrap_or_else(|e| panic!("{f} block {n}: {e}"));
            let v: Value = serde_json::from_str(&json).expect("json");
            let re = encode_dag_cbor(&v).expect("re-encodes");
            assert_eq!(
                cid_string_for_dag_cbor(&re),
                cid_string(cid),
                "{f} block {n}"
            );
        }
        if let Some(e) = expect_blocks {
            assert_eq!(n, e, "{f}");
        }
    }
    // The jetstream repo's records listed by an independent implementation are all present.
    let car_bytes = std::fs::read(fixture("jetstream-corpus/repo.car")).expect("read");
    let car = Car::parse(&car_bytes, 64).expect("car");
    let have: std::collections::HashSet<String> = car
        .blocks(100_000)
        .map(|b| cid_string(b.expect("block").0))
        .collect();
    let tsv =
        std::fs::read_to_string(fixture("jetstream-corpus/car_expected_records.tsv")).expect("tsv");
    for line in tsv.lines().filter(|l| !l.is_empty()) {
        let cid = line.split('\t').nth(1).expect("cid column");
        assert!(have.contains(cid), "{line}");
    }
}
