//! zstd compression of wire messages with a dictionary: Jetstream's v1 scheme
//! (`compress=true`) and its v2 scheme (`zstdDictionary=<id>`), and the dictionaries both
//! ship with.
//!
//! Owns the embedded dictionaries (`assets/jetstream/`, origin and licence in its
//! `SOURCE.md`), reading a dictionary's ID from its header, and [`Zstd`]: one prepared
//! dictionary per scheme and a small cache keyed by seq, so each event is compressed once
//! per scheme by whichever compressing subscriber needs it first and shared by the rest.
//! Must never compress an event once per subscriber, or produce a message whose frame
//! lacks the dictionary ID (clients pick the dictionary by that ID).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;

use bytes::Bytes;
use parking_lot::Mutex;

use super::Frame;
use crate::logging::RateLimited;

/// Jetstream's v1 dictionary: what every `compress=true` client decodes with.
pub const JETSTREAM_V1_DICTIONARY: &[u8] =
    include_bytes!("../../assets/jetstream/legacy_subscribe.zdict");
/// Its dictionary ID (in the dictionary's header and in every frame made with it).
pub const JETSTREAM_V1_DICTIONARY_ID: u32 = 1_612_007_021;
/// Jetstream's v2 `subscribeEvents` dictionary, served by `getZstdDictionary`.
pub const JETSTREAM_V2_DICTIONARY: &[u8] =
    include_bytes!("../../assets/jetstream/subscribe_events_20260811.zdict");
pub const JETSTREAM_V2_DICTIONARY_ID: u32 = 20_260_811;

/// Jetstream's level: zstd's default.
pub const LEVEL: i32 = 3;
/// Jetstream's window: 128 KiB. Messages up to this size are one segment whose window is
/// the message itself.
pub const WINDOW_LOG: u32 = 17;

/// Events whose compressed form is kept per scheme, by seq. A batch of one subscriber is
/// at most a few hundred events, so the subscribers of one scheme that are near each
/// other in the stream (live ones are all at the tip) find what the first compressed.
const CACHE_SLOTS: usize = 8192;
/// Default bound of the bytes the cache of one scheme holds: 8,192 events of ~270 bytes
/// (the corpus's v1 mean compressed) are ~2 MiB, so this leaves room for large records.
pub const DEFAULT_CACHE_BYTES: usize = 32 << 20;
/// Idle compression contexts kept per scheme (one per concurrently compressing session).
const POOL_MAX: usize = 16;

/// The magic number that starts a structured zstd dictionary (RFC 8878 §5).
const DICTIONARY_MAGIC: u32 = 0xEC30_A437;

/// The ID in a structured dictionary's header; `None` for raw-content dictionaries (any
/// bytes without the magic) and for the reserved ID 0.
pub fn dictionary_id(dictionary: &[u8]) -> Option<u32> {
    let magic = u32::from_le_bytes(dictionary.get(..4)?.try_into().ok()?);
    if magic != DICTIONARY_MAGIC {
        return None;
    }
    let id = u32::from_le_bytes(dictionary.get(4..8)?.try_into().ok()?);
    (id != 0).then_some(id)
}

/// Where a scheme's dictionary comes from (`--zstd-dictionary`, `--zstd-dictionary-v2`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DictionarySource {
    /// Jetstream's, embedded: what existing clients decode with (the default).
    Jetstream,
    /// sluice's own, trained on synthetic traffic at first use (v1 only; clients must
    /// fetch it from `/zstd-dictionary`).
    Trained,
    /// An operator's file.
    File(std::path::PathBuf),
}

impl DictionarySource {
    /// `jetstream`, `trained` or a path (write `./jetstream` for a file of that name).
    pub fn parse(value: &str) -> Self {
        match value {
            "jetstream" => DictionarySource::Jetstream,
            "trained" => DictionarySource::Trained,
            path => DictionarySource::File(path.into()),
        }
    }
}

/// Why a dictionary or a compression failed.
#[derive(Debug, thiserror::Error)]
pub enum ZstdError {
    #[error("not a structured zstd dictionary with a non-zero ID (RFC 8878 §5)")]
    NoDictionaryId,
    #[error("zstd: {0}")]
    Zstd(#[from] std::io::Error),
}

impl ZstdError {
    /// Stable label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            ZstdError::NoDictionaryId => "no_dictionary_id",
            ZstdError::Zstd(_) => "zstd",
        }
    }
}

