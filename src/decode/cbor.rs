//! A zero-copy DAG-CBOR token reader over `&[u8]`.
//!
//! Owns: splitting bytes into CBOR tokens (heads plus borrowed byte/text payloads) and the
//! reader-level policy: which CBOR forms the atproto data model admits at all.
//!
//! Must never: panic, index past the input, trust a declared length or count before checking
//! it against the bytes that remain, or allocate. Nesting is the caller's job (see
//! [`skip_value`]), so this module never recurses.

use super::DecodeError;

/// One CBOR data item head, with the payload of strings borrowed from the input.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Token<'a> {
    Uint(u64),
    /// A negative integer whose value is `-1 - n`.
    Neg(u64),
    Bytes(&'a [u8]),
    Text(&'a str),
    /// An array of this many items (already checked against the remaining input).
    Array(u64),
    /// A map of this many pairs (already checked against the remaining input).
    Map(u64),
    Tag(u64),
    Bool(bool),
    Null,
}

/// Where tokens come from. Two implementations exist so that the hand-rolled reader can be
/// compared with `ciborium-ll` on identical decoding logic (see docs/DECISIONS.md).
pub trait Source<'a> {
    /// A reader of the same kind over other bytes (a CAR block, the CAR header).
    fn open(input: &'a [u8]) -> Self
    where
        Self: Sized;
    fn next_token(&mut self) -> Result<Token<'a>, DecodeError>;
    fn pos(&mut self) -> usize;
    /// Rewinds or advances to an offset previously returned by [`Source::pos`].
    fn seek(&mut self, pos: usize);
    fn input(&self) -> &'a [u8];
    fn remaining(&mut self) -> usize {
        self.input().len().saturating_sub(self.pos())
    }
}

/// The hand-rolled reader: the measured alternative to `ciborium-ll` and a second, independent
/// tokenizer for differential tests (see [`super::decode_frame_hand_rolled`]).
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    #[inline]
    fn byte(&mut self) -> Result<u8, DecodeError> {
        let b = *self.buf.get(self.pos).ok_or(DecodeError::Truncated)?;
        self.pos += 1;
        Ok(b)
    }

    #[inline]
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).ok_or(DecodeError::Truncated)?;
        let s = self.buf.get(self.pos..end).ok_or(DecodeError::Truncated)?;
        self.pos = end;
        Ok(s)
    }

    /// The argument of a head. Non-shortest encodings are accepted: the value is still
    /// unambiguous (policy in docs/DECISIONS.md).
    #[inline]
    fn argument(&mut self, minor: u8) -> Result<u64, DecodeError> {
        Ok(match minor {
            0..=23 => u64::from(minor),
            24 => u64::from(self.byte()?),
            25 => {
                let s = self.take(2)?;
                u64::from(u16::from_be_bytes([s[0], s[1]]))
            }
            26 => {
                let s = self.take(4)?;
                u64::from(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
            }
            27 => {
                let s = self.take(8)?;
                u64::from_be_bytes([s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]])
            }
            _ => return Err(DecodeError::InvalidCbor("reserved additional information")),
        })
    }

    /// A length or count argument, where minor 31 means "indefinite".
    #[inline]
    fn length(&mut self, minor: u8) -> Result<u64, DecodeError> {
        if minor == 31 {
            return Err(DecodeError::InvalidCbor(
                "indefinite length is not DAG-CBOR",
            ));
        }
        self.argument(minor)
    }

    /// Major type 7. Errors match the `ciborium-ll` source so both can be compared exactly.
    fn simple_or_float(&mut self, minor: u8) -> Result<Token<'a>, DecodeError> {
        let value = match minor {
            24 => self.byte()?,
            25..=27 => {
                self.take(1 << (minor - 24))?;
                return Err(DecodeError::InvalidCbor(
                    "floats are not part of the atproto data model",
                ));
            }
            28..=30 => return Err(DecodeError::InvalidCbor("reserved additional information")),
            31 => return Err(DecodeError::InvalidCbor("unexpected break")),
            v => v,
        };
        match value {
            20 => Ok(Token::Bool(false)),
            21 => Ok(Token::Bool(true)),
            22 => Ok(Token::Null),
            _ => Err(DecodeError::InvalidCbor(
                "simple value other than false/true/null",
            )),
        }
    }

    #[inline]
    fn payload(&mut self, len: u64) -> Result<&'a [u8], DecodeError> {
        let rem = self.buf.len() - self.pos;
        if len > rem as u64 {
            return Err(DecodeError::LengthTooLarge(len));
        }
        self.take(len as usize)
    }
}

