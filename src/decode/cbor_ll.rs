//! The production [`Source`]: `ciborium-ll`'s streaming decoder, adapted to borrowed tokens.
//!
//! Owns: mapping `ciborium_ll::Header`s to [`Token`]s with the same admission policy as the
//! hand-rolled [`super::cbor::Reader`] (which is kept as the measured alternative and as a
//! second tokenizer for differential tests; numbers in docs/DECISIONS.md), while keeping
//! string payloads borrowed from the input. Must never: copy or allocate a payload, trust a
//! declared length before checking it against the input, or panic.

use ciborium_ll::{simple, Decoder, Header};

use super::cbor::{check_count, Source, Token};
use super::DecodeError;

pub struct LlReader<'a> {
    input: &'a [u8],
    /// Offset of the decoder's slice within `input`; `ciborium-ll` has no way to skip bytes,
    /// so a payload is stepped over by restarting the decoder after it.
    base: usize,
    dec: Decoder<&'a [u8]>,
}

impl<'a> LlReader<'a> {
    pub fn new(input: &'a [u8]) -> Self {
        Self {
            input,
            base: 0,
            dec: Decoder::from(input),
        }
    }

    fn payload(&mut self, len: usize) -> Result<&'a [u8], DecodeError> {
        let start = self.pos();
        if len > self.input.len() - start {
            return Err(DecodeError::LengthTooLarge(len as u64));
        }
        let s = &self.input[start..start + len];
        self.seek(start + len);
        Ok(s)
    }
}

impl<'a> Source<'a> for LlReader<'a> {
    fn open(input: &'a [u8]) -> Self {
        LlReader::new(input)
    }

    fn next_token(&mut self) -> Result<Token<'a>, DecodeError> {
        let head = self.dec.pull().map_err(|e| match e {
            ciborium_ll::Error::Io(_) => DecodeError::Truncated,
            ciborium_ll::Error::Syntax(_) => {
                DecodeError::InvalidCbor("reserved additional information")
            }
        })?;
        match head {
            Header::Positive(u) => Ok(Token::Uint(u)),
            Header::Negative(n) => Ok(Token::Neg(n)),
            Header::Bytes(Some(len)) => Ok(Token::Bytes(self.payload(len)?)),
            Header::Text(Some(len)) => {
                let raw = self.payload(len)?;
                std::str::from_utf8(raw)
                    .map(Token::Text)
                    .map_err(|_| DecodeError::InvalidCbor("text is not valid UTF-8"))
            }
            Header::Array(Some(n)) => {
                check_count(n as u64, 1, self.remaining())?;
                Ok(Token::Array(n as u64))
            }
            Header::Map(Some(n)) => {
                check_count(n as u64, 2, self.remaining())?;
                Ok(Token::Map(n as u64))
            }
            Header::Bytes(None) | Header::Text(None) | Header::Array(None) | Header::Map(None) => {
                Err(DecodeError::InvalidCbor(
                    "indefinite length is not DAG-CBOR",
                ))
            }
            Header::Tag(t) => Ok(Token::Tag(t)),
            Header::Simple(simple::FALSE) => Ok(Token::Bool(false)),
            Header::Simple(simple::TRUE) => Ok(Token::Bool(true)),
            Header::Simple(simple::NULL) => Ok(Token::Null),
            Header::Simple(_) => Err(DecodeError::InvalidCbor(
                "simple value other than false/true/null",
            )),
            Header::Float(_) => Err(DecodeError::InvalidCbor(
                "floats are not part of the atproto data model",
            )),
            Header::Break => Err(DecodeError::InvalidCbor("unexpected break")),
        }
    }

    fn pos(&mut self) -> usize {
        self.base + self.dec.offset()
    }

    fn seek(&mut self, pos: usize) {
        let pos = pos.min(self.input.len());
        self.base = pos;
        self.dec = Decoder::from(&self.input[pos..]);
    }

    fn input(&self) -> &'a [u8] {
        self.input
    }
}
