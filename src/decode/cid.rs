//! Binary CIDs as they appear in CAR sections and DAG-CBOR tag 42, and their string form.
//!
//! Owns: measuring where a binary CID ends (unsigned-varint fields and the multihash digest
//! length) and rendering it as the atproto string (`b` + base32-lower for CIDv1, base58btc
//! `Qm...` for CIDv0). Must never: allocate from a length it has not checked against the
//! input, or panic on any byte sequence.

use super::DecodeError;

/// Reads a multiformats unsigned varint (at most 9 bytes, as the spec caps it at 63 bits).
/// Returns the value and the number of bytes used.
#[inline]
pub fn read_varint(buf: &[u8]) -> Result<(u64, usize), VarintError> {
    let mut value: u64 = 0;
    for (i, &b) in buf.iter().enumerate().take(9) {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            if b == 0 && i > 0 {
                // A trailing zero byte is a non-minimal encoding; the spec forbids it.
                return Err(VarintError::Invalid);
            }
            return Ok((value, i + 1));
        }
    }
    if buf.len() < 9 {
        Err(VarintError::Truncated)
    } else {
        Err(VarintError::Invalid)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VarintError {
    Truncated,
    Invalid,
}

/// Length in bytes of the binary CID at the start of `buf` (v1, or v0 = bare sha2-256
/// multihash). The CID's structure is checked, not its codec or hash function: atproto
/// tolerates any well-formed CID in data, and the relay is not the place to police codecs.
pub fn cid_len(buf: &[u8]) -> Result<usize, DecodeError> {
    let bad = |_| DecodeError::InvalidCid("malformed varint");
    if buf.len() >= 2 && buf[0] == 0x12 && buf[1] == 0x20 {
        // CIDv0: sha2-256 multihash with a 32-byte digest and nothing else.
        return if buf.len() >= 34 {
            Ok(34)
        } else {
            Err(DecodeError::InvalidCid("truncated CIDv0"))
        };
    }
    let (version, a) = read_varint(buf).map_err(bad)?;
    if version != 1 {
        return Err(DecodeError::InvalidCid("unsupported CID version"));
    }
    let (_codec, b) = read_varint(&buf[a..]).map_err(bad)?;
    let (_hash, c) = read_varint(&buf[a + b..]).map_err(bad)?;
    let (digest_len, d) = read_varint(&buf[a + b + c..]).map_err(bad)?;
    let head = a + b + c + d;
    if digest_len > (buf.len() - head) as u64 {
        return Err(DecodeError::InvalidCid("digest longer than the input"));
    }
    Ok(head + digest_len as usize)
}

/// Checks that `raw` is exactly one binary CID.
pub fn validate_cid(raw: &[u8]) -> Result<(), DecodeError> {
    if cid_len(raw)? != raw.len() {
        return Err(DecodeError::InvalidCid("bytes after the CID"));
    }
    Ok(())
}

/// The binary CID inside a DAG-CBOR tag 42 payload (which carries a 0x00 multibase prefix).
pub fn cid_from_tag42(payload: &[u8]) -> Result<&[u8], DecodeError> {
    match payload.split_first() {
        Some((0, raw)) => {
            validate_cid(raw)?;
            Ok(raw)
        }
        Some(_) => Err(DecodeError::InvalidCid("tag 42 without the 0x00 prefix")),
        None => Err(DecodeError::InvalidCid("empty tag 42")),
    }
}

const BASE32_LOWER: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

/// Appends the string form of a validated binary CID.
pub fn push_cid_string(out: &mut String, raw: &[u8]) {
    if raw.len() == 34 && raw[0] == 0x12 && raw[1] == 0x20 {
        push_base58btc(out, raw);
        return;
    }
    out.reserve(1 + (raw.len() * 8).div_ceil(5));
    out.push('b');
    let mut acc: u32 = 0;
    let mut bits = 0u32;
    for &b in raw {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(char::from(BASE32_LOWER[((acc >> bits) & 31) as usize]));
        }
        acc &= (1 << bits) - 1;
    }
    if bits > 0 {
        out.push(char::from(
            BASE32_LOWER[((acc << (5 - bits)) & 31) as usize],
        ));
    }
}

/// The string form of a validated binary CID.
pub fn cid_string(raw: &[u8]) -> String {
    let mut s = String::new();
    push_cid_string(&mut s, raw);
    s
}

/// Base58btc for CIDv0 (34 bytes), which is rare enough that the quadratic textbook method
/// costs nothing that matters.
fn push_base58btc(out: &mut String, raw: &[u8]) {
    const ALPHABET: &[u8; 58] = b"123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";
    let mut digits: Vec<u8> = Vec::with_capacity(raw.len() * 2);
    for &b in raw {
        let mut carry = u32::from(b);
        for d in digits.iter_mut() {
            carry += u32::from(*d) << 8;
            *d = (carry % 58) as u8;
            carry /= 58;
        }
        while carry > 0 {
            digits.push((carry % 58) as u8);
            carry /= 58;
        }
    }
    for _ in raw.iter().take_while(|&&b| b == 0) {
        out.push('1');
    }
    for &d in digits.iter().rev() {
        out.push(char::from(ALPHABET[d as usize]));
    }
}
