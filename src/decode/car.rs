//! CARv1 archives as carried in `#commit.blocks` and `#sync.blocks`.
//!
//! Owns: the CAR header (`varint len | DAG-CBOR {roots, version: 1}`) and walking the
//! sections (`varint len | CID | block data`), yielding borrowed `(cid, data)` pairs.
//! Must never: decode block contents (MST nodes are never looked at; records are converted
//! by the caller only when an op references them), copy block bytes, or trust a section
//! length before checking it against the bytes left.

use super::cbor::{skip_value, Source, Token};
use super::cid::{cid_from_tag42, cid_len, read_varint, VarintError};
use super::DecodeError;

/// A CAR whose header has been checked; iterate [`Car::blocks`] for its sections.
#[derive(Debug, Clone)]
pub struct Car<'a> {
    /// Binary root CIDs (no 0x00 prefix).
    pub roots: Vec<&'a [u8]>,
    sections: &'a [u8],
}

impl<'a> Car<'a> {
    /// Parses the header; sections are read lazily by [`Car::blocks`].
    pub fn parse(car: &'a [u8], max_depth: usize) -> Result<Self, DecodeError> {
        Self::parse_with::<super::DefaultSource<'a>>(car, max_depth)
    }

    pub(crate) fn parse_with<S: Source<'a>>(
        car: &'a [u8],
        max_depth: usize,
    ) -> Result<Self, DecodeError> {
        let (hlen, n) = read_varint(car).map_err(|e| match e {
            VarintError::Truncated => DecodeError::InvalidCar("truncated header length"),
            VarintError::Invalid => DecodeError::InvalidCar("malformed header length"),
        })?;
        let rest = &car[n..];
        if hlen == 0 {
            return Err(DecodeError::InvalidCar("empty header"));
        }
        if hlen > rest.len() as u64 {
            return Err(DecodeError::InvalidCar("header longer than the CAR"));
        }
        let (header, sections) = rest.split_at(hlen as usize);
        let roots = parse_header::<S>(header, max_depth)?;
        Ok(Self { roots, sections })
    }

    pub fn blocks(&self, max_blocks: usize) -> Blocks<'a> {
        Blocks {
            rest: self.sections,
            seen: 0,
            max_blocks,
        }
    }
}

fn parse_header<'a, S: Source<'a>>(
    header: &'a [u8],
    max_depth: usize,
) -> Result<Vec<&'a [u8]>, DecodeError> {
    let car_err = |e: DecodeError| match e {
        DecodeError::TooDeep(_) | DecodeError::InvalidCid(_) => e,
        _ => DecodeError::InvalidCar("header is not valid DAG-CBOR"),
    };
    let mut r = S::open(header);
    let Token::Map(n) = r.next_token().map_err(car_err)? else {
        return Err(DecodeError::InvalidCar("header is not a map"));
    };
    let mut version = None;
    let mut roots = Vec::new();
    for _ in 0..n {
        let Token::Text(key) = r.next_token().map_err(car_err)? else {
            return Err(DecodeError::InvalidCar("header key is not text"));
        };
        match key {
            "version" => match r.next_token().map_err(car_err)? {
                Token::Uint(v) => version = Some(v),
                _ => return Err(DecodeError::InvalidCar("version is not an integer")),
            },
            "roots" => {
                let Token::Array(k) = r.next_token().map_err(car_err)? else {
                    return Err(DecodeError::InvalidCar("roots is not an array"));
                };
                for _ in 0..k {
                    if r.next_token().map_err(car_err)? != Token::Tag(42) {
                        return Err(DecodeError::InvalidCar("root is not a CID"));
                    }
                    let Token::Bytes(b) = r.next_token().map_err(car_err)? else {
                        return Err(DecodeError::InvalidCar("root is not a CID"));
                    };
                    roots.push(cid_from_tag42(b)?);
                }
            }
            _ => skip_value(&mut r, 1, max_depth).map_err(car_err)?,
        }
    }
    if r.remaining() != 0 {
        return Err(DecodeError::InvalidCar("bytes after the header value"));
    }
    match version {
        Some(1) => Ok(roots),
        Some(_) => Err(DecodeError::InvalidCar("not a CARv1")),
        None => Err(DecodeError::InvalidCar("header has no version")),
    }
}

/// Iterator over `(cid, data)` sections; stops at the first error.
pub struct Blocks<'a> {
    rest: &'a [u8],
    seen: usize,
    max_blocks: usize,
}

impl<'a> Blocks<'a> {
    fn read_section(&mut self) -> Result<(&'a [u8], &'a [u8]), DecodeError> {
        let (len, n) = read_varint(self.rest).map_err(|e| match e {
            VarintError::Truncated => DecodeError::InvalidCar("truncated section length"),
            VarintError::Invalid => DecodeError::InvalidCar("malformed section length"),
        })?;
        let body = &self.rest[n..];
        if len == 0 {
            return Err(DecodeError::InvalidCar("empty section"));
        }
        if len > body.len() as u64 {
            return Err(DecodeError::LengthTooLarge(len));
        }
        let (section, rest) = body.split_at(len as usize);
        self.seen += 1;
        if self.seen > self.max_blocks {
            return Err(DecodeError::LimitExceeded("blocks per CAR"));
        }
        let cl = cid_len(section)?;
        self.rest = rest;
        Ok(section.split_at(cl))
    }
}

impl<'a> Iterator for Blocks<'a> {
    type Item = Result<(&'a [u8], &'a [u8]), DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let item = self.read_section();
        if item.is_err() {
            // Stop after an error: there is no way to resynchronise a CAR.
            self.rest = &[];
        }
        Some(item)
    }
}
