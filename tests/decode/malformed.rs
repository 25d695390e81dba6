//! Hostile and malformed frames: each case asserts the specific error (or the specific
//! degraded result), and the whole file runs in well under a second.

use base64::Engine as _;
use serde_json::{json, Value};
use sluice::decode::dagcbor_encode::{cid_for_dag_cbor, encode_dag_cbor};
use sluice::decode::{
    decode_frame, decode_frame_hand_rolled, Body, DecodeError, DecodeLimits, DecodedFrame,
    RecordState,
};

fn enc(v: &Value) -> Vec<u8> {
    encode_dag_cbor(v).expect("test value encodes")
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn varint(mut n: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(b);
            return out;
        }
        out.push(b | 0x80);
    }
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD_NO_PAD.encode(b)
}

fn link(block: &[u8]) -> Value {
    json!({"$link": cid_for_dag_cbor(block).to_string()})
}

/// A CARv1 with the given blocks, rooted at the first.
fn car(blocks: &[&[u8]]) -> Vec<u8> {
    let root = blocks
        .first()
        .map(|b| link(b))
        .unwrap_or(json!({"$link": "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"}));
    let header = enc(&json!({"roots": [root], "version": 1}));
    let mut out = varint(header.len() as u64);
    out.extend(header);
    for b in blocks {
        let cid = cid_for_dag_cbor(b).to_bytes();
        out.extend(varint((cid.len() + b.len()) as u64));
        out.extend(cid);
        out.extend_from_slice(b);
    }
    out
}

fn commit_header() -> Vec<u8> {
    enc(&json!({"op": 1, "t": "#commit"}))
}

/// A Sync 1.1 style commit body with one create op per record, `blocks` as given.
fn commit_body(records: &[&[u8]], blocks: &[u8]) -> Value {
    let ops: Vec<Value> = records
        .iter()
        .enumerate()
        .map(|(i, r)| json!({"action": "create", "path": format!("app.bsky.feed.like/3k{i}"), "cid": link(r), "prev": null}))
        .collect();
    json!({
        "seq": 7, "rebase": false, "tooBig": false, "repo": "did:plc:x", "rev": "3k", "since": null,
        "commit": {"$link": "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"},
        "prevData": {"$link": "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"},
        "time": "2024-01-01T00:00:00.000Z", "blocks": {"$bytes": b64(blocks)}, "ops": ops, "blobs": []
    })
}

fn like() -> Vec<u8> {
    enc(
        &json!({"$type": "app.bsky.feed.like", "createdAt": "2024-01-01T00:00:00Z",
        "subject": {"uri": "at://did:plc:y/app.bsky.feed.post/3k", "cid": "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"}}),
    )
}

fn good_commit() -> Vec<u8> {
    let rec = like();
    cat(&[&commit_header(), &enc(&commit_body(&[&rec], &car(&[&rec])))])
}

/// Decodes with both tokenizers; they must agree on every input.
fn decode(frame: &[u8]) -> Result<DecodedFrame, DecodeError> {
    decode_with(frame, &DecodeLimits::default())
}

fn decode_with(frame: &[u8], limits: &DecodeLimits) -> Result<DecodedFrame, DecodeError> {
    let a = decode_frame(frame, limits);
    let b = decode_frame_hand_rolled(frame, limits);
    assert_eq!(a, b, "ciborium-ll and hand-rolled readers disagree");
    a
}

fn commit_of(f: Result<DecodedFrame, DecodeError>) -> sluice::decode::Commit {
    match f {
        Ok(DecodedFrame::Message(m)) => match m.body {
            Body::Commit(c) => c,
            b => panic!("not a commit: {b:?}"),
        },
        other => panic!("not a message: {other:?}"),
    }
}

/// A single CBOR head with a 64-bit argument.
fn head8(major: u8, arg: u64) -> Vec<u8> {
    let mut v = vec![(major << 5) | 27];
    v.extend(arg.to_be_bytes());
    v
}

fn other_header() -> Vec<u8> {
    enc(&json!({"op": 1, "t": "#identity"}))
}

#[test]
fn good_commit_decodes() {
    let c = commit_of(decode(&good_commit()));
    assert_eq!(c.ops.len(), 1);
    assert!(matches!(c.ops[0].record, RecordState::Json(_)));
}

