//! The routing index: which subscribers may want an event, by DID, collection,
//! collection prefix, or everyone.
//!
//! Owns the keys each live subscriber's filter occupies. Must never visit more than the
//! candidates of an event (cost proportional to them, not to all subscribers), or key a
//! filter differently from how [`Filter::index_entries`] prices it for the index budget.
//! Pure data: no locks, no I/O (the hub holds it under its lock).

use std::collections::HashMap;

use super::filter::{collection_prefixes, Filter, KindSet};
use crate::event::{Event, EventKind};

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct Index {
    everyone: Vec<u64>,
    by_did: HashMap<String, Vec<u64>>,
    by_collection: HashMap<String, Vec<u64>>,
    by_prefix: HashMap<String, Vec<u64>>,
    /// Collection-filtered subscribers (no DID filter): they still get non-commit events.
    non_commit: Vec<u64>,
}

/// How [`Index::candidates`] found a subscriber: what of its filter is left to check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Via {
    /// Listed under the event's exact collection: the filter names that collection and
    /// holds no DIDs (the index lists a filter so only then, with the filter the hub's
    /// entry holds under the same lock), so only its kinds are left to check.
    Collection,
    /// Any other key: the whole filter decides.
    Other,
}

impl Via {
    /// Whether `filter`, found this way for `event`, wants it: [`Filter::matches`]
    /// without the collection lookup the index already made. `kinds` is
    /// `KindSet::of(filter)`, which the hub keeps beside the filter: found by collection,
    /// the filter itself is not looked at.
    pub(super) fn wants(self, filter: &Filter, kinds: KindSet, event: &Event) -> bool {
        match self {
            Via::Collection => kinds.takes(event),
            Via::Other => filter.matches(event),
        }
    }
}

fn add(list: &mut Vec<u64>, id: u64) {
    list.push(id);
}

fn remove(list: &mut Vec<u64>, id: u64) {
    if let Some(pos) = list.iter().position(|&x| x == id) {
        list.swap_remove(pos);
    }
}

fn remove_keyed(map: &mut HashMap<String, Vec<u64>>, key: &str, id: u64) {
    if let Some(list) = map.get_mut(key) {
        remove(list, id);
        if list.is_empty() {
            map.remove(key);
        }
    }
}

impl Index {
    /// Keyed as `Filter::index_entries` counts, which prices this for the index budget.
    pub(super) fn insert(&mut self, id: u64, filter: &Filter) {
        if !filter.dids.is_empty() {
            for did in &filter.dids {
                add(self.by_did.entry(did.clone()).or_default(), id);
            }
        } else if filter.has_collections() {
            for c in &filter.collections {
                add(self.by_collection.entry(c.clone()).or_default(), id);
            }
            for p in &filter.prefixes {
                add(self.by_prefix.entry(p.clone()).or_default(), id);
            }
            add(&mut self.non_commit, id);
        } else {
            add(&mut self.everyone, id);
        }
    }

    pub(super) fn remove(&mut self, id: u64, filter: &Filter) {
        if !filter.dids.is_empty() {
            for did in &filter.dids {
                remove_keyed(&mut self.by_did, did, id);
            }
        } else if filter.has_collections() {
            for c in &filter.collections {
                remove_keyed(&mut self.by_collection, c, id);
            }
            for p in &filter.prefixes {
                remove_keyed(&mut self.by_prefix, p, id);
            }
            remove(&mut self.non_commit, id);
        } else {
            remove(&mut self.everyone, id);
        }
    }

    /// Calls `f` with every subscriber that may want the event and how it was found
    /// (possibly twice; the caller dedups by seq). Cost is proportional to the
    /// candidates, not to all subscribers.
    pub(super) fn candidates(&self, event: &Event, mut f: impl FnMut(u64, Via)) {
        self.everyone.iter().for_each(|&id| f(id, Via::Other));
        if let Some(list) = self.by_did.get(&*event.did) {
            list.iter().for_each(|&id| f(id, Via::Other));
        }
        match (&event.kind, &event.collection) {
            (EventKind::Commit, Some(collection)) => {
                if let Some(list) = self.by_collection.get(&**collection) {
                    list.iter().for_each(|&id| f(id, Via::Collection));
                }
                if !self.by_prefix.is_empty() {
                    for prefix in collection_prefixes(collection) {
                        if let Some(list) = self.by_prefix.get(prefix) {
                            list.iter().for_each(|&id| f(id, Via::Other));
                        }
                    }
                }
            }
            _ => self.non_commit.iter().for_each(|&id| f(id, Via::Other)),
        }
    }

