//! Synthetic `com.atproto.sync.subscribeRepos` frames for staging and tests.
//!
//! Owns: a deterministic generator of realistic relay frames (Sync 1.1 `#commit` with a real
//! CARv1 of signed commit, MST nodes and app.bsky records, plus occasional `#identity`,
//! `#account` and `#sync`), the canonical DAG-CBOR writer it needs, and writing the result
//! as a capture file. Must never: read the wall clock or any entropy source other than the
//! seed (the same options must always give the same bytes, the committed fixture depends on
//! it), depend on `decode` (it is the thing under test), or claim the repositories it
//! describes are globally consistent (signatures are random bytes and MST nodes only have a
//! realistic shape).

use std::io::{self, Write};
use std::path::Path;

use cid::Cid;
use multihash::Multihash;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};

use super::capture;

/// Multicodec for DAG-CBOR blocks (records, commits, MST nodes).
pub const CODEC_DAG_CBOR: u64 = 0x71;
/// Multicodec for raw bytes: atproto blob references use it.
pub const CODEC_RAW: u64 = 0x55;
const MULTIHASH_SHA2_256: u64 = 0x12;

/// What to generate. Every field feeds the one seeded RNG, so equal options give equal bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SynthOptions {
    /// Seed for `StdRng::seed_from_u64`; the whole output is a function of the options.
    pub seed: u64,
    /// How many frames to produce.
    pub count: usize,
    /// The `seq` of the first frame; later frames increase strictly (with occasional gaps,
    /// as a real relay has).
    pub start_seq: u64,
    /// The `time` of the first frame, unix milliseconds; later frames are 1–4 ms apart so
    /// the millisecond-precision `time` strings increase strictly. Must lie within years
    /// 1..=9999 (outside that the strings fall back to the unix epoch).
    pub start_time_ms: i64,
    /// Size of the DID pool the events are drawn from (at least 1 is used). Activity is
    /// skewed: low-index DIDs act far more often, as a few heavy accounts do in real traffic.
    pub dids: usize,
}

impl Default for SynthOptions {
    /// Seed 1, 1000 frames, seq from 1,000,000, time from 2025-06-01T12:00:00.000Z,
    /// 2000 DIDs: the parameters of `fixtures/synth-1000.bin`.
    fn default() -> Self {
        Self {
            seed: 1,
            count: 1000,
            start_seq: 1_000_000,
            start_time_ms: 1_748_779_200_000,
            dids: 2000,
        }
    }
}

/// Generates `opts.count` frames (header then body, canonical DAG-CBOR), deterministic from
/// the options. Holds them all in memory; use [`Synth`] as an iterator or
/// [`write_capture`] for large counts.
pub fn generate(opts: &SynthOptions) -> Vec<Vec<u8>> {
    Synth::new(opts).collect()
}

/// Writes `opts.count` synthetic frames to `w` in capture format, one at a time (memory
/// stays at one frame). Returns the number of frames written. Does not flush `w`.
pub fn write_capture(opts: &SynthOptions, w: &mut impl Write) -> io::Result<usize> {
    let mut n = 0;
    for frame in Synth::new(opts) {
        capture::write_frame(w, &frame)?;
        n += 1;
    }
    Ok(n)
}