#[test]
fn empty_input_is_truncated() {
    assert_eq!(decode(&[]), Err(DecodeError::Truncated));
}

#[test]
fn header_only_is_truncated() {
    assert_eq!(decode(&commit_header()), Err(DecodeError::Truncated));
}

#[test]
fn every_prefix_of_a_frame_fails_cleanly() {
    let frame = good_commit();
    for cut in 0..frame.len() {
        match decode(&frame[..cut]) {
            Err(DecodeError::Truncated) | Err(DecodeError::LengthTooLarge(_)) => {}
            other => panic!("prefix {cut}: {other:?}"),
        }
    }
}

#[test]
fn trailing_bytes_after_body() {
    let mut f = good_commit();
    f.push(0);
    assert_eq!(decode(&f), Err(DecodeError::TrailingBytes(1)));
    f.extend([1, 2, 3]);
    assert_eq!(decode(&f), Err(DecodeError::TrailingBytes(4)));
}

#[test]
fn header_wrong_types() {
    let body = enc(&json!({"did": "did:plc:x", "seq": 1}));
    let cases: &[(Value, &str)] = &[
        (json!([1, "#identity"]), "header is not a map"),
        (json!({"op": "1", "t": "#identity"}), "op is not an integer"),
        (json!({"op": 1, "t": 5}), "t is not text"),
        (json!({"op": 2, "t": "#identity"}), "op is neither 1 nor -1"),
        (json!({"t": "#identity"}), "header without op"),
        (json!({"op": 1}), "message without t"),
    ];
    for (h, why) in cases {
        assert_eq!(
            decode(&cat(&[&enc(h), &body])),
            Err(DecodeError::InvalidHeader(why)),
            "{h}"
        );
    }
    // A non-text key in the header.
    assert_eq!(
        decode(&cat(&[&[0xa1, 0x01, 0x01], &body])),
        Err(DecodeError::InvalidHeader("header key is not text"))
    );
}

#[test]
fn body_wrong_types() {
    let rec = like();
    let mut body = commit_body(&[&rec], &car(&[&rec]));
    let cases: Vec<(&str, Value, &str)> = vec![
        ("repo", json!(5), "#commit field `repo` has the wrong type"),
        ("ops", json!({}), "#commit field `ops` has the wrong type"),
        (
            "blocks",
            json!("x"),
            "#commit field `blocks` has the wrong type",
        ),
        (
            "tooBig",
            json!(0),
            "#commit field `tooBig` has the wrong type",
        ),
        (
            "commit",
            json!("bafy"),
            "#commit field `commit` has the wrong type",
        ),
        ("seq", json!("7"), "#commit field `seq` has the wrong type"),
    ];
    for (field, value, msg) in cases {
        let saved = body[field].clone();
        body[field] = value;
        let f = cat(&[&commit_header(), &enc(&body)]);
        assert_eq!(
            decode(&f),
            Err(DecodeError::InvalidBody(msg.into())),
            "{field}"
        );
        body[field] = saved;
    }
    body.as_object_mut().map(|m| m.remove("repo"));
    assert_eq!(
        decode(&cat(&[&commit_header(), &enc(&body)])),
        Err(DecodeError::InvalidBody("#commit without repo".into()))
    );
    assert_eq!(
        decode(&cat(&[&commit_header(), &enc(&json!([1]))])),
        Err(DecodeError::InvalidBody("body is not a map".into()))
    );
    assert_eq!(
        decode(&cat(&[&other_header(), &enc(&json!("x"))])),
        Err(DecodeError::InvalidBody("body is not a map".into()))
    );
}

#[test]
fn op_wrong_types() {
    let rec = like();
    let base = commit_body(&[&rec], &car(&[&rec]));
    let cases: Vec<(&str, Value, DecodeError)> = vec![
        (
            "action",
            json!("upsert"),
            DecodeError::InvalidBody("unknown op action `upsert`".into()),
        ),
        (
            "action",
            json!(1),
            DecodeError::InvalidBody("#commit op field `action` has the wrong type".into()),
        ),
        (
            "path",
            json!("nocollection"),
            DecodeError::InvalidBody("op path `nocollection` has no '/'".into()),
        ),
        (
            "cid",
            json!(1),
            DecodeError::InvalidBody("#commit op field `cid` has the wrong type".into()),
        ),
    ];
    for (field, value, err) in cases {
        let mut body = base.clone();
        body["ops"][0][field] = value;
        assert_eq!(
            decode(&cat(&[&commit_header(), &enc(&body)])),
            Err(err),
            "{field}"
        );
    }
}