/// One compression scheme: a dictionary prepared once, a pool of contexts using it, and
/// the cache that makes compression once per event rather than once per subscriber.
pub struct Zstd {
    id: Option<u32>,
    dictionary: Bytes,
    prepared: &'static zstd::dict::EncoderDictionary<'static>,
    compressors: Mutex<Vec<zstd::bulk::Compressor<'static>>>,
    cache: Vec<Mutex<Option<(u64, Bytes)>>>,
    /// Bytes the cache holds, and its bound (`--zstd-cache-mib`): an event that would
    /// take the cache past it is compressed for the subscriber that needs it and not
    /// kept (counted in `uncached`).
    cache_bytes: AtomicUsize,
    cache_max_bytes: usize,
    uncached: AtomicU64,
    /// Events compressed (cache misses) and messages that could not be compressed.
    compressed: AtomicU64,
    failed: AtomicU64,
}

impl Zstd {
    /// Jetstream's v1 scheme with its own dictionary.
    pub fn jetstream_v1() -> Self {
        static PREPARED: OnceLock<zstd::dict::EncoderDictionary<'static>> = OnceLock::new();
        let prepared = PREPARED
            .get_or_init(|| zstd::dict::EncoderDictionary::copy(JETSTREAM_V1_DICTIONARY, LEVEL));
        Self::with_prepared(Bytes::from_static(JETSTREAM_V1_DICTIONARY), prepared)
    }

    /// Jetstream's v2 scheme with its current dictionary.
    pub fn jetstream_v2() -> Self {
        static PREPARED: OnceLock<zstd::dict::EncoderDictionary<'static>> = OnceLock::new();
        let prepared = PREPARED
            .get_or_init(|| zstd::dict::EncoderDictionary::copy(JETSTREAM_V2_DICTIONARY, LEVEL));
        Self::with_prepared(Bytes::from_static(JETSTREAM_V2_DICTIONARY), prepared)
    }

    /// A scheme with an operator's (or a trained) dictionary: structured or raw content
    /// (raw content has no ID, which only v1 accepts). The prepared dictionary lives for the
    /// rest of the process: there is one per scheme per daemon.
    pub fn new(dictionary: Vec<u8>) -> Self {
        let prepared: &'static zstd::dict::EncoderDictionary<'static> = Box::leak(Box::new(
            zstd::dict::EncoderDictionary::copy(&dictionary, LEVEL),
        ));
        Self::with_prepared(Bytes::from(dictionary), prepared)
    }

    /// Like [`Zstd::new`], for a scheme whose clients ask for the dictionary by ID (v2).
    pub fn with_id(dictionary: Vec<u8>) -> Result<Self, ZstdError> {
        dictionary_id(&dictionary).ok_or(ZstdError::NoDictionaryId)?;
        Ok(Self::new(dictionary))
    }

    fn with_prepared(
        dictionary: Bytes,
        prepared: &'static zstd::dict::EncoderDictionary<'static>,
    ) -> Self {
        Self {
            id: dictionary_id(&dictionary),
            dictionary,
            prepared,
            compressors: Mutex::new(Vec::new()),
            cache: (0..CACHE_SLOTS).map(|_| Mutex::new(None)).collect(),
            cache_bytes: AtomicUsize::new(0),
            cache_max_bytes: DEFAULT_CACHE_BYTES,
            uncached: AtomicU64::new(0),
            compressed: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        }
    }

    /// Trains a dictionary of at most `max_size` bytes from sample messages.
    pub fn train(samples: &[Bytes], max_size: usize) -> std::io::Result<Vec<u8>> {
        zstd::dict::from_samples(samples, max_size)
    }

    /// The dictionary's bytes, as served to clients.
    pub fn dictionary(&self) -> &Bytes {
        &self.dictionary
    }

    /// The dictionary's ID, `None` for a raw-content dictionary.
    pub fn id(&self) -> Option<u32> {
        self.id
    }

    /// Events compressed so far (each once, whatever the number of subscribers).
    pub fn compressed_count(&self) -> u64 {
        self.compressed.load(Ordering::Relaxed)
    }