/// Creates (or truncates) `path` and writes a synthetic capture to it, flushed and fsynced.
/// Returns the number of frames written.
pub fn write_capture_file(opts: &SynthOptions, path: &Path) -> io::Result<usize> {
    let file = std::fs::File::create(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    let mut w = io::BufWriter::new(file);
    let n = write_capture(opts, &mut w)?;
    let file = w.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    Ok(n)
}

// ---------------------------------------------------------------------------------------
// Canonical DAG-CBOR writing
// ---------------------------------------------------------------------------------------

/// A DAG-CBOR value. Map keys are static because every key the generator writes is a
/// lexicon field name; [`Cbor::encode`] sorts them canonically (length, then bytes).
#[derive(Debug, Clone)]
pub(crate) enum Cbor {
    Uint(u64),
    Int(i64),
    Bool(bool),
    Null,
    Text(String),
    Bytes(Vec<u8>),
    Link(Cid),
    Array(Vec<Cbor>),
    Map(Vec<(&'static str, Cbor)>),
}

impl Cbor {
    pub(crate) fn text(s: impl Into<String>) -> Self {
        Cbor::Text(s.into())
    }

    pub(crate) fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }

    /// Shortest-form heads, definite lengths, sorted keys, tag 42 links: the DAG-CBOR
    /// canonical form, so a block's CID is a function of its content alone.
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Cbor::Uint(n) => write_head(out, 0, *n),
            Cbor::Int(n) if *n >= 0 => write_head(out, 0, n.unsigned_abs()),
            // -1 - n for negative n, computed without overflow for i64::MIN.
            Cbor::Int(n) => write_head(out, 1, n.unsigned_abs() - 1),
            Cbor::Bool(false) => out.push(0xf4),
            Cbor::Bool(true) => out.push(0xf5),
            Cbor::Null => out.push(0xf6),
            Cbor::Text(s) => {
                write_head(out, 3, s.len() as u64);
                out.extend_from_slice(s.as_bytes());
            }
            Cbor::Bytes(b) => {
                write_head(out, 2, b.len() as u64);
                out.extend_from_slice(b);
            }
            Cbor::Link(cid) => {
                let bytes = cid.to_bytes();
                write_head(out, 6, 42);
                // DAG-CBOR prefixes the binary CID with the identity multibase byte.
                write_head(out, 2, bytes.len() as u64 + 1);
                out.push(0x00);
                out.extend_from_slice(&bytes);
            }
            Cbor::Array(items) => {
                write_head(out, 4, items.len() as u64);
                for item in items {
                    item.encode(out);
                }
            }
            Cbor::Map(pairs) => {
                let mut sorted: Vec<&(&'static str, Cbor)> = pairs.iter().collect();
                sorted.sort_by(|a, b| {
                    a.0.len()
                        .cmp(&b.0.len())
                        .then_with(|| a.0.as_bytes().cmp(b.0.as_bytes()))
                });
                debug_assert!(
                    sorted.windows(2).all(|w| w[0].0 != w[1].0),
                    "duplicate map key"
                );
                write_head(out, 5, sorted.len() as u64);
                for (k, v) in sorted {
                    write_head(out, 3, k.len() as u64);
                    out.extend_from_slice(k.as_bytes());
                    v.encode(out);
                }
            }
        }
    }
}

fn write_head(out: &mut Vec<u8>, major: u8, n: u64) {
    let m = major << 5;
    if n < 24 {
        out.push(m | n as u8);
    } else if n <= u8::MAX as u64 {
        out.push(m | 24);
        out.push(n as u8);
    } else if n <= u16::MAX as u64 {
        out.push(m | 25);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else if n <= u32::MAX as u64 {
        out.push(m | 26);
        out.extend_from_slice(&(n as u32).to_be_bytes());
    } else {
        out.push(m | 27);
        out.extend_from_slice(&n.to_be_bytes());
    }
}

/// The CIDv1 (sha2-256) of `data` under `codec`.
pub fn cid_for(codec: u64, data: &[u8]) -> Cid {
    let digest = Sha256::digest(data);
    // A 32-byte digest always fits the 64-byte multihash the `cid` crate uses.
    let mh = Multihash::<64>::wrap(MULTIHASH_SHA2_256, &digest)
        .expect("a sha2-256 digest fits a 64-byte multihash");
    Cid::new_v1(codec, mh)
}

fn write_uvarint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8 & 0x7f) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// A CARv1: header `{roots, version: 1}` then `varint | cid | block` sections, in order.
fn car(root: &Cid, blocks: &[(Cid, Vec<u8>)]) -> Vec<u8> {
    let header = Cbor::Map(vec![
        ("roots", Cbor::Array(vec![Cbor::Link(*root)])),
        ("version", Cbor::Uint(1)),
    ])
    .to_vec();
    let mut out = Vec::new();
    write_uvarint(&mut out, header.len() as u64);
    out.extend_from_slice(&header);
    for (cid, data) in blocks {
        let cid_bytes = cid.to_bytes();
        write_uvarint(&mut out, (cid_bytes.len() + data.len()) as u64);
        out.extend_from_slice(&cid_bytes);
        out.extend_from_slice(data);
    }
    out
}

// ---------------------------------------------------------------------------------------
// atproto syntax helpers
// ---------------------------------------------------------------------------------------

const B32_SORTABLE: &[u8; 32] = b"234567abcdefghijklmnopqrstuvwxyz";
const B32_LOWER: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

/// A TID string: 64-bit value (top bit zero) = microseconds << 10 | clock id, written as 13
/// base32-sortable characters so TIDs sort as their timestamps do.
fn tid_string(value: u64) -> String {
    let value = value & (u64::MAX >> 1);
    (0..13)
        .map(|i| B32_SORTABLE[((value >> (60 - 5 * i)) & 31) as usize] as char)
        .collect()
}

fn tid_value(micros: i64, clock_id: u64) -> u64 {
    ((micros.max(0) as u64) << 10) | (clock_id & 0x3ff)
}

/// RFC 3339 UTC with millisecond precision and `Z`, the shape relays use for `time`.
pub(crate) fn rfc3339_ms(unix_ms: i64) -> String {
    let dt = time::OffsetDateTime::from_unix_timestamp_nanos(unix_ms as i128 * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        dt.year(),
        u8::from(dt.month()),
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second(),
        dt.millisecond()
    )
}

// ---------------------------------------------------------------------------------------
// The generator
// ---------------------------------------------------------------------------------------

const LIKE: &str = "app.bsky.feed.like";
const POST: &str = "app.bsky.feed.post";
const REPOST: &str = "app.bsky.feed.repost";
const FOLLOW: &str = "app.bsky.graph.follow";
const BLOCK: &str = "app.bsky.graph.block";
const PROFILE: &str = "app.bsky.actor.profile";

/// Records remembered per repo so deletes and updates can name a real earlier record.
const HISTORY_PER_REPO: usize = 16;
/// Posts remembered globally as like/repost/reply targets.
const RECENT_POSTS: usize = 512;

#[rustfmt::skip]
const WORDS: &[&str] = &[
    "the", "a", "just", "really", "today", "morning", "coffee", "finally", "new", "post",
    "thread", "about", "people", "think", "this", "that", "weekend", "work", "music", "album",
    "movie", "reading", "book", "garden", "cat", "dog", "weather", "rain", "sunny", "train",
    "city", "tonight", "dinner", "friends", "love", "hate", "great", "terrible", "honestly",
    "anyway", "still", "never", "always", "maybe", "code", "bug", "release", "shipping",
    "learning", "rust", "protocol", "network", "feed", "timeline", "photo", "walk", "beach",
    "mountain", "bike", "running", "game", "match", "score", "win", "lost", "season", "art",
    "drawing", "painting", "sketch", "commission", "open", "closed", "question", "answer",
    "why", "how", "what", "when", "everyone", "nobody", "something", "nothing", "again",
    "here", "there", "with", "without", "for", "from", "into", "over", "under", "while",
    "because", "and", "but", "or", "so", "very", "quite", "pretty", "little", "big",
];
const TAGS: &[&str] = &[
    "art",
    "photography",
    "rustlang",
    "bookclub",
    "gardening",
    "caturday",
    "music",
    "news",
];
const LANGS: &[(&str, u32)] = &[("en", 70), ("ja", 10), ("pt", 8), ("de", 6), ("es", 6)];

#[derive(Default)]
struct RepoState {
    last_rev: u64,
    last_data: Option<Cid>,
    records: Vec<(String, String, Cid)>, // (collection, rkey, cid)
    profile: Option<Cid>,
}

#[derive(Clone)]
struct StrongRef {
    uri: String,
    cid: Cid,
}

impl StrongRef {
    fn cbor(&self) -> Cbor {
        Cbor::Map(vec![
            ("uri", Cbor::text(self.uri.clone())),
            ("cid", Cbor::Link(self.cid)),
        ])
    }
}

enum Action {
    Create,
    Update { prev: Cid },
    Delete { prev: Cid },
}

struct Op {
    collection: &'static str,
    rkey: String,
    action: Action,
    record: Option<(Cid, Vec<u8>)>,
}

impl Op {
    fn path(&self) -> String {
        format!("{}/{}", self.collection, self.rkey)
    }
}

/// The generator as an iterator of frames; [`generate`] collects it.
pub struct Synth {
    rng: StdRng,
    remaining: usize,
    seq: u64,
    time_ms: i64,
    dids: Vec<String>,
    repos: Vec<RepoState>,
    recent_posts: std::collections::VecDeque<StrongRef>,
    first: bool,
}

impl Synth {
    pub fn new(opts: &SynthOptions) -> Self {
        let mut rng = StdRng::seed_from_u64(opts.seed);
        let pool = opts.dids.max(1);
        let dids = (0..pool)
            .map(|_| {
                let id: String = (0..24)
                    .map(|_| B32_LOWER[rng.gen_range(0..32)] as char)
                    .collect();
                format!("did:plc:{id}")
            })
            .collect();
        Self {
            rng,
            remaining: opts.count,
            seq: opts.start_seq,
            time_ms: opts.start_time_ms,
            dids,
            repos: (0..pool).map(|_| RepoState::default()).collect(),
            recent_posts: std::collections::VecDeque::new(),
            first: true,
        }
    }

    fn advance_clock(&mut self) {
        if self.first {
            self.first = false;
            return;
        }
        // Relays skip seqs now and then; consumers must tolerate gaps.
        self.seq += if self.rng.gen_bool(0.02) {
            self.rng.gen_range(2..=10)
        } else {
            1
        };
        self.time_ms += self.rng.gen_range(1..=4);
    }

    /// Skewed pick: squaring a uniform draw gives low indices most of the activity.
    fn pick_repo(&mut self) -> usize {
        let u: f64 = self.rng.gen();
        ((u * u) * self.dids.len() as f64) as usize % self.dids.len()
    }

    fn random_cid(&mut self, codec: u64) -> Cid {
        let bytes: [u8; 16] = self.rng.gen();
        cid_for(codec, &bytes)
    }

    fn created_at(&mut self) -> (i64, String) {
        // Clients stamp records a little before the relay sees them.
        let ms = self.time_ms - self.rng.gen_range(0..2000);
        (ms, rfc3339_ms(ms))
    }

    fn new_tid(&mut self, ms: i64) -> String {
        let micros = ms * 1000 + self.rng.gen_range(0..1000);
        let clock = self.rng.gen_range(0..1024);
        tid_string(tid_value(micros, clock))
    }

    fn next_rev(&mut self, repo: usize) -> String {
        let clock = self.rng.gen_range(0..1024);
        let candidate = tid_value(self.time_ms * 1000, clock);
        let state = &mut self.repos[repo];
        let rev = candidate.max(state.last_rev + 1);
        state.last_rev = rev;
        tid_string(rev)
    }

    fn words(&mut self, target_len: usize) -> String {
        let mut text = String::new();
        while text.len() < target_len {
            let word = WORDS[self.rng.gen_range(0..WORDS.len())];
            if !text.is_empty() {
                text.push(if self.rng.gen_bool(0.06) { '.' } else { ' ' });
                if text.ends_with('.') {
                    text.push(' ');
                }
            }
            text.push_str(word);
        }
        let mut chars = text.chars();
        match chars.next() {
            Some(c) => c.to_uppercase().chain(chars).collect(),
            None => text,
        }
    }

    fn blob(&mut self, mime: &str, min: u64, max: u64) -> Cbor {
        let cid = self.random_cid(CODEC_RAW);
        Cbor::Map(vec![
            ("$type", Cbor::text("blob")),
            ("ref", Cbor::Link(cid)),
            ("mimeType", Cbor::text(mime)),
            ("size", Cbor::Uint(self.rng.gen_range(min..=max))),
        ])
    }

    fn subject_post(&mut self) -> StrongRef {
        if !self.recent_posts.is_empty() && self.rng.gen_bool(0.8) {
            let i = self.rng.gen_range(0..self.recent_posts.len());
            return self.recent_posts[i].clone();
        }
        // A post from before the capture started: plausible URI, CID we never saw.
        let repo = self.pick_repo();
        let ms = self.time_ms - self.rng.gen_range(60_000..86_400_000);
        let rkey = self.new_tid(ms);
        StrongRef {
            uri: format!("at://{}/{POST}/{rkey}", self.dids[repo]),
            cid: self.random_cid(CODEC_DAG_CBOR),
        }
    }

    fn post_record(&mut self) -> Cbor {
        let (_, created_at) = self.created_at();
        let target = match self.rng.gen_range(0..10) {
            0..=2 => self.rng.gen_range(8..60),
            3..=7 => self.rng.gen_range(60..200),
            _ => self.rng.gen_range(200..290),
        };
        let mut text = self.words(target);
        let mut facets = Vec::new();
        if self.rng.gen_bool(0.2) {
            let tag = TAGS[self.rng.gen_range(0..TAGS.len())];
            text.push_str(" #");
            let start = text.len() - 1;
            text.push_str(tag);
            facets.push(facet(start, text.len(), "tag", "tag", Cbor::text(tag)));
        }
        if self.rng.gen_bool(0.05) {
            let slug = self.words(12).to_lowercase().replace([' ', '.'], "-");
            let uri = format!("https://example.com/{slug}");
            text.push(' ');
            let start = text.len();
            text.push_str(&uri);
            facets.push(facet(start, text.len(), "link", "uri", Cbor::text(uri)));
        }
        let lang = {
            let mut roll = self.rng.gen_range(0..100);
            let mut chosen = "en";
            for (lang, weight) in LANGS {
                if roll < *weight {
                    chosen = lang;
                    break;
                }
                roll -= weight;
            }
            chosen
        };
        let mut fields = vec![
            ("$type", Cbor::text(POST)),
            ("text", Cbor::Text(text)),
            ("langs", Cbor::Array(vec![Cbor::text(lang)])),
            ("createdAt", Cbor::Text(created_at)),
        ];
        if !facets.is_empty() {
            fields.push(("facets", Cbor::Array(facets)));
        }
        if self.rng.gen_bool(0.3) {
            let parent = self.subject_post();
            let root = if self.rng.gen_bool(0.5) {
                parent.clone()
            } else {
                self.subject_post()
            };
            fields.push((
                "reply",
                Cbor::Map(vec![("root", root.cbor()), ("parent", parent.cbor())]),
            ));
        }
        match self.rng.gen_range(0..100) {
            0..=14 => {
                let n = self.rng.gen_range(1..=4);
                let images = (0..n)
                    .map(|_| {
                        let alt = if self.rng.gen_bool(0.4) {
                            let len = self.rng.gen_range(10..80);
                            self.words(len)
                        } else {
                            String::new()
                        };
                        Cbor::Map(vec![
                            ("alt", Cbor::Text(alt)),
                            ("image", self.blob("image/jpeg", 40_000, 1_000_000)),
                            (
                                "aspectRatio",
                                Cbor::Map(vec![
                                    ("width", Cbor::Uint(self.rng.gen_range(400..2000))),
                                    ("height", Cbor::Uint(self.rng.gen_range(400..2000))),
                                ]),
                            ),
                        ])
                    })
                    .collect();
                fields.push((
                    "embed",
                    Cbor::Map(vec![
                        ("$type", Cbor::text("app.bsky.embed.images")),
                        ("images", Cbor::Array(images)),
                    ]),
                ));
            }
            15..=19 => {
                let quoted = self.subject_post();
                fields.push((
                    "embed",
                    Cbor::Map(vec![
                        ("$type", Cbor::text("app.bsky.embed.record")),
                        ("record", quoted.cbor()),
                    ]),
                ));
            }
            _ => {}
        }
        Cbor::Map(fields)
    }

    fn record_for(&mut self, collection: &'static str) -> Cbor {
        match collection {
            LIKE | REPOST => {
                let subject = self.subject_post();
                let (_, created_at) = self.created_at();
                Cbor::Map(vec![
                    ("$type", Cbor::text(collection)),
                    ("subject", subject.cbor()),
                    ("createdAt", Cbor::Text(created_at)),
                ])
            }
            FOLLOW | BLOCK => {
                let other = self.pick_repo();
                let (_, created_at) = self.created_at();
                Cbor::Map(vec![
                    ("$type", Cbor::text(collection)),
                    ("subject", Cbor::text(self.dids[other].clone())),
                    ("createdAt", Cbor::Text(created_at)),
                ])
            }
            PROFILE => {
                let name_len = self.rng.gen_range(4..24);
                let desc_len = self.rng.gen_range(0..200);
                let (_, created_at) = self.created_at();
                Cbor::Map(vec![
                    ("$type", Cbor::text(PROFILE)),
                    ("displayName", Cbor::Text(self.words(name_len))),
                    ("description", Cbor::Text(self.words(desc_len))),
                    ("avatar", self.blob("image/jpeg", 20_000, 900_000)),
                    ("createdAt", Cbor::Text(created_at)),
                ])
            }
            _ => self.post_record(),
        }
    }

    fn pick_collection(&mut self) -> &'static str {
        match self.rng.gen_range(0..1000) {
            0..=699 => LIKE,
            700..=819 => POST,
            820..=919 => REPOST,
            920..=979 => FOLLOW,
            980..=989 => BLOCK,
            _ => PROFILE,
        }
    }

    fn make_op(&mut self, repo: usize, used: &[String]) -> Op {
        let collection = self.pick_collection();
        if collection == PROFILE {
            let record = self.record_for(PROFILE).to_vec();
            let cid = cid_for(CODEC_DAG_CBOR, &record);
            let action = match self.repos[repo].profile.replace(cid) {
                Some(prev) => Action::Update { prev },
                None => Action::Create,
            };
            return Op {
                collection,
                rkey: "self".to_owned(),
                action,
                record: Some((cid, record)),
            };
        }
        if self.rng.gen_bool(0.05) {
            let history = &mut self.repos[repo].records;
            let found = history
                .iter()
                .rposition(|(c, rkey, _)| c == collection && !used.contains(rkey));
            let (rkey, prev) = match found {
                Some(i) => {
                    let (_, rkey, cid) = history.remove(i);
                    (rkey, cid)
                }
                None => {
                    // Deleting something created before the capture started.
                    let ms = self.time_ms - self.rng.gen_range(3_600_000..604_800_000);
                    (self.new_tid(ms), self.random_cid(CODEC_DAG_CBOR))
                }
            };
            return Op {
                collection,
                rkey,
                action: Action::Delete { prev },
                record: None,
            };
        }
        let record = self.record_for(collection).to_vec();
        let cid = cid_for(CODEC_DAG_CBOR, &record);
        let (ms, _) = self.created_at();
        let mut rkey = self.new_tid(ms);
        while used.contains(&rkey) {
            rkey = self.new_tid(ms);
        }
        let history = &mut self.repos[repo].records;
        if history.len() >= HISTORY_PER_REPO {
            history.remove(0);
        }
        history.push((collection.to_owned(), rkey.clone(), cid));
        if collection == POST {
            if self.recent_posts.len() >= RECENT_POSTS {
                self.recent_posts.pop_front();
            }
            self.recent_posts.push_back(StrongRef {
                uri: format!("at://{}/{POST}/{rkey}", self.dids[repo]),
                cid,
            });
        }
        Op {
            collection,
            rkey,
            action: Action::Create,
            record: Some((cid, record)),
        }
    }

    /// An MST node `{l, e}` over sorted full keys, each entry storing only the suffix
    /// after the prefix it shares with the previous key, as the repo spec prescribes.
    fn mst_node(&mut self, left: Option<Cid>, entries: &[(String, Cid, Option<Cid>)]) -> Vec<u8> {
        let mut prev_key: &[u8] = &[];
        let mut es = Vec::with_capacity(entries.len());
        for (key, value, tree) in entries {
            let key = key.as_bytes();
            let shared = prev_key.iter().zip(key).take_while(|(a, b)| a == b).count();
            es.push(Cbor::Map(vec![
                ("p", Cbor::Uint(shared as u64)),
                ("k", Cbor::Bytes(key[shared..].to_vec())),
                ("v", Cbor::Link(*value)),
                ("t", tree.map(Cbor::Link).unwrap_or(Cbor::Null)),
            ]));
            prev_key = key;
        }
        Cbor::Map(vec![
            ("l", left.map(Cbor::Link).unwrap_or(Cbor::Null)),
            ("e", Cbor::Array(es)),
        ])
        .to_vec()
    }

    /// The MST nodes a small commit rewrites: the path from the root down to a leaf holding
    /// the written keys among untouched neighbours. Real repos are a few levels deep with a
    /// handful of entries per node; links to untouched subtrees name blocks that (as in a
    /// real diff) the CAR does not carry. Returns `(root cid, blocks root-first)`.
    fn mst_blocks(&mut self, ops: &[Op]) -> (Cid, Vec<(Cid, Vec<u8>)>) {
        let near = ops.first().map(|op| op.collection).unwrap_or(LIKE);
        let mut leaf: Vec<(String, Cid, Option<Cid>)> = ops
            .iter()
            .filter_map(|op| op.record.as_ref().map(|(cid, _)| (op.path(), *cid, None)))
            .collect();
        for _ in 0..self.rng.gen_range(2..=6) {
            let ms = self.time_ms - self.rng.gen_range(0..30 * 86_400_000);
            let key = format!("{near}/{}", self.new_tid(ms));
            let v = self.random_cid(CODEC_DAG_CBOR);
            leaf.push((key, v, None));
        }
        leaf.sort_by(|a, b| a.0.cmp(&b.0));
        leaf.dedup_by(|a, b| a.0 == b.0);
        let leaf_bytes = self.mst_node(None, &leaf);
        let mut child = cid_for(CODEC_DAG_CBOR, &leaf_bytes);
        let mut blocks = vec![(child, leaf_bytes)];

        for _ in 0..self.rng.gen_range(2..=5) {
            let mut entries: Vec<(String, Cid, Option<Cid>)> = Vec::new();
            for _ in 0..self.rng.gen_range(2..=7) {
                let collection = [LIKE, LIKE, POST, REPOST, FOLLOW][self.rng.gen_range(0..5)];
                let ms = self.time_ms - self.rng.gen_range(0..365 * 86_400_000i64);
                let key = format!("{collection}/{}", self.new_tid(ms));
                let v = self.random_cid(CODEC_DAG_CBOR);
                let t = if self.rng.gen_bool(0.6) {
                    Some(self.random_cid(CODEC_DAG_CBOR))
                } else {
                    None
                };
                entries.push((key, v, t));
            }
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            entries.dedup_by(|a, b| a.0 == b.0);
            // The rewritten child hangs either left of everything or right of one entry.
            let slot = self.rng.gen_range(0..=entries.len());
            let left = if slot == 0 {
                Some(child)
            } else {
                entries[slot - 1].2 = Some(child);
                if self.rng.gen_bool(0.5) {
                    Some(self.random_cid(CODEC_DAG_CBOR))
                } else {
                    None
                }
            };
            let bytes = self.mst_node(left, &entries);
            child = cid_for(CODEC_DAG_CBOR, &bytes);
            blocks.push((child, bytes));
        }
        blocks.reverse();
        (child, blocks)
    }

    fn signed_commit(&mut self, repo: usize, data: Cid, rev: &str) -> (Cid, Vec<u8>) {
        let mut sig = [0u8; 64];
        self.rng.fill(&mut sig[..]);
        let bytes = Cbor::Map(vec![
            ("did", Cbor::text(self.dids[repo].clone())),
            ("version", Cbor::Uint(3)),
            ("data", Cbor::Link(data)),
            ("rev", Cbor::text(rev)),
            ("prev", Cbor::Null),
            ("sig", Cbor::Bytes(sig.to_vec())),
        ])
        .to_vec();
        (cid_for(CODEC_DAG_CBOR, &bytes), bytes)
    }

    fn commit_frame(&mut self, repo: usize) -> (&'static str, Cbor) {
        let n_ops = match self.rng.gen_range(0..100) {
            0..=89 => 1,
            90..=97 => self.rng.gen_range(2..=3),
            _ => self.rng.gen_range(4..=8),
        };
        let mut used = Vec::new();
        let mut ops = Vec::with_capacity(n_ops);
        for _ in 0..n_ops {
            let op = self.make_op(repo, &used);
            if used.contains(&op.rkey) {
                continue; // a second profile write in one commit: keep the first
            }
            used.push(op.rkey.clone());
            ops.push(op);
        }
        let since = match self.repos[repo].last_rev {
            0 => Cbor::Null,
            r => Cbor::Text(tid_string(r)),
        };
        let rev = self.next_rev(repo);
        let prev_data = match self.repos[repo].last_data {
            Some(cid) => cid,
            None => self.random_cid(CODEC_DAG_CBOR),
        };
        let (data, mst) = self.mst_blocks(&ops);
        self.repos[repo].last_data = Some(data);
        let (commit_cid, commit_bytes) = self.signed_commit(repo, data, &rev);

        let mut blocks = vec![(commit_cid, commit_bytes)];
        blocks.extend(mst);
        let mut op_values = Vec::with_capacity(ops.len());
        for op in ops {
            let path = Cbor::Text(op.path());
            let value = match op.action {
                Action::Create => vec![
                    ("action", Cbor::text("create")),
                    ("path", path),
                    ("cid", op_cid(&op)),
                ],
                Action::Update { prev } => vec![
                    ("action", Cbor::text("update")),
                    ("path", path),
                    ("cid", op_cid(&op)),
                    ("prev", Cbor::Link(prev)),
                ],
                Action::Delete { prev } => vec![
                    ("action", Cbor::text("delete")),
                    ("path", path),
                    ("cid", Cbor::Null),
                    ("prev", Cbor::Link(prev)),
                ],
            };
            op_values.push(Cbor::Map(value));
            if let Some(record) = op.record {
                blocks.push(record);
            }
        }
        let body = Cbor::Map(vec![
            ("repo", Cbor::text(self.dids[repo].clone())),
            ("rev", Cbor::Text(rev)),
            ("since", since),
            ("commit", Cbor::Link(commit_cid)),
            ("blocks", Cbor::Bytes(car(&commit_cid, &blocks))),
            ("ops", Cbor::Array(op_values)),
            ("prevData", Cbor::Link(prev_data)),
            ("tooBig", Cbor::Bool(false)),
            ("rebase", Cbor::Bool(false)),
            ("blobs", Cbor::Array(Vec::new())),
            ("seq", Cbor::Uint(self.seq)),
            ("time", Cbor::Text(rfc3339_ms(self.time_ms))),
        ]);
        ("#commit", body)
    }

    fn identity_frame(&mut self, repo: usize) -> (&'static str, Cbor) {
        let name = WORDS[self.rng.gen_range(0..WORDS.len())];
        let handle = format!("{name}{}.bsky.social", self.rng.gen_range(0..10_000));
        let body = Cbor::Map(vec![
            ("did", Cbor::text(self.dids[repo].clone())),
            ("seq", Cbor::Uint(self.seq)),
            ("time", Cbor::Text(rfc3339_ms(self.time_ms))),
            ("handle", Cbor::Text(handle)),
        ]);
        ("#identity", body)
    }

    fn account_frame(&mut self, repo: usize) -> (&'static str, Cbor) {
        let mut fields = vec![
            ("did", Cbor::text(self.dids[repo].clone())),
            ("seq", Cbor::Uint(self.seq)),
            ("time", Cbor::Text(rfc3339_ms(self.time_ms))),
        ];
        if self.rng.gen_bool(0.7) {
            fields.push(("active", Cbor::Bool(true)));
        } else {
            let status =
                ["deactivated", "takendown", "deleted", "suspended"][self.rng.gen_range(0..4)];
            fields.push(("active", Cbor::Bool(false)));
            fields.push(("status", Cbor::text(status)));
        }
        ("#account", Cbor::Map(fields))
    }

    fn sync_frame(&mut self, repo: usize) -> (&'static str, Cbor) {
        let rev = self.next_rev(repo);
        let data = self.random_cid(CODEC_DAG_CBOR);
        self.repos[repo].last_data = Some(data);
        let (commit_cid, commit_bytes) = self.signed_commit(repo, data, &rev);
        let blocks = car(&commit_cid, &[(commit_cid, commit_bytes)]);
        let body = Cbor::Map(vec![
            ("did", Cbor::text(self.dids[repo].clone())),
            ("seq", Cbor::Uint(self.seq)),
            ("time", Cbor::Text(rfc3339_ms(self.time_ms))),
            ("rev", Cbor::Text(rev)),
            ("blocks", Cbor::Bytes(blocks)),
        ]);
        ("#sync", body)
    }
}