#[test]
fn garbage_car() {
    let rec = like();
    let f = |blocks: &[u8]| cat(&[&commit_header(), &enc(&commit_body(&[&rec], blocks))]);
    assert_eq!(
        decode(&f(&[0xff; 40])),
        Err(DecodeError::InvalidCar("malformed header length"))
    );
    assert_eq!(
        decode(&f(&[0x80])),
        Err(DecodeError::InvalidCar("truncated header length"))
    );
    assert_eq!(
        decode(&f(&[0x05, 1, 2])),
        Err(DecodeError::InvalidCar("header longer than the CAR"))
    );
    assert_eq!(
        decode(&f(&[0x01, 0x01])),
        Err(DecodeError::InvalidCar("header is not a map"))
    );
    let v2 = enc(&json!({"roots": [], "version": 2}));
    assert_eq!(
        decode(&f(&cat(&[&varint(v2.len() as u64), &v2]))),
        Err(DecodeError::InvalidCar("not a CARv1"))
    );
    // A section claiming 2^60 bytes.
    let mut c = car(&[]);
    c.extend(varint(1 << 60));
    assert_eq!(decode(&f(&c)), Err(DecodeError::LengthTooLarge(1 << 60)));
    // A section whose CID is garbage.
    let mut c = car(&[]);
    c.extend([3, 0x07, 0x07, 0x07]);
    assert_eq!(
        decode(&f(&c)),
        Err(DecodeError::InvalidCid("unsupported CID version"))
    );
    // A section cut inside its CID.
    let mut c = car(&[]);
    c.extend([4, 0x01, 0x71, 0x12, 0x20]);
    assert_eq!(
        decode(&f(&c)),
        Err(DecodeError::InvalidCid("digest longer than the input"))
    );
}

#[test]
fn block_limit() {
    let rec = like();
    let blocks: Vec<Vec<u8>> = (0..10).map(|i| enc(&json!({ "i": i }))).collect();
    let refs: Vec<&[u8]> = blocks.iter().map(|b| b.as_slice()).collect();
    let f = cat(&[&commit_header(), &enc(&commit_body(&[&rec], &car(&refs)))]);
    let limits = DecodeLimits {
        max_blocks: 5,
        ..DecodeLimits::default()
    };
    assert_eq!(
        decode_with(&f, &limits),
        Err(DecodeError::LimitExceeded("blocks per CAR"))
    );
    assert!(decode(&f).is_ok());
}

#[test]
fn op_limit() {
    let recs: Vec<Vec<u8>> = (0..12)
        .map(|i| enc(&json!({ "$type": "x.y", "i": i })))
        .collect();
    let refs: Vec<&[u8]> = recs.iter().map(|b| b.as_slice()).collect();
    let f = cat(&[&commit_header(), &enc(&commit_body(&refs, &car(&refs)))]);
    let limits = DecodeLimits {
        max_ops: 11,
        ..DecodeLimits::default()
    };
    assert_eq!(
        decode_with(&f, &limits),
        Err(DecodeError::LimitExceeded("ops per commit"))
    );
    // 12 ops is above the linear-scan threshold, so this also exercises the sorted lookup.
    let c = commit_of(decode(&f));
    assert_eq!(c.ops.len(), 12);
    for (op, rec) in c.ops.iter().zip(&recs) {
        let RecordState::Json(j) = &op.record else {
            panic!("{:?}", op.record)
        };
        assert_eq!(enc(&serde_json::from_str(j).expect("json")), *rec);
    }
}

