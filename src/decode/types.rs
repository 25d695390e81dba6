//! The decoder's output types: what a frame means, before it is stamped.

/// Limits applied while decoding. All are explicit so that hostile input is bounded.
#[derive(Debug, Clone)]
pub struct DecodeLimits {
    /// Maximum nesting depth of any CBOR value (header, body or record).
    pub max_depth: usize,
    /// Maximum number of ops accepted in one commit (the relay's limit is 200).
    pub max_ops: usize,
    /// Maximum number of blocks read from one CAR.
    pub max_blocks: usize,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        Self {
            max_depth: 64,
            max_ops: 1_000,
            max_blocks: 20_000,
        }
    }
}

/// One decoded frame.
// Error frames are rare and the value is moved once per frame, so boxing `Message` would cost
// an allocation on every frame to save bytes on a rare one.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum DecodedFrame {
    /// `op: 1`: a message of type `t`.
    Message(Message),
    /// `op: -1`: an error frame; the upstream ends the stream after it.
    Error {
        error: String,
        message: Option<String>,
    },
}

/// Fields common to every message, plus its type-specific body.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// The header `t`, e.g. `#commit`. Unknown types are kept as they are.
    pub t: String,
    /// Upstream `seq` (absent on `#info`).
    pub seq: Option<i64>,
    /// The source `time` string as sent (RFC 3339), if any.
    pub time: Option<String>,
    /// `time` parsed to unix microseconds, if present and valid.
    pub time_us: Option<i64>,
    /// The repo DID (`repo` on commits, `did` elsewhere), if any.
    pub did: Option<String>,
    pub body: Body,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    Commit(Commit),
    /// `#identity`, `#account`, `#sync`, `#info` and unknown types: the whole body as an
    /// atproto-JSON object (text), unknown fields included; `blocks` of `#sync` is replaced
    /// by its length under `blocksLen` since no wire carries it as JSON.
    Other {
        json: String,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Commit {
    pub repo: String,
    pub rev: String,
    pub since: Option<String>,
    /// CID of the signed commit block, as a string.
    pub commit: Option<String>,
    /// `prevData` (Sync 1.1); `None` on legacy commits.
    pub prev_data: Option<String>,
    pub too_big: bool,
    pub rebase: bool,
    pub ops: Vec<Op>,
    /// Byte length of `blocks`.
    pub blocks_len: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Create,
    Update,
    Delete,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Create => "create",
            Action::Update => "update",
            Action::Delete => "delete",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Op {
    pub action: Action,
    pub collection: String,
    pub rkey: String,
    /// The record CID (absent on deletes).
    pub cid: Option<String>,
    /// The previous record CID (Sync 1.1 updates and deletes).
    pub prev: Option<String>,
    pub record: RecordState,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RecordState {
    /// The record as atproto-JSON text (an object).
    Json(String),
    /// A create/update whose block was not in the CAR (counted by the caller).
    Missing,
    /// The record block was present but is not valid DAG-CBOR (counted by the caller).
    Undecodable,
    /// Deletes carry no record.
    None,
}

/// Why a frame could not be decoded. `reason()` is a stable label for metrics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("truncated input")]
    Truncated,
    #[error("{0} trailing bytes after body")]
    TrailingBytes(usize),
    #[error("invalid CBOR: {0}")]
    InvalidCbor(&'static str),
    #[error("nesting deeper than {0}")]
    TooDeep(usize),
    #[error("declared length {0} exceeds the input")]
    LengthTooLarge(u64),
    #[error("invalid header: {0}")]
    InvalidHeader(&'static str),
    #[error("invalid body: {0}")]
    InvalidBody(String),
    #[error("invalid CAR: {0}")]
    InvalidCar(&'static str),
    #[error("invalid CID: {0}")]
    InvalidCid(&'static str),
    #[error("limit exceeded: {0}")]
    LimitExceeded(&'static str),
}

impl DecodeError {
    /// Every `reason()` label, so metrics can show each one at 0 from the first scrape.
    pub const REASONS: [&'static str; 10] = [
        "truncated",
        "trailing_bytes",
        "invalid_cbor",
        "too_deep",
        "length_too_large",
        "invalid_header",
        "invalid_body",
        "invalid_car",
        "invalid_cid",
        "limit_exceeded",
    ];

    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::Truncated => "truncated",
            DecodeError::TrailingBytes(_) => "trailing_bytes",
            DecodeError::InvalidCbor(_) => "invalid_cbor",
            DecodeError::TooDeep(_) => "too_deep",
            DecodeError::LengthTooLarge(_) => "length_too_large",
            DecodeError::InvalidHeader(_) => "invalid_header",
            DecodeError::InvalidBody(_) => "invalid_body",
            DecodeError::InvalidCar(_) => "invalid_car",
            DecodeError::InvalidCid(_) => "invalid_cid",
            DecodeError::LimitExceeded(_) => "limit_exceeded",
        }
    }
}

#[cfg(test)]
mod reason_tests {
    use super::DecodeError;

    #[test]
    fn every_reason_is_listed_once() {
        let all = [
            DecodeError::Truncated,
            DecodeError::TrailingBytes(1),
            DecodeError::InvalidCbor("x"),
            DecodeError::TooDeep(1),
            DecodeError::LengthTooLarge(1),
            DecodeError::InvalidHeader("x"),
            DecodeError::InvalidBody("x".into()),
            DecodeError::InvalidCar("x"),
            DecodeError::InvalidCid("x"),
            DecodeError::LimitExceeded("x"),
        ];
        let reasons: Vec<&str> = all.iter().map(DecodeError::reason).collect();
        assert_eq!(reasons, DecodeError::REASONS);
    }
}
