//! Subscriber filters: which events a subscriber wants, and validation of what a client
//! asked for.
//!
//! Owns the meaning of a filter (collections exact or `prefix.*`, DIDs, event kinds) and the
//! syntax checks on NSIDs and DIDs. Must never accept an unbounded filter: counts are
//! limited by [`FilterLimits`].

use std::collections::HashSet;

use crate::event::{Event, EventKind};

/// Limits on what one subscriber may ask for.
#[derive(Debug, Clone, Copy)]
pub struct FilterLimits {
    pub max_collections: usize,
    pub max_dids: usize,
}

impl Default for FilterLimits {
    /// Jetstream's limits: 100 collections, 10,000 DIDs.
    fn default() -> Self {
        Self {
            max_collections: 100,
            max_dids: 10_000,
        }
    }
}

/// Event kinds a subscriber can select (Jetstream v2 `kinds`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Commit,
    Identity,
    Account,
    Sync,
}

impl Kind {
    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "commit" => Some(Kind::Commit),
            "identity" => Some(Kind::Identity),
            "account" => Some(Kind::Account),
            "sync" => Some(Kind::Sync),
            _ => None,
        }
    }

    /// This kind's bit in a [`KindSet`].
    const fn bit(self) -> u8 {
        1 << self as u8
    }

    fn of(kind: EventKind) -> Option<Kind> {
        match kind {
            EventKind::Commit | EventKind::CommitTooBig | EventKind::CommitEmpty => {
                Some(Kind::Commit)
            }
            EventKind::Identity => Some(Kind::Identity),
            EventKind::Account => Some(Kind::Account),
            EventKind::Sync => Some(Kind::Sync),
            EventKind::Unknown => None,
        }
    }
}

/// What a subscriber wants. Empty sets mean "all". The three parts are ANDed;
/// collections constrain commit events only (identity, account and sync pass them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub collections: HashSet<String>,
    /// `app.bsky.feed.*` is stored as `app.bsky.feed.`.
    pub prefixes: HashSet<String>,
    pub dids: HashSet<String>,
    pub kinds: HashSet<Kind>,
}

impl Filter {
    /// Builds a filter from raw client values, validating syntax and counts.
    pub fn build(
        collections: &[String],
        dids: &[String],
        kinds: &[Kind],
        limits: &FilterLimits,
    ) -> Result<Filter, String> {
        if collections.len() > limits.max_collections {
            return Err(format!(
                "too many collections: {} (at most {})",
                collections.len(),
                limits.max_collections
            ));
        }
        if dids.len() > limits.max_dids {
            return Err(format!(
                "too many DIDs: {} (at most {})",
                dids.len(),
                limits.max_dids
            ));
        }
        let mut filter = Filter::default();
        for c in collections {
            match c.strip_suffix(".*") {
                Some(prefix) => {
                    if !valid_nsid_prefix(prefix) {
                        return Err(format!("invalid collection pattern {c:?}"));
                    }
                    filter.prefixes.insert(format!("{prefix}."));
                }
                None => {
                    if !valid_nsid(c) {
                        return Err(format!("invalid collection NSID {c:?}"));
                    }
                    filter.collections.insert(c.clone());
                }
            }
        }
        for d in dids {
            if !valid_did(d) {
                return Err(format!("invalid DID {d:?}"));
            }
            filter.dids.insert(d.clone());
        }
        filter.kinds.extend(kinds.iter().copied());
        Ok(filter)
    }

    /// Keys this filter occupies in the routing index, which is what adding or removing it
    /// costs under the hub's lock (`fanout::Index::insert` keys it the same way).
    pub fn index_entries(&self) -> usize {
        if !self.dids.is_empty() {
            self.dids.len()
        } else if self.has_collections() {
            self.collections.len() + self.prefixes.len() + 1
        } else {
            1
        }
    }

    /// Estimated bytes this filter makes the daemon hold: each name is kept three times
    /// (the subscription's copy, the hub's copy, the routing index's key), each with its
    /// `String` and hash-slot overhead. The measurement was ~124 B per DID held;
    /// this says ~3 × (32 + 40) = 216 B for a typical 32-byte DID, on the safe side.
    pub fn memory_bytes(&self) -> usize {
        const PER_NAME: usize = 40;
        let names: usize = self
            .collections
            .iter()
            .chain(&self.prefixes)
            .chain(&self.dids)
            .map(|name| name.len() + PER_NAME)
            .sum();
        3 * names + self.kinds.len() * 16
    }

    pub fn has_collections(&self) -> bool {
        !self.collections.is_empty() || !self.prefixes.is_empty()
    }

    /// Whether the event passes this filter (wire visibility is checked separately).
    pub fn matches(&self, event: &Event) -> bool {
        let Some(kind) = Kind::of(event.kind) else {
            // Unknown types carry no routing key; only unfiltered subscribers see them.
            return self.kinds.is_empty() && self.dids.is_empty() && !self.has_collections();
        };
        if !self.kinds.is_empty() && !self.kinds.contains(&kind) {
            return false;
        }
        if !self.dids.is_empty() && !self.dids.contains(&*event.did) {
            return false;
        }
        if kind == Kind::Commit && self.has_collections() {
            return match &event.collection {
                Some(c) => self.matches_collection(c),
                // tooBig/empty commits name no single collection: pass them, the
                // subscriber must learn that the repo needs a resync.
                None => true,
            };
        }
        true
    }