    /// Messages that could not be compressed (and so were not sent).
    pub fn failed_count(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// The compressed form of the message of the event `seq`: from the cache when another
    /// subscriber of this scheme already needed it, else compressed now and cached.
    pub fn compressed(&self, seq: u64, message: &[u8]) -> Result<Bytes, ZstdError> {
        let slot = &self.cache[(seq % CACHE_SLOTS as u64) as usize];
        if let Some((cached_seq, bytes)) = &*slot.lock() {
            if *cached_seq == seq {
                return Ok(bytes.clone());
            }
        }
        let out = self.compress(message)?;
        self.compressed.fetch_add(1, Ordering::Relaxed);
        let mut slot = slot.lock();
        let freed = slot.as_ref().map_or(0, |(_, old)| old.len());
        // The slot is locked, so what it holds is this update's to free.
        let fits = self
            .cache_bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
                let after = held.saturating_sub(freed) + out.len();
                (after <= self.cache_max_bytes).then_some(after)
            })
            .is_ok();
        if fits {
            *slot = Some((seq, out.clone()));
        } else {
            self.uncached.fetch_add(1, Ordering::Relaxed);
        }
        Ok(out)
    }

    /// Bounds the bytes the shared cache may hold (`--zstd-cache-mib`).
    pub fn with_cache_limit(mut self, max_bytes: usize) -> Self {
        self.cache_max_bytes = max_bytes;
        self
    }

    /// Bytes the shared cache holds now.
    pub fn cache_bytes(&self) -> usize {
        self.cache_bytes.load(Ordering::Relaxed)
    }

    /// Events compressed but not cached because the cache was at its byte bound: each such
    /// event is compressed again for the next subscriber that needs it.
    pub fn uncached_count(&self) -> u64 {
        self.uncached.load(Ordering::Relaxed)
    }

    /// Compresses a message that belongs to one subscriber (a notice, an error frame): not
    /// cached.
    pub fn compress(&self, message: &[u8]) -> Result<Bytes, ZstdError> {
        let pooled = self.compressors.lock().pop();
        let mut compressor = match pooled {
            Some(c) => c,
            None => self.context().inspect_err(|_| self.count_failure())?,
        };
        let out = compressor
            .compress(message)
            .map(Bytes::from)
            .map_err(ZstdError::from)
            .inspect_err(|_| self.count_failure())?;
        let mut pool = self.compressors.lock();
        if pool.len() < POOL_MAX {
            pool.push(compressor);
        }
        Ok(out)
    }

    fn context(&self) -> Result<zstd::bulk::Compressor<'static>, ZstdError> {
        let mut c = zstd::bulk::Compressor::with_prepared_dictionary(self.prepared)?;
        c.set_parameter(zstd::zstd_safe::CParameter::WindowLog(WINDOW_LOG))?;
        c.set_parameter(zstd::zstd_safe::CParameter::DictIdFlag(true))?;
        Ok(c)
    }

    fn count_failure(&self) {
        self.failed.fetch_add(1, Ordering::Relaxed);
    }
}

