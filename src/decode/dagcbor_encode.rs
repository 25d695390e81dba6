//! atproto JSON → canonical DAG-CBOR, and CIDs of DAG-CBOR blocks.
//!
//! Owns: the inverse of [`super::json`]: objects become maps with keys sorted length-first
//! then bytewise, `{"$link": cid}` becomes tag 42, `{"$bytes": base64}` becomes a byte
//! string, integers take their shortest head; plus CIDv1 (dag-cbor 0x71, sha2-256)
//! computation. Used by tests (data-model vectors, checking that decoded records hash to
//! their op's CID) and tooling. Must never: be on the frame-decoding hot path, emit floats
//! (the atproto data model has none), or emit anything but the one canonical encoding.

use base64::Engine as _;
use serde_json::{Map, Number, Value};
use sha2::{Digest, Sha256};

use super::json::canonical_key_cmp;

/// Deeper input than this is refused rather than risk the stack.
pub const MAX_ENCODE_DEPTH: usize = 512;

/// The multicodec code of DAG-CBOR.
pub const DAG_CBOR_CODEC: u64 = 0x71;
/// The multihash code of sha2-256.
pub const SHA2_256: u64 = 0x12;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("floats are not part of the atproto data model: {0}")]
    Float(String),
    #[error("invalid $link: {0}")]
    Link(String),
    #[error("invalid $bytes: {0}")]
    Bytes(String),
    #[error("nesting deeper than {MAX_ENCODE_DEPTH}")]
    TooDeep,
}

/// Encodes an atproto-JSON value as canonical DAG-CBOR.
pub fn encode_dag_cbor(value: &Value) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::with_capacity(256);
    encode_into(value, &mut out, 0)?;
    Ok(out)
}

/// The CIDv1 (dag-cbor, sha2-256) of a DAG-CBOR block.
pub fn cid_for_dag_cbor(block: &[u8]) -> ::cid::Cid {
    let digest = Sha256::digest(block);
    // A 32-byte digest always fits the 64-byte multihash, so `wrap` cannot fail here.
    let mh = multihash::Multihash::<64>::wrap(SHA2_256, &digest)
        .unwrap_or_else(|_| unreachable!("32-byte digest fits a 64-byte multihash"));
    ::cid::Cid::new_v1(DAG_CBOR_CODEC, mh)
}

/// The CID string (`bafyrei...`) of a DAG-CBOR block.
pub fn cid_string_for_dag_cbor(block: &[u8]) -> String {
    super::cid::cid_string(&cid_for_dag_cbor(block).to_bytes())
}

fn head(out: &mut Vec<u8>, major: u8, arg: u64) {
    let m = major << 5;
    if arg < 24 {
        out.push(m | arg as u8);
    } else if arg <= u64::from(u8::MAX) {
        out.extend_from_slice(&[m | 24, arg as u8]);
    } else if arg <= u64::from(u16::MAX) {
        out.push(m | 25);
        out.extend_from_slice(&(arg as u16).to_be_bytes());
    } else if arg <= u64::from(u32::MAX) {
        out.push(m | 26);
        out.extend_from_slice(&(arg as u32).to_be_bytes());
    } else {
        out.push(m | 27);
        out.extend_from_slice(&arg.to_be_bytes());
    }
}

fn encode_number(n: &Number, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    if let Some(u) = n.as_u64() {
        head(out, 0, u);
    } else if let Some(i) = n.as_i64() {
        // Negative: CBOR stores -1 - i.
        head(out, 1, (-1 - i128::from(i)) as u64);
    } else {
        // JSON has one number type, so `123.0` is an integer in the atproto data model; any
        // float with a fraction (or beyond 2^53, where it stops being exact) is refused.
        match n.as_f64() {
            Some(f) if f.is_finite() && f.fract() == 0.0 && f.abs() <= 9_007_199_254_740_992.0 => {
                let i = f as i64;
                if i >= 0 {
                    head(out, 0, i as u64);
                } else {
                    head(out, 1, (-1 - i) as u64);
                }
            }
            _ => return Err(EncodeError::Float(n.to_string())),
        }
    }
    Ok(())
}

fn encode_into(value: &Value, out: &mut Vec<u8>, depth: usize) -> Result<(), EncodeError> {
    match value {
        Value::Null => out.push(0xf6),
        Value::Bool(false) => out.push(0xf4),
        Value::Bool(true) => out.push(0xf5),
        Value::Number(n) => encode_number(n, out)?,
        Value::String(s) => {
            head(out, 3, s.len() as u64);
            out.extend_from_slice(s.as_bytes());
        }
        Value::Array(items) => {
            if depth >= MAX_ENCODE_DEPTH {
                return Err(EncodeError::TooDeep);
            }
            head(out, 4, items.len() as u64);
            for item in items {
                encode_into(item, out, depth + 1)?;
            }
        }
        Value::Object(map) => {
            if depth >= MAX_ENCODE_DEPTH {
                return Err(EncodeError::TooDeep);
            }
            if special(map, out)? {
                return Ok(());
            }
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by(|a, b| canonical_key_cmp(a.0, b.0));
            head(out, 5, entries.len() as u64);
            for (k, v) in entries {
                head(out, 3, k.len() as u64);
                out.extend_from_slice(k.as_bytes());
                encode_into(v, out, depth + 1)?;
            }
        }
    }
    Ok(())
}

/// `$link` and `$bytes` objects. Returns whether `map` was one of them.
fn special(map: &Map<String, Value>, out: &mut Vec<u8>) -> Result<bool, EncodeError> {
    if let Some(link) = map.get("$link") {
        if map.len() != 1 {
            return Err(EncodeError::Link("extra fields next to $link".into()));
        }
        let Value::String(s) = link else {
            return Err(EncodeError::Link("not a string".into()));
        };
        let cid =
            ::cid::Cid::try_from(s.as_str()).map_err(|e| EncodeError::Link(format!("{s}: {e}")))?;
        let raw = cid.to_bytes();
        out.extend_from_slice(&[0xd8, 42]);
        head(out, 2, raw.len() as u64 + 1);
        out.push(0);
        out.extend_from_slice(&raw);
        return Ok(true);
    }
    if let Some(bytes) = map.get("$bytes") {
        if map.len() != 1 {
            return Err(EncodeError::Bytes("extra fields next to $bytes".into()));
        }
        let Value::String(s) = bytes else {
            return Err(EncodeError::Bytes("not a string".into()));
        };
        // The spec says no padding; accept it anyway since it is unambiguous.
        let raw = base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(s.trim_end_matches('='))
            .map_err(|e| EncodeError::Bytes(e.to_string()))?;
        head(out, 2, raw.len() as u64);
        out.extend_from_slice(&raw);
        return Ok(true);
    }
    Ok(false)
}
