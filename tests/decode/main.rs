//! The decoder against real and published data, one module per source: the relay corpus,
//! the atproto data-model vectors, indigo's and atproto.dart's test data, and hostile or
//! malformed frames. (The fuzz run with its watchdog is `tests/decode_fuzz.rs`, a binary
//! of its own: it aborts the process on a hang.)

mod corpus;
mod data_model;
mod indigo;
mod malformed;
