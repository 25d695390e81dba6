//! The official atproto data-model vectors (JSON ⇄ DAG-CBOR ⇄ CID) and the DASL strictness
//! vectors, against the encoder and the decoder's DAG-CBOR → JSON conversion.

use std::path::PathBuf;

use base64::Engine as _;
use serde_json::Value;
use sluice::decode::dagcbor_encode::{cid_string_for_dag_cbor, encode_dag_cbor, EncodeError};
use sluice::decode::json::cbor_to_json;
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

fn load(rel: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(rel)).expect("read fixture"))
        .expect("fixture is JSON")
}

fn unb64(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(s.trim_end_matches('='))
        .expect("base64")
}

#[test]
fn data_model_fixtures_roundtrip() {
    let vectors = load("atproto-interop-tests/data-model/data-model-fixtures.json");
    let vectors = vectors.as_array().expect("array");
    assert_eq!(vectors.len(), 3);
    for v in vectors {
        let cbor = unb64(v["cbor_base64"].as_str().expect("cbor_base64"));
        let cid = v["cid"].as_str().expect("cid");
        // JSON → CBOR: byte-exact, and the CID matches.
        let ours = encode_dag_cbor(&v["json"]).expect("encodes");
        assert_eq!(ours, cbor, "encoding of {}", v["json"]);
        assert_eq!(cid_string_for_dag_cbor(&ours), cid);
        // CBOR → JSON: semantically equal to the vector's JSON.
        let json = cbor_to_json(&cbor, 64).expect("decodes");
        let back: Value = serde_json::from_str(&json).expect("our output is JSON");
        assert_eq!(back, v["json"]);
    }
}

#[test]
fn data_model_valid_roundtrips() {
    let vectors = load("atproto-interop-tests/data-model/data-model-valid.json");
    for v in vectors.as_array().expect("array") {
        let cbor = encode_dag_cbor(&v["json"]).unwrap_or_else(|e| panic!("{}: {e}", v["note"]));
        let back: Value =
            serde_json::from_str(&cbor_to_json(&cbor, 64).expect("decodes")).expect("json");
        // `123.0` comes back as `123`: same data-model value, same bytes.
        assert_eq!(
            encode_dag_cbor(&back).expect("re-encodes"),
            cbor,
            "{}",
            v["note"]
        );
        if v["note"] != "float, but integer-like" {
            assert_eq!(back, v["json"], "{}", v["note"]);
        }
    }
}

/// Of the invalid vectors, those about `$link`, `$bytes` and floats are the encoder's business
/// and must be refused. The rest (`$type` rules, blob shape, "top level must be an object")
/// are record/lexicon validation, which a relay does not perform: the encoder accepts them.
#[test]
fn data_model_invalid() {
    let vectors = load("atproto-interop-tests/data-model/data-model-invalid.json");
    let vectors = vectors.as_array().expect("array");
    assert_eq!(vectors.len(), 12);
    for v in vectors {
        let note = v["note"].as_str().expect("note");
        let got = encode_dag_cbor(&v["json"]);
        match note {
            "float" => assert!(matches!(got, Err(EncodeError::Float(_))), "{note}: {got:?}"),
            "bytes with wrong field type" | "bytes with extra fields" => {
                assert!(matches!(got, Err(EncodeError::Bytes(_))), "{note}: {got:?}")
            }
            "link with wrong field type" | "link with bogus CID" | "link with extra fields" => {
                assert!(matches!(got, Err(EncodeError::Link(_))), "{note}: {got:?}")
            }
            "top-level not an object"
            | "record with $type null"
            | "record with $type wrong type"
            | "record with empty $type string"
            | "blob with string size"
            | "blob with missing key" => assert!(got.is_ok(), "{note}: lexicon-level, not refused"),
            other => panic!("unclassified invalid vector: {other}"),
        }
    }
}

/// Our verdict on a DASL case: does the decoder accept the bytes as one data-model value?
fn accepts(data: &[u8]) -> bool {
    cbor_to_json(data, 64).is_ok()
}

