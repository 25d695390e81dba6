//! DAG-CBOR to atproto-JSON text, written straight from the token stream.
//!
//! Owns: the data-model mapping (map → object with text keys, tag 42 → `{"$link": cid}`,
//! bytes → `{"$bytes": base64 without padding}`, integers verbatim, true/false/null) and
//! JSON string escaping. Must never: build an intermediate tree, recurse (nesting is an
//! explicit stack bounded by the depth limit), accept an ambiguous input (non-text or
//! duplicate map keys, tags other than 42), or panic.

use base64::Engine as _;

use super::cbor::{Source, Token};
use super::cid::{cid_from_tag42, push_cid_string};
use super::DecodeError;

enum Frame {
    Array {
        left: u64,
    },
    /// `keys_start` indexes this map's keys in the shared key stack; `sorted` stays true while
    /// keys arrive in canonical order, which proves there are no duplicates for free.
    Map {
        left: u64,
        keys_start: usize,
        sorted: bool,
    },
}

/// Reusable scratch space so that a frame's records share allocations.
#[derive(Default)]
pub struct JsonWriter<'a> {
    stack: Vec<Frame>,
    keys: Vec<&'a str>,
}

/// DAG-CBOR canonical key order: shorter first, then bytewise.
#[inline]
pub fn canonical_key_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    a.len()
        .cmp(&b.len())
        .then_with(|| a.as_bytes().cmp(b.as_bytes()))
}

impl<'a> JsonWriter<'a> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Writes the next value from `src` as JSON. `depth` is the number of containers already
    /// open around it; opening one more than `max_depth` fails with [`DecodeError::TooDeep`].
    pub fn write_value<S: Source<'a>>(
        &mut self,
        src: &mut S,
        out: &mut String,
        depth: usize,
        max_depth: usize,
    ) -> Result<(), DecodeError> {
        self.stack.clear();
        self.keys.clear();
        loop {
            match src.next_token()? {
                Token::Uint(u) => push_int(out, u),
                Token::Neg(n) => push_neg(out, n),
                Token::Text(s) => push_json_string(out, s),
                Token::Bool(true) => out.push_str("true"),
                Token::Bool(false) => out.push_str("false"),
                Token::Null => out.push_str("null"),
                Token::Bytes(b) => push_bytes(out, b),
                Token::Tag(42) => match src.next_token()? {
                    Token::Bytes(b) => push_link(out, cid_from_tag42(b)?),
                    _ => return Err(DecodeError::InvalidCid("tag 42 on a non-byte-string")),
                },
                Token::Tag(_) => return Err(DecodeError::InvalidCbor("tag other than 42")),
                Token::Array(n) => {
                    if depth + self.stack.len() >= max_depth {
                        return Err(DecodeError::TooDeep(max_depth));
                    }
                    out.push('[');
                    if n == 0 {
                        out.push(']');
                    } else {
                        self.stack.push(Frame::Array { left: n });
                        continue;
                    }
                }
                Token::Map(n) => {
                    if depth + self.stack.len() >= max_depth {
                        return Err(DecodeError::TooDeep(max_depth));
                    }
                    out.push('{');
                    if n == 0 {
                        out.push('}');
                    } else {
                        self.stack.push(Frame::Map {
                            left: n,
                            keys_start: self.keys.len(),
                            sorted: true,
                        });
                        self.write_key(src, out)?;
                        continue;
                    }
                }
            }
            // A value is complete: close every container it completed, then position for
            // the next value.
            loop {
                match self.stack.last_mut() {
                    None => return Ok(()),
                    Some(Frame::Array { left }) => {
                        *left -= 1;
                        if *left > 0 {
                            out.push(',');
                            break;
                        }
                        out.push(']');
                        self.stack.pop();
                    }
                    Some(Frame::Map {
                        left,
                        keys_start,
                        sorted,
                    }) => {
                        *left -= 1;
                        if *left > 0 {
                            out.push(',');
                            self.write_key(src, out)?;
                            break;
                        }
                        let (start, sorted) = (*keys_start, *sorted);
                        if !sorted {
                            let keys = &mut self.keys[start..];
                            keys.sort_unstable_by(|a, b| canonical_key_cmp(a, b));
                            if keys.windows(2).any(|w| w[0] == w[1]) {
                                return Err(DecodeError::InvalidCbor("duplicate map key"));
                            }
                        }
                        self.keys.truncate(start);
                        out.push('}');
                        self.stack.pop();
                    }
                }
            }
        }
    }

    fn write_key<S: Source<'a>>(
        &mut self,
        src: &mut S,
        out: &mut String,
    ) -> Result<(), DecodeError> {
        let key = match src.next_token()? {
            Token::Text(k) => k,
            _ => return Err(DecodeError::InvalidCbor("map key is not a text string")),
        };
        if let Some(Frame::Map {
            keys_start, sorted, ..
        }) = self.stack.last_mut()
        {
            if *sorted && self.keys.len() > *keys_start {
                if let Some(prev) = self.keys.last() {
                    match canonical_key_cmp(prev, key) {
                        std::cmp::Ordering::Less => {}
                        std::cmp::Ordering::Equal => {
                            return Err(DecodeError::InvalidCbor("duplicate map key"))
                        }
                        // Out of canonical order: tolerated, but duplicates must now be
                        // found by sorting when the map closes.
                        std::cmp::Ordering::Greater => *sorted = false,
                    }
                }
            }
        }
        self.keys.push(key);
        push_json_string(out, key);
        out.push(':');
        Ok(())
    }
}