    /// Whether the filter takes the event's kind (and so the event itself, when its
    /// collection and DID are known to pass: see `index::Via`).
    pub fn matches_kind(&self, event: &Event) -> bool {
        Kind::of(event.kind).is_some_and(|kind| self.kinds.is_empty() || self.kinds.contains(&kind))
    }

    pub fn matches_collection(&self, collection: &str) -> bool {
        self.collections.contains(collection)
            || collection_prefixes(collection).any(|p| self.prefixes.contains(p))
    }
}

/// A filter's kinds as a bit set, kept beside the filter where the dispatcher looks at
/// every candidate (`fanout::hub::Entry`): no pointer to follow and no hash per
/// candidate. [`KindSet::takes`] answers as [`Filter::matches_kind`] does for the filter
/// it was made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KindSet(u8);

impl KindSet {
    pub fn of(filter: &Filter) -> KindSet {
        if filter.kinds.is_empty() {
            KindSet(u8::MAX)
        } else {
            KindSet(filter.kinds.iter().fold(0, |set, kind| set | kind.bit()))
        }
    }

    /// Whether the filter takes the event's kind ([`Filter::matches_kind`]).
    pub fn takes(self, event: &Event) -> bool {
        Kind::of(event.kind).is_some_and(|kind| self.0 & kind.bit() != 0)
    }
}

/// Every `a.b.` style prefix of a collection, shortest first: `app.`, `app.bsky.`, ...
pub fn collection_prefixes(collection: &str) -> impl Iterator<Item = &str> {
    collection
        .char_indices()
        .filter(|&(_, c)| c == '.')
        .map(move |(i, _)| &collection[..=i])
}

fn valid_segment(s: &str, allow_hyphen: bool) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || (allow_hyphen && b == b'-'))
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// atproto NSID syntax: at least three segments, domain authority then a name.
pub fn valid_nsid(s: &str) -> bool {
    if s.len() > 317 || !s.is_ascii() {
        return false;
    }
    let segments: Vec<&str> = s.split('.').collect();
    if segments.len() < 3 {
        return false;
    }
    let (name, authority) = match segments.split_last() {
        Some(parts) => parts,
        None => return false,
    };
    if authority[0].starts_with(|c: char| c.is_ascii_digit()) {
        return false;
    }
    authority.iter().all(|seg| valid_segment(seg, true))
        && valid_segment(name, false)
        && !name.starts_with(|c: char| c.is_ascii_digit())
}

/// The part before `.*` in a collection pattern: at least one authority segment.
fn valid_nsid_prefix(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 317
        && s.is_ascii()
        && !s.starts_with(|c: char| c.is_ascii_digit())
        && s.split('.').all(|seg| valid_segment(seg, true))
}

/// atproto DID syntax: `did:<method>:<identifier>`.
pub fn valid_did(s: &str) -> bool {
    if s.len() > 2048 || !s.is_ascii() {
        return false;
    }
    let Some(rest) = s.strip_prefix("did:") else {
        return false;
    };
    let Some((method, id)) = rest.split_once(':') else {
        return false;
    };
    !method.is_empty()
        && method.bytes().all(|b| b.is_ascii_lowercase())
        && !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:%-".contains(&b))
        && !id.ends_with(':')
        && !id.ends_with('%')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kind_set_takes_what_its_filter_takes_by_kind() {
        let kinds = [Kind::Commit, Kind::Identity, Kind::Account, Kind::Sync];
        for subset in 0u8..16 {
            let mut filter = Filter::default();
            filter.kinds.extend(
                kinds
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| subset & (1 << i) != 0)
                    .map(|(_, k)| *k),
            );
            let set = KindSet::of(&filter);
            for kind in EventKind::ALL {
                let event = Event {
                    seq: 1,
                    time_us: 0,
                    upstream_seq: 1,
                    received_us: 0,
                    kind,
                    did: "did:plc:a".into(),
                    collection: None,
                    op_index: 0,
                    v1_json: None,
                    v2_json: None,
                    raw_frame: bytes::Bytes::new(),
                };
                assert_eq!(
                    set.takes(&event),
                    filter.matches_kind(&event),
                    "{:?} {kind:?}",
                    filter.kinds
                );
            }
        }
    }

    #[test]
    fn prefixes_of_a_collection() {
        let p: Vec<&str> = collection_prefixes("app.bsky.feed.post").collect();
        assert_eq!(p, vec!["app.", "app.bsky.", "app.bsky.feed."]);
    }

    #[test]
    fn builds_and_rejects() {
        let limits = FilterLimits::default();
        let f = Filter::build(
            &["app.bsky.feed.post".into(), "app.bsky.graph.*".into()],
            &["did:plc:abc".into()],
            &[],
            &limits,
        )
        .unwrap();
        assert!(f.matches_collection("app.bsky.feed.post"));
        assert!(f.matches_collection("app.bsky.graph.follow"));
        assert!(!f.matches_collection("app.bsky.feed.like"));
        assert!(Filter::build(&["nope".into()], &[], &[], &limits).is_err());
        assert!(Filter::build(&[], &["did:PLC:x".into()], &[], &limits).is_err());
        let many: Vec<String> = (0..101).map(|i| format!("a.b.c{i}")).collect();
        assert!(Filter::build(&many, &[], &[], &limits)
            .unwrap_err()
            .contains("too many"));
    }
}