/// DASL cases whose tags concern DAG-CBOR ("dag-cbor") or all CBOR ("basic") are checked.
/// Where our policy knowingly differs, the case is listed here with the reason; the test
/// fails if the list drifts from actual behaviour either way.
const DEVIATIONS: &[(&str, &str, &str)] = &[
    // atproto's data model has no floats at all, so even DAG-CBOR's float64 is refused.
    ("floats.json", "roundtrip", "64-bit floats only"),
    ("floats.json", "roundtrip", "zero float64"),
    ("floats.json", "roundtrip", "64-bit subnormal number"),
    // Non-shortest heads are unambiguous, so they are tolerated on input.
    (
        "short_form.json",
        "invalid_in",
        "unnecessary one-byte map definition",
    ),
    (
        "short_form.json",
        "invalid_in",
        "unnecessary two-byte map definition",
    ),
    (
        "short_form.json",
        "invalid_in",
        "unnecessary four-byte map definition",
    ),
    (
        "short_form.json",
        "invalid_in",
        "unnecessary eight-byte map definition",
    ),
    (
        "short_form.json",
        "invalid_in",
        "unnecessary one-byte unsigned integer",
    ),
    (
        "short_form.json",
        "invalid_in",
        "unnecessary two-byte unsigned integer",
    ),
    (
        "short_form.json",
        "invalid_in",
        "unnecessary four-byte unsigned integer",
    ),
    (
        "short_form.json",
        "invalid_in",
        "unnecessary eight-byte unsigned integer",
    ),
    (
        "short_form.json",
        "invalid_in",
        "unnecessary one-byte negative integer",
    ),
    (
        "short_form.json",
        "invalid_in",
        "unnecessary two-byte negative integer",
    ),
    (
        "short_form.json",
        "invalid_in",
        "unnecessary four-byte negative integer",
    ),
    (
        "short_form.json",
        "invalid_in",
        "unnecessary eight-byte negative integer",
    ),
    (
        "short_form.json",
        "invalid_in",
        "unnecessary one-byte byte string",
    ),
    (
        "short_form.json",
        "invalid_in",
        "unnecessary two-byte byte string",
    ),
    (
        "short_form.json",
        "invalid_in",
        "unnecessary four-byte byte string",
    ),
    (
        "short_form.json",
        "invalid_in",
        "unnecessary eight-byte byte string",
    ),
    (
        "short_form.json",
        "invalid_in",
        "unnecessary one-byte string",
    ),
    (
        "short_form.json",
        "invalid_in",
        "unnecessary two-byte string",
    ),
    (
        "short_form.json",
        "invalid_in",
        "unnecessary four-byte string",
    ),
    (
        "short_form.json",
        "invalid_in",
        "unnecessary eight-byte string",
    ),
    (
        "short_form.json",
        "invalid_in",
        "unnecessary one-byte array",
    ),
    (
        "short_form.json",
        "invalid_in",
        "unnecessary two-byte array",
    ),
    (
        "short_form.json",
        "invalid_in",
        "unnecessary four-byte array",
    ),
    (
        "short_form.json",
        "invalid_in",
        "unnecessary eight-byte array",
    ),
    ("cid.json", "invalid_in", "long CID tag"),
    // Key order is not canonical but keys are distinct: tolerated (duplicates are refused).
    ("map_keys.json", "invalid_in", "map keys in incorrect order"),
];

#[test]
fn dasl_strictness_vectors() {
    let dir = fixture("dasl-testing");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("dasl dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert_eq!(files.len(), 11);
    let mut checked = 0;
    let mut deviations_seen = Vec::new();
    for path in files {
        let file = path
            .file_name()
            .and_then(|f| f.to_str())
            .expect("name")
            .to_owned();
        let cases: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
        for case in cases.as_array().expect("array") {
            let tags: Vec<&str> = case["tags"]
                .as_array()
                .expect("tags")
                .iter()
                .filter_map(|t| t.as_str())
                .collect();
            if !tags.iter().any(|t| *t == "dag-cbor" || *t == "basic") {
                continue;
            }
            let kind = case["type"].as_str().expect("type");
            let name = case["name"].as_str().expect("name");
            let data = hex(case["data"].as_str().expect("data"));
            let expected = match kind {
                "roundtrip" | "valid_in" => true,
                "invalid_in" => false,
                // About what an encoder may emit; our encoder takes JSON and cannot emit these.
                "invalid_out" => continue,
                other => panic!("unknown case type {other}"),
            };
            checked += 1;
            let got = accepts(&data);
            let deviation = DEVIATIONS
                .iter()
                .any(|&(f, k, n)| f == file && k == kind && n == name);
            if deviation {
                assert_ne!(
                    got, expected,
                    "{file} {kind} {name}: listed deviation no longer deviates"
                );
                deviations_seen.push((file.clone(), kind.to_owned(), name.to_owned()));
            } else {
                assert_eq!(
                    got,
                    expected,
                    "{file} {kind} {name} ({:?})",
                    cbor_to_json(&data, 64)
                );
            }
        }
    }
    assert_eq!(
        deviations_seen.len(),
        DEVIATIONS.len(),
        "every listed deviation was exercised"
    );
    assert!(checked > 60, "{checked}");
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex"))
        .collect()
}