fn op_cid(op: &Op) -> Cbor {
    op.record
        .as_ref()
        .map(|(cid, _)| Cbor::Link(*cid))
        .unwrap_or(Cbor::Null)
}

/// A message frame: header `{op: 1, t}` followed by the body, both canonical DAG-CBOR.
pub(crate) fn message_frame(t: &str, body: &Cbor) -> Vec<u8> {
    let mut out = Cbor::Map(vec![("op", Cbor::Int(1)), ("t", Cbor::text(t))]).to_vec();
    body.encode(&mut out);
    out
}

impl Iterator for Synth {
    type Item = Vec<u8>;

    fn next(&mut self) -> Option<Vec<u8>> {
        if self.remaining == 0 {
            return None;
        }
        self.remaining -= 1;
        self.advance_clock();
        let repo = self.pick_repo();
        let (t, body) = match self.rng.gen_range(0..1000) {
            0..=14 => self.identity_frame(repo),
            15..=24 => self.account_frame(repo),
            25..=34 => self.sync_frame(repo),
            _ => self.commit_frame(repo),
        };
        Some(message_frame(t, &body))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl ExactSizeIterator for Synth {}

/// An `app.bsky.richtext.facet` over bytes `start..end` with one feature of `kind`
/// (`tag`, `link`) whose value is under `key`.
fn facet(start: usize, end: usize, kind: &str, key: &'static str, value: Cbor) -> Cbor {
    Cbor::Map(vec![
        (
            "index",
            Cbor::Map(vec![
                ("byteStart", Cbor::Uint(start as u64)),
                ("byteEnd", Cbor::Uint(end as u64)),
            ]),
        ),
        (
            "features",
            Cbor::Array(vec![Cbor::Map(vec![
                (
                    "$type",
                    Cbor::text(format!("app.bsky.richtext.facet#{kind}")),
                ),
                (key, value),
            ])]),
        ),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_canonical() {
        // {"t": "#commit", "op": 1}: the shorter key sorts first.
        let h = Cbor::Map(vec![("op", Cbor::Int(1)), ("t", Cbor::text("#commit"))]).to_vec();
        assert_eq!(
            h,
            [
                0xa2, 0x61, b't', 0x67, b'#', b'c', b'o', b'm', b'm', b'i', b't', 0x62, b'o', b'p',
                0x01
            ]
        );
        assert_eq!(Cbor::Int(-1).to_vec(), [0x20]);
        assert_eq!(Cbor::Uint(24).to_vec(), [0x18, 24]);
        assert_eq!(Cbor::Uint(65536).to_vec(), [0x1a, 0, 1, 0, 0]);
    }

    #[test]
    fn tid_shape() {
        let t = tid_string(tid_value(1_748_779_200_000_000, 5));
        assert_eq!(t.len(), 13);
        assert!(t.starts_with('3'));
        assert!(tid_string(tid_value(1_748_779_200_000_001, 0)) > t);
    }

    #[test]
    fn time_format() {
        assert_eq!(rfc3339_ms(1_748_779_200_123), "2025-06-01T12:00:00.123Z");
    }
}
