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
    // Five bytes make exactly eight base32 digits; doing whole groups keeps the common
    // 36-byte CID to seven 40-bit shifts-and-masks plus one short tail.
    let mut chunks = raw.chunks_exact(5);
    for c in &mut chunks {
        let v = (u64::from(c[0]) << 32)
            | (u64::from(c[1]) << 24)
            | (u64::from(c[2]) << 16)
            | (u64::from(c[3]) << 8)
            | u64::from(c[4]);
        for shift in [35, 30, 25, 20, 15, 10, 5, 0] {
            out.push(char::from(BASE32_LOWER[((v >> shift) & 31) as usize]));
        }
    }
    let tail = chunks.remainder();
    if !tail.is_empty() {
        let mut v: u64 = 0;
        for (i, &b) in tail.iter().enumerate() {
            v |= u64::from(b) << (32 - 8 * i);
        }
        let digits = (tail.len() * 8).div_ceil(5);
        for shift in [35, 30, 25, 20, 15, 10, 5, 0].into_iter().take(digits) {
            out.push(char::from(BASE32_LOWER[((v >> shift) & 31) as usize]));
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every tail length of the base32 encoder, checked against the `cid` crate.
    #[test]
    fn strings_match_the_cid_crate() {
        for digest_len in 0..=64u8 {
            let mut raw = vec![0x01, 0x71, 0x12, digest_len];
            raw.extend((0..digest_len).map(|i| i.wrapping_mul(37).wrapping_add(digest_len)));
            validate_cid(&raw).expect("well-formed");
            let theirs = ::cid::Cid::try_from(raw.as_slice()).expect("cid crate parses");
            assert_eq!(
                cid_string(&raw),
                theirs.to_string(),
                "digest length {digest_len}"
            );
        }
        let mut v0 = vec![0x12, 0x20];
        v0.extend(1..=32u8);
        let theirs = ::cid::Cid::try_from(v0.as_slice()).expect("v0");
        assert_eq!(cid_string(&v0), theirs.to_string());
        assert!(cid_string(&v0).starts_with("Qm"));
    }

    #[test]
    fn varints() {
        assert_eq!(read_varint(&[0x00]), Ok((0, 1)));
        assert_eq!(read_varint(&[0xac, 0x02]), Ok((300, 2)));
        assert_eq!(read_varint(&[0x80, 0x00]), Err(VarintError::Invalid));
        assert_eq!(read_varint(&[0x80]), Err(VarintError::Truncated));
        assert_eq!(read_varint(&[0xff; 12]), Err(VarintError::Invalid));
        assert_eq!(read_varint(&[]), Err(VarintError::Truncated));
    }
}