/// Converts one complete DAG-CBOR value (a record block) to atproto-JSON object text.
pub fn record_to_json(block: &[u8], max_depth: usize) -> Result<String, DecodeError> {
    let mut out = String::with_capacity(block.len() * 2);
    record_to_json_into::<super::DefaultSource>(
        block,
        max_depth,
        &mut out,
        &mut JsonWriter::new(),
    )?;
    Ok(out)
}

pub(crate) fn record_to_json_into<'a, S: Source<'a>>(
    block: &'a [u8],
    max_depth: usize,
    out: &mut String,
    writer: &mut JsonWriter<'a>,
) -> Result<(), DecodeError> {
    if block.first().is_none_or(|b| b >> 5 != 5) {
        return Err(DecodeError::InvalidCbor("record is not a map"));
    }
    let mut r = S::open(block);
    writer.write_value(&mut r, out, 0, max_depth)?;
    let rest = block.len() - r.pos();
    if rest != 0 {
        return Err(DecodeError::TrailingBytes(rest));
    }
    Ok(())
}

/// Converts one complete DAG-CBOR value of any kind to JSON text (no trailing bytes allowed).
pub fn cbor_to_json(bytes: &[u8], max_depth: usize) -> Result<String, DecodeError> {
    let mut out = String::with_capacity(bytes.len() * 2);
    let mut r = <super::DefaultSource as Source>::open(bytes);
    JsonWriter::new().write_value(&mut r, &mut out, 0, max_depth)?;
    let rest = bytes.len() - r.pos();
    if rest != 0 {
        return Err(DecodeError::TrailingBytes(rest));
    }
    Ok(out)
}

#[inline]
pub fn push_int(out: &mut String, u: u64) {
    out.push_str(itoa::Buffer::new().format(u));
}

/// Writes `-1 - n`, which for the largest `n` is below `i64::MIN`.
#[inline]
pub fn push_neg(out: &mut String, n: u64) {
    out.push_str(itoa::Buffer::new().format(-1i128 - i128::from(n)));
}

#[inline]
pub fn push_bytes(out: &mut String, b: &[u8]) {
    out.push_str("{\"$bytes\":\"");
    base64::engine::general_purpose::STANDARD_NO_PAD.encode_string(b, out);
    out.push_str("\"}");
}

#[inline]
pub fn push_link(out: &mut String, raw_cid: &[u8]) {
    out.push_str("{\"$link\":\"");
    push_cid_string(out, raw_cid);
    out.push_str("\"}");
}

/// Bytes that cannot appear raw inside a JSON string.
static NEEDS_ESCAPE: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 0x20 {
        t[i] = true;
        i += 1;
    }
    t[b'"' as usize] = true;
    t[b'\\' as usize] = true;
    t
};

/// Appends `s` as a quoted JSON string.
#[inline]
pub fn push_json_string(out: &mut String, s: &str) {
    out.reserve(s.len() + 2);
    out.push('"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if !NEEDS_ESCAPE[b as usize] {
            continue;
        }
        // Every escaped byte is ASCII, so `start..i` lies on char boundaries.
        out.push_str(&s[start..i]);
        match b {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            b'\n' => out.push_str("\\n"),
            b'\r' => out.push_str("\\r"),
            b'\t' => out.push_str("\\t"),
            0x08 => out.push_str("\\b"),
            0x0c => out.push_str("\\f"),
            _ => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.push_str("\\u00");
                out.push(char::from(HEX[usize::from(b >> 4)]));
                out.push(char::from(HEX[usize::from(b & 15)]));
            }
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}