/// Checks a container count against what is left: every item takes at least one byte, so a
/// count larger than the remaining input is a lie and is refused before anything is sized by it.
#[inline]
pub(crate) fn check_count(count: u64, per_item: u64, remaining: usize) -> Result<(), DecodeError> {
    if count.saturating_mul(per_item) > remaining as u64 {
        return Err(DecodeError::LengthTooLarge(count));
    }
    Ok(())
}

impl<'a> Source<'a> for Reader<'a> {
    fn open(input: &'a [u8]) -> Self {
        Reader::new(input)
    }

    #[inline]
    fn next_token(&mut self) -> Result<Token<'a>, DecodeError> {
        let ib = self.byte()?;
        let minor = ib & 0x1f;
        match ib >> 5 {
            0 => Ok(Token::Uint(self.argument(minor)?)),
            1 => Ok(Token::Neg(self.argument(minor)?)),
            2 => {
                let len = self.length(minor)?;
                Ok(Token::Bytes(self.payload(len)?))
            }
            3 => {
                let len = self.length(minor)?;
                let raw = self.payload(len)?;
                std::str::from_utf8(raw)
                    .map(Token::Text)
                    .map_err(|_| DecodeError::InvalidCbor("text is not valid UTF-8"))
            }
            4 => {
                let n = self.length(minor)?;
                check_count(n, 1, self.buf.len() - self.pos)?;
                Ok(Token::Array(n))
            }
            5 => {
                let n = self.length(minor)?;
                check_count(n, 2, self.buf.len() - self.pos)?;
                Ok(Token::Map(n))
            }
            6 => Ok(Token::Tag(self.argument(minor)?)),
            _ => self.simple_or_float(minor),
        }
    }

    #[inline]
    fn pos(&mut self) -> usize {
        self.pos
    }

    #[inline]
    fn seek(&mut self, pos: usize) {
        self.pos = pos.min(self.buf.len());
    }

    #[inline]
    fn input(&self) -> &'a [u8] {
        self.buf
    }
}

/// Skips one complete value, iteratively, enforcing the depth limit. `depth` is the depth of
/// the value being skipped (its container's depth plus one).
pub fn skip_value<'a, S: Source<'a>>(
    src: &mut S,
    depth: usize,
    max_depth: usize,
) -> Result<(), DecodeError> {
    // Stack of "items still owed" per open container; its length is the extra depth.
    let mut stack: Vec<u64> = Vec::new();
    let mut owed: u64 = 1;
    loop {
        while owed == 0 {
            match stack.pop() {
                Some(o) => owed = o,
                None => return Ok(()),
            }
        }
        owed -= 1;
        let tok = src.next_token()?;
        let children = match tok {
            Token::Array(n) => n,
            Token::Map(n) => n * 2,
            Token::Tag(_) => 1,
            _ => continue,
        };
        if depth + stack.len() + 1 > max_depth {
            return Err(DecodeError::TooDeep(max_depth));
        }
        stack.push(owed);
        owed = children;
    }
}

/// The value of an integer token as i64, if it fits.
pub fn as_i64(tok: Token<'_>) -> Option<i64> {
    match tok {
        Token::Uint(u) => i64::try_from(u).ok(),
        Token::Neg(n) => i64::try_from(n).ok().map(|n| -1 - n),
        _ => None,
    }
}
