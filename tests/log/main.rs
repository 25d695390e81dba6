//! The event log, one module per subject: segment formats, the replay-to-live handover at
//! the log level, retention (raw frames' own too), and the store (append, reads, cursors,
//! restart, torn tails).

#[path = "../log_common/mod.rs"]
mod log_common;

mod allocs;
mod direct_writes;
mod format;
mod handover;
mod merge;
mod raw_level;
mod raw_retention;
mod read_ahead;
mod retention;
mod store;

use sluice::event::Event;
use sluice::log::Payloads;

/// `want` with only `payloads` filled in, as a read with `payloads` returns it.
fn with_payloads(want: &Event, payloads: Payloads) -> Event {
    let mut e = want.clone();
    if !payloads.v1 {
        e.v1_json = None;
    }
    if !payloads.v2 {
        e.v2_json = None;
    }
    if !payloads.raw {
        e.raw_frame = bytes::Bytes::new();
    }
    e
}

/// Copies a directory tree (a data dir, to reopen a state of it).
fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}
