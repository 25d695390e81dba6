//! Ingest of frames the real corpus does not contain: `tooBig` commits, creates whose record
//! block is missing, `#sync`, unknown types, error frames and `#info`.

use base64::Engine;
use bytes::Bytes;
use serde_json::{json, Value};
use sluice::decode::dagcbor_encode::encode_dag_cbor;
use sluice::decode::DecodeLimits;
use sluice::event::{EventKind, StampState};
use sluice::ingest::{IngestOutcome, Ingestor};

const DID: &str = "did:plc:edgecaseaaaaaaaaaaaaaaaa";
const CID: &str = "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm";

fn frame(t: &str, body: Value) -> Bytes {
    let mut bytes = encode_dag_cbor(&json!({"op": 1, "t": t})).unwrap();
    bytes.extend(encode_dag_cbor(&body).unwrap());
    Bytes::from(bytes)
}

/// A CARv1 with a header and no blocks.
fn empty_car() -> Value {
    let header = encode_dag_cbor(&json!({"roots": [{"$link": CID}], "version": 1})).unwrap();
    let mut car = vec![u8::try_from(header.len()).unwrap()];
    car.extend(header);
    json!({"$bytes": base64::engine::general_purpose::STANDARD_NO_PAD.encode(car)})
}

fn commit(seq: i64, too_big: bool) -> Bytes {
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
}

fn ingest(frame: Bytes) -> (IngestOutcome, Ingestor) {
    let mut ingestor = Ingestor::new(StampState::fresh(), DecodeLimits::default());
    let outcome = ingestor.ingest(frame, 1_900_000_000_000_000);
    (outcome, ingestor)
}

fn parse(bytes: &Option<Bytes>) -> Value {
    serde_json::from_slice(bytes.as_ref().expect("encoded")).unwrap()
}

#[test]
fn a_create_without_its_block_still_yields_a_marked_event() {
    let (outcome, ingestor) = ingest(commit(7, false));
    let IngestOutcome::Events(events) = outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(events.len(), 2);
    assert_eq!(ingestor.stats().records_missing, 1);
    let v1 = parse(&events[0].v1_json);
    assert_eq!(v1["commit"]["operation"], "create");
    assert_eq!(v1["commit"]["recordMissing"], true);
    assert!(v1["commit"].get("record").is_none());
    assert_eq!(v1["commit"]["cid"], CID);
    let v1_delete = parse(&events[1].v1_json);
    assert_eq!(v1_delete["commit"]["operation"], "delete");
    assert!(v1_delete["commit"].get("recordMissing").is_none());
}

#[test]
fn a_too_big_commit_becomes_one_event_naming_repo_rev_and_paths() {
    let (outcome, ingestor) = ingest(commit(8, true));
    let IngestOutcome::Events(events) = outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].kind, EventKind::CommitTooBig);
    assert_eq!(ingestor.stats().too_big_commits, 1);
    assert!(
        events[0].v1_json.is_none(),
        "strict v1 clients reject unknown kinds"
    );
    let v2 = parse(&events[0].v2_json);
    let p = &v2["payload"];
    assert_eq!(p["did"], DID);
    assert_eq!(p["rev"], "3mptbyplj5d2a");
    assert_eq!(p["ops"][0]["path"], "app.bsky.feed.post/3mptbyplj5d2a");
    assert_eq!(p["ops"][1]["operation"], "delete");
}

#[test]
fn sync_is_v2_only_and_unknown_types_are_carried_on_the_raw_wire() {
    let sync = frame(
        "#sync",
        json!({"did": DID, "seq": 9, "time": "2026-07-04T14:39:14.000Z",
               "rev": "3mptbyplj5d2a", "blocks": empty_car()}),
    );
    let (IngestOutcome::Events(events), _) = ingest(sync) else {
        panic!()
    };
    assert_eq!(events[0].kind, EventKind::Sync);
    assert!(events[0].v1_json.is_none());
    assert_eq!(
        parse(&events[0].v2_json)["payload"]["sync"]["rev"],
        "3mptbyplj5d2a"
    );

    let unknown = frame(
        "#futureThing",
        json!({"did": DID, "seq": 10, "novel": [1, 2]}),
    );
    let (IngestOutcome::Events(events), ingestor) = ingest(unknown.clone()) else {
        panic!()
    };
    assert_eq!(events[0].kind, EventKind::Unknown);
    assert_eq!(ingestor.stats().unknown_types, 1);
    assert!(events[0].v1_json.is_none() && events[0].v2_json.is_none());
    assert_eq!(sluice::wire::raw::frame_of(&events[0]), Some(&unknown));
}

#[test]
fn error_frames_and_info_are_reported_not_stamped() {
    let mut error = encode_dag_cbor(&json!({"op": -1})).unwrap();
    error.extend(encode_dag_cbor(&json!({"error": "FutureCursor", "message": "ahead"})).unwrap());
    let (outcome, ingestor) = ingest(Bytes::from(error));
    assert!(
        matches!(&outcome, IngestOutcome::ErrorFrame { error, message } if error == "FutureCursor" && message.as_deref() == Some("ahead")),
        "{outcome:?}"
    );
    assert_eq!(ingestor.state().next_seq, 1);

    let info = frame(
        "#info",
        json!({"name": "OutdatedCursor", "message": "too old"}),
    );
    let (outcome, ingestor) = ingest(info);
    assert!(
        matches!(&outcome, IngestOutcome::Info { name, .. } if name == "OutdatedCursor"),
        "{outcome:?}"
    );
    assert_eq!(ingestor.state().next_seq, 1);
}

#[test]
fn garbage_is_a_counted_decode_error() {
    let (outcome, ingestor) = ingest(Bytes::from_static(&[0xa2, 0x61, 0x74, 0xff, 0x00]));
    assert!(
        matches!(outcome, IngestOutcome::DecodeFailed(_)),
        "{outcome:?}"
    );
    assert_eq!(ingestor.stats().decode_errors, 1);
}
