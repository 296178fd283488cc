//! The per-connection memory of prepared statements and portals, by name.

use std::collections::HashMap;

/// Name-keyed map with least-recently-used eviction, bounded in entries and in total weight.
///
/// Hand-written rather than `hashlink`'s `LinkedHashMap` (a well-kept crate the agent already
/// builds for saphyr), because that costs more where it matters: under callgrind
/// (`tests/cache_cost.rs`, `PgStream::feed` per statement) a pgbench-like run of prepared
/// statements took 6,405 instructions per statement here and 6,851 (+7%) with hashlink, which
/// allocates a node per insert, hashes stored keys again and frees nodes on `clear` (every
/// ReadyForQuery outside a transaction clears the portals). Hashlink wins only on a connection
/// that keeps more than `STATEMENT_CACHE_ENTRIES` names alive, where every new name makes this
/// map scan for the oldest (26,034 against 10,075 instructions per statement).
///
/// Hashed with foldhash (seeded per process, like the agent's `IdMap`; `protocols/` imports
/// nothing outside it) rather than SipHash: names come from the wire, but a map holds at most
/// `max_entries` of them, and SipHash was 3.7 % of the agent's CPU samples under pgbench.
#[derive(Debug)]
pub(super) struct Lru<V> {
    pub(super) map: HashMap<String, (V, u64, usize), foldhash::fast::RandomState>,
    clock: u64,
    weight: usize,
    max_entries: usize,
    max_weight: usize,
}

impl<V> Lru<V> {
    pub(super) fn new(max_entries: usize, max_weight: usize) -> Self {
        Self {
            map: HashMap::default(),
            clock: 0,
            weight: 0,
            max_entries,
            max_weight,
        }
    }

    pub(super) fn insert(&mut self, key: String, value: V, weight: usize) {
        self.remove(&key);
        while !self.map.is_empty()
            && (self.map.len() >= self.max_entries
                || self.weight.saturating_add(weight) > self.max_weight)
        {
            let Some(oldest) = self
                .map
                .iter()
                .min_by_key(|(_, (_, used, _))| *used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            self.remove(&oldest);
        }
        self.clock += 1;
        self.weight = self.weight.saturating_add(weight);
        self.map.insert(key, (value, self.clock, weight));
    }

    pub(super) fn get(&mut self, key: &str) -> Option<&V> {
        self.clock += 1;
        let clock = self.clock;
        self.map.get_mut(key).map(|(v, used, _)| {
            *used = clock;
            &*v
        })
    }

    pub(super) fn remove(&mut self, key: &str) {
        if let Some((_, _, w)) = self.map.remove(key) {
            self.weight = self.weight.saturating_sub(w);
        }
    }

    pub(super) fn clear(&mut self) {
        self.map.clear();
        self.weight = 0;
    }
}
