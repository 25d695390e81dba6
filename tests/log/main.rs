//! The event log, one module per subject: segment formats, the replay-to-live handover at
//! the log level, retention (raw frames' own too), and the store (append, reads, cursors,
//! restart, torn tails).

#[path = "../log_common/mod.rs"]
mod log_common;

mod format;
mod handover;
mod merge;
mod raw_level;
mod raw_retention;
mod read_ahead;
mod retention;
mod store;