    /// Subscriber entries held (a subscriber counts once per key it is listed under):
    /// what dispatch visits at most, and what [`Filter::index_entries`] prices.
    pub(super) fn entries(&self) -> usize {
        let keyed = |map: &HashMap<String, Vec<u64>>| map.values().map(Vec::len).sum::<usize>();
        self.everyone.len()
            + self.non_commit.len()
            + keyed(&self.by_did)
            + keyed(&self.by_collection)
            + keyed(&self.by_prefix)
    }

    /// One DID key for `id`: a step of a DID filter change made in several holds of
    /// the hub's lock (`Subscription::set_filter`).
    pub(super) fn add_did(&mut self, did: &str, id: u64) {
        add(self.by_did.entry(did.to_owned()).or_default(), id);
    }

    /// Takes `id` off one DID key, dropping the key when no one is left on it.
    pub(super) fn remove_did(&mut self, did: &str, id: u64) {
        remove_keyed(&mut self.by_did, did, id);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use bytes::Bytes;
    use proptest::prelude::*;

    use super::*;
    use crate::fanout::filter::{FilterLimits, Kind};

    const DIDS: [&str; 4] = ["did:plc:aa", "did:plc:bb", "did:plc:cc", "did:web:dd.test"];
    const COLLECTIONS: [&str; 4] = [
        "app.bsky.feed.post",
        "app.bsky.feed.like",
        "app.bsky.graph.follow",
        "com.example.thing",
    ];
    const PREFIXES: [&str; 3] = ["app.bsky.feed.*", "app.bsky.*", "com.example.*"];

    /// A filter as a client would build it: some DIDs, or some collections and
    /// prefixes, or both, or nothing, and v2 `kinds` or none (each picked by a bit mask
    /// over the pools; kinds: commit, identity, account, sync).
    fn filter_of(dids: u8, collections: u8, prefixes: u8, kinds: u8) -> Filter {
        let pick = |mask: u8, pool: &[&str]| -> Vec<String> {
            pool.iter()
                .enumerate()
                .filter(|(i, _)| mask & (1 << i) != 0)
                .map(|(_, s)| (*s).to_owned())
                .collect()
        };
        let mut wanted = pick(collections, &COLLECTIONS);
        wanted.extend(pick(prefixes, &PREFIXES));
        let kinds: Vec<Kind> = [Kind::Commit, Kind::Identity, Kind::Account, Kind::Sync]
            .into_iter()
            .enumerate()
            .filter(|(i, _)| kinds & (1 << i) != 0)
            .map(|(_, k)| k)
            .collect();
        Filter::build(
            &wanted,
            &pick(dids, &DIDS),
            &kinds,
            &FilterLimits::default(),
        )
        .unwrap_or_else(|e| panic!("the pools hold valid names: {e}"))
    }

    fn arb_filter() -> impl Strategy<Value = Filter> {
        // Half the filters have no DIDs, so collection and everyone keys get exercised;
        // half have no kinds.
        (
            prop_oneof![Just(0u8), 0u8..16],
            0u8..16,
            0u8..8,
            prop_oneof![Just(0u8), 0u8..16],
        )
            .prop_map(|(d, c, p, k)| filter_of(d, c, p, k))
    }

    fn event(kind: EventKind, did: &str, collection: Option<&str>) -> Event {
        Event {
            seq: 1,
            time_us: 0,
            upstream_seq: 1,
            received_us: 0,
            kind,
            did: did.into(),
            collection: collection.map(Into::into),
            op_index: 0,
            v1_json: None,
            v2_json: None,
            raw_frame: Bytes::new(),
        }
    }

    /// Every event shape routing distinguishes, for every DID and collection of the pools.
    fn events() -> Vec<Event> {
        let mut out = Vec::new();
        for did in DIDS.iter().chain(["did:plc:nobody"].iter()) {
            for c in COLLECTIONS.iter().chain(["org.other.x"].iter()) {
                out.push(event(EventKind::Commit, did, Some(c)));
            }
            for kind in EventKind::ALL
                .into_iter()
                .filter(|k| *k != EventKind::Commit)
            {
                out.push(event(kind, did, None));
            }
        }
        out
    }

    proptest! {
        /// Each insertion adds exactly the entries the index budget charges for it.
        #[test]
        fn insert_adds_what_the_filter_is_priced_at(filters in prop::collection::vec(arb_filter(), 1..12)) {
            let mut index = Index::default();
            for (id, f) in filters.iter().enumerate() {
                let before = index.entries();
                index.insert(id as u64, f);
                prop_assert_eq!(index.entries(), before + f.index_entries());
            }
        }

        /// Removing a filter undoes its insertion exactly, in any order, down to an
        /// index equal to a new one (no empty keys left behind).
        #[test]
        fn remove_undoes_insert_in_any_order(
            filters in prop::collection::vec(arb_filter(), 1..12),
            order in any::<prop::sample::Index>(),
            victim in any::<prop::sample::Index>(),
        ) {
            let mut index = Index::default();
            for (id, f) in filters.iter().enumerate() {
                index.insert(id as u64, f);
            }
            // One out and back in leaves the same index.
            let v = victim.index(filters.len());
            let full = index.clone();
            index.remove(v as u64, &filters[v]);
            prop_assert_eq!(index.entries(), full.entries() - filters[v].index_entries());
            index.insert(v as u64, &filters[v]);
            prop_assert_eq!(index.entries(), full.entries());
            // Then all out, starting at a random place.
            let start = order.index(filters.len());
            for k in 0..filters.len() {
                let id = (start + k) % filters.len();
                index.remove(id as u64, &filters[id]);
            }
            prop_assert_eq!(index, Index::default());
        }

        /// Every subscriber whose filter matches an event is among its candidates, and
        /// a subscriber is offered an event at most once per key it holds.
        #[test]
        fn candidates_cover_every_matching_subscriber(filters in prop::collection::vec(arb_filter(), 1..12)) {
            let mut index = Index::default();
            for (id, f) in filters.iter().enumerate() {
                index.insert(id as u64, f);
            }
            for e in events() {
                let mut offered = Vec::new();
                let mut via = Vec::new();
                index.candidates(&e, |id, how| {
                    offered.push(id);
                    via.push((id, how));
                });
                prop_assert!(offered.len() <= index.entries());
                let offered: HashSet<u64> = offered.into_iter().collect();
                // What the dispatcher decides by is what the whole filter says.
                for (id, how) in via {
                    let f = &filters[id as usize];
                    prop_assert_eq!(how.wants(f, KindSet::of(f), &e), f.matches(&e), "{:?} via {:?}", f, how);
                }
                for (id, f) in filters.iter().enumerate() {
                    if f.matches(&e) {
                        prop_assert!(offered.contains(&(id as u64)), "{:?} missed {:?}", f, e.kind);
                    }
                }
            }
        }
    }

    #[test]
    fn did_steps_add_and_remove_single_keys() {
        let mut index = Index::default();
        index.add_did("did:plc:aa", 7);
        index.add_did("did:plc:bb", 7);
        index.add_did("did:plc:aa", 8);
        assert_eq!(index.entries(), 3);
        let mut offered = Vec::new();
        index.candidates(&event(EventKind::Identity, "did:plc:aa", None), |id, _| {
            offered.push(id)
        });
        offered.sort_unstable();
        assert_eq!(offered, vec![7, 8]);
        index.remove_did("did:plc:aa", 7);
        index.remove_did("did:plc:aa", 8);
        index.remove_did("did:plc:bb", 7);
        // Removing what is not there is a no-op, never a panic.
        index.remove_did("did:plc:zz", 7);
        assert_eq!(index, Index::default());
    }
}
