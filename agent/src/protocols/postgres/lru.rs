//! The per-connection memory of prepared statements and portals, by name.

use std::collections::HashMap;

/// Name-keyed map with least-recently-used eviction, bounded in entries and in total weight.
#[derive(Debug)]
pub(super) struct Lru<V> {
    pub(super) map: HashMap<String, (V, u64, usize)>,
    clock: u64,
    weight: usize,
    max_entries: usize,
    max_weight: usize,
}

impl<V> Lru<V> {
    pub(super) fn new(max_entries: usize, max_weight: usize) -> Self {
        Self {
            map: HashMap::new(),
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