/// `frame` as a compressing subscriber of `zstd`'s scheme gets it (unchanged without
/// one): a binary message holding one zstd frame of the text. The message of an event
/// (`seq`) comes from the scheme's shared cache. A failure is counted by the scheme and
/// logged (rate-limited), and the message is not sent.
pub fn encode(zstd: Option<&Zstd>, frame: Frame, seq: Option<u64>) -> Option<Frame> {
    let Some(zstd) = zstd else {
        return Some(frame);
    };
    let out = match seq {
        Some(seq) => zstd.compressed(seq, frame.payload()),
        None => zstd.compress(frame.payload()),
    };
    match out {
        Ok(bytes) => Some(Frame::Binary(bytes)),
        Err(e) => {
            static LOG: Mutex<Option<RateLimited>> = Mutex::new(None);
            let (log, suppressed) = LOG
                .lock()
                .get_or_insert_with(|| RateLimited::new(5, std::time::Duration::from_secs(60)))
                .check();
            if log {
                tracing::error!(seq, reason = e.reason(), error = %e, suppressed,
                    "cannot compress a message; it is not sent");
            }
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_dictionaries_carry_the_ids_clients_expect() {
        assert_eq!(
            dictionary_id(JETSTREAM_V1_DICTIONARY),
            Some(JETSTREAM_V1_DICTIONARY_ID)
        );
        assert_eq!(
            dictionary_id(JETSTREAM_V2_DICTIONARY),
            Some(JETSTREAM_V2_DICTIONARY_ID)
        );
        assert_eq!(JETSTREAM_V1_DICTIONARY.len(), 112_640);
        assert_eq!(JETSTREAM_V2_DICTIONARY.len(), 65_536);
        assert_eq!(dictionary_id(b"{\"did\":\"did:plc:\"}"), None);
        assert_eq!(dictionary_id(&[0x37, 0xa4, 0x30]), None);
        assert_eq!(
            dictionary_id(&[0x37, 0xa4, 0x30, 0xec, 0, 0, 0, 0]),
            None,
            "ID 0 is reserved"
        );
        assert!(matches!(
            Zstd::with_id(b"raw content".to_vec()),
            Err(ZstdError::NoDictionaryId)
        ));
    }

    #[test]
    fn the_cache_stays_within_its_byte_bound_and_still_compresses() {
        let message = vec![b'x'; 4096];
        let one = Zstd::jetstream_v1().compress(&message).unwrap().len();
        let zstd = Zstd::jetstream_v1().with_cache_limit(one * 3);
        for seq in 0..10 {
            assert!(!zstd.compressed(seq, &message).unwrap().is_empty());
            assert!(
                zstd.cache_bytes() <= one * 3,
                "seq {seq}: {}",
                zstd.cache_bytes()
            );
        }
        assert_eq!(zstd.cache_bytes(), one * 3);
        assert_eq!(zstd.uncached_count(), 7);
        // An uncached event is compressed again for the next subscriber; a cached one is not.
        zstd.compressed(9, &message).unwrap();
        zstd.compressed(0, &message).unwrap();
        assert_eq!(zstd.compressed_count(), 11);
        // Replacing a slot frees what it held.
        let slots = CACHE_SLOTS as u64;
        zstd.compressed(slots, &message).unwrap();
        assert_eq!(zstd.cache_bytes(), one * 3);
        assert_eq!(zstd.compressed(slots, &message).unwrap().len(), one);
        assert_eq!(zstd.compressed_count(), 12);
    }

    /// Jetstream's window: a decoder that allows no more than 128 KiB decodes any message,
    /// large records included.
    #[test]
    fn large_messages_keep_to_a_128_kib_window() {
        let mut message = Vec::new();
        let mut x: u32 = 1;
        while message.len() < 1 << 20 {
            // Text that does not repeat within the window.
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            message.extend_from_slice(format!("{{\"k{x}\":{}}},", x % 977).as_bytes());
        }
        for (zstd, dictionary) in [
            (Zstd::jetstream_v1(), JETSTREAM_V1_DICTIONARY),
            (Zstd::jetstream_v2(), JETSTREAM_V2_DICTIONARY),
        ] {
            let frame = zstd.compressed(1, &message).unwrap();
            // The window limit is enforced by the streaming decoder (as clients decode).
            let mut d =
                zstd::stream::read::Decoder::with_dictionary(&frame[..], dictionary).unwrap();
            d.window_log_max(WINDOW_LOG).unwrap();
            let mut out = Vec::new();
            std::io::Read::read_to_end(&mut d, &mut out).unwrap();
            assert_eq!(out, message);
        }
    }

    #[test]
    fn frames_name_their_dictionary_and_decode_with_it_only() {
        let message = br#"{"did":"did:plc:abc","time_us":1,"kind":"commit","commit":{"rev":"x","operation":"create","collection":"app.bsky.feed.like","rkey":"y"}}"#;
        for (zstd, id, dictionary) in [
            (
                Zstd::jetstream_v1(),
                JETSTREAM_V1_DICTIONARY_ID,
                JETSTREAM_V1_DICTIONARY,
            ),
            (
                Zstd::jetstream_v2(),
                JETSTREAM_V2_DICTIONARY_ID,
                JETSTREAM_V2_DICTIONARY,
            ),
        ] {
            let frame = zstd.compressed(7, message).unwrap();
            assert_eq!(
                zstd::zstd_safe::get_dict_id_from_frame(&frame).map(|n| n.get()),
                Some(id)
            );
            let mut d = zstd::bulk::Decompressor::with_dictionary(dictionary).unwrap();
            assert_eq!(d.decompress(&frame, 1 << 20).unwrap(), message.to_vec());
            assert!(zstd::bulk::decompress(&frame, 1 << 20).is_err());
            // The second subscriber gets the same bytes from the cache: one compression.
            assert_eq!(zstd.compressed(7, message).unwrap(), frame);
            assert_eq!(zstd.compressed_count(), 1);
        }
    }
}