#[test]
fn deep_nesting_100k() {
    let start = std::time::Instant::now();
    let deep_arrays = cat(&[&vec![0x81u8; 100_000], &[0x00]]);
    let deep_maps: Vec<u8> = {
        let mut v = Vec::new();
        for _ in 0..100_000 {
            v.extend([0xa1, 0x61, b'a']);
        }
        v.push(0);
        v
    };
    // In an unknown header field (skipped) and in the body of a non-commit (converted).
    let h = cat(&[
        &[0xa3, 0x61, b't'],
        &enc(&json!("#identity")),
        &[0x62, b'o', b'p', 0x01, 0x61, b'x'],
        &deep_arrays,
    ]);
    assert_eq!(
        decode(&cat(&[&h, &enc(&json!({}))])),
        Err(DecodeError::TooDeep(64))
    );
    let body = cat(&[&[0xa1, 0x61, b'x'], &deep_maps]);
    assert_eq!(
        decode(&cat(&[&other_header(), &body])),
        Err(DecodeError::TooDeep(64))
    );
    // In an unknown commit field (skipped).
    let rec = like();
    let good = enc(&commit_body(&[&rec], &car(&[&rec])));
    // Replace the map head (a?) with one more pair, appended at the end: key "zz" -> deep.
    let mut b = good.clone();
    b[0] += 1;
    let b = cat(&[&b, &[0x62, b'z', b'z'], &deep_arrays]);
    assert_eq!(
        decode(&cat(&[&commit_header(), &b])),
        Err(DecodeError::TooDeep(64))
    );
    // In a record: the record is Undecodable, the frame still decodes.
    let deep_rec = cat(&[&[0xa1, 0x61, b'x'], &deep_maps]);
    let f = cat(&[
        &commit_header(),
        &enc(&commit_body(&[&deep_rec], &car(&[&deep_rec]))),
    ]);
    let c = commit_of(decode(&f));
    assert_eq!(c.ops[0].record, RecordState::Undecodable);
    assert!(
        start.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn depth_limit_is_exact() {
    // 64 nested containers (the record map is the first) are allowed, 65 are not.
    let nested = |n: usize| cat(&[&[0xa1, 0x61, b'x'], &vec![0x81u8; n - 1], &[0x00]]);
    let ok = nested(64);
    let too_deep = nested(65);
    let f = cat(&[
        &commit_header(),
        &enc(&commit_body(&[&ok, &too_deep], &car(&[&ok, &too_deep]))),
    ]);
    let c = commit_of(decode(&f));
    assert!(matches!(c.ops[0].record, RecordState::Json(_)));
    assert_eq!(c.ops[1].record, RecordState::Undecodable);
    assert_eq!(
        sluice::decode::json::record_to_json(&too_deep, 64),
        Err(DecodeError::TooDeep(64))
    );
}

#[test]
fn huge_declared_lengths() {
    let h = other_header();
    for major in [2u8, 3, 4, 5] {
        // As the value of a body field of a non-commit message.
        let body = cat(&[&[0xa1, 0x61, b'x'], &head8(major, 1 << 60)]);
        assert_eq!(
            decode(&cat(&[&h, &body])),
            Err(DecodeError::LengthTooLarge(1 << 60)),
            "major {major}"
        );
        // As the body itself / the header itself.
        assert_eq!(
            decode(&cat(&[&h, &head8(major, 1 << 60)])),
            Err(DecodeError::LengthTooLarge(1 << 60))
        );
        assert_eq!(
            decode(&head8(major, u64::MAX)),
            Err(DecodeError::LengthTooLarge(u64::MAX))
        );
    }
    // An ops array claiming 2^60 entries is refused before anything is sized by it.
    let body = cat(&[&[0xa1, 0x63, b'o', b'p', b's'], &head8(4, 1 << 60)]);
    assert_eq!(
        decode(&cat(&[&commit_header(), &body])),
        Err(DecodeError::LengthTooLarge(1 << 60))
    );
}

#[test]
fn non_data_model_cbor_in_bodies() {
    let h = other_header();
    let field = |v: &[u8]| cat(&[&h, &[0xa1, 0x61, b'x'], v]);
    let cases: &[(&[u8], &str)] = &[
        (&[0x9f, 0xff], "indefinite length is not DAG-CBOR"),
        (&[0xbf, 0xff], "indefinite length is not DAG-CBOR"),
        (&[0x5f, 0xff], "indefinite length is not DAG-CBOR"),
        (&[0x7f, 0xff], "indefinite length is not DAG-CBOR"),
        (
            &[0xfb, 0x3f, 0xf8, 0, 0, 0, 0, 0, 0],
            "floats are not part of the atproto data model",
        ),
        (
            &[0xf9, 0x3e, 0x00],
            "floats are not part of the atproto data model",
        ),
        (&[0xf7], "simple value other than false/true/null"),
        (&[0xe0], "simple value other than false/true/null"),
        (&[0xff], "unexpected break"),
        (&[0x1c], "reserved additional information"),
        (&[0xc1, 0x00], "tag other than 42"),
        (&[0x62, 0xc3, 0x28], "text is not valid UTF-8"),
        (&[0xa1, 0x01, 0x01], "map key is not a text string"),
        (
            &[0xa2, 0x61, b'a', 0x00, 0x61, b'a', 0x01],
            "duplicate map key",
        ),
        (
            &[0xa3, 0x61, b'b', 0x00, 0x61, b'a', 0x01, 0x61, b'b', 0x02],
            "duplicate map key",
        ),
    ];
    for (v, why) in cases {
        assert_eq!(
            decode(&field(v)),
            Err(DecodeError::InvalidCbor(why)),
            "{v:02x?}"
        );
    }
    assert_eq!(
        decode(&field(&[0xd8, 0x2a, 0x41, 0x01])),
        Err(DecodeError::InvalidCid("tag 42 without the 0x00 prefix"))
    );
    assert_eq!(
        decode(&field(&[0xd8, 0x2a, 0x01])),
        Err(DecodeError::InvalidCid("tag 42 on a non-byte-string"))
    );
    // Tolerated: non-shortest integer heads and out-of-order (but distinct) keys.
    let ok = decode(&field(&[
        0xa2, 0x61, b'b', 0x18, 0x01, 0x61, b'a', 0x19, 0x00, 0x02,
    ]))
    .expect("tolerated");
    let DecodedFrame::Message(m) = ok else {
        panic!()
    };
    assert_eq!(
        m.body,
        Body::Other {
            json: r#"{"x":{"b":1,"a":2}}"#.into()
        }
    );
}

#[test]
fn bad_records_degrade_and_missing_blocks_are_missing() {
    let good = like();
    let float_rec = cat(&[&[0xa1, 0x61, b'a'], &[0xfb, 0x3f, 0xf8, 0, 0, 0, 0, 0, 0]]);
    let not_map = enc(&json!([1, 2]));
    let trailing = cat(&[&good, &[0x00]]);
    let absent = enc(&json!({"$type": "never.in.car"}));
    let f = cat(&[
        &commit_header(),
        &enc(&commit_body(
            &[&good, &float_rec, &not_map, &trailing, &absent],
            &car(&[&good, &float_rec, &not_map, &trailing]),
        )),
    ]);
    let c = commit_of(decode(&f));
    let states: Vec<&RecordState> = c.ops.iter().map(|o| &o.record).collect();
    assert!(matches!(states[0], RecordState::Json(_)));
    assert_eq!(
        states[1..],
        [
            &RecordState::Undecodable,
            &RecordState::Undecodable,
            &RecordState::Undecodable,
            &RecordState::Missing
        ]
    );
}

#[test]
fn error_frames_and_unknown_types() {
    let f = cat(&[
        &enc(&json!({"op": -1})),
        &enc(&json!({"error": "FutureCursor", "message": "Cursor in the future."})),
    ]);
    assert_eq!(
        decode(&f),
        Ok(DecodedFrame::Error {
            error: "FutureCursor".into(),
            message: Some("Cursor in the future.".into())
        })
    );
    let f = cat(&[
        &enc(&json!({"op": -1, "t": "x"})),
        &enc(&json!({"error": "ConsumerTooSlow"})),
    ]);
    assert_eq!(
        decode(&f),
        Ok(DecodedFrame::Error {
            error: "ConsumerTooSlow".into(),
            message: None
        })
    );
    let f = cat(&[&enc(&json!({"op": -1})), &enc(&json!({"message": "x"}))]);
    assert_eq!(
        decode(&f),
        Err(DecodeError::InvalidBody(
            "error frame without `error`".into()
        ))
    );

    let body = json!({"seq": 9, "did": "did:plc:z", "time": "bad time", "newField": {"deep": [1, {"$bytes": "AAE"}]}});
    let f = cat(&[
        &enc(&json!({"op": 1, "t": "#brandNew", "extra": [1, 2]})),
        &enc(&body),
    ]);
    let DecodedFrame::Message(m) = decode(&f).expect("unknown type tolerated") else {
        panic!()
    };
    assert_eq!(
        (m.t.as_str(), m.seq, m.did.as_deref(), m.time_us),
        ("#brandNew", Some(9), Some("did:plc:z"), None)
    );
    let Body::Other { json } = m.body else {
        panic!()
    };
    assert_eq!(serde_json::from_str::<Value>(&json).expect("json"), body);
}

#[test]
fn json_string_escaping() {
    let s = "quote\" backslash\\ nl\n tab\t cr\r bell\u{7} nul\u{0} del\u{7f} é 😀 \u{2028}";
    let rec = enc(&json!({ "$type": "x", "text": s }));
    let j = sluice::decode::json::record_to_json(&rec, 64).expect("record");
    assert_eq!(
        serde_json::from_str::<Value>(&j).expect("valid json")["text"],
        s
    );
    assert!(j.contains(r#"\u0007"#) && j.contains(r#"\u0000"#) && j.contains(r#"quote\" "#));
}

/// Deterministic mutation fuzzing: random byte edits of a real-shaped frame must never panic,
/// and both tokenizers must reach the same verdict.
#[test]
fn mutated_frames_never_panic() {
    let base = good_commit();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..20_000 {
        let mut f = base.clone();
        for _ in 0..(1 + rnd() % 4) {
            let i = (rnd() as usize) % f.len();
            f[i] = rnd() as u8;
        }
        if rnd() % 8 == 0 {
            let cut = (rnd() as usize) % f.len();
            f.truncate(cut);
        }
        let _ = decode(&f);
    }
    for _ in 0..5_000 {
        let n = (rnd() % 64) as usize;
        let f: Vec<u8> = (0..n).map(|_| rnd() as u8).collect();
        let _ = decode(&f);
    }
}

#[test]
fn duplicate_op_cids_share_one_conversion() {
    // Small identical records named by several ops all decode, identically.
    let rec = like();
    let f = cat(&[
        &commit_header(),
        &enc(&commit_body(&[&rec, &rec, &rec], &car(&[&rec]))),
    ]);
    let c = commit_of(decode(&f));
    assert_eq!(c.ops.len(), 3);
    assert!(matches!(c.ops[0].record, RecordState::Json(_)));
    assert!(c.ops.iter().all(|o| o.record == c.ops[0].record));
    // A large record named by many ops would be O(ops x record); it is refused instead.
    let big = enc(&json!({ "$type": "x", "text": "a".repeat(64 * 1024) }));
    let refs: Vec<&[u8]> = vec![&big; 40];
    let f = cat(&[&commit_header(), &enc(&commit_body(&refs, &car(&[&big])))]);
    assert_eq!(
        decode(&f),
        Err(DecodeError::LimitExceeded("record JSON per frame"))
    );
}

#[test]
fn duplicate_fields_the_decoder_reads_are_refused() {
    // Header: {"op": 1, "t": "#identity", "op": 1} (hand-built: JSON objects cannot repeat).
    let h = cat(&[
        &[0xa3, 0x62, b'o', b'p', 0x01, 0x61, b't'],
        &enc(&json!("#identity")),
        &[0x62, b'o', b'p', 0x01],
    ]);
    let body = enc(&json!({"did": "did:plc:x", "seq": 1}));
    assert_eq!(
        decode(&cat(&[&h, &body])),
        Err(DecodeError::InvalidHeader("duplicate header field"))
    );
    // Commit body with `repo` twice: append a second pair and bump the map's count.
    let rec = like();
    let mut b = enc(&commit_body(&[&rec], &car(&[&rec])));
    b[0] += 1;
    let b = cat(&[
        &b,
        &[0x64, b'r', b'e', b'p', b'o'],
        &enc(&json!("did:plc:evil")),
    ]);
    assert_eq!(
        decode(&cat(&[&commit_header(), &b])),
        Err(DecodeError::InvalidBody(
            "#commit field `repo` appears twice".into()
        ))
    );
    // Error frame with `error` twice.
    let e = cat(&[
        &[0xa2, 0x65],
        b"error",
        &enc(&json!("A")),
        &[0x65],
        b"error",
        &enc(&json!("B")),
    ]);
    assert_eq!(
        decode(&cat(&[&enc(&json!({"op": -1})), &e])),
        Err(DecodeError::InvalidBody(
            "error frame field `error` appears twice".into()
        ))
    );
}
