//! What a scan allocates: decoding a stored segment allocates nothing per event. Its
//! events live in one shared run and point at the segment's one copy of each DID and
//! collection, so a decode allocates one string per distinct DID and collection and a few
//! buffers per segment, whatever the events repeat.
//!
//! Allocations are counted per thread by this test binary's allocator, so tests running
//! on other threads meanwhile do not disturb the count.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;
use sluice::decode::DecodeLimits;
use sluice::event::StampState;
use sluice::ingest::{IngestOutcome, Ingestor};
use sluice::log::codec::{self, DecodeScratch, Encoder};
use sluice::log::{Compression, Payloads};

use crate::log_common::{template_frames, EventGen};

struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: every call is forwarded unchanged to the system allocator; the count is a
// const-initialized thread-local `Cell` (no allocation, no lock), updated only by
// allocations of the calling thread.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|n| n.set(n.get() + 1));
        // SAFETY: the caller's contract for `alloc` is passed on unchanged.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|n| n.set(n.get() + 1));
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCS.try_with(|n| n.set(n.get() + 1));
        // SAFETY: `ptr` was allocated by `System` (every allocation here goes there).
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Allocations made by this thread while `f` runs.
fn allocations<T>(f: impl FnOnce() -> T) -> (T, u64) {
    let before = ALLOCS.with(Cell::get);
    let out = f();
    (out, ALLOCS.with(Cell::get) - before)
}

/// The corpus frames ingested `rounds` times with fresh stamps (the same DIDs and
/// collections each round, as a segment of live traffic repeats them), so the messages
/// split as ingest's always do; the log tests' synthetic events without the corpus.
fn repeated_events(rounds: usize) -> Vec<sluice::log::SharedEvent> {
    let templates = template_frames();
    let mut ingestor = Ingestor::new(StampState::fresh(), DecodeLimits::default());
    let (mut seq, mut time) = (1u64, 1_700_000_000_000_000i64);
    let mut out = Vec::new();
    for _ in 0..rounds {
        for t in &templates {
            let frame: Bytes = t[0].raw_frame.clone();
            if let IngestOutcome::Events(events) = ingestor.restamp(frame, time, seq, time) {
                seq += events.len() as u64;
                time = events.last().map_or(time, |e| e.time_us) + 1;
                out.extend(events.into_iter().map(sluice::log::SharedEvent::new));
            }
        }
    }
    if out.is_empty() {
        let mut generator = EventGen::new(StampState::fresh());
        for _ in 0..rounds * templates.len() {
            out.extend(
                generator
                    .next_frame()
                    .into_iter()
                    .map(sluice::log::SharedEvent::new),
            );
        }
    }
    out
}

#[test]
fn a_decode_shares_each_did_and_collection_and_allocates_nothing_per_event() {
    let events = repeated_events(4);
    let mut encoder = Encoder::new(Compression::default()).unwrap();
    let segment = encoder.encode(&events).unwrap();
    let dids: HashSet<&str> = events.iter().map(|e| &*e.did).collect();
    let collections: HashSet<&str> = events
        .iter()
        .filter_map(|e| e.collection.as_deref())
        .collect();
    let distinct = (dids.len() + collections.len()) as u64;
    assert!(
        events.len() as u64 >= 2 * distinct,
        "the DIDs repeat: {} events, {distinct} distinct strings",
        events.len()
    );
    let mut scratch = DecodeScratch::default();
    for payloads in [Payloads::V1, Payloads::V2, Payloads::ALL] {
        let frames = payloads.raw.then_some(segment.frames_value.as_slice());
        // Once to warm this thread's decompressor and the scratch buffer.
        codec::decode_with(&segment.events_value, frames, payloads, &mut scratch).unwrap();
        // Decoded into one shared run, as the decoded-segment cache holds it.
        let (decoded, allocs) = allocations(|| {
            Arc::new(
                codec::decode_with(&segment.events_value, frames, payloads, &mut scratch).unwrap(),
            )
        });
        assert_eq!(decoded.len(), events.len());
        for (want, got) in events.iter().zip(decoded.iter()) {
            assert_eq!(*got.did, *want.did, "DID of seq {}", want.seq);
            assert_eq!(
                got.collection, want.collection,
                "collection of seq {}",
                want.seq
            );
            if payloads.v1 {
                assert_eq!(got.v1_json, want.v1_json, "v1 of seq {}", want.seq);
            }
        }
        // Events of one DID (and of one collection) point at one string.
        for (i, a) in decoded.iter().enumerate() {
            if let Some(b) = decoded[i + 1..].iter().find(|b| b.did == a.did) {
                assert!(Arc::ptr_eq(&a.did, &b.did), "seqs {} and {}", a.seq, b.seq);
            }
            if let Some(b) = decoded[i + 1..]
                .iter()
                .find(|b| b.collection.is_some() && b.collection == a.collection)
            {
                let (Some(x), Some(y)) = (&a.collection, &b.collection) else {
                    unreachable!("both are some");
                };
                assert!(Arc::ptr_eq(x, y), "seqs {} and {}", a.seq, b.seq);
            }
        }
        let n = events.len() as u64;
        eprintln!(
            "{payloads:?}: {allocs} allocations for {n} events ({distinct} distinct DIDs and \
             collections): {:.2} per event",
            allocs as f64 / n as f64
        );
        // One string per distinct DID and collection, and a few buffers per segment (the
        // events' one run, the tables, the messages' buffers): nothing per event.
        assert!(
            allocs <= distinct + 32,
            "{allocs} allocations decoding {n} events with {distinct} distinct strings"
        );
    }
}
