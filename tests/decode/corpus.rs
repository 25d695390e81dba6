//! The decoder against 150 real relay frames (jetstream-corpus), checked row by row against an
//! index made by an independent decoder, and every record checked by re-encoding it and
//! hashing it back to its op's CID.

use std::path::PathBuf;

use sluice::decode::dagcbor_encode::{cid_string_for_dag_cbor, encode_dag_cbor};
use sluice::decode::{decode_frame, Action, Body, DecodeLimits, DecodedFrame, RecordState};
use sluice::upstream::capture::{read_all, upstream_fixtures_dir};

fn corpus_dir() -> PathBuf {
    let dir = upstream_fixtures_dir().join("jetstream-corpus");
    assert!(
        dir.is_dir(),
        "upstream fixtures missing at {} (set SLUICE_UPSTREAM_FIXTURES)",
        dir.display()
    );
    dir
}

fn frames() -> Vec<Vec<u8>> {
    read_all(&corpus_dir().join("frames.bin"), 5 << 20).expect("read frames.bin")
}

#[test]
fn every_frame_matches_the_derived_summary() {
    let frames = frames();
    let tsv =
        std::fs::read_to_string(corpus_dir().join("frames-summary.DERIVED.tsv")).expect("tsv");
    let rows: Vec<Vec<&str>> = tsv
        .lines()
        .skip(1)
        .map(|l| l.split('\t').collect())
        .collect();
    assert_eq!(frames.len(), 150);
    assert_eq!(rows.len(), frames.len());
    let limits = DecodeLimits::default();
    for (i, (frame, row)) in frames.iter().zip(&rows).enumerate() {
        assert_eq!(row[0], i.to_string());
        assert_eq!(row[2], frame.len().to_string(), "frame {i} length");
        let DecodedFrame::Message(msg) =
            decode_frame(frame, &limits).unwrap_or_else(|e| panic!("frame {i}: {e}"))
        else {
            panic!("frame {i} is an error frame");
        };
        assert_eq!(
            msg.seq.map(|s| s.to_string()).as_deref(),
            Some(row[3]),
            "frame {i} seq"
        );
        assert_eq!(msg.t, row[4], "frame {i} t");
        assert_eq!(msg.did.as_deref(), Some(row[5]), "frame {i} did");
        assert!(msg.time_us.is_some(), "frame {i} time {:?}", msg.time);
        match &msg.body {
            Body::Commit(c) => {
                assert_eq!(c.blocks_len.to_string(), row[6], "frame {i} blocks_len");
                let ops: Vec<String> = c
                    .ops
                    .iter()
                    .map(|o| format!("{}:{}/{}", o.action.as_str(), o.collection, o.rkey))
                    .collect();
                assert_eq!(ops.join(";"), row[7], "frame {i} ops");
                assert!(c.prev_data.is_some(), "frame {i}: corpus is Sync 1.1");
                assert!(c
                    .commit
                    .as_deref()
                    .is_some_and(|s| s.starts_with("bafyrei")));
            }
            Body::Other { json } => {
                assert_eq!(row[6], "", "frame {i}");
                let v: serde_json::Value = serde_json::from_str(json).expect("body json parses");
                assert_eq!(v["did"].as_str(), Some(row[5]));
                assert_eq!(
                    v["seq"].as_i64().map(|s| s.to_string()).as_deref(),
                    Some(row[3])
                );
            }
        }
    }
}

#[test]
fn counts_match_the_manifest() {
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(corpus_dir().join("manifest.json")).expect("manifest"),
    )
    .expect("manifest json");
    let limits = DecodeLimits::default();
    let (mut commits, mut identity, mut account) = (0, 0, 0);
    let (mut creates, mut updates, mut deletes) = (0, 0, 0);
    for frame in frames() {
        let DecodedFrame::Message(msg) = decode_frame(&frame, &limits).expect("decodes") else {
            panic!("error frame");
        };
        match msg.t.as_str() {
            "#commit" => commits += 1,
            "#identity" => identity += 1,
            "#account" => account += 1,
            t => panic!("unexpected type {t}"),
        }
        if let Body::Commit(c) = msg.body {
            for op in c.ops {
                match op.action {
                    Action::Create => creates += 1,
                    Action::Update => updates += 1,
                    Action::Delete => deletes += 1,
                }
            }
        }
    }
    let n = |k: &str| {
        manifest[k]
            .as_u64()
            .unwrap_or_else(|| panic!("manifest {k}"))
    };
    assert_eq!(commits, n("commit_frames"));
    assert_eq!(identity, n("identity"));
    assert_eq!(account, n("account"));
    assert_eq!(creates, n("creates"));
    assert_eq!(updates, n("updates"));
    assert_eq!(deletes, n("deletes"));
    assert_eq!(
        (commits, identity, account, creates, updates, deletes),
        (148, 1, 1, 144, 2, 4)
    );
}

/// The strongest check available without a second decoder: the JSON we emit, encoded back to
/// canonical DAG-CBOR, must hash to the CID the op names. Any lost or altered field, any
/// mis-rendered `$link` or `$bytes`, would change the hash.
#[test]
fn every_record_reencodes_to_its_cid() {
    let limits = DecodeLimits::default();
    let mut checked = 0;
    for (i, frame) in frames().iter().enumerate() {
        let DecodedFrame::Message(msg) = decode_frame(frame, &limits).expect("decodes") else {
            panic!("error frame");
        };
        let Body::Commit(c) = msg.body else { continue };
        for op in c.ops {
            match (op.action, &op.record) {
                (Action::Delete, RecordState::None) => {
                    assert!(op.prev.is_some(), "frame {i}: Sync 1.1 delete has prev")
                }
                (Action::Delete, r) => panic!("frame {i}: delete with record {r:?}"),
                (_, RecordState::Json(json)) => {
                    let v: serde_json::Value = serde_json::from_str(json).unwrap_or_else(|e| {
                        panic!("frame {i}: record JSON does not parse: {e}\n{json}")
                    });
                    assert!(v.is_object());
                    assert_eq!(
                        v["$type"].as_str(),
                        Some(op.collection.as_str()),
                        "frame {i} $type"
                    );
                    let cbor = encode_dag_cbor(&v).unwrap_or_else(|e| panic!("frame {i}: {e}"));
                    assert_eq!(
                        Some(cid_string_for_dag_cbor(&cbor)),
                        op.cid,
                        "frame {i} {}/{}: record JSON does not hash to its CID\n{json}",
                        op.collection,
                        op.rkey
                    );
                    if op.action == Action::Update {
                        assert!(op.prev.is_some(), "frame {i}: Sync 1.1 update has prev");
                    }
                    checked += 1;
                }
                (_, r) => panic!("frame {i}: create/update without a JSON record: {r:?}"),
            }
        }
    }
    assert_eq!(checked, 146);
}

/// Two independent tokenizers (ciborium-ll in production, the hand-rolled reader) must agree.
#[test]
fn hand_rolled_source_agrees() {
    let limits = DecodeLimits::default();
    for frame in frames() {
        assert_eq!(
            decode_frame(&frame, &limits),
            sluice::decode::decode_frame_hand_rolled(&frame, &limits)
        );
    }
}
